"""Single-step predictor overhead, measured in one run on one model and one image size.

Prints two ratios of minimum times (runs interleaved; process CPU time on the CPU, wall time on CUDA):

* ``predictor / floor``  — ``DepthNormalPredictor.predict`` (1 step) vs the bare minimum work
  (VAE encode + one UNet call + VAE decode, empty embedding precomputed).            target <= 1.10
* ``predictor / diffusers`` — vs diffusers' ``MarigoldDepthPipeline`` with one step, built from the
  same components (trailing DDIM scheduler, ``output_type="pt"``).                   target <= 1.00

Default: a small random Marigold-shaped model (UNet channels 64/128, VAE 32/64/64/64) at 128×128 on the
CPU, a few seconds. Real sizes: ``--checkpoint DIR --size 768 --device cuda --dtype fp16``, or without a checkpoint
``--sd --size 768 --device cuda --dtype fp16`` (random weights of the real Marigold/SD 2.x size).

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_predictor.py [--size 128] [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import torch  # noqa: E402

from jointcore.predictor import DepthNormalPredictor, load_predictor  # noqa: E402


def build_random(workdir: str, sd: bool = False):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from predictor_ckpt import tiny_clip_tokenizer
    from tiny import tiny_text_encoder
    torch.manual_seed(0)
    if sd:  # Marigold = SD 2.x layout with an 8-channel input conv, SD VAE (random weights: cost only)
        unet = UNet2DConditionModel(in_channels=8, out_channels=4, cross_attention_dim=1024,
                                    attention_head_dim=(5, 10, 20, 20), use_linear_projection=True).eval()
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4).eval()
        te = tiny_text_encoder(hidden_size=1024)
    else:
        unet = UNet2DConditionModel(
            sample_size=32, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16).eval()
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64),
                            layers_per_block=1, norm_num_groups=16, sample_size=128).eval()
        te = tiny_text_encoder(hidden_size=64)
    tok = tiny_clip_tokenizer(os.path.join(workdir, "tok"))
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="v_prediction", timestep_spacing="trailing", steps_offset=1,
                          set_alpha_to_one=False, clip_sample=False)
    return DepthNormalPredictor(unet, vae, te, tok, sched)


def interleaved_min(fns: dict, repeats: int, sync, clock=time.perf_counter) -> dict:
    """Minimum time of each function, timed in rotating order (machine noise hits all alike)."""
    for fn in fns.values():  # warm-up
        fn()
    sync()
    times = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = clock()
            fns[k]()
            sync()
            times[k].append(clock() - t0)
    return {k: min(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a real diffusers folder (default: random small model)")
    ap.add_argument("--size", type=int, default=128, help="square image size (multiple of 8)")
    ap.add_argument("--repeats", type=int, default=15, help="timed runs of each (minimum reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--sd", action="store_true", help="random full-size Marigold model (SD 2.x UNet, 8 input "
                    "channels; SD VAE) instead of the small one, when no --checkpoint is given")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as wd:
        pred = (load_predictor(args.checkpoint, dtype=args.dtype, device=args.device) if args.checkpoint
                else build_random(wd, args.sd).to(args.device, {"fp32": torch.float32, "fp16": torch.float16,
                                                       "bf16": torch.bfloat16}[args.dtype]))
        if not args.checkpoint:
            pred.vae.to(pred.dtype)
        dev = pred.device
        sync = (lambda: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda: None)
        img = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        emb = pred.empty_text_embedding()
        ab = pred.alphas_cumprod

        @torch.no_grad()
        def floor():
            x = (img.to(dev) * 2 - 1).to(pred.vae_dtype)
            lat = pred.vae.encode(x).latent_dist.mean * pred.latent_scale
            z = torch.zeros_like(lat)
            v = pred.unet(torch.cat([lat, z], 1).to(pred.dtype), 999, encoder_hidden_states=emb).sample
            x0 = -((1 - ab[999]) ** 0.5).item() * v
            return pred.vae.decode(x0.to(pred.vae_dtype) / pred.latent_scale).sample

        def ours():
            return pred.predict(img, "depth", processing_resolution=0, steps=1)

        from diffusers import MarigoldDepthPipeline
        pipe = MarigoldDepthPipeline(unet=pred.unet, vae=pred.vae, scheduler=pred.scheduler,
                                     text_encoder=pred.text_encoder, tokenizer=pred.tokenizer,
                                     prediction_type="depth", default_denoising_steps=1,
                                     default_processing_resolution=0)
        pipe.set_progress_bar_config(disable=True)

        def diffusers_pipe():
            return pipe(img.to(dev), num_inference_steps=1, ensemble_size=1, processing_resolution=0,
                        output_type="pt", batch_size=1, generator=torch.Generator(dev).manual_seed(0))

        # CPU: process CPU time (run with OMP_NUM_THREADS=1) is robust to other load on a shared machine;
        # CUDA: wall time after synchronize.
        clock = time.perf_counter if dev.type == "cuda" else time.process_time
        t = interleaved_min({"floor": floor, "ours": ours, "diffusers": diffusers_pipe}, args.repeats, sync, clock)
        tf, to, td = t["floor"], t["ours"], t["diffusers"]

    print(f"device {dev} ({'wall' if dev.type == 'cuda' else 'process CPU'} time, min of {args.repeats}), "
          f"dtype {args.dtype}, image {args.size}x{args.size}, "
          f"model {args.checkpoint or ('random SD-2.x-sized' if args.sd else 'random small')}")
    print(f"floor (encode + 1 UNet + decode): {tf * 1e3:8.2f} ms")
    print(f"predictor single step:            {to * 1e3:8.2f} ms")
    print(f"diffusers MarigoldDepthPipeline:  {td * 1e3:8.2f} ms")
    r1, r2 = to / tf, to / td
    print(f"ratio predictor/floor     = {r1:.3f}  (target <= 1.10) {'OK' if r1 <= 1.10 else 'MISSED'}")
    print(f"ratio predictor/diffusers = {r2:.3f}  (target <= 1.00) {'OK' if r2 <= 1.00 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
