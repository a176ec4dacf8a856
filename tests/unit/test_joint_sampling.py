import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from jointcore import schedules as S
from jointcore.denoiser import DiffusersUNetDenoiser, TextConditioning
from jointcore.joint_sampling import (decode_depth, decode_image, decode_normals, encode_depth, encode_image,
                                      get_timesteps, joint_sample, latent_mask, make_noise, task_preset)
from jointcore.jointnet import JointNet, JointNetDenoiser
from jointcore.sampling import ddim_sample
from tiny import tiny_unet, tiny_vae

AB = S.alphas_cumprod()


def _jointnet(masked=False, exchange=True, seed=1):
    jn = JointNet.from_unet(tiny_unet(), has_masked_latent_input=masked)
    if exchange:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in jn.exchange_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return jn


def _text(cfg=True):
    g = torch.Generator().manual_seed(5)
    c, u = torch.randn(1, 4, 32, generator=g), torch.randn(1, 4, 32, generator=g)
    return TextConditioning(c, u, 3.0) if cfg else TextConditioning(c)


def test_joint_generation_with_zero_exchange_equals_two_plain_runs():
    unet = tiny_unet()
    den = JointNetDenoiser(JointNet.from_unet(unet), AB)
    noise = make_noise((1, 8, 16, 16), seed=0)
    text = _text()
    out = joint_sample(den, noise, text, num_steps=4)
    plain = DiffusersUNetDenoiser(unet, AB)
    ts = S.ddim_timesteps(4, "leading", steps_offset=1).tolist()
    ref = [ddim_sample(plain, noise[:, s], ts, text, final_alpha_cumprod=float(AB[0])) for s in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(out, torch.cat(ref, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver,eta", [("ddim", 0.0), ("ddim", 1.0), ("dpmpp_2m", 0.0)])
@pytest.mark.parametrize("task", ["image_to_depth", "depth_to_image"])
def test_channelwise_inpainting_keeps_given_modality_exactly(solver, eta, task):
    den = JointNetDenoiser(_jointnet(), AB)
    init = make_noise((2, 8, 16, 16), seed=9)
    noise = make_noise((2, 8, 16, 16), seed=[1, 2])
    m_img, m_dep, strength = task_preset(task)
    out = joint_sample(den, noise, _text(), num_steps=4, solver=solver, eta=eta, init_latents=init,
                       mask_rgb=m_img, mask_dense=m_dep, strength=strength, generator=torch.Generator().manual_seed(0))
    kept, gen = (slice(0, 4), slice(4, 8)) if task == "image_to_depth" else (slice(4, 8), slice(0, 4))
    assert torch.equal(out[:, kept], init[:, kept])
    assert (out[:, gen] - init[:, gen]).abs().mean() > 0.05
    assert torch.isfinite(out).all()


def test_kept_modality_steers_the_generated_one():
    """Through the exchange layers the depth generated for two different images differs (same noise)."""
    den = JointNetDenoiser(_jointnet(), AB)
    noise = make_noise((1, 8, 16, 16), seed=3)
    a, b = make_noise((1, 8, 16, 16), seed=4), make_noise((1, 8, 16, 16), seed=5)
    oa = joint_sample(den, noise, _text(), num_steps=3, init_latents=a, mask_rgb=0.0)
    ob = joint_sample(den, noise, _text(), num_steps=3, init_latents=b, mask_rgb=0.0)
    assert (oa[:, 4:] - ob[:, 4:]).abs().max() > 1e-3


def test_spatial_masks_edit_a_region_per_modality():
    den = JointNetDenoiser(_jointnet(), AB)
    init = make_noise((1, 8, 16, 16), seed=9)
    noise = make_noise((1, 8, 16, 16), seed=1)
    m_rgb = torch.zeros(1, 1, 128, 128)
    m_rgb[..., 32:96, 32:96] = 1  # pixel-size mask, nearest-resized to 16x16 -> 4:12
    m_dep = torch.zeros(1, 1, 16, 16)
    m_dep[..., :, 8:] = 1
    out = joint_sample(den, noise, _text(), num_steps=3, solver="dpmpp_2m", init_latents=init,
                       mask_rgb=m_rgb, mask_dense=m_dep)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:12, 4:12] = True
    assert torch.equal(out[0, :4][:, ~inside], init[0, :4][:, ~inside])
    assert (out[0, :4][:, inside] - init[0, :4][:, inside]).abs().mean() > 0.05
    assert torch.equal(out[0, 4:, :, :8], init[0, 4:, :, :8])
    assert (out[0, 4:, :, 8:] - init[0, 4:, :, 8:]).abs().mean() > 0.05


def test_mask_conditioned_model_gets_mask_inputs_and_keeps_exactly():
    jm = _jointnet(masked=True)
    den = JointNetDenoiser(jm, AB)
    init = make_noise((1, 8, 16, 16), seed=9)
    noise = make_noise((1, 8, 16, 16), seed=1)
    seen = []
    orig = jm.forward

    def spy(*a, **kw):
        seen.append({k: v.clone() for k, v in kw.items() if torch.is_tensor(v)})
        return orig(*a, **kw)

    jm.forward = spy
    out = joint_sample(den, noise, _text(), num_steps=3, init_latents=init, mask_rgb=0.0, mask_dense=1.0)
    assert torch.equal(out[:, :4], init[:, :4])
    kw = seen[0]
    assert kw["mask_rgb"].shape == (2, 1, 16, 16) and float(kw["mask_rgb"].max()) == 0.0  # CFG: both halves
    assert float(kw["mask_dense"].min()) == 1.0
    torch.testing.assert_close(kw["masked_rgb"], torch.cat([init[:, :4]] * 2))
    assert float(kw["masked_dense"].abs().max()) == 0.0
    # plain joint generation with the inpaint model: all-ones masks, zero masked latents
    seen.clear()
    joint_sample(den, noise, _text(cfg=False), num_steps=2)
    assert float(seen[0]["mask_rgb"].min()) == 1.0 and float(seen[0]["masked_dense"].abs().max()) == 0.0


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m"])
def test_sdedit_refinement_strength_follows_diffusers_get_timesteps(solver):
    ts = S.ddim_timesteps(50, "leading", steps_offset=1).tolist()
    assert get_timesteps(ts, 0.4) == ts[30:] and len(get_timesteps(ts, 0.4)) == 20
    assert get_timesteps(ts, 1.0) == ts
    with pytest.raises(ValueError):
        get_timesteps(ts, 0.01)
    den = JointNetDenoiser(_jointnet(), AB)
    init = make_noise((1, 8, 16, 16), seed=9)
    noise = make_noise((1, 8, 16, 16), seed=1)
    steps = []
    m_img, m_dep, strength = task_preset("refine_depth")
    out = joint_sample(den, noise, _text(), num_steps=10, solver=solver, init_latents=init, mask_rgb=m_img,
                       mask_dense=m_dep, strength=strength, callback=lambda i, n, x, x0: steps.append(n))
    assert steps == [4] * 4
    assert torch.equal(out[:, :4], init[:, :4])
    # low strength stays closer to the given depth than full generation
    full = joint_sample(den, noise, _text(), num_steps=10, solver=solver, init_latents=init, mask_rgb=0.0)
    assert (out[:, 4:] - init[:, 4:]).abs().mean() < (full[:, 4:] - init[:, 4:]).abs().mean()


def test_dpmpp_2m_matches_diffusers_loop():
    unet = tiny_unet()
    den = DiffusersUNetDenoiser(unet, AB)  # 4-channel latents: any Denoiser works
    noise = make_noise((1, 4, 16, 16), seed=2)
    text = _text()
    out = joint_sample(den, noise, text, num_steps=5, solver="dpmpp_2m")
    sched = DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="leading",
                                        steps_offset=1)
    sched.set_timesteps(5)
    x = noise
    with torch.no_grad():
        for t in sched.timesteps:
            o = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([text.uncond, text.cond])).sample
            u, c = o.chunk(2)
            x = sched.step(u + 3.0 * (c - u), t, x).prev_sample
    torch.testing.assert_close(out, x, rtol=1e-4, atol=1e-4)


