"""JointNet nodes: joint RGB + depth (or normals) generation, channel-wise inpainting, RGBD editing, refinement.

* ``JDJointNetLoader``: a JointNet folder in ``models/jointnet/`` (``unet/`` + ``jointnet/``, as the released
  ``rgbd_finetune_sd21b`` / ``rgbd_inpaint_sd21b`` zips or ``python -m jointcore.train_jointnet``) → ``JD_JOINTNET``.
* ``JDJointEmptyLatent``: an empty 8-channel joint LATENT (``[rgb 4, dense 4]``).
* ``JDJointEncode``: IMAGE and/or depth IMAGE → joint LATENT through a ComfyUI VAE (depth: grey → 3 channels).
* ``JDJointDecode``: joint LATENT → IMAGE + dense IMAGE (depth = channel 0 / mean, or normals = 3 channels).
* ``JDJointKSampler``: one joint denoising loop with a task preset and one optional MASK per modality.

Joint LATENTs hold unscaled VAE latents like every ComfyUI LATENT; the SD scale factor is applied inside the
sampler. Text comes from a CLIP's CONDITIONING (SD 2.x CLIP for the released models: width 1024).
"""
from __future__ import annotations

import os

import torch

from ..jointcore import joint_sampling as JS
from ..jointcore import schedules as S
from ..jointcore.denoiser import FiniteOutputGuard, TextConditioning
from ..jointcore.jointnet import JointNet, JointNetDenoiser
from .common import (BOUNDARY_INPUT, BOUNDARY_PX, CATEGORY, auto_dtype, add_tooltips, checked_inputs, list_model_dirs,
                     make_patcher, mask_to_b1hw, progress, register_model_folder, resolve_model_dir, running,
                     tag_depth, torch_device)

FOLDER = "jointnet"
register_model_folder(FOLDER)
SD_SCALE = 0.18215  # SD 1.x / 2.x latent scale (ComfyUI latent_formats.SD15)
TASKS = ["joint_generation", "image_to_depth", "depth_to_image", "refine_depth", "masks_only"]
CAT = CATEGORY + "/jointnet"


def _is_jointnet(path: str) -> bool:
    """A JointNet folder, or a partly valid one (one branch): listed, so that the loader says what is missing."""
    return any(os.path.isfile(os.path.join(path, sub, "config.json")) for sub in ("unet", "jointnet"))


def _choices():
    try:
        found = list_model_dirs(FOLDER, _is_jointnet)
    except Exception:  # noqa: BLE001 - folder not registered in this ComfyUI
        found = []
    return found or ["(none found)"]


class JointNetBundle:
    """What ``JD_JOINTNET`` carries: the model and its noise schedule."""

    def __init__(self, model: JointNet, alphas_cumprod: torch.Tensor, prediction_type: str, name: str, patcher=None):
        self.model, self.alphas_cumprod, self.prediction_type, self.name = model, alphas_cumprod, prediction_type, name
        self.patcher = patcher  # ComfyUI's ModelPatcher owning both branches (nodes.common.make_patcher)

    def denoiser(self) -> FiniteOutputGuard:
        """The model as a Denoiser whose first output is checked for NaN/Inf (fp16 overflow → a clear error)."""
        return FiniteOutputGuard(JointNetDenoiser(self.model, self.alphas_cumprod, self.prediction_type),
                                 f"JointNet '{self.name}'", next(self.model.parameters()).dtype)


def _joint_samples(joint_latent: dict) -> torch.Tensor:
    """The 8-channel joint latent of a JD_JOINT_LATENT input (shape checked; its values were checked finite by
    :func:`~.common.checked_inputs`)."""
    z = joint_latent["samples"]
    if z.ndim != 4 or z.shape[1] != 8:
        raise ValueError(f"expected a joint latent with 8 channels (Joint Empty Latent / Encode), got "
                         f"{tuple(z.shape)}")
    return z


def _latent(samples: torch.Tensor) -> dict:
    return {"samples": samples.float().cpu()}


class JDJointNetLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "jointnet": (_choices(), {"tooltip": "folder in models/jointnet with unet/ (RGB branch) and jointnet/ "
                                                 "(dense branch), .safetensors or .bin"}),
            "dtype": (["auto", "fp32", "fp16", "bf16"], {"default": "auto",
                                                         "tooltip": "auto: bf16 on GPUs that support it, else "
                                                                    "fp16 on GPU; fp32 on CPU"}),
            "prediction_type": (["epsilon", "v_prediction"], {"default": "epsilon",
                                                              "tooltip": "released models: epsilon (SD 2.1 base)"}),
        }}

    RETURN_TYPES = ("JD_JOINTNET",)
    RETURN_NAMES = ("jointnet",)
    FUNCTION = "load"
    CATEGORY = CAT
    DESCRIPTION = "Load a JointNet (two coupled SD UNets: RGB + depth/normals) in the official folder layout."

    def load(self, jointnet, dtype, prediction_type):
        if jointnet.startswith("(none"):
            raise ValueError("put a JointNet folder (unet/ + jointnet/, e.g. the unzipped rgbd_finetune_sd21b) in "
                             "models/jointnet/")
        path = resolve_model_dir(FOLDER, jointnet)
        dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            auto_dtype(torch_device()) if dtype == "auto" else dtype]
        model = JointNet.from_pretrained(path, torch_dtype=dt)  # on the CPU (ComfyUI's offload device)
        return (JointNetBundle(model, S.alphas_cumprod(), prediction_type, jointnet,
                               make_patcher(f"JointNet {jointnet}", jointnet=model)),)


