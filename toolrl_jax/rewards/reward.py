"""The ToolRL reward of one response: format + correctness (+ length), exactly as the original computes it.

Each component reads the `ParsedResponse` / `ParsedGroundTruth` built once per sample. Pure functions of
(parsed response, parsed ground truth, StepScales, RewardConfig); `score_response` ties them together.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

from toolrl_jax.rewards.config import RewardConfig, StepScales
from toolrl_jax.rewards.parsing import (
    COUNTED_TAGS,
    ParsedGroundTruth,
    ParsedResponse,
    parse_ground_truth,
    parse_response,
)
from toolrl_jax.rewards.similarity import (
    call_lists_equal,
    calls_equal,
    exact_list_similarity,
    max_weight_assignment,
    multiset_jaccard,
    values_equal,
)

# Format pattern and the indices (into parsing.COUNTED_TAGS) of the tags that must occur exactly once,
# keyed by (GT has <tool_call>, GT has <response>).
_FORMAT_RULES: dict[tuple[bool, bool], tuple[re.Pattern[str], tuple[int, ...]]] = {
    (False, True): (re.compile(r"^<think>.*?</think>\n<response>.*?</response>$", re.DOTALL), (2, 3)),
    (True, False): (re.compile(r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>$", re.DOTALL), (0, 1)),
    (True, True): (
        re.compile(r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>\n<response>.*?</response>$", re.DOTALL),
        (0, 1, 2, 3),
    ),
    (False, False): (re.compile(r"^<think>.*?</think>$", re.DOTALL), ()),
}
_THINK_BLOCK_FIRST = re.compile(r"<think>.*?</think>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class RewardComponents:
    """One response's reward. accuracy (for logging): 1.0 when the call list equals the GT's, order included
    (tolerantly under value_match="tolerant"); for a GT without tool calls, when the response has no <tool_call>."""

    total: float
    format: float
    correctness: float
    length: float
    accuracy: float


def required_once_tags(gt: ParsedGroundTruth) -> tuple[str, ...]:
    """The tags that the format rule picked by `gt` requires to occur exactly once in the response."""
    return tuple(COUNTED_TAGS[i] for i in _FORMAT_RULES[(gt.has_tool_call, gt.has_response)][1])


def format_ok(resp: ParsedResponse, gt: ParsedGroundTruth) -> bool:
    """The original's binary format rule: the GT picks the pattern; the response must `re.search` it (DOTALL)
    and contain each counted tag exactly once."""
    pattern, counted = _FORMAT_RULES[(gt.has_tool_call, gt.has_response)]
    # Counts first: the same boolean as the original's regex-then-counts, without scanning texts that fail anyway.
    return all(resp.tag_counts[i] == 1 for i in counted) and pattern.search(resp.text) is not None


def partial_format_fraction(resp: ParsedResponse, gt: ParsedGroundTruth) -> float:
    """Fraction of format checks passed: the text opens with a <think>...</think> block, each counted tag occurs
    exactly once, the full pattern matches. 1.0 exactly when `format_ok`."""
    if format_ok(resp, gt):
        return 1.0
    _, counted = _FORMAT_RULES[(gt.has_tool_call, gt.has_response)]
    passed = int(_THINK_BLOCK_FIRST.match(resp.text) is not None)
    passed += sum(resp.tag_counts[i] == 1 for i in counted)
    return passed / (2 + len(counted))


def format_reward(resp: ParsedResponse, gt: ParsedGroundTruth, scales: StepScales, config: RewardConfig) -> float:
    """format_max if `format_ok` else format_min; with `partial_format`, min + (max - min) * fraction of checks."""
    if not config.partial_format:
        return scales.format_max if format_ok(resp, gt) else scales.format_min
    fraction = partial_format_fraction(resp, gt)
    if fraction == 1.0:
        return scales.format_max
    return scales.format_min + (scales.format_max - scales.format_min) * fraction


def length_reward(resp: ParsedResponse, scales: StepScales) -> float:
    """min(1, round(think_words / L, 2)) scaled into [length_min, length_max]; length_min if a think tag is missing."""
    if resp.think_words is None:
        return scales.length_min
    fraction = round(resp.think_words / scales.length_target, 2)
    if fraction > 1.0:
        fraction = 1.0
    return fraction * (scales.length_max - scales.length_min) + scales.length_min


def _call_score(gt_call: dict[str, Any], pred_call: Any, config: RewardConfig) -> float:
    """s(g, p) for a same-name pair: key similarity + number of GT keys whose values match (Intermediate: 1/0 for
    whole-call identity). Raises like the original on a predicted call whose parameters are missing/not a dict."""
    tolerant = config.value_match == "tolerant"
    if config.per_call_exact:
        return 1.0 if calls_equal(gt_call, pred_call, tolerant) else 0.0
    gt_params = gt_call["parameters"]
    pred_params = pred_call["parameters"]
    similarity = exact_list_similarity if config.exact_similarity else multiset_jaccard
    key_score = similarity(list(gt_params.keys()), list(pred_params.keys()))
    value_score = sum(
        1.0 for k, v in gt_params.items() if k in pred_params and values_equal(pred_params[k], v, tolerant)
    )
    return key_score + value_score


def _greedy_match_scores(gt_calls: list[dict[str, Any]], pred_calls: list[Any], config: RewardConfig) -> list[float]:
    """Per GT call, in GT order: the best unused same-name predicted call (first on ties, only if s > 0)."""
    used: set[int] = set()
    scores = []
    for gt_call in gt_calls:
        best_score, best_index = 0.0, -1
        for i, pred_call in enumerate(pred_calls):
            if i in used or pred_call["name"] != gt_call["name"]:
                continue
            s = _call_score(gt_call, pred_call, config)
            if config.per_call_exact and s == 1.0:  # the original stops at the first identical call
                best_score, best_index = s, i
                break
            if s > best_score:
                best_score, best_index = s, i
        if best_index >= 0:
            used.add(best_index)
            scores.append(best_score)
        else:
            scores.append(0.0)
    return scores


def _optimal_match_scores(gt_calls: list[dict[str, Any]], pred_calls: list[Any], config: RewardConfig) -> list[float]:
    """Per GT call: its s under a one-to-one assignment maximising the total s (Hungarian), same-name pairs only."""
    weights = [
        [_call_score(g, p, config) if p["name"] == g["name"] else 0.0 for p in pred_calls] for g in gt_calls
    ]
    assignment = max_weight_assignment(weights)
    return [weights[r][c] if c >= 0 else 0.0 for r, c in enumerate(assignment)]


def _tool_call_correctness(
    gt_calls: list[dict[str, Any]], pred_calls: list[Any], scales: StepScales, config: RewardConfig
) -> tuple[float, bool]:
    """(correctness, exact list match) for parsed call lists; may raise on malformed predicted calls."""
    c_max, c_min = scales.correctness_max, scales.correctness_min
    if call_lists_equal(gt_calls, pred_calls, config.value_match == "tolerant"):
        return c_max, True
    if config.binary_correctness:
        return c_min, False
    gt_names = [call["name"] for call in gt_calls]
    pred_names = [call["name"] for call in pred_calls]
    similarity = exact_list_similarity if config.exact_similarity else multiset_jaccard
    score = similarity(gt_names, pred_names)
    max_score = 1.0
    for gt_call in gt_calls:
        max_score += 1.0 if config.per_call_exact else 1.0 + len(gt_call["parameters"])
    matcher = _optimal_match_scores if config.matching == "optimal" else _greedy_match_scores
    for s in matcher(gt_calls, pred_calls, config):
        if s > 0:
            score += s
    return (c_max - c_min) * score / max_score + c_min, False


def correctness_reward(
    resp: ParsedResponse, gt: ParsedGroundTruth, scales: StepScales, config: RewardConfig
) -> tuple[float, bool]:
    """(correctness, exact match). 0 for a GT without tool calls; correctness_min when the response's calls are
    missing, not JSON, or not call-shaped (the original's try/except around the whole computation)."""
    if gt.calls is None:
        return 0.0, resp.tag_counts[0] == 0
    if resp.calls is None:
        return scales.correctness_min, False
    try:
        return _tool_call_correctness(gt.calls, resp.calls, scales, config)
    except Exception:  # malformed predicted calls: TypeError/KeyError/AttributeError/RecursionError, as original
        return scales.correctness_min, False


def score_parsed(
    resp: ParsedResponse, gt: ParsedGroundTruth, scales: StepScales, config: RewardConfig
) -> RewardComponents:
    """All components from parsed inputs; total = format + correctness (+ length), summed in the original's order."""
    fmt = format_reward(resp, gt, scales, config)
    correctness, exact = correctness_reward(resp, gt, scales, config)
    length = length_reward(resp, scales) if config.length else 0.0
    total = fmt + correctness + length
    return RewardComponents(total, fmt, correctness, length, 1.0 if exact else 0.0)


def score_response(response: str, ground_truth: str, step: int, config: RewardConfig | None = None) -> RewardComponents:
    """Reward of one response (the extracted assistant turn) against its ground truth at `step`."""
    config = config or RewardConfig()
    return score_parsed(parse_response(response), parse_ground_truth(ground_truth), config.scales(step), config)
