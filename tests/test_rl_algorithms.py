"""Algorithms beyond GRPO (issue 19), as pure functions checked against hand-computed values: DAPO's overlong penalty
and dynamic-sampling group choice, GSPO's sequence ratios, RLOO, REINFORCE++, truncated importance sampling, the
sampler/trainer mismatch, per-component normalisation; the reward's additive parts; the options' validation (errors
name the flags) and the presets."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags

from experiments.config_flags import define_config_flags, name_flags
from tests.conftest import REPO_ROOT
from tests.test_reward_functions import GT, RESPONSES
from toolrl_jax.rewards.functions import CombinedReward, RewardResult, RewardTerm, toolrl_reward
from toolrl_jax.rl.advantages import (
    grpo_advantages,
    per_component_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
)
from toolrl_jax.rl.losses import importance_log_ratio, policy_loss, truncated_is_weights
from toolrl_jax.rl.ppo import PolicyLossConfig
from toolrl_jax.rl.shaping import overlong_penalty
from toolrl_jax.training.dynamic_sampling import choose_groups, informative_groups, trained_groups
from toolrl_jax.training.grpo import GRPOConfig
from toolrl_jax.training.presets import apply_algorithm_preset
from toolrl_jax.training.reward_shaping import advantage_signal, check_component_weights, reward_parts, shape_rewards
from toolrl_jax.training.step_metrics import logp_mismatch
from toolrl_jax.training.update_rows import loss_mask_rows

NAN = float("nan")


# ------------------------------------------------------------------------------------------------ DAPO


def test_overlong_penalty_hand_values():
    """DAPO eq. 13 with L_max = 10, L_cache = 4: free up to 6 tokens, then -1/4 per token, -1 at the budget."""
    lengths = np.array([3, 6, 7, 8, 10, 12])
    np.testing.assert_array_equal(overlong_penalty(lengths, 10, 4), [0, 0, -0.25, -0.5, -1, -1])
    np.testing.assert_array_equal(overlong_penalty(lengths, 10, 4, factor=0.5), [0, 0, -0.125, -0.25, -0.5, -0.5])
    np.testing.assert_array_equal(overlong_penalty(np.array([0, 1]), 1, 1), [0, -1])  # the whole budget is buffer
    for bad in (0, 11):
        with pytest.raises(ValueError, match="buffer"):
            overlong_penalty(lengths, 10, bad)


def test_informative_groups_and_the_groups_a_step_trains_on():
    # groups of 2: (1, 1) flat, (0, 1) informative, (2, 2) flat in the total but not in a second column
    signal = np.array([[1.0, 1.0, 0.0, 1.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0, 0.0, 3.0]])
    np.testing.assert_array_equal(informative_groups(signal[:1], 2), [False, True, False])
    np.testing.assert_array_equal(informative_groups(signal, 2), [False, True, True])
    # enough informative groups: the first ones in draw order, none filled
    chosen, filler = choose_groups(np.array([False, True, False, True, True]), 2)
    np.testing.assert_array_equal(chosen, [1, 3])
    np.testing.assert_array_equal(filler, [False, False])
    # too few: the earliest uninformative groups fill the batch, in draw order
    chosen, filler = choose_groups(np.array([False, True, False, False]), 3)
    np.testing.assert_array_equal(chosen, [0, 1, 2])
    np.testing.assert_array_equal(filler, [True, False, True])


def test_trained_groups_name_their_prompts_across_the_batches_drawn():
    batch = type("Batch", (), {})
    first, second = batch(), batch()
    first.indices, first.ground_truths = np.array([7, 3]), ["a", "b"]
    second.indices, second.ground_truths = np.array([5, 1]), ["c", "d"]
    picked = trained_groups([first, second], np.array([1, 2]))
    np.testing.assert_array_equal(picked.indices, [3, 5])
    assert picked.ground_truths == ["b", "c"]


def test_loss_mask_drops_truncated_responses_and_filler_groups():
    samples = type("Samples", (), {"stopped": np.array([True, False, True, True])})()
    rollout = type("Rollout", (), {"samples": samples, "mask": np.array([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]],
                                                                         np.float32)})()
    config = GRPOConfig(group_size=2, prompts_per_step=2, mini_batch_prompts=2, micro_batch_rows=2)
    assert loss_mask_rows(rollout, config) is None
    assert loss_mask_rows(rollout, config, filler=np.array([False, False])) is None
    truncated = loss_mask_rows(rollout, dataclasses.replace(config, mask_truncated=True))
    np.testing.assert_array_equal(truncated, [[1, 1, 0], [0, 0, 0], [1, 0, 0], [1, 1, 1]])
    both = loss_mask_rows(rollout, dataclasses.replace(config, mask_truncated=True), filler=np.array([False, True]))
    np.testing.assert_array_equal(both, [[1, 1, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]])


# ------------------------------------------------------------------------------------------------ GSPO


def _gspo_inputs():
    """Row 0: log-ratios 0.1, 0.2, 0.3 (mean 0.2); row 1: 0.05, -0.05 and a padded NaN (mean 0)."""
    old = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, NAN]])
    logp = old + jnp.array([[0.1, 0.2, 0.3], [0.05, -0.05, 0.0]])
    return logp, old, jnp.array([[1, 1, 1], [1, 1, 0]])


def test_sequence_importance_ratio_hand_values():
    logp, old, mask = _gspo_inputs()
    seq = np.asarray(importance_log_ratio(logp, old, mask, "sequence"))
    np.testing.assert_allclose(seq[0], [0.2] * 3, rtol=1e-5)
    np.testing.assert_allclose(seq[1, :2], [0.0, 0.0], atol=1e-6)
    # GSPO-token: the same value
    np.testing.assert_allclose(np.asarray(importance_log_ratio(logp, old, mask, "sequence_token"))[:, :2],
                               seq[:, :2], atol=1e-6)
    np.testing.assert_allclose(np.asarray(importance_log_ratio(logp, old, mask))[0], [0.1, 0.2, 0.3], rtol=1e-5)
    with pytest.raises(ValueError, match="importance sampling level"):
        importance_log_ratio(logp, old, mask, "segment")


def test_gspo_loss_clips_whole_sequences_hand_values():
    """eps 0.15: row 0's sequence ratio e^0.2 = 1.2214 > 1.15 is clipped on every token (A = +1: -1.15 each), row 1's
    ratio 1 is not (A = -1: 1.0 each), though row 0's first token alone (e^0.1) is inside the range."""
    logp, old, mask = _gspo_inputs()
    adv = jnp.array([[1.0, 1.0, 1.0], [-1.0, -1.0, NAN]])
    loss, metrics = policy_loss(logp, old, adv, mask, clip_eps=0.15, importance_sampling_level="sequence",
                                agg_mode="seq-mean-token-mean")
    assert float(loss) == pytest.approx((-1.15 + 1.0) / 2, rel=1e-5)
    assert float(metrics["clipfrac"]) == pytest.approx(3 / 5)
    token_mean, _ = policy_loss(logp, old, adv, mask, clip_eps=0.15, importance_sampling_level="sequence")
    assert float(token_mean) == pytest.approx((3 * -1.15 + 2 * 1.0) / 5, rel=1e-5)
    token_level, _ = policy_loss(logp, old, adv, mask, clip_eps=0.15)  # per token: e^0.1 = 1.1052 is not clipped
    assert float(token_level) == pytest.approx((-math.exp(0.1) - 1.15 - 1.15 + math.exp(0.05) + math.exp(-0.05)) / 5,
                                               rel=1e-5)


