"""The family build driver: cached stages, settings-aware invalidation, stage order and errors."""
import pytest

from jointcore.family import build as B


def test_stages_are_cached_and_redone_on_force_or_changed_settings(tmp_path, monkeypatch):
    calls = []
    b = B.Builder(tmp_path, log=lambda *_: None)
    monkeypatch.setattr(b, "world", lambda: calls.append("world"))
    monkeypatch.setattr(b, "base", lambda: calls.append("base"))
    b.build(["world", "base"])
    b.build(["world", "base"])
    assert calls == ["world", "base"] and b.done("world")
    b.build(["world"], force=["world"])
    assert calls[-1] == "world" and len(calls) == 3
    # a changed upstream setting invalidates everything downstream of it, nothing else
    (tmp_path / "t2i").mkdir()
    b._mark("t2i", 1.0)
    assert b.done("t2i")
    monkeypatch.setattr(B, "VAE_ARGS", B.VAE_ARGS + ["--lr", "5e-4"])
    monkeypatch.setitem(B.OWN_ARGS, "vae", B.VAE_ARGS + ["--lr", "5e-4"])
    assert not b.done("t2i") and b.done("world")


def test_unknown_stage_is_refused_before_anything_runs(tmp_path, monkeypatch):
    b = B.Builder(tmp_path, log=lambda *_: None)
    monkeypatch.setattr(b, "world", lambda: pytest.fail("must not run"))
    with pytest.raises(ValueError, match="unknown stage 'wrold'"):
        b.build(["world", "wrold"])


def test_every_stage_has_a_method_and_known_upstream():
    for s in B.STAGES:
        assert callable(getattr(B.Builder, s))
        assert set(B.UPSTREAM[s]) <= set(B.STAGES)


def test_missing_tokenizer_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("JD_CACHE", str(tmp_path))
    monkeypatch.delenv("COMFYUI_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="sd1_tokenizer"):
        B.find_tokenizer()


def test_stages_come_after_their_upstream():
    for s in B.STAGES:
        assert all(B.STAGES.index(u) < B.STAGES.index(s) for u in B.UPSTREAM[s]), s


def test_diff2in1_subsets_link_disjoint_scenes(tmp_path):
    train = tmp_path / "world" / "train"
    for sub, ext in (("images", "png"), ("depth", "npy"), ("captions", "txt")):
        (train / sub).mkdir(parents=True)
        for i in range(5):
            (train / sub / f"s{i:03d}.{ext}").write_text(f"{sub}{i}")
    b = B.Builder(tmp_path, log=lambda *_: None)
    lab = b._subset("labelled", 0, 3, ("images", "depth"))
    unl = b._subset("unlabelled", 3, 2, ("images",))
    assert sorted(p.name for p in (lab / "depth").iterdir()) == ["s000.npy", "s001.npy", "s002.npy"]
    assert sorted(p.name for p in (unl / "images").iterdir()) == ["s003.png", "s004.png"]
    assert (unl / "images" / "s003.png").read_text() == "images3" and not (unl / "depth").exists()
    with pytest.raises(ValueError, match="has 5 scenes, 2 of them from index 3; need 4"):
        b._subset("unlabelled", 3, 4, ("images",))
