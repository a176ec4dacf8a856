"""The family's training CLIs (TAESD autoencoder, text-to-image UNet) and the checkpoint key layout."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from jointcore.family import assemble as A
from jointcore.training import train_t2i as T
from jointcore.training import train_taesd as V

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _image_folder(root, n=24, size=32, seed=0):
    """Blocky two-colour images with one-word captions naming the colour of the block."""
    rng = np.random.default_rng(seed)
    names = {"red": (220, 30, 30), "blue": (30, 40, 220), "green": (30, 200, 40)}
    os.makedirs(os.path.join(root, "images"))
    os.makedirs(os.path.join(root, "captions"))
    for i in range(n):
        a = np.full((size, size, 3), 128, np.uint8)
        name = list(names)[i % 3]
        y, x = rng.integers(0, size // 2, 2)
        a[y:y + size // 2, x:x + size // 2] = names[name]
        Image.fromarray(a).save(os.path.join(root, "images", f"s{i:04d}.png"))
        with open(os.path.join(root, "captions", f"s{i:04d}.txt"), "w") as f:
            f.write(f"a {name} block")
    return root


def test_unet_keys_cover_the_family_layout_and_a_two_level_layout():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        fam = UNet2DConditionModel(**T.unet_config())
    ldm = A.unet_to_ldm({k: k for k in fam.state_dict()}, dict(fam.config))
    assert len(ldm) == len(fam.state_dict())  # every key renamed, none merged
    assert ldm["input_blocks.0.0.weight"] == "conv_in.weight"
    assert ldm["input_blocks.1.1.proj_in.weight"] == "down_blocks.0.attentions.0.proj_in.weight"
    assert ldm["middle_block.2.out_layers.3.weight"] == "mid_block.resnets.1.conv2.weight"
    assert ldm["output_blocks.1.0.skip_connection.weight"] == "up_blocks.0.resnets.1.conv_shortcut.weight"
    assert ldm["out.2.bias"] == "conv_out.bias"
    assert not any(k.startswith("input_blocks.2") for k in ldm)  # one level: no down-sampler
    assert sum(p.numel() for p in fam.parameters()) == pytest.approx(25.8e6, rel=0.01)
    with torch.device("meta"):
        two = UNet2DConditionModel(sample_size=8, block_out_channels=(32, 64), layers_per_block=2,
                                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                   norm_num_groups=8, attention_head_dim=4)
    ldm2 = A.unet_to_ldm({k: k for k in two.state_dict()}, dict(two.config))
    assert ldm2["input_blocks.3.0.op.weight"] == "down_blocks.0.downsamplers.0.conv.weight"
    assert ldm2["output_blocks.2.1.conv.weight"] == "up_blocks.0.upsamplers.0.conv.weight"  # no attention there
    assert ldm2["output_blocks.3.1.norm.weight"] == "up_blocks.1.attentions.0.norm.weight"
    with pytest.raises(KeyError, match="no LDM name"):
        A.unet_to_ldm({"foo.weight": torch.zeros(1)}, dict(fam.config))


def test_taesd_keys_match_comfyui_layout():
    vae = V.build_model()
    ck = A.taesd_to_comfy(vae.state_dict())
    # ComfyUI's TAESD: encoder Sequential(conv, Block, conv s2, Block×3, …, conv 64→4); decoder starts with Clamp
    assert ck["taesd_encoder.0.weight"].shape == (64, 3, 3, 3)
    assert ck["taesd_encoder.14.weight"].shape == (4, 64, 3, 3)
    assert ck["taesd_decoder.1.weight"].shape == (64, 4, 3, 3)
    assert ck["taesd_decoder.19.weight"].shape == (3, 64, 3, 3)
    assert "taesd_decoder.0.weight" not in ck and float(ck["vae_scale"]) == pytest.approx(0.18215)
    assert sum(v.numel() for k, v in ck.items() if k != "vae_scale") == sum(p.numel() for p in vae.parameters())


def test_taesd_training_lowers_the_loss_and_saves_a_loadable_model(tmp_path):
    data = _image_folder(str(tmp_path / "d"))
    out = tmp_path / "vae"
    r = V.train(V.build_parser().parse_args(["--data", data, "--val-data", data, "--output", str(out),
                                             "--max-steps", "40", "--batch-size", "8", "--log-every", "10",
                                             "--lr", "2e-3", "--warmup-steps", "5", "--cpu"]))
    log = [json.loads(l) for l in open(out / "loss_log.jsonl")]
    assert log[-1]["recon"] < 0.5 * log[0]["recon"]
    from jointcore.models.sd_folder import LatentCodec
    codec = LatentCodec.from_folder(str(out))
    assert codec.tiny and codec.scaling_factor == 1.0
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        z = codec.encode(x)
        y = codec.decode(z)
    assert z.shape == (2, 4, 4, 4) and y.shape == x.shape
    assert r["heldout"]["psnr_mean_db"] > 12  # far above a random decoder's ~5 dB on these images


def test_taesd_rejects_bad_crop(tmp_path):
    data = _image_folder(str(tmp_path / "d"), n=4)
    with pytest.raises(ValueError, match="--crop 36 px"):
        V.train(V.build_parser().parse_args(["--data", data, "--output", str(tmp_path / "o"), "--crop", "36",
                                             "--max-steps", "1", "--batch-size", "2", "--cpu"]))


def _tiny_base(root, vae_src):
    """A diffusers SD folder with a tiny text encoder + toy tokenizer + tiny UNet + the given VAE."""
    import shutil

    from predictor_ckpt import tiny_clip_tokenizer
    from tiny import tiny_text_encoder, tiny_unet
    os.makedirs(root)
    tiny_text_encoder(hidden_size=32).save_pretrained(os.path.join(root, "text_encoder"))
    tiny_clip_tokenizer(os.path.join(root, "tokenizer"))
    tiny_unet(cross_attention_dim=32, block_out_channels=(32, 32)).save_pretrained(os.path.join(root, "unet"))
    shutil.copytree(vae_src, os.path.join(root, "vae"))
    return root


@pytest.fixture(scope="module")
def t2i_setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("t2i")
    data = _image_folder(str(tmp / "d"), n=12, size=32)
    vae_dir = tmp / "vae"
    V.build_model().save_pretrained(str(vae_dir))
    return data, _tiny_base(str(tmp / "base"), str(vae_dir))


def _t2i_args(data, base, out, *extra):
    return ["--pretrained", base, "--data", data, "--output", str(out), "--batch-size", "4", "--log-every", "1",
            "--warmup-steps", "2", "--lr", "1e-3", "--ema-decay", "0.9", "--cpu", *extra]


def test_t2i_caches_data_saves_ema_and_resumes(t2i_setup, tmp_path):
    data, base = t2i_setup
    out = tmp_path / "o"
    T.train(T.build_parser().parse_args(_t2i_args(data, base, out, "--max-steps", "4", "--save-every", "2")))
    cache = sorted(os.listdir(out / "cache"))
    assert [c.split("-")[0] for c in cache] == ["latents", "text"]
    from diffusers import UNet2DConditionModel
    u1 = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    st = torch.load(out / "state" / "state.pt", weights_only=True)
    assert st["step"] == 4
    # saved weights are the EMA, not the raw weights
    k = "conv_in.weight"
    assert torch.allclose(u1.state_dict()[k], st["ema"][k])
    assert not torch.allclose(st["unet"][k], st["ema"][k])
    # resume continues at step 4 and appends to the loss log
    T.train(T.build_parser().parse_args(_t2i_args(data, base, out, "--max-steps", "6", "--resume")))
    steps = [json.loads(l)["step"] for l in open(out / "loss_log.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_t2i_caption_data_problems_are_named(t2i_setup, tmp_path):
    data, base = t2i_setup
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    os.remove(bad / "captions" / "s0003.txt")
    with pytest.raises(FileNotFoundError, match="s0003.txt"):
        T.train(T.build_parser().parse_args(_t2i_args(str(bad), base, tmp_path / "o", "--max-steps", "1")))


def test_min_snr_weight():
    from jointcore import schedules as S
    ab = S.alphas_cumprod().float()
    t = torch.tensor([0, 500, 999])
    w = T.min_snr_weight(ab, t, 5.0)
    snr = ab[t] / (1 - ab[t])
    assert torch.allclose(w, torch.clamp(snr, max=5.0) / snr)
    assert w[0] < 0.01 and w[2] == 1.0
    assert torch.equal(T.min_snr_weight(ab, t, 0.0), torch.ones(3))


def test_t2i_two_processes_match_one_process_with_the_same_global_batch(t2i_setup, tmp_path):
    """``accelerate launch --num_processes 2 --cpu`` splits each global batch of 4 into 2 + 2; DDP averages the
    gradients, so the losses and weights follow the single-process run within float tolerance."""
    data, base = t2i_setup
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--cpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "jointcore.training.train_t2i", *_t2i_args(data, base, out, "--max-steps", "3",
                                                               "--ema-decay", "0.0")]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[n] = ([json.loads(l)["loss"] for l in open(out / "loss_log.jsonl")],
                   torch.load(out / "state" / "state.pt", weights_only=True)["unet"] if (out / "state").exists()
                   else None, out)
    l1, l2 = runs[1][0], runs[2][0]
    assert len(l1) == len(l2) == 3
    assert np.allclose(l1, l2, rtol=1e-4, atol=1e-6), (l1, l2)
    from diffusers import UNet2DConditionModel
    w1 = UNet2DConditionModel.from_pretrained(str(runs[1][2] / "unet")).state_dict()
    w2 = UNet2DConditionModel.from_pretrained(str(runs[2][2] / "unet")).state_dict()
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-4, worst


def test_pack_encoders_accept_the_taesd_family_vae():
    """JointNet, Diff-2-in-1 and the training CLIs encode through one helper that knows both VAE classes."""
    from jointcore.diff2in1 import encode_images
    from jointcore.joint_sampling import encode_depth, encode_image

    vae = V.build_model().eval()
    img = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        ref = vae.encode(img * 2 - 1).latents
    assert torch.equal(encode_image(vae, img), ref)
    assert torch.equal(encode_images(vae, img), ref)
    dep = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(encode_depth(vae, dep), vae.encode(dep.expand(-1, 3, -1, -1) * 2 - 1).latents)


def test_predictor_folder_with_the_taesd_vae_loads_predicts_and_fine_tunes(tmp_path):
    """The family's predictors are Marigold-layout folders whose vae/ is an AutoencoderTiny: the loader picks
    the class from the config, predicts, and the E2E-FT CLI trains on the world's pair layout."""
    from predictor_ckpt import save_checkpoint, tiny_components

    from jointcore import train_e2e
    from jointcore.data import world as W
    from jointcore.predictor import load_predictor

    unet, _vae, te, tok, sched = tiny_components(str(tmp_path))
    folder = save_checkpoint(str(tmp_path / "pred"), (unet, V.build_model(), te, tok, sched))
    pred = load_predictor(folder, dtype="fp32")
    assert type(pred.vae).__name__ == "AutoencoderTiny"
    img = torch.rand(1, 3, 32, 32)
    out = pred.predict(img, "depth", processing_resolution=0, steps=1)
    assert out.prediction.shape == (1, 1, 32, 32) and torch.isfinite(out.prediction).all()
    W.write_dataset(str(tmp_path / "w"), range(4), 32, supersample=1)
    r = train_e2e.train(train_e2e.build_parser().parse_args(
        ["--checkpoint", folder, "--data", str(tmp_path / "w"), "--task", "depth", "--output", str(tmp_path / "ft"),
         "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1", "--height", "32", "--width", "32", "--cpu"]),
        log=lambda *_: None)
    assert len(r["losses"]) == 2 and all(l == l for l in r["losses"])
    assert type(load_predictor(str(tmp_path / "ft")).vae).__name__ == "AutoencoderTiny"
