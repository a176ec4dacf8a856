"""A procedural RGB-D world: simple rooms with coloured primitives, exact depth / normals / masks, captions.

Training and evaluation data for the small default model family (VAE, text-to-image UNet, JointNet,
depth / normal predictors). Pure PyTorch + numpy + Pillow; vectorised ray casting over all scenes and
pixels of a batch.

Scenes (:mod:`~jointcore.data.world_scene`)
    :func:`sample_scene` draws a scene from an integer seed, identically on every machine: an axis-aligned
    room (4–8 m wide and deep, 2.5–3.5 m high; wall / floor colour and plain, checker or stripe textures in
    world coordinates), 1–4 non-overlapping primitives standing on the floor (box, sphere, cylinder,
    cone; distinct named :data:`PALETTE` colours; plain / checker / stripes mixing the colour with a darker
    version of itself), one white point light near the ceiling on the camera's half of the room plus
    ambient, a default perspective view (near a wall, eye height 1.2–1.7 m, horizontal FOV 55–75°, looking
    at the objects with a slight downward pitch; every object centre is in view) and a default panorama
    centre (within 0.3 m of the room centre, at least 0.8 m from any object footprint). Seeds are split into
    :data:`TRAIN_SEEDS` and :data:`HELDOUT_SEEDS`; :func:`seed_split` / :func:`check_seeds` raise for seed
    collections that cross a split boundary.

World and camera conventions (:mod:`~jointcore.data.world_camera`)
    World: right-handed, metres, +Y up, floor ``y = 0``, room centred on ``x = z = 0``. Camera frame: x
    right, y up, z towards the viewer (looking along −z). ``rotation`` is camera-to-world, ``Ry(yaw) @
    Rx(pitch)``; yaw 0 looks along −Z, positive yaw turns left, positive pitch looks up. Pixel centres at
    integer ``(u, v)``, ``v`` downwards. Cameras: :func:`perspective`, :func:`cylindrical` (any span, a 360°
    span wraps exactly), :func:`equirectangular` (longitude −180..180° across, latitude 90..−90° down).

Render outputs (:func:`render`), ``B`` scenes, float32 unless noted
    * ``rgb [B,3,H,W]`` in [0, 1], linear shading encoded with a pure 1/2.2 power (sRGB-ish).
    * ``distance [B,1,H,W]``: Euclidean length of the pixel-centre ray to the first hit (metres).
    * ``depth [B,1,H,W]``: perspective — planar z along the optical axis (``distance·cos`` of the angle to
      the axis); cylindrical — horizontal distance from the camera's vertical axis (the planar depth of
      the per-column tangent camera); equirectangular — the ray distance itself.
    * ``normals [B,3,H,W]``: unit surface normals in the camera frame (x right, y up, z towards the viewer;
      a wall facing the camera is ``(0, 0, 1)``). Panoramas: in the per-pixel frame of the tangent
      perspective camera looking horizontally along the pixel's azimuth, y up. :func:`normals_to_world`
      / :func:`normals_to_camera` convert.
    * ``mask [B,1,H,W]`` int64: 0 room surfaces, ``k`` the k-th object of ``scene.objects`` (1-based).
    * ``valid [B,1,H,W]`` bool: the ray hit something (always, for a camera inside the room).
    With ``supersample = s`` RGB averages ``s×s`` sub-pixel samples in linear light; depth, distance,
    normals, mask and valid always come from the exact pixel-centre rays (no blending across edges).

Captions (:func:`caption`)
    ``"a red sphere left of a blue striped box in a grey room with a checkered floor"``: objects in scene
    order, related pairwise (1st–2nd, 3rd–4th) by left of / right of / in front of / behind as seen by the
    perspective camera (projected image x for left / right; depth for front / behind, whichever separation
    is larger). Panoramas list the objects: ``"a red sphere, a blue box and a green cone in a grey room"``.

Colours (:mod:`~jointcore.data.world_colour`)
    :func:`colour_present` / :func:`colour_score` decide whether a palette colour is visible in an image
    (≥ 1.5 % of the pixels labelled with it by hue / saturation / value). On default 64×64 renders (seeds
    0–299) it finds 99 % of the objects covering ≥ 3 % of the image (every chromatic one; white 26/29, since a
    white object in shadow is grey) with 0.14 % false positives over (scene, absent colour) pairs.
    :func:`scene_colours` lists the names a scene may show (its objects', plus ``white`` for a white room).

Datasets
    :func:`write_dataset` and ``python -m jointcore.data.world --out DIR --seeds 0:1000 --size 64
    [--camera perspective|cylindrical|equirect] [--span 360] [--width W --height H]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from .world_camera import (KINDS as CAMERA_KINDS, Camera, canonical_kind, cylindrical, equirectangular,
                           normals_to_camera, normals_to_world, perspective)
from .world_colour import colour_fractions, colour_labels, colour_present, colour_score, scene_colours
from .world_render import render as _render
from .world_scene import (FLOOR_PALETTE, HELDOUT_SEEDS, MAX_OBJECTS, OBJECT_KINDS, PALETTE, ROOM_PALETTE,
                          TEXTURES, TRAIN_SEEDS, Light, Obj, Room, Scene, View, check_seeds, sample_scene,
                          sample_scenes, seed_split)

__all__ = [
    "PALETTE", "ROOM_PALETTE", "FLOOR_PALETTE", "OBJECT_KINDS", "TEXTURES", "MAX_OBJECTS", "CAMERA_KINDS",
    "TRAIN_SEEDS", "HELDOUT_SEEDS", "seed_split", "check_seeds",
    "Room", "Obj", "Light", "View", "Scene", "sample_scene", "sample_scenes",
    "Camera", "perspective", "cylindrical", "equirectangular", "default_camera", "normals_to_world",
    "normals_to_camera", "render", "render_seeds", "caption", "object_camera_coords", "relation",
    "colour_labels", "colour_fractions", "colour_score", "colour_present", "scene_colours",
    "write_dataset", "main",
]

render = _render


# ---- default cameras ------------------------------------------------------------------------------------
def default_camera(scenes: Sequence[Scene], kind: str = "perspective", height: int = 64,
                   width: Optional[int] = None, *, span_deg: float = 360.0, vfov_deg: Optional[float] = None) -> Camera:
    """The scenes' own cameras. Perspective: each scene's :class:`View` (horizontal FOV kept; width
    defaults to ``height``). Cylindrical / equirectangular: level at each scene's panorama centre, centred
    on its ``pano_yaw_deg`` (a cylinder under 360° is centred on the objects instead). Width defaults to
    ``height·span/90`` for cylinders (360°: a 4:1 image; with ``vfov_deg=None`` its square pixels at the
    horizon give ±38° elevation) and ``2·height`` for equirectangular images."""
    kind = canonical_kind(kind)
    if kind == "perspective":
        w = height if width is None else width
        return perspective(height, w, [s.view.position for s in scenes], [s.view.yaw_deg for s in scenes],
                           [s.view.pitch_deg for s in scenes], fov_deg=[s.view.fov_deg for s in scenes])
    pos = [s.pano_position for s in scenes]
    yaw = [s.pano_yaw_deg for s in scenes]
    if kind == "cylindrical" and span_deg < 360.0:     # a partial panorama faces the objects
        yaw = [_yaw_towards_objects(s) for s in scenes]
    if kind == "cylindrical":
        w = max(1, round(height * span_deg / 90.0)) if width is None else width
        return cylindrical(height, w, pos, span_deg=span_deg, vfov_deg=vfov_deg, yaw_deg=yaw)
    return equirectangular(height, 2 * height if width is None else width, pos, yaw_deg=yaw)


def _yaw_towards_objects(scene: Scene) -> float:
    """Yaw (degrees) from the panorama centre towards the objects' mean footprint centre."""
    if not scene.objects:
        return scene.view.yaw_deg
    x = sum(o.position[0] for o in scene.objects) / len(scene.objects) - scene.pano_position[0]
    z = sum(o.position[1] for o in scene.objects) / len(scene.objects) - scene.pano_position[2]
    return math.degrees(math.atan2(-x, -z))


