import pytest
import torch
from diffusers import DDIMScheduler

from jointcore import schedules as S
from jointcore.denoiser import DiffusersUNetDenoiser, TextConditioning, predict_x0
from jointcore.sampling import ddim_sample, diffusers_prev_timesteps
from tiny import tiny_unet


def _reference_loop(unet, sched, latents, cond, uncond, scale, eta=0.0, generator=None):
    for t in sched.timesteps:
        inp = torch.cat([latents, latents])
        out = unet(inp, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        u, c = out.chunk(2)
        latents = sched.step(u + scale * (c - u), t, latents, eta=eta, generator=generator).prev_sample
    return latents


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing,steps", [("leading", 5), ("trailing", 3), ("linspace", 4)])
def test_ddim_equals_diffusers(prediction_type, spacing, steps):
    unet = tiny_unet()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type, timestep_spacing=spacing, steps_offset=1,
                          set_alpha_to_one=False, clip_sample=False)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    cond = torch.randn(1, 7, 32, generator=g)
    uncond = torch.randn(1, 7, 32, generator=g)
    with torch.no_grad():
        ref = _reference_loop(unet, sched, x, cond.expand(2, -1, -1), uncond.expand(2, -1, -1), 4.0)
    den = DiffusersUNetDenoiser.from_scheduler(unet, sched)
    ts = sched.timesteps.tolist()
    ours = ddim_sample(den, x, ts, TextConditioning(cond, uncond, 4.0),
                       prev_timesteps=diffusers_prev_timesteps(ts), final_alpha_cumprod=float(sched.alphas_cumprod[0]))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_ddim_eta_uses_noise_and_is_seeded():
    unet = tiny_unet()
    den = DiffusersUNetDenoiser(unet, S.alphas_cumprod(), "epsilon")
    x = torch.randn(1, 4, 16, 16)
    c = TextConditioning(torch.randn(1, 5, 32))
    ts = S.ddim_timesteps(3, "trailing")
    a = ddim_sample(den, x, ts, c, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = ddim_sample(den, x, ts, c, eta=1.0, generator=torch.Generator().manual_seed(3))
    d = ddim_sample(den, x, ts, c, eta=0.0)
    torch.testing.assert_close(a, b)
    assert (a - d).abs().max() > 1e-3


def test_extra_channels_and_batch_errors():
    unet = tiny_unet(in_channels=8)
    rgb = torch.randn(1, 4, 16, 16)
    den = DiffusersUNetDenoiser(unet, S.alphas_cumprod(), "v_prediction", extra_channels=rgb)
    x = torch.zeros(1, 4, 16, 16)
    with torch.no_grad():
        direct = unet(torch.cat([rgb, x], 1), torch.tensor([999]), encoder_hidden_states=torch.zeros(1, 2, 32)).sample
        out = den(x, 999, TextConditioning(torch.zeros(1, 2, 32)))
        x0, _ = predict_x0(den, x, 999, TextConditioning(torch.zeros(1, 2, 32)))
    torch.testing.assert_close(out, direct)
    torch.testing.assert_close(x0, -(1 - S.alphas_cumprod()[999]).sqrt().float() * direct)
    with pytest.raises(ValueError, match="conditioning batch"):
        den(torch.zeros(3, 4, 16, 16), 999, TextConditioning(torch.zeros(2, 2, 32)))
