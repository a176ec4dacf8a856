"""Ship the built family in the repository, and rebuild the usable folders from it on first use.

    python -m jointcore.family.ship export  [--cache BUILD_CACHE] [--to weights/default_family]
    python -m jointcore.family.ship install [--from weights/default_family] [--to INSTALL_DIR]

``export`` writes the small form: the text-to-image UNet in int8 (per output channel), the autoencoder and the
Diff-2-in-1 head in fp16, and every model fine-tuned from the text-to-image UNet (predictors, both JointNet
branches of both variants) as its delta from the weights it was tuned from (low-rank where it is, else 3 or 2
bits per weight; a frozen branch costs nothing), added to their shipped form on install, plus each folder's
small JSON files and ``manifest.json`` (files, sizes, SHA-256, each delta's reference). The frozen CLIP-L
text encoder is never shipped: ``install`` generates it bit-identically (``jointcore.models.random_clip``), takes
the tokenizer from ComfyUI (:func:`jointcore.family.build.find_tokenizer`), rebuilds every folder in the
layout the build writes (``base/``, ``predictor_depth/model`` …), and assembles the ComfyUI checkpoint.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Sequence

from jointcore.family import quantize as Q

#: (folder relative to the build cache, how its weight file is stored)
WEIGHTS = (
    ("base/vae", "fp16"),
    ("base/unet", "int8"),
    ("predictor_depth/model/unet", "delta"),
    ("predictor_normals/model/unet", "delta"),
    ("jointnet/model/unet", "delta"),
    ("jointnet/model/jointnet", "delta"),
    ("jointnet_inpaint/model/unet", "delta"),
    ("jointnet_inpaint/model/jointnet", "delta"),
    ("diff2in1/model", "fp16"),
)
#: each delta's reference (the weights it was fine-tuned from; default the text-to-image UNet) and the bits of
#: a delta that is not low-rank: 3 where fine-tuning moved the weights far (4–7 % of their norm), 2 where it
#: moved them little (the inpaint stage: under 2 %), so that both cost about the same in accuracy
DELTA_FROM = {"jointnet_inpaint/model/jointnet": "jointnet/model/jointnet"}
DELTA_BITS = {"predictor_depth/model/unet": "int3", "predictor_normals/model/unet": "int3",
              "jointnet/model/jointnet": "int3", "jointnet_inpaint/model/unet": "int2",
              "jointnet_inpaint/model/jointnet": "int2"}
#: small files copied as they are (relative to the build cache)
SMALL = ("base/scheduler/scheduler_config.json", "base/model_index.json",
         "predictor_depth/model/model_index.json", "predictor_depth/model/scheduler/scheduler_config.json",
         "predictor_normals/model/model_index.json", "predictor_normals/model/scheduler/scheduler_config.json")
#: components of a predictor folder that are the base's own (linked on install)
SHARED = ("vae", "text_encoder", "tokenizer")
DELTA_TOL = 0.02
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "head.safetensors")
MANIFEST = "manifest.json"


def _weight_file(folder: Path) -> Path:
    for n in WEIGHT_NAMES:
        if (folder / n).is_file():
            return folder / n
    raise FileNotFoundError(f"{folder} has no weight file ({' or '.join(WEIGHT_NAMES)}); is the family built?")


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def export(cache: Path, dest: Path, delta_tol: float = DELTA_TOL) -> dict:
    """Write the shipped form of the family built in ``cache`` to ``dest`` (replaced); returns the manifest."""
    from safetensors.torch import load_file, save_file

    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    trained = {}   # the float weights as trained, the references of the deltas
    files = {}
    for rel, how in WEIGHTS:
        src = cache / rel
        w = _weight_file(src)
        out = dest / rel
        out.mkdir(parents=True, exist_ok=True)
        for j in src.glob("*.json"):
            shutil.copy2(j, out / j.name)
        sd = load_file(str(w))
        target = out / (w.stem + f".{how}.safetensors")
        if how == "fp16":
            save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()},
                      str(target))
        elif how == "int8":
            Q.save_quantized(sd, str(target), "int8")
        else:
            ref, bits = DELTA_FROM.get(rel, "base/unet"), DELTA_BITS.get(rel, "int3")
            if ref not in trained:
                raise RuntimeError(f"{ref} must be exported before the delta {rel}")
            # the delta from the weights the model was fine-tuned from: a frozen branch is not stored at all
            Q.save_delta(sd, trained[ref], str(target), rel_tol=delta_tol, fallback=bits)
        trained[rel] = sd
        entry = files[str(target.relative_to(dest))] = {"bytes": target.stat().st_size, "sha256": _sha256(target),
                                                        "from": f"{rel}/{w.name}", "stored": how}
        if how == "delta":
            entry.update(reference=ref, bits=bits)
    for rel in SMALL:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(cache / rel, dest / rel)
    manifest = {"format": "jointdiffusion.family.shipped", "version": 1, "delta_rel_tol": delta_tol,
                "total_bytes": sum(f["bytes"] for f in files.values()), "files": files}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (dest / "MODEL_CARD.md").write_text(model_card(cache, manifest))
    return manifest


def headline_metrics(m: dict) -> str:
    """A short table of the report's headline figures (``docs/quality/metrics.json``); sections missing from
    ``m`` are left out."""
    rows = []

    def row(what, value, target=""):
        rows.append(f"| {what} | {value} | {target} |")

    if m.get("vae"):
        row("autoencoder PSNR", f"{m['vae']['psnr_mean_db']:.2f} dB", "≥ 28 dB")
    if m.get("t2i"):
        row("text → image: first named colour present", f"{100 * m['t2i']['samples']['first']:.1f} %", "≥ 70 %")
    p = m.get("predictor", {}).get("after E2E-FT")
    if p:
        row("depth AbsRel, E2E-FT trailing 1 step / leading 1 step",
            f"{p['trailing, 1 step']['abs_rel']:.4f} / {p['leading, 1 step']['abs_rel']:.4f}", "≤ 0.08 / worse")
    n = m.get("predictor", {}).get("normals", {}).get("trailing, 1 step")
    if n:
        row("normals mean angular error, 1 step", f"{n['mean_deg']:.1f}°")
    j = m.get("jointnet")
    if j:
        row("JointNet image → depth AbsRel (predictor's)",
            f"{j['image_to_depth']['abs_rel']:.4f} ({j['predictor']['abs_rel']:.4f})", "≤ 1.5× the predictor's")
    d = m.get("diff2in1")
    if d:
        row("Diff-2-in-1 head AbsRel, warm-up → self-improved",
            f"{d['warm-up']['abs_rel']:.4f} → {d['self-improved']['abs_rel']:.4f}", "lower")
    pano = m.get("panorama", {}).get("360")
    if pano:
        row("360° panorama intra-view LPIPS (random Alex), MultiDiffusion / SyncDiffusion",
            f"{pano['MultiDiffusion']['intra_lpips_alex_random']:.4f} / "
            f"{pano['SyncDiffusion']['intra_lpips_alex_random']:.4f}", "Sync lower")
    sh = m.get("shipped")
    if sh:
        row("the shipped form: depth AbsRel / JointNet ε error / inpaint ε error",
            f"{sh['predictor_depth']['shipped']:.4f} / {sh['jointnet']['relative_eps_error']:.3f} / "
            f"{sh['jointnet_inpaint']['relative_eps_error']:.3f}", "AbsRel within 10 %, ε under 5 %")
    if m.get("mesh"):
        row("mesh Chamfer, predicted vs true depth", f"{m['mesh']['chamfer_m']:.3f} m")
    if not rows:
        return "(no measurements yet)"
    return "| measure | value | target |\n|---|---|---|\n" + "\n".join(rows)


def model_card(cache: Path, manifest: dict) -> str:
    """The model card: what is shipped, data, recipe, the command that rebuilds it, metrics, licence."""
    from jointcore.family import build as B

    quality = Path(__file__).resolve().parents[2] / "docs" / "quality" / "metrics.json"
    times = {}
    for st in B.STAGES:
        f = cache / st / "DONE.json"
        if f.is_file():
            times[st] = json.loads(f.read_text()).get("seconds")
    rows = "\n".join(f"| `{k}` | {v['stored']} | {v['bytes'] / 1e6:.2f} MB |" for k, v in manifest["files"].items())
    recipe = "\n".join(f"| `{st}` | `{' '.join(B.OWN_ARGS.get(st, []))}` | "
                        f"{'' if times.get(st) is None else f'{times[st] / 60:.0f} min'} |" for st in B.STAGES)
    return f"""# The jointdiffusion default model family (v{B.VERSION})

