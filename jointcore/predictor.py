"""Image-conditional depth / surface-normal prediction with Marigold-style checkpoints (E2E-FT fix).

Garcia et al., "Fine-Tuning Image-Conditional Diffusion Models is Easier than You Think" (2024): Marigold's
poor few-step results come from DDIM's ``leading`` timestep spacing, which starts a one-step run at
``t = 1`` instead of ``t = T-1``. With ``trailing`` spacing a single UNet evaluation at ``t = 999`` gives a
prediction as good as 50 steps × 10 ensemble members, and end-to-end fine-tuned checkpoints are
deterministic one-step predictors.

Checkpoint layout (diffusers folder, as ``prs-eth/marigold-*`` and ``GonzaloMG/*-e2e-ft-*`` ship)::

    model_index.json           (optional here; default_denoising_steps, default_processing_resolution)
    scheduler/scheduler_config.json   DDIM, prediction_type v_prediction|epsilon|sample, timestep_spacing
    unet/config.json + diffusion_pytorch_model[.fp16].{safetensors|bin}   in_channels 8, out_channels 4
    vae/config.json  + diffusion_pytorch_model[.fp16].{safetensors|bin}   AutoencoderKL
    text_encoder/config.json + model[.fp16].safetensors | pytorch_model.bin   CLIPTextModel
    tokenizer/  (CLIP tokenizer files)

Single-step inference (one ``predict`` call with ``steps=1``) for an image ``I`` in ``[0, 1]``, in the two
procedures :meth:`DepthNormalPredictor.predict` offers (``preprocessing``):

``official`` — the E2E-FT repository's ``MarigoldPipeline`` (``Marigold/marigold/marigold_pipeline.py``):

1. whole grey levels ``q = round(255·I)`` (the code reads 8-bit images); with a processing resolution ``R > 0``
   resize ``q`` so that the long edge is ``R`` (``int(n·R/max)``) as torchvision resizes a uint8 tensor
   (bilinear, antialiased, rounded back to whole levels); ``x = q/255·2 − 1``; **no padding**;
2. ``c = E(x).mean · s``: the encoder's stride-2 convolutions map ``n → ⌊n/2⌋`` per level (70×50 → 8×6);
3. ``z = 0`` (target latent), ``e`` = CLIP embedding of the empty prompt tokenised *without padding*;
4. ``out = UNet(cat([c, z]), t = 999, e)``; ``x0`` from ``out`` by the scheduler's prediction type
   (v: ``x0 = √ᾱ·z − √(1−ᾱ)·v``);
5. ``y = D(x0 / s)`` (8·latent size: 64×48 for 70×50); depth ``d = (clip(mean_c(y), −1, 1) + 1)/2``, min–max;
   normals ``n = y / (‖y‖ + 1e-5)``, and once more ``n / (‖n‖ + 1e-5)``;
6. resize back to the input size (bilinear, antialiased); depth clipped to [0, 1], normals clipped to [−1, 1]
   and **not** renormalised.

``diffusers`` — diffusers' ``MarigoldDepthPipeline`` / ``MarigoldNormalsPipeline``: ``x = 2I − 1`` resized in
float to ``n·R // max``, replicate-padded to a multiple of 8; after decoding the padding is cropped; normals
``clip(y, −1, 1) / max(‖·‖, 1e-6)``; resize back with plain bilinear (no antialiasing), normals renormalised.
(Depth is min–max normalised here in both procedures; diffusers leaves a single member unnormalised.)

Several steps run trailing DDIM (:func:`jointcore.sampling.ddim_sample`) from a zero or Gaussian latent;
an ensemble combines members as Marigold does (:func:`ensemble_depth`, :func:`ensemble_normals`; each
procedure with its own code base's variant) and reports an uncertainty map.
The output is affine-invariant *depth* (near = small), not disparity.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F

from . import prediction as P
from .denoiser import DiffusersUNetDenoiser, TextConditioning
from .metrics import lstsq_scale_shift  # noqa: F401  (re-exported)
from .sampling import ddim_sample, diffusers_prev_timesteps
from .schedules import ddim_timesteps

TASKS: tuple[str, ...] = ("depth", "normals")
NORMALISATIONS: tuple[str, ...] = ("per_image", "per_batch")
REDUCTIONS: tuple[str, ...] = ("median", "mean")            # depth ensembles
NORMALS_REDUCTIONS: tuple[str, ...] = ("closest", "mean")   # normal ensembles
PREPROCESSINGS: tuple[str, ...] = ("official", "diffusers")
INITS: tuple[str, ...] = ("zeros", "gaussian")
PREDICTOR_SPACINGS: tuple[str, ...] = ("trailing", "leading", "linspace")
SPACING_CHOICES: tuple[str, ...] = PREDICTOR_SPACINGS + ("auto",)
FALLBACK_STEPS = 1                       # when model_index.json has no default_denoising_steps (E2E-FT)
FALLBACK_PROCESSING_RESOLUTION = 768     # when it has no default_processing_resolution (Marigold / E2E-FT)
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
    from .models.preflight import read_json

    sched = read_json(sched_cfg, "the DDIM scheduler config")
    pt = sched.get("prediction_type", "epsilon")
    if pt not in P.PREDICTION_TYPES:
        raise ValueError(f"scheduler/scheduler_config.json has unknown prediction_type {pt!r}; expected one of "
                         f"{P.PREDICTION_TYPES}")
    ucfg = read_json(os.path.join(unet.folder, "config.json"), "the UNet config")
    vcfg = read_json(os.path.join(vae.folder, "config.json"), "the VAE config")
    tcfg = read_json(os.path.join(te.folder, "config.json"), "the text encoder config")
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


def read_model_index(path: str) -> dict:
    """The folder's ``model_index.json`` as a dict (``{}`` when absent; invalid JSON is an error naming it)."""
    from .models.preflight import read_json

    f = os.path.join(os.fspath(path), "model_index.json")
    if not os.path.isfile(f):
        return {}
    return read_json(f, "the checkpoint's model_index.json")


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
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .models import preflight as PF
    from .models.sd_folder import vae_class

    info = check_checkpoint_folder(path)
    dt = resolve_dtype(dtype)
    vdt = resolve_dtype(vae_dtype) if vae_dtype is not None else dt
    for name, d in (("unet", dt), ("vae", vdt), ("text_encoder", dt)):
        kw = _load_kwargs(info[name], d)
        PF.preflight_sd_component(path, name, kw["use_safetensors"], kw.get("variant"), torch.finfo(d).bits // 8)
    vcls = vae_class(os.path.join(path, "vae"))
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dt,
                                                **_load_kwargs(info["unet"], dt))
    vae = vcls.from_pretrained(path, subfolder="vae", torch_dtype=vdt, **_load_kwargs(info["vae"], vdt))
    te_kw = _load_kwargs(info["text_encoder"], dt)
    text_encoder = CLIPTextModel.from_pretrained(info["text_encoder"].folder, **te_kw).to(dt)
    tokenizer = CLIPTokenizer.from_pretrained(info["tokenizer"])
    scheduler = DDIMScheduler.from_config(info["scheduler"])
    pred = DepthNormalPredictor(unet, vae, text_encoder, tokenizer, scheduler, model_index=read_model_index(path))
    return pred.to(device)


