"""The shipped workflows as a person opens them: a note that says what the workflow does and which model files go
where, every node in a group of its stage, no two nodes on top of each other, and a readable opening view.

These check the files themselves (what ``scripts/build_workflows.py`` wrote). What the frontends make of them
(sizes after load and after a run, overlaps read from the live graph) is ``tests/web/test_workflows_browser.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import build_workflows as B  # noqa: E402
import comfy_harness as H  # noqa: E402
import workflow_layout as W  # noqa: E402
from workflow_notes import NOTES  # noqa: E402

WORKFLOWS = H.workflows()
IDS = [H.workflow_id(p) for p in WORKFLOWS]
TITLE_H = W.TITLE_H


def _load(p: Path) -> dict:
    return json.loads(p.read_text())


def _rect(n: dict) -> tuple[float, float, float, float]:
    """A node's rectangle on the canvas, title bar included (LiteGraph draws it above ``pos``)."""
    (x, y), (w, h) = n["pos"], n["size"]
    return x, y - TITLE_H, w, h + TITLE_H


def _overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _inside(r, g) -> bool:
    return g[0] <= r[0] and g[1] <= r[1] and r[0] + r[2] <= g[0] + g[2] and r[1] + r[3] <= g[1] + g[3]


def test_every_spec_is_shipped_under_its_title():
    """One file per spec, named by its title: the frontends' template browser shows a pack's templates by file
    name (and the name again, with - and _ as spaces, as the description)."""
    assert sorted(IDS) == sorted(B.SPECS) == sorted(NOTES)
    bad = '/\\:*?"<>|'
    for p, wid in zip(WORKFLOWS, IDS):
        title = NOTES[wid][0]
        assert p.name == f"{title}.json" and p.with_suffix(".jpg").is_file(), p.name
        assert title.isascii() and not set(title) & set(bad) and "_" not in title, title
        assert _load(p)["extra"]["jointdiffusion"]["title"] == title
    with pytest.raises(FileNotFoundError, match="no shipped workflow 'nope'.*trailing_ddim_txt2img"):
        H.workflow_path("nope")


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_note_says_what_and_which_files(path):
    wf = _load(path)
    notes = [n for n in wf["nodes"] if n["type"] == "Note"]
    assert len(notes) == 1, f"{path.name}: {len(notes)} notes"
    text = notes[0]["widgets_values"][0]
    for section in ("MODEL FILES (under ComfyUI/models/)", "CHANGE FIRST", "TIME"):
        assert section in text, (path.name, section)
    # every model the workflow's loaders ask for is named, with its folder
    wanted = []
    for n in wf["nodes"]:
        v = n.get("widgets_values") or []
        if n["type"] == "CheckpointLoaderSimple":
            wanted.append(f"checkpoints/{v[0]}")
        elif n["type"] == "JDJointNetLoader":
            wanted.append(f"jointnet/{v[0]}/")
        elif n["type"] == "JDPredictorLoader":
            wanted.append(f"jointdiffusion_predictors/{v[0]}/")
        elif n["type"] == "JDDiff2in1Loader":
            wanted += [f"diffusers/{v[0]}/", f"diff2in1/{v[1]}/"]
        elif n["type"] == "JDTiledDiffusionSampler" and str(v[0]).startswith("syncdiffusion"):
            wanted.append("lpips/vgg16-397923af.pth")
        elif n["type"] == "LoadImage":
            wanted.append(v[0])  # the picture the workflow asks for: the note says where to put your own
    missing = [w for w in wanted if w not in text]
    assert wanted and not missing, (path.name, missing)
    extra = wf["extra"]["jointdiffusion"]
    assert extra["title"].strip() and extra["description"].strip()


@pytest.mark.parametrize("path", WORKFLOWS, ids=IDS)
def test_layout_groups_no_overlaps_readable_view(path):
    wf = _load(path)
    nodes = wf["nodes"]
    rects = {n["id"]: _rect(n) for n in nodes}
    over = [(a["type"], b["type"]) for i, a in enumerate(nodes) for b in nodes[i + 1:]
            if _overlap(rects[a["id"]], rects[b["id"]])]
    assert not over, over
    groups = [g["bounding"] for g in wf["groups"]]
    assert len(groups) >= 3
    for n in nodes:  # each node sits in exactly one group
        homes = [g for g in groups if _inside(rects[n["id"]], g)]
        assert len(homes) == 1, (n["type"], len(homes))
    assert not [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:] if _overlap(a, b)]
    for n in nodes:  # room for what the frontends draw: never smaller than they would make it
        if n["type"] != "Note":
            assert n["size"][1] >= W.MIN_H[n["type"]] + W.RESULT_ROOM.get(n["type"], 0), n["type"]
    # the opening view: readable zoom, and the note's group on a 1920×1080 screen
    ds = wf["extra"]["ds"]
    assert W.MIN_SCALE <= ds["scale"] <= 1.0
    g = wf["groups"][0]
    assert g["title"].startswith("Read me")
    x, y, w, h = g["bounding"]
    sx0, sy0 = (x + ds["offset"][0]) * ds["scale"], (y + ds["offset"][1]) * ds["scale"]
    sx1, sy1 = (x + w + ds["offset"][0]) * ds["scale"], (y + 60 + ds["offset"][1]) * ds["scale"]
    assert 0 <= sx0 and sx1 <= 1920 and 0 <= sy0 and sy1 <= 1080, (sx0, sy0, sx1, sy1)


@pytest.mark.parametrize("name", sorted(B.SPECS))
def test_files_are_what_the_builder_writes(name):
    """Positions, sizes, groups, view and note in the file are the builder's current ones (re-run
    ``scripts/build_workflows.py`` after changing a spec, the layout or a note)."""
    wf = _load(H.workflow_path(name))
    spec = B.SPECS[name]
    title, _description, note = NOTES[name]
    lay = W.layout(spec["nodes"], spec["links"], note, title)
    by_id = {n["id"]: n for n in wf["nodes"]}
    for n in spec["nodes"]:
        assert by_id[n["id"]]["type"] == n["type"]
        assert by_id[n["id"]]["pos"] == lay["pos"][n["id"]] and by_id[n["id"]]["size"] == lay["size"][n["id"]]
    assert by_id[B.NOTE_ID]["widgets_values"] == [note]
    assert wf["groups"] == lay["groups"] and wf["extra"]["ds"] == lay["ds"]


def test_joint_samplers_use_ksampler_denoise():
    """Joint KSampler's denoise is KSampler's (1.0 = from noise); the refinement workflow sets its strength."""
    seen = {}
    for p in WORKFLOWS:
        for n in _load(p)["nodes"]:
            if n["type"] == "JDJointKSampler":
                seen[H.workflow_id(p)] = n["widgets_values"][-1]
    assert seen and all(v > 0 for v in seen.values()), seen
    assert seen["jointnet_depth_refinement"] == 0.4 and seen["jointnet_text_to_rgbd"] == 1.0


def test_layout_rejects_an_unknown_node_type():
    with pytest.raises(KeyError, match="MIN_H|STAGES"):
        W.layout([{"id": 1, "type": "SomeOtherPacksNode", "widgets": {}}], [], "note")
