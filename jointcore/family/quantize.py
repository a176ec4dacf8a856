"""Weight quantisation for shipping the family in the repository (≤ 80 MB in all).

A state dict is stored as a safetensors file whose large matrices are integer codes with scales, and whose
other tensors (biases, norms, small layers) stay fp16:

* ``int8``  — symmetric per-output-channel: ``w ≈ q · s``, ``q ∈ [−127, 127]`` int8, ``s = max|w_row| / 127``
  (fp16, one per output channel). 1 byte per weight.
* ``int4``  — symmetric per group of ``group`` consecutive weights of a row: ``q ∈ [−7, 7]`` stored two per
  byte (offset by 8), fp16 scale per group. ~0.56 bytes per weight at group 64.
* ``int2`` / ``int3`` — for *deltas* of fine-tuned models only (:func:`delta_state_dict`): 4 or 8 uniform
  levels ``(i − (L−1)/2)·s`` per group of ``group``, with ``s`` the group's RMS times the step of least error
  for a Gaussian (0.996 / 0.586; relative RMS error ≈ 0.35 / 0.19); four codes per byte / eight per three
  bytes. ~0.28 / ~0.41 bytes per weight with the fp16 scales.

Keys: ``<name>`` holds the codes, ``<name>::scale`` the scales; the file's metadata records each quantised
tensor's scheme and shape (``jd.quant``), so :func:`load_quantized` restores an ordinary float state dict
that any loader (diffusers, ComfyUI) accepts.
"""
from __future__ import annotations

import json
import math
from typing import Optional

import torch

SCHEMES = ("fp16", "int8", "int4")
MIN_NUMEL = 4096   # smaller tensors (biases, norms, tiny convs) stay fp16


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1).float()


def _fp16_scale(s: torch.Tensor) -> torch.Tensor:
    """The scale as it is stored (fp16, rounded up so that no code leaves the range), back in fp32."""
    s16 = s.clamp_min(1e-7).half()
    return torch.where(s16.float() < s, torch.nextafter(s16, torch.full_like(s16, float("inf"))), s16).float()


