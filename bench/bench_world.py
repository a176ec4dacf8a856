"""Benchmark: procedural-world rendering throughput (scenes/s), scene sampling included.

    python bench/bench_world.py                    # 64², 256² perspective, 512×128 360° cylinder, 256×128 equirect
    python bench/bench_world.py --threads 1        # one intra-op thread (best on a busy 2-core machine)
    python bench/bench_world.py --n64 1000 --supersample 1 2

Target: ≥ 1000 scenes of 64×64 in ≤ 10 s on 2 CPU cores. Each case renders ``n`` fresh seeds once after a
small warm-up; RGB with ``s×s`` supersampling costs about ``s² + 1`` ray casts per pixel (the ground truth
is a separate pixel-centre pass).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jointcore.data import world as W  # noqa: E402


def run(label: str, n: int, h: int, w: int, camera: str, ss: int, seed0: int) -> float:
    W.render_seeds(range(seed0, seed0 + min(n, 4)), h, w, camera, supersample=ss)   # warm-up
    t0 = time.perf_counter()
    W.render_seeds(range(seed0, seed0 + n), h, w, camera, supersample=ss)
    dt = time.perf_counter() - t0
    mrays = n * h * w * (ss * ss + (ss > 1)) / dt / 1e6
    print(f"{label:<34} ss={ss}  {n:5d} scenes  {dt:7.2f} s  {n / dt:8.1f} scenes/s  {mrays:5.2f} Mrays/s", flush=True)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--supersample", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--n64", type=int, default=1000, help="scenes for the 64×64 case")
    ap.add_argument("--n256", type=int, default=32)
    ap.add_argument("--npano", type=int, default=32)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    for ss in args.supersample:
        dt = run("perspective 64x64", args.n64, 64, 64, "perspective", ss, 0)
        if args.n64 >= 1000:
            print(f"  -> 1000 scenes of 64x64 in {dt * 1000 / args.n64:.2f} s (target <= 10 s)")
        run("perspective 256x256", args.n256, 256, 256, "perspective", ss, 10_000)
        run("cylindrical 360 deg 512x128", args.npano, 128, 512, "cylindrical", ss, 20_000)
        run("equirectangular 256x128", args.npano, 128, 256, "equirectangular", ss, 30_000)


if __name__ == "__main__":
    main()
