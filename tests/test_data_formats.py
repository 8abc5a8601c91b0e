"""ToolRL data format: readers/writers, raw-source converters, mix builder and the data.prepare CLI.

References are the shared ToolRL files: the RL test parquet and SFT400 (their system prompts and histories are the
byte-level ground truth of the format) and the raw ToolACE / Hammer samples.
"""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from toolrl_jax.datasets import (
    DataFileError,
    MixConfig,
    ToolRLExample,
    build_mix,
    read_examples,
    read_json,
    read_parquet,
    write_parquet,
    write_sft_json,
)
from toolrl_jax.datasets.format import (
    THINK_CALL,
    THINK_RESPOND,
    ToolSpec,
    format_assistant_turn,
    parse_tool_blocks,
    render_system_prompt,
)
from toolrl_jax.datasets.io import PARQUET_SCHEMA, examples_to_table
from toolrl_jax.datasets.sources import (
    NO_TOOL_RESPONSE,
    ConversionReport,
    convert_file,
    convert_hammer,
    convert_toolace,
    convert_xlam,
)
from toolrl_jax.rewards.parsing import parse_ground_truth

REPO = Path(__file__).resolve().parents[1]

# Format regexes of shared/spec/reward.md, chosen by which tags the ground truth has.
_FORMAT_PATTERNS = {
    (False, True): r"^<think>.*?</think>\n<response>.*?</response>$",
    (True, False): r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>$",
    (True, True): r"^<think>.*?</think>\n<tool_call>\n.*?\n</tool_call>\n<response>.*?</response>$",
    (False, False): r"^<think>.*?</think>$",
}


def gt_calls(truth: str) -> list[dict]:
    """The calls of a ground truth as the reward parses them (raises on a malformed one)."""
    return parse_ground_truth(truth).calls or []


def assert_well_formed(truth: str) -> None:
    """The ground truth matches its own format pattern, each counted tag occurs once, and its calls parse."""
    has_call, has_resp = "<tool_call>" in truth, "<response>" in truth
    assert re.search(_FORMAT_PATTERNS[(has_call, has_resp)], truth, re.DOTALL), truth
    tags = (["<tool_call>", "</tool_call>"] if has_call else []) + (["<response>", "</response>"] if has_resp else [])
    assert all(truth.count(t) == 1 for t in tags), truth
    gt_calls(truth)


@pytest.fixture(scope="module")
def toolrl_rows(shared_dir):
    return read_parquet(shared_dir / "data/toolrl/test.parquet")


@pytest.fixture(scope="module")
def sft_rows(shared_dir):
    return read_json(shared_dir / "data/toolrl/rlla_sft.json")


@pytest.fixture(scope="module")
def toolace(shared_dir):
    report = ConversionReport()
    path = shared_dir / "data/toolace_sample/sharegpt_func_fixed.json"
    return path, convert_file("toolace", path, report=report), report


# ----------------------------------------------------------------------------------------------------------------
# The system prompt template.
# ----------------------------------------------------------------------------------------------------------------

def test_system_prompt_rendering_reproduces_every_toolrl_prompt(toolrl_rows, sft_rows):
    prompts = [r.system for r in toolrl_rows] + [r.system for r in sft_rows]
    assert len(prompts) == 480
    for prompt in prompts:
        tools = parse_tool_blocks(prompt)
        assert tools
        rebuilt = [ToolSpec.from_raw({"name": t.name, "description": t.description, "parameters": t.parameters})
                   for t in tools]
        assert render_system_prompt(rebuilt) == prompt


def test_raw_toolace_tools_render_like_toolrl(shared_dir, toolrl_rows, sft_rows):
    """ToolACE tools (JSON schema, no default, extra keys) render to the exact block ToolRL shows for them."""
    shown = {}
    for row in [*toolrl_rows, *sft_rows]:
        for i, tool in enumerate(parse_tool_blocks(row.system)):
            block = row.system.split(f"{i + 1}. Name: {tool.name}\n", 1)[1].split("\n", 2)
            shown.setdefault((tool.name, tool.description), set()).add(block[1])
    records = json.loads((shared_dir / "data/toolace_sample/sharegpt_func_fixed.json").read_text())
    compared = 0
    for record in records:
        system = record["system"]
        raw_tools, _ = json.JSONDecoder().raw_decode(system, system.index("[{"))
        for raw in raw_tools:
            key = (raw["name"], raw["description"])
            if key in shown:
                rendered = ToolSpec.from_raw(raw).render(1).split("\n")[2]
                assert rendered in shown[key], (raw, shown[key])
                compared += 1
    assert compared >= 40  # 45 tools of the sample appear in ToolRL's files


