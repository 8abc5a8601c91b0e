"""The continuous-batching engine (decode slots refilled from a queue) against the static engine and against
cache-free forwards of the same tiny float32 model: same tokens, same log-probs, bounded slots, no recompiles."""
from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from tests.test_sampling import _log_softmax, _model, _teacher_forced_logits
from toolrl_jax.sampling import Sampler, SamplingConfig

PAD = 0
RNG = np.random.default_rng(0)
PROMPTS = [RNG.integers(3, 128, size=int(n)).tolist() for n in RNG.integers(1, 20, size=9)]
BUDGET = 20


@pytest.fixture(scope="module")
def engines():
    """A sharp (trained-like) model, its static sampler with no stop ids, and the stop ids that end some rows of
    its greedy output mid-way; then a static and a 4-slot continuous sampler with those stop ids."""
    model = _model("llama", seed=1, sharpen=10.0)
    free = Sampler(model, pad_id=PAD, engine="static").generate(
        PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=BUDGET), 0)
    counts = np.bincount(free.response_ids[:, 2:].ravel(), minlength=128)
    stops = tuple(int(t) for t in np.argsort(-counts)[:2])
    static = Sampler(model, pad_id=PAD, stop_token_ids=stops, engine="static")
    continuous = Sampler(model, pad_id=PAD, stop_token_ids=stops, slots=4, refill_prompts=1, min_decode_window=8)
    return model, static, continuous


def _assert_same(a, b, atol: float = 1e-5) -> None:
    np.testing.assert_array_equal(a.response_ids, b.response_ids)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.stopped, b.stopped)
    np.testing.assert_array_equal(a.response_mask, b.response_mask)
    np.testing.assert_array_equal(a.prompt_ids, b.prompt_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=atol, rtol=0)
    if a.tempered_logprobs is not None:
        np.testing.assert_allclose(a.tempered_logprobs, b.tempered_logprobs, atol=atol, rtol=0)


@pytest.mark.parametrize("cfg", [
    SamplingConfig(temperature=0.0, max_new_tokens=BUDGET),
    SamplingConfig(temperature=1.0, top_p=0.9, top_k=30, group_size=3, max_new_tokens=BUDGET,
                   tempered_logprobs=True),
], ids=["greedy", "sampled_groups"])
def test_continuous_equals_static(engines, cfg):
    """Same tokens, lengths and stops as the static engine for the same key (log-probs to float32 rounding), with
    rows stopping early, per-row budgets, slot refills and the running rows' cache columns moved to the front
    several times."""
    _, static, continuous = engines
    rows = len(PROMPTS) * cfg.group_size
    budgets = np.random.default_rng(1).integers(1, BUDGET + 1, size=rows)
    for per_row in (None, budgets):
        want = static.generate(PROMPTS, cfg, jax.random.key(3), max_new_tokens=per_row)
        got = continuous.generate(PROMPTS, cfg, jax.random.key(3), max_new_tokens=per_row)
        _assert_same(want, got)
        assert want.stopped.any() and not want.stopped.all()  # the stop ids end some rows early
        if per_row is not None:
            assert (got.lengths <= budgets).all() and (got.lengths[~got.stopped] == budgets[~got.stopped]).all()
        stats = continuous._continuous.last_stats
        assert stats.slots == 4 and stats.inserts >= rows // 4
        if cfg.group_size > 1:
            assert stats.decode_steps > 32 + BUDGET  # more steps than the cache's 52 columns: moved to the front
        assert stats.attended_columns < stats.row_steps * (32 + BUDGET)  # decode calls attended over windows


def test_continuous_logprobs_match_teacher_forcing(engines):
    """Returned log-probs equal a cache-free forward over prompt + response (rows that ran in refilled slots)."""
    model, _, continuous = engines
    cfg = SamplingConfig(temperature=1.2, group_size=2, max_new_tokens=BUDGET)
    out = continuous.generate(PROMPTS, cfg, jax.random.key(5))
    logits = _teacher_forced_logits(model, out)
    ref = np.take_along_axis(_log_softmax(logits), out.response_ids[..., None], -1)[..., 0]
    mask = out.response_mask.astype(bool)
    np.testing.assert_allclose(out.logprobs[mask], ref[mask], atol=1e-4, rtol=0)
    assert (out.logprobs[~mask] == 0).all() and (out.response_ids[~mask] == PAD).all()


