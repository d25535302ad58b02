"""Palette model: validation with clear messages, coverage and background."""

import pytest
import torch

from rcca_core.palette import MAX_REGIONS, Palette, PaletteError, RegionSpec, add_region


def encode(text):
    return torch.full((1, 4, 8), float(len(text)))


def build(specs, w=32, h=24):
    return Palette.build(specs, "a meadow", w, h, encode)


def test_background_is_one_minus_sum_clipped():
    a = torch.zeros(24, 32); a[:, :20] = 0.7
    b = torch.zeros(24, 32); b[:, 10:] = 0.6
    cov = build([RegionSpec("a dog", a), RegionSpec("a cat", b, strength=0.5)]).coverage_with_background()
    assert cov.shape == (1, 3, 24, 32)
    torch.testing.assert_close(cov[0, 2], b * 0.5)
    torch.testing.assert_close(cov[0, 0], (1 - a - 0.5 * b).clamp(0, 1))
    assert float(cov[0, 0, 0, 0]) == pytest.approx(0.3) and float(cov[0, 0, 0, 31]) == pytest.approx(0.7)


def test_chain_is_immutable_and_names_and_colours_default():
    first = add_region((), RegionSpec("a dog", torch.ones(24, 32)))
    second = add_region(first, RegionSpec("a cat", torch.ones(24, 32), name="cat", color="#00ff00"))
    assert len(first) == 1 and len(second) == 2 and second[0] is first[0]
    assert first[0].name == "region 1" and first[0].color.startswith("#")
    assert (second[1].name, second[1].color) == ("cat", "#00ff00")


@pytest.mark.parametrize("make, message", [
    (lambda: build([]), "the palette is empty"),
    (lambda: RegionSpec("   ", torch.ones(24, 32)), "prompt is empty"),
    (lambda: RegionSpec("a dog", torch.full((24, 32), float("nan"))), "NaN or infinite"),
    (lambda: RegionSpec("a dog", torch.full((24, 32), 1.5)), r"values must lie in \[0, 1\], got min 1.5"),
    (lambda: RegionSpec("a dog", -torch.ones(24, 32)), r"must lie in \[0, 1\]"),
    (lambda: RegionSpec("a dog", torch.ones(24, 32, dtype=torch.int64)), "float tensor"),
    (lambda: RegionSpec("a dog", torch.ones(2, 3, 24, 32)), r"must be \(H, W\) or \(N, H, W\)"),
    (lambda: RegionSpec("a dog", torch.ones(24, 32), strength=1.5), r"strength must be a number in \[0, 1\]"),
    (lambda: RegionSpec("a dog", torch.ones(24, 32), color="red"), "#rrggbb"),
    (lambda: build([RegionSpec("a dog", torch.ones(30, 32))]), "mask is 32 x 30 but the canvas is 32 x 24"),
    (lambda: build([RegionSpec("a", torch.ones(2, 24, 32)), RegionSpec("b", torch.ones(3, 24, 32))]), "different sizes"),
    (lambda: build([RegionSpec(f"r{i}", torch.ones(24, 32)) for i in range(MAX_REGIONS + 1)]), f"at most {MAX_REGIONS}"),
])
def test_bad_input_is_refused_with_a_clear_message(make, message):
    with pytest.raises(PaletteError, match=message):
        make()


def test_masks_with_the_canvas_aspect_ratio_are_resized():
    big = torch.zeros(48, 64); big[:, :32] = 1  # twice the canvas, same aspect ratio
    cov = build([RegionSpec("a dog", big)]).region_coverage()
    assert cov.shape == (1, 1, 24, 32)
    assert float(cov[0, 0, :, :15].min()) == 1.0 and float(cov[0, 0, :, 17:].max()) == 0.0


def test_mask_batch_gives_per_sample_coverage_and_single_masks_broadcast():
    p = build([RegionSpec("a", torch.stack([torch.ones(24, 32), torch.zeros(24, 32)])), RegionSpec("b", torch.ones(24, 32) * 0.5)])
    assert p.samples == 2
    cov = p.coverage_with_background()
    assert cov.shape == (2, 3, 24, 32)
    assert float(cov[1, 2].mean()) == 0.5 and float(cov[1, 0].mean()) == 0.5 and float(cov[0, 0].max()) == 0.0


def test_prompts_are_encoded_once_each_and_negatives_only_when_given():
    seen = []

    def counting(text):
        seen.append(text)
        return encode(text)

    p = Palette.build([RegionSpec("a dog", torch.ones(24, 32), negative="blurry"), RegionSpec("a cat", torch.ones(24, 32))],
                      "bg", 32, 24, counting)
    assert sorted(seen) == ["a cat", "a dog", "bg", "blurry"]
    assert p.regions[0].negative_context is not None and p.regions[1].negative_context is None
    assert p.context_dim == 8
