"""GGUF (llama.cpp) -> Hugging Face folder converter for Llama-architecture models, without torch.

Writes config.json (LlamaForCausalLM, every hyper-parameter read from the GGUF metadata), model.safetensors
(dequantized with `gguf`'s own dequantizer, stored as float32 or bfloat16), tokenizer.json + tokenizer_config.json
(byte-level BPE rebuilt from the GGUF vocabulary/merges/token types, with the GGUF chat template),
generation_config.json and conversion.json (provenance).

llama.cpp's converter reorders the rows of q_proj/k_proj so its interleaved ("GPT-J style") rotary embedding
matches HF's rotate-half rotary; `unpermute_rotary_rows` inverts that reordering exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from toolrl_jax.tokenization import (
    GGUF_PRE_TOKENIZERS,
    AddedTokenSpec,
    build_byte_level_bpe,
    write_tokenizer_folder,
)

CONVERTER_VERSION = 1
STORE_DTYPES = ("float32", "bfloat16")

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Per-layer GGUF tensor names -> HF names ({i} is the layer index).
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


# ----------------------------------------------------------------------------------------------------------------
# Rotary row permutation.
# ----------------------------------------------------------------------------------------------------------------

def _check_rotary_rows(weight: np.ndarray, num_heads: int) -> int:
    if num_heads <= 0 or weight.shape[0] % (2 * num_heads):
        raise ValueError(f"cannot split {weight.shape[0]} rows into {num_heads} heads of even size")
    return weight.shape[0] // num_heads


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp (interleaved) row order -> HF (rotate-half) row order: within each head of size D, row `2 * j + s`
    (s in {0, 1}) moves back to row `s * D/2 + j`, inverting llama.cpp's converter exactly."""
    head_dim = _check_rotary_rows(weight, num_heads)
    return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


# ----------------------------------------------------------------------------------------------------------------
# Metadata.
# ----------------------------------------------------------------------------------------------------------------

def _field(reader, key: str, default: Any = KeyError) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise KeyError(f"GGUF file {getattr(reader.data, 'filename', '')!s} has no metadata key {key!r}")
        return default
    return field.contents()


def _f32(value: float) -> float:
    """The shortest decimal that GGUF's float32 value came from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def read_metadata(reader) -> dict[str, Any]:
    """Every scalar/short metadata field of a GGUFReader as plain Python values (long arrays left out)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                              "tokenizer.ggml.merges", "tokenizer.ggml.scores"):
            continue
        out[key] = field.contents()
    return out


def hf_config_from_gguf(reader, dtype: str = "float32") -> dict[str, Any]:
    """A LlamaForCausalLM config.json dict with every hyper-parameter taken from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    hidden = int(_field(reader, "llama.embedding_length"))
    num_heads = int(_field(reader, "llama.attention.head_count"))
    num_kv_heads = int(_field(reader, "llama.attention.head_count_kv", num_heads))
    head_dim = int(_field(reader, "llama.attention.key_length", hidden // num_heads))
    rope_dim = int(_field(reader, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise NotImplementedError(f"partial rotary (rope dim {rope_dim} != head dim {head_dim}) is not supported")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise NotImplementedError(f"GGUF rope scaling {scaling!r} is not supported")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise NotImplementedError("GGUF has rope_freqs.weight (Llama-3.1 style rope scaling): not supported")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab_size = int(_field(reader, "llama.vocab_size", len(tokens)))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    eot = _field(reader, "tokenizer.ggml.eot_token_id", None)
    eos_ids = [eos] + ([int(eot)] if eot is not None and int(eot) != eos else [])
    rope_theta = _f32(_field(reader, "llama.rope.freq_base", 10000.0))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": _f32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": not has_output,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", eos)),
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "dtype": dtype,
        "torch_dtype": dtype,
    }


# ----------------------------------------------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------------------------------------------

def convert_weights(reader, config: dict[str, Any], dtype: str = "float32") -> dict[str, np.ndarray]:
    """Dequantized HF-named weights (q/k rows un-permuted), each checked against the config's shapes."""
    import gguf

    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {dtype!r}")
    num_layers = config["num_hidden_layers"]
    hidden, inter, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    expected = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (config["vocab_size"], hidden)
    layer_shapes = {
        "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden), "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden), "self_attn.o_proj.weight": (hidden, q_rows),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    for i in range(num_layers):
        for name, shape in layer_shapes.items():
            expected[f"model.layers.{i}.{name}"] = shape

    if dtype == "bfloat16":
        import ml_dtypes
        store = np.dtype(ml_dtypes.bfloat16)
    else:
        store = np.dtype(np.float32)

    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if name in _GLOBAL_TENSORS:
            hf_name = _GLOBAL_TENSORS[name]
        else:
            parts = name.split(".", 2)
            if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit() or parts[2] not in _LAYER_TENSORS:
                raise ValueError(f"unexpected GGUF tensor {name!r}")
            hf_name = f"model.layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}"
        if hf_name not in expected:
            raise ValueError(f"GGUF tensor {name!r} ({hf_name}) does not fit the config")
        value = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        if tuple(value.shape) != expected[hf_name]:
            raise ValueError(f"GGUF tensor {name!r} has shape {value.shape}, expected {expected[hf_name]}")
        if hf_name.endswith("q_proj.weight"):
            value = unpermute_rotary_rows(value, config["num_attention_heads"])
        elif hf_name.endswith("k_proj.weight"):
            value = unpermute_rotary_rows(value, config["num_key_value_heads"])
        weights[hf_name] = np.ascontiguousarray(value.astype(store))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"GGUF file lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return weights


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer.
# ----------------------------------------------------------------------------------------------------------------

