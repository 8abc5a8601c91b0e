r"""GRPO training of a tool-using LLM with the ToolRL reward.

  python -m experiments.grpo --flagfile=experiments/configs/default.flags            # CPU default, SmolLM2
  python -m experiments.grpo --flagfile=experiments/configs/grpo_qwen2.5_1.5b.flags \
      --model=/path/to/Qwen2.5-1.5B-Instruct --data=/path/to/rlla_4k/train.parquet

`--resume` continues the newest complete checkpoint under --run_dir exactly (params, optimizer, step, data
position, PRNG). Metrics go to <run_dir>/metrics.jsonl and TensorBoard event files.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

from absl import app, flags
from absl import logging as absl_logging

from experiments import reward_flags
from experiments.common import (
    define_common_flags,
    load_model_and_tokenizer,
    load_split,
    locate_model,
    lora_shape_settings,
    make_placement,
    model_shape_settings,
    run_config_from_flags,
    validate_common_flags,
)
from experiments.config_flags import config_values, define_config_flags, name_flags
from toolrl_jax.datasets.batching import BatchingConfig
from toolrl_jax.models.lora import LoRAConfig
from toolrl_jax.optim import OptimizerConfig
from toolrl_jax.rl.ppo import PolicyLossConfig, ValueLossConfig
from toolrl_jax.run_identity import ResumeMismatchError
from toolrl_jax.training.critic import CriticConfig
from toolrl_jax.training.grpo import GRPOConfig
from toolrl_jax.training.multiturn import TaskError
from toolrl_jax.training.presets import ALGORITHM_PRESETS, preset_context, preset_fields
from toolrl_jax.training.reward_shaping import check_component_weights
from toolrl_jax.training.runs import ModelSource, run_grpo

FLAGS = flags.FLAGS
log = logging.getLogger("toolrl_jax.grpo")
define_common_flags()


# One flag per option field of the configs (experiments/config_flags.py): names, defaults and help come from them.
GRPO_FLAGS = define_config_flags(GRPOConfig)
POLICY_FLAGS = define_config_flags(PolicyLossConfig)
OPTIMIZER_FLAGS = define_config_flags(OptimizerConfig)
CRITIC_FLAGS = define_config_flags(CriticConfig)
VALUE_FLAGS = define_config_flags(ValueLossConfig)
BATCHING_FLAGS = define_config_flags(BatchingConfig)
LORA_FLAGS = define_config_flags(LoRAConfig)
ALL_FLAGS = (*GRPO_FLAGS, *POLICY_FLAGS, *OPTIMIZER_FLAGS, *CRITIC_FLAGS, *VALUE_FLAGS, *BATCHING_FLAGS, *LORA_FLAGS)
flags.DEFINE_float("critic_lr", 1e-5, "PPO critic learning rate (constant, AdamW; the other AdamW settings are the "
                   "actor's).")
flags.DEFINE_integer("sft_warmup_steps", 0,
                     "Supervised steps on the training split's ground-truth turns before GRPO (0 = none): a cold "
                     "start for models that never emit the ToolRL format. The warmed policy is saved to "
                     "<run_dir>/warmup_model and reused by --resume.")
flags.DEFINE_float("sft_warmup_lr", 1e-4, "Constant learning rate of the SFT warm-up.")
flags.DEFINE_integer("sft_warmup_batch_size", 8, "Examples per SFT warm-up step.")
flags.DEFINE_integer("reward_workers", 0, "Worker processes for reward scoring (0 = in-process).")
flags.DEFINE_enum("algorithm_preset", "toolrl", list(ALGORITHM_PRESETS),
                  "Settings of a published algorithm (toolrl_jax/training/presets.py): toolrl (the defaults), dr_grpo, "
                  "dapo, gspo. Flags given explicitly (here or in a flagfile) override the preset's values; the "
                  "preset overrides the defaults.")


def grpo_config_from_flags() -> GRPOConfig:
    """The GRPOConfig the flags describe (its __post_init__ validates; errors name the flags)."""
    optimizer = OptimizerConfig(**config_values(OPTIMIZER_FLAGS))
    critic_optimizer = OptimizerConfig(learning_rate=FLAGS.critic_lr, b1=optimizer.b1, b2=optimizer.b2,
                                       eps=optimizer.eps, weight_decay=optimizer.weight_decay,
                                       max_grad_norm=optimizer.max_grad_norm,
                                       max_consecutive_skips=optimizer.max_consecutive_skips)
    critic = CriticConfig(optimizer=critic_optimizer, value=ValueLossConfig(**config_values(VALUE_FLAGS)),
                          seed=FLAGS.seed, **config_values(CRITIC_FLAGS))
    # --algorithm_preset sets its fields unless their flags were given (presets.py: explicit > preset > default)
    explicit = {b.field for b in GRPO_FLAGS if FLAGS[b.flag].present}
    explicit |= {f"policy.{b.field}" for b in POLICY_FLAGS if FLAGS[b.flag].present}
    fields, policy = config_values(GRPO_FLAGS), config_values(POLICY_FLAGS)
    preset, preset_policy = preset_fields(FLAGS.algorithm_preset, fields, keep=explicit)
    with preset_context(FLAGS.algorithm_preset) if preset or preset_policy else contextlib.nullcontext():
        return GRPOConfig(**{**fields, **preset}, max_prompt_length=FLAGS.max_prompt_length, seed=FLAGS.seed,
                          policy=PolicyLossConfig(**{**policy, **preset_policy}), optimizer=optimizer, critic=critic,
                          reward=reward_flags.reward_config_from_flags(), lora=LoRAConfig(**config_values(LORA_FLAGS)))


def batching_from_flags(config: GRPOConfig) -> BatchingConfig:
    return BatchingConfig(batch_size=config.prompts_per_step, max_prompt_length=config.max_prompt_length,
                          seed=config.seed, **config_values(BATCHING_FLAGS))


def validate_flags() -> tuple[GRPOConfig, BatchingConfig, Any, Any]:
    """Every flag checked and turned into the run's configs (GRPOConfig, BatchingConfig, the warm-up SFTConfig or
    None, the reward functions) before anything loads; errors name the flags."""
    if FLAGS.sft_warmup_steps < 0 or FLAGS.sft_warmup_batch_size < 1 or not FLAGS.sft_warmup_lr > 0:
        raise app.UsageError("--sft_warmup_steps must be >= 0, --sft_warmup_batch_size >= 1 and --sft_warmup_lr > 0")
    if FLAGS.reward_workers < 0:
        raise app.UsageError(f"--reward_workers must be >= 0, got {FLAGS.reward_workers}")
    try:
        config = grpo_config_from_flags()
        batching = batching_from_flags(config)
        warmup = warmup_config(config) if FLAGS.sft_warmup_steps > 0 else None
        reward = reward_flags.combined_reward_from_flags(config.reward)
        check_component_weights(config, reward)
    except ValueError as e:
        raise app.UsageError(f"invalid flags: {name_flags(e, ALL_FLAGS)}") from None
    return config, batching, warmup, reward


def load_environment_split(config: GRPOConfig) -> tuple[list, list, list]:
    """(train, validation, warm-up) examples of --environment's tasks: --data=synthetic draws the synthetic
    environment's train and held-out tasks (--synthetic_train_size / --synthetic_val_size, --seed); otherwise --data
    and --val_data are task files (JSONL). The warm-up examples are the training tasks' reference turns."""
    from toolrl_jax.environments import make_tasks, read_tasks
    from toolrl_jax.training.multiturn import environment_kwargs, reference_examples, task_examples

    env_kwargs = environment_kwargs(config.environment, config.env_prompt_style)
    try:
        if FLAGS.data == "synthetic":
            if config.environment != "synthetic":
                raise app.UsageError(f"--data=synthetic draws synthetic-environment tasks; --environment="
                                     f"{config.environment} needs --data=TASKS.jsonl")
            train_tasks = make_tasks("train", FLAGS.synthetic_train_size, seed=FLAGS.seed)
            val_tasks = make_tasks("heldout", FLAGS.synthetic_val_size, seed=FLAGS.seed)
        else:
            train_tasks = read_tasks(FLAGS.data)
            val_tasks = read_tasks(FLAGS.val_data) if FLAGS.val_data else []
        if FLAGS.val_size is not None:
            val_tasks = val_tasks[:FLAGS.val_size]
        if not train_tasks:
            raise app.UsageError(f"--data={FLAGS.data} holds no tasks")
        train = task_examples(train_tasks, config.environment, "train", env_kwargs)
        val = task_examples(val_tasks, config.environment, "test", env_kwargs)
        warmup = reference_examples(train_tasks, config.environment, env_kwargs) if FLAGS.sft_warmup_steps else None
    except (ValueError, FileNotFoundError) as e:
        raise app.UsageError(f"--environment={config.environment}: {e}") from None
    if FLAGS.sft_warmup_steps and not warmup:
        raise app.UsageError(f"--sft_warmup_steps: the tasks of --environment={config.environment} have no reference "
                             "turns to warm up on")
    return train, val, warmup


