"""Offline subject parsing for RCD: prompt -> subject phrases -> token spans.

``parse_subjects("a black kitten and a white dog on a red couch")`` gives the subjects
"a black kitten", "a white dog", "a red couch" (articles and attributes kept; the noun is the
phrase's last word), each with its character span in the prompt. ``token_spans`` then maps
each subject to the token indices the text encoder sees.

Ways to name the subjects:

* rules (default, reproducible, no dependency): the prompt is cut into phrases at commas and
  other punctuation, at "and" / "with" / "or", at prepositions ("on", "in", "next to",
  "in front of", "near", "under", "beside", "behind", "above", "over", ...), at an article
  that follows a noun ("a man riding a horse"), and at verbs: an "-ing" word after a noun, or
  "is" / "are" / "that" / "which" / "who" (the predicate after them is skipped up to the next
  cut). Leading filler such as "a photo of" / "an oil painting of" is dropped, and so are
  phrases that only name a position ("the left", "the background"), pronouns, and style tags
  ("highly detailed", "8k", "snowy scene" without an article).
* manual override in the prompt: ``"a [black kitten] playing with a [white dog]"`` -> the
  bracketed phrases are the subjects, and the prompt to encode is the text without brackets
  (``ParsedPrompt.prompt``); ``[`` and ``]`` are reserved for this (no nesting).
* manual override as a list: ``parse_subjects(prompt, subjects=["black kitten", "white dog"])``;
  each must occur in the prompt (case-insensitive, at word boundaries, any run of whitespace
  between its words) or a ``SubjectError`` names it.
* spaCy noun chunks (``parser="spacy"``, or ``"auto"`` when spaCy and ``en_core_web_sm`` load
  offline). Never required: nothing is downloaded, and "spacy" without it is a clear error.

Limits of the rules (use an override for these): the noun is always the phrase's last word, so
a modifier after the noun that is not a cut stays in the phrase ("a cup of coffee" is one
subject with noun "coffee"); adjectives joined by "and" are understood only for colours ("a red
and white bus"); "by <artist>" tags become subjects; English only. At most MAX_SUBJECTS
subjects (more is a SubjectError that suggests the override); zero or one is returned as found:
RCD needs two or more to be useful (with one subject L_RCR is zero), and the caller decides.

Token spans (``token_spans``): the tokenizer is passed in as ``tokenize(text) -> ids`` without
start/end tokens, so this module stays free of ComfyUI. Index 0 is the start token, so the
first word token is 1; ComfyUI splits prompts over 75 word tokens into windows of 75, each
wrapped in start/end tokens and padded to 77, so word token k (0-based) is at
``(k // 75) * 77 + 1 + k % 75`` (``token_index``). For plain prompts this is what ComfyUI's
SD1 tokenizer produces, a multi-token word split across two windows included (checked against
its tokenize_with_weights). ComfyUI's "(text:1.2)" / "(text)" emphasis and "embedding:"
names are refused anywhere in the prompt (``check_plain_text``, before any parsing): their
syntax is not text the encoder sees, so character and token spans would no longer match, and
ComfyUI moves a short weighted segment that does not fit a window whole to the next one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

MAX_SUBJECTS = 4
CHUNK_TOKENS = 75  # word tokens per CLIP window (77 minus start and end tokens)
PARSERS = ("rules", "spacy", "auto")

__all__ = [
    "MAX_SUBJECTS", "CHUNK_TOKENS", "PARSERS", "SubjectError", "SpacyUnavailableError", "Subject", "ParsedPrompt",
    "TokenSpan", "parse_subjects", "find_subjects", "spacy_available", "token_index", "token_spans",
]


class SubjectError(ValueError):
    """A prompt's subjects cannot be determined as asked (message says why and what to do)."""


class SpacyUnavailableError(SubjectError):
    """parser="spacy" was asked for but spaCy or its en_core_web_sm model does not load offline."""


@dataclass(frozen=True)
class Subject:
    """A subject phrase: ``text == prompt[char_span[0]:char_span[1]]``; ``noun`` is its head word."""

    text: str
    char_span: tuple[int, int]
    noun: str

    @property
    def noun_span(self) -> tuple[int, int]:
        """Character span of the noun in the prompt (its last occurrence in the phrase)."""
        m = None
        for m in re.finditer(r"(?<!\w)" + re.escape(self.noun) + r"(?!\w)", self.text, re.IGNORECASE):
            pass
        if m is None:
            raise SubjectError(f"noun {self.noun!r} is not a word of subject {self.text!r}")
        return self.char_span[0] + m.start(), self.char_span[0] + m.end()


