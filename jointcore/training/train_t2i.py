"""Train a text-to-image UNet (ε-prediction, SD 1.x noise schedule) on an image + caption folder.

The family's UNet has the smallest layout ComfyUI's *Load Checkpoint* still detects as SD 1.x
(``model_channels`` 320, ``context_dim`` 768, a 1×1-conv ``proj_in``): one level (``channel_mult [1]``,
no down-sampling), one res block, transformer depth 1, the SD middle block — 25.8 M parameters. Text comes
from the folder's frozen CLIP-L (the family's random CLIP, :mod:`jointcore.models.random_clip`).

Recipe: DDPM training on the SD 1.x schedule (scaled-linear β 0.00085–0.012, 1000 steps, ε target), min-SNR-γ
loss weighting (Hang et al. 2023, γ = 5), 10 % caption drop-out (empty prompt, for classifier-free
guidance), AdamW with warm-up and exponential decay, an EMA of the weights (the EMA is what is saved),
gradient clipping. Latents (``vae/`` of ``--pretrained``) and text embeddings are computed once and cached
in ``OUT/cache/``; ``OUT/state/`` holds a resumable training state (``--resume``).

Run::

    python -m jointcore.training.train_t2i --pretrained SD_FOLDER --data WORLD_FOLDER --output OUT
    accelerate launch -m jointcore.training.train_t2i …

``--pretrained`` is a diffusers SD folder with ``vae/``, ``text_encoder/``, ``tokenizer/`` (and optionally
``unet/`` to start from; otherwise :func:`unet_config` from scratch). Writes ``OUT/unet/`` (EMA weights) and
``OUT/loss_log.jsonl``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
import torch.nn.functional as F

from jointcore import schedules as S
from jointcore.train_e2e import lr_factor
from jointcore.training.common import EMA, LossLog, list_images, load_images_uint8, run_cli

CAPTION_DROP_TOKEN = ""


def unet_config(in_channels: int = 4, out_channels: int = 4) -> dict:
    """The family UNet: SD 1.x widths with one level (ComfyUI detects it as SD15), diffusers config."""
    return dict(sample_size=8, in_channels=in_channels, out_channels=out_channels, block_out_channels=(320,),
                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D",),
                up_block_types=("CrossAttnUpBlock2D",), mid_block_type="UNetMidBlock2DCrossAttn",
                cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, use_linear_projection=False)


def read_captions(image_paths: list[str]) -> list[str]:
    """``captions/<stem>.txt`` beside each image's ``images/`` folder; a missing file is an error naming it."""
    caps = []
    for p in image_paths:
        root = os.path.dirname(os.path.dirname(p))
        c = os.path.join(root, "captions", os.path.splitext(os.path.basename(p))[0] + ".txt")
        if not os.path.isfile(c):
            raise FileNotFoundError(f"caption file {c} for image {p} does not exist")
        with open(c) as f:
            caps.append(f.read().strip())
    return caps