def warmup_config(config: GRPOConfig):
    """The SFTConfig of the supervised warm-up (--sft_warmup_*). Single-turn prompts are capped at
    --max_prompt_length, as in the rollouts; a multi-turn reference turn's prompt holds the earlier turns and their
    results, which the rollouts keep in the response window, so it may use the whole window (cutting it from the left
    would drop the system prompt and the tools)."""
    from toolrl_jax.training.sft import SFTConfig

    return SFTConfig(
        learning_rate=FLAGS.sft_warmup_lr, lr_schedule="constant", warmup_ratio=0.0, weight_decay=0.0,
        epochs=None, max_steps=FLAGS.sft_warmup_steps, batch_size=FLAGS.sft_warmup_batch_size,
        micro_batch_size=min(FLAGS.sft_warmup_batch_size, config.micro_batch_rows),
        max_length=config.max_prompt_length + config.max_response_length,
        max_prompt_length=None if config.multiturn else config.max_prompt_length, packing=True, seed=config.seed,
        log_every=1, logits_chunk_size=256, max_consecutive_skips=config.optimizer.max_consecutive_skips)


def _shape_settings(model_config, config: GRPOConfig) -> dict:
    """What fixes the checkpoint's array shapes (run identity: can never change on --resume)."""
    return {"model": model_shape_settings(model_config), "train_last_layers": FLAGS.train_last_layers,
            "trainable_regex": config.trainable_regex, "adam_mu_dtype": config.optimizer.mu_dtype,
            "algorithm": config.algorithm, **lora_shape_settings(config.lora)}


