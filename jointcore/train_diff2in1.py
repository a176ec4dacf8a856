"""Diff-2-in-1 training CLI (accelerate): ``warmup`` → ``create`` → ``self-improve``.

Usage (``MODEL`` = a diffusers Stable Diffusion folder with ``unet/ vae/ text_encoder/ tokenizer/`` and
optionally ``scheduler/``; data folders follow the layout in :mod:`jointcore.diff2in1`)::

    accelerate launch -m jointcore.train_diff2in1 warmup --model MODEL --data DATA --task normals --out HEAD_W
    accelerate launch -m jointcore.train_diff2in1 create --model MODEL --head HEAD_W --data DATA --out CREATED \
        [--T 600 --steps 50 --per-image 1]
    accelerate launch -m jointcore.train_diff2in1 self-improve --model MODEL --head HEAD_W --data DATA \
        --created CREATED --out HEAD_FINAL [--alpha 0.998 --ema-every 40]

(``python -m jointcore.train_diff2in1 …`` works too, on one device.) ``self-improve`` saves ``θC`` (the model
used at inference) to ``--out`` and ``θE`` to ``--out/exploiter``. Malformed data folders stop the command
with a message saying what to fix, before any model is loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import torch

from . import diff2in1 as D
from ._deps import require


def load_sd_components(model_dir: str):
    """``(unet, vae, tokenizer, text_encoder, alphas_cumprod, prediction_type)`` from a diffusers folder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from .models.sd_folder import load_vae
    from .schedules import alphas_cumprod as sd_alphas_cumprod

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder {model_dir!r} does not exist")
    missing = [d for d in ("unet", "vae", "text_encoder", "tokenizer") if not os.path.isdir(os.path.join(model_dir, d))]
    if missing:
        raise ValueError(f"model folder {model_dir!r} lacks {missing}: give a diffusers Stable Diffusion folder "
                         "(unet/, vae/, text_encoder/, tokenizer/, optional scheduler/)")
    from .models import preflight as PF

    for name in ("unet", "vae", "text_encoder"):
        PF.preflight_sd_component(model_dir, name)
    if os.path.isdir(os.path.join(model_dir, "scheduler")):
        PF.read_json(os.path.join(model_dir, "scheduler", "scheduler_config.json"), "the noise schedule")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = load_vae(os.path.join(model_dir, "vae"))
    tok = AutoTokenizer.from_pretrained(os.path.join(model_dir, "tokenizer"))
    te = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").float()  # fp16 on disk (the family)
    if os.path.isdir(os.path.join(model_dir, "scheduler")):
        sch = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        ab, pred = sch.alphas_cumprod.double(), sch.config.prediction_type
    else:
        ab, pred = sd_alphas_cumprod(), "epsilon"
    for m in (unet, vae, te):
        m.requires_grad_(False).eval()
    return unet, vae, tok, te, ab, pred



def _frozen_backbone(a):
    """Accelerator + the frozen SD components on its device, the empty-prompt embedding and the feature
    extractor (shared by the warm-up and self-improving commands)."""
    acc = require("accelerate", "Diff-2-in-1 training").Accelerator(cpu=a.cpu)
    torch.manual_seed(a.seed)
    unet, vae, tok, te, ab, _pred = load_sd_components(a.model)
    dev = acc.device
    unet.to(dev), vae.to(dev), te.to(dev)
    empty = D.encode_prompts(tok, te, [""])
    return acc, unet, vae, tok, te, ab, dev, empty, D.UNetFeatureExtractor(unet, ab)

def _prepared_items(folder: str, task: str, resolution: int, require_labels: bool = True):
    items = D.load_pair_folder(folder, task, require_labels=require_labels)
    for it in items:
        it.image, lab = D.resize_pair(it.image, it.label if require_labels else None, resolution, task)
        if require_labels:
            it.label = lab
    return items


def _check_seg_labels(items, num_classes: int):
    for it in items:
        lab = it.label[it.label != D.IGNORE_INDEX]
        if lab.numel() and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"segmentation label of {it.name!r} has classes outside [0, {num_classes - 1}] "
                             f"(255 = ignore); raise --num-classes")


def _features(ex, vae, imgs, empty, t, device):
    z0 = D.encode_images(vae, imgs.to(device))
    return ex(z0, empty.to(device), t)


