"""Bamboogle as the paper ran it (ToolRL benchmarks/Bamboogle/generate.py, utils.py): prompt bytes, the dialogue
rules, the Serper-format web search and the LLM judge against fake HTTP services on 127.0.0.1, retries, resuming,
and API keys that never reach a log or an output file."""
from __future__ import annotations

import contextlib
import http.server
import json
import logging
import threading
import time

import pytest
from absl import app, flags
from absl.testing import flagsaver

from experiments import evaluate
from toolrl_jax.datasets import format as data_format
from toolrl_jax.evaluation import bamboogle, prompts
from toolrl_jax.evaluation import bamboogle_toolrl as bt
from toolrl_jax.evaluation.generator import FunctionGenerator
from toolrl_jax.evaluation.http_json import HttpAuthError, HttpConfig, RetriesExhausted
from toolrl_jax.evaluation.judge import JudgeKeyMissingError, LlmJudge, parse_reply
from toolrl_jax.evaluation.records import RecordStore
from toolrl_jax.evaluation.search import SearchKeyMissingError, SerperSearch, format_serper

FLAGS = flags.FLAGS
SEARCH_KEY, JUDGE_KEY = "serper-secret-key-123", "sk-judge-secret-456"
FAST = HttpConfig(timeout_s=0.2, retries=3, backoff_s=0.01)


@pytest.fixture(autouse=True)
def _parsed_flags():
    if not FLAGS.is_parsed():
        FLAGS.mark_as_parsed()


# ------------------------------------------------------------------------------------------ fake services


class FakeService:
    """An HTTP server on 127.0.0.1 (port 0) in a thread. ``reply(body) -> (status, payload[, delay_s])``; a str
    payload is sent as is (malformed JSON), anything else as JSON. Records every request (header names lowercased)."""

    def __init__(self, reply):
        self.reply, self.requests = reply, []
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                headers = {name.lower(): value for name, value in self.headers.items()}
                service.requests.append({"path": self.path, "headers": headers, "body": body})
                status, payload, *delay = service.reply(body)
                if delay:
                    time.sleep(delay[0])
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out first

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def serving(reply):
    service = FakeService(reply)
    try:
        yield service
    finally:
        service.close()


def organic(*pairs):
    return {"organic": [{"title": title, "snippet": snippet} for title, snippet in pairs]}


def judge_reply(text):
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def fair_judge(body):
    """Yes when the predicted answer equals the ground truth, ignoring case."""
    user = body["messages"][1]["content"]
    gold = user.split("**Ground Truth Answer**\n")[1].split("\n\n")[0]
    predicted = user.split("**Predicted Answer**\n")[1].split("\n\nYour Response:")[0]
    verdict = "Yes" if gold.lower() == predicted.lower() else "No"
    return 200, judge_reply(f"- Thought: compared.\n- Judgment: {verdict}")


# ------------------------------------------------------------------------------------------- prompt bytes


def test_prompt_texts_are_the_originals_byte_for_byte():
    texts = bt.Texts.load(prompts.PromptSet.load())
    tool = ('1. Name: Search\nDescription: Search the answer for a specific query leveraging the google search engine\n'
            'Parameters: {"query": {"description": "The query to search for.", "type": "string", "default": ""}}')
    assert texts.system == data_format.SYSTEM_HEADER + tool + data_format.SYSTEM_FOOTER + "\n"
    assert texts.user.format(query="Q?") == ("Q?\nPerform tool call if you are not sure about the answer. Make a plan "
                                             "to solve the problem step by step.")
    assert texts.continue_nudge == ("Please continue to search if needed. If you can obtain the answer, please do not "
                                    "call any tool and directly provide a succinct answer in the response.")
    assert texts.final_nudge == ("Do not make tool call any more. Please directly provide a succinct answer in your "
                                 "next response.")
    assert texts.observation == "Search results for the first tool call query:\n{results}"
    judge = LlmJudge("k")
    system, user = judge.messages("Q?", "Gold", "Pred")
    assert system["content"] == (
        'You are a helpful assistant to help me judge if the answer for a specific query is correct or not. You will '
        'be given the query, the ground truth answer and the predicted answer. You should first think about if the '
        'predicted answer is semantically the same as the ground truth answer. If so give "Yes" in the field '
        '"Judgment", otherwise give "No".\n\n**Output Format**\nYour Response:\n- Thought: <Your brief thoughts>\n'
        '- Judgment: <Yes/No>\n')
    assert user["content"] == ("**Query**\nQ?\n\n**Ground Truth Answer**\nGold\n\n**Predicted Answer**\nPred\n\n"
                               "Your Response:\n")
    assert repr(judge) == "LlmJudge(model='gpt-4o', base_url='https://api.openai.com/v1')"


