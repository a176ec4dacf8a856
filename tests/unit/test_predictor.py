"""Marigold / E2E-FT predictor: loading, single-step equality with the reference procedure, options."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from jointcore.predictor import (DepthNormalPredictor, check_checkpoint_folder, ensemble_depth, ensemble_normals,
                                 load_predictor, lstsq_scale_shift)
from predictor_ckpt import make_checkpoint, synthetic_images


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("pred") / "marigold-tiny")
    path, comps = make_checkpoint(folder)
    return path, comps


@pytest.fixture(scope="module")
def predictor(ckpt):
    return load_predictor(ckpt[0], dtype="fp32")


def _copy(ckpt_path, tmp_path, name="copy"):
    dst = str(tmp_path / name)
    shutil.copytree(ckpt_path, dst)
    return dst


def reference_components(folder):
    """The five components loaded straight with diffusers / transformers (independently of jointcore)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    return (UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval(),
            AutoencoderKL.from_pretrained(folder, subfolder="vae").eval(),
            CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval(),
            CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
            DDIMScheduler.from_pretrained(folder, subfolder="scheduler"))


@torch.no_grad()
def reference_single_step(comps, images, task):
    """REFERENCES.md §3 step by step, straight from the diffusers components (native resolution)."""
    unet, vae, te, tok, sched = comps
    assert sched.config.timestep_spacing == "trailing" and sched.config.prediction_type == "v_prediction"
    rgb = images * 2 - 1                                                           # RGB·2−1
    sf = vae.config.scaling_factor
    rgb_latent = vae.encode(rgb).latent_dist.mean * sf                             # VAE mean × s
    target = torch.zeros_like(rgb_latent)                                          # zero target latent
    ids = tok("", padding="do_not_pad", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids                                       # no padding: 2 tokens
    assert ids.shape[1] == 2
    emb = te(ids)[0].repeat(images.shape[0], 1, 1)
    sched.set_timesteps(1)
    t = sched.timesteps[0]
    assert int(t) == 999                                                           # trailing fix
    out = unet(torch.cat([rgb_latent, target], 1), t, encoder_hidden_states=emb).sample  # RGB first
    ab = sched.alphas_cumprod[int(t)].double()
    x0 = (ab.sqrt() * target.double() - (1 - ab).sqrt() * out.double()).float()  # x0 = √ᾱ·z − √(1−ᾱ)·v
    # diffusers' own step agrees up to float32 rounding (it computes in float32)
    assert (sched.step(out, t, target).pred_original_sample - x0).abs().max() <= 1e-6
    y = vae.decode(x0 / sf).sample
    if task == "normals":
        return y / (y.norm(p=2, dim=1, keepdim=True) + 1e-5)
    d = (y.mean(dim=1, keepdim=True).clip(-1, 1) + 1) / 2
    lo = d.amin(dim=(1, 2, 3), keepdim=True)
    hi = d.amax(dim=(1, 2, 3), keepdim=True)
    return (d - lo) / (hi - lo)


@pytest.mark.parametrize("task", ["depth", "normals"])
def test_single_step_equals_reference_procedure(ckpt, predictor, task):
    images = synthetic_images(2, 32, 40, seed=1)
    ref = reference_single_step(reference_components(ckpt[0]), images, task)
    out = predictor.predict(images, task, processing_resolution=0)
    assert out.timesteps == [999]
    assert out.prediction.shape == ref.shape
    assert (out.prediction - ref).abs().max().item() <= 1e-5
    # the prediction is not trivially constant
    assert out.prediction.std().item() > 1e-3


def test_x0_for_zero_latent_is_scaled_v(predictor):
    """At t=999 with z = 0: x0 = −√(1−ᾱ)·v (ᾱ₉₉₉ ≈ 0.004660)."""
    ab = float(predictor.alphas_cumprod[999])
    assert abs(ab - 0.004660) < 1e-5
    rgb_latent = torch.randn(1, 4, 4, 4)
    z = torch.zeros_like(rgb_latent)
    with torch.no_grad():
        x0 = predictor.unet_x0(rgb_latent, z, 999)
        emb = predictor.empty_text_embedding()
        v = predictor.unet(torch.cat([rgb_latent, z], 1), 999, encoder_hidden_states=emb).sample
    torch.testing.assert_close(x0, -((1 - ab) ** 0.5) * v, atol=1e-6, rtol=1e-5)


def test_leading_spacing_is_t1_and_differs(predictor):
    images = synthetic_images(1, 32, 32, seed=2)
    tr = predictor.predict(images, processing_resolution=0, spacing="trailing")
    le = predictor.predict(images, processing_resolution=0, spacing="leading")
    assert tr.timesteps == [999] and le.timesteps == [1]
    assert (tr.prediction - le.prediction).abs().max().item() > 1e-3
    assert predictor.timesteps(4, "trailing") == [999, 749, 499, 249]
    assert predictor.timesteps(4, "leading") == [751, 501, 251, 1]
    with pytest.raises(ValueError, match="spacing"):
        predictor.predict(images, spacing="linspace")


def test_multistep_progress_and_interrupt(predictor):
    images = synthetic_images(1, 32, 32, seed=3)
    calls = []
    out = predictor.predict(images, processing_resolution=0, steps=3, ensemble_size=2,
                            callback=lambda d, n: calls.append((d, n)))
    assert calls == [(i, 6) for i in range(1, 7)]
    assert out.timesteps == [999, 666, 332]  # diffusers' trailing rounding
    assert out.members.shape[0] == 2

    class Stop(Exception):
        pass

    def cb(d, n):
        if d == 2:
            raise Stop()
    with pytest.raises(Stop):
        predictor.predict(images, processing_resolution=0, steps=4, callback=cb)


def test_ensemble_members_differ_and_combine(predictor):
    images = synthetic_images(1, 32, 32, seed=4)
    out = predictor.predict(images, processing_resolution=0, ensemble_size=3, seed=7)
    m = out.members
    assert m.shape == (3, 1, 1, 32, 32)
    assert (m[0] - m[1]).abs().max() > 1e-4        # gaussian init for an ensemble
    assert 0.0 <= out.prediction.min() and out.prediction.max() <= 1.0
    # same seed → same result; different seed → different
    again = predictor.predict(images, processing_resolution=0, ensemble_size=3, seed=7)
    torch.testing.assert_close(again.prediction, out.prediction)
    other = predictor.predict(images, processing_resolution=0, ensemble_size=3, seed=8)
    assert (other.prediction - out.prediction).abs().max() > 1e-4
    nrm = predictor.predict(images, "normals", processing_resolution=0, ensemble_size=2, reduction="mean")
    torch.testing.assert_close(nrm.prediction.norm(dim=1), torch.ones(1, 32, 32), atol=1e-4, rtol=0)


def test_ensemble_depth_alignment_recovers_affine_members():
    base = torch.rand(1, 1, 8, 8)
    members = torch.stack([base, 2 * base - 0.5, 0.5 * base + 0.4])  # member orders cross
    for red in ("median", "mean"):
        ens = ensemble_depth(members, red)
        s, b = lstsq_scale_shift(base, ens)
        torch.testing.assert_close(base * s.float() + b.float(), ens, atol=1e-5, rtol=0)
    # without alignment the plain median is not an affine map of the base
    plain = members.median(dim=0).values
    s, b = lstsq_scale_shift(base, plain)
    assert (base * s.float() + b.float() - plain).abs().max() > 1e-3
    n = torch.nn.functional.normalize(torch.randn(3, 1, 3, 4, 4), dim=2)
    e = ensemble_normals(n)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(1, 4, 4), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="reduction"):
        ensemble_depth(members, "max")