def test_gspo_and_gspo_token_gradients_hand_values():
    """Row 1 (s = 1, unclipped) under seq-mean-token-mean over 2 sequences: with one advantage A = -1 per sequence both
    give d loss / d logp_t = (1/2) (1/2) s = 0.25 (the paper's equivalence); with token advantages (-1, -3) the
    sequence ratio spreads their mean, (1/4) * 4 s / 2 = 0.5 on each token, while GSPO-token keeps each token's
    own: (1/4) * (1, 3) = (0.25, 0.75). Row 0 is clipped: no gradient."""
    logp, old, mask = _gspo_inputs()

    def grad(level, adv):
        return np.asarray(jax.grad(lambda lp: policy_loss(lp, old, adv, mask, clip_eps=0.15, agg_mode=(
            "seq-mean-token-mean"), importance_sampling_level=level)[0])(logp))

    per_sequence = jnp.array([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])
    for level in ("sequence", "sequence_token"):
        np.testing.assert_allclose(grad(level, per_sequence)[:, :2], [[0, 0], [0.25, 0.25]], atol=1e-6)
    per_token = jnp.array([[1.0, 1.0, 1.0], [-1.0, -3.0, 0.0]])
    np.testing.assert_allclose(grad("sequence", per_token)[1, :2], [0.5, 0.5], rtol=1e-5)
    np.testing.assert_allclose(grad("sequence_token", per_token)[1, :2], [0.25, 0.75], rtol=1e-5)


