"""Stream batch engine: pipelining equals per-frame LCM sampling; edits enter with new frames."""

import pytest
import torch

from rcca_core.palette import PaletteError
from rcca_core.stream import SlotBatch, StreamBatch, frame_noise, lcm_timesteps, parse_indices

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


def lcm_reference(condition, frame, seed=7, sigmas=SIGMAS, initial_scale=None):
    """Plain LCM sampling of one frame alone with the stream's per-frame noise."""
    draws = frame_noise(seed, frame, len(sigmas), SHAPE)
    x = draws[0] * (sigmas[0] if initial_scale is None else initial_scale)
    cond = torch.tensor([list(condition)])
    for s, sigma in enumerate(sigmas):
        x0 = fake_x0(x.unsqueeze(0), torch.tensor([sigma]), cond)[0]
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
