"""Depth / normal prediction nodes (Marigold and E2E-FT checkpoints with the trailing-DDIM fix).

Models: diffusers folders under ``models/jointdiffusion_predictors/<name>/`` (unet/, vae/, text_encoder/,
tokenizer/, scheduler/), e.g. ``GonzaloMG/marigold-e2e-ft-depth`` or ``prs-eth/marigold-normals-v1-1``.

Custom types:
* ``JD_PREDICTOR`` — a :class:`jointcore.predictor.DepthNormalPredictor`, its modules owned by a ComfyUI
  ``ModelPatcher`` (``comfy_patcher``): loaded by ComfyUI for a run, unloaded by ComfyUI.
* ``JD_RAW`` — ``{"task": "depth"|"normals"|"uncertainty", "data": [B,C,H,W] float32 CPU}``: depth in
  ``[0,1]`` (affine-invariant, near = small), normals, or an ensemble's uncertainty ``[B,1,H,W]``.
"""
from __future__ import annotations

import os

import numpy as np
import torch

import comfy.model_management as mm
import folder_paths

from ..jointcore import predictor as JP
from ..jointcore import predictor_vis as V
from ..jointcore.denoiser import require_finite_output
from .common import (CATEGORY, add_tooltips, auto_dtype, bchw_to_image, checked_inputs, image_to_bchw,
                     list_model_dirs, make_patcher, progress, register_model_folder, resolve_model_dir, running,
                     tag_depth)

MODEL_FOLDER = "jointdiffusion_predictors"
SUB = CATEGORY + "/depth"


def _has_unet(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "unet"))


def _comfy_patcher(pred, name: str):
    """The ComfyUI ModelPatcher owning ``pred``'s UNet, VAE and text encoder (loaded by Predict Depth / Normals through
    load_models_gpu, kept loaded between runs, unloaded by ComfyUI), made once and kept on the predictor (also
    for a predictor made elsewhere than Predictor Loader)."""
    if getattr(pred, "comfy_patcher", None) is None:
        pred.comfy_patcher = make_patcher(name, unet=pred.unet, vae=pred.vae, text_encoder=pred.text_encoder)
    return pred.comfy_patcher


class JDPredictorLoader:
    """Load a Marigold / E2E-FT diffusers folder from models/jointdiffusion_predictors/."""

    @classmethod
    def INPUT_TYPES(cls):
        register_model_folder(MODEL_FOLDER)
        names = list_model_dirs(MODEL_FOLDER, marker=_has_unet)
        return {"required": {
            "model": (names or ["(put diffusers folders in models/jointdiffusion_predictors)"],),
            "dtype": (["auto", "fp32", "fp16", "bf16"], {"default": "auto", "tooltip": "auto: bf16 on GPUs that "
                                                         "support it, else fp16 on GPU; fp32 on CPU"}),
            "vae_fp32": ("BOOLEAN", {"default": True, "tooltip": "keep the VAE in fp32 when the model runs in "
                                                                 "fp16 (avoids black/NaN images)"}),
        }}

    RETURN_TYPES = ("JD_PREDICTOR",)
    RETURN_NAMES = ("predictor",)
    FUNCTION = "load"
    CATEGORY = SUB
    DESCRIPTION = "Loads an image-conditional depth/normals diffusion checkpoint (Marigold, E2E-FT)."

    def load(self, model, dtype="auto", vae_fp32=True):
        register_model_folder(MODEL_FOLDER)
        path = resolve_model_dir(MODEL_FOLDER, model)
        dev = mm.get_torch_device()
        dt = auto_dtype(dev) if dtype == "auto" else dtype
        vae_dt = "fp32" if (vae_fp32 and dt == "fp16") else dt
        pred = JP.load_predictor(path, dtype=dt, device=mm.unet_offload_device(), vae_dtype=vae_dt)
        _comfy_patcher(pred, f"depth/normals predictor {model}")
        return (pred,)


