"""Train a JointNet (paper §3.4, §4.1) with accelerate.

Stages (defaults follow the paper; every value is a flag):

=====  ==========================================  =======  =========  ==============================
stage  trainable                                   lr       text drop  input
=====  ==========================================  =======  =========  ==============================
1      dense branch + all exchange layers          1e-4     15 %       joint noisy latents
       (RGB branch's UNet weights frozen)
2      everything                                  1e-5     50 %       joint noisy latents
3      everything (+ new zero masked-latent conv)  1e-5     50 %       + per-modality masks and masked
                                                                      latents (channel-wise inpainting)
=====  ==========================================  =======  =========  ==============================

Loss (Eq. 1): ``‖ε_x − ε_θ(x_t, y_t, c, t)‖² + ‖ε_y − ε_φ(y_t, x_t, c, t)‖²`` (both branches share t and c;
the target follows the scheduler's ``prediction_type``); noise offset 0.05 (``ε += 0.05·N(0,1)[B,C,1,1]``);
linear warm-up (1000 steps) then a constant learning rate.

Dataset folder layout (``--data``)::

    DATA/
      images/   NAME.png | NAME.jpg | NAME.jpeg | NAME.webp     RGB images
      depth/    NAME.png  (8- or 16-bit grey; or NAME.npy float) the dense map, [0,1] after /255 or /65535
                                                               (.npy: min-max normalised); disparity as MiDaS
      captions/ NAME.txt                                       one caption (may be empty)

Every image needs a depth map and a caption file with the same stem; anything missing is reported by name.
Images and depth are centre-cropped to a square and resized to ``--resolution``.

Models: ``--pretrained`` is a diffusers Stable Diffusion folder (``vae/``, ``text_encoder/``, ``tokenizer/``,
optional ``scheduler/``, and ``unet/`` when stage 1 starts from the base model). ``--init-jointnet`` resumes
from a JointNet folder (required for stages 2 and 3). The result is saved in the official layout
(``OUTPUT/unet/`` + ``OUTPUT/jointnet/``).

Example::

    accelerate launch -m jointcore.train_jointnet --pretrained sd21-base --data rgbd --output jn-stage1 --stage 1
"""
from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import prediction as P
from .jointnet import JointNet

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
STAGE_DEFAULTS = {1: dict(lr=1e-4, text_drop=0.15), 2: dict(lr=1e-5, text_drop=0.5), 3: dict(lr=1e-5, text_drop=0.5)}


# ---- data ------------------------------------------------------------------------------------------------


