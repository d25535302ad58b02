"""Stream batch: pipelined LCM denoising, one model call per tick for every step in flight.

Slots hold latents at timesteps t_1 > ... > t_S. Each tick runs ONE model call on all occupied
slots (each with its own sigma and its own frame's condition), takes every slot's x0
prediction, emits the last slot's x0 as a finished frame, re-noises the others to their next
sigma and shifts them; a new frame's noise enters slot 1. After S - 1 warm-up ticks one frame
leaves per tick. With the same per-frame noise, a frame equals plain LCM sampling of that
frame alone: x <- x0(x, sigma_s) + sigma_{s+1} * eps_{s+1}.

Sigmas are in ComfyUI's k-diffusion scale (x = x0 + sigma * eps). The model, its conditioning
and the region mode live behind a `Denoiser`; this module never imports ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from .palette import PaletteError

DEFAULT_LCM_INDICES = (0, 12, 24, 36)  # an LCM 4-step schedule: indices of a 50-step schedule
SEMANTIC_DRAW_INDICES = (0, 4, 12, 25, 37)  # SemanticDraw's default t_index_list


def parse_indices(text: str) -> list[int]:
    """'0, 12, 24, 36' -> [0, 12, 24, 36], with a clear error for anything else."""
    parts = [p for p in (text or "").replace(";", ",").replace(" ", ",").split(",") if p]
    if not parts:
        raise PaletteError("the timestep list is empty; give indices of the schedule, e.g. '0, 12, 24, 36'")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise PaletteError(f"timestep list {text!r}: use whole numbers separated by commas, e.g. '0, 12, 24, 36'") from None


def lcm_timesteps(indices: Sequence[int], schedule_steps: int = 50, train_steps: int = 1000) -> list[int]:
    """Indices of an LCM schedule of `schedule_steps` steps -> model timesteps (LCMScheduler's
    spacing: index 0 is t = train_steps - 1, each index lowers t by train_steps // schedule_steps)."""
    if not isinstance(schedule_steps, int) or not 1 <= schedule_steps <= train_steps:
        raise PaletteError(f"schedule steps must be a whole number in [1, {train_steps}], got {schedule_steps!r}")
    indices = list(indices)
    if not indices:
        raise PaletteError("the timestep list is empty; give indices of the schedule, e.g. '0, 12, 24, 36'")
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < schedule_steps]
    if bad:
        raise PaletteError(f"timestep indices {bad} are outside the {schedule_steps}-step schedule (0 .. {schedule_steps - 1})")
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise PaletteError(f"timestep indices must increase strictly (from noisy to clean), got {indices}")
    c = train_steps // schedule_steps
    return [(schedule_steps - i) * c - 1 for i in indices]


def frame_noise(seed: int, frame: int, steps: int, shape: Sequence[int]) -> torch.Tensor:
    """Frame f's noise, (steps, *shape) float32 on the CPU: draw 0 starts the frame, draw s
    re-noises it to the s-th sigma. Independent of the batch and of when the frame is rendered."""
    gen = torch.Generator().manual_seed((int(seed) + int(frame)) % (2 ** 63))
    return torch.randn((steps, *shape), generator=gen)


class SlotBatch(NamedTuple):
    """What a denoiser sees in one tick: B occupied slots."""

    x: torch.Tensor  # (B, C, H, W) noisy latents
    sigmas: torch.Tensor  # (B,) each slot's sigma
    steps: tuple[int, ...]  # each slot's step index s (0 = noisiest)
    conditions: tuple[Any, ...]  # each slot's frame condition (palette state)
    noise: torch.Tensor  # (B, C, H, W) the draw that brought each slot to its sigma


Denoiser = Callable[[SlotBatch], torch.Tensor]
"""SlotBatch -> x0 predictions (B, C, H, W)."""


@dataclass
class _Slot:
    frame: int
    condition: Any
    step: int
    x: torch.Tensor
    draws: torch.Tensor


