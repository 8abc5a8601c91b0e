"""SFT data: examples -> [prompt | assistant turn] token sequences with a loss mask, and batches of them.

Tokenization (`SFTEncoder`): the prompt is the chat template over the example's messages with the generation prompt
(exactly what the model sees at rollout time); the target is the ground-truth assistant turn followed by the chat
family's end-of-turn token (`<|im_end|>` for ChatML/Qwen, `<|eot_id|>` for Llama-3). The end-of-turn token is read
off the template itself: the conversation is rendered once more with the assistant turn appended, its prefix must
be the generation-prompt rendering, and the rest must be the ground truth (up to surrounding whitespace, which some
templates trim) followed by the end-of-turn token and nothing but whitespace. Loss falls on the target tokens only.
Prompts that do not fit are truncated from the left (the end of the prompt, where the answer starts, is kept);
examples whose target alone does not fit are dropped and counted.

Batching (`SFTDataset`): one optimizer step consumes `batch_size` EXAMPLES in both modes, so packing changes only
the layout, never the loss (the loss is the token mean over the whole batch):
  * packing: the step's examples are packed into rows (best-fit decreasing), segment ids 1, 2, 3, ... per row;
  * bucketing: one example per row, right-padded; examples are grouped by length within windows of
    `sort_window` batches so rows of a batch have similar lengths.
Rows are padded to a multiple of `micro_batch_size` with empty rows and reshaped to [num_micro, micro, T]; T is
the smallest bucket length that fits (powers of two up to max_length by default), so shapes, and compilations,
are bounded. The example order of epoch e is a pure function of (seed, e), so the resumable position is just
(epoch, batch index).
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from toolrl_jax.datasets.cursor import EpochCursor
from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.tokenization import render_chat, stop_token_ids

STATE_VERSION = 1


# ---------------------------------------------------------------------------------------------------- tokenization
@dataclasses.dataclass(frozen=True)
class SFTSequence:
    """One tokenized example: input_ids = prompt ids + target ids (target = assistant turn + end-of-turn token)."""

    input_ids: np.ndarray  # int32 [L]
    prompt_length: int  # number of (possibly truncated) prompt tokens at the start of input_ids
    example_index: int  # position in the list of examples given to `tokenize_examples`
    truncated: bool  # the prompt was cut from the left

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_targets(self) -> int:
        return len(self) - self.prompt_length

    @property
    def loss_mask(self) -> np.ndarray:
        """[L] 1 on target tokens (the assistant turn and its end-of-turn token), 0 on the prompt."""
        mask = np.zeros(len(self), np.int32)
        mask[self.prompt_length:] = 1
        return mask


@dataclasses.dataclass(frozen=True)
class TokenizeReport:
    """What tokenization did to a list of examples."""

    num_examples: int
    num_kept: int
    num_truncated: int  # kept, with the prompt cut from the left
    num_dropped: int  # the target alone did not fit in max_length
    dropped_indices: tuple[int, ...]  # example indices of the dropped ones
    max_target_length: int  # longest kept target (tokens, end-of-turn included)

    def metrics(self, prefix: str = "data/") -> dict[str, int]:
        return {f"{prefix}examples": self.num_examples, f"{prefix}kept": self.num_kept,
                f"{prefix}truncated": self.num_truncated, f"{prefix}dropped": self.num_dropped}


class TemplateError(ValueError):
    """The chat template does not render an assistant turn as <generation prompt> + content + end-of-turn."""


class SFTEncoder:
    """Turns examples into (prompt ids, target ids) with the tokenizer's own chat template."""

    def __init__(self, tokenizer: Any, end_of_turn_id: Optional[int] = None):
        self.tokenizer = tokenizer
        self.end_of_turn_id = int(stop_token_ids(tokenizer)[0] if end_of_turn_id is None else end_of_turn_id)
        self.end_of_turn = tokenizer.convert_ids_to_tokens(self.end_of_turn_id)
        if not isinstance(self.end_of_turn, str) or not self.end_of_turn:
            raise ValueError(f"end-of-turn id {self.end_of_turn_id} is not a token of this tokenizer")

    def split_turn(self, messages: Sequence[Mapping[str, str]], ground_truth: str, where: str = "example"
                   ) -> tuple[str, str]:
        """(prompt text with the generation prompt, assistant content as the template renders it)."""
        prompt = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        full = render_chat(self.tokenizer, [*messages, {"role": "assistant", "content": ground_truth}],
                           add_generation_prompt=False)
        if not full.startswith(prompt):
            raise TemplateError(
                f"{where}: the chat template renders [messages + assistant turn] with a prefix different from "
                f"[messages + generation prompt], so the assistant turn cannot be isolated; they diverge at character "
                f"{_divergence(prompt, full)}: {prompt[-80:]!r} vs {full[:len(prompt)][-80:]!r}")
        suffix = full[len(prompt):]
        cut = suffix.rfind(self.end_of_turn)
        if cut < 0 or suffix[cut + len(self.end_of_turn):].strip():
            raise TemplateError(f"{where}: the rendered assistant turn does not end with the end-of-turn token "
                                f"{self.end_of_turn!r} (followed only by whitespace): ...{suffix[-120:]!r}")
        content = suffix[:cut]
        if content.strip() != ground_truth.strip():
            raise TemplateError(f"{where}: the chat template rewrites the assistant content (beyond surrounding "
                                f"whitespace), e.g. by dropping reasoning; rendered {content[:120]!r}..., ground truth "
                                f"{ground_truth[:120]!r}...")
        return prompt, content

    def encode(self, examples: Sequence[ToolRLExample]) -> list[tuple[list[int], list[int]]]:
        """[(prompt ids, target ids incl. the end-of-turn id)] for every example (batch-tokenized)."""
        prompts, contents = [], []
        for i, example in enumerate(examples):
            prompt, content = self.split_turn(example.prompt_messages, example.ground_truth,
                                              where=f"example {i} (source {example.source!r}, index {example.index})")
            prompts.append(prompt)
            contents.append(content)
        if not examples:
            return []
        tok = self.tokenizer
        prompt_ids = tok(prompts, add_special_tokens=False)["input_ids"]
        content_ids = tok(contents, add_special_tokens=False)["input_ids"]
        return [(list(p), [*c, self.end_of_turn_id]) for p, c in zip(prompt_ids, content_ids)]


