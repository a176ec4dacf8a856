// Panorama viewer core: projection maths and rendering of one panorama image into a <canvas>.
// Plain ES module, no ComfyUI imports, no network access (everything it needs is in this file).
// Rendering uses WebGL (one full-screen quad, per-pixel ray → panorama lookup in the fragment shader) and
// falls back to Canvas 2D (the same maths in JavaScript, at reduced resolution) where WebGL is unavailable.
//
// Conventions (all angles in degrees in the public API):
//   yaw   — rotation about the vertical axis; 0 looks at the horizontal centre of the image (u = 0.5),
//           +90 looks right, i.e. at u = 0.75 of a 360° panorama.
//   pitch — elevation; +90 looks straight up (top row of an equirectangular image).
//   fov   — vertical field of view of the virtual camera.
//   Panorama texture coordinates (u, v): u = 0 left edge, v = 0 top edge.
// Projections:
//   "equirectangular": u = 0.5 + lon / span_h, v = 0.5 − lat / span_v, span_v = min(180°, span_h · H / W)
//                      (square pixels in angle; a 2:1 image with span 360° is a full sphere).
//   "cylindrical":     u = 0.5 + lon / span_h, v = 0.5 − tan(lat) · W / (span_h · H)
//                      (a cylinder of radius W / span_h pixels; rows are straight lines on the cylinder).
// With span_h = 360° the horizontal coordinate wraps around; with a smaller span, and above/below the
// image's vertical extent, the background colour is shown.

export const PROJECTIONS = ["equirectangular", "cylindrical"];

const DEG = Math.PI / 180;

/** Clamp x to [lo, hi]. */
export function clamp(x, lo, hi) {
  return Math.min(hi, Math.max(lo, x));
}

/** Normalise a yaw angle (degrees) to (−180, 180]. */
export function wrapYaw(yaw) {
  let y = ((yaw + 180) % 360 + 360) % 360 - 180;
  return y === -180 ? 180 : y;
}

/**
 * Ray direction (world space, not normalised) through a screen point.
 * @param {number} yaw   degrees
 * @param {number} pitch degrees
 * @param {number} fov   vertical field of view, degrees
 * @param {number} aspect width / height of the view
 * @param {number} sx    horizontal screen coordinate in [−1, 1] (−1 left)
 * @param {number} sy    vertical screen coordinate in [−1, 1] (+1 top)
 * @returns {number[]} [x, y, z]: +z is yaw 0, +x is yaw 90, +y is up
 */
export function rayDirection(yaw, pitch, fov, aspect, sx, sy) {
  const t = Math.tan((fov * DEG) / 2);
  const cx = sx * t * aspect, cy = sy * t, cz = 1;
  const cp = Math.cos(pitch * DEG), sp = Math.sin(pitch * DEG);
  const y1 = cy * cp + cz * sp;
  const z1 = -cy * sp + cz * cp;
  const cyw = Math.cos(yaw * DEG), syw = Math.sin(yaw * DEG);
  return [cx * cyw + z1 * syw, y1, -cx * syw + z1 * cyw];
}

/**
 * Panorama texture coordinate of a world direction.
 * @param {number[]} dir [x, y, z]
 * @param {{projection: string, spanDeg: number, imageAspect: number}} p imageAspect = width / height
 * @returns {number[] | null} [u, v] in [0, 1], or null where the panorama has no pixel (background)
 */
export function directionToUV(dir, p) {
  const [x, y, z] = dir;
  const span = clamp(p.spanDeg, 1, 360) * DEG;
  const rho = Math.hypot(x, z);
  const lon = Math.atan2(x, z);
  let u = 0.5 + lon / span;
  if (p.spanDeg >= 360) u -= Math.floor(u);
  else if (u < 0 || u > 1) return null;
  let v;
  if (p.projection === "cylindrical") {
    if (rho < 1e-12) return null;
    v = 0.5 - (y / rho) * (p.imageAspect / span);
  } else {
    const spanV = Math.min(Math.PI, span / p.imageAspect);
    v = 0.5 - Math.atan2(y, rho) / spanV;
  }
  if (v < 0 || v > 1) return null;
  return [u, v];
}

