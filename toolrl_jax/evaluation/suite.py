"""Run the paper's evaluation suite (BFCL v3, API-Bank, Bamboogle) and held-out tool sets with any ``Generator``.

Layout of ``out_dir`` after a run:
  generations/<bench>.jsonl   raw model outputs, appended as items finish (a rerun skips finished ids)
  judgments/bamboogle.jsonl   the LLM judge's replies (a rerun re-uses the successful ones)
  items/<bench>.jsonl         scored per-item records
  bfcl_results/BFCL_v3_<category>_result.json   BFCL's own result format ({"id", "result"} lines)
  summary.json, summary.md    scores in the paper's column layout

Every file the requested benchmarks need is checked before anything runs. The BFCL result files hold each
step's calls in Python syntax (``[f(a=1)]``; ``[]`` for no call), which BFCL's prompting handlers decode, so a
v3-era ``bfcl evaluate`` can re-score them from ``result/<prompting model>/`` (bfcl-eval 2026.x uses the renamed
v4 categories and cannot read v3 files).
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from toolrl_jax.evaluation import api_bank, bamboogle, bamboogle_toolrl, heldout, prompts, report
from toolrl_jax.evaluation.bfcl import categories as bfcl_categories
from toolrl_jax.evaluation.bfcl import data as bfcl_data
from toolrl_jax.evaluation.bfcl import multi_turn
from toolrl_jax.evaluation.bfcl.runner import DEFAULT_LIMITS as BFCL_LIMITS
from toolrl_jax.evaluation.bfcl.runner import BfclConfig, evaluate_bfcl
from toolrl_jax.evaluation.environments import ENV_BENCHMARKS, EnvEvalConfig, evaluate_environment
from toolrl_jax.evaluation.generator import LONG_PROMPT_POLICIES, GenerationLimits, Generator
from toolrl_jax.evaluation.judge import LlmJudge
from toolrl_jax.evaluation.search import SearchBackend, WebSearch

logger = logging.getLogger(__name__)

BENCHMARKS = ("bfcl", "api_bank", "bamboogle", "heldout", "env_synthetic", "env_bfcl")
PAPER_BENCHMARKS = BENCHMARKS[:3]
BAMBOOGLE_PROTOCOLS = ("toolrl", "offline")
DEFAULT_LIMITS = {"bfcl": BFCL_LIMITS, "api_bank": api_bank.DEFAULT_LIMITS,
                  "bamboogle": bamboogle.DEFAULT_LIMITS, "heldout": heldout.DEFAULT_LIMITS}
BAMBOOGLE_SKIPPED = ("skipped: the paper's protocol needs a web search API key and an LLM judge API key "
                     "(experiments.evaluate: --search_api_key and --judge_api_key); or use the offline protocol "
                     "(--bamboogle_protocol=offline --search_corpus=FILE), which is not comparable to the paper")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    bench_dir: str  # holds bfcl_v3/, api_bank/, bamboogle/data.json
    out_dir: str
    benchmarks: tuple[str, ...] = PAPER_BENCHMARKS
    bfcl_categories: tuple[str, ...] = ("all",)
    limit: int | None = None  # first N items per BFCL category / API-Bank level / Bamboogle / held-out file
    batch_size: int = 8
    system_template: str | None = None  # path of a system prompt template with a {tools} placeholder
    max_new_tokens: int | None = None  # None: each benchmark's own (DEFAULT_LIMITS)
    context_tokens: int | None = None  # None: each benchmark's own (the model's window, or the original's 4096)
    long_prompts: str = "truncate"  # a prompt with no room left: "truncate" (flagged, counted) or "error"
    bamboogle_protocol: str = "toolrl"
    bamboogle_max_rounds: int = 4
    bamboogle_top_k: int = 5
    bamboogle_f1_threshold: float = 0.5  # offline protocol's judge
    heldout_data: tuple[str, ...] = ()
    model_name: str = ""
    environments: EnvEvalConfig = EnvEvalConfig()  # env_synthetic / env_bfcl (bfcl_dir and limit filled in)

    def __post_init__(self) -> None:
        unknown = [name for name in self.benchmarks if name not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")
        if self.bamboogle_protocol not in BAMBOOGLE_PROTOCOLS:
            raise ValueError(f"bamboogle_protocol must be one of {BAMBOOGLE_PROTOCOLS}, got "
                             f"{self.bamboogle_protocol!r}")
        if self.long_prompts not in LONG_PROMPT_POLICIES:
            raise ValueError(f"long_prompts must be one of {LONG_PROMPT_POLICIES}, got {self.long_prompts!r}")
        if "heldout" in self.benchmarks and not self.heldout_data:
            raise ValueError("the heldout benchmark needs held-out data files")
        for benchmark in DEFAULT_LIMITS:
            self.limits(benchmark)  # raises on bad token limits
        bfcl_categories.expand(list(self.bfcl_categories))  # raises on unknown names

    def limits(self, benchmark: str) -> GenerationLimits:
        """The generation limits of ``benchmark``: its defaults, with this config's overrides."""
        changes: dict[str, Any] = {"long_prompts": self.long_prompts}
        if self.max_new_tokens is not None:
            changes["max_new_tokens"] = self.max_new_tokens
        if self.context_tokens is not None:
            changes["context_tokens"] = self.context_tokens
        return dataclasses.replace(DEFAULT_LIMITS[benchmark], **changes)

    @property
    def bfcl_dir(self) -> Path:
        return Path(self.bench_dir) / "bfcl_v3"

    @property
    def api_bank_dir(self) -> Path:
        return Path(self.bench_dir) / "api_bank"

    @property
    def bamboogle_path(self) -> Path:
        return Path(self.bench_dir) / "bamboogle" / "data.json"


