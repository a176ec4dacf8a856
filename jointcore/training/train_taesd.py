"""Train a TAESD-layout autoencoder (8× down-sampling, 4 latent channels) from scratch on an image folder.

Why TAESD's layout: it is the one small 8×/4-channel autoencoder that **both** ComfyUI and diffusers load
without custom code. ComfyUI switches a checkpoint's VAE to its TAESD class when it finds
``first_stage_model.taesd_decoder.*`` keys (every version the pack supports), and diffusers loads the same
weights as ``AutoencoderTiny``. It has 2.4 M parameters (5 MB in fp16), so it trains on two CPU cores
and ships cheaply; an SD ``AutoencoderKL`` is 84 M parameters.

Recipe (no teacher VAE exists here, so this is a plain autoencoder, not TAESD's distillation):
``loss = MSE + 0.5·L1`` in pixel space (``[-1, 1]``) plus a small moment penalty that keeps every latent
channel near zero mean and unit standard deviation over the batch (the scale a diffusion UNet expects, so
the checkpoint's latent scale is exactly SD's), and Gaussian noise of standard deviation ``--latent-noise``
added to the latents before decoding (a decoder that tolerates imperfect sampled latents). AdamW, linear
warm-up, exponential decay (as :func:`jointcore.train_e2e.lr_factor`), random horizontal flips.

Latents are in diffusers' ``AutoencoderTiny`` convention (``scaling_factor`` 1: the encoder's output *is* the
UNet's input). In a ComfyUI checkpoint this is ``vae_scale = 0.18215`` (see
:mod:`jointcore.family.assemble`).

Run::

    python -m jointcore.training.train_taesd --data WORLD_FOLDER --val-data HELDOUT_FOLDER --output OUT
    accelerate launch -m jointcore.training.train_taesd …

Writes ``OUT/`` (diffusers ``AutoencoderTiny``: ``config.json`` + ``diffusion_pytorch_model.safetensors``),
``OUT/metrics.json`` (held-out PSNR, latent statistics) and ``OUT/loss_log.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.nn.functional as F

from jointcore.train_e2e import lr_factor
from jointcore.training.common import LossLog, list_images, load_images_uint8, psnr, run_cli


def build_model():
    """A fresh ``AutoencoderTiny`` in TAESD's SD layout (the layout ComfyUI's TAESD class has)."""
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(encoder_block_out_channels=(64, 64, 64, 64), decoder_block_out_channels=(64, 64, 64, 64),
                           num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1), latent_channels=4,
                           upsampling_scaling_factor=2, act_fn="relu", upsample_fn="nearest", scaling_factor=1.0)


def moment_penalty(z: torch.Tensor) -> torch.Tensor:
    """``mean_c (μ_c² + (σ_c − 1)²)`` over the batch and positions of each latent channel."""
    zc = z.transpose(0, 1).flatten(1)
    return (zc.mean(1).square() + (zc.std(1) - 1).square()).mean()


def reconstruct(vae, x: torch.Tensor, latent_noise: float = 0.0, generator=None):
    """``x`` in ``[-1,1]`` → (reconstruction in ``[-1,1]``, latents)."""
    z = vae.encoder(x)
    zn = z if latent_noise <= 0 else z + latent_noise * torch.randn(z.shape, generator=generator, device=z.device)
    return vae.decoder(zn), z


@torch.no_grad()
def evaluate(vae, images_uint8: torch.Tensor, batch: int = 64) -> dict:
    """Held-out PSNR (dB, images in [0,1]) and latent statistics of a uint8 ``[N,3,H,W]`` set."""
    vae.eval()
    ps, zs = [], []
    for i in range(0, len(images_uint8), batch):
        x = images_uint8[i:i + batch].float() / 127.5 - 1
        y, z = reconstruct(vae, x)
        ps.append(psnr((y.clamp(-1, 1) + 1) / 2, (x + 1) / 2))
        zs.append(z.transpose(0, 1).flatten(1))
    p, z = torch.cat(ps), torch.cat(zs, 1)
    return {"psnr_mean_db": p.mean().item(), "psnr_p10_db": p.quantile(0.1).item(), "images": len(p),
            "latent_mean": z.mean(1).tolist(), "latent_std": z.std(1).tolist()}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jointcore.training.train_taesd", description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="folder with images/ (e.g. python -m jointcore.data.world --out …)")
    ap.add_argument("--val-data", default=None, help="held-out folder for the PSNR in metrics.json")
    ap.add_argument("--output", required=True)
    ap.add_argument("--max-steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (split over processes)")
    ap.add_argument("--crop", type=int, default=0, help="random square crops of this size (0 = whole images)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--final-lr-ratio", type=float, default=0.05)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--moment-weight", type=float, default=0.01)
    ap.add_argument("--latent-noise", type=float, default=0.05)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true")
    return ap


def _batch(images: torch.Tensor, idx: torch.Tensor, crop: int, g: torch.Generator) -> torch.Tensor:
    x = images[idx].float() / 127.5 - 1
    flip = torch.rand(len(idx), generator=g) < 0.5
    x[flip] = x[flip].flip(-1)
    if crop:
        h, w = x.shape[-2:]
        if crop > min(h, w) or crop % 8:
            raise ValueError(f"--crop {crop} px must be a multiple of 8 and at most the image size {w}×{h} px")
        top = int(torch.randint(0, h - crop + 1, (1,), generator=g))
        left = int(torch.randint(0, w - crop + 1, (1,), generator=g))
        x = x[..., top:top + crop, left:left + crop]
    return x


def train(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator

    acc = Accelerator(cpu=args.cpu)
    if args.batch_size % acc.num_processes:
        raise ValueError(f"--batch-size {args.batch_size} must divide by the {acc.num_processes} processes")
    torch.manual_seed(args.seed)
    images = load_images_uint8(list_images(args.data))
    h, w = images.shape[-2:]
    if h % 8 or w % 8:
        raise ValueError(f"{args.data}: image size {w}×{h} px is not a multiple of 8")
    vae = build_model()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.warmup_steps, args.max_steps, args.final_lr_ratio))
    vae, opt = acc.prepare(vae, opt)
    log = LossLog(os.path.join(args.output, "loss_log.jsonl"), acc.is_main_process)
    # one global sample order for every process (same seed), each process takes its slice of the batch
    g = torch.Generator().manual_seed(args.seed)
    gn = torch.Generator().manual_seed(args.seed + 1 + acc.process_index)
    per = args.batch_size // acc.num_processes
    lo = acc.process_index * per
    vae.train()
    perm, pos = torch.randperm(len(images), generator=g), 0
    run = {}
    for step in range(args.max_steps):
        if pos + args.batch_size > len(perm):
            perm, pos = torch.randperm(len(images), generator=g), 0
        idx = perm[pos:pos + args.batch_size][lo:lo + per]
        pos += args.batch_size
        x = _batch(images, idx, args.crop, g).to(acc.device)
        m = acc.unwrap_model(vae)
        y, z = reconstruct(m, x, args.latent_noise, gn)
        rec = F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x)
        mom = moment_penalty(z)
        loss = rec + args.moment_weight * mom
        acc.backward(loss)
        acc.clip_grad_norm_(vae.parameters(), args.max_grad_norm)
        opt.step()
        opt.zero_grad()
        sched.step()
        for k, v in (("loss", loss), ("recon", rec), ("moments", mom)):
            run[k] = run.get(k, 0.0) + float(acc.reduce(v.detach(), "mean"))
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            n = args.log_every if (step + 1) % args.log_every == 0 else (step + 1) % args.log_every
            log(step + 1, **{k: v / n for k, v in run.items()}, lr=sched.get_last_lr()[0])
            run = {}
    acc.wait_for_everyone()
    result = {"output": args.output}
    if acc.is_main_process:
        final = acc.unwrap_model(vae).eval()
        final.save_pretrained(args.output, safe_serialization=True)
        metrics = {"train_images": len(images), "steps": args.max_steps, "batch_size": args.batch_size,
                   "processes": acc.num_processes}
        if args.val_data:
            metrics["heldout"] = evaluate(final, load_images_uint8(list_images(args.val_data)))
        with open(os.path.join(args.output, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=1)
        result.update(metrics)
    acc.end_training()
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
