"""PPO critic: GAE/returns/whitening and the clipped value loss against hand-computed numbers, the value head's
alignment with the response tokens, exact micro-batch accumulation, initialisation from the policy, learning."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from toolrl_jax.models.config import ModelConfig
from toolrl_jax.models.decoder import CausalLM
from toolrl_jax.optim import OptimizerConfig
from toolrl_jax.sharding import path_to_str
from toolrl_jax.training.critic import Critic, CriticConfig, critic_objective, ppo_advantages
from toolrl_jax.training.sequences import join_prompt_and_response

NAN = np.nan

# Two rows: 3 and 2 valid response tokens of R = 4; padding holds garbage that must never leak in.
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
OUTCOME = np.array([1.0, -0.5], np.float32)
VALUES = np.array([[0.2, 0.5, 0.9, 1e6], [0.1, -0.3, 1e6, 1e6]], np.float32)


# ---------------------------------------------------------------------------- advantages (no model)
def test_gae_gamma_lambda_one_returns_are_future_reward_sums():
    adv, ret = ppo_advantages(jnp.asarray(OUTCOME), jnp.asarray(MASK), jnp.asarray(VALUES), whiten=False)
    # token rewards: row0 [0, 0, 1], row1 [0, -0.5]; return_t = sum of rewards from t on; A = return - V.
    np.testing.assert_allclose(ret, [[1, 1, 1, 0], [-0.5, -0.5, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(adv, [[0.8, 0.5, 0.1, 0], [-0.6, -0.2, 0, 0]], atol=1e-6)


def test_gae_with_kl_in_reward():
    old = np.array([[-1.0, -2.0, -0.5, NAN], [-0.2, -0.4, NAN, NAN]], np.float32)
    ref = np.array([[-1.5, -2.0, -1.0, NAN], [-0.4, -0.1, NAN, NAN]], np.float32)
    adv, ret = ppo_advantages(jnp.asarray(OUTCOME), jnp.asarray(MASK), jnp.asarray(VALUES), jnp.asarray(old),
                              jnp.asarray(ref), kl_coef=0.1, whiten=False)
    # rewards = -0.1 * (old - ref) on each token, + outcome on the last: row0 [-0.05, 0, 0.95], row1 [-0.02, -0.47]
    np.testing.assert_allclose(ret, [[0.9, 0.95, 0.95, 0], [-0.49, -0.47, 0, 0]], atol=1e-6)
    np.testing.assert_allclose(adv, [[0.7, 0.45, 0.05, 0], [-0.59, -0.17, 0, 0]], atol=1e-6)


def test_gae_discounted_hand_computed():
    # r = [0, 0, 1], V = [0.2, 0.5, 0.9], gamma = lam = 0.5:
    # deltas: t2 = 1 - 0.9 = 0.1; t1 = 0.5*0.9 - 0.5 = -0.05; t0 = 0.5*0.5 - 0.2 = 0.05
    # A2 = 0.1; A1 = -0.05 + 0.25*0.1 = -0.025; A0 = 0.05 + 0.25*(-0.025) = 0.04375
    adv, ret = ppo_advantages(jnp.asarray([1.0]), jnp.ones((1, 3)), jnp.asarray([[0.2, 0.5, 0.9]]), gamma=0.5,
                              lam=0.5, whiten=False)
    np.testing.assert_allclose(adv, [[0.04375, -0.025, 0.1]], atol=1e-6)
    np.testing.assert_allclose(ret, [[0.24375, 0.475, 1.0]], atol=1e-6)


def test_advantages_whitened_over_valid_tokens_and_jittable():
    adv, ret = ppo_advantages(jnp.asarray(OUTCOME), jnp.asarray(MASK), jnp.asarray(VALUES))
    raw = np.array([0.8, 0.5, 0.1, -0.6, -0.2])
    expected = (raw - raw.mean()) / np.sqrt(raw.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(np.asarray(adv)[MASK.astype(bool)], expected, atol=1e-5)
    assert np.all(np.asarray(adv)[~MASK.astype(bool)] == 0)
    np.testing.assert_allclose(ret, [[1, 1, 1, 0], [-0.5, -0.5, 0, 0]], atol=1e-6)  # returns are not whitened
    jitted = jax.jit(ppo_advantages, static_argnames=("gamma", "lam", "whiten"))
    adv_j, ret_j = jitted(jnp.asarray(OUTCOME), jnp.asarray(MASK), jnp.asarray(VALUES), kl_coef=0.0)
    np.testing.assert_allclose(adv_j, adv, atol=1e-6)
    np.testing.assert_allclose(ret_j, ret, atol=1e-6)


def test_advantages_input_errors():
    with pytest.raises(ValueError, match="both old_logp and ref_logp"):
        ppo_advantages(jnp.asarray(OUTCOME), jnp.asarray(MASK), jnp.asarray(VALUES), old_logp=jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="kl_coef"):
        ppo_advantages(jnp.asarray(OUTCOME), jnp.asarray(MASK), jnp.asarray(VALUES), kl_coef=0.1)
    with pytest.raises(AssertionError):
        ppo_advantages(jnp.asarray(OUTCOME), jnp.asarray(MASK), jnp.zeros((2, 3)))


# ---------------------------------------------------------------------------- value loss
def test_clipped_value_loss_hand_computed():
    v = jnp.asarray([[1.0, 0.2, 123.0]])
    old = jnp.asarray([[0.0, 0.0, 0.0]])
    ret = jnp.asarray([[2.0, -1.0, -50.0]])
    mask = jnp.asarray([[1.0, 1.0, 0.0]])
    # token 0: (1 - 2)^2 = 1 vs clipped v = 0.5: (0.5 - 2)^2 = 2.25 -> 2.25 (clipped branch)
    # token 1: |0.2 - 0| < 0.5, both (0.2 + 1)^2 = 1.44 -> 1.44 (not clipped); token 2 is padding
    config = CriticConfig().value
    loss, m = critic_objective(v, old, ret, mask, config, 0.5)
    assert float(loss) == pytest.approx(0.5 * (2.25 + 1.44) / 2, abs=1e-6)
    assert float(m["vf_clipfrac"]) == pytest.approx(0.5)
    assert float(m["values_mean"]) == pytest.approx(0.6)
    loss1, _ = critic_objective(v, old, ret, mask, config, value_loss_coef=1.0)
    assert float(loss1) == pytest.approx((2.25 + 1.44) / 2, abs=1e-6)
    # With a mini-batch normaliser of 4 tokens this micro-batch contributes half the mean.
    loss4, _ = critic_objective(v, old, ret, mask, config, 0.5, total_tokens=jnp.float32(4))
    # The clip range comes from the ValueLossConfig: with 2.0 nothing is clipped.
    loss_wide, m_wide = critic_objective(v, old, ret, mask, dataclasses.replace(config, cliprange_value=2.0), 0.5)
    assert float(loss_wide) == pytest.approx(0.5 * (1.0 + 1.44) / 2, abs=1e-6) and float(m_wide["vf_clipfrac"]) == 0
    assert float(loss4) == pytest.approx(0.5 * (2.25 + 1.44) / 4, abs=1e-6)


def test_critic_config_validation_names_fields():
    for kwargs, field in [({"gamma": 1.5}, "gamma"), ({"lam": -0.1}, "lam"), ({"value_loss_coef": 0.0},
                          "value_loss_coef"), ({"value_head_init_std": -1.0}, "value_head_init_std"),
                          ({"optimizer": {"learning_rate": 1e-5}}, "optimizer")]:
        with pytest.raises(ValueError, match=field):
            CriticConfig(**kwargs)
    c = CriticConfig()
    assert c.optimizer.learning_rate == 1e-5 and c.value.cliprange_value == 0.5 and c.value_loss_coef == 0.5
    assert (c.gamma, c.lam, c.whiten_advantages) == (1.0, 1.0, True)


# ---------------------------------------------------------------------------- the value model
P, R = 5, 4


@pytest.fixture(scope="module")
def policy() -> CausalLM:
    return CausalLM(ModelConfig.tiny("qwen2"), rngs=nnx.Rngs(0))  # untied: has an lm_head the critic must drop


@pytest.fixture(scope="module")
def rows() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    prompt_lens, resp_lens = [5, 3, 2, 4], [4, 2, 1, 3]
    prompt_ids = np.zeros((4, P), np.int32)
    prompt_mask = np.zeros((4, P), np.int32)
    response_ids = np.zeros((4, R), np.int32)
    response_mask = np.zeros((4, R), np.int32)
    for i, (lp, lr) in enumerate(zip(prompt_lens, resp_lens)):
        prompt_ids[i, P - lp:] = rng.integers(3, 128, lp)
        prompt_mask[i, P - lp:] = 1
        response_ids[i, :lr] = rng.integers(3, 128, lr)
        response_mask[i, :lr] = 1
    return join_prompt_and_response(prompt_ids, prompt_mask, response_ids, response_mask)


def _config(**kw) -> CriticConfig:
    return CriticConfig(**{"value_head_init_std": 0.3, "optimizer": OptimizerConfig(learning_rate=1e-3), **kw})


def _minibatch(critic: Critic, rows: dict, num_micro: int, seed: int = 1) -> dict[str, np.ndarray]:
    old_values = critic.values(rows, micro_rows=4)
    returns = np.random.default_rng(seed).uniform(-1, 1, old_values.shape).astype(np.float32) * rows["response_mask"]
    batch = dict(rows, old_values=old_values, returns=returns)
    return {k: v.reshape((num_micro, v.shape[0] // num_micro) + v.shape[1:]) for k, v in batch.items()}


def test_values_align_with_the_state_before_each_response_token(policy, rows):
    critic = Critic(policy, _config())
    got = critic.values(rows, micro_rows=2)
    assert got.shape == (4, R) and got.dtype == np.float32
    head = critic.model().value_head
    w, b = np.asarray(head.kernel[...])[:, 0], float(np.asarray(head.bias[...])[0])
    assert np.abs(w).max() > 0
    # Independently: the POLICY's hidden states over each row re-laid out unpadded at the start (prompt tokens then
    # response tokens, right padding); response token j is sampled from the state after reading the prompt and
    # tokens < j, i.e. position len(prompt) + j - 1 there.
    n, width = rows["input_ids"].shape
    tokens, segments, lengths = np.zeros((n, width), np.int32), np.zeros((n, width), np.int32), []
    for i in range(n):
        prompt = rows["input_ids"][i, :P][rows["segment_ids"][i, :P] == 1]
        lr = int(rows["response_mask"][i].sum())
        row = np.concatenate([prompt, rows["response_ids"][i, :lr]])
        tokens[i, :len(row)], segments[i, :len(row)] = row, 1
        lengths.append((len(prompt), lr))
    hidden = jax.jit(lambda t, s: policy.hidden_states(t, jnp.broadcast_to(jnp.arange(width), t.shape), s)[0])(
        tokens, segments)
    for i, (lp, lr) in enumerate(lengths):
        expected = np.asarray(hidden[i, lp - 1:lp - 1 + lr]) @ w + b
        np.testing.assert_allclose(got[i, :lr], expected, atol=1e-5, rtol=1e-5)
        assert np.all(got[i, lr:] == 0)


def test_critic_starts_from_policy_weights_and_never_touches_them(policy, rows):
    before = {path_to_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(policy))}
    critic = Critic(policy, CriticConfig(), trainable_regex=r"^(layers/1/|final_norm/)")
    state = {path_to_str(p): x for part in (critic.params, critic.frozen)
             for p, x in jax.tree_util.tree_leaves_with_path(part)}
    backbone = {k[len("backbone/"):]: v for k, v in state.items() if k.startswith("backbone/")}
    assert set(backbone) == {k for k in before if not k.startswith("lm_head/")}, "same weights, LM head dropped"
    for k, v in backbone.items():
        np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)
    assert np.all(np.asarray(state["value_head/kernel"]) == 0), "default head init is zeros"
    trainable = {path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(critic.params)}
    assert trainable and all(k.startswith(("value_head/", "backbone/layers/1/", "backbone/final_norm/"))
                             for k in trainable)
    assert {"value_head/kernel", "value_head/bias"} <= trainable
    frozen_before = jax.tree.map(np.asarray, critic.frozen)
    for _ in range(2):  # the first step moves only the head (zero kernel); the second reaches the backbone
        metrics = critic.update(_minibatch(critic, rows, 1))
    assert np.isfinite(float(metrics["critic/vf_loss"])) and float(metrics["critic/grad_norm"]) > 0
    after = {path_to_str(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(critic.params)}
    assert not np.array_equal(after["backbone/layers/1/mlp/up_proj/kernel"], before["layers/1/mlp/up_proj/kernel"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, critic.frozen), frozen_before)
    # The policy's buffers were neither donated nor changed by the critic's updates.
    for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(policy)):
        np.testing.assert_array_equal(np.asarray(x), before[path_to_str(p)])


def test_micro_batch_accumulation_is_exact(policy, rows):
    results = []
    for num_micro in (1, 4):
        critic = Critic(policy, _config())
        metrics = jax.device_get(critic.update(_minibatch(critic, rows, num_micro)))
        results.append((jax.tree.map(np.asarray, critic.params), metrics))
    (p1, m1), (p4, m4) = results
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    for k in ("critic/vf_loss", "critic/vf_clipfrac", "critic/values_mean", "critic/grad_norm",
              "critic/vf_explained_var", "critic/returns_mean"):
        assert float(m1[k]) == pytest.approx(float(m4[k]), rel=1e-5, abs=1e-6), k
    assert float(m1["critic/vf_loss"]) > 0


def test_updates_reduce_value_loss_and_state_round_trips(policy, rows):
    critic = Critic(policy, _config())
    fixed = _minibatch(critic, rows, 4, seed=3)  # the accumulation test's shapes: no new compile
    losses = []
    for _ in range(12):
        mb = dict(fixed, old_values=critic.values(rows, micro_rows=4).reshape(fixed["returns"].shape))
        losses.append(float(critic.update(mb)["critic/vf_loss"]))
    assert losses[-1] < 0.3 * losses[0], losses
    restored = Critic(policy, _config(value_head_init_std=0.0))
    restored.load_train_state(jax.tree.map(jnp.copy, critic.train_state()))
    np.testing.assert_allclose(restored.values(rows, 4), critic.values(rows, 4), atol=1e-6)
    # Advantages from the holder use the config's gamma/lam/whitening.
    adv, ret = restored.advantages(OUTCOME, MASK, VALUES)
    ref_adv, ref_ret = ppo_advantages(jnp.asarray(OUTCOME), jnp.asarray(MASK), jnp.asarray(VALUES))
    np.testing.assert_allclose(adv, ref_adv, atol=1e-6)
    np.testing.assert_allclose(ret, ref_ret, atol=1e-6)
    with pytest.raises(KeyError, match="returns"):
        critic.update({k: v for k, v in fixed.items() if k != "returns"})


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        CriticConfig().gamma = 0.5  # type: ignore[misc]
