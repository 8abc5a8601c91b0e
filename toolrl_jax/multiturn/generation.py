"""The generation interface of a multi-turn rollout: one batched call per turn, given token-id prompts, per-row
token budgets and a key; and its adapter for the project's JAX `Sampler`.

Keeping the rollout behind a plain callable lets tests drive it with a scripted model and lets other engines plug
in (TRL's tool-calling GRPO and veRL's agent loop likewise separate the generation server from the tool loop).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from toolrl_jax.sampling.config import SamplingConfig


@dataclasses.dataclass(frozen=True, eq=False)
class Generation:
    """One row's generated turn.

    token_ids: [n] int32, exactly as sampled; ends with the stop token when `stopped`.
    logprobs: [n] float32 log-probs of those tokens under the sampling policy (the Sampler's untempered ones).
    stopped: whether the turn ended with a stop token (False: cut at its token budget).
    text: the decoded turn without the stop token (special tokens kept), or None to let the rollout decode it.
    """

    token_ids: np.ndarray
    logprobs: np.ndarray
    stopped: bool
    text: str | None = None


# generate(prompt_ids, max_new_tokens, key, rows) -> one Generation per prompt, in order; max_new_tokens[i] >= 1 is
# row i's budget; rows[i] = (prompt number, sample number) of row i's trajectory. A row must depend only on (key,
# rows[i], prompt), so that a trajectory does not depend on which others share the call.
GenerateFn = Callable[[list[list[int]], list[int], jax.Array, list[tuple[int, int]]], Sequence[Generation]]


def sampler_generate(sampler: Any, sampling_config: SamplingConfig) -> GenerateFn:
    """A GenerateFn over `Sampler.generate`: one sample per prompt (GRPO groups are formed by repeating examples,
    one environment each), row keys from each trajectory's (prompt, sample) numbers, so the first turn of a group
    samples exactly what `Sampler.generate` with group_size samples per prompt does; per-row budgets, which must not
    exceed `sampling_config.max_new_tokens` (the response width, so one compiled shape serves every turn)."""
    config = sampling_config.replace(group_size=1)

    def generate(prompt_ids: list[list[int]], max_new_tokens: list[int], key: jax.Array,
                 rows: list[tuple[int, int]]) -> list[Generation]:
        out = sampler.generate(prompt_ids, config, key, max_new_tokens=[int(n) for n in max_new_tokens],
                               prompt_numbers=[p for p, _ in rows], sample_numbers=[s for _, s in rows])
        generations = []
        for row, length in enumerate(out.lengths.tolist()):
            generations.append(Generation(
                token_ids=out.response_ids[row, :length].astype(np.int32),
                logprobs=out.logprobs[row, :length].astype(np.float32),
                stopped=bool(out.stopped[row]),
                text=None if out.texts is None else out.texts[row]))
        return generations

    return generate