def scan_dataset(root: str) -> list[tuple[str, str, str]]:
    """``(image, depth, caption)`` paths of a dataset folder, or a ``ValueError``/``FileNotFoundError`` that
    says what is missing."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset folder {root!r} does not exist")
    dirs = {d: os.path.join(root, d) for d in ("images", "depth", "captions")}
    missing = [d + "/" for d, p in dirs.items() if not os.path.isdir(p)]
    if missing:
        raise ValueError(f"dataset {root!r} lacks {', '.join(missing)}; expected images/NAME.png|jpg, "
                         f"depth/NAME.png|npy and captions/NAME.txt")
    depth_by_stem = {}
    for f in os.listdir(dirs["depth"]):
        stem, ext = os.path.splitext(f)
        if ext.lower() in (".png", ".npy"):
            depth_by_stem[stem] = os.path.join(dirs["depth"], f)
    items, problems = [], []
    for f in sorted(os.listdir(dirs["images"])):
        stem, ext = os.path.splitext(f)
        if ext.lower() not in IMAGE_EXTS:
            continue
        cap = os.path.join(dirs["captions"], stem + ".txt")
        if stem not in depth_by_stem:
            problems.append(f"depth/{stem}.png")
        if not os.path.isfile(cap):
            problems.append(f"captions/{stem}.txt")
        if stem in depth_by_stem and os.path.isfile(cap):
            items.append((os.path.join(dirs["images"], f), depth_by_stem[stem], cap))
    if problems:
        raise ValueError(f"dataset {root!r} is incomplete; missing: {', '.join(problems[:10])}"
                         + (f" and {len(problems) - 10} more" if len(problems) > 10 else ""))
    if not items:
        raise ValueError(f"dataset {root!r} has no images ({'/'.join(IMAGE_EXTS)}) in images/")
    return items


def _square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop ``[C, H, W]`` to a square and resize to ``size`` (bilinear, antialiased)."""
    _, h, w = x.shape
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[:, top:top + s, left:left + s]
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def load_depth(path: str, npy_as: str = "depth") -> torch.Tensor:
    """A depth file → ``[1, H, W]`` in ``[0, 1]`` (16-bit PNG /65535, 8-bit /255, .npy min-max).

    ``npy_as``: ``"depth"`` min-max normalises the ``.npy`` values as they are; ``"disparity"`` reads them as
    metric depth and min-max normalises ``1/depth`` (near = bright, JointNet's convention), e.g. for the
    procedural world's ``depth/*.npy``."""
    from PIL import Image

    if path.endswith(".npy"):
        a = np.load(path).astype(np.float32).squeeze()
        if a.ndim != 2:
            raise ValueError(f"{path}: depth .npy must be 2-D, got shape {a.shape}")
        if npy_as == "disparity":
            if not np.isfinite(a).all() or (a <= 0).any():
                raise ValueError(f"{path}: metric depth for --npy-depth-as disparity must be finite and > 0 m")
            a = 1.0 / a
        elif npy_as != "depth":
            raise ValueError(f"npy_as must be 'depth' or 'disparity', got {npy_as!r}")
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-8)
        return torch.from_numpy(a)[None]
    im = Image.open(path)
    a = np.array(im)
    if a.ndim == 3:
        a = a[..., 0]
    scale = 65535.0 if a.dtype in (np.uint16, np.int32) or im.mode.startswith("I") else 255.0
    return torch.from_numpy(a.astype(np.float32) / scale).clamp(0, 1)[None]


