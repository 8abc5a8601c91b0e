"""KV reuse across turns (`sampling/sessions.py`): a session that prefills only each turn's new tokens samples what
a full re-prefill of the conversation samples, and falls back to a new session whenever reuse would be wrong."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from tests.test_sampling import _model
from toolrl_jax.sampling import Sampler, SamplingConfig
from toolrl_jax.sampling.sessions import SessionGenerator

PAD = 0
BUDGET = 12
RNG = np.random.default_rng(5)
PROMPTS = [RNG.integers(3, 128, size=int(n)).tolist() for n in RNG.integers(2, 20, size=5)]
ROWS = [(7, 0), (7, 1), (2, 0), (9, 3), (4, 1)]  # (task, sample) row ids, as a GRPO multi-turn rollout passes


@pytest.fixture(scope="module")
def sharp():
    """A sharp (trained-like) float32 model and a static sampler whose two stop ids end some rows mid-way."""
    model = _model("llama", seed=1, sharpen=10.0)
    free = Sampler(model, pad_id=PAD, engine="static").generate(
        PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=BUDGET), 0)
    counts = np.bincount(free.response_ids[:, 2:].ravel(), minlength=128)
    stops = tuple(int(t) for t in np.argsort(-counts)[:2])
    return model, Sampler(model, pad_id=PAD, stop_token_ids=stops, engine="static")


def _full(sampler, prompts, cfg, key, budgets, rows):
    """The reference: the whole conversation re-prefilled, rows keyed by their ids."""
    out = sampler.generate(prompts, cfg, key, max_new_tokens=budgets, prompt_numbers=[r[0] for r in rows],
                           sample_numbers=[r[1] for r in rows])
    return [(out.response_ids[i, :n], out.logprobs[i, :n], bool(out.stopped[i]))
            for i, n in enumerate(out.lengths.tolist())]


def _same(got, want) -> None:
    assert len(got) == len(want)
    for g, (tokens, logprobs, stopped) in zip(got, want):
        np.testing.assert_array_equal(g.token_ids, tokens)
        np.testing.assert_allclose(g.logprobs, logprobs, atol=1e-5, rtol=0)
        assert g.stopped == stopped


def _conversation(sampler, generate, cfg, turns: int, rng: np.random.Generator, subset=None):
    """Runs `turns` turns through `generate` and the full re-prefill side by side: after each turn every chosen
    row's prompt grows by its turn and a few 'tool result' tokens, and some rows drop out."""
    prompts, rows = [list(p) for p in PROMPTS], list(ROWS)
    key = jax.random.key(11)
    for turn in range(turns):
        budgets = rng.integers(1, BUDGET + 1, size=len(rows)).tolist()
        turn_key = key if turn == 0 else jax.random.fold_in(key, turn)
        got = generate(prompts, budgets, turn_key, rows)
        _same(got, _full(sampler, prompts, cfg, turn_key, budgets, rows))
        keep = subset(turn, len(rows)) if subset else range(len(rows))
        prompts = [prompts[i] + got[i].token_ids.tolist() + rng.integers(3, 128, size=int(rng.integers(1, 9))).tolist()
                   for i in keep]
        rows = [rows[i] for i in keep]


@pytest.mark.parametrize("cfg", [
    SamplingConfig(temperature=0.0, max_new_tokens=BUDGET),
    SamplingConfig(temperature=1.0, top_p=0.9, top_k=30, max_new_tokens=BUDGET),
], ids=["greedy", "sampled"])
def test_continued_turns_equal_full_reprefill(sharp, cfg):
    """Four turns with rows stopping early (stop ids, per-row budgets) and rows leaving the conversation: the same
    tokens, stops and log-probs (to 1e-5) as re-prefilling every conversation, from one session, prefilling far
    fewer tokens."""
    _, sampler = sharp
    session = SessionGenerator(sampler, cfg)
    _conversation(sampler, session, cfg, 4, np.random.default_rng(0),
                  subset=lambda turn, n: [i for i in range(n) if (i + turn) % 4])
    assert (session.new_sessions, session.continued_calls) == (1, 3)
    first = 8 * 32  # the first call: 5 rows padded to 8, prompts to their 32-token bucket
    assert session.prefill_tokens <= first + 3 * 8 * 32  # continuation chunks: at most 32 new tokens per row