def render_seeds(seeds: Iterable[int], height: int = 64, width: Optional[int] = None, camera: str = "perspective",
                 *, span_deg: float = 360.0, vfov_deg: Optional[float] = None, supersample: int = 1,
                 max_rays: int = 1 << 19) -> tuple[list[Scene], Camera, dict]:
    """Sample the scenes of ``seeds`` and render them with their default cameras of ``camera`` kind."""
    scenes = sample_scenes(seeds)
    cam = default_camera(scenes, camera, height, width, span_deg=span_deg, vfov_deg=vfov_deg)
    return scenes, cam, _render(scenes, cam, supersample=supersample, max_rays=max_rays)


# ---- captions -------------------------------------------------------------------------------------------
_TEX_WORD = {"plain": "", "checker": "checkered ", "stripes": "striped "}


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _phrase(o: Obj) -> str:
    return _a(f"{o.colour} {_TEX_WORD[o.texture]}{o.kind}")


def _room_phrase(room: Room) -> str:
    """``"a grey room with a checkered floor and striped walls"``."""
    extras = []
    if room.floor_texture != "plain":
        extras.append(f"a {_TEX_WORD[room.floor_texture].strip()} floor")
    if room.wall_texture != "plain":
        extras.append(f"{_TEX_WORD[room.wall_texture].strip()} walls")
    return f"{_a(room.wall_colour)} room" + (" with " + " and ".join(extras) if extras else "")


