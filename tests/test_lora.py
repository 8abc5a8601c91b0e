"""LoRA (models/lora.py): fresh adapters leave the model exact, the adapter math and its merge, PEFT loads our adapter
folder with the same logits, and GRPO/PPO train the adapters only with the base as the KL reference."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from toolrl_jax.models.config import ModelConfig
from toolrl_jax.models.decoder import CausalLM
from toolrl_jax.models.hf_io import load_hf_model, save_hf_model
from toolrl_jax.models.lora import (
    LoRAConfig,
    adapted_layers,
    apply_lora,
    base_adapters,
    has_lora,
    merge_lora,
    save_peft_adapter,
)

# The shared compilation cache (conftest.py): the GRPO/PPO/dropout tests build the same sampler and log-prob
# programs again.
pytestmark = pytest.mark.usefixtures("compilation_cache")


def _logits(model: CausalLM, ids: np.ndarray) -> np.ndarray:
    b, t = ids.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return np.asarray(model(jnp.asarray(ids), positions, jnp.ones((b, t), jnp.int32))[0])


def _ids(vocab: int, shape=(2, 7)) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, shape)


def _randomize_b(model: CausalLM, seed: int = 1) -> None:
    """Non-zero B matrices (as after training), so the adapters change the outputs."""
    for i, dense in enumerate(adapted_layers(model).values()):
        key = jax.random.fold_in(jax.random.key(seed), i)
        dense.lora_b = type(dense.lora_b)(0.05 * jax.random.normal(key, dense.lora_b.shape, dense.lora_b.dtype))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fresh_adapters_reproduce_the_base_logits_exactly(family):
    model = CausalLM(ModelConfig.tiny(family), rngs=nnx.Rngs(0))
    ids = _ids(model.config.vocab_size)
    before = _logits(model, ids)
    adapted = apply_lora(model, LoRAConfig(rank=4, alpha=8.0), jax.random.key(0))
    assert len(adapted) == 7 * model.config.num_layers and has_lora(model)
    np.testing.assert_array_equal(_logits(model, ids), before)


def test_adapter_math_merge_and_targets():
    model = CausalLM(ModelConfig.tiny("qwen2"), rngs=nnx.Rngs(0))
    adapted = apply_lora(model, LoRAConfig(rank=2, alpha=6.0, target_modules=r"attn/(q|v)_proj"), jax.random.key(0))
    assert adapted == [f"layers/{i}/attn/{p}_proj" for i in range(model.config.num_layers) for p in "qv"]
    _randomize_b(model)
    dense = model.layers[0].attn.q_proj
    x = jax.random.normal(jax.random.key(2), (3, dense.kernel.shape[0]))
    want = x @ dense.kernel[...] + dense.bias[...] + 3.0 * (x @ dense.lora_a[...]) @ dense.lora_b[...]
    np.testing.assert_allclose(np.asarray(dense(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    # A is PEFT's Kaiming-uniform: inside +-1/sqrt(in), not all equal.
    a = np.asarray(dense.lora_a[...])
    assert np.abs(a).max() <= 1 / np.sqrt(a.shape[0]) and a.std() > 0
    ids = _ids(model.config.vocab_size)
    merged = merge_lora(model)
    assert not has_lora(merged) and has_lora(model)
    np.testing.assert_allclose(_logits(merged, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    # The base of the adapters (B = 0) is the model without them.
    graphdef, adapters, frozen = nnx.split(model, lambda path, _: str(path[-1]) in ("lora_a", "lora_b"), ...)
    base = nnx.merge(graphdef, base_adapters(adapters), frozen)
    plain = CausalLM(ModelConfig.tiny("qwen2"), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(_logits(base, ids), _logits(plain, ids))
    with pytest.raises(ValueError, match="LoRA adapters"):
        save_hf_model(model, "/nonexistent/never_written")
    with pytest.raises(ValueError, match="matches no projection"):
        apply_lora(plain, LoRAConfig(rank=2, target_modules="nothing_here"), jax.random.key(0))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRAConfig(rank=2), jax.random.key(0))
    with pytest.raises(ValueError, match="rank must be"):
        LoRAConfig(rank=-1)


def test_bfloat16_base_keeps_float32_adapters():
    model = CausalLM(ModelConfig.tiny("llama"), rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=2, base_dtype="bfloat16"), jax.random.key(0))
    dense = model.layers[0].mlp.up_proj
    assert dense.kernel.dtype == jnp.bfloat16 and model.embed.embedding.dtype == jnp.bfloat16
    assert dense.lora_a.dtype == jnp.float32 and dense.lora_b.dtype == jnp.float32
    assert np.isfinite(_logits(model, _ids(model.config.vocab_size))).all()


def test_peft_loads_the_adapter_folder_with_the_same_logits(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    for family in ("llama", "qwen2"):
        model = CausalLM(ModelConfig.tiny(family), rngs=nnx.Rngs(0))
        base_dir = save_hf_model(model, tmp_path / family / "base", dtype="float32")
        apply_lora(model, LoRAConfig(rank=4, alpha=8.0, target_modules=r"(q|k|o|up|down)_proj", dropout=0.1),
                   jax.random.key(0))
        _randomize_b(model)
        adapter_dir = save_peft_adapter(model, tmp_path / family / "adapter", base_model=str(base_dir))
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["lora_alpha"] == 8.0 and len(config["target_modules"]) == 5 * 2
        assert config["lora_dropout"] == 0.1  # PEFT drops only in train mode; eval logits are compared below
        hf = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
        hf = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
        ids = _ids(model.config.vocab_size)
        with torch.no_grad():
            theirs = hf(torch.as_tensor(ids)).logits.numpy()
        np.testing.assert_allclose(_logits(model, ids), theirs, atol=1e-4, rtol=1e-4, err_msg=family)
        # and the merged export equals the adapted model as a plain transformers model
        merged_dir = save_hf_model(merge_lora(model), tmp_path / family / "merged", dtype="float32")
        plain = AutoModelForCausalLM.from_pretrained(merged_dir, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            np.testing.assert_allclose(plain(torch.as_tensor(ids)).logits.numpy(), theirs, atol=1e-4, rtol=1e-4)


def _lora_trainer(folder, **overrides):
    from toolrl_jax.datasets.synthetic import make_synthetic_split
    from toolrl_jax.optim import OptimizerConfig
    from toolrl_jax.tokenization import encode_chat, load_tokenizer, stop_token_ids
    from toolrl_jax.training.grpo import GRPOConfig, GRPOTrainer

    _, model = load_hf_model(folder, dtype="float32")
    fields = dict(prompts_per_step=4, group_size=2, mini_batch_prompts=2, micro_batch_rows=2, max_prompt_length=96,
                  max_response_length=8, kl_coef=0.01, val_every=0, optimizer=OptimizerConfig(learning_rate=1e-2),
                  lora=LoRAConfig(rank=4))
    config = GRPOConfig(**{**fields, **overrides})
    apply_lora(model, config.lora, jax.random.key(0))
    tok = load_tokenizer(folder)
    train, _ = make_synthetic_split(4, 0, seed=1)
    prompts = [encode_chat(tok, e.prompt_messages)[-96:] for e in train]
    trainer = GRPOTrainer(model, config, tokenizer=tok, pad_id=tok.pad_token_id, stop_token_ids=stop_token_ids(tok))
    return trainer, prompts, [e.ground_truth for e in train]


@pytest.mark.parametrize("algorithm", ["grpo", "ppo"])
def test_lora_trains_only_the_adapters_against_the_base_as_reference(tiny_chat_model_dir, algorithm):
    from toolrl_jax.sharding import path_to_str

    extra = dict(algorithm="ppo", group_size=1, micro_batch_rows=1) if algorithm == "ppo" else {}
    trainer, prompts, truths = _lora_trainer(tiny_chat_model_dir, **extra)
    _, base = load_hf_model(tiny_chat_model_dir, dtype="float32")
    trained = {path_to_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainer.params)}
    assert trained and all(p.endswith(("/lora_a", "/lora_b")) for p in trained)
    opt_leaves = sum(x.size for x in jax.tree.leaves(trainer.opt_state) if x.ndim)
    assert opt_leaves == 2 * trainer.num_trainable  # AdamW's two moments, for the adapters only
    for _ in range(2):
        result = trainer.train_step(prompts, truths, jax.random.key(trainer.step))
    assert np.isfinite(result.metrics["actor/pg_loss"]) and result.metrics["kl/old_ref_k1"] != 0.0
    policy = trainer.model()
    b = [np.asarray(d.lora_b[...]) for d in adapted_layers(policy).values()]
    assert any(np.abs(x).max() > 0 for x in b), "the adapters must move"
    # The base weights are untouched, bit for bit; the reference is that base.
    frozen = dict(jax.tree_util.tree_leaves_with_path(nnx.state(base)))
    after = {k: v for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(policy))
             if not path_to_str(k).endswith(("lora_a", "lora_b"))}
    assert after.keys() == frozen.keys()
    for key, value in frozen.items():
        np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(value), err_msg=path_to_str(key))
    reference = nnx.merge(trainer.graphdef, trainer.ref_params, trainer.frozen)
    ids = np.asarray([prompts[0][:20]])
    np.testing.assert_array_equal(_logits(reference, ids), _logits(base, ids))
    assert not np.array_equal(_logits(policy, ids), _logits(base, ids))
    # The sampler decodes the adapted policy: greedy output equals the merged model's.
    from toolrl_jax.sampling.sampler import Sampler
    cfg = trainer.sampling_config(greedy=True, max_new_tokens=6)
    ours = trainer.sampler.generate(prompts[:2], cfg, jax.random.key(0))
    merged = Sampler(merge_lora(policy), pad_id=trainer.tokenizer.pad_token_id,
                     stop_token_ids=trainer.sampler.stop_token_ids).generate(prompts[:2], cfg, jax.random.key(0))
    np.testing.assert_array_equal(ours.response_ids, merged.response_ids)


def test_lora_config_conflicts_name_the_flags():
    from toolrl_jax.training.grpo import GRPOConfig

    with pytest.raises(ValueError, match="lora_rank=4 trains LoRA adapters only"):
        GRPOConfig(lora=LoRAConfig(rank=4), train_last_layers=2)


def test_bench_lora_runs_both_engines_and_they_agree(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "bench_lora.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.bench_lora", "--model=tiny", "--batch=2",
                           "--prompt_len=8", "--new_tokens=4", "--repeats=1", f"--json_out={out}"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [r["engine"] for r in report["rows"]] == ["adapters", "merged"]
    assert all(r["seconds"] > 0 and r["new_tokens_per_s"] > 0 for r in report["rows"])
    assert report["greedy_token_agreement"] == 1.0 and report["merge_s"] > 0


def test_run_sft_with_lora_exports_a_peft_folder_of_the_trained_adapters(tiny_chat_model_dir, tmp_path):
    from safetensors.numpy import load_file

    from toolrl_jax.datasets.synthetic import make_synthetic_split
    from toolrl_jax.tokenization import load_tokenizer
    from toolrl_jax.training.runs import ModelSource, RunConfig, run_sft
    from toolrl_jax.training.sft import SFTConfig

    train, _ = make_synthetic_split(8, 0, seed=4)
    config = SFTConfig(learning_rate=3e-2, lr_schedule="constant", warmup_ratio=0.0, epochs=None, max_steps=2,
                       batch_size=4, micro_batch_size=4, max_length=512, lora=LoRAConfig(rank=4))
    run = RunConfig(run_dir=str(tmp_path / "run"), save_every=1, export_dir=str(tmp_path / "export"),
                    export_lora="peft")
    _, model = load_hf_model(tiny_chat_model_dir, dtype="float32")
    trainer = run_sft(ModelSource(model, load_tokenizer(tiny_chat_model_dir), tiny_chat_model_dir), config, run,
                      train=train)
    assert trainer.step == 2 and has_lora(trainer.model())
    tensors = load_file(str(tmp_path / "export" / "adapter_model.safetensors"))
    assert tensors and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in tensors)
    assert any(np.abs(v).max() > 0 for k, v in tensors.items() if "lora_B" in k), "the adapters trained"
    assert (tmp_path / "export" / "toolrl_sft.json").is_file() and (tmp_path / "export" / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------------- dropout


def test_lora_dropout_masks_rows_independently_unbiased_and_only_when_seeded():
    from toolrl_jax.models.decoder import row_dropout

    model = CausalLM(ModelConfig.tiny("qwen2"), rngs=nnx.Rngs(0))
    ids = _ids(model.config.vocab_size)
    b, t = ids.shape
    positions, segments = jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), jnp.int32)
    base_hidden = np.asarray(model.hidden_states(jnp.asarray(ids), positions, segments)[0])
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.5), jax.random.key(0))
    seeds = jnp.asarray([7, 8], jnp.uint32)
    # Fresh adapters (B = 0): dropout acts on the adapter path only, so even a seeded forward is the base exactly.
    seeded = model.hidden_states(jnp.asarray(ids), positions, segments, dropout_seeds=seeds)[0]
    np.testing.assert_array_equal(np.asarray(seeded), base_hidden)
    _randomize_b(model)

    dense = model.layers[0].attn.q_proj
    a, bb = np.asarray(dense.lora_a[...]), np.asarray(dense.lora_b[...])
    x = np.asarray(jax.random.normal(jax.random.key(3), (3, 5, a.shape[0])))
    plain = np.asarray(dense(jnp.asarray(x)))
    kernel_only = x @ np.asarray(dense.kernel[...]) + np.asarray(dense.bias[...])
    np.testing.assert_allclose(plain, kernel_only + (x @ a) @ bb * dense.lora_scale, rtol=1e-5, atol=1e-5)
    row_seeds = jnp.asarray([11, 12, 13], jnp.uint32)
    dropped = np.asarray(dense(jnp.asarray(x), row_seeds))
    assert not np.allclose(dropped, plain)
    # A row's mask depends on its seed only, not on where the row sits in the batch.
    perm = np.asarray([2, 0, 1])
    np.testing.assert_allclose(np.asarray(dense(jnp.asarray(x[perm]), row_seeds[perm])), dropped[perm], atol=1e-6)
    # Inverted dropout is unbiased: over many seeds the adapter's output averages to the undropped one.
    many = np.repeat(x[:1], 4000, axis=0)
    mean = np.asarray(dense(jnp.asarray(many), jnp.arange(4000, dtype=jnp.uint32))).mean(axis=0)
    adapter = plain[0] - kernel_only[0]
    np.testing.assert_allclose(mean - kernel_only[0], adapter, atol=0.1 * np.abs(adapter).max())
    # The masks: the asked fraction zeroed, the rest scaled by 1 / (1 - rate); another layer draws other masks.
    ones = jnp.ones((64, 8, 16))
    out = np.asarray(row_dropout(ones, jnp.arange(64, dtype=jnp.uint32), 0.25, stream=0))
    assert set(np.unique(out)) == {0.0, np.float32(1 / 0.75)} and abs((out == 0).mean() - 0.25) < 0.02
    other = np.asarray(row_dropout(ones, jnp.arange(64, dtype=jnp.uint32), 0.25, stream=1))
    assert not np.array_equal(out, other)
    assert len({d.lora_stream for d in adapted_layers(model).values()}) == len(adapted_layers(model))
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(rank=4, dropout=1.0)


def test_lora_dropout_in_grpo_updates_does_not_depend_on_micro_batching(tiny_chat_model_dir):
    """Seeds travel with the rows, so cutting the update into other micro-batches draws the same masks; without
    dropout the update differs. Sampling is dropout-free (the sampler's greedy output is the merged model's)."""
    results = {}
    for name, dropout, micro in (("a", 0.3, 2), ("b", 0.3, 4), ("none", 0.0, 2)):
        trainer, prompts, truths = _lora_trainer(tiny_chat_model_dir, micro_batch_rows=micro,
                                                 lora=LoRAConfig(rank=4, dropout=dropout))
        assert trainer.lora_dropout == dropout
        metrics = trainer.train_step(prompts, truths, jax.random.key(0)).metrics
        results[name] = (metrics, [np.asarray(x) for x in jax.tree.leaves(trainer.params)])
    (ma, pa), (mb, pb), (mn, pn) = results["a"], results["b"], results["none"]
    assert ma["reward/total"] == mb["reward/total"] == mn["reward/total"]  # the same rollouts
    for x, y in zip(pa, pb):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    assert any(not np.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(pa, pn))


def test_a_model_with_adapters_trains_them_alone():
    from toolrl_jax.models.lora import LORA_PARAM_REGEX
    from toolrl_jax.training.trainable import trained_regex

    model = CausalLM(ModelConfig.tiny("llama"), rngs=nnx.Rngs(0))
    assert trained_regex(model, None, "X") is None and trained_regex(model, "^layers/1/", "X") == "^layers/1/"
    apply_lora(model, LoRAConfig(rank=2), jax.random.key(0))
    assert trained_regex(model, None, "X") == LORA_PARAM_REGEX
    with pytest.raises(ValueError, match="SFTTrainer: the model has LoRA adapters.*'\\^layers/1/'"):
        trained_regex(model, "^layers/1/", "SFTTrainer")
