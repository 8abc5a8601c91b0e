"""Bamboogle: answer scoring, search backends and the multi-round search dialogue."""
from __future__ import annotations

import http.server
import json
import re
import threading

import pytest

from toolrl_jax.evaluation import bamboogle, prompts, search
from toolrl_jax.evaluation.generator import FunctionGenerator


def test_squad_normalisation_em_f1_and_default_judge():
    assert bamboogle.normalize_answer("The  James Madison!") == "james madison"
    assert bamboogle.exact_match("James Madison.", "james madison")
    assert bamboogle.f1_score("President James Madison", "james madison") == pytest.approx(0.8)
    assert bamboogle.f1_score("Madison", "james madison") == pytest.approx(2 / 3)
    assert bamboogle.f1_score("", "x") == 0.0 and bamboogle.f1_score("", "") == 1.0
    assert bamboogle.cover_exact_match("It was James Madison, in 1812", "James Madison")
    assert not bamboogle.cover_exact_match("Jameson", "James")
    judge = bamboogle.default_judge(0.5)
    assert judge("q", "James Madison", "james madison") and judge("q", "Madison", "james madison")
    assert not judge("q", "Thomas Jefferson", "james madison")
    assert not bamboogle.default_judge(0.7)("q", "Madison", "james madison")


def test_gold_answers_score_100_percent(shared_dir):
    items = bamboogle.load_bamboogle(shared_dir / "bench" / "bamboogle" / "data.json")
    assert len(items) == 125
    judge = bamboogle.default_judge()
    assert all(bamboogle.exact_match(i.answer, i.answer) and judge(i.question, i.answer, i.answer) for i in items)


@pytest.mark.parametrize("suffix, content", [
    (".jsonl", '{"title": "Citibank", "text": "Citibank was founded in 1812."}\n'
               '{"contents": "Madison was president in 1812."}\n"Paris is in France."\n'),
    (".json", json.dumps(["Citibank was founded in 1812.", {"text": "Madison was president in 1812."},
                          "Paris is in France."])),
    (".txt", "Citibank was founded in 1812.\n\nMadison was president in 1812.\nParis is in France.\n"),
])
def test_bm25_backend_over_local_corpora(tmp_path, suffix, content):
    path = tmp_path / f"corpus{suffix}"
    path.write_text(content, encoding="utf-8")
    backend = search.BM25Search.from_file(path)
    assert len(backend.documents) == 3
    top = backend.search("Who was president in 1812", 5)
    assert "Madison" in top[0] and len(top) <= 3
    assert backend.search("Who was president in 1812", 1) == [top[0]]
    assert "Citibank" in backend.search("citibank founded", 1)[0]
    assert backend.search("???", 5) == []


def test_bad_corpora_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        search.BM25Search.from_file(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"id": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: no text field"):
        search.load_corpus(bad)


def test_http_backend_needs_a_key():
    with pytest.raises(search.SearchKeyMissingError, match="needs an API key"):
        search.HttpSearch("https://search.example/api", api_key=None).search("x", 5)


def test_http_backend_reads_snippets_from_json():
    seen = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            seen["path"] = self.path
            body = json.dumps({"data": {"hits": [{"snippet": "one"}, "two", {"other": 1}, {"snippet": "three"}]}})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        backend = search.HttpSearch(f"http://127.0.0.1:{server.server_port}/s", api_key="k",
                                    results_field="data.hits")
        assert backend.search("who?", 2) == ["one", "two"]
        assert "q=who%3F" in seen["path"] and "api_key=k" in seen["path"] and "num=2" in seen["path"]
    finally:
        server.shutdown()
        server.server_close()


class _Recorder:
    def __init__(self, snippets):
        self.snippets, self.queries = snippets, []

    def search(self, query, k):
        self.queries.append((query, k))
        return self.snippets[:k]


def _data(tmp_path, rows):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(rows))
    return path


def _search_turn(*calls):
    return "<think>search</think>\n<tool_call>\n" + "\n".join(json.dumps(c) for c in calls) + "\n</tool_call>"


def test_dialogue_runs_first_call_only_and_answers_from_response(tmp_path):
    rows = [{"Question": "Who was president when Citibank was founded?", "Answer": "James Madison"}]
    backend = _Recorder([f"snippet {i}" for i in range(8)])

    def respond(messages):
        user = messages[1]["content"]
        if "<obs>" not in user:
            return _search_turn({"name": "Search", "parameters": {"query": "Citibank founded"}},
                                {"name": "Search", "parameters": {"query": "ignored"}})
        assert "[5] snippet 4" in user and "[6]" not in user  # top-5 snippets came back as <obs>
        return "<think>found</think>\n<response> James Madison </response>"

    summary = bamboogle.evaluate_bamboogle(FunctionGenerator(respond), _data(tmp_path, rows), tmp_path, backend,
                                           prompts.PromptSet.load())
    assert backend.queries == [("Citibank founded", 5)]
    assert summary["accuracy"] == 1.0 and summary["em"] == 1.0 and summary["avg_tool_calls"] == 1.0
    record = json.loads((tmp_path / "items" / "bamboogle.jsonl").read_text().splitlines()[0])
    assert record["prediction"] == "James Madison" and record["queries"] == ["Citibank founded"]


def test_dialogue_stops_after_max_rounds_and_reports_bad_calls(tmp_path):
    rows = [{"Question": "Q1?", "Answer": "Alpha"}, {"Question": "Q2?", "Answer": "Beta"}]
    backend = _Recorder(["s"])
    prompts_seen = []

    def respond(messages):
        prompts_seen.append(messages[1]["content"])
        if "Q2?" in messages[1]["content"]:
            return _search_turn({"name": "Lookup", "parameters": {"q": "x"}}) + "<response> Beta </response>"
        return _search_turn({"name": "Search", "parameters": {"query": "again"}})

    config = bamboogle.BamboogleConfig(max_rounds=3, batch_size=2)
    summary = bamboogle.evaluate_bamboogle(FunctionGenerator(respond), _data(tmp_path, rows), tmp_path, backend,
                                           prompts.PromptSet.load(), config)
    # Q1: three rounds, the third call is not executed; Q2: invalid tool -> error observation, then answers.
    assert len(backend.queries) == 2
    assert summary["avg_tool_calls"] == pytest.approx((2 + 2) / 2)
    assert any("only Search(query: string) is available" in p for p in prompts_seen)
    rows_out = [json.loads(line) for line in (tmp_path / "items" / "bamboogle.jsonl").read_text().splitlines()]
    assert rows_out[1]["prediction"] == "Beta" and rows_out[1]["correct"]
    assert not rows_out[0]["correct"]


def test_system_prompt_lists_the_search_tool():
    prompt_set = prompts.PromptSet.load()
    system = prompts.system_prompt(prompt_set.system, [prompt_set.bamboogle_tool])
    assert re.search(r"1\. Name: Search\nDescription: .+\nParameters: \{\"query\": ", system)


def test_bad_data_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="item 0: needs string 'Question' and 'Answer'"):
        bamboogle.load_bamboogle(_data(tmp_path, [{"Question": "q"}]))
