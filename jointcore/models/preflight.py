"""Check a model folder before loading it, and say what is wrong in the pack's words.

Loading a diffusers / transformers component straight away turns bad input into errors that name neither the
folder nor the file: a bare ``JSONDecodeError``, diffusers' advice about ``ignore_mismatched_sizes`` for weights
of another model, or an attempt to allocate a terabyte for a config with absurd widths. :func:`preflight` runs
first and needs no weights in memory:

1. the component's ``config.json`` is read (invalid JSON: the file, line and column);
2. the model is built from the config alone on the ``meta`` device (no memory), so its parameter count and
   shapes are known; a model larger than :data:`MAX_PARAMS` or than the memory there is, is refused;
3. the tensor shapes stored in the weight file are read from its header (safetensors) or memory-mapped
   (``.bin``, ``weights_only``: never unpickled as code) and compared with the config's: a mismatch names the
   folder, the file and the first tensors that differ.
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional

import torch

#: refuse configs beyond this many parameters outright (SDXL's UNet has 2.6 B; a JointNet pair of SD 2.1 1.7 B)
MAX_PARAMS = 20_000_000_000


def read_json(path: str, what: str = "config") -> dict:
    """A JSON object from ``path``; errors name the file (missing, invalid JSON with line/column, not an object)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing ({what})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({what}): {e.msg} at line {e.lineno}, column {e.colno}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file ({what}); expected JSON") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object ({what}), not a {type(data).__name__}")
    return data


