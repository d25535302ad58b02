"""Write example_workflows/: each workflow in the UI format the ComfyUI frontend loads
(example_workflows/NAME.json, listed as a template) and its API-format twin for POST /prompt
(example_workflows/api/NAME.json), both from one description below.

Widget order and output types come from the live node definitions of a ComfyUI host, so the
UI files match what the frontend expects. Run with the host's python:
    .host/venv/bin/python scripts/make_workflows.py
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

PACK = Path(__file__).resolve().parents[1]
OUT = PACK / "example_workflows"
DEMO_CKPT = "rcca_demo_random_sd15.safetensors"  # scripts/run_demo.py puts a user's checkpoint or a random one here
DEMO_CKPT_FLUX = "rcca_demo_random_flux.safetensors"  # same convention for the Flux.1 / SD3-3.5 workflows
DEMO_CKPT_SD3 = "rcca_demo_random_sd3.safetensors"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

SIZE = 512
DIT_SIZE = 1024  # Flux.1 / SD3.5 native resolution (scripts/run_demo.py scales it down for random weights)


def regions_graph(sampler: str, steps: int, cfg: float, scheduler: str, ckpt: str = DEMO_CKPT,
                  size: int = SIZE) -> dict:
    """Two regions (left: fox, right: car) over a meadow, RCCA-patched model, core KSampler."""
    return {
        "1": ("CheckpointLoaderSimple", {"ckpt_name": ckpt}, (0, 0)),
        "2": ("SolidMask", {"value": 0.0, "width": size, "height": size}, (0, 160)),
        "3": ("SolidMask", {"value": 1.0, "width": size // 2, "height": size}, (0, 300)),
        "4": ("MaskComposite", {"destination": ["2", 0], "source": ["3", 0], "x": 0, "y": 0, "operation": "add"}, (250, 160)),
        "5": ("InvertMask", {"mask": ["4", 0]}, (250, 360)),
        "6": ("RCCAAddRegion", {"mask": ["4", 0], "prompt": "a red fox sitting in the grass", "strength": 1.0,
                                "negative": "", "name": "fox", "color": "#e6194b"}, (500, 100)),
        "7": ("RCCAAddRegion", {"mask": ["5", 0], "prompt": "a blue vintage car", "strength": 1.0,
                                "negative": "", "name": "car", "color": "#4363d8", "regions": ["6", 0]}, (500, 420)),
        "8": ("RCCARegionalPromptPalette", {"clip": ["1", 1], "background": "a sunny meadow, detailed photograph",
                                            "width": size, "height": size, "regions": ["7", 0]}, (850, 100)),
        "9": ("EmptyLatentImage", {"width": size, "height": size, "batch_size": 1}, (850, 420)),
        "10": ("RCCAMaskPyramid", {"palette": ["8", 0], "mode": "area", "latent": ["9", 0], "levels": 4}, (1200, 420)),
        "11": ("RCCAAttentionPatch", {"model": ["1", 0], "palette": ["8", 0], "pyramid": ["10", 0], "mode": "soft",
                                      "start_percent": 0.0, "end_percent": 1.0, "blocks": "all"}, (1200, 100)),
        "12": ("CLIPTextEncode", {"clip": ["1", 1], "text": "blurry, low quality"}, (850, 600)),
        "13": ("KSampler", {"model": ["11", 0], "seed": 42, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                            "scheduler": scheduler, "positive": ["8", 1], "negative": ["12", 0],
                            "latent_image": ["9", 0], "denoise": 1.0}, (1550, 100)),
        "14": ("VAEDecode", {"samples": ["13", 0], "vae": ["1", 2]}, (1900, 100)),
        "15": ("SaveImage", {"images": ["14", 0], "filename_prefix": "rcca_palette"}, (2150, 100)),
    }


DEMO_LORAS = ("rcca_demo_random_lora_a.safetensors", "rcca_demo_random_lora_b.safetensors")  # run_demo.py writes them


def regional_lora_graph() -> dict:
    """regions_graph with a LoRA per region (Region LoRA -> Add Region's lora input): the fox's
    LoRA acts only on the left half, the car's only on the right, in the one KSampler pass."""
    g = regions_graph("euler", 20, 7.0, "normal")
    g["16"] = ("RCCARegionLoRA", {"lora_name": DEMO_LORAS[0], "strength": 0.8}, (250, -150))
    g["17"] = ("RCCARegionLoRA", {"lora_name": DEMO_LORAS[1], "strength": 0.8}, (250, 560))
    g["6"][1]["lora"] = ["16", 0]
    g["7"][1]["lora"] = ["17", 0]
    g["15"][1]["filename_prefix"] = "rcca_regional_lora"
    return g


def dit_regions_graph(family: str) -> dict:
    """regions_graph for Flux.1 / SD3-3.5 all-in-one checkpoints, wired like ComfyUI's own templates
    (flux_dev_checkpoint_example, sd3.5_simple_example): 16-channel EmptySD3LatentImage; the patch
    takes every joint block (blocks 'all', self_attention_until 0).
    Flux (guidance-distilled): palette background -> FluxGuidance 3.5 -> positive, cfg 1, an empty
    CLIPTextEncode as the (never evaluated) negative, euler / simple, 20 steps.
    SD3: real cfg 4.5 with a negative, euler / sgm_uniform, 28 steps; no ModelSamplingSD3 (the
    template has none: the checkpoint's own sampling shift applies)."""
    if family == "flux":
        g = regions_graph("euler", 20, 1.0, "simple", ckpt=DEMO_CKPT_FLUX, size=DIT_SIZE)
        g["12"] = ("CLIPTextEncode", {"clip": ["1", 1], "text": ""}, (850, 600))
        g["16"] = ("FluxGuidance", {"conditioning": ["8", 1], "guidance": 3.5}, (1200, 600))
        g["13"][1]["positive"] = ["16", 0]
        prefix = "rcca_palette_flux"
    elif family == "sd3":
        g = regions_graph("euler", 28, 4.5, "sgm_uniform", ckpt=DEMO_CKPT_SD3, size=DIT_SIZE)
        prefix = "rcca_palette_sd3"
    else:
        raise ValueError(family)
    g["9"] = ("EmptySD3LatentImage", {"width": DIT_SIZE, "height": DIT_SIZE, "batch_size": 1}, (850, 420))
    g["11"][1].update(blocks="all", self_attention_until=0.0, region_text="own region")
    g["15"][1]["filename_prefix"] = prefix
    return g


def stream_graph() -> dict:
    """A short drawing sequence: the fox region grows in three strokes (2 frames each) over a meadow,
    rendered by the Stream Batch LCM Sampler into 6 frames."""
    g = {
        "1": ("CheckpointLoaderSimple", {"ckpt_name": DEMO_CKPT}, (0, 0)),
        "2": ("SolidMask", {"value": 0.0, "width": SIZE, "height": SIZE}, (0, 200)),
        "20": ("CLIPTextEncode", {"clip": ["1", 1], "text": "blurry, low quality"}, (0, 900)),
        "21": ("EmptyLatentImage", {"width": SIZE, "height": SIZE, "batch_size": 6}, (1400, 600)),
        "22": ("RCCAStreamBatchLCMSampler", {
            "model": ["1", 0], "positive": ["12", 1], "negative": ["20", 0], "latent_image": ["21", 0],
            "timesteps": "0, 12, 24, 36", "schedule_steps": 50, "seed": 7, "region_mode": "rcca", "cfg_mode": "none",
            "cfg": 1.5, "compile": "eager", "decode": "auto", "noise": "per_frame", "strength": 0.6,
            "timeline": ["17", 0], "vae": ["1", 2]}, (1750, 100)),
        "23": ("SaveImage", {"images": ["22", 1], "filename_prefix": "rcca_stream"}, (2150, 100)),
    }
    previous = None
    for k, width in enumerate((SIZE // 4, SIZE // 2, 3 * SIZE // 4)):
        y = 100 + 300 * k
        stroke, mask, region, pal, step = (str(3 + k), str(6 + k), str(9 + k), str(12 + k), str(15 + k))
        g[stroke] = ("SolidMask", {"value": 1.0, "width": width, "height": SIZE}, (0, 350 + 150 * k))
        g[mask] = ("MaskComposite", {"destination": ["2", 0], "source": [stroke, 0], "x": 0, "y": 0, "operation": "add"}, (300, y))
        g[region] = ("RCCAAddRegion", {"mask": [mask, 0], "prompt": "a red fox sitting in the grass", "strength": 1.0,
                                      "negative": "", "name": "fox", "color": "#e6194b"}, (600, y))
        g[pal] = ("RCCARegionalPromptPalette", {"clip": ["1", 1], "background": "a sunny meadow, detailed photograph",
                                               "width": SIZE, "height": SIZE, "regions": [region, 0]}, (900, y))
        inputs = {"palette": [pal, 0], "frames": 2}
        if previous:
            inputs["timeline"] = [previous, 0]
        g[step] = ("RCCAPaletteTimeline", inputs, (1200, y))
        previous = step
    return dict(sorted(g.items(), key=lambda kv: int(kv[0])))


def live_graph(regions_state: str) -> dict:
    """Opens ready to paint: a palette whose canvas has two regions (prompts set, nothing painted
    yet) feeding Live Stream, which shows the first frame and then streams to the widget."""
    return {
        "1": ("CheckpointLoaderSimple", {"ckpt_name": DEMO_CKPT}, (0, 0)),
        "2": ("RCCARegionalPromptPalette", {"clip": ["1", 1], "background": "a sunny meadow, detailed photograph",
                                            "width": SIZE, "height": SIZE, "regions_state": regions_state}, (350, 0), (640, 820)),
        "3": ("CLIPTextEncode", {"clip": ["1", 1], "text": "blurry, low quality"}, (0, 300)),
        "4": ("RCCALiveStream", {"model": ["1", 0], "clip": ["1", 1], "positive": ["2", 1], "negative": ["3", 0],
                                 "palette": ["2", 0], "vae": ["1", 2], "timesteps": "0, 12, 24, 36", "schedule_steps": 50,
                                 "seed": 7, "region_mode": "rcca", "cfg_mode": "none", "cfg": 1.5, "decode": "auto",
                                 "idle_timeout": 120.0, "jpeg_quality": 80, "noise": "fixed", "strength": 0.6}, (1100, 0)),
        "5": ("PreviewImage", {"images": ["4", 0]}, (1500, 0)),
    }


def blank_drawing(classes: dict) -> str:
    """The live workflow's initial widget state: two named regions with prompts and empty masks."""
    state = next(m for k, m in sys.modules.items() if k.endswith("rcca-palette.rcca_core.palette_state"))
    palette = next(m for k, m in sys.modules.items() if k.endswith("rcca-palette.rcca_core.palette"))
    import torch

    blank = torch.zeros(SIZE, SIZE)
    regions = [palette.RegionSpec("a red fox sitting in the grass", blank, name="fox", color="#e6194b"),
               palette.RegionSpec("a blue vintage car", blank, name="car", color="#4363d8")]
    return state.encode_state(regions, SIZE, SIZE)


def rcd_graph(steps: int = 50, cfg: float = 7.5) -> dict:
    """RCD txt2img: refined subject embeddings + RCD Latent Optimizer around euler (SamplerCustomAdvanced)."""
    return {
        "1": ("CheckpointLoaderSimple", {"ckpt_name": DEMO_CKPT}, (0, 0)),
        "2": ("RCDEmbeddingRefiner", {"clip": ["1", 1], "prompt": "a black kitten and a white dog on a red couch",
                                      "subjects": "", "parser": "rules", "lambda_t": 0.5}, (350, 0)),
        "3": ("CLIPTextEncode", {"clip": ["1", 1], "text": "blurry, low quality"}, (350, 350)),
        "4": ("CFGGuider", {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "cfg": cfg}, (750, 0)),
        "5": ("KSamplerSelect", {"sampler_name": "euler"}, (750, 250)),
        "6": ("RCDLatentOptimizer", {"sampler": ["5", 0], "t_f": 25, "t_a": 15, "k": 1, "step_size": 10.0,
                                     "delta": 1.5, "distill": True}, (1050, 250)),
        "7": ("BasicScheduler", {"model": ["1", 0], "scheduler": "normal", "steps": steps, "denoise": 1.0}, (750, 600)),
        "8": ("RandomNoise", {"noise_seed": 42}, (750, 800)),
        "9": ("EmptyLatentImage", {"width": SIZE, "height": SIZE, "batch_size": 1}, (750, 950)),
        "10": ("SamplerCustomAdvanced", {"noise": ["8", 0], "guider": ["4", 0], "sampler": ["6", 0],
                                         "sigmas": ["7", 0], "latent_image": ["9", 0]}, (1450, 0)),
        "11": ("VAEDecode", {"samples": ["10", 0], "vae": ["1", 2]}, (1800, 0)),
        "12": ("SaveImage", {"images": ["11", 0], "filename_prefix": "rcca_palette_rcd"}, (2050, 0)),
    }


def rcd_regions_graph(steps: int = 50, cfg: float = 7.5) -> dict:
    """RCD + RCCA: regions place the fox and the car, RCD keeps both faithful; the refined prompt is the positive."""
    g = regions_graph("euler", steps, cfg, "normal")
    for nid in ("13", "14", "15"):
        del g[nid]
    g.update({
        "16": ("RCDEmbeddingRefiner", {"clip": ["1", 1],
                                       "prompt": "a [red fox] and a [blue vintage car] in a sunny meadow, detailed photograph",
                                       "subjects": "", "parser": "rules", "lambda_t": 0.5}, (850, 800)),
        "17": ("CFGGuider", {"model": ["11", 0], "positive": ["16", 0], "negative": ["12", 0], "cfg": cfg}, (1550, 100)),
        "18": ("KSamplerSelect", {"sampler_name": "euler"}, (1550, 350)),
        "19": ("RCDLatentOptimizer", {"sampler": ["18", 0], "t_f": 25, "t_a": 15, "k": 1, "step_size": 10.0,
                                      "delta": 1.5, "distill": True}, (1850, 350)),
        "20": ("BasicScheduler", {"model": ["11", 0], "scheduler": "normal", "steps": steps, "denoise": 1.0}, (1550, 700)),
        "21": ("RandomNoise", {"noise_seed": 42}, (1550, 900)),
        "22": ("SamplerCustomAdvanced", {"noise": ["21", 0], "guider": ["17", 0], "sampler": ["19", 0],
                                         "sigmas": ["20", 0], "latent_image": ["9", 0]}, (2200, 100)),
        "23": ("VAEDecode", {"samples": ["22", 0], "vae": ["1", 2]}, (2550, 100)),
        "24": ("SaveImage", {"images": ["23", 0], "filename_prefix": "rcca_palette_rcd_regions"}, (2800, 100)),
    })
    return g


WORKFLOWS = {
    # LCM: for LCM checkpoints or a model with an LCM-LoRA; 6 steps, low cfg
    "rcca_regions_lcm": regions_graph("lcm", 6, 1.5, "sgm_uniform"),
    # any SD1.5 checkpoint with a plain sampler
    "rcca_regions_euler": regions_graph("euler", 20, 7.0, "normal"),
    # the stream: 6 frames of a drawing sequence, one model call per frame
    "rcca_stream_drawing": stream_graph(),
    # RCD: faithful multi-subject prompts, alone and with the RCCA palette
    "rcd_refine_optimize": rcd_graph(),
    "rcd_rcca_regions": rcd_regions_graph(),
    # Flux.1 (dev) and SD3 / SD3.5 all-in-one checkpoints: same regions, each family's usual sampling
    "rcca_regions_flux": dit_regions_graph("flux"),
    "rcca_regions_sd3": dit_regions_graph("sd3"),
    # a LoRA per region in the same single pass (SD1.5 / SDXL)
    "rcca_regional_lora": regional_lora_graph(),
}


def to_api(graph: dict, classes: dict) -> dict:
    """What the frontend's graphToPrompt exports: given inputs, plus every widget at its default."""
    api = {}
    for nid, (ctype, inputs, *_) in graph.items():
        full = {}
        for name, typ, opts in input_specs(classes[ctype]):
            if name in inputs:
                full[name] = inputs[name]
            elif typ in WIDGET_TYPES and "default" in opts:
                full[name] = opts["default"]
        api[nid] = {"class_type": ctype, "inputs": full}
    return api


def input_specs(node_class) -> list[tuple[str, str, dict]]:
    """(name, type, options) of every input in the frontend's order: required, then optional."""
    spec = node_class.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, (typ, *rest) in spec.get(section, {}).items():
            typ = "COMBO" if isinstance(typ, list) else typ
            out.append((name, typ, rest[0] if rest else {}))
    return out


def to_ui(graph: dict, classes: dict) -> dict:
    links, nodes = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid, (ctype, inputs, *_) in graph.items():
        for name, value in inputs.items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(nid), name])
                out_links.setdefault((value[0], value[1]), []).append(len(links))
    for order, (nid, (ctype, inputs, pos, *size)) in enumerate(graph.items()):
        cls = classes[ctype]
        sockets, widgets = [], []
        for name, typ, opts in input_specs(cls):
            value = inputs.get(name, opts.get("default"))
            if typ in WIDGET_TYPES and not isinstance(value, list):
                widgets.append(value)
                if opts.get("control_after_generate"):
                    widgets.append("fixed")
            elif typ not in WIDGET_TYPES:
                link = next((l[0] for l in links if l[3] == int(nid) and l[4] == name), None)
                sockets.append({"name": name, "type": typ, "link": link})
        out_types = list(cls.RETURN_TYPES)
        out_names = list(getattr(cls, "RETURN_NAMES", None) or out_types)
        outputs = [{"name": out_names[i], "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, t in enumerate(out_types)]
        nodes.append({"id": int(nid), "type": ctype, "pos": list(pos), "size": list(size[0]) if size else [300, 120 + 26 * len(widgets)],
                      "flags": {}, "order": order, "mode": 0, "inputs": sockets, "outputs": outputs,
                      "properties": {"Node name for S&R": ctype}, "widgets_values": widgets})
    type_of = {(n["id"], i): o["type"] for n in nodes for i, o in enumerate(n["outputs"])}
    ui_links = []
    for link_id, src, slot, dst, name in links:
        dst_node = next(n for n in nodes if n["id"] == dst)
        dst_slot = next(i for i, s in enumerate(dst_node["inputs"]) if s["name"] == name)
        ui_links.append([link_id, src, slot, dst, dst_slot, type_of[(src, slot)]])
    return {"last_node_id": max(int(k) for k in graph), "last_link_id": len(ui_links), "nodes": nodes,
            "links": ui_links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def load_node_classes() -> dict:
    comfy = PACK / ".host" / "ComfyUI"
    sys.path.insert(0, str(os.environ.get("COMFYUI_DIR", comfy)))
    from comfy.cli_args import args

    args.cpu = True
    import utils.extra_config  # noqa: F401  (before nodes: ComfyUI's own utils package)
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    return nodes.NODE_CLASS_MAPPINGS


def main() -> None:
    classes = load_node_classes()
    (OUT / "api").mkdir(parents=True, exist_ok=True)
    workflows = dict(WORKFLOWS, rcca_live_drawing=live_graph(blank_drawing(classes)))
    for name, graph in workflows.items():
        (OUT / f"{name}.json").write_text(json.dumps(to_ui(graph, classes), indent=1) + "\n")
        (OUT / "api" / f"{name}.json").write_text(json.dumps(to_api(graph, classes), indent=1) + "\n")
        print(f"wrote example_workflows/{name}.json and example_workflows/api/{name}.json")


if __name__ == "__main__":
    main()
