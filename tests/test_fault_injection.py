"""Fault injection at the command line: each test breaks something on purpose (flags, data rows, a diverging model, a
corrupted checkpoint, a resume with other weights or shapes) and checks for a clear error, the exit code, and that
nothing that existed before is lost. docs/reliability.md lists what is guaranteed and which test proves it.

Lower-level faults have their own tests: checkpoint files (test_checkpoint_integrity.py), data files and
data.prepare (test_data_loading.py, test_data_raw_rows.py, test_data_prepare_safety.py), evaluation services and
over-long prompts (test_eval_*.py), the optimizer's divergence guard (test_optim.py).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tests.conftest import REPO_ROOT
from tests.test_grpo_cli import _WARM, _grpo_command, _metrics


def _run(cmd: list[str], timeout: int = 600, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """cmd's result. The runs that train pass env=cached_env (conftest.py): the resumes and the other short runs of
    the tiny test flags load the programs the first run compiled instead of compiling them again."""
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def weightless_model_dir(tiny_chat_model_dir, tmp_path_factory) -> Path:
    """The tiny model's config and tokenizer without its weights: a command that gets as far as loading weights
    fails with a missing-tensor error, so a flag or data error reported instead was found before the weights load."""
    folder = tmp_path_factory.mktemp("weightless") / "model"
    folder.mkdir()
    for path in tiny_chat_model_dir.iterdir():
        if not path.name.endswith(".safetensors") and path.name != "model.safetensors.index.json":
            shutil.copy(path, folder / path.name)
    return folder


@pytest.mark.parametrize("flag, message", [
    ("--mini_batch_prompts=0", "mini_batch_prompts must be an integer >= 1"),
    ("--micro_batch_rows=-2", "micro_batch_rows must be an integer >= 1"),
    ("--temperature=-1", "temperature must be a finite number >= 0"),
    ("--top_p=1.5", "top_p must be in (0, 1]"),
    ("--top_k=-1", "top_k must be an integer >= 0"),
    ("--lr=nan", "learning_rate must be finite"),
    ("--sft_warmup_steps=2 --sft_warmup_batch_size=0", "--sft_warmup_batch_size >= 1"),
    ("--loss_agg=verl --loss_agg_norm_length=8", "norm_length is only used with agg_mode='seq-mean-token-sum-norm'"),
    ("--max_consecutive_skipped_updates=0", "max_consecutive_skips must be >= 1"),
    ("--resume_allow=shapes", "--resume_allow=shapes: unknown"),
])
def test_bad_flags_stop_before_any_weights_load(weightless_model_dir, tmp_path, flag, message):
    proc = _run(_grpo_command(weightless_model_dir, tmp_path / "run", *flag.split()), timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-2000:]
    named = flag.split()[-1].split("=")[0]
    assert named in proc.stderr, f"the error names {named}: {proc.stderr[-2000:]}"
    assert "safetensors" not in proc.stderr and "missing" not in proc.stderr.lower()
    assert not (tmp_path / "run").exists(), "a rejected command must not create the run directory"


def _write_parquet_with_a_bad_row(shared_dir: Path, path: Path) -> None:
    import pyarrow.parquet as pq

    table = pq.read_table(shared_dir / "data/toolrl/test.parquet").slice(0, 6)
    rows = table.to_pylist()
    rows[4]["reward_model"]["ground_truth"] = "<think> x </think>\n<tool_call>\nnot json\n</tool_call>"
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), path)


def test_a_bad_ground_truth_is_named_by_file_and_row_before_the_model_loads(weightless_model_dir, shared_dir,
                                                                          tmp_path):
    data = tmp_path / "train.parquet"
    _write_parquet_with_a_bad_row(shared_dir, data)
    proc = _run(_grpo_command(weightless_model_dir, tmp_path / "run", f"--data={data}"), timeout=300)
    assert proc.returncode != 0
    assert str(data) in proc.stderr and "row 4" in proc.stderr, proc.stderr[-2000:]
    assert "--bad_rows=skip" in proc.stderr


@pytest.mark.slow
def test_a_bad_row_is_skipped_and_counted_on_request(tiny_chat_model_dir, shared_dir, tmp_path, cached_env):
    data = tmp_path / "train.parquet"
    _write_parquet_with_a_bad_row(shared_dir, data)
    proc = _run(_grpo_command(tiny_chat_model_dir, tmp_path / "run", f"--data={data}", "--bad_rows=skip",
                              "--total_steps=1", "--val_every=0"), env=cached_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 examples, 1 bad row(s) skipped" in proc.stderr and "row 4" in proc.stderr


@pytest.mark.slow
def test_a_diverging_run_stops_with_an_error_and_saves_nothing_non_finite(tiny_chat_model_dir, tmp_path,
                                                                          cached_env):
    """--lr=1e6: the first update throws the parameters far out, every later gradient is non-finite. Each skipped
    update is logged, the third in a row stops the run (exit != 0), and no checkpoint or export is written after."""
    run = tmp_path / "run"
    proc = _run(_grpo_command(tiny_chat_model_dir, run, "--lr=1e6", "--max_grad_norm=0", "--val_every=0"),
                env=cached_env)
    assert proc.returncode != 0
    assert "TrainingDivergedError" in proc.stderr, proc.stderr[-3000:]
    assert "update skipped at GRPO step" in proc.stderr
    assert not (run / "export").exists()
    saved = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    last_logged = max(_metrics(run))
    assert all(step <= last_logged for step in saved), "no checkpoint of the step that diverged"
    for line in (run / "metrics.jsonl").read_text().splitlines():  # strict JSON even with NaN metrics
        json.loads(line, parse_constant=lambda token: pytest.fail(f"bare {token} in metrics.jsonl"))


@pytest.fixture(scope="module")
def finished_run(tiny_chat_model_dir, tmp_path_factory, cached_env) -> Path:
    """A 4-step run of the tiny test flags, checkpoints of steps 2-4 kept (SFT warm-up, a trainable subset)."""
    run = tmp_path_factory.mktemp("fault") / "straight"
    proc = _run(_grpo_command(tiny_chat_model_dir, run, *_WARM), env=cached_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    shutil.rmtree(to / "export")
    return to


def _flip_a_byte(step_dir: Path) -> Path:
    data = max((p for p in step_dir.rglob("*") if p.is_file() and "ocdbt" in str(p) and "manifest" not in p.name),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    return data


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_rejected_and_the_run_continues_exactly(tiny_chat_model_dir, finished_run,
                                                                         tmp_path, cached_env):
    """Step 4's checkpoint gets a flipped byte: --resume names it, falls back to step 3, trains step 4 again (the
    same metrics and weights as the uninterrupted run), keeps the rejected copy aside and writes step 4 anew."""
    run = _copy_run(finished_run, tmp_path / "corrupted")
    _flip_a_byte(run / "checkpoints" / "4")
    proc = _run(_grpo_command(tiny_chat_model_dir, run, *_WARM, "--resume"), env=cached_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 4 rejected (checksum)" in proc.stderr, proc.stderr[-3000:]
    assert (run / "checkpoints" / "rejected" / "4").is_dir() and (run / "checkpoints" / "4").is_dir()
    a, b = _metrics(finished_run), _metrics(run)
    assert a[4] == b[4]
    wa = load_file(str(finished_run / "export" / "model.safetensors"))
    wb = load_file(str(run / "export" / "model.safetensors"))
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name], err_msg=name)


@pytest.mark.slow
def test_resuming_with_other_weights_or_shapes_stops_naming_what_differs(tiny_chat_model_dir, finished_run,
                                                                       tmp_path, cached_env):
    run = _copy_run(finished_run, tmp_path / "mismatch")
    before = _tree_bytes(run)
    other = tmp_path / "other_model"  # the same shapes, one weight changed
    shutil.copytree(tiny_chat_model_dir, other)
    weights = load_file(str(other / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + np.float32(1e-3)
    save_file(weights, str(other / "model.safetensors"))

    proc = _run(_grpo_command(other, run, *_WARM, "--resume", "--total_steps=5"))
    assert proc.returncode != 0
    assert "weights.checksum" in proc.stderr and "--resume_allow=weights" in proc.stderr, proc.stderr[-3000:]
    assert "weights.model" in proc.stderr
    proc = _run(_grpo_command(tiny_chat_model_dir, run, *_WARM, "--resume", "--train_last_layers=2",
                              "--total_steps=5"))
    assert proc.returncode != 0
    assert "shapes.train_last_layers: 1 when the run started, 2 now" in proc.stderr, proc.stderr[-3000:]
    assert "start a new --run_dir" in proc.stderr
    proc = _run(_grpo_command(tiny_chat_model_dir, run, *_WARM, "--resume", "--seed=7", "--total_steps=5"))
    assert proc.returncode != 0 and "run.seed: 0 when the run started, 7 now" in proc.stderr
    assert _tree_bytes(run) == before, "a refused resume must leave the run directory as it was"

    # A deliberate change goes through with --resume_allow, and the earlier launch's flags are kept.
    proc = _run(_grpo_command(other, run, *_WARM, "--resume", "--resume_allow=weights", "--total_steps=5",
                              "--val_every=0"), env=cached_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming with a change allowed by --resume_allow: weights.checksum" in proc.stderr
    assert (run / "flags.txt").read_bytes() == before["flags.txt"]
    assert f"--model={other}" in (run / "flags.resume1.txt").read_text()
    assert sorted(_metrics(run)) == [0, 1, 2, 3, 4, 5]
