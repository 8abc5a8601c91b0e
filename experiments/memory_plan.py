r"""Memory plan for GRPO: bytes per parameter and per token, per-device peak by phase, and a recommended mesh.

    python -m experiments.memory_plan --model=preset:qwen2.5-7b --devices=8 --device_memory_gib=80
    python -m experiments.memory_plan --model=preset:qwen2.5-3b --devices=1 --device_memory_gib=80 --remat \
        --micro_batch_rows=2 --rollout_prompts=16
    python -m experiments.memory_plan --model=/path/to/hf_folder --devices=4 --mesh=1,4,1   # one given mesh
    python -m experiments.memory_plan --model=preset:qwen2.5-7b --lora_rank=16 --lora_base_dtype=bfloat16  # LoRA

--model takes a preset (see toolrl_jax.models.config.PRESETS plus qwen2.5-14b/32b from
experiments.tools.memory_model) or a Hugging Face folder with config.json. The figures are estimates (docs/memory.md
says what they count and how they were checked); the peak counts the largest of the three phases of a GRPO step on
top of the persistent state.
"""
from __future__ import annotations

import json
from pathlib import Path

from absl import app, flags

from experiments.tools import memory_model as mm

_MODEL = flags.DEFINE_string("model", "preset:qwen2.5-1.5b", "preset:NAME, NAME, or a Hugging Face model folder.")
_DEVICES = flags.DEFINE_integer("devices", 1, "Number of accelerators.")
_MEM = flags.DEFINE_float("device_memory_gib", 80.0, "Memory per accelerator in GiB (H100: 80, H200: 141).")
_USABLE = flags.DEFINE_float("usable_fraction", 0.9,
                             "Fraction of device memory the plan may use (CUDA context, workspaces and fragmentation "
                             "take the rest; JAX's GPU default is 0.75 unless XLA_PYTHON_CLIENT_MEM_FRACTION says "
                             "otherwise).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["bfloat16", "float32"], "Master-weight dtype.")
_REMAT = flags.DEFINE_bool("remat", False, "Rematerialise decoder layers in the backward pass.")
_REMAT_POLICY = flags.DEFINE_enum("remat_policy", "full", ["full", "save_dots"],
                                  "What a rematerialised layer keeps (see ModelConfig.remat_policy).")
_ATTN = flags.DEFINE_enum("attention_impl", "xla", ["xla", "cudnn"], "Attention kernel.")
_MICRO = flags.DEFINE_integer("micro_batch_rows", 8, "Rows per gradient-accumulation micro-batch (global).")
_PROMPT = flags.DEFINE_integer("prompt_len", 2048, "Padded prompt tokens per row.")
_RESPONSE = flags.DEFINE_integer("response_len", 1024, "Response budget per row.")
_ROLLOUT = flags.DEFINE_integer("rollout_prompts", 64, "Prompts per generate call (GRPOTrainer: min(64, prompts)).")
_GROUP = flags.DEFINE_integer("group_size", 4, "Responses per prompt.")
_PREFILL = flags.DEFINE_integer("prefill_chunk", 512, "Prefill chunk (0 = whole prompt at once).")
_REFERENCE = flags.DEFINE_bool("reference", True, "Keep a reference copy of the weights (KL term on).")
_REFERENCE_COMPUTE = flags.DEFINE_bool("reference_in_compute_dtype", True,
                                       "The reference copy is kept in the compute dtype (GRPO's default).")
_HEAD_CHUNK = flags.DEFINE_integer("logits_chunk_size", 512,
                                   "Response positions per vocabulary projection (GRPO's default; 0 = all at once).")
_ACCUMULATION = flags.DEFINE_bool("grad_accumulation", True,
                                  "More than one micro-batch per update (mini-batch rows > micro_batch_rows): a "
                                  "separate gradient accumulator.")
_MU_DTYPE = flags.DEFINE_enum("adam_mu_dtype", None, ["float32", "bfloat16"],
                              "AdamW first-moment dtype (default: the parameter dtype).")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 0, "LoRA rank on every projection (0 = the weights train).")
_LORA_BASE = flags.DEFINE_enum("lora_base_dtype", None, ["float32", "bfloat16"],
                               "LoRA: the frozen base's dtype (default: --param_dtype).")
