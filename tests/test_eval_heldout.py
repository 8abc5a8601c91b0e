"""Held-out tool-call sets: every accepted file layout, the training prompt, bad rows reported (not fatal), the
exact / name / parameter scores and the ToolRL reward, through the library and experiments.evaluate."""
from __future__ import annotations

import json

import pytest
from absl import app, flags
from absl.testing import flagsaver

from experiments import evaluate
from toolrl_jax.datasets import format as data_format
from toolrl_jax.datasets import sources
from toolrl_jax.datasets.io import write_parquet, write_sft_json
from toolrl_jax.evaluation import heldout
from toolrl_jax.evaluation.generator import FunctionGenerator
from toolrl_jax.rewards import score_response

FLAGS = flags.FLAGS

WEATHER_SCHEMA = {"name": "get_weather", "description": "Current weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "description": "City name."}}, "required": ["city"]}}
WEATHER_FLAT = {"name": "get_weather", "description": "Current weather of a city.",
                "parameters": {"city": {"type": "string", "description": "City name.", "required": True}}}
CONVERT_FLAT = {"name": "convert", "description": "Convert money.", "parameters": {
    "amount": {"type": "float", "description": "Amount.", "required": True},
    "to": {"type": "string", "description": "Target currency.", "default": "USD"}}}


@pytest.fixture(autouse=True)
def _parsed_flags():
    if not FLAGS.is_parsed():
        FLAGS.mark_as_parsed()


@pytest.fixture()
def files(tmp_path):
    """xLAM JSON (name/arguments, JSON-schema tools; a bad row), JSONL (tool/parameters, flat specs, JSON strings,
    a Hammer row, a no-call row, a non-object row) and a ToolRL parquet + SFT JSON."""
    xlam = tmp_path / "xlam.json"
    xlam.write_text(json.dumps([
        {"query": "Weather in Paris?", "tools": [WEATHER_SCHEMA, CONVERT_FLAT],
         "answers": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"query": "Weather in Rome and 3 EUR in USD?", "tools": [WEATHER_SCHEMA, CONVERT_FLAT],
         "answers": [{"name": "get_weather", "arguments": {"city": "Rome"}},
                     {"name": "convert", "arguments": {"amount": 3, "to": "USD"}}]},
        {"query": "Book a flight", "tools": [WEATHER_SCHEMA], "answers": [{"name": "book", "arguments": {}}]},
    ]))
    styled = tmp_path / "styled.jsonl"
    rows = [
        {"query": "Convert 5 to EUR", "tools": json.dumps([CONVERT_FLAT]),
         "answers": json.dumps([{"tool": "convert", "parameters": {"amount": 5, "to": "EUR"}}])},
        {"instruction": "[BEGIN OF AVAILABLE TOOLS]\n" + json.dumps([WEATHER_FLAT]) + "\n[END OF AVAILABLE TOOLS]\n"
                        "[BEGIN OF QUERY]\nWeather in Oslo?\n[END OF QUERY]", "input": "",
         "output": "```\n" + json.dumps([{"tool": "get_weather", "parameters": {"city": "Oslo"}}]) + "\n```"},
        {"query": "Tell me a joke", "tools": [WEATHER_FLAT], "answers": []},
        "not an object",
    ]
    styled.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    example = sources.convert_xlam([{"query": "Weather in Lima?", "tools": [WEATHER_FLAT],
                                     "answers": [{"name": "get_weather", "arguments": {"city": "Lima"}}]}])[0]
    parquet = write_parquet([example], tmp_path / "toolrl.parquet")
    sft = write_sft_json([example], tmp_path / "sft.json")
    return [str(xlam), str(styled), str(parquet), str(sft)]


def test_every_layout_loads_with_the_training_prompt_and_bad_rows_are_reported(files):
    items, bad = heldout.load_heldout(tuple(files))
    # Positions as toolrl_jax.datasets.records counts them: JSON-list and parquet rows from 0, JSONL lines from 1.
    assert [(item.file, item.row) for item in items] == [
        (files[0], 0), (files[0], 1), (files[1], 1), (files[1], 2), (files[1], 3), (files[2], 0), (files[3], 0)]
    assert [(issue.path, issue.row, issue.unit) for issue in bad] == [(files[0], 2, "row"), (files[1], 4, "line")]
    assert "'book', which is not in the tool list" in bad[0].reason and "expected an object" in bad[1].reason
    weather = data_format.ToolSpec.from_raw(WEATHER_SCHEMA)
    assert weather == data_format.ToolSpec.from_raw(WEATHER_FLAT)  # both spec styles render alike
    assert items[0].example.system == data_format.render_system_prompt(
        [weather, data_format.ToolSpec.from_raw(CONVERT_FLAT)])
    assert items[0].example.user == data_format.render_history([data_format.format_user("Weather in Paris?")])
    assert [item.gold for item in items] == [
        ({"name": "get_weather", "parameters": {"city": "Paris"}},),
        ({"name": "get_weather", "parameters": {"city": "Rome"}},
         {"name": "convert", "parameters": {"amount": 3, "to": "USD"}}),
        ({"name": "convert", "parameters": {"amount": 5, "to": "EUR"}},),
        ({"name": "get_weather", "parameters": {"city": "Oslo"}},),
        (),  # no call expected
        ({"name": "get_weather", "parameters": {"city": "Lima"}},),
        ({"name": "get_weather", "parameters": {"city": "Lima"}},)]
    assert heldout.load_heldout(tuple(files), limit=1)[0][1].file == files[1]


def _partly_right(messages):
    """The reference turn, except: Rome's second call is dropped and Oslo's city is wrong."""
    user = messages[1]["content"]
    if "Rome" in user:
        return data_format.format_assistant_turn(calls=[("get_weather", {"city": "Rome"})])
    if "Oslo" in user:
        return data_format.format_assistant_turn(calls=[("get_weather", {"city": "Bergen"})])
    if "joke" in user:
        return data_format.format_assistant_turn(response=sources.NO_TOOL_RESPONSE)
    if "Convert" in user:
        return data_format.format_assistant_turn(calls=[("convert", {"amount": 5, "to": "EUR"})])
    city = next(c for c in ("Paris", "Lima") if c in user)
    return data_format.format_assistant_turn(calls=[("get_weather", {"city": city})])


def test_scores_and_reward(files, tmp_path):
    generator = FunctionGenerator(_partly_right)
    config = heldout.HeldoutConfig(paths=tuple(files), batch_size=3)
    summary = heldout.evaluate_heldout(generator, config, tmp_path / "run")
    overall = summary["overall"]
    assert overall["items"] == 7 and overall["exact"] == pytest.approx(5 / 7)
    assert overall["name_accuracy"] == pytest.approx(6 / 7)  # 7 reference calls; convert (Rome) missed
    assert overall["parameter_accuracy"] == pytest.approx(5 / 7)  # ... and Oslo's city is wrong
    rows = [json.loads(line) for line in (tmp_path / "run" / "items" / "heldout.jsonl").read_text().splitlines()]
    items, _ = heldout.load_heldout(tuple(files))
    expected = [score_response(_partly_right(item.example.prompt_messages), item.example.ground_truth, 0)
                for item in items]
    assert [row["reward_total"] for row in rows] == [r.total for r in expected]
    assert overall["reward"]["accuracy"] == pytest.approx(5 / 7)
    assert summary["files"][files[0]]["items"] == 2 and summary["files"][files[1]]["exact"] == pytest.approx(2 / 3)
    assert [(b["file"], b["row"], b["unit"]) for b in summary["bad_rows"]] == [(files[0], 2, "row"),
                                                                              (files[1], 4, "line")]
    bad_file = tmp_path / "run" / "items" / "heldout_bad_rows.jsonl"
    assert [json.loads(line)["row"] for line in bad_file.read_text().splitlines()] == [2, 4]
    # Resuming: nothing is generated again.
    again = heldout.evaluate_heldout(FunctionGenerator(lambda m: pytest.fail("regenerated")), config, tmp_path / "run")
    assert again == summary
    assert generator.limits[0] == heldout.DEFAULT_LIMITS


def test_command_line(files, shared_dir, tmp_path):
    out = tmp_path / "cli"
    with flagsaver.flagsaver(bench_dir=str(shared_dir / "bench"), out=str(out), benchmarks=["heldout"],
                             heldout_data=files, max_new_tokens=64):
        generator = FunctionGenerator(_partly_right)
        summary = evaluate.run(generator)
    assert summary["heldout"]["overall"]["items"] == 7 and generator.limits[0].max_new_tokens == 64
    markdown = (out / "summary.md").read_text()
    assert "## Held-out tool sets" in markdown and f"{files[0]} row 2 (0-based): " in markdown
    assert f"{files[1]} line 4: " in markdown
    assert "2 row(s) not usable" in markdown
    for data, message in (([], "needs --heldout_data"), ([str(tmp_path / "x.csv")], "expected files ending in"),
                          ([str(tmp_path / "missing.json")], "missing.json")):
        with flagsaver.flagsaver(bench_dir=str(shared_dir / "bench"), out=str(out), benchmarks=["heldout"],
                                 heldout_data=data):
            with pytest.raises(app.UsageError, match=message):
                evaluate.run(FunctionGenerator(lambda m: ""))
