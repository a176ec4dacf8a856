"""Image-conditional depth / surface-normal prediction with Marigold-style checkpoints (E2E-FT fix).

Garcia et al., "Fine-Tuning Image-Conditional Diffusion Models is Easier than You Think" (2024): Marigold's
poor few-step results come from DDIM's ``leading`` timestep spacing, which starts a one-step run at
``t = 1`` instead of ``t = T-1``. With ``trailing`` spacing a single UNet evaluation at ``t = 999`` gives a
prediction as good as 50 steps × 10 ensemble members, and end-to-end fine-tuned checkpoints are
deterministic one-step predictors.

Checkpoint layout (diffusers folder, as ``prs-eth/marigold-*`` and ``GonzaloMG/*-e2e-ft-*`` ship)::

    model_index.json           (optional here)
    scheduler/scheduler_config.json   DDIM, prediction_type v_prediction|epsilon|sample
    unet/config.json + diffusion_pytorch_model[.fp16].{safetensors|bin}   in_channels 8, out_channels 4
    vae/config.json  + diffusion_pytorch_model[.fp16].{safetensors|bin}   AutoencoderKL
    text_encoder/config.json + model[.fp16].safetensors | pytorch_model.bin   CLIPTextModel
    tokenizer/  (CLIPTokenizer files)

Single-step inference (one ``predict`` call with ``steps=1``), for an image ``I`` in ``[0, 1]``:

1. resize so that the long edge equals ``processing_resolution`` (bilinear, antialiased; 0 = native),
   pad to a multiple of 8 (replicate), ``x = 2·I − 1``;
2. ``c = E(x).mean · s`` (VAE posterior mean, ``s = vae.config.scaling_factor``);
3. ``z = 0`` (target latent), ``e`` = CLIP embedding of the empty prompt tokenised *without padding*;
4. ``out = UNet(cat([c, z]), t = 999, e)``; ``x0`` from ``out`` by the scheduler's prediction type
   (v: ``x0 = √ᾱ·z − √(1−ᾱ)·v``);
5. ``y = D(x0 / s)``; depth: ``d = clip(mean_c(y), −1, 1)``, ``(d + 1)/2``, min–max per image (or per batch);
   normals: ``n = y / (‖y‖ + 1e-5)``;
6. crop the padding and resize back to the input size (bilinear, antialiased).

Several steps run trailing DDIM (:func:`jointcore.sampling.ddim_sample`) from a Gaussian (or zero) latent;
an ensemble repeats the run with different seeds and combines members (depth: least-squares
scale/shift alignment to the per-pixel median, then median or mean; normals: mean, renormalised).
The output is affine-invariant *depth* (near = small), not disparity.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from . import prediction as P
from .denoiser import DiffusersUNetDenoiser, TextConditioning
from .metrics import lstsq_scale_shift
from .sampling import ddim_sample, diffusers_prev_timesteps
from .schedules import ddim_timesteps

TASKS: tuple[str, ...] = ("depth", "normals")
NORMALISATIONS: tuple[str, ...] = ("per_image", "per_batch")
REDUCTIONS: tuple[str, ...] = ("median", "mean")
NOISE_KINDS: tuple[str, ...] = ("auto", "zeros", "gaussian")
PREDICTOR_SPACINGS: tuple[str, ...] = ("trailing", "leading")
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

ProgressCallback = Callable[[int, int], None]  # (done, total); raising from it stops the prediction


# ---- checkpoint folder -------------------------------------------------------------------------------

_WEIGHT_RE = re.compile(r"^(diffusion_pytorch_model|model|pytorch_model)(?:\.([A-Za-z0-9_]+))?"
                        r"\.(safetensors|bin)(?:\.index\.json)?$")
_SHARD_RE = re.compile(r"-\d{5}-of-\d{5}")


@dataclass
class ComponentFiles:
    """Weights found in one component sub-folder."""

    folder: str
    formats: set  # {"safetensors", "bin"}
    variants: set  # {None, "fp16", ...}; None = the plain file


def _scan_component(root: str, name: str, what: str) -> ComponentFiles:
    folder = os.path.join(root, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {root!r} has no {name}/ sub-folder ({what}); a Marigold / "
                                f"E2E-FT diffusers folder needs unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{name}/config.json is missing in {root!r} ({what})")
    formats, variants = set(), set()
    for f in os.listdir(folder):
        m = _WEIGHT_RE.match(_SHARD_RE.sub("", f))
        if m:
            formats.add(m.group(3))
            variants.add(m.group(2))
    if not formats:
        raise FileNotFoundError(f"{name}/ in {root!r} has no weights ({what}): expected "
                                f"diffusion_pytorch_model.safetensors / .bin (or model.safetensors / "
                                f"pytorch_model.bin for the text encoder)")
    return ComponentFiles(folder, formats, variants)


def _load_kwargs(files: ComponentFiles, dtype: torch.dtype) -> dict:
    kw: dict = {"use_safetensors": "safetensors" in files.formats}
    if None not in files.variants:  # only variant files (e.g. *.fp16.safetensors) are present
        pref = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
        kw["variant"] = pref if pref in files.variants else sorted(v for v in files.variants if v)[0]
    return kw


def check_checkpoint_folder(path: str) -> dict:
    """Validate a Marigold / E2E-FT diffusers folder without loading weights.

    Returns:
        ``{"unet": ComponentFiles, "vae": …, "text_encoder": …, "tokenizer": folder, "scheduler": config dict}``

    Raises:
        FileNotFoundError: a sub-folder, config or weight file is missing (the message names it).
        ValueError: the UNet is not image-conditional (``in_channels != 2·latent_channels``), the
            scheduler's prediction type is unknown, or components do not fit together.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist")
    unet = _scan_component(path, "unet", "the denoising UNet")
    vae = _scan_component(path, "vae", "the AutoencoderKL that encodes the image and decodes the prediction")
    te = _scan_component(path, "text_encoder", "the CLIP text encoder for the empty-prompt embedding")
    tok = os.path.join(path, "tokenizer")
    if not os.path.isdir(tok) or not any(
            os.path.isfile(os.path.join(tok, f)) for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"checkpoint folder {path!r} has no usable tokenizer/ sub-folder (CLIP tokenizer: "
                                f"vocab.json + merges.txt or tokenizer.json)")
    sched_cfg = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(sched_cfg):
        raise FileNotFoundError(f"checkpoint folder {path!r} has no scheduler/scheduler_config.json (the DDIM "
                                f"schedule and prediction type)")
    with open(sched_cfg) as f:
        sched = json.load(f)
    pt = sched.get("prediction_type", "epsilon")
    if pt not in P.PREDICTION_TYPES:
        raise ValueError(f"scheduler/scheduler_config.json has unknown prediction_type {pt!r}; expected one of "
                         f"{P.PREDICTION_TYPES}")
    with open(os.path.join(unet.folder, "config.json")) as f:
        ucfg = json.load(f)
    with open(os.path.join(vae.folder, "config.json")) as f:
        vcfg = json.load(f)
    with open(os.path.join(te.folder, "config.json")) as f:
        tcfg = json.load(f)
    lat = int(vcfg.get("latent_channels", 4))
    if int(ucfg.get("in_channels", -1)) != 2 * lat:
        raise ValueError(f"unet/config.json has in_channels={ucfg.get('in_channels')}; an image-conditional "
                         f"(Marigold / E2E-FT) UNet takes [image latent, target latent] = {2 * lat} channels. "
                         f"This looks like a plain text-to-image checkpoint, not a depth/normals predictor")
    if int(ucfg.get("out_channels", -1)) != lat:
        raise ValueError(f"unet/config.json has out_channels={ucfg.get('out_channels')}, the VAE has {lat} "
                         f"latent channels")
    hid = tcfg.get("hidden_size", tcfg.get("text_config", {}).get("hidden_size"))
    if hid is not None and ucfg.get("cross_attention_dim") is not None and int(hid) != int(ucfg["cross_attention_dim"]):
        raise ValueError(f"text_encoder hidden_size {hid} does not match unet cross_attention_dim "
                         f"{ucfg['cross_attention_dim']}: the components come from different models")
    return {"unet": unet, "vae": vae, "text_encoder": te, "tokenizer": tok, "scheduler": sched}


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    """``"fp32" | "fp16" | "bf16"`` (or a torch dtype) → torch dtype."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use one of {list(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {list(DTYPES)}")
    return DTYPES[dtype]


def load_predictor(path: str, dtype: Union[str, torch.dtype] = "fp32", device: Union[str, torch.device] = "cpu",
                   vae_dtype: Union[str, torch.dtype, None] = None) -> "DepthNormalPredictor":
    """Load a Marigold / E2E-FT diffusers folder (``.safetensors`` or ``.bin``, plain or variant files).

    Args:
        path: the checkpoint folder (see the module docstring for the layout).
        dtype: weights dtype of UNet and text encoder (``"fp32"``, ``"fp16"``, ``"bf16"``).
        device: where to put the models.
        vae_dtype: dtype of the VAE (default: ``dtype``; ``"fp32"`` avoids fp16 VAE overflow).
    """
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    info = check_checkpoint_folder(path)
    dt = resolve_dtype(dtype)
    vdt = resolve_dtype(vae_dtype) if vae_dtype is not None else dt
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dt,
                                                **_load_kwargs(info["unet"], dt))
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vdt, **_load_kwargs(info["vae"], vdt))
    te_kw = _load_kwargs(info["text_encoder"], dt)
    text_encoder = CLIPTextModel.from_pretrained(info["text_encoder"].folder, **te_kw).to(dt)
    tokenizer = CLIPTokenizer.from_pretrained(info["tokenizer"])
    scheduler = DDIMScheduler.from_config(info["scheduler"])
    pred = DepthNormalPredictor(unet, vae, text_encoder, tokenizer, scheduler)
    return pred.to(device)


# ---- image helpers -------------------------------------------------------------------------------------

def resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with antialiasing (``[B,C,H,W]`` → ``[B,C,*size]``), a no-op at equal size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    dt = x.dtype
    y = F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return y.to(dt)


def processing_size(height: int, width: int, processing_resolution: int) -> tuple[int, int]:
    """Size with the long edge equal to ``processing_resolution`` (0 = keep), as the reference (floor)."""
    if processing_resolution < 0:
        raise ValueError(f"processing_resolution must be >= 0 (0 = native size), got {processing_resolution}")
    if processing_resolution == 0:
        return height, width
    scale = processing_resolution / max(height, width)
    return max(1, int(height * scale)), max(1, int(width * scale))


def pad_to_multiple(x: torch.Tensor, multiple: int = 8) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad bottom/right to a multiple; returns the padded tensor and ``(pad_h, pad_w)``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (ph, pw)


def minmax_normalise(d: torch.Tensor, per_batch: bool = False) -> torch.Tensor:
    """Scale ``[B,1,H,W]`` depth to ``[0, 1]`` per image (or jointly over the batch); constant maps → 0."""
    B = d.shape[0]
    flat = d.reshape(1 if per_batch else B, -1)
    lo = flat.min(1).values
    hi = flat.max(1).values
    rng = hi - lo
    out = torch.where(rng.reshape(-1, 1) > 0, (flat - lo[:, None]) / rng.clamp(min=1e-12)[:, None],
                      torch.zeros_like(flat))
    return out.reshape(d.shape)


def normalise_normals(n: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``n / (‖n‖₂ + eps)`` over the channel axis (as the reference)."""
    return n / (n.norm(p=2, dim=1, keepdim=True) + eps)


