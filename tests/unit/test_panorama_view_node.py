"""JDPanoramaPreview (nodes/panorama_view.py) with a stand-in for ComfyUI's folder_paths."""
import importlib
import json
import os
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def mod(tmp_path, monkeypatch):
    out = tmp_path / "output"
    out.mkdir()
    fp = types.ModuleType("folder_paths")
    fp.get_output_directory = lambda: str(out)

    def get_save_image_path(filename_prefix, output_dir, image_width=0, image_height=0):
        # same contract as ComfyUI's: (full folder, file stem, next counter, subfolder, prefix); creates the folder
        subfolder, filename = os.path.split(os.path.normpath(filename_prefix))
        full = os.path.join(output_dir, subfolder)
        os.makedirs(full, exist_ok=True)
        return full, filename, 1, subfolder, filename_prefix
    fp.get_save_image_path = get_save_image_path
    monkeypatch.setitem(sys.modules, "folder_paths", fp)
    for name, path in {"jdpack_pvtest": ROOT, "jdpack_pvtest.nodes": os.path.join(ROOT, "nodes")}.items():
        pkg = types.ModuleType(name)
        pkg.__path__ = [path]
        monkeypatch.setitem(sys.modules, name, pkg)
    for k in [k for k in sys.modules if k.startswith("jdpack_pvtest.nodes.")]:
        monkeypatch.delitem(sys.modules, k)
    m = importlib.import_module("jdpack_pvtest.nodes.panorama_view")
    m._out = out
    return m


def test_node_contract(mod):
    assert set(mod.NODE_CLASS_MAPPINGS) == {"JDPanoramaPreview"} == set(mod.NODE_DISPLAY_NAME_MAPPINGS)
    cls = mod.JDPanoramaPreview
    assert cls.OUTPUT_NODE is True and cls.RETURN_TYPES == () and cls.CATEGORY == "JointDiffusion/panorama"
    req = cls.INPUT_TYPES()["required"]
    assert req["images"][0] == "IMAGE" and req["images"][1]["tooltip"]
    assert req["projection"][0] == ["equirectangular", "cylindrical"]
    assert (req["span_deg"][1]["default"], req["span_deg"][1]["min"], req["span_deg"][1]["max"]) == (360.0, 1.0, 360.0)
    assert req["filename_prefix"][1]["default"] == "jointdiffusion/panorama"


def test_saves_pngs_and_returns_viewer_ui(mod):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 16, 32, 3, generator=g)
    res = mod.JDPanoramaPreview().save(images, "cylindrical", 180.0, "jointdiffusion/panorama",
                                       prompt={"1": {"class_type": "X"}})
    ui = res["ui"]
    assert [e["subfolder"] for e in ui["images"]] == ["jointdiffusion"] * 2
    assert [e["type"] for e in ui["images"]] == ["output"] * 2
    assert [{k: e[k] for k in ("projection", "span_deg")} for e in ui["jd_panorama"]] == \
        [{"projection": "cylindrical", "span_deg": 180.0}] * 2
    names = [e["filename"] for e in ui["images"]]
    assert [e["filename"] for e in ui["jd_panorama"]] == names
    assert len(set(names)) == 2
    for i, name in enumerate(names):
        png = Image.open(mod._out / "jointdiffusion" / name)
        assert png.size == (32, 16)
        expect = (images[i].numpy() * 255).clip(0, 255).astype("uint8")
        assert np.abs(np.asarray(png.convert("RGB")).astype(int) - expect.astype(int)).max() <= 1
        assert json.loads(png.info["jd_panorama"]) == {"projection": "cylindrical", "span_deg": 180.0}
        assert json.loads(png.info["prompt"]) == {"1": {"class_type": "X"}}


def test_never_overwrites(mod):
    node = mod.JDPanoramaPreview()
    img = torch.zeros(1, 8, 16, 3)
    first = node.save(img, "equirectangular", 360.0, "pano")["ui"]["images"][0]["filename"]
    marker = (mod._out / first).read_bytes()
    second = node.save(img + 1, "equirectangular", 360.0, "pano")["ui"]["images"][0]["filename"]
    assert first != second
    assert (mod._out / first).read_bytes() == marker  # the first file is untouched


@pytest.mark.parametrize("kwargs, msg", [
    (dict(projection="fisheye"), "projection must be one of"),
    (dict(span_deg=0.5), "span_deg must be between 1 and 360"),
    (dict(span_deg=400), "span_deg must be between 1 and 360"),
])
def test_bad_input_is_explained(mod, kwargs, msg):
    args = dict(images=torch.zeros(1, 8, 16, 3), projection="equirectangular", span_deg=360.0, filename_prefix="p")
    args.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        mod.JDPanoramaPreview().save(**args)
