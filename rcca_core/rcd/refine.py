"""RCD (a), Refine: token-aligned fusion of subject token embeddings with single-subject ones.

For every token of subject S_i in the full prompt:

    w = lambda_T * u + (1 - lambda_T) * v

with u the token's embedding in the full prompt and v the same token's embedding when S_i is
encoded alone (its tokens sit at word positions 1..n there), aligned token by token. Tokens
that belong to no subject (start, end, padding, the words between subjects) are left as they
are, and so is the pooled output (SDXL): the fusion only replaces per-token rows.

Works on any per-token embedding width: for SDXL, ComfyUI's CLIP returns the concatenation of
CLIP-L (768) and CLIP-G (1280) features per token (2048 wide), so fusing the concatenated rows
refines both encoders at once.

Token layout. ComfyUI's CLIP tokenizer lays a prompt out in windows of 77 (start token, word
tokens, end token, padding); a word that does not fit a window whole moves to the next one.
``word_positions`` reads where the word tokens really are from the tokenizer's windows, so
subject k-th word tokens map to exact sequence positions whatever the layout; parse.py's
``token_spans`` counts word tokens and this module maps the count to a position.

The subject information travels with the CONDITIONING (ComfyUI keeps unknown keys of a
conditioning dict through sampling) under ``RCD_SUBJECTS_KEY`` and ``RCD_PROMPT_KEY``; the
Latent Optimizer reads it from the guider's positive conditioning. Never imports ComfyUI.

Joint text encoders (SD3 / SD3.5: CLIP-L + CLIP-G then T5-XXL; Flux.1: T5-XXL, CLIP-L only for
the pooled vector). The context concatenates each encoder's tokens along the token axis, so a
subject has tokens in every part the model reads. Each part is located on its own
(``locate_subjects``; T5's sentencepiece pieces through ``offset_tokenizer``), moved to its
place in the context (``shift_subjects``) and the parts joined per subject (``join_parts``);
``refine_embedding`` then fuses every one of those positions with the same formula.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .parse import ParsedPrompt, Subject, SubjectError, token_spans

RCD_SUBJECTS_KEY = "rcd_subjects"
RCD_PROMPT_KEY = "rcd_prompt"

__all__ = [
    "RCD_SUBJECTS_KEY", "RCD_PROMPT_KEY", "SubjectTokens", "word_ids", "word_positions", "locate_subjects",
    "check_alignment", "fuse_subject_tokens", "refine_embedding", "subject_records", "prompt_record",
    "offset_tokenizer", "shift_subjects", "join_parts",
]


@dataclass(frozen=True)
class SubjectTokens:
    """Where a subject's tokens are: in the full prompt's sequence and in its single-subject prompt.

    ``indices[j]`` (full prompt) and ``single_indices[j]`` (the subject encoded alone) hold the
    same token; ``noun_index`` / ``single_noun_index`` are the noun's last token in each.
    """

    text: str
    indices: tuple[int, ...]
    noun_index: int
    single_indices: tuple[int, ...]
    single_noun_index: int

    def __post_init__(self) -> None:
        if len(self.indices) != len(self.single_indices) or not self.indices:
            raise SubjectError(f"subject {self.text!r}: {len(self.indices)} prompt tokens but "
                               f"{len(self.single_indices)} tokens when encoded alone")
        if self.noun_index not in self.indices:
            raise SubjectError(f"subject {self.text!r}: noun token {self.noun_index} is not one of its tokens")
        j = self.indices.index(self.noun_index)
        if self.single_indices[j] != self.single_noun_index:
            raise SubjectError(f"subject {self.text!r}: the noun's position alone ({self.single_noun_index}) does not "
                               f"match its position in the prompt")


def word_ids(windows: Sequence[Sequence[int]], end_token: int, has_start: bool = True) -> list[int]:
    """Word token ids of a tokenized prompt: each window without its start token (T5 has none), up to its end token."""
    first = 1 if has_start else 0
    out: list[int] = []
    for w in windows:
        w = list(w)
        stop = w.index(end_token, first) if end_token in w[first:] else len(w)
        out.extend(w[first:stop])
    return out


def word_positions(windows: Sequence[Sequence[int]], end_token: int, has_start: bool = True) -> tuple[int, ...]:
    """Sequence position of every word token (in order) in the flattened windows of a prompt."""
    first = 1 if has_start else 0
    out: list[int] = []
    offset = 0
    for w in windows:
        w = list(w)
        stop = w.index(end_token, first) if end_token in w[first:] else len(w)
        out.extend(offset + j for j in range(first, stop))
        offset += len(w)
    return tuple(out)


def offset_tokenizer(prompt: str, ids: Sequence[int], offsets: Sequence[tuple[int, int]]) -> Callable[[str], list[int]]:
    """A ``tokenize`` for ``locate_subjects`` from one tokenization of ``prompt`` with character offsets.

    Sentencepiece (T5) cannot be counted by tokenizing prefixes as CLIP's BPE can: a prefix
    that ends in a space or in the middle of "kitten," is cut into other pieces than the
    prompt. So the pieces of the whole prompt are counted instead: a prefix of the prompt
    holds every piece that starts before its end. A piece that straddles a subject's edge
    counts as outside it; ``check_alignment`` then reports the mismatch. ``ids`` / ``offsets``:
    the prompt's pieces without special tokens, offsets into ``prompt`` (a tokenizer's
    offset mapping, which already undoes its unicode normalisation).
    """
    if len(ids) != len(offsets):
        raise ValueError(f"{len(ids)} token ids but {len(offsets)} offsets")
    starts = [int(o[0]) for o in offsets]
    if starts != sorted(starts):
        raise SubjectError(f"the tokenizer's character offsets of {prompt!r} are not in order; cannot map words to "
                           "its tokens")
    pieces = [int(i) for i in ids]

    def tokenize(prefix: str) -> list[int]:
        if not prompt.startswith(prefix):
            raise SubjectError(f"offset_tokenizer counts pieces of prefixes of {prompt!r} only; got {prefix!r}")
        n = len(prefix)
        return [i for i, a in zip(pieces, starts) if a < n]

    return tokenize


def shift_subjects(subjects: Sequence[SubjectTokens], offset: int,
                   single_offsets: Sequence[int]) -> list[SubjectTokens]:
    """The subjects with positions moved by one encoder's start in the context: ``offset`` in the
    prompt's, ``single_offsets[i]`` in subject i's single-subject context."""
    return [SubjectTokens(s.text, tuple(offset + i for i in s.indices), offset + s.noun_index,
                          tuple(o + i for i in s.single_indices), o + s.single_noun_index)
            for s, o in zip(subjects, single_offsets)]


def join_parts(parts: Sequence[Sequence[SubjectTokens]]) -> list[SubjectTokens]:
    """Each subject's tokens in every encoder's part of one context (SD3: CLIP-L/G then T5).

    ``parts[p][i]`` is subject i in part p, already shifted to context positions
    (``shift_subjects``). The noun is the first part's: a joint model reads all parts, one
    noun token per subject is what SubjectTokens records.
    """
    if not parts:
        raise ValueError("join_parts needs at least one part")
    if len({len(p) for p in parts}) != 1:
        raise ValueError(f"every part needs every subject: {[len(p) for p in parts]} subjects per part")
    out = []
    for group in zip(*parts):
        first = group[0]
        if any(s.text != first.text for s in group):
            raise ValueError(f"parts list subjects in different orders: {[s.text for s in group]}")
        indices = tuple(i for s in group for i in s.indices)
        single = tuple(i for s in group for i in s.single_indices)
        if len(set(indices)) != len(indices) or len(set(single)) != len(single):
            raise ValueError(f"subject {first.text!r}: encoder parts overlap (offsets wrong?)")
        out.append(SubjectTokens(first.text, indices, first.noun_index, single, first.single_noun_index))
    return out


def locate_subjects(parsed: ParsedPrompt, tokenize: Callable[[str], list[int]], positions: Sequence[int],
                    single_positions: Callable[[Subject], Sequence[int]]) -> list[SubjectTokens]:
    """Token positions of every subject of ``parsed``, in the prompt and alone.

    ``tokenize(text)`` gives word token ids (no start/end); ``positions`` is ``word_positions``
    of the full prompt; ``single_positions(subject)`` the word positions of the subject encoded
    alone (1..n for a subject that fits one window).
    """
    spans = token_spans(parsed.prompt, parsed, tokenize, chunk_tokens=10 ** 9)  # word ordinal k -> index k + 1
    out = []
    for span in spans:
        ordinals = [i - 1 for i in span.indices]
        if ordinals[-1] >= len(positions):
            raise SubjectError(f"subject {span.subject.text!r} lies past the prompt's {len(positions)} word tokens "
                               "(did the tokenizer drop text?)")
        single = tuple(single_positions(span.subject))
        if len(single) != len(ordinals):
            raise SubjectError(f"subject {span.subject.text!r} has {len(ordinals)} tokens in the prompt but "
                               f"{len(single)} when encoded alone; RCD needs the same tokens (avoid ComfyUI's "
                               "'(text:1.2)' emphasis and 'embedding:' names in RCD prompts)")
        j = span.indices.index(span.noun_index)
        out.append(SubjectTokens(span.subject.text, tuple(positions[k] for k in ordinals), positions[span.noun_index - 1],
                                 single, single[j]))
    return out


def check_alignment(full_layout: Sequence[int], subjects: Sequence[SubjectTokens],
                    single_layouts: Sequence[Sequence[int]]) -> None:
    """Each subject's token ids in the full prompt equal its ids when encoded alone, position by position.

    ``full_layout`` / ``single_layouts[i]`` are the flattened token ids (windows concatenated)
    of the full prompt and of subject i alone. A mismatch means the prompt is not plain text
    for the tokenizer (emphasis syntax, embeddings, escaped brackets) and the fusion would mix
    different words, so it is an error.
    """
    for s, single in zip(subjects, single_layouts):
        got = [full_layout[i] for i in s.indices]
        want = [single[i] for i in s.single_indices]
        if got != want:
            raise SubjectError(f"subject {s.text!r}: its tokens in the prompt {got} differ from its tokens alone "
                               f"{want}; write RCD prompts as plain text (no '(text:1.2)' emphasis, no 'embedding:' "
                               "names, no escaped parentheses)")


def _check_lambda(lambda_t: float) -> float:
    lam = float(lambda_t)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda_T must be in [0, 1] (1 keeps the prompt's embeddings, 0 uses the single-subject "
                         f"ones), got {lambda_t}")
    return lam


def fuse_subject_tokens(full: torch.Tensor, single: torch.Tensor, indices: Sequence[int],
                        single_indices: Sequence[int], lambda_t: float) -> torch.Tensor:
    """A copy of ``full`` (B, L, D) whose rows ``indices`` are lambda * full + (1 - lambda) * single[single_indices].

    ``single`` is (B or 1, L', D). lambda 1 returns full's values exactly, lambda 0 single's.
    """
    return refine_embedding(full, [single], [SubjectTokens("subject", tuple(indices), indices[0], tuple(single_indices),
                                                           single_indices[0])], lambda_t)


def refine_embedding(full: torch.Tensor, singles: Sequence[torch.Tensor], subjects: Sequence[SubjectTokens],
                     lambda_t: float) -> torch.Tensor:
    """The refined conditioning tensor: every subject's tokens fused with its single-subject embedding.

    ``full`` (B, L, D): the prompt's token embeddings; ``singles[i]`` (B or 1, L_i, D): subject
    i encoded alone. Returns a new tensor; rows of no subject are copied unchanged. Subjects
    must not share tokens.
    """
    lam = _check_lambda(lambda_t)
    if full.ndim != 3:
        raise ValueError(f"conditioning must be (batch, tokens, width), got {tuple(full.shape)}")
    if len(singles) != len(subjects):
        raise ValueError(f"{len(subjects)} subjects but {len(singles)} single-subject embeddings")
    out = full.clone()
    seen: set[int] = set()
    for s, single in zip(subjects, singles):
        if single.ndim != 3 or single.shape[-1] != full.shape[-1] or single.shape[0] not in (1, full.shape[0]):
            raise ValueError(f"subject {s.text!r}: single-subject embedding {tuple(single.shape)} does not match the "
                             f"prompt's {tuple(full.shape)} (same CLIP for both?)")
        if max(s.indices) >= full.shape[1] or min(s.indices) < 0 or max(s.single_indices) >= single.shape[1]:
            raise ValueError(f"subject {s.text!r}: token positions {s.indices} / {s.single_indices} are outside the "
                             f"embeddings ({full.shape[1]} / {single.shape[1]} tokens)")
        if seen & set(s.indices):
            raise ValueError(f"subject {s.text!r} shares tokens with another subject; subjects must not overlap")
        seen |= set(s.indices)
        idx = torch.as_tensor(s.indices, device=full.device)
        sidx = torch.as_tensor(s.single_indices, device=single.device)
        u = full[:, idx]
        v = single[:, sidx].to(device=full.device, dtype=full.dtype).expand_as(u)
        out[:, idx] = lam * u + (1.0 - lam) * v
    return out


def _positions(s: SubjectTokens) -> dict:
    return {"indices": s.indices, "noun_index": s.noun_index, "single_indices": s.single_indices,
            "single_noun_index": s.single_noun_index}


def subject_records(subjects: Sequence[SubjectTokens], single_conds: Sequence[torch.Tensor],
                    single_pooled: Sequence[torch.Tensor | None],
                    parts: Sequence[tuple[str, Sequence[SubjectTokens]]] | None = None) -> list[dict]:
    """What the refiner stores under RCD_SUBJECTS_KEY: per subject its text, token positions and
    its single-subject conditioning (the Latent Optimizer's teacher prompt).

    ``parts`` (joint text encoders only): (encoder name, the subjects' context positions in
    that encoder's part); each record then lists them under "parts", so a reader can tell the
    CLIP tokens of SD3 from its T5 tokens. The flat "indices" hold every part's positions."""
    out = []
    for i, (s, c, p) in enumerate(zip(subjects, single_conds, single_pooled)):
        rec = {"text": s.text, **_positions(s), "cond": c, "pooled_output": p}
        if parts is not None:
            rec["parts"] = tuple({"encoder": name, **_positions(located[i])} for name, located in parts)
        out.append(rec)
    return out


def prompt_record(prompt: str, positions: Sequence[int], lambda_t: float, family: str | None = None,
                  parts: Sequence[dict] | None = None) -> dict:
    """What the refiner stores under RCD_PROMPT_KEY: the encoded prompt and its word token positions.

    For joint text encoders (SD3, Flux) also the ``family`` and the context's ``parts``
    ({"encoder", "offset", "length"} each); ``positions`` then spans every part. SD1.5 / SDXL
    records have neither, as before."""
    rec = {"prompt": prompt, "word_positions": tuple(positions), "lambda_t": float(lambda_t)}
    if family is not None:
        rec["family"] = family
        rec["parts"] = tuple(dict(p) for p in (parts or ()))
    return rec
