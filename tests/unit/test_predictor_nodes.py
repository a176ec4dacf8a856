"""nodes/predictor.py against stub comfy / folder_paths modules (no ComfyUI needed), plus the vis helpers."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

from comfy_stubs import Interrupted, load_node_module
from jointcore import predictor_vis as V
from predictor_ckpt import make_checkpoint, synthetic_images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def comfy_stubs(tmp_path, monkeypatch):
    mod, stubs = load_node_module(monkeypatch, tmp_path, "predictor")
    yield mod, stubs, tmp_path


def test_nodes_end_to_end(comfy_stubs):
    mod, state, tmp = comfy_stubs
    models = tmp / "models" / "jointdiffusion_predictors"
    os.makedirs(models / "not_a_model" / "stuff")
    make_checkpoint(str(models / "tiny-e2e"))
    it = mod.JDPredictorLoader.INPUT_TYPES()["required"]
    assert it["model"][0] == ["tiny-e2e"]  # only folders with unet/
    (pred,) = mod.JDPredictorLoader().load("tiny-e2e", "auto", True)
    assert pred.dtype == torch.float32

    img = synthetic_images(2, 37, 29).permute(0, 2, 3, 1)  # ComfyUI IMAGE [B,H,W,C]
    node = mod.JDDepthNormalPredict()
    image, raw, unc, unc_raw = node.predict(pred, img, "depth", 0, 2, 2, 0, "trailing", "per_image")
    nan_img = torch.full_like(img, float("nan"))    # an all-NaN image used to give a flat depth map, saved as valid
    with pytest.raises(ValueError, match="input 'image' has .* NaN"):
        node.predict(pred, nan_img, "depth", 0, 1, 1, 0, "trailing", "per_image")
    assert image.shape == (2, 37, 29, 3) and torch.equal(image[..., 0], image[..., 2])
    # defaults: official preprocessing, zero init → two identical members, zero uncertainty
    assert unc.shape == (2, 37, 29, 3) and unc.abs().max() == 0 and unc_raw["task"] == "uncertainty"
    assert raw["task"] == "depth" and raw["data"].shape == (2, 1, 37, 29)
    torch.testing.assert_close(image[..., 0], raw["data"][:, 0])
    assert state.bar_updates == 4  # steps × ensemble
    nimg, nraw, _, _ = node.predict(pred, img, "normals", 0, 1, 1, 0, "trailing", "per_image")
    # official: n/(|n|+1e-5), antialiased resize back without renormalising (37×29 → 32×24 decode → 37×29)
    lengths = nraw["data"].norm(dim=1)
    assert lengths.max() <= 1 + 1e-6 and lengths.min() < 0.9
    _, draw, _, _ = node.predict(pred, img, "normals", 0, 1, 1, 0, "trailing", "per_image", "median", "diffusers")
    torch.testing.assert_close(draw["data"].norm(dim=1), torch.ones(2, 37, 29), atol=1e-5, rtol=0)  # renormalised
    torch.testing.assert_close(nimg, ((nraw["data"] + 1) / 2).permute(0, 2, 3, 1).clamp(0, 1))

    # interruption from ComfyUI stops the run
    state.interrupt_after = state.checks + 2
    with pytest.raises(Interrupted):
        node.predict(pred, img, "depth", 0, 5, 1, 0, "trailing", "per_image")
    state.interrupt_after = None

    (col,) = mod.JDDepthColorize().colorize(image, "viridis", False)
    (inv,) = mod.JDDepthColorize().colorize(image, "grey", True)
    assert col.shape == image.shape and not torch.equal(col[..., 0], col[..., 1])
    torch.testing.assert_close(inv, 1 - image)
    (vis,) = mod.JDNormalsVisualize().visualize(nraw, True, False, False)
    torch.testing.assert_close(vis[..., 0], 1 - nimg[..., 0], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="normals"):
        mod.JDNormalsVisualize().visualize(raw, False, False, False)

    saver = mod.JDSaveRawPrediction()
    r1 = saver.save(raw, "depth/run", "png16+npy")
    r2 = saver.save(raw, "depth/run", "png16")
    out = tmp / "output" / "depth"
    assert sorted(os.listdir(out)) == ["run_00001.npy", "run_00001.png", "run_00002.npy", "run_00002.png",
                                       "run_00003.png", "run_00004.png"]
    assert [x["filename"] for x in r1["ui"]["images"] + r2["ui"]["images"]] == [
        "run_00001.png", "run_00002.png", "run_00003.png", "run_00004.png"]
    from PIL import Image
    with Image.open(out / "run_00001.png") as im:
        a = np.asarray(im).astype(np.float64) / 65535
    np.testing.assert_allclose(a, raw["data"][0, 0].numpy(), atol=1 / 65535)
    np.testing.assert_allclose(np.load(out / "run_00002.npy"), raw["data"][1, 0].numpy())
    saver.save(nraw, "n", "npy")
    assert np.load(tmp / "output" / "n_00001.npy").shape == (37, 29, 3)
    with pytest.raises(ValueError, match="outside"):
        saver.save(raw, "../escape", "npy")


def test_predict_node_options_and_uncertainty(comfy_stubs):
    """preprocessing / init / reductions reach the library; the uncertainty outputs; checkpoint defaults."""
    import json
    from jointcore.predictor import load_predictor
    mod, state, tmp = comfy_stubs
    folder = tmp / "models" / "jointdiffusion_predictors" / "tiny"
    make_checkpoint(str(folder))
    with open(folder / "model_index.json") as f:
        mi = json.load(f)
    mi.update(default_denoising_steps=2, default_processing_resolution=24)
    with open(folder / "model_index.json", "w") as f:
        json.dump(mi, f)
    (pred,) = mod.JDPredictorLoader().load("tiny", "fp32", True)
    it = mod.JDDepthNormalPredict.INPUT_TYPES()
    assert it["optional"]["preprocessing"][1]["default"] == "official" and it["optional"]["init"][0] == ["zeros",
                                                                                                        "gaussian"]
    assert "auto" in it["required"]["spacing"][0] and it["required"]["steps"][1]["min"] == 0
    assert it["required"]["processing_resolution"][1]["min"] == -1
    img = synthetic_images(1, 30, 26, seed=2)
    ref = load_predictor(str(folder))
    node = mod.JDDepthNormalPredict()
    bars = state.bar_updates
    image, raw, unc, unc_raw = node.predict(pred, img.permute(0, 2, 3, 1), "depth", -1, 0, 3, 5, "auto", "per_image",
                                            "mean", "diffusers", "gaussian", "closest")
    assert state.bar_updates - bars == 2 * 3  # the checkpoint's 2 steps × 3 members
    want = ref.predict(img, "depth", processing_resolution=24, steps=2, ensemble_size=3, seed=5, reduction="mean",
                       preprocessing="diffusers", init="gaussian")
    torch.testing.assert_close(raw["data"], want.prediction, atol=0, rtol=0)
    torch.testing.assert_close(unc_raw["data"], want.uncertainty, atol=0, rtol=0)
    assert unc_raw["of"] == "depth" and unc_raw["data"].max() > 0
    peak = unc_raw["data"].amax()
    torch.testing.assert_close(unc[..., 0], unc_raw["data"][:, 0] / peak)  # IMAGE: scaled to the maximum
    _, nraw, nunc, nunc_raw = node.predict(pred, img.permute(0, 2, 3, 1), "normals", 0, 1, 3, 5, "trailing",
                                           "per_image", "median", "official", "gaussian", "mean")
    want = ref.predict(img, "normals", processing_resolution=0, ensemble_size=3, seed=5, reduction="mean",
                       init="gaussian")
    torch.testing.assert_close(nraw["data"], want.prediction, atol=0, rtol=0)
    assert 0 < nunc_raw["data"].max() <= 1 and nunc.shape == (1, 30, 26, 3)
    saved = mod.JDSaveRawPrediction().save(unc_raw, "u", "png16")  # uncertainty: grey like depth
    assert saved["ui"]["images"][0]["filename"] == "u_00001.png"


def _read_png16_rgb(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        n = int.from_bytes(data[pos:pos + 4], "big")
        tag = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            ihdr = body
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    w, h = int.from_bytes(ihdr[:4], "big"), int.from_bytes(ihdr[4:8], "big")
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * 6)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].copy().view(">u2").reshape(h, w, 3).astype(np.uint16), ihdr[8], ihdr[9]


def test_png16_writer_grey_and_rgb(tmp_path):
    g = np.arange(0, 65535, 997, dtype=np.uint16)[:60].reshape(6, 10)
    V.write_png16(str(tmp_path / "g.png"), g)
    from PIL import Image
    with Image.open(tmp_path / "g.png") as im:
        assert np.array_equal(np.asarray(im).astype(np.uint16), g)
    rgb = np.random.default_rng(0).integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    V.write_png16(str(tmp_path / "c.png"), rgb)
    back, depth, ctype = _read_png16_rgb(str(tmp_path / "c.png"))
    assert depth == 16 and ctype == 2 and np.array_equal(back, rgb)
    with pytest.raises(ValueError, match="uint16"):
        V.write_png16(str(tmp_path / "x.png"), g.astype(np.float32))


def test_colorize_and_normals_helpers():
    d = torch.linspace(0, 1, 16).reshape(1, 1, 4, 4)
    grey = V.colorize_depth(d)
    assert grey.shape == (1, 3, 4, 4) and torch.equal(grey[:, 0], d[:, 0])
    vir = V.colorize_depth(d, "viridis")
    assert torch.allclose(V.colorize_depth(d, "viridis", near_bright=True), V.colorize_depth(1 - d, "viridis"))
    assert vir[0, :, 0, 0].tolist() != vir[0, :, -1, -1].tolist()
    with pytest.raises(ValueError, match="colour map"):
        V.colorize_depth(d, "nope")
    with pytest.raises(ValueError, match=r"\[B,1,H,W\]"):
        V.colorize_depth(d.expand(1, 3, 4, 4))
    n = torch.nn.functional.normalize(torch.randn(1, 3, 2, 2), dim=1)
    f = V.flip_normals(n, flip_y=True)
    assert torch.equal(f[:, 1], -n[:, 1]) and torch.equal(f[:, 0], n[:, 0])
    assert V.normals_to_rgb(n).min() >= 0 and V.normals_to_rgb(n).max() <= 1


def test_hub_named_folders_load_by_the_workflows_flat_names(comfy_stubs):
    """A folder stored as downloaded (``GonzaloMG/marigold-e2e-ft-depth``, the README's name) is also offered and
    loaded by its own name (the shipped workflows'); two owners with the same name are ambiguous; a missing
    folder's message says what was looked for, where, and what is there."""
    mod, state, tmp = comfy_stubs
    models = tmp / "models" / "jointdiffusion_predictors"
    make_checkpoint(str(models / "GonzaloMG" / "marigold-e2e-ft-depth"))
    names = mod.JDPredictorLoader.INPUT_TYPES()["required"]["model"][0]
    assert names == ["GonzaloMG/marigold-e2e-ft-depth", "marigold-e2e-ft-depth"]
    (a,) = mod.JDPredictorLoader().load("marigold-e2e-ft-depth", "auto", True)
    (b,) = mod.JDPredictorLoader().load("GonzaloMG/marigold-e2e-ft-depth", "auto", True)
    assert a.unet.config.in_channels == b.unet.config.in_channels == 8
    with pytest.raises(FileNotFoundError, match=r"'marigold-e2e-ft-normals' not found .*looked for "
                                                r"'marigold-e2e-ft-normals' and <owner>/.*found there: "
                                                r".*'GonzaloMG/marigold-e2e-ft-depth'"):
        mod.JDPredictorLoader().load("marigold-e2e-ft-normals", "auto", True)
    make_checkpoint(str(models / "someone" / "marigold-e2e-ft-depth"))
    import time
    time.sleep(0.01)
    common = __import__(mod.__name__.rsplit(".", 1)[0] + ".common", fromlist=["x"])
    common._LIST_CACHE.clear()
    names = mod.JDPredictorLoader.INPUT_TYPES()["required"]["model"][0]
    assert "marigold-e2e-ft-depth" not in names  # no longer unique: only the full names are offered
    with pytest.raises(FileNotFoundError, match="ambiguous.*GonzaloMG/marigold-e2e-ft-depth.*someone/"):
        mod.JDPredictorLoader().load("marigold-e2e-ft-depth", "auto", True)
