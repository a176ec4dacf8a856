// Mesh viewer core: one GLB / PLY / OBJ mesh in a <canvas>, drawn with three.js (bundled offline in
// ./vendor/three_bundle.js; no ComfyUI imports, no network access beyond the mesh's own URL and its companions).
//
// Colours: coloured meshes are drawn unlit (MeshBasicMaterial), so a pixel of the mesh shows the colour the file
// stores, whatever the view; uncoloured meshes are grey with a hemisphere light and a light at the camera.
// three.js reads PLY/OBJ vertex colours and textures as sRGB; glTF COLOR_0 is linear by the glTF spec, but
// JointDiffusion's GLB writer stores the image's sRGB bytes there (jointcore/mesh.py), so by default the viewer
// reads GLB vertex colours as sRGB too (option glbVertexColors: "linear" follows the spec instead).
//
// View (all angles in degrees): the camera orbits the target (the centre of the mesh's bounding sphere).
//   azimuth   — rotation about the vertical (+Y) axis; 0 looks along −Z, from the +Z side (where the camera that
//               took an RGBD picture stands: the picture appears unmirrored), +90 looks from the +X side.
//   elevation — angle above the horizontal plane (+ looks down onto the mesh), clamped to ±85.
//   distance  — camera–target distance; at reset, fitted so the mesh (up to 20 000 of its vertices) fills the view.
// Input (interactive viewers, via three's OrbitControls): drag to orbit (the mesh follows the pointer; a drag of
// half the canvas height turns it 180°), wheel to zoom, right-drag / shift-drag to pan, double-click to reset.
import * as THREE from "./vendor/three_bundle.js";

export const FORMATS = ["glb", "ply", "obj"];  // what JDRGBDToMesh writes (a .gltf's external files are not resolved)
const DEG = Math.PI / 180;
const MAX_ELEVATION = 85;

/** Normalise an angle (degrees) to (−180, 180]. */
export function wrapAngle(a) {
  const y = ((a + 180) % 360 + 360) % 360 - 180;
  return y === -180 ? 180 : y;
}

/** Mesh format ("glb", "ply", "obj"…) of a file name or of a URL (its path, or its `filename` query value). */
export function formatOf(nameOrUrl) {
  let name = String(nameOrUrl || "");
  try {
    const u = new URL(name, "http://localhost/");
    name = u.searchParams.get("filename") || u.pathname;
  } catch (_) { /* not a URL: a plain name */ }
  const m = /\.([A-Za-z0-9]+)$/.exec(name);
  return m ? m[1].toLowerCase() : "";
}

/**
 * URL of a file next to `url` (an OBJ's .mtl, a material's texture). ComfyUI's /view URLs name the file in
 * their `filename` query value: that value is replaced (keeping subfolder and type); other URLs resolve as paths.
 */
export function siblingURL(url, name) {
  const base = typeof location !== "undefined" ? location.href : "http://localhost/";
  const u = new URL(url, base);
  if (u.searchParams.has("filename")) {
    const slash = name.lastIndexOf("/");
    if (slash >= 0) {  // a relative folder in the reference goes into subfolder
      const sub = [u.searchParams.get("subfolder"), name.slice(0, slash)].filter(Boolean).join("/");
      u.searchParams.set("subfolder", sub);
      name = name.slice(slash + 1);
    }
    u.searchParams.set("filename", name);
  } else {
    u.href = new URL(name, u).href;
  }
  return /^[a-z][a-z0-9+.-]*:/i.test(url) ? u.href : u.pathname + u.search;  // absolute stays absolute
}

/** Camera offset from the target for a view: [x, y, z] (azimuth 0 → +Z side). */
export function viewOffset(azimuth, elevation, distance) {
  const a = azimuth * DEG, e = elevation * DEG;
  return [distance * Math.cos(e) * Math.sin(a), distance * Math.sin(e), distance * Math.cos(e) * Math.cos(a)];
}

/** Distance at which a sphere of `radius` fills a camera's view (vertical fov and aspect = width / height). */
export function fitDistance(radius, fovDeg, aspect) {
  const half = (fovDeg * DEG) / 2;
  const halfH = Math.atan(Math.tan(half) * Math.min(1, aspect));  // the narrower of the two half angles
  return radius / Math.sin(halfH);
}

/**
 * Smallest camera distance from `center` at which all `points` (a flat [x0, y0, z0, x1, …] array) are in view, for a
 * camera looking at `center` from (azimuth, elevation) with a vertical fov and aspect = width / height.
 */
