"""Load the parts of a diffusers Stable Diffusion folder whatever autoencoder it holds.

A folder's ``vae/`` may be an SD ``AutoencoderKL`` or a TAESD-layout ``AutoencoderTiny`` (the pack's default
family). :class:`LatentCodec` hides the difference: ``encode`` maps images in ``[-1, 1]`` to the latents a
UNet sees (``scaling_factor`` applied; the KL mode, not a sample), ``decode`` maps them back.
"""
from __future__ import annotations

import json
import os

import torch


def vae_class_name(folder: str) -> str:
    cfg = os.path.join(folder, "config.json")
    try:
        with open(cfg) as f:
            return json.load(f).get("_class_name", "AutoencoderKL")
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder!r} has no config.json (expected a diffusers VAE folder)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None


def vae_class(folder: str):
    """The diffusers class (``AutoencoderKL`` or ``AutoencoderTiny``) that ``folder/config.json`` names."""
    from diffusers import AutoencoderKL, AutoencoderTiny

    name = vae_class_name(folder)
    klass = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}.get(name)
    if klass is None:
        raise ValueError(f"{folder}/config.json: VAE class {name!r} is not supported (AutoencoderKL or AutoencoderTiny)")
    return klass


def load_vae(folder: str, dtype: torch.dtype = torch.float32):
    """The diffusers VAE in ``folder`` (``AutoencoderKL`` or ``AutoencoderTiny``, by its config), in eval mode."""
    return vae_class(folder).from_pretrained(folder, torch_dtype=dtype).eval()


def encode_unscaled(vae, x: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
    """``x`` in ``[-1, 1]`` → the VAE's latent before ``scaling_factor``: the posterior mode (or a sample) of an
    ``AutoencoderKL``, the deterministic output of an ``AutoencoderTiny``."""
    out = vae.encode(x)
    dist = getattr(out, "latent_dist", None)
    if dist is None:
        return out.latents
    return dist.sample(generator=generator) if sample else dist.mode()


class LatentCodec(torch.nn.Module):
    """An ``AutoencoderKL`` or ``AutoencoderTiny`` with one scaled-latent interface."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.tiny = type(vae).__name__ == "AutoencoderTiny"
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", 1.0))
        self.shift_factor = float(getattr(vae.config, "shift_factor", 0.0) or 0.0)

    @classmethod
    def from_folder(cls, folder: str, dtype: torch.dtype = torch.float32) -> "LatentCodec":
        return cls(load_vae(folder, dtype))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (encode_unscaled(self.vae, x) - self.shift_factor) * self.scaling_factor

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z / self.scaling_factor + self.shift_factor).sample
