"""Mesh files written straight from the pixel grid, without building the mesh's arrays in memory.

:func:`jointcore.mesh.rgbd_to_mesh` returns the mesh as flat arrays (positions, faces, colours, UVs, then normals
and a compacted copy for the file): a peak of about 100 bytes per pixel when a file is written, 3 GiB for an
8192×4096 panorama, most of it fresh memory the system has to fault in. A mesh of an image is fully described by
its grid: the points, which pixels are valid and which of each quad's two triangles survive the discontinuity cut.
:class:`GridMesh` keeps only that (a peak of about 40 bytes per pixel with the file's blocks in flight, measured
by ``bench/bench_perf.py --only mesh``) and hands the file writers (:mod:`jointcore.mesh_io`) *row sources*: objects that
produce any block of the vertex or face arrays on demand, from the grid rows it covers, in the writers' usual
block size. The file is the one :func:`jointcore.mesh.export_mesh` writes for the same input (same vertex and face
order, the unused vertices left out); the normals agree to float rounding (the same face normals summed in
another order).

A vertex is a valid pixel that some kept triangle uses (every valid pixel for a point cloud), numbered in raster
order; the faces are every quad's first triangle in raster order, then every second one (:func:`grid_faces`).
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Union

import numpy as np
import torch

from . import mesh as M
from .mesh_io import RowSource

#: Estimated peak bytes per grid vertex when a mesh file is written from the grid (the prepared grid: colours,
#: depth, validity, points; the keep masks; the blocks in flight), beyond the image and depth map as given. The
#: memory guard's figure for :func:`export_rgbd_mesh`; the bench measures 36–47 from 4096×2048 up (more per pixel
#: only on small images, where fixed costs dominate).
BYTES_PER_VERTEX = 64


class GridMesh:
    """The mesh of one prepared RGB-D grid (:func:`jointcore.mesh._prepare_grid`), as its grid.

    Attributes:
        n_vertices, n_faces: counts of the mesh as written (unused valid pixels left out).
        vertices, normals, colors, uv, faces: :class:`~jointcore.mesh_io.RowSource` ``[N,3]`` float32,
            ``[N,3]`` float32, ``[N,4]`` uint8, ``[N,2]`` float32 (OpenGL ``v`` up), ``[F,3]`` int32/int64.
    """

    def __init__(self, grid: "M._Grid", threshold: float, wrap: bool, point_cloud: bool = False,
                 tick: Optional[Callable[[], None]] = None):
        tick = tick or (lambda: None)
        self.pts, self.img, self.texture, self.wrap = grid.pts, grid.img, grid.texture, wrap
        valid = grid.valid
        h, w = valid.shape
        self.h, self.w = h, w
        band = max(1, M.BAND_PIXELS // max(w, 1))
        wq = w if wrap else w - 1  # quads per row
        hq = max(h - 1, 0)
        if point_cloud:
            self.k1 = self.k2 = torch.zeros(hq, max(wq, 0), dtype=torch.bool)
            used = valid
        else:
            self.k1 = torch.empty(hq, max(wq, 0), dtype=torch.bool)
            self.k2 = torch.empty_like(self.k1)
            mark = torch.zeros(h, w + (1 if wrap else 0), dtype=torch.bool)  # (the wrapped column folded below)
            for q0 in range(0, hq, band):
                tick()
                q1 = min(hq, q0 + band)  # quads q0 ≤ q < q1 use pixel rows q0 … q1
                k1, k2 = M._face_keep_pair(valid[q0:q1 + 1], grid.dsafe[q0:q1 + 1], threshold, wrap)
                self.k1[q0:q1], self.k2[q0:q1] = k1, k2
                either = k1 | k2
                # corners: first triangle (a, b, c), second (c, b, d) of quad a=(q,c) b=(q+1,c) c=(q,c+1) d=(q+1,c+1)
                mark[q0:q1, :-1] |= k1
                mark[q0 + 1:q1 + 1, :-1] |= either
                mark[q0:q1, 1:] |= either
                mark[q0 + 1:q1 + 1, 1:] |= k2
            if wrap:
                mark[:, 0] |= mark[:, w]
            used = mark[:, :w]
        self.used = used
        self.n_valid = int(valid.sum())
        counts = used.sum(1)
        self.row_start = torch.zeros(h + 1, dtype=torch.int64)
        torch.cumsum(counts, 0, out=self.row_start[1:])
        self.n_vertices = int(self.row_start[-1])
        self.index_dtype = M.index_dtype(self.n_vertices)
        self.f_start = []
        for k in (self.k1, self.k2):
            s = torch.zeros(hq + 1, dtype=torch.int64)
            if hq:
                torch.cumsum(k.sum(1), 0, out=s[1:])
            self.f_start.append(s)
        self.n_first = int(self.f_start[0][-1])
        self.n_faces = self.n_first + int(self.f_start[1][-1])
        tick()
        lo = torch.full((3,), float("inf"))
        hi = torch.full((3,), float("-inf"))
        for r0 in range(0, h, band):
            tick()
            p = self.pts[r0:r0 + band][used[r0:r0 + band]]
            if p.shape[0]:
                lo = torch.minimum(lo, p.amin(0))
                hi = torch.maximum(hi, p.amax(0))
        self.vertices = _VertexRows(self, 3, np.float32, self._positions, bounds=(lo.numpy(), hi.numpy()))
        self.normals = _VertexRows(self, 3, np.float32, self._normals)
        self.colors = _VertexRows(self, 4, np.uint8, self._colors, to_numpy=M._to_uint8)
        self.uv = _VertexRows(self, 2, np.float32, self._uv)
        self.faces = _FaceRows(self, (self.n_faces, 3))

    # ---- per-pixel data of grid rows r0 ≤ r < r1: [r1 - r0, w, C] ----------------------------------------
    def _positions(self, r0: int, r1: int) -> torch.Tensor:
        return self.pts[r0:r1]

    def _colors(self, r0: int, r1: int) -> torch.Tensor:
        return self.img[:, r0:r1].permute(1, 2, 0)  # 0-1; to RGBA bytes by mesh._to_uint8, as the in-memory path

    def _uv(self, r0: int, r1: int) -> torch.Tensor:
        row = torch.arange(r0, r1)[:, None].expand(r1 - r0, self.w)
        return M.pixel_uv(row, torch.arange(self.w).expand(r1 - r0, self.w), (self.h, self.w))

    def _normals(self, r0: int, r1: int) -> torch.Tensor:
        """Area-weighted unit normals (:func:`jointcore.mesh.vertex_normals`): the sum of the cross products of
        the kept triangles around each pixel, from the quads of rows ``r0 − 1 … r1 − 1``."""
        h, w, wrap = self.h, self.w, self.wrap
        qa, qb = max(r0 - 1, 0), min(r1, h - 1)
        acc = torch.zeros(qb + 1 - qa, w + (1 if wrap else 0), 3)  # pixel rows qa … qb
        if qb > qa:
            a, b, c, d = M._quad_corners(self.pts[qa:qb + 1], wrap)
            k1, k2 = self.k1[qa:qb, :, None], self.k2[qa:qb, :, None]
            zero = torch.zeros((), dtype=a.dtype)
            n1 = torch.where(k1, torch.linalg.cross(b - a, c - a), zero)  # first triangle (a, b, c)
            n2 = torch.where(k2, torch.linalg.cross(b - c, d - c), zero)  # second triangle (c, b, d)
            both = n1 + n2
            acc[:-1, :-1] += n1
            acc[1:, :-1] += both
            acc[:-1, 1:] += both
            acc[1:, 1:] += n2
        if wrap:
            acc[:, 0] += acc[:, w]
            acc = acc[:, :w]
        out = acc[r0 - qa:r1 - qa]
        length = out.norm(dim=-1, keepdim=True)
        zero = length[..., 0] == 0
        out = out / length.clamp_min(1e-30)
        out[zero] = torch.tensor([0.0, 0.0, 1.0])
        return out

    def _index_rows(self, r0: int, r1: int) -> torch.Tensor:
        """``[r1 − r0, w]`` vertex index of each pixel of rows ``r0 … r1 − 1`` (meaningful where used)."""
        u = self.used[r0:r1]
        return (torch.cumsum(u, 1) - 1 + self.row_start[r0:r1, None]).to(self.index_dtype)


class _VertexRows(RowSource):
    """Rows ``[a, b)`` of a per-vertex array, from the grid rows those vertices lie in."""

    def __init__(self, gm: GridMesh, width: int, dtype, per_pixel, bounds=None, to_numpy=None):
        super().__init__((gm.n_vertices, width), dtype, bounds)
        self.gm, self.per_pixel = gm, per_pixel
        self.to_numpy = to_numpy or (lambda t: t.numpy())

    def rows(self, a: int, b: int) -> np.ndarray:
        gm = self.gm
        rs = gm.row_start.numpy()
        r0 = int(np.searchsorted(rs, a, "right")) - 1
        r1 = int(np.searchsorted(rs, b - 1, "right"))
        data = self.per_pixel(r0, r1)[gm.used[r0:r1]]
        off = a - int(rs[r0])
        return self.to_numpy(data[off:off + (b - a)])


class _FaceRows(RowSource):
    """Rows ``[a, b)`` of the face array: every quad's kept first triangle in raster order, then every second."""

    def __init__(self, gm: GridMesh, shape):
        super().__init__(shape, np.dtype(np.int32 if gm.index_dtype == torch.int32 else np.int64))
        self.gm = gm

    def rows(self, a: int, b: int) -> np.ndarray:
        gm = self.gm
        parts = []
        for second, (lo, hi) in enumerate(((a, min(b, gm.n_first)), (max(a, gm.n_first) - gm.n_first,
                                                                     b - gm.n_first))):
            if hi > lo:
                parts.append(self._region(lo, hi, bool(second)))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _region(self, a: int, b: int, second: bool) -> np.ndarray:
        gm = self.gm
        fs = gm.f_start[int(second)].numpy()
        q0 = int(np.searchsorted(fs, a, "right")) - 1
        q1 = int(np.searchsorted(fs, b - 1, "right"))
        idx = gm._index_rows(q0, q1 + 1)
        qa, qb, qc, qd = M._quad_corners(idx, gm.wrap)
        k = (gm.k2 if second else gm.k1)[q0:q1]
        corners = (qc, qb, qd) if second else (qa, qb, qc)
        out = torch.stack([x[k] for x in corners], 1)
        off = a - int(fs[q0])
        return out[off:off + (b - a)].numpy()


