"""jointcore.runtime: Cancel inside forward passes (module hooks, exact chunked attention) and activation-memory
estimates measured on meta twins, checked against real runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from jointcore.jointnet import JointNet
from jointcore.runtime import memory as M
from jointcore.runtime.interrupt import chunked_sdpa, interruptible
from tiny import tiny_unet

ROOT = Path(__file__).resolve().parents[2]


class Stop(Exception):
    pass


def _counter(limit=None):
    n = [0]

    def check():
        n[0] += 1
        if limit is not None and n[0] > limit:
            raise Stop()
    return n, check


def test_chunked_attention_is_exact_and_checks_between_chunks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 100, 16, generator=g) for _ in range(3))
    n, check = _counter()
    out = chunked_sdpa(check, q, k, v, chunk_elements=2 * 3 * 100 * 10)  # 10 query rows per chunk
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-6)
    assert n[0] == 10
    mask = torch.randn(100, 100, generator=g)
    torch.testing.assert_close(chunked_sdpa(check, q, k, v, attn_mask=mask, chunk_elements=6000),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-5, atol=1e-6)


def test_interruptible_unet_is_exact_and_stops_mid_forward():
    u = tiny_unet().eval()
    x, c = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32)
    with torch.no_grad():
        ref = u(x, 10, c).sample
        n, check = _counter()
        with interruptible(check, u, chunk_elements=64):  # every attention product in chunks
            out = u(x, 10, c).sample
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        n_modules = sum(1 for _ in u.modules())
        assert n[0] > n_modules  # every module's forward and every attention chunk checked
        n2, check2 = _counter(limit=20)
        with pytest.raises(Stop), interruptible(check2, u):
            u(x, 10, c)
        assert n2[0] == 21  # stopped at the first check after the limit, inside the forward
        n3, _ = n2[0], None
        u(x, 10, c)  # hooks and the attention mode are gone after the block
        assert n2[0] == n3


def _measured_peak(side: int) -> float:
    code = f"""
import json, sys, torch
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'tests')!r}]
from tiny import tiny_unet
from jointcore.jointnet import JointNet
from jointcore.runtime.memory import process_memory, reset_peak_memory
jn = JointNet.from_unet(tiny_unet(block_out_channels=(64, 64))).eval()
emb = torch.randn(2, 77, 32)
with torch.no_grad():
    jn(torch.randn(2, 8, 8, 8), torch.tensor([10, 10]), emb)
    x = torch.randn(2, 8, {side}, {side})
    t = torch.tensor([10, 10])
    rss0 = reset_peak_memory()  # the peak (VmHWM) from here on
    jn(x, t, emb)
print(json.dumps(process_memory("VmHWM") - rss0))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(json.loads(r.stdout.strip().splitlines()[-1]))


def test_activation_estimate_covers_a_real_run_and_scales_with_pixels():
    jn = JointNet.from_unet(tiny_unet(block_out_channels=(64, 64)))
    side = 96
    est = jn.activation_bytes(2, side, side)
    real = _measured_peak(side)
    assert real > 50 * 2**20, real  # large enough to be measured above the noise
    print(f"measured peak {real / 2**20:.0f} MiB, estimate {est / 2**20:.0f} MiB")
    assert real <= est <= 3 * real + M.MARGIN, (real, est)
    # linear in the number of latent pixels (attention is counted as the memory-efficient kernels)
    small, big = jn.activation_bytes(1, 64, 64) - M.MARGIN, jn.activation_bytes(1, 128, 128) - M.MARGIN
    assert 3.5 < big / small < 4.5, (small, big)


def test_meta_twin_copies_no_weights_and_leaves_the_model_alone():
    u = tiny_unet()
    before = {k: v.clone() for k, v in u.state_dict().items()}
    tw = M.twin(u)
    assert tw is M.twin(u)
    assert all(p.is_meta for p in tw.parameters()) and not any(p.is_meta for p in u.parameters())
    for k, v in u.state_dict().items():
        assert torch.equal(v, before[k])


def test_require_memory_names_the_job_and_the_advice():
    with pytest.raises(MemoryError, match=r"JointNet at 4096×4096 px needs about 8.0 GiB .*; 2.0 GiB is available\. "
                                          r"Lower the size\."):
        M.require_memory(8 * 2**30, 2 * 2**30, "JointNet at 4096×4096 px", "Lower the size.")
    M.require_memory(8 * 2**30, None, "x", "y")  # unknown availability: allowed
