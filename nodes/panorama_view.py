"""Panorama preview node: saves the panorama as PNG (like core SaveImage) and tells the pack's web extension
(web/jointdiffusion.js) how to show it in the in-node 360° viewer (drag to look around, wheel to zoom)."""
from __future__ import annotations

import json
import os

import numpy as np
import folder_paths
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .common import CATEGORY, add_tooltips, checked_inputs

PROJECTIONS = ["equirectangular", "cylindrical"]


class JDPanoramaPreview:
    """Save panorama images to the output folder and show them in an interactive panorama viewer.

    ``projection``: ``equirectangular`` (longitude/latitude grid; a 2:1 image with span 360° is a full sphere) or
    ``cylindrical`` (a panorama stitched on a cylinder, e.g. a tiled-diffusion 2048×512 strip).
    ``span_deg``: horizontal field of view the image width covers (360 = wraps around).
    """

    CATEGORY = CATEGORY + "/panorama"
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    DESCRIPTION = "Saves the panorama (PNG) and shows it in a drag-to-look-around 360° viewer inside the node."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "projection": (PROJECTIONS, {"default": "equirectangular"}),
                "span_deg": ("FLOAT", {"default": 360.0, "min": 1.0, "max": 360.0, "step": 1.0}),
                "filename_prefix": ("STRING", {"default": "jointdiffusion/panorama"}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    def save(self, images, projection="equirectangular", span_deg=360.0, filename_prefix="jointdiffusion/panorama",
             prompt=None, extra_pnginfo=None):
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got '{projection}'")
        span_deg = float(span_deg)
        if not 1.0 <= span_deg <= 360.0:
            raise ValueError(f"span_deg must be between 1 and 360 degrees, got {span_deg}")
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(f"expected an IMAGE of shape [B,H,W,C] with B >= 1, got {tuple(images.shape)}")
        output_dir = folder_paths.get_output_directory()
        full_folder, filename, counter, subfolder, filename_prefix = folder_paths.get_save_image_path(
            filename_prefix, output_dir, images.shape[2], images.shape[1])
        results, panoramas = [], []
        for batch_number, image in enumerate(images):
            arr = np.clip(255.0 * image[..., :3].cpu().float().numpy(), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr)
            meta = PngInfo()
            if prompt is not None:
                meta.add_text("prompt", json.dumps(prompt))
            for k, v in (extra_pnginfo or {}).items():
                meta.add_text(k, json.dumps(v))
            meta.add_text("jd_panorama", json.dumps({"projection": projection, "span_deg": span_deg}))
            name = filename.replace("%batch_num%", str(batch_number))
            # never overwrite: step past files that already exist (e.g. written by another node meanwhile)
            while True:
                file = f"{name}_{counter:05}_.png"
                if not os.path.exists(os.path.join(full_folder, file)):
                    break
                counter += 1
            img.save(os.path.join(full_folder, file), pnginfo=meta, compress_level=4)
            ref = {"filename": file, "subfolder": subfolder, "type": "output"}
            results.append(ref)
            # the viewer reads the file reference from here first, so "images" (which makes the frontend also
            # show a flat preview and lists the file in the queue/assets panels) could be dropped
            panoramas.append({"projection": projection, "span_deg": span_deg, **ref})
            counter += 1
        return {"ui": {"images": results, "jd_panorama": panoramas}}


NODE_CLASS_MAPPINGS = {"JDPanoramaPreview": JDPanoramaPreview}
checked_inputs(NODE_CLASS_MAPPINGS)
NODE_DISPLAY_NAME_MAPPINGS = {"JDPanoramaPreview": "Panorama Preview (360°)"}

add_tooltips(NODE_CLASS_MAPPINGS, {
    "JDPanoramaPreview": {
        "images": "panoramas to save (PNG) and look around in",
        "projection": "equirectangular: a 360°×180° panorama; cylindrical: a wide strip spanning span_deg",
        "span_deg": "horizontal angle a cylindrical panorama covers (360 = all around)",
        "filename_prefix": "path under ComfyUI's output folder; a number is appended",
    },
}, {})