class JDDepthNormalPredict:
    """Predict affine-invariant depth or surface normals (one trailing-DDIM step by default)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "predictor": ("JD_PREDICTOR",),
            "image": ("IMAGE",),
            "task": (list(JP.TASKS), {"default": "depth"}),
            "processing_resolution": ("INT", {"default": 768, "min": -1, "max": 4096, "step": 1,
                                              "tooltip": "long edge during inference; 0 = native size; -1 = the "
                                                         "checkpoint's default (model_index.json)"}),
            "steps": ("INT", {"default": 1, "min": 0, "max": 100,
                              "tooltip": "DDIM steps; 0 = the checkpoint's default (model_index.json)"}),
            "ensemble_size": ("INT", {"default": 1, "min": 1, "max": 32}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF,
                             "tooltip": "one generator for all members (init gaussian)"}),
            "spacing": (list(JP.SPACING_CHOICES), {"default": "trailing",
                                                    "tooltip": "'leading' is the original broken setting; 'auto' "
                                                               "= the checkpoint scheduler's spacing"}),
            "normalisation": (list(JP.NORMALISATIONS), {"default": "per_image"}),
        }, "optional": {
            "ensemble_reduction": (list(JP.REDUCTIONS), {"default": "median",
                                                          "tooltip": "depth ensembles: per-pixel median or mean "
                                                                     "of the scale/shift-aligned members"}),
            "preprocessing": (list(JP.PREPROCESSINGS), {
                "default": "official",
                "tooltip": "official: exactly the E2E-FT code (8-bit resize, no padding, antialiased resize "
                           "back, its ensembling); diffusers: diffusers' Marigold pipelines (float resize, "
                           "padding to 8, plain bilinear back, its ensembling)"}),
            "init": (list(JP.INITS), {"default": "zeros",
                                      "tooltip": "initial target latent: zeros (E2E-FT, deterministic) or "
                                                 "gaussian (Marigold diffusion checkpoints; ensemble members "
                                                 "only differ with gaussian)"}),
            "normals_reduction": (list(JP.NORMALS_REDUCTIONS), {
                "default": "closest", "tooltip": "normal ensembles: the member closest to the mean, or the mean"}),
        }}

    RETURN_TYPES = ("IMAGE", "JD_RAW", "IMAGE", "JD_RAW")
    RETURN_NAMES = ("image", "raw", "uncertainty", "uncertainty_raw")
    FUNCTION = "predict"
    CATEGORY = SUB
    DESCRIPTION = ("Depth (grey, near = dark) or normals ((n+1)/2) as IMAGE, plus the raw float prediction, and "
                   "the ensemble's uncertainty (IMAGE scaled to each image's maximum; raw: depth MAD / std in "
                   "normalised-depth units, normals mean angle / pi; zero for one member). E2E-FT checkpoints: "
                   "steps 1, ensemble 1, init zeros.")

    def predict(self, predictor, image, task, processing_resolution, steps, ensemble_size, seed, spacing,
                normalisation, ensemble_reduction="median", preprocessing="official", init="zeros",
                normals_reduction="closest"):
        dev = mm.get_torch_device()
        images = image_to_bchw(image)
        settings = predictor.resolve_settings(steps, processing_resolution, spacing)
        cb = progress(settings["steps"] * int(ensemble_size))
        mm.throw_exception_if_processing_interrupted()
        ph, pw = JP.processing_size(*images.shape[-2:], settings["processing_resolution"])
        with running([_comfy_patcher(predictor, "depth/normals predictor")], predictor.activation_bytes(images.shape[0], ph, pw),
                     f"depth/normals prediction of {images.shape[0]} image(s) at {pw}×{ph} px",
                     "Lower processing_resolution (768 is the checkpoints' default) or predict fewer images at "
                     "once."):
            out = predictor.predict(
                images.to(dev), task, processing_resolution=settings["processing_resolution"],
                steps=settings["steps"], ensemble_size=ensemble_size, seed=seed, spacing=settings["spacing"],
                normalisation=normalisation, reduction=ensemble_reduction if task == "depth" else normals_reduction,
                preprocessing=preprocessing, init=init, callback=lambda done, total: cb())
        require_finite_output(out.prediction, "the depth/normals predictor", next(predictor.unet.parameters()).dtype)
        data = out.prediction.float().cpu()
        vis = data if task == "depth" else V.normals_to_rgb(data)
        unc = (out.uncertainty.float().cpu() if out.uncertainty is not None
               else torch.zeros((data.shape[0], 1, *data.shape[-2:])))
        peak = unc.reshape(unc.shape[0], -1).amax(dim=1).reshape(-1, 1, 1, 1)
        unc_vis = torch.where(peak > 0, unc / peak.clamp(min=1e-12), torch.zeros_like(unc)).clamp(0, 1)
        # the depth picture says it is depth (near = dark), so RGBD to Mesh (depth_kind auto) reads it right
        return (tag_depth(bchw_to_image(vis), "depth" if task == "depth" else "normals"),
                {"task": task, "data": data, "near": "small"} if task == "depth" else {"task": task, "data": data},
                bchw_to_image(unc_vis), {"task": "uncertainty", "of": task, "data": unc})


class JDDepthColorize:
    """Colour a depth IMAGE (first channel, 0–1) with a kornia colour map."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "depth": ("IMAGE",),
            "colormap": (V.available_colormaps(), {"default": "grey"}),
            "near_bright": ("BOOLEAN", {"default": False,
                                        "tooltip": "invert so near is bright (ControlNet depth convention)"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "colorize"
    CATEGORY = SUB

    def colorize(self, depth, colormap, near_bright):
        d = image_to_bchw(depth)[:, :1]
        return (bchw_to_image(V.colorize_depth(d, colormap, near_bright)),)


class JDNormalsVisualize:
    """Normals (JD_RAW) → RGB IMAGE (n+1)/2, with axis flips for other conventions."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "raw": ("JD_RAW",),
            "flip_x": ("BOOLEAN", {"default": False}),
            "flip_y": ("BOOLEAN", {"default": False}),
            "flip_z": ("BOOLEAN", {"default": False}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "visualize"
    CATEGORY = SUB

    def visualize(self, raw, flip_x, flip_y, flip_z):
        if raw.get("task") != "normals":
            raise ValueError(f"this JD_RAW holds {raw.get('task')!r}; connect the raw output of a predict node "
                             f"run with task 'normals'")
        return (bchw_to_image(V.normals_to_rgb(raw["data"], flip_x, flip_y, flip_z)),)


class JDSaveRawPrediction:
    """Save the raw float prediction into ComfyUI's output folder (never overwrites)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "raw": ("JD_RAW",),
            "filename_prefix": ("STRING", {"default": "jd_depth"}),
            "format": (["png16", "npy", "png16+npy"], {"default": "png16"}),
        }}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = SUB
    DESCRIPTION = ("16-bit PNG (depth / uncertainty: grey value·65535, clipped to [0,1]; normals: RGB "
                   "(n+1)/2·65535) and/or float32 .npy ([H,W] depth / uncertainty or [H,W,3] normals).")

    def save(self, raw, filename_prefix, format):
        data = raw["data"]
        out_dir = folder_paths.get_output_directory()
        sub, stem = os.path.split(os.path.normpath(filename_prefix.strip() or "jd_depth"))
        full = os.path.abspath(os.path.join(out_dir, sub))
        if os.path.commonpath([full, os.path.abspath(out_dir)]) != os.path.abspath(out_dir):
            raise ValueError(f"filename_prefix {filename_prefix!r} points outside the output folder")
        results = []
        for b in range(data.shape[0]):
            x = data[b]
            base = V.unique_stem(full, stem, (".png", ".npy"))
            if "png16" in format:
                V.write_png16(base + ".png", V.to_uint16((x + 1) / 2 if raw["task"] == "normals" else x))
                results.append({"filename": os.path.basename(base) + ".png", "subfolder": sub, "type": "output"})
            if "npy" in format:
                p = base + ".npy"
                a = x.numpy().astype(np.float32)
                np.save(p, a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0)))
        return {"ui": {"images": results}}


