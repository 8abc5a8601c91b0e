"""Evaluation on the ToolRL paper's benchmarks: BFCL v3, API-Bank (levels 1-3) and Bamboogle.

Scorers are model-free; generation goes through the small ``Generator`` protocol
(``generate(list_of_message_lists) -> list[str]``), e.g. ``SamplerGenerator`` (the project's JAX sampler)
or ``FunctionGenerator`` (tests, oracles). ``suite.run_evaluation`` runs everything and writes the report.
"""
from toolrl_jax.evaluation.generator import FunctionGenerator, Generator, SamplerGenerator, SamplerGeneratorConfig
from toolrl_jax.evaluation.parsing import ToolCall, parse_tool_calls, parse_turn
from toolrl_jax.evaluation.prompts import PromptSet
from toolrl_jax.evaluation.search import BM25Search, HttpSearch, SearchBackend
from toolrl_jax.evaluation.suite import BENCHMARKS, EvalConfig, run_evaluation

__all__ = [
    "BENCHMARKS", "BM25Search", "EvalConfig", "FunctionGenerator", "Generator", "HttpSearch", "PromptSet",
    "SamplerGenerator", "SamplerGeneratorConfig", "SearchBackend", "ToolCall", "parse_tool_calls", "parse_turn",
    "run_evaluation",
]
