"""Test-only ComfyUI custom-node module: lets a server's model detection accept the tiny random
SD1.5, Flux and SD3 checkpoints of scripts/random_checkpoints.py. Adds no nodes.

Loaded by ComfyServer when its parent folder (tests/support) is given as an extra custom_nodes
folder; never shipped to users (it lives under tests/, outside the pack's node modules)."""
import importlib.util
import os
import sys

_NAME = "rcca_random_checkpoints"  # stable name so every loader shares one module


def _load_random_checkpoints():
    if _NAME not in sys.modules:
        # by path relative to this file: tests/support/tiny_sd_pack -> <pack>/scripts
        path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "scripts", "random_checkpoints.py")
        spec = importlib.util.spec_from_file_location(_NAME, os.path.abspath(path))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = mod
        spec.loader.exec_module(mod)
    return sys.modules[_NAME]


_load_random_checkpoints().register_tiny_sd15()
_load_random_checkpoints().register_tiny_dit()

NODE_CLASS_MAPPINGS = {}
