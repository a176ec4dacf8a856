"""Diff-2-in-1: a frozen diffusion UNet as a dense-perception backbone that also creates its own training pairs
(Zheng et al., "Diff-2-in-1", ICLR 2025; reference facts in ``REFERENCES.md`` §4).

Pieces, in paper order:

* **Features** (§3.2, App. A.1): ``z = E(x)·s``, one pass of the frozen UNet at a small ``t`` (default 0, no
  noise, as VPD) with the empty-prompt embedding; outputs of every down block, the mid block and every up
  block are captured with forward hooks and grouped by resolution (coarse → fine), concatenated per group.
* **Fusion** (Eq. 9): ``f^proc_i = Conv1×1([Up(f^raw_{i-1}), f^raw_i])`` for adjacent resolutions; finer maps
  than the UNet gives come from Eq. 10, ``f^proc_{i+1} = Conv1×1([Up(f^proc_i), Deconv(f^proc_i)])`` (×2 each).
* **Task heads**: depth (1 ch), normals (3 ch, L2-normalised), segmentation (K logits).
* **Data creation** (§4.2): noise real latents to ``T`` (600), DDIM back over ``[0, T]`` (50 steps) with the
  caption embedding and no CFG, decode; label = head(features of the final latent).
* **Self-improving** (§4.3, Eq. 7–8): ``θC``/``θE`` copies of the warm-up head; ``θE`` learns on real pairs
  + created images labelled online by ``θC``; ``θC ← α θC + (1-α) θE`` (α = 0.998) once per 40 consumed samples.

Dataset folders (read by the CLIs and :func:`load_pair_folder`; written by :func:`save_pairs`)::

    <folder>/
      images/<stem>.png|.jpg|.jpeg|.webp   RGB image
      labels/<stem>.npy | <stem>.png      label with the same stem:
                                            depth         .npy float [H,W] or [1,H,W]; .png 8/16-bit grey (/max)
                                            normals       .npy float [H,W,3] or [3,H,W]; .png RGB (n = 2·rgb − 1)
                                            segmentation  .npy int [H,W];  .png 8-bit class indices (255 = ignore)
      captions/<stem>.txt                 optional caption (data creation conditions on it; else empty prompt)
      (without labels/, a depth/ or normals/ folder named after the task is read instead: the procedural
      world's layout, metric depth .npy in metres and camera-frame normals .npy)
      diff2in1_pairs.json                 only in created folders: {"format": "jointdiffusion.diff2in1.pairs",
                                          "version": 1, "task", "num_classes", "T", "steps", "items": [{"name",
                                          "image", "label", "source", "caption"}]}

Created folders store labels as ``.npy`` float32 ``[C,H,W]`` (depth C=1, normals C=3) or int64 ``[H,W]``
(segmentation), so a created folder is also a valid input folder. :func:`save_pairs` never overwrites.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import prediction as P
from ._deps import require
from .denoiser import DiffusersUNetDenoiser, TextConditioning
from .sampling import ddim_sample
from .schedules import ddim_timesteps

TASKS = ("depth", "normals", "segmentation")
IGNORE_INDEX = 255
DEFAULT_T = 600
DEFAULT_STEPS = 50
DEFAULT_ALPHA = 0.998
DEFAULT_EMA_EVERY = 40
MANIFEST = "diff2in1_pairs.json"
MANIFEST_FORMAT = "jointdiffusion.diff2in1.pairs"
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")


def _check_task(task: str, num_classes: Optional[int] = None) -> int:
    """Output channels of a task (segmentation needs ``num_classes >= 2``)."""
    if task == "depth":
        return 1
    if task == "normals":
        return 3
    if task == "segmentation":
        if num_classes is None or int(num_classes) < 2:
            raise ValueError("segmentation needs num_classes >= 2 (the number of label classes)")
        return int(num_classes)
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


# ---- multi-scale UNet features -----------------------------------------------------------------------


class UNetFeatureExtractor:
    """Capture multi-scale features of a frozen diffusers ``UNet2DConditionModel`` with forward hooks.

    The UNet is frozen (``requires_grad_(False)``, ``eval()``). :meth:`__call__` returns a list of tensors
    ``[B, C_r, H_r, W_r]``, one per resolution, ordered coarse → fine; each is the channel concatenation of
    the block outputs at that resolution (down blocks, mid block, up blocks, in forward order).
    """

    def __init__(self, unet: nn.Module, alphas_cumprod: Optional[torch.Tensor] = None):
        if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks") or not hasattr(unet, "mid_block"):
            raise ValueError("UNetFeatureExtractor needs a diffusers UNet2DConditionModel (down_blocks/mid_block/"
                             "up_blocks)")
        self.unet = unet.requires_grad_(False).eval()
        self.alphas_cumprod = None if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.block_names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"] + \
                           [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        self._store: list[tuple[str, torch.Tensor]] = []
        mods = dict(unet.named_modules())
        self._handles = [mods[n].register_forward_hook(self._hook(n)) for n in self.block_names if mods.get(n) is not None]

    def _hook(self, name):
        def fn(_m, _i, out):
            self._store.append((name, out[0] if isinstance(out, (tuple, list)) else out))
        return fn

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @torch.no_grad()
    def raw(self, z0: torch.Tensor, text_emb: torch.Tensor, t: int = 0, noise: Optional[torch.Tensor] = None
            ) -> list[tuple[str, torch.Tensor]]:
        """Block outputs ``[(name, [B,C,h,w])…]`` in forward order for one UNet pass on ``z0`` noised to ``t``."""
        if z0.ndim != 4:
            raise ValueError(f"latents must be [B,C,H,W], got {tuple(z0.shape)}")
        x = z0
        if noise is not None or t > 0:
            if self.alphas_cumprod is None:
                raise ValueError("noising to t > 0 needs alphas_cumprod")
            noise = torch.randn_like(z0) if noise is None else noise
            x = P.add_noise(z0, noise, t, self.alphas_cumprod)
        B = x.shape[0]
        emb = text_emb if text_emb.shape[0] == B else text_emb.expand(B, -1, -1)
        p = next(self.unet.parameters())
        self._store = []
        self.unet(x.to(p.dtype), torch.full((B,), int(t), device=x.device, dtype=torch.long),
                  encoder_hidden_states=emb.to(device=p.device, dtype=p.dtype))
        out, self._store = self._store, []
        return out

    def __call__(self, z0: torch.Tensor, text_emb: torch.Tensor, t: int = 0, noise: Optional[torch.Tensor] = None
                 ) -> list[torch.Tensor]:
        """Features grouped by resolution, coarse → fine: ``[[B, ΣC, h, w] …]`` (float32)."""
        groups: dict[tuple[int, int], list[torch.Tensor]] = {}
        for _n, f in self.raw(z0, text_emb, t, noise):
            groups.setdefault(tuple(f.shape[-2:]), []).append(f.float())
        keys = sorted(groups, key=lambda hw: hw[0] * hw[1])
        return [torch.cat(groups[k], dim=1) for k in keys]

    def channels(self, latent_hw: tuple[int, int], latent_channels: Optional[int] = None,
                 text_dim: Optional[int] = None) -> list[int]:
        """Channel count per resolution group (one dry run on zeros)."""
        cfg = self.unet.config
        c = latent_channels or cfg.in_channels
        d = text_dim or cfg.cross_attention_dim
        p = next(self.unet.parameters())
        feats = self(torch.zeros(1, c, *latent_hw, device=p.device), torch.zeros(1, 1, d, device=p.device))
        return [f.shape[1] for f in feats]


# ---- fusion (Eq. 9 / 10) and task heads ---------------------------------------------------------------


class FeatureFusion(nn.Module):
    """Eq. 9: ``f^proc_i = Conv1×1([Up(f^raw_{i-1}), f^raw_i])`` for adjacent resolutions (coarse → fine).

    ``in_channels``: channels of the raw features, coarse → fine. Returns ``n-1`` processed features
    (``n = 1``: a single 1×1 projection).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int):
        super().__init__()
        ch = list(in_channels)
        if not ch:
            raise ValueError("FeatureFusion needs at least one feature resolution")
        self.single = len(ch) == 1
        if self.single:
            self.convs = nn.ModuleList([nn.Conv2d(ch[0], out_channels, 1)])
        else:
            self.convs = nn.ModuleList(nn.Conv2d(ch[i - 1] + ch[i], out_channels, 1) for i in range(1, len(ch)))
        self.in_channels = ch

    def forward(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if [f.shape[1] for f in feats] != self.in_channels:
            raise ValueError(f"feature channels {[f.shape[1] for f in feats]} do not match the head's "
                             f"{self.in_channels} (was it trained on another UNet or resolution?)")
        if self.single:
            return [self.convs[0](feats[0])]
        out = []
        for i, conv in enumerate(self.convs, start=1):
            up = F.interpolate(feats[i - 1], size=feats[i].shape[-2:], mode="bilinear", align_corners=False)
            out.append(conv(torch.cat([up, feats[i]], dim=1)))
        return out


class ScaleUp(nn.Module):
    """Eq. 10: ``f_{i+1} = Conv1×1([Up×2(f_i), Deconv×2(f_i)])``."""

    def __init__(self, channels: int):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)
        self.conv = nn.Conv2d(2 * channels, channels, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(f, scale_factor=2, mode="bilinear", align_corners=False)
        return self.conv(torch.cat([up, self.deconv(f)], dim=1))


@dataclass
class HeadConfig:
    task: str
    feature_channels: list
    num_classes: Optional[int] = None
    width: int = 64
    upscale_steps: int = 2
    feature_t: int = 0


class TaskHead(nn.Module):
    """Eq. 9 fusion → coarse-to-fine top-down sum → Eq. 10 ×2 up-scalings → ``GN, SiLU, Conv3×3`` → output,
    bilinearly resized to ``out_size``. Normals are L2-normalised over channels.

    ``forward(feats, out_size) → [B, C_out, H, W]`` (depth 1, normals 3, segmentation K logits).
    """

    def __init__(self, config: HeadConfig):
        super().__init__()
        self.config = config
        out_ch = _check_task(config.task, config.num_classes)
        w = int(config.width)
        self.fusion = FeatureFusion(config.feature_channels, w)
        self.ups = nn.ModuleList(ScaleUp(w) for _ in range(int(config.upscale_steps)))
        self.norm = nn.GroupNorm(8 if w % 8 == 0 else 1, w)
        self.out = nn.Conv2d(w, out_ch, 3, padding=1)

    def forward(self, feats: Sequence[torch.Tensor], out_size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        proc = self.fusion(feats)
        x = proc[0]
        for f in proc[1:]:
            x = F.interpolate(x, size=f.shape[-2:], mode="bilinear", align_corners=False) + f
        for up in self.ups:
            x = up(x)
        y = self.out(F.silu(self.norm(x)))
        if out_size is not None and tuple(y.shape[-2:]) != tuple(out_size):
            y = F.interpolate(y, size=tuple(out_size), mode="bilinear", align_corners=False)
        if self.config.task == "normals":
            y = F.normalize(y, dim=1, eps=1e-6)
        return y


def save_head(head: TaskHead, folder: str) -> None:
    """``folder/config.json`` + ``folder/head.safetensors``."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"kind": "diff2in1_head", **asdict(head.config)}, f, indent=2)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
              os.path.join(folder, "head.safetensors"))


def load_head(folder: str, map_location: str = "cpu") -> TaskHead:
    """Inverse of :func:`save_head`, with clear errors for missing or foreign files."""
    from safetensors.torch import load_file
    cfg_p, w_p = os.path.join(folder, "config.json"), os.path.join(folder, "head.safetensors")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"head folder {folder!r} does not exist")
    for p in (cfg_p, w_p):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p!r} missing: a Diff-2-in-1 head folder has config.json and head.safetensors "
                                    "(written by `train_diff2in1 warmup` or `self-improve`)")
    from .models import preflight as PF

    cfg = PF.read_json(cfg_p, "a Diff-2-in-1 head config")
    if cfg.pop("kind", None) != "diff2in1_head":
        raise ValueError(f"{cfg_p!r} is not a Diff-2-in-1 head config (missing kind=diff2in1_head)")
    try:
        hcfg = HeadConfig(**cfg)
    except TypeError as e:
        raise ValueError(f"{cfg_p}: {e}") from None
    meta = PF.meta_model(lambda: TaskHead(hcfg), cfg_p)
    PF.check_size(meta, cfg_p)
    PF.check_shapes(meta, [w_p], folder)
    head = TaskHead(hcfg)
    head.load_state_dict(load_file(w_p, device=map_location))
    return head.eval()


# ---- losses ------------------------------------------------------------------------------------------


def task_loss(pred: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """Supervised loss ``L_sup`` (also ``L_syn``): depth L1, normals mean ``1 - cos``, segmentation CE.

    Targets: depth ``[B,1,H,W]`` (non-finite = invalid), normals ``[B,3,H,W]`` (zero vectors = invalid),
    segmentation ``[B,H,W]`` int (255 = ignore).
    """
    if task == "segmentation":
        if target.shape != pred.shape[:1] + pred.shape[2:]:
            raise ValueError(f"segmentation target {tuple(target.shape)} must be [B,H,W] matching logits "
                             f"{tuple(pred.shape)}")
        return F.cross_entropy(pred, target.long(), ignore_index=IGNORE_INDEX)
    if pred.shape != target.shape:
        raise ValueError(f"{task} prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    if task == "depth":
        valid = torch.isfinite(target)
        return (pred - torch.where(valid, target, pred.detach())).abs()[valid].mean() if valid.any() else pred.sum() * 0
    if task == "normals":
        valid = target.norm(dim=1) > 0.5
        cos = F.cosine_similarity(pred, target, dim=1)
        return (1 - cos)[valid].mean() if valid.any() else pred.sum() * 0
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def pseudo_label(pred: torch.Tensor, task: str) -> torch.Tensor:
    """Turn a head output into a training target (segmentation: arg-max indices; others unchanged)."""
    return pred.argmax(1) if task == "segmentation" else pred


# ---- VAE / text helpers ------------------------------------------------------------------------------


def vae_scaling_factor(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", 0.18215))


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """``[B,3,H,W]`` in [0,1] → latents ``E(x)·s`` (posterior mean)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B,3,H,W] in [0,1], got {tuple(images.shape)}")
    from .models.sd_folder import encode_unscaled

    p = next(vae.parameters())
    z = encode_unscaled(vae, (images * 2 - 1).to(device=p.device, dtype=p.dtype))
    return z.float() * vae_scaling_factor(vae)


@torch.no_grad()
def decode_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """Latents → ``[B,3,H,W]`` in [0,1]."""
    p = next(vae.parameters())
    x = vae.decode((z / vae_scaling_factor(vae)).to(device=p.device, dtype=p.dtype)).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: Sequence[str]) -> torch.Tensor:
    """CLIP prompt embeddings ``[B, L, D]`` (padded to the encoder's max length, as SD)."""
    max_len = min(int(getattr(tokenizer, "model_max_length", 77) or 77),
                  int(text_encoder.config.max_position_embeddings))
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True,
                    return_tensors="pt").input_ids
    p = next(text_encoder.parameters())
    return text_encoder(ids.to(p.device))[0].float()


