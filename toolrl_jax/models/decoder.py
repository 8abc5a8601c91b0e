"""Flax NNX decoder for Qwen2/Qwen2.5 and Llama-3.x: RMSNorm, RoPE, grouped-query attention with a KV cache, SwiGLU.

One module serves training (packed or left-padded batches described by segment ids) and jitted sampling (a
preallocated `KVCache` written at a running slot index). Parameters live in `param_dtype` (fp32 master weights by
default) and are cast to `dtype` for compute; logits and softmax statistics are float32.
"""
from __future__ import annotations

from typing import Any, Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from toolrl_jax.models.config import ModelConfig, rope_inverse_frequencies

_MASK_VALUE = -1e30  # finite, so fully-masked (padding) query rows give a uniform softmax instead of NaN


@flax.struct.dataclass
class KVCache:
    """Preallocated keys/values per layer plus the segment id and token position of every slot (segment 0 = empty
    or padding).

    keys/values: tuples of [batch, max_len, num_kv_heads, head_dim]; index: next slot to write (int32 scalar).
    Causality is decided by the stored positions, not by slot order, so a cache may be used as a ring (the
    continuous rollout engine writes slot index mod max_len and places each row's prompt to end at the index).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    segment_ids: jax.Array  # [batch, max_len] int32
    index: jax.Array  # [] int32
    positions: jax.Array  # [batch, max_len] int32: the token position held by each slot

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | str | None = None) -> KVCache:
    """An empty cache for `batch` sequences of at most `max_len` tokens (prompt + generated)."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch, max_len, config.num_kv_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
    return KVCache(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32),
                   positions=jnp.zeros((batch, max_len), jnp.int32))


class LoRAParam(nnx.Param):
    """A low-rank adapter matrix (models/lora.py): a Param of its own type, so filters can tell it from the base."""


class Dense(nnx.Module):
    """y = x @ kernel (+ bias) (+ scale * (dropout(x) @ lora_a) @ lora_b when `models.lora` adds an adapter); kernel
    stored [in, out] in param_dtype, applied in the compute dtype. The adapter's input dropout (PEFT's lora_dropout)
    applies only when the forward is given per-row dropout seeds (training losses); `lora_stream` tells this
    layer's masks from the other adapted layers'."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, config: ModelConfig,
                 rngs: nnx.Rngs):
        std = 0.02
        self.kernel = nnx.Param(
            std * jax.random.normal(rngs.params(), (in_features, out_features), jnp.dtype(config.param_dtype)))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.dtype(config.param_dtype))) if use_bias else None
        self.dtype = jnp.dtype(config.dtype)
        self.lora_a: Optional[LoRAParam] = nnx.data(None)  # [in, rank]
        self.lora_b: Optional[LoRAParam] = nnx.data(None)  # [rank, out]
        self.lora_scale = 0.0
        self.lora_dropout = 0.0
        self.lora_stream = 0

    def __call__(self, x: jax.Array, dropout_seeds: Optional[jax.Array] = None) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.dot(x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:  # as PEFT: base(x) + B(A(dropout(x))) * scale
            if self.lora_dropout > 0 and dropout_seeds is not None:
                x = row_dropout(x, dropout_seeds, self.lora_dropout, self.lora_stream)
            low = jnp.dot(x, self.lora_a[...].astype(self.dtype))
            y = y + jnp.dot(low, self.lora_b[...].astype(self.dtype)) * jnp.asarray(self.lora_scale, self.dtype)
        return y


def row_dropout(x: jax.Array, seeds: jax.Array, rate: float, stream: int) -> jax.Array:
    """Inverted dropout of x [B, ...] whose mask for row b depends only on (seeds[b], stream): the same row gets the
    same mask whatever batch, micro-batch or device it lands in."""
    chex.assert_shape(seeds, (x.shape[0],))

    def keep(seed: jax.Array) -> jax.Array:
        return jax.random.bernoulli(jax.random.fold_in(jax.random.key(seed), stream), 1.0 - rate, x.shape[1:])

    mask = jax.vmap(keep)(seeds.astype(jnp.uint32))
    return jnp.where(mask, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32, as HF does, then scaled in the input dtype."""

    def __init__(self, size: int, *, config: ModelConfig):
        self.scale = nnx.Param(jnp.ones((size,), jnp.dtype(config.param_dtype)))
        self.eps = config.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in the rotate-half layout used by HF Qwen2/Llama. x: [B,T,H,D], positions: [B,T]."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # [B,T,D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