/**
 * Panorama texture coordinate seen at a canvas pixel (pixel centres; y down as in the canvas).
 * @param {{yaw:number, pitch:number, fov:number}} view
 * @param {number} px @param {number} py pixel coordinates
 * @param {number} width @param {number} height canvas size in pixels
 * @param {{projection: string, spanDeg: number, imageAspect: number}} p
 */
export function screenToUV(view, px, py, width, height, p) {
  const sx = ((px + 0.5) / width) * 2 - 1;
  const sy = 1 - ((py + 0.5) / height) * 2;
  return directionToUV(rayDirection(view.yaw, view.pitch, view.fov, width / height, sx, sy), p);
}

/** Largest pitch (degrees) that still has image at the screen centre, used to clamp dragging. */
export function maxPitch(p) {
  const span = clamp(p.spanDeg, 1, 360) * DEG;
  if (p.projection === "cylindrical") return Math.min(89, Math.atan((0.5 * span) / p.imageAspect) / DEG);
  return Math.min(90, (0.5 * Math.min(Math.PI, span / p.imageAspect)) / DEG);
}

// ---- WebGL backend -------------------------------------------------------------------------------------

const VERT = `
attribute vec2 aPos;
varying vec2 vScreen;
void main() { vScreen = aPos; gl_Position = vec4(aPos, 0.0, 1.0); }`;

const FRAG = `
precision highp float;
varying vec2 vScreen;
uniform sampler2D uTex;
uniform float uYaw, uPitch, uTanHalf, uAspect, uSpan, uImgAspect;
uniform int uCylindrical, uWrap;
uniform vec3 uBackground;
const float PI = 3.141592653589793;
void main() {
  vec3 c = vec3(vScreen.x * uTanHalf * uAspect, vScreen.y * uTanHalf, 1.0);
  float cp = cos(uPitch), sp = sin(uPitch);
  vec3 d1 = vec3(c.x, c.y * cp + c.z * sp, -c.y * sp + c.z * cp);
  float cy = cos(uYaw), sy = sin(uYaw);
  vec3 d = vec3(d1.x * cy + d1.z * sy, d1.y, -d1.x * sy + d1.z * cy);
  float rho = length(d.xz);
  float u = 0.5 + atan(d.x, d.z) / uSpan;
  bool inside = true;
  if (uWrap == 1) { u = fract(u); } else if (u < 0.0 || u > 1.0) { inside = false; }
  float v;
  if (uCylindrical == 1) {
    v = 0.5 - (d.y / max(rho, 1e-12)) * (uImgAspect / uSpan);
  } else {
    v = 0.5 - atan(d.y, rho) / min(PI, uSpan / uImgAspect);
  }
  if (v < 0.0 || v > 1.0) { inside = false; }
  gl_FragColor = inside ? vec4(texture2D(uTex, vec2(u, v)).rgb, 1.0) : vec4(uBackground, 1.0);
}`;

