#!/usr/bin/env python3
"""Write the shipped UI-format example workflows (``workflows/*.json`` + same-name ``.jpg`` thumbnails).

Each workflow is declared below as a small graph (nodes with widget values by name, links by slot name)
and laid out in UI format — the format users drag into ComfyUI — against a saved ``/object_info``
(widget order, seed control widgets, slot types). Run after changing a node's inputs:

    python scripts/build_workflows.py --object-info object_info.json

(``scripts/run_workflows.py --save-object-info FILE`` saves one from a live server.)
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING"}
SEED_NAMES = {"seed", "noise_seed"}


def N(id, type, pos, **widgets):  # noqa: A002 - a node declaration
    return {"id": id, "type": type, "pos": pos, "widgets": widgets}


def L(src, src_out, dst, dst_in):
    return (src, src_out, dst, dst_in)


SD15 = "v1-5-pruned-emaonly.safetensors"
EXAMPLE = "jointdiffusion_example.png"  # put your own picture in ComfyUI/input and pick it in LoadImage

SPECS = {
    "trailing_ddim_txt2img": {
        "title": "Trailing-DDIM schedule (E2E-FT fix) with any SD checkpoint",
        "nodes": [
            N(1, "CheckpointLoaderSimple", [40, 120], ckpt_name=SD15),
            N(2, "CLIPTextEncode", [420, 40], text="a cosy wooden cabin in a snowy forest, golden hour"),
            N(3, "CLIPTextEncode", [420, 260], text="blurry, low quality"),
            N(4, "EmptyLatentImage", [420, 480], width=512, height=512, batch_size=1),
            N(5, "JDTrailingDDIMSigmas", [40, 360], steps=10, spacing="trailing", zero_terminal_snr=False),
            N(6, "JDDDIMSampler", [40, 560], eta=0.0),
            N(7, "SamplerCustom", [860, 120], add_noise=True, noise_seed=42, cfg=7.5),
            N(8, "VAEDecode", [1240, 120]),
            N(9, "SaveImage", [1460, 120], filename_prefix="jointdiffusion/trailing_ddim"),
        ],
        "links": [
            L(1, "MODEL", 5, "model"), L(1, "MODEL", 7, "model"), L(1, "CLIP", 2, "clip"), L(1, "CLIP", 3, "clip"),
            L(2, "CONDITIONING", 7, "positive"), L(3, "CONDITIONING", 7, "negative"),
            L(6, "SAMPLER", 7, "sampler"), L(5, "SIGMAS", 7, "sigmas"), L(4, "LATENT", 7, "latent_image"),
            L(7, "output", 8, "samples"), L(1, "VAE", 8, "vae"), L(8, "IMAGE", 9, "images"),
        ],
    },
    "diff2in1_depth_and_paired_data": {
        "title": "Diff-2-in-1: depth from one UNet pass + paired-data creation (noise to T=600, DDIM back, label)",
        "nodes": [
            N(1, "LoadImage", [40, 40], image=EXAMPLE),
            N(2, "ImageScale", [40, 380], upscale_method="bilinear", width=512, height=512, crop="center"),
            N(3, "JDDiff2in1Loader", [420, 40], sd_model="stable-diffusion-v1-5", head="diff2in1-depth-head"),
            N(4, "JDDiff2in1Predict", [420, 240], resolution=512),
            N(5, "SaveImage", [800, 40], filename_prefix="jointdiffusion/diff2in1_depth"),
            N(6, "JDDiff2in1CreatePairs", [420, 460], T=600, steps=50, seed=0, per_image=1, resolution=512,
              folder_prefix="diff2in1_pairs", captions="a room with a red box and a green ball"),
            N(7, "SaveImage", [800, 380], filename_prefix="jointdiffusion/diff2in1_created"),
            N(8, "SaveImage", [800, 700], filename_prefix="jointdiffusion/diff2in1_labels"),
        ],
        "links": [
            L(1, "IMAGE", 2, "image"), L(3, "diff2in1", 4, "diff2in1"), L(2, "IMAGE", 4, "image"),
            L(4, "prediction", 5, "images"), L(3, "diff2in1", 6, "diff2in1"), L(2, "IMAGE", 6, "images"),
            L(6, "created_images", 7, "images"), L(6, "labels", 8, "images"),
        ],
    },
    "mt_diffusion_masked_restoration": {
        "title": "MT-Diffusion constrained restoration: regenerate a masked square, keep every other pixel",
        "nodes": [
            N(1, "CheckpointLoaderSimple", [40, 40], ckpt_name=SD15),
            N(2, "CLIPTextEncode", [420, 40], text="a tidy room, soft light"),
            N(3, "CLIPTextEncode", [420, 240], text="blurry"),
            N(4, "LoadImage", [40, 300], image=EXAMPLE),
            N(5, "ImageScale", [40, 640], upscale_method="bilinear", width=512, height=384, crop="center"),
            N(6, "VAEEncode", [420, 440]),
            N(7, "SolidMask", [40, 860], value=0.0, width=512, height=384),
            N(8, "SolidMask", [40, 1000], value=1.0, width=128, height=128),
            N(9, "MaskComposite", [420, 860], x=192, y=128, operation="add"),
            N(10, "SetLatentNoiseMask", [800, 440]),
            N(11, "JDTrailingDDIMSigmas", [800, 40], steps=20, spacing="trailing", zero_terminal_snr=False),
            N(12, "JDMTDiffusionRestoreSampler", [800, 240], modality_weight=0.0),
            N(13, "SamplerCustom", [1180, 40], add_noise=True, noise_seed=3, cfg=7.0),
            N(14, "VAEDecode", [1560, 40]),
            N(15, "SaveImage", [1780, 40], filename_prefix="jointdiffusion/mt_restore"),
        ],
        "links": [
            L(1, "CLIP", 2, "clip"), L(1, "CLIP", 3, "clip"), L(4, "IMAGE", 5, "image"), L(5, "IMAGE", 6, "pixels"),
            L(1, "VAE", 6, "vae"), L(7, "MASK", 9, "destination"), L(8, "MASK", 9, "source"),
            L(6, "LATENT", 10, "samples"), L(9, "MASK", 10, "mask"), L(1, "MODEL", 11, "model"),
            L(1, "MODEL", 13, "model"), L(2, "CONDITIONING", 13, "positive"), L(3, "CONDITIONING", 13, "negative"),
            L(12, "SAMPLER", 13, "sampler"), L(11, "SIGMAS", 13, "sigmas"), L(10, "LATENT", 13, "latent_image"),
            L(13, "output", 14, "samples"), L(1, "VAE", 14, "vae"), L(14, "IMAGE", 15, "images"),
        ],
    },
    "image_to_depth_to_mesh": {
        "title": "Single image → depth (Diff-2-in-1 head) → textured mesh (GLB)",
        "nodes": [
            N(1, "LoadImage", [40, 40], image=EXAMPLE),
            N(2, "ImageScale", [40, 380], upscale_method="bilinear", width=512, height=384, crop="center"),
            N(3, "JDDiff2in1Loader", [420, 40], sd_model="stable-diffusion-v1-5", head="diff2in1-depth-head"),
            N(4, "JDDiff2in1Predict", [420, 240], resolution=512),
            N(5, "JDRGBDToMesh", [800, 40], projection="perspective", fov_deg=60.0, depth_kind="depth", near=1.0,
              far=5.0, discontinuity_threshold=0.1, downsample=1, format="glb",
              filename_prefix="jointdiffusion/depth_mesh", color="texture"),
        ],
        "links": [
            L(1, "IMAGE", 2, "image"), L(3, "diff2in1", 4, "diff2in1"), L(2, "IMAGE", 4, "image"),
            L(2, "IMAGE", 5, "image"), L(4, "prediction", 5, "depth"),
        ],
    },
}


def _inputs(info: dict) -> list[tuple[str, list]]:
    out = []
    for sec in ("required", "optional"):
        out.extend((info.get("input", {}).get(sec) or {}).items())
    return out


def _is_widget(spec: list) -> bool:
    head = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(head, list) or head in WIDGET_TYPES


def _default(spec: list):
    head = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(head, list):
        return head[0] if head else ""
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}[head]


def build(name: str, spec: dict, object_info: dict) -> dict:
    nodes, links = [], []
    by_id = {n["id"]: n for n in spec["nodes"]}
    ui = {}
    for order, n in enumerate(spec["nodes"]):
        info = object_info.get(n["type"])
        if info is None:
            raise KeyError(f"{name}: node type {n['type']} is not in object_info")
        widgets, inputs = [], []
        names = set()
        for iname, ispec in _inputs(info):
            names.add(iname)
            if _is_widget(ispec):
                widgets.append(n["widgets"].get(iname, _default(ispec)))
                opts = ispec[1] if len(ispec) > 1 and isinstance(ispec[1], dict) else {}
                if ispec[0] == "INT" and (iname in SEED_NAMES or opts.get("control_after_generate")):
                    widgets.append("fixed")
            else:
                inputs.append({"name": iname, "type": ispec[0] if isinstance(ispec[0], str) else "COMBO", "link": None})
        unknown = set(n["widgets"]) - names
        if unknown:
            raise KeyError(f"{name}: {n['type']} has no inputs {sorted(unknown)}")
        outputs = [{"name": on, "type": ot, "links": [], "slot_index": i}
                   for i, (on, ot) in enumerate(zip(info["output_name"], info["output"]))]
        ui[n["id"]] = {"id": n["id"], "type": n["type"], "pos": n["pos"], "size": [320, 120], "flags": {},
                       "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                       "properties": {"Node name for S&R": n["type"]}, "widgets_values": widgets}
        nodes.append(ui[n["id"]])
    for lid, (src, src_out, dst, dst_in) in enumerate(spec["links"], start=1):
        so = next((o for o in ui[src]["outputs"] if o["name"] == src_out), None)
        di = next((i for i in ui[dst]["inputs"] if i["name"] == dst_in), None)
        if so is None or di is None:
            raise KeyError(f"{name}: bad link {src}.{src_out} -> {dst}.{dst_in} "
                           f"({by_id[src]['type']} -> {by_id[dst]['type']})")
        so["links"].append(lid)
        di["link"] = lid
        links.append([lid, src, so["slot_index"], dst, ui[dst]["inputs"].index(di), so["type"]])
    return {"last_node_id": max(ui), "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [],
            "config": {}, "extra": {"jointdiffusion": {"title": spec["title"]}}, "version": 0.4}


def thumbnail(path: Path, spec: dict) -> None:
    """A 512×384 card: the workflow's title and its node chain."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (512, 384), (24, 26, 33))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, 511, 6], fill=(90, 160, 255))
    y = 22
    for line in textwrap.wrap(spec["title"], 44):
        d.text((20, y), line, fill=(240, 240, 240))
        y += 16
    y += 10
    for n in spec["nodes"]:
        d.rounded_rectangle([20, y, 492, y + 22], radius=5, fill=(48, 52, 64))
        d.text((30, y + 5), n["type"], fill=(170, 210, 255))
        y += 28
        if y > 360:
            break
    img.save(path, quality=88)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--object-info", required=True)
    ap.add_argument("--only", nargs="*")
    a = ap.parse_args()
    oi = json.loads(Path(a.object_info).read_text())
    for name, spec in SPECS.items():
        if a.only and name not in a.only:
            continue
        wf = build(name, spec, oi)
        (REPO / "workflows" / f"{name}.json").write_text(json.dumps(wf, indent=1) + "\n")
        thumbnail(REPO / "workflows" / f"{name}.jpg", spec)
        print("wrote", name)


if __name__ == "__main__":
    main()
