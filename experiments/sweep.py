r"""Sweeps of GRPO runs: a base flagfile plus a grid/list of overrides (JSON spec), one named run per point.

  # write the runs' flagfiles and show their state
  python -m experiments.sweep --spec=experiments/configs/sweeps/reward_ablations_qwen2.5_3b.json \
      --set=model=/path/to/Qwen2.5-3B-Instruct --set=data=/path/to/rlla_4k/train.parquet
  # train them here, one after another (finished runs are skipped, interrupted ones resume)
  python -m experiments.sweep --spec=... --action=run
  # print the launch script for a multi-host TPU pod or a multi-node GPU (SLURM) job
  python -m experiments.sweep --spec=... --action=tpu --tpu_name=my-v5p-64 --tpu_zone=us-east5-a
  python -m experiments.sweep --spec=... --action=slurm --slurm_nodes=4 --slurm_gpus_per_node=8 --output=job.sh

Runs live in <sweep_dir>/<run name>/ (run.flags, checkpoints, metrics.jsonl); names come from the spec (see
experiments/tools/sweeps.py), so re-running the same command continues the same runs. A run whose flags changed is
refused unless --force_new (which gives it a new name). --set overrides apply to every run without changing its name.
Run from the repository root. Plots and the summary table: python -m experiments.plot --sweep_dir=<sweep_dir>.
"""
from __future__ import annotations

import fnmatch
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from experiments.tools import sweeps

FLAGS = flags.FLAGS

flags.DEFINE_string("spec", None,
                    "Sweep spec (JSON), e.g. experiments/configs/sweeps/reward_ablations_qwen2.5_3b.json.")
flags.DEFINE_string("sweep_dir", None, "Where the runs go (default runs/sweeps/<spec name>).")
flags.DEFINE_string("base", None, "Replace the spec's base flagfile(s), e.g. to try a sweep on a tiny model.")
flags.DEFINE_multi_string("set", [], "FLAG=VALUE applied to every run after the spec (e.g. --set=model=/path); "
                          "part of each run's flagfile but not of its name.")
flags.DEFINE_multi_string("only", None, "A run to act on, by name or shell pattern (repeat the flag for several; "
                          "a value that names no run whole is a comma list): --only='toolrl,seed=0' --only='*seed=1' "
                          "--only=a,b. Default: all runs of the spec.")
flags.DEFINE_enum("action", "write", ["write", "status", "run", "tpu", "slurm"],
                  "write: write the runs' flagfiles and print their state; status: print the state only; run: write "
                  "and train them here in sequence; tpu / slurm: write and print a multi-host launch script.")
flags.DEFINE_bool("force_new", False, "Give runs whose flags changed a new name (<name>~2, ...) instead of failing.")
flags.DEFINE_bool("keep_going", False, "--action=run: go on with the next run after a failed one.")
flags.DEFINE_string("python", sys.executable, "--action=run: the Python that trains the runs.")
flags.DEFINE_string("output", None, "--action=tpu/slurm: write the script here instead of printing it.")
flags.DEFINE_string("remote_dir", None, "tpu/slurm: the repository on the hosts (default: ~/toolrl_jax on TPU "
                    "VMs, the submit directory under SLURM).")
flags.DEFINE_string("remote_python", None, "tpu/slurm: the Python on the hosts (default python3 / python).")
flags.DEFINE_string("tpu_name", None, "--action=tpu: the TPU VM (pod slice) name.")
flags.DEFINE_string("tpu_zone", None, "--action=tpu: its zone.")
flags.DEFINE_string("tpu_project", None, "--action=tpu: its GCP project (default: gcloud's).")
flags.DEFINE_integer("slurm_nodes", None, "--action=slurm: nodes (one JAX process each).")
flags.DEFINE_integer("slurm_gpus_per_node", 8, "--action=slurm: GPUs per node.")
flags.DEFINE_string("slurm_time", "24:00:00", "--action=slurm: job time limit.")
flags.DEFINE_string("slurm_partition", None, "--action=slurm: partition.")
flags.DEFINE_string("slurm_account", None, "--action=slurm: account.")
flags.DEFINE_integer("coordinator_port", 12345, "--action=slurm: port of the JAX coordinator on the first node.")


def _only_patterns(values: list[str], known: list[str]) -> list[str]:
    """--only values as run names or patterns: a value that matches a run as a whole ('toolrl,seed=0', '*seed=1')
    stays one; any other is read as a comma list of them ('original,equal_max')."""
    out = []
    for value in values:
        whole = any(fnmatch.fnmatchcase(name, value) for name in known)
        out += [value] if whole or "," not in value else [v for v in value.split(",") if v]
    return out