export function fitPointsDistance(points, center, azimuth, elevation, fovDeg, aspect) {
  const back = viewOffset(azimuth, elevation, 1);  // unit vector from the centre to the camera
  const a = azimuth * DEG;
  const right = [Math.cos(a), 0, -Math.sin(a)];
  const up = [back[1] * right[2] - back[2] * right[1], back[2] * right[0] - back[0] * right[2],
    back[0] * right[1] - back[1] * right[0]];
  const tanV = Math.tan((fovDeg * DEG) / 2), tanH = tanV * aspect;
  let d = 0;
  for (let i = 0; i + 2 < points.length; i += 3) {
    const x = points[i] - center[0], y = points[i + 1] - center[1], z = points[i + 2] - center[2];
    const toCam = x * back[0] + y * back[1] + z * back[2];
    const h = Math.abs(x * right[0] + y * right[1] + z * right[2]);
    const v = Math.abs(x * up[0] + y * up[1] + z * up[2]);
    d = Math.max(d, toCam + h / tanH, toCam + v / tanV);
  }
  return d;
}

/** fitPointsDistance for the 8 corners of the box [min, max], from its centre. */
export function fitBoxDistance(min, max, azimuth, elevation, fovDeg, aspect) {
  const corners = [];
  for (const x of [min[0], max[0]]) for (const y of [min[1], max[1]]) for (const z of [min[2], max[2]]) corners.push(x, y, z);
  const center = [0, 1, 2].map((i) => (min[i] + max[i]) / 2);
  return fitPointsDistance(corners, center, azimuth, elevation, fovDeg, aspect);
}

/** Up to `max` world-space vertex positions of an object (evenly strided), as a flat array. */
function samplePositions(object, max = 20000) {
  const attrs = [];
  let total = 0;
  object.traverse((o) => {
    const p = o.geometry && o.geometry.attributes.position;
    if (p && (o.isMesh || o.isPoints)) { attrs.push([o, p]); total += p.count; }
  });
  const step = Math.max(1, Math.ceil(total / max));
  const out = [];
  const v = new THREE.Vector3();
  for (const [o, p] of attrs) {
    for (let i = 0; i < p.count; i += step) {
      v.fromBufferAttribute(p, i).applyMatrix4(o.matrixWorld);
      out.push(v.x, v.y, v.z);
    }
  }
  return new Float32Array(out);
}

function srgbToLinear(c) {
  return c <= 0.04045 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4);
}

/** A float copy of a colour attribute with its values read as sRGB and converted to linear (three's working space). */
function srgbColorsToLinear(attr) {
  const n = attr.count, k = attr.itemSize;
  const out = new Float32Array(n * k);
  for (let i = 0; i < n; i++) {
    out[i * k] = srgbToLinear(attr.getX(i));
    out[i * k + 1] = srgbToLinear(attr.getY(i));
    out[i * k + 2] = srgbToLinear(attr.getZ(i));
    if (k === 4) out[i * k + 3] = attr.getW(i);
  }
  return new THREE.Float32BufferAttribute(out, k);
}

async function fetchOk(url, kind) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`could not load ${kind} ${url} (HTTP ${r.status})`);
  return r;
}

/**
 * Interactive 3D view of one mesh on a canvas.
 *
 * options: background ([r, g, b] 0–255), fov (vertical, degrees), azimuth, elevation (initial view, degrees),
 *          interactive (bool, default true), autoResize (track the canvas' CSS size, default true),
 *          glbVertexColors ("srgb" | "linear"), pointSize (px, point clouds), onChange(view).
 */
