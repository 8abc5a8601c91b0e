"""End to end through experiments/evaluate.py with a fake generator that answers like an oracle.

The oracle reads each prompt the pipeline builds and returns the gold answer in ToolRL format (for
multi-turn: the gold calls of the current turn, then a plain response), so every benchmark must score 100%.
This checks prompt building, batching, the multi-turn and search loops, scoring, result files, the report
and resuming. A test with a real (tiny) model through the JAX sampler is in test_eval_sampler.py.
"""
from __future__ import annotations

import ast
import json
import re

import pytest
from absl import app, flags
from absl.testing import flagsaver

from experiments import evaluate
from toolrl_jax.evaluation import api_bank, bamboogle, prompts
from toolrl_jax.evaluation.bfcl import categories, data, multi_turn, oracle, runner
from toolrl_jax.evaluation.generator import FunctionGenerator

LIMIT = 2
FLAGS = flags.FLAGS


@pytest.fixture(autouse=True)
def _parsed_flags():
    if not FLAGS.is_parsed():
        FLAGS.mark_as_parsed()


def _call_turn(*calls):
    return "<think> oracle </think>\n<tool_call>\n" + "\n".join(json.dumps(c) for c in calls) + "\n</tool_call>"


class Oracle:
    """Maps every prompt the pipeline can build (with LIMIT items per part) to the gold reply."""

    def __init__(self, bench_dir, corpus_answers):
        prompt_set = prompts.PromptSet.load()
        hints = data.load_language_hints()
        self.multi_style = prompt_set.bfcl_multi_turn
        self.replies: dict[tuple[str, str], str] = {}
        self.multi_turn: list[tuple[str, list[str], list[str]]] = []  # (system, user turn texts, replies)
        for category in categories.ALL_CATEGORIES:
            for item in data.load_category(bench_dir / "bfcl_v3", category, LIMIT):
                system = prompt_set.system_prompt(data.prompt_functions(item.functions, category, hints))
                if categories.is_multi_turn(category):
                    docs = item.functions + [doc for docs in item.missed_functions.values() for doc in docs]
                    texts = [prompt_set.bfcl_missed_function.replace("{functions}", str(item.missed_functions[i]))
                             if i in item.missed_functions else turn[0]["content"].strip()
                             for i, turn in enumerate(item.turns)]
                    self.multi_turn.append((system, texts, oracle.oracle_multi_turn_steps(item.answer, docs)))
                else:
                    messages = runner.single_turn_prompt(item, prompt_set, hints)
                    self.replies[(messages[0]["content"], messages[1]["content"])] = oracle.oracle_output(
                        category, item.functions, item.answer)
        for item in api_bank.load_api_bank(bench_dir / "api_bank", limit=LIMIT):
            self.replies[(item.system, item.user)] = _call_turn(*item.gold)
        self.bamboogle = {item.question: item.answer
                          for item in bamboogle.load_bamboogle(bench_dir / "bamboogle" / "data.json", LIMIT)}
        self.corpus_answers = corpus_answers

    def __call__(self, messages):
        system, user = messages[0]["content"], messages[1]["content"]
        if (system, user) in self.replies:
            return self.replies[(system, user)]
        if "Name: Search\n" in system:
            question = user.split("<user> ", 1)[1].split("\n", 1)[0]
            if "<obs>" not in user:
                return _call_turn({"name": "Search", "parameters": {"query": question}})
            assert self.corpus_answers[question] in user  # the retrieved snippet is in the observation
            return f"<think> found it </think>\n<response> {self.bamboogle[question]} </response>"
        if user.endswith(f"<user> {self.multi_style.after_observation} </user>"):
            return "<think> done </think>\n<response> Done. </response>"  # calls ran: end the turn
        # Several entries can share their first turns (e.g. base vs miss_param): match all turns so far.
        pattern = "<user> (.*?)\n" + re.escape(self.multi_style.user_suffix) + " </user>"
        seen = re.findall(pattern, user, re.DOTALL)
        replies = {steps[len(seen) - 1] for sys_, texts, steps in self.multi_turn
                   if sys_ == system and texts[:len(seen)] == seen}
        assert len(replies) == 1, f"{len(replies)} oracle replies for a multi-turn prompt"
        return replies.pop()


@pytest.fixture()
def bench(shared_dir, tmp_path):
    bench_dir = shared_dir / "bench"
    questions = bamboogle.load_bamboogle(bench_dir / "bamboogle" / "data.json", LIMIT)
    corpus = tmp_path / "corpus.jsonl"
    facts = {item.question: f"Fact: the answer to '{item.question}' is {item.answer}." for item in questions}
    filler = [f"Unrelated document number {i} about gardening." for i in range(20)]
    corpus.write_text("\n".join(json.dumps({"text": text}) for text in [*facts.values(), *filler]) + "\n")
    return bench_dir, corpus, facts


