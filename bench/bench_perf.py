"""Speed and memory targets of the pack, measured side by side in one run (medians of interleaved repetitions).

    python bench/bench_perf.py                 # everything, ~10 minutes on 2 CPU cores
    python bench/bench_perf.py --only mesh     # one part: mesh | decode | sync
    python bench/bench_perf.py --real-size     # also SyncDiffusion vs MultiDiffusion with an SD 2.x-sized UNet

Parts (each prints its target next to the figure):

* **mesh** — RGBD → mesh → GLB / PLY / OBJ at 2048×512 (target ≤ 1 s each, build included) and the time and peak
  memory per pixel up to 8192×4096 (target: linear). Every size runs in a fresh process; the repetitions of the
  sizes are interleaved. Wall time is split into user and system (page-fault) CPU time, and the machine's cost of
  faulting in fresh memory is measured below and above 3 GiB held, because on some virtual machines it is several
  times higher there (a property of the machine, not of the code: the user time stays linear).
* **decode** — tiled / whole VAE decode peak memory at 4096×1024 px (target ≤ 0.25; fresh process each) and the
  PSNR of the tiled decode against the whole decode on a smooth latent (seams would lower it).
* **sync** — SyncDiffusion with its gradient passes batched across views (in groups bounded by the memory their
  backward keeps) against the official loop's structure (``tests/official_syncdiffusion.py``: every view alone,
  the anchor's gradient computed and discarded, LPIPS computing the anchor's features again for each view), at
  the paper's settings (50 DDIM steps, the first 10 synchronised, w 20, decay 0.95, LPIPS VGG, stride 16/64 of
  the window; target ≤ 0.5), and both against MultiDiffusion; tiny random models. Measured twice, in fresh
  processes: with glibc's default allocator and with one that reuses freed memory (:data:`MALLOC_REUSE`).
  ``--real-size`` adds one repetition with an SD 2.x-sized UNet and VAE on a small panorama (few steps, every
  step synchronised).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), HERE]

FORMATS = ("glb", "ply", "obj")


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---- mesh --------------------------------------------------------------------------------------------------

def _mesh_worker(size: str, formats: list[str]) -> None:
    """One size in this (fresh) process: RGBD → file for each format as the node does it (written from the grid,
    :func:`jointcore.mesh_grid.export_rgbd_mesh`), then GLB through the in-memory mesh
    (:func:`jointcore.mesh.rgbd_to_mesh` + :func:`~jointcore.mesh.export_mesh`, ``glb_memory``); times and peak RSS
    growth of each (the peak is reset before each)."""
    import resource

    import torch

    from bench_mesh import scene
    from jointcore import mesh as M
    from jointcore import mesh_io
    from jointcore.mesh_grid import export_rgbd_mesh, grid_mesh
    from jointcore.runtime.memory import process_memory, reset_peak_memory

    w, h = (int(v) for v in size.split("x"))
    img, disp = scene(h, w, torch.Generator().manual_seed(0))
    small_img, small_disp = scene(64, 128, torch.Generator().manual_seed(1))
    kw = dict(projection="cylindrical", horizontal_span_deg=360.0, depth_kind="disparity", near=1.0, far=10.0,
              max_bytes=1 << 42)

    def grid(i, d, path, fmt):
        return export_rgbd_mesh(i, d, path, fmt, **kw)[0]

    def memory(i, d, path, fmt):
        return M.export_mesh(M.rgbd_to_mesh(i, d, **kw)[0], path, fmt)[0]

    def obj_null(i, d, path, fmt):  # the same work with no file system behind it
        gm = grid_mesh(i, d, **kw)
        with open(os.devnull, "wb") as fh:
            mesh_io.write_obj(fh, gm.vertices, gm.faces, gm.normals, gm.colors)
        return None
    out = {"size": size, "pixels": w * h}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:  # warm-up: imports, first allocations, the thread pool
            grid(small_img, small_disp, os.path.join(tmp, "warm"), fmt)
        memory(small_img, small_disp, os.path.join(tmp, "warm"), "glb")
        for name, fn, fmt in [(f, grid, f) for f in formats] + [("glb_memory", memory, "glb"),
                                                                ("obj_null", obj_null, "obj")]:
            base = reset_peak_memory()  # peak RSS from here on
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            path = fn(img, disp, os.path.join(tmp, "m"), fmt)
            t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            out[name] = {"time": t1 - t0, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime,
                         "mib": os.path.getsize(path) / 2**20 if path else 0.0,
                         "peak_bytes": process_memory("VmHWM") - base}
            if path:
                os.remove(path)
    print(json.dumps(out))


def _fault_worker() -> None:
    """Cost of faulting in fresh memory (ms per MiB) while holding < 1 GiB and > 3 GiB."""
    import torch

    torch.set_num_threads(1)
    held, res = [], {}
    for i in range(16):  # 16 × 256 MiB
        x = torch.empty(256 * 2**18)
        t = time.perf_counter()
        x.fill_(1.0)
        dt = (time.perf_counter() - t) / 256 * 1e3
        held.append(x)
        res.setdefault("below_1g" if i < 3 else "above_3g" if i >= 12 else "between", []).append(dt)
    print(json.dumps({k: median(v) for k, v in res.items()}))


def _subprocess_json(args: list[str], env_extra: dict | None = None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    p = subprocess.run([sys.executable, os.path.abspath(__file__)] + args, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def mesh_part(args) -> None:
    sizes = args.mesh_sizes
    print(f"# mesh: RGBD → cylindrical 360° mesh → file, sizes {' '.join(sizes)}, formats {' '.join(FORMATS)}, "
          f"median of {args.repeats} interleaved runs, a fresh process per run", flush=True)
    runs: dict[str, list[dict]] = {s: [] for s in sizes}
    for _ in range(args.repeats):
        for s in sizes:
            r = _subprocess_json(["--_mesh", s])
            if "error" in r:
                print(f"  {s}: FAILED {r['error']}")
                continue
            runs[s].append(r)
    ref = None
    names = list(FORMATS) + ["glb_memory", "obj_null"]
    labels = {"glb_memory": "glb (in-memory mesh)", "obj_null": "obj to /dev/null"}
    for s in sizes:
        rs = runs[s]
        if not rs:
            continue
        px = rs[0]["pixels"]
        print(f"  {s}:")
        per_px = {}
        for name in names:
            tot = median([r[name]["time"] for r in rs])
            user = median([r[name]["user"] for r in rs])
            sys_ = median([r[name]["sys"] for r in rs])
            peak = median([r[name]["peak_bytes"] for r in rs]) / px
            per_px[name] = (tot / px * 1e9, user / px * 1e9, sys_ / px * 1e9, peak)
            mib = median([r[name]["mib"] for r in rs])
            print(f"    {labels.get(name, name):20s} {tot:6.2f} s ({per_px[name][0]:4.0f} ns/px: user "
                  f"{per_px[name][1]:4.0f}, sys {per_px[name][2]:4.0f}), peak {peak:4.0f} B/px"
                  + (f", file {mib / 1024:.2f} GiB" if mib else ""))
        if ref is None:
            ref = (s, per_px)
            for fmt in FORMATS:
                t = median([r[fmt]["time"] for r in rs])
                print(f"    {s} → {fmt}: {t:.2f} s (target ≤ 1 s: {'met' if t <= 1.0 else 'NOT met'})")
        else:
            ratios = "  ".join(f"{n} {per_px[n][0] / ref[1][n][0]:.2f} (user {per_px[n][1] / ref[1][n][1]:.2f}, "
                               f"memory {per_px[n][3] / ref[1][n][3]:.2f})" for n in names)
            print(f"    per-pixel time and peak memory vs {ref[0]} (1.00 = linear): {ratios}")
    try:  # a file larger than the kernel's dirty-page limit is written at the disk's speed
        with open("/proc/sys/vm/dirty_background_ratio") as fb, open("/proc/sys/vm/dirty_ratio") as fr, \
                open("/proc/meminfo") as fm:
            avail = next(int(x.split()[1]) for x in fm if x.startswith("MemAvailable")) / 2**20
            bg, hard = int(fb.read()), int(fr.read())
        print(f"  this machine's page cache: write-back starts at {bg} % and writers wait for the disk at {hard} % of "
              f"the available memory ({avail * bg / 100:.1f} / {avail * hard / 100:.1f} GiB here)")
    except (OSError, StopIteration, ValueError):
        pass
    f = _subprocess_json(["--_faults"])
    if "error" not in f:
        print(f"  this machine, faulting in fresh memory: {f['below_1g']:.2f} ms/MiB while holding < 1 GiB, "
              f"{f['above_3g']:.2f} ms/MiB while holding > 3 GiB ({f['above_3g'] / f['below_1g']:.1f}x)")


# ---- tiled decode ------------------------------------------------------------------------------------------

def decode_part(args) -> None:
    import bench_tiled as BT

    ns = argparse.Namespace(decode_h=128, decode_w=512, decode_tile=64, device=args.device, dtype="fp32", sd=False)
    print(f"# tiled VAE decode: latent 128x512 → 1024x4096 px, tile 64, peak RSS growth of a fresh process each, "
          f"median of {args.repeats} interleaved runs", flush=True)
    whole, tiled = [], []
    for _ in range(args.repeats):
        for mode, acc in (("whole", whole), ("tiled", tiled)):
            r = BT._run_decode(mode, ns)
            if "error" in r:
                print(f"  {mode}: FAILED {r['error']}")
            else:
                acc.append(r["peak_mib"])
    if whole and tiled:
        w, t = median(whole), median(tiled)
        print(f"  peak memory whole {w:.0f} MiB, tiled {t:.0f} MiB: tiled / whole {t / w:.3f} (target ≤ 0.25: "
              f"{'met' if t / w <= 0.25 else 'NOT met'})")
    BT.seam_psnr(ns)


# ---- SyncDiffusion -----------------------------------------------------------------------------------------

#: glibc's malloc serves every block over 32 MiB from a fresh mmap and unmaps it on free, so a batched gradient
#: pass page-faults its large activations in again on every call (about 0.4 ms per MiB on this VM); a caching
#: allocator (PyTorch's on a GPU; jemalloc / tcmalloc, which PyTorch's CPU tuning guide recommends) reuses them.
#: These settings make glibc keep and reuse freed memory instead.
MALLOC_REUSE = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def sync_part(args) -> None:
    """The SyncDiffusion measurement twice, each in a fresh process: with glibc's default allocator and with
    :data:`MALLOC_REUSE` (both structures under the same allocator in each)."""
    for name, env in (("glibc default allocator", {}), ("allocator reusing freed memory (MALLOC_REUSE)", MALLOC_REUSE)):
        print(f"## {name}", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--_sync", "--repeats", str(args.repeats), "--device",
               args.device, "--real-steps", str(args.real_steps)] + (["--real-size"] if args.real_size else [])
        subprocess.run(cmd, env=dict(os.environ, **env), check=True)


def _sync_measure(args) -> None:
    import torch

    import bench_tiled as BT
    from official_syncdiffusion import official_syncdiffusion

    from jointcore.denoiser import DiffusersUNetDenoiser, TextConditioning
    from jointcore.metrics_pano import load_lpips
    from jointcore.schedules import alphas_cumprod, ddim_timesteps
    from jointcore.tiled import TiledConfig, TiledStats, tiled_sample

    def setup(sd: bool, window: int):
        torch.manual_seed(0)
        unet, vae, d = BT.build_models(sd, window)
        unet, vae = unet.eval().to(args.device), vae.eval().to(args.device)
        den = DiffusersUNetDenoiser(unet, alphas_cumprod(), "epsilon")
        n_tok = 77 if sd else 7
        cond = TextConditioning(torch.randn(1, n_tok, d, device=args.device),
                                torch.randn(1, n_tok, d, device=args.device), 7.5)
        return den, vae, cond

    def run(den, vae, cond, perc, x, ts, cfg, official: bool) -> tuple[float, torch.Tensor]:
        def decode(z):
            return vae.decode(z / 0.18215).sample

        if official:  # the official loop's structure (tests/official_syncdiffusion.py)
            t0 = time.perf_counter()
            out = official_syncdiffusion(den, x, ts, cond, decode, perc, cfg.window, cfg.stride, cfg.sync_weight,
                                         cfg.sync_decay, cfg.sync_freq, cfg.sync_thres)
            return time.perf_counter() - t0, out
        stats = TiledStats()
        out = tiled_sample(den, x, ts, cond, cfg, decode=decode, perceptual=perc, stats=stats,
                           generator=torch.Generator().manual_seed(0))
        if stats.sync_view_bytes:
            print("    " + ", ".join(f"views of {h}x{w} latents: {b / 2**20:.0f} MiB kept per view for the backward, "
                                      f"{stats.sync_group_views[(h, w)]} per gradient group"
                                      for (h, w), b in stats.sync_view_bytes.items()), flush=True)
        return stats.seconds, out

    perc = load_lpips("vgg", random_backbone=True).to(args.device)
    window = 16
    den, vae, cond = setup(False, window)
    st = lambda v: max(1, round(v * window / 64))  # noqa: E731 - the paper's geometry scaled to the window
    ts = ddim_timesteps(50, "leading", steps_offset=1)
    x = torch.randn(1, 4, 16, 64, device=args.device)
    configs = {
        "official": TiledConfig.syncdiffusion(window=window, stride=st(16), sync_thres=10, view_batch=1),
        "batched": TiledConfig.syncdiffusion(window=window, stride=st(16), sync_thres=10, view_batch=16),
        "multidiffusion": TiledConfig.multidiffusion(window=window, stride=st(16), view_batch=16),
    }
    print(f"# SyncDiffusion: tiny models, latent 16x64, window {window}, stride {st(16)}, 50 DDIM steps, first 10 "
          f"synchronised, w 20, decay 0.95, LPIPS VGG (random backbone), {torch.get_num_threads()} threads, median "
          f"of {args.repeats} interleaved runs", flush=True)
    times: dict[str, list[float]] = {k: [] for k in configs}
    outs = {}
    for _ in range(args.repeats):
        for name, cfg in configs.items():
            t, outs[name] = run(den, vae, cond, perc, x, ts, cfg, name == "official")
            times[name].append(t)
    m = {k: median(v) for k, v in times.items()}
    diff = float((outs["batched"] - outs["official"]).abs().max())
    for k in configs:
        print(f"  {k:15s} {m[k]:7.2f} s")
    r = m["batched"] / m["official"]
    print(f"  batched / official structure: {r:.2f} (target ≤ 0.5: {'met' if r <= 0.5 else 'NOT met'}); largest "
          f"difference of the results {diff:.1e} (allowed 5e-3)")
    print(f"  batched / MultiDiffusion: {m['batched'] / m['multidiffusion']:.2f}; official / MultiDiffusion: "
          f"{m['official'] / m['multidiffusion']:.2f}")
    if args.real_size:
        real_size_sync(args, setup, run, perc)


def real_size_sync(args, setup, run, perc) -> None:
    import torch

    from jointcore.schedules import ddim_timesteps
    from jointcore.tiled import TiledConfig

    window, steps = 32, args.real_steps
    den, vae, cond = setup(True, window)
    ts = ddim_timesteps(steps, "leading", steps_offset=1)
    x = torch.randn(1, 4, window, 2 * window, device=args.device)
    stride = window // 4  # the paper's 16/64
    configs = {
        "multidiffusion": TiledConfig.multidiffusion(window=window, stride=stride, view_batch=16),
        "batched": TiledConfig.syncdiffusion(window=window, stride=stride, sync_thres=steps, view_batch=16),
        "official": TiledConfig.syncdiffusion(window=window, stride=stride, sync_thres=steps, view_batch=1),
    }
    print(f"# SyncDiffusion, SD 2.x-sized UNet and VAE (random weights): latent {window}x{2 * window} "
          f"({window * 8}x{window * 16} px), window {window}, stride {stride}, {steps} steps all synchronised, one "
          f"run each", flush=True)
    m = {}
    for name, cfg in configs.items():
        m[name], _ = run(den, vae, cond, perc, x, ts, cfg, name == "official")
        print(f"  {name:15s} {m[name]:7.1f} s", flush=True)
    print(f"  batched / official structure: {m['batched'] / m['official']:.2f}; batched / MultiDiffusion: "
          f"{m['batched'] / m['multidiffusion']:.2f}; official / MultiDiffusion: "
          f"{m['official'] / m['multidiffusion']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("mesh", "decode", "sync"), action="append", help="run only these parts")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (the median is reported)")
    ap.add_argument("--mesh-sizes", nargs="+", default=["2048x512", "4096x2048", "8192x4096"],
                    help="WxH, the first is the reference for the per-pixel ratios")
    ap.add_argument("--real-size", action="store_true", help="also SyncDiffusion with an SD 2.x-sized UNet")
    ap.add_argument("--real-steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--_mesh", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_faults", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_sync", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._mesh:
        return _mesh_worker(args._mesh, list(FORMATS))
    if args._faults:
        return _fault_worker()
    if args._sync:
        return _sync_measure(args)
    parts = args.only or ["mesh", "decode", "sync"]
    t0 = time.perf_counter()
    for part in parts:
        {"mesh": mesh_part, "decode": decode_part, "sync": sync_part}[part](args)
    print(f"# done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
