"""Multi-turn GRPO: the rollout and score stages when the policy calls tools that run in an environment.

A training example of an environment task carries the task (a JSON dict) as its ground truth. The rollout stage
resets one environment per (task, sample), runs the trajectories through the Sampler (`multiturn.run_trajectories`,
turns in lockstep, tools on the host) and lays them out as ordinary rollout rows: the prompt, then the response
window holding the model's tokens and the tool results' tokens interleaved. The response's real tokens are all
attended to (`SampleOutput.response_attention`), but only the model's tokens are trained: they form the loss mask,
and every log-prob, KL and advantage term of the step is masked by it, so a tool-result token never receives
gradient. With one turn and no tools this is exactly the single-turn step.

Rewards (`score_trajectories`): the environment's verdict on the final state / answer, weighted by
`env_reward_weight`, plus, where the task has reference turns, the ToolRL reward of each model turn against the
reference turn at the same position (averaged over the reference turns; a missing turn scores as an empty one),
weighted by `turn_reward_weight`. Per-turn advantages (`turn_advantages`) are documented at `turn_advantages`.
Peers: veRL's multi-turn rollout (loss mask over assistant tokens, tool responses masked), TRL's GRPO with tools.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Optional, Sequence

import numpy as np

from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.environments import make_environment
from toolrl_jax.environments.synthetic import ground_truth_calls, reference_turns
from toolrl_jax.multiturn import (
    GenerateFn,
    IncrementalChat,
    MultiTurnConfig,
    Trajectory,
    follow_up_messages,
    run_trajectories,
    sampler_generate,
)
from toolrl_jax.rewards.functions import RewardResult
from toolrl_jax.sampling.config import SamplingConfig, prompt_length_bucket
from toolrl_jax.sampling.sampler import SampleOutput

# Environments whose tasks carry reference turns: name -> (reference turn texts, reference calls per turn).
REFERENCES: dict[str, tuple[Callable, Callable]] = {"synthetic": (reference_turns, ground_truth_calls)}


class TaskError(ValueError):
    """A ground truth that is not an environment task (a JSON object)."""


def tasks_of(ground_truths: Sequence[str]) -> list[dict[str, Any]]:
    """The tasks that environment examples carry as their ground truths."""
    tasks = []
    for i, truth in enumerate(ground_truths):
        try:
            task = json.loads(truth)
        except (TypeError, json.JSONDecodeError) as e:
            raise TaskError(f"example {i}: its ground truth is not an environment task (JSON object): {e}") from None
        if not isinstance(task, dict):
            raise TaskError(f"example {i}: its ground truth is a JSON {type(task).__name__}, not a task object")
        tasks.append(task)
    return tasks


def task_examples(tasks: Sequence[dict], environment: str, split: str,
                  env_kwargs: Optional[dict] = None) -> list[ToolRLExample]:
    """Training / validation examples of environment tasks: the prompt is the environment's opening messages (what
    batching sorts and truncates by), the ground truth the task itself (JSON), which the rollout resets from."""
    env = make_environment(environment, **(env_kwargs or {}))
    try:
        return [ToolRLExample(prompt_messages=list(env.reset(task).messages), ground_truth=json.dumps(task),
                              index=i, source=f"env:{environment}", split=split) for i, task in enumerate(tasks)]
    finally:
        env.close()


def environment_kwargs(environment: str, prompt_style: str) -> dict[str, Any]:
    """What `make_environment` needs besides the name: the synthetic environment's prompt style."""
    return {"prompt_style": prompt_style} if environment == "synthetic" else {}


def opening_prompt_lengths(examples: Sequence[ToolRLExample], environment: str, tokenizer: Any,
                           env_kwargs: Optional[dict] = None) -> list[int]:
    """The token count of each environment example's opening prompt, rendered as a rollout renders it (the
    environment's reset messages, with its tool specs for Hermes-style prompts)."""
    env = make_environment(environment, **(env_kwargs or {}))
    try:
        lengths = []
        for example in examples:
            reset = env.reset(tasks_of([example.ground_truth])[0])
            chat = IncrementalChat(tokenizer, tuple(reset.tools) if reset.call_format == "hermes" and reset.tools
                                   else None)
            lengths.append(len(chat.encode(chat.prompt_text(reset.messages))))
        return lengths
    finally:
        env.close()


