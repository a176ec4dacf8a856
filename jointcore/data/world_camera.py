"""Cameras for the procedural world: perspective, cylindrical panorama, equirectangular sphere.

Conventions (shared with :mod:`jointcore.mesh`):

* World: right-handed, metres, **+Y up**, the floor is the plane ``y = 0``.
* Camera frame: **x right, y up, z towards the viewer** (the camera looks along −z). This is the
  Marigold / E2E-FT normal convention: a wall facing the camera has camera-frame normal ``(0, 0, 1)``.
* ``rotation`` is the camera-to-world matrix ``R`` (its columns are the camera's x, y, z axes in world
  coordinates): ``d_world = R @ d_camera``. ``R = Ry(yaw) @ Rx(pitch)``: ``yaw = 0`` looks along −Z,
  positive yaw turns left (counter-clockwise seen from above), positive pitch looks up.
* Pixel centres sit at integer ``(u, v)``; ``u`` grows to the right, ``v`` downwards.

  - ``perspective``: principal point ``((W−1)/2, (H−1)/2)``, square pixels,
    ``f = W / (2·tan(hfov/2))`` (or ``H / (2·tan(vfov/2))`` when the vertical FOV is given).
  - ``cylindrical``: column ``u`` has azimuth ``θ = (u − (W−1)/2)·span/W`` (positive to the right); a
    360° span wraps exactly (column ``W−1`` and column 0 are ``span/W`` apart, like any neighbours). Rows
    are linear in ``tan(elevation)``: ``y = −(v − (H−1)/2)/f_v`` on the unit-radius cylinder, with
    ``f_v = W/span`` (square pixels at the horizon, as in :mod:`jointcore.mesh`) unless ``vfov_deg`` is
    given (then ``f_v = H / (2·tan(vfov/2))``: the outer row edges are at ±vfov/2 elevation).
  - ``equirectangular``: longitude ``θ = (u − (W−1)/2)·2π/W`` (−180°..180° across the width), latitude
    ``φ = −(v − (H−1)/2)·π/H`` (+90° at the top to −90° at the bottom).

* Panoramas have no single camera frame for normals. Their per-pixel frame is the frame of the tangent
  perspective camera that looks horizontally along the pixel's azimuth, with y up:
  ``F_u = Ry(−θ_u)`` (so ``n_pixel = F_uᵀ Rᵀ n_world``); see :meth:`Camera.pixel_frames`.
* ``depth`` per projection (:meth:`Camera.depth_factor`, ``depth = factor · distance``): perspective —
  planar z along the optical axis; cylindrical — horizontal distance to the camera's vertical axis (=
  the planar depth of the per-column tangent camera); equirectangular — the Euclidean ray length.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

KINDS = ("perspective", "cylindrical", "equirectangular")
_ALIASES = {"equirect": "equirectangular", "erp": "equirectangular", "pano": "cylindrical",
            "cylinder": "cylindrical", "persp": "perspective"}

Floats = Union[float, Sequence[float], torch.Tensor]


def canonical_kind(kind: str) -> str:
    k = _ALIASES.get(str(kind).lower(), str(kind).lower())
    if k not in KINDS:
        raise ValueError(f"camera kind must be one of {KINDS} (or {sorted(_ALIASES)}), got {kind!r}")
    return k


def rot_y(a: torch.Tensor) -> torch.Tensor:
    """``[..., 3, 3]`` rotation by angle ``a`` (radians) about +Y (counter-clockwise seen from above)."""
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([torch.stack([c, z, s], -1), torch.stack([z, o, z], -1), torch.stack([-s, z, c], -1)], -2)


def rot_x(a: torch.Tensor) -> torch.Tensor:
    """``[..., 3, 3]`` rotation by angle ``a`` (radians) about +X (positive tilts −Z towards +Y)."""
    c, s = torch.cos(a), torch.sin(a)
    o, z = torch.ones_like(a), torch.zeros_like(a)
    return torch.stack([torch.stack([o, z, z], -1), torch.stack([z, c, -s], -1), torch.stack([z, s, c], -1)], -2)


def camera_rotation(yaw: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
    """Camera-to-world ``[..., 3, 3]`` for yaw/pitch in radians: ``Ry(yaw) @ Rx(pitch)``."""
    return rot_y(yaw) @ rot_x(pitch)


def _vec(x: Floats, n: Optional[int] = None) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).reshape(-1)
    return t if n is None or t.numel() == n else t.expand(n).clone()


@dataclass
class Camera:
    """A batch of ``B`` cameras of one kind and one image size.

    ``position`` ``[B, 3]`` (metres, world), ``yaw``/``pitch`` ``[B]`` (radians), ``fov_deg`` ``[B]`` (the
    perspective field of view along ``fov_axis``), ``span_deg`` (cylindrical horizontal span) and
    ``vfov_deg`` (cylindrical vertical FOV, ``None`` = square pixels at the horizon). All tensors float64.
    """

    kind: str
    height: int
    width: int
    position: torch.Tensor
    yaw: torch.Tensor
    pitch: torch.Tensor
    fov_deg: torch.Tensor = field(default_factory=lambda: torch.tensor([60.0], dtype=torch.float64))
    fov_axis: str = "horizontal"
    span_deg: float = 360.0
    vfov_deg: Optional[float] = None

    def __post_init__(self):
        self.kind = canonical_kind(self.kind)
        self.height, self.width = int(self.height), int(self.width)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        self.position = torch.as_tensor(self.position, dtype=torch.float64).reshape(-1, 3)
        b = self.position.shape[0]
        self.yaw, self.pitch, self.fov_deg = _vec(self.yaw, b), _vec(self.pitch, b), _vec(self.fov_deg, b)
        if self.fov_axis not in ("horizontal", "vertical"):
            raise ValueError(f"fov_axis must be 'horizontal' or 'vertical', got {self.fov_axis!r}")
        if self.kind == "perspective" and not bool(((self.fov_deg > 0) & (self.fov_deg < 180)).all()):
            raise ValueError("perspective fov_deg must be in (0, 180)")
        if not (0.0 < float(self.span_deg) <= 360.0):
            raise ValueError(f"span_deg must be in (0, 360], got {self.span_deg}")
        if self.vfov_deg is not None and not (0.0 < float(self.vfov_deg) < 180.0):
            raise ValueError(f"vfov_deg must be in (0, 180), got {self.vfov_deg}")

    # ---- batch handling -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.position.shape[0]

    def __getitem__(self, idx) -> "Camera":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return Camera(self.kind, self.height, self.width, self.position[idx], self.yaw[idx], self.pitch[idx],
                      self.fov_deg[idx], self.fov_axis, self.span_deg, self.vfov_deg)

    def with_size(self, height: int, width: int) -> "Camera":
        """The same cameras (same FOV / span) rendering a different pixel grid."""
        return Camera(self.kind, height, width, self.position, self.yaw, self.pitch, self.fov_deg, self.fov_axis,
                      self.span_deg, self.vfov_deg)

    @property
    def rotation(self) -> torch.Tensor:
        """Camera-to-world ``[B, 3, 3]`` (float64)."""
        return camera_rotation(self.yaw, self.pitch)

    @property
    def wraps(self) -> bool:
        """Whether column ``W−1`` neighbours column 0 (360° cylinder, every equirectangular image)."""
        return self.kind == "equirectangular" or (self.kind == "cylindrical" and abs(self.span_deg - 360.0) < 1e-9)

    def focal(self) -> torch.Tensor:
        """Perspective focal length in pixels ``[B]``."""
        half = torch.deg2rad(self.fov_deg) / 2
        n = self.width if self.fov_axis == "horizontal" else self.height
        return n / (2 * torch.tan(half))

    # ---- per-pixel geometry ---------------------------------------------------------------------------
    def _angles(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        u = torch.arange(w, dtype=torch.float64) - (w - 1) / 2.0
        v = torch.arange(h, dtype=torch.float64) - (h - 1) / 2.0
        return u, v

    def azimuths(self, supersample: int = 1) -> torch.Tensor:
        """Per-column azimuth ``θ_u`` ``[W·s]`` of the panorama kinds (radians, positive to the right)."""
        w = self.width * supersample
        u = torch.arange(w, dtype=torch.float64) - (w - 1) / 2.0
        span = 2 * math.pi if self.kind == "equirectangular" else math.radians(self.span_deg)
        return u * (span / w)

    def local_dirs(self, supersample: int = 1) -> torch.Tensor:
        """Unit ray directions through the pixel centres in the camera frame, float64.

        ``[B, H·s, W·s, 3]`` for perspective (the FOV may differ per camera), ``[1, H·s, W·s, 3]`` for the
        panoramas. With ``supersample = s`` the grid is the ``s×s`` sub-pixel centres of every pixel (the
        same FOV / span on an ``s``-times finer grid), so average-pooling ``s×s`` blocks gives pixel values.
        """
        h, w = self.height * supersample, self.width * supersample
        u, v = self._angles(h, w)
        if self.kind == "perspective":
            f = self.focal()[:, None, None] * supersample
            x = (u[None, None, :] / f).expand(-1, h, w)
            y = (-v[None, :, None] / f).expand(-1, h, w)
            d = torch.stack([x, y, -torch.ones_like(x)], -1)
        elif self.kind == "cylindrical":
            th = self.azimuths(supersample)
            span = math.radians(self.span_deg)
            fv = (w / span) if self.vfov_deg is None else h / (2 * math.tan(math.radians(self.vfov_deg) / 2))
            y = (-v / fv)[:, None].expand(h, w)
            d = torch.stack([torch.sin(th)[None].expand(h, w), y, -torch.cos(th)[None].expand(h, w)], -1)[None]
        else:
            th = self.azimuths(supersample)[None, :]
            ph = (-v * (math.pi / h))[:, None]
            c = torch.cos(ph)
            d = torch.stack([(c * torch.sin(th)).expand(h, w), torch.sin(ph).expand(h, w),
                             (-c * torch.cos(th)).expand(h, w)], -1)[None]
        return d / d.norm(dim=-1, keepdim=True)

    def rays(self, supersample: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dirs_world [B, H·s, W·s, 3] float32 unit, rotation [B, 3, 3] float64)``."""
        loc = self.local_dirs(supersample)
        rot = self.rotation
        return torch.einsum("bij,bhwj->bhwi", rot, loc.expand(len(self), -1, -1, -1)).float(), rot

    def pixel_frames(self) -> torch.Tensor:
        """``[1, 1 or H, W, 3, 3]`` per-pixel normal frame → camera frame (float64).

        Identity for perspective; ``Ry(−θ_u)`` for the panoramas (tangent camera along the pixel's azimuth,
        y up). Normals in the output are ``n_pixel = Fᵀ Rᵀ n_world``.
        """
        if self.kind == "perspective":
            return torch.eye(3, dtype=torch.float64).expand(1, 1, 1, 3, 3)
        return rot_y(-self.azimuths())[None, None]

    def depth_factor(self, supersample: int = 1) -> torch.Tensor:
        """``depth / distance`` per pixel: ``[B or 1, H·s, W·s]`` (see the module docstring)."""
        d = self.local_dirs(supersample)
        if self.kind == "perspective":
            return -d[..., 2]
        if self.kind == "cylindrical":
            return torch.sqrt(d[..., 0] ** 2 + d[..., 2] ** 2)
        return torch.ones(d.shape[:-1], dtype=d.dtype)

    def to_dict(self, i: int = 0) -> dict:
        """JSON-friendly description of camera ``i`` (angles in degrees, rotation camera-to-world)."""
        d = {"kind": self.kind, "height": self.height, "width": self.width,
             "position": [float(x) for x in self.position[i]], "yaw_deg": math.degrees(float(self.yaw[i])),
             "pitch_deg": math.degrees(float(self.pitch[i])),
             "rotation": [[float(x) for x in row] for row in self.rotation[i]]}
        if self.kind == "perspective":
            d.update(fov_deg=float(self.fov_deg[i]), fov_axis=self.fov_axis, focal_px=float(self.focal()[i]))
        elif self.kind == "cylindrical":
            d.update(span_deg=float(self.span_deg), vfov_deg=self.vfov_deg)
        return d


