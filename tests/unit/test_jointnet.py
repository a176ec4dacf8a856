import json
import os

import pytest
import torch
from diffusers import UNet2DConditionModel

from jointcore import schedules as S
from jointcore.denoiser import TextConditioning
from jointcore.jointnet import (JointConditioning, JointMaskedInputs, JointNet, JointNetDenoiser, JointNetUNet)
from tiny import tiny_unet

T = torch.tensor([10, 600])


def _randomise_exchange(jn: JointNet, seed: int = 1, scale: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in jn.exchange_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def _inputs(seed=0, b=2, hw=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 8, hw, hw, generator=g), torch.randn(b, 5, 32, generator=g)


def test_output_preserving_principle_exact():
    unet = tiny_unet()
    jn = JointNet.from_unet(unet)
    x, e = _inputs()
    with torch.no_grad():
        out = jn(x, T, e)
        ref_rgb = unet(x[:, :4], T, encoder_hidden_states=e).sample
        ref_dense = unet(x[:, 4:], T, encoder_hidden_states=e).sample
    assert out.shape == (2, 8, 16, 16)
    assert torch.equal(out[:, :4], ref_rgb)
    assert torch.equal(out[:, 4:], ref_dense)


def test_exchange_layers_couple_the_branches_both_ways():
    unet = tiny_unet()
    jn = JointNet.from_unet(unet)
    _randomise_exchange(jn)
    x, e = _inputs()
    x2 = x.clone()
    x2[:, 4:] += 1.0  # change only the dense latent
    x3 = x.clone()
    x3[:, :4] += 1.0  # change only the rgb latent
    with torch.no_grad():
        a, b, c = jn(x, T, e), jn(x2, T, e), jn(x3, T, e)
        plain = unet(x[:, :4], T, encoder_hidden_states=e).sample
    assert (a[:, :4] - plain).abs().max() > 1e-4          # no longer the plain UNet
    assert (a[:, :4] - b[:, :4]).abs().max() > 1e-4      # rgb output depends on the dense input
    assert (a[:, 4:] - c[:, 4:]).abs().max() > 1e-4      # dense output depends on the rgb input


def test_only_skip_exchange_is_routed_to_the_other_branch():
    """Non-zero down/mid convs of the RGB branch alter only the dense output (ControlNet-style routing)."""
    unet = tiny_unet()
    jn = JointNet.from_unet(unet)
    with torch.no_grad():
        for conv in list(jn.rgb.jointnet_down_blocks) + [jn.rgb.jointnet_mid_block]:
            conv.weight.normal_(0, 0.05)
    x, e = _inputs()
    with torch.no_grad():
        out = jn(x, T, e)
        ref_rgb = unet(x[:, :4], T, encoder_hidden_states=e).sample
        ref_dense = unet(x[:, 4:], T, encoder_hidden_states=e).sample
    assert torch.equal(out[:, :4], ref_rgb)
    assert (out[:, 4:] - ref_dense).abs().max() > 1e-4


def test_official_key_names_and_tiny_skip_count():
    jn = JointNet.from_unet(tiny_unet())
    keys = set(jn.rgb.state_dict())
    # tiny: conv_in + (1 resnet + downsample) + (1 resnet) = 4 skips
    assert jn.rgb.num_skips == 4
    for k in ["jointnet_rgb_in_trans.weight", "jointnet_rgb_in_trans.bias", "jointnet_mid_block.weight",
              "jointnet_down_blocks.0.weight", "jointnet_down_blocks.3.weight"]:
        assert k in keys
    assert "jointnet_masked_latent_conv.weight" not in keys
    assert tuple(jn.rgb.jointnet_rgb_in_trans.weight.shape) == (32, 4, 3, 3)
    assert all(float(p.detach().abs().sum()) == 0 for p in jn.exchange_parameters())


def test_sd_layout_has_twelve_skips_with_reference_channels():
    from accelerate import init_empty_weights

    with init_empty_weights():
        m = JointNetUNet(cross_attention_dim=1024, has_masked_latent_input=True)  # SD 2.x layout
    chans = [c.weight.shape[0] for c in m.jointnet_down_blocks]
    assert chans == [320] * 4 + [640] * 3 + [1280] * 5
    assert tuple(m.jointnet_mid_block.weight.shape) == (1280, 1280, 1, 1)
    assert tuple(m.jointnet_masked_latent_conv.weight.shape) == (320, 10, 3, 3)
    assert tuple(m.jointnet_rgb_in_trans.weight.shape) == (320, 4, 3, 3)
    # exactly the released checkpoints' extra keys, nothing else
    with init_empty_weights():
        plain = UNet2DConditionModel(cross_attention_dim=1024)
    extra = set(m.state_dict()) - set(plain.state_dict())
    want = {f"{n}.{p}" for p in ("weight", "bias") for n in
            ["jointnet_rgb_in_trans", "jointnet_mid_block", "jointnet_masked_latent_conv"]
            + [f"jointnet_down_blocks.{i}" for i in range(12)]}
    assert extra == want and set(plain.state_dict()) <= set(m.state_dict())


@pytest.mark.parametrize("safe", [True, False])
def test_save_load_official_layout(tmp_path, safe):
    jn = JointNet.from_unet(tiny_unet(), has_masked_latent_input=True)
    _randomise_exchange(jn)
    jn.save_pretrained(tmp_path, safe_serialization=safe)
    name = "diffusion_pytorch_model." + ("safetensors" if safe else "bin")
    for sub in ("unet", "jointnet"):
        assert os.path.isfile(tmp_path / sub / name)
        cfg = json.loads((tmp_path / sub / "config.json").read_text())
        assert cfg["joint_in_channels"] == 4 and cfg["has_masked_latent_input"] is True
    jn2 = JointNet.from_pretrained(tmp_path)
    assert jn2.has_masked_latent_input
    x, e = _inputs()
    m = JointMaskedInputs(torch.ones(2, 1, 16, 16), torch.zeros(2, 4, 16, 16), torch.zeros(2, 1, 16, 16), x[:, 4:])
    kw = dict(mask_rgb=m.mask_rgb, masked_rgb=m.masked_rgb, mask_dense=m.mask_dense, masked_dense=m.masked_dense)
    with torch.no_grad():
        torch.testing.assert_close(jn2(x, T, e, **kw), jn(x, T, e, **kw), rtol=0, atol=0)


def test_loads_official_style_config_with_foreign_class_name(tmp_path):
    """Released configs say ``_class_name: JointNetModel`` (diffusers 0.19); they must still load."""
    jn = JointNet.from_unet(tiny_unet())
    jn.save_pretrained(tmp_path, safe_serialization=False)
    for sub in ("unet", "jointnet"):
        p = tmp_path / sub / "config.json"
        cfg = json.loads(p.read_text())
        cfg["_class_name"] = "JointNetModel"
        cfg["_diffusers_version"] = "0.19.3"
        p.write_text(json.dumps(cfg))
    jn2 = JointNet.from_pretrained(tmp_path)
    assert jn2.rgb.num_skips == 4


def test_missing_jointnet_folder_is_a_clear_error(tmp_path):
    JointNet.from_unet(tiny_unet()).rgb.save_pretrained(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match="jointnet/config.json"):
        JointNet.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        JointNet.from_pretrained(tmp_path / "nope")


def test_plain_unet_folder_is_rejected(tmp_path):
    u = tiny_unet()
    u.save_pretrained(tmp_path / "unet")
    u.save_pretrained(tmp_path / "jointnet")
    with pytest.raises(ValueError, match="plain UNet"):
        JointNet.from_pretrained(tmp_path)


def test_mismatched_branch_configs(tmp_path):
    a = JointNetUNet.from_unet(tiny_unet())
    b = JointNetUNet.from_unet(tiny_unet(block_out_channels=(16, 32)))
    with pytest.raises(ValueError, match="block_out_channels"):
        JointNet(a, b)
    c = JointNetUNet.from_unet(tiny_unet(), has_masked_latent_input=True)
    with pytest.raises(ValueError, match="has_masked_latent_input"):
        JointNet(a, c)
    JointNet(a, b.__class__.from_unet(tiny_unet())).save_pretrained(tmp_path)
    b.save_pretrained(tmp_path / "jointnet")
    with pytest.raises(ValueError, match="do not match"):
        JointNet.from_pretrained(tmp_path)


def test_wrong_latent_channels_and_missing_mask_inputs():
    jn = JointNet.from_unet(tiny_unet())
    e = torch.zeros(1, 3, 32)
    with pytest.raises(ValueError, match=r"\[B, 8, h, w\]"):
        jn(torch.zeros(1, 4, 16, 16), T[:1], e)
    jm = JointNet.from_unet(tiny_unet(), has_masked_latent_input=True)
    with pytest.raises(ValueError, match="mask-conditioned"):
        jm(torch.zeros(1, 8, 16, 16), T[:1], e)
    den = JointNetDenoiser(jm, S.alphas_cumprod())
    with pytest.raises(ValueError, match="mask-conditioned"):
        den(torch.zeros(1, 8, 16, 16), 5, TextConditioning(e))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        JointNetDenoiser(jn, S.alphas_cumprod())(torch.zeros(1, 8, 16, 16), 5, TextConditioning(torch.zeros(1, 3, 16)))


def test_masked_latent_conv_input_order_and_preservation():
    unet = tiny_unet()
    jm = JointNet.from_unet(unet, has_masked_latent_input=True)
    x, e = _inputs(b=1)
    ones, zeros = torch.ones(1, 1, 16, 16), torch.zeros(1, 1, 16, 16)
    kw = dict(mask_rgb=ones, masked_rgb=torch.zeros(1, 4, 16, 16), mask_dense=zeros, masked_dense=x[:, 4:] * 2)
    with torch.no_grad():
        out = jm(x, T[:1], e, **kw)
        ref = unet(x[:, :4], T[:1], encoder_hidden_states=e).sample
    assert torch.equal(out[:, :4], ref)  # zero masked conv: output preserved
    # the RGB branch's conv sees [own mask, own masked, other mask, other masked]: put weight only on channel 5
    # (= the dense mask) and check that the RGB output reacts to the dense mask alone
    with torch.no_grad():
        jm.rgb.jointnet_masked_latent_conv.weight[:, 5].normal_(0, 0.1)
        a = jm(x, T[:1], e, **kw)
        b = jm(x, T[:1], e, **dict(kw, mask_dense=ones))
        c = jm(x, T[:1], e, **dict(kw, masked_dense=torch.zeros(1, 4, 16, 16)))
    assert (a[:, :4] - b[:, :4]).abs().max() > 1e-4
    assert torch.equal(a[:, :4], c[:, :4])


def test_denoiser_joint_cfg_matches_manual():
    jn = JointNet.from_unet(tiny_unet())
    _randomise_exchange(jn)
    x, _ = _inputs()
    g = torch.Generator().manual_seed(3)
    c, u = torch.randn(1, 6, 32, generator=g), torch.randn(1, 6, 32, generator=g)
    den = JointNetDenoiser(jn, S.alphas_cumprod())
    with torch.no_grad():
        out = den(x, 400, TextConditioning(c, u, 5.0))
        oc = jn(x, torch.tensor([400, 400]), c.expand(2, -1, -1))
        ou = jn(x, torch.tensor([400, 400]), u.expand(2, -1, -1))
    torch.testing.assert_close(out, ou + 5.0 * (oc - ou), rtol=1e-4, atol=1e-5)
    # JointConditioning with masked inputs passes through for the inpaint model
    jm = JointNet.from_unet(tiny_unet(), has_masked_latent_input=True)
    m = JointMaskedInputs(torch.ones(1, 1, 16, 16), torch.zeros(1, 4, 16, 16), torch.ones(1, 1, 16, 16),
                          torch.zeros(1, 4, 16, 16))
    with torch.no_grad():
        o2 = JointNetDenoiser(jm, S.alphas_cumprod())(x, 400, JointConditioning(TextConditioning(c, u, 5.0), m))
    assert o2.shape == x.shape and torch.isfinite(o2).all()


def test_half_precision_on_cpu():
    unet = tiny_unet()
    jn = JointNet.from_unet(unet)
    _randomise_exchange(jn)
    x, e = _inputs(b=1)
    with torch.no_grad():
        ref = jn(x, T[:1], e)
    for dtype in (torch.float16, torch.bfloat16):
        try:
            with torch.no_grad():
                jh = JointNet.from_unet(unet.to(dtype))
                jh.load_state_dict(jn.state_dict())
                out = JointNetDenoiser(jh, S.alphas_cumprod())(x, T[:1], TextConditioning(e))
            break
        except RuntimeError as err:  # op not implemented for this dtype on CPU
            if "not implemented" not in str(err):
                raise
            unet = unet.float()
    assert jh.dtype == dtype and out.dtype == torch.float32  # returned in the latents' dtype
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)