def check_opening_prompts(examples: Sequence[ToolRLExample], environment: str, tokenizer: Any, max_prompt_length: int,
                          what: str, env_kwargs: Optional[dict] = None) -> None:
    """Refuses, before any training, tasks whose opening prompt is longer than max_prompt_length (a multi-turn prompt
    is never cut: cutting would drop the system prompt or the request); the error names the first such tasks."""
    lengths = opening_prompt_lengths(examples, environment, tokenizer, env_kwargs)
    long = [(example, n) for example, n in zip(examples, lengths) if n > max_prompt_length]
    if long:
        names = ", ".join(f"{tasks_of([e.ground_truth])[0].get('id', e.index)!r} ({n} tokens)" for e, n in long[:5])
        raise TaskError(f"{len(long)} of {len(examples)} {what} tasks have an opening prompt longer than "
                        f"max_prompt_length={max_prompt_length}: {names}; the longest has {max(lengths)} tokens. Raise "
                        "--max_prompt_length (and its prompt bucket) or shorten those tasks")


def reference_examples(tasks: Sequence[dict], environment: str, env_kwargs: Optional[dict] = None
                       ) -> list[ToolRLExample]:
    """Supervised warm-up examples from the tasks' reference trajectories: for each reference turn, the
    conversation before it (the opening messages, the earlier reference turns and the results of their calls, run in
    a fresh environment) as the prompt and the turn as the target. Tasks without reference calls give none."""
    examples = []
    if environment not in REFERENCES:
        return examples
    turns_of, calls_of = REFERENCES[environment]
    for task in tasks:
        if not task.get("ground_truth"):
            continue
        env = make_environment(environment, **(env_kwargs or {}))
        try:
            reset = env.reset(task)
            messages = list(reset.messages)
            turns = turns_of(task, reset.call_format)
            calls = calls_of(task)
            for k, turn in enumerate(turns):
                examples.append(ToolRLExample(prompt_messages=[dict(m) for m in messages], ground_truth=turn,
                                              index=len(examples), source=f"env:{environment}:reference"))
                if k < len(calls):
                    step = env.step(calls[k])
                    messages += [{"role": "assistant", "content": turn},
                                 *follow_up_messages(step.results, reset.call_format)]
        finally:
            env.close()
    return examples


def rollout_trajectories(sampler: Any, tokenizer: Any, environment: str, tasks: Sequence[dict], group_size: int,
                         sampling: SamplingConfig, config: MultiTurnConfig, key: Any,
                         env_kwargs: Optional[dict] = None, generate: Optional[GenerateFn] = None
                         ) -> list[Trajectory]:
    """group_size trajectories per task (prompt-major, one fresh environment each), through `generate` (default:
    `Sampler.generate` on each turn's whole conversation; a `sampling.sessions.SessionGenerator` keeps the KV caches
    between turns); trajectory (task i, sample s) is keyed as row (i, s) of a grouped `Sampler.generate`, so a
    rollout that ends after one turn samples exactly what the single-turn rollout does."""
    examples = [task for task in tasks for _ in range(group_size)]
    rows = [(i, s) for i in range(len(tasks)) for s in range(group_size)]
    envs = [make_environment(environment, **(env_kwargs or {})) for _ in examples]
    try:
        generate = generate or sampler_generate(sampler, sampling)
        return run_trajectories(generate, tokenizer, envs, examples, config, key, rows)
    finally:
        for env in envs:
            env.close()


def trajectory_samples(trajectories: Sequence[Trajectory], group_size: int, pad_id: int, response_width: int,
                       sampling: SamplingConfig, tokenizer: Any = None) -> SampleOutput:
    """The trajectories as rollout rows: prompts left-padded to their bucket, responses (model and tool tokens) in
    `response_width` columns; response_mask is the loss mask (model tokens), response_attention every real token;
    stopped = ended by an answer (not by a budget or turn limit); texts: the whole response, tool results included."""
    n = len(trajectories)
    width = prompt_length_bucket(max(len(t.prompt_ids) for t in trajectories), sampling)
    prompt_ids = np.full((n, width), pad_id, np.int32)
    prompt_mask = np.zeros((n, width), np.int32)
    response_ids = np.full((n, response_width), pad_id, np.int32)
    loss_mask = np.zeros((n, response_width), np.int32)
    attention = np.zeros((n, response_width), np.int32)
    logprobs = np.zeros((n, response_width), np.float32)
    for i, t in enumerate(trajectories):
        p, r = len(t.prompt_ids), len(t.response_ids)
        if r > response_width:
            raise ValueError(f"trajectory {i} has {r} response tokens, more than the {response_width} columns")
        prompt_ids[i, width - p:], prompt_mask[i, width - p:] = t.prompt_ids, 1
        response_ids[i, :r], loss_mask[i, :r], attention[i, :r], logprobs[i, :r] = (
            t.response_ids, t.loss_mask, 1, t.logprobs)
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(t.response_ids.tolist(), skip_special_tokens=False) for t in trajectories]
    return SampleOutput(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids,
                        response_mask=loss_mask, logprobs=logprobs, lengths=attention.sum(1).astype(np.int32),
                        stopped=np.array([t.finish_reason == "answer" for t in trajectories]), group_size=group_size,
                        texts=texts, response_attention=attention)


