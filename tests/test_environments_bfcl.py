"""The BFCL training environment (toolrl_jax.environments.bfcl): task files, execution through the evaluator's
ApiSession, multi-user-turn progression, scoring with the official per-turn checks, and the contamination guard.
Skips what needs the optional bfcl-eval package when it is missing; runs in a few seconds."""
from __future__ import annotations

import json
import time

import pytest

from toolrl_jax.environments import ENVIRONMENT_NAMES, ToolCall, bfcl, check_spec, make_environment, write_tasks
from toolrl_jax.environments.synthetic import HERMES_SYSTEM
from toolrl_jax.evaluation.bfcl import data, multi_turn

AVAILABLE, WHY = multi_turn.api_classes_available()
needs_api = pytest.mark.skipif(not AVAILABLE, reason=WHY)

FS_TASK = {
    "id": "train_fs_0",
    "question": [[{"role": "user", "content": "Please tuck my notes.txt file away inside the docs folder."}],
                 [{"role": "user", "content": "Great, now open the moved notes file and read it back to me."}]],
    "initial_config": {"GorillaFileSystem": {"root": {"alice": {"type": "directory", "contents": {
        "notes.txt": {"type": "file", "content": "hello world"},
        "docs": {"type": "directory", "contents": {}}}}}}},
    "involved_classes": ["GorillaFileSystem"],
    "path": ["GorillaFileSystem.mv", "GorillaFileSystem.cd", "GorillaFileSystem.cat"],
    "ground_truth": [["mv(source='notes.txt', destination='docs')"],
                     ["cd(folder='docs')", "cat(file_name='notes.txt')"]],
}
MATH_TASK = {
    "id": "train_math_0",
    "question": [[{"role": "user", "content": "Sum 2.5 and 4 for the groceries line of my budget sheet."}]],
    "involved_classes": ["MathAPI"],
    "ground_truth": [["add(a=2.5, b=4)"]],
}
MV = ToolCall("mv", {"source": "notes.txt", "destination": "docs"})
CD, CAT = ToolCall("cd", {"folder": "docs"}), ToolCall("cat", {"file_name": "notes.txt"})


@pytest.fixture()
def task_file(tmp_path):
    return write_tasks([FS_TASK, MATH_TASK], tmp_path / "tasks.jsonl")


def _env(task=FS_TASK, **kwargs):
    env = bfcl.BfclEnvironment(**kwargs)
    return env, env.reset(task)


# ----------------------------------------------------------------------------------------------------------------
# Reset, execution, progression, scoring.
# ----------------------------------------------------------------------------------------------------------------

@needs_api
def test_load_and_reset_show_docs_and_the_first_user_turn(task_file):
    tasks = bfcl.load_tasks(task_file)
    assert [task["id"] for task in tasks] == ["train_fs_0", "train_math_0"]
    env, reset = _env(tasks[0])
    system, user = reset.messages
    assert reset.call_format == "toolrl" and system["role"] == "system" and user["role"] == "user"
    assert "Name: mv\n" in system["content"] and "Name: add\n" not in system["content"]
    assert "tuck my notes.txt" in user["content"] and "read it back" not in user["content"]
    assert {spec["name"] for spec in reset.tools} >= {"mv", "cd", "cat", "ls"}
    for spec in reset.tools:
        check_spec(spec)  # BFCL's "dict"/"float" types became JSON-schema ones
    assert "Name: add\n" in _env(tasks[1])[1].messages[0]["content"]


@needs_api
def test_correct_calls_change_state_progress_through_turns_and_succeed():
    env, _ = _env()
    step = env.step([MV])
    assert not step.done and not step.results[0].error and step.user_messages == ()
    assert "notes.txt" not in env.session.call("ls", [], {})  # moved out of the working directory (alice/)
    assert "notes.txt" in env.truth.call("ls", [], {})  # the ground truth runs only at the turn's end
    step = env.step([])
    assert not step.done and step.results == []
    (message,) = bfcl.next_user_messages(step)
    assert message["role"] == "user" and message["content"].startswith("<user> Great, now open")
    step = env.step([CD, CAT])
    assert "hello world" in step.results[1].content and not any(result.error for result in step.results)
    step = env.step([])
    assert step.done and bfcl.next_user_messages(step) == []
    outcome = env.score("Here it is.")
    assert outcome.success and outcome.reward == 1.0
    assert outcome.details["passed_turns"] == 2 and outcome.details["error_type"] == ""
    # The environment's verdict is the evaluator's on the same calls.
    turns = [[calls] for calls in outcome.details["calls"]]
    assert multi_turn.check_multi_turn(bfcl.task_item(FS_TASK), turns).valid
    assert env.score(None) is outcome and env.step([MV]).results[0].error  # scored: nothing runs any more


