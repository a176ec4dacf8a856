"""The in-node mesh viewer (web/mesh_viewer.js + web/mesh_preview.js, three.js from web/vendor/) in headless
Chromium, offline.

The meshes are real files written by the pack's own exporter (:func:`jointcore.mesh.export_mesh`) from a synthetic
RGB-D picture whose colours are known: the left half red, the right half blue, a green band along the top, the right
half farther away (a depth step the exporter cuts). Every format the node writes is shown: GLB with vertex colours, GLB with a texture, GLB
without colour, PLY, OBJ with vertex colours, OBJ with .mtl + .png texture, point-cloud PLY. A 127.0.0.1 site
(the server and trap proxy of test_viewer.py) serves ``web/`` at ``/extensions/jointdiffusion/``, stand-ins for
ComfyUI's ``/scripts/app.js`` and ``/scripts/api.js``, the files at ``/view`` and ``/api/view`` and a test page with
a grid of viewers: the plain viewer per format, one turned 180° by a synthetic pointer drag, one zoomed by the wheel
and reset by a double-click, one made by the ComfyUI extension on a fake node (``onNodeCreated`` + ``onExecuted``
with a ``{"3d": [...]}`` message), and one through the old-frontend canvas fallback (turned by a LiteGraph-style
mouse drag). Chromium (software WebGL 2: SwiftShader) writes a screenshot; the test classifies its pixels per viewer.

Skipped only when /usr/bin/chromium (or ``$JD_CHROMIUM``) is missing; ``JD_REQUIRE_CHROMIUM=1`` makes that an
error. ``JD_MESH_SCREENSHOT=/some/file.png`` keeps a copy of the screenshot to look at.
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

PIL = pytest.importorskip("PIL")
torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from jointcore import mesh as jm  # noqa: E402
from test_viewer import (BROWSER_SERVICE_HOSTS, CHROMIUM, QUIET_FLAGS, STUB_API, STUB_APP, WEB, Site,  # noqa: E402
                         needs_chromium, trapped_host)

RED, BLUE, GREEN, BACKGROUND = (200, 40, 40), (40, 60, 200), (40, 170, 60), (24, 24, 24)
TOP_ROWS = 12  # the top rows of the picture are GREEN (catches a texture or a mesh upside down)
IMG_W, IMG_H = 64, 48
NEAR_LEFT, FAR_RIGHT = 2.0, 2.6   # depth of the red and of the blue half (a step of 30 %: cut at 10 %)

CELL, GAP, COLS = 180, 8, 4
# WebGL through SwiftShader, without the deprecated automatic fallback (Chromium ≥ 137 warns, later ones refuse)
GL_FLAGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
HOLD_S = 90  # the longest the page may take

# id, file, options: what each cell shows and does. "swapped": red is expected on the right.
CELLS = [
    ("glb_vertex", "rgbd_vertex.glb", {"wheelReset": True}),
    ("glb_drag180", "rgbd_vertex.glb", {"drag": True}),
    ("glb_texture", "rgbd_texture.glb", {}),
    ("glb_plain", "rgbd_plain.glb", {}),
    ("ply_vertex", "rgbd_vertex.ply", {}),
    ("obj_vertex", "rgbd_vertex.obj", {}),
    ("obj_texture", "rgbd_texture.obj", {}),
    ("ply_points", "rgbd_points.ply", {"pointSize": 4}),
    ("comfy_node", "rgbd_vertex.glb", {"mode": "comfy"}),
    ("old_frontend", "rgbd_vertex.glb", {"mode": "old"}),
]
SWAPPED = {"glb_drag180", "old_frontend"}
COLOURED = [c[0] for c in CELLS if c[0] != "glb_plain"]

PAGE_JS = r"""
import { MeshViewer, formatOf, siblingURL, viewOffset, fitDistance, fitBoxDistance, fitPointsDistance } from "/extensions/jointdiffusion/mesh_viewer.js";
const CFG = __CFG__;
const report = { errors: [], cells: {}, maths: {} };
window.addEventListener("error", (e) => report.errors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => report.errors.push(String(e.reason && e.reason.stack || e.reason)));
const sleep = (ms) => new Promise((res) => setTimeout(res, ms));