class StreamBatch:
    """The pipelined sampler. `push` a frame's condition, `tick` once per frame; `flush` drains.

    initial_scale: the first draw is multiplied by it (ComfyUI: sqrt(1 + sigma_1^2) when sigma_1
    is the model's largest sigma, else sigma_1). residual_cfg: None, or StreamDiffusion's
    self-negative residual CFG scale (the slot's own noise is the virtual negative).
    fixed_batch: always call the denoiser with S rows (warm-up and flush ticks repeat the last
    slot and drop its copies), so a compiled model or a CUDA graph sees one shape only.
    """

    def __init__(self, denoiser: Denoiser, sigmas: Sequence[float], latent_shape: Sequence[int], seed: int = 0,
                 initial_scale: float | None = None, residual_cfg: float | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, fixed_batch: bool = False) -> None:
        sigmas = [float(s) for s in sigmas]
        if not sigmas:
            raise PaletteError("a stream needs at least one timestep")
        if any(not math.isfinite(s) or s <= 0 for s in sigmas) or any(b >= a for a, b in zip(sigmas, sigmas[1:])):
            raise PaletteError(f"stream sigmas must be positive and strictly decreasing, got {sigmas}")
        self.denoiser = denoiser
        self.sigmas = sigmas
        self.latent_shape = tuple(int(v) for v in latent_shape)
        self.seed = int(seed)
        self.initial_scale = sigmas[0] if initial_scale is None else float(initial_scale)
        self.residual_cfg = residual_cfg
        self.device = torch.device(device)
        self.dtype = dtype
        self.fixed_batch = fixed_batch
        self._slots: list[_Slot] = []
        self._next_frame = 0
        self._sigma_tensors: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def depth(self) -> int:
        """S: the number of steps, and of frames in flight once warm."""
        return len(self.sigmas)

    @property
    def in_flight(self) -> int:
        return len(self._slots)

    def push(self, condition: Any) -> int:
        """A new frame enters slot 1 with the given condition; returns its frame index."""
        if self._slots and self._slots[-1].step == 0:
            raise RuntimeError("push() twice without tick(): slot 1 is taken")
        frame = self._next_frame
        self._next_frame += 1
        draws = frame_noise(self.seed, frame, self.depth, self.latent_shape).to(self.device, self.dtype)
        self._slots.append(_Slot(frame, condition, 0, draws[0] * self.initial_scale, draws))
        return frame

    def tick(self) -> list[tuple[int, torch.Tensor]]:
        """One model call on every slot in flight; returns the frames that finished, (index, x0 (C, H, W))."""
        if not self._slots:
            return []
        slots = self._slots
        if self.fixed_batch and len(slots) < self.depth:
            slots = slots + [slots[-1]] * (self.depth - len(slots))
        steps = tuple(s.step for s in slots)
        sigmas = self._sigma_tensor(steps)
        batch = SlotBatch(
            x=torch.stack([s.x for s in slots]),
            sigmas=sigmas,
            steps=steps,
            conditions=tuple(s.condition for s in slots),
            noise=torch.stack([s.draws[s.step] for s in slots]),
        )
        x0 = self.denoiser(batch)
        if self.residual_cfg is not None:
            x0 = self._residual_cfg(batch, x0)
        done, kept = [], []
        for i, slot in enumerate(self._slots):
            if slot.step == self.depth - 1:
                done.append((slot.frame, x0[i]))
            else:
                slot.step += 1
                slot.x = x0[i] + self.sigmas[slot.step] * slot.draws[slot.step]
                kept.append(slot)
        self._slots = kept
        return done

    def flush(self) -> list[tuple[int, torch.Tensor]]:
        """Tick without new frames until the pipe is empty."""
        out = []
        while self._slots:
            out.extend(self.tick())
        return out

    def render(self, conditions: Sequence[Any], on_frame: Callable[[int, torch.Tensor], None] | None = None) -> list[torch.Tensor]:
        """Frames for a sequence of per-frame conditions, in order: push + tick per frame, then flush."""
        frames: dict[int, torch.Tensor] = {}

        def take(done):
            for index, x0 in done:
                frames[index] = x0
                if on_frame is not None:
                    on_frame(index, x0)

        first = self._next_frame
        for condition in conditions:
            self.push(condition)
            take(self.tick())
        take(self.flush())
        return [frames[first + i] for i in range(len(conditions))]

    def _sigma_tensor(self, steps: tuple[int, ...]) -> torch.Tensor:
        # the slot layout repeats tick after tick: build each (B,) sigma tensor once
        t = self._sigma_tensors.get(steps)
        if t is None:
            t = torch.tensor([self.sigmas[s] for s in steps], dtype=torch.float32, device=self.device)
            self._sigma_tensors[steps] = t
        return t

    def _residual_cfg(self, batch: SlotBatch, x0: torch.Tensor) -> torch.Tensor:
        sigma = batch.sigmas.to(x0.dtype).view(-1, 1, 1, 1)
        eps_cond = (batch.x - x0) / sigma
        eps = batch.noise + self.residual_cfg * (eps_cond - batch.noise)
        return batch.x - sigma * eps
