import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from jointcore import schedules as S
from jointcore.denoiser import DiffusersUNetDenoiser, TextConditioning
from jointcore.mt_diffusion import (ClassifierHead, ConvHead, ForwardAggregation, KnownRegionHook, MTDiffusionModel,
                                    aggregation_coefficients, alphas_from_cumprod, apply_mask, head_reestimator,
                                    mask_to_latent, masked_restoration_sample, modality_loss, mt_diffusion_loss,
                                    mt_sample, random_patch_mask, training_loss)
from tiny import tiny_unet


def _short_schedule(T=30):
    betas = torch.linspace(0.01, 0.2, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def test_aggregation_recursion_equals_explicit_sum():
    ab = _short_schedule(12)
    w = torch.rand(2, 12, dtype=torch.float64)
    agg = aggregation_coefficients(ab, w)
    a = alphas_from_cumprod(ab)
    # Appendix B: ᾱ̃_t = Σ_{s≤t} w_s ∏_{j=s..t} √α_j
    for t in range(12):
        ref = sum(w[:, s] * torch.prod(a[s:t + 1].sqrt()) for s in range(t + 1))
        torch.testing.assert_close(agg[:, t], ref)


def test_marginal_matches_monte_carlo_forward_chain():
    T, M = 30, 20000
    ab = _short_schedule(T)
    g = torch.Generator().manual_seed(0)
    w = 0.3 * torch.rand(2, T, generator=g, dtype=torch.float64)
    fa = ForwardAggregation(ab, w)
    z0 = torch.randn(1, 3, 1, 1, generator=g, dtype=torch.float64).expand(M, -1, -1, -1)
    emb = [torch.randn(1, 3, 1, 1, generator=g, dtype=torch.float64).expand(M, -1, -1, -1) for _ in range(2)]
    z = z0.clone()
    checked = 0
    for t in range(T):
        z = fa.q_step(z, emb, t, torch.randn(z.shape, generator=g, dtype=torch.float64))
        if t in (0, 7, T - 1):
            mean = fa.q_sample(z0[:1], [e[:1] for e in emb], t, torch.zeros(1, 3, 1, 1, dtype=torch.float64))[0]
            var = 1 - float(ab[t])
            mc_mean, mc_var = z.mean(0), z.var(0)
            assert torch.all((mc_mean - mean).abs() < 5 * math.sqrt(var / M)), (t, mc_mean, mean)
            assert torch.all((mc_var - var).abs() < 5 * var * math.sqrt(2 / (M - 1))), (t, mc_var, var)
            # the aggregation term is far larger than the tolerance (the test can fail)
            no_agg = math.sqrt(float(ab[t])) * z0[0]
            if t > 0:
                assert ((mean - no_agg).abs() > 20 * math.sqrt(var / M)).any()
            checked += 1
    assert checked == 3


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_mean_reduces_to_ddpm_when_weights_are_zero(t):
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          variance_type="fixed_small", prediction_type="sample")
    fa = ForwardAggregation(sched.alphas_cumprod, torch.zeros(2))
    g = torch.Generator().manual_seed(t)
    z_t, z0 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    emb = [torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)]
    out = sched.step(z0, t, z_t, generator=torch.Generator().manual_seed(5)).prev_sample
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(5))
    std = fa.posterior_variance(t).sqrt().float()
    ref_mean = out - std * noise
    ours = fa.posterior_mean(z_t, z0, emb, t)
    torch.testing.assert_close(ours, ref_mean, rtol=1e-4, atol=1e-4)
    # ε-parameterised form against diffusers' epsilon DDPM step
    sched_eps = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              variance_type="fixed_small", prediction_type="epsilon")
    eps = torch.randn(z0.shape, generator=g)
    out = sched_eps.step(eps, t, z_t, generator=torch.Generator().manual_seed(5)).prev_sample
    torch.testing.assert_close(fa.posterior_mean_from_eps(z_t, eps, emb, t), out - std * noise, rtol=1e-4, atol=1e-4)