@needs_api
def test_math_task_checks_results_not_state():
    env, _ = _env(MATH_TASK)
    assert json.loads(env.step([ToolCall("add", {"a": 2.5, "b": 4})]).results[0].content) == {"result": 6.5}
    assert env.score(None).success
    env, _ = _env(MATH_TASK)
    env.step([ToolCall("add", {"a": 2.5, "b": 5})])
    outcome = env.score(None)
    assert not outcome.success and outcome.details["error_type"] == "response_mismatch"


@needs_api
def test_wrong_calls_fail_with_details():
    env, _ = _env()
    env.step([ToolCall("cp", {"source": "notes.txt", "destination": "docs"})])  # copied, not moved
    env.step([])
    env.step([CD, CAT])
    outcome = env.score(None)
    assert not outcome.success and outcome.reward == 0.0
    assert outcome.details["error_type"] == "state_mismatch" and "turn 0" in outcome.details["error"]
    assert outcome.details["per_turn"][0]["valid"] is False
    assert not multi_turn.check_multi_turn(bfcl.task_item(FS_TASK), [[c] for c in outcome.details["calls"]]).valid


@needs_api
def test_turns_reward_gives_partial_credit_and_an_empty_turn_fails():
    env, _ = _env(reward="turns")
    env.step([MV])
    env.step([])
    assert env.step([]).done  # answered the second turn without any call
    outcome = env.score(None)
    assert not outcome.success and outcome.reward == 0.5
    assert [turn["error_type"] for turn in outcome.details["per_turn"]] == ["", "empty_turn"]


@needs_api
def test_scoring_early_closes_the_open_turn_and_fails_unreached_turns():
    env, _ = _env(reward="turns")
    env.step([MV])
    outcome = env.score("done")  # e.g. a rollout that ends at the first answer
    assert not outcome.success and outcome.reward == 0.5 and outcome.details["turns_completed"] == 1
    assert outcome.details["error_type"] == "force_terminated"


@needs_api
def test_bad_calls_give_error_results_and_change_nothing():
    env, _ = _env()
    before = env.session.call("ls", [], {})
    calls = [ToolCall("no_such_tool", {}), ToolCall("exit", {}), ToolCall("os.remove", {"path": "notes.txt"}),
             ToolCall("cd", {"bogus": 1}), ToolCall("cd", ["docs"]), ToolCall("cd", {"folder": "missing"})]
    results = env.step(calls).results
    assert all(result.error for result in results)
    assert results[0].content == "Error during execution: name 'no_such_tool' is not defined"
    assert results[1].content == "Error during execution: Function call exit is not allowed."
    assert results[2].content == "Error during execution: Function call remove is not allowed."
    assert results[3].content.startswith("Error during execution:") and "bogus" in results[3].content
    assert "must be a JSON object" in results[4].content
    assert "error" in json.loads(results[5].content)  # the API's own error reply
    assert env.session.call("ls", [], {}) == before
    # Structured calls observe exactly what the evaluator's call strings do.
    assert env.session.call("exit", [], {}) == env.session.execute(["exit()"])[0]
    assert env.session.call("cd", [], {"bogus": 1}) == env.session.execute(["cd(bogus=1)"])[0]


@needs_api
def test_timeouts_and_step_limit_stop_the_trajectory():
    env, _ = _env(timeout_s=0.05, max_timeouts=1)
    env.session._methods["ls"] = lambda **_: time.sleep(0.5)
    step = env.step([ToolCall("ls", {})])
    assert step.done and step.results[0].error and "timed out" in step.results[0].content
    assert "not run" in env.step([MV]).results[0].content
    env, _ = _env(max_steps_per_turn=2)
    assert not env.step([MV]).done and not env.step([ToolCall("ls", {})]).done
    assert env.step([ToolCall("ls", {})]).done
    outcome = env.score(None)
    assert not outcome.success and outcome.details["error_type"] == "force_terminated"
    assert "tool-call steps" in outcome.details["error"]


@needs_api
def test_hermes_style_and_tasks_without_ground_truth():
    task = {key: value for key, value in FS_TASK.items() if key != "ground_truth"}
    env, reset = _env(task, prompt_style="hermes", max_result_chars=20)
    assert reset.call_format == "hermes" and reset.messages[0] == {"role": "system", "content": HERMES_SYSTEM}
    assert reset.messages[1] == FS_TASK["question"][0][0]
    assert len(env.step([ToolCall("ls", {"a": True})]).results[0].content) < 60  # cut for the model
    assert bfcl.next_user_messages(env.step([])) == FS_TASK["question"][1]
    outcome = env.score(None)
    assert not outcome.success and outcome.details["scored"] is False


@needs_api
def test_registry_builds_the_environment():
    assert "bfcl" in ENVIRONMENT_NAMES
    env = make_environment("bfcl", reward="turns", timeout_s=1.0)
    assert isinstance(env, bfcl.BfclEnvironment) and env.reward == "turns"
    with pytest.raises(ValueError, match="prompt_style"):
        make_environment("bfcl", prompt_style="xml")
    with pytest.raises(RuntimeError, match="reset"):
        env.step([])


