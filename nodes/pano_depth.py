"""360° depth and normals for equirectangular / cylindrical panoramas from any single-step predictor
(:mod:`jointcore.panodepth`): split into perspective views, predict, align every view's scale and shift
jointly over all overlaps, merge with seam-aware blending."""
from __future__ import annotations

import comfy.model_management as mm
import torch

from ..jointcore import panodepth as PD
from ..jointcore import predictor as JP
from ..jointcore import predictor_vis as V
from ..jointcore.denoiser import require_finite_output
from .common import (CATEGORY, add_tooltips, bchw_to_image, checked_inputs, image_to_bchw, progress, running,
                     tag_depth)
from .predictor import _comfy_patcher

SUB = CATEGORY + "/depth"
METHOD_NAMES = {"aligned (joint scale/shift, 18 views)": "aligned",
                "12 views, per-view scale ignored": "views12",
                "naive stitching (6 cube faces)": "naive"}


class JDPanoramaDepth:
    """360° depth (and normals) of an equirectangular or cylindrical panorama."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "predictor": ("JD_PREDICTOR",),
            "image": ("IMAGE",),
            "projection": (list(PD.KINDS), {"default": "equirectangular"}),
            "horizontal_span_deg": ("FLOAT", {"default": 360.0, "min": 10.0, "max": 360.0, "step": 1.0}),
            "method": (list(METHOD_NAMES), {"default": next(iter(METHOD_NAMES))}),
            "fov_deg": ("FLOAT", {"default": 90.0, "min": 30.0, "max": 150.0, "step": 1.0}),
            "view_size": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF}),
        }, "optional": {
            "normals_predictor": ("JD_PREDICTOR",),
            "layout": (["auto"] + [l for l in PD.LAYOUTS if l != "ring"], {"default": "auto"}),
            "views": ("INT", {"default": 0, "min": 0, "max": 256}),
            "robust": ("BOOLEAN", {"default": True}),
            "init": (list(JP.INITS), {"default": "zeros"}),
            "sync": (list(PD.SYNC), {"default": "none"}),
            "upward_views": (["auto", "upside down", "as they are"], {"default": "auto"}),
        }}

    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE", "IMAGE", "JD_RAW")
    RETURN_NAMES = ("depth", "normals", "views", "view_depth", "raw")
    FUNCTION = "predict"
    CATEGORY = SUB
    DESCRIPTION = ("Depth and normals for a 360° panorama from a perspective depth predictor (Marigold, E2E-FT): "
                   "overlapping perspective views, each view's scale and shift solved jointly over all overlaps, "
                   "blended with weights that fall to zero at view borders; the 0/360° seam and the poles closed. "
                   "Wire depth into RGBD to Mesh with the same projection and near 0, far 1.")

    def predict(self, predictor, image, projection, horizontal_span_deg, method, fov_deg, view_size, seed,
                normals_predictor=None, layout="auto", views=0, robust=True, init="zeros", sync="none",
                upward_views="auto"):
        pano = image_to_bchw(image)
        B, _, H, W = pano.shape
        try:
            grid = PD.PanoGrid(projection, H, W, horizontal_span_deg if projection == "cylindrical" else 360.0)
        except ValueError as e:
            raise ValueError(f"360° Depth: input 'image' ({W}×{H} px): {e}") from None
        if projection == "equirectangular" and W != 2 * H:
            raise ValueError(f"360° Depth: input 'image' is {W}×{H} px; an equirectangular panorama is twice as wide "
                             f"as high (e.g. {2 * H}×{H}). Choose projection 'cylindrical' for other shapes.")
        m = METHOD_NAMES.get(method, method)
        if m not in PD.METHODS:
            raise ValueError(f"360° Depth: unknown method {method!r}; choose one of {list(METHOD_NAMES)}")
        if layout == "fibonacci" and int(views) < 2:
            raise ValueError("360° Depth: layout 'fibonacci' needs 'views' ≥ 2 (the number of views)")
        size = int(view_size) or PD.predictor_view_size(predictor.model_index, grid, fov_deg)
        lay = None if layout == "auto" else layout
        vlist = PD.make_views(grid, PD.method_layout(grid, m, lay), fov_deg, size, views)
        n_calls = len(vlist) * B * (2 if normals_predictor is not None else 1)
        cb = progress(n_calls)
        dev = mm.get_torch_device()
        conv = PD.predictor_convention(predictor.model_index)
        preds = [predictor] + ([normals_predictor] if normals_predictor is not None else [])

        def advance(n):          # one progress step (and Cancel check) per predicted view
            for _ in range(n):
                cb()

        depth_fn, normals_fn, latent_shape = PD.predictor_fns(predictor, normals_predictor, device=dev, init=init,
                                                              seed=seed, on_images=advance)
        patchers = list({id(p): _comfy_patcher(p, "depth/normals predictor") for p in preds}.values())
        need = max(p.activation_bytes(len(vlist), vlist[0].height, vlist[0].width) for p in preds)
        with running(patchers, need, f"360° depth of {B} panorama(s), {len(vlist)} views of "
                                     f"{vlist[0].width}×{vlist[0].height} px",
                     "Lower view_size, or choose a layout with fewer views."), torch.no_grad():
            res = PD.predict_panorama(pano, grid, depth_fn, normals_fn,
                                      method=m, layout=lay, fov_deg=fov_deg, view_size=size, count=views,
                                      convention=conv, robust=robust, sync=sync, seed=seed,
                                      latent_shape=latent_shape, batch=len(vlist),
                                      turn_upward={"upside down": True, "as they are": False}.get(upward_views),
                                      check=mm.throw_exception_if_processing_interrupted)
        require_finite_output(res.view_depth, "the depth predictor", next(predictor.unet.parameters()).dtype)
        depth01 = PD.normalised_depth_image(res.depth)
        if res.normals is not None:
            nrm = V.normals_to_rgb(res.normals)
        else:
            nrm = torch.full((B, 3, H, W), 0.5)
        vrgb = res.view_rgb.transpose(0, 1).reshape(-1, 3, *res.view_rgb.shape[-2:])
        vdep = res.view_depth.transpose(0, 1).reshape(-1, 1, *res.view_depth.shape[-2:])
        raw = {"task": "depth", "data": res.depth, "distance": res.distance, "near": "small",
               "projection": projection, "normals": res.normals, "settings": res.settings,
               "alignment": [None if a is None else {"scale": a.scale.tolist(), "shift": a.shift.tolist(),
                                                     "residual": a.residual} for a in res.alignments]}
        return (tag_depth(bchw_to_image(depth01), "depth"), bchw_to_image(nrm), bchw_to_image(vrgb),
                tag_depth(bchw_to_image(vdep.expand(-1, 3, -1, -1)), "depth"), raw)


NODE_CLASS_MAPPINGS = {"JDPanoramaDepth": JDPanoramaDepth}
checked_inputs(NODE_CLASS_MAPPINGS)
NODE_DISPLAY_NAME_MAPPINGS = {"JDPanoramaDepth": "360° Depth & Normals"}

_VIEWS = "views of the panorama"
add_tooltips(NODE_CLASS_MAPPINGS, {"JDPanoramaDepth": {
    "predictor": "a depth predictor (Predictor Loader): Marigold, E2E-FT or the default family's",
    "image": "the panorama, RGB; equirectangular = 2:1 (360°×180°), cylindrical = any width, square pixels at "
             "the horizon",
    "projection": "equirectangular: a full sphere, depth = distance from the centre; cylindrical: a horizontal "
                  "band, depth = distance from the vertical axis",
    "horizontal_span_deg": "cylindrical only: the azimuth range the image covers (360 = closed)",
    "method": "aligned: every view's scale and shift solved jointly over all overlaps (the pack's method); the "
              "other two are the baselines of docs/quality.md: the 12-view merge that takes each view's depth "
              "as it comes, and the six cube faces pasted side by side",
    "fov_deg": "horizontal field of view of each perspective view (90 = cube faces; the views overlap by half)",
    "view_size": "pixels per view side; 0 = the checkpoint's processing resolution (model_index.json), else the "
                 "panorama's own resolution",
    "seed": "the Gaussian start of each view (init gaussian); also seeds the shared noise field (sync)",
    "normals_predictor": "optional normals predictor: its per-view normals are rotated into the panorama and "
                         "blended (output 'normals'; grey without it)",
    "layout": "where the views look: auto = the method's own (18 for aligned); cube+seams, cube, icosahedron (12), "
              "fibonacci ('views' near-uniform views; 48 views measured lower depth and normal error than the 18 "
              "of auto, for 2.7× the time: docs/quality.md); cylindrical panoramas always use a ring of level views",
    "views": "the number of views for layout fibonacci, or of the ring for cylindrical panoramas (0 = enough for "
             "half-overlapping neighbours)",
    "robust": "leave out overlap pixels whose disagreement is beyond 3 robust standard deviations, then solve "
              "again",
    "init": "each view's initial latent: zeros (E2E-FT, deterministic) or gaussian (Marigold checkpoints)",
    "upward_views": "views looking up at the ceiling or sky are shown to the predictor upside down and turned back "
                    "(predictors learn 'lower in the picture = nearer' from views of the ground); auto = the "
                    "method's choice (upside down for aligned)",
    "sync": "shared_noise: with init gaussian, every view starts from one noise field drawn on the sphere, so "
            "overlapping views share their noise where they overlap",
}}, {"JDPanoramaDepth": (
    "depth of the panorama (distance ÷ its maximum, near = dark; marked 'depth' for RGBD to Mesh): use "
    "near 0, far 1 there to keep the merged geometry",
    "unit normals as (n+1)/2 in each pixel's tangent frame (x right, y up, z towards the viewer)",
    f"the perspective {_VIEWS} the predictor saw (a batch, panorama by panorama)",
    "each view's own prediction before alignment (near = dark)",
    "float depth and ray distance (relative), normals, the settings and each view's scale / shift",
)})
