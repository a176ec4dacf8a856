"""Vectorised ray casting of procedural-world scenes (see :mod:`jointcore.data.world` for conventions).

Scenes are packed into ``[B, 4]`` object-slot tensors (absent slots flagged). Every ray of every scene is
traced at once: a closed-form exit from the inside of the room box, and per object slot and primitive
kind (≤ 4 × 4 short Python iterations) a closed-form intersection for the scenes that hold that kind in
that slot. Shading is Lambertian with one point light, ambient and hard shadows (one vectorised shadow ray
per pixel against the objects; the convex room cannot shadow a light inside it). Colour maths is in
linear light; the output is gamma-encoded with a pure power 1/2.2 (so pure shading keeps HSV hue and
saturation exactly — :func:`jointcore.data.world.colour_present` relies on it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .world_camera import Camera
from .world_scene import (FLOOR_PALETTE, MAX_OBJECTS, OBJECT_KINDS, PALETTE, ROOM_PALETTE, TEXTURES, Scene)

GAMMA = 2.2
DARK = 0.45            # linear multiplier of a texture's darker cells (≈ 0.7 in sRGB; hue/saturation kept)
FALLOFF = 0.04         # light attenuation 1 / (1 + FALLOFF·dist²)
SHADOW_OFFSET = 1e-3   # shadow-ray origins are lifted this far (m) along the normal
_KIND_ID = {k: i for i, k in enumerate(OBJECT_KINDS)}
_TEX_ID = {k: i for i, k in enumerate(TEXTURES)}
_INF = float("inf")

# room surface ids in the ``surface`` output of the tracer
FLOOR, CEILING, WALL_X, WALL_Z = 0, 1, 2, 3


def srgb_to_linear(c):
    return c ** GAMMA


@dataclass
class Packed:
    """``B`` scenes as tensors (float32 unless noted); object slots ``[B, S]`` with ``S = 4``."""

    half: torch.Tensor          # [B, 3] room half extents (x, y, z) — y is height/2 (unused), x/z half sizes
    height: torch.Tensor        # [B]
    wall_rgb: torch.Tensor      # [B, 3] linear
    floor_rgb: torch.Tensor     # [B, 3]
    wall_tex: torch.Tensor      # [B] int64
    wall_cell: torch.Tensor     # [B]
    wall_axis: torch.Tensor     # [B] int64
    floor_tex: torch.Tensor
    floor_cell: torch.Tensor
    floor_axis: torch.Tensor
    present: torch.Tensor       # [B, S] bool
    kind: torch.Tensor          # [B, S] int64
    pos: torch.Tensor           # [B, S, 2] (x, z)
    cos: torch.Tensor           # [B, S]   cos(yaw)
    sin: torch.Tensor           # [B, S]
    size: torch.Tensor          # [B, S, 3]
    rgb: torch.Tensor           # [B, S, 3] linear
    tex: torch.Tensor           # [B, S] int64
    cell3: torch.Tensor         # [B, S, 3] texture cell per local axis (whole cells per dimension)
    sectors: torch.Tensor       # [B, S] angular cells of round objects' checker
    light: torch.Tensor         # [B, 3]
    intensity: torch.Tensor     # [B]
    ambient: torch.Tensor       # [B]


def _cells(obj) -> tuple[tuple[float, float, float], float]:
    sx, sy, sz = obj.size
    c = obj.cell
    n = lambda s: max(1, round(s / c))  # noqa: E731
    cell3 = (sx / n(sx), sy / n(sy), sz / n(sz))
    sectors = float(max(4, 2 * round(math.pi * 0.5 * sx / c))) if obj.kind != "box" else 1.0
    return cell3, sectors


def pack(scenes: Sequence[Scene]) -> Packed:
    """Tensors for :func:`trace` / :func:`shade` (a per-scene Python loop over plain numbers only)."""
    S = MAX_OBJECTS
    rows = []
    for sc in scenes:
        if len(sc.objects) > S:
            raise ValueError(f"a scene holds at most {S} objects, got {len(sc.objects)}")
        r = sc.room
        objs = []
        for k in range(S):
            if k < len(sc.objects):
                o = sc.objects[k]
                a = math.radians(o.yaw_deg)
                cell3, sectors = _cells(o)
                objs.append((1.0, float(_KIND_ID[o.kind]), o.position[0], o.position[1], math.cos(a), math.sin(a),
                             *o.size, *PALETTE[o.colour], float(_TEX_ID[o.texture]), *cell3, sectors))
            else:
                objs.append((0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 4.0))
        rows.append(((r.width / 2, r.height / 2, r.depth / 2, r.height, *ROOM_PALETTE[r.wall_colour],
                      *FLOOR_PALETTE[r.floor_colour], _TEX_ID[r.wall_texture], r.wall_cell, r.wall_stripe_axis,
                      _TEX_ID[r.floor_texture], r.floor_cell, r.floor_stripe_axis,
                      *sc.light.position, sc.light.intensity, sc.light.ambient), objs))
    g = torch.tensor([r[0] for r in rows], dtype=torch.float64).reshape(len(rows), 21)
    o = torch.tensor([r[1] for r in rows], dtype=torch.float64).reshape(len(rows), S, 17)
    f = lambda t: t.float().contiguous()  # noqa: E731
    return Packed(
        half=f(g[:, 0:3]), height=f(g[:, 3]), wall_rgb=f(srgb_to_linear(g[:, 4:7])),
        floor_rgb=f(srgb_to_linear(g[:, 7:10])), wall_tex=g[:, 10].long(), wall_cell=f(g[:, 11]),
        wall_axis=g[:, 12].long(), floor_tex=g[:, 13].long(), floor_cell=f(g[:, 14]), floor_axis=g[:, 15].long(),
        light=f(g[:, 16:19]), intensity=f(g[:, 19]), ambient=f(g[:, 20]),
        present=o[..., 0] > 0.5, kind=o[..., 1].long(), pos=f(o[..., 2:4]), cos=f(o[..., 4]), sin=f(o[..., 5]),
        size=f(o[..., 6:9]), rgb=f(srgb_to_linear(o[..., 9:12])), tex=o[..., 12].long(), cell3=f(o[..., 13:16]),
        sectors=f(o[..., 16]))


# ---- closed-form intersections (object-local frame: origin at the footprint centre on the floor) ------------
def _safe(d: torch.Tensor) -> torch.Tensor:
    """``d`` with magnitudes below 1e-12 replaced by ±1e-12 (sign kept; −0 counts as positive)."""
    tiny = torch.where(d < 0, torch.full_like(d, -1e-12), torch.full_like(d, 1e-12))
    return torch.where(d.abs() < 1e-12, tiny, d)


def _box(o, d, size, eps, want_n):
    ox, oy, oz = o
    dx, dy, dz = d
    hx, hy, hz = (size[:, i:i + 1] * 0.5 for i in range(3))
    oy = oy - hy

    def slab(oc, dc, h):
        inv = 1.0 / _safe(dc)
        a, b = (-h - oc) * inv, (h - oc) * inv
        return torch.minimum(a, b), torch.maximum(a, b)

    nx0, fx0 = slab(ox, dx, hx)
    ny0, fy0 = slab(oy, dy, hy)
    nz0, fz0 = slab(oz, dz, hz)
    tn = torch.maximum(torch.maximum(nx0, ny0), nz0)
    tf = torch.minimum(torch.minimum(fx0, fy0), fz0)
    t = torch.where((tn <= tf) & (tn > eps), tn, _INF)
    if not want_n:
        return t, None
    isx = nx0 >= tn
    isy = (ny0 >= tn) & ~isx
    isz = ~(isx | isy)
    z = torch.zeros_like(tn)
    return t, (torch.where(isx, -torch.sign(dx), z), torch.where(isy, -torch.sign(dy), z),
               torch.where(isz, -torch.sign(dz), z))


def _sphere(o, d, size, eps, want_n):
    ox, oy, oz = o
    dx, dy, dz = d
    r = size[:, 0:1] * 0.5
    oy = oy - r
    b = ox * dx + oy * dy + oz * dz
    c = ox * ox + oy * oy + oz * oz - r * r
    disc = b * b - c
    t = -b - torch.sqrt(disc.clamp_min(0))
    t = torch.where((disc >= 0) & (t > eps), t, _INF)
    if not want_n:
        return t, None
    tt = torch.where(torch.isfinite(t), t, 0.0)
    return t, ((ox + tt * dx) / r, (oy + tt * dy) / r, (oz + tt * dz) / r)


def _cylinder(o, d, size, eps, want_n):
    ox, oy, oz = o
    dx, dy, dz = d
    r, h = size[:, 0:1] * 0.5, size[:, 1:2]
    a = dx * dx + dz * dz
    b = ox * dx + oz * dz
    c = ox * ox + oz * oz - r * r
    disc = b * b - a * c
    ts = (-b - torch.sqrt(disc.clamp_min(0))) / a.clamp_min(1e-12)
    ys = oy + ts * dy
    ts = torch.where((disc >= 0) & (a > 1e-12) & (ts > eps) & (ys >= 0) & (ys <= h), ts, _INF)
    tc = (h - oy) / _safe(dy)
    xc, zc = ox + tc * dx, oz + tc * dz
    tc = torch.where((tc > eps) & (xc * xc + zc * zc <= r * r), tc, _INF)
    t = torch.minimum(ts, tc)
    if not want_n:
        return t, None
    side = ts <= tc
    tt = torch.where(torch.isfinite(t), t, 0.0)
    z = torch.zeros_like(t)
    return t, (torch.where(side, (ox + tt * dx) / r, z), torch.where(side, z, torch.ones_like(t)),
               torch.where(side, (oz + tt * dz) / r, z))


def _cone(o, d, size, eps, want_n):
    ox, oy, oz = o
    dx, dy, dz = d
    r, h = size[:, 0:1] * 0.5, size[:, 1:2]
    k2 = (r / h) ** 2
    q = h - oy
    a = dx * dx + dz * dz - k2 * dy * dy
    b = ox * dx + oz * dz + k2 * q * dy
    c = ox * ox + oz * oz - k2 * q * q
    disc = b * b - a * c
    sq = torch.sqrt(disc.clamp_min(0))
    s = -(b + torch.where(b >= 0, sq, -sq))           # stable roots s/a and c/s
    t1 = s / torch.where(a.abs() < 1e-12, torch.full_like(a, 1e-12), a)
    t2 = c / _safe(s)
    best = torch.full_like(t1, _INF)
    for tr in (t1, t2):
        y = oy + tr * dy
        ok = (disc >= 0) & (tr > eps) & (y >= 0) & (y <= h) & (a.abs() >= 1e-12)
        best = torch.where(ok & (tr < best), tr, best)
    t = best
    if not want_n:
        return t, None
    tt = torch.where(torch.isfinite(t), t, 0.0)
    px, py, pz = ox + tt * dx, oy + tt * dy, oz + tt * dz
    nx, ny, nz = px, k2 * (h - py), pz
    inv = torch.rsqrt((nx * nx + ny * ny + nz * nz).clamp_min(1e-20))
    return t, (nx * inv, ny * inv, nz * inv)


_INTERSECT = (_box, _sphere, _cylinder, _cone)


def trace_objects(pk: Packed, o, d, eps: float = 0.0, tmax: Optional[torch.Tensor] = None, want_n: bool = True):
    """Nearest object hit per ray. ``o``/``d``: 3-tuples of ``[B, P]`` (or ``[B, 1]`` origins) world tensors.

    Returns ``(t [B, P] (tmax/inf where none), slot id [B, P] int64 (0 = none, k+1 = slot k), normal 3-tuple
    in world or None)``.
    """
    B, P = d[0].shape
    t_best = torch.full((B, P), _INF) if tmax is None else tmax.clone()
    ids = torch.zeros((B, P), dtype=torch.int64) if want_n else None
    n_best = [torch.zeros(B, P) for _ in range(3)] if want_n else None
    for k in range(pk.present.shape[1]):
        for q, fn in enumerate(_INTERSECT):
            sel = pk.present[:, k] & (pk.kind[:, k] == q)
            idx = sel.nonzero().reshape(-1)
            m = idx.numel()
            if m == 0:
                continue
            full = m == B
            g = (lambda x: x) if full else (lambda x: x.index_select(0, idx))  # noqa: E731
            c, s = g(pk.cos[:, k:k + 1]), g(pk.sin[:, k:k + 1])
            px, pz = g(o[0]) - g(pk.pos[:, k, 0:1]), g(o[2]) - g(pk.pos[:, k, 1:2])
            dx, dy, dz = g(d[0]), g(d[1]), g(d[2])
            ol = (c * px - s * pz, g(o[1]), s * px + c * pz)                  # Ry(yaw)ᵀ (p − centre)
            dl = (c * dx - s * dz, dy, s * dx + c * dz)
            t, n = fn(ol, dl, g(pk.size[:, k]), eps, want_n)
            cur = g(t_best)
            better = t < cur
            new_t = torch.where(better, t, cur)
            if full:
                t_best = new_t
            else:
                t_best.index_copy_(0, idx, new_t)
            if want_n:
                wn = (c * n[0] + s * n[2], n[1], -s * n[0] + c * n[2])       # Ry(yaw) n_local
                new_id = torch.where(better, torch.full_like(cur, k + 1, dtype=torch.int64), g(ids))
                new_n = [torch.where(better, wn[i], g(n_best[i])) for i in range(3)]
                if full:
                    ids, n_best = new_id, new_n
                else:
                    ids.index_copy_(0, idx, new_id)
                    for i in range(3):
                        n_best[i].index_copy_(0, idx, new_n[i])
    return t_best, ids, n_best


def trace_room(pk: Packed, o, d):
    """Exit of the rays from the inside of the room box: ``(t, surface id, world normal 3-tuple)``."""
    hx, hz, H = pk.half[:, 0:1], pk.half[:, 2:3], pk.height[:, None]
    tx = (torch.where(d[0] >= 0, hx, -hx) - o[0]) / _safe(d[0])      # ``>= 0`` matches _safe's sign of 0
    ty = (torch.where(d[1] >= 0, H, torch.zeros_like(H)) - o[1]) / _safe(d[1])
    tz = (torch.where(d[2] >= 0, hz, -hz) - o[2]) / _safe(d[2])
    t = torch.minimum(torch.minimum(tx, ty), tz)
    isy = ty <= t
    isx = (tx <= t) & ~isy
    isz = ~(isx | isy)
    z = torch.zeros_like(t)
    n = (torch.where(isx, -torch.sign(d[0]), z), torch.where(isy, -torch.sign(d[1]), z),
         torch.where(isz, -torch.sign(d[2]), z))
    surf = torch.where(isy, torch.where(d[1] < 0, FLOOR, CEILING), torch.where(isx, WALL_X, WALL_Z))
    return t, surf, n


def trace(pk: Packed, o, d):
    """Primary hits: ``(t, id (0 room, k+1 object slot k), surface id, world normal 3-tuple, valid)``."""
    t_room, surf, n_room = trace_room(pk, o, d)
    t_obj, ids, n_obj = trace_objects(pk, o, d)
    hit_obj = ids > 0
    t = torch.where(hit_obj, t_obj, t_room)
    n = [torch.where(hit_obj, a, b) for a, b in zip(n_obj, n_room)]
    inv = torch.rsqrt((n[0] * n[0] + n[1] * n[1] + n[2] * n[2]).clamp_min(1e-20))   # float32 round-off
    n = tuple(c * inv for c in n)
    valid = torch.isfinite(t) & (t > 0)
    return t, ids, surf, n, valid


def _parity(*coords_over_cell) -> torch.Tensor:
    s = sum(torch.floor(c) for c in coords_over_cell)
    return s - 2 * torch.floor(s * 0.5)        # 0 or 1


def _stripe3(c: torch.Tensor) -> torch.Tensor:
    """1 on every third band (dark stripes cover a third: the named colour dominates), else 0."""
    f = torch.floor(c)
    return (f - 3 * torch.floor(f / 3) == 2).float()


def _gather(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """``x [B, S]`` at ``slot [B, P]`` → ``[B, P]``."""
    return torch.gather(x, 1, slot)


def albedo(pk: Packed, p, ids, surf):
    """Linear albedo 3-tuple at hit points ``p`` (world) — room textures in world coordinates, object
    textures in the object's local frame."""
    x, y, z = p
    zero = torch.zeros_like(x)
    # room: floor pattern on (x, z); walls on (along-wall, y)
    fc = pk.floor_cell[:, None]
    f_checker = _parity(x / fc, z / fc)
    f_stripes = _parity(torch.where(pk.floor_axis[:, None] == 0, x, z) / fc)
    f_tex = pk.floor_tex[:, None]
    f_par = torch.where(f_tex == 1, f_checker, torch.where(f_tex == 2, f_stripes, zero))
    wc = pk.wall_cell[:, None]
    along = torch.where(surf == WALL_X, z, x)
    w_checker = _parity(along / wc, y / wc)
    w_stripes = _parity(torch.where(pk.wall_axis[:, None] == 0, along, y) / wc)
    w_tex = pk.wall_tex[:, None]
    w_par = torch.where((surf == WALL_X) | (surf == WALL_Z),
                        torch.where(w_tex == 1, w_checker, torch.where(w_tex == 2, w_stripes, zero)), zero)
    is_floor = (surf == FLOOR)[..., None]
    room_rgb = torch.where(is_floor, pk.floor_rgb[:, None, :], pk.wall_rgb[:, None, :])
    room_par = torch.where(surf == FLOOR, f_par, w_par)
    # objects: local coordinates of the hit
    slot = (ids - 1).clamp_min(0)
    c, s = _gather(pk.cos, slot), _gather(pk.sin, slot)
    px, pz = x - _gather(pk.pos[..., 0], slot), z - _gather(pk.pos[..., 1], slot)
    lx, lz = c * px - s * pz, s * px + c * pz
    cx, cy, cz = (_gather(pk.cell3[..., i], slot) for i in range(3))
    sx, sz = _gather(pk.size[..., 0], slot), _gather(pk.size[..., 2], slot)
    kind, tex = _gather(pk.kind, slot), _gather(pk.tex, slot)
    box_checker = _parity((lx + sx / 2) / cx, y / cy, (lz + sz / 2) / cz)
    sector = (torch.atan2(lz, lx) + math.pi) * (_gather(pk.sectors, slot) / (2 * math.pi))
    round_checker = _parity(sector, y / cy)
    o_par = torch.where(tex == 1, torch.where(kind == 0, box_checker, round_checker),
                        torch.where(tex == 2, _stripe3(y / cy), zero))
    o_rgb = torch.gather(pk.rgb, 1, slot[..., None].expand(-1, -1, 3))
    is_obj = ids > 0
    rgb = torch.where(is_obj[..., None], o_rgb, room_rgb)
    par = torch.where(is_obj, o_par, room_par)
    k = 1.0 - (1.0 - DARK) * par
    return tuple(rgb[..., i] * k for i in range(3))


