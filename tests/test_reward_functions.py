"""Reward functions as a protocol: the built-in reproduces score_batch exactly, user functions combine with weights,
every failure names the function, the process pool gives the in-process result, and the --reward_fn flags."""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from experiments import reward_flags
from tests import reward_fns_example
from tests.test_rewards_flags import _parse  # fresh FlagValues with the reward flags, parsed
from toolrl_jax.rewards import RewardConfig, make_reward_pool, score_batch
from toolrl_jax.rewards.functions import (
    CombinedReward,
    RewardFunctionError,
    RewardOutput,
    RewardTerm,
    ToolRLReward,
    load_reward_fn,
    normalise_output,
    reward_fn_name,
    toolrl_reward,
)

EX = "tests.reward_fns_example"
GT = ('<think> I should call the tool. </think>\n<tool_call>\n{"name": "get_weather", "parameters": {"city": "Paris"}}'
      '\n</tool_call>')
RESPONSES = [GT, GT.replace("Paris", "Rome"), "<think> no </think>\n<response> hi </response>", "garbage"]


def _mutations(gt: str) -> list[str]:
    """A few deterministic edits of a ground truth: identity, truncated, no think, calls reversed, garbage."""
    head, _, calls = gt.partition("<tool_call>\n")
    lines, _, tail = calls.partition("\n</tool_call>")
    reversed_calls = head + "<tool_call>\n" + "\n".join(lines.split("\n")[::-1]) + "\n</tool_call>" + tail
    return [gt, gt[: len(gt) // 2], gt.partition("</think>")[2].lstrip("\n"), reversed_calls, "<think></think>"]


def _assert_same_as_score_batch(result, batch) -> None:
    np.testing.assert_array_equal(result.total, batch.total)
    assert result.metrics("val/") == batch.metrics("val/")
    assert list(result.metrics()) == list(batch.metrics())  # same order in the logs too
    fields = ("total", "format", "correctness", "length", "accuracy")
    assert result.records() == [{f: float(getattr(batch, f)[i]) for f in fields} for i in range(len(batch))]


@pytest.fixture(scope="module")
def toolrl_batch(shared_dir):
    from toolrl_jax.datasets.io import read_examples

    examples = read_examples(shared_dir / "data/toolrl/test.parquet")
    rows = [(response, ex) for ex in examples for response in _mutations(ex.ground_truth)]
    return [r for r, _ in rows], [ex.ground_truth for _, ex in rows], [ex for _, ex in rows]


@pytest.mark.parametrize("preset", RewardConfig.PRESET_NAMES)
def test_builtin_alone_is_score_batch_on_toolrl_data(toolrl_batch, preset):
    responses, truths, examples = toolrl_batch
    config = RewardConfig.preset(preset)
    reward = CombinedReward.default(config)
    assert reward.is_default_layout
    for step in (0, 1, 40):
        batch = score_batch(responses, truths, step, config)
        _assert_same_as_score_batch(reward.score(responses, truths, step, examples=examples), batch)
        assert 0 < batch.accuracy.mean() < 1 and len(set(batch.format)) > 1  # the mutations vary the rewards


def test_builtin_alone_and_empty_batch():
    batch = score_batch(RESPONSES, [GT] * 4, 2)
    _assert_same_as_score_batch(CombinedReward([("toolrl", toolrl_reward(), 1)]).score(RESPONSES, [GT] * 4, 2), batch)
    empty = CombinedReward.default().score([], [], 0)
    assert len(empty) == 0 and empty.metrics() == {} == score_batch([], [], 0).metrics()


def test_weights_combine_and_components_are_logged():
    reward = CombinedReward([RewardTerm("toolrl", load_reward_fn("toolrl"), 1.0),
                             RewardTerm("length_bonus", load_reward_fn(f"{EX}:length_bonus"), 0.5),
                             RewardTerm("tags", load_reward_fn(f"{EX}:tags"), -2.0)])
    assert not reward.is_default_layout
    result = reward.score(RESPONSES, [GT] * 4, 5)
    toolrl = score_batch(RESPONSES, [GT] * 4, 5)
    bonus = np.array([min(len(r) / 100, 1.0) for r in RESPONSES])
    tags = np.array([3.0, 3.0, 1.0, 0.0])
    np.testing.assert_allclose(result.total, toolrl.total + 0.5 * bonus - 2 * tags, rtol=0, atol=1e-12)
    assert result.total[0] == 4.0 + 0.5 * bonus[0] - 6.0  # format 1 + correctness 3, hand-computed
    metrics = result.metrics()
    assert set(metrics) == {"reward/total", "reward/toolrl/score", "reward/toolrl/format", "reward/toolrl/correctness",
                            "reward/toolrl/length", "reward/toolrl/accuracy", "reward/length_bonus/score",
                            "reward/tags/score", "reward/tags/think", "reward/tags/call"}
    assert metrics["reward/toolrl/score"] == float(toolrl.total.mean())
    assert metrics["reward/tags/call"] == 0.5 and metrics["reward/length_bonus/score"] == float(bonus.mean())
    assert result.record(2)["tags/think"] == 1.0 and result.record(2)["tags/call"] == 0.0
    assert result.weights == {"toolrl": 1.0, "length_bonus": 0.5, "tags": -2.0}
    np.testing.assert_array_equal(result.outputs["tags"].scores, tags)  # unweighted
    # The built-in alone with another weight: the nested layout, the weight applied.
    doubled = CombinedReward([("toolrl", toolrl_reward(), 2.0)]).score(RESPONSES, [GT] * 4, 5)
    np.testing.assert_array_equal(doubled.total, 2 * toolrl.total)
    assert "reward/toolrl/format" in doubled.metrics() and "reward/format" not in doubled.metrics()


def test_output_forms_step_and_examples(toolrl_batch):
    responses, truths, examples = (x[:10] for x in toolrl_batch)
    out = CombinedReward([("s", reward_fns_example.step_scaled, 1.0)]).score(responses, truths, 7)
    np.testing.assert_array_equal(out.total, np.full(10, 7.0))
    np.testing.assert_array_equal(out.components["s/matches_gt"], [float(r == g) for r, g in zip(responses, truths)])
    turns = CombinedReward([("turns", reward_fns_example.prompt_turns, 1.0)])
    assert turns.terms[0].wants_examples and not turns.terms[0].wants_pool
    np.testing.assert_array_equal(turns.score(responses, truths, 1, examples=examples).total,
                                  [len(e.prompt_messages) for e in examples])
    np.testing.assert_array_equal(turns.score(responses, truths, 1).total, np.full(10, -1.0))
    with pytest.raises(ValueError, match="10 responses but 10 ground truths, 9 examples"):
        turns.score(responses, truths, 1, examples=examples[:9])


@pytest.mark.parametrize("spec, message", [
    ("length_bonus", r"bad reward function spec 'length_bonus': expected 'toolrl' .*'package.module:function'"),
    (f"{EX}:", r"bad reward function spec"),
    (f"{EX}:1x", r"bad reward function spec"),
    ("tests.no_such_module:f", r"spec 'tests.no_such_module:f': module 'tests.no_such_module' not found"),
    ("no_such_pkg_xyz.mod:f", r"spec 'no_such_pkg_xyz.mod:f': module 'no_such_pkg_xyz' not found"),
    (f"{EX}:length_bonu", rf"spec '{EX}:length_bonu': '{EX}' has no attribute 'length_bonu'; did you mean length_bon"),
    (f"{EX}:NOT_CALLABLE", rf"spec '{EX}:NOT_CALLABLE' is a int, not a callable"),
])
def test_load_errors_name_the_spec(spec, message):
    with pytest.raises(RewardFunctionError, match=message):
        load_reward_fn(spec)


def test_names_and_signature_checks():
    assert reward_fn_name("toolrl") == "toolrl" and reward_fn_name(f"{EX}:length_bonus") == "length_bonus"
    assert load_reward_fn("toolrl", RewardConfig(length=True)).config == RewardConfig(length=True)
    with pytest.raises(RewardFunctionError, match=r"'two_args' cannot be called as fn\(responses, ground_truths, "
                                                  r"step\)"):
        RewardTerm("two_args", reward_fns_example.two_args)
    with pytest.raises(RewardFunctionError, match=r"\['a'\] repeat"):
        CombinedReward([("a", reward_fns_example.length_bonus, 1), ("a", reward_fns_example.tags, 1)])
    with pytest.raises(RewardFunctionError, match="'a': weight must be a finite number, got nan"):
        RewardTerm("a", reward_fns_example.length_bonus, float("nan"))


@pytest.mark.parametrize("name, message", [
    ("raises", r"'raises' at step 3 raised RuntimeError: boom in the user's reward"),
    ("wrong_shape", r"'wrong_shape' at step 3: scores has shape \(5,\); expected 4 finite numbers"),
    ("returns_nan", r"'returns_nan' at step 3: scores is not finite at responses \[3\] \(e.g. nan\)"),
    ("returns_str", r"'returns_str' at step 3: scores is a str; expected 4 finite numbers"),
    ("no_score", r"'no_score' at step 3 returned a dict without a 'score' entry \(keys \['reward'\]\)"),
])
def test_bad_functions_are_named(name, message):
    reward = CombinedReward([("toolrl", toolrl_reward(), 1.0), (name, getattr(reward_fns_example, name), 1.0)])
    with pytest.raises(RewardFunctionError, match=message) as info:
        reward.score(RESPONSES, [GT] * 4, 3)
    if name == "raises":
        assert isinstance(info.value.__cause__, RuntimeError)


def test_normalise_output():
    out = normalise_output("f", {"score": [1, 2], "c": np.array([True, False])}, 2)
    assert out.scores.dtype == np.float64 and out.components["c"].tolist() == [1.0, 0.0]
    assert normalise_output("f", RewardOutput([1.0]), 1).scores.tolist() == [1.0]
    for raw, message in [(1.0, r"shape \(\); expected 2"), ([1.0, None], r"dtype object \(e.g. None\)"),
                         ([[1.0], [2.0, 3.0]], "not an array of numbers"), ({"score": [1, 2], "score2": [1]},
                                                                            r"component 'score2' has shape \(1,\)"),
                         ({"score": [1, 2], 3: [1, 2]}, "component name 3 is not allowed"),
                         ([1.0, float("inf")], r"not finite at responses \[1\]")]:
        with pytest.raises(RewardFunctionError, match=r"^reward function 'f' at step 9.*" + message):
            normalise_output("f", raw, 2, step=9)


@pytest.fixture(scope="module")
def pool():
    with make_reward_pool(2) as p:
        yield p


def test_pool_matches_in_process(pool, toolrl_batch):
    responses, truths, examples = (x[:100] for x in toolrl_batch)
    reward = CombinedReward([("toolrl", ToolRLReward(RewardConfig.preset("length"), chunk_size=16), 1.0),
                             ("length_bonus", reward_fns_example.length_bonus, 0.5),
                             ("tags", reward_fns_example.tags, 1.0),
                             ("turns", reward_fns_example.prompt_turns, 0.1)], chunk_size=16)
    serial = reward.score(responses, truths, 4, examples=examples)
    pooled = reward.score(responses, truths, 4, examples=examples, pool=pool)
    assert pooled.columns.keys() == serial.columns.keys()
    for name, values in serial.columns.items():
        np.testing.assert_array_equal(pooled.columns[name], values, err_msg=name)
    where = CombinedReward([("pid", reward_fns_example.process_id, 1.0)], chunk_size=16)
    assert set(where.score(responses, truths, 4).total) == {os.getpid()}
    assert os.getpid() not in set(where.score(responses, truths, 4, pool=pool).total)
    bad = CombinedReward([("returns_nan", reward_fns_example.returns_nan, 1.0),
                          ("raises", reward_fns_example.raises, 1.0)], chunk_size=2)
    with pytest.raises(RewardFunctionError, match=r"'returns_nan' at step 4 on responses\[0:2\]: scores is not finite"):
        bad.score(RESPONSES, [GT] * 4, 4, pool=pool)
    with pytest.raises(RewardFunctionError, match=r"'raises' at step 4 on responses\[0:2\] raised RuntimeError: boom"):
        CombinedReward(bad.terms[1:], chunk_size=2).score(RESPONSES, [GT] * 4, 4, pool=pool)


def test_unpicklable_function_runs_in_process_with_one_warning(pool):
    reward = CombinedReward([("local", lambda responses, truths, step: [len(r) for r in responses], 1.0)], chunk_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = reward.score(RESPONSES, [GT] * 4, 1, pool=pool)
        second = reward.score(RESPONSES, [GT] * 4, 1, pool=pool)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "'local' cannot be pickled" in messages[0]
    np.testing.assert_array_equal(first.total, [len(r) for r in RESPONSES])
    np.testing.assert_array_equal(second.total, first.total)


def test_flags_default_is_the_builtin():
    fv = _parse("--reward_preset=two_stage")
    config = reward_flags.reward_config_from_flags(fv)
    reward = reward_flags.combined_reward_from_flags(config, fv)
    assert reward.is_default_layout and reward.terms[0].fn.config == RewardConfig.preset("two_stage")
    _assert_same_as_score_batch(reward.score(RESPONSES, [GT] * 4, 31), score_batch(RESPONSES, [GT] * 4, 31, config))


def test_flags_several_functions_and_weights():
    fv = _parse("--reward_fn=toolrl", f"--reward_fn={EX}:length_bonus", "--reward_weights=1,-0.25")
    reward = reward_flags.combined_reward_from_flags(RewardConfig(), fv)
    assert [(t.name, t.weight) for t in reward.terms] == [("toolrl", 1.0), ("length_bonus", -0.25)]
    only_user = reward_flags.combined_reward_from_flags(RewardConfig(), _parse(f"--reward_fn={EX}:tags"))
    assert [(t.name, t.weight) for t in only_user.terms] == [("tags", 1.0)]  # replaces the default "toolrl"


@pytest.mark.parametrize("argv, message", [
    (("--reward_fn=toolrl", f"--reward_fn={EX}:tags", "--reward_weights=1"),
     r"--reward_weights=1: 1 weights for 2 --reward_fn \(toolrl, tests.reward_fns_example:tags\)"),
    (("--reward_weights=nan",), r"--reward_weights=nan: weights must be finite"),
    (("--reward_weights=heavy",), r"--reward_weights=heavy: not a number"),
    (("--reward_weights=0",), r"--reward_weights=0: every weight is 0"),
    (("--reward_fn=toolrl", "--reward_fn=toolrl"), r"--reward_fn=toolrl: 'toolrl' and 'toolrl' are both named"),
    ((f"--reward_fn={EX}:tags", "--reward_fn=other.module:tags"),
     r"--reward_fn=other.module:tags: .*both named 'tags'"),
    (("--reward_fn=tests.no_such_module:f",), r"--reward_fn=tests.no_such_module:f: .*module 'tests.no_such_module'"),
])
def test_flag_errors_name_the_flag(argv, message):
    with pytest.raises(ValueError, match=message):
        reward_flags.combined_reward_from_flags(RewardConfig(), _parse(*argv))
