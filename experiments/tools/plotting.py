"""Curves and summary tables across runs: reads each run's metrics.jsonl (toolrl_jax/metrics.py), writes one PNG per
metric with one curve per run, and a Markdown table comparing runs in the layout of the paper's ablation tables.

A step may appear on several lines (the training row and the validation row of the same step, or lines rewritten
after a resume); they are merged per step, a later line's value winning. Non-finite values are left out of plots and
tables. A run evaluated with `python -m experiments.evaluate --model=<run_dir>/export --out=<run_dir>/eval` also gets
its benchmark scores (BFCL v3 overall, API-Bank overall, Bamboogle accuracy) in the table.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVAL_SUMMARY = "summary.json"
REWARD_COMPONENTS = ("total", "format", "correctness", "length", "accuracy")
DEFAULT_METRICS = tuple(f"reward/{c}" for c in REWARD_COMPONENTS) + tuple(f"val/{c}" for c in REWARD_COMPONENTS) + (
    "val_sampled/total", "val_sampled/format",
    "response/length_mean", "kl/old_ref_k1", "actor/entropy", "actor/grad_norm")
# (column header, path into the evaluation summary.json): the paper's headline benchmark numbers, as fractions.
BENCHMARK_COLUMNS = (("BFCL overall", ("bfcl", "groups", "overall")),
                     ("API-Bank overall", ("api_bank", "toolrl", "overall")),
                     ("Bamboogle acc.", ("bamboogle", "accuracy")))


@dataclasses.dataclass(frozen=True)
class RunLog:
    """One run's logged scalars: metric -> ((step, value), ...) ascending in step, finite values only."""

    name: str
    run_dir: Path
    series: Mapping[str, tuple[tuple[int, float], ...]]
    eval_summary: Optional[Mapping[str, Any]] = None

    def steps(self, metric: str) -> list[int]:
        return [s for s, _ in self.series.get(metric, ())]

    def values(self, metric: str) -> list[float]:
        return [v for _, v in self.series.get(metric, ())]


def read_metrics(path: str | os.PathLike) -> dict[int, dict[str, float]]:
    """{step: {metric: value}} of a metrics.jsonl, merging lines of the same step (later lines win).

    A torn last line (a run killed mid-write) is skipped with a warning; any other malformed line is an error
    naming the file and line.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    by_step: dict[int, dict[str, float]] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = record["step"]
            if isinstance(step, bool) or not isinstance(step, int):
                raise TypeError(f"step {step!r} is not an integer")
        except (ValueError, KeyError, TypeError) as e:
            if lineno == len(lines) and not line.endswith("\n"):
                logger.warning("%s:%d: skipping a torn last line", path, lineno)
                continue
            raise ValueError(f"{path}:{lineno}: not a metrics record ({e})") from None
        row = by_step.setdefault(step, {})
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            row[key] = float(value)
    return by_step


def load_run(run_dir: str | os.PathLike, name: Optional[str] = None, eval_subdir: Optional[str] = "eval") -> RunLog:
    """A run's metrics (and its evaluation summary, if `<run_dir>/<eval_subdir>/summary.json` exists)."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {METRICS_FILE} (has the run started?)")
    series: dict[str, list[tuple[int, float]]] = {}
    for step, row in sorted(read_metrics(path).items()):
        for key, value in row.items():
            if math.isfinite(value):
                series.setdefault(key, []).append((step, value))
    eval_summary = None
    if eval_subdir:
        summary_path = run_dir / eval_subdir / EVAL_SUMMARY
        if summary_path.is_file():
            eval_summary = json.loads(summary_path.read_text(encoding="utf-8"))
    return RunLog(name=name or run_dir.name, run_dir=run_dir,
                  series={k: tuple(v) for k, v in series.items()}, eval_summary=eval_summary)


def find_run_dirs(sweep_dir: str | os.PathLike) -> list[Path]:
    """The sweep's run folders that hold metrics: in the sweep manifest's order, then any others by name."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such sweep directory")
    ordered: list[Path] = []
    manifest = sweep_dir / "sweep.json"
    if manifest.is_file():
        ordered = [sweep_dir / n for n in json.loads(manifest.read_text(encoding="utf-8")).get("runs", [])]
    ordered += sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p not in ordered)
    return [p for p in ordered if (p / METRICS_FILE).is_file()]


def seed_group_name(name: str) -> str:
    """A run's name without its seed: the grid part 'seed=N' of a sweep run name ('dapo,seed=1' -> 'dapo')."""
    parts = [p for p in name.split(",") if not p.startswith("seed=")]
    return ",".join(parts) or name


