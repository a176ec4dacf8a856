"""Shared glue between ComfyUI types and jointcore (imported only inside ComfyUI).

* IMAGE: ``[B, H, W, C]`` float 0–1  ↔  jointcore images ``[B, C, H, W]``.
* MASK:  ``[B, H, W]`` (or ``[H, W]``) float 0–1.
* Model folders live under ComfyUI's ``models/`` and are registered with ``folder_paths``.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable, Optional

import torch

_LOG = logging.getLogger("jointdiffusion")

CATEGORY = "JointDiffusion"

# tiled samplers (panorama.py, jointnet.py): the official JointNet linear boundary is 8 latents, whatever the window
BOUNDARY_PX = 64
BOUNDARY_INPUT = ("INT", {"default": BOUNDARY_PX, "min": 0, "max": 4096, "step": 8,
                          "tooltip": "jointnet method: width of the linear boundary weight ramp at each view's "
                                     "edges, in pixels (official: 64 px = 8 latents, independent of the window); "
                                     "0 = uniform weights. Other methods use uniform weights."})


# ---- tensors ---------------------------------------------------------------------------------------

def require_finite(name: str, value):
    """Refuse a NaN or infinite float widget or tensor input by its name (JSON accepts NaN and ComfyUI's min/max
    check lets it through): a NaN input would otherwise come back as a NaN result reported as success."""
    import math

    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):  # counted only when failing
            bad = int((~torch.isfinite(value)).sum())
            if bad:
                raise ValueError(f"input '{name}' has {bad} NaN or infinite value(s) of {value.numel()}; check the "
                                 f"node that produced it")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"input '{name}' is {value!r}; it must be a finite number")
    return value


def check_inputs(kwargs: dict) -> None:
    """Refuse NaN/Inf in any float widget, tensor input (IMAGE, MASK) or tensor inside a dict input (LATENT
    ``samples``/``noise_mask``, JD_RAW ``data``), naming the input."""
    for k, v in kwargs.items():
        if isinstance(v, (float, torch.Tensor)):
            require_finite(k, v)
        elif isinstance(v, dict):
            for key in ("samples", "noise_mask", "data"):
                if isinstance(v.get(key), torch.Tensor):
                    require_finite(k if key in ("samples", "data") else f"{k} ({key})", v[key])


def add_tooltips(mappings: dict, inputs: dict, outputs: dict) -> None:
    """Give every node of ``mappings`` the tooltips of ``inputs`` (``{node: {input: text}}``, where its own
    INPUT_TYPES has none) and ``outputs`` (``{node: (text per output, …)}`` as ``OUTPUT_TOOLTIPS``), so that hovering
    any input or output on the canvas explains it."""
    for key, cls in mappings.items():
        tips = inputs.get(key)
        if tips and not cls.__dict__.get("_jd_tooltips"):
            original = cls.INPUT_TYPES

            def INPUT_TYPES(c, _original=original, _tips=tips):
                spec = _original()
                for section in spec.values():
                    if not isinstance(section, dict):
                        continue
                    for name, value in list(section.items()):
                        if name in _tips and isinstance(value, tuple) and value:
                            opts = dict(value[1]) if len(value) > 1 and isinstance(value[1], dict) else {}
                            opts.setdefault("tooltip", _tips[name])
                            section[name] = (value[0], opts, *value[2:])
                return spec
            cls.INPUT_TYPES = classmethod(INPUT_TYPES)
            cls._jd_tooltips = True
        if key in outputs:
            if len(outputs[key]) != len(cls.RETURN_TYPES):
                raise ValueError(f"{key}: {len(outputs[key])} output tooltips for {len(cls.RETURN_TYPES)} outputs")
            cls.OUTPUT_TOOLTIPS = tuple(outputs[key])


def checked_inputs(mappings: dict) -> dict:
    """Wrap each node class's FUNCTION so that :func:`check_inputs` runs on its inputs first (by name, whether
    passed by keyword, as ComfyUI does, or by position). Idempotent; returns ``mappings``."""
    import functools
    import inspect

    for cls in mappings.values():
        name = getattr(cls, "FUNCTION", None)
        fn = getattr(cls, name, None) if name else None
        if fn is None or getattr(fn, "_jd_checked", False):
            continue

        def make(orig):
            sig = inspect.signature(orig)

            @functools.wraps(orig)
            def wrapper(self, *args, **kwargs):
                try:
                    named = sig.bind_partial(self, *args, **kwargs).arguments
                except TypeError:  # let the call itself report wrong arguments
                    named = kwargs
                check_inputs({k: v for k, v in named.items() if k != "self"})
                return orig(self, *args, **kwargs)
            wrapper._jd_checked = True
            return wrapper
        setattr(cls, name, make(fn))
    return mappings


def image_to_bchw(image: torch.Tensor, name: str = "image") -> torch.Tensor:
    """ComfyUI IMAGE ``[B,H,W,C]`` → ``[B,C,H,W]`` float32 (only the first 3 channels). NaN/Inf were refused
    already: every node input passes :func:`check_inputs` (:func:`checked_inputs`)."""
    if image.ndim != 4:
        raise ValueError(f"expected an IMAGE of shape [B,H,W,C] for '{name}', got {tuple(image.shape)}")
    return image[..., :3].permute(0, 3, 1, 2).float().contiguous()


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """``[B,C,H,W]`` (C = 1 or 3) → ComfyUI IMAGE ``[B,H,W,3]`` float32 on the CPU, clamped to 0–1."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.permute(0, 2, 3, 1).float().clamp(0, 1).cpu().contiguous()


