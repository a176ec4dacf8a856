"""The quality report runs end to end on a (tiny, untrained) family cache and writes honest sections."""
import json
import shutil

import torch

from jointcore.family import report as R


def _fake_family(root):
    """base/ with a random TAESD, a tiny text encoder + tokenizer and a tiny UNet: the layout the build writes."""
    from predictor_ckpt import tiny_clip_tokenizer
    from tiny import tiny_text_encoder, tiny_unet

    from jointcore.training.train_taesd import build_model

    base = root / "base"
    build_model().save_pretrained(str(base / "vae"))
    tiny_text_encoder(hidden_size=32).save_pretrained(str(base / "text_encoder"))
    tiny_clip_tokenizer(str(root / "tok")).save_pretrained(str(base / "tokenizer"))
    tiny_unet(cross_attention_dim=32).save_pretrained(str(base / "unet"))
    return root


def test_report_measures_what_is_built_and_says_what_is_not(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "docs" / "quality.md"
    assert R.main(["--cache", str(tmp_path / "empty"), "--out", str(out), "--scenes", "4"]) == 0
    text = out.read_text()
    assert "Not built yet (stage `vae`)" in text and "Not built yet (stage `t2i`)" in text

    cache = _fake_family(tmp_path / "fam")
    assert R.main(["--cache", str(cache), "--out", str(out), "--scenes", "8"]) == 0
    text = out.read_text()
    metrics = json.loads((out.parent / "quality" / "metrics.json").read_text())
    # an untrained autoencoder and UNet: the numbers are measured and the targets reported as missed
    assert metrics["vae"]["scenes"] == 8 and metrics["vae"]["psnr_mean_db"] < 28
    assert "**not reproduced**" in text
    assert 0.0 <= metrics["t2i"]["samples"]["first"] <= 1.0
    assert metrics["t2i"]["ground_truth"]["first"] >= 0.75  # the measure itself works on the true renders
    for fig in ("vae_reconstructions.png", "t2i_samples.png"):
        assert (out.parent / "quality" / fig).stat().st_size > 1000
    shutil.rmtree(tmp_path / "fam")