def test_user_prompt_flattens_the_history_like_form_user_prompt():
    history = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think> t </think>"},
               {"role": "obs", "content": "R"}, {"role": "user", "content": "N"}]
    assert bt.user_prompt(history) == ("**Dialogue Records History**\n<user> Q </user>\n\n<think> t </think>\n"
                                       "<obs> R </obs>\n\n<user> N </user>")


# ------------------------------------------------------------------------------------------- web search


def test_serper_results_are_formatted_as_search_serper():
    reply = {"answerBox": {"title": "Box", "answer": "42", "snippet": "ignored"},
             **organic(("A", "a."), ("B", "b."), ("C", "c."), ("D", "d."), ("E", "e."))}
    reply["organic"].insert(1, {"title": "no snippet"})
    assert format_serper(reply, 5) == ("1. Box\n- Answer: 42\n2. A\n- Snippet: a.\n3. B\n- Snippet: b.\n"
                                       "4. C\n- Snippet: c.\n5. D\n- Snippet: d.")
    assert format_serper({"answerBox": {"title": "Box", "snippet": "s"}, **organic(("A", "a."))}, 5) == \
        "1. Box\n- Snippet: s\n2. A\n- Snippet: a."
    assert format_serper({"answerBox": {"answer": "no title"}, **organic(("A", "a. "))}, 1) == "1. A\n- Snippet: a."
    assert format_serper({"answerBox": {"title": "Box", "answer": "x"}, **organic(("A", "a."))}, 1) == \
        "1. Box\n- Answer: x"
    assert format_serper({"organic": ["title snippet"]}, 5).startswith("Search Error: ")


def test_serper_request_retries_and_empty_results():
    replies = iter([(429, {}), (500, {}), (200, "not json"), (200, {"no": "organic"}), (200, organic(("T", "s")))])
    with serving(lambda body: next(replies)) as service:
        search = SerperSearch(SEARCH_KEY, f"{service.url}/search", HttpConfig(timeout_s=0.3, retries=4,
                                                                              backoff_s=0.01))
        assert search.search_text("who?", 5) == "1. T\n- Snippet: s"
    assert len(service.requests) == 5
    first = service.requests[0]
    assert first["path"] == "/search" and first["body"] == {"q": "who?", "num": 15}
    assert first["headers"]["x-api-key"] == SEARCH_KEY
    assert repr(search) == f"SerperSearch(endpoint='{service.url}/search')"

    with serving(lambda body: (200, {"organic": []})) as service:  # six empty answers -> the original's text
        search = SerperSearch(SEARCH_KEY, service.url, FAST, empty_retry_delay_s=0.0)
        assert search.search_text("q", 5) == "Search Error: Timeout"
    assert len(service.requests) == 6

    slow = iter([(200, organic(("late", "x")), 0.4), (200, organic(("T", "s")))])
    with serving(lambda body: next(slow)) as service:  # a timeout is retried
        assert SerperSearch(SEARCH_KEY, service.url, FAST).search_text("q", 5) == "1. T\n- Snippet: s"


def test_serper_failures_are_clear_errors_without_the_key():
    with pytest.raises(SearchKeyMissingError, match="needs an API key"):
        SerperSearch(None)
    with serving(lambda body: (401, {"message": f"Unauthorized key {SEARCH_KEY}"})) as service:
        with pytest.raises(HttpAuthError, match="401") as error:
            SerperSearch(SEARCH_KEY, service.url, FAST).search_text("q", 5)
    assert SEARCH_KEY not in str(error.value) and "***" in str(error.value)
    with serving(lambda body: (503, {})) as service:
        with pytest.raises(RetriesExhausted, match="4 attempts"):
            SerperSearch(SEARCH_KEY, service.url, FAST).search_text("q", 5)


# ------------------------------------------------------------------------------------------------- judge


def test_judge_reply_rules():
    assert parse_reply("- Thought: same.\n- Judgment: Yes").correct
    assert not parse_reply("- Thought: differs.\n- Judgment: No").correct
    assert not parse_reply("- Thought: t\n- Judgment: Yes.").correct  # the original compares with "Yes" exactly
    with pytest.raises(ValueError, match="Judgment"):
        parse_reply("Yes")


