"""Quality-report section for panoramas: MultiDiffusion vs SyncDiffusion vs the JointNet tile strategy on the
text-to-image model of the family, wide and 360° (see :mod:`jointcore.family.report`).

**SyncDiffusion's perceptual distance.** The paper uses LPIPS with ImageNet VGG16 features, which cannot be
downloaded here. The family's choice is LPIPS' VGG16 architecture with a *random* backbone generated from
seed 0 (LPIPS' own linear layers, which ship in the ``lpips`` package): Zhang et al. (2018) report that even
untrained networks' deep features carry much of the perceptual signal, and random ReLU features still
measure colour and texture statistics, which is what the synchronisation has to align. It is what the README
command's LPIPS stand-in file holds. To avoid grading a method by its own loss, coherence is measured with
*different* distances: LPIPS with a random AlexNet backbone (seed 1) and a model-free colour-statistics
distance (per-channel mean and standard deviation of the crops).
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

#: view geometry at the family's scale (a 64 px model = SD's 512 px window / 8): window 8 latents; stride 2
#: for MultiDiffusion and SyncDiffusion (the SyncDiffusion paper's 16 of 64), JointNet's 4 (32 of 64) with
#: its boundary 1 (8 of 64), random offsets and whole-image view.
WINDOW = 8
PANOS = {"wide": dict(width=256, circular=False), "360": dict(width=384, circular=True)}
STEPS = 25
GUIDANCE = 5.0
SYNC_STEPS = 10   # gradient steps on the first 10 of 25 (the official shell script: 10 of 50; w = 20, decay 0.95)


def configs():
    from jointcore.tiled import TiledConfig

    return {
        "MultiDiffusion": TiledConfig.multidiffusion(window=WINDOW, stride=2, view_batch=16),
        "SyncDiffusion": TiledConfig.syncdiffusion(window=WINDOW, stride=2, view_batch=16, sync_thres=SYNC_STEPS),
        "JointNet tiles": TiledConfig.jointnet(window=WINDOW, stride=4, boundary=1, view_batch=16),
    }


def colour_stats_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between per-channel (mean, std) of crops ``[N,3,h,w]`` in [-1,1] → ``[N]``."""
    sa = torch.cat([a.mean((2, 3)), a.std((2, 3))], 1)
    sb = torch.cat([b.mean((2, 3)), b.std((2, 3))], 1)
    return (sa - sb).abs().mean(1)


def pairwise_crops(images: torch.Tensor, fn, window: int = 64) -> torch.Tensor:
    """Mean of ``fn`` over all pairs of non-overlapping ``window`` crops of each panorama → ``[B]``."""
    W = images.shape[-1]
    xs = list(range(0, W - window + 1, window))
    out = []
    for img in images:
        crops = torch.stack([img[:, :, x:x + window] for x in xs])
        pairs = list(itertools.combinations(range(len(xs)), 2))
        a, b = crops[[p[0] for p in pairs]], crops[[p[1] for p in pairs]]
        out.append(fn(a, b).reshape(len(pairs), -1).mean())
    return torch.stack(out)


