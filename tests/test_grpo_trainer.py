"""GRPO trainer on a tiny model with a real tokenizer: a step runs end to end, accumulation is exact."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from toolrl_jax.datasets.synthetic import make_synthetic_split
from toolrl_jax.models.hf_io import load_hf_model
from toolrl_jax.optim import OptimizerConfig
from toolrl_jax.tokenization import encode_chat, load_tokenizer, stop_token_ids
from toolrl_jax.training.grpo import GRPOConfig, GRPOTrainer, stack_minibatches


def _trainer(folder, **overrides) -> tuple[GRPOTrainer, list, list]:
    _, model = load_hf_model(folder, dtype="float32")
    tok = load_tokenizer(folder)
    train, _ = make_synthetic_split(4, 0, seed=1)
    prompts = [encode_chat(tok, e.prompt_messages)[-96:] for e in train]
    fields = dict(prompts_per_step=4, group_size=2, mini_batch_prompts=2, micro_batch_rows=2,
                  max_prompt_length=96, max_response_length=8, kl_coef=0.001, val_every=0,
                  optimizer=OptimizerConfig(learning_rate=1e-3))
    fields.update(overrides)
    trainer = GRPOTrainer(model, GRPOConfig(**fields), tokenizer=tok, pad_id=tok.pad_token_id,
                          stop_token_ids=stop_token_ids(tok))
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
    """The same rollouts updated with micro-batches of 1 row or 4 rows give the same parameters."""
    results = []
    for micro in (1, 4):
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
