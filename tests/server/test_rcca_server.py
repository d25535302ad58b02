"""The pack on an unmodified ComfyUI server, driven over its HTTP API."""

import json
from pathlib import Path

import pytest
from comfy_server import ComfyServerError
from run_demo import scale_size  # scripts/ is on sys.path (conftest.py)

PACK = Path(__file__).resolve().parents[2]
PACK_NODES = {
    "RCCARegionalPromptPalette": ("Regional Prompt Palette", {"clip", "background", "width", "height", "regions", "regions_state"}),
    "RCCAAddRegion": ("Add Region", {"mask", "prompt", "strength", "negative", "name", "color", "regions", "weight",
                                     "conditioning", "lora"}),
    "RCCARegionLoRA": ("Region LoRA", {"lora_name", "strength", "lora"}),
    "RCCAMaskPyramid": ("Mask Pyramid", {"palette", "mode", "latent", "levels"}),
    "RCCAAttentionPatch": ("RCCA Attention Patch", {"model", "palette", "pyramid", "mode", "start_percent", "end_percent", "blocks",
                                                     "self_attention_until", "region_text"}),
    "RCCAStreamBatchLCMSampler": ("Stream Batch LCM Sampler", {
        "model", "positive", "negative", "latent_image", "timesteps", "schedule_steps", "seed", "region_mode", "cfg_mode",
        "cfg", "compile", "decode", "noise", "strength", "palette", "timeline", "vae", "semantic_draw", "image", "mask"}),
    "RCCALiveStream": ("Live Stream", {
        "model", "clip", "positive", "negative", "palette", "timesteps", "schedule_steps", "seed", "region_mode", "cfg_mode",
        "cfg", "decode", "idle_timeout", "jpeg_quality", "noise", "strength", "vae", "image", "mask"}),
    "RCCAPaletteTimeline": ("Palette Timeline", {"palette", "frames", "timeline"}),
    "RCCASemanticDrawOptions": ("SemanticDraw Options", {"bootstrap_steps", "mask_std", "mask_strength", "mask_type", "cover_alpha"}),
}


def test_object_info_lists_every_pack_node_with_its_inputs(comfy_server):
    info = comfy_server.get_json("/object_info")
    for node_id, (display, inputs) in PACK_NODES.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        entry = info[node_id]
        assert entry["display_name"] == display
        assert entry["category"] == "conditioning/rcca_palette"
        listed = set(entry["input"].get("required", {})) | set(entry["input"].get("optional", {}))
        assert listed == inputs
    assert info["RCCARegionalPromptPalette"]["output"] == ["RCCA_PALETTE", "CONDITIONING", "MASK"]


def test_example_api_workflow_succeeds_over_http(comfy_server):
    prompt = json.loads((PACK / "example_workflows" / "api" / "rcca_regions_lcm.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = comfy_server.ckpt_name
    prompt["13"]["inputs"]["steps"] = 2  # 512 px on 2 CPU cores; the graph is what is tested
    entry = comfy_server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success"
    images = comfy_server.outputs_images(entry)
    assert images and images[0].name.startswith("rcca_palette") and images[0].stat().st_size > 0


def test_regional_lora_api_workflow_succeeds_over_http(comfy_server):
    """Two regions, each with its own LoRA (random files for the tiny checkpoint), one KSampler pass."""
    prompt = json.loads((PACK / "example_workflows" / "api" / "rcca_regional_lora.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = comfy_server.ckpt_name
    prompt["13"]["inputs"]["steps"] = 2
    entry = comfy_server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success"
    images = comfy_server.outputs_images(entry)
    assert images and images[0].name.startswith("rcca_regional_lora") and images[0].stat().st_size > 0


@pytest.mark.parametrize("name, family", [("rcca_regions_flux", "flux"), ("rcca_regions_sd3", "sd3")])
def test_dit_example_api_workflow_succeeds_over_http(comfy_server, name, family):
    """The Flux / SD3 API twins as the frontend would queue them, on the tiny random checkpoints
    (64 px instead of 1024, 2 steps): a finite, non-blank image comes back."""
    import numpy as np
    from PIL import Image

    prompt = json.loads((PACK / "example_workflows" / "api" / f"{name}.json").read_text())
    assert prompt["1"]["inputs"]["ckpt_name"] == f"rcca_demo_random_{family}.safetensors"
    prompt["1"]["inputs"]["ckpt_name"] = comfy_server.flux_ckpt_name if family == "flux" else comfy_server.sd3_ckpt_name
    scale_size(prompt, 64)  # masks, palette and latent together
    prompt["13"]["inputs"]["steps"] = 2
    log_before = comfy_server.log_path.read_text(errors="replace")
    entry = comfy_server.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success"
    images = comfy_server.outputs_images(entry)
    assert images and images[0].name.startswith(f"rcca_palette_{family}")
    pixels = np.asarray(Image.open(images[0]))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0  # random weights: noise, not blank
    # SaveImage casts NaN / inf to uint8 with numpy's "invalid value encountered in cast" warning
    assert "invalid value encountered" not in comfy_server.log_path.read_text(errors="replace")[len(log_before):]


def test_stream_workflow_succeeds_over_http_with_one_image_per_frame(comfy_server):
    prompt = json.loads((PACK / "example_workflows" / "api" / "rcca_stream_drawing.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = comfy_server.ckpt_name
    entry = comfy_server.run(prompt, timeout=300)
    images = comfy_server.outputs_images(entry)
    assert len(images) == prompt["21"]["inputs"]["batch_size"] == 6
    assert all(p.name.startswith("rcca_stream") and p.stat().st_size > 0 for p in images)


def test_bad_palette_fails_with_the_packs_message(comfy_server):
    prompt = json.loads((PACK / "example_workflows" / "api" / "rcca_regions_lcm.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = comfy_server.ckpt_name
    prompt["7"]["inputs"]["prompt"] = "  "
    with pytest.raises(ComfyServerError, match="prompt is empty"):
        comfy_server.run(prompt, timeout=120)


def test_extension_javascript_is_served(comfy_server):
    status, body = comfy_server.get("/extensions/rcca-palette/rcca_palette.js")
    assert status == 200 and b"registerExtension" in body
    listed = comfy_server.get_json("/extensions")
    assert "/extensions/rcca-palette/rcca_palette.js" in listed


def test_example_workflows_are_listed_as_templates(comfy_server):
    templates = comfy_server.get_json("/workflow_templates")
    assert {"rcca_regions_lcm", "rcca_regions_euler", "rcca_stream_drawing", "rcca_regions_flux",
            "rcca_regions_sd3"} <= set(templates.get("rcca-palette", []))