export class MeshViewer {
  constructor(canvas, options = {}) {
    this.canvas = canvas;
    this.options = options;
    this.background = options.background || [24, 24, 24];
    this.initialView = { azimuth: options.azimuth ?? 0, elevation: options.elevation ?? 0 };
    this.onChange = options.onChange || null;
    this.hasMesh = false;
    this.info = null;  // {format, vertices, triangles, points, colors: "vertex"|"texture"|"none", radius, center}
    this._raf = 0;
    this._listeners = [];
    const renderer = new THREE.WebGLRenderer({ canvas, antialias: true, alpha: false, preserveDrawingBuffer: true });
    renderer.outputColorSpace = THREE.SRGBColorSpace;
    renderer.setPixelRatio(1);  // the drawing buffer is sized in render()
    const bg = this.background;
    renderer.setClearColor(new THREE.Color().setRGB(bg[0] / 255, bg[1] / 255, bg[2] / 255, THREE.SRGBColorSpace), 1);
    this.renderer = renderer;
    this.scene = new THREE.Scene();
    this.camera = new THREE.PerspectiveCamera(options.fov ?? 45, 1, 0.01, 1000);
    this.scene.add(new THREE.HemisphereLight(0xffffff, 0x444444, 1.6));
    this.headlight = new THREE.DirectionalLight(0xffffff, 1.4);
    this.camera.add(this.headlight);  // a light at the camera (lights only the uncoloured material)
    this.scene.add(this.camera);
    this.root = new THREE.Group();
    this.scene.add(this.root);
    this.target = new THREE.Vector3();
    this.radius = 1;
    this.camera.position.set(0, 0, 3);
    this.controls = null;
    if (options.interactive !== false) {
      const c = new THREE.OrbitControls(this.camera, canvas);
      c.enableDamping = false;  // draw on demand: no animation loop
      c.zoomToCursor = false;
      c.minPolarAngle = (90 - MAX_ELEVATION) * DEG;
      c.maxPolarAngle = (90 + MAX_ELEVATION) * DEG;
      c.addEventListener("change", () => this._changed());
      c.addEventListener("start", () => { this._fresh = false; });  // a user drag/wheel: keep their view
      this.controls = c;
      canvas.style.touchAction = "none";
      this._on(canvas, "dblclick", (e) => { this.resetView(); e.preventDefault(); e.stopPropagation(); });
    }
    this._on(canvas, "webglcontextlost", (e) => e.preventDefault());
    this._on(canvas, "webglcontextrestored", () => this.requestRender());
    if (options.autoResize !== false && typeof ResizeObserver !== "undefined") {
      this._ro = new ResizeObserver(() => this.requestRender());
      this._ro.observe(canvas);
    }
  }

  /** three.js revision of the bundled library. */
  static get threeRevision() { return THREE.REVISION; }

  _on(target, type, fn, opts) {
    target.addEventListener(type, fn, opts);
    this._listeners.push([target, type, fn, opts]);
  }

  _changed() {
    this.requestRender();
    if (this.onChange) this.onChange(this.getView());
  }

  /**
   * Load a mesh from a (same-origin) URL; resolves with `info` once it is shown. `format` defaults to the
   * file name's extension (the URL's path or its `filename` query value).
   */
  async load(url, format = formatOf(url)) {
    format = String(format || "").toLowerCase();
    let object;
    if (format === "glb") object = await this._loadGLTF(url);
    else if (format === "ply") object = await this._loadPLY(url);
    else if (format === "obj") object = await this._loadOBJ(url);
    else throw new Error(`cannot show '${format || url}': the 3D view reads ${FORMATS.join(", ")}`);
    this.setObject(object, format);
    return this.info;
  }

  async _loadGLTF(url) {
    const loader = new THREE.GLTFLoader();
    const gltf = await loader.loadAsync(url);
    const group = gltf.scene || (gltf.scenes && gltf.scenes[0]);
    if (!group) throw new Error(`${url}: the glTF file has no scene`);
    const linear = this.options.glbVertexColors === "linear";
    group.traverse((o) => {
      const g = o.geometry;
      if (!linear && g && g.attributes.color) g.setAttribute("color", srgbColorsToLinear(g.attributes.color));
    });
    return group;
  }

  async _loadPLY(url) {
    const buf = await (await fetchOk(url, "mesh")).arrayBuffer();
    const geometry = new THREE.PLYLoader().parse(buf);  // colours: read as sRGB by three's loader
    const isCloud = !geometry.index;
    return isCloud ? new THREE.Points(geometry) : new THREE.Mesh(geometry);
  }

  async _loadOBJ(url) {
    const text = await (await fetchOk(url, "mesh")).text();
    const group = new THREE.OBJLoader().parse(text);  // `v x y z r g b` colours: read as sRGB by three's loader
    const lib = /^\s*mtllib\s+(.+?)\s*$/m.exec(text);
    if (lib) {  // JointDiffusion's textured OBJ: `mtllib x.mtl` whose material has `map_Kd x.png`
      const mtl = await (await fetchOk(siblingURL(url, lib[1]), "material file")).text();
      const map = /^\s*map_Kd\s+(?:-\S+\s+\S+\s+)*(.+?)\s*$/m.exec(mtl);
      if (map) {
        const tex = await new THREE.TextureLoader().loadAsync(siblingURL(siblingURL(url, lib[1]), map[1]));
        tex.colorSpace = THREE.SRGBColorSpace;
        group.traverse((o) => { if (o.isMesh) o.userData.jdMap = tex; });
      }
    }
    return group;
  }

