"""End-to-end fine-tuning of an image-conditional diffusion predictor (Garcia et al. 2024, E2E-FT).

The UNet is trained as a deterministic one-step model: ``t = T−1`` (999), target latent = zeros,
``x0`` from the model output by the scheduler's prediction type, decoded by the **frozen** VAE, and a task
loss in pixel space:

* depth: scale-and-shift-invariant L1, ``mean_valid |s·d̂ + b − d|`` with ``(s, b)`` the least-squares fit of
  the prediction ``d̂ = clip(mean_c(D(x0)), −1, 1)`` to the ground-truth depth ``d`` (per image, differentiable);
* normals: mean angular error ``arccos(⟨n̂, n⟩)`` with ``n̂ = D(x0)/(‖D(x0)‖ + 1e-5)``.

AdamW, linear warm-up then exponential decay to ``final_lr_ratio``, gradient accumulation, gradient
clipping; VAE and text encoder frozen. The empty-prompt embedding is padded to 77 tokens as in the
reference training (``--text-padding do_not_pad`` uses the inference embedding instead). The result is
saved in the diffusers folder layout :func:`jointcore.predictor.load_predictor` reads, with a trailing
DDIM scheduler.

Run::

    python -m jointcore.train_e2e --checkpoint BASE --data DATA --task depth --output OUT
    accelerate launch -m jointcore.train_e2e --checkpoint BASE --data DATA --task depth --output OUT
    accelerate launch jointcore/train_e2e.py …    (also works as a plain script)

Paper settings: lr 3e-5, warm-up 100, batch 2 × accumulation 16, 20k steps, random horizontal flip.
The data folder layout is :mod:`jointcore.pairs`.

``--objective marigold`` trains the same 8-channel UNet the way Marigold (Ke et al. 2024) does, as a
conditional diffusion model — the model E2E-FT then fine-tunes: the target (depth normalised per image to
``[−1,1]`` between its 2nd and 98th percentiles and repeated to 3 channels, or the normals) is encoded by the
frozen VAE, noised at a uniform random timestep with multi-resolution noise (strength 0.9, annealed by
``t/T``), and the UNet, given ``[rgb latent, noisy target latent]``, is trained by MSE on the scheduler's
prediction type (v) over latents whose 8×8 patch is fully valid.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file (accelerate launch jointcore/train_e2e.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from jointcore.metrics import lstsq_scale_shift
from jointcore.pairs import PairFolder
from jointcore.predictor import DepthNormalPredictor, load_predictor, resize_bilinear
from jointcore.training.common import LossLog, run_cli

E2E_TIMESTEP = 999


# ---- losses ----------------------------------------------------------------------------------------------

def ssi_l1_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scale-and-shift-invariant L1: align ``pred`` ``[B,1,H,W]`` to ``gt`` by least squares on ``mask``
    (differentiable in ``pred``), then the mean absolute error over all valid pixels of the batch."""
    m = mask.bool()
    if not m.any():
        return pred.sum() * 0.0
    s, b = lstsq_scale_shift(pred, gt, m)
    shape = (-1,) + (1,) * (pred.ndim - 1)
    aligned = pred.double() * s.reshape(shape) + b.reshape(shape)
    return (aligned - gt.double()).abs()[m].mean().float()


