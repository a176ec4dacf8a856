"""ComfyUI nodes of the pack: one module per capability, collected here.

A capability whose optional dependency is missing is skipped with a clear message in ComfyUI's log,
so the rest of the pack (and ComfyUI's start-up) keeps working.
"""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger("jointdiffusion")

# module name -> what a user installs when its import fails
CAPABILITIES = {
    "schedule": "the pack's requirements (pip install -r requirements.txt)",
    "mesh": "trimesh and kornia (pip install -r requirements.txt)",
    "diff2in1": "diffusers, transformers and kornia (pip install -r requirements.txt)",
    "jointnet": "diffusers (pip install -r requirements.txt)",
    "predictor": "diffusers, transformers and kornia (pip install -r requirements.txt)",
    "panorama": "diffusers and lpips (pip install -r requirements.txt)",
    "panorama_view": "the pack's requirements (pip install -r requirements.txt)",
    "pano_depth": "diffusers, transformers and kornia (pip install -r requirements.txt)",
}

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
UNAVAILABLE: dict = {}

for _name, _hint in CAPABILITIES.items():
    try:
        _mod = importlib.import_module(f"{__name__}.{_name}")
    except ImportError as e:  # missing optional dependency: report, keep going
        UNAVAILABLE[_name] = f"{e}. Install {_hint}"
        log.warning("[JointDiffusion] nodes '%s' disabled: %s. Install %s", _name, e, _hint)
        continue
    NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(getattr(_mod, "NODE_DISPLAY_NAME_MAPPINGS", {}))
