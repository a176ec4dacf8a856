#!/usr/bin/env python3
"""Checks that need ComfyUI's own modules in-process; run as ``python comfy_probe.py CHECK`` with the
ComfyUI checkout as working directory (old ComfyUI parses ``sys.argv`` on import, so a clean process is
needed). Prints one JSON object.

CHECK:
  sigmas    ComfyUI's ModelSamplingDiscrete vs jointcore's timestep<->sigma conversions
  globals   ComfyUI globals before/after importing the pack (must be unchanged)
  optional  import the pack with some optional dependencies blocked
  models    every model the pack loads is owned by ComfyUI's memory manager: after a run it is in
            current_loaded_models with its size, a second run does not load it again, unload_all_models()
            releases it, and the next run loads it again
  realsize  random-weight models at the published sizes (SD 2.1-base JointNet inpaint pair in the official
            layout, .bin + .safetensors; an E2E-FT/Marigold SD 2 predictor; an SD 1.5 UNet in a single-file
            checkpoint), each saved, loaded through the pack's nodes and ComfyUI's own loader, and run for one
            step at a small latent on the CPU, with the peak RSS of each part (slow: a few minutes)
  family    a checkpoint assembled by jointcore.family.assemble (random family UNet + TAESD + the generated
            CLIP-L) loaded by ComfyUI's own checkpoint loader: detection, UNet, CLIP and VAE vs diffusers
"""
import importlib.abc
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
check = sys.argv[1]
sys.argv = sys.argv[:1]
sys.path.insert(0, os.getcwd())
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = os.environ.get("JD_PROBE_DEVICE", "cpu") == "cpu"  # "gpu": ComfyUI picks the device


