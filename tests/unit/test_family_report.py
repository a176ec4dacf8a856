"""The quality report runs end to end on a (tiny, untrained) family cache and writes honest sections."""
import json
import shutil

import pytest
import torch

from jointcore.family import report as R


def _fake_family(root):
    """base/ with a random TAESD, a tiny text encoder + tokenizer and a tiny UNet: the layout the build writes."""
    from predictor_ckpt import tiny_clip_tokenizer
    from tiny import tiny_text_encoder, tiny_unet

    from jointcore.training.train_taesd import build_model

    base = root / "base"
    build_model().save_pretrained(str(base / "vae"))
    tiny_text_encoder(hidden_size=32).save_pretrained(str(base / "text_encoder"))
    tiny_clip_tokenizer(str(root / "tok")).save_pretrained(str(base / "tokenizer"))
    tiny_unet(cross_attention_dim=32).save_pretrained(str(base / "unet"))
    (base / "scheduler").mkdir(parents=True, exist_ok=True)
    (base / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "DDIMScheduler"}')
    (base / "model_index.json").write_text("{}")
    return root


def test_report_measures_what_is_built_and_says_what_is_not(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "docs" / "quality.md"
    assert R.main(["--cache", str(tmp_path / "empty"), "--out", str(out), "--scenes", "4"]) == 0
    text = out.read_text()
    assert "Not built yet (stage `vae`)" in text and "Not built yet (stage `t2i`)" in text
    assert text.count("Not built yet") == len(R.SECTIONS)  # every section says so, none measures nothing

    cache = _fake_family(tmp_path / "fam")
    assert R.main(["--cache", str(cache), "--out", str(out), "--scenes", "8", "--sections", "vae,t2i"]) == 0
    text = out.read_text()
    metrics = json.loads((out.parent / "quality" / "metrics.json").read_text())
    # an untrained autoencoder and UNet: the numbers are measured and the targets reported as missed
    assert metrics["vae"]["scenes"] == 8 and metrics["vae"]["psnr_mean_db"] < 28
    assert "**not reproduced**" in text
    assert 0.0 <= metrics["t2i"]["samples"]["first"] <= 1.0
    assert metrics["t2i"]["ground_truth"]["first"] >= 0.75  # the measure itself works on the true renders
    for fig in ("vae_reconstructions.png", "t2i_samples.png"):
        assert (out.parent / "quality" / fig).stat().st_size > 1000
    shutil.rmtree(tmp_path / "fam")


def test_every_section_runs_on_tiny_models_of_each_stage(tmp_path):
    """Predictors (before/after), JointNet (joint + inpaint), Diff-2-in-1 (warm-up/self-improved) and panoramas:
    each section measures on tiny random models laid out as the build writes them."""
    from predictor_ckpt import make_checkpoint
    from tiny import tiny_unet

    from jointcore import diff2in1 as D
    from jointcore.jointnet import JointNet

    torch.set_num_threads(1)
    cache = _fake_family(tmp_path / "fam")
    for stage in ("marigold_depth", "predictor_depth", "predictor_normals"):
        make_checkpoint(str(cache / stage / "model"), seed=3)
    JointNet.from_unet(tiny_unet(cross_attention_dim=32)).save_pretrained(str(cache / "jointnet" / "model"))
    JointNet.from_unet(tiny_unet(cross_attention_dim=32), has_masked_latent_input=True).save_pretrained(
        str(cache / "jointnet_inpaint" / "model"))
    ext = D.UNetFeatureExtractor(tiny_unet(cross_attention_dim=32))
    for sub in ("warmup", "model"):
        D.save_head(D.TaskHead(D.HeadConfig("depth", list(ext.channels((8, 8), 4)), None, width=8, upscale_steps=1)),
                    str(cache / "diff2in1" / sub))
    from jointcore.family import ship

    ship.export(cache, tmp_path / "shipped")
    out = tmp_path / "docs" / "quality.md"
    assert R.main(["--cache", str(cache), "--out", str(out), "--scenes", "3", "--pano-scenes", "1",
                   "--shipped", str(tmp_path / "shipped"), "--sections",
                   "predictor,jointnet,diff2in1,panorama,mt_restoration,mesh,quantization,shipped"]) == 0
    text = out.read_text()
    m = json.loads((out.parent / "quality" / "metrics.json").read_text())
    assert "Not built yet" not in text
    for k in ("before (Marigold-trained)", "after E2E-FT"):
        assert set(m["predictor"][k]) == {"trailing, 1 step", "leading, 1 step", "trailing, 4 steps",
                                          "trailing, 4 steps, ensemble of 5"}
        assert all(0 <= v["abs_rel"] < 10 and 0 <= v["delta1"] <= 1 for v in m["predictor"][k].values())
    assert m["predictor"]["normals"]["trailing, 1 step"]["mean_deg"] > 0
    assert set(m["jointnet"]) == {"image_to_depth", "predictor", "text_to_rgbd", "depth_to_image"}
    assert set(m["diff2in1"]) == {"warm-up", "self-improved", "paired_gain"}
    g = m["diff2in1"]["paired_gain"]
    assert g["scenes"] > 1 and g["standard_error"] > 0
    assert abs(g["mean"] - (m["diff2in1"]["warm-up"]["abs_rel"] - m["diff2in1"]["self-improved"]["abs_rel"])) < 1e-6
    assert set(m["panorama"]["360"]) == {"ground truth", "MultiDiffusion", "SyncDiffusion", "JointNet tiles"}
    mt = m["mt_restoration"]
    assert mt["latent_outside_max_abs"] == 0.0  # the known region is kept exactly (in latent space)
    assert mt["outside"] <= 1.05 * mt["autoencoder_outside"]  # in pixels only the decoder's reach differs
    assert mt["inside"] > 0
    q = m["quantization"]
    assert set(q["t2i"]) == set(q["predictor_depth"]) == {"fp32", "int8", "int4"}
    assert q["t2i"]["fp32"]["psnr_vs_fp32_db"] == 99 and q["t2i"]["int4"]["psnr_vs_fp32_db"] < 99
    sh = m["shipped"]
    assert sh["total_mb"] > 0 and 0 < sh["jointnet"]["relative_eps_error"] < 0.5
    assert sh["jointnet_inpaint"]["relative_eps_error"] > 0      # lossy, and measured through the masked input
    assert sh["predictor_depth"]["full"] > 0 and sh["predictor_normals"]["shipped"] > 0
    assert m["mesh"]["chamfer_m"] > 0 and m["mesh"]["chamfer_flat_m"] > 0
    assert all(v["seam"] > 0 and v["intra_lpips_alex_random"] > 0 for v in m["panorama"]["360"].values())
    for fig in ("predictor_depth_absrel.png", "jointnet.png", "diff2in1_absrel.png", "panorama_360.png",
                "mt_restoration.png"):
        assert (out.parent / "quality" / fig).stat().st_size > 1000


def test_reuse_takes_a_section_from_an_earlier_run_only_for_the_same_models(tmp_path, monkeypatch):
    calls = []

    def fake(ctx):
        calls.append(1)
        return f"## fake {len(calls)}\n", {"n": len(calls)}

    monkeypatch.setitem(R.SECTIONS, "fake", fake)
    cache = tmp_path / "fam"
    (cache / "base" / "unet").mkdir(parents=True)
    w = cache / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    w.write_bytes(b"1")
    out = tmp_path / "q.md"
    args = ["--cache", str(cache), "--out", str(out), "--sections", "fake", "--reuse"]
    R.main(args)
    R.main(args)
    assert len(calls) == 1 and "## fake 1" in out.read_text()
    w.write_bytes(b"22")  # a rebuilt model: measured again
    R.main(args)
    assert len(calls) == 2 and "## fake 2" in out.read_text()
    R.main(args[:-1])  # without --reuse: always measured
    assert len(calls) == 3
    with pytest.raises(SystemExit, match="unknown section"):
        R.main(["--cache", str(cache), "--out", str(out), "--sections", "nope"])
