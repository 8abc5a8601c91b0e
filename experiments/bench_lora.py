"""Benchmark: sampling from a LoRA policy with adapter-aware matmuls (base(x) + (x @ A) @ B * scale in every
adapted projection) against sampling from the merged weights (kernel + scale * A @ B, folded once per policy
update), side by side in one process on the same random weights, prompts and key.

    python -m experiments.bench_lora [--model=smollm2-135m] [--rank=16] [--batch=16] [--prompt_len=128] \
        [--new_tokens=64] [--repeats=3] [--json_out=bench_lora.json]
    python -m experiments.bench_lora --model=tiny --batch=2 --prompt_len=8 --new_tokens=4 --repeats=1   # smoke

Reported: median seconds of one generate call per engine (after a compile call, calls alternating between the two
so a noisy machine slows both alike), new tokens/s, the time to merge the adapters (paid once per policy update
when sampling merged), and how many greedy tokens the two agree on (they differ only by float rounding).
"""
from __future__ import annotations

import json
import platform
import time
from typing import Any

import numpy as np
from absl import app, flags

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "A preset of toolrl_jax.models.config.PRESETS, or 'tiny'.")
_RANK = flags.DEFINE_integer("rank", 16, "LoRA rank (adapters on every attention and MLP projection).")
_BATCH = flags.DEFINE_integer("batch", 16, "Sequences per generate call.")
_PROMPT = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per sequence (random ids).")
_NEW = flags.DEFINE_integer("new_tokens", 64, "New tokens per sequence (stop tokens ignored).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per engine (median reported).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "Weights and compute dtype.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights, adapters, prompts and sampling.")
_JSON = flags.DEFINE_string("json_out", "bench_lora.json", "Write the figures here.")


def _model():
    import jax
    from flax import nnx

    from experiments.common import named_model_config
    from toolrl_jax.models.decoder import CausalLM
    from toolrl_jax.models.lora import LoRAConfig, adapted_layers, apply_lora

    config = named_model_config(_MODEL.value, tiny_family="llama").replace(dtype=_DTYPE.value, param_dtype=_DTYPE.value)
    model = CausalLM(config, rngs=nnx.Rngs(_SEED.value))
    apply_lora(model, LoRAConfig(rank=_RANK.value, alpha=2.0 * _RANK.value), jax.random.key(_SEED.value))
    for i, dense in enumerate(adapted_layers(model).values()):  # trained-looking adapters: B away from zero
        key = jax.random.fold_in(jax.random.key(_SEED.value + 1), i)
        dense.lora_b = type(dense.lora_b)(0.01 * jax.random.normal(key, dense.lora_b.shape, dense.lora_b.dtype))
    return model


def main(argv: list[str]) -> None:
    del argv
    import jax
    from flax import nnx

    from toolrl_jax.models.lora import merge_lora
    from toolrl_jax.sampling import Sampler, SamplingConfig

    model = _model()
    config = model.config
    start = time.perf_counter()
    merged = merge_lora(model)
    jax.block_until_ready(jax.tree.leaves(nnx.state(merged)))
    merge_s = time.perf_counter() - start
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    engines = {"adapters": Sampler(model, pad_id=pad, stop_token_ids=config.eos_token_ids),
               "merged": Sampler(merged, pad_id=pad, stop_token_ids=config.eos_token_ids)}
    rng = np.random.default_rng(_SEED.value)
    prompts = rng.integers(3, config.vocab_size, size=(_BATCH.value, _PROMPT.value)).tolist()
    cfg = SamplingConfig(max_new_tokens=_NEW.value, temperature=0.0, ignore_stop=True,
                         prompt_length_buckets=(_PROMPT.value,), batch_buckets=(_BATCH.value,))
    key = jax.random.key(_SEED.value)
    outputs = {name: sampler.generate(prompts, cfg, key) for name, sampler in engines.items()}  # compiles
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(_REPEATS.value):
        for name, sampler in engines.items():
            t0 = time.perf_counter()
            sampler.generate(prompts, cfg, key)
            times[name].append(time.perf_counter() - t0)
    agree = float(np.mean(outputs["adapters"].response_ids == outputs["merged"].response_ids))
    rows: list[dict[str, Any]] = []
    for name in engines:
        seconds = float(np.median(times[name]))
        rows.append({"engine": name, "seconds": seconds, "new_tokens_per_s": _BATCH.value * _NEW.value / seconds})
    result = {"model": _MODEL.value, "rank": _RANK.value, "batch": _BATCH.value, "prompt_len": _PROMPT.value,
              "new_tokens": _NEW.value, "dtype": _DTYPE.value, "repeats": _REPEATS.value, "merge_s": merge_s,
              "greedy_token_agreement": agree, "rows": rows, "device": jax.devices()[0].device_kind,
              "machine": platform.node(), "jax": jax.__version__}
    print(f"{'engine':<10} {'seconds':>8} {'new tok/s':>10}")
    for r in rows:
        print(f"{r['engine']:<10} {r['seconds']:>8.2f} {r['new_tokens_per_s']:>10.1f}")
    print(f"merge {merge_s:.3f} s; greedy tokens agreeing: {agree:.3f}; device {result['device']}")
    with open(_JSON.value, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
