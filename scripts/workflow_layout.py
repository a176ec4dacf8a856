"""Canvas layout of the shipped workflows: stages left to right, one group per stage, a note first.

Every node belongs to a stage by its type (models, prompt, image in, depth & normals, latent, sampling, decode,
save & view). A workflow's stages run left to right in the order the data flows (loaders first, outputs last);
inside a stage the nodes are stacked in the order they were declared, in sub-columns when a stage is taller
than ``MAX_COLUMN``. Each stage is a LiteGraph group; the workflow's note (a ``Note`` node) opens the row.

Node sizes are written into the workflow. Both frontends only ever grow a node to its ``computeSize()`` on
load, so every size here is at least that (measured in the March-2024 frontend and in frontend 1.35.9 with
ComfyUI v0.8, the larger of the two, plus the room pictures take after a run: a node showing images or a
viewer gets that room up front, so nothing moves or overlaps when the results arrive).

The view the workflow opens with (``extra.ds``) shows the note and as much of the graph as fits a 1920×1080
window at a zoom where the frontends still draw text (never below ``MIN_SCALE``).
"""
from __future__ import annotations

from collections import defaultdict

# key, group title, colour (LiteGraph group colours), node types
STAGES = [
    ("models", "Models", "#3f789e",
     {"CheckpointLoaderSimple", "JDJointNetLoader", "JDPredictorLoader", "JDDiff2in1Loader"}),
    ("prompt", "Prompt", "#8A8", {"CLIPTextEncode"}),
    ("image", "Input picture", "#b58b2a",
     {"LoadImage", "ImageScale", "RepeatImageBatch", "SolidMask", "MaskComposite"}),
    ("depth", "Depth & normals", "#a1309b",
     {"JDDepthNormalPredict", "JDDepthColorize", "JDNormalsVisualize", "JDDiff2in1Predict", "JDDiff2in1CreatePairs",
      "JDPanoramaDepth", "JDDepthConvention"}),
    ("latent", "Latent", "#b06634",
     {"EmptyLatentImage", "JDJointEmptyLatent", "JDJointEncode", "VAEEncode", "SetLatentNoiseMask"}),
    ("sampling", "Sampling", "#88A",
     {"JDTrailingDDIMSigmas", "BasicScheduler", "JDDDIMSampler", "JDTiledDiffusionSampler",
      "JDMTDiffusionRestoreSampler", "SamplerCustom", "JDJointKSampler", "JDJointPanoramaSampler"}),
    ("decode", "Decode", "#b06634", {"VAEDecode", "JDTiledVAEDecode", "JDJointDecode"}),
    ("output", "Save & view", "#3f789e",
     {"SaveImage", "PreviewImage", "JDSaveRawPrediction", "JDPanoramaPreview", "JDRGBDToMesh"}),
]
STAGE_OF = {t: key for key, _, _, types in STAGES for t in types}
STAGE_RANK = {key: i for i, (key, *_rest) in enumerate(STAGES)}

NODE_W = 330  # every ordinary node: wider than any of the pack's and core's computeSize() widths used here
# the larger computeSize() height of the two frontends (see the module docstring), rounded up
MIN_H = {
    "BasicScheduler": 106, "CLIPTextEncode": 88, "CheckpointLoaderSimple": 98, "EmptyLatentImage": 106,
    "ImageScale": 130, "JDDDIMSampler": 58, "JDDepthColorize": 82, "JDDepthConvention": 82,
    "JDDepthNormalPredict": 382, "JDDiff2in1CreatePairs": 296, "JDDiff2in1Loader": 82, "JDDiff2in1Predict": 78,
    "JDJointDecode": 78, "JDJointEmptyLatent": 106, "JDJointEncode": 98, "JDJointKSampler": 326,
    "JDJointNetLoader": 106, "JDJointPanoramaSampler": 358, "JDMTDiffusionRestoreSampler": 58,
    "JDNormalsVisualize": 106, "JDPanoramaDepth": 426, "JDPanoramaPreview": 330, "JDPredictorLoader": 106,
    "JDRGBDToMesh": 366, "JDSaveRawPrediction": 82, "JDTiledDiffusionSampler": 322, "JDTiledVAEDecode": 126,
    "JDTrailingDDIMSigmas": 130, "LoadImage": 102, "MaskComposite": 126, "PreviewImage": 26,
    "RepeatImageBatch": 58, "SamplerCustom": 230, "SaveImage": 58, "SetLatentNoiseMask": 46, "SolidMask": 106,
    "VAEDecode": 46, "VAEEncode": 46,
}
# room a node's pictures or viewer take after a run (LoadImage: as soon as a picture is chosen)
RESULT_ROOM = {"LoadImage": 280, "SaveImage": 280, "PreviewImage": 280, "JDPanoramaPreview": 280,
               "JDRGBDToMesh": 320, "JDSaveRawPrediction": 280}
