// JointDiffusion front-end extension (served from WEB_DIRECTORY; no network access at run time).
// JDPanoramaPreview nodes get an in-node panorama viewer: drag to look around, wheel to zoom,
// double-click to reset. The viewer core lives in ./panorama_viewer.js (no ComfyUI imports).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { PanoramaViewer, PROJECTIONS } from "./panorama_viewer.js";

export const PANORAMA_NODE = "JDPanoramaPreview";
const WIDGET_NAME = "jd_panorama_viewer";
const MIN_VIEWER_HEIGHT = 220;
const HINT = "drag: look around · wheel: zoom · double-click: reset";

/**
 * Image URL and projection of the first panorama in a node's UI output.
 * `message` is what the server returned under "ui": {images: [{filename, subfolder, type}],
 * jd_panorama: [{projection, span_deg}]}. An entry of jd_panorama may carry its own filename/subfolder/type.
 * @returns {{url: string, projection: string, spanDeg: number} | null}
 */
export function panoramaFromMessage(message, index = 0) {
  if (!message) return null;
  const meta = (message.jd_panorama && message.jd_panorama[index]) || {};
  const ref = meta.filename ? meta : message.images && message.images[index];
  if (!ref || !ref.filename) return null;
  const params = new URLSearchParams({
    filename: ref.filename, subfolder: ref.subfolder || "", type: ref.type || "output",
  });
  const route = "/view?" + params.toString();
  const url = api && typeof api.apiURL === "function" ? api.apiURL(route) : route;
  const projection = PROJECTIONS.includes(meta.projection) ? meta.projection : "equirectangular";
  const span = Number(meta.span_deg);
  return { url, projection, spanDeg: span > 0 ? Math.min(360, span) : 360 };
}

function makeViewerElement() {
  const root = document.createElement("div");
  root.className = "jd-panorama";
  Object.assign(root.style, {
    position: "relative", width: "100%", height: "100%", minHeight: MIN_VIEWER_HEIGHT + "px",
    overflow: "hidden", background: "#181818", borderRadius: "4px", boxSizing: "border-box",
  });
  const canvas = document.createElement("canvas");
  Object.assign(canvas.style, { position: "absolute", inset: "0", width: "100%", height: "100%", display: "block" });
  const hint = document.createElement("div");
  hint.textContent = "run the workflow to see the panorama";
  Object.assign(hint.style, {
    position: "absolute", left: "6px", bottom: "4px", font: "11px sans-serif", color: "#ddd",
    textShadow: "0 0 3px #000", pointerEvents: "none", userSelect: "none",
  });
  root.append(canvas, hint);
  root.dataset.state = "empty";
  return { root, canvas, hint };
}

/** DOM-widget viewer (ComfyUI frontends with node.addDOMWidget: 2023-09 onwards, incl. the Vue frontend). */
function addDomViewer(node) {
  const { root, canvas, hint } = makeViewerElement();
  // The viewer (and its WebGL context: browsers keep only ~16 alive) is made when the first image arrives.
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
    get viewer() { return viewer || (viewer = new PanoramaViewer(canvas, { fov: 90 })); },
    destroy() { if (viewer) viewer.destroy(); viewer = null; },
  };
}

