"""Benchmark: rollout sampling throughput (new tokens/s) and peak memory, our jitted sampler vs Hugging Face
`generate`, side by side on the same device with the same random weights.

    python -m experiments.bench_sampling [--model=qwen2.5-1.5b] [--batch_sizes=64,256] [--prompt_len=512] \
        [--new_tokens=256] [--skip_hf] [--json_out=bench_sampling.json]
    python -m experiments.bench_sampling --model=tiny --batch_sizes=2 --prompt_len=8 --new_tokens=4   # CPU smoke

Every response is forced to exactly --new_tokens tokens (our `ignore_stop`, HF's `min_new_tokens`), so both sides
do the same work. Each measurement runs in its own subprocess of this script (`--worker=...`), so peak-memory
figures are per workload and the two frameworks never share an allocator: first a JAX process draws random weights
(bf16 by default) and saves them as a Hugging Face folder, then for every batch size a JAX process and a PyTorch
process load that folder and time sampling on random prompt tokens (identical prompts on both sides).

Reported per (implementation, batch): wall time of one generate call after a warm-up call (compilation excluded,
reported separately), new tokens/s = batch * new_tokens / time, and for ours the time of a 1-token call (prefill
+ first token), from which the decode-only rate follows. Peak memory: device peak bytes (GPU), else the process's
peak resident set size (CPU).

`--workload=long_tail` measures rollouts whose rows have their own lengths, the case continuous batching is for:

    python -m experiments.bench_sampling --workload=long_tail --model=smollm2-135m --dtype=float32 --rows=64 \
        --group_size=4 --slots=16 --prompt_len=64 --new_tokens=1024 --length_dist=toolrl

Row i is forced to exactly L_i new tokens (per-row budgets, stop tokens ignored), L_i drawn from `--length_dist`:
`toolrl` is the log-normal fitted to the token lengths of ToolRL's 400 SFT reference answers (Qwen2.5 tokenizer:
mean 370, median 363, 95th percentile 568, max 924; log-mean 5.854, log-sd 0.352; tests/test_sampling_bench.py
re-fits it from ../shared), `lognormal` takes `--length_mean` and `--length_sigma`; lengths are clipped to
[1, --new_tokens]. Side by side, each in its own process: our continuous engine with `--slots` slots (with its
attention windows, and attending over the whole cache: `continuous_full`), our static engine in batches of the slot
count (equal KV memory) and with all rows in one batch, and Hugging Face `generate` in batches of the slot count (a
logits processor forces each row's end). Reported: wall time after a compiling warm-up, useful tokens/s (sum of
L_i / time), row-steps computed per useful token (1 = no step spent on a finished row or an idle slot), cache
columns a row-step attends over, KV cache bytes, peak memory.
"""
from __future__ import annotations

import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from absl import app, flags

from experiments.tools.rollout_lengths import (
    dynamic_cache_columns,
    row_steps_static,
    schedule_model,
    tail_lengths,
)
from toolrl_jax.metrics import median_seconds

_MODEL = flags.DEFINE_string("model", "qwen2.5-1.5b", "A preset name from toolrl_jax.models.config.PRESETS, or "
                             "'tiny' (ModelConfig.tiny, for CPU smoke tests).")
_BATCH = flags.DEFINE_list("batch_sizes", ["64", "256"], "Sequences per generate call (one row per prompt).")
_PROMPT = flags.DEFINE_integer("prompt_len", 512, "Prompt tokens per sequence (random ids, no padding).")
_NEW = flags.DEFINE_integer("new_tokens", 256, "New tokens per sequence (forced: stop tokens are ignored).")
_TEMP = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0 = greedy).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights and compute dtype, both sides.")
_ATTN = flags.DEFINE_enum("attention_impl", "xla", ["xla", "cudnn"], "Our attention kernel.")
_HF_ATTN = flags.DEFINE_string("hf_attn", "sdpa", "transformers attn_implementation.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed generate calls per workload (median reported).")
_PREFILL = flags.DEFINE_bool("measure_prefill", True, "Also time a 1-new-token call of ours (one more compile).")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "Only benchmark our sampler.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights, prompts and sampling.")
_JSON = flags.DEFINE_string("json_out", "bench_sampling.json", "Write all figures here.")
_WORKLOAD = flags.DEFINE_enum("workload", "fixed", ["fixed", "long_tail"], "fixed: every row makes --new_tokens "
                              "tokens, per --batch_sizes; long_tail: per-row lengths from --length_dist (engines "
                              "side by side).")
