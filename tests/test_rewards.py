"""The ToolRL reward against the spec's worked examples, every variant across steps, and the Python semantics the
original relies on."""
from __future__ import annotations

import itertools
import json
import random

import numpy as np
import pytest

from toolrl_jax.rewards import (
    GroundTruthError,
    RewardConfig,
    RewardConfigError,
    extract_assistant_turn,
    parse_ground_truth,
    parse_response,
    score_batch,
    score_response,
)
from toolrl_jax.rewards.similarity import max_weight_assignment, multiset_jaccard, tolerant_equal

WEATHER = {"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}
TIME = {"name": "get_time", "parameters": {"tz": "CET"}}
THINK = "<think> The user wants the weather and the time. </think>"


def calls_turn(*calls, think=THINK, sep="\n", lines=None) -> str:
    body = "\n".join(lines if lines is not None else [json.dumps(c) for c in calls])
    return f"{think}\n<tool_call>{sep}{body}{sep}</tool_call>"


GT = calls_turn(WEATHER, TIME)  # S_max = 1 + (1 + 2) + (1 + 1) = 6
GT_RESPONSE_ONLY = "<think> I can answer. </think>\n<response> It is sunny. </response>"


def reward(response: str, gt: str = GT, step: int = 0, **kw) -> tuple[float, float, float, float]:
    config = RewardConfig.preset(kw.pop("preset", "original"), **kw)
    r = score_response(response, gt, step, config)
    return r.total, r.format, r.correctness, r.length


# ---------------------------------------------------------------- spec worked examples (default variant)

LYON = {"name": "get_weather", "parameters": {"city": "Lyon", "unit": "C"}}
EXTRA = {"name": "get_weather", "parameters": {"city": "Paris", "unit": "C", "days": 3}}
WORKED = [
    ("exact", calls_turn(WEATHER, TIME), 1, 3, 4.0),
    ("reversed", calls_turn(TIME, WEATHER), 1, 3.0, 4.0),
    ("lyon", calls_turn(LYON, TIME), 1, 2.0, 3.0),
    ("first only", calls_turn(WEATHER), 1, 0.5, 1.5),
    ("extra key", calls_turn(EXTRA, TIME), 1, 3 - 1 / 3, 4 - 1 / 3),
    ("no newlines", calls_turn(WEATHER, TIME, sep=""), 0, 3, 3.0),
    ("response only", "<think> hmm </think>\n<response> Paris is sunny. </response>", 0, -3, -3.0),
    ("invalid json", calls_turn(lines=['{"name": "get_weather", "parameters": {"city": "Paris"']), 1, -3, -2.0),
]


@pytest.mark.parametrize("name,response,fmt,corr,total", WORKED, ids=[w[0] for w in WORKED])
def test_spec_worked_examples(name, response, fmt, corr, total):
    t, f, c, length = reward(response)
    assert (f, length) == (fmt, 0.0)
    assert c == pytest.approx(corr, abs=1e-12) and t == pytest.approx(total, abs=1e-12)
    if name in ("exact", "no newlines", "response only", "invalid json"):
        assert (c, t) == (corr, total)  # exact floats where the value is a constant of the reward


def test_spec_coarse_and_finegrained_notes():
    reversed_calls = calls_turn(TIME, WEATHER)
    assert reward(reversed_calls, preset="coarse")[0] == -2.0
    assert reward(reversed_calls, preset="finegrained")[0] == 3.0  # names 0 (order differs), keys exact: 5/6
    assert reward(calls_turn(WEATHER, TIME), preset="coarse")[0] == 4.0


def test_response_only_ground_truth_rule():
    assert reward(GT_RESPONSE_ONLY, GT_RESPONSE_ONLY) == (1.0, 1.0, 0.0, 0.0)
    assert reward("<think> x </think>\n<response> anything else entirely </response>", GT_RESPONSE_ONLY)[0] == 1.0
    for bad in ("<response> no think </response>", calls_turn(WEATHER), "<think> x </think><response> y </response>",
                "<think> x </think>\n<response> a </response>\n<response> b </response>", "", "garbage"):
        assert reward(bad, GT_RESPONSE_ONLY) == (0.0, 0.0, 0.0, 0.0), bad


def test_both_blocks_and_think_only_ground_truths():
    gt_both = GT + "\n<response> Fetching both. </response>"
    assert reward(gt_both, gt_both)[:3] == (4.0, 1.0, 3.0)
    assert reward(GT, gt_both)[:3] == (3.0, 0.0, 3.0)  # calls right, response block missing
    gt_think = "<think> only thinking </think>"
    assert reward("<think> other thoughts </think>", gt_think)[:3] == (1.0, 1.0, 0.0)
    assert reward(GT, gt_think)[:3] == (0.0, 0.0, 0.0)


# ---------------------------------------------------------------- every variant at steps 0/1/29/30/75/105/150

STEPS = (0, 1, 29, 30, 75, 105, 150)
# Hand-computed (format_max, format_min, correctness_max, correctness_min) per step.
CONSTANT = {s: (1.0, 0.0, 3.0, -3.0) for s in STEPS}
SCALES = {
    "original": CONSTANT,
    "length": CONSTANT,
    "dynamic_length": CONSTANT,
    "finegrained": CONSTANT,
    "intermediate": CONSTANT,
    "coarse": CONSTANT,
    "equal_max": {s: (1.0, 0.0, 1.0, -1.0) for s in STEPS},
    "two_stage": {0: (1.0, 0.0, 1.0, -1.0), 1: (1.0, 0.0, 1.0, -1.0), 29: (1.0, 0.0, 1.0, -1.0),
                  30: (0.5, 0.0, 3.0, -3.0), 75: (0.5, 0.0, 3.0, -3.0), 105: (0.5, 0.0, 3.0, -3.0),
                  150: (0.5, 0.0, 3.0, -3.0)},
    # format max(1, 2 - s/150), min(-1, -2 + 2s/150); correctness min(3, 2 + s/150), max(-3, -2 - s/150).
    "dynamic_scale": {0: (2.0, -2.0, 2.0, -2.0),
                      1: (1.9933333333333333, -1.9866666666666666, 2.0066666666666667, -2.0066666666666667),
                      29: (1.8066666666666666, -1.6133333333333333, 2.1933333333333334, -2.1933333333333334),
                      30: (1.8, -1.6, 2.2, -2.2), 75: (1.5, -1.0, 2.5, -2.5), 105: (1.3, -1.0, 2.7, -2.7),
                      150: (1.0, -1.0, 3.0, -3.0)},
}
# Fraction of the correctness range, (score / S_max), per variant for three responses against GT.
FRACTIONS = {
    # first call only: names J = 1/2, g1 = 1 + 2 -> 3.5/6; reversed: 6/6.
    "original": {"first": 3.5 / 6, "reversed": 1.0},
    "finegrained": {"first": 3 / 6, "reversed": 5 / 6},  # exact-match names give 0, exact keys 1
    "intermediate": {"first": 1.5 / 3, "reversed": 3 / 3},  # S_max = 1 + 2 calls; identical calls score 1
    "coarse": {"first": 0.0, "reversed": 0.0},
}
# Think words / L with L = 384 + 256 * s / 105 (dynamic length), rounded to 2 decimals, for a 200-word think.
LENGTH_200 = {"length": {s: 0.39 for s in STEPS},
              "dynamic_length": {0: 0.52, 1: 0.52, 29: 0.44, 30: 0.44, 75: 0.35, 105: 0.31, 150: 0.27}}


@pytest.mark.parametrize("preset", sorted(SCALES))
@pytest.mark.parametrize("step", STEPS)
def test_variant_at_step(preset, step):
    f_max, f_min, c_max, c_min = SCALES[preset][step]
    scales = RewardConfig.preset(preset).scales(step)
    got = (scales.format_max, scales.format_min, scales.correctness_max, scales.correctness_min)
    assert got == pytest.approx((f_max, f_min, c_max, c_min), abs=1e-12)

    think = "<think> " + " ".join(["word"] * 200) + " </think>"
    length = LENGTH_200.get(preset, {}).get(step, 0.0)
    exact = calls_turn(WEATHER, TIME, think=think)
    t, f, c, ln = reward(exact, preset=preset, step=step)
    assert (f, c, ln) == (got[0], got[2], length) and t == f + c + ln
    # garbage: no think (length 0), no calls -> both minima
    assert reward("I refuse.", preset=preset, step=step) == (got[1] + got[3], got[1], got[3], 0.0)
    fractions = FRACTIONS.get(preset, FRACTIONS["original"])
    for name, body in (("first", calls_turn(WEATHER, think=think)),
                       ("reversed", calls_turn(TIME, WEATHER, think=think))):
        t, f, c, ln = reward(body, preset=preset, step=step)
        assert f == got[0] and ln == length
        assert c == pytest.approx((c_max - c_min) * fractions[name] + c_min, abs=1e-12), name
        assert c_min - 1e-12 <= c <= c_max + 1e-12  # (max - min) * 1 + min may exceed max by an ulp, as originally


def test_scales_match_the_original_float_expressions():
    """Bit-exact: the schedules evaluated in the original's operation order."""
    for step in range(0, 301):
        s = RewardConfig(two_stage=True, scheduled_scale=True, length_schedule=True).scales(step)
        f_max, f_min, c_max, c_min = (0.5, 0.0, 3.0, -3.0) if step >= 30 else (1.0, 0.0, 1.0, -1.0)
        f_max, f_min = max(2 - (2 - f_max) * step / 150, 1.0), min(-2 + (2 + f_min) * step / 150, -1.0)
        c_max, c_min = min((c_max - 2) * step / 150 + 2, 3.0), max((c_min + 2) * step / 150 - 2, -3.0)
        assert (s.format_max, s.format_min, s.correctness_max, s.correctness_min) == (f_max, f_min, c_max, c_min)
        assert s.length_target == (640 - 384) * step / 105 + 384


def test_length_schedule_alone_does_nothing_and_rounding_is_half_even():
    think = lambda n: ("<think> " + " ".join(["w"] * n) + " </think>\n<tool_call>\n" + json.dumps(WEATHER)
                       + "\n</tool_call>")
    assert reward(think(300), length_schedule=True)[3] == 0.0
    assert reward(think(64), preset="length")[3] == 0.12  # 64/512 = 0.125 -> 0.12 (half to even)
    assert reward(think(192), preset="length")[3] == 0.38  # 0.375 -> 0.38
    assert reward(think(2000), preset="length")[3] == 1.0
    assert reward("no think tags", preset="length")[3] == 0.0
    # words between the LAST <think> and the next </think>, whitespace-split (unicode whitespace included)
    assert parse_response("<think> a b </think><think> c\u3000d\te\n</think>").think_words == 3
    assert reward(think(256), preset="length", length_min=-1.0, length_max=3.0)[3] == 0.5 * 4.0 - 1.0


# ---------------------------------------------------------------- Python semantics the original relies on

def test_dollar_matches_before_one_trailing_newline():
    assert reward(GT_RESPONSE_ONLY + "\n", GT_RESPONSE_ONLY)[1] == 1.0
    assert reward(GT_RESPONSE_ONLY + "\n\n", GT_RESPONSE_ONLY)[1] == 0.0
    assert reward(GT_RESPONSE_ONLY + " ", GT_RESPONSE_ONLY)[1] == 0.0
    assert reward(" " + GT_RESPONSE_ONLY, GT_RESPONSE_ONLY)[1] == 0.0


def test_tag_layout_and_counts():
    assert reward(GT.replace("</think>\n", "</think>\n\n"))[1] == 0.0  # exactly one newline between blocks
    assert reward(GT.replace("<think>", "<think>\n<think>"))[1] == 1.0  # <think> is not counted
    twice = GT + "\n<tool_call>\n" + json.dumps(TIME) + "\n</tool_call>"
    assert reward(twice)[1:3] == (0.0, 3.0)  # format fails on the count; correctness reads the first block
    # split("<tool_call>")[1]: the text between the first and the second <tool_call>, up to </tool_call>
    nested = f"{THINK}\n<tool_call>\n{json.dumps(WEATHER)}\n<tool_call>\n{json.dumps(TIME)}\n</tool_call>"
    assert reward(nested)[2] == 6 * (0.5 + 3) / 6 - 3
    assert reward(calls_turn(WEATHER, TIME).replace("</tool_call>", ""))[2] == -3.0


@pytest.mark.parametrize("pred,expected", [
    ({"city": "Paris", "unit": "C"}, 3.0),
    ({"unit": "C", "city": "Paris"}, 3.0),  # dict equality ignores key order
    ({"city": "paris", "unit": "C"}, 6 * 5 / 6 - 3),
])
def test_value_equality_is_python_eq(pred, expected):
    assert reward(calls_turn({"name": "get_weather", "parameters": pred}, TIME))[2] == pytest.approx(expected)


def test_numeric_and_nested_value_equality():
    gt = calls_turn({"name": "f", "parameters": {"n": 1, "flag": True, "xs": [1, {"a": 2}]}})  # S_max = 5
    same = calls_turn({"name": "f", "parameters": {"n": 1.0, "flag": 1, "xs": [1.0, {"a": 2}]}})
    assert reward(same, gt)[2] == 3.0  # 1 == 1.0 == True; the whole list equality holds
    strings = calls_turn({"name": "f", "parameters": {"n": "1", "flag": "True", "xs": [1, {"a": 3}]}})
    assert reward(strings, gt)[2] == 6 * 2 / 5 - 3  # names 1 + keys 1, no value matches
    assert reward(strings, gt, value_match="tolerant")[2] == 6 * 4 / 5 - 3  # "1" ~ 1, "True" ~ True; xs differs


@pytest.mark.parametrize("line", ["[1]", "3", '"get_weather"', "null", "true", '{"parameters": {}}',
                                  '{"name": ["x"], "parameters": {}}', '{"name": "get_weather", "parameters": [1]}',
                                  '{"name": "get_weather"}', "", "{", "[" * 5000])
def test_malformed_predicted_calls_give_min(line):
    assert reward(calls_turn(lines=[json.dumps(WEATHER), line, json.dumps(TIME)]))[2] == -3.0


def test_structure_is_checked_lazily_like_the_original():
    # a call without "parameters" whose name matches no GT call is never inspected
    extra = calls_turn(lines=[json.dumps(WEATHER), json.dumps(TIME), '{"name": "other"}'])
    assert reward(extra)[2] == pytest.approx(6 * (2 / 3 + 5) / 6 - 3)
    # Intermediate never reads "parameters"; Finegrained never hashes names
    no_params = calls_turn(lines=['{"name": "get_weather"}', json.dumps(TIME)])
    assert reward(no_params)[2] == -3.0
    assert reward(no_params, preset="intermediate")[2] == 6 * (1 + 0 + 1) / 3 - 3
    list_name = calls_turn(lines=[json.dumps(WEATHER), json.dumps(TIME), '{"name": ["x"], "parameters": {}}'])
    assert reward(list_name)[2] == -3.0  # Counter(names) raises on an unhashable name
    assert reward(list_name, preset="finegrained")[2] == pytest.approx(6 * (0 + 3 + 2) / 6 - 3)


def test_ground_truth_without_tool_call_gives_zero_correctness():
    for response in (GT, "garbage", calls_turn(lines=["{bad"])):
        assert reward(response, GT_RESPONSE_ONLY)[2] == 0.0


def test_greedy_vs_optimal_matching():
    gt = calls_turn({"name": "f", "parameters": {"a": 1}}, {"name": "f", "parameters": {"a": 1, "b": 2}})  # S_max 6
    pred = calls_turn({"name": "f", "parameters": {"a": 1, "b": 2}}, {"name": "f", "parameters": {"a": 9}})
    # greedy (GT order): g1 takes p1 (0.5 + 1), g2 gets p2 (0.5 + 0); optimal: g1-p2 (1 + 0), g2-p1 (1 + 2)
    assert reward(pred, gt)[2] == 6 * (1 + 1.5 + 0.5) / 6 - 3
    assert reward(pred, gt, matching="optimal")[2] == 6 * (1 + 1 + 3) / 6 - 3
    # a same-name call sharing no key and no value scores 0 and is not matched
    assert reward(calls_turn({"name": "f", "parameters": {"z": 0}}), gt)[2] == 6 * (0.5 + 0) / 6 - 3


def test_max_weight_assignment_against_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n, m = rng.randint(1, 5), rng.randint(1, 5)
        w = [[rng.choice([0.0, 0.5, 1.0, 1.5, 2.0, 3.25]) for _ in range(m)] for _ in range(n)]
        got = max_weight_assignment(w)
        assert len(set(c for c in got if c >= 0)) == sum(c >= 0 for c in got) == min(n, m)
        if n <= m:
            best = max(sum(w[r][c] for r, c in zip(range(n), cols)) for cols in itertools.permutations(range(m), n))
        else:
            best = max(sum(w[r][c] for r, c in zip(rows, range(m))) for rows in itertools.permutations(range(n), m))
        assert sum(w[r][c] for r, c in enumerate(got) if c >= 0) == pytest.approx(best)
    assert max_weight_assignment([]) == [] and max_weight_assignment([[]]) == [-1]


def test_max_weight_assignment_matches_scipy():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(1)
    for n, m in [(3, 7), (7, 3), (6, 6), (1, 9)]:
        w = rng.random((n, m))
        got = max_weight_assignment(w.tolist())
        rows, cols = scipy_optimize.linear_sum_assignment(w, maximize=True)
        assert sum(w[r, c] for r, c in enumerate(got) if c >= 0) == pytest.approx(w[rows, cols].sum())


def test_multiset_jaccard():
    assert multiset_jaccard([], []) == 1.0 and multiset_jaccard(["a"], []) == 0.0
    assert multiset_jaccard(["a", "b"], ["b", "a"]) == 1.0
    assert multiset_jaccard(["a", "a", "b"], ["a", "c"]) == 1 / 4
    with pytest.raises(TypeError):
        multiset_jaccard([["x"]], ["y"])


def test_tolerant_values():
    assert tolerant_equal(1, "1") and tolerant_equal("1.0", 1) and tolerant_equal(True, " TRUE ")
    assert tolerant_equal("New  York", "new york") and tolerant_equal(None, "null")
    assert tolerant_equal({"a": [1, "X"]}, {"a": ["1", "x"]})
    assert not tolerant_equal(1, "2") and not tolerant_equal("a", ["a"]) and not tolerant_equal(False, "0")
    sloppy = calls_turn({"name": "get_weather", "parameters": {"city": " paris", "unit": "c"}}, TIME)
    assert reward(sloppy)[2] < 3.0 and reward(sloppy, value_match="tolerant")[2] == 3.0
    assert score_response(sloppy, GT, 0, RewardConfig(value_match="tolerant")).accuracy == 1.0


def test_partial_format():
    cfg = dict(partial_format=True)
    gt = GT_RESPONSE_ONLY
    assert reward(gt, gt, **cfg)[1] == 1.0
    assert reward(gt.replace("</think>\n", "</think>"), gt, **cfg)[1] == 3 / 4  # think, 2 counts; layout fails
    assert reward("<response> x </response>", gt, **cfg)[1] == 2 / 4
    assert reward("nothing", gt, **cfg)[1] == 0.0
    assert reward(GT.replace("<tool_call>\n", "<tool_call>"), **cfg)[1] == 3 / 4
    s = RewardConfig.preset("dynamic_scale", partial_format=True).scales(0)
    got = reward("<response> x </response>", gt, preset="dynamic_scale", partial_format=True)[1]
    assert got == s.format_min + (s.format_max - s.format_min) * 0.5 == 0.0


# ---------------------------------------------------------------- assistant-turn extraction

@pytest.mark.parametrize("family,text,expected", [
    ("qwen2", "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\nold<|im_end|>\n"
              "<|im_start|>assistant\n <think> a </think> <|im_end|><|endoftext|>", "<think> a </think>"),
    ("qwen", "<think> response-only decode </think>\n<|im_end|>", "<think> response-only decode </think>"),
    ("qwen", "truncated, no stop token ", "truncated, no stop token"),
    ("llama", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nU<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n<think> b </think><|eot_id|>", "<think> b </think>"),
    ("llama3", "<think> c </think><|eot_id|>junk", "<think> c </think>"),
    (None, " raw <|im_end|> ", " raw <|im_end|> "),
])
def test_extract_assistant_turn(family, text, expected):
    assert extract_assistant_turn(text, family) == expected


def test_extract_assistant_turn_rejects_unknown_family():
    with pytest.raises(ValueError, match="mistral"):
        extract_assistant_turn("x", "mistral")


# ---------------------------------------------------------------- config, ground truths, batch

def test_config_validation_and_presets():
    assert RewardConfig.preset("original") == RewardConfig()
    assert RewardConfig.preset("equal_max", correctness_min=0.0).correctness_min == 0.0
    with pytest.raises(ValueError, match="unknown reward preset"):
        RewardConfig.preset("nope")
    for kwargs, field in [({"format_min": 2.0}, "format_min"), ({"matching": "hungarian"}, "matching"),
                          ({"length_target": 0}, "length_target"), ({"length": 1}, "length"),
                          ({"correctness_max": float("nan")}, "correctness_max")]:
        with pytest.raises(RewardConfigError) as e:
            RewardConfig(**kwargs)
        assert field in e.value.fields
    for step in (-1, True, 1.5):
        with pytest.raises(ValueError, match="step"):
            RewardConfig().scales(step)


def test_bad_ground_truths_raise_clearly():
    for gt in (calls_turn(lines=["{bad"]), calls_turn(lines=['{"name": "f"}']), calls_turn(lines=["[1]"])):
        with pytest.raises(GroundTruthError):
            parse_ground_truth(gt)
    with pytest.raises(GroundTruthError, match=r"ground_truths\[2\]"):
        score_batch(["x"] * 3, [GT, GT, calls_turn(lines=['{"name": 3, "parameters": {}}'])], 1)


def test_score_batch_matches_per_sample_scores():
    responses = [w[1] for w in WORKED] + [GT_RESPONSE_ONLY, "garbage"]
    gts = [GT] * len(WORKED) + [GT_RESPONSE_ONLY, GT_RESPONSE_ONLY]
    config = RewardConfig.preset("dynamic_scale", length=True)
    batch = score_batch(responses, gts, 7, config, chunk_size=3)
    assert len(batch) == len(responses) and batch.total.dtype == np.float64
    for i, (r, g) in enumerate(zip(responses, gts)):
        one = score_response(r, g, 7, config)
        assert (batch.total[i], batch.format[i], batch.correctness[i], batch.length[i], batch.accuracy[i]) == (
            one.total, one.format, one.correctness, one.length, one.accuracy)
    assert batch.accuracy.tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 1, 1]
    assert set(batch.metrics()) == {f"reward/{k}" for k in ("total", "format", "correctness", "length", "accuracy")}
    assert len(score_batch([], [], 0)) == 0
    with pytest.raises(ValueError):
        score_batch(["a"], [], 0)
    with pytest.raises(TypeError, match=r"responses\[0\]"):
        score_batch([None], [GT], 0)


def test_score_batch_with_process_pool_is_deterministic():
    from experiments.tools.reward_mutations import MUTATIONS
    from toolrl_jax.rewards import make_reward_pool

    responses, gts = [], []
    for i in range(300):
        mutate = list(MUTATIONS.values())[i % len(MUTATIONS)]
        gt = [GT, GT_RESPONSE_ONLY, calls_turn(TIME)][i % 3]
        responses.append(mutate(gt) or "garbage")
        gts.append(gt)
    serial = score_batch(responses, gts, 3)
    with make_reward_pool(2) as pool:
        pooled = score_batch(responses, gts, 3, pool=pool, chunk_size=32)
    for name in ("total", "format", "correctness", "length", "accuracy"):
        np.testing.assert_array_equal(getattr(serial, name), getattr(pooled, name))


def test_rollout_mix():
    from experiments.tools.reward_mutations import rollout_mix, synthetic_ground_truth

    parse_ground_truth(synthetic_ground_truth(random.Random(0)))
    responses, gts = rollout_mix(200, [GT, GT_RESPONSE_ONLY], seed=0)
    assert rollout_mix(200, [GT, GT_RESPONSE_ONLY], seed=0) == (responses, gts)
    batch = score_batch(responses, gts, 1)
    assert len(batch) == 200 and gts[:8] == [GT] * 4 + [GT_RESPONSE_ONLY] * 4  # 4 responses per prompt
    assert 0.25 < batch.accuracy.mean() < 0.9 and (batch.total == 4.0).any() and (batch.total <= 0.0).any()
