"""Tiled panorama sampling (MultiDiffusion / SyncDiffusion / JointNet strategy), tiled decode, metrics."""
from __future__ import annotations


import pytest
import torch

from jointcore import prediction as P
from jointcore.denoiser import DiffusersUNetDenoiser, TextConditioning
from jointcore.metrics_pano import (TORCHVISION_BACKBONE_FILES, intra_lpips, load_lpips, seam_score)
from jointcore.sampling import ddim_sample, diffusers_prev_timesteps
from jointcore.schedules import alphas_cumprod, ddim_timesteps
from jointcore.tiled import (TiledConfig, TiledStats, View, axis_starts, crop_view, decode_circular_padded,
                             latent_shape_for, linear_ramp, make_views, paste_add, sync_view_update, tiled_decode,
                             tiled_sample)
from tiny import tiny_unet, tiny_vae

AB = alphas_cumprod()


class PointwiseDenoiser:
    """ε = 1x1 conv(x_t) + f(t): every view predicts the same per-pixel result, so any correct tiling
    (weights, wrap, offsets, whole-image view) must reproduce plain DDIM exactly."""

    prediction_type = "epsilon"

    def __init__(self, channels=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(channels, channels, generator=g, dtype=torch.float64) * 0.3
        self.alphas_cumprod = AB

    def __call__(self, x_t, t, cond=None):
        t = torch.as_tensor(t).reshape(-1, 1, 1, 1).double()
        return (torch.einsum("oc,bchw->bohw", self.w, x_t.double()) + 1e-3 * t).to(x_t.dtype)


def _coverage(views, H, W):
    c = torch.zeros(1, 1, H, W)
    for v in views:
        paste_add(c, torch.ones(1, 1, v.height, v.width), v)
    return c


# ---------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("H,W,win,stride,circ", [(13, 37, 8, 3, False), (9, 31, (5, 8), (2, 5), True),
                                                   (7, 7, 16, 8, False), (11, 29, 6, 6, True), (17, 5, 4, 3, False)])
def test_views_cover_every_pixel_for_odd_sizes(H, W, win, stride, circ):
    for off in [(0, 0), (1, 2), (2, 4)]:
        views = make_views(H, W, win, stride, circ, off)
        cov = _coverage(views, H, W)
        assert (cov > 0).all(), (H, W, win, stride, circ, off)
        for v in views:
            assert 0 <= v.top and v.top + v.height <= H
            assert 0 <= v.left < W and v.width <= W
            if not circ:
                assert v.left + v.width <= W


def test_axis_starts_and_bad_input():
    assert axis_starts(16, 8, 4) == [0, 4, 8]
    assert axis_starts(17, 8, 4) == [0, 4, 8, 9]             # last window flush with the end
    assert axis_starts(16, 8, 4, circular=True) == [0, 4, 8, 12]
    assert axis_starts(16, 8, 4, circular=True, offset=3) == [3, 7, 11, 15]
    assert axis_starts(5, 8, 4) == [0]                         # window clipped to the panorama
    with pytest.raises(ValueError, match="gaps"):
        axis_starts(32, 8, 9)
    with pytest.raises(ValueError):
        TiledConfig(view_batch=0)
    with pytest.raises(ValueError, match="multiple of the VAE factor 8; use 496 or 504"):
        latent_shape_for(500, 2048)
    assert latent_shape_for(512, 2048) == (64, 256)


def test_linear_ramp_matches_jointnet_formula():
    r = linear_ramp(64, 8)
    k = torch.arange(64, dtype=torch.float64)
    ref = (32 - (k + 0.5 - 32).abs()).clamp(0, 8) / 8
    assert torch.allclose(r.double(), ref)
    assert r[8:56].eq(1).all() and r[0] == pytest.approx(0.5 / 8)


def test_crop_paste_wrap_roundtrip():
    x = torch.arange(2 * 3 * 5 * 10, dtype=torch.float32).reshape(2, 3, 5, 10)
    v = View(1, 7, 3, 6)  # columns 7,8,9,0,1,2
    c = crop_view(x, v)
    assert torch.equal(c, torch.cat([x[:, :, 1:4, 7:], x[:, :, 1:4, :3]], -1))
    acc = torch.zeros_like(x)
    paste_add(acc, c, v)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[7, 8, 9, 0, 1, 2]] = True
    assert torch.equal(acc[:, :, 1:4][..., mask], x[:, :, 1:4][..., mask])
    assert acc[:, :, 1:4][..., ~mask].eq(0).all() and acc[:, :, 0].eq(0).all()


