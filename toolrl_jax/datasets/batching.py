"""Tokenized prompt batches with length bucketing, deterministic per-epoch shuffling and a resumable position.

`PromptDataset` encodes every example once with an injected `encode(messages) -> token ids` (the model's chat
template in real runs, see `chat_encoder`; anything in tests), truncates prompts from the LEFT to
`max_prompt_length` (as ToolRL/veRL do: the end of the prompt, where the generation starts, is kept), and serves
left-padded batches.

Order (`epoch_order`, a pure function of (lengths, seed, epoch), so `state()` is just (epoch, batch index) and
`restore` resumes exactly where an uninterrupted run would be):
  * "random" (default, the original ToolRL/veRL sampler: a `DataLoader(shuffle=True, drop_last=True)`): epoch e
    permutes the examples with a generator seeded by (seed, e) and cuts the permutation into batches; the final
    partial batch is dropped, so a *different random* remainder sits out each epoch and every step is a uniform
    random draw of the data (its length distribution is the whole set's).
  * "length_grouped" (an explicit option): consecutive windows of `batch_size * sort_window` permuted examples are
    sorted by length and cut into batches, and the batch order is shuffled. Less prompt padding, but a step then
    covers a narrow length band, and when the window exceeds the data the dropped remainder is always the longest
    prompts (never trained on). Padding inside a GRPO step is cut by ordering its rows instead
    (`GRPOTrainer.row_order`), which leaves what is trained unchanged.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

from toolrl_jax.config_checks import option
from toolrl_jax.datasets.cursor import EpochCursor
from toolrl_jax.datasets.example import ToolRLExample

EncodeFn = Callable[[list[dict[str, str]]], Sequence[int]]
STATE_VERSION = 1
ORDERS = ("random", "length_grouped")


def chat_encoder(tokenizer) -> EncodeFn:
    """encode(messages) with the tokenizer's own chat template and the generation prompt appended."""
    from toolrl_jax.tokenization import encode_chat

    return lambda messages: encode_chat(tokenizer, messages, add_generation_prompt=True)


def default_buckets(max_prompt_length: int, smallest: int = 32) -> tuple[int, ...]:
    """Powers of two from `smallest` below max_prompt_length, then max_prompt_length itself."""
    buckets = []
    length = smallest
    while length < max_prompt_length:
        buckets.append(length)
        length *= 2
    return (*buckets, max_prompt_length)


