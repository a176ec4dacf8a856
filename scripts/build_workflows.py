#!/usr/bin/env python3
"""Write the shipped UI-format example workflows (``workflows/*.json``).

Their thumbnails (same-name ``.jpg``) are real outputs: ``scripts/workflow_thumbnails.py``. The canvas layout
(stages in groups, node sizes, the view a workflow opens with) is ``scripts/workflow_layout.py``; the note on
each canvas and its template-browser title are ``scripts/workflow_notes.py``.

Each workflow is declared below as a small graph (nodes with widget values by name, links by slot name)
and laid out in UI format — the format users drag into ComfyUI — against a saved ``/object_info``
(widget order, seed control widgets, slot types). Run after changing a node's inputs:

    python scripts/build_workflows.py --object-info object_info.json

(``scripts/run_workflows.py --save-object-info FILE`` saves one from a live server.)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import workflow_layout
from comfy_harness import workflow_id
from workflow_notes import NOTES

REPO = Path(__file__).resolve().parent.parent
WIDGET_TYPES = {"INT", "FLOAT", "BOOLEAN", "STRING"}
SEED_NAMES = {"seed", "noise_seed"}


def N(id, type, **widgets):  # noqa: A002 - a node declaration (its place on the canvas: workflow_layout)
    return {"id": id, "type": type, "widgets": widgets}


def L(src, src_out, dst, dst_in):
    return (src, src_out, dst, dst_in)


SD15 = "v1-5-pruned-emaonly.safetensors"
SD21 = "v2-1_512-ema-pruned.safetensors"   # JointNet's base (its CLIP and VAE)
EXAMPLE = "jointdiffusion_example.png"  # put your own picture in ComfyUI/input and pick it in LoadImage

SPECS = {
    "trailing_ddim_txt2img": {
        "title": "Trailing-DDIM schedule (E2E-FT fix) with any SD checkpoint",
        "nodes": [
            N(1, "CheckpointLoaderSimple", ckpt_name=SD15),
            N(2, "CLIPTextEncode", text="a cosy wooden cabin in a snowy forest, golden hour"),
            N(3, "CLIPTextEncode", text="blurry, low quality"),
            N(4, "EmptyLatentImage", width=512, height=512, batch_size=1),
            N(5, "JDTrailingDDIMSigmas", steps=10, spacing="trailing", zero_terminal_snr=False),
            N(6, "JDDDIMSampler", eta=0.0),
            N(7, "SamplerCustom", add_noise=True, noise_seed=42, cfg=7.5),
            N(8, "VAEDecode"),
            N(9, "SaveImage", filename_prefix="jointdiffusion/trailing_ddim"),
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
            N(1, "LoadImage", image=EXAMPLE),
            N(2, "ImageScale", upscale_method="bilinear", width=512, height=512, crop="center"),
            N(3, "JDDiff2in1Loader", sd_model="stable-diffusion-v1-5", head="diff2in1-depth-head"),
            N(4, "JDDiff2in1Predict", resolution=512),
            N(5, "SaveImage", filename_prefix="jointdiffusion/diff2in1_depth"),
            N(6, "JDDiff2in1CreatePairs", T=600, steps=50, seed=0, per_image=1, resolution=512,
              folder_prefix="diff2in1_pairs", captions="a room with a red box and a green ball"),
            N(7, "SaveImage", filename_prefix="jointdiffusion/diff2in1_created"),
            N(8, "SaveImage", filename_prefix="jointdiffusion/diff2in1_labels"),
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
            N(1, "CheckpointLoaderSimple", ckpt_name=SD15),
            N(2, "CLIPTextEncode", text="a tidy room, soft light"),
            N(3, "CLIPTextEncode", text="blurry"),
            N(4, "LoadImage", image=EXAMPLE),
            N(5, "ImageScale", upscale_method="bilinear", width=512, height=384, crop="center"),
            N(6, "VAEEncode"),
            N(7, "SolidMask", value=0.0, width=512, height=384),
            N(8, "SolidMask", value=1.0, width=128, height=128),
            N(9, "MaskComposite", x=192, y=128, operation="add"),
            N(10, "SetLatentNoiseMask"),
            N(11, "JDTrailingDDIMSigmas", steps=20, spacing="trailing", zero_terminal_snr=False),
            N(12, "JDMTDiffusionRestoreSampler", modality_weight=0.0),
            N(13, "SamplerCustom", add_noise=True, noise_seed=3, cfg=7.0),
            N(14, "VAEDecode"),
            N(15, "SaveImage", filename_prefix="jointdiffusion/mt_restore"),
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
            N(1, "LoadImage", image=EXAMPLE),
            N(2, "ImageScale", upscale_method="bilinear", width=512, height=384, crop="center"),
            N(3, "JDDiff2in1Loader", sd_model="stable-diffusion-v1-5", head="diff2in1-depth-head"),
            N(4, "JDDiff2in1Predict", resolution=512),
            N(6, "JDDepthConvention", near_is="dark", invert=False),
            N(5, "JDRGBDToMesh", projection="perspective", fov_deg=60.0, depth_kind="auto", near=1.0,
              far=5.0, discontinuity_threshold=0.1, downsample=1, format="glb",
              filename_prefix="jointdiffusion/depth_mesh", color="texture"),
        ],
        "links": [
            L(1, "IMAGE", 2, "image"), L(3, "diff2in1", 4, "diff2in1"), L(2, "IMAGE", 4, "image"),
            L(2, "IMAGE", 5, "image"), L(4, "prediction", 6, "depth"), L(6, "depth", 5, "depth"),
        ],
    },
}

def _jointnet_graph(title, task, model, nodes, links, sampler_widgets, decode_dense="depth", saves=("image", "dense"),
                    panorama=False):
    """CheckpointLoader (SD 2.1: CLIP + VAE) + prompts + JointNet loader + Joint KSampler (or the tiled Joint
    Panorama Sampler) + decode + saves."""
    sampler = (N(20, "JDJointPanoramaSampler", method="jointnet", seed=0, steps=50, cfg=7.5, window=512,
                 stride=0, circular=False, view_batch=4, denoise=1.0) if panorama
               else N(20, "JDJointKSampler", task=task, **sampler_widgets))
    base = [
        N(1, "CheckpointLoaderSimple", ckpt_name=SD21),
        N(2, "CLIPTextEncode", text="a cosy living room with a red armchair, photo"),
        N(3, "CLIPTextEncode", text="blurry, low quality"),
        N(4, "JDJointNetLoader", jointnet=model, dtype="auto", prediction_type="epsilon"),
        sampler,
        N(21, "JDJointDecode", dense_kind=decode_dense),
    ]
    out = [L(1, "CLIP", 2, "clip"), L(1, "CLIP", 3, "clip"), L(4, "jointnet", 20, "jointnet"),
           L(2, "CONDITIONING", 20, "positive"), L(3, "CONDITIONING", 20, "negative"),
           L(20, "joint_latent", 21, "joint_latent"), L(1, "VAE", 21, "vae")]
    for i, what in enumerate(saves):
        base.append(N(22 + i, "SaveImage", filename_prefix=f"jointdiffusion/{task}_{what}"))
        out.append(L(21, what, 22 + i, "images"))
    return {"title": title, "nodes": base + nodes, "links": out + links}


def _image_in():
    return [N(10, "LoadImage", image=EXAMPLE),
            N(11, "ImageScale", upscale_method="bilinear", width=512, height=512, crop="center")]


def _predicted_depth(res=768):
    return ([N(12, "JDPredictorLoader", model="marigold-e2e-ft-depth", dtype="auto", vae_fp32=True),
             N(13, "JDDepthNormalPredict", task="depth", processing_resolution=res, steps=1,
               ensemble_size=1, seed=0, spacing="trailing", normalisation="per_image"),
             N(14, "JDDepthColorize", colormap="grey", near_bright=True)],
            [L(11, "IMAGE", 13, "image"), L(12, "predictor", 13, "predictor"), L(13, "image", 14, "depth")])


_SAMPLER = dict(seed=0, steps=50, cfg=7.5, sampler="ddim", eta=0.0, denoise=1.0)
_pd_nodes, _pd_links = _predicted_depth()
_pd_low_nodes, _pd_low_links = _predicted_depth(res=256)

SPECS.update({
    "jointnet_text_to_rgbd": _jointnet_graph(
        "JointNet: text → RGB + depth, jointly (SD 2.1 base + JointNet)", "joint_generation", "rgbd_finetune_sd21b",
        [N(5, "JDJointEmptyLatent", width=512, height=512, batch_size=1)],
        [L(5, "joint_latent", 20, "joint_latent")], _SAMPLER),
    "jointnet_image_to_depth": _jointnet_graph(
        "JointNet: image → depth by channel-wise inpainting (inpaint model)", "image_to_depth", "rgbd_inpaint_sd21b",
        _image_in() + [N(5, "JDJointEncode", dense_kind="depth")],
        [L(10, "IMAGE", 11, "image"), L(11, "IMAGE", 5, "image"), L(1, "VAE", 5, "vae"),
         L(5, "joint_latent", 20, "joint_latent")], _SAMPLER, saves=("dense",)),
    "jointnet_depth_to_image": _jointnet_graph(
        "JointNet: depth → image by channel-wise inpainting (depth from the E2E-FT predictor)", "depth_to_image",
        "rgbd_inpaint_sd21b",
        _image_in() + _pd_nodes + [N(5, "JDJointEncode", dense_kind="depth")],
        [L(10, "IMAGE", 11, "image")] + _pd_links + [L(14, "IMAGE", 5, "depth"), L(1, "VAE", 5, "vae"),
                                                     L(5, "joint_latent", 20, "joint_latent")],
        _SAMPLER, saves=("image",)),
    "jointnet_rgbd_inpainting": _jointnet_graph(
        "JointNet: RGBD editing — regenerate a square in both image and depth, keep the rest",
        "masks_only", "rgbd_finetune_sd21b",
        _image_in() + _pd_nodes + [N(5, "JDJointEncode", dense_kind="depth"),
                                   N(6, "SolidMask", value=0.0, width=512, height=512),
                                   N(7, "SolidMask", value=1.0, width=192, height=192),
                                   N(8, "MaskComposite", x=160, y=160, operation="add")],
        [L(10, "IMAGE", 11, "image")] + _pd_links + [
            L(11, "IMAGE", 5, "image"), L(14, "IMAGE", 5, "depth"), L(1, "VAE", 5, "vae"),
            L(5, "joint_latent", 20, "joint_latent"), L(6, "MASK", 8, "destination"), L(7, "MASK", 8, "source"),
            L(8, "MASK", 20, "image_mask"), L(8, "MASK", 20, "depth_mask")], _SAMPLER),
    "jointnet_depth_refinement": _jointnet_graph(
        "JointNet: refine a low-resolution depth map (SDEdit, strength 0.4)", "refine_depth", "rgbd_finetune_sd21b",
        _image_in() + _pd_low_nodes + [N(5, "JDJointEncode", dense_kind="depth")],
        [L(10, "IMAGE", 11, "image")] + _pd_low_links + [
            L(11, "IMAGE", 5, "image"), L(14, "IMAGE", 5, "depth"), L(1, "VAE", 5, "vae"),
            L(5, "joint_latent", 20, "joint_latent")], dict(_SAMPLER, denoise=0.4), saves=("dense",)),
    "predictor_image_to_depth_normals": {
        "title": "Single-step depth and normals (Marigold / E2E-FT, trailing DDIM t=999) with previews and raw output",
        "nodes": [
            N(1, "LoadImage", image=EXAMPLE),
            N(2, "JDPredictorLoader", model="marigold-e2e-ft-depth", dtype="auto", vae_fp32=True),
            N(3, "JDDepthNormalPredict", task="depth", processing_resolution=768, steps=1,
              ensemble_size=1, seed=0, spacing="trailing", normalisation="per_image"),
            N(4, "JDDepthColorize", colormap="jet", near_bright=False),
            N(5, "SaveImage", filename_prefix="jointdiffusion/depth_color"),
            N(6, "JDSaveRawPrediction", filename_prefix="jointdiffusion/depth_raw", format="png16+npy"),
            N(7, "JDPredictorLoader", model="marigold-e2e-ft-normals", dtype="auto", vae_fp32=True),
            N(8, "JDDepthNormalPredict", task="normals", processing_resolution=768, steps=1,
              ensemble_size=1, seed=0, spacing="trailing", normalisation="per_image"),
            N(9, "JDNormalsVisualize", flip_x=False, flip_y=False, flip_z=False),
            N(10, "SaveImage", filename_prefix="jointdiffusion/normals"),
            N(11, "SaveImage", filename_prefix="jointdiffusion/depth_grey"),
        ],
        "links": [
            L(1, "IMAGE", 3, "image"), L(2, "predictor", 3, "predictor"), L(3, "image", 4, "depth"),
            L(4, "IMAGE", 5, "images"), L(3, "raw", 6, "raw"), L(1, "IMAGE", 8, "image"),
            L(7, "predictor", 8, "predictor"), L(8, "raw", 9, "raw"), L(9, "IMAGE", 10, "images"),
            L(3, "image", 11, "images"),
        ],
    },
    "predictor_frames_to_depth_sequence": {
        "title": "Batch of video frames → depth sequence (one step per frame, per-batch normalisation)",
        "nodes": [
            N(1, "LoadImage", image=EXAMPLE),
            N(2, "RepeatImageBatch", amount=4),
            N(3, "JDPredictorLoader", model="marigold-e2e-ft-depth", dtype="auto", vae_fp32=True),
            N(4, "JDDepthNormalPredict", task="depth", processing_resolution=512, steps=1,
              ensemble_size=1, seed=0, spacing="trailing", normalisation="per_batch"),
            N(5, "SaveImage", filename_prefix="jointdiffusion/depth_sequence"),
            N(6, "JDSaveRawPrediction", filename_prefix="jointdiffusion/depth_sequence_raw",
              format="npy"),
        ],
        "links": [L(1, "IMAGE", 2, "image"), L(2, "IMAGE", 4, "image"), L(3, "predictor", 4, "predictor"),
                  L(4, "image", 5, "images"), L(4, "raw", 6, "raw")],
    },
    "predictor_depth_to_mesh": {
        "title": "Single image → E2E-FT depth → textured 3D mesh (GLB)",
        "nodes": [
            N(1, "LoadImage", image=EXAMPLE),
            N(2, "JDPredictorLoader", model="marigold-e2e-ft-depth", dtype="auto", vae_fp32=True),
            N(3, "JDDepthNormalPredict", task="depth", processing_resolution=768, steps=1,
              ensemble_size=1, seed=0, spacing="trailing", normalisation="per_image"),
            N(4, "JDRGBDToMesh", projection="perspective", fov_deg=60.0, depth_kind="depth", near=1.0,
              far=6.0, discontinuity_threshold=0.1, downsample=1, format="glb",
              filename_prefix="jointdiffusion/predictor_mesh", color="texture"),
        ],
        "links": [L(1, "IMAGE", 3, "image"), L(2, "predictor", 3, "predictor"), L(1, "IMAGE", 4, "image"),
                  L(3, "image", 4, "depth")],
    },
})


def _sd_prompts(text):
    return ([N(1, "CheckpointLoaderSimple", ckpt_name=SD15),
             N(2, "CLIPTextEncode", text=text),
             N(3, "CLIPTextEncode", text="blurry, low quality, seam")],
            [L(1, "CLIP", 2, "clip"), L(1, "CLIP", 3, "clip")])


def _tiled_graph(title, text, latent_node, latent_links, sampler_widgets, sigmas_node, decode_circular,
                 preview=None, extra_nodes=(), extra_links=()):
    sampler_widgets = dict(sampler_widgets)
    needs_vae = sampler_widgets.pop("_needs_vae", ())
    nodes, links = _sd_prompts(text)
    nodes += [latent_node, sigmas_node,
              N(6, "JDTiledDiffusionSampler", **sampler_widgets),
              N(7, "SamplerCustom", add_noise=True, noise_seed=1, cfg=7.5),
              N(8, "JDTiledVAEDecode", tile=512, overlap=128, circular=decode_circular),
              N(9, "SaveImage", filename_prefix="jointdiffusion/panorama"), *extra_nodes]
    links += [L(1, "MODEL", 5, "model"), L(1, "MODEL", 7, "model"), L(2, "CONDITIONING", 7, "positive"),
              L(3, "CONDITIONING", 7, "negative"), L(6, "SAMPLER", 7, "sampler"), L(5, "SIGMAS", 7, "sigmas"),
              L(4, "LATENT", 7, "latent_image"), L(7, "output", 8, "samples"), L(1, "VAE", 8, "vae"),
              L(8, "IMAGE", 9, "images"), *latent_links, *extra_links]
    if "vae" in needs_vae:
        links.append(L(1, "VAE", 6, "vae"))
    if preview:
        nodes.append(N(10, "JDPanoramaPreview", projection=preview[0], span_deg=preview[1],
                       filename_prefix="jointdiffusion/panorama_view"))
        links.append(L(8, "IMAGE", 10, "images"))
    return {"title": title, "nodes": nodes, "links": links}


SPECS.update({
    "syncdiffusion_panorama_2048x512": _tiled_graph(
        "SyncDiffusion: a coherent 2048×512 panorama from a plain SD checkpoint (LPIPS sync toward the middle "
        "view; LPIPS VGG backbone file in models/lpips)",
        "a mountain lake at sunrise, wide panorama, photo",
        N(4, "EmptyLatentImage", width=2048, height=512, batch_size=1), [],
        dict(method="syncdiffusion", window=512, stride=128, circular=False, view_batch=4, eta=0.0,
             sync_weight=20.0, sync_decay=0.95, sync_freq=1, sync_thres=10, lpips_net="vgg", _needs_vae=("vae",)),
        N(5, "JDTrailingDDIMSigmas", steps=50, spacing="leading", zero_terminal_snr=False),
        False, preview=("cylindrical", 180.0)),
    "panorama_360_seamless": _tiled_graph(
        "360° seamless panorama: circular MultiDiffusion (wraps in x), circular tiled decoding, 360° viewer",
        "a sunny village square surrounded by houses, 360 degree equirectangular panorama",
        N(4, "EmptyLatentImage", width=2048, height=1024, batch_size=1), [],
        dict(method="multidiffusion", window=512, stride=256, circular=True, view_batch=4, eta=0.0),
        N(5, "JDTrailingDDIMSigmas", steps=30, spacing="trailing", zero_terminal_snr=False),
        True, preview=("equirectangular", 360.0)),
    "panorama_refinement": _tiled_graph(
        "Panorama refinement: upsample, then tiled SDEdit at strength 0.4 (JointNet appendix) with the "
        "JointNet tile strategy",
        "a mountain lake at sunrise, wide panorama, photo, sharp details",
        N(4, "VAEEncode"),
        [L(11, "IMAGE", 12, "image"), L(12, "IMAGE", 4, "pixels"), L(1, "VAE", 4, "vae")],
        dict(method="jointnet", window=512, stride=0, circular=False, view_batch=4, eta=0.0),
        N(5, "BasicScheduler", scheduler="ddim_uniform", steps=50, denoise=0.4),
        False, extra_nodes=(N(11, "LoadImage", image=EXAMPLE),
                            N(12, "ImageScale", upscale_method="lanczos", width=2048, height=512,
                              crop="disabled"))),
    "panorama_360_depth_to_mesh": _tiled_graph(
        "Text → 360° panorama (circular MultiDiffusion) → 360° depth and normals from a single-step predictor "
        "(views aligned jointly) → sphere mesh (GLB) + 360° viewers",
        "a sunny village square surrounded by houses, 360 degree equirectangular panorama",
        N(4, "EmptyLatentImage", width=2048, height=1024, batch_size=1), [],
        dict(method="multidiffusion", window=512, stride=256, circular=True, view_batch=4, eta=0.0),
        N(5, "JDTrailingDDIMSigmas", steps=30, spacing="trailing", zero_terminal_snr=False),
        True, preview=("equirectangular", 360.0),
        extra_nodes=(
            N(11, "JDPredictorLoader", model="marigold-e2e-ft-depth", dtype="auto", vae_fp32=True),
            N(12, "JDPredictorLoader", model="marigold-e2e-ft-normals", dtype="auto", vae_fp32=True),
            N(13, "JDPanoramaDepth", projection="equirectangular", horizontal_span_deg=360.0,
              method="aligned (joint scale/shift, 18 views)", fov_deg=90.0, view_size=0, seed=0),
            N(14, "SaveImage", filename_prefix="jointdiffusion/panorama_depth"),
            N(15, "SaveImage", filename_prefix="jointdiffusion/panorama_normals"),
            N(16, "JDRGBDToMesh", projection="equirectangular", fov_deg=60.0,
              horizontal_span_deg=360.0, depth_kind="auto", near=0.0, far=1.0, discontinuity_threshold=0.1,
              downsample=1, format="glb", filename_prefix="jointdiffusion/panorama_mesh", color="vertex"),
            N(17, "JDPanoramaPreview", projection="equirectangular", span_deg=360.0,
              filename_prefix="jointdiffusion/panorama_depth_view")),
        extra_links=(L(11, "predictor", 13, "predictor"), L(12, "predictor", 13, "normals_predictor"),
                     L(8, "IMAGE", 13, "image"), L(13, "depth", 14, "images"), L(13, "normals", 15, "images"),
                     L(8, "IMAGE", 16, "image"), L(13, "depth", 16, "depth"), L(13, "depth", 17, "images"))),
    "jointnet_rgbd_panorama_to_mesh": _jointnet_graph(
        "JointNet RGBD panorama (2048×512, tile strategy) → 180° cylindrical mesh (GLB) + panorama viewer",
        "joint_generation", "rgbd_finetune_sd21b",
        [N(5, "JDJointEmptyLatent", width=2048, height=512, batch_size=1),
         N(30, "JDPanoramaPreview", projection="cylindrical", span_deg=180.0,
           filename_prefix="jointdiffusion/rgbd_panorama_view"),
         N(31, "JDRGBDToMesh", projection="cylindrical", fov_deg=60.0, horizontal_span_deg=180.0,
           depth_kind="disparity", near=1.0, far=10.0, discontinuity_threshold=0.1, downsample=2, format="glb",
           filename_prefix="jointdiffusion/rgbd_panorama_mesh", color="vertex")],
        [L(5, "joint_latent", 20, "joint_latent"), L(21, "image", 30, "images"), L(21, "image", 31, "image"),
         L(21, "dense", 31, "depth")], {}, panorama=True),
})


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


NOTE_ID = 99  # the workflow's Note (a frontend-only node: not sent to the server)


def build(name: str, spec: dict, object_info: dict) -> dict:
    if name not in NOTES:
        raise KeyError(f"{name}: write its note in scripts/workflow_notes.py")
    title, description, note = NOTES[name]
    lay = workflow_layout.layout(spec["nodes"], spec["links"], note, title)
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
        ui[n["id"]] = {"id": n["id"], "type": n["type"], "pos": lay["pos"][n["id"]], "size": lay["size"][n["id"]],
                       "flags": {},
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
    nodes.append({"id": NOTE_ID, "type": "Note", "pos": lay["note"][0], "size": lay["note"][1], "flags": {},
                  "order": len(nodes), "mode": 0, "inputs": [], "outputs": [], "properties": {"text": ""},
                  "widgets_values": [note], "color": "#432", "bgcolor": "#653"})
    return {"last_node_id": max(ui.keys() | {NOTE_ID}), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": lay["groups"], "config": {},
            "extra": {"ds": lay["ds"],
                      "jointdiffusion": {"id": name, "title": title, "description": description,
                                         "summary": spec["title"]}},
            "version": 0.4}


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
        folder = REPO / "workflows"
        path = folder / f"{NOTES[name][0]}.json"
        for old in folder.glob("*.json"):  # the same workflow under an earlier file name: renamed, thumbnail kept
            if old != path and workflow_id(old) == name:
                if old.with_suffix(".jpg").exists() and not path.with_suffix(".jpg").exists():
                    old.with_suffix(".jpg").rename(path.with_suffix(".jpg"))
                old.unlink()
        path.write_text(json.dumps(wf, indent=1) + "\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