WIDE = {"JDPanoramaPreview": 480, "CLIPTextEncode": 400, "JDRGBDToMesh": 360}
EXTRA_H = {"CLIPTextEncode": 70}  # a multi-line prompt box a little taller than its minimum

TITLE_H = 30        # LiteGraph draws a node's title bar above its position
GAP_Y = 24          # between stacked nodes (title bar excluded)
GAP_X = 40          # between sub-columns of a stage
GROUP_PAD = 16      # group border to its nodes
GROUP_HEAD = 44     # the group's title bar
GROUP_GAP = 60      # between groups
MAX_COLUMN = 1150   # a stage taller than this continues in a sub-column
NOTE_W = 480
ORIGIN = (40, 40)

# the window the view is fitted to: 1920×1080 less the frontends' menu bars and side bars, in screen pixels
VIEW_X0, VIEW_Y0, VIEW_W, VIEW_H = 70, 100, 1830, 960
MIN_SCALE = 0.85    # widget text is 12 px at zoom 1 (10 px in notes); the frontends stop drawing it below 0.6
MAX_SCALE = 1.0


def node_size(node_type: str) -> list[int]:
    if node_type not in MIN_H:
        raise KeyError(f"no layout size for node type {node_type}: measure its computeSize() and add it to MIN_H")
    return [WIDE.get(node_type, NODE_W), MIN_H[node_type] + RESULT_ROOM.get(node_type, 0) + EXTRA_H.get(node_type, 0)]


