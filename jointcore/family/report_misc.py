"""Quality-report sections for MT-Diffusion's constrained restoration and the RGBD → mesh exporter
(see :mod:`jointcore.family.report`)."""
from __future__ import annotations

import torch


def section_mt_restoration(ctx) -> tuple[str, dict]:
    """Masked restoration with the family's text-to-image UNet (one modality: the masked image, weight 0 — the
    model is not MT-trained, so the aggregation term vanishes and Algorithm 1 with the known-region hook
    remains). Error inside vs outside the mask, against a mean-colour fill of the hole as the reference."""
    from jointcore import mt_diffusion as M
    from jointcore import schedules as S
    from jointcore.denoiser import DiffusersUNetDenoiser, TextConditioning

    if not (ctx.cache / "base" / "unet" / "config.json").is_file():
        return "## MT-Diffusion restoration\n\nNot built yet (stage `t2i`).\n", {}
    unet, codec, _, _ = ctx.base_models()
    embed = ctx.embed
    ab = S.alphas_cumprod()
    den = DiffusersUNetDenoiser(unet, ab, "epsilon")
    agg = M.ForwardAggregation(ab, weights=0.0)
    _, rgb, _, _, caps = ctx.heldout()
    g = torch.Generator().manual_seed(ctx.seed)
    # one 32×32 px hole per image (a 4×4 latent block), at a random latent-aligned position
    mask = torch.zeros(len(rgb), 1, 64, 64)
    for i in range(len(rgb)):
        y, x = (int(v) * 8 for v in torch.randint(0, 5, (2,), generator=g))
        mask[i, :, y:y + 32, x:x + 32] = 1.0
    ts = list(range(999, -1, -20))
    out, latent_outside = [], 0.0
    with torch.no_grad():
        for i in range(0, len(rgb), 50):
            sl = slice(i, i + 50)
            known = codec.encode(rgb[sl] * 2 - 1)
            lm = M.mask_to_latent(mask[sl], 8)
            cond = TextConditioning(embed(caps[sl]), embed([""]), 3.0)
            z = M.masked_restoration_sample(den, known, lm, cond, agg, [torch.zeros_like(known)], ts, generator=g)
            latent_outside = max(latent_outside, float((z - known).abs()[(lm < 0.5).expand_as(z)].max()))
            out.append((codec.decode(z).float().clamp(-1, 1) + 1) / 2)
        rest = torch.cat(out)
        rec = torch.cat([(codec.decode(codec.encode(rgb[i:i + 50] * 2 - 1)).clamp(-1, 1) + 1) / 2
                         for i in range(0, len(rgb), 50)])
    inside, outside = mask.expand_as(rgb) > 0.5, mask.expand_as(rgb) < 0.5
    mean_fill = rgb * (1 - mask) + mask * (rgb * (1 - mask)).sum((2, 3), keepdim=True) / (1 - mask).sum((2, 3),
                                                                                                   keepdim=True)
    mae = lambda a, m: float((a - rgb).abs()[m].mean())  # noqa: E731
    res = {"inside": mae(rest, inside), "outside": mae(rest, outside), "autoencoder_outside": mae(rec, outside),
           "mean_fill_inside": mae(mean_fill, inside), "latent_outside_max_abs": latent_outside}
    ok = latent_outside == 0.0 and res["outside"] <= res["autoencoder_outside"] * 1.05 + 1e-4 and \
        res["inside"] < res["mean_fill_inside"]
    fig = ctx.figure("mt_restoration", [rgb[:8], (rgb * (1 - mask))[:8], rest[:8]])
    md = (f"## MT-Diffusion restoration\n\nClaim (MT-Diffusion §4.1): constrained restoration keeps the known region "
          f"and fills the masked one from the model. {len(rgb)} held-out scenes, one 32×32 px hole each, "
          f"{len(ts)} strided steps of Algorithm 1 with the known-region hook, the family's text-to-image UNet "
          f"(caption, CFG 3). Mean absolute error in [0,1] RGB: inside the hole **{res['inside']:.4f}** (a "
          f"mean-colour fill: {res['mean_fill_inside']:.4f}); outside **{res['outside']:.4f}** (the autoencoder's "
          f"own round trip: {res['autoencoder_outside']:.4f}; the decoder's receptive field lets the hole touch "
          f"pixels next to it, while the kept latents differ by {latent_outside:.1e}) — {ctx.verdict(ok)} (kept "
          f"latents exact, outside within 5 % of the autoencoder, inside better than the mean fill).\n\n![rows: scene, masked, restored]({fig})\n")
    return md, res


