"""Which model families the pack serves, read from ComfyUI's model configs and CLIP objects.

UNet families (SD1.5, SDXL) get RCCA through their cross-attention layers; joint-attention
families (SD3 / SD3.5, Flux.1) through one bias over the joint text + image sequence.
"""

from __future__ import annotations

from ..rcca_core.palette import PaletteError

UNET_FAMILIES = ("sd1", "sdxl")
JOINT_FAMILIES = ("sd3", "flux")
NAMES = {"sd1": "SD1.5", "sdxl": "SDXL", "sd3": "SD3 / SD3.5", "flux": "Flux.1", "flux2": "Flux.2"}
SUPPORTED = "SD1.5 (incl. LCM / Hyper / Turbo variants), SDXL, SD3 / SD3.5 and Flux.1 (dev, schnell, fill)"


def model_family(model) -> str | None:
    """'sd1', 'sdxl', 'sd3' or 'flux' for a ModelPatcher, None for any other model."""
    import comfy.supported_models as sm

    config = model.model.model_config
    if isinstance(config, sm.SD15):
        return "sd1"
    if isinstance(config, sm.SDXL):
        return "sdxl"
    if isinstance(config, sm.SD3):
        return "sd3"
    if isinstance(config, sm.Flux) and not isinstance(config, sm.Flux2):
        return "flux"
    return None


def require_family(model, node: str, families: tuple[str, ...] = UNET_FAMILIES + JOINT_FAMILIES) -> str:
    """The model's family, or a clear error naming what `node` supports."""
    family = model_family(model)
    if family not in families:
        supported = SUPPORTED if families == UNET_FAMILIES + JOINT_FAMILIES else \
            " and ".join(NAMES[f] for f in families)
        what = type(model.model.model_config).__name__
        raise PaletteError(f"{node} supports {supported} models; this model is {what}. "
                           "Use the model's own regional conditioning nodes instead.")
    return family


def encoder_family(clip) -> str:
    """The family of a ComfyUI CLIP object's text encoders ('' when unknown)."""
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.sd3_clip

    encoder = getattr(clip, "cond_stage_model", None)
    for cls, family in ((comfy.text_encoders.flux.FluxClipModel, "flux"), (comfy.text_encoders.flux.Flux2TEModel, "flux2"),
                        (comfy.text_encoders.sd3_clip.SD3ClipModel, "sd3"), (comfy.sdxl_clip.SDXLClipModel, "sdxl"),
                        (comfy.sdxl_clip.SDXLRefinerClipModel, "sdxl"), (comfy.sd1_clip.SD1ClipModel, "sd1")):
        if isinstance(encoder, cls):
            return family
    return ""


def check_palette_encoder(palette, family: str, node: str) -> None:
    """A palette encoded by another family's text encoders is refused: the tokens would mean
    nothing to this model (SD3's and Flux's contexts are both 4096 wide, so widths cannot tell)."""
    if palette.encoder and palette.encoder != family and (family in JOINT_FAMILIES or palette.encoder in JOINT_FAMILIES):
        raise PaletteError(f"{node}: the palette was encoded with the {NAMES.get(palette.encoder, palette.encoder)} "
                           f"text encoders but this model is {NAMES[family]}; connect the CLIP of the same checkpoint "
                           "to the Regional Prompt Palette")
