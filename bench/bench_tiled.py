"""Benchmark of tiled panorama sampling and tiled VAE decoding (one run, same model and size).

Prints, measured in this run:
  * SyncDiffusion / MultiDiffusion wall-time ratio and NFE counts, for the papers' settings (MultiDiffusion
    stride 8/64 of the window; SyncDiffusion stride 16/64, w 20, decay 0.95, sync every step) and for the
    recommended fast settings (sync only the first 20 % of steps, 4 views per call), and the JointNet strategy;
  * the view-batching speed-up (MultiDiffusion, 1 vs 8 views per denoiser call), and SyncDiffusion with its
    gradient passes batched across views against the official loop's structure (``tests/official_syncdiffusion.py``:
    every view alone, the anchor's gradient pass included), at the paper's settings (synchronise the first 10
    steps, w 20, decay 0.95);
  * peak memory of tiled vs whole-image VAE decoding (peak RSS growth, sampled every 0.5 ms, of a fresh
    subprocess each; torch's CPU allocator returns large blocks to the OS, so RSS follows live tensors).

Defaults use tiny random models (tests/tiny.py) at small sizes so it finishes in < 2 minutes on a CPU;
geometry is the papers' scaled by ``--window/64`` (window 64 latents → ``--window``).

    python bench/bench_tiled.py                         # small default
    python bench/bench_tiled.py --steps 50 --window 64 --pano-h 64 --pano-w 256 --lpips vgg  # paper geometry
    python bench/bench_tiled.py --decode-h 128 --decode-w 512                          # 4096x1024 decode
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402

from jointcore.denoiser import DiffusersUNetDenoiser, TextConditioning  # noqa: E402
from jointcore.metrics_pano import load_lpips  # noqa: E402
from jointcore.schedules import alphas_cumprod, ddim_timesteps  # noqa: E402
from jointcore.tiled import TiledConfig, TiledStats, tiled_decode, tiled_sample  # noqa: E402


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def build_models(sd: bool, window: int):
    """(unet, vae, cross-attention dim): tiny random models, or SD 2.x base layout (random weights)."""
    from diffusers import UNet2DConditionModel

    from tiny import tiny_unet, tiny_vae
    if not sd:
        return tiny_unet(sample_size=window), tiny_vae(), 32
    unet = UNet2DConditionModel(sample_size=window, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                use_linear_projection=True)
    return unet, sd_vae(), 1024


def sd_vae():
    from diffusers import AutoencoderKL
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)


def _decode_worker(mode: str, h: int, w: int, tile: int, circular: bool, device: str = "cpu", dtype: str = "fp32",
                   sd: bool = False) -> None:
    from tiny import tiny_vae
    torch.manual_seed(0)
    dev = torch.device(device)
    vae = (sd_vae() if sd else tiny_vae()).eval().to(dev, DTYPES[dtype])
    z = torch.randn(1, 4, h, w, device=dev, dtype=DTYPES[dtype])

    def dec(x):
        return vae.decode(x / 0.18215).sample

    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    peak = [0]
    done = threading.Event()

    def sampler():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    cuda = dev.type == "cuda"
    with torch.no_grad():
        dec(torch.randn(1, 4, 8, 8, device=dev, dtype=z.dtype))  # warm-up allocations
        if cuda:  # CUDA: peak of torch's allocated device memory above what is live before the decode
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = rss()
            th = threading.Thread(target=sampler, daemon=True)
            th.start()
        t0 = time.perf_counter()
        if mode == "whole":
            img = dec(z)
        else:
            img = tiled_decode(dec, z, tile=tile, overlap=tile // 4, context=tile // 8, circular=circular)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if cuda:
            peak[0] = torch.cuda.max_memory_allocated()
        else:
            done.set()
            th.join()
    print(json.dumps({"mode": mode, "peak_mib": (peak[0] - base) / 2**20, "seconds": dt, "shape": list(img.shape),
                      "memory": "peak cuda max_memory_allocated growth" if cuda else "peak RSS growth"}))


def _run_decode(mode, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--_decode", mode, "--decode-h", str(args.decode_h),
           "--decode-w", str(args.decode_w), "--decode-tile", str(args.decode_tile), "--device", args.device,
           "--dtype", args.dtype] + (["--sd"] if args.sd else [])
    # glibc serves allocations above this from mmap and returns them on free, so RSS follows live tensors
    # (without it the allocator keeps freed blocks and the peak depends on fragmentation: ±50 % run to run)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), MALLOC_MMAP_THRESHOLD_="65536")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:  # e.g. out of memory for the whole-image decode: report, do not abort the bench
        return {"mode": mode, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--window", type=int, default=16, help="view size in latents (SD: 64)")
    ap.add_argument("--pano-h", type=int, default=16)
    ap.add_argument("--pano-w", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="runs per config; the fastest is reported (shared CPUs)")
    ap.add_argument("--lpips", default="alex", choices=["alex", "vgg"], help="random-weight backbone (timing only)")
    ap.add_argument("--decode-h", type=int, default=64)
    ap.add_argument("--decode-w", type=int, default=256)
    ap.add_argument("--decode-tile", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--sd", action="store_true", help="SD 2.x base UNet + SD VAE layout (random weights; use "
                    "--window 64) instead of the tiny models")
    ap.add_argument("--skip-sampling", action="store_true", help="only the VAE decode memory part")
    ap.add_argument("--_decode", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._decode:
        return _decode_worker(args._decode, args.decode_h, args.decode_w, args.decode_tile, False, args.device,
                              args.dtype, args.sd)
    if not args.skip_sampling:
        sample_bench(args)
    decode_bench(args)


def sample_bench(args) -> None:
    torch.manual_seed(0)
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    unet, vae, d = build_models(args.sd, args.window)
    unet, vae = unet.eval().to(dev, dt), vae.eval().to(dev, dt)
    den = DiffusersUNetDenoiser(unet, alphas_cumprod(), "epsilon")
    n_tok = 77 if args.sd else 7
    cond = TextConditioning(torch.randn(1, n_tok, d, device=dev, dtype=dt),
                            torch.randn(1, n_tok, d, device=dev, dtype=dt), 7.5)
    perc = load_lpips(args.lpips, random_backbone=True).to(dev, dt)

    def decode(z):
        return vae.decode(z / 0.18215).sample

    ts = ddim_timesteps(args.steps, "leading", steps_offset=1)
    x = torch.randn(1, 4, args.pano_h, args.pano_w).to(dev, dt)
    s = args.window / 64
    st = lambda v: max(1, round(v * s))  # noqa: E731
    configs = {
        "multidiffusion (stride 8)": TiledConfig.multidiffusion(window=args.window, stride=st(8)),
        "multidiffusion (stride 8, 8 views/call)": TiledConfig.multidiffusion(window=args.window, stride=st(8),
                                                                            view_batch=8),
        "syncdiffusion paper (stride 16, w20, every step)": TiledConfig.syncdiffusion(
            window=args.window, stride=st(16), sync_thres=args.steps),
        "syncdiffusion fast (first 20% steps, 4 views/call)": TiledConfig.syncdiffusion_fast(
            window=args.window, stride=st(16), sync_thres=max(1, args.steps // 5)),
        "multidiffusion (stride 16, 4 views/call)": TiledConfig.multidiffusion(window=args.window, stride=st(16),
                                                                             view_batch=4),
        "jointnet strategy (stride 32)": TiledConfig.jointnet(window=args.window, stride=st(32)),
        "syncdiffusion paper, first 10 steps, batched": TiledConfig.syncdiffusion(
            window=args.window, stride=st(16), sync_thres=min(10, args.steps), view_batch=16),
    }
    print(f"# tiled sampling: latent {args.pano_h}x{args.pano_w}, window {args.window}, {args.steps} DDIM steps, "
          f"{'SD 2.x-sized' if args.sd else 'tiny'} UNet, LPIPS {args.lpips}, device {dev}, {args.dtype}, "
          f"torch threads {torch.get_num_threads()}, best of {args.repeats}")
    res = {}
    for name, cfg in configs.items():
        best = None
        for _ in range(max(1, args.repeats)):
            stats = TiledStats()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            tiled_sample(den, x, ts, cond, cfg, decode=decode, perceptual=perc, stats=stats,
                         generator=torch.Generator().manual_seed(0))
            if dev.type == "cuda":
                torch.cuda.synchronize()  # (tiled_sample already syncs each step via its coverage check)
            best = stats if best is None or stats.seconds < best.seconds else best
        res[name] = stats = best
        print(f"{name:52s} {stats.seconds:7.2f} s  NFE {stats.nfe:5d} (grad {stats.grad_evals:4d}, "
              f"whole {stats.whole_evals:3d})  calls {stats.denoiser_calls:5d}  decodes {stats.decodes}")
    md = res["multidiffusion (stride 8)"].seconds
    sp = res["syncdiffusion paper (stride 16, w20, every step)"].seconds
    sf = res["syncdiffusion fast (first 20% steps, 4 views/call)"].seconds
    print(f"ratio syncdiffusion paper / multidiffusion  : {sp / md:.2f}")
    print(f"ratio syncdiffusion fast  / multidiffusion  : {sf / md:.2f}")
    print(f"ratio jointnet strategy   / multidiffusion  : {res['jointnet strategy (stride 32)'].seconds / md:.2f}")
    print(f"view batching speed-up (1 vs 8 views/call)  : "
          f"{md / res['multidiffusion (stride 8, 8 views/call)'].seconds:.2f}x")
    # the official loop's structure (tests/official_syncdiffusion.py): every view alone, the anchor's gradient pass
    # included, LPIPS computing the anchor's features again for every view
    from official_syncdiffusion import official_syncdiffusion

    times = []
    for _ in range(max(1, args.repeats)):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        official_syncdiffusion(den, x, ts, cond, decode, perc, args.window, st(16), sync_thres=min(10, args.steps))
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    one = min(times)
    print(f"{'syncdiffusion paper, first 10 steps, official structure':52s} {one:7.2f} s")
    many = res["syncdiffusion paper, first 10 steps, batched"].seconds
    print(f"syncdiffusion batched / official structure : {many / one:.2f} (target <= 0.5)")


def decode_bench(args) -> None:
    print(f"# VAE decode: latent {args.decode_h}x{args.decode_w} -> {args.decode_h * 8}x{args.decode_w * 8} px, "
          f"{'SD' if args.sd else 'tiny'} VAE, tile {args.decode_tile}, device {args.device}, {args.dtype}", flush=True)
    whole = _run_decode("whole", args)
    tiled = _run_decode("tiled", args)
    for r in (whole, tiled):
        if "error" in r:
            print(f"decode {r['mode']:6s} FAILED: {r['error']}")
        else:
            print(f"decode {r['mode']:6s} {r['memory']} {r['peak_mib']:8.1f} MiB  {r['seconds']:.2f} s")
    if "error" not in whole and "error" not in tiled:
        print(f"peak memory tiled / whole: {tiled['peak_mib'] / max(whole['peak_mib'], 1e-6):.3f} (target <= 0.25)")
    seam_psnr(args)


def seam_psnr(args) -> None:
    """PSNR of the tiled decode against the whole decode on a smooth latent (seams would lower it)."""
    from tiny import tiny_vae
    torch.manual_seed(0)
    vae = (sd_vae() if args.sd else tiny_vae()).eval()
    h, w = max(8, args.decode_h // 2), max(8, args.decode_w // 2)
    coarse = torch.randn(1, 4, max(2, h // 8), max(2, w // 8))
    z = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)

    def dec(x):
        return vae.decode(x / 0.18215).sample
    with torch.no_grad():
        whole = dec(z)
        tiled = tiled_decode(dec, z, tile=args.decode_tile, overlap=args.decode_tile // 4,
                             context=args.decode_tile // 8)
    rng = float(whole.max() - whole.min())
    mse = float(((tiled - whole) ** 2).mean())
    print(f"tiled vs whole decode on a smooth {h}x{w} latent: PSNR {10 * math.log10(rng ** 2 / max(mse, 1e-20)):.1f} dB")


if __name__ == "__main__":
    main()