def chamfer(a: torch.Tensor, b: torch.Tensor) -> float:
    """Symmetric Chamfer distance (mean nearest-neighbour distance both ways, metres) of point sets ``[N,3]``."""
    d = torch.cdist(a.double(), b.double())
    return float(d.min(1).values.mean() + d.min(0).values.mean()) / 2


def section_mesh(ctx) -> tuple[str, dict]:
    """Meshes from ground-truth depth vs from the E2E-FT predictor's depth (aligned by scale and shift)."""
    from jointcore.data import world as W
    from jointcore.mesh import unproject
    from jointcore.metrics import align_scale_shift
    from jointcore.predictor import load_predictor

    pdir = ctx.cache / "predictor_depth" / "model"
    if not (pdir / "model_index.json").is_file():
        return "## Mesh\n\nNot built yet (stage `predictor_depth`).\n", {}
    scenes, rgb, depth, _, _ = ctx.heldout()
    cam = W.default_camera(scenes, "perspective", 64)
    pred = load_predictor(str(pdir))
    with torch.no_grad():
        p = torch.cat([pred.predict(rgb[i:i + 50], "depth", processing_resolution=0).prediction
                       for i in range(0, len(rgb), 50)])
    aligned = align_scale_shift(p.double(), depth.double()).clamp_min(0.05)
    flat = depth.mean((2, 3), keepdim=True).expand_as(depth)
    cd, cd_flat, size = [], [], []
    for i in range(len(rgb)):
        fov = float(cam.fov_deg[i])
        gt_pts = unproject(depth[i, 0], "perspective", fov_deg=fov).reshape(-1, 3)
        cd.append(chamfer(unproject(aligned[i, 0].float(), "perspective", fov_deg=fov).reshape(-1, 3), gt_pts))
        cd_flat.append(chamfer(unproject(flat[i, 0], "perspective", fov_deg=fov).reshape(-1, 3), gt_pts))
        size.append(float(gt_pts.max(0).values.sub(gt_pts.min(0).values).norm()))
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    res = {"chamfer_m": float(t(cd).mean()), "chamfer_flat_m": float(t(cd_flat).mean()),
           "relative": float((t(cd) / t(size)).mean()), "scene_diagonal_m": float(t(size).mean())}
    ok = res["chamfer_m"] < 0.5 * res["chamfer_flat_m"]
    md = (f"## Mesh\n\nMeshes (the exporter's unprojection, the scene's field of view) from ground-truth depth vs "
          f"from the 1-step E2E-FT depth aligned by scale and shift, {len(rgb)} held-out scenes. Symmetric Chamfer "
          f"distance **{res['chamfer_m']:.3f} m** ({100 * res['relative']:.1f} % of the visible extent, mean "
          f"{res['scene_diagonal_m']:.1f} m); a flat wall at the mean depth scores {res['chamfer_flat_m']:.3f} m — "
          f"{ctx.verdict(ok)} (predicted meshes at least twice as close as the flat one).\n")
    return md, res


def _quantized_copy(module: torch.nn.Module, scheme: str) -> torch.nn.Module:
    import copy

    from jointcore.family.quantize import dequantize_tensor, quantize_state_dict

    t, meta = quantize_state_dict(module.state_dict(), scheme)
    import json as _json

    info = _json.loads(meta["jd.quant"])
    sd = {k: (dequantize_tensor(v, t[k + "::scale"], info[k]["scheme"], info[k]["shape"]) if k in info else v.float())
          for k, v in t.items() if not k.endswith("::scale")}
    m = copy.deepcopy(module)
    m.load_state_dict(sd)
    return m


