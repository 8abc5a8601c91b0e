"""Evaluates a model on BFCL v3, API-Bank and Bamboogle the way the ToolRL paper did (greedy decoding), and on
held-out tool-call sets.

  python -m experiments.evaluate --model=MODEL --bench_dir=/path/to/bench --out=/path/to/run \
      [--benchmarks=bfcl,api_bank,bamboogle,heldout] [--categories=all] [--limit=N] [--batch_size=8] \
      [--max_new_tokens=N] [--context_tokens=N] [--long_prompts=truncate|error] [--prompt_template=FILE] \
      [--search_api_key=KEY --judge_api_key=KEY [--judge_base_url=URL --judge_model=gpt-4o]] \
      [--bamboogle_protocol=offline --search_corpus=wiki.jsonl] [--heldout_data=a.parquet,b.json]

MODEL is what training accepts: 'smollm2' (the embedded SmolLM2-135M-Instruct), a Hugging Face folder, or
'preset:NAME' with --tokenizer. --bench_dir must hold bfcl_v3/, api_bank/ and bamboogle/data.json; every file
the requested benchmarks need is checked before the model is loaded. Generation is resumable: rerunning with
the same --out skips items already generated (and Bamboogle answers already judged). Results:
<out>/summary.{json,md}, <out>/items/*.jsonl (per item), <out>/bfcl_results/BFCL_v3_<category>_result.json
(BFCL's own format). BFCL's multi-turn categories need the optional `bfcl-eval` package
(pip install --no-deps bfcl-eval==2026.3.23); without it they are skipped.

Bamboogle runs the paper's protocol (--bamboogle_protocol=toolrl): Google search through a Serper-compatible API
(--search_api_key, --search_endpoint) and an LLM judge over an OpenAI-compatible endpoint (--judge_api_key,
--judge_base_url, --judge_model). Without both keys it is skipped, with a notice in the log and the summary.
--bamboogle_protocol=offline instead uses BM25 over a local corpus (--search_corpus) and EM/F1, which is not
comparable to the paper. API keys are sent only as request headers, never logged or written to --out.
"""
from __future__ import annotations

import logging
from pathlib import Path

from absl import app, flags

from toolrl_jax.evaluation import heldout, search, suite
from toolrl_jax.evaluation.bfcl import categories as bfcl_categories
from toolrl_jax.evaluation.environments import EnvEvalConfig
from toolrl_jax.evaluation.generator import LONG_PROMPT_POLICIES, Generator, SamplerGenerator, SamplerGeneratorConfig
from toolrl_jax.evaluation.http_json import HttpConfig
from toolrl_jax.evaluation.judge import DEFAULT_JUDGE_MODEL, OPENAI_BASE_URL, LlmJudge
from toolrl_jax.models.config import PRESETS

FLAGS = flags.FLAGS

# Read by experiments.common.load_model_and_tokenizer (the loader training uses). Other entry points define flags of
# these names (experiments.bench_train, the training entry points) and tests import several of them into one
# process, so a later definition may replace these instead of failing (allow_override).
_LOADER = dict(allow_override=True)
_MODEL = flags.DEFINE_string("model", None, "'smollm2' (the embedded SmolLM2-135M-Instruct), a Hugging Face folder "
                             "(config.json, safetensors, tokenizer files), or 'preset:NAME' for random weights of a "
                             f"preset shape ({', '.join(sorted(PRESETS))}; needs --tokenizer).", **_LOADER)
flags.DEFINE_string("tokenizer", None, "Tokenizer folder (default: the model folder).", **_LOADER)
flags.DEFINE_string("cache_dir", None, "Where prepared assets live (default ~/.cache/toolrl_jax).", **_LOADER)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.", **_LOADER)
flags.DEFINE_enum("param_dtype", "float32", ["bfloat16", "float32"], "Weight dtype.", **_LOADER)
flags.DEFINE_enum("attention_impl", "xla", ["xla", "cudnn"], "Attention kernel (cudnn: fused, GPU only).", **_LOADER)
flags.DEFINE_integer("seed", 0, "Seed of a preset's random weights.", **_LOADER)
flags.DEFINE_bool("remat", False, "Training-only setting of the shared model loader (no effect here).", **_LOADER)
flags.DEFINE_enum("remat_policy", "full", ["full", "save_dots"], "Training-only setting of the shared model loader.",
                  **_LOADER)

