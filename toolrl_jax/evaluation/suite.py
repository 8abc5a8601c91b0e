"""Run the paper's evaluation suite (BFCL v3, API-Bank, Bamboogle) with any ``Generator``.

Layout of ``out_dir`` after a run:
  generations/<bench>.jsonl   raw model outputs, appended as items finish (a rerun skips finished ids)
  items/<bench>.jsonl         scored per-item records
  bfcl_results/BFCL_v3_<category>_result.json   BFCL's own result format ({"id", "result"} lines)
  summary.json, summary.md    scores in the paper's column layout

The BFCL result files hold each step's calls in Python syntax (``[f(a=1)]``; ``[]`` for no call), which BFCL's
prompting handlers decode, so a v3-era ``bfcl evaluate`` can re-score them from ``result/<prompting model>/``
(bfcl-eval 2026.x uses the renamed v4 categories and cannot read v3 files).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from toolrl_jax.evaluation import api_bank, bamboogle, prompts, report
from toolrl_jax.evaluation.bfcl import categories as bfcl_categories
from toolrl_jax.evaluation.bfcl.runner import BfclConfig, evaluate_bfcl
from toolrl_jax.evaluation.generator import Generator
from toolrl_jax.evaluation.search import SearchBackend

logger = logging.getLogger(__name__)

BENCHMARKS = ("bfcl", "api_bank", "bamboogle")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    bench_dir: str  # holds bfcl_v3/, api_bank/, bamboogle/data.json
    out_dir: str
    benchmarks: tuple[str, ...] = BENCHMARKS
    bfcl_categories: tuple[str, ...] = ("all",)
    limit: int | None = None  # first N items per BFCL category / API-Bank level / Bamboogle
    batch_size: int = 8
    system_template: str | None = None  # path of a system prompt template with a {tools} placeholder
    bamboogle_max_rounds: int = 4
    bamboogle_top_k: int = 5
    bamboogle_f1_threshold: float = 0.5
    model_name: str = ""

    def __post_init__(self) -> None:
        unknown = [name for name in self.benchmarks if name not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        bfcl_categories.expand(list(self.bfcl_categories))  # raises on unknown names

    @property
    def bfcl_dir(self) -> Path:
        return Path(self.bench_dir) / "bfcl_v3"

    @property
    def api_bank_dir(self) -> Path:
        return Path(self.bench_dir) / "api_bank"

    @property
    def bamboogle_path(self) -> Path:
        return Path(self.bench_dir) / "bamboogle" / "data.json"


def run_evaluation(generator: Generator, config: EvalConfig, *, search: SearchBackend | None = None,
                   judge: bamboogle.Judge | None = None, judge_name: str = "") -> dict[str, Any]:
    """Generate, score and report every configured benchmark; returns the summary written to disk."""
    if "bamboogle" in config.benchmarks and search is None:
        raise ValueError("Bamboogle needs a search backend (e.g. BM25Search over a local corpus)")
    prompt_set = prompts.PromptSet.load(config.system_template)
    summary: dict[str, Any] = {"model": config.model_name, "config": dataclasses.asdict(config)}
    if "bfcl" in config.benchmarks:
        bfcl_config = BfclConfig(bfcl_dir=str(config.bfcl_dir), categories=tuple(config.bfcl_categories),
                                 limit=config.limit, batch_size=config.batch_size)
        summary["bfcl"] = evaluate_bfcl(generator, bfcl_config, config.out_dir, prompt_set)
    if "api_bank" in config.benchmarks:
        summary["api_bank"] = api_bank.evaluate_api_bank(generator, config.api_bank_dir, config.out_dir,
                                                         batch_size=config.batch_size, limit=config.limit)
    if "bamboogle" in config.benchmarks:
        bamboo_config = bamboogle.BamboogleConfig(
            max_rounds=config.bamboogle_max_rounds, top_k=config.bamboogle_top_k,
            f1_threshold=config.bamboogle_f1_threshold, batch_size=config.batch_size, limit=config.limit)
        summary["bamboogle"] = bamboogle.evaluate_bamboogle(generator, config.bamboogle_path, config.out_dir, search,
                                                            prompt_set, bamboo_config, judge)
        summary["bamboogle"]["judge"] = judge_name or (
            "custom" if judge else f"EM or F1>={config.bamboogle_f1_threshold}")
    json_path, md_path = report.write_summary(summary, config.out_dir)
    logger.info("wrote %s and %s", json_path, md_path)
    return summary
