"""Small pieces the family's training CLIs share: image folders in memory, loss logs, EMA, seeds."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def run_cli(fn: Callable[[], object]) -> int:
    """Run a CLI body; a user error (missing file, bad value) becomes ``error: …`` on stderr and exit code 2."""
    try:
        fn()
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def list_images(folder: str) -> list[str]:
    """Sorted image paths of ``folder/images`` (the world writer's layout) or of ``folder`` itself."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data folder {folder!r} does not exist")
    d = os.path.join(folder, "images") if os.path.isdir(os.path.join(folder, "images")) else folder
    paths = sorted(os.path.join(d, f) for f in os.listdir(d) if f.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise ValueError(f"data folder {folder!r} has no images ({'/'.join(IMAGE_EXTS)}) in {d!r}")
    return paths


def load_images_uint8(paths: list[str]) -> torch.Tensor:
    """``[N,3,H,W]`` uint8; every image must have the size of the first (named in the error otherwise)."""
    from PIL import Image

    arrs = []
    for p in paths:
        with Image.open(p) as im:
            a = np.asarray(im.convert("RGB"))
        if arrs and a.shape != arrs[0].shape:
            raise ValueError(f"{p}: size {a.shape[1]}×{a.shape[0]} px differs from the first image's "
                             f"{arrs[0].shape[1]}×{arrs[0].shape[0]} px")
        arrs.append(a)
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


class LossLog:
    """Appends one JSON line per logged step to ``path`` (``None``: no file) and prints a short line."""

    def __init__(self, path: Optional[str], enabled: bool = True):
        self.path, self.enabled, self.t0 = path, enabled, time.time()
        if path and enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, step: int, **values) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time_s": round(time.time() - self.t0, 2), **{k: float(v) for k, v in values.items()}}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        print(" ".join(f"{k} {v:.5g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()), flush=True)


class EMA:
    """Exponential moving average of a module's parameters (kept in fp32 on the module's device)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # warm-up as in diffusers' EMAModel
        for n, p in module.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1 - d)

    @torch.no_grad()
    def copy_to(self, module: torch.nn.Module) -> None:
        for n, p in module.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of ``[B,C,H,W]`` images in ``[0,1]``."""
    mse = (a.float() - b.float()).square().flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)