_FIXED_ENGINE = flags.DEFINE_enum("engine", "static", ["static", "continuous"], "fixed: our engine (every row has "
                                   "the same length, so both do the same work; continuous uses batch-many slots).")
_ROWS = flags.DEFINE_integer("rows", 64, "long_tail: rows per rollout (prompts x --group_size).")
_GROUP = flags.DEFINE_integer("group_size", 4, "long_tail: responses per prompt (GRPO group; one prefill each).")
_SLOTS = flags.DEFINE_integer("slots", 16, "long_tail: decode slots of the continuous engine; the static engine's "
                              "equal-memory batches have this many rows.")
_LENGTH_DIST = flags.DEFINE_enum("length_dist", "toolrl", ["toolrl", "lognormal"], "long_tail: per-row lengths.")
_LENGTH_MEAN = flags.DEFINE_float("length_mean", 370.0, "long_tail, lognormal: mean tokens per row.")
_LENGTH_SIGMA = flags.DEFINE_float("length_sigma", 0.35, "long_tail, lognormal: standard deviation of log length.")
_ENGINES = flags.DEFINE_list("engines", ["continuous", "continuous_full", "static_slots", "static_all", "hf"],
                            "long_tail: what to measure (continuous, continuous_full: the continuous engine with "
                            "every decode step attending over its whole KV cache, static_slots, static_all, hf).")
_WINDOWS = flags.DEFINE_integer("decode_windows", 4, "long_tail: attention window sizes of the continuous engine's "
                                "decode calls (Sampler decode_windows).", lower_bound=1)
_MIN_WINDOW = flags.DEFINE_integer("min_decode_window", 128, "long_tail: the narrowest attention window used (Sampler "
                                   "min_decode_window).", lower_bound=1)
_MODEL_SLOTS = flags.DEFINE_list("schedule_slots", ["16", "64", "256"], "long_tail: slot counts of the schedule "
                                 "model (row-steps of both engines, replayed on --schedule_rows lengths).")
_MODEL_ROWS = flags.DEFINE_integer("schedule_rows", 2048, "long_tail: rows of the schedule model (ToolRL: 512 x 4).")
# Internal: how the parent process hands work to its workers.
_WORKER = flags.DEFINE_enum("worker", None, ["init", "jax", "hf", "tail"], "Internal: run one measurement and exit.")
_WORKER_ENGINE = flags.DEFINE_string("worker_engine", None, "Internal: the long_tail engine a worker measures.")
_WEIGHTS = flags.DEFINE_string("weights_dir", None, "Internal: Hugging Face folder with the shared weights.")
_WORKER_BATCH = flags.DEFINE_integer("worker_batch", None, "Internal: the batch size a worker measures.")
_WORKER_JSON = flags.DEFINE_string("worker_json", None, "Internal: where a worker writes its result.")
_PROBE = flags.DEFINE_string("probe_file", None, "Internal: our first sampled row, re-scored by the HF worker.")


def _model_config():
    from experiments.common import named_model_config

    return named_model_config(_MODEL.value).replace(dtype=_DTYPE.value, param_dtype=_DTYPE.value,
                                                    attention_impl=_ATTN.value)


