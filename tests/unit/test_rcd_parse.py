"""RCD subject parsing: rule table, overrides, token spans (multi-token words, > 77 tokens), bad input."""

import os
import re

import pytest

from rcca_core.rcd.parse import (
    MAX_SUBJECTS, ParsedPrompt, SpacyUnavailableError, Subject, SubjectError, find_subjects, parse_subjects,
    spacy_available, token_index, token_spans,
)


class FakeTokenizer:
    """Splits like CLIP's pre-tokeniser (words, digits runs, punctuation); words over 6 letters give 2 tokens."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _id(self, piece: str) -> int:
        return self.vocab.setdefault(piece, 1000 + len(self.vocab))

    def __call__(self, text: str) -> list[int]:
        ids = []
        for w in re.findall(r"\w+|[^\w\s]", text.lower()):
            if len(w) > 6:
                ids += [self._id(w[:4]), self._id(w[4:] + "</w>")]
            else:
                ids.append(self._id(w + "</w>"))
        return ids


def comfy_layout(word_ids: list[int], start: int = 1, end: int = 2) -> list[int]:
    """The encoder's view of a plain prompt: windows of start + 75 word tokens + end, padded to 77."""
    seq = []
    for c in range(0, max(len(word_ids), 1), 75):
        chunk = [start] + word_ids[c:c + 75] + [end]
        seq += chunk + [end] * (77 - len(chunk))
    return seq


RULE_TABLE = [
    # the example, CC-500 and Attend-and-Excite styles
    ("a black kitten and a white dog on a red couch", ["a black kitten", "a white dog", "a red couch"],
     ["kitten", "dog", "couch"]),
    ("a blue bench and a green car", ["a blue bench", "a green car"], ["bench", "car"]),
    ("a red apple and a green bowl", ["a red apple", "a green bowl"], ["apple", "bowl"]),
    ("a cat and a frog", ["a cat", "a frog"], ["cat", "frog"]),
    ("a horse with a glasses", ["a horse", "a glasses"], ["horse", "glasses"]),
    ("a bear and an elephant", ["a bear", "an elephant"], ["bear", "elephant"]),
    ("a lion with a crown and a bear", ["a lion", "a crown", "a bear"], ["lion", "crown", "bear"]),
    # commas, filler, verbs, prepositions, style tags, positions
    ("purple roses, a yellow bird", ["purple roses", "a yellow bird"], ["roses", "bird"]),
    ("a photo of a cat and a dog", ["a cat", "a dog"], ["cat", "dog"]),
    ("an oil painting of a black cat with a hat", ["a black cat", "a hat"], ["cat", "hat"]),
    ("a black kitten and a white dog padding", ["a black kitten", "a white dog"], ["kitten", "dog"]),
    ("a dog and a bird on the street, snowy scene", ["a dog", "a bird", "the street"], ["dog", "bird", "street"]),
    ("a man riding a horse", ["a man", "a horse"], ["man", "horse"]),
    ("a sleeping cat next to a brown teddy bear", ["a sleeping cat", "a brown teddy bear"], ["cat", "bear"]),
    ("a monkey and a frog in front of a house", ["a monkey", "a frog", "a house"], ["monkey", "frog", "house"]),
    ("a cat and a dog, highly detailed, 8k", ["a cat", "a dog"], ["cat", "dog"]),
    ("a cat on the left and a dog on the right", ["a cat", "a dog"], ["cat", "dog"]),
    ("a dog that is black and a cat", ["a dog", "a cat"], ["dog", "cat"]),
    ("a red and white bus", ["a red and white bus"], ["bus"]),
    ("A Black Kitten, a white dog", ["A Black Kitten", "a white dog"], ["Kitten", "dog"]),
    ("a cat sitting on a mat with a ball of yarn", ["a cat", "a mat", "a ball of yarn"], ["cat", "mat", "yarn"]),
    ("an elephant", ["an elephant"], ["elephant"]),  # one subject: returned as found
    ("highly detailed, 8k", [], []),  # no subject: returned empty, the caller decides
]


@pytest.mark.parametrize("prompt,texts,nouns", RULE_TABLE, ids=[r[0] for r in RULE_TABLE])
def test_rule_parser_table(prompt, texts, nouns):
    parsed = parse_subjects(prompt)
    assert parsed.prompt == prompt
    assert parsed.texts == texts
    assert [s.noun for s in parsed] == nouns
    for s in parsed:
        assert prompt[s.char_span[0]:s.char_span[1]] == s.text
        a, b = s.noun_span
        assert prompt[a:b] == s.noun and b == s.char_span[1]