def grid_mesh(image: torch.Tensor, depth: torch.Tensor, *, point_cloud: bool = False, projection: str = "perspective",
              fov_deg: float = 60.0, intrinsics: Optional[torch.Tensor] = None, horizontal_span_deg: float = 180.0,
              depth_kind: str = "depth", scale: float = 1.0, shift: float = 0.0, near: Optional[float] = None,
              far: Optional[float] = None, discontinuity_threshold: float = 0.1, downsample: int = 1,
              resize_depth: bool = True, max_bytes: int = M.DEFAULT_MAX_BYTES,
              check: Optional[Callable[[], None]] = None) -> GridMesh:
    """The :class:`GridMesh` of one RGB-D pair; arguments as :func:`jointcore.mesh.rgbd_to_mesh` (one item: an
    image ``[3,H,W]`` or ``[1,3,H,W]``), the memory guard at :data:`BYTES_PER_VERTEX`."""
    image, depth, grid, wrap = M._checked_inputs(image, depth, projection, fov_deg, intrinsics, horizontal_span_deg,
                                                 downsample, max_bytes, BYTES_PER_VERTEX)
    if image.shape[0] != 1:
        raise ValueError(f"grid_mesh builds one mesh: got a batch of {image.shape[0]} images")
    tick = check or (lambda: None)
    g = M._prepare_grid(image[0], depth[0], grid, projection=projection, fov_deg=fov_deg, intrinsics=intrinsics,
                        horizontal_span_deg=horizontal_span_deg, depth_kind=depth_kind, scale=scale, shift=shift,
                        near=near, far=far, resize_depth=resize_depth, tick=tick)
    return GridMesh(g, discontinuity_threshold, wrap, point_cloud=point_cloud, tick=tick)


