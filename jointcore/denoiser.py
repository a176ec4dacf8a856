"""A small denoiser interface shared by every sampler in the pack.

A *denoiser* maps ``(x_t, t, cond) → model output`` where

* ``x_t``  — noisy latents ``[B, C, H, W]`` in DDPM scaling (``x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε``),
* ``t``    — integer training timesteps, a scalar or ``[B]`` tensor,
* ``cond`` — whatever conditioning the denoiser understands (for the diffusers adapter a
  :class:`TextConditioning`; a ComfyUI MODEL adapter already holds its CONDITIONING),

and declares the kind of its output in ``prediction_type`` (``"epsilon"``, ``"v_prediction"`` or
``"sample"``) and its noise schedule in ``alphas_cumprod``. Samplers (DDIM, tiled MultiDiffusion /
SyncDiffusion, joint RGBD, masked inpainting) only ever talk to this interface, so the same loop drives a
diffusers UNet, a JointNet or a ComfyUI MODEL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable

import torch

from . import prediction as P


@runtime_checkable
class Denoiser(Protocol):
    prediction_type: str
    alphas_cumprod: torch.Tensor  # [T] float64

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor: ...


def predict_x0(denoiser: Denoiser, x_t: torch.Tensor, t, cond: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``denoiser`` once and return ``(x0, eps)`` whatever its declared output kind."""
    out = denoiser(x_t, t, cond)
    ab = denoiser.alphas_cumprod
    x0 = P.to_x0(out, x_t, t, ab, denoiser.prediction_type)
    eps = P.to_eps(out, x_t, t, ab, denoiser.prediction_type)
    return x0, eps


class NonFiniteOutputError(FloatingPointError):
    """A model returned NaN or infinite values (typically fp16 overflow in SD 2.x attention)."""


def non_finite_message(what: str, dtype: torch.dtype) -> str:
    half = dtype in (torch.float16, torch.bfloat16)
    fix = ("SD 2.x attention is known to overflow in fp16: choose dtype bf16 (if the GPU supports it) or fp32 in "
           "the loader" if dtype == torch.float16 else
           "choose dtype fp32 in the loader" if half else
           "the weights or the inputs hold NaN/Inf values: check the model files and the inputs")
    return f"{what} returned NaN or infinite values running in {str(dtype).replace('torch.', '')}: {fix}."


def require_finite_output(out: torch.Tensor, what: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``out`` if it holds no NaN/Inf, else :class:`NonFiniteOutputError` naming ``what``, the model's ``dtype``
    (default: ``out``'s) and the fix."""
    if out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise NonFiniteOutputError(non_finite_message(what, dtype or out.dtype))
    return out


class FiniteOutputGuard:
    """A :class:`Denoiser` that checks the first output of ``inner`` and raises :class:`NonFiniteOutputError`
    (naming the dtype and the fix) if it holds NaN or Inf, so that a half-precision overflow stops the run at
    its first step instead of ending as a black or NaN image reported as success. Everything else is
    ``inner``'s (attributes are delegated)."""

    def __init__(self, inner: Denoiser, what: str = "the model", dtype: Optional[torch.dtype] = None,
                 every_call: bool = False):
        self.inner, self.what, self.dtype, self.every_call, self.checked = inner, what, dtype, every_call, False

    def __getattr__(self, name):
        return getattr(self.__dict__["inner"], name)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        out = self.inner(x_t, t, cond)
        if self.every_call or not self.checked:
            self.checked = True
            require_finite_output(out, self.what, self.dtype)
        return out


@dataclass
class TextConditioning:
    """Prompt embeddings for a cross-attention UNet, with optional classifier-free guidance.

    ``cond``/``uncond``: ``[B or 1, L, D]``. With ``uncond`` given and ``guidance_scale != 1`` the
    denoiser evaluates both halves in one batch and returns ``uncond + s·(cond - uncond)``.
    """

    cond: torch.Tensor
    uncond: Optional[torch.Tensor] = None
    guidance_scale: float = 1.0

    @property
    def uses_cfg(self) -> bool:
        return self.uncond is not None and self.guidance_scale != 1.0


def apply_cfg(out_uncond: torch.Tensor, out_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance ``u + s·(c - u)``."""
    return out_uncond + scale * (out_cond - out_uncond)


def _expand_batch(emb: torch.Tensor, batch: int) -> torch.Tensor:
    if emb.shape[0] == batch:
        return emb
    if emb.shape[0] == 1:
        return emb.expand(batch, *emb.shape[1:])
    raise ValueError(f"conditioning batch {emb.shape[0]} does not match latent batch {batch} (use 1 or {batch})")


class DiffusersUNetDenoiser:
    """Adapter for a diffusers ``UNet2DConditionModel`` (or any module with the same call signature).

    Args:
        unet: the UNet; called as ``unet(x, t, encoder_hidden_states=…).sample``.
        alphas_cumprod: ᾱ of its training schedule (e.g. ``scheduler.alphas_cumprod``).
        prediction_type: what the UNet outputs (``scheduler.config.prediction_type``).
        extra_channels: optional fixed latents concatenated *before* ``x_t`` on the channel axis
            (image-conditional UNets such as Marigold/E2E-FT: ``cat([rgb_latent, x_t])``).
    """

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 extra_channels: Optional[torch.Tensor] = None):
        P._check(prediction_type)
        self.unet = unet
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.prediction_type = prediction_type
        self.extra_channels = extra_channels

    @classmethod
    def from_scheduler(cls, unet: torch.nn.Module, scheduler, **kw) -> "DiffusersUNetDenoiser":
        return cls(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type, **kw)

    def _unet(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.extra_channels is not None:
            x = torch.cat([_expand_batch(self.extra_channels, x.shape[0]).to(x), x], dim=1)
        p = next(self.unet.parameters())
        out = self.unet(x.to(p.dtype), t, encoder_hidden_states=emb.to(device=p.device, dtype=p.dtype)).sample
        return out.to(x.dtype)

    def __call__(self, x_t: torch.Tensor, t, cond: TextConditioning) -> torch.Tensor:
        B = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).reshape(-1)
        t = t.expand(B) if t.numel() == 1 else t
        if not cond.uses_cfg:
            return self._unet(x_t, t, _expand_batch(cond.cond, B))
        emb = torch.cat([_expand_batch(cond.uncond, B), _expand_batch(cond.cond, B)])
        out = self._unet(torch.cat([x_t, x_t]), torch.cat([t, t]), emb)
        u, c = out.chunk(2)
        return apply_cfg(u, c, cond.guidance_scale)
