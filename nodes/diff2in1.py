"""Diff-2-in-1 and MT-Diffusion nodes.

* ``JDDiff2in1Loader``: a diffusers SD folder (``models/diffusers``) + a trained task head (``models/diff2in1``,
  written by ``python -m jointcore.train_diff2in1``) → ``JD_DIFF2IN1``.
* ``JDDiff2in1Predict``: depth / normals / segmentation of an IMAGE with that head.
* ``JDDiff2in1CreatePairs``: Diff-2-in-1 data creation (noise to T, DDIM back with the captions, label with the
  head); saves a dataset folder under ``output/diff2in1_pairs/`` (never overwrites) and returns the images.
* ``JDMTDiffusionRestoreSampler``: MT-Diffusion ancestral sampler (Algorithm 1) as a SAMPLER that keeps the
  unmasked region of a masked latent (SetLatentNoiseMask / VAEEncodeForInpaint) exactly.
"""
from __future__ import annotations

import os
import re

import torch

from ..jointcore import diff2in1 as D
from ..jointcore import mt_diffusion as MT
from ..jointcore.denoiser import require_finite_output
from .comfy_denoiser import ComfyRun, make_ksampler, no_steps
from .common import (CATEGORY, add_tooltips, bchw_to_image, checked_inputs, image_to_bchw, list_model_dirs,
                     make_patcher, progress, register_model_folder, resolve_model_dir, running, torch_device)

HEAD_FOLDER = "diff2in1"
register_model_folder(HEAD_FOLDER)


def _is_head(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, "head.safetensors"))


def _is_sd(path: str) -> bool:
    return all(os.path.isdir(os.path.join(path, d)) for d in ("unet", "vae", "text_encoder", "tokenizer"))


def _choices(name, marker):
    try:
        found = list_model_dirs(name, marker)
    except Exception:  # noqa: BLE001 - folder not registered in this ComfyUI
        found = []
    return found or ["(none found)"]


def visualize(label: torch.Tensor, task: str) -> torch.Tensor:
    """Head output ``[B,C,H,W]`` → ``[B,1|3,H,W]`` in [0,1] (depth min–max per image, normals (n+1)/2,
    segmentation class index / (K-1))."""
    if task == "normals":
        return (label + 1) / 2
    if task == "segmentation":
        return label.argmax(1, keepdim=True).float() / max(label.shape[1] - 1, 1)
    lo = label.amin(dim=(1, 2, 3), keepdim=True)
    hi = label.amax(dim=(1, 2, 3), keepdim=True)
    return (label - lo) / (hi - lo).clamp(min=1e-8)


