"""RGB-D → mesh exporter node: writes GLB / PLY / OBJ / point-cloud PLY files into ComfyUI's output folder.

The maths lives in :mod:`jointcore.mesh`; this module only converts ComfyUI types and picks file names.
The UI payload ``{"3d": [{"filename", "subfolder", "type": "output"}]}`` is the one core ``SaveGLB`` returns
(ComfyUI v0.3.64 ``comfy_extras/nodes_hunyuan3d.py``); ``mesh_path`` is relative to the output folder, which
is what core ``Preview3D``'s ``model_file`` expects.
"""
from __future__ import annotations

import os

import folder_paths

from ..jointcore import mesh as jm
from .common import CATEGORY, image_to_bchw, progress


def _free_counter(folder: str, filename: str, counter: int, ext: str, companions: tuple = ()) -> int:
    """First counter ≥ ``counter`` whose ``<filename>_<counter:05>_`` name (and companions) is not taken."""
    while any(os.path.lexists(os.path.join(folder, f"{filename}_{counter:05}_{e}")) for e in (ext, *companions)):
        counter += 1
    return counter


class JDRGBDToMesh:
    """Triangulate an RGB image + depth (or disparity) map into a mesh file per batch item."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "image": ("IMAGE",),
            "depth": ("IMAGE", {"tooltip": "depth or disparity map (channel mean is used); resized to the image "
                                           "size if it differs"}),
            "projection": (list(jm.PROJECTIONS), {"default": "perspective"}),
            "fov_deg": ("FLOAT", {"default": 60.0, "min": 1.0, "max": 179.0, "step": 0.5,
                                  "tooltip": "horizontal field of view (perspective)"}),
            "horizontal_span_deg": ("FLOAT", {"default": 180.0, "min": 1.0, "max": 360.0, "step": 1.0,
                                              "tooltip": "azimuth covered by a cylindrical panorama; 360 closes the "
                                                         "seam (equirectangular is always 360x180)"}),
            "depth_kind": (list(jm.DEPTH_KINDS)[::-1], {"default": "disparity",
                                                         "tooltip": "disparity: white = near (JointNet, most depth "
                                                                    "estimators); depth: white = far"}),
            "near": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1e6, "step": 0.01,
                               "tooltip": "distance given to the nearest map value"}),
            "far": ("FLOAT", {"default": 10.0, "min": 0.001, "max": 1e6, "step": 0.01,
                              "tooltip": "distance given to the farthest map value"}),
            "discontinuity_threshold": ("FLOAT", {"default": 0.1, "min": 0.0, "max": 100.0, "step": 0.01,
                                                  "tooltip": "cut triangles whose relative depth spread "
                                                             "(max-min)/min exceeds this; 0 keeps all"}),
            "downsample": ("INT", {"default": 1, "min": 1, "max": 64,
                                   "tooltip": "one vertex per k x k pixels (a texture keeps full resolution)"}),
            "format": (list(jm.FORMATS), {"default": "glb"}),
            "filename_prefix": ("STRING", {"default": "jointdiffusion/rgbd_mesh"}),
        }, "optional": {
            "color": (list(jm.COLOR_MODES), {"default": "vertex",
                                             "tooltip": "vertex colours, a UV texture (GLB/OBJ; PLY uses vertex "
                                                        "colours), or none"}),
            "normals": ("BOOLEAN", {"default": True}),
            "max_memory_gb": ("FLOAT", {"default": 4.0, "min": 0.01, "max": 1024.0, "step": 0.5,
                                        "tooltip": "refuse meshes estimated to need more RAM than this"}),
        }}

    RETURN_TYPES = ("STRING", "STRING")
    RETURN_NAMES = ("mesh_path", "mesh_paths")
    OUTPUT_TOOLTIPS = ("first file, relative to the output folder (connect to Preview3D's model_file)",
                       "every written mesh file, absolute paths, one per line")
    FUNCTION = "export"
    OUTPUT_NODE = True
    CATEGORY = CATEGORY + "/mesh"
    DESCRIPTION = ("Build a triangle mesh (or point cloud) from an RGB image and a depth/disparity map for a "
                   "perspective, cylindrical or equirectangular camera, cut at depth discontinuities, and write "
                   "one GLB/PLY/OBJ file per batch item into the output folder (never overwrites).")

    def export(self, image, depth, projection, fov_deg, horizontal_span_deg, depth_kind, near, far,
               discontinuity_threshold, downsample, format, filename_prefix, color="vertex", normals=True,
               max_memory_gb=4.0):
        img = image_to_bchw(image)                      # [B,3,H,W]
        dep = image_to_bchw(depth).mean(1)              # [B',H',W'] channel mean
        B = max(img.shape[0], dep.shape[0])
        if img.shape[0] not in (1, B) or dep.shape[0] not in (1, B):
            raise ValueError(f"image batch {img.shape[0]} and depth batch {dep.shape[0]} differ: give equal "
                             "batches or a batch of 1 on one side")
        H, W = img.shape[-2:]
        out_dir = folder_paths.get_output_directory()
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir, W, H)
        os.makedirs(folder, exist_ok=True)
        ext = ".ply" if format == "pointcloud_ply" else "." + format
        companions = (".mtl", ".png") if format == "obj" and color == "texture" else ()

        tick = progress(B)
        results, rel_paths, abs_paths = [], [], []
        for i in range(B):
            m = jm.rgbd_to_mesh(
                img[i if img.shape[0] > 1 else 0], dep[i if dep.shape[0] > 1 else 0], projection=projection,
                fov_deg=fov_deg, horizontal_span_deg=horizontal_span_deg, depth_kind=depth_kind, near=near,
                far=far, discontinuity_threshold=discontinuity_threshold, downsample=downsample,
                max_bytes=int(max_memory_gb * 2**30),
            )[0]
            counter = _free_counter(folder, filename, counter, ext, companions)
            target = os.path.join(folder, f"{filename}_{counter:05}_{ext}")
            written = jm.export_mesh(m, target, format, color=color, normals=normals)[0]
            counter += 1
            name = os.path.basename(written)
            results.append({"filename": name, "subfolder": subfolder, "type": "output"})
            rel_paths.append("/".join(p for p in (subfolder.replace("\\", "/"), name) if p))
            abs_paths.append(written)
            tick()
        return {"ui": {"3d": results}, "result": (rel_paths[0], "\n".join(abs_paths))}


NODE_CLASS_MAPPINGS = {"JDRGBDToMesh": JDRGBDToMesh}
NODE_DISPLAY_NAME_MAPPINGS = {"JDRGBDToMesh": "RGBD to Mesh (GLB/PLY/OBJ)"}
