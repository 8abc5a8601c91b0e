"""experiments.evaluate's multi-turn benchmarks through the training environments (evaluation/environments.py)."""
from __future__ import annotations

import json

import pytest

from tests.test_grpo_multiturn import ScriptedSampler
from toolrl_jax.environments import make_tasks
from toolrl_jax.evaluation import suite
from toolrl_jax.evaluation.bfcl import multi_turn
from toolrl_jax.evaluation.environments import EnvEvalConfig, evaluate_environment
from toolrl_jax.evaluation.generator import SamplerGenerator
from toolrl_jax.models.hf_io import load_hf_model
from toolrl_jax.tokenization import load_tokenizer


@pytest.fixture(scope="module")
def generator(long_chat_model_dir):
    _, model = load_hf_model(long_chat_model_dir, dtype="float32")
    return SamplerGenerator(model, load_tokenizer(long_chat_model_dir))


def test_synthetic_heldout_tasks_are_scored_by_their_final_states(generator, tmp_path):
    """A policy that plays each held-out task's reference turns solves every task; the records say so per kind."""
    tasks = make_tasks("heldout", 4, seed=0)
    scripted = ScriptedSampler(generator.sampler, generator.tokenizer, tasks)
    summary = evaluate_environment(scripted, generator.tokenizer, "env_synthetic",
                                   EnvEvalConfig(count=4, max_turns=6, total_tokens=1024, turn_tokens=128), tmp_path)
    assert summary["count"] == 4 and summary["success_rate"] == 1.0
    assert sum(v["count"] for v in summary["by_kind"].values()) == 4 and summary["turns"] > 2
    records = [json.loads(line) for line in (tmp_path / "items" / "env_synthetic.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [t["id"] for t in tasks] and all(r["success"] for r in records)
    assert all(r["finish_reason"] == "answer" and r["tool_errors"] == 0 for r in records)


def test_bfcl_multi_turn_runs_through_the_environment(generator, shared_dir, tmp_path):
    """env_bfcl from the suite: BFCL v3 entries with their ground truths, greedy trajectories of a random model
    (which fail), records and the summary table."""
    if not multi_turn.api_classes_available()[0]:
        pytest.skip(multi_turn.api_classes_available()[1])
    config = suite.EvalConfig(bench_dir=str(shared_dir / "bench"), out_dir=str(tmp_path), benchmarks=("env_bfcl",),
                              limit=2, environments=EnvEvalConfig(max_turns=2, turn_tokens=8, total_tokens=64))
    summary = suite.run_evaluation(generator, config)
    env = summary["env_bfcl"]
    assert env["count"] == 2 and env["success_rate"] == 0.0 and set(env["by_kind"]) == {"multi_turn_base"}
    records = [json.loads(line) for line in (tmp_path / "items" / "env_bfcl.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["multi_turn_base_0", "multi_turn_base_1"]
    assert all(r["details"].get("error_type") for r in records)  # the official checks said why
    assert "BFCL multi-turn through the training environment" in (tmp_path / "summary.md").read_text()


def test_environment_benchmarks_need_the_jax_sampler(tmp_path):
    class TextOnly:
        def generate(self, conversations, limits):
            return []

    config = suite.EvalConfig(bench_dir=str(tmp_path), out_dir=str(tmp_path), benchmarks=("env_synthetic",))
    with pytest.raises(ValueError, match="needs the JAX SamplerGenerator"):
        suite.run_evaluation(TextOnly(), config)
