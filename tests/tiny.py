"""Tiny random diffusers models built at test time (never committed)."""
from __future__ import annotations

import torch


def tiny_unet(in_channels: int = 4, out_channels: int = 4, cross_attention_dim: int = 32,
              block_out_channels=(32, 64), seed: int = 0, sample_size: int = 16):
    """A 2-level UNet2DConditionModel with cross-attention (the SD layout, scaled down)."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=out_channels,
        layers_per_block=1, block_out_channels=tuple(block_out_channels),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )
    # random (not zero) output conv so the model output depends on everything
    with torch.no_grad():
        for p in unet.parameters():
            if p.abs().sum() == 0 and p.ndim > 1:
                p.normal_(0, 0.02)
    return unet.eval()


def tiny_vae(seed: int = 0, latent_channels: int = 4):
    """A tiny AutoencoderKL with 8x down-sampling (4 blocks), like SD's."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
    ).eval()


def tiny_text_encoder(hidden_size: int = 32, seed: int = 0):
    """A tiny CLIPTextModel + a tokenizer built offline from a toy vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=hidden_size, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1)
    return CLIPTextModel(cfg).eval()
