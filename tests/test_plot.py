"""Plots and summary tables across runs (experiments/tools/plotting.py, experiments/plot.py): metric logs merged per
step, summaries in the paper's ablation-table layout, and, end to end, two real tiny GRPO runs trained, skipped and
resumed by the sweep runner, then plotted (PNG curves and table cells checked against the logged numbers)."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from experiments.tools import plotting
from tests.conftest import REPO_ROOT

_TIMING_PREFIXES = ("time/", "throughput/")


def _write_log(run_dir: Path, rows: list[dict], torn_tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + torn_tail)
    return run_dir


def _rows(n_steps: int, scale: float, val_acc: list[float]) -> list[dict]:
    rows = []
    for step in range(1, n_steps + 1):
        rows.append({"step": step, "time": 0.0, "reward/total": scale * step, "reward/format": 0.5,
                     "reward/correctness": scale * step - 0.5, "reward/length": 0.0, "reward/accuracy": step / 10,
                     "actor/entropy": float("nan"), "note": "text", "flag": True})
    for i, acc in enumerate(val_acc):
        rows.append({"step": 2 * i, "val/accuracy": acc, "val/total": acc * 4})
    return rows


# ------------------------------------------------------------------------------------------------ unit level


def test_read_metrics_merges_steps_and_tolerates_only_a_torn_tail(tmp_path):
    run = _write_log(tmp_path / "r", [{"step": 1, "a": 1.0, "b": 2}, {"step": 1, "a": 3.0},
                                      {"step": 0, "a": float("nan"), "s": "x", "t": False}],
                     torn_tail='{"step": 2, "a": ')
    merged = plotting.read_metrics(run / "metrics.jsonl")
    assert merged[1] == {"a": 3.0, "b": 2.0} and list(merged[0]) == ["a"] and math.isnan(merged[0]["a"])
    log = plotting.load_run(run)
    assert log.series == {"a": ((1, 3.0),), "b": ((1, 2.0),)}  # NaN left out, later line won
    (run / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        plotting.read_metrics(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text('{"step": "1"}\n')
    with pytest.raises(ValueError, match=r":1: not a metrics record"):
        plotting.read_metrics(run / "metrics.jsonl")
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        plotting.load_run(tmp_path / "missing")


def test_summary_rows_and_markdown_table(tmp_path):
    a = _write_log(tmp_path / "sw" / "a", _rows(4, 1.0, [0.1, 0.5, 0.5, 0.3]))
    b = _write_log(tmp_path / "sw" / "b", _rows(3, 2.0, [0.2, 0.4]))
    (b / "eval").mkdir()
    (b / "eval" / "summary.json").write_text(json.dumps({"bfcl": {"groups": {"overall": 0.5298}},
                                                         "api_bank": {"toolrl": {"overall": 0.67}}}))
    (tmp_path / "sw" / "no_metrics_yet").mkdir()
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps({"runs": ["b", "a", "gone"]}))
    assert plotting.find_run_dirs(tmp_path / "sw") == [b, a]  # manifest order; runs without metrics left out
    runs = [plotting.load_run(a), plotting.load_run(b)]
    sa, sb = (plotting.summarize_run(r, window=2) for r in runs)
    assert (sa.last_step, sa.val_accuracy_final, sa.val_accuracy_best, sa.val_accuracy_best_step) == (4, 0.3, 0.5, 2)
    assert sa.train["total"] == pytest.approx(3.5) and sa.train["format"] == 0.5  # mean of steps 3 and 4
    assert sa.val_reward_final == pytest.approx(1.2)
    assert sa.benchmarks == {"BFCL overall": None, "API-Bank overall": None, "Bamboogle acc.": None}
    assert sb.benchmarks == {"BFCL overall": 0.5298, "API-Bank overall": 0.67, "Bamboogle acc.": None}
    table = plotting.markdown_table([sa, sb], window=2)
    lines = table.splitlines()
    assert lines[0] == ("| Run | Steps | Val acc. % (final) | Val acc. % (best) | Val reward | Reward | Format | "
                        "Correctness | Length | Train acc. % | BFCL overall % | API-Bank overall % "
                        "| Bamboogle acc. % |")
    assert lines[2] == ("| a | 4 | 30.00 | **50.00** @ 2 | 1.200 | 3.500 | 0.500 | 3.000 | 0.000 | **35.00** "
                        "| N/A | N/A | N/A |")
    assert lines[3] == ("| b | 3 | **40.00** | 40.00 @ 2 | **1.600** | **5.000** | 0.500 | **4.500** | 0.000 | 25.00 "
                        "| 52.98 | 67.00 | N/A |")
    assert "mean of the last 2 training steps" in table
    # Without any evaluation the benchmark columns are left out.
    assert "BFCL" not in plotting.markdown_table([sa])


def test_plot_metric_draws_one_curve_per_run_that_logged_it(tmp_path):
    a = plotting.load_run(_write_log(tmp_path / "a", _rows(3, 1.0, [0.1, 0.2])))
    c = plotting.load_run(_write_log(tmp_path / "c", [{"step": 1, "reward/total": 7.0}]))
    results = plotting.plot_runs([a, c], tmp_path / "plots", ["reward/total", "val/accuracy"])
    assert [(r.metric, r.path.name, [cv.label for cv in r.curves]) for r in results] == [
        ("reward/total", "reward_total.png", ["a", "c"]), ("val/accuracy", "val_accuracy.png", ["a"])]
    assert results[0].curves[0].steps == (1, 2, 3) and results[0].curves[1].values == (7.0,)
    stored = json.loads(Image.open(results[0].path).text["Description"])
    assert stored == {"metric": "reward/total", "curves": [
        {"label": "a", "steps": [1, 2, 3], "values": [1.0, 2.0, 3.0]}, {"label": "c", "steps": [1], "values": [7.0]}]}
    with pytest.raises(ValueError, match=r"no run logged \['kl/x'\]"):
        plotting.plot_runs([a], tmp_path / "p2", ["kl/x"])
    defaults = plotting.plot_runs([a, c], tmp_path / "p3")  # only the default metrics somebody logged
    assert [r.metric for r in defaults] == ["reward/total", "reward/format", "reward/correctness", "reward/length",
                                            "reward/accuracy", "val/total", "val/accuracy"]


def test_moving_average_and_smoothed_plot(tmp_path):
    assert plotting.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert plotting.moving_average([2.0, 4.0], 5) == [2.0, 3.0]
    with pytest.raises(ValueError, match="window"):
        plotting.moving_average([1.0], 0)
    a = plotting.load_run(_write_log(tmp_path / "a", _rows(4, 1.0, [0.1, 0.2])))
    (result,) = plotting.plot_runs([a], tmp_path / "plots", ["reward/total"], smooth=3)
    stored = json.loads(Image.open(result.path).text["Description"])
    assert stored["curves"][0]["values"] == [1.0, 2.0, 3.0, 4.0]  # the stored data stays raw


# ------------------------------------------------------------------------------------------------ real runs


def _logged(run_dir: Path) -> dict[int, dict]:
    """metrics.jsonl merged per step, read independently of experiments.tools.plotting."""
    by_step: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        by_step.setdefault(row["step"], {}).update(
            {k: v for k, v in row.items() if k != "time" and not k.startswith(_TIMING_PREFIXES)})
    return by_step


def _series(logged: dict[int, dict], metric: str) -> tuple[list[int], list[float]]:
    points = [(s, row[metric]) for s, row in sorted(logged.items())
              if isinstance(row.get(metric), (int, float)) and math.isfinite(row[metric])]
    return [s for s, _ in points], [v for _, v in points]


def _table_cells(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines()[2:]:
        if not line.startswith("| "):
            break
        cells = [c.strip().replace("**", "") for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_sweep_runs_two_real_runs_resumes_skips_and_plots_them(tiny_chat_model_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    # JAX's own persistent compilation cache: the second run reuses the first one's compiled steps (same shapes).
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    sweep_cmd = [sys.executable, "-m", "experiments.sweep",
                 "--spec=experiments/configs/sweeps/tiny_reward_ablation.json",
                 "--base=experiments/configs/tiny_test.flags", f"--sweep_dir={sweep_dir}",
                 f"--set=model={tiny_chat_model_dir}", "--set=total_steps=2", "--only=original,equal_max",
                 "--action=run"]

    def sweep() -> str:
        proc = subprocess.run(sweep_cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc.stdout

    out = sweep()
    assert "[1/2] original: starting" in out and "[2/2] equal_max: starting" in out
    names = ["original", "equal_max"]
    logged = {n: _logged(sweep_dir / n) for n in names}
    for n in names:
        assert sorted(logged[n]) == [0, 1, 2] and "reward/total" in logged[n][2] and "val/accuracy" in logged[n][2]
        assert "--reward_preset=" + n in (sweep_dir / n / "run.flags").read_text()
    # The override took effect: same rollouts at step 1, correctness on [-1, 1] instead of [-3, 3].
    assert logged["equal_max"][1]["reward/correctness"] == pytest.approx(logged["original"][1]["reward/correctness"]
                                                                         / 3, abs=1e-6)

    # Re-running skips finished runs and resumes an interrupted one from its newest checkpoint.
    original_log = (sweep_dir / "original" / "metrics.jsonl").read_bytes()
    shutil.rmtree(sweep_dir / "equal_max" / "checkpoints" / "2")
    out = sweep()
    assert "[1/2] original: done (2/2), skipped" in out
    assert "[2/2] equal_max: resuming from step 1" in out and "--resume" in out
    assert (sweep_dir / "original" / "metrics.jsonl").read_bytes() == original_log
    assert _logged(sweep_dir / "equal_max") == logged["equal_max"]  # exact continuation
    assert "[2/2] equal_max: done (2/2), skipped" in sweep()

    proc = subprocess.run([sys.executable, "-m", "experiments.plot", f"--sweep_dir={sweep_dir}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plots = sweep_dir / "plots"
    expected = [m for m in plotting.DEFAULT_METRICS if any(_series(logged[n], m)[0] for n in names)]
    assert {"reward/total", "reward/correctness", "val/accuracy"} <= set(expected)
    assert sorted(p.name for p in plots.glob("*.png")) == sorted(plotting.metric_filename(m) for m in expected)
    for metric in expected:
        path = plots / plotting.metric_filename(metric)
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (700, 420)
            drawn = json.loads(image.text["Description"])
        assert drawn["metric"] == metric
        assert [c["label"] for c in drawn["curves"]] == names, metric
        for curve in drawn["curves"]:
            steps, values = _series(logged[curve["label"]], metric)
            assert (curve["steps"], curve["values"]) == (steps, values), (metric, curve["label"])

    table = _table_cells((plots / "summary.md").read_text())
    assert list(table) == names
    for n in names:
        rows = logged[n]
        val_steps, val_acc = _series(rows, "val/accuracy")
        best = max(val_acc)
        final = rows[2]
        assert table[n] == [
            "2", f"{100 * val_acc[-1]:.2f}", f"{100 * best:.2f} @ {val_steps[val_acc.index(best)]}",
            f"{_series(rows, 'val/total')[1][-1]:.3f}", f"{final['reward/total']:.3f}",
            f"{final['reward/format']:.3f}", f"{final['reward/correctness']:.3f}", f"{final['reward/length']:.3f}",
            f"{100 * final['reward/accuracy']:.2f}"], n


def test_average_seeds_curves_bands_and_table(tmp_path):
    def log(name, values, val):
        rows = [{"step": i + 1, "reward/total": v} for i, v in enumerate(values)]
        rows += [{"step": step, "val_sampled/total": v} for step, v in val]
        return plotting.load_run(_write_log(tmp_path / name, rows), name=name)

    runs = [log("a,seed=0", [1.0, 2.0, 3.0], [(0, -1.0), (3, 1.0)]),
            log("a,seed=1", [3.0, 4.0], [(0, -1.0), (3, 2.0)]),
            log("b,seed=0", [0.0], [(3, 0.5)])]
    assert [plotting.seed_group_name(r.name) for r in runs] == ["a", "a", "b"]
    a, b = plotting.average_seeds(runs)
    assert (a.name, b.name) == ("a (2 seeds)", "b (1 seed)")
    assert a.series["reward/total"] == ((1, 2.0), (2, 3.0))  # only the steps both seeds logged
    assert a.series["val_sampled/total"] == ((0, -1.0), (3, 1.5))
    assert a.series["val_sampled/total:min"] == ((0, -1.0), (3, 1.0))
    assert a.series["val_sampled/total:max"] == ((0, -1.0), (3, 2.0))
    (result,) = plotting.plot_runs([a, b], tmp_path / "plots", ["val_sampled/total"])
    assert [(c.label, c.values) for c in result.curves] == [("a (2 seeds)", (-1.0, 1.5)), ("b (1 seed)", (0.5,))]
    table = plotting.markdown_seed_table(runs, ["val_sampled/total", "reward/total"])
    assert "| a | 2 | 3 | 1.500 ± 0.500 (1.000, 2.000) | 3.500 ± 0.500 (3.000, 4.000) |" in table
    assert "| b | 1 | 3 | 0.500 ± 0.000 (0.500) | 0.000 ± 0.000 (0.000) |" in table
