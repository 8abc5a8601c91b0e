"""Training on rollout rows without their padding, a chunked log-prob head, a bf16 reference copy, and gradient
accumulation without an accumulator: each changes memory or FLOPs, none may change the values."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from toolrl_jax.models.config import ModelConfig
from toolrl_jax.models.decoder import CausalLM, cast_floating
from toolrl_jax.optim import OptimizerConfig, make_optimizer
from toolrl_jax.rl.losses import AGG_MODES
from toolrl_jax.rl.ppo import PolicyLossConfig
from toolrl_jax.sampling.config import SamplingConfig
from toolrl_jax.training.accumulation import accumulate_gradients
from toolrl_jax.training.actor import (
    loss_mask,
    make_logprob_fn,
    make_split_update_fns,
    make_update_fn,
    update_normalizers,
)
from toolrl_jax.training.layout import RowLayout, row_extents, rows_by_length, stack_minibatches, trim_rows
from toolrl_jax.training.rollout import batched_logprobs, collect_logprobs, dispatch_logprobs
from toolrl_jax.training.sequences import join_prompt_and_response, response_logprobs

# The shared compilation cache (conftest.py): the fused and split updates recompile equal programs per case.
pytestmark = pytest.mark.usefixtures("compilation_cache")

PROMPT_WIDTH, RESPONSE_WIDTH = 16, 12


def _rows(prompt_lens, response_lens, vocab=128, seed=0) -> dict[str, np.ndarray]:
    """Joined rows of random tokens: prompts left-padded to PROMPT_WIDTH, responses right-padded."""
    rng = np.random.default_rng(seed)
    n = len(prompt_lens)
    prompt_ids = np.zeros((n, PROMPT_WIDTH), np.int32)
    prompt_mask = np.zeros((n, PROMPT_WIDTH), np.int32)
    response_ids = np.zeros((n, RESPONSE_WIDTH), np.int32)
    response_mask = np.zeros((n, RESPONSE_WIDTH), np.int32)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        prompt_ids[i, PROMPT_WIDTH - p:] = rng.integers(1, vocab, p)
        prompt_mask[i, PROMPT_WIDTH - p:] = 1
        response_ids[i, :r] = rng.integers(1, vocab, r)
        response_mask[i, :r] = 1
    return join_prompt_and_response(prompt_ids, prompt_mask, response_ids, response_mask)


@pytest.fixture(scope="module")
def model() -> CausalLM:
    return CausalLM(ModelConfig.tiny("qwen2", vocab_size=128, dtype="float32"), rngs=nnx.Rngs(0))


def test_trim_rows_cuts_padding_only():
    rows = _rows([3, 5, 2], [4, 1, 6])
    prompt_len, response_len = row_extents(rows)
    np.testing.assert_array_equal(prompt_len, [3, 5, 2])
    np.testing.assert_array_equal(response_len, [4, 1, 6])
    cut = trim_rows(rows, 5, 6)
    assert cut["input_ids"].shape == (3, 11) and cut["response_ids"].shape == (3, 6)
    np.testing.assert_array_equal(cut["input_ids"], rows["input_ids"][:, PROMPT_WIDTH - 5:PROMPT_WIDTH + 6])
    np.testing.assert_array_equal(cut["positions"], rows["positions"][:, PROMPT_WIDTH - 5:PROMPT_WIDTH + 6])
    assert cut["segment_ids"].sum() == rows["segment_ids"].sum(), "every real token is kept"
    # Stacked mini-batches ([num_micro, micro_rows, ...]) are cut the same way.
    stacked = stack_minibatches(dict(rows, old_logp=np.ones((3, RESPONSE_WIDTH), np.float32)), 3, 1)[0]
    cut_stacked = trim_rows(stacked, 5, 6)
    assert cut_stacked["input_ids"].shape == (3, 1, 11) and cut_stacked["old_logp"].shape == (3, 1, 6)
    with pytest.raises(ValueError, match="drop tokens"):
        trim_rows(rows, 4, 6)
    with pytest.raises(ValueError, match="drop tokens"):
        trim_rows(rows, 5, 5)
    with pytest.raises(ValueError, match="outside"):
        trim_rows(rows, PROMPT_WIDTH + 1, 6)


def test_trimmed_chunks_give_the_full_rows_logprobs(model):
    rows = _rows([3, 16, 7, 2, 9, 12], [12, 2, 5, 1, 8, 3], seed=1)
    graphdef, params = nnx.split(model)
    full_logp, full_ent = response_logprobs(graphdef, params, rows)
    # One prompt bucket (so rows are ordered by response length) and response buckets of one token (so every chunk
    # is cut to exactly its longest response).
    layout = RowLayout(SamplingConfig(max_new_tokens=RESPONSE_WIDTH, prompt_length_buckets=(PROMPT_WIDTH,)),
                       response_buckets=tuple(range(1, RESPONSE_WIDTH + 1)))
    pending = dispatch_logprobs(make_logprob_fn(graphdef), params, rows, 2, layout=layout)
    logp, ent = collect_logprobs(pending, rows["response_ids"].shape)
    mask = rows["response_mask"].astype(bool)
    np.testing.assert_allclose(np.where(mask, logp, 0), np.where(mask, full_logp, 0), atol=1e-5)
    np.testing.assert_allclose(np.where(mask, ent, 0), np.where(mask, full_ent, 0), atol=1e-5)
    # Columns past a chunk's width are not computed (0): rows 3 and 1 (responses of 1 and 2) share a 2-wide chunk.
    assert np.all(logp[[1, 3], 2:] == 0) and np.all(ent[[1, 3], 2:] == 0)
    # Shortest rows first, so chunks pair similar lengths: (1, 2), (3, 5), (8, 12) responses.
    assert [chunk_logp.shape[1] for _, (chunk_logp, _) in pending] == [2, 5, 12]
    np.testing.assert_array_equal(np.concatenate([index for index, _ in pending]), [3, 1, 5, 2, 4, 0])
    # The one-shot helper gives the same values.
    again, _ = batched_logprobs(make_logprob_fn(graphdef), params, rows, 2, layout=layout)
    np.testing.assert_array_equal(again, logp)


def test_chunked_logprob_head_equals_one_pass(model):
    rows = _rows([3, 16, 7], [12, 2, 5], seed=2)
    graphdef, params = nnx.split(model)
    weights = jnp.asarray(np.random.default_rng(0).normal(size=rows["response_mask"].shape), jnp.float32)

    def objective(p, chunk):
        logp, ent = response_logprobs(graphdef, p, rows, logits_chunk_size=chunk)
        return jnp.sum((logp + 0.1 * ent) * weights * rows["response_mask"]), (logp, ent)

    (v_full, (lp_full, ent_full)), g_full = jax.value_and_grad(objective, has_aux=True)(params, None)
    for chunk in (5, 4, 1):  # uneven, even and single-position chunks
        (v, (lp, ent)), g = jax.value_and_grad(objective, has_aux=True)(params, chunk)
        np.testing.assert_allclose(lp, lp_full, atol=1e-6)
        np.testing.assert_allclose(ent, ent_full, atol=1e-5)
        np.testing.assert_allclose(v, v_full, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_full)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def _minibatch(rows, seed=3):
    rng = np.random.default_rng(seed)
    mask = rows["response_mask"]
    return dict(rows, old_logp=(rng.normal(size=mask.shape) * mask - 4 * mask).astype(np.float32),
                advantages=(np.repeat(rng.normal(size=(mask.shape[0], 1)), mask.shape[1], 1) * mask).astype(np.float32))


# A large eps makes Adam's first step proportional to the gradient (not its sign), so float rounding in near-zero
# gradient entries cannot flip an update.
_OPT_CONFIG = OptimizerConfig(learning_rate=1e-2, eps=1.0, max_grad_norm=None)


def _updated(model, minibatch, logits_chunk_size=None, policy=PolicyLossConfig()):
    graphdef, params = nnx.split(copy_model(model))
    optimizer = make_optimizer(_OPT_CONFIG)
    update = make_update_fn(graphdef, optimizer, _OPT_CONFIG, policy, logits_chunk_size=logits_chunk_size,
                            response_budget=RESPONSE_WIDTH)
    new_params, _, metrics = update(params, optimizer.init(params), nnx.State({}), minibatch)
    return jax.tree.map(np.asarray, new_params), jax.device_get(metrics)


def copy_model(model: CausalLM) -> CausalLM:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, cast_floating(state, copy=True))


def test_update_on_trimmed_rows_and_chunked_head_equals_full_rows(model):
    rows = _minibatch(_rows([3, 9, 7, 2], [5, 2, 6, 1], seed=4))
    full = stack_minibatches(rows, 4, 2)[0]
    p, r = row_extents(rows)
    cut = trim_rows(full, int(p.max()), int(r.max()))
    params_full, metrics_full = _updated(model, full)
    moved = max(float(np.abs(a - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(params_full), jax.tree.leaves(nnx.state(model))))
    assert moved > 1e-5, "the update must move the parameters for the comparison to mean anything"
    for variant, chunk in ((cut, None), (full, 5), (cut, 4)):
        params, metrics = _updated(model, variant, chunk)
        for key in ("pg_loss", "entropy", "grad_norm", "actor_loss"):
            np.testing.assert_allclose(metrics[key], metrics_full[key], rtol=1e-5, atol=1e-7, err_msg=key)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_full)):
            np.testing.assert_allclose(a, b, atol=1e-7)


@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_split_update_with_a_width_per_micro_batch_equals_the_fused_full_width_update(model, agg_mode):
    """Rows sorted by length, each micro-batch cut to its own widths, gradients summed across jitted calls: the
    same metrics and parameters as one scan over the full-width mini-batch, in every loss aggregation mode (verl's
    value depends on which rows share a micro-batch, so the fused reference takes the same micro-batches)."""
    _assert_split_equals_fused(model, PolicyLossConfig(agg_mode=agg_mode), _minibatch(
        _rows([3, 9, 7, 2, 16, 1], [5, 2, 6, 1, 12, 3], seed=6)), check_unsorted=agg_mode != "verl")


@pytest.mark.parametrize("level, agg_mode", [("sequence", "seq-mean-token-mean"), ("sequence_token", "token-mean"),
                                             ("token", "seq-mean-token-sum-norm")])
def test_split_equals_fused_with_gspo_ratios_importance_weights_and_a_loss_mask(model, level, agg_mode):
    """GSPO's sequence ratios (each needs only its own row's tokens), truncated importance weights and a loss mask
    that drops whole rows (truncated responses, filler groups) and a token: accumulation stays exact, in both update
    paths."""
    rows = _minibatch(_rows([3, 9, 7, 2, 16, 1], [5, 2, 6, 1, 12, 3], seed=6))
    mask = rows["response_mask"]
    loss_mask = mask * np.array([1, 0, 1, 1, 0, 1], np.float32)[:, None]
    loss_mask[0, 1] = 0.0
    weights = np.random.default_rng(2).uniform(0.2, 2.0, size=mask.shape).astype(np.float32) * mask
    # old log-probs near the model's own, so that some ratios are clipped at eps 0.02 and some not
    logp = np.asarray(make_logprob_fn(nnx.graphdef(model))(nnx.state(model), rows)[0])
    noise = np.random.default_rng(1).normal(scale=0.03, size=mask.shape)
    rows = dict(rows, loss_mask=loss_mask, is_weight=weights, old_logp=((logp + noise) * mask).astype(np.float32))
    _, metrics = _assert_split_equals_fused(model, PolicyLossConfig(importance_sampling_level=level,
                                                                    agg_mode=agg_mode, clip_eps=0.02), rows)
    assert 0.1 < metrics["clipfrac"] < 0.9, metrics["clipfrac"]


def _assert_split_equals_fused(model, policy, rows, check_unsorted=True):
    order = rows_by_length(rows)
    sorted_rows = {k: v[order] for k, v in rows.items()}
    params_full, metrics_full = _updated(model, stack_minibatches(sorted_rows, 6, 2)[0], policy=policy)
    if check_unsorted:  # the value does not depend on how rows are grouped into micro-batches
        params_unsorted, _ = _updated(model, stack_minibatches(rows, 6, 2)[0], policy=policy)
        for a, b in zip(jax.tree.leaves(params_unsorted), jax.tree.leaves(params_full)):
            np.testing.assert_allclose(a, b, atol=1e-7)
    micros = []
    for start in range(0, 6, 2):
        micro = {k: v[order[start:start + 2]] for k, v in rows.items()}
        p, r = row_extents(micro)
        micros.append(trim_rows(micro, int(p.max()), int(r.max())))
    assert len({m["input_ids"].shape for m in micros}) == 3, "each micro-batch has its own width"
    graphdef, params = nnx.split(copy_model(model))
    optimizer = make_optimizer(_OPT_CONFIG)
    fns = make_split_update_fns(graphdef, optimizer, _OPT_CONFIG, policy, logits_chunk_size=4)
    normalizers = jax.device_get(update_normalizers(loss_mask(rows), policy, len(micros), RESPONSE_WIDTH))
    grads, micro_metrics = fns.zeros(params), []
    for micro in micros:
        grads, m = fns.accumulate(params, nnx.State({}), grads, micro, normalizers)
        micro_metrics.append(m)
    new_params, _, opt_metrics = fns.apply(params, optimizer.init(params), grads)
    metrics = dict(jax.device_get(opt_metrics), **{k: sum(float(m[k]) for m in micro_metrics)
                                                    for k in micro_metrics[0]})
    for key in ("pg_loss", "entropy", "grad_norm", "actor_loss", "clipfrac"):
        np.testing.assert_allclose(metrics[key], metrics_full[key], rtol=1e-5, atol=1e-7, err_msg=key)
    for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(params_full)):
        np.testing.assert_allclose(np.asarray(a), b, atol=1e-7)
    return params_full, metrics_full


def test_a_loss_mask_row_of_zeros_trains_as_if_the_row_were_absent(model):
    """Masking whole rows (truncated responses, dynamic sampling's filler groups) is exactly dropping them: same
    loss, metrics and parameters as the update on the other rows alone, whatever the aggregation."""
    rows = _minibatch(_rows([3, 9, 7, 2, 16, 1], [5, 2, 6, 1, 12, 3], seed=6))
    keep = np.array([1, 0, 1, 1, 0, 1], bool)
    masked = dict(rows, loss_mask=rows["response_mask"] * keep[:, None].astype(np.float32))
    for agg_mode in ("token-mean", "seq-mean-token-sum-norm"):
        policy = PolicyLossConfig(agg_mode=agg_mode, kl_loss_coef=0.0)
        with_mask = _updated(model, stack_minibatches(masked, 6, 2)[0], policy=policy)
        without = _updated(model, stack_minibatches({k: v[keep] for k, v in rows.items()}, 4, 2)[0], policy=policy)
        for key in ("pg_loss", "entropy", "actor_loss", "grad_norm"):
            np.testing.assert_allclose(with_mask[1][key], without[1][key], rtol=1e-5, atol=1e-7, err_msg=key)
        for a, b in zip(jax.tree.leaves(with_mask[0]), jax.tree.leaves(without[0])):
            np.testing.assert_allclose(a, b, atol=1e-7)


def test_single_micro_batch_needs_no_accumulator_and_agrees_with_scan():
    params = {"w": jnp.arange(3.0), "b": jnp.ones(())}
    batch = {"x": jnp.arange(12.0).reshape(4, 1, 3)}

    def grads_fn(p, micro):
        loss = lambda q: jnp.sum((micro["x"] @ q["w"] + q["b"]) ** 2)  # noqa: E731
        return jax.grad(loss)(p), {"loss": loss(p)}

    one_grads, one_out = accumulate_gradients(grads_fn, params, {"x": batch["x"].reshape(1, 4, 3)})
    many_grads, many_out = accumulate_gradients(grads_fn, params, batch)
    assert one_out["loss"].shape == (1,) and many_out["loss"].shape == (4,)
    np.testing.assert_allclose(one_out["loss"].sum(), many_out["loss"].sum(), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(one_grads), jax.tree.leaves(many_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # One micro-batch: no scan, so no zero-initialised accumulator in the program.
    assert "scan" not in str(jax.make_jaxpr(functools.partial(accumulate_gradients, grads_fn))(
        params, {"x": batch["x"].reshape(1, 4, 3)}))


def test_reference_copy_in_compute_dtype_gives_bit_identical_logprobs():
    config = ModelConfig.tiny("qwen2", vocab_size=128, dtype="bfloat16", param_dtype="float32")
    model = CausalLM(config, rngs=nnx.Rngs(1))
    graphdef, params = nnx.split(model)
    ref16 = cast_floating(params, jnp.bfloat16, copy=True)
    assert {x.dtype for x in jax.tree.leaves(ref16) if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype("bfloat16")}
    rows = _rows([3, 16, 7], [12, 2, 5], seed=5)
    logprob = make_logprob_fn(graphdef)
    np.testing.assert_array_equal(np.asarray(logprob(ref16, rows)[0]), np.asarray(logprob(params, rows)[0]))
    # A copy owns its buffers: donating the original leaves it valid.
    ref32 = cast_floating(params, copy=True)
    jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(params)
    assert np.isfinite(np.asarray(logprob(ref32, rows)[0])).all()