def runs_bamboogle(config: EvalConfig, web_search: WebSearch | None, judge: LlmJudge | None) -> bool:
    """Bamboogle is requested and its protocol has what it needs (the paper's: a web search and a judge)."""
    return "bamboogle" in config.benchmarks and (
        config.bamboogle_protocol == "offline" or (web_search is not None and judge is not None))


def required_files(config: EvalConfig, *, bamboogle_runs: bool = True) -> list[Path]:
    """Every file the configured run reads (BFCL multi-turn docs only where bfcl-eval can run those categories)."""
    files: list[Path] = []
    if "bfcl" in config.benchmarks:
        expanded = bfcl_categories.expand(list(config.bfcl_categories))
        multi = [c for c in expanded if bfcl_categories.is_multi_turn(c)]
        if multi and not multi_turn.api_classes_available()[0]:
            expanded = [c for c in expanded if c not in multi]  # skipped later, with the reason in the summary
            multi = []
        for category in expanded:
            files.append(config.bfcl_dir / bfcl_categories.file_name(category))
            if bfcl_categories.has_possible_answers(category):
                files.append(config.bfcl_dir / "possible_answer" / bfcl_categories.file_name(category))
        if multi:
            files += [config.bfcl_dir / "multi_turn_func_doc" / f"{module}.json"
                      for module in bfcl_data.MULTI_TURN_CLASSES.values()]
    if "api_bank" in config.benchmarks:
        files += [config.api_bank_dir / api_bank.level_file(level) for level in api_bank.LEVELS]
    if "bamboogle" in config.benchmarks and bamboogle_runs:
        files.append(config.bamboogle_path)
    if "heldout" in config.benchmarks:
        files += [Path(path) for path in config.heldout_data]
    if "env_synthetic" in config.benchmarks and config.environments.tasks:
        files.append(Path(config.environments.tasks))
    if "env_bfcl" in config.benchmarks:
        for category in config.environments.categories:
            files += [config.bfcl_dir / bfcl_categories.file_name(category),
                      config.bfcl_dir / "possible_answer" / bfcl_categories.file_name(category)]
    return files


def check_files(config: EvalConfig, *, bamboogle_runs: bool = True) -> None:
    """Raise FileNotFoundError naming every missing file, before any model is loaded or anything generated."""
    missing = [str(path) for path in required_files(config, bamboogle_runs=bamboogle_runs) if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} file(s) the requested benchmarks need are missing (nothing was "
                                f"run): " + ", ".join(missing))