Small models trained in this repository, on CPU, from data the pack renders itself — so that every node and
workflow shows pictures a person can judge on machines where no pretrained weight can be downloaded. They
are **toys**: 64×64 pixels, one procedural world, a random frozen text encoder. They are not a substitute for
Stable Diffusion, Marigold, E2E-FT or JointNet checkpoints.

## What is shipped ({manifest['total_bytes'] / 1e6:.1f} MB)

| file | stored as | size |
|---|---|---|
{rows}

`int8`: per-output-channel 8-bit weights with fp16 scales; `delta`: the difference from the weights it was
fine-tuned from (the text-to-image UNet, or the stage-1 JointNet branch for the inpaint variant's; added to
their shipped form on install), each large matrix truncated by SVD to a relative error of
{manifest['delta_rel_tol']:g}, or, when no low rank suffices, 3 or 2 bits per weight (uniform levels per group
of 64 scaled by the group's RMS); a frozen branch equal to its reference is not stored; `fp16`: as trained, in
half precision (`jointcore.family.quantize`). What this costs is measured in the report's "shipped form"
section (the shipped form against the full-precision build; 8- and 4-bit weights in its quantisation section). Not
shipped: the frozen CLIP-L text encoder, generated bit-identically on every machine
(`jointcore.models.random_clip`, SHA-256-pinned), and the CLIP tokenizer, taken from ComfyUI.
`python -m jointcore.family.ship install` (run automatically on first use) rebuilds the diffusers folders
and the single-file ComfyUI checkpoint in `~/.cache/jointdiffusion/shipped-v{B.VERSION}/`.

## Models

- **Autoencoder**: TAESD layout (`AutoencoderTiny`, 8× down-sampling, 4 latent channels, 2.4 M parameters);
  loads in diffusers and, inside the checkpoint, in ComfyUI.
- **Text-to-image UNet**: a one-level SD 1.x-shaped UNet (model_channels 320, channel_mult [1], one res
  block, transformer depth 1, context 768; 25.8 M parameters), ε-prediction; ComfyUI's Load Checkpoint
  detects it as SD 1.5.
- **Depth predictor**: the UNet widened to 8 input channels (Marigold), trained as Marigold (diffusion,
  v-prediction, multi-resolution noise), then end-to-end fine-tuned (E2E-FT, one step at t = 999, affine-
  invariant L1 through the frozen decoder); Marigold / E2E-FT diffusers layout, trailing DDIM, 1 step.
- **Normals predictor**: E2E-FT (angular loss) from the widened text-to-image UNet.
- **JointNet** (`jointnet/`, official layout `unet/` + `jointnet/`): stage 1 — RGB branch frozen, dense
  (disparity) branch and exchange layers trained; **JointNet inpaint** (`jointnet_inpaint/`): stage 3 with the
  masked-latent input, for image → depth and depth → image.
- **Diff-2-in-1 depth head** on the text-to-image UNet's features: warm-up on 512 labelled scenes, pairs
  created from 256 unlabelled ones, self-improving stage.

## Data

`jointcore.data.world`: rooms with floor and walls, 1–4 primitives (box, sphere, cylinder, cone) in 14
named colours and three textures, one point light with shadows, captions from a small grammar. Training:
{B.TRAIN_SCENES} scenes, seeds 0 … {B.TRAIN_SCENES - 1}; evaluation: held-out seeds from 10⁹ (never trained on).
64×64, rendered at 2× and averaged.

## Recipe and rebuild

```bash
python -m jointcore.family.build          # every stage, cached; ≈ 3 h on 2 CPU cores
python -m jointcore.family.ship export    # writes weights/default_family/
```

| stage | its own arguments | time here |
|---|---|---|
{recipe}

## Measured quality

`python -m jointcore.family.report --out docs/quality.md --scenes 200` — the full report with figures is
[docs/quality.md](../../docs/quality.md){' (metrics in docs/quality/metrics.json)' if quality.is_file() else ''}.
Headline figures, measured with the full-precision build on held-out scenes:

{headline_metrics(json.loads(quality.read_text()) if quality.is_file() else {{}})}

## Licence

GPL-3.0, as the repository. Trained only on data generated by this repository; no third-party weights or
data sets are involved (the text encoder is random).
"""


def shipped_weights(src: Path):
    """Yield ``(folder, weight file name, float state dict)`` for every shipped weight file of ``src``, rebuilt
    as install writes them: int8 dequantised, each delta added to its rebuilt reference (from the manifest)."""
    from safetensors.torch import load_file

    manifest = json.loads((src / MANIFEST).read_text())
    refs = {v["from"].rsplit("/", 1)[0]: v.get("reference", "base/unet") for v in manifest["files"].values()
            if v["stored"] == "delta"}
    rebuilt = {}
    for rel, how in WEIGHTS:
        shipped = next((src / rel).glob(f"*.{how}.safetensors"))
        name = shipped.name.replace(f".{how}.safetensors", ".safetensors")
        if how == "fp16":
            sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(shipped)).items()}
        elif how == "int8":
            sd = Q.load_quantized(str(shipped))
        else:
            sd = Q.load_delta(str(shipped), rebuilt[refs[rel]])
        if rel in refs.values():
            rebuilt[rel] = sd
        yield rel, name, sd


def install(src: Path, dest: Path, tokenizer: Optional[str] = None, log=print, make_base=None,
            checkpoint: bool = True) -> Path:
    """Rebuild the family's folders from the shipped form ``src`` into ``dest`` (a build-cache layout) and
    assemble the ComfyUI checkpoint; returns ``dest``. Files are checked against the manifest first.

    ``make_base(folder)`` replaces the generation of ``base/`` (text encoder, tokenizer, scheduler) in tests;
    ``checkpoint=False`` skips the single-file checkpoint."""
    from safetensors.torch import save_file

    from jointcore.family import build as B

    man_path = src / MANIFEST
    if not man_path.is_file():
        raise FileNotFoundError(f"{src} is not a shipped family (no {MANIFEST})")
    manifest = json.loads(man_path.read_text())
    for rel, meta in manifest["files"].items():
        p = src / rel
        if not p.is_file():
            raise FileNotFoundError(f"shipped family file {p} is missing (listed in {man_path})")
        if p.stat().st_size != meta["bytes"] or _sha256(p) != meta["sha256"]:
            raise ValueError(f"shipped family file {p} does not match its SHA-256 in {man_path} (corrupt or a Git "
                             f"LFS pointer?); restore it with `git checkout -- {rel}`")
    tmp = dest.with_name(dest.name + f".{os.getpid()}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    b = B.Builder(tmp, tokenizer=tokenizer, log=log)
    (tmp / "base").mkdir(parents=True)
    log("generating the frozen CLIP-L text encoder and tokenizer …")
    (make_base or (lambda _folder: b.base()))(tmp / "base")
    for rel in SMALL:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / rel, tmp / rel)
    for rel, name, sd in shipped_weights(src):
        d = tmp / rel
        d.mkdir(parents=True, exist_ok=True)
        for j in (src / rel).glob("*.json"):
            shutil.copy2(j, d / j.name)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / name))
    for stage in ("predictor_depth", "predictor_normals"):
        for comp in SHARED:
            (tmp / stage / "model" / comp).symlink_to(Path("..") / ".." / "base" / comp, target_is_directory=True)
    if checkpoint:
        from jointcore.family.assemble import sd15_checkpoint

        sd15_checkpoint(str(tmp / "base" / "unet"), str(tmp / "base" / "vae"),
                        str(tmp / "checkpoint" / B.CHECKPOINT_NAME),
                        metadata={"what": "jointdiffusion default family (shipped), text-to-image",
                                  "version": B.VERSION})
    (tmp / "INSTALLED.json").write_text(json.dumps({"from": str(src.resolve()),
                                                    "manifest_sha256": _sha256(man_path)}, indent=1))
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def installed_dir() -> Path:
    from jointcore.family import build as B

    return B.default_cache().parent / f"shipped-v{B.VERSION}"


def shipped_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "weights" / "default_family"


def ensure_installed(log=print) -> Path:
    """The installed family, installing it from the repository's shipped form when missing or outdated."""
    src, dest = shipped_dir(), installed_dir()
    stamp = dest / "INSTALLED.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("manifest_sha256") == _sha256(src / MANIFEST):
        return dest
    log(f"installing the default family from {src} into {dest} (first use) …")
    return install(src, dest, log=log)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from jointcore.family import build as B
    from jointcore.training.common import run_cli

    ap = argparse.ArgumentParser(prog="python -m jointcore.family.ship", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the shipped form of a built family")
    e.add_argument("--cache", default=None, help="build cache (default: the build's)")
    e.add_argument("--to", default=str(shipped_dir()))
    e.add_argument("--delta-tol", type=float, default=DELTA_TOL)
    i = sub.add_parser("install", help="rebuild usable folders from the shipped form")
    i.add_argument("--from", dest="src", default=str(shipped_dir()))
    i.add_argument("--to", default=str(installed_dir()))
    i.add_argument("--tokenizer", default=None)
    a = ap.parse_args(argv)
    if a.cmd == "export":
        def run():
            m = export(Path(a.cache) if a.cache else B.default_cache(), Path(a.to), a.delta_tol)
            for k, v in m["files"].items():
                print(f"{v['bytes'] / 1e6:8.2f} MB  {k}")
            print(f"{m['total_bytes'] / 1e6:8.2f} MB  in all")
        return run_cli(run)
    return run_cli(lambda: install(Path(a.src), Path(a.to), a.tokenizer))


if __name__ == "__main__":
    sys.exit(main())