class JDJointEmptyLatent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "width": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
            "height": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
            "batch_size": ("INT", {"default": 1, "min": 1, "max": 64}),
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("joint_latent",)
    FUNCTION = "make"
    CATEGORY = CAT
    DESCRIPTION = "Empty joint latent [B, 8, H/8, W/8] (RGB 4 + dense 4 channels) for JointNet generation."

    def make(self, width, height, batch_size):
        return (_latent(torch.zeros(batch_size, 8, height // 8, width // 8)),)


def _crop8(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[1] // 8 * 8, x.shape[2] // 8 * 8
    if h == 0 or w == 0:
        raise ValueError(f"image {x.shape[2]}x{x.shape[1]} is smaller than 8 pixels")
    return x[:, :h, :w]


class JDJointEncode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae": ("VAE",)}, "optional": {
            "image": ("IMAGE", {"tooltip": "RGB image (omit for depth→image: its latent is then zero)"}),
            "depth": ("IMAGE", {"tooltip": "depth/disparity (near = bright, as MiDaS) or normal map; omit for "
                                           "image→depth"}),
            "dense_kind": (["depth", "normals"], {"default": "depth",
                                                  "tooltip": "depth: channel 0 as grey; normals: the 3 channels"}),
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("joint_latent",)
    FUNCTION = "encode"
    CATEGORY = CAT
    DESCRIPTION = ("Encode an image and/or a depth map into a joint latent with the RGB VAE (depth: [0,1] grey "
                   "replicated to 3 channels, as JointNet was trained).")

    def encode(self, vae, image=None, depth=None, dense_kind="depth"):
        if image is None and depth is None:
            raise ValueError("connect an image, a depth map or both")
        rgb_lat = dense_lat = None
        if image is not None:
            rgb_lat = vae.encode(_crop8(image[..., :3])).float()
        if depth is not None:
            d = _crop8(depth)
            d = d[..., :1].expand(-1, -1, -1, 3) if dense_kind == "depth" else d[..., :3]
            dense_lat = vae.encode(d.contiguous()).float()
        if rgb_lat is not None and dense_lat is not None and rgb_lat.shape != dense_lat.shape:
            if dense_lat.shape[0] == 1 and rgb_lat.shape[1:] == dense_lat.shape[1:]:
                dense_lat = dense_lat.expand_as(rgb_lat)
            elif rgb_lat.shape[0] == 1 and rgb_lat.shape[1:] == dense_lat.shape[1:]:
                rgb_lat = rgb_lat.expand_as(dense_lat)
            else:
                raise ValueError(f"image and depth sizes differ (latents {tuple(rgb_lat.shape)} vs "
                                 f"{tuple(dense_lat.shape)}): resize the depth map to the image")
        if rgb_lat is None:
            rgb_lat = torch.zeros_like(dense_lat)
        if dense_lat is None:
            dense_lat = torch.zeros_like(rgb_lat)
        return (_latent(torch.cat([rgb_lat, dense_lat], 1)),)


class JDJointDecode:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("VAE",),
            "joint_latent": ("LATENT",),
            "dense_kind": (["depth", "depth_mean", "normals"], {"default": "depth",
                                                              "tooltip": "depth: channel 0 (official); depth_mean: "
                                                                         "mean of 3 channels; normals: 3 channels"}),
        }}

    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("image", "dense")
    FUNCTION = "decode"
    CATEGORY = CAT
    DESCRIPTION = "Decode a joint latent into the RGB image and the depth (grey) or normal map."

    def decode(self, vae, joint_latent, dense_kind):
        z = joint_latent["samples"]
        if z.ndim != 4 or z.shape[1] != 8:
            raise ValueError(f"expected a joint latent with 8 channels (from a JointNet node), got {tuple(z.shape)}")
        img = vae.decode(z[:, :4])
        dense = vae.decode(z[:, 4:])
        if dense_kind == "depth":
            dense = dense[..., :1].expand(-1, -1, -1, 3)
        elif dense_kind == "depth_mean":
            dense = dense[..., :3].mean(-1, keepdim=True).expand(-1, -1, -1, 3)
        # JointNet's depth is disparity-like (near = bright, as MiDaS): RGBD to Mesh (depth_kind auto) reads the mark
        return (img[..., :3].float().clamp(0, 1).contiguous(),
                tag_depth(dense.float().clamp(0, 1).contiguous(), "normals" if dense_kind == "normals" else "disparity"))


def conditioning_embedding(conditioning, width: int, name: str) -> torch.Tensor:
    """ComfyUI CONDITIONING → ``[B, L, D]`` (first entry), with a clear error for the wrong text encoder."""
    if not conditioning:
        raise ValueError(f"{name} conditioning is empty")
    emb = conditioning[0][0]
    if emb.shape[-1] != width:
        hint = {768: "SD 1.x (CLIP-L, 768)", 1024: "SD 2.x (OpenCLIP-H, 1024)"}.get(width, f"width {width}")
        raise ValueError(f"{name} CONDITIONING has width {emb.shape[-1]} but the JointNet's cross-attention dim is "
                         f"{width}: encode the prompt with the CLIP of {hint}, e.g. from the base checkpoint")
    return emb.float()


def _same_length(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat token sequences to a common length (as ComfyUI does for long prompts: lcm of the lengths)."""
    import math
    la, lb = a.shape[1], b.shape[1]
    if la == lb:
        return a, b
    n = math.lcm(la, lb)
    return a.repeat(1, n // la, 1), b.repeat(1, n // lb, 1)


def _model_inputs(latent_tooltip: str) -> dict:
    return {"jointnet": ("JD_JOINTNET",), "positive": ("CONDITIONING",), "negative": ("CONDITIONING",),
            "joint_latent": ("LATENT", {"tooltip": latent_tooltip})}


_SEED_STEPS_CFG = {
    "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
    "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
    "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 30.0, "step": 0.1}),
}


class JDJointKSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **_model_inputs("from Joint Empty Latent or Joint Encode"),
            "task": (TASKS, {"default": "joint_generation",
                             "tooltip": "joint_generation: both generated; image_to_depth: keep the image; "
                                        "depth_to_image: keep the depth; refine_depth: SDEdit the given depth "
                                        "(keeps the image); masks_only: only the masks below (or the latent's "
                                        "noise_mask for both) decide what is kept"}),
            **_SEED_STEPS_CFG,
            "sampler": (list(JS.SOLVERS), {"default": "ddim"}),
            "eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.05, "tooltip": "DDIM only"}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                  "tooltip": "as in KSampler: 1.0 = start from pure noise; lower keeps more of the "
                                             "input latent (SDEdit strength; JointNet's refine_depth uses 0.4). The "
                                             "task only picks what is kept (masks), never the strength"}),
        }, "optional": {
            "image_mask": ("MASK", {"tooltip": "1 = generate, 0 = keep the given image (overrides the preset)"}),
            "depth_mask": ("MASK", {"tooltip": "1 = generate, 0 = keep the given depth (overrides the preset)"}),
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("joint_latent",)
    FUNCTION = "sample"
    CATEGORY = CAT
    DESCRIPTION = ("JointNet sampling (DDIM or DPM-Solver++ 2M): joint RGBD generation, image→depth, "
                   "depth→image, RGBD region editing with one mask per modality, depth refinement (SDEdit).")

    def sample(self, jointnet, positive, negative, joint_latent, task, seed, steps, cfg, sampler, eta, denoise,
               image_mask=None, depth_mask=None):
        b: JointNetBundle = jointnet
        z = _joint_samples(joint_latent)
        B, _, h, w = z.shape
        if task == "masks_only":
            m_img = m_dep = 1.0
            if "noise_mask" in joint_latent:  # SetLatentNoiseMask: the same region in both modalities
                nm = joint_latent["noise_mask"]
                m_img = m_dep = mask_to_b1hw(nm.reshape(-1, *nm.shape[-2:]), B, h, w, "noise_mask")
        else:
            m_img, m_dep, _ = JS.task_preset(task)  # the preset picks the masks; denoise is the strength
        if not denoise > 0:
            raise ValueError(
                "Joint KSampler: input 'denoise' is 0, which would run no step. It works as in KSampler: 1.0 = "
                "from pure noise, less = keep more of the input (refine_depth: 0.4). Workflows saved before "
                "December 2026 used 0 for 'the task's default': set 1.0 there (0.4 for refine_depth).")
        strength = float(denoise)
        if image_mask is not None:
            m_img = mask_to_b1hw(image_mask, B, h, w, "image_mask")
        if depth_mask is not None:
            m_dep = mask_to_b1hw(depth_mask, B, h, w, "depth_mask")
        D = b.model.cross_attention_dim
        c = conditioning_embedding(positive, D, "positive")
        u = conditioning_embedding(negative, D, "negative")
        c, u = _same_length(c, u)
        text = TextConditioning(c, u, float(cfg))
        init = z.float() * SD_SCALE
        needs_init = strength < 1.0 or any(
            (isinstance(m, float) and m < 0.5) or (torch.is_tensor(m) and bool((m < 0.5).any())) for m in (m_img, m_dep))
        noise = JS.make_noise((B, 8, h, w), seed=seed)
        dev = torch_device()
        with running([b.patcher], b.model.activation_bytes(2 * B, h, w, c.shape[1]),
                     f"JointNet sampling of {B} image(s) at {8 * w}×{8 * h} px (CFG doubles the batch)",
                     "Lower width/height or batch_size, or use Joint Panorama Sampler (tiled) for large images."):
            n_steps = len(JS.get_timesteps(range(steps), strength))
            cb = progress(n_steps)
            out = JS.joint_sample(
                b.denoiser(), noise.to(dev), text, num_steps=steps, solver=sampler, eta=eta,
                init_latents=init.to(dev) if needs_init else None, mask_rgb=m_img, mask_dense=m_dep,
                strength=strength, generator=torch.Generator(device=dev).manual_seed((seed + 1) % 2**64),
                callback=lambda *a: cb())
        return (_latent(out / SD_SCALE),)


class JDJointPanoramaSampler:
    """RGBD panoramas with JointNet: the tiled loop of :mod:`jointcore.tiled` on the joint 8-channel latent."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            **_model_inputs("a wide Joint Empty Latent (e.g. 2048×512), or Joint Encode of an upsampled "
                            "panorama for refinement"),
            "method": (["jointnet", "multidiffusion"], {"default": "jointnet",
                       "tooltip": "jointnet: whole-image tile (weight 5) for the first 40% of steps, random "
                                  "offsets, linear boundary weights; multidiffusion: plain averaging"}),
            **_SEED_STEPS_CFG,
            "window": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
            "stride": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip": "0 = the method's default"}),
            "circular": ("BOOLEAN", {"default": False, "tooltip": "wrap around in x (360° panoramas)"}),
            "view_batch": ("INT", {"default": 4, "min": 1, "max": 64}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "< 1: SDEdit refinement of the given joint latent (paper: 0.4)"}),
        }, "optional": {
            "boundary": BOUNDARY_INPUT,
        }}

    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("joint_latent",)
    FUNCTION = "sample"
    CATEGORY = CAT
    DESCRIPTION = ("Tiled JointNet sampling for RGBD panoramas (the JointNet tile strategy or MultiDiffusion), and "
                   "tiled SDEdit refinement of an upsampled RGBD panorama.")

    def sample(self, jointnet, positive, negative, joint_latent, method, seed, steps, cfg, window, stride, circular,
               view_batch, denoise, boundary=BOUNDARY_PX):
        from ..jointcore.prediction import add_noise
        from ..jointcore.tiled import tiled_sample
        from .panorama import build_config

        b: JointNetBundle = jointnet
        z = _joint_samples(joint_latent)
        if b.model.has_masked_latent_input:
            raise ValueError("panoramas need the joint-generation model (e.g. rgbd_finetune_sd21b), not the "
                             "mask-conditioned inpaint model")
        B, _, h, w = z.shape
        config = build_config(method, window, stride, circular, view_batch, boundary=boundary)
        D = b.model.cross_attention_dim
        c, u = _same_length(conditioning_embedding(positive, D, "positive"),
                            conditioning_embedding(negative, D, "negative"))
        text = TextConditioning(c, u, float(cfg))
        ts = JS.get_timesteps(S.ddim_timesteps(steps, "leading", steps_offset=1).tolist(), float(denoise))
        noise = JS.make_noise((B, 8, h, w), seed=seed)
        den = b.denoiser()
        x = noise if denoise >= 1.0 else add_noise(z.float() * SD_SCALE, noise, ts[0], den.alphas_cumprod)
        dev = torch_device()
        wh, ww = min(config.window, h), min(config.window, w)
        calls = [(2 * B * int(view_batch), wh, ww)] + ([(2 * B, h, w)] if method == "jointnet" else [])
        with running([b.patcher], max(b.model.activation_bytes(n, hh, wwid, c.shape[1]) for n, hh, wwid in calls),
                     f"JointNet panorama sampling at {8 * w}×{8 * h} px (view batch {view_batch}"
                     + (", plus the whole-image view of the jointnet method)" if method == "jointnet" else ")"),
                     "Lower view_batch, use method multidiffusion (no whole-image view) or a smaller panorama."):
            cb = progress(len(ts))
            out = tiled_sample(den, x.to(dev), ts, text, config, final_alpha_cumprod=float(den.alphas_cumprod[0]),
                               generator=torch.Generator().manual_seed((seed + 2) % 2**64),
                               callback=lambda *a: cb())
        return (_latent(out.cpu() / SD_SCALE),)


