"""Depth and normals for a folder of 360° panoramas.

    python -m jointcore.panodepth --input PANOS/ --output OUT/ [--model DIR] [--normals-model DIR]
        [--projection equirectangular|cylindrical] [--span 360] [--method aligned|views12|naive]
        [--fov 90] [--view-size 0] [--layout auto] [--views 0] [--overwrite]

For every image ``NAME.{png,jpg,jpeg,webp}`` in ``--input`` it writes into ``--output``:
``NAME_depth.png`` (16-bit, the projection's depth ÷ its maximum, near = dark; white where no view says
anything), ``NAME_distance.npy`` (float32 ray distance, relative; NaN where no view gives a positive distance), and with a normals model ``NAME_normals.png`` ((n+1)/2, 8-bit, per-pixel tangent frame)
and ``NAME_normals.npy``. ``--model`` is a Marigold / E2E-FT diffusers folder; without it, the default family's
depth and normals predictors (installed from ``weights/default_family`` on first use; they know only the
procedural world). Existing outputs are never overwritten without ``--overwrite``; each file is written to a
temporary name and renamed, so an interrupted run leaves no partial file.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .merge import METHODS, normalised_depth_image, predict_panorama
from .predictors import predictor_convention, predictor_fns, predictor_view_size
from .views import KINDS, LAYOUTS, PanoGrid

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as fh:
        np.save(fh, array)


def _load_image(path: Path) -> torch.Tensor:
    from PIL import Image

    try:
        with Image.open(path) as im:
            a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as e:  # noqa: BLE001 - a user's file: say which and why
        raise ValueError(f"{path}: not a readable image ({e})") from None
    return torch.from_numpy(a).permute(2, 0, 1)[None]


def outputs_for(out_dir: Path, stem: str, normals: bool) -> list[Path]:
    names = [f"{stem}_depth.png", f"{stem}_distance.npy"] + ([f"{stem}_normals.png", f"{stem}_normals.npy"]
                                                            if normals else [])
    return [out_dir / n for n in names]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m jointcore.panodepth", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--input", required=True, help="folder of panoramas")
    ap.add_argument("--output", required=True, help="folder for the results (created)")
    ap.add_argument("--model", default=None, help="depth predictor folder (default: the default family's)")
    ap.add_argument("--normals-model", default=None,
                    help="normals predictor folder (default: the default family's when --model is not given)")
    ap.add_argument("--projection", choices=KINDS, default="equirectangular")
    ap.add_argument("--span", type=float, default=360.0, help="cylindrical: horizontal span in degrees")
    ap.add_argument("--method", choices=list(METHODS), default="aligned")
    ap.add_argument("--fov", type=float, default=90.0, help="each view's horizontal field of view (degrees)")
    ap.add_argument("--view-size", type=int, default=0,
                    help="pixels per view side (0 = the checkpoint's processing resolution, else the panorama's)")
    ap.add_argument("--layout", choices=["auto"] + [x for x in LAYOUTS if x != "ring"], default="auto")
    ap.add_argument("--views", type=int, default=0, help="views for --layout fibonacci / the cylinder's ring")
    ap.add_argument("--upward-views", choices=["auto", "upside-down", "as-is"], default="auto",
                    help="show views looking up to the predictor upside down (auto: the method's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = build_parser().parse_args(argv)
    src, out = Path(a.input), Path(a.output)
    if not src.is_dir():
        print(f"error: --input {src} is not a folder", file=sys.stderr)
        return 2
    files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXT)
    if not files:
        print(f"error: no images ({', '.join(IMAGE_EXT)}) in --input {src}", file=sys.stderr)
        return 2
    from jointcore.predictor import load_predictor

    if a.model:
        depth_dir, normals_dir = Path(a.model), Path(a.normals_model) if a.normals_model else None
    else:
        from jointcore.family import ship
        fam = ship.ensure_installed(log=lambda m: print(m, file=sys.stderr))
        depth_dir = fam / "predictor_depth" / "model"
        normals_dir = Path(a.normals_model) if a.normals_model else fam / "predictor_normals" / "model"
    try:
        pd = load_predictor(str(depth_dir), device=a.device)
        pn = load_predictor(str(normals_dir), device=a.device) if normals_dir else None
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    clash = [p for f in files for p in outputs_for(out, f.stem, pn is not None) if p.exists()]
    if clash and not a.overwrite:
        print(f"error: {len(clash)} output file(s) exist already, e.g. {clash[0]}; pass --overwrite to replace "
              f"them", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    conv = predictor_convention(pd.model_index)

    depth_fn, normals_fn, _ = predictor_fns(pd, pn, device=a.device)

    from jointcore.predictor_vis import to_uint16, write_png16

    for f in files:
        try:
            pano = _load_image(f)
            H, W = pano.shape[-2:]
            if a.projection == "equirectangular" and W != 2 * H:
                raise ValueError(f"{f}: {W}×{H} px is not an equirectangular panorama (2:1); use --projection "
                                 f"cylindrical for other shapes")
            grid = PanoGrid(a.projection, H, W, a.span if a.projection == "cylindrical" else 360.0)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        size = a.view_size or predictor_view_size(pd.model_index, grid, a.fov)
        res = predict_panorama(pano, grid, depth_fn, normals_fn, method=a.method,
                               layout=None if a.layout == "auto" else a.layout, fov_deg=a.fov, view_size=size,
                               count=a.views, convention=conv,
                               turn_upward={"upside-down": True, "as-is": False}.get(a.upward_views))
        paths = outputs_for(out, f.stem, pn is not None)
        d01 = normalised_depth_image(res.depth)[0]
        _atomic(paths[0], lambda p: write_png16(str(p), to_uint16(d01)))
        _atomic(paths[1], lambda p: _save_npy(p, res.distance[0, 0].numpy().astype(np.float32)))
        if pn is not None:
            from PIL import Image
            rgb = ((res.normals[0].permute(1, 2, 0) + 1) / 2 * 255 + 0.5).clamp(0, 255).byte().numpy()
            _atomic(paths[2], lambda p: Image.fromarray(rgb).save(p, format="PNG"))
            _atomic(paths[3], lambda p: _save_npy(p, res.normals[0].permute(1, 2, 0).numpy()))
        print(f"{f.name}: {len(res.views)} views of {size} px → {', '.join(p.name for p in paths)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