def shade(pk: Packed, o, d, t, ids, surf, n):
    """Linear RGB 3-tuple: ``albedo · (ambient·(0.85 + 0.15·n_y) + I·max(0, n·l)·visible/(1 + 0.04·dist²))``."""
    tt = torch.where(torch.isfinite(t), t, 0.0)
    p = tuple(o[i] + tt * d[i] for i in range(3))
    a = albedo(pk, p, ids, surf)
    L = pk.light
    lv = tuple(L[:, i:i + 1] - p[i] for i in range(3))
    dist = torch.sqrt(lv[0] ** 2 + lv[1] ** 2 + lv[2] ** 2).clamp_min(1e-6)
    lu = tuple(c / dist for c in lv)
    cos = (n[0] * lu[0] + n[1] * lu[1] + n[2] * lu[2]).clamp_min(0)
    so = tuple(p[i] + SHADOW_OFFSET * n[i] for i in range(3))
    tmax = torch.where(cos > 0, dist - SHADOW_OFFSET, torch.zeros_like(dist))   # unlit: nothing to test
    t_sh, _, _ = trace_objects(pk, so, lu, eps=1e-5, tmax=tmax, want_n=False)
    visible = (t_sh >= tmax).float()
    direct = pk.intensity[:, None] * cos * visible / (1.0 + FALLOFF * dist * dist)
    light = pk.ambient[:, None] * (0.85 + 0.15 * n[1]) + direct
    return tuple(c * light for c in a)


