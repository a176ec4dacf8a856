"""The JointNet ComfyUI nodes with stand-ins for folder_paths / comfy (the real server is the integration tier)."""
import os

import pytest
import torch

from jointcore.jointnet import JointNet
from comfy_stubs import load_node_module
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
    m, stubs = load_node_module(monkeypatch, tmp_path, "jointnet")
    models = stubs.models
    jn = JointNet.from_unet(tiny_unet())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in jn.exchange_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    jn.save_pretrained(models / "jointnet" / "tiny")
    m._calls = stubs.bar_totals
    return m


def _cond(width=32, L=4, seed=0):
    return [[torch.randn(1, L, width, generator=torch.Generator().manual_seed(seed)), {}]]


def test_nodes_generate_encode_inpaint_decode(mod):
    assert set(mod.NODE_CLASS_MAPPINGS) == {"JDJointNetLoader", "JDJointEmptyLatent", "JDJointEncode",
                                            "JDJointDecode", "JDJointKSampler", "JDJointPanoramaSampler"}
    assert "tiny" in mod.JDJointNetLoader.INPUT_TYPES()["required"]["jointnet"][0]
    (bundle,) = mod.JDJointNetLoader().load("tiny", "auto", "epsilon")
    (empty,) = mod.JDJointEmptyLatent().make(64, 64, 2)
    assert empty["samples"].shape == (2, 8, 8, 8)
    ks = mod.JDJointKSampler()
    (gen,) = ks.sample(bundle, _cond(), _cond(seed=1, L=8), empty, "joint_generation", 3, 2, 4.0, "ddim", 0.0, 1.0)
    assert gen["samples"].shape == (2, 8, 8, 8) and torch.isfinite(gen["samples"]).all()
    assert len(mod._calls) == 2  # progress bar advanced every step

    vae = FakeVAE()
    img = torch.rand(1, 64, 64, 3)
    depth = torch.rand(1, 64, 64, 1).expand(-1, -1, -1, 3)
    (enc,) = mod.JDJointEncode().encode(vae, image=img, depth=depth)
    z = enc["samples"]
    assert z.shape == (1, 8, 8, 8)
    torch.testing.assert_close(z[:, 4:], vae.encode(depth[..., :1].expand(-1, -1, -1, 3)))
    (i2d,) = ks.sample(bundle, _cond(), _cond(seed=1), enc, "image_to_depth", 3, 3, 4.0, "dpmpp_2m", 0.0, 1.0)
    torch.testing.assert_close(i2d["samples"][:, :4], z[:, :4], rtol=1e-6, atol=1e-6)  # image kept
    assert (i2d["samples"][:, 4:] - z[:, 4:]).abs().mean() > 0.05                     # depth generated
    # a custom spatial mask for the depth only (masks_only task: the image is fully regenerated)
    dmask = torch.zeros(1, 64, 64)
    dmask[:, :, 32:] = 1
    (ed,) = ks.sample(bundle, _cond(), _cond(seed=1), enc, "masks_only", 3, 2, 4.0, "ddim", 0.0, 1.0,
                      depth_mask=dmask)
    torch.testing.assert_close(ed["samples"][:, 4:, :, :4], z[:, 4:, :, :4], rtol=1e-6, atol=1e-6)
    # masks_only with the latent's noise_mask: the same region in both modalities
    (both,) = ks.sample(bundle, _cond(), _cond(seed=1), dict(enc, noise_mask=dmask.reshape(-1, 1, 64, 64)),
                        "masks_only", 3, 2, 4.0, "ddim", 0.0, 1.0)
    torch.testing.assert_close(both["samples"][..., :4], z[..., :4], rtol=1e-6, atol=1e-6)
    assert (both["samples"][..., 4:] - z[..., 4:]).abs().mean() > 0.05
    image, dense = mod.JDJointDecode().decode(vae, i2d, "depth")
    assert image.shape == (1, 64, 64, 3) and dense.shape == (1, 64, 64, 3)
    assert torch.equal(dense[..., 0], dense[..., 2])


