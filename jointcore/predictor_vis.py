"""Visualisation and file output for predicted depth / normal maps.

* depth ``[B,1,H,W]`` in ``[0,1]`` (affine-invariant, near = small) → grey or a kornia colour map; with
  ``near_bright`` the map is inverted (near = bright), as ControlNet depth models expect;
* normals ``[B,3,H,W]`` unit vectors → RGB ``(n + 1)/2`` with optional axis flips (conventions differ
  between model families: E2E-FT reports +X left, diffusers' Marigold +X right);
* 16-bit PNG writing (grey or RGB) with numpy + zlib only.
"""
from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import torch

def available_colormaps() -> list[str]:
    """``grey`` plus every kornia ``ColorMapType`` name."""
    try:
        from kornia.color import ColorMapType
        names = [c.name for c in ColorMapType]
    except ImportError:  # pragma: no cover - kornia is a dependency
        names = []
    return ["grey"] + names


def colorize_depth(depth: torch.Tensor, colormap: str = "grey", near_bright: bool = False,
                   num_colors: int = 256) -> torch.Tensor:
    """``[B,1,H,W]`` depth in ``[0,1]`` → ``[B,3,H,W]`` RGB in ``[0,1]``.

    Args:
        colormap: ``"grey"`` or a kornia colour-map name (``viridis``, ``turbo``, …).
        near_bright: invert so near (small depth) is bright / at the top of the colour map.
    """
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"expected depth of shape [B,1,H,W], got {tuple(depth.shape)}")
    d = depth.float().clamp(0, 1)
    if near_bright:
        d = 1 - d
    if colormap == "grey":
        return d.expand(-1, 3, -1, -1).contiguous()
    names = available_colormaps()
    if colormap not in names:
        raise ValueError(f"unknown colour map {colormap!r}; choose one of {names}")
    from kornia.color import ColorMap, apply_colormap
    cm = ColorMap(base=colormap, num_colors=int(num_colors), device=d.device, dtype=d.dtype)
    return apply_colormap(d, cm).clamp(0, 1)


def flip_normals(n: torch.Tensor, flip_x: bool = False, flip_y: bool = False, flip_z: bool = False) -> torch.Tensor:
    """Negate chosen axes of ``[B,3,H,W]`` normals."""
    if n.ndim != 4 or n.shape[1] != 3:
        raise ValueError(f"expected normals of shape [B,3,H,W], got {tuple(n.shape)}")
    sign = torch.tensor([-1.0 if flip_x else 1.0, -1.0 if flip_y else 1.0, -1.0 if flip_z else 1.0],
                        dtype=n.dtype, device=n.device)
    return n * sign.reshape(1, 3, 1, 1)


def normals_to_rgb(n: torch.Tensor, flip_x: bool = False, flip_y: bool = False, flip_z: bool = False) -> torch.Tensor:
    """``[B,3,H,W]`` normals → RGB ``(n + 1)/2`` in ``[0,1]`` after optional axis flips."""
    return ((flip_normals(n, flip_x, flip_y, flip_z) + 1) / 2).clamp(0, 1)


def to_uint16(x: torch.Tensor) -> np.ndarray:
    """``[C,H,W]`` in ``[0,1]`` → ``[H,W]`` (C=1) or ``[H,W,C]`` uint16."""
    a = (x.detach().float().clamp(0, 1).cpu().numpy() * 65535.0 + 0.5).astype(np.uint16)
    return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))


def write_png16(path: str, array: np.ndarray) -> None:
    """Write a 16-bit grey ``[H,W]`` or RGB ``[H,W,3]`` PNG (numpy + zlib; PIL cannot write 16-bit RGB)."""
    a = np.asarray(array)
    if a.dtype != np.uint16:
        raise ValueError(f"write_png16 needs uint16 data, got {a.dtype}")
    if a.ndim == 2:
        ctype, ch = 0, 1
    elif a.ndim == 3 and a.shape[2] == 3:
        ctype, ch = 2, 3
    else:
        raise ValueError(f"write_png16 takes [H,W] or [H,W,3], got shape {a.shape}")
    h, w = a.shape[:2]
    rows = a.astype(">u2").reshape(h, w * ch).view(np.uint8).reshape(h, w * ch * 2)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter type 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def unique_stem(folder: str, stem: str, exts: tuple = (".png",), start: int = 1) -> str:
    """``folder/stem_00001`` with the first counter for which no ``stem_NNNNN<ext>`` exists for any of
    ``exts`` (so files saved together share a counter and nothing is overwritten)."""
    os.makedirs(folder, exist_ok=True)
    i = max(1, int(start))
    while True:
        base = os.path.join(folder, f"{stem}_{i:05d}")
        if not any(os.path.exists(base + e) for e in exts):
            return base
        i += 1
