"""The drawing widget's saved state: regions drawn on the palette node, as one JSON string.

    {"version": 1, "width": 512, "height": 512,
     "regions": [{"name": "fox", "color": "#e6194b", "prompt": "a red fox", "negative": "",
                  "opacity": 1.0, "mask": "data:image/png;base64,..."}]}

Each mask is a PNG of exactly width x height: coverage = alpha / 255 for images with alpha
(what a browser canvas saves), else the grey value / 255. A region's coverage is opacity x mask.
The string travels in the workflow (UI and API), so a saved or queued workflow reproduces the
drawing. Everything is validated before any decoding work: size limits first, then JSON, then
each PNG's header, then its pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Any, Sequence

import numpy as np
import torch

from .palette import MAX_REGIONS, PaletteError, RegionSpec

STATE_VERSION = 1
MAX_STATE_BYTES = 32 * 1024 * 1024
MAX_SIDE = 16384
DATA_URL = "data:image/png;base64,"


def _field(region: dict, key: str, kind: type, index: int, default: Any = None) -> Any:
    value = region.get(key, default)
    if value is None or (kind is float and isinstance(value, bool)) or not isinstance(value, kind if kind is not float else (int, float)):
        raise PaletteError(f"regions_state: region {index} field '{key}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def decode_mask(data: str, width: int, height: int, what: str) -> torch.Tensor:
    """A PNG data URL -> (height, width) float32 coverage in [0, 1]."""
    from PIL import Image

    if not isinstance(data, str) or not data.startswith(DATA_URL):
        raise PaletteError(f"{what}: mask must be a '{DATA_URL}...' string")
    try:
        raw = base64.b64decode(data[len(DATA_URL):], validate=True)
    except (binascii.Error, ValueError):
        raise PaletteError(f"{what}: mask is not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as img:
            if img.format != "PNG":
                raise PaletteError(f"{what}: mask must be a PNG, got {img.format}")
            if img.size != (width, height):  # header only: no pixels decoded yet
                raise PaletteError(f"{what}: mask is {img.size[0]} x {img.size[1]} but the drawing is {width} x {height}")
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                plane = img.convert("RGBA").getchannel("A")
            else:
                plane = img.convert("L")
            values = np.asarray(plane, dtype=np.float32) / 255.0
    except PaletteError:
        raise
    except Exception as e:  # PIL raises many types for corrupt data
        raise PaletteError(f"{what}: mask PNG cannot be decoded ({type(e).__name__}: {e})") from None
    return torch.from_numpy(values.copy())


def decode_state(text: str) -> tuple[int, int, list[RegionSpec]]:
    """regions_state -> (width, height, region specs). Regions with nothing painted and no prompt
    are skipped (a region just added in the widget); a painted region without a prompt is an error."""
    if not text or not text.strip():
        return 0, 0, []
    if len(text.encode("utf-8", "ignore")) > MAX_STATE_BYTES:
        raise PaletteError(f"regions_state is larger than {MAX_STATE_BYTES // 2**20} MiB; use fewer regions or a smaller canvas")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as e:
        raise PaletteError(f"regions_state is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise PaletteError(f"regions_state must be an object with \"version\": {STATE_VERSION}")
    width, height = state.get("width"), state.get("height")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 8 <= v <= MAX_SIDE for v in (width, height)):
        raise PaletteError(f"regions_state: width and height must be whole numbers in [8, {MAX_SIDE}], got {width!r} x {height!r}")
    regions = state.get("regions", [])
    if not isinstance(regions, list):
        raise PaletteError("regions_state: 'regions' must be a list")
    if len(regions) > MAX_REGIONS:
        raise PaletteError(f"regions_state has {len(regions)} regions; at most {MAX_REGIONS} are supported")
    specs = []
    for i, region in enumerate(regions):
        if not isinstance(region, dict):
            raise PaletteError(f"regions_state: region {i} must be an object")
        prompt = _field(region, "prompt", str, i, "")
        name = _field(region, "name", str, i, "")
        what = f"drawn region {i} ('{name}')" if name else f"drawn region {i}"
        opacity = float(_field(region, "opacity", float, i, 1.0))
        if not 0.0 <= opacity <= 1.0:
            raise PaletteError(f"{what}: opacity must be in [0, 1], got {opacity}")
        mask = decode_mask(region.get("mask"), width, height, what)
        if not prompt.strip():
            if float(mask.max()) == 0.0:
                continue
            raise PaletteError(f"{what}: has paint but no prompt; type what it should show, or clear it")
        specs.append(RegionSpec(prompt=prompt, mask=mask, strength=opacity,
                                negative=_field(region, "negative", str, i, ""), name=name,
                                color=_field(region, "color", str, i, "")))
    return width, height, specs


def encode_mask(mask: torch.Tensor) -> str:
    """(H, W) coverage in [0, 1] -> greyscale PNG data URL."""
    from PIL import Image

    values = (mask.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(values, mode="L").save(buf, format="PNG", optimize=True)
    return DATA_URL + base64.b64encode(buf.getvalue()).decode("ascii")


def encode_state(regions: Sequence[RegionSpec], width: int, height: int) -> str:
    """Region specs with (height, width) masks -> a regions_state string (what the widget saves)."""
    return json.dumps({
        "version": STATE_VERSION, "width": width, "height": height,
        "regions": [{"name": r.name, "color": r.color, "prompt": r.prompt, "negative": r.negative,
                     "opacity": r.strength, "mask": encode_mask(r.mask if r.mask.ndim == 2 else r.mask[0])} for r in regions],
    })
