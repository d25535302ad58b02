"""RCCA Attention Patch: a clone of the MODEL whose cross-attention obeys the palette."""

from __future__ import annotations

from comfy_api.latest import io

import logging

import torch

from ..rcca_core.attention import ATTENTION_MODES, RCCAOptions, RegionalCrossAttention, cross_attention_layers, parse_blocks
from ..rcca_core.joint import CALL_KEY, JointOptions, JointRegionalAttention
from ..rcca_core.masks import check_latent_aspect
from ..rcca_core.palette import PaletteError
from . import types
from .families import JOINT_FAMILIES, UNET_FAMILIES, check_palette_encoder, require_family
from .region_lora import regional_lora

NODE = "RCCA Attention Patch"
WRAPPER_KEY = "rcca_palette"
REGION_TEXT = {"own region": "region", "whole image": "everywhere"}
log = logging.getLogger("rcca_palette")


def check_supported(model, node: str = NODE) -> None:
    """The UNet-only nodes (stream, live) need a UNet with cross-attention on CLIP tokens: SD1.5 or SDXL."""
    require_family(model, node, UNET_FAMILIES)


def attention_dtype(base) -> "torch.dtype":
    """The dtype the diffusion model computes attention in (manual cast or its weights')."""
    return base.manual_cast_dtype if getattr(base, "manual_cast_dtype", None) is not None else base.get_dtype()


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


def replaced_joint_blocks(model_options: dict) -> list:
    """Joint blocks another pack replaced (patches_replace 'dit'): RCCA acts there only if the
    replacement runs the original block with transformer_options."""
    return sorted(model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {}))


def sampling_check(rcca: "RegionalCrossAttention | JointRegionalAttention"):
    """An OUTER_SAMPLE wrapper: checks the latent and the final model options before the first step,
    so a wrong latent or a replaced layer is reported before any work is done."""

    def wrapper(executor, noise, latent_image, *args, **kwargs):
        guider = executor.class_obj
        if latent_image is not None and latent_image.ndim == 4:
            palette = rcca.palette
            check_latent_aspect(palette.width, palette.height, latent_image.shape[-1] * 8, latent_image.shape[-2] * 8, NODE)
        if isinstance(rcca, JointRegionalAttention):
            replaced = replaced_joint_blocks(guider.model_options)
            if replaced:
                log.warning("RCCA Attention Patch: another node replaced joint blocks %s (patches_replace 'dit'); RCCA "
                            "works there only if the replacement runs the original block with transformer_options",
                            ", ".join(map(str, replaced)))
            return executor(noise, latent_image, *args, **kwargs)
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
        dtype = attention_dtype(executor.class_obj)
        own = c_crossattn.shape[1] if torch.is_tensor(c_crossattn) and c_crossattn.ndim == 3 else None
        compiled = "torch.compile" in (transformer_options.get("wrappers", {}).get(WrappersMP.APPLY_MODEL, {}) or {})
        options = rcca.with_tick(transformer_options, x.shape, own, dtype, x.device, static=rcca.static or compiled)
        loras = rcca.lora_rows(transformer_options, x.shape)
        if loras is None:
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        # region LoRAs: forward hooks for this call only, so other clones of the model never see them
        handles = rcca.lora.install(executor.class_obj.diffusion_model, loras[0], loras[1], tuple(x.shape[-2:]))
        try:
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

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


def joint_wrapper(joint: JointRegionalAttention):
    """An APPLY_MODEL wrapper for joint-attention models: appends the region prompts' tokens to the
    context (they then run through the text stream of every block) and puts this call's bias over
    the joint sequence in transformer_options, where the attention override reads it. Raises when
    no attention call reached the override: RCCA must never be silently off."""

    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        if kwargs.get("ref_latents") is not None:
            raise PaletteError(f"{NODE}: reference latents (Flux Kontext, ReferenceLatent) add image tokens RCCA does "
                               "not place yet; sample regions without reference images")
        if kwargs.get("attention_mask") is not None:
            raise PaletteError(f"{NODE}: the conditioning carries an attention mask (another regional or masking node); "
                               "it covers the model's own text tokens only and cannot be combined with the region "
                               "prompts. Use one of the two")
        if not torch.is_tensor(c_crossattn) or c_crossattn.ndim != 3:
            raise PaletteError(f"{NODE}: this model was called without a text context; RCCA needs the palette's "
                               "background conditioning as the sampler's positive")
        options = joint.with_call(transformer_options, x.shape, c_crossattn.shape[1], attention_dtype(executor.class_obj),
                                  x.device)
        out = executor(x, t, c_concat, joint.extend_context(c_crossattn), control, options, **kwargs)
        if not options[CALL_KEY]["calls"]:
            raise PaletteError(f"{NODE}: no attention call of this model reached RCCA: another node replaced the "
                               "attention override or the joint blocks without running the originals. Use one of the "
                               "two on this model")
        return out

    return wrapper