def convert_tokenizer(reader, folder: Path, model_max_length: int) -> None:
    """Rebuilds the GGUF's byte-level BPE tokenizer as tokenizer.json/tokenizer_config.json and checks it."""
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(GGUF_PRE_TOKENIZERS)}")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    types = [int(t) for t in _field(reader, "tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))]
    merges_raw: list[str] = list(_field(reader, "tokenizer.ggml.merges"))
    if len(types) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(types)} token types")
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary has duplicate token strings")
    merges = []
    for k, merge in enumerate(merges_raw):
        pieces = merge.split(" ")
        if len(pieces) != 2 or pieces[0] + pieces[1] not in vocab:
            raise ValueError(f"GGUF merge #{k} {merge!r} is not 'a b' with a+b in the vocabulary")
        merges.append((pieces[0], pieces[1]))
    added = [AddedTokenSpec(tok, i, special=(kind == TOKEN_CONTROL)) for i, (tok, kind) in
             enumerate(zip(tokens, types)) if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]

    def token_at(key: str) -> str | None:
        index = _field(reader, key, None)
        return None if index is None else tokens[int(index)]

    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    bos = token_at("tokenizer.ggml.bos_token_id")
    tokenizer = build_byte_level_bpe(vocab, merges, GGUF_PRE_TOKENIZERS[pre], added,
                                     bos_token=bos if add_bos else None)
    # The rebuilt tokenizer must hold exactly the GGUF vocabulary, id for id.
    built = tokenizer.get_vocab(with_added_tokens=True)
    if built != vocab:
        diff = [t for t in tokens if built.get(t) != vocab[t]][:5]
        raise ValueError(f"rebuilt tokenizer disagrees with the GGUF vocabulary, e.g. {diff}")
    for spec in added:
        if tokenizer.encode(spec.content, add_special_tokens=False).ids != [spec.id]:
            raise ValueError(f"added token {spec.content!r} does not encode to its id {spec.id}")
    eos = token_at("tokenizer.ggml.eos_token_id")
    write_tokenizer_folder(
        folder, tokenizer, added_tokens=added, chat_template=_field(reader, "tokenizer.chat_template", None),
        bos_token=bos, eos_token=eos, pad_token=token_at("tokenizer.ggml.padding_token_id") or eos,
        unk_token=token_at("tokenizer.ggml.unknown_token_id"), model_max_length=model_max_length,
        add_bos_token=add_bos)


# ----------------------------------------------------------------------------------------------------------------
# Whole folder.
# ----------------------------------------------------------------------------------------------------------------

def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Converts a Llama-architecture GGUF file into an HF model folder `out_dir` (created; files overwritten)."""
    import gguf
    from safetensors.numpy import save_file

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {dtype!r}")
    reader = gguf.GGUFReader(str(gguf_path))
    config = hf_config_from_gguf(reader, dtype=dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    weights = convert_weights(reader, config, dtype=dtype)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    del weights

    convert_tokenizer(reader, out, model_max_length=config["max_position_embeddings"])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                  "pad_token_id": config["pad_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    metadata = read_metadata(reader)
    provenance = {
        "converter": "toolrl_jax.models.gguf_convert", "converter_version": CONVERTER_VERSION,
        "source_file": gguf_path.name, "source_bytes": gguf_path.stat().st_size, "stored_dtype": dtype,
        "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
        "gguf_metadata": {k: v for k, v in metadata.items() if k != "tokenizer.chat_template"},
    }
    (out / "conversion.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return out