def _divergence(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def tokenize_examples(tokenizer: Any, examples: Sequence[ToolRLExample], max_length: int,
                      max_prompt_length: Optional[int] = None, *, vocab_size: Optional[int] = None,
                      encoder: Optional[SFTEncoder] = None) -> tuple[list[SFTSequence], TokenizeReport]:
    """Tokenized sequences of at most `max_length` tokens (prompts also capped at `max_prompt_length`).

    A prompt is cut from the left to fit; an example whose target does not fit next to at least one prompt token
    is dropped (reported). `vocab_size`, when given, is checked against every id (a tokenizer with more tokens than
    the model's embedding would otherwise fail deep inside the model).
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (one prompt token and one target token), got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None, got {max_prompt_length}")
    encoder = encoder or SFTEncoder(tokenizer)
    sequences: list[SFTSequence] = []
    dropped: list[int] = []
    truncated = 0
    longest_target = 0
    for i, (prompt, target) in enumerate(encoder.encode(examples)):
        if not prompt:
            raise ValueError(f"example {i}: the chat template rendered an empty prompt")
        budget = max_length - len(target)
        if max_prompt_length is not None:
            budget = min(budget, max_prompt_length)
        if budget < 1:
            dropped.append(i)
            continue
        keep = prompt[-budget:]
        ids = np.asarray([*keep, *target], dtype=np.int64)
        if vocab_size is not None and (ids.max() >= vocab_size or ids.min() < 0):
            raise ValueError(f"example {i}: token id {int(ids.max())} is outside the model's vocabulary "
                             f"[0, {vocab_size}): tokenizer and model do not match")
        cut = len(keep) < len(prompt)
        truncated += int(cut)
        longest_target = max(longest_target, len(target))
        sequences.append(SFTSequence(input_ids=ids.astype(np.int32), prompt_length=len(keep), example_index=i,
                                     truncated=cut))
    report = TokenizeReport(num_examples=len(examples), num_kept=len(sequences), num_truncated=truncated,
                            num_dropped=len(dropped), dropped_indices=tuple(dropped),
                            max_target_length=longest_target)
    return sequences, report


# ---------------------------------------------------------------------------------------------------- batching
def default_length_buckets(max_length: int, smallest: int = 64) -> tuple[int, ...]:
    """Powers of two from `smallest` below max_length, then max_length."""
    buckets, length = [], smallest
    while length < max_length:
        buckets.append(length)
        length *= 2
    return (*buckets, max_length)


@dataclasses.dataclass(frozen=True)
class SFTBatchingConfig:
    """batch_size: examples per optimizer step. micro_batch_size: rows per gradient-accumulation micro-batch.
    max_length: tokens per row. packing: several examples per row (True) or one per row, length-bucketed (False).
    sort_window: (bucketing) batches per length-sorting window; 1 = no length grouping. bucket_lengths: allowed
    padded row lengths (strictly increasing, last == max_length; None = `default_length_buckets`). drop_last: drop
    an epoch's final partial batch (otherwise it is a smaller batch). pad_id: id written on padding (never
    trained on)."""

    batch_size: int
    micro_batch_size: int
    max_length: int
    packing: bool = True
    seed: int = 0
    shuffle: bool = True
    sort_window: int = 16
    bucket_lengths: Optional[tuple[int, ...]] = None
    drop_last: bool = False
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 1 or self.sort_window < 1:
            raise ValueError(f"batch_size, micro_batch_size and sort_window must be >= 1, got {self.batch_size}, "
                             f"{self.micro_batch_size}, {self.sort_window}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if not self.packing and self.batch_size % self.micro_batch_size:
            raise ValueError(f"without packing every row holds one example, so batch_size ({self.batch_size}) must "
                             f"be a multiple of micro_batch_size ({self.micro_batch_size})")
        if self.bucket_lengths is not None:
            b = tuple(int(x) for x in self.bucket_lengths)
            if not b or list(b) != sorted(set(b)) or b[0] < 1 or b[-1] != self.max_length:
                raise ValueError(f"bucket_lengths must be strictly increasing positive lengths ending at "
                                 f"max_length={self.max_length}, got {self.bucket_lengths}")
            object.__setattr__(self, "bucket_lengths", b)

    @property
    def buckets(self) -> tuple[int, ...]:
        return self.bucket_lengths if self.bucket_lengths is not None else default_length_buckets(self.max_length)


@dataclasses.dataclass(frozen=True)
class SFTBatch:
    """One optimizer step's data, numpy, every array [num_micro, micro, T].

    input_ids, segment_ids (0 = padding, 1, 2, ... = examples of a row), positions (from 0 within each segment),
    target_ids (the next token of the same segment; pad elsewhere), loss_weights float32 (1 where target_ids is an
    assistant-turn token). indices: the sequences (dataset positions) in this batch.
    """

    input_ids: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    target_ids: np.ndarray
    loss_weights: np.ndarray
    indices: np.ndarray

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays a train step consumes."""
        return {"input_ids": self.input_ids, "segment_ids": self.segment_ids, "positions": self.positions,
                "target_ids": self.target_ids, "loss_weights": self.loss_weights}

    @property
    def num_examples(self) -> int:
        return int(self.indices.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.input_ids.shape[0] * self.input_ids.shape[1])

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_weights.sum())

    @property
    def num_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())


