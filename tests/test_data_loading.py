"""Loading with every ground truth parsed up front: bad rows named by file and row, "error" and "skip" policies."""
from __future__ import annotations

import dataclasses
import json

import pytest

from toolrl_jax.datasets import DataFileError, ToolRLExample, make_synthetic_split, read_examples, write_parquet
from toolrl_jax.datasets.format import format_assistant_turn
from toolrl_jax.datasets.loading import BadRowsError, check_examples, load_examples

GOOD = format_assistant_turn(calls=[("f", {"a": 1})])
NOT_JSON = "<think> t </think>\n<tool_call>\n{not json}\n</tool_call>"
PARAMS_NOT_DICT = '<think> t </think>\n<tool_call>\n{"name": "f", "parameters": [1]}\n</tool_call>'


def _examples(truths: list[str]) -> list[ToolRLExample]:
    return [ToolRLExample([{"role": "system", "content": "s"}, {"role": "user", "content": f"q{i}"}], truth, i, "t")
            for i, truth in enumerate(truths)]


def _sft(i: int, truth: str) -> dict[str, str]:
    return {"instruction": "s", "input": f"q{i}", "output": truth}


def test_parquet_bad_ground_truth_error_names_file_and_row(tmp_path):
    path = write_parquet(_examples([GOOD, GOOD, NOT_JSON, GOOD]), tmp_path / "train.parquet")
    with pytest.raises(BadRowsError, match=r"train\.parquet: 1 of 4 rows cannot be used .*\n"
                                           r"  row 2 \(0-based\): ground truth tool_call line 1: JSONDecodeError"):
        load_examples(path)
    with pytest.raises(DataFileError) as info:  # BadRowsError is a DataFileError, with the issues attached
        load_examples(path, bad_rows="error")
    assert [(i.path, i.row, i.unit) for i in info.value.issues] == [(str(path), 2, "row")]


def test_parquet_skip_returns_good_rows_and_issue_list(tmp_path):
    path = write_parquet(_examples([GOOD, GOOD, NOT_JSON, GOOD]), tmp_path / "train.parquet")
    loaded = load_examples(path, bad_rows="skip")
    assert [e.user for e in loaded.examples] == ["q0", "q1", "q3"]
    assert loaded.positions == [0, 1, 3]
    assert [(i.path, i.row) for i in loaded.skipped] == [(str(path), 2)]
    assert "JSONDecodeError" in loaded.skipped[0].reason
    assert "row 2 (0-based)" in str(loaded.skipped[0]) and "1 bad row(s) skipped" in loaded.summary()


def test_json_bad_ground_truth_and_bad_layout_follow_the_policy(tmp_path):
    path = tmp_path / "sft.json"
    path.write_text(json.dumps([_sft(0, GOOD), _sft(1, PARAMS_NOT_DICT), {"instruction": "s"}, _sft(3, GOOD)]))
    with pytest.raises(BadRowsError, match=r"sft\.json: 2 of 4 rows") as info:
        load_examples(path)
    message = str(info.value)
    assert "row 1 (0-based): ground truth tool_call line 1 is not" in message
    assert "row 2 (0-based): 'input' must be a string" in message
    loaded = load_examples(path, bad_rows="skip")
    assert [e.user for e in loaded.examples] == ["q0", "q3"]
    assert [i.row for i in loaded.skipped] == [1, 2]


def test_jsonl_rows_are_named_by_1_based_line(tmp_path):
    path = tmp_path / "sft.jsonl"
    lines = [json.dumps(_sft(0, GOOD)).encode(), b"", b"{not json", b'{"instruction": "caf\xe9"}',
             json.dumps(_sft(4, NOT_JSON)).encode(), json.dumps(_sft(5, GOOD)).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    loaded = load_examples(path, bad_rows="skip")
    assert [e.user for e in loaded.examples] == ["q0", "q5"]
    assert loaded.positions == [1, 6]
    assert [(i.row, i.unit) for i in loaded.skipped] == [(3, "line"), (4, "line"), (5, "line")]
    assert "invalid JSON" in loaded.skipped[0].reason and "not UTF-8" in loaded.skipped[1].reason
    with pytest.raises(BadRowsError, match=r"sft\.jsonl: 3 of 5 rows .*\n  line 3: invalid JSON"):
        load_examples(path)


def test_check_examples_in_memory():
    train, _ = make_synthetic_split(20, 0, seed=0)
    assert check_examples(train, origin="synthetic train").examples == train
    broken = [*train[:3], dataclasses.replace(train[0], ground_truth=NOT_JSON)]
    with pytest.raises(BadRowsError, match=r"synthetic train: 1 of 4 rows .*\n  row 3 \(0-based\): ground truth"):
        check_examples(broken, origin="synthetic train")
    loaded = check_examples(broken, origin="synthetic train", bad_rows="skip")
    assert loaded.examples == train[:3]
    assert [(i.path, i.row) for i in loaded.skipped] == [("synthetic train", 3)]


def test_skip_with_no_good_row_still_fails_and_policy_is_checked(tmp_path):
    path = write_parquet(_examples([NOT_JSON, PARAMS_NOT_DICT]), tmp_path / "bad.parquet")
    with pytest.raises(BadRowsError, match=r"bad\.parquet: every one of its 2 rows is bad"):
        load_examples(path, bad_rows="skip")
    with pytest.raises(ValueError, match="bad_rows must be one of"):
        load_examples(path, bad_rows="ignore")  # type: ignore[arg-type]


def test_whole_file_errors_raise_under_both_policies(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    for policy in ("error", "skip"):
        with pytest.raises(DataFileError, match=r"junk\.parquet: cannot read parquet"):
            load_examples(junk, bad_rows=policy)
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_examples(tmp_path / "missing.parquet", bad_rows="skip")


def test_read_examples_keeps_its_layout_only_contract(tmp_path):
    """Existing callers: read_examples still returns every row with a good layout (ground truths unchecked) and
    raises at the first row with a bad layout, naming file and row."""
    path = write_parquet(_examples([GOOD, NOT_JSON]), tmp_path / "x.parquet")
    assert [e.ground_truth for e in read_examples(path)] == [GOOD, NOT_JSON]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "s"}, _sft(1, GOOD), 3]))
    with pytest.raises(DataFileError, match=r"bad\.json: row 0 \(0-based\): 'input'.*\(and 1 more bad rows\)"):
        read_examples(bad)


# SFT400 rows whose thought mentions "<tool_call>" before the real block: the reward's parser (the original's
# `split("<tool_call>")[1]`) then reads prose as the call block, so these ground truths cannot be scored.
SFT400_UNSCORABLE_ROWS = [10, 44, 73, 76, 95, 97, 200, 213, 252, 280, 285, 317, 348, 350, 356, 363, 380]


def test_shared_toolrl_files_load_and_sft400_unscorable_rows_are_named(shared_dir):
    test = load_examples(shared_dir / "data/toolrl/test.parquet")
    assert (len(test.examples), test.skipped) == (80, [])
    path = shared_dir / "data/toolrl/rlla_sft.json"
    with pytest.raises(BadRowsError, match=r"rlla_sft\.json: 17 of 400 rows cannot be used"):
        load_examples(path)
    sft = load_examples(path, bad_rows="skip")
    assert len(sft.examples) == 383 and [i.row for i in sft.skipped] == SFT400_UNSCORABLE_ROWS
    records = json.loads(path.read_text())
    assert all(records[row]["output"].count("<tool_call>") == 2 for row in SFT400_UNSCORABLE_ROWS)
