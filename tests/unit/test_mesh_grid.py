"""Mesh files written from the pixel grid (jointcore.mesh_grid) equal the in-memory mesh's files."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch

from jointcore import mesh as M
from jointcore import mesh_io as IO
from jointcore.mesh_grid import BYTES_PER_VERTEX, export_rgbd_mesh, grid_mesh


def _scene(h=9, w=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    img, d = torch.rand(3, h, w, generator=g), torch.rand(h, w, generator=g) + 1
    d[2, 3] = float("nan")      # a hole: its faces go, isolated neighbours are left out of the file
    d[h // 2:, w // 2:] += 3    # a step: cut at the discontinuity
    d[0, 0] = -1                # invalid
    d[h - 1, 0] = float("inf")
    return img, d


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks and bands of a few rows, so that every read crosses grid rows and region boundaries."""
    monkeypatch.setattr(IO, "BLOCK", 7)
    monkeypatch.setattr(IO, "OBJ_BLOCK", 5)
    monkeypatch.setattr(M, "BAND_PIXELS", 20)


def _glb(path):
    b = open(path, "rb").read()
    n = struct.unpack("<I", b[12:16])[0]
    return json.loads(b[20:20 + n]), b[20 + n + 8:]


def _normal_view(doc):
    acc = doc["meshes"][0]["primitives"][0]["attributes"].get("NORMAL")
    if acc is None:
        return 0, 0
    v = doc["bufferViews"][doc["accessors"][acc]["bufferView"]]
    return v["byteOffset"], v["byteLength"]


def _ply(path):
    b = open(path, "rb").read()
    end = b.index(b"end_header\n") + len(b"end_header\n")
    head = b[:end].decode().splitlines()
    return head, b[end:]


def _same_file(fmt, a, b, has_normals):
    if fmt == "glb":
        (ja, ba), (jb, bb) = _glb(a), _glb(b)
        assert ja == jb  # counts, bounds, layout
        o, n = _normal_view(ja)
        assert ba[:o] == bb[:o] and ba[o + n:] == bb[o + n:]  # everything but the normals, byte for byte
        if n:
            na, nb = np.frombuffer(ba[o:o + n], np.float32), np.frombuffer(bb[o:o + n], np.float32)
            np.testing.assert_allclose(na, nb, atol=1e-5, rtol=0)
        return bool(n)
    if fmt in ("ply", "pointcloud_ply"):
        (ha, da), (hb, db) = _ply(a), _ply(b)
        assert ha == hb
        if not has_normals:
            assert da == db
            return False
        props = [line.split()[-1] for line in ha if line.startswith("property ") and "list" not in line]
        nv = int(next(line.split()[-1] for line in ha if line.startswith("element vertex")))
        dt = np.dtype([(p, "<f4" if p in "x y z nx ny nz".split() else "u1") for p in props])
        va, vb = np.frombuffer(da[:nv * dt.itemsize], dt), np.frombuffer(db[:nv * dt.itemsize], dt)
        for p in props:
            if p.startswith("n"):
                np.testing.assert_allclose(va[p], vb[p], atol=1e-5, rtol=0)
            else:
                assert np.array_equal(va[p], vb[p]), p
        assert da[nv * dt.itemsize:] == db[nv * dt.itemsize:]  # the faces
        return True
    la, lb = open(a).read().splitlines(), open(b).read().splitlines()
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if x.startswith("vn "):  # 4 decimals: rounding of a float32 difference may flip the last digit
            np.testing.assert_allclose([float(t) for t in x.split()[1:]], [float(t) for t in y.split()[1:]],
                                       atol=2e-4, rtol=0)
        elif not x.startswith("mtllib"):
            assert x == y
    return any(x.startswith("vn ") for x in la)


@pytest.mark.parametrize("projection", ["perspective", "cylindrical", "equirectangular"])
@pytest.mark.parametrize("fmt", ["glb", "ply", "obj", "pointcloud_ply"])
def test_grid_files_equal_the_in_memory_mesh_files(tmp_path, small_blocks, projection, fmt):
    img, d = _scene()
    kw = dict(projection=projection, horizontal_span_deg=360.0, discontinuity_threshold=0.3)
    mem = M.rgbd_to_mesh(img, d, **kw)[0]
    assert mem.compact().vertices.shape[0] < mem.vertices.shape[0]  # some valid pixels are left out
    seen_normals = False
    for color in ("vertex", "texture", "none"):
        for normals in (True, False):
            a = M.export_mesh(mem, tmp_path / f"a.{fmt}", fmt, color=color, normals=normals)
            b = export_rgbd_mesh(img, d, tmp_path / f"b.{fmt}", fmt, color=color, normals=normals, **kw)
            assert len(a) == len(b)
            seen_normals |= _same_file(fmt, a[0], b[0], normals and fmt != "pointcloud_ply")
            for x, y in zip(a[1:], b[1:]):  # an OBJ's texture PNG (and .mtl, which names it)
                if x.endswith(".png"):
                    assert open(x, "rb").read() == open(y, "rb").read()
    assert seen_normals == (fmt != "pointcloud_ply")


