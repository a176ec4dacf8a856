import json
import os

import numpy as np
import pytest
import torch

from jointcore import schedules as S
from jointcore.joint_sampling import encode_depth, encode_image
from jointcore.jointnet import JointNet
from jointcore.train_jointnet import RGBDDataset, joint_loss, main, random_masks, scan_dataset
from tiny import tiny_text_encoder, tiny_unet, tiny_vae


def _tokenizer(path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[ch] = 3 + i
        vocab[ch + "</w>"] = 40 + i
    os.makedirs(path, exist_ok=True)
    json.dump(vocab, open(os.path.join(path, "vocab.json"), "w"))
    open(os.path.join(path, "merges.txt"), "w").write("#version: 0.2\n")
    tok = CLIPTokenizer(os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt"), pad_token="!",
                        model_max_length=8)
    tok.save_pretrained(path)
    return tok


def _sd_folder(root):
    tiny_unet().save_pretrained(os.path.join(root, "unet"))
    tiny_vae().save_pretrained(os.path.join(root, "vae"))
    tiny_text_encoder().save_pretrained(os.path.join(root, "text_encoder"))
    _tokenizer(os.path.join(root, "tokenizer"))
    return root


def _dataset(root, n=4, size=40):
    from PIL import Image

    rng = np.random.default_rng(0)
    for d in ("images", "depth", "captions"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        depth = (yy * (0.5 + 0.1 * i) + 0.2 * xx).clip(0, 1)
        img = np.stack([depth, 1 - depth, rng.random((size, size)) * 0.2], -1)
        Image.fromarray((img * 255).astype(np.uint8)).save(os.path.join(root, "images", f"s{i}.png"))
        Image.fromarray((depth * 65535).astype(np.uint16)).save(os.path.join(root, "depth", f"s{i}.png"))
        open(os.path.join(root, "captions", f"s{i}.txt"), "w").write(["a cat", "a dog", "sky", ""][i % 4])
    return root


def test_dataset_reading_and_malformed_folders(tmp_path):
    d = _dataset(str(tmp_path / "data"), n=2)
    ds = RGBDDataset(d, resolution=32)
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["depth"].shape == (1, 32, 32)
    assert 0.0 <= float(item["depth"].min()) and float(item["depth"].max()) <= 1.0
    assert float(item["depth"].max()) > 0.5  # 16-bit PNG read as /65535, not clipped to 1/255 steps
    os.remove(os.path.join(d, "depth", "s1.png"))
    with pytest.raises(ValueError, match="depth/s1.png"):
        scan_dataset(d)
    os.remove(os.path.join(d, "captions", "s0.txt"))
    with pytest.raises(ValueError, match="captions/s0.txt"):
        scan_dataset(d)
    os.makedirs(tmp_path / "empty" / "images")
    with pytest.raises(ValueError, match="lacks depth/, captions/"):
        scan_dataset(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError):
        scan_dataset(str(tmp_path / "nothing"))


def _eval_loss(model, lat, emb):
    ab = S.alphas_cumprod()
    g = torch.Generator().manual_seed(123)
    t = torch.tensor([50, 300, 600, 900])
    with torch.no_grad():
        tot, per = joint_loss(model, lat, emb, ab, "epsilon", g, 0.0, t=t)
    return per


def test_stage1_trains_dense_branch_only_and_reloads(tmp_path):
    sd = _sd_folder(str(tmp_path / "sd"))
    data = _dataset(str(tmp_path / "data"))
    out = str(tmp_path / "out")
    # fixed evaluation batch (same latents / text / noise / timesteps before and after)
    vae = tiny_vae()
    ds = RGBDDataset(data, 32)
    imgs = torch.stack([ds[i]["image"] for i in range(4)])
    deps = torch.stack([ds[i]["depth"] for i in range(4)])
    lat = torch.cat([encode_image(vae, imgs), encode_depth(vae, deps)], 1)
    emb = torch.zeros(4, 8, 32)
    base = JointNet.from_unet(tiny_unet())
    before = _eval_loss(base, lat, emb)

    losses = main(["--pretrained", sd, "--data", data, "--output", out, "--stage", "1", "--steps", "30",
                   "--lr", "2e-3", "--warmup", "2", "--batch-size", "2", "--resolution", "32", "--log-every", "0",
                   "--save-format", "bin"])
    assert len(losses) == 30 and all(np.isfinite(losses))
    trained = JointNet.from_pretrained(out)
    assert os.path.isfile(os.path.join(out, "jointnet", "diffusion_pytorch_model.bin"))
    after = _eval_loss(trained, lat, emb)
    print("eval loss before", before.tolist(), "after", after.tolist())
    assert float(after[1]) < 0.9 * float(before[1])  # dense-branch loss falls
    # every RGB-branch UNet parameter is bit-identical; the exchange layers did train
    ref = tiny_unet().state_dict()
    rgb = trained.rgb.state_dict()
    for k, v in ref.items():
        assert torch.equal(rgb[k], v), k
    assert any(float(p.detach().abs().max()) > 0 for p in trained.exchange_parameters())
    dense = trained.dense.state_dict()
    assert any(not torch.equal(dense[k], v) for k, v in ref.items())


def test_stage3_adds_mask_conditioning(tmp_path):
    sd = _sd_folder(str(tmp_path / "sd"))
    data = _dataset(str(tmp_path / "data"), n=2)
    init = str(tmp_path / "init")
    JointNet.from_unet(tiny_unet()).save_pretrained(init)
    out = str(tmp_path / "out3")
    with pytest.raises(ValueError, match="--init-jointnet"):
        main(["--pretrained", sd, "--data", data, "--output", out, "--stage", "2", "--steps", "1"])
    losses = main(["--pretrained", sd, "--data", data, "--output", out, "--stage", "3", "--init-jointnet", init,
                   "--steps", "3", "--warmup", "1", "--batch-size", "2", "--resolution", "32", "--log-every", "0",
                   "--save-every", "2", "--gradient-checkpointing", "--inpaint-probs", "1,1,1,1"])
    assert len(losses) == 3
    assert JointNet.from_pretrained(os.path.join(out, "checkpoint-2")).has_masked_latent_input
    with pytest.raises(ValueError, match="inpaint-probs"):
        main(["--pretrained", sd, "--data", data, "--output", out, "--stage", "3", "--init-jointnet", init,
              "--inpaint-probs", "1,2"])
    jm = JointNet.from_pretrained(out)
    assert jm.has_masked_latent_input
    assert float(jm.rgb.jointnet_masked_latent_conv.weight.abs().max()) > 0  # trained from zero
    m_r, m_d = random_masks(64, 4, 4, (0, 1, 0, 0), torch.Generator().manual_seed(0))
    assert float(m_r.max()) == 0 and float(m_d.min()) == 1


def test_metric_depth_npy_read_as_disparity(tmp_path):
    """The procedural world writes metric depth (.npy, metres); JointNet trains on disparity (near bright)."""
    from jointcore.train_jointnet import load_depth

    d = np.array([[1.0, 2.0], [4.0, 4.0]], np.float32)
    np.save(tmp_path / "d.npy", d)
    disp = load_depth(str(tmp_path / "d.npy"), "disparity")[0]
    ref = (1 / d - 0.25) / (1.0 - 0.25)  # 1/d min-max normalised
    assert torch.allclose(disp, torch.from_numpy(ref))
    assert disp[0, 0] == 1 and disp[1, 1] == 0  # nearest bright, farthest dark
    plain = load_depth(str(tmp_path / "d.npy"))[0]
    assert plain[0, 0] == 0 and plain[1, 1] == 1
    np.save(tmp_path / "z.npy", np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="z.npy"):
        load_depth(str(tmp_path / "z.npy"), "disparity")
