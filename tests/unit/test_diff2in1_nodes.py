"""nodes/diff2in1.py with ComfyUI stand-ins: malformed model folders are rejected clearly; created pairs
are saved as a new, reloadable dataset folder on every run; the MT restore sampler keeps the known region."""
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from comfy_stubs import load_node_module

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import tiny_models  # noqa: E402  (the same tiny folders the workflows use)


@pytest.fixture
def mod(tmp_path, monkeypatch):
    m, stubs = load_node_module(monkeypatch, tmp_path, "diff2in1")
    for folder, builder in (("diffusers", tiny_models._sd_folder), ("diff2in1", tiny_models._diff2in1_head)):
        d = stubs.models / folder / "tiny"
        d.mkdir(parents=True)
        builder(d)
    stubs.folder_paths.add_model_folder_path("diffusers", str(stubs.models / "diffusers"))
    m._stubs = stubs
    return m


def test_loader_lists_only_valid_folders_and_rejects_malformed_ones(mod):
    stubs = mod._stubs
    (stubs.models / "diff2in1" / "broken").mkdir()
    (stubs.models / "diff2in1" / "broken" / "config.json").write_text("{}")
    req = mod.JDDiff2in1Loader.INPUT_TYPES()["required"]
    assert req["sd_model"][0] == ["tiny"] and req["head"][0] == ["tiny"]  # 'broken' has no head.safetensors
    with pytest.raises(FileNotFoundError, match="head.safetensors"):
        mod.JDDiff2in1Loader().load("tiny", "broken")
    (stubs.models / "diffusers" / "half").mkdir()
    (stubs.models / "diffusers" / "half" / "unet").mkdir()
    with pytest.raises(ValueError, match="lacks"):
        mod.JDDiff2in1Loader().load("half", "tiny")
    with pytest.raises(ValueError, match="models/diffusers"):
        mod.JDDiff2in1Loader().load("(none found)", "tiny")


def test_create_pairs_saves_a_new_reloadable_folder_each_run(mod):
    (bundle,) = mod.JDDiff2in1Loader().load("tiny", "tiny")
    images = torch.rand(2, 32, 32, 3)
    created, labels, folder = mod.JDDiff2in1CreatePairs().create(bundle, images, 600, 3, 0, 1, 32, "set",
                                                                 captions="a room\na street")
    assert created.shape == (2, 32, 32, 3) and labels.shape == (2, 32, 32, 3)
    assert mod._stubs.bar_updates == 2 * 3
    pkg = mod.__name__.split(".")[0] + ".jointcore.diff2in1"
    D = importlib.import_module(pkg)
    items = D.load_pair_folder(folder, "depth")
    assert len(items) == 2 and os.path.basename(folder) == "set_00001"
    _, _, folder2 = mod.JDDiff2in1CreatePairs().create(bundle, images[:1], 600, 2, 0, 1, 32, "set")
    assert os.path.basename(folder2) == "set_00002" and len(D.load_pair_folder(folder, "depth")) == 2
    with pytest.raises(ValueError, match="caption line per image"):
        mod.JDDiff2in1CreatePairs().create(bundle, images, 600, 2, 0, 1, 32, "set", captions="a\nb\nc")
    with pytest.raises(ValueError, match="folder_prefix"):
        mod.JDDiff2in1CreatePairs().create(bundle, images, 600, 2, 0, 1, 32, "../escape")
    (pred,) = mod.JDDiff2in1Predict().predict(bundle, images, 32)
    assert pred.shape == (2, 32, 32, 3) and 0 <= float(pred.min()) and float(pred.max()) <= 1


def test_mt_restore_sampler_keeps_the_unmasked_latent_exactly(mod):
    import types

    S = importlib.import_module(mod.__name__.split(".")[0] + ".jointcore.schedules")
    P = importlib.import_module(mod.__name__.split(".")[0] + ".jointcore.prediction")
    ab = S.alphas_cumprod()
    known = torch.randn(1, 4, 8, 8)

    class KModel:  # ComfyUI's inpaint wrapper: (x, σ) → x0, with the known latent attached
        model_sampling = types.SimpleNamespace(sigmas=P.sigmas_from_alphas_cumprod(ab).float())
        latent_image = known

        def __call__(self, x, sigma, **kw):
            return torch.tanh(x) * 0.5

    mask = torch.zeros(1, 4, 8, 8)
    mask[..., 2:6, 2:6] = 1  # regenerate the centre
    sig = P.schedule_sigmas(S.ddim_timesteps(10, "trailing"), ab)
    x = torch.randn(1, 4, 8, 8) * float(sig[0])
    (sampler,) = mod.JDMTDiffusionRestoreSampler().get_sampler(0.0)
    out = sampler.fn(KModel(), x, sig, extra_args={"denoise_mask": mask, "seed": 1}, callback=None,
                     **sampler.options)
    keep = mask == 0
    assert torch.equal(out[keep], known[keep])
    assert (out[~keep] - known[~keep]).abs().mean() > 0.1
    assert mod._stubs.checks >= 10  # interruption checked every step