/**
 * Leave the viewer out of the saved workflow's widgets_values: the LiteGraph of the March-2024 frontend saves
 * every widget's value by position, ignoring serialize: false, which appended a '' to the node's values. Only
 * when the viewer is the last widget (nothing after it would shift).
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

/** Canvas fallback for frontends without addDOMWidget: draw an offscreen viewer in onDrawForeground. */
function addCanvasViewer(node) {
  const canvas = document.createElement("canvas");
  canvas.width = 512;
  canvas.height = 256;
  const viewer = new PanoramaViewer(canvas, { fov: 90, interactive: false, autoResize: false });
  viewer.requestRender = () => node.setDirtyCanvas && node.setDirtyCanvas(true, false);
  const state = { viewer, root: null, hint: { textContent: "" }, widget: null, rect: null, lastKey: "",
    destroy() { viewer.destroy(); } };

  const onDrawForeground = node.onDrawForeground;
  node.onDrawForeground = function (ctx) {
    const r = onDrawForeground ? onDrawForeground.apply(this, arguments) : undefined;
    if (this.flags && this.flags.collapsed) return r;
    const widgetsBottom = (this.widgets || []).reduce((m, w) => Math.max(m, (w.last_y || 0) + 24), 0);
    const pad = 6, y = Math.max(widgetsBottom, 30) + pad;
    const w = Math.floor(this.size[0] - 2 * pad), h = Math.floor(this.size[1] - y - pad);
    if (w < 16 || h < 16) return r;
    state.rect = [pad, y, w, h];
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    const key = [w, h, viewer.yaw, viewer.pitch, viewer.fov, viewer.projection, viewer.spanDeg, viewer.hasImage].join();
    if (key !== state.lastKey) { viewer.render(); state.lastKey = key; }
    ctx.drawImage(canvas, pad, y, w, h);
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
    if (!viewer.hasImage || !rc || pos[0] < rc[0] || pos[1] < rc[1] || pos[0] > rc[0] + rc[2] || pos[1] > rc[1] + rc[3]) {
      return onMouseDown ? onMouseDown.apply(this, arguments) : false;
    }
    const start = { x: e.clientX, y: e.clientY, yaw: viewer.yaw, pitch: viewer.pitch };
    const move = (ev) => {
      const degPerPx = viewer.fov / rc[3];
      viewer.setView({ yaw: start.yaw - (ev.clientX - start.x) * degPerPx, pitch: start.pitch + (ev.clientY - start.y) * degPerPx });
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
  if (node.size[1] < 300) node.size[1] = 300;
  return state;
}

/** Grow the node to its minimum size (the frontend may add its own image preview below the viewer). */
function fitNode(node) {
  if (typeof node.computeSize !== "function" || typeof node.setSize !== "function" || !node.size) return;
  const m = node.computeSize();
  if (m && (m[0] > node.size[0] || m[1] > node.size[1])) {
    node.setSize([Math.max(node.size[0], m[0]), Math.max(node.size[1], m[1])]);
  }
  if (node.setDirtyCanvas) node.setDirtyCanvas(true, true);
}

function ensureViewer(node) {
  if (!node.jdPanorama) {
    node.jdPanorama = typeof node.addDOMWidget === "function" ? addDomViewer(node) : addCanvasViewer(node);
    if (node.size && typeof node.setSize === "function") {
      node.setSize([Math.max(node.size[0], 400), Math.max(node.size[1], 320)]);
    }
  }
  return node.jdPanorama;
}

/** Show the panorama of a UI message (what onExecuted receives) in the node's viewer. */
export async function showPanorama(node, message) {
  const info = panoramaFromMessage(message);
  if (!info) return null;
  const jd = ensureViewer(node);
  jd.viewer.setProjection(info.projection, info.spanDeg);
  if (jd.root) jd.root.dataset.state = "loading";
  try {
    await jd.viewer.load(info.url);
    jd.hint.textContent = HINT;
    if (jd.root) {
      jd.root.dataset.state = "ready";
      jd.root.dispatchEvent(new CustomEvent("jd-panorama-loaded", { detail: info }));
    }
    fitNode(node);
    setTimeout(() => fitNode(node), 300);  // after the frontend has drawn (and sized) its own preview
  } catch (e) {
    jd.hint.textContent = String(e.message || e);
    if (jd.root) jd.root.dataset.state = "error";
    console.warn("[JointDiffusion] panorama viewer:", e);
  }
  return info;
}

app.registerExtension({
  name: "jointdiffusion.core",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData || nodeData.name !== PANORAMA_NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated ? onNodeCreated.apply(this, arguments) : undefined;
      ensureViewer(this);  // created up front so the widget order is stable
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const r = onExecuted ? onExecuted.apply(this, arguments) : undefined;
      showPanorama(this, message);
      return r;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      if (this.jdPanorama) { this.jdPanorama.destroy(); this.jdPanorama = null; }
      return onRemoved ? onRemoved.apply(this, arguments) : undefined;
    };
  },
});
