"""Stream batch engine: pipelining equals per-frame LCM sampling; edits enter with new frames."""

import pytest
import torch

from rcca_core.palette import PaletteError
from rcca_core.stream import (ImageSource, SlotBatch, StreamBatch, frame_noise, lcm_timesteps, parse_indices,
                               strength_timesteps)

SHAPE = (4, 6, 5)
SIGMAS = [14.6, 3.2, 1.1, 0.3]


def fake_x0(x, sigma, condition):
    """A batch-independent stand-in for a model: depends on the row's x, sigma and condition only."""
    c_in = 1.0 / torch.sqrt(1.0 + sigma.view(-1, 1, 1, 1) ** 2)
    return torch.tanh(x * c_in) * condition[:, 0].view(-1, 1, 1, 1) + condition[:, 1].view(-1, 1, 1, 1)


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, batch: SlotBatch):
        self.calls.append(batch)
        cond = torch.tensor([list(c) for c in batch.conditions])
        return fake_x0(batch.x, batch.sigmas, cond)


def lcm_reference(condition, frame, seed=7, sigmas=SIGMAS, initial_scale=None, image=None, mask=None):
    """Plain LCM sampling of one frame alone with the stream's per-frame noise, written as ComfyUI
    runs it: KSAMPLER.sample (noise_scaling with the latent image), KSamplerX0Inpaint (the noise
    mask blend around every model call) and sample_lcm (x0 + sigma_next * fresh noise)."""
    draws = frame_noise(seed, frame, len(sigmas), SHAPE)
    image = torch.zeros(SHAPE) if image is None else image
    x = draws[0] * (sigmas[0] if initial_scale is None else initial_scale) + image
    cond = torch.tensor([list(condition)])
    for s, sigma in enumerate(sigmas):
        if mask is not None:
            x = x * mask + (draws[0] * sigma + image) * (1.0 - mask)
        x0 = fake_x0(x.unsqueeze(0), torch.tensor([sigma]), cond)[0]
        if mask is not None:
            x0 = x0 * mask + image * (1.0 - mask)
        if s + 1 < len(sigmas):
            x = x0 + sigmas[s + 1] * draws[s + 1]
    return x0


def test_every_frame_equals_plain_lcm_sampling_of_that_frame():
    conditions = [(1.0, 0.0), (0.5, 0.2), (2.0, -0.1), (1.0, 0.3), (0.7, 0.0), (1.5, 0.1)]
    engine = StreamBatch(Recorder(), SIGMAS, SHAPE, seed=7, initial_scale=15.0)
    frames = engine.render(conditions)
    assert len(frames) == len(conditions)
    for f, (frame, cond) in enumerate(zip(frames, conditions)):
        torch.testing.assert_close(frame, lcm_reference(cond, f, initial_scale=15.0), atol=1e-6, rtol=0)


def test_one_model_call_per_tick_warm_up_then_one_frame_per_tick():
    rec = Recorder()
    engine = StreamBatch(rec, SIGMAS, SHAPE)
    emitted = []
    for i in range(6):
        engine.push((1.0, 0.0))
        emitted.append(len(engine.tick()))
    assert emitted == [0, 0, 0, 1, 1, 1]  # S - 1 = 3 warm-up ticks
    assert [len(c.steps) for c in rec.calls] == [1, 2, 3, 4, 4, 4]
    assert rec.calls[-1].steps == (3, 2, 1, 0)  # oldest frame (last step) first
    torch.testing.assert_close(rec.calls[-1].sigmas, torch.tensor(SIGMAS[::-1]))
    assert len(engine.flush()) == 3 and engine.in_flight == 0
    assert len(rec.calls) == 9


def test_an_edit_applies_to_frames_entering_after_it_only():
    a, b = (1.0, 0.0), (0.3, 0.5)
    rec = Recorder()
    edited = StreamBatch(rec, SIGMAS, SHAPE, seed=3).render([a, a, a, b, b, b])
    only_a = StreamBatch(Recorder(), SIGMAS, SHAPE, seed=3).render([a] * 6)
    only_b = StreamBatch(Recorder(), SIGMAS, SHAPE, seed=3).render([b] * 6)
    for f in range(3):  # in flight when the edit arrived: keep their palette
        torch.testing.assert_close(edited[f], only_a[f], atol=0, rtol=0)
    for f in range(3, 6):
        torch.testing.assert_close(edited[f], only_b[f], atol=0, rtol=0)
    assert rec.calls[3].conditions == (a, a, a, b)  # the tick where the edit entered: slot 1 has it


