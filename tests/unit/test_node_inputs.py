"""Every node of the pack refuses NaN/Inf in its float widgets and tensor inputs, naming the input, before it
does any work (``nodes.common.checked_inputs``)."""
import math

import pytest
import torch

from comfy_stubs import load_node_module

MODULES = ["schedule", "mesh", "diff2in1", "jointnet", "predictor", "panorama", "panorama_view"]


def _all_nodes(monkeypatch, tmp_path):
    for mod in MODULES:
        m, _ = load_node_module(monkeypatch, tmp_path, mod)
        yield from {**m.NODE_CLASS_MAPPINGS, **getattr(m, "OPTIONAL_NODES", {})}.items()


def _inputs(cls):
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_every_float_widget_refuses_non_finite(monkeypatch, tmp_path, bad):
    seen = 0
    for key, cls in _all_nodes(monkeypatch, tmp_path):
        for name, spec in _inputs(cls).items():
            if spec[0] != "FLOAT":
                continue
            seen += 1
            fn = getattr(cls(), cls.FUNCTION)
            with pytest.raises(ValueError, match=f"input '{name}' is {bad!r}"):
                fn(**{name: bad})  # refused before the node looks at any other input
    assert seen >= 15, seen  # cfg, eta, denoise, fov, near/far, sync weights, max_memory_gb, ...


@pytest.mark.parametrize("kind", ["IMAGE", "MASK", "LATENT"])
def test_tensor_inputs_refuse_nan_by_name(monkeypatch, tmp_path, kind):
    seen = 0
    for key, cls in _all_nodes(monkeypatch, tmp_path):
        for name, spec in _inputs(cls).items():
            if spec[0] != kind:
                continue
            seen += 1
            t = torch.rand(1, 8, 8, 3) if kind != "LATENT" else torch.rand(1, 4, 8, 8)
            t.view(-1)[5] = math.nan
            value = {"samples": t} if kind == "LATENT" else t
            with pytest.raises(ValueError, match=f"input '{name}' has 1 NaN or infinite"):
                getattr(cls(), cls.FUNCTION)(**{name: value})
    assert seen >= {"IMAGE": 8, "MASK": 2, "LATENT": 4}[kind], (kind, seen)


def test_finite_inputs_pass_through(monkeypatch, tmp_path):
    m, _ = load_node_module(monkeypatch, tmp_path, "predictor")
    out = m.JDDepthColorize().colorize(depth=torch.rand(1, 8, 8, 3), colormap="grey", near_bright=False)[0]
    assert out.shape == (1, 8, 8, 3) and torch.isfinite(out).all()
    # wrapping twice (a module imported again) does not stack the check
    fn = m.JDDepthColorize.colorize
    m.checked_inputs(m.NODE_CLASS_MAPPINGS)
    assert m.JDDepthColorize.colorize is fn