def cmd_warmup(a) -> dict:
    D._check_task(a.task, a.num_classes if a.task == "segmentation" else None)
    items = _prepared_items(a.data, a.task, a.resolution)
    if a.task == "segmentation":
        _check_seg_labels(items, a.num_classes)
    acc, unet, vae, tok, te, ab, dev, empty, ex = _frozen_backbone(a)
    lat = a.resolution // 8
    chans = ex.channels((lat, lat), vae.config.latent_channels, empty.shape[-1])
    head = D.TaskHead(D.HeadConfig(a.task, chans, a.num_classes if a.task == "segmentation" else None, a.width,
                                   a.upscale_steps, a.feature_t))
    opt = torch.optim.AdamW(head.parameters(), lr=a.lr)
    head, opt = acc.prepare(head, opt)
    g = torch.Generator().manual_seed(a.seed)
    it_batches = D.batches(len(items), a.batch_size, g)
    losses = []
    for step in range(a.max_steps):
        idx = next(it_batches)
        imgs = torch.stack([items[i].image for i in idx])
        labels = torch.stack([items[i].label for i in idx]).to(dev)
        feats = _features(ex, vae, imgs, empty, a.feature_t, dev)
        loss = D.task_loss(head(feats, tuple(imgs.shape[-2:])), labels, a.task)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if acc.is_main_process and (step % a.log_every == 0 or step == a.max_steps - 1):
            print(f"warmup step {step}: loss {losses[-1]:.4f}", flush=True)
    if acc.is_main_process:
        D.save_head(acc.unwrap_model(head), a.out)
    return {"losses": losses}


def cmd_create(a) -> dict:
    head_cfg = D.load_head(a.head).config  # validates the head folder early
    items = _prepared_items(a.data, head_cfg.task, a.resolution, require_labels=False)
    if os.path.exists(os.path.join(a.out, D.MANIFEST)):
        raise FileExistsError(f"{a.out!r} already holds created pairs; choose a new --out folder")
    from accelerate import Accelerator
    acc = Accelerator(cpu=a.cpu)
    unet, vae, tok, te, ab, pred = load_sd_components(a.model)
    dev = acc.device
    unet.to(dev), vae.to(dev), te.to(dev)
    head = D.load_head(a.head).to(dev)
    empty = D.encode_prompts(tok, te, [""])
    ex = D.UNetFeatureExtractor(unet, ab)
    g = torch.Generator().manual_seed(a.seed)
    all_imgs, all_labels, names, caps, srcs = [], [], [], [], []
    jobs = [(it, k) for it in items for k in range(a.per_image)]
    for s in range(0, len(jobs), a.batch_size):
        chunk = jobs[s:s + a.batch_size]
        imgs = torch.stack([it.image for it, _ in chunk]).to(dev)
        cap_emb = D.encode_prompts(tok, te, [it.caption for it, _ in chunk])
        created, labels = D.create_pairs(unet, vae, head, ex, ab, imgs, cap_emb, empty, T=a.T, steps=a.steps,
                                         prediction_type=pred, generator=g)
        all_imgs.append(created.cpu()), all_labels.append(labels.cpu())
        names += [f"{it.name}_c{k:02d}" for it, k in chunk]
        caps += [it.caption for it, _ in chunk]
        srcs += [it.name for it, _ in chunk]
        if acc.is_main_process:
            print(f"created {min(s + a.batch_size, len(jobs))}/{len(jobs)}", flush=True)
    if acc.is_main_process:
        D.save_pairs(a.out, torch.cat(all_imgs), torch.cat(all_labels), head_cfg.task, names=names, captions=caps,
                     sources=srcs, num_classes=head_cfg.num_classes,
                     meta={"T": a.T, "steps": a.steps, "seed": a.seed, "head": os.path.abspath(a.head)})
    return {"count": len(names)}