_BENCHMARKS = flags.DEFINE_list("benchmarks", list(suite.PAPER_BENCHMARKS), f"Any of {list(suite.BENCHMARKS)}.")
_CATEGORIES = flags.DEFINE_list("categories", ["all"], "BFCL categories or groups "
                                f"({sorted(bfcl_categories.GROUPS)} or single categories).")
_BENCH_DIR = flags.DEFINE_string("bench_dir", None, "Folder with bfcl_v3/, api_bank/ and bamboogle/data.json.")
_OUT = flags.DEFINE_string("out", None, "Output folder (created; reused to resume).")
_LIMIT = flags.DEFINE_integer("limit", None, "Evaluate only the first N items per BFCL category / API-Bank level / "
                              "Bamboogle / held-out file (quick checks; scores are then not comparable to the paper).",
                              lower_bound=1)
_PROMPT_TEMPLATE = flags.DEFINE_string("prompt_template", None, "System prompt template file with a {tools} "
                                       "placeholder (default: the ToolRL prompt).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Prompts per generation call.", lower_bound=1)
_ENGINE = flags.DEFINE_enum("rollout_engine", "continuous", ["continuous", "static"],
                            "Decode engine: continuous (slots refilled as rows stop) or static (each call decodes "
                            "until its longest row stops); the same greedy outputs.")
_SLOTS = flags.DEFINE_integer("rollout_slots", None, "Decode slots of the continuous engine (default: the call's "
                              "rows, up to 64).", lower_bound=1)
_WINDOWS = flags.DEFINE_integer("rollout_decode_windows", 4, "Attention window sizes of the continuous engine's "
                                "decode calls (1: always the whole KV cache); the same outputs.", lower_bound=1)
_MAX_NEW_TOKENS = flags.DEFINE_integer(
    "max_new_tokens", None, "Response cap per generation (default: each benchmark's own; BFCL, API-Bank and Bamboogle "
    "4096 as the originals, held-out 1024 as training). A generation gets min(cap, context - prompt) tokens.",
    lower_bound=1)
_CONTEXT_TOKENS = flags.DEFINE_integer(
    "context_tokens", None, "Prompt + response limit (default: BFCL and held-out the model's window, "
    "max_position_embeddings; API-Bank and Bamboogle 4096, the originals' vLLM max_model_len).", lower_bound=2)
_LONG_PROMPTS = flags.DEFINE_enum("long_prompts", "truncate", list(LONG_PROMPT_POLICIES),
                                  "A prompt that leaves no room for a response: left-truncate it and flag the item "
                                  "(counted in the summary), or stop with an error.")
_BAMBOOGLE_PROTOCOL = flags.DEFINE_enum("bamboogle_protocol", "toolrl", list(suite.BAMBOOGLE_PROTOCOLS),
                                        "toolrl: the paper's (web search + LLM judge); offline: BM25 over "
                                        "--search_corpus and EM/F1 (not comparable to the paper).")
_SEARCH_BACKEND = flags.DEFINE_enum("search_backend", "bm25", ["bm25", "http"], "Offline protocol's search backend.")
_SEARCH_CORPUS = flags.DEFINE_string("search_corpus", None, "Corpus file for --search_backend=bm25.")
_SEARCH_ENDPOINT = flags.DEFINE_string("search_endpoint", None, "Web search URL (toolrl protocol: a Serper-compatible "
                                       f"POST API, default {search.SERPER_ENDPOINT}; offline: a GET API for "
                                       "--search_backend=http).")
_SEARCH_API_KEY = flags.DEFINE_string("search_api_key", None, "Web search API key (sent as X-API-KEY for the toolrl "
                                      "protocol).")
_JUDGE_BASE_URL = flags.DEFINE_string("judge_base_url", OPENAI_BASE_URL, "OpenAI-compatible API of the Bamboogle judge "
                                      "({base_url}/chat/completions).")
_JUDGE_MODEL = flags.DEFINE_string("judge_model", DEFAULT_JUDGE_MODEL, "Bamboogle judge model (the paper: gpt-4o).")
_JUDGE_API_KEY = flags.DEFINE_string("judge_api_key", None, "Bamboogle judge API key (sent as a Bearer token).")
_REQUEST_TIMEOUT = flags.DEFINE_float("request_timeout_s", 60.0, "Timeout of one search / judge request.",
                                      lower_bound=0.001)
_REQUEST_RETRIES = flags.DEFINE_integer("request_retries", 5, "Retries of a search / judge request after a timeout, "
                                        "HTTP 429 / 5xx or a malformed reply.", lower_bound=0)
