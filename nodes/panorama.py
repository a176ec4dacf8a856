"""Panorama nodes: a tiled SAMPLER (MultiDiffusion / SyncDiffusion / JointNet strategy) for SamplerCustom(Advanced)
and a tiled (optionally 360°) VAE decode. All maths lives in :mod:`jointcore.tiled`.

The sampler runs jointcore's tiled DDIM on the model's discrete timesteps through :class:`ComfyDenoiser`
(ComfyUI's CFG-wrapped ``model(x, σ) → x0``), so positive/negative conditioning, CFG, LoRAs and model
patches work as with any ComfyUI sampler. Feed it an EmptyLatentImage of the panorama size (e.g.
2048×512) and DDIM sigmas (BasicScheduler 'ddim_uniform' or the JD trailing/leading DDIM schedule).
"""
from __future__ import annotations

import os

import torch

from ..jointcore.metrics_pano import find_lpips_backbone, load_lpips
from ..jointcore.runtime.interrupt import interruptible
from ..jointcore.tiled import TiledConfig, axis_starts, tiled_decode, tiled_sample
from .comfy_denoiser import ComfyRun, make_ksampler, no_steps
from .common import (BOUNDARY_INPUT, BOUNDARY_PX, CATEGORY, add_tooltips, checked_inputs, ensure_memory,
                     interrupt_check, load_models, make_patcher)

METHODS = ["multidiffusion", "syncdiffusion", "syncdiffusion_fast", "jointnet"]
LPIPS_FOLDER = "lpips"
VAE_FACTOR = 8


def _find_attr(kmodel, name: str):
    """First object along ComfyUI's ``inner_model`` chain (sampler wrapper → guider → BaseModel) with ``name``."""
    m = kmodel
    for _ in range(6):
        if hasattr(m, name):
            return getattr(m, name)
        m = getattr(m, "inner_model", None)
        if m is None:
            break
    raise RuntimeError(f"could not find '{name}' on the ComfyUI model wrapper; is this an SD-type MODEL?")


def _unlock_autograd(module: torch.nn.Module) -> int:
    """ComfyUI runs nodes under ``torch.inference_mode()``, so weights loaded there are inference tensors that
    autograd cannot save for backward. Replace such parameters/buffers by equal ordinary tensors (values are
    unchanged, frozen). Needed only for SyncDiffusion's gradient through the UNet and the VAE decoder."""
    n = 0
    with torch.inference_mode(False):
        for mod in module.modules():
            for k, p in list(mod._parameters.items()):
                if p is not None and p.is_inference():
                    mod._parameters[k] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    n += 1
            for k, b in list(mod._buffers.items()):
                if b is not None and b.is_inference():
                    mod._buffers[k] = b.clone()
                    n += 1
    return n


def pixels_to_latent(v: int, name: str) -> int:
    if v <= 0 or v % VAE_FACTOR:
        raise ValueError(f"{name} {v} px must be a positive multiple of {VAE_FACTOR}")
    return v // VAE_FACTOR


def build_config(method: str, window: int, stride: int, circular: bool, view_batch: int,
                 sync_weight: float = 20.0, sync_decay: float = 0.95, sync_freq: int = 1,
                 sync_thres: int = -1, boundary: int = BOUNDARY_PX) -> TiledConfig:
    """TiledConfig from node inputs (pixels → latents; ``stride`` 0 = the method's default; ``boundary`` is the
    jointnet method's linear boundary width)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
    if boundary < 0 or boundary % VAE_FACTOR:
        raise ValueError(f"boundary {boundary} px must be 0 or a positive multiple of {VAE_FACTOR}")
    if stride and stride > window:   # checked here, in the pixels the user typed, not in latents below
        raise ValueError(f"stride {stride} px > window {window} px would leave gaps between views; use a stride of "
                         f"at most {window} px (or 0 for the method's default)")
    win = pixels_to_latent(window, "window")
    kw = dict(window=win, circular=bool(circular), view_batch=int(view_batch))
    if stride:
        kw["stride"] = pixels_to_latent(stride, "stride")
    scale = win / 64  # presets are for 64-latent windows
    if method == "multidiffusion":
        kw.setdefault("stride", max(1, round(8 * scale)))
        return TiledConfig.multidiffusion(**kw)
    if method == "jointnet":
        kw.setdefault("stride", max(1, round(32 * scale)))
        return TiledConfig.jointnet(boundary=boundary // VAE_FACTOR, **kw)
    kw.setdefault("stride", max(1, round(16 * scale)))
    kw.update(sync_weight=float(sync_weight), sync_decay=float(sync_decay), sync_freq=int(sync_freq))
    if sync_thres >= 0:
        kw["sync_thres"] = int(sync_thres)
    preset = TiledConfig.syncdiffusion if method == "syncdiffusion" else TiledConfig.syncdiffusion_fast
    return preset(**kw)


def comfy_tiled(model, x, sigmas, extra_args=None, callback=None, disable=None, config: TiledConfig = None,
                eta: float = 0.0, vae=None, lpips_net: str = "vgg"):
    """KSAMPLER function: jointcore tiled DDIM on the model's discrete timesteps nearest to ``sigmas``."""
    if no_steps(sigmas):
        return x
    extra_args = dict(extra_args or {})
    if extra_args.get("denoise_mask") is not None:
        raise ValueError("the tiled panorama sampler does not support a latent noise mask; remove SetLatentNoiseMask")
    extra_args["denoise_mask"] = None
    with torch.inference_mode(False):  # ComfyUI executes nodes in inference mode; SyncDiffusion needs autograd
        return _comfy_tiled(model, x, sigmas, extra_args, callback, config, eta, vae, lpips_net)


