"""ComfyUI nodes of rcca-palette: thin translations between ComfyUI types and rcca_core."""

from comfy_api.latest import ComfyExtension, io

from .attention_patch import RCCAAttentionPatch
from .live import LiveStream, register_routes
from .palette import AddRegion, RegionalPromptPalette
from .pyramid import MaskPyramidNode
from .rcd import RCDEmbeddingRefiner, RCDLatentOptimizer
from .region_lora import RegionLoRANode
from .stream import PaletteTimeline, SemanticDrawOptionsNode, StreamBatchLCMSampler

NODES: list[type[io.ComfyNode]] = [
    RegionalPromptPalette, AddRegion, RegionLoRANode, MaskPyramidNode, RCCAAttentionPatch,
    StreamBatchLCMSampler, PaletteTimeline, SemanticDrawOptionsNode, LiveStream,
    RCDEmbeddingRefiner, RCDLatentOptimizer,
]

register_routes()


class RCCAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