class RGBDDataset(torch.utils.data.Dataset):
    """Items ``{"image": [3,R,R] in [0,1], "depth": [1,R,R] in [0,1], "caption": str}``."""

    def __init__(self, root: str, resolution: int = 512, npy_as: str = "depth"):
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
        self.items = scan_dataset(root)
        self.resolution = resolution
        self.npy_as = npy_as

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        from PIL import Image

        img_p, dep_p, cap_p = self.items[i]
        img = torch.from_numpy(np.array(Image.open(img_p).convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        dep = load_depth(dep_p, self.npy_as)
        if dep.shape[-2:] != img.shape[-2:]:
            dep = F.interpolate(dep[None], size=img.shape[-2:], mode="bilinear", align_corners=False)[0]
        with open(cap_p, encoding="utf-8") as f:
            cap = f.read().strip()
        return {"image": _square(img, self.resolution).clamp(0, 1),
                "depth": _square(dep, self.resolution).clamp(0, 1), "caption": cap}


# ---- training ---------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    stage: int = 1
    steps: int = 10000
    lr: Optional[float] = None           # None: stage default
    text_drop: Optional[float] = None    # None: stage default
    warmup: int = 1000
    noise_offset: float = 0.05
    batch_size: int = 4
    grad_accum: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    max_grad_norm: float = 1.0
    log_every: int = 10
    save_every: int = 0                  # 0: only at the end
    gradient_checkpointing: bool = False
    inpaint_task_probs: Sequence[float] = field(default_factory=lambda: (0.25, 0.25, 0.25, 0.25))

    def resolved(self) -> "TrainConfig":
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"stage must be 1, 2 or 3, got {self.stage}")
        d = STAGE_DEFAULTS[self.stage]
        lr = d["lr"] if self.lr is None else self.lr
        drop = d["text_drop"] if self.text_drop is None else self.text_drop
        return TrainConfig(**{**self.__dict__, "lr": lr, "text_drop": drop})


def set_trainable(model: JointNet, stage: int) -> list[torch.nn.Parameter]:
    """Stage 1: freeze the RGB branch's UNet weights (its exchange layers stay trainable, as the official
    ``freeze_main_unet``); stages 2–3: train everything. Returns the trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(True)
    if stage == 1:
        ex = set(model.rgb.exchange_parameter_names())
        for n, p in model.rgb.named_parameters():
            if n not in ex:
                p.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def random_masks(batch: int, h: int, w: int, probs: Sequence[float], generator: torch.Generator):
    """Stage-3 masks ``[B,1,h,w]`` (1 = generate) per sample: joint generation, image→depth, depth→image, or
    one random rectangle in both modalities, with probabilities ``probs``."""
    m_rgb, m_dep = torch.ones(batch, 1, h, w), torch.ones(batch, 1, h, w)
    probs_t = torch.as_tensor(probs, dtype=torch.float)
    kinds = torch.multinomial(probs_t / probs_t.sum(), batch, replacement=True, generator=generator)
    for b, k in enumerate(kinds.tolist()):
        if k == 1:
            m_rgb[b] = 0
        elif k == 2:
            m_dep[b] = 0
        elif k == 3:
            hh = int(torch.randint(1, h + 1, (1,), generator=generator))
            ww = int(torch.randint(1, w + 1, (1,), generator=generator))
            y = int(torch.randint(0, h - hh + 1, (1,), generator=generator))
            x = int(torch.randint(0, w - ww + 1, (1,), generator=generator))
            region = torch.zeros(1, h, w)
            region[:, y:y + hh, x:x + ww] = 1
            m_rgb[b], m_dep[b] = region, region
    return m_rgb, m_dep


def joint_loss(model: JointNet, lat: torch.Tensor, emb: torch.Tensor, alphas_cumprod: torch.Tensor,
               prediction_type: str, generator: torch.Generator, noise_offset: float = 0.0,
               masks: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
               t: Optional[torch.Tensor] = None,
               forward: Optional[Callable[..., torch.Tensor]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 on latents ``[B, C_rgb + C_dense, h, w]``; returns ``(total, per-branch [2])``.

    ``forward``: the callable to run (e.g. the accelerate/DDP-wrapped model); default ``model``.
    """
    B = lat.shape[0]
    cr, _ = model.latent_channels
    noise = torch.randn(lat.shape, generator=generator).to(lat)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((B, lat.shape[1], 1, 1), generator=generator).to(lat)
    if t is None:
        t = torch.randint(0, len(alphas_cumprod), (B,), generator=generator)
    t = t.to(lat.device)
    x_t = P.add_noise(lat, noise, t, alphas_cumprod.to(lat.device))
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = P.to_v(noise, x_t, t, alphas_cumprod.to(lat.device), "epsilon")
    else:
        target = lat
    kw = {}
    if model.has_masked_latent_input:
        if masks is None:
            masks = (torch.ones(B, 1, *lat.shape[-2:]), torch.ones(B, 1, *lat.shape[-2:]))
        m_r, m_d = (m.to(lat) for m in masks)
        kw = dict(mask_rgb=m_r, masked_rgb=lat[:, :cr] * (m_r < 0.5), mask_dense=m_d,
                  masked_dense=lat[:, cr:] * (m_d < 0.5))
    pred = (forward or model)(x_t, t, emb, **kw).float()
    target = target.float()
    per = torch.stack([F.mse_loss(pred[:, :cr], target[:, :cr]), F.mse_loss(pred[:, cr:], target[:, cr:])])
    return per.sum(), per


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([i["image"] for i in items]), "depth": torch.stack([i["depth"] for i in items]),
            "caption": [i["caption"] for i in items]}