def pack_best_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: lists of item positions whose lengths sum to at most `capacity`.

    Deterministic: items are taken longest first (ties by position) and each goes to the open row with the least
    room that still fits it (ties: the earliest row)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[item]
        if size > capacity:
            raise ValueError(f"item {item} has length {size} > capacity {capacity}")
        best = -1
        for r, free in enumerate(room):
            if free >= size and (best < 0 or free < room[best]):
                best = r
        if best < 0:
            rows.append([item])
            room.append(capacity - size)
        else:
            rows[best].append(item)
            room[best] -= size
    return rows


def _fill_row(row: int, sequences: Sequence[SFTSequence], arrays: dict[str, np.ndarray]) -> None:
    """Writes sequences one after the other into row `row` with segment ids 1, 2, ...."""
    start = 0
    for segment, seq in enumerate(sequences, start=1):
        n = len(seq)
        end = start + n
        arrays["input_ids"][row, start:end] = seq.input_ids
        arrays["segment_ids"][row, start:end] = segment
        arrays["positions"][row, start:end] = np.arange(n, dtype=np.int32)
        arrays["target_ids"][row, start:end - 1] = seq.input_ids[1:]
        # Token t is trained to predict token t + 1 when t + 1 is a target token of the same sequence.
        arrays["loss_weights"][row, start + seq.prompt_length - 1:end - 1] = 1.0
        start = end


