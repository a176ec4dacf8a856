"""Panorama grids, perspective views on the sphere, and exact resampling between them.

Conventions are the pack's (:mod:`jointcore.mesh`, :mod:`jointcore.data.world`): the panorama frame has x
right, y up and the centre column looking along −Z.

* **equirectangular** ``H×W``: column ``u`` has azimuth ``θ = (u − (W−1)/2)·2π/W`` (positive to the right),
  row ``v`` latitude ``φ = −(v − (H−1)/2)·π/H``; direction ``(cos φ sin θ, sin φ, −cos φ cos θ)``. Its depth
  is the ray distance.
* **cylindrical** ``H×W`` spanning ``span`` degrees (360 = a closed cylinder) with square pixels at the horizon
  (``f = W/span`` pixels per radian): column ``u`` has azimuth ``θ = (u − (W−1)/2)/f``, row ``v`` the height
  ``y = −(v − (H−1)/2)/f`` on the unit-radius cylinder. Its depth is the horizontal distance to the axis.

A :class:`View` is a pinhole camera at the panorama's centre, rotated ``Ry(yaw)·Rx(pitch)`` (yaw positive
turns left, so a view looking at azimuth ``θ`` has ``yaw = −θ``), x right, y up, looking along −Z, with its
horizontal field of view spanning the outer pixel edges (``f = w / (2 tan(fov/2))``, principal point at the
image centre). Its depth is the planar depth along its axis; its normals are in its camera frame.

Resampling is :func:`torch.nn.functional.grid_sample` at exactly projected coordinates (bilinear, or nearest
for labels); the 0/360° seam is sampled across by padding the panorama with its own opposite columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..data.world_camera import Camera, cylindrical, equirectangular, perspective

KINDS = ("equirectangular", "cylindrical")
LAYOUTS = ("cube+seams", "cube", "icosahedron", "fibonacci", "ring")


# ---- the panorama -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PanoGrid:
    """The pixel grid of an equirectangular or cylindrical panorama (see the module docstring)."""

    kind: str
    height: int
    width: int
    span_deg: float = 360.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"panorama projection must be one of {KINDS}, got {self.kind!r}")
        if self.height < 2 or self.width < 4:
            raise ValueError(f"panorama of {self.width}×{self.height} px is too small (need at least 4×2)")
        if not (0.0 < float(self.span_deg) <= 360.0):
            raise ValueError(f"horizontal span must be in (0, 360] degrees, got {self.span_deg}")

    @property
    def span(self) -> float:
        return 2 * math.pi if self.kind == "equirectangular" else math.radians(self.span_deg)

    @property
    def wraps(self) -> bool:
        return self.kind == "equirectangular" or abs(self.span_deg - 360.0) < 1e-9

    @property
    def max_tan_elevation(self) -> float:
        """Largest ``tan(elevation)`` the grid covers (``inf`` for equirectangular images)."""
        if self.kind == "equirectangular":
            return math.inf
        return (self.height / 2) / (self.width / self.span)

    def scaled(self, height: int, width: int) -> "PanoGrid":
        return PanoGrid(self.kind, int(height), int(width), self.span_deg)

    def camera(self) -> Camera:
        """The world renderer's camera of this grid at the origin, looking along −Z (its pixel geometry)."""
        if self.kind == "equirectangular":
            return equirectangular(self.height, self.width, (0.0, 0.0, 0.0))
        return cylindrical(self.height, self.width, (0.0, 0.0, 0.0), span_deg=self.span_deg)

    def azimuths(self) -> torch.Tensor:
        """``[W]`` azimuth of each column (radians, float64)."""
        return self.camera().azimuths()

    def directions(self) -> torch.Tensor:
        """``[H, W, 3]`` unit ray directions through the pixel centres (panorama frame, float64)."""
        return self.camera().local_dirs()[0]

    def depth_factor(self) -> torch.Tensor:
        """``[H, W]`` depth / ray distance: 1 (equirectangular) or the horizontal component (cylindrical)."""
        return self.camera().depth_factor()[0]

    def pixel_coords(self, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pixel coordinates ``(u, v)`` (float, pixel centres at integers) of directions ``[..., 3]`` in the
        panorama frame and whether they fall inside the grid (half a pixel beyond the outer centres)."""
        x, y, z = dirs[..., 0], dirs[..., 1], dirs[..., 2]
        th = torch.atan2(x, -z)
        u = th * (self.width / self.span) + (self.width - 1) / 2.0
        if self.kind == "equirectangular":
            ph = torch.asin((y / dirs.norm(dim=-1)).clamp(-1, 1))
            v = -ph * (self.height / math.pi) + (self.height - 1) / 2.0
            inside = torch.ones_like(u, dtype=torch.bool)
        else:
            rho = torch.sqrt(x * x + z * z).clamp_min(1e-12)
            v = -(y / rho) * (self.width / self.span) + (self.height - 1) / 2.0
            inside = (v >= -0.5) & (v <= self.height - 0.5)
            if not self.wraps:
                inside &= (u >= -0.5) & (u <= self.width - 0.5)
        return u, v, inside


# ---- perspective views ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class View:
    """A pinhole camera at the panorama centre (see the module docstring); angles in degrees."""

    azimuth_deg: float
    elevation_deg: float
    fov_deg: float
    height: int
    width: int

    def __post_init__(self):
        if not (1.0 <= float(self.fov_deg) <= 170.0):
            raise ValueError(f"view field of view must be in [1, 170] degrees, got {self.fov_deg}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"view of {self.width}×{self.height} px is too small")

    @property
    def yaw_deg(self) -> float:
        return -float(self.azimuth_deg)

    @property
    def pitch_deg(self) -> float:
        return float(self.elevation_deg)

    @property
    def looks_up(self) -> bool:
        """Tilted up, but not at the zenith: the views :func:`~.merge.predict_panorama` shows upside down."""
        return 0.0 < float(self.elevation_deg) < 89.0

    @property
    def focal(self) -> float:
        return self.width / (2 * math.tan(math.radians(self.fov_deg) / 2))

    def camera(self) -> Camera:
        """The world renderer's perspective camera of this view at the origin."""
        return perspective(self.height, self.width, (0.0, 0.0, 0.0), self.yaw_deg, self.pitch_deg, fov_deg=self.fov_deg)

    @property
    def rotation(self) -> torch.Tensor:
        """``[3, 3]`` view → panorama frame (float64)."""
        return self.camera().rotation[0]

    def local_directions(self) -> torch.Tensor:
        """``[h, w, 3]`` unit rays through the pixel centres in the view's frame (float64)."""
        return self.camera().local_dirs()[0]

    def directions(self) -> torch.Tensor:
        """``[h, w, 3]`` the same rays in the panorama frame."""
        return self.local_directions() @ self.rotation.T

    def project(self, dirs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Panorama-frame directions ``[..., 3]`` → ``(x, y, cos, inside)``: pixel coordinates in this view,
        the cosine to its optical axis (planar depth = ray distance × cos) and whether the ray lands inside
        the image (its outer pixel edges, half a pixel beyond the outer centres)."""
        q = dirs @ self.rotation            # Rᵀ d, row-vector form
        c = -q[..., 2] / dirs.norm(dim=-1)
        front = c > 1e-6
        zc = torch.where(front, -q[..., 2], torch.ones_like(c))
        f = self.focal
        x = f * q[..., 0] / zc + (self.width - 1) / 2.0
        y = -f * q[..., 1] / zc + (self.height - 1) / 2.0
        inside = front & (x >= -0.5) & (x <= self.width - 0.5) & (y >= -0.5) & (y <= self.height - 0.5)
        return x, y, c, inside

    def taper(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Blending weight of pixel coordinates: ``(1 − |x̂|)(1 − |ŷ|)`` with ``x̂, ŷ ∈ [−1, 1]`` across the
        image — 1 at the centre, falling to 0 at the borders."""
        xn = (2 * x / max(self.width - 1, 1) - 1).abs()
        yn = (2 * y / max(self.height - 1, 1) - 1).abs()
        return ((1 - xn).clamp(0, 1) * (1 - yn).clamp(0, 1))


def world_cameras(views: Sequence[View], position=(0.0, 0.0, 0.0), yaw_deg: float = 0.0) -> Camera:
    """The views as one batch of the world renderer's perspective cameras at ``position``, the panorama turned by
    ``yaw_deg`` (a scene's ``pano_position`` / ``pano_yaw_deg``): what the views would see, rendered exactly."""
    return perspective(views[0].height, views[0].width, [tuple(position)] * len(views),
                       [yaw_deg + v.yaw_deg for v in views], [v.pitch_deg for v in views], fov_deg=views[0].fov_deg)


def _round8(x: float) -> int:
    return max(8, int(round(x / 8.0)) * 8)


def auto_view_size(grid: PanoGrid, fov_deg: float) -> int:
    """View width that keeps the panorama's angular resolution at the view centre, rounded to 8 px."""
    px_per_rad = grid.width / grid.span
    return _round8(2 * math.tan(math.radians(fov_deg) / 2) * px_per_rad)


def _fibonacci(n: int) -> list[tuple[float, float]]:
    """``n`` near-uniform directions on the sphere as (azimuth, elevation) in degrees."""
    golden = math.pi * (3 - math.sqrt(5))
    out = []
    for i in range(n):
        y = 1 - 2 * (i + 0.5) / n
        out.append((math.degrees((i * golden) % (2 * math.pi)) - 180.0, math.degrees(math.asin(y))))
    return out


def _icosahedron() -> list[tuple[float, float]]:
    """The 12 vertices of an icosahedron (MoGe's panorama split) as (azimuth, elevation) in degrees."""
    t = (1 + math.sqrt(5)) / 2
    pts = [(-1, t, 0), (1, t, 0), (-1, -t, 0), (1, -t, 0), (0, -1, t), (0, 1, t), (0, -1, -t), (0, 1, -t),
           (t, 0, -1), (t, 0, 1), (-t, 0, -1), (-t, 0, 1)]
    out = []
    for x, y, z in pts:
        n = math.sqrt(x * x + y * y + z * z)
        out.append((math.degrees(math.atan2(x, -z)), math.degrees(math.asin(y / n))))
    return out


def layout_angles(layout: str, count: int = 0) -> list[tuple[float, float]]:
    """View centres ``(azimuth, elevation)`` in degrees of a named layout.

    * ``cube``: the six cube faces.
    * ``cube+seams``: the cube faces, 4 views over the vertical edges (azimuth 45° + k·90°) and 8 over the
      edges to the top and bottom faces (elevation ±45° at azimuth k·90°) — 18 views, every cube seam
      inside a view.
    * ``icosahedron``: 12 views at the icosahedron's vertices (MoGe's panorama split).
    * ``fibonacci``: ``count`` near-uniform views.
    * ``ring``: ``count`` (default 8) level views, for cylindrical panoramas.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"view layout must be one of {LAYOUTS}, got {layout!r}")
    cube = [(a, 0.0) for a in (0.0, 90.0, 180.0, -90.0)] + [(0.0, 90.0), (0.0, -90.0)]
    if layout == "cube":
        return cube
    if layout == "cube+seams":
        return cube + [(a, 0.0) for a in (45.0, 135.0, -135.0, -45.0)] + \
            [(a, e) for e in (45.0, -45.0) for a in (0.0, 90.0, 180.0, -90.0)]
    if layout == "icosahedron":
        return _icosahedron()
    if layout == "fibonacci":
        if count < 2:
            raise ValueError(f"a fibonacci layout needs at least 2 views, got {count}")
        return _fibonacci(int(count))
    n = int(count) or 8
    return [(-180.0 + (k + 0.5) * 360.0 / n, 0.0) for k in range(n)]


def make_views(grid: PanoGrid, layout: str = "cube+seams", fov_deg: float = 90.0, view_size: int = 0,
               count: int = 0) -> list[View]:
    """The views of ``layout`` for ``grid``, each ``view_size`` px wide (0 = :func:`auto_view_size`).

    Cylindrical panoramas get level views (``ring``; ``count`` 0 = enough for half-overlapping neighbours over the
    span) as tall as the cylinder at the view centre, rounded up to 8 px (the few rows past its top and bottom
    edge repeat the edge row), so every panorama row is seen.
    """
    w = int(view_size) or auto_view_size(grid, fov_deg)
    if grid.kind == "cylindrical":
        if layout not in ("ring", "cube+seams"):
            raise ValueError(f"a cylindrical panorama is split into a 'ring' of level views, not {layout!r}")
        span = math.degrees(grid.span)
        step = fov_deg / 2
        n = int(count) or max(1, math.ceil((span if grid.wraps else max(span - fov_deg, 0.0)) / step) +
                              (0 if grid.wraps else 1))
        f = w / (2 * math.tan(math.radians(fov_deg) / 2))
        h = max(8, min(2 * w, -(-math.ceil(2 * f * grid.max_tan_elevation) // 8) * 8))
        if grid.wraps:
            az = [-180.0 + (k + 0.5) * 360.0 / n for k in range(n)]
        else:
            lo, hi = -span / 2 + fov_deg / 2, span / 2 - fov_deg / 2
            az = [0.0] if n == 1 or hi <= lo else [lo + k * (hi - lo) / (n - 1) for k in range(n)]
        return [View(a, 0.0, fov_deg, h, w) for a in az]
    return [View(a, e, fov_deg, w, w) for a, e in layout_angles(layout, count)]


# ---- resampling ---------------------------------------------------------------------------------------
def _grid_sample(img: torch.Tensor, x: torch.Tensor, y: torch.Tensor, mode: str) -> torch.Tensor:
    """Sample ``img [B,C,h,w]`` at pixel coordinates ``x, y [H', W']`` (align_corners semantics)."""
    h, w = img.shape[-2:]
    gx = 2 * x / max(w - 1, 1) - 1
    gy = 2 * y / max(h - 1, 1) - 1
    g = torch.stack([gx, gy], -1).to(img.dtype)[None].expand(img.shape[0], -1, -1, -1)
    return F.grid_sample(img, g, mode=mode, padding_mode="border", align_corners=True)


def pano_to_view(pano: torch.Tensor, grid: PanoGrid, view: View, mode: str = "bilinear") -> torch.Tensor:
    """``pano [B,C,H,W]`` → ``[B,C,h,w]`` as seen by ``view``. Rays outside a cylinder's height or span read
    its nearest edge pixel (views made by :func:`make_views` have none)."""
    if tuple(pano.shape[-2:]) != (grid.height, grid.width):
        raise ValueError(f"panorama is {pano.shape[-1]}×{pano.shape[-2]} px, its grid says {grid.width}×{grid.height}")
    u, v, _ = grid.pixel_coords(view.directions())
    if grid.wraps:      # read across the 0/360° seam: one column of the other side on each side
        src = torch.cat([pano[..., -1:], pano, pano[..., :1]], -1)
        return _grid_sample(src, u + 1, v, mode)
    return _grid_sample(pano, u, v, mode)


@dataclass
class ViewOnPano:
    """Where one view lands on the panorama grid: ``inside [H,W]`` bool, its pixel coordinates ``x, y`` and
    ``cos [H,W]`` (cosine to its axis), all float32; ``weight`` the blending taper (0 outside)."""

    inside: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    cos: torch.Tensor
    weight: torch.Tensor

    def sample(self, view_map: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """A view's ``[B,C,h,w]`` map on the panorama grid ``[B,C,H,W]`` (0 outside the view)."""
        out = _grid_sample(view_map.float(), self.x, self.y, mode)
        return out * self.inside.to(out.dtype)


def view_on_pano(grid: PanoGrid, view: View, dirs: torch.Tensor | None = None) -> ViewOnPano:
    d = grid.directions() if dirs is None else dirs
    x, y, c, inside = view.project(d)
    wgt = torch.where(inside, view.taper(x, y), torch.zeros_like(x))
    return ViewOnPano(inside, x.float(), y.float(), c.float(), wgt.float())


def views_on_pano(grid: PanoGrid, views: Sequence[View]) -> list[ViewOnPano]:
    d = grid.directions()
    return [view_on_pano(grid, v, d) for v in views]


def coverage(grid: PanoGrid, views: Sequence[View]) -> torch.Tensor:
    """``[H, W]`` number of views that see each panorama pixel."""
    return sum(p.inside.to(torch.int32) for p in views_on_pano(grid, views))