def test_new_sessions_when_reuse_would_be_wrong(sharp):
    """A prompt that does not extend its row's cache, an unknown row, new weights, or a full cache each start a new
    session (from the whole prompts), and the tokens stay those of a full re-prefill."""
    model, sampler = sharp
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=BUDGET)
    session = SessionGenerator(sampler, cfg)
    key = jax.random.key(2)
    budgets = [BUDGET] * len(ROWS)
    first = session(PROMPTS, budgets, key, ROWS)
    grown = [p + g.token_ids.tolist() + [5, 6] for p, g in zip(PROMPTS, first)]
    edited = [list(p) for p in grown]
    edited[1][0] = (edited[1][0] % 120) + 4  # row 1's conversation no longer starts with what its cache holds
    cases = [(edited, ROWS), (grown, ROWS[:-1] + [(99, 0)])]
    for prompts, rows in cases:
        before = session.new_sessions
        _same(session(prompts, budgets, key, rows), _full(sampler, prompts, cfg, key, budgets, rows))
        assert session.new_sessions == before + 1
    # New weights (a GRPO update) make every cached key and value stale.
    session(PROMPTS, budgets, key, ROWS)
    sampler.update_params(model)
    before = session.new_sessions
    _same(session(grown, budgets, key, ROWS), _full(sampler, grown, cfg, key, budgets, ROWS))
    assert session.new_sessions == before + 1
    # A cache too short for another turn: a new session, not an overflow.
    small = SessionGenerator(sampler, cfg, cache_len=32 + 16 + BUDGET)
    got = small(PROMPTS, budgets, key, ROWS)
    grown = [p + g.token_ids.tolist() + [5] for p, g in zip(PROMPTS, got)]
    _same(small(grown, budgets, key, ROWS), _full(sampler, grown, cfg, key, budgets, ROWS))
    assert (small.new_sessions, small.continued_calls) == (2, 0)
    # A cache too short even for the first prompt: that session gets a longer one.
    tight = SessionGenerator(sampler, cfg, cache_len=40)
    _same(tight(PROMPTS, budgets, key, ROWS), _full(sampler, PROMPTS, cfg, key, budgets, ROWS))
    assert tight.session.cache_len >= 32 + BUDGET


def test_no_recompiles_across_turns_and_sessions(sharp):
    """One program per chunk width, shared by the sampler's sessions: a second conversation of the same shape, in a
    new session generator too, compiles nothing."""
    model, static = sharp
    sampler = Sampler(model, pad_id=PAD, stop_token_ids=static.stop_token_ids, engine="static")
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=BUDGET)
    session = SessionGenerator(sampler, cfg)
    _conversation(sampler, session, cfg, 3, np.random.default_rng(3))
    traces = {sig: n for sig, n in sampler.traces.items() if sig[0] in ("start", "continue")}
    _conversation(sampler, SessionGenerator(sampler, cfg), cfg, 3, np.random.default_rng(3))
    assert {sig: n for sig, n in sampler.traces.items() if sig[0] in ("start", "continue")} == traces
    assert all(n == 1 for n in traces.values()) and {sig[0] for sig in traces} == {"start", "continue"}


def test_bench_multiturn_smoke(tmp_path):
    """experiments/bench_multiturn.py on a tiny model: every generator samples the same tokens, none recompiles in
    the timed rollouts, and the session prefills fewer prompt tokens than re-prefilling."""
    import json
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_multiturn", "--model=tiny", "--trajectories=4",
                           "--group_size=2", "--turns=3", "--prompt_len=16", "--turn_tokens=8", "--turn_mean=5",
                           "--result_mean=4", "--repeats=1", f"--json_out={out}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(out.read_text())["generators"]
    assert set(figures) == {"session", "continuous", "static"}
    assert all(g["same_tokens_as_first"] and not g["recompiled"] for g in figures.values())
    assert figures["session"]["prefilled_tokens"] < figures["static"]["prefilled_tokens"]


def test_a_group_shares_its_opening_prefill(sharp):
    """Trajectories of one task start from the same prompt: a new session prefills it once and copies its cache
    rows, and every row still samples what a full re-prefill samples."""
    _, sampler = sharp
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=BUDGET)
    session = SessionGenerator(sampler, cfg)
    prompts = [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    rows = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    key = jax.random.key(4)
    got = session(prompts, [BUDGET] * 6, key, rows)
    _same(got, _full(sampler, prompts, cfg, key, [BUDGET] * 6, rows))
    assert session.prefill_tokens == 2 * 32  # two distinct prompts in their 32-token bucket, not 8 rows
    assert not np.array_equal(got[0].token_ids, got[1].token_ids)  # the samples of a group still differ
    grown = [p + g.token_ids.tolist() + [9] for p, g in zip(prompts, got)]
    _same(session(grown, [BUDGET] * 6, key, rows), _full(sampler, grown, cfg, key, [BUDGET] * 6, rows))
    assert session.continued_calls == 1
