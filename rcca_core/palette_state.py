"""The drawing widget's saved state: regions drawn on the palette node, as one JSON string.

    {"version": 1, "width": 512, "height": 512,
     "regions": [{"name": "fox", "color": "#e6194b", "prompt": "a red fox", "negative": "",
                  "opacity": 1.0, "mask": "data:image/png;base64,..."}]}

Each mask is a PNG of exactly width x height: coverage = alpha / 255 for images with alpha
(what a browser canvas saves), else the grey value / 255. A region's coverage is opacity x mask.
The string travels in the workflow (UI and API), so a saved or queued workflow reproduces the
drawing. Everything is validated before any decoding work: size limits first, then JSON, then
the declared canvas size, then each PNG's header (and the pixel budget), then the pixels.

Live edits may send a delta against the last state the server accepted (`read_state(base=...)`):
a region's mask may then be {"base": i} (region i's mask of that state, unchanged) or
{"base": i, "patch": {"x": X, "y": Y, "png": "data:image/png;base64,..."}} (that mask with the
rectangle at X, Y replaced by the patch PNG's coverage), so a stroke costs its bounding box, not
the whole drawing. A saved or queued state never carries references: it must stand alone.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .palette import MAX_REGIONS, PaletteError, RegionSpec

STATE_VERSION = 1
MAX_STATE_BYTES = 32 * 1024 * 1024
MAX_SIDE = 16384
DATA_URL = "data:image/png;base64,"


class CanvasMismatch(PaletteError):
    """The state's width x height is not the canvas it is meant for (live: the session's)."""


@dataclass
class DecodedState:
    width: int
    height: int
    specs: list[RegionSpec]  # the regions to render: unpainted regions without a prompt are left out
    masks: list[torch.Tensor]  # every region's (height, width) mask, in the state's order: what a delta refers to


def _field(region: dict, key: str, kind: type, index: int, default: Any = None) -> Any:
    value = region.get(key, default)
    if value is None or (kind is float and isinstance(value, bool)) or not isinstance(value, kind if kind is not float else (int, float)):
        raise PaletteError(f"regions_state: region {index} field '{key}' must be a {kind.__name__}, got {type(value).__name__}")
    return value


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _open_png(data: Any, what: str):
    """A PNG data URL -> an opened PIL image: its header is read, its pixels are not."""
    from PIL import Image

    if not isinstance(data, str) or not data.startswith(DATA_URL):
        raise PaletteError(f"{what} must be a '{DATA_URL}...' string")
    try:
        raw = base64.b64decode(data[len(DATA_URL):], validate=True)
    except (binascii.Error, ValueError):
        raise PaletteError(f"{what} is not valid base64") from None
    try:
        img = Image.open(io.BytesIO(raw))
    except Exception as e:  # PIL raises many types for corrupt data
        raise PaletteError(f"{what} cannot be decoded ({type(e).__name__}: {e})") from None
    if img.format != "PNG":
        img.close()
        raise PaletteError(f"{what} must be a PNG, got {img.format}")
    return img


def _coverage(img, what: str) -> torch.Tensor:
    """An opened PNG -> (h, w) float32 coverage in [0, 1]; decompresses the pixels."""
    try:
        with img:
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                plane = img.convert("RGBA").getchannel("A")
            else:
                plane = img.convert("L")
            values = np.asarray(plane, dtype=np.float32) / 255.0  # a fresh, writable array
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise PaletteError(f"{what} cannot be decoded ({type(e).__name__}: {e})") from None
    return torch.from_numpy(values)


def decode_mask(data: str, width: int, height: int, what: str) -> torch.Tensor:
    """A PNG data URL -> (height, width) float32 coverage in [0, 1]."""
    img = _open_png(data, f"{what}: mask")
    if img.size != (width, height):  # header only: no pixels decoded yet
        img.close()
        raise PaletteError(f"{what}: mask is {img.size[0]} x {img.size[1]} but the drawing is {width} x {height}")
    return _coverage(img, f"{what}: mask PNG")


def decode_photo(data: str, width: int, height: int, what: str = "photo") -> torch.Tensor:
    """A PNG data URL of exactly width x height -> (1, height, width, 3) float32 RGB in [0, 1] (an
    IMAGE). The size is checked from the header, before any pixel is decoded; alpha is dropped."""
    img = _open_png(data, what)
    if img.size != (width, height):
        img.close()
        raise PaletteError(f"{what} is {img.size[0]} x {img.size[1]} px but the canvas is {width} x {height} px; "
                           "send it drawn at the canvas size")
    try:
        with img:
            values = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise PaletteError(f"{what} cannot be decoded ({type(e).__name__}: {e})") from None
    return torch.from_numpy(values).unsqueeze(0)


def _planned_mask(mask: Any, width: int, height: int, base: Sequence[torch.Tensor] | None, what: str):
    """Check one region's mask field without decoding pixels. Returns (base index or None, opened
    PNG or None, patch x, patch y): a full PNG, an unchanged base mask, or a base mask with a patch."""
    if isinstance(mask, str):
        img = _open_png(mask, f"{what}: mask")
        if img.size != (width, height):
            img.close()
            raise PaletteError(f"{what}: mask is {img.size[0]} x {img.size[1]} but the drawing is {width} x {height}")
        return None, img, 0, 0
    if not isinstance(mask, dict) or "base" not in mask or set(mask) - {"base", "patch"}:
        raise PaletteError(f"{what}: mask must be a '{DATA_URL}...' string"
                           + (", {\"base\": i} or {\"base\": i, \"patch\": {\"x\", \"y\", \"png\"}}" if base is not None else ""))
    if base is None:
        raise PaletteError(f"{what}: mask {{\"base\": ...}} refers to an earlier live edit; it is accepted only in a live "
                           "edit that names that edit in 'base_seq' (a saved or queued state must carry every mask as a PNG)")
    index = mask["base"]
    if not _whole(index) or not 0 <= index < len(base):
        raise PaletteError(f"{what}: mask {{\"base\": {index!r}}} must be the index of a region of the base edit "
                           f"(0 to {len(base) - 1})" if base else f"{what}: mask {{\"base\": {index!r}}}: the base edit has no regions")
    patch = mask.get("patch")
    if patch is None:
        return index, None, 0, 0
    if not isinstance(patch, dict) or set(patch) != {"x", "y", "png"} or not (_whole(patch["x"]) and _whole(patch["y"])):
        raise PaletteError(f"{what}: mask patch must be {{\"x\": whole number, \"y\": whole number, \"png\": \"{DATA_URL}...\"}}")
    x, y = patch["x"], patch["y"]
    img = _open_png(patch["png"], f"{what}: mask patch")
    w, h = img.size
    if x < 0 or y < 0 or x + w > width or y + h > height:
        img.close()
        raise PaletteError(f"{what}: mask patch {w} x {h} at ({x}, {y}) does not lie inside the {width} x {height} drawing")
    return index, img, x, y


def read_state(text: str, *, canvas: tuple[int, int] | None = None, base: Sequence[torch.Tensor] | None = None,
               max_pixels: int | None = None) -> DecodedState:
    """regions_state -> its decoded regions. `canvas` (width, height): the only size accepted
    (CanvasMismatch otherwise, before any PNG is read). `base`: the masks of the state a delta
    refers to (None: every mask must be a PNG). `max_pixels`: the most mask pixels one call may
    decode, checked on the PNG headers before any pixel is decompressed.
    Regions with nothing painted and no prompt are left out of `specs` (a region just added in
    the widget); a painted region without a prompt is an error."""
    if not text or not text.strip():
        return DecodedState(0, 0, [], [])
    if len(text.encode("utf-8", "ignore")) > MAX_STATE_BYTES:
        raise PaletteError(f"regions_state is larger than {MAX_STATE_BYTES // 2**20} MiB; use fewer regions or a smaller canvas")
    try:
        state = json.loads(text)
    except json.JSONDecodeError as e:
        raise PaletteError(f"regions_state is not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise PaletteError(f"regions_state must be an object with \"version\": {STATE_VERSION}")
    width, height = state.get("width"), state.get("height")
    if not all(_whole(v) and 8 <= v <= MAX_SIDE for v in (width, height)):
        raise PaletteError(f"regions_state: width and height must be whole numbers in [8, {MAX_SIDE}], got {width!r} x {height!r}")
    if canvas is not None and (width, height) != tuple(canvas):
        raise CanvasMismatch(f"the drawing is {width} x {height} but this live session renders {canvas[0]} x {canvas[1]}; "
                             "restart live after changing the canvas size")
    regions = state.get("regions", [])
    if not isinstance(regions, list):
        raise PaletteError("regions_state: 'regions' must be a list")
    if len(regions) > MAX_REGIONS:
        raise PaletteError(f"regions_state has {len(regions)} regions; at most {MAX_REGIONS} are supported")
    if base is not None and any(m.shape != (height, width) for m in base):
        raise CanvasMismatch(f"the drawing is {width} x {height} but the edit it refers to is not; send the full state")
    plans, fields = [], []
    try:
        pixels = 0
        for i, region in enumerate(regions):
            if not isinstance(region, dict):
                raise PaletteError(f"regions_state: region {i} must be an object")
            prompt = _field(region, "prompt", str, i, "")
            name = _field(region, "name", str, i, "")
            what = f"drawn region {i} ('{name}')" if name else f"drawn region {i}"
            opacity = float(_field(region, "opacity", float, i, 1.0))
            if not 0.0 <= opacity <= 1.0:
                raise PaletteError(f"{what}: opacity must be in [0, 1], got {opacity}")
            fields.append((what, prompt, name, opacity, _field(region, "negative", str, i, ""), _field(region, "color", str, i, "")))
            plans.append(_planned_mask(region.get("mask"), width, height, base, what))
            img = plans[-1][1]
            if img is not None:
                pixels += img.size[0] * img.size[1]
                if max_pixels is not None and pixels > max_pixels:
                    raise PaletteError(f"regions_state would decode more than {max_pixels:,} mask pixels in one edit "
                                       f"({len(regions)} regions at {width} x {height}); use fewer regions or a smaller canvas")
        specs, masks = [], []
        for (index, img, x, y), (what, prompt, name, opacity, negative, color) in zip(plans, fields):
            if img is None:
                mask = base[index]  # shared, never written: a patch works on a copy
            elif index is None:
                mask = _coverage(img, f"{what}: mask PNG")
            else:
                mask = base[index].clone()
                patch = _coverage(img, f"{what}: mask patch PNG")
                mask[y:y + patch.shape[0], x:x + patch.shape[1]] = patch
            masks.append(mask)
            if not prompt.strip():
                if float(mask.max()) == 0.0:
                    continue
                raise PaletteError(f"{what}: has paint but no prompt; type what it should show, or clear it")
            specs.append(RegionSpec(prompt=prompt, mask=mask, strength=opacity, negative=negative, name=name, color=color))
    finally:
        for plan in plans:
            if plan[1] is not None:
                plan[1].close()
    return DecodedState(width, height, specs, masks)


def decode_state(text: str) -> tuple[int, int, list[RegionSpec]]:
    """regions_state -> (width, height, region specs); see read_state."""
    state = read_state(text)
    return state.width, state.height, state.specs


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
