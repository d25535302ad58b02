"""The drawing widget's state string: round trip, and clear errors for malformed data."""

import base64
import io
import json

import pytest
import torch
from PIL import Image

from rcca_core.palette import PaletteError, RegionSpec
from rcca_core.palette_state import DATA_URL, MAX_STATE_BYTES, decode_state, encode_state


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
