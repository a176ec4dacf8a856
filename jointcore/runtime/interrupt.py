"""Cancel inside a model's forward pass.

A sampling loop checks for Cancel between steps, but one forward pass of a UNet on a large latent can take
minutes on a CPU (self-attention is quadratic in the number of latent pixels). :class:`interruptible` makes the
forward of the pack's own models stoppable within a fraction of a second of work:

* a forward pre-hook on every sub-module calls ``check()`` (it raises to stop, e.g. ComfyUI's
  ``throw_exception_if_processing_interrupted``);
* ``F.scaled_dot_product_attention`` calls whose score matrix would be large are computed in query chunks with
  ``check()`` between them (exact: each query row's softmax is independent of the others). The interception is
  a ``TorchFunctionMode`` active only inside the ``with`` block; nothing global is changed.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

#: score-matrix elements (batch · heads · queries · keys) above which attention is computed in checked chunks
CHUNK_ELEMENTS = 1 << 26


def chunked_sdpa(check: Callable[[], None], query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                 scale=None, chunk_elements: int = CHUNK_ELEMENTS, **kw):
    """``F.scaled_dot_product_attention`` in query chunks of at most ``chunk_elements`` scores each, calling
    ``check()`` before each chunk. Falls back to one call where chunking would change the result (causal)."""
    extra = dict(kw)
    if scale is not None:
        extra["scale"] = scale
    nq, nk = query.shape[-2], key.shape[-2]
    lead = query.numel() // max(nq * query.shape[-1], 1)
    per_row = max(lead * nk, 1)
    rows = max(1, chunk_elements // per_row)
    if is_causal or rows >= nq:
        check()
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, **extra)
    out = query.new_empty(query.shape[:-1] + value.shape[-1:])
    for s in range(0, nq, rows):
        check()
        m = attn_mask
        if m is not None and m.dim() >= 2 and m.shape[-2] == nq:
            m = m[..., s:s + rows, :]
        out[..., s:s + rows, :] = F.scaled_dot_product_attention(query[..., s:s + rows, :], key, value, attn_mask=m,
                                                                 dropout_p=dropout_p, **extra)
    return out


class _CheckedAttention(TorchFunctionMode):
    def __init__(self, check, chunk_elements):
        super().__init__()
        self.check, self.chunk_elements = check, chunk_elements

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return chunked_sdpa(self.check, *args, chunk_elements=self.chunk_elements, **kwargs)
        return func(*args, **kwargs)


class interruptible:
    """``with interruptible(check, model_a, model_b): ...`` — ``check()`` runs before every sub-module's forward
    and between chunks of large attention products of everything run inside the block."""

    def __init__(self, check: Callable[[], None] | None, *modules: torch.nn.Module,
                 chunk_elements: int = CHUNK_ELEMENTS):
        self.check, self.modules, self.chunk_elements = check, modules, chunk_elements
        self._handles: list = []
        self._mode = None

    def __enter__(self):
        if self.check is None:
            return self
        check = self.check

        def hook(_module, _args):
            check()
        for m in _unique_modules(self.modules):
            self._handles.append(m.register_forward_pre_hook(hook))
        self._mode = _CheckedAttention(check, self.chunk_elements)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False


def _unique_modules(modules: Iterable[torch.nn.Module]):
    seen = set()
    for root in modules:
        if root is None:
            continue
        for m in root.modules():
            if id(m) not in seen:
                seen.add(id(m))
                yield m