SPAN_TABLE = [
    # prompt, expected token indices per subject (start token is 0), noun index per subject
    ("a black kitten and a white dog on a red couch", [(1, 2, 3), (5, 6, 7), (9, 10, 11)], [3, 7, 11]),
    # multi-token words: "beautiful", "elephant", "giraffe" are 2 tokens each
    ("a beautiful elephant and a giraffe", [(1, 2, 3, 4, 5), (7, 8, 9)], [5, 9]),
    # commas are tokens of their own; the subject stops before them
    ("purple roses, a yellow bird", [(1, 2), (4, 5, 6)], [2, 6]),
    ("a horse with a glasses", [(1, 2), (4, 5, 6)], [2, 6]),
]


@pytest.mark.parametrize("prompt,indices,nouns", SPAN_TABLE, ids=[r[0] for r in SPAN_TABLE])
def test_token_span_table(prompt, indices, nouns):
    tok = FakeTokenizer()
    spans = token_spans(prompt, parse_subjects(prompt), tok)
    assert [s.indices for s in spans] == indices
    assert [s.noun_index for s in spans] == nouns
    seq = comfy_layout(tok(prompt))
    for s in spans:  # the tokens at those indices are the subject's own tokens
        assert [seq[i] for i in s.indices] == tok(s.subject.text)


def test_token_index_formula_over_77_tokens():
    assert [token_index(k) for k in (0, 74, 75, 149, 150)] == [1, 75, 78, 152, 155]


@pytest.mark.parametrize("filler,subjects,first", [
    (72, ["a black kitten", "a white dog"], (73, 74, 75)),   # fills window 1 exactly
    (73, ["a black kitten", "a white dog"], (74, 75, 78)),   # "kitten" opens window 2 at 78
    (73, ["a beautiful cat", "a dog"], (74, 75, 78, 79)),    # 2-token "beautiful" split across windows
    (160, ["a black kitten", "a white dog"], (165, 166, 167)),  # third window (k = 160 -> 2 * 77 + 1 + 10)
])
def test_long_prompts_cross_the_77_token_window(filler, subjects, first):
    tok = FakeTokenizer()
    prompt = "z " * filler + " and ".join(subjects)
    spans = token_spans(prompt, parse_subjects(prompt, subjects=subjects), tok)
    assert spans[0].indices == first
    seq = comfy_layout(tok(prompt))
    for s in spans:  # the tokens at those indices are the subject's own tokens, noun last
        assert [seq[i] for i in s.indices] == tok(s.subject.text)
        assert seq[s.noun_index] == tok(s.subject.noun)[-1] and s.noun_index == s.indices[-1]


def test_noun_index_is_the_last_token_of_a_multi_token_noun():
    tok = FakeTokenizer()
    prompt = "a kitten and a grey elephant"
    spans = token_spans(prompt, parse_subjects(prompt), tok)
    assert spans[1].indices == (4, 5, 6, 7) and spans[1].noun_index == 7  # elephant = tokens 6, 7


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.path.dirname(__file__), "..", "..", ".host", "ComfyUI", "comfy",
                                                   "sd1_tokenizer")), reason="no local CLIP vocabulary (.host/ComfyUI)")
def test_prefix_counting_matches_real_clip_bpe():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    path = os.path.join(os.path.dirname(__file__), "..", "..", ".host", "ComfyUI", "comfy", "sd1_tokenizer")
    clip = transformers.CLIPTokenizer.from_pretrained(path)

    def tokenize(text):
        return clip(text)["input_ids"][1:-1]

    prompt = "a photo of a black kitten, and a white dog's toy next to a red couch"
    parsed = parse_subjects(prompt, subjects=["a black kitten", "a white dog's toy", "a red couch"])
    seq = comfy_layout(tokenize(prompt), clip.bos_token_id, clip.eos_token_id)
    for s in token_spans(prompt, parsed, tokenize):
        assert [seq[i] for i in s.indices] == tokenize(s.subject.text)


def test_bracket_override_strips_brackets_and_marks_subjects():
    parsed = parse_subjects("a [black kitten] playing with a [white dog]")
    assert parsed.prompt == "a black kitten playing with a white dog"
    assert parsed.texts == ["black kitten", "white dog"]
    assert [s.noun for s in parsed] == ["kitten", "dog"]
    assert [s.char_span for s in parsed] == [(2, 14), (30, 39)]
    tok = FakeTokenizer()
    assert [s.indices for s in token_spans(parsed.prompt, parsed, tok)] == [(2, 3), (8, 9)]


def test_explicit_list_is_case_insensitive_whole_words_and_in_prompt_order():
    prompt = "A White Dog chasing a black  kitten, and a cat"
    parsed = parse_subjects(prompt, subjects=["black kitten", "white dog", "cat"])
    assert parsed.texts == ["White Dog", "black  kitten", "cat"]  # prompt order, prompt's own spelling
    assert [s.char_span for s in parsed] == [(2, 11), (22, 35), (43, 46)]
    # "cat" does not match inside "category"; a subject given twice takes the next occurrence
    assert find_subjects("a category of cat and cat", ["cat", "cat"])[0].char_span == (14, 17)
    assert [s.char_span for s in find_subjects("a cat and a cat", ["cat", "cat"])] == [(2, 5), (12, 15)]


