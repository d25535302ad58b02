"""The drawing widget's state string: round trip, and clear errors for malformed data."""

import base64
import io
import json

import pytest
import torch
from PIL import Image

from rcca_core.palette import PaletteError, RegionSpec
from rcca_core.palette_state import (DATA_URL, MAX_STATE_BYTES, CanvasMismatch, decode_state, encode_mask, encode_state,
                                      read_state)


def png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return DATA_URL + base64.b64encode(buf.getvalue()).decode()


def state(regions, width=16, height=8, **extra):
    return json.dumps({"version": 1, "width": width, "height": height, "regions": regions, **extra})


def test_round_trip_keeps_masks_prompts_and_opacity():
    mask = torch.zeros(8, 16)
    mask[:, :5] = 1.0
    mask[2, 10] = 0.5
    specs = [RegionSpec("a red fox", mask, strength=0.75, negative="blurry", name="fox", color="#e6194b")]
    w, h, back = decode_state(encode_state(specs, 16, 8))
    assert (w, h) == (16, 8) and len(back) == 1
    r = back[0]
    assert (r.prompt, r.negative, r.name, r.color, r.strength) == ("a red fox", "blurry", "fox", "#e6194b", 0.75)
    torch.testing.assert_close(r.mask, mask, atol=1 / 255, rtol=0)


def test_rgba_masks_use_alpha_like_a_browser_canvas():
    img = Image.new("RGBA", (16, 8), (255, 0, 0, 0))
    img.putpixel((3, 2), (230, 25, 75, 255))
    _, _, (r,) = decode_state(state([{"prompt": "a fox", "mask": png(img)}]))
    assert float(r.mask[2, 3]) == 1.0 and float(r.mask.sum()) == 1.0


def test_unpainted_regions_without_prompt_are_skipped():
    empty = png(Image.new("L", (16, 8), 0))
    assert decode_state(state([{"prompt": "", "mask": empty}]))[2] == []
    assert decode_state("")[2] == []


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"version": 2}), '"version": 1'),
    (state([], width=4), r"width and height must be whole numbers in \[8, 16384\]"),
    (state({"a": 1}), "'regions' must be a list"),
    (state([{"prompt": "x", "mask": "data:image/jpeg;base64,AAAA"}]), "must be a 'data:image/png;base64,"),
    (state([{"prompt": "x", "mask": DATA_URL + "!!!"}]), "not valid base64"),
    (state([{"prompt": "x", "mask": DATA_URL + base64.b64encode(b"garbage").decode()}]), "cannot be decoded"),
    (state([{"prompt": "x", "mask": png(Image.new("L", (8, 8)))}]), "mask is 8 x 8 but the drawing is 16 x 8"),
    (state([{"prompt": 3, "mask": png(Image.new("L", (16, 8)))}]), "field 'prompt' must be a str"),
    (state([{"prompt": "x", "opacity": 2, "mask": png(Image.new("L", (16, 8)))}]), r"opacity must be in \[0, 1\]"),
    (state([{"prompt": "", "mask": png(Image.new("L", (16, 8), 255))}]), "has paint but no prompt"),
    (state([{"prompt": "x", "mask": png(Image.new("L", (16, 8)))}] * 17), "at most 16"),
    ("x" * (MAX_STATE_BYTES + 1), "larger than 32 MiB"),
])
def test_malformed_state_is_refused_clearly(text, message):
    with pytest.raises(PaletteError, match=message):
        decode_state(text)


def stroke_masks(seed, n=3, width=16, height=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(height, width, generator=g) * 255).round() / 255 for _ in range(n)]


def region(prompt, mask, **fields):
    return {"prompt": prompt, "mask": mask, **fields}


def patch_png(values):
    return png(Image.fromarray((values * 255).round().to(torch.uint8).numpy(), mode="L"))


