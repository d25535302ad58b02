"""RCD (c), Distill: teacher features from single-subject runs, and their cache.

A teacher run samples one subject's prompt alone ("a black kitten") from the same noise, with
the same sampler, sigmas, cfg and negative prompt as the full generation, for the first t_f
steps and without optimisation. At the first model evaluation of every step it records, for
the conditional rows only:

* the subject's cross-attention map (the same maps as the attention-control losses use),
  binarised into the teacher's subject mask M_i^G;
* the outputs of the chosen down-block transformer blocks, mask-average pooled with M_i^G
  into one C-vector per block.

Only the pooled vectors are kept (steps x blocks x batch x C floats), so a teacher costs a few
hundred KB. ``assemble`` stacks the subjects' runs into (B, N, C) per step and block, what
``feature_distillation_loss`` compares the student's pooled vectors with.

``TeacherCache`` keeps teachers per fingerprint of everything that shapes the run (model,
prompt embeddings, negative, noise, sigmas, cfg, sampler, settings), so a second generation
with the same settings reuses them. Never imports ComfyUI.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from .losses import RCDLossConfig, binarize, mask_average_pool, prepare_maps

__all__ = ["TeacherFeatures", "TeacherRecorder", "TeacherCache", "assemble_teachers", "fingerprint", "subject_masks"]


def subject_masks(maps: torch.Tensor, config: RCDLossConfig) -> torch.Tensor:
    """Binary subject masks (constant) of raw maps (..., H, W): prepared (smoothed, normalised), thresholded."""
    shape = maps.shape
    with torch.no_grad():
        flat = maps.detach().float().reshape(-1, *shape[-2:])
        masks = binarize(prepare_maps(flat, config.smooth, config.sigma, config.kernel), config.threshold)
    return masks.reshape(shape)


@dataclass
class TeacherFeatures:
    """Pooled teacher features: ``steps[i][block]`` is (B, N_subjects, C) float32 for sampler step i."""

    steps: dict[int, dict[int, torch.Tensor]] = field(default_factory=dict)

    def has(self, step: int) -> bool:
        return step in self.steps

    def at(self, step: int) -> dict[int, torch.Tensor]:
        return self.steps[step]

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(sorted({b for per in self.steps.values() for b in per}))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for per in self.steps.values() for t in per.values())


class TeacherRecorder:
    """Collects one single-subject run: per step and block, (B, C) vectors pooled under the
    teacher's own subject mask. Stored tensors are ordinary (not inference-mode) float32
    tensors, so the optimiser can use them under autograd."""

    def __init__(self, config: RCDLossConfig | None = None) -> None:
        self.config = config or RCDLossConfig()
        self.steps: dict[int, dict[int, torch.Tensor]] = {}

    def record(self, step: int, maps: torch.Tensor | None, features: Mapping[int, torch.Tensor]) -> None:
        """``maps`` (B, 1, h, w): the subject's raw map; ``features[block]`` (B, C, H, W)."""
        if maps is None or not features:
            return
        with torch.inference_mode(False), torch.no_grad():
            masks = subject_masks(maps.clone(), self.config)[:, 0]  # (B, h, w)
            pooled = {}
            for block, f in features.items():
                f = f.detach().clone().float()
                pooled[block] = torch.cat([mask_average_pool(f[b], masks[b:b + 1]) for b in range(f.shape[0])])
        self.steps[step] = pooled


def assemble_teachers(recorders: Iterable[TeacherRecorder]) -> TeacherFeatures:
    """Stack the subjects' runs (in subject order) into (B, N, C) per step and block; a step or
    block missing from any run is left out."""
    recorders = list(recorders)
    if not recorders:
        return TeacherFeatures()
    common = set(recorders[0].steps)
    for r in recorders[1:]:
        common &= set(r.steps)
    out: dict[int, dict[int, torch.Tensor]] = {}
    for step in sorted(common):
        blocks = set(recorders[0].steps[step])
        for r in recorders[1:]:
            blocks &= set(r.steps[step])
        if blocks:
            out[step] = {b: torch.stack([r.steps[step][b] for r in recorders], dim=1) for b in sorted(blocks)}
    return TeacherFeatures(out)


def _feed(h: "hashlib._Hash", item: Any) -> None:
    if isinstance(item, torch.Tensor):
        t = item.detach()
        h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
        if t.numel():
            with torch.inference_mode(False):
                h.update(t.to("cpu", torch.float32).contiguous().numpy().tobytes())
    elif isinstance(item, Mapping):
        h.update(b"{")
        for k in sorted(item, key=repr):
            _feed(h, k)
            _feed(h, item[k])
        h.update(b"}")
    elif isinstance(item, (list, tuple)):
        h.update(b"[")
        for x in item:
            _feed(h, x)
        h.update(b"]")
    else:
        h.update(repr(item).encode())
        h.update(b";")


def fingerprint(*items: Any) -> str:
    """sha1 over tensors (shape, dtype, values), mappings, sequences and reprs of anything else."""
    h = hashlib.sha1()
    for item in items:
        _feed(h, item)
    return h.hexdigest()


class TeacherCache:
    """A small LRU of TeacherFeatures by fingerprint; counts hits and misses."""

    def __init__(self, maxsize: int = 8) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._items: OrderedDict[str, TeacherFeatures] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str) -> TeacherFeatures | None:
        hit = self._items.get(key)
        if hit is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return hit

    def put(self, key: str, value: TeacherFeatures) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()
        self.hits = self.misses = 0