def _prompts(batch: int, vocab: int) -> list[list[int]]:
    """Identical random prompts for both frameworks (ids above 1000 avoid special tokens of real vocabularies)."""
    import numpy as np

    low = 1000 if vocab > 2000 else 3
    rng = np.random.default_rng(_SEED.value + batch)
    return rng.integers(low, vocab, size=(batch, _PROMPT.value)).tolist()


def _host_peak_bytes() -> int:
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ---------------------------------------------------------------------------------------------- workers
def _worker_init() -> dict[str, Any]:
    """Random weights drawn on the default JAX device, saved as a HF folder both frameworks load."""
    import jax
    from flax import nnx

    from toolrl_jax.models.decoder import CausalLM
    from toolrl_jax.models.hf_io import save_hf_model

    config = _model_config()
    start = time.perf_counter()
    model = CausalLM(config, rngs=nnx.Rngs(_SEED.value))
    save_hf_model(model, _WEIGHTS.value, dtype=_DTYPE.value)
    return {"init_s": time.perf_counter() - start, "num_params": config.num_params,
            "device": jax.devices()[0].device_kind}


def _worker_jax(batch: int) -> dict[str, Any]:
    import jax
    import numpy as np

    from toolrl_jax.models.hf_io import load_hf_model
    from toolrl_jax.sampling import Sampler, SamplingConfig

    _, model = load_hf_model(_WEIGHTS.value, dtype=_DTYPE.value, param_dtype=_DTYPE.value,
                             attention_impl=_ATTN.value)
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    sampler = Sampler(model, pad_id=pad, stop_token_ids=config.eos_token_ids, engine=_FIXED_ENGINE.value,
                      slots=batch)
    del model
    prompts = _prompts(batch, config.vocab_size)
    cfg = SamplingConfig(max_new_tokens=_NEW.value, temperature=_TEMP.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
                         ignore_stop=True, prompt_length_buckets=(_PROMPT.value,), batch_buckets=(batch,))
    key = jax.random.key(_SEED.value)

    def run(c):
        return sampler.generate(prompts, c, key)

    start = time.perf_counter()
    out = run(cfg)
    compile_s = time.perf_counter() - start
    if not (out.lengths == _NEW.value).all() or out.response_ids.shape != (batch, _NEW.value):
        raise RuntimeError(f"expected {batch} x {_NEW.value} forced tokens, got lengths {np.unique(out.lengths)}")
    seconds = median_seconds(lambda: run(cfg), _REPEATS.value)
    result: dict[str, Any] = {
        "impl": "toolrl_jax", "batch": batch, "seconds": seconds, "compile_and_first_call_s": compile_s,
        "new_tokens_per_s": batch * _NEW.value / seconds, "mean_logprob": float(out.logprobs.mean()),
        "jax": jax.__version__}
    if _PREFILL.value and _NEW.value > 1:
        first = cfg.replace(max_new_tokens=1)
        run(first)
        prefill_s = median_seconds(lambda: run(first), _REPEATS.value)
        result["prefill_s"] = prefill_s
        result["decode_tokens_per_s"] = batch * (_NEW.value - 1) / max(seconds - prefill_s, 1e-9)
    result["compiles"] = sampler.compile_count
    if _PROBE.value:  # the HF worker re-scores this row: same weights and our log-probs, checked at full size
        Path(_PROBE.value).write_text(json.dumps({
            "prompt": prompts[0], "response": out.response_ids[0].tolist(), "logprobs": out.logprobs[0].tolist()}))
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        result["peak_bytes"], result["peak_kind"] = int(stats["peak_bytes_in_use"]), "device"
    else:
        result["peak_bytes"], result["peak_kind"] = _host_peak_bytes(), "host_rss"
    result["device"] = jax.devices()[0].device_kind
    return result


def _hf_model():
    """(device, model, pad id) of the shared weights in PyTorch (the GPU when there is one)."""
    import torch
    import transformers

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[_DTYPE.value]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        _WEIGHTS.value, dtype=dtype, attn_implementation=_HF_ATTN.value).to(device).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return device, model, pad