def test_rows_do_not_depend_on_slots_or_refill_order(engines):
    """One slot per row, 2 slots, 8 slots: a row's tokens depend only on (key, prompt, sample)."""
    model, static, continuous = engines
    cfg = SamplingConfig(temperature=1.0, group_size=2, max_new_tokens=BUDGET)
    want = continuous.generate(PROMPTS, cfg, jax.random.key(9))
    for slots, refill in ((2, 1), (8, 2), (18, None)):
        other = Sampler(model, pad_id=PAD, stop_token_ids=continuous.stop_token_ids, slots=slots,
                        refill_prompts=refill)
        _assert_same(want, other.generate(PROMPTS, cfg, jax.random.key(9)))
    assert (want.response_ids != continuous.generate(PROMPTS, cfg, jax.random.key(10)).response_ids).any()


def test_groups_prefill_each_prompt_once_and_memory_is_bounded_by_slots(engines):
    """Inserts prefill prompts, not rows (a group's samples share one prefill); every compiled shape holds 4 slots
    of (prompt bucket + budget) cache, however many rows a call has; equal calls compile nothing new."""
    _, _, continuous = engines
    cfg = SamplingConfig(temperature=1.0, group_size=2, max_new_tokens=BUDGET)
    continuous.generate(PROMPTS, cfg, 1)
    before = continuous.compile_count
    continuous.generate(PROMPTS * 5, cfg.replace(temperature=0.7), 2)  # 90 rows, new traced values
    continuous.update_params(continuous._state)  # new weights of the same shapes
    continuous.generate(PROMPTS, cfg, 3)
    assert continuous.compile_count == before
    specs = [sig for sig in continuous.traces if sig[-1].decode.group_size == 2]
    assert {sig[-1].slots for sig in specs} == {4} and {sig[-1].cache_len for sig in specs} == {32 + BUDGET}
    assert {sig[1][0] for sig in specs if sig[0] == "insert"} == {2, 1}  # first fill 2 prompts, refills 1


def test_decode_loop_updates_the_slot_cache_in_place(engines):
    """Every compiled decode (the whole cache and each attention window) moves and updates the KV cache in place,
    never copying a cache buffer, and a windowed decode's steps read only the window's columns (XLA's per-step
    attention operand, [slots, kv heads, columns, head dim], has the window's width, not the cache's)."""
    _, _, continuous = engines
    engine = continuous._continuous
    continuous.generate(PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=BUDGET), 0)
    specs = [s[-1] for s in continuous.traces if s[0] == "decode" and s[-1].decode.greedy and s[-1].slots == 4]
    assert sorted(spec.attended for spec in specs) == [16, 32, 40, 52]  # every window compiled in the first call
    for spec in specs:
        state = engine._init(spec=spec)
        hlo = engine._decode.lower(continuous._state, state, np.int32(4), np.float32(0), np.float32(1),
                                   spec=spec).compile().as_text()
        cache_shapes = {f"f32[4,{columns},2,8]" for columns in (52, spec.attended)}  # [slots, columns, heads, dim]
        assert " while(" in hlo and "f32[4,52,2,8]" in hlo
        copies = [line for line in hlo.splitlines()
                  if any(shape in line.split("=", 1)[-1][:40] for shape in cache_shapes)
                  and re.search(r"\b(copy|copy-start)\(", line)]
        assert not copies, copies[:3]
        assert f"f32[4,2,{spec.attended},8]" in hlo
        if spec.window is not None:
            assert "f32[4,2,52,8]" not in hlo, spec.window


def test_bad_engine_settings_and_budgets_give_clear_errors(engines):
    model, static, _ = engines
    with pytest.raises(ValueError, match="engine must be one of"):
        Sampler(model, pad_id=PAD, engine="paged")
    with pytest.raises(ValueError, match="slots must be a positive integer"):
        Sampler(model, pad_id=PAD, slots=0)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=4)
    with pytest.raises(ValueError, match="one integer per row"):
        static.generate(PROMPTS[:2], cfg, 0, max_new_tokens=[4])
    with pytest.raises(ValueError, match=r"max_new_tokens\[1\] = 5 is outside \[1, "):
        static.generate(PROMPTS[:2], cfg, 0, max_new_tokens=[4, 5])