def _flags(bench_dir_, corpus, out_, **extra):
    values = dict(bench_dir=str(bench_dir_), out=str(out_), limit=LIMIT, batch_size=3, search_corpus=str(corpus),
                  benchmarks=["bfcl", "api_bank", "bamboogle"], categories=["all"], bamboogle_protocol="offline")
    values.update(extra)
    return flagsaver.flagsaver(**values)


def test_oracle_scores_100_percent_everywhere_and_resumes(bench, tmp_path):
    bench_dir, corpus, facts = bench
    generator = FunctionGenerator(Oracle(bench_dir, facts))
    out = tmp_path / "run"
    with _flags(bench_dir, corpus, out):
        summary = evaluate.run(generator)

    expected = categories.ALL_CATEGORIES if multi_turn.api_classes_available()[0] else categories.SINGLE_TURN
    assert {name: s["accuracy"] for name, s in summary["bfcl"]["categories"].items()} == {c: 1.0 for c in expected}
    if expected == categories.ALL_CATEGORIES:
        assert all(value == 1.0 for value in summary["bfcl"]["groups"].values())
    assert summary["api_bank"]["toolrl"]["overall"] == 1.0 and summary["api_bank"]["strict"]["overall"] == 1.0
    assert summary["bamboogle"]["accuracy"] == 1.0 and summary["bamboogle"]["avg_tool_calls"] == 1.0
    assert summary["bamboogle"]["protocol"] == "offline" and summary["bamboogle"]["comparable_to_paper"] is False

    # Report, per-item records and BFCL's own result files.
    counts = json.loads((out / "summary.json").read_text())["api_bank"]["counts"]
    assert counts == {f"level{i}": LIMIT for i in (1, 2, 3)}
    table = (out / "summary.md").read_text()
    assert "| Overall | Non-Live | Non-Live AST | Live | Multi-Turn | Relevance | Irrelevance |" in table
    assert "| Level-1 | Level-2 | Level-3 | Overall |" in table and "Avg Num Tool Calls" in table
    assert "## Bamboogle (offline protocol: NOT comparable to the paper)" in table
    for category in expected:
        rows = [json.loads(line) for line in (out / "bfcl_results" / f"BFCL_v3_{category}_result.json").open()]
        items = data.load_category(bench_dir / "bfcl_v3", category, LIMIT)
        assert [row["id"] for row in rows] == [item.id for item in items]
        scored = [json.loads(line) for line in (out / "items" / f"bfcl_{category}.jsonl").open()]
        assert all(row["valid"] for row in scored)
        if not categories.is_multi_turn(category):
            for row, item_record in zip(rows, scored):
                decoded = ast.parse(row["result"], mode="eval").body
                assert isinstance(decoded, ast.List) and len(decoded.elts) == len(item_record["calls"])

    # A rerun generates nothing and reproduces the summary.
    def refuse(messages):
        raise AssertionError("nothing should be generated again")

    with _flags(bench_dir, corpus, out):
        assert evaluate.run(FunctionGenerator(refuse)) == summary

    # Losing the last finished API-Bank item regenerates exactly that item.
    path = out / "generations" / "api_bank.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # truncated last write
    again = FunctionGenerator(Oracle(bench_dir, facts))
    with _flags(bench_dir, corpus, out, benchmarks=["api_bank"]):
        assert evaluate.run(again)["api_bank"] == summary["api_bank"]
    assert len(again.seen) == 1


@pytest.mark.parametrize("overrides, message", [
    (dict(bench_dir=None), "--bench_dir is required"),
    (dict(out=None), "--out is required"),
    (dict(benchmarks=["bfcl", "toolbench"]), "unknown benchmark"),
    (dict(categories=["simple_python"]), "unknown BFCL category"),
    (dict(search_corpus=None), "needs --search_corpus"),
    (dict(search_backend="http", search_endpoint="https://x.example"), "needs --search_api_key"),
    (dict(prompt_template="/no/such/template.txt"), "is not a file"),
])
def test_bad_flags_are_usage_errors(bench, tmp_path, overrides, message):
    bench_dir, corpus, _ = bench
    with _flags(bench_dir, corpus, tmp_path / "run", **overrides):
        with pytest.raises(app.UsageError, match=message):
            evaluate.run(FunctionGenerator(lambda messages: ""))


def test_custom_prompt_template_reaches_the_model(bench, tmp_path):
    bench_dir, corpus, _ = bench
    template = tmp_path / "system.txt"
    template.write_text("CUSTOM HEADER\n{tools}\n")
    generator = FunctionGenerator(lambda messages: "<response> no </response>")
    with _flags(bench_dir, corpus, tmp_path / "run", prompt_template=str(template), benchmarks=["bfcl"],
                categories=["irrelevance"]):
        summary = evaluate.run(generator)
    assert summary["bfcl"]["categories"]["irrelevance"]["accuracy"] == 1.0
    assert all(seen[0]["content"].startswith("CUSTOM HEADER\n1. Name: ") for seen in generator.seen)
