"""The stock ComfyUI server runs built-in graphs on the tiny checkpoint over HTTP."""
from comfy_server import txt2img_prompt


def test_object_info_has_ksampler(comfy_server):
    info = comfy_server.get_json("/object_info")
    assert "KSampler" in info
    assert comfy_server.ckpt_name in info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]


def test_builtin_txt2img_over_http_writes_png(comfy_server):
    entry = comfy_server.run(txt2img_prompt(comfy_server.ckpt_name, size=256, prefix="server_smoke"), timeout=180)
    files = comfy_server.outputs_images(entry)
    assert len(files) == 1 and files[0].suffix == ".png"
    assert files[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
