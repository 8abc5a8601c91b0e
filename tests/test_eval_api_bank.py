"""API-Bank scoring: gold answers in every written form, the ToolRL any-call rule and the strict rule."""
from __future__ import annotations

import json

import pytest

from toolrl_jax.evaluation import api_bank
from toolrl_jax.evaluation.api_bank import parse_gold, strict_correct, toolrl_correct

GOLD = ({"name": "ModifyRegistration", "parameters": {"appointment_id": "34567890", "new_date": "2023-03-26"}},)


def _turn(*calls, think="<think> ok </think>\n"):
    return think + "<tool_call>\n" + "\n".join(json.dumps(c) for c in calls) + "\n</tool_call>"


@pytest.mark.parametrize("written", [
    GOLD[0], [GOLD[0]], json.dumps(GOLD[0]), json.dumps([GOLD[0]]),
    "<tool_call>\n" + json.dumps(GOLD[0]) + "\n</tool_call>",
    {"name": GOLD[0]["name"], "arguments": GOLD[0]["parameters"]},
])
def test_gold_answers_parse_in_every_form(written):
    assert parse_gold(written, "test") == GOLD


@pytest.mark.parametrize("bad", [None, 3, "not a call", {"parameters": {}}, [], {"name": "x", "parameters": [1]}])
def test_bad_gold_answers_name_their_location(bad):
    with pytest.raises(ValueError, match="level-9 item 4"):
        parse_gold(bad, "level-9 item 4")


def test_toolrl_rule_any_call_equal_to_the_first_gold_call():
    other = {"name": "QueryHealthData", "parameters": {"user_id": "1"}}
    assert toolrl_correct(_turn(GOLD[0]), GOLD)
    assert toolrl_correct(_turn(other, GOLD[0]), GOLD)  # any predicted call may match
    assert not toolrl_correct(_turn({"name": GOLD[0]["name"], "parameters": {"appointment_id": "34567890"}}), GOLD)
    assert not toolrl_correct(_turn({"name": "modifyregistration", "parameters": GOLD[0]["parameters"]}), GOLD)
    wrong_type = {"name": GOLD[0]["name"], "parameters": {"appointment_id": 34567890, "new_date": "2023-03-26"}}
    assert not toolrl_correct(_turn(wrong_type), GOLD)
    # ToolRL's script: a bare parameters object counts as a call to the gold tool; no tag = read all lines.
    assert toolrl_correct(_turn(GOLD[0]["parameters"]), GOLD)
    assert toolrl_correct("Sure.\n" + json.dumps(GOLD[0]), GOLD)
    assert not toolrl_correct("<response> Done! </response>", GOLD)


def test_strict_rule_needs_exactly_the_gold_calls():
    other = {"name": "QueryHealthData", "parameters": {"user_id": "1"}}
    assert strict_correct(_turn(GOLD[0]), GOLD)
    assert not strict_correct(_turn(other, GOLD[0]), GOLD)
    assert not strict_correct(_turn(GOLD[0], GOLD[0]), GOLD)
    assert not strict_correct(_turn(GOLD[0]["parameters"]), GOLD)
    assert not strict_correct(json.dumps(GOLD[0]), GOLD)  # strict parsing needs the <tool_call> block
    assert strict_correct(_turn(GOLD[0], {"name": "None", "parameters": {}}), GOLD)


def test_summary_levels_and_overall():
    rows = [{"level": 1, "toolrl": True, "strict": True}, {"level": 1, "toolrl": False, "strict": False},
            {"level": 2, "toolrl": True, "strict": False}, {"level": 3, "toolrl": False, "strict": False}]
    summary = api_bank.summarize(rows)
    assert summary["toolrl"] == {"level1": 0.5, "level2": 1.0, "level3": 0.0, "overall": 0.5}
    assert summary["strict"]["overall"] == 0.25 and summary["counts"] == {"level1": 2, "level2": 1, "level3": 1}


def test_gold_answers_score_100_percent(shared_dir):
    items = api_bank.load_api_bank(shared_dir / "bench" / "api_bank")
    assert [sum(item.level == level for item in items) for level in api_bank.LEVELS] == [399, 67, 131]
    scored = [api_bank.score_item(item, _turn(*item.gold)) for item in items]
    summary = api_bank.summarize(scored)
    assert summary["toolrl"]["overall"] == 1.0 and summary["strict"]["overall"] == 1.0


def test_missing_level_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="level-1-api_processed.json"):
        api_bank.load_api_bank(tmp_path)
    (tmp_path / "level-1-api_processed.json").write_text(json.dumps([{"system": "s", "user": "u"}]))
    with pytest.raises(ValueError, match="item 0: needs"):
        api_bank.load_api_bank(tmp_path, levels=(1,))
