"""Region LoRA: a LoRA file bound to one region, applied by the RCCA patch in its single pass.

The files are read with ComfyUI's own LoRA key mapping (comfy.lora), so every format ComfyUI
loads works; plain low-rank LoRAs keep their factors, other adapters become dense deltas.
"""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..rcca_core.palette import PaletteError
from ..rcca_core.region_lora import LayerDelta, RegionLoRA, RegionalLoRA
from . import types

log = logging.getLogger("rcca_palette")
# LoRA keys of text encoders: known, but a region's prompt is encoded without them
TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1", "te2", "te_", "lora_te1", "lora_te2", "clip_l", "clip_g",
                         "text_encoders")


class RegionLoRANode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        return io.Schema(
            node_id="RCCARegionLoRA",
            display_name="Region LoRA",
            category=types.CATEGORY,
            description="A LoRA for one region: connect it to Add Region's 'lora' input. RCCA Attention Patch applies "
                        "it only where the region is painted (weighted by its coverage), in the same single UNet pass "
                        "as every other region. SD1.5 / SDXL.",
            inputs=[
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A LoRA file from models/loras (any format ComfyUI's LoRA loader reads)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="As LoraLoaderModelOnly's strength_model; 0 = no LoRA."),
                types.RegionLoRAs.Input("lora", optional=True, tooltip="More LoRAs for the same region (stacked)."),
            ],
            outputs=[types.RegionLoRAs.Output(display_name="lora")],
        )

    @classmethod
    def execute(cls, lora_name, strength, lora=None) -> io.NodeOutput:
        import comfy.utils
        import folder_paths

        path = folder_paths.get_full_path("loras", lora_name)
        if path is None:
            raise PaletteError(f"Region LoRA: no LoRA file '{lora_name}' in the loras folders "
                               f"({', '.join(folder_paths.get_folder_paths('loras'))})")
        weights = comfy.utils.load_torch_file(path, safe_load=True)
        return io.NodeOutput(tuple(lora or ()) + (RegionLoRA(lora_name, float(strength), weights),))


class _Reads(dict):
    """The LoRA's tensors, remembering which keys ComfyUI's loader read: the others fit no layer."""

    def __init__(self, data) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self.read.add(key)
        return super().get(key, default)


def delta_loader(model):
    """The RegionalLoRA loader for a ModelPatcher: region LoRA -> {module name: LayerDelta}."""
    import comfy.lora
    import comfy.utils
    import comfy.weight_adapter.lora as lora_adapter

    base = model.model
    key_map: dict = {}  # built at the first LoRA: every RCCA patch makes a loader, few palettes use one
    prefix = "diffusion_model."

    def load(lora: RegionLoRA) -> dict[str, LayerDelta]:
        if not key_map:
            comfy.lora.model_lora_keys_unet(base, key_map)
        reads = _Reads(lora.weights)
        patches = comfy.lora.load_lora(reads, key_map, log_missing=False)
        unknown = sorted(k for k in lora.weights if k not in reads.read and not k.startswith(TEXT_ENCODER_PREFIXES))
        if unknown or not patches:
            raise PaletteError(
                f"Region LoRA '{lora.name}': {len(unknown)} of its {len(lora.weights)} keys fit no layer of this "
                f"{type(base.model_config).__name__} model (e.g. {', '.join(unknown[:3])}); it is probably a LoRA for "
                "another model family. Use a LoRA made for this checkpoint's family")
        if lora.strength == 0:
            return {}
        parts: dict[str, dict] = {}
        for key, patch in patches.items():
            if not isinstance(key, str) or not key.startswith(prefix):
                raise PaletteError(f"Region LoRA '{lora.name}': the key {key!r} patches part of a weight, which region "
                                   "LoRAs do not support")
            name, param = key[len(prefix):].rsplit(".", 1)
            module = comfy.utils.get_attr(base.diffusion_model, name)
            if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                log.info("Region LoRA '%s': %s (%s) is left as it is (norms are untouched)", lora.name, name,
                         type(module).__name__)
                continue
            weight = getattr(module, param)
            low_rank = (param == "weight" and isinstance(patch, lora_adapter.LoRAAdapter)
                        and all(v is None for v in patch.weights[3:6]))
            if low_rank:
                up, down, alpha = patch.weights[0], patch.weights[1], patch.weights[2]
                rank = down.shape[0]
                if up.shape[0] != weight.shape[0] or down.shape[1] != weight.shape[1] or \
                        (weight.ndim == 4 and down.shape[2:] != weight.shape[2:]):
                    raise PaletteError(f"Region LoRA '{lora.name}': its factors for {name} ({tuple(up.shape)} x "
                                       f"{tuple(down.shape)}) do not fit the layer's weight {tuple(weight.shape)}; "
                                       "it is a LoRA for another model")
                scale = lora.strength * (alpha / rank if alpha is not None else 1.0)
                parts.setdefault(name, {}).update(down=down.float(), up=up.float(), scale=float(scale))
            else:
                w = weight.detach().float().cpu()
                patched = comfy.lora.calculate_weight([(lora.strength, patch, 1.0, None, None)], w.clone(), key)
                if patched.shape != w.shape:
                    raise PaletteError(f"Region LoRA '{lora.name}': its delta for {key} does not fit the layer")
                parts.setdefault(name, {})["weight" if param == "weight" else "bias"] = patched - w
        out = {}
        for name, p in parts.items():
            module = comfy.utils.get_attr(base.diffusion_model, name)
            if "weight" not in p and "down" not in p:  # a bias-only delta: a zero weight delta carries it
                w = module.weight
                p["weight"] = torch.zeros(w.shape, dtype=torch.float32)
            out[name] = LayerDelta(**p)
        return out

    return load


def kv_layer_names(diffusion_model, layers) -> dict:
    """Cross-attention layer key -> the attn2 module's name in the diffusion model."""
    names = {id(m): n for n, m in diffusion_model.named_modules()}
    return {key: names[id(module)] for key, module in layers.items()}


def regional_lora(model, layers) -> RegionalLoRA:
    """Region LoRA support for a UNet model: palettes prepared with it load their LoRAs then,
    before sampling (or, in a stream, when an edit enters)."""
    return RegionalLoRA(delta_loader(model), kv_layer_names(model.get_model_object("diffusion_model"), layers))
