#!/usr/bin/env python3
"""Workflow thumbnails from real outputs: ``workflows/<title>.jpg`` (beside ``<title>.json``) = a 512×384 card of the images the
workflow produced (``scripts/run_workflows.py --models family --out DIR``), with its title on top.

    .venv/bin/python scripts/run_workflows.py --models family --out out/family
    .venv/bin/python scripts/workflow_thumbnails.py --from out/family

Meshes among the outputs are shown as a point-splat picture from a turned camera (:func:`mesh_preview`). A
workflow whose outputs hold neither keeps its current thumbnail (and is named on the console).
"""
import argparse
import json
import math
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import comfy_harness  # noqa: E402
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp")
MESH_EXT = (".glb", ".ply", ".obj")
W, H, TITLE_H = 512, 384, 44


def _title(path: Path, wid: str) -> str:
    wf = json.loads(path.read_text())
    t = wf.get("extra", {}).get("jointdiffusion", {}).get("title") or wid.replace("_", " ")
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


def mesh_preview(path: Path, size: tuple[int, int] = (384, 288), yaw_deg: float = 25.0, pitch_deg: float = -15.0):
    """A picture of a GLB/PLY/OBJ mesh for the card: its surface sampled densely (colours from the texture or
    the vertices) and splatted with a z-buffer from a camera turned ``yaw_deg`` off the mesh's own view axis."""
    import numpy as np
    import trimesh
    from PIL import Image

    mesh = trimesh.load(str(path), force="mesh")
    pts, face = trimesh.sample.sample_surface_even(mesh, 200_000, seed=0)
    vis = mesh.visual.to_color() if hasattr(mesh.visual, "to_color") else mesh.visual
    col = np.asarray(vis.vertex_colors)[:, :3].astype(np.float32)
    col = col[mesh.faces[face]].mean(1)                           # each sample: its face's mean vertex colour
    c = pts - mesh.bounds.mean(0)
    a, b = np.radians(yaw_deg), np.radians(pitch_deg)
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    q = c @ (rx @ ry).T
    ext = np.abs(q[:, :2]).max() or 1.0
    dist = 2.2 * ext                                                 # camera on +z looking at the centre
    z = dist - q[:, 2]
    keep = z > 1e-3
    w, h = size
    f = 0.9 * min(w, h) / 2 * dist / ext
    u = (w / 2 + f * q[keep, 0] / z[keep]).astype(int)
    v = (h / 2 - f * q[keep, 1] / z[keep]).astype(int)
    zz, cc = z[keep], col[keep]
    img = np.full((h, w, 3), (24, 26, 33), np.uint8)
    zbuf = np.full((h, w), np.inf)
    order = np.argsort(-zz)                                          # far first, near last wins
    for du in (0, 1):
        for dv in (0, 1):
            uu, vv = u[order] + du, v[order] + dv
            ok = (uu >= 0) & (uu < w) & (vv >= 0) & (vv < h)
            uu, vv, z2, c2 = uu[ok], vv[ok], zz[order][ok], cc[order][ok]
            near = z2 <= zbuf[vv, uu]
            img[vv[near], uu[near]] = c2[near].astype(np.uint8)
            zbuf[vv[near], uu[near]] = np.minimum(zbuf[vv[near], uu[near]], z2[near])
    return Image.fromarray(img)


def main() -> int:
    from PIL import Image

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from", dest="src", required=True, help="run_workflows --out folder")
    ap.add_argument("--to", default=str(REPO / "workflows"))
    a = ap.parse_args()
    src = Path(a.src)
    for wf in sorted((REPO / "workflows").glob("*.json")):
        wid = comfy_harness.workflow_id(wf)
        outs = sorted(p for p in (src / wid).rglob("*") if p.suffix.lower() in IMAGE_EXT) \
            if (src / wid).is_dir() else []
        meshes = sorted(p for p in (src / wid).rglob("*") if p.suffix.lower() in MESH_EXT) \
            if (src / wid).is_dir() else []
        if not outs and not meshes:
            print(f"{wid}: no image or mesh outputs in {src / wid}; thumbnail unchanged")
            continue
        pics = [Image.open(p) for p in outs] + [mesh_preview(p) for p in meshes]
        card(pics, _title(wf, wid)).save(Path(a.to) / f"{wf.stem}.jpg", quality=88)
        print(f"{wid}: {len(outs)} images, {len(meshes)} meshes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
