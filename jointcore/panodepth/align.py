"""Global least-squares alignment of per-view affine-invariant predictions.

A single-step predictor (Marigold, E2E-FT) gives each view's depth only up to its own scale and shift:
the view's planar depth is ``z = s·p + t`` (``convention="depth"``) or its inverse ``1/z = s·p + t``
(``"disparity"``). On the panorama the views must agree on one quantity per direction, the ray distance
``r``. With ``c`` the cosine between the ray and a view's axis (``z = r·c``) each view gives, linearly in its
unknowns,

* depth: ``r = s·(p/c) + t·(1/c)``;
* disparity: ``1/r = s·(c·p) + t·c``.

So every panorama pixel seen by views ``i`` and ``j`` gives one linear equation
``s_i a_i + t_i b_i − s_j a_j − t_j b_j = 0``. All overlaps together are one sparse least-squares problem in the
``2V`` unknowns, solved jointly (normal equations, ``2V×2V``). It is homogeneous, so one gauge is fixed: the
weighted mean of all the views' estimates is 1 (a linear constraint ``g·x = 1``, solved with its Lagrange
multiplier, so no view can reach the trivial zero solution, even one whose prediction is flat). The shifts are
not a gauge: the ``1/c`` factors differ between overlapping views, which makes them observable; only the
global scale is not. The result is reported in the units of a reference view (the one with the most
overlap), whose scale is then 1.

Each equation is weighted by the product of the two views' blending tapers (predictions near a view's border
count less) and by ``1/q̂²`` (so residuals are relative), re-estimated until the solution settles (IRLS).

Robustness: once the solution has settled, equations whose relative residual lies beyond ``trim`` robust
standard deviations (1.4826 × the median absolute residual; never below 2 %) are left out and the problem is
solved again (trimmed least squares).

What this does not fix: a view the predictor gets wrong as a whole. Measured on the procedural world with the
default family's predictor (``docs/quality.md``), views tilted up at the ceiling come out nearly upside down
(their best affine fit to the truth has a negative scale), and least squares then prefers flatter views
everywhere (the true parameters disagree more in the overlaps than flattened ones). The pipeline therefore shows
such views to the predictor upside down (:func:`~.merge.predict_panorama`, ``turn_upward``). Two remedies
inside the solver were tried and rejected, measured on held-out scenes: the disagreement relative to the merged
result's spread (a generalised eigenproblem, as Marigold's ensembling regularises the merged range) — its
optimum makes some views negative, so most of the panorama gets no positive distance; and rejecting the views
with the largest residual or a negative scale — it did not pick the inverted views.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

CONVENTIONS = ("depth", "disparity")


@dataclass
class Alignment:
    """``scale``, ``shift`` ``[V]`` (float64); ``reference`` view; ``pairs`` overlapping view pairs;
    ``equations`` per iteration; ``residual`` the weighted RMS relative residual of the last iteration;
    ``isolated`` views with no overlap (given the median parameters); ``trim_threshold`` the relative residual
    beyond which equations were left out (NaN without trimming); ``iterations`` the rounds it took."""

    scale: torch.Tensor
    shift: torch.Tensor
    reference: int
    pairs: int
    equations: int
    residual: float
    isolated: list
    trim_threshold: float = float("nan")
    iterations: int = 0


def view_coefficients(p: torch.Tensor, cos: torch.Tensor, convention: str = "depth") -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` with the view's estimate of the common quantity ``q = s·a + t·b`` (ray distance for depth,
    inverse ray distance for disparity)."""
    if convention == "depth":
        inv = 1.0 / cos.clamp_min(1e-6)
        return p * inv, inv
    if convention == "disparity":
        return p * cos, cos
    raise ValueError(f"prediction convention must be one of {CONVENTIONS}, got {convention!r}")


def common_quantity(p: torch.Tensor, cos: torch.Tensor, scale, shift, convention: str = "depth") -> torch.Tensor:
    """The ray distance a view says, ``[...]`` (NaN where it says nothing positive)."""
    a, b = view_coefficients(p, cos, convention)
    q = scale * a + shift * b
    r = q if convention == "depth" else 1.0 / q
    return torch.where(torch.isfinite(r) & (r >= 0), r, torch.full_like(r, float("nan")))


