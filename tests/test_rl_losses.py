"""Token log-probs/entropy, PPO-clip policy loss, KL estimators, value loss, and exact gradient accumulation."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toolrl_jax.rl.losses import (
    aggregate,
    kl_estimate,
    policy_loss,
    token_logprobs_and_entropy,
    value_loss,
)
from toolrl_jax.rl.ppo import PolicyLossConfig, ValueLossConfig, actor_loss, count_normalizers, critic_loss
from toolrl_jax.training.sequences import map_position_chunks

LN = math.log
NAN = float("nan")


# ------------------------------------------------------------------ log-probs and entropy

def test_logprob_entropy_hand_values():
    logits = jnp.array([[[0.0, LN(3.0)], [0.0, -jnp.inf]]])  # probs (.25, .75) and (1, 0)
    logp, ent = token_logprobs_and_entropy(logits, jnp.array([[1, 0]]), masked_vocab=True)
    assert np.isnan(np.asarray(token_logprobs_and_entropy(logits, jnp.array([[1, 0]]))[1])[0, 1])  # unguarded
    np.testing.assert_allclose(np.asarray(logp), [[LN(0.75), 0.0]], rtol=1e-6, atol=1e-7)
    h = -(0.25 * LN(0.25) + 0.75 * LN(0.75))
    np.testing.assert_allclose(np.asarray(ent), [[h, 0.0]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(token_logprobs_and_entropy(jnp.zeros((4,)), jnp.array(0))[1]), LN(4.0),
                               rtol=1e-6)


def _numpy_logp_entropy(logits, targets):
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logz = np.log(np.exp(x).sum(-1, keepdims=True))
    logsm = x - logz
    logp = np.take_along_axis(logsm, targets[..., None], -1)[..., 0]
    return logp, -(np.exp(logsm) * logsm).sum(-1)


def _chunked(logits, targets, chunk):
    """The log-probs of `token_logprobs_and_entropy` computed `chunk` positions at a time, as training does."""
    return map_position_chunks(token_logprobs_and_entropy, logits, targets, chunk)


@pytest.mark.parametrize("chunk", [None, 3, 7, 100])
def test_logprobs_chunked_match_reference(chunk):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 7, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, size=(2, 7))
    logp, ent = _chunked(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32), jnp.asarray(targets), chunk)
    ref_logp, ref_ent = _numpy_logp_entropy(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), targets)
    np.testing.assert_allclose(np.asarray(logp), ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), ref_ent, rtol=1e-5, atol=1e-5)
    # bf16 logits are upcast before the softmax
    logp16, _ = _chunked(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), chunk)
    assert logp16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logp16), ref_logp, rtol=1e-5, atol=1e-5)


def test_from_hidden_chunked_matches_dense_values_and_grads():
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 5, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 9)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 9, size=(2, 5)))

    def objective(w, chunk):
        logp, ent = map_position_chunks(lambda h, t: token_logprobs_and_entropy(h @ w, t), hidden, targets, chunk)
        return jnp.sum(logp) + 0.3 * jnp.sum(ent)

    dense_v, dense_g = jax.value_and_grad(objective)(w, None)
    chunk_v, chunk_g = jax.jit(jax.value_and_grad(objective), static_argnums=1)(w, 2)
    np.testing.assert_allclose(float(chunk_v), float(dense_v), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(chunk_g), np.asarray(dense_g), rtol=1e-5, atol=1e-6)
    logp_ref, _ = token_logprobs_and_entropy(hidden @ w, targets)
    logp, _ = map_position_chunks(lambda h, t: token_logprobs_and_entropy(h @ w, t), hidden, targets, 2)
    np.testing.assert_allclose(np.asarray(logp), np.asarray(logp_ref), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ policy loss

# five valid tokens (two rows) + one padded token holding NaN; hand-worked per-token losses with clip .2:
#   A=+1 r=1.5 -> max(-1.5, -1.2) = -1.2 (clipped)   A=-1 r=.5 -> max(.5, .8) = .8 (clipped)
#   A=+1 r=1.1 -> -1.1                                A=-2 r=1.5 -> max(3.0, 2.4) = 3.0
#   A=+2 r=.5  -> max(-1.0, -1.6) = -1.0
RATIOS = [[1.5, 0.5, 1.1], [1.5, 0.5, 1.0]]
ADVS = [[1.0, -1.0, 1.0], [-2.0, 2.0, NAN]]
MASK = [[1, 1, 1], [1, 1, 0]]


def _policy_inputs():
    old = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, NAN]])
    logp = old + jnp.log(jnp.array(RATIOS))
    return logp, old, jnp.array(ADVS), jnp.array(MASK)


def test_policy_loss_hand_values():
    logp, old, adv, mask = _policy_inputs()
    loss, metrics = policy_loss(logp, old, adv, mask)
    assert float(loss) == pytest.approx((-1.2 + 0.8 - 1.1 + 3.0 - 1.0) / 5, rel=1e-5)
    assert float(metrics["clipfrac"]) == pytest.approx(2 / 5)
    approx_kl = -(LN(1.5) + LN(0.5) + LN(1.1) + LN(1.5) + LN(0.5)) / 5
    assert float(metrics["approx_kl"]) == pytest.approx(approx_kl, rel=1e-5)
    assert float(metrics["clipfrac_dual"]) == 0.0
    # sequence mean of token means: row 0 (-1.2 + .8 - 1.1)/3 = -.5, row 1 (3 - 1)/2 = 1 -> .25
    loss_seq, _ = policy_loss(logp, old, adv, mask, agg_mode="seq-mean-token-mean")
    assert float(loss_seq) == pytest.approx(0.25, rel=1e-5)


def test_policy_loss_clip_higher_and_dual_clip():
    logp, old, adv, mask = _policy_inputs()
    loss, _ = policy_loss(logp, old, adv, mask, clip_eps_high=0.28)  # first token: clip(1.5) = 1.28
    assert float(loss) == pytest.approx((-1.28 + 0.8 - 1.1 + 3.0 - 1.0) / 5, rel=1e-5)
    # dual clip c=3: A=-2 r=1.5 gives 3.0 <= 6 (unchanged); add A=-1 r=5 -> max(5, 1.2) = 5 -> bounded to 3
    logp2 = jnp.log(jnp.array([[1.5, 5.0]]))
    adv2 = jnp.array([[-2.0, -1.0]])
    loss2, m2 = policy_loss(logp2, jnp.zeros((1, 2)), adv2, jnp.ones((1, 2)), dual_clip_c=3.0)
    assert float(loss2) == pytest.approx((3.0 + 3.0) / 2, rel=1e-5)
    assert float(m2["clipfrac_dual"]) == pytest.approx(0.5)
    loss3, _ = policy_loss(logp2, jnp.zeros((1, 2)), adv2, jnp.ones((1, 2)))
    assert float(loss3) == pytest.approx((3.0 + 5.0) / 2, rel=1e-5)


def test_policy_gradient_on_policy_is_minus_advantage():
    """At ratio 1, d loss / d logp_t = -A_t / num_tokens on valid tokens and 0 on padding."""
    old = jnp.array([[-1.0, -2.0, -3.0]])
    adv = jnp.array([[0.5, -1.5, 7.0]])
    mask = jnp.array([[1, 1, 0]])
    g = jax.grad(lambda lp: policy_loss(lp, old, adv, mask)[0])(old)
    np.testing.assert_allclose(np.asarray(g), [[-0.25, 0.75, 0.0]], rtol=1e-6)


# ------------------------------------------------------------------ KL and value loss

def test_kl_estimators_hand_values():
    logp, ref = jnp.array([LN(0.5)]), jnp.array([LN(0.25)])
    assert float(kl_estimate(logp, ref, "k1")[0]) == pytest.approx(LN(2.0), rel=1e-6)
    assert float(kl_estimate(logp, ref, "k2")[0]) == pytest.approx(0.5 * LN(2.0) ** 2, rel=1e-6)
    assert float(kl_estimate(logp, ref, "k3")[0]) == pytest.approx(0.5 + LN(2.0) - 1.0, rel=1e-5)
    assert float(kl_estimate(ref, logp, "abs")[0]) == pytest.approx(LN(2.0), rel=1e-6)
    # k3 clamps: d = ref - logp = -50 -> clipped to -20 -> exp(-20) + 19 -> clamped to 10
    assert float(kl_estimate(jnp.array([0.0]), jnp.array([-50.0]), "k3")[0]) == pytest.approx(10.0)
    assert float(kl_estimate(jnp.array([0.0]), jnp.array([0.0]), "k3")[0]) == 0.0
    with pytest.raises(ValueError, match="unknown KL"):
        kl_estimate(logp, ref, "k4")


def test_value_loss_hand_values():
    # (v, old, R): (1, .2, .5): v_clip .7, losses .25 vs .04 -> .25 ; (1, .2, 1.5): .25 vs .64 -> .64 (clipped)
    # (.3, .2, 0): both .09 ; fourth token padded with NaN
    v = jnp.array([[1.0, 1.0, 0.3, NAN]])
    old = jnp.array([[0.2, 0.2, 0.2, 0.0]])
    ret = jnp.array([[0.5, 1.5, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    loss, metrics = value_loss(v, old, ret, mask, cliprange_value=0.5)
    assert float(loss) == pytest.approx(0.5 * (0.25 + 0.64 + 0.09) / 3, rel=1e-5)
    assert float(metrics["vf_clipfrac"]) == pytest.approx(1 / 3)
    assert float(metrics["vpred_mean"]) == pytest.approx(2.3 / 3, rel=1e-5)
    closs, cm = critic_loss(v, old, ret, mask, ValueLossConfig())
    assert float(closs) == pytest.approx(float(loss)) and float(cm["vf_loss"]) == pytest.approx(float(loss))


def test_aggregate_modes_and_errors():
    x = jnp.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    m = jnp.array([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert float(aggregate(x, m)) == pytest.approx(10 / 4)
    assert float(aggregate(x, m, "seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate(x, m, total_tokens=jnp.array(8.0))) == pytest.approx(10 / 8)
    # token sums per sequence 6 and 4 (the third row has no valid token and does not count as a sequence)
    assert float(aggregate(x, m, "seq-mean-token-sum")) == pytest.approx((6 + 4) / 2)
    assert float(aggregate(x, m, "seq-mean-token-sum", total_sequences=jnp.array(5.0))) == pytest.approx(10 / 5)
    # Dr. GRPO: each sequence's token sum over a constant (the response budget), then the mean over sequences
    assert float(aggregate(x, m, "seq-mean-token-sum-norm", norm_length=10)) == pytest.approx((6 / 10 + 4 / 10) / 2)
    assert float(aggregate(x, m, "seq-mean-token-sum-norm")) == pytest.approx((6 / 3 + 4 / 3) / 2)  # T = 3
    # verl: this call's own token mean over the accumulation divisor; global counts are ignored on purpose
    assert float(aggregate(x, m, "verl")) == pytest.approx(10 / 4)
    assert float(aggregate(x, m, "verl", total_tokens=jnp.array(8.0), accumulation_divisor=jnp.array(2.0))) \
        == pytest.approx(10 / 4 / 2)
    with pytest.raises(ValueError, match="aggregation mode"):
        aggregate(x, m, "token-sum")


# ------------------------------------------------------------------ actor loss and accumulation

def test_actor_loss_composition_and_config_checks():
    logp, old, adv, mask = _policy_inputs()
    ent = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])
    ref = old - 0.1
    cfg = PolicyLossConfig(entropy_coef=0.01, kl_loss_coef=0.5, kl_loss_type="k1")
    loss, metrics = actor_loss(logp, ent, old, adv, mask, cfg, ref_logp=ref)
    pg = (-1.2 + 0.8 - 1.1 + 3.0 - 1.0) / 5
    kl = float(aggregate(logp - ref, mask))
    assert float(loss) == pytest.approx(pg - 0.01 * 3.0 + 0.5 * kl, rel=1e-5)
    assert float(metrics["entropy"]) == pytest.approx(3.0)
    assert float(metrics["kl_loss"]) == pytest.approx(kl, rel=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        actor_loss(logp, ent, old, adv, mask, cfg)
    for bad in (dict(clip_eps=0.0), dict(dual_clip_c=1.0), dict(kl_loss_type="x"), dict(agg_mode="x")):
        with pytest.raises(ValueError, match="PolicyLossConfig"):
            PolicyLossConfig(**bad)


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                      "seq-mean-token-sum-norm"])
def test_micro_batch_accumulation_is_exact(agg_mode):
    """Sum over k micro-batches of (loss with global normalizers) == full-batch loss, for values and gradients."""
    rng = np.random.default_rng(3)
    b, t, h, v = 6, 5, 4, 7
    hidden = jnp.asarray(rng.normal(size=(b, t, h)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(h, v)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)))
    lengths = np.array([5, 1, 3, 4, 2, 5])  # per-row valid tokens  # uneven micro-batch token counts
    mask = jnp.asarray(np.arange(t)[None, :] < lengths[:, None], jnp.int32)
    old = jnp.asarray(rng.normal(size=(b, t)) * 0.1 - 2.0, jnp.float32)
    ref = old + jnp.asarray(rng.normal(size=(b, t)) * 0.1, jnp.float32)
    adv = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)
    cfg = PolicyLossConfig(kl_loss_coef=0.1, agg_mode=agg_mode, entropy_coef=0.01)

    def loss_fn(w, rows, totals):
        logp, ent = token_logprobs_and_entropy(hidden[rows] @ w, targets[rows])
        loss, metrics = actor_loss(logp, ent, old[rows], adv[rows], mask[rows], cfg,
                                   ref_logp=ref[rows], **totals)
        return loss, metrics

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (full_loss, full_metrics), full_grad = grad_fn(w, np.arange(b), {})
    totals = count_normalizers(mask, norm_length=t if agg_mode == "seq-mean-token-sum-norm" else None)
    acc_loss, acc_grad, acc_clip = 0.0, jnp.zeros_like(w), 0.0
    micro_batches = (np.array([0, 1]), np.array([2, 3]), np.array([4, 5]))  # 6, 7 and 7 valid tokens
    for rows in micro_batches:
        (l, m), g = grad_fn(w, rows, totals)
        acc_loss, acc_grad, acc_clip = acc_loss + l, acc_grad + g, acc_clip + m["clipfrac"]
    np.testing.assert_allclose(float(acc_loss), float(full_loss), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(acc_grad), np.asarray(full_grad), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(acc_clip), float(full_metrics["clipfrac"]), rtol=1e-5, atol=1e-7)
    # in token-mean mode the naive alternative (averaging micro-batch means) is measurably different here
    if agg_mode != "token-mean":
        return
    naive = np.mean([float(grad_fn(w, r, {})[0][0]) for r in micro_batches])
    assert abs(naive - float(full_loss)) > 1e-4


def test_verl_aggregation_reproduces_the_original_gradient_scale():
    """The original trainer (veRL 0.1 dp_actor.update_policy) backpropagates, per micro-batch, that micro-batch's
    token-mean loss divided by the gradient-accumulation count. Accumulating the "verl" mode over micro-batches
    gives exactly that sum, by hand from token-mean losses of each micro-batch alone, in value and gradient; it
    differs from the global token mean when micro-batches hold different token counts, and scales with the divisor
    (which is what gradient clipping sees)."""
    rng = np.random.default_rng(5)
    b, t, h, v = 6, 5, 4, 7
    hidden = jnp.asarray(rng.normal(size=(b, t, h)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(h, v)) * 0.5, jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, size=(b, t)))
    mask = jnp.asarray(np.arange(t)[None, :] < np.array([5, 1, 3, 4, 2, 5])[:, None], jnp.int32)
    old = jnp.asarray(rng.normal(size=(b, t)) * 0.1 - 2.0, jnp.float32)
    adv = jnp.asarray(rng.normal(size=(b, t)), jnp.float32)

    def loss_fn(w, rows, cfg, totals):
        logp, ent = token_logprobs_and_entropy(hidden[rows] @ w, targets[rows])
        return actor_loss(logp, ent, old[rows], adv[rows], mask[rows], cfg, **totals)[0]

    grad_fn = jax.jit(jax.value_and_grad(loss_fn), static_argnums=2)
    micro_batches = (np.array([0, 1]), np.array([2, 3]), np.array([4, 5]))  # 6, 7 and 7 valid tokens
    token_mean = PolicyLossConfig(entropy_coef=0.01)
    for divisor in (3, 2):  # the number of micro-batches, or the original recipe's smaller count
        verl = PolicyLossConfig(entropy_coef=0.01, agg_mode="verl", accumulation_divisor=divisor)
        totals = count_normalizers(mask, accumulation_divisor=divisor)
        acc_loss, acc_grad, hand_loss, hand_grad = 0.0, 0.0, 0.0, 0.0
        for rows in micro_batches:
            l, g = grad_fn(w, rows, verl, totals)
            acc_loss, acc_grad = acc_loss + l, acc_grad + g
            l, g = grad_fn(w, rows, token_mean, {})  # that micro-batch's own token mean
            hand_loss, hand_grad = hand_loss + l / divisor, hand_grad + g / divisor
        np.testing.assert_allclose(float(acc_loss), float(hand_loss), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(acc_grad), np.asarray(hand_grad), rtol=1e-5, atol=1e-7)
    global_loss = float(grad_fn(w, np.arange(b), token_mean, {})[0])
    assert abs(float(acc_loss) * 2 / 3 - global_loss) > 1e-4  # divisor 3 != the global token mean here
