"""The in-node panorama viewer (web/) rendered by headless Chromium, offline.

A throw-away site is served on 127.0.0.1 by ``http.server`` in a thread: the repository's ``web/`` folder at
``/extensions/jointdiffusion/`` (where ComfyUI serves WEB_DIRECTORY), stand-ins for ComfyUI's
``/scripts/app.js`` and ``/scripts/api.js``, a synthetic 512×256 equirectangular test image (8 vertical colour
bands, band k centred at u = k/8, a white cap above 60° latitude, a brown one below −60°) at ``/pano.png`` and
``/view`` / ``/api/view``, and a test page. The page draws a 3×3 grid of viewers (different yaw / pitch /
projection / renderer, one turned by synthetic pointer events, one created by the ComfyUI extension on a fake
node through ``onNodeCreated`` + ``onExecuted``, one through the old-frontend canvas fallback) and POSTs a JSON
report. Chromium runs with ``--screenshot``; the test reads the colours at the centre of each viewer from the
screenshot. All HTTP(S) traffic that is not for 127.0.0.1 goes to a logging trap proxy, which must stay empty.

Skipped only when /usr/bin/chromium (or ``$JD_CHROMIUM``) is missing (Debian: ``apt-get install chromium``).
``JD_VIEWER_SCREENSHOT=/some/file.png`` keeps a copy of the screenshot to look at.
"""
from __future__ import annotations

import http.server
import json
import math
import os
import re
import shutil
import subprocess
import threading
import urllib.parse
from pathlib import Path

import pytest

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

CHROMIUM = os.environ.get("JD_CHROMIUM", "/usr/bin/chromium")  # JD_CHROMIUM: another Chromium/Chrome binary
REPO = Path(__file__).resolve().parents[2]
WEB = REPO / "web"

if os.environ.get("JD_REQUIRE_CHROMIUM") == "1" and not os.path.exists(CHROMIUM):  # CI: never skip silently
    raise RuntimeError(f"JD_REQUIRE_CHROMIUM=1 but {CHROMIUM} is missing (apt-get install chromium)")

needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"{CHROMIUM} not found: the panorama viewer test needs headless Chromium (apt-get install chromium)")

# ---- the synthetic panorama ----------------------------------------------------------------------------
PANO_W, PANO_H = 512, 256
BANDS = [(230, 40, 40), (240, 150, 20), (230, 230, 40), (40, 200, 60),
         (40, 210, 220), (40, 70, 230), (150, 50, 220), (230, 60, 170)]
TOP, BOTTOM, BACKGROUND = (245, 245, 245), (120, 80, 40), (24, 24, 24)