# ---- depth convention travelling with an IMAGE ----------------------------------------------------------
#: attribute the pack's nodes set on a depth IMAGE they output: "depth" (near = dark, e.g. Predict Depth / Normals),
#: "disparity" (near = bright, e.g. JointNet, MiDaS-style estimators) or "normals". ComfyUI hands a node's output
#: object itself to the nodes wired to it, so RGBD to Mesh (depth_kind auto) reads it; a node in between that
#: makes a new tensor drops it (Depth Convention sets it on any IMAGE).
DEPTH_TAG = "jd_depth_kind"
DEPTH_TAGS = ("depth", "disparity", "normals")


def tag_depth(image: torch.Tensor, kind: str) -> torch.Tensor:
    """``image`` marked as holding ``kind`` ("depth": near = dark; "disparity": near = bright; "normals")."""
    if kind not in DEPTH_TAGS:
        raise ValueError(f"depth convention must be one of {DEPTH_TAGS}, got {kind!r}")
    setattr(image, DEPTH_TAG, kind)
    return image


def depth_tag(image) -> Optional[str]:
    """The convention a pack node marked ``image`` with, or None."""
    kind = getattr(image, DEPTH_TAG, None)
    return kind if kind in DEPTH_TAGS else None


def mask_to_b1hw(mask: Optional[torch.Tensor], batch: int, height: int, width: int,
                 name: str = "mask") -> Optional[torch.Tensor]:
    """ComfyUI MASK → ``[B,1,H,W]``, resized (nearest) to ``height×width`` and repeated to ``batch`` (errors name
    the input ``name``; NaN/Inf were refused already by :func:`check_inputs`)."""
    if mask is None:
        return None
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"expected a MASK of shape [B,H,W] for '{name}', got {tuple(mask.shape)}")
    m = m[:, None]
    if m.shape[-2:] != (height, width):
        m = torch.nn.functional.interpolate(m, size=(height, width), mode="nearest")
    if m.shape[0] not in (1, batch):
        raise ValueError(f"mask batch {m.shape[0]} does not match image batch {batch}: give 1 mask or {batch}")
    return m.expand(batch, -1, -1, -1)


# ---- model folders ---------------------------------------------------------------------------------

def register_model_folder(name: str, extensions: Optional[set] = None) -> str:
    """Register ``models/<name>`` with ``folder_paths`` (keeping paths added by extra_model_paths.yaml)."""
    import folder_paths

    d = os.path.join(folder_paths.models_dir, name)
    os.makedirs(d, exist_ok=True)
    if d not in folder_paths.folder_names_and_paths.get(name, ([], set()))[0]:
        folder_paths.add_model_folder_path(name, d)  # keeps paths added by extra_model_paths.yaml
    if extensions is not None:
        paths, _ = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(extensions))
    return d