def test_frame_noise_is_per_frame_and_deterministic():
    assert torch.equal(frame_noise(1, 5, 3, SHAPE), frame_noise(1, 5, 3, SHAPE))
    assert not torch.equal(frame_noise(1, 5, 3, SHAPE), frame_noise(1, 6, 3, SHAPE))
    assert frame_noise(1, 5, 3, SHAPE).shape == (3, *SHAPE)


def test_residual_self_cfg_uses_the_slot_noise_as_virtual_negative():
    rec = Recorder()
    engine = StreamBatch(rec, SIGMAS[:1], SHAPE, residual_cfg=2.0)
    engine.push((1.0, 0.0))
    (_, got), = engine.tick()
    batch = rec.calls[0]
    x0_cond = fake_x0(batch.x, batch.sigmas, torch.tensor([[1.0, 0.0]]))[0]
    eps_cond = (batch.x[0] - x0_cond) / SIGMAS[0]
    want = batch.x[0] - SIGMAS[0] * (batch.noise[0] + 2.0 * (eps_cond - batch.noise[0]))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(batch.noise[0], frame_noise(0, 0, 1, SHAPE)[0])


def test_lcm_schedules():
    assert lcm_timesteps([0, 12, 24, 36]) == [999, 759, 519, 279]
    assert lcm_timesteps([0, 4, 12, 25, 37]) == [999, 919, 759, 499, 259]
    assert lcm_timesteps([0, 1], schedule_steps=4) == [999, 749]
    assert parse_indices(" 0, 4 ,12,25, 37 ") == [0, 4, 12, 25, 37]


@pytest.mark.parametrize("make, message", [
    (lambda: parse_indices(""), "the timestep list is empty"),
    (lambda: parse_indices("0, a"), "whole numbers"),
    (lambda: lcm_timesteps([]), "empty"),
    (lambda: lcm_timesteps([0, 50]), r"\[50\] are outside the 50-step schedule"),
    (lambda: lcm_timesteps([-1, 3]), "outside"),
    (lambda: lcm_timesteps([0, 24, 12]), "increase strictly"),
    (lambda: lcm_timesteps([0, 12, 12]), "increase strictly"),
    (lambda: lcm_timesteps([0], schedule_steps=0), "schedule steps"),
    (lambda: StreamBatch(Recorder(), [1.0, 2.0], SHAPE), "strictly decreasing"),
    (lambda: StreamBatch(Recorder(), [], SHAPE), "at least one timestep"),
])
def test_bad_schedules_are_refused(make, message):
    with pytest.raises(PaletteError, match=message):
        make()


