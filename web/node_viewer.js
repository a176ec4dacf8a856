// What the pack's in-node viewers (Panorama Preview's 360° view, RGBD to Mesh's 3D view) share: the /view URL of
// an output file, the viewer element, its DOM widget, keeping it out of saved workflows, fitting the node,
// window-level drags for the old-frontend canvas fallback, and the node-type hooks. No ComfyUI imports: the
// callers pass `api`.

/** The URL ComfyUI serves an output file at ({filename, subfolder, type} of a node's UI message). */
export function viewUrl(ref, api) {
  const params = new URLSearchParams({
    filename: ref.filename, subfolder: ref.subfolder || "", type: ref.type || "output",
  });
  const route = "/view?" + params.toString();
  return api && typeof api.apiURL === "function" ? api.apiURL(route) : route;
}

/**
 * A viewer's element: a dark box with a canvas and a one-line hint at the bottom.
 * `stopEvents`: pointer, wheel and double-click stay in the viewer (the graph canvas under it must not pan or zoom
 * while the view is turned).
 */
export function makeViewerElement({ className, minHeight, emptyHint, stopEvents = false }) {
  const root = document.createElement("div");
  root.className = className;
  Object.assign(root.style, {
    position: "relative", width: "100%", height: "100%", minHeight: minHeight + "px",
    overflow: "hidden", background: "#181818", borderRadius: "4px", boxSizing: "border-box",
  });
  const canvas = document.createElement("canvas");
  Object.assign(canvas.style, { position: "absolute", inset: "0", width: "100%", height: "100%", display: "block" });
  const hint = document.createElement("div");
  hint.textContent = emptyHint;
  Object.assign(hint.style, {
    position: "absolute", left: "6px", bottom: "4px", right: "6px", font: "11px sans-serif", color: "#ddd",
    textShadow: "0 0 3px #000", pointerEvents: "none", userSelect: "none", whiteSpace: "nowrap",
    overflow: "hidden", textOverflow: "ellipsis",
  });
  root.append(canvas, hint);
  root.dataset.state = "empty";
  if (stopEvents) {
    for (const type of ["pointerdown", "wheel", "dblclick", "contextmenu"]) {
      root.addEventListener(type, (e) => { e.stopPropagation(); if (type === "contextmenu") e.preventDefault(); },
        type === "wheel" ? { passive: true } : undefined);
    }
  }
  return { root, canvas, hint };
}

/**
 * Leave the viewer out of the saved workflow's widgets_values: the LiteGraph of the March-2024 frontend saves
 * every widget's value by position, ignoring serialize: false, which appended a '' to the node's values. Only
 * when the viewer is the last widget (nothing after it would shift).
 */
export function keepViewerOutOfWorkflow(node, widget) {
  const onSerialize = node.onSerialize;
  node.onSerialize = function (o) {
    const r = onSerialize ? onSerialize.apply(this, arguments) : undefined;
    const ws = this.widgets || [];
    const vals = o && o.widgets_values;
    if (Array.isArray(vals) && vals.length === ws.length && ws[ws.length - 1] === widget) vals.pop();
    return r;
  };
}

/** The viewer element as a DOM widget (frontends with node.addDOMWidget: 2023-09 on, the Vue frontend too). */
export function addViewerWidget(node, name, root, minHeight) {
  const widget = node.addDOMWidget(name, name, root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => minHeight,
    getValue: () => "",
    setValue: () => {},
  });
  try { widget.serialize = false; } catch (_) { /* read-only in some frontends; options.serialize suffices */ }
  keepViewerOutOfWorkflow(node, widget);
  return widget;
}

/** Grow the node to its minimum size (never shrink what the user chose). */
export function fitNode(node) {
  if (typeof node.computeSize !== "function" || typeof node.setSize !== "function" || !node.size) return;
  const m = node.computeSize();
  if (m && (m[0] > node.size[0] || m[1] > node.size[1])) {
    node.setSize([Math.max(node.size[0], m[0]), Math.max(node.size[1], m[1])]);
  }
  if (node.setDirtyCanvas) node.setDirtyCanvas(true, true);
}

/**
 * Canvas fallback (frontends without addDOMWidget): after the node's own drawing, `paint(ctx, [x, y, w, h])` fills
 * the room below the widgets, then the hint is written over it. The room is kept in `state.rect` for the mouse.
 */
export function drawBelowWidgets(node, state, paint) {
  const onDrawForeground = node.onDrawForeground;
  node.onDrawForeground = function (ctx) {
    const r = onDrawForeground ? onDrawForeground.apply(this, arguments) : undefined;
    if (this.flags && this.flags.collapsed) return r;
    const widgetsBottom = (this.widgets || []).reduce((m, w) => Math.max(m, (w.last_y || 0) + 24), 0);
    const pad = 6, y = Math.max(widgetsBottom, 30) + pad;
    const w = Math.floor(this.size[0] - 2 * pad), h = Math.floor(this.size[1] - y - pad);
    if (w < 16 || h < 16) return r;
    state.rect = [pad, y, w, h];
    paint(ctx, state.rect);
    if (state.hint.textContent) {
      ctx.fillStyle = "#ddd";
      ctx.font = "11px sans-serif";
      ctx.fillText(state.hint.textContent, pad + 4, y + h - 6);
    }
    return r;
  };
}

/** Whether node-local `pos` lies in the rectangle `rc` = [x, y, w, h]. */
export function inRect(rc, pos) {
  return !!rc && pos[0] >= rc[0] && pos[1] >= rc[1] && pos[0] <= rc[0] + rc[2] && pos[1] <= rc[1] + rc[3];
}

/** Call `move(event)` on every pointer/mouse move of the window until the button is released. */
export function trackDrag(move) {
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
}

/**
 * Give every node of `nodeType` a viewer: made when the node is (so the widget order and the node's size are
 * stable), fed each executed message, destroyed with the node. `state` is the node property holding it.
 */
export function hookViewerNode(nodeType, state, ensure, show) {
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const r = onNodeCreated ? onNodeCreated.apply(this, arguments) : undefined;
    ensure(this);
    return r;
  };
  const onExecuted = nodeType.prototype.onExecuted;
  nodeType.prototype.onExecuted = function (message) {
    const r = onExecuted ? onExecuted.apply(this, arguments) : undefined;
    show(this, message);
    return r;
  };
  const onRemoved = nodeType.prototype.onRemoved;
  nodeType.prototype.onRemoved = function () {
    if (this[state]) { this[state].destroy(); this[state] = null; }
    return onRemoved ? onRemoved.apply(this, arguments) : undefined;
  };
}
