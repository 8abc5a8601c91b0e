"""Run logging: one JSON line per step (metrics.jsonl), sample responses (sample_log.jsonl), TensorBoard scalars,
a tqdm progress line with the live reward, and the median wall time of a benchmarked call.

Resuming: open the writer with `resume_step` = the restored checkpoint's step. Lines of steps after it (written
by the crashed run past its last checkpoint) are dropped from both JSONL files, as is a torn last line, and
TensorBoard is told to purge its events from step resume_step + 1 on, so no step appears twice.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "sample_log.jsonl"
TENSORBOARD_DIR = "tensorboard"


def to_python(value: Any, name: str = "value") -> Any:
    """A JSON-ready scalar from Python/numpy/jax scalars or one-element arrays; strings and None pass through."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy or jax array
        arr = np.asarray(value)
        if arr.size != 1:
            raise TypeError(f"metric {name!r} must be a scalar, got an array of shape {arr.shape}")
        item = arr.reshape(()).item()
        return item if isinstance(item, (bool, int)) else float(item)
    raise TypeError(f"metric {name!r} has unsupported type {type(value).__name__}")


def _json_default(obj: Any) -> Any:
    """numpy/jax scalars and arrays inside sample records become Python values/lists."""
    if hasattr(obj, "tolist"):
        return np.asarray(obj).tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


NONFINITE_KEY = "nonfinite"


def _strict_json(record: Mapping[str, Any]) -> str:
    """One JSON line with every non-finite float (at the top level) replaced by null and listed, as "nan"/"inf"/
    "-inf", under NONFINITE_KEY; nested values are left to `json.dumps(allow_nan=False)`, which refuses them."""
    out, named = {}, {}
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key], named[key] = None, "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        else:
            out[key] = value
    if named:
        out[NONFINITE_KEY] = named
    return json.dumps(out, default=_json_default, allow_nan=False)


def _truncate_jsonl(path: Path, resume_step: int) -> int:
    """Keep only well-formed lines with step <= resume_step (atomic rewrite); returns the number dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    with path.open("r", encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
                keep = line.endswith("\n") and int(record["step"]) <= resume_step
            except (ValueError, KeyError, TypeError):
                keep = False  # a torn or foreign line
            if keep:
                kept.append(line)
            else:
                dropped += 1
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return dropped


class MetricsWriter:
    """Per-step metrics to `<run_dir>/metrics.jsonl` (+ TensorBoard), samples to `<run_dir>/sample_log.jsonl`.

    resume_step: None for a new run (the run dir must not already hold metrics); otherwise the step training
    resumes after (0 = start over in an existing dir). Every write is flushed immediately.
    Every line is strict JSON: a non-finite float is written as null and named, with its value as a string, under
    the line's "nonfinite" key (e.g. "nonfinite": {"actor/grad_norm": "nan"}); TensorBoard gets the float itself.
    On multiple hosts, create it on process 0 only.
    """

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: Optional[int] = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.samples_path = self.run_dir / SAMPLES_FILE
        if resume_step is None:
            if self.metrics_path.exists() and self.metrics_path.stat().st_size > 0:
                raise FileExistsError(f"{self.metrics_path} already holds metrics: pass resume_step (the restored "
                                      "checkpoint step, or 0 to start over) or use a new run directory")
        else:
            for path in (self.metrics_path, self.samples_path):
                dropped = _truncate_jsonl(path, resume_step)
                if dropped:
                    logger.info("metrics: dropped %d lines after step %d from %s", dropped, resume_step, path)
        self._metrics_file = self.metrics_path.open("a", encoding="utf-8")
        self._samples_file = self.samples_path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(logdir=str(self.run_dir / TENSORBOARD_DIR), purge_step=purge, flush_secs=10)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Append one line {"step", "time", **metrics} and log the numeric values to TensorBoard."""
        record: dict[str, Any] = {"step": int(step), "time": time.time()}
        for key, value in metrics.items():
            if key in record or key == NONFINITE_KEY:
                raise ValueError(f"metric name {key!r} is reserved")
            record[key] = to_python(value, key)
        self._metrics_file.write(_strict_json(record) + "\n")
        self._metrics_file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, global_step=int(step))
            self._tb.flush()
        return record

    def write_samples(self, step: int, samples: Sequence[Mapping[str, Any]]) -> None:
        """Append one line per sample, e.g. {"step", "prompt", "response", "ground_truth", "reward"}."""
        for sample in samples:
            record = {"step": int(step), **sample}
            self._samples_file.write(_strict_json(record) + "\n")
        self._samples_file.flush()
        if self._tb is not None and samples:
            self._tb.add_text("samples", "\n\n".join(f"```\n{json.dumps(dict(s), default=_json_default)[:4000]}\n```"
                                                     for s in samples[:2]), global_step=int(step))
            self._tb.flush()

    def close(self) -> None:
        self._metrics_file.close()
        self._samples_file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL log (for analysis and tests)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class ProgressBar:
    """A tqdm line over training steps showing selected live metrics, e.g. reward and accuracy."""

    def __init__(self, total_steps: int, *, initial_step: int = 0, keys: Sequence[str] = ("reward", "accuracy"),
                 desc: str = "train", disable: bool = False):
        from tqdm.auto import tqdm

        self.keys = tuple(keys)
        self._step = initial_step
        self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, disable=disable, dynamic_ncols=True)

    def update(self, step: int, metrics: Mapping[str, Any]) -> str:
        """Advance to `step` and show the metrics named in `keys` that are present; returns the postfix text."""
        parts = {}
        for key in self.keys:
            if key in metrics:
                value = to_python(metrics[key], key)
                parts[key] = f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
        self._bar.set_postfix(parts, refresh=False)
        self._bar.update(max(step - self._step, 0))
        self._step = max(step, self._step)
        return ", ".join(f"{k}={v}" for k, v in parts.items())

    def close(self) -> None:
        self._bar.close()


def median_seconds(fn: Any, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn() (benchmarks: one slow outlier does not move it)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))
