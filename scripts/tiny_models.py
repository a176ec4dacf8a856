"""Tiny random model folders in the public layouts, for running the shipped workflows on the CPU.

Each builder writes one folder the way users place real models under ComfyUI's ``models/`` (a
diffusers SD folder, a Marigold/E2E-FT predictor folder, an official-layout JointNet folder, a
Diff-2-in-1 head); they are cached in ``JD_CACHE`` and linked into each run's throw-away models folder.
Widths follow the tiny checkpoint's CLIP-L (768) where a workflow feeds ComfyUI CONDITIONING in.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
VERSION = "2"
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


def _sd_folder(root: Path) -> None:
    """diffusers text-to-image folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/ (SD schedule, ε)."""
    from diffusers import DDIMScheduler

    from predictor_ckpt import tiny_clip_tokenizer
    from tiny import tiny_text_encoder, tiny_unet, tiny_vae

    tiny_unet(cross_attention_dim=32).save_pretrained(str(root / "unet"))
    tiny_vae().save_pretrained(str(root / "vae"))
    tiny_text_encoder(hidden_size=32).save_pretrained(str(root / "text_encoder"))
    tiny_clip_tokenizer(str(root / "_tok")).save_pretrained(str(root / "tokenizer"))
    shutil.rmtree(root / "_tok", ignore_errors=True)
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                  set_alpha_to_one=False, clip_sample=False).save_pretrained(str(root / "scheduler"))


def _diff2in1_head(root: Path) -> None:
    """A depth head sized for the tiny SD folder's UNet features."""
    from jointcore import diff2in1 as D
    from tiny import tiny_unet

    ext = D.UNetFeatureExtractor(tiny_unet(cross_attention_dim=32))
    ch = ext.channels((8, 8), 4)
    D.save_head(D.TaskHead(D.HeadConfig("depth", list(ch), None, width=16, upscale_steps=1)), str(root))


def _jointnet(inpaint: bool) -> Callable[[Path], None]:
    """Official JointNet layout (unet/ + jointnet/), CLIP-L width so ComfyUI's tiny CLIP conditions it."""
    def build(root: Path) -> None:
        from jointcore.jointnet import JointNet
        from tiny import tiny_unet

        import torch
        jn = JointNet.from_unet(tiny_unet(cross_attention_dim=768), has_masked_latent_input=inpaint)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-zero exchange layers, as in a trained model
            for n, p in jn.named_parameters():
                if "jointnet_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        jn.save_pretrained(str(root))
    return build


def _predictor(prediction_type: str) -> Callable[[Path], None]:
    """Marigold / E2E-FT diffusers folder (model_index.json, unet in_channels 8, trailing DDIM)."""
    def build(root: Path) -> None:
        from predictor_ckpt import make_checkpoint

        make_checkpoint(str(root), prediction_type=prediction_type)
        shutil.rmtree(root.parent / "_tok_src", ignore_errors=True)
    return build


def _lpips_backbone(fname: str, factory: str) -> Callable[[Path], None]:
    """A torchvision backbone file (random weights, the ``features.*`` keys LPIPS reads) under its real name."""
    def build(root: Path) -> None:
        import torch
        import torchvision

        torch.manual_seed(0)
        feats = getattr(torchvision.models, factory)(weights=None).features
        torch.save({f"features.{k}": v for k, v in feats.state_dict().items()}, str(root / fname))
    return build


# models/<folder>/<name>: named as the shipped workflows name the real models, so the workflows run
# unchanged on the tiny stand-ins (which are random: they prove the path, not the pictures).
BUILDERS: dict[str, dict[str, Callable[[Path], None]]] = {
    "diffusers": {"stable-diffusion-v1-5": _sd_folder},
    "diff2in1": {"diff2in1-depth-head": _diff2in1_head},
    "lpips": {"torchvision": _lpips_backbone("vgg16-397923af.pth", "vgg16")},
    "jointnet": {"rgbd_finetune_sd21b": _jointnet(False), "rgbd_inpaint_sd21b": _jointnet(True)},
    "jointdiffusion_predictors": {"marigold-e2e-ft-depth": _predictor("v_prediction"),
                                  "marigold-e2e-ft-normals": _predictor("v_prediction")},
}


def build(cache: Path) -> dict[str, list[Path]]:
    """Build (once) every tiny model folder; returns ``{models_subfolder: [paths]}``."""
    out: dict[str, list[Path]] = {}
    for folder, items in BUILDERS.items():
        for name, fn in items.items():
            dst = cache / "tiny_models" / f"v{VERSION}" / folder / name
            if not dst.exists():
                tmp = dst.with_name(f"{name}.{os.getpid()}.part")
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                fn(tmp)
                try:
                    tmp.rename(dst)
                except OSError:  # built concurrently
                    shutil.rmtree(tmp, ignore_errors=True)
            out.setdefault(folder, []).append(dst)
    return out