def test_forward_up_consumes_its_context_and_never_mutates_tensors():
    """A context can drive one up path only: reusing it raises (it used to add the exchange tensors into the
    skips in place, so a second use silently added them twice), and tensors the caller still holds are unchanged."""
    jn = JointNet.from_unet(tiny_unet())
    _randomise_exchange(jn)
    x, e = _inputs(seed=3)
    with torch.no_grad():
        full = jn(x, T, e)
        ex_s_rgb, ex_m_rgb, ctx_rgb = jn.rgb.forward_down_mid(x[:, :4], T, e, x[:, 4:])
        ex_s_dense, ex_m_dense, _ = jn.dense.forward_down_mid(x[:, 4:], T, e, x[:, :4])
        held_skips, held_mid = ctx_rgb["skips"], ctx_rgb["sample"]
        before = [s.clone() for s in held_skips], held_mid.clone()
        eps_rgb = jn.rgb.forward_up(ctx_rgb, ex_s_dense, ex_m_dense)
        assert torch.equal(eps_rgb, full[:, :4])
        assert all(torch.equal(a, b) for a, b in zip(held_skips, before[0])) and torch.equal(held_mid, before[1])
        with pytest.raises(RuntimeError, match="already used"):
            jn.rgb.forward_up(ctx_rgb, ex_s_dense, ex_m_dense)
    with torch.enable_grad():  # with autograd on, the same numbers
        _, _, ctx = jn.rgb.forward_down_mid(x[:, :4], T, e, x[:, 4:])
        torch.testing.assert_close(jn.rgb.forward_up(ctx, ex_s_dense, ex_m_dense).detach(), full[:, :4],
                                   atol=1e-6, rtol=0)