# ---- constructors -------------------------------------------------------------------------------------
def perspective(height: int, width: int, position: Floats, yaw_deg: Floats = 0.0, pitch_deg: Floats = 0.0, *,
                fov_deg: Floats = 60.0, fov_axis: str = "horizontal") -> Camera:
    """Pinhole cameras; ``position`` ``[3]`` or ``[B, 3]``; angles in degrees (scalars broadcast)."""
    pos = torch.as_tensor(position, dtype=torch.float64).reshape(-1, 3)
    yaw, pitch, fov = (torch.as_tensor(x, dtype=torch.float64).reshape(-1) for x in (yaw_deg, pitch_deg, fov_deg))
    b = max(pos.shape[0], yaw.numel(), pitch.numel(), fov.numel())
    return Camera("perspective", height, width, pos.expand(b, 3), torch.deg2rad(yaw).expand(b),
                  torch.deg2rad(pitch).expand(b), fov.expand(b), fov_axis)


def cylindrical(height: int, width: int, position: Floats, *, span_deg: float = 360.0,
                vfov_deg: Optional[float] = None, yaw_deg: Floats = 0.0) -> Camera:
    """Level cylindrical panoramas centred on azimuth ``yaw`` (degrees, positive turns left)."""
    pos = torch.as_tensor(position, dtype=torch.float64).reshape(-1, 3)
    yaw = torch.as_tensor(yaw_deg, dtype=torch.float64).reshape(-1)
    b = max(pos.shape[0], yaw.numel())
    return Camera("cylindrical", height, width, pos.expand(b, 3), torch.deg2rad(yaw).expand(b),
                  torch.zeros(b, dtype=torch.float64), torch.full((b,), 90.0, dtype=torch.float64),
                  span_deg=float(span_deg), vfov_deg=vfov_deg)


