"""Conversions between model parameterisations and between timesteps and ComfyUI sigmas.

With ``a = √ᾱ_t`` and ``s = √(1-ᾱ_t)`` (so ``a² + s² = 1``) and ``x_t = a·x0 + s·ε``:

* epsilon:  ``x0 = (x_t - s·ε) / a``,          ``ε = (x_t - a·x0) / s``
* v (Salimans & Ho 2022): ``v = a·ε - s·x0``,  ``x0 = a·x_t - s·v``,  ``ε = s·x_t + a·v``

ComfyUI's ``ModelSamplingDiscrete`` uses ``σ_t = s/a`` and the unscaled latent ``x = x_t / a``.
``ᾱ = 1/(1+σ²)``. Its ``timestep(σ)`` is the nearest integer t in log-σ, ``sigma(t)`` interpolates
log-σ linearly for fractional t.
"""
from __future__ import annotations

from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "sample")


def _coeffs(alphas_cumprod: torch.Tensor, t, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """√ᾱ_t and √(1-ᾱ_t) for (possibly per-sample) integer ``t``, broadcastable to ``like`` ([B,C,H,W])."""
    t = torch.as_tensor(t, device=alphas_cumprod.device).long().reshape(-1)
    ab = alphas_cumprod[t].to(device=like.device, dtype=torch.float64)
    shape = (-1,) + (1,) * (like.ndim - 1)
    a = ab.sqrt().reshape(shape)
    s = (1 - ab).sqrt().reshape(shape)
    return a, s


def _check(kind: str) -> None:
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {kind!r}; expected one of {PREDICTION_TYPES}")


def to_x0(output: torch.Tensor, x_t: torch.Tensor, t, alphas_cumprod: torch.Tensor, kind: PredictionType) -> torch.Tensor:
    """Clean-sample estimate x0 from a model output of the given kind."""
    _check(kind)
    if kind == "sample":
        return output
    a, s = _coeffs(alphas_cumprod, t, x_t)
    xt, out = x_t.double(), output.double()
    x0 = (xt - s * out) / a if kind == "epsilon" else a * xt - s * out
    return x0.to(output.dtype)


def to_eps(output: torch.Tensor, x_t: torch.Tensor, t, alphas_cumprod: torch.Tensor, kind: PredictionType) -> torch.Tensor:
    """Noise estimate ε from a model output of the given kind."""
    _check(kind)
    if kind == "epsilon":
        return output
    a, s = _coeffs(alphas_cumprod, t, x_t)
    xt, out = x_t.double(), output.double()
    eps = s * xt + a * out if kind == "v_prediction" else (xt - a * out) / s
    return eps.to(output.dtype)


def to_v(output: torch.Tensor, x_t: torch.Tensor, t, alphas_cumprod: torch.Tensor, kind: PredictionType) -> torch.Tensor:
    """Velocity ``v = √ᾱ ε - √(1-ᾱ) x0`` from a model output of the given kind."""
    _check(kind)
    if kind == "v_prediction":
        return output
    a, s = _coeffs(alphas_cumprod, t, x_t)
    eps = to_eps(output, x_t, t, alphas_cumprod, kind).double()
    x0 = to_x0(output, x_t, t, alphas_cumprod, kind).double()
    return (a * eps - s * x0).to(output.dtype)


def convert(output: torch.Tensor, x_t: torch.Tensor, t, alphas_cumprod: torch.Tensor,
            src: PredictionType, dst: PredictionType) -> torch.Tensor:
    """Convert a model output from parameterisation ``src`` to ``dst``."""
    fn = {"epsilon": to_eps, "v_prediction": to_v, "sample": to_x0}
    _check(dst)
    return fn[dst](output, x_t, t, alphas_cumprod, src)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Forward process ``x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε``."""
    a, s = _coeffs(alphas_cumprod, t, x0)
    return (a * x0.double() + s * noise.double()).to(x0.dtype)


# ---- timesteps <-> ComfyUI sigmas -------------------------------------------------------------------

# ComfyUI replaces a zero terminal ᾱ (zero-terminal-SNR schedules) by this value so that σ stays finite.
ZSNR_MIN_ALPHA_CUMPROD = 4.8973451890853435e-08


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1-ᾱ_t)/ᾱ_t) for every training timestep (as ComfyUI's ``ModelSamplingDiscrete.sigmas``).

    A terminal ᾱ of 0 (zero terminal SNR) is clamped as ComfyUI does, giving σ_max ≈ 4518.8.
    """
    ab = alphas_cumprod.double().clamp(min=ZSNR_MIN_ALPHA_CUMPROD)
    return ((1 - ab) / ab).sqrt()


def alphas_cumprod_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """ᾱ = 1/(1+σ²)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + sigma**2)


def timestep_to_sigma(t, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ for (possibly fractional) timesteps, log-linear interpolation as ComfyUI does."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(log_sigmas) - 1)
    lo = t.floor().long()
    hi = t.ceil().long()
    w = t - lo.double()
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()


def sigma_to_timestep(sigma, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Nearest integer timestep in log-σ (ComfyUI ``ModelSamplingDiscrete.timestep``)."""
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    dists = sigma.log().reshape(-1, 1) - log_sigmas.reshape(1, -1)
    return dists.abs().argmin(dim=1).reshape(sigma.shape)


def schedule_sigmas(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, final_sigma: float = 0.0) -> torch.Tensor:
    """A ComfyUI SIGMAS tensor (float32, descending, ``n+1`` values ending in ``final_sigma``)."""
    sig = timestep_to_sigma(timesteps.double(), alphas_cumprod)
    return torch.cat([sig, torch.tensor([final_sigma], dtype=torch.float64)]).float()