def _torch_peak(device) -> dict[str, Any]:
    """PyTorch's peak: device bytes on a GPU, else the process's peak RSS."""
    import torch

    if device.type == "cuda":
        return {"peak_bytes": int(torch.cuda.max_memory_allocated()), "peak_kind": "device",
                "device": torch.cuda.get_device_name()}
    return {"peak_bytes": _host_peak_bytes(), "peak_kind": "host_rss", "device": "cpu"}


def _worker_hf(batch: int) -> dict[str, Any]:
    import torch
    import transformers

    device, model, pad = _hf_model()
    config = model.config
    ids = torch.tensor(_prompts(batch, config.vocab_size), dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    sampling = dict(do_sample=True, temperature=_TEMP.value, top_p=_TOP_P.value, top_k=_TOP_K.value) \
        if _TEMP.value > 0 else dict(do_sample=False)

    def run(new_tokens: int):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=pad, **sampling)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    torch.manual_seed(_SEED.value)
    run(min(8, _NEW.value))  # warm-up: kernels, allocator, cache classes
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = run(_NEW.value)
    if tuple(out.shape) != (batch, _PROMPT.value + _NEW.value):
        raise RuntimeError(f"HF generate returned shape {tuple(out.shape)}, expected "
                           f"{(batch, _PROMPT.value + _NEW.value)}")
    seconds = median_seconds(lambda: run(_NEW.value), max(1, _REPEATS.value - 1))
    result: dict[str, Any] = {"impl": "hf_generate", "batch": batch, "seconds": seconds,
              "new_tokens_per_s": batch * _NEW.value / seconds, "torch": torch.__version__,
              "transformers": transformers.__version__}
    if _PROBE.value and Path(_PROBE.value).is_file():
        result["logprob_check"] = _rescore_probe(model, device)
    return {**result, **_torch_peak(device)}


def _rescore_probe(model, device) -> dict[str, float]:
    """|our sampler's log-probs - HF's teacher-forced log-probs| on the JAX worker's first sampled row."""
    import torch

    probe = json.loads(Path(_PROBE.value).read_text())
    prompt, response = probe["prompt"], probe["response"]
    ids = torch.tensor([prompt + response], dtype=torch.long, device=device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    theirs = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])[:, 0].cpu().numpy()
    diff = abs(theirs - torch.tensor(probe["logprobs"]).numpy())
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "mean_logprob_hf": float(theirs.mean())}