def note_size(text: str) -> list[int]:
    """A Note tall enough for ``text`` without scrolling (the frontends' 10 px monospace: ≈ 6.1 px per character,
    13 px per line, at zoom 1)."""
    per_line = (NOTE_W - 30) // 6.1
    lines = sum(max(1, -(-len(par) // per_line)) for par in text.split("\n"))
    return [NOTE_W, int(lines * 13 + 50)]


def _depths(ids: list[int], links: list[tuple]) -> dict[int, int]:
    """Longest path from a source, per node."""
    preds = defaultdict(set)
    for src, _so, dst, _di in links:
        preds[dst].add(src)
    depth: dict[int, int] = {}

    def d(i, seen=()):
        if i not in depth:
            if i in seen:
                raise ValueError(f"cycle through node {i}")
            depth[i] = 1 + max((d(p, seen + (i,)) for p in preds[i]), default=-1)
        return depth[i]

    for i in ids:
        d(i)
    return depth


def stage_order(nodes: list[dict], links: list[tuple]) -> list[tuple[str, list[dict]]]:
    """The workflow's stages in the order the data flows, each with its nodes in declaration order: loaders
    first, outputs last, the others by the deepest of their nodes (longest path from a source), ties in the
    order of STAGES."""
    depth = _depths([n["id"] for n in nodes], links)
    by_stage: dict[str, list[dict]] = defaultdict(list)
    for n in nodes:
        if n["type"] not in STAGE_OF:
            raise KeyError(f"node type {n['type']} has no stage: add it to STAGES in scripts/workflow_layout.py")
        by_stage[STAGE_OF[n["type"]]].append(n)

    def key(stage):
        if stage == "models":
            return (-1, 0)
        if stage == "output":
            return (10 ** 6, 0)
        if stage == "prompt":  # right after the models (its depth is 1; an empty latent's is 0)
            return (0, 0)
        return (max(depth[m["id"]] for m in by_stage[stage]), STAGE_RANK[stage])

    return [(s, by_stage[s]) for s in sorted(by_stage, key=key)]


def _stack(members: list[dict]) -> list[list[dict]]:
    """A stage's nodes in sub-columns no taller than MAX_COLUMN."""
    cols, h = [[]], 0
    for n in members:
        nh = node_size(n["type"])[1] + TITLE_H
        if cols[-1] and h + nh > MAX_COLUMN:
            cols.append([])
            h = 0
        cols[-1].append(n)
        h += nh + GAP_Y
    return cols


def _height(cols: list[list[dict]]) -> int:
    return max(sum(node_size(n["type"])[1] + TITLE_H for n in c) + GAP_Y * (len(c) - 1) for c in cols)


def layout(nodes: list[dict], links: list[tuple], note: str, title: str = "Read me") -> dict:
    """Positions and sizes for ``nodes`` (declared as in build_workflows), the note's rectangle, the groups and
    the opening view. Consecutive small stages share a column, one group under the other.

    Returns {"pos": {id: [x, y]}, "size": {id: [w, h]}, "note": (pos, size), "groups": [...], "ds": {"scale",
    "offset"}}."""
    x0, y0 = ORIGIN
    nw, nh = note_size(note)
    note_rect = ([x0 + GROUP_PAD, y0 + GROUP_HEAD + TITLE_H], [nw, nh])
    group_style = {key: (name, colour) for key, name, colour, _ in STAGES}
    # columns of stages: a stage goes under the previous one when both fit in MAX_COLUMN together
    columns: list[list[tuple[str, list[list[dict]]]]] = []
    col_h = 0
    for stage, members in stage_order(nodes, links):
        cols = _stack(members)
        h = _height(cols) + GROUP_HEAD + 2 * GROUP_PAD
        prev = columns[-1] if columns else None
        if (prev and stage != "output" and prev[-1][0] != "models"
                and len(cols) == 1 and all(len(c) == 1 for _s, c in prev)
                and col_h + GROUP_GAP + h <= MAX_COLUMN):
            prev.append((stage, cols))
            col_h += GROUP_GAP + h
        else:
            columns.append([(stage, cols)])
            col_h = h
    pos, size, groups = {}, {}, []
    # the note in its own group, whose title (drawn large) says what the workflow is
    groups.append({"title": f"Read me · {title}", "bounding": [x0, y0, nw + 2 * GROUP_PAD, nh + TITLE_H + GROUP_HEAD
                                                                + 2 * GROUP_PAD], "color": "#a88", "font_size": 20})
    x = x0 + nw + 2 * GROUP_PAD + GROUP_GAP
    for column in columns:
        top, col_w = y0, 0
        for stage, cols in column:
            cx = x + GROUP_PAD
            widths = [max(node_size(n["type"])[0] for n in c) for c in cols]
            gw = sum(widths) + GAP_X * (len(cols) - 1) + 2 * GROUP_PAD
            col_w = max(col_w, gw)
            for c, w in zip(cols, widths):
                y = top + GROUP_HEAD + TITLE_H
                for n in c:
                    pos[n["id"]], size[n["id"]] = [cx, y], node_size(n["type"])
                    y += size[n["id"]][1] + GAP_Y + TITLE_H
                cx += w + GAP_X
            gh = _height(cols) + GROUP_HEAD + 2 * GROUP_PAD
            name, colour = group_style[stage]
            groups.append({"title": name, "bounding": [x, top, gw, gh], "color": colour, "font_size": 24})
            top += gh + GROUP_GAP
        for g in groups[-len(column):]:  # groups sharing a column share its width
            g["bounding"][2] = col_w
        x += col_w + GROUP_GAP
    right = x - GROUP_GAP
    bottom = max(g["bounding"][1] + g["bounding"][3] for g in groups)
    bw, bh = right - x0, bottom - y0
    fit = min(VIEW_W / bw, VIEW_H / bh)
    scale = max(MIN_SCALE, min(MAX_SCALE, int(fit * 1000) / 1000))
    if fit >= scale:  # it all fits: centre it
        ox = VIEW_X0 / scale + (VIEW_W / scale - bw) / 2 - x0
        oy = VIEW_Y0 / scale + (VIEW_H / scale - bh) / 2 - y0
    else:             # it does not: open on the note and the first stages, the rest to the right
        ox = VIEW_X0 / scale - x0 + 10
        oy = VIEW_Y0 / scale - y0 + 10
    return {"pos": pos, "size": size, "note": note_rect, "groups": groups,
            "ds": {"scale": scale, "offset": [round(ox, 1), round(oy, 1)]}}