def test_tool_spec_rejects_bad_tools():
    with pytest.raises(ValueError, match="name"):
        ToolSpec.from_raw({"description": "x"})
    with pytest.raises(ValueError, match="parameter 'a'"):
        ToolSpec.from_raw({"name": "f", "parameters": {"a": "not a dict"}})


def test_assistant_turn_layout():
    truth = format_assistant_turn(calls=[("f", {"a": 1}), ("g", {})])
    assert truth == (f"<think> {THINK_CALL} </think>\n<tool_call>\n"
                     '{"name": "f", "parameters": {"a": 1}}\n{"name": "g", "parameters": {}}\n</tool_call>')
    assert format_assistant_turn(response="hi") == f"<think> {THINK_RESPOND} </think>\n<response> hi </response>"
    assert_well_formed(truth)
    with pytest.raises(ValueError):
        format_assistant_turn()


# ----------------------------------------------------------------------------------------------------------------
# Readers and writers.
# ----------------------------------------------------------------------------------------------------------------

def test_parquet_round_trip_is_lossless(shared_dir, tmp_path):
    path = shared_dir / "data/toolrl/test.parquet"
    original = pq.read_table(path)
    examples = read_parquet(path)
    assert len(examples) == 80 and examples[3].index == 3 and examples[0].split == "test"
    assert examples[0].source == "rlla" and examples[0].prompt_messages[0]["role"] == "system"
    assert examples_to_table(examples).schema.equals(original.schema, check_metadata=False)
    out = write_parquet(examples, tmp_path / "copy.parquet")
    copy = pq.read_table(out)
    assert copy.equals(original.replace_schema_metadata(None))
    assert read_parquet(out) == examples


def test_foreign_extra_info_survives_round_trip(tmp_path):
    example = ToolRLExample([{"role": "user", "content": "hi"}], "<think> t </think>", 7, "x", split="train",
                            extra_info={"index": 7, "input": "other", "instruction": "", "output": "o",
                                        "split": "train", "note": "kept"})
    path = write_parquet([example], tmp_path / "x.parquet")
    assert read_parquet(path)[0].extra_info["note"] == "kept"


def test_sft_json_reader_and_writer(shared_dir, sft_rows, tmp_path):
    records = json.loads((shared_dir / "data/toolrl/rlla_sft.json").read_text())
    assert len(sft_rows) == 400
    first = sft_rows[0]
    assert first.prompt_messages == [{"role": "system", "content": records[0]["instruction"]},
                                     {"role": "user", "content": records[0]["input"]}]
    assert first.ground_truth == records[0]["output"]
    path = write_sft_json(sft_rows, tmp_path / "sft.json")
    assert json.loads(path.read_text()) == records
    # SFT JSON -> parquet -> examples keeps the content.
    back = read_examples(write_parquet(sft_rows, tmp_path / "sft.parquet"))
    assert [(b.prompt_messages, b.ground_truth) for b in back] == [(s.prompt_messages, s.ground_truth)
                                                                    for s in sft_rows]


def test_reader_errors_name_file_and_row(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "s", "input": "u", "output": "o"}, {"instruction": "s"}]))
    with pytest.raises(DataFileError, match=r"bad\.json: row 1 \(0-based\): 'input'"):
        read_json(bad)
    table = pa.table({"prompt": pa.array([[{"content": "c", "role": "user"}]])})
    pq.write_table(table, tmp_path / "nogt.parquet")
    with pytest.raises(DataFileError, match=r"nogt\.parquet: missing column\(s\) \['reward_model'\]"):
        read_parquet(tmp_path / "nogt.parquet")
    with pytest.raises(DataFileError, match="unknown data file type"):
        (tmp_path / "x.csv").write_text("a")
        read_examples(tmp_path / "x.csv")


# ----------------------------------------------------------------------------------------------------------------
# ToolACE.
# ----------------------------------------------------------------------------------------------------------------

