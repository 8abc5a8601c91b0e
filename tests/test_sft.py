"""SFT training on a tiny random model with SmolLM2's vocabulary and chat template: the loss equals a per-example
reference for every layout (packed or not, any micro-batch size, chunked logits, remat), a short run overfits,
a crashed run resumes exactly, sharding over a mesh changes nothing, and experiments/sft.py runs end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from toolrl_jax.checkpointing import CheckpointConfig, Checkpointer
from toolrl_jax.datasets.synthetic import make_synthetic_split
from toolrl_jax.metrics import MetricsWriter, read_jsonl
from toolrl_jax.models.hf_io import load_hf_model
from toolrl_jax.tokenization import load_tokenizer
from toolrl_jax.training.sft import SFTConfig, SFTTrainer, loss_and_grads, sft_train
from toolrl_jax.training.sft_data import SFTBatchingConfig, SFTDataset, tokenize_examples

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok(tiny_chat_model_dir):
    return load_tokenizer(tiny_chat_model_dir)


def _short_examples(tok, n: int, seed: int):
    """The n synthetic examples with the shortest assistant turns among 4n (cheap rows for CPU training)."""
    pool, _ = make_synthetic_split(4 * n, 0, seed=seed)
    return sorted(pool, key=lambda e: (len(tok.encode(e.ground_truth)), e.index))[:n]


def _model(folder, **overrides):
    return load_hf_model(folder, dtype="float32", **overrides)[1]


def _reference_loss(graphdef, params, seqs) -> jax.Array:
    """Token mean of -log p over the assistant tokens, one unpadded forward per example."""
    model = nnx.merge(graphdef, params)
    total, count = 0.0, 0
    for s in seqs:
        ids = jnp.asarray(s.input_ids)[None]
        n = ids.shape[1]
        logits, _ = model(ids, jnp.arange(n, dtype=jnp.int32)[None], jnp.ones((1, n), jnp.int32))
        logp = jax.nn.log_softmax(logits[0, s.prompt_length - 1:n - 1].astype(jnp.float32), axis=-1)
        total = total - jnp.sum(jnp.take_along_axis(logp, ids[0, s.prompt_length:, None], axis=-1))
        count += s.num_targets
    return total / count


def test_loss_and_grads_match_the_per_example_reference_in_every_layout(tiny_chat_model_dir, tok):
    model = _model(tiny_chat_model_dir)
    examples, _ = make_synthetic_split(3, 0, seed=11)
    seqs, report = tokenize_examples(tok, examples, max_length=96, max_prompt_length=40)
    assert report.num_kept == 3
    graphdef, params = nnx.split(model)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(lambda p: _reference_loss(graphdef, p, seqs)))(params)
    remat_model = nnx.merge(graphdef, params)
    remat_model.config = remat_model.config.replace(remat=True)
    remat_graphdef = nnx.split(remat_model)[0]

    layouts = {  # name: (packing, micro_batch_size, logits chunk, graphdef)
        "rows_micro1": (False, 1, None, graphdef),
        "rows_one_micro_chunked": (False, 3, 16, graphdef),
        "packed_micro1_chunked": (True, 1, 32, graphdef),
        "packed_micro2_remat": (True, 2, None, remat_graphdef),
    }
    rows_seen = set()
    for name, (packing, micro, chunk, gdef) in layouts.items():
        row_length = 192 if packing else 96
        data = SFTDataset(seqs, SFTBatchingConfig(batch_size=3, micro_batch_size=micro, max_length=row_length,
                                                  packing=packing, shuffle=False, bucket_lengths=(row_length,)))
        batch = data.next_batch()
        rows_seen.add(batch.input_ids.shape[0] * batch.input_ids.shape[1])
        arrays = {k: jnp.asarray(v) for k, v in batch.arrays().items()}
        loss, grads, metrics = jax.jit(lambda p, b, g=gdef, c=chunk: loss_and_grads(g, p, b, c))(params, arrays)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=2e-6, err_msg=name)
        assert float(metrics["target_tokens"]) == sum(s.num_targets for s in seqs)
        for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
            scale = float(jnp.max(jnp.abs(r))) + 1e-12
            np.testing.assert_allclose(np.asarray(g) / scale, np.asarray(r) / scale, atol=2e-5,
                                       err_msg=f"{name} {jax.tree_util.keystr(path)}")
    assert len(rows_seen) == 2, "packing must actually put several examples in a row"


def test_short_run_overfits_and_logs(tiny_chat_model_dir, tok, tmp_path):
    examples = _short_examples(tok, 10, seed=4)
    examples, held_out = examples[:8], examples[8:]
    cfg = SFTConfig(learning_rate=3e-2, lr_schedule="constant", warmup_ratio=0.0, epochs=None, max_steps=6,
                    batch_size=8, micro_batch_size=2, max_length=64, max_prompt_length=8, logits_chunk_size=32,
                    log_every=2, eval_every=3, eval_batch_size=2)
    seen = []
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        model, history = sft_train(_model(tiny_chat_model_dir), tok, examples, cfg,
                                   eval_examples=examples[:2] + held_out, metrics=writer,
                                   on_step=lambda step, m: seen.append(step))
    assert [h["step"] for h in history] == list(range(1, 7)) == seen
    losses = [h["loss"] for h in history]
    assert losses[0] > 10.0 and losses[-1] < 0.55 * losses[0], losses  # ln(49152) = 10.8 at random init
    assert all(h["examples"] == 8 and h["lr"] == pytest.approx(3e-2) for h in history)
    assert all(h["target_tokens"] == history[0]["target_tokens"] for h in history)  # every step sees all 8
    assert history[2]["eval/loss"] > history[-1]["eval/loss"]
    assert history[-1]["eval/loss"] < 0.7 * losses[0]
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in lines if "train/loss" in r] == [2, 4, 6]
    assert [r["step"] for r in lines if "eval/loss" in r] == [3, 6]
    # Master weights stay in float32; the returned model is the trained one.
    state = nnx.state(model)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state))
    rerun = SFTTrainer(model, tok, examples, cfg)
    assert rerun.evaluate() == {}  # no held-out data given
    batch = {k: jnp.asarray(v) for k, v in rerun.data.make_batch(np.arange(8)).arrays().items()}
    loss, _, _ = loss_and_grads(rerun.graphdef, rerun.params, batch, None)
    assert float(loss) < 0.55 * losses[0]


class _Crash(RuntimeError):
    pass


def test_crashed_run_resumes_exactly(tiny_chat_model_dir, tok, tmp_path):
    examples = _short_examples(tok, 8, seed=5)
    cfg = SFTConfig(learning_rate=2e-3, lr_schedule="cosine", warmup_steps=1, epochs=None, max_steps=4,
                    batch_size=4, micro_batch_size=2, max_length=64, max_prompt_length=16, logits_chunk_size=None)
    straight_model, straight = sft_train(_model(tiny_chat_model_dir), tok, examples, cfg)

    def crash_after_two(step, metrics):
        # step 3's metrics hook: step 2 is saved (a step is saved once its hooks have run), step 3 is not
        if step == 3:
            raise _Crash("simulated preemption")

    ckpt_dir = tmp_path / "ckpt"
    with Checkpointer(ckpt_dir, CheckpointConfig(save_every=2)) as ckpt, pytest.raises(_Crash):
        sft_train(_model(tiny_chat_model_dir), tok, examples, cfg, checkpointer=ckpt, on_step=crash_after_two)
    with Checkpointer(ckpt_dir, CheckpointConfig(save_every=2)) as ckpt:
        assert ckpt.latest_step() == 2
        resumed_model, resumed = sft_train(_model(tiny_chat_model_dir), tok, examples, cfg, checkpointer=ckpt)
        assert ckpt.latest_step() == 4
    assert [h["step"] for h in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        for key in ("loss", "lr", "grad_norm", "target_tokens"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    for a, b in zip(jax.tree.leaves(nnx.state(straight_model)), jax.tree.leaves(nnx.state(resumed_model))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


_MESH_WORKER = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    from flax import nnx
    from toolrl_jax.datasets.synthetic import make_synthetic_split
    from toolrl_jax.models.hf_io import load_hf_model
    from toolrl_jax.placement import Placement
    from toolrl_jax.sharding import MeshConfig
    from toolrl_jax.tokenization import load_tokenizer
    from toolrl_jax.training.sft import SFTConfig, SFTTrainer
    folder = sys.argv[1]
    tok = load_tokenizer(folder)
    examples, _ = make_synthetic_split(8, 0, seed=6)
    cfg = SFTConfig(learning_rate=2e-3, lr_schedule="constant", warmup_ratio=0.0, epochs=None, max_steps=2,
                    batch_size=8, micro_batch_size=4, max_length=96, max_prompt_length=24, logits_chunk_size=32)
    out = {}
    for name, placement in (("single", Placement()), ("mesh", Placement.from_config(MeshConfig(data=2, fsdp=2)))):
        trainer = SFTTrainer(load_hf_model(folder, dtype="float32")[1], tok, examples, cfg, placement=placement)
        history = trainer.train()
        out[name] = {"loss": [h["loss"] for h in history],
                     "params": [np.asarray(jax.device_get(x)) for x in jax.tree.leaves(trainer.params)],
                     "specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(trainer.params)
                                      if hasattr(x.sharding, "spec")})}
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(out["single"]["params"], out["mesh"]["params"]))
    print("RESULT " + json.dumps({"loss_single": out["single"]["loss"], "loss_mesh": out["mesh"]["loss"],
                                  "max_param_diff": diff, "mesh_specs": out["mesh"]["specs"]}))
""")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def test_training_on_a_mesh_matches_one_device(tiny_chat_model_dir):
    proc = subprocess.run([sys.executable, "-c", _MESH_WORKER, str(tiny_chat_model_dir)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    result = json.loads(line[len("RESULT "):])
    np.testing.assert_allclose(result["loss_mesh"], result["loss_single"], rtol=1e-5)
    assert result["max_param_diff"] < 1e-5
    assert any("fsdp" in spec for spec in result["mesh_specs"]), result["mesh_specs"]


def _run_sft(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.sft", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_experiment_runs_end_to_end_resumes_and_exports(tiny_chat_model_dir, tmp_path):
    run_dir, export = tmp_path / "run", tmp_path / "export"
    common = ["--flagfile=experiments/configs/sft_default.flags", f"--model={tiny_chat_model_dir}",
              "--synthetic_train_size=8", "--synthetic_val_size=2", "--max_length=96", "--max_prompt_length=16",
              "--batch_size=4", "--micro_batch_size=2", "--epochs=0", "--save_every=1", "--lr=1e-3",
              "--eval_max_new_tokens=4", "--logits_chunk_size=32", f"--run_dir={run_dir}"]
    first = _run_sft(*common, "--max_steps=2", "--dtype=bfloat16", "--noeval_accuracy")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _run_sft(*common, "--max_steps=3", "--resume", "--dtype=bfloat16", f"--export_dir={export}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 2" in second.stderr

    lines = read_jsonl(run_dir / "metrics.jsonl")
    train_steps = [r["step"] for r in lines if "train/loss" in r]
    assert train_steps == [1, 2, 3]
    assert all(np.isfinite(r["train/loss"]) for r in lines if "train/loss" in r)
    evals = [r for r in lines if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]  # before training, end of run 1, end of run 2
    assert 0.0 <= evals[-1]["eval/exact_match"] <= 1.0 and 0.0 <= evals[-1]["eval/reward_format"] <= 1.0
    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())[-1] == 3

    # The export is a self-contained HF folder (a GRPO run's --model) holding the trained weights.
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "toolrl_sft.json"):
        assert (export / name).is_file(), name
    assert json.loads((export / "toolrl_sft.json").read_text())["steps"] == 3
    _, exported = load_hf_model(export, dtype="float32")
    _, initial = load_hf_model(tiny_chat_model_dir, dtype="float32")
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(nnx.state(exported)),
                                                   jax.tree.leaves(nnx.state(initial)))]
    assert any(moved)
    assert load_tokenizer(export).chat_template == load_tokenizer(tiny_chat_model_dir).chat_template

    # A fresh run may not overwrite it; bad flags are named; every flag of the 3B flagfile exists.
    again, bad, epochless, big = _usage_errors(
        [*common, "--max_steps=1"],
        [*common, "--max_steps=1", "--packing=false", "--batch_size=5", f"--run_dir={tmp_path / 'bad'}"],
        [*common, "--max_steps=0"],
        ["--flagfile=experiments/configs/sft400_qwen2.5_3b.flags"])
    assert "already holds checkpoints" in again
    assert "batch_size (5) must be a multiple of micro_batch_size (2)" in bad and "--batch_size" in bad
    assert "set epochs, max_steps or both" in epochless and "--epochs" in epochless
    assert "--model=/path/to/Qwen2.5-3B-Instruct" in big


