"""Scene description and deterministic sampling for the procedural world (see :mod:`jointcore.data.world`).

A scene is plain Python data (dataclasses, JSON round-trip via :meth:`Scene.to_dict` / :meth:`Scene.from_dict`).
:func:`sample_scene` draws it from an integer seed with numpy's ``PCG64`` bit generator, consuming only its
raw 64-bit outputs (turned into uniforms / integers here), whose stream numpy guarantees across versions
and platforms; every decision (choices, sizes, positions, rejection tests) uses only those draws and
``+ − × /`` comparisons, so the same seed gives the same scene on any machine. The default view angles
(yaw, pitch, FOV) are derived at the end with ``atan``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence, Union

import numpy as np

# ---- palettes (sRGB in [0, 1]) --------------------------------------------------------------------------
#: Object colours: well separated in hue / saturation so :func:`~jointcore.data.world.colour_present` can
#: tell them apart under any shading (white light scales colours, which keeps hue and saturation).
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (1.00, 0.52, 0.02),
    "yellow": (0.96, 0.86, 0.12),
    "green": (0.12, 0.68, 0.18),
    "cyan": (0.10, 0.80, 0.86),
    "blue": (0.12, 0.28, 0.90),
    "purple": (0.56, 0.18, 0.78),
    "pink": (1.00, 0.52, 0.76),
    "brown": (0.44, 0.27, 0.14),
    "white": (0.95, 0.95, 0.95),
}
#: Wall (and ceiling) colours: achromatic or weakly tinted (HSV saturation ≤ 0.3), so the room never
#: reads as one of the chromatic object colours. Only ``white`` matches a :data:`PALETTE` name; the greys
#: stay darker (value ≤ 0.5 even in full light) than a lit white object.
ROOM_PALETTE: dict[str, tuple[float, float, float]] = {
    "grey": (0.50, 0.50, 0.50),
    "white": (0.88, 0.88, 0.86),
    "beige": (0.84, 0.76, 0.62),
    "light blue": (0.66, 0.75, 0.86),
    "light green": (0.70, 0.80, 0.66),
}
#: Floor colours (saturation ≤ 0.3 as well).
FLOOR_PALETTE: dict[str, tuple[float, float, float]] = {
    "grey": (0.45, 0.45, 0.45),
    "dark grey": (0.30, 0.30, 0.30),
    "beige": (0.78, 0.70, 0.58),
    "wood": (0.64, 0.55, 0.46),
}
OBJECT_KINDS = ("box", "sphere", "cylinder", "cone")
TEXTURES = ("plain", "checker", "stripes")
MAX_OBJECTS = 4

# ---- seed splits ----------------------------------------------------------------------------------------
TRAIN_SEEDS = range(0, 1_000_000)
HELDOUT_SEEDS = range(1_000_000_000, 1_000_100_000)
SeedsLike = Union[range, Iterable[int]]


def _count_in(seeds: SeedsLike, split: range) -> int:
    if isinstance(seeds, range):
        r = seeds if seeds.step > 0 else seeds[::-1]
        if len(r) == 0:
            return 0
        i0 = max(0, -(-(split.start - r.start) // r.step))       # first index with r[i] >= split.start
        i1 = max(0, -(-(split.stop - r.start) // r.step))        # first index with r[i] >= split.stop
        return max(0, min(i1, len(r)) - min(i0, len(r)))
    return sum(1 for s in seeds if s in split)


def seed_split(seeds: SeedsLike) -> str:
    """``"train"``, ``"heldout"`` or ``"other"`` for a seed collection that lies wholly in one of them.

    Raises ``ValueError`` when the seeds cross a split boundary (some in a split, some outside it) — a
    guard against training on held-out scenes by a mistyped range. Ranges are checked arithmetically.
    """
    seeds = seeds if isinstance(seeds, range) else list(seeds)
    n = len(seeds)
    tr, ho = _count_in(seeds, TRAIN_SEEDS), _count_in(seeds, HELDOUT_SEEDS)
    if n and tr == n:
        return "train"
    if n and ho == n:
        return "heldout"
    if tr == 0 and ho == 0:
        return "other"
    raise ValueError(f"seed range {seeds if isinstance(seeds, range) else f'of {n} seeds'} crosses the "
                     f"TRAIN_SEEDS / HELDOUT_SEEDS boundary ({tr} train, {ho} held-out, {n - tr - ho} other)")


def check_seeds(seeds: SeedsLike, split: Optional[str] = None) -> str:
    """:func:`seed_split`, and additionally require that split (``"train"``/``"heldout"``) when given."""
    got = seed_split(seeds)
    if split is not None and got != split:
        raise ValueError(f"expected {split} seeds, got {got} seeds")
    return got


# ---- scene description ----------------------------------------------------------------------------------
@dataclass
class Room:
    """Axis-aligned box ``x ∈ [−width/2, width/2]``, ``y ∈ [0, height]``, ``z ∈ [−depth/2, depth/2]``.

    Textures live in world coordinates: floor checker/stripes on ``(x, z)`` (stripes run along z when
    ``floor_stripe_axis == 0``, i.e. alternate along x), wall checker/stripes on (horizontal position along
    the wall, y) (``wall_stripe_axis`` 0 = vertical stripes, 1 = horizontal bands). ``*_cell`` in metres.
    The ceiling is plain, in the wall colour.
    """

    width: float
    depth: float
    height: float
    wall_colour: str = "grey"
    floor_colour: str = "wood"
    wall_texture: str = "plain"
    wall_cell: float = 0.4
    wall_stripe_axis: int = 0
    floor_texture: str = "plain"
    floor_cell: float = 0.6
    floor_stripe_axis: int = 0


@dataclass
class Obj:
    """A primitive standing on the floor. ``position`` is the footprint centre ``(x, z)``; ``size`` is
    ``(sx, sy, sz)`` — box edges; ``(2r, 2r, 2r)`` sphere; ``(2r, h, 2r)`` cylinder and cone (apex up).
    ``yaw_deg`` turns it about its vertical axis (orients box and texture). ``cell`` is the texture cell /
    stripe width in metres (adjusted at render time to a whole number of cells per dimension)."""

    kind: str
    colour: str
    position: tuple[float, float]
    size: tuple[float, float, float]
    yaw_deg: float = 0.0
    texture: str = "plain"
    cell: float = 0.2

    @property
    def footprint_radius(self) -> float:
        sx, _, sz = self.size
        return 0.5 * math.sqrt(sx * sx + sz * sz) if self.kind == "box" else 0.5 * sx

    @property
    def centre(self) -> tuple[float, float, float]:
        """Centre of the bounding box (world)."""
        return (self.position[0], 0.5 * self.size[1], self.position[1])


@dataclass
class Light:
    """Point light (white) + ambient. Shading: ``ambient·(0.85 + 0.15·n_y) + intensity·max(0, n·l)·
    visible / (1 + 0.04·dist²)`` times the linear albedo."""

    position: tuple[float, float, float]
    intensity: float = 0.7
    ambient: float = 0.22


@dataclass
class View:
    """A perspective view: ``position`` (x, y, z), yaw / pitch in degrees (see
    :mod:`jointcore.data.world_camera`), horizontal FOV in degrees."""

    position: tuple[float, float, float]
    yaw_deg: float
    pitch_deg: float
    fov_deg: float


@dataclass
class Scene:
    """Room, 0–4 objects, a light, the default perspective view and the default panorama centre."""

    seed: Optional[int]
    room: Room
    objects: list[Obj]
    light: Light
    view: View
    pano_position: tuple[float, float, float] = (0.0, 1.4, 0.0)
    pano_yaw_deg: float = 0.0
    version: int = field(default=1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        d = dict(d)
        objs = [Obj(**{**o, "position": tuple(o["position"]), "size": tuple(o["size"])}) for o in d.pop("objects")]
        light = dict(d.pop("light"))
        light["position"] = tuple(light["position"])
        view = dict(d.pop("view"))
        view["position"] = tuple(view["position"])
        return cls(room=Room(**d.pop("room")), objects=objs, light=Light(**light), view=View(**view),
                   pano_position=tuple(d.pop("pano_position", (0.0, 1.4, 0.0))), **d)


# ---- deterministic random numbers ------------------------------------------------------------------------
class _Rng:
    """Uniforms and integers from ``PCG64(seed)``'s raw 64-bit stream (stable across numpy versions)."""

    def __init__(self, seed: int):
        self._bg = np.random.PCG64(int(seed))

    def uniform(self, lo: float = 0.0, hi: float = 1.0) -> float:
        u = (int(self._bg.random_raw()) >> 11) * (1.0 / 9007199254740992.0)  # 53-bit, [0, 1)
        return lo + (hi - lo) * u

    def integer(self, n: int) -> int:
        return min(int(self.uniform() * n), n - 1)

    def choice(self, seq: Sequence, weights: Optional[Sequence[float]] = None):
        if weights is None:
            return seq[self.integer(len(seq))]
        u, acc = self.uniform() * sum(weights), 0.0
        for item, w in zip(seq, weights):
            acc += w
            if u < acc:
                return item
        return seq[-1]

    def shuffled(self, seq: Sequence) -> list:
        out = list(seq)
        for i in range(len(out) - 1, 0, -1):
            j = self.integer(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


# ---- sampling -------------------------------------------------------------------------------------------
# Camera wall: forward and right unit vectors in (x, z) for the four walls the camera can stand against.
_SIDES = (((0.0, -1.0), (1.0, 0.0), 0.0), ((0.0, 1.0), (-1.0, 0.0), 180.0),
          ((-1.0, 0.0), (0.0, -1.0), 90.0), ((1.0, 0.0), (0.0, 1.0), -90.0))
_GAP = 0.12            # minimum free space between object footprints and to the walls (m)
_PANO_CLEAR = 0.8      # free radius around the panorama centre (m)


def _sample_object(rng: _Rng, colour: str) -> Obj:
    kind = rng.choice(OBJECT_KINDS)
    if kind == "box":
        size = (rng.uniform(0.45, 1.1), rng.uniform(0.4, 1.2), rng.uniform(0.45, 1.1))
        yaw = rng.uniform(0.0, 90.0)
    elif kind == "sphere":
        r = rng.uniform(0.25, 0.5)
        size, yaw = (2 * r, 2 * r, 2 * r), rng.uniform(0.0, 360.0)
    elif kind == "cylinder":
        r = rng.uniform(0.2, 0.42)
        size, yaw = (2 * r, rng.uniform(0.5, 1.4), 2 * r), rng.uniform(0.0, 360.0)
    else:
        r = rng.uniform(0.25, 0.5)
        size, yaw = (2 * r, rng.uniform(0.6, 1.3), 2 * r), rng.uniform(0.0, 360.0)
    texture = rng.choice(TEXTURES, (0.5, 0.25, 0.25))
    cell = rng.uniform(0.12, 0.25) if texture == "checker" else rng.uniform(0.07, 0.16)
    return Obj(kind, colour, (0.0, 0.0), size, yaw, texture, cell)


def sample_scene(seed: int) -> Scene:
    """The scene of ``seed`` (deterministic, machine independent; see the module docstring)."""
    rng = _Rng(seed)
    width, depth, height = rng.uniform(4.0, 8.0), rng.uniform(4.0, 8.0), rng.uniform(2.5, 3.5)
    wall_colour = rng.choice(tuple(ROOM_PALETTE))
    floor_colour = rng.choice(tuple(FLOOR_PALETTE))
    room = Room(width, depth, height, wall_colour, floor_colour,
                wall_texture=rng.choice(TEXTURES, (0.6, 0.15, 0.25)), wall_cell=rng.uniform(0.25, 0.6),
                wall_stripe_axis=rng.integer(2),
                floor_texture=rng.choice(TEXTURES, (0.3, 0.4, 0.3)), floor_cell=rng.uniform(0.45, 0.9),
                floor_stripe_axis=rng.integer(2))

    # default perspective camera: against one wall, looking into the room
    (fx, fz), (rx, rz), base_yaw = _SIDES[rng.integer(4)]
    ext_f, ext_r = (depth, width) if fz != 0.0 else (width, depth)
    back = ext_f / 2 - rng.uniform(0.3, 0.8)
    lat = rng.uniform(-0.25, 0.25) * ext_r
    cam = (-fx * back + rx * lat, rng.uniform(1.2, 1.7), -fz * back + rz * lat)
    tan_half = rng.uniform(0.52, 0.77)                  # tan(hfov/2): hfov ≈ 55°–75°
    pano = (rng.uniform(-0.3, 0.3), rng.uniform(1.2, 1.6), rng.uniform(-0.3, 0.3))
    pano_yaw = rng.uniform(-180.0, 180.0)

    # objects: inside the camera's horizontal view cone (in tan space), in the room, apart, off the pano centre
    n_obj = 1 + rng.integer(MAX_OBJECTS)
    colours = rng.shuffled(tuple(PALETTE))[:n_obj]
    objects: list[Obj] = []
    for colour in colours:
        obj = _sample_object(rng, colour)
        for attempt in range(120):
            if attempt and attempt % 40 == 0:           # crowded: try a smaller version of the object
                obj.size = tuple(0.8 * v for v in obj.size)
            rad = obj.footprint_radius
            f = rng.uniform(1.7, 4.2)
            q = rng.uniform(-0.7, 0.7) * tan_half
            x, z = cam[0] + f * (fx + q * rx), cam[2] + f * (fz + q * rz)
            if abs(x) > width / 2 - rad - _GAP or abs(z) > depth / 2 - rad - _GAP:
                continue
            if (x - pano[0]) ** 2 + (z - pano[2]) ** 2 < (rad + _PANO_CLEAR) ** 2:
                continue
            if any((x - o.position[0]) ** 2 + (z - o.position[1]) ** 2 < (rad + o.footprint_radius + _GAP) ** 2
                   for o in objects):
                continue
            obj.position = (x, z)
            objects.append(obj)
            break
    if not objects:  # practically never: a small sphere straight ahead
        objects.append(Obj("sphere", colours[0], (cam[0] + 2.2 * fx, cam[2] + 2.2 * fz), (0.4, 0.4, 0.4)))

    # key light near the ceiling on the camera's half of the room, so the visible faces are mostly lit
    lf, lr = rng.uniform(0.0, 0.45) * ext_f, rng.uniform(-0.35, 0.35) * ext_r
    lx = min(width / 2 - 0.4, max(-width / 2 + 0.4, cam[0] + lf * fx + lr * rx))
    lz = min(depth / 2 - 0.4, max(-depth / 2 + 0.4, cam[2] + lf * fz + lr * rz))
    light = Light((lx, height - rng.uniform(0.25, 0.6), lz), rng.uniform(0.7, 0.8), rng.uniform(0.17, 0.2))

    # derived view angles: small yaw jitter; pitch aims a little above the objects' mean centre
    yaw = base_yaw + rng.uniform(-3.0, 3.0)
    cx = sum(o.position[0] for o in objects) / len(objects)
    cz = sum(o.position[1] for o in objects) / len(objects)
    cy = sum(o.centre[1] for o in objects) / len(objects)
    dist = (cx - cam[0]) * fx + (cz - cam[2]) * fz
    pitch = 0.75 * math.degrees(math.atan2(cy - cam[1], dist)) + rng.uniform(-3.0, 3.0)
    pitch = min(-5.0, max(-35.0, pitch))
    view = View(cam, yaw, pitch, 2 * math.degrees(math.atan(tan_half)))
    return Scene(int(seed), room, objects, light, view, pano, pano_yaw)


def sample_scenes(seeds: Iterable[int]) -> list[Scene]:
    return [sample_scene(s) for s in seeds]
