import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from jointcore import diff2in1 as D
from jointcore import schedules as S
from jointcore.train_diff2in1 import main as cli
from tiny import tiny_text_encoder, tiny_unet, tiny_vae


# ---- EMA ---------------------------------------------------------------------------------------------

def _head(channels=(160, 96), task="depth", num_classes=None):
    return D.TaskHead(D.HeadConfig(task, list(channels), num_classes, width=16, upscale_steps=1))


def test_ema_update_matches_formula():
    c, e = _head(), _head()
    with torch.no_grad():
        for p in e.parameters():
            p.add_(torch.randn_like(p))
    before_c = {k: v.clone() for k, v in c.state_dict().items()}
    se = e.state_dict()
    D.ema_update(c, e, 0.9)
    for k, v in c.state_dict().items():
        torch.testing.assert_close(v, 0.9 * before_c[k] + 0.1 * se[k])
    with pytest.raises(ValueError, match="alpha"):
        D.ema_update(c, e, 1.0)


def test_ema_scheduler_fires_once_per_40_samples():
    s = D.EMAScheduler()
    assert (s.alpha, s.every) == (0.998, 40)
    fired = [s.consume(8) for _ in range(20)]  # 160 samples, batch 8 → every 5th step
    assert fired == [0, 0, 0, 0, 1] * 4
    s2 = D.EMAScheduler(every=40)
    assert s2.consume(100) == 2 and s2.consume(19) == 0 and s2.consume(1) == 1  # crossings at 40, 80, 120
    # step() applies exactly the due updates
    c, e = _head(), _head()
    w0 = c.out.weight.detach().clone()
    s3 = D.EMAScheduler(alpha=0.5, every=3)
    assert s3.step(c, e, 2) == 0 and torch.equal(c.out.weight, w0)
    assert s3.step(c, e, 1) == 1
    torch.testing.assert_close(c.out.weight, 0.5 * w0 + 0.5 * e.out.weight)
    with pytest.raises(ValueError, match="interval"):
        D.EMAScheduler(every=0)


# ---- features / heads ---------------------------------------------------------------------------------

def test_feature_extraction_shapes_per_resolution():
    unet = tiny_unet()
    ex = D.UNetFeatureExtractor(unet, S.alphas_cumprod())
    z = torch.randn(2, 4, 8, 8)
    emb = torch.randn(1, 3, 32)
    raw = ex.raw(z, emb)
    assert [n for n, _ in raw] == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]
    feats = ex(z, emb)
    # coarse → fine: 4×4 = down0 (32) + down1 (64) + mid (64); 8×8 = up0 (64) + up1 (32)
    assert [tuple(f.shape) for f in feats] == [(2, 160, 4, 4), (2, 96, 8, 8)]
    assert ex.channels((8, 8)) == [160, 96]
    assert not any(p.requires_grad for p in unet.parameters())
    # t > 0 noises the input, changing the features
    f_noisy = ex(z, emb, t=200, noise=torch.randn_like(z))
    assert (f_noisy[0] - feats[0]).abs().max() > 1e-4
    for task, ch in (("depth", 1), ("normals", 3), ("segmentation", 5)):
        head = _head(task=task, num_classes=5 if task == "segmentation" else None)
        y = head(feats, (64, 64))
        assert y.shape == (2, ch, 64, 64)
        if task == "normals":
            torch.testing.assert_close(y.norm(dim=1), torch.ones(2, 64, 64), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="feature channels"):
        _head(channels=(10, 96))(feats)


def test_fusion_is_eq9():
    fus = D.FeatureFusion([3, 2], 4)
    coarse, fine = torch.randn(1, 3, 2, 2), torch.randn(1, 2, 4, 4)
    out = fus([coarse, fine])
    up = torch.nn.functional.interpolate(coarse, size=(4, 4), mode="bilinear", align_corners=False)
    ref = fus.convs[0](torch.cat([up, fine], 1))
    assert len(out) == 1
    torch.testing.assert_close(out[0], ref)


def test_head_save_load_roundtrip(tmp_path):
    h = _head(task="segmentation", num_classes=4)
    D.save_head(h, str(tmp_path / "h"))
    h2 = D.load_head(str(tmp_path / "h"))
    feats = [torch.randn(1, 160, 4, 4), torch.randn(1, 96, 8, 8)]
    torch.testing.assert_close(h.eval()(feats), h2(feats))
    with pytest.raises(FileNotFoundError, match="head.safetensors"):
        os.remove(tmp_path / "h" / "head.safetensors")
        D.load_head(str(tmp_path / "h"))