def test_the_schedule_model_replays_the_engine_and_the_drain_compacts(engines):
    """With forced lengths, `simulate_continuous` (the benchmark's schedule model) predicts the engine's decode steps
    and row-steps exactly; once the queue is empty the running rows move to fewer slots (row-steps < steps x 4)."""
    from toolrl_jax.sampling.scheduler import RefillPolicy, simulate_continuous

    model, static, _ = engines
    continuous = Sampler(model, pad_id=PAD, stop_token_ids=static.stop_token_ids, slots=16, refill_prompts=1)
    cfg = SamplingConfig(temperature=1.0, group_size=2, max_new_tokens=BUDGET, ignore_stop=True)
    budgets = np.random.default_rng(4).integers(1, BUDGET + 1, size=len(PROMPTS) * 2)
    out = continuous.generate(PROMPTS, cfg, jax.random.key(1), max_new_tokens=budgets)
    np.testing.assert_array_equal(out.lengths, budgets)
    _assert_same(static.generate(PROMPTS, cfg, jax.random.key(1), max_new_tokens=budgets), out)
    stats = continuous._continuous.last_stats
    assert simulate_continuous(budgets, RefillPolicy(16, 2, refill_prompts=1)) == (stats.decode_steps,
                                                                                   stats.row_steps)
    assert stats.compactions == 3 and stats.row_steps < stats.decode_steps * 16  # 16 -> 8 -> 4 -> 2 slots
    assert {sig[-1].slots for sig in continuous.traces if sig[0] == "decode"} == {16, 8, 4, 2}


def test_attention_windows_cover_the_running_rows_and_change_nothing(engines):
    """The window policy: a few sizes up to the cache length, the smallest holding the oldest row's span plus some
    room; an engine without windows (each step attends over the whole cache) gives the same rows."""
    from toolrl_jax.sampling.scheduler import WindowPolicy

    policy = WindowPolicy(1088, 4)
    assert policy.sizes == (272, 544, 816, 1088) and policy.room == 68
    assert [policy.window(span) for span in (0, 204, 205, 600, 748, 749, 1087)] == [272, 272, 544, 816, 816, 1088,
                                                                                     1088]
    assert WindowPolicy(52, 4, min_window=8).sizes == (16, 32, 40, 52) and WindowPolicy(52, 1).sizes == (52,)
    assert WindowPolicy(52, 4).sizes == (52,) and WindowPolicy(1088, 16).sizes[:2] == (136, 208)  # not 72
    with pytest.raises(RuntimeError, match="spans 52 columns of a 52-column cache"):
        WindowPolicy(52, 4).window(52)
    # One spec per attended width: the whole cache is window None, never an explicit full-width window.
    from toolrl_jax.sampling.continuous import SlotSpec
    spec = SlotSpec(decode=None, slots=4, cache_len=52)  # (the window rule reads no decode setting)
    assert spec.with_window(52) == spec and spec.with_window(60).window is None and spec.with_window(16).window == 16
    assert spec.attended == 52 and spec.with_window(16).attended == 16
    for bad in (0, 52):
        with pytest.raises(ValueError, match=r"window must be in \[1, cache_len=52\) or None"):
            SlotSpec(decode=None, slots=4, cache_len=52, window=bad)
    with pytest.raises(ValueError, match="decode windows must be a positive integer"):
        Sampler(engines[0], pad_id=PAD, decode_windows=0)
    with pytest.raises(ValueError, match="the minimum decode window must be a positive integer"):
        Sampler(engines[0], pad_id=PAD, min_decode_window=0)

    model, _, windowed = engines
    whole = Sampler(model, pad_id=PAD, stop_token_ids=windowed.stop_token_ids, slots=4, refill_prompts=1,
                    decode_windows=1)
    cfg = SamplingConfig(temperature=1.0, group_size=2, max_new_tokens=BUDGET)
    want = whole.generate(PROMPTS, cfg, jax.random.key(4))
    _assert_same(want, windowed.generate(PROMPTS, cfg, jax.random.key(4)))
    full, windows = whole._continuous.last_stats, windowed._continuous.last_stats
    assert full.attended_columns == full.row_steps * 52 and {s[-1].window for s in whole.traces} == {None}
    assert windows.row_steps == full.row_steps and windows.attended_columns < full.attended_columns
