"""The algorithm options of issue 19 inside the GRPO trainer on a tiny model: dynamic sampling draws extra prompts
from the data cursor, keeps informative groups in draw order and masks fillers, and is the plain step when every
group is informative; every option trains on the GRPO and PPO paths; a dynamic-sampling run killed and resumed
continues exactly."""
from __future__ import annotations

import dataclasses
import json
import zlib

import jax
import numpy as np
import pytest

from tests.test_grpo_trainer import _trainer
from tests.test_loop import _grpo, _lines
from toolrl_jax.optim import OptimizerConfig
from toolrl_jax.rewards.functions import CombinedReward, toolrl_reward
from toolrl_jax.rl.ppo import PolicyLossConfig

# The shared compilation cache (conftest.py): trainers of one tiny model compile the same sampler and update programs.
pytestmark = pytest.mark.usefixtures("compilation_cache")


def probe(responses, ground_truths, step):
    """A reward that differs between a group's responses only for prompts whose ground truth is "vary"."""
    return [float(zlib.crc32(r.encode()) % 997 + 1) if t == "vary" else 0.0 for r, t in zip(responses, ground_truths)]


def parity(responses, ground_truths, step):
    """A reward informative for about half the groups of two: the parity of the response's checksum."""
    return [float(zlib.crc32(r.encode()) % 2) for r in responses]


class _Batch:
    def __init__(self, prompt_ids, ground_truths):
        self.prompt_ids, self.ground_truths = prompt_ids, ground_truths


def _capture_rows(monkeypatch) -> list:
    import toolrl_jax.training.grpo as grpo

    captured, update_stage = [], grpo.update_stage

    def spy(learner, rows):
        captured.append({k: np.array(v) for k, v in rows.items()})
        return update_stage(learner, rows)

    monkeypatch.setattr(grpo, "update_stage", spy)
    return captured


def _moved(a, b) -> bool:
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_dynamic_sampling_keeps_informative_groups_in_draw_order(tiny_chat_model_dir, monkeypatch):
    small = dict(prompts_per_step=2, group_size=2, mini_batch_prompts=2, micro_batch_rows=2, kl_coef=0.0)
    reward = CombinedReward([("probe", probe, 1.0)])
    plain, prompts, _ = _trainer(tiny_chat_model_dir, reward, **small)
    trainer, _, _ = _trainer(tiny_chat_model_dir, reward, dynamic_sampling=True, dynamic_sampling_max_rounds=3,
                             **small)
    key, first = jax.random.key(7), prompts[:2]

    # Every group informative: exactly the plain step (same samples, same update), plus the counts.
    a = plain.train_step(first, ["vary", "vary"], key)
    b = trainer.train_step(first, ["vary", "vary"], key, refill=lambda: pytest.fail("no refill needed"))
    assert not _moved(plain.params, trainer.params)
    extra = {k: v for k, v in b.metrics.items() if k not in a.metrics}
    assert extra == {"dynamic_sampling/rounds": 1.0, "dynamic_sampling/kept_groups": 2.0,
                     "dynamic_sampling/filler_groups": 0.0, "dynamic_sampling/dropped_groups": 0.0,
                     "dynamic_sampling/sampled_reward_mean": pytest.approx(float(np.mean(a.rewards.total)))}
    for k, v in a.metrics.items():
        assert k.startswith(("time/", "throughput/")) or v == b.metrics[k], k

    # One informative group per round at best: rounds 0 (flat, vary), 1 (flat, flat), 2 (vary, vary) -> groups 1, 4.
    captured = _capture_rows(monkeypatch)
    draws = iter([_Batch(prompts[2:], ["flat", "flat"]), _Batch(first, ["vary", "vary"]),
                  _Batch(prompts[2:], ["vary", "vary"])])
    expected = [trainer.sampler.generate(first, trainer.sampling_config(), k).texts
                for k in (key, jax.random.fold_in(key, 2))]
    result = trainer.train_step(first, ["flat", "vary"], key, refill=lambda: next(draws))
    m = result.metrics
    assert (m["dynamic_sampling/rounds"], m["dynamic_sampling/kept_groups"], m["dynamic_sampling/filler_groups"],
            m["dynamic_sampling/dropped_groups"]) == (3.0, 2.0, 0.0, 4.0)
    np.testing.assert_array_equal(result.groups, [1, 4])
    assert result.samples.texts == expected[0][2:] + expected[1][:2]  # round 0's 2nd group, round 2's 1st
    assert np.all(result.rewards.total > 0) and "loss_mask" not in captured[-1]
    assert next(draws).ground_truths == ["vary", "vary"], "the third batch was never drawn"

    # Short of informative groups after the last round: the earliest uninformative group fills, its loss masked.
    trainer.config = dataclasses.replace(trainer.config, dynamic_sampling_max_rounds=1)
    result = trainer.train_step(first, ["flat", "vary"], key, refill=lambda: _Batch(prompts[2:], ["flat", "flat"]))
    m = result.metrics
    assert (m["dynamic_sampling/rounds"], m["dynamic_sampling/kept_groups"], m["dynamic_sampling/filler_groups"],
            m["dynamic_sampling/dropped_groups"]) == (2.0, 1.0, 1.0, 2.0)
    np.testing.assert_array_equal(result.groups, [0, 1])
    rows = captured[-1]  # in rollout order: the filler group's two rows first
    np.testing.assert_array_equal(rows["loss_mask"][:2], 0.0)
    np.testing.assert_array_equal(rows["loss_mask"][2:], rows["response_mask"][2:])
    # without a refill (a direct call) there are no extra rounds
    result = trainer.train_step(first, ["flat", "flat"], key)
    assert result.metrics["dynamic_sampling/rounds"] == 1.0 and result.metrics["dynamic_sampling/filler_groups"] == 2


