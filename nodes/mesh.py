"""RGB-D → mesh exporter node: writes GLB / PLY / OBJ / point-cloud PLY files into ComfyUI's output folder.

The maths lives in :mod:`jointcore.mesh`; this module only converts ComfyUI types and picks file names.
The UI payload ``{"3d": [{"filename", "subfolder", "type": "output"}]}`` is the one core ``SaveGLB`` returns
(ComfyUI v0.3.64 ``comfy_extras/nodes_hunyuan3d.py``); ``mesh_path`` is relative to the output folder, which
is what core ``Preview3D``'s ``model_file`` expects.
"""
from __future__ import annotations

import importlib
import logging
import os

import folder_paths
import torch

from ..jointcore import mesh as jm
from ..jointcore.mesh_grid import export_rgbd_mesh
from .common import (CATEGORY, add_tooltips, checked_inputs, depth_tag, image_to_bchw, interrupt_check, progress,
                     tag_depth)

_LOG = logging.getLogger("jointdiffusion")


def rgbd_pairs(image, depth) -> tuple[torch.Tensor, torch.Tensor, int]:
    """IMAGE + depth IMAGE → ``[B,3,H,W]``, ``[B',H',W']`` (channel mean) and the batch size (1 broadcasts)."""
    img = image_to_bchw(image)
    interrupt_check()
    dep = image_to_bchw(depth, "depth").mean(1)
    B = max(img.shape[0], dep.shape[0])
    if img.shape[0] not in (1, B) or dep.shape[0] not in (1, B):
        raise ValueError(f"image batch {img.shape[0]} and depth batch {dep.shape[0]} differ: give equal "
                         "batches or a batch of 1 on one side")
    return img, dep, B


def resolve_depth_kind(depth, depth_kind: str) -> str:
    """``depth_kind``, or for "auto" the convention the depth IMAGE carries (:func:`~.common.depth_tag`), else
    disparity (near = bright, what most ComfyUI depth estimators output)."""
    if depth_kind != "auto":
        return depth_kind
    tag = depth_tag(depth)
    if tag == "normals":
        raise ValueError("the 'depth' input is a normal map (task or dense_kind normals): connect a depth map")
    if tag is not None:
        _LOG.info("[JointDiffusion] RGBD to Mesh: the depth picture says %s (near = %s)", tag,
                  "dark" if tag == "depth" else "bright")
        return tag
    _LOG.info("[JointDiffusion] RGBD to Mesh: the depth picture carries no convention; reading it as disparity "
              "(near = bright). Set depth_kind to 'depth' (or use Depth Convention) if near is dark.")
    return "disparity"


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
            "depth_kind": (["auto"] + list(jm.DEPTH_KINDS)[::-1], {
                "default": "auto",
                "tooltip": "auto: as the depth picture says (Predict Depth / Normals: near = dark; JointNet: "
                           "near = bright; Depth Convention marks any picture), else disparity; disparity: white = "
                           "near (JointNet, MiDaS, Depth Anything); depth: white = far (Marigold, Predict Depth / "
                           "Normals)"}),
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
                   "one GLB/PLY/OBJ file per batch item into the output folder (never overwrites). The first "
                   "mesh is shown in the node after the run (drag: orbit, wheel: zoom, double-click: reset).")

    def export(self, image, depth, projection, fov_deg, horizontal_span_deg, depth_kind, near, far,
               discontinuity_threshold, downsample, format, filename_prefix, color="vertex", normals=True,
               max_memory_gb=4.0):
        depth_kind = resolve_depth_kind(depth, depth_kind)
        img, dep, B = rgbd_pairs(image, depth)
        interrupt_check()
        H, W = img.shape[-2:]
        out_dir = folder_paths.get_output_directory()
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir, W, H)
        os.makedirs(folder, exist_ok=True)
        ext = ".ply" if format == "pointcloud_ply" else "." + format
        companions = (".mtl", ".png") if format == "obj" and color == "texture" else ()

        tick = progress(B)
        results, rel_paths, abs_paths = [], [], []
        for i in range(B):
            counter = _free_counter(folder, filename, counter, ext, companions)
            target = os.path.join(folder, f"{filename}_{counter:05}_{ext}")
            # written from the pixel grid (less than half the memory of the mesh's arrays; the same file)
            written = export_rgbd_mesh(
                img[i if img.shape[0] > 1 else 0], dep[i if dep.shape[0] > 1 else 0], target, format, color=color,
                normals=normals, check=interrupt_check, projection=projection, fov_deg=fov_deg,
                horizontal_span_deg=horizontal_span_deg, depth_kind=depth_kind, near=near, far=far,
                discontinuity_threshold=discontinuity_threshold, downsample=downsample,
                max_bytes=int(max_memory_gb * 2**30),
            )[0]
            counter += 1
            name = os.path.basename(written)
            results.append({"filename": name, "subfolder": subfolder, "type": "output"})
            rel_paths.append("/".join(p for p in (subfolder.replace("\\", "/"), name) if p))
            abs_paths.append(written)
            tick()
        return {"ui": {"3d": results}, "result": (rel_paths[0], "\n".join(abs_paths))}


