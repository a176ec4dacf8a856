// JointDiffusion front-end extension: inputs that only one method reads are hidden while another method is
// chosen (SyncDiffusion's sync_* and lpips_net on the Tiled Panorama Sampler), and come back, with their values,
// when it is chosen again. Hidden widgets keep their values and are still saved with the workflow.
//
// Frontends from 2024-09 on draw and lay out only widgets without `hidden`; the March-2024 frontend has no such
// flag, so there a hidden widget also gets a type LiteGraph does not draw and a zero height (restored on show).
import { app } from "../../scripts/app.js";

const isSync = (method) => String(method).startsWith("syncdiffusion");

/** node type → the widget that picks the method, and for each method-specific widget when it is shown. */
export const METHOD_INPUTS = {
  JDTiledDiffusionSampler: {
    control: "method",
    shownWhen: {
      sync_weight: isSync, sync_decay: isSync, sync_freq: isSync, sync_thres: isSync, lpips_net: isSync,
    },
  },
};

const HIDDEN_TYPE = "jd-hidden";

function setHidden(node, widget, hidden) {
  if (!!widget.jdHidden === hidden) return false;
  const legacy = typeof node.isWidgetVisible !== "function";  // the March-2024 LiteGraph
  if (hidden) {
    widget.jdHidden = { type: widget.type, computeSize: widget.computeSize };
    widget.hidden = true;
    if (widget.options) widget.options.hidden = true;
    if (legacy) {
      widget.type = HIDDEN_TYPE;
      widget.computeSize = () => [0, -4];
    }
  } else {
    const saved = widget.jdHidden;
    widget.jdHidden = null;
    widget.hidden = false;
    if (widget.options) widget.options.hidden = false;
    if (legacy) {
      widget.type = saved.type;
      if (saved.computeSize) widget.computeSize = saved.computeSize;
      else delete widget.computeSize;
    }
  }
  return true;
}

/** Show or hide the method-specific widgets of `node` for its current method; resize the node to fit. */
export function applyMethod(node) {
  const spec = METHOD_INPUTS[node.comfyClass || node.type];
  const control = spec && node.widgets && node.widgets.find((w) => w.name === spec.control);
  if (!control) return;
  let changed = false;
  for (const w of node.widgets) {
    const rule = spec.shownWhen[w.name];
    if (rule) changed = setHidden(node, w, !rule(control.value)) || changed;
  }
  if (changed && typeof node.computeSize === "function" && typeof node.setSize === "function" && node.size) {
    node.setSize([node.size[0], node.computeSize()[1]]);
    if (node.setDirtyCanvas) node.setDirtyCanvas(true, true);
  }
}

app.registerExtension({
  name: "jointdiffusion.methodInputs",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const spec = nodeData && METHOD_INPUTS[nodeData.name];
    if (!spec) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated ? onNodeCreated.apply(this, arguments) : undefined;
      const control = (this.widgets || []).find((w) => w.name === spec.control);
      if (control) {
        const callback = control.callback;
        const node = this;
        control.callback = function () {
          const out = callback ? callback.apply(this, arguments) : undefined;
          applyMethod(node);
          return out;
        };
      }
      applyMethod(this);
      return r;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {  // a loaded workflow's values are in the widgets now
      const r = onConfigure ? onConfigure.apply(this, arguments) : undefined;
      applyMethod(this);
      return r;
    };
  },
});
