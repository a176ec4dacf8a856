"""Joint RGB + dense sampling with per-modality masks (JointNet paper §4.1, §5.2; official inpaint pipeline).

Latents are ``[B, C_rgb + C_dense, h, w]`` (``[rgb4, dense4]`` for SD). Each modality has a mask
``m ∈ {0,1}^{B×1×h×w}`` (1 = generate, 0 = keep the given latent). With ``init`` the given latents and one
fixed noise ``n`` (also the starting noise), after every solver step to timestep ``t'`` (RePaint-style,
Lugmayr et al. 2022)::

    x ← (1 − M) · add_noise(init, n, t') + M · x          (M = mask per channel group; at the end t' = "0": init)

so after the last step every kept position equals ``init`` exactly. Mask-conditioned (inpaint) models also
receive ``[latent, mask, init·(mask<0.5)]`` per branch (:class:`~jointcore.jointnet.JointMaskedInputs`).

Tasks are mask choices:

=====================  ============  ============  ========
task                   image mask    depth mask    strength
=====================  ============  ============  ========
joint generation       1             1             1
image → depth          0             1             1
depth → image          1             0             1
RGBD region editing    region        region        1
depth refinement       0             1             0.4 (SDEdit: start from ``add_noise(init, n, t_start)``)
=====================  ============  ============  ========

``strength`` follows diffusers img2img ``get_timesteps``: of ``n`` steps the last ``min(int(n·s), n)`` run.

Solvers: DDIM with η (:func:`jointcore.sampling.ddim_sample`) and DPM-Solver++(2M) (diffusers'
``DPMSolverMultistepScheduler`` driven through the :class:`~jointcore.denoiser.Denoiser` interface).

Depth/normals through the RGB VAE (paper §3.2): depth ``[0,1]`` → ``×2−1`` → repeated to 3 channels →
``vae.encode`` → ``× scaling_factor``; decoding → ``[0,1]`` → channel 0 (or the channel mean).
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import prediction as P
from .denoiser import TextConditioning
from .jointnet import JointConditioning, JointMaskedInputs
from .sampling import ddim_sample, next_timesteps
from .schedules import ddim_timesteps

Solver = Literal["ddim", "dpmpp_2m"]
SOLVERS: tuple[str, ...] = ("ddim", "dpmpp_2m")
TASKS: dict[str, tuple[float, float, float]] = {
    # task: (image mask value, dense mask value, default strength)
    "joint_generation": (1.0, 1.0, 1.0),
    "image_to_depth": (0.0, 1.0, 1.0),
    "depth_to_image": (1.0, 0.0, 1.0),
    "refine_depth": (0.0, 1.0, 0.4),
}


# ---- VAE helpers -----------------------------------------------------------------------------------------


def _vae_param(vae) -> torch.Tensor:
    return next(vae.parameters())


@torch.no_grad()
def encode_image(vae, image: torch.Tensor, sample: bool = False,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``[B, 3, H, W]`` in ``[0, 1]`` → latents ``[B, 4, H/8, W/8]`` (× ``scaling_factor``; posterior mean unless
    ``sample``)."""
    if image.ndim != 4 or image.shape[1] != 3:
        raise ValueError(f"expected an image [B, 3, H, W] in [0, 1], got {tuple(image.shape)}")
    from .models.sd_folder import encode_unscaled

    p = _vae_param(vae)
    z = encode_unscaled(vae, (image * 2 - 1).to(device=p.device, dtype=p.dtype), sample, generator)
    return (z * vae.config.scaling_factor).float()


