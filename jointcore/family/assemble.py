"""Assemble the family's model files in the layouts users' tools read, from trained diffusers parts.

* :func:`unet_to_ldm` — a diffusers ``UNet2DConditionModel`` state dict → the original (LDM) key layout of an
  SD 1.x/2.x checkpoint (``input_blocks…``), for any number of levels and res blocks. Pure key renaming;
  the integration tier checks it against ComfyUI's own ``comfy.utils.unet_to_diffusers`` map.
* :func:`taesd_to_comfy` — a diffusers ``AutoencoderTiny`` → the ``taesd_encoder.* / taesd_decoder.*`` keys
  ComfyUI's checkpoint loader recognises, with ``vae_scale`` = 0.18215 so ComfyUI's SD 1.x latent scaling
  cancels out (ComfyUI's LATENT = raw/0.18215; the UNet sees LATENT·0.18215 = raw, exactly what the
  UNet was trained on through diffusers, where ``AutoencoderTiny.scaling_factor`` is 1).
* :func:`sd15_checkpoint` — one ``.safetensors`` with UNet + random CLIP-L + TAESD that ComfyUI's
  *Load Checkpoint* detects as SD 1.5.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

SD1_LATENT_SCALE = 0.18215
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _prefix_map(config: dict) -> list[tuple[str, str]]:
    """``(diffusers prefix, LDM prefix)`` pairs, most specific first."""
    levels = len(config["block_out_channels"])
    nrb = config["layers_per_block"]
    attn = ["CrossAttn" in t for t in config["down_block_types"]]
    up_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")]
    for x in range(levels):
        for i in range(nrb):
            n = 1 + (nrb + 1) * x + i
            pairs += [(f"down_blocks.{x}.resnets.{i}.{d}.", f"input_blocks.{n}.0.{l}.") for d, l in _RESNET.items()]
            if attn[x]:
                pairs.append((f"down_blocks.{x}.attentions.{i}.", f"input_blocks.{n}.1."))
        if x < levels - 1:
            pairs.append((f"down_blocks.{x}.downsamplers.0.conv.", f"input_blocks.{1 + (nrb + 1) * x + nrb}.0.op."))
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None:
        for j, m in ((0, 0), (1, 2)):
            pairs += [(f"mid_block.resnets.{j}.{d}.", f"middle_block.{m}.{l}.") for d, l in _RESNET.items()]
        pairs.append(("mid_block.attentions.0.", "middle_block.1."))
    for x in range(levels):
        for i in range(nrb + 1):
            n = (nrb + 1) * x + i
            pairs += [(f"up_blocks.{x}.resnets.{i}.{d}.", f"output_blocks.{n}.0.{l}.") for d, l in _RESNET.items()]
            if up_attn[x]:
                pairs.append((f"up_blocks.{x}.attentions.{i}.", f"output_blocks.{n}.1."))
            if i == nrb and x < levels - 1:
                pairs.append((f"up_blocks.{x}.upsamplers.0.conv.", f"output_blocks.{n}.{2 if up_attn[x] else 1}.conv."))
    return pairs


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Rename a diffusers UNet state dict to LDM keys; a key that no rule covers is an error naming it."""
    pairs = _prefix_map(config)
    out = {}
    for k, v in state_dict.items():
        for d, l in pairs:
            if k.startswith(d):
                out[l + k[len(d):]] = v
                break
        else:
            raise KeyError(f"UNet key {k!r} has no LDM name (unsupported block layout {config['down_block_types']})")
    return out


def taesd_to_comfy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderTiny`` keys → ComfyUI TAESD keys (its decoder starts with a parameter-free clamp,
    so decoder layer i is ``taesd_decoder.{i+1}``), plus ``vae_scale``."""
    out = {}
    for k, v in state_dict.items():
        part, _, rest = k.partition(".layers.")
        idx, _, tail = rest.partition(".")
        if part == "encoder":
            out[f"taesd_encoder.{idx}.{tail}"] = v
        elif part == "decoder":
            out[f"taesd_decoder.{int(idx) + 1}.{tail}"] = v
        else:
            raise KeyError(f"AutoencoderTiny key {k!r} is not an encoder/decoder layer")
    out["vae_scale"] = torch.tensor(SD1_LATENT_SCALE)
    return out


def sd15_checkpoint(unet_dir: str, vae_dir: str, out_path: str, dtype: torch.dtype = torch.float16,
                    metadata: Optional[dict] = None) -> str:
    """Write ``out_path`` (safetensors): ``model.diffusion_model.*`` + ``cond_stage_model.transformer.*`` (the
    generated CLIP-L) + ``first_stage_model.*`` (TAESD). Written to a temporary name, then renamed."""
    from diffusers import AutoencoderTiny, UNet2DConditionModel
    from safetensors.torch import save_file

    from jointcore.models import random_clip

    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    vae = AutoencoderTiny.from_pretrained(vae_dir)
    sd = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet.state_dict(), dict(unet.config)).items()}
    sd.update({"first_stage_model." + k: v for k, v in taesd_to_comfy(vae.state_dict()).items()})
    sd.update(random_clip.comfy_keys(random_clip.state_dict()))
    sd = {k: v.to(dtype).contiguous() for k, v in sd.items()}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.{os.getpid()}.part"
    save_file(sd, tmp, metadata={"jointdiffusion": json.dumps(metadata or {}, sort_keys=True)})
    os.replace(tmp, out_path)
    return out_path
