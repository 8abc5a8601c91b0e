"""Smoke test of experiments/bench_sampling.py on CPU with the tiny preset (both our sampler and HF generate)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.bench_sampling", "--model=tiny", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bench_runs_both_implementations_on_tiny_model(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    proc = _run("--batch_sizes=2", "--prompt_len=8", "--new_tokens=3", "--repeats=1", f"--json_out={out}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert (report["prompt_len"], report["new_tokens"]) == (8, 3)
    by_impl = {r["impl"]: r for r in report["results"]}
    assert set(by_impl) == {"toolrl_jax", "hf_generate"}
    ours, hf = by_impl["toolrl_jax"], by_impl["hf_generate"]
    assert ours["compiles"] == 2  # the 3-token workload and the 1-token prefill timing, each compiled once
    for r in (ours, hf):
        assert r["batch"] == 2 and r["new_tokens_per_s"] > 0 and r["peak_bytes"] > 0
        assert r["new_tokens_per_s"] == pytest.approx(2 * 3 / r["seconds"])
    assert ours["prefill_s"] > 0 and ours["speedup_vs_hf"] > 0
    # HF re-scored our first sampled row with the same weights: bf16 agreement.
    assert hf["logprob_check"]["max_abs_diff"] < 0.1, hf["logprob_check"]
    assert "| 2 | toolrl_jax |" in proc.stdout and "| 2 | hf_generate |" in proc.stdout


def test_bench_rejects_sizes_beyond_the_model_positions():
    proc = _run("--batch_sizes=1", "--prompt_len=500", "--new_tokens=100", "--skip_hf")
    assert proc.returncode != 0 and "max_position" not in proc.stdout
    assert "exceeds the model's 512 positions" in proc.stderr


def test_toolrl_length_distribution_is_the_fit_of_the_reference_answers(shared_dir, tmp_path):
    """The `toolrl` long-tail lengths are the log-normal fitted to the Qwen2.5-token lengths of ToolRL's SFT400
    reference answers (re-fitted here from ../shared)."""
    import numpy as np

    from experiments.tools.rollout_lengths import TOOLRL_LOG_MEAN, TOOLRL_LOG_SD, tail_lengths
    from toolrl_jax import assets
    from toolrl_jax.tokenization import load_tokenizer

    tokenizer = load_tokenizer(assets.prepare_qwen_tokenizer(tmp_path))
    answers = [row["output"] for row in json.loads((shared_dir / "data/toolrl/rlla_sft.json").read_text())]
    lengths = np.log([len(tokenizer(a)["input_ids"]) for a in answers])
    assert abs(lengths.mean() - TOOLRL_LOG_MEAN) < 0.005 and abs(lengths.std() - TOOLRL_LOG_SD) < 0.005
    drawn = tail_lengths(20000, 1024, "toolrl", 0, 0, seed=0)
    assert abs(drawn.mean() - np.exp(lengths).mean()) < 10 and drawn.max() <= 1024 and drawn.min() >= 1
    other = tail_lengths(20000, 4096, "lognormal", 200.0, 0.8, seed=0)  # the mean is kept for any spread
    assert abs(other.mean() - 200) < 5 and np.log(other).std() == pytest.approx(0.8, abs=0.02)


def test_static_row_steps_count_each_batch_at_its_longest_row():
    from experiments.tools.rollout_lengths import row_steps_static

    # Batches of 4 rows: [3, 9, 2, 2] runs 9 steps, [5, 1, 1, 1] runs 5: 4 * 9 + 4 * 5 row-steps.
    assert row_steps_static([3, 9, 2, 2, 5, 1, 1, 1], 4) == 56


def test_dynamic_cache_columns_average_the_prompt_plus_tokens_so_far():
    from experiments.tools.rollout_lengths import dynamic_cache_columns

    # One batch of 2 rows run 3 steps over a prompt of 8: columns 8, 9, 10 per row; then 1 row run 1 step: 8.
    assert dynamic_cache_columns([3, 1, 1], 2, 8) == (2 * (8 + 9 + 10) + 8) / 7


@pytest.mark.slow
def test_long_tail_workload_runs_the_engines_side_by_side(tmp_path):
    out = tmp_path / "tail.json"
    proc = _run("--workload=long_tail", "--rows=12", "--group_size=2", "--slots=4", "--prompt_len=8",
                "--new_tokens=48", "--length_dist=lognormal", "--length_mean=12", "--length_sigma=0.8",
                "--engines=continuous,continuous_full,static_slots", "--min_decode_window=8", f"--json_out={out}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    by_impl = {r["impl"]: r for r in report["results"]}
    assert set(by_impl) == {"continuous", "continuous_full", "static_slots"}
    cont, full, static = by_impl["continuous"], by_impl["continuous_full"], by_impl["static_slots"]
    # Same schedule; without windows every step attends over all 8 + 48 columns, with them over fewer.
    assert full["row_steps_per_useful_token"] == cont["row_steps_per_useful_token"]
    assert full["attended_columns_per_row_step"] == static["attended_columns_per_row_step"] == 56
    assert cont["attended_columns_per_row_step"] < 56
    assert cont["useful_tokens"] == static["useful_tokens"] == round(report["length_mean"] * 12)
    # Equal KV memory (4 slots vs batches of 4 rows); the static batches run to their longest row.
    assert cont["kv_cache_bytes"] == static["kv_cache_bytes"] > 0
    assert 1 <= cont["row_steps_per_useful_token"] < static["row_steps_per_useful_token"]
    assert "| continuous |" in proc.stdout and "continuous engine:" in proc.stdout
