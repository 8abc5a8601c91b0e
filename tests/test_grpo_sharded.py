"""A GRPO (and PPO, and the algorithm options) step on 4 fake CPU devices (fsdp x tensor mesh) equals the
single-device step.

Covers the placement of update micro-batches: rows split across the data-parallel devices whether a mini-batch runs
as one fused scan (micro-batches of one shape, here a single micro-batch) or as per-micro-batch calls at their own
widths. XLA_FLAGS must be set before jax initialises, so the check runs in a fresh Python subprocess.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from flax import nnx
    from toolrl_jax.datasets.synthetic import make_synthetic_split
    from toolrl_jax.models.hf_io import load_hf_model
    from toolrl_jax.optim import OptimizerConfig
    from toolrl_jax.placement import Placement
    from toolrl_jax.rl.ppo import PolicyLossConfig
    from toolrl_jax.sharding import MeshConfig
    from toolrl_jax.tokenization import encode_chat, load_tokenizer, stop_token_ids
    from toolrl_jax.training.grpo import GRPOConfig, GRPOTrainer

    folder = sys.argv[1]
    assert jax.device_count() == 4, jax.devices()
    tok = load_tokenizer(folder)
    train, _ = make_synthetic_split(4, 0, seed=1)
    prompts = [encode_chat(tok, e.prompt_messages)[-96:] for e in train]
    prompts = [prompts[0][-12:], prompts[1], prompts[2][-20:], prompts[3]]  # mixed widths in each mini-batch
    truths = [e.ground_truth for e in train]
    placement = Placement.from_config(MeshConfig(data=1, fsdp=2, tensor=2))

    def step(sharded, **overrides):
        _, model = load_hf_model(folder, dtype="float32")
        kwargs = {}
        if sharded:
            graphdef, state = nnx.split(model)
            model = nnx.merge(graphdef, placement.place_state(state))
            kwargs = dict(placement=placement)
        fields = dict(prompts_per_step=4, group_size=2, mini_batch_prompts=2, max_prompt_length=96,
                      max_response_length=6, kl_coef=0.001, val_every=0, response_length_buckets=(2, 4, 6),
                      # eps=1: Adam's first step is proportional to the gradient, so rounding cannot flip the sign
                      # of a near-zero entry's update
                      optimizer=OptimizerConfig(learning_rate=1e-2, eps=1.0))
        fields.update(overrides)
        trainer = GRPOTrainer(model, GRPOConfig(**fields), tokenizer=tok, pad_id=tok.pad_token_id,
                              stop_token_ids=stop_token_ids(tok), **kwargs)
        result = trainer.train_step(prompts, truths, jax.random.key(5))
        params = jax.tree.map(np.asarray, trainer.params)
        if sharded:
            assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(trainer.params))
        return result.metrics, params, trainer

    # the algorithm options' row arrays (is_weight) and GSPO's per-row sequence ratios under the mesh too
    options = dict(micro_batch_rows=2, tis_cap=2.0, overlong_buffer=3, advantage_estimator="rloo",
                   policy=PolicyLossConfig(importance_sampling_level="sequence"))
    for overrides, split in ((dict(micro_batch_rows=2), True), (dict(micro_batch_rows=4), False),
                             (dict(micro_batch_rows=2, algorithm="ppo"), True), (options, True)):
        (m1, p1, _), (m4, p4, trainer) = step(False, **overrides), step(True, **overrides)
        assert (trainer.split_update.accumulate._cache_size() > 0) == split, overrides
        for key in sorted(k for k in m1 if k.split("/")[0] in ("actor", "critic", "reward", "kl")):
            np.testing.assert_allclose(m4[key], m1[key], rtol=2e-4, atol=1e-6, err_msg=f"{overrides} {key}")
        for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4, err_msg=str(overrides))
    print("GRPO_SHARDED_OK")
""")


@pytest.mark.slow
def test_grpo_and_ppo_steps_on_a_mesh_equal_single_device(tiny_chat_model_dir, cached_env):
    # The shared compilation cache: each option set's trainers compile mostly the programs of the first set (the
    # sampler, log-prob passes), which then load instead of compiling again (127 s -> 87 s).
    env = dict(cached_env, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_chat_model_dir)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0 and "GRPO_SHARDED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
