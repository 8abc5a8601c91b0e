"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) on the decoder's projections.

`apply_lora` gives every `Dense` whose module path matches a pattern two `LoRAParam` matrices, A [in, rank] and
B [rank, out], and the layer computes base(x) + (x @ A) @ B * alpha / rank. As in Hugging Face PEFT's defaults
(`LoraConfig`, `init_lora_weights=True`), A starts Kaiming-uniform (bound 1 / sqrt(in)) and B at zero, so a fresh
adapter leaves the model's outputs exactly unchanged. Training then splits the model into the adapters (the trained
pytree: optimizer state and checkpoints hold only them) and the frozen base, which may be stored in bfloat16
(`LoRAConfig.base_dtype`). The base policy is the same graph with zero adapters (`base_adapters`), so a KL
reference costs no second copy of the model. For export, `merge_lora` folds the adapters into the kernels (a plain
Hugging Face model), and `save_peft_adapter` writes the adapters as a PEFT folder (adapter_config.json +
adapter_model.safetensors) that `peft.PeftModel.from_pretrained` loads on top of the base model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from toolrl_jax.config_checks import option, requirement_checker
from toolrl_jax.models.decoder import CausalLM, Dense, LoRAParam

# The trained parameters of a model with adapters, as a path regex (training.trainable.trainable_filter).
LORA_PARAM_REGEX = r"(^|/)lora_[ab]$"
ALL_PROJECTIONS = r"(q|k|v|o|gate|up|down)_proj"
BASE_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters and how large. rank 0 = no adapters (full or last-layers fine-tuning)."""

    rank: int = option(0, "LoRA rank: train low-rank adapters on the --lora_target_modules projections instead of "
                          "the weights (0 = off). The base stays frozen; optimizer state and checkpoints hold only "
                          "the adapters.", flag="lora_rank")
    alpha: float = option(16.0, "LoRA alpha: the adapter output is scaled by alpha / rank (PEFT's lora_alpha).",
                          flag="lora_alpha")
    target_modules: str = option(
        ALL_PROJECTIONS, "Regex searched in each projection's module path (e.g. layers/3/attn/q_proj): matching ones "
                         "get adapters. Default: every attention and MLP projection. Example: attn/(q|v)_proj.",
        flag="lora_target_modules")
    dropout: float = option(
        0.0, "LoRA dropout: each adapter's input is dropped with this probability in training forwards (PEFT's "
             "lora_dropout; masks drawn per row from the run seed, step and epoch). Sampling, old/reference "
             "log-probs and evaluation run without it.", flag="lora_dropout")
    base_dtype: Optional[str] = option(
        None, "Store the frozen base weights in this dtype (bfloat16 halves their memory; the forward computes in "
              "--dtype either way). Default: --param_dtype.", flag="lora_base_dtype", choices=BASE_DTYPES)

    def __post_init__(self) -> None:
        need = requirement_checker("LoRAConfig")
        need(isinstance(self.rank, int) and self.rank >= 0, f"rank must be an integer >= 0, got {self.rank!r}")
        need(math.isfinite(self.alpha) and self.alpha > 0, f"alpha must be finite and > 0, got {self.alpha}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.base_dtype is None or self.base_dtype in BASE_DTYPES,
             f"base_dtype must be one of {BASE_DTYPES} or None, got {self.base_dtype!r}")
        try:
            re.compile(self.target_modules)
        except re.error as e:
            raise ValueError(f"LoRAConfig: target_modules {self.target_modules!r} is not a regex: {e}") from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _path_name(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def adapted_layers(model: CausalLM) -> dict[str, Dense]:
    """{module path: Dense} of every projection that carries an adapter."""
    return {_path_name(path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, Dense) and node.lora_a is not None}


def has_lora(model: CausalLM) -> bool:
    return bool(adapted_layers(model))


def apply_lora(model: CausalLM, config: LoRAConfig, key: jax.Array) -> list[str]:
    """Adds adapters to `model` in place (every Dense whose path matches config.target_modules) and casts the
    frozen base to config.base_dtype; returns the adapted module paths. Adapters are stored in the model's
    param_dtype. Raises when nothing matches or the model already has adapters."""
    if not config.enabled:
        raise ValueError("apply_lora: LoRAConfig.rank is 0 (adapters off)")
    if has_lora(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    pattern = re.compile(config.target_modules)
    targets = [(_path_name(path), node) for path, node in nnx.iter_graph(model)
               if isinstance(node, Dense) and pattern.search(_path_name(path))]
    if not targets:
        names = sorted(_path_name(p) for p, n in nnx.iter_graph(model) if isinstance(n, Dense))
        raise ValueError(f"LoRAConfig.target_modules={config.target_modules!r} (--lora_target_modules) matches no "
                         f"projection; they are named like {names[:3]}")
    if config.base_dtype is not None:
        base = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda x: x.astype(config.base_dtype)
                                       if jnp.issubdtype(x.dtype, jnp.floating) else x, base))
    dtype = jnp.dtype(model.config.param_dtype)
    for i, (_, dense) in enumerate(targets):
        fan_in, fan_out = dense.kernel.shape
        bound = 1.0 / math.sqrt(fan_in)  # Kaiming-uniform with a = sqrt(5), PEFT's default for A
        a = jax.random.uniform(jax.random.fold_in(key, i), (fan_in, config.rank), jnp.float32, -bound, bound)
        dense.lora_a = LoRAParam(a.astype(dtype))
        dense.lora_b = LoRAParam(jnp.zeros((config.rank, fan_out), dtype))
        dense.lora_scale = float(config.scale)
        dense.lora_dropout = float(config.dropout)
        dense.lora_stream = i  # each adapted layer draws its own dropout masks
    return [name for name, _ in targets]


def lora_dropout_rate(model: CausalLM) -> float:
    """The adapters' dropout probability (0.0 without adapters or without dropout)."""
    return max((d.lora_dropout for d in adapted_layers(model).values()), default=0.0)


