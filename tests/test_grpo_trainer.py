"""GRPO trainer on a tiny model with a real tokenizer: a step runs end to end, accumulation is exact."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from toolrl_jax.datasets.synthetic import make_synthetic_split
from toolrl_jax.models.hf_io import load_hf_model
from toolrl_jax.optim import OptimizerConfig
from toolrl_jax.tokenization import encode_chat, load_tokenizer, stop_token_ids
from toolrl_jax.training.grpo import GRPOConfig, GRPOTrainer
from toolrl_jax.training.layout import stack_minibatches
from toolrl_jax.training.sequences import join_prompt_and_response

# The shared compilation cache (conftest.py): trainers of one tiny model compile the same sampler and update programs.
pytestmark = pytest.mark.usefixtures("compilation_cache")


def _trainer(folder, reward=None, **overrides) -> tuple[GRPOTrainer, list, list]:
    _, model = load_hf_model(folder, dtype="float32")
    tok = load_tokenizer(folder)
    train, _ = make_synthetic_split(4, 0, seed=1)
    prompts = [encode_chat(tok, e.prompt_messages)[-96:] for e in train]
    fields = dict(prompts_per_step=4, group_size=2, mini_batch_prompts=2, micro_batch_rows=2,
                  max_prompt_length=96, max_response_length=8, kl_coef=0.001, val_every=0,
                  optimizer=OptimizerConfig(learning_rate=1e-3))
    fields.update(overrides)
    trainer = GRPOTrainer(model, GRPOConfig(**fields), tokenizer=tok, pad_id=tok.pad_token_id,
                          stop_token_ids=stop_token_ids(tok), reward=reward)
    return trainer, prompts, [e.ground_truth for e in train]


def test_grpo_step_runs_and_updates(tiny_chat_model_dir):
    trainer, prompts, truths = _trainer(tiny_chat_model_dir)
    before = jax.tree.map(np.asarray, trainer.params)
    result = trainer.train_step(prompts, truths, jax.random.key(0))
    m = result.metrics
    assert trainer.step == 1
    assert len(result.rewards) == 8 and len(result.samples.texts) == 8
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "reward/total", "kl/old_ref_k1",
                "time/generate_s", "throughput/new_tokens_per_s"):
        assert np.isfinite(m[key]), key
    assert m["kl/old_ref_k1"] == pytest.approx(0.0, abs=1e-6), "policy == reference before the first update"
    after = jax.tree.map(np.asarray, trainer.params)
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
    assert any(changed), "parameters must move"
    # Two updates per step (4 prompts / 2 per mini-batch): the optimizer counted both.
    result2 = trainer.train_step(prompts, truths, jax.random.key(1))
    assert result2.metrics["kl/old_ref_k1"] != 0.0


def test_micro_batch_accumulation_matches_one_big_micro_batch(tiny_chat_model_dir):
    """The same rollouts updated with micro-batches of 1 row or all 8 rows (one micro-batch: no accumulator) give
    the same parameters."""
    results = []
    for micro in (1, 8):
        trainer, prompts, truths = _trainer(tiny_chat_model_dir, micro_batch_rows=micro, mini_batch_prompts=4)
        trainer.train_step(prompts, truths, jax.random.key(3))
        results.append(jax.tree.map(np.asarray, trainer.params))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


def test_stack_minibatches_keeps_row_order():
    arrays = {"x": np.arange(12).reshape(12, 1)}
    mbs = stack_minibatches(arrays, rows_per_minibatch=6, micro_rows=2)
    assert len(mbs) == 2 and mbs[0]["x"].shape == (3, 2, 1)
    np.testing.assert_array_equal(np.concatenate([m["x"].reshape(-1) for m in mbs]), np.arange(12))


def test_config_validation_names_the_problem():
    with pytest.raises(ValueError, match="mini_batch_prompts"):
        GRPOConfig(prompts_per_step=10, mini_batch_prompts=4)
    with pytest.raises(ValueError, match="micro_batch_rows"):
        GRPOConfig(prompts_per_step=8, mini_batch_prompts=4, group_size=3, micro_batch_rows=5)
    with pytest.raises(ValueError, match="not a regex"):
        GRPOConfig(trainable_regex="layers/(")
    # caught here, not by a division by zero or at the first rollout
    for bad, message in ((dict(mini_batch_prompts=0), "mini_batch_prompts must be an integer >= 1"),
                         (dict(micro_batch_rows=-4), "micro_batch_rows must be an integer >= 1"),
                         (dict(temperature=-1.0), "temperature"), (dict(top_p=1.5), "top_p"),
                         (dict(top_k=-1), "top_k"), (dict(kl_coef=float("nan")), "kl_coef must be finite"),
                         (dict(val_samples=-1), "val_samples")):
        with pytest.raises(ValueError, match=message):
            GRPOConfig(**bad)
    from toolrl_jax.rl.ppo import PolicyLossConfig
    with pytest.raises(ValueError, match="accumulation_divisor"):
        PolicyLossConfig(agg_mode="verl", accumulation_divisor=0)


def test_training_only_the_last_layer_leaves_the_rest_bit_identical(tiny_chat_model_dir):
    from flax import nnx

    from toolrl_jax.sharding import path_to_str
    from toolrl_jax.training.trainable import last_layers_regex

    _, reference = load_hf_model(tiny_chat_model_dir, dtype="float32")
    num_layers = reference.config.num_layers
    regex = last_layers_regex(num_layers, 1)
    trainer, prompts, truths = _trainer(tiny_chat_model_dir, trainable_regex=regex, kl_coef=0.0)
    trained_paths = {path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainer.params)}
    assert trained_paths and all(p.startswith((f"layers/{num_layers - 1}/", "final_norm/")) for p in trained_paths)
    assert set(trainer.train_state()) == {"params", "opt_state"}
    trainer.train_step(prompts, truths, jax.random.key(0))
    before = dict(jax.tree_util.tree_leaves_with_path(nnx.state(reference)))
    after = dict(jax.tree_util.tree_leaves_with_path(nnx.state(trainer.model())))
    assert before.keys() == after.keys()
    moved = {path_to_str(k) for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert moved and moved <= trained_paths, moved - trained_paths
    # The sampler decodes with the updated weights: greedy output equals a fresh sampler on the merged model.
    from toolrl_jax.sampling.sampler import Sampler
    cfg = trainer.sampling_config(greedy=True, max_new_tokens=6)
    ours = trainer.sampler.generate(prompts[:2], cfg, jax.random.key(0))
    fresh = Sampler(trainer.model(), pad_id=trainer.tokenizer.pad_token_id,
                    stop_token_ids=trainer.sampler.stop_token_ids).generate(prompts[:2], cfg, jax.random.key(0))
    np.testing.assert_array_equal(ours.response_ids, fresh.response_ids)
    with pytest.raises(ValueError, match="matches no parameter"):
        _trainer(tiny_chat_model_dir, trainable_regex="^nothing$")


def test_ppo_baseline_step_trains_actor_and_critic(tiny_chat_model_dir):
    trainer, prompts, truths = _trainer(tiny_chat_model_dir, algorithm="ppo", group_size=1, mini_batch_prompts=2,
                                        micro_batch_rows=1, kl_coef=0.001)
    state0 = trainer.train_state()
    assert set(state0) == {"params", "opt_state", "critic"}
    critic_before = jax.tree.map(np.asarray, trainer.critic.train_state())
    result = trainer.train_step(prompts, truths, jax.random.key(0))
    m = result.metrics
    for key in ("actor/pg_loss", "critic/vf_loss", "critic/grad_norm", "critic/values_mean", "advantage/abs_mean"):
        assert np.isfinite(m[key]), key
    # The value head starts at zero: the first mini-batch's values are 0 (the second sees one critic update).
    rows = join_prompt_and_response(result.samples.prompt_ids, result.samples.prompt_mask,
                                    result.samples.response_ids, result.samples.response_mask)
    fresh, _, _ = _trainer(tiny_chat_model_dir, algorithm="ppo", group_size=1, mini_batch_prompts=2,
                           micro_batch_rows=1)
    assert np.all(fresh.critic.values(rows, 2) == 0.0)
    critic_after = jax.tree.map(np.asarray, trainer.critic.train_state())
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(critic_before), jax.tree.leaves(critic_after)))
    # A second step sees non-zero values from the updated head.
    assert np.any(trainer.critic.values(rows, 2) != 0.0)


def test_grpo_raises_a_learnable_reward(tiny_chat_model_dir):
    """The update moves the policy towards higher reward: sampling from the top 2 tokens with reward = the fraction
    of even token ids in the response (about 1/2 at first), a few steps on fixed prompts raise it towards 1. A sign
    or alignment error in log-probs, advantages or the loss would make it fall or stay flat."""
    from toolrl_jax.rewards.functions import RewardOutput, RewardResult

    trainer, prompts, truths = _trainer(tiny_chat_model_dir, prompts_per_step=4, group_size=8, mini_batch_prompts=4,
                                        micro_batch_rows=8, max_response_length=6, kl_coef=0.0, top_k=2,
                                        optimizer=OptimizerConfig(learning_rate=1e-3, weight_decay=0.0),
                                        trainable_regex=r"^(lm_head|embed)/")

    def even_fraction(samples, ground_truths, step):
        mask = samples.response_mask.astype(bool)
        even = ((samples.response_ids % 2 == 0) & mask).sum(1) / np.maximum(mask.sum(1), 1)
        zeros = np.zeros_like(even, dtype=np.float64)
        return RewardResult(total=even.astype(np.float64), components={"format": zeros, "correctness": zeros},
                            outputs={"even": RewardOutput(even.astype(np.float64))}, weights={"even": 1.0})

    trainer.score = even_fraction
    rewards = [trainer.train_step(prompts, truths, jax.random.key(s)).metrics["reward/total"] for s in range(5)]
    assert rewards[0] < 0.7, rewards
    assert np.mean(rewards[-2:]) > 0.85, rewards


def test_validation_can_also_sample_at_the_rollout_temperature(tiny_chat_model_dir):
    trainer, prompts, truths = _trainer(tiny_chat_model_dir, val_samples=3, max_response_length=4)
    metrics, greedy, _ = trainer.validate(prompts[:2], truths[:2], step=0)
    assert len(greedy) == 2
    assert {"val/total", "val_sampled/total", "val_sampled/format", "val_sampled/accuracy"} <= set(metrics)
    again, _, _ = trainer.validate(prompts[:2], truths[:2], step=0)
    assert again == metrics  # a fixed key: every validation sees the same sampling noise
    plain, _, _ = _trainer(tiny_chat_model_dir, max_response_length=4)[0].validate(prompts[:2], truths[:2], step=0)
    assert not any(k.startswith("val_sampled/") for k in plain)


def test_trimming_rollout_padding_changes_cost_not_results(tiny_chat_model_dir):
    """trim_padding trains each chunk and mini-batch at its own widths: same metrics and parameters, fewer cells."""
    runs = []
    for trim in (False, True):
        trainer, prompts, truths = _trainer(tiny_chat_model_dir, trim_padding=trim, response_length_buckets=(2, 4, 8),
                                            micro_batch_rows=2, logits_chunk_size=3)
        # A short and a long prompt in each mini-batch, so chunks of short prompts are cut on the left.
        prompts = [prompts[0][-12:], prompts[1], prompts[2][-20:], prompts[3]]
        result = trainer.train_step(prompts, truths, jax.random.key(5))
        runs.append((result.metrics, jax.tree.map(np.asarray, trainer.params)))
        # Trimmed: the micro-batches of a mini-batch get their own widths, so the split update ran (full: never).
        assert (trainer.split_update.accumulate._cache_size() >= 2) == trim
    (m_full, p_full), (m_trim, p_trim) = runs
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "kl/old_ref_k1", "reward/total"):
        np.testing.assert_allclose(m_trim[key], m_full[key], rtol=1e-4, atol=1e-6, err_msg=key)
    assert m_trim["train/padding_fraction"] < m_full["train/padding_fraction"]
    for a, b in zip(jax.tree.leaves(p_trim), jax.tree.leaves(p_full)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


def test_trainer_keeps_a_compute_dtype_reference_and_frees_the_sampler_copy_while_updating(tiny_chat_model_dir):
    _, model = load_hf_model(tiny_chat_model_dir, dtype="bfloat16")
    tok = load_tokenizer(tiny_chat_model_dir)
    config = GRPOConfig(prompts_per_step=2, group_size=2, mini_batch_prompts=2, micro_batch_rows=2,
                        max_prompt_length=96, max_response_length=4, kl_coef=0.001, val_every=0)
    trainer = GRPOTrainer(model, config, tokenizer=tok, pad_id=tok.pad_token_id, stop_token_ids=stop_token_ids(tok))
    def floating(tree):
        return [x for x in jax.tree.leaves(tree) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]

    assert floating(trainer.ref_params) and all(x.dtype == jax.numpy.bfloat16 for x in floating(trainer.ref_params))
    assert all(x.dtype == np.float32 for x in floating(trainer.params))
    trainer.sampler.release_params()
    with pytest.raises(RuntimeError, match="release_params"):
        trainer.sampler.generate([[1, 2, 3]], trainer.sampling_config(greedy=True), jax.random.key(0))
    trainer.sampler.update_params(trainer.model())
    train, _ = make_synthetic_split(2, 0, seed=1)
    prompts = [encode_chat(tok, e.prompt_messages)[-96:] for e in train]
    result = trainer.train_step(prompts, [e.ground_truth for e in train], jax.random.key(0))
    assert result.metrics["kl/old_ref_k1"] == 0.0, "bf16 reference == fp32 policy before the first update, exactly"
    trainer.sampler.generate(prompts[:1], trainer.sampling_config(greedy=True), jax.random.key(0))  # usable again


def test_rewards_are_scored_while_the_logprob_passes_run(tiny_chat_model_dir):
    """Every old-policy and reference log-prob chunk is dispatched before the host scores the rewards (so scoring
    overlaps the device's passes); the step's results do not depend on that order."""
    trainer, prompts, truths = _trainer(tiny_chat_model_dir, micro_batch_rows=2)
    events = []
    logprob_fn, score = trainer.logprob_fn, trainer.score

    def counting_logprob_fn(params, rows):
        events.append("logprob")
        return logprob_fn(params, rows)

    def recording_score(*args, **kwargs):
        events.append("score")
        return score(*args, **kwargs)

    trainer.logprob_fn, trainer.score = counting_logprob_fn, recording_score
    result = trainer.train_step(prompts, truths, jax.random.key(0))
    # 8 rows in chunks of 2, old policy and reference: 8 passes, all before scoring.
    assert events == ["logprob"] * 8 + ["score"]
    assert result.metrics["time/score_s"] >= 0 and result.metrics["time/logprob_s"] > 0


def test_rollout_engines_give_the_same_steps_and_compile_once(tiny_chat_model_dir):
    """GRPO steps and validation with the continuous engine (2 slots: one group at a time, refilled) equal those of
    the static engine: same samples, same metrics and parameters; the second step compiles no sampler program."""
    runs = []
    for engine, slots in (("static", None), ("continuous", 2)):
        trainer, prompts, truths = _trainer(tiny_chat_model_dir, rollout_engine=engine, rollout_slots=slots)
        first = trainer.train_step(prompts, truths, jax.random.key(4))
        compiled = trainer.sampler.compile_count
        second = trainer.train_step(prompts, truths, jax.random.key(5))
        assert trainer.sampler.compile_count == compiled, trainer.sampler.traces
        val, val_samples, _ = trainer.validate(prompts[:3], truths[:3], step=2)
        runs.append((first, second, val, val_samples, jax.tree.map(np.asarray, trainer.params)))
        if engine == "continuous":
            assert trainer.sampler._continuous.last_stats.slots == 2
    (s1, s2, sv, svs, sp), (c1, c2, cv, cvs, cp) = runs
    for a, b in ((s1, c1), (s2, c2)):
        np.testing.assert_array_equal(a.samples.response_ids, b.samples.response_ids)
        np.testing.assert_allclose(a.samples.logprobs, b.samples.logprobs, atol=1e-5, rtol=0)
        for key in ("actor/pg_loss", "actor/grad_norm", "kl/old_ref_k1", "reward/total", "response/length_mean"):
            np.testing.assert_allclose(a.metrics[key], b.metrics[key], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(svs.response_ids, cvs.response_ids)
    assert sv == pytest.approx(cv)
    for a, b in zip(jax.tree.leaves(sp), jax.tree.leaves(cp)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)
