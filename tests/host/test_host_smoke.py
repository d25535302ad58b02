"""The in-process host works with ComfyUI's built-in nodes only (independent of this pack's nodes)."""
import pytest
import torch

from comfy_server import txt2img_prompt


def test_tiny_txt2img_through_run_graph(comfy_host):
    hist = comfy_host.run_graph(txt2img_prompt(comfy_host.ckpt_name, size=256, prefix="host_smoke"))
    (image,) = comfy_host.node_output("6")  # VAEDecode
    assert tuple(image.shape) == (1, 256, 256, 3)
    assert torch.isfinite(image).all()
    saved = hist["outputs"]["7"]["images"][0]
    assert (comfy_host.base / "output" / saved["subfolder"] / saved["filename"]).is_file()


def test_validation_failure_is_reported(comfy_host):
    prompt = txt2img_prompt("no_such_model.safetensors")
    with pytest.raises(AssertionError, match="no_such_model.safetensors"):
        comfy_host.run_graph(prompt)