def _comfy_tiled(model, x, sigmas, extra_args, callback, config, eta, vae, lpips_net):
    run = ComfyRun(model, x, sigmas, extra_args, callback)
    gen = torch.Generator().manual_seed(run.seed + 2)

    decode = perceptual = None
    if config.sync_weight > 0:
        if vae is None:
            raise ValueError("SyncDiffusion needs the VAE: connect the 'vae' input (or choose multidiffusion/jointnet)")
        import folder_paths

        from .common import register_model_folder

        register_model_folder(LPIPS_FOLDER)
        perceptual, lpips_patcher = _lpips(lpips_net, folder_paths.get_folder_paths(LPIPS_FOLDER))
        latent_out = _find_attr(model, "process_latent_out")
        _unlock_autograd(_find_attr(model, "diffusion_model"))
        _unlock_autograd(vae.first_stage_model)
        load_models([vae.patcher, lpips_patcher], 0, "SyncDiffusion's decoder and LPIPS network",
                    "Free memory (unload other models) or use method multidiffusion.")

        def decode(z):
            zz = latent_out(z).to(device=vae.device, dtype=vae.vae_dtype)
            return vae.first_stage_model.decode(zz).to(device=z.device, dtype=torch.float32)

    _check_whole_view_memory(model, x, config)
    # Cancel before every view batch and synchronised view, and inside large attention products (a scoped
    # torch-function mode; ComfyUI's model itself is not touched)
    with interruptible(interrupt_check, perceptual):
        out = tiled_sample(run.denoiser, run.x_t, run.timesteps, None, config, eta=eta, prev_timesteps=run.prev,
                           generator=gen, decode=decode, perceptual=perceptual, callback=run.callback,
                           check=interrupt_check)
    return run.finish(out, x)


_LPIPS: dict = {}  # (net, file, size, mtime) → (LPIPS network, its ModelPatcher): loaded from disk once


def _lpips(net: str, search):
    """The LPIPS network for ``net`` (read once per file and kept) and the ComfyUI ModelPatcher that owns it."""
    path = find_lpips_backbone(net, search)
    key = (net, path) + ((os.path.getsize(path), os.path.getmtime(path)) if path else ())
    if key not in _LPIPS:
        perceptual = load_lpips(net, path, search=search)  # a missing file: an error naming it and where
        _LPIPS.clear()  # keep one: switching between vgg and alex reloads
        _LPIPS[key] = (perceptual, make_patcher(f"LPIPS {net}", lpips=perceptual))
    return _LPIPS[key]


def _check_whole_view_memory(model, x: torch.Tensor, config: TiledConfig) -> None:
    """The jointnet method's whole-image view runs the model on the entire panorama latent at once: refuse it
    clearly when ComfyUI's own estimate for that call (``BaseModel.memory_required``) cannot fit."""
    if config.whole_image_weight <= 0:
        return
    try:
        required = _find_attr(model, "memory_required")
    except RuntimeError:
        return
    shape = (2 * x.shape[0], *x.shape[1:])  # CFG: positive and negative in one batch
    try:
        need = int(required(shape))
    except Exception:  # noqa: BLE001 - signatures differ across ComfyUI versions
        return
    H, W = x.shape[-2:]
    ensure_memory(need, f"the jointnet method's whole-image view of the {W * VAE_FACTOR}×{H * VAE_FACTOR} px "
                        "panorama", "Use method multidiffusion or syncdiffusion (views only), or a smaller panorama.",
                  x.device)


