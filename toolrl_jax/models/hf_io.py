"""Hugging Face checkpoint I/O: (sharded) safetensors + config.json <-> our NNX parameter state. No torch needed."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from toolrl_jax.models.config import ModelConfig
from toolrl_jax.models.decoder import CausalLM

ParamPath = tuple[Any, ...]
# (HF tensor name pattern, our path template, whether the HF [out, in] matrix is transposed to our [in, out])
_RULES: list[tuple[str, tuple[str, ...], bool]] = [
    (r"model\.embed_tokens\.weight", ("embed", "embedding"), False),
    (r"model\.norm\.weight", ("final_norm", "scale"), False),
    (r"lm_head\.weight", ("lm_head", "kernel"), True),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", ("layers", "{}", "input_norm", "scale"), False),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", ("layers", "{}", "post_attn_norm", "scale"), False),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.weight", ("layers", "{}", "attn", "{}_proj", "kernel"), True),
    (r"model\.layers\.(\d+)\.self_attn\.(q|k|v|o)_proj\.bias", ("layers", "{}", "attn", "{}_proj", "bias"), False),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", ("layers", "{}", "mlp", "{}_proj", "kernel"), True),
]
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def hf_name_to_path(name: str) -> tuple[ParamPath, bool] | None:
    """Maps a HF tensor name to (our parameter path, transpose?) or None when the tensor is not ours."""
    for pattern, template, transpose in _RULES:
        match = re.fullmatch(pattern, name)
        if match:
            groups = iter(match.groups())
            path = tuple(int(next(groups)) if part == "{}" else
                         (part.format(next(groups)) if "{}" in part else part) for part in template)
            return path, transpose
    return None


def path_to_hf_name(path: ParamPath) -> tuple[str, bool]:
    """Inverse of `hf_name_to_path`."""
    p = tuple(str(x) for x in path)
    if p == ("embed", "embedding"):
        return "model.embed_tokens.weight", False
    if p == ("final_norm", "scale"):
        return "model.norm.weight", False
    if p == ("lm_head", "kernel"):
        return "lm_head.weight", True
    if p[0] == "layers":
        i, rest = p[1], p[2:]
        if rest == ("input_norm", "scale"):
            return f"model.layers.{i}.input_layernorm.weight", False
        if rest == ("post_attn_norm", "scale"):
            return f"model.layers.{i}.post_attention_layernorm.weight", False
        if rest[0] in ("attn", "mlp"):
            module = "self_attn" if rest[0] == "attn" else "mlp"
            kind = "weight" if rest[2] == "kernel" else "bias"
            return f"model.layers.{i}.{module}.{rest[1]}.{kind}", kind == "weight"
    raise KeyError(f"no Hugging Face name for parameter {'/'.join(p)}")


def _safetensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return [folder / f for f in files]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def iter_hf_tensors(folder: str | Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, numpy array) for every tensor of a HF folder, one shard at a time."""
    for file in _safetensor_files(Path(folder)):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_hf_model(folder: str | Path, *, shardings: Optional[Callable[[ParamPath, tuple[int, ...]], Any]] = None,
                  **config_overrides: Any) -> tuple[ModelConfig, CausalLM]:
    """Builds a CausalLM from a HF folder (config.json + safetensors), without random initialisation.

    `shardings(path, shape)` may return a jax.sharding.Sharding for each parameter (placed as it is read).
    """
    folder = Path(folder)
    config = ModelConfig.from_hf(folder, **config_overrides)
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    expected = {tuple(path): var for path, var in nnx.to_flat_state(abstract_state)}
    loaded: dict[ParamPath, jax.Array] = {}
    param_dtype = jnp.dtype(config.param_dtype)
    for name, tensor in iter_hf_tensors(folder):
        if _IGNORED.fullmatch(name):
            continue
        mapped = hf_name_to_path(name)
        if mapped is None:
            raise ValueError(f"{folder}: unexpected tensor {name!r} for a {config.family} model")
        path, transpose = mapped
        if path == ("lm_head", "kernel") and config.tie_word_embeddings:
            continue  # some tied checkpoints still store the (identical) head
        if path not in expected:
            raise ValueError(f"{folder}: tensor {name!r} maps to {path}, which this config does not have")
        array = tensor.T if transpose else tensor
        want = tuple(expected[path].shape)
        if tuple(array.shape) != want:
            raise ValueError(f"{folder}: tensor {name!r} has shape {tensor.shape}, expected {want} (after transpose)")
        value = np.asarray(array).astype(param_dtype)
        loaded[path] = jax.device_put(value, shardings(path, want)) if shardings else jnp.asarray(value)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        names = [path_to_hf_name(p)[0] for p in missing]
        raise ValueError(f"{folder}: checkpoint lacks tensors {names[:8]}{' ...' if len(names) > 8 else ''}")
    state = nnx.State.from_flat_path([(path, expected[path].replace(loaded[path])) for path in expected])
    return config, nnx.merge(graphdef, state)


def model_params_numpy(model: CausalLM) -> dict[ParamPath, np.ndarray]:
    """All parameters gathered to host numpy (works for sharded, multi-host arrays too)."""
    state = nnx.state(model, nnx.Param)
    out = {}
    for path, var in nnx.to_flat_state(state):
        value = var[...]
        if not value.is_fully_addressable:
            from jax.experimental import multihost_utils
            value = multihost_utils.process_allgather(value, tiled=True)
        out[tuple(path)] = np.asarray(jax.device_get(value))
    return out


def save_hf_model(model: CausalLM, folder: str | Path, *, dtype: str = "bfloat16",
                  max_shard_bytes: int = 4 * 1024 ** 3, extra_files: Optional[dict[str, str]] = None) -> Path:
    """Writes config.json + safetensors (sharded with an index past `max_shard_bytes`) for transformers/vLLM.

    Only process 0 writes in a multi-host run; the folder appears atomically (temp dir + rename).
    """
    config: ModelConfig = model.config
    params = model_params_numpy(model)
    adapters = sorted("/".join(map(str, p)) for p in params if str(p[-1]) in ("lora_a", "lora_b"))
    if adapters:
        raise ValueError(f"save_hf_model: the model has LoRA adapters ({adapters[0]}, ...): write "
                         "models.lora.merge_lora(model) for a plain model, or models.lora.save_peft_adapter")
    if jax.process_index() != 0:
        return Path(folder)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}[dtype]
    tensors: dict[str, np.ndarray] = {}
    for path, value in params.items():
        name, transpose = path_to_hf_name(path)
        tensors[name] = np.ascontiguousarray((value.T if transpose else value).astype(np_dtype))
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({name: fname for name in shard})
        total = sum(t.nbytes for t in tensors.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = dtype
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def copy_tokenizer_files(source: str | Path, dest: str | Path) -> None:
    """Copies tokenizer/chat-template files so an exported folder is self-contained."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model"):
        src = Path(source) / name
        if src.is_file():
            shutil.copy2(src, Path(dest) / name)