class WebGLBackend {
  constructor(canvas) {
    const opts = { antialias: false, depth: false, stencil: false, preserveDrawingBuffer: true, alpha: false };
    const gl = canvas.getContext("webgl", opts) || canvas.getContext("experimental-webgl", opts);
    if (!gl) throw new Error("WebGL is not available");
    this.gl = gl;
    const compile = (type, src) => {
      const s = gl.createShader(type);
      gl.shaderSource(s, src);
      gl.compileShader(s);
      if (!gl.getShaderParameter(s, gl.COMPILE_STATUS)) throw new Error("shader: " + gl.getShaderInfoLog(s));
      return s;
    };
    const prog = gl.createProgram();
    gl.attachShader(prog, compile(gl.VERTEX_SHADER, VERT));
    gl.attachShader(prog, compile(gl.FRAGMENT_SHADER, FRAG));
    gl.linkProgram(prog);
    if (!gl.getProgramParameter(prog, gl.LINK_STATUS)) throw new Error("link: " + gl.getProgramInfoLog(prog));
    this.prog = prog;
    this.buf = gl.createBuffer();
    gl.bindBuffer(gl.ARRAY_BUFFER, this.buf);
    gl.bufferData(gl.ARRAY_BUFFER, new Float32Array([-1, -1, 1, -1, -1, 1, 1, 1]), gl.STATIC_DRAW);
    this.loc = {};
    for (const n of ["uTex", "uYaw", "uPitch", "uTanHalf", "uAspect", "uSpan", "uImgAspect", "uCylindrical",
      "uWrap", "uBackground"]) this.loc[n] = gl.getUniformLocation(prog, n);
    this.aPos = gl.getAttribLocation(prog, "aPos");
    this.tex = null;
    this.maxSize = gl.getParameter(gl.MAX_TEXTURE_SIZE) || 2048;
  }

  setImage(source) {
    const gl = this.gl;
    let src = source;
    const w = source.naturalWidth || source.width, h = source.naturalHeight || source.height;
    if (w > this.maxSize || h > this.maxSize) {  // downscale to what the GPU accepts
      const s = Math.min(this.maxSize / w, this.maxSize / h);
      src = document.createElement("canvas");
      src.width = Math.max(1, Math.floor(w * s));
      src.height = Math.max(1, Math.floor(h * s));
      src.getContext("2d").drawImage(source, 0, 0, src.width, src.height);
    }
    if (this.tex) gl.deleteTexture(this.tex);
    this.tex = gl.createTexture();
    gl.bindTexture(gl.TEXTURE_2D, this.tex);
    gl.pixelStorei(gl.UNPACK_FLIP_Y_WEBGL, false);
    gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA, gl.RGBA, gl.UNSIGNED_BYTE, src);
    // NPOT-safe parameters (WebGL 1): no mipmaps, clamp; the horizontal wrap is done in the shader.
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.LINEAR);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MAG_FILTER, gl.LINEAR);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
    gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
  }

  render(state, width, height) {
    const gl = this.gl;
    gl.viewport(0, 0, width, height);
    const bg = state.background;
    gl.clearColor(bg[0] / 255, bg[1] / 255, bg[2] / 255, 1);
    gl.clear(gl.COLOR_BUFFER_BIT);
    if (!this.tex) return;
    gl.useProgram(this.prog);
    gl.bindBuffer(gl.ARRAY_BUFFER, this.buf);
    gl.enableVertexAttribArray(this.aPos);
    gl.vertexAttribPointer(this.aPos, 2, gl.FLOAT, false, 0, 0);
    gl.activeTexture(gl.TEXTURE0);
    gl.bindTexture(gl.TEXTURE_2D, this.tex);
    const L = this.loc;
    gl.uniform1i(L.uTex, 0);
    gl.uniform1f(L.uYaw, state.yaw * DEG);
    gl.uniform1f(L.uPitch, state.pitch * DEG);
    gl.uniform1f(L.uTanHalf, Math.tan((state.fov * DEG) / 2));
    gl.uniform1f(L.uAspect, width / height);
    gl.uniform1f(L.uSpan, clamp(state.spanDeg, 1, 360) * DEG);
    gl.uniform1f(L.uImgAspect, state.imageAspect);
    gl.uniform1i(L.uCylindrical, state.projection === "cylindrical" ? 1 : 0);
    gl.uniform1i(L.uWrap, state.spanDeg >= 360 ? 1 : 0);
    gl.uniform3f(L.uBackground, bg[0] / 255, bg[1] / 255, bg[2] / 255);
    gl.drawArrays(gl.TRIANGLE_STRIP, 0, 4);
  }

  destroy() {
    const gl = this.gl;
    if (this.tex) gl.deleteTexture(this.tex);
    gl.deleteBuffer(this.buf);
    gl.deleteProgram(this.prog);
  }
}

