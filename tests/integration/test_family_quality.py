"""Quality smoke of the shipped default family (weights/default_family), installed as a user's first run
installs it: a few held-out scenes, loose thresholds (the full measurements are docs/quality.md)."""
import pytest
import torch

from jointcore.family import ship

pytestmark = pytest.mark.skipif(not (ship.shipped_dir() / ship.MANIFEST).is_file(),
                                reason="the default family is not shipped in this checkout (weights/default_family)")


@pytest.fixture(scope="module")
def family(comfy_dir, monkeypatch_module):
    monkeypatch_module.setenv("COMFYUI_DIR", str(comfy_dir))  # the CLIP tokenizer comes from ComfyUI
    return ship.ensure_installed(log=lambda *_: None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def heldout():
    from jointcore.data import world as W

    torch.set_num_threads(2)
    seeds = range(W.HELDOUT_SEEDS.start + 500, W.HELDOUT_SEEDS.start + 516)  # not the report's first 200
    scenes, _cam, out = W.render_seeds(seeds, 64, supersample=2)
    return out["rgb"], out["depth"], [W.caption(s) for s in scenes]


def test_installed_family_autoencoder_and_depth_predictor(family, heldout):
    from jointcore.family.report_dense import depth_scores
    from jointcore.models.sd_folder import LatentCodec
    from jointcore.predictor import load_predictor
    from jointcore.training.common import psnr

    rgb, depth, _ = heldout
    codec = LatentCodec.from_folder(str(family / "base" / "vae"))
    with torch.no_grad():
        rec = (codec.decode(codec.encode(rgb * 2 - 1)).clamp(-1, 1) + 1) / 2
        assert psnr(rec, rgb).mean() > 25  # the report measures ≥ 28 dB on 200 scenes
        pred = load_predictor(str(family / "predictor_depth" / "model"))
        d = pred.predict(rgb, "depth", processing_resolution=0).prediction
    trailing = depth_scores(d, depth)["abs_rel"]
    with torch.no_grad():
        leading = depth_scores(pred.predict(rgb, "depth", processing_resolution=0, spacing="leading").prediction,
                               depth)["abs_rel"]
    assert trailing < 0.15 and leading > trailing


def test_installed_family_text_to_image_follows_the_caption(family, heldout):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from jointcore.family import evaluate as E
    from jointcore.models.sd_folder import LatentCodec

    _, _, caps = heldout
    base = family / "base"
    unet = UNet2DConditionModel.from_pretrained(str(base / "unet")).eval()
    te = CLIPTextModel.from_pretrained(str(base / "text_encoder")).float().eval()
    tok = CLIPTokenizer.from_pretrained(str(base / "tokenizer"))
    codec = LatentCodec.from_folder(str(base / "vae"))
    with torch.no_grad():
        imgs = E.sample_t2i(unet, codec.decode, te, tok, caps, steps=15, guidance=5.0)
    own = E.colour_presence(imgs, caps)["first"]
    other = E.colour_presence(imgs, caps[1:] + caps[:1])["first"]
    assert own > other  # conditioned on the text: the named colour shows more often than another caption's
