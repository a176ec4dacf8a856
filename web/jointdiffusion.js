// JointDiffusion front-end extension (served from WEB_DIRECTORY; no network access at run time).
// JDPanoramaPreview nodes get an in-node panorama viewer: drag to look around, wheel to zoom,
// double-click to reset. The viewer core lives in ./panorama_viewer.js (no ComfyUI imports).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { PanoramaViewer, PROJECTIONS } from "./panorama_viewer.js";
import {
  addViewerWidget, drawBelowWidgets, fitNode, hookViewerNode, inRect, makeViewerElement, trackDrag, viewUrl,
} from "./node_viewer.js";

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
  const url = viewUrl(ref, api);
  const projection = PROJECTIONS.includes(meta.projection) ? meta.projection : "equirectangular";
  const span = Number(meta.span_deg);
  return { url, projection, spanDeg: span > 0 ? Math.min(360, span) : 360 };
}

/** DOM-widget viewer (ComfyUI frontends with node.addDOMWidget: 2023-09 onwards, incl. the Vue frontend). */
function addDomViewer(node) {
  const { root, canvas, hint } = makeViewerElement({
    className: "jd-panorama", minHeight: MIN_VIEWER_HEIGHT, emptyHint: "run the workflow to see the panorama",
  });
  // The viewer (and its WebGL context: browsers keep only ~16 alive) is made when the first image arrives.
  let viewer = null;
  const widget = addViewerWidget(node, WIDGET_NAME, root, MIN_VIEWER_HEIGHT);
  return {
    root, hint, widget,
    get viewer() { return viewer || (viewer = new PanoramaViewer(canvas, { fov: 90 })); },
    destroy() { if (viewer) viewer.destroy(); viewer = null; },
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

  drawBelowWidgets(node, state, (ctx, [x, y, w, h]) => {
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    const key = [w, h, viewer.yaw, viewer.pitch, viewer.fov, viewer.projection, viewer.spanDeg, viewer.hasImage].join();
    if (key !== state.lastKey) { viewer.render(); state.lastKey = key; }
    ctx.drawImage(canvas, x, y, w, h);
  });

  const onMouseDown = node.onMouseDown;
  node.onMouseDown = function (e, pos) {
    const rc = state.rect;
    if (!viewer.hasImage || !inRect(rc, pos)) return onMouseDown ? onMouseDown.apply(this, arguments) : false;
    const start = { x: e.clientX, y: e.clientY, yaw: viewer.yaw, pitch: viewer.pitch };
    trackDrag((ev) => {
      const degPerPx = viewer.fov / rc[3];
      viewer.setView({ yaw: start.yaw - (ev.clientX - start.x) * degPerPx, pitch: start.pitch + (ev.clientY - start.y) * degPerPx });
    });
    return true;  // tells LiteGraph not to drag the node
  };
  if (node.size[1] < 300) node.size[1] = 300;
  return state;
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
    if (nodeData && nodeData.name === PANORAMA_NODE) hookViewerNode(nodeType, "jdPanorama", ensureViewer, showPanorama);
  },
});
