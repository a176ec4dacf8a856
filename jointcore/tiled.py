"""Tiled (panorama) sampling: MultiDiffusion, SyncDiffusion and the JointNet tile strategy.

One loop, written once against the :class:`~jointcore.denoiser.Denoiser` interface, so it drives a
diffusers UNet, a JointNet (8-channel latents ``[rgb(4), dense(4)]``) or a ComfyUI MODEL adapter alike.

Each DDIM step from ``t`` to ``t'`` (MultiDiffusion, Bar-Tal et al. 2023, Eq. 5)::

    for every view F_v (a window of the panorama latent, wrapping in x for 360°):
        x_v        = F_v(x_t)                                   crop
        x_v        = x_v - w_i ∇_{x_v} LPIPS(D(x0(x_v)), D(x0(x_anchor)))   SyncDiffusion (optional)
        x_v'       = DDIM(x_v, ε_θ(x_v, t), t → t')            one denoiser call (batched over views)
    x_{t'} = Σ_v F_v^T(W_v ⊙ x_v') / Σ_v F_v^T(W_v)             weighted average (value / count)

with ``W_v`` the per-view weight map (uniform, or the JointNet linear boundary decay), an optional
whole-image view with weight 5 for the first 40 % of the steps and random per-step offsets of the view
grid (JointNet, Zhang et al. 2023, §4.2). As in the official JointNet panorama loop, the whole-image view of a
circular panorama is shifted by the step's x offset like every other view (the model sees the panorama
rolled, so its borders do not stay at the 360° seam). SyncDiffusion (Lee et al. 2023): anchor = middle view,
``w_i = w · decay**i`` applied on step ``i`` when ``(i+1) % freq == 0 and i < thres``; the gradient goes
through the decoder (one view at a time under grad), the denoiser is re-run on the updated view without
grad, and only the RGB part of the latent (channels ``0..3``) is decoded for the perceptual loss.

All geometry is in **latent** pixels. Views work for any panorama height and width (both axes; the
accumulation is index based, so it is correct when the window is smaller than the panorama height,
unlike the reference implementations).

Also here: :func:`tiled_decode`, a VAE decode of overlapping latent tiles with blending and optional
circular wrap in x, for panoramas whose whole-image decoder activations do not fit in memory.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from . import prediction as P
from .denoiser import Denoiser, TextConditioning
from .metrics_pano import reference_loss
from .sampling import ddim_step, next_timesteps

_LOG = logging.getLogger("jointdiffusion")

IntPair = Union[int, tuple[int, int]]
DecodeFn = Callable[[torch.Tensor], torch.Tensor]            # latent [B,4,h,w] -> image [B,3,h·f,w·f] in [-1,1]
PerceptualFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (img, ref) in [-1,1] -> loss [B,...]
TiledCallback = Callable[[int, int, torch.Tensor, torch.Tensor], None]  # (i, n, x_prev, x0_pred)


# ---------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class View:
    """A window of the panorama latent: rows ``top:top+height``; columns ``left:left+width`` modulo the
    panorama width when the panorama is circular (a view may cross the 360° seam).

    ``weight`` multiplies the view's weight map; ``whole`` marks the JointNet whole-image view.
    """

    top: int
    left: int
    height: int
    width: int
    weight: float = 1.0
    whole: bool = False


def _pair(v: IntPair, name: str) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"{name} must be an int or a (height, width) pair, got {v!r}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


def axis_starts(size: int, window: int, stride: int, circular: bool = False, offset: int = 0) -> list[int]:
    """Start positions of the windows along one axis of length ``size`` (latent pixels).

    Non-circular: ``0, stride, 2·stride, …`` plus a last window flush with the end when the stride does not
    divide ``size - window`` (so every pixel is covered for any size); with ``offset`` the grid origin moves
    to ``-offset`` and starts are clamped into ``[0, size - window]``.
    Circular: ``(offset + k·stride) mod size`` for ``k < ceil(size / stride)`` (windows wrap around).
    ``window`` larger than ``size`` is clipped to ``size`` (one window).
    """
    if size <= 0:
        raise ValueError(f"panorama size must be positive, got {size}")
    if window <= 0 or stride <= 0:
        raise ValueError(f"window ({window}) and stride ({stride}) must be positive")
    if stride > window:
        raise ValueError(f"stride {stride} > window {window} would leave gaps between views; use stride <= window")
    window = min(window, size)
    if circular:
        if window == size:
            return [0]
        n = math.ceil(size / stride)
        return [(offset + k * stride) % size for k in range(n)]
    if window == size:
        return [0]
    last = size - window
    starts = []
    s = -(offset % stride) if offset else 0
    while True:
        c = min(max(s, 0), last)
        if not starts or c != starts[-1]:
            starts.append(c)
        if c >= last:
            break
        s += stride
    return starts


def make_views(height: int, width: int, window: IntPair = 64, stride: IntPair = 8, circular: bool = False,
               offset: tuple[int, int] = (0, 0)) -> list[View]:
    """Views (row-major) tiling a ``height × width`` latent; circular wrap only in x (360° panoramas).

    Every latent pixel is covered by at least one view for any size (see :func:`axis_starts`).
    """
    wh, ww = _pair(window, "window")
    sh, sw = _pair(stride, "stride")
    ys = axis_starts(height, wh, sh, False, offset[0])
    xs = axis_starts(width, ww, sw, circular, offset[1])
    vh, vw = min(wh, height), min(ww, width)
    return [View(y, x, vh, vw) for y in ys for x in xs]


def linear_ramp(n: int, boundary: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """JointNet boundary decay ``w(k) = clamp(n/2 - |k + 0.5 - n/2|, 0, b) / b`` for ``k < n``; ones if b = 0."""
    if boundary <= 0:
        return torch.ones(n, device=device, dtype=dtype)
    k = torch.arange(n, device=device, dtype=torch.float64)
    w = (n / 2 - (k + 0.5 - n / 2).abs()).clamp(0, boundary) / boundary
    return w.to(dtype)


def view_weight_map(view: View, boundary: tuple[int, int], ramp_axes: tuple[bool, bool], device=None,
                    dtype=torch.float32) -> torch.Tensor:
    """Weight map ``[h, w]`` of a view: ``weight`` × outer product of per-axis linear ramps."""
    if view.whole:
        return torch.full((view.height, view.width), float(view.weight), device=device, dtype=dtype)
    ry = linear_ramp(view.height, boundary[0] if ramp_axes[0] else 0, device, dtype)
    rx = linear_ramp(view.width, boundary[1] if ramp_axes[1] else 0, device, dtype)
    return (ry[:, None] * rx[None, :]) * float(view.weight)


def _col_index(view: View, width: int, device) -> Optional[torch.Tensor]:
    if view.left + view.width <= width:
        return None
    return torch.arange(view.left, view.left + view.width, device=device) % width


def crop_view(x: torch.Tensor, view: View) -> torch.Tensor:
    """``F_v(x)``: the view's window of ``x`` ``[B,C,H,W]`` → ``[B,C,h,w]`` (wrapping in x if needed)."""
    rows = x[:, :, view.top:view.top + view.height]
    idx = _col_index(view, x.shape[-1], x.device)
    if idx is None:
        return rows[..., view.left:view.left + view.width]
    return rows.index_select(-1, idx)


