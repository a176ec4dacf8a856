"""RGB-D → triangle mesh / point cloud (perspective, cylindrical panorama, equirectangular sphere).

Every pixel centre of a ``h×w`` grid becomes one vertex; each 2×2 block of valid neighbours becomes two
triangles (index arithmetic, no per-pixel Python). Triangles whose depths jump by more than a relative
threshold are cut, so foreground and background are not joined by "rubber sheets".

Coordinate frame (glTF): **X right, Y up, the camera at the origin looking along −Z**, right-handed.
Triangles wind counter-clockwise as seen from the camera, so their normals face the camera.

Depth meaning per projection (the value ``d`` of a pixel after :func:`depth_from_map`):

* ``perspective`` — ``d`` is the camera-space distance along the optical axis: the vertex has ``z = −d``
  (kornia :func:`~kornia.geometry.depth.depth_to_3d_v2` does the pinhole unprojection). The horizontal
  field of view spans the outer edges of the image; pixel ``(u, v)`` has its centre at ``u, v``
  (integers) with the principal point at ``((W−1)/2, (H−1)/2)``, so ``fx = fy = W / (2·tan(fov/2))``.
* ``cylindrical`` — ``d`` is the horizontal distance to the vertical axis (the cylinder radius). Column
  ``u`` has azimuth ``θ = (u − (W−1)/2)·span/W`` (θ = 0 looks along −Z, positive to the right); the
  vertical axis uses the same pixels-per-radian ``f = W/span``: ``y = −(v − (H−1)/2)·d/f``. A 360° span
  closes the seam (triangles between column ``W−1`` and column 0).
* ``equirectangular`` — ``d`` is the Euclidean distance from the centre. Longitude
  ``θ = (u − (W−1)/2)·2π/W``, latitude ``φ = −(v − (H−1)/2)·π/H``; the seam is always closed. The two
  poles keep a hole of half a pixel row (no pole caps).

The map can be depth or disparity (JointNet's official mesh script reads its dense map as disparity:
``depth = 1 / (v·scale + shift)``); see :func:`depth_from_map`. Pixels whose depth is NaN, ±inf or
``≤ 0`` are dropped, together with every triangle that touches them.

Vertex colours are the image's values as stored (sRGB, what viewers expect in practice).
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ._deps import require

log = logging.getLogger(__name__)

PROJECTIONS = ("perspective", "cylindrical", "equirectangular")
DEPTH_KINDS = ("depth", "disparity")
FORMATS = ("glb", "ply", "obj", "pointcloud_ply")
COLOR_MODES = ("vertex", "texture", "none")

#: Estimated peak bytes per grid vertex while building and writing a mesh (torch intermediates, int64
#: faces, trimesh's float64 copies, normals and the serialised buffer). Measured peak is lower; this is
#: the conservative figure the memory guard uses.
BYTES_PER_VERTEX = 320
DEFAULT_MAX_BYTES = 4 * 1024**3

NO_VALID_PIXEL = ("no valid depth pixel: every depth value is NaN, infinite or ≤ 0 after the depth/disparity "
                  "mapping — check depth_kind, near/far or scale/shift")
NO_TRIANGLE = ("no triangle left (too few valid neighbouring pixels, or every triangle was cut at a depth "
               "discontinuity): raise discontinuity_threshold, lower downsample, or write a point cloud instead")


@dataclass
class RGBDMesh:
    """One mesh built from one RGB-D pair.

    Attributes:
        vertices: ``[N, 3]`` float32 positions (glTF frame), all finite.
        faces: ``[F, 3]`` indices into ``vertices`` (counter-clockwise seen from the camera): int32 (half the
            memory of int64; every file format stores 32-bit indices) unless there are 2³¹ vertices or more.
        colors: ``[N, 3]`` float32 colours in 0–1 (the image averaged over the grid cell).
        uv: ``[N, 2]`` float32 texture coordinates into ``texture`` (OpenGL convention: ``v`` up).
        texture: ``[3, H, W]`` float32 full-resolution image the ``uv`` point into.
        pixel_index: ``[N]`` int64 flat index ``row·w + col`` of each vertex in the ``grid_size`` grid.
        grid_size: ``(h, w)`` of the vertex grid (after down-sampling).
        depth: ``[N]`` float32 depth value of each vertex (meaning depends on the projection).
    """

    vertices: torch.Tensor
    faces: torch.Tensor
    colors: torch.Tensor
    uv: torch.Tensor
    texture: torch.Tensor
    pixel_index: torch.Tensor
    grid_size: tuple[int, int]
    depth: torch.Tensor

    @property
    def is_empty(self) -> bool:
        return self.vertices.shape[0] == 0

    def compact(self) -> "RGBDMesh":
        """The same mesh without vertices that no face uses (isolated valid pixels)."""
        n = self.vertices.shape[0]
        used = torch.zeros(n, dtype=torch.bool)
        for a in range(0, self.faces.shape[0], CHUNK):  # (index_fill_ takes int64 indices only)
            used.index_fill_(0, self.faces[a:a + CHUNK].reshape(-1).long(), True)
        if bool(used.all()):
            return self
        keep = torch.nonzero(used).reshape(-1)
        remap = torch.cumsum(used, 0, dtype=self.faces.dtype) - 1
        faces = torch.empty_like(self.faces)
        for a in range(0, faces.shape[0], CHUNK):
            faces[a:a + CHUNK] = remap[self.faces[a:a + CHUNK]]

        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, keep)
        return RGBDMesh(
            vertices=pick(self.vertices), faces=faces, colors=pick(self.colors), uv=pick(self.uv),
            texture=self.texture, pixel_index=pick(self.pixel_index), grid_size=self.grid_size,
            depth=pick(self.depth),
        )


# ---- depth values ------------------------------------------------------------------------------------

def depth_from_map(values: torch.Tensor, kind: str = "depth", scale: float = 1.0, shift: float = 0.0,
                   near: Optional[float] = None, far: Optional[float] = None) -> torch.Tensor:
    """Turn a depth or disparity map into depth.

    * ``kind="depth"``: ``depth = v·scale + shift``.
    * ``kind="disparity"``: ``depth = 1 / (v·scale + shift)`` (JointNet's official mesh script).
    * ``near``/``far`` (both or neither) replace ``scale``/``shift`` so that a 0–1 map spans
      ``[near, far]``: depth maps 0 → near, 1 → far; disparity maps 1 → near, 0 → far (linear in 1/depth).

    Args:
        values: map of any shape.
    Returns:
        Depth of the same shape; invalid pixels (NaN, ±inf, ``≤ 0``, zero disparity) are NaN.
    """
    if kind not in DEPTH_KINDS:
        raise ValueError(f"depth kind must be one of {DEPTH_KINDS}, got {kind!r}")
    if (near is None) != (far is None):
        raise ValueError("give both near and far (or neither)")
    if near is not None:
        if (scale, shift) != (1.0, 0.0):
            raise ValueError("give either near/far or scale/shift, not both")
        near, far = float(near), float(far)
        if not (math.isfinite(near) and math.isfinite(far)) or far <= near or near < 0 or \
                (kind == "disparity" and near <= 0):
            raise ValueError(f"need 0 {'<' if kind == 'disparity' else '<='} near < far (finite), "
                             f"got near={near}, far={far}")
        if kind == "depth":
            scale, shift = far - near, near
        else:
            scale, shift = 1.0 / near - 1.0 / far, 1.0 / far
    v = values.float() * float(scale) + float(shift)
    d = 1.0 / v if kind == "disparity" else v
    return torch.where(torch.isfinite(d) & (d > 0), d, torch.full_like(d, float("nan")))


# ---- unprojection -----------------------------------------------------------------------------------

def perspective_intrinsics(height: int, width: int, fov_deg: float) -> torch.Tensor:
    """``[3, 3]`` pinhole matrix with horizontal field of view ``fov_deg`` across the image edges."""
    if not (0.0 < fov_deg < 180.0):
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    f = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return torch.tensor([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]],
                        dtype=torch.float64)


def scale_intrinsics(K: torch.Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> torch.Tensor:
    """Intrinsics ``[3, 3]`` for the same camera sampled on a ``dst_hw`` grid (pixel centres kept)."""
    sy, sx = dst_hw[0] / src_hw[0], dst_hw[1] / src_hw[1]
    K = K.double().clone()
    K[0, 0] *= sx
    K[1, 1] *= sy
    K[0, 1] *= sx
    K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5
    K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5
    return K


def _pixel_grid(rows: tuple[int, int], w: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates ``u`` (column) and ``v`` (row) of rows ``r0 ≤ v < r1`` of a ``w``-wide grid,
    ``[r1 − r0, w]`` each (broadcast views: only the band's rows, never the whole grid)."""
    r0, r1 = rows
    u = torch.arange(w, device=device, dtype=dtype)[None, :].expand(r1 - r0, w)
    v = torch.arange(r0, r1, device=device, dtype=dtype)[:, None].expand(r1 - r0, w)
    return u, v


def unproject(depth: torch.Tensor, projection: str = "perspective", *, fov_deg: float = 60.0,
              intrinsics: Optional[torch.Tensor] = None, horizontal_span_deg: float = 180.0,
              rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Per-pixel 3-D points (glTF frame) of a depth map.

    Args:
        depth: ``[h, w]`` depth (meaning per projection: see the module docstring). Must be finite where
            the result is used; invalid pixels may hold any finite placeholder.
        projection: one of :data:`PROJECTIONS`.
        fov_deg: horizontal field of view of the perspective camera (ignored when ``intrinsics`` given).
        intrinsics: ``[3, 3]`` pinhole matrix for this ``h×w`` grid (OpenCV convention, pixels).
        horizontal_span_deg: azimuth range of a cylindrical panorama, in ``(0, 360]``.
        rows: ``(r0, r1)``: only the points of rows ``r0 ≤ r < r1`` of the grid (the camera is still the whole
            ``h×w`` grid's), for building large meshes in bands.
    Returns:
        ``[h, w, 3]`` (or ``[r1 − r0, w, 3]``) float32 points.
    """
    h, w = depth.shape
    r0, r1 = (0, h) if rows is None else (int(rows[0]), int(rows[1]))
    d = depth[r0:r1].double()
    if projection == "perspective":
        from kornia.geometry.depth import depth_to_3d_v2

        K = perspective_intrinsics(h, w, fov_deg) if intrinsics is None else intrinsics.double()
        if K.shape != (3, 3):
            raise ValueError(f"intrinsics must be a [3,3] matrix, got {tuple(K.shape)}")
        if r0:
            K = K.clone()
            K[1, 2] -= r0  # the band's own principal point
        p = depth_to_3d_v2(d, K[None].to(d.device))[0]  # OpenCV camera frame: x right, y down, z forward
        return torch.stack([p[..., 0], -p[..., 1], -p[..., 2]], -1).float()
    u, v = _pixel_grid((r0, r1), w, d.device, torch.float64)
    if projection == "cylindrical":
        span = math.radians(_check_span(horizontal_span_deg))
        f = w / span
        theta = (u - (w - 1) / 2.0) / f
        return torch.stack([d * torch.sin(theta), -(v - (h - 1) / 2.0) / f * d, -d * torch.cos(theta)], -1).float()
    if projection == "equirectangular":
        theta = (u - (w - 1) / 2.0) * (2 * math.pi / w)
        phi = -(v - (h - 1) / 2.0) * (math.pi / h)
        c = torch.cos(phi)
        return torch.stack([d * c * torch.sin(theta), d * torch.sin(phi), -d * c * torch.cos(theta)], -1).float()
    raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")


def _check_span(span_deg: float) -> float:
    if not (0.0 < float(span_deg) <= 360.0):
        raise ValueError(f"horizontal_span_deg must be in (0, 360], got {span_deg}")
    return float(span_deg)


def wraps_around(projection: str, horizontal_span_deg: float = 180.0) -> bool:
    """Whether the last column is joined to the first (360° cylinder, every equirectangular map)."""
    return projection == "equirectangular" or (projection == "cylindrical" and
                                               abs(_check_span(horizontal_span_deg) - 360.0) < 1e-6)


# ---- faces ------------------------------------------------------------------------------------------

def grid_faces(h: int, w: int, wrap: bool = False) -> torch.Tensor:
    """Two triangles per 2×2 pixel block of an ``h×w`` grid (flat indices ``row·w + col``).

    Quad ``a=(r,c), b=(r+1,c), c=(r,c+1), d=(r+1,c+1)`` → ``(a, b, c)`` and ``(c, b, d)``: counter-clockwise
    as seen from the camera (columns go right, rows go down). With ``wrap`` the column after ``w−1`` is 0.

    Returns:
        ``[2·(h−1)·(w−1 or w), 3]`` int64.
    """
    idx = torch.arange(h * w, dtype=torch.int64).view(h, w)
    if wrap:
        idx = torch.cat([idx, idx[:, :1]], 1)
    a, b = idx[:-1, :-1], idx[1:, :-1]
    c, d = idx[:-1, 1:], idx[1:, 1:]
    t1 = torch.stack([a, b, c], -1).reshape(-1, 3)
    t2 = torch.stack([c, b, d], -1).reshape(-1, 3)
    return torch.cat([t1, t2], 0)


def _quad_corners(x: torch.Tensor, wrap: bool) -> tuple[torch.Tensor, ...]:
    """Corners ``a, b, c, d`` (see :func:`grid_faces`) of every quad of an ``[h, w]`` grid, as views."""
    if wrap:
        x = torch.cat([x, x[:, :1]], 1)
    return x[:-1, :-1], x[1:, :-1], x[:-1, 1:], x[1:, 1:]


def grid_face_keep(valid: torch.Tensor, depth: torch.Tensor, threshold: float, wrap: bool = False) -> torch.Tensor:
    """Which faces of :func:`grid_faces` to keep: all three corners valid and, if ``threshold > 0``, the
    relative depth spread ``(max − min) / min`` of the triangle ``≤ threshold`` (the discontinuity cut).

    Works on the pixel grid (shifted slices, no gather over faces).

    Args:
        valid: ``[h, w]`` bool.
        depth: ``[h, w]`` positive where valid (any finite value elsewhere).
        threshold: relative jump; ``≤ 0`` disables cutting.
        wrap: as in :func:`grid_faces`.
    Returns:
        ``[F]`` bool in the order of ``grid_faces(h, w, wrap)``.
    """
    k1, k2 = _face_keep_pair(valid, depth, threshold, wrap)
    return torch.cat([k1.reshape(-1), k2.reshape(-1)])


def _face_keep_pair(valid: torch.Tensor, depth: torch.Tensor, threshold: float, wrap: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`grid_face_keep` per quad, ``[h−1, w−1 (or w)]`` for the first and the second triangle."""
    va, vb, vc, vd = _quad_corners(valid, wrap)
    k1, k2 = va & vb & vc, vc & vb & vd
    if threshold > 0:
        da, db, dc, dd = _quad_corners(depth, wrap)
        bc_lo, bc_hi = torch.minimum(db, dc), torch.maximum(db, dc)
        lo1, hi1 = torch.minimum(bc_lo, da), torch.maximum(bc_hi, da)
        lo2, hi2 = torch.minimum(bc_lo, dd), torch.maximum(bc_hi, dd)
        k1 = k1 & ((hi1 - lo1) <= threshold * lo1)
        k2 = k2 & ((hi2 - lo2) <= threshold * lo2)
    return k1, k2


#: pixels per band when a mesh is built in row bands (Cancel is checked between bands); the float64
#: temporaries of a band (12 MiB at most) stay below the size glibc maps fresh for every call (32 MiB)
BAND_PIXELS = 1 << 19
#: rows per block in the per-vertex / per-face passes: big enough to amortise the calls, small enough (≤ 24 MiB a
#: temporary) that the allocator reuses the memory instead of mapping and faulting in fresh pages each time
#: (which made a 4096×2048 mesh cost twice a 2048×512 one per pixel)
CHUNK = 1 << 20


def index_dtype(n: int) -> torch.dtype:
    """int32 for indices below 2³¹ (half the memory of int64), else int64."""
    return torch.int32 if n < 2**31 else torch.int64


def _kept_faces(valid: torch.Tensor, depth: torch.Tensor, threshold: float, wrap: bool, remap: torch.Tensor,
                tick: Callable[[], None]) -> torch.Tensor:
    """``remap[grid_faces(h, w, wrap)[grid_face_keep(...)]]`` built in row bands (same faces, same order: every
    first triangle of the grid, then every second one), without materialising the whole face grid: the keep
    masks of every band are found first, then each band's corners are written straight into the output."""
    h, w = valid.shape
    band = max(1, BAND_PIXELS // max(w, 1))
    bands, n_first, n_second = [], 0, 0
    for q0 in range(0, h - 1, band):
        tick()
        q1 = min(h - 1, q0 + band)  # quads q0 ≤ q < q1 use pixel rows q0 … q1
        k1, k2 = _face_keep_pair(valid[q0:q1 + 1], depth[q0:q1 + 1], threshold, wrap)
        c1, c2 = int(k1.sum()), int(k2.sum())
        bands.append((q0, q1, k1, k2, n_first, n_second, c1, c2))
        n_first, n_second = n_first + c1, n_second + c2
    out = torch.empty(n_first + n_second, 3, dtype=remap.dtype)
    for q0, q1, k1, k2, o1, o2, c1, c2 in bands:
        tick()
        idx = remap[q0 * w:(q1 + 1) * w].view(q1 + 1 - q0, w)
        a, b, c, d = _quad_corners(idx, wrap)
        for k, corners, o, cnt in ((k1, (a, b, c), o1, c1), (k2, (c, b, d), n_first + o2, c2)):
            dst = out[o:o + cnt]
            for j, x in enumerate(corners):
                dst[:, j] = x[k]
    return out


# ---- input handling ---------------------------------------------------------------------------------

def estimate_mesh_bytes(height: int, width: int, downsample: int = 1, per_vertex: int = BYTES_PER_VERTEX) -> int:
    """Conservative peak memory (bytes) for building and writing one mesh of an image this size (``per_vertex``:
    :data:`BYTES_PER_VERTEX` in memory, :data:`jointcore.mesh_grid.BYTES_PER_VERTEX` written from the grid)."""
    h, w = _grid_size(height, width, downsample)
    return h * w * per_vertex


def _grid_size(height: int, width: int, downsample: int) -> tuple[int, int]:
    return max(1, height // downsample), max(1, width // downsample)


def _suggest_downsample(height: int, width: int, downsample: int, max_bytes: int,
                        per_vertex: int = BYTES_PER_VERTEX) -> int:
    k = max(1, downsample)
    while estimate_mesh_bytes(height, width, k, per_vertex) > max_bytes and k < max(height, width):
        k += 1
    return k


def _as_batch(image: torch.Tensor, depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"image must be [3,H,W] or [B,3,H,W] (RGB, channels first), got {tuple(image.shape)}")
    if depth.ndim == 2:
        depth = depth[None]
    if depth.ndim == 4:
        if depth.shape[1] != 1:
            raise ValueError(f"depth must have one channel ([B,1,H,W]); got {tuple(depth.shape)} — "
                             "take one channel or the channel mean first")
        depth = depth[:, 0]
    if depth.ndim != 3:
        raise ValueError(f"depth must be [H,W], [B,H,W] or [B,1,H,W], got {tuple(depth.shape)}")
    bi, bd = image.shape[0], depth.shape[0]
    if bi != bd:
        if bi != 1 and bd != 1:
            raise ValueError(f"image batch {bi} and depth batch {bd} differ: give equal batches or one of them 1")
        b = max(bi, bd)
        image, depth = image.expand(b, -1, -1, -1), depth.expand(b, -1, -1)
    return image, depth


def _resize_masked(x: torch.Tensor, valid: torch.Tensor, size: tuple[int, int], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``x [C,H,W]`` ignoring invalid pixels; a pixel stays valid only if its whole support was."""
    from kornia.geometry.transform import resize

    wgt = valid.to(x.dtype)[None]
    num = torch.where(valid[None], x, torch.zeros_like(x)) * wgt
    if mode == "area":
        num_r = F.interpolate(num[None], size=size, mode="area")[0]
        wgt_r = F.interpolate(wgt[None], size=size, mode="area")[0]
    else:
        num_r = resize(num, size, interpolation="bilinear", align_corners=False)
        wgt_r = resize(wgt, size, interpolation="bilinear", align_corners=False)
    ok = wgt_r[0] > 1.0 - 1e-4
    return num_r / wgt_r.clamp_min(1e-12), ok


# ---- the builder ------------------------------------------------------------------------------------

def _checked_inputs(image, depth, projection: str, fov_deg: float, intrinsics, horizontal_span_deg: float,
                    downsample, max_bytes: int, per_vertex: int):
    """Validate the mesh inputs; ``(image [B,3,H,W], depth [B,H',W'], vertex grid (h, w), wrap)``. Raises
    ``ValueError`` naming the input, and for a grid over ``max_bytes`` (at ``per_vertex`` bytes a vertex) the
    ``downsample`` that fits."""
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if projection == "cylindrical":
        _check_span(horizontal_span_deg)
    if projection == "perspective" and intrinsics is None:
        perspective_intrinsics(2, 2, fov_deg)  # validates fov
    if int(downsample) != downsample or downsample < 1:
        raise ValueError(f"downsample must be an integer ≥ 1, got {downsample}")
    downsample = int(downsample)
    if not torch.is_tensor(image) or not torch.is_tensor(depth):
        raise ValueError("image and depth must be torch tensors")
    image, depth = _as_batch(image, depth)
    B, _, H, W = image.shape
    need = estimate_mesh_bytes(H, W, downsample, per_vertex)
    if need > max_bytes:
        k = _suggest_downsample(H, W, downsample, max_bytes, per_vertex)
        raise ValueError(
            f"a mesh of {H}x{W} pixels with downsample={downsample} needs about {need / 2**30:.2f} GiB "
            f"(limit {max_bytes / 2**30:.2f} GiB, about {per_vertex} bytes per vertex): set "
            f"downsample={k} (or more), use a smaller image, or raise the memory limit (max_memory_gb on the node, "
            "max_bytes here) if you have the RAM")
    h, w = _grid_size(H, W, downsample)
    return image, depth, (h, w), wraps_around(projection, horizontal_span_deg) and w > 2


@dataclass
class _Grid:
    """One RGB-D pair prepared for triangulation on its ``h×w`` vertex grid (see :func:`_prepare_grid`)."""

    img: torch.Tensor  # [3, h, w] colours 0-1 on the vertex grid
    texture: torch.Tensor  # [3, H, W] the full-resolution image (0-1)
    dsafe: torch.Tensor  # [h, w] depth, 1 where invalid
    valid: torch.Tensor  # [h, w] bool: finite positive depth and finite point
    pts: torch.Tensor  # [h, w, 3] float32 points (glTF frame)


def _prepare_grid(image: torch.Tensor, depth: torch.Tensor, grid: tuple[int, int], *, projection: str, fov_deg: float,
                  intrinsics, horizontal_span_deg: float, depth_kind: str, scale: float, shift: float, near, far,
                  resize_depth: bool, tick: Callable[[], None]) -> _Grid:
    """Depth mapping, resizing, validity and unprojection of one ``[3,H,W]`` image and its depth map, in row bands
    (Cancel between them); shared by :func:`rgbd_to_mesh` and :func:`jointcore.mesh_grid.grid_mesh`."""
    H, W = image.shape[-2:]
    h, w = grid
    band = max(1, BAND_PIXELS // max(w, 1))
    tick()
    img = image.float().cpu()
    tick()  # every full-size step below is followed by a check: fresh pages of a large image are slow
    src = depth.cpu()
    dm = torch.empty(src.shape, dtype=torch.float32)
    rows = max(1, BAND_PIXELS // max(src.shape[-1], 1))
    for r0 in range(0, src.shape[0], rows):  # in row bands, Cancel between them
        dm[r0:r0 + rows] = depth_from_map(src[r0:r0 + rows], depth_kind, scale, shift, near, far)
        tick()
    valid = torch.isfinite(dm)
    if dm.shape != (H, W):
        if not resize_depth:
            raise ValueError(f"depth map is {tuple(dm.shape)} but the image is {(H, W)}: resize it to "
                             "the image size (or allow resize_depth)")
        if abs(dm.shape[0] / dm.shape[1] - H / W) > 0.01 * H / W:
            log.warning("depth map %s and image %s have different aspect ratios; stretching the depth",
                        tuple(dm.shape), (H, W))
        dm, valid = _resize_masked(dm[None], valid, (H, W), "bilinear")
        dm = dm[0]
    tick()
    img = torch.nan_to_num(img, nan=0.0, posinf=1.0, neginf=0.0).clamp_(0, 1)
    tick()
    texture = img
    if (h, w) != (H, W):
        dm, valid = _resize_masked(dm[None], valid, (h, w), "area")
        dm = dm[0]
        img = F.interpolate(img[None], size=(h, w), mode="area")[0]
    valid = valid & torch.isfinite(dm) & (dm > 0)
    tick()
    dsafe = torch.where(valid, dm, torch.ones_like(dm))
    tick()

    K = None
    if intrinsics is not None:
        K = scale_intrinsics(torch.as_tensor(intrinsics), (H, W), (h, w))
    pts = torch.empty(h, w, 3)
    for r0 in range(0, h, band):  # in row bands: Cancel is checked between them
        tick()
        r1 = min(h, r0 + band)
        pts[r0:r1] = unproject(dsafe, projection, fov_deg=fov_deg, intrinsics=K,
                               horizontal_span_deg=horizontal_span_deg, rows=(r0, r1))
        valid[r0:r1] &= torch.isfinite(pts[r0:r1]).all(-1)
    tick()
    return _Grid(img=img, texture=texture, dsafe=dsafe, valid=valid, pts=pts)


def rgbd_to_mesh(
    image: torch.Tensor,
    depth: torch.Tensor,
    *,
    projection: str = "perspective",
    fov_deg: float = 60.0,
    intrinsics: Optional[torch.Tensor] = None,
    horizontal_span_deg: float = 180.0,
    depth_kind: str = "depth",
    scale: float = 1.0,
    shift: float = 0.0,
    near: Optional[float] = None,
    far: Optional[float] = None,
    discontinuity_threshold: float = 0.1,
    downsample: int = 1,
    resize_depth: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
    check: Optional[Callable[[], None]] = None,
) -> list[RGBDMesh]:
    """Build one mesh per batch item from an RGB image and a depth/disparity map.

    Args:
        image: ``[3, H, W]`` or ``[B, 3, H, W]`` float RGB in 0–1.
        depth: ``[H', W']``, ``[B, H', W']`` or ``[B, 1, H', W']`` depth or disparity map (a batch of 1 on
            either side is broadcast). A different size is resized to ``H×W`` (bilinear, invalid pixels
            excluded; a warning is logged if the aspect ratio differs) unless ``resize_depth=False``,
            which raises instead.
        projection: ``"perspective"``, ``"cylindrical"`` or ``"equirectangular"``.
        fov_deg: horizontal field of view (perspective).
        intrinsics: optional ``[3, 3]`` pinhole matrix in pixels of the ``H×W`` image (overrides fov).
        horizontal_span_deg: azimuth range of a cylindrical panorama (360 closes the seam).
        depth_kind, scale, shift, near, far: see :func:`depth_from_map`.
        discontinuity_threshold: cut triangles whose relative depth spread exceeds this (``≤ 0``: never).
        downsample: integer factor; the vertex grid is ``(H//k) × (W//k)`` (area-averaged colours and
            depths), the UV texture keeps the full resolution.
        resize_depth: resize a depth map of another size (else raise).
        max_bytes: memory guard; raises ``ValueError`` with the estimate and a ``downsample`` that fits.
        check: called between the stages of each item (depth, resize, unprojection, faces); raise from it to
            stop (Cancel).
    Returns:
        ``B`` :class:`RGBDMesh` (possibly empty when no pixel is valid; writing an empty one raises).
    """
    image, depth, (h, w), wrap = _checked_inputs(image, depth, projection, fov_deg, intrinsics, horizontal_span_deg,
                                                 downsample, max_bytes, BYTES_PER_VERTEX)
    B = image.shape[0]
    tick = check if check is not None else (lambda: None)

    meshes = []
    for i in range(B):  # per batch item, not per pixel
        g = _prepare_grid(image[i], depth[i], (h, w), projection=projection, fov_deg=fov_deg, intrinsics=intrinsics,
                          horizontal_span_deg=horizontal_span_deg, depth_kind=depth_kind, scale=scale, shift=shift,
                          near=near, far=far, resize_depth=resize_depth, tick=tick)
        valid, dsafe, pts, img, texture = g.valid, g.dsafe, g.pts, g.img, g.texture
        vflat = valid.reshape(-1)
        dflat = dsafe.reshape(-1)
        remap = torch.cumsum(vflat, 0, dtype=index_dtype(vflat.numel())) - 1
        faces = _kept_faces(valid, dsafe, discontinuity_threshold, wrap, remap, tick)
        tick()
        pix = torch.nonzero(vflat).reshape(-1)
        del remap
        n = pix.shape[0]
        vertices, uv, colors = torch.empty(n, 3), torch.empty(n, 2), torch.empty(n, 3)
        vdepth = torch.empty(n)
        flat_pts, flat_img = pts.reshape(-1, 3), img.reshape(3, -1)
        for a in range(0, n, CHUNK):  # in blocks (small temporaries; Cancel between them)
            tick()
            p = pix[a:a + CHUNK]
            torch.index_select(flat_pts, 0, p, out=vertices[a:a + CHUNK])
            colors[a:a + CHUNK] = flat_img.index_select(1, p).T  # (index_select into a transposed out is slow)
            torch.index_select(dflat, 0, p, out=vdepth[a:a + CHUNK])
            pixel_uv(p // w, p % w, (h, w), out=uv[a:a + CHUNK])
        del pts, g
        tick()
        meshes.append(RGBDMesh(
            vertices=vertices, faces=faces, colors=colors, uv=uv, texture=texture, pixel_index=pix,
            grid_size=(h, w), depth=vdepth,
        ))
    return meshes


# ---- trimesh / files --------------------------------------------------------------------------------

def pixel_uv(row: torch.Tensor, col: torch.Tensor, grid: tuple[int, int], out: Optional[torch.Tensor] = None
             ) -> torch.Tensor:
    """Texture coordinates ``[..., 2]`` float32 of grid pixels ``(row, col)`` (integer tensors of one shape) of an
    ``h×w`` grid: the pixel centres, OpenGL convention (``v`` up), written into ``out`` if given."""
    h, w = grid
    if out is None:
        out = torch.empty(*row.shape, 2)
    out[..., 0] = col.float().add_(0.5).div_(w)
    out[..., 1] = row.float().add_(0.5).div_(-h).add_(1.0)
    return out


def _to_uint8(colors: torch.Tensor) -> "np.ndarray":
    import numpy as np

    out = np.full((colors.shape[0], 4), 255, np.uint8)
    for a in range(0, colors.shape[0], CHUNK):
        out[a:a + CHUNK, :3] = (colors[a:a + CHUNK].clamp(0, 1) * 255.0).round_().to(torch.uint8).numpy()
    return out


def texture_image(texture: torch.Tensor):
    """``[3, H, W]`` 0–1 → PIL RGB image."""
    from PIL import Image

    arr = (texture.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(arr, "RGB")


def texture_png(texture: torch.Tensor) -> bytes:
    """``[3, H, W]`` 0–1 → PNG bytes (fast compression: the texture of a large mesh is big)."""
    import io

    buf = io.BytesIO()
    texture_image(texture).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted unit vertex normals ``[N, 3]`` (sum of the adjacent faces' cross products).

    Vertices without a face get ``(0, 0, 1)``.
    """
    v = vertices.float()
    n = torch.zeros_like(v)
    for a in range(0, faces.shape[0], CHUNK):  # in blocks: the temporaries stay small and are reused
        f = faces[a:a + CHUNK].long()  # (index_add_ is several times slower with int32 indices)
        p0 = v.index_select(0, f[:, 0])
        fn = torch.linalg.cross(v.index_select(0, f[:, 1]) - p0, v.index_select(0, f[:, 2]) - p0)  # 2·area·normal
        for k in range(3):
            n.index_add_(0, f[:, k], fn)
    for a in range(0, n.shape[0], CHUNK):
        blk = n[a:a + CHUNK]
        length = blk.norm(dim=1, keepdim=True)
        zero = length[:, 0] == 0
        blk /= length.clamp_min_(1e-30)
        blk[zero] = torch.tensor([0.0, 0.0, 1.0], dtype=v.dtype)
    return n


def to_trimesh(mesh: RGBDMesh, color: str = "vertex", point_cloud: bool = False, normals: bool = True):
    """A ``trimesh.Trimesh`` (or ``trimesh.PointCloud``) with vertex colours, a UV texture or no colour.

    With ``normals`` the vertex normals are computed here (vectorised torch, much faster than trimesh's
    on large grids) and handed to trimesh.
    """
    trimesh = require("trimesh", "Writing mesh files")

    if color not in COLOR_MODES:
        raise ValueError(f"color must be one of {COLOR_MODES}, got {color!r}")
    v = mesh.vertices.double().numpy()
    if point_cloud:
        return trimesh.PointCloud(v, colors=_to_uint8(mesh.colors) if color != "none" else None)
    f = mesh.faces.numpy()
    vn = vertex_normals(mesh.vertices, mesh.faces).double().numpy() if normals and f.shape[0] else None
    if color == "texture":
        visual = trimesh.visual.TextureVisuals(uv=mesh.uv.double().numpy(), image=texture_image(mesh.texture))
        return trimesh.Trimesh(v, f, vertex_normals=vn, visual=visual, process=False, validate=False)
    vc = _to_uint8(mesh.colors) if color == "vertex" else None
    return trimesh.Trimesh(v, f, vertex_normals=vn, vertex_colors=vc, process=False, validate=False)


def unique_path(path: Union[str, os.PathLike], companions: Sequence[str] = ()) -> str:
    """``path`` if free, else ``<stem>_0001<ext>``, ``<stem>_0002<ext>``… — the first name that is free.

    ``companions`` are extra extensions (e.g. ``(".mtl", ".png")``) whose files next to the chosen name
    must be free too. Never returns an existing path (the writer still opens with ``"xb"``).
    """
    path = os.fspath(path)
    stem, ext = os.path.splitext(path)

    def free(s: str) -> bool:
        return not any(os.path.lexists(s + e) for e in (ext, *companions))

    if free(stem):
        return path
    n = 1
    while not free(f"{stem}_{n:04d}"):
        n += 1
    return f"{stem}_{n:04d}{ext}"


def _write_new(path: str, data: bytes) -> None:
    with open(path, "xb") as fh:  # "x": fails instead of overwriting
        fh.write(data)


def export_mesh(mesh: RGBDMesh, path: Union[str, os.PathLike], file_format: Optional[str] = None, *,
                color: str = "vertex", normals: bool = True, check: Optional[Callable[[], None]] = None
                ) -> list[str]:
    """Write ``mesh`` to a new file (never overwrites: a taken name gets a ``_0001`` suffix).

    Args:
        mesh: from :func:`rgbd_to_mesh`.
        path: target path; its extension is replaced by the format's.
        file_format: ``"glb"``, ``"ply"``, ``"obj"`` or ``"pointcloud_ply"`` (default: from the extension).
        color: ``"vertex"`` colours, ``"texture"`` (UV + full-resolution image; GLB and OBJ only — PLY falls
            back to vertex colours), or ``"none"``.
        normals: include vertex normals (GLB, PLY, OBJ meshes).
        check: called between the pieces of the file (Cancel); a cancelled file is removed.

    Every format is written directly from the arrays (:mod:`jointcore.mesh_io`, linear in the size).
    Returns:
        The written paths; the first is the mesh (OBJ textures add ``.mtl`` and ``.png`` beside it).
    """
    stem, fmt = _file_target(path, file_format, color)
    if mesh.is_empty:
        raise ValueError(NO_VALID_PIXEL)
    point_cloud = fmt == "pointcloud_ply"
    if not point_cloud:
        mesh = mesh.compact()
        if mesh.faces.shape[0] == 0:
            raise ValueError(NO_TRIANGLE)
    return _write_unique(stem, fmt, _file_arrays(mesh, fmt, file_color(fmt, color), normals, check), check)


def file_color(fmt: str, color: str) -> str:
    """The colour mode a file of format ``fmt`` gets for the requested ``color``: PLY has no texture, so
    ``"texture"`` falls back to ``"vertex"`` there."""
    return "vertex" if fmt in ("ply", "pointcloud_ply") and color == "texture" else color


def _file_target(path: Union[str, os.PathLike], file_format: Optional[str], color: str) -> tuple[str, str]:
    """``(path without extension, format)`` of a mesh file to write; ``ValueError`` for an unknown format or
    colour mode."""
    stem, ext = os.path.splitext(os.fspath(path))
    fmt = file_format or ext.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"file format must be one of {FORMATS}, got {fmt!r}")
    if color not in COLOR_MODES:
        raise ValueError(f"color must be one of {COLOR_MODES}, got {color!r}")
    return stem, fmt


def _write_unique(stem: str, fmt: str, arrays: dict, check: Optional[Callable[[], None]]) -> list[str]:
    """Write ``arrays`` (the :mod:`jointcore.mesh_io` writers' inputs) to a new file named after ``stem``: the
    format's extension, a ``_0001``… suffix where that name (or a textured OBJ's ``.mtl``/``.png``) is taken."""
    dirname = os.path.dirname(stem)
    if dirname:
        os.makedirs(dirname, exist_ok=True)
    out_ext = ".ply" if fmt == "pointcloud_ply" else "." + fmt
    companions = (".mtl", ".png") if fmt == "obj" and arrays["png"] is not None else ()
    while True:
        target = unique_path(stem + out_ext, companions)
        try:
            return _write_files(fmt, arrays, target, check)
        except FileExistsError:  # lost a race for the name: pick the next one
            continue


def _file_arrays(mesh: RGBDMesh, fmt: str, color: str, normals: bool, check) -> dict:
    """The arrays the :mod:`jointcore.mesh_io` writers take (and the texture PNG for ``color="texture"``);
    ``color`` as :func:`file_color` gives it."""
    tick = check or (lambda: None)
    out = {"vertices": mesh.vertices.float().numpy(), "faces": None, "normals": None, "colors": None, "uv": None,
           "png": None}
    if fmt != "pointcloud_ply":
        out["faces"] = mesh.faces.numpy()
        tick()
        if normals:
            out["normals"] = vertex_normals(mesh.vertices, mesh.faces).numpy()
            tick()
    if color == "vertex":
        out["colors"] = _to_uint8(mesh.colors)
    elif color == "texture":
        out["uv"], out["png"] = mesh.uv.float().numpy(), texture_png(mesh.texture)
    tick()
    return out


def _write_files(fmt: str, arrays: dict, target: str, check: Optional[Callable[[], None]]) -> list[str]:
    """Stream the file (and, for a textured OBJ, its ``.mtl`` and ``.png``) into new files; on any error, Cancel
    included, the files this call created are removed (a taken companion name raises FileExistsError: the
    caller picks the next name)."""
    from . import mesh_io

    a = arrays
    stem = os.path.splitext(target)[0]
    base = os.path.basename(stem)
    companions = fmt == "obj" and a["png"] is not None
    paths = [target] + ([stem + ".mtl", stem + ".png"] if companions else [])
    written: list[str] = []
    try:
        with open(target, "xb") as fh:  # "x": fails instead of overwriting
            written.append(target)
            if fmt == "glb":
                mesh_io.write_glb(fh, a["vertices"], a["faces"], a["normals"], a["colors"], a["uv"], a["png"],
                                  check=check)
            elif fmt == "obj":
                mesh_io.write_obj(fh, a["vertices"], a["faces"], a["normals"], a["colors"], a["uv"],
                                  mtllib=base + ".mtl" if companions else None, check=check)
            else:
                mesh_io.write_ply(fh, a["vertices"], a["faces"], a["normals"], a["colors"], check=check)
        if companions:
            for p, data in ((paths[1], mesh_io.mtl_text("rgbd", base + ".png")), (paths[2], a["png"])):
                _write_new(p, data)
                written.append(p)
    except BaseException:
        for p in written:
            os.remove(p)
        raise
    return paths
