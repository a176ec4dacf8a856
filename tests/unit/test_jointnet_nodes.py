"""The JointNet ComfyUI nodes with stand-ins for folder_paths / comfy (the real server is the integration tier)."""
import importlib
import os
import sys
import types

import pytest
import torch

from jointcore.jointnet import JointNet
from tiny import tiny_unet, tiny_vae

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class FakeVAE:
    """ComfyUI VAE contract: encode(IMAGE [B,H,W,3] 0..1) → unscaled latents; decode → IMAGE."""

    def __init__(self):
        self.vae = tiny_vae()

    @torch.no_grad()
    def encode(self, pixels):
        return self.vae.encode(pixels.permute(0, 3, 1, 2) * 2 - 1).latent_dist.mode()

    @torch.no_grad()
    def decode(self, z):
        return ((self.vae.decode(z).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


@pytest.fixture
def mod(tmp_path, monkeypatch):
    models = tmp_path / "models"
    fp = types.ModuleType("folder_paths")
    fp.models_dir = str(models)
    fp.folder_names_and_paths = {}

    def add_model_folder_path(name, path):
        fp.folder_names_and_paths.setdefault(name, ([], set()))[0].append(path)
    fp.add_model_folder_path = add_model_folder_path
    fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0]
    comfy = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = lambda: None
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_offload_device = lambda: torch.device("cpu")
    cu = types.ModuleType("comfy.utils")
    calls = []
    cu.ProgressBar = lambda total: types.SimpleNamespace(update=lambda n: calls.append(total))
    comfy.model_management, comfy.utils = mm, cu
    for k, v in {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": cu}.items():
        monkeypatch.setitem(sys.modules, k, v)
    pkg = types.ModuleType("jdpack_jntest")
    pkg.__path__ = [ROOT]
    monkeypatch.setitem(sys.modules, "jdpack_jntest", pkg)
    nodes_pkg = types.ModuleType("jdpack_jntest.nodes")
    nodes_pkg.__path__ = [os.path.join(ROOT, "nodes")]
    monkeypatch.setitem(sys.modules, "jdpack_jntest.nodes", nodes_pkg)
    for k in [k for k in sys.modules if k.startswith("jdpack_jntest.") and k != "jdpack_jntest.nodes"]:
        monkeypatch.delitem(sys.modules, k)
    m = importlib.import_module("jdpack_jntest.nodes.jointnet")
    jn = JointNet.from_unet(tiny_unet())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in jn.exchange_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    jn.save_pretrained(models / "jointnet" / "tiny")
    m._calls = calls
    return m


def _cond(width=32, L=4, seed=0):
    return [[torch.randn(1, L, width, generator=torch.Generator().manual_seed(seed)), {}]]


def test_nodes_generate_encode_inpaint_decode(mod):
    assert set(mod.NODE_CLASS_MAPPINGS) == {"JDJointNetLoader", "JDJointEmptyLatent", "JDJointEncode",
                                            "JDJointDecode", "JDJointKSampler"}
    assert "tiny" in mod.JDJointNetLoader.INPUT_TYPES()["required"]["jointnet"][0]
    (bundle,) = mod.JDJointNetLoader().load("tiny", "auto", "epsilon")
    (empty,) = mod.JDJointEmptyLatent().make(64, 64, 2)
    assert empty["samples"].shape == (2, 8, 8, 8)
    ks = mod.JDJointKSampler()
    (gen,) = ks.sample(bundle, _cond(), _cond(seed=1, L=8), empty, "joint_generation", 3, 2, 4.0, "ddim", 0.0, 0.0)
    assert gen["samples"].shape == (2, 8, 8, 8) and torch.isfinite(gen["samples"]).all()
    assert len(mod._calls) == 2  # progress bar advanced every step

    vae = FakeVAE()
    img = torch.rand(1, 64, 64, 3)
    depth = torch.rand(1, 64, 64, 1).expand(-1, -1, -1, 3)
    (enc,) = mod.JDJointEncode().encode(vae, image=img, depth=depth)
    z = enc["samples"]
    assert z.shape == (1, 8, 8, 8)
    torch.testing.assert_close(z[:, 4:], vae.encode(depth[..., :1].expand(-1, -1, -1, 3)))
    (i2d,) = ks.sample(bundle, _cond(), _cond(seed=1), enc, "image_to_depth", 3, 3, 4.0, "dpmpp_2m", 0.0, 0.0)
    torch.testing.assert_close(i2d["samples"][:, :4], z[:, :4], rtol=1e-6, atol=1e-6)  # image kept
    assert (i2d["samples"][:, 4:] - z[:, 4:]).abs().mean() > 0.05                     # depth generated
    # a custom spatial mask for the depth only (masks_only task: the image is fully regenerated)
    dmask = torch.zeros(1, 64, 64)
    dmask[:, :, 32:] = 1
    (ed,) = ks.sample(bundle, _cond(), _cond(seed=1), enc, "masks_only", 3, 2, 4.0, "ddim", 0.0, 0.0,
                      depth_mask=dmask)
    torch.testing.assert_close(ed["samples"][:, 4:, :, :4], z[:, 4:, :, :4], rtol=1e-6, atol=1e-6)
    # masks_only with the latent's noise_mask: the same region in both modalities
    (both,) = ks.sample(bundle, _cond(), _cond(seed=1), dict(enc, noise_mask=dmask.reshape(-1, 1, 64, 64)),
                        "masks_only", 3, 2, 4.0, "ddim", 0.0, 0.0)
    torch.testing.assert_close(both["samples"][..., :4], z[..., :4], rtol=1e-6, atol=1e-6)
    assert (both["samples"][..., 4:] - z[..., 4:]).abs().mean() > 0.05
    image, dense = mod.JDJointDecode().decode(vae, i2d, "depth")
    assert image.shape == (1, 64, 64, 3) and dense.shape == (1, 64, 64, 3)
    assert torch.equal(dense[..., 0], dense[..., 2])


def test_node_errors_are_clear(mod):
    (bundle,) = mod.JDJointNetLoader().load("tiny", "fp32", "epsilon")
    (empty,) = mod.JDJointEmptyLatent().make(64, 64, 1)
    ks = mod.JDJointKSampler()
    with pytest.raises(ValueError, match="cross-attention dim is 32"):
        ks.sample(bundle, _cond(width=768), _cond(width=768), empty, "joint_generation", 0, 1, 4.0, "ddim", 0.0, 0.0)
    with pytest.raises(ValueError, match="8 channels"):
        ks.sample(bundle, _cond(), _cond(), {"samples": torch.zeros(1, 4, 8, 8)}, "joint_generation", 0, 1, 4.0,
                  "ddim", 0.0, 0.0)
    with pytest.raises(ValueError, match="connect an image"):
        mod.JDJointEncode().encode(FakeVAE())
    with pytest.raises(ValueError, match="none|models/jointnet"):
        mod.JDJointNetLoader().load("(none found)", "auto", "epsilon")