# ---------------------------------------------------------------------------------------------- long-tailed workload
def _tail_workload():
    """(prompts, per-row lengths) of the long-tailed workload, identical in every worker."""
    from experiments.common import named_model_config

    config = named_model_config(_MODEL.value)
    prompts = _prompts(_ROWS.value // _GROUP.value, config.vocab_size)
    lengths = tail_lengths(_ROWS.value, _NEW.value, _LENGTH_DIST.value, _LENGTH_MEAN.value, _LENGTH_SIGMA.value,
                           _SEED.value)
    return prompts, lengths


def _peak() -> tuple[int, str]:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device"
    return _host_peak_bytes(), "host_rss"


def _worker_tail(engine: str) -> dict[str, Any]:
    """One of our engines on the long-tailed workload, after a warm-up call with the same shapes (2-token rows)."""
    import jax
    import numpy as np

    from experiments.tools.memory_model import kv_cache_bytes_per_token
    from toolrl_jax.models.hf_io import load_hf_model
    from toolrl_jax.sampling import Sampler, SamplingConfig

    _, model = load_hf_model(_WEIGHTS.value, dtype=_DTYPE.value, param_dtype=_DTYPE.value,
                             attention_impl=_ATTN.value)
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    prompts, lengths = _tail_workload()
    n, slots = _GROUP.value, _SLOTS.value
    per_batch = len(prompts) if engine == "static_all" else slots // n
    continuous = engine.startswith("continuous")
    sampler = Sampler(model, pad_id=pad, stop_token_ids=config.eos_token_ids,
                      engine="continuous" if continuous else "static", slots=slots,
                      decode_windows=1 if engine == "continuous_full" else _WINDOWS.value,
                      min_decode_window=_MIN_WINDOW.value)
    del model
    cfg = SamplingConfig(max_new_tokens=_NEW.value, temperature=_TEMP.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
                         group_size=n, ignore_stop=True, prompt_length_buckets=(_PROMPT.value,),
                         batch_buckets=(per_batch,))
    key = jax.random.key(_SEED.value)
    start = time.perf_counter()
    sampler.generate(prompts, cfg, key, max_new_tokens=np.minimum(lengths, 2))
    warmup_s = time.perf_counter() - start
    compiles = sampler.compile_count
    start = time.perf_counter()
    out = sampler.generate(prompts, cfg, key, max_new_tokens=lengths)
    seconds = time.perf_counter() - start
    if not (out.lengths == lengths).all():
        raise RuntimeError(f"{engine}: rows did not stop at their budgets")
    if sampler.compile_count != compiles:
        raise RuntimeError(f"{engine}: the timed call compiled again ({compiles} -> {sampler.compile_count})")
    useful = int(lengths.sum())
    columns = _PROMPT.value + _NEW.value
    if continuous:
        stats = sampler._continuous.last_stats
        row_steps, cached_rows = stats.row_steps + len(lengths), stats.slots
        attended = stats.attended_columns / stats.row_steps
        from toolrl_jax.sampling.scheduler import RefillPolicy, simulate_continuous
        if simulate_continuous(lengths, RefillPolicy(stats.slots, n)) != (stats.decode_steps, stats.row_steps):
            raise RuntimeError("the schedule model's decode steps differ from the engine's")
    else:
        row_steps, cached_rows, attended = row_steps_static(lengths, per_batch * n), per_batch * n, columns
    peak, kind = _peak()
    return {"impl": engine, "rows": len(lengths), "seconds": seconds, "warmup_s": warmup_s,
            "useful_tokens": useful, "useful_tokens_per_s": useful / seconds,
            "row_steps_per_useful_token": row_steps / useful, "attended_columns_per_row_step": attended,
            "kv_cache_bytes": int(cached_rows * columns * kv_cache_bytes_per_token(
                config, sampler.cache_dtype)),
            "mean_logprob": float(out.logprobs[out.response_mask.astype(bool)].mean()),
            "peak_bytes": peak, "peak_kind": kind, "device": jax.devices()[0].device_kind}


def _worker_tail_hf() -> dict[str, Any]:
    """Hugging Face `generate` on the long-tailed workload, in batches of --slots rows; a logits processor makes
    each row end with EOS exactly at its length (so finished rows are padded while the batch runs on)."""
    import numpy as np
    import torch
    import transformers

    device, model, pad = _hf_model()
    config = model.config
    eos = config.eos_token_id[0] if isinstance(config.eos_token_id, list) else config.eos_token_id
    prompts, lengths = _tail_workload()
    rows = np.repeat(np.asarray(prompts), _GROUP.value, axis=0)

    class EndAtLength(transformers.LogitsProcessor):
        def __init__(self, budgets: np.ndarray):
            self.budgets = torch.tensor(budgets, device=device)

        def __call__(self, input_ids, scores):
            made = input_ids.shape[1] - _PROMPT.value
            end = self.budgets - 1 == made
            scores[~end, eos] = -float("inf")
            scores[end] = -float("inf")
            scores[end, eos] = 0.0
            return scores

    sampling = dict(do_sample=True, temperature=_TEMP.value, top_p=_TOP_P.value, top_k=_TOP_K.value) \
        if _TEMP.value > 0 else dict(do_sample=False)

    def run(budgets: np.ndarray) -> int:
        made = 0
        for i in range(0, len(rows), _SLOTS.value):
            ids = torch.tensor(rows[i:i + _SLOTS.value], dtype=torch.long, device=device)
            part = budgets[i:i + _SLOTS.value]
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(part.max()),
                                     eos_token_id=eos, pad_token_id=pad,
                                     logits_processor=transformers.LogitsProcessorList([EndAtLength(part)]),
                                     **sampling)
            new = out[:, _PROMPT.value:].cpu().numpy()
            ends = np.argmax(new == eos, axis=1) + 1
            if not (ends == part).all():
                raise RuntimeError(f"HF rows ended at {ends[:8]}, wanted {part[:8]}")
            made += int(ends.sum())
        if device.type == "cuda":
            torch.cuda.synchronize()
        return made

    torch.manual_seed(_SEED.value)
    start = time.perf_counter()
    run(np.minimum(lengths, 2))
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    useful = run(lengths)
    seconds = time.perf_counter() - start
    result = {"impl": "hf_generate", "rows": len(lengths), "seconds": seconds, "warmup_s": warmup_s,
              "useful_tokens": useful, "useful_tokens_per_s": useful / seconds,
              "row_steps_per_useful_token": row_steps_static(lengths, _SLOTS.value) / useful,
              "attended_columns_per_row_step": dynamic_cache_columns(lengths, _SLOTS.value, _PROMPT.value),
              "torch": torch.__version__, "transformers": transformers.__version__}
    return {**result, **_torch_peak(device)}


