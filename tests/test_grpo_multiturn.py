"""Multi-turn GRPO with tools executed in the loop (training/multiturn.py): rows, masks, rewards, per-turn returns,
and the one-turn special case against the single-turn step, on a tiny model with SmolLM2's chat template."""
from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests.conftest import REPO_ROOT
from toolrl_jax.environments import make_tasks
from toolrl_jax.environments.synthetic import reference_turns
from toolrl_jax.models.hf_io import load_hf_model
from toolrl_jax.optim import OptimizerConfig
from toolrl_jax.rl.advantages import grpo_advantages
from toolrl_jax.sampling.sampler import SampleOutput
from toolrl_jax.tokenization import encode_chat, load_tokenizer, stop_token_ids
from toolrl_jax.training.estimators import AdvantageInputs
from toolrl_jax.training.grpo import GRPOConfig, GRPOTrainer
from toolrl_jax.training.multiturn import task_examples, turn_index, turn_returns
from toolrl_jax.training.update import update_stage
from toolrl_jax.training.update_rows import update_rows

TASKS = make_tasks("train", 2, seed=3)
TRUTHS = [json.dumps(task) for task in TASKS]


def _trainer(folder, placement=None, **overrides) -> GRPOTrainer:
    _, model = load_hf_model(folder, dtype="float32")
    tok = load_tokenizer(folder)
    kwargs = {}
    if placement is not None:  # the model's weights sharded by the partition rules
        from flax import nnx

        graphdef, state = nnx.split(model)
        model, kwargs = nnx.merge(graphdef, placement.place_state(state)), dict(placement=placement)
    fields = dict(prompts_per_step=2, group_size=4, mini_batch_prompts=2, micro_batch_rows=4, max_prompt_length=512,
                  max_response_length=384, kl_coef=0.001, val_every=0, environment="synthetic",
                  env_prompt_style="minimal", max_turns=4, max_turn_tokens=96, turn_reward_weight=0.5,
                  optimizer=OptimizerConfig(learning_rate=1e-3))
    fields.update(overrides)
    return GRPOTrainer(model, GRPOConfig(**fields), tokenizer=tok, pad_id=tok.pad_token_id,
                       stop_token_ids=stop_token_ids(tok), **kwargs)


