"""Summary statistics of a set of examples: sizes, tool-call counts, and token lengths under a tokenizer."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.rewards.parsing import GroundTruthError, parse_ground_truth

EncodeMessages = Callable[[list[dict[str, str]]], list[int]]


def _length_summary(lengths: Sequence[int]) -> dict[str, float]:
    if not lengths:
        return {}
    a = np.asarray(lengths)
    return {"min": int(a.min()), "mean": round(float(a.mean()), 2), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "p99": float(np.percentile(a, 99)), "max": int(a.max())}


def example_stats(examples: Sequence[ToolRLExample], encode: EncodeMessages | None = None,
                  encode_response: Callable[[str], list[int]] | None = None,
                  max_prompt_length: int | None = None) -> dict[str, Any]:
    """Row counts per source, calls per example, no-call / response counts, character lengths and, when encoders
    are given, token lengths of prompts (and of ground truths) plus how many prompts exceed max_prompt_length."""
    calls_hist: Counter[int] = Counter()
    invalid = with_response = 0
    for e in examples:
        try:  # the reward's own parser: "invalid" means the reward would reject this ground truth
            calls = parse_ground_truth(e.ground_truth).calls or []
        except GroundTruthError:
            invalid += 1
        else:
            calls_hist[len(calls)] += 1
        with_response += "<response>" in e.ground_truth
    stats: dict[str, Any] = {
        "rows": len(examples),
        "rows_per_source": dict(sorted(Counter(e.source for e in examples).items())),
        "tool_calls_per_example": {str(k): v for k, v in sorted(calls_hist.items())},
        "no_call_examples": calls_hist.get(0, 0),
        "examples_with_response": with_response,
        "invalid_ground_truths": invalid,
        "prompt_chars": _length_summary([sum(len(m["content"]) for m in e.prompt_messages) for e in examples]),
    }
    if encode is not None:
        lengths = [len(encode(e.prompt_messages)) for e in examples]
        stats["prompt_tokens"] = _length_summary(lengths)
        if max_prompt_length is not None:
            stats["max_prompt_length"] = max_prompt_length
            stats["prompts_truncated"] = sum(n > max_prompt_length for n in lengths)
    if encode_response is not None:
        stats["ground_truth_tokens"] = _length_summary([len(encode_response(e.ground_truth)) for e in examples])
    return stats