# ---------------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    TiledConfig(window=(6, 8), stride=(3, 4)),                                   # window < height, 2-D grid
    TiledConfig(window=(6, 8), stride=(5, 3), circular=True, boundary=(2, 3), view_batch=3),
    TiledConfig(window=8, stride=4, circular=True, view_batch=4, boundary=2, random_offset=True,
                whole_image_weight=5.0),                                        # JointNet strategy
])
def test_tiling_is_exact_for_a_pointwise_model(cfg):
    den = PointwiseDenoiser()
    ts = ddim_timesteps(4, "leading", steps_offset=1)
    x = torch.randn(2, 4, 11, 21, dtype=torch.float64)
    ref = ddim_sample(den, x, ts)
    stats = TiledStats()
    out = tiled_sample(den, x, ts, None, cfg, generator=torch.Generator().manual_seed(1), stats=stats)
    assert torch.allclose(out, ref, atol=1e-10)
    assert stats.view_evals > 4 * 2


def test_jointnet_whole_image_schedule_and_offsets():
    den = PointwiseDenoiser()
    n = 10
    ts = ddim_timesteps(n, "leading", steps_offset=1)
    stats = TiledStats()
    cfg = TiledConfig.jointnet(window=8, stride=4, view_batch=2)
    tiled_sample(den, torch.randn(1, 4, 8, 24), ts, None, cfg, generator=torch.Generator().manual_seed(0),
                 stats=stats)
    # whole-image view while i <= int(10*0.4) = 4 -> 5 steps
    assert stats.whole_evals == 5
    assert stats.views_per_step == [7] * 5 + [6] * 5


def _diffusers_panorama(unet, vae, emb, neg, latents, steps, guidance, view_batch, circular, window, stride):
    from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionPanoramaPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=sched,
                                           safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    orig = pipe.get_views
    pipe.get_views = lambda h, w, circular_padding=False, **k: orig(h, w, window_size=window, stride=stride,
                                                                    circular_padding=circular_padding)
    H, W = latents.shape[-2:]
    out = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, height=H * 8, width=W * 8, latents=latents.clone(),
               num_inference_steps=steps, guidance_scale=guidance, view_batch_size=view_batch,
               circular_padding=circular, output_type="latent", return_dict=False)[0]
    return out, sched


@pytest.mark.parametrize("circular,view_batch", [(False, 1), (True, 3)])
def test_multidiffusion_equals_diffusers_panorama_pipeline(circular, view_batch):
    unet, vae = tiny_unet(), tiny_vae()
    torch.manual_seed(0)
    emb, neg = torch.randn(1, 7, 32), torch.randn(1, 7, 32)
    lat = torch.randn(1, 4, 8, 24)  # window == height (diffusers' accumulation only supports that)
    steps, g = 3, 5.0
    ref, sched = _diffusers_panorama(unet, vae, emb, neg, lat, steps, g, view_batch, circular, 8, 4)
    den = DiffusersUNetDenoiser.from_scheduler(unet, sched)
    ts = [int(t) for t in sched.timesteps]
    out = tiled_sample(den, lat.clone(), ts, TextConditioning(emb, neg, g),
                       TiledConfig.multidiffusion(window=8, stride=4, circular=circular, view_batch=view_batch),
                       prev_timesteps=diffusers_prev_timesteps(ts), final_alpha_cumprod=float(sched.alphas_cumprod[0]))
    assert ref.shape == out.shape
    assert (out - ref).abs().max() < 1e-4 * ref.abs().max()
    assert (out - lat).abs().max() > 0.1  # it did something


def _tiny_setup():
    unet, vae = tiny_unet(), tiny_vae()
    den = DiffusersUNetDenoiser(unet, AB, "epsilon")
    torch.manual_seed(1)
    cond = TextConditioning(torch.randn(1, 5, 32), torch.randn(1, 5, 32), 3.0)

    def decode(z):
        return vae.decode(z / 0.18215).sample

    perc = load_lpips("alex", random_backbone=True)
    return den, vae, cond, decode, perc


