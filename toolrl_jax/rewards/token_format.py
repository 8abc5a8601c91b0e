"""Token-level tag counting in JAX: a sound pre-filter for the format reward, computed on rollout token ids.

`count_tag_tokens` counts, per row, the windows of response token ids equal to each tag's canonical token
spelling (`encode(tag)`). Every such window decodes to the tag, and the counted tags have no self-overlap, so
for byte-level BPE tokenizers the count is a LOWER BOUND of `decoded_text.count(tag)`; it is exact when the tag
is a single special token the model can only emit as that token (e.g. `<tool_call>` in Qwen2.5/3). A model may
also spell a tag with other tokens (`"\\n<"`, `"response"`, `">"`), so the string path stays the reference.

`definitely_malformed` uses the bound soundly: a tag that must occur exactly once but is counted twice fails the
format check whatever the decode says. It never rejects a response the string path accepts (tested).

Does it pay? No, not for the reward: the string format check costs a few microseconds per response (counts,
then one anchored regex) and the text must be decoded anyway for the JSON correctness check, so the token path
can only add work. See experiments/bench_rewards.py for the measured figures. It is kept as a cheap on-device
diagnostic (tag statistics of a rollout batch without decoding) and as a tested building block.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from toolrl_jax.rewards.parsing import COUNTED_TAGS, ParsedGroundTruth
from toolrl_jax.rewards.reward import required_once_tags


def encode_bytes_with_specials(text: str, special_ids: dict[str, int]) -> list[int]:
    """A byte-level reference encoding (ids 0-255 = UTF-8 bytes, `special_ids` as single tokens), the canonical
    spelling used by tests and benchmarks where no real tokenizer is needed."""
    ids, i = [], 0
    while i < len(text):
        for special, sid in special_ids.items():
            if text.startswith(special, i):
                ids.append(sid)
                i += len(special)
                break
        else:
            ids.extend(text[i].encode())
            i += 1
    return ids


def _has_border(s: str) -> bool:
    """True if a proper prefix of s equals a suffix (then occurrences could overlap)."""
    return any(s[:k] == s[-k:] for k in range(1, len(s)))


@dataclasses.dataclass(frozen=True)
class TagTokenPatterns:
    """Canonical token spellings of tags: ids [K, N] int32 padded with -1, lengths [K]."""

    tags: tuple[str, ...]
    ids: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_encode(cls, encode: Callable[[str], Sequence[int]],
                    tags: Sequence[str] = COUNTED_TAGS) -> "TagTokenPatterns":
        """Build from a tokenizer's encode function (no special BOS/EOS added), e.g. `lambda s: tok.encode(s)`."""
        spellings = []
        for tag in tags:
            if _has_border(tag):
                raise ValueError(f"tag {tag!r} can overlap itself; window counts would not bound str.count")
            ids = [int(i) for i in encode(tag)]
            if not ids or min(ids) < 0:
                raise ValueError(f"encode({tag!r}) gave {ids}; expected non-negative token ids")
            spellings.append(ids)
        width = max(len(s) for s in spellings)
        table = np.full((len(spellings), width), -1, dtype=np.int32)
        for k, s in enumerate(spellings):
            table[k, : len(s)] = s
        return cls(tuple(tags), table, np.asarray([len(s) for s in spellings], dtype=np.int32))


@jax.jit
def count_tag_tokens(
    token_ids: jax.Array, mask: jax.Array, pattern_ids: jax.Array, pattern_lengths: jax.Array
) -> jax.Array:
    """Per row, the number of valid windows equal to each pattern. token_ids/mask [B, T]; pattern_ids [K, N]
    (-1 padded); pattern_lengths [K]. Returns int32 [B, K]."""
    chex.assert_rank([token_ids, mask, pattern_ids, pattern_lengths], [2, 2, 2, 1])
    chex.assert_equal_shape([token_ids, mask])
    (_, t), (k, n) = token_ids.shape, pattern_ids.shape
    chex.assert_shape(pattern_lengths, (k,))
    ids = jnp.pad(token_ids.astype(jnp.int32), ((0, 0), (0, n - 1)), constant_values=-1)
    valid = jnp.pad(mask.astype(bool), ((0, 0), (0, n - 1)), constant_values=False)
    windows = jnp.stack([ids[:, j : j + t] for j in range(n)], axis=-1)  # [B, T, N]
    windows_valid = jnp.stack([valid[:, j : j + t] for j in range(n)], axis=-1)
    needed = jnp.arange(n)[None, :] < pattern_lengths[:, None]  # [K, N]
    hit = (windows[:, :, None, :] == pattern_ids[None, None]) & windows_valid[:, :, None, :]
    matched = jnp.all(hit | ~needed[None, None], axis=-1)  # [B, T, K]
    return matched.sum(axis=1, dtype=jnp.int32)


def required_once_mask(ground_truths: Sequence[ParsedGroundTruth], tags: Sequence[str] = COUNTED_TAGS) -> np.ndarray:
    """bool [B, K]: which tags the format rule (picked by each GT) requires to occur exactly once."""
    out = np.zeros((len(ground_truths), len(tags)), dtype=bool)
    for b, gt in enumerate(ground_truths):
        required = required_once_tags(gt)
        out[b] = [tag in required for tag in tags]
    return out


@jax.jit
def definitely_malformed(counts: jax.Array, required_once: jax.Array) -> jax.Array:
    """bool [B]: some tag required exactly once has a token-count lower bound above 1 (so the format check fails)."""
    chex.assert_equal_shape([counts, required_once])
    return jnp.any((counts > 1) & required_once, axis=-1)
