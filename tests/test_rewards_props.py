"""Property tests: parsing never raises on model output, and every reward stays within its declared range."""
from __future__ import annotations

import dataclasses
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolrl_jax.rewards import RewardConfig, extract_assistant_turn, parse_response, score_batch, score_response

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EPS = 1e-9  # (max - min) * score / S_max + min can exceed max by an ulp, as in the original

W = {"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}
T = {"name": "get_time", "parameters": {"tz": "CET"}}
GTS = [
    f"<think> t </think>\n<tool_call>\n{json.dumps(W)}\n{json.dumps(T)}\n</tool_call>",
    f"<think> t </think>\n<tool_call>\n{json.dumps(W)}\n</tool_call>\n<response> ok </response>",
    "<think> t </think>\n<response> ok </response>",
    "<think> t </think>",
]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
    | st.sampled_from(["Paris", "C", "CET", "1", "paris "]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10,
)
calls = st.fixed_dictionaries(
    {"name": st.sampled_from(["get_weather", "get_time", "other"]) | json_values},
    optional={"parameters": st.dictionaries(st.sampled_from(["city", "unit", "tz", "days"]), json_values, max_size=4)
              | json_values},
)
call_lines = st.lists(calls.map(json.dumps) | json_values.map(json.dumps) | st.text(max_size=20), max_size=4)
fragments = st.sampled_from(
    ["<think>", "</think>", "<tool_call>", "</tool_call>", "<response>", "</response>", "\n", " ", "x y",
     "{", "}", "[", "]", '"', json.dumps(W), json.dumps(T), "<|im_end|>", "<|im_start|>assistant", "\u00e9\u4e2d",
     "\U0001f600", "\x00", "\ud800"]
)
tag_soup = st.lists(fragments | st.text(max_size=6), max_size=30).map("".join)
structured = st.builds(
    lambda think, sep1, lines, sep2, tail: f"<think>{think}</think>{sep1}<tool_call>\n" + "\n".join(lines)
    + f"\n</tool_call>{sep2}{tail}",
    st.text(max_size=30), st.sampled_from(["\n", "", "\n\n"]), call_lines, st.sampled_from(["", "\n"]),
    st.sampled_from(["", "<response> r </response>", "\n<response> r </response>"]),
)
responses = st.text() | tag_soup | structured
configs = st.builds(
    lambda preset, **kw: RewardConfig.preset(preset, **kw),
    st.sampled_from(RewardConfig.PRESET_NAMES),
    matching=st.sampled_from(["greedy", "optimal"]),
    value_match=st.sampled_from(["strict", "tolerant"]),
    partial_format=st.booleans(),
    length=st.booleans(),
    two_stage=st.booleans(),
    scheduled_scale=st.booleans(),
)


@SETTINGS
@given(text=st.text() | tag_soup, family=st.sampled_from(["qwen", "llama", None]))
def test_parsing_never_raises(text, family):
    turn = extract_assistant_turn(text, family)
    parsed = parse_response(turn)
    assert len(parsed.tag_counts) == 4 and (parsed.calls is None) == (parsed.call_error is not None)


def test_parsing_survives_pathological_json():
    for line in ("[" * 100_000, '{"a":' * 50_000, "9" * 10_000, "NaN", '"\\ud800"', "-Infinity"):
        text = f"<think> t </think>\n<tool_call>\n{line}\n</tool_call>"
        parse_response(text)
        assert -3.0 <= score_response(text, GTS[0], 1).correctness < 3.0


@SETTINGS
@given(response=responses, gt=st.sampled_from(GTS), config=configs, step=st.integers(0, 300))
def test_rewards_within_declared_ranges(response, gt, config, step):
    r = score_response(response, gt, step, config)
    bounds = config.bounds(step)
    for name in ("format", "correctness", "length", "total"):
        lo, hi = bounds[name]
        assert lo - EPS <= getattr(r, name) <= hi + EPS, (name, getattr(r, name), bounds[name])
    assert r.accuracy in (0.0, 1.0)


@SETTINGS
@given(response=responses, gt=st.sampled_from(GTS[:2]), step=st.integers(0, 200))
def test_optimal_and_tolerant_never_score_below_greedy_strict(response, gt, step):
    base = RewardConfig()
    greedy = score_response(response, gt, step, base)
    optimal = score_response(response, gt, step, dataclasses.replace(base, matching="optimal"))
    tolerant = score_response(response, gt, step, dataclasses.replace(base, matching="optimal", value_match="tolerant"))
    assert optimal.correctness >= greedy.correctness - EPS
    assert tolerant.correctness >= optimal.correctness - EPS
    partial = score_response(response, gt, step, dataclasses.replace(base, partial_format=True))
    assert partial.format >= greedy.format and (partial.format == 1.0) == (greedy.format == 1.0)


@settings(max_examples=30, deadline=None)
@given(pairs=st.lists(st.tuples(responses, st.sampled_from(GTS)), max_size=12), step=st.integers(0, 200))
def test_batch_equals_per_sample(pairs, step):
    batch = score_batch([p[0] for p in pairs], [p[1] for p in pairs], step, chunk_size=5)
    for i, (response, gt) in enumerate(pairs):
        one = score_response(response, gt, step)
        assert (batch.total[i], batch.format[i], batch.correctness[i]) == (one.total, one.format, one.correctness)