  /** Show an already built three.js object (replacing the current mesh); fits the camera to it. */
  setObject(object, format = "") {
    this.clear();
    let vertices = 0, triangles = 0, points = 0, colors = "none";
    object.traverse((o) => {
      if (!o.isMesh && !o.isPoints) return;
      const g = o.geometry;
      const old = Array.isArray(o.material) ? o.material[0] : o.material;
      const map = o.userData.jdMap || (old && old.map) || null;
      const hasColor = !!(g.attributes.color);
      const n = g.attributes.position ? g.attributes.position.count : 0;
      vertices += n;
      if (o.isPoints) {
        points += n;
        o.material = new THREE.PointsMaterial({ size: this.options.pointSize ?? 2, sizeAttenuation: false,
          vertexColors: hasColor, color: hasColor ? 0xffffff : 0xbbbbbb });
      } else {
        triangles += g.index ? g.index.count / 3 : n / 3;
        if (map || hasColor) {
          o.material = new THREE.MeshBasicMaterial({ map, vertexColors: hasColor && !map, side: THREE.DoubleSide });
        } else {
          if (!g.attributes.normal) g.computeVertexNormals();
          o.material = new THREE.MeshLambertMaterial({ color: 0xbbbbbb, side: THREE.DoubleSide });
        }
      }
      if (map) colors = "texture";
      else if (hasColor && colors === "none") colors = "vertex";
      if (old && old !== o.material && typeof old.dispose === "function") old.dispose();
    });
    this.root.add(object);
    object.updateMatrixWorld(true);
    const box = new THREE.Box3().setFromObject(object);
    if (box.isEmpty()) throw new Error("the mesh has no vertices");
    const sphere = box.getBoundingSphere(new THREE.Sphere());
    this.target.copy(sphere.center);
    this._fitPoints = samplePositions(object);
    this.radius = Math.max(sphere.radius, 1e-6);
    this.camera.near = this.radius / 1000;
    this.camera.far = this.radius * 100;
    this.camera.updateProjectionMatrix();
    if (this.controls) {
      this.controls.target.copy(this.target);
      this.controls.minDistance = this.radius * 0.05;
      this.controls.maxDistance = this.radius * 20;
    }
    this.hasMesh = true;
    this.info = { format, vertices, triangles: Math.round(triangles), points, colors, radius: this.radius,
      center: this.target.toArray(), bounds: [box.min.toArray(), box.max.toArray()] };
    this.resetView();
    return this.info;
  }

  /** Distance at which the mesh fills the view from the initial direction (all its sampled vertices, a margin). */
  fittedDistance() {
    const { width, height } = this._size();
    if (!this._fitPoints || !this._fitPoints.length) return fitDistance(this.radius, this.camera.fov, width / height);
    const { azimuth, elevation } = this.initialView;
    const d = fitPointsDistance(this._fitPoints, this.target.toArray(), azimuth, elevation, this.camera.fov,
      width / height);
    return Math.max(d * 1.08, this.radius * 0.1);
  }

  /** Current view: {azimuth, elevation, distance} (degrees and scene units). */
  getView() {
    const d = this.camera.position.clone().sub(this.target);
    const distance = d.length();
    if (distance < 1e-12) return { azimuth: 0, elevation: 0, distance: 0 };
    return { azimuth: wrapAngle(Math.atan2(d.x, d.z) / DEG),
      elevation: Math.asin(Math.max(-1, Math.min(1, d.y / distance))) / DEG, distance };
  }

  /** Canvas position (CSS pixels from its top-left corner) of a scene point [x, y, z] in the current view. */
  project(point) {
    const { width, height } = this._size();
    this.camera.aspect = width / height;
    this.camera.updateProjectionMatrix();
    this.camera.updateMatrixWorld();
    const p = new THREE.Vector3(point[0], point[1], point[2]).project(this.camera);
    return [((p.x + 1) / 2) * width, ((1 - p.y) / 2) * height];
  }

