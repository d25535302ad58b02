"""RCD refine: token-aligned fusion (lambda 1 / 0 exact, other tokens untouched), token layout, alignment."""

import zlib

import pytest
import torch

from rcca_core.rcd.parse import SubjectError, parse_subjects
from rcca_core.rcd.refine import (SubjectTokens, check_alignment, fuse_subject_tokens, locate_subjects, prompt_record,
                                  refine_embedding, subject_records, word_ids, word_positions)

END = 99


def embeddings(seed, tokens=77, width=16, batch=1):
    return torch.randn(batch, tokens, width, generator=torch.Generator().manual_seed(seed))


def two_subjects():
    # "a black kitten and a white dog": kitten tokens 1..3, dog tokens 5..7; alone each at 1..3
    return [SubjectTokens("a black kitten", (1, 2, 3), 3, (1, 2, 3), 3),
            SubjectTokens("a white dog", (5, 6, 7), 7, (1, 2, 3), 3)]


@pytest.mark.parametrize("width", [16, 2048])  # 2048: SDXL's CLIP-L + CLIP-G concatenation
def test_lambda_one_returns_the_prompt_embeddings_exactly(width):
    full = embeddings(0, width=width)
    singles = [embeddings(1, width=width), embeddings(2, width=width)]
    out = refine_embedding(full, singles, two_subjects(), 1.0)
    assert out is not full and torch.equal(out, full)


@pytest.mark.parametrize("width", [16, 2048])
def test_lambda_zero_puts_the_single_subject_tokens_in_place_and_leaves_the_rest(width):
    full = embeddings(0, width=width)
    singles = [embeddings(1, width=width), embeddings(2, width=width)]
    before = full.clone()
    out = refine_embedding(full, singles, two_subjects(), 0.0)
    assert torch.equal(out[:, 1:4], singles[0][:, 1:4])
    assert torch.equal(out[:, 5:8], singles[1][:, 1:4])
    untouched = [i for i in range(77) if i not in (1, 2, 3, 5, 6, 7)]
    assert torch.equal(out[:, untouched], full[:, untouched])
    assert torch.equal(full, before)  # the input is not modified


def test_intermediate_lambda_is_the_convex_combination_and_batches_broadcast():
    full = embeddings(0, batch=2)
    single = embeddings(1)
    out = fuse_subject_tokens(full, single, [4, 5], [1, 2], 0.25)
    torch.testing.assert_close(out[:, 4:6], 0.25 * full[:, 4:6] + 0.75 * single[:, 1:3].expand(2, -1, -1))
    assert torch.equal(out[:, :4], full[:, :4]) and torch.equal(out[:, 6:], full[:, 6:])


def test_refine_rejects_bad_input():
    full, single = embeddings(0), embeddings(1)
    s = two_subjects()
    with pytest.raises(ValueError, match="lambda_T"):
        refine_embedding(full, [single, single], s, 1.5)
    with pytest.raises(ValueError, match="does not match"):
        refine_embedding(full, [single, embeddings(2, width=8)], s, 0.5)
    with pytest.raises(ValueError, match="outside"):
        refine_embedding(full, [single], [SubjectTokens("x", (80,), 80, (1,), 1)], 0.5)
    with pytest.raises(ValueError, match="overlap"):
        refine_embedding(full, [single, single], [s[0], SubjectTokens("y", (3, 4), 4, (1, 2), 2)], 0.5)
    with pytest.raises(ValueError, match="2 subjects but 1"):
        refine_embedding(full, [single], s, 0.5)
    with pytest.raises(SubjectError):
        SubjectTokens("a", (1, 2), 2, (1,), 1)  # different token counts


def test_word_layout_follows_the_windows_including_a_moved_word():
    # window 1: start, 3 words, then a word moved to window 2 (end + padding); window 2: start, 2 words, end
    windows = [[49406, 10, 11, 12, END, END, END], [49406, 13, 14, END, END, END, END]]
    assert word_ids(windows, END) == [10, 11, 12, 13, 14]
    assert word_positions(windows, END) == (1, 2, 3, 8, 9)
    assert word_positions([[0, 5, 6, END, 0]], END) == (1, 2)  # CLIP-G pads with 0 after the end token


def word_tokenizer(text):
    """One token per word (a stand-in for CLIP's BPE on plain words)."""
    return [zlib.crc32(w.lower().encode()) % 10000 for w in text.split()]


def test_locate_subjects_maps_word_ordinals_to_positions():
    parsed = parse_subjects("a black kitten and a white dog")
    positions = (1, 2, 3, 4, 5, 8, 9)  # pretend "white dog" moved to a second window at 8, 9
    located = locate_subjects(parsed, word_tokenizer, positions,
                              lambda s: tuple(range(1, 1 + len(s.text.split()))))
    assert [(s.text, s.indices, s.noun_index, s.single_indices) for s in located] == [
        ("a black kitten", (1, 2, 3), 3, (1, 2, 3)), ("a white dog", (5, 8, 9), 9, (1, 2, 3))]


def test_locate_subjects_rejects_a_different_token_count_alone():
    parsed = parse_subjects("a black kitten and a white dog")
    with pytest.raises(SubjectError, match="encoded alone"):
        locate_subjects(parsed, word_tokenizer, tuple(range(1, 8)), lambda s: (1, 2))


def test_check_alignment_catches_tokens_that_differ():
    s = two_subjects()
    full = [0, 5, 6, 7, 1, 8, 9, 10] + [END] * 69
    check_alignment(full, s, [[0, 5, 6, 7, END], [0, 8, 9, 10, END]])
    with pytest.raises(SubjectError, match="differ"):
        check_alignment(full, s, [[0, 5, 6, 7, END], [0, 8, 9, 11, END]])


def test_records_carry_spans_and_single_subject_conditioning():
    s = two_subjects()
    conds = [embeddings(1), embeddings(2)]
    recs = subject_records(s, conds, [None, torch.zeros(1, 4)])
    assert recs[1]["indices"] == (5, 6, 7) and recs[1]["noun_index"] == 7 and recs[1]["cond"] is conds[1]
    assert recs[1]["single_noun_index"] == 3 and recs[0]["pooled_output"] is None
    assert prompt_record("p", (1, 2), 0.5) == {"prompt": "p", "word_positions": (1, 2), "lambda_t": 0.5}
