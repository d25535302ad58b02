"""example_workflows/: the UI files agree with their API twins under the live node definitions,
and every API twin runs on the host."""

import json
from pathlib import Path

import pytest
from run_demo import scale_size  # scripts/ is on sys.path (tests/conftest.py)

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
NAMES = sorted(p.stem for p in EXAMPLES.glob("*.json"))
IN_PROCESS = [n for n in NAMES if n != "rcca_live_drawing"]  # live streams to a browser: tests/server runs it
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# the demo checkpoint names of the Flux / SD3 workflows -> the tiny random ones comfy_host writes
TINY_DIT = {"rcca_demo_random_flux.safetensors": "tiny_flux.safetensors",
            "rcca_demo_random_sd3.safetensors": "tiny_sd3.safetensors"}


def ui_to_api(ui: dict, classes: dict) -> dict:
    """What the frontend's graphToPrompt does for a plain graph: widgets by input order, links by slot."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        spec = classes[n["type"]].INPUT_TYPES()
        inputs, values = {}, list(n["widgets_values"])
        for section in ("required", "optional"):
            for name, (typ, *rest) in spec.get(section, {}).items():
                typ = "COMBO" if isinstance(typ, list) else typ
                if typ in WIDGET_TYPES:
                    inputs[name] = values.pop(0)
                    if (rest[0] if rest else {}).get("control_after_generate"):
                        values.pop(0)
        assert not values, f"node {n['id']} ({n['type']}): {len(values)} widget values too many"
        for slot in n["inputs"]:
            if slot.get("link") is not None:
                _, src, src_slot, dst, _, _ = links[slot["link"]]
                assert dst == n["id"]
                inputs[slot["name"]] = [str(src), src_slot]
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


def test_examples_exist():
    assert {"rcca_regions_lcm", "rcca_regions_euler", "rcca_stream_drawing", "rcca_live_drawing",
            "rcca_regions_flux", "rcca_regions_sd3", "rcca_regional_lora"} <= set(NAMES)
    for name in NAMES:
        assert (EXAMPLES / "api" / f"{name}.json").is_file(), f"{name}: no API twin"


@pytest.mark.parametrize("name, family", [("rcca_regions_flux", "flux"), ("rcca_regions_sd3", "sd3")])
def test_dit_workflows_follow_the_family_templates(name, family):
    """Wired like ComfyUI's flux_dev_checkpoint_example / sd3.5_simple_example, patch on every joint block."""
    api = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
    by_type = {n["class_type"]: n["inputs"] for n in api.values()}
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == f"rcca_demo_random_{family}.safetensors"
    assert by_type["EmptySD3LatentImage"] and "EmptyLatentImage" not in by_type
    patch, ks = by_type["RCCAAttentionPatch"], by_type["KSampler"]
    assert patch["blocks"] == "all" and patch["self_attention_until"] == 0.0 and patch["region_text"] == "own region"
    assert ks["model"] == [next(k for k, n in api.items() if n["class_type"] == "RCCAAttentionPatch"), 0]
    if family == "flux":
        guidance = next(k for k, n in api.items() if n["class_type"] == "FluxGuidance")
        assert api[guidance]["inputs"]["guidance"] == 3.5 and ks["positive"] == [guidance, 0]
        assert api[guidance]["inputs"]["conditioning"][1] == 1  # the palette's CONDITIONING output
        assert (ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["steps"]) == (1.0, "euler", "simple", 20)
        assert api[ks["negative"][0]]["inputs"]["text"] == ""
    else:
        assert (ks["cfg"], ks["sampler_name"], ks["scheduler"], ks["steps"]) == (4.5, "euler", "sgm_uniform", 28)
        assert api[ks["negative"][0]]["inputs"]["text"] == "blurry, low quality"
        assert "FluxGuidance" not in by_type


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_its_api_twin(comfy_host, name):
    ui = json.loads((EXAMPLES / f"{name}.json").read_text())
    api = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
    assert ui_to_api(ui, comfy_host.nodes.NODE_CLASS_MAPPINGS) == api


@pytest.mark.parametrize("name", IN_PROCESS)
def test_api_workflow_runs(comfy_host, name):
    api = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
    demo_ckpt = api["1"]["inputs"]["ckpt_name"]
    api["1"]["inputs"]["ckpt_name"] = TINY_DIT.get(demo_ckpt, comfy_host.ckpt_name)
    if demo_ckpt in TINY_DIT:
        scale_size(api, 64)  # 1024 px -> 64 (masks, palette and latent together)
    region_loras = [n["inputs"]["lora_name"] for n in api.values() if n["class_type"] == "RCCARegionLoRA"]
    if region_loras:  # the demo's random LoRA names, built for the tiny checkpoint
        comfy_host.random_loras(sorted(set(region_loras)))
    for node in api.values():  # 512 px and 20 steps are slow on 2 CPU cores; the graph is what is tested
        if node["class_type"] in ("KSampler", "BasicScheduler"):
            node["inputs"]["steps"] = min(node["inputs"]["steps"], 3)
        if node["class_type"] == "RCDLatentOptimizer":
            node["inputs"].update(t_f=min(node["inputs"]["t_f"], 2), t_a=min(node["inputs"]["t_a"], 1))
    result = comfy_host.run_graph(api)
    saved = [img for out in result["outputs"].values() for img in out.get("images", [])]
    assert saved and saved[0]["filename"].startswith(("rcca_palette", "rcca_stream", "rcca_regional_lora"))
    image = comfy_host.base / "output" / saved[0].get("subfolder", "") / saved[0]["filename"]
    assert image.stat().st_size > 0
    if demo_ckpt in TINY_DIT:  # random weights: noise, but finite (a NaN would save as black)
        import torch

        latent = comfy_host.node_output("13")[0]["samples"]
        decoded = comfy_host.node_output("14")[0]
        assert latent.shape == (1, 16, 8, 8) and torch.isfinite(latent).all()
        assert decoded.shape == (1, 64, 64, 3) and torch.isfinite(decoded).all()
