"""The rollout stage: sample a group of responses per prompt, join prompts and responses into training rows, and
start the old-policy and reference log-prob passes without waiting for them (the host scores rewards meanwhile).

    rollout = generate_rollout(learner, prompt_ids, key)      # sample + join + dispatch
    ...                                                       # score rewards on the host
    logprobs = rollout.logprobs()                             # wait for the passes: old, entropy, ref [N, R]
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from toolrl_jax.sampling.sampler import SampleOutput
from toolrl_jax.training.layout import RowLayout
from toolrl_jax.training.sequences import join_prompt_and_response

Pending = list[tuple[np.ndarray, Any]]


def dispatch_logprobs(logprob_fn: Callable, params: Any, rows: dict[str, np.ndarray], micro_rows: int,
                      place: Callable[[dict], dict] = lambda b: b,
                      layout: Optional[RowLayout] = None) -> Pending:
    """Starts the teacher-forced log-prob pass of every row, micro_rows at a time, without waiting for any result:
    returns [(row indices, (logp, entropy) device arrays)] for `collect_logprobs`. With a `layout`, rows are taken in
    its order and each chunk is cut to its widths (no layout: row order, full width)."""
    if layout is None:
        n = rows["response_ids"].shape[0]
        chunks = [(np.arange(s, min(s + micro_rows, n)), {k: v[s:s + micro_rows] for k, v in rows.items()})
                  for s in range(0, n, micro_rows)]
    else:
        chunks = layout.chunks(rows, micro_rows)
    return [(index, logprob_fn(params, place(chunk))) for index, chunk in chunks]


def collect_logprobs(pending: Pending, shape: tuple[int, int],
                     fetch: Callable[[Any], Any] = jax.device_get) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs and entropies [N, R] from `dispatch_logprobs`; columns past a chunk's trimmed width are 0 (they are
    response padding)."""
    logps, ents = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for index, (logp, ent) in pending:
        logp, ent = fetch((logp, ent))
        logps[index, :logp.shape[1]] = logp
        ents[index, :ent.shape[1]] = ent
    return logps, ents


def batched_logprobs(logprob_fn: Callable, params: Any, rows: dict[str, np.ndarray], micro_rows: int,
                     place: Callable[[dict], dict] = lambda b: b,
                     layout: Optional[RowLayout] = None) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced log-probs and entropies [N, R] of every row, micro_rows at a time (bounded activation memory);
    every chunk is dispatched before any result is fetched. Arguments as `dispatch_logprobs`."""
    return collect_logprobs(dispatch_logprobs(logprob_fn, params, rows, micro_rows, place, layout),
                            rows["response_ids"].shape)


@dataclasses.dataclass(frozen=True)
class RolloutLogProbs:
    """Per-token log-probs of the sampled responses [N, R] float32, zero on response padding."""

    old: np.ndarray  # the policy that sampled (recomputed by the trainer, or the sampler's own)
    entropy: Optional[np.ndarray]  # the policy's entropy (None when the sampler's log-probs are used)
    ref: Optional[np.ndarray]  # the frozen reference policy (None when no KL term needs it)


@dataclasses.dataclass
class Rollout:
    """One step's samples and training rows, with the log-prob passes in flight."""

    samples: SampleOutput
    rows: dict[str, np.ndarray]
    pending_old: Optional[Pending]
    pending_ref: Optional[Pending]
    fetch: Callable[[Any], Any]
    seconds_generate: float
    seconds_dispatch: float
    trajectories: Optional[list] = None  # multi-turn: the `multiturn.Trajectory` of every row
    turn_rewards: Optional[list] = None  # multi-turn: each row's per-turn ToolRL rewards ([K] arrays)

    @property
    def mask(self) -> np.ndarray:
        """[N, R] the tokens the policy generated, which every log-prob, KL and advantage term counts: the response
        mask, or in multi-turn rows the loss mask (tool-result tokens are attended to but never trained)."""
        return self.rows.get("loss_mask", self.rows["response_mask"])

    def logprobs(self) -> RolloutLogProbs:
        """Waits for the passes (masked to the response tokens)."""
        mask = self.mask
        if self.pending_old is not None:
            old, entropy = collect_logprobs(self.pending_old, mask.shape, self.fetch)
        else:
            old, entropy = self.samples.logprobs.astype(np.float32), None
        ref = None
        if self.pending_ref is not None:
            ref = collect_logprobs(self.pending_ref, mask.shape, self.fetch)[0] * mask
        return RolloutLogProbs(old=(old * mask).astype(np.float32), entropy=entropy, ref=ref)


def generate_rollout(learner: Any, prompt_ids: Sequence[Sequence[int]], key: jax.Array) -> Rollout:
    """Samples `learner.config.group_size` responses per prompt and dispatches the old-policy (when recomputed) and
    reference (when a KL term needs it) log-prob passes over the joined rows. `learner`: a `GRPOTrainer`."""
    t0 = time.perf_counter()
    samples = learner.sampler.generate(prompt_ids, learner.sampling_config(), key)
    return start_rollout(learner, samples, time.perf_counter() - t0)


def start_rollout(learner: Any, samples: SampleOutput, seconds_generate: float) -> Rollout:
    """The rollout of responses already sampled: rows joined, log-prob passes dispatched (`generate_rollout`)."""
    c = learner.config
    t_generate = time.perf_counter()
    rows = join_prompt_and_response(samples.prompt_ids, samples.prompt_mask, samples.response_ids, samples.attended)
    if samples.response_attention is not None:  # multi-turn: train the model's tokens only
        rows["loss_mask"] = samples.response_mask.astype(np.float32)
    place, layout = learner.placement.place_rows, learner.layout
    pending_old = pending_ref = None
    if c.recompute_old_logprobs:
        pending_old = dispatch_logprobs(learner.logprob_fn, (learner.params, learner.frozen), rows,
                                        c.micro_batch_rows, place, layout)
    if learner.ref_params is not None:
        pending_ref = dispatch_logprobs(learner.logprob_fn, (learner.ref_params, learner.frozen), rows,
                                        c.micro_batch_rows, place, layout)
    return Rollout(samples=samples, rows=rows, pending_old=pending_old, pending_ref=pending_ref,
                   fetch=learner.placement.fetch, seconds_generate=seconds_generate,
                   seconds_dispatch=time.perf_counter() - t_generate)