def train(model: JointNet, vae, encode_text: Callable[[list[str]], torch.Tensor], dataset,
          cfg: TrainConfig, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
          log: Callable[[str], None] = print,
          save_fn: Optional[Callable[[int, JointNet], None]] = None) -> list[float]:
    """Run one training stage in place on ``model``; returns the loss of every optimiser step.

    ``encode_text(captions) → [B, L, D]`` (empty strings for dropped captions); ``vae`` encodes images and
    depth (grey → 3 channels, ``×2−1``) to latents; both stay frozen. ``save_fn(step, model)`` is called every
    ``cfg.save_every`` steps (intermediate checkpoints).
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    from .joint_sampling import encode_depth, encode_image

    cfg = cfg.resolved()
    if cfg.stage == 3 and not model.has_masked_latent_input:
        model.extend_masked_latent_conv()
    if cfg.gradient_checkpointing:
        model.rgb.enable_gradient_checkpointing()
        model.dense.enable_gradient_checkpointing()
    acc = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum)
    params = set_trainable(model, cfg.stage)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.warmup * cfg.grad_accum)
    g_data = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=False,
                                         collate_fn=_collate, generator=g_data)
    model.train()
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    vae.requires_grad_(False)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rng = random.Random(cfg.seed + 2)
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    losses: list[float] = []
    step = 0
    while step < cfg.steps:
        for batch in loader:
            with acc.accumulate(model):
                with torch.no_grad():
                    img = batch["image"].to(acc.device)
                    dep = batch["depth"].to(acc.device)
                    lat = torch.cat([encode_image(vae, img), encode_depth(vae, dep)], 1).to(acc.device)
                    caps = ["" if rng.random() < cfg.text_drop else c for c in batch["caption"]]
                    emb = encode_text(caps).to(acc.device)
                masks = None
                base = acc.unwrap_model(model)
                if base.has_masked_latent_input:
                    masks = random_masks(lat.shape[0], *lat.shape[-2:], cfg.inpaint_task_probs, gen)
                with acc.autocast():
                    loss, per = joint_loss(base, lat, emb, ab, prediction_type, gen, cfg.noise_offset, masks,
                                           forward=model)
                acc.backward(loss)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                losses.append(float(loss.detach()))
                step += 1
                if cfg.log_every and step % cfg.log_every == 0:
                    log(f"step {step}/{cfg.steps} loss {losses[-1]:.4f} (rgb {float(per[0]):.4f}, "
                        f"dense {float(per[1]):.4f}) lr {sched.get_last_lr()[0]:.2e}")
                if save_fn is not None and cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    acc.wait_for_everyone()
                    if acc.is_main_process:
                        save_fn(step, acc.unwrap_model(model))
                if step >= cfg.steps:
                    break
    model = acc.unwrap_model(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses


# ---- CLI --------------------------------------------------------------------------------------------------


def _load_models(args):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from . import schedules as S
    from .models.sd_folder import load_vae

    base = args.pretrained
    for sub in ("vae", "text_encoder", "tokenizer"):
        if not os.path.isdir(os.path.join(base, sub)):
            raise FileNotFoundError(f"--pretrained {base!r} lacks {sub}/ (a diffusers Stable Diffusion folder is "
                                    f"needed for the VAE and text encoder)")
    vae = load_vae(os.path.join(base, "vae"))
    te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").float().eval()  # fp16 on disk (the family)
    tok = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    if os.path.isdir(os.path.join(base, "scheduler")):
        s = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
        ab, pred = s.alphas_cumprod.double(), s.config.prediction_type
    else:
        ab, pred = S.alphas_cumprod(), "epsilon"
    if args.init_jointnet:
        model = JointNet.from_pretrained(args.init_jointnet)
    else:
        if args.stage != 1:
            raise ValueError(f"stage {args.stage} continues a trained JointNet: pass --init-jointnet")
        if not os.path.isdir(os.path.join(base, "unet")):
            raise FileNotFoundError(f"--pretrained {base!r} lacks unet/ to build the JointNet from")
        model = JointNet.from_unet(UNet2DConditionModel.from_pretrained(base, subfolder="unet"))
    if model.cross_attention_dim != te.config.hidden_size:
        raise ValueError(f"text encoder width {te.config.hidden_size} does not match the UNet's "
                         f"cross_attention_dim {model.cross_attention_dim}")

    memo: dict[str, torch.Tensor] = {}  # captions repeat every epoch; the text encoder is frozen

    @torch.no_grad()
    def encode_text(captions: list[str]) -> torch.Tensor:
        new = sorted({c for c in captions if c not in memo})
        if new:
            length = min(tok.model_max_length, te.config.max_position_embeddings)
            ids = tok(new, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
            for c, e in zip(new, te(ids.to(te.device))[0]):
                memo[c] = e.cpu()
        return torch.stack([memo[c] for c in captions])

    return model, vae, encode_text, ab, pred


def _probs(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--inpaint-probs must be 4 comma-separated numbers, got {text!r}") from None
    if len(vals) != 4 or min(vals) < 0 or sum(vals) <= 0:
        raise ValueError(f"--inpaint-probs must be 4 non-negative numbers with a positive sum, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jointcore.train_jointnet", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", required=True, help="diffusers SD folder (vae/, text_encoder/, tokenizer/, unet/)")
    p.add_argument("--data", required=True, help="dataset folder: images/, depth/, captions/")
    p.add_argument("--output", required=True, help="output JointNet folder (unet/ + jointnet/)")
    p.add_argument("--init-jointnet", default=None, help="JointNet folder to continue from (stages 2, 3)")
    p.add_argument("--stage", type=int, default=1, choices=(1, 2, 3))
    p.add_argument("--steps", type=int, default=10000)
    p.add_argument("--lr", type=float, default=None, help="default: 1e-4 (stage 1), 1e-5 (stages 2, 3)")
    p.add_argument("--text-drop", type=float, default=None, help="default: 0.15 (stage 1), 0.5 (stages 2, 3)")
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--noise-offset", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--npy-depth-as", choices=("depth", "disparity"), default="depth",
                   help="how depth/*.npy files are read: normalised as they are, or as metric depth → disparity "
                        "(near bright, JointNet's convention)")
    p.add_argument("--mixed-precision", default="no", choices=("no", "fp16", "bf16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-format", default="safetensors", choices=("safetensors", "bin"))
    p.add_argument("--save-every", type=int, default=0, help="also save OUTPUT/checkpoint-STEP every N steps")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    p.add_argument("--inpaint-probs", default="0.25,0.25,0.25,0.25",
                   help="stage 3 mask mix: joint generation, image->depth, depth->image, random box in both")
    return p


def main(argv: Optional[Sequence[str]] = None) -> list[float]:
    args = build_parser().parse_args(argv)
    dataset = RGBDDataset(args.data, args.resolution, args.npy_depth_as)  # validate the data before loading models
    model, vae, encode_text, ab, pred = _load_models(args)
    cfg = TrainConfig(stage=args.stage, steps=args.steps, lr=args.lr, text_drop=args.text_drop, warmup=args.warmup,
                      noise_offset=args.noise_offset, batch_size=args.batch_size, grad_accum=args.grad_accum,
                      mixed_precision=args.mixed_precision, seed=args.seed, log_every=args.log_every,
                      save_every=args.save_every, gradient_checkpointing=args.gradient_checkpointing,
                      inpaint_task_probs=_probs(args.inpaint_probs))
    safe = args.save_format == "safetensors"

    def save_fn(step: int, m: JointNet) -> None:
        m.save_pretrained(os.path.join(args.output, f"checkpoint-{step}"), safe_serialization=safe)

    losses = train(model, vae, encode_text, dataset, cfg, ab, pred, save_fn=save_fn)
    model.save_pretrained(args.output, safe_serialization=safe)
    print(f"saved JointNet (stage {args.stage}) to {args.output}")
    return losses


if __name__ == "__main__":
    main()