def test_seeds_and_batches():
    a = make_noise((3, 8, 4, 4), seed=[7, 8, 9])
    assert torch.equal(a[1:2], make_noise((1, 8, 4, 4), seed=8))
    assert torch.equal(make_noise((2, 8, 4, 4), seed=1), make_noise((2, 8, 4, 4), seed=1))
    den = JointNetDenoiser(_jointnet(), AB)
    out = joint_sample(den, a, _text(), num_steps=2)
    single = joint_sample(den, a[1:2], _text(), num_steps=2)
    torch.testing.assert_close(out[1:2], single, rtol=1e-4, atol=1e-5)


def test_bad_masks_and_latents_are_clear_errors():
    den = JointNetDenoiser(_jointnet(), AB)
    noise = make_noise((2, 8, 16, 16), seed=0)
    init = make_noise((1, 8, 16, 16), seed=1)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        joint_sample(den, noise, _text(), num_steps=2, init_latents=init, mask_rgb=torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match="batch 3"):
        joint_sample(den, noise, _text(), num_steps=2, init_latents=init, mask_rgb=torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="integer multiple"):
        joint_sample(den, noise, _text(), num_steps=2, init_latents=init, mask_dense=torch.zeros(1, 1, 20, 16))
    with pytest.raises(ValueError, match="init_latents are required"):
        joint_sample(den, noise, _text(), num_steps=2, mask_rgb=0.0)
    with pytest.raises(ValueError, match="do not match"):
        joint_sample(den, noise, _text(), num_steps=2, init_latents=torch.zeros(1, 8, 8, 8), mask_rgb=0.0)
    with pytest.raises(ValueError, match="expects 8"):
        joint_sample(den, torch.zeros(1, 4, 16, 16), _text(), num_steps=2)
    with pytest.raises(ValueError, match="solver"):
        joint_sample(den, noise, _text(), num_steps=2, solver="euler")
    assert latent_mask(None, 2, 4, 4).shape == (2, 1, 4, 4)
    assert torch.equal(latent_mask(torch.full((1, 1, 4, 4), 0.6), 2, 4, 4), torch.ones(2, 1, 4, 4))


def test_depth_and_normals_through_the_rgb_vae():
    vae = tiny_vae()
    depth = torch.rand(2, 1, 32, 32)
    z = encode_depth(vae, depth)
    assert z.shape == (2, 4, 4, 4)
    torch.testing.assert_close(z, encode_image(vae, depth.expand(-1, 3, -1, -1)))
    with torch.no_grad():
        ref = vae.decode(z / vae.config.scaling_factor).sample
    d = decode_depth(vae, z)
    assert d.shape == (2, 1, 32, 32) and 0 <= float(d.min()) and float(d.max()) <= 1
    torch.testing.assert_close(d, ((ref[:, :1] + 1) / 2).clamp(0, 1))
    torch.testing.assert_close(decode_depth(vae, z, "mean"), ((ref + 1) / 2).clamp(0, 1).mean(1, keepdim=True))
    n = decode_normals(vae, z, as_vectors=True)
    torch.testing.assert_close(n.norm(dim=1), torch.ones(2, 32, 32), rtol=1e-4, atol=1e-4)
    assert decode_image(vae, z).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        encode_depth(vae, torch.rand(2, 3, 32, 32))