def _parse_set(values: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in values:
        name, eq, value = item.partition("=")
        name = name.lstrip("-")
        if not eq or not name:
            raise app.UsageError(f"--set={item}: expected FLAG=VALUE")
        out.append((name, value))
    return out


def _plan() -> tuple[sweeps.SweepSpec, Path, tuple[sweeps.PlannedRun, ...]]:
    if not FLAGS.spec:
        raise app.UsageError("--spec is required")
    try:
        spec = sweeps.load_sweep_spec(FLAGS.spec)
        runs = sweeps.expand(spec, base=FLAGS.base, extra=_parse_set(FLAGS.set))
    except sweeps.SweepError as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.only:
        known = sorted(r.name for r in runs)
        patterns = _only_patterns(FLAGS.only, known)
        unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in known)]
        if unknown:
            raise app.UsageError(f"--only: no run(s) {unknown} in {FLAGS.spec} (runs: {known})")
        runs = tuple(r for r in runs if any(fnmatch.fnmatchcase(r.name, p) for p in patterns))
    sweep_dir = Path(FLAGS.sweep_dir or Path("runs") / "sweeps" / spec.name)
    try:
        planned = sweeps.resolve_names(runs, sweep_dir, force_new=FLAGS.force_new)
    except sweeps.SweepError as e:
        raise app.UsageError(str(e)) from None
    return spec, sweep_dir, planned


def _run_locally(planned: tuple[sweeps.PlannedRun, ...]) -> int:
    failures = []
    for i, run in enumerate(planned, 1):
        status = sweeps.run_status(run)
        if status.state == "done":
            print(f"[{i}/{len(planned)}] {run.name}: done ({status.latest_step}/{status.total_steps}), skipped",
                  flush=True)
            continue
        cmd = sweeps.local_command(run, status, FLAGS.python)
        verb = {"new": "starting", "started": "starting over (no complete checkpoint)",
                "partial": f"resuming from step {status.latest_step}"}[status.state]
        print(f"[{i}/{len(planned)}] {run.name}: {verb}: {' '.join(cmd)}", flush=True)
        start = time.time()
        rc = subprocess.call(cmd)
        if rc != 0:
            failures.append(run.name)
            print(f"[{i}/{len(planned)}] {run.name}: FAILED with exit code {rc} after {time.time() - start:.0f}s",
                  file=sys.stderr, flush=True)
            if not FLAGS.keep_going:
                break
        else:
            print(f"[{i}/{len(planned)}] {run.name}: finished in {time.time() - start:.0f}s", flush=True)
    print(sweeps.status_table([sweeps.run_status(r) for r in planned]), flush=True)
    if failures:
        print(f"failed runs: {', '.join(failures)} (re-run the same command to resume them)", file=sys.stderr)
    return 1 if failures else 0


def _emit(text: str) -> None:
    if FLAGS.output:
        Path(FLAGS.output).write_text(text, encoding="utf-8")
        print(f"wrote {FLAGS.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    spec, sweep_dir, planned = _plan()
    if FLAGS.action == "status":
        print(sweeps.status_table([sweeps.run_status(r) for r in planned]))
        return 0
    sweeps.write_flagfiles(planned, spec.name, sweep_dir, spec.source)
    if FLAGS.action == "write":
        print(sweeps.status_table([sweeps.run_status(r) for r in planned]))
        print(f"\n{len(planned)} run flagfile(s) under {sweep_dir}; train them with --action=run", file=sys.stderr)
        return 0
    if FLAGS.action == "run":
        return _run_locally(planned)
    if FLAGS.action == "tpu":
        if not FLAGS.tpu_name or not FLAGS.tpu_zone:
            raise app.UsageError("--action=tpu needs --tpu_name and --tpu_zone")
        options = sweeps.TPUPodOptions(tpu_name=FLAGS.tpu_name, zone=FLAGS.tpu_zone, project=FLAGS.tpu_project,
                                       remote_dir=FLAGS.remote_dir or "~/toolrl_jax",
                                       python=FLAGS.remote_python or "python3")
        _emit(sweeps.tpu_pod_script(planned, spec.name, options))
        return 0
    if not FLAGS.slurm_nodes:
        raise app.UsageError("--action=slurm needs --slurm_nodes")
    try:
        options = sweeps.SlurmOptions(nodes=FLAGS.slurm_nodes, gpus_per_node=FLAGS.slurm_gpus_per_node,
                                      time=FLAGS.slurm_time, partition=FLAGS.slurm_partition,
                                      account=FLAGS.slurm_account, coordinator_port=FLAGS.coordinator_port,
                                      remote_dir=FLAGS.remote_dir, python=FLAGS.remote_python or "python")
    except sweeps.SweepError as e:
        raise app.UsageError(str(e)) from None
    _emit(sweeps.slurm_script(planned, spec.name, sweep_dir, options))
    return 0


if __name__ == "__main__":
    app.run(main)
