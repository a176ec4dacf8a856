"""RGB-D → mesh: analytic geometry, face building, discontinuity cuts, bad inputs, file round trips."""
from __future__ import annotations

import importlib
import json
import math
import os
import struct
import sys
import types

import numpy as np
import pytest
import torch
import trimesh
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from jointcore import mesh as M
from jointcore.mesh_grid import export_rgbd_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _face_cols(m: M.RGBDMesh) -> torch.Tensor:
    return (m.pixel_index % m.grid_size[1])[m.faces]


def _face_normals(m: M.RGBDMesh) -> torch.Tensor:
    v = m.vertices.double()[m.faces]
    return torch.linalg.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])


def _load(path, fmt):
    if fmt == "pointcloud_ply":
        return trimesh.load(path, process=False)
    return trimesh.load(path, process=False, force="mesh")


# ---- analytic geometry -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fov", [40.0, 90.0, 120.0])
def test_perspective_plane_at_known_depth(fov):
    H, W, d = 6, 10, 3.0
    m = M.rgbd_to_mesh(torch.rand(3, H, W), torch.full((H, W), d), fov_deg=fov)[0]
    v = m.vertices.double()
    assert v.shape == (H * W, 3) and m.faces.shape == (2 * (H - 1) * (W - 1), 3)
    torch.testing.assert_close(v[:, 2], torch.full((H * W,), -d, dtype=torch.float64), atol=1e-5, rtol=0)
    t = math.tan(math.radians(fov) / 2)
    f = (W / 2) / t
    # pixel centres: the fov spans the image edges, vertices sit half a pixel inside them
    assert v[:, 0].max().item() == pytest.approx(d * t * (W - 1) / W, abs=1e-5)
    assert v[:, 0].min().item() == pytest.approx(-d * t * (W - 1) / W, abs=1e-5)
    assert v[:, 1].max().item() == pytest.approx(d * (H - 1) / 2 / f, abs=1e-5)
    # first pixel (top-left) is up-left: x<0, y>0 (Y up, camera looking along -Z)
    assert v[0, 0] < 0 and v[0, 1] > 0
    # every vertex follows the pinhole model
    r, c = m.pixel_index // W, m.pixel_index % W
    torch.testing.assert_close(v[:, 0], (c.double() - (W - 1) / 2) / f * d, atol=1e-5, rtol=0)
    torch.testing.assert_close(v[:, 1], -(r.double() - (H - 1) / 2) / f * d, atol=1e-5, rtol=0)


def test_perspective_intrinsics_match_fov_and_scale_with_downsample():
    H, W = 8, 12
    img, dep = torch.rand(3, H, W), 1 + torch.rand(H, W)
    K = M.perspective_intrinsics(H, W, 75.0)
    a = M.rgbd_to_mesh(img, dep, fov_deg=75.0)[0]
    b = M.rgbd_to_mesh(img, dep, intrinsics=K, fov_deg=10.0)[0]
    torch.testing.assert_close(a.vertices, b.vertices, atol=1e-5, rtol=0)
    # downsampled grid of a plane keeps the same fov: edges at d*tan(fov/2)*(w-1)/w
    c = M.rgbd_to_mesh(img, torch.full((H, W), 2.0), intrinsics=K, downsample=2)[0]
    d = M.rgbd_to_mesh(img, torch.full((H, W), 2.0), fov_deg=75.0, downsample=2)[0]
    assert c.grid_size == (4, 6)
    torch.testing.assert_close(c.vertices, d.vertices, atol=1e-5, rtol=0)
    assert c.vertices[:, 0].max().item() == pytest.approx(2 * math.tan(math.radians(37.5)) * 5 / 6, abs=1e-5)