def average_seeds(runs: Sequence[RunLog]) -> list[RunLog]:
    """One run per group of runs that differ only in their seed (`seed_group_name`), in first-seen order: each
    metric's mean over the group at the steps every member logged, with its spread across the members as
    '<metric>:min' and '<metric>:max' series (drawn as a band by `plot_metric`). Named '<group> (n seeds)'."""
    groups: dict[str, list[RunLog]] = {}
    for run in runs:
        groups.setdefault(seed_group_name(run.name), []).append(run)
    out = []
    for name, members in groups.items():
        series: dict[str, tuple[tuple[int, float], ...]] = {}
        for metric in sorted(set().union(*(m.series for m in members))):
            per_run = [dict(m.series.get(metric, ())) for m in members]
            steps = sorted(set.intersection(*(set(r) for r in per_run)))
            if not steps:
                continue
            values = [[r[step] for r in per_run] for step in steps]
            series[metric] = tuple((st, sum(v) / len(v)) for st, v in zip(steps, values))
            series[f"{metric}:min"] = tuple((st, min(v)) for st, v in zip(steps, values))
            series[f"{metric}:max"] = tuple((st, max(v)) for st, v in zip(steps, values))
        label = f"{name} ({len(members)} seed{'s' if len(members) > 1 else ''})"
        out.append(RunLog(name=label, run_dir=members[0].run_dir, series=series))
    return out


# ----------------------------------------------------------------------------------------------------- plots


@dataclasses.dataclass(frozen=True)
class Curve:
    label: str
    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class PlotResult:
    """A written PNG and exactly what was drawn in it (also stored in the PNG's 'Description' text chunk)."""

    metric: str
    path: Path
    curves: tuple[Curve, ...]


def metric_filename(metric: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in metric) + ".png"


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): the trend of a noisy per-step metric."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_metric(runs: Sequence[RunLog], metric: str, out_path: str | os.PathLike, *,
                title: Optional[str] = None, smooth: int = 1) -> PlotResult:
    """One PNG of `metric` against step with one curve per run that logged it (Agg, no pyplot state).

    smooth > 1 draws each run's raw values faintly and their trailing `smooth`-step mean on top (the stored curve
    data stays raw). A run with '<metric>:min' / ':max' series (`average_seeds`) gets its spread as a band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves = tuple(Curve(run.name, tuple(run.steps(metric)), tuple(run.values(metric)))
                   for run in runs if run.series.get(metric))
    if not curves:
        raise ValueError(f"no run logged {metric!r}")
    fig = Figure(figsize=(7.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bands = {run.name: (run.series.get(f"{metric}:min"), run.series.get(f"{metric}:max")) for run in runs}
    for curve in curves:
        marker = "o" if len(curve.steps) <= 30 else None
        low, high = bands.get(curve.label, (None, None))
        if low and high:
            line = ax.plot(curve.steps, curve.values, label=curve.label, marker=marker, markersize=3, linewidth=1.5)
            ax.fill_between([st for st, _ in low], [v for _, v in low], [v for _, v in high],
                            color=line[0].get_color(), alpha=0.15, linewidth=0)
        elif smooth > 1 and len(curve.steps) > 1:
            raw = ax.plot(curve.steps, curve.values, marker=marker, markersize=3, linewidth=1.0, alpha=0.35)
            ax.plot(curve.steps, moving_average(curve.values, smooth), color=raw[0].get_color(), linewidth=2.0,
                    label=f"{curve.label} (mean of last {smooth})")
        else:
            ax.plot(curve.steps, curve.values, label=curve.label, marker=marker, markersize=3, linewidth=1.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title or metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    description = json.dumps({"metric": metric, "curves": [dataclasses.asdict(c) for c in curves]})
    fig.savefig(out_path, format="png", metadata={"Description": description})
    return PlotResult(metric, out_path, curves)


def plot_runs(runs: Sequence[RunLog], out_dir: str | os.PathLike,
              metrics: Optional[Sequence[str]] = None, smooth: int = 1) -> list[PlotResult]:
    """One PNG per metric (default: DEFAULT_METRICS) that at least one run logged."""
    wanted = DEFAULT_METRICS if metrics is None else tuple(metrics)
    present = [m for m in wanted if any(run.series.get(m) for run in runs)]
    if metrics is not None and len(present) < len(wanted):
        missing = [m for m in wanted if m not in present]
        raise ValueError(f"no run logged {missing}")
    return [plot_metric(runs, m, Path(out_dir) / metric_filename(m), smooth=1 if m.startswith("val") else smooth)
            for m in present]


# ----------------------------------------------------------------------------------------------------- tables


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """The numbers of one table row (None where the run did not log them)."""

    name: str
    last_step: Optional[int]  # last training step logged
    val_accuracy_final: Optional[float]
    val_accuracy_best: Optional[float]
    val_accuracy_best_step: Optional[int]
    val_reward_final: Optional[float]
    train: Mapping[str, Optional[float]]  # reward component -> mean over the last `window` training steps
    benchmarks: Mapping[str, Optional[float]]  # BENCHMARK_COLUMNS header -> score (fraction)


def _tail_mean(values: Sequence[float], window: int) -> Optional[float]:
    tail = list(values)[-window:]
    return sum(tail) / len(tail) if tail else None


def _dig(tree: Any, path: Sequence[str]) -> Optional[float]:
    for key in path:
        if not isinstance(tree, Mapping) or key not in tree:
            return None
        tree = tree[key]
    return float(tree) if isinstance(tree, (int, float)) and not isinstance(tree, bool) else None


def summarize_run(run: RunLog, window: int = 1) -> RunSummary:
    """Final (mean of the last `window` training steps) reward components, final and best validation accuracy."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    val = run.series.get("val/accuracy", ())
    best = max(val, key=lambda sv: sv[1]) if val else None  # first step reaching the best value
    train_steps = run.steps("reward/total")
    val_reward = run.values("val/total")
    return RunSummary(
        name=run.name,
        last_step=train_steps[-1] if train_steps else None,
        val_accuracy_final=val[-1][1] if val else None,
        val_accuracy_best=best[1] if best else None,
        val_accuracy_best_step=best[0] if best else None,
        val_reward_final=val_reward[-1] if val_reward else None,
        train={c: _tail_mean(run.values(f"reward/{c}"), window) for c in REWARD_COMPONENTS},
        benchmarks={header: _dig(run.eval_summary, path) if run.eval_summary else None
                    for header, path in BENCHMARK_COLUMNS},
    )