NODE_CLASS_MAPPINGS = {
    "JDJointNetLoader": JDJointNetLoader,
    "JDJointEmptyLatent": JDJointEmptyLatent,
    "JDJointEncode": JDJointEncode,
    "JDJointDecode": JDJointDecode,
    "JDJointKSampler": JDJointKSampler,
    "JDJointPanoramaSampler": JDJointPanoramaSampler,
}
checked_inputs(NODE_CLASS_MAPPINGS)
NODE_DISPLAY_NAME_MAPPINGS = {
    "JDJointNetLoader": "JointNet Loader",
    "JDJointEmptyLatent": "Joint Empty Latent",
    "JDJointEncode": "Joint Encode",
    "JDJointDecode": "Joint Decode",
    "JDJointKSampler": "Joint KSampler",
    "JDJointPanoramaSampler": "Joint Panorama Sampler",
}

_JN = "from JointNet Loader"
_COND = "text conditioning from CLIP Text Encode with the SD 2.1 base CLIP (1024 wide)"
_LATENT_OUT = "joint latent (RGB + depth/normals): decode with Joint Decode"
add_tooltips(NODE_CLASS_MAPPINGS, {
    "JDJointEmptyLatent": {"width": "image width in pixels (multiple of 8)",
                           "height": "image height in pixels (multiple of 8)",
                           "batch_size": "images generated at once"},
    "JDJointEncode": {"vae": "the SD VAE of the checkpoint JointNet was fine-tuned from (SD 2.1 base)"},
    "JDJointDecode": {"vae": "the same SD VAE as for encoding (SD 2.1 base)",
                      "joint_latent": "from a Joint sampler or Joint Encode"},
    "JDJointKSampler": {"jointnet": _JN, "positive": _COND, "negative": _COND + " (what to avoid)",
                        "seed": "noise seed", "steps": "sampling steps (official: 50 DDIM)",
                        "cfg": "classifier-free guidance scale (official: 7.5)",
                        "sampler": "ddim (official) or dpmpp_2m (fewer steps for the same quality)"},
    "JDJointPanoramaSampler": {"jointnet": _JN, "positive": _COND, "negative": _COND + " (what to avoid)",
                               "seed": "noise seed", "steps": "DDIM steps",
                               "cfg": "classifier-free guidance scale (official: 7.5)",
                               "window": "view size in pixels (JointNet's native 512)",
                               "view_batch": "views per model call: more is faster and takes more memory"},
}, {
    "JDJointNetLoader": ("JointNet (RGB and depth/normal branches): for the Joint samplers",),
    "JDJointEmptyLatent": ("an empty joint latent [B, 8, H/8, W/8]: for Joint KSampler",),
    "JDJointEncode": ("joint latent of the image and the depth/normal map (what is omitted is zero)",),
    "JDJointDecode": ("the RGB image", "depth as grey (near = bright) or normals as (n+1)/2"),
    "JDJointKSampler": (_LATENT_OUT,),
    "JDJointPanoramaSampler": (_LATENT_OUT,),
})