_USAGE_CHECKER = textwrap.dedent("""
    import json, sys
    from absl import app
    from experiments import sft
    messages = []
    for argv in json.loads(sys.argv[1]):
        sft.FLAGS.unparse_flags()
        try:
            sft.FLAGS(["sft", *argv])
            sft.main([])
            messages.append("no error")
        except app.UsageError as e:
            messages.append(str(e))
    print("RESULT " + json.dumps(messages))
""")


def _usage_errors(*argvs: list[str]) -> list[str]:
    """The UsageError message of experiments/sft.py for each command line (one process for all of them)."""
    proc = subprocess.run([sys.executable, "-c", _USAGE_CHECKER, json.dumps(argvs)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


def test_lora_sft_trains_the_adapters_and_leaves_the_base_bit_identical(tiny_chat_model_dir, tok):
    from toolrl_jax.models.lora import LoRAConfig, adapted_layers, apply_lora

    examples = _short_examples(tok, 8, seed=4)
    cfg = SFTConfig(learning_rate=3e-2, lr_schedule="constant", warmup_ratio=0.0, epochs=None, max_steps=4,
                    batch_size=8, micro_batch_size=4, max_length=64, max_prompt_length=8, logits_chunk_size=32,
                    remat=True, lora=LoRAConfig(rank=8))
    model = _model(tiny_chat_model_dir)
    apply_lora(model, cfg.lora, jax.random.key(0))
    trainer = SFTTrainer(model, tok, examples, cfg, eval_examples=examples[:2])
    trained = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainer.params)]
    assert trained and all(p.endswith(("'lora_a'].value", "'lora_b'].value")) for p in trained), trained[:3]
    before = trainer.evaluate()["eval/loss"]
    history = trainer.train()
    assert history[-1]["loss"] < history[0]["loss"] and trainer.evaluate()["eval/loss"] < before
    policy = trainer.model()
    assert any(np.abs(np.asarray(d.lora_b[...])).max() > 0 for d in adapted_layers(policy).values())
    base = nnx.state(_model(tiny_chat_model_dir))
    after = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(policy))}
    for path, value in jax.tree_util.tree_leaves_with_path(base):
        np.testing.assert_array_equal(np.asarray(after[jax.tree_util.keystr(path)]), np.asarray(value))


