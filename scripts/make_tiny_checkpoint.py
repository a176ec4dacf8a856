#!/usr/bin/env python3
"""Write a tiny random SD1.5-shaped single-file checkpoint that ComfyUI's CheckpointLoaderSimple detects.

ComfyUI detects SD1.5 from ``model_channels == 320``, ``context_dim == 768`` and a 1×1-conv ``proj_in``;
channel multipliers, block counts and transformer depths are free, so the UNet here has one level
(``channel_mult [1]``, one res block, depth 1: 26 M parameters). The text encoder must be a full-size
CLIP-L (ComfyUI builds it from a fixed config). The VAE is TAESD-format (ComfyUI switches to TAESD when
it sees ``taesd_decoder.*`` keys), still 8× down-sampling, 2.4 M parameters.

Key names and shapes come from ComfyUI's own modules built on the ``meta`` device, so the file matches the
ComfyUI it is run against; values are seeded random (norm weights 1, biases 0, N(0, 1/fan_in) otherwise).

usage: python scripts/make_tiny_checkpoint.py --comfy COMFYUI_DIR --out tiny.safetensors [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
from safetensors.torch import save_file


def meta_shapes(factory) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"), torch.no_grad():
        module = factory()
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def random_tensors(shapes: dict, prefix: str, gen: torch.Generator, dtype: torch.dtype, skip=()) -> dict:
    out = {}
    for key, shape in shapes.items():
        if any(s in key for s in skip):
            continue
        if len(shape) == 0:
            t = torch.tensor(1.0 if key.endswith("vae_scale") else 0.0)
        elif key.endswith("bias"):
            t = torch.zeros(shape)
        elif len(shape) == 1:
            t = torch.ones(shape)
        else:
            std = 0.02 if "embedding" in key else 1.0 / math.sqrt(math.prod(shape[1:]))
            t = torch.randn(shape, generator=gen) * std
        out[prefix + key] = t.to(dtype).contiguous()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", required=True, help="ComfyUI checkout (for module shapes)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    sys.argv = sys.argv[:1]  # old ComfyUI parses the command line when comfy.cli_args is imported
    sys.path.insert(0, os.path.abspath(a.comfy))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # CUDA torch build on a machine without a GPU
    import comfy.clip_model
    import comfy.ops
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    gen = torch.Generator().manual_seed(a.seed)
    unet_cfg = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
                    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
                    transformer_depth_middle=1, num_heads=8, num_head_channels=-1, use_spatial_transformer=True,
                    use_linear_in_transformer=False, context_dim=768, legacy=False, adm_in_channels=None,
                    use_checkpoint=False, dtype=torch.float32)
    unet = meta_shapes(lambda: UNetModel(**unet_cfg, operations=ops))
    with open(os.path.join(a.comfy, "comfy", "sd1_clip_config.json")) as f:
        clip_cfg = json.load(f)
    clip = meta_shapes(lambda: comfy.clip_model.CLIPTextModel(clip_cfg, torch.float32, None, ops))
    vae = meta_shapes(lambda: comfy.taesd.taesd.TAESD())
    vae.setdefault("vae_shift", ())  # newer ComfyUI's TAESD has a shift too (0 = none)

    sd = {}
    sd.update(random_tensors(unet, "model.diffusion_model.", gen, torch.float16))
    sd.update(random_tensors(clip, "cond_stage_model.transformer.", gen, torch.float16, skip=("text_projection",)))
    sd.update(random_tensors(vae, "first_stage_model.", gen, torch.float16))
    meta = {"what": "random tiny SD1.5-shaped test checkpoint (jointdiffusion tests)", "seed": a.seed}
    save_file(sd, a.out, metadata={"jointdiffusion": json.dumps(meta, sort_keys=True)})
    print(json.dumps({"out": a.out, "bytes": os.path.getsize(a.out), "keys": len(sd)}))


if __name__ == "__main__":
    main()