def cmd_self_improve(a) -> dict:
    warm = D.load_head(a.head)
    task = warm.config.task
    created, manifest = D.load_pairs(a.created)
    if manifest["task"] != task:
        raise ValueError(f"created pairs are for task {manifest['task']!r} but the head predicts {task!r}")
    real = _prepared_items(a.data, task, a.resolution)
    if task == "segmentation":
        _check_seg_labels(real, warm.config.num_classes)
    syn_imgs = [D.resize_pair(c.image, None, a.resolution, task)[0] for c in created]
    acc, unet, vae, tok, te, ab, dev, empty, ex = _frozen_backbone(a)
    imp = D.SelfImprover(warm.to(dev), a.alpha, a.ema_every)
    opt = torch.optim.AdamW(imp.exploiter.parameters(), lr=a.lr)
    exploiter, opt = acc.prepare(imp.exploiter, opt)
    g = torch.Generator().manual_seed(a.seed)
    rb, sb = D.batches(len(real), a.batch_size, g), D.batches(len(syn_imgs), a.synthetic_batch_size, g)
    t = warm.config.feature_t
    log = []
    for step in range(a.max_steps):
        ri, si = next(rb), next(sb)
        rimg = torch.stack([real[i].image for i in ri])
        rlab = torch.stack([real[i].label for i in ri]).to(dev)
        simg = torch.stack([syn_imgs[i] for i in si])
        rf, sf = _features(ex, vae, rimg, empty, t, dev), _features(ex, vae, simg, empty, t, dev)
        loss, parts = imp.loss(rf, rlab, sf, tuple(rimg.shape[-2:]), exploiter=exploiter)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        fired = imp.after_step(len(ri) + len(si), exploiter=acc.unwrap_model(exploiter))
        log.append({"step": step, **parts, "ema_updates": fired})
        if acc.is_main_process and (step % a.log_every == 0 or step == a.max_steps - 1):
            print(f"self-improve step {step}: {parts} ema updates so far {imp.ema.updates}", flush=True)
    if acc.is_main_process:
        D.save_head(imp.creator, a.out)
        D.save_head(acc.unwrap_model(exploiter), os.path.join(a.out, "exploiter"))
        with open(os.path.join(a.out, "self_improve_log.json"), "w") as f:
            json.dump({"samples": imp.ema.samples, "ema_updates": imp.ema.updates, "alpha": a.alpha,
                       "ema_every": a.ema_every, "steps": log}, f, indent=1)
    return {"ema_updates": imp.ema.updates, "samples": imp.ema.samples, "log": log}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_diff2in1", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, head_in: bool):
        sp.add_argument("--model", required=True, help="diffusers Stable Diffusion folder")
        sp.add_argument("--data", required=True, help="folder with images/ and labels/ (see jointcore.diff2in1)")
        if head_in:
            sp.add_argument("--head", required=True, help="head folder (config.json + head.safetensors)")
        sp.add_argument("--out", required=True)
        sp.add_argument("--resolution", type=int, default=512, help="square training size (multiple of 8)")
        sp.add_argument("--batch-size", type=int, default=4)
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--cpu", action="store_true", help="force CPU")
        sp.add_argument("--log-every", type=int, default=50)

    w = sub.add_parser("warmup", help="train a task head on real pairs (θW)")
    common(w, head_in=False)
    w.add_argument("--task", required=True, choices=D.TASKS)
    w.add_argument("--num-classes", type=int, default=None)
    w.add_argument("--max-steps", type=int, default=2000)
    w.add_argument("--lr", type=float, default=1e-4)
    w.add_argument("--width", type=int, default=64)
    w.add_argument("--upscale-steps", type=int, default=2)
    w.add_argument("--feature-t", type=int, default=0)

    c = sub.add_parser("create", help="create image + label pairs from real images (§4.2)")
    common(c, head_in=True)
    c.add_argument("--T", type=int, default=D.DEFAULT_T, help="noise level to restart from (0 < T < 1000)")
    c.add_argument("--steps", type=int, default=D.DEFAULT_STEPS, help="DDIM steps over [0, T]")
    c.add_argument("--per-image", type=int, default=1, help="created pairs per real image")

    s = sub.add_parser("self-improve", help="θE on real + created pairs, EMA into θC (§4.3)")
    common(s, head_in=True)
    s.add_argument("--created", required=True, help="created-pairs folder from `create`")
    s.add_argument("--max-steps", type=int, default=2000)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--alpha", type=float, default=D.DEFAULT_ALPHA)
    s.add_argument("--ema-every", type=int, default=D.DEFAULT_EMA_EVERY, help="samples per EMA update")
    s.add_argument("--synthetic-batch-size", type=int, default=4)
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    a = build_parser().parse_args(argv)
    for name in ("batch_size", "per_image", "max_steps", "synthetic_batch_size", "log_every"):
        if getattr(a, name, 1) < 1:
            raise SystemExit(f"train_diff2in1 {a.cmd}: error: --{name.replace('_', '-')} must be >= 1")
    try:
        if a.cmd == "create":
            D.creation_timesteps(a.T, a.steps)
        fn = {"warmup": cmd_warmup, "create": cmd_create, "self-improve": cmd_self_improve}[a.cmd]
        return fn(a)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        raise SystemExit(f"train_diff2in1 {a.cmd}: error: {e}") from e


if __name__ == "__main__":
    main()
    sys.exit(0)