@pytest.mark.parametrize("res", [0, 48, 24])
def test_odd_sizes_come_back_at_input_size(predictor, res):
    images = synthetic_images(1, 37, 53, seed=5)
    for task, c in (("depth", 1), ("normals", 3)):
        out = predictor.predict(images, task, processing_resolution=res)
        assert out.prediction.shape == (1, c, 37, 53)
        assert torch.isfinite(out.prediction).all()


def test_batch_normalisation(predictor):
    images = synthetic_images(3, 32, 32, seed=6)
    per_img = predictor.predict(images, processing_resolution=0, normalisation="per_image")
    per_bat = predictor.predict(images, processing_resolution=0, normalisation="per_batch")
    p = per_img.prediction
    for i in range(3):
        assert abs(p[i].min().item()) < 1e-6 and abs(p[i].max().item() - 1) < 1e-6
    q = per_bat.prediction
    assert abs(q.min().item()) < 1e-6 and abs(q.max().item() - 1) < 1e-6
    assert min(q[i].max().item() - q[i].min().item() for i in range(3)) < 1 - 1e-3  # not each stretched
    # a batch item equals the same image predicted alone
    alone = predictor.predict(images[1:2], processing_resolution=0)
    torch.testing.assert_close(alone.prediction, p[1:2], atol=1e-5, rtol=0)
    # per-batch result is an affine map of the per-image result for each image
    for i in range(3):
        s, b = lstsq_scale_shift(p[i:i + 1], q[i:i + 1])
        torch.testing.assert_close(p[i] * s.float() + b.float(), q[i], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="normalisation"):
        predictor.predict(images, normalisation="global")


