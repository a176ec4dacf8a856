"""What each shipped workflow's note says on the canvas, and its entry in the template browser.

A note answers, in this order: what the workflow does; which model files go where (folders under
``ComfyUI/models/``, exact names as the loaders in the workflow ask for them); what to change first; roughly how
long it takes. Times are estimates for one NVIDIA GPU of the RTX 3090/4090 class from the number of UNet passes
(SD at 512×512: roughly 15–25 passes a second) — no GPU was available where the pack is built — and, where a
CPU is the only choice, from runs on 2 CPU cores.
"""
from __future__ import annotations

SD15 = "checkpoints/v1-5-pruned-emaonly.safetensors"
SD21 = "checkpoints/v2-1_512-ema-pruned.safetensors"
E2E_DEPTH = "jointdiffusion_predictors/marigold-e2e-ft-depth/  (GonzaloMG/marigold-e2e-ft-depth, the whole folder)"
E2E_NORMALS = ("jointdiffusion_predictors/marigold-e2e-ft-normals/  (GonzaloMG/marigold-e2e-ft-normals, the whole "
               "folder)")
JN_FT = "jointnet/rgbd_finetune_sd21b/  (the official JointNet release unzipped: unet/ and jointnet/)"
JN_INP = "jointnet/rgbd_inpaint_sd21b/  (the official JointNet inpaint release unzipped: unet/ and jointnet/)"
PICTURE = "Load Image: your own picture (put it in ComfyUI/input/; the workflow asks for jointdiffusion_example.png)."
NO_WEIGHTS = ("No weights yet? The pack's small default family runs every workflow: see the README, "
              "'The built-in default family'.")


def _note(does: str, models: list[str], first: list[str], time: str) -> str:
    lines = [does, "", "MODEL FILES (under ComfyUI/models/)"]
    lines += [f"• {m}" for m in models]
    lines += ["", "CHANGE FIRST"] + [f"• {f}" for f in first]
    lines += ["", "TIME (rough estimate, not measured on a GPU)", time, "", NO_WEIGHTS]
    return "\n".join(lines)


