"""RCCA Attention Patch: a clone of the MODEL whose cross-attention obeys the palette."""

from __future__ import annotations

from comfy_api.latest import io

from ..rcca_core.attention import ATTENTION_MODES, RCCAOptions, RegionalCrossAttention, cross_attention_layers, parse_blocks
from ..rcca_core.palette import PaletteError
from . import types

SUPPORTED = "SD1.5 (incl. LCM / Hyper / Turbo variants) and SDXL"


def check_supported(model) -> None:
    """RCCA needs a UNet with cross-attention on CLIP tokens: SD1.5 or SDXL families."""
    import comfy.supported_models as sm

    config = model.model.model_config
    if not isinstance(config, (sm.SD15, sm.SDXL)):
        raise PaletteError(f"RCCA Attention Patch supports {SUPPORTED} models; this model is {type(config).__name__}. "
                           "Use the model's own regional conditioning nodes instead.")


class RCCAAttentionPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="RCCAAttentionPatch",
            display_name="RCCA Attention Patch",
            category=types.CATEGORY,
            description="Region-constrained cross-attention: one UNet pass serves every region prompt. "
                        "Returns a patched clone; the input MODEL is left as it was. Composes with other "
                        "attention patches (attn2_patch lists, optimized_attention_override).",
            inputs=[
                io.Model.Input("model"),
                types.Palette.Input("palette"),
                types.MaskPyramid.Input("pyramid", optional=True, tooltip="From Mask Pyramid; built on first use if absent."),
                io.Combo.Input("mode", options=list(ATTENTION_MODES), default="soft",
                               tooltip="soft: bias log(coverage), soft masks blend prompts ('50 % dog'); "
                                       "hard: a pixel attends only to prompts covering it by at least 0.5."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Apply from this point of the schedule (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Apply until this point (1 = last step); outside, the background prompt alone drives cross-attention."),
                io.String.Input("blocks", default="all",
                                tooltip="'all' or a comma list of input / middle / output, each optionally ':id' (e.g. 'input, middle, output:3')."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, palette, mode, start_percent, end_percent, blocks, pyramid=None) -> io.NodeOutput:
        check_supported(model)
        context_dim = model.model.model_config.unet_config.get("context_dim")
        if context_dim is not None and palette.context_dim != context_dim:
            raise PaletteError(f"the palette's prompts are {palette.context_dim}-wide token embeddings but this model "
                               f"expects {context_dim}; encode the palette with the CLIP of the same checkpoint")
        if start_percent > end_percent:
            raise PaletteError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})")
        sampling = model.get_model_object("model_sampling")
        options = RCCAOptions(mode=mode, blocks=parse_blocks(blocks),
                              sigma_start=float("inf") if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent)),
                              sigma_end=float(sampling.percent_to_sigma(end_percent)))
        patched = model.clone()
        previous = patched.model_options.get("transformer_options", {}).get("optimized_attention_override")
        layers = cross_attention_layers(patched.get_model_object("diffusion_model"))
        RegionalCrossAttention(palette, layers, options, pyramid, previous).install(patched.model_options)
        return io.NodeOutput(patched)
