"""`Sampler`: host-side batching around the jitted rollout kernels, returning numpy `SampleOutput`s.

Two engines share this interface and give the same tokens for the same key:

* continuous (default; `continuous.py`, `scheduler.py`): a fixed number of decode slots; rows stop independently and
  their slots are refilled from the queue of pending prompts, so no decode step is spent on a finished row and the
  KV cache is bounded by the slot count, whatever the number of rows;
* static (`engine.py`): prompts are split into chunks of `config.prompts_per_batch`, each chunk left-padded to a
  prompt-length bucket and padded with dummy prompts to a batch bucket (one compile per (length bucket, batch
  bucket)), and each chunk decodes until its longest row stops. All chunks are dispatched before any result is
  fetched, so host work for one overlaps device work for the previous one.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from toolrl_jax.models.decoder import CausalLM, cast_floating
from toolrl_jax.sampling.config import SamplingConfig, batch_bucket, prompt_length_bucket
from toolrl_jax.sampling.engine import BatchSharding, DecodeSpec, generate_tokens
from toolrl_jax.sampling.scheduler import ContinuousEngine, to_numpy
from toolrl_jax.sampling.sessions import continue_rows, start_rows

DEFAULT_BATCH_AXES = ("data", "fsdp")
ENGINES = ("continuous", "static")


@dataclasses.dataclass(frozen=True)
class SampleOutput:
    """Sampled responses, numpy, N = num_prompts * group_size rows, prompt-major (prompt i -> rows i*n..i*n+n-1).

    prompt_ids [N, P] int32 left-padded with pad_id; prompt_mask [N, P] int32 (1 = real token);
    response_ids [N, R] int32 (pad_id after the stop token); response_mask [N, R] int32 (1 for generated tokens
    including the stop token); logprobs [N, R] float32 log-probs of the sampled tokens under the untempered policy
    (log_softmax of the raw logits; 0 where masked); tempered_logprobs: the same under the distribution sampled from
    (after temperature/top-k/top-p), when requested; lengths [N] generated tokens including the stop token;
    stopped [N] whether the response ended with a stop token (False = cut at max_new_tokens);
    texts: decoded responses without the stop token (when the Sampler has a tokenizer).
    response_attention: [N, R] int32 the response's real tokens when they are more than the trained ones (multi-turn
    trajectories: model tokens in response_mask, tool-result tokens attended to but not trained); None: the same
    as response_mask.
    """

    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    response_ids: np.ndarray
    response_mask: np.ndarray
    logprobs: np.ndarray
    lengths: np.ndarray
    stopped: np.ndarray
    group_size: int
    tempered_logprobs: Optional[np.ndarray] = None
    texts: Optional[list[str]] = None
    response_attention: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def prompt_index(self) -> np.ndarray:
        """[N] index of the prompt each row answers."""
        return np.arange(len(self)) // self.group_size

    @property
    def sequence_ids(self) -> np.ndarray:
        """[N, P+R] prompt and response side by side (for teacher-forced log-prob computation)."""
        return np.concatenate([self.prompt_ids, self.response_ids], axis=1)

    @property
    def sequence_mask(self) -> np.ndarray:
        """[N, P+R] 1 for every real prompt or response token."""
        return np.concatenate([self.prompt_mask, self.attended], axis=1)

    @property
    def attended(self) -> np.ndarray:
        """[N, R] every real response token (tool results included)."""
        return self.response_mask if self.response_attention is None else self.response_attention


class Sampler:
    """Generates responses with a preallocated KV cache, one compile per shape bucket.

    model: a CausalLM (its parameters may already be sharded; their shardings are kept).
    pad_id: token written after a response ends and used for left padding.
    stop_token_ids: default ids that end a response (e.g. <|im_end|>, <|eot_id|>, EOS); a SamplingConfig may
      override them.
    mesh / batch_axes: shard the batch of prompts, KV cache and decode state over these mesh axes (default: those
      of "data", "fsdp" that the mesh has); KV heads go over "tensor" when it divides them.
    cast_params: keep a copy of floating parameters in the compute dtype (bit-identical results, since the model
      casts weights to it anyway, and half the bytes read per decode step for fp32 master weights).
    engine: "continuous" (default; `sampling/continuous.py`): a fixed set of decode slots refilled from a queue as
      rows stop, so no decode step is spent on a finished row; "static": each chunk of prompts decodes until its
      longest row stops. Both give the same tokens for the same key.
    slots: decode slots of the continuous engine (its KV cache holds slots x (prompt bucket + budget) tokens);
      None: a config's prompts_per_batch x group_size, the rows (and KV memory) of one static chunk.
    refill_prompts: prompts prefilled per refill (None: an eighth of the slots' prompts, at least one); the
      engine decodes until that many groups of slots are free.
    decode_windows: attention window sizes of the continuous engine's decode calls: each attends over the part of
      its KV cache that running rows use, the smallest of this many sizes that fits (1: always the whole cache).
      Same tokens; each size compiles one more decode program, all in a call's first decode.
    min_decode_window: windows narrower than this many cache columns are not used (they save too little per step
      to repay their compile); small caches then decode over the whole cache.
    """

    def __init__(self, model: CausalLM, pad_id: int, stop_token_ids: Sequence[int] = (), tokenizer: Any = None,
                 mesh: Optional[Mesh] = None, batch_axes: Optional[Sequence[str]] = None, cast_params: bool = True,
                 cache_dtype: Optional[str] = None, engine: str = "continuous", slots: Optional[int] = None,
                 refill_prompts: Optional[int] = None, decode_windows: int = 4, min_decode_window: int = 128):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        for name, value in (("slots", slots), ("refill_prompts", refill_prompts)):
            if value is not None and (isinstance(value, bool) or int(value) != value or value < 1):
                raise ValueError(f"Sampler {name} must be a positive integer or None, got {value!r}")
        self.engine, self.slots, self.refill_prompts = engine, slots, refill_prompts
        self.config = model.config
        vocab = self.config.vocab_size
        if not 0 <= int(pad_id) < vocab:
            raise ValueError(f"pad_id {pad_id} is outside the vocabulary [0, {vocab})")
        bad = [s for s in stop_token_ids if not 0 <= int(s) < vocab]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab})")
        self.pad_id = int(pad_id)
        self.stop_token_ids = tuple(int(s) for s in stop_token_ids)
        self.tokenizer = tokenizer
        self.cast_params = cast_params
        self.cache_dtype = str(jnp.dtype(cache_dtype or self.config.dtype))
        self.sharding = self._batch_sharding(mesh, batch_axes)
        self._graphdef, state = nnx.split(model)
        self._structure = jax.tree.structure(state)
        self._state = self._prepare(state)
        self.traces: collections.Counter = collections.Counter()
        self._generate = jax.jit(
            functools.partial(generate_tokens, self._graphdef, sharding=self.sharding, on_trace=self._count),
            static_argnames=("spec",))
        self._continuous = ContinuousEngine(self._graphdef, self.config, self.sharding, self._place, self._count,
                                            windows=decode_windows, min_window=min_decode_window)
        # The kernels of multi-turn sessions (`sessions.SessionGenerator`), shared by every session of this sampler.
        self._start_rows = jax.jit(
            functools.partial(start_rows, self._graphdef, sharding=self.sharding, on_trace=self._count),
            static_argnames=("spec", "cache_len"))
        self._continue_rows = jax.jit(
            functools.partial(continue_rows, self._graphdef, sharding=self.sharding, on_trace=self._count),
            static_argnames=("spec",), donate_argnames=("cache",))

    # ------------------------------------------------------------------ setup
    def _batch_sharding(self, mesh: Optional[Mesh], batch_axes: Optional[Sequence[str]]) -> Optional[BatchSharding]:
        if mesh is None:
            return None
        if batch_axes is None:
            batch_axes = tuple(a for a in DEFAULT_BATCH_AXES if a in mesh.axis_names)
        missing = [a for a in batch_axes if a not in mesh.axis_names]
        if missing:
            raise ValueError(f"batch_axes {missing} are not axes of the mesh {mesh.axis_names}")
        head_axis = None
        if "tensor" in mesh.axis_names and "tensor" not in batch_axes and mesh.shape["tensor"] > 1 \
                and self.config.num_kv_heads % mesh.shape["tensor"] == 0:
            head_axis = "tensor"
        return BatchSharding(mesh=mesh, batch_axes=tuple(batch_axes), head_axis=head_axis)

    def _count(self, signature: tuple) -> None:
        self.traces[signature] += 1

    @property
    def compile_count(self) -> int:
        """How many times the generate kernel has been traced (= compiled) by this sampler."""
        return sum(self.traces.values())

    def _prepare(self, state: nnx.State) -> nnx.State:
        if not self.cast_params:
            return state
        return cast_floating(state, self.config.dtype)

    def update_params(self, params: nnx.State | nnx.Module) -> None:
        """Swaps in new weights (e.g. after a GRPO step). Same shapes, dtypes and shardings -> no recompilation.

        Call it after every optimizer step: a trainer that donates its parameter buffers invalidates the old ones.
        """
        state = nnx.split(params)[1] if isinstance(params, nnx.Module) else params
        if jax.tree.structure(state) != self._structure:
            raise ValueError("update_params: the new state's structure differs from the model the Sampler was built "
                             "with (pass the full nnx state of the same architecture)")
        self._state = self._prepare(state)

    def release_params(self) -> None:
        """Drops the sampler's weights (its compute-dtype copy) until the next `update_params`, so a trainer's
        update does not hold them alongside its gradients; `generate` refuses to run meanwhile."""
        self._state = None

    # ------------------------------------------------------------------ generation
    def _validate(self, prompt_ids: Sequence[Sequence[int]], config: SamplingConfig) -> list[np.ndarray]:
        if self._state is None:
            raise RuntimeError("Sampler.generate: the weights were released (release_params); call update_params "
                               "with the current model first")
        if not isinstance(config, SamplingConfig):
            raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
        if len(prompt_ids) == 0:
            raise ValueError("generate needs at least one prompt")
        vocab = self.config.vocab_size
        if config.top_k >= vocab:
            raise ValueError(f"SamplingConfig.top_k ({config.top_k}) must be < vocab_size ({vocab}); use 0 for off")
        if config.stop_token_ids is not None:
            bad = [s for s in config.stop_token_ids if s >= vocab]
            if bad:
                raise ValueError(f"SamplingConfig.stop_token_ids {bad} are outside the vocabulary [0, {vocab})")
        prompts = []
        for i, row in enumerate(prompt_ids):
            arr = np.asarray(row)
            if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(f"prompt {i} must be a non-empty list of token ids, got shape {arr.shape} "
                                 f"dtype {arr.dtype}")
            if arr.min() < 0 or arr.max() >= vocab:
                raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): min {arr.min()}, max {arr.max()}")
            if arr.size + config.max_new_tokens > self.config.max_position_embeddings:
                raise ValueError(f"prompt {i} ({arr.size} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds "
                                 f"max_position_embeddings ({self.config.max_position_embeddings})")
            prompts.append(arr.astype(np.int32))
        return prompts

    def _place(self, array: np.ndarray) -> jax.Array:
        if self.sharding is None:
            return jnp.asarray(array)
        sharding = self.sharding.batch(array.ndim)
        return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

    def generate(self, prompt_ids: Sequence[Sequence[int]], config: SamplingConfig, key: jax.Array | int,
                 max_new_tokens: Optional[Sequence[int]] = None, prompt_numbers: Optional[Sequence[int]] = None,
                 sample_numbers: Optional[Sequence[int]] = None) -> SampleOutput:
        """Samples config.group_size responses for every prompt (token id lists, unpadded).

        max_new_tokens: optional per-row budgets (num_prompts * group_size ints in [1, config.max_new_tokens],
        prompt-major); a row stops at its own budget. Responses are always config.max_new_tokens columns wide.
        prompt_numbers [num_prompts] / sample_numbers [num_prompts * group_size]: what seeds each row's key with
        the call key (default: the prompt's position and the sample's number in its group). A multi-turn rollout
        passes each trajectory's (task, sample), so its tokens do not depend on which trajectories share a call.
        """
        prompts = self._validate(prompt_ids, config)
        budgets = self._row_budgets(max_new_tokens, len(prompts), config)
        numbers = self._row_numbers(prompt_numbers, sample_numbers, len(prompts), config.group_size)
        key = jax.random.key(int(key)) if isinstance(key, (int, np.integer)) else key
        spec = self.decode_spec(config)
        temperature, top_p = np.float32(config.temperature), np.float32(config.top_p)
        width = self._width(prompts, config)
        if self.engine == "static":
            got = self._generate_static(prompts, budgets, numbers, config, spec, key, temperature, top_p)
        else:
            slots = self._continuous.slot_count(self.slots or config.prompts_per_batch * config.group_size,
                                                len(budgets), config.group_size)
            got = self._continuous.run(self._state, prompts, width, budgets, numbers, key, temperature, top_p, spec,
                                       slots, self.refill_prompts)
        return self._assemble(prompts, width, got, config)

    def decode_spec(self, config: SamplingConfig) -> DecodeSpec:
        """The static description of a call with `config` (the sampler's stop ids unless the config lists its own)."""
        stop_ids = self.stop_token_ids if config.stop_token_ids is None else config.stop_token_ids
        return DecodeSpec(max_new_tokens=config.max_new_tokens, group_size=config.group_size, greedy=config.greedy,
                          top_k=config.top_k, use_top_p=config.top_p < 1.0, stop_token_ids=stop_ids,
                          ignore_stop=config.ignore_stop, tempered_logprobs=config.tempered_logprobs,
                          pad_id=self.pad_id, cache_dtype=self.cache_dtype, prefill_chunk=config.prefill_chunk)

    def _width(self, prompts: Sequence[np.ndarray], config: SamplingConfig) -> int:
        """The padded prompt length of a group of prompts (its longest prompt's bucket)."""
        width = prompt_length_bucket(max(p.size for p in prompts), config)
        if config.prefill_chunk is not None and width > config.prefill_chunk and width % config.prefill_chunk:
            raise ValueError(f"prompt length bucket {width} is not a multiple of SamplingConfig.prefill_chunk "
                             f"({config.prefill_chunk}); change the buckets or the chunk")
        return width

    @staticmethod
    def _row_budgets(max_new_tokens: Optional[Sequence[int]], num_prompts: int, config: SamplingConfig
                     ) -> np.ndarray:
        rows = num_prompts * config.group_size
        if max_new_tokens is None:
            return np.full((rows,), config.max_new_tokens, np.int32)
        budgets = np.asarray(max_new_tokens)
        if budgets.shape != (rows,) or not np.issubdtype(budgets.dtype, np.integer):
            raise ValueError(f"max_new_tokens must hold one integer per row (num_prompts * group_size = {rows}), got "
                             f"shape {budgets.shape} dtype {budgets.dtype}")
        bad = np.flatnonzero((budgets < 1) | (budgets > config.max_new_tokens))
        if bad.size:
            raise ValueError(f"max_new_tokens[{bad[0]}] = {budgets[bad[0]]} is outside [1, "
                             f"SamplingConfig.max_new_tokens = {config.max_new_tokens}]")
        return budgets.astype(np.int32)

    @staticmethod
    def _row_numbers(prompt_numbers: Optional[Sequence[int]], sample_numbers: Optional[Sequence[int]],
                     num_prompts: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
        prompts = np.arange(num_prompts) if prompt_numbers is None else np.asarray(prompt_numbers)
        samples = np.tile(np.arange(group_size), num_prompts) if sample_numbers is None else np.asarray(sample_numbers)
        for name, value, size in (("prompt_numbers", prompts, num_prompts),
                                  ("sample_numbers", samples, num_prompts * group_size)):
            if value.shape != (size,) or not np.issubdtype(value.dtype, np.integer) or (value < 0).any() \
                    or (value >= 2 ** 31).any():
                raise ValueError(f"{name} must hold {size} non-negative int32 values, got shape {value.shape} "
                                 f"dtype {value.dtype}")
        return prompts.astype(np.int32), samples.astype(np.int32)

    def _generate_static(self, prompts: list[np.ndarray], budgets: np.ndarray, numbers: tuple[np.ndarray, np.ndarray],
                         config: SamplingConfig, spec: DecodeSpec, key: jax.Array, temperature: np.float32,
                         top_p: np.float32) -> dict[str, np.ndarray]:
        """The static engine: chunks of prompts_per_batch prompts, each decoded until its longest row stops. All
        chunks are dispatched before any result is fetched."""
        multiple = self.sharding.data_parallel_size if self.sharding else 1
        n, chunk = config.group_size, config.prompts_per_batch
        pending = []
        for start in range(0, len(prompts), chunk):
            group = prompts[start:start + chunk]
            width = self._width(group, config)
            batch = batch_bucket(len(group), config, multiple)
            ids = np.full((batch, width), self.pad_id, np.int32)
            seg = np.zeros((batch, width), np.int32)
            for row, p in enumerate(group):
                ids[row, width - p.size:] = p
                seg[row, width - p.size:] = 1
            real = slice(start * n, (start + len(group)) * n)
            index = np.arange(start, start + batch, dtype=np.int32)  # dummy prompts: any number
            index[:len(group)] = numbers[0][start:start + len(group)]
            samples = np.tile(np.arange(n, dtype=np.int32), batch)
            samples[:len(group) * n] = numbers[1][real]
            row_budgets = np.full((batch * n,), config.max_new_tokens, np.int32)
            row_budgets[:len(group) * n] = budgets[real]
            out = self._generate(self._state, self._place(ids), self._place(seg), self._place(index),
                                 self._place(samples), self._place(row_budgets), key, temperature, top_p, spec=spec)
            pending.append((len(group) * n, out))
        parts: dict[str, list[np.ndarray]] = collections.defaultdict(list)
        for real, out in pending:
            for name, value in out.items():
                parts[name].append(to_numpy(value)[:real])
        return {name: np.concatenate(values) for name, values in parts.items()}

    def _assemble(self, prompts: list[np.ndarray], width: int, got: dict[str, np.ndarray], config: SamplingConfig
                  ) -> SampleOutput:
        n = config.group_size
        prompt_ids = np.full((len(prompts), width), self.pad_id, np.int32)
        prompt_mask = np.zeros((len(prompts), width), np.int32)
        for i, p in enumerate(prompts):
            prompt_ids[i, width - p.size:] = p
            prompt_mask[i, width - p.size:] = 1
        lengths = got["lengths"].astype(np.int32)
        budget = config.max_new_tokens
        response_mask = (np.arange(budget)[None, :] < lengths[:, None]).astype(np.int32)
        texts = None
        if self.tokenizer is not None:
            texts = []
            for row, length, stopped in zip(got["tokens"], lengths, got["stopped"]):
                keep = row[:length - 1] if stopped else row[:length]
                texts.append(self.tokenizer.decode(keep.tolist(), skip_special_tokens=False))
        return SampleOutput(
            prompt_ids=np.repeat(prompt_ids, n, axis=0), prompt_mask=np.repeat(prompt_mask, n, axis=0),
            response_ids=got["tokens"].astype(np.int32), response_mask=response_mask,
            logprobs=got["logprobs"].astype(np.float32), lengths=lengths, stopped=got["stopped"].astype(bool),
            group_size=n, tempered_logprobs=got.get("tempered_logprobs"),
            texts=texts)