def meta_model(build, config_path: str):
    """``build()`` under the ``meta`` device (shapes only, no memory); errors name the config file."""
    try:
        with torch.device("meta"):
            return build()
    except Exception as e:  # noqa: BLE001 - whatever the library raises on a bad config
        raise ValueError(f"{config_path} does not describe a model this loader can build: {type(e).__name__}: "
                         f"{e}") from None


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def available_bytes() -> Optional[int]:
    """Memory a new model could take now (RAM available), or None when it cannot be read."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        return None


def check_size(model: torch.nn.Module, config_path: str, bytes_per_param: int = 4,
               available: Optional[int] = None) -> int:
    """Parameter count of ``model`` (built from ``config_path``); refuses absurd or unfittable configs."""
    n = n_params(model)
    need = n * bytes_per_param
    if n > MAX_PARAMS:
        raise ValueError(f"{config_path} describes a model of {n / 1e9:.1f} B parameters ({need / 2**30:.0f} GiB); "
                         f"that is not a model this pack runs (limit {MAX_PARAMS / 1e9:.0f} B): check its widths "
                         f"(block_out_channels, cross_attention_dim, hidden_size)")
    avail = available if available is not None else available_bytes()
    if avail is not None and need > avail:
        raise MemoryError(f"{config_path} describes a model of {n / 1e6:.0f} M parameters that needs "
                          f"{need / 2**30:.1f} GiB, but only {avail / 2**30:.1f} GiB of memory is available")
    return n


def unreadable_weights_reason(e: Exception) -> str:
    """Why ``torch.load(..., weights_only=True)`` refused a file, in a sentence (not torch's advice to turn the
    safety off)."""
    import pickle
    import re

    text = str(e)
    m = re.search(r"(?i)unsupported (?:global:? )?GLOBAL ([\w.]+)", text)
    if isinstance(e, pickle.UnpicklingError) or m:
        what = f" ({m.group(1)})" if m else ""
        return (f"holds Python objects other than tensors{what}; loading it could run code, so it is refused "
                f"(use a .safetensors file, or one from a source you trust converted to it)")
    first = text.strip().splitlines()[0][:200] if text.strip() else type(e).__name__
    return f"is not a readable PyTorch weight file ({first}); it may be truncated or corrupt: re-download it"


def stored_shapes(path: str) -> dict[str, tuple]:
    """Tensor shapes in a weight file without loading its data: the safetensors header, or a memory-mapped,
    ``weights_only`` read of a ``.bin`` (a pickle that holds anything but tensors is refused)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        try:
            with safe_open(path, framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        sd = torch.load(path, map_location="meta", weights_only=True, mmap=False)
    except Exception as e:  # noqa: BLE001 - UnpicklingError for code in the pickle, zip/EOF errors, ...
        raise ValueError(f"{path} {unreadable_weights_reason(e)}") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a dict of tensors")
    return {k: tuple(v.shape) for k, v in sd.items() if isinstance(v, torch.Tensor)}


def check_shapes(model: torch.nn.Module, files: Iterable[str], folder: str, strip_prefixes: tuple = (),
                 ignore_missing: Iterable[str] = ()) -> None:
    """The weights in ``files`` (together) fit ``model``'s parameters: every shape agrees and no parameter
    is missing (except names starting with one of ``ignore_missing``)."""
    files = list(files)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    stored: dict[str, tuple] = {}
    where: dict[str, str] = {}
    for f in files:
        for k, s in stored_shapes(f).items():
            for p in strip_prefixes:
                if k.startswith(p):
                    k = k[len(p):]
            stored[k] = s
            where[k] = os.path.basename(f)
    names = ", ".join(os.path.basename(f) for f in files)
    wrong = [(k, stored[k], s) for k, s in expected.items() if k in stored and stored[k] != s]
    if wrong:
        lines = "; ".join(f"{k}: {a} in the file, {b} from config.json" for k, a, b in wrong[:3])
        raise ValueError(f"{folder}: the weights in {names} do not match its config.json ({len(wrong)} tensor(s) "
                         f"differ, e.g. {lines}); the file belongs to another model or the config was edited")
    skip = tuple(ignore_missing)
    missing = [k for k in expected if k not in stored and not (skip and k.startswith(skip))]
    # buffers a checkpoint may legitimately omit (e.g. position_ids) are not parameters
    params = {n for n, _ in model.named_parameters()}
    missing = [k for k in missing if k in params]
    if missing and len(missing) == len(params):
        raise ValueError(f"{folder}: {names} holds none of the {len(params)} weights its config.json describes "
                         f"(e.g. {missing[0]!r}); it is not this component's weight file")
    if missing:
        raise ValueError(f"{folder}: {names} lacks {len(missing)} of the {len(params)} weights its config.json "
                         f"describes (e.g. {', '.join(missing[:3])})")


def weight_files(folder: str, stems: Iterable[str], use_safetensors: bool, variant: Optional[str] = None) -> list[str]:
    """The weight file(s) a diffusers / transformers loader would read in ``folder`` (shards via the index)."""
    ext = ".safetensors" if use_safetensors else ".bin"
    for stem in stems:
        name = f"{stem}.{variant}{ext}" if variant else f"{stem}{ext}"
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return [p]
        idx = p + ".index.json"
        if os.path.isfile(idx):
            wm = read_json(idx, "weight index").get("weight_map", {})
            return [os.path.join(folder, f) for f in sorted(set(wm.values()))]
    return []


def preflight(build, folder: str, stems: Iterable[str], use_safetensors: bool, variant: Optional[str] = None,
              bytes_per_param: int = 4, ignore_missing: Iterable[str] = ()) -> dict[str, Any]:
    """Read ``folder/config.json``, build the model with ``build(config)`` on the meta device, refuse it if
    absurd or too large, and check the weight file's shapes. Returns the config."""
    cfg_path = os.path.join(folder, "config.json")
    cfg = read_json(cfg_path)
    model = meta_model(lambda: build(cfg), cfg_path)
    check_size(model, cfg_path, bytes_per_param)
    files = weight_files(folder, stems, use_safetensors, variant)
    if files:
        check_shapes(model, files, folder, ignore_missing=ignore_missing)
    return cfg


def diffusers_build(cls=None):
    """``config → model`` for a diffusers model class (default ``UNet2DConditionModel``)."""
    if cls is None:
        from diffusers import UNet2DConditionModel as cls

    def build(cfg):
        return cls.from_config(dict(cfg))
    return build


def clip_text_build(cfg: dict):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))


DIFFUSERS_STEMS = ("diffusion_pytorch_model",)
TRANSFORMERS_STEMS = ("model", "pytorch_model")


def preflight_sd_component(root: str, name: str, use_safetensors: Optional[bool] = None,
                           variant: Optional[str] = None, bytes_per_param: int = 4) -> dict[str, Any]:
    """:func:`preflight` of a Stable Diffusion folder's ``unet``, ``vae`` (``AutoencoderKL`` or
    ``AutoencoderTiny``, by its config) or ``text_encoder`` (CLIP). ``use_safetensors`` None: whichever the
    folder holds (safetensors first, as the loaders do)."""
    import os

    from .sd_folder import vae_class

    folder = os.path.join(root, name)
    if name == "text_encoder":
        build, stems = clip_text_build, TRANSFORMERS_STEMS
    else:
        build, stems = diffusers_build(vae_class(folder) if name == "vae" else None), DIFFUSERS_STEMS
    if use_safetensors is None:
        use_safetensors = bool(weight_files(folder, stems, True, variant))
    return preflight(build, folder, stems, use_safetensors, variant, bytes_per_param,
                     ignore_missing=("text_model.embeddings.position_ids",))  # a buffer some checkpoints omit