// ---- Canvas 2D backend ---------------------------------------------------------------------------------

class Canvas2DBackend {
  /** @param {HTMLCanvasElement} canvas @param {number} maxPixels render budget per frame (then upscaled) */
  constructor(canvas, maxPixels = 160000, maxSource = 2048) {
    this.ctx = canvas.getContext("2d");
    if (!this.ctx) throw new Error("Canvas 2D is not available");
    this.maxPixels = maxPixels;
    this.maxSource = maxSource;
    this.src = null;
    this.low = document.createElement("canvas");
  }

  setImage(source) {
    const w = source.naturalWidth || source.width, h = source.naturalHeight || source.height;
    const s = Math.min(1, this.maxSource / Math.max(w, h));
    const c = document.createElement("canvas");
    c.width = Math.max(1, Math.round(w * s));
    c.height = Math.max(1, Math.round(h * s));
    const cx = c.getContext("2d");
    cx.drawImage(source, 0, 0, c.width, c.height);
    this.src = { w: c.width, h: c.height, data: cx.getImageData(0, 0, c.width, c.height).data };
  }

  render(state, width, height) {
    const ctx = this.ctx;
    const bg = state.background;
    if (!this.src) {
      ctx.fillStyle = `rgb(${bg[0]},${bg[1]},${bg[2]})`;
      ctx.fillRect(0, 0, width, height);
      return;
    }
    const scale = Math.min(1, Math.sqrt(this.maxPixels / (width * height)));
    const w = Math.max(1, Math.round(width * scale)), h = Math.max(1, Math.round(height * scale));
    if (this.low.width !== w || this.low.height !== h) { this.low.width = w; this.low.height = h; }
    const lctx = this.low.getContext("2d");
    const out = lctx.createImageData(w, h);
    const o = out.data, S = this.src, sd = S.data;
    const p = { projection: state.projection, spanDeg: state.spanDeg, imageAspect: state.imageAspect };
    // Rotation and camera constants hoisted out of the per-pixel loop (same maths as rayDirection).
    const t = Math.tan((state.fov * DEG) / 2), aspect = width / height;
    const cp = Math.cos(state.pitch * DEG), sp = Math.sin(state.pitch * DEG);
    const cyw = Math.cos(state.yaw * DEG), syw = Math.sin(state.yaw * DEG);
    const dir = [0, 0, 0];
    let k = 0;
    for (let j = 0; j < h; j++) {
      const cy = (1 - ((j + 0.5) / h) * 2) * t;
      const y1 = cy * cp + sp, z0 = -cy * sp + cp;
      for (let i = 0; i < w; i++, k += 4) {
        const cx = (((i + 0.5) / w) * 2 - 1) * t * aspect;
        dir[0] = cx * cyw + z0 * syw; dir[1] = y1; dir[2] = -cx * syw + z0 * cyw;
        const uv = directionToUV(dir, p);
        if (uv === null) { o[k] = bg[0]; o[k + 1] = bg[1]; o[k + 2] = bg[2]; o[k + 3] = 255; continue; }
        const x = Math.min(S.w - 1, Math.floor(uv[0] * S.w)), y = Math.min(S.h - 1, Math.floor(uv[1] * S.h));
        const q = (y * S.w + x) * 4;
        o[k] = sd[q]; o[k + 1] = sd[q + 1]; o[k + 2] = sd[q + 2]; o[k + 3] = 255;
      }
    }
    lctx.putImageData(out, 0, 0);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(this.low, 0, 0, width, height);
  }

  destroy() { this.src = null; }
}

// ---- viewer --------------------------------------------------------------------------------------------

/**
 * Interactive viewer bound to one canvas. Mouse/pen/touch drag turns the view (the scene follows the
 * pointer), the wheel changes the field of view, double-click resets the view.
 *
 * options: projection ("equirectangular" | "cylindrical"), spanDeg (1–360), yaw, pitch, fov (degrees),
 *          renderer ("auto" | "webgl" | "2d"), interactive (bool), background ([r, g, b] 0–255),
 *          minFov, maxFov, autoResize (track the canvas' CSS size, default true), onChange(view).
 */