@pytest.mark.parametrize("path", ["grpo", "ppo", "reinforce_plus_plus"])
def test_every_option_trains_on_the_grpo_and_ppo_paths(tiny_chat_model_dir, monkeypatch, path):
    """GSPO ratios, TIS, the overlong penalty, per-component normalisation with part weights, RLOO, REINFORCE++ and
    the truncation mask: a step with the options together runs on each update path with finite, logged metrics;
    the mismatch is always logged. The tiny model never stops within 8 tokens, so on the PPO path the truncation
    mask leaves the actor nothing to learn from (its parameters stay exactly put) while the critic trains."""
    options = dict(tis_cap=2.0, overlong_buffer=4, max_response_length=8,
                   optimizer=OptimizerConfig(learning_rate=1e-3, weight_decay=0.0))
    if path == "grpo":
        options.update(advantage_estimator="rloo", advantage_normalization="per_component", kl_coef=0.0,
                       reward_component_weights="toolrl/correctness=2,parity/score=3,overlong=0.5",
                       policy=PolicyLossConfig(importance_sampling_level="sequence", clip_eps=3e-4,
                                               clip_eps_high=4e-4, agg_mode="seq-mean-token-mean"))
    elif path == "ppo":
        options.update(algorithm="ppo", group_size=1, micro_batch_rows=1, mask_truncated=True,
                       policy=PolicyLossConfig(importance_sampling_level="sequence_token"))
    else:
        options.update(advantage_estimator="reinforce_plus_plus",
                       policy=PolicyLossConfig(importance_sampling_level="sequence_token", kl_loss_coef=0.1))
    reward = CombinedReward([("toolrl", toolrl_reward(), 1.0), ("parity", parity, 1.0)])
    trainer, prompts, truths = _trainer(tiny_chat_model_dir, reward, **options)
    captured = _capture_rows(monkeypatch)
    before = jax.tree.map(np.asarray, trainer.params)
    result = trainer.train_step(prompts, truths, jax.random.key(0))
    m = result.metrics
    for key in ("actor/pg_loss", "actor/grad_norm", "rollout/logp_mismatch_mean", "rollout/logp_mismatch_max",
                "rollout/tis_weight_mean", "reward/overlong", "advantage/abs_mean"):
        assert np.isfinite(m[key]), key
    assert m["rollout/logp_mismatch_max"] < 1e-3, "the sampler and the trainer compute the same float32 log-probs"
    assert m["rollout/tis_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert m["advantage/abs_mean"] > 0.1, "the parity reward gives the update a signal"
    rows = captured[-1]
    np.testing.assert_array_equal(rows["is_weight"] > 0, rows["response_mask"] > 0)
    np.testing.assert_allclose(result.rewards.components["overlong"],
                               -np.clip((result.samples.lengths - 4) / 4, 0, 1))
    if path != "ppo":
        assert "loss_mask" not in rows and _moved(before, trainer.params)
        return
    assert not result.samples.stopped.any()
    np.testing.assert_array_equal(rows["loss_mask"], 0.0)
    assert m["actor/pg_loss"] == 0.0 and m["actor/entropy"] == 0.0 and not _moved(before, trainer.params)
    assert np.isfinite(m["critic/vf_loss"]) and m["critic/grad_norm"] > 0


@pytest.mark.slow
def test_dynamic_sampling_run_resumes_exactly(tiny_chat_model_dir, tmp_path):
    """Extra rollout rounds draw from the run's data cursor, which the checkpoint after the step saves: a run
    stopped after step 2 and resumed logs and exports exactly what a straight run does."""
    from safetensors.numpy import load_file

    reward = CombinedReward([("parity", parity, 1.0)])
    options = dict(dynamic_sampling=True, dynamic_sampling_max_rounds=2, kl_coef=0.0)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _grpo(tiny_chat_model_dir, straight, 3, reward=reward, **options)
    _grpo(tiny_chat_model_dir, resumed, 2, reward=reward, **options)
    _grpo(tiny_chat_model_dir, resumed, 3, resume=True, reward=reward, **options)
    lines = _lines(straight)
    assert _lines(resumed) == lines
    steps = [r for r in lines if "dynamic_sampling/rounds" in r]
    assert len(steps) == 3 and any(r["dynamic_sampling/rounds"] > 1 for r in steps), steps
    a, b = load_file(str(straight / "export" / "model.safetensors")), load_file(str(resumed / "export" /
                                                                                 "model.safetensors"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # the sample log names the prompts trained on, which may come from the extra rounds' batches
    samples = [json.loads(line) for line in (straight / "sample_log.jsonl").read_text().splitlines()]
    assert all("prompt_index" in s and "parity/score" in s for s in samples)
