"""`python -m experiments.grpo` end to end: a real run killed with SIGKILL resumes and continues exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import REPO_ROOT

# Metrics that depend on wall-clock time, not on the computation.
_TIMING_PREFIXES = ("time/", "throughput/")


def _grpo_command(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.grpo", "--flagfile=experiments/configs/tiny_test.flags",
            f"--model={model_dir}", f"--run_dir={run_dir}", f"--export_dir={run_dir / 'export'}",
            "--export_dtype=float32", *extra]


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if k != "time" and not k.startswith(_TIMING_PREFIXES)})
    return by_step


# The default flagfile's features ride along: an SFT warm-up (saved, then reused on resume) and a trainable subset.
_WARM = ("--sft_warmup_steps=2", "--sft_warmup_batch_size=4", "--train_last_layers=1")


@pytest.mark.slow
def test_killed_run_resumes_exactly(tiny_chat_model_dir, tmp_path):
    straight = tmp_path / "straight"
    _run(_grpo_command(tiny_chat_model_dir, straight, *_WARM))
    assert (straight / "warmup_model" / "model.safetensors").is_file()

    killed = tmp_path / "killed"
    # The killed run and its resume share a persistent compilation cache: the resume loads what the first compiled,
    # and the results must still equal the uncached straight run's.
    cache = tmp_path / "xla_cache"
    cached = (*_WARM, f"--compilation_cache_dir={cache}", "--compilation_cache_min_compile_secs=0")
    proc = subprocess.Popen(_grpo_command(tiny_chat_model_dir, killed, *cached), cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "2" / "_CHECKPOINT_METADATA").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "export").exists(), "the run was killed before it finished"
    # Resuming without --resume must refuse to overwrite the run.
    refused = subprocess.run(_grpo_command(tiny_chat_model_dir, killed, *_WARM), cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    warm_mtime = (killed / "warmup_model" / "model.safetensors").stat().st_mtime_ns
    assert any(cache.iterdir()), "the killed run wrote compiled programs to the cache"
    _run(_grpo_command(tiny_chat_model_dir, killed, *cached, "--resume"))
    assert (killed / "warmup_model" / "model.safetensors").stat().st_mtime_ns == warm_mtime, "warm-up re-ran"

    a, b = _metrics(straight), _metrics(killed)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3, 4]
    for step in a:
        assert a[step] == b[step], f"step {step} differs after resume"
    wa, wb = load_file(str(straight / "export" / "model.safetensors")), \
        load_file(str(killed / "export" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


def test_invalid_flags_are_named(tiny_chat_model_dir, tmp_path):
    proc = subprocess.run(_grpo_command(tiny_chat_model_dir, tmp_path / "r", "--mini_batch_prompts=3"),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "mini_batch_prompts" in proc.stderr
    proc = subprocess.run(_grpo_command(tiny_chat_model_dir, tmp_path / "r", "--train_last_layers=99"),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--train_last_layers=99: the model has" in proc.stderr
    proc = subprocess.run(_grpo_command(tiny_chat_model_dir, tmp_path / "r", "--prompt_length_buckets=64,x"),
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--prompt_length_buckets=64,x" in proc.stderr
    proc = subprocess.run(_grpo_command(tmp_path / "missing", tmp_path / "r"), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--model=" in proc.stderr


@pytest.mark.slow
def test_ppo_baseline_runs_from_the_command_line_and_resumes(tiny_chat_model_dir, tmp_path):
    """--algorithm=ppo: a tiny PPO run logs critic metrics, checkpoints the critic and resumes to the same end."""
    ppo = ("--algorithm=ppo", "--group_size=1", "--total_steps=3", "--val_every=0", "--critic_lr=1e-3")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(_grpo_command(tiny_chat_model_dir, straight, *ppo))
    _run(_grpo_command(tiny_chat_model_dir, resumed, *ppo, "--total_steps=2"))
    _run(_grpo_command(tiny_chat_model_dir, resumed, *ppo, "--resume"))
    a, b = _metrics(straight), _metrics(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert np.isfinite(a[step]["critic/vf_loss"]) and a[step] == b[step], step
    assert (straight / "checkpoints" / "3").is_dir()
