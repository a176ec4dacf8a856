"""Family measurements: caption parsing, colour presence (on ground-truth renders), text→image sampling."""
import torch

from jointcore.data import world as W
from jointcore.family import evaluate as E


def test_caption_object_colours_skip_the_room():
    cap = ("a blue checkered cylinder in front of a green striped sphere and a red cone "
           "in a light green room with a checkered floor")
    assert E.caption_object_colours(cap) == ["blue", "green", "red"]
    assert E.caption_object_colours("a white box in a white room") == ["white"]
    assert E.caption_object_colours("a grey room") == []


def test_colour_presence_is_high_on_the_true_renders_and_low_for_shuffled_captions():
    torch.set_num_threads(1)
    seeds = range(W.HELDOUT_SEEDS.start, W.HELDOUT_SEEDS.start + 48)
    scenes, cam, out = W.render_seeds(seeds, 64, supersample=2)
    caps = [W.caption(s) for s in scenes]
    truth = E.colour_presence(out["rgb"], caps)
    assert truth["samples"] >= 40
    assert truth["first"] >= 0.9 and truth["pairs"] >= 0.85
    assert truth["absent_false_positive"] < 0.05
    # the same images judged against other scenes' captions: the named colour is mostly absent
    shuffled = E.colour_presence(out["rgb"], caps[1:] + caps[:1])
    assert shuffled["first"] < truth["first"] - 0.3


def test_sample_t2i_runs_the_ddim_cfg_loop():
    from predictor_ckpt import tiny_clip_tokenizer
    from tiny import tiny_text_encoder, tiny_unet

    import tempfile
    tok = tiny_clip_tokenizer(tempfile.mkdtemp())
    te = tiny_text_encoder(hidden_size=32)
    unet = tiny_unet(cross_attention_dim=32)
    dec = lambda z: torch.nn.functional.interpolate(z[:, :3], scale_factor=8)  # noqa: E731
    a = E.sample_t2i(unet, dec, te, tok, ["a red box", "a blue box", "a red box"], steps=3, batch=2, seed=1,
                     height=32, width=32)
    b = E.sample_t2i(unet, dec, te, tok, ["a red box"], steps=3, seed=1, height=32, width=32)
    assert a.shape == (3, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.allclose(a[0], b[0], atol=1e-5)  # same seed, same first sample, whatever the batching
    assert not torch.allclose(a[0], a[2])          # one noise stream: later samples get fresh noise
