"""Sweeps (experiments/tools/sweeps.py, experiments/sweep.py): spec validation, grid/list expansion, deterministic
unique names, self-contained run flagfiles, refusal to overwrite, resume/skip decisions, the TPU-pod and SLURM launch
scripts (executed against fake gcloud/srun/python), and every paper flagfile and sweep spec parsed by
experiments.grpo's own flags (one subprocess for all of them)."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments.tools import sweeps
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "experiments" / "configs"
PAPER_FLAGFILES = ["grpo_qwen2.5_1.5b.flags", "grpo_qwen2.5_3b.flags", "grpo_qwen2.5_7b.flags",
                   "grpo_llama3.2_3b.flags", "grpo_sft400_qwen2.5_3b.flags"]
CPU_AND_MULTITURN_FLAGFILES = ["default.flags", "default_multiturn.flags", "grpo_qwen2.5_3b_multiturn.flags"]
SPECS = sorted((CONFIGS / "sweeps").glob("*.json"))
PPO_SPEC = "ppo_baseline.json"


def _base(tmp_path: Path, text: str = "") -> Path:
    path = tmp_path / "base.flags"
    path.write_text(text or textwrap.dedent("""\
        # a comment
        // another comment
        --data=synthetic
        --lr=1e-3
        --total_steps=4
        --kl_in_reward
        --run_dir=runs/somewhere
        --resume
        --seed=0
        """))
    return path


def _spec(tmp_path: Path, data: dict, name: str = "spec.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------------------ spec validation


@pytest.mark.parametrize("data, needle", [
    ({"base": "b.flags", "runs": [{"name": "a"}], "gird": {}}, "unknown key(s) ['gird']"),
    ({"base": "b.flags", "runs": [{"name": "a", "flags": {"run_dir": "x"}}]}, "--run_dir is set by the sweep"),
    ({"base": "b.flags", "flags": {"export_dir": "x"}, "runs": [{"name": "a"}]}, "--export_dir is set by the sweep"),
    ({"base": "b.flags", "grid": {"distributed": [True]}}, "--distributed is a launch flag"),
    ({"base": "b.flags", "grid": {"lr": [1e-6, [2]]}}, "grid.lr"),
    ({"base": "b.flags", "grid": {"lr": []}}, "grid.lr must be a non-empty list"),
    ({"base": "b.flags", "grid": {"lr": [1e-6, 1e-6]}}, "grid.lr repeats a value"),
    ({"base": "b.flags", "grid": {"--lr": [1e-6]}}, "bad flag name '--lr'"),
    ({"base": "b.flags", "runs": [{"name": "a b"}]}, "bad run name 'a b'"),
    ({"base": "b.flags", "runs": [{"name": "a", "flag": {}}]}, "runs[0]: unknown key(s) ['flag']"),
    ({"base": "b.flags"}, "needs 'runs' and/or 'grid'"),
    ({"base": "b.flags", "runs": [{"name": "a", "flags": {"lr": float("nan")}}]}, "non-finite"),
])
def test_bad_specs_are_refused_naming_the_file_and_key(tmp_path, data, needle):
    path = _spec(tmp_path, data)
    with pytest.raises(sweeps.SweepError) as e:
        sweeps.load_sweep_spec(path)
    assert needle in str(e.value) and str(path) in str(e.value)


def test_bad_json_and_flagfile_lines_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(sweeps.SweepError, match="bad.json: invalid JSON"):
        sweeps.load_sweep_spec(bad)
    base = _base(tmp_path, "--lr=1\nlr=2\n")
    with pytest.raises(sweeps.SweepError, match=r"base.flags:2: expected one --flag=value"):
        sweeps.read_flagfile(base)
    with pytest.raises(sweeps.SweepError, match="cannot read flagfile"):
        sweeps.read_flagfile(tmp_path / "missing.flags")


# ------------------------------------------------------------------------------------------------ expansion + names


def test_grid_expands_to_the_product_in_file_order(tmp_path):
    spec = sweeps.spec_from_dict({"name": "g", "base": "base.flags", "flags": {"total_steps": 3},
                                  "grid": {"lr": [1e-6, 2e-6], "group_size": [2, 4, 8]}}, "g.json", tmp_path)
    runs = sweeps.expand(spec)
    assert [r.name for r in runs] == [f"lr={lr},group_size={g}" for lr in ("1e-06", "2e-06") for g in (2, 4, 8)]
    assert runs[4].overrides == (("total_steps", "3"), ("lr", "2e-06"), ("group_size", "4"))
    assert all(r.base == tmp_path / "base.flags" for r in runs)


def test_list_entries_cross_the_grid_and_extras_do_not_rename(tmp_path):
    spec = sweeps.spec_from_dict({
        "name": "x", "base": "base.flags", "flags": {"seed": 1},
        "runs": [{"name": "original", "flags": {"reward_preset": "original"}},
                 {"flags": {"reward_preset": "coarse", "reward_length": True}},
                 {"name": "other_base", "base": "other.flags", "flags": {"seed": 2}}],
        "grid": {"lr": [1e-6, 3e-6]}}, "x.json", tmp_path)
    runs = sweeps.expand(spec, extra=[("model", "/m"), ("seed", "7")])
    assert [r.name for r in runs] == [
        "original,lr=1e-06", "original,lr=3e-06",
        "reward_preset=coarse,reward_length=true,lr=1e-06", "reward_preset=coarse,reward_length=true,lr=3e-06",
        "other_base,lr=1e-06", "other_base,lr=3e-06"]
    # Later overrides win and each flag appears once: spec flags, entry flags, grid, then --set extras.
    assert runs[4].overrides == (("lr", "1e-06"), ("model", "/m"), ("seed", "7"))
    assert runs[0].overrides == (("reward_preset", "original"), ("lr", "1e-06"), ("model", "/m"), ("seed", "7"))
    assert runs[4].base == tmp_path / "other.flags" and runs[0].base == tmp_path / "base.flags"
    # --base replaces every base.
    assert {r.base for r in sweeps.expand(spec, base=tmp_path / "tiny.flags")} == {tmp_path / "tiny.flags"}
    with pytest.raises(sweeps.SweepError, match="--run_dir is set by the sweep"):
        sweeps.expand(spec, extra=[("run_dir", "x")])


def test_names_are_deterministic_path_safe_and_unique(tmp_path):
    data = {"base": "b.flags", "grid": {"model": ["/a/b", "/a:b", "a-b"], "lr": [1e-6]}}
    names = [r.name for r in sweeps.expand(sweeps.spec_from_dict(data, "s.json", tmp_path))]
    again = [r.name for r in sweeps.expand(sweeps.spec_from_dict(json.loads(json.dumps(data)), "s.json", tmp_path))]
    assert names == again and len(set(names)) == 3
    assert names[2] == "model=a-b,lr=1e-06"  # nothing replaced: no digest
    for name in names[:2]:  # '/' and ':' replaced: a digest of the exact overrides keeps them apart
        assert "/" not in name and ":" not in name and name.startswith("model=-a-b,lr=1e-06-")
    long = sweeps.derive_run_name(None, [("data", "x" * 200)])
    assert len(long) == 96 and long == sweeps.derive_run_name(None, [("data", "x" * 200)])
    assert long != sweeps.derive_run_name(None, [("data", "x" * 199)])
    dup = {"base": "b.flags", "runs": [{"name": "a", "flags": {"lr": 1}}, {"name": "a", "flags": {"lr": 2}}]}
    with pytest.raises(sweeps.SweepError, match="both named 'a'"):
        sweeps.expand(sweeps.spec_from_dict(dup, "d.json", tmp_path))


# ------------------------------------------------------------------------------------------------ flagfiles


def test_run_flagfile_is_self_contained_and_round_trips(tmp_path):
    inner = tmp_path / "inner.flags"
    inner.write_text("--group_size=2\n--export_dir=runs/shared_export\n")
    base = _base(tmp_path)
    base.write_text(base.read_text() + f"--flagfile={inner}\n")
    run = sweeps.RunSpec("r", base, (("lr", "2e-06"), ("kl_in_reward", "false"), ("group_size", "4")))
    planned = sweeps.plan_run(run, tmp_path / "sw")
    assert sweeps.flag_lines(planned.flags) == [
        "--data=synthetic", "--total_steps=4", "--seed=0",  # base minus overridden and sweep-owned flags
        "--lr=2e-06", "--kl_in_reward=false", "--group_size=4",  # the overrides
        f"--run_dir={tmp_path / 'sw' / 'r'}", f"--export_dir={tmp_path / 'sw' / 'r' / 'export'}"]
    assert planned.total_steps == 4 and planned.export_dir == tmp_path / "sw" / "r" / "export"
    sweeps.write_flagfiles([planned], "demo", tmp_path / "sw")
    text = planned.flagfile.read_text()
    assert text.startswith("# Run r of sweep demo") and f"# base: {base}" in text
    assert sweeps.read_flagfile(planned.flagfile) == planned.flags
    assert json.loads((tmp_path / "sw" / "sweep.json").read_text())["runs"] == ["r"]
    # --noflag forms are replaced too; a missing --total_steps is an error naming the run.
    assert sweeps.merge_flags((("noremat", None), ("lr", "1")), [("remat", "true")]) == (("lr", "1"),
                                                                                       ("remat", "true"))
    assert sweeps.flag_value((("kl_in_reward", None),), "kl_in_reward") == "true"
    assert sweeps.flag_value((("nokl_in_reward", None),), "kl_in_reward") == "false"
    with pytest.raises(sweeps.SweepError, match="run q: neither .* sets --total_steps"):
        sweeps.plan_run(sweeps.RunSpec("q", _base(tmp_path, "--lr=1\n"), ()), tmp_path / "sw")
    with pytest.raises(sweeps.SweepError, match="--distributed is a launch flag"):
        sweeps.plan_run(sweeps.RunSpec("q", _base(tmp_path, "--total_steps=1\n--distributed\n"), ()), tmp_path)


def test_changed_runs_are_refused_unless_force_new_names_a_new_run(tmp_path, monkeypatch):
    base = _base(tmp_path)
    sweep_dir = tmp_path / "sw"

    def plan(lr: str, force_new: bool = False):
        runs = [sweeps.RunSpec("a", base, (("lr", lr),)), sweeps.RunSpec("b", base, (("seed", "1"),))]
        return sweeps.resolve_names(runs, sweep_dir, force_new=force_new)

    first = plan("1e-06")
    sweeps.write_flagfiles(first, "s", sweep_dir)
    mtime = first[0].flagfile.stat().st_mtime_ns
    again = plan("1e-06")  # identical: reused, file untouched
    sweeps.write_flagfiles(again, "s", sweep_dir)
    assert again == first and first[0].flagfile.stat().st_mtime_ns == mtime
    with pytest.raises(sweeps.SweepConflictError) as e:
        plan("2e-06")
    assert "run a " in str(e.value) and "--lr: 1e-06 -> 2e-06" in str(e.value) and "run b" not in str(e.value)
    assert sweeps.read_flagfile(first[0].flagfile) == first[0].flags  # nothing was written
    renamed = plan("2e-06", force_new=True)
    assert [r.name for r in renamed] == ["a~2", "b"]
    sweeps.write_flagfiles(renamed, "s", sweep_dir)
    assert [r.name for r in plan("2e-06", force_new=True)] == ["a~2", "b"]  # reused, not a~3
    assert [r.name for r in plan("3e-06", force_new=True)] == ["a~3", "b"]
    assert sweeps.read_flagfile(first[0].flagfile) == first[0].flags
    assert json.loads((sweep_dir / "sweep.json").read_text())["runs"] == ["a", "b", "a~2"]
    # The same folder spelt another way (relative vs absolute) is the same run; its paths are rewritten.
    monkeypatch.chdir(tmp_path)
    relative = sweeps.resolve_names([sweeps.RunSpec("b", base, (("seed", "1"),))], Path("sw"))
    sweeps.write_flagfiles(relative, "s", Path("sw"))
    assert sweeps.flag_value(sweeps.read_flagfile(sweep_dir / "b" / "run.flags"), "run_dir") == "sw/b"
    (sweep_dir / "c").mkdir()
    (sweep_dir / "c" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(sweeps.SweepConflictError, match="exists without run.flags"):
        sweeps.resolve_names([sweeps.RunSpec("c", base, ())], sweep_dir)


# ------------------------------------------------------------------------------------------------ status / resume


def _checkpoint(run_dir: Path, step: int, complete: bool = True) -> None:
    step_dir = run_dir / "checkpoints" / str(step)
    (step_dir / "state").mkdir(parents=True)
    (step_dir / "extra").mkdir()
    if complete:
        (step_dir / "_CHECKPOINT_METADATA").write_text("{}")


def _shell_done(run: sweeps.PlannedRun) -> bool:
    return subprocess.run(["bash", "-c", sweeps.done_test_shell(run)]).returncode == 0


@pytest.mark.parametrize("with_export", [False, True])
def test_status_decides_start_resume_or_skip(tmp_path, with_export):
    base = _base(tmp_path, "--total_steps=3\n" + ("--export_dir=x\n" if with_export else ""))
    (run,) = sweeps.resolve_names([sweeps.RunSpec("r", base, ())], tmp_path / "sw")

    def check(state: str, latest, resume: bool) -> None:
        status = sweeps.run_status(run)
        assert (status.state, status.latest_step, status.total_steps) == (state, latest, 3)
        cmd = sweeps.local_command(run, status, "py")
        assert cmd == ["py", "-m", "experiments.grpo", f"--flagfile={run.flagfile}"] + (["--resume"] if resume else [])
        assert _shell_done(run) == (state == "done")

    check("new", None, False)
    sweeps.write_flagfiles([run], "s", tmp_path / "sw")
    check("new", None, False)  # only the flagfile
    (run.run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    check("started", None, True)  # no complete checkpoint: --resume starts over (and is needed if files exist)
    _checkpoint(run.run_dir, 2, complete=False)  # killed mid-save: ignored
    check("started", None, True)
    _checkpoint(run.run_dir, 1)
    check("partial", 1, True)
    _checkpoint(run.run_dir, 3)
    if with_export:
        check("partial", 3, True)  # trained but not exported: --resume exports it
        (run.export_dir).mkdir()
        (run.export_dir / "config.json").write_text("{}")
    check("done", 3, False)
    assert sweeps.status_table([sweeps.run_status(run)]).splitlines()[1].split() == ["r", "done", "3/3"]


# ------------------------------------------------------------------------------------------------ launch scripts


def _fake_bin(tmp_path: Path, scripts: dict[str, str]) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


# A fake Python: records its argv (one line per call, NUL-free) instead of training.
_FAKE_PYTHON = 'printf "%s\\n" "$*" >> "$CALLS"\n'


def _two_runs(tmp_path: Path) -> tuple[sweeps.PlannedRun, ...]:
    base = _base(tmp_path, "--total_steps=2\n--export_dir=e\n")
    planned = sweeps.resolve_names([sweeps.RunSpec("done_run", base, (("lr", "1"),)),
                                    sweeps.RunSpec("todo,lr=2", base, (("lr", "2"),))], tmp_path / "my sweep")
    sweeps.write_flagfiles(planned, "s", tmp_path / "my sweep")
    _checkpoint(planned[0].run_dir, 2)
    (planned[0].export_dir).mkdir()
    (planned[0].export_dir / "config.json").write_text("{}")
    return planned


def test_tpu_pod_script_runs_unfinished_runs_on_every_worker(tmp_path):
    planned = _two_runs(tmp_path)
    script = sweeps.tpu_pod_script(planned, "s", sweeps.TPUPodOptions(
        tpu_name="pod-1", zone="us-east5-a", project="proj", remote_dir=str(tmp_path), python="python3"))
    # Fake gcloud: record the call, then run --command on two "workers" as the TPU VM's shell would.
    gcloud = textwrap.dedent("""\
        printf "%s\\n" "$*" >> "$GCLOUD_CALLS"
        for arg in "$@"; do case "$arg" in --command=*) cmd="${arg#--command=}";; esac; done
        for worker in 0 1; do bash -c "$cmd"; done
        """)
    bin_dir = _fake_bin(tmp_path, {"gcloud": gcloud, "python3": _FAKE_PYTHON})
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls"),
               GCLOUD_CALLS=str(tmp_path / "gcloud_calls"))
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["done: done_run", "done: done_run"]
    gcloud_calls = (tmp_path / "gcloud_calls").read_text().splitlines()
    assert len(gcloud_calls) == 2
    assert all(c.startswith("compute tpus tpu-vm ssh pod-1 --zone=us-east5-a --project=proj --worker=all --command=")
               for c in gcloud_calls)
    expected = f"-m experiments.grpo --flagfile={planned[1].flagfile} --distributed --resume"
    assert (tmp_path / "calls").read_text().splitlines() == [expected, expected]  # both workers, same command


def test_slurm_script_starts_one_process_per_node_with_coordinator_flags(tmp_path):
    planned = _two_runs(tmp_path)
    script = sweeps.slurm_script(planned, "s", tmp_path / "my sweep", sweeps.SlurmOptions(
        nodes=2, gpus_per_node=8, partition="gpu", remote_dir=str(tmp_path), python="python"))
    head = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert head == ["#SBATCH --job-name=sweep-s", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                    "#SBATCH --gpus-per-node=8", "#SBATCH --time=24:00:00",
                    f"#SBATCH --output={tmp_path / 'my sweep' / 'slurm-%j.out'}", "#SBATCH --partition=gpu"]
    # Fake SLURM: scontrol lists the nodes; srun runs the task once per node with its SLURM_PROCID.
    srun = textwrap.dedent("""\
        printf "%s\\n" "$*" >> "$SRUN_CALLS"
        while [ "$1" != bash ]; do shift; done
        for id in 0 1; do SLURM_PROCID=$id SLURM_NTASKS=2 "$@"; done
        """)
    bin_dir = _fake_bin(tmp_path, {"scontrol": 'printf "gpu-node-7\\ngpu-node-8\\n"\n', "srun": srun,
                                   "python": _FAKE_PYTHON})
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(tmp_path / "calls"),
               SRUN_CALLS=str(tmp_path / "srun_calls"), SLURM_JOB_NODELIST="gpu-node-[7-8]")
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["done: done_run"]
    assert (tmp_path / "srun_calls").read_text().splitlines()[0].startswith("--nodes=2 --ntasks-per-node=1 bash -c")
    common = (f"-m experiments.grpo --flagfile={planned[1].flagfile} --distributed --resume "
              "--coordinator_address=gpu-node-7:12345 --num_processes=2")
    assert (tmp_path / "calls").read_text().splitlines() == [f"{common} --process_id=0", f"{common} --process_id=1"]


def test_sweep_cli_writes_refuses_and_prints_launches(tmp_path):
    base = _base(tmp_path)
    spec = _spec(tmp_path, {"name": "cli", "base": str(base), "grid": {"lr": [1e-6, 2e-6]}})
    sweep_dir = tmp_path / "out"

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "experiments.sweep", f"--spec={spec}",
                               f"--sweep_dir={sweep_dir}", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=60)

    proc = cli("--set=model=/m1")
    assert proc.returncode == 0, proc.stderr
    assert "lr=1e-06  new      -/4" in proc.stdout and "lr=2e-06  new" in proc.stdout
    assert "--model=/m1" in (sweep_dir / "lr=1e-06" / "run.flags").read_text()
    proc = cli("--set=model=/m2", "--only=lr=2e-06")
    assert proc.returncode != 0 and "run lr=2e-06" in proc.stderr and "--model: /m1 -> /m2" in proc.stderr
    proc = cli("--set=model=/m1", "--only=nope")
    assert proc.returncode != 0 and "--only: no run(s) ['nope']" in proc.stderr
    proc = cli("--set=model=/m1", "--action=slurm", "--slurm_nodes=4", "--slurm_gpus_per_node=4")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --nodes=4" in proc.stdout and proc.stdout.count("srun --nodes=4") == 2
    assert subprocess.run(["bash", "-n"], input=proc.stdout, text=True).returncode == 0
    proc = cli("--set=model=/m1", "--action=tpu", "--tpu_name=v5p", "--tpu_zone=z", f"--output={tmp_path / 'pod.sh'}")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "pod.sh").read_text().count("--worker=all") == 2
    assert cli("--action=tpu").returncode != 0


# ------------------------------------------------------------------------------------------------ real flags

_PARSER = textwrap.dedent("""\
    import json, sys
    from absl import flags
    import experiments.grpo as grpo
    FLAGS = flags.FLAGS
    out = {"has_algorithm": "algorithm" in FLAGS}
    for path in json.loads(sys.argv[1]):
        FLAGS.unparse_flags()
        try:
            FLAGS(["grpo", "--flagfile=" + path])
            config = grpo.grpo_config_from_flags()
            out[path] = {"ok": True, "lr": FLAGS.lr, "run_dir": FLAGS.run_dir, "model": FLAGS.model,
                         "group_size": FLAGS.group_size, "total_steps": FLAGS.total_steps,
                         "reward": repr(config.reward), "kl_coef": config.kl_coef,
                         "prompts": config.prompts_per_step, "mini": config.mini_batch_prompts,
                         "entropy": config.policy.entropy_coef, "max_resp": config.max_response_length,
                         "prompt_order": FLAGS.prompt_order, "loss_agg": config.policy.agg_mode}
        except Exception as e:  # reported to the test, which names the file
            out[path] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))
    """)


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    """Every paper flagfile and the run flagfiles of every sweep spec, parsed by experiments.grpo in one process."""
    tmp = tmp_path_factory.mktemp("specs")
    paths = [str(CONFIGS / f) for f in PAPER_FLAGFILES + CPU_AND_MULTITURN_FLAGFILES]
    spec_runs: dict[str, list[sweeps.PlannedRun]] = {}
    for spec_path in SPECS:
        spec = sweeps.load_sweep_spec(spec_path)
        planned = sweeps.resolve_names(sweeps.expand(spec), tmp / spec.name)
        sweeps.write_flagfiles(planned, spec.name, tmp / spec.name)
        spec_runs[spec_path.name] = list(planned)
        paths += [str(run.flagfile) for run in planned]
    proc = subprocess.run([sys.executable, "-c", _PARSER, json.dumps(paths)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), spec_runs


def test_paper_flagfiles_parse_with_the_recipe(parsed):
    results, _ = parsed
    for name in PAPER_FLAGFILES:
        r = results[str(CONFIGS / name)]
        assert r["ok"], f"{name}: {r.get('error')}"
        # 104 steps: the original configures 15 epochs x 7 steps but its loop stops after the 104th update
        assert (r["lr"], r["group_size"], r["total_steps"], r["kl_coef"], r["prompts"], r["mini"], r["entropy"],
                r["max_resp"], r["prompt_order"], r["loss_agg"]) == (
                    1e-6, 4, 104, 0.001, 512, 128, 0.001, 1024, "random", "token-mean"), name
        assert r["run_dir"] == "runs/" + name.removesuffix(".flags")
    assert results[str(CONFIGS / "grpo_sft400_qwen2.5_3b.flags")]["model"] == "runs/sft400_qwen2.5_3b/export"
    sft = sweeps.read_flagfile(CONFIGS / "sft400_qwen2.5_3b.flags")
    assert sweeps.flag_value(sft, "export_dir") == "runs/sft400_qwen2.5_3b/export"


def test_cpu_defaults_and_multiturn_flagfiles_parse(parsed):
    """The embedded defaults and the multi-turn flagfiles pass the same validation as a run's start-up."""
    results, _ = parsed
    for name in CPU_AND_MULTITURN_FLAGFILES:
        r = results[str(CONFIGS / name)]
        assert r["ok"], f"{name}: {r.get('error')}"
        assert r["run_dir"] == "runs/" + name.removesuffix(".flags")
    assert results[str(CONFIGS / "default_multiturn.flags")]["max_resp"] == 320