function cellBox(i) {
  const col = i % CFG.cols, row = Math.floor(i / CFG.cols);
  const div = document.createElement("div");
  Object.assign(div.style, { position: "absolute", left: (CFG.gap + col * (CFG.cell + CFG.gap)) + "px",
    top: (CFG.gap + row * (CFG.cell + CFG.gap)) + "px", width: CFG.cell + "px", height: CFG.cell + "px" });
  document.body.appendChild(div);
  return div;
}
function fullCanvas(div) {
  const canvas = document.createElement("canvas");
  Object.assign(canvas.style, { position: "absolute", left: "0", top: "0", width: "100%", height: "100%" });
  div.appendChild(canvas);
  return canvas;
}
// where the centres of the red and the blue half are on the screen (canvas pixels), from the mesh's own bounds
function landmarks(v) {
  const [lo, hi] = v.info.bounds;
  const y = (lo[1] + hi[1]) / 2;
  return { red: v.project([lo[0] / 2, y, -CFG.nearLeft]), blue: v.project([hi[0] / 2, y, -CFG.farRight]) };
}
function pointer(canvas, type, x, y, extra = {}) {
  return new PointerEvent(type, { bubbles: true, cancelable: true, pointerId: 1, pointerType: "mouse", isPrimary: true,
    button: 0, buttons: type === "pointerup" ? 0 : 1, clientX: x, clientY: y, ...extra });
}

async function plainCell(i, id, file, opts) {
  const div = cellBox(i);
  const canvas = fullCanvas(div);
  const v = new MeshViewer(canvas, { pointSize: opts.pointSize });
  const info = await v.load("/view?" + new URLSearchParams({ filename: file, subfolder: "jd", type: "output" }));
  const views = { initial: v.getView() };
  if (opts.drag) {  // OrbitControls: a drag of half the canvas height turns the view 180°
    const r = canvas.getBoundingClientRect();
    const x0 = r.left + 20, y0 = r.top + r.height / 2, dx = r.height / 2;
    canvas.dispatchEvent(pointer(canvas, "pointerdown", x0, y0));
    for (let k = 1; k <= 6; k++) {
      canvas.ownerDocument.dispatchEvent(pointer(canvas, "pointermove", x0 + dx * k / 6, y0));
      if (k === 1) views.firstMove = v.getView();  // 30° so far
    }
    canvas.ownerDocument.dispatchEvent(pointer(canvas, "pointerup", x0 + dx, y0));
    views.dragged = v.getView();
  }
  if (opts.wheelReset) {
    const r = canvas.getBoundingClientRect();
    canvas.dispatchEvent(new WheelEvent("wheel", { bubbles: true, cancelable: true, deltaY: -300, deltaMode: 0,
      clientX: r.left + r.width / 2, clientY: r.top + r.height / 2 }));
    views.wheel = v.getView();
    v.orbit(70, 20);
    views.orbited = v.getView();
    canvas.dispatchEvent(new MouseEvent("dblclick", { bubbles: true, cancelable: true }));
    views.reset = v.getView();
  }
  v.render();
  report.cells[id] = { info, views, view: v.getView(), landmarks: landmarks(v), canvasSize: [canvas.width, canvas.height],
    box: [div.offsetLeft, div.offsetTop, CFG.cell, CFG.cell] };
}

