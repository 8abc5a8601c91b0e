"""BFCL multi-turn: execution-based scoring on hand-written cases and the gold answers, and the clean skip
when the optional bfcl-eval package (which ships the API classes) is missing."""
from __future__ import annotations

import pytest

from toolrl_jax.evaluation import prompts
from toolrl_jax.evaluation.bfcl import categories, data, multi_turn, runner
from toolrl_jax.evaluation.generator import FunctionGenerator

AVAILABLE, WHY = multi_turn.api_classes_available()
needs_api = pytest.mark.skipif(not AVAILABLE, reason=WHY)

FILES = {"GorillaFileSystem": {"root": {"alice": {"type": "directory", "contents": {
    "notes.txt": {"type": "file", "content": "hello world"},
    "docs": {"type": "directory", "contents": {}}}}}}}


def _item(answer, category="multi_turn_base", turns=None):
    return data.BfclItem(id=f"{category}_t", category=category, turns=turns or [[] for _ in answer], functions=[],
                         answer=answer, initial_config=FILES, involved_classes=["GorillaFileSystem"])


def test_parse_call_accepts_literals_only():
    assert multi_turn.parse_call("mv(source='a', destination='b')") == ("mv", [], {"source": "a", "destination": "b"})
    assert multi_turn.parse_call("sort('f.txt')") == ("sort", ["f.txt"], {})
    for bad in ["mv(source=x)", "a.b()", "mv(", "1 + 2", "f(**kw)"]:
        with pytest.raises(ValueError):
            multi_turn.parse_call(bad)


@needs_api
def test_gold_turns_pass_and_wrong_turns_fail():
    answer = [["mkdir(dir_name='tmp')", "mv(source='notes.txt', destination='tmp')"], ["cat(file_name='notes.txt')"]]
    item = _item(answer)
    ok = lambda turns: multi_turn.check_multi_turn(item, turns).valid  # noqa: E731
    assert ok([[answer[0]], [answer[1]]])
    assert ok([[[answer[0][0]], [answer[0][1]]], [answer[1]]])  # split into steps
    assert ok([[["ls()"], answer[0]], [answer[1]]])  # harmless extra call
    assert not ok([[[answer[0][0]]], [answer[1]]])  # file not moved: state differs
    assert not ok([[["mkdir(dir_name='temp')", "mv(source='notes.txt', destination='temp')"]], [answer[1]]])
    assert not ok([[answer[0]], []])  # nothing in the second turn
    assert not ok([[answer[0]]])  # forced to quit after the first turn
    # The cat result must appear among the model's results even though the state is unchanged by it.
    assert not ok([[answer[0]], [["ls()"]]])
    result = multi_turn.check_multi_turn(item, [[answer[0]], [["ls()"]]])
    assert result.error_type == "response_mismatch"


@needs_api
def test_turns_without_ground_truth_are_not_scored_but_their_calls_still_run():
    answer = [["mkdir(dir_name='tmp')"], [], ["mv(source='notes.txt', destination='tmp')"]]
    item = _item(answer, category="multi_turn_miss_func")
    assert multi_turn.check_multi_turn(item, [[answer[0]], [], [answer[2]]]).valid
    # A call made in the unscored turn changes the state the next turn is compared on.
    assert not multi_turn.check_multi_turn(item, [[answer[0]], [["rm(file_name='notes.txt')"]], [answer[2]]]).valid


@needs_api
def test_execution_errors_are_observations():
    session = multi_turn.ApiSession(_item([["ls()"]]))
    assert session.execute(["no_such(a=1)"]) == ["Error during execution: name 'no_such' is not defined"]
    assert session.execute(["rm(bad_arg=1)"])[0].startswith("Error during execution:")
    assert session.execute(["exit()"]) == ["Error during execution: Function call exit is not allowed."]
    assert "notes.txt" in session.execute(["ls()"])[0]


@needs_api
@pytest.mark.parametrize("category", categories.MULTI_TURN)
def test_gold_answers_score_100_percent(shared_dir, category):
    items = data.load_category(shared_dir / "bench" / "bfcl_v3", category)
    failures = [item.id for item in items
                if not multi_turn.check_multi_turn(item, [[calls] for calls in item.answer]).valid]
    assert not failures


@needs_api
def test_missed_functions_are_held_out_then_announced(shared_dir):
    item = data.load_category(shared_dir / "bench" / "bfcl_v3", "multi_turn_miss_func", limit=1)[0]
    (turn, held_out), = item.missed_functions.items()
    assert held_out and not {doc["name"] for doc in held_out} & {doc["name"] for doc in item.functions}
    prompt_set = prompts.PromptSet.load()
    conversation = multi_turn.Conversation.start(item, prompt_set.bfcl_missed_function)
    for _ in range(turn):
        conversation.record_step("<response>ok</response>", [], prompt_set.bfcl_missed_function)
    assert conversation.turn == turn
    announcement = conversation.messages[-1]["content"]
    assert held_out[0]["name"] in announcement and announcement.endswith("What about now?")


@needs_api
def test_conversation_quits_after_the_step_limit():
    item = _item([["ls()"], ["ls()"]], turns=[[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]])
    conversation = multi_turn.Conversation.start(item, "{functions}")
    for _ in range(4):
        conversation.record_step("<tool_call>...", ["ls()"], "{functions}", max_steps=3)
    assert conversation.finished and conversation.force_quit and len(conversation.raw_turns) == 1


def test_multi_turn_categories_are_skipped_cleanly_without_bfcl_eval(monkeypatch, tmp_path, shared_dir):
    monkeypatch.setattr(multi_turn, "API_PACKAGE", "no_such_package_for_bfcl_api_classes")
    available, why = multi_turn.api_classes_available()
    assert not available and "pip install --no-deps bfcl-eval" in why
    generator = FunctionGenerator(lambda messages: "<response>no</response>")
    config = runner.BfclConfig(bfcl_dir=str(shared_dir / "bench" / "bfcl_v3"),
                               categories=("multi_turn", "irrelevance"), limit=2, batch_size=2)
    result = runner.evaluate_bfcl(generator, config, tmp_path, prompts.PromptSet.load())
    assert set(result["skipped"]) == set(categories.MULTI_TURN)
    assert result["categories"]["irrelevance"]["accuracy"] == 1.0
    assert result["groups"]["multi_turn"] is None
