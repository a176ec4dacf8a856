"""Tiny random Marigold / E2E-FT checkpoint in the public diffusers folder layout (built at test time)."""
from __future__ import annotations

import json
import os

import torch


def tiny_clip_tokenizer(folder: str):
    """A CLIPTokenizer built offline from a toy vocabulary (letters + BOS/EOS)."""
    from transformers import CLIPTokenizer
    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    vf, mf = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vf, "w") as f:
        json.dump(vocab, f)
    with open(mf, "w") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer(vocab_file=vf, merges_file=mf, model_max_length=77, pad_token="<|endoftext|>")


def tiny_components(workdir: str, prediction_type: str = "v_prediction", seed: int = 0):
    """(unet, vae, text_encoder, tokenizer, scheduler) of a tiny image-conditional predictor."""
    from diffusers import DDIMScheduler
    from tiny import tiny_text_encoder, tiny_unet, tiny_vae
    unet = tiny_unet(in_channels=8, out_channels=4, cross_attention_dim=32, block_out_channels=(32, 64), seed=seed)
    vae = tiny_vae(seed=seed)
    te = tiny_text_encoder(hidden_size=32, seed=seed)
    tok = tiny_clip_tokenizer(os.path.join(workdir, "_tok_src"))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                          beta_schedule="scaled_linear", prediction_type=prediction_type,
                          timestep_spacing="trailing", steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    return unet, vae, te, tok, sched


def save_checkpoint(folder: str, components, safe_serialization: bool = True) -> str:
    """Save components with ``MarigoldDepthPipeline.save_pretrained`` (model_index.json + 5 sub-folders)."""
    from diffusers import MarigoldDepthPipeline
    unet, vae, te, tok, sched = components
    pipe = MarigoldDepthPipeline(unet=unet, vae=vae, scheduler=sched, text_encoder=te, tokenizer=tok,
                                 prediction_type="depth")
    pipe.save_pretrained(folder, safe_serialization=safe_serialization)
    return folder


def make_checkpoint(folder: str, prediction_type: str = "v_prediction", safe_serialization: bool = True,
                    seed: int = 0):
    comps = tiny_components(os.path.dirname(folder) or ".", prediction_type, seed)
    save_checkpoint(folder, comps, safe_serialization)
    return folder, comps


def synthetic_images(b: int = 1, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images ``[B,3,H,W]`` in ``[0,1]``."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
