"""A ComfyUI MODEL as a jointcore :class:`~jointcore.denoiser.Denoiser`.

ComfyUI's samplers see the model through a k-diffusion style wrapper ``model(x, σ, **extra_args) → x0``
that already applies classifier-free guidance from the positive/negative CONDITIONING, ControlNets,
patches and memory management. :class:`ComfyDenoiser` exposes that wrapper in jointcore's DDPM
convention (``x_t = √ᾱ x0 + √(1-ᾱ) ε``, integer ``t``) with ``prediction_type = "sample"``, so any
jointcore sampling loop (DDIM, tiled MultiDiffusion/SyncDiffusion, masked) runs on a ComfyUI model.

The usual way in is a SAMPLER: :func:`make_ksampler` turns a jointcore loop into a
``comfy.samplers.KSAMPLER`` that SamplerCustom / SamplerCustomAdvanced (or ``comfy.sample.sample_custom``)
drive, which prepares the conditioning, loads the model and applies CFG exactly as ComfyUI does.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..jointcore.prediction import alphas_cumprod_from_sigma, sigma_to_timestep


def find_model_sampling(kmodel):
    """The ``model_sampling`` object behind ComfyUI's k-diffusion wrappers (works on 2024–2026 versions)."""
    m = kmodel
    for _ in range(6):
        ms = getattr(m, "model_sampling", None)
        if ms is not None:
            return ms
        m = getattr(m, "inner_model", None)
        if m is None:
            break
    raise RuntimeError("could not find model_sampling on the ComfyUI model wrapper; is this an SD-type MODEL?")


class ComfyDenoiser:
    """jointcore Denoiser over ComfyUI's CFG-wrapped model (``(x, σ) → x0``).

    Args:
        kmodel: the callable a KSAMPLER function receives as ``model``.
        model_sampling: its ``ModelSamplingDiscrete`` (for the σ table).
        extra_args: the ``extra_args`` dict the KSAMPLER function receives (conds, seed, mask…).
    """

    prediction_type = "sample"

    def __init__(self, kmodel, model_sampling, extra_args: dict | None = None):
        self.kmodel = kmodel
        self.extra_args = extra_args or {}
        self.sigmas = model_sampling.sigmas.detach().double().cpu()
        self.alphas_cumprod = alphas_cumprod_from_sigma(self.sigmas)

    def __call__(self, x_t: torch.Tensor, t, cond=None) -> torch.Tensor:
        t = torch.as_tensor(t).long().reshape(-1).cpu()
        if t.numel() == 1:
            t = t.expand(x_t.shape[0])
        sig = self.sigmas[t]
        a = self.alphas_cumprod[t].sqrt().reshape(-1, 1, 1, 1).to(x_t.device)
        x = (x_t.double() / a).to(x_t.dtype)  # ComfyUI's unscaled latent x = x0 + σ ε
        return self.kmodel(x, sig.to(device=x_t.device, dtype=x_t.dtype), **self.extra_args)


def comfy_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 0.0):
    """KSAMPLER function: jointcore DDIM on the model's discrete timesteps nearest to ``sigmas``."""
    import comfy.model_management as mm

    from ..jointcore.sampling import ddim_sample

    extra_args = extra_args or {}
    den = ComfyDenoiser(model, find_model_sampling(model), extra_args)
    ab = den.alphas_cumprod
    sig = sigmas.detach().double().cpu()
    ts = sigma_to_timestep(sig[:-1].clamp(min=1e-12), ab).tolist()
    last = -1 if float(sig[-1]) == 0 else int(sigma_to_timestep(sig[-1:], ab)[0])
    prev = ts[1:] + [last]
    x_t = (x.double() * ab[ts[0]].sqrt()).to(x.dtype)  # x = x0 + σ ε  →  x_t = √ᾱ x
    seed = int(extra_args.get("seed", 0) or 0)
    gen = torch.Generator().manual_seed(seed + 1)

    def cb(i, n, xt, x0):
        mm.throw_exception_if_processing_interrupted()
        if callback is not None:
            tp = prev[i]
            a = float(ab[tp]) ** 0.5 if tp >= 0 else 1.0
            callback({"i": i, "denoised": x0, "x": xt / a, "sigma": sigmas[i], "sigma_hat": sigmas[i]})

    out = ddim_sample(den, x_t, ts, None, eta=eta, prev_timesteps=prev, generator=gen, callback=cb)
    a_last = float(ab[last]) ** 0.5 if last >= 0 else 1.0
    return (out.double() / a_last).to(x.dtype)


def make_ksampler(fn: Callable, **options):
    """Wrap a KSAMPLER-style function as a ComfyUI SAMPLER object."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(fn, extra_options=options)


def sample_with_comfy(model, positive, negative, cfg: float, latent: dict, sigmas: torch.Tensor, seed: int,
                      fn: Callable, add_noise: bool = True, **options) -> dict:
    """Run a KSAMPLER-style function ``fn(model, x, sigmas, extra_args, callback, disable, **options)`` on a
    ComfyUI MODEL the way SamplerCustom does (noise, conditioning, CFG, noise_mask, previews, progress,
    model loading), and return the output LATENT dict. ``fn`` usually builds a :class:`ComfyDenoiser`."""
    import comfy.sample
    import comfy.utils
    import latent_preview

    samples = latent["samples"]
    if add_noise:
        noise = comfy.sample.prepare_noise(samples, seed, latent.get("batch_index"))
    else:
        noise = torch.zeros(samples.size(), dtype=samples.dtype, layout=samples.layout, device="cpu")
    callback = latent_preview.prepare_callback(model, sigmas.shape[-1] - 1)
    out = comfy.sample.sample_custom(model, noise, cfg, make_ksampler(fn, **options), sigmas, positive, negative,
                                     samples, noise_mask=latent.get("noise_mask"), callback=callback,
                                     disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    res = latent.copy()
    res["samples"] = out
    return res