def solve_alignment(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor, *, robust: bool = True,
                    trim: float = 3.0, min_outlier: float = 0.02, iterations: int = 100, tol: float = 1e-5,
                    reference: Optional[int] = None, init_shift: float = 1.0,
                    ridge: float = 1e-9, max_equations: int = 1 << 20) -> Alignment:
    """Solve the per-view ``(scale, shift)`` from ``a, b [V, N]`` (:func:`view_coefficients` of every view at
    ``N`` panorama pixels) and ``weight [V, N]`` (> 0 where the view sees the pixel; its blending taper).

    ``trim``: with ``robust``, equations beyond this many robust standard deviations are dropped after the
    first convergence (never those within ``min_outlier``, a relative disagreement that is no outlier);
    ``iterations``/``tol``: the IRLS loop (stops when no parameter moves by more than ``tol`` of the largest
    scale); ``reference``: the view whose scale the result is expressed in (default: the most-overlapping view
    whose prediction is not flat); ``init_shift``: every view's shift before the first iteration (the
    normalised predictions lie in [0, 1], so 1 keeps every initial estimate positive); ``max_equations``:
    pixels of a pair beyond this many in all are subsampled evenly.
    """
    a, b, weight = a.double(), b.double(), weight.double()
    V, N = a.shape
    seen = weight > 0
    pairs = []
    total = 0
    for i in range(V):
        for j in range(i + 1, V):
            idx = torch.nonzero(seen[i] & seen[j]).flatten()
            if idx.numel() >= 3:
                pairs.append((i, j, idx))
                total += idx.numel()
    if total > max_equations:
        step = -(-total // max_equations)
        pairs = [(i, j, idx[::step]) for i, j, idx in pairs]
        total = sum(idx.numel() for *_, idx in pairs)
    over = torch.zeros(V, dtype=torch.float64)
    I, J, AI, BI, AJ, BJ, WW = [], [], [], [], [], [], []
    for i, j, idx in pairs:
        w = weight[i, idx] * weight[j, idx]
        I.append(torch.full((idx.numel(),), i))
        J.append(torch.full((idx.numel(),), j))
        AI.append(a[i, idx]), BI.append(b[i, idx]), AJ.append(a[j, idx]), BJ.append(b[j, idx]), WW.append(w)
        over[i] += w.sum()
        over[j] += w.sum()
    connected = [v for v in range(V) if over[v] > 0]
    isolated = [v for v in range(V) if over[v] <= 0]
    scale = torch.ones(V, dtype=torch.float64)
    shift = torch.full((V,), float(init_shift), dtype=torch.float64)
    ref = 0 if reference is None else int(reference)
    if reference is not None and ref in isolated:
        raise ValueError(f"reference view {ref} overlaps no other view")
    if not pairs:
        return Alignment(scale, shift, ref, 0, 0, float("nan"), isolated)
    I, J = torch.cat(I), torch.cat(J)
    AI, BI, AJ, BJ, W0 = (torch.cat(x) for x in (AI, BI, AJ, BJ, WW))
    R = torch.stack([AI, BI, -AJ, -BJ], 1)                                   # [K, 4]
    cols = torch.stack([2 * I, 2 * I + 1, 2 * J, 2 * J + 1], 1)              # their unknowns
    flat = (cols[:, :, None] * (2 * V) + cols[:, None, :]).reshape(len(I), 16)
    RR = (R[:, :, None] * R[:, None, :]).reshape(len(I), 16)
    act = [k for k in range(2 * V) if (k // 2) in connected]
    # the gauge: the weighted mean of every estimate is 1 (g·x = 1)
    cvec = torch.zeros(2 * V, dtype=torch.float64)
    cvec[0::2] = (a * weight).sum(1)
    cvec[1::2] = (b * weight).sum(1)
    cvec[[2 * v for v in isolated] + [2 * v + 1 for v in isolated]] = 0.0
    g = cvec / float(cvec[act].sum())
    resid, tau = float("nan"), float("nan")
    warm = False        # outliers are judged from the converged least-squares solution, then re-solved
    done = 0
    for _ in range(max(1, int(iterations))):
        done += 1
        qi = scale[I] * AI + shift[I] * BI
        qj = scale[J] * AJ + shift[J] * BJ
        qhat = (0.5 * (qi + qj)).abs().clamp_min(1e-9)
        rel = (qi - qj) / qhat
        ww = W0 / (qhat * qhat)
        if robust and warm:      # trimmed: equations beyond `trim` robust standard deviations (1.4826 × median |r|) left out
            tau = max(float(trim) * 1.4826 * float(rel.abs().median()), float(min_outlier))
            ww = ww * (rel.abs() <= tau).to(ww.dtype)
        resid = float(((W0 * rel * rel).sum() / W0.sum()).sqrt())
        M = torch.zeros(4 * V * V, dtype=torch.float64)
        M.index_add_(0, flat.flatten(), (RR * ww[:, None]).flatten())
        Ma = M.reshape(2 * V, 2 * V)[act][:, act]
        Ma = Ma + torch.eye(len(act), dtype=torch.float64) * (ridge * float(Ma.diagonal().abs().mean()))
        y = torch.linalg.solve(Ma, g[act])                     # min xᵀMx subject to gᵀx = 1
        x = y / (g[act] @ y)
        new_s, new_t = scale.clone(), shift.clone()
        for n, k in enumerate(act):
            (new_s if k % 2 == 0 else new_t)[k // 2] = x[n]
        change = float(torch.cat([new_s - scale, new_t - shift]).abs().max()) / max(float(new_s.abs().max()), 1e-12)
        scale, shift = new_s, new_t
        if change < tol:
            if robust and not warm:
                warm = True
                continue
            break
    if reference is None and connected:      # the most-overlapping view whose prediction is not flat
        ok = torch.tensor([v in connected and float(scale[v]) > 0.1 * float(scale.max()) for v in range(V)])
        ref = int(torch.argmax(torch.where(ok, over, torch.full_like(over, -1.0))))
    if float(scale[ref]) > 1e-12:
        k = 1.0 / float(scale[ref])
        scale, shift = scale * k, shift * k
    if isolated:
        conn = torch.tensor(connected)
        scale[isolated] = scale[conn].median()
        shift[isolated] = shift[conn].median()
    return Alignment(scale, shift, ref, len(pairs), total, resid, isolated, tau, done)
