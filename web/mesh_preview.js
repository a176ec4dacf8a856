// JointDiffusion front-end extension (served from WEB_DIRECTORY; no network access at run time).
// JDRGBDToMesh nodes get an in-node 3D view of the first mesh they wrote: drag to orbit, wheel to zoom,
// right-drag to pan, double-click to reset. The viewer core lives in ./mesh_viewer.js (no ComfyUI imports; three.js
// from ./vendor/three_bundle.js). It is the pack's own view on every frontend, with or without core Preview3D.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { MeshViewer, formatOf, FORMATS } from "./mesh_viewer.js";
import {
  addViewerWidget, drawBelowWidgets, fitNode, hookViewerNode, inRect, makeViewerElement, trackDrag, viewUrl,
} from "./node_viewer.js";

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
  const url = viewUrl(ref, api);
  return { url, format: formatOf(ref.filename), filename: ref.filename };
}

/** DOM-widget viewer (ComfyUI frontends with node.addDOMWidget: 2023-09 onwards, incl. the Vue frontend). */
function addDomViewer(node) {
  const { root, canvas, hint } = makeViewerElement({
    className: "jd-mesh", minHeight: MIN_VIEWER_HEIGHT, emptyHint: "run the workflow to see the mesh", stopEvents: true,
  });
  // The viewer (and its WebGL context: browsers keep only ~16 alive) is made when the first mesh arrives.
  let viewer = null;
  const widget = addViewerWidget(node, WIDGET_NAME, root, MIN_VIEWER_HEIGHT);
  return {
    root, hint, widget,
    get viewer() { return viewer || (viewer = new MeshViewer(canvas, INITIAL_VIEW)); },
    destroy() { if (viewer) viewer.dispose(); viewer = null; },
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

  drawBelowWidgets(node, state, (ctx, [x, y, w, h]) => {
    if (!viewer || !viewer.hasMesh) {
      ctx.fillStyle = "#181818";
      ctx.fillRect(x, y, w, h);
      return;
    }
    const sizeChanged = viewer.setSize(w, h);  // (refits an unchanged view to the new shape)
    const v = viewer.getView();
    const key = [w, h, v.azimuth, v.elevation, v.distance, viewer.info && viewer.info.vertices].join();
    if (key !== state.lastKey || sizeChanged) { viewer.render(); state.lastKey = key; }
    ctx.drawImage(canvas, x, y, w, h);
  });

  const onMouseDown = node.onMouseDown;
  node.onMouseDown = function (e, pos) {
    const rc = state.rect;
    if (!viewer || !viewer.hasMesh || !inRect(rc, pos)) return onMouseDown ? onMouseDown.apply(this, arguments) : false;
    const start = { x: e.clientX, y: e.clientY, view: viewer.getView() };
    trackDrag((ev) => {  // the same feel as OrbitControls: half the view's height turns the mesh 180°
      const degPerPx = 360 / rc[3];
      viewer.setView({ azimuth: start.view.azimuth - (ev.clientX - start.x) * degPerPx,
        elevation: start.view.elevation + (ev.clientY - start.y) * degPerPx });
    });
    return true;  // tells LiteGraph not to drag the node
  };
  const onDblClick = node.onDblClick;
  node.onDblClick = function (e, pos) {
    const rc = state.rect;
    if (viewer && viewer.hasMesh && inRect(rc, pos)) {
      viewer.resetView();
      return true;
    }
    return onDblClick ? onDblClick.apply(this, arguments) : undefined;
  };
  return state;
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
    if (nodeData && nodeData.name === MESH_NODE) hookViewerNode(nodeType, "jdMesh", ensureViewer, showMesh);
  },
});