class ScriptedSampler:
    """The trainer's sampler, except that `generate` plays scripts: the reference turns of the prompt's task for
    samples 0 and 1 of a group, for samples 2 and 3 a final answer at once (which fails the task). Log-probs are
    placeholders (the trainer recomputes the old policy's)."""

    def __init__(self, sampler, tokenizer, tasks=TASKS):
        self.inner, self.tokenizer, self.tasks = sampler, tokenizer, tasks
        self.stop = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompt_ids, config, key, max_new_tokens=None, prompt_numbers=None, sample_numbers=None):
        rows = []
        for ids, budget, sample in zip(prompt_ids, max_new_tokens, sample_numbers):
            text = self.tokenizer.decode(ids, skip_special_tokens=False)
            task = next(t for t in self.tasks if t["request"] in text)
            turns = reference_turns(task) if sample < 2 else ["<response> I cannot. </response>"]
            turn = text.count("<|im_start|>assistant") - 1
            tokens = self.tokenizer.encode(turns[min(turn, len(turns) - 1)], add_special_tokens=False) + [self.stop]
            rows.append(tokens[:budget])
        width = config.max_new_tokens
        ids = np.full((len(rows), width), self.inner.pad_id, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, tokens in enumerate(rows):
            ids[i, :len(tokens)], mask[i, :len(tokens)] = tokens, 1
        lengths = mask.sum(1).astype(np.int32)
        texts = [self.tokenizer.decode(r[:-1], skip_special_tokens=False) for r in rows]
        return SampleOutput(prompt_ids=np.zeros((len(rows), 1), np.int32), prompt_mask=np.ones((len(rows), 1)),
                            response_ids=ids, response_mask=mask, logprobs=-0.5 * mask.astype(np.float32),
                            lengths=lengths, stopped=ids[np.arange(len(rows)), lengths - 1] == self.stop,
                            group_size=1, texts=texts)


def _scripted(folder, placement=None, **overrides) -> GRPOTrainer:
    # Scripts replace Sampler.generate, so turns must go through it rather than through KV-reusing sessions.
    trainer = _trainer(folder, placement, **{"turn_kv_reuse": False, **overrides})
    trainer.sampler = ScriptedSampler(trainer.sampler, trainer.tokenizer)
    return trainer


@pytest.mark.slow
def test_multiturn_rows_train_model_tokens_only(long_chat_model_dir):
    """Scripted trajectories that call tools: tool results sit in the rows (attended to) but outside the loss mask;
    the environment's verdict and the per-turn ToolRL reward make the rewards; a tool-result token's advantage and
    old log-prob do not touch the update (garbage there leaves the new parameters bit-identical)."""
    trainer = _scripted(long_chat_model_dir)
    # One turn's call holds the step's 2 tasks x 4 trajectories (the continuous engine's slots), not 2 per call.
    assert trainer.multiturn_config()[1].prompts_per_batch == 8
    rollout, rewards, _, _ = trainer.rollout_stage([], TRUTHS, jax.random.key(0), 1, None)
    samples = rollout.samples
    tool = samples.response_attention.astype(bool) & ~samples.response_mask.astype(bool)
    assert tool.sum(1)[[0, 1, 4, 5]].min() > 0 and tool.sum(1)[[2, 3, 6, 7]].max() == 0
    np.testing.assert_array_equal(rollout.rows["loss_mask"], samples.response_mask)
    p = samples.prompt_ids.shape[1]
    np.testing.assert_array_equal(rollout.rows["segment_ids"][:, p:], samples.response_attention)
    # Decoded model tokens are the scripts; tool tokens hold the environment's observations.
    text = trainer.tokenizer.decode(samples.response_ids[0][tool[0]].tolist())
    assert "<obs>" in text and "<tool_call>" not in text
    np.testing.assert_array_equal(rewards.components["env/success"], [1, 1, 0, 0, 1, 1, 0, 0])
    turns = [len(reference_turns(t)) for t in TASKS]
    np.testing.assert_array_equal(rewards.components["turns"], [turns[0]] * 2 + [1, 1] + [turns[1]] * 2 + [1, 1])
    # The reference turns score the maximum per-turn reward; a lone answer scores 1 of K turns' worth at most.
    good, bad = rewards.components["turn/score"][0], rewards.components["turn/score"][2]
    assert good > bad and rewards.total[0] == pytest.approx(1.0 + 0.5 * good)

    logprobs = rollout.logprobs()
    assert (logprobs.old[tool] == 0).all() and (logprobs.old[samples.response_mask.astype(bool)] < 0).all()
    advantages = trainer.estimator(AdvantageInputs(
        outcome=rewards.total, mask=rollout.mask, old_logp=logprobs.old, ref_logp=logprobs.ref, rows=rollout.rows,
        config=trainer.config))
    assert (np.asarray(advantages.token)[tool] == 0).all()
    rows, _ = update_rows(rollout, logprobs, advantages, trainer.config)
    garbage = copy.deepcopy(rows)
    garbage["advantages"] = np.where(tool, 100.0, rows["advantages"]).astype(np.float32)
    garbage["old_logp"] = np.where(tool, -30.0, rows["old_logp"]).astype(np.float32)
    results = []
    for train_rows in (rows, garbage):
        twin = _trainer(long_chat_model_dir)
        update_stage(twin, train_rows)
        results.append(jax.tree.map(np.asarray, twin.params))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(results[0]),
                                                        jax.tree.leaves(jax.tree.map(np.asarray, trainer.params))))