def test_creation_timesteps_span_0_T():
    ts = D.creation_timesteps(600, 50)
    assert ts[0] == 600 and len(ts) == 50 and ts == sorted(ts, reverse=True) and ts[-1] >= 0
    with pytest.raises(ValueError, match="0 < T < 1000"):
        D.creation_timesteps(1000, 50)


# ---- tiny end-to-end ----------------------------------------------------------------------------------

def _toy_tokenizer(folder):
    from transformers import CLIPTokenizer
    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[ch], vocab[ch + "</w>"] = 3 + i, 40 + i
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="!",
                        model_max_length=8)
    return tok


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from diffusers import DDPMScheduler
    root = tmp_path_factory.mktemp("sd")
    tiny_unet().save_pretrained(str(root / "unet"))
    tiny_vae().save_pretrained(str(root / "vae"))
    tiny_text_encoder().save_pretrained(str(root / "text_encoder"))
    _toy_tokenizer(str(root / "tok_src")).save_pretrained(str(root / "tokenizer"))
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        str(root / "scheduler"))
    return str(root)


def _make_data(folder, n=4, size=32, task="depth"):
    os.makedirs(os.path.join(folder, "images"))
    os.makedirs(os.path.join(folder, "labels"))
    os.makedirs(os.path.join(folder, "captions"))
    rng = np.random.default_rng(0)
    for i in range(n):
        img = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(folder, "images", f"im{i}.png"))
        if task == "depth":
            np.save(os.path.join(folder, "labels", f"im{i}.npy"), img.mean(-1).astype(np.float32) / 255)
        if i % 2 == 0:
            with open(os.path.join(folder, "captions", f"im{i}.txt"), "w") as f:
                f.write("a cat")
    return folder


def test_end_to_end_warmup_create_self_improve(tiny_model, tmp_path):
    data = _make_data(str(tmp_path / "data"))
    common = ["--model", tiny_model, "--data", data, "--resolution", "32", "--batch-size", "2", "--cpu"]
    r = cli(["warmup", *common, "--task", "depth", "--out", str(tmp_path / "hw"), "--max-steps", "6",
             "--lr", "1e-2", "--width", "16", "--upscale-steps", "1"])
    assert len(r["losses"]) == 6 and all(np.isfinite(r["losses"]))
    head = D.load_head(str(tmp_path / "hw"))
    assert head.config.feature_channels == [160, 96] and head.config.task == "depth"

    r = cli(["create", *common, "--head", str(tmp_path / "hw"), "--out", str(tmp_path / "created"),
             "--T", "600", "--steps", "4", "--per-image", "1"])
    assert r["count"] == 4
    items, manifest = D.load_pairs(str(tmp_path / "created"))
    assert manifest["T"] == 600 and manifest["steps"] == 4 and len(items) == 4
    assert all(it.image.shape == (3, 32, 32) and it.label.shape == (1, 32, 32) for it in items)
    assert items[0].caption == "a cat" and items[1].caption == ""
    # created images differ from the sources (noised to T=600 and denoised)
    src = D.load_pair_folder(data, "depth")
    assert (items[0].image - src[0].image).abs().mean() > 1e-3
    # a created folder is also a valid input folder; create never overwrites
    assert len(D.load_pair_folder(str(tmp_path / "created"), "depth")) == 4
    with pytest.raises(SystemExit, match="already holds created pairs"):
        cli(["create", *common, "--head", str(tmp_path / "hw"), "--out", str(tmp_path / "created"), "--steps", "2"])

    r = cli(["self-improve", *common, "--head", str(tmp_path / "hw"), "--created", str(tmp_path / "created"),
             "--out", str(tmp_path / "hf"), "--max-steps", "6", "--synthetic-batch-size", "2", "--ema-every", "8",
             "--alpha", "0.5", "--lr", "1e-2"])
    # 6 steps × (2 real + 2 created) = 24 samples → 3 EMA updates
    assert r["samples"] == 24 and r["ema_updates"] == 3
    assert [s["ema_updates"] for s in r["log"]] == [0, 1, 0, 1, 0, 1]
    assert all("syn" in s and "sup" in s for s in r["log"])
    hc, he = D.load_head(str(tmp_path / "hf")), D.load_head(str(tmp_path / "hf" / "exploiter"))
    wc, we, ww = hc.out.weight, he.out.weight, head.out.weight
    assert (wc - ww).abs().max() > 0 and (wc - we).abs().max() > 0  # θC moved towards θE but is not θE