def _tail_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| engine | useful tokens/s | s / rollout | row-steps per useful token | attended columns per row-step "
             "| KV cache | peak memory | warm-up s |", "|" + "---|" * 8]
    for r in rows:
        kv = "-" if "kv_cache_bytes" not in r else f"{r['kv_cache_bytes'] / 2 ** 20:,.0f} MiB"
        mem = f"{r['peak_bytes'] / 2 ** 30:.2f} GiB ({'dev' if r['peak_kind'] == 'device' else 'rss'})"
        lines.append(f"| {r['impl']} | {r['useful_tokens_per_s']:,.0f} | {r['seconds']:.1f} | "
                     f"{r['row_steps_per_useful_token']:.2f} | {r['attended_columns_per_row_step']:,.0f} | {kv} | "
                     f"{mem} | {r['warmup_s']:.1f} |")
    return "\n".join(lines)


def _parent_tail() -> None:
    config = _model_config()
    engines = list(_ENGINES.value)
    unknown = sorted(set(engines) - {"continuous", "continuous_full", "static_slots", "static_all", "hf"})
    if unknown:
        raise app.UsageError(f"--engines: unknown {unknown}")
    if _ROWS.value % _GROUP.value or _SLOTS.value % _GROUP.value or _SLOTS.value < _GROUP.value:
        raise app.UsageError(f"--rows ({_ROWS.value}) and --slots ({_SLOTS.value}) must be multiples of --group_size "
                             f"({_GROUP.value}), and --slots >= --group_size")
    if _PROMPT.value + _NEW.value > config.max_position_embeddings:
        raise app.UsageError(f"--prompt_len + --new_tokens exceeds the model's {config.max_position_embeddings} "
                             "positions")
    _, lengths = _tail_workload()
    scratch = Path(tempfile.mkdtemp(prefix="bench_sampling_"))
    try:
        weights = scratch / "weights"
        init = _spawn("init", weights, scratch)
        rows = [_spawn("tail", weights, scratch, engine=engine) for engine in engines]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    by_impl = {r["impl"]: r for r in rows}
    if "continuous" in by_impl:
        for r in rows:
            r["continuous_speedup"] = by_impl["continuous"]["useful_tokens_per_s"] / r["useful_tokens_per_s"]
    model_lengths = tail_lengths(_MODEL_ROWS.value, _NEW.value, _LENGTH_DIST.value, _LENGTH_MEAN.value,
                                 _LENGTH_SIGMA.value, _SEED.value)
    schedule = [schedule_model(model_lengths, _GROUP.value, int(slots)) for slots in _MODEL_SLOTS.value]
    report = {"workload": "long_tail", "model": _MODEL.value, "num_params": init["num_params"], "dtype": _DTYPE.value,
              "device": init["device"], "rows": _ROWS.value, "group_size": _GROUP.value, "slots": _SLOTS.value,
              "prompt_len": _PROMPT.value, "max_new_tokens": _NEW.value, "length_dist": _LENGTH_DIST.value,
              "length_mean": float(lengths.mean()), "length_max": int(lengths.max()),
              "temperature": _TEMP.value, "results": rows, "schedule_model": schedule}
    print(f"\nmodel {_MODEL.value} ({init['num_params'] / 1e9:.3f} B params, {_DTYPE.value}) on {init['device']}; "
          f"{_ROWS.value} rows ({_GROUP.value} per prompt) of prompt {_PROMPT.value} + lengths from "
          f"{_LENGTH_DIST.value} (mean {lengths.mean():.0f}, max {lengths.max()}, budget {_NEW.value}); "
          f"{_SLOTS.value} slots\n")
    print(_tail_table(rows))
    for r in rows:
        if r["impl"] != "continuous" and "continuous_speedup" in r:
            print(f"continuous engine: {r['continuous_speedup']:.2f}x the useful tokens/s of {r['impl']}")
    print(f"\nschedule model, {_MODEL_ROWS.value} rows of the same distribution (row-steps per useful token; the "
          "static engine in batches of the slot count):\n")
    print("| slots | continuous | static | static / continuous |\n|---|---|---|---|")
    for m in schedule:
        print(f"| {m['slots']} | {m['continuous']:.2f} | {m['static']:.2f} | {m['speedup']:.2f} |")
    if _JSON.value:
        Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)
        Path(_JSON.value).write_text(json.dumps(report, indent=2))
        print(f"wrote {_JSON.value}")