#: bounds of a model-folder listing (it runs inside the server's request handling, so it must never stall it)
LIST_MAX_DEPTH = 4          # folder levels below models/<name>/ searched for model folders
LIST_MAX_DIRS = 2000        # folders visited per listing before it stops (with a log line)
LIST_CACHE_S = 5.0          # a listing is reused for this long unless a searched folder's mtime changes
_LIST_CACHE: dict = {}


def list_model_dirs(name: str, marker: Optional[Callable[[str], bool]] = None) -> list[str]:
    """Sub-folders (diffusers layouts) of every registered ``models/<name>`` path, relative names.

    Bounded: symlinks are followed but every real folder is visited once (a symlink loop ends), at most
    :data:`LIST_MAX_DEPTH` levels deep and :data:`LIST_MAX_DIRS` folders in all; the result is cached for
    :data:`LIST_CACHE_S` seconds while the searched base folders keep their modification times."""
    import time

    import folder_paths

    bases = [b for b in folder_paths.get_folder_paths(name) if os.path.isdir(b)]
    stamp = tuple((b, os.stat(b).st_mtime_ns) for b in bases)
    key = (name, marker)
    hit = _LIST_CACHE.get(key)
    if hit is not None and hit[0] == stamp and time.monotonic() - hit[1] < LIST_CACHE_S:
        return list(hit[2])
    out, seen, visited = [], set(), 0
    for base in bases:
        stack = [(base, 0)]
        while stack:
            path, depth = stack.pop()
            try:
                real = os.path.realpath(path)
            except OSError:
                continue
            if real in seen:
                continue
            seen.add(real)
            visited += 1
            if visited > LIST_MAX_DIRS:
                _LOG.warning("[JointDiffusion] listing models/%s stopped after %d folders; move unrelated folders "
                             "out of %s", name, LIST_MAX_DIRS, base)
                stack.clear()
                break
            rel = os.path.relpath(path, base)
            if rel != "." and (marker is None or marker(path)):
                out.append(rel.replace(os.sep, "/"))
                continue  # do not descend into a model folder
            if depth >= LIST_MAX_DEPTH:
                continue
            try:
                subs = sorted(e.path for e in os.scandir(path) if e.is_dir())
            except OSError:
                continue
            stack.extend((d, depth + 1) for d in reversed(subs))
    # a folder downloaded with its hub owner (``GonzaloMG/marigold-e2e-ft-depth``, as the README says) is also
    # offered by its own name (``marigold-e2e-ft-depth``, as the shipped workflows name it) when that is unique
    names = set(out)
    tails: dict[str, list[str]] = {}
    for rel in out:
        if rel.count("/") == 1:
            tails.setdefault(rel.split("/")[1], []).append(rel)
    names.update(t for t, full in tails.items() if len(full) == 1 and t not in names)
    result = sorted(names)
    _LIST_CACHE[key] = (stamp, time.monotonic(), result)
    return list(result)


def _holds_files(path: str) -> bool:
    """A folder with files in it (a model folder, not an owner's folder of models)."""
    try:
        return any(e.is_file() for e in os.scandir(path))
    except OSError:
        return False


def resolve_model_dir(name: str, rel: str) -> str:
    """Absolute path of ``models/<name>/<rel>`` (first registered base that has it) or a clear error."""
    import folder_paths

    bases = folder_paths.get_folder_paths(name)
    for base in bases:
        p = os.path.join(base, rel)
        if os.path.isdir(p):
            return p
    nested = []  # ``marigold-e2e-ft-depth`` stored as ``<owner>/marigold-e2e-ft-depth`` (list_model_dirs' alias)
    if "/" not in rel and os.sep not in rel:
        for base in bases:
            try:
                owners = sorted(e.path for e in os.scandir(base) if e.is_dir())
            except OSError:
                continue
            nested += [(base, os.path.join(o, rel)) for o in owners if os.path.isdir(os.path.join(o, rel))]
    if len(nested) == 1:
        return nested[0][1]
    if len(nested) > 1:
        raise FileNotFoundError(f"model folder {rel!r} is ambiguous under models/{name}/: "
                                f"{[os.path.relpath(p, b).replace(os.sep, '/') for b, p in nested]}; "
                                f"choose one by its full name")
    found = list_model_dirs(name, _holds_files)
    raise FileNotFoundError(f"model folder {rel!r} not found under models/{name}/ (looked for {rel!r} and "
                            f"<owner>/{rel!r} in {bases}); "
                            + (f"found there: {found[:12]}" if found else "nothing is there yet"))