def section_panorama(ctx) -> tuple[str, dict]:
    from jointcore import schedules as S
    from jointcore.data import world as W
    from jointcore.denoiser import DiffusersUNetDenoiser, TextConditioning
    from jointcore.metrics_pano import load_lpips, seam_score
    from jointcore.tiled import decode_circular_padded, tiled_sample

    base = ctx.cache / "base"
    if not (base / "unet" / "config.json").is_file():
        return "## Panoramas\n\nNot built yet (stage `t2i`).\n", {}
    n = max(1, min(ctx.n, ctx.pano_count))
    unet, codec, _, _ = ctx.base_models()
    embed = ctx.embed
    den = DiffusersUNetDenoiser(unet, S.alphas_cumprod(), "epsilon")
    torch.manual_seed(0)
    guide = load_lpips("vgg", random_backbone=True)
    torch.manual_seed(1)
    judge = load_lpips("alex", random_backbone=True)
    seeds = range(W.HELDOUT_SEEDS.start, W.HELDOUT_SEEDS.start + n)
    scenes = [W.sample_scene(s) for s in seeds]
    prompts = [W.caption(s) for s in scenes]
    empty = embed([""])
    ts = S.ddim_timesteps(STEPS, "trailing")
    res, figs = {}, {}
    for kind, geo in PANOS.items():
        # ground truth: the same scenes through the world's cylindrical camera (exact panoramas)
        span = 360.0 if geo["circular"] else 180.0
        _, _, gt = W.render_seeds(seeds, 64, geo["width"], camera="cylindrical", span_deg=span, supersample=2)
        runs = {"ground truth": gt["rgb"]}
        for name, cfg in configs().items():
            cfg = dataclasses.replace(cfg, circular=geo["circular"])
            g = torch.Generator().manual_seed(ctx.seed)
            out = []
            for i, p in enumerate(prompts):
                x = torch.randn(1, 4, 8, geo["width"] // 8, generator=g)
                lat = tiled_sample(den, x, ts, TextConditioning(embed([p]), empty, GUIDANCE), cfg, generator=g,
                                   decode=lambda z: codec.decode(z), perceptual=lambda a, b: guide(a, b))
                with torch.no_grad():  # a 360° panorama is decoded across its seam, as the pack's nodes do
                    img = decode_circular_padded(codec.decode, lat) if geo["circular"] else codec.decode(lat)
                    out.append(((img.float().clamp(-1, 1) + 1) / 2))
            runs[name] = torch.cat(out)
        m = {}
        with torch.no_grad():
            for name, imgs in runs.items():
                x = imgs * 2 - 1
                m[name] = {"intra_lpips_alex_random": float(pairwise_crops(x, lambda a, b: judge(a, b)).mean()),
                           "colour_stats": float(pairwise_crops(x, colour_stats_distance).mean())}
                if geo["circular"]:
                    m[name]["seam"] = float(seam_score(imgs).median())  # median: one edge on the seam is 8×
        res[kind] = m
        figs[kind] = ctx.figure(f"panorama_{kind}", [runs[k][:3] for k in runs], scale=2)
    ok = all(res[k]["SyncDiffusion"]["intra_lpips_alex_random"] < res[k]["MultiDiffusion"]["intra_lpips_alex_random"]
             for k in res)
    rows = []
    for kind, m in res.items():
        for name, v in m.items():
            rows.append(f"| {kind} | {name} | {v['intra_lpips_alex_random']:.4f} | {v['colour_stats']:.4f} | "
                        f"{v['seam']:.2f} |" if "seam" in v else
                        f"| {kind} | {name} | {v['intra_lpips_alex_random']:.4f} | {v['colour_stats']:.4f} | – |")
    plot = ctx.bar_plot("panorama_coherence", list(res),
                        {name: [res[k][name]["intra_lpips_alex_random"] for k in res] for name in res["wide"]},
                        "intra-view distance (lower = more coherent)", "Panorama coherence")
    md = (f"## Panoramas\n\n{n} held-out captions, {STEPS} trailing DDIM steps, CFG {GUIDANCE:g}; wide = 64×256, "
          f"360° = 64×384 wrapping; views of 64 px, stride 16 px (JointNet tiles: 32 px). SyncDiffusion "
          f"(w = 20, decay 0.95) on the first {SYNC_STEPS} steps; its guidance: LPIPS-VGG16 architecture with a seeded random backbone "
          f"(no ImageNet weights here; see `jointcore/family/report_pano.py`); coherence judged with other "
          f"distances: LPIPS with a random AlexNet and colour statistics, mean over all pairs of 64 px crops "
          f"(lower = more coherent); seam score (median over panoramas) ≈ 1 for a seamless 360° panorama.\n\n"
          f"| panorama | method | intra-view LPIPS (random Alex) | colour-statistics distance | seam |\n"
          f"|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
          f"- SyncDiffusion claim *more coherent than MultiDiffusion* (lower intra-view LPIPS on both kinds) — "
          f"{ctx.verdict(ok)}.\n\n![coherence]({plot})\n\n"
          + "\n\n".join(f"![{k}: rows ground truth, MultiDiffusion, SyncDiffusion, JointNet tiles]({f})"
                        for k, f in figs.items()) + "\n")
    return md, res