def _pct(x: Optional[float]) -> str:
    return "N/A" if x is None else f"{100 * x:.2f}"


def _num(x: Optional[float]) -> str:
    return "N/A" if x is None else f"{x:.3f}"


def markdown_table(summaries: Sequence[RunSummary], window: int = 1) -> str:
    """Runs as rows, the paper's ablation-table style: validation accuracy (%), final reward components, and the
    benchmark scores (%) when any run has them. The best value of each score column is bold."""
    columns: list[tuple[str, Any, Any]] = [  # header, value getter, formatter
        ("Val acc. % (final)", lambda s: s.val_accuracy_final, _pct),
        ("Val acc. % (best)", lambda s: s.val_accuracy_best, _pct),
        ("Val reward", lambda s: s.val_reward_final, _num),
        ("Reward", lambda s: s.train["total"], _num),
        ("Format", lambda s: s.train["format"], _num),
        ("Correctness", lambda s: s.train["correctness"], _num),
        ("Length", lambda s: s.train["length"], _num),
        ("Train acc. %", lambda s: s.train["accuracy"], _pct),
    ]
    if any(v is not None for s in summaries for v in s.benchmarks.values()):
        columns += [(f"{h} %", (lambda s, h=h: s.benchmarks[h]), _pct) for h, _ in BENCHMARK_COLUMNS]
    header = ["Run", "Steps"] + [c[0] for c in columns]
    rows = []
    for s in summaries:
        row = [s.name, "N/A" if s.last_step is None else str(s.last_step)]
        for _, get, fmt in columns:
            value = get(s)
            cell = fmt(value)
            shown = {fmt(get(o)) for o in summaries if get(o) is not None}
            if value is not None and len(shown) > 1 and cell == fmt(max(get(o) for o in summaries
                                                                        if get(o) is not None)):
                cell = f"**{cell}**"
            row.append(cell)
        if s.val_accuracy_best_step is not None:
            row[3] += f" @ {s.val_accuracy_best_step}"
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    what = "the last training step" if window == 1 else f"the mean of the last {window} training steps"
    note = (f"Reward columns: {what} (rollout rewards, sampled). Validation: greedy decoding on the held-out split; "
            "'best' gives the step. Bold: the best run in a column where runs differ.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def markdown_seed_table(runs: Sequence[RunLog], metrics: Sequence[str]) -> str:
    """Groups of seeds as rows (`seed_group_name`): for each metric its last logged value in each run, as the
    mean over the group's runs and the spread (half the range), then the runs' own values."""
    groups: dict[str, list[RunLog]] = {}
    for run in runs:
        groups.setdefault(seed_group_name(run.name), []).append(run)
    header = ["Run", "Seeds", "Step"] + [f"{m} (mean ± half-range)" for m in metrics]
    rows = []
    for name, members in groups.items():
        cells = [name, str(len(members))]
        steps = {m.steps(metrics[0])[-1] for m in members if m.steps(metrics[0])}
        cells.append(",".join(str(x) for x in sorted(steps)) or "N/A")
        for metric in metrics:
            finals = [m.values(metric)[-1] for m in members if m.values(metric)]
            if not finals:
                cells.append("N/A")
                continue
            mean, half = sum(finals) / len(finals), (max(finals) - min(finals)) / 2
            cells.append(f"{mean:.3f} ± {half:.3f} ({', '.join(f'{v:.3f}' for v in finals)})")
        rows.append(cells)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(metrics)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    note = ("Each cell: the metric's last logged value per run, averaged over the group's seeds ± half their "
            "range, then each seed's value in run order.")
    return "\n".join(lines) + "\n\n" + note + "\n"