def test_save_load_pairs_and_malformed_folders(tmp_path):
    imgs, labels = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    f = D.save_pairs(str(tmp_path / "p"), imgs, labels, "normals", captions=["x", ""])
    items, man = D.load_pairs(f)
    assert [it.name for it in items] == ["created_00000", "created_00001"]
    torch.testing.assert_close(items[1].label, labels[1])
    assert (items[0].image - imgs[0]).abs().max() <= 1 / 255 + 1e-6
    with pytest.raises(FileExistsError, match="already holds"):
        D.save_pairs(f, imgs, labels, "normals")
    os.remove(os.path.join(f, "labels", "created_00001.npy"))
    with pytest.raises(FileNotFoundError, match="created_00001.npy"):
        D.load_pairs(f)
    with pytest.raises(ValueError, match="diff2in1_pairs.json is missing"):
        D.load_pairs(str(tmp_path))
    with open(os.path.join(f, D.MANIFEST), "w") as fh:
        fh.write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        D.load_pairs(f)
    seg = D.save_pairs(str(tmp_path / "s"), imgs, torch.randn(2, 4, 16, 16), "segmentation", num_classes=4)
    items, _ = D.load_pairs(seg)
    assert items[0].label.dtype == torch.long and items[0].label.shape == (16, 16)


@pytest.mark.parametrize("cmd", ["warmup", "create", "self-improve"])
def test_cli_rejects_malformed_data_folders(cmd, tmp_path, tiny_model):
    head_dir = str(tmp_path / "h")
    D.save_head(_head(), head_dir)
    created = D.save_pairs(str(tmp_path / "created"), torch.rand(2, 3, 32, 32), torch.rand(2, 1, 32, 32), "depth")
    extra = {"warmup": ["--task", "depth"], "create": ["--head", head_dir],
             "self-improve": ["--head", head_dir, "--created", created]}[cmd]
    base = [cmd, "--model", tiny_model, "--out", str(tmp_path / "o"), "--resolution", "32", *extra]
    with pytest.raises(SystemExit, match="does not exist"):
        cli([*base, "--data", str(tmp_path / "missing")])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no images/ sub-folder"):
        cli([*base, "--data", str(empty)])
    bad = _make_data(str(tmp_path / "bad"))
    os.remove(os.path.join(bad, "labels", "im2.npy"))
    if cmd == "create":  # create needs no labels, but a broken image is an error
        with open(os.path.join(bad, "images", "im1.png"), "wb") as fh:
            fh.write(b"not a png")
        with pytest.raises(SystemExit, match="cannot read image"):
            cli([*base, "--data", bad])
    else:
        with pytest.raises(SystemExit, match=r"have no label.*im2"):
            cli([*base, "--data", bad])
        np.save(os.path.join(bad, "labels", "im2.npy"), np.zeros((8, 8), np.float32))
        with pytest.raises(SystemExit, match="must have the same size"):
            cli([*base, "--data", bad])
    ok = _make_data(str(tmp_path / "ok"))
    with pytest.raises(SystemExit, match="multiple of 8"):
        cli([*[a if a != "32" else "30" for a in base], "--data", ok])
    if cmd == "self-improve":
        os.remove(os.path.join(created, D.MANIFEST))
        with pytest.raises(SystemExit, match="not a created-pairs folder"):
            cli([*base, "--data", ok])


def test_pair_folder_reads_the_world_layout_without_labels(tmp_path):
    from jointcore.data import world as W

    W.write_dataset(str(tmp_path / "w"), range(3), 32, supersample=1)
    items = D.load_pair_folder(str(tmp_path / "w"), "depth")
    assert len(items) == 3 and items[0].label.shape[-2:] == (32, 32)
    assert torch.isfinite(items[0].label).all() and (items[0].label > 0.3).all()  # metres, inside a room
    normals = D.load_pair_folder(str(tmp_path / "w"), "normals")
    assert normals[1].label.shape == (3, 32, 32)
    assert torch.allclose(normals[1].label.norm(dim=0), torch.ones(32, 32), atol=1e-4)
