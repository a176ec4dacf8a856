"""The pack inside a real ComfyUI: import, node listing, every shipped workflow, adapter parity."""
import ast
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import H, ROOT, run_probe

WORKFLOWS = H.workflows()


def pack_node_keys(optional: bool = False) -> set[str]:
    """Node keys declared by every capability module (read statically, without importing ComfyUI);
    with ``optional`` also the nodes registered only where ComfyUI has what they need (``OPTIONAL_NODES``)."""
    init = ast.parse((ROOT / "nodes" / "__init__.py").read_text())
    caps = next(ast.literal_eval(n.value) for n in ast.walk(init)
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "CAPABILITIES")
    keys = set()
    for mod in caps:
        tree = ast.parse((ROOT / "nodes" / f"{mod}.py").read_text())
        for n in ast.walk(tree):
            names = ("NODE_CLASS_MAPPINGS", "OPTIONAL_NODES") if optional else ("NODE_CLASS_MAPPINGS",)
            if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") in names:
                keys |= {k.value for k in n.value.keys}
    return keys


def test_pack_imports_without_failure(server):
    log = server.log()
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if H.PACK_NAME in l), log[-3000:]
    assert f"custom_nodes/{H.PACK_NAME}" in log  # listed among the loaded custom nodes


def test_every_node_is_listed(server):
    keys = pack_node_keys()
    assert keys, "no nodes declared"
    missing = keys - set(server.object_info)
    assert not missing, f"nodes missing from /object_info: {sorted(missing)}"
    for k in keys:
        assert server.object_info[k]["category"].startswith("JointDiffusion")


def test_web_directory_is_served(server):
    exts = server.get("/extensions")
    ours = [e for e in exts if f"/extensions/{H.PACK_NAME}/" in e]
    assert ours, exts
    for e in ours:
        assert server.get(e, raw=True)


def test_every_workflow_has_a_thumbnail_and_uses_pack_nodes():
    assert WORKFLOWS
    keys = pack_node_keys()
    used = set()
    for wf in WORKFLOWS:
        assert wf.with_suffix(".jpg").is_file(), f"{wf.name} has no same-name .jpg thumbnail"
        used |= {n["type"] for n in json.loads(wf.read_text())["nodes"]}
    assert not (keys - used), f"nodes not in any shipped workflow: {sorted(keys - used)}"


@pytest.mark.parametrize("wf", WORKFLOWS, ids=[H.workflow_id(w) for w in WORKFLOWS])
def test_workflow_runs(server, wf):
    api = H.shrink_for_tiny(H.ui_to_api(wf, server.object_info))
    entry = server.run_prompt(api)
    files = server.output_files(entry)
    assert files, f"{wf.name} produced no output"
    for f in files:
        assert f.is_file() and f.stat().st_size > 0, f
        if f.suffix == ".png":
            im = Image.open(f)
            im.load()
            assert min(im.size) >= 8


def test_broken_workflow_is_rejected(server):
    ui = json.loads(H.workflow_path("trailing_ddim_txt2img").read_text())
    bad = json.loads(json.dumps(ui))
    bad["nodes"][0]["type"] = "NoSuchNodeType"
    with pytest.raises(ValueError, match="NoSuchNodeType"):
        H.ui_to_api(bad, server.object_info)
    api = H.shrink_for_tiny(H.ui_to_api(ui, server.object_info))
    sig = next(k for k, v in api.items() if v["class_type"] == "JDTrailingDDIMSigmas")
    api[sig]["inputs"]["steps"] = 0  # below the node's minimum: ComfyUI must refuse it
    with pytest.raises(H.PromptError):
        server.run_prompt(api)


def _sampling_prompt(sampler: dict, steps: int, prefix: str, spacing="trailing", seed=7) -> dict:
    ckpt = sorted(H.referenced_checkpoints(WORKFLOWS))[0]
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red house", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "JDTrailingDDIMSigmas",
              "inputs": {"model": ["1", 0], "steps": steps, "spacing": spacing, "zero_terminal_snr": False}},
        "6": sampler,
        "7": {"class_type": "SamplerCustom",
              "inputs": {"model": ["1", 0], "add_noise": True, "noise_seed": seed, "cfg": 5.0, "positive": ["2", 0],
                         "negative": ["3", 0], "sampler": ["6", 0], "sigmas": ["5", 0], "latent_image": ["4", 0]}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }


def _latent(server, entry) -> torch.Tensor:
    f = next(p for p in server.output_files(entry) if p.suffix == ".latent")
    return load_file(str(f))["latent_tensor"]


def test_jointcore_ddim_through_comfy_adapter_equals_comfy_euler(server):
    """DDIM with η=0 is Euler in σ-space, so jointcore's DDIM driven through the ComfyUI adapter
    (CFG, conditioning and model from ComfyUI) must reproduce ComfyUI's own euler sampler."""
    ours = _latent(server, server.run_prompt(_sampling_prompt(
        {"class_type": "JDDDIMSampler", "inputs": {"eta": 0.0}}, 4, "jd_test/ddim")))
    ref = _latent(server, server.run_prompt(_sampling_prompt(
        {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}, 4, "jd_test/euler")))
    assert ours.shape == ref.shape == (1, 4, 8, 8)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, ref, rtol=1e-3, atol=1e-3)
    # η > 0 adds noise: a different sample, same seed → same result
    e1 = _latent(server, server.run_prompt(_sampling_prompt(
        {"class_type": "JDDDIMSampler", "inputs": {"eta": 1.0}}, 4, "jd_test/ddim_eta_a")))
    e2 = _latent(server, server.run_prompt(_sampling_prompt(
        {"class_type": "JDDDIMSampler", "inputs": {"eta": 1.0}}, 4, "jd_test/ddim_eta_b")))
    torch.testing.assert_close(e1, e2)
    assert (e1 - ours).abs().max() > 1e-3


def test_trailing_vs_leading_one_step_differ(server):
    a = _latent(server, server.run_prompt(_sampling_prompt(
        {"class_type": "JDDDIMSampler", "inputs": {"eta": 0.0}}, 1, "jd_test/one_trailing")))
    b = _latent(server, server.run_prompt(_sampling_prompt(
        {"class_type": "JDDDIMSampler", "inputs": {"eta": 0.0}}, 1, "jd_test/one_leading", spacing="leading")))
    assert (a - b).abs().max() > 1e-2


def test_sigmas_work_with_sampler_custom_advanced(server):
    if "SamplerCustomAdvanced" not in server.object_info:
        pytest.skip("this ComfyUI predates SamplerCustomAdvanced (added April 2024); SamplerCustom is tested")
    p = _sampling_prompt({"class_type": "JDDDIMSampler", "inputs": {"eta": 0.0}}, 4, "jd_test/adv")
    p["9"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 7}}
    p["10"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 5.0}}
    p["7"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["9", 0], "guider": ["10", 0],
                                                               "sampler": ["6", 0], "sigmas": ["5", 0],
                                                               "latent_image": ["4", 0]}}
    adv = _latent(server, server.run_prompt(p))
    ref = _latent(server, server.run_prompt(_sampling_prompt(
        {"class_type": "JDDDIMSampler", "inputs": {"eta": 0.0}}, 4, "jd_test/adv_ref")))
    torch.testing.assert_close(adv, ref, rtol=1e-3, atol=1e-3)


def test_sigma_conversions_match_comfyui(comfy_dir):
    r = run_probe(comfy_dir, "sigmas")
    assert r["max_sigma_table_rel_err"] < 1e-6
    assert r["max_sigma_interp_rel_err"] < 1e-6
    assert r["timestep_mismatches"] == 0
    assert r["node_vs_direct_rel_err"] < 1e-6
    for n in (4, 10, 20, 50):
        assert r[f"simple_vs_trailing_{n}"] < 1e-3
    assert r["timestep_of_first_sigma_1step"] == 999.0
    assert r["timestep_of_first_sigma_1step_leading"] == 1.0
    assert abs(r["zsnr_first_sigma"] - 4518.76) < 0.1
    if "zsnr_rel_err_vs_comfy" in r:
        assert r["zsnr_rel_err_vs_comfy"] < 1e-4