def test_judge_requests_retries_and_failures():
    replies = iter([(500, {}), (200, "{broken"), (200, judge_reply("Yes!")), (200, {"choices": []}),
                    (200, judge_reply("  - Thought: ok\n- Judgment: Yes  "))])
    with serving(lambda body: next(replies)) as service:
        judge = LlmJudge(JUDGE_KEY, service.url + "/v1/", "judge-model", HttpConfig(0.3, 4, 0.01))
        judgment = judge.judge("Q?", "Gold", "Pred")
    assert (judgment.status, judgment.correct, judgment.thought) == ("ok", True, "ok")
    request = service.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["authorization"] == f"Bearer {JUDGE_KEY}"
    assert request["body"]["model"] == "judge-model" and request["body"]["temperature"] == 0
    assert request["body"]["messages"] == judge.messages("Q?", "Gold", "Pred")

    with serving(lambda body: (200, judge_reply("no marks at all"))) as service:
        failed = LlmJudge(JUDGE_KEY, service.url, http=FAST).judge("Q?", "Gold", "Pred")
    assert failed.status == "failed" and not failed.correct and "4 attempts" in failed.error
    with serving(lambda body: (200, judge_reply("- Thought: t\n- Judgment: Yes"), 0.4)) as service:
        assert LlmJudge(JUDGE_KEY, service.url, http=FAST).judge("Q", "G", "P").status == "failed"  # timeouts
    with serving(lambda body: (403, {"error": "bad key"})) as service:
        with pytest.raises(HttpAuthError):
            LlmJudge(JUDGE_KEY, service.url, http=FAST).judge("Q", "G", "P")
    with pytest.raises(JudgeKeyMissingError):
        LlmJudge("")


# ---------------------------------------------------------------------------------------------- dialogue


class RecordingSearch:
    def __init__(self):
        self.queries = []

    def search_text(self, query, k):
        self.queries.append((query, k))
        return f" results for {query} \n"


class YesJudge:
    model, base_url = "gpt-4o", "fake"

    def __init__(self):
        self.calls = []

    def judge(self, question, gold, prediction):
        self.calls.append(prediction)
        return parse_reply(f"- Thought: t\n- Judgment: {'Yes' if prediction == gold else 'No'}")


def _data(tmp_path, *rows):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"Question": q, "Answer": a} for q, a in rows]))
    return path


def _call(query, extra=""):
    return f'<think> plan </think>\n<tool_call>\n{{"name": "Search", "parameters": {{"query": "{query}"}}}}{extra}\n' \
           '</tool_call>'


def _run(tmp_path, respond, *rows, search=None, judge=None, **config):
    generator = FunctionGenerator(respond)
    summary = bt.evaluate_bamboogle_toolrl(generator, _data(tmp_path, *rows), tmp_path, search or RecordingSearch(),
                                           judge or YesJudge(), prompts.PromptSet.load(),
                                           bamboogle.BamboogleConfig(**config))
    items = [json.loads(line) for line in (tmp_path / "items" / "bamboogle.jsonl").read_text().splitlines()]
    return generator, summary, items


def test_search_then_answer_builds_the_original_history(tmp_path):
    def respond(messages):
        if "<obs>" not in messages[1]["content"]:
            return "  " + _call("citibank founded", '\n{"name": "Search", "parameters": {"query": "ignored"}}') + "\n"
        return "<think> found </think>\n<response> james madison </response>"

    search = RecordingSearch()
    generator, summary, items = _run(tmp_path, respond, ("Who was president?", "james madison"), search=search)
    assert search.queries == [("citibank founded", 5)]
    texts = bt.Texts.load(prompts.PromptSet.load())
    assert items[0]["history"] == [
        {"role": "user", "content": texts.user.format(query="Who was president?")},
        {"role": "assistant",
         "content": "<think> plan </think>\n<tool_call>\n"
                    "{'name': 'Search', 'parameters': {'query': 'citibank founded'}}\n</tool_call>"},
        {"role": "obs", "content": "Search results for the first tool call query:\nresults for citibank founded"},
        {"role": "user", "content": texts.continue_nudge},
        {"role": "assistant", "content": "<think> found </think>\n<response> james madison </response>"}]
    assert generator.seen[1] == [{"role": "system", "content": texts.system},
                                 {"role": "user", "content": bt.user_prompt(items[0]["history"][:4])}]
    assert summary["accuracy"] == 1.0 and summary["avg_tool_calls"] == 1.0 and items[0]["score"] == 1
    assert summary["comparable_to_paper"]  # the paper's settings (all questions, 4 rounds, gpt-4o)