def load_text_parts(folder: str):
    from transformers import CLIPTextModel, CLIPTokenizer

    for sub in ("text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise FileNotFoundError(f"--pretrained {folder!r} lacks {sub}/ (a diffusers Stable Diffusion folder)")
    tok = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder").eval().requires_grad_(False)
    return tok, te


@torch.no_grad()
def encode_captions(tok, te, captions: list[str], batch: int = 64, log=None) -> torch.Tensor:
    """``[N, 77, 768]`` fp16 last-layer CLIP states (the same ComfyUI's SD 1.x CLIP gives)."""
    out = []
    length = min(tok.model_max_length, te.config.max_position_embeddings)
    for i in range(0, len(captions), batch):
        ids = tok(captions[i:i + batch], padding="max_length", max_length=length, truncation=True,
                  return_tensors="pt").input_ids
        out.append(te(ids)[0].half())
        if log and (i // batch) % 20 == 0:
            log(f"text embeddings {i + len(out[-1])}/{len(captions)}")
    return torch.cat(out)


def _cache_key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cached_tensors(path: str, build) -> dict:
    from safetensors.torch import load_file, save_file

    if os.path.isfile(path):
        return load_file(path)
    t = build()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.part"
    save_file(t, tmp)
    os.replace(tmp, path)
    return t


def prepare_data(pretrained: str, data: str, cache: str, log=print) -> dict:
    """Latents ``[N,4,h,w]`` (fp16), caption indices and unique caption embeddings, cached by content."""
    from jointcore.models.sd_folder import LatentCodec

    paths = list_images(data)
    caps = read_captions(paths)
    uniq = sorted(set(caps) | {CAPTION_DROP_TOKEN})
    key = _cache_key(os.path.abspath(pretrained), *paths)

    def latents():
        if not os.path.isdir(os.path.join(pretrained, "vae")):
            raise FileNotFoundError(f"--pretrained {pretrained!r} lacks vae/ (a diffusers Stable Diffusion folder)")
        codec = LatentCodec.from_folder(os.path.join(pretrained, "vae"))
        imgs = load_images_uint8(paths)
        out = []
        with torch.no_grad():
            for i in range(0, len(imgs), 64):
                out.append(codec.encode(imgs[i:i + 64].float() / 127.5 - 1).half())
        return {"latents": torch.cat(out)}

    def texts():
        tok, te = load_text_parts(pretrained)
        return {"embeddings": encode_captions(tok, te, uniq, log=log)}

    lat = cached_tensors(os.path.join(cache, f"latents-{key}.safetensors"), latents)["latents"]
    emb = cached_tensors(os.path.join(cache, f"text-{_cache_key(os.path.abspath(pretrained), *uniq)}.safetensors"),
                         texts)["embeddings"]
    index = {c: i for i, c in enumerate(uniq)}
    return {"latents": lat, "caption_index": torch.tensor([index[c] for c in caps]), "embeddings": emb,
            "empty_index": index[CAPTION_DROP_TOKEN], "captions": caps}


def min_snr_weight(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """ε-prediction min-SNR weight ``min(SNR, γ)/SNR`` (γ ≤ 0: uniform weights)."""
    if gamma <= 0:
        return torch.ones(len(t))
    ab = alphas_cumprod[t]
    snr = ab / (1 - ab)
    return torch.minimum(snr, torch.full_like(snr, gamma)) / snr


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jointcore.training.train_t2i", description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrained", required=True, help="diffusers SD folder: vae/, text_encoder/, tokenizer/ [unet/]")
    ap.add_argument("--data", required=True, help="folder with images/ and captions/")
    ap.add_argument("--output", required=True)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (split over processes)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-steps", type=int, default=200)
    ap.add_argument("--final-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--caption-drop", type=float, default=0.1)
    ap.add_argument("--min-snr-gamma", type=float, default=5.0)
    ap.add_argument("--noise-offset", type=float, default=0.0)
    ap.add_argument("--ema-decay", type=float, default=0.999)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=500, help="resumable state in OUT/state every N steps")
    ap.add_argument("--resume", action="store_true", help="continue from OUT/state if it exists")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpu", action="store_true")
    return ap


def train(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator
    from diffusers import UNet2DConditionModel

    acc = Accelerator(cpu=args.cpu)
    if args.batch_size % acc.num_processes:
        raise ValueError(f"--batch-size {args.batch_size} must divide by the {acc.num_processes} processes")
    log = LossLog(os.path.join(args.output, "loss_log.jsonl"), acc.is_main_process)
    cache = os.path.join(args.output, "cache")
    with acc.main_process_first():
        data = prepare_data(args.pretrained, args.data, cache, log=print if acc.is_main_process else None)
    torch.manual_seed(args.seed)
    if os.path.isdir(os.path.join(args.pretrained, "unet")):
        unet = UNet2DConditionModel.from_pretrained(args.pretrained, subfolder="unet")
    else:
        unet = UNet2DConditionModel(**unet_config())
    ab = S.alphas_cumprod().float()
    ema = EMA(unet, args.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.warmup_steps, args.max_steps, args.final_lr_ratio))
    start = 0
    state_dir = os.path.join(args.output, "state")
    if args.resume and os.path.isfile(os.path.join(state_dir, "state.pt")):
        st = torch.load(os.path.join(state_dir, "state.pt"), map_location="cpu", weights_only=True)
        unet.load_state_dict(st["unet"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        ema.shadow = st["ema"]
        start = int(st["step"])
        if acc.is_main_process:
            print(f"resumed from {state_dir} at step {start}")
    unet, opt = acc.prepare(unet, opt)
    unet.train()
    lat, cidx, emb = data["latents"], data["caption_index"], data["embeddings"]
    n = len(lat)
    per = args.batch_size // acc.num_processes
    lo = acc.process_index * per
    run, count = {}, 0
    for step in range(start, args.max_steps):
        # every process draws the same global batch from a per-step generator, then takes its slice
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        t = torch.randint(0, len(ab), (args.batch_size,), generator=g)
        noise = torch.randn((args.batch_size,) + tuple(lat.shape[1:]), generator=g)
        if args.noise_offset:
            noise = noise + args.noise_offset * torch.randn(args.batch_size, lat.shape[1], 1, 1, generator=g)
        drop = torch.rand(args.batch_size, generator=g) < args.caption_drop
        ci = torch.where(drop, torch.full_like(cidx[idx], data["empty_index"]), cidx[idx])
        sl = slice(lo, lo + per)
        x0, t, noise, c = lat[idx][sl].float(), t[sl], noise[sl], emb[ci][sl].float()
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = unet(xt.to(acc.device), t.to(acc.device), c.to(acc.device)).sample
        w = min_snr_weight(ab, t, args.min_snr_gamma).to(acc.device)
        loss = (w * (pred.float() - noise.to(acc.device)).square().mean(dim=(1, 2, 3))).mean()
        acc.backward(loss)
        acc.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
        opt.step()
        opt.zero_grad()
        sched.step()
        ema.update(acc.unwrap_model(unet), step)
        run["loss"] = run.get("loss", 0.0) + float(acc.reduce(loss.detach(), "mean"))
        count += 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.max_steps:
            log(step + 1, loss=run["loss"] / count, lr=sched.get_last_lr()[0])
            run, count = {}, 0
        if acc.is_main_process and args.save_every and (step + 1) % args.save_every == 0:
            os.makedirs(state_dir, exist_ok=True)
            tmp = os.path.join(state_dir, f"state.pt.{os.getpid()}.part")
            torch.save({"unet": acc.unwrap_model(unet).state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "ema": ema.shadow, "step": step + 1}, tmp)
            os.replace(tmp, os.path.join(state_dir, "state.pt"))
    acc.wait_for_everyone()
    if acc.is_main_process:
        final = acc.unwrap_model(unet)
        ema.copy_to(final)
        final.eval().save_pretrained(os.path.join(args.output, "unet"), safe_serialization=True)
    acc.end_training()
    return {"output": args.output, "images": n}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: train(args))


if __name__ == "__main__":
    sys.exit(main())
