"""In-process ComfyUI host (no server) for tests that need real ComfyUI: session fixture `comfy_host`,
shared by every test folder that asks for it (one ComfyUI per test process).

ComfyUI comes from $COMFYUI_DIR (default <pack>/.host/ComfyUI, built by scripts/test.sh). Its
init_extra_nodes() loads built-in extras plus custom_nodes/, where the host links this pack.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

PACK_DIR = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR") or PACK_DIR / ".host" / "ComfyUI").resolve()
PACK_MODULE = "rcca-palette"  # name of the custom_nodes/ link to this pack, ComfyUI's module key
TINY_CKPT = "tiny_sd15.safetensors"
TINY_FLUX_CKPT = "tiny_flux.safetensors"  # Flux.1-dev layout, random_checkpoints.TINY_FLUX
TINY_SD3_CKPT = "tiny_sd3.safetensors"    # SD3/3.5 MMDiT layout, random_checkpoints.TINY_SD3

sys.path.insert(0, str(PACK_DIR / "scripts"))  # random_checkpoints, comfy_server (unique names)


class _ServerStandIn:
    """The five attributes PromptExecutor and its progress handler touch on PromptServer."""
    client_id = None
    last_node_id = None
    sockets_metadata: dict = {}

    def send_sync(self, *args: Any, **kwargs: Any) -> None:
        pass

    def queue_updated(self, *args: Any, **kwargs: Any) -> None:
        pass


class ComfyHost:
    """Handle on the in-process ComfyUI: `nodes` module, tiny checkpoints, graph runner."""

    def __init__(self, nodes_module: Any, base: Path, ckpt_name: str) -> None:
        self.nodes = nodes_module
        self.base = base                       # temp root: checkpoints/ output/ input/ temp/ user/
        self.ckpt_name = ckpt_name
        self.pack_loaded = PACK_MODULE in nodes_module.LOADED_MODULE_DIRS
        self.last_executor: Any = None
        self._loaded: dict[str, tuple] = {}

    def run_graph(self, prompt: dict) -> dict:
        """Validate and execute an API-format prompt like the server does; returns the history
        result ({"outputs": ui outputs per node, "meta": ...}). AssertionError with details on failure."""
        import execution
        pid = str(uuid.uuid4())
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(pid, prompt, None))
        if not valid:
            raise AssertionError(f"prompt invalid: {json.dumps(error, indent=1)}\n"
                                 f"node_errors: {json.dumps(node_errors, indent=1, default=str)}")
        ex = execution.PromptExecutor(_ServerStandIn(), cache_type=execution.CacheType.CLASSIC,
                                      cache_args={"lru": 0, "ram": 0})
        self.last_executor = ex
        ex.execute(prompt, pid, {}, outputs)
        if not ex.success:
            errors = [d for ev, d in ex.status_messages if ev in ("execution_error", "execution_interrupted")]
            details = "\n".join(f"node {e.get('node_id')} ({e.get('node_type')}): {e.get('exception_type')}: "
                                f"{e.get('exception_message')}\n{''.join(e.get('traceback', []))}" for e in errors)
            raise AssertionError(f"prompt failed:\n{details or ex.status_messages}")
        return ex.history_result

    def node_output(self, node_id: str) -> tuple:
        """Output values (one per output slot) of a node in the last run_graph() call."""
        entry = self.last_executor.caches.outputs.get(str(node_id))
        if entry is None:
            raise KeyError(f"node {node_id} has no cached output (not executed?)")
        return tuple(v[0] if isinstance(v, list) and len(v) == 1 else v for v in entry.outputs)

    def pack_module(self, name: str = "rcca_core") -> Any:
        """A submodule of this pack as ComfyUI loaded it (its classes are the ones the nodes use;
        a top-level `import rcca_core` would give a second copy)."""
        suffix = f"{PACK_MODULE}.{name}"
        for key, module in sys.modules.items():
            if key.endswith(suffix):
                return module
        raise KeyError(f"{suffix} is not loaded; did the pack fail to import?")

    def load_checkpoint(self, name: str) -> tuple:
        """(model, clip, vae) of a checkpoint in the checkpoints folder via CheckpointLoaderSimple,
        loaded once per session and name (TINY_CKPT, TINY_FLUX_CKPT, TINY_SD3_CKPT)."""
        if name not in self._loaded:
            self._loaded[name] = tuple(self.nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3])
        return self._loaded[name]

    def load_tiny(self) -> tuple:
        """(model, clip, vae) of the tiny SD1.5 checkpoint, loaded once per session."""
        return self.load_checkpoint(self.ckpt_name)

    def random_loras(self, names: list[str], **kw: Any) -> Path:
        """Random LoRA files for the tiny SD1.5 checkpoint under these names (seed 1, 2, ... in
        order; kw as random_lora.random_lora takes), in a loras folder ComfyUI knows; existing
        files are kept. Returns the folder."""
        import folder_paths
        import random_lora

        folder = self.base / "loras"
        if not folder.is_dir():
            folder.mkdir()
            folder_paths.add_model_folder_path("loras", str(folder))
        for seed, name in enumerate(names, start=1):
            if not (folder / name).is_file():
                random_lora.write_lora(folder / name, self.load_tiny()[0].model, seed=seed, **kw)
        return folder


def _is_comfy_file(module: Any) -> bool:
    return Path(getattr(module, "__file__", None) or "/").resolve().parent == COMFYUI_DIR


@pytest.fixture(scope="session")
def comfy_host(tmp_path_factory: pytest.TempPathFactory) -> ComfyHost:
    """ComfyUI imported in this process (CPU), custom nodes loaded, tiny SD1.5 / Flux / SD3
    checkpoints ready in its checkpoints folder."""
    if not (COMFYUI_DIR / "nodes.py").is_file():
        pytest.fail(f"no ComfyUI at {COMFYUI_DIR}: run `bash scripts/test.sh` (builds .host/) "
                    "or set COMFYUI_DIR", pytrace=False)
    # first on sys.path: ComfyUI's top-level `nodes`, `utils`, ... must win over same-named folders
    # (this pack's own nodes/ package, when a test put the pack root on sys.path)
    if str(COMFYUI_DIR) in sys.path:
        sys.path.remove(str(COMFYUI_DIR))
    sys.path.insert(0, str(COMFYUI_DIR))
    if "nodes" in sys.modules and not _is_comfy_file(sys.modules["nodes"]):
        pytest.fail(f"`nodes` was imported from {sys.modules['nodes'].__file__} before ComfyUI's nodes.py; "
                    "import this pack's nodes/ only through ComfyUI", pytrace=False)
    # comfy.cli_args parses [] (not pytest's argv) unless comfy.options.enable_args_parsing() was called
    from comfy.cli_args import args
    args.cpu = True  # must precede the first import of comfy.model_management
    import folder_paths
    base = tmp_path_factory.mktemp("comfy_host")
    for sub in ("checkpoints", "output", "input", "temp", "user"):
        (base / sub).mkdir()
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.set_user_directory(str(base / "user"))
    folder_paths.add_model_folder_path("checkpoints", str(base / "checkpoints"), is_default=True)
    # ComfyUI/utils is a package; import it before `nodes`, which puts ComfyUI/comfy first on sys.path
    # (where comfy/utils.py would shadow it and comfy_extras/nodes_images.py fail)
    import utils.extra_config  # noqa: F401
    import nodes
    assert _is_comfy_file(nodes), nodes.__file__
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
    import random_checkpoints
    random_checkpoints.register_tiny_sd15()
    random_checkpoints.register_tiny_dit()
    random_checkpoints.write_checkpoint(base / "checkpoints" / TINY_CKPT, random_checkpoints.TINY)
    random_checkpoints.write_checkpoint(base / "checkpoints" / TINY_FLUX_CKPT, random_checkpoints.TINY_FLUX)
    random_checkpoints.write_checkpoint(base / "checkpoints" / TINY_SD3_CKPT, random_checkpoints.TINY_SD3)
    return ComfyHost(nodes, base, TINY_CKPT)