def test_round_rules_nudges_round_limit_and_parse_failures(tmp_path):
    """Q1 calls every round: rounds 1-2 get the continue nudge, 3-4 the final one, the round-4 call is executed and
    the answer is the round-limit text (0, not judged). Q2's first call does not parse (JSON true is not a Python
    literal): the history stays, the next round repeats the prompt, then it answers without tags."""
    prompts_seen = {"Q1": [], "Q2": []}

    def respond(messages):
        user = messages[1]["content"]
        question = "Q1" if "Q1" in user else "Q2"
        prompts_seen[question].append(user)
        if question == "Q1":
            return _call(f"q{len(prompts_seen['Q1'])}") + "\n<response> guess </response>"  # call wins over response
        if len(prompts_seen["Q2"]) == 1:
            return '<tool_call>\n{"name": "Search", "parameters": {"query": "x", "flag": true}}\n</tool_call>'
        return "<think> I know </think> beta"

    judge = YesJudge()
    _, summary, items = _run(tmp_path, respond, ("Q1", "alpha"), ("Q2", "beta"), judge=judge, batch_size=2)
    q1, q2 = items
    assert q1["prediction"] == bt.ROUND_LIMIT_ANSWER and q1["judge_status"] == "not_judged" and q1["score"] == 0
    assert q1["queries"] == ["q1", "q2", "q3", "q4"] and q1["tool_calls"] == 4
    nudges = [entry["content"] for entry in q1["history"] if entry["role"] == "user"][1:]
    texts = bt.Texts.load(prompts.PromptSet.load())
    assert nudges == [texts.continue_nudge, texts.continue_nudge, texts.final_nudge, texts.final_nudge]
    assert prompts_seen["Q2"][0] == prompts_seen["Q2"][1] and len(q2["outputs"]) == 2
    assert q2["prediction"] == "beta" and q2["score"] == 1 and q2["tool_calls"] == 0
    assert judge.calls == ["beta"]
    assert summary["avg_tool_calls"] == 2.0 and summary["not_judged"] == 1 and summary["accuracy"] == 0.5


def test_empty_answers_are_not_judged_and_answers_after_think(tmp_path):
    answers = {"Q1": "<think> hmm </think>", "Q2": "no tags at all"}
    judge = YesJudge()
    _, summary, items = _run(tmp_path, lambda m: answers["Q1" if "Q1" in m[1]["content"] else "Q2"],
                             ("Q1", "a"), ("Q2", "no tags at all"), judge=judge)
    assert [row["prediction"] for row in items] == ["", "no tags at all"]
    assert [row["judge_status"] for row in items] == ["not_judged", "ok"] and judge.calls == ["no tags at all"]


# ----------------------------------------------------------------------- end to end through the command line


QUESTIONS = 3


def _oracle(bench_dir):
    gold = {item.question: item.answer for item in bamboogle.load_bamboogle(bench_dir / "bamboogle" / "data.json",
                                                                          QUESTIONS)}

    def respond(messages):
        user = messages[1]["content"]
        question = user.split("<user> ", 1)[1].split("\n", 1)[0]
        if "<obs>" not in user:
            return _call(question.replace('"', "'"))
        return f"<think> found </think>\n<response> {gold[question]} </response>"
    return respond


def _search_service():
    return serving(lambda body: (200, organic(("Result", f"About {body['q']}"))))


def _cli_flags(shared_dir, out, search_url, judge_url, **extra):
    values = dict(bench_dir=str(shared_dir / "bench"), out=str(out), benchmarks=["bamboogle"], limit=QUESTIONS,
                  batch_size=2, search_endpoint=search_url, search_api_key=SEARCH_KEY, judge_base_url=judge_url,
                  judge_api_key=JUDGE_KEY, request_timeout_s=0.5, request_retries=2, request_backoff_s=0.01)
    values.update(extra)
    return flagsaver.flagsaver(**values)


def _no_key_anywhere(out, caplog):
    for path in out.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert SEARCH_KEY not in text and JUDGE_KEY not in text, path
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert SEARCH_KEY not in logged and JUDGE_KEY not in logged


