"""Evaluation metrics for affine-invariant depth and surface normals (Marigold / E2E-FT protocol).

Depth (per image): the prediction ``p`` is aligned to the ground truth ``g`` with least squares
``(s, b) = argmin Σ_valid (s·p + b − g)²`` in depth space, clipped to the dataset range, then

* ``AbsRel = mean |p̂ − g| / g``,
* ``δ1 = fraction of pixels with max(p̂/g, g/p̂) < 1.25``,

over valid pixels (finite ``g > 0`` inside the optional mask). Dataset figures are the mean over images.

Normals (pooled over all valid pixels): angular error ``θ = arccos(clamp(⟨n̂, n⟩, −1, 1))`` in degrees,
reported as mean, median and the percentage below 11.25°, 22.5° and 30°.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

NORMAL_THRESHOLDS: tuple[float, ...] = (11.25, 22.5, 30.0)


def lstsq_scale_shift(pred: torch.Tensor, ref: torch.Tensor, mask: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample least squares ``(s, b) = argmin Σ m·(s·pred + b − ref)²`` (closed form, float64).

    Args:
        pred, ref: ``[B, ...]`` of the same shape.
        mask: optional ``[B, ...]`` bool or 0–1 weights (valid pixels).

    Returns:
        ``scale, shift`` of shape ``[B]`` (float64; scale 1, shift 0 where the system is singular,
        e.g. a constant prediction or fewer than two valid pixels).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and reference {tuple(ref.shape)} differ in shape")
    B = pred.shape[0]
    p = pred.reshape(B, -1).double()
    r = ref.reshape(B, -1).double()
    m = torch.ones_like(p) if mask is None else mask.reshape(B, -1).double()
    p, r = p * (m > 0), torch.where(m > 0, r, torch.zeros_like(r))  # invalid ref values may be nan/inf
    a00 = (m * p * p).sum(1)
    a01 = (m * p).sum(1)
    a11 = m.sum(1)
    b0 = (m * p * r).sum(1)
    b1 = (m * r).sum(1)
    det = a00 * a11 - a01 * a01
    ok = det.abs() > 1e-12 * (a00 * a11).clamp(min=1e-300)
    safe = torch.where(ok, det, torch.ones_like(det))
    scale = torch.where(ok, (a11 * b0 - a01 * b1) / safe, torch.ones_like(det))
    shift = torch.where(ok, (a00 * b1 - a01 * b0) / safe, torch.zeros_like(det))
    return scale, shift


def align_scale_shift(pred: torch.Tensor, ref: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``s·pred + b`` with the least-squares ``(s, b)`` per sample (same dtype as ``pred``)."""
    s, b = lstsq_scale_shift(pred, ref, mask)
    shape = (-1,) + (1,) * (pred.ndim - 1)
    return (pred.double() * s.reshape(shape) + b.reshape(shape)).to(pred.dtype)


def depth_valid_mask(gt: torch.Tensor, mask: Optional[torch.Tensor] = None, min_depth: float = 0.0,
                     max_depth: Optional[float] = None) -> torch.Tensor:
    """Finite ``gt > min_depth`` (and ``<= max_depth``) inside ``mask``."""
    v = torch.isfinite(gt) & (gt > min_depth)
    if max_depth is not None:
        v = v & (gt <= max_depth)
    if mask is not None:
        v = v & mask.bool().reshape(gt.shape)
    return v


def depth_metrics(pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                  align: bool = True, min_depth: float = 1e-3, max_depth: Optional[float] = None
                  ) -> dict[str, torch.Tensor]:
    """AbsRel and δ1 per image.

    Args:
        pred: ``[B,1,H,W]`` (or ``[B,H,W]``) predicted affine-invariant depth.
        gt: ground-truth depth of the same shape (``0``/``nan``/``inf`` = invalid).
        mask: optional extra validity mask.
        align: least-squares scale/shift alignment of ``pred`` to ``gt`` on valid pixels first.
        min_depth, max_depth: dataset range; GT outside is invalid, the aligned prediction is clipped to
            it (``max_depth`` default: the image's largest valid GT).

    Returns:
        ``{"abs_rel": [B], "delta1": [B], "valid": [B] pixel counts}`` (float64).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape; "
                         f"resize the prediction to the ground-truth size first")
    valid = depth_valid_mask(gt, mask, min_depth, max_depth)
    B = pred.shape[0]
    n = valid.reshape(B, -1).sum(1)
    if (n == 0).any():
        raise ValueError(f"images {torch.nonzero(n == 0).flatten().tolist()} have no valid ground-truth pixels")
    p = align_scale_shift(pred.double(), gt.double(), valid) if align else pred.double()
    g = torch.where(valid, gt.double(), torch.ones_like(gt, dtype=torch.float64))
    hi = torch.tensor(float(max_depth)) if max_depth is not None else None
    flat_g = torch.where(valid, gt.double(), torch.full_like(g, -float("inf"))).reshape(B, -1)
    gmax = flat_g.max(1).values if hi is None else hi.double().expand(B)
    p = torch.minimum(p.clamp(min=min_depth), gmax.reshape((-1,) + (1,) * (p.ndim - 1)))
    vm = valid.double()
    absrel = ((p - g).abs() / g * vm).reshape(B, -1).sum(1) / n
    ratio = torch.maximum(p / g, g / p)
    d1 = ((ratio < 1.25).double() * vm).reshape(B, -1).sum(1) / n
    return {"abs_rel": absrel, "delta1": d1, "valid": n.double()}


def angular_error_deg(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-pixel angle (degrees) between ``[B,3,H,W]`` normal maps (both renormalised) → ``[B,H,W]``."""
    if pred.shape != gt.shape or pred.shape[1] != 3:
        raise ValueError(f"normal maps must both be [B,3,H,W]; got {tuple(pred.shape)} and {tuple(gt.shape)}")
    cos = (F.normalize(pred.double(), dim=1) * F.normalize(gt.double(), dim=1)).sum(1)
    return torch.rad2deg(torch.arccos(cos.clamp(-1, 1)))


def normal_valid_mask(gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pixels whose GT normal is finite with norm > 0.5 (unlabelled pixels are usually zero), in ``mask``."""
    v = torch.isfinite(gt).all(1) & (gt.nan_to_num(0).norm(dim=1) > 0.5)
    if mask is not None:
        v = v & mask.bool().reshape(v.shape)
    return v


def normal_errors(pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Angular errors (degrees) of all valid pixels, flattened ``[N]``."""
    err = angular_error_deg(pred, gt.nan_to_num(0))
    return err[normal_valid_mask(gt, mask)]


def summarise_normal_errors(errors: torch.Tensor) -> dict[str, float]:
    """Mean/median angle and % of pixels under 11.25°/22.5°/30° from pooled errors ``[N]``."""
    if errors.numel() == 0:
        raise ValueError("no valid normal pixels to evaluate")
    e = errors.double()
    out = {"mean_deg": e.mean().item(), "median_deg": e.median().item()}
    for t in NORMAL_THRESHOLDS:
        out[f"pct_under_{t:g}"] = 100.0 * (e < t).double().mean().item()
    return out


def normal_metrics(pred: torch.Tensor, gt: torch.Tensor, mask: Optional[torch.Tensor] = None) -> dict[str, float]:
    """Pooled normal metrics of one batch (see :func:`summarise_normal_errors`)."""
    return summarise_normal_errors(normal_errors(pred, gt, mask))
