"""The family's frozen random CLIP-L: bit-identical everywhere, initialised like transformers' CLIP, usable."""
import numpy as np
import pytest
import torch

from jointcore.models import random_clip as R


@pytest.fixture(scope="module")
def sd():
    return R.state_dict()


def test_fingerprint_is_pinned(sd):
    # the generator must give the same bytes on every machine and numpy version: a changed hash means every
    # model trained on it would silently read different text features
    assert R.state_dict_sha256(sd) == R.EXPECTED_SHA256


def test_shapes_count_and_init_statistics(sd):
    assert sum(v.numel() for v in sd.values()) == 123_060_480  # CLIP-L text tower without projection
    assert all(v.dtype == torch.float16 for v in sd.values())
    tok = sd["text_model.embeddings.token_embedding.weight"].float()
    assert tok.shape == (49408, 768) and abs(tok.std().item() - 0.02) < 2e-4
    q = sd["text_model.encoder.layers.3.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - 768 ** -0.5 * 24 ** -0.5) < 1e-3 * 768 ** -0.5 * 24 ** -0.5 * 50
    assert q.abs().max() <= 768 ** -0.5 * 24 ** -0.5 * 3 ** 0.5 * 1.001  # uniform support
    assert (sd["text_model.encoder.layers.0.layer_norm1.weight"] == 1).all()
    assert (sd["text_model.encoder.layers.0.mlp.fc1.bias"] == 0).all()
    # tensors have independent streams
    assert not torch.equal(sd["text_model.encoder.layers.0.self_attn.q_proj.weight"],
                           sd["text_model.encoder.layers.0.self_attn.k_proj.weight"])


def test_other_seed_differs():
    a = R._uniform_fp16(1, 5, (64,), 0.02)
    b = R._uniform_fp16(2, 5, (64,), 0.02)
    assert not np.array_equal(a, b) and np.array_equal(a, R._uniform_fp16(1, 5, (64,), 0.02))


def test_text_encoder_features_depend_on_every_word():
    te = R.text_encoder()
    assert not any(p.requires_grad for p in te.parameters())
    bos, eos = 49406, 49407
    ids = torch.full((3, 77), eos)
    ids[:, 0] = bos
    ids[:, 1:4] = torch.tensor([[320, 736, 5753], [320, 1901, 5753], [320, 736, 2866]])  # "a red sphere" etc.
    with torch.no_grad():
        h = te(ids)[0]
    assert h.shape == (3, 77, 768) and torch.isfinite(h).all()
    # positions before the first differing token agree exactly (causal attention), later ones differ clearly
    assert torch.equal(h[0, :2], h[1, :2])
    d = (h[0, 2:] - h[1, 2:]).norm(dim=-1) / h[0, 2:].norm(dim=-1)
    assert d.min() > 0.1
    d3 = (h[0, 3:] - h[2, 3:]).norm(dim=-1) / h[0, 3:].norm(dim=-1)
    assert d3.min() > 0.1


def test_comfy_keys_prefix(sd):
    ck = R.comfy_keys({"text_model.final_layer_norm.weight": sd["text_model.final_layer_norm.weight"]})
    assert list(ck) == ["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