@pytest.mark.parametrize("span", [90.0, 180.0, 360.0])
def test_cylinder_constant_radius(span):
    H, W, r = 5, 16, 2.5
    m = M.rgbd_to_mesh(torch.rand(3, H, W), torch.full((H, W), r), projection="cylindrical",
                       horizontal_span_deg=span)[0]
    v = m.vertices.double()
    torch.testing.assert_close(torch.hypot(v[:, 0], v[:, 2]), torch.full((H * W,), r, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    az = torch.atan2(v[:, 0], -v[:, 2])  # 0 = straight ahead (-Z), positive to the right
    half = math.radians(span) / 2 * (W - 1) / W
    assert az.max().item() == pytest.approx(half, abs=1e-5) and az.min().item() == pytest.approx(-half, abs=1e-5)
    # the vertical axis uses the same pixels-per-radian: one row step = one column step in arc length
    f = W / math.radians(span)
    assert v[:, 1].max().item() == pytest.approx(r * (H - 1) / 2 / f, abs=1e-5)


def test_cylinder_360_seam_closed_and_180_open():
    H, W = 4, 8
    img, dep = torch.rand(3, H, W), torch.full((H, W), 1.0)
    closed = M.rgbd_to_mesh(img, dep, projection="cylindrical", horizontal_span_deg=360)[0]
    opened = M.rgbd_to_mesh(img, dep, projection="cylindrical", horizontal_span_deg=180)[0]
    assert closed.faces.shape[0] == 2 * (H - 1) * W
    assert opened.faces.shape[0] == 2 * (H - 1) * (W - 1)
    seam = lambda m: ((_face_cols(m) == W - 1).any(1) & (_face_cols(m) == 0).any(1))  # noqa: E731
    assert seam(closed).sum().item() == 2 * (H - 1)
    assert seam(opened).sum().item() == 0
    # seam triangles are as small as the others: the gap between col W-1 and col 0 is one column
    e = closed.vertices[closed.faces]
    lengths = (e - e.roll(1, 1)).norm(dim=-1).max(1).values
    assert lengths[seam(closed)].max() <= lengths[~seam(closed)].max() + 1e-5


def test_equirect_sphere_of_constant_radius_with_closed_seam():
    H, W, r = 6, 12, 4.0
    m = M.rgbd_to_mesh(torch.rand(3, H, W), torch.full((H, W), r), projection="equirectangular")[0]
    v = m.vertices.double()
    torch.testing.assert_close(v.norm(dim=1), torch.full((H * W,), r, dtype=torch.float64), atol=1e-5, rtol=0)
    lat = torch.asin(v[:, 1] / r)
    assert lat.max().item() == pytest.approx(math.pi / 2 * (H - 1) / H, abs=1e-5)
    assert lat.min().item() == pytest.approx(-math.pi / 2 * (H - 1) / H, abs=1e-5)
    cols = _face_cols(m)
    assert ((cols == W - 1).any(1) & (cols == 0).any(1)).sum().item() == 2 * (H - 1)
    # centre column of the middle rows looks straight ahead (-Z)
    centre = m.vertices[(m.pixel_index % W == W // 2)]
    assert (centre[:, 2] < 0).all()


@pytest.mark.parametrize("projection", M.PROJECTIONS)
def test_faces_point_at_the_camera(projection):
    H, W = 5, 9
    m = M.rgbd_to_mesh(torch.rand(3, H, W), 1 + 0.1 * torch.rand(H, W), projection=projection,
                       horizontal_span_deg=200)[0]
    n = _face_normals(m)
    centroid = m.vertices.double()[m.faces].mean(1)
    assert ((n * -centroid).sum(1) > 0).all()  # counter-clockwise as seen from the origin


# ---- depth mapping ---------------------------------------------------------------------------------------

def test_depth_from_map_disparity_and_near_far():
    v = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(M.depth_from_map(v, "disparity", scale=2.0, shift=0.5), 1 / (2 * v + 0.5))
    torch.testing.assert_close(M.depth_from_map(v, "depth", scale=2.0, shift=0.5), 2 * v + 0.5)
    d = M.depth_from_map(v, "disparity", near=1.0, far=10.0)
    assert d[-1].item() == pytest.approx(1.0) and d[0].item() == pytest.approx(10.0)
    torch.testing.assert_close(1 / d, 0.1 + v * 0.9)  # linear in 1/depth
    d = M.depth_from_map(v, "depth", near=2.0, far=4.0)
    torch.testing.assert_close(d, 2 + 2 * v)
    # zero disparity, negatives, NaN, inf -> NaN (dropped later)
    bad = M.depth_from_map(torch.tensor([0.0, -1.0, float("nan"), float("inf"), 0.5]), "disparity")
    assert torch.isnan(bad[:4]).all() and bad[4].item() == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(kind="inverse"), "depth kind"),
    (dict(near=1.0), "both near and far"),
    (dict(near=5.0, far=1.0), "near < far"),
    (dict(kind="disparity", near=0.0, far=1.0), "near < far"),
    (dict(near=1.0, far=2.0, scale=3.0), "not both"),
])
def test_depth_from_map_bad_options(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        M.depth_from_map(torch.rand(4), **kwargs)


# ---- discontinuities and invalid pixels --------------------------------------------------------------------

def test_step_edge_faces_are_cut():
    H, W, k = 5, 8, 4
    dep = torch.ones(H, W)
    dep[:, k:] = 3.0
    m = M.rgbd_to_mesh(torch.rand(3, H, W), dep, discontinuity_threshold=0.1)[0]
    assert m.faces.shape[0] == 2 * (H - 1) * (W - 1) - 2 * (H - 1)
    cols = _face_cols(m)
    assert not ((cols == k - 1).any(1) & (cols == k).any(1)).any()
    # threshold 0 disables the cut; a threshold above the jump keeps everything too
    for thr in (0.0, 2.5):
        full = M.rgbd_to_mesh(torch.rand(3, H, W), dep, discontinuity_threshold=thr)[0]
        assert full.faces.shape[0] == 2 * (H - 1) * (W - 1)
    # a smooth slope (7% per pixel) is not cut
    ramp = torch.linspace(1, 1.5, W).expand(H, W)
    assert M.rgbd_to_mesh(torch.rand(3, H, W), ramp, discontinuity_threshold=0.1)[0].faces.shape[0] == \
        2 * (H - 1) * (W - 1)


def test_invalid_pixels_are_dropped_with_their_faces():
    H, W = 5, 6
    dep = torch.full((H, W), 2.0)
    dep[2, 3] = float("nan")
    dep[0, 0] = -1.0
    dep[4, 5] = float("inf")
    m = M.rgbd_to_mesh(torch.rand(3, H, W), dep)[0]
    assert m.vertices.shape[0] == H * W - 3
    assert torch.isfinite(m.vertices).all()
    # interior pixel touches 6 triangles, corner (0,0) 1, corner (H-1,W-1) 1
    assert m.faces.shape[0] == 2 * (H - 1) * (W - 1) - 6 - 1 - 1
    assert int(2 * W + 3) not in m.pixel_index.tolist()


def test_constant_and_all_invalid_maps():
    H, W = 4, 4
    ok = M.rgbd_to_mesh(torch.rand(3, H, W), torch.full((H, W), 0.7), depth_kind="disparity")[0]
    assert ok.faces.shape[0] == 2 * 3 * 3 and torch.isfinite(ok.vertices).all()
    empty = M.rgbd_to_mesh(torch.rand(3, H, W), torch.zeros(H, W), depth_kind="disparity")[0]
    assert empty.is_empty and empty.faces.shape[0] == 0
    with pytest.raises(ValueError, match="no valid depth pixel"):
        M.export_mesh(empty, "unused.glb")


@settings(max_examples=40, deadline=None)
@given(
    dep=arrays(np.float32, st.tuples(st.integers(1, 7), st.integers(1, 7)),
               elements=st.one_of(st.floats(-5, 5, width=32), st.sampled_from([np.nan, np.inf, -np.inf, 0.0]))),
    projection=st.sampled_from(M.PROJECTIONS),
    kind=st.sampled_from(M.DEPTH_KINDS),
    span=st.sampled_from([30.0, 180.0, 360.0]),
    down=st.integers(1, 3),
    thr=st.sampled_from([0.0, 0.1, 5.0]),
    img_hw=st.tuples(st.integers(1, 7), st.integers(1, 7)),
)
def test_random_depth_maps_never_crash_or_emit_nan(dep, projection, kind, span, down, thr, img_hw):
    img = torch.rand(3, *img_hw)
    m = M.rgbd_to_mesh(img, torch.from_numpy(dep), projection=projection, depth_kind=kind,
                       horizontal_span_deg=span, downsample=down, discontinuity_threshold=thr)[0]
    assert torch.isfinite(m.vertices).all() and torch.isfinite(m.colors).all()
    assert m.vertices.shape[0] == m.colors.shape[0] == m.uv.shape[0] == m.pixel_index.shape[0]
    if m.faces.numel():
        assert m.faces.min() >= 0 and m.faces.max() < m.vertices.shape[0]
        assert (m.faces[:, 0] != m.faces[:, 1]).all() and (m.faces[:, 1] != m.faces[:, 2]).all()
    assert (m.depth > 0).all()


# ---- input shapes, batches, guards ------------------------------------------------------------------------

def test_batch_and_broadcast():
    img = torch.rand(2, 3, 4, 5)
    dep = torch.stack([torch.full((4, 5), 1.0), torch.full((4, 5), 2.0)])[:, None]
    ms = M.rgbd_to_mesh(img, dep)
    assert len(ms) == 2
    assert ms[0].vertices[:, 2].mean().item() == pytest.approx(-1.0)
    assert ms[1].vertices[:, 2].mean().item() == pytest.approx(-2.0)
    torch.testing.assert_close(ms[1].colors, img[1].reshape(3, -1).T)
    assert len(M.rgbd_to_mesh(img, torch.ones(4, 5))) == 2          # one depth for the batch
    assert len(M.rgbd_to_mesh(img[0], torch.ones(3, 4, 5))) == 3    # one image for three depths
    with pytest.raises(ValueError, match="batch"):
        M.rgbd_to_mesh(img, torch.ones(3, 4, 5))


def test_depth_of_another_size_is_resized_or_refused():
    img = torch.rand(3, 8, 12)
    small = torch.full((4, 6), 2.0)
    small[0, 0] = float("nan")
    m = M.rgbd_to_mesh(img, small)[0]
    assert m.grid_size == (8, 12)
    torch.testing.assert_close(m.vertices[:, 2], torch.full_like(m.vertices[:, 2], -2.0), atol=1e-5, rtol=0)
    # the invalid low-res pixel invalidates only the full-res pixels whose bilinear support holds it
    dropped = sorted(set(range(8 * 12)) - set(m.pixel_index.tolist()))
    assert dropped == [r * 12 + c for r in range(3) for c in range(3)]
    with pytest.raises(ValueError, match="resize"):
        M.rgbd_to_mesh(img, small, resize_depth=False)


@pytest.mark.parametrize("kwargs, msg", [
    (dict(projection="fisheye"), "projection"),
    (dict(fov_deg=180.0), "fov_deg"),
    (dict(projection="cylindrical", horizontal_span_deg=400.0), "horizontal_span_deg"),
    (dict(downsample=0), "downsample"),
    (dict(intrinsics=torch.eye(4)), r"\[3,3\]"),
])
def test_bad_options_raise_clear_errors(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        M.rgbd_to_mesh(torch.rand(3, 4, 4), torch.ones(4, 4), **kwargs)


@pytest.mark.parametrize("img, dep, msg", [
    (torch.rand(4, 4, 4), torch.ones(4, 4), "RGB"),
    (torch.rand(1, 4, 4, 3), torch.ones(4, 4), "RGB"),
    (torch.rand(3, 4, 4), torch.ones(1, 3, 4, 4), "one channel"),
    (torch.rand(3, 4, 4), torch.ones(4), "depth must be"),
])
def test_bad_shapes_raise_clear_errors(img, dep, msg):
    with pytest.raises(ValueError, match=msg):
        M.rgbd_to_mesh(img, dep)


def test_memory_guard_reports_size_and_fix_without_allocating():
    huge = torch.zeros(3, 1, 1).expand(3, 40000, 40000)   # a view: no memory behind it
    dep = torch.ones(1, 1).expand(40000, 40000)
    with pytest.raises(ValueError, match=r"GiB.*downsample=\d+") as e:
        M.rgbd_to_mesh(huge, dep)
    k = int(e.value.args[0].split("downsample=")[2].split()[0])
    assert M.estimate_mesh_bytes(40000, 40000, k) <= M.DEFAULT_MAX_BYTES
    assert M.estimate_mesh_bytes(40000, 40000, k - 1) > M.DEFAULT_MAX_BYTES


def test_downsample_averages_and_keeps_full_texture():
    img = torch.rand(3, 8, 8)
    m = M.rgbd_to_mesh(img, torch.full((8, 8), 1.0), downsample=2)[0]
    assert m.grid_size == (4, 4) and m.vertices.shape[0] == 16
    torch.testing.assert_close(m.colors[0], img[:, :2, :2].mean((1, 2)))
    assert m.texture.shape == (3, 8, 8)
    # uv of grid vertex (0,0) is the centre of the 2x2 block it stands for (OpenGL v-up)
    torch.testing.assert_close(m.uv[0], torch.tensor([1 / 8, 1 - 1 / 8]))


# ---- files -----------------------------------------------------------------------------------------------

def _step_mesh():
    H, W = 6, 7
    img = torch.rand(3, H, W)
    dep = torch.full((H, W), 2.0)
    dep[:, 4:] = 5.0   # a step edge: two patches
    dep[0, 0] = float("nan")
    return img, M.rgbd_to_mesh(img, dep)[0]


@pytest.mark.parametrize("fmt", ["glb", "ply", "obj"])
def test_mesh_files_round_trip_with_vertex_colors(tmp_path, fmt):
    img, m = _step_mesh()
    c = m.compact()
    path = M.export_mesh(m, tmp_path / "m.any", fmt)[0]
    assert path.endswith("." + fmt)
    r = _load(path, fmt)
    assert r.vertices.shape == (c.vertices.shape[0], 3) and r.faces.shape == (c.faces.shape[0], 3)
    np.testing.assert_allclose(r.vertices, c.vertices.numpy(), atol=1e-5)
    np.testing.assert_array_equal(r.faces, c.faces.numpy())
    want = (c.colors * 255).round().numpy()
    np.testing.assert_allclose(r.visual.vertex_colors[:, :3].astype(float), want, atol=1)


def test_glb_texture_round_trip_and_normals(tmp_path):
    img, m = _step_mesh()
    path = M.export_mesh(m, tmp_path / "t.glb", color="texture", normals=True)[0]
    r = _load(path, "glb")
    assert r.visual.kind == "texture"
    np.testing.assert_allclose(r.visual.uv, m.compact().uv.numpy(), atol=1e-6)
    sampled = r.visual.to_color().vertex_colors[:, :3].astype(float)
    np.testing.assert_allclose(sampled, (m.compact().colors * 255).round().numpy(), atol=1.01)
    # NORMAL attribute present when asked for, absent otherwise
    def attrs(p):
        with open(p, "rb") as fh:
            data = fh.read()
        n = struct.unpack("<I", data[12:16])[0]
        return json.loads(data[20:20 + n])["meshes"][0]["primitives"][0]["attributes"]
    assert "NORMAL" in attrs(path)
    assert "NORMAL" not in attrs(M.export_mesh(m, tmp_path / "t.glb", normals=False)[0])


def test_obj_texture_writes_named_companions(tmp_path):
    _, m = _step_mesh()
    a = M.export_mesh(m, tmp_path / "o.obj", color="texture")
    b = M.export_mesh(m, tmp_path / "o.obj", color="texture")
    assert [os.path.basename(p) for p in a] == ["o.obj", "o.mtl", "o.png"]
    assert [os.path.basename(p) for p in b] == ["o_0001.obj", "o_0001.mtl", "o_0001.png"]
    assert "map_Kd o_0001.png" in open(b[1]).read()
    r = _load(b[0], "obj")
    assert r.visual.kind == "texture" and r.faces.shape[0] == m.faces.shape[0]


def test_point_cloud_keeps_every_valid_pixel(tmp_path):
    _, m = _step_mesh()
    path = M.export_mesh(m, tmp_path / "p.ply", "pointcloud_ply")[0]
    r = _load(path, "pointcloud_ply")
    assert isinstance(r, trimesh.PointCloud) and r.vertices.shape[0] == m.vertices.shape[0] == 6 * 7 - 1
    np.testing.assert_allclose(r.colors[:, :3].astype(float), (m.colors * 255).round().numpy(), atol=1)


def test_never_overwrites(tmp_path):
    _, m = _step_mesh()
    target = tmp_path / "x.glb"
    target.write_bytes(b"keep me")
    p1 = M.export_mesh(m, target)[0]
    p2 = M.export_mesh(m, target)[0]
    assert target.read_bytes() == b"keep me"
    assert os.path.basename(p1) == "x_0001.glb" and os.path.basename(p2) == "x_0002.glb"
    assert M.unique_path(tmp_path / "y.glb") == str(tmp_path / "y.glb")
    (tmp_path / "z.mtl").write_text("")
    assert M.unique_path(tmp_path / "z.obj", (".mtl", ".png")) == str(tmp_path / "z_0001.obj")


def test_no_triangles_left_is_a_clear_error(tmp_path):
    m = M.rgbd_to_mesh(torch.rand(3, 1, 5), torch.ones(1, 5))[0]   # one row: points but no faces
    with pytest.raises(ValueError, match="no triangle"):
        M.export_mesh(m, tmp_path / "a.glb")
    assert M.export_mesh(m, tmp_path / "a.ply", "pointcloud_ply")  # a point cloud still works


# ---- the ComfyUI node, with stand-ins for folder_paths / comfy -----------------------------------------

@pytest.fixture
def node_module(tmp_path, monkeypatch):
    out = tmp_path / "output"
    out.mkdir()

    fp = types.ModuleType("folder_paths")
    fp.get_output_directory = lambda: str(out)

    def get_save_image_path(prefix, output_dir, w=0, h=0):  # same contract as ComfyUI's
        sub, name = os.path.split(prefix)
        folder = os.path.join(output_dir, sub)
        os.makedirs(folder, exist_ok=True)
        nums = [int(f[len(name) + 1:].split("_")[0]) for f in os.listdir(folder)
                if f.startswith(name + "_") and f[len(name) + 1:].split("_")[0].isdigit()]
        return folder, name, max(nums, default=0) + 1, sub, prefix
    fp.get_save_image_path = get_save_image_path

    comfy = types.ModuleType("comfy")
    mm = types.ModuleType("comfy.model_management")
    mm.throw_exception_if_processing_interrupted = lambda: None
    cu = types.ModuleType("comfy.utils")
    cu.ProgressBar = lambda total: types.SimpleNamespace(update=lambda n: None)
    comfy.model_management, comfy.utils = mm, cu
    for k, v in {"folder_paths": fp, "comfy": comfy, "comfy.model_management": mm, "comfy.utils": cu}.items():
        monkeypatch.setitem(sys.modules, k, v)
    pkg = types.ModuleType("jdpack_meshtest")
    pkg.__path__ = [ROOT]
    monkeypatch.setitem(sys.modules, "jdpack_meshtest", pkg)
    nodes_pkg = types.ModuleType("jdpack_meshtest.nodes")   # skip nodes/__init__ (it loads every capability)
    nodes_pkg.__path__ = [os.path.join(ROOT, "nodes")]
    monkeypatch.setitem(sys.modules, "jdpack_meshtest.nodes", nodes_pkg)
    for k in [k for k in sys.modules if k.startswith("jdpack_meshtest.") and k != "jdpack_meshtest.nodes"]:
        monkeypatch.delitem(sys.modules, k)
    return importlib.import_module("jdpack_meshtest.nodes.mesh"), out


def test_node_writes_one_file_per_item_and_never_overwrites(node_module):
    mod, out = node_module
    node = mod.JDRGBDToMesh()
    assert "JDRGBDToMesh" in mod.NODE_CLASS_MAPPINGS and node.OUTPUT_NODE
    req = node.INPUT_TYPES()["required"]
    assert req["projection"][0] == list(M.PROJECTIONS) and req["format"][0] == list(M.FORMATS)
    image = torch.rand(2, 6, 8, 3)                      # ComfyUI IMAGE [B,H,W,C]
    depth = torch.rand(1, 3, 4, 3)                      # other size, one map for the batch
    args = dict(projection="cylindrical", fov_deg=60.0, horizontal_span_deg=360.0, depth_kind="disparity",
                near=1.0, far=10.0, discontinuity_threshold=0.0, downsample=1, format="glb",
                filename_prefix="meshes/test")
    res = node.export(image, depth, **args)
    files = res["ui"]["3d"]
    assert [f["type"] for f in files] == ["output", "output"] and files[0]["subfolder"] == "meshes"
    assert files[0]["filename"] != files[1]["filename"]
    rel, full = res["result"]
    assert rel == "meshes/" + files[0]["filename"]
    paths = full.split("\n")
    assert len(paths) == 2 and all(os.path.isfile(p) for p in paths)
    r = trimesh.load(paths[1], process=False, force="mesh")
    assert r.faces.shape[0] == 2 * 5 * 8               # 360° seam closed, nothing cut
    # a stale counter (e.g. another writer in between) never overwrites: the taken names are skipped
    before = {p: open(p, "rb").read() for p in paths}
    stale = lambda prefix, d, w=0, h=0: (str(out / "meshes"), "test", 1, "meshes", prefix)  # noqa: E731
    mod.folder_paths.get_save_image_path = stale
    res2 = node.export(image, depth, **args)
    assert all(open(p, "rb").read() == b for p, b in before.items())
    new = [f["filename"] for f in res2["ui"]["3d"]]
    assert len(set(new) | {f["filename"] for f in files}) == 4
    with pytest.raises(ValueError, match="near < far"):
        node.export(image, depth, **{**args, "near": 0.0})


def test_vertex_normals_face_the_camera():
    plane = M.rgbd_to_mesh(torch.rand(3, 5, 6), torch.full((5, 6), 2.0))[0]
    n = M.vertex_normals(plane.vertices, plane.faces)
    torch.testing.assert_close(n, torch.tensor([0.0, 0.0, 1.0]).expand_as(n), atol=1e-5, rtol=0)
    sphere = M.rgbd_to_mesh(torch.rand(3, 16, 32), torch.full((16, 32), 3.0), projection="equirectangular")[0]
    n = M.vertex_normals(sphere.vertices, sphere.faces)
    inward = -sphere.vertices / sphere.vertices.norm(dim=1, keepdim=True)
    assert ((n * inward).sum(1) > 0.95).all()
    # a vertex without faces gets a defined unit normal, not NaN
    n = M.vertex_normals(torch.rand(4, 3), torch.tensor([[0, 1, 2]]))
    assert torch.isfinite(n).all() and n[3].tolist() == [0.0, 0.0, 1.0]


def test_core_mesh_batch_is_padded_with_degenerate_faces(node_module):
    mod, _ = node_module
    small = M.rgbd_to_mesh(torch.rand(3, 4, 4), torch.ones(4, 4) * 2, depth_kind="depth")[0]
    big = M.rgbd_to_mesh(torch.rand(3, 6, 6), torch.ones(6, 6) * 2, depth_kind="depth")[0]

    class Mesh:  # ComfyUI's core MESH: vertices [B,N,3], faces [B,F,3]
        def __init__(self, vertices, faces):
            self.vertices, self.faces = vertices, faces

    out = mod.stack_meshes([small, big], Mesh)
    assert out.vertices.shape == (2, 36, 3) and out.faces.shape == (2, 50, 3)
    torch.testing.assert_close(out.vertices[0, :16], small.vertices)
    assert torch.equal(out.faces[0, :18], small.faces) and torch.equal(out.faces[0, 18:], torch.zeros(32, 3).long())
    assert mod.core_mesh_class() is None  # the stand-in ComfyUI has none, so the node is not registered
    assert "JDRGBDToComfyMesh" not in mod.NODE_CLASS_MAPPINGS


# ---- direct GLB / PLY writers (jointcore.mesh_io) checked by the formats' own readers --------------------

@pytest.mark.parametrize("projection", ["perspective", "cylindrical"])
@pytest.mark.parametrize("color", ["vertex", "texture", "none"])
def test_glb_passes_the_khronos_validator(tmp_path, projection, color):
    import os
    import shutil

    from gltf_validator import validate

    if not (shutil.which("node") and shutil.which("npm")):
        if os.environ.get("JD_REQUIRE_GLTF_VALIDATOR"):
            pytest.fail("node and npm are required for the glTF validator test (JD_REQUIRE_GLTF_VALIDATOR)")
        pytest.skip("node/npm not installed: the Khronos glTF validator runs on Node.js")
    g = torch.Generator().manual_seed(1)
    img, d = torch.rand(3, 24, 40, generator=g), torch.rand(24, 40, generator=g) + 0.5
    d[5:9, 10:14] = float("nan")  # holes: isolated vertices are dropped, faces cut
    kw = dict(projection=projection, horizontal_span_deg=360.0, depth_kind="depth")
    m = M.rgbd_to_mesh(img, d, **kw)[0]
    for normals, grid in ((True, False), (False, False), (True, True)):  # in-memory mesh, or from the grid
        path = (export_rgbd_mesh(img, d, tmp_path / "g.glb", color=color, normals=normals, **kw)[0] if grid else
                M.export_mesh(m, tmp_path / f"m_{normals}.glb", color=color, normals=normals)[0])
        issues = validate(path)["issues"]
        assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, issues["messages"][:5]
        infos = {i["code"] for i in issues["messages"]}
        assert infos <= {"IMAGE_NPOT_DIMENSIONS"}, infos  # a 40×24 texture is not a power of two: fine


def test_direct_writers_check_for_cancel_and_write_binary_ply(tmp_path):
    import trimesh

    img, m = _step_mesh()
    calls = [0]

    def check():
        calls[0] += 1
    for fmt in ("glb", "ply", "pointcloud_ply"):
        n0 = calls[0]
        p = M.export_mesh(m, tmp_path / f"c.{'ply' if 'ply' in fmt else fmt}", fmt, check=check)[0]
        assert calls[0] - n0 >= (1 if fmt == "pointcloud_ply" else 3), fmt  # between the pieces
        assert open(p, "rb").read(4) in (b"glTF", b"ply\n")
    pc = trimesh.load(tmp_path / "c_0001.ply")
    assert len(pc.vertices) == m.vertices.shape[0]  # the point cloud keeps isolated points too

    class Stop(Exception):
        pass

    def stop():
        raise Stop()
    with pytest.raises(Stop):
        M.export_mesh(m, tmp_path / "stopped.glb", check=stop)
    assert not (tmp_path / "stopped.glb").exists()  # nothing half-written


@pytest.mark.parametrize("wrap", [False, True])
def test_banded_faces_equal_the_whole_grid_definition(monkeypatch, wrap):
    """Building faces in row bands gives exactly grid_faces(h, w)[grid_face_keep(...)] — same faces, same order."""
    g = torch.Generator().manual_seed(3)
    h, w = 23, 17
    valid = torch.rand(h, w, generator=g) > 0.15
    depth = torch.rand(h, w, generator=g) + 0.5
    remap = torch.cumsum(valid.reshape(-1).long(), 0) - 1
    want = remap[M.grid_faces(h, w, wrap)[M.grid_face_keep(valid, depth, 0.3, wrap)]]
    monkeypatch.setattr(M, "BAND_PIXELS", 3 * w)  # several bands of 3 rows, the last one short
    got = M._kept_faces(valid, depth, 0.3, wrap, remap, lambda: None)
    assert torch.equal(got, want)


# ---- OBJ text, formatted with numpy ----------------------------------------------------------------------

def test_fixed_point_and_index_fields_read_back_as_python_formats_them():
    from jointcore import mesh_io

    g = np.random.default_rng(0)
    vals = np.concatenate([g.normal(0, 1, 500) * 10.0 ** g.integers(-3, 5, 500), [0.0, -0.0, -4e-8, 4e-8, 9.9999999,
                                                                                   -9.9999996, 1e6, -123456.5]])
    for dec in (0, 3, 6):
        rows = mesh_io._fixed_field(vals, dec)
        text = [bytes(r).decode() for r in rows]
        assert all(t.startswith(" ") and " " not in t.strip() for t in text)
        assert [t.strip() for t in text] == [f"{v:.{dec}f}".replace("-0." + "0" * dec, "0." + "0" * dec)
                                             if dec else str(int(np.rint(v))).replace("-0", "0")
                                             for v in vals]
    idx = np.array([1, 9, 10, 99, 100, 12345, 999999, 1000000])
    for reps, sep in ((1, b""), (2, b"//"), (2, b"/"), (3, b"/")):
        rows = mesh_io._index_tokens(idx, reps, sep, 7)
        assert [bytes(r).decode().strip() for r in rows] == [sep.decode().join([str(i)] * reps) for i in idx]
    # a band of indices (the gathered-table path) gives the same tokens as formatting each one
    band = np.array([5, 7, 6, 5, 8, 9, 5, 6, 7, 8, 9, 7])
    direct = np.array([[ord(ch) for ch in f"{i}/{i}/{i}".rjust(rows.shape[1])] for i in band], np.uint8)
    np.testing.assert_array_equal(mesh_io._index_tokens(band, 3, b"/", 7)[:, -direct.shape[1]:], direct)


@pytest.mark.parametrize("color", ["vertex", "texture", "none"])
def test_obj_round_trip_with_normals_uv_and_colours_in_any_block_size(tmp_path, monkeypatch, color):
    from jointcore import mesh_io

    img, m = _step_mesh()
    c = m.compact()
    outs = []
    for block, workers in ((1 << 18, 1), (5, 2), (7, 3)):  # many blocks, formatted out of order, written in order
        monkeypatch.setattr(mesh_io, "OBJ_BLOCK", block)
        monkeypatch.setattr(mesh_io, "OBJ_WORKERS", workers)
        outs.append(M.export_mesh(m, tmp_path / f"{block}" / "o.obj", color=color)[0])
    # the same tokens line by line (field widths follow each block's values)
    texts = [[ln.split() for ln in open(p, "rb").read().splitlines()[1:]] for p in outs]
    assert texts[0] == texts[1] == texts[2]
    r = trimesh.load(outs[0], process=False, force="mesh")
    np.testing.assert_allclose(r.vertices, c.vertices.numpy(), atol=1e-5)
    np.testing.assert_array_equal(r.faces, c.faces.numpy())
    np.testing.assert_allclose(r.vertex_normals, M.vertex_normals(c.vertices, c.faces).numpy(), atol=2e-4)
    if color == "vertex":
        np.testing.assert_array_equal(r.visual.vertex_colors[:, :3], (c.colors * 255).round().numpy())
    if color == "texture":
        np.testing.assert_allclose(r.visual.uv, c.uv.numpy(), atol=1e-6)


def test_a_cancelled_obj_leaves_no_file(tmp_path, monkeypatch):
    from jointcore import mesh_io

    _, m = _step_mesh()
    monkeypatch.setattr(mesh_io, "OBJ_BLOCK", 4)
    calls = [0]

    class Stop(Exception):
        pass

    def check():
        calls[0] += 1
        if calls[0] == 5:  # mid-file, after some blocks were written
            raise Stop()
    for color in ("vertex", "texture"):
        calls[0] = 0
        with pytest.raises(Stop):
            M.export_mesh(m, tmp_path / f"s_{color}.obj", color=color, check=check)
    assert sorted(os.listdir(tmp_path)) == []


def test_depth_kind_auto_reads_the_convention_the_depth_picture_carries(node_module, caplog):
    """Predict Depth / Normals' depth (near = dark) and JointNet's (near = bright) wired straight into RGBD to Mesh
    with depth_kind auto give the same, correctly ordered geometry; an unmarked picture is read as disparity;
    Depth Convention marks (and optionally flips) any picture; a normal map is refused."""
    import logging

    mod, out = node_module
    common = sys.modules[mod.__name__.rsplit(".", 1)[0] + ".common"]
    req = mod.JDRGBDToMesh.INPUT_TYPES()["required"]
    assert req["depth_kind"][0][0] == "auto" and req["depth_kind"][1]["default"] == "auto"
    near_left = torch.linspace(0.1, 0.9, 8).repeat(1, 6, 1)[..., None].expand(1, 6, 8, 3).contiguous()  # depth
    as_depth = common.tag_depth(near_left.clone(), "depth")           # Predict Depth / Normals: near = dark
    as_disparity = common.tag_depth(1.0 - near_left, "disparity")     # JointNet: near = bright

    def distances(depth_img, kind="auto"):
        img, dep, _ = mod.rgbd_pairs(torch.rand(1, 6, 8, 3), depth_img)
        m = M.rgbd_to_mesh(img[0], dep[0], projection="perspective",
                           depth_kind=mod.resolve_depth_kind(depth_img, kind), near=1.0, far=10.0)[0]
        return m.vertices.norm(dim=1).reshape(6, 8).mean(0)
    a, b = distances(as_depth), distances(as_disparity)
    assert bool((a[1:] > a[:-1]).all()) and bool((b[1:] > b[:-1]).all())  # both: far on the right
    untagged = distances(near_left.clone())                    # read as disparity: the picture's dark side is far
    assert bool((untagged[1:] < untagged[:-1]).all())
    with caplog.at_level(logging.INFO, logger="jointdiffusion"):
        mod.resolve_depth_kind(near_left.clone(), "auto")
    assert "carries no convention" in caplog.text
    assert mod.resolve_depth_kind(as_depth, "disparity") == "disparity"  # an explicit choice wins
    (marked,) = mod.JDDepthConvention().mark(near_left.clone(), "dark", False)
    assert common.depth_tag(marked) == "depth" and torch.equal(marked, near_left)
    (flipped,) = mod.JDDepthConvention().mark(near_left.clone(), "dark", True)
    assert common.depth_tag(flipped) == "disparity" and torch.allclose(flipped, 1 - near_left)
    (bright,) = mod.JDDepthConvention().mark(near_left.clone(), "bright", True)
    assert common.depth_tag(bright) == "depth"
    with pytest.raises(ValueError, match="normal map"):
        mod.JDRGBDToMesh().export(torch.rand(1, 6, 8, 3), common.tag_depth(torch.rand(1, 6, 8, 3), "normals"),
                                  "perspective", 60.0, 180.0, "auto", 1.0, 10.0, 0.1, 1, "glb", "x/y")


@pytest.mark.parametrize("projection", ["perspective", "cylindrical", "equirectangular"])
def test_unprojection_in_row_bands_equals_the_whole_grid(projection):
    """A band's points (rows=(r0, r1)) are exactly the whole grid's rows r0…r1−1: meshes are built band by band."""
    g = torch.Generator().manual_seed(2)
    d = torch.rand(11, 17, generator=g) + 0.5
    kw = dict(projection=projection, horizontal_span_deg=270.0, fov_deg=75.0)
    whole = M.unproject(d, **kw)
    bands = torch.cat([M.unproject(d, rows=(r0, min(11, r0 + 4)), **kw) for r0 in range(0, 11, 4)])
    assert torch.equal(bands, whole)
    # pixel centres at integer coordinates: the middle column of an odd-width grid looks straight ahead
    assert torch.allclose(whole[:, 8, 0], torch.zeros(11), atol=1e-6)