def band_at(u: float) -> tuple:
    """Colour of the test image at horizontal coordinate u (band k covers u in [(k-0.5)/8, (k+0.5)/8) mod 1)."""
    return BANDS[int(((u % 1.0) * 8 + 0.5) // 1) % 8]


def make_panorama(path: Path) -> None:
    img = Image.new("RGB", (PANO_W, PANO_H))
    px = img.load()
    for x in range(PANO_W):
        c = band_at((x + 0.5) / PANO_W)
        for y in range(PANO_H):
            lat = 90.0 - (y + 0.5) / PANO_H * 180.0
            px[x, y] = TOP if lat > 60 else BOTTOM if lat < -60 else c
    img.save(path)


# ---- the page -------------------------------------------------------------------------------------------
CELL_W, CELL_H, GAP, COLS = 190, 190, 6, 4
FOV = 90.0
DRAG_DX = 170  # px to the right on a 190-px-high canvas with fov 90° → yaw −80.5°

# id, viewer options, expected colour at the centre of the cell
CELLS = [
    ("eq_yaw0", dict(yaw=0), band_at(0.5)),
    ("eq_yaw90", dict(yaw=90), band_at(0.75)),
    ("eq_yaw180", dict(yaw=180), band_at(0.0)),
    ("eq_yaw90_2d", dict(yaw=90, renderer="2d"), band_at(0.75)),
    ("eq_drag", dict(yaw=0), band_at(0.5 - DRAG_DX * FOV / CELL_H / 360)),
    ("eq_pitch80", dict(yaw=0, pitch=80), TOP),
    ("cyl180_yaw70", dict(yaw=70, projection="cylindrical", spanDeg=180), band_at(0.5 + 70 / 180)),
    ("cyl180_yaw110", dict(yaw=110, projection="cylindrical", spanDeg=180), BACKGROUND),
    ("comfy_node", "comfy", band_at(0.5)),
    ("old_frontend", "old", band_at(0.75)),
]

STUB_APP = """export const app = { extensions: [], registerExtension(ext) { this.extensions.push(ext); } };"""
STUB_API = """export const api = { api_base: "", apiURL(route) { return this.api_base + "/api" + route; } };"""

PAGE_JS = r"""
import { PanoramaViewer, screenToUV, PROJECTIONS } from "/extensions/jointdiffusion/panorama_viewer.js";
const CFG = __CFG__;
const report = { errors: [], cells: {}, maths: {} };
window.addEventListener("error", (e) => report.errors.push(String(e.message)));
window.addEventListener("unhandledrejection", (e) => report.errors.push(String(e.reason)));

function cellBox(i) {
  const col = i % CFG.cols, row = Math.floor(i / CFG.cols);
  const div = document.createElement("div");
  Object.assign(div.style, { position: "absolute", left: (CFG.gap + col * (CFG.w + CFG.gap)) + "px",
    top: (CFG.gap + row * (CFG.h + CFG.gap)) + "px", width: CFG.w + "px", height: CFG.h + "px" });
  document.body.appendChild(div);
  return div;
}
function caption(div, text) {
  const c = document.createElement("div");
  c.textContent = text;
  Object.assign(c.style, { position: "absolute", left: "0", top: "0", font: "10px monospace", color: "#fff",
    background: "#000", padding: "1px 3px", zIndex: 2 });
  div.appendChild(c);
}

async function plainCell(i, id, opts) {
  const div = cellBox(i);
  const canvas = document.createElement("canvas");
  Object.assign(canvas.style, { position: "absolute", left: "0", top: "0", width: "100%", height: "100%" });
  div.appendChild(canvas);
  caption(div, id);
  const v = new PanoramaViewer(canvas, { fov: CFG.fov, ...opts });
  await v.load("/pano.png");
  if (id === "eq_drag") {
    const r = canvas.getBoundingClientRect();
    const x0 = r.left + r.width / 2, y0 = r.top + r.height / 2;
    const ev = (type, x, y) => new PointerEvent(type, { bubbles: true, cancelable: true, pointerId: 7,
      pointerType: "mouse", button: 0, buttons: type === "pointerup" ? 0 : 1, clientX: x, clientY: y });
    canvas.dispatchEvent(ev("pointerdown", x0, y0));
    for (let k = 1; k <= 5; k++) canvas.dispatchEvent(ev("pointermove", x0 + CFG.dragDx * k / 5, y0));
    canvas.dispatchEvent(ev("pointerup", x0 + CFG.dragDx, y0));
  }
  let restored = null;
  if (id === "eq_yaw180" && v.backendName === "webgl") {  // the browser drops and gives back the context
    const lose = v.backend.gl.getExtension("WEBGL_lose_context");
    const back = new Promise((res) => canvas.addEventListener("webglcontextrestored", res));
    lose.loseContext();
    await new Promise((res) => setTimeout(res, 50));
    lose.restoreContext();
    await back;
    await new Promise((res) => setTimeout(res, 50));
    restored = !v.backend.gl.isContextLost();
  }
  v.render();
  report.cells[id] = { backend: v.backendName, view: v.getView(), size: [canvas.width, canvas.height], restored,
    box: [div.offsetLeft, div.offsetTop, CFG.w, CFG.h], uvCentre: v.uvAt(canvas.width / 2, canvas.height / 2) };
}

async function comfyCell(i, id) {
  const div = cellBox(i);
  const { app } = await import("/scripts/app.js");
  await import("/extensions/jointdiffusion/jointdiffusion.js");
  const ext = app.extensions.find((e) => e.name === "jointdiffusion.core");
  function FakeNode() { this.size = [200, 100]; this.widgets = []; }
  FakeNode.prototype.addDOMWidget = function (name, type, element, options) {
    div.appendChild(element);
    const w = { name, type, element, options };
    this.widgets.push(w);
    return w;
  };
  FakeNode.prototype.setSize = function (s) { this.size = s; };
  FakeNode.prototype.setDirtyCanvas = function () {};
  let executedByOriginal = 0;
  FakeNode.prototype.onExecuted = function () { executedByOriginal++; };
  function OtherNode() {}
  await ext.beforeRegisterNodeDef(OtherNode, { name: "SaveImage" }, app);
  await ext.beforeRegisterNodeDef(FakeNode, { name: "JDPanoramaPreview" }, app);
  const node = new FakeNode();
  node.onNodeCreated();
  const el = node.widgets[0].element;
  const loaded = new Promise((res) => el.addEventListener("jd-panorama-loaded", (e) => res(e.detail)));
  node.onExecuted({ images: [{ filename: "pano.png", subfolder: "jd", type: "output" }],
    jd_panorama: [{ projection: "equirectangular", span_deg: 360 }] });
  const detail = await loaded;
  caption(div, id);
  const viewer = node.jdPanorama.viewer;
  viewer.render();
  report.cells[id] = { backend: viewer.backendName, view: viewer.getView(), box: [div.offsetLeft, div.offsetTop, CFG.w, CFG.h],
    state: el.dataset.state, detail, widgets: node.widgets.map((w) => [w.name, w.options.serialize]),
    otherPatched: Object.keys(OtherNode.prototype), executedByOriginal };

}

async function oldCell(i, id) {
  // Old frontend without addDOMWidget: the viewer is drawn in onDrawForeground (drawn here scaled down).
  const div = cellBox(i);
  const { app } = await import("/scripts/app.js");
  const mod = await import("/extensions/jointdiffusion/jointdiffusion.js");
  const ext = app.extensions.find((e) => e.name === "jointdiffusion.core");
  function OldNode() { this.size = [200, 100]; this.widgets = []; }
  OldNode.prototype.setSize = function (s) { this.size = s; };
  OldNode.prototype.setDirtyCanvas = function () {};
  await ext.beforeRegisterNodeDef(OldNode, { name: "JDPanoramaPreview" }, app);
  const old = new OldNode();
  old.onNodeCreated();
  const info = await mod.showPanorama(old,
    { images: [{ filename: "pano.png", subfolder: "jd", type: "output" }], jd_panorama: [{ projection: "equirectangular" }] });
  old.jdPanorama.viewer.setView({ yaw: 90 });
  const scale = CFG.w / old.size[0];
  const nc = document.createElement("canvas");
  nc.width = old.size[0]; nc.height = old.size[1];
  Object.assign(nc.style, { position: "absolute", left: "0", top: "0",
    width: nc.width * scale + "px", height: nc.height * scale + "px" });
  div.appendChild(nc);
  caption(div, id);
  old.onDrawForeground(nc.getContext("2d"));
  const r = old.jdPanorama.rect;
  const captured = old.onMouseDown({ clientX: 0, clientY: 0 }, [r[0] + 5, r[1] + 5]);
  window.dispatchEvent(new MouseEvent("mousemove", { clientX: 0, clientY: 0 }));
  window.dispatchEvent(new MouseEvent("mouseup", {}));
  const x = div.offsetLeft + (r[0] + r[2] / 2) * scale, y = div.offsetTop + (r[1] + r[3] / 2) * scale;
  report.cells[id] = { backend: old.jdPanorama.viewer.backendName, view: old.jdPanorama.viewer.getView(),
    rect: r, nodeSize: old.size, info, captured,
    box: [div.offsetLeft + r[0] * scale, div.offsetTop + r[1] * scale, r[2] * scale, r[3] * scale] };
}

async function main() {
  try {
    report.projections = PROJECTIONS;
    report.userAgent = navigator.userAgent;
    report.webgl = !!document.createElement("canvas").getContext("webgl");
    const P = { projection: "equirectangular", spanDeg: 360, imageAspect: 2 };
    report.maths.centre_yaw0 = screenToUV({ yaw: 0, pitch: 0, fov: 90 }, 49.5, 49.5, 100, 100, P);
    report.maths.centre_yaw90 = screenToUV({ yaw: 90, pitch: 0, fov: 90 }, 49.5, 49.5, 100, 100, P);
    report.maths.centre_yawm90 = screenToUV({ yaw: -90, pitch: 0, fov: 90 }, 49.5, 49.5, 100, 100, P);
    report.maths.right_edge_yaw0 = screenToUV({ yaw: 0, pitch: 0, fov: 90 }, 99.5, 49.5, 100, 100, P);
    report.maths.top_edge_pitch0 = screenToUV({ yaw: 0, pitch: 0, fov: 90 }, 49.5, -0.5, 100, 99, P);
    const C = { projection: "cylindrical", spanDeg: 180, imageAspect: 4 };
    report.maths.cyl_yaw45 = screenToUV({ yaw: 45, pitch: 0, fov: 60 }, 49.5, 49.5, 100, 100, C);
    report.maths.cyl_yaw100 = screenToUV({ yaw: 100, pitch: 0, fov: 60 }, 49.5, 49.5, 100, 100, C);
    report.maths.cyl360_pitch30 = screenToUV({ yaw: 0, pitch: 30, fov: 60 }, 49.5, 49.5, 100, 100,
      { projection: "cylindrical", spanDeg: 360, imageAspect: 4 });
    report.maths.cyl_pitch30 = screenToUV({ yaw: 0, pitch: 30, fov: 60 }, 49.5, 49.5, 100, 100, C);
    for (let i = 0; i < CFG.cells.length; i++) {
      const [id, opts] = CFG.cells[i];
      if (opts === "comfy") await comfyCell(i, id);
      else if (opts === "old") await oldCell(i, id);
      else await plainCell(i, id, opts);
    }
  } catch (e) {
    report.errors.push(String(e && e.stack || e));
  }
  report.resources = performance.getEntriesByType("resource").map((e) => e.name);
  await fetch("/__report", { method: "POST", body: JSON.stringify(report) });
  document.title = "done";
}
main();
"""

# Control page for the network check: it deliberately asks two other hosts for a script, so the test can show
# that the trap proxy sees page requests (plain HTTP with the page as Referer; HTTPS as a CONNECT), and it
# records what Chromium itself contacts in the background with the same flags.
CONTROL_HTML = """<!doctype html><html><body><script>
Promise.allSettled([fetch("http://cdn.jd-control.example/lib.js"), fetch("https://cdn.jd-control.example/lib.js")])
  .then(() => fetch("/__report", {method: "POST", body: JSON.stringify({control: true})}));
</script></body></html>"""
CONTROL_HOST = "cdn.jd-control.example"
# Chromium's own service hosts (time sync, component updater, sign-in, safe browsing…): background traffic
# of the browser, not of the page. Seen with Debian's chromium 156 despite --disable-background-networking.
BROWSER_SERVICE_HOSTS = {"clients1.google.com", "clients2.google.com", "update.googleapis.com",
                         "accounts.google.com", "safebrowsing.googleapis.com", "optimizationguide-pa.googleapis.com",
                         "content-autofill.googleapis.com", "redirector.gvt1.com", "edgedl.me.gvt1.com",
                         "www.google.com", "android.clients.google.com"}

PAGE_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>panorama viewer test</title>
<style>html,body{margin:0;padding:0;background:#353535;overflow:hidden}</style></head>
<body><script type="module" src="/page.js"></script></body></html>"""


# ---- servers ------------------------------------------------------------------------------------------
class Site:
    """127.0.0.1 web server for the test site, plus a trap proxy that logs every off-site request."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list = []   # (method, path, host header)
        self.trapped: list = []    # requests Chromium tried to send anywhere else
        self.report = None
        site = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def log_message(self, *a):
                pass

            def _log(self):
                site.requests.append((self.command, self.path, self.headers.get("Host", "")))

            def translate_path(self, path):
                p = urllib.parse.urlsplit(path)
                if p.path.startswith("/extensions/jointdiffusion/"):
                    rel = p.path[len("/extensions/jointdiffusion/"):]
                    target = (WEB / rel).resolve()
                    return str(target) if WEB.resolve() in target.parents else str(root / "_forbidden")
                if p.path in ("/view", "/api/view"):
                    q = urllib.parse.parse_qs(p.query)
                    return str(root / "output" / q.get("subfolder", [""])[0] / q.get("filename", [""])[0])
                return super().translate_path(path)

            def do_GET(self):
                self._log()
                super().do_GET()

            def do_POST(self):
                self._log()
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/__report":
                    site.report = json.loads(body)
                self.send_response(204)
                self.end_headers()

        class Trap(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _trap(self):
                site.trapped.append((self.command, self.path, dict(self.headers)))
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_HEAD = do_CONNECT = do_PUT = do_OPTIONS = _trap

        Handler.extensions_map = {**Handler.extensions_map, ".js": "text/javascript"}
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.trap = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trap)
        self.threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self.httpd, self.trap)]
        for t in self.threads:
            t.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def proxy(self):
        return f"http://127.0.0.1:{self.trap.server_address[1]}"

    def close(self):
        for s in (self.httpd, self.trap):
            s.shutdown()
            s.server_close()


# Chromium's own background traffic (time sync, updater, sign-in, …), switched off so that the trap proxy
# only ever sees requests the page makes.
QUIET_FLAGS = [
    "--no-default-browser-check", "--no-pings", "--disable-domain-reliability", "--disable-breakpad",
    "--disable-client-side-phishing-detection", "--metrics-recording-only", "--safebrowsing-disable-auto-update",
    "--disable-features=NetworkTimeServiceQuerying,OptimizationHints,Translate,MediaRouter,"
    "AutofillServerCommunication,CertificateTransparencyComponentUpdater,InterestFeedContentSuggestions,"
    "AccountConsistency,SigninInterceptBubble,PushMessaging",
]


def trapped_host(entry) -> str:
    method, path, _ = entry
    if method == "CONNECT":
        return path.rsplit(":", 1)[0]
    return urllib.parse.urlsplit(path).hostname or ""


def run_chromium(site: Site, tmp: Path, name: str, page: str = "/index.html", extra_flags=()) -> tuple:
    shot = tmp / f"{name}.png"
    profile = tmp / f"profile_{name}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
           *QUIET_FLAGS,
           "--force-device-scale-factor=1", f"--user-data-dir={profile}", f"--proxy-server={site.proxy}",
           f"--screenshot={shot}", "--window-size=800,600", "--virtual-time-budget=15000",
           *extra_flags, site.url + page]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    return proc, shot


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("panosite")
    make_panorama(root / "pano.png")
    (root / "output" / "jd").mkdir(parents=True)
    shutil.copy(root / "pano.png", root / "output" / "jd" / "pano.png")
    (root / "scripts").mkdir()
    (root / "scripts" / "app.js").write_text(STUB_APP)
    (root / "scripts" / "api.js").write_text(STUB_API)
    cfg = {"w": CELL_W, "h": CELL_H, "gap": GAP, "cols": COLS, "fov": FOV, "dragDx": DRAG_DX,
           "cells": [[cid, opts] for cid, opts, _ in CELLS]}
    (root / "page.js").write_text(PAGE_JS.replace("__CFG__", json.dumps(cfg)))
    (root / "index.html").write_text(PAGE_HTML)
    (root / "control.html").write_text(CONTROL_HTML)
    s = Site(root)
    yield s, root
    s.close()


