r"""Curves and a summary table across GRPO runs (a sweep's, or any list of run directories).

  python -m experiments.plot --sweep_dir=runs/sweeps/reward_ablations_qwen2.5_3b     # -> <sweep_dir>/plots/
  python -m experiments.plot --runs=runs/a,runs/b --out=plots/ --metrics=reward/total,val/accuracy
  python -m experiments.plot --sweep_dir=runs/sweeps/algorithms_default --average_seeds   # mean and band over seeds

Writes one PNG per metric (one curve per run) and summary.md: per run the final/best validation accuracy, the final
reward components and, for runs evaluated into <run_dir>/eval (python -m experiments.evaluate --out=...), BFCL v3 /
API-Bank / Bamboogle overall scores, in the layout of the paper's ablation tables.
"""
from __future__ import annotations

from pathlib import Path

from absl import app, flags

from experiments.tools import plotting

FLAGS = flags.FLAGS

flags.DEFINE_string("sweep_dir", None, "A sweep's directory (experiments/sweep.py): plots every run in it.")
flags.DEFINE_list("runs", None, "Run directories to compare (instead of --sweep_dir).")
flags.DEFINE_string("out", None, "Output folder (default <sweep_dir>/plots).")
flags.DEFINE_list("metrics", None, "Metrics to plot (default: reward and validation components, response length, "
                  "KL, entropy, grad norm; those no run logged are skipped).")
flags.DEFINE_integer("smooth", 1, "Curves: also draw the trailing mean of the last N steps of each training "
                     "metric (validation curves stay raw).", lower_bound=1)
flags.DEFINE_integer("window", 1, "Table: average the reward components over the last N training steps.",
                     lower_bound=1)
flags.DEFINE_bool("average_seeds", False, "Runs that differ only in their seed (sweep names like 'dapo,seed=1') "
                  "become one curve, their mean, with a band from their min to max; summary_seeds.md gives each "
                  "group's final values as mean ± half-range and per seed.")
flags.DEFINE_list("seed_table_metrics", ["val_sampled/total", "val_sampled/format", "val_sampled/correctness",
                                         "val/total", "val/accuracy"],
                  "--average_seeds: the metrics of summary_seeds.md (their last logged values).")
flags.DEFINE_string("eval_subdir", "eval", "Run subfolder holding an experiments.evaluate summary.json ('' = none).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(FLAGS.sweep_dir) == bool(FLAGS.runs):
        raise app.UsageError("pass exactly one of --sweep_dir and --runs")
    if FLAGS.sweep_dir:
        try:
            run_dirs = plotting.find_run_dirs(FLAGS.sweep_dir)
        except FileNotFoundError as e:
            raise app.UsageError(f"--sweep_dir: {e}") from None
        if not run_dirs:
            raise app.UsageError(f"--sweep_dir={FLAGS.sweep_dir}: no run in it has logged metrics yet")
    else:
        run_dirs = [Path(r) for r in FLAGS.runs]
    if not FLAGS.out and not FLAGS.sweep_dir:
        raise app.UsageError("--out is required with --runs")
    out = Path(FLAGS.out or Path(FLAGS.sweep_dir) / "plots")
    names = [d.name for d in run_dirs]
    if len(set(names)) != len(names):  # e.g. runs/a/seed0 and runs/b/seed0: label with the whole path
        names = [str(d) for d in run_dirs]
    try:
        runs = [plotting.load_run(d, name=n, eval_subdir=FLAGS.eval_subdir or None) for d, n in zip(run_dirs, names)]
        results = plotting.plot_runs(plotting.average_seeds(runs) if FLAGS.average_seeds else runs, out,
                                     FLAGS.metrics, smooth=FLAGS.smooth)
    except (FileNotFoundError, ValueError) as e:
        raise app.UsageError(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    if FLAGS.average_seeds:
        seeds = plotting.markdown_seed_table(runs, FLAGS.seed_table_metrics)
        (out / "summary_seeds.md").write_text(seeds, encoding="utf-8")
        print(seeds)
    table = plotting.markdown_table([plotting.summarize_run(r, FLAGS.window) for r in runs], FLAGS.window)
    (out / "summary.md").write_text(table, encoding="utf-8")
    print(table)
    print(f"{len(results)} plot(s) and summary.md in {out}")


if __name__ == "__main__":
    app.run(main)