def attention_mask(q_segment_ids: jax.Array, q_order: jax.Array, kv_segment_ids: jax.Array,
                   kv_order: Optional[jax.Array] = None) -> jax.Array:
    """[B,T,S] bool: a query sees keys of its own (non-zero) segment that come no later than itself.

    q_order [B,T] / kv_order [B,S]: what orders tokens within a segment (slot numbers, or the positions a cache
    stores); kv_order None means the slot numbers 0..S-1."""
    if kv_order is None:
        kv_order = jnp.arange(kv_segment_ids.shape[1], dtype=jnp.int32)[None, :]
    same_segment = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    causal = kv_order[:, None, :] <= q_order[:, :, None]
    return same_segment & causal


class Attention(nnx.Module):
    """Grouped-query attention; reads and writes the layer's slice of a KVCache when one is given."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h, d = config.hidden_size, config.head_dim
        self.q_proj = Dense(h, config.num_heads * d, use_bias=config.attention_bias, config=config, rngs=rngs)
        self.k_proj = Dense(h, config.num_kv_heads * d, use_bias=config.attention_bias, config=config, rngs=rngs)
        self.v_proj = Dense(h, config.num_kv_heads * d, use_bias=config.attention_bias, config=config, rngs=rngs)
        # HF Llama's attention_bias also adds an output bias; Qwen2 has q/k/v biases only.
        self.o_proj = Dense(config.num_heads * d, h, use_bias=config.attention_bias and config.family == "llama",
                            config=config, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, d
        self.impl = config.attention_impl

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array, mask: jax.Array,
                 kv: Optional[tuple[jax.Array, jax.Array]], write_index: Optional[jax.Array],
                 dropout_seeds: Optional[jax.Array] = None, attend_len: Optional[int] = None
                 ) -> tuple[jax.Array, Optional[tuple[jax.Array, jax.Array]]]:
        b, t, _ = x.shape
        q = self.q_proj(x, dropout_seeds).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x, dropout_seeds).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, dropout_seeds).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        new_kv = None
        if kv is not None:
            cache_k, cache_v = kv
            start = (0, write_index, 0, 0)
            cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
            cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
            new_kv = (cache_k, cache_v)
            k, v = cache_k[:, :attend_len].astype(q.dtype), cache_v[:, :attend_len].astype(q.dtype)
        out = self._attend(q, k, v, mask)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim), dropout_seeds), new_kv

    def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        if self.impl == "cudnn":
            return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :], implementation="cudnn")
        b, t, _, d = q.shape
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(b, t, self.num_kv_heads, groups, d)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
        scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
        return out.reshape(b, t, self.num_heads, d)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = Dense(h, f, use_bias=False, config=config, rngs=rngs)
        self.up_proj = Dense(h, f, use_bias=False, config=config, rngs=rngs)
        self.down_proj = Dense(f, h, use_bias=False, config=config, rngs=rngs)

    def __call__(self, x: jax.Array, dropout_seeds: Optional[jax.Array] = None) -> jax.Array:
        hidden = jax.nn.silu(self.gate_proj(x, dropout_seeds)) * self.up_proj(x, dropout_seeds)
        return self.down_proj(hidden, dropout_seeds)


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(config.hidden_size, config=config)
        self.attn = Attention(config, rngs=rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config=config)
        self.mlp = MLP(config, rngs=rngs)

    def __call__(self, x, positions, inv_freq, mask, kv, write_index, dropout_seeds=None, attend_len=None):
        attn_out, new_kv = self.attn(self.input_norm(x), positions, inv_freq, mask, kv, write_index, dropout_seeds,
                                     attend_len)
        x = x + attn_out
        x = x + self.mlp(self.post_attn_norm(x), dropout_seeds)
        return x, new_kv


def _run_layer(layer: DecoderLayer, x, positions, inv_freq, mask, dropout_seeds):
    out, _ = layer(x, positions, inv_freq, mask, None, None, dropout_seeds)
    return out


class CausalLM(nnx.Module):
    """Decoder-only language model with an LM head (tied to the embedding when configured)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=jnp.dtype(config.dtype),
                               param_dtype=jnp.dtype(config.param_dtype),
                               embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config=config)
        self.lm_head = None if config.tie_word_embeddings else Dense(
            config.hidden_size, config.vocab_size, use_bias=False, config=config, rngs=rngs)

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                      cache: Optional[KVCache] = None, dropout_seeds: Optional[jax.Array] = None,
                      attend_len: Optional[int] = None) -> tuple[jax.Array, Optional[KVCache]]:
        """Final-norm hidden states [B,T,H] (compute dtype) and the updated cache. dropout_seeds [B]: a training
        forward, with LoRA dropout masks drawn per row from them (adapters with dropout only; not with a cache).
        attend_len (static): attend over the cache's first attend_len slots only (the caller keeps every visible
        key there and writes below it), so a step reads that much of the cache rather than all of it."""
        chex.assert_rank([input_ids, positions, segment_ids], 2)
        chex.assert_equal_shape([input_ids, positions, segment_ids])
        b, t = input_ids.shape
        x = self.embed(input_ids).astype(jnp.dtype(self.config.dtype))
        inv_freq = jnp.asarray(rope_inverse_frequencies(self.config), jnp.float32)  # a compile-time constant
        if cache is None:
            slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
            mask = attention_mask(segment_ids, slots, segment_ids)
            layer_fn = _run_layer
            if self.config.remat:
                layer_fn = nnx.remat(_run_layer, policy=_REMAT_POLICIES[self.config.remat_policy])
            for layer in self.layers:
                x = layer_fn(layer, x, positions, inv_freq, mask, dropout_seeds)
            return self.final_norm(x), None
        if dropout_seeds is not None:
            raise ValueError("hidden_states: dropout_seeds are for training forwards, not for decoding with a cache")
        chex.assert_equal(cache.segment_ids.shape[0], b)
        kv_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32),
                                                   (0, cache.index))
        kv_positions = jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, cache.index))
        mask = attention_mask(segment_ids, positions.astype(jnp.int32), kv_segments[:, :attend_len],
                              kv_positions[:, :attend_len])
        new_keys, new_values = [], []
        for layer, k, v in zip(self.layers, cache.keys, cache.values):
            x, (k, v) = layer(x, positions, inv_freq, mask, (k, v), cache.index, attend_len=attend_len)
            new_keys.append(k)
            new_values.append(v)
        new_cache = KVCache(keys=tuple(new_keys), values=tuple(new_values), segment_ids=kv_segments,
                            index=cache.index + t, positions=kv_positions)
        return self.final_norm(x), new_cache

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits [..., V] from final hidden states."""
        if self.lm_head is None:
            weight = self.embed.embedding[...].astype(hidden.dtype)
            logits = jnp.einsum("...h,vh->...v", hidden, weight, preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("...h,hv->...v", hidden, self.lm_head.kernel[...].astype(hidden.dtype),
                                preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array,
                 cache: Optional[KVCache] = None) -> tuple[jax.Array, Optional[KVCache]]:
        """Logits [B,T,V] float32 and the updated cache (None without one)."""
        hidden, cache = self.hidden_states(input_ids, positions, segment_ids, cache)
        return self.logits_from_hidden(hidden), cache


# "save_dots" keeps the outputs of the projection matmuls (dot_generals without batch dimensions); the attention
# einsums have batch dimensions and are recomputed with the rest.
_REMAT_POLICIES = {"full": None, "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions for left-padded or packed rows: 0,1,2,... within each non-zero segment (padding gets 0)."""
    seg = segment_ids.astype(jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    idx = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
    segment_start = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(seg != 0, idx - segment_start, 0)


def cast_floating(state: Any, dtype: jnp.dtype | str | None = None, *, copy: bool = False) -> Any:
    """A parameter pytree with its floating leaves cast to `dtype` (None: kept). Casting to the compute dtype leaves
    the model's outputs bit-identical: every kernel, bias, norm scale and embedding is cast to the compute dtype
    before use (see `Dense`, `RMSNorm`). copy=True puts every leaf in a fresh buffer (safe to keep when the original
    is donated); otherwise a leaf already in its target dtype is shared."""
    def one(x: jax.Array) -> jax.Array:
        target = dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype
        return jnp.array(x, dtype=target, copy=True) if copy else x.astype(target)

    return jax.tree.map(one, state)
