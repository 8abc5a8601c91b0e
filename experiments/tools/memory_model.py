"""Memory model of GRPO training and rollout sampling: bytes per parameter, bytes per token, bytes per device.

Every figure is derived from a `ModelConfig`, a `GRPOMemorySetup` (the step's shapes) and a mesh (data, fsdp,
tensor), following what this codebase actually allocates:

* Per parameter (exact for the state pytrees): master weights in `param_dtype`, AdamW's two moments (optax keeps
  them in the parameter dtype), gradients (the `lax.scan` accumulator plus the micro-batch gradient being added), the
  compute-dtype weight copies that autodiff saves for the backward pass, the optimizer's update temporaries, the frozen
  reference copy GRPO keeps for its KL term, and the Sampler's compute-dtype copy used for decoding.
* Per token: the activations autodiff saves for the backward pass (the residual set of a jitted `jax.vjp` through
  `response_logprobs`, counted term by term below; `remat` keeps only each layer's input), the vocabulary-sized
  log-softmax buffers of response tokens, and the KV cache of rollout sampling.

The activation terms are the residuals JAX's autodiff keeps, before XLA fuses or reuses buffers, so they are an upper
bound on the compiled program's activation memory (tests/test_memory_model.py checks both: the residual count
exactly, and a compiled CPU step's temporary bytes within a stated band). Sharding follows the project's partition
rules (`toolrl_jax.sharding.DEFAULT_RULES`): dimensions that do not divide their mesh axes stay replicated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from toolrl_jax.models.config import PRESETS, ModelConfig
from toolrl_jax.sharding import DEFAULT_RULES, MeshConfig, PartitionRules, partition_spec

GIB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# make_optimizer's state scalars: three int32 step counts (inject_hyperparams, its schedule, scale_by_adam) and six
# injected hyperparameters (learning_rate, b1, b2, eps, eps_root, weight_decay), 4 bytes each with fp32 weights
# (optax stores them in the parameter dtype).
ADAMW_SCALAR_BYTES = 3 * 4 + 6 * 4
# Optimizer update temporaries (the `updates` tree and moment updates that are not written in place), as a fraction
# of the parameter bytes; measured from compiled update steps on CPU (2.49x param bytes of temporaries with fp32
# weights = 2 gradient buffers + 0.49).
UPDATE_TEMP_FRACTION = 0.5

# Shapes that PRESETS lacks, for planning only (no weights ship with the project).
EXTRA_PRESETS: dict[str, ModelConfig] = {
    "qwen2.5-14b": ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=13824, num_layers=48, num_heads=40,
        num_kv_heads=8, head_dim=128, rope_theta=1e6, tie_word_embeddings=False, attention_bias=True,
        rms_norm_eps=1e-5, bos_token_id=151643, eos_token_ids=(151645,), pad_token_id=151643),
    "qwen2.5-32b": ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=5120, intermediate_size=27648, num_layers=64, num_heads=40,
        num_kv_heads=8, head_dim=128, rope_theta=1e6, tie_word_embeddings=False, attention_bias=True,
        rms_norm_eps=1e-5, bos_token_id=151643, eos_token_ids=(151645,), pad_token_id=151643),
}


def model_config(name: str) -> ModelConfig:
    """A preset by name ('qwen2.5-7b' or 'preset:qwen2.5-7b'), from PRESETS or EXTRA_PRESETS."""
    key = name.split(":", 1)[1] if name.startswith("preset:") else name
    if key in PRESETS:
        return PRESETS[key]
    if key in EXTRA_PRESETS:
        return EXTRA_PRESETS[key]
    raise ValueError(f"unknown model preset {name!r}; known: {sorted(set(PRESETS) | set(EXTRA_PRESETS))}")


def dtype_bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


@dataclasses.dataclass(frozen=True)
class GRPOMemorySetup:
    """The shapes and options of one GRPO step that decide its memory (dtypes, remat and attention come from the
    ModelConfig).

    micro_batch_rows: rows per gradient-accumulation micro-batch, global (split over data x fsdp).
    prompt_len / response_len: padded prompt columns P and response budget R (training rows are P + R tokens).
    rollout_prompts: prompts whose rows are decoded at once (GRPOTrainer uses min(64, prompts_per_step)), each
      group_size times: the static engine's chunk, and the continuous engine's default slot count
      (rollout_prompts * group_size slots), so either way rollout_prompts * group_size rows of KV cache, however
      many rows the rollout has.
    prefill_chunk: prompt tokens per prefill piece (SamplingConfig.prefill_chunk; None = whole prompt at once).
    grad_accumulation: more than one micro-batch per update (a separate accumulator and micro-batch gradient).
    reference: keep a frozen reference copy of the weights (GRPO's KL term).
    reference_in_compute_dtype: the reference copy is kept in the compute dtype (GRPOConfig's default), else in
      param_dtype.
    sampler_copy: the Sampler keeps a compute-dtype copy of the weights (its default, cast_params=True); the trainer
      releases it for the update phase, so it counts in the sampling and log-prob phases only.
    logits_chunk_size: response positions per vocabulary projection in the log-prob head (GRPOConfig's
      logits_chunk_size; None = all at once).
    adam_mu_dtype: AdamW's first-moment dtype (OptimizerConfig.mu_dtype; None = param_dtype).
    lora_rank: LoRA adapters of this rank on every attention and MLP projection (LoRAConfig.rank; 0 = the weights
      train). The base is then frozen (no gradients, moments or reference copy: the reference is the base with
      zero adapters) and the adapters, in param_dtype and replicated, carry the optimizer state. Their activations
      (a rank-wide intermediate per projection and token) are left out: under 0.1% of a layer's.
    lora_base_dtype: the frozen base's dtype under LoRA (LoRAConfig.base_dtype; None = param_dtype).
    """

    micro_batch_rows: int = 8
    prompt_len: int = 2048
    response_len: int = 1024
    rollout_prompts: int = 64
    group_size: int = 4
    prefill_chunk: Optional[int] = 512
    grad_accumulation: bool = True
    reference: bool = True
    reference_in_compute_dtype: bool = True
    sampler_copy: bool = True
    logits_chunk_size: Optional[int] = 512
    adam_mu_dtype: Optional[str] = None
    lora_rank: int = 0
    lora_base_dtype: Optional[str] = None

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"GRPOMemorySetup.lora_rank must be >= 0, got {self.lora_rank}")
        for name in ("micro_batch_rows", "prompt_len", "response_len", "rollout_prompts", "group_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOMemorySetup.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prefill_chunk", "logits_chunk_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"GRPOMemorySetup.{name} must be >= 1 or None, got {getattr(self, name)}")

    @property
    def seq_len(self) -> int:
        return self.prompt_len + self.response_len

    @property
    def head_chunked(self) -> bool:
        """Whether the log-prob head projects the responses in more than one chunk."""
        return self.logits_chunk_size is not None and self.logits_chunk_size < self.response_len

    @property
    def head_positions(self) -> int:
        """Response positions projected to the vocabulary at once."""
        return self.logits_chunk_size if self.head_chunked else self.response_len

    @property
    def rollout_rows(self) -> int:
        return self.rollout_prompts * self.group_size

    def replace(self, **changes) -> "GRPOMemorySetup":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------- parameters
def param_shapes(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(path, shape) of every parameter of `CausalLM(config)`, in the '/'-joined form the partition rules match."""
    h, d, v, f = config.hidden_size, config.head_dim, config.vocab_size, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    out: list[tuple[str, tuple[int, ...]]] = [("embed/embedding", (v, h))]
    for i in range(config.num_layers):
        p = f"layers/{i}"
        out.append((f"{p}/input_norm/scale", (h,)))
        for name, width in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out.append((f"{p}/attn/{name}/kernel", (h, width)))
            if config.attention_bias:
                out.append((f"{p}/attn/{name}/bias", (width,)))
        out.append((f"{p}/attn/o_proj/kernel", (q, h)))
        if config.attention_bias and config.family == "llama":
            out.append((f"{p}/attn/o_proj/bias", (h,)))
        out.append((f"{p}/post_attn_norm/scale", (h,)))
        out.append((f"{p}/mlp/gate_proj/kernel", (h, f)))
        out.append((f"{p}/mlp/up_proj/kernel", (h, f)))
        out.append((f"{p}/mlp/down_proj/kernel", (f, h)))
    out.append(("final_norm/scale", (h,)))
    if not config.tie_word_embeddings:
        out.append(("lm_head/kernel", (h, v)))
    return out


def lora_param_shapes(config: ModelConfig, rank: int) -> list[tuple[str, tuple[int, ...]]]:
    """(path, shape) of the LoRA matrices `models.lora.apply_lora` adds with its default targets (every attention
    and MLP projection): A [in, rank] and B [rank, out] per projection."""
    h, f = config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    out = []
    for i in range(config.num_layers):
        for module, name, fan_in, fan_out in (("attn", "q_proj", h, q), ("attn", "k_proj", h, kv),
                                              ("attn", "v_proj", h, kv), ("attn", "o_proj", q, h),
                                              ("mlp", "gate_proj", h, f), ("mlp", "up_proj", h, f),
                                              ("mlp", "down_proj", f, h)):
            out += [(f"layers/{i}/{module}/{name}/lora_a", (fan_in, rank)),
                    (f"layers/{i}/{module}/{name}/lora_b", (rank, fan_out))]
    return out


def compute_copy_params(config: ModelConfig, head_chunked: bool = False) -> int:
    """Parameters whose compute-dtype copy (cast or broadcast) autodiff saves for the backward pass.

    The norm scales' broadcasts are saved in any case (2 per layer and the final norm; with remat only the final
    one). With dtype != param_dtype the casts are saved too: without remat every kernel and the output matrix
    (lm_head, or the embedding when tied; an untied embedding is looked up in its own dtype); with remat the layers
    recompute their casts, leaving the output matrix. A chunked log-prob head (`head_chunked`) recomputes the
    output matrix's cast inside each chunk, so it is not saved either.
    """
    h, v, layers = config.hidden_size, config.vocab_size, config.num_layers
    output_cast = v * h if _casts(config) and not head_chunked else 0
    if config.remat:
        return h + output_cast
    norms = (2 * layers + 1) * h
    if not _casts(config):
        return norms
    layer_kernels = sum(math.prod(s) for path, s in param_shapes(config)
                        if path.endswith("/kernel") and path.startswith("layers/"))
    return layer_kernels + output_cast + norms


def _casts(config: ModelConfig) -> bool:
    return config.dtype != config.param_dtype


def shard_fraction(path: str, shape: Sequence[int], mesh: tuple[int, int, int],
                   rules: PartitionRules = DEFAULT_RULES) -> float:
    """The fraction of an array one device holds under the partition rules on a (data, fsdp, tensor) mesh."""
    sizes = dict(zip(("data", "fsdp", "tensor"), mesh))
    spec = partition_spec(path, shape, sizes, rules)
    split = 1
    for axes in spec:
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        split *= math.prod(sizes[a] for a in names)
    return 1.0 / split


def sharded_params(config: ModelConfig, mesh: tuple[int, int, int] = (1, 1, 1)) -> float:
    """Parameters held by one device (all of them on a 1x1x1 mesh)."""
    return _sharded(param_shapes(config), mesh)


def _sharded(shapes: Sequence[tuple[str, tuple[int, ...]]], mesh: tuple[int, int, int]) -> float:
    """Elements of these (path, shape) arrays one device holds under the partition rules."""
    import logging

    logger = logging.getLogger("toolrl_jax.sharding")
    level = logger.level
    logger.setLevel(logging.ERROR)  # non-divisible dims are expected here (e.g. 2 KV heads over tensor=4)
    try:
        return sum(math.prod(s) * shard_fraction(p, s, mesh) for p, s in shapes)
    finally:
        logger.setLevel(level)


def param_bytes(config: ModelConfig) -> int:
    """Bytes of the parameter pytree (master weights in param_dtype)."""
    return config.num_params * dtype_bytes(config.param_dtype)


def optimizer_state_bytes(config: ModelConfig, mu_dtype: Optional[str] = None) -> int:
    """Bytes of `make_optimizer(...).init(params)`: AdamW's mu (mu_dtype, default the parameter dtype) and nu
    (parameter dtype) plus its scalars."""
    p = dtype_bytes(config.param_dtype)
    return config.num_params * (dtype_bytes(mu_dtype or config.param_dtype) + p) + ADAMW_SCALAR_BYTES


def bytes_per_parameter(config: ModelConfig, setup: GRPOMemorySetup = GRPOMemorySetup()) -> dict[str, float]:
    """Bytes each parameter costs in a GRPO run, by what holds them.

    Persistent: params, adam_moments, reference, sampler_copy. During an update: grads, grad_accumulator,
    compute_copies (the casts autodiff saves, averaged over all parameters; see `compute_copy_params`) and
    update_temporaries.
    """
    p, c = dtype_bytes(config.param_dtype), dtype_bytes(config.dtype)
    casts = _casts(config)
    out = {
        "params": float(p),
        "adam_moments": float(dtype_bytes(setup.adam_mu_dtype or config.param_dtype) + p),
        "reference": float(c if setup.reference_in_compute_dtype else p) if setup.reference else 0.0,
        "sampler_copy": float(c) if setup.sampler_copy and casts else 0.0,
        "grads": float(p),
        "grad_accumulator": float(p) if setup.grad_accumulation else 0.0,
        "compute_copies": c * compute_copy_params(config, setup.head_chunked) / config.num_params,
        "update_temporaries": UPDATE_TEMP_FRACTION * p,
    }
    return out


# ---------------------------------------------------------------------------------------------- activations
def _dims(config: ModelConfig, tensor: int) -> dict[str, float]:
    """Model widths as one device sees them with `tensor`-way head/FFN/vocab sharding (replicated if not divisible)."""
    t_heads = tensor if config.num_heads % tensor == 0 else 1
    t_kv = tensor if config.num_kv_heads % tensor == 0 else 1
    t_ffn = tensor if config.intermediate_size % tensor == 0 else 1
    t_vocab = tensor if config.vocab_size % tensor == 0 else 1
    return {"h": config.hidden_size, "q": config.num_heads * config.head_dim / t_heads,
            "kv": config.num_kv_heads * config.head_dim / t_kv, "f": config.intermediate_size / t_ffn,
            "nh": config.num_heads / t_heads, "d": config.head_dim, "v": config.vocab_size / t_vocab}


def layer_activation_bytes_per_token(config: ModelConfig, seq_len: int, tensor: int = 1) -> float:
    """Bytes one decoder layer saves for its backward pass per token, without remat (the autodiff residuals).

    Compute dtype (c bytes): four hidden-size activations (norm outputs and residual-stream values), q, k, v, rope
    cos/sin, the attention output and the SwiGLU intermediates (gate, up, three from silu, their product); float32:
    both norms' normalised activations and statistics. Attention with the XLA einsum path also keeps the
    [heads, seq_len] mask, float32 scores and probabilities, their compute-dtype copy and softmax sums; cuDNN's fused
    kernel keeps only the softmax statistics.
    """
    c = dtype_bytes(config.dtype)
    w = _dims(config, tensor)
    linear = c * (4 * w["h"] + 2 * w["q"] + 2 * w["kv"] + 6 * w["f"] + 4 * w["d"])
    norms = 4 * 2 * w["h"] + 16
    if config.attention_impl == "cudnn":
        attention = 4 * w["nh"]
    else:
        attention = w["nh"] * seq_len * (1 + 8 + c) + 8 * w["nh"]
    return linear + norms + attention


def logits_bytes_per_token(config: ModelConfig, tensor: int = 1) -> float:
    """Saved bytes per response token of the log-prob head: float32 log-softmax, its exp (entropy) and softmax
    buffers over the vocabulary, the sliced hidden state and two scalars."""
    w = _dims(config, tensor)
    return 12 * w["v"] + dtype_bytes(config.dtype) * w["h"] + 8


def chunked_head_bytes_per_token(config: ModelConfig) -> float:
    """Saved bytes per (chunk-padded) response position of a chunked log-prob head: the chunk's hidden state and
    target id, the inputs it is recomputed from."""
    return dtype_bytes(config.dtype) * config.hidden_size + 4


def activation_bytes(config: ModelConfig, rows: float, seq_len: int, response_len: int, tensor: int = 1,
                     logits_chunk_size: Optional[int] = None) -> float:
    """Bytes autodiff saves for the backward pass of `rows` training rows (prompt + response = seq_len tokens).

    Without remat: every layer's residuals (`layer_activation_bytes_per_token`). With remat: each layer's input
    only, plus the attention mask once. Both add the embedding/final-norm terms and the response tokens' log-prob
    head: vocabulary-sized buffers per token, or with `logits_chunk_size` < response_len only each position's
    hidden state (`chunked_head_bytes_per_token`, positions padded to whole chunks). Compute-dtype weight copies are
    not included (see `compute_copy_params`).
    """
    c = dtype_bytes(config.dtype)
    w = _dims(config, tensor)
    tokens = rows * seq_len
    if logits_chunk_size is not None and logits_chunk_size < response_len:
        padded = -(-response_len // logits_chunk_size) * logits_chunk_size
        head = rows * padded * chunked_head_bytes_per_token(config)
    else:
        head = rows * response_len * logits_bytes_per_token(config, tensor)
    outside = tokens * (c * w["h"] + 4 * w["h"] + 12) + head
    if config.remat:  # layer inputs (+ the projections' outputs under "save_dots") + one bool mask
        layers = config.num_layers * tokens * remat_layer_bytes_per_token(config, tensor) + tokens * seq_len
    else:
        layers = config.num_layers * tokens * layer_activation_bytes_per_token(config, seq_len, tensor)
    return layers + outside


def remat_layer_bytes_per_token(config: ModelConfig, tensor: int = 1) -> float:
    """Bytes a rematerialised layer keeps per token: its input, and under remat_policy="save_dots" the outputs of
    the projection matmuls its backward pass needs too (q, k, v, o, gate, up; the down projection only feeds the
    residual add; biases and everything else are recomputed)."""
    c = dtype_bytes(config.dtype)
    w = _dims(config, tensor)
    if config.remat_policy == "save_dots":
        return c * (2 * w["h"] + w["q"] + 2 * w["kv"] + 2 * w["f"])
    return c * w["h"]


def kv_cache_bytes_per_token(config: ModelConfig, cache_dtype: Optional[str] = None, tensor: int = 1) -> float:
    """KV-cache bytes per cached token (keys + values of every layer) on one device."""
    w = _dims(config, tensor)
    return 2 * config.num_layers * w["kv"] * dtype_bytes(cache_dtype or config.dtype)


# ---------------------------------------------------------------------------------------------- estimate
@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device by phase: `state` lives throughout; `train`, `logprob` and `sampling` are each added to it
    while that phase runs (the phases never overlap). peak = state + the largest phase."""

    mesh: tuple[int, int, int]
    state: dict[str, float]
    train: dict[str, float]
    logprob: dict[str, float]
    sampling: dict[str, float]
    problems: tuple[str, ...] = ()  # settings this mesh cannot run
    notes: tuple[str, ...] = ()  # adjustments the estimate assumed

    @property
    def state_bytes(self) -> float:
        return sum(self.state.values())

    def phase_bytes(self, phase: str) -> float:
        return self.state_bytes + sum(getattr(self, phase).values())

    @property
    def peak_phase(self) -> str:
        return max(("train", "logprob", "sampling"), key=self.phase_bytes)

    @property
    def peak_bytes(self) -> float:
        return self.phase_bytes(self.peak_phase)

    def as_dict(self) -> dict:
        return {"mesh": {"data": self.mesh[0], "fsdp": self.mesh[1], "tensor": self.mesh[2]},
                "state": self.state, "train": self.train, "logprob": self.logprob, "sampling": self.sampling,
                "peak_phase": self.peak_phase, "peak_bytes": self.peak_bytes,
                "phase_bytes": {k: self.phase_bytes(k) for k in ("train", "logprob", "sampling")},
                "problems": list(self.problems), "notes": list(self.notes)}


def estimate(config: ModelConfig, setup: GRPOMemorySetup = GRPOMemorySetup(),
             mesh: tuple[int, int, int] | MeshConfig = (1, 1, 1), cache_dtype: Optional[str] = None,
             num_devices: Optional[int] = None) -> MemoryEstimate:
    """Per-device bytes of a GRPO step for `config` on a (data, fsdp, tensor) mesh, given as sizes or as a
    `MeshConfig` resolved for `num_devices`."""
    if isinstance(mesh, MeshConfig):
        if num_devices is None:
            raise ValueError("estimate: a MeshConfig needs num_devices")
        mesh = mesh.resolve(num_devices)
    data, fsdp, tensor = mesh
    if min(mesh) < 1:
        raise ValueError(f"mesh sizes must be >= 1, got {mesh}")
    problems, notes = [], []
    dp = data * fsdp
    if setup.micro_batch_rows < dp:
        notes.append(f"needs micro_batch_rows >= data*fsdp = {dp} (one row per device); counted as {dp}")
    elif setup.micro_batch_rows % dp:
        problems.append(f"micro_batch_rows={setup.micro_batch_rows} is not a multiple of data*fsdp={dp}")
    if tensor > 1 and config.num_heads % tensor:
        problems.append(f"tensor={tensor} does not divide num_heads={config.num_heads}")
    c = dtype_bytes(config.dtype)
    n_dev = sharded_params(config, mesh)
    per_param = bytes_per_parameter(config, setup)
    state = {k: per_param[k] * n_dev for k in ("params", "adam_moments", "reference")}
    state["adam_moments"] += ADAMW_SCALAR_BYTES
    trained = n_dev  # parameters with gradients, moments and optimizer temporaries, per device
    compute_copies = per_param["compute_copies"] * n_dev
    sampler_copy = per_param["sampler_copy"] * n_dev  # released by the trainer for its updates
    if setup.lora_rank:
        trained = _sharded(lora_param_shapes(config, setup.lora_rank), mesh)
        base = config.replace(param_dtype=setup.lora_base_dtype or config.param_dtype)
        adapter_casts = c * trained if _casts(config) else 0.0
        state["params"] = dtype_bytes(base.param_dtype) * n_dev + per_param["params"] * trained
        state["adam_moments"] = per_param["adam_moments"] * trained + ADAMW_SCALAR_BYTES
        # The reference is the base: zero adapters (param_dtype) over the same frozen weights.
        state["reference"] = per_param["params"] * trained if setup.reference else 0.0
        compute_copies = c * compute_copy_params(base, setup.head_chunked) / config.num_params * n_dev + adapter_casts
        sampler_copy = (c * n_dev if _casts(base) else 0.0) + adapter_casts if setup.sampler_copy else 0.0

    rows = max(setup.micro_batch_rows / dp, 1.0)  # batch rows one device trains at a time
    t, r = setup.seq_len, setup.response_len
    layer_params = sum(math.prod(s) for path, s in param_shapes(config) if path.startswith("layers/0/"))
    gathered = 2 * layer_params * c / tensor if fsdp > 1 else 0.0  # two layers' all-gathered compute weights
    per_layer_tok = layer_activation_bytes_per_token(config, t, tensor)
    train = {k: per_param[k] * trained for k in ("grads", "grad_accumulator", "update_temporaries")}
    train["compute_copies"] = compute_copies
    train["activations"] = activation_bytes(config, rows, t, r, tensor, setup.logits_chunk_size)
    w = _dims(config, tensor)
    # Backward working set: the float32 logits gradient and its compute-dtype cast (a chunked head also recomputes
    # the chunk's log-softmax buffers), or under remat the residuals of the layer being recomputed, whichever is
    # larger (a layer's cotangents replace the residuals they consume).
    layer_ws = rows * t * per_layer_tok if config.remat else 0.0
    logits_bwd = rows * setup.head_positions * w["v"] * (4 + c + (12 if setup.head_chunked else 0))
    train["backward_working_set"] = max(layer_ws, logits_bwd)
    train["gathered_weights"] = gathered

    logprob = {
        "sampler_copy": sampler_copy,
        "layer_working_set": rows * t * per_layer_tok,
        "hidden_states": 2 * rows * t * c * w["h"],
        "logits": rows * setup.head_positions * 12 * w["v"],
        "gathered_weights": gathered,
    }

    prompts_dev = max(setup.rollout_prompts / dp, 1.0)
    rows_dev = max(setup.rollout_rows / dp, 1.0)
    kv_tok = kv_cache_bytes_per_token(config, cache_dtype, tensor)
    chunk = min(setup.prefill_chunk or setup.prompt_len, setup.prompt_len)
    sampling = {
        "sampler_copy": sampler_copy,
        "kv_cache": rows_dev * t * kv_tok,
        "prompt_kv_cache": prompts_dev * setup.prompt_len * kv_tok,  # before it is copied to each sample's rows
        "prefill_scores": prompts_dev * w["nh"] * chunk * setup.prompt_len * 12,
        "decode_logits": rows_dev * w["v"] * 4 * 3,
        "gathered_weights": gathered / 2,
    }
    return MemoryEstimate(mesh=tuple(mesh), state=state, train=train, logprob=logprob, sampling=sampling,
                          problems=tuple(problems), notes=tuple(notes))


def train_step_estimate(config: ModelConfig, rows: int, seq_len: int, response_len: int,
                        grad_accumulation: bool = False, logits_chunk_size: Optional[int] = None
                        ) -> dict[str, float]:
    """Single-device bytes of one `make_update_fn` step (no reference, no sampler): what bench_train measures."""
    setup = GRPOMemorySetup(micro_batch_rows=rows, prompt_len=seq_len - response_len, response_len=response_len,
                            grad_accumulation=grad_accumulation, reference=False, sampler_copy=False,
                            logits_chunk_size=logits_chunk_size)
    est = estimate(config, setup)
    return {"state": est.state_bytes, "train": sum(est.train.values()), "peak": est.phase_bytes("train"),
            "activations": est.train["activations"]}


# ---------------------------------------------------------------------------------------------- mesh choice
@dataclasses.dataclass(frozen=True)
class MeshPlan:
    """The recommended mesh (None when nothing fits) and every candidate that was considered."""

    recommended: Optional[MemoryEstimate]
    candidates: tuple[MemoryEstimate, ...]
    usable_bytes: float

    def fits(self, est: MemoryEstimate) -> bool:
        return not est.problems and est.peak_bytes <= self.usable_bytes


def mesh_candidates(num_devices: int) -> list[tuple[int, int, int]]:
    """Every (data, fsdp, tensor) whose product is num_devices."""
    out = []
    for tensor in range(1, num_devices + 1):
        if num_devices % tensor:
            continue
        for fsdp in range(1, num_devices // tensor + 1):
            if (num_devices // tensor) % fsdp == 0:
                out.append((num_devices // tensor // fsdp, fsdp, tensor))
    return out


def recommend_mesh(config: ModelConfig, num_devices: int, device_memory_gib: float,
                   setup: GRPOMemorySetup = GRPOMemorySetup(), usable_fraction: float = 0.9) -> MeshPlan:
    """Picks a mesh whose estimated peak fits in `usable_fraction` of each device's memory.

    Preference among fitting meshes: the smallest tensor axis (tensor parallelism communicates inside every layer),
    then the largest data axis (FSDP only as wide as memory needs: fewer all-gathers of weights).
    """
    if num_devices < 1 or device_memory_gib <= 0 or not 0 < usable_fraction <= 1:
        raise ValueError("num_devices >= 1, device_memory_gib > 0 and 0 < usable_fraction <= 1 are required")
    usable = device_memory_gib * GIB * usable_fraction
    cands = tuple(estimate(config, setup, m) for m in mesh_candidates(num_devices))
    plan = MeshPlan(recommended=None, candidates=cands, usable_bytes=usable)
    fitting = [e for e in cands if plan.fits(e)]
    best = min(fitting, key=lambda e: (e.mesh[2], -e.mesh[0], e.peak_bytes), default=None)
    return dataclasses.replace(plan, recommended=best)


def first_fitting_settings(config: ModelConfig, num_devices: int, device_memory_gib: float,
                           setup: GRPOMemorySetup = GRPOMemorySetup(), usable_fraction: float = 0.9
                           ) -> Optional[tuple[ModelConfig, GRPOMemorySetup, MeshPlan]]:
    """The least change to (remat, micro_batch_rows, rollout_prompts) under which some mesh fits, or None.

    Tried in this order: the settings as given; remat on; then halving micro_batch_rows down to 1; then halving
    rollout_prompts down to 1. Attention, dtypes and the reference copy are left as given: those are choices with
    other costs (see docs/memory.md).
    """
    def halvings(n: int) -> list[int]:
        out = [n]
        while out[-1] > 1:
            out.append(max(1, out[-1] // 2))
        return out

    tries = [(config, setup), (config.replace(remat=True), setup)]
    remat = config.replace(remat=True)
    tries += [(remat, setup.replace(micro_batch_rows=m)) for m in halvings(setup.micro_batch_rows)[1:]]
    tries += [(remat, setup.replace(micro_batch_rows=1, rollout_prompts=r))
              for r in halvings(setup.rollout_prompts)[1:]]
    for cfg, candidate in tries:
        plan = recommend_mesh(cfg, num_devices, device_memory_gib, candidate, usable_fraction)
        if plan.recommended is not None:
            return cfg, candidate, plan
    return None


def format_bytes(n: float) -> str:
    return f"{n / GIB:,.2f} GiB" if abs(n) >= GIB / 10 else f"{n / 2 ** 20:,.1f} MiB"


__all__ = ["ADAMW_SCALAR_BYTES", "EXTRA_PRESETS", "GRPOMemorySetup", "MemoryEstimate", "MeshPlan",
           "activation_bytes", "bytes_per_parameter", "chunked_head_bytes_per_token", "estimate",
           "first_fitting_settings", "kv_cache_bytes_per_token", "layer_activation_bytes_per_token",
           "logits_bytes_per_token", "mesh_candidates", "model_config", "optimizer_state_bytes", "param_bytes",
           "param_shapes", "recommend_mesh", "remat_layer_bytes_per_token", "sharded_params", "train_step_estimate"]