# ---- image helpers -------------------------------------------------------------------------------------

def resize_bilinear(x: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``; antialiased by default) ``[B,C,H,W]`` → ``[B,C,*size]``.

    A no-op at equal size (bilinear resampling at scale 1 is the identity, with or without antialiasing).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    dt = x.dtype
    y = F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=antialias)
    return y.to(dt)


def processing_size(height: int, width: int, processing_resolution: int) -> tuple[int, int]:
    """Size with the long edge equal to ``processing_resolution`` (0 = keep), as the official code computes it:
    ``int(n · (R / max(H, W)))`` (floating point, then truncation)."""
    if processing_resolution < 0:
        raise ValueError(f"processing_resolution must be >= 0 (0 = native size), got {processing_resolution}")
    if processing_resolution == 0:
        return height, width
    scale = processing_resolution / max(height, width)
    return max(1, int(height * scale)), max(1, int(width * scale))


def diffusers_processing_size(height: int, width: int, processing_resolution: int) -> tuple[int, int]:
    """diffusers' ``resize_to_max_edge`` size: ``n · R // max(H, W)`` in integers (0 = keep).

    Differs from :func:`processing_size` by one pixel where ``R / max · n`` rounds just below an integer."""
    if processing_resolution < 0:
        raise ValueError(f"processing_resolution must be >= 0 (0 = native size), got {processing_resolution}")
    if processing_resolution == 0:
        return height, width
    m = max(height, width)
    h, w = height * processing_resolution // m, width * processing_resolution // m
    if h == 0 or w == 0:
        raise ValueError(f"extreme aspect ratio {width}x{height}: the short edge would be 0 px at "
                         f"processing_resolution {processing_resolution}")
    return h, w


def pad_to_multiple(x: torch.Tensor, multiple: int = 8) -> tuple[torch.Tensor, tuple[int, int]]:
    """Replicate-pad bottom/right to a multiple; returns the padded tensor and ``(pad_h, pad_w)``."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, (ph, pw)


def quantise_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[0,1]`` floats → whole grey levels ``0…255`` (as float32), what the official code starts from (a PIL
    image). ComfyUI images loaded from 8-bit files are exact multiples of 1/255, so this is lossless for them."""
    return (images.float().clamp(0, 1) * 255.0).round()


