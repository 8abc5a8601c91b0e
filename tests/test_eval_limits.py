"""Generation limits (the originals' budgets, flagged truncation), the evaluation system prompt's final newline,
the up-front check of benchmark files and the --model names experiments.evaluate accepts. No model needed."""
from __future__ import annotations

import json
import shutil

import pytest
from absl import app, flags
from absl.testing import flagsaver

from experiments import evaluate
from toolrl_jax.datasets import format as data_format
from toolrl_jax.evaluation import prompts, suite
from toolrl_jax.evaluation.bfcl import categories, multi_turn
from toolrl_jax.evaluation.generator import Completion, FunctionGenerator, GenerationLimits, PromptTooLongError

FLAGS = flags.FLAGS


@pytest.fixture(autouse=True)
def _parsed_flags():
    if not FLAGS.is_parsed():
        FLAGS.mark_as_parsed()


def test_budget_is_min_of_cap_and_what_the_context_leaves():
    bfcl = GenerationLimits(max_new_tokens=4096, reserve_tokens=2)  # BFCL's handler: min(4096, ctx - prompt - 2)
    assert bfcl.plan(3500, window=32768) == (3500, 4096, False)
    assert bfcl.plan(30000, window=32768) == (30000, 2766, False)
    assert bfcl.plan(32765, window=32768) == (32765, 1, False)
    api = GenerationLimits(max_new_tokens=4096, context_tokens=4096)  # vLLM max_model_len=4096, max_tokens=4096
    assert api.plan(1000, window=32768) == (1000, 3096, False)
    assert api.plan(1000, window=2048) == (1000, 1048, False)  # never beyond the model's window
    assert api.plan(4096, window=32768) == (2048, 2048, True)  # no room: keep the last half, flag it
    with pytest.raises(PromptTooLongError, match="4100 tokens"):
        GenerationLimits(context_tokens=4096, long_prompts="error").plan(4100, window=8192)
    with pytest.raises(ValueError, match="long_prompts"):
        GenerationLimits(long_prompts="drop")


def test_each_benchmark_gets_the_originals_limits_unless_overridden(tmp_path):
    config = suite.EvalConfig(bench_dir=str(tmp_path), out_dir=str(tmp_path))
    assert config.limits("bfcl") == GenerationLimits(max_new_tokens=4096, context_tokens=None, reserve_tokens=2)
    assert config.limits("api_bank") == GenerationLimits(max_new_tokens=4096, context_tokens=4096)
    assert config.limits("bamboogle") == GenerationLimits(max_new_tokens=4096, context_tokens=4096)
    assert config.limits("heldout") == GenerationLimits(max_new_tokens=1024)
    custom = suite.EvalConfig(bench_dir=str(tmp_path), out_dir=str(tmp_path), max_new_tokens=64, context_tokens=512,
                              long_prompts="error")
    assert custom.limits("bfcl") == GenerationLimits(64, 512, 2, "error")
    with pytest.raises(ValueError, match="context_tokens"):
        suite.EvalConfig(bench_dir=str(tmp_path), out_dir=str(tmp_path), context_tokens=1)


def _bench_copy(shared_dir, tmp_path, drop=()):
    bench = tmp_path / "bench"
    shutil.copytree(shared_dir / "bench", bench)
    for relative in drop:
        (bench / relative).unlink()
    return bench


def test_truncated_prompts_are_counted_per_category_and_reported(shared_dir, tmp_path):
    """A generator that reports truncation for some prompts: items are flagged, counted per category, in both
    summary files; the limits each benchmark passes are BFCL's and API-Bank's."""
    def respond(messages):
        return Completion("<response> no </response>", prompt_tokens=9999, max_new_tokens=1,
                          truncated=len(messages[1]["content"]) % 2 == 0)

    generator = FunctionGenerator(respond)
    config = suite.EvalConfig(bench_dir=str(shared_dir / "bench"), out_dir=str(tmp_path),
                              benchmarks=("bfcl", "api_bank"), bfcl_categories=("irrelevance", "simple"), limit=5)
    summary = suite.run_evaluation(generator, config)
    items = {c: [json.loads(line) for line in (tmp_path / "items" / f"bfcl_{c}.jsonl").read_text().splitlines()]
             for c in ("irrelevance", "simple")}
    for category, rows in items.items():
        expected = sum(row["truncated"] for row in rows)
        assert summary["bfcl"]["categories"][category]["truncated"] == expected
    total = sum(row["truncated"] for rows in items.values() for row in rows)
    assert total > 0
    markdown = (tmp_path / "summary.md").read_text()
    assert "| Category | Accuracy | Correct | Truncated |" in markdown
    assert f"BFCL: {total} item(s) had a prompt longer than the context" in markdown
    assert json.loads((tmp_path / "summary.json").read_text())["bfcl"]["categories"]["simple"]["truncated"] == \
        summary["bfcl"]["categories"]["simple"]["truncated"]
    assert {limits for limits in generator.limits} == {config.limits("bfcl"), config.limits("api_bank")}


@pytest.mark.skipif(not multi_turn.api_classes_available()[0], reason="needs bfcl-eval")
def test_multi_turn_items_are_flagged_when_any_step_was_truncated(shared_dir, tmp_path):
    steps = []

    def respond(messages):
        steps.append(messages)
        return Completion("<response> done </response>", truncated=len(steps) == 2)

    config = suite.EvalConfig(bench_dir=str(shared_dir / "bench"), out_dir=str(tmp_path), benchmarks=("bfcl",),
                              bfcl_categories=("multi_turn_base",), limit=1, batch_size=1)
    summary = suite.run_evaluation(FunctionGenerator(respond), config)
    assert len(steps) > 2 and summary["bfcl"]["categories"]["multi_turn_base"]["truncated"] == 1
    record = json.loads((tmp_path / "generations" / "bfcl_multi_turn_base.jsonl").read_text())
    assert record["truncated"] and record["truncated_steps"] == 1


