"""Benchmark: reward scoring of a rollout batch (default 2,048 responses), serial vs process pool, plus the JAX
token-level tag counter against the string format check it would pre-filter.

    python -m experiments.bench_rewards [--test_parquet ../shared/data/toolrl/test.parquet] [--num_workers 2]

Responses are realistic: ground truths (from --test_parquet, else synthetic) with a long generated <think>
(50-400 words), mixed 40% correct / 40% mutated (dropped call, swapped order, changed value, extra key, bad JSON,
missing newline, "arguments" key, duplicated call, ...) / 20% garbage.
"""
from __future__ import annotations

import functools
import json
import random

from absl import app, flags

from experiments.tools.reward_mutations import rollout_mix, synthetic_ground_truth
from toolrl_jax.metrics import median_seconds
from toolrl_jax.rewards import RewardConfig, make_reward_pool, parse_ground_truth, parse_response, score_batch
from toolrl_jax.rewards.reward import format_ok

_N = flags.DEFINE_integer("num_responses", 2048, "Responses per batch.")
_WORKERS = flags.DEFINE_integer("num_workers", 2, "Worker processes for the pooled run.")
_CHUNK = flags.DEFINE_integer("chunk_size", 128, "Responses per pool task.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions (median reported).")
_PARQUET = flags.DEFINE_string("test_parquet", None, "ToolRL parquet whose ground truths to use (else synthetic).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the response mix.")
_TOKENS = flags.DEFINE_integer("token_length", 1024, "Response token length for the JAX tag-counter timing.")
_JSON = flags.DEFINE_string("json_out", None, "Write the figures to this JSON file.")

def _token_path_timing(responses: list[str], targets: list[str], length: int, repeats: int) -> dict[str, float]:
    """Time the JAX tag counter on [N, length] ids vs the string format check on the same responses."""
    import jax
    import numpy as np

    from toolrl_jax.rewards.token_format import (
        TagTokenPatterns,
        count_tag_tokens,
        definitely_malformed,
        encode_bytes_with_specials,
        required_once_mask,
    )

    specials = {"<tool_call>": 256, "</tool_call>": 257}  # single special tokens, as in Qwen's vocabulary
    encode = functools.partial(encode_bytes_with_specials, special_ids=specials)
    patterns = TagTokenPatterns.from_encode(encode)
    ids = np.zeros((len(responses), length), np.int32)
    mask = np.zeros((len(responses), length), bool)
    for b, text in enumerate(responses):
        row = encode(text)[:length]
        ids[b, : len(row)], mask[b, : len(row)] = row, True
    gts = [parse_ground_truth(t) for t in targets]
    required = required_once_mask(gts)
    ids_d, mask_d, req_d = jax.device_put(ids), jax.device_put(mask), jax.device_put(required)
    pat_ids, pat_len = jax.device_put(patterns.ids), jax.device_put(patterns.lengths)

    def token_path():
        counts = count_tag_tokens(ids_d, mask_d, pat_ids, pat_len)
        return np.asarray(definitely_malformed(counts, req_d))

    rejected = token_path()  # compile
    parsed = [parse_response(t) for t in responses]
    string_time = median_seconds(lambda: [format_ok(p, g) for p, g in zip(parsed, gts)], repeats)
    return {
        "token_path_s": median_seconds(token_path, repeats),
        "string_format_check_s": string_time,
        "token_prefilter_rejects": int(rejected.sum()),
        "string_format_failures": sum(not format_ok(p, g) for p, g in zip(parsed, gts)),
        "jax_backend": jax.default_backend(),
    }


def main(argv: list[str]) -> None:
    del argv
    if _PARQUET.value:
        import pyarrow.parquet as pq

        gts = [row["reward_model"]["ground_truth"] for row in pq.read_table(_PARQUET.value).to_pylist()]
        source = _PARQUET.value
    else:
        rng = random.Random(_SEED.value + 1)
        gts = [synthetic_ground_truth(rng) for _ in range(512)]
        source = "synthetic"
    responses, targets = rollout_mix(_N.value, gts, _SEED.value)
    chars = sum(map(len, responses)) / len(responses)
    results: dict[str, object] = {"num_responses": len(responses), "ground_truths": source,
                                  "mean_response_chars": round(chars, 1)}
    configs = {
        "original": RewardConfig(),
        "all_options": RewardConfig(length=True, scheduled_scale=True, matching="optimal", value_match="tolerant",
                                    partial_format=True),
    }
    with make_reward_pool(_WORKERS.value) as pool:
        score_batch(responses, targets, 1, pool=pool, chunk_size=_CHUNK.value)  # start the workers
        for name, config in configs.items():
            serial = median_seconds(lambda config=config: score_batch(responses, targets, 1, config), _REPEATS.value)
            pooled = median_seconds(
                lambda config=config: score_batch(responses, targets, 1, config, pool=pool, chunk_size=_CHUNK.value),
                _REPEATS.value)
            batch = score_batch(responses, targets, 1, config)
            results[name] = {"serial_s": serial, f"pool{_WORKERS.value}_s": pooled,
                             "mean_total": float(batch.total.mean()), "accuracy": float(batch.accuracy.mean())}
    results["parse_only_s"] = median_seconds(lambda: [parse_response(r) for r in responses], _REPEATS.value)
    results["token_path"] = _token_path_timing(responses, targets, _TOKENS.value, _REPEATS.value)
    print(json.dumps(results, indent=2))
    if _JSON.value:
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
