"""360° depth and normals from a perspective single-step predictor: split, predict, align, merge.

:func:`predict_panorama` splits an equirectangular or cylindrical image into overlapping perspective views
(:mod:`.views`), predicts each view with the caller's functions, solves every view's scale and shift jointly
over all overlaps (:mod:`.align`), and blends the views on the panorama grid with weights that fall to zero at
each view's border. Normals are rotated from each view's camera frame into the panorama before blending.
Because every view is resampled from directions, the 0/360° seam and the poles are closed by construction:
a view straddling the seam contributes to both ends of the image.

Three named methods (:data:`METHODS`) are the report's comparison (``docs/quality.md``):

* ``aligned`` (ours): 18 views (``cube+seams``), views looking up shown to the predictor upside down, joint
  robust alignment, tapered blending, rotated normals;
* ``views12``: the 12-view merge that ignores each view's scale — icosahedron views, each prediction taken
  as it comes (scale 1, shift 0), tapered blending, rotated normals;
* ``naive``: per-view stitching — the six cube faces pasted (each pixel from the view whose centre is
  nearest), no alignment, each view's camera-frame normals pasted as they are.

Tried and not kept, measured on 12 held-out scenes of ``python -m jointcore.panodepth.evaluate``:

* a gradient-domain merge: blend the views' ``Δlog r`` between neighbouring pixels, then solve a screened Poisson
  problem for ``log r`` near the tapered blend. Seam error 0.0101 → 0.0098, AbsRel 0.1273 → 0.1259. The tapered
  blend has no seams beyond its per-pixel error (``seam_excess`` ≈ 0), so there was little left for it to remove;
* sharper blending weights (taper⁴): worse (0.0101 → 0.0104), because averaging overlapping views lowers the noise;
* each view also predicted mirrored and averaged (a flip ensemble): seam error 0.0101 → 0.0096, AbsRel
  0.1273 → 0.1221 for 18 more predictor calls; 48 views of the fibonacci layout instead (30 more calls) reach
  0.0097 and AbsRel 0.1107 on the same scenes (the report's 48-view row), more per call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from ..data.world_camera import normals_to_camera
from .align import common_quantity, solve_alignment, view_coefficients
from .views import PanoGrid, View, make_views, pano_to_view, view_on_pano, views_on_pano

METHODS = {
    "aligned": {"layout": "cube+seams", "align": True, "blend": "taper", "rotate_normals": True, "turn_upward": True},
    "views12": {"layout": "icosahedron", "align": False, "blend": "taper", "rotate_normals": True,
                "turn_upward": False},
    "naive": {"layout": "cube", "align": False, "blend": "nearest", "rotate_normals": False, "turn_upward": False},
}
SYNC = ("none", "shared_noise")

PredictFn = Callable[..., torch.Tensor]


@dataclass
class PanoPrediction:
    """Result of :func:`predict_panorama` for ``B`` panoramas of ``H×W`` and ``V`` views of ``h×w``.

    ``distance [B,1,H,W]``: ray distance, relative (one global scale is unknown; NaN where no view says
    anything); ``depth [B,1,H,W]``: the projection's depth (= distance for equirectangular, the horizontal
    distance for cylindrical); ``normals [B,3,H,W]`` unit, in the panorama's per-pixel tangent frame (x right,
    y up, z towards the viewer; the pack's world renderer's convention) or ``None``; ``view_rgb [V,B,3,h,w]``,
    ``view_depth [V,B,1,h,w]``, ``view_normals``: what each view saw and predicted; ``alignments``: one
    :class:`~.align.Alignment` per panorama (``None`` without alignment); ``views``, ``grid``.
    """

    distance: torch.Tensor
    depth: torch.Tensor
    normals: Optional[torch.Tensor]
    view_rgb: torch.Tensor
    view_depth: torch.Tensor
    view_normals: Optional[torch.Tensor]
    alignments: list
    views: list
    grid: PanoGrid
    settings: dict = field(default_factory=dict)


def method_layout(grid: PanoGrid, method: str = "aligned", layout: Optional[str] = None) -> str:
    """The layout ``method`` splits ``grid`` into: ``layout`` if given, else the method's own; always the ``ring``
    of level views for a cylinder."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    if grid.kind == "cylindrical":
        return "ring"
    return layout or METHODS[method]["layout"]