def _camera_for(scene: Scene, camera: Union[Camera, str, None], index: int) -> Camera:
    if camera is None:
        return default_camera([scene], "perspective", 8)
    if isinstance(camera, str):
        return default_camera([scene], camera, 8)
    return camera[index] if len(camera) > 1 else camera


def object_camera_coords(scene: Scene, camera: Union[Camera, str, None] = None, index: int = 0) -> torch.Tensor:
    """``[n_objects, 3]`` float64 bounding-box centres of the scene's objects in the camera frame."""
    cam = _camera_for(scene, camera, index)
    c = torch.tensor([o.centre for o in scene.objects], dtype=torch.float64).reshape(-1, 3)
    return (c - cam.position[0]) @ cam.rotation[0]      # Rᵀ (c − position), row-vector form


def relation(a_cam: torch.Tensor, b_cam: torch.Tensor) -> str:
    """How object ``a`` relates to ``b`` (camera-frame centres): left of / right of (by projected image x)
    when their lateral separation at their mean depth is at least their depth separation, otherwise
    in front of (nearer) / behind."""
    da, db = -float(a_cam[2]), -float(b_cam[2])
    xa, xb = float(a_cam[0]) / da, float(b_cam[0]) / db
    if abs(xa - xb) * 0.5 * (da + db) >= abs(da - db):
        return "left of" if xa < xb else "right of"
    return "in front of" if da < db else "behind"


def _visible(scene: Scene, cam: Camera) -> list[int]:
    """Indices of objects whose centre lies inside the view (all objects for 360° panoramas)."""
    if cam.wraps:
        return list(range(len(scene.objects)))
    p = object_camera_coords(scene, cam)
    keep = []
    for i, (x, y, z) in enumerate(p.tolist()):
        if cam.kind == "perspective":
            if z >= 0:
                continue
            f = float(cam.focal()[0])
            u, v = f * x / -z, f * y / -z
            if abs(u) <= cam.width / 2 and abs(v) <= cam.height / 2:
                keep.append(i)
        elif abs(math.degrees(math.atan2(x, -z))) <= cam.span_deg / 2:
            keep.append(i)
    return keep


