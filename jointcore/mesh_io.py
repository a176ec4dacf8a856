"""Mesh files written directly from the arrays: binary glTF 2.0 (GLB) and binary PLY.

A mesh from :func:`jointcore.mesh.rgbd_to_mesh` is already a set of flat arrays (positions, triangle indices,
colours, UVs, normals), which is exactly what these formats store. Writing them with numpy (one copy per array)
instead of through a generic scene exporter keeps the time and memory linear in the pixel count and lets a
caller check for Cancel between the pieces.

GLB layout (glTF 2.0 §4.4): a 12-byte header, a JSON chunk (padded with spaces to 4 bytes) and a BIN chunk
(padded with zeros). Attributes: ``POSITION`` (float32, with the ``min``/``max`` the spec requires),
``NORMAL`` (float32, unit length), ``COLOR_0`` (uint8 normalised RGBA) or ``TEXCOORD_0`` (float32, with the
texture as an embedded PNG), indices uint32. One primitive, one node, one scene.
"""
from __future__ import annotations

import json
import struct
from typing import Callable, Optional

import numpy as np

FLOAT, UBYTE, UINT = 5126, 5121, 5125
ARRAY_BUFFER, ELEMENT_ARRAY_BUFFER = 34962, 34963


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


def glb_bytes(vertices: np.ndarray, faces: np.ndarray, normals: Optional[np.ndarray] = None,
              colors: Optional[np.ndarray] = None, uv: Optional[np.ndarray] = None,
              texture_png: Optional[bytes] = None, check: Optional[Callable[[], None]] = None) -> bytearray:
    """A GLB file of one triangle mesh.

    Args:
        vertices: ``[N, 3]`` float32 positions.
        faces: ``[F, 3]`` integer indices (written as uint32).
        normals: ``[N, 3]`` float32 unit normals, or None.
        colors: ``[N, 4]`` (or ``[N, 3]``) uint8 vertex colours, or None.
        uv: ``[N, 2]`` float32 texture coordinates (OpenGL convention, ``v`` up; flipped to glTF's ``v`` down
            here), with ``texture_png`` the PNG bytes of the texture; or None.
        check: called between the pieces (Cancel).
    """
    tick = check or (lambda: None)
    v = np.ascontiguousarray(vertices, dtype=np.float32)
    n = v.shape[0]
    if v.ndim != 2 or v.shape[1] != 3 or n == 0:
        raise ValueError(f"vertices must be [N, 3] with N > 0, got {v.shape}")
    if faces.size and (faces.min() < 0 or faces.max() >= n):
        raise ValueError("face indices out of range")
    pieces: list[memoryview] = []   # the BIN chunk's parts, each padded to 4 bytes
    accessors, views, attributes = [], [], {}
    offset = 0

    def add_view(data, target):
        nonlocal offset
        mv = memoryview(data).cast("B") if not isinstance(data, (bytes, bytearray)) else memoryview(data)
        view = {"buffer": 0, "byteOffset": offset, "byteLength": mv.nbytes}
        if target is not None:
            view["target"] = target
        views.append(view)
        pieces.append(mv)
        offset += mv.nbytes + _pad(mv.nbytes)
        return len(views) - 1

    def add_accessor(arr: np.ndarray, ctype: int, kind: str, target: int, normalized=False, bounds=False):
        tick()
        acc = {"bufferView": add_view(np.ascontiguousarray(arr), target), "componentType": ctype,
               "count": int(arr.shape[0]), "type": kind}
        if normalized:
            acc["normalized"] = True
        if bounds:
            acc["min"] = [float(x) for x in arr.min(0)]
            acc["max"] = [float(x) for x in arr.max(0)]
        accessors.append(acc)
        return len(accessors) - 1

    attributes["POSITION"] = add_accessor(v, FLOAT, "VEC3", ARRAY_BUFFER, bounds=True)
    if normals is not None:
        attributes["NORMAL"] = add_accessor(np.asarray(normals, np.float32), FLOAT, "VEC3", ARRAY_BUFFER)
    material: dict = {"pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0,
                                               "roughnessFactor": 1.0}}
    doc: dict = {"asset": {"version": "2.0", "generator": "jointdiffusion mesh_io"}}
    if uv is not None and texture_png is not None:
        t = np.asarray(uv, np.float32).copy()
        t[:, 1] = 1.0 - t[:, 1]  # glTF's UV origin is the top-left corner
        attributes["TEXCOORD_0"] = add_accessor(t, FLOAT, "VEC2", ARRAY_BUFFER)
        tick()
        img_view = add_view(texture_png, None)
        doc.update(images=[{"bufferView": img_view, "mimeType": "image/png"}],
                   samplers=[{"magFilter": 9729, "minFilter": 9729, "wrapS": 33071, "wrapT": 33071}],
                   textures=[{"source": 0, "sampler": 0}])
        material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": 0}
    elif colors is not None:
        c = np.asarray(colors, np.uint8)
        if c.shape[1] == 3:
            c = np.concatenate([c, np.full((n, 1), 255, np.uint8)], 1)
        attributes["COLOR_0"] = add_accessor(c, UBYTE, "VEC4", ARRAY_BUFFER, normalized=True)
    idx = add_accessor(np.asarray(faces, np.uint32).reshape(-1, 1), UINT, "SCALAR", ELEMENT_ARRAY_BUFFER)
    prim = {"attributes": attributes, "indices": idx, "mode": 4}
    if "textures" in doc:  # vertex colours / no colour: glTF's default material (what viewers expect)
        prim["material"] = 0
        doc["materials"] = [material]
    doc.update(scene=0, scenes=[{"nodes": [0]}], nodes=[{"mesh": 0}], meshes=[{"primitives": [prim]}],
               accessors=accessors, bufferViews=views, buffers=[{"byteLength": offset}])
    js = json.dumps(doc, separators=(",", ":")).encode()
    js += b" " * _pad(len(js))
    total = 12 + 8 + len(js) + 8 + offset
    out = bytearray(total)
    struct.pack_into("<4sII", out, 0, b"glTF", 2, total)
    struct.pack_into("<I4s", out, 12, len(js), b"JSON")
    out[20:20 + len(js)] = js
    pos = 20 + len(js)
    struct.pack_into("<I4s", out, pos, offset, b"BIN\x00")
    pos += 8
    for mv in pieces:
        tick()
        out[pos:pos + mv.nbytes] = mv
        pos += mv.nbytes + _pad(mv.nbytes)
    return out  # a bytearray: written as is, not copied again