# id: (title, description, note). The title is also the file name (``workflows/<title>.json``): the frontends'
# template browser shows a custom pack's templates by file name (frontend 1.35: title = the name, description =
# the name with - and _ as spaces), so it is plain ASCII without - or _ where avoidable, and no / \ : * ? " < > |.
NOTES: dict[str, tuple[str, str, str]] = {
    "trailing_ddim_txt2img": (
        "Trailing DDIM, text to image",
        "Any SD checkpoint sampled with the trailing DDIM schedule (the E2E-FT fix: the first step is t = 999).",
        _note("Text → image with any SD 1.x/2.x checkpoint, sampled by DDIM on the TRAILING schedule (E2E-FT, "
              "Garcia et al. 2024): the first step starts at the last training timestep, which fixes few-step "
              "sampling. Compare with spacing = leading in Trailing DDIM Schedule.",
              [SD15 + "  (or any SD 1.x/2.x checkpoint)"],
              ["the prompt", "steps in Trailing DDIM Schedule (try 4 and 10, trailing vs leading)",
               "the seed in SamplerCustom"],
              "10 steps at 512×512: about 1 s on a recent GPU; about a minute on a CPU.")),
    "diff2in1_depth_and_paired_data": (
        "Diff-2-in-1, depth and new paired data",
        "Depth from one UNet pass with a Diff-2-in-1 head, and new image/label pairs made from your pictures.",
        _note("Diff-2-in-1 (Zheng et al. 2025). Top: depth of your picture from ONE pass of a frozen SD UNet "
              "with a small trained head. Bottom: new training pairs — your picture noised to T = 600, "
              "denoised back by DDIM into a new image, labelled by the same head; saved as a numbered folder "
              "under output/diff2in1_pairs/.",
              ["diffusers/stable-diffusion-v1-5/  (a diffusers SD 1.5 folder: unet/ vae/ text_encoder/ tokenizer/ "
               "scheduler/)",
               "diff2in1/diff2in1-depth-head/  (config.json + head.safetensors, trained with "
               "python -m jointcore.train_diff2in1)"],
              [PICTURE, "captions and per_image in Create Pairs", "T (how far the new images may move from yours)"],
              "Depth: under a second on a GPU. Pairs: 50 DDIM steps per image, a few seconds each on a GPU.")),
    "mt_diffusion_masked_restoration": (
        "MT-Diffusion, restore a masked region",
        "Regenerate a masked square of your picture; every pixel outside the mask is kept exactly.",
        _note("MT-Diffusion constrained restoration: the masked square (Solid Mask + Mask Composite) is "
              "regenerated from the prompt, every pixel outside it is kept, and the two agree at the border.",
              [SD15],
              [PICTURE, "the square: x, y, width, height in Mask Composite / Solid Mask (pixels)", "the prompt"],
              "20 steps at 512×384: about 2 s on a recent GPU; a few minutes on a CPU.")),
    "image_to_depth_to_mesh": (
        "Picture to depth to 3D mesh (Diff-2-in-1)",
        "Depth of one picture from a Diff-2-in-1 head, turned into a textured GLB mesh shown in the node.",
        _note("One picture → depth (Diff-2-in-1 head, one UNet pass) → textured 3D mesh (GLB) in "
              "output/jointdiffusion/, shown in RGBD to Mesh after the run (drag to turn it). Depth Convention "
              "says near = dark, so the mesh is built the right way round.",
              ["diffusers/stable-diffusion-v1-5/  (a diffusers SD 1.5 folder)",
               "diff2in1/diff2in1-depth-head/  (config.json + head.safetensors)"],
              [PICTURE, "near / far and fov_deg in RGBD to Mesh (the depth range and the camera's field of view)",
               "discontinuity_threshold (higher keeps more faces across depth jumps)"],
              "A second or two on a GPU; under a minute on a CPU.")),
    "jointnet_text_to_rgbd": (
        "JointNet, text to picture and depth",
        "JointNet generates a picture and its depth map together from a prompt.",
        _note("JointNet (Zhang et al. 2024): a frozen SD 2.1 UNet makes the picture and a trainable copy the depth, "
              "densely connected, so text → RGB + depth in one joint sampling.",
              [SD21 + "  (its CLIP and VAE)", JN_FT],
              ["the prompt", "seed and steps in Joint KSampler", "width/height in Joint Empty Latent"],
              "50 DDIM steps of two UNets at 512×512: about 10 s on a recent GPU; far longer on a CPU.")),
    "jointnet_image_to_depth": (
        "JointNet, picture to depth",
        "Depth of your picture by JointNet's channel-wise inpainting (the picture is kept, the depth generated).",
        _note("Depth estimation with JointNet's inpaint model: the picture's channels are kept and only the depth "
              "is generated (channel-wise inpainting, task image_to_depth).",
              [SD21 + "  (its CLIP and VAE)", JN_INP],
              [PICTURE, "the prompt (describe the picture)", "steps in Joint KSampler"],
              "50 steps at 512×512: about 10 s on a recent GPU.")),
    "jointnet_depth_to_image": (
        "JointNet, depth to picture",
        "A new picture for a given depth map (here the depth of your picture from E2E-FT).",
        _note("Depth → image with JointNet's inpaint model: the depth is kept, the picture generated from the "
              "prompt. The depth here comes from your picture via the E2E-FT predictor; plug in any depth map "
              "(near = bright) instead.",
              [SD21 + "  (its CLIP and VAE)", JN_INP, E2E_DEPTH],
              [PICTURE, "the prompt (what the new picture shows)", "the seed in Joint KSampler"],
              "About 10 s on a recent GPU (50 steps + one predictor pass).")),
    "jointnet_rgbd_inpainting": (
        "JointNet, RGBD editing of a region",
        "Regenerate a square in both picture and depth; everything else is kept.",
        _note("RGBD editing: the square from Mask Composite is regenerated in the picture AND the depth "
              "(one mask per modality: image_mask, depth_mask), everything outside is kept.",
              [SD21 + "  (its CLIP and VAE)", JN_FT, E2E_DEPTH],
              [PICTURE, "the square: x, y in Mask Composite, width/height in the second Solid Mask (pixels)",
               "the prompt (what goes into the square)"],
              "About 10 s on a recent GPU.")),
    "jointnet_depth_refinement": (
        "JointNet, refine a coarse depth map",
        "SDEdit of a low-resolution depth map with JointNet at denoise 0.4, guided by the picture.",
        _note("Depth refinement: a coarse depth (E2E-FT at 256 px here) is noised part way and denoised by "
              "JointNet next to the full-resolution picture (task refine_depth, denoise 0.4).",
              [SD21 + "  (its CLIP and VAE)", JN_FT, E2E_DEPTH],
              [PICTURE, "denoise in Joint KSampler (higher = more change; 0.4 as in the paper)",
               "processing_resolution of the predictor (the coarse input)"],
              "20 of 50 steps run at denoise 0.4: a few seconds on a recent GPU.")),
    "predictor_image_to_depth_normals": (
        "Depth and normals in one step (E2E-FT)",
        "Single-step depth and surface normals with colour previews and raw 16-bit / float output.",
        _note("Depth and surface normals of one picture, each in ONE step (E2E-FT: trailing DDIM at t = 999). "
              "Previews are saved as pictures; the raw depth as a 16-bit PNG + .npy for other tools.",
              [E2E_DEPTH, E2E_NORMALS + "  (Marigold checkpoints prs-eth/marigold-* work too: set "
                                        "ensemble_size ≈ 10, init gaussian)"],
              [PICTURE, "processing_resolution (768 default; 0 = the picture's own size)",
               "colormap in Colorize Depth"],
              "Under a second per picture on a recent GPU; about a minute on a CPU at 768 px.")),
    "predictor_frames_to_depth_sequence": (
        "Video frames to a depth sequence",
        "Depth of a batch of frames in one step each, with one depth range for the whole batch.",
        _note("Depth for a batch of frames (here one picture repeated 4×: replace Load Image + Repeat Image "
              "Batch by your frame loader). normalisation = per_batch uses ONE depth range for all frames so the "
              "sequence does not flicker.",
              [E2E_DEPTH],
              [PICTURE + " For a video: a frame loader instead of Load Image + Repeat Image Batch.",
               "processing_resolution (512 here)", "format in Save Raw Prediction"],
              "About 0.3 s per frame on a recent GPU at 512 px.")),
    "predictor_depth_to_mesh": (
        "Picture to depth to 3D mesh (E2E-FT)",
        "One-step depth of a picture turned into a textured GLB mesh, shown in 3D in the node.",
        _note("One picture → depth in one step (E2E-FT) → textured 3D mesh (GLB in output/jointdiffusion/), shown "
              "in RGBD to Mesh after the run: drag to turn, wheel to zoom, double-click to reset.",
              [E2E_DEPTH],
              [PICTURE, "near / far (the depth range the mesh spans) and fov_deg in RGBD to Mesh",
               "downsample (2 or 4 for lighter meshes)"],
              "About a second on a recent GPU; under a minute on a CPU.")),
    "syncdiffusion_panorama_2048x512": (
        "SyncDiffusion, 2048x512 panorama",
        "A coherent wide panorama from a plain SD checkpoint: overlapping views pulled toward one style by LPIPS.",
        _note("SyncDiffusion (Lee et al. 2023): MultiDiffusion over 13 overlapping 512×512 views of a 2048×512 "
              "latent, with an LPIPS gradient pulling every view toward the middle one in the early steps, so the "
              "panorama has one style. The schedule is 'leading' on purpose: it is the paper's setting (the "
              "official code uses diffusers' DDIM default); use trailing for your own pictures.",
              [SD15, "lpips/vgg16-397923af.pth  (torchvision's ImageNet VGG16; alex: alexnet-owt-7be5be79.pth)"],
              ["the prompt", "sync_weight / sync_thres in Tiled Panorama Sampler (20 and 10 in the paper)",
               "width in Empty Latent Image (any multiple of 128 above 512)"],
              "50 steps, the first 10 synchronised: about 1–2 min on a recent GPU (one LPIPS backward per view per "
              "step); hours on a CPU.")),
    "panorama_360_seamless": (
        "360 panorama, seamless",
        "A full 360° equirectangular panorama with circular MultiDiffusion, viewed in the node's 360° viewer.",
        _note("A 360°×180° equirectangular panorama: MultiDiffusion with windows that wrap around in x (circular), "
              "decoded in circular tiles, so the left and right edges meet without a seam. Look around in "
              "Panorama Preview: drag, wheel, double-click.",
              [SD15],
              ["the prompt (say '360 degree equirectangular panorama')", "width/height in Empty Latent Image "
               "(keep 2:1)", "steps in Trailing DDIM Schedule"],
              "30 steps over 2048×1024: about 30–60 s on a recent GPU.")),
    "panorama_refinement": (
        "Panorama refinement (tiled SDEdit)",
        "Upsample a panorama and add detail tile by tile at denoise 0.4, with JointNet's tile strategy.",
        _note("Refinement of a wide picture: upsample to 2048×512, then tiled SDEdit (denoise 0.4 in Basic "
              "Scheduler) with JointNet's tile strategy (a whole-picture view in the early steps, then tiles at random offsets with boundary decay).",
              [SD15],
              ["Load Image: your panorama (put it in ComfyUI/input/; the workflow asks for jointdiffusion_example.png)",
               "denoise in Basic Scheduler (0.3–0.5)",
               "width/height in Upscale Image"],
              "20 of 50 steps over 2048×512: about 10–20 s on a recent GPU.")),
    "panorama_360_depth_to_mesh": (
        "Text to 360 panorama to depth to mesh",
        "A 360° panorama, its depth and normals from a perspective predictor (views aligned jointly), a sphere "
        "mesh and 360° viewers.",
        _note("A 360° panorama (circular MultiDiffusion), then its depth and normals from a "
              "perspective predictor — 18 overlapping views, each view's scale and shift solved jointly over all "
              "overlaps, blended without seams — then a sphere mesh (GLB) and 360° viewers of the panorama and its "
              "depth.",
              [SD15, E2E_DEPTH, E2E_NORMALS + "  (optional: unplug normals_predictor to skip normals)"],
              ["the prompt", "method in 360° Depth & Normals (compare views12 and naive)",
               "downsample in RGBD to Mesh (2 for a lighter mesh)"],
              "About 1 min on a recent GPU (30 panorama steps + 36 predictor views).")),
    "jointnet_rgbd_panorama_to_mesh": (
        "JointNet, RGBD panorama to 3D mesh",
        "A 2048×512 picture-and-depth panorama with JointNet, a 180° cylindrical mesh and a panorama viewer.",
        _note("A wide RGBD panorama with JointNet's tile strategy (picture and depth generated together over "
              "2048×512), then a 180° cylindrical mesh (GLB) shown in 3D in the node and a panorama viewer.",
              [SD21 + "  (its CLIP and VAE)", JN_FT],
              ["the prompt", "width in Joint Empty Latent and horizontal_span_deg in RGBD to Mesh / span_deg in "
               "Panorama Preview (together)", "near / far in RGBD to Mesh"],
              "50 steps over 2048×512 with two UNets: about 1 min on a recent GPU.")),
}
