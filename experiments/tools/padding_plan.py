"""Counting the padding of a GRPO step's training compute under each trim_padding scheme (host-only, no model run).

Rows are laid out as `GRPOTrainer` lays them out (`row_order`: prompt bucket, response length, prompt length;
`trimmed_widths`), and each scheme's [row, column] cells, FLOPs and distinct compiled shapes are counted;
experiments/bench_padding.py runs it on a dataset. Schemes:

  none        no trimming: every row at the step's prompt bucket + the whole response budget,
  minibatch   log-prob chunks of sorted rows cut to their own widths, each update mini-batch cut to its longest row,
  micro       log-prob chunks as above, and every update micro-batch of sorted rows cut to its own widths (the
              trainer's scheme),
  aligned     not implemented in the trainer, counted to size a next step: rows left-aligned ([prompt | response |
              padding]), sorted by total length, every chunk and micro-batch one width, the longest prompt + response
              rounded up to a power of two (>= 64) or to a multiple of `aligned_bucket`.

FLOPs per row of width w with r response positions, forward: 2 * N_body * w (projections; N_body = parameters
without the embedding table) + 4 * layers * heads * head_dim * w^2 (the masked einsum attention computes every
score) + 2 * vocab * hidden * r (the head, response positions only); an update counts 3x its forward.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from toolrl_jax.models.config import ModelConfig
from toolrl_jax.sampling.config import SamplingConfig, next_power_of_two, prompt_length_bucket
from toolrl_jax.training.layout import training_order, trimmed_widths

SCHEMES = ("none", "minibatch", "micro", "aligned")


def data_lengths(path: str, tokenizer: Any, max_prompt: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt tokens (chat template, generation prompt, tail kept) and reference answer tokens (+1 end of turn) of
    the ToolRL examples in `path` (parquet or SFT json)."""
    from toolrl_jax.datasets.io import read_examples
    from toolrl_jax.tokenization import encode_chat

    examples = read_examples(path)
    if not examples:
        raise ValueError(f"{path} holds no examples")
    prompts = np.array([min(max_prompt, len(encode_chat(tokenizer, e.prompt_messages))) for e in examples])
    answers = np.array([len(tokenizer.encode(e.ground_truth, add_special_tokens=False)) + 1 for e in examples])
    return prompts, answers


class Layout:
    """Counts one scheme's cells, FLOPs and distinct shapes over the steps."""

    def __init__(self, model_config: ModelConfig):
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
    return max(64, next_power_of_two(total)) if step <= 0 else -(-total // step) * step


def lay_out_step(prompt_len: np.ndarray, response_len: np.ndarray, layouts: dict[str, Layout], *, micro: int,
                 rows_per_minibatch: int, epochs: int, logprob_passes: int, sampling: SamplingConfig,
                 response_buckets: Optional[tuple[int, ...]], max_response: int, aligned_bucket: int = 0) -> None:
    """Adds one step's rows (real prompt and response lengths [N], in rollout order) to the counts of every scheme
    present in `layouts`."""
    n = prompt_len.size
    padded_prompt = prompt_length_bucket(int(prompt_len.max()), sampling)

    def order(index: np.ndarray) -> np.ndarray:  # GRPOTrainer.row_order
        return index[training_order(prompt_len[index], response_len[index], sampling)]

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
            # the same chunks form the update's micro-batches (a pure-compute count)
            layouts["aligned"].add("update", index.size, width - response_width, response_width, 3 * epochs)
    for start in range(0, n, rows_per_minibatch):
        mini = np.arange(start, min(n, start + rows_per_minibatch))
        p_w, r_w = widths(mini)
        for m in range(0, mini.size, micro):
            layouts["minibatch"].add("update", min(micro, mini.size - m), p_w, r_w, 3 * epochs)
        sorted_mini = order(mini)
        for m in range(0, sorted_mini.size, micro):
            index = sorted_mini[m:m + micro]
            layouts["micro"].add("update", index.size, *widths(index), 3 * epochs)
