// JointDiffusion front-end extension (served from WEB_DIRECTORY; no network access at run time).
// JDRGBDToMesh nodes get an in-node 3D view of the first mesh they wrote: drag to orbit, wheel to zoom,
// right-drag to pan, double-click to reset. The viewer core lives in ./mesh_viewer.js (no ComfyUI imports; three.js
// from ./vendor/three_bundle.js). It is the pack's own view on every frontend, with or without core Preview3D.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { MeshViewer, formatOf, FORMATS } from "./mesh_viewer.js";

export const MESH_NODE = "JDRGBDToMesh";
const WIDGET_NAME = "jd_mesh_viewer";
const MIN_VIEWER_HEIGHT = 240;
const MIN_NODE_WIDTH = 320;
// A little from the right and above: the RGBD mesh's depth shows at once (0, 0 would be the photo's own view).
const INITIAL_VIEW = { azimuth: 20, elevation: 12 };
const HINT = "drag: orbit · wheel: zoom · right-drag: pan · double-click: reset";

/**
 * URL and format of a mesh in a node's UI output. `message` is what the server returned under "ui":
 * {"3d": [{filename, subfolder, type}]} (the payload of core SaveGLB, which JDRGBDToMesh returns too).
 * @returns {{url: string, format: string, filename: string} | null}
 */
export function meshFromMessage(message, index = 0) {
  const list = message && message["3d"];
  const ref = list && list[index];
  if (!ref || !ref.filename) return null;
  const params = new URLSearchParams({
    filename: ref.filename, subfolder: ref.subfolder || "", type: ref.type || "output",
  });
  const route = "/view?" + params.toString();
  const url = api && typeof api.apiURL === "function" ? api.apiURL(route) : route;
  return { url, format: formatOf(ref.filename), filename: ref.filename };
}

function makeViewerElement() {
  const root = document.createElement("div");
  root.className = "jd-mesh";
  Object.assign(root.style, {
    position: "relative", width: "100%", height: "100%", minHeight: MIN_VIEWER_HEIGHT + "px",
    overflow: "hidden", background: "#181818", borderRadius: "4px", boxSizing: "border-box",
  });
  const canvas = document.createElement("canvas");
  Object.assign(canvas.style, { position: "absolute", inset: "0", width: "100%", height: "100%", display: "block" });
  const hint = document.createElement("div");
  hint.textContent = "run the workflow to see the mesh";
  Object.assign(hint.style, {
    position: "absolute", left: "6px", bottom: "4px", right: "6px", font: "11px sans-serif", color: "#ddd",
    textShadow: "0 0 3px #000", pointerEvents: "none", userSelect: "none", whiteSpace: "nowrap",
    overflow: "hidden", textOverflow: "ellipsis",
  });
  root.append(canvas, hint);
  root.dataset.state = "empty";
  // The graph canvas under the widget must not also pan / zoom while the mesh is turned or zoomed.
  for (const type of ["pointerdown", "wheel", "dblclick", "contextmenu"]) {
    root.addEventListener(type, (e) => { e.stopPropagation(); if (type === "contextmenu") e.preventDefault(); },
      type === "wheel" ? { passive: true } : undefined);
  }
  return { root, canvas, hint };
}

/** DOM-widget viewer (ComfyUI frontends with node.addDOMWidget: 2023-09 onwards, incl. the Vue frontend). */
function addDomViewer(node) {
  const { root, canvas, hint } = makeViewerElement();
  // The viewer (and its WebGL context: browsers keep only ~16 alive) is made when the first mesh arrives.
  let viewer = null;
  const widget = node.addDOMWidget(WIDGET_NAME, WIDGET_NAME, root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => MIN_VIEWER_HEIGHT,
    getValue: () => "",
    setValue: () => {},
  });
  try { widget.serialize = false; } catch (_) { /* read-only in some frontends; options.serialize suffices */ }
  keepViewerOutOfWorkflow(node, widget);
  return {
    root, hint, widget,
    get viewer() { return viewer || (viewer = new MeshViewer(canvas, INITIAL_VIEW)); },
    destroy() { if (viewer) viewer.dispose(); viewer = null; },
  };
}