@pytest.mark.parametrize("prompt,kwargs,match", [
    ("", {}, "empty"),
    ("   ", {}, "empty"),
    ("a cat and a dog", {"subjects": ["a cat", "a horse"]}, "'a horse' is not in the prompt 'a cat and a dog'"),
    ("a cat and a dog", {"subjects": [""]}, "empty"),
    ("a cat and a dog", {"subjects": "a cat"}, "list"),
    ("a [cat] and a dog", {"subjects": ["dog"]}, "not both"),
    ("a [cat and a [dog]]", {}, "nested"),
    ("a [cat and a dog", {}, "not closed"),
    ("a cat] and a dog", {}, "without"),
    ("a [ ] and a dog", {}, "empty"),
    ("a cat and a dog", {"parser": "nltk"}, "parser must be"),
    ("a cat, a dog, a bird, a frog and a horse", {}, f"at most {MAX_SUBJECTS}"),
    ("a [cat], [dog], [bird], [frog] and a [horse]", {}, "at most"),
])
def test_bad_input_gives_clear_subject_errors(prompt, kwargs, match):
    with pytest.raises(SubjectError, match=re.escape(match)):
        parse_subjects(prompt, **kwargs)
    assert issubclass(SubjectError, ValueError)


def test_max_subjects_is_allowed():
    assert len(parse_subjects("a cat, a dog, a bird and a frog")) == MAX_SUBJECTS


def test_token_spans_rejects_a_subject_of_another_prompt():
    parsed = parse_subjects("a [cat] and a [dog]")
    with pytest.raises(SubjectError, match="different prompt"):
        token_spans("a [cat] and a [dog]", parsed, FakeTokenizer())
    with pytest.raises(SubjectError, match="not at"):
        token_spans("a dog", [Subject("cat", (2, 5), "cat")], FakeTokenizer())
    with pytest.raises(SubjectError, match="no tokens"):
        token_spans("a cat", [Subject("cat", (2, 5), "cat")], lambda text: [])


def test_parser_results_are_plain_values():
    parsed = parse_subjects("a cat and a dog")
    assert isinstance(parsed, ParsedPrompt) and parsed[0] == Subject("a cat", (0, 5), "cat")
    assert parse_subjects("a cat and a dog", parser="auto").texts == ["a cat", "a dog"]  # rules or spaCy agree


@pytest.mark.skipif(spacy_available(), reason="spaCy is installed: the missing-spaCy error cannot be shown")
def test_spacy_requested_without_spacy_is_a_clear_error():
    with pytest.raises(SpacyUnavailableError, match="en_core_web_sm"):
        parse_subjects("a cat and a dog", parser="spacy")
    assert parse_subjects("a cat and a dog", parser="auto").texts == ["a cat", "a dog"]  # falls back to rules


@pytest.mark.skipif(not spacy_available(), reason="spaCy (with en_core_web_sm) is not installed")
def test_spacy_noun_chunks():
    parsed = parse_subjects("a photo of a black kitten and a white dog on a red couch", parser="spacy")
    assert parsed.texts == ["a black kitten", "a white dog", "a red couch"]
    assert [s.noun for s in parsed] == ["kitten", "dog", "couch"]


@pytest.mark.parametrize("prompt, kind", [
    ("embedding:foo a black kitten and a white dog", "embedding"),
    ("a black kitten and a white dog, embedding:bar", "embedding"),
    ("a black kitten and a white dog,embedding:bar.pt", "embedding"),
    ("a black (kitten:1.2) and a white dog", "emphasis"),
    ("(a black kitten:1.2) and a white dog", "emphasis"),
    ("a black kitten and a (white) dog", "emphasis"),
    ("a [black (kitten)] and a [white dog]", "emphasis"),
])
def test_comfyui_prompt_syntax_is_refused_anywhere_before_parsing(prompt, kind):
    for parser in ("rules", "auto"):
        with pytest.raises(SubjectError, match=f"must be plain text.*{kind}"):
            parse_subjects(prompt, parser=parser)


def test_listed_subjects_are_checked_too():
    with pytest.raises(SubjectError, match="the subject '\\(a white dog:1.1\\)'.*emphasis"):
        parse_subjects("a black kitten and a white dog", ["a black kitten", "(a white dog:1.1)"])
    # words that merely contain the identifier's letters are plain text
    assert parse_subjects("an embedding expert and a white dog").texts == ["an embedding expert", "a white dog"]