def test_bin_and_safetensors_load_the_same(ckpt, tmp_path, predictor):
    folder, comps = ckpt
    from predictor_ckpt import save_checkpoint
    binf = str(tmp_path / "bin")
    save_checkpoint(binf, comps, safe_serialization=False)
    assert os.path.isfile(os.path.join(binf, "unet", "diffusion_pytorch_model.bin"))
    assert os.path.isfile(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    p2 = load_predictor(binf)
    images = synthetic_images(1, 32, 32, seed=9)
    torch.testing.assert_close(p2.predict(images, processing_resolution=0).prediction,
                               predictor.predict(images, processing_resolution=0).prediction, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_load_path(ckpt, predictor, dtype):
    p = load_predictor(ckpt[0], dtype=dtype)
    want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    assert p.unet.dtype == want and p.text_encoder.dtype == want and p.vae.dtype == want
    images = synthetic_images(1, 32, 32, seed=10)
    try:
        out = p.predict(images, processing_resolution=0)
    except RuntimeError as e:  # CPU builds without fp16 kernels: the bf16 case still runs
        if dtype == "fp16" and "not implemented" in str(e).lower():
            pytest.skip(f"fp16 kernels missing on this CPU build: {e}")
        raise
    assert out.prediction.dtype == torch.float32 and torch.isfinite(out.prediction).all()
    ref = predictor.predict(images, processing_resolution=0).prediction
    corr = torch.corrcoef(torch.stack([out.prediction.flatten(), ref.flatten()]))[0, 1]
    assert corr > 0.9
    # fp32 VAE with a half UNet (avoids VAE overflow)
    p3 = load_predictor(ckpt[0], dtype="bf16", vae_dtype="fp32")
    assert p3.vae.dtype == torch.float32 and p3.unet.dtype == torch.bfloat16


def test_variant_only_weights_load(ckpt, tmp_path):
    dst = _copy(ckpt[0], tmp_path)
    for sub in ("unet", "vae"):
        d = os.path.join(dst, sub)
        os.rename(os.path.join(d, "diffusion_pytorch_model.safetensors"),
                  os.path.join(d, "diffusion_pytorch_model.fp16.safetensors"))
    p = load_predictor(dst, dtype="fp32")
    assert isinstance(p, DepthNormalPredictor)


# ---- bad folders ------------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_predictor(str(tmp_path / "nope"))


@pytest.mark.parametrize("sub,match", [("unet", "unet/"), ("vae", "vae/"), ("text_encoder", "text_encoder/"),
                                       ("tokenizer", "tokenizer/"), ("scheduler", "scheduler_config")])
def test_missing_component(ckpt, tmp_path, sub, match):
    dst = _copy(ckpt[0], tmp_path)
    shutil.rmtree(os.path.join(dst, sub))
    with pytest.raises(FileNotFoundError, match=match):
        check_checkpoint_folder(dst)


def test_missing_weights_and_config(ckpt, tmp_path):
    dst = _copy(ckpt[0], tmp_path, "a")
    os.remove(os.path.join(dst, "unet", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(FileNotFoundError, match="unet/ .* no weights"):
        check_checkpoint_folder(dst)
    dst = _copy(ckpt[0], tmp_path, "b")
    os.remove(os.path.join(dst, "vae", "config.json"))
    with pytest.raises(FileNotFoundError, match="vae/config.json"):
        check_checkpoint_folder(dst)


def _edit_json(path, **kw):
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(kw)
    with open(path, "w") as f:
        json.dump(cfg, f)


def test_wrong_unet_channels_prediction_type_and_mismatch(ckpt, tmp_path):
    dst = _copy(ckpt[0], tmp_path, "a")
    _edit_json(os.path.join(dst, "unet", "config.json"), in_channels=4)
    with pytest.raises(ValueError, match="in_channels=4"):
        load_predictor(dst)
    dst = _copy(ckpt[0], tmp_path, "b")
    _edit_json(os.path.join(dst, "scheduler", "scheduler_config.json"), prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        load_predictor(dst)
    dst = _copy(ckpt[0], tmp_path, "c")
    _edit_json(os.path.join(dst, "unet", "config.json"), cross_attention_dim=64)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        load_predictor(dst)
    with pytest.raises(ValueError, match="dtype"):
        load_predictor(ckpt[0], dtype="fp8")


def test_bad_call_arguments(predictor):
    img = synthetic_images(1, 16, 16)
    with pytest.raises(ValueError, match="task"):
        predictor.predict(img, "albedo")
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        predictor.predict(img[:, :1])
    with pytest.raises(ValueError, match="ensemble_size"):
        predictor.predict(img, ensemble_size=0)
    with pytest.raises(ValueError, match="processing_resolution"):
        predictor.predict(img, processing_resolution=-1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        predictor.predict(img, steps=0)