@pytest.mark.parametrize("extra", [dict(downsample=2), dict(intrinsics=torch.tensor(
    [[9.0, 0.0, 6.0], [0.0, 8.0, 4.5], [0.0, 0.0, 1.0]])), dict(discontinuity_threshold=0.0),
    dict(depth_kind="disparity", near=1.0, far=10.0)])
def test_grid_files_equal_with_downsampling_intrinsics_no_cut_and_disparity(tmp_path, small_blocks, extra):
    img, d = _scene(12, 18, seed=3)
    depth = torch.rand(6, 9) + 0.2 if "near" in extra else d  # a map of another size, resized
    mem = M.rgbd_to_mesh(img, depth, **extra)[0]
    a = M.export_mesh(mem, tmp_path / "a.glb")[0]
    b = export_rgbd_mesh(img, depth, tmp_path / "b.glb", **extra)[0]
    assert _same_file("glb", a, b, True)


def test_normals_across_the_closed_seam_and_the_last_row(tmp_path):
    """Every vertex normal, the 360° seam's and the first and last rows' included, is the in-memory
    vertex_normals of the same faces (area-weighted sum of the kept triangles)."""
    img, d = _scene(10, 16, seed=5)
    gm = grid_mesh(img, d, projection="equirectangular", discontinuity_threshold=0.3)
    mem = M.rgbd_to_mesh(img, d, projection="equirectangular", discontinuity_threshold=0.3)[0].compact()
    assert gm.n_vertices == mem.vertices.shape[0] and gm.n_faces == mem.faces.shape[0]
    assert np.array_equal(gm.faces[0:gm.n_faces], mem.faces.numpy())
    assert np.array_equal(gm.vertices[0:gm.n_vertices], mem.vertices.numpy())
    want = M.vertex_normals(mem.vertices, mem.faces).numpy()
    np.testing.assert_allclose(gm.normals[0:gm.n_vertices], want, atol=1e-5, rtol=0)
    # any block, not only the writers' blocks
    np.testing.assert_allclose(gm.normals[5:37], want[5:37], atol=1e-5, rtol=0)
    lo, hi = gm.vertices.bounds()
    assert np.array_equal(lo, mem.vertices.numpy().min(0))
    assert np.array_equal(hi, mem.vertices.numpy().max(0))


def test_grid_mesh_errors_create_no_file(tmp_path):
    img = torch.rand(3, 6, 8)
    with pytest.raises(ValueError, match="no valid depth pixel"):
        export_rgbd_mesh(img, torch.full((6, 8), float("nan")), tmp_path / "a.glb")
    cut = torch.ones(6, 8)
    cut[::2] = 10.0  # every row jumps: every triangle is cut
    with pytest.raises(ValueError, match="no triangle left"):
        export_rgbd_mesh(img, cut, tmp_path / "a.glb", discontinuity_threshold=0.1)
    assert list(tmp_path.iterdir()) == []
    assert export_rgbd_mesh(img, cut, tmp_path / "a.ply", "pointcloud_ply", discontinuity_threshold=0.1)
    with pytest.raises(ValueError, match="file format"):
        export_rgbd_mesh(img, cut, tmp_path / "a.stl")
    with pytest.raises(ValueError, match="downsample=2"):  # the memory guard at the grid's bytes per vertex
        export_rgbd_mesh(img, cut, tmp_path / "a.glb", max_bytes=6 * 8 * BYTES_PER_VERTEX - 1)


def test_grid_export_never_overwrites_and_cancel_leaves_no_file(tmp_path, small_blocks):
    img, d = _scene()
    first = export_rgbd_mesh(img, d, tmp_path / "m.glb")[0]
    before = open(first, "rb").read()
    second = export_rgbd_mesh(img, d, tmp_path / "m.glb")[0]
    assert second != first and open(first, "rb").read() == before

    class Cancelled(Exception):
        pass
    for fmt in ("glb", "ply", "obj"):
        calls = [0]

        def check():
            calls[0] += 1
            if calls[0] > 30:
                raise Cancelled
        with pytest.raises(Cancelled):
            export_rgbd_mesh(img, d, tmp_path / "c", fmt, check=check, color="texture")
        assert not [p for p in os.listdir(tmp_path) if p.startswith("c")], fmt


def test_row_sources_are_read_by_row_slices_only():
    img, d = _scene()
    gm = grid_mesh(img, d)
    assert gm.vertices[3:3].shape == (0, 3)
    with pytest.raises(TypeError, match="blocks of rows"):
        gm.vertices[[1, 2]]
    with pytest.raises(TypeError, match="blocks of rows"):
        gm.faces[0:10:2]


def test_the_default_memory_guard_admits_an_8k_panorama_from_the_grid():
    """8192×4096 needs ~10 GiB as in-memory arrays (refused at the node's 4 GiB default) but fits from the grid."""
    assert M.estimate_mesh_bytes(4096, 8192) > M.DEFAULT_MAX_BYTES
    assert M.estimate_mesh_bytes(4096, 8192, 1, BYTES_PER_VERTEX) < M.DEFAULT_MAX_BYTES
