"""Multi-process runs for real: `python -m experiments.grpo --distributed` as 2 processes on 127.0.0.1, each with 2
CPU devices (JAX's distributed runtime, gloo collectives), against the same run as 1 process with 4 devices.

One GRPO run with an SFT warm-up covers the issue's checks together (each CLI run costs ~40 s of start-up and
compilation, so they share runs): the warm-up's SFT steps and the GRPO steps give the same weights as 1 process;
metrics, samples and exports are written once; a process killed mid-run makes the other exit with JAX's "another
task died" error within the heartbeat timeout (not a hang); the 2-process checkpoint restores both in a 2-process
and in a 1-process run, each continuing as the uninterrupted run did. A quick 2-process script checks that each
process feeds only its own rows of a batch to its devices, and `experiments.sft` as 2 processes equals 1 process.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import REPO_ROOT

_TIMING_PREFIXES = ("time/", "throughput/")
# 4 devices as a 2 x 2 (fsdp, tensor) mesh: across 2 processes, each process holds one fsdp slice (its rows) and
# the tensor axis stays inside a process, as on a pod (model parallelism within a host).
# The default flagfile's features ride along: an SFT warm-up (saved, then reused on resume) and a trainable subset.
_RUN_FLAGS = ("--flagfile=experiments/configs/tiny_test.flags", "--mesh_fsdp=2", "--mesh_tensor=2",
              "--sft_warmup_steps=2", "--sft_warmup_batch_size=4", "--train_last_layers=1", "--export_dtype=float32")
_HEARTBEAT_S = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


# experiments.sft on the same mesh: a tiny SFT run with held-out loss and accuracy (the sampler) every 2 steps.
_SFT_FLAGS = ("--flagfile=experiments/configs/sft_default.flags", "--mesh_fsdp=2", "--mesh_tensor=2",
              "--synthetic_train_size=8", "--synthetic_val_size=2", "--max_length=96", "--max_prompt_length=16",
              "--batch_size=4", "--micro_batch_size=2", "--epochs=0", "--max_steps=3", "--save_every=1",
              "--lr=1e-3", "--eval_every=2", "--eval_max_new_tokens=4", "--eval_batch_size=2",
              "--logits_chunk_size=32", "--export_dtype=float32")


def _command(model_dir: Path, run_dir: Path, *extra: str, module: str = "experiments.grpo") -> list[str]:
    flags = _RUN_FLAGS if module == "experiments.grpo" else _SFT_FLAGS
    return [sys.executable, "-m", module, *flags, f"--model={model_dir}", f"--run_dir={run_dir}",
            f"--export_dir={run_dir / 'export'}", *extra]


def _launch(model_dir: Path, run_dir: Path, processes: int, *extra: str,
            module: str = "experiments.grpo") -> list[subprocess.Popen]:
    """The run as `processes` processes of 4 / processes CPU devices each (logs in run_dir's parent)."""
    if processes == 1:
        commands = [_command(model_dir, run_dir, *extra, module=module)]
    else:
        address = f"127.0.0.1:{_free_port()}"
        commands = [_command(model_dir, run_dir, *extra, "--distributed", f"--coordinator_address={address}",
                             f"--num_processes={processes}", f"--process_id={i}",
                             f"--heartbeat_timeout_seconds={_HEARTBEAT_S}", module=module)
                    for i in range(processes)]
    logs = [open(run_dir.parent / f"{run_dir.name}.{i}.log", "a") for i in range(processes)]
    procs = [subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(4 // processes), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True) for cmd, log in zip(commands, logs)]
    for log in logs:
        log.close()
    return procs


def _log(run_dir: Path, i: int) -> str:
    return (run_dir.parent / f"{run_dir.name}.{i}.log").read_text()


def _wait_ok(procs: list[subprocess.Popen], run_dir: Path, timeout: float = 600) -> None:
    for i, p in enumerate(procs):
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            pytest.fail(f"process {i} still running after {timeout} s:\n{_log(run_dir, i)[-3000:]}")
        assert p.returncode == 0, f"process {i} failed:\n{_log(run_dir, i)[-4000:]}"


def _metric_rows(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time" and not k.startswith(_TIMING_PREFIXES)}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _by_step(rows: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for row in rows:
        out.setdefault(row["step"], {}).update(row)
    return out


def _samples(run_dir: Path) -> list[dict]:
    """The logged samples: step, prompt index and response (rewards are compared through the metrics)."""
    rows = [json.loads(line) for line in (run_dir / "sample_log.jsonl").read_text().splitlines()]
    return [{k: row[k] for k in ("step", "prompt_index", "response")} for row in rows]


def _assert_same_run(a: dict[int, dict], b: dict[int, dict], what: str) -> None:
    """Equal, not close: the 2-process program is the 1-process one, and its cross-process reductions have two
    operands (fsdp = 2), so even float sums come out bit-identical."""
    assert sorted(a) == sorted(b), what
    for step in a:
        assert a[step] == b[step], f"{what}: step {step} differs"


def _assert_same_weights(a: Path, b: Path, what: str) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert sorted(wa) == sorted(wb), what
    for name in wa:
        np.testing.assert_array_equal(wb[name], wa[name], err_msg=f"{what}: {name}")


@pytest.mark.slow
def test_two_processes_train_kill_and_resume_like_one(tiny_chat_model_dir, tmp_path):
    # The 1-process runs share a persistent compilation cache: the 1-process resume below loads what the straight
    # run compiled, and its results must still equal the straight run's.
    cache = tmp_path / "xla_cache"
    cached = (f"--compilation_cache_dir={cache}", "--compilation_cache_min_compile_secs=0")
    straight = tmp_path / "straight"
    _wait_ok(_launch(tiny_chat_model_dir, straight, 1, *cached), straight)
    assert any(cache.iterdir()), "the straight run wrote compiled programs to the cache"
    reference = _by_step(_metric_rows(straight))
    assert sorted(reference) == [0, 1, 2, 3, 4]

    # Two processes; process 1 is killed once step 2's checkpoint is complete.
    run = tmp_path / "two"
    procs = _launch(tiny_chat_model_dir, run, 2)
    deadline = time.time() + 600
    while time.time() < deadline and not (run / "checkpoints" / "2" / "_CHECKPOINT_METADATA").exists():
        assert all(p.poll() is None for p in procs), f"a process ended early:\n{_log(run, 0)[-3000:]}"
        time.sleep(0.05)
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed_at = time.time()
    try:
        procs[0].wait(timeout=_HEARTBEAT_S + 90)
    except subprocess.TimeoutExpired:
        os.killpg(procs[0].pid, signal.SIGKILL)
        pytest.fail("process 0 hung after its peer died")
    # Either JAX's heartbeat check ends it, or its next collective fails on the lost connection and the entry
    # point ends it at once (without waiting in the shutdown barrier).
    died = ("another task died", "process 0 of 2 failed, ending it now")
    assert procs[0].returncode != 0 and any(d in _log(run, 0) for d in died), _log(run, 0)[-3000:]
    assert time.time() - killed_at < _HEARTBEAT_S + 90
    assert not (run / "export").exists(), "the run was killed before it finished"

    # The warm-up (SFT steps on the 2-process mesh) equals the 1-process warm-up; written by one process.
    _assert_same_weights(straight / "warmup_model", run / "warmup_model", "SFT warm-up")
    # Rows written before the kill: each once (process 0 alone writes metrics and samples).
    before = [r for r in _metric_rows(run) if r["step"] <= 2]
    assert len(before) == len([r for r in _metric_rows(straight) if r["step"] <= 2])
    _assert_same_run({s: r for s, r in reference.items() if s <= 2}, _by_step(before), "2 processes, steps 0-2")
    samples = [_samples(d) for d in (straight, run)]
    assert [s for s in samples[1] if s["step"] <= 2] == [s for s in samples[0] if s["step"] <= 2]

    # The 2-process checkpoint restores in a 1-process run (4 devices) ...
    single = tmp_path / "two_then_one"
    shutil.copytree(run, single, ignore=shutil.ignore_patterns("*.log"))
    # (without --resume the run refuses to start over on top of it)
    refused = subprocess.run(_command(tiny_chat_model_dir, single), cwd=REPO_ROOT, env=_env(4), capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    warm_mtime = (single / "warmup_model" / "model.safetensors").stat().st_mtime_ns
    _wait_ok(_launch(tiny_chat_model_dir, single, 1, "--resume", *cached), single)
    assert (single / "warmup_model" / "model.safetensors").stat().st_mtime_ns == warm_mtime, "warm-up re-ran"
    _assert_same_run(reference, _by_step(_metric_rows(single)), "resumed in 1 process")
    _assert_same_weights(straight / "export", single / "export", "export after a 1-process resume")

    # ... and in 2 processes again, the same continuation; the export is written once, atomically.
    _wait_ok(_launch(tiny_chat_model_dir, run, 2, "--resume"), run)
    _assert_same_run(reference, _by_step(_metric_rows(run)), "resumed in 2 processes")
    _assert_same_weights(straight / "export", run / "export", "export after a 2-process resume")
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")], "temporary folders left behind"


@pytest.mark.slow
def test_two_processes_run_sft_like_one(tiny_chat_model_dir, tmp_path):
    """experiments.sft (run_sft: evaluation before training and every 2 steps, with generation; checkpoints; the
    export) as 2 processes equals 1 process with 4 devices; process 0 alone writes metrics and the export."""
    one, two = tmp_path / "sft_one", tmp_path / "sft_two"
    _wait_ok(_launch(tiny_chat_model_dir, one, 1, module="experiments.sft"), one)
    _wait_ok(_launch(tiny_chat_model_dir, two, 2, module="experiments.sft"), two)
    rows = [_metric_rows(d) for d in (one, two)]
    assert len(rows[1]) == len(rows[0]) and [r["step"] for r in rows[1]] == [r["step"] for r in rows[0]]
    reference = _by_step(rows[0])
    assert any("eval/loss" in r for r in reference.values()) and sorted(reference)[-1] == 3
    _assert_same_run(reference, _by_step(rows[1]), "experiments.sft in 2 processes")
    _assert_same_weights(one / "export", two / "export", "SFT export")
    assert (two / "export" / "toolrl_sft.json").is_file()
    assert not [p.name for p in two.iterdir() if p.name.startswith(".")], "temporary folders left behind"


_FEED = textwrap.dedent("""
    import sys
    import jax
    from toolrl_jax.sharding import MeshConfig, initialize_distributed
    initialize_distributed(sys.argv[2], 2, int(sys.argv[1]), heartbeat_timeout_seconds=10)
    import numpy as np
    from toolrl_jax.placement import Placement
    placement = Placement.from_config(MeshConfig(data=1, fsdp=2, tensor=2))
    batch = {"tokens": np.arange(8 * 3).reshape(8, 3)}
    placed = placement.place_rows(batch)["tokens"]
    rows = sorted({int(r) for s in placed.addressable_shards for r in np.asarray(s.data)[:, 0] // 3})
    print("ROWS", jax.process_index(), rows, np.array_equal(placement.fetch(placed), batch["tokens"]))
""")


def test_each_process_feeds_only_its_own_rows():
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", _FEED, str(i), address], cwd=REPO_ROOT, env=_env(2),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    lines = sorted(line for out, _ in outs for line in out.splitlines() if line.startswith("ROWS"))
    assert lines == ["ROWS 0 [0, 1, 2, 3] True", "ROWS 1 [4, 5, 6, 7] True"]
