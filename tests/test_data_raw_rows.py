"""Raw sources row by row: encoding errors and bad JSONL lines are per-row failures with file and position, an
undecodable file is a clear error naming it, and a missing required field is a failure naming the field."""
from __future__ import annotations

import json

import pytest

from toolrl_jax.datasets import ConversionReport, DataFileError, convert_file

TOOL = {"name": "add", "description": "Adds.", "parameters": {"a": {"type": "int", "description": "x"}}}


def _xlam(query: str = "Add one.", **fields) -> dict:
    record = {"query": query, "tools": [TOOL], "answers": [{"name": "add", "arguments": {"a": 1}}]}
    record.update(fields)
    return record


def _hammer(**fields) -> dict:
    record = {"instruction": f"[BEGIN OF AVAILABLE TOOLS]\n{json.dumps([TOOL])}\n[END OF AVAILABLE TOOLS]\n"
                             "[BEGIN OF QUERY]\nAdd one.\n[END OF QUERY]",
              "input": "", "output": '```\n[{"name": "add", "arguments": {"a": 1}}]\n```'}
    record.update(fields)
    return record


def _toolace(turns=None, **fields) -> dict:
    turns = turns or [{"from": "human", "value": "Add one."},
                      {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 1}}'}]
    record = {"system": f"Functions:\n{json.dumps([TOOL])}.", "tools": "[]", "conversations": turns}
    record.update(fields)
    return record


def _without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


def test_non_utf8_record_of_a_json_list_is_a_row_failure(tmp_path):
    path = tmp_path / "xlam.json"
    path.write_bytes(json.dumps([_xlam("q0"), _xlam("MARK"), _xlam("q2")]).encode().replace(b"MARK", b"caf\xe9"))
    report = ConversionReport()
    examples = convert_file("xlam", path, report=report)
    assert len(examples) == 2 and report.rows_read == {"xlam": 3} and report.examples == {"xlam": 2}
    (issue,) = report.failed
    assert (issue.file, issue.row, issue.unit) == (str(path), 1, "row")
    assert "not UTF-8" in issue.reason and "caf\\xe9" in issue.reason
    assert f"{path}: row 1 (0-based): holds bytes" in str(issue)


def test_bad_jsonl_lines_are_row_failures_with_1_based_lines(tmp_path):
    path = tmp_path / "xlam.jsonl"
    lines = [json.dumps(_xlam("q0")).encode(), b"{not json", b"\xff\xfe{}", b"", json.dumps(_xlam("q4")).encode(),
             json.dumps(_without(_xlam("q5"), "answers")).encode()]
    path.write_bytes(b"\n".join(lines))
    report = ConversionReport()
    examples = convert_file("xlam", path, report=report)
    assert [e.user.split("<user> ")[1] for e in examples] == ["q0 </user>", "q4 </user>"]
    assert report.rows_read == {"xlam": 5}
    assert [(i.row, i.unit) for i in report.failed] == [(2, "line"), (3, "line"), (6, "line")]
    reasons = [i.reason for i in report.failed]
    assert "invalid JSON" in reasons[0] and "byte 0xff at offset 0 is not UTF-8" in reasons[1]
    assert reasons[2] == "missing required field 'answers'"
    assert f"{path}: line 6: missing" in str(report.failed[2])
    assert report.to_dict()["failed"][0]["unit"] == "line"


def test_undecodable_files_are_clear_errors_naming_the_file(tmp_path):
    utf16 = tmp_path / "utf16.json"
    utf16.write_bytes(json.dumps([_xlam()]).encode("utf-16"))
    with pytest.raises(DataFileError, match=r"utf16\.json: the text is utf-16.*must be UTF-8"):
        convert_file("xlam", utf16)
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps([_xlam("MARK")]).encode().replace(b"MARK", b"caf\xe9"))
    with pytest.raises(DataFileError, match=r"latin\.json: not UTF-8: every record .*byte 0xe9"):
        convert_file("xlam", latin)
    lines = tmp_path / "binary.jsonl"
    lines.write_bytes(b"\x80\x81\n\xfe\n")
    with pytest.raises(DataFileError, match=r"binary\.jsonl: no line is readable UTF-8 JSON \(2 bad line"):
        convert_file("xlam", lines)
    broken = tmp_path / "broken.json"
    broken.write_bytes(b'[{"query": "caf\xe9"')
    with pytest.raises(DataFileError, match=r"broken\.json: invalid JSON \(and not UTF-8: byte 0xe9"):
        convert_file("xlam", broken)
    bom = tmp_path / "bom.json"  # a UTF-8 byte-order mark is fine
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps([_xlam()]).encode())
    assert len(convert_file("xlam", bom)) == 1


CALL_WITHOUT_ARGUMENTS = '{"name": "add"}'
MISSING_FIELDS = [
    ("xlam", _without(_xlam(), "answers"), "missing required field 'answers'"),
    ("xlam", _without(_xlam(), "tools"), "missing required field 'tools'"),
    ("xlam", _without(_xlam(), "query"), "missing required field 'query'"),
    ("xlam", _xlam(answers=[{"name": "add"}]), "answers[0]: missing required field 'arguments'"),
    ("xlam", _xlam(answers=[{"arguments": {}}]), "answers[0]: missing required field 'name'"),
    ("hammer", _without(_hammer(), "output"), "missing required field 'output'"),
    ("hammer", _without(_hammer(), "instruction"), "missing required field 'instruction'"),
    ("hammer", _without(_hammer(instruction=_hammer()["instruction"].split("[BEGIN OF QUERY]")[0]), "input"),
     "no [BEGIN OF QUERY] in 'instruction': missing required field 'input'"),
    ("hammer", _hammer(output=f"[{CALL_WITHOUT_ARGUMENTS}]"), "output[0]: missing required field 'arguments'"),
    ("toolace", _without(_toolace(), "conversations"), "missing required field 'conversations'"),
    ("toolace", _without(_toolace(), "system"), "'tools' is empty: missing required field 'system'"),
    ("toolace", _toolace([{"from": "human"}]), "turn 0: missing required field 'value'"),
    ("toolace", _toolace([{"value": "hi"}]), "turn 0: missing required field 'from'"),
    ("toolace", _toolace([{"from": "human", "value": "q"}, {"from": "function_call", "value": CALL_WITHOUT_ARGUMENTS}]),
     "turn 1 function_call[0]: missing required field 'arguments'"),
]


@pytest.mark.parametrize("kind,record,reason", MISSING_FIELDS, ids=[r for _, _, r in MISSING_FIELDS])
def test_missing_required_field_is_a_row_failure_naming_the_field(tmp_path, kind, record, reason):
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps([record, _xlam() if kind == "xlam" else _hammer() if kind == "hammer" else _toolace()]))
    report = ConversionReport()
    examples = convert_file(kind, path, report=report)
    assert len(examples) == 1 and not report.skipped  # the well-formed second row still converts
    (issue,) = report.failed
    assert (issue.file, issue.row) == (str(path), 0)
    assert issue.reason.startswith(reason), issue.reason