async function comfyCell(i, id, file) {
  const div = cellBox(i);
  const { app } = await import("/scripts/app.js");
  const mod = await import("/extensions/jointdiffusion/mesh_preview.js");
  const ext = app.extensions.find((e) => e.name === "jointdiffusion.mesh");
  function FakeNode() { this.size = [200, 100]; this.widgets = []; }
  FakeNode.prototype.addDOMWidget = function (name, type, element, options) {
    div.appendChild(element);
    const w = { name, type, element, options };
    this.widgets.push(w);
    return w;
  };
  FakeNode.prototype.computeSize = function () {  // LiteGraph: title + widgets (a DOM widget: its minimum height)
    return [180, 30 + this.widgets.reduce((h, w) => h + (w.options.getMinHeight ? w.options.getMinHeight() : 20), 0)];
  };
  FakeNode.prototype.setSize = function (s) { this.size = s; };
  FakeNode.prototype.setDirtyCanvas = function () {};
  let executedByOriginal = 0;
  FakeNode.prototype.onExecuted = function () { executedByOriginal++; };
  function OtherNode() {}
  await ext.beforeRegisterNodeDef(OtherNode, { name: "SaveGLB" }, app);
  await ext.beforeRegisterNodeDef(FakeNode, { name: "JDRGBDToMesh" }, app);
  const node = new FakeNode();
  node.onNodeCreated();
  const sizeAfterCreate = [...node.size];
  const el = node.widgets[0].element;
  const stateBefore = el.dataset.state;
  const loaded = new Promise((res) => el.addEventListener("jd-mesh-loaded", (e) => res(e.detail)));
  node.onExecuted({ "3d": [{ filename: file, subfolder: "jd", type: "output" },
                           { filename: "second_mesh.glb", subfolder: "jd", type: "output" }] });
  const detail = await loaded;
  const v = node.jdMesh.viewer;
  v.render();
  // LiteGraph of 2024 saves every widget's value by position: the viewer's is dropped (only when it is the last)
  const saved = { widgets_values: ["perspective", 60, "glb", ""] };
  node.widgets.unshift({ name: "projection" }, { name: "fov_deg" }, { name: "format" });
  node.onSerialize(saved);
  const savedMiddle = { widgets_values: ["perspective", 60, "", "glb"] };
  node.widgets.push(node.widgets.splice(3, 1)[0], node.widgets.splice(2, 1)[0]);  // viewer not last: left alone
  node.onSerialize(savedMiddle);
  node.widgets = node.widgets.filter((w) => w.element);
  report.cells[id] = { info: detail, view: v.getView(), landmarks: landmarks(v), state: el.dataset.state, stateBefore,
    saved: saved.widgets_values, savedMiddle: savedMiddle.widgets_values,
    hint: el.textContent, sizeAfterCreate, nodeSize: node.size, widgets: node.widgets.map((w) => [w.name, w.options.serialize]),
    otherPatched: Object.keys(OtherNode.prototype), executedByOriginal,
    unknown: mod.meshFromMessage({ "3d": [{ filename: "a.fbx", subfolder: "", type: "output" }] }),
    empty: mod.meshFromMessage({ images: [] }),
    box: [div.offsetLeft, div.offsetTop, CFG.cell, CFG.cell] };
}

async function oldCell(i, id, file) {
  // Old frontend without addDOMWidget: the viewer is drawn in onDrawForeground and turned through onMouseDown.
  const div = cellBox(i);
  const { app } = await import("/scripts/app.js");
  const mod = await import("/extensions/jointdiffusion/mesh_preview.js");
  const ext = app.extensions.find((e) => e.name === "jointdiffusion.mesh");
  function OldNode() { this.size = [200, 100]; this.widgets = []; }
  OldNode.prototype.setSize = function (s) { this.size = s; };
  OldNode.prototype.setDirtyCanvas = function () {};
  await ext.beforeRegisterNodeDef(OldNode, { name: "JDRGBDToMesh" }, app);
  const old = new OldNode();
  old.onNodeCreated();
  const nc = document.createElement("canvas");
  nc.width = old.size[0]; nc.height = old.size[1];
  old.onDrawForeground(nc.getContext("2d"));  // first draw: places the view (no mesh yet)
  await mod.showMesh(old, { "3d": [{ filename: file, subfolder: "jd", type: "output" }] });
  const r = old.jdMesh.rect;
  const initial = old.jdMesh.viewer.getView();
  const captured = old.onMouseDown({ clientX: 100, clientY: 100 }, [r[0] + 5, r[1] + 5]);
  window.dispatchEvent(new MouseEvent("mousemove", { clientX: 100 + r[3] / 12, clientY: 100 }));  // 30°
  const firstMove = old.jdMesh.viewer.getView();
  window.dispatchEvent(new MouseEvent("mousemove", { clientX: 100 + r[3] / 2, clientY: 100 }));  // 180°
  window.dispatchEvent(new MouseEvent("mouseup", {}));
  const scale = CFG.cell / Math.max(old.size[0], old.size[1]);
  Object.assign(nc.style, { position: "absolute", left: "0", top: "0",
    width: nc.width * scale + "px", height: nc.height * scale + "px" });
  div.appendChild(nc);
  old.onDrawForeground(nc.getContext("2d"));
  const v = old.jdMesh.viewer;
  const lm = landmarks(v);
  const at = (p) => [r[0] + p[0] * r[2] / v.canvas.width, r[1] + p[1] * r[3] / v.canvas.height].map((q) => q * scale);
  report.cells[id] = { info: v.info, initial, view: v.getView(), firstMove, captured, nodeSize: old.size, rect: r,
    landmarks: { red: at(lm.red), blue: at(lm.blue) }, box: [div.offsetLeft, div.offsetTop, CFG.cell, CFG.cell],
    viewBox: [div.offsetLeft + r[0] * scale, div.offsetTop + r[1] * scale, r[2] * scale, r[3] * scale] };
}