# ---- perception + data creation -----------------------------------------------------------------------


def predict(extractor: UNetFeatureExtractor, head: TaskHead, z0: torch.Tensor, empty_emb: torch.Tensor,
            out_size: tuple[int, int], feature_t: Optional[int] = None) -> torch.Tensor:
    """Dense prediction ``Φ_dis``: head(features(z0)) at ``out_size``."""
    t = head.config.feature_t if feature_t is None else feature_t
    return head(extractor(z0, empty_emb, t), out_size)


def creation_timesteps(T: int = DEFAULT_T, steps: int = DEFAULT_STEPS) -> list[int]:
    """DDIM timesteps over ``[0, T]`` starting exactly at ``T`` (trailing spacing on ``T+1`` train steps)."""
    if not 0 < int(T) < 1000:
        raise ValueError(f"creation timestep T must satisfy 0 < T < 1000, got {T}")
    if not 1 <= int(steps) <= int(T):
        raise ValueError(f"steps must be in [1, T={T}], got {steps}")
    return ddim_timesteps(int(steps), "trailing", num_train_timesteps=int(T) + 1).tolist()


@torch.no_grad()
def create_pairs(unet, vae, head: TaskHead, extractor: UNetFeatureExtractor, alphas_cumprod: torch.Tensor,
                 images: torch.Tensor, caption_emb: torch.Tensor, empty_emb: torch.Tensor, *,
                 T: int = DEFAULT_T, steps: int = DEFAULT_STEPS, prediction_type: str = "epsilon",
                 generator: Optional[torch.Generator] = None, callback=None) -> tuple[torch.Tensor, torch.Tensor]:
    """§4.2: noise real latents to ``T``, DDIM back (no CFG, caption conditioning), decode, label with the head.

    Args:
        images: ``[B,3,H,W]`` in [0,1] (H, W multiples of 8).
        caption_emb: ``[B or 1, L, D]`` caption embeddings (the empty prompt when no caption).
        empty_emb: ``[1, L, D]`` empty-prompt embedding for feature extraction.

    Returns:
        ``(created_images [B,3,H,W] in [0,1], labels [B,C,H,W])`` (segmentation: logits).
    """
    ts = creation_timesteps(T, steps)
    z0 = encode_images(vae, images)
    noise = torch.randn(z0.shape, generator=generator, device=generator.device if generator else "cpu").to(z0)
    z_T = P.add_noise(z0, noise, ts[0], alphas_cumprod)
    den = DiffusersUNetDenoiser(unet, alphas_cumprod, prediction_type)
    z = ddim_sample(den, z_T, ts, TextConditioning(caption_emb), final_alpha_cumprod=1.0, callback=callback)
    created = decode_latents(vae, z)
    labels = predict(extractor, head, z, empty_emb, tuple(images.shape[-2:]))
    return created, labels