export class PanoramaViewer {
  constructor(canvas, options = {}) {
    this.canvas = canvas;
    this.projection = options.projection || "equirectangular";
    this.spanDeg = options.spanDeg ?? 360;
    this.initialView = { yaw: options.yaw ?? 0, pitch: options.pitch ?? 0, fov: options.fov ?? 75 };
    this.yaw = this.initialView.yaw;
    this.pitch = this.initialView.pitch;
    this.fov = this.initialView.fov;
    this.minFov = options.minFov ?? 20;
    this.maxFov = options.maxFov ?? 120;
    this.background = options.background || [24, 24, 24];
    this.imageAspect = 2;
    this.hasImage = false;
    this.onChange = options.onChange || null;
    this._raf = 0;
    this._drag = null;
    this._listeners = [];
    this.backend = null;
    this.backendName = "";
    const want = options.renderer || "auto";
    if (want !== "2d") {
      try {
        this.backend = new WebGLBackend(canvas);
        this.backendName = "webgl";
      } catch (e) {
        if (want === "webgl") throw e;
      }
    }
    if (!this.backend) {
      this.backend = new Canvas2DBackend(canvas, options.maxPixels);
      this.backendName = "2d";
    } else {
      // Browsers cap the number of live WebGL contexts and may drop old ones: rebuild when given back.
      this._on(canvas, "webglcontextlost", (e) => e.preventDefault());
      this._on(canvas, "webglcontextrestored", () => {
        this.backend = new WebGLBackend(canvas);
        if (this._source) this.backend.setImage(this._source);
        this.requestRender();
      });
    }
    this.setProjection(this.projection, this.spanDeg);
    if (options.interactive !== false) this._bindInput();
    if (options.autoResize !== false && typeof ResizeObserver !== "undefined") {
      this._ro = new ResizeObserver(() => this.requestRender());
      this._ro.observe(canvas);
    }
  }

  /** Set the projection and horizontal span (degrees, clamped to 1–360). */
  setProjection(projection, spanDeg = this.spanDeg) {
    if (!PROJECTIONS.includes(projection)) {
      throw new Error(`unknown projection '${projection}': use one of ${PROJECTIONS.join(", ")}`);
    }
    this.projection = projection;
    this.spanDeg = clamp(Number(spanDeg) || 360, 1, 360);
    this.pitch = clamp(this.pitch, -this._maxPitch(), this._maxPitch());
    this.requestRender();
  }

  /** Use an already loaded image (HTMLImageElement, canvas, ImageBitmap). */
  setImage(source) {
    const w = source.naturalWidth || source.width, h = source.naturalHeight || source.height;
    if (!w || !h) throw new Error("the panorama image is empty");
    this.imageAspect = w / h;
    this.backend.setImage(source);
    this._source = source;
    this.hasImage = true;
    this.pitch = clamp(this.pitch, -this._maxPitch(), this._maxPitch());
    this.requestRender();
  }

  /** Load an image from a (same-origin) URL; resolves once it is shown. */
  load(url) {
    return new Promise((resolve, reject) => {
      const img = new Image();
      img.onload = () => {
        try { this.setImage(img); this.render(); resolve(img); } catch (e) { reject(e); }
      };
      img.onerror = () => reject(new Error(`could not load panorama image ${url}`));
      img.src = url;
    });
  }

  /** Change any of yaw, pitch, fov (degrees). */
  setView({ yaw = this.yaw, pitch = this.pitch, fov = this.fov } = {}) {
    this.fov = clamp(fov, this.minFov, this.maxFov);
    this.yaw = wrapYaw(yaw);
    this.pitch = clamp(pitch, -this._maxPitch(), this._maxPitch());
    this.requestRender();
    if (this.onChange) this.onChange(this.getView());
  }