def _processing_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The size :func:`_resize_batch` gives an image of ``height × width`` px."""
    if resolution == 0:
        return max(8, height // 8 * 8), max(8, width // 8 * 8)
    return resolution, resolution


def _resize_batch(img: torch.Tensor, resolution: int) -> torch.Tensor:
    if resolution % 8:
        raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
    h, w = _processing_size(img.shape[-2], img.shape[-1], resolution)
    if tuple(img.shape[-2:]) == (h, w):
        return img
    import kornia
    return kornia.geometry.transform.resize(img, (h, w), interpolation="bilinear", antialias=True).clamp(0, 1)


class _Bundle:
    def __init__(self, unet, vae, tok, te, ab, pred, head, names):
        self.unet, self.vae, self.tok, self.te, self.ab, self.pred, self.head = unet, vae, tok, te, ab, pred, head
        self.names = names
        # ComfyUI's ModelPatcher owns the UNet, VAE, text encoder and head (loaded for a run by load_models_gpu,
        # kept loaded between runs, unloaded by ComfyUI)
        self.patcher = make_patcher(f"Diff-2-in-1 {names[0]} + {names[1]}", unet=unet, vae=vae, text_encoder=te,
                                    head=head)

    def running(self, height: int, width: int, what: str):
        """Load the models with ComfyUI for a job at ``height × width`` px (refused clearly if it cannot fit)."""
        from ..jointcore.runtime.memory import sd_activation_bytes

        return running([self.patcher], sd_activation_bytes(self.unet, self.vae, 1, height, width),
                       f"Diff-2-in-1 {what} at {width}×{height} px",
                       "Lower the resolution input (512 is what the heads are trained at).")

    def check_finite(self, out: torch.Tensor) -> None:
        require_finite_output(out, f"Diff-2-in-1 ({self.names[1]})", next(self.unet.parameters()).dtype)


class JDDiff2in1Loader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "sd_model": (_choices("diffusers", _is_sd), {"tooltip": "diffusers SD folder in models/diffusers "
                                                                   "(the UNet the head was trained on)"}),
            "head": (_choices(HEAD_FOLDER, _is_head), {"tooltip": "head folder in models/diff2in1 "
                                                                  "(config.json + head.safetensors)"}),
        }}

    RETURN_TYPES = ("JD_DIFF2IN1",)
    RETURN_NAMES = ("diff2in1",)
    FUNCTION = "load"
    CATEGORY = CATEGORY + "/diff2in1"
    DESCRIPTION = "Load a frozen SD UNet/VAE/text encoder (diffusers folder) and a Diff-2-in-1 task head."

    def load(self, sd_model, head):
        from ..jointcore.train_diff2in1 import load_sd_components
        if sd_model.startswith("(none") or head.startswith("(none"):
            raise ValueError("put a diffusers SD folder in models/diffusers and a head folder (from "
                             "`python -m jointcore.train_diff2in1 warmup|self-improve`) in models/diff2in1")
        unet, vae, tok, te, ab, pred = load_sd_components(resolve_model_dir("diffusers", sd_model))
        h = D.load_head(resolve_model_dir(HEAD_FOLDER, head))
        return (_Bundle(unet, vae, tok, te, ab, pred, h, (sd_model, head)),)


class JDDiff2in1Predict:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "diff2in1": ("JD_DIFF2IN1",),
            "image": ("IMAGE",),
            "resolution": ("INT", {"default": 512, "min": 0, "max": 2048, "step": 8,
                                   "tooltip": "processing size (square); 0 = native size rounded down to 8"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("prediction",)
    FUNCTION = "predict"
    CATEGORY = CATEGORY + "/diff2in1"
    DESCRIPTION = ("Dense prediction with a Diff-2-in-1 head on one-step UNet features: depth (min–max grey), "
                   "normals ((n+1)/2) or segmentation (class index grey).")

    def predict(self, diff2in1, image, resolution):
        import comfy.model_management as mm
        b = diff2in1
        dev = torch_device()
        x = image_to_bchw(image)
        H, W = x.shape[-2:]
        ex = D.UNetFeatureExtractor(b.unet, b.ab)
        try:
            with b.running(*_processing_size(H, W, resolution), "prediction"), torch.no_grad():
                empty = D.encode_prompts(b.tok, b.te, [""])
                outs = []
                for i in range(x.shape[0]):
                    mm.throw_exception_if_processing_interrupted()
                    xi = _resize_batch(x[i:i + 1].to(dev), resolution)
                    z = D.encode_images(b.vae, xi)
                    outs.append(D.predict(ex, b.head, z, empty, (H, W)).cpu())
        finally:
            ex.remove()
        pred = torch.cat(outs)
        b.check_finite(pred)
        return (bchw_to_image(visualize(pred, b.head.config.task)),)


_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def unique_pairs_folder(output_dir: str, prefix: str) -> str:
    """``output/diff2in1_pairs/<prefix>_NNNNN`` with the first unused number."""
    if not _PREFIX_RE.match(prefix) or prefix.startswith("."):
        raise ValueError(f"folder_prefix {prefix!r} may only use letters, digits, '_', '-' and '.'")
    base = os.path.join(output_dir, "diff2in1_pairs")
    os.makedirs(base, exist_ok=True)
    i = 1
    while os.path.exists(os.path.join(base, f"{prefix}_{i:05d}")):
        i += 1
    return os.path.join(base, f"{prefix}_{i:05d}")


class JDDiff2in1CreatePairs:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "diff2in1": ("JD_DIFF2IN1",),
            "images": ("IMAGE",),
            "T": ("INT", {"default": D.DEFAULT_T, "min": 1, "max": 999,
                          "tooltip": "noise level the real images are sent to (higher = more diverse)"}),
            "steps": ("INT", {"default": D.DEFAULT_STEPS, "min": 1, "max": 999, "tooltip": "DDIM steps over [0, T]"}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            "per_image": ("INT", {"default": 1, "min": 1, "max": 64}),
            "resolution": ("INT", {"default": 512, "min": 0, "max": 2048, "step": 8,
                                   "tooltip": "square size; 0 = native size rounded down to 8"}),
            "folder_prefix": ("STRING", {"default": "diff2in1_pairs"}),
        }, "optional": {
            "captions": ("STRING", {"multiline": True, "default": "",
                                    "tooltip": "one caption per line, per input image (empty = empty prompt)"}),
        }}

    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING")
    RETURN_NAMES = ("created_images", "labels", "folder")
    FUNCTION = "create"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY + "/diff2in1"
    DESCRIPTION = ("Diff-2-in-1 data creation: noise real images to T, DDIM back with their captions (no CFG), "
                   "label the created images with the head; saves images/ labels/ captions/ + "
                   "diff2in1_pairs.json under output/diff2in1_pairs/ (a new folder every run).")

    def create(self, diff2in1, images, T, steps, seed, per_image, resolution, folder_prefix, captions=""):
        import folder_paths
        b = diff2in1
        D.creation_timesteps(T, steps)
        x = _resize_batch(image_to_bchw(images), resolution)
        lines = [c.strip() for c in captions.splitlines()] if captions.strip() else []
        if lines and len(lines) not in (1, x.shape[0]):
            raise ValueError(f"give one caption line per image ({x.shape[0]}) or a single line, got {len(lines)}")
        caps = (lines * x.shape[0] if len(lines) == 1 else lines) or [""] * x.shape[0]
        folder = unique_pairs_folder(folder_paths.get_output_directory(), folder_prefix)
        dev = torch_device()
        ex = D.UNetFeatureExtractor(b.unet, b.ab)
        g = torch.Generator().manual_seed(int(seed))
        jobs = [(i, k) for i in range(x.shape[0]) for k in range(per_image)]
        cb = progress(len(jobs) * steps)
        created, labels = [], []
        try:
            with b.running(*x.shape[-2:], "pair creation"), torch.no_grad():
                empty = D.encode_prompts(b.tok, b.te, [""])
                for i, _k in jobs:
                    emb = D.encode_prompts(b.tok, b.te, [caps[i]])
                    c, lab = D.create_pairs(b.unet, b.vae, b.head, ex, b.ab, x[i:i + 1].to(dev), emb, empty, T=T,
                                            steps=steps, prediction_type=b.pred, generator=g, callback=cb)
                    created.append(c.cpu()), labels.append(lab.cpu())
        finally:
            ex.remove()
        created, labels = torch.cat(created), torch.cat(labels)
        b.check_finite(created)
        D.save_pairs(folder, created, labels, b.head.config.task, names=[f"img{i:04d}_c{k:02d}" for i, k in jobs],
                     captions=[caps[i] for i, _ in jobs], sources=[f"input_{i}" for i, _ in jobs],
                     num_classes=b.head.config.num_classes,
                     meta={"T": T, "steps": steps, "seed": int(seed), "sd_model": b.names[0], "head": b.names[1]})
        return (bchw_to_image(created), bchw_to_image(visualize(labels, b.head.config.task)), folder)


# ---- MT-Diffusion restoration SAMPLER -----------------------------------------------------------------

def mt_restore(model, x, sigmas, extra_args=None, callback=None, disable=None, modality_weight: float = 0.0):
    """KSAMPLER function: MT-Diffusion ancestral sampling (Algorithm 1) on the model's discrete timesteps.

    With a noise mask (``extra_args["denoise_mask"]``, 1 = regenerate) the masked latent is the conditioning
    modality (identity encoder, weight ``modality_weight``; 0 = plain DDPM ancestral for ordinary models) and
    the known region is re-imposed after every step and copied exactly at the end.
    """
    if no_steps(sigmas):
        return x
    run = ComfyRun(model, x, sigmas, extra_args, callback)
    if run.last != -1:
        raise ValueError("the MT-Diffusion restore sampler needs sigmas that end at 0 (a full denoise schedule)")
    ab, ts = run.alphas_cumprod, run.timesteps
    ts = [t for i, t in enumerate(ts) if i == 0 or t < ts[i - 1]]  # strictly decreasing
    x_t = run.x_t
    gen = torch.Generator().manual_seed(run.seed + 7)
    fa = MT.ForwardAggregation(ab, [float(modality_weight)])
    mask = run.extra_args.get("denoise_mask")
    known = getattr(model, "latent_image", None)
    hook, emb = None, [None]
    if mask is not None and known is not None:
        m = (mask[:, :1] > 0.5).to(x.dtype)
        if m.shape[-2:] != x.shape[-2:]:
            m = torch.nn.functional.interpolate(m, size=x.shape[-2:], mode="nearest")
        known = known.to(x)
        emb = [known * (1 - m)] if modality_weight != 0 else [None]
        hook = MT.KnownRegionHook(known, m, fa, emb, generator=gen)

    return MT.mt_sample(run.denoiser, x_t, ts, None, fa, emb, generator=gen, step_hook=hook,
                        callback=run.callback)


class JDMTDiffusionRestoreSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "modality_weight": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "w_t of the masked-image modality (MT-Diffusion-trained "
                                                     "models); 0 for ordinary SD models"}),
        }}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY + "/sampling"
    DESCRIPTION = ("MT-Diffusion constrained restoration for SamplerCustom(Advanced): ancestral sampling with "
                   "forward aggregation; with a latent noise mask the unmasked region is kept exactly.")

    def get_sampler(self, modality_weight):
        return (make_ksampler(mt_restore, modality_weight=float(modality_weight)),)


NODE_CLASS_MAPPINGS = {
    "JDDiff2in1Loader": JDDiff2in1Loader,
    "JDDiff2in1Predict": JDDiff2in1Predict,
    "JDDiff2in1CreatePairs": JDDiff2in1CreatePairs,
    "JDMTDiffusionRestoreSampler": JDMTDiffusionRestoreSampler,
}
checked_inputs(NODE_CLASS_MAPPINGS)
NODE_DISPLAY_NAME_MAPPINGS = {
    "JDDiff2in1Loader": "Diff-2-in-1 Loader",
    "JDDiff2in1Predict": "Diff-2-in-1 Predict",
    "JDDiff2in1CreatePairs": "Diff-2-in-1 Create Pairs",
    "JDMTDiffusionRestoreSampler": "MT-Diffusion Restore",
}

add_tooltips(NODE_CLASS_MAPPINGS, {
    "JDDiff2in1Predict": {
        "diff2in1": "from Diff-2-in-1 Loader",
        "image": "images to label (resized to resolution, the prediction back to the image size)",
    },
    "JDDiff2in1CreatePairs": {
        "diff2in1": "from Diff-2-in-1 Loader",
        "images": "real images the new image-label pairs are made from",
        "seed": "seed of the noise the images are sent to (another seed, other images)",
        "per_image": "new pairs made from each input image",
        "folder_prefix": "name of the new numbered folder under output/diff2in1_pairs/ (letters, digits, _ . -)",
    },
}, {
    "JDDiff2in1Loader": ("the frozen SD model and the task head: for Diff-2-in-1 Predict and Create Pairs",),
    "JDDiff2in1Predict": ("the head's prediction: depth as min–max grey, normals as (n+1)/2, segmentation as "
                          "class-index grey",),
    "JDDiff2in1CreatePairs": ("the created images", "their labels from the head, as pictures",
                              "the folder the pairs were saved in (images/ labels/ captions/ + json)"),
    "JDMTDiffusionRestoreSampler": ("a SAMPLER: connect it to SamplerCustom / SamplerCustomAdvanced",),
})
