"""Benchmark: multi-turn rollout generation with KV reuse across turns (`sampling/sessions.py`) against
re-prefilling every turn's whole conversation (`multiturn.sampler_generate` over the continuous or static engine),
side by side in one process on the same random weights and the same workload.

    python -m experiments.bench_multiturn --model=smollm2-135m --dtype=float32 --trajectories=16 --turns=4 \
        --prompt_len=216 --turn_tokens=80 --json_out=bench_multiturn.json

Workload (seeded, identical for every generator): --trajectories conversations of a --prompt_len-token opening
prompt (groups of --group_size share it, as GRPO's do); on each of --turns turns, row i generates exactly n_ti tokens
(per-row budgets, stop tokens ignored; n_ti log-normal with mean --turn_mean, clipped to [4, --turn_tokens]) and
then gets m_ti 'tool result' tokens appended (log-normal, mean --result_mean): the shape of the synthetic
environment's trajectories (reference turns ~50 tokens, results ~25). Each generator runs the whole rollout once to
compile, then --repeats times timed. Reported per generator: median wall time of a rollout, useful (generated)
tokens/s, padded prompt tokens prefilled, whether its tokens equal the first generator's (same keys), and for the
session the sessions per rollout (1: every turn continued the first turn's caches).
"""
from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from absl import app, flags

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "A preset of toolrl_jax.models.config.PRESETS, or 'tiny'.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "Weights and compute dtype.")
_TRAJ = flags.DEFINE_integer("trajectories", 16, "Trajectories per rollout.")
_GROUP = flags.DEFINE_integer("group_size", 4, "Trajectories per opening prompt (a GRPO group).")
_TURNS = flags.DEFINE_integer("turns", 4, "Turns per trajectory.")
_PROMPT = flags.DEFINE_integer("prompt_len", 216, "Opening prompt tokens.")
_TURN_TOKENS = flags.DEFINE_integer("turn_tokens", 80, "Token cap of one turn.")
_TURN_MEAN = flags.DEFINE_float("turn_mean", 50.0, "Mean generated tokens per turn.")
_RESULT_MEAN = flags.DEFINE_float("result_mean", 25.0, "Mean tool-result tokens appended after a turn.")
_GENERATORS = flags.DEFINE_list("generators", ["session", "continuous", "static"],
                                "session: KV reuse; continuous / static: re-prefill through that engine.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed rollouts per generator (median reported).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights, prompts, lengths and sampling.")
_JSON = flags.DEFINE_string("json_out", "bench_multiturn.json", "Write all figures here.")


def _lengths(rng: np.random.Generator, mean: float, size: tuple[int, ...], low: int, high: int) -> np.ndarray:
    sigma = 0.35
    return np.clip(np.round(rng.lognormal(np.log(mean) - sigma ** 2 / 2, sigma, size)), low, high).astype(int)