def test_denoise_means_what_it_means_in_ksampler(mod):
    """denoise defaults to 1.0 and is the strength for every task (the task preset only picks the masks): the
    refine_depth task at 1.0 regenerates the depth from pure noise; at 0.4 it keeps the input's structure;
    0 is refused with the migration hint (old workflows used 0 = default)."""
    spec = mod.JDJointKSampler.INPUT_TYPES()["required"]["denoise"]
    assert spec[1]["default"] == 1.0 and "KSampler" in spec[1]["tooltip"]
    (bundle,) = mod.JDJointNetLoader().load("tiny", "fp32", "epsilon")
    vae = FakeVAE()
    enc = mod.JDJointEncode().encode(vae, image=torch.rand(1, 64, 64, 3),
                                     depth=torch.rand(1, 64, 64, 1).expand(-1, -1, -1, 3))[0]
    ks = mod.JDJointKSampler()
    args = (bundle, _cond(), _cond(seed=1), enc, "refine_depth", 3, 5, 4.0, "ddim", 0.0)
    full = ks.sample(*args, 1.0)[0]["samples"]
    part = ks.sample(*args, 0.4)[0]["samples"]
    z = enc["samples"]
    torch.testing.assert_close(full[:, :4], z[:, :4], rtol=1e-6, atol=1e-6)  # the preset still keeps the image
    assert (part[:, 4:] - z[:, 4:]).abs().mean() < 0.5 * (full[:, 4:] - z[:, 4:]).abs().mean()
    with pytest.raises(ValueError, match="'denoise' is 0.*as in KSampler.*set 1.0"):
        ks.sample(*args, 0.0)


def test_node_errors_are_clear(mod):
    (bundle,) = mod.JDJointNetLoader().load("tiny", "fp32", "epsilon")
    (empty,) = mod.JDJointEmptyLatent().make(64, 64, 1)
    ks = mod.JDJointKSampler()
    with pytest.raises(ValueError, match="cross-attention dim is 32"):
        ks.sample(bundle, _cond(width=768), _cond(width=768), empty, "joint_generation", 0, 1, 4.0, "ddim", 0.0, 1.0)
    with pytest.raises(ValueError, match="8 channels"):
        ks.sample(bundle, _cond(), _cond(), {"samples": torch.zeros(1, 4, 8, 8)}, "joint_generation", 0, 1, 4.0,
                  "ddim", 0.0, 1.0)
    with pytest.raises(ValueError, match="connect an image"):
        mod.JDJointEncode().encode(FakeVAE())
    with pytest.raises(ValueError, match="none|models/jointnet"):
        mod.JDJointNetLoader().load("(none found)", "auto", "epsilon")


def test_panorama_node_equals_jointcore_tiled_sample(mod, tmp_path):
    """The RGBD panorama node is the jointcore tiled loop on the JointNet denoiser (same seed → same latent),
    refines with denoise < 1, and refuses the mask-conditioned model."""
    import importlib
    pkg = mod.__name__.split(".")[0] + ".jointcore"  # the node's own copy of jointcore (same classes)
    JS, S, T = (importlib.import_module(f"{pkg}.{m}") for m in ("joint_sampling", "schedules", "tiled"))
    TextConditioning, TiledConfig, tiled_sample = mod.TextConditioning, T.TiledConfig, T.tiled_sample

    (bundle,) = mod.JDJointNetLoader().load("tiny", "auto", "epsilon")
    (empty,) = mod.JDJointEmptyLatent().make(192, 64, 1)
    pos, neg = _cond(), _cond(seed=1)
    node = mod.JDJointPanoramaSampler()
    n0 = len(mod._calls)
    (pano,) = node.sample(bundle, pos, neg, empty, "multidiffusion", 5, 3, 4.0, 64, 32, False, 2, 1.0)
    assert pano["samples"].shape == (1, 8, 8, 24) and len(mod._calls) - n0 == 3
    den = bundle.denoiser()
    ts = S.ddim_timesteps(3, "leading", steps_offset=1).tolist()
    ref = tiled_sample(den, JS.make_noise((1, 8, 8, 24), seed=5), ts, TextConditioning(pos[0][0], neg[0][0], 4.0),
                       TiledConfig.multidiffusion(window=8, stride=4, view_batch=2),
                       final_alpha_cumprod=float(den.alphas_cumprod[0]))
    torch.testing.assert_close(pano["samples"], ref / 0.18215, rtol=1e-4, atol=1e-4)
    (refined,) = node.sample(bundle, pos, neg, pano, "jointnet", 5, 10, 4.0, 64, 0, True, 2, 0.4)
    assert len(mod._calls) - n0 == 3 + 4  # 40 % of 10 steps
    # the boundary width is an input (default 64 px = 8 latents, the official value)
    assert node.INPUT_TYPES()["optional"]["boundary"][1]["default"] == 64
    (narrow,) = node.sample(bundle, pos, neg, pano, "jointnet", 5, 10, 4.0, 64, 0, True, 2, 0.4, boundary=16)
    assert (narrow["samples"] - refined["samples"]).abs().max() > 1e-4
    assert 0 < (refined["samples"] - pano["samples"]).abs().mean() < (pano["samples"] - empty["samples"]).abs().mean()
    jn = JointNet.from_unet(tiny_unet(), has_masked_latent_input=True)
    jn.save_pretrained(tmp_path / "models" / "jointnet" / "tiny_inpaint")
    (inpaint,) = mod.JDJointNetLoader().load("tiny_inpaint", "auto", "epsilon")
    with pytest.raises(ValueError, match="joint-generation model"):
        node.sample(inpaint, pos, neg, empty, "jointnet", 5, 3, 4.0, 64, 0, False, 2, 1.0)