def ply_bytes(vertices: np.ndarray, faces: Optional[np.ndarray] = None, normals: Optional[np.ndarray] = None,
              colors: Optional[np.ndarray] = None, check: Optional[Callable[[], None]] = None) -> bytes:
    """A binary little-endian PLY of a mesh (``faces``) or a point cloud (``faces`` None): ``x y z`` float32,
    optional ``nx ny nz`` float32 and ``red green blue alpha`` uint8 per vertex; faces as ``uchar 3`` + three
    int32 indices."""
    tick = check or (lambda: None)
    v = np.asarray(vertices, np.float32)
    n = v.shape[0]
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if normals is not None:
        fields += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1"), ("alpha", "u1")]
    rec = np.empty(n, dtype=fields)
    for i, k in enumerate("xyz"):
        rec[k] = v[:, i]
    if normals is not None:
        nn = np.asarray(normals, np.float32)
        for i, k in enumerate(("nx", "ny", "nz")):
            rec[k] = nn[:, i]
    if colors is not None:
        c = np.asarray(colors, np.uint8)
        for i, k in enumerate(("red", "green", "blue")):
            rec[k] = c[:, i]
        rec["alpha"] = c[:, 3] if c.shape[1] == 4 else 255
    tick()
    ptype = {"<f4": "float", "u1": "uchar"}
    head = ["ply", "format binary_little_endian 1.0", "comment jointdiffusion mesh_io", f"element vertex {n}"]
    head += [f"property {ptype[t]} {k}" for k, t in fields]
    parts = [rec.tobytes()]
    if faces is not None:
        f = np.asarray(faces)
        frec = np.empty(f.shape[0], dtype=[("n", "u1"), ("i", "<i4", (3,))])
        frec["n"] = 3
        frec["i"] = f
        head += [f"element face {f.shape[0]}", "property list uchar int vertex_indices"]
        tick()
        parts.append(frec.tobytes())
    head.append("end_header")
    return ("\n".join(head) + "\n").encode("ascii") + b"".join(parts)
