"""Shipping quantisation: round trips within the scheme's step, sizes, metadata, plain files."""
import os

import pytest
import torch
from safetensors.torch import save_file

from jointcore.family import quantize as Q


@pytest.mark.parametrize("scheme,bound", [("int8", 0.5 / 127), ("int4", 0.5 / 7)])
def test_round_trip_error_is_at_most_half_a_step(scheme, bound):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 33, 3, 3, generator=g) * torch.linspace(0.01, 2, 64)[:, None, None, None]
    codes, scales = Q.quantize_tensor(w, scheme)
    back = Q.dequantize_tensor(codes, scales, scheme, list(w.shape))
    assert back.shape == w.shape
    if scheme == "int8":  # per row: |error| <= max|row| / 254
        err = (back - w).reshape(64, -1).abs().amax(1)
        assert (err <= w.reshape(64, -1).abs().amax(1) * bound * 1.001 + 1e-6).all()
    else:  # per group of 64
        flat = torch.nn.functional.pad(w.reshape(64, -1), (0, (-297) % 64)).reshape(64, -1, 64)
        berr = torch.nn.functional.pad((back - w).reshape(64, -1), (0, (-297) % 64)).reshape(64, -1, 64)
        assert (berr.abs().amax(2) <= flat.abs().amax(2) * bound * 1.001 + 1e-6).all()
    assert (back - w).abs().max() > 0  # it is lossy, not a copy


def test_files_are_smaller_and_load_back(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {"big.weight": torch.randn(320, 320, 3, 3, generator=g), "big.bias": torch.randn(320, generator=g),
          "small.weight": torch.randn(4, 8, generator=g), "steps": torch.arange(3)}
    sizes = {s: Q.save_quantized(sd, str(tmp_path / f"{s}.safetensors"), s) for s in Q.SCHEMES}
    n = 320 * 320 * 9
    assert sizes["int8"] < 0.55 * sizes["fp16"] and sizes["int4"] < 0.33 * sizes["fp16"]
    assert abs(sizes["int8"] - n) < 0.05 * n
    for s in Q.SCHEMES:
        back = Q.load_quantized(str(tmp_path / f"{s}.safetensors"))
        assert set(back) == set(sd) and torch.equal(back["steps"], sd["steps"])
        assert back["big.weight"].dtype == torch.float32
        tol = {"fp16": 1e-3, "int8": 0.02, "int4": 0.3}[s]
        assert (back["big.weight"] - sd["big.weight"]).abs().max() < tol * sd["big.weight"].abs().max()
        assert torch.allclose(back["big.bias"], sd["big.bias"], atol=1e-2)  # small tensors: fp16
    # a plain safetensors file (no metadata) loads unchanged
    save_file({"x": torch.ones(2, 2)}, str(tmp_path / "plain.safetensors"))
    assert torch.equal(Q.load_quantized(str(tmp_path / "plain.safetensors"))["x"], torch.ones(2, 2))
    with pytest.raises(ValueError, match="unknown scheme"):
        Q.quantize_state_dict(sd, "int3")


def test_low_rank_delta_round_trip(tmp_path):
    g = torch.Generator().manual_seed(2)
    base = {"conv.weight": torch.randn(64, 32, 3, 3, generator=g), "norm.weight": torch.ones(64),
            "same.weight": torch.randn(64, 64, generator=g), "lin.weight": torch.randn(96, 96, generator=g)}
    low = torch.randn(64, 3, generator=g) @ torch.randn(3, 288, generator=g) * 0.01  # a rank-3 update
    derived = {"conv.weight": base["conv.weight"] + low.reshape(64, 32, 3, 3),
               "norm.weight": base["norm.weight"] + 0.1, "same.weight": base["same.weight"].clone(),
               "lin.weight": base["lin.weight"] + 0.01 * torch.randn(96, 96, generator=g),  # full-rank update
               "new.weight": torch.randn(64, 128, generator=g), "count": torch.tensor([3])}
    t, meta = Q.delta_state_dict(derived, base, rel_tol=0.01)
    info = __import__("json").loads(meta["jd.delta"])
    assert info["conv.weight"] == {"kind": "lowrank", "shape": [64, 32, 3, 3], "rank": 3}
    assert info["same.weight"]["kind"] == "same" and info["lin.weight"]["kind"] == "delta_int8"
    assert info["new.weight"]["kind"] == "full_int8" and info["norm.weight"]["kind"] == "delta"
    size = Q.save_delta(derived, base, str(tmp_path / "d.safetensors"), rel_tol=0.01)
    assert size < 0.5 * sum(v.numel() * 2 for v in derived.values())  # far below fp16 of the whole model
    back = Q.load_delta(str(tmp_path / "d.safetensors"), base)
    assert set(back) == set(derived)
    assert torch.allclose(back["conv.weight"], derived["conv.weight"], atol=1e-3)
    assert torch.equal(back["same.weight"], derived["same.weight"]) and torch.equal(back["count"], derived["count"])
    assert (back["lin.weight"] - derived["lin.weight"]).abs().max() < 0.04 * 0.01 * 4 + 1e-4
    assert (back["new.weight"] - derived["new.weight"]).abs().max() < derived["new.weight"].abs().max() / 100


def test_int2_is_near_the_gaussian_optimum_and_packs_four_per_byte():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 100, generator=g) * torch.linspace(0.001, 1, 48)[:, None]   # rows of different scale
    codes, scales = Q.quantize_tensor(w, "int2")
    assert codes.dtype == torch.uint8 and codes.shape == (48, 128 // 4)            # 100 → 2 groups of 64, 4/byte
    back = Q.dequantize_tensor(codes, scales, "int2", list(w.shape))
    rel = ((back - w).norm(dim=1) / w.norm(dim=1))
    # the Lloyd–Max 4-level quantiser of a Gaussian has a relative RMS error of 0.34; max-scaled levels ~0.5
    assert (rel < 0.40).all() and (rel > 0.25).all()
    levels = torch.unique((back / scales.float().repeat_interleave(64, 1)[:, :100]).round(decimals=3))
    assert levels.tolist() == [-1.5, -0.5, 0.5, 1.5]


def test_int2_delta_fallback_round_trip(tmp_path):
    g = torch.Generator().manual_seed(4)
    base = {"lin.weight": torch.randn(96, 96, generator=g), "frozen.weight": torch.randn(64, 128, generator=g)}
    derived = {"lin.weight": base["lin.weight"] + 0.05 * torch.randn(96, 96, generator=g),   # full-rank update
               "frozen.weight": base["frozen.weight"].clone()}
    t, meta = Q.delta_state_dict(derived, base, rel_tol=0.01, fallback="int2")
    info = __import__("json").loads(meta["jd.delta"])
    assert info["lin.weight"]["kind"] == "delta_int2" and info["frozen.weight"]["kind"] == "same"
    assert "frozen.weight" not in t                        # a frozen branch costs nothing
    size = Q.save_delta(derived, base, str(tmp_path / "d.safetensors"), rel_tol=0.01, fallback="int2")
    assert size < 96 * 96 / 4 + 96 * 2 * 2 + 2000        # 2 bits per weight + a scale per group + header
    back = Q.load_delta(str(tmp_path / "d.safetensors"), base)
    d_err = (back["lin.weight"] - derived["lin.weight"]).norm() / (derived["lin.weight"] - base["lin.weight"]).norm()
    assert d_err < 0.4                                     # the delta within the int2 error, the base exact
    assert torch.equal(back["frozen.weight"], base["frozen.weight"])
    with pytest.raises(ValueError, match="fallback"):
        Q.delta_state_dict(derived, base, fallback="int4")
