"""Optional dependencies, imported where they are needed, with an error that says what to install."""
from __future__ import annotations

import importlib
from types import ModuleType

# import name -> pip requirement
PIP_NAMES = {"trimesh": "trimesh", "lpips": "lpips", "kornia": "kornia", "accelerate": "accelerate",
             "diffusers": "diffusers", "transformers": "transformers", "safetensors": "safetensors",
             "einops": "einops"}


def require(name: str, purpose: str) -> ModuleType:
    """Import ``name`` or raise an ImportError naming the package to install and what needs it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        pip = PIP_NAMES.get(name.split(".")[0], name.split(".")[0])
        raise ImportError(f"{purpose} needs the Python package '{pip}', which is not installed ({e}). "
                          f"Install it in ComfyUI's Python: pip install {pip}  "
                          f"(or: pip install -r requirements.txt in this node pack)") from e
