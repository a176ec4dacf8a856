"""E2E fine-tuning: losses, LR schedule, a few real steps on the tiny model, reload of the result."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from jointcore import train_e2e as T
from jointcore.pairs import PairFolder, write_pair
from jointcore.predictor import load_predictor
from predictor_ckpt import make_checkpoint, synthetic_images


def test_lr_factor_warmup_then_exponential():
    f = [T.lr_factor(s, 10, 110, 0.01) for s in range(0, 120)]
    assert f[0] == 0 and math.isclose(f[5], 0.5) and math.isclose(f[10], 1.0)
    assert math.isclose(f[60], 0.1, rel_tol=1e-9)  # half-way through the decay: sqrt(0.01)
    assert math.isclose(f[110], 0.01) and f[119] == 0.01
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_ssi_l1_loss_is_affine_invariant_and_differentiable():
    gt = torch.rand(2, 1, 8, 8) * 5 + 1
    mask = torch.ones_like(gt, dtype=torch.bool)
    mask[:, :, 0] = False
    pred = (0.3 * gt - 2).requires_grad_(True)
    assert T.ssi_l1_loss(pred, gt, mask).item() < 1e-5
    noisy = (0.3 * gt - 2 + 0.1 * torch.randn_like(gt)).requires_grad_(True)
    loss = T.ssi_l1_loss(noisy, gt, mask)
    assert loss.item() > 1e-3
    loss.backward()
    assert torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0
    assert (noisy.grad[:, :, 0] == 0).all()  # masked pixels get no gradient
    assert T.ssi_l1_loss(pred, gt, torch.zeros_like(mask)).item() == 0


def test_angular_loss():
    n = torch.nn.functional.normalize(torch.randn(1, 3, 4, 4), dim=1)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert T.angular_loss(n, n, mask).item() < 1e-2
    x = torch.zeros(1, 3, 4, 4)
    x[:, 0] = 1
    y = torch.zeros(1, 3, 4, 4)
    y[:, 1] = 1
    assert math.isclose(T.angular_loss(x, y, mask).item(), math.pi / 2, rel_tol=1e-6)
    p = n.clone().requires_grad_(True)
    T.angular_loss(p, n, mask).backward()
    assert torch.isfinite(p.grad).all()


def _make_data(root, task, n=4, size=32):
    imgs = synthetic_images(n, size, size, seed=3)
    for i in range(n):
        rgb = imgs[i]
        if task == "depth":
            tgt = 1.0 + 4.0 * rgb[:1]  # depth is a function of the red channel: learnable
        else:
            tgt = torch.nn.functional.normalize(rgb * 2 - 1 + torch.tensor([0, 0, 1.0])[:, None, None], dim=0)
        write_pair(str(root), f"s{i}", rgb, tgt, task)
    return str(root)


@pytest.mark.parametrize("task", ["depth", "normals"])
def test_training_reduces_loss_and_saves_loadable_checkpoint(tmp_path, task):
    base, _ = make_checkpoint(str(tmp_path / "base"))
    data = _make_data(tmp_path / "data", task)
    out = str(tmp_path / "out")
    args = T.build_parser().parse_args([
        "--checkpoint", base, "--data", data, "--task", task, "--output", out, "--max-steps", "10",
        "--lr", "3e-3", "--final-lr-ratio", "1", "--warmup-steps", "1", "--batch-size", "2", "--grad-accum", "2", "--height", "32",
        "--width", "32", "--no-hflip", "--cpu", "--save-every", "5"])
    res = T.train(args, log=lambda *_: None)
    assert len(res["losses"]) == 10
    ds = T.E2EDataset(PairFolder(data, task), 32, 32, hflip=False)
    before = T.dataset_loss(load_predictor(base), ds, task)
    trained = load_predictor(out)  # the saved folder loads in the predictor
    after = T.dataset_loss(trained, ds, task)
    assert after < 0.95 * before, (before, after)  # tiny random VAE: depth learns slowly
    with open(os.path.join(out, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["timestep_spacing"] == "trailing"
    assert os.path.isfile(os.path.join(out, "model_index.json"))
    assert os.path.isdir(os.path.join(out, "checkpoint-5", "unet"))
    pred = trained.predict(synthetic_images(1, 40, 24), task, processing_resolution=0)
    assert pred.prediction.shape[-2:] == (40, 24)


def test_cli_errors_and_script_entry(tmp_path):
    rc = T.main(["--checkpoint", str(tmp_path / "x"), "--data", str(tmp_path / "nodata"), "--task", "depth",
                 "--output", str(tmp_path / "o"), "--cpu"])
    assert rc == 2
    with pytest.raises(ValueError, match="multiples of 8"):
        T.E2EDataset(PairFolder(_make_data(tmp_path / "d", "depth", n=1), "depth"), 30, 32)
    # runnable as a plain file (what `accelerate launch jointcore/train_e2e.py` executes)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, os.path.join(root, "jointcore", "train_e2e.py"), "--help"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and "--grad-accum" in r.stdout


def test_multi_res_noise_is_unit_variance_and_low_frequency_with_strength():
    g = torch.Generator().manual_seed(0)
    flat = T.multi_res_noise((64, 4, 16, 16), torch.zeros(64), g)
    pyr = T.multi_res_noise((64, 4, 16, 16), torch.full((64,), 0.9), g)
    assert abs(flat.std().item() - 1) < 1e-4 and abs(pyr.std().item() - 1) < 1e-4

    def neighbour_corr(x):
        a, b = x[..., :, :-1].flatten(), x[..., :, 1:].flatten()
        return torch.corrcoef(torch.stack([a, b]))[0, 1].item()

    assert abs(neighbour_corr(flat)) < 0.03      # strength 0 (t = 0 after annealing): white noise
    assert neighbour_corr(pyr) > 0.3             # pyramid noise is spatially correlated


def test_percentile_normalise_is_affine_invariant_and_ignores_invalid():
    d = torch.rand(2, 1, 16, 16) * 3 + 1
    m = torch.ones_like(d, dtype=torch.bool)
    m[:, :, :2] = False
    d2 = d.clone()
    d2[:, :, :2] = 1e6  # invalid pixels do not move the percentiles
    a, b = T.percentile_normalise(d, m), T.percentile_normalise(5 * d2 + 7, m)
    assert torch.allclose(a[m], b[m], atol=1e-5)
    assert a.min() >= -1 and a.max() <= 1
    v = a[0][m[0]]
    assert abs((v <= -1 + 1e-6).float().mean().item() - 0.02) < 0.02


@pytest.mark.parametrize("task", ["depth", "normals"])
def test_marigold_objective_trains_and_sets_multistep_default(tmp_path, task):
    base, _ = make_checkpoint(str(tmp_path / "base"))
    data = _make_data(tmp_path / "data", task)
    out = str(tmp_path / "out")
    pred = load_predictor(base)
    emb = T.padded_empty_embedding(pred, "max_length")
    ds = T.E2EDataset(PairFolder(data, task), 32, 32, hflip=False)
    batch = {k: torch.stack([ds[i][k] for i in range(len(ds))]) for k in ("rgb", "target", "mask")}

    def mean_loss(p):
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            return sum(T.marigold_loss(p, batch, task, emb, g).item() for _ in range(8)) / 8

    before = mean_loss(pred)
    T.train(T.build_parser().parse_args([
        "--checkpoint", base, "--data", data, "--task", task, "--output", out, "--objective", "marigold",
        "--max-steps", "12", "--lr", "3e-3", "--final-lr-ratio", "1", "--warmup-steps", "1", "--batch-size", "4",
        "--grad-accum", "1", "--height", "32", "--width", "32", "--no-hflip", "--cpu"]), log=lambda *_: None)
    trained = load_predictor(out)
    assert mean_loss(trained) < 0.9 * before
    with open(os.path.join(out, "model_index.json")) as f:
        assert json.load(f)["default_denoising_steps"] == 4
    with open(os.path.join(out, "loss_log.jsonl")) as f:
        assert len(f.readlines()) == 12
