"""Every node of the pack refuses NaN/Inf in its float widgets and tensor inputs, naming the input, before it
does any work (``nodes.common.checked_inputs``)."""
import math

import pytest
import torch

from comfy_stubs import load_node_module

MODULES = ["schedule", "mesh", "diff2in1", "jointnet", "predictor", "panorama", "panorama_view", "pano_depth"]


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


def test_every_input_and_output_explains_itself(monkeypatch, tmp_path):
    """Hovering any input or output of the pack's nodes shows a tooltip (INPUT_TYPES' ``tooltip``,
    ``OUTPUT_TOOLTIPS``), and the tooltips that come from the shared tables do not hide a node's own."""
    missing, n_inputs, n_outputs = [], 0, 0
    for key, cls in _all_nodes(monkeypatch, tmp_path):
        for name, spec in _inputs(cls).items():
            n_inputs += 1
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if not str(opts.get("tooltip", "")).strip():
                missing.append(f"{key}.{name}")
        if cls.RETURN_TYPES:
            tips = getattr(cls, "OUTPUT_TOOLTIPS", ())
            n_outputs += len(cls.RETURN_TYPES)
            if len(tips) != len(cls.RETURN_TYPES) or not all(str(t).strip() for t in tips):
                missing.append(f"{key} outputs")
    assert missing == [] and n_inputs >= 130 and n_outputs >= 25, (missing, n_inputs, n_outputs)
    m, _ = load_node_module(monkeypatch, tmp_path, "predictor")
    own = m.JDPredictorLoader.INPUT_TYPES()["required"]["dtype"][1]["tooltip"]
    assert own.startswith("auto: bf16")  # the node's own tooltip, not replaced


NAME_MAX = 24  # characters: a title this long fits the width ComfyUI gives a node for its widgets (~ 210-330 px)


def test_one_naming_scheme(monkeypatch, tmp_path):
    """Every node has a display name in one scheme: Title Case, the method first where a method owns the node,
    no pack prefix or suffix (the frontends show the pack as a badge), short enough for the node's width, and
    no two alike. Tooltips and descriptions refer to other nodes by these names."""
    names, too_long, styled, stale = {}, [], [], []
    for mod in MODULES:
        m, _ = load_node_module(monkeypatch, tmp_path, mod)
        optional = getattr(m, "OPTIONAL_NODES", {})
        for key, cls in {**m.NODE_CLASS_MAPPINGS, **optional}.items():
            name = m.NODE_DISPLAY_NAME_MAPPINGS.get(key)
            if name is None and key in optional:
                continue  # named where it is registered (a ComfyUI with the core MESH type)
            assert name, f"{key} has no display name"
            names[key] = name
            if len(name) > NAME_MAX:
                too_long.append(name)
            if name.startswith("JD ") or "JointDiffusion" in name or name[0].islower():
                styled.append(name)
            # no tooltip or description still names a node by an old "JD …" title
            texts = [getattr(cls, "DESCRIPTION", "")] + list(getattr(cls, "OUTPUT_TOOLTIPS", ()))
            texts += [str((s[1] if len(s) > 1 and isinstance(s[1], dict) else {}).get("tooltip", ""))
                      for s in _inputs(cls).values()]
            stale += [(key, t) for t in texts if "JD " in t or "(JointDiffusion)" in t]
    assert not too_long and not styled and not stale, (too_long, styled, stale)
    assert len(set(names.values())) == len(names), names
    assert len(names) >= 23, names