  getView() { return { yaw: this.yaw, pitch: this.pitch, fov: this.fov }; }

  resetView() { this.setView(this.initialView); }

  _params() { return { projection: this.projection, spanDeg: this.spanDeg, imageAspect: this.imageAspect }; }

  _maxPitch() { return maxPitch(this._params()); }

  /** Panorama (u, v) at a canvas pixel for the current view, or null (background). */
  uvAt(px, py) {
    const { width, height } = this.canvas;
    return screenToUV(this.getView(), px, py, width, height, this._params());
  }

  /** Draw on the next animation frame (coalesces many changes into one draw). */
  requestRender() {
    if (this._raf) return;
    const raf = typeof requestAnimationFrame === "function" ? requestAnimationFrame : (f) => setTimeout(f, 16);
    this._raf = raf(() => { this._raf = 0; this.render(); });
  }

  /** Size the drawing buffer to the canvas' displayed size (× devicePixelRatio, capped) and draw now. */
  render() {
    const c = this.canvas;
    const dpr = Math.min(2, (typeof window !== "undefined" && window.devicePixelRatio) || 1);
    const cw = c.clientWidth, ch = c.clientHeight;
    if (cw > 0 && ch > 0) {
      const w = Math.round(cw * dpr), h = Math.round(ch * dpr);
      if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
    }
    if (!c.width || !c.height) return;
    this.backend.render({
      yaw: this.yaw, pitch: this.pitch, fov: this.fov, background: this.background, ...this._params(),
    }, c.width, c.height);
  }

  // ---- input ----
  _on(target, type, fn, opts) {
    target.addEventListener(type, fn, opts);
    this._listeners.push([target, type, fn, opts]);
  }

  _bindInput() {
    const c = this.canvas;
    c.style.touchAction = "none";
    c.style.cursor = "grab";
    const win = typeof window !== "undefined" ? window : c;
    this._on(c, "pointerdown", (e) => {
      if (e.button !== undefined && e.button !== 0) return;
      this._drag = { id: e.pointerId, x: e.clientX, y: e.clientY, yaw: this.yaw, pitch: this.pitch };
      try { c.setPointerCapture(e.pointerId); } catch (_) { /* synthetic or already released pointer */ }
      c.style.cursor = "grabbing";
      e.preventDefault();
      e.stopPropagation();
    });
    const move = (e) => {
      const d = this._drag;
      if (!d || (d.id !== undefined && e.pointerId !== undefined && e.pointerId !== d.id)) return;
      const degPerPx = this.fov / Math.max(1, c.clientHeight || c.height);
      // The scene follows the pointer: dragging right turns the view left, dragging down looks up.
      this.setView({ yaw: d.yaw - (e.clientX - d.x) * degPerPx, pitch: d.pitch + (e.clientY - d.y) * degPerPx });
      e.preventDefault();
      e.stopPropagation();
    };
    const up = (e) => {
      if (!this._drag) return;
      move(e);
      this._drag = null;
      c.style.cursor = "grab";
      try { c.releasePointerCapture(e.pointerId); } catch (_) { /* not captured */ }
    };
    this._on(win, "pointermove", move);
    this._on(win, "pointerup", up);
    this._on(win, "pointercancel", up);
    this._on(c, "wheel", (e) => {
      const dy = e.deltaMode === 1 ? e.deltaY * 16 : e.deltaY;
      this.setView({ fov: this.fov * Math.exp(dy * 0.001) });
      e.preventDefault();
      e.stopPropagation();
    }, { passive: false });
    this._on(c, "dblclick", (e) => { this.resetView(); e.preventDefault(); e.stopPropagation(); });
  }

  destroy() {
    for (const [t, type, fn, opts] of this._listeners) t.removeEventListener(type, fn, opts);
    this._listeners = [];
    if (this._ro) this._ro.disconnect();
    if (this._raf && typeof cancelAnimationFrame === "function") cancelAnimationFrame(this._raf);
    this.backend.destroy();
    this._source = null;
  }
}
