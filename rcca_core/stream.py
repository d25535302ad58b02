"""Stream batch: pipelined LCM denoising, one model call per tick for every step in flight.

Slots hold latents at timesteps t_1 > ... > t_S. Each tick runs ONE model call on all occupied
slots (each with its own sigma and its own frame's condition), takes every slot's x0
prediction, emits the last slot's x0 as a finished frame, re-noises the others to their next
sigma and shifts them; a new frame's noise enters slot 1. After S - 1 warm-up ticks one frame
leaves per tick. With the same per-frame noise, a frame equals plain LCM sampling of that
frame alone: x <- x0(x, sigma_s) + sigma_{s+1} * eps_{s+1}.

Noise. A frame uses S draws: draw 0 is its starting noise, draw s (s >= 1) re-noises its x0 to
sigma_s after step s - 1. `per_frame`: frame f's draws come from seed + f (animations).
`fixed`: every frame uses the same S draws (frame 0's, seed + 0): at every tick each slot at
step s adds the draw s that every frame adds at step s, so a frame is a function of its
condition (and image) alone; an unchanged drawing gives the same picture, and frame 0 is the
same in both modes.

Image-to-image (`ImageSource`): a frame starts from x = image + scale * draw 0 instead of
scale * draw 0 (ComfyUI's noise_scaling with a latent image), at the first of the timesteps
the caller kept for its strength (`strength_timesteps`). With a mask (1 = repaint, 0 = keep
the photo) every step blends as ComfyUI's KSampler does with a noise mask: before the model
call x <- x * m + (image + sigma_s * draw 0) * (1 - m), after it x0 <- x0 * m + image * (1 - m).

Sigmas are in ComfyUI's k-diffusion scale (x = x0 + sigma * eps). The model, its conditioning
and the region mode live behind a `Denoiser`; this module never imports ComfyUI.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch

from .palette import PaletteError

NOISE_MODES = ("per_frame", "fixed")
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


def check_strength(strength: float) -> None:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not 0.0 < strength <= 1.0:
        raise PaletteError(f"strength must be a number in (0, 1] (the share of the noise schedule the image is "
                           f"noised to; 1 = full noise), got {strength!r}")


def strength_timesteps(timesteps: Sequence[int], strength: float, train_steps: int = 1000) -> list[int]:
    """Image-to-image: the timesteps of the list at or below the point `strength` selects. A
    timestep t is kept when (t + 1) / train_steps <= strength, so strength 1 keeps them all (the
    image under full noise, as KSampler's denoise 1), 0.6 keeps t <= 599 (of 999, 759, 519, 279:
    519 and 279), as ComfyUI's denoise starts its schedule at about denoise x 1000."""
    check_strength(strength)
    timesteps = list(timesteps)
    kept = [t for t in timesteps if (t + 1) <= strength * train_steps + 1e-6]
    if not kept:
        last = min(timesteps)
        raise PaletteError(f"strength {strength:g} keeps none of the timesteps {timesteps} (a timestep t is kept when "
                           f"(t + 1) / {train_steps} <= strength): the last one, t = {last}, needs strength >= "
                           f"{(last + 1) / train_steps:g}; raise strength or add a later index to the timestep list")
    return kept


def frame_noise(seed: int, frame: int, steps: int, shape: Sequence[int]) -> torch.Tensor:
    """Frame f's noise, (steps, *shape) float32 on the CPU: draw 0 starts the frame, draw s
    re-noises it to the s-th sigma. Independent of the batch and of when the frame is rendered."""
    gen = torch.Generator().manual_seed((int(seed) + int(frame)) % (2 ** 63))
    return torch.randn((steps, *shape), generator=gen)


@dataclass(frozen=True)
class ImageSource:
    """Image-to-image for one frame: `latent` (C, H, W) in the model's space; `mask` None (the
    whole image is redrawn) or (1 or C, H, W) in [0, 1] at latent size, 1 = repaint, 0 = keep."""

    latent: torch.Tensor
    mask: torch.Tensor | None = None


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
    source: ImageSource | None = None