@pytest.mark.slow
def test_lora_dropout_in_sft_does_not_depend_on_micro_batching(tiny_chat_model_dir, tok):
    """The rows' dropout seeds come from (seed, step) and travel with the rows: micro-batches of 2 or 4 rows train
    the same adapters; dropout 0 trains others; evaluation is dropout-free (the same eval loss before training)."""
    from toolrl_jax.models.lora import LoRAConfig, apply_lora

    examples = _short_examples(tok, 8, seed=4)
    params, evals = {}, {}
    for name, dropout, micro in (("a", 0.5, 2), ("b", 0.5, 4), ("none", 0.0, 4)):
        cfg = SFTConfig(learning_rate=3e-2, lr_schedule="constant", warmup_ratio=0.0, epochs=None, max_steps=2,
                        batch_size=8, micro_batch_size=micro, max_length=64, max_prompt_length=8,
                        logits_chunk_size=32, lora=LoRAConfig(rank=8, dropout=dropout))
        model = _model(tiny_chat_model_dir)
        apply_lora(model, cfg.lora, jax.random.key(0))
        trainer = SFTTrainer(model, tok, examples, cfg, eval_examples=examples[:2])
        evals[name] = trainer.evaluate()["eval/loss"]
        trainer.train()
        params[name] = [np.asarray(x) for x in jax.tree.leaves(trainer.params)]
    assert evals["a"] == evals["b"] == evals["none"]

    def gap(u: str, v: str) -> float:
        return max(float(np.abs(x - y).max()) for x, y in zip(params[u], params[v]))

    # Micro-batching changes only the summation order (AdamW amplifies it on near-zero gradients, ~1e-5 here);
    # dropout itself moves the adapters by about the learning rate.
    assert gap("a", "b") < 1e-3 * gap("a", "none") and gap("a", "none") > 1e-3