def workload(vocab: int) -> tuple[list[list[int]], np.ndarray, list[list[list[int]]]]:
    """(opening prompts, generated lengths [turns, trajectories], tool-result tokens [turn][trajectory])."""
    rng = np.random.default_rng(_SEED.value)
    low = 1000 if vocab > 2000 else 3
    openings = rng.integers(low, vocab, size=(_TRAJ.value // _GROUP.value, _PROMPT.value)).tolist()
    prompts = [openings[i // _GROUP.value] for i in range(_TRAJ.value)]
    generated = _lengths(rng, _TURN_MEAN.value, (_TURNS.value, _TRAJ.value), 4, _TURN_TOKENS.value)
    results = [[rng.integers(low, vocab, size=int(n)).tolist() for n in row]
               for row in _lengths(rng, _RESULT_MEAN.value, (_TURNS.value, _TRAJ.value), 4, 256)]
    return prompts, generated, results


def rollout(generate: Any, prompts: list[list[int]], generated: np.ndarray, results: list[list[list[int]]]
            ) -> list[np.ndarray]:
    """All turns of every trajectory through `generate` (a multi-turn GenerateFn); returns each turn's tokens."""
    import jax

    rows = [(i // _GROUP.value, i % _GROUP.value) for i in range(len(prompts))]
    conversations, tokens = [list(p) for p in prompts], []
    key = jax.random.key(_SEED.value)
    for turn in range(_TURNS.value):
        outs = generate(conversations, generated[turn].tolist(), jax.random.fold_in(key, turn), rows)
        tokens.append(np.concatenate([o.token_ids for o in outs]))
        conversations = [c + o.token_ids.tolist() + results[turn][i] for i, (c, o) in
                         enumerate(zip(conversations, outs))]
    return tokens


def main(argv: list[str]) -> None:
    del argv
    import jax
    from flax import nnx

    from experiments.common import named_model_config
    from toolrl_jax.models.decoder import CausalLM
    from toolrl_jax.multiturn import sampler_generate
    from toolrl_jax.sampling import Sampler, SamplingConfig
    from toolrl_jax.sampling.config import prompt_length_bucket
    from toolrl_jax.sampling.sessions import SessionGenerator, session_cache_len

    config = named_model_config(_MODEL.value).replace(dtype=_DTYPE.value, param_dtype=_DTYPE.value)
    model = CausalLM(config, rngs=nnx.Rngs(_SEED.value))
    prompts, generated, results = workload(config.vocab_size)
    longest = _PROMPT.value + int(generated.sum(0).max() + sum(max(map(len, r)) for r in results))
    cfg = SamplingConfig(max_new_tokens=_TURN_TOKENS.value, temperature=1.0, ignore_stop=True,
                         max_prompts_per_batch=_TRAJ.value, prefill_chunk=None)
    figures: dict[str, Any] = {"device": jax.devices()[0].device_kind, "model": _MODEL.value, "dtype": _DTYPE.value,
                               "trajectories": _TRAJ.value, "turns": _TURNS.value, "prompt_len": _PROMPT.value,
                               "useful_tokens": int(generated.sum()), "longest_conversation": longest,
                               "generators": {}}
    reference = None
    for name in _GENERATORS.value:
        sampler = Sampler(model, pad_id=0, engine="static" if name == "static" else "continuous",
                          slots=_TRAJ.value)
        if name == "session":
            # The trainer's rule (GRPOTrainer.multiturn_rollout): the prompt bucket, the longest response, and a
            # chunk allowance per turn.
            generate = SessionGenerator(sampler, cfg, cache_len=session_cache_len(
                prompt_length_bucket(_PROMPT.value, cfg), longest - _PROMPT.value, _TURNS.value))
        else:
            generate = sampler_generate(sampler, cfg)
        start = time.perf_counter()
        tokens = rollout(generate, prompts, generated, results)  # compiles every shape the timed rollouts use
        warmup = time.perf_counter() - start
        compiles, times = sampler.compile_count, []
        sessions_before = getattr(generate, "new_sessions", 0)
        for _ in range(_REPEATS.value):
            if name == "session":
                generate.reset()
                generate.prefill_tokens = 0
            start = time.perf_counter()
            rollout(generate, prompts, generated, results)
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        extra = {}
        if name == "session":
            prefilled = generate.prefill_tokens
            extra["sessions_per_rollout"] = (generate.new_sessions - sessions_before) / _REPEATS.value
        else:  # every turn re-prefills each conversation, padded to its prompt bucket
            prefilled, grown = 0, np.asarray([len(p) for p in prompts])
            for turn in range(_TURNS.value):
                prefilled += len(prompts) * prompt_length_bucket(int(grown.max()), cfg)
                grown = grown + generated[turn] + np.asarray([len(r) for r in results[turn]])
        reference = tokens if reference is None else reference
        same = all(np.array_equal(a, b) for a, b in zip(tokens, reference))
        figures["generators"][name] = {
            "seconds": seconds, "warmup_s": warmup, "useful_tokens_per_s": int(generated.sum()) / seconds,
            "prefilled_tokens": int(prefilled), "recompiled": sampler.compile_count != compiles,
            "same_tokens_as_first": bool(same), **extra}
        print(f"{name:>10}: {seconds:7.2f} s per rollout  {int(generated.sum()) / seconds:7.1f} useful tok/s  "
              f"{prefilled:7d} prompt tokens prefilled  same tokens: {same}", flush=True)
    with open(_JSON.value, "w") as f:
        json.dump(figures, f, indent=2)


if __name__ == "__main__":
    app.run(main)