class JDTiledDiffusionSampler:
    """Tiled panorama SAMPLER for SamplerCustom / SamplerCustomAdvanced."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "method": (METHODS, {"default": "jointnet", "tooltip": "multidiffusion: averaging (stride 64 px); "
                                 "syncdiffusion: + LPIPS gradient sync (slow, coherent); syncdiffusion_fast: sync "
                                 "only the first 10 steps; jointnet: whole-image view early, random offsets, "
                                 "boundary decay (fast, coherent)"}),
            "window": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                               "tooltip": "view size in pixels (the model's native resolution)"}),
            "stride": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                               "tooltip": "view step in pixels; 0 = the method's default (64/128/256 px)"}),
            "circular": ("BOOLEAN", {"default": False, "tooltip": "360° panorama: views wrap around in x"}),
            "view_batch": ("INT", {"default": 4, "min": 1, "max": 64, "tooltip": "views per model call"}),
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01}),
        }, "optional": {
            "vae": ("VAE", {"tooltip": "required for syncdiffusion (decodes the foreseen x0 with gradients)"}),
            "sync_weight": ("FLOAT", {"default": 20.0, "min": 0.0, "max": 1000.0, "step": 0.5}),
            "sync_decay": ("FLOAT", {"default": 0.95, "min": 0.0, "max": 1.0, "step": 0.01}),
            "sync_freq": ("INT", {"default": 1, "min": 1, "max": 100}),
            "sync_thres": ("INT", {"default": -1, "min": -1, "max": 1000,
                                   "tooltip": "synchronise steps i < thres; -1 = method default (50 / 10)"}),
            "lpips_net": (["vgg", "alex"], {"default": "vgg",
                                            "tooltip": "LPIPS backbone; its torchvision weights go in models/lpips/"}),
            "boundary": BOUNDARY_INPUT,
        }}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY + "/panorama"
    DESCRIPTION = ("Tiled DDIM for panoramas of any size (MultiDiffusion, SyncDiffusion, JointNet tile strategy), "
                   "optionally 360° seamless. Use an EmptyLatentImage of the panorama size and DDIM sigmas.")

    def get_sampler(self, method, window, stride, circular, view_batch, eta, vae=None, sync_weight=20.0,
                    sync_decay=0.95, sync_freq=1, sync_thres=-1, lpips_net="vgg", boundary=BOUNDARY_PX):
        cfg = build_config(method, window, stride, circular, view_batch, sync_weight, sync_decay, sync_freq,
                           sync_thres, boundary)
        if cfg.sync_weight > 0 and vae is None:
            raise ValueError(f"method '{method}' needs the VAE: connect the 'vae' input")
        return (make_ksampler(comfy_tiled, config=cfg, eta=float(eta), vae=vae, lpips_net=lpips_net),)


class JDTiledVAEDecode:
    """Decode a large (panorama) latent tile by tile, blending overlaps; optional 360° wrap."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "samples": ("LATENT",),
            "vae": ("VAE",),
            "tile": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "tile size in pixels"}),
            "overlap": ("INT", {"default": 128, "min": 0, "max": 2048, "step": 8, "tooltip": "in pixels"}),
            "circular": ("BOOLEAN", {"default": False, "tooltip": "360° panorama: blend across the left/right seam"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY + "/panorama"
    DESCRIPTION = "Tiled VAE decode with context padding and blending; seamless for 360° panoramas when circular."

    def decode(self, samples, vae, tile, overlap, circular):
        import comfy.model_management as mm
        import comfy.utils

        z = samples["samples"]
        if z.ndim != 4:
            raise ValueError(f"expected an image latent [B,C,H,W], got {tuple(z.shape)}")
        t = pixels_to_latent(tile, "tile")
        o = min(overlap // VAE_FACTOR, t - 1)
        H, W = z.shape[-2:]
        n_tiles = (len(axis_starts(H, min(t, H), max(min(t, H) - o, 1)))
                   * len(axis_starts(W, min(t, W), max(min(t, W) - o, 1), bool(circular))))
        bar = comfy.utils.ProgressBar(n_tiles)

        def dec(piece):
            mm.throw_exception_if_processing_interrupted()
            img = vae.decode(piece).movedim(-1, 1)  # [B,3,h,w] in 0..1
            bar.update(1)
            return img

        img = tiled_decode(dec, z, tile=t, overlap=o, circular=bool(circular), context=max(o // 2, 1))
        return (img.movedim(1, -1).clamp(0, 1).float().cpu(),)


NODE_CLASS_MAPPINGS = {
    "JDTiledDiffusionSampler": JDTiledDiffusionSampler,
    "JDTiledVAEDecode": JDTiledVAEDecode,
}
checked_inputs(NODE_CLASS_MAPPINGS)
NODE_DISPLAY_NAME_MAPPINGS = {
    "JDTiledDiffusionSampler": "Tiled Panorama Sampler",
    "JDTiledVAEDecode": "Tiled VAE Decode (360°)",
}

add_tooltips(NODE_CLASS_MAPPINGS, {
    "JDTiledDiffusionSampler": {
        "eta": "stochasticity: 0 = deterministic DDIM",
        "sync_weight": "syncdiffusion: weight w of the LPIPS gradient towards the anchor view (paper: 20)",
        "sync_decay": "syncdiffusion: the weight at step i is w·decay^i (paper: 0.95)",
        "sync_freq": "syncdiffusion: synchronise every N-th step (1 = every step)",
    },
    "JDTiledVAEDecode": {"samples": "a (panorama) latent", "vae": "the checkpoint's VAE"},
}, {
    "JDTiledDiffusionSampler": ("a SAMPLER: connect it to SamplerCustom / SamplerCustomAdvanced",),
    "JDTiledVAEDecode": ("the decoded picture",),
})
