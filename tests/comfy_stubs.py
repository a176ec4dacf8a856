"""Stand-ins for the parts of ComfyUI that node modules touch, for unit tests of ``nodes/*.py`` without a
ComfyUI (the integration tier runs them in a real one).

``load_node_module(monkeypatch, tmp_path, "jointnet")`` installs the stand-ins and imports
``nodes/jointnet.py`` as part of a throw-away package (``nodes/__init__`` — which would import every
capability — is skipped). ``stubs`` records progress-bar updates and interruption checks, and can raise
an interruption after N checks.
"""
from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

import torch

ROOT = str(Path(__file__).resolve().parent.parent)


class Interrupted(Exception):
    """What the stand-in ``throw_exception_if_processing_interrupted`` raises."""


class ComfyStubs:
    def __init__(self, tmp_path: Path):
        self.models = Path(tmp_path) / "models"
        self.output = Path(tmp_path) / "output"
        self.output.mkdir(parents=True, exist_ok=True)
        self.bar_totals: list[int] = []   # the total of each ProgressBar.update call
        self.bar_updates = 0              # sum of all update(n)
        self.checks = 0                   # interruption checks so far
        self.interrupt_after = None       # raise Interrupted once checks exceed this

        fp = types.ModuleType("folder_paths")
        fp.models_dir = str(self.models)
        fp.folder_names_and_paths = {}
        fp.get_output_directory = lambda: str(self.output)

        def add_model_folder_path(name, path, is_default=False):
            fp.folder_names_and_paths.setdefault(name, ([], set()))[0].append(path)
        fp.add_model_folder_path = add_model_folder_path
        fp.get_folder_paths = lambda name: fp.folder_names_and_paths[name][0]

        mm = types.ModuleType("comfy.model_management")
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.unet_offload_device = lambda: torch.device("cpu")
        mm.soft_empty_cache = lambda *a, **k: None
        mm.should_use_fp16 = lambda *a, **k: False
        mm.current_loaded_models = []  # stand-ins of ComfyUI's LoadedModel: .model is the patcher
        self.load_calls: list[dict] = []   # every load_models_gpu call: patchers and memory_required

        def load_models_gpu(models, memory_required=0, force_full_load=False, **_k):
            self.load_calls.append({"models": list(models), "memory_required": memory_required,
                                    "force_full_load": force_full_load})
            for p in models:
                if not any(lm.model is p for lm in mm.current_loaded_models):
                    p.model.to(p.load_device)
                    mm.current_loaded_models.insert(0, types.SimpleNamespace(model=p))

        def unload_all_models():
            for lm in mm.current_loaded_models:
                lm.model.model.to(lm.model.offload_device)
            mm.current_loaded_models.clear()
        mm.load_models_gpu = load_models_gpu
        mm.unload_all_models = unload_all_models
        mm.get_total_memory = lambda *a, **k: 64 * 2**30

        mp = types.ModuleType("comfy.model_patcher")

        class ModelPatcher:  # what the pack uses of ComfyUI's: the held model, devices, size
            def __init__(self, model, load_device, offload_device, size=0, **_k):
                self.model, self.load_device, self.offload_device, self.size = model, load_device, offload_device, size

            def model_size(self):
                return self.size
        mp.ModelPatcher = ModelPatcher

        def interrupted():
            self.checks += 1
            if self.interrupt_after is not None and self.checks > self.interrupt_after:
                raise Interrupted()
        mm.throw_exception_if_processing_interrupted = interrupted

        cu = types.ModuleType("comfy.utils")
        stubs = self

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total = total

            def update(self, n):
                stubs.bar_totals.append(self.total)
                stubs.bar_updates += n
        cu.ProgressBar = ProgressBar

        cs = types.ModuleType("comfy.samplers")
        cs.KSAMPLER = lambda fn, extra_options={}, inpaint_options={}: types.SimpleNamespace(fn=fn, options=extra_options)

        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.utils, comfy.samplers, comfy.model_patcher = mm, cu, cs, mp
        self.folder_paths = fp
        self.modules = {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": cu,
                        "comfy.samplers": cs, "comfy.model_patcher": mp}


def load_node_module(monkeypatch, tmp_path: Path, module: str, stubs: ComfyStubs | None = None,
                     package: str = "jdpack_nodetest"):
    """Install the stand-ins (or ``stubs``) and import ``nodes/<module>.py``; returns ``(module, stubs)``."""
    stubs = stubs or ComfyStubs(tmp_path)
    for k, v in stubs.modules.items():
        monkeypatch.setitem(sys.modules, k, v)
    for name, path in ((package, ROOT), (f"{package}.nodes", os.path.join(ROOT, "nodes"))):
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        monkeypatch.setitem(sys.modules, name, pkg)
    for k in [k for k in sys.modules if k.startswith(f"{package}.") and k != f"{package}.nodes"]:
        monkeypatch.delitem(sys.modules, k)
    return importlib.import_module(f"{package}.nodes.{module}"), stubs
