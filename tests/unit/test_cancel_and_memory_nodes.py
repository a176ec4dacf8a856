"""Cancel inside the pack's model calls and memory refusal before large jobs, through the nodes (stand-in comfy)."""
from __future__ import annotations

import types

import psutil
import pytest
import torch

from comfy_stubs import Interrupted, load_node_module
from jointcore.jointnet import JointNet
from jointcore import mesh as jm
from jointcore.tiled import TiledConfig, tiled_sample
from predictor_ckpt import make_checkpoint, synthetic_images
from tiny import tiny_unet


def _cond(width=32, L=4, seed=0):
    return [[torch.randn(1, L, width, generator=torch.Generator().manual_seed(seed)), {}]]


@pytest.fixture
def jn(tmp_path, monkeypatch):
    m, stubs = load_node_module(monkeypatch, tmp_path, "jointnet")
    JointNet.from_unet(tiny_unet()).save_pretrained(stubs.models / "jointnet" / "tiny")
    (bundle,) = m.JDJointNetLoader().load("tiny", "auto", "epsilon")
    return m, stubs, bundle


def _hooks(model):
    return sum(len(mod._forward_pre_hooks) for mod in model.modules())


def test_cancel_stops_joint_sampling_inside_the_first_forward(jn):
    m, stubs, bundle = jn
    (empty,) = m.JDJointEmptyLatent().make(128, 128, 1)
    stubs.interrupt_after = 30  # well inside the first UNet pass (hundreds of checks per pass)
    with pytest.raises(Interrupted):
        m.JDJointKSampler().sample(bundle, _cond(), _cond(seed=1), empty, "joint_generation", 0, 5, 3.0, "ddim",
                                   0.0, 1.0)
    assert stubs.bar_updates == 0  # not one step finished: stopped mid-forward
    assert _hooks(bundle.model) == 0  # nothing left attached
    stubs.interrupt_after = None
    (out,) = m.JDJointKSampler().sample(bundle, _cond(), _cond(seed=1), empty, "joint_generation", 0, 2, 3.0,
                                        "ddim", 0.0, 1.0)
    assert torch.isfinite(out["samples"]).all() and stubs.bar_updates == 2


def _little_memory(monkeypatch, gib: float):
    real = psutil.virtual_memory
    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: types.SimpleNamespace(**{**real()._asdict(), "available": int(gib * 2**30)}))


def test_joint_sampling_beyond_memory_is_refused_before_it_starts(jn, monkeypatch):
    m, stubs, bundle = jn
    (empty,) = m.JDJointEmptyLatent().make(4096, 4096, 1)
    _little_memory(monkeypatch, 1.0)
    with pytest.raises(MemoryError, match=r"JointNet sampling of 1 image\(s\) at 4096×4096 px \(CFG doubles the "
                                          r"batch\) needs about [0-9.]+ GiB .*; 1.0 GiB is available\. Lower "
                                          r"width/height"):
        m.JDJointKSampler().sample(bundle, _cond(), _cond(seed=1), empty, "joint_generation", 0, 5, 3.0, "ddim",
                                   0.0, 1.0)
    assert stubs.bar_updates == 0 and stubs.checks == 0  # refused before any model call
    with pytest.raises(MemoryError, match=r"JointNet panorama sampling at 4096×4096 px \(view batch 4, plus the "
                                          r"whole-image view"):
        m.JDJointPanoramaSampler().sample(bundle, _cond(), _cond(seed=1), empty, "jointnet", 0, 5, 3.0, 512, 0,
                                          False, 4, 1.0)


def test_predictor_beyond_memory_is_refused(tmp_path, monkeypatch):
    m, stubs = load_node_module(monkeypatch, tmp_path, "predictor")
    make_checkpoint(str(stubs.models / "jointdiffusion_predictors" / "tiny"))
    (pred,) = m.JDPredictorLoader().load("tiny", "auto", True)
    img = synthetic_images(1, 40, 30).permute(0, 2, 3, 1)
    _little_memory(monkeypatch, 0.01)
    with pytest.raises(MemoryError, match=r"depth/normals prediction of 1 image\(s\) at 3072×4096 px needs about"):
        m.JDDepthNormalPredict().predict(pred, img, "depth", 4096, 1, 1, 0, "trailing", "per_image")


def test_tiled_sampling_checks_before_every_view_batch():
    calls = []

    def den(x, t, cond=None):
        calls.append(x.shape[0])
        return torch.zeros_like(x)
    den.alphas_cumprod = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    den.prediction_type = "epsilon"
    n = [0]

    def check():
        n[0] += 1
        if n[0] > 3:
            raise Interrupted()
    cfg = TiledConfig.multidiffusion(window=8, stride=4, view_batch=2)
    with pytest.raises(Interrupted):
        tiled_sample(den, torch.randn(1, 4, 8, 40), [900, 500], None, cfg, check=check)
    assert len(calls) == 3  # stopped before the 4th view batch of the first step (9 views, 5 batches)


def test_mesh_building_checks_between_stages():
    n = [0]

    def check():
        n[0] += 1
        if n[0] > 2:
            raise Interrupted()
    with pytest.raises(Interrupted):
        jm.rgbd_to_mesh(torch.rand(3, 32, 32), torch.rand(32, 32) + 0.5, check=check)
    ok = jm.rgbd_to_mesh(torch.rand(3, 32, 32), torch.rand(32, 32) + 0.5, check=lambda: None)[0]
    assert len(ok.faces) > 0