# ---------------------------------------------------------------------------------------------- parent
def _spawn(worker: str, weights_dir: Path, scratch: Path, batch: int | None = None,
           engine: str | None = None) -> dict[str, Any]:
    out = scratch / f"{worker}_{batch}_{engine}.json"
    cmd = [sys.executable, "-m", "experiments.bench_sampling", f"--worker={worker}", f"--weights_dir={weights_dir}",
           f"--worker_json={out}", f"--probe_file={scratch / f'probe_{batch}.json'}"] + _serialized_flags()
    if batch is not None:
        cmd.append(f"--worker_batch={batch}")
    if engine is not None:
        cmd.append(f"--worker_engine={engine}")
    print(f"[bench_sampling] running {worker} worker" + (f" (batch {batch})" if batch else "") +
          (f" ({engine})" if engine else ""), flush=True)
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} worker (batch {batch}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def _serialized_flags() -> list[str]:
    names = ("model", "prompt_len", "new_tokens", "temperature", "top_p", "top_k", "dtype", "attention_impl",
             "hf_attn", "repeats", "measure_prefill", "seed", "engine", "rows", "group_size", "slots", "length_dist",
             "length_mean", "length_sigma", "decode_windows",
             "min_decode_window")
    return [flags.FLAGS[name].serialize() for name in names]


def _table(rows: list[dict[str, Any]]) -> str:
    header = ("| batch | implementation | new tokens/s | s / call | prefill s | decode tokens/s | peak memory | "
              "first call s |")
    lines = [header, "|" + "---|" * 8]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        peak = r.get("peak_bytes")
        mem = "-" if peak is None else f"{peak / 2 ** 30:.2f} GiB ({'dev' if r['peak_kind'] == 'device' else 'rss'})"
        lines.append(f"| {r['batch']} | {r['impl']} | {fmt(r['new_tokens_per_s'], ',.0f')} | {fmt(r['seconds'], '.3f')}"
                     f" | {fmt(r.get('prefill_s'), '.3f')} | {fmt(r.get('decode_tokens_per_s'), ',.0f')} | {mem} | "
                     f"{fmt(r.get('compile_and_first_call_s'), '.1f')} |")
    return "\n".join(lines)


def _parent() -> None:
    config = _model_config()
    batches = [int(b) for b in _BATCH.value]
    if any(b < 1 for b in batches) or _PROMPT.value < 1 or _NEW.value < 1 or _REPEATS.value < 1:
        raise app.UsageError("--batch_sizes, --prompt_len, --new_tokens and --repeats must be positive")
    if _PROMPT.value + _NEW.value > config.max_position_embeddings:
        raise app.UsageError(f"--prompt_len + --new_tokens exceeds the model's {config.max_position_embeddings} "
                             "positions")
    scratch = Path(tempfile.mkdtemp(prefix="bench_sampling_"))
    try:
        weights = scratch / "weights"
        init = _spawn("init", weights, scratch)
        rows = []
        for batch in batches:
            rows.append(_spawn("jax", weights, scratch, batch))
            if not _SKIP_HF.value:
                rows.append(_spawn("hf", weights, scratch, batch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for batch in batches:
        ours = next(r for r in rows if r["batch"] == batch and r["impl"] == "toolrl_jax")
        hf = next((r for r in rows if r["batch"] == batch and r["impl"] == "hf_generate"), None)
        if hf:
            ours["speedup_vs_hf"] = ours["new_tokens_per_s"] / hf["new_tokens_per_s"]
    report = {
        "model": _MODEL.value, "num_params": init["num_params"], "dtype": _DTYPE.value, "device": init["device"],
        "prompt_len": _PROMPT.value, "new_tokens": _NEW.value, "temperature": _TEMP.value, "top_p": _TOP_P.value,
        "top_k": _TOP_K.value, "attention_impl": _ATTN.value, "results": rows,
    }
    print(f"\nmodel {_MODEL.value} ({init['num_params'] / 1e9:.3f} B params, {_DTYPE.value}) on {init['device']}; "
          f"prompt {_PROMPT.value} + {_NEW.value} forced new tokens, temperature {_TEMP.value}, top_p {_TOP_P.value}"
          f", top_k {_TOP_K.value}\n")
    print(_table(rows))
    for r in rows:
        if "speedup_vs_hf" in r:
            print(f"batch {r['batch']}: toolrl_jax is {r['speedup_vs_hf']:.1f}x HF generate")
        if "logprob_check" in r:
            check = r["logprob_check"]
            print(f"batch {r['batch']}: our sampled log-probs vs HF teacher-forced on the same tokens: max |diff| "
                  f"{check['max_abs_diff']:.3g}, mean {check['mean_abs_diff']:.3g} ({_DTYPE.value})")
    if _JSON.value:
        Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)
        Path(_JSON.value).write_text(json.dumps(report, indent=2))
        print(f"wrote {_JSON.value}")


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value is None:
        _parent_tail() if _WORKLOAD.value == "long_tail" else _parent()
        return
    if not _WEIGHTS.value or not _WORKER_JSON.value:
        raise app.UsageError("--worker needs --weights_dir and --worker_json")
    if _WORKER.value == "init":
        result = _worker_init()
    elif _WORKER.value == "jax":
        result = _worker_jax(_WORKER_BATCH.value)
    elif _WORKER.value == "tail":
        result = _worker_tail_hf() if _WORKER_ENGINE.value == "hf" else _worker_tail(_WORKER_ENGINE.value)
    else:
        result = _worker_hf(_WORKER_BATCH.value)
    Path(_WORKER_JSON.value).write_text(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