# ---- batch rendering --------------------------------------------------------------------------------------
def _components(x: torch.Tensor):
    return tuple(x[..., i].contiguous() for i in range(3))


def _trace_chunks(pk: Packed, origin: torch.Tensor, dirs: torch.Tensor, max_rays: int, with_rgb: bool,
                  with_geometry: bool):
    """Trace ``dirs [B, P, 3]`` from ``origin [B, 3]`` in slabs of ≤ ``max_rays`` rays."""
    B, P, _ = dirs.shape
    step = max(1, max_rays // max(B, 1))
    o = tuple(origin[:, i:i + 1].float() for i in range(3))
    outs = []
    for p0 in range(0, P, step):
        d = _components(dirs[:, p0:p0 + step])
        t, ids, surf, n, valid = trace(pk, o, d)
        res = {}
        if with_geometry:
            res.update(t=t, ids=ids, n=torch.stack(n, -1), valid=valid)
        if with_rgb:
            res["rgb"] = torch.stack(shade(pk, o, d, t, ids, surf, n), -1)
        outs.append(res)
    return {k: torch.cat([r[k] for r in outs], 1) for k in outs[0]}


def _sub_pack(pk: Packed, sl: slice) -> Packed:
    return Packed(**{k: v[sl] for k, v in pk.__dict__.items()})


def render(scenes: Sequence[Scene], camera: Camera, *, supersample: int = 1, max_rays: int = 1 << 19) -> dict:
    """Render ``B`` scenes with ``camera`` (``B`` cameras, or 1 shared by all scenes).

    Returns float32 tensors ``rgb [B,3,H,W]`` (gamma 1/2.2, in [0, 1]), ``depth [B,1,H,W]``,
    ``distance [B,1,H,W]``, ``normals [B,3,H,W]`` (camera / per-pixel frame, unit), plus ``mask [B,1,H,W]``
    int64 (0 room, k = k-th object) and ``valid [B,1,H,W]`` bool. With ``supersample = s > 1`` RGB is the
    mean (in linear light) of ``s×s`` sub-pixel samples, while depth / distance / normals / mask come from
    the exact pixel-centre rays (a separate geometry-only pass). Work is split into chunks of
    ``≤ max_rays`` rays (memory bound); all chunks are vectorised over scenes and pixels.
    """
    B = len(scenes)
    if B == 0:
        raise ValueError("no scenes to render")
    if len(camera) not in (1, B):
        raise ValueError(f"camera batch {len(camera)} must be 1 or match the {B} scenes")
    s = int(supersample)
    if s < 1:
        raise ValueError("supersample must be >= 1")
    H, W = camera.height, camera.width
    pk_all = pack(scenes)
    per_scene = H * W * (s * s + (1 if s > 1 else 0))
    chunk = max(1, max_rays // per_scene)
    out = {k: [] for k in ("rgb", "depth", "distance", "normals", "mask", "valid")}
    for b0 in range(0, B, chunk):
        sl = slice(b0, min(B, b0 + chunk))
        nb = sl.stop - sl.start
        pk = _sub_pack(pk_all, sl)
        cam = camera[sl] if len(camera) == B else camera[0:1]
        dirs, rot = cam.rays(1)
        dirs = dirs.expand(nb, -1, -1, -1).reshape(nb, H * W, 3)
        rot = rot.expand(nb, 3, 3)
        pos = cam.position.expand(nb, 3)
        geo = _trace_chunks(pk, pos, dirs, max_rays, with_rgb=(s == 1), with_geometry=True)
        if s == 1:
            lin = geo["rgb"].reshape(nb, H, W, 3).permute(0, 3, 1, 2)
        else:
            sd, _ = cam.rays(s)
            sd = sd.expand(nb, -1, -1, -1).reshape(nb, H * s * W * s, 3)
            lin = _trace_chunks(pk, pos, sd, max_rays, with_rgb=True, with_geometry=False)["rgb"]
            lin = F.avg_pool2d(lin.reshape(nb, H * s, W * s, 3).permute(0, 3, 1, 2), s)
        out["rgb"].append(lin.clamp(0, 1) ** (1.0 / GAMMA))
        t = geo["t"].reshape(nb, 1, H, W)
        fac = cam.depth_factor(1).float().expand(nb, H, W)[:, None]
        out["distance"].append(t)
        out["depth"].append(t * fac)
        # world → camera (n_cam = Rᵀ n_world) → per-pixel frame of the panoramas (n_pix = Ry(θ_u) n_cam)
        nc = torch.bmm(geo["n"], rot.float()).reshape(nb, H, W, 3)
        if cam.kind != "perspective":
            th = cam.azimuths().float()
            c, si = torch.cos(th), torch.sin(th)
            nc = torch.stack([c * nc[..., 0] + si * nc[..., 2], nc[..., 1], -si * nc[..., 0] + c * nc[..., 2]], -1)
        out["normals"].append(nc.permute(0, 3, 1, 2).contiguous())
        out["mask"].append(geo["ids"].reshape(nb, 1, H, W))
        out["valid"].append(geo["valid"].reshape(nb, 1, H, W))
    res = {k: torch.cat(v, 0) for k, v in out.items()}
    for k in ("depth", "distance", "normals"):
        res[k] = torch.where(res["valid"], res[k], torch.zeros_like(res[k]))
    return res
