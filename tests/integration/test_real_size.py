"""Models of the published sizes (random weights), loaded through the pack's nodes inside a real ComfyUI and run
for one step on the CPU: the SD 2.1-base JointNet inpaint pair in the official layout (``unet/`` as ``.bin``,
``jointnet/`` as ``.safetensors``, ``joint_in_channels: null``, the masked-latent conv), an E2E-FT/Marigold SD 2
predictor (8 input channels, SD VAE, OpenCLIP-H-sized text encoder) and an SD 1.5-sized UNet in a single-file
checkpoint through ComfyUI's own loader and the tiled sampler.

About 2-3 minutes, 13 GB of RAM at the peak and 3.5 GB of disk (fp16 files, removed part by part). Runs when
``JD_REAL_SIZE=1`` (CI sets it where the machine has the room)::

    JD_REAL_SIZE=1 .venv/bin/python -m pytest -q tests/integration/test_real_size.py
"""
import os

import pytest

from conftest import run_probe

pytestmark = pytest.mark.skipif(os.environ.get("JD_REAL_SIZE") != "1",
                                reason="real-size models: set JD_REAL_SIZE=1 (2-3 min, 13 GB RAM, 3.5 GB disk)")


def test_published_size_models_load_and_run_through_the_nodes(comfy_dir):
    r = run_probe(comfy_dir, "realsize")
    j, p, s = r["jointnet"], r["predictor"], r["sd15_tiled"]
    # SD 2.1-base UNet: 865.9 M parameters per branch, plus the exchange convs
    assert 1.73e9 < j["params"] < 1.78e9 and j["masked_latent_conv"], j
    assert j["out_shape"] == [1, 8, 32, 32] and j["finite"], j
    assert j["comfy_size"] == j["module_bytes"] > 6.9e9, j  # ComfyUI accounts for the fp32 pair's real size
    assert p["unet_in_channels"] == 8 and 1.25e9 < p["params"] < 1.33e9, p
    assert p["out_shape"] == [1, 192, 256, 3] and p["finite"], p
    assert p["comfy_size"] == p["module_bytes"] > 5e9, p
    assert s["model_config"] == "SD15" and s["out_shape"] == [1, 4, 32, 96] and s["finite"], s
    for part in (j, p, s):
        print(part)