def test_evaluation_system_prompts_end_with_a_newline_as_the_originals(shared_dir, tmp_path):
    """rlla_qwen.py and Bamboogle/generate.py: SYS ends with "\\n" before <|im_end|>; API-Bank uses the data's
    system prompt as is (no final newline). Training prompts are unchanged (no final newline)."""
    generator = FunctionGenerator(lambda messages: "<response> no </response>")
    config = suite.EvalConfig(bench_dir=str(shared_dir / "bench"), out_dir=str(tmp_path),
                              benchmarks=("bfcl", "api_bank"), bfcl_categories=("simple",), limit=1)
    suite.run_evaluation(generator, config)
    bfcl_system, api_system = generator.seen[0][0]["content"], generator.seen[1][0]["content"]
    assert bfcl_system.startswith(data_format.SYSTEM_HEADER + "1. Name: ")
    assert bfcl_system.endswith(data_format.SYSTEM_FOOTER + "\n") and not bfcl_system.endswith("\n\n")
    assert api_system.endswith(data_format.SYSTEM_FOOTER)
    assert prompts.PromptSet.load().system_prompt([]) == prompts.system_prompt(prompts.PromptSet.load().system,
                                                                               []) + "\n"


def test_missing_benchmark_files_stop_before_the_model_loads(shared_dir, tmp_path, monkeypatch):
    drop = ["bfcl_v3/BFCL_v3_simple.json", "bfcl_v3/possible_answer/BFCL_v3_live_simple.json",
            "api_bank/level-3-api_processed.json"]
    bench = _bench_copy(shared_dir, tmp_path, drop)
    monkeypatch.setattr(evaluate, "generator_from_flags", lambda: pytest.fail("the model must not be loaded"))
    with flagsaver.flagsaver(model="smollm2", bench_dir=str(bench), out=str(tmp_path / "run"),
                             benchmarks=["bfcl", "api_bank", "bamboogle"], categories=["all"]):
        with pytest.raises(app.UsageError, match="3 file") as error:
            evaluate.run()
    assert all(str(bench / relative) in str(error.value) for relative in drop)
    assert not (tmp_path / "run").exists()
    # The library checks too, before generating anything.
    refuse = FunctionGenerator(lambda messages: pytest.fail("nothing may be generated"))
    with pytest.raises(FileNotFoundError, match="BFCL_v3_simple.json"):
        suite.run_evaluation(refuse, suite.EvalConfig(bench_dir=str(bench), out_dir=str(tmp_path / "lib"),
                                                      bfcl_categories=("irrelevance", "simple")))
    assert refuse.calls == 0


def test_required_files_follow_the_request(shared_dir, tmp_path):
    config = suite.EvalConfig(bench_dir=str(tmp_path), out_dir=str(tmp_path), benchmarks=("bfcl", "bamboogle"),
                              bfcl_categories=("irrelevance", "multi_turn_base"))
    names = [path.relative_to(tmp_path).as_posix() for path in suite.required_files(config)]
    assert names[0] == "bfcl_v3/BFCL_v3_irrelevance.json"  # relevance categories have no possible answers
    assert "bfcl_v3/possible_answer/BFCL_v3_irrelevance.json" not in names
    if multi_turn.api_classes_available()[0]:
        assert "bfcl_v3/possible_answer/BFCL_v3_multi_turn_base.json" in names
        assert "bfcl_v3/multi_turn_func_doc/gorilla_file_system.json" in names
    assert names[-1] == "bamboogle/data.json"
    assert "bamboogle/data.json" not in [p.name for p in suite.required_files(config, bamboogle_runs=False)]
    assert len(categories.expand(["all"])) == 17


@pytest.mark.parametrize("model, extra, message", [
    (None, {}, "--model is required"),
    ("preset:nope", {"tokenizer": "/tmp"}, "needs a known preset"),
    ("/no/such/model", {}, "not 'smollm2', 'preset:NAME' or a folder"),
])
def test_bad_model_names_are_usage_errors(shared_dir, tmp_path, monkeypatch, model, extra, message):
    monkeypatch.setattr(evaluate, "generator_from_flags", lambda: pytest.fail("the model must not be loaded"))
    with flagsaver.flagsaver(model=model, bench_dir=str(shared_dir / "bench"), out=str(tmp_path / "run"),
                             benchmarks=["api_bank"], **extra):
        with pytest.raises(app.UsageError, match=message):
            evaluate.run()


def test_a_context_beyond_the_models_window_stops_before_the_weights_load(smollm2_dir, shared_dir, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setattr(evaluate, "generator_from_flags", lambda: pytest.fail("the model must not be loaded"))
    with flagsaver.flagsaver(model="smollm2", cache_dir=str(smollm2_dir.parent), context_tokens=100_000,
                             bench_dir=str(shared_dir / "bench"), out=str(tmp_path / "run"), benchmarks=["api_bank"]):
        with pytest.raises(app.UsageError, match=r"--context_tokens=100000 is larger than the model's window \(8192\)"):
            evaluate.run()
