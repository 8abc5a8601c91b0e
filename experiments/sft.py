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

import logging
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments.common import (
    define_common_flags,
    load_model_and_tokenizer,
    load_split,
    lora_shape_settings,
    make_placement,
    model_shape_settings,
    run_config_from_flags,
    validate_common_flags,
)
from experiments.config_flags import config_values, define_config_flags, name_flags
from toolrl_jax.models.lora import LoRAConfig
from toolrl_jax.run_identity import ResumeMismatchError
from toolrl_jax.training.runs import ModelSource, run_sft
from toolrl_jax.training.sft import SFTConfig

FLAGS = flags.FLAGS
define_common_flags()
FLAGS.set_default("run_dir", "runs/sft")
# One flag per option field of SFTConfig (experiments/config_flags.py); its defaults are SFT's (lr 5e-5, cosine).
SFT_FLAGS = define_config_flags(SFTConfig)
LORA_FLAGS = define_config_flags(LoRAConfig)
flags.DEFINE_integer("holdout", 0, "Hold out this many training examples (seeded choice) for evaluation.")


def sft_config_from_flags() -> SFTConfig:
    return SFTConfig(**config_values(SFT_FLAGS), max_prompt_length=FLAGS.max_prompt_length, seed=FLAGS.seed,
                     lora=LoRAConfig(**config_values(LORA_FLAGS)))


def _validate_flags() -> SFTConfig:
    validate_common_flags()
    if FLAGS.holdout < 0:
        raise app.UsageError(f"--holdout must be >= 0, got {FLAGS.holdout}")
    try:
        return sft_config_from_flags()
    except ValueError as e:
        raise app.UsageError(f"invalid flags: {name_flags(e, (*SFT_FLAGS, *LORA_FLAGS))}") from None


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
    run = run_config_from_flags()
    # The data is read and checked before any weights load. SFT targets need not parse as calls, but the held-out
    # examples are scored by the reward with --eval_accuracy.
    train_examples, val_examples = load_split(check_train=False)
    train_examples, held_out = split_holdout(train_examples, FLAGS.holdout, FLAGS.seed)
    if FLAGS.eval_accuracy and held_out:
        held_out = check_held_out(held_out)
    placement = make_placement()
    model_config, model, tokenizer, model_folder = load_model_and_tokenizer(placement)
    try:
        run_sft(ModelSource(model, tokenizer, Path(FLAGS.tokenizer or model_folder)), config, run,
                train=train_examples, val=[*val_examples, *held_out], placement=placement,
                shapes={"model": model_shape_settings(model_config), **lora_shape_settings(config.lora)},
                settings={name: getattr(FLAGS, name) for name in (
                    "data", "val_data", "seed", "holdout", "batch_size", "max_length", "max_prompt_length",
                    "packing", "bad_rows")},
                provenance={"base_model": str(model_folder), "data": FLAGS.data})
    except ResumeMismatchError as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    app.run(main)