def test_syncdiffusion_weight_zero_equals_multidiffusion():
    den, vae, cond, decode, perc = _tiny_setup()
    ts = ddim_timesteps(2, "leading", steps_offset=1)
    x = torch.randn(1, 4, 4, 12)
    md = tiled_sample(den, x, ts, cond, TiledConfig(window=4, stride=2))
    calls = []
    sd = tiled_sample(den, x, ts, cond, TiledConfig(window=4, stride=2, sync_weight=0.0), decode=decode,
                      perceptual=perc, sync_hook=lambda *a: calls.append(a))
    assert torch.equal(md, sd) and not calls


def test_syncdiffusion_gradient_step_equals_autograd():
    den, vae, cond, decode, perc = _tiny_setup()
    ts = ddim_timesteps(3, "leading", steps_offset=1)
    x = torch.randn(1, 4, 4, 12)
    cfg = TiledConfig(window=4, stride=4, sync_weight=20.0, sync_decay=0.9, sync_freq=2, sync_thres=3)
    seen = []
    stats = TiledStats()
    out = tiled_sample(den, x, ts, cond, cfg, decode=decode, perceptual=perc, stats=stats,
                       sync_hook=lambda i, j, v, before, after: seen.append((i, j, v, before, after)))
    # (i+1) % 2 == 0 and i < 3  -> only step 1 synchronises; anchor = middle of 3 views (index 1)
    assert sorted({s[0] for s in seen}) == [1] and sorted(s[1] for s in seen) == [0, 2]
    assert stats.sync_steps == 1 and stats.grad_evals == 2
    i, j, v, before, after = seen[0]
    t = torch.tensor([int(ts[i])])
    # recompute the anchor image from the panorama latent at step i (replay step 0 as MultiDiffusion)
    x1 = tiled_sample(den, x, ts[:1], cond, TiledConfig(window=4, stride=4), prev_timesteps=[int(ts[1])])
    a = crop_view(x1, make_views(4, 12, 4, 4)[1])
    with torch.no_grad():
        x0a = P.to_x0(den(a, t, cond), a, t, AB, "epsilon")
        anchor = decode(x0a).clamp(-1, 1)
    assert torch.allclose(before, crop_view(x1, v), atol=1e-6)
    xv = before.clone().requires_grad_(True)
    x0 = P.to_x0(den(xv, t, cond), xv, t, AB, "epsilon")
    loss = perc(decode(x0).clamp(-1, 1), anchor).sum()
    (g,) = torch.autograd.grad(loss, xv)
    expected = before - 20.0 * 0.9 ** 1 * g
    assert g.abs().max() > 0
    assert torch.allclose(after, expected, atol=1e-5, rtol=1e-4)
    # the synced run differs from plain MultiDiffusion
    md = tiled_sample(den, x, ts, cond, TiledConfig(window=4, stride=4))
    assert not torch.allclose(out, md)


def test_sync_acts_on_rgb_channels_only_for_8_channel_latents():
    unet = tiny_unet(in_channels=8, out_channels=8)
    vae = tiny_vae()
    den = DiffusersUNetDenoiser(unet, AB, "epsilon")
    cond = TextConditioning(torch.randn(1, 5, 32))
    seen_shapes = []

    def decode(z):
        seen_shapes.append(z.shape[1])
        return vae.decode(z / 0.18215).sample

    perc = load_lpips("alex", random_backbone=True)
    x = torch.randn(1, 8, 4, 8)
    before = crop_view(x, View(0, 0, 4, 4))
    after = sync_view_update(den, before, torch.tensor([500]), cond, torch.zeros(1, 3, 32, 32), decode, perc, 10.0, 4)
    assert set(seen_shapes) == {4}
    assert after.shape == before.shape and not torch.equal(after, before)  # depth channels move via the UNet
    out = tiled_sample(den, x, ddim_timesteps(2, "leading", steps_offset=1), cond,
                       TiledConfig(window=4, stride=2, sync_weight=5.0), decode=decode, perceptual=perc)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_sync_requires_decode_and_perceptual():
    with pytest.raises(ValueError, match="decode function"):
        tiled_sample(PointwiseDenoiser(), torch.randn(1, 4, 4, 8), [500], None, TiledConfig(window=4, stride=2,
                                                                                           sync_weight=1.0))