def export_rgbd_mesh(image: torch.Tensor, depth: torch.Tensor, path: Union[str, os.PathLike],
                     file_format: Optional[str] = None, *, color: str = "vertex", normals: bool = True,
                     check: Optional[Callable[[], None]] = None, **mesh_args) -> list[str]:
    """Build the mesh of one RGB-D pair and write it to a new file (never overwrites), from the grid.

    The file equals ``export_mesh(rgbd_to_mesh(image, depth, **mesh_args)[0], path, ...)``'s (normals to float
    rounding) at less than half the memory (about 40 bytes per pixel instead of 100). Arguments as :func:`jointcore.mesh.export_mesh` and ``mesh_args`` as
    :func:`grid_mesh`. Returns the written paths (the mesh first).
    """
    stem, fmt = M._file_target(path, file_format, color)
    point_cloud = fmt == "pointcloud_ply"
    gm = grid_mesh(image, depth, point_cloud=point_cloud, check=check, **mesh_args)
    if gm.n_valid == 0:
        raise ValueError(M.NO_VALID_PIXEL)
    if not point_cloud and gm.n_faces == 0:
        raise ValueError(M.NO_TRIANGLE)
    color = M.file_color(fmt, color)
    arrays = {"vertices": gm.vertices, "faces": None if point_cloud else gm.faces,
              "normals": gm.normals if normals and not point_cloud else None, "colors": None, "uv": None,
              "png": None}
    if color == "vertex":
        arrays["colors"] = gm.colors
    elif color == "texture":
        arrays["uv"], arrays["png"] = gm.uv, M.texture_png(gm.texture)
    return M._write_unique(stem, fmt, arrays, check)