def core_mesh_class():
    """ComfyUI's core MESH class (``vertices [B,N,3]``, ``faces [B,F,3]``, read by SaveGLB) or None on
    versions without one (before late 2025)."""
    for name in ("comfy_api.latest._util.geometry_types", "comfy_extras.nodes_hunyuan3d"):
        try:
            cls = getattr(importlib.import_module(name), "MESH", None)
        except Exception:  # noqa: BLE001 - absent or unimportable on this ComfyUI
            cls = None
        if cls is not None:
            return cls
    return None


def stack_meshes(meshes: list, mesh_cls):
    """Batch meshes of different sizes into one core MESH: vertices padded with zeros, faces with the
    degenerate triangle (0, 0, 0) (no area, so viewers and SaveGLB draw nothing extra)."""
    n = max(m.vertices.shape[0] for m in meshes)
    f = max(m.faces.shape[0] for m in meshes)
    v = torch.zeros(len(meshes), n, 3)
    faces = torch.zeros(len(meshes), f, 3, dtype=torch.int64)
    for i, m in enumerate(meshes):
        v[i, :m.vertices.shape[0]] = m.vertices
        faces[i, :m.faces.shape[0]] = m.faces
    return mesh_cls(v, faces)


class JDRGBDToComfyMesh:
    """The same triangulation as RGBD to Mesh, returned as ComfyUI's core MESH (for SaveGLB / 3D nodes)."""

    @classmethod
    def INPUT_TYPES(cls):
        req = JDRGBDToMesh.INPUT_TYPES()["required"]
        keep = ("image", "depth", "projection", "fov_deg", "horizontal_span_deg", "depth_kind", "near", "far",
                "discontinuity_threshold", "downsample")
        return {"required": {k: req[k] for k in keep},
                "optional": {"max_memory_gb": JDRGBDToMesh.INPUT_TYPES()["optional"]["max_memory_gb"]}}

    RETURN_TYPES = ("MESH",)
    RETURN_NAMES = ("mesh",)
    FUNCTION = "build"
    CATEGORY = CATEGORY + "/mesh"
    DESCRIPTION = ("RGBD → ComfyUI MESH (geometry only: the core type has no colours; use RGBD to Mesh for "
                   "coloured GLB/PLY/OBJ files). Batches of different sizes are padded with degenerate faces.")

    def build(self, image, depth, projection, fov_deg, horizontal_span_deg, depth_kind, near, far,
              discontinuity_threshold, downsample, max_memory_gb=4.0):
        mesh_cls = core_mesh_class()
        if mesh_cls is None:
            raise RuntimeError("this ComfyUI has no core MESH type; use 'RGBD to Mesh' to write files instead")
        depth_kind = resolve_depth_kind(depth, depth_kind)
        img, dep, B = rgbd_pairs(image, depth)
        meshes = [jm.rgbd_to_mesh(img[i if img.shape[0] > 1 else 0], dep[i if dep.shape[0] > 1 else 0],
                                  projection=projection, fov_deg=fov_deg, horizontal_span_deg=horizontal_span_deg,
                                  depth_kind=depth_kind, near=near, far=far,
                                  discontinuity_threshold=discontinuity_threshold, downsample=downsample,
                                  max_bytes=int(max_memory_gb * 2**30), check=interrupt_check)[0]
                  for i in range(B)]
        return (stack_meshes(meshes, mesh_cls),)