_MESH = flags.DEFINE_list("mesh", None, "Evaluate only this data,fsdp,tensor mesh instead of recommending one.")
_JSON = flags.DEFINE_string("json_out", None, "Also write the plan as JSON here.")


def _config():
    from toolrl_jax.models.config import ModelConfig

    name = _MODEL.value
    overrides = dict(dtype=_DTYPE.value, param_dtype=_PARAM_DTYPE.value, remat=_REMAT.value,
                     remat_policy=_REMAT_POLICY.value, attention_impl=_ATTN.value)
    if Path(name).is_dir() or name.endswith(".json"):
        try:
            return ModelConfig.from_hf(name, **overrides)
        except (FileNotFoundError, ValueError) as e:
            raise app.UsageError(f"--model={name}: {e}") from None
    try:
        return mm.model_config(name).replace(**overrides)
    except ValueError as e:
        raise app.UsageError(f"--model={name}: {e}") from None


def _setup() -> mm.GRPOMemorySetup:
    try:
        return mm.GRPOMemorySetup(
            micro_batch_rows=_MICRO.value, prompt_len=_PROMPT.value, response_len=_RESPONSE.value,
            rollout_prompts=_ROLLOUT.value, group_size=_GROUP.value, prefill_chunk=_PREFILL.value or None,
            reference=_REFERENCE.value, reference_in_compute_dtype=_REFERENCE_COMPUTE.value,
            logits_chunk_size=_HEAD_CHUNK.value or None, grad_accumulation=_ACCUMULATION.value,
            adam_mu_dtype=_MU_DTYPE.value, lora_rank=_LORA_RANK.value, lora_base_dtype=_LORA_BASE.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from None


def _breakdown(est: mm.MemoryEstimate) -> list[str]:
    gib = mm.format_bytes
    lines = [f"| state (all phases) | {gib(est.state_bytes)} | " +
             ", ".join(f"{k} {gib(v)}" for k, v in est.state.items() if v) + " |"]
    for phase in ("train", "logprob", "sampling"):
        parts = getattr(est, phase)
        lines.append(f"| + {phase} | {gib(sum(parts.values()))} | " +
                     ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v) + " |")
    lines.append(f"| **peak ({est.peak_phase})** | **{gib(est.peak_bytes)}** | |")
    return ["| per device | bytes | made of |", "|---|---|---|"] + lines


def report(config, setup: mm.GRPOMemorySetup, plan: mm.MeshPlan, chosen: mm.MemoryEstimate | None) -> str:
    """The Markdown report printed by the CLI (also used by docs/memory.md's worked examples)."""
    per_param = mm.bytes_per_parameter(config, setup)
    t = setup.seq_len
    out = [f"## {_MODEL.value}: {config.num_params / 1e9:.2f} B parameters, {config.num_layers} layers, "
           f"hidden {config.hidden_size}, vocab {config.vocab_size}",
           f"dtype {config.dtype} compute / {config.param_dtype} master, remat={config.remat}, "
           f"attention={config.attention_impl}; micro-batch {setup.micro_batch_rows} rows x {t} tokens "
           f"({setup.prompt_len} prompt + {setup.response_len} response); rollout {setup.rollout_prompts} prompts x "
           f"{setup.group_size}; reference copy: {setup.reference}", "",
           "Bytes per parameter: " + ", ".join(f"{k} {v:g}" for k, v in per_param.items() if v) +
           f" = {sum(v for k, v in per_param.items() if k != 'sampler_copy'):g} at an update "
           f"({sum(per_param[k] for k in ('params', 'adam_moments', 'reference')):g} persistent, plus the Sampler's "
           f"copy {per_param['sampler_copy']:g} outside updates)",
           "Bytes per token: layer activations "
           f"{mm.layer_activation_bytes_per_token(config, t) / 1024:,.1f} KiB x {config.num_layers} layers "
           f"without remat ({mm.remat_layer_bytes_per_token(config) / 1024:,.1f} KiB per layer with remat); "
           "log-prob head "
           + (f"{mm.chunked_head_bytes_per_token(config) / 1024:,.1f} KiB per response token (chunks of "
              f"{setup.logits_chunk_size})" if setup.head_chunked else
              f"{mm.logits_bytes_per_token(config) / 1024:,.1f} KiB per response token") + "; KV cache "
           f"{mm.kv_cache_bytes_per_token(config) / 1024:,.1f} KiB per cached token", ""]
    if chosen is None:
        out.append(f"**Nothing fits** in {mm.format_bytes(plan.usable_bytes)} per device with these settings.")
    else:
        d, f, tp = chosen.mesh
        verdict = "fits" if plan.fits(chosen) else "does NOT fit"
        out.append(f"Mesh data={d} fsdp={f} tensor={tp} ({verdict} in {mm.format_bytes(plan.usable_bytes)} "
                   "per device):")
        out.extend(_breakdown(chosen))
        if chosen.problems or chosen.notes:
            out.append("Note: " + "; ".join(chosen.problems + chosen.notes))
    out += ["", "| data | fsdp | tensor | peak / device | peak phase | fits |", "|---|---|---|---|---|---|"]
    for est in sorted(plan.candidates, key=lambda e: (e.mesh[2], -e.mesh[0])):
        fits = "yes" if plan.fits(est) else ("no: " + "; ".join(est.problems) if est.problems else "no")
        out.append(f"| {est.mesh[0]} | {est.mesh[1]} | {est.mesh[2]} | {mm.format_bytes(est.peak_bytes)} | "
                   f"{est.peak_phase} | {fits} |")
    return "\n".join(out)