# ------------------------------------------------------------------------------------------------ RLOO, REINFORCE++


def test_rloo_hand_values():
    """Each score minus the mean of its group's others: (1, 2, 3, 4) -> 1 - 3, 2 - 8/3, 3 - 7/3, 4 - 2."""
    adv = np.asarray(rloo_advantages(jnp.array([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0, 1.0]), 4))
    np.testing.assert_allclose(adv, [-2, -2 / 3, 2 / 3, 2, -2 / 3, -2 / 3, 2 / 3, 2 / 3], rtol=1e-6)
    # = G / (G - 1) times the group-centred score (the mean-centred GRPO advantage)
    centred = np.asarray(grpo_advantages(jnp.array([1.0, 2.0, 3.0, 4.0]), 4, normalize_by_std=False))
    np.testing.assert_allclose(adv[:4], centred * 4 / 3, rtol=1e-6)
    with pytest.raises(ValueError, match="groups of >= 2"):
        rloo_advantages(jnp.array([1.0, 2.0]), 1)


def test_reinforce_plus_plus_hand_values():
    """Token rewards: the outcome on the last token, -0.5 * KL on each; gamma 0.5:
    row 0 (outcome 1, KL .1 .2 .3): r = -.05, -.1, .85 -> returns .1125, .325, .85
    row 1 (outcome -1, KL .4 .5, padded): r = -.2, -1.25 -> returns -.825, -1.25; then whitened over the 5 tokens."""
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    kl = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, NAN]])
    adv, returns = reinforce_plus_plus_advantages(jnp.array([1.0, -1.0]), mask, kl, kl_coef=0.5, gamma=0.5)
    hand = np.array([0.1125, 0.325, 0.85, -0.825, -1.25])
    np.testing.assert_allclose(np.asarray(returns)[np.asarray(mask, bool)], hand, rtol=1e-5)
    whitened = (hand - hand.mean()) / math.sqrt(hand.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(np.asarray(adv)[np.asarray(mask, bool)], whitened, rtol=1e-5)
    assert float(adv[1, 2]) == 0.0 and float(returns[1, 2]) == 0.0
    # gamma 1 without KL: every token's return is the outcome
    _, plain = reinforce_plus_plus_advantages(jnp.array([1.0, -1.0]), mask)
    np.testing.assert_allclose(np.asarray(plain), [[1, 1, 1], [-1, -1, 0]])


# ------------------------------------------------------------------------------------------------ per component


def test_per_component_normalisation_hand_values():
    """Groups of 2; format (1, 0 | 0, 1), correctness (3, -3 | 3, -3). Per component each part is +-1/sqrt(2) within
    its group: group 1 agrees (+-sqrt 2), group 2 disagrees (0, 0). Normalising the total (4, -3 | 3, -2) instead
    gives +-1/sqrt(2) in both: correctness's larger range decides."""
    components = jnp.array([[1.0, 0.0, 0.0, 1.0], [3.0, -3.0, 3.0, -3.0]])
    h = 0.5 / (math.sqrt(0.5) + 1e-6)  # (x - mean) / (std + eps) for a pair one apart
    np.testing.assert_allclose(np.asarray(per_component_advantages(components, jnp.array([1.0, 1.0]), 2)),
                               [2 * h, -2 * h, 0, 0], rtol=1e-5, atol=1e-5)
    total = np.asarray(grpo_advantages(components.sum(0), 2))
    np.testing.assert_allclose(total, [h, -h, h, -h], rtol=1e-5)
    # weights scale each normalised part (format x 3): group 2 becomes (-2h, 2h)
    np.testing.assert_allclose(np.asarray(per_component_advantages(components, jnp.array([3.0, 1.0]), 2)),
                               [4 * h, -4 * h, -2 * h, 2 * h], rtol=1e-5)
    # without the std: centred parts; RLOO is linear, so per component it is RLOO of the weighted total
    np.testing.assert_allclose(np.asarray(per_component_advantages(components, jnp.array([1.0, 1.0]), 2,
                                                                   normalize_by_std=False)), [3.5, -3.5, 2.5, -2.5])
    np.testing.assert_allclose(np.asarray(per_component_advantages(components, jnp.array([2.0, 1.0]), 2, "rloo")),
                               np.asarray(rloo_advantages(2 * components[0] + components[1], 2)), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ sampler mismatch


def test_truncated_importance_weights_and_the_mismatch_hand_values():
    old = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    sampler = jnp.array([[-1.5, -1.0, -0.5], [-0.3, -1.0, 0.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    w = np.asarray(truncated_is_weights(old, sampler, mask, cap=1.5))
    np.testing.assert_allclose(w, [[1.5, math.exp(-1.0), 1.0], [1.0, math.exp(-0.2), 0.0]], rtol=1e-6)  # e^0.5 capped
    # the weight multiplies each token's clipped term: at ratio 1 the loss is -sum(w A) / tokens
    adv = jnp.array([[1.0, -2.0, 0.5], [2.0, 1.0, NAN]])
    loss, _ = policy_loss(old, old, adv, mask, is_weight=jnp.asarray(w))
    assert float(loss) == pytest.approx(-(1.5 - 2 * math.exp(-1.0) + 0.5 + 2 + math.exp(-0.2)) / 5, rel=1e-5)
    m = logp_mismatch(np.asarray(old), np.asarray(sampler), np.asarray(mask))
    assert m["rollout/logp_mismatch_mean"] == pytest.approx((0.5 + 1.0 + 0 + 0 + 0.2) / 5)
    assert m["rollout/logp_mismatch_max"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ reward parts


def _brevity(responses, ground_truths, step):
    return [1.0 / (1 + len(r)) for r in responses]


def test_reward_parts_sum_to_the_total_and_reweight_it():
    alone = CombinedReward.default()
    result = alone.score(RESPONSES, [GT] * 4, 1)
    parts = alone.parts(result)
    assert list(parts) == alone.part_names() == ["format", "correctness", "length"]
    np.testing.assert_allclose(sum(w * c for c, w in parts.values()), result.total)
    both = CombinedReward([RewardTerm("toolrl", toolrl_reward(), 2.0), RewardTerm("brevity", _brevity, -0.5)])
    result = both.score(RESPONSES, [GT] * 4, 1)
    parts = both.parts(result)
    assert list(parts) == ["toolrl/format", "toolrl/correctness", "toolrl/length", "brevity/score"]
    assert parts["brevity/score"][1] == -0.5 and parts["toolrl/format"][1] == 2.0
    np.testing.assert_allclose(sum(w * c for c, w in parts.values()), result.total)
    # reweighting: the total becomes the weighted sum; an unknown name is refused naming the reward's parts
    config = GRPOConfig(reward_component_weights="toolrl/correctness=0,brevity/score=4", overlong_buffer=8,
                        max_response_length=16)
    samples = type("Samples", (), {"lengths": np.array([4, 9, 12, 16])})()
    shaped = shape_rewards(result, samples, config, both)
    overlong = np.array([0, -1 / 8, -4 / 8, -1])
    np.testing.assert_allclose(shaped.components["overlong"], overlong)
    parts = reward_parts(shaped, both, config)
    assert parts["toolrl/correctness"][1] == 0.0 and parts["brevity/score"][1] == -2.0 and parts["overlong"][1] == 1
    hand = 2 * (result.outputs["toolrl"].components["format"] + result.outputs["toolrl"].components["length"]) \
        - 2 * result.outputs["brevity"].scores + overlong
    np.testing.assert_allclose(shaped.total, hand)
    check_component_weights(config, both)
    with pytest.raises(ValueError, match=r"reward_component_weights names \['format'\].*'toolrl/format'"):
        check_component_weights(dataclasses.replace(config, reward_component_weights="format=2"), both)
    # the penalty alone adds to the total
    plain = shape_rewards(result, samples, dataclasses.replace(config, reward_component_weights=None), both)
    np.testing.assert_allclose(plain.total, result.total + overlong)
    # per-component signal: every part with a non-zero weight
    per = dataclasses.replace(config, advantage_normalization="per_component", kl_coef=0.0)
    assert advantage_signal(shaped, both, per).shape == (4, 4)  # correctness weighs 0
    assert advantage_signal(shaped, both, config).shape == (1, 4)


def test_reward_results_select_and_concatenate():
    reward = CombinedReward([RewardTerm("toolrl", toolrl_reward(), 1.0), RewardTerm("brevity", _brevity, 1.0)])
    a, b = reward.score(RESPONSES[:2], [GT] * 2, 1), reward.score(RESPONSES[2:], [GT] * 2, 1)
    whole = reward.score(RESPONSES, [GT] * 4, 1)
    joined = RewardResult.concatenate([a, b]).take(np.array([3, 0]))
    picked = whole.take(np.array([3, 0]))
    assert joined.records() == picked.records() == [whole.record(3), whole.record(0)]
    np.testing.assert_array_equal(joined.outputs["toolrl"].components["format"],
                                  whole.outputs["toolrl"].components["format"][[3, 0]])


# ------------------------------------------------------------------------------------------------ validation


@pytest.fixture(scope="module")
def bindings():
    fv = flags.FlagValues()
    return (*define_config_flags(GRPOConfig, flag_values=fv), *define_config_flags(PolicyLossConfig, flag_values=fv))


@pytest.mark.parametrize("fields, named", [
    (dict(dynamic_sampling=True, group_size=1), ("--dynamic_sampling", "--group_size")),
    (dict(dynamic_sampling=True, group_size=2, algorithm="ppo"), ("--dynamic_sampling", "--advantage_estimator")),
    (dict(dynamic_sampling=True, advantage_estimator="reinforce_plus_plus"), ("--advantage_estimator",)),
    (dict(dynamic_sampling_max_rounds=-1), ("--dynamic_sampling_max_rounds",)),
    (dict(advantage_estimator="rloo", group_size=1), ("--advantage_estimator", "--group_size")),
    (dict(tis_cap=2.0, recompute_old_logprobs=False), ("--tis_cap", "--recompute_old_logprobs")),
    (dict(tis_cap=0.5), ("--tis_cap",)),
    (dict(policy=PolicyLossConfig(importance_sampling_level="sequence"), algorithm="ppo"),
     ("--importance_sampling_level", "--advantage_estimator")),
    (dict(advantage_normalization="per_component"), ("--advantage_normalization", "--kl_coef", "--kl_in_reward")),
    (dict(advantage_normalization="per_component", kl_coef=0.0, advantage_estimator="reinforce_plus_plus"),
     ("--advantage_normalization", "--advantage_estimator")),
    (dict(overlong_buffer=2048), ("--overlong_buffer", "--max_response_length")),
    (dict(overlong_penalty_factor=0.0), ("--overlong_penalty_factor",)),
    (dict(reward_component_weights="format=x"), ("--reward_component_weights",)),
    (dict(reward_component_weights="format=1,format=2"), ("--reward_component_weights",)),
])
def test_invalid_combinations_name_their_flags(bindings, fields, named):
    with pytest.raises(ValueError) as caught:
        GRPOConfig(**fields)
    message = name_flags(caught.value, bindings)
    for flag in named:
        assert flag in message, message


def test_valid_combinations_and_the_defaults_are_off():
    config = GRPOConfig()
    assert not config.dynamic_sampling and not config.mask_truncated and config.overlong_buffer == 0
    assert config.tis_cap is None and config.advantage_normalization == "total" and config.component_weights == {}
    assert config.policy.importance_sampling_level == "token"
    GRPOConfig(algorithm="ppo", group_size=1, policy=PolicyLossConfig(importance_sampling_level="sequence_token"),
               tis_cap=2.0, mask_truncated=True, overlong_buffer=64)
    GRPOConfig(advantage_estimator="reinforce_plus_plus", group_size=1)
    GRPOConfig(advantage_estimator="rloo", dynamic_sampling=True, advantage_normalization="per_component",
               kl_in_reward=False, reward_component_weights="format=0.5, correctness=2")
    assert GRPOConfig(reward_component_weights="format=0.5, correctness=2").component_weights == \
        {"format": 0.5, "correctness": 2.0}


# ------------------------------------------------------------------------------------------------ presets


def test_presets_set_their_fields_and_explicit_values_win():
    base = GRPOConfig(max_response_length=1000)
    assert apply_algorithm_preset(base, "toolrl") == base
    dr = apply_algorithm_preset(base, "dr_grpo")
    assert not dr.normalize_adv_by_std and dr.policy.agg_mode == "seq-mean-token-sum-norm"
    dapo = apply_algorithm_preset(base, "dapo")
    assert dapo.dynamic_sampling and dapo.mask_truncated and dapo.overlong_buffer == 200 and dapo.kl_coef == 0.0
    assert (dapo.policy.clip_eps, dapo.policy.clip_eps_high, dapo.policy.entropy_coef) == (0.2, 0.28, 0.0)
    gspo = apply_algorithm_preset(base, "gspo")
    assert gspo.policy.importance_sampling_level == "sequence" and gspo.kl_coef == 0.0
    assert (gspo.policy.clip_eps, gspo.policy.clip_eps_high, gspo.policy.agg_mode) == (3e-4, 4e-4,
                                                                                       "seq-mean-token-mean")
    mine = dataclasses.replace(base, overlong_buffer=50, policy=PolicyLossConfig(clip_eps_high=0.3))
    kept = apply_algorithm_preset(mine, "dapo", keep={"overlong_buffer", "policy.clip_eps_high"})
    assert kept.overlong_buffer == 50 and kept.policy.clip_eps_high == 0.3 and kept.dynamic_sampling
    with pytest.raises(ValueError, match=r"group_size >= 2.*under algorithm_preset 'dapo'"):
        apply_algorithm_preset(dataclasses.replace(base, group_size=1), "dapo")
    with pytest.raises(ValueError, match="unknown algorithm_preset"):
        apply_algorithm_preset(base, "ppo2")


_PARSE = textwrap.dedent("""\
    import json, sys
    from absl import flags
    import experiments.grpo as grpo
    FLAGS, out = flags.FLAGS, []
    for argv in json.loads(sys.argv[1]):
        FLAGS.unparse_flags()
        FLAGS(["grpo", *argv])
        try:
            c = grpo.validate_flags()[0]
            out.append({"dynamic": c.dynamic_sampling, "buffer": c.overlong_buffer, "eps_high": c.policy.clip_eps_high,
                        "level": c.policy.importance_sampling_level, "kl": c.kl_coef, "std": c.normalize_adv_by_std})
        except Exception as e:
            out.append({"error": str(e)})
    print(json.dumps(out))
    """)


def test_algorithm_preset_flag_yields_to_explicit_flags():
    argvs = [["--algorithm_preset=dapo", "--max_response_length=100"],
             ["--algorithm_preset=dapo", "--max_response_length=100", "--clip_ratio_high=0.3", "--overlong_buffer=7",
              "--kl_coef=0.01"],
             ["--algorithm_preset=gspo"], ["--kl_coef=0.01"],
             ["--algorithm_preset=dapo", "--group_size=1"],
             ["--algorithm_preset=dapo", "--advantage_normalization=per_component"],  # valid: dapo drops the KL
             ["--algorithm_preset=toolrl", "--reward_component_weights=formatt=2"]]
    proc = subprocess.run([sys.executable, "-c", _PARSE, json.dumps(argvs)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    dapo, explicit, gspo, plain, bad, per_component, unknown = json.loads(proc.stdout.strip().splitlines()[-1])
    assert per_component["kl"] == 0.0, per_component
    assert dapo == {"dynamic": True, "buffer": 20, "eps_high": 0.28, "level": "token", "kl": 0.0, "std": True}
    assert explicit == {"dynamic": True, "buffer": 7, "eps_high": 0.3, "level": "token", "kl": 0.01, "std": True}
    assert gspo["level"] == "sequence" and gspo["eps_high"] == 4e-4 and gspo["kl"] == 0.0
    assert plain == {"dynamic": False, "buffer": 0, "eps_high": None, "level": "token", "kl": 0.01, "std": True}
    assert "--group_size" in bad["error"] and "algorithm_preset 'dapo'" in bad["error"], bad
    assert "formatt" in unknown["error"] and "--reward_component_weights" in unknown["error"], unknown
