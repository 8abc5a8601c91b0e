"""Host-side layout of rollout rows for training: their real extents, the order they are trained in, trimming
padding columns, and stacking micro-batches. Shared by the trainer and the padding counts
(experiments/bench_padding.py), so the bench counts exactly what the trainer computes.

Rows are joined [left-padded prompt | right-padded response] (`sequences.join_prompt_and_response`): JOINED_KEYS
are [N, P+R], every other row array [N, R].
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional, Sequence

import numpy as np

from toolrl_jax.models.lora import DROPOUT_SEED_KEY
from toolrl_jax.sampling.config import SamplingConfig, next_power_of_two, prompt_length_bucket

JOINED_KEYS = ("input_ids", "segment_ids", "positions")  # [N, P+R]
PER_ROW_KEYS = (DROPOUT_SEED_KEY,)  # [N]: one value per row; every other row array is [N, R]


def row_extents(rows: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Real prompt and response lengths [N] of joined rows (prompt left-padded, response right-padded)."""
    r = rows["response_ids"].shape[-1]
    segments = np.asarray(rows["segment_ids"])
    prompt = segments[..., :segments.shape[-1] - r].astype(bool).sum(-1)
    response = np.asarray(rows["response_mask"]).astype(bool).sum(-1)
    return prompt, response


def length_order(prompt_len: np.ndarray, response_len: np.ndarray, prompt_width: Optional[np.ndarray] = None
                 ) -> np.ndarray:
    """Row indices shortest first: by padded prompt width when given (rows of one prompt bucket stay together), then
    response length, then prompt length. Fixed-size chunks of consecutive rows then share both widths as far as
    possible, so each carries little padding once cut with `trim_rows` (experiments/bench_padding.py measures it)."""
    keys = (prompt_len, response_len) if prompt_width is None else (prompt_len, response_len, prompt_width)
    return np.lexsort(keys)


def rows_by_length(rows: Mapping[str, np.ndarray]) -> np.ndarray:
    """`length_order` of joined rows by their real lengths."""
    return length_order(*row_extents(rows))


def trim_rows(rows: Mapping[str, np.ndarray], prompt_width: int, response_width: int) -> dict[str, np.ndarray]:
    """Keeps the last `prompt_width` prompt columns and the first `response_width` response columns of joined rows
    (any leading axes). Only padding may be cut: the log-probs, values and losses of the kept tokens are those of
    the full rows, at the cost of the cut columns only (causal attention never looks right, and left padding is
    masked and positions count real tokens)."""
    r = rows["response_ids"].shape[-1]
    p = rows["input_ids"].shape[-1] - r
    prompt_len, response_len = row_extents(rows)
    if not (1 <= prompt_width <= p and 1 <= response_width <= r):
        raise ValueError(f"trim_rows: widths ({prompt_width}, {response_width}) outside the rows' ({p}, {r})")
    if prompt_len.max(initial=0) > prompt_width or response_len.max(initial=0) > response_width:
        raise ValueError(f"trim_rows: cutting to ({prompt_width}, {response_width}) would drop tokens (longest "
                         f"prompt {prompt_len.max()}, response {response_len.max()})")
    out = {}
    for key, value in rows.items():
        if key in JOINED_KEYS:
            out[key] = value[..., p - prompt_width:p + response_width]
        elif key in PER_ROW_KEYS:
            out[key] = value
        else:
            out[key] = value[..., :response_width]
    return out


def stack_minibatches(arrays: dict[str, np.ndarray], rows_per_minibatch: int, micro_rows: int
                      ) -> list[dict[str, np.ndarray]]:
    """Splits [N, ...] rows into mini-batches shaped [num_micro, micro_rows, ...] (in row order)."""
    n = next(iter(arrays.values())).shape[0]
    out = []
    for start in range(0, n, rows_per_minibatch):
        out.append({k: v[start:start + rows_per_minibatch].reshape(
            (rows_per_minibatch // micro_rows, micro_rows) + v.shape[1:]) for k, v in arrays.items()})
    return out


def _response_bucket(length: int, buckets: Optional[Sequence[int]], cap: int, minimum: int = 64) -> int:
    """The smallest bucket >= length (powers of two >= minimum when buckets is None), at most `cap`."""
    if buckets is None:
        return min(cap, max(minimum, next_power_of_two(length)))
    return min(cap, next((b for b in buckets if b >= length), cap))


def trimmed_widths(prompt_len: np.ndarray, response_len: np.ndarray, sampling: SamplingConfig,
                   response_buckets: Optional[Sequence[int]], prompt_cap: int, response_cap: int) -> tuple[int, int]:
    """The (prompt, response) widths that rows with these real lengths are trained at under trim_padding: the
    longest of each rounded up to its bucket (the sampler's prompt buckets; `response_buckets`, None = powers of
    two >= 64), at most the rows' padded widths (the caps)."""
    prompt = min(prompt_cap, prompt_length_bucket(int(np.max(prompt_len, initial=1)), sampling))
    return prompt, _response_bucket(int(np.max(response_len, initial=1)), response_buckets, response_cap)


def training_order(prompt_len: np.ndarray, response_len: np.ndarray, sampling: SamplingConfig) -> np.ndarray:
    """Row indices in the order rows are trained under trim_padding: by prompt bucket (the sampler's), then response
    length, then prompt length, so that consecutive micro_batch_rows share both widths as far as possible."""
    buckets = np.array([prompt_length_bucket(int(n), sampling) for n in prompt_len], np.int64)
    return length_order(prompt_len, response_len, buckets)


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How a step's rows are cut for the log-prob passes and the updates. With `trim_padding`, rows are taken in
    `training_order` and every chunk is cut to its own widths (`trimmed_widths`: the sampler's prompt buckets,
    `response_buckets`); without it, rows keep their order and full width. Values never depend on the layout."""

    sampling: SamplingConfig
    trim_padding: bool = True
    response_buckets: Optional[tuple[int, ...]] = None

    def order(self, rows: Mapping[str, np.ndarray]) -> np.ndarray:
        """The order rows are trained in."""
        if not self.trim_padding:
            return np.arange(rows["response_ids"].shape[0])
        return training_order(*row_extents(rows), self.sampling)

    def trim(self, rows: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`rows` (any leading axes) cut to their longest prompt and response, each rounded up to its bucket (rows
        unchanged without trim_padding)."""
        if not self.trim_padding:
            return dict(rows)
        r = rows["response_ids"].shape[-1]
        widths = trimmed_widths(*row_extents(rows), self.sampling, self.response_buckets,
                                rows["input_ids"].shape[-1] - r, r)
        return trim_rows(rows, *widths)

    def chunks(self, rows: Mapping[str, np.ndarray], size: int) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """[(row indices, rows cut to their widths)] of `size` rows each, in training order."""
        order = self.order(rows)
        out = []
        for start in range(0, len(order), size):
            index = order[start:start + size]
            out.append((index, self.trim({k: v[index] for k, v in rows.items()})))
        return out