@dataclass(frozen=True)
class ParsedPrompt:
    """The prompt to encode (manual brackets removed) and its subjects in prompt order."""

    prompt: str
    subjects: tuple[Subject, ...]

    def __len__(self) -> int:
        return len(self.subjects)

    def __iter__(self) -> Iterator[Subject]:
        return iter(self.subjects)

    def __getitem__(self, i: int) -> Subject:
        return self.subjects[i]

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.subjects]


@dataclass(frozen=True)
class TokenSpan:
    """Token indices of a subject in the encoder's sequence (start token at 0), and of its noun's last token."""

    subject: Subject
    indices: tuple[int, ...]
    noun_index: int


# --------------------------------------------------------------------------- rule-based parser

_WORD_RE = re.compile(r"\w+(?:['\u2019-]\w+)*|[^\w\s]")
_ARTICLES = {"a", "an", "the"}
_CONJUNCTIONS = {"and", "with", "or", "plus", "without", "&"}
_PREPOSITIONS = sorted((tuple(p.split()) for p in (
    "on", "in", "near", "under", "beside", "behind", "above", "over", "at", "by", "inside", "below",
    "beneath", "underneath", "across", "along", "against", "between", "among", "around", "into", "onto",
    "atop", "upon", "through", "within", "toward", "towards", "next to", "close to", "in front of",
    "on top of", "in the middle of", "to the left of", "to the right of", "on the left of", "on the right of",
)), key=len, reverse=True)
_PREDICATE = {"is", "are", "was", "were", "be", "been", "being", "that", "which", "who", "whose", "where",
              "while", "has", "have", "made", "covered", "filled", "dressed", "topped", "surrounded"}
_ING_NOUNS = {"building", "ring", "king", "wedding", "pudding", "string", "swing", "wing", "spring", "thing",
              "ceiling", "painting", "drawing", "clothing", "earring", "railing", "awning", "evening", "morning",
              "dumpling", "duckling", "sibling", "icing", "stuffing", "sling", "sting", "viking", "darling",
              "lightning", "sapling", "seedling", "bowling", "stocking", "landing"}
_FUNCTION = {"of", "to", "from", "very", "really", "together", "nearby", "too", "also", "there", "here",
             "each", "other", "both", "it", "its", "them", "they", "he", "she", "him", "her", "his", "their",
             "itself", "another", "then"}
_POSITION = {"left", "right", "top", "bottom", "middle", "center", "centre", "side", "background",
             "foreground", "front", "back", "distance", "corner", "edge"}
_MEDIA = {"photo", "photograph", "image", "picture", "pic", "painting", "drawing", "illustration", "render",
          "rendering", "sketch", "portrait", "close-up", "closeup", "shot", "artwork", "cartoon", "watercolor",
          "watercolour", "view", "snapshot", "depiction"}
_STYLE_NOUNS = {"scene", "style", "art", "artwork", "lighting", "light", "quality", "resolution", "detail",
                "details", "render", "rendering", "photo", "photograph", "photography", "painting", "illustration",
                "drawing", "sketch", "wallpaper", "masterpiece", "realism", "bokeh", "focus", "composition",
                "shot", "view", "atmosphere", "colors", "colours", "hour", "engine", "artstation"}
_STYLE_WORDS = _STYLE_NOUNS | {
    "highly", "detailed", "best", "high", "ultra", "super", "hyper", "realistic", "photorealistic", "cinematic",
    "dramatic", "beautiful", "intricate", "sharp", "soft", "studio", "digital", "oil", "trending", "award",
    "winning", "epic", "vivid", "vibrant", "colorful", "colourful", "hd", "hdr", "uhd", "octane", "unreal",
    "volumetric", "natural", "golden", "snowy", "rainy", "sunny", "foggy", "dark", "bright", "anime", "3d"}
_COLOURS = {"red", "green", "blue", "yellow", "black", "white", "brown", "pink", "purple", "orange", "gray",
            "grey", "golden", "silver"}