async function main() {
  try {
    report.userAgent = navigator.userAgent;
    report.revision = MeshViewer.threeRevision;
    const gl = document.createElement("canvas").getContext("webgl2");
    report.webgl2 = !!gl;
    report.maths.format = [formatOf("/view?filename=a.GLB&subfolder=x&type=output"), formatOf("x/y.obj"), formatOf("noext")];
    report.maths.sibling = [siblingURL("/api/view?filename=m.obj&subfolder=jd&type=output", "m.mtl"),
      siblingURL("/api/view?filename=m.obj&subfolder=jd&type=output", "tex/m.png"),
      siblingURL("/files/a/m.obj", "m.png")];
    report.maths.offset = [viewOffset(0, 0, 2), viewOffset(90, 0, 2), viewOffset(0, 90, 2)];
    report.maths.fit = [fitDistance(1, 60, 1), fitDistance(1, 60, 0.5)];
    const unit = [[-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]], flat = [[-2, -1, -0.1], [2, 1, 0.1]];
    report.maths.fitBox = [fitBoxDistance(...unit, 0, 0, 90, 1), fitBoxDistance(...unit, 0, 0, 90, 2),
      fitBoxDistance(...flat, 0, 0, 90, 1), fitBoxDistance(...flat, 90, 0, 90, 1), fitBoxDistance(...unit, 45, 0, 90, 1)];
    const frustum = [];  // a small square near the camera side (z = +1), a large one far (z = −1): an RGBD mesh's shape
    for (const [h, z] of [[0.2, 1], [1, -1]]) for (const x of [-h, h]) for (const y of [-h, h]) frustum.push(x, y, z);
    report.maths.fitPoints = [fitPointsDistance(frustum, [0, 0, 0], 0, 0, 90, 1), fitBoxDistance([-1, -1, -1], [1, 1, 1], 0, 0, 90, 1)];
    for (let i = 0; i < CFG.cells.length; i++) {
      const [id, file, opts] = CFG.cells[i];
      console.log("JDCELL " + id);
      if (opts.mode === "comfy") await comfyCell(i, id, file);
      else if (opts.mode === "old") await oldCell(i, id, file);
      else await plainCell(i, id, file, opts);
    }
    await sleep(100);  // let requested frames draw before the screenshot
  } catch (e) {
    report.errors.push(String(e && e.stack || e));
  }
  report.resources = performance.getEntriesByType("resource").map((e) => e.name);
  await fetch("/__report", { method: "POST", body: JSON.stringify(report) });
  document.title = "done";
}
main();
"""

# The hidden iframe's answer is held back until the page has posted its report, so the page's load event — when
# Chromium takes its --screenshot — comes after the last viewer has drawn. (With --virtual-time-budget instead,
# Chromium sometimes fast-forwarded through a mesh download on a busy machine and shot a half-built page.)
PAGE_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>mesh viewer test</title>
<style>html,body{margin:0;padding:0;background:#353535;overflow:hidden}</style></head>
<body><script type="module" src="/page.js"></script>
<iframe src="__HOLD__" style="display:none"></iframe></body></html>"""


class Hold:
    """127.0.0.1 server whose one page answers once ``ready()`` is true (or after HOLD_S seconds)."""

    def __init__(self, ready):
        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                end = time.monotonic() + HOLD_S
                while not ready() and time.monotonic() < end:
                    time.sleep(0.05)
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hold"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def run_chromium(site: Site, tmp: Path) -> tuple:
    """Headless Chromium on the test page (the flags of test_viewer.run_chromium, no virtual time): it writes the
    screenshot at the page's load event, i.e. once the report is in (see PAGE_HTML)."""
    shot, profile = tmp / "mesh.png", tmp / "profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars", *QUIET_FLAGS,
           *GL_FLAGS, "--enable-logging=stderr",  # the page's console in stderr: shown when the page never reports
           "--force-device-scale-factor=1", f"--user-data-dir={profile}", f"--proxy-server={site.proxy}",
           f"--screenshot={shot}", "--window-size=800,600", site.url + "/index.html"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=HOLD_S + 60)
    return proc, shot