def quantize_tensor(w: torch.Tensor, scheme: str, group: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of one weight tensor (first dimension = output channels)."""
    r = _rows(w)
    if scheme == "int8":
        s = _fp16_scale(r.abs().amax(1, keepdim=True) / 127)
        q = torch.round(r / s).clamp(-127, 127).to(torch.int8)
        return q, s.half()
    if scheme == "int4":
        n = r.shape[1]
        pad = (-n) % group
        g = torch.nn.functional.pad(r, (0, pad)).reshape(r.shape[0], -1, group)
        s = _fp16_scale(g.abs().amax(2, keepdim=True) / 7)
        q = (torch.round(g / s).clamp(-7, 7) + 8).to(torch.uint8).reshape(r.shape[0], -1)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        return packed, s.squeeze(2).half()
    if scheme in LOW_BIT:
        levels, step = LOW_BIT[scheme]
        g = _groups(r, group)
        s = (g.square().mean(2, keepdim=True).sqrt() * step).clamp_min(1e-7).half().float()
        q = (torch.floor(g / s) + levels // 2).clamp(0, levels - 1).to(torch.int32).reshape(r.shape[0], -1)
        return _pack(q, scheme), s.squeeze(2).half()
    raise ValueError(f"unknown scheme {scheme!r}; use one of {SCHEMES + tuple(LOW_BIT)}")


#: low-bit codes for deltas: (levels, step in units of the group's RMS — the uniform quantiser of least error
#: for a Gaussian)
LOW_BIT = {"int2": (4, 0.996), "int3": (8, 0.586)}


def _pack(q: torch.Tensor, scheme: str) -> torch.Tensor:
    """Codes ``[R, N]`` (N a multiple of 8) → bytes: int2 four per byte, int3 eight per three bytes."""
    if scheme == "int2":
        return (q[:, 0::4] | (q[:, 1::4] << 2) | (q[:, 2::4] << 4) | (q[:, 3::4] << 6)).to(torch.uint8)
    word = sum(q[:, i::8] << (3 * i) for i in range(8))                       # 24 bits per 8 codes
    return torch.stack([(word >> (8 * b)) & 0xFF for b in range(3)], 2).reshape(q.shape[0], -1).to(torch.uint8)


def _unpack(codes: torch.Tensor, scheme: str, rows: int) -> torch.Tensor:
    c = codes.to(torch.int32)
    if scheme == "int2":
        return torch.stack([(c >> b) & 0x03 for b in (0, 2, 4, 6)], 2).reshape(rows, -1)
    b3 = c.reshape(rows, -1, 3)
    word = b3[..., 0] | (b3[..., 1] << 8) | (b3[..., 2] << 16)
    return torch.stack([(word >> (3 * i)) & 0x07 for i in range(8)], 2).reshape(rows, -1)


def _groups(r: torch.Tensor, group: int) -> torch.Tensor:
    if group % 8:
        raise ValueError(f"group must be a multiple of 8, got {group}")
    pad = (-r.shape[1]) % group
    return torch.nn.functional.pad(r, (0, pad)).reshape(r.shape[0], -1, group)


def dequantize_tensor(codes: torch.Tensor, scales: torch.Tensor, scheme: str, shape: list[int],
                      group: int = 64) -> torch.Tensor:
    rows = shape[0]
    n = math.prod(shape[1:]) if len(shape) > 1 else 1
    if scheme == "int8":
        return (codes.float() * scales.float()).reshape(shape)
    if scheme == "int4":
        lo, hi = (codes & 0x0F).to(torch.int16), (codes >> 4).to(torch.int16)
        q = torch.stack([lo, hi], 2).reshape(rows, -1).float() - 8
        g = q.reshape(rows, -1, group) * scales.float()[:, :, None]
        return g.reshape(rows, -1)[:, :n].reshape(shape)
    if scheme in LOW_BIT:
        q = _unpack(codes, scheme, rows).float() - (LOW_BIT[scheme][0] - 1) / 2
        g = q.reshape(rows, -1, group) * scales.float()[:, :, None]
        return g.reshape(rows, -1)[:, :n].reshape(shape)
    raise ValueError(f"unknown scheme {scheme!r}")


def quantize_state_dict(sd: dict, scheme: str = "int8", group: int = 64, min_numel: int = MIN_NUMEL
                        ) -> tuple[dict, dict]:
    """``(tensors, metadata)`` ready for ``safetensors.torch.save_file``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; use one of {SCHEMES}")
    out, info = {}, {}
    for k, v in sd.items():
        if not torch.is_floating_point(v):
            out[k] = v.contiguous()
            continue
        if scheme == "fp16" or v.ndim < 2 or v.numel() < min_numel:
            out[k] = v.detach().half().contiguous()
            continue
        q, s = quantize_tensor(v.detach(), scheme, group)
        out[k], out[k + "::scale"] = q.contiguous(), s.contiguous()
        info[k] = {"scheme": scheme, "shape": list(v.shape), "group": group}
    return out, {"jd.quant": json.dumps(info)}


def save_quantized(sd: dict, path: str, scheme: str = "int8", group: int = 64,
                   metadata: Optional[dict] = None) -> int:
    """Write ``sd`` quantised to ``path``; returns the file size in bytes."""
    import os

    from safetensors.torch import save_file

    t, meta = quantize_state_dict(sd, scheme, group)
    save_file(t, path, metadata={**(metadata or {}), **meta})
    return os.path.getsize(path)


def load_quantized(path: str, dtype: torch.dtype = torch.float32) -> dict:
    """A float state dict from a file written by :func:`save_quantized` (plain safetensors files load too)."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        info = json.loads((f.metadata() or {}).get("jd.quant", "{}"))
        out = {}
        for k in f.keys():
            if k.endswith("::scale"):
                continue
            v = f.get_tensor(k)
            if k in info:
                i = info[k]
                v = dequantize_tensor(v, f.get_tensor(k + "::scale"), i["scheme"], i["shape"], i.get("group", 64))
            out[k] = v.to(dtype) if torch.is_floating_point(v) else v
    return out


# ---- models derived from a shipped base: low-rank deltas ------------------------------------------------

def delta_state_dict(derived: dict, base: dict, rel_tol: float = 0.05, max_rank: int = 64,
                     min_numel: int = MIN_NUMEL, fallback: str = "int8", group: int = 64) -> tuple[dict, dict]:
    """A fine-tuned model as its difference from ``base`` (the float weights it was fine-tuned from, or those
    the user's machine will have, e.g. :func:`load_quantized` of the shipped base): each large matrix's delta
    truncated by SVD to the smallest rank whose relative Frobenius error is ≤ ``rel_tol`` (at most
    ``max_rank``; beyond that the delta is quantised with ``fallback``: ``int8`` per output channel, or
    ``int2`` / ``int3`` per group of ``group``), small deltas in fp16, tensors equal to ``base`` not stored at all, tensors
    new or reshaped relative to ``base`` in full (int8 when large). Returns ``(tensors, metadata)``."""
    if fallback != "int8" and fallback not in LOW_BIT:
        raise ValueError(f"fallback must be one of {('int8',) + tuple(LOW_BIT)}, got {fallback!r}")
    out, info = {}, {}
    for k, v in derived.items():
        if not torch.is_floating_point(v):
            out[k] = v.contiguous()
            continue
        v = v.detach().float()
        b = base.get(k)
        if b is None or tuple(b.shape) != tuple(v.shape):
            if v.ndim >= 2 and v.numel() >= min_numel:
                q, s = quantize_tensor(v, "int8")
                out[k], out[k + "::scale"] = q.contiguous(), s.contiguous()
                info[k] = {"kind": "full_int8", "shape": list(v.shape)}
            else:
                out[k] = v.half().contiguous()
                info[k] = {"kind": "full"}
            continue
        d = v - b.float()
        if d.abs().max() == 0:
            info[k] = {"kind": "same"}
            continue
        if v.ndim < 2 or v.numel() < min_numel:
            out[k] = d.half().contiguous()
            info[k] = {"kind": "delta"}
            continue
        m = d.reshape(d.shape[0], -1)
        U, S, Vh = torch.linalg.svd(m.double(), full_matrices=False)
        energy = S.square().flip(0).cumsum(0).flip(0)            # energy[r] = Σ_{i≥r} S_i²
        err = (energy / energy[0]).sqrt()                          # relative error when keeping r values
        ok = torch.nonzero(torch.cat([err[1:], err.new_zeros(1)]) <= rel_tol)
        r = int(ok[0]) + 1 if len(ok) else len(S)
        if r <= max_rank and r * (m.shape[0] + m.shape[1]) * 2 < m.numel():
            out[k + "::U"] = (U[:, :r] * S[:r]).float().half().contiguous()
            out[k + "::V"] = Vh[:r].float().half().contiguous()
            info[k] = {"kind": "lowrank", "shape": list(v.shape), "rank": r}
        else:
            q, s = quantize_tensor(d, fallback, group)
            out[k], out[k + "::scale"] = q.contiguous(), s.contiguous()
            info[k] = {"kind": f"delta_{fallback}", "shape": list(v.shape), "group": group}
    return out, {"jd.delta": json.dumps(info)}


def save_delta(derived: dict, base: dict, path: str, metadata: Optional[dict] = None, **kw) -> int:
    import os

    from safetensors.torch import save_file

    t, meta = delta_state_dict(derived, base, **kw)
    save_file(t, path, metadata={**(metadata or {}), **meta})
    return os.path.getsize(path)


def load_delta(path: str, base: dict, dtype: torch.dtype = torch.float32) -> dict:
    """Rebuild the derived state dict from a :func:`save_delta` file and the same ``base``."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        info = json.loads((f.metadata() or {}).get("jd.delta", "{}"))
        keys = set(f.keys())
        out = {}
        for k, i in info.items():
            kind = i["kind"]
            if kind == "same":
                v = base[k].float()
            elif kind == "full":
                v = f.get_tensor(k).float()
            elif kind == "full_int8":
                v = dequantize_tensor(f.get_tensor(k), f.get_tensor(k + "::scale"), "int8", i["shape"])
            elif kind == "delta":
                v = base[k].float() + f.get_tensor(k).float()
            elif kind == "lowrank":
                d = f.get_tensor(k + "::U").float() @ f.get_tensor(k + "::V").float()
                v = base[k].float() + d.reshape(i["shape"])
            elif kind.startswith("delta_") and kind[6:] in ("int8", *LOW_BIT):
                v = base[k].float() + dequantize_tensor(f.get_tensor(k), f.get_tensor(k + "::scale"), kind[6:],
                                                        i["shape"], i.get("group", 64))
            else:
                raise ValueError(f"{path}: unknown entry kind {kind!r} for {k!r}")
            out[k] = v.to(dtype)
        for k in keys:  # non-float tensors
            if "::" not in k and k not in info:
                out[k] = f.get_tensor(k)
    return out
