"""experiments.tools.padding_plan and experiments/bench_padding.py: cells and FLOPs of each padding scheme by hand
on four rows, and a run on the real ToolRL SFT data."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from experiments.tools.padding_plan import Layout, lay_out_step
from toolrl_jax.models.config import ModelConfig
from toolrl_jax.sampling.config import SamplingConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_layouts_count_the_cells_the_trainer_computes():
    # Prompt buckets: 10 -> 32 (the minimum), 100 -> 128; response buckets: 5 -> 64, 70 -> 128 (the budget).
    prompt_len, response_len = np.array([10, 100, 10, 100]), np.array([5, 5, 70, 70])
    config = ModelConfig.tiny("qwen2")
    layouts = {s: Layout(config) for s in ("none", "minibatch", "micro", "aligned")}
    lay_out_step(prompt_len, response_len, layouts, micro=2, rows_per_minibatch=4, epochs=1, logprob_passes=2,
                 sampling=SamplingConfig(max_new_tokens=128), response_buckets=None, max_response=128)
    # none: 4 rows x (128 + 128), 2 log-prob passes + 3 (one update, forward and backward).
    assert layouts["none"].cells == 5 * 4 * 256
    # Sorted by prompt bucket, then response: chunks {0, 2} at 32 + 128 and {1, 3} at 128 + 128.
    logprob = 2 * 2 * (160 + 256)
    assert layouts["micro"].cells == logprob + 3 * 2 * (160 + 256)
    assert layouts["minibatch"].cells == logprob + 3 * 4 * 256  # the mini-batch at its longest row
    assert layouts["micro"].shapes == {"logprob": {(2, 32, 128), (2, 128, 128)},
                                       "update": {(2, 32, 128), (2, 128, 128)}}
    assert layouts["none"].shapes["update"] == {(2, 128, 128)}
    # aligned (not in the trainer): totals 15, 105, 80, 170 -> chunks {0, 2} at 128 and {1, 3} at 256 columns.
    assert layouts["aligned"].cells == 5 * 2 * (128 + 256)
    # FLOPs: the projections scale with the cells, attention with the width squared.
    body = layouts["none"].body
    assert body == config.num_params - 2 * config.vocab_size * config.hidden_size
    width = 256
    per_row = 2 * body * width + layouts["none"].attention * width ** 2 + layouts["none"].head * 128
    assert layouts["none"].flops == 5 * 4 * per_row
    assert layouts["micro"].flops < layouts["minibatch"].flops < layouts["none"].flops


def test_bench_padding_runs_on_the_toolrl_sft_data(shared_dir, tiny_chat_model_dir, tmp_path):
    out = tmp_path / "padding.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_padding", f"--data={shared_dir / 'data/toolrl/rlla_sft.json'}",
         f"--tokenizer={tiny_chat_model_dir}", "--steps=2", "--prompts_per_step=32", "--mini_batch_prompts=8",
         f"--output={out}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["examples"] == 400 and 100 < report["prompt_tokens_mean"] < 2048
    assert report["dataset_size"] == 3920 and report["prompt_order"] == "random"  # resampled to the recipe's size
    schemes = report["schemes"]
    assert schemes["none"]["flops_vs_none"] == 1.0
    assert schemes["micro"]["flops"] < schemes["minibatch"]["flops"] < schemes["none"]["flops"]
    assert 0.0 < schemes["micro"]["padding_fraction"] < schemes["none"]["padding_fraction"] < 1.0
    assert "| micro |" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "experiments.bench_padding", f"--data={tmp_path / 'missing.json'}"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "missing.json does not exist" in bad.stderr