def test_family_checkpoint_loads_in_comfyui_as_sd15_and_matches_diffusers(comfy_dir):
    """The default family's single-file checkpoint (jointcore.family.assemble) through ComfyUI's own loader:
    detected as SD 1.5 with a TAESD VAE; its UNet, CLIP text features and VAE equal the diffusers models
    they were assembled from (so what the family trains through diffusers is what ComfyUI runs)."""
    r = run_probe(comfy_dir, "family")
    assert r["model_config"] == "SD15" and r["vae_class"] == "TAESD", r
    assert r["unet_max_abs_diff"] < 1e-4 * max(1.0, r["unet_scale"]), r
    assert r["clip_shape"][1] == 77 and r["clip_max_abs_diff"] < 1e-4, r
    assert r["vae_latent_max_abs_diff"] < 1e-5 and r["vae_decode_max_abs_diff"] < 1e-5, r


def test_comfyui_owns_every_model_the_pack_loads(comfy_dir):
    """JointNet, the predictor, Diff-2-in-1 and the LPIPS network are ComfyUI ModelPatchers: after a run the model
    is in ComfyUI's loaded-model list with its real size, a second run does not load it again, ComfyUI's
    unload_all_models() (what /free and "Unload models" call) releases it, and the next run loads it again."""
    r = run_probe(comfy_dir, "models")
    for name in ("jointnet", "predictor", "diff2in1", "lpips"):
        m = r[name]
        assert m["patcher_class"] == "ModelPatcher" and m["held_class"] == "PackModels", (name, m)
        assert m["loaded_after_run"] and m["size"] == m["module_bytes"] > 0, (name, m)
        assert m["loads_first_run"] == 1 and m["loads_second_run"] == 0 and m["same_patcher_reused"], (name, m)
        assert m["weights_not_copied"], (name, m)
        assert not m["loaded_after_unload_all"], (name, m)
        assert m["loads_after_unload_run"] == 1 and m["loaded_again"], (name, m)


def test_importing_the_pack_changes_no_comfy_global(comfy_dir):
    r = run_probe(comfy_dir, "globals")
    assert r["n_nodes"] >= 2
    assert r["changed"] == [], r
    assert r["folders_changed"] == [], r  # only new model folders of our own may appear
    assert set(r["folders_added"]) <= _allowed_model_folders(), r


def test_missing_optional_dependencies_do_not_break_loading(comfy_dir):
    """With diffusers, trimesh, lpips, kornia and accelerate unavailable the pack still imports; every
    node is either registered or reported with the package to install."""
    r = run_probe(comfy_dir, "optional", env={"JD_BLOCK": "diffusers,trimesh,lpips,kornia,accelerate"})
    assert "JDTrailingDDIMSigmas" in r["nodes"]
    for cap, why in r["unavailable"].items():
        assert "pip install" in why, (cap, why)
        assert any(cap in line and "pip install" in line.lower() for line in r["log"]), r["log"]
    declared = pack_node_keys(optional=True)
    assert set(r["nodes"]) <= declared


def _allowed_model_folders() -> set[str]:
    import re

    names = set()
    for f in (ROOT / "nodes").glob("*.py"):
        names |= set(re.findall(r'register_model_folder\(\s*"([^"]+)"', f.read_text()))
        names |= set(re.findall(r'^[A-Z_]*FOLDER\s*=\s*"([^"]+)"', f.read_text(), re.M))
    return names


def test_core_mesh_output_where_comfyui_has_one(server):
    """Where ComfyUI has a core MESH type (SaveGLB), the pack offers RGBD → MESH and SaveGLB writes it."""
    if "SaveGLB" not in server.object_info:
        assert "JDRGBDToComfyMesh" not in server.object_info
        pytest.skip("this ComfyUI has no core MESH type / SaveGLB (added in 2025); the file exporter is tested")
    assert "JDRGBDToComfyMesh" in server.object_info
    import trimesh

    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": H.EXAMPLE_IMAGE}},
        "2": {"class_type": "ImageScale", "inputs": {"image": ["1", 0], "upscale_method": "bilinear", "width": 32,
                                                     "height": 24, "crop": "disabled"}},
        "3": {"class_type": "JDRGBDToComfyMesh",
              "inputs": {"image": ["2", 0], "depth": ["2", 0], "projection": "perspective", "fov_deg": 60.0,
                         "horizontal_span_deg": 180.0, "depth_kind": "depth", "near": 1.0, "far": 3.0,
                         "discontinuity_threshold": 0.0, "downsample": 1}},
        "4": {"class_type": "SaveGLB", "inputs": {"mesh": ["3", 0], "filename_prefix": "jd_test/core_mesh"}},
    }
    files = [f for f in server.output_files(server.run_prompt(prompt)) if f.suffix == ".glb"]
    assert len(files) == 1
    m = trimesh.load(files[0], force="mesh")
    assert len(m.vertices) == 32 * 24 and len(m.faces) == 2 * 31 * 23


