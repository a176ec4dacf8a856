"""Named-colour detection for procedural-world images (scoring text→image samples).

Each pixel is labelled with at most one :data:`~jointcore.data.world_scene.PALETTE` name from its HSV
values (sRGB in [0, 1]):

* chromatic names (all but ``white``): saturation ≥ ``S_MIN`` and value ≥ ``V_MIN``, then the nearest
  palette colour in (hue, saturation) with a hue scale of ``HUE_SCALE`` degrees and a saturation scale of
  ``SAT_SCALE``, accepted when that normalised distance is ≤ ``MAX_DIST``. Hue and saturation are what white
  light and shadows leave unchanged in the renderer (pure scaling of linear colour + a power-law gamma),
  so a shaded red sphere stays red;
* ``white``: saturation ≤ ``WHITE_S_MAX`` and value ≥ ``WHITE_V_MIN``.

A colour is *present* when at least ``threshold`` (default 1.5 %) of the (masked) pixels carry its label.
Room colours are achromatic or weakly tinted (saturation ≤ 0.3) so they never read as a chromatic name;
a white room does read as ``white`` (:func:`scene_colours` accounts for it).
"""
from __future__ import annotations

import colorsys
from typing import Optional, Union

import numpy as np
import torch

from .world_scene import FLOOR_PALETTE, PALETTE, ROOM_PALETTE, Scene

S_MIN, V_MIN = 0.35, 0.15
HUE_SCALE, SAT_SCALE, MAX_DIST = 18.0, 0.25, 2.0
WHITE_S_MAX, WHITE_V_MIN = 0.12, 0.55
PRESENT_THRESHOLD = 0.015

NAMES = tuple(PALETTE)
_CHROMA = [(i, n) for i, n in enumerate(NAMES) if n != "white"]
_CHROMA_HS = torch.tensor([[colorsys.rgb_to_hsv(*PALETTE[n])[0] * 360.0, colorsys.rgb_to_hsv(*PALETTE[n])[1]]
                           for _, n in _CHROMA], dtype=torch.float32)
_CHROMA_IDX = torch.tensor([i for i, _ in _CHROMA])
_WHITE = NAMES.index("white")

ImageLike = Union[torch.Tensor, np.ndarray]


def _as_float(rgb: ImageLike) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(rgb) if not isinstance(rgb, torch.Tensor) else rgb)
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    return x.float().clamp(0, 1)


def hsv(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue (degrees, [0, 360)), saturation, value of ``rgb [..., 3, H, W]``."""
    r, g, b = rgb.unbind(-3)
    v, _ = rgb.max(-3)
    mn, _ = rgb.min(-3)
    c = v - mn
    cs = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, ((g - b) / cs) % 6.0, torch.where(v == g, (b - r) / cs + 2.0, (r - g) / cs + 4.0))
    h = torch.where(c > 0, h * 60.0, torch.zeros_like(h))
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return h, s, v


def colour_labels(rgb: ImageLike) -> torch.Tensor:
    """Per-pixel palette index (into ``tuple(PALETTE)``) or −1, for ``rgb [..., 3, H, W]``."""
    x = _as_float(rgb)
    h, s, v = hsv(x)
    dh = (h[..., None] - _CHROMA_HS[:, 0]).abs()
    dh = torch.minimum(dh, 360.0 - dh) / HUE_SCALE
    ds = (s[..., None] - _CHROMA_HS[:, 1]) / SAT_SCALE
    dist, j = (dh * dh + ds * ds).min(-1)
    chroma = (s >= S_MIN) & (v >= V_MIN) & (dist <= MAX_DIST * MAX_DIST)
    lab = torch.where(chroma, _CHROMA_IDX[j], torch.full_like(j, -1))
    white = (s <= WHITE_S_MAX) & (v >= WHITE_V_MIN)
    return torch.where(white, torch.full_like(lab, _WHITE), lab)


def colour_fractions(rgb: ImageLike, mask: Optional[ImageLike] = None) -> dict[str, float]:
    """Fraction of the (masked) pixels of ``rgb [3, H, W]`` labelled with each palette name."""
    lab = colour_labels(rgb)
    if mask is not None:
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).bool()
        lab = lab[m.reshape(lab.shape)]
    n = max(1, lab.numel())
    counts = torch.bincount(lab.reshape(-1) + 1, minlength=len(NAMES) + 1)[1:]
    return {name: float(counts[i]) / n for i, name in enumerate(NAMES)}


def colour_score(rgb: ImageLike, colour_name: str, mask: Optional[ImageLike] = None) -> float:
    """Fraction of the (masked) pixels of ``rgb [3, H, W]`` whose label is ``colour_name``."""
    if colour_name not in PALETTE:
        raise ValueError(f"unknown colour {colour_name!r}; palette: {NAMES}")
    return colour_fractions(rgb, mask)[colour_name]


def colour_present(rgb: ImageLike, colour_name: str, mask: Optional[ImageLike] = None,
                   threshold: float = PRESENT_THRESHOLD) -> bool:
    """Whether ``colour_name`` covers at least ``threshold`` of the (masked) pixels of ``rgb [3, H, W]``."""
    return colour_score(rgb, colour_name, mask) >= threshold


def scene_colours(scene: Scene) -> set[str]:
    """Palette names a render of ``scene`` may legitimately show: its objects' colours plus the names that
    the room's wall / floor colours themselves carry (only a white room does)."""
    names = {o.colour for o in scene.objects}
    for rgb in (ROOM_PALETTE[scene.room.wall_colour], FLOOR_PALETTE[scene.room.floor_colour]):
        lab = int(colour_labels(torch.tensor(rgb, dtype=torch.float32).reshape(3, 1, 1)).item())
        if lab >= 0:
            names.add(NAMES[lab])
    return names