def test_model_listing_is_bounded_and_lists_partly_valid_folders(mod, tmp_path, caplog):
    """A symlink loop, a deep tree and many folders never stall the listing (it runs in the server's request
    handling); a folder with one branch is listed so that the loader can say what is missing."""
    import logging
    import shutil
    import time

    from jdpack_nodetest.nodes import common

    root = tmp_path / "models" / "jointnet"
    (root / "loop" / "inner").mkdir(parents=True)
    (root / "loop" / "inner" / "back").symlink_to(root / "loop", target_is_directory=True)   # a cycle
    (root / "self").symlink_to(root, target_is_directory=True)                               # another
    deep = root / "deep"
    for i in range(12):
        deep = deep / f"d{i}"
    (deep / "unet").mkdir(parents=True)
    (deep / "unet" / "config.json").write_text("{}")                                          # too deep: ignored
    shutil.copytree(root / "tiny" / "unet", root / "half" / "unet")                          # no jointnet/ branch
    t0 = time.monotonic()
    names = mod.JDJointNetLoader.INPUT_TYPES()["required"]["jointnet"][0]
    assert time.monotonic() - t0 < 2
    assert "tiny" in names and "half" in names and not any(n.startswith("deep") for n in names)
    assert not any("back" in n or n.startswith("self/self") for n in names)
    with pytest.raises(FileNotFoundError, match="missing jointnet/config.json"):   # the loader names what is missing
        mod.JDJointNetLoader().load("half", "auto", "epsilon")
    # many folders: the walk stops at the bound instead of visiting them all
    for i in range(60):
        (root / "many" / f"f{i:03d}").mkdir(parents=True)
    old = common.LIST_MAX_DIRS
    common.LIST_MAX_DIRS = 20
    try:
        common._LIST_CACHE.clear()
        with caplog.at_level(logging.WARNING, logger="jointdiffusion"):
            common.list_model_dirs("jointnet", mod._is_jointnet)
        assert "stopped after 20 folders" in caplog.text
    finally:
        common.LIST_MAX_DIRS = old
        common._LIST_CACHE.clear()
    # a new model folder shows up (the base folder's mtime changes, so the cached listing is not reused)
    shutil.copytree(root / "tiny", root / "tiny2")
    assert "tiny2" in mod.JDJointNetLoader.INPUT_TYPES()["required"]["jointnet"][0]


