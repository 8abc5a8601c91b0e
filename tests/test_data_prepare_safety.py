"""data.prepare never loses data: failed runs exit non-zero and leave existing outputs byte for byte, a smaller mix
replaces a larger one only when asked, and the output folder is swapped in whole."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from toolrl_jax.datasets import ToolRLExample, write_parquet
from toolrl_jax.datasets.format import format_assistant_turn
from toolrl_jax.datasets.output_folder import OutputError, check_replaceable, staged_folder

REPO = Path(__file__).resolve().parents[1]


def run_prepare(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "data.prepare", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.staging-")]


@pytest.fixture
def existing(tmp_path) -> tuple[Path, dict[str, bytes]]:
    """An --out folder from a good run (50 synthetic rows: 49 train, 1 test) and its bytes."""
    out = tmp_path / "mix"
    result = run_prepare("--source=synthetic:50", f"--out={out}")
    assert result.returncode == 0, result.stderr
    return out, snapshot(out)


def test_source_whose_rows_all_fail_exits_nonzero_and_keeps_outputs(tmp_path, existing):
    out, before = existing
    bad = tmp_path / "xlam.json"
    bad.write_text(json.dumps([{"query": "q", "tools": "[{", "answers": []}, {"tools": []}]))
    result = run_prepare(f"--source=xlam:{bad}", f"--out={out}")
    assert result.returncode == 1
    assert f"--source=xlam:{bad} yields no examples (2 row(s) failed or skipped)" in result.stderr
    assert "row 1 (0-based): missing required field 'query'" in result.stderr
    assert snapshot(out) == before and not leftovers(out)
    # A good source next to the failing one does not hide it.
    result = run_prepare("--source=synthetic:80", f"--source=xlam:{bad}", f"--out={out}")
    assert result.returncode == 1 and snapshot(out) == before


def test_fewer_rows_replace_only_with_overwrite_smaller(existing):
    out, before = existing
    result = run_prepare("--source=synthetic:20", f"--out={out}")
    assert result.returncode == 1
    assert "train.parquet has 49 rows and would be replaced by 20; pass --overwrite_smaller" in result.stderr
    assert snapshot(out) == before
    result = run_prepare("--source=synthetic:20", f"--out={out}", "--overwrite_smaller")
    assert result.returncode == 0, result.stderr
    assert pq.read_metadata(out / "train.parquet").num_rows == 20 and not leftovers(out)
    assert sorted(snapshot(out)) == sorted(before)
    result = run_prepare("--source=synthetic:20", "--source=synthetic:30", f"--out={out}")  # more rows: no flag
    assert result.returncode == 0, result.stderr
    assert pq.read_metadata(out / "train.parquet").num_rows == 49


def test_folder_with_other_files_is_refused(existing):
    out, before = existing
    (out / "notes.txt").write_text("mine")
    result = run_prepare("--source=synthetic:60", f"--out={out}")
    assert result.returncode == 1 and "holds entries this run does not write (notes.txt)" in result.stderr
    assert snapshot(out) == {**before, "notes.txt": b"mine"}


def test_empty_mix_exits_nonzero_and_writes_nothing(tmp_path):
    out = tmp_path / "new"
    result = run_prepare("--source=synthetic:5", "--count=synthetic:0", f"--out={out}")
    assert result.returncode == 1 and "the mix has no rows" in result.stderr
    assert not out.exists() and not leftovers(out)


def test_toolrl_source_bad_ground_truth_policy(tmp_path):
    good = format_assistant_turn(calls=[("f", {})])
    bad = "<think> t </think>\n<tool_call>\n{not json}\n</tool_call>"
    source = write_parquet([ToolRLExample([{"role": "user", "content": f"q{i}"}], truth, i, "rlla")
                            for i, truth in enumerate([good, bad, good])], tmp_path / "rl.parquet")
    out = tmp_path / "mix"
    result = run_prepare(f"--source=toolrl:{source}", f"--out={out}")
    assert result.returncode == 1 and f"{source}: 1 of 3 rows cannot be used" in result.stderr
    assert "row 1 (0-based): ground truth tool_call line 1" in result.stderr and not out.exists()
    result = run_prepare(f"--source=toolrl:{source}", f"--out={out}", "--bad_rows=skip")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "conversion_report.json").read_text())
    assert [(i["source"], i["file"], i["row"]) for i in report["failed"]] == [("toolrl", str(source), 1)]
    assert pq.read_metadata(out / "train.parquet").num_rows == 2


def test_staged_folder_crash_leaves_old_folder_and_success_replaces_it(tmp_path, monkeypatch):
    out = tmp_path / "mix"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"old")
    out.chmod(0o750)
    with pytest.raises(RuntimeError, match="crash"):
        with staged_folder(out) as stage:
            (stage / "train.parquet").write_bytes(b"new, half writ")
            raise RuntimeError("crash")
    assert snapshot(out) == {"train.parquet": b"old"} and not leftovers(out)
    with staged_folder(out) as stage:
        (stage / "test.parquet").write_bytes(b"new")
    assert snapshot(out) == {"test.parquet": b"new"} and not leftovers(out)
    assert out.stat().st_mode & 0o777 == 0o750
    # Without renameat2 (other systems and filesystems), two renames do the same.
    monkeypatch.setattr("toolrl_jax.datasets.output_folder._exchange", lambda a, b: False)
    with staged_folder(out) as stage:
        (stage / "train.parquet").write_bytes(b"newer")
    assert snapshot(out) == {"train.parquet": b"newer"} and not leftovers(out)


def test_check_replaceable_refuses_non_folder_and_unreadable_parquet(tmp_path):
    plain = tmp_path / "file"
    plain.write_text("x")
    with pytest.raises(OutputError, match="exists and is not a folder"):
        check_replaceable(plain, ["train.parquet"], {}, allow_fewer=False)
    out = tmp_path / "mix"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"garbage")
    with pytest.raises(OutputError, match=r"train\.parquet cannot be read"):
        check_replaceable(out, ["train.parquet"], {"train.parquet": 5}, allow_fewer=False)
    check_replaceable(out, ["train.parquet"], {"train.parquet": 5}, allow_fewer=True)
