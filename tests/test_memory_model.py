"""The memory model against reality on CPU: exact parameter/optimizer/reference bytes of a real GRPOTrainer, exact
autodiff residual bytes, a compiled update step's temporaries within a stated band, sharding arithmetic, mesh choice
and the memory_plan CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.tools import memory_model as mm
from toolrl_jax.models.config import ModelConfig
from toolrl_jax.models.decoder import CausalLM
from toolrl_jax.sharding import path_to_str

REPO_ROOT = Path(__file__).resolve().parents[1]


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _small(family: str = "qwen2", **overrides) -> ModelConfig:
    fields = dict(vocab_size=200, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16)
    fields.update(overrides)
    return ModelConfig.tiny(family, **fields)


@pytest.mark.parametrize("config", [
    ModelConfig.tiny("qwen2"), ModelConfig.tiny("llama"), ModelConfig.tiny("llama", attention_bias=True),
    ModelConfig.tiny("qwen2", tie_word_embeddings=True)], ids=["qwen2", "llama_tied", "llama_bias", "qwen2_tied"])
def test_param_shapes_are_the_models_state(config):
    _, state = nnx.split(CausalLM(config, rngs=nnx.Rngs(0)))
    real = {path_to_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(state)}
    assert dict(mm.param_shapes(config)) == real
    assert sum(int(np.prod(s)) for s in real.values()) == config.num_params


class _IdsTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("param_dtype,mu_dtype", [("float32", None), ("bfloat16", None), ("float32", "bfloat16")])
def test_trainer_state_bytes_are_predicted_exactly(param_dtype, mu_dtype):
    from toolrl_jax.optim import OptimizerConfig
    from toolrl_jax.training.grpo import GRPOConfig, GRPOTrainer

    config = ModelConfig.tiny("qwen2", dtype="bfloat16", param_dtype=param_dtype)
    grpo = GRPOConfig(prompts_per_step=2, group_size=2, mini_batch_prompts=2, micro_batch_rows=2, kl_coef=0.001,
                      max_prompt_length=8, max_response_length=4, optimizer=OptimizerConfig(mu_dtype=mu_dtype))
    trainer = GRPOTrainer(CausalLM(config, rngs=nnx.Rngs(0)), grpo, tokenizer=_IdsTokenizer(), pad_id=0,
                          stop_token_ids=(2,))
    assert _nbytes(trainer.params) == mm.param_bytes(config)
    moments = [x for x in jax.tree.leaves(trainer.opt_state) if x.ndim]
    assert _nbytes(moments) == mm.optimizer_state_bytes(config, mu_dtype) - mm.ADAMW_SCALAR_BYTES
    if param_dtype == "float32":  # the injected hyperparameters are float32 scalars
        assert _nbytes(trainer.opt_state) == mm.optimizer_state_bytes(config, mu_dtype)
    per_param = mm.bytes_per_parameter(config, mm.GRPOMemorySetup(reference=True, adam_mu_dtype=mu_dtype))
    assert per_param["adam_moments"] * config.num_params == _nbytes(moments)
    assert _nbytes(trainer.ref_params) == per_param["reference"] * config.num_params
    est = mm.estimate(config, mm.GRPOMemorySetup(reference=True, sampler_copy=False, adam_mu_dtype=mu_dtype))
    assert est.state["params"] + est.state["adam_moments"] - mm.ADAMW_SCALAR_BYTES + est.state["reference"] == (
        _nbytes(trainer.params) + _nbytes(moments) + _nbytes(trainer.ref_params))


def _residual_bytes(config: ModelConfig, rows: int, prompt: int, response: int, chunk: int | None = None) -> int:
    """Bytes of what jax.vjp keeps for the backward pass of the trainer's log-prob function (arguments excluded)."""
    from toolrl_jax.training.sequences import join_prompt_and_response, response_logprobs

    graphdef, params = nnx.split(CausalLM(config, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    v = config.vocab_size
    batch = join_prompt_and_response(rng.integers(3, v, (rows, prompt)), np.ones((rows, prompt), np.int32),
                                     rng.integers(3, v, (rows, response)), np.ones((rows, response), np.int32))
    batch = jax.tree.map(jnp.asarray, batch)

    def loss(p):
        logp, entropy = response_logprobs(graphdef, p, batch, logits_chunk_size=chunk)
        return logp.sum() + entropy.sum()

    # The vjp closure's leaves are its residuals; under jit they come back as outputs, parameters included.
    residuals = jax.tree.leaves(jax.jit(lambda p: jax.vjp(loss, p)[1])(params))
    args = [np.asarray(a) for a in jax.tree.leaves(params) + jax.tree.leaves(batch)]

    def is_argument(x) -> bool:
        x = np.asarray(x)
        return any(a.shape == x.shape and a.dtype == x.dtype and np.array_equal(a, x) for a in args)

    return sum(x.nbytes for x in residuals if not is_argument(x))


@pytest.mark.parametrize("config", [
    _small(dtype="bfloat16"), _small("llama", dtype="bfloat16", num_layers=3), _small(dtype="float32"),
    _small(dtype="bfloat16", remat=True, num_layers=3, tie_word_embeddings=True),
    _small("llama", dtype="bfloat16", remat=True, remat_policy="save_dots")],
    ids=["qwen2_bf16", "llama_tied_bf16_3layers", "qwen2_fp32", "qwen2_tied_bf16_remat", "llama_remat_save_dots"])
@pytest.mark.parametrize("chunk", [None, 3], ids=["one_head_pass", "head_chunks_of_3"])
def test_activation_model_counts_the_autodiff_residuals(config, chunk):
    rows, prompt, response = 3, 16, 8
    chunked = chunk is not None and chunk < response
    predicted = (mm.activation_bytes(config, rows, prompt + response, response, logits_chunk_size=chunk)
                 + mm.compute_copy_params(config, chunked) * mm.dtype_bytes(config.dtype))
    actual = _residual_bytes(config, rows, prompt, response, chunk)
    # Equal up to a handful of scalars (loop counters, the RoPE frequency constant): < 100 bytes of ~0.1-1 MB.
    assert abs(actual - predicted) < 100, (actual, predicted)


@pytest.mark.parametrize("shape", [(4, 128, 64, 2, 512, None), (2, 128, 120, 2, 4096, None),
                                   (2, 128, 120, 2, 4096, 32)], ids=["4x128", "vocab4096", "vocab4096_head_chunks"])
def test_compiled_update_step_temporaries_are_within_the_stated_band(shape):
    """A compiled (no remat) update step's temporary bytes on CPU are 60-105% of the estimate: the estimate counts
    autodiff residuals before XLA fuses some of them away (docs/memory.md)."""
    from toolrl_jax.optim import OptimizerConfig, make_optimizer
    from toolrl_jax.rl.ppo import PolicyLossConfig
    from toolrl_jax.training.actor import make_update_fn
    from toolrl_jax.training.sequences import join_prompt_and_response

    rows, seq, response, layers, vocab, chunk = shape
    config = _small(dtype="float32", vocab_size=vocab, hidden_size=64, intermediate_size=192, num_layers=layers)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    opt_config = OptimizerConfig()
    optimizer = make_optimizer(opt_config)
    prompt = seq - response
    data = join_prompt_and_response(np.ones((rows, prompt), np.int32), np.ones((rows, prompt), np.int32),
                                    np.ones((rows, response), np.int32), np.ones((rows, response), np.int32))
    data["old_logp"] = np.zeros((rows, response), np.float32)
    data["advantages"] = np.ones((rows, response), np.float32)
    minibatch = {k: v[None] for k, v in data.items()}
    def compile_update(chunk_size):
        fn = make_update_fn(graphdef, optimizer, opt_config, PolicyLossConfig(), logits_chunk_size=chunk_size)
        return fn.lower(params, jax.eval_shape(optimizer.init, params), frozen, minibatch).compile()

    compiled = compile_update(chunk)
    temp = compiled.memory_analysis().temp_size_in_bytes
    predicted = mm.train_step_estimate(config, rows, seq, response, logits_chunk_size=chunk)
    assert 0.6 <= temp / predicted["train"] <= 1.05, (temp, predicted)
    if chunk is not None:  # the chunked head really is smaller than the one-pass head, as predicted
        one_pass = compile_update(None).memory_analysis().temp_size_in_bytes
        predicted_one_pass = mm.train_step_estimate(config, rows, seq, response)["train"]
        assert temp < 0.8 * one_pass and predicted["train"] < 0.8 * predicted_one_pass, (temp, one_pass)
    # Arguments = params + optimizer state + the batch: the state part is exact.
    args = compiled.memory_analysis().argument_size_in_bytes
    assert args - _nbytes(minibatch) == predicted["state"]


def test_bytes_per_parameter_of_the_default_recipe():
    config = mm.model_config("qwen2.5-7b")  # bf16 compute, fp32 master weights
    per = mm.bytes_per_parameter(config, mm.GRPOMemorySetup())
    assert {k: per[k] for k in ("params", "adam_moments", "reference", "sampler_copy", "grads",
                                "grad_accumulator", "update_temporaries")} == {
        "params": 4, "adam_moments": 8, "reference": 2, "sampler_copy": 2, "grads": 4, "grad_accumulator": 4,
        "update_temporaries": 2}
    assert mm.bytes_per_parameter(config, mm.GRPOMemorySetup(reference_in_compute_dtype=False))["reference"] == 4
    # Every layer kernel and norm scale is cast; the untied embedding is not, and the chunked head (512 of 1024
    # response positions at a time) recomputes its lm_head cast: 2 bytes per parameter outside the vocabulary.
    biases = config.num_layers * (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
    vocab = config.vocab_size * config.hidden_size
    expected = 2 * (config.num_params - 2 * vocab - biases) / config.num_params
    assert per["compute_copies"] == pytest.approx(expected)
    one_pass = mm.bytes_per_parameter(config, mm.GRPOMemorySetup(logits_chunk_size=None))
    assert one_pass["compute_copies"] == pytest.approx(expected + 2 * vocab / config.num_params)
    remat = mm.bytes_per_parameter(config.replace(remat=True), mm.GRPOMemorySetup())
    assert remat["compute_copies"] < 0.2
    fp32 = mm.bytes_per_parameter(config.replace(dtype="float32"), mm.GRPOMemorySetup(reference=False))
    assert fp32["sampler_copy"] == fp32["reference"] == 0 and fp32["compute_copies"] < 2e-4  # norm broadcasts


def test_sharded_parameter_count_follows_the_partition_rules():
    config = ModelConfig.tiny("qwen2")  # h=32, 4 heads x 8, 2 KV heads, f=64, V=128, q/k/v biases, untied
    assert mm.sharded_params(config, (1, 1, 1)) == config.num_params
    h, f, v, layers = 32, 64, 128, 2
    q, kv = 32, 16
    # fsdp=2 splits every kernel and both vocab matrices in half; norms and biases stay whole.
    replicated = layers * (2 * h + q + 2 * kv) + h
    assert mm.sharded_params(config, (1, 2, 1)) == (config.num_params - replicated) / 2 + replicated
    # data parallelism replicates everything.
    assert mm.sharded_params(config, (4, 1, 1)) == config.num_params
    # tensor=4 cannot split 2 KV heads' [32, 16] kernels? 16 % 4 == 0, so it can; biases follow the heads.
    per_layer_tensor = (h * q + 2 * h * kv + q * h + 3 * h * f) / 4 + (q + 2 * kv) / 4 + 2 * h
    assert mm.sharded_params(config, (1, 1, 4)) == pytest.approx(layers * per_layer_tensor + 2 * v * h / 4 + h)


def test_kv_cache_and_layer_bytes_per_token():
    config = mm.model_config("qwen2.5-1.5b")  # 28 layers, 2 KV heads x 128, bf16 cache
    assert mm.kv_cache_bytes_per_token(config) == 2 * 28 * 256 * 2
    cudnn = mm.layer_activation_bytes_per_token(config.replace(attention_impl="cudnn"), 1024)
    xla = mm.layer_activation_bytes_per_token(config, 1024)
    assert xla - cudnn == 12 * 1024 * (1 + 8 + 2) + 8 * 12 - 4 * 12  # the [heads, seq] score buffers


def test_mesh_recommendations_for_the_documented_examples():
    # 1.5B: one 80 GB device needs remat with the spec's sequence lengths.
    plan = mm.recommend_mesh(mm.model_config("qwen2.5-1.5b"), 1, 80)
    assert plan.recommended is None
    cfg, setup, plan = mm.first_fitting_settings(mm.model_config("qwen2.5-1.5b"), 1, 80)
    assert cfg.remat and setup == mm.GRPOMemorySetup() and plan.recommended.mesh == (1, 1, 1)
    # 3B on one 80 GB device: with remat, one-row micro-batches and 32-prompt rollouts (the bf16 reference copy,
    # the chunked head and the released Sampler copy make the difference); not with fp32 reference or one-pass head.
    cfg, setup, plan = mm.first_fitting_settings(mm.model_config("qwen2.5-3b"), 1, 80)
    assert cfg.remat and (setup.micro_batch_rows, setup.rollout_prompts) == (1, 32)
    for costlier in (dict(reference_in_compute_dtype=False), dict(logits_chunk_size=None)):
        assert mm.first_fitting_settings(mm.model_config("qwen2.5-3b"), 1, 80, mm.GRPOMemorySetup(**costlier)) is None
    # 7B on 8 x 80 GB: remat and FSDP over 4 devices (2-way data parallel), no tensor parallelism.
    cfg, setup, plan = mm.first_fitting_settings(mm.model_config("qwen2.5-7b"), 8, 80)
    assert cfg.remat and plan.recommended.mesh == (2, 4, 1)
    # 32B does not fit on 8 x 80 GB even at one row per micro-batch (14 persistent bytes x 32.8B / 8 = 53 GiB, and
    # an update adds 10 more per parameter) ...
    assert mm.first_fitting_settings(mm.model_config("qwen2.5-32b"), 8, 80) is None
    # ... but fits FSDP-sharded over 16 of them, or over 8 H200s.
    cfg, _, plan = mm.first_fitting_settings(mm.model_config("qwen2.5-32b"), 16, 80)
    assert plan.recommended.mesh == (1, 16, 1)
    cfg, _, plan = mm.first_fitting_settings(mm.model_config("qwen2.5-32b"), 8, 141)
    assert plan.recommended.mesh == (1, 8, 1)
    # Per-device state shrinks with FSDP width and tensor splits must divide the heads.
    ests = {e.mesh: e for e in mm.recommend_mesh(mm.model_config("qwen2.5-7b"), 8, 80).candidates}
    assert ests[(1, 8, 1)].state_bytes < ests[(2, 4, 1)].state_bytes < ests[(8, 1, 1)].state_bytes
    assert ests[(1, 1, 8)].problems and not ests[(1, 2, 4)].problems
    from toolrl_jax.sharding import MeshConfig

    assert mm.estimate(mm.model_config("qwen2.5-7b"), mesh=MeshConfig(data=2, fsdp=-1), num_devices=8).as_dict() == \
        mm.estimate(mm.model_config("qwen2.5-7b"), mesh=(2, 4, 1)).as_dict()


def test_memory_plan_cli(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.memory_plan", "--model=preset:qwen2.5-7b",
                           "--devices=8", "--device_memory_gib=80", f"--json_out={out}"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Bytes per parameter" in proc.stdout and "First settings that fit: --remat=True" in proc.stdout
    plan = json.loads(out.read_text())
    assert plan["num_params"] == mm.model_config("qwen2.5-7b").num_params and not plan["fits"]
    assert plan["first_fitting_settings"]["mesh"] == [2, 4, 1] and len(plan["candidates"]) == 10
    bad = subprocess.run([sys.executable, "-m", "experiments.memory_plan", "--model=preset:nope"], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "unknown model preset 'preset:nope'" in bad.stderr


@pytest.mark.parametrize("base_dtype", [None, "bfloat16"])
def test_lora_trainer_state_bytes_are_predicted_exactly(base_dtype):
    from toolrl_jax.models.lora import LoRAConfig, apply_lora
    from toolrl_jax.training.grpo import GRPOConfig, GRPOTrainer

    config = ModelConfig.tiny("qwen2", dtype="bfloat16", param_dtype="float32")
    lora = LoRAConfig(rank=4, base_dtype=base_dtype)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    apply_lora(model, lora, jax.random.key(0))
    grpo = GRPOConfig(prompts_per_step=2, group_size=2, mini_batch_prompts=2, micro_batch_rows=2, kl_coef=0.001,
                      max_prompt_length=8, max_response_length=4, lora=lora)
    trainer = GRPOTrainer(model, grpo, tokenizer=_IdsTokenizer(), pad_id=0, stop_token_ids=(2,))
    adapters = sum(int(np.prod(s)) for _, s in mm.lora_param_shapes(config, 4))
    assert trainer.num_trainable == adapters
    est = mm.estimate(config, mm.GRPOMemorySetup(reference=True, lora_rank=4, lora_base_dtype=base_dtype))
    assert est.state["params"] == _nbytes(trainer.params) + _nbytes(trainer.frozen)
    moments = [x for x in jax.tree.leaves(trainer.opt_state) if x.ndim]
    assert est.state["adam_moments"] - mm.ADAMW_SCALAR_BYTES == _nbytes(moments) == 8 * adapters
    assert est.state["reference"] == _nbytes(trainer.ref_params) == 4 * adapters
    assert est.train["grads"] == 4 * adapters  # gradients of the adapters only
    full = mm.estimate(config, mm.GRPOMemorySetup(reference=True))
    assert est.state_bytes < full.state_bytes / 2
