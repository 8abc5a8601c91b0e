"""Multi-turn evaluation through the training environments: greedy trajectories, tools executed, final states
checked, with the very code GRPO's multi-turn rollouts use (`training.multiturn.rollout_trajectories`).

Two benchmarks (`experiments.evaluate --benchmarks=env_synthetic,env_bfcl`):

* env_synthetic: the synthetic environment's held-out tasks (`environments.make_tasks("heldout", ...)`: disjoint
  names and values from training, plus task kinds never trained on), or a task file;
* env_bfcl: BFCL v3's multi-turn entries (question + possible_answer ground truth) run in `BfclEnvironment`, scored
  by the official per-turn state and result checks (the evaluator's `check_turn`). This is the benchmark itself, so
  its contamination guard is off here; the evaluator's own BFCL path (`--benchmarks=bfcl`) stays the reference
  for the paper's numbers (its prompt and turn protocol follow BFCL's inference loop).

Per item: success, reward, turns, tool calls and errors, finish reason, the checks' details and the conversation;
summary: success rate and means, by task kind where tasks have one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

from toolrl_jax.multiturn import MultiTurnConfig, trajectory_metrics
from toolrl_jax.sampling.config import SamplingConfig

logger = logging.getLogger(__name__)

ENV_BENCHMARKS = {"env_synthetic": "synthetic", "env_bfcl": "bfcl"}


@dataclasses.dataclass(frozen=True)
class EnvEvalConfig:
    """tasks: a task file (JSONL) for env_synthetic (None: `count` generated held-out tasks, seed 0);
    bfcl_dir / categories: where env_bfcl reads BFCL v3's multi-turn entries; limit: first N tasks (per category);
    max_turns / turn_tokens / total_tokens: the trajectory limits (assistant turns, new tokens per turn, model and
    tool tokens after the prompt); prompt_style: the synthetic environment's."""

    tasks: Optional[str] = None
    count: int = 64
    bfcl_dir: Optional[str] = None
    categories: tuple[str, ...] = ("multi_turn_base",)
    limit: Optional[int] = None
    max_turns: int = 8
    turn_tokens: int = 256
    total_tokens: int = 2048
    prompt_style: str = "compact"

    def __post_init__(self) -> None:
        for name in ("count", "max_turns", "turn_tokens", "total_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"EnvEvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.turn_tokens > self.total_tokens:
            raise ValueError(f"EnvEvalConfig.turn_tokens ({self.turn_tokens}) exceeds total_tokens "
                             f"({self.total_tokens})")


def load_env_tasks(benchmark: str, config: EnvEvalConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(tasks, environment keyword arguments) of an env_* benchmark."""
    if benchmark == "env_synthetic":
        from toolrl_jax.environments import make_tasks, read_tasks

        tasks = read_tasks(config.tasks) if config.tasks else make_tasks("heldout", config.count, seed=0)
        return tasks[:config.limit] if config.limit else tasks, {"prompt_style": config.prompt_style}
    if benchmark == "env_bfcl":
        from toolrl_jax.evaluation.bfcl import categories, data

        if not config.bfcl_dir:
            raise ValueError("env_bfcl needs the BFCL v3 folder (bfcl_dir)")
        tasks = []
        for category in config.categories:
            entries = data.read_jsonl(Path(config.bfcl_dir) / categories.file_name(category))
            answers = {a["id"]: a for a in data.read_jsonl(Path(config.bfcl_dir) / "possible_answer" /
                                                          categories.file_name(category))}
            entries = entries[:config.limit] if config.limit else entries
            unsupported = [e["id"] for e in entries if e.get("missed_function")]
            if unsupported:
                logger.warning("env_bfcl: %d %s entries announce functions mid-way (missed_function), which the "
                               "environment does not support; they are left out", len(unsupported), category)
            tasks += [{**e, "ground_truth": answers[e["id"]]["ground_truth"], "category": category,
                       "long_context": "long_context" in category} for e in entries if not e.get("missed_function")]
        return tasks, {"bfcl_dir": config.bfcl_dir, "allow_contamination": True}
    raise ValueError(f"unknown environment benchmark {benchmark!r}; expected one of {sorted(ENV_BENCHMARKS)}")


def evaluate_environment(sampler: Any, tokenizer: Any, benchmark: str, config: EnvEvalConfig,
                         out_dir: str | Path) -> dict[str, Any]:
    """Greedy trajectories of the benchmark's tasks; writes items/<benchmark>.jsonl and returns the summary."""
    from toolrl_jax.training.multiturn import rollout_trajectories

    tasks, env_kwargs = load_env_tasks(benchmark, config)
    if not tasks:
        raise ValueError(f"{benchmark}: no tasks to evaluate")
    rollout = MultiTurnConfig(max_turns=config.max_turns, max_total_tokens=config.total_tokens,
                              max_new_tokens_per_turn=config.turn_tokens)
    sampling = SamplingConfig(max_new_tokens=config.turn_tokens, temperature=0.0)
    trajectories = rollout_trajectories(sampler, tokenizer, ENV_BENCHMARKS[benchmark], tasks, 1, sampling, rollout,
                                        0, env_kwargs)
    records = [_record(task, t) for task, t in zip(tasks, trajectories)]
    items = Path(out_dir) / "items" / f"{benchmark}.jsonl"
    items.parent.mkdir(parents=True, exist_ok=True)
    items.write_text("".join(json.dumps(r, default=str) + "\n" for r in records))
    metrics = trajectory_metrics(trajectories)
    summary = {"count": len(records), "success_rate": metrics["multiturn/success_rate"],
               "reward": metrics["multiturn/reward"], "turns": metrics["multiturn/turns_per_trajectory"],
               "tool_calls_per_turn": metrics["multiturn/tool_calls_per_turn"],
               "tool_errors_per_turn": metrics["multiturn/tool_errors_per_turn"],
               "by_kind": _by_kind(records)}
    logger.info("%s: success %.3f over %d tasks", benchmark, summary["success_rate"], len(records))
    return summary


def _record(task: dict[str, Any], trajectory: Any) -> dict[str, Any]:
    return {"id": task.get("id"), "kind": task.get("kind") or task.get("category"),
            "seen_kind": task.get("seen_kind"), "success": bool(trajectory.success),
            "reward": float(trajectory.reward), "turns": trajectory.num_turns,
            "tool_calls": sum(len(turn.calls) for turn in trajectory.turns),
            "tool_errors": sum(turn.num_errors for turn in trajectory.turns),
            "finish_reason": trajectory.finish_reason, "final_answer": trajectory.final_answer,
            "details": trajectory.outcome.details, "messages": list(trajectory.messages)}


def _by_kind(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if record["kind"] is not None:
            kinds.setdefault(str(record["kind"]), []).append(record)
    return {kind: {"count": len(rs), "success_rate": sum(r["success"] for r in rs) / len(rs)}
            for kind, rs in sorted(kinds.items())}