@pytest.mark.parametrize("wf,node,steps_key", [
    ("jointnet_text_to_rgbd", "JDJointKSampler", "steps"),
    ("trailing_ddim_txt2img", "JDTrailingDDIMSigmas", "steps"),
])
def test_long_sampling_is_interruptible(server, wf, node, steps_key):
    """Cancel (POST /interrupt) stops the pack's sampling loops mid-way."""
    import time
    import uuid

    api = H.shrink_for_tiny(H.ui_to_api(H.workflow_path(wf), server.object_info))
    k = next(i for i, v in api.items() if v["class_type"] == node)
    api[k]["inputs"][steps_key] = 1000
    for v in api.values():  # a fresh seed so ComfyUI's cache cannot answer
        for s in ("seed", "noise_seed"):
            if s in v["inputs"]:
                v["inputs"][s] = uuid.uuid4().int % 2**31
    pid = server.post("/prompt", {"prompt": api, "client_id": str(uuid.uuid4())})["prompt_id"]
    t0 = time.time()
    while not server.get("/queue")["queue_running"] and time.time() - t0 < 60:
        time.sleep(0.1)
    time.sleep(2.0)  # let the sampler get going
    server.post("/interrupt", {})
    while time.time() - t0 < 300:
        h = server.get(f"/history/{pid}")
        if pid in h and (h[pid].get("status", {}).get("completed") is not None or h[pid].get("status")):
            break
        time.sleep(0.25)
    st = h[pid]["status"]
    summary = [(m[0], m[1].get("exception_type"), m[1].get("exception_message")) for m in st.get("messages", [])]
    assert st.get("status_str") == "error", summary
    assert any(m[0] == "execution_interrupted" for m in st.get("messages", [])), summary


def test_family_runs_use_the_worlds_prompts_and_a_heldout_scene(server, tmp_path):
    """With the trained family, command 1 feeds every workflow a held-out world scene and its caption (the
    only language the family knows); negative prompts become the empty prompt it was trained with."""
    from jointcore.data import world as W

    caption = H.family_example(tmp_path / "example.png")
    im = Image.open(tmp_path / "example.png")
    assert im.size == (512, 384) and " room" in caption
    scene = W.sample_scenes([W.HELDOUT_SEEDS.start + H.FAMILY_EXAMPLE_INDEX])[0]
    assert caption == W.caption(scene, W.default_camera([scene], "perspective", 384, 512))
    seen_negative = False
    for wf in WORKFLOWS:
        api = H.family_prompts(H.shrink_for_tiny(H.ui_to_api(wf, server.object_info)), caption)
        negative = {str(v[0]) for n in api.values() for k, v in n["inputs"].items() if k == "negative"}
        for nid, node in api.items():
            if node["class_type"] == "CLIPTextEncode":
                assert node["inputs"]["text"] == ("" if nid in negative else caption), (wf.name, nid)
                seen_negative |= nid in negative
            for k in ("resolution", "processing_resolution"):
                if isinstance(node["inputs"].get(k), int):
                    assert node["inputs"][k] <= H.FAMILY_RESOLUTION, (wf.name, k)
    assert seen_negative


@pytest.mark.parametrize("wf,says", [("predictor_depth_to_mesh", "says depth (near = dark)"),
                                     ("jointnet_rgbd_panorama_to_mesh", "says disparity (near = bright)")])
def test_depth_convention_reaches_the_mesh_node_through_comfyui(server, wf, says):
    """Through ComfyUI's executor, RGBD to Mesh with depth_kind auto reads the convention that Predict Depth /
    Normals and Joint Decode marked on the depth picture wired into it."""
    import uuid

    api = H.shrink_for_tiny(H.ui_to_api(H.workflow_path(wf), server.object_info))
    k = next(i for i, v in api.items() if v["class_type"] == "JDRGBDToMesh")
    api[k]["inputs"]["depth_kind"] = "auto"
    api[k]["inputs"]["filename_prefix"] = f"jd_test/convention_{uuid.uuid4().hex[:8]}"
    before = len(server.log())
    server.run_prompt(api)
    assert says in server.log()[before:], server.log()[before:][-3000:]
