"""MetricsWriter (JSONL + TensorBoard, resume without duplicate steps), ProgressBar and median_seconds."""
from __future__ import annotations

import json
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from toolrl_jax.metrics import MetricsWriter, ProgressBar, read_jsonl, to_python


def _read_tb_events(run_dir):
    """Parse TFRecord-framed Event protos from every event file (length, crc, payload, crc)."""
    events = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


def _scalars(events):
    return [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value if v.HasField("simple_value")]


def test_write_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path) as w:
        w.write(1, {"reward": jnp.float32(0.5), "accuracy": np.float64(0.25), "n": np.int32(3), "tag": "a"})
        w.write(2, {"reward": 0.75, "loss": float("nan"), "grad_norm": float("-inf")})
        # flushed each step: readable before close
        assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
        w.write_samples(2, [{"prompt": "p", "response": "r", "reward": np.float32(1.0), "ids": np.arange(3)}])
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[0]["reward"] == 0.5 and records[0]["accuracy"] == 0.25 and records[0]["n"] == 3
    assert records[0]["tag"] == "a" and isinstance(records[0]["time"], float)
    # strict JSON: non-finite values are null and named, never bare NaN/Infinity tokens
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None
    assert records[1]["nonfinite"] == {"loss": "nan", "grad_norm": "-inf"}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda token, line=line: pytest.fail(f"bare {token} in {line}"))
    with pytest.raises(ValueError, match="reserved"):
        MetricsWriter(tmp_path / "other").write(1, {"nonfinite": 1.0})
    samples = read_jsonl(tmp_path / "sample_log.jsonl")
    assert samples == [{"step": 2, "prompt": "p", "response": "r", "reward": 1.0, "ids": [0, 1, 2]}]
    scalars = _scalars(_read_tb_events(tmp_path))
    assert (1, "reward", 0.5) in scalars and (2, "reward", 0.75) in scalars and (1, "n", 3.0) in scalars
    assert not any(tag == "tag" for _, tag, _ in scalars)


def test_resume_drops_later_steps_and_torn_lines(tmp_path):
    with MetricsWriter(tmp_path) as w:
        for step in (1, 2, 3, 4):
            w.write(step, {"reward": float(step)})
            w.write_samples(step, [{"response": f"s{step}"}])
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "rew')  # killed mid-write
    with pytest.raises(FileExistsError, match="resume_step"):
        MetricsWriter(tmp_path)
    with MetricsWriter(tmp_path, resume_step=2) as w:  # checkpoint was at step 2
        for step in (3, 4):
            w.write(step, {"reward": 10.0 * step})
            w.write_samples(step, [{"response": f"t{step}"}])
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["reward"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
    assert [s["response"] for s in read_jsonl(tmp_path / "sample_log.jsonl")] == ["s1", "s2", "t3", "t4"]
    events = _read_tb_events(tmp_path)
    # the resumed event file starts with a purge marker at step 3 (TensorBoard hides older events with step >= 3)
    assert any(e.step == 3 and e.HasField("session_log") and e.session_log.status == e.session_log.START
               for e in events)


def test_to_python_rejects_non_scalars(tmp_path):
    assert to_python(jnp.array([2.5])) == 2.5 and to_python(np.bool_(True)) is True
    with pytest.raises(TypeError, match="'x'.*shape"):
        to_python(np.zeros(3), "x")
    with pytest.raises(TypeError, match="unsupported"):
        to_python(object(), "obj")
    with pytest.raises(ValueError, match="reserved"), MetricsWriter(tmp_path, tensorboard=False) as w:
        w.write(1, {"step": 3})


def test_progress_bar():
    bar = ProgressBar(10, initial_step=2, keys=("reward", "accuracy"), disable=True)
    text = bar.update(3, {"reward": jnp.float32(0.51234), "loss": 1.0})
    assert text == "reward=0.5123"
    assert bar.update(5, {"reward": 0.6, "accuracy": 0.5}) == "reward=0.6, accuracy=0.5"
    bar.close()


def test_median_seconds_calls_fn_repeats_times():
    from toolrl_jax.metrics import median_seconds

    calls = []
    assert median_seconds(lambda: calls.append(1), 3) >= 0.0 and len(calls) == 3
    with pytest.raises(ValueError, match="repeats"):
        median_seconds(lambda: None, 0)
