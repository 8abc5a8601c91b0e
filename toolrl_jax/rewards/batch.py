"""Batch reward scoring for rollouts: numpy arrays per component, optional process pool, deterministic results.

Each response and each distinct ground truth is parsed once (a GRPO group shares one ground truth) and the parse
is reused by the format, correctness and length rewards. With a pool, contiguous chunks are scored in worker
processes and reassembled in order, so results are identical to the serial path.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
from typing import Any, Protocol, Sequence

import numpy as np

from toolrl_jax.rewards.config import RewardConfig
from toolrl_jax.rewards.parsing import GroundTruthError, ParsedGroundTruth, parse_ground_truth, parse_response
from toolrl_jax.rewards.reward import score_parsed

_FIELDS = ("total", "format", "correctness", "length", "accuracy")


class _Mapper(Protocol):
    def map(self, fn: Any, iterable: Any, /) -> Any: ...


@dataclasses.dataclass(frozen=True)
class RewardBatch:
    """Per-sample rewards, float64 [N] each (Python floats exactly). accuracy is 1.0 on an exact call-list match."""

    total: np.ndarray
    format: np.ndarray
    correctness: np.ndarray
    length: np.ndarray
    accuracy: np.ndarray

    def __len__(self) -> int:
        return int(self.total.shape[0])

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Batch means for logging, e.g. {"reward/total": ..., "reward/accuracy": ...}."""
        if len(self) == 0:
            return {}
        return {prefix + name: float(getattr(self, name).mean()) for name in _FIELDS}


def _score_chunk(args: tuple[int, Sequence[str], Sequence[str], int, RewardConfig]) -> list[tuple[float, ...]]:
    """Score one contiguous chunk (module-level so worker processes can run it)."""
    offset, responses, ground_truths, step, config = args
    scales = config.scales(step)
    gt_cache: dict[str, ParsedGroundTruth] = {}
    rows = []
    for i, (response, ground_truth) in enumerate(zip(responses, ground_truths)):
        gt = gt_cache.get(ground_truth)
        if gt is None:
            try:
                gt = gt_cache[ground_truth] = parse_ground_truth(ground_truth)
            except GroundTruthError as e:
                raise GroundTruthError(f"ground_truths[{offset + i}]: {e}") from None
        r = score_parsed(parse_response(response), gt, scales, config)
        rows.append((r.total, r.format, r.correctness, r.length, r.accuracy))
    return rows


def score_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    step: int,
    config: RewardConfig | None = None,
    pool: _Mapper | None = None,
    chunk_size: int = 128,
) -> RewardBatch:
    """Rewards of `responses` (extracted assistant turns, see `extract_assistant_turn`) against `ground_truths`.

    step: 1-based global training step (0 = before training). pool: anything with `.map(fn, iterable)` (e.g. from
    `make_reward_pool`); None scores serially. Raises GroundTruthError naming the index of a malformed GT.
    """
    config = config or RewardConfig()
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    for name, seq in (("responses", responses), ("ground_truths", ground_truths)):
        for i, item in enumerate(seq):
            if not isinstance(item, str):
                raise TypeError(f"{name}[{i}] must be a str, got {type(item).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    config.scales(step)  # validate step before dispatching work
    chunks = [
        (start, list(responses[start:start + chunk_size]), list(ground_truths[start:start + chunk_size]), step, config)
        for start in range(0, len(responses), chunk_size)
    ]
    if pool is None or len(chunks) <= 1:
        results = map(_score_chunk, chunks)
    else:
        results = pool.map(_score_chunk, chunks)
    rows = [row for chunk_rows in results for row in chunk_rows]
    table = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(_FIELDS))
    return RewardBatch(*(np.ascontiguousarray(table[:, j]) for j in range(len(_FIELDS))))


def make_reward_pool(num_workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """A process pool for `score_batch`. Uses forkserver so workers never fork a process that has started JAX
    threads. Use as a context manager or call `.shutdown()`."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=num_workers, mp_context=multiprocessing.get_context("forkserver")
    )