def main(argv: list[str]) -> None:
    del argv
    if _DEVICES.value < 1 or _MEM.value <= 0 or not 0 < _USABLE.value <= 1:
        raise app.UsageError("--devices must be >= 1, --device_memory_gib > 0 and --usable_fraction in (0, 1]")
    config, setup = _config(), _setup()
    plan = mm.recommend_mesh(config, _DEVICES.value, _MEM.value, setup, _USABLE.value)
    chosen = plan.recommended
    if _MESH.value:
        try:
            mesh = tuple(int(x) for x in _MESH.value)
        except ValueError:
            mesh = ()
        if len(mesh) != 3 or any(m < 1 for m in mesh) or mesh[0] * mesh[1] * mesh[2] != _DEVICES.value:
            raise app.UsageError(f"--mesh={','.join(_MESH.value)}: need three positive sizes data,fsdp,tensor "
                                 f"multiplying to --devices={_DEVICES.value}")
        chosen = mm.estimate(config, setup, mesh)
        plan = mm.MeshPlan(recommended=chosen, candidates=(chosen,), usable_bytes=plan.usable_bytes)
    print(report(config, setup, plan, chosen))
    suggestion = None
    if chosen is None or not plan.fits(chosen):
        found = mm.first_fitting_settings(config, _DEVICES.value, _MEM.value, setup, _USABLE.value)
        if found is None:
            print("\nNo mesh fits even with remat, one row per micro-batch and one prompt per generate call: use "
                  "more or larger devices, cuDNN attention, or fewer trainable parameters (--train_last_layers).")
        else:
            cfg, better, better_plan = found
            d, f, t = better_plan.recommended.mesh
            suggestion = {"remat": cfg.remat, "micro_batch_rows": better.micro_batch_rows,
                          "rollout_prompts": better.rollout_prompts, "mesh": [d, f, t],
                          "peak_bytes": better_plan.recommended.peak_bytes}
            print(f"\nFirst settings that fit: --remat={cfg.remat} --micro_batch_rows={better.micro_batch_rows} "
                  f"--rollout_prompts={better.rollout_prompts} on mesh data={d} fsdp={f} tensor={t} "
                  f"(peak {mm.format_bytes(better_plan.recommended.peak_bytes)} per device):\n")
            print("\n".join(_breakdown(better_plan.recommended)))
            if better_plan.recommended.notes:
                print("Note: " + "; ".join(better_plan.recommended.notes))
    if _JSON.value:
        Path(_JSON.value).parent.mkdir(parents=True, exist_ok=True)
        Path(_JSON.value).write_text(json.dumps({
            "model": _MODEL.value, "num_params": config.num_params, "devices": _DEVICES.value,
            "device_memory_gib": _MEM.value, "usable_bytes": plan.usable_bytes,
            "bytes_per_parameter": mm.bytes_per_parameter(config, setup),
            "recommended": None if chosen is None else chosen.as_dict(), "fits": bool(chosen and plan.fits(chosen)),
            "first_fitting_settings": suggestion,
            "candidates": [e.as_dict() for e in plan.candidates]}, indent=2))


if __name__ == "__main__":
    app.run(main)