def test_toolace_sample_every_row_converted_or_reported(toolace):
    path, examples, report = toolace
    records = json.loads(Path(path).read_text())
    assistant_steps = sum(t["from"] in ("gpt", "function_call") for r in records for t in r["conversations"])
    assert report.rows_read == {"toolace": 100}
    assert report.examples == {"toolace": len(examples)} and not report.skipped
    dropped = sum(int(re.search(r"dropped (\d+) remaining", i.reason).group(1)) for i in report.failed)
    assert len(examples) + dropped == assistant_steps == 478
    assert len(examples) == 465 and len(report.failed) == 3  # 2 empty replies, 1 empty function_call
    assert {i.row for i in report.failed} == {27, 30, 85}
    assert all(i.file == str(path) and i.source == "toolace" for i in report.failed)
    for example in examples:
        assert_well_formed(example.ground_truth)
        names = {t.name for t in parse_tool_blocks(example.system)}
        assert {c["name"] for c in gt_calls(example.ground_truth)} <= names
        assert example.user.startswith("**Dialogue Records History**\n<user> ")


def test_toolace_conversion_reproduces_toolrl_rows(toolace, toolrl_rows, sft_rows):
    """Where a sample conversation is also in ToolRL's files, the converted prompt (system and full dialogue
    history, with recovered names, stringified arguments, collapsed blank lines) is byte-identical."""
    _, examples, _ = toolace
    by_user = {}
    for row in [*toolrl_rows, *sft_rows]:
        by_user.setdefault(row.user, []).append(row)
    matched = 0
    for example in examples:
        for row in by_user.get(example.user, []):
            matched += 1
            assert example.system == row.system
            if row.source == "rlla":  # RL rows: placeholder-thought ground truths are comparable too
                assert example.ground_truth == row.ground_truth
    assert matched >= 6
    multi_turn = [e for e in examples if e.user in by_user and e.user.count("<obs>") >= 2]
    assert multi_turn


def _toolace_record(conversations, tools=None):
    tools = tools or [
        {"name": "Market Trends API", "description": "Trends.",
         "parameters": {"type": "dict", "properties": {"trend_type": {"description": "t", "type": "string"}},
                        "required": ["trend_type"]}},
        {"name": "Mobility API", "description": "Mobility.",
         "parameters": {"type": "dict", "properties": {"string": {"description": "d", "type": "string"}},
                        "required": []}}]
    return {"system": "Here is a list of functions in JSON format that you can invoke:\n" + json.dumps(tools)
            + ". \nShould you decide ...", "tools": "[]",
            "conversations": [{"from": f, "value": v} for f, v in conversations]}


def test_toolace_name_recovery_and_history():
    obs = '[{"name": "Market Trends API", "results": {"x": 1}}]'
    record = _toolace_record([
        ("human", "Trends please?"),
        ("function_call", '{"name": "API", "arguments": {"trend_type": "MARKET"}}'),
        ("observation", obs),
        ("gpt", "Here:\n\n- one\n\n\n- two"),
        ("human", "And mobility for 2024-01-01?"),
        ("function_call", '{"name": "API", "arguments": {"string": "2024-01-01"}}'),  # no obs: keys decide
    ])
    report = ConversionReport()
    examples = convert_toolace([record], path="mem.json", report=report)
    assert not report.failed and len(examples) == 3
    first, second, third = examples
    assert first.ground_truth == format_assistant_turn(calls=[("Market Trends API", {"trend_type": "MARKET"})])
    assert second.ground_truth == format_assistant_turn(response="Here:\n- one\n- two")
    assert second.user == ("**Dialogue Records History**\n<user> Trends please? </user>\n\n"
                           + first.ground_truth + f"\n<obs> {obs} </obs>")
    assert third.ground_truth == format_assistant_turn(calls=[("Mobility API", {"string": "2024-01-01"})])
    assert third.user.endswith(second.ground_truth + "\n\n<user> And mobility for 2024-01-01? </user>")


def test_toolace_string_values_option():
    record = _toolace_record([("human", "q"),
                              ("function_call", '{"name": "Mobility API", "arguments": {"string": 2025.0}}')])
    assert '"string": "2025.0"' in convert_toolace([record])[0].ground_truth
    assert '"string": 2025.0' in convert_toolace([record], string_values=False)[0].ground_truth