@pytest.fixture(scope="module")
def control(site, tmp_path_factory):
    """Trap-proxy log of the control page: (hosts the page asked for, hosts Chromium contacted by itself)."""
    s, _ = site
    s.report, s.trapped[:] = None, []
    proc, _ = run_chromium(s, tmp_path_factory.mktemp("chromium_control"), "control", "/control.html")
    assert s.report == {"control": True}, f"the control page never reported back.\nstderr: {proc.stderr[-3000:]}"
    log = list(s.trapped)
    page = [e for e in log if trapped_host(e) == CONTROL_HOST]
    background = {trapped_host(e) for e in log} - {CONTROL_HOST}
    s.report, s.trapped[:], s.requests[:] = None, [], []
    return page, background


@pytest.fixture(scope="module")
def rendered(site, control, tmp_path_factory):
    s, _ = site
    tmp = tmp_path_factory.mktemp("chromium")
    proc, shot = run_chromium(s, tmp, "viewer")
    assert s.report is not None, f"the test page never reported back.\nstdout: {proc.stdout}\nstderr: {proc.stderr[-3000:]}"
    assert shot.exists(), f"no screenshot written.\nstderr: {proc.stderr[-3000:]}"
    keep = os.environ.get("JD_VIEWER_SCREENSHOT")  # optional: copy the screenshot somewhere to look at it
    if keep:
        shutil.copy(shot, keep)
    return s.report, Image.open(shot).convert("RGB"), s