def turn_scores(trajectories: Sequence[Trajectory], tasks: Sequence[dict], group_size: int, environment: str,
                score: Callable[[list[str], list[str]], np.ndarray]) -> list[np.ndarray]:
    """Per trajectory, the ToolRL reward of each reference turn's position ([K] for K reference turns; [] for a task
    or an environment without them): `score(responses, truths)` of the model's turn there ("" when it stopped
    earlier)."""
    pairs, owners = [], []
    turns_of = REFERENCES[environment][0] if environment in REFERENCES else None
    for i, trajectory in enumerate(trajectories):
        task = tasks[i // group_size]
        truths = turns_of(task, trajectory.call_format) if turns_of and task.get("ground_truth") else []
        for k, truth in enumerate(truths):
            text = trajectory.turns[k].text.strip() if k < trajectory.num_turns else ""
            pairs.append((text, truth))
            owners.append((i, k))
    per_row = [np.zeros(0, np.float64) for _ in trajectories]
    if not pairs:
        return per_row
    values = np.asarray(score([p[0] for p in pairs], [p[1] for p in pairs]), np.float64)
    counts = [0] * len(trajectories)
    for i, _ in owners:
        counts[i] += 1
    per_row = [np.zeros(c, np.float64) for c in counts]
    for (i, k), value in zip(owners, values):
        per_row[i][k] = value
    return per_row


def score_trajectories(trajectories: Sequence[Trajectory], tasks: Sequence[dict], group_size: int, environment: str,
                       env_weight: float, turn_weight: float,
                       score: Optional[Callable[[list[str], list[str]], np.ndarray]]) -> tuple[RewardResult,
                                                                                               list[np.ndarray]]:
    """(rewards, per-turn scores): total = env_weight * environment reward + turn_weight * mean per-turn ToolRL
    reward (0 for a task without reference turns). Components: env/reward, env/success, turn/score, turns."""
    env = np.array([t.outcome.reward for t in trajectories], np.float64)
    success = np.array([t.outcome.success for t in trajectories], np.float64)
    turns = turn_scores(trajectories, tasks, group_size, environment, score) if turn_weight and score else \
        [np.zeros(0, np.float64) for _ in trajectories]
    turn_mean = np.array([s.mean() if s.size else 0.0 for s in turns], np.float64)
    total = env_weight * env + turn_weight * turn_mean
    components = {"env/reward": env, "env/success": success, "turn/score": turn_mean,
                  "turns": np.array([t.num_turns for t in trajectories], np.float64)}
    result = RewardResult(total=total, components=components, outputs={},
                          weights={"env": float(env_weight), "turn": float(turn_weight)})
    return result, turns


def turn_index(trajectories: Sequence[Trajectory], response_width: int) -> np.ndarray:
    """[N, R] the assistant turn each response token belongs to (model tokens only; -1 elsewhere)."""
    out = np.full((len(trajectories), response_width), -1, np.int32)
    for i, t in enumerate(trajectories):
        mask = t.loss_mask.astype(bool)
        # A model turn starts where the mask goes 0 -> 1 (or at the first token).
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        turn = np.cumsum(np.isin(np.arange(mask.size), starts)) - 1
        out[i, :mask.size] = np.where(mask, turn, -1)
    return out


def turn_returns(trajectories: Sequence[Trajectory], turn_rewards: Sequence[np.ndarray], env_weight: float,
                 turn_weight: float, num_turns: int) -> np.ndarray:
    """[N, num_turns] each turn position's reward-to-go G_k = env_weight * env reward + turn_weight * (the turn
    rewards from reference position k on, summed) / K, K = the task's reference turns. Column 0 is the trajectory's
    total reward; a row without a turn k keeps its env term (and any turn rewards still ahead of it).

    Per-turn advantages (`GRPOConfig.turn_advantages`) run the step's estimator on each column and give the tokens
    of turn k column k's advantage. Bias, documented: (1) the group baseline at position k mixes rows that reached
    turn k with rows that had stopped, so when stopping early correlates with the outcome the baseline shifts with
    it (unlike a per-state value baseline); (2) each turn is credited only with the rewards that follow it, the point
    of reward-to-go, but a group normalised per position weighs positions unequally (the per-group std bias that
    Dr. GRPO removes). With turn_weight = 0 every column is the outcome and the advantages are GRPO's.
    """
    env = np.array([t.outcome.reward for t in trajectories], np.float64)
    returns = np.zeros((len(trajectories), num_turns), np.float64)
    for i, scores in enumerate(turn_rewards):
        to_go = np.zeros(num_turns)
        if scores.size:
            tail = np.cumsum(scores[::-1])[::-1]
            to_go[:min(num_turns, scores.size)] = tail[:num_turns]
        returns[i] = env_weight * env[i] + turn_weight * to_go / max(scores.size, 1)
    return returns