def test_toolace_bad_rows_are_reported_not_raised():
    records = [
        _toolace_record([("human", "q"), ("function_call", '{"name": "API", "arguments": {}}')]),  # ambiguous
        _toolace_record([("human", "q"), ("function_call", "not json")]),
        _toolace_record([("human", "q"), ("observation", "[]")]),
        {"system": "no tools here", "tools": "[]", "conversations": [{"from": "human", "value": "q"}]},
        "not an object",
        _toolace_record([("human", "q"), ("gpt", "fine"), ("human", "q2"),
                         ("function_call", '{"name": "Nope", "arguments": {}}'), ("observation", "[]"),
                         ("gpt", "after")]),
    ]
    report = ConversionReport()
    examples = convert_toolace(records, path="raw.json", report=report)
    assert [e.ground_truth for e in examples] == [format_assistant_turn(response="fine")]
    reasons = {i.row: i.reason for i in report.failed}
    assert set(reasons) == {0, 1, 2, 3, 4, 5}
    assert "ambiguous" in reasons[0] and "not valid JSON" in reasons[1] and "observation" in reasons[2]
    assert "no tool JSON list" in reasons[3] and "matches no listed tool" in reasons[5]
    assert "dropped 2 remaining" in reasons[5] and report.failed[-1].step == 1
    assert "raw.json: row 5 (0-based), step 1" in str(report.failed[-1])


# ----------------------------------------------------------------------------------------------------------------
# Hammer and xLAM.
# ----------------------------------------------------------------------------------------------------------------

def test_hammer_sample(shared_dir):
    path = shared_dir / "data/hammer_sample/masking_sft_data_example.json"
    records = json.loads(path.read_text())
    report = ConversionReport()
    examples = convert_file("hammer", path, report=report)
    assert report.rows_read == {"hammer": 10} and not report.failed
    assert len(examples) == 8 and [i.row for i in report.skipped] == [0, 9]  # the two '[]' outputs
    for example in examples:
        assert_well_formed(example.ground_truth)
    # Row 4: masked names, floats and booleans kept exactly as the source has them.
    row4 = examples[3]
    expected = json.loads(records[4]["output"].strip("`\n"))
    assert gt_calls(row4.ground_truth) == [
        {"name": c["name"], "parameters": c["arguments"]} for c in expected]
    assert row4.user == ("**Dialogue Records History**\n<user> Produce a 12-character password including "
                         "special characters. </user>")
    assert "1. Name: ichpzgodoYah\nDescription: Generates a random string" in row4.system
    with_response = convert_file("hammer", path, empty_calls="response")
    assert len(with_response) == 10
    assert with_response[0].ground_truth == format_assistant_turn(response=NO_TOOL_RESPONSE)


XLAM_TINY = [
    {"query": "What is the weather in Oslo and in Rome?",
     "tools": [{"name": "get_weather", "description": "Weather of a city.",
                "parameters": {"city": {"type": "str", "description": "City.", "required": True}}}],
     "answers": [{"name": "get_weather", "arguments": {"city": "Oslo"}},
                 {"name": "get_weather", "arguments": {"city": "Rome"}}]},
    {"query": "Add 2 and 3.",  # the xlam-60k release stores tools/answers as JSON strings
     "tools": json.dumps([{"name": "add", "description": "Adds.",
                           "parameters": {"a": {"type": "int", "description": "x", "default": 0},
                                          "b": {"type": "int", "description": "y"}}}]),
     "answers": json.dumps([{"name": "add", "arguments": {"a": 2, "b": 3}}])},
    {"query": "Call something else.", "tools": [{"name": "add", "description": "Adds.", "parameters": {}}],
     "answers": [{"name": "sub", "arguments": {}}]},
    {"query": "Broken", "tools": "[{", "answers": "[]"},
    {"tools": [], "answers": []},
    {"query": "No call needed.", "tools": [{"name": "add", "description": "Adds.", "parameters": {}}],
     "answers": []},
]


