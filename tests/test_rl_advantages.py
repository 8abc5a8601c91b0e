"""GRPO group advantages, KL-in-reward scores, token rewards, GAE and masked whitening: hand-computed values and
loop references written from the definitions (veRL semantics)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toolrl_jax.rl.advantages import (
    broadcast_to_tokens,
    gae_advantages_and_returns,
    grpo_advantages,
    kl_penalized_scores,
    last_valid_index,
    token_level_rewards,
)
from toolrl_jax.rl.masked import masked_mean, masked_var, masked_whiten

NAN = float("nan")


def _grpo_reference(scores, group_ids, eps=1e-6):
    """Dictionary-of-groups loop (how the original code groups by prompt uid)."""
    by_group = {}
    for s, g in zip(scores, group_ids):
        by_group.setdefault(g, []).append(s)
    out = []
    for s, g in zip(scores, group_ids):
        vals = by_group[g]
        if len(vals) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        out.append((s - mean) / (std + eps))
    return np.array(out)


def test_grpo_hand_values():
    adv = np.asarray(grpo_advantages(jnp.array([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0, 0.0]), group_size=4))
    std = math.sqrt(5.0 / 3.0)  # unbiased std of 1,2,3,4
    expected = [-1.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0.5 / (std + 1e-6), 1.5 / (std + 1e-6), 0, 0, 0, 0]
    np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(adv[0], -1.161895, rtol=1e-5)  # -1.5 * sqrt(0.6)
    # group of two: 0, 1 -> mean .5, unbiased std sqrt(.5)
    adv2 = np.asarray(grpo_advantages(jnp.array([0.0, 1.0]), group_size=2))
    np.testing.assert_allclose(adv2, [-0.5 / (math.sqrt(0.5) + 1e-6), 0.5 / (math.sqrt(0.5) + 1e-6)], rtol=1e-6)


def test_grpo_group_of_one_is_identity_and_matches_reference():
    scores = np.array([0.3, -2.0, 1.5], np.float32)
    np.testing.assert_allclose(np.asarray(grpo_advantages(jnp.asarray(scores), 1)), scores)
    rng = np.random.default_rng(0)
    scores = rng.normal(size=12).astype(np.float32)
    got = np.asarray(grpo_advantages(jnp.asarray(scores), 3))
    np.testing.assert_allclose(got, _grpo_reference(scores, np.repeat(np.arange(4), 3)), rtol=1e-5, atol=1e-6)
    no_std = np.asarray(grpo_advantages(jnp.asarray(scores), 3, normalize_by_std=False))
    np.testing.assert_allclose(no_std, scores - np.repeat(scores.reshape(4, 3).mean(1), 3), rtol=1e-5, atol=1e-6)


def test_grpo_rejects_bad_group_size():
    with pytest.raises(ValueError, match="groups of 4"):
        grpo_advantages(jnp.zeros(6), 4)


def test_kl_penalized_scores_ignores_padding():
    rewards = jnp.array([1.0, 0.0])
    old = jnp.array([[-1.0, -2.0, NAN], [-0.5, -0.5, -0.5]])
    ref = jnp.array([[-1.5, -1.0, 7.0], [-1.0, -0.25, -0.5]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    # row 0: kl sum = (0.5) + (-1.0) = -0.5 -> 1 - 0.1*(-0.5) = 1.05 ; row 1: 0.5 - 0.25 + 0 = 0.25 -> -0.025
    got = np.asarray(kl_penalized_scores(rewards, old, ref, mask, beta=0.1))
    np.testing.assert_allclose(got, [1.05, -0.025], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(kl_penalized_scores(rewards, old, ref, mask, beta=0.0)), [1.0, 0.0])


def test_broadcast_and_token_rewards():
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(last_valid_index(mask)), [1, 2, -1])
    np.testing.assert_allclose(np.asarray(broadcast_to_tokens(jnp.array([2.0, -1.0, 5.0]), mask)),
                               [[2, 2, 0], [-1, -1, -1], [0, 0, 0]])
    rewards = np.asarray(token_level_rewards(jnp.array([1.0, 2.0, 3.0]), mask))
    np.testing.assert_allclose(rewards, [[0, 1, 0], [0, 0, 2], [0, 0, 0]])
    kl = jnp.array([[0.5, 1.0, NAN], [1.0, 0.0, 2.0], [9.0, 9.0, 9.0]])
    rewards = np.asarray(token_level_rewards(jnp.array([1.0, 2.0, 3.0]), mask, kl=kl, kl_coef=0.1))
    np.testing.assert_allclose(rewards, [[-0.05, 0.9, 0], [-0.1, 0, 1.8], [0, 0, 0]], rtol=1e-6, atol=1e-7)


def test_gae_hand_values():
    r = jnp.array([[0.0, 0.0, 1.0]])
    v = jnp.array([[0.5, 0.2, 0.7]])
    m = jnp.ones((1, 3))
    adv, ret = gae_advantages_and_returns(r, v, m, gamma=1.0, lam=1.0, whiten=False)
    np.testing.assert_allclose(np.asarray(ret), [[1.0, 1.0, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adv), [[0.5, 0.8, 0.3]], rtol=1e-6)
    # gamma .9, lambda .5 by hand: A2 = .3, A1 = .43 + .45*.3, A0 = -.32 + .45*A1
    adv, ret = gae_advantages_and_returns(r, v, m, gamma=0.9, lam=0.5, whiten=False)
    np.testing.assert_allclose(np.asarray(adv), [[-0.06575, 0.565, 0.3]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ret), [[0.43425, 0.765, 1.0]], rtol=1e-5)


def _gae_reference(r, v, m, gamma, lam):
    """Loop over valid tokens only (padding skipped), per row."""
    adv = np.zeros_like(r)
    for i in range(r.shape[0]):
        next_v, next_a = 0.0, 0.0
        for t in reversed(range(r.shape[1])):
            if not m[i, t]:
                continue
            delta = r[i, t] + gamma * next_v - v[i, t]
            next_a = delta + gamma * lam * next_a
            adv[i, t] = next_a
            next_v = v[i, t]
    return adv, np.where(m > 0, adv + v, 0.0)


def test_gae_masking_is_exact_and_matches_reference():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(4, 6)).astype(np.float32)
    v = rng.normal(size=(4, 6)).astype(np.float32)
    m = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], np.float32)
    adv, ret = gae_advantages_and_returns(jnp.asarray(r), jnp.asarray(v), jnp.asarray(m), 0.95, 0.9, whiten=False)
    ref_adv, ref_ret = _gae_reference(r, v, m, 0.95, 0.9)
    np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ret), ref_ret, rtol=1e-5, atol=1e-6)
    # garbage (even NaN) at padded positions changes nothing
    v_bad = np.where(m > 0, v, np.nan).astype(np.float32)
    r_bad = np.where(m > 0, r, 1e6).astype(np.float32)
    adv2, ret2 = gae_advantages_and_returns(jnp.asarray(r_bad), jnp.asarray(v_bad), jnp.asarray(m), 0.95, 0.9,
                                            whiten=False)
    np.testing.assert_array_equal(np.asarray(adv2), np.asarray(adv))
    np.testing.assert_array_equal(np.asarray(ret2), np.asarray(ret))
    # a right-padded row equals the same row without padding
    short, _ = gae_advantages_and_returns(jnp.asarray(r[1:2, :3]), jnp.asarray(v[1:2, :3]), jnp.ones((1, 3)),
                                          0.95, 0.9, whiten=False)
    np.testing.assert_allclose(np.asarray(adv)[1, :3], np.asarray(short)[0], rtol=1e-6)


def test_gae_whitening_over_valid_tokens():
    rng = np.random.default_rng(2)
    r = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    m = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    raw, ret = gae_advantages_and_returns(r, v, m, whiten=False)
    white, ret_w = gae_advantages_and_returns(r, v, m, whiten=True)
    np.testing.assert_array_equal(np.asarray(ret), np.asarray(ret_w))  # returns are never whitened
    vals = np.asarray(raw)[np.asarray(m) > 0]
    expected = (vals - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(np.asarray(white)[np.asarray(m) > 0], expected, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(white)[np.asarray(m) == 0] == 0)


def test_masked_stats_hand_values():
    x = jnp.array([[1.0, 2.0, 3.0, 100.0]])
    m = jnp.array([[1, 1, 1, 0]])
    assert float(masked_mean(x, m)) == pytest.approx(2.0)
    assert float(masked_var(x, m)) == pytest.approx(1.0)  # unbiased: (1 + 0 + 1) / 2
    assert float(masked_var(x, m, unbiased=False)) == pytest.approx(2.0 / 3.0)
    np.testing.assert_allclose(np.asarray(masked_whiten(x, m)), [[-1.0, 0.0, 1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(masked_whiten(x, m, shift_mean=False)), [[1.0, 2.0, 3.0, 0.0]], atol=1e-6)
    assert float(masked_mean(x, jnp.zeros_like(m))) == 0.0


def test_grpo_pipeline_jits():
    """KL-folded scores -> group advantages -> per-token advantages, under jit."""

    @jax.jit
    def pipeline(rewards, old, ref, mask):
        scores = kl_penalized_scores(rewards, old, ref, mask, beta=0.001)
        return broadcast_to_tokens(grpo_advantages(scores, 2), mask)

    mask = jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 1, 1]])
    old = jnp.zeros((4, 3))
    out = np.asarray(pipeline(jnp.array([1.0, 0.0, 0.5, 0.5]), old, old, mask))
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    np.testing.assert_allclose(out, [[a, a, 0], [-a, 0, 0], [0, 0, 0], [0, 0, 0]], rtol=1e-6)
