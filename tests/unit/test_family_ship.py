"""Shipping the family: export to the small form, install back into the build layout, load every model."""
import copy
import json

import pytest
import torch

from jointcore.family import ship as S


def _fake_build(root):
    from predictor_ckpt import tiny_clip_tokenizer
    from tiny import tiny_text_encoder, tiny_unet

    from jointcore import diff2in1 as D
    from jointcore.jointnet import JointNet
    from jointcore.training.train_taesd import build_model

    torch.manual_seed(0)
    base = root / "base"
    build_model().save_pretrained(str(base / "vae"))
    unet = tiny_unet(cross_attention_dim=32)
    unet.save_pretrained(str(base / "unet"))
    (base / "scheduler").mkdir(parents=True)
    (base / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    (base / "model_index.json").write_text("{}")

    def nudged(m, scale=1e-3):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * scale)
        return m

    for task in ("depth", "normals"):
        u = tiny_unet(cross_attention_dim=32)
        u.load_state_dict(unet.state_dict())
        old = u.conv_in
        u.conv_in = torch.nn.Conv2d(8, old.out_channels, old.kernel_size, padding=old.padding)
        u.register_to_config(in_channels=8)
        folder = root / f"predictor_{task}" / "model"
        nudged(u).save_pretrained(str(folder / "unet"))
        (folder / "scheduler").mkdir(parents=True)
        (folder / "scheduler" / "scheduler_config.json").write_text("{}")
        (folder / "model_index.json").write_text(json.dumps({"default_denoising_steps": 1}))
    # as the build does: stage 1 from the UNet, the inpaint variant (stage 3) from stage 1
    joint = nudged(JointNet.from_unet(unet))
    joint.save_pretrained(str(root / "jointnet" / "model"))
    inpaint = copy.deepcopy(joint)
    inpaint.extend_masked_latent_conv()
    nudged(inpaint).save_pretrained(str(root / "jointnet_inpaint" / "model"))
    ext = D.UNetFeatureExtractor(unet)
    D.save_head(D.TaskHead(D.HeadConfig("depth", list(ext.channels((8, 8), 4)), None, width=8, upscale_steps=1)),
                str(root / "diff2in1" / "model"))

    def make_base(folder):
        tiny_text_encoder(hidden_size=32).save_pretrained(str(folder / "text_encoder"))
        tiny_clip_tokenizer(str(root.parent / "tok")).save_pretrained(str(folder / "tokenizer"))
    return make_base


def test_export_install_round_trip_loads_every_model(tmp_path):
    from safetensors.torch import load_file

    from jointcore import diff2in1 as D
    from jointcore.jointnet import JointNet
    from jointcore.predictor import load_predictor

    torch.set_num_threads(1)
    build = tmp_path / "build"
    make_base = _fake_build(build)
    m = S.export(build, tmp_path / "shipped")
    fp32 = sum(p.stat().st_size for p in build.rglob("*.safetensors"))
    assert m["total_bytes"] < 0.45 * fp32  # int8 base, low-rank deltas, fp16 small parts
    assert {v["stored"] for v in m["files"].values()} == {"fp16", "int8", "delta"}
    card = (tmp_path / "shipped" / "MODEL_CARD.md").read_text()
    assert f"{m['total_bytes'] / 1e6:.1f} MB" in card and "python -m jointcore.family.build" in card
    assert all(k in card for k in m["files"])
    out = S.install(tmp_path / "shipped", tmp_path / "installed", make_base=make_base, checkpoint=False,
                    log=lambda *_: None)
    for rel, _ in S.WEIGHTS:  # every weight is back, close to the trained one
        a = load_file(str(S._weight_file(build / rel)))
        b = load_file(str(S._weight_file(out / rel)))
        assert set(a) == set(b), rel
        # relative Frobenius error of the whole model: int8 rounding of the base, plus a 3- or 2-bit delta (≈ 0.19
        # or 0.35 of the delta's own norm); a tensor that is all delta (a zero-initialised layer) may lose more
        keys = [k for k in a if a[k].is_floating_point()]
        err = sum(float((a[k].float() - b[k].float()).square().sum()) for k in keys) ** 0.5
        norm = sum(float(a[k].float().square().sum()) for k in keys) ** 0.5
        assert err < 0.05 * norm, (rel, err / norm)
    # and every folder loads with the pack's loaders
    pred = load_predictor(str(out / "predictor_depth" / "model"))
    assert pred.unet.config.in_channels == 8
    assert JointNet.from_pretrained(str(out / "jointnet_inpaint" / "model")).has_masked_latent_input
    assert D.load_head(str(out / "diff2in1" / "model")).config.task == "depth"
    assert not list(tmp_path.glob("installed.*.part"))


def test_install_refuses_a_corrupt_file(tmp_path):
    make_base = _fake_build(tmp_path / "build")
    S.export(tmp_path / "build", tmp_path / "shipped")
    f = next((tmp_path / "shipped").rglob("*.int8.safetensors"))
    f.write_bytes(f.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValueError, match="does not match its SHA-256"):
        S.install(tmp_path / "shipped", tmp_path / "installed", make_base=make_base, checkpoint=False)
    assert not (tmp_path / "installed").exists()