_REQUEST_BACKOFF = flags.DEFINE_float("request_backoff_s", 2.0, "First retry delay; doubles each retry (max 60 s).",
                                      lower_bound=0)
_BAMBOOGLE_ROUNDS = flags.DEFINE_integer("bamboogle_max_rounds", 4, "Generations per Bamboogle question.",
                                         lower_bound=1)
_BAMBOOGLE_F1 = flags.DEFINE_float("bamboogle_f1_threshold", 0.5, "Offline protocol's judge: EM or F1 >= this.")
_ENV_TASKS = flags.DEFINE_string("env_tasks", None, "--benchmarks=env_synthetic: a task file (JSONL; default: "
                                 "--env_count generated held-out tasks of the synthetic environment).")
_ENV_COUNT = flags.DEFINE_integer("env_count", 64, "env_synthetic: generated held-out tasks.", lower_bound=1)
_ENV_CATEGORIES = flags.DEFINE_list("env_categories", ["multi_turn_base"], "env_bfcl: BFCL v3 multi-turn "
                                    "categories run through the training environment.")
_ENV_MAX_TURNS = flags.DEFINE_integer("env_max_turns", 8, "env_*: assistant turns per trajectory.", lower_bound=1)
_ENV_TURN_TOKENS = flags.DEFINE_integer("env_turn_tokens", 256, "env_*: new tokens per turn.", lower_bound=1)
_ENV_TOTAL_TOKENS = flags.DEFINE_integer("env_total_tokens", 2048, "env_*: model and tool tokens per trajectory.",
                                         lower_bound=1)
_ENV_PROMPT_STYLE = flags.DEFINE_enum("env_prompt_style", "compact", ["toolrl", "compact", "minimal", "hermes"],
                                      "env_synthetic: the environment's prompt style (as trained).")
_HELDOUT_DATA = flags.DEFINE_list("heldout_data", [], "Held-out tool-call files for --benchmarks=heldout: ToolRL "
                                  "parquet/JSON, or xLAM / Hammer style JSON/JSONL.")