def equirectangular(height: int, width: int, position: Floats, *, yaw_deg: Floats = 0.0) -> Camera:
    """Full-sphere panoramas; longitude 0 (the image centre) looks along the yawed −Z."""
    pos = torch.as_tensor(position, dtype=torch.float64).reshape(-1, 3)
    yaw = torch.as_tensor(yaw_deg, dtype=torch.float64).reshape(-1)
    b = max(pos.shape[0], yaw.numel())
    return Camera("equirectangular", height, width, pos.expand(b, 3), torch.deg2rad(yaw).expand(b),
                  torch.zeros(b, dtype=torch.float64), torch.full((b,), 90.0, dtype=torch.float64))


def normals_to_world(normals: torch.Tensor, camera: Camera) -> torch.Tensor:
    """Camera-frame (per-pixel frame for panoramas) normals ``[B, 3, H, W]`` → world frame ``[B, 3, H, W]``."""
    m = camera.rotation[:, None, None] @ camera.pixel_frames()  # [B, 1|H, W, 3, 3] pixel frame → world
    n = normals.permute(0, 2, 3, 1).to(torch.float64)[..., None]
    return (m @ n)[..., 0].permute(0, 3, 1, 2).to(normals.dtype)


def normals_to_camera(normals_world: torch.Tensor, camera: Camera) -> torch.Tensor:
    """Inverse of :func:`normals_to_world`."""
    m = camera.rotation[:, None, None] @ camera.pixel_frames()
    n = normals_world.permute(0, 2, 3, 1).to(torch.float64)[..., None]
    return (m.transpose(-1, -2) @ n)[..., 0].permute(0, 3, 1, 2).to(normals_world.dtype)
