"""Overheads of the Diff-2-in-1 / MT-Diffusion code relative to plain UNet work, measured in one run.

    python bench/bench_diff2in1.py                                  # small UNet, CPU, < 1 minute
    python bench/bench_diff2in1.py --sd --res 512 --device cuda     # SD 1.5 layout, 64x64 latents

Prints median times and three ratios (targets in brackets):

* perception = (hooked UNet pass + Eq. 9/10 head) / plain UNet pass                 [<= 1.25]
* mt_step    = one MT-Diffusion ancestral step (aggregation, posterior) / one DDIM step  [<= 1.10]
* creation   = create_pairs for one image / (steps + 1 UNet passes)                   [<= 1.5 incl. VAE]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from _timing import median_time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

from jointcore import diff2in1 as D  # noqa: E402
from jointcore import mt_diffusion as MT  # noqa: E402
from jointcore import schedules as S  # noqa: E402
from jointcore.denoiser import DiffusersUNetDenoiser, TextConditioning  # noqa: E402
from jointcore.sampling import ddim_sample  # noqa: E402


def build(sd: bool):
    if sd:
        unet = UNet2DConditionModel(cross_attention_dim=768)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
        return unet, vae, 768
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    return unet, vae, 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sd", action="store_true")
    ap.add_argument("--res", type=int, default=128, help="image size (latent = res/8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps for the creation/MT sampler timings")
    a = ap.parse_args()
    dev = torch.device(a.device)
    torch.manual_seed(0)
    unet, vae, d = build(a.sd)
    unet, vae = unet.to(dev).eval(), vae.to(dev).eval()
    ab = S.alphas_cumprod()
    lat = a.res // 8
    z = torch.randn(1, 4, lat, lat, device=dev)
    emb = torch.randn(1, 77, d, device=dev)
    t = torch.tensor([1], device=dev)

    plain = lambda: unet(z, t, encoder_hidden_states=emb)  # noqa: E731
    ex = D.UNetFeatureExtractor(unet, ab)
    head = D.TaskHead(D.HeadConfig("normals", ex.channels((lat, lat), 4, d), width=64, upscale_steps=2)).to(dev)
    with torch.no_grad():
        plain()
        perc = lambda: head(ex(z, emb), (a.res, a.res))  # noqa: E731
        perc()
        tp = median_time(plain, a.reps, dev)
        tperc = median_time(perc, a.reps, dev)
    ex.remove()

    den = DiffusersUNetDenoiser(unet, ab, "epsilon")
    cond = TextConditioning(emb)
    ts = S.ddim_timesteps(a.steps, "trailing").tolist()
    fa = MT.ForwardAggregation(ab, [0.01])
    e = [torch.randn_like(z)]
    with torch.no_grad():
        t_ddim = median_time(lambda: ddim_sample(den, z, ts, cond), max(3, a.reps // 2), dev)
        t_mt = median_time(lambda: MT.mt_sample(den, z, ts, cond, fa, e), max(3, a.reps // 2), dev)

    ex = D.UNetFeatureExtractor(unet, ab)
    img = torch.rand(1, 3, a.res, a.res, device=dev)
    with torch.no_grad():
        t_create = median_time(lambda: D.create_pairs(unet, vae, head, ex, ab, img, emb, emb, T=600, steps=a.steps),
                       max(3, a.reps // 2), dev)
    ex.remove()

    print(f"device {dev}, {'SD1.5' if a.sd else 'small'} UNet, {a.res}px (latent {lat}), {a.steps} steps")
    print(f"plain UNet pass            {tp * 1e3:8.2f} ms")
    print(f"features + head            {tperc * 1e3:8.2f} ms   perception ratio {tperc / tp:.3f}  [<= 1.25]")
    print(f"DDIM {a.steps} steps            {t_ddim * 1e3:8.2f} ms")
    print(f"MT-Diffusion {a.steps} steps    {t_mt * 1e3:8.2f} ms   mt_step ratio    {t_mt / t_ddim:.3f}  [<= 1.10]")
    print(f"create one pair            {t_create * 1e3:8.2f} ms   creation ratio   "
          f"{t_create / ((a.steps + 1) * tp):.3f}  [<= 1.5]")


if __name__ == "__main__":
    main()