def shared_noise(grid: PanoGrid, views: Sequence[View], shape: tuple[int, int, int], seed: int = 0,
                 factor: int = 8) -> torch.Tensor:
    """Initial latents ``[V, C, h/f, w/f]`` drawn once on the sphere: one Gaussian field on a panorama grid at
    the views' latent resolution, read by every view at its latent pixels' directions (nearest), so
    overlapping views start from the same noise where they overlap."""
    C, hl, wl = shape
    v0 = views[0]
    rad_per_px = math.radians(v0.fov_deg) / v0.width * factor
    W = max(8, int(round(grid.span / rad_per_px)))
    H = max(4, int(round(W * grid.height / grid.width)))
    g = grid.scaled(H, W)
    field_ = torch.randn((1, C, H, W), generator=torch.Generator("cpu").manual_seed(int(seed)))
    out = []
    for v in views:
        lv = View(v.azimuth_deg, v.elevation_deg, v.fov_deg, hl, wl)
        out.append(pano_to_view(field_, g, lv, mode="nearest")[0])
    return torch.stack(out)


def predict_panorama(
    pano: torch.Tensor,
    grid: PanoGrid,
    depth_fn: PredictFn,
    normals_fn: Optional[PredictFn] = None,
    *,
    method: str = "aligned",
    layout: Optional[str] = None,
    fov_deg: float = 90.0,
    view_size: int = 0,
    count: int = 0,
    convention: str = "depth",
    robust: bool = True,
    trim: float = 3.0,
    turn_upward: Optional[bool] = None,
    align_pixels: int = 1 << 13,
    sync: str = "none",
    seed: int = 0,
    latent_shape: Optional[Callable[[int, int], tuple]] = None,
    batch: int = 0,
    check: Optional[Callable[[], None]] = None,
) -> PanoPrediction:
    """Depth (and normals) of ``pano [B,3,H,W]`` in [0, 1] on ``grid``.

    Args:
        depth_fn: ``depth_fn(images [N,3,h,w], latents=None) → [N,1,h,w]`` affine-invariant depth in [0, 1]
            (near = small for ``convention="depth"``, near = large for ``"disparity"``).
        normals_fn: ``normals_fn(images) → [N,3,h,w]`` unit normals in each view's camera frame (x right,
            y up, z towards the viewer), or ``None``.
        method: one of :data:`METHODS` (``layout`` overrides its layout).
        fov_deg, view_size, count: the views (:func:`~.views.make_views`).
        robust, trim: the alignment's outlier rejection (:func:`~.align.solve_alignment`).
        align_pixels: the alignment runs on a copy of the grid with about this many pixels.
        turn_upward: (default: the method's; on for ``aligned``) show views that look up (elevation between 0 and 89°) to the predictors upside down and
            turn their predictions back (normals: x and y negated). Predictors learn from pictures taken at
            or below the horizon that lower in the picture is nearer; a view of the ceiling has it the other
            way round. Measured on the default family: ``docs/quality.md``.
        sync: ``"none"`` or ``"shared_noise"`` — every view starts from one noise field drawn on the sphere
            (:func:`shared_noise`; needs ``latent_shape(h, w) → (C, h_l, w_l)`` and a ``depth_fn`` that takes
            ``latents [N,C,h_l,w_l]``).
        batch: views per ``depth_fn`` call (0 = all).
        check: called between stages; raise from it to cancel.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {tuple(METHODS)}, got {method!r}")
    if sync not in SYNC:
        raise ValueError(f"sync must be one of {SYNC}, got {sync!r}")
    if pano.ndim != 4 or pano.shape[1] != 3:
        raise ValueError(f"expected panoramas [B,3,H,W], got {tuple(pano.shape)}")
    cfg = dict(METHODS[method], layout=method_layout(grid, method, layout))
    if turn_upward is not None:
        cfg["turn_upward"] = bool(turn_upward)
    turn_upward = cfg["turn_upward"]
    check = check or (lambda: None)
    B = pano.shape[0]
    views = make_views(grid, cfg["layout"], fov_deg, view_size, count)
    V = len(views)
    rgb = torch.stack([pano_to_view(pano.float(), grid, v) for v in views]).clamp(0, 1)   # [V,B,3,h,w]
    h, w = rgb.shape[-2:]
    flat = rgb.reshape(V * B, 3, h, w)
    latents = None
    if sync == "shared_noise":
        if latent_shape is None:
            raise ValueError("sync 'shared_noise' needs latent_shape")
        z = shared_noise(grid, views, latent_shape(h, w), seed)                      # [V,C,hl,wl]
        latents = z[:, None].expand(V, B, *z.shape[1:]).reshape(V * B, *z.shape[1:])
    n = int(batch) or V * B

    # views looking up (not the zenith) are shown to the predictor upside down: monocular predictors learn
    # "lower in the picture = nearer" from views of the ground, which a view of the ceiling contradicts
    up = torch.tensor([turn_upward and v.looks_up for v in views for _ in range(B)])
    if up.any():
        flat = flat.clone()
        flat[up] = torch.flip(flat[up], dims=(-2, -1))

    def run(fn, want_latents, normals=False):
        outs = []
        for k in range(0, V * B, n):
            check()
            if want_latents and latents is not None:
                outs.append(fn(flat[k:k + n], latents=latents[k:k + n]).float().cpu())
            else:
                outs.append(fn(flat[k:k + n]).float().cpu())
        out = torch.cat(outs)
        if up.any():         # turned back; a normal seen upside down has its x and y negated
            out[up] = torch.flip(out[up], dims=(-2, -1))
            if normals:
                out[up, :2] = -out[up, :2]
        return out

    vd = run(depth_fn, True)
    vd = vd.reshape(V, B, 1, *vd.shape[-2:])
    if tuple(vd.shape[-2:]) != (h, w):
        vd = F.interpolate(vd.flatten(0, 1), size=(h, w), mode="bilinear", align_corners=False).reshape(V, B, 1, h, w)
    vn = None
    if normals_fn is not None:
        vn = run(normals_fn, False, normals=True).reshape(V, B, 3, h, w)
    check()

    # alignment on a smaller copy of the grid
    alignments = [None] * B
    if cfg["align"]:
        k = max(1.0, math.sqrt(grid.height * grid.width / max(int(align_pixels), 64)))
        ag = grid.scaled(max(2, int(round(grid.height / k))), max(4, int(round(grid.width / k))))
        places = views_on_pano(ag, views)
        cos = torch.stack([p.cos.double() for p in places]).flatten(1)
        wt = torch.stack([p.weight.double() for p in places]).flatten(1)
        for bi in range(B):
            p = torch.stack([pl.sample(vd[vi, bi:bi + 1])[0, 0] for vi, pl in enumerate(places)]).double().flatten(1)
            a, bb = view_coefficients(p, cos, convention)
            alignments[bi] = solve_alignment(a, bb, wt, robust=robust, trim=trim)
            check()

    # merge on the full grid, one view at a time
    dirs = grid.directions()
    num = torch.zeros(B, 1, grid.height, grid.width, dtype=torch.float64)
    den = torch.zeros(B, 1, grid.height, grid.width, dtype=torch.float64)
    best = torch.full((grid.height, grid.width), -1.0, dtype=torch.float64)
    nnum = torch.zeros(B, 3, grid.height, grid.width, dtype=torch.float64) if vn is not None else None
    for vi, v in enumerate(views):
        pl = view_on_pano(grid, v, dirs)
        p = pl.sample(vd[vi])[:, :1].double()                                           # [B,1,H,W]
        if cfg["align"]:
            s = torch.tensor([al.scale[vi] for al in alignments], dtype=torch.float64).reshape(B, 1, 1, 1)
            t = torch.tensor([al.shift[vi] for al in alignments], dtype=torch.float64).reshape(B, 1, 1, 1)
        else:
            s, t = 1.0, 0.0
        r = common_quantity(p, pl.cos.double()[None, None], s, t, convention)
        ok = torch.isfinite(r).double()
        if cfg["blend"] == "nearest":
            win = pl.inside & (pl.weight.double() > best)
            best = torch.where(win, pl.weight.double(), best)
            m = win.double()[None, None]
            num = num * (1 - m) + torch.nan_to_num(r) * m
            den = den * (1 - m) + ok * m
        else:
            wgt = pl.weight.double()[None, None] * ok
            num += torch.nan_to_num(r) * wgt
            den += wgt
        if vn is not None:
            nv = pl.sample(vn[vi]).double()
            if cfg["rotate_normals"]:
                nv = torch.einsum("ij,bjhw->bihw", v.rotation, nv)
            if cfg["blend"] == "nearest":
                nnum = nnum * (1 - m) + nv * m
            else:
                nnum += nv * pl.weight.double()[None, None]
        check()
    dist = torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))
    depth = dist * grid.depth_factor()[None, None]
    normals = None
    if nnum is not None:
        nrm = nnum / nnum.norm(dim=1, keepdim=True).clamp_min(1e-12)
        # into the per-pixel tangent frame of the world renderer's panorama camera
        normals = (normals_to_camera(nrm, grid.camera()) if cfg["rotate_normals"] else nrm).float()
    settings = {"method": method, "layout": cfg["layout"], "fov_deg": float(fov_deg), "views": V,
                "view_size": [h, w], "convention": convention, "robust": bool(robust), "turn_upward": bool(turn_upward),
                "sync": sync}
    return PanoPrediction(dist.float(), depth.float(), normals, rgb, vd, vn, alignments, views, grid, settings)


def normalised_depth_image(distance: torch.Tensor) -> torch.Tensor:
    """``[B,1,H,W]`` relative distance → ``[0, 1]`` divided by each image's maximum (ratios kept: with near 0
    and far 1, RGBD to Mesh rebuilds the merged geometry up to scale); NaN → 1 (far)."""
    d = distance.clone()
    peak = torch.nan_to_num(d, nan=0.0).flatten(1).amax(1).clamp_min(1e-12).reshape(-1, 1, 1, 1)
    return torch.nan_to_num(d / peak, nan=1.0).clamp(0, 1)