def ensemble_depth(members: torch.Tensor, reduction: str = "median") -> torch.Tensor:
    """Combine ``[E,B,1,H,W]`` affine-invariant depth members.

    Each member is aligned with least-squares scale/shift to the per-pixel median of all members, then
    the aligned members are reduced by ``median`` or ``mean``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown ensemble reduction {reduction!r}; use one of {REDUCTIONS}")
    E = members.shape[0]
    if E == 1:
        return members[0]
    ref = members.median(dim=0).values  # [B,1,H,W]
    aligned = []
    for e in range(E):
        s, b = lstsq_scale_shift(members[e], ref)
        shape = (-1,) + (1,) * (members.ndim - 2)
        aligned.append((members[e].double() * s.reshape(shape) + b.reshape(shape)).to(members.dtype))
    stack = torch.stack(aligned)
    return stack.median(dim=0).values if reduction == "median" else stack.mean(dim=0)


def ensemble_normals(members: torch.Tensor) -> torch.Tensor:
    """Mean of ``[E,B,3,H,W]`` unit normals, renormalised to exactly unit length."""
    return F.normalize(members.mean(dim=0), dim=1, eps=1e-12)


# ---- predictor -----------------------------------------------------------------------------------------

@dataclass
class PredictorOutput:
    """Result of :meth:`DepthNormalPredictor.predict`.

    Attributes:
        prediction: ``[B,1,H,W]`` depth in ``[0,1]`` (near = small) or ``[B,3,H,W]`` unit normals, at the
            input size, float32.
        members: ``[E,B,C,h,w]`` raw ensemble members at the processing size (before normalisation).
        timesteps: the UNet timesteps used.
    """

    prediction: torch.Tensor
    members: torch.Tensor
    timesteps: list


class DepthNormalPredictor:
    """Marigold / E2E-FT predictor built from diffusers components.

    Args:
        unet: ``UNet2DConditionModel`` with ``in_channels = 2·latent`` (image latent first).
        vae: ``AutoencoderKL``.
        text_encoder: ``CLIPTextModel`` (only the empty prompt is ever encoded).
        tokenizer: its CLIP tokenizer.
        scheduler: a diffusers DDIM-style scheduler (``alphas_cumprod``, ``config.prediction_type``,
            ``config.steps_offset``, ``config.num_train_timesteps``).
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        lat = int(vae.config.latent_channels)
        if int(unet.config.in_channels) != 2 * lat:
            raise ValueError(f"UNet in_channels={unet.config.in_channels}; an image-conditional predictor needs "
                             f"{2 * lat} (image latent + target latent)")
        pt = scheduler.config.prediction_type
        P._check(pt)
        self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler = (
            unet, vae, text_encoder, tokenizer, scheduler)
        self.prediction_type: str = pt
        self.alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float64)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.steps_offset = int(getattr(scheduler.config, "steps_offset", 0) or 0)
        self.latent_scale = float(getattr(vae.config, "scaling_factor", 0.18215) or 0.18215)
        self._empty: Optional[torch.Tensor] = None
        for m in (unet, vae, text_encoder):
            m.eval()
            m.requires_grad_(False)

    # -- placement --
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "DepthNormalPredictor":
        """Move models (dtype only changes UNet and text encoder; use ``vae.to`` for the VAE)."""
        kw = {} if dtype is None else {"dtype": dtype}
        self.unet.to(device, **kw)
        self.text_encoder.to(device, **kw)
        self.vae.to(device)
        if self._empty is not None:
            self._empty = self._empty.to(device=device)
        return self

    # -- building blocks --
    def empty_text_embedding(self) -> torch.Tensor:
        """CLIP embedding ``[1, L, D]`` of ``""`` tokenised without padding (L = 2: BOS, EOS), cached."""
        if self._empty is None:
            ids = self.tokenizer("", padding="do_not_pad", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            te_dev = next(self.text_encoder.parameters()).device
            with torch.no_grad():
                self._empty = self.text_encoder(ids.to(te_dev))[0]
        return self._empty

    def encode_rgb(self, rgb: torch.Tensor) -> torch.Tensor:
        """``[B,3,H,W]`` in ``[-1,1]`` (H, W multiples of 8) → image latent ``[B,4,H/8,W/8]`` = mean · s."""
        x = rgb.to(device=self.device, dtype=self.vae_dtype)
        return self.vae.encode(x).latent_dist.mean * self.latent_scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Target latent ``[B,4,h,w]`` → VAE output ``[B,3,8h,8w]`` (roughly ``[-1,1]``)."""
        return self.vae.decode(latent.to(self.vae_dtype) / self.latent_scale).sample

    def timesteps(self, steps: int, spacing: str = "trailing") -> list[int]:
        """UNet timesteps of a ``steps``-step DDIM run (``trailing``: the fix; ``leading``: the bug)."""
        if spacing not in PREDICTOR_SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; use 'trailing' (correct) or 'leading' (the "
                             f"original broken Marigold setting, for comparison only)")
        return [int(t) for t in ddim_timesteps(steps, spacing, self.num_train_timesteps, self.steps_offset)]

    def unet_x0(self, rgb_latent: torch.Tensor, target: torch.Tensor, t: int,
                text_embedding: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One UNet call → clean target latent x0 (keeps autograd; used by fine-tuning).

        ``text_embedding`` ``[1,L,D]`` defaults to :meth:`empty_text_embedding`.
        """
        emb = self.empty_text_embedding() if text_embedding is None else text_embedding
        # repeat (contiguous), not expand: attention kernels differ in rounding for strided inputs
        emb = emb.to(device=rgb_latent.device, dtype=self.dtype).repeat(rgb_latent.shape[0], 1, 1)
        x = torch.cat([rgb_latent, target], dim=1).to(self.dtype)
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        out = self.unet(x, tt, encoder_hidden_states=emb).sample
        return P.to_x0(out.float(), target.float(), tt, self.alphas_cumprod, self.prediction_type)

    def prepare(self, images: torch.Tensor, processing_resolution: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """``[B,3,H,W]`` in ``[0,1]`` → resized, padded ``[B,3,H',W']`` in ``[-1,1]`` and the unpadded size."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B,3,H,W] in [0,1], got {tuple(images.shape)}")
        size = processing_size(images.shape[-2], images.shape[-1], int(processing_resolution))
        x = resize_bilinear(images.float(), size).clamp(0, 1) * 2 - 1
        x, _ = pad_to_multiple(x, 8)
        return x, size

    def decode_task(self, latent: torch.Tensor, task: str, size: tuple[int, int]) -> torch.Tensor:
        """Decode and post-process one member: depth ``[B,1,h,w]`` in ``[0,1]`` (before min–max) or normals."""
        y = self.decode(latent).float()[..., : size[0], : size[1]]
        if task == "depth":
            return (y.mean(dim=1, keepdim=True).clamp(-1, 1) + 1) / 2
        return normalise_normals(y[:, :3])

    # -- the full prediction --
    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        task: str = "depth",
        *,
        processing_resolution: int = 768,
        steps: int = 1,
        ensemble_size: int = 1,
        seed: int = 0,
        spacing: str = "trailing",
        normalisation: str = "per_image",
        reduction: str = "median",
        noise: str = "auto",
        callback: Optional[ProgressCallback] = None,
    ) -> PredictorOutput:
        """Predict depth or normals for ``images`` ``[B,3,H,W]`` in ``[0,1]`` (any H, W).

        Args:
            task: ``"depth"`` or ``"normals"``.
            processing_resolution: long edge during inference (768 = E2E-FT/Marigold default; 0 = native).
            steps: DDIM steps (1 for E2E-FT checkpoints and the fixed single-step Marigold).
            ensemble_size: number of members (different seeds ``seed + k``), combined as described above.
            spacing: ``"trailing"`` (correct) or ``"leading"`` (the broken original, ``t = 1`` for one step).
            normalisation: depth min–max ``"per_image"`` or ``"per_batch"`` (keeps relative depth across a batch).
            reduction: depth ensemble ``"median"`` or ``"mean"``.
            noise: initial target latent: ``"zeros"`` (E2E-FT), ``"gaussian"``, or ``"auto"`` (zeros for a
                single member, Gaussian for an ensemble so members differ).
            callback: ``callback(done, total)`` after every UNet call; raise from it to interrupt.
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; use one of {TASKS}")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown normalisation {normalisation!r}; use one of {NORMALISATIONS}")
        if noise not in NOISE_KINDS:
            raise ValueError(f"unknown noise {noise!r}; use one of {NOISE_KINDS}")
        if int(ensemble_size) < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown ensemble reduction {reduction!r}; use one of {REDUCTIONS}")
        ts = self.timesteps(int(steps), spacing)
        prev = diffusers_prev_timesteps(ts, self.num_train_timesteps)
        E = int(ensemble_size)
        kind = noise if noise != "auto" else ("zeros" if E == 1 else "gaussian")

        H, W = images.shape[-2:]
        rgb, size = self.prepare(images, processing_resolution)
        rgb_latent = self.encode_rgb(rgb).float()
        denoiser = DiffusersUNetDenoiser(self.unet, self.alphas_cumprod, self.prediction_type,
                                         extra_channels=rgb_latent)
        cond = TextConditioning(self.empty_text_embedding().repeat(rgb_latent.shape[0], 1, 1))
        total, done = E * len(ts), [0]

        def step_cb(*_a):
            done[0] += 1
            if callback is not None:
                callback(done[0], total)

        members = []
        for k in range(E):
            if kind == "zeros":
                z = torch.zeros_like(rgb_latent)
            else:
                g = torch.Generator("cpu").manual_seed(int(seed) + k)
                z = torch.randn(rgb_latent.shape, generator=g, dtype=torch.float32).to(rgb_latent.device)
            x0 = ddim_sample(denoiser, z, ts, cond, prev_timesteps=prev, final_alpha_cumprod=1.0,
                             callback=step_cb)
            members.append(self.decode_task(x0, task, size))
        stack = torch.stack(members)  # [E,B,C,h,w]
        if task == "depth":
            pred = ensemble_depth(stack, reduction)
            pred = minmax_normalise(pred, per_batch=normalisation == "per_batch")
            pred = resize_bilinear(pred, (H, W)).clamp(0, 1)
        else:
            pred = ensemble_normals(stack) if E > 1 else stack[0]
            if (H, W) != tuple(pred.shape[-2:]):
                pred = F.normalize(resize_bilinear(pred, (H, W)), dim=1, eps=1e-12)
        return PredictorOutput(pred.float(), stack, ts)