# ---- device / progress -------------------------------------------------------------------------------

def torch_device() -> torch.device:
    import comfy.model_management as mm
    return mm.get_torch_device()


def auto_dtype(device: torch.device) -> str:
    """The loaders' ``auto`` precision: fp32 on the CPU; on a GPU bf16 where it is supported (it has fp32's range,
    so SD 2.x attention cannot overflow as it can in fp16), else fp16 where ComfyUI would use it, else fp32."""
    if device.type == "cpu":
        return "fp32"
    import comfy.model_management as mm
    try:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        if hasattr(mm, "should_use_bf16") and mm.should_use_bf16(device=device):
            return "bf16"
        if mm.should_use_fp16(device=device):
            return "fp16"
    except Exception:  # noqa: BLE001 - older/newer signatures: full precision
        pass
    return "fp32"


def offload_device() -> torch.device:
    import comfy.model_management as mm
    return mm.unet_offload_device()


def interrupt_check() -> None:
    """Raise ComfyUI's interruption exception if the user pressed Cancel (for :class:`jointcore.runtime.
    interrupt.interruptible`, which calls it inside forward passes)."""
    import comfy.model_management as mm
    mm.throw_exception_if_processing_interrupted()


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes a job may still take on ``device``: RAM available (CPU) or ComfyUI's free VRAM figure."""
    if device.type == "cpu":
        try:
            import psutil
            return int(psutil.virtual_memory().available)
        except Exception:  # noqa: BLE001
            return None
    import comfy.model_management as mm
    try:
        return int(mm.get_free_memory(device))
    except Exception:  # noqa: BLE001 - older/newer signatures
        return None


def ensure_memory(need: int, what: str, advice: str, device: Optional[torch.device] = None) -> None:
    """Before a large job on a model ComfyUI already loaded: refuse it clearly if its estimated activations
    (``need``) cannot fit on ``device``, after asking ComfyUI to unload other models on a GPU. (The pack's own
    models go through :func:`load_models`.)"""
    from ..jointcore.runtime.memory import require_memory

    dev = device or torch_device()
    total = int(need)
    avail = available_memory(dev)
    if dev.type != "cpu" and avail is not None and total > avail:
        import comfy.model_management as mm
        try:
            mm.free_memory(total, dev)
        except Exception:  # noqa: BLE001
            pass
        avail = available_memory(dev)
    require_memory(total, avail, what, advice)


class PackModels(torch.nn.Module):
    """The modules of one model the pack loaded, held as one module for ComfyUI's ``ModelPatcher`` (ComfyUI keeps
    its bookkeeping — ``device``, loaded-weight counters — as attributes of the module it manages; a diffusers
    model's ``device`` is a read-only property, so the modules are held by this container instead)."""

    def __init__(self, name: str, **modules: torch.nn.Module):
        super().__init__()
        self.jd_name = name
        for key, m in modules.items():
            if m is not None:
                self.add_module(key, m)

    def forward(self, *a, **k):  # pragma: no cover - a holder, never called
        raise TypeError("PackModels only holds modules for ComfyUI's model management")


def make_patcher(name: str, **modules: torch.nn.Module):
    """A ComfyUI ``ModelPatcher`` owning ``modules`` (left where they are, normally the offload device): loaded
    to the compute device by :func:`running` through ``comfy.model_management.load_models_gpu``, kept there
    between runs while memory allows, unloaded by ComfyUI (``/free``, "Unload models", another model's demand)."""
    import comfy.model_patcher

    from ..jointcore.runtime.memory import module_bytes

    held = PackModels(name, **modules)
    return comfy.model_patcher.ModelPatcher(held, load_device=torch_device(), offload_device=offload_device(),
                                            size=module_bytes(held))


