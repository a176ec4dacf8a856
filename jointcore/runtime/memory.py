"""Memory a forward pass will need, measured before anything is allocated.

:func:`peak_forward_bytes` runs a function on ``meta`` tensors (shapes only, no data, no memory, milliseconds
at any size) while a dispatch mode tracks the bytes of every tensor alive, freed when Python frees them as in a
real run. The peak of that count is the activation memory of the eager forward. Attention is counted as the
memory-efficient kernels PyTorch uses (output only; on ``meta`` tensors ``scaled_dot_product_attention`` would
otherwise decompose into the quadratic math path).

:func:`meta_twin` gives a model's structure with ``meta`` parameters (no weights copied), so the estimate runs on
the very module that will run, with its real configuration. :data:`OVERHEAD` covers what the tracker cannot see
(allocator slack, kernel workspaces): calibrated against the peak RSS of real CPU runs (``tests/unit/
test_runtime.py``), where the tracked peak was 0.65–0.8× the measured one.
"""
from __future__ import annotations

import copy
import weakref
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

OVERHEAD = 1.5           # real peak ≈ tracked peak × OVERHEAD (+ MARGIN)
MARGIN = 256 * 2**20     # bytes


class _Meter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            k = id(s)
            if k in inputs or k in self._sizes:
                continue
            self._sizes[k] = n = s.nbytes()
            self.live += n
            weakref.finalize(s, self._free, k)
        self.peak = max(self.peak, self.live)
        return out

    def _free(self, k):
        self.live -= self._sizes.pop(k, 0)


class _EfficientAttention(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, v = args[0], (args[2] if len(args) > 2 else kwargs["value"])
            return torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
        return func(*args, **kwargs)


def peak_forward_bytes(fn: Callable[..., Any], *args, **kwargs) -> int:
    """Peak bytes of tensors alive while ``fn(*args, **kwargs)`` runs under ``no_grad`` on ``meta`` tensors
    (inputs themselves not counted)."""
    with torch.no_grad(), _EfficientAttention(), _Meter() as m:
        fn(*args, **kwargs)
    return m.peak


def meta_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers are ``meta`` tensors (no weight data is copied)."""
    memo: dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        m = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(m, requires_grad=False) if isinstance(t, torch.nn.Parameter) else m
    return copy.deepcopy(module, memo)


_TWINS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def twin(module: torch.nn.Module) -> torch.nn.Module:
    """:func:`meta_twin` of ``module``, made once per module (while it lives)."""
    t = _TWINS.get(module)
    if t is None:
        t = _TWINS[module] = meta_twin(module)
    return t


def module_bytes(*modules: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers of ``modules``."""
    return sum(t.numel() * t.element_size() for m in modules if m is not None
               for t in list(m.parameters()) + list(m.buffers()))


def sd_activation_bytes(unet: torch.nn.Module, vae: torch.nn.Module, batch: int, height: int, width: int,
                        text_len: int = 77) -> int:
    """Memory to plan for a Stable-Diffusion-type job on ``batch`` images of ``height × width`` px: the largest
    of the VAE encode, one UNet call (``unet.config.in_channels`` latent channels, ``text_len`` tokens) and the
    VAE decode, each measured on meta twins."""
    from ..models.sd_folder import encode_unscaled

    levels = getattr(vae.config, "block_out_channels", None) or vae.config.decoder_block_out_channels  # KL | Tiny
    f = 2 ** (len(levels) - 1)
    h, w = -(-height // f), -(-width // f)
    lat = int(vae.config.latent_channels)
    u, v = twin(unet), twin(vae)
    dt = next(unet.parameters()).dtype
    vdt = next(vae.parameters()).dtype

    def empty(*shape, dtype=dt):
        return torch.empty(*shape, device="meta", dtype=dtype)
    peaks = (
        peak_forward_bytes(lambda: encode_unscaled(v, empty(batch, 3, h * f, w * f, dtype=vdt))),
        peak_forward_bytes(u, empty(batch, int(unet.config.in_channels), h, w),
                           torch.zeros(batch, dtype=torch.long, device="meta"),
                           encoder_hidden_states=empty(batch, text_len, int(unet.config.cross_attention_dim))),
        peak_forward_bytes(lambda: v.decode(empty(batch, lat, h, w, dtype=vdt))),
    )
    return estimate(max(peaks))


def estimate(tracked_peak: int) -> int:
    """Real bytes to plan for, from a tracked peak."""
    return int(tracked_peak * OVERHEAD) + MARGIN


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def require_memory(need: int, available: int | None, what: str, advice: str) -> None:
    """Refuse a job whose estimated ``need`` exceeds ``available`` bytes (None: unknown, allowed)."""
    if available is not None and need > available:
        raise MemoryError(f"{what} needs about {gib(need)} of memory for its activations; {gib(available)} is "
                          f"available. {advice}")


def process_memory(field: str = "VmRSS") -> int:
    """Bytes of this process's ``field`` in ``/proc/self/status`` (``VmRSS`` now, ``VmHWM`` its peak); 0 where
    the file does not exist (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_memory() -> int:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux: ``clear_refs`` 5) and return that RSS
    in bytes, so that ``process_memory("VmHWM")`` afterwards is the peak from here on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return process_memory("VmRSS")