def _run_settings(config: GRPOConfig) -> dict:
    """What fixes what the run trains on and in which order (run identity: --resume_allow=run to change)."""
    names = ("data", "val_data", "synthetic_train_size", "synthetic_val_size", "synthetic_prompt_style", "seed",
             "prompts_per_step", "group_size", "prompt_order", "length_group_window", "max_prompt_length",
             "max_response_length", "sft_warmup_steps", "sft_warmup_lr", "sft_warmup_batch_size", "bad_rows")
    settings = {name: getattr(FLAGS, name) for name in names}
    if config.multiturn:  # what the tasks and their prompts are (recorded only in multi-turn runs)
        settings.update(environment=config.environment, env_prompt_style=config.env_prompt_style)
    if config.dynamic_sampling:  # its extra rounds draw prompts: how many a step takes (recorded only when on)
        settings["dynamic_sampling_max_rounds"] = config.dynamic_sampling_max_rounds
    return settings


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/jax chatter
    logging.getLogger("toolrl_jax").setLevel(logging.INFO)
    # Everything that can be wrong with the flags and the data is found before any weights load.
    validate_common_flags()
    config, batching, warmup, reward = validate_flags()
    run = run_config_from_flags()
    warmup_examples = None
    if config.multiturn:
        train_examples, val_examples, warmup_examples = load_environment_split(config)
    else:
        train_examples, val_examples = load_split()
    model_config, _ = locate_model()
    if config.train_last_layers > model_config.num_layers:
        raise app.UsageError(f"--train_last_layers={config.train_last_layers}: the model has "
                             f"{model_config.num_layers} layers (use 0 to train all of them)")
    placement = make_placement()
    model_config, model, tokenizer, model_folder = load_model_and_tokenizer(placement)
    reward_pool = None
    if FLAGS.reward_workers > 0:
        from toolrl_jax.rewards.batch import make_reward_pool
        reward_pool = make_reward_pool(FLAGS.reward_workers)
    try:
        run_grpo(ModelSource(model, tokenizer, model_folder), config, run, train=train_examples, val=val_examples,
                 batching=batching, placement=placement, warmup=warmup, reward=reward, reward_pool=reward_pool,
                 shapes=_shape_settings(model_config, config), settings=_run_settings(config),
                 warmup_examples=warmup_examples)
    except (ResumeMismatchError, TaskError) as e:
        raise app.UsageError(str(e)) from None


if __name__ == "__main__":
    app.run(main)