def install_joint(patcher, joint: JointRegionalAttention) -> None:
    import comfy.patcher_extension

    joint.install(patcher.model_options)
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, joint_wrapper(joint))


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
                                       "one). Keeps objects from spilling while the layout forms; 0 = off. SD1.5 / SDXL."),
                io.Combo.Input("region_text", options=list(REGION_TEXT), default="own region", optional=True,
                               tooltip="SD3 / Flux: what a region prompt's text tokens read of the image as they pass "
                                       "through the joint blocks: its own region (default) or the whole image. "
                                       "The background prompt always reads the whole image."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, palette, mode, start_percent, end_percent, blocks, pyramid=None,
                self_attention_until=0.0, region_text="own region") -> io.NodeOutput:
        family = require_family(model, NODE)
        check_palette_encoder(palette, family, NODE)
        context_dim = model.model.model_config.unet_config.get("context_dim") if family in UNET_FAMILIES else None
        if context_dim is not None and palette.context_dim != context_dim:
            raise PaletteError(f"the palette's prompts are {palette.context_dim}-wide token embeddings but this model "
                               f"expects {context_dim}; encode the palette with the CLIP of the same checkpoint")
        if start_percent > end_percent:
            raise PaletteError(f"start_percent ({start_percent}) must not exceed end_percent ({end_percent})")
        if region_text not in REGION_TEXT:
            raise PaletteError(f"{NODE}: region_text must be one of {list(REGION_TEXT)}, got {region_text!r}")
        upstream = RegionalCrossAttention.installed_in(model.model_options) or \
            JointRegionalAttention.installed_in(model.model_options)
        if upstream is not None:
            raise PaletteError(
                f"{NODE}: this MODEL already carries an RCCA Attention Patch (a palette of {len(upstream.palette.regions)} "
                "regions). A second patch in the chain would act only where the first leaves background, so it is "
                "refused: put every region into one palette (chain Add Region nodes into one Regional Prompt "
                "Palette), or connect this node to the unpatched model")
        sampling = model.get_model_object("model_sampling")
        sigma_start = float("inf") if start_percent <= 0.0 else float(sampling.percent_to_sigma(start_percent))
        sigma_end = float(sampling.percent_to_sigma(end_percent))
        patched = model.clone()
        previous = patched.model_options.get("transformer_options", {}).get("optimized_attention_override")
        if family in JOINT_FAMILIES:
            rcca = cls._joint(patched, palette, pyramid, mode, sigma_start, sigma_end, blocks, self_attention_until,
                              region_text, previous)
        else:
            rcca = cls._unet(patched, palette, pyramid, mode, sigma_start, sigma_end, blocks, self_attention_until,
                             sampling, previous)
        import comfy.patcher_extension

        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, sampling_check(rcca))
        return io.NodeOutput(patched)

    @staticmethod
    def _unet(patched, palette, pyramid, mode, sigma_start, sigma_end, blocks, self_attention_until, sampling, previous):
        options = RCCAOptions(mode=mode, blocks=parse_blocks(blocks), sigma_start=sigma_start, sigma_end=sigma_end,
                              self_sigma_end=float(sampling.percent_to_sigma(self_attention_until))
                              if self_attention_until > 0.0 else float("inf"))
        layers = cross_attention_layers(patched.get_model_object("diffusion_model"))
        check_blocks(options.blocks, layers)
        rcca = RegionalCrossAttention(palette, layers, options, pyramid, previous, regional_lora(patched, layers))
        install_rcca(patched, rcca)
        return rcca

    @staticmethod
    def _joint(patched, palette, pyramid, mode, sigma_start, sigma_end, blocks, self_attention_until, region_text,
               previous):
        if parse_blocks(blocks) is not None:
            raise PaletteError(f"{NODE}: on SD3 / Flux every joint block takes the regions; blocks must be 'all', "
                               f"got {blocks!r}")
        if self_attention_until > 0.0:
            raise PaletteError(f"{NODE}: self_attention_until applies to SD1.5 / SDXL cross-attention; on SD3 / Flux "
                               "set it to 0")
        with_lora = [r.spec.name for r in palette.regions if r.spec.loras]
        if with_lora:
            raise PaletteError(f"{NODE}: region LoRAs ({', '.join(with_lora)}) work on SD1.5 / SDXL; on SD3 / Flux load "
                               "the LoRA for the whole model (LoraLoaderModelOnly) or remove it from the region")
        diffusion = patched.get_model_object("diffusion_model")
        if getattr(diffusion, "register_length", 0):
            raise PaletteError(f"{NODE}: this MMDiT prepends {diffusion.register_length} register tokens to the text, "
                               "which RCCA does not place yet")
        options = JointOptions(mode=mode, sigma_start=sigma_start, sigma_end=sigma_end, text_sees=REGION_TEXT[region_text])
        joint = JointRegionalAttention(palette, options, pyramid, int(getattr(diffusion, "patch_size", 2)), previous)
        install_joint(patched, joint)
        return joint