@pytest.mark.slow
def test_one_turn_is_the_single_turn_step(long_chat_model_dir):
    """max_turns=1 with the real sampler: the rows (prompts, sampled tokens, masks) and old log-probs equal the
    single-turn rollout of the same prompts and key, and the same advantages give the same update."""
    multi = _trainer(long_chat_model_dir, max_turns=1, max_turn_tokens=None, max_response_length=24)
    single = _trainer(long_chat_model_dir, environment="none", max_response_length=24)
    examples = task_examples(TASKS, "synthetic", "train", {"prompt_style": "minimal"})
    prompts = [encode_chat(single.tokenizer, e.prompt_messages) for e in examples]
    key = jax.random.key(2)
    mt, rewards, _, _ = multi.rollout_stage(prompts, TRUTHS, key, 1, None)
    st, _, _, _ = single.rollout_stage(prompts, TRUTHS, key, 1, None)
    for name in ("input_ids", "segment_ids", "positions", "response_ids"):
        np.testing.assert_array_equal(mt.rows[name], st.rows[name], err_msg=name)
    np.testing.assert_array_equal(mt.mask, st.mask)
    old_mt, old_st = mt.logprobs(), st.logprobs()
    np.testing.assert_allclose(old_mt.old, old_st.old, atol=1e-5, rtol=0)
    np.testing.assert_allclose(mt.samples.logprobs, st.samples.logprobs, atol=1e-5, rtol=0)
    assert rewards.total.shape == (8,) and (mt.samples.response_attention == mt.samples.response_mask).all()
    adv = single.estimator(AdvantageInputs(outcome=np.linspace(0, 1, 8), mask=st.mask, old_logp=old_st.old,
                                           ref_logp=old_st.ref, rows=st.rows, config=single.config))
    params = []
    for trainer, rollout, old in ((multi, mt, old_mt), (single, st, old_st)):
        rows, _ = update_rows(rollout, old, adv, trainer.config)
        metrics = update_stage(trainer, rows)[0]
        params.append((jax.tree.map(np.asarray, trainer.params), metrics))
    (p_mt, m_mt), (p_st, m_st) = params
    assert {"pg_loss", "grad_norm"} <= set(m_st[0])
    for key_ in m_st[0]:
        np.testing.assert_allclose(m_mt[0][key_], m_st[0][key_], rtol=1e-4, atol=1e-6, err_msg=key_)
    for a, b in zip(jax.tree.leaves(p_mt), jax.tree.leaves(p_st)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)


def test_turn_returns_and_indices_by_hand():
    @dataclasses.dataclass
    class Fake:  # the fields turn_index / turn_returns read
        loss_mask: np.ndarray
        outcome: object

    outcome = type("O", (), {"reward": 1.0})()
    # model (2 tokens), tool (2), model (1), tool (1), model (2): turns 0, 1, 2.
    a = Fake(np.array([1, 1, 0, 0, 1, 0, 1, 1]), outcome)
    b = Fake(np.array([1, 1, 1]), type("O", (), {"reward": 0.0})())
    index = turn_index([a, b], 10)
    np.testing.assert_array_equal(index[0], [0, 0, -1, -1, 1, -1, 2, 2, -1, -1])
    np.testing.assert_array_equal(index[1], [0, 0, 0] + [-1] * 7)
    # Turn rewards (0.2, 0.4, 1.0) over K = 3 reference turns; env weight 2, turn weight 3.
    returns = turn_returns([a, b], [np.array([0.2, 0.4, 1.0]), np.array([0.5, 0.0])], 2.0, 3.0, 3)
    np.testing.assert_allclose(returns[0], [2 + 3 * 1.6 / 3, 2 + 3 * 1.4 / 3, 2 + 3 * 1.0 / 3])
    np.testing.assert_allclose(returns[1], [3 * 0.5 / 2, 0.0, 0.0])