def angular_loss(pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Mean angle (radians) between unit ``[B,3,H,W]`` maps over ``mask`` ``[B,1,H,W]``.

    The cosine is clamped to ``[−1+eps, 1−eps]`` so that arccos has a finite gradient.
    """
    m = mask.bool()[:, 0]
    if not m.any():
        return pred.sum() * 0.0
    cos = (pred.float() * gt.float()).sum(1).clamp(-1 + eps, 1 - eps)
    return torch.arccos(cos)[m].mean()


def lr_factor(step: int, warmup_steps: int, total_steps: int, final_ratio: float) -> float:
    """Linear warm-up ``step/warmup`` then ``final_ratio^((step−warmup)/(total−warmup))`` (Marigold/E2E-FT)."""
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if step >= total_steps:
        return final_ratio
    return math.exp((step - warmup_steps) / max(1, total_steps - warmup_steps) * math.log(final_ratio))


# ---- data ------------------------------------------------------------------------------------------------

class E2EDataset(torch.utils.data.Dataset):
    """:class:`PairFolder` samples resized to ``(height, width)`` with optional random horizontal flip.

    RGB: bilinear (antialiased); ground truth and mask: nearest (no blending across invalid pixels).
    A flip negates the x component of normals.
    """

    def __init__(self, folder: PairFolder, height: int, width: int, hflip: bool = True, seed: int = 0):
        self.folder, self.size, self.hflip = folder, (int(height), int(width)), bool(hflip)
        if min(self.size) < 8 or self.size[0] % 8 or self.size[1] % 8:
            raise ValueError(f"training size {self.size} must be positive multiples of 8")
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> dict:
        p = self.folder[i]
        rgb = resize_bilinear(p.rgb[None], self.size)[0].clamp(0, 1)
        tgt = F.interpolate(p.target[None], size=self.size, mode="nearest")[0]
        mask = F.interpolate(p.mask[None].float(), size=self.size, mode="nearest")[0] > 0.5
        if self.folder.task == "normals":
            tgt = F.normalize(tgt, dim=0) * mask
        if self.hflip and torch.rand((), generator=self.gen).item() < 0.5:
            rgb, tgt, mask = rgb.flip(-1), tgt.flip(-1), mask.flip(-1)
            if self.folder.task == "normals":
                tgt[0] = -tgt[0]
        return {"rgb": rgb, "target": tgt, "mask": mask}


# ---- model step ------------------------------------------------------------------------------------------

def padded_empty_embedding(pred: DepthNormalPredictor, padding: str) -> torch.Tensor:
    """Empty-prompt embedding ``[1,L,D]``: ``"max_length"`` (77 tokens, as the reference training) or
    ``"do_not_pad"`` (2 tokens, as inference)."""
    if padding == "do_not_pad":
        return pred.empty_text_embedding()
    if padding != "max_length":
        raise ValueError(f"unknown text padding {padding!r}; use 'max_length' or 'do_not_pad'")
    ids = pred.tokenizer("", padding="max_length", max_length=pred.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    dev = next(pred.text_encoder.parameters()).device
    with torch.no_grad():
        return pred.text_encoder(ids.to(dev))[0]


def e2e_forward(pred: DepthNormalPredictor, rgb: torch.Tensor, task: str, text_embedding: torch.Tensor
                ) -> torch.Tensor:
    """One-step prediction with autograd through the UNet and the frozen decoder.

    Args:
        rgb: ``[B,3,H,W]`` in ``[0,1]`` (H, W multiples of 8).

    Returns:
        depth ``[B,1,H,W]`` in ``[−1,1]`` or normals ``[B,3,H,W]`` (unit length).
    """
    with torch.no_grad():
        rgb_latent = pred.encode_rgb(rgb * 2 - 1).float()
    x0 = pred.unet_x0(rgb_latent, torch.zeros_like(rgb_latent), E2E_TIMESTEP, text_embedding)
    y = pred.decode(x0).float()
    if task == "depth":
        return y.mean(dim=1, keepdim=True).clamp(-1, 1)
    return (y / (y.norm(p=2, dim=1, keepdim=True) + 1e-5)).clamp(-1, 1)


def multi_res_noise(shape: tuple, strength: torch.Tensor, generator: Optional[torch.Generator] = None,
                    device=None) -> torch.Tensor:
    """Marigold's multi-resolution ("pyramid") noise: a full-resolution Gaussian plus Gaussians drawn at sizes
    shrinking by a random factor in [2, 4) per level, bilinearly upsampled and weighted ``strength^i``,
    then the whole tensor rescaled to unit standard deviation. ``strength`` ``[B]`` (annealed per sample)."""
    b, c, h, w = shape
    s = strength.reshape(-1, 1, 1, 1).to(device)
    noise = torch.randn(shape, generator=generator, device=device)
    for i in range(10):
        r = torch.rand(1, generator=generator, device=device).item() * 2 + 2
        hh, ww = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        noise = noise + F.interpolate(torch.randn(b, c, hh, ww, generator=generator, device=device), size=(h, w),
                                      mode="bilinear") * s ** i
        if hh == 1 or ww == 1:
            break
    return noise / noise.std()


def percentile_normalise(depth: torch.Tensor, mask: torch.Tensor, low: float = 0.02, high: float = 0.98
                         ) -> torch.Tensor:
    """Marigold's affine-invariant depth target: per image, ``[p_low, p_high]`` of the valid depth → ``[−1,1]``,
    clipped. ``depth``, ``mask`` ``[B,1,H,W]``."""
    out = torch.zeros_like(depth, dtype=torch.float32)
    for i in range(depth.shape[0]):
        v = depth[i][mask[i].bool()].float()
        if v.numel() == 0:
            continue
        lo, hi = torch.quantile(v, low), torch.quantile(v, high)
        out[i] = ((depth[i].float() - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1).clamp(-1, 1)
    return out


def marigold_loss(pred: DepthNormalPredictor, batch: dict, task: str, text_embedding: torch.Tensor,
                  generator: Optional[torch.Generator] = None, noise_strength: float = 0.9) -> torch.Tensor:
    """One Marigold diffusion-training loss on a batch (see the module notes)."""
    rgb, tgt, mask = (batch[k].to(pred.device) for k in ("rgb", "target", "mask"))
    with torch.no_grad():
        rgb_latent = pred.encode_rgb(rgb * 2 - 1).float()
        if task == "depth":
            img = percentile_normalise(tgt, mask).repeat(1, 3, 1, 1)
        else:
            img = tgt.float().clamp(-1, 1)
        x0 = pred.encode_rgb(img).float()
        valid = -F.max_pool2d(-mask.float(), kernel_size=8) > 0.5  # latent cells whose 8×8 patch is valid
    b = x0.shape[0]
    T = pred.num_train_timesteps
    t = torch.randint(0, T, (b,), generator=generator).to(pred.device)
    noise = multi_res_noise(tuple(x0.shape), noise_strength * t.float() / T, generator, device=pred.device)
    a = pred.alphas_cumprod.to(pred.device)[t].float().reshape(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    emb = text_embedding.to(device=pred.device, dtype=pred.dtype).repeat(b, 1, 1)
    out = pred.unet(torch.cat([rgb_latent, x_t], 1).to(pred.dtype), t, encoder_hidden_states=emb).sample.float()
    kind = pred.prediction_type
    target = {"v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0, "epsilon": noise, "sample": x0}[kind]
    err = ((out - target) ** 2).mean(1, keepdim=True)
    if not valid.any():
        return err.sum() * 0.0
    return err[valid].mean()


def task_loss(out: torch.Tensor, batch: dict, task: str) -> torch.Tensor:
    if task == "depth":
        return ssi_l1_loss(out, batch["target"].to(out.device), batch["mask"].to(out.device))
    return angular_loss(out, batch["target"].to(out.device), batch["mask"].to(out.device))


@torch.no_grad()
def dataset_loss(pred: DepthNormalPredictor, dataset: E2EDataset, task: str, padding: str = "max_length") -> float:
    """Mean task loss over ``dataset`` (no flips applied by the caller's dataset choice)."""
    emb = padded_empty_embedding(pred, padding)
    losses = []
    for i in range(len(dataset)):
        b = {k: v[None] for k, v in dataset[i].items()}
        losses.append(task_loss(e2e_forward(pred, b["rgb"].to(pred.device), task, emb), b, task).item())
    return sum(losses) / len(losses)


def save_predictor(pred: DepthNormalPredictor, unet, output: str, task: str, steps: int = 1) -> str:
    """Write the diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/).

    ``default_denoising_steps`` is ``steps`` (1 after E2E-FT; 4 after Marigold training, as Marigold v1.1);
    the source's ``default_processing_resolution`` is kept when it has one."""
    from diffusers import DDIMScheduler, MarigoldDepthPipeline, MarigoldNormalsPipeline
    sched = DDIMScheduler.from_config(pred.scheduler.config, timestep_spacing="trailing")
    cls = MarigoldDepthPipeline if task == "depth" else MarigoldNormalsPipeline
    kw = {"default_denoising_steps": int(steps)}
    res = (pred.model_index or {}).get("default_processing_resolution")
    if res:
        kw["default_processing_resolution"] = int(res)
    if task == "depth":
        kw.update(scale_invariant=True, shift_invariant=True)
    pipe = cls(unet=unet, vae=pred.vae, scheduler=sched, text_encoder=pred.text_encoder, tokenizer=pred.tokenizer,
               prediction_type=task, **kw)
    pipe.save_pretrained(output, safe_serialization=True)
    return output


# ---- training loop ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jointcore.train_e2e", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="base diffusers folder (Marigold or an 8-channel SD UNet)")
    ap.add_argument("--data", required=True, help="pair folder (see jointcore.pairs)")
    ap.add_argument("--task", choices=("depth", "normals"), required=True)
    ap.add_argument("--output", required=True, help="where to save the fine-tuned diffusers folder")
    ap.add_argument("--objective", choices=("e2e", "marigold"), default="e2e",
                    help="e2e: one-step task loss through the decoder (E2E-FT); marigold: diffusion training (v-MSE "
                         "with annealed multi-resolution noise), the model E2E-FT starts from")
    ap.add_argument("--max-steps", type=int, default=20000, help="optimizer steps")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--warmup-steps", type=int, default=100)
    ap.add_argument("--final-lr-ratio", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--grad-accum", type=int, default=16)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--no-hflip", action="store_true", help="disable random horizontal flips")
    ap.add_argument("--text-padding", choices=("max_length", "do_not_pad"), default="max_length")
    ap.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no")
    ap.add_argument("--depth-png-scale", type=float, default=1000.0)
    ap.add_argument("--save-every", type=int, default=0, help="also save OUTPUT/checkpoint-<step> every N steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-workers", type=int, default=0)
    ap.add_argument("--cpu", action="store_true", help="force the CPU")
    return ap


def train(args: argparse.Namespace, log=print) -> dict:
    """Fine-tune; returns ``{"losses": [per optimizer step], "output": folder}``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if args.grad_accum < 1 or args.batch_size < 1 or args.max_steps < 1:
        raise ValueError("--batch-size, --grad-accum and --max-steps must be >= 1")
    acc = Accelerator(gradient_accumulation_steps=args.grad_accum, mixed_precision=args.mixed_precision,
                      cpu=args.cpu)
    set_seed(args.seed)
    folder = PairFolder(args.data, args.task, args.depth_png_scale)
    ds = E2EDataset(folder, args.height, args.width, hflip=not args.no_hflip, seed=args.seed)
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, drop_last=False,
                                     num_workers=args.num_workers,
                                     generator=torch.Generator().manual_seed(args.seed))
    pred = load_predictor(args.checkpoint, dtype="fp32", device=acc.device)
    emb = padded_empty_embedding(pred, args.text_padding)
    unet = pred.unet
    unet.requires_grad_(True)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.warmup_steps, args.max_steps, args.final_lr_ratio))
    unet, opt, dl = acc.prepare(unet, opt, dl)
    pred.unet = unet
    losses, step, running, micro = [], 0, 0.0, 0
    noise_gen = torch.Generator().manual_seed(args.seed + 1000 * acc.process_index)
    loss_log = LossLog(os.path.join(args.output, "loss_log.jsonl"), enabled=acc.is_main_process)
    while step < args.max_steps:
        for batch in dl:
            with acc.accumulate(unet):
                if args.objective == "marigold":
                    loss = marigold_loss(pred, batch, args.task, emb, noise_gen)
                else:
                    loss = task_loss(e2e_forward(pred, batch["rgb"], args.task, emb), batch, args.task)
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
                opt.step()
                opt.zero_grad()
            running += loss.detach().item()
            micro += 1
            if acc.sync_gradients:
                sched.step()
                step += 1
                losses.append(running / micro)
                running, micro = 0.0, 0
                if acc.is_main_process:
                    loss_log(step, loss=losses[-1], lr=sched.get_last_lr()[0])
                if args.save_every and step % args.save_every == 0 and acc.is_main_process:
                    save_predictor(pred, acc.unwrap_model(unet), os.path.join(args.output, f"checkpoint-{step}"),
                                   args.task, steps=4 if args.objective == "marigold" else 1)
                if step >= args.max_steps:
                    break
    acc.wait_for_everyone()
    if acc.is_main_process:
        final = acc.unwrap_model(unet)
        final.eval()
        final.requires_grad_(False)
        save_predictor(pred, final, args.output, args.task, steps=4 if args.objective == "marigold" else 1)
        log(f"saved {args.output}")
    acc.end_training()
    return {"losses": losses, "output": args.output}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
