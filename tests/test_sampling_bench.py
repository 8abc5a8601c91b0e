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