def test_per_turn_advantages_reduce_to_grpo_without_turn_rewards(long_chat_model_dir):
    """turn_advantages with turn_reward_weight 0: every turn's return is the outcome, so the advantages are GRPO's;
    with turn rewards, a later turn's tokens get a different advantage than the first turn's."""
    for weight in (0.0, 0.5):
        trainer = _scripted(long_chat_model_dir, turn_advantages=True, turn_reward_weight=weight, kl_coef=0.0)
        rollout, rewards, _, _ = trainer.rollout_stage([], TRUTHS, jax.random.key(0), 1, None)
        logprobs = rollout.logprobs()
        inputs = AdvantageInputs(outcome=rewards.total, mask=rollout.mask, old_logp=logprobs.old,
                                 ref_logp=logprobs.ref, rows=rollout.rows, config=trainer.config)
        plain = np.asarray(trainer.estimator(inputs).token)
        per_turn = np.asarray(trainer.per_turn_advantages(rollout, rewards, logprobs, trainer.estimator(inputs)).token)
        index = turn_index(rollout.trajectories, rollout.mask.shape[1])
        if weight == 0:
            np.testing.assert_allclose(per_turn, plain, atol=1e-6)
            continue
        # Turn k's tokens carry GRPO's advantage of the group's reward-to-go at k (no KL, no penalty here).
        returns = turn_returns(rollout.trajectories, rollout.turn_rewards, 1.0, weight, int(index.max()) + 1)
        np.testing.assert_allclose(returns[:, 0], rewards.total, atol=1e-9)
        assert not np.allclose(returns[:, 0], returns[:, 1])  # the first turn's reward is not in turn 1's return
        for k in range(returns.shape[1]):
            want = np.asarray(grpo_advantages(returns[:, k], 4))
            rows, cols = np.nonzero(index == k)
            np.testing.assert_allclose(per_turn[rows, cols], want[rows], atol=1e-5, err_msg=f"turn {k}")
        assert (per_turn[index < 0] == 0).all()


def test_multiturn_config_errors_name_the_options():
    base = dict(prompts_per_step=2, group_size=2, mini_batch_prompts=2, micro_batch_rows=2, max_prompt_length=64,
                max_response_length=64, environment="synthetic")
    for change, match in ((dict(algorithm="ppo", group_size=1), "outcome estimators"),
                          (dict(dynamic_sampling=True), "dynamic_sampling"),
                          (dict(max_turn_tokens=65), "max_turn_tokens"),
                          (dict(env_reward_weight=0.0), "both 0"),
                          (dict(prompt_length_buckets=(64,)), "prompts grow"),
                          (dict(environment="nope"), "environment must be one of")):
        with pytest.raises(ValueError, match=match):
            GRPOConfig(**{**base, **change})


SHARDED = """
import sys
import jax, numpy as np
from tests.test_grpo_multiturn import TASKS, TRUTHS, _scripted
from toolrl_jax.environments.synthetic import reference_turns
from toolrl_jax.optim import OptimizerConfig
from toolrl_jax.placement import Placement
from toolrl_jax.sharding import MeshConfig

assert jax.device_count() == 4, jax.devices()
results = []
for placement in (None, Placement.from_config(MeshConfig(data=1, fsdp=2, tensor=2))):
    # eps=1: Adam's first step is proportional to the gradient, so rounding cannot flip a near-zero entry's update
    trainer = _scripted(sys.argv[1], placement, micro_batch_rows=2, turn_advantages=True,
                        optimizer=OptimizerConfig(learning_rate=1e-2, eps=1.0))
    metrics = trainer.train_step([[0]] * 2, TRUTHS, jax.random.key(1)).metrics
    results.append((metrics, jax.tree.map(np.asarray, trainer.params)))
    if placement is not None:
        assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(trainer.params))
(m1, p1), (m4, p4) = results
turns = [len(reference_turns(t)) for t in TASKS]  # scripts: 2 of 4 samples solve their task, 2 answer at once
assert m1["multiturn/success_rate"] == 0.5 and m1["reward/env/success"] == 0.5
assert m1["multiturn/turns_per_trajectory"] == (2 * sum(turns) + 4) / 8
assert 0 < m1["multiturn/model_token_fraction"] < 1 and m1["multiturn/tool_errors_per_turn"] == 0
assert np.isfinite(m1["actor/pg_loss"]) and m1["actor/grad_norm"] > 0
for key in sorted(k for k in m1 if k.split("/")[0] in ("actor", "reward", "kl", "multiturn") and "_s" not in k
                  and "time" not in k):
    np.testing.assert_allclose(m4[key], m1[key], rtol=2e-4, atol=1e-6, err_msg=key)
for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)
print("MULTITURN_SHARDED_OK")
"""