  /** Change any of azimuth, elevation (degrees), distance; the camera keeps looking at the target. */
  setView({ azimuth, elevation, distance } = {}) {
    const v = this.getView();
    const az = azimuth ?? v.azimuth;
    const el = Math.max(-MAX_ELEVATION, Math.min(MAX_ELEVATION, elevation ?? v.elevation));
    const dist = Math.max(this.radius * 0.05, Math.min(this.radius * 20, distance ?? (v.distance || this.fittedDistance())));
    const [x, y, z] = viewOffset(az, el, dist);
    this.camera.position.set(this.target.x + x, this.target.y + y, this.target.z + z);
    this.camera.up.set(0, 1, 0);
    this.camera.lookAt(this.target);
    if (this.controls) { this.controls.target.copy(this.target); this.controls.update(); }
    this._changed();
  }

  /** Turn the view by the given angles (degrees; positive azimuth moves the camera towards +X). */
  orbit(dAzimuth = 0, dElevation = 0) {
    this._fresh = false;
    const v = this.getView();
    this.setView({ azimuth: v.azimuth + dAzimuth, elevation: v.elevation + dElevation });
  }

  /** Multiply the camera distance by `factor` (< 1 zooms in). */
  zoom(factor) {
    this._fresh = false;
    this.setView({ distance: this.getView().distance * factor });
  }

  /** Back to the initial view with the camera fitted to the mesh's bounds. */
  resetView() {
    this.setView({ ...this.initialView, distance: this.fittedDistance() });
    this._fresh = true;  // refitted when the canvas changes size, until the view is changed
  }

  /** Remove the current mesh (freeing its GPU buffers). */
  clear() {
    this._fitPoints = null;
    for (const child of [...this.root.children]) {
      child.traverse((o) => {
        if (o.geometry) o.geometry.dispose();
        const mats = Array.isArray(o.material) ? o.material : o.material ? [o.material] : [];
        for (const m of mats) { if (m.map) m.map.dispose(); m.dispose(); }
      });
      this.root.remove(child);
    }
    this.hasMesh = false;
    this.info = null;
    this.requestRender();
  }

  _size() {
    const c = this.canvas;
    const w = c.clientWidth || c.width || 1, h = c.clientHeight || c.height || 1;
    return { width: w, height: h };
  }

  /** Draw on the next animation frame (coalesces many changes into one draw). */
  requestRender() {
    if (this._raf) return;
    const raf = typeof requestAnimationFrame === "function" ? requestAnimationFrame : (f) => setTimeout(f, 16);
    this._raf = raf(() => { this._raf = 0; this.render(); });
  }

  /**
   * Set the drawing buffer's size (pixels); until the view is changed after a reset, the camera is refitted to the
   * new shape. Called by render() for canvases that track their CSS size; call it for offscreen ones.
   */
  setSize(width, height) {
    const c = this.canvas;
    if (c.width === width && c.height === height) return false;
    this.renderer.setSize(width, height, false);
    if (this._fresh && this.hasMesh) {
      const [x, y, z] = viewOffset(this.initialView.azimuth, this.initialView.elevation, this.fittedDistance());
      this.camera.position.set(this.target.x + x, this.target.y + y, this.target.z + z);
      this.camera.lookAt(this.target);
      if (this.controls) this.controls.update();
    }
    this.requestRender();
    return true;
  }

  /** Size the drawing buffer to the canvas' displayed size (× devicePixelRatio, capped) and draw now. */
  render() {
    const c = this.canvas;
    const dpr = Math.min(2, (typeof window !== "undefined" && window.devicePixelRatio) || 1);
    const cw = c.clientWidth, ch = c.clientHeight;
    if (cw > 0 && ch > 0 && this.options.autoResize !== false) {
      this.setSize(Math.round(cw * dpr), Math.round(ch * dpr));
    }
    if (!c.width || !c.height) return;
    this.renderer.setViewport(0, 0, c.width, c.height);
    this.camera.aspect = c.width / c.height;
    this.camera.updateProjectionMatrix();
    this.renderer.render(this.scene, this.camera);
  }

  dispose() {
    for (const [t, type, fn, opts] of this._listeners) t.removeEventListener(type, fn, opts);
    this._listeners = [];
    if (this._ro) this._ro.disconnect();
    if (this._raf && typeof cancelAnimationFrame === "function") cancelAnimationFrame(this._raf);
    if (this.controls) this.controls.dispose();
    this.clear();
    this.renderer.dispose();
  }

  destroy() { this.dispose(); }
}