def load_pack():
    """Import the pack the way ComfyUI does (module named after its folder)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("jointdiffusion", os.path.join(REPO, "__init__.py"),
                                                  submodule_search_locations=[REPO])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["jointdiffusion"] = mod
    spec.loader.exec_module(mod)
    return mod


def sigmas_check():
    import torch

    import comfy.model_sampling as cms

    pack = load_pack()
    P = sys.modules["jointdiffusion.jointcore.prediction"]
    S = sys.modules["jointdiffusion.jointcore.schedules"]
    sched = sys.modules["jointdiffusion.nodes.schedule"]

    class Cfg:  # what ModelSamplingDiscrete reads from a model config
        sampling_settings = {}

    out = {}
    ms = cms.ModelSamplingDiscrete(Cfg())
    ab = S.alphas_cumprod()
    ours = P.sigmas_from_alphas_cumprod(ab)
    out["max_sigma_table_rel_err"] = float(((ours - ms.sigmas.double()).abs() / ms.sigmas.double()).max())
    frac = torch.tensor([0.0, 0.25, 10.5, 499.3, 998.9, 999.0])
    out["max_sigma_interp_rel_err"] = float(((P.timestep_to_sigma(frac, ab) - ms.sigma(frac).double()).abs()
                                             / ms.sigma(frac).double()).max())
    probe = torch.cat([ms.sigmas[::37], ms.sigmas[::53] * 1.01])
    out["timestep_mismatches"] = int((P.sigma_to_timestep(probe, ab) != ms.timestep(probe).round().long()).sum())
    # the node's schedule, read from a ComfyUI model_sampling object, vs a direct jointcore computation
    node_ab = P.alphas_cumprod_from_sigma(ms.sigmas.double())
    diffs = []
    for n in (1, 3, 4, 10, 20, 50):
        a = sched.trailing_sigmas(node_ab, n, "trailing", False)
        b = P.schedule_sigmas(S.ddim_timesteps(n, "trailing"), ab)
        diffs.append(float(((a.double() - b.double()).abs() / b.double().clamp(min=1e-3)).max()))
        # ComfyUI's "simple" scheduler equals trailing spacing where rounding agrees
        if n in (4, 10, 20, 50):
            import comfy.samplers as cs
            try:  # ComfyUI >= mid 2024 takes model_sampling, older takes the model
                simple = cs.simple_scheduler(ms, n).double()
            except AttributeError:
                simple = cs.simple_scheduler(type("M", (), {"model_sampling": ms})(), n).double()
            out[f"simple_vs_trailing_{n}"] = float((simple - a.double()).abs().max())
    out["node_vs_direct_rel_err"] = max(diffs)
    out["trailing_1"] = S.ddim_timesteps(1, "trailing").tolist()
    out["timestep_of_first_sigma_1step"] = float(ms.timestep(sched.trailing_sigmas(node_ab, 1, "trailing", False)[:1])[0])
    out["timestep_of_first_sigma_1step_leading"] = float(
        ms.timestep(sched.trailing_sigmas(node_ab, 1, "leading", False, 1)[:1])[0])
    # zero terminal SNR: ComfyUI's own rescale (newer versions) gives σ_max ≈ 4518.8
    z = sched.trailing_sigmas(node_ab, 3, "trailing", True)
    out["zsnr_first_sigma"] = float(z[0])
    if hasattr(cms, "rescale_zero_terminal_snr_sigmas"):
        ref = cms.rescale_zero_terminal_snr_sigmas(ms.sigmas)
        ts = S.ddim_timesteps(3, "trailing")
        out["zsnr_rel_err_vs_comfy"] = float(((z[:-1].double() - ref[ts].double()).abs() / ref[ts].double()).max())
    print(json.dumps(out))


def snapshot():
    import folder_paths

    import comfy.model_management
    import comfy.samplers
    import nodes

    def names(mod):
        return {k: id(v) for k, v in vars(mod).items() if not k.startswith("__")}

    return {
        "samplers": names(comfy.samplers),
        "KSAMPLER_NAMES": list(comfy.samplers.KSampler.SAMPLERS) if hasattr(comfy.samplers.KSampler, "SAMPLERS") else [],
        "SCHEDULERS": list(comfy.samplers.KSampler.SCHEDULERS) if hasattr(comfy.samplers.KSampler, "SCHEDULERS") else [],
        "model_management": names(comfy.model_management),
        "nodes_mappings": sorted(nodes.NODE_CLASS_MAPPINGS),
        "folder_names": {k: [list(v[0]), sorted(v[1])] for k, v in folder_paths.folder_names_and_paths.items()},
        "torch_grad": __import__("torch").is_grad_enabled(),
        "torch_threads": __import__("torch").get_num_threads(),
    }


def globals_check():
    import nodes  # noqa: F401  (ComfyUI's built-in nodes)

    before = snapshot()
    pack = load_pack()
    after = snapshot()
    changed = [k for k in before if before[k] != after[k] and k != "folder_names"]
    fb, fa = before["folder_names"], after["folder_names"]
    folders_changed = sorted(k for k in fb if fb[k] != fa.get(k))
    folders_added = sorted(set(fa) - set(fb))
    print(json.dumps({"changed": changed, "folders_changed": folders_changed, "folders_added": folders_added,
                      "n_nodes": len(pack.NODE_CLASS_MAPPINGS)}))


class Blocker(importlib.abc.MetaPathFinder):
    def __init__(self, blocked):
        self.blocked = set(blocked)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ImportError(f"No module named '{name}' (blocked by test)")
        return None


def optional_check():
    import logging

    blocked = os.environ["JD_BLOCK"].split(",")
    for m in list(sys.modules):
        if m.split(".")[0] in blocked:
            del sys.modules[m]
    sys.meta_path.insert(0, Blocker(blocked))
    records = []
    h = logging.Handler()
    h.emit = lambda r: records.append(r.getMessage())
    logging.getLogger().addHandler(h)
    logging.getLogger().setLevel(logging.INFO)
    pack = load_pack()
    nodes_mod = sys.modules["jointdiffusion.nodes"]
    print(json.dumps({"nodes": sorted(pack.NODE_CLASS_MAPPINGS), "unavailable": nodes_mod.UNAVAILABLE,
                      "log": records}))


def family_check():
    import tempfile

    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    import comfy.sd

    sys.path.insert(0, REPO)
    from jointcore.family import assemble as A
    from jointcore.models import random_clip
    from jointcore.training.train_t2i import unet_config
    from jointcore.training.train_taesd import build_model

    torch.manual_seed(0)
    tmp = tempfile.mkdtemp()
    unet = UNet2DConditionModel(**unet_config())
    with torch.no_grad():  # random (not zero) output conv and norms so every key matters
        for n, p in unet.named_parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae = build_model()
    unet.save_pretrained(os.path.join(tmp, "unet"))
    vae.save_pretrained(os.path.join(tmp, "vae"))
    ck = A.sd15_checkpoint(os.path.join(tmp, "unet"), os.path.join(tmp, "vae"), os.path.join(tmp, "f.safetensors"),
                           dtype=torch.float32)
    with torch.no_grad():  # as ComfyUI's executor runs its nodes
        model, clip, cvae = comfy.sd.load_checkpoint_guess_config(ck, output_vae=True, output_clip=True,
                                                                  embedding_directory=None)[:3]
    out = {"model_config": type(model.model.model_config).__name__, "vae_class": type(cvae.first_stage_model).__name__}
    dm = model.model.diffusion_model.float()
    x, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 768)
    with torch.no_grad():
        a = dm(x, timesteps=t, context=c)
        b = unet(x, t, c).sample
    out["unet_max_abs_diff"] = float((a - b).abs().max())
    out["unet_scale"] = float(b.abs().mean())
    # CLIP: ComfyUI's text encoding vs transformers' CLIPTextModel with the generated weights and ComfyUI's tokenizer
    tok = CLIPTokenizer.from_pretrained(os.path.join(os.getcwd(), "comfy", "sd1_tokenizer"))
    te = random_clip.text_encoder()
    prompt = "a red sphere left of a blue box in a grey room"
    with torch.no_grad():
        enc = clip.encode_from_tokens(clip.tokenize(prompt))
    cond = enc[0] if isinstance(enc, tuple) else enc
    with torch.no_grad():
        ref = te(tok([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids)[0]
    out["clip_shape"] = list(cond.shape)
    out["clip_max_abs_diff"] = float((cond.float()[:, :77] - ref).abs().max())
    out["clip_scale"] = float(ref.abs().mean())
    # VAE: ComfyUI LATENT (= raw / 0.18215) decodes to what diffusers decodes from the raw latent
    img = torch.rand(1, 32, 32, 3)
    with torch.no_grad():
        lat = cvae.encode(img)
        raw = vae.encode(img.permute(0, 3, 1, 2) * 2 - 1).latents
        dec = (vae.decode(raw).sample.clamp(-1, 1) + 1) / 2
        cdec = cvae.decode(lat).float()
    out["vae_latent_max_abs_diff"] = float((lat.float() * A.SD1_LATENT_SCALE - raw).abs().max())
    out["vae_decode_max_abs_diff"] = float((cdec[0].permute(2, 0, 1) - dec[0]).abs().max())
    print(json.dumps(out))


def models_check():
    import torch

    import comfy.model_management as mm
    import folder_paths

    sys.path[:0] = [os.path.join(REPO, "scripts"), os.path.join(REPO, "tests")]
    import comfy_harness as H
    import tiny_models as T

    for folder, paths in T.build(H.cache_dir()).items():
        folder_paths.add_model_folder_path(folder, str(paths[0].parent))
    pack = load_pack()
    N = pack.NODE_CLASS_MAPPINGS
    common = sys.modules["jointdiffusion.nodes.common"]
    import importlib

    memory = importlib.import_module("jointdiffusion.jointcore.runtime.memory")
    loads = []  # pack models ComfyUI was asked to load while not in its loaded list (a real load)
    real_load_models_gpu = mm.load_models_gpu

    def loaded(patcher):
        for lm in mm.current_loaded_models:
            if lm.model is patcher:
                return lm
        return None

    def counting_load_models_gpu(models, *a, **k):
        loads.extend(p.model.jd_name for p in models if hasattr(p.model, "jd_name") and loaded(p) is None)
        return real_load_models_gpu(models, *a, **k)
    mm.load_models_gpu = counting_load_models_gpu

    def cond(width, seed=0):
        return [[torch.randn(1, 4, width, generator=torch.Generator().manual_seed(seed)), {}]]

    img = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(0))
    jl = N["JDJointNetLoader"]().load("rgbd_finetune_sd21b", "auto", "epsilon")[0]
    pl = N["JDPredictorLoader"]().load("marigold-e2e-ft-depth", "auto", True)[0]
    dl = N["JDDiff2in1Loader"]().load("stable-diffusion-v1-5", "diff2in1-depth-head")[0]
    pan = sys.modules["jointdiffusion.nodes.panorama"]
    empty = N["JDJointEmptyLatent"]().make(64, 64, 1)[0]
    runs = {
        "jointnet": (jl.patcher, jl.model, lambda: N["JDJointKSampler"]().sample(
            jl, cond(768), cond(768, 1), empty, "joint_generation", 0, 2, 4.0, "ddim", 0.0, 1.0)),
        "predictor": (pl.comfy_patcher, (pl.unet, pl.vae, pl.text_encoder), lambda: N["JDDepthNormalPredict"]().predict(
            pl, img, "depth", 32, 1, 1, 0, "trailing", "per_image")),
        "diff2in1": (dl.patcher, (dl.unet, dl.vae, dl.te, dl.head),
                     lambda: N["JDDiff2in1Predict"]().predict(dl, img, 32)),
        "lpips": (None, None, lambda: common.load_models(
            [pan._lpips("vgg", folder_paths.get_folder_paths("lpips"))[1]], 0, "LPIPS", "")),
    }
    out = {"comfyui_loaded_before": len(mm.current_loaded_models), "device": str(mm.get_torch_device())}
    cuda = mm.get_torch_device().type == "cuda"

    def timed(fn):
        import time

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            fn()
        if cuda:
            torch.cuda.synchronize()
        return round(time.perf_counter() - t, 3), (round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None)
    for name, (patcher, modules, run) in runs.items():
        n0 = len(loads)
        first_s, first_peak = timed(run)
        if patcher is None:  # the LPIPS network: the patcher the panorama node keeps
            perceptual, patcher = pan._lpips("vgg", folder_paths.get_folder_paths("lpips"))
            modules = (perceptual,)
        modules = modules if isinstance(modules, tuple) else (modules,)
        lm = loaded(patcher)
        r = {"loaded_after_run": lm is not None, "loads_first_run": len(loads) - n0,
             "size": int(lm.model_memory()) if lm is not None else None,
             "module_bytes": int(sum(memory.module_bytes(m) for m in modules)),
             "patcher_class": type(patcher).__name__, "held_class": type(patcher.model).__name__}
        n1 = len(loads)
        ptrs = [p.data_ptr() for p in patcher.model.parameters()]
        second_s, second_peak = timed(run)
        r.update(first_run_s=first_s, second_run_s=second_s, peak_vram_mib_first=first_peak,
                 peak_vram_mib_second=second_peak)
        r["loads_second_run"] = len(loads) - n1
        r["weights_not_copied"] = ptrs == [p.data_ptr() for p in patcher.model.parameters()]
        r["same_patcher_reused"] = loaded(patcher) is lm
        mm.unload_all_models()
        r["loaded_after_unload_all"] = loaded(patcher) is not None
        n2 = len(loads)
        with torch.inference_mode():
            run()
        r["loads_after_unload_run"] = len(loads) - n2
        r["loaded_again"] = loaded(patcher) is not None
        out[name] = r
    print(json.dumps(out))


def realsize_check():
    import gc
    import shutil
    import tempfile
    import time

    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    import comfy.model_management as mm
    import folder_paths

    sys.path[:0] = [os.path.join(REPO, "tests"), REPO]
    from jointcore.runtime.memory import process_memory, reset_peak_memory
    from predictor_ckpt import save_checkpoint, tiny_clip_tokenizer

    parts = os.environ.get("JD_REAL_PARTS", "jointnet,predictor,sd15").split(",")
    root = tempfile.mkdtemp(prefix="jd-real-")
    pack = load_pack()
    N = pack.NODE_CLASS_MAPPINGS
    memory = __import__("importlib").import_module("jointdiffusion.jointcore.runtime.memory")
    out = {}

    def sd2_unet(**kw):  # stabilityai/stable-diffusion-2-1-base unet/config.json fields
        torch.manual_seed(0)
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                                    use_linear_projection=True, **kw)

    def cond(width, seed=0):
        return [[torch.randn(1, 77, width, generator=torch.Generator().manual_seed(seed)), {}]]

    def finish(name, t0, base, **kw):
        out[name] = {"seconds": round(time.perf_counter() - t0, 1),  # building and saving included
                     # the process's peak RSS while loading and running (ComfyUI itself included), and before
                     "load_and_run_peak_rss_gib": round(process_memory("VmHWM") / 2**30, 2),
                     "rss_before_load_gib": round(base / 2**30, 2), **kw}
        print(name, out[name], file=sys.stderr, flush=True)
        mm.unload_all_models()
        gc.collect()

    if "jointnet" in parts:  # the official inpaint release's layout: unet/ (.bin) + jointnet/ (.safetensors)
        from jointcore.jointnet import JointNet

        t0 = time.perf_counter()
        folder = os.path.join(root, "jointnet", "rgbd_inpaint_sd21b")
        jn = JointNet.from_unet(sd2_unet(), has_masked_latent_input=True)
        jn.rgb.half().save_pretrained(os.path.join(folder, "unet"), safe_serialization=False)
        jn.dense.half().save_pretrained(os.path.join(folder, "jointnet"), safe_serialization=True)
        n_params = sum(p.numel() for p in jn.parameters())
        del jn
        for branch in ("unet", "jointnet"):  # as the official config.json files write it
            cfg_path = os.path.join(folder, branch, "config.json")
            with open(cfg_path) as f:
                cfg = json.load(f)
            cfg["joint_in_channels"] = None
            with open(cfg_path, "w") as f:
                json.dump(cfg, f)
        folder_paths.add_model_folder_path("jointnet", os.path.dirname(folder))
        gc.collect()
        base = reset_peak_memory()  # from here: load + run
        b = N["JDJointNetLoader"]().load("rgbd_inpaint_sd21b", "auto", "epsilon")[0]
        lat = N["JDJointEmptyLatent"]().make(256, 256, 1)[0]
        with torch.inference_mode():
            res = N["JDJointKSampler"]().sample(b, cond(1024), cond(1024, 1), lat, "joint_generation", 0, 1, 4.0,
                                                "ddim", 0.0, 1.0)[0]["samples"]
        lm = [x for x in mm.current_loaded_models if x.model is b.patcher]
        finish("jointnet", t0, base, params=n_params, masked_latent_conv=hasattr(b.model.rgb,
                                                                                "jointnet_masked_latent_conv"),
               out_shape=list(res.shape), finite=bool(torch.isfinite(res).all()),
               comfy_size=int(lm[0].model_memory()) if lm else None, module_bytes=memory.module_bytes(b.model))
        del b, lm, res
        shutil.rmtree(folder)

    if "predictor" in parts:  # E2E-FT / Marigold: SD 2 UNet with 8 input channels, SD VAE, OpenCLIP-H text
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel

        t0 = time.perf_counter()
        folder = os.path.join(root, "jointdiffusion_predictors", "marigold-e2e-ft-depth")
        unet = sd2_unet(in_channels=8)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=768)
        te = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                          num_attention_heads=16, projection_dim=1024, hidden_act="gelu"))
        tok = tiny_clip_tokenizer(os.path.join(root, "_tok"))
        sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="v_prediction",
                              timestep_spacing="trailing", steps_offset=1, set_alpha_to_one=False, clip_sample=False)
        save_checkpoint(folder, (unet.half(), vae.half(), te.half(), tok, sched), safe_serialization=True)
        n_params = sum(p.numel() for m in (unet, vae, te) for p in m.parameters())
        del unet, vae, te
        folder_paths.add_model_folder_path("jointdiffusion_predictors", os.path.dirname(folder))
        gc.collect()
        base = reset_peak_memory()
        pred = N["JDPredictorLoader"]().load("marigold-e2e-ft-depth", "auto", True)[0]
        img = torch.rand(1, 192, 256, 3, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            res = N["JDDepthNormalPredict"]().predict(pred, img, "depth", 256, 1, 1, 0, "trailing", "per_image")[0]
        lm = [x for x in mm.current_loaded_models if x.model is pred.comfy_patcher]
        finish("predictor", t0, base, params=n_params, unet_in_channels=pred.unet.config.in_channels,
               out_shape=list(res.shape), finite=bool(torch.isfinite(res).all()),
               comfy_size=int(lm[0].model_memory()) if lm else None,
               module_bytes=sum(memory.module_bytes(m) for m in (pred.unet, pred.vae, pred.text_encoder)))
        del pred, lm, res
        shutil.rmtree(folder)

    if "sd15" in parts:  # an SD 1.5-sized UNet in a single-file checkpoint, through ComfyUI's own loader
        import comfy.sample
        import comfy.sd

        from jointcore.family import assemble as A
        from jointcore.training.train_taesd import build_model

        t0 = time.perf_counter()
        torch.manual_seed(0)
        UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).save_pretrained(
            os.path.join(root, "sd15", "unet"))
        build_model().save_pretrained(os.path.join(root, "sd15", "vae"))
        ck = A.sd15_checkpoint(os.path.join(root, "sd15", "unet"), os.path.join(root, "sd15", "vae"),
                               os.path.join(root, "sd15.safetensors"))
        shutil.rmtree(os.path.join(root, "sd15"))
        gc.collect()
        base = reset_peak_memory()
        with torch.inference_mode():
            model, clip = comfy.sd.load_checkpoint_guess_config(ck, output_vae=True, output_clip=True,
                                                                embedding_directory=None)[:2]
            tokens = clip.tokenize("a wide mountain panorama")
            c, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
            positive = [[c, {"pooled_output": pooled}]]
            negative = [[torch.zeros_like(c), {"pooled_output": torch.zeros_like(pooled)}]]
            sigmas = N["JDTrailingDDIMSigmas"]().get_sigmas(model, 1, "trailing", False)[0]
            sampler = N["JDTiledDiffusionSampler"]().get_sampler("multidiffusion", 256, 128, True, 4, 0.0)[0]
            latent = torch.zeros(1, 4, 32, 96)
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
            res = comfy.sample.sample_custom(model, noise, 7.5, sampler, sigmas, positive, negative, latent,
                                             seed=0)
        finish("sd15_tiled", t0, base, model_config=type(model.model.model_config).__name__,
               out_shape=list(res.shape), finite=bool(torch.isfinite(res).all()))
        del model, clip, res
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out))


{"models": models_check, "realsize": realsize_check, "sigmas": sigmas_check, "globals": globals_check, "optional": optional_check, "family": family_check}[check]()
