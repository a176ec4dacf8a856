"""Folders of RGB / ground-truth pairs, shared by the evaluation and E2E fine-tuning CLIs.

Layout (file *stems* pair the files; extensions may differ)::

    root/
      rgb/       <name>.png | .jpg | .jpeg | .webp      8-bit (or 16-bit) RGB (``images/`` is read when there is
                                                       no ``rgb/``: the procedural world's layout)
      depth/     <name>.npy   float [H,W] depth (0, nan, inf = invalid)
                 <name>.png   16-bit grey; depth = value / depth_png_scale (default 1000 → millimetres),
                              0 = invalid
      normals/   <name>.npy   float [H,W,3] (or [3,H,W]) unit normals in the checkpoint's axis convention
                 <name>.png   8/16-bit RGB, n = 2·v/max − 1; (0,0,0) = invalid
      mask/      <name>.png   optional, non-zero = valid pixel

Only the sub-folder of the task in use (``depth/`` or ``normals/``) has to exist. Every image in ``rgb/``
needs a target of the same size; a missing or mismatched file is a ``FileNotFoundError`` / ``ValueError``
naming it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

RGB_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TARGET_EXTS = (".npy", ".png")
PAIR_TASKS = ("depth", "normals")


def _index(folder: str, exts: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    for f in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(f)
        if ext.lower() in exts and not f.startswith("."):
            if stem in out:
                raise ValueError(f"two files with the same name {stem!r} in {folder}: "
                                 f"{os.path.basename(out[stem])} and {f}; keep one")
            out[stem] = os.path.join(folder, f)
    return out


def read_rgb(path: str) -> torch.Tensor:
    """An image file → ``[3,H,W]`` float in ``[0,1]``."""
    from PIL import Image
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I"):
            a = np.asarray(im, dtype=np.float32) / 65535.0
            a = np.repeat(a[..., None], 3, axis=2)
        else:
            a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).clamp(0, 1)


def _read_png_array(path: str) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        a = np.asarray(im)
    return a


def read_depth(path: str, depth_png_scale: float = 1000.0) -> torch.Tensor:
    """Depth file → ``[1,H,W]`` float32 (invalid pixels: 0 or non-finite)."""
    if path.endswith(".npy"):
        a = np.load(path).astype(np.float32)
        a = np.squeeze(a)
        if a.ndim != 2:
            raise ValueError(f"{path}: depth .npy must be [H,W], got shape {a.shape}")
    else:
        a = _read_png_array(path)
        if a.ndim != 2:
            raise ValueError(f"{path}: depth PNG must be single-channel 16-bit, got shape {a.shape}")
        a = a.astype(np.float32) / float(depth_png_scale)
    return torch.from_numpy(np.ascontiguousarray(a))[None]


def read_normals(path: str) -> torch.Tensor:
    """Normal file → ``[3,H,W]`` float32 (invalid pixels: zero vectors)."""
    if path.endswith(".npy"):
        a = np.load(path).astype(np.float32)
        if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
            a = np.transpose(a, (1, 2, 0))
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"{path}: normals .npy must be [H,W,3] or [3,H,W], got shape {a.shape}")
        return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)
    a = _read_png_array(path)
    if a.ndim != 3 or a.shape[-1] < 3:
        raise ValueError(f"{path}: normals PNG must be RGB, got shape {a.shape}")
    a = a[..., :3]
    maxv = 65535.0 if a.dtype == np.uint16 else 255.0
    zero = (a == 0).all(-1)
    n = a.astype(np.float32) / maxv * 2 - 1
    n[zero] = 0
    return torch.from_numpy(np.ascontiguousarray(n)).permute(2, 0, 1)


def read_mask(path: str) -> torch.Tensor:
    a = _read_png_array(path)
    if a.ndim == 3:
        a = a[..., 0]
    return torch.from_numpy(a > 0)[None]


@dataclass
class Pair:
    name: str
    rgb: torch.Tensor      # [3,H,W] in [0,1]
    target: torch.Tensor   # [1,H,W] depth or [3,H,W] normals
    mask: torch.Tensor     # [1,H,W] bool (valid pixels)


class PairFolder:
    """Index of ``root`` (layout in the module docstring) for ``task`` ``"depth"`` or ``"normals"``."""

    def __init__(self, root: str, task: str, depth_png_scale: float = 1000.0):
        if task not in PAIR_TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {PAIR_TASKS}")
        root = os.fspath(root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"data folder {root!r} does not exist")
        rgb_dir, tgt_dir = os.path.join(root, "rgb"), os.path.join(root, task)
        if not os.path.isdir(rgb_dir) and os.path.isdir(os.path.join(root, "images")):
            rgb_dir = os.path.join(root, "images")
        for d, what in ((rgb_dir, "input images"), (tgt_dir, f"{task} ground truth")):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"data folder {root!r} has no {os.path.basename(d)}/ sub-folder ({what}); "
                                        f"expected root/rgb/<name>.png and root/{task}/<name>.npy|.png")
        self.root, self.task, self.depth_png_scale = root, task, float(depth_png_scale)
        self.rgb = _index(rgb_dir, RGB_EXTS)
        if not self.rgb:
            raise FileNotFoundError(f"{rgb_dir} contains no images ({', '.join(RGB_EXTS)})")
        self.targets = _index(tgt_dir, TARGET_EXTS)
        missing = sorted(set(self.rgb) - set(self.targets))
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) in rgb/ have no {task}/ ground truth with the same "
                                    f"name (.npy or .png): {missing[:5]}{' …' if len(missing) > 5 else ''}")
        mdir = os.path.join(root, "mask")
        self.masks = _index(mdir, (".png",)) if os.path.isdir(mdir) else {}
        self.names = sorted(self.rgb)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> Pair:
        name = self.names[i]
        rgb = read_rgb(self.rgb[name])
        path = self.targets[name]
        if self.task == "depth":
            tgt = read_depth(path, self.depth_png_scale)
            valid = torch.isfinite(tgt) & (tgt > 0)
        else:
            tgt = read_normals(path)
            valid = (torch.isfinite(tgt).all(0, keepdim=True) & (tgt.nan_to_num(0).norm(dim=0, keepdim=True) > 0.5))
        if tuple(tgt.shape[-2:]) != tuple(rgb.shape[-2:]):
            raise ValueError(f"{name}: ground truth {tuple(tgt.shape[-2:])} and image {tuple(rgb.shape[-2:])} "
                             f"have different sizes (H, W); they must match pixel for pixel")
        if name in self.masks:
            m = read_mask(self.masks[name])
            if tuple(m.shape[-2:]) != tuple(rgb.shape[-2:]):
                raise ValueError(f"{name}: mask size {tuple(m.shape[-2:])} differs from the image "
                                 f"{tuple(rgb.shape[-2:])}")
            valid = valid & m
        return Pair(name, rgb, tgt.nan_to_num(0, posinf=0, neginf=0), valid)


def write_pair(root: str, name: str, rgb: torch.Tensor, target: torch.Tensor, task: str,
               mask: Optional[torch.Tensor] = None) -> None:
    """Write one pair in the layout above (rgb PNG, target ``.npy``); used by tests and data preparation."""
    from PIL import Image
    os.makedirs(os.path.join(root, "rgb"), exist_ok=True)
    os.makedirs(os.path.join(root, task), exist_ok=True)
    a = (rgb.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    Image.fromarray(a).save(os.path.join(root, "rgb", f"{name}.png"))
    t = target.detach().cpu().float().numpy()
    np.save(os.path.join(root, task, f"{name}.npy"), t[0] if task == "depth" else np.transpose(t, (1, 2, 0)))
    if mask is not None:
        os.makedirs(os.path.join(root, "mask"), exist_ok=True)
        Image.fromarray((mask.reshape(mask.shape[-2:]).cpu().numpy() > 0).astype(np.uint8) * 255).save(
            os.path.join(root, "mask", f"{name}.png"))