def centre_colour(img, box, half=4):
    x0, y0, w, h = box
    cx, cy = int(x0 + w / 2), int(y0 + h / 2)
    px = [img.getpixel((x, y)) for x in range(cx - half, cx + half + 1) for y in range(cy - half, cy + half + 1)]
    return tuple(sorted(p[c] for p in px)[len(px) // 2] for c in range(3))


def close(a, b, tol=40):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


# ---- tests ----------------------------------------------------------------------------------------------

@needs_chromium
def test_page_ran_without_errors(rendered):
    report, _, _ = rendered
    assert report["errors"] == []
    assert set(report["cells"]) == {c[0] for c in CELLS}
    assert report["projections"] == ["equirectangular", "cylindrical"]


@needs_chromium
def test_backends(rendered):
    """Canvas 2D when asked for; WebGL otherwise (Chromium's software WebGL works headless with --disable-gpu)."""
    report = rendered[0]
    cells = report["cells"]
    assert cells["eq_yaw90_2d"]["backend"] == "2d"
    if not report["webgl"]:
        pytest.skip(f"this Chromium offers no WebGL ({report['userAgent']}); only the Canvas 2D path was checked")
    auto = [cid for cid, opts, _ in CELLS if opts == "comfy" or isinstance(opts, dict) and "renderer" not in opts]
    assert {cells[c]["backend"] for c in auto} == {"webgl"}
    assert cells["eq_yaw180"]["restored"] is True  # drawn after a lost + restored WebGL context (colour checked below)


@needs_chromium
def test_projection_maths(rendered):
    m = rendered[0]["maths"]
    assert m["centre_yaw0"] == pytest.approx([0.5, 0.5], abs=1e-9)
    assert m["centre_yaw90"] == pytest.approx([0.75, 0.5], abs=1e-9)
    assert m["centre_yawm90"] == pytest.approx([0.25, 0.5], abs=1e-9)
    assert m["right_edge_yaw0"][0] == pytest.approx(0.5 + 45 / 360, abs=1e-9)      # half of the 90° fov
    assert m["top_edge_pitch0"][1] == pytest.approx(0.5 - 45 / 180, abs=1e-9)
    assert m["cyl_yaw45"] == pytest.approx([0.5 + 45 / 180, 0.5], abs=1e-9)        # 180° span
    assert m["cyl_yaw100"] is None                                                  # outside the span
    # cylinder: v = 0.5 − tan(lat)·W/(span·H) = 0.5 − tan 30° · 4/(2π) for a 4:1 image over 360°
    assert m["cyl360_pitch30"] == pytest.approx([0.5, 0.5 - math.tan(math.radians(30)) * 4 / (2 * math.pi)], abs=1e-9)
    assert m["cyl_pitch30"] is None  # a 4:1 image over 180° spans only ±21.4° vertically


@needs_chromium
def test_screenshot_shows_expected_colours(rendered):
    report, img, _ = rendered
    assert img.size == (800, 600)
    bad = []
    for cid, _, expected in CELLS:
        got = centre_colour(img, report["cells"][cid]["box"])
        if not close(got, expected):
            bad.append(f"{cid}: centre {got}, expected {expected} (backend {report['cells'][cid]['backend']})")
    assert not bad, "\n".join(bad)


@needs_chromium
def test_viewers_are_not_blank(rendered):
    report, img, _ = rendered
    for cid, _, _ in CELLS:
        x0, y0, w, h = report["cells"][cid]["box"]
        crop = img.crop((x0 + 20, y0 + 20, x0 + w, y0 + h))  # leave out the caption
        colours = {c for _, c in crop.getcolors(maxcolors=1 << 16)}
        near_image = [c for c in colours if any(close(c, b, 12) for b in BANDS + [TOP, BOTTOM])]
        assert len(near_image) >= 1, f"{cid}: no test-image colour visible"
        assert len(colours) >= 2, f"{cid}: the viewer is one flat colour"
    # the 180° cylinder looked at 110° shows background in the middle but the image (at ~65°) at its left edge
    x0, y0, w, h = report["cells"]["cyl180_yaw110"]["box"]
    left = img.getpixel((x0 + 3, y0 + h // 2))
    assert close(left, band_at(0.5 + 65 / 180)), left


@needs_chromium
def test_drag_turns_the_view(rendered):
    report, img, _ = rendered
    view = report["cells"]["eq_drag"]["view"]
    assert view["yaw"] == pytest.approx(-DRAG_DX * FOV / CELL_H, abs=0.5)  # scene follows the pointer
    assert view["pitch"] == pytest.approx(0, abs=1e-6)
    before = centre_colour(img, report["cells"]["eq_yaw0"]["box"])
    after = centre_colour(img, report["cells"]["eq_drag"]["box"])
    assert not close(before, after), "the drag did not change what the viewer shows"


@needs_chromium
def test_comfyui_extension_hooks(rendered):
    report, img, site = rendered
    cell = report["cells"]["comfy_node"]
    assert cell["state"] == "ready"
    assert cell["detail"]["projection"] == "equirectangular" and cell["detail"]["spanDeg"] == 360
    assert cell["detail"]["url"] == "/api/view?filename=pano.png&subfolder=jd&type=output"
    assert cell["widgets"] == [["jd_panorama_viewer", False]]      # one widget, never serialised
    assert cell["otherPatched"] == []                               # other node types untouched
    assert cell["executedByOriginal"] == 1                          # the frontend's own onExecuted still runs
    assert ("GET", "/api/view?filename=pano.png&subfolder=jd&type=output") in [r[:2] for r in site.requests]
    old = report["cells"]["old_frontend"]
    assert old["captured"] is True                                  # a press on the viewer is not a node drag
    assert old["view"]["yaw"] == pytest.approx(90)
    assert old["info"]["url"] == "/api/view?filename=pano.png&subfolder=jd&type=output"


@needs_chromium
def test_trap_proxy_sees_page_requests(control, site):
    """The network check can fail: a page asking another host (HTTP or HTTPS) shows up in the trap."""
    page, _ = control
    methods = sorted(m for m, _, _ in page)
    assert methods == ["CONNECT", "GET"], page
    (get,) = [e for e in page if e[0] == "GET"]
    assert get[2].get("Referer", "").startswith(site[0].url)  # made by the page, not by the browser


@needs_chromium
def test_no_request_leaves_localhost(rendered, control):
    report, _, site = rendered
    _, background = control
    foreign = [e[:2] for e in site.trapped
               if trapped_host(e) not in background | BROWSER_SERVICE_HOSTS or "Referer" in e[2] or "Origin" in e[2]]
    assert foreign == [], f"the page tried to reach other hosts: {foreign}"
    assert all(r.startswith(site.url + "/") for r in report["resources"]), report["resources"]
    port = site.httpd.server_address[1]
    assert site.requests and all(h == f"127.0.0.1:{port}" for _, _, h in site.requests)
    paths = {urllib.parse.urlsplit(p).path for _, p, _ in site.requests}
    assert {"/extensions/jointdiffusion/panorama_viewer.js", "/extensions/jointdiffusion/jointdiffusion.js",
            "/pano.png", "/__report"} <= paths


def test_web_files_name_no_other_hosts():
    files = [p for p in WEB.rglob("*") if p.suffix in {".js", ".mjs", ".html", ".css", ".json"}]
    assert WEB / "panorama_viewer.js" in files and WEB / "jointdiffusion.js" in files
    # XML namespace names are identifiers, never fetched (three.js: document.createElementNS(XHTML, "canvas"));
    # `\//` is the end of a regular expression (`/^https?:\/\//i`), not a URL
    namespaces = {"http://www.w3.org/1999/xhtml", "http://www.w3.org/2000/svg"}
    hosts = []
    for p in files:
        for m in re.finditer(r"(?:https?:|wss?:)?(?<!\\)//([A-Za-z0-9.-]+\.[A-Za-z]{2,}|\d+\.\d+\.\d+\.\d+)[^\s\"'`]*",
                             p.read_text()):
            if m.group(1) not in {"127.0.0.1", "localhost"} and m.group(0) not in namespaces:
                hosts.append(f"{p.relative_to(REPO)}: {m.group(0)}")
    assert hosts == []
    core = (WEB / "panorama_viewer.js").read_text()
    assert "scripts/app.js" not in core and "scripts/api.js" not in core  # viewer core is ComfyUI-free