@needs_api
def test_every_bundled_doc_is_a_valid_json_schema_spec():
    docs = bfcl.function_docs(list(data.MULTI_TURN_CLASSES))
    assert len(docs) > 100
    for doc in docs:
        check_spec(bfcl.json_schema_spec(doc))


# ----------------------------------------------------------------------------------------------------------------
# Task files.
# ----------------------------------------------------------------------------------------------------------------

def _without(key):
    return {k: v for k, v in FS_TASK.items() if k != key}


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not JSON"),
    (_without("question"), "missing fields"),
    ({**FS_TASK, "involved_classes": ["FileSystem"]}, "unknown API classes"),
    ({**FS_TASK, "ground_truth": [["mv(source=x)"], []]}, "not literals"),
    ({**FS_TASK, "ground_truth": [[]]}, "one per question turn"),
    ({**FS_TASK, "question": [[{"role": "user", "content": "hi"}], []]}, "question turn 1"),
    ({**FS_TASK, "missed_function": {"1": ["cat"]}}, "not supported"),
    (FS_TASK, "duplicate id"),
])
def test_loader_names_file_and_line(tmp_path, bad, message):
    path = tmp_path / "tasks.jsonl"
    bad_line = bad if isinstance(bad, str) else json.dumps(bad)
    path.write_text(json.dumps(FS_TASK) + "\n\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        bfcl.load_tasks(path, allow_contamination=True)
    assert str(error.value).startswith(f"{path}:3:")


def test_reset_refuses_a_malformed_task():
    with pytest.raises(ValueError, match="train_fs_0.*ground_truth"):
        bfcl.BfclEnvironment(allow_contamination=True).reset({**FS_TASK, "ground_truth": "ls()"})


# ----------------------------------------------------------------------------------------------------------------
# Contamination with the evaluation set.
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bfcl_v3(shared_dir):
    return shared_dir / "bench" / "bfcl_v3"


@pytest.fixture(scope="module")
def eval_task(bfcl_v3):
    """multi_turn_base_0 as a training task (its question entry plus its ground truth)."""
    entry = data.read_jsonl(bfcl_v3 / "BFCL_v3_multi_turn_base.json")[0]
    answer = data.read_jsonl(bfcl_v3 / "possible_answer" / "BFCL_v3_multi_turn_base.json")[0]
    return {**entry, "ground_truth": answer["ground_truth"]}


def test_a_copied_evaluation_task_is_refused_unless_allowed(tmp_path, bfcl_v3, eval_task):
    path = write_tasks([FS_TASK, eval_task], tmp_path / "tasks.jsonl")
    with pytest.raises(ValueError, match=r"multi_turn_base_0: its id .*allow_contamination=True"):
        bfcl.load_tasks(path, bfcl_dir=bfcl_v3)
    assert [task["id"] for task in bfcl.load_tasks(path, bfcl_dir=bfcl_v3, allow_contamination=True)] == \
        ["train_fs_0", "multi_turn_base_0"]
    renamed = {**eval_task, "id": "my_task_7"}
    assert bfcl.check_contamination([FS_TASK, MATH_TASK, renamed], bfcl_v3) == ["my_task_7"]
    one_turn = {**renamed, "question": [eval_task["question"][0]], "ground_truth": [[]]}
    assert "user message" in bfcl.contamination_reasons([one_turn], bfcl_v3)["my_task_7"]
    items = data.load_category(bfcl_v3, "multi_turn_miss_param", limit=3)
    assert bfcl.check_contamination([{"id": "x", "question": items[2].turns}], items) == ["x"]
    assert bfcl.check_contamination([FS_TASK, MATH_TASK], [bfcl_v3, *items]) == []


@needs_api
def test_environment_refuses_contamination_and_runs_the_gold_answer_when_allowed(bfcl_v3, eval_task):
    with pytest.raises(ValueError, match="multi_turn_base_0"):
        bfcl.BfclEnvironment(bfcl_dir=bfcl_v3).reset(eval_task)
    with pytest.raises(ValueError, match="multi_turn_base_0"):  # the bundled copy is checked by default
        bfcl.BfclEnvironment().reset(eval_task)
    env = bfcl.BfclEnvironment(bfcl_dir=bfcl_v3, allow_contamination=True)
    reset = env.reset(eval_task)
    assert "Name: mv\n" in reset.messages[0]["content"]
    for turn, calls in enumerate(eval_task["ground_truth"]):  # the gold calls through the structured path
        structured = []
        for text in calls:
            name, args, kwargs = multi_turn.parse_call(text)
            method = env.session._methods[name]
            structured.append(ToolCall(name, dict(zip(method.__code__.co_varnames[1:], args)) | kwargs))
        env.step(structured)
        step = env.step([])
        assert step.done == (turn == len(eval_task["ground_truth"]) - 1)
    assert env.score(None).success