def _is_style(word: str) -> bool:
    return word in _STYLE_WORDS or re.fullmatch(r"\d+k|\d+p", word) is not None


def _rule_subjects(prompt: str) -> list[Subject]:
    words = [(m.group(0), m.group(0).lower(), m.start(), m.end()) for m in _WORD_RE.finditer(prompt)]
    segments: list[tuple[list[int], str]] = []  # (word indices, what opened it: "start"|"comma"|"cut")
    current: list[int] = []
    opened = "start"
    skipping = False  # inside a predicate ("is black", "riding ..."): words are dropped until the next cut

    def close(next_opened: str) -> None:
        nonlocal current, opened, skipping
        if current:
            segments.append((current, opened))
        current, opened, skipping = [], next_opened, False

    i = 0
    while i < len(words):
        text, low, _, _ = words[i]
        has_content = any(words[j][1] not in _ARTICLES | _FUNCTION for j in current)
        prep = next((p for p in _PREPOSITIONS if tuple(w[1] for w in words[i:i + len(p)]) == p), None)
        if low in _CONJUNCTIONS or not (low[0].isalnum() or low[0] == "_"):
            left = [words[j][1] for j in current]
            if (low in ("and", "or", ",") and left and all(w in _ARTICLES | _COLOURS for w in left)
                    and any(w in _COLOURS for w in left) and i + 1 < len(words) and words[i + 1][1] not in _ARTICLES):
                current.append(i)  # "a red and white bus": the conjunction joins two colours
            else:
                close("comma" if low in ",;|/" else "cut")
        elif prep is not None:
            close("cut")
            i += len(prep)
            continue
        elif low in _PREDICATE or (has_content and low.endswith("ing") and len(low) > 4 and low not in _ING_NOUNS):
            close("cut")
            skipping = True
        elif low in _ARTICLES and (skipping or has_content):
            close("cut")
            current.append(i)
        elif not skipping:
            current.append(i)
        i += 1
    close("cut")

    subjects = []
    for idx, opened in segments:
        low = [words[j][1] for j in idx]
        if "of" in low[:6]:  # leading filler: "a photo of", "an oil painting of", "a close-up shot of"
            k = low.index("of")
            if k > 0 and low[k - 1] in _MEDIA:
                idx, low = idx[k + 1:], low[k + 1:]
        while idx and low[0] in _FUNCTION:
            idx, low = idx[1:], low[1:]
        while idx and low[-1] in _FUNCTION | _ARTICLES:
            idx, low = idx[:-1], low[:-1]
        if not idx or all(w in _ARTICLES | _FUNCTION for w in low) or low[-1] in _POSITION:
            continue
        if not (set(low) & _ARTICLES) and (all(_is_style(w) for w in low) or low[-1] in _STYLE_NOUNS):
            continue  # a style tag: "highly detailed", "8k", "snowy scene", "digital art"
        start, end = words[idx[0]][2], words[idx[-1]][3]
        subjects.append(Subject(prompt[start:end], (start, end), words[idx[-1]][0]))
    return subjects


# --------------------------------------------------------------------------- spaCy (optional)

_SPACY_NLP = None


def spacy_available() -> bool:
    """True when spaCy and its en_core_web_sm model load offline (the result is cached)."""
    try:
        _spacy_model()
    except SpacyUnavailableError:
        return False
    return True


def _spacy_model():
    global _SPACY_NLP
    if _SPACY_NLP is None:
        try:
            import spacy  # noqa: PLC0415 - optional dependency
        except ImportError as e:
            _SPACY_NLP = e
        else:
            try:
                _SPACY_NLP = spacy.load("en_core_web_sm")
            except OSError as e:  # model package not installed; nothing is downloaded
                _SPACY_NLP = e
    if isinstance(_SPACY_NLP, Exception):
        raise SpacyUnavailableError(
            "parser='spacy' needs spaCy with the en_core_web_sm model installed (not downloaded by this pack): "
            f"{_SPACY_NLP}; use parser='rules' or name the subjects") from _SPACY_NLP
    return _SPACY_NLP