def resize_uint8(q: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize whole grey levels ``[B,3,H,W]`` (float32 values 0…255) as torchvision's tensor ``resize`` does for a
    uint8 image: bilinear with antialiasing in float32, then rounded (half to even) back to whole levels."""
    if tuple(q.shape[-2:]) == tuple(size):
        return q
    y = F.interpolate(q.float(), size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return torch.round(y)


def minmax_normalise(d: torch.Tensor, per_batch: bool = False) -> torch.Tensor:
    """Scale ``[B,1,H,W]`` depth to ``[0, 1]`` per image (or jointly over the batch); constant maps → 0."""
    return _minmax(d, per_batch)[0]


def _minmax(d: torch.Tensor, per_batch: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Min–max normalisation and the scale ``1/(max−min)`` it applied (``[B]``; 0 for constant maps)."""
    B = d.shape[0]
    flat = d.reshape(1 if per_batch else B, -1)
    lo = flat.min(1).values
    hi = flat.max(1).values
    rng = hi - lo
    ok = rng > 0
    out = torch.where(ok[:, None], (flat - lo[:, None]) / torch.where(ok, rng, torch.ones_like(rng))[:, None],
                      torch.zeros_like(flat))
    scale = torch.where(ok, 1.0 / torch.where(ok, rng, torch.ones_like(rng)), torch.zeros_like(rng))
    return out.reshape(d.shape), scale.expand(B) if per_batch else scale


def normalise_normals(n: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``n / (‖n‖₂ + eps)`` over the channel axis (the official E2E-FT / GeoWizard step)."""
    return n / (n.norm(p=2, dim=1, keepdim=True) + eps)


def normalise_normals_clamped(n: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``n / max(‖n‖₂, eps)`` over the channel axis (diffusers' ``MarigoldNormalsPipeline.normalize_normals``)."""
    return n / n.norm(dim=1, keepdim=True).clamp(min=eps)


# ---- ensembles -----------------------------------------------------------------------------------------
#
# Depth (Marigold's test-time ensembling): every member m_k gets a scale s_k and shift t_k; the 2E parameters
# minimise a least-squares spread of the aligned members plus a regulariser pulling the combined map to [0, 1]:
#
#   official (Marigold repo, used by E2E-FT):  sqrt(mean over all pairs (i<j) and pixels of (a_i − a_j)²)
#                                              + 0.02 · (|min r| + |1 − max r|),   float32 parameters
#   diffusers (MarigoldDepthPipeline):         Σ_{i<j} sqrt(mean over pixels of (a_i − a_j)²)
#                                              + 0.02 · (|min r| + |1 − max r|),   float64 parameters,
#                                              alignment on a copy at most 1024 px (nearest-exact)
#
# with a_k = s_k·m_k + t_k and r the median (or mean) of the a_k. Both start from the per-member min–max map
# (s = 1/(max−min), t = −s·min) and run scipy's BFGS for at most 2 iterations (tol 1e-3) — a couple of
# quasi-Newton steps, not a converged fit. The combined map is the per-pixel median (or mean) of the aligned
# members, min–max normalised; the uncertainty is the MAD (median) or the standard deviation (mean) of the
# aligned members, divided by the same range.
#
# Normals: official (GeoWizard's procedure, used by E2E-FT): the mean direction in spherical angles (mean φ,
# mean θ); the whole member with the smallest summed angle to it is the result. diffusers: the normalised mean;
# per pixel, the member closest to it. ``mean``: the mean (normalised as the procedure does afterwards).
# Uncertainty (both; the official code returns none): per pixel, the mean angle between the members and their
# normalised mean, divided by π.

def _minimize_bfgs(fun, x0, tol: float, max_iter: int):
    try:
        from scipy.optimize import minimize
    except ImportError as e:  # ComfyUI ships scipy; a bare environment may not
        raise ImportError("depth ensembles (ensemble_size > 1) align the members with scipy's BFGS, as the "
                          "official and diffusers Marigold code do; install scipy") from e
    return minimize(fun, x0, method="BFGS", tol=tol, options={"maxiter": max_iter, "disp": False}).x


def _reduce_depth(aligned: torch.Tensor, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel median (uncertainty: MAD) or mean (uncertainty: standard deviation) over dim 0."""
    if reduction == "mean":
        return aligned.mean(dim=0), aligned.std(dim=0)
    med = aligned.median(dim=0).values
    return med, (aligned - med).abs().median(dim=0).values


def _ensemble_depth_official(m: torch.Tensor, reduction: str, regularizer: float = 0.02, max_iter: int = 2,
                             tol: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's members ``[E,h,w]`` → (depth ``[h,w]`` in [0,1], uncertainty ``[h,w]``), official procedure."""
    E = m.shape[0]
    flat = m.reshape(E, -1).cpu().numpy()
    lo, hi = flat.min(axis=1), flat.max(axis=1)
    rng = hi - lo
    rng = np.where(rng > 0, rng, np.ones_like(rng))  # a constant member would make the official start inf/NaN
    s0 = 1.0 / rng
    x0 = np.concatenate([s0, -s0 * lo]).astype(np.float32)
    ii, jj = torch.triu_indices(E, E, 1, device=m.device)

    def aligned(x):
        s = torch.from_numpy(np.ascontiguousarray(x[:E])).to(device=m.device, dtype=m.dtype)
        t = torch.from_numpy(np.ascontiguousarray(x[E:])).to(device=m.device, dtype=m.dtype)
        return m * s.view(-1, 1, 1) + t.view(-1, 1, 1)

    def cost(x):
        a = aligned(x)
        spread = torch.sqrt(torch.mean((a[ii] - a[jj]) ** 2))
        r = a.mean(dim=0) if reduction == "mean" else a.median(dim=0).values
        near = torch.sqrt((0 - r.min()) ** 2)
        far = torch.sqrt((1 - r.max()) ** 2)
        return (spread + (near + far) * regularizer).detach().cpu().numpy().astype(np.float32)

    x = _minimize_bfgs(cost, x0, tol, max_iter)
    pred, unc = _reduce_depth(aligned(x), reduction)
    lo_p, hi_p = pred.min(), pred.max()
    if hi_p > lo_p:
        return (pred - lo_p) / (hi_p - lo_p), unc / (hi_p - lo_p)
    return torch.zeros_like(pred), torch.zeros_like(unc)


def _ensemble_depth_diffusers(m: torch.Tensor, reduction: str, regularizer: float = 0.02, max_iter: int = 2,
                              tol: float = 1e-3, max_res: Optional[int] = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's members ``[E,1,h,w]`` → (``[1,h,w]``, ``[1,h,w]``), diffusers' ``ensemble_depth``
    (affine-invariant case)."""
    E = m.shape[0]
    pairs = [(i, j) for i in range(E) for j in range(i + 1, E)]

    def aligned(d, p):
        s, t = np.split(p, 2)
        return d * torch.from_numpy(s).to(d).view(E, 1, 1, 1) + torch.from_numpy(t).to(d).view(E, 1, 1, 1)

    def reduce(a):
        return a.mean(dim=0, keepdim=True) if reduction == "mean" else a.median(dim=0, keepdim=True).values

    small = m.float()
    if max_res is not None and max(small.shape[-2:]) > max_res:
        h, w = small.shape[-2:]
        small = F.interpolate(small, (h * max_res // max(h, w), w * max_res // max(h, w)), mode="nearest-exact")

    def cost(p):
        a = aligned(small, p)
        c = 0.0
        for i, j in pairs:
            c += torch.sqrt(torch.mean((a[i] - a[j]) ** 2)).item()
        if regularizer > 0:
            r = reduce(a)
            c += (r.min().abs().item() + (1.0 - r.max()).abs().item()) * regularizer
        return c

    lo = small.reshape(E, -1).min(dim=1).values
    hi = small.reshape(E, -1).max(dim=1).values
    s0 = 1.0 / (hi - lo).clamp(min=1e-6)
    p0 = torch.cat((s0, -s0 * lo)).cpu().numpy().astype(np.float64)
    p = _minimize_bfgs(cost, p0, tol, max_iter)
    a = aligned(m, p)
    if reduction == "mean":
        pred, unc = a.mean(dim=0, keepdim=True), a.std(dim=0, keepdim=True)
    else:
        pred = a.median(dim=0, keepdim=True).values
        unc = (a - pred).abs().median(dim=0, keepdim=True).values
    rng = (pred.max() - pred.min()).clamp(min=1e-6)
    return ((pred - pred.min()) / rng)[0], (unc / rng)[0]


def ensemble_depth(members: torch.Tensor, reduction: str = "median", procedure: str = "official"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ``[E,B,1,H,W]`` affine-invariant depth members (Marigold's ensembling, see above).

    Returns:
        ``(depth, uncertainty)``, each ``[B,1,H,W]``; depth min–max normalised per image. ``E = 1``: the member
        itself and a zero uncertainty.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown depth ensemble reduction {reduction!r}; use one of {REDUCTIONS}")
    if procedure not in PREPROCESSINGS:
        raise ValueError(f"unknown ensemble procedure {procedure!r}; use one of {PREPROCESSINGS}")
    if members.ndim != 5 or members.shape[2] != 1:
        raise ValueError(f"expected depth members [E,B,1,H,W], got {tuple(members.shape)}")
    if members.shape[0] == 1:
        return members[0], torch.zeros_like(members[0])
    preds, uncs = [], []
    for b in range(members.shape[1]):
        if procedure == "official":
            p, u = _ensemble_depth_official(members[:, b, 0], reduction)
            p, u = p[None], u[None]
        else:
            p, u = _ensemble_depth_diffusers(members[:, b], reduction)
        preds.append(p)
        uncs.append(u)
    return torch.stack(preds), torch.stack(uncs)


def normals_uncertainty(members: torch.Tensor) -> torch.Tensor:
    """``[E,B,3,H,W]`` unit normals → ``[B,1,H,W]``: mean angle to the normalised mean direction, divided by π."""
    mean = normalise_normals_clamped(members.mean(dim=0))
    cos = (mean[None] * members).sum(dim=2, keepdim=True).clamp(-1, 1)
    return cos.arccos().mean(dim=0) / math.pi


def _closest_official(n: torch.Tensor) -> torch.Tensor:
    """GeoWizard's pick for one image ``[E,3,h,w]`` (already re-normalised): the whole member with the smallest
    summed angle to the mean direction in spherical angles."""
    E = n.shape[0]
    phi = torch.atan2(n[:, 1], n[:, 0]).mean(dim=0)
    theta = torch.atan2(torch.norm(n[:, :2], p=2, dim=1), n[:, 2]).mean(dim=0)
    mean = torch.stack([theta.sin() * phi.cos(), theta.sin() * phi.sin(), theta.cos()]).to(n)
    angle = torch.acos(torch.clip(F.cosine_similarity(mean[None], n, dim=1), -0.999, 0.999))
    return n[torch.argmin(angle.reshape(E, -1).sum(-1))]


def ensemble_normals(members: torch.Tensor, reduction: str = "closest", procedure: str = "official"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ``[E,B,3,H,W]`` normal members (see above). Returns ``(normals, uncertainty)``,
    ``[B,3,H,W]`` and ``[B,1,H,W]``; ``E = 1``: the member itself and a zero uncertainty."""
    if reduction not in NORMALS_REDUCTIONS:
        raise ValueError(f"unknown normals ensemble reduction {reduction!r}; use one of {NORMALS_REDUCTIONS}")
    if procedure not in PREPROCESSINGS:
        raise ValueError(f"unknown ensemble procedure {procedure!r}; use one of {PREPROCESSINGS}")
    if members.ndim != 5 or members.shape[2] != 3:
        raise ValueError(f"expected normal members [E,B,3,H,W], got {tuple(members.shape)}")
    if members.shape[0] == 1:
        return members[0], torch.zeros_like(members[0][:, :1])
    if procedure == "official":
        n = members / (torch.norm(members, p=2, dim=2, keepdim=True) + 1e-5)
        unc = normals_uncertainty(n)
        if reduction == "mean":
            return n.mean(dim=0), unc
        return torch.stack([_closest_official(n[:, b]) for b in range(n.shape[1])]), unc
    unc = normals_uncertainty(members)
    mean = normalise_normals_clamped(members.mean(dim=0))
    if reduction == "mean":
        return mean, unc
    cos = (mean[None] * members).sum(dim=2, keepdim=True).clamp(-1, 1)  # [E,B,1,H,W]
    idx = cos.argmax(dim=0, keepdim=True).expand(1, *members.shape[1:])
    return torch.gather(members, 0, idx)[0], unc


# ---- predictor -----------------------------------------------------------------------------------------

@dataclass
class PredictorOutput:
    """Result of :meth:`DepthNormalPredictor.predict`.

    Attributes:
        prediction: ``[B,1,H,W]`` depth in ``[0,1]`` (near = small) or ``[B,3,H,W]`` normals, at the input size,
            float32.
        members: ``[E,B,C,h,w]`` raw ensemble members at the decoded size (before ensembling / normalisation).
        timesteps: the UNet timesteps used.
        uncertainty: ``[B,1,H,W]`` at the input size for an ensemble (depth: MAD or standard deviation in units
            of the normalised depth; normals: mean angle to the mean / π), ``None`` for a single member.
        init_latents: ``[E,B,C,h,w]`` the initial target latents the members started from.
        settings: the resolved ``steps``, ``processing_resolution`` and ``spacing``.
    """

    prediction: torch.Tensor
    members: torch.Tensor
    timesteps: list
    uncertainty: Optional[torch.Tensor] = None
    init_latents: Optional[torch.Tensor] = None
    settings: Optional[dict] = None


class DepthNormalPredictor:
    """Marigold / E2E-FT predictor built from diffusers components.

    Args:
        unet: ``UNet2DConditionModel`` with ``in_channels = 2·latent`` (image latent first).
        vae: ``AutoencoderKL``.
        text_encoder: ``CLIPTextModel`` (only the empty prompt is ever encoded).
        tokenizer: its CLIP tokenizer.
        scheduler: a diffusers DDIM-style scheduler (``alphas_cumprod``, ``config.prediction_type``,
            ``config.steps_offset``, ``config.num_train_timesteps``, ``config.timestep_spacing``).
        model_index: the checkpoint's ``model_index.json`` (``default_denoising_steps``,
            ``default_processing_resolution``, ``use_full_z_range``), used by the ``0`` / ``-1`` / ``auto``
            settings of :meth:`predict`.
    """

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, model_index: Optional[dict] = None):
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
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.model_index: dict = dict(model_index or {})
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

    # -- checkpoint defaults --
    @property
    def use_full_z_range(self) -> bool:
        """diffusers' normals flag (``model_index.json``; default true): false maps z from [-1,1] to [0,1]."""
        v = self.model_index.get("use_full_z_range")
        return True if v is None else bool(v)

    def checkpoint_defaults(self) -> dict:
        """``steps``, ``processing_resolution`` and ``spacing`` the checkpoint asks for.

        ``model_index.json``'s ``default_denoising_steps`` / ``default_processing_resolution`` (1 and 768 when
        absent: the E2E-FT single step at Marigold's resolution) and the scheduler's ``timestep_spacing`` (as
        diffusers reads it: ``leading`` when the config does not say).
        """
        mi = self.model_index
        steps = mi.get("default_denoising_steps")
        res = mi.get("default_processing_resolution")
        spacing = getattr(self.scheduler.config, "timestep_spacing", None) or "leading"
        return {"steps": FALLBACK_STEPS if steps is None else int(steps),
                "processing_resolution": FALLBACK_PROCESSING_RESOLUTION if res is None else int(res),
                "spacing": str(spacing)}

    def resolve_settings(self, steps: Optional[int], processing_resolution: Optional[int], spacing: str) -> dict:
        """Replace ``steps = 0`` / ``processing_resolution = -1`` / ``spacing = "auto"`` (or ``None``) by
        :meth:`checkpoint_defaults`; validates the result."""
        d = self.checkpoint_defaults()
        steps = d["steps"] if steps is None or int(steps) == 0 else int(steps)
        res = (d["processing_resolution"] if processing_resolution is None or int(processing_resolution) == -1
               else int(processing_resolution))
        sp = d["spacing"] if spacing in (None, "auto") else spacing
        if steps < 1:
            raise ValueError(f"steps must be >= 1 (0 = the checkpoint's default), got {steps}")
        if res < 0:
            raise ValueError(f"processing_resolution must be >= 0 (0 = native size, -1 = the checkpoint's "
                             f"default), got {processing_resolution}")
        if sp not in PREDICTOR_SPACINGS:
            raise ValueError(f"unknown spacing {sp!r}; use 'trailing' (correct), 'leading' (the original broken "
                             f"Marigold setting, for comparison only), 'linspace' or 'auto' (the checkpoint's)")
        return {"steps": steps, "processing_resolution": res, "spacing": sp}

    # -- building blocks --
    def activation_bytes(self, batch: int, height: int, width: int) -> int:
        """Memory to plan for predicting ``batch`` images processed at ``height × width`` px (the largest of VAE
        encode, one UNet call, VAE decode; :func:`jointcore.runtime.memory.sd_activation_bytes`)."""
        from .runtime.memory import sd_activation_bytes

        return sd_activation_bytes(self.unet, self.vae, batch, height, width, text_len=2)

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
        """``[B,3,H,W]`` in ``[-1,1]`` → image latent = posterior mean · s.

        Any size: the encoder's stride-2 convolutions (padded right/bottom by one) map ``n → ⌊n/2⌋`` per level,
        so a 70×50 image gives an 8×6 latent with the SD VAE."""
        from .models.sd_folder import encode_unscaled

        x = rgb.to(device=self.device, dtype=self.vae_dtype)
        return encode_unscaled(self.vae, x) * self.latent_scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Target latent ``[B,4,h,w]`` → VAE output ``[B,3,8h,8w]`` (roughly ``[-1,1]``)."""
        return self.vae.decode(latent.to(self.vae_dtype) / self.latent_scale).sample

    def timesteps(self, steps: int, spacing: str = "trailing") -> list[int]:
        """UNet timesteps of a ``steps``-step DDIM run (``trailing``: the fix; ``leading``: the bug)."""
        if spacing not in PREDICTOR_SPACINGS:
            raise ValueError(f"unknown spacing {spacing!r}; use 'trailing' (correct), 'leading' (the original "
                             f"broken Marigold setting, for comparison only) or 'linspace'")
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

    def prepare(self, images: torch.Tensor, processing_resolution: int, preprocessing: str = "official"
                ) -> tuple[torch.Tensor, tuple[int, int]]:
        """``[B,3,H,W]`` in ``[0,1]`` → the encoder input in ``[-1,1]`` and the processing size.

        ``official``: whole grey levels, resized as uint8 (:func:`resize_uint8`), ``q/255·2−1``, no padding.
        ``diffusers``: ``2·I−1`` resized in float (bilinear, antialiased) to :func:`diffusers_processing_size`,
        replicate-padded to a multiple of the VAE factor (the size returned is the unpadded one).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [B,3,H,W] in [0,1], got {tuple(images.shape)}")
        _check_choice("preprocessing", preprocessing, PREPROCESSINGS)
        H, W = images.shape[-2:]
        R = int(processing_resolution)
        if preprocessing == "official":
            size = processing_size(H, W, R)
            q = resize_uint8(quantise_uint8(images), size) if R > 0 else quantise_uint8(images)
            return q / 255.0 * 2.0 - 1.0, size
        size = diffusers_processing_size(H, W, R)
        x = images.float().clamp(0, 1) * 2.0 - 1.0
        if R > 0:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x, _ = pad_to_multiple(x, self.vae_scale_factor)
        return x, size

    def decode_task(self, latent: torch.Tensor, task: str, size: Optional[tuple[int, int]] = None,
                    preprocessing: str = "official") -> torch.Tensor:
        """Decode one member: depth ``[B,1,h,w]`` in ``[0,1]`` (before min–max) or normals ``[B,3,h,w]``.

        ``official``: the whole decoded size; depth ``(clip(mean_c y, −1, 1) + 1)/2``; normals ``y/(‖y‖+1e-5)``.
        ``diffusers``: cropped to ``size`` (the padding removed); normals ``clip(y, −1, 1)`` (z mapped to
        [0,1] when the checkpoint says ``use_full_z_range: false``), then ``y/max(‖y‖, 1e-6)``.
        """
        y = self.decode(latent).float()
        if preprocessing == "diffusers" and size is not None:
            y = y[..., : size[0], : size[1]]
        if task == "depth":
            return (y.mean(dim=1, keepdim=True).clamp(-1, 1) + 1) / 2
        y = y[:, :3]
        if preprocessing == "official":
            return normalise_normals(y)
        y = y.clamp(-1, 1)
        if not self.use_full_z_range:
            y = torch.cat([y[:, :2], y[:, 2:3] * 0.5 + 0.5], dim=1)
        return normalise_normals_clamped(y)

    def initial_latents(self, shape: tuple, ensemble_size: int, init: str, seed: int,
                        preprocessing: str = "official") -> torch.Tensor:
        """Initial target latents ``[E,B,C,h,w]`` for latents of ``shape = (B,C,h,w)`` (float32, CPU).

        ``zeros``; or ``gaussian`` from ONE CPU generator seeded with ``seed``, so seeds ``s`` and ``s+1`` share
        no member. Order of the draws: ``official`` — image by image, member by member, one ``[1,C,h,w]`` draw
        each (the official ``run.py`` on a CPU device after ``torch.manual_seed(seed)``); ``diffusers`` — one
        ``[B·E,C,h,w]`` draw, image-major (``MarigoldDepthPipeline`` with that CPU generator).
        """
        _check_choice("init", init, INITS)
        B = int(shape[0])
        E = int(ensemble_size)
        if init == "zeros":
            return torch.zeros((E, *shape), dtype=torch.float32)
        g = torch.Generator("cpu").manual_seed(int(seed))
        if preprocessing == "diffusers":
            z = torch.randn((B * E, *shape[1:]), generator=g, dtype=torch.float32)
            return z.reshape(B, E, *shape[1:]).transpose(0, 1).contiguous()
        z = torch.empty((E, *shape), dtype=torch.float32)
        for b in range(B):
            for k in range(E):
                z[k, b] = torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32)[0]
        return z

    # -- the full prediction --
    @torch.no_grad()
    def predict(
        self,
        images: torch.Tensor,
        task: str = "depth",
        *,
        processing_resolution: Optional[int] = 768,
        steps: Optional[int] = 1,
        ensemble_size: int = 1,
        seed: int = 0,
        spacing: str = "trailing",
        normalisation: str = "per_image",
        reduction: Optional[str] = None,
        preprocessing: str = "official",
        init: str = "zeros",
        latents: Optional[torch.Tensor] = None,
        callback: Optional[ProgressCallback] = None,
    ) -> PredictorOutput:
        """Predict depth or normals for ``images`` ``[B,3,H,W]`` in ``[0,1]`` (any H, W).

        Args:
            task: ``"depth"`` or ``"normals"``.
            processing_resolution: long edge during inference (768 = E2E-FT/Marigold default; 0 = native;
                -1 or None = the checkpoint's ``default_processing_resolution``).
            steps: DDIM steps (1 for E2E-FT checkpoints; 0 or None = the checkpoint's ``default_denoising_steps``).
            ensemble_size: number of members, combined by :func:`ensemble_depth` / :func:`ensemble_normals`.
            seed: the generator of a ``gaussian`` init (see :meth:`initial_latents`).
            spacing: ``"trailing"`` (correct), ``"leading"`` (the broken original, ``t = 1`` for one step),
                ``"linspace"``, or ``"auto"`` (the checkpoint scheduler's ``timestep_spacing``).
            normalisation: depth min–max ``"per_image"`` (official) or ``"per_batch"`` (keeps relative depth
                across a batch, e.g. video frames).
            reduction: ensemble reduction — depth ``"median"`` (default) / ``"mean"``; normals ``"closest"``
                (default) / ``"mean"``.
            preprocessing: ``"official"`` (the E2E-FT code: uint8 resize, no padding, resize back with
                antialiasing) or ``"diffusers"`` (diffusers' Marigold pipelines: float resize, replicate
                padding, plain bilinear back); the ensembles follow the same code base.
            init: initial target latent, ``"zeros"`` (E2E-FT) or ``"gaussian"`` (Marigold diffusion checkpoints;
                needed for ensemble members to differ).
            latents: explicit initial target latents ``[E,B,C,h,w]`` (or ``[B,C,h,w]`` for one member) at the
                latent size of this preprocessing; ``init`` and ``seed`` are then unused.
            callback: ``callback(done, total)`` after every UNet call; raise from it to interrupt.

        The last step returns the clean estimate x0 (as the E2E-FT code; diffusers' pipelines return the DDIM
        ``prev_sample`` towards ᾱ₀, which equals x0 only with ``set_alpha_to_one``).
        """
        _check_choice("task", task, TASKS)
        _check_choice("normalisation", normalisation, NORMALISATIONS)
        _check_choice("preprocessing", preprocessing, PREPROCESSINGS)
        _check_choice("init", init, INITS)
        if int(ensemble_size) < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {ensemble_size}")
        if reduction is None:
            reduction = "median" if task == "depth" else "closest"
        _check_choice(f"{task} ensemble reduction", reduction, REDUCTIONS if task == "depth" else NORMALS_REDUCTIONS)
        settings = self.resolve_settings(steps, processing_resolution, spacing)
        ts = self.timesteps(settings["steps"], settings["spacing"])
        prev = diffusers_prev_timesteps(ts, self.num_train_timesteps)
        E = int(ensemble_size)

        H, W = images.shape[-2:]
        rgb, size = self.prepare(images, settings["processing_resolution"], preprocessing)
        rgb_latent = self.encode_rgb(rgb).float()
        shape = tuple(rgb_latent.shape)
        if latents is not None:
            z0 = latents.float()
            if z0.ndim == 4:
                z0 = z0[None]
            if tuple(z0.shape) != (E, *shape):
                raise ValueError(f"latents must have shape [E,B,C,h,w] = {(E, *shape)} for these images, "
                                 f"ensemble size and preprocessing; got {tuple(latents.shape)}")
        else:
            if init == "zeros" and E > 1:
                logging.getLogger("jointdiffusion").warning(
                    "predictor: %d ensemble members from a zero init are identical (the sampler is deterministic); "
                    "use init 'gaussian' for an ensemble", E)
            z0 = self.initial_latents(shape, E, init, seed, preprocessing)
        denoiser = DiffusersUNetDenoiser(self.unet, self.alphas_cumprod, self.prediction_type,
                                         extra_channels=rgb_latent)
        cond = TextConditioning(self.empty_text_embedding().repeat(shape[0], 1, 1))
        total, done = E * len(ts), [0]

        def step_cb(*_a):
            done[0] += 1
            if callback is not None:
                callback(done[0], total)

        members = []
        for k in range(E):
            x0 = ddim_sample(denoiser, z0[k].to(rgb_latent.device), ts, cond, prev_timesteps=prev,
                             final_alpha_cumprod=1.0, callback=step_cb)
            members.append(self.decode_task(x0, task, size, preprocessing))
        stack = torch.stack(members)  # [E,B,C,h,w]
        official = preprocessing == "official"
        if task == "depth":
            pred, unc = ensemble_depth(stack, reduction, preprocessing)
            pred, scale = _minmax(pred, per_batch=normalisation == "per_batch")
            unc = unc * scale.reshape(-1, 1, 1, 1)
            pred = resize_bilinear(pred, (H, W), antialias=official).clamp(0, 1)
        else:
            pred, unc = ensemble_normals(stack, reduction, preprocessing)
            if official:
                pred = resize_bilinear(normalise_normals(pred), (H, W)).clamp(-1, 1)
            else:
                pred = normalise_normals_clamped(resize_bilinear(pred, (H, W), antialias=False))
        uncertainty = resize_bilinear(unc, (H, W), antialias=official) if E > 1 else None
        return PredictorOutput(pred.float(), stack, ts, uncertainty, z0, settings)


def _check_choice(what: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; use one of {tuple(choices)}")