/**
 * Leave the viewer out of the saved workflow's widgets_values: LiteGraph before the Vue frontend (ComfyUI of 2024)
 * saves every widget's value by position, ignoring serialize: false, which would append a '' to the node's
 * values. Only when the viewer is the last widget (nothing after it would shift).
 */
function keepViewerOutOfWorkflow(node, widget) {
  const onSerialize = node.onSerialize;
  node.onSerialize = function (o) {
    const r = onSerialize ? onSerialize.apply(this, arguments) : undefined;
    const ws = this.widgets || [];
    const vals = o && o.widgets_values;
    if (Array.isArray(vals) && vals.length === ws.length && ws[ws.length - 1] === widget) vals.pop();
    return r;
  };
}

/** Canvas fallback for frontends without addDOMWidget: an offscreen viewer drawn in onDrawForeground. */
function addCanvasViewer(node) {
  const canvas = document.createElement("canvas");
  canvas.width = 320;
  canvas.height = 240;
  let viewer = null;
  const state = {
    root: null, hint: { textContent: "" }, widget: null, rect: null, lastKey: "",
    get viewer() {
      if (!viewer) {
        if (state.rect) { canvas.width = state.rect[2]; canvas.height = state.rect[3]; }  // fitted to the real shape
        viewer = new MeshViewer(canvas, { ...INITIAL_VIEW, interactive: false, autoResize: false });
        viewer.requestRender = () => node.setDirtyCanvas && node.setDirtyCanvas(true, false);
      }
      return viewer;
    },
    destroy() { if (viewer) viewer.dispose(); viewer = null; },
  };

  const onDrawForeground = node.onDrawForeground;
  node.onDrawForeground = function (ctx) {
    const r = onDrawForeground ? onDrawForeground.apply(this, arguments) : undefined;
    if (this.flags && this.flags.collapsed) return r;
    const widgetsBottom = (this.widgets || []).reduce((m, w) => Math.max(m, (w.last_y || 0) + 24), 0);
    const pad = 6, y = Math.max(widgetsBottom, 30) + pad;
    const w = Math.floor(this.size[0] - 2 * pad), h = Math.floor(this.size[1] - y - pad);
    if (w < 16 || h < 16) return r;
    state.rect = [pad, y, w, h];
    if (!viewer || !viewer.hasMesh) {
      ctx.fillStyle = "#181818";
      ctx.fillRect(pad, y, w, h);
    } else {
      const sizeChanged = viewer.setSize(w, h);  // (refits an unchanged view to the new shape)
      const v = viewer.getView();
      const key = [w, h, v.azimuth, v.elevation, v.distance, viewer.info && viewer.info.vertices].join();
      if (key !== state.lastKey || sizeChanged) { viewer.render(); state.lastKey = key; }
      ctx.drawImage(canvas, pad, y, w, h);
    }
    if (state.hint.textContent) {
      ctx.fillStyle = "#ddd";
      ctx.font = "11px sans-serif";
      ctx.fillText(state.hint.textContent, pad + 4, y + h - 6);
    }
    return r;
  };

  const onMouseDown = node.onMouseDown;
  node.onMouseDown = function (e, pos) {
    const rc = state.rect;
    if (!viewer || !viewer.hasMesh || !rc || pos[0] < rc[0] || pos[1] < rc[1] || pos[0] > rc[0] + rc[2]
        || pos[1] > rc[1] + rc[3]) {
      return onMouseDown ? onMouseDown.apply(this, arguments) : false;
    }
    const start = { x: e.clientX, y: e.clientY, view: viewer.getView() };
    const move = (ev) => {  // the same feel as OrbitControls: half the view's height turns the mesh 180°
      const degPerPx = 360 / rc[3];
      viewer.setView({ azimuth: start.view.azimuth - (ev.clientX - start.x) * degPerPx,
        elevation: start.view.elevation + (ev.clientY - start.y) * degPerPx });
    };
    const up = () => {
      window.removeEventListener("pointermove", move);
      window.removeEventListener("mousemove", move);
      window.removeEventListener("pointerup", up);
      window.removeEventListener("mouseup", up);
    };
    window.addEventListener("pointermove", move);
    window.addEventListener("mousemove", move);
    window.addEventListener("pointerup", up);
    window.addEventListener("mouseup", up);
    return true;  // tells LiteGraph not to drag the node
  };
  const onDblClick = node.onDblClick;
  node.onDblClick = function (e, pos) {
    const rc = state.rect;
    if (viewer && viewer.hasMesh && rc && pos[0] >= rc[0] && pos[1] >= rc[1] && pos[0] <= rc[0] + rc[2]
        && pos[1] <= rc[1] + rc[3]) {
      viewer.resetView();
      return true;
    }
    return onDblClick ? onDblClick.apply(this, arguments) : undefined;
  };
  return state;
}