def _spacy_subjects(prompt: str) -> list[Subject]:
    doc = _spacy_model()(prompt)
    out = []
    for chunk in doc.noun_chunks:
        root = chunk.root
        if root.pos_ == "PRON" or root.lower_ in _POSITION:
            continue
        nxt = doc[chunk.end] if chunk.end < len(doc) else None
        if root.lower_ in _MEDIA and nxt is not None and nxt.lower_ == "of":
            continue  # "a photo" of "a photo of a cat"
        if not any(t.lower_ in _ARTICLES for t in chunk) and all(_is_style(t.lower_) for t in chunk):
            continue
        out.append(Subject(chunk.text, (chunk.start_char, chunk.end_char), root.text))
    return out


# --------------------------------------------------------------------------- public API

def _strip_brackets(prompt: str) -> tuple[str, list[tuple[int, int]]]:
    clean: list[str] = []
    spans: list[tuple[int, int]] = []
    open_at = None
    for pos, ch in enumerate(prompt):
        if ch == "[":
            if open_at is not None:
                raise SubjectError(f"nested '[' at character {pos} in prompt {prompt!r}; mark each subject as [phrase]")
            open_at = len(clean)
        elif ch == "]":
            if open_at is None:
                raise SubjectError(f"']' without '[' at character {pos} in prompt {prompt!r}")
            if not "".join(clean[open_at:]).strip():
                raise SubjectError(f"empty [] subject in prompt {prompt!r}")
            spans.append((open_at, len(clean)))
            open_at = None
        else:
            clean.append(ch)
    if open_at is not None:
        raise SubjectError(f"'[' is not closed in prompt {prompt!r}")
    return "".join(clean), spans


def _subject_at(prompt: str, start: int, end: int) -> Subject:
    lead = len(prompt[start:end]) - len(prompt[start:end].lstrip())
    start, end = start + lead, end - (len(prompt[start:end]) - len(prompt[start:end].rstrip()))
    nouns = re.findall(r"\w+(?:['\u2019-]\w+)*", prompt[start:end])
    if not nouns:
        raise SubjectError(f"subject {prompt[start:end]!r} has no word in prompt {prompt!r}")
    return Subject(prompt[start:end], (start, end), nouns[-1])


def find_subjects(prompt: str, subjects: Sequence[str]) -> list[Subject]:
    """Locate given subject strings in the prompt (case-insensitive, whole words); prompt order.

    A string given twice takes successive occurrences ("a cat and a cat").
    """
    taken: list[tuple[int, int]] = []
    found = []
    for s in subjects:
        if not isinstance(s, str) or not s.strip():
            raise SubjectError(f"subject {s!r} is empty; give non-empty phrases of the prompt {prompt!r}")
        pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in s.split()) + r"(?!\w)"
        for m in re.finditer(pattern, prompt, re.IGNORECASE):
            if all(m.end() <= a or m.start() >= b for a, b in taken):
                taken.append((m.start(), m.end()))
                found.append(_subject_at(prompt, m.start(), m.end()))
                break
        else:
            raise SubjectError(f"subject {s!r} is not in the prompt {prompt!r} (matched case-insensitively as "
                               "whole words; each subject must be a phrase of the prompt)")
    return sorted(found, key=lambda sub: sub.char_span)


_EMBEDDING = re.compile(r"(?:^|[^\w])embedding:", re.IGNORECASE)


def check_plain_text(text: str, what: str = "prompt") -> None:
    """Refuse ComfyUI's prompt syntax that is not plain text: 'embedding:' names and emphasis
    parentheses, wherever they appear (a weight inside a subject would split it into numbers)."""
    if _EMBEDDING.search(text):
        raise SubjectError(f"RCD prompts must be plain text: the {what} {text!r} uses a textual embedding "
                           "('embedding:' name), which is not text the encoder sees; remove it")
    if "(" in text or ")" in text:
        raise SubjectError(f"RCD prompts must be plain text: the {what} {text!r} uses ComfyUI's emphasis "
                           "('(text:1.2)' or '(text)'), which changes token weights and positions; remove the parentheses")