@pytest.mark.slow
def test_multiturn_step_on_a_mesh_equals_one_device(long_chat_model_dir):
    """A multi-turn step (tool results in the rows, per-turn advantages) logs the trajectories' metrics, and on a
    (fsdp 2, tensor 2) CPU mesh gives the metrics and parameters of one device."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", SHARDED, str(long_chat_model_dir)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "MULTITURN_SHARDED_OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]


_WARMUP = textwrap.dedent("""\
    import json, sys
    from absl import flags
    import experiments.grpo as grpo
    from toolrl_jax.tokenization import load_tokenizer
    from toolrl_jax.training.sft_data import tokenize_examples
    FLAGS, out = flags.FLAGS, []
    tokenizer = load_tokenizer(sys.argv[2])
    for argv in json.loads(sys.argv[1]):
        FLAGS.unparse_flags()
        FLAGS(["grpo", "--data=synthetic", "--synthetic_train_size=8", "--synthetic_val_size=2",
               "--sft_warmup_steps=1", "--max_prompt_length=256", "--max_response_length=320", *argv])
        config, _, warmup, _ = grpo.validate_flags()
        if config.multiturn:
            examples = grpo.load_environment_split(config)[2]
        else:
            examples = None
        report = None
        if examples:
            report = tokenize_examples(tokenizer, examples, warmup.max_length, warmup.max_prompt_length)[1]
        out.append({"cap": warmup.max_prompt_length, "examples": len(examples or []),
                    "cut": None if report is None else report.num_truncated})
    print(json.dumps(out))
    """)


def test_multiturn_warmup_keeps_the_whole_conversation(long_chat_model_dir):
    """A later reference turn's prompt holds the earlier turns and their results (longer than --max_prompt_length);
    the warm-up trains on it whole instead of cutting the system prompt and tools from its left, while single-turn
    warm-ups keep the rollouts' prompt cap."""
    argvs = [["--environment=synthetic", "--env_prompt_style=minimal", "--max_turns=4"], []]
    proc = subprocess.run([sys.executable, "-c", _WARMUP, json.dumps(argvs), str(long_chat_model_dir)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    multiturn, single = json.loads(proc.stdout.strip().splitlines()[-1])
    assert multiturn["cap"] is None and multiturn["examples"] > 8 and multiturn["cut"] == 0
    assert single["cap"] == 256


def test_prompt_buckets_the_prefill_cannot_chunk_fail_at_start_up():
    """A multi-turn conversation reaches the larger buckets only after the warm-up and some turns; a bucket the
    prefill cannot split into whole chunks is refused when the config is built, naming the option."""
    with pytest.raises(ValueError, match=r"GRPOConfig: SamplingConfig.prompt_length_buckets \[576\]"):
        GRPOConfig(max_prompt_length=256, max_response_length=320, prompt_length_buckets=(256, 384, 576),
                   environment="synthetic", max_turns=4, max_turn_tokens=72)


def test_tasks_whose_opening_prompt_is_too_long_are_refused_before_training(long_chat_model_dir):
    """Held-out kinds expose more tools, so their prompts are longer than the training tasks'; a multi-turn prompt
    is never cut, so such tasks are named at start-up, not at the first validation."""
    from toolrl_jax.training.multiturn import TaskError, check_opening_prompts, opening_prompt_lengths

    tokenizer = load_tokenizer(long_chat_model_dir)
    kwargs = {"prompt_style": "minimal"}
    val = task_examples(make_tasks("heldout", 8), "synthetic", "test", kwargs)
    lengths = opening_prompt_lengths(val, "synthetic", tokenizer, kwargs)
    want = [len(encode_chat(tokenizer, e.prompt_messages)) for e in val]  # ToolRL-style prompts: messages only
    assert lengths == want and max(lengths) > min(lengths)
    check_opening_prompts(val, "synthetic", tokenizer, max(lengths), "validation", kwargs)  # all fit: no error
    too_long = [i for i, n in enumerate(lengths) if n > min(lengths)]
    with pytest.raises(TaskError, match=rf"{len(too_long)} of 8 validation tasks have an opening prompt longer than "
                                        rf"max_prompt_length={min(lengths)}: 'synthetic-heldout-0-{too_long[0]}'"):
        check_opening_prompts(val, "synthetic", tokenizer, min(lengths), "validation", kwargs)