/** Grow the node to its minimum size (never shrink what the user chose). */
function fitNode(node) {
  if (typeof node.computeSize !== "function" || typeof node.setSize !== "function" || !node.size) return;
  const m = node.computeSize();
  if (m && (m[0] > node.size[0] || m[1] > node.size[1])) {
    node.setSize([Math.max(node.size[0], m[0]), Math.max(node.size[1], m[1])]);
  }
  if (node.setDirtyCanvas) node.setDirtyCanvas(true, true);
}

function ensureViewer(node) {
  if (!node.jdMesh) {
    const dom = typeof node.addDOMWidget === "function";
    node.jdMesh = dom ? addDomViewer(node) : addCanvasViewer(node);
    if (node.size && typeof node.setSize === "function") {
      // DOM widget: computeSize() counts its minimum height; canvas fallback: room below the widgets.
      const m = dom && typeof node.computeSize === "function" ? node.computeSize() : null;
      const extra = dom ? 0 : MIN_VIEWER_HEIGHT + 12;
      node.setSize([Math.max(node.size[0], MIN_NODE_WIDTH, m ? m[0] : 0),
        Math.max(node.size[1] + extra, m ? m[1] : 0)]);
    }
  }
  return node.jdMesh;
}

/** Show the first mesh of a UI message (what onExecuted receives) in the node's 3D view. */
export async function showMesh(node, message) {
  const info = meshFromMessage(message);
  if (!info) return null;
  const jd = ensureViewer(node);
  if (!FORMATS.includes(info.format)) {
    jd.hint.textContent = `${info.filename}: no 3D view for .${info.format} files`;
    if (jd.root) jd.root.dataset.state = "error";
    return info;
  }
  if (jd.root) jd.root.dataset.state = "loading";
  jd.hint.textContent = "loading " + info.filename + " …";
  try {
    const meta = await jd.viewer.load(info.url, info.format);
    const size = meta.points ? `${meta.points.toLocaleString()} points` : `${meta.triangles.toLocaleString()} triangles`;
    jd.hint.textContent = `${info.filename} · ${size} · ${HINT}`;
    if (jd.root) {
      jd.root.dataset.state = "ready";
      jd.root.dispatchEvent(new CustomEvent("jd-mesh-loaded", { detail: { ...info, ...meta } }));
    }
    fitNode(node);
  } catch (e) {
    jd.hint.textContent = String(e.message || e);
    if (jd.root) jd.root.dataset.state = "error";
    console.warn("[JointDiffusion] mesh viewer:", e);
  }
  if (node.setDirtyCanvas) node.setDirtyCanvas(true, true);
  return info;
}

app.registerExtension({
  name: "jointdiffusion.mesh",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData || nodeData.name !== MESH_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated ? onNodeCreated.apply(this, arguments) : undefined;
      ensureViewer(this);  // created up front so the widget order and the node's size are stable
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted ? onExecuted.apply(this, arguments) : undefined;
      showMesh(this, message);
      return r;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      if (this.jdMesh) { this.jdMesh.destroy(); this.jdMesh = null; }
      return onRemoved ? onRemoved.apply(this, arguments) : undefined;
    };
  },
});
