"""DDIM sampling against the :mod:`jointcore.denoiser` interface (Song et al. 2021, Eq. 12).

One step from ``t`` to ``t_prev`` with ``ᾱ = ᾱ_t``, ``ᾱ' = ᾱ_{t_prev}``::

    x0  = model's clean estimate,  ε = model's noise estimate
    σ_η = η · √((1-ᾱ')/(1-ᾱ)) · √(1-ᾱ/ᾱ')
    x_{t_prev} = √ᾱ' x0 + √(1-ᾱ'-σ_η²) ε + σ_η z

``t_prev < 0`` means "the end": ᾱ' is ``final_alpha_cumprod`` (1 → exactly x0, as ComfyUI's σ=0;
diffusers' ``set_alpha_to_one=False`` uses ᾱ_0).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

from .denoiser import Denoiser, predict_x0

StepCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]  # (i, total, x_t, x0_pred)


def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, alpha_prod_t: float, alpha_prod_prev: float,
              eta: float = 0.0, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Deterministic (η=0) or stochastic DDIM update; returns ``x_{t_prev}``."""
    a_t, a_p = float(alpha_prod_t), float(alpha_prod_prev)
    sigma = 0.0
    if eta > 0:
        sigma = eta * ((1 - a_p) / (1 - a_t)) ** 0.5 * (1 - a_t / a_p) ** 0.5
    dir_coef = max(1 - a_p - sigma**2, 0.0) ** 0.5
    prev = a_p**0.5 * x0.double() + dir_coef * eps.double()
    if sigma > 0:
        if noise is None:
            raise ValueError("eta > 0 needs a noise tensor")
        prev = prev + sigma * noise.double()
    return prev.to(x_t.dtype)


def next_timesteps(timesteps: Sequence[int]) -> list[int]:
    """Previous-timestep targets when stepping along ``timesteps`` exactly (last → -1 = end)."""
    ts = [int(t) for t in timesteps]
    return ts[1:] + [-1]


def diffusers_prev_timesteps(timesteps: Sequence[int], num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' DDIM targets: ``t - T // n`` for each step (differs from ``next_timesteps`` when the
    spacing is not an exact multiple, e.g. trailing 3 steps: 666 → 333, not 332)."""
    n = len(timesteps)
    return [int(t) - num_train_timesteps // n for t in timesteps]


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[int],
    cond: Any = None,
    *,
    eta: float = 0.0,
    prev_timesteps: Optional[Sequence[int]] = None,
    final_alpha_cumprod: float = 1.0,
    generator: Optional[torch.Generator] = None,
    callback: Optional[StepCallback] = None,
    step_hook: Optional[Callable[[int, int, torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Run DDIM from ``x`` (noisy at ``timesteps[0]``) along ``timesteps``.

    Args:
        prev_timesteps: target of each step (default: the next timestep, then the end).
        final_alpha_cumprod: ᾱ used for a target ``< 0``.
        callback: called after each step with ``(i, n, x_prev, x0_pred)`` (progress, previews,
            interruption: raising from it stops sampling).
        step_hook: ``(i, t_prev, x_prev) → x_prev`` applied after each step (e.g. RePaint-style
            replacement of known regions).
    """
    ts = [int(t) for t in timesteps]
    prev = list(prev_timesteps) if prev_timesteps is not None else next_timesteps(ts)
    if len(prev) != len(ts):
        raise ValueError("prev_timesteps must have one entry per timestep")
    ab = denoiser.alphas_cumprod
    n = len(ts)
    for i, (t, tp) in enumerate(zip(ts, prev)):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x0, eps = predict_x0(denoiser, x, tt, cond)
        a_t = float(ab[t])
        a_p = float(ab[tp]) if tp >= 0 else float(final_alpha_cumprod)
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else "cpu",
                                dtype=torch.float32).to(x)
        x = ddim_step(x, x0, eps, a_t, a_p, eta, noise)
        if step_hook is not None:
            x = step_hook(i, tp, x)
        if callback is not None:
            callback(i, n, x, x0)
    return x