def test_every_sweep_spec_expands_and_parses(parsed):
    results, spec_runs = parsed
    assert {p.name for p in SPECS} >= {"reward_ablations_qwen2.5_1.5b.json", "reward_ablations_qwen2.5_3b.json",
                                       "lr_group_size_qwen2.5_1.5b.json", "kl_qwen2.5_1.5b.json",
                                       "tiny_reward_ablation.json", PPO_SPEC}
    for spec_name, runs in spec_runs.items():
        if spec_name == PPO_SPEC:
            continue
        for run in runs:
            r = results[str(run.flagfile)]
            assert r["ok"], f"{spec_name} run {run.name}: {r.get('error')}"
            assert r["run_dir"] == str(run.run_dir)
    # The reward ablations: one run per paper variant, each a distinct reward configuration.
    for size in ("1.5b", "3b"):
        runs = spec_runs[f"reward_ablations_qwen2.5_{size}.json"]
        assert [r.name for r in runs] == ["original", "length", "dynamic_length", "equal_max", "two_stage",
                                          "dynamic_scale", "finegrained", "intermediate", "coarse"]
        assert len({results[str(r.flagfile)]["reward"] for r in runs}) == 9
    grid = {(results[str(r.flagfile)]["lr"], results[str(r.flagfile)]["group_size"])
            for r in spec_runs["lr_group_size_qwen2.5_1.5b.json"]}
    assert grid == {(lr, g) for lr in (5e-7, 1e-6, 2e-6) for g in (2, 4, 8)}