def caption(scene: Scene, camera: Union[Camera, str, None] = None, index: int = 0) -> str:
    """Caption of ``scene`` as rendered by ``camera`` (camera ``index`` of a batch; ``None`` = the
    scene's default perspective view; a kind string = the scene's default camera of that kind).

    Perspective views (and cylindrical views under 360°) name the objects whose centre is in view.
    """
    cam = _camera_for(scene, camera, index)
    vis = _visible(scene, cam)
    objs = [scene.objects[i] for i in vis]
    room = _room_phrase(scene.room)
    if not objs:
        return room
    if cam.kind != "perspective":
        names = [_phrase(o) for o in objs]
        listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
        return f"{listed} in {room}"
    p = object_camera_coords(scene, cam)[vis]
    parts = []
    for i in range(0, len(objs), 2):
        if i + 1 < len(objs):
            parts.append(f"{_phrase(objs[i])} {relation(p[i], p[i + 1])} {_phrase(objs[i + 1])}")
        else:
            parts.append(_phrase(objs[i]))
    return " and ".join(parts) + " in " + room


# ---- dataset writer -------------------------------------------------------------------------------------
SUBDIRS = ("images", "depth", "distance", "normals", "masks", "captions", "meta")
DEPTH_MEANING = {
    "perspective": "planar depth along the optical axis (m)",
    "cylindrical": "horizontal distance from the camera's vertical axis (m)",
    "equirectangular": "Euclidean ray distance (m)",
}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _npy_bytes(a: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _png_bytes(a: np.ndarray) -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(out_dir: Union[str, os.PathLike], seeds: Iterable[int], size: int = 64,
                  camera: str = "perspective", *, width: Optional[int] = None, height: Optional[int] = None,
                  span_deg: float = 360.0, vfov_deg: Optional[float] = None, supersample: int = 2,
                  overwrite: bool = False, split: Optional[str] = None, batch: int = 64,
                  log=None) -> Path:
    """Render the scenes of ``seeds`` into ``out_dir`` (file stems ``s{seed:010d}``):

    ``images/*.png`` 8-bit RGB, ``depth/*.npy`` float32 ``[H, W]`` (the ``depth`` of :func:`render`),
    ``distance/*.npy``, ``normals/*.npy`` float32 ``[H, W, 3]``, ``masks/*.png`` 8-bit object ids,
    ``captions/*.txt``, ``meta/*.json`` (scene, camera, caption) and ``dataset.json`` (parameters).

    ``height × width`` default to ``size × size`` for perspective, ``size × size·span/90`` for cylindrical
    and ``size × 2·size`` for equirectangular. Everything is written into ``out_dir + ".part"`` (a stale one
    is removed) which is renamed to ``out_dir`` at the end; an existing non-empty ``out_dir`` raises
    ``FileExistsError`` unless ``overwrite``. The seeds must not cross the train / held-out boundary
    (:func:`check_seeds`; ``split`` additionally requires one).
    """
    kind = canonical_kind(camera)
    seeds = seeds if isinstance(seeds, range) else list(seeds)
    if len(seeds) == 0:
        raise ValueError("no seeds")
    if len(set(seeds)) != len(seeds):
        raise ValueError("duplicate seeds")
    got_split = check_seeds(seeds, split)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    h = int(height or size)
    w = width
    part = out.with_name(out.name + ".part")
    if part.exists():
        shutil.rmtree(part)
    for sub in SUBDIRS:
        (part / sub).mkdir(parents=True)
    log = log or (lambda msg: None)
    t0 = time.perf_counter()
    cam_desc = None
    seeds_list = list(seeds)
    for b0 in range(0, len(seeds_list), batch):
        chunk = seeds_list[b0:b0 + batch]
        scenes = sample_scenes(chunk)
        cam = default_camera(scenes, kind, h, w, span_deg=span_deg, vfov_deg=vfov_deg)
        res = _render(scenes, cam, supersample=supersample)
        rgb = (res["rgb"].permute(0, 2, 3, 1).numpy() * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
        depth, dist = res["depth"][:, 0].numpy(), res["distance"][:, 0].numpy()
        normals = res["normals"].permute(0, 2, 3, 1).contiguous().numpy()
        masks = res["mask"][:, 0].numpy().astype(np.uint8)
        for i, (seed, sc) in enumerate(zip(chunk, scenes)):
            stem = f"s{seed:010d}"
            cap = caption(sc, cam, i)
            cdict = cam.to_dict(i)
            cam_desc = cam_desc or {k: v for k, v in cdict.items()
                                    if k in ("kind", "height", "width", "span_deg", "vfov_deg", "fov_axis")}
            _atomic_write(part / "images" / f"{stem}.png", _png_bytes(rgb[i]))
            _atomic_write(part / "depth" / f"{stem}.npy", _npy_bytes(depth[i].astype(np.float32)))
            _atomic_write(part / "distance" / f"{stem}.npy", _npy_bytes(dist[i].astype(np.float32)))
            _atomic_write(part / "normals" / f"{stem}.npy", _npy_bytes(normals[i].astype(np.float32)))
            _atomic_write(part / "masks" / f"{stem}.png", _png_bytes(masks[i]))
            _atomic_write(part / "captions" / f"{stem}.txt", (cap + "\n").encode())
            meta = {"seed": seed, "split": got_split, "caption": cap, "scene": sc.to_dict(), "camera": cdict,
                    "depth": DEPTH_MEANING[kind]}
            _atomic_write(part / "meta" / f"{stem}.json", json.dumps(meta, indent=1).encode())
        log(f"{min(b0 + batch, len(seeds_list))}/{len(seeds_list)} scenes, {time.perf_counter() - t0:.1f}s")
    info = {"generator": "jointcore.data.world", "count": len(seeds_list), "split": got_split,
            "seeds": ({"start": seeds.start, "stop": seeds.stop, "step": seeds.step} if isinstance(seeds, range)
                      else seeds_list),
            "camera": cam_desc, "supersample": supersample, "depth": DEPTH_MEANING[kind],
            "normals": "unit, camera frame x right / y up / z towards the viewer"
                       + ("" if kind == "perspective" else " (per-pixel tangent frame along the pixel's azimuth)"),
            "mask": "0 room, k = k-th object of meta.scene.objects",
            "rgb": "8-bit, linear shading encoded with a 1/2.2 power"}
    _atomic_write(part / "dataset.json", json.dumps(info, indent=1).encode())
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    os.replace(part, out)
    return out


# ---- CLI ------------------------------------------------------------------------------------------------
def parse_seeds(text: str) -> Union[range, list[int]]:
    """``"A:B"`` / ``"A:B:STEP"`` → range, ``"A,B,C"`` → list, ``"A"`` → ``[A]``."""
    if ":" in text:
        return range(*(int(x) for x in text.split(":")))
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jointcore.data.world",
                                 description="Write a procedural RGB-D world dataset.")
    ap.add_argument("--out", required=True, help="output folder (must be absent or empty unless --overwrite)")
    ap.add_argument("--seeds", required=True, help="A:B[:STEP] range or comma list")
    ap.add_argument("--size", type=int, default=64, help="image height (and width for perspective)")
    ap.add_argument("--camera", default="perspective", choices=list(CAMERA_KINDS) + ["equirect"])
    ap.add_argument("--span", type=float, default=360.0, help="cylindrical horizontal span (degrees)")
    ap.add_argument("--vfov", type=float, default=None, help="cylindrical vertical FOV (degrees)")
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--height", type=int, default=None)
    ap.add_argument("--supersample", type=int, default=2, help="s×s RGB samples per pixel (1 = off)")
    ap.add_argument("--split", choices=["train", "heldout"], default=None, help="require the seeds in this split")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = write_dataset(args.out, parse_seeds(args.seeds), args.size, args.camera, width=args.width,
                            height=args.height, span_deg=args.span, vfov_deg=args.vfov,
                            supersample=args.supersample, overwrite=args.overwrite, split=args.split,
                            batch=args.batch, log=lambda m: print(m, file=sys.stderr))
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
