"""Mesh files written directly from the arrays: binary glTF 2.0 (GLB), binary PLY and Wavefront OBJ.

A mesh from :func:`jointcore.mesh.rgbd_to_mesh` is already a set of flat arrays (positions, triangle indices,
colours, UVs, normals), which is exactly what these formats store. Writing them with numpy (one copy per array)
instead of through a generic scene exporter keeps the time and memory linear in the pixel count and lets a
caller check for Cancel between the pieces. Each writer streams to an open file a block of rows at a time, so no
copy of the whole file is held in memory.

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


class RowSource:
    """A ``[N, C]`` array the writers read a block of rows at a time (``source[a:b]`` → ``np.ndarray``) without
    it ever existing whole (:class:`jointcore.mesh_grid.GridMesh` computes blocks from the pixel grid).
    Subclasses implement :meth:`rows`; ``bounds`` (per-column min and max), when known, saves a pass."""

    ndim = 2

    def __init__(self, shape, dtype, bounds=None):
        self.shape = tuple(int(x) for x in shape)
        self.dtype = np.dtype(dtype)
        self._bounds = bounds

    def rows(self, a: int, b: int) -> np.ndarray:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("a RowSource is read in blocks of rows: source[a:b]")
        a, b, _ = key.indices(self.shape[0])
        if b <= a:
            return np.empty((0,) + self.shape[1:], self.dtype)
        out = self.rows(a, b)
        if out.shape != (b - a,) + self.shape[1:]:
            raise AssertionError(f"RowSource rows {a}:{b} gave {out.shape}")
        return out

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        if self._bounds is None:
            lo = hi = None
            for a in range(0, self.shape[0], BLOCK):
                blk = self[a:a + BLOCK]
                lo = blk.min(0) if lo is None else np.minimum(lo, blk.min(0))
                hi = blk.max(0) if hi is None else np.maximum(hi, blk.max(0))
            self._bounds = (lo, hi)
        return self._bounds


def _array(x, dtype=None):
    """``x`` as the writers read it: a :class:`RowSource` as it is, anything else as a numpy array."""
    if x is None or isinstance(x, RowSource):
        return x
    return np.asarray(x, dtype) if dtype is not None else np.asarray(x)


def _min_max(x) -> tuple[np.ndarray, np.ndarray]:
    return x.bounds() if isinstance(x, RowSource) else (x.min(0), x.max(0))


def _pad(n: int) -> int:
    return (4 - n % 4) % 4


#: rows converted and written at a time (small temporaries, reused by the allocator; Cancel between blocks)
BLOCK = 1 << 20


def _blocks(arr: np.ndarray, convert: Callable[[np.ndarray], np.ndarray], tick: Callable[[], None]):
    """``convert`` applied to ``arr`` a block of rows at a time, as byte views (``tick`` before each)."""
    for a in range(0, arr.shape[0], BLOCK):
        tick()
        yield memoryview(np.ascontiguousarray(convert(arr[a:a + BLOCK]))).cast("B")


def write_glb(fh, vertices: np.ndarray, faces: np.ndarray, normals: Optional[np.ndarray] = None,
              colors: Optional[np.ndarray] = None, uv: Optional[np.ndarray] = None,
              texture_png: Optional[bytes] = None, check: Optional[Callable[[], None]] = None) -> int:
    """Write a GLB file of one triangle mesh to the binary file ``fh``; returns its length in bytes.

    The JSON chunk only needs each buffer's length, so it is written first and the arrays follow block by block,
    converted on the way (indices to uint32, colours to RGBA, UVs flipped): no copy of the whole file is held.

    Args:
        vertices: ``[N, 3]`` float32 positions.
        faces: ``[F, 3]`` integer indices (written as uint32).
        normals: ``[N, 3]`` float32 unit normals, or None.
        colors: ``[N, 4]`` (or ``[N, 3]``) uint8 vertex colours, or None.
        uv: ``[N, 2]`` float32 texture coordinates (OpenGL convention, ``v`` up; flipped to glTF's ``v`` down
            here), with ``texture_png`` the PNG bytes of the texture; or None.
        check: called between blocks (Cancel).
    """
    tick = check or (lambda: None)
    v = _array(vertices, np.float32)
    n = v.shape[0]
    if v.ndim != 2 or v.shape[1] != 3 or n == 0:
        raise ValueError(f"vertices must be [N, 3] with N > 0, got {v.shape}")
    f = _array(faces)
    if not isinstance(f, RowSource):
        f = f.reshape(-1, 3)
        if f.size and (f.min() < 0 or f.max() >= n):
            raise ValueError("face indices out of range")
    tick()
    pieces: list = []   # (byte length, iterable of byte views): the BIN chunk's parts, each padded to 4 bytes
    accessors, views, attributes = [], [], {}
    offset = 0

    def add_view(nbytes: int, chunks, target):
        nonlocal offset
        view = {"buffer": 0, "byteOffset": offset, "byteLength": nbytes}
        if target is not None:
            view["target"] = target
        views.append(view)
        pieces.append((nbytes, chunks))
        offset += nbytes + _pad(nbytes)
        return len(views) - 1

    def add_accessor(arr: np.ndarray, width: int, itemsize: int, convert, ctype: int, kind: str, target: int,
                     normalized=False, bounds=False):
        acc = {"bufferView": add_view(arr.shape[0] * width * itemsize, _blocks(arr, convert, tick), target),
               "componentType": ctype, "count": int(arr.shape[0]) * (width if kind == "SCALAR" else 1),
               "type": kind}
        if normalized:
            acc["normalized"] = True
        if bounds:
            lo, hi = _min_max(arr)
            acc["min"] = [float(x) for x in lo]
            acc["max"] = [float(x) for x in hi]
        accessors.append(acc)
        return len(accessors) - 1

    def as_f32(x):
        return np.asarray(x, np.float32)

    attributes["POSITION"] = add_accessor(v, 3, 4, as_f32, FLOAT, "VEC3", ARRAY_BUFFER, bounds=True)
    if normals is not None:
        attributes["NORMAL"] = add_accessor(_array(normals), 3, 4, as_f32, FLOAT, "VEC3", ARRAY_BUFFER)
    material: dict = {"pbrMetallicRoughness": {"baseColorFactor": [1.0, 1.0, 1.0, 1.0], "metallicFactor": 0.0,
                                               "roughnessFactor": 1.0}}
    doc: dict = {"asset": {"version": "2.0", "generator": "jointdiffusion mesh_io"}}
    if uv is not None and texture_png is not None:
        def flip(t):
            t = np.array(t, np.float32)
            t[:, 1] = 1.0 - t[:, 1]  # glTF's UV origin is the top-left corner
            return t
        attributes["TEXCOORD_0"] = add_accessor(_array(uv), 2, 4, flip, FLOAT, "VEC2", ARRAY_BUFFER)
        img_view = add_view(len(texture_png), [memoryview(texture_png)], None)
        doc.update(images=[{"bufferView": img_view, "mimeType": "image/png"}],
                   samplers=[{"magFilter": 9729, "minFilter": 9729, "wrapS": 33071, "wrapT": 33071}],
                   textures=[{"source": 0, "sampler": 0}])
        material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": 0}
    elif colors is not None:
        c = _array(colors)

        def rgba(x):
            x = np.asarray(x, np.uint8)
            return x if x.shape[1] == 4 else np.concatenate([x, np.full((x.shape[0], 1), 255, np.uint8)], 1)
        attributes["COLOR_0"] = add_accessor(c, 4, 1, rgba, UBYTE, "VEC4", ARRAY_BUFFER, normalized=True)
    idx = add_accessor(f, 3, 4, lambda x: np.asarray(x, np.uint32), UINT, "SCALAR",
                       ELEMENT_ARRAY_BUFFER)
    prim = {"attributes": attributes, "indices": idx, "mode": 4}
    if "textures" in doc:  # vertex colours / no colour: glTF's default material (what viewers expect)
        prim["material"] = 0
        doc["materials"] = [material]
    doc.update(scene=0, scenes=[{"nodes": [0]}], nodes=[{"mesh": 0}], meshes=[{"primitives": [prim]}],
               accessors=accessors, bufferViews=views, buffers=[{"byteLength": offset}])
    js = json.dumps(doc, separators=(",", ":")).encode()
    js += b" " * _pad(len(js))
    total = 12 + 8 + len(js) + 8 + offset
    fh.write(struct.pack("<4sII", b"glTF", 2, total) + struct.pack("<I4s", len(js), b"JSON") + js
             + struct.pack("<I4s", offset, b"BIN\x00"))
    for nbytes, chunks in pieces:
        written = 0
        for mv in chunks:
            fh.write(mv)
            written += mv.nbytes
        if written != nbytes:
            raise AssertionError(f"GLB buffer view: wrote {written} bytes, declared {nbytes}")
        fh.write(b"\x00" * _pad(nbytes))
    return total


def write_ply(fh, vertices: np.ndarray, faces: Optional[np.ndarray] = None, normals: Optional[np.ndarray] = None,
              colors: Optional[np.ndarray] = None, check: Optional[Callable[[], None]] = None) -> None:
    """Write a binary little-endian PLY of a mesh (``faces``) or a point cloud (``faces`` None) to ``fh``:
    ``x y z`` float32, optional ``nx ny nz`` float32 and ``red green blue alpha`` uint8 per vertex; faces as
    ``uchar 3`` + three int32 indices. Records are built and written a block at a time."""
    tick = check or (lambda: None)
    v = _array(vertices)
    n = v.shape[0]
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if normals is not None:
        fields += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1"), ("alpha", "u1")]
    ptype = {"<f4": "float", "u1": "uchar"}
    head = ["ply", "format binary_little_endian 1.0", "comment jointdiffusion mesh_io", f"element vertex {n}"]
    head += [f"property {ptype[t]} {k}" for k, t in fields]
    if faces is not None:
        head += [f"element face {faces.shape[0]}", "property list uchar int vertex_indices"]
    head.append("end_header")
    fh.write(("\n".join(head) + "\n").encode("ascii"))
    nn, c = _array(normals), _array(colors)
    for a in range(0, n, BLOCK):
        tick()
        b = min(n, a + BLOCK)
        rec = np.empty(b - a, dtype=fields)
        vb = v[a:b]
        for i, k in enumerate("xyz"):
            rec[k] = vb[:, i]
        if nn is not None:
            nb = nn[a:b]
            for i, k in enumerate(("nx", "ny", "nz")):
                rec[k] = nb[:, i]
        if c is not None:
            cb = c[a:b]
            for i, k in enumerate(("red", "green", "blue")):
                rec[k] = cb[:, i]
            rec["alpha"] = cb[:, 3] if c.shape[1] == 4 else 255
        fh.write(rec.view(np.uint8))
    if faces is not None:
        f = _array(faces)
        for a in range(0, f.shape[0], BLOCK):
            tick()
            frec = np.empty(min(f.shape[0], a + BLOCK) - a, dtype=[("n", "u1"), ("i", "<i4", (3,))])
            frec["n"] = 3
            frec["i"] = f[a:a + BLOCK]
            fh.write(frec.view(np.uint8))


# ---------------------------------------------------------------------------------------------------
# Wavefront OBJ (text), formatted with numpy a block of rows at a time
# ---------------------------------------------------------------------------------------------------
# Python's per-number formatting (trimesh's exporter, ``np.savetxt``) costs ~0.1-0.3 µs a number: 10 s for the
# 2048×512 mesh. Here each column is turned into ASCII digits with integer arithmetic on whole arrays and the
# lines are assembled as one uint8 matrix per block. Fields are right-aligned with spaces (OBJ tokens are
# separated by any run of whitespace), so a block's lines share one width.

OBJ_BLOCK = 1 << 17  # rows formatted at a time (bounds the working memory; Cancel is checked between blocks)
OBJ_WORKERS: Optional[int] = None  # threads formatting blocks (None: the usable cores)


def _digit_count(m: np.ndarray) -> np.ndarray:
    """Decimal digits of each non-negative integer (1 for 0)."""
    n = np.ones(m.shape, np.int64)
    p = 10
    while True:
        more = m >= p
        if not more.any():
            return n
        n += more
        p *= 10


_LUT4 = np.frombuffer(b"".join(b"%04d" % i for i in range(10000)), np.uint32)  # 4 ASCII digits per entry


def _ascii_digits(m: np.ndarray, n: int) -> np.ndarray:
    """``[len(m), n]`` ASCII digits of non-negative integers ``m < 10**n``, zero-padded on the left (four
    digits per division, through a 10 000-entry table)."""
    out = np.empty((m.shape[0], n), np.uint8)
    v = m.astype(np.int64 if n > 9 else np.int32)
    j = n
    while j > 0:
        k = min(4, j)
        v, r = np.divmod(v, 10 ** k)
        out[:, j - k:j] = np.take(_LUT4, r).view(np.uint8).reshape(-1, 4)[:, 4 - k:]
        j -= k
    return out


def _fixed_field(values: np.ndarray, decimals: int) -> np.ndarray:
    """``[N, W]`` ASCII of ``values`` in fixed-point notation with ``decimals`` decimals, right-aligned after at
    least one space (``" -12.345678"``)."""
    scaled = np.rint(np.asarray(values, np.float64) * 10.0 ** decimals).astype(np.int64)
    neg = scaled < 0
    ip, fp = np.divmod(np.abs(scaled), 10 ** decimals)
    n = _digit_count(ip)
    nmax = int(n.max()) if n.size else 1
    tail = decimals + 1 if decimals else 0
    width = 1 + int(neg.any()) + nmax + tail
    out = np.full((values.shape[0], width), 32, np.uint8)
    end = width - tail
    if decimals:
        out[:, end] = ord(".")
        out[:, end + 1:] = _ascii_digits(fp, decimals)
    body = out[:, end - nmax:end]
    body[...] = _ascii_digits(ip, nmax)
    body[np.arange(nmax)[None, :] < (nmax - n)[:, None]] = 32  # leading zeros → spaces
    rows = np.nonzero(neg)[0]
    out[rows, end - n[rows] - 1] = ord("-")
    return out


def _index_tokens(idx: np.ndarray, reps: int, sep: bytes, nmax: int) -> np.ndarray:
    """``[N, W]`` ASCII tokens ``i``, ``i/i``, ``i//i`` or ``i/i/i`` (``reps`` copies of each positive integer
    joined by ``sep``), right-aligned after at least one space; ``nmax`` ≥ the digits of every index.

    A block of grid faces references a narrow band of vertices, so the tokens of that band are formatted once
    and gathered (a row copy per index) rather than formatted for each of the three corners of every face."""
    lo, hi = (int(idx.min()), int(idx.max())) if idx.size else (1, 1)
    if hi - lo + 1 < idx.shape[0]:
        table = np.ascontiguousarray(_index_tokens(np.arange(lo, hi + 1), reps, sep, nmax))
        rows = np.take(table.view(np.dtype((np.void, table.shape[1]))).reshape(-1), idx - lo)  # a copy per row
        return rows.view(np.uint8).reshape(idx.shape[0], table.shape[1])
    s = len(sep)
    width = 1 + reps * nmax + (reps - 1) * s
    out = np.full((idx.shape[0], width), 32, np.uint8)
    n = _digit_count(idx)
    sepb = np.frombuffer(sep, np.uint8)
    for k in np.nonzero(np.bincount(n))[0]:
        k = int(k)
        rows = np.nonzero(n == k)[0]
        d = _ascii_digits(idx[rows], k)
        tok = np.empty((rows.shape[0], reps * k + (reps - 1) * s), np.uint8)
        for q in range(reps):
            o = q * (k + s)
            tok[:, o:o + k] = d
            if q < reps - 1:
                tok[:, o + k:o + k + s] = sepb
        out[rows, width - tok.shape[1]:] = tok
    return out


def _lines(prefix: bytes, *fields: np.ndarray) -> np.ndarray:
    """One text line per row: ``prefix`` then the fields' columns, then a newline (a uint8 array, written as
    is: files take any buffer)."""
    n = fields[0].shape[0]
    cols = [np.broadcast_to(np.frombuffer(prefix, np.uint8), (n, len(prefix)))]
    cols += list(fields)
    cols.append(np.full((n, 1), 10, np.uint8))
    return np.concatenate(cols, axis=1)


def position_decimals(vertices) -> int:
    """Decimals that keep 7 significant digits of the largest coordinate (float32 precision)."""
    if vertices.shape[0] == 0:
        m = 1.0
    else:
        lo, hi = _min_max(vertices)
        m = float(max(np.abs(lo).max(), np.abs(hi).max()))
    return int(np.clip(6 - np.floor(np.log10(max(m, 1e-30))), 1, 12))


def write_obj(fh, vertices: np.ndarray, faces: np.ndarray, normals: Optional[np.ndarray] = None,
              colors: Optional[np.ndarray] = None, uv: Optional[np.ndarray] = None,
              mtllib: Optional[str] = None, material: str = "rgbd",
              check: Optional[Callable[[], None]] = None, workers: Optional[int] = None) -> None:
    """Write a triangle mesh as Wavefront OBJ text to the binary file ``fh``, one block of rows at a time.

    ``v x y z`` (``v x y z r g b`` with ``colors``, uint8 ``[N, 3|4]`` written as 0-1 with 3 decimals — exact
    for 8-bit values — the common vertex-colour extension that Blender, MeshLab and trimesh read), ``vt u v``
    (OpenGL convention, 6 decimals) with ``uv``, ``vn`` (4 decimals) with ``normals``; positions keep 7
    significant digits of the largest coordinate. Faces reference the same index for position, UV and normal
    (``f a/a/a``). ``mtllib``: the material file's name (written with ``usemtl``) for a textured mesh.

    Blocks are formatted by ``workers`` threads (default: the usable cores; numpy releases the GIL) and written
    in order, a few blocks ahead at most; ``check`` runs before each block is handed out (Cancel).
    """
    tick = check or (lambda: None)
    v = _array(vertices, np.float32)
    f = _array(faces, np.int64)
    n = v.shape[0]
    dec = position_decimals(v)
    lut = None
    c = _array(colors, np.uint8)
    if c is not None:
        lut = _fixed_field(np.arange(256) / 255.0, 3)
    t = _array(uv, np.float32)
    nn = _array(normals, np.float32)
    reps, sep = {(True, True): (3, b"/"), (False, True): (2, b"//"), (True, False): (2, b"/"),
                 (False, False): (1, b"")}[(uv is not None, normals is not None)]
    nmax = len(str(n))

    def v_block(a, b):
        vb = np.asarray(v[a:b], np.float32)
        fields = [_fixed_field(vb[:, i], dec) for i in range(3)]
        if lut is not None:
            cb = np.asarray(c[a:b], np.uint8)
            fields += [lut[cb[:, i]] for i in range(3)]
        return _lines(b"v", *fields)

    def vt_block(a, b):
        tb = np.asarray(t[a:b], np.float32)
        return _lines(b"vt", *(_fixed_field(tb[:, i], 6) for i in range(2)))

    def vn_block(a, b):
        nb = np.asarray(nn[a:b], np.float32)
        return _lines(b"vn", *(_fixed_field(nb[:, i], 4) for i in range(3)))

    def f_block(a, b):
        fb = np.asarray(f[a:b], np.int64)
        return _lines(b"f", _index_tokens(fb.reshape(-1) + 1, reps, sep, nmax).reshape(b - a, -1))

    def text(s: str):
        return lambda: s.encode("ascii")

    jobs = [text(f"# jointdiffusion mesh_io: {n} vertices, {f.shape[0]} faces\n")]
    if mtllib is not None:
        jobs.append(text(f"mtllib {mtllib}\n"))
    sections = [(v_block, n)] + ([(vt_block, n)] if t is not None else []) + ([(vn_block, n)] if nn is not None
                                                                              else [])
    for fn, total in sections:
        jobs += [(lambda fn=fn, a=a, b=min(total, a + OBJ_BLOCK): fn(a, b)) for a in range(0, total, OBJ_BLOCK)]
    if mtllib is not None:
        jobs.append(text(f"usemtl {material}\n"))
    jobs += [(lambda a=a, b=min(f.shape[0], a + OBJ_BLOCK): f_block(a, b)) for a in range(0, f.shape[0], OBJ_BLOCK)]
    _run_in_order(jobs, fh.write, tick, workers or OBJ_WORKERS)


def _run_in_order(jobs: list, sink: Callable[[object], object], tick: Callable[[], None],
                  workers: Optional[int]) -> None:
    """Run ``jobs`` (callables returning buffers) on a thread pool and pass their results to ``sink`` in order,
    keeping at most ``2 × workers`` results in flight; ``tick`` before each job is submitted."""
    import collections
    import os
    from concurrent.futures import ThreadPoolExecutor

    if not workers:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if workers == 1:
        for job in jobs:
            tick()
            sink(job())
        return
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(workers) as pool:
        try:
            for job in jobs:
                tick()
                pending.append(pool.submit(job))
                while len(pending) > 2 * workers:
                    sink(pending.popleft().result())
            while pending:
                sink(pending.popleft().result())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def mtl_text(material: str, texture: str) -> bytes:
    """A material file for :func:`write_obj`: white, unlit-looking diffuse with ``texture`` as its map."""
    return (f"# jointdiffusion mesh_io\nnewmtl {material}\nKa 1.000000 1.000000 1.000000\n"
            f"Kd 1.000000 1.000000 1.000000\nKs 0.000000 0.000000 0.000000\nd 1.0\nillum 1\n"
            f"map_Kd {texture}\n").encode("ascii")
