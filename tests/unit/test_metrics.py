"""Depth / normal metrics, the pair-folder layout and the evaluation CLI."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from jointcore import metrics as M
from jointcore.pairs import PairFolder, write_pair


def test_lstsq_recovers_scale_shift_ignoring_masked_pixels():
    g = torch.rand(2, 1, 8, 8) + 0.5
    p = (g - 0.3) / 2.5
    mask = torch.ones_like(g, dtype=torch.bool)
    mask[:, :, :2] = False
    p_bad = p.clone()
    p_bad[:, :, :2] = 100.0  # outliers outside the mask
    g_bad = g.clone()
    g_bad[:, :, :2] = float("nan")
    s, b = M.lstsq_scale_shift(p_bad, g_bad, mask)
    torch.testing.assert_close(s, torch.full((2,), 2.5, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(b, torch.full((2,), 0.3, dtype=torch.float64), atol=1e-6, rtol=0)
    # singular: constant prediction → identity
    s, b = M.lstsq_scale_shift(torch.ones(1, 4), torch.rand(1, 4))
    assert s.item() == 1 and b.item() == 0


def test_depth_metrics_by_hand():
    gt = torch.tensor([1.0, 2.0, 4.0, 8.0]).reshape(1, 1, 2, 2)
    pred = torch.tensor([1.0, 2.0, 4.0, 10.0]).reshape(1, 1, 2, 2)
    m = M.depth_metrics(pred, gt, align=False, max_depth=20)
    assert math.isclose(m["abs_rel"].item(), 0.25 / 4)
    assert math.isclose(m["delta1"].item(), 0.75)  # ratio exactly 1.25 is not < 1.25
    # default range = the image's largest GT: 10 is clipped to 8
    m = M.depth_metrics(pred, gt, align=False)
    assert m["abs_rel"].item() == 0 and m["delta1"].item() == 1
    # an affine copy is perfect after alignment, not before
    aff = 0.1 * gt + 3
    assert M.depth_metrics(aff, gt)["abs_rel"].item() < 1e-6
    assert M.depth_metrics(aff, gt, align=False, max_depth=20)["abs_rel"].item() > 0.3


def test_depth_metrics_valid_mask_and_errors():
    gt = torch.tensor([[1.0, 2.0], [0.0, float("nan")]]).reshape(1, 1, 2, 2)
    pred = torch.tensor([[1.0, 2.0], [50.0, -7.0]]).reshape(1, 1, 2, 2)
    m = M.depth_metrics(pred, gt, align=False)
    assert m["valid"].item() == 2 and m["abs_rel"].item() == 0
    extra = torch.tensor([[True, False], [True, True]]).reshape(1, 1, 2, 2)
    assert M.depth_metrics(pred, gt, extra, align=False)["valid"].item() == 1
    with pytest.raises(ValueError, match="no valid"):
        M.depth_metrics(pred, torch.zeros_like(gt))
    with pytest.raises(ValueError, match="differ in shape"):
        M.depth_metrics(pred, gt[..., :1])


def _rotate_about_z(n, deg):
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    x, y, z = n[:, 0], n[:, 1], n[:, 2]
    return torch.stack([c * x - s * y, s * x + c * y, z], 1)


def test_normal_metrics_known_angles():
    gt = torch.zeros(1, 3, 4, 4)
    gt[:, 0] = 1.0  # all +x, rotation about z changes the angle exactly
    pred = gt.clone()
    pred[..., :2, :] = _rotate_about_z(gt[..., :2, :], 10)
    pred[..., 2:, :] = _rotate_about_z(gt[..., 2:, :], 40)
    r = M.normal_metrics(pred * 3.0, gt)  # scale does not matter
    assert math.isclose(r["mean_deg"], 25.0, abs_tol=1e-6)
    assert math.isclose(r["median_deg"], 10.0, abs_tol=1e-6)
    assert math.isclose(r["pct_under_11.25"], 50.0)
    assert math.isclose(r["pct_under_22.5"], 50.0)
    assert math.isclose(r["pct_under_30"], 50.0)
    # zero GT vectors are unlabelled and ignored; the 40° half removed by a mask
    gt2 = gt.clone()
    gt2[..., 0, :] = 0
    assert M.normal_errors(pred, gt2).numel() == 12
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[:, :2] = True
    assert math.isclose(M.normal_metrics(pred, gt, mask)["mean_deg"], 10.0, abs_tol=1e-6)
    with pytest.raises(ValueError, match="no valid"):
        M.normal_metrics(pred, torch.zeros_like(gt))
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        M.angular_error_deg(pred[:, :2], gt[:, :2])


# ---- pair folders and the evaluation CLI ---------------------------------------------------------------

def _make_depth_folder(root, n=2, h=32, w=32):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        rgb = torch.rand(3, h, w, generator=g)
        depth = torch.rand(1, h, w, generator=g) * 5 + 0.5
        depth[:, 0, 0] = 0  # invalid
        write_pair(str(root), f"img{i}", rgb, depth, "depth")
    return str(root)


def test_pair_folder_reads_npy_png_and_masks(tmp_path):
    from PIL import Image
    root = _make_depth_folder(tmp_path / "d", n=2)
    os.makedirs(os.path.join(root, "mask"))
    m = np.ones((32, 32), np.uint8) * 255
    m[:4] = 0
    Image.fromarray(m).save(os.path.join(root, "mask", "img0.png"))
    # a 16-bit PNG depth (millimetres) for a third image
    Image.fromarray(np.full((32, 32), 1234, np.uint16)).save(os.path.join(root, "depth", "img2.png"))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(os.path.join(root, "rgb", "img2.jpg"))
    pf = PairFolder(root, "depth")
    assert pf.names == ["img0", "img1", "img2"]
    p0 = pf[0]
    assert p0.rgb.shape == (3, 32, 32) and p0.target.shape == (1, 32, 32)
    assert not p0.mask[0, 0, 0] and not p0.mask[0, :4].any() and p0.mask[0, 4:, 1:].all()
    assert torch.allclose(pf[2].target, torch.full((1, 32, 32), 1.234))
    # normals from an 8-bit PNG: 255 → +1, 0 → −1, black = unlabelled
    os.makedirs(os.path.join(root, "normals"))
    a = np.zeros((32, 32, 3), np.uint8)
    a[..., 2] = 255
    a[..., 0] = 128
    a[..., 1] = 128
    a[0, 0] = 0
    for nm in ("img0", "img1", "img2"):
        Image.fromarray(a).save(os.path.join(root, "normals", f"{nm}.png"))
    pn = PairFolder(root, "normals")[1]
    assert pn.target.shape == (3, 32, 32) and abs(pn.target[2, 5, 5].item() - 1) < 1e-6
    assert not pn.mask[0, 0, 0] and pn.mask[0, 1, 1]


def test_pair_folder_rejects_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PairFolder(str(tmp_path / "none"), "depth")
    os.makedirs(tmp_path / "a" / "rgb")
    with pytest.raises(FileNotFoundError, match="depth/"):
        PairFolder(str(tmp_path / "a"), "depth")
    os.makedirs(tmp_path / "a" / "depth")
    with pytest.raises(FileNotFoundError, match="no images"):
        PairFolder(str(tmp_path / "a"), "depth")
    root = _make_depth_folder(tmp_path / "b", n=2)
    os.remove(os.path.join(root, "depth", "img1.npy"))
    with pytest.raises(FileNotFoundError, match="img1"):
        PairFolder(root, "depth")
    root = _make_depth_folder(tmp_path / "c", n=1)
    np.save(os.path.join(root, "depth", "img0.npy"), np.ones((16, 16), np.float32))
    with pytest.raises(ValueError, match="different sizes"):
        PairFolder(root, "depth")[0]
    with pytest.raises(ValueError, match="task"):
        PairFolder(root, "albedo")


def test_evaluate_cli(tmp_path, capsys):
    from jointcore.cli import evaluate as E
    from predictor_ckpt import make_checkpoint
    ckpt, _ = make_checkpoint(str(tmp_path / "ck"))
    root = _make_depth_folder(tmp_path / "d", n=2)
    out_json = str(tmp_path / "res.json")
    rc = E.main(["--checkpoint", ckpt, "--data", root, "--task", "depth", "--processing-resolution", "0",
                 "--device", "cpu", "--json", out_json])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["images"] == 2 and 0 <= printed["delta1"] <= 1 and printed["abs_rel"] > 0
    full = json.load(open(out_json))
    assert [p["name"] for p in full["per_image"]] == ["img0", "img1"]
    # normals on GT = the model's own prediction → zero error (checks the whole evaluation path)
    from jointcore.predictor import load_predictor
    pred = load_predictor(ckpt)
    nroot = str(tmp_path / "n")
    pf = PairFolder(root, "depth")
    for i in range(len(pf)):
        rgb = pf[i].rgb
        n = pred.predict(rgb[None], "normals", processing_resolution=0).prediction[0]
        write_pair(nroot, pf.names[i], rgb, n, "normals")
    res = E.evaluate(pred, PairFolder(nroot, "normals"), processing_resolution=0)
    assert res["summary"]["mean_deg"] < 0.1 and res["summary"]["pct_under_11.25"] == 100.0
    flipped = E.evaluate(pred, PairFolder(nroot, "normals"), processing_resolution=0, flip_normals_x=True)
    assert flipped["summary"]["mean_deg"] > 1.0
    # malformed folder → exit code 2 with a message
    rc = E.main(["--checkpoint", ckpt, "--data", str(tmp_path / "missing"), "--task", "depth"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_pair_folder_reads_the_world_layout(tmp_path):
    """The procedural world writes images/ (not rgb/) with depth/*.npy and normals/*.npy beside it."""
    from jointcore.data import world as W
    from jointcore.pairs import PairFolder

    W.write_dataset(str(tmp_path / "w"), range(3), 32, supersample=1)
    d = PairFolder(str(tmp_path / "w"), "depth")
    n = PairFolder(str(tmp_path / "w"), "normals")
    assert len(d) == len(n) == 3
    p = d[0]
    assert p.rgb.shape == (3, 32, 32) and p.mask.all() and (p.target > 0).all()
    q = n[1]
    assert torch.allclose(q.target.norm(dim=0), torch.ones(32, 32), atol=1e-4)
