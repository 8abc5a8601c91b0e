"""`python -m experiments.grpo` end to end: invalid flags are named; the PPO baseline runs and resumes exactly.
(A run killed mid-way and resumed, with the SFT warm-up, a trainable subset and the compilation cache, is
tests/test_multiprocess.py's, where it also runs as 2 processes.)"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

from tests.conftest import REPO_ROOT

# Metrics that depend on wall-clock time, not on the computation.
_TIMING_PREFIXES = ("time/", "throughput/")


def _grpo_command(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.grpo", "--flagfile=experiments/configs/tiny_test.flags",
            f"--model={model_dir}", f"--run_dir={run_dir}", f"--export_dir={run_dir / 'export'}",
            "--export_dtype=float32", *extra]


def _run(cmd: list[str], env: Optional[dict] = None) -> None:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if k != "time" and not k.startswith(_TIMING_PREFIXES)})
    return by_step


# The default flagfile's features (used by tests/test_fault_injection.py): an SFT warm-up (saved, then reused on
# resume) and a trainable subset.
_WARM = ("--sft_warmup_steps=2", "--sft_warmup_batch_size=4", "--train_last_layers=1")


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


def _straight_and_resumed(model_dir: Path, tmp_path: Path, flags: tuple[str, ...], env: dict) -> tuple[dict, dict]:
    """Metrics of a 3-step run, and of that run as it stood after step 2's checkpoint (what a run killed during
    step 3 leaves) resumed to the end. env: with the shared compilation cache (conftest.cached_env), so the resumed
    run loads the programs the straight one compiled."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(_grpo_command(model_dir, straight, *flags), env)
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "3")
    shutil.rmtree(resumed / "export")
    _run(_grpo_command(model_dir, resumed, *flags, "--resume"), env)
    return _metrics(straight), _metrics(resumed)


@pytest.mark.slow
def test_ppo_baseline_runs_from_the_command_line_and_resumes(tiny_chat_model_dir, tmp_path, cached_env):
    """--algorithm=ppo: a tiny PPO run logs critic metrics, checkpoints the critic and resumes to the same end."""
    ppo = ("--algorithm=ppo", "--group_size=1", "--total_steps=3", "--val_every=0", "--critic_lr=1e-3")
    straight = tmp_path / "straight"
    a, b = _straight_and_resumed(tiny_chat_model_dir, tmp_path, ppo, cached_env)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert np.isfinite(a[step]["critic/vf_loss"]) and a[step] == b[step], step
    assert (straight / "checkpoints" / "3").is_dir()


@pytest.mark.slow
def test_multiturn_run_from_the_command_line_resumes_exactly(tiny_chat_model_dir, tmp_path, cached_env):
    """--environment=synthetic: the SFT warm-up on the tasks' reference turns, multi-turn steps and held-out
    validation run from the command line, and a run resumed after step 2's checkpoint ends as the straight one."""
    flags = ("--environment=synthetic", "--env_prompt_style=minimal", "--max_turns=2", "--max_turn_tokens=16",
             "--max_prompt_length=448", "--max_response_length=48", "--total_steps=3", "--val_every=3",
             "--turn_reward_weight=0.5", "--sft_warmup_steps=1", "--sft_warmup_batch_size=2")
    a, b = _straight_and_resumed(tiny_chat_model_dir, tmp_path, flags, cached_env)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for step in (1, 2, 3):
        assert a[step] == b[step], step
        assert a[step]["multiturn/turns_per_trajectory"] >= 1 and "reward/env/success" in a[step]
        assert a[step]["multiturn/kv_sessions"] >= 1 and a[step]["multiturn/prefill_tokens"] > 0
    assert "val/multiturn/success_rate" in a[3] and "val/env/reward" in a[0]
