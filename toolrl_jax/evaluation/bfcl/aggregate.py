"""BFCL v3 leaderboard aggregation (the late-v3 rules the ToolRL paper's numbers were computed with).

- Non-live: "simple" = unweighted mean of (simple, java, javascript); AST summary = unweighted mean of
  (simple, multiple, parallel, parallel_multiple); non-live overall additionally averages in irrelevance.
- Live: AST summary = item-weighted mean of the four live AST categories; live overall = item-weighted
  mean of those plus live_irrelevance and live_relevance.
- Multi-turn = unweighted mean of its four categories.
- Overall = unweighted mean of (non-live overall, live overall, multi-turn).
- Relevance = live_relevance; irrelevance = unweighted mean of (irrelevance, live_irrelevance).
A group is None (N/A) when any of its categories was not evaluated.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping


@dataclasses.dataclass(frozen=True)
class CategoryScore:
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


Score = tuple[float, int]  # (accuracy, item count)


def _get(scores: Mapping[str, CategoryScore], name: str) -> Score | None:
    score = scores.get(name)
    return None if score is None else (score.accuracy, score.total)


def _unweighted(parts: list[Score | None]) -> Score | None:
    if any(part is None for part in parts):
        return None
    return sum(acc for acc, _ in parts) / len(parts), sum(n for _, n in parts)


def _weighted(parts: list[Score | None]) -> Score | None:
    if any(part is None for part in parts):
        return None
    total = sum(n for _, n in parts)
    return (sum(acc * n for acc, n in parts) / total if total else 0.0), total


def summarize(scores: Mapping[str, CategoryScore]) -> dict[str, float | None]:
    """Leaderboard groups (accuracies in [0, 1], None where a category is missing)."""
    get = lambda name: _get(scores, name)  # noqa: E731
    simple = _unweighted([get("simple"), get("java"), get("javascript")])
    non_live_ast = _unweighted([simple, get("multiple"), get("parallel"), get("parallel_multiple")])
    non_live = _unweighted([simple, get("multiple"), get("parallel"), get("parallel_multiple"), get("irrelevance")])
    live_ast_parts = [get("live_simple"), get("live_multiple"), get("live_parallel"), get("live_parallel_multiple")]
    live_ast = _weighted(live_ast_parts)
    live = _weighted(live_ast_parts + [get("live_irrelevance"), get("live_relevance")])
    multi_turn = _unweighted([get("multi_turn_base"), get("multi_turn_miss_func"), get("multi_turn_miss_param"),
                              get("multi_turn_long_context")])
    overall = _unweighted([non_live, live, multi_turn])
    irrelevance = _unweighted([get("irrelevance"), get("live_irrelevance")])
    relevance = get("live_relevance")
    groups = {
        "overall": overall, "non_live": non_live, "non_live_ast": non_live_ast, "non_live_simple": simple,
        "live": live, "live_ast": live_ast, "multi_turn": multi_turn,
        "relevance": relevance, "irrelevance": irrelevance,
    }
    return {name: None if value is None else value[0] for name, value in groups.items()}