def test_circular_panorama_is_shift_equivariant_and_seamless():
    den = DiffusersUNetDenoiser(tiny_unet(), AB, "epsilon")
    cond = TextConditioning(torch.randn(1, 5, 32))
    ts = ddim_timesteps(3, "leading", steps_offset=1)
    torch.manual_seed(3)
    x = torch.randn(1, 4, 8, 32)
    cfg = TiledConfig(window=8, stride=4, circular=True, view_batch=4, boundary=2)
    out = tiled_sample(den, x, ts, cond, cfg)
    shifted = tiled_sample(den, torch.roll(x, 12, -1), ts, cond, cfg)
    # 360°: rolling the noise by a multiple of the stride rolls the panorama (the seam is not special)
    assert torch.allclose(shifted, torch.roll(out, 12, -1), atol=1e-5)
    flat = tiled_sample(den, x, ts, cond, TiledConfig(window=8, stride=4, view_batch=4, boundary=2))
    assert not torch.allclose(torch.roll(flat, 12, -1),
                              tiled_sample(den, torch.roll(x, 12, -1), ts, cond,
                                           TiledConfig(window=8, stride=4, view_batch=4, boundary=2)), atol=1e-3)
    # seam continuity at the interior level
    s = float(seam_score(out)[0])
    assert s < 1.3, s


def test_callback_interrupts_and_reports():
    den = PointwiseDenoiser()
    seen = []

    def cb(i, n, x, x0):
        seen.append((i, n, x.shape, x0.shape))
        if i == 1:
            raise InterruptedError("stop")

    with pytest.raises(InterruptedError):
        tiled_sample(den, torch.randn(1, 4, 6, 10), ddim_timesteps(4, "leading", steps_offset=1), None,
                     TiledConfig(window=6, stride=3), callback=cb)
    assert [s[0] for s in seen] == [0, 1] and seen[0][1] == 4 and seen[0][3] == (1, 4, 6, 10)


# ---------------------------------------------------------------------------------------------------
# tiled VAE decode
# ---------------------------------------------------------------------------------------------------

def test_tiled_decode_close_to_whole_decode():
    vae = tiny_vae()

    @torch.no_grad()
    def decode(z):
        return vae.decode(z).sample

    torch.manual_seed(0)
    z = torch.randn(1, 4, 24, 56)
    with torch.no_grad():
        whole = decode(z)
    # tiles differ from the whole decode only through the decoder's global GroupNorm/attention statistics
    tiled = tiled_decode(decode, z, tile=16, overlap=8, context=8)
    assert tiled.shape == whole.shape == (1, 3, 192, 448)
    err = (tiled - whole).abs().mean() / whole.std()
    assert err < 0.08, float(err)
    coarse = tiled_decode(decode, z, tile=8, overlap=4, context=0)
    assert (coarse - whole).abs().mean() / whole.std() > err  # context + overlap is what makes it close
    # circular: compare with the padded whole-image 360° decode
    ref = decode_circular_padded(decode, z, padding=8)
    tc = tiled_decode(decode, z, tile=16, overlap=8, context=8, circular=True)
    assert tc.shape == ref.shape
    assert (tc - ref).abs().mean() / ref.std() < 0.08
    # and the circular decode is seamless
    assert float(seam_score(tc)[0]) < 1.5