class SFTDataset(EpochCursor):
    """Batches of SFT sequences (see the module docstring); `next_batch` runs epoch after epoch."""

    _position_name = "SFT data position"
    _mismatch_hint = "different data, tokenizer, max_length or seed?"

    def __init__(self, sequences: Sequence[SFTSequence], config: SFTBatchingConfig):
        self.config = config
        self.sequences = list(sequences)
        if not self.sequences:
            raise ValueError("SFTDataset needs at least one sequence (were all examples dropped as too long?)")
        too_long = [i for i, s in enumerate(self.sequences) if len(s) > config.max_length]
        if too_long:
            raise ValueError(f"sequences {too_long[:5]} are longer than max_length={config.max_length}")
        if config.drop_last and len(self.sequences) < config.batch_size:
            raise ValueError(f"{len(self.sequences)} sequences cannot fill one batch of {config.batch_size} "
                             "with drop_last")
        self.lengths = np.array([len(s) for s in self.sequences], dtype=np.int64)
        crc = zlib.crc32(self.lengths.tobytes())
        for s in self.sequences:
            crc = zlib.crc32(s.input_ids.tobytes(), crc)
            crc = zlib.crc32(np.int64(s.prompt_length).tobytes(), crc)
        self._fingerprint = crc
        self._epoch = 0
        self._batch = 0
        self._cached: Optional[tuple[int, list[np.ndarray]]] = None

    def __len__(self) -> int:
        return len(self.sequences)

    # ------------------------------------------------------------------ order
    @property
    def batches_per_epoch(self) -> int:
        n, b = len(self.sequences), self.config.batch_size
        return n // b if self.config.drop_last else -(-n // b)

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """Sequence indices of every batch of `epoch`, in order (a pure function of (seed, epoch))."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        cfg, n = self.config, len(self.sequences)
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(n) if cfg.shuffle else np.arange(n)
        group_by_length = not cfg.packing and cfg.sort_window > 1
        if group_by_length:
            window = cfg.batch_size * cfg.sort_window
            order = np.concatenate([chunk[np.argsort(self.lengths[chunk], kind="stable")]
                                    for chunk in np.array_split(order, range(window, n, window))])
        batches = [order[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        if cfg.drop_last and len(batches[-1]) < cfg.batch_size:
            batches.pop()
        if cfg.shuffle and group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cached = (epoch, batches)
        return batches

    # ------------------------------------------------------------------ layout
    def make_batch(self, indices: Sequence[int]) -> SFTBatch:
        """The padded (packed or one-per-row) batch of the given sequence indices."""
        cfg = self.config
        indices = np.asarray(indices, dtype=np.int64)
        seqs = [self.sequences[i] for i in indices]
        if cfg.packing:
            rows = [[seqs[j] for j in row] for row in pack_best_fit([len(s) for s in seqs], cfg.max_length)]
        else:
            rows = [[s] for s in seqs]
        longest = max(sum(len(s) for s in row) for row in rows)
        length = next(b for b in cfg.buckets if b >= longest)
        micro = cfg.micro_batch_size
        num_rows = -(-len(rows) // micro) * micro
        arrays = {name: np.zeros((num_rows, length), np.int32)
                  for name in ("input_ids", "segment_ids", "positions", "target_ids")}
        arrays["input_ids"][:] = cfg.pad_id
        arrays["target_ids"][:] = cfg.pad_id
        arrays["loss_weights"] = np.zeros((num_rows, length), np.float32)
        for r, row in enumerate(rows):
            _fill_row(r, row, arrays)
        shaped = {k: v.reshape(num_rows // micro, micro, length) for k, v in arrays.items()}
        return SFTBatch(indices=indices, **shaped)

    # ------------------------------------------------------------------ iteration and resumable position
    def iter_epoch(self, epoch: int = 0):
        """Every batch of one epoch, without touching the position (evaluation)."""
        for indices in self.epoch_batches(epoch):
            yield self.make_batch(indices)

    @property
    def epochs_done(self) -> float:
        """Fractional epochs consumed so far."""
        return self._epoch + self._batch / max(self.batches_per_epoch, 1)

    def _identity(self) -> dict[str, Any]:
        cfg = self.config
        return {"version": STATE_VERSION, "seed": cfg.seed, "batch_size": cfg.batch_size, "shuffle": cfg.shuffle,
                "packing": cfg.packing, "sort_window": cfg.sort_window, "drop_last": cfg.drop_last,
                "num_sequences": len(self.sequences), "fingerprint": self._fingerprint}
