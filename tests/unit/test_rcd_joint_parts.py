"""RCD refine on joint text encoders (SD3 / Flux): T5 word positions (no start token), subject
pieces from character offsets, encoder parts shifted and joined, records marked with the family."""

import pytest
import torch

from rcca_core.rcd.parse import SubjectError, parse_subjects
from rcca_core.rcd.refine import (SubjectTokens, check_alignment, join_parts, locate_subjects, offset_tokenizer,
                                  prompt_record, refine_embedding, shift_subjects, subject_records, word_ids,
                                  word_positions)

T5_END = 1
PROMPT = "a black kitten and a white dog"
# T5TokenizerFast's pieces of PROMPT with their offsets: "▁" and "a" share the character of "a"
PIECES = [(3, (0, 1)), (9, (0, 1)), (1001, (2, 7)), (25573, (8, 14)), (11, (15, 18)), (3, (19, 20)), (9, (19, 20)),
          (872, (21, 26)), (1782, (27, 30))]
IDS = [i for i, _ in PIECES]
OFFSETS = [o for _, o in PIECES]
ALONE = {"a black kitten": [3, 9, 1001, 25573], "a white dog": [3, 9, 872, 1782]}


def t5_window(ids, min_length=12):
    w = list(ids) + [T5_END]
    return [w + [0] * (min_length - len(w))]


def test_word_ids_and_positions_without_start_token():
    window = t5_window(IDS)
    assert word_ids(window, T5_END, has_start=False) == IDS
    assert word_positions(window, T5_END, has_start=False) == tuple(range(len(IDS)))
    # the CLIP default is unchanged: start token at 0
    assert word_positions([[49406, 5, 6, 49407, 49407]], 49407) == (1, 2)


def test_offset_tokenizer_counts_the_prompts_pieces_before_a_prefix_end():
    tokenize = offset_tokenizer(PROMPT, IDS, OFFSETS)
    assert tokenize("") == []
    assert tokenize("a black kitten and ") == IDS[:5]
    assert tokenize(PROMPT) == IDS
    with pytest.raises(SubjectError, match="prefixes"):
        tokenize("a white")
    with pytest.raises(ValueError):
        offset_tokenizer(PROMPT, IDS, OFFSETS[:-1])


def locate_t5(prompt, pieces, alone):
    parsed = parse_subjects(prompt)
    ids = [i for i, _ in pieces]
    singles = {s: tuple(range(len(alone[s.text]))) for s in parsed}
    located = locate_subjects(parsed, offset_tokenizer(prompt, ids, [o for _, o in pieces]),
                              word_positions(t5_window(ids), T5_END, has_start=False), lambda s: singles[s])
    check_alignment(t5_window(ids)[0], located, [t5_window(alone[s.text])[0] for s in parsed])
    return located


def test_t5_subjects_located_from_offsets():
    located = locate_t5(PROMPT, PIECES, ALONE)
    assert [(s.text, s.indices, s.noun_index, s.single_indices) for s in located] == [
        ("a black kitten", (0, 1, 2, 3), 3, (0, 1, 2, 3)), ("a white dog", (5, 6, 7, 8), 8, (0, 1, 2, 3))]


def test_subject_cut_into_other_pieces_is_an_error():
    # "kitten,a white dog": the "a" after the comma has no "▁" piece, unlike "a white dog" alone
    prompt = "a black kitten,a white dog"
    pieces = [(3, (0, 1)), (9, (0, 1)), (1001, (2, 7)), (25573, (8, 14)), (6, (14, 15)), (9, (15, 16)),
              (872, (17, 22)), (1782, (23, 26))]
    with pytest.raises(SubjectError, match="a white dog"):
        locate_t5(prompt, pieces, ALONE)


def clip_subjects():
    return [SubjectTokens("a black kitten", (1, 2, 3), 3, (1, 2, 3), 3),
            SubjectTokens("a white dog", (5, 6, 7), 7, (1, 2, 3), 3)]


def test_shift_and_join_lay_the_parts_end_to_end():
    t5 = locate_t5(PROMPT, PIECES, ALONE)
    parts = [shift_subjects(clip_subjects(), 0, [0, 0]), shift_subjects(t5, 77, [77, 77])]
    joined = join_parts(parts)
    assert joined[1].indices == (5, 6, 7, 82, 83, 84, 85)
    assert joined[1].single_indices == (1, 2, 3, 77, 78, 79, 80)
    assert (joined[1].noun_index, joined[1].single_noun_index) == (7, 3)  # the first part's noun
    with pytest.raises(ValueError, match="overlap"):
        join_parts([clip_subjects(), clip_subjects()])
    with pytest.raises(ValueError, match="every subject"):
        join_parts([clip_subjects(), clip_subjects()[:1]])


def test_fusion_over_joined_parts_touches_exactly_their_rows():
    joined = join_parts([shift_subjects(clip_subjects(), 0, [0, 0]),
                         shift_subjects(locate_t5(PROMPT, PIECES, ALONE), 77, [77, 77])])
    full = torch.randn(1, 154, 8, generator=torch.Generator().manual_seed(0))
    singles = [torch.randn(1, 154, 8, generator=torch.Generator().manual_seed(i)) for i in (1, 2)]
    out = refine_embedding(full, singles, joined, 0.25)
    rows = set()
    for s, v in zip(joined, singles):
        torch.testing.assert_close(out[:, list(s.indices)],
                                   0.25 * full[:, list(s.indices)] + 0.75 * v[:, list(s.single_indices)])
        rows |= set(s.indices)
    others = [i for i in range(154) if i not in rows]
    assert torch.equal(out[:, others], full[:, others])


def test_records_name_the_parts_only_for_joint_families():
    clip = clip_subjects()
    plain = prompt_record(PROMPT, (1, 2, 3), 0.5)
    assert set(plain) == {"prompt", "word_positions", "lambda_t"}  # SD1.5 / SDXL as before
    assert set(subject_records(clip, [None, None], [None, None])[0]) == {
        "text", "indices", "noun_index", "single_indices", "single_noun_index", "cond", "pooled_output"}
    layout = [{"encoder": "t5xxl", "offset": 0, "length": 256}]
    rec = prompt_record(PROMPT, (0, 1), 0.5, "flux", layout)
    assert rec["family"] == "flux" and rec["parts"] == tuple(layout)
    subs = subject_records(clip, [None, None], [None, None], [("t5xxl", clip)])
    assert subs[1]["parts"] == ({"encoder": "t5xxl", "indices": (5, 6, 7), "noun_index": 7,
                                 "single_indices": (1, 2, 3), "single_noun_index": 3},)
