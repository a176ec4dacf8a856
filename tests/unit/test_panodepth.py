"""jointcore.panodepth against the procedural world's exact panoramas and perspective views."""
from __future__ import annotations

import math

import pytest
import torch

from jointcore.data import world as W
from jointcore.panodepth import (METHODS, PanoGrid, make_views, pano_to_view, predict_panorama, shared_noise,
                                 view_on_pano, world_cameras)
from jointcore.panodepth import evaluate as E

SEED = W.HELDOUT_SEEDS.start + 7


@pytest.fixture(scope="module")
def scene():
    return W.sample_scenes([SEED])[0]


@pytest.fixture(scope="module")
def equirect(scene):
    return W.render([scene], W.default_camera([scene], "equirectangular", 64, 128))


def render_views(scene, views):
    """The world's own perspective renders of ``views`` (same centre and orientation as the panorama's)."""
    return W.render([scene] * len(views), world_cameras(views, scene.pano_position, scene.pano_yaw_deg))


def oracle(scene, views, convention="depth", noise=0.0, outliers=(), seed=1):
    """A predictor that returns each view's true depth (or disparity) under a random affine map, min–max
    normalised like a real one."""
    r = render_views(scene, views)
    g = torch.Generator().manual_seed(seed)
    z = r["depth"].double()
    x = z if convention == "depth" else 1.0 / z
    s = torch.rand(len(views), generator=g) * 2 + 0.5
    t = torch.rand(len(views), generator=g) * 2 - 0.5
    p = (x - t.view(-1, 1, 1, 1)) / s.view(-1, 1, 1, 1) + noise * torch.randn(x.shape, generator=g, dtype=x.dtype)
    lo = p.flatten(1).amin(1).view(-1, 1, 1, 1)
    hi = p.flatten(1).amax(1).view(-1, 1, 1, 1)
    p = ((p - lo) / (hi - lo).clamp_min(1e-9)).float()
    for v in outliers:
        h, w = p.shape[-2:]
        p[v, :, h // 4: 3 * h // 4, w // 2:] = torch.rand((1, h // 2, w - w // 2), generator=g)

    def depth_fn(images, latents=None):
        assert images.shape[0] == len(views)
        return p

    depth_fn.normals = r["normals"]
    return depth_fn


def fitted_abs_rel(pred, gt):
    return E.depth_scores(pred, gt)["abs_rel"]


# ---- geometry ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["equirectangular", "cylindrical"])
def test_pixel_directions_round_trip(kind):
    grid = PanoGrid(kind, 32, 128)
    u, v, inside = grid.pixel_coords(grid.directions())
    uu, vv = torch.meshgrid(torch.arange(32.0), torch.arange(128.0), indexing="ij")
    assert inside.all()
    torch.testing.assert_close(u, vv.double(), atol=1e-9, rtol=0)
    torch.testing.assert_close(v, uu.double(), atol=1e-9, rtol=0)
    view = make_views(grid, "cube+seams" if kind == "equirectangular" else "ring", 90, 16)[1]
    x, y, c, ok = view.project(view.directions())
    yy, xx = torch.meshgrid(torch.arange(view.height * 1.0), torch.arange(view.width * 1.0), indexing="ij")
    assert ok.all()
    torch.testing.assert_close(x, xx.double(), atol=1e-9, rtol=0)
    torch.testing.assert_close(y, yy.double(), atol=1e-9, rtol=0)
    torch.testing.assert_close(c, -view.local_directions()[..., 2], atol=1e-12, rtol=0)


def test_views_read_the_panorama_as_the_world_renders_them(scene):
    """Resampled from a 256×512 equirectangular render, every cube face (including the one across the 0/360°
    seam and the poles) matches the world's own perspective render of that view."""
    grid = PanoGrid("equirectangular", 256, 512)
    pano = W.render([scene], W.default_camera([scene], "equirectangular", 256, 512))
    views = make_views(grid, "cube", 90, 32)
    assert {(v.azimuth_deg, v.elevation_deg) for v in views} >= {(180.0, 0.0), (0.0, 90.0), (0.0, -90.0)}
    direct = render_views(scene, views)
    for i, v in enumerate(views):
        got = pano_to_view(pano["distance"], grid, v)[0, 0]
        want = direct["distance"][i, 0]
        rel = ((got - want).abs() / want).flatten()
        assert float(rel.median()) < 0.005 and float(rel.quantile(0.9)) < 0.02, (v, float(rel.median()))


def test_cylindrical_views_cover_the_cylinder_and_barely_look_past_it(scene):
    grid = PanoGrid("cylindrical", 64, 256)          # 360°, square pixels: ±38° of elevation
    views = make_views(grid, "ring", 90, 32)
    assert len(views) == 8 and all(v.height <= grid.width for v in views)
    outside = [1 - float(grid.pixel_coords(v.directions())[2].double().mean()) for v in views]
    assert max(outside) < 0.15, outside                  # only the rounding to 8 px looks past the edges
    cover = sum(view_on_pano(grid, v).inside.int() for v in views)
    assert int(cover.min()) >= 1
    cyl = W.render([scene], W.cylindrical(64, 256, scene.pano_position, yaw_deg=scene.pano_yaw_deg))
    direct = render_views(scene, views)
    got = pano_to_view(cyl["distance"], grid, views[3])[0, 0]
    rel = ((got - direct["distance"][3, 0]).abs() / direct["distance"][3, 0]).flatten()
    assert float(rel.median()) < 0.01


def test_every_layout_covers_the_sphere():
    grid = PanoGrid("equirectangular", 32, 64)
    for layout, count in (("cube", 0), ("cube+seams", 0), ("icosahedron", 0), ("fibonacci", 20)):
        views = make_views(grid, layout, 90, 16, count)
        cover = sum(view_on_pano(grid, v).inside.int() for v in views)
        assert int(cover.min()) >= 1, layout
        if layout == "cube+seams":
            assert len(views) == 18 and int(cover.min()) >= 2     # every pixel in an overlap: alignable
    with pytest.raises(ValueError, match="view layout"):
        make_views(grid, "dodecahedron")


# ---- alignment and merge ------------------------------------------------------------------------------
@pytest.mark.parametrize("convention", ["depth", "disparity"])
def test_alignment_recovers_every_views_scale_and_shift(scene, equirect, convention):
    grid = PanoGrid("equirectangular", 64, 128)
    views = make_views(grid, "cube+seams", 90, 32)
    fn = oracle(scene, views, convention)
    out = predict_panorama(equirect["rgb"], grid, fn, method="aligned", fov_deg=90, view_size=32,
                           convention=convention, turn_upward=False)     # the oracle ignores the pictures
    r, gt = out.distance[0, 0].double(), equirect["distance"][0, 0].double()
    assert torch.isfinite(r).all()
    k = float((r * gt).sum() / (r * r).sum())                     # up to one scale — no shift left
    assert float(((k * r - gt).abs() / gt).mean()) < 0.01
    unaligned = predict_panorama(equirect["rgb"], grid, fn, method="views12", layout="cube+seams", fov_deg=90,
                                 view_size=32, convention=convention).distance[0, 0]
    assert fitted_abs_rel(unaligned, gt) > 5 * fitted_abs_rel(r, gt)


def test_trimming_rejects_outlier_patches(scene, equirect):
    grid = PanoGrid("equirectangular", 64, 128)
    views = make_views(grid, "cube+seams", 90, 32)
    fn = oracle(scene, views, outliers=(0, 6, 7))
    gt = equirect["distance"][0, 0]
    err = {}
    for robust in (True, False):
        out = predict_panorama(equirect["rgb"], grid, fn, method="aligned", fov_deg=90, view_size=32, robust=robust,
                               turn_upward=False)
        err[robust] = fitted_abs_rel(out.distance[0, 0], gt)
        al = out.alignments[0]
        assert math.isnan(al.trim_threshold) != robust
    assert err[True] < 0.85 * err[False]


def test_normals_are_rotated_into_the_panorama(scene, equirect):
    grid = PanoGrid("equirectangular", 64, 128)
    errs = {}
    for method in ("aligned", "naive"):
        views = make_views(grid, METHODS[method]["layout"], 90, 32)
        fn = oracle(scene, views)
        out = predict_panorama(equirect["rgb"], grid, fn, lambda im: fn.normals, method=method, fov_deg=90,
                               view_size=32, turn_upward=False)
        errs[method] = E.normal_error(out.normals[0], equirect["normals"][0])
    assert errs["aligned"] < 3.0 and errs["naive"] > 20.0
    lengths = out.normals.norm(dim=1)
    torch.testing.assert_close(lengths, torch.ones_like(lengths), atol=1e-4, rtol=0)


def test_seam_and_poles_are_closed(scene, equirect):
    grid = PanoGrid("equirectangular", 64, 128)
    views = make_views(grid, "cube+seams", 90, 32)
    out = predict_panorama(equirect["rgb"], grid, oracle(scene, views), method="aligned", fov_deg=90, view_size=32,
                           turn_upward=False)
    r, gt = out.distance[0, 0], equirect["distance"][0, 0]
    seam, interior = E.seam_pairs(grid, 90)
    wrap = seam[(seam[:, 0] % 128 == 127) & (seam[:, 1] % 128 == 0)]
    assert len(wrap) == 64
    assert E.jump_error(r, gt, wrap) < 2 * E.jump_error(r, gt, interior) + 1e-3
    for row in (0, 63):     # a pole row is one point: the same distance all along it
        assert float(r[row].std() / r[row].mean()) < 0.02


def test_upward_views_are_predicted_upside_down_and_turned_back(equirect):
    """Views looking up (not the zenith) reach the predictor rotated by 180°; what it says comes back turned,
    normals with x and y negated — so a predictor that treats every pixel alike gives the same panorama either
    way, and one with a "lower = nearer" prior sees the ceiling the way it learnt."""
    grid = PanoGrid("equirectangular", 64, 128)
    seen = []

    def per_pixel(images, latents=None):           # depth from brightness: blind to orientation
        seen.append(images.clone())
        return images.mean(1, keepdim=True)

    def up_is_far(images):                           # "up" in the picture, for every pixel
        n = torch.zeros(images.shape[0], 3, *images.shape[-2:])
        n[:, 1] = 1.0
        return n

    outs = {t: predict_panorama(equirect["rgb"], grid, per_pixel, up_is_far, view_size=16, turn_upward=t)
            for t in (True, False)}
    torch.testing.assert_close(outs[True].distance, outs[False].distance, atol=1e-5, rtol=1e-5)
    views = outs[True].views
    up = [i for i, v in enumerate(views) if 0 < v.elevation_deg < 89]
    assert len(up) == 4                              # the seam views at +45°
    torch.testing.assert_close(seen[0][up[0]], torch.flip(seen[1][up[0]], dims=(-2, -1)))
    level = [i for i, v in enumerate(views) if v.elevation_deg == 0][0]
    torch.testing.assert_close(seen[0][level], seen[1][level])
    n_t, n_f = outs[True].view_normals, outs[False].view_normals
    assert torch.equal(n_t[up[0], 0, 1], -n_f[up[0], 0, 1]) and torch.equal(n_t[level], n_f[level])
    assert outs[True].settings["turn_upward"] and not outs[False].settings["turn_upward"]


def test_cylindrical_panorama_end_to_end(scene):
    cyl = W.render([scene], W.cylindrical(32, 128, scene.pano_position, yaw_deg=scene.pano_yaw_deg))
    grid = PanoGrid("cylindrical", 32, 128)
    views = make_views(grid, "ring", 90, 32)
    out = predict_panorama(cyl["rgb"], grid, oracle(scene, views), method="aligned", fov_deg=90, view_size=32)
    assert out.settings["layout"] == "ring" and len(out.views) == 8
    assert fitted_abs_rel(out.depth[0, 0], cyl["depth"][0, 0]) < 0.01     # horizontal distance, like the mesh's


def test_shared_noise_is_the_same_where_views_overlap():
    grid = PanoGrid("equirectangular", 64, 128)
    views = make_views(grid, "cube+seams", 90, 64)
    z = shared_noise(grid, views, (4, 8, 8), seed=3)
    assert z.shape == (18, 4, 8, 8)
    assert abs(float(z.mean())) < 0.2 and 0.7 < float(z.std()) < 1.3
    # the front face (azimuth 0) and the seam view at 45°: their latent pixels looking the same way carry
    # (nearly) the same noise; for noise drawn per view they would be unrelated
    f, s = views[0], views[6]
    lf = type(f)(f.azimuth_deg, f.elevation_deg, f.fov_deg, 8, 8)
    ls = type(s)(s.azimuth_deg, s.elevation_deg, s.fov_deg, 8, 8)
    x, y, _, ok = ls.project(lf.directions())
    xi, yi = x.round().long().clamp(0, 7), y.round().long().clamp(0, 7)
    a_ = z[0][:, ok]
    b_ = z[6][:, yi[ok], xi[ok]]
    assert ok.sum() >= 16
    corr = float(torch.corrcoef(torch.stack([a_.flatten(), b_.flatten()]))[0, 1])
    other = shared_noise(grid, views, (4, 8, 8), seed=4)[6][:, yi[ok], xi[ok]]
    corr_other = float(torch.corrcoef(torch.stack([a_.flatten(), other.flatten()]))[0, 1])
    assert corr > 0.4 and abs(corr_other) < 0.2, (corr, corr_other)
    assert not torch.equal(shared_noise(grid, views, (4, 8, 8), seed=4), z)


def test_bad_arguments_say_what_is_wrong(equirect):
    grid = PanoGrid("equirectangular", 64, 128)
    fn = lambda im, latents=None: torch.zeros(im.shape[0], 1, *im.shape[-2:])  # noqa: E731
    with pytest.raises(ValueError, match="method must be one of"):
        predict_panorama(equirect["rgb"], grid, fn, method="best")
    with pytest.raises(ValueError, match="latent_shape"):
        predict_panorama(equirect["rgb"], grid, fn, sync="shared_noise")
    with pytest.raises(ValueError, match="projection must be one of"):
        PanoGrid("fisheye", 8, 16)
    with pytest.raises(ValueError, match="panorama is 128×64 px, its grid says"):
        pano_to_view(equirect["rgb"], PanoGrid("equirectangular", 32, 64), make_views(grid, "cube", 90, 8)[0])


# ---- the measurement's metrics ------------------------------------------------------------------------
def test_metrics_are_zero_for_the_truth_and_see_a_seam(equirect):
    gt = equirect["distance"][0, 0]
    grid = PanoGrid("equirectangular", 64, 128)
    seam, interior = E.seam_pairs(grid, 90)
    assert E.depth_scores(gt * 3 + 1, gt)["abs_rel"] < 1e-6 and E.depth_scores(gt, gt)["delta1"] == 1.0
    assert E.jump_error(gt, gt, seam) < 1e-9
    stepped = gt.clone()
    stepped[:, 64:] *= 1.1                                      # a 10 % step at azimuth 0 (a cube-face border)
    assert E.jump_error(stepped, gt, seam) > 5 * E.jump_error(stepped, gt, interior)
    n = equirect["normals"][0]
    assert E.normal_error(n, n) < 0.1 and abs(E.normal_error(-n, n) - 180) < 0.1


def test_seam_excess_sees_seams_not_noise(equirect):
    """Noise that is stronger near the horizon (where the layouts' borders run) raises the seam pairs' error above
    the interior's without any seam; the seam excess compares rows with rows and stays near 0. A step at a view
    border is a seam."""
    gt = equirect["distance"][0, 0]
    grid = PanoGrid("equirectangular", 64, 128)
    seam, interior = E.seam_pairs(grid, 90)
    assert abs(E.seam_excess(gt, gt, seam, interior)) < 1e-9
    lat = (torch.arange(64, dtype=torch.float64) + 0.5) / 64 * math.pi - math.pi / 2
    amp = 0.01 * torch.cos(lat)[:, None] ** 4
    noisy = gt.double() * torch.exp(amp * torch.randn(64, 128, generator=torch.Generator().manual_seed(0),
                                                      dtype=torch.float64))
    raw_seam, raw_int = E.jump_error(noisy, gt, seam), E.jump_error(noisy, gt, interior)
    assert raw_seam > 1.2 * raw_int
    assert abs(E.seam_excess(noisy, gt, seam, interior)) < 0.05 * raw_seam
    stepped = noisy.clone()
    stepped[:, 64:] *= 1.1
    assert E.seam_excess(stepped, gt, seam, interior) > 0.5 * raw_seam


# ---- the command line -----------------------------------------------------------------------------------
def test_cli_writes_depth_and_normals_for_a_folder_and_keeps_existing_files(tmp_path, equirect):
    import numpy as np
    from PIL import Image

    from jointcore.panodepth import cli
    from predictor_ckpt import make_checkpoint

    ckpt, _ = make_checkpoint(str(tmp_path / "tiny-e2e"))
    src = tmp_path / "panos"
    src.mkdir()
    rgb = (equirect["rgb"][0].permute(1, 2, 0) * 255 + 0.5).clamp(0, 255).byte().numpy()
    Image.fromarray(rgb).save(src / "room.png")
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), "--model", ckpt, "--normals-model", ckpt, "--view-size", "16"]
    assert cli.main(args) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["room_depth.png", "room_distance.npy", "room_normals.npy", "room_normals.png"]
    d = np.asarray(Image.open(out / "room_depth.png"))
    assert d.shape == (64, 128) and d.dtype in (np.uint16, np.int32) and d.max() == 65535
    dist = np.load(out / "room_distance.npy")
    assert dist.shape == (64, 128) and dist.dtype == np.float32 and np.isfinite(dist).any()   # NaN: no view says
    assert np.load(out / "room_normals.npy").shape == (64, 128, 3)
    before = (out / "room_depth.png").read_bytes()
    assert cli.main(args) == 2 and (out / "room_depth.png").read_bytes() == before   # nothing overwritten
    assert cli.main(args + ["--overwrite"]) == 0
    Image.fromarray(rgb[:, :100]).save(src / "narrow.png")
    assert cli.main(args + ["--overwrite"]) == 2                                   # not 2:1: a clear error
    assert not list(out.glob("*.part"))