@torch.no_grad()
def encode_depth(vae, depth: torch.Tensor, sample: bool = False,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Depth/disparity ``[B, 1, H, W]`` in ``[0, 1]`` → grey 3-channel image → RGB-VAE latents."""
    if depth.ndim != 4 or depth.shape[1] != 1:
        raise ValueError(f"expected a depth map [B, 1, H, W] in [0, 1], got {tuple(depth.shape)}")
    return encode_image(vae, depth.expand(-1, 3, -1, -1), sample, generator)


@torch.no_grad()
def decode_image(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents ``[B, 4, h, w]`` → image ``[B, 3, 8h, 8w]`` in ``[0, 1]`` (float32)."""
    p = _vae_param(vae)
    x = vae.decode((latents / vae.config.scaling_factor).to(device=p.device, dtype=p.dtype)).sample
    return ((x.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def decode_depth(vae, latents: torch.Tensor, reduce: Literal["first", "mean"] = "first") -> torch.Tensor:
    """Latents → depth ``[B, 1, 8h, 8w]`` in ``[0, 1]``: channel 0 (official) or the mean of the 3 channels."""
    img = decode_image(vae, latents)
    if reduce == "first":
        return img[:, :1]
    if reduce == "mean":
        return img.mean(1, keepdim=True)
    raise ValueError(f"reduce must be 'first' or 'mean', got {reduce!r}")


@torch.no_grad()
def decode_normals(vae, latents: torch.Tensor, as_vectors: bool = False) -> torch.Tensor:
    """Latents → normal map ``[B, 3, 8h, 8w]``: the 3 decoded channels in ``[0, 1]``, or unit vectors
    (``×2−1`` then L2-normalised) with ``as_vectors``."""
    img = decode_image(vae, latents)
    return F.normalize(img * 2 - 1, dim=1) if as_vectors else img


# ---- masks / timesteps -----------------------------------------------------------------------------------


def latent_mask(mask: Optional[torch.Tensor], batch: int, h: int, w: int, name: str = "mask") -> torch.Tensor:
    """A modality mask at latent size ``[batch, 1, h, w]`` with values in {0, 1} (1 = generate).

    Accepts ``None`` (all ones), a float, or a tensor ``[1 or B, 1, H, W]`` with ``H×W`` the latent size or an
    integer multiple of it (pixel masks: nearest-resized as the official pipeline does); binarised at 0.5.
    """
    if mask is None:
        return torch.ones(batch, 1, h, w)
    if isinstance(mask, (int, float)):
        return torch.full((batch, 1, h, w), float(mask >= 0.5))
    m = torch.as_tensor(mask).float()
    if m.ndim != 4 or m.shape[1] != 1:
        raise ValueError(f"{name} must be [B, 1, H, W] (1 = generate, 0 = keep), got {tuple(m.shape)}")
    if m.shape[0] not in (1, batch):
        raise ValueError(f"{name} batch {m.shape[0]} does not match the latent batch {batch}: give 1 or {batch}")
    H, W = m.shape[-2:]
    if (H, W) != (h, w):
        if H % h or W % w or H // h != W // w:
            raise ValueError(f"{name} size {H}x{W} fits neither the latent size {h}x{w} nor an integer multiple of "
                             f"it (e.g. the image size {8 * h}x{8 * w})")
        m = F.interpolate(m, size=(h, w), mode="nearest")
    m = (m >= 0.5).float()
    return m.expand(batch, -1, -1, -1).contiguous()


def get_timesteps(timesteps: Sequence[int], strength: float) -> list[int]:
    """diffusers img2img ``get_timesteps`` for order-1 schedules: keep the last ``min(int(n·s), n)`` steps."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    ts = [int(t) for t in timesteps]
    n = len(ts)
    init = min(int(n * strength), n)
    t_start = max(n - init, 0)
    out = ts[t_start:]
    if not out:
        raise ValueError(f"strength {strength} with {n} steps leaves no step to run; raise steps or strength")
    return out


def make_noise(shape: Sequence[int], seed: Union[int, Sequence[int], None] = None,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Standard normal noise ``shape`` (float32, CPU); ``seed`` may be one int or one per batch item."""
    if isinstance(seed, (list, tuple)):
        if len(seed) != shape[0]:
            raise ValueError(f"{len(seed)} seeds for a batch of {shape[0]}")
        return torch.cat([torch.randn((1, *shape[1:]), generator=torch.Generator().manual_seed(int(s)))
                          for s in seed])
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=generator)


# ---- sampling ---------------------------------------------------------------------------------------------


def _is_mask_conditioned(denoiser) -> bool:
    model = getattr(denoiser, "model", None)
    return bool(getattr(model, "has_masked_latent_input", False))


def _latent_split(denoiser, channels: int) -> int:
    model = getattr(denoiser, "model", None)
    if model is not None and hasattr(model, "latent_channels"):
        cr, cd = model.latent_channels
        if cr + cd != channels:
            raise ValueError(f"latents have {channels} channels but the JointNet expects {cr + cd} "
                             f"([rgb {cr}, dense {cd}])")
        return cr
    if channels % 2:
        raise ValueError(f"joint latents need an even channel count ([rgb, dense]), got {channels}")
    return channels // 2


def dpm_solver_scheduler(alphas_cumprod: torch.Tensor, prediction_type: str, spacing: str = "leading",
                         steps_offset: int = 1):
    """diffusers DPM-Solver++(2M) for the given ᾱ schedule (β recovered from ᾱ)."""
    from diffusers import DPMSolverMultistepScheduler

    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    betas = 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    return DPMSolverMultistepScheduler(
        num_train_timesteps=len(ab), trained_betas=betas.numpy(), prediction_type=prediction_type,
        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing=spacing, steps_offset=steps_offset,
        lower_order_final=True, final_sigmas_type="zero")


@torch.no_grad()
def joint_sample(
    denoiser,
    noise: torch.Tensor,
    text: TextConditioning,
    *,
    num_steps: int = 50,
    solver: Solver = "ddim",
    spacing: str = "leading",
    steps_offset: int = 1,
    eta: float = 0.0,
    init_latents: Optional[torch.Tensor] = None,
    mask_rgb: Union[torch.Tensor, float, None] = None,
    mask_dense: Union[torch.Tensor, float, None] = None,
    strength: float = 1.0,
    set_alpha_to_one: bool = False,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable[[int, int, torch.Tensor, Optional[torch.Tensor]], None]] = None,
) -> torch.Tensor:
    """Joint generation / channel-wise inpainting / RGBD editing / SDEdit refinement.

    Args:
        denoiser: a :class:`~jointcore.jointnet.JointNetDenoiser` (any Denoiser over ``[rgb, dense]`` latents).
        noise: ``[B, C_rgb + C_dense, h, w]`` the one fixed noise (start latents and RePaint re-noising).
        text: prompt embeddings with CFG (applied jointly to both modalities).
        num_steps, spacing, steps_offset: the full schedule (SD 2.1: 50, leading, 1) before ``strength``.
        solver: ``"ddim"`` (with ``eta``) or ``"dpmpp_2m"``.
        init_latents: ``[B or 1, C_rgb + C_dense, h, w]`` given latents (needed for any kept region or
            ``strength < 1``).
        mask_rgb, mask_dense: per-modality masks (see :func:`latent_mask`); ``None`` = generate all.
        strength: SDEdit strength (diffusers ``get_timesteps``); ``< 1`` starts from ``add_noise(init, noise, t0)``.
        set_alpha_to_one: DDIM's final ᾱ (False = ᾱ_0 as SD's scheduler config; True = exact x0).
        generator: for DDIM η noise.
        callback: ``(i, n, x, x0_or_None)`` after every step (progress / cancel by raising).

    Returns:
        ``[B, C_rgb + C_dense, h, w]`` final latents; kept positions equal ``init_latents`` exactly.
    """
    if noise.ndim != 4:
        raise ValueError(f"noise must be [B, C, h, w], got {tuple(noise.shape)}")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
    B, C, h, w = noise.shape
    cr = _latent_split(denoiser, C)
    m_rgb = latent_mask(mask_rgb, B, h, w, "mask_rgb").to(noise.device)
    m_dense = latent_mask(mask_dense, B, h, w, "mask_dense").to(noise.device)
    keeps = bool((m_rgb < 0.5).any() or (m_dense < 0.5).any())
    if init_latents is not None:
        if init_latents.ndim != 4 or init_latents.shape[1:] != noise.shape[1:] or init_latents.shape[0] not in (1, B):
            raise ValueError(f"init_latents {tuple(init_latents.shape)} do not match the noise/latent shape "
                             f"{tuple(noise.shape)} (same channels and latent size; batch 1 or {B})")
        init = init_latents.to(noise).expand(B, -1, -1, -1)
    elif keeps or strength < 1.0:
        raise ValueError("init_latents are required when a mask keeps something (mask 0) or strength < 1")
    else:
        init = torch.zeros_like(noise)
    M = torch.cat([m_rgb.expand(-1, cr, -1, -1), m_dense.expand(-1, C - cr, -1, -1)], dim=1).to(noise)

    cond: Any = text
    if _is_mask_conditioned(denoiser):
        keep_r, keep_d = (m_rgb < 0.5).to(noise), (m_dense < 0.5).to(noise)
        cond = JointConditioning(text, JointMaskedInputs(m_rgb, init[:, :cr] * keep_r, m_dense, init[:, cr:] * keep_d))

    ab = denoiser.alphas_cumprod
    T = len(ab)
    if solver == "ddim":
        full = ddim_timesteps(num_steps, spacing, T, steps_offset).tolist()
    else:
        sched = dpm_solver_scheduler(ab, denoiser.prediction_type, spacing, steps_offset)
        sched.set_timesteps(num_steps)
        full = [int(t) for t in sched.timesteps]
    ts = get_timesteps(full, strength)
    prev = next_timesteps(ts)
    x = noise if strength >= 1.0 else P.add_noise(init, noise, ts[0], ab)

    def replace(i: int, t_prev: int, x_new: torch.Tensor) -> torch.Tensor:
        if not keeps:
            return x_new
        known = P.add_noise(init, noise, t_prev, ab) if t_prev >= 0 else init
        return (1 - M) * known + M * x_new

    n = len(ts)
    if solver == "ddim":
        final = 1.0 if set_alpha_to_one else float(ab[0])
        return ddim_sample(denoiser, x, ts, cond, eta=eta, prev_timesteps=prev, final_alpha_cumprod=final,
                           generator=generator, callback=callback, step_hook=replace)

    sched.set_begin_index(len(full) - n)
    for i, t in enumerate(ts):
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        out = denoiser(x, tt, cond)
        x = sched.step(out, t, x).prev_sample.to(noise.dtype)
        x = replace(i, prev[i], x)
        if callback is not None:
            callback(i, n, x, None)
    return x


def task_preset(task: str) -> tuple[float, float, float]:
    """``(image mask, dense mask, strength)`` for a named task (see the module table)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {tuple(TASKS)}")
    return TASKS[task]