def test_non_finite_inputs_are_refused_by_name(mod):
    """NaN/Inf never come back as a NaN result reported as success: the input is named instead."""
    (bundle,) = mod.JDJointNetLoader().load("tiny", "fp32", "epsilon")
    (empty,) = mod.JDJointEmptyLatent().make(64, 64, 1)
    ks = mod.JDJointKSampler()
    args = (bundle, _cond(), _cond(seed=1, L=8), empty, "joint_generation", 0, 1)
    with pytest.raises(ValueError, match="input 'cfg' is nan"):
        ks.sample(*args, float("nan"), "ddim", 0.0, 1.0)
    with pytest.raises(ValueError, match="input 'denoise' is inf"):
        ks.sample(*args, 4.0, "ddim", 0.0, float("inf"))
    nan_mask = torch.ones(1, 64, 64)
    nan_mask[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="input 'depth_mask' has 1 NaN"):
        ks.sample(*args, 4.0, "ddim", 0.0, 1.0, depth_mask=nan_mask)
    bad = {"samples": empty["samples"].clone()}
    bad["samples"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="input 'joint_latent' has 1 NaN"):
        ks.sample(bundle, _cond(), _cond(seed=1, L=8), bad, "joint_generation", 0, 1, 4.0, "ddim", 0.0, 1.0)
    with pytest.raises(ValueError, match="input 'joint_latent'"):
        mod.JDJointPanoramaSampler().sample(bundle, _cond(), _cond(seed=1, L=8), bad, "jointnet", 0, 1, 4.0, 64, 0,
                                            False, 1, 0.0)
    img = torch.rand(1, 64, 64, 3)
    img[0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="input 'image' has 3 NaN"):
        mod.JDJointEncode().encode(FakeVAE(), image=img)
    with pytest.raises(ValueError, match="input 'depth'"):
        mod.JDJointEncode().encode(FakeVAE(), depth=img)


def test_a_non_finite_model_output_stops_at_the_first_step_naming_dtype_and_fix(mod, tmp_path):
    """fp16 overflow shows as NaN/Inf model output: the sampler stops at its first step with the dtype and the
    fix, never returning a NaN latent; the loader hands its model to ComfyUI's memory manager."""
    (bundle,) = mod.JDJointNetLoader().load("tiny", "auto", "epsilon")
    assert bundle.patcher.model.jointnet is bundle.model and bundle.patcher.size > 0
    with torch.no_grad():
        bundle.model.rgb.conv_out.bias.fill_(float("inf"))
    (empty,) = mod.JDJointEmptyLatent().make(64, 64, 1)
    steps = []
    mod.progress = lambda n: (lambda: steps.append(1))
    with pytest.raises(FloatingPointError, match=r"NaN or infinite values running in float32.*weights or the "
                                                 r"inputs"):
        mod.JDJointKSampler().sample(bundle, _cond(), _cond(seed=1), empty, "joint_generation", 3, 4, 4.0, "ddim",
                                     0.0, 1.0)
    assert steps == []  # stopped inside the first step


def test_finite_output_guard_checks_the_first_call_and_names_half_precision_fixes():
    from jointcore.denoiser import FiniteOutputGuard, NonFiniteOutputError

    class Den:
        prediction_type, alphas_cumprod = "epsilon", torch.ones(10)

        def __init__(self):
            self.calls = 0

        def __call__(self, x, t, cond=None):
            self.calls += 1
            return x * (float("nan") if self.calls == 2 else 1.0)
    g = FiniteOutputGuard(Den(), "JointNet 'x'", torch.float16)
    assert g.prediction_type == "epsilon" and g.alphas_cumprod.shape == (10,)
    x = torch.ones(1, 4, 2, 2)
    g(x, torch.tensor([1]))
    g(x, torch.tensor([1]))  # only the first call is checked (the NaN comes later)
    with pytest.raises(NonFiniteOutputError, match="float16.*bf16.*fp32"):
        FiniteOutputGuard(type("N", (), {"__call__": lambda s, x, t, c=None: x / 0 * 0})(), "m",
                          torch.float16)(x, torch.tensor([1]))
    with pytest.raises(NonFiniteOutputError, match="bfloat16.*fp32"):
        FiniteOutputGuard(type("N", (), {"__call__": lambda s, x, t, c=None: x / 0 * 0})(), "m",
                          torch.bfloat16)(x, torch.tensor([1]))
    every = FiniteOutputGuard(Den(), "m", every_call=True)
    every(x, torch.tensor([1]))
    with pytest.raises(NonFiniteOutputError):
        every(x, torch.tensor([1]))