def config_from_flags() -> suite.EvalConfig:
    """The run configuration from the parsed flags (raises app.UsageError on bad combinations)."""
    for flag in (_BENCH_DIR, _OUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    if not Path(_BENCH_DIR.value).is_dir():
        raise app.UsageError(f"--bench_dir {_BENCH_DIR.value} is not a folder")
    if _PROMPT_TEMPLATE.value and not Path(_PROMPT_TEMPLATE.value).is_file():
        raise app.UsageError(f"--prompt_template {_PROMPT_TEMPLATE.value} is not a file")
    if "heldout" in _BENCHMARKS.value and not _HELDOUT_DATA.value:
        raise app.UsageError("--benchmarks=heldout needs --heldout_data=PATH[,PATH]")
    bad_suffix = [path for path in _HELDOUT_DATA.value if Path(path).suffix not in heldout.SUFFIXES]
    if bad_suffix:
        raise app.UsageError(f"--heldout_data {bad_suffix}: expected files ending in {heldout.SUFFIXES}")
    try:
        return suite.EvalConfig(
            bench_dir=_BENCH_DIR.value, out_dir=_OUT.value, benchmarks=tuple(_BENCHMARKS.value),
            bfcl_categories=tuple(_CATEGORIES.value), limit=_LIMIT.value, batch_size=_BATCH_SIZE.value,
            system_template=_PROMPT_TEMPLATE.value, max_new_tokens=_MAX_NEW_TOKENS.value,
            context_tokens=_CONTEXT_TOKENS.value, long_prompts=_LONG_PROMPTS.value,
            bamboogle_protocol=_BAMBOOGLE_PROTOCOL.value, bamboogle_max_rounds=_BAMBOOGLE_ROUNDS.value,
            bamboogle_f1_threshold=_BAMBOOGLE_F1.value, heldout_data=tuple(_HELDOUT_DATA.value),
            model_name=_MODEL.value or "", environments=EnvEvalConfig(
                tasks=_ENV_TASKS.value, count=_ENV_COUNT.value, categories=tuple(_ENV_CATEGORIES.value),
                max_turns=_ENV_MAX_TURNS.value, turn_tokens=_ENV_TURN_TOKENS.value,
                total_tokens=_ENV_TOTAL_TOKENS.value, prompt_style=_ENV_PROMPT_STYLE.value))
    except ValueError as error:
        raise app.UsageError(str(error)) from error


def offline_search_from_flags() -> search.SearchBackend:
    """The offline protocol's search backend."""
    if _SEARCH_BACKEND.value == "bm25":
        if not _SEARCH_CORPUS.value:
            raise app.UsageError("Bamboogle with --bamboogle_protocol=offline --search_backend=bm25 needs "
                                 "--search_corpus (a local corpus file)")
        return search.BM25Search.from_file(_SEARCH_CORPUS.value)
    if not _SEARCH_ENDPOINT.value:
        raise app.UsageError("--search_backend=http needs --search_endpoint")
    if not _SEARCH_API_KEY.value:
        raise app.UsageError("--search_backend=http needs --search_api_key (no key is bundled)")
    return search.HttpSearch(_SEARCH_ENDPOINT.value, _SEARCH_API_KEY.value)


def services_from_flags(config: suite.EvalConfig) -> dict:
    """Bamboogle's search backend / web search and judge, as keyword arguments of ``suite.run_evaluation``.

    The paper's protocol with neither key configured returns none of them (Bamboogle is then skipped with a
    notice); with only one of the two keys it is a usage error.
    """
    if "bamboogle" not in config.benchmarks:
        return {}
    if config.bamboogle_protocol == "offline":
        return {"search": offline_search_from_flags()}
    keys = {"--search_api_key": _SEARCH_API_KEY.value, "--judge_api_key": _JUDGE_API_KEY.value}
    if not any(keys.values()):
        return {}
    missing = [name for name, value in keys.items() if not value]
    if missing:
        raise app.UsageError(f"Bamboogle's paper protocol needs both a web search and a judge key: {missing[0]} is "
                             f"missing (or leave out both keys to skip Bamboogle)")
    http = HttpConfig(timeout_s=_REQUEST_TIMEOUT.value, retries=_REQUEST_RETRIES.value,
                      backoff_s=_REQUEST_BACKOFF.value)
    return {"web_search": search.SerperSearch(_SEARCH_API_KEY.value, _SEARCH_ENDPOINT.value or search.SERPER_ENDPOINT,
                                              http),
            "judge": LlmJudge(_JUDGE_API_KEY.value, _JUDGE_BASE_URL.value, _JUDGE_MODEL.value, http)}


def generator_from_flags() -> Generator:
    """Greedy JAX generation with --model, loaded as training loads it."""
    from experiments.common import load_model_and_tokenizer

    _, model, tokenizer, _ = load_model_and_tokenizer()
    return SamplerGenerator(model, tokenizer, SamplerGeneratorConfig(engine=_ENGINE.value, slots=_SLOTS.value,
                                                                        decode_windows=_WINDOWS.value))


def check_model_flags() -> None:
    """--model names something the loader can load and --context_tokens fits its window (raises app.UsageError
    naming the flag; reads the model's config only, no weights)."""
    model = _MODEL.value
    if not model:
        raise app.UsageError("--model is required")
    if model.startswith("preset:"):
        if model.split(":", 1)[1] not in PRESETS or not FLAGS.tokenizer:
            raise app.UsageError(f"--model={model}: needs a known preset ({sorted(PRESETS)}) and --tokenizer=FOLDER")
    elif model != "smollm2" and not (Path(model) / "config.json").is_file():
        raise app.UsageError(f"--model={model}: not 'smollm2', 'preset:NAME' or a folder with config.json")
    from experiments.common import locate_model

    window = locate_model()[0].max_position_embeddings
    if _CONTEXT_TOKENS.value and _CONTEXT_TOKENS.value > window:
        raise app.UsageError(f"--context_tokens={_CONTEXT_TOKENS.value} is larger than the model's window ({window})")


def run(generator: Generator | None = None) -> dict:
    """Run the evaluation the flags describe; ``generator`` defaults to --model (tests pass a fake one).

    Flags, services and every benchmark file are checked before the model is loaded.
    """
    config = config_from_flags()
    if generator is None:
        check_model_flags()
    services = services_from_flags(config)
    try:
        suite.check_files(config, bamboogle_runs=suite.runs_bamboogle(config, services.get("web_search"),
                                                                      services.get("judge")))
    except FileNotFoundError as error:
        raise app.UsageError(f"--bench_dir / --heldout_data: {error}") from error
    return suite.run_evaluation(generator or generator_from_flags(), config, **services)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    run()
    print((Path(_OUT.value) / "summary.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    app.run(main)
