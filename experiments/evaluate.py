"""Evaluates a model on BFCL v3, API-Bank and Bamboogle the way the ToolRL paper did (greedy decoding).

  python -m experiments.evaluate --model=/path/to/hf_model --bench_dir=/path/to/bench --out=/path/to/run \
      [--benchmarks=bfcl,api_bank,bamboogle] [--categories=all] [--limit=N] [--batch_size=8] \
      [--max_new_tokens=1024] [--prompt_template=my_system_prompt.txt] \
      [--search_backend=bm25 --search_corpus=wiki.jsonl]

--bench_dir must hold bfcl_v3/, api_bank/ and bamboogle/data.json. Generation is resumable: rerunning with
the same --out skips items already generated. Results: <out>/summary.{json,md}, <out>/items/*.jsonl (per item),
<out>/bfcl_results/BFCL_v3_<category>_result.json (BFCL's own format). BFCL's multi-turn categories need the
optional `bfcl-eval` package (pip install --no-deps bfcl-eval==2026.3.23); without it they are skipped.
Bamboogle needs a search backend: --search_backend=bm25 with --search_corpus (a local JSONL / JSON / text corpus),
or --search_backend=http with --search_endpoint and --search_api_key.
"""
from __future__ import annotations

import logging
from pathlib import Path

from absl import app, flags

from toolrl_jax.evaluation import search, suite
from toolrl_jax.evaluation.bfcl import categories as bfcl_categories
from toolrl_jax.evaluation.generator import Generator, SamplerGenerator, SamplerGeneratorConfig

_MODEL = flags.DEFINE_string("model", None, "HF model folder (config.json, safetensors, tokenizer files).")
_BENCHMARKS = flags.DEFINE_list("benchmarks", list(suite.BENCHMARKS), f"Any of {list(suite.BENCHMARKS)}.")
_CATEGORIES = flags.DEFINE_list("categories", ["all"], "BFCL categories or groups "
                                f"({sorted(bfcl_categories.GROUPS)} or single categories).")
_BENCH_DIR = flags.DEFINE_string("bench_dir", None, "Folder with bfcl_v3/, api_bank/ and bamboogle/data.json.")
_OUT = flags.DEFINE_string("out", None, "Output folder (created; reused to resume).")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N items per BFCL category / API-Bank level / "
                              "Bamboogle (quick checks; scores are then not comparable to the paper).", lower_bound=1)
_PROMPT_TEMPLATE = flags.DEFINE_string("prompt_template", None, "System prompt template file with a {tools} "
                                       "placeholder (default: the ToolRL prompt).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts per generation call.", lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 1024, "Response budget per generation.", lower_bound=1)
_MAX_PROMPT_TOKENS = flags.DEFINE_integer("max_prompt_tokens", 4096, "Longer prompts are left-truncated.",
                                          lower_bound=1)
_SEARCH_BACKEND = flags.DEFINE_enum("search_backend", "bm25", ["bm25", "http"], "Bamboogle's Search backend.")
_SEARCH_CORPUS = flags.DEFINE_string("search_corpus", None, "Corpus file for --search_backend=bm25.")
_SEARCH_ENDPOINT = flags.DEFINE_string("search_endpoint", None, "URL for --search_backend=http.")
_SEARCH_API_KEY = flags.DEFINE_string("search_api_key", None, "API key for --search_backend=http (required there).")
_BAMBOOGLE_ROUNDS = flags.DEFINE_integer("bamboogle_max_rounds", 4, "Generations per Bamboogle question.",
                                         lower_bound=1)
_BAMBOOGLE_F1 = flags.DEFINE_float("bamboogle_f1_threshold", 0.5, "Default judge: EM or F1 >= this.")


def config_from_flags() -> suite.EvalConfig:
    """The run configuration from the parsed flags (raises app.UsageError on bad combinations)."""
    for flag in (_BENCH_DIR, _OUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    if not Path(_BENCH_DIR.value).is_dir():
        raise app.UsageError(f"--bench_dir {_BENCH_DIR.value} is not a folder")
    if _PROMPT_TEMPLATE.value and not Path(_PROMPT_TEMPLATE.value).is_file():
        raise app.UsageError(f"--prompt_template {_PROMPT_TEMPLATE.value} is not a file")
    try:
        return suite.EvalConfig(
            bench_dir=_BENCH_DIR.value, out_dir=_OUT.value, benchmarks=tuple(_BENCHMARKS.value),
            bfcl_categories=tuple(_CATEGORIES.value), limit=_LIMIT.value, batch_size=_BATCH_SIZE.value,
            system_template=_PROMPT_TEMPLATE.value, bamboogle_max_rounds=_BAMBOOGLE_ROUNDS.value,
            bamboogle_f1_threshold=_BAMBOOGLE_F1.value, model_name=_MODEL.value or "")
    except ValueError as error:
        raise app.UsageError(str(error)) from error


def search_from_flags(config: suite.EvalConfig) -> search.SearchBackend | None:
    """The Bamboogle search backend, or None when Bamboogle is not requested."""
    if "bamboogle" not in config.benchmarks:
        return None
    if _SEARCH_BACKEND.value == "bm25":
        if not _SEARCH_CORPUS.value:
            raise app.UsageError("Bamboogle with --search_backend=bm25 needs --search_corpus (a local corpus file)")
        return search.BM25Search.from_file(_SEARCH_CORPUS.value)
    if not _SEARCH_ENDPOINT.value:
        raise app.UsageError("--search_backend=http needs --search_endpoint")
    if not _SEARCH_API_KEY.value:
        raise app.UsageError("--search_backend=http needs --search_api_key (no key is bundled)")
    return search.HttpSearch(_SEARCH_ENDPOINT.value, _SEARCH_API_KEY.value)


def generator_from_flags() -> Generator:
    """Greedy JAX generation with the model in --model."""
    if not _MODEL.value:
        raise app.UsageError("--model is required")
    from toolrl_jax.models import hf_io
    from toolrl_jax.tokenization import load_tokenizer

    _, model = hf_io.load_hf_model(_MODEL.value)
    tokenizer = load_tokenizer(_MODEL.value)
    return SamplerGenerator(model, tokenizer, SamplerGeneratorConfig(
        max_new_tokens=_MAX_NEW_TOKENS.value, max_prompt_tokens=_MAX_PROMPT_TOKENS.value))


def run(generator: Generator | None = None) -> dict:
    """Run the evaluation the flags describe; ``generator`` defaults to --model (tests pass a fake one)."""
    config = config_from_flags()
    backend = search_from_flags(config)  # flag problems surface before the model is loaded
    return suite.run_evaluation(generator or generator_from_flags(), config, search=backend)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    run()
    print((Path(_OUT.value) / "summary.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    app.run(main)