def test_xlam_tiny_sample(tmp_path):
    path = tmp_path / "xlam_tiny.json"
    path.write_text(json.dumps(XLAM_TINY))
    report = ConversionReport()
    examples = convert_file("xlam", path, report=report)
    assert len(examples) == 2 and report.rows_read == {"xlam": 6}
    assert {i.row for i in report.failed} == {2, 3, 4} and [i.row for i in report.skipped] == [5]
    weather, add = examples
    assert weather.system == render_system_prompt([ToolSpec("get_weather", "Weather of a city.", {
        "city": {"description": "City.", "type": "str", "default": ""}})])
    assert ('Parameters: {"city": {"description": "City.", "type": "str", "default": ""}}' in weather.system)
    assert weather.user == "**Dialogue Records History**\n<user> What is the weather in Oslo and in Rome? </user>"
    assert weather.ground_truth == (
        f"<think> {THINK_CALL} </think>\n<tool_call>\n"
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}\n'
        '{"name": "get_weather", "parameters": {"city": "Rome"}}\n</tool_call>')
    assert '"a": {"description": "x", "type": "int", "default": 0}' in add.system
    assert gt_calls(add.ground_truth) == [{"name": "add", "parameters": {"a": 2, "b": 3}}]
    assert len(convert_xlam(XLAM_TINY, empty_calls="response")) == 3
    with pytest.raises(ValueError, match="empty_calls"):
        convert_hammer([], empty_calls="maybe")


# ----------------------------------------------------------------------------------------------------------------
# Mix builder and CLI.
# ----------------------------------------------------------------------------------------------------------------

def _fake_pool(name: str, n: int) -> list[ToolRLExample]:
    return [ToolRLExample([{"role": "user", "content": f"{name} {i}"}], format_assistant_turn(response=str(i)), i,
                          name) for i in range(n)]


def test_build_mix_is_seeded_and_splits_last_fraction():
    pools = {"a": _fake_pool("a", 3000), "b": _fake_pool("b", 1500), "c": _fake_pool("c", 900)}
    config = MixConfig(counts={"a": 2000, "b": 1000})
    train, test = build_mix(pools, config)
    assert len(train) == 3822 and len(test) == 78  # 3900 rows, round(2%) = 78 for test
    assert [e.index for e in test] == list(range(78)) and {e.split for e in test} == {"test"}
    contents = [e.user for e in train + test]
    assert len(set(contents)) == len(contents)
    assert sum(e.source == "a" for e in train + test) == 2000
    again = build_mix(pools, config)
    assert (train, test) == again
    other = build_mix(pools, dataclasses.replace(config, seed=1))
    assert [e.user for e in other[1]] != [e.user for e in test]
    with pytest.raises(ValueError, match="unknown pool"):
        build_mix(pools, MixConfig(counts={"zzz": 1}))


def test_prepare_cli(shared_dir, tmp_path):
    xlam = tmp_path / "xlam.json"
    xlam.write_text(json.dumps(XLAM_TINY))
    out = tmp_path / "mix"
    cmd = [sys.executable, "-m", "data.prepare",
           f"--source=toolace:{shared_dir / 'data/toolace_sample/sharegpt_func_fixed.json'}",
           f"--source=hammer:{shared_dir / 'data/hammer_sample/masking_sft_data_example.json'}",
           f"--source=xlam:{xlam}", f"--source=toolrl:{shared_dir / 'data/toolrl/test.parquet'}",
           "--source=synthetic:20", "--count=toolace:100", "--test_fraction=0.1", f"--out={out}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    train, test = read_parquet(out / "train.parquet"), read_parquet(out / "test.parquet")
    total = 100 + 8 + 2 + 80 + 20
    assert len(train) + len(test) == total and len(test) == round(total * 0.1)
    assert pq.read_schema(out / "train.parquet").equals(PARQUET_SCHEMA, check_metadata=False)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["train"]["rows"] == len(train) and stats["test"]["rows"] == len(test)
    assert stats["train"]["rows_per_source"]["toolace"] + stats["test"]["rows_per_source"].get("toolace", 0) == 100
    assert stats["conversion"]["num_failed"] == 3 + 3 and stats["conversion"]["num_skipped"] == 2 + 1
    calls = {int(k): v for k, v in stats["train"]["tool_calls_per_example"].items()}
    assert sum(calls.values()) == len(train) and stats["train"]["no_call_examples"] == calls.get(0, 0)
    report = json.loads((out / "conversion_report.json").read_text())
    assert {(i["source"], i["row"]) for i in report["failed"]} >= {("toolace", 85), ("xlam", 2)}
    assert "failed:" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "data.prepare", "--source=nope:x", f"--out={out}"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "KIND:VALUE" in bad.stderr
