r"""Supervised fine-tuning on ToolRL-format data (the "SFT400" cold start before GRPO).

  python -m experiments.sft --flagfile=experiments/configs/sft_default.flags          # CPU, SmolLM2, synthetic
  python -m experiments.sft --flagfile=experiments/configs/sft400_qwen2.5_3b.flags \
      --model=/path/to/Qwen2.5-3B-Instruct --export_dir=runs/sft400_qwen2.5_3b/export

The loss is the token-mean cross-entropy over assistant turns (ground truth + end-of-turn token) of each batch of
--batch_size examples; --packing packs several examples per row. `--resume` continues the newest complete
checkpoint under --run_dir exactly (params, optimizer state, data position). Metrics go to
<run_dir>/metrics.jsonl and TensorBoard. `--export_dir` writes the final weights with the tokenizer files as a
Hugging Face folder that `python -m experiments.grpo --model=<export_dir>` starts from.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from experiments.common import (define_common_flags, load_model_and_tokenizer, load_split, make_mesh_and_placement,
                                model_shape_settings, record_or_check_identity, validate_common_flags)
from toolrl_jax.checkpointing import CheckpointConfig, Checkpointer
from toolrl_jax.metrics import MetricsWriter, ProgressBar
from toolrl_jax.models.hf_io import copy_tokenizer_files, save_hf_model
from toolrl_jax.run_identity import keep_launch_files
from toolrl_jax.training.sft import SFTConfig, SFTTrainer

FLAGS = flags.FLAGS
define_common_flags()
# SFT defaults differ from GRPO's: a third-party SFT400 reproduction found lr 5e-5 best; cosine decay, no decay.
FLAGS.set_default("lr", 5e-5)
FLAGS.set_default("lr_schedule", "cosine")
FLAGS.set_default("weight_decay", 0.0)
FLAGS.set_default("run_dir", "runs/sft")

flags.DEFINE_integer("epochs", 3, "Passes over the training data (0 = no limit; then --max_steps decides).")
flags.DEFINE_integer("max_steps", 0, "Stop after this many optimizer steps (0 = no limit; epochs decide).")
flags.DEFINE_integer("batch_size", 32, "Examples per optimizer step (packed or not).")
flags.DEFINE_integer("micro_batch_size", 4, "Rows per gradient-accumulation micro-batch.")
flags.DEFINE_integer("max_length", 2048, "Tokens per row (prompt + assistant turn). Prompts are cut from the left "
                     "to fit (and to --max_prompt_length); examples whose assistant turn does not fit are dropped.")
flags.DEFINE_bool("packing", True, "Pack several examples per row (segment ids); false: one example per "
                  "row, length-bucketed.")
flags.DEFINE_float("warmup_ratio", 0.1, "Linear warm-up as a fraction of the run's steps (when --warmup_steps=0).")
flags.DEFINE_float("min_lr_ratio", 0.0, "Final learning rate of the linear/cosine decay, as a fraction of --lr.")
flags.DEFINE_integer("log_every", 1, "Write metrics every N steps.")
flags.DEFINE_integer("holdout", 0, "Hold out this many training examples (seeded choice) for evaluation.")
flags.DEFINE_integer("eval_every", 0, "Evaluate on the held-out data every N steps (0 = only before and after "
                     "training).")
flags.DEFINE_integer("eval_batch_size", 8, "Examples per evaluation batch.")
flags.DEFINE_bool("eval_accuracy", False, "Also decode the held-out prompts greedily and report exact-match "
                  "accuracy and the ToolRL reward's format score and call-list accuracy.")
flags.DEFINE_integer("eval_max_new_tokens", 512, "Token budget of the greedy evaluation responses.")
flags.DEFINE_integer("logits_chunk_size", 512, "Positions per chunk of the vocabulary projection in the loss "
                     "(bounds logits memory; 0 = whole rows at once).")


def sft_config_from_flags() -> SFTConfig:
    return SFTConfig(
        learning_rate=FLAGS.lr, lr_schedule=FLAGS.lr_schedule, warmup_ratio=FLAGS.warmup_ratio,
        warmup_steps=FLAGS.warmup_steps, min_lr_ratio=FLAGS.min_lr_ratio, weight_decay=FLAGS.weight_decay,
        b1=FLAGS.adam_b1, b2=FLAGS.adam_b2, max_grad_norm=FLAGS.max_grad_norm if FLAGS.max_grad_norm > 0 else None,
        epochs=FLAGS.epochs or None, max_steps=FLAGS.max_steps or None, batch_size=FLAGS.batch_size,
        micro_batch_size=FLAGS.micro_batch_size, max_length=FLAGS.max_length,
        max_prompt_length=FLAGS.max_prompt_length, packing=FLAGS.packing, seed=FLAGS.seed, log_every=FLAGS.log_every,
        eval_every=FLAGS.eval_every, eval_batch_size=FLAGS.eval_batch_size, eval_accuracy=FLAGS.eval_accuracy,
        eval_max_new_tokens=FLAGS.eval_max_new_tokens, logits_chunk_size=FLAGS.logits_chunk_size or None,
        max_consecutive_skips=FLAGS.max_consecutive_skipped_updates)


def _validate_flags() -> SFTConfig:
    validate_common_flags()
    for name in ("epochs", "max_steps", "holdout", "eval_every"):
        if getattr(FLAGS, name) < 0:
            raise app.UsageError(f"--{name} must be >= 0, got {getattr(FLAGS, name)}")
    if FLAGS.epochs == 0 and FLAGS.max_steps == 0:
        raise app.UsageError("--epochs=0 and --max_steps=0: set at least one of them")
    for name in ("batch_size", "micro_batch_size", "eval_batch_size", "log_every", "eval_max_new_tokens"):
        if getattr(FLAGS, name) < 1:
            raise app.UsageError(f"--{name} must be >= 1, got {getattr(FLAGS, name)}")
    if FLAGS.max_length < 2:
        raise app.UsageError(f"--max_length must be >= 2, got {FLAGS.max_length}")
    if not FLAGS.packing and FLAGS.batch_size % FLAGS.micro_batch_size:
        raise app.UsageError(f"--packing=false puts one example per row, so --batch_size ({FLAGS.batch_size}) must "
                             f"be a multiple of --micro_batch_size ({FLAGS.micro_batch_size})")
    if not 0.0 <= FLAGS.warmup_ratio < 1.0:
        raise app.UsageError(f"--warmup_ratio must be in [0, 1), got {FLAGS.warmup_ratio}")
    if FLAGS.logits_chunk_size < 0:
        raise app.UsageError(f"--logits_chunk_size must be >= 0, got {FLAGS.logits_chunk_size}")
    try:
        return sft_config_from_flags()
    except ValueError as e:
        raise app.UsageError(f"invalid flags: {e}") from None


def check_held_out(examples: list) -> list:
    """The held-out examples whose ground truths the reward can parse (--bad_rows decides about the others)."""
    from toolrl_jax.datasets.loading import BadRowsError, check_examples

    try:
        result = check_examples(examples, origin="--holdout examples", bad_rows=FLAGS.bad_rows)
    except BadRowsError as e:
        raise app.UsageError(f"{e}\n(--eval_accuracy scores these with the reward; --bad_rows=skip leaves such "
                             "rows out)") from None
    logging.info("%s", result.summary())
    return result.examples


def split_holdout(train: list, count: int, seed: int) -> tuple[list, list]:
    """(train without the held-out examples, held-out examples), chosen by a seeded permutation."""
    if count <= 0:
        return train, []
    if count >= len(train):
        raise app.UsageError(f"--holdout={count} leaves no training examples (the data has {len(train)})")
    chosen = set(np.random.default_rng([seed, 7]).permutation(len(train))[:count].tolist())
    return ([e for i, e in enumerate(train) if i not in chosen], [e for i, e in enumerate(train) if i in chosen])


def main(argv: list[str]) -> None:
    del argv
    logging.getLogger().setLevel(logging.INFO)
    config = _validate_flags()
    run_dir = Path(FLAGS.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    if any(ckpt_dir.glob("*")) and not FLAGS.resume:
        raise app.UsageError(f"--run_dir={run_dir} already holds checkpoints: pass --resume to continue it or "
                             "choose a new --run_dir (runs are never overwritten)")
    run_dir.mkdir(parents=True, exist_ok=True)
    # The data is read and checked before any weights load. SFT targets need not parse as calls, but the held-out
    # examples are scored by the reward with --eval_accuracy.
    train_examples, val_examples = load_split(check_train=False)
    train_examples, held_out = split_holdout(train_examples, FLAGS.holdout, FLAGS.seed)
    if FLAGS.eval_accuracy and held_out:
        held_out = check_held_out(held_out)
    val_examples = [*val_examples, *held_out]
    resuming = FLAGS.resume and any(ckpt_dir.glob("*"))
    mesh, _, param_shardings_fn = make_mesh_and_placement()
    model_config, model, tokenizer, model_folder = load_model_and_tokenizer(param_shardings_fn)
    record_or_check_identity(run_dir, resuming, model, tokenizer, model_folder,
                             {"model": model_shape_settings(model_config), "adam_mu_dtype": FLAGS.adam_mu_dtype},
                             {name: getattr(FLAGS, name) for name in (
                                 "data", "val_data", "seed", "holdout", "batch_size", "max_length",
                                 "max_prompt_length", "packing", "bad_rows")})

    trainer = SFTTrainer(model, tokenizer, train_examples, config, eval_examples=val_examples, mesh=mesh)
    del model
    logging.info("sft: %d training examples (%d dropped, %d prompts truncated), %d held out; %d steps of %d "
                 "examples (%d per epoch)", trainer.report.num_kept, trainer.report.num_dropped,
                 trainer.report.num_truncated, len(trainer.eval_sequences), trainer.total_steps, config.batch_size,
                 trainer.data.batches_per_epoch)
    checkpointer = Checkpointer(ckpt_dir, CheckpointConfig(save_every=FLAGS.save_every,
                                                          keep_last=FLAGS.keep_checkpoints))
    start_step = trainer.restore(checkpointer) if FLAGS.resume else 0
    is_main = jax.process_index() == 0
    writer = MetricsWriter(run_dir, resume_step=start_step if FLAGS.resume else None) if is_main else None
    tokenizer_folder = Path(FLAGS.tokenizer or model_folder)
    if is_main:  # each launch's flags and config; an earlier launch's files are kept
        keep_launch_files(run_dir, {"flags.txt": FLAGS.flags_into_string(), "config.json": json.dumps({
            "model": str(model_folder), "tokenizer": str(tokenizer_folder), "data": FLAGS.data,
            "resumed_from_step": start_step, "sft": dataclasses.asdict(config), "total_steps": trainer.total_steps,
            "train_data": dataclasses.asdict(trainer.report),
            "eval_data": dataclasses.asdict(trainer.eval_report) if trainer.eval_report else None}, indent=2)})
    if start_step == 0 and writer is not None:
        writer.write(0, {**trainer.report.metrics("data/"), "data/total_steps": trainer.total_steps})
    if start_step == 0 and trainer.eval_data is not None:
        result = trainer.evaluate()
        logging.info("sft eval before training: %s", result)
        if writer is not None:
            writer.write(0, result)

    progress = ProgressBar(trainer.total_steps, initial_step=start_step, desc="sft",
                           keys=("loss", "token_accuracy", "lr"), disable=not is_main)
    try:
        trainer.train(metrics=writer, checkpointer=checkpointer, on_step=progress.update)
    finally:
        progress.close()
        checkpointer.close()
        if writer is not None:
            writer.close()
    if FLAGS.export_dir:
        provenance = {"base_model": str(model_folder), "data": FLAGS.data, "steps": trainer.step,
                      "sft": dataclasses.asdict(config)}
        out = save_hf_model(trainer.model(), FLAGS.export_dir, dtype=FLAGS.export_dtype,
                            extra_files={"toolrl_sft.json": json.dumps(provenance, indent=2)})
        if is_main:
            copy_tokenizer_files(tokenizer_folder, out)
        logging.info("exported the fine-tuned model to %s (start GRPO from it with --model=%s)", out, out)


if __name__ == "__main__":
    app.run(main)
