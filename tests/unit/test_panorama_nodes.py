"""The panorama ComfyUI nodes with stand-ins for folder_paths / comfy (the real server is the integration tier)."""
import os
import types

import pytest
import torch

from jointcore import prediction as P
from jointcore.denoiser import DiffusersUNetDenoiser, TextConditioning
from jointcore.schedules import alphas_cumprod, ddim_timesteps
from jointcore.tiled import TiledConfig, tiled_decode, tiled_sample
from comfy_stubs import load_node_module
from tiny import tiny_unet, tiny_vae

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
AB = alphas_cumprod()


class _Decoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def decode(self, z):
        return self.vae.decode(z).sample


class FakeVAE:
    """ComfyUI VAE contract: decode(unscaled latents) → IMAGE [B,H,W,3] in 0..1;
    first_stage_model.decode → [-1,1]."""

    def __init__(self):
        self.vae = tiny_vae()
        self.first_stage_model = _Decoder(self.vae)
        self.patcher, self.device, self.vae_dtype = None, torch.device("cpu"), torch.float32
        self.calls = 0

    @torch.no_grad()
    def decode(self, z):
        self.calls += 1
        return ((self.vae.decode(z).sample + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


class FakeK:
    """ComfyUI's sampler-side model: ``model(x, σ, denoise_mask, model_options, seed) → x0`` with CFG applied,
    over an ε-UNet (x = x0 + σ ε, UNet input x/√(1+σ²) at t = timestep(σ))."""

    def __init__(self, den, cond):
        self.den, self.cond = den, cond
        self.inner_model = types.SimpleNamespace(
            model_sampling=types.SimpleNamespace(sigmas=P.sigmas_from_alphas_cumprod(AB).float()),
            process_latent_out=lambda z: z / 0.18215, diffusion_model=den.unet)

    def __call__(self, x, sigma, denoise_mask=None, model_options=None, seed=None):
        s = sigma.double().reshape(-1, 1, 1, 1)
        t = P.sigma_to_timestep(sigma.double().cpu(), AB)
        xt = x.double() / (1 + s**2).sqrt()
        eps = self.den(xt.to(x.dtype), t, self.cond).double()
        return (x.double() - s * eps).to(x.dtype)


@pytest.fixture
def mod(tmp_path, monkeypatch):
    m, stubs = load_node_module(monkeypatch, tmp_path, "panorama")
    models = stubs.models
    m._calls = stubs.bar_totals
    m._models = models
    return m


def _setup(seed=0):
    den = DiffusersUNetDenoiser(tiny_unet(), AB, "epsilon")
    g = torch.Generator().manual_seed(seed)
    cond = TextConditioning(torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g), 4.0)
    return den, cond


def test_sampler_node_equals_jointcore_tiled_sample(mod):
    assert set(mod.NODE_CLASS_MAPPINGS) == {"JDTiledDiffusionSampler", "JDTiledVAEDecode"}
    den, cond = _setup()
    ts = ddim_timesteps(3, "leading", steps_offset=1)
    sigmas = P.schedule_sigmas(ts, AB)
    noise = torch.randn(1, 4, 8, 24)
    x = noise * sigmas[0]  # ComfyUI's noise_scaling for an empty latent
    (sampler,) = mod.JDTiledDiffusionSampler().get_sampler("multidiffusion", 64, 32, True, 2, 0.0)
    assert sampler.options["config"].window == 8 and sampler.options["config"].stride == 4
    previews = []
    out = sampler.fn(FakeK(den, cond), x, sigmas, extra_args={"seed": 0}, callback=previews.append,
                     disable=True, **sampler.options)
    x_t = (x.double() * AB[int(ts[0])].sqrt()).float()
    ref = tiled_sample(den, x_t, ts, cond, TiledConfig(window=8, stride=4, circular=True, view_batch=2),
                       prev_timesteps=[int(t) for t in ts[1:]] + [-1])
    assert (out - ref).abs().max() < 1e-3 * ref.abs().max()
    assert [p["i"] for p in previews] == [0, 1, 2] and previews[0]["denoised"].shape == x.shape


def test_sampler_node_presets_and_errors(mod):
    node = mod.JDTiledDiffusionSampler()
    (s,) = node.get_sampler("jointnet", 512, 0, True, 8, 0.0)
    c = s.options["config"]
    assert (c.window, c.stride, c.boundary, c.whole_image_weight, c.random_offset) == (64, 32, 8, 5.0, True)
    # the boundary is its own input (official 8 latents = 64 px), not derived from the window
    assert node.INPUT_TYPES()["optional"]["boundary"][1]["default"] == 64
    (s,) = node.get_sampler("jointnet", 1024, 0, True, 8, 0.0)
    assert (s.options["config"].window, s.options["config"].boundary) == (128, 8)
    (s,) = node.get_sampler("jointnet", 512, 0, True, 8, 0.0, boundary=128)
    assert s.options["config"].boundary == 16
    (s,) = node.get_sampler("jointnet", 512, 0, True, 8, 0.0, boundary=0)
    assert s.options["config"].boundary == 0
    (s,) = node.get_sampler("multidiffusion", 512, 0, True, 8, 0.0, boundary=128)
    assert s.options["config"].boundary == 0  # uniform weights for the other methods
    with pytest.raises(ValueError, match="boundary 12 px"):
        node.get_sampler("jointnet", 512, 0, True, 8, 0.0, boundary=12)
    (s,) = node.get_sampler("syncdiffusion", 512, 0, False, 1, 0.0, vae=FakeVAE())
    c = s.options["config"]
    assert (c.stride, c.sync_weight, c.sync_decay, c.sync_thres) == (16, 20.0, 0.95, 50)
    (s,) = node.get_sampler("syncdiffusion_fast", 512, 0, False, 1, 0.0, vae=FakeVAE())
    assert s.options["config"].sync_thres == 10
    with pytest.raises(ValueError, match="needs the VAE"):
        node.get_sampler("syncdiffusion", 512, 0, False, 1, 0.0)
    with pytest.raises(ValueError, match="multiple of 8"):
        node.get_sampler("multidiffusion", 500, 0, False, 1, 0.0)
    # SyncDiffusion without the LPIPS backbone file: names the file and models/lpips
    den, cond = _setup()
    (s,) = node.get_sampler("syncdiffusion", 64, 32, False, 1, 0.0, vae=FakeVAE(), lpips_net="vgg")
    sig = P.schedule_sigmas(ddim_timesteps(2, "leading", steps_offset=1), AB)
    with pytest.raises(FileNotFoundError, match=r"vgg16-397923af\.pth.*models.lpips"):
        s.fn(FakeK(den, cond), torch.randn(1, 4, 8, 16) * sig[0], sig, extra_args={"seed": 0}, **s.options)
    with pytest.raises(ValueError, match="noise mask"):
        s.fn(FakeK(den, cond), torch.randn(1, 4, 8, 16), sig, extra_args={"denoise_mask": torch.ones(1, 1, 8, 16)},
             **s.options)


def test_syncdiffusion_node_runs_with_local_lpips_file(mod):
    import torchvision

    tv = torchvision.models.alexnet(weights=None)
    d = mod._models / "lpips"
    d.mkdir(parents=True)
    torch.save({k: v for k, v in tv.state_dict().items() if k.startswith("features.")},
               d / "alexnet-owt-7be5be79.pth")
    with torch.inference_mode():  # ComfyUI executes nodes in inference mode: weights are inference tensors
        den, cond = _setup()
        vae = FakeVAE()
        assert next(den.unet.parameters()).is_inference()
        (s,) = mod.JDTiledDiffusionSampler().get_sampler("syncdiffusion", 32, 16, False, 2, 0.0, vae=vae,
                                                         sync_thres=1, lpips_net="alex")
        sig = P.schedule_sigmas(ddim_timesteps(2, "leading", steps_offset=1), AB)
        x = torch.randn(1, 4, 4, 12) * sig[0]
        out = s.fn(FakeK(den, cond), x, sig, extra_args={"seed": 0}, **s.options)
        (md,) = mod.JDTiledDiffusionSampler().get_sampler("multidiffusion", 32, 16, False, 2, 0.0)
        ref = md.fn(FakeK(den, cond), x, sig, extra_args={"seed": 0}, **md.options)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)


