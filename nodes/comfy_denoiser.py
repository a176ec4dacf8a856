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


class ComfyRun:
    """What every KSAMPLER function driving a jointcore loop shares: the denoiser, ComfyUI's σ schedule as
    jointcore timesteps (nearest discrete t), the starting ``x_t``, a progress/preview/interrupt callback
    and the final rescale back to ComfyUI's ``x = x_t / √ᾱ`` (``x0`` when the schedule ends at σ = 0)."""

    def __init__(self, model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callable | None = None):
        self.extra_args = extra_args if extra_args is not None else {}
        self.denoiser = ComfyDenoiser(model, find_model_sampling(model), self.extra_args)
        self.alphas_cumprod = ab = self.denoiser.alphas_cumprod
        self.sigmas = sigmas
        sig = sigmas.detach().double().cpu()
        self.timesteps = sigma_to_timestep(sig[:-1].clamp(min=1e-12), ab).tolist()
        self.last = -1 if float(sig[-1]) == 0 else int(sigma_to_timestep(sig[-1:], ab)[0])
        self.prev = self.timesteps[1:] + [self.last]
        self.seed = int(self.extra_args.get("seed", 0) or 0)
        self.x_t = (x.double() * self.scale(self.timesteps[0])).to(x.dtype)  # x = x0 + σ ε → x_t = √ᾱ x
        self._callback = callback

    def scale(self, t: int) -> float:
        """√ᾱ_t (1 for the end, t < 0)."""
        return float(self.alphas_cumprod[t]) ** 0.5 if t >= 0 else 1.0

    def callback(self, i: int, n: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
        """jointcore step callback → ComfyUI's (previews, progress bar); raises when the user cancels.
        ``x0`` may be None (samplers without a clean estimate): the preview then shows the current latent."""
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
        if self._callback is not None:
            x = x_t / self.scale(self.prev[i])
            self._callback({"i": i, "denoised": x if x0 is None else x0, "x": x, "sigma": self.sigmas[i],
                            "sigma_hat": self.sigmas[i]})

    def finish(self, out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return (out.double() / self.scale(self.last)).to(like.dtype)


def no_steps(sigmas) -> bool:
    """A schedule with no step (0 or 1 σ, e.g. from SplitSigmas or steps = 0): the KSAMPLER functions then
    return their input unchanged, as ComfyUI's own samplers do."""
    return sigmas is None or len(sigmas) <= 1


def comfy_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 0.0):
    """KSAMPLER function: jointcore DDIM on the model's discrete timesteps nearest to ``sigmas``."""
    from ..jointcore.sampling import ddim_sample

    if no_steps(sigmas):
        return x
    run = ComfyRun(model, x, sigmas, extra_args, callback)
    gen = torch.Generator().manual_seed(run.seed + 1)
    out = ddim_sample(run.denoiser, run.x_t, run.timesteps, None, eta=eta, prev_timesteps=run.prev, generator=gen,
                      callback=run.callback)
    return run.finish(out, x)


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
