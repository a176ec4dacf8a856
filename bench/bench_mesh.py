"""Benchmark: RGB-D → mesh build and GLB write time, and how it scales with the pixel count (target: linear).

    OMP_NUM_THREADS=1 python bench/bench_mesh.py                      # 512x512 vs 2048x512 (default)
    python bench/bench_mesh.py --sizes 512x512 2048x1024 4096x2048     # larger inputs
    python bench/bench_mesh.py --projection equirectangular --format ply

Prints, per size, the best-of-``--repeat`` times for building the mesh and for writing it, then the time
ratio of each size against the first next to the pixel ratio (a ratio / pixel ratio near 1 means linear).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jointcore import mesh as M  # noqa: E402


def scene(h: int, w: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth disparity field with a few step edges (so discontinuity cutting has work) and colours."""
    y = torch.linspace(0, 1, h)[:, None]
    x = torch.linspace(0, 1, w)[None, :]
    disp = 0.3 + 0.2 * torch.sin(6.28 * x) * torch.cos(3.14 * y)
    disp = disp + 0.3 * ((x > 0.3) & (x < 0.6) & (y > 0.4)).float()
    img = torch.rand(3, h, w, generator=gen)
    return img, disp


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["512x512", "2048x512"], help="WxH, first is the reference")
    ap.add_argument("--projection", default="cylindrical", choices=M.PROJECTIONS)
    ap.add_argument("--format", default="glb", choices=M.FORMATS)
    ap.add_argument("--color", default="vertex", choices=M.COLOR_MODES)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    gen = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.sizes:
            w, h = (int(v) for v in s.lower().split("x"))
            img, disp = scene(h, w, gen)
            build = lambda: M.rgbd_to_mesh(img, disp, projection=args.projection, horizontal_span_deg=360.0,  # noqa: E731
                                           depth_kind="disparity", near=1.0, far=10.0)[0]
            t_build, mesh = best_of(build, args.repeat)
            write = lambda: M.export_mesh(mesh, os.path.join(tmp, f"bench_{w}x{h}"), args.format,  # noqa: E731
                                          color=args.color)
            t_write, paths = best_of(write, args.repeat)
            size = os.path.getsize(paths[0])
            rows.append((w, h, t_build, t_write, mesh.vertices.shape[0], mesh.faces.shape[0], size))
            print(f"{w}x{h}: build {t_build * 1e3:8.1f} ms  write {args.format} {t_write * 1e3:8.1f} ms  "
                  f"total {(t_build + t_write) * 1e3:8.1f} ms  ({mesh.vertices.shape[0]} vertices, "
                  f"{mesh.faces.shape[0]} faces, {size / 2**20:.1f} MiB)")
    w0, h0, b0, wr0 = rows[0][0], rows[0][1], rows[0][2], rows[0][3]
    for w, h, b, wr, *_ in rows[1:]:
        px = (w * h) / (w0 * h0)
        tot = (b + wr) / (b0 + wr0)
        print(f"{w}x{h} vs {w0}x{h0}: pixel ratio {px:.2f}  build ratio {b / b0:.2f}  write ratio {wr / wr0:.2f}  "
              f"total ratio {tot:.2f}  (total/pixel = {tot / px:.2f}; 1.00 = linear)")


if __name__ == "__main__":
    main()
