"""nodes/pano_depth.py (360° Depth & Normals) against stub comfy modules with a tiny predictor checkpoint."""
from __future__ import annotations

import pytest
import torch

from comfy_stubs import Interrupted, load_node_module
from predictor_ckpt import make_checkpoint, synthetic_images


@pytest.fixture
def node(tmp_path, monkeypatch):
    pred_mod, stubs = load_node_module(monkeypatch, tmp_path, "predictor")
    mod, _ = load_node_module(monkeypatch, tmp_path, "pano_depth", stubs=stubs)
    models = tmp_path / "models" / "jointdiffusion_predictors"
    make_checkpoint(str(models / "tiny-e2e"))
    (pred,) = pred_mod.JDPredictorLoader().load("tiny-e2e", "auto", True)
    return mod, stubs, pred


def test_equirectangular_depth_normals_and_views(node):
    mod, stubs, pred = node
    pano = synthetic_images(1, 32, 64).permute(0, 2, 3, 1)           # ComfyUI IMAGE [B,H,W,C]
    n = mod.JDPanoramaDepth()
    method = "aligned (joint scale/shift, 18 views)"
    depth, normals, views, vdepth, raw = n.predict(pred, pano, "equirectangular", 360.0, method, 90.0, 16, 0,
                                                   normals_predictor=pred)
    assert depth.shape == (1, 32, 64, 3) and normals.shape == (1, 32, 64, 3)
    assert views.shape == (18, 16, 16, 3) and vdepth.shape == (18, 16, 16, 3)
    assert getattr(depth, "jd_depth_kind", None) == "depth"           # RGBD to Mesh (auto) reads it as depth
    assert float(depth.max()) == pytest.approx(1.0) and float(depth.min()) >= 0.0
    assert raw["data"].shape == (1, 1, 32, 64) and len(raw["alignment"][0]["scale"]) == 18
    assert raw["settings"]["method"] == "aligned" and raw["normals"].shape == (1, 3, 32, 64)
    torch.testing.assert_close(raw["normals"].norm(dim=1), torch.ones(1, 32, 64), atol=1e-4, rtol=0)
    assert stubs.bar_updates == 36                                   # 18 depth + 18 normals views
    # the baselines through the same node; no normals predictor → a flat grey normal map
    d2, n2, v2, _, raw2 = n.predict(pred, pano, "equirectangular", 360.0, "naive stitching (6 cube faces)", 90.0, 16, 0)
    assert v2.shape[0] == 6 and raw2["alignment"] == [None] and torch.allclose(n2, torch.full_like(n2, 0.5))


def test_cylindrical_and_shared_noise(node):
    mod, _, pred = node
    pano = synthetic_images(2, 16, 128).permute(0, 2, 3, 1)
    depth, _, views, _, raw = mod.JDPanoramaDepth().predict(
        pred, pano, "cylindrical", 360.0, "aligned (joint scale/shift, 18 views)", 90.0, 16, 3,
        init="gaussian", sync="shared_noise")
    assert depth.shape == (2, 16, 128, 3) and raw["settings"]["layout"] == "ring"
    assert views.shape[0] == 2 * 8 and raw["settings"]["sync"] == "shared_noise"


def test_bad_input_and_cancel(node):
    mod, stubs, pred = node
    n = mod.JDPanoramaDepth()
    method = "aligned (joint scale/shift, 18 views)"
    with pytest.raises(ValueError, match=r"input 'image' is 48×32 px; an equirectangular panorama is twice as wide"):
        n.predict(pred, torch.rand(1, 32, 48, 3), "equirectangular", 360.0, method, 90.0, 16, 0)
    with pytest.raises(ValueError, match="needs 'views'"):
        n.predict(pred, torch.rand(1, 32, 64, 3), "equirectangular", 360.0, method, 90.0, 16, 0, layout="fibonacci")
    stubs.interrupt_after = stubs.checks + 1
    with pytest.raises(Interrupted):
        n.predict(pred, torch.rand(1, 32, 64, 3), "equirectangular", 360.0, method, 90.0, 16, 0)
    stubs.interrupt_after = None