def synthetic_rgbd():
    """``[3, H, W]`` image (left half RED, right half BLUE, the top TOP_ROWS GREEN) and ``[H, W]`` depth (left
    NEAR_LEFT, right FAR_RIGHT)."""
    img = torch.empty(3, IMG_H, IMG_W)
    dep = torch.empty(IMG_H, IMG_W)
    half = IMG_W // 2
    for c in range(3):
        img[c, :, :half] = RED[c] / 255.0
        img[c, :, half:] = BLUE[c] / 255.0
        img[c, :TOP_ROWS] = GREEN[c] / 255.0
    dep[:, :half], dep[:, half:] = NEAR_LEFT, FAR_RIGHT
    return img, dep


def write_meshes(folder: Path) -> dict:
    """The pack's exporter's files for every cell (name → written paths)."""
    img, dep = synthetic_rgbd()
    (m,) = jm.rgbd_to_mesh(img, dep, projection="perspective", fov_deg=60.0, depth_kind="depth",
                           discontinuity_threshold=0.1)
    jobs = {"rgbd_vertex.glb": ("glb", "vertex"), "rgbd_texture.glb": ("glb", "texture"),
            "rgbd_plain.glb": ("glb", "none"), "rgbd_vertex.ply": ("ply", "vertex"),
            "rgbd_vertex.obj": ("obj", "vertex"), "rgbd_texture.obj": ("obj", "texture"),
            "rgbd_points.ply": ("pointcloud_ply", "vertex")}
    out = {}
    for name, (fmt, color) in jobs.items():
        paths = jm.export_mesh(m, folder / name, fmt, color=color)
        assert Path(paths[0]).name == name, paths
        out[name] = paths
    return out


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("meshsite")
    (root / "output" / "jd").mkdir(parents=True)
    files = write_meshes(root / "output" / "jd")
    (root / "scripts").mkdir()
    (root / "scripts" / "app.js").write_text(STUB_APP)
    (root / "scripts" / "api.js").write_text(STUB_API)
    cfg = {"cell": CELL, "gap": GAP, "cols": COLS, "nearLeft": NEAR_LEFT, "farRight": FAR_RIGHT,
           "cells": [list(c) for c in CELLS]}
    (root / "page.js").write_text(PAGE_JS.replace("__CFG__", json.dumps(cfg)))
    s = Site(root)
    hold = Hold(lambda: s.report is not None)
    (root / "index.html").write_text(PAGE_HTML.replace("__HOLD__", hold.url))
    yield s, files
    hold.close()
    s.close()