def test_cli_runs_the_paper_protocol_resumes_and_never_writes_keys(shared_dir, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    flaky = {"left": 3}  # the third question's judge keeps failing during the first run

    def judge(body):
        if "Sound of Music" in body["messages"][1]["content"] and flaky["left"] > 0:
            flaky["left"] -= 1
            return 500, {"error": f"overloaded {JUDGE_KEY}"}
        return fair_judge(body)

    with _search_service() as search_service, serving(judge) as judge_service:
        with _cli_flags(shared_dir, out, search_service.url, judge_service.url):
            summary = evaluate.run(FunctionGenerator(_oracle(shared_dir / "bench")))
        bamboo = summary["bamboogle"]
        assert (bamboo["protocol"], bamboo["total"], bamboo["correct"], bamboo["judge_failed"]) == ("toolrl", 3, 2, 1)
        assert bamboo["avg_tool_calls"] == 1.0 and not bamboo["comparable_to_paper"]  # --limit
        markdown = (out / "summary.md").read_text()
        assert "## Bamboogle (the paper's protocol)" in markdown and "1 judgment(s) failed" in markdown
        assert "not comparable to its numbers" in markdown
        assert len(search_service.requests) == QUESTIONS and len(judge_service.requests) == 2 + 3

        # The rerun generates nothing, re-uses the two judgments and retries only the failed one.
        def refuse(messages):
            raise AssertionError("nothing should be generated again")

        with _cli_flags(shared_dir, out, search_service.url, judge_service.url):
            again = evaluate.run(FunctionGenerator(refuse))["bamboogle"]
        assert (again["correct"], again["judge_failed"], again["accuracy"]) == (3, 0, 1.0)
        assert len(judge_service.requests) == 2 + 3 + 1 and len(search_service.requests) == QUESTIONS
    judgments = RecordStore(out / "judgments" / "bamboogle.jsonl")
    assert judgments.get("bamboogle_2")["raw"] == "- Thought: compared.\n- Judgment: Yes"
    _no_key_anywhere(out, caplog)


def test_cli_refused_keys_and_failing_search_stop_without_losing_work(shared_dir, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run"
    oracle = _oracle(shared_dir / "bench")
    with _search_service() as search_service, serving(lambda body: (401, {"error": "bad key"})) as bad_judge:
        with _cli_flags(shared_dir, out, search_service.url, bad_judge.url):
            with pytest.raises(HttpAuthError, match="401"):
                evaluate.run(FunctionGenerator(oracle))
    assert len(RecordStore(out / "generations" / "bamboogle_toolrl.jsonl")) == QUESTIONS  # generations kept

    answered = iter([(200, organic(("R", "x")))] + [(500, {})] * 10)
    with serving(lambda body: next(answered)) as failing_search, serving(fair_judge) as judge_service:
        with _cli_flags(shared_dir, tmp_path / "run2", failing_search.url, judge_service.url, batch_size=1):
            with pytest.raises(RetriesExhausted):
                evaluate.run(FunctionGenerator(oracle))
        assert len(RecordStore(tmp_path / "run2" / "generations" / "bamboogle_toolrl.jsonl")) == 1
        with _search_service() as search_service:  # the rerun continues with the unfinished questions
            generator = FunctionGenerator(oracle)
            with _cli_flags(shared_dir, tmp_path / "run2", search_service.url, judge_service.url, batch_size=1):
                assert evaluate.run(generator)["bamboogle"]["accuracy"] == 1.0
            assert len(generator.seen) == 2 * (QUESTIONS - 1)
        with _search_service() as search_service:  # and the first run's generations are judged on a rerun
            with _cli_flags(shared_dir, out, search_service.url, judge_service.url):
                assert evaluate.run(FunctionGenerator(lambda m: pytest.fail("regenerated")))["bamboogle"][
                    "accuracy"] == 1.0
    _no_key_anywhere(out, caplog)
    _no_key_anywhere(tmp_path / "run2", caplog)


def test_cli_without_keys_skips_bamboogle_with_a_notice(shared_dir, tmp_path, caplog):
    out = tmp_path / "run"
    with _cli_flags(shared_dir, out, None, "http://unused", search_api_key=None, judge_api_key=None,
                    benchmarks=["api_bank", "bamboogle"], limit=1):
        summary = evaluate.run(FunctionGenerator(lambda messages: "<response> no </response>"))
    assert "--search_api_key and --judge_api_key" in summary["bamboogle"]["skipped"]
    assert json.loads((out / "summary.json").read_text())["bamboogle"]["skipped"] == summary["bamboogle"]["skipped"]
    assert "Bamboogle skipped: the paper's protocol needs" in (out / "summary.md").read_text()
    assert any("Bamboogle skipped" in record.getMessage() for record in caplog.records)
    for missing, present in (("--judge_api_key", dict(judge_api_key=None)),
                             ("--search_api_key", dict(search_api_key=None))):
        with _cli_flags(shared_dir, out, None, "http://unused", **present):
            with pytest.raises(app.UsageError, match=f"{missing} is missing"):
                evaluate.run(FunctionGenerator(lambda messages: ""))