def test_tiled_decode_identity_decoder_is_exact():
    # a pixel-wise "decoder" (nearest x8 upsampling) must be reproduced exactly, wrap or not
    def decode(z):
        return torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode="nearest")

    z = torch.randn(2, 4, 9, 23)
    for circ in (False, True):
        assert torch.allclose(tiled_decode(decode, z, tile=(4, 6), overlap=(1, 3), circular=circ, context=2),
                              decode(z), atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# LPIPS loading and metrics
# ---------------------------------------------------------------------------------------------------

def test_lpips_missing_backbone_error_names_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as e:
        load_lpips("vgg", backbone_path=str(tmp_path / "models" / "lpips"))
    msg = str(e.value)
    assert "vgg16-397923af.pth" in msg and str(tmp_path / "models" / "lpips") in msg
    assert "download.pytorch.org/models/vgg16-397923af.pth" in msg
    with pytest.raises(ValueError):
        load_lpips("resnet")


def test_lpips_loads_local_torchvision_backbone(tmp_path):
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.alexnet(weights=None)
    d = tmp_path / "lpips"
    d.mkdir()
    sd = {k: v for k, v in tv.state_dict().items() if k.startswith("features.")}
    torch.save(sd, d / TORCHVISION_BACKBONE_FILES["alex"])
    m = load_lpips("alex", backbone_path=str(d))
    assert torch.equal(m.net.slice1[0].weight, tv.features[0].weight)
    assert torch.equal(getattr(m.net.slice5, "10").weight, tv.features[10].weight)
    a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(m(a, a).sum()) == pytest.approx(0, abs=1e-6) and float(m(a, b).sum()) > 0
    torch.save({"features.0.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError):
        load_lpips("alex", backbone_path=str(tmp_path / "bad.pth"))


def test_intra_lpips_and_seam_score():
    perc = load_lpips("alex", random_backbone=True)
    torch.manual_seed(0)
    tile = torch.rand(1, 3, 32, 32) * 2 - 1
    rep = tile.repeat(1, 1, 1, 4)                                      # 4 identical crops
    assert float(intra_lpips(rep, perc)[0]) == pytest.approx(0, abs=1e-6)
    mixed = torch.cat([tile, torch.rand(1, 3, 32, 96) * 2 - 1], -1)
    assert float(intra_lpips(mixed, perc)[0]) > 0.01
    with pytest.raises(ValueError):
        intra_lpips(tile, perc)
    # seam score: a smooth periodic signal vs one with a jump at the wrap
    xs = torch.linspace(0, 1, 65)[:-1]
    periodic = torch.sin(2 * torch.pi * xs).expand(1, 3, 8, 64)
    ramp = xs.expand(1, 3, 8, 64)
    # seamless: the wrap step is one of the interior steps (at most max/mean = pi/2 for a sine)
    assert 1.0 < float(seam_score(periodic)[0]) < 1.6
    assert float(seam_score(ramp)[0]) > 10


def test_tiled_drives_a_jointnet_with_8_channel_latents():
    from jointcore.jointnet import JointNet, JointNetDenoiser
    jn = JointNet.from_unet(tiny_unet())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in jn.exchange_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    den = JointNetDenoiser(jn.eval(), AB, "epsilon")
    vae = tiny_vae()
    cond = TextConditioning(torch.randn(1, 5, 32), torch.randn(1, 5, 32), 3.0)
    x = torch.randn(1, 8, 4, 12)
    ts = ddim_timesteps(3, "leading", steps_offset=1)
    stats = TiledStats()
    cfg = TiledConfig.jointnet(window=4, stride=2, boundary=1, view_batch=3, sync_weight=5.0, sync_thres=1)
    out = tiled_sample(den, x, ts, cond, cfg, generator=torch.Generator().manual_seed(0),
                       decode=lambda z: vae.decode(z / 0.18215).sample,
                       perceptual=load_lpips("alex", random_backbone=True), stats=stats)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert stats.sync_steps == 1 and stats.whole_evals == 2  # i <= int(3*0.4) = 1
    # with the whole-image view covering the panorama, a 1-view-per-step config equals plain DDIM on the JointNet
    ref = ddim_sample(den, x, ts, cond)
    whole = tiled_sample(den, x, ts, cond, TiledConfig(window=(4, 12), stride=2))
    assert torch.allclose(whole, ref, atol=1e-5)


class _InplaceDenoiser:
    """Wraps a denoiser and, like ComfyUI's 2024 transformer blocks, adds in place to a saved activation."""

    def __init__(self, inner):
        self.inner, self.prediction_type, self.alphas_cumprod = inner, inner.prediction_type, inner.alphas_cumprod

    def __call__(self, x, t, cond):
        h = x * 1.0
        y = torch.nn.functional.layer_norm(h, h.shape[1:])  # saves h for backward
        h += 0.0 * y                                         # then modifies it in place
        return self.inner(h, t, cond)


def test_sync_step_falls_back_when_the_model_modifies_activations_in_place():
    from jointcore.tiled import sync_view_update

    den, vae, cond, decode, perc = _tiny_setup()
    bad = _InplaceDenoiser(den)
    x = torch.randn(1, 4, 4, 4)
    t = torch.tensor([500])
    anchor = torch.rand(1, 3, 32, 32) * 2 - 1
    with pytest.raises(RuntimeError, match="inplace"):  # the exact gradient cannot pass through it
        xv = x.clone().requires_grad_(True)
        out = bad(xv, t, cond)
        torch.autograd.grad(perc(decode(P.to_x0(out, xv, t, AB, "epsilon")).clamp(-1, 1), anchor).sum(), xv)
    after = sync_view_update(bad, x, t, cond, anchor, decode, perc, weight=5.0)
    # expected: ε̂ held constant, x0(x) = (x - s ε̂)/a, gradient through decoder + LPIPS only
    with torch.no_grad():
        eps = P.to_eps(den(x, t, cond), x, t, AB, "epsilon")
    a, s = AB[500].sqrt().float(), (1 - AB[500]).sqrt().float()
    xv = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(perc(decode((xv - s * eps) / a).clamp(-1, 1), anchor).sum(), xv)
    assert g.abs().max() > 0
    torch.testing.assert_close(after, x - 5.0 * g, rtol=1e-4, atol=1e-5)
    # a model without in-place updates still gets the exact gradient (differs from the approximation)
    exact = sync_view_update(den, x, t, cond, anchor, decode, perc, weight=5.0)
    assert not torch.allclose(exact, after, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# the official JointNet panorama loop (apple/ml-jointnet, jointnetpano_pipeline.py), written out
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def official_jointnet_pano(unet, emb, latents, steps, offsets, stride, boundary, view_batch, strength=5.0,
                           until=0.4, shift_whole=True):
    """The official tile loop with circular padding and the given per-step ``w_offset`` (its
    ``np.random.randint(stride)``): window = latent height, views ``k·stride + w_offset`` for ``k < W // stride``,
    the whole-image view (also shifted by ``w_offset``; ``shift_whole=False`` keeps it at 0, the pack's old
    behaviour) with uniform weight ``strength`` while ``i <= int(steps·until)``, linear boundary weights along x,
    diffusers' DDIM step per view batch, ``value / count``."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    sched.set_timesteps(steps)
    B, C, H, W = latents.shape
    views = [(k * stride, k * stride + H) for k in range(W // stride)]
    batches = [views[i:i + view_batch] for i in range(0, len(views), view_batch)] + [[(0, W)]]
    pos = torch.arange(H, dtype=latents.dtype) + 0.5
    ramp = ((H / 2 - (pos - H / 2).abs()).clamp(0, boundary) / boundary)[None, None, None, :].repeat(B, C, H, 1)
    x = latents.clone()
    for i, t in enumerate(sched.timesteps):
        value, count = torch.zeros_like(x), torch.zeros_like(x)
        off = offsets[i]
        for batch in batches:
            whole = batch[-1] == (0, W)
            if whole and i > int(steps * until):
                continue
            shift = off if (shift_whole or not whole) else 0
            crops = []
            for a, b in batch:
                a, b = a + shift, b + shift
                crops.append(torch.cat([x[..., a:], x[..., :b - W]], -1) if b > W else x[..., a:b])
            xin = torch.cat(crops)
            eps = unet(xin, t, encoder_hidden_states=emb.repeat(len(batch), 1, 1)).sample
            den = sched.step(eps, t, xin).prev_sample
            for d, (a, b) in zip(den.chunk(len(batch)), batch):
                a, b = a + shift, b + shift
                w = torch.full_like(d, strength) if whole else ramp
                if b > W:
                    value[..., a:] += (d * w)[..., :W - a]
                    value[..., :b - W] += (d * w)[..., W - a:]
                    count[..., a:] += w[..., :W - a]
                    count[..., :b - W] += w[..., W - a:]
                else:
                    value[..., a:b] += d * w
                    count[..., a:b] += w
        x = torch.where(count > 0, value / count, value)
    return x, [int(t) for t in sched.timesteps], sched


def test_jointnet_panorama_with_given_offsets_equals_the_official_loop():
    """Circular RGBD-style panorama with explicit per-step offsets: the whole-image view follows the offset."""
    unet = tiny_unet()
    torch.manual_seed(5)
    emb = torch.randn(1, 5, 32)
    lat = torch.randn(1, 4, 8, 32)
    steps, offsets = 5, [3, 1, 2, 0, 3]
    ref, ts, sched = official_jointnet_pano(unet, emb, lat, steps, offsets, stride=4, boundary=2, view_batch=3)
    den = DiffusersUNetDenoiser.from_scheduler(unet, sched)
    stats = TiledStats()
    out = tiled_sample(den, lat.clone(), ts, TextConditioning(emb),
                       TiledConfig.jointnet(window=8, stride=4, view_batch=3, boundary=2),
                       prev_timesteps=diffusers_prev_timesteps(ts), final_alpha_cumprod=float(sched.alphas_cumprod[0]),
                       offsets=offsets, stats=stats)
    assert stats.whole_evals == 3  # i <= int(5·0.4) = 2
    err = (out - ref).abs().max().item()
    assert err < 1e-4 * ref.abs().max().item(), err
    # the test can tell: the whole view at offset 0 (the old behaviour) gives another panorama
    unshifted, _, _ = official_jointnet_pano(unet, emb, lat, steps, offsets, 4, 2, 3, shift_whole=False)
    assert (unshifted - ref).abs().max() > 100 * err
    # (oy, ox) pairs work the same; the random draws are not used
    pairs = tiled_sample(den, lat.clone(), ts, TextConditioning(emb),
                         TiledConfig.jointnet(window=8, stride=4, view_batch=3, boundary=2),
                         prev_timesteps=diffusers_prev_timesteps(ts), final_alpha_cumprod=float(sched.alphas_cumprod[0]),
                         offsets=[(0, o) for o in offsets], generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(pairs, out, atol=0, rtol=0)


def test_offsets_are_validated_and_a_narrow_circular_panorama_warns(caplog):
    den = PointwiseDenoiser()
    ts = ddim_timesteps(3, "leading", steps_offset=1)
    x = torch.randn(1, 4, 8, 24)
    cfg = TiledConfig.jointnet(window=8, stride=4, view_batch=2, boundary=2)
    with pytest.raises(ValueError, match="one entry per step"):
        tiled_sample(den, x, ts, None, cfg, offsets=[0, 1])
    with pytest.raises(ValueError, match="stride"):
        tiled_sample(den, x, ts, None, cfg, offsets=[0, 4, 1])
    with caplog.at_level("WARNING", logger="jointdiffusion"):
        tiled_sample(den, x, ts, None, cfg, offsets=[0, 3, 1])
    assert "circular" not in caplog.text
    with caplog.at_level("WARNING", logger="jointdiffusion"):
        tiled_sample(den, x[..., :8], ts, None, cfg)  # 8 latents wide, window 8: nothing can wrap
    assert "'circular' has no effect" in caplog.text and "8 latents wide" in caplog.text


@pytest.mark.parametrize("net,lin", [("alex", True), ("vgg", True), ("alex", False)])
def test_reference_loss_equals_lpips_with_the_reference_repeated(net, lin):
    """The expanded per-layer form gives LPIPS.forward's value and gradient (the LPIPS weights are the real
    linear layers shipped with the lpips package; lin=False is LPIPS' plain channel sum)."""
    import lpips

    from jointcore.metrics_pano import reference_loss

    perc = load_lpips(net, random_backbone=True) if lin else \
        lpips.LPIPS(net=net, lpips=False, pnet_rand=True, verbose=False).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(2, 3, 48, 48, generator=g) * 2 - 1
    imgs = torch.rand(6, 3, 48, 48, generator=g) * 2 - 1  # 3 views × batch 2
    a, b = imgs.clone().requires_grad_(True), imgs.clone().requires_grad_(True)
    want = perc(a, ref.repeat(3, 1, 1, 1))
    got = reference_loss(perc, ref)(b)
    assert got.shape == want.shape == (6, 1, 1, 1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (ga,) = torch.autograd.grad(want.sum(), a)
    (gb,) = torch.autograd.grad(got.sum(), b)
    assert ga.abs().max() > 0
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5 * float(ga.abs().max()))
    # the same image as the reference: distance 0
    torch.testing.assert_close(reference_loss(perc, ref)(ref), torch.zeros(2, 1, 1, 1), rtol=0, atol=1e-6)
    plain = reference_loss(lambda a, b: (a - b).abs().mean((1, 2, 3)), ref)  # any other perceptual function
    torch.testing.assert_close(plain(imgs), (imgs - ref.repeat(3, 1, 1, 1)).abs().mean((1, 2, 3)))


def test_batched_sync_gradients_equal_the_per_view_loop():
    """SyncDiffusion with its gradient passes batched across views gives the one-view-at-a-time result."""
    unet, vae = tiny_unet(sample_size=8).eval(), tiny_vae().eval()
    den = DiffusersUNetDenoiser(unet, alphas_cumprod(), "epsilon")
    cond = TextConditioning(torch.randn(1, 5, 32), torch.randn(1, 5, 32), 7.5)
    perc = load_lpips("alex", random_backbone=True)
    ts = ddim_timesteps(6, "leading", steps_offset=1)
    x = torch.randn(1, 4, 8, 40)
    outs = []
    for vb in (1, 5):
        cfg = TiledConfig.syncdiffusion(window=8, stride=4, sync_thres=3, view_batch=vb)
        st = TiledStats()
        outs.append(tiled_sample(den, x, ts, cond, cfg, decode=lambda z: vae.decode(z / 0.18215).sample,
                                 perceptual=perc, stats=st, generator=torch.Generator().manual_seed(0)))
        assert st.grad_evals == 3 * 8  # 9 views, the anchor excluded, 3 synchronised steps
    assert (outs[0] - outs[1]).abs().max() < 5e-3


def _sync_setup_f64(net: str, steps: int):
    """Tiny UNet and VAE, text conditioning, LPIPS and a 8×40 latent, all in float64 (results comparable to 1e-9)."""
    torch.manual_seed(0)
    unet, vae = tiny_unet(sample_size=8).eval().double(), tiny_vae().eval().double()
    den = DiffusersUNetDenoiser(unet, alphas_cumprod(), "epsilon")
    cond = TextConditioning(torch.randn(1, 5, 32).double(), torch.randn(1, 5, 32).double(), 7.5)
    perc = load_lpips(net, random_backbone=True).double()

    def decode(z):
        return vae.decode(z / 0.18215).sample

    return den, decode, cond, perc, ddim_timesteps(steps, "leading", steps_offset=1), torch.randn(1, 4, 8, 40).double()


def test_syncdiffusion_equals_the_official_loop_structure():
    """tiled_sample's SyncDiffusion (gradient passes batched, LPIPS against the anchor's features computed once)
    gives the official loop's result: every view alone, the anchor's gradient computed and discarded, LPIPS.forward
    (tests/official_syncdiffusion.py). In float64, so that only the order of operations could differ."""
    from official_syncdiffusion import official_syncdiffusion

    den, decode, cond, perc, ts, x = _sync_setup_f64("vgg", 6)
    want = official_syncdiffusion(den, x, ts, cond, decode, perc, window=8, stride=4, weight=20.0, decay=0.95,
                                  sync_thres=3)
    got = tiled_sample(den, x, ts, cond, TiledConfig.syncdiffusion(window=8, stride=4, sync_thres=3, view_batch=16),
                       decode=decode, perceptual=perc, generator=torch.Generator().manual_seed(0))
    plain = tiled_sample(den, x, ts, cond, TiledConfig.multidiffusion(window=8, stride=4, view_batch=16))
    assert (want - plain).abs().max() > 5e-2  # the synchronisation moved the result
    assert (got - want).abs().max() < 1e-9


def test_sync_gradient_groups_are_bounded_by_memory():
    """The first view's gradient pass is measured (the activations its backward keeps); later groups hold as many
    views as fit sync_memory_mib, up to view_batch, and the result does not depend on the grouping."""
    den, decode, cond, perc, ts, x = _sync_setup_f64("alex", 4)

    def run(mib, vb=5):
        st = TiledStats()
        cfg = TiledConfig.syncdiffusion(window=8, stride=4, sync_thres=2, view_batch=vb, sync_memory_mib=mib)
        out = tiled_sample(den, x, ts, cond, cfg, decode=decode, perceptual=perc, stats=st)
        return out, st

    big, st_big = run(1e6)
    per_view = st_big.sync_view_bytes[(8, 8)]
    # an 8×8 latent view: at least its 64×64 px decoded image and LPIPS' first features, in float64
    assert per_view > 64 * 64 * 3 * 8
    assert st_big.sync_group_views == {(8, 8): 5}
    two, st_two = run(2.5 * per_view / 2**20)
    assert st_two.sync_group_views == {(8, 8): 2}
    one, st_one = run(1e-6)
    assert st_one.sync_group_views == {(8, 8): 1}
    assert st_big.grad_evals == st_two.grad_evals == st_one.grad_evals == 2 * 8
    assert (big - two).abs().max() < 1e-9 and (big - one).abs().max() < 1e-9
    with pytest.raises(ValueError, match="sync_memory_mib"):
        TiledConfig(sync_memory_mib=-1)