def parse_subjects(prompt: str, subjects: Sequence[str] | None = None, parser: str = "rules") -> ParsedPrompt:
    """Subjects of a prompt, in prompt order, and the prompt to encode.

    Precedence: an explicit ``subjects`` list, else ``[bracketed]`` phrases in the prompt, else
    ``parser`` ("rules": the rule-based parser; "spacy": spaCy noun chunks, error if spaCy or
    en_core_web_sm is missing; "auto": spaCy when it loads, else rules). Raises SubjectError for
    an empty prompt, ComfyUI emphasis or embedding syntax anywhere (check_plain_text), a listed
    subject not in the prompt, brackets together with a list, bad
    brackets, or more than MAX_SUBJECTS subjects. Zero or one subject is returned as found.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise SubjectError("the prompt is empty; RCD needs a prompt naming two or more subjects")
    if parser not in PARSERS:
        raise SubjectError(f"parser must be one of {PARSERS}, got {parser!r}")
    check_plain_text(prompt)
    if subjects is not None:
        if isinstance(subjects, str):
            raise SubjectError("subjects must be a list of phrases, not one string")
        for subject in subjects:
            check_plain_text(subject, "subject")
        if "[" in prompt or "]" in prompt:
            raise SubjectError(f"give the subjects either as [brackets] in the prompt or as a list, not both: {prompt!r}")
        found = find_subjects(prompt, subjects)
    elif "[" in prompt or "]" in prompt:
        prompt, spans = _strip_brackets(prompt)
        found = [_subject_at(prompt, a, b) for a, b in spans]
    elif parser == "spacy" or (parser == "auto" and spacy_available()):
        found = _spacy_subjects(prompt)
    else:
        found = _rule_subjects(prompt)
    if len(found) > MAX_SUBJECTS:
        raise SubjectError(
            f"{len(found)} subjects found in {prompt!r}: {[s.text for s in found]}; at most {MAX_SUBJECTS} are "
            "supported. Mark the ones to control as [subject] in the prompt or list them explicitly")
    return ParsedPrompt(prompt, tuple(found))


def token_index(k: int, chunk_tokens: int = CHUNK_TOKENS) -> int:
    """Overall index of the k-th (0-based) word token of a prompt in the encoder's sequence.

    ComfyUI's CLIP tokenizer lays a prompt out in windows of chunk_tokens + 2 (77): a start
    token, up to 75 word tokens, the end token, padding. So word token k sits at
    ``(k // 75) * 77 + 1 + k % 75``: the first word token is index 1; the 76th is 78.
    """
    return (k // chunk_tokens) * (chunk_tokens + 2) + 1 + k % chunk_tokens


def token_spans(prompt: str, subjects: ParsedPrompt | Sequence[Subject], tokenize: Callable[[str], list[int]],
                chunk_tokens: int = CHUNK_TOKENS) -> list[TokenSpan]:
    """Token indices of each subject in ``prompt`` as the encoder sees it (see ``token_index``).

    ``tokenize(text)`` returns the token ids of ``text`` without start/end tokens. A subject's
    word tokens are counted by tokenizing the prompt's prefix up to its start and up to its
    end. This is exact for tokenizers that never merge across whitespace or punctuation
    (CLIP's BPE pre-splits words, digits and punctuation), since subjects start and end at word
    boundaries. The windowing matches ComfyUI for plain prompts; ComfyUI's emphasis syntax
    "(word:1.2)" and "embedding:" names shift the indices (see the module docstring): give RCD
    prompts without them.
    """
    if isinstance(subjects, ParsedPrompt):
        if subjects.prompt != prompt:
            raise SubjectError("token_spans got a ParsedPrompt of a different prompt; pass ParsedPrompt.prompt")
        subjects = subjects.subjects
    spans = []
    for s in subjects:
        start, end = s.char_span
        if prompt[start:end] != s.text:
            raise SubjectError(f"subject {s.text!r} is not at {s.char_span} of prompt {prompt!r} (bracketed prompt "
                               "given instead of ParsedPrompt.prompt?)")
        k0, k1 = len(tokenize(prompt[:start])), len(tokenize(prompt[:end]))
        kn = len(tokenize(prompt[:s.noun_span[1]])) - 1
        if k1 <= k0 or not k0 <= kn < k1:
            raise SubjectError(f"subject {s.text!r} gives no tokens (or its noun lies outside them) with this "
                               "tokenizer; tokenize must return ids without start/end tokens")
        spans.append(TokenSpan(s, tuple(token_index(k, chunk_tokens) for k in range(k0, k1)),
                               token_index(kn, chunk_tokens)))
    return spans