NODE_CLASS_MAPPINGS = {
    "JDPredictorLoader": JDPredictorLoader,
    "JDDepthNormalPredict": JDDepthNormalPredict,
    "JDDepthColorize": JDDepthColorize,
    "JDNormalsVisualize": JDNormalsVisualize,
    "JDSaveRawPrediction": JDSaveRawPrediction,
}
checked_inputs(NODE_CLASS_MAPPINGS)
NODE_DISPLAY_NAME_MAPPINGS = {
    "JDPredictorLoader": "Predictor Loader",
    "JDDepthNormalPredict": "Predict Depth / Normals",
    "JDDepthColorize": "Colorize Depth",
    "JDNormalsVisualize": "Visualize Normals",
    "JDSaveRawPrediction": "Save Raw Prediction",
}

add_tooltips(NODE_CLASS_MAPPINGS, {
    "JDPredictorLoader": {"model": "a diffusers folder under models/jointdiffusion_predictors/ (Marigold, E2E-FT)"},
    "JDDepthNormalPredict": {
        "predictor": "from Predictor Loader",
        "image": "pictures to predict depth or normals for (any size)",
        "task": "depth (affine-invariant: relative, not metres) or surface normals",
        "ensemble_size": "predictions combined per image (Marigold diffusion checkpoints: ~10; E2E-FT: 1)",
        "normalisation": "depth IMAGE range: per_image stretches each map to 0–1; per_batch one range for the "
                         "whole batch (keeps relative depth between frames)",
    },
    "JDDepthColorize": {"depth": "a depth IMAGE (e.g. Predict Depth / Normals's image output; grey, channel 0 is read)",
                        "colormap": "colour map; grey keeps the values"},
    "JDNormalsVisualize": {"raw": "the raw output of Predict Depth / Normals with task normals",
                           "flip_x": "negate x (left/right) for viewers with another convention",
                           "flip_y": "negate y (OpenGL vs DirectX normal maps)",
                           "flip_z": "negate z (towards/away from the camera)"},
    "JDSaveRawPrediction": {"raw": "a raw output of Predict Depth / Normals (depth, normals or uncertainty)",
                            "filename_prefix": "path under ComfyUI's output folder; a number is appended",
                            "format": "png16: 16-bit PNG; npy: float32 NumPy array (exact values); or both"},
}, {
    "JDPredictorLoader": ("the predictor (owned by ComfyUI's model management): for Predict Depth / Normals",),
    "JDDepthNormalPredict": ("depth as grey (near = dark, as Marigold) or normals as (n+1)/2",
                             "the float prediction (depth 0–1, near = small; or unit normals): for saving, colouring "
                             "and meshes",
                             "ensemble spread as a picture (zero with one member)",
                             "ensemble spread as floats"),
    "JDDepthColorize": ("the coloured depth",),
    "JDNormalsVisualize": ("normals as an RGB picture, (n+1)/2",),
})
