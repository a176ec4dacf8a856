"""A frozen, random CLIP-L text encoder that every machine generates bit-identically.

The pack's default model family is trained here, offline, where no pretrained CLIP can be downloaded.
ComfyUI's single-file SD 1.x checkpoints must nevertheless carry a full-size CLIP-L text encoder
(ComfyUI builds it from a fixed config), so the family uses a *random* CLIP-L that stays frozen: the
UNets learn to read its token-dependent (if meaningless) features. Those ~123 M parameters (~250 MB in
fp16) are never shipped; they are regenerated on first use from a seed.

Bit-identical on any machine and any numpy version: values come from numpy's ``PCG64`` *bit* stream
(``random_raw``, which numpy keeps stable across versions, unlike its distribution algorithms), turned
into uniforms by integer arithmetic only, scaled to the standard deviation that transformers' own
``CLIPTextModel`` initialisation uses for each tensor, then rounded to fp16 (the stored precision).
Each tensor has its own stream (seed, tensor index), so generation can be chunked and parallelised.
:func:`state_dict_sha256` fingerprints the result; a test pins it.

Keys are transformers' ``CLIPTextModel`` names (``text_model.…``); :func:`comfy_keys` maps them to the
``cond_stage_model.transformer.`` prefix of an SD 1.x checkpoint.
"""
from __future__ import annotations

import hashlib
import math
from typing import Iterator

import numpy as np
import torch

SEED = 20240321
# openai/clip-vit-large-patch14 text tower, as SD 1.x (and ComfyUI's sd1_clip_config.json) use it
CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
              layer_norm_eps=1e-5, projection_dim=768, bos_token_id=0, eos_token_id=2, pad_token_id=1)
# sha256 of the fp16 tensors in key order (see state_dict_sha256); pinned by tests/unit/test_random_clip.py
EXPECTED_SHA256 = "46a3c1a2940c4387367e683dae6bf949de8fe850accce0f1363b40267ff90012"


def _shapes() -> Iterator[tuple[str, tuple[int, ...], float]]:
    """``(key, shape, std)`` for every tensor; std 0 = constant (ones for norm weights, zeros for biases)."""
    d, ff, n = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_hidden_layers"]
    in_std = d ** -0.5 * (2 * n) ** -0.5  # transformers' CLIP init (initializer_factor 1)
    out_std = d ** -0.5
    fc_std = (2 * d) ** -0.5
    yield "text_model.embeddings.token_embedding.weight", (CONFIG["vocab_size"], d), 0.02
    yield "text_model.embeddings.position_embedding.weight", (CONFIG["max_position_embeddings"], d), 0.02
    for i in range(n):
        p = f"text_model.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):
            yield p + f"self_attn.{proj}.weight", (d, d), in_std
            yield p + f"self_attn.{proj}.bias", (d,), 0.0
        yield p + "self_attn.out_proj.weight", (d, d), out_std
        yield p + "self_attn.out_proj.bias", (d,), 0.0
        yield p + "layer_norm1.weight", (d,), 0.0
        yield p + "layer_norm1.bias", (d,), 0.0
        yield p + "mlp.fc1.weight", (ff, d), fc_std
        yield p + "mlp.fc1.bias", (ff,), 0.0
        yield p + "mlp.fc2.weight", (d, ff), in_std
        yield p + "mlp.fc2.bias", (d,), 0.0
        yield p + "layer_norm2.weight", (d,), 0.0
        yield p + "layer_norm2.bias", (d,), 0.0
    yield "text_model.final_layer_norm.weight", (d,), 0.0
    yield "text_model.final_layer_norm.bias", (d,), 0.0


def _uniform_fp16(seed: int, index: int, shape: tuple[int, ...], std: float) -> np.ndarray:
    """Uniform(−a, a) with standard deviation ``std``, from PCG64's raw 64-bit stream, as fp16."""
    n = math.prod(shape)
    raw = np.random.PCG64([seed, index]).random_raw(n)          # uint64, stable across numpy versions
    u = (raw >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # [0, 1), exact integer maths
    a = std * math.sqrt(3.0)
    return ((u * 2.0 - 1.0) * a).astype(np.float16).reshape(shape)


def state_dict(seed: int = SEED, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """The generated weights under transformers' ``CLIPTextModel`` keys (fp16 values, in ``dtype``)."""
    out = {}
    for i, (key, shape, std) in enumerate(_shapes()):
        if std > 0:
            a = _uniform_fp16(seed, i, shape, std)
        else:
            a = np.full(shape, 1.0 if key.endswith("norm1.weight") or key.endswith("norm2.weight")
                        or key.endswith("final_layer_norm.weight") else 0.0, dtype=np.float16)
        out[key] = torch.from_numpy(a).to(dtype)
    # transformers registers position_ids as a buffer in some versions; ComfyUI ignores it
    return out


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """Fingerprint: sha256 over key names, shapes and fp16 bytes, in key order."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].to(torch.float16).contiguous()
        h.update(k.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def text_encoder(seed: int = SEED, dtype: torch.dtype = torch.float32):
    """A transformers ``CLIPTextModel`` holding the generated weights, frozen, in eval mode."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(**CONFIG)
    with torch.device("meta"):
        model = CLIPTextModel(cfg)
    model = model.to_empty(device="cpu")
    sd = state_dict(seed, dtype=torch.float32)
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers ≥ 5 drops the prefix
        sd = {k[len("text_model."):]: v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"random CLIP keys do not match transformers' CLIPTextModel: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    for name, buf in model.named_buffers():  # position_ids (meta-initialised above)
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(CONFIG["max_position_embeddings"])[None])
    model.requires_grad_(False).eval()
    return model.to(dtype)


def comfy_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under an SD 1.x checkpoint's ``cond_stage_model.transformer.`` prefix."""
    return {"cond_stage_model.transformer." + k: v for k, v in sd.items()}