class JDDepthConvention:
    """Say which way round a depth picture from elsewhere is (optionally flipping it), for RGBD to Mesh's auto."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "depth": ("IMAGE", {"tooltip": "a depth or disparity picture from any node"}),
            "near_is": (["bright", "dark"], {"default": "bright",
                                             "tooltip": "bright: disparity-like (MiDaS, Depth Anything, JointNet); "
                                                        "dark: depth-like (Marigold, Predict Depth / Normals, ZoeDepth "
                                                        "metric maps)"}),
            "invert": ("BOOLEAN", {"default": False, "tooltip": "flip the values (1 − v), which also flips near_is"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("depth",)
    OUTPUT_TOOLTIPS = ("the same picture (flipped if asked), marked with its convention for RGBD to Mesh",)
    FUNCTION = "mark"
    CATEGORY = CATEGORY + "/mesh"
    DESCRIPTION = ("Mark a depth picture as near = bright (disparity) or near = dark (depth), optionally flipping it, "
                   "so RGBD to Mesh with depth_kind auto builds it the right way round. Predict Depth / Normals and "
                   "JointNet mark their own outputs; a node in between (resize, crop…) drops the mark.")

    def mark(self, depth, near_is, invert):
        dark = near_is == "dark"
        out = (1.0 - depth) if invert else depth.clone()
        return (tag_depth(out, "disparity" if dark == invert else "depth"),)


NODE_CLASS_MAPPINGS = {"JDRGBDToMesh": JDRGBDToMesh, "JDDepthConvention": JDDepthConvention}
NODE_DISPLAY_NAME_MAPPINGS = {"JDRGBDToMesh": "RGBD to Mesh",
                              "JDDepthConvention": "Depth Convention"}
# offered only where the running ComfyUI has a core MESH type (feature detection, no V3 API needed)
OPTIONAL_NODES = {"JDRGBDToComfyMesh": JDRGBDToComfyMesh}
checked_inputs(NODE_CLASS_MAPPINGS)
checked_inputs(OPTIONAL_NODES)
if core_mesh_class() is not None:
    NODE_CLASS_MAPPINGS["JDRGBDToComfyMesh"] = JDRGBDToComfyMesh
    NODE_DISPLAY_NAME_MAPPINGS["JDRGBDToComfyMesh"] = "RGBD to MESH (core)"

_PROJECTION = ("how the image was taken: perspective (a photo; uses fov_deg), cylindrical (a wide panorama "
               "spanning horizontal_span_deg), equirectangular (a 360°×180° panorama)")
add_tooltips({**NODE_CLASS_MAPPINGS, **OPTIONAL_NODES}, {
    "JDRGBDToMesh": {
        "image": "the RGB picture: the mesh's colours (vertex colours or a texture)",
        "projection": _PROJECTION,
        "format": "glb: glTF (Blender, three.js, Windows 3D Viewer, ComfyUI's 3D preview); ply: binary (MeshLab, "
                  "CloudCompare); obj: text (+ .mtl/.png with a texture); pointcloud_ply: every valid pixel, no "
                  "faces",
        "filename_prefix": "path under ComfyUI's output folder; a number is appended and existing files are "
                           "never overwritten",
        "normals": "store per-vertex normals (smooth shading in viewers)",
    },
    "JDRGBDToComfyMesh": {
        "image": "the RGB picture (the core MESH type carries no colour)",
        "projection": _PROJECTION,
    },
}, {"JDRGBDToComfyMesh": ("ComfyUI's MESH (batch padded to the largest mesh): for Preview3D / Save GLB",)})