def test_tiled_decode_node(mod):
    vae = FakeVAE()
    z = torch.randn(1, 4, 8, 24)
    (img,) = mod.JDTiledVAEDecode().decode({"samples": z}, vae, 64, 16, True)
    assert img.shape == (1, 64, 192, 3) and 0 <= float(img.min()) and float(img.max()) <= 1
    n = len(mod._calls)
    assert n == vae.calls and n > 1  # progress advanced once per tile
    ref = tiled_decode(lambda q: vae.decode(q).movedim(-1, 1), z, tile=8, overlap=2, circular=True, context=1)
    torch.testing.assert_close(img, ref.movedim(1, -1))


def test_tiling_errors_speak_pixels_and_stepless_schedules_return_the_input(mod, tmp_path, monkeypatch):
    node = mod.JDTiledDiffusionSampler()
    with pytest.raises(ValueError, match=r"stride 72 px > window 64 px"):
        node.get_sampler("multidiffusion", 64, 72, False, 1, 0.0)
    # a schedule with no step (0 or 1 sigma: SplitSigmas at the end, steps = 0) leaves the latent as it is, as
    # ComfyUI's own samplers do, instead of an IndexError — for every KSAMPLER function of the pack
    from comfy_stubs import load_node_module

    dn, _ = load_node_module(monkeypatch, tmp_path, "diff2in1")
    (tiled,) = node.get_sampler("multidiffusion", 64, 32, False, 1, 0.0)
    from jdpack_nodetest.nodes import comfy_denoiser as CD

    x = torch.randn(1, 4, 8, 16)
    for sig in (torch.tensor([]), torch.tensor([3.5])):
        for fn, kw in ((tiled.fn, tiled.options), (CD.comfy_ddim, {}), (dn.mt_restore, {})):
            out = fn(None, x, sig, extra_args={"seed": 0}, **kw)
            assert out is x, (fn, sig)
