"""Evaluation on the ToolRL paper's benchmarks (BFCL v3, API-Bank levels 1-3, Bamboogle) and held-out tool sets.

Scorers are model-free; generation goes through the small ``Generator`` protocol
(``generate(list_of_message_lists, limits) -> list[Completion]``), e.g. ``SamplerGenerator`` (the project's JAX
sampler) or ``FunctionGenerator`` (tests, oracles). ``suite.run_evaluation`` runs everything and writes the report.
"""
from toolrl_jax.evaluation.generator import (
                                             Completion,
                                             FunctionGenerator,
                                             GenerationLimits,
                                             Generator,
                                             PromptTooLongError,
                                             SamplerGenerator,
                                             SamplerGeneratorConfig,
)
from toolrl_jax.evaluation.judge import LlmJudge
from toolrl_jax.evaluation.parsing import ToolCall, parse_tool_calls, parse_turn
from toolrl_jax.evaluation.prompts import PromptSet
from toolrl_jax.evaluation.search import BM25Search, HttpSearch, SearchBackend, SerperSearch, WebSearch

_SUITE_NAMES = ("BENCHMARKS", "EvalConfig", "run_evaluation")


def __getattr__(name: str):
    """The suite's names, imported on first use: the suite runs multi-turn environments, whose package imports
    evaluation modules (BFCL's checkers), so an eager import here would be circular (PEP 562)."""
    if name in _SUITE_NAMES:
        from toolrl_jax.evaluation import suite

        return getattr(suite, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BENCHMARKS", "BM25Search", "Completion", "EvalConfig", "FunctionGenerator", "GenerationLimits", "Generator",
    "HttpSearch", "LlmJudge", "PromptSet", "PromptTooLongError", "SamplerGenerator", "SamplerGeneratorConfig",
    "SearchBackend", "SerperSearch", "ToolCall", "WebSearch", "parse_tool_calls", "parse_turn", "run_evaluation",
]
