"""DAPO dynamic sampling (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv
2503.14476, sec. 3.2; veRL recipe/dapo/dapo_ray_trainer.py, `algorithm.filter_groups`): a group whose
rewards are all equal has no advantage under a group baseline, so it only dilutes the batch. A step samples and
scores its P = prompts_per_step prompts; while fewer than P groups are informative it draws the next P prompts from
the same data cursor (the loop's `PromptDataset.next_batch`, through `refill`) and samples them too, at most
`dynamic_sampling_max_rounds` extra rounds. It trains on the first P informative groups in draw order.

Short of P after the last round (veRL raises there instead), uninformative groups fill the static batch shape: the
earliest drawn, in draw order, with their loss masked (`filler`), so they change neither the gradient nor the loss
normalisers; the step then trains on fewer groups. The prompts drawn by the extra rounds advance the data cursor, so
the position a checkpoint saves after the step includes them and a resumed run continues exactly (round r samples
with `jax.random.fold_in(key, r)`, round 0 with the step's key: with every group informative the step is the plain
one). The log-prob passes start after the last round (the plain step overlaps them with scoring).

Metrics: dynamic_sampling/rounds (rollout rounds, >= 1), kept_groups (informative groups trained on), filler_groups,
dropped_groups (drawn and not trained on), sampled_reward_mean (the mean total over every drawn response).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from toolrl_jax.rewards.functions import RewardResult
from toolrl_jax.sampling.sampler import SampleOutput
from toolrl_jax.training.reward_shaping import advantage_signal


def informative_groups(signal: np.ndarray, group_size: int) -> np.ndarray:
    """[num_groups] bool: whether any column of `signal` [K, N] (prompt-major) differs within the group (DAPO sec. 3.2:
    0 < #correct < G, for any reward)."""
    groups = np.asarray(signal).reshape(signal.shape[0], -1, group_size)
    return np.any(groups.max(-1) != groups.min(-1), axis=0)


def choose_groups(informative: np.ndarray, wanted: int) -> tuple[np.ndarray, np.ndarray]:
    """(chosen group indices [wanted] in draw order, filler [wanted] bool): the first `wanted` informative groups,
    topped up with the earliest uninformative ones when there are fewer."""
    kept = np.flatnonzero(informative)[:wanted]
    filler = np.flatnonzero(~informative)[:wanted - kept.size]
    chosen = np.sort(np.concatenate([kept, filler]))
    return chosen, ~informative[chosen]


def concatenate_samples(samples: Sequence[SampleOutput], pad_id: int) -> SampleOutput:
    """Rollouts of several rounds as one, prompts left-padded to the widest round's width."""
    width = max(s.prompt_ids.shape[1] for s in samples)

    def left_pad(x: np.ndarray, value: int) -> np.ndarray:
        return np.pad(x, ((0, 0), (width - x.shape[1], 0)), constant_values=value)

    def joined(name: str) -> Optional[np.ndarray]:
        values = [getattr(s, name) for s in samples]
        return None if values[0] is None else np.concatenate(values)

    texts = None if samples[0].texts is None else [t for s in samples for t in s.texts]
    return dataclasses.replace(
        samples[0], prompt_ids=np.concatenate([left_pad(s.prompt_ids, pad_id) for s in samples]),
        prompt_mask=np.concatenate([left_pad(s.prompt_mask, 0) for s in samples]), texts=texts,
        **{name: joined(name) for name in ("response_ids", "response_mask", "logprobs", "lengths", "stopped",
                                           "tempered_logprobs")})


def take_rows(samples: SampleOutput, rows: np.ndarray) -> SampleOutput:
    def pick(x: Any) -> Any:
        return None if x is None else x[rows]

    texts = None if samples.texts is None else [samples.texts[i] for i in rows]
    return dataclasses.replace(samples, texts=texts, **{
        f.name: pick(getattr(samples, f.name)) for f in dataclasses.fields(samples)
        if f.name not in ("group_size", "texts")})


@dataclasses.dataclass(frozen=True)
class DynamicBatch:
    """A step's trained groups: samples and rewards [P * G rows], groups [P] (index among every group drawn: round
    r's j-th prompt is r * P + j), filler [P] (uninformative, loss masked), metrics, and the time spent."""

    samples: SampleOutput
    rewards: RewardResult
    groups: np.ndarray
    filler: np.ndarray
    metrics: dict[str, float]
    seconds_generate: float
    seconds_score: float


def sample_informative_groups(learner: Any, prompt_ids: Sequence[Sequence[int]], ground_truths: Sequence[str],
                              key: jax.Array, step: int, refill: Optional[Callable[[], Any]]) -> DynamicBatch:
    """Rounds of sampling and scoring (module doc). learner: a GRPOTrainer; refill() -> the next batch of prompts
    (`.prompt_ids`, `.ground_truths`), None for no extra rounds."""
    c = learner.config
    n, wanted = c.group_size, c.prompts_per_step
    drawn, results, informative = [], [], []
    seconds = {"generate": 0.0, "score": 0.0}
    for r in range(1 + c.dynamic_sampling_max_rounds):
        if r and (refill is None or sum(int(i.sum()) for i in informative) >= wanted):
            break
        if r:
            batch = refill()
            prompt_ids, ground_truths = batch.prompt_ids, batch.ground_truths
        t0 = time.perf_counter()
        samples = learner.sampler.generate(prompt_ids, learner.sampling_config(), jax.random.fold_in(key, r) if r
                                           else key)
        t1 = time.perf_counter()
        rewards = learner.score_rollout(samples, ground_truths, step)
        seconds["generate"] += t1 - t0
        seconds["score"] += time.perf_counter() - t1
        drawn.append(samples)
        results.append(rewards)
        informative.append(informative_groups(advantage_signal(rewards, learner.reward, c), n))
    chosen, filler = choose_groups(np.concatenate(informative), wanted)
    rows = (chosen[:, None] * n + np.arange(n)).reshape(-1)
    everything = RewardResult.concatenate(results)
    metrics = {"dynamic_sampling/rounds": float(len(drawn)), "dynamic_sampling/kept_groups": float((~filler).sum()),
               "dynamic_sampling/filler_groups": float(filler.sum()),
               "dynamic_sampling/dropped_groups": float(sum(i.size for i in informative) - chosen.size),
               "dynamic_sampling/sampled_reward_mean": float(np.mean(everything.total))}
    return DynamicBatch(take_rows(concatenate_samples(drawn, learner.sampler.pad_id), rows), everything.take(rows),
                        chosen, filler, metrics, seconds["generate"], seconds["score"])


@dataclasses.dataclass(frozen=True)
class TrainedGroups:
    """The prompts a dynamic-sampling step trained on, as the sample log reads a batch: indices [P] (dataset
    positions) and ground_truths."""

    indices: np.ndarray
    ground_truths: list[str]


def trained_groups(batches: Sequence[Any], groups: np.ndarray) -> TrainedGroups:
    """The trained groups' prompts from the batches drawn in order (`PromptBatch`es of P prompts each)."""
    size = len(batches[0].indices)
    picked = [(batches[g // size], g % size) for g in np.asarray(groups)]
    return TrainedGroups(np.array([b.indices[j] for b, j in picked]), [b.ground_truths[j] for b, j in picked])
