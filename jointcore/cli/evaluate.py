"""Evaluate a Marigold / E2E-FT checkpoint on a folder of image / ground-truth pairs.

Usage::

    python -m jointcore.cli.evaluate --checkpoint models/marigold-e2e-ft-depth --data data/nyu --task depth
    python -m jointcore.cli.evaluate --checkpoint … --data … --task normals --steps 1 --json out.json

The data folder layout is described in :mod:`jointcore.pairs` (``rgb/``, ``depth/`` or ``normals/``,
optional ``mask/``). Depth: AbsRel and δ1 after least-squares scale/shift alignment, mean over images.
Normals: mean/median angular error and % under 11.25°/22.5°/30°, pooled over pixels.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import torch

from .. import metrics as M
from ..pairs import PairFolder
from ..predictor import (DTYPES, INITS, NORMALISATIONS, PREPROCESSINGS, SPACING_CHOICES, DepthNormalPredictor,
                         load_predictor)


def evaluate(predictor: DepthNormalPredictor, data: PairFolder, *, min_depth: float = 1e-3,
             max_depth: Optional[float] = None, flip_normals_x: bool = False, flip_normals_y: bool = False,
             **predict_kw) -> dict:
    """Run ``predictor`` on every pair of ``data`` and return the metrics (and per-image depth figures)."""
    task = data.task
    per_image, errors = [], []
    for i in range(len(data)):
        pair = data[i]
        out = predictor.predict(pair.rgb[None], task, **predict_kw).prediction.cpu()
        if task == "depth":
            m = M.depth_metrics(out, pair.target[None], pair.mask[None], min_depth=min_depth, max_depth=max_depth)
            per_image.append({"name": pair.name, "abs_rel": m["abs_rel"].item(), "delta1": m["delta1"].item()})
        else:
            if flip_normals_x:
                out[:, 0] = -out[:, 0]
            if flip_normals_y:
                out[:, 1] = -out[:, 1]
            e = M.normal_errors(out, pair.target[None], pair.mask[None])
            errors.append(e)
            per_image.append({"name": pair.name, "mean_deg": e.mean().item() if e.numel() else float("nan")})
    if task == "depth":
        summary = {k: sum(p[k] for p in per_image) / len(per_image) for k in ("abs_rel", "delta1")}
    else:
        summary = M.summarise_normal_errors(torch.cat(errors))
    return {"task": task, "images": len(per_image), "summary": summary, "per_image": per_image}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jointcore.cli.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="diffusers folder (unet/, vae/, text_encoder/, tokenizer/, "
                                                        "scheduler/)")
    ap.add_argument("--data", required=True, help="folder with rgb/ and depth/ or normals/ (see jointcore.pairs)")
    ap.add_argument("--task", choices=("depth", "normals"), required=True)
    ap.add_argument("--processing-resolution", type=int, default=768,
                    help="long edge; 0 = native; -1 = the checkpoint's default")
    ap.add_argument("--steps", type=int, default=1, help="0 = the checkpoint's default")
    ap.add_argument("--ensemble-size", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spacing", choices=SPACING_CHOICES, default="trailing",
                    help="auto = the checkpoint scheduler's timestep_spacing")
    ap.add_argument("--preprocessing", choices=PREPROCESSINGS, default="official",
                    help="official: the E2E-FT code's pre/post-processing and ensembling; diffusers: diffusers' "
                         "Marigold pipelines'")
    ap.add_argument("--init", choices=INITS, default="zeros", help="initial target latent (gaussian for ensembles)")
    ap.add_argument("--normalisation", choices=NORMALISATIONS, default="per_image")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--depth-png-scale", type=float, default=1000.0, help="16-bit depth PNG value per metre")
    ap.add_argument("--min-depth", type=float, default=1e-3)
    ap.add_argument("--max-depth", type=float, default=None, help="dataset range (e.g. 10 for NYUv2, 80 KITTI)")
    ap.add_argument("--flip-normals-x", action="store_true", help="negate predicted x before comparing")
    ap.add_argument("--flip-normals-y", action="store_true", help="negate predicted y before comparing")
    ap.add_argument("--json", default=None, help="also write the full result (with per-image values) here")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        data = PairFolder(args.data, args.task, args.depth_png_scale)
        pred = load_predictor(args.checkpoint, dtype=args.dtype, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = evaluate(pred, data, min_depth=args.min_depth, max_depth=args.max_depth,
                   flip_normals_x=args.flip_normals_x, flip_normals_y=args.flip_normals_y,
                   processing_resolution=args.processing_resolution, steps=args.steps,
                   ensemble_size=args.ensemble_size, seed=args.seed, spacing=args.spacing,
                   normalisation=args.normalisation, preprocessing=args.preprocessing, init=args.init)
    print(json.dumps({"task": res["task"], "images": res["images"], **res["summary"]}, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