def test_the_sampler_asks_comfyui_to_load_the_model_with_the_jobs_memory(mod, tmp_path):
    """The model is loaded through ComfyUI (load_models_gpu with the activation estimate as memory_required, fully)
    and left loaded after the run; a job that cannot fit is refused before anything is loaded."""
    import sys

    mm = sys.modules["comfy.model_management"]
    (bundle,) = mod.JDJointNetLoader().load("tiny", "auto", "epsilon")
    (empty,) = mod.JDJointEmptyLatent().make(64, 64, 1)
    calls = []
    real = mm.load_models_gpu

    def spy(models, memory_required=0, force_full_load=False, **k):
        calls.append((list(models), memory_required, force_full_load))
        return real(models, memory_required=memory_required, force_full_load=force_full_load, **k)
    mm.load_models_gpu = spy
    mod.JDJointKSampler().sample(bundle, _cond(), _cond(seed=1), empty, "joint_generation", 3, 1, 4.0, "ddim", 0.0, 1.0)
    assert len(calls) == 1 and calls[0][0] == [bundle.patcher] and calls[0][2] is True
    assert calls[0][1] == bundle.model.activation_bytes(2, 8, 8, 4)  # CFG doubles the batch; 8x8 latents
    assert any(lm.model is bundle.patcher for lm in mm.current_loaded_models)  # still loaded: ComfyUI decides
    common = sys.modules[mod.__name__.rsplit(".", 1)[0] + ".common"]
    common.available_memory = lambda device: 1024  # 1 KiB left: refused with the size and the advice
    mm.unload_all_models()
    calls.clear()
    with pytest.raises(MemoryError, match="512×512 px.*Lower width/height"):
        mod.JDJointKSampler().sample(bundle, _cond(), _cond(seed=1), mod.JDJointEmptyLatent().make(512, 512, 1)[0],
                                     "joint_generation", 3, 1, 4.0, "ddim", 0.0, 1.0)


def test_auto_dtype_prefers_bf16_then_fp16_on_gpus_and_fp32_on_the_cpu(mod, monkeypatch):
    import sys

    common = sys.modules[mod.__name__.rsplit(".", 1)[0] + ".common"]
    mm = sys.modules["comfy.model_management"]
    assert common.auto_dtype(torch.device("cpu")) == "fp32"
    gpu = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert common.auto_dtype(gpu) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(mm, "should_use_fp16", lambda *a, **k: True, raising=False)
    assert common.auto_dtype(gpu) == "fp16"
    monkeypatch.setattr(mm, "should_use_fp16", lambda *a, **k: False, raising=False)
    assert common.auto_dtype(gpu) == "fp32"


def test_what_an_old_comfyui_left_behind_in_a_partial_load_follows(mod, caplog):
    """The March 2024 runtime's "lowvram" load moves only sub-modules with a ``weight``: buffers and parameters of
    other modules (LPIPS' scaling buffers, CLIP's position ids) follow to the load device, nothing else moves."""
    import logging
    import sys

    common = sys.modules[mod.__name__.rsplit(".", 1)[0] + ".common"]

    class Scaling(torch.nn.Module):  # like lpips.ScalingLayer: buffers, no weight
        def __init__(self):
            super().__init__()
            self.register_buffer("shift", torch.ones(1, 3, 1, 1))
            self.extra = torch.nn.Parameter(torch.zeros(2))

    net = torch.nn.Sequential(Scaling(), torch.nn.Conv2d(3, 4, 1))
    patcher = common.make_patcher("test", net=net)
    patcher.load_device = torch.device("meta")
    for m in net.modules():  # what that runtime's patch_model_lowvram does
        if hasattr(m, "weight"):
            m.to("meta")
    assert net[0].shift.device.type == "cpu"
    with caplog.at_level(logging.INFO, logger="jointdiffusion"):
        common._complete_partial_load(patcher)
    assert {t.device.type for t in list(net.parameters()) + list(net.buffers())} == {"meta"}
    assert "loaded it partially" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jointdiffusion"):
        common._complete_partial_load(patcher)  # complete: nothing to do, nothing logged
    assert "partially" not in caplog.text