@dataclasses.dataclass(frozen=True)
class BatchingConfig:
    """batch_size: prompts per batch. max_prompt_length: longer prompts are handled per `truncation` ("left":
    keep the last max_prompt_length tokens; "drop": leave the example out; "error": raise). bucket_lengths: the
    padded lengths a batch may take (sorted, last == max_prompt_length; None = `default_buckets`). order: "random"
    (uniform random batches, the original's) or "length_grouped" (see the module doc); sort_window: batches per
    length-sorting window of the "length_grouped" order. drop_last: drop an epoch's final partial batch (static
    shapes)."""
    batch_size: int
    max_prompt_length: int
    seed: int = 0
    shuffle: bool = True
    order: Literal["random", "length_grouped"] = option(
        "random", "Which prompts share a step. random: a uniform random batch each step, a different random "
                  "remainder dropped each epoch (the original ToolRL/veRL sampler). length_grouped: prompts of similar "
                  "length share a step (less rollout padding, but each step covers a narrow length band and, when "
                  "--length_group_window x the batch exceeds the data, the longest prompts are never trained on). "
                  "Padding inside a step is cut by --trim_padding either way.", choices=ORDERS, flag="prompt_order")
    sort_window: int = option(16, "--prompt_order=length_grouped: batches per length-sorting window.",
                              flag="length_group_window")
    bucket_lengths: tuple[int, ...] | None = None
    drop_last: bool = True
    truncation: Literal["left", "drop", "error"] = "left"
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_prompt_length < 1 or self.sort_window < 1:
            raise ValueError("batch_size, max_prompt_length and sort_window must be >= 1, got "
                             f"{self.batch_size}, {self.max_prompt_length}, {self.sort_window}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.truncation not in ("left", "drop", "error"):
            raise ValueError(f"truncation must be 'left', 'drop' or 'error', got {self.truncation!r}")
        if self.bucket_lengths is not None:
            b = tuple(self.bucket_lengths)
            if not b or list(b) != sorted(set(b)) or b[0] < 1 or b[-1] != self.max_prompt_length:
                raise ValueError(f"bucket_lengths must be strictly increasing positive lengths ending at "
                                 f"max_prompt_length={self.max_prompt_length}, got {b}")

    @property
    def buckets(self) -> tuple[int, ...]:
        return tuple(self.bucket_lengths) if self.bucket_lengths is not None \
            else default_buckets(self.max_prompt_length)


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """A left-padded batch. input_ids/attention_mask/positions: [B, L] int32 (mask 1 on real tokens; positions
    count real tokens from 0, 0 on padding); lengths: [B] real lengths; truncated: [B] whether the prompt was cut;
    indices: [B] positions in the dataset's `examples`; prompt_ids: the unpadded ids (for the sampler)."""
    input_ids: np.ndarray
    attention_mask: np.ndarray
    positions: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray
    indices: np.ndarray
    examples: tuple[ToolRLExample, ...]
    prompt_ids: tuple[tuple[int, ...], ...]

    @property
    def ground_truths(self) -> list[str]:
        return [e.ground_truth for e in self.examples]


def epoch_order(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int, order: str = "random",
                sort_window: int = 16, shuffle: bool = True, drop_last: bool = True) -> list[np.ndarray]:
    """The example indices of every batch of `epoch`, in order: a pure function of its arguments (module doc).

    lengths: [N] prompt lengths (used only by the "length_grouped" order).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    permutation = rng.permutation(n) if shuffle else np.arange(n)
    grouped = order == "length_grouped" and sort_window > 1
    window = batch_size * sort_window if grouped else max(n, 1)
    batches: list[np.ndarray] = []
    for start in range(0, n, window):
        chunk = permutation[start:start + window]
        if grouped:
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    if batches and drop_last and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle and grouped:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def left_pad(sequences: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray,
                                                                                       np.ndarray]:
    """(ids, mask, positions), each [len(sequences), length] int32, sequences right-aligned."""
    n = len(sequences)
    ids = np.full((n, length), pad_id, dtype=np.int32)
    mask = np.zeros((n, length), dtype=np.int32)
    for row, seq in enumerate(sequences):
        if len(seq) > length:
            raise ValueError(f"sequence {row} has {len(seq)} tokens, more than the padded length {length}")
        if len(seq):
            ids[row, length - len(seq):] = seq
            mask[row, length - len(seq):] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, positions


class PromptDataset(EpochCursor):
    """Batches of tokenized prompts (see module doc). Iterating yields batches forever, epoch after epoch."""

    def __init__(self, examples: Sequence[ToolRLExample], encode: EncodeFn, config: BatchingConfig):
        self.config = config
        self.examples: list[ToolRLExample] = []
        self._ids: list[np.ndarray] = []
        self._truncated: list[bool] = []
        self.num_dropped = 0
        limit = config.max_prompt_length
        for i, example in enumerate(examples):
            ids = np.asarray(list(encode(example.prompt_messages)), dtype=np.int64)
            if ids.ndim != 1 or ids.size == 0:
                raise ValueError(f"encode() returned no token ids for example {i} (source {example.source!r}, "
                                 f"index {example.index})")
            cut = ids.size > limit
            if cut and config.truncation == "error":
                raise ValueError(f"example {i} (source {example.source!r}, index {example.index}) has {ids.size} "
                                 f"prompt tokens > max_prompt_length={limit}")
            if cut and config.truncation == "drop":
                self.num_dropped += 1
                continue
            self.examples.append(example)
            self._ids.append(ids[-limit:])
            self._truncated.append(bool(cut))
        self.lengths = np.array([ids.size for ids in self._ids], dtype=np.int64)
        self.num_truncated = int(sum(self._truncated))
        if len(self.examples) < config.batch_size and config.drop_last:
            raise ValueError(f"{len(self.examples)} usable examples cannot fill one batch of {config.batch_size}")
        crc = zlib.crc32(self.lengths.tobytes())
        for ids in self._ids:
            crc = zlib.crc32(ids.tobytes(), crc)
        self._fingerprint = crc
        self._epoch = 0
        self._batch = 0
        self._cached_epoch: tuple[int, list[np.ndarray]] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def token_ids(self, i: int) -> np.ndarray:
        """The (possibly truncated) prompt ids of example i."""
        return self._ids[i]

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The example indices of every batch of `epoch`, in order (pure in (seed, epoch))."""
        if self._cached_epoch is not None and self._cached_epoch[0] == epoch:
            return self._cached_epoch[1]
        cfg = self.config
        batches = epoch_order(self.lengths, cfg.batch_size, seed=cfg.seed, epoch=epoch, order=cfg.order,
                              sort_window=cfg.sort_window, shuffle=cfg.shuffle, drop_last=cfg.drop_last)
        self._cached_epoch = (epoch, batches)
        return batches

    @property
    def batches_per_epoch(self) -> int:
        return len(self.epoch_batches(0))

    def make_batch(self, indices: Sequence[int]) -> PromptBatch:
        """The padded batch of the given example indices (padded to the smallest bucket that fits)."""
        indices = np.asarray(indices, dtype=np.int64)
        seqs = [self._ids[i] for i in indices]
        longest = max(s.size for s in seqs)
        length = next(b for b in self.config.buckets if b >= longest)
        ids, mask, positions = left_pad(seqs, length, self.config.pad_id)
        return PromptBatch(input_ids=ids, attention_mask=mask, positions=positions,
                           lengths=np.array([s.size for s in seqs], dtype=np.int32),
                           truncated=np.array([self._truncated[i] for i in indices], dtype=bool), indices=indices,
                           examples=tuple(self.examples[i] for i in indices),
                           prompt_ids=tuple(tuple(int(t) for t in s) for s in seqs))

    def __iter__(self) -> Iterator[PromptBatch]:
        while True:
            yield self.next_batch()

    def _identity(self) -> dict[str, Any]:
        cfg = self.config
        grouped = cfg.order == "length_grouped"
        return {"version": STATE_VERSION, "seed": cfg.seed, "batch_size": cfg.batch_size, "shuffle": cfg.shuffle,
                "order": cfg.order, "sort_window": cfg.sort_window if grouped else 1, "drop_last": cfg.drop_last,
                "num_examples": len(self.examples), "fingerprint": self._fingerprint}

    def restore(self, state: Mapping[str, Any]) -> None:
        """As `EpochCursor.restore`; a position saved before `order` existed was "length_grouped" (the only order
        then, or "random" when its sort_window was 1)."""
        if "order" not in state:
            state = {**state, "order": "length_grouped" if state.get("sort_window", 1) > 1 else "random"}
        super().restore(state)