@pytest.fixture(scope="module")
def rendered(site, tmp_path_factory):
    s, files = site
    proc, shot = run_chromium(s, tmp_path_factory.mktemp("chromium_mesh"))
    progress = [line.split('"')[1] for line in proc.stderr.splitlines() if '"JDCELL ' in line]
    assert s.report is not None, (f"the test page never reported back (cells started: {progress}; requests: "
                                  f"{[r[1] for r in s.requests]}).\nstderr: {proc.stderr[-3000:]}")
    assert shot.exists(), f"no screenshot written.\nstderr: {proc.stderr[-3000:]}"
    keep = os.environ.get("JD_MESH_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    return s.report, Image.open(shot).convert("RGB"), s, files


def near(a, b, tol):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def classify(img, box, tol=45):
    """Pixels of a cell near RED / BLUE: their (x, y) and colours, plus every colour of the cell."""
    x0, y0, w, h = (int(round(q)) for q in box)
    found = {"red": [], "blue": [], "green": [], "other": []}
    for y in range(y0 + 2, y0 + h - 2):
        for x in range(x0 + 2, x0 + w - 2):
            p = img.getpixel((x, y))
            key = ("red" if near(p, RED, tol) else "blue" if near(p, BLUE, tol) else "green" if near(p, GREEN, tol)
                   else "other")
            found[key].append((x, y, p))
    return found


def median_colour(pixels):
    return tuple(int(statistics.median(p[2][c] for p in pixels)) for c in range(3))


# ---- tests ----------------------------------------------------------------------------------------------

@needs_chromium
def test_page_ran_without_errors(rendered):
    report = rendered[0]
    assert report["errors"] == []
    assert report["webgl2"], f"no WebGL 2 in this Chromium ({report['userAgent']}) with {GL_FLAGS}"
    assert set(report["cells"]) == {c[0] for c in CELLS}
    assert report["revision"] == "187"


@needs_chromium
def test_helpers(rendered):
    m = rendered[0]["maths"]
    assert m["format"] == ["glb", "obj", ""]
    assert m["sibling"] == ["/api/view?filename=m.mtl&subfolder=jd&type=output",
                            "/api/view?filename=m.png&subfolder=jd%2Ftex&type=output", "/files/a/m.png"]
    assert m["offset"][0] == pytest.approx([0, 0, 2], abs=1e-9)        # azimuth 0: on the +Z side
    assert m["offset"][1] == pytest.approx([2, 0, 0], abs=1e-9)        # azimuth 90: on the +X side
    assert m["offset"][2] == pytest.approx([0, 2, 0], abs=1e-9)        # elevation 90: above
    assert m["fit"][0] == pytest.approx(2.0)                           # 1 / sin(30°)
    assert m["fit"][1] > m["fit"][0]                                   # a narrow view needs more distance
    # box fit, 90° fov: a unit cube seen face-on needs 0.5 (its front) + 0.5 / tan 45°
    assert m["fitBox"][0] == pytest.approx(1.0) and m["fitBox"][1] == pytest.approx(1.0)  # wider: the height limits
    assert m["fitBox"][2] == pytest.approx(0.1 + 2.0)                  # a 4×2 card: its width limits
    assert m["fitBox"][3] == pytest.approx(2.0 + 1.0)                  # the same card edge-on from +X: its height
    assert m["fitBox"][4] == pytest.approx(2 ** -0.5 + 0.5)            # the cube edge-on: its edge 0.707 closer
    # the points themselves: the near square needs 1 + 0.2, the far one −1 + 1; their bounding box would need 1 + 1
    assert m["fitPoints"] == pytest.approx([1.2, 2.0])


@needs_chromium
def test_loaded_files_match_the_exporter(rendered):
    """What three.js read is what the exporter wrote (vertex and face counts of the synthetic picture)."""
    cells = rendered[0]["cells"]
    img, dep = synthetic_rgbd()
    (m,) = jm.rgbd_to_mesh(img, dep, projection="perspective", fov_deg=60.0, depth_kind="depth",
                           discontinuity_threshold=0.1)
    m = m.compact()
    tri = m.faces.shape[0]
    assert tri == 2 * (IMG_H - 1) * (IMG_W // 2 - 1) * 2  # two planes, the step between them cut
    for cid in ("glb_vertex", "glb_texture", "glb_plain", "ply_vertex", "obj_vertex", "obj_texture", "comfy_node"):
        assert cells[cid]["info"]["triangles"] == tri, cid
    assert cells["ply_points"]["info"]["points"] == IMG_W * IMG_H and cells["ply_points"]["info"]["triangles"] == 0
    expect = {"glb_vertex": "vertex", "glb_texture": "texture", "glb_plain": "none", "ply_vertex": "vertex",
              "obj_vertex": "vertex", "obj_texture": "texture", "ply_points": "vertex"}
    assert {c: cells[c]["info"]["colors"] for c in expect} == expect
    lo, hi = cells["glb_vertex"]["info"]["bounds"]
    assert lo[2] == pytest.approx(-FAR_RIGHT, abs=1e-4) and hi[2] == pytest.approx(-NEAR_LEFT, abs=1e-4)


@needs_chromium
def test_it_renders(rendered):
    """Every viewer shows a mesh: many pixels differ from the background, and the view is fitted (neither a speck
    nor cropped: the mesh covers a good part of the view and leaves background at its border)."""
    report, img, _, _ = rendered
    for cid, _, _ in CELLS:
        cell = report["cells"][cid]
        box = cell.get("viewBox", cell["box"])
        x0, y0, w, h = (int(round(q)) for q in box)
        pix = [img.getpixel((x, y)) for y in range(y0 + 2, y0 + h - 2, 2) for x in range(x0 + 2, x0 + w - 2, 2)]
        mesh = [p for p in pix if not near(p, BACKGROUND, 6)]
        frac = len(mesh) / len(pix)
        assert 0.15 < frac < 0.9, f"{cid}: {frac:.0%} of the view is not background"


@needs_chromium
def test_colours_are_the_files_colours(rendered):
    """Red, blue and green are shown as stored (unlit, sRGB as in the picture): the median of each is within a few
    levels; the green band is above both halves (nothing is upside down, in any format, rotated or not)."""
    report, img, _, _ = rendered
    bad = []
    for cid in COLOURED:
        found = classify(img, report["cells"][cid].get("viewBox", report["cells"][cid]["box"]))
        if len(found["red"]) < 300 or len(found["blue"]) < 300:
            others = statistics.mode(p[2] for p in found["other"]) if found["other"] else None
            bad.append(f"{cid}: {len(found['red'])} red and {len(found['blue'])} blue pixels (commonest other {others})")
            continue
        if len(found["green"]) < 100:
            bad.append(f"{cid}: {len(found['green'])} green pixels")
            continue
        for key, ref in (("red", RED), ("blue", BLUE), ("green", GREEN)):
            got = median_colour(found[key])
            if not near(got, ref, 8):
                bad.append(f"{cid}: {key} shows as {got}, the file has {ref}")
        gy, ry, by = (statistics.mean(p[1] for p in found[k]) for k in ("green", "red", "blue"))
        if not gy < min(ry, by):
            bad.append(f"{cid}: the green band (mean y {gy:.0f}) is not above red ({ry:.0f}) and blue ({by:.0f})")
    assert not bad, "\n".join(bad)


@needs_chromium
def test_uncoloured_mesh_is_lit_grey(rendered):
    report, img, _, _ = rendered
    found = classify(img, report["cells"]["glb_plain"]["box"])
    assert not found["red"] and not found["blue"] and not found["green"]
    mesh = [p[2] for p in found["other"] if not near(p[2], BACKGROUND, 6)]
    assert len(mesh) > 3000
    grey = median_colour([(0, 0, p) for p in mesh])
    assert max(grey) - min(grey) <= 6 and 80 < grey[0] < 250, grey


@needs_chromium
def test_left_right_and_rotation(rendered):
    """Unrotated, red (the picture's left half) is on the left; after orbiting 180° about the vertical axis — by a
    pointer drag of half the view's height, or a mouse drag in the old-frontend fallback — red is on the right.
    Checked twice: the mean x of the red and blue pixels in the screenshot, and the colour at the screen position
    of each half's centre (projected by the viewer's camera)."""
    report, img, _, _ = rendered
    for cid in COLOURED:
        cell = report["cells"][cid]
        box = cell.get("viewBox", cell["box"])
        found = classify(img, box)
        rx = statistics.mean(p[0] for p in found["red"])
        bx = statistics.mean(p[0] for p in found["blue"])
        swapped = cid in SWAPPED
        assert (rx > bx) == swapped, f"{cid}: red at x={rx:.0f}, blue at x={bx:.0f} (swapped expected: {swapped})"
        ox, oy = cell["box"][:2]
        lm = cell["landmarks"]
        assert (lm["red"][0] > lm["blue"][0]) == swapped, (cid, lm)
        for key, ref in (("red", RED), ("blue", BLUE)):
            x, y = ox + lm[key][0], oy + lm[key][1]
            got = img.getpixel((int(x), int(y)))
            assert near(got, ref, 40), f"{cid}: {got} at the {key} half's centre ({x:.0f}, {y:.0f})"
    v = report["cells"]["glb_drag180"]["views"]
    assert v["initial"]["azimuth"] == pytest.approx(0, abs=1e-6)
    assert abs(v["dragged"]["azimuth"]) == pytest.approx(180, abs=1.0)
    assert v["dragged"]["elevation"] == pytest.approx(0, abs=0.5)
    assert v["dragged"]["distance"] == pytest.approx(v["initial"]["distance"], rel=1e-6)
    # the mesh follows the pointer: dragging right turns its front to the right, the camera goes to the −X side
    assert v["firstMove"]["azimuth"] == pytest.approx(-30, abs=1.0)
    old = report["cells"]["old_frontend"]
    assert old["initial"]["azimuth"] == pytest.approx(20) and old["initial"]["elevation"] == pytest.approx(12)
    assert old["firstMove"]["azimuth"] == pytest.approx(20 - 30, abs=1.0)
    assert old["view"]["azimuth"] == pytest.approx(20 - 180, abs=1.0)
    assert report["cells"]["old_frontend"]["captured"] is True        # a press on the view is not a node drag


@needs_chromium
def test_wheel_zooms_and_double_click_resets(rendered):
    v = rendered[0]["cells"]["glb_vertex"]["views"]
    assert v["wheel"]["distance"] < 0.9 * v["initial"]["distance"]   # wheel up: closer
    assert v["wheel"]["azimuth"] == pytest.approx(0, abs=1e-6)
    assert v["orbited"]["azimuth"] == pytest.approx(70, abs=1e-6) and v["orbited"]["elevation"] == pytest.approx(20)
    for k in ("azimuth", "elevation", "distance"):
        assert v["reset"][k] == pytest.approx(v["initial"][k], abs=1e-6), k


@needs_chromium
def test_comfyui_extension_hooks(rendered):
    report, _, site, _ = rendered
    cell = report["cells"]["comfy_node"]
    assert cell["stateBefore"] == "empty" and cell["state"] == "ready"
    assert cell["info"]["url"] == "/api/view?filename=rgbd_vertex.glb&subfolder=jd&type=output"  # the first mesh
    assert cell["info"]["format"] == "glb"
    assert cell["view"]["azimuth"] == pytest.approx(20) and cell["view"]["elevation"] == pytest.approx(12)  # the node's
    assert "rgbd_vertex.glb" in cell["hint"] and "double-click" in cell["hint"]
    assert cell["widgets"] == [["jd_mesh_viewer", False]]          # one widget, never serialised
    assert cell["saved"] == ["perspective", 60, "glb"]              # ... nor saved by an old LiteGraph
    assert cell["savedMiddle"] == ["perspective", 60, "", "glb"]    # unless other widgets come after it
    assert cell["otherPatched"] == []                               # other node types untouched
    assert cell["executedByOriginal"] == 1                          # the frontend's own onExecuted still runs
    assert cell["sizeAfterCreate"][0] >= 320 and cell["sizeAfterCreate"][1] >= 30 + 240  # room for the view
    assert cell["unknown"]["format"] == "fbx" and cell["empty"] is None
    requested = [urllib.parse.urlsplit(p) for _, p, _ in site.requests]
    assert ("/api/view", "filename=rgbd_vertex.glb&subfolder=jd&type=output") in [(u.path, u.query) for u in requested]
    assert not any("second_mesh.glb" in u.query for u in requested)  # only the first mesh is loaded
    old = report["cells"]["old_frontend"]
    assert old["nodeSize"][0] >= 320 and old["rect"][3] >= 200


@needs_chromium
def test_textured_obj_reads_its_companions(rendered):
    _, _, site, files = rendered
    assert [Path(p).name for p in files["rgbd_texture.obj"]] == ["rgbd_texture.obj", "rgbd_texture.mtl",
                                                                  "rgbd_texture.png"]
    queries = [urllib.parse.urlsplit(p).query for _, p, _ in site.requests]
    for name in ("rgbd_texture.obj", "rgbd_texture.mtl", "rgbd_texture.png"):
        assert f"filename={name}&subfolder=jd&type=output" in queries, name


@needs_chromium
def test_everything_is_served_locally(rendered):
    """Only 127.0.0.1 is asked (the trap proxy sees page requests: test_viewer.py shows it catches them)."""
    report, _, site, _ = rendered
    foreign = [e[:2] for e in site.trapped
               if trapped_host(e) not in BROWSER_SERVICE_HOSTS or "Referer" in e[2] or "Origin" in e[2]]
    assert foreign == [], f"the page tried to reach other hosts: {foreign}"
    assert all(r.startswith(site.url + "/") for r in report["resources"]), report["resources"]
    paths = {urllib.parse.urlsplit(p).path for _, p, _ in site.requests}
    assert {"/extensions/jointdiffusion/mesh_viewer.js", "/extensions/jointdiffusion/mesh_preview.js",
            "/extensions/jointdiffusion/vendor/three_bundle.js"} <= paths


def test_bundle_is_the_pinned_three():
    """The committed bundle names the three version that web-src pins, carries its licence, and is small."""
    bundle = WEB / "vendor" / "three_bundle.js"
    head = bundle.read_text()[:400]
    pinned = json.loads((WEB.parent / "web-src" / "package.json").read_text())["dependencies"]["three"]
    assert f"three@{pinned}" in head and "scripts/build_web.sh" in head
    assert f'"{pinned.split(".")[1]}"' in bundle.read_text()  # three.REVISION inside the bundle
    assert "MIT License" in (WEB / "vendor" / "THREE_LICENSE").read_text()
    assert bundle.stat().st_size < 900_000
    core = (WEB / "mesh_viewer.js").read_text()
    assert "scripts/app.js" not in core and "scripts/api.js" not in core  # viewer core is ComfyUI-free