# ---- self-improving ----------------------------------------------------------------------------------


@torch.no_grad()
def ema_update(creator: nn.Module, exploiter: nn.Module, alpha: float = DEFAULT_ALPHA) -> None:
    """Eq. 8: ``θC ← α θC + (1-α) θE`` for every floating parameter and buffer (others copied)."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"EMA momentum alpha must be in [0, 1), got {alpha}")
    sc, se = creator.state_dict(), exploiter.state_dict()
    if sc.keys() != se.keys():
        raise ValueError("creator and exploiter have different parameters")
    for k, vc in sc.items():
        ve = se[k].to(vc.device)
        if vc.is_floating_point():
            vc.mul_(alpha).add_(ve.to(vc.dtype), alpha=1 - alpha)
        else:
            vc.copy_(ve)


@dataclass
class EMAScheduler:
    """Fires the EMA feedback once per ``every`` samples consumed by ``θE`` (default 40, α = 0.998)."""

    alpha: float = DEFAULT_ALPHA
    every: int = DEFAULT_EMA_EVERY
    samples: int = 0
    updates: int = 0

    def __post_init__(self):
        if int(self.every) < 1:
            raise ValueError(f"EMA interval must be >= 1 sample, got {self.every}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"EMA momentum alpha must be in [0, 1), got {self.alpha}")

    def consume(self, n: int) -> int:
        """Count ``n`` consumed samples; return how many EMA updates are now due (crossed multiples of every)."""
        if n < 0:
            raise ValueError("sample count must be >= 0")
        before = self.samples // self.every
        self.samples += int(n)
        return self.samples // self.every - before

    def step(self, creator: nn.Module, exploiter: nn.Module, n: int) -> int:
        """``consume(n)`` and apply the due EMA updates; returns their number."""
        k = self.consume(n)
        for _ in range(k):
            ema_update(creator, exploiter, self.alpha)
        self.updates += k
        return k


class SelfImprover:
    """Two heads ``θC`` (creation, used for online pseudo-labels and at inference) and ``θE`` (exploitation,
    trained), both copies of the warm-up head ``θW``.

    :meth:`loss` is Eq. 7 (mean over each part): ``L_sup(θE(x), y) + L_syn(θE(x̃), θC(x̃))``;
    after each optimiser step call :meth:`after_step` with the number of consumed samples (m + n).
    """

    def __init__(self, warm_head: TaskHead, alpha: float = DEFAULT_ALPHA, every: int = DEFAULT_EMA_EVERY):
        self.creator = copy.deepcopy(warm_head).requires_grad_(False).eval()
        self.exploiter = copy.deepcopy(warm_head).requires_grad_(True).train()
        self.ema = EMAScheduler(alpha, every)
        self.task = warm_head.config.task

    def loss(self, real_feats, real_labels: torch.Tensor, syn_feats=None, out_size=None,
             exploiter: Optional[nn.Module] = None) -> tuple[torch.Tensor, dict]:
        ex = exploiter if exploiter is not None else self.exploiter
        size = out_size or tuple(real_labels.shape[-2:])
        l_sup = task_loss(ex(real_feats, size), real_labels, self.task)
        parts = {"sup": float(l_sup.detach())}
        total = l_sup
        if syn_feats is not None:
            with torch.no_grad():
                target = pseudo_label(self.creator(syn_feats, size), self.task)
            l_syn = task_loss(ex(syn_feats, size), target, self.task)
            parts["syn"] = float(l_syn.detach())
            total = total + l_syn
        return total, parts

    def after_step(self, n_samples: int, exploiter: Optional[nn.Module] = None) -> int:
        return self.ema.step(self.creator, exploiter if exploiter is not None else self.exploiter, n_samples)


# ---- dataset folders ---------------------------------------------------------------------------------


@dataclass
class PairItem:
    name: str
    image: torch.Tensor            # [3,H,W] in [0,1]
    label: torch.Tensor            # [C,H,W] float or [H,W] long
    caption: str = ""
    meta: dict = field(default_factory=dict)


def _read_image(path: str) -> torch.Tensor:
    from PIL import Image
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read image {path!r}: {e}") from e
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _read_label(path: str, task: str) -> torch.Tensor:
    if path.endswith(".npy"):
        try:
            a = np.load(path, allow_pickle=False)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"cannot read label {path!r}: {e}") from e
        t = torch.from_numpy(np.ascontiguousarray(a))
        if task == "segmentation":
            if t.ndim == 3 and t.shape[0] == 1:
                t = t[0]
            if t.ndim != 2 or t.is_floating_point():
                raise ValueError(f"segmentation label {path!r} must be an integer array [H,W], got "
                                 f"{tuple(t.shape)} {t.dtype}")
            return t.long()
        t = t.float()
        want = 1 if task == "depth" else 3
        if t.ndim == 2 and want == 1:
            t = t[None]
        elif t.ndim == 3 and t.shape[-1] == want and t.shape[0] != want:
            t = t.permute(2, 0, 1)
        if t.ndim != 3 or t.shape[0] != want:
            raise ValueError(f"{task} label {path!r} must be [H,W{',3' if want == 3 else ''}] or [{want},H,W], "
                             f"got {tuple(a.shape)}")
        return t.contiguous()
    from PIL import Image
    try:
        with Image.open(path) as im:
            if task == "normals":
                a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
                return torch.from_numpy(a * 2 - 1).permute(2, 0, 1).contiguous()
            a = np.asarray(im)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"cannot read label {path!r}: {e}") from e
    if a.ndim == 3:
        a = a[..., 0]
    if task == "segmentation":
        return torch.from_numpy(a.astype(np.int64))
    maxv = 65535.0 if a.dtype == np.uint16 or a.max() > 255 else 255.0
    return torch.from_numpy(a.astype(np.float32) / maxv)[None]


def _label_hw(label: torch.Tensor) -> tuple[int, int]:
    return tuple(label.shape[-2:])


def load_pair_folder(folder: str, task: str, require_labels: bool = True) -> list[PairItem]:
    """Read an ``images/`` + ``labels/`` (+ ``captions/``) folder (layout in the module docstring)."""
    _check_task(task, 2)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"data folder {folder!r} does not exist")
    img_dir, lab_dir, cap_dir = (os.path.join(folder, d) for d in ("images", "labels", "captions"))
    if not os.path.isdir(lab_dir) and task in ("depth", "normals") and os.path.isdir(os.path.join(folder, task)):
        lab_dir = os.path.join(folder, task)
    if not os.path.isdir(img_dir):
        raise ValueError(f"data folder {folder!r} has no images/ sub-folder; expected <folder>/images/<stem>.png "
                         "and <folder>/labels/<stem>.npy|png")
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(img_dir) if f.lower().endswith(IMAGE_EXTS))
    files = {os.path.splitext(f)[0]: f for f in sorted(os.listdir(img_dir)) if f.lower().endswith(IMAGE_EXTS)}
    if not stems:
        raise ValueError(f"{img_dir!r} contains no images ({', '.join(IMAGE_EXTS)})")
    if len(set(stems)) != len(stems):
        raise ValueError(f"{img_dir!r} has several images with the same stem; stems must be unique")
    labels = {}
    if require_labels:
        if not os.path.isdir(lab_dir):
            raise ValueError(f"data folder {folder!r} has no labels/ sub-folder (labels/<stem>.npy or .png)")
        for f in sorted(os.listdir(lab_dir)):
            s, ext = os.path.splitext(f)
            if ext.lower() in (".npy", ".png"):
                labels.setdefault(s, os.path.join(lab_dir, f))
        missing = [s for s in stems if s not in labels]
        if missing:
            raise ValueError(f"{len(missing)} image(s) in {img_dir!r} have no label in {lab_dir!r}, e.g. "
                             f"{missing[:5]} (expected labels/<stem>.npy or labels/<stem>.png)")
    items = []
    for s in stems:
        img = _read_image(os.path.join(img_dir, files[s]))
        lab = torch.empty(0)
        if require_labels:
            lab = _read_label(labels[s], task)
            if _label_hw(lab) != tuple(img.shape[-2:]):
                raise ValueError(f"label {labels[s]!r} is {_label_hw(lab)} but image {files[s]!r} is "
                                 f"{tuple(img.shape[-2:])}: they must have the same size")
        cap = ""
        cp = os.path.join(cap_dir, s + ".txt")
        if os.path.isfile(cp):
            with open(cp, encoding="utf-8") as f:
                cap = f.read().strip()
        items.append(PairItem(s, img, lab, cap))
    return items


def save_pairs(folder: str, images: torch.Tensor, labels: torch.Tensor, task: str, *,
               names: Optional[Sequence[str]] = None, captions: Optional[Sequence[str]] = None,
               sources: Optional[Sequence[str]] = None, meta: Optional[dict] = None,
               num_classes: Optional[int] = None) -> str:
    """Write created pairs as a dataset folder (never overwrites: an existing manifest or file is an error).

    Args:
        images: ``[N,3,H,W]`` in [0,1]. labels: ``[N,C,H,W]`` (segmentation: logits ``[N,K,H,W]`` or indices
            ``[N,H,W]``). Returns ``folder``.
    """
    from PIL import Image
    _check_task(task, num_classes if task == "segmentation" else None)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [N,3,H,W], got {tuple(images.shape)}")
    if task == "segmentation" and labels.ndim == 4:
        labels = labels.argmax(1)
    if labels.shape[0] != images.shape[0] or tuple(labels.shape[-2:]) != tuple(images.shape[-2:]):
        raise ValueError(f"labels {tuple(labels.shape)} do not match images {tuple(images.shape)}")
    n = images.shape[0]
    names = list(names) if names is not None else [f"created_{i:05d}" for i in range(n)]
    if len(names) != n or len(set(names)) != n:
        raise ValueError("names must be unique, one per image")
    if os.path.exists(os.path.join(folder, MANIFEST)):
        raise FileExistsError(f"{folder!r} already holds created pairs ({MANIFEST}); choose a new folder")
    for d in ("images", "labels", "captions"):
        os.makedirs(os.path.join(folder, d), exist_ok=True)
    items = []
    for i, nm in enumerate(names):
        ip, lp = os.path.join("images", nm + ".png"), os.path.join("labels", nm + ".npy")
        for p in (ip, lp):
            if os.path.exists(os.path.join(folder, p)):
                raise FileExistsError(f"{os.path.join(folder, p)!r} exists; refusing to overwrite")
        arr = (images[i].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, ip))
        lab = labels[i].detach().cpu()
        np.save(os.path.join(folder, lp), lab.long().numpy() if task == "segmentation" else lab.float().numpy())
        cap = captions[i] if captions is not None else ""
        if cap:
            with open(os.path.join(folder, "captions", nm + ".txt"), "w", encoding="utf-8") as f:
                f.write(cap)
        items.append({"name": nm, "image": ip, "label": lp, "caption": cap,
                      "source": sources[i] if sources is not None else ""})
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "task": task, "num_classes": num_classes,
                **(meta or {}), "items": items}
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return folder


def load_pairs(folder: str) -> tuple[list[PairItem], dict]:
    """Read a created-pairs folder written by :func:`save_pairs`; malformed folders raise a clear error."""
    mp = os.path.join(folder, MANIFEST)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"created-pairs folder {folder!r} does not exist")
    if not os.path.isfile(mp):
        raise ValueError(f"{folder!r} is not a created-pairs folder: {MANIFEST} is missing "
                         "(write it with `train_diff2in1 create` or save_pairs)")
    try:
        with open(mp) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{mp!r} is not valid JSON: {e}") from e
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != 1:
        raise ValueError(f"{mp!r} has format {manifest.get('format')!r} v{manifest.get('version')}; expected "
                         f"{MANIFEST_FORMAT!r} v1")
    task = manifest.get("task")
    _check_task(task, manifest.get("num_classes") if task == "segmentation" else None)
    entries = manifest.get("items")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{mp!r} lists no items")
    out = []
    for it in entries:
        if not isinstance(it, dict) or not {"name", "image", "label"} <= set(it):
            raise ValueError(f"{mp!r}: every item needs name, image and label, got {it!r}")
        ip, lp = os.path.join(folder, it["image"]), os.path.join(folder, it["label"])
        for p in (ip, lp):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p!r} listed in {MANIFEST} is missing")
        img, lab = _read_image(ip), _read_label(lp, task)
        if _label_hw(lab) != tuple(img.shape[-2:]):
            raise ValueError(f"label {lp!r} is {_label_hw(lab)} but its image is {tuple(img.shape[-2:])}")
        out.append(PairItem(it["name"], img, lab, it.get("caption", ""), {"source": it.get("source", "")}))
    return out, manifest


def resize_pair(image: torch.Tensor, label: Optional[torch.Tensor], size: int, task: str
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Resize an image (bilinear, antialiased) and its label (segmentation nearest; normals renormalised) to a
    square ``size`` (multiple of 8)."""
    if size % 8:
        raise ValueError(f"resolution must be a multiple of 8 (the VAE factor), got {size}")
    kornia = require("kornia", "Resizing Diff-2-in-1 training pairs")
    img = kornia.geometry.transform.resize(image[None], (size, size), interpolation="bilinear", antialias=True)[0]
    if label is None or label.numel() == 0:
        return img.clamp(0, 1), label
    if task == "segmentation":
        lab = F.interpolate(label[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    else:
        lab = F.interpolate(label[None], size=(size, size), mode="bilinear", align_corners=False)[0]
        if task == "normals":
            lab = F.normalize(lab, dim=0, eps=1e-6)
    return img.clamp(0, 1), lab


def batches(n: int, batch_size: int, generator: Optional[torch.Generator] = None) -> Iterable[list[int]]:
    """Endless shuffled index batches."""
    while True:
        perm = torch.randperm(n, generator=generator).tolist()
        for i in range(0, n, batch_size):
            yield perm[i:i + batch_size]


def stack_labels(labels: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(labels))


def head_num_parameters(head: nn.Module) -> int:
    return sum(p.numel() for p in head.parameters())