def test_a_delta_rebuilds_exactly_the_full_state():
    a = stroke_masks(0)
    base = read_state(encode_state([RegionSpec(f"p{i}", m) for i, m in enumerate(a)], 16, 8))
    # the next drawing: region 1 removed, region 2 got a stroke inside x 3..6, y 2..5, a new region 3
    b2 = a[2].clone()
    b2[2:5, 3:7] = 1.0
    new = stroke_masks(1, 1)[0]
    full = read_state(encode_state([RegionSpec("p0", a[0]), RegionSpec("p2", b2), RegionSpec("new", new)], 16, 8))
    delta = state([region("p0", {"base": 0}),
                   region("p2", {"base": 2, "patch": {"x": 3, "y": 2, "png": patch_png(b2[2:5, 3:7])}}),
                   region("new", encode_mask(new))])
    rebuilt = read_state(delta, base=base.masks)
    assert [r.prompt for r in rebuilt.specs] == ["p0", "p2", "new"]
    for got, want in zip(rebuilt.masks, full.masks):
        assert torch.equal(got, want)
    assert torch.equal(base.masks[2], a[2]), "a patch must not write into the base it was applied to"


@pytest.mark.parametrize("mask, base, message", [
    ({"base": 0}, None, "accepted only in a live edit that names that edit in 'base_seq'"),
    ({"base": 3}, "one", r"must be the index of a region of the base edit \(0 to 0\)"),
    ({"base": True}, "one", "must be the index of a region"),
    ({"base": 0, "patch": {"x": 10, "y": 0, "png": "P8x8"}}, "one", r"patch 8 x 8 at \(10, 0\) does not lie inside the 16 x 8"),
    ({"base": 0, "patch": {"x": 0, "y": 0}}, "one", "mask patch must be"),
    ({"base": 0, "keep": 1}, "one", r"mask must be a 'data:image/png;base64,...' string, \{\"base\": i\}"),
])
def test_malformed_deltas_are_refused_clearly(mask, base, message):
    if isinstance(mask.get("patch"), dict) and mask["patch"].get("png") == "P8x8":
        mask["patch"]["png"] = png(Image.new("L", (8, 8)))
    masks = [torch.zeros(8, 16)] if base else None
    with pytest.raises(PaletteError, match=message):
        read_state(state([region("x", mask)]), base=masks)


def broken_png(width, height):
    """A PNG whose header is valid and whose pixel data is garbage: decoding it fails."""
    buf = io.BytesIO()
    Image.new("L", (width, height)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    idat = raw.index(b"IDAT")
    raw[idat + 4: idat + 20] = b"\xff" * 16
    return DATA_URL + base64.b64encode(bytes(raw)).decode()


def test_sizes_are_checked_before_any_pixel_is_decoded():
    # each case would fail with "cannot be decoded" if its pixels were read
    with pytest.raises(CanvasMismatch, match="the drawing is 8192 x 8192 but this live session renders 16 x 8"):
        read_state(state([region("x", broken_png(8192, 8192))], width=8192, height=8192), canvas=(16, 8))
    with pytest.raises(PaletteError, match="mask is 8192 x 8192 but the drawing is 16 x 8"):
        read_state(state([region("x", broken_png(8192, 8192))]), canvas=(16, 8))
    with pytest.raises(PaletteError, match="more than 300 mask pixels in one edit"):
        read_state(state([region("x", broken_png(16, 8))] * 3), max_pixels=300)
    with pytest.raises(PaletteError, match="cannot be decoded"):  # the budget counts what it decodes
        read_state(state([region("x", broken_png(16, 8))] * 3), max_pixels=384)


def test_a_photo_is_decoded_to_an_image_and_its_size_checked_from_the_header():
    from rcca_core.palette_state import decode_photo

    buf = io.BytesIO()
    Image.new("RGBA", (16, 8), (255, 0, 51, 10)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    image = decode_photo(url, 16, 8)
    assert image.shape == (1, 8, 16, 3) and image.dtype == torch.float32
    torch.testing.assert_close(image[0, 0, 0], torch.tensor([1.0, 0.0, 0.2]))  # alpha dropped
    with pytest.raises(PaletteError, match="photo is 16 x 8 px but the canvas is 8 x 8 px"):
        decode_photo(url, 8, 8)
    with pytest.raises(PaletteError, match="must be a 'data:image/png;base64,...' string"):
        decode_photo("data:image/jpeg;base64,AAAA", 16, 8)
