"""Cost of one JointNet denoising step relative to one plain UNet step of the same size (target <= 2.05).

Both are timed in the same run, interleaved, on random weights (the cost does not depend on them):

    python bench/bench_jointnet.py                        # small UNet, CPU, < 1 minute
    python bench/bench_jointnet.py --sd --res 512 --device cuda --dtype fp16   # SD 2.x layout, 64x64 latents

Prints median and best-of-N times and the ratio joint / plain (ideal: 2 + the exchange convs, a few %);
the best-of-N ratio is the one to compare with the target on a shared machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from _timing import timed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import UNet2DConditionModel  # noqa: E402

from jointcore.jointnet import JointNet  # noqa: E402


def build_unet(sd: bool) -> UNet2DConditionModel:
    if sd:  # Stable Diffusion 2.x base layout
        return UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                    use_linear_projection=True)
    return UNet2DConditionModel(
        block_out_channels=(64, 128, 256), layers_per_block=2, cross_attention_dim=128, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)


def flop_ratio(unet: UNet2DConditionModel, batch: int, h: int) -> tuple[float, float]:
    """(plain GFLOPs, joint / plain FLOP ratio) counted on the meta device (deterministic, no real compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from jointcore.jointnet import JointNetUNet

    cfg = dict(unet.config)
    with torch.device("meta"):
        plain = UNet2DConditionModel.from_config(cfg)
        jn = JointNet(JointNetUNet.from_config(cfg), JointNetUNet.from_config(cfg))
        x = torch.randn(batch, 8, h, h)
        e = torch.randn(batch, 77, cfg["cross_attention_dim"])
        t = torch.full((batch,), 500)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fp:
            plain(x[:, :4], t, encoder_hidden_states=e)
        with FlopCounterMode(display=False) as fj:
            jn(x, t, e)
    return fp.get_total_flops() / 1e9, fj.get_total_flops() / fp.get_total_flops()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sd", action="store_true", help="full SD 2.x UNet layout (865M params per branch)")
    ap.add_argument("--res", type=int, default=256, help="image size (latents = res/8)")
    ap.add_argument("--batch", type=int, default=2, help="batch (2 = one CFG pair)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    unet = build_unet(args.sd).eval()
    jn = JointNet.from_unet(unet).eval()
    with torch.no_grad():  # non-zero exchange layers: the same work as a trained model
        for p in jn.exchange_parameters():
            p.normal_(0, 0.01)
    unet.to(device, dtype)
    jn.to(device, dtype)
    h = args.res // 8
    D = unet.config.cross_attention_dim
    x = torch.randn(args.batch, 8, h, h, device=device, dtype=dtype)
    e = torch.randn(args.batch, 77, D, device=device, dtype=dtype)
    t = torch.full((args.batch,), 500, device=device)
    xr = x[:, :4].contiguous()
    plain = lambda: unet(xr, t, encoder_hidden_states=e).sample  # noqa: E731
    joint = lambda: jn(x, t, e)  # noqa: E731
    tp, tj = [], []
    with torch.inference_mode():
        for _ in range(2):
            plain(), joint()
        for i in range(args.repeats):  # interleaved, alternating order
            if i % 2:
                tj.append(timed(joint, device))
                tp.append(timed(plain, device))
            else:
                tp.append(timed(plain, device))
                tj.append(timed(joint, device))
    mp, mj = statistics.median(tp), statistics.median(tj)
    bp, bj = min(tp), min(tj)  # best-of-N: least disturbed by other load on the machine
    n_unet = sum(p.numel() for p in unet.parameters())
    n_ex = sum(p.numel() for p in jn.exchange_parameters())
    print(f"device={device} dtype={args.dtype} layout={'sd2' if args.sd else 'small'} latents={h}x{h} "
          f"batch={args.batch} unet_params={n_unet / 1e6:.1f}M exchange_params={n_ex / 1e6:.2f}M")
    gflops, fr = flop_ratio(unet, args.batch, h)
    print(f"FLOPs:  plain UNet step {gflops:.1f} GFLOP, joint / plain = {fr:.3f}")
    print(f"median: plain UNet step {mp * 1000:.1f} ms, joint step {mj * 1000:.1f} ms, ratio {mj / mp:.3f}")
    print(f"best:   plain UNet step {bp * 1000:.1f} ms, joint step {bj * 1000:.1f} ms, ratio {bj / bp:.3f} "
          f"(target <= 2.05)")
    return bj / bp


if __name__ == "__main__":
    main()
