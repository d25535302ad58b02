"""RCCA Attention Patch: a clone of the MODEL whose cross-attention obeys the palette."""

from __future__ import annotations

from comfy_api.latest import io

import logging

import torch

from ..rcca_core.attention import ATTENTION_MODES, RCCAOptions, RegionalCrossAttention, cross_attention_layers, parse_blocks
from ..rcca_core.masks import check_latent_aspect
from ..rcca_core.palette import PaletteError
from . import types

SUPPORTED = "SD1.5 (incl. LCM / Hyper / Turbo variants) and SDXL"
NODE = "RCCA Attention Patch"
WRAPPER_KEY = "rcca_palette"
log = logging.getLogger("rcca_palette")


def check_supported(model, node: str = NODE) -> None:
    """RCCA needs a UNet with cross-attention on CLIP tokens: SD1.5 or SDXL families."""
    import comfy.supported_models as sm

    config = model.model.model_config
    if not isinstance(config, (sm.SD15, sm.SDXL)):
        raise PaletteError(f"{node} supports {SUPPORTED} models; this model is {type(config).__name__}. "
                           "Use the model's own regional conditioning nodes instead.")


def check_blocks(blocks, layers) -> None:
    """Every block the user names must exist in this model; say which ones it has."""
    if blocks is None:
        return
    have = sorted({(kind, block) for kind, block, _ in layers})
    for kind, block in sorted(blocks, key=lambda b: (b[0], -1 if b[1] is None else b[1])):
        if block is None and not any(k == kind for k, _ in have):
            raise PaletteError(f"{NODE}: blocks names '{kind}' but this model has no cross-attention in its {kind} blocks")
        if block is not None and (kind, block) not in have:
            listed = ", ".join(f"{k}:{b}" for k, b in have)
            raise PaletteError(f"{NODE}: blocks names '{kind}:{block}' but this model has no such cross-attention block; "
                               f"it has {listed}")


def replaced_layers(model_options: dict, rcca: RegionalCrossAttention) -> list:
    """RCCA layers whose attention another pack replaced (attn2_replace, keyed by layer or by block)."""
    replace = model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    return sorted(key for key in rcca.layers if rcca.options.applies_to(key[0], key[1])
                  and (key in replace or key[:2] in replace))


def sampling_check(rcca: RegionalCrossAttention):
    """An OUTER_SAMPLE wrapper: checks the latent and the final model options before the first step,
    so a wrong latent or a replaced layer is reported before any work is done."""

    def wrapper(executor, noise, latent_image, *args, **kwargs):
        guider = executor.class_obj
        if latent_image is not None and latent_image.ndim == 4:
            palette = rcca.palette
            check_latent_aspect(palette.width, palette.height, latent_image.shape[-1] * 8, latent_image.shape[-2] * 8, NODE)
        replaced = replaced_layers(guider.model_options, rcca)
        if replaced:
            # a replacement that calls ComfyUI's attention with transformer_options still reaches RCCA;
            # one that does not makes attn2_output_patch raise at the first such layer
            log.warning("RCCA Attention Patch: another node replaced cross-attention at %s (attn2_replace); RCCA works "
                        "there only if the replacement calls ComfyUI's attention with transformer_options, and "
                        "stops sampling with an error if it does not", ", ".join(map(str, replaced)))
        return executor(noise, latent_image, *args, **kwargs)

    return wrapper


def tick_wrapper(rcca: RegionalCrossAttention):
    """An APPLY_MODEL wrapper: RCCA's host logic for one model call (sigma range, row layout, palettes,
    caches, padding) runs here, before the diffusion model, so the attention hooks inside it only read
    tensors (`RegionalCrossAttention.with_tick`). With ComfyUI's torch.compile wrapper on the model the
    inputs get fixed shapes (padded to a bucket), so palette edits within the bucket reuse the graph."""
    from comfy.patcher_extension import WrappersMP

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        base = executor.class_obj
        dtype = base.manual_cast_dtype if getattr(base, "manual_cast_dtype", None) is not None else base.get_dtype()
        own = c_crossattn.shape[1] if torch.is_tensor(c_crossattn) and c_crossattn.ndim == 3 else None
        compiled = "torch.compile" in (transformer_options.get("wrappers", {}).get(WrappersMP.APPLY_MODEL, {}) or {})
        options = rcca.with_tick(transformer_options, x.shape, own, dtype, x.device, static=rcca.static or compiled)
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    return wrapper


def install_rcca(patcher, rcca: RegionalCrossAttention) -> None:
    """RCCA's hooks in a (cloned) ModelPatcher: attention hooks plus the per-call tick wrapper."""
    import comfy.patcher_extension

    rcca.install(patcher.model_options)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, tick_wrapper(rcca))


def uninstall_rcca(patcher, rcca: RegionalCrossAttention) -> None:
    import comfy.patcher_extension

    rcca.uninstall(patcher.model_options)
    for kind in (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.APPLY_MODEL):
        patcher.remove_wrappers_with_key(kind, WRAPPER_KEY)


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
                               tooltip="soft: each prompt gets its coverage as its share of the attention, so opacity blends ('50 % dog'); "
                                       "hard: a pixel attends only to prompts covering it by at least 0.5."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Apply from this point of the schedule (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Apply until this point (1 = last step); outside, the background prompt alone drives cross-attention."),
                io.String.Input("blocks", default="all",
                                tooltip="'all' or a comma list of input / middle / output, each optionally ':id' (e.g. 'input, middle, output:3')."),
                io.Float.Input("self_attention_until", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Until this point of the schedule, self-attention also keeps to regions: a pixel "
                                       "looks at pixels of its own region (soft masks: weighted by the chance to share "
                                       "one). Keeps objects from spilling while the layout forms; 0 = off."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, palette, mode, start_percent, end_percent, blocks, pyramid=None,
                self_attention_until=0.0) -> io.NodeOutput:
        check_supported(model)
        context_dim = model.model.model_config.unet_config.get("context_dim")
        if context_dim is not None and palette.context_dim != context_dim:
            raise PaletteError(f"the palette's prompts are {palette.context_dim}-wide token embeddings but this model "
                               f"expects {context_dim}; encode the palette with the CLIP of the same checkpoint")
        if start_percent > end_percent:
            raise PaletteError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})")
        upstream = RegionalCrossAttention.installed_in(model.model_options)
        if upstream is not None:
            raise PaletteError(
                f"{NODE}: this MODEL already carries an RCCA Attention Patch (a palette of {len(upstream.palette.regions)} "
                "regions). A second patch in the chain would act only where the first leaves background, so it is "
                "refused: put every region into one palette (chain Add Region nodes into one Regional Prompt "
                "Palette), or connect this node to the unpatched model")
        sampling = model.get_model_object("model_sampling")
        options = RCCAOptions(mode=mode, blocks=parse_blocks(blocks),
                              sigma_start=float("inf") if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent)),
                              sigma_end=float(sampling.percent_to_sigma(end_percent)),
                              self_sigma_end=float(sampling.percent_to_sigma(self_attention_until))
                              if self_attention_until > 0.0 else float("inf"))
        patched = model.clone()
        previous = patched.model_options.get("transformer_options", {}).get("optimized_attention_override")
        layers = cross_attention_layers(patched.get_model_object("diffusion_model"))
        check_blocks(options.blocks, layers)
        rcca = RegionalCrossAttention(palette, layers, options, pyramid, previous)
        install_rcca(patched, rcca)
        import comfy.patcher_extension

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, sampling_check(rcca))
        return io.NodeOutput(patched)
