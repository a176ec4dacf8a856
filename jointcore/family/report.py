"""The quality report: ``python -m jointcore.family.report [--out docs/quality.md] [--scenes 200]``.

Measures the built default family (``python -m jointcore.family.build``) on held-out procedural scenes and
writes ``docs/quality.md`` with PNG figures beside it (``docs/quality/``). Each section states the claim it
tests and whether the toy-scale reproduction supports it; a section whose models are not built yet says so
instead of measuring. Thresholds are the issue's, fixed before measuring; nothing is tuned to pass.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from jointcore.family import build as B
from jointcore.family import evaluate as E


class Ctx:
    """What every section needs: the family cache, the held-out scenes, where figures go."""

    def __init__(self, cache: Path, out: Path, scenes: int, seed: int = 0, pano_count: int = 6,
                 shipped: Optional[Path] = None):
        self.cache, self.out, self.n, self.seed, self.pano_count = cache, out, scenes, seed, pano_count
        self.shipped = shipped   # the exported family (weights/default_family) for the "shipped" section
        self.fig_dir = out.parent / out.stem
        self.fig_dir.mkdir(parents=True, exist_ok=True)
        self._heldout = None
        self._base = None

    def base_models(self):
        """``(unet, codec, text_encoder, tokenizer)`` of the text-to-image model in ``base/``, loaded once."""
        if self._base is None:
            from diffusers import UNet2DConditionModel
            from transformers import CLIPTextModel, CLIPTokenizer

            from jointcore.models.sd_folder import LatentCodec

            base = self.cache / "base"
            self._base = (UNet2DConditionModel.from_pretrained(str(base / "unet")).eval(),
                          LatentCodec.from_folder(str(base / "vae")),
                          CLIPTextModel.from_pretrained(str(base / "text_encoder")).float().eval(),
                          CLIPTokenizer.from_pretrained(str(base / "tokenizer")))
        return self._base

    @torch.no_grad()
    def embed(self, texts) -> torch.Tensor:
        """CLIP embeddings ``[N,77,768]`` of ``texts`` (padded to the model length, as in training)."""
        *_, te, tok = self.base_models()
        length = min(tok.model_max_length, te.config.max_position_embeddings)
        ids = tok(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        return te(ids)[0]

    def heldout(self):
        """``(scenes, rgb [N,3,64,64], depth, normals, captions)`` rendered in memory (seeded, deterministic)."""
        if self._heldout is None:
            from jointcore.data import world as W

            seeds = range(W.HELDOUT_SEEDS.start, W.HELDOUT_SEEDS.start + self.n)
            scenes, _cam, out = W.render_seeds(seeds, B.IMAGE_SIZE, supersample=2)
            self._heldout = (scenes, out["rgb"], out["depth"], out["normals"], [W.caption(s) for s in scenes])
        return self._heldout

    def figure(self, name: str, rows: Sequence[torch.Tensor], scale: int = 2) -> str:
        """Save a grid (each row ``[K,3,H,W]`` in [0,1]) as ``fig_dir/name.png``; returns the relative path."""
        from PIL import Image

        grid = torch.cat([torch.cat(list(r), dim=2) for r in rows if len(r) == len(rows[0])], dim=1)
        a = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        im = Image.fromarray(a)
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
        p = self.fig_dir / f"{name}.png"
        im.save(p)
        return f"{self.fig_dir.name}/{p.name}"


    @staticmethod
    def verdict(ok: Optional[bool]) -> str:
        return _verdict(ok)

    def bar_plot(self, name: str, labels: Sequence[str], series: dict, ylabel: str, title: str,
                 target: Optional[float] = None) -> str:
        """A grouped bar chart (one group per label, one bar per series) as ``fig_dir/name.png``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(labels), 3.6), dpi=100)
        k = len(series)
        w = 0.8 / max(k, 1)
        for j, (sname, vals) in enumerate(series.items()):
            xs = [i + (j - (k - 1) / 2) * w for i in range(len(labels))]
            bars = ax.bar(xs, vals, width=w, label=sname)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        if target is not None:
            ax.axhline(target, color="k", ls="--", lw=1, label=f"target {target:g}")
        ax.set_xticks(range(len(labels)), [l.replace(", ", ",\n") for l in labels], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = self.fig_dir / f"{name}.png"
        fig.savefig(p)
        plt.close(fig)
        return f"{self.fig_dir.name}/{p.name}"


def _verdict(ok: Optional[bool]) -> str:
    return {True: "**reproduced**", False: "**not reproduced**", None: "not measured"}[ok]


def section_vae(ctx: Ctx) -> tuple[str, dict]:
    from jointcore.models.sd_folder import LatentCodec
    from jointcore.training.common import psnr

    vae_dir = ctx.cache / "base" / "vae"
    if not (vae_dir / "config.json").is_file():
        return "## Autoencoder\n\nNot built yet (stage `vae`).\n", {}
    codec = LatentCodec.from_folder(str(vae_dir))
    _, rgb, *_ = ctx.heldout()
    with torch.no_grad():
        rec = torch.cat([(codec.decode(codec.encode(rgb[i:i + 64] * 2 - 1)).clamp(-1, 1) + 1) / 2
                         for i in range(0, len(rgb), 64)])
    p = psnr(rec, rgb)
    fig = ctx.figure("vae_reconstructions", [rgb[:8], rec[:8]])
    m = {"psnr_mean_db": float(p.mean()), "psnr_p10_db": float(p.quantile(0.1)), "scenes": len(rgb)}
    ok = m["psnr_mean_db"] >= 28.0
    md = (f"## Autoencoder (TAESD layout, 8×, 4 channels)\n\nTarget: reconstruction PSNR ≥ 28 dB on held-out "
          f"scenes. Measured on {len(rgb)} held-out 64×64 scenes: mean **{m['psnr_mean_db']:.2f} dB** (10th "
          f"percentile {m['psnr_p10_db']:.2f} dB) — {_verdict(ok)}.\n\n![top: scenes, bottom: reconstructions]({fig})\n")
    return md, m


def section_t2i(ctx: Ctx) -> tuple[str, dict]:
    if not (ctx.cache / "base" / "unet" / "config.json").is_file():
        return "## Text → image\n\nNot built yet (stage `t2i`).\n", {}
    unet, codec, te, tok = ctx.base_models()
    _, rgb, _, _, caps = ctx.heldout()
    imgs = E.sample_t2i(unet, codec.decode, te, tok, caps, steps=25, guidance=5.0, seed=ctx.seed)
    m = E.colour_presence(imgs, caps)
    gt = E.colour_presence(rgb, caps)
    shuffled = E.colour_presence(imgs, caps[1:] + caps[:1])
    fig = ctx.figure("t2i_samples", [rgb[:8], imgs[:8], rgb[8:16], imgs[8:16]])
    ok = m["first"] >= 0.70
    md = (f"## Text → image\n\nTarget: in ≥ 70 % of samples the colour the caption names first is present. "
          f"{len(caps)} held-out captions, DDIM 25 trailing steps, CFG 5: first-named colour present in "
          f"**{100 * m['first']:.0f} %** (all named colours {100 * m['all']:.0f} %; the same measure on the "
          f"true renders {100 * gt['first']:.0f} %; against a different scene's caption — chance — "
          f"{100 * shuffled['first']:.0f} %) — {_verdict(ok)}.\n\n"
          f"![rows: true render, sample for its caption (two sets)]({fig})\n")
    return md, {"samples": m, "ground_truth": gt, "shuffled_captions": shuffled}


from jointcore.family.report_dense import section_diff2in1, section_jointnet, section_predictor  # noqa: E402
from jointcore.family.report_misc import (section_mesh, section_mt_restoration, section_quantization,  # noqa: E402
                                          section_shipped)
from jointcore.family.report_pano import section_panorama  # noqa: E402
from jointcore.panodepth.evaluate import section_pano360  # noqa: E402

SECTIONS: dict[str, Callable[[Ctx], tuple[str, dict]]] = {
    "vae": section_vae, "t2i": section_t2i, "predictor": section_predictor, "jointnet": section_jointnet,
    "diff2in1": section_diff2in1, "panorama": section_panorama, "mt_restoration": section_mt_restoration,
    "mesh": section_mesh, "quantization": section_quantization, "shipped": section_shipped,
    "pano360": section_pano360}


def _steps(args: Sequence[str], flag: str) -> int:
    return int(args[list(args).index(flag) + 1])


def _why_t2i(m: dict) -> str:
    if not m or m["samples"]["first"] >= 0.70:
        return ""
    return ("**Why the target is missed.** The text encoder is a frozen *random* CLIP-L (real CLIP weights cannot "
            "be had here), so colour words reach the UNet only as random projections it must learn to bind to "
            f"objects, in {_steps(B.T2I_ARGS, '--max-steps')} steps of batch {_steps(B.T2I_ARGS, '--batch-size')} on "
            "2 CPU cores. The samples follow their captions well above chance (the shuffled-caption figure) but "
            "bind the first colour less often than the target asks; closing the gap needs longer training (or a "
            "trained text encoder), not a looser target.\n")


def _why_jointnet(m: dict) -> str:
    if not m or m["image_to_depth"]["abs_rel"] <= 1.5 * m["predictor"]["abs_rel"]:
        return ""
    return ("**Why image → depth misses its target.** The dense branch had "
            f"{_steps(B.JOINTNET_ARGS, '--steps')} stage-1 steps of joint ε-prediction and "
            f"{_steps(B.JOINTNET_INPAINT_ARGS, '--steps')} stage-3 steps in which image → depth is one task of four; "
            f"the predictor had {_steps(B.MARIGOLD_ARGS, '--max-steps')} + {_steps(B.PREDICTOR_ARGS, '--max-steps')} "
            "steps on depth alone, the last ones on the depth loss itself (E2E-FT). The inpaint variant's "
            "masked-latent input starts from zero and is still weakly used after so short a stage 3, and a sampled "
            "depth carries the sampler's variance. Closing the gap needs a longer stage 3, not a looser target.\n")


#: an explanation appended to a section when its target is missed (from the section's metrics)
WHY: dict[str, Callable[[dict], str]] = {"t2i": _why_t2i, "jointnet": _why_jointnet}

#: the build folders each section's measurement depends on (for ``--reuse``)
SECTION_DEPS = {"vae": ("base",), "t2i": ("base",), "predictor": ("marigold_depth", "predictor_depth",
                "predictor_normals"), "jointnet": ("base", "jointnet", "jointnet_inpaint", "predictor_depth"),
                "diff2in1": ("base", "diff2in1"), "panorama": ("base",), "mt_restoration": ("base",),
                "mesh": ("predictor_depth",), "quantization": ("base", "predictor_depth"),
                "shipped": ("base", "predictor_depth", "predictor_normals", "jointnet", "jointnet_inpaint"),
                "pano360": ("predictor_depth", "predictor_normals")}


def _fingerprint(cache: Path, folders: Optional[Sequence[str]] = None) -> dict:
    """Size and modification time of the weight files in ``folders`` of the family cache (all when None)."""
    out = {}
    files = [] if not cache.is_dir() else sorted(cache.glob("*/**/*.safetensors")) if folders is None else \
        sorted(p for f in folders for p in (cache / f).glob("**/*.safetensors"))
    for p in files:
        if "cache" in p.parts or "state" in p.parts:
            continue
        st = p.stat()
        out[str(p.relative_to(cache))] = [st.st_size, int(st.st_mtime)]
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jointcore.family.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="docs/quality.md")
    ap.add_argument("--scenes", type=int, default=200, help="held-out scenes per measurement")
    ap.add_argument("--pano-scenes", type=int, default=6, help="captions per panorama kind (SyncDiffusion is slow)")
    ap.add_argument("--cache", default=None, help="family cache (default: the build's)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--shipped", default=None, help="the exported family to measure (default: the repository's "
                    "weights/default_family)")
    ap.add_argument("--reuse", action="store_true",
                    help="take a section from an earlier run into the same --out (same scenes and models) instead of "
                         "measuring it again; the models' files are fingerprinted, so a rebuilt stage is measured anew")
    a = ap.parse_args(argv)
    from jointcore.family import ship

    ctx = Ctx(Path(a.cache) if a.cache else B.default_cache(), Path(a.out), a.scenes, pano_count=a.pano_scenes,
              shipped=Path(a.shipped) if a.shipped else ship.shipped_dir())
    parts, metrics = [f"# Quality of the default model family\n\nWritten by `python -m jointcore.family.report "
                      f"--scenes {a.scenes}` on {time.strftime('%Y-%m-%d')}; held-out seeds from "
                      f"10⁹ (never trained on).\n"], {}
    done_dir = ctx.fig_dir / "sections"
    done_dir.mkdir(exist_ok=True)
    for name in [s for s in a.sections.split(",") if s]:
        if name not in SECTIONS:
            raise SystemExit(f"unknown section {name!r}; sections: {', '.join(SECTIONS)}")
        t0 = time.time()
        key = {"scenes": a.scenes, "pano_scenes": a.pano_scenes, "seed": ctx.seed,
               "models": _fingerprint(ctx.cache, SECTION_DEPS.get(name))}
        if name == "shipped" and (ctx.shipped / ship.MANIFEST).is_file():
            key["shipped"] = hashlib.sha256((ctx.shipped / ship.MANIFEST).read_bytes()).hexdigest()
        f = done_dir / f"{name}.json"
        old = json.loads(f.read_text()) if a.reuse and f.is_file() else None
        if old and old["key"] == key:
            md, m = old["md"], old["metrics"]
        else:
            md, m = SECTIONS[name](ctx)
            f.write_text(json.dumps({"key": key, "md": md, "metrics": m}))
        why = WHY[name](m) if name in WHY else ""
        parts.append(md + ("\n" + why if why else ""))
        metrics[name] = m
        print(f"[{name}] {time.time() - t0:.0f} s {json.dumps(m)[:300]}", flush=True)
    left = [s for s in SECTIONS if s not in metrics]
    if left:
        parts.append("## Not in this run\n\n" + ", ".join(f"`{s}`" for s in left) + " — run the command with "
                     "`--sections` naming them (or without `--sections` for all).\n")
    Path(a.out).write_text("\n".join(parts))
    (ctx.fig_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
