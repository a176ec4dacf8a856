#!/usr/bin/env python3
"""Workflow thumbnails from real outputs: ``workflows/<name>.jpg`` = a 512×384 card of the images the
workflow produced (``scripts/run_workflows.py --models family --out DIR``), with its title on top.

    .venv/bin/python scripts/run_workflows.py --models family --out out/family
    .venv/bin/python scripts/workflow_thumbnails.py --from out/family

A workflow whose outputs hold no image keeps its current thumbnail (and is named on the console).
"""
import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")
W, H, TITLE_H = 512, 384, 44


def _title(name: str) -> str:
    wf = json.loads((REPO / "workflows" / f"{name}.json").read_text())
    t = wf.get("extra", {}).get("jointdiffusion", {}).get("title") or name.replace("_", " ")
    return t.translate(str.maketrans({"×": "x", "→": "->", "°": " deg", "—": "-", "–": "-", "θ": "theta",
                                      "ε": "eps"}))


def card(images: list, title: str):
    """Tile up to 6 images (aspect kept, dark background) under a title strip."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (W, H), (24, 26, 33))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, W - 1, 4], fill=(90, 160, 255))
    for i, line in enumerate(textwrap.wrap(title, 60)[:2]):
        d.text((12, 10 + 15 * i), line, fill=(240, 240, 240))
    ims = images[:6]
    wide = sum(im.width / im.height for im in ims) / len(ims) > 2.5  # panoramas: one per row
    cols = 1 if wide else min(3, len(ims))
    rows = math.ceil(len(ims) / cols)
    cw, ch = (W - 8) // cols, (H - TITLE_H - 4) // rows
    for k, im in enumerate(ims):
        im = im.convert("RGB")
        s = min(cw / im.width, ch / im.height)
        t = im.resize((max(1, int(im.width * s)), max(1, int(im.height * s))), Image.NEAREST if s >= 2 else
                      Image.LANCZOS)
        x = 4 + (k % cols) * cw + (cw - t.width) // 2
        y = TITLE_H + (k // cols) * ch + (ch - t.height) // 2
        img.paste(t, (x, y))
    return img


def main() -> int:
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", required=True, help="run_workflows --out folder")
    ap.add_argument("--to", default=str(REPO / "workflows"))
    a = ap.parse_args()
    src = Path(a.src)
    for wf in sorted((REPO / "workflows").glob("*.json")):
        outs = sorted(p for p in (src / wf.stem).rglob("*") if p.suffix.lower() in IMAGE_EXT) \
            if (src / wf.stem).is_dir() else []
        if not outs:
            print(f"{wf.stem}: no image outputs in {src / wf.stem}; thumbnail unchanged")
            continue
        card([Image.open(p) for p in outs], _title(wf.stem)).save(Path(a.to) / f"{wf.stem}.jpg", quality=88)
        print(f"{wf.stem}: {len(outs)} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