def _not_loaded_bytes(patchers) -> int:
    import comfy.model_management as mm

    loaded = {id(getattr(lm, "model", None)) for lm in getattr(mm, "current_loaded_models", [])}

    def on_device(p) -> bool:
        first = next(p.model.parameters(), None)
        return first is None or first.device.type == p.load_device.type
    return sum(p.model_size() for p in patchers if id(p) not in loaded or not on_device(p))


def load_models(patchers, need: int, what: str, advice: str) -> list:
    """Make room for and load ``patchers`` with ComfyUI (``load_models_gpu`` with the job's activation estimate
    ``need`` as its memory requirement, fully: the pack's layers have no ComfyUI weight casting), after refusing
    clearly a job that cannot fit (before anything moves), and again if, once loaded, too little is left.
    Returns the patchers loaded (``None`` entries — no model — left out)."""
    import inspect

    import comfy.model_management as mm

    from ..jointcore.runtime.memory import require_memory

    patchers = [p for p in patchers if p is not None]
    dev = patchers[0].load_device if patchers else torch_device()
    if dev.type != "cpu":  # nothing else can be unloaded beyond the whole device
        total = None
        try:
            total = int(mm.get_total_memory(dev))
        except Exception:  # noqa: BLE001 - older/newer signatures
            pass
        require_memory(int(need) + _not_loaded_bytes(patchers), total, what, advice)
    kw = {}
    params = inspect.signature(mm.load_models_gpu).parameters
    if "force_full_load" in params:
        kw["force_full_load"] = True
    if patchers:
        mm.load_models_gpu(patchers, memory_required=int(need), **kw)
        for p in patchers:
            _complete_partial_load(p)
    require_memory(int(need), available_memory(dev), what, advice)
    return patchers


def _complete_partial_load(patcher) -> None:
    """ComfyUI before ``force_full_load`` (the March 2024 runtime) loads a model that does not fit — or every model
    under ``--novram`` — "in lowvram mode": it moves only the sub-modules that have a ``weight`` and leaves the
    rest for its own layers' weight casting, which the pack's layers do not have. Tensors it left behind (e.g.
    LPIPS' input scaling buffers, CLIP's position ids) would end the run with a device mismatch: they follow
    here, tensor by tensor (a no-op when ComfyUI loaded everything, as newer versions do with force_full_load)."""
    dev = patcher.load_device
    moved = 0
    for m in patcher.model.modules():
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if t is not None and t.device != dev and not (t.device.type == dev.type == "cpu"):
                with torch.no_grad():
                    new = t.data.to(dev)
                    if not isinstance(t, torch.nn.Parameter):
                        m._buffers[name] = new
                    elif torch._has_compatible_shallow_copy_type(t, new):  # as Module._apply does
                        t.data = new
                    else:
                        m._parameters[name] = torch.nn.Parameter(new, requires_grad=t.requires_grad)
                moved += t.numel() * t.element_size()
    if moved:
        _LOG.info("[JointDiffusion] %s: ComfyUI loaded it partially; moved the %.1f MiB it left behind to %s",
                  getattr(patcher.model, "jd_name", "model"), moved / 2**20, dev)


@contextlib.contextmanager
def running(patchers, need: int, what: str, advice: str):
    """Run the pack's models for the block: loaded by ComfyUI (:func:`load_models`), Cancel honoured inside their
    forward passes (:class:`jointcore.runtime.interrupt.interruptible`). They stay loaded afterwards — ComfyUI
    unloads them when it needs the memory."""
    from ..jointcore.runtime.interrupt import interruptible

    patchers = load_models(patchers, need, what, advice)
    with interruptible(interrupt_check, *(p.model for p in patchers)):
        yield


def progress(total: int, node_id=None) -> Callable[..., None]:
    """A jointcore step callback that advances a ComfyUI progress bar and honours Cancel."""
    import comfy.model_management as mm
    import comfy.utils

    bar = comfy.utils.ProgressBar(total)

    def cb(*_args, **_kw):
        mm.throw_exception_if_processing_interrupted()
        bar.update(1)

    return cb