def section_quantization(ctx) -> tuple[str, dict]:
    """What shipping at 8 or 4 bits costs: the text-to-image samples (same noise) and the predictor's AbsRel."""
    from jointcore.family import evaluate as E
    from jointcore.family.report_dense import depth_scores
    from jointcore.predictor import load_predictor
    from jointcore.training.common import psnr

    if not (ctx.cache / "base" / "unet" / "config.json").is_file():
        return "## Quantisation\n\nNot built yet (stage `t2i`).\n", {}
    unet, codec, te, tok = ctx.base_models()
    _, rgb, depth, _, caps = ctx.heldout()
    res = {"t2i": {}, "predictor_depth": {}}
    with torch.no_grad():
        ref = None
        for scheme in ("fp32", "int8", "int4"):
            u = unet if scheme == "fp32" else _quantized_copy(unet, scheme)
            imgs = E.sample_t2i(u, codec.decode, te, tok, caps, steps=25, guidance=5.0, seed=ctx.seed)
            ref = imgs if ref is None else ref
            res["t2i"][scheme] = {"first_colour": E.colour_presence(imgs, caps)["first"],
                                  "psnr_vs_fp32_db": float(psnr(imgs, ref).clamp(max=99).mean())}
        pdir = ctx.cache / "predictor_depth" / "model"
        if (pdir / "model_index.json").is_file():
            pred = load_predictor(str(pdir))
            full = pred.unet
            for scheme in ("fp32", "int8", "int4"):
                pred.unet = full if scheme == "fp32" else _quantized_copy(full, scheme)
                p = torch.cat([pred.predict(rgb[i:i + 50], "depth", processing_resolution=0).prediction
                               for i in range(0, len(rgb), 50)])
                res["predictor_depth"][scheme] = depth_scores(p, depth)
    rows = "\n".join(f"| {s} | {100 * v['first_colour']:.0f} % | {v['psnr_vs_fp32_db']:.1f} | "
                     + (f"{res['predictor_depth'][s]['abs_rel']:.4f} |" if res["predictor_depth"] else "– |")
                     for s, v in res["t2i"].items())
    md = ("## Quantisation (for shipping)\n\nThe same held-out captions and noise through the text-to-image UNet "
          "with weights rounded to 8 bits per output channel or 4 bits per group of 64 (`jointcore.family.quantize`), "
          "and the E2E-FT depth predictor likewise:\n\n| weights | first colour present | samples' PSNR vs fp32 "
          f"(dB) | predictor AbsRel |\n|---|---|---|---|\n{rows}\n")
    return md, res