def run_evaluation(generator: Generator, config: EvalConfig, *, search: SearchBackend | None = None,
                   web_search: WebSearch | None = None, judge: LlmJudge | None = None) -> dict[str, Any]:
    """Generate, score and report every configured benchmark; returns the summary written to disk.

    Bamboogle's paper protocol needs ``web_search`` and ``judge`` (without both it is skipped with a notice); the
    offline protocol needs ``search`` (e.g. BM25 over a local corpus).
    """
    if "bamboogle" in config.benchmarks and config.bamboogle_protocol == "offline" and search is None:
        raise ValueError("Bamboogle's offline protocol needs a search backend (e.g. BM25Search over a local corpus)")
    bamboogle_runs = runs_bamboogle(config, web_search, judge)
    check_files(config, bamboogle_runs=bamboogle_runs)
    prompt_set = prompts.PromptSet.load(config.system_template)
    summary: dict[str, Any] = {"model": config.model_name, "config": dataclasses.asdict(config),
                               "generation_limits": {name: dataclasses.asdict(config.limits(name))
                                                     for name in config.benchmarks if name in DEFAULT_LIMITS}}
    if "bfcl" in config.benchmarks:
        bfcl_config = BfclConfig(bfcl_dir=str(config.bfcl_dir), categories=tuple(config.bfcl_categories),
                                 limit=config.limit, batch_size=config.batch_size, limits=config.limits("bfcl"))
        summary["bfcl"] = evaluate_bfcl(generator, bfcl_config, config.out_dir, prompt_set)
    if "api_bank" in config.benchmarks:
        summary["api_bank"] = api_bank.evaluate_api_bank(generator, config.api_bank_dir, config.out_dir,
                                                         batch_size=config.batch_size, limit=config.limit,
                                                         limits=config.limits("api_bank"))
    if "bamboogle" in config.benchmarks:
        summary["bamboogle"] = _bamboogle(generator, config, prompt_set, search, web_search, judge, bamboogle_runs)
    for benchmark in (b for b in config.benchmarks if b in ENV_BENCHMARKS):
        summary[benchmark] = _environment(generator, config, benchmark)
    if "heldout" in config.benchmarks:
        summary["heldout"] = heldout.evaluate_heldout(generator, heldout.HeldoutConfig(
            paths=tuple(config.heldout_data), batch_size=config.batch_size, limit=config.limit,
            limits=config.limits("heldout")), config.out_dir)
    json_path, md_path = report.write_summary(summary, config.out_dir)
    logger.info("wrote %s and %s", json_path, md_path)
    return summary


def _environment(generator: Generator, config: EvalConfig, benchmark: str) -> dict[str, Any]:
    """An env_* benchmark: trajectories through the training environments need the JAX sampler itself."""
    sampler, tokenizer = getattr(generator, "sampler", None), getattr(generator, "tokenizer", None)
    if sampler is None or tokenizer is None:
        raise ValueError(f"{benchmark} runs multi-turn trajectories token by token: it needs the JAX "
                         f"SamplerGenerator (a generator with .sampler and .tokenizer), not {type(generator).__name__}")
    env_config = dataclasses.replace(config.environments, bfcl_dir=str(config.bfcl_dir), limit=config.limit)
    return evaluate_environment(sampler, tokenizer, benchmark, env_config, config.out_dir)


def _bamboogle(generator: Generator, config: EvalConfig, prompt_set: prompts.PromptSet,
               search: SearchBackend | None, web_search: WebSearch | None, judge: LlmJudge | None,
               runs: bool) -> dict[str, Any]:
    if not runs:
        logger.warning("Bamboogle %s", BAMBOOGLE_SKIPPED)
        return {"protocol": config.bamboogle_protocol, "skipped": BAMBOOGLE_SKIPPED}
    bamboo_config = bamboogle.BamboogleConfig(
        max_rounds=config.bamboogle_max_rounds, top_k=config.bamboogle_top_k,
        f1_threshold=config.bamboogle_f1_threshold, batch_size=config.batch_size, limit=config.limit,
        limits=config.limits("bamboogle"))
    if config.bamboogle_protocol == "toolrl":
        result = bamboogle_toolrl.evaluate_bamboogle_toolrl(generator, config.bamboogle_path, config.out_dir,
                                                            web_search, judge, prompt_set, bamboo_config)
        result["comparable_to_paper"] &= (config.system_template is None and config.max_new_tokens is None
                                          and config.context_tokens is None)
        return result
    result = bamboogle.evaluate_bamboogle(generator, config.bamboogle_path, config.out_dir, search, prompt_set,
                                          bamboo_config)
    result["judge"] = f"EM or F1>={config.bamboogle_f1_threshold}"
    return result
