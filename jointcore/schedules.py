"""Noise schedules and DDIM timestep spacings.

Conventions (as in DDPM/DDIM and diffusers):

* ``T`` training timesteps ``t = 0 … T-1``; ``betas[t]``; ``alphas_cumprod[t] = ᾱ_t = ∏_{s<=t} (1-β_s)``.
* A noisy latent is ``x_t = √ᾱ_t · x0 + √(1-ᾱ_t) · ε``.
* ComfyUI (k-diffusion) works with ``σ_t = √((1-ᾱ_t)/ᾱ_t)`` and ``x = x0 + σ ε = x_t / √ᾱ_t``.

Spacings, for ``n`` inference steps (Lin et al. 2024, "Common diffusion noise schedules and sample steps
are flawed", Table 2; identical to diffusers' ``DDIMScheduler.set_timesteps``):

* ``leading``:  ``t_i = ⌊T/n⌋·(n-1-i) + steps_offset`` — never reaches ``T-1``; one step gives ``t = steps_offset``.
* ``linspace``: ``t_i = round(linspace(0, T-1, n))`` reversed.
* ``trailing``: ``t_i = round(T - i·T/n) - 1`` — always starts at ``T-1`` (the E2E-FT fix: one step is ``t=999``).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

Spacing = Literal["leading", "linspace", "trailing"]
BetaSchedule = Literal["scaled_linear", "linear", "squaredcos_cap_v2"]

SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace")

# Stable Diffusion 1.x/2.x training schedule.
SD_BETA_START = 0.00085
SD_BETA_END = 0.012
SD_TRAIN_TIMESTEPS = 1000


def make_betas(
    num_train_timesteps: int = SD_TRAIN_TIMESTEPS,
    beta_start: float = SD_BETA_START,
    beta_end: float = SD_BETA_END,
    beta_schedule: BetaSchedule = "scaled_linear",
) -> torch.Tensor:
    """β_t for ``t = 0 … T-1`` (float64), as diffusers and ComfyUI build them."""
    T = num_train_timesteps
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "squaredcos_cap_v2":
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; use scaled_linear, linear or squaredcos_cap_v2")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale β so that ᾱ_{T-1} = 0 (zero terminal SNR), keeping ᾱ_0 (Lin et al. 2024, Algorithm 1)."""
    sqrt_ab = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def alphas_cumprod(
    num_train_timesteps: int = SD_TRAIN_TIMESTEPS,
    beta_start: float = SD_BETA_START,
    beta_end: float = SD_BETA_END,
    beta_schedule: BetaSchedule = "scaled_linear",
    zero_terminal_snr: bool = False,
) -> torch.Tensor:
    """ᾱ_t (float64, shape ``[T]``)."""
    betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    return torch.cumprod(1.0 - betas, 0)


def ddim_timesteps(
    num_inference_steps: int,
    spacing: Spacing = "trailing",
    num_train_timesteps: int = SD_TRAIN_TIMESTEPS,
    steps_offset: int = 0,
) -> torch.Tensor:
    """Descending integer timesteps (int64, shape ``[n]``) for a DDIM run of ``n`` steps.

    ``steps_offset`` only applies to ``leading`` spacing, as in diffusers (clipped to ``T-1``).
    """
    n, T = int(num_inference_steps), int(num_train_timesteps)
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be between 1 and {T}, got {n}")
    if spacing == "leading":
        ratio = T // n
        # + steps_offset, kept inside the table (diffusers would index t = T for n close to T)
        ts = np.minimum((np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + int(steps_offset), T - 1)
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    return torch.from_numpy(ts.copy())


def previous_timestep(t: int, num_inference_steps: int, num_train_timesteps: int = SD_TRAIN_TIMESTEPS) -> int:
    """DDIM's ``t_prev = t - T // n`` (negative means "final step, go to x0")."""
    return int(t) - num_train_timesteps // int(num_inference_steps)
