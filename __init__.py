"""rcca-palette: region-based text-to-image for ComfyUI (V3 node pack)."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import RCCAExtension

    return RCCAExtension()