def paste_add(acc: torch.Tensor, tile: torch.Tensor, view: View) -> None:
    """``acc += F_v^T(tile)`` in place (index based: correct for any view position, wrapping in x)."""
    rows = acc[:, :, view.top:view.top + view.height]
    idx = _col_index(view, acc.shape[-1], acc.device)
    if idx is None:
        rows[..., view.left:view.left + view.width] += tile
    else:
        rows.index_add_(-1, idx, tile)


def latent_shape_for(height: int, width: int, scale: int = 8) -> tuple[int, int]:
    """Latent ``(h, w)`` of a ``height × width`` pixel panorama; clear error for non-multiples of ``scale``."""
    bad = [(n, v) for n, v in (("height", height), ("width", width)) if v <= 0 or v % scale]
    if bad:
        n, v = bad[0]
        lo, hi = max(scale, v // scale * scale), (v // scale + 1) * scale
        raise ValueError(f"panorama {n} {v} px is not a positive multiple of the VAE factor {scale}; use {lo} or {hi}")
    return height // scale, width // scale


# ---------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------

@dataclass
class TiledConfig:
    """Settings of :func:`tiled_sample` (all sizes in latent pixels).

    Attributes:
        window, stride: view size and step, an int or ``(h, w)``.
        circular: wrap views around in x (360° panorama).
        view_batch: views per denoiser call.
        sync_memory_mib: memory bound of one batched SyncDiffusion gradient pass (the activations kept for its
            backward, measured on the first view of each size); views are grouped up to ``view_batch`` within
            it. 0 = automatic: half the free GPU memory, or on a CPU a quarter of the available RAM and at most
            2 GiB (a CPU is no faster for larger groups and slower to fault in fresh memory).
        boundary: linear boundary decay width (JointNet: 8); 0 = uniform view weights (MultiDiffusion).
        random_offset: shift the view grid by ``randint(stride)`` each step (JointNet), wrap-around in x;
            :func:`tiled_sample` also takes explicit per-step offsets.
        whole_image_weight: weight of the whole-image view (JointNet: 5); 0 = none. Active while
            ``i <= int(steps · whole_image_until)``; on a circular panorama it starts at the step's x offset.
        sync_weight: SyncDiffusion gradient weight ``w`` (paper: 20); 0 disables synchronisation.
        sync_decay, sync_freq, sync_thres: ``w_i = w·decay**i`` on steps with
            ``(i+1) % freq == 0 and i < thres``.
        anchor: index of the anchor view (default: middle view ``len(views)//2``).
        sync_channels: latent channels decoded for the perceptual loss (the RGB part: 4).
    """

    window: IntPair = 64
    stride: IntPair = 8
    circular: bool = False
    view_batch: int = 1
    sync_memory_mib: float = 0.0
    boundary: IntPair = 0
    random_offset: bool = False
    whole_image_weight: float = 0.0
    whole_image_until: float = 0.4
    sync_weight: float = 0.0
    sync_decay: float = 0.95
    sync_freq: int = 1
    sync_thres: int = 50
    anchor: Optional[int] = None
    sync_channels: int = 4

    def __post_init__(self):
        if self.view_batch < 1:
            raise ValueError(f"view_batch must be >= 1, got {self.view_batch}")
        if self.sync_memory_mib < 0:
            raise ValueError(f"sync_memory_mib must be >= 0 (0 = automatic), got {self.sync_memory_mib}")
        if self.sync_freq < 1:
            raise ValueError(f"sync_freq must be >= 1, got {self.sync_freq}")
        if self.sync_weight < 0 or self.whole_image_weight < 0:
            raise ValueError("sync_weight and whole_image_weight must be >= 0")
        for n in ("window", "stride"):
            a, b = _pair(getattr(self, n), n)
            if a <= 0 or b <= 0:
                raise ValueError(f"{n} must be positive, got {getattr(self, n)!r}")

    # presets ----------------------------------------------------------------------------------------
    @classmethod
    def multidiffusion(cls, **kw) -> "TiledConfig":
        """MultiDiffusion as in diffusers' panorama pipeline: window 64, stride 8, uniform weights."""
        return cls(**{**dict(window=64, stride=8), **kw})

    @classmethod
    def syncdiffusion(cls, **kw) -> "TiledConfig":
        """SyncDiffusion paper settings: stride 16, w 20, decay 0.95, every step (thres 50)."""
        return cls(**{**dict(window=64, stride=16, sync_weight=20.0, sync_decay=0.95, sync_freq=1,
                             sync_thres=50), **kw})

    @classmethod
    def syncdiffusion_fast(cls, **kw) -> "TiledConfig":
        """Faster SyncDiffusion (the official script/demo): synchronise only the first 10 steps, batched views."""
        return cls(**{**dict(window=64, stride=16, sync_weight=20.0, sync_decay=0.95, sync_freq=1,
                             sync_thres=10, view_batch=4), **kw})

    @classmethod
    def jointnet(cls, **kw) -> "TiledConfig":
        """JointNet panorama strategy: stride 32, 360° wrap, 8 views/batch, random offsets, boundary 8,
        whole-image view weight 5 for the first 40 % of the steps."""
        return cls(**{**dict(window=64, stride=32, circular=True, view_batch=8, boundary=8, random_offset=True,
                             whole_image_weight=5.0, whole_image_until=0.4), **kw})


@dataclass
class TiledStats:
    """Work counters filled by :func:`tiled_sample` (NFE = window-sized denoiser evaluations)."""

    view_evals: int = 0        # denoiser evaluations of views without grad (incl. the anchor's)
    grad_evals: int = 0        # denoiser evaluations under grad (SyncDiffusion)
    whole_evals: int = 0       # evaluations of the whole-image view
    denoiser_calls: int = 0    # batched calls
    decodes: int = 0           # VAE decodes for SyncDiffusion (anchor + views)
    sync_steps: int = 0
    seconds: float = 0.0
    views_per_step: list = field(default_factory=list)
    sync_group_views: dict = field(default_factory=dict)  # views per SyncDiffusion gradient group, by view size
    sync_view_bytes: dict = field(default_factory=dict)   # activations one view's gradient pass keeps, by view size

    @property
    def nfe(self) -> int:
        return self.view_evals + self.grad_evals + self.whole_evals


def _repeat_cond(cond: Any, n: int, batch: int) -> Any:
    """Repeat batch-``batch`` text conditioning for ``n`` stacked views (view-major stacking)."""
    if n == 1 or not isinstance(cond, TextConditioning):
        return cond

    def rep(e):
        if e is None or e.shape[0] == 1 or e.shape[0] != batch:
            return e
        return e.repeat(n, *([1] * (e.ndim - 1)))

    return TextConditioning(rep(cond.cond), rep(cond.uncond), cond.guidance_scale)


def sync_active(i: int, cfg: TiledConfig) -> bool:
    """SyncDiffusion schedule: step ``i`` (0-based) synchronises when ``(i+1) % freq == 0 and i < thres``."""
    return cfg.sync_weight > 0 and (i + 1) % cfg.sync_freq == 0 and i < cfg.sync_thres


def whole_image_active(i: int, n_steps: int, cfg: TiledConfig) -> bool:
    """JointNet whole-image view on step ``i`` iff ``i <= int(n_steps · until)``."""
    return cfg.whole_image_weight > 0 and i <= int(n_steps * cfg.whole_image_until)


def sync_memory_budget(cfg: TiledConfig, device: torch.device) -> int:
    """Bytes one batched SyncDiffusion gradient pass may keep for its backward (:attr:`TiledConfig.sync_memory_mib`)."""
    if cfg.sync_memory_mib > 0:
        return int(cfg.sync_memory_mib * 2**20)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free // 2)
    from .models.preflight import available_bytes

    avail = available_bytes()
    return int(min(2 * 2**30, avail // 4)) if avail else 2 * 2**30


class _SavedBytes:
    """Counts the bytes autograd keeps for the backward pass inside the ``with`` block: the activations (tensors
    with a ``grad_fn``), each storage once; weights and other leaves are not counted (they are not per view)."""

    def __init__(self):
        self.bytes = 0
        self._seen: set = set()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        if t.grad_fn is not None:
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in self._seen:
                self._seen.add(key)
                self.bytes += st.nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def sync_view_update(denoiser: Denoiser, x_view: torch.Tensor, t: torch.Tensor, cond: Any, anchor_image: torch.Tensor,
                     decode: DecodeFn, perceptual: PerceptualFn, weight: float, channels: int = 4,
                     loss: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """One SyncDiffusion gradient step on a view latent ``[B,C,h,w]``.

    ``x_v ← x_v - weight · ∇_{x_v} L``, ``L = perceptual(clamp(D(x0(x_v)[:, :channels]), -1, 1), anchor_image)``
    summed over the batch, with ``x0`` the denoiser's clean estimate (through CFG). Returns the updated
    latent (detached).

    The gradient goes through the denoiser as in the paper. A denoiser whose forward pass modifies saved
    activations in place (ComfyUI's UNet before mid-2024 does ``x += n`` in its transformer blocks) cannot be
    differentiated; then, with a warning, the noise estimate is held constant (``x0 = (x_v - √(1-ᾱ) ε̂) / √ᾱ``,
    the gradient through the decoder and LPIPS only).

    ``loss``: ``image → per-image loss`` against the anchor, if precomputed
    (:func:`jointcore.metrics_pano.reference_loss`); default ``perceptual(image, anchor_image)``.
    """
    if loss is None:
        def loss(img):
            return perceptual(img, anchor_image.to(img))
    with torch.enable_grad():
        xv = x_view.detach().clone().requires_grad_(True)
        try:
            out = denoiser(xv, t, cond)
            x0 = P.to_x0(out, xv, t, denoiser.alphas_cumprod, denoiser.prediction_type)
            g = _perceptual_grad(x0, xv, decode, loss, channels)
        except RuntimeError as e:
            if "inplace operation" not in str(e):
                raise
            _warn_inplace_once(e)
            x0 = _x0_with_constant_noise(denoiser, xv, t, cond)
            g = _perceptual_grad(x0, xv, decode, loss, channels)
    return (x_view.detach() - weight * g.to(x_view.dtype)).detach()


def _perceptual_grad(x0, xv, decode, loss, channels) -> torch.Tensor:
    img = decode(x0[:, :channels]).clamp(-1, 1)
    (g,) = torch.autograd.grad(loss(img).sum(), xv)
    return g


def _x0_with_constant_noise(denoiser: Denoiser, xv: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
    """``x0(x_v) = (x_v - √(1-ᾱ) ε̂) / √ᾱ`` with ε̂ evaluated once, without gradient."""
    ab = denoiser.alphas_cumprod
    with torch.no_grad():
        out = denoiser(xv.detach(), t, cond)
        eps = P.to_eps(out, xv.detach(), t, ab, denoiser.prediction_type)
    a, s = P._coeffs(ab, t, xv)
    return ((xv.double() - s * eps.double()) / a).to(xv.dtype)


_WARNED_INPLACE = []


def _warn_inplace_once(err: Exception) -> None:
    if not _WARNED_INPLACE:
        _WARNED_INPLACE.append(True)
        logging.getLogger("jointdiffusion").warning(
            "SyncDiffusion: this model modifies activations in place, so the LPIPS gradient cannot pass through "
            "it (%s). Using the gradient with the noise estimate held constant (decoder + LPIPS only); a newer "
            "ComfyUI (mid-2024 or later) gives the exact gradient.", str(err).split(":")[0])


# ---------------------------------------------------------------------------------------------------
# the sampler
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def tiled_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    timesteps: Sequence[int],
    cond: Any = None,
    config: Optional[TiledConfig] = None,
    *,
    eta: float = 0.0,
    prev_timesteps: Optional[Sequence[int]] = None,
    final_alpha_cumprod: float = 1.0,
    generator: Optional[torch.Generator] = None,
    decode: Optional[DecodeFn] = None,
    perceptual: Optional[PerceptualFn] = None,
    callback: Optional[TiledCallback] = None,
    sync_hook: Optional[Callable[[int, int, View, torch.Tensor, torch.Tensor], None]] = None,
    stats: Optional[TiledStats] = None,
    offsets: Optional[Sequence[Union[int, tuple[int, int]]]] = None,
    check: Optional[Callable[[], None]] = None,
) -> torch.Tensor:
    """Tiled DDIM from ``x`` ``[B,C,H,W]`` (noisy at ``timesteps[0]``) along ``timesteps``.

    Args:
        denoiser: any :class:`~jointcore.denoiser.Denoiser`; called on stacked views ``[n·B, C, h, w]``.
        cond: passed through (text conditioning of batch 1 or ``B`` is repeated for stacked views).
        config: :class:`TiledConfig` (default: MultiDiffusion, window 64, stride 8).
        eta, prev_timesteps, final_alpha_cumprod: as :func:`jointcore.sampling.ddim_sample` (the η noise is
            drawn once per step for the whole panorama, so overlapping views agree).
        generator: for η noise and random offsets.
        offsets: explicit view-grid offsets, one per step: ``ox`` or ``(oy, ox)`` in latent pixels,
            ``0 <= o < stride`` (replaces the random draws, e.g. to reproduce a run of the official loop, whose
            ``w_offset`` is ``np.random.randint(stride)``).
        decode: ``latent [b,4,h,w] → image [b,3,·,·]`` in ``[-1, 1]``, differentiable (SyncDiffusion).
        perceptual: ``(image, reference) → loss`` (e.g. :func:`jointcore.metrics_pano.load_lpips`).
        callback: ``(i, n, x_prev, x0_pred)`` after each step; raising from it interrupts sampling.
        sync_hook: ``(i, view_index, view, x_before, x_after)`` for each synchronised view (inspection/tests).
        stats: a :class:`TiledStats` to fill.
        check: called before every denoiser call (each view batch, the anchor, each synchronised view); raise
            from it to stop (Cancel) within one view's work rather than one step's.

    Returns:
        the latent at the last target ``[B,C,H,W]``.
    """
    cfg = config or TiledConfig()
    if x.ndim != 4:
        raise ValueError(f"expected latents [B,C,H,W], got {tuple(x.shape)}")
    if cfg.sync_weight > 0 and (decode is None or perceptual is None):
        raise ValueError("SyncDiffusion (sync_weight > 0) needs a decode function and a perceptual loss "
                         "(e.g. jointcore.metrics_pano.load_lpips)")
    ts = [int(t) for t in timesteps]
    prev = list(prev_timesteps) if prev_timesteps is not None else next_timesteps(ts)
    if len(prev) != len(ts):
        raise ValueError("prev_timesteps must have one entry per timestep")
    stats = stats if stats is not None else TiledStats()
    t0 = time.perf_counter()
    B, C, H, W = x.shape
    ab = denoiser.alphas_cumprod
    wh, ww = _pair(cfg.window, "window")
    sh, sw = _pair(cfg.stride, "stride")
    bh, bw = _pair(cfg.boundary, "boundary")
    n = len(ts)
    dev = x.device
    gen_dev = generator.device if generator is not None else torch.device("cpu")
    steps_offsets = _check_offsets(offsets, n, (sh, sw)) if offsets is not None else None
    if cfg.circular and W <= ww:
        _LOG.warning("tiled sampling: 'circular' has no effect here: the panorama is %d latents wide, not wider "
                     "than the %d-latent window, so there is a single view across and nothing wraps around; "
                     "use a wider panorama or a smaller window for a 360° panorama", W, ww)

    sync_group: dict[tuple[int, int], int] = {}   # views per gradient group, by view size (measured)
    budget: Optional[int] = None
    for i, (t, tp) in enumerate(zip(ts, prev)):
        if steps_offsets is not None:
            oy, ox = steps_offsets[i]
        elif cfg.random_offset:
            oy = int(torch.randint(sh, (1,), generator=generator, device=gen_dev)) if H > wh else 0
            ox = int(torch.randint(sw, (1,), generator=generator, device=gen_dev)) if W > ww else 0
        else:
            oy = ox = 0
        views = make_views(H, W, (wh, ww), (sh, sw), cfg.circular, (oy, ox))
        ramp_axes = (H > wh, W > ww)
        a_t = float(ab[t])
        a_p = float(ab[tp]) if tp >= 0 else float(final_alpha_cumprod)
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device=gen_dev, dtype=torch.float32).to(x)

        # (1) SyncDiffusion: gradient step on every view towards the anchor's foreseen image
        crops: dict[int, torch.Tensor] = {}
        if sync_active(i, cfg) and len(views) > 1:
            stats.sync_steps += 1
            w_i = cfg.sync_weight * cfg.sync_decay ** i
            a_idx = cfg.anchor if cfg.anchor is not None else len(views) // 2
            a_idx = max(0, min(a_idx, len(views) - 1))
            tt1 = torch.full((B,), t, dtype=torch.long, device=dev)
            if check is not None:
                check()
            xa = crop_view(x, views[a_idx])
            x0a, _ = _x0_eps(denoiser, xa, tt1, cond)
            anchor_img = decode(x0a[:, :cfg.sync_channels]).clamp(-1, 1).detach()
            anchor_loss = reference_loss(perceptual, anchor_img)  # the anchor's LPIPS features once per step
            stats.view_evals += 1
            stats.denoiser_calls += 1
            stats.decodes += 1
            # every view's gradient is taken from the same step-start latent, so the gradient passes (denoiser,
            # decoder, LPIPS) run batched over view_batch views with one backward each: the per-view losses are
            # independent, so each view's slice of the batched gradient is its own gradient
            # The groups are bounded in memory: the first view of each size is run alone and the activations
            # it keeps for its backward are measured; later groups hold as many views as fit the budget.
            by_size: dict[tuple[int, int], list] = {}
            for j, v in enumerate(views):
                if j != a_idx:
                    by_size.setdefault((v.height, v.width), []).append((j, v))
            for size, members in by_size.items():
                k = 0
                while k < len(members):
                    measure = size not in sync_group and cfg.view_batch > 1
                    g = 1 if measure else sync_group.get(size, cfg.view_batch)
                    chunk = members[k:k + g]
                    k += len(chunk)
                    if check is not None:
                        check()
                    m = len(chunk)
                    xs = torch.cat([crop_view(x, v) for _, v in chunk])
                    with (_SavedBytes() if measure else contextlib.nullcontext()) as saved:
                        new = sync_view_update(denoiser, xs, tt1.repeat(m), _repeat_cond(cond, m, B), anchor_img,
                                               decode, perceptual, w_i, cfg.sync_channels, loss=anchor_loss)
                    if measure:
                        if budget is None:
                            budget = sync_memory_budget(cfg, torch.device(dev))
                        sync_group[size] = max(1, min(cfg.view_batch, budget // max(saved.bytes, 1)))
                        stats.sync_group_views[size] = sync_group[size]
                        stats.sync_view_bytes[size] = saved.bytes
                    stats.grad_evals += m
                    stats.denoiser_calls += 1
                    stats.decodes += 1
                    for q, (j, v) in enumerate(chunk):
                        crops[j] = new[q * B:(q + 1) * B]
                        if sync_hook is not None:
                            sync_hook(i, j, v, xs[q * B:(q + 1) * B], crops[j])

        # (2) denoise every view (batched) and accumulate the weighted average
        all_views = list(enumerate(views))
        if whole_image_active(i, n, cfg) and len(views) > 1:
            # circular: rolled by the step's x offset, as in the official loop (w_offset added to every view)
            left = ox % W if cfg.circular else 0
            all_views.append((-1, View(0, left, H, W, cfg.whole_image_weight, whole=True)))
        value = torch.zeros_like(x, dtype=torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype)
        count = torch.zeros((1, 1, H, W), dtype=value.dtype, device=dev)
        x0_value = torch.zeros_like(value)
        groups: dict[tuple[int, int], list] = {}
        for j, v in all_views:
            groups.setdefault((v.height, v.width), []).append((j, v))
        for (_h, _w), members in groups.items():
            for k in range(0, len(members), cfg.view_batch):
                chunk = members[k:k + cfg.view_batch]
                if check is not None:
                    check()
                xin = torch.cat([crops[j] if j in crops else crop_view(x, v) for j, v in chunk])
                m = len(chunk)
                tt = torch.full((m * B,), t, dtype=torch.long, device=dev)
                x0, eps = _x0_eps(denoiser, xin, tt, _repeat_cond(cond, m, B))
                nz = torch.cat([crop_view(noise, v) for _, v in chunk]) if noise is not None else None
                xprev = ddim_step(xin, x0, eps, a_t, a_p, eta, nz)
                stats.denoiser_calls += 1
                for q, (j, v) in enumerate(chunk):
                    if v.whole:
                        stats.whole_evals += 1
                    else:
                        stats.view_evals += 1
                    wmap = view_weight_map(v, (bh, bw), ramp_axes, dev, value.dtype)
                    sl = slice(q * B, (q + 1) * B)
                    paste_add(value, xprev[sl].to(value.dtype) * wmap, v)
                    paste_add(x0_value, x0[sl].to(value.dtype) * wmap, v)
                    paste_add(count, wmap[None, None], v)
        stats.views_per_step.append(len(all_views))
        if bool((count <= 0).any()):
            raise RuntimeError("internal error: some latent pixels are covered by no view")
        x = (value / count).to(x.dtype)
        if callback is not None:
            callback(i, n, x, (x0_value / count).to(x.dtype))
    stats.seconds += time.perf_counter() - t0
    return x


def _check_offsets(offsets, n: int, stride: tuple[int, int]) -> list[tuple[int, int]]:
    """Per-step offsets → ``[(oy, ox)] * n``; each ``0 <= o < stride`` (clear errors otherwise)."""
    out = list(offsets)
    if len(out) != n:
        raise ValueError(f"offsets must have one entry per step ({n}), got {len(out)}")
    res = []
    for i, o in enumerate(out):
        pair = isinstance(o, (tuple, list)) or (torch.is_tensor(o) and o.ndim == 1)
        oy, ox = (int(o[0]), int(o[1])) if pair else (0, int(o))
        if not (0 <= oy < stride[0] and 0 <= ox < stride[1]):
            raise ValueError(f"offset {o!r} of step {i} must satisfy 0 <= offset < stride {stride}")
        res.append((oy, ox))
    return res


def _x0_eps(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
    out = denoiser(x_t, t, cond)
    ab = denoiser.alphas_cumprod
    return (P.to_x0(out, x_t, t, ab, denoiser.prediction_type), P.to_eps(out, x_t, t, ab, denoiser.prediction_type))


# ---------------------------------------------------------------------------------------------------
# tiled VAE decoding
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def tiled_decode(decode: DecodeFn, latent: torch.Tensor, tile: IntPair = 64, overlap: IntPair = 16,
                 circular: bool = False, context: int = 8, scale: Optional[int] = None) -> torch.Tensor:
    """Decode a large latent ``[B,C,H,W]`` tile by tile; returns the image ``[B,3,H·f,W·f]``.

    Tiles of ``tile`` latents overlap by ``overlap`` latents and are blended with linear ramps over the
    overlap (value / count in pixel space). Each tile is decoded with ``context`` extra latents on every
    side (taken across the 360° seam when ``circular``, clamped at the panorama border otherwise) which are
    cropped off after decoding, so tile borders see their neighbours (fewer seams). Peak memory is the output
    image plus one ``(tile + 2·context)²`` decode: the tiles form a grid (every row start with every column
    start) and share one ramp shape, so the blending weights' sum is the outer product of two 1-D sums and is
    kept as two vectors, and the division happens in place.

    Args:
        decode: ``latent → image`` (any channel count in/out; e.g. ``vae.decode(z / 0.18215).sample``).
        scale: decoder up-sampling factor (inferred from the first tile if None).
    """
    if latent.ndim != 4:
        raise ValueError(f"expected a latent [B,C,H,W], got {tuple(latent.shape)}")
    B, C, H, W = latent.shape
    th, tw = (min(a, s) for a, s in zip(_pair(tile, "tile"), (H, W)))
    oh, ow = _pair(overlap, "overlap")
    if oh < 0 or ow < 0 or context < 0:
        raise ValueError("overlap and context must be >= 0")
    sh, sw = max(th - oh, 1), max(tw - ow, 1)
    ys = axis_starts(H, th, sh, False)
    xs = axis_starts(W, tw, sw, circular)
    out = None
    f = scale
    for y in ys:
        for xo in xs:
            # context window: rows clamped to the panorama, columns wrapped (circular) or clamped
            y0, y1 = max(y - context, 0), min(y + th + context, H)
            if circular:
                cols = torch.arange(xo - context, xo + tw + context, device=latent.device) % W
                x_lo = context
            else:
                x0c, x1c = max(xo - context, 0), min(xo + tw + context, W)
                cols = torch.arange(x0c, x1c, device=latent.device)
                x_lo = xo - x0c
            piece = latent[:, :, y0:y1].index_select(-1, cols)
            img = decode(piece)
            if f is None:
                f = img.shape[-1] // piece.shape[-1]
                if f * piece.shape[-1] != img.shape[-1]:
                    raise ValueError("could not infer the decoder scale; pass scale=")
            if out is None:
                out = torch.zeros((B, img.shape[1], H * f, W * f), dtype=torch.float32, device=img.device)
                ry = linear_ramp(th * f, oh * f if len(ys) > 1 else 0, img.device)
                rx = linear_ramp(tw * f, ow * f if len(xs) > 1 else 0, img.device)
                wmap = ry[:, None] * rx[None, :]
                # the weight sum: Σ_tiles ry(y − y_t)·rx(x − x_t) = (Σ_t ry(y − y_t)) · (Σ_t rx(x − x_t))
                cy = torch.zeros((1, 1, H * f, 1), dtype=torch.float32, device=img.device)
                cx = torch.zeros((1, 1, 1, W * f), dtype=torch.float32, device=img.device)
                for yy in ys:
                    paste_add(cy, ry[None, None, :, None], View(yy * f, 0, th * f, 1))
                for xx in xs:  # (wraps across the 360° seam like the tiles: paste_add indexes modulo the width)
                    paste_add(cx, rx[None, None, None, :], View(0, xx * f, 1, tw * f))
            core = img[:, :, (y - y0) * f:(y - y0 + th) * f, x_lo * f:(x_lo + tw) * f].float()
            paste_add(out, core * wmap, View(y * f, xo * f, th * f, tw * f))
            del img, core
    out.div_(cy).div_(cx)
    return out.to(latent.dtype if latent.is_floating_point() else torch.float32)


def decode_circular_padded(decode: DecodeFn, latent: torch.Tensor, padding: int = 8,
                           scale: Optional[int] = None) -> torch.Tensor:
    """Whole-image decode with ``padding`` latents wrapped around each side in x, cropped off afterwards
    (the reference 360° decode of JointNet / diffusers' panorama pipeline)."""
    W = latent.shape[-1]
    padding = min(padding, W)
    z = torch.cat([latent[..., W - padding:], latent, latent[..., :padding]], dim=-1)
    img = decode(z)
    f = scale or img.shape[-1] // z.shape[-1]
    return img[..., padding * f: img.shape[-1] - padding * f]