class StreamBatch:
    """The pipelined sampler. `push` a frame's condition, `tick` once per frame; `flush` drains.

    initial_scale: the first draw is multiplied by it (ComfyUI: sqrt(1 + sigma_1^2) when sigma_1
    is the model's largest sigma, else sigma_1). residual_cfg: None, or StreamDiffusion's
    self-negative residual CFG scale (the slot's own noise is the virtual negative).
    fixed_batch: always call the denoiser with S rows (warm-up and flush ticks repeat the last
    slot and drop its copies), so a compiled model or a CUDA graph sees one shape only.
    noise: 'per_frame' (frame f's draws from seed + f) or 'fixed' (every frame uses frame 0's draws).
    first_frame: the index of the first frame pushed.
    """

    def __init__(self, denoiser: Denoiser, sigmas: Sequence[float], latent_shape: Sequence[int], seed: int = 0,
                 initial_scale: float | None = None, residual_cfg: float | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, fixed_batch: bool = False,
                 noise: str = "per_frame", first_frame: int = 0) -> None:
        if noise not in NOISE_MODES:
            raise PaletteError(f"noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
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
        self.noise = noise
        self._fixed_draws: torch.Tensor | None = None
        self._slots: list[_Slot] = []
        self._next_frame = int(first_frame)  # a restarted live stream keeps counting
        self._sigma_tensors: dict[tuple[int, ...], torch.Tensor] = {}

    @property
    def depth(self) -> int:
        """S: the number of steps, and of frames in flight once warm."""
        return len(self.sigmas)

    @property
    def next_frame(self) -> int:
        """The index the next pushed frame gets."""
        return self._next_frame

    @property
    def in_flight(self) -> int:
        return len(self._slots)

    def draws(self, frame: int) -> torch.Tensor:
        """Frame `frame`'s S draws on the stream's device (the fixed draws are made once)."""
        if self.noise == "fixed":
            if self._fixed_draws is None:
                self._fixed_draws = frame_noise(self.seed, 0, self.depth, self.latent_shape).to(self.device, self.dtype)
            return self._fixed_draws
        return frame_noise(self.seed, frame, self.depth, self.latent_shape).to(self.device, self.dtype)

    def push(self, condition: Any, source: ImageSource | None = None) -> int:
        """A new frame enters slot 1 with the given condition (and image, for image-to-image);
        returns its frame index."""
        if self._slots and self._slots[-1].step == 0:
            raise RuntimeError("push() twice without tick(): slot 1 is taken")
        frame = self._next_frame
        self._next_frame += 1
        draws = self.draws(frame)
        x = draws[0] * self.initial_scale
        if source is not None:
            x = x + source.latent  # ComfyUI's noise_scaling: noise * scale, then + the latent image
        self._slots.append(_Slot(frame, condition, 0, x, draws, source))
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
        x = torch.stack([s.x for s in slots])
        keep = self._keep(slots)
        if keep is not None:  # inpainting: outside the mask, the photo noised to this sigma (ComfyUI's blend)
            m, photo, first = keep
            x = x * m + (first * sigmas.to(x.dtype).view(-1, 1, 1, 1) + photo) * (1.0 - m)
        batch = SlotBatch(
            x=x,
            sigmas=sigmas,
            steps=steps,
            conditions=tuple(s.condition for s in slots),
            noise=torch.stack([s.draws[s.step] for s in slots]),
        )
        x0 = self.denoiser(batch)
        if self.residual_cfg is not None:
            x0 = self._residual_cfg(batch, x0)
        if keep is not None:
            x0 = x0 * m + photo * (1.0 - m)
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

    def render(self, conditions: Sequence[Any], on_frame: Callable[[int, torch.Tensor], None] | None = None,
               sources: Sequence[ImageSource | None] | None = None) -> list[torch.Tensor]:
        """Frames for a sequence of per-frame conditions (and images), in order: push + tick per
        frame, then flush."""
        frames: dict[int, torch.Tensor] = {}

        def take(done):
            for index, x0 in done:
                frames[index] = x0
                if on_frame is not None:
                    on_frame(index, x0)

        first = self._next_frame
        for i, condition in enumerate(conditions):
            self.push(condition, None if sources is None else sources[i])
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

    @staticmethod
    def _keep(slots: Sequence[_Slot]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(mask, photo, first draw) per row when any slot inpaints; rows without a mask repaint all."""
        if not any(s.source is not None and s.source.mask is not None for s in slots):
            return None
        first = slots[0]
        if all(s.source is first.source for s in slots):  # one photo for every frame (live): broadcast, no copies
            draws0 = first.draws[0].unsqueeze(0) if all(s.draws is first.draws for s in slots) \
                else torch.stack([s.draws[0] for s in slots])
            return first.source.mask.unsqueeze(0), first.source.latent.unsqueeze(0), draws0
        ms, photos = [], []
        for s in slots:
            if s.source is not None and s.source.mask is not None:
                ms.append(s.source.mask.expand_as(s.x))
                photos.append(s.source.latent)
            else:
                ms.append(torch.ones_like(s.x))
                photos.append(torch.zeros_like(s.x))
        return torch.stack(ms), torch.stack(photos), torch.stack([s.draws[0] for s in slots])

    def _residual_cfg(self, batch: SlotBatch, x0: torch.Tensor) -> torch.Tensor:
        sigma = batch.sigmas.to(x0.dtype).view(-1, 1, 1, 1)
        eps_cond = (batch.x - x0) / sigma
        eps = batch.noise + self.residual_cfg * (eps_cond - batch.noise)
        return batch.x - sigma * eps
