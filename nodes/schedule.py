"""Schedule nodes: trailing-DDIM SIGMAS (the E2E-FT schedule fix) and a jointcore DDIM SAMPLER.

Both plug into ComfyUI's SamplerCustom / SamplerCustomAdvanced, so any SD-type model gets them.
"""
from __future__ import annotations

import torch

from ..jointcore import prediction as P
from ..jointcore import schedules as S
from .comfy_denoiser import comfy_ddim, find_model_sampling, make_ksampler
from .common import CATEGORY, add_tooltips, checked_inputs


def model_alphas_cumprod(model) -> torch.Tensor:
    """ᾱ_t of a ComfyUI MODEL's discrete schedule (from its σ table: ᾱ = 1/(1+σ²))."""
    ms = model.get_model_object("model_sampling") if hasattr(model, "get_model_object") else find_model_sampling(model.model)
    if not hasattr(ms, "sigmas"):
        raise ValueError("this MODEL has no discrete noise schedule (not an SD-type ε/v model); "
                         "trailing DDIM needs one")
    return P.alphas_cumprod_from_sigma(ms.sigmas.detach().double().cpu())


def trailing_sigmas(alphas_cumprod: torch.Tensor, steps: int, spacing: str, zero_terminal_snr: bool,
                    steps_offset: int = 1) -> torch.Tensor:
    """SIGMAS for ``steps`` DDIM steps with the given spacing on a model's schedule (ends in 0)."""
    ab = alphas_cumprod.double()
    if zero_terminal_snr:
        betas = 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])
        ab = torch.cumprod(1 - S.rescale_zero_terminal_snr(betas), 0)
    ts = S.ddim_timesteps(steps, spacing, num_train_timesteps=len(ab), steps_offset=steps_offset)
    return P.schedule_sigmas(ts, ab)


class JDTrailingDDIMSigmas:
    """Sigmas of a DDIM schedule with 'trailing' (default), 'leading' or 'linspace' timestep spacing."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL",),
            "steps": ("INT", {"default": 10, "min": 1, "max": 1000}),
            "spacing": (list(S.SPACINGS), {"default": "trailing"}),
            "zero_terminal_snr": ("BOOLEAN", {"default": False}),
        }, "optional": {
            "steps_offset": ("INT", {"default": 1, "min": 0, "max": 100,
                                     "tooltip": "only used by 'leading' (SD's scheduler config uses 1)"}),
        }}

    RETURN_TYPES = ("SIGMAS",)
    FUNCTION = "get_sigmas"
    CATEGORY = CATEGORY + "/sampling"
    DESCRIPTION = ("DDIM timesteps with trailing spacing (first step at t=T-1, the fix from 'Fine-Tuning "
                   "Image-Conditional Diffusion Models is Easier than you Think'), as ComfyUI SIGMAS.")

    def get_sigmas(self, model, steps, spacing, zero_terminal_snr, steps_offset=1):
        return (trailing_sigmas(model_alphas_cumprod(model), steps, spacing, zero_terminal_snr, steps_offset),)


class JDDDIMSampler:
    """jointcore's DDIM (with η) as a SAMPLER, running on the model's discrete timesteps."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"eta": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01})}}

    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"
    CATEGORY = CATEGORY + "/sampling"
    DESCRIPTION = "DDIM (Song et al.) with stochasticity η, from jointcore, for SamplerCustom(Advanced)."

    def get_sampler(self, eta):
        return (make_ksampler(comfy_ddim, eta=float(eta)),)


NODE_CLASS_MAPPINGS = {
    "JDTrailingDDIMSigmas": JDTrailingDDIMSigmas,
    "JDDDIMSampler": JDDDIMSampler,
}
checked_inputs(NODE_CLASS_MAPPINGS)
NODE_DISPLAY_NAME_MAPPINGS = {
    "JDTrailingDDIMSigmas": "Trailing DDIM Schedule",
    "JDDDIMSampler": "DDIM Sampler (η)",
}

add_tooltips(NODE_CLASS_MAPPINGS, {
    "JDTrailingDDIMSigmas": {
        "model": "the model whose training noise schedule the sigmas are taken from",
        "steps": "DDIM steps; 1 = a single-step prediction",
        "spacing": "trailing: the first step is the last training timestep (the fix for few-step sampling); "
                   "leading: SD's original spacing; linspace: evenly spaced",
        "zero_terminal_snr": "rescale the schedule so that its last step is pure noise (Lin et al. 2024); only for "
                             "models trained that way",
    },
    "JDDDIMSampler": {"eta": "stochasticity: 0 = deterministic DDIM, 1 = as much fresh noise as DDPM"},
}, {
    "JDTrailingDDIMSigmas": ("noise levels from high to low: connect to SamplerCustom's sigmas",),
    "JDDDIMSampler": ("a SAMPLER: connect it to SamplerCustom / SamplerCustomAdvanced",),
})