def section_shipped(ctx) -> tuple[str, dict]:
    """What the shipped form (``weights/default_family``: int8 UNet, 3- or 2-bit deltas, fp16) costs against the
    full-precision build: the predictors' scores and the JointNets' relative ε error on held-out inputs
    (sampling them twice would cost minutes for the same answer). The Diff-2-in-1 head ships as fp16 of itself."""
    import copy
    import json

    from jointcore import schedules as S
    from jointcore.family import ship
    from jointcore.family.report_dense import _batched, depth_scores
    from jointcore.jointnet import JointNet
    from jointcore.metrics import normal_errors, summarise_normal_errors
    from jointcore.predictor import load_predictor

    src = ctx.shipped
    if src is None or not (src / ship.MANIFEST).is_file():
        return "## The shipped form\n\nNot exported yet (`python -m jointcore.family.ship export`).\n", {}
    need = [ctx.cache / st / "model" for st in ("predictor_depth", "predictor_normals", "jointnet", "jointnet_inpaint")]
    if not all(d.is_dir() for d in need) or not (ctx.cache / "base" / "vae").is_dir():
        return ("## The shipped form\n\nNot built yet (stages `predictor_depth`, `predictor_normals`, `jointnet`, "
                "`jointnet_inpaint`): no full-precision build to compare the shipped form with.\n", {})
    manifest = json.loads((src / ship.MANIFEST).read_text())
    shipped = {rel: sd for rel, _, sd in ship.shipped_weights(src)}
    _, rgb, depth, normals, caps = ctx.heldout()
    res: dict = {"total_mb": manifest["total_bytes"] / 1e6}
    with torch.no_grad():
        for stage, task in (("predictor_depth", "depth"), ("predictor_normals", "normals")):
            pred = load_predictor(str(ctx.cache / stage / "model"))
            scores = {}
            for form in ("full", "shipped"):
                if form == "shipped":
                    pred.unet.load_state_dict(shipped[f"{stage}/model/unet"])
                p = _batched(lambda x: pred.predict(x, task, processing_resolution=0).prediction, rgb)
                scores[form] = depth_scores(p, depth)["abs_rel"] if task == "depth" else \
                    summarise_normal_errors(normal_errors(p, normals))["mean_deg"]
            res[stage] = scores
        # JointNets: ‖ε_shipped − ε_full‖ / ‖ε_full‖ on held-out latents at three noise levels, caption-conditioned
        _, codec, _, _ = ctx.base_models()
        n = min(len(rgb), 32)
        lat = codec.encode(rgb[:n] * 2 - 1)
        emb = ctx.embed(caps[:n])
        ab = S.alphas_cumprod().float()
        g = torch.Generator().manual_seed(ctx.seed)
        for stage in ("jointnet", "jointnet_inpaint"):
            full = JointNet.from_pretrained(str(ctx.cache / stage / "model")).eval()
            small = copy.deepcopy(full)
            small.rgb.load_state_dict(shipped[f"{stage}/model/unet"])
            small.dense.load_state_dict(shipped[f"{stage}/model/jointnet"])
            x0 = torch.cat([lat, lat[:, :small.latent_channels[1]].roll(1, 0)], 1)   # any dense latent will do
            kw = {}
            if full.has_masked_latent_input:   # image → depth: the RGB latents given, the dense ones generated
                ones = torch.ones(n, 1, *lat.shape[-2:])
                kw = dict(mask_rgb=0 * ones, masked_rgb=lat, mask_dense=ones, masked_dense=0 * x0[:, lat.shape[1]:])
            errs = []
            for t in (999, 500, 100):
                a = ab[t]
                xt = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=g)
                tt = torch.full((n,), t)
                e_full, e_small = full(xt, tt, emb, **kw), small(xt, tt, emb, **kw)
                errs.append(float((e_small - e_full).norm() / e_full.norm()))
            res[stage] = {"relative_eps_error": max(errs)}
    ok = abs(res["predictor_depth"]["shipped"] - res["predictor_depth"]["full"]) <= 0.1 * res["predictor_depth"]["full"] \
        and all(res[s]["relative_eps_error"] < 0.05 for s in ("jointnet", "jointnet_inpaint"))
    pd, pn = res["predictor_depth"], res["predictor_normals"]
    md = (f"## The shipped form\n\n`weights/default_family` ({res['total_mb']:.1f} MB: the text-to-image UNet in "
          f"int8, every fine-tuned model as its 3- or 2-bit delta from what it was tuned from, the autoencoder and "
          f"head in fp16) against the full-precision build, {len(rgb)} held-out scenes:\n\n"
          f"| model | full precision | shipped |\n|---|---|---|\n"
          f"| E2E-FT depth, AbsRel | {pd['full']:.4f} | {pd['shipped']:.4f} |\n"
          f"| E2E-FT normals, mean angle | {pn['full']:.2f}° | {pn['shipped']:.2f}° |\n"
          f"| JointNet, relative ε error (worst of t = 999, 500, 100; {n} scenes) | – | "
          f"{res['jointnet']['relative_eps_error']:.4f} |\n"
          f"| JointNet inpaint (image → depth inputs), relative ε error | – | "
          f"{res['jointnet_inpaint']['relative_eps_error']:.4f} |\n\n"
          f"The text-to-image UNet's int8 cost is in the quantisation section. Quality holds when the depth AbsRel "
          f"moves by at most 10 % and the JointNets' ε by under 5 % — {ctx.verdict(ok)}.\n")
    return md, res