def test_ppo_baseline_spec_parses_once_the_trainer_has_ppo(parsed):
    results, spec_runs = parsed
    runs = spec_runs[PPO_SPEC]
    assert [r.name for r in runs] == ["ppo_qwen2.5_1.5b", "ppo_qwen2.5_3b", "ppo_qwen2.5_7b", "ppo_llama3.2_3b"]
    for run in runs:
        for flag, value in [("algorithm", "ppo"), ("group_size", "1"), ("critic_lr", "1e-05"), ("value_clip", "0.5"),
                            ("value_loss_coef", "0.5"), ("gae_gamma", "1.0"), ("gae_lambda", "1.0"),
                            ("whiten_advantages", "true"), ("max_prompt_length", "1024"),
                            ("max_response_length", "512")]:
            assert sweeps.flag_value(run.flags, flag) == value, (run.name, flag)
    if not results["has_algorithm"]:
        pytest.skip("experiments.grpo has no --algorithm flag yet (the PPO baseline's flags)")
    for run in runs:
        assert results[str(run.flagfile)]["ok"], f"{run.name}: {results[str(run.flagfile)].get('error')}"


def test_sweep_cli_only_takes_grid_names_with_commas_and_patterns(tmp_path):
    base = _base(tmp_path)
    spec = _spec(tmp_path, {"name": "only", "base": str(base), "grid": {"lr": [1e-6, 2e-6], "seed": [0, 1]}})

    def listed(*only: str) -> list[str]:
        proc = subprocess.run([sys.executable, "-m", "experiments.sweep", f"--spec={spec}",
                               f"--sweep_dir={tmp_path / 'out'}", "--action=status", *only],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return sorted(line.split()[0] for line in proc.stdout.splitlines() if line.startswith("lr="))

    assert listed("--only=lr=1e-06,seed=1") == ["lr=1e-06,seed=1"]
    assert listed("--only=*seed=0") == ["lr=1e-06,seed=0", "lr=2e-06,seed=0"]
    assert listed("--only=lr=2e-06,seed=1", "--only=lr=1e-06,seed=0") == ["lr=1e-06,seed=0", "lr=2e-06,seed=1"]
    # a value that names no run whole is a comma list (of names or patterns; tests/test_plot.py uses names)
    assert len(listed("--only=*seed=0,*seed=1")) == 4
    assert len(listed()) == 4