DROPOUT_SEED_KEY = "lora_dropout_seed"  # the per-row seeds' name in a training batch


def dropout_seeds(seed: int, step: int, epoch: int, shape: tuple[int, ...]) -> np.ndarray:
    """uint32 per-row dropout seeds for one training step (and pass over its rows): a function of (run seed, step,
    epoch) only, so a resumed run and every process of a multi-process run draw the same masks."""
    sequence = np.random.SeedSequence([seed & 0xFFFFFFFF, step, epoch, 0x10A4])
    return np.random.default_rng(sequence).integers(0, 2 ** 32, size=shape, dtype=np.uint32)


def base_adapters(adapters: Any) -> Any:
    """Zeros shaped like the adapter pytree (nnx.State of LoRAParams): merged with the model's graph and frozen base,
    the base model exactly (its adapter terms are 0), e.g. the KL reference, with no copy of the base and no array
    shared with the trained adapters (which the update donates)."""
    return jax.tree.map(jnp.zeros_like, adapters)


def merge_lora(model: CausalLM) -> CausalLM:
    """A copy of `model` without adapters, each adapted kernel replaced by kernel + scale * A @ B (summed in float32,
    stored in the kernel's dtype): the same function as a plain model, for export and fast sampling."""
    merged = nnx.clone(model)
    for dense in adapted_layers(merged).values():
        delta = (dense.lora_a[...].astype(jnp.float32) @ dense.lora_b[...].astype(jnp.float32)) * dense.lora_scale
        kernel = dense.kernel[...]
        dense.kernel = nnx.Param((kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
        dense.lora_a, dense.lora_b, dense.lora_scale = None, None, 0.0
    return merged


def _hf_module_name(path: str) -> str:
    from toolrl_jax.models.hf_io import path_to_hf_name

    name, _ = path_to_hf_name(tuple(path.split("/")) + ("kernel",))
    return name.removesuffix(".weight")


def peft_tensors(model: CausalLM) -> tuple[dict[str, np.ndarray], list[str]]:
    """The adapters under PEFT's names ({base_model.model.<module>.lora_A.weight: [rank, in], ...lora_B.weight:
    [out, rank]}, float32) and the adapted modules' Hugging Face names."""
    tensors: dict[str, np.ndarray] = {}
    modules = []
    for path, dense in adapted_layers(model).items():
        module = _hf_module_name(path)
        modules.append(module)
        a = np.asarray(jax.device_get(dense.lora_a[...]), np.float32)
        b = np.asarray(jax.device_get(dense.lora_b[...]), np.float32)
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a.T)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b.T)
    return tensors, modules


def save_peft_adapter(model: CausalLM, folder: str | Path, *, base_model: str = "") -> Path:
    """Writes the adapters as a Hugging Face PEFT folder (adapter_config.json + adapter_model.safetensors, float32)
    for `peft.PeftModel.from_pretrained(base, folder)`. target_modules lists the adapted modules' full names, so
    PEFT adapts exactly those. Only process 0 writes; the folder appears atomically."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters")
    tensors, modules = peft_tensors(model)
    if jax.process_index() != 0:
        return Path(folder)
    first = next(iter(layers.values()))
    rank = int(first.lora_a.shape[1])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
        "lora_alpha": first.lora_scale * rank, "lora_dropout": first.lora_dropout, "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": sorted(modules), "use_rslora": False, "inference_mode": True, "init_lora_weights": True,
    }
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
