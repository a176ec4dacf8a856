"""The Khronos glTF validator (npm package ``gltf-validator``) for tests: installed once into the cache with
the machine's Node.js and npm, then run on a file; returns its report (``issues.numErrors`` …)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

VERSION = "2.0.0-dev.3.10"
SCRIPT = """
const v = require('gltf-validator');
const fs = require('fs');
v.validateBytes(new Uint8Array(fs.readFileSync(process.argv[2])), {maxIssues: 200})
  .then(r => console.log(JSON.stringify(r)))
  .catch(e => { console.error(String(e)); process.exit(2); });
"""


def _cache() -> Path:
    return Path(os.environ.get("JD_CACHE", Path.home() / ".cache" / "jointdiffusion")) / "npm" / f"gltf-validator-{VERSION}"


def validator_dir() -> Optional[Path]:
    """The installed validator's folder (installing it on first use), or None without node/npm."""
    if not (shutil.which("node") and shutil.which("npm")):
        return None
    d = _cache()
    if not (d / "node_modules" / "gltf-validator").is_dir():
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(d), f"gltf-validator@{VERSION}"],
                       check=True, capture_output=True, timeout=300)
    (d / "validate.js").write_text(SCRIPT)
    return d


def validate(path: str | os.PathLike) -> dict:
    d = validator_dir()
    if d is None:
        raise RuntimeError("node and npm are needed for the glTF validator")
    r = subprocess.run(["node", str(d / "validate.js"), str(path)], cwd=str(d), capture_output=True, text=True,
                       timeout=300)
    if r.returncode != 0:
        raise RuntimeError(f"gltf-validator failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout)
