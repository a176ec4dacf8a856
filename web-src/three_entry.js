// Entry of web/vendor/three_bundle.js: only what web/mesh_viewer.js uses, so esbuild drops the rest of three.
export {
  Box3, Color, DirectionalLight, DoubleSide, Float32BufferAttribute, Group, HemisphereLight, Mesh,
  MeshBasicMaterial, MeshLambertMaterial, PerspectiveCamera, Points, PointsMaterial, REVISION, Scene, Sphere,
  SRGBColorSpace, TextureLoader, Vector3, WebGLRenderer,
} from "three";
export { GLTFLoader } from "three/examples/jsm/loaders/GLTFLoader.js";
export { PLYLoader } from "three/examples/jsm/loaders/PLYLoader.js";
export { OBJLoader } from "three/examples/jsm/loaders/OBJLoader.js";
export { OrbitControls } from "three/examples/jsm/controls/OrbitControls.js";