def test_fixed_batch_always_calls_with_s_rows_and_gives_the_same_frames():
    conditions = [(1.0, 0.0), (0.5, 0.2), (2.0, -0.1)]
    rec = Recorder()
    fixed = StreamBatch(rec, SIGMAS, SHAPE, seed=2, fixed_batch=True).render(conditions)
    plain = StreamBatch(Recorder(), SIGMAS, SHAPE, seed=2).render(conditions)
    assert {len(c.steps) for c in rec.calls} == {len(SIGMAS)}
    for a, b in zip(fixed, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_fixed_noise_frames_equal_plain_lcm_with_frame_zeros_draws():
    conditions = [(1.0, 0.0), (0.5, 0.2), (2.0, -0.1), (1.0, 0.3), (0.7, 0.0)]
    frames = StreamBatch(Recorder(), SIGMAS, SHAPE, seed=7, initial_scale=15.0, noise="fixed").render(conditions)
    for frame, cond in zip(frames, conditions):
        torch.testing.assert_close(frame, lcm_reference(cond, 0, initial_scale=15.0), atol=1e-6, rtol=0)


def test_fixed_noise_shares_every_draw_initial_and_renoising():
    rec = Recorder()
    engine = StreamBatch(rec, SIGMAS, SHAPE, seed=4, noise="fixed")
    for _ in range(6):
        engine.push((1.0, 0.0))
        engine.tick()
    draws = frame_noise(4, 0, len(SIGMAS), SHAPE)
    steady = rec.calls[-1]  # slots at steps 3, 2, 1, 0 hold four different frames
    assert steady.steps == (3, 2, 1, 0)
    for row, step in enumerate(steady.steps):
        torch.testing.assert_close(steady.noise[row], draws[step], atol=0, rtol=0)
    assert engine.draws(0) is engine.draws(5)  # made once


def test_unchanged_condition_gives_identical_frames_with_fixed_noise_and_different_ones_per_frame():
    conditions = [(1.0, 0.2)] * 6
    fixed = StreamBatch(Recorder(), SIGMAS, SHAPE, seed=9, noise="fixed").render(conditions)
    per_frame = StreamBatch(Recorder(), SIGMAS, SHAPE, seed=9, noise="per_frame").render(conditions)
    for f in range(1, 6):
        torch.testing.assert_close(fixed[f], fixed[0], atol=0, rtol=0)
        assert (per_frame[f] - per_frame[0]).abs().max() > 1e-2
    torch.testing.assert_close(fixed[0], per_frame[0], atol=0, rtol=0)  # frame 0: the same draws in both modes


def test_a_stroke_with_fixed_noise_changes_only_the_frames_after_it():
    a, b = (1.0, 0.0), (0.3, 0.5)
    frames = StreamBatch(Recorder(), SIGMAS, SHAPE, seed=3, noise="fixed").render([a, a, a, b, b, b])
    for f in (1, 2):
        torch.testing.assert_close(frames[f], frames[0], atol=0, rtol=0)
    for f in (4, 5):
        torch.testing.assert_close(frames[f], frames[3], atol=0, rtol=0)
    assert (frames[3] - frames[0]).abs().max() > 1e-2


def photo_and_mask():
    g = torch.Generator().manual_seed(5)
    image = torch.randn(SHAPE, generator=g) * 2.0
    mask = torch.zeros(1, *SHAPE[1:])
    mask[..., :3, :] = 1.0  # repaint the top half
    mask[..., 3, 2] = 0.5
    return image, mask


@pytest.mark.parametrize("noise", ["per_frame", "fixed"])
@pytest.mark.parametrize("inpaint", [False, True])
def test_image_to_image_frames_equal_plain_lcm_image_to_image(noise, inpaint):
    image, mask = photo_and_mask()
    sigmas = SIGMAS[2:]  # strength kept the two last timesteps: the image starts at sigma_1 (not the max)
    source = ImageSource(image, mask if inpaint else None)
    conditions = [(1.0, 0.0), (0.5, 0.2), (2.0, -0.1), (1.0, 0.3)]
    frames = StreamBatch(Recorder(), sigmas, SHAPE, seed=7, noise=noise).render(conditions, sources=[source] * 4)
    for f, (frame, cond) in enumerate(zip(frames, conditions)):
        want = lcm_reference(cond, 0 if noise == "fixed" else f, sigmas=sigmas, image=image,
                             mask=mask.expand(SHAPE) if inpaint else None)
        torch.testing.assert_close(frame, want, atol=1e-6, rtol=0)
        if inpaint:  # unmasked pixels are the photo's
            torch.testing.assert_close(frame[:, 4:], image[:, 4:], atol=0, rtol=0)
        else:
            assert (frame - lcm_reference(cond, 0 if noise == "fixed" else f, sigmas=sigmas)).abs().max() > 1e-2


def test_a_slot_without_image_next_to_inpainting_slots_is_untouched():
    image, mask = photo_and_mask()
    engine = StreamBatch(Recorder(), SIGMAS, SHAPE, seed=7)
    frames = engine.render([(1.0, 0.0), (0.5, 0.2), (0.5, 0.2)], sources=[None, ImageSource(image, mask), None])
    torch.testing.assert_close(frames[0], lcm_reference((1.0, 0.0), 0), atol=1e-6, rtol=0)
    torch.testing.assert_close(frames[2], lcm_reference((0.5, 0.2), 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(frames[1], lcm_reference((0.5, 0.2), 1, image=image, mask=mask.expand(SHAPE)), atol=1e-6, rtol=0)


def test_strength_selects_the_timesteps_at_or_below_its_point():
    lcm4 = [999, 759, 519, 279]
    assert strength_timesteps(lcm4, 1.0) == lcm4
    assert strength_timesteps(lcm4, 0.76) == [759, 519, 279]
    assert strength_timesteps(lcm4, 0.6) == [519, 279]
    assert strength_timesteps(lcm4, 0.52) == [519, 279]
    assert strength_timesteps(lcm4, 0.5) == [279]
    assert strength_timesteps(lcm4, 0.28) == [279]


@pytest.mark.parametrize("strength, message", [
    (0.2, r"strength 0.2 keeps none of the timesteps \[999, 759, 519, 279\].*t = 279, needs strength >= 0.28"),
    (0.0, r"strength must be a number in \(0, 1\]"),
    (1.5, r"strength must be a number in \(0, 1\].*got 1.5"),
    (-0.1, "strength must be"),
    (float("nan"), "strength must be"),
    ("0.5", "strength must be"),
])
def test_bad_strength_is_refused(strength, message):
    with pytest.raises(PaletteError, match=message):
        strength_timesteps([999, 759, 519, 279], strength)


def test_unknown_noise_mode_is_refused():
    with pytest.raises(PaletteError, match="noise must be one of per_frame, fixed, got 'same'"):
        StreamBatch(Recorder(), SIGMAS, SHAPE, noise="same")