def test_posterior_mean_matches_paper_formulas_with_aggregation():
    ab = S.alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    w = torch.rand(2, 1000, generator=g, dtype=torch.float64)
    fa = ForwardAggregation(ab, w)
    a = alphas_from_cumprod(ab)
    z_t, z0, eps = (torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    emb = [torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    for t in (1, 300, 999):
        at, abt, abp = a[t], ab[t], ab[t - 1]
        # Theorem 2, first form
        ref = (at.sqrt() * (1 - abp) * z_t + (1 - at) * abp.sqrt() * z0
               + sum(((1 - at) * fa.agg[i, t - 1] - at * (1 - abp) * w[i, t]) * emb[i] for i in range(2))) / (1 - abt)
        torch.testing.assert_close(fa.posterior_mean(z_t, z0, emb, t), ref)
        # Appendix B, ε form (Algorithm 1 line 12)
        ref_eps = (z_t - (1 - at) / (1 - abt).sqrt() * eps) / at.sqrt() - sum(w[i, t] * emb[i] for i in range(2))
        torch.testing.assert_close(fa.posterior_mean_from_eps(z_t, eps, emb, t), ref_eps)
        torch.testing.assert_close(fa.posterior_variance(t)[0], (1 - abp) * (1 - at) / (1 - abt))
        # an explicit s = t-1 equals the default
        torch.testing.assert_close(fa.posterior_mean(z_t, z0, emb, t, t - 1), ref)


def test_loss_equals_formula():
    g = torch.Generator().manual_seed(0)
    eps, eps_hat = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    cont_p, cont_y = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    logits, labels = torch.randn(2, 5, generator=g), torch.tensor([1, 4])
    total, parts = mt_diffusion_loss(eps_hat, eps, [cont_p, logits], [cont_y, labels], ["continuous", "label"])
    ce = -(torch.log_softmax(logits, 1)[torch.arange(2), labels]).mean()
    ref = ((eps_hat - eps) ** 2).mean() + 0.1 * (((cont_p - cont_y) ** 2).mean() + ce)
    torch.testing.assert_close(total, ref)
    assert set(parts) == {"eps", "modality_0", "modality_1"}
    # λ is honoured and probability targets give soft cross-entropy
    probs = torch.softmax(torch.randn(2, 5, generator=g), 1)
    total2, _ = mt_diffusion_loss(eps_hat, eps, [logits], [probs], ["label"], lam=0.5)
    ref2 = ((eps_hat - eps) ** 2).mean() + 0.5 * -(probs * torch.log_softmax(logits, 1)).sum(1).mean()
    torch.testing.assert_close(total2, ref2)


def test_training_loss_uses_aggregated_marginal():
    T = 50
    ab = _short_schedule(T)
    unet = tiny_unet(in_channels=4, out_channels=4)
    model = MTDiffusionModel(unet, [ConvHead(64, 4), ClassifierHead(64, 3)], ["up_blocks.0", "mid_block"], ab)
    fa = ForwardAggregation(ab, [0.5, 0.2])
    g = torch.Generator().manual_seed(0)
    z0 = torch.randn(2, 4, 16, 16, generator=g)
    img = torch.randn(2, 4, 16, 16, generator=g)
    labels = torch.tensor([0, 2])
    onehot = lambda y: F.one_hot(y, 4).float()[:, :, None, None].expand(-1, -1, 16, 16)  # label → latent space  # noqa: E731
    encoders = [lambda x: x, onehot]
    cond = torch.randn(2, 3, 32, generator=g)
    t, noise = torch.tensor([3, 40]), torch.randn(2, 4, 16, 16, generator=g)
    loss, parts = training_loss(model, fa, z0, [img, labels], encoders, ["continuous", "label"], cond, t, noise)
    # by hand: z_t = √ᾱ z0 + Σ ᾱ̃ E + √(1-ᾱ) ε with ᾱ̃ from the recursion
    a = alphas_from_cumprod(ab)
    agg = torch.zeros(2, T, dtype=torch.float64)
    prev = torch.zeros(2, dtype=torch.float64)
    for k in range(T):
        prev = a[k].sqrt() * (torch.tensor([0.5, 0.2], dtype=torch.float64) + prev)
        agg[:, k] = prev
    E = [img, onehot(labels)]
    z_t = torch.stack([(ab[tb].sqrt() * z0[b] + agg[0, tb] * E[0][b] + agg[1, tb] * E[1][b]
                        + (1 - ab[tb]).sqrt() * noise[b]).float() for b, tb in enumerate(t.tolist())])
    with torch.no_grad():
        eps_hat, (img_hat, logits) = model.predict(z_t, t, cond)
    ref = F.mse_loss(eps_hat, noise) + 0.1 * (F.mse_loss(img_hat, img) + F.cross_entropy(logits, labels))
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-4, atol=1e-5)
    loss.backward()
    assert model.heads[0].conv.weight.grad is not None and model.heads[0].conv.weight.grad.abs().sum() > 0


def _mt_model(T=20):
    ab = _short_schedule(T)
    unet = tiny_unet(in_channels=4, out_channels=4)
    return MTDiffusionModel(unet, [ConvHead(64, 4)], ["up_blocks.0"], ab), ab


def test_masked_restoration_keeps_unmasked_latents_exactly():
    model, ab = _mt_model()
    fa = ForwardAggregation(ab, [0.1])
    g = torch.Generator().manual_seed(0)
    known = torch.randn(2, 4, 16, 16, generator=g)
    pix_mask = random_patch_mask(2, 128, 128, max_patches=10, patch=16, generator=torch.Generator().manual_seed(3))
    pix_mask[:, :, :16, :16] = 1  # at least one masked patch
    lat_mask = mask_to_latent(pix_mask, 8)
    masked_latent = apply_mask(known, lat_mask)  # identity encoder on the masked image
    cond = torch.randn(2, 3, 32, generator=g)
    rest = masked_restoration_sample(model, known, lat_mask, cond, fa, [masked_latent],
                                     generator=torch.Generator().manual_seed(1))
    keep = (lat_mask < 0.5).expand_as(known)
    assert torch.equal(rest[keep], known[keep])
    assert torch.isfinite(rest).all()
    assert (rest[~keep] - known[~keep]).abs().max() > 1e-3  # the masked part was actually generated
    # strided timesteps use the jump posterior and keep the constraint too
    rest2 = masked_restoration_sample(model, known, lat_mask, cond, fa, [masked_latent], timesteps=[19, 12, 5, 0],
                                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(rest2[keep], known[keep])


def test_algorithm1_reestimates_missing_modalities_from_heads():
    model, ab = _mt_model(10)
    fa = ForwardAggregation(ab, [0.2])
    enc = [lambda x: x]
    init = [torch.zeros(1, 4, 16, 16)]
    calls = []
    re = head_reestimator(model, enc, init, known=[False])
    wrapped = lambda i, t, z: (calls.append(t), re(i, t, z))[1]  # noqa: E731
    cond = torch.randn(1, 3, 32)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    out = mt_sample(model, z, list(range(9, -1, -1)), cond, fa, init, reestimate=wrapped,
                    generator=torch.Generator().manual_seed(2))
    assert calls == list(range(9, -1, -1))
    assert re.modalities[0].shape == (1, 4, 16, 16)
    # with the re-estimated modality the result differs from sampling with the zero initialisation
    out0 = mt_sample(model, z, list(range(9, -1, -1)), cond, fa, init, generator=torch.Generator().manual_seed(2))
    assert (out - out0).abs().max() > 1e-4
    # a known modality is never replaced
    re_k = head_reestimator(model, enc, [torch.ones(1, 4, 16, 16)], known=[True])
    assert torch.equal(re_k(0, 9, z)[0], torch.ones(1, 4, 16, 16))


def test_mt_sample_with_diffusers_denoiser_and_v_prediction():
    T = 10
    ab = _short_schedule(T)
    den = DiffusersUNetDenoiser(tiny_unet(), ab, "v_prediction")
    fa = ForwardAggregation(ab, 0.0)
    z = torch.randn(1, 4, 16, 16)
    out = mt_sample(den, z, [9, 5, 0], TextConditioning(torch.randn(1, 3, 32)), fa, [None],
                    generator=torch.Generator().manual_seed(0))
    assert out.shape == z.shape and torch.isfinite(out).all()


def test_random_patch_mask_layout():
    m = random_patch_mask(64, 64, 64, max_patches=10, patch=16, generator=torch.Generator().manual_seed(0))
    assert m.shape == (64, 1, 64, 64)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    frac = m.mean(dim=(1, 2, 3))
    assert (frac <= 10 * 256 / 4096 + 1e-6).all()
    assert (frac == 0).any() and (frac > 0).any()  # m ~ Uniform{0..10}
    assert random_patch_mask(3, 32, 32, max_patches=0).sum() == 0
    torch.testing.assert_close(m, random_patch_mask(64, 64, 64, generator=torch.Generator().manual_seed(0)))


def test_malformed_inputs_raise_clear_errors():
    ab = _short_schedule(10)
    with pytest.raises(ValueError, match="modality weights"):
        ForwardAggregation(ab, torch.zeros(2, 7))
    with pytest.raises(ValueError, match="decreasing"):
        ForwardAggregation(torch.linspace(0.1, 0.9, 10), 1.0)
    fa = ForwardAggregation(ab, [1.0, 0.5])
    z = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="one entry per modality"):
        fa.q_sample(z, [z], 3, z)
    with pytest.raises(ValueError, match="latent's shape"):
        fa.q_sample(z, [z, torch.zeros(2, 4, 4, 4)], 3, z)
    with pytest.raises(ValueError, match="timesteps must lie"):
        fa.q_sample(z, [z, z], 10, z)
    with pytest.raises(ValueError, match="noise shape"):
        fa.q_step(z, [z, z], 1, torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="strictly decreasing"):
        mt_sample(lambda *a: z, z, [3, 5], None, fa, [z, z])
    with pytest.raises(ValueError, match="unknown modality kind"):
        modality_loss(z, z, "text")
    with pytest.raises(ValueError, match="class-index targets"):
        modality_loss(torch.zeros(2, 5, 4, 4), torch.zeros(2, 5, dtype=torch.long), "label")
    with pytest.raises(ValueError, match="one entry per modality"):
        mt_diffusion_loss(z, z, [z], [z, z], ["continuous"])
    with pytest.raises(ValueError, match="binary"):
        KnownRegionHook(z, torch.full((2, 1, 8, 8), 0.5), fa, [z, z])
    with pytest.raises(ValueError, match="latent size"):
        KnownRegionHook(z, torch.zeros(2, 1, 4, 4), fa, [z, z])
    with pytest.raises(ValueError, match="no sub-module"):
        MTDiffusionModel(tiny_unet(), [ConvHead(64, 4)], ["nope"], ab)
    with pytest.raises(ValueError, match="divisible"):
        mask_to_latent(torch.zeros(1, 1, 30, 30), 8)
