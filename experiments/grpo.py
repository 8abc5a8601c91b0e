r"""GRPO training of a tool-using LLM with the ToolRL reward.

  python -m experiments.grpo --flagfile=experiments/configs/default.flags            # CPU default, SmolLM2
  python -m experiments.grpo --flagfile=experiments/configs/grpo_qwen2.5_1.5b.flags \
      --model=/path/to/Qwen2.5-1.5B-Instruct --data=/path/to/rlla_4k/train.parquet

`--resume` continues the newest complete checkpoint under --run_dir exactly (params, optimizer, step, data
position, PRNG). Metrics go to <run_dir>/metrics.jsonl and TensorBoard event files.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from experiments import reward_flags
from experiments.common import (define_common_flags, int_list_flag, load_model_and_tokenizer, load_split,
                                locate_model, make_mesh_and_placement, model_shape_settings,
                                optimizer_config_from_flags, record_or_check_identity, validate_common_flags)
from toolrl_jax.checkpointing import CheckpointConfig, Checkpointer
from toolrl_jax.datasets.batching import BatchingConfig, PromptDataset, chat_encoder
from toolrl_jax.metrics import MetricsWriter, ProgressBar
from toolrl_jax.models.hf_io import copy_tokenizer_files, save_hf_model
from toolrl_jax.optim import OptimizerConfig
from toolrl_jax.rl.losses import AGG_MODES
from toolrl_jax.rl.ppo import PolicyLossConfig, ValueLossConfig
from toolrl_jax.run_identity import keep_launch_files
from toolrl_jax.training.critic import CriticConfig
from toolrl_jax.tokenization import stop_token_ids
from toolrl_jax.training.grpo import GRPOConfig, GRPOTrainer
from toolrl_jax.training.trainable import last_layers_regex

FLAGS = flags.FLAGS
log = logging.getLogger("toolrl_jax.grpo")
define_common_flags()


flags.DEFINE_integer("prompts_per_step", 512, "Prompts sampled per GRPO step.")
flags.DEFINE_enum("prompt_order", "random", ["random", "length_grouped"],
                  "Which prompts share a step. random: a uniform random batch each step, a different random remainder "
                  "dropped each epoch (the original ToolRL/veRL sampler). length_grouped: prompts of similar length "
                  "share a step (less rollout padding, but each step covers a narrow length band and, when "
                  "--length_group_window x --prompts_per_step exceeds the data, the longest prompts are never "
                  "trained on). Padding inside a step is cut by --trim_padding either way.")
flags.DEFINE_integer("length_group_window", 16,
                     "--prompt_order=length_grouped: steps per length-sorting window.")
flags.DEFINE_integer("group_size", 4, "Responses per prompt (the GRPO group).")
flags.DEFINE_integer("mini_batch_prompts", 128, "Prompts per optimizer update.")
flags.DEFINE_integer("micro_batch_rows", 8, "Rows per gradient-accumulation micro-batch.")
flags.DEFINE_integer("ppo_epochs", 1, "Passes over each step's rollouts.")
flags.DEFINE_integer("max_response_length", 1024, "Maximum new tokens per response.")
flags.DEFINE_integer("total_steps", 104,
                     "GRPO steps to train (the original configures 15 epochs x 7 steps and trains 104).")
flags.DEFINE_float("temperature", 1.0, "Rollout sampling temperature.")
flags.DEFINE_float("top_p", 1.0, "Rollout nucleus mass.")
flags.DEFINE_integer("top_k", 0, "Rollout top-k (0 = off).")
flags.DEFINE_float("kl_coef", 0.001, "KL coefficient beta (0 disables the reference model).")
flags.DEFINE_bool("kl_in_reward", True, "Fold beta * sum(logp_old - logp_ref) into the reward (the original).")
flags.DEFINE_float("kl_loss_coef", 0.0, "Coefficient of a KL-to-reference loss term (0 = off).")
flags.DEFINE_enum("kl_loss_type", "k3", ["k1", "k2", "k3"], "KL estimator of the loss term.")
flags.DEFINE_float("clip_ratio", 0.2, "PPO clip epsilon.")
flags.DEFINE_float("clip_ratio_high", None, "Separate upper clip epsilon (None = clip_ratio).")
flags.DEFINE_float("entropy_coef", 0.001, "Entropy bonus coefficient.")
flags.DEFINE_enum("loss_agg", "token-mean", list(AGG_MODES),
                  "How token losses become the mini-batch loss: token-mean (ToolRL; the global token mean), "
                  "seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm (Dr. GRPO: token sums over a "
                  "constant, --loss_agg_norm_length) or verl (the original trainer's gradient scale: each "
                  "micro-batch's token mean summed, over --verl_accumulation_divisor; see docs/fidelity.md).")
flags.DEFINE_integer("loss_agg_norm_length", None,
                     "--loss_agg=seq-mean-token-sum-norm: the constant length (default --max_response_length).")
flags.DEFINE_integer("verl_accumulation_divisor", None,
                     "--loss_agg=verl: the original's gradient-accumulation divisor x data-parallel ranks (ToolRL "
                     "recipe on 2 GPUs: 4); default: the number of micro-batches per update.")
flags.DEFINE_bool("recompute_old_logprobs", True, "Recompute old-policy log-probs with the training forward.")
flags.DEFINE_bool("normalize_adv_by_std", True, "Divide group-centred rewards by the group std (GRPO).")
flags.DEFINE_integer("val_every", 5, "Greedy validation every N steps (0 = never); also at step 0 and the end.")
flags.DEFINE_integer("val_samples", 0, "Validation also samples N responses per prompt at --temperature "
                     "(val_sampled/* metrics; 0 = greedy only).")
flags.DEFINE_integer("val_max_new_tokens", None, "Validation response budget (default max_response_length).")
flags.DEFINE_integer("log_samples", 2, "Sample responses written to samples.jsonl per step.")
flags.DEFINE_enum("algorithm", "grpo", ["grpo", "ppo"],
                  "grpo: group-relative advantages (ToolRL). ppo: the paper's PPO baseline, a critic initialised from "
                  "the policy with a value head, GAE advantages (use --group_size=1 for classic PPO rollouts).")
flags.DEFINE_float("critic_lr", 1e-5, "PPO critic learning rate (constant, AdamW).")
flags.DEFINE_float("value_clip", 0.5, "PPO value-function clip range around the old values.")
flags.DEFINE_float("value_loss_coef", 0.5, "Weight of the clipped squared value error (veRL: 0.5).")
flags.DEFINE_float("gae_gamma", 1.0, "PPO discount.")
flags.DEFINE_float("gae_lambda", 1.0, "PPO GAE lambda.")
flags.DEFINE_bool("whiten_advantages", True, "PPO: whiten advantages over the batch's response tokens.")
flags.DEFINE_list("prompt_length_buckets", None,
                  "Padded rollout prompt lengths, e.g. 256,320 (default: powers of two). Each compiles once.")
flags.DEFINE_bool("trim_padding", True,
                  "Sort rollout rows by length and cut each log-prob chunk and update micro-batch to its own longest "
                  "prompt and response (rounded up to a bucket): same values, fewer FLOPs; each shape compiles once.")
flags.DEFINE_list("response_length_buckets", None,
                  "Training widths of responses under --trim_padding, e.g. 128,256,512,1024 (default: powers of two "
                  ">= 64).")
flags.DEFINE_integer("logits_chunk_size", 512,
                     "Response positions projected to the vocabulary at a time (recomputed in the backward pass); "
                     "bounds the [rows, R, vocab] float32 logits. 0 = all at once.")
flags.DEFINE_bool("reference_in_compute_dtype", True,
                  "Keep the KL reference weights in the compute dtype (bit-identical log-probs, half the memory of "
                  "an fp32 copy).")
flags.DEFINE_integer("train_last_layers", 0,
                     "Train only the last N decoder layers and the final norm; embeddings and earlier layers stay "
                     "frozen (0 = train every parameter). Cuts backward cost and optimizer memory on small machines.")
flags.DEFINE_integer("sft_warmup_steps", 0,
                     "Supervised steps on the training split's ground-truth turns before GRPO (0 = none): a cold "
                     "start for models that never emit the ToolRL format. The warmed policy is saved to "
                     "<run_dir>/warmup_model and reused by --resume.")
flags.DEFINE_float("sft_warmup_lr", 1e-4, "Constant learning rate of the SFT warm-up.")
flags.DEFINE_integer("sft_warmup_batch_size", 8, "Examples per SFT warm-up step.")
flags.DEFINE_integer("reward_workers", 0, "Worker processes for reward scoring (0 = in-process).")


def grpo_config_from_flags(num_layers: Optional[int] = None) -> GRPOConfig:
    """The GRPOConfig the flags describe; --train_last_layers needs the model's layer count (None: not yet known)."""
    trainable_regex = None
    if FLAGS.train_last_layers and num_layers is not None:
        trainable_regex = last_layers_regex(num_layers, FLAGS.train_last_layers)
    policy = PolicyLossConfig(clip_eps=FLAGS.clip_ratio, clip_eps_high=FLAGS.clip_ratio_high,
                              entropy_coef=FLAGS.entropy_coef, kl_loss_coef=FLAGS.kl_loss_coef,
                              kl_loss_type=FLAGS.kl_loss_type, agg_mode=FLAGS.loss_agg,
                              norm_length=FLAGS.loss_agg_norm_length,
                              accumulation_divisor=FLAGS.verl_accumulation_divisor)
    critic = CriticConfig(
        optimizer=OptimizerConfig(learning_rate=FLAGS.critic_lr, weight_decay=FLAGS.weight_decay,
                                  b1=FLAGS.adam_b1, b2=FLAGS.adam_b2,
                                  max_grad_norm=FLAGS.max_grad_norm if FLAGS.max_grad_norm > 0 else None,
                                  max_consecutive_skips=FLAGS.max_consecutive_skipped_updates),
        value=ValueLossConfig(cliprange_value=FLAGS.value_clip), value_loss_coef=FLAGS.value_loss_coef,
        gamma=FLAGS.gae_gamma, lam=FLAGS.gae_lambda, whiten_advantages=FLAGS.whiten_advantages, seed=FLAGS.seed)
    return GRPOConfig(
        algorithm=FLAGS.algorithm, critic=critic, prompts_per_step=FLAGS.prompts_per_step, group_size=FLAGS.group_size,
        mini_batch_prompts=FLAGS.mini_batch_prompts, micro_batch_rows=FLAGS.micro_batch_rows,
        ppo_epochs=FLAGS.ppo_epochs, max_prompt_length=FLAGS.max_prompt_length,
        max_response_length=FLAGS.max_response_length, total_steps=FLAGS.total_steps,
        temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k, kl_coef=FLAGS.kl_coef,
        kl_in_reward=FLAGS.kl_in_reward, recompute_old_logprobs=FLAGS.recompute_old_logprobs,
        normalize_adv_by_std=FLAGS.normalize_adv_by_std, policy=policy,
        optimizer=optimizer_config_from_flags(_total_updates()), reward=reward_flags.reward_config_from_flags(),
        val_every=FLAGS.val_every, val_max_new_tokens=FLAGS.val_max_new_tokens, val_samples=FLAGS.val_samples,
        log_samples=FLAGS.log_samples,
        seed=FLAGS.seed, trainable_regex=trainable_regex, prompt_length_buckets=int_list_flag("prompt_length_buckets"),
        trim_padding=FLAGS.trim_padding, response_length_buckets=int_list_flag("response_length_buckets"),
        logits_chunk_size=FLAGS.logits_chunk_size or None, reference_in_compute_dtype=FLAGS.reference_in_compute_dtype)


def _total_updates() -> Optional[int]:
    """Optimizer updates over the run (the lr schedule counts updates, several per GRPO step)."""
    if FLAGS.mini_batch_prompts < 1 or FLAGS.prompts_per_step % FLAGS.mini_batch_prompts:
        return None  # GRPOConfig names the problem
    return FLAGS.total_steps * FLAGS.ppo_epochs * (FLAGS.prompts_per_step // FLAGS.mini_batch_prompts)


def _validate_flags(num_layers: Optional[int] = None) -> GRPOConfig:
    """Checks every flag and builds the configs (num_layers from the model's config.json, before its weights load;
    None checks everything that does not depend on the model)."""
    if FLAGS.train_last_layers < 0 or (num_layers is not None and FLAGS.train_last_layers > num_layers):
        raise app.UsageError(f"--train_last_layers={FLAGS.train_last_layers}: the model has {num_layers} layers "
                             "(use 0 to train all of them)")
    if FLAGS.sft_warmup_steps < 0 or FLAGS.sft_warmup_batch_size < 1 or not FLAGS.sft_warmup_lr > 0:
        raise app.UsageError("--sft_warmup_steps must be >= 0, --sft_warmup_batch_size >= 1 and --sft_warmup_lr > 0")
    for name, low in (("length_group_window", 1), ("reward_workers", 0), ("save_every", 1),
                      ("logits_chunk_size", 0)):
        if getattr(FLAGS, name) < low:
            raise app.UsageError(f"--{name} must be >= {low}, got {getattr(FLAGS, name)}")
    if FLAGS.loss_agg_norm_length is not None and FLAGS.loss_agg != "seq-mean-token-sum-norm":
        raise app.UsageError("--loss_agg_norm_length is only used with --loss_agg=seq-mean-token-sum-norm")
    if FLAGS.verl_accumulation_divisor is not None and FLAGS.loss_agg != "verl":
        raise app.UsageError("--verl_accumulation_divisor is only used with --loss_agg=verl")
    try:
        config = grpo_config_from_flags(num_layers)
        if FLAGS.sft_warmup_steps > 0:
            warmup_config(config)
    except ValueError as e:
        raise app.UsageError(f"invalid flags: {e}") from None
    return config


def warmup_config(config: GRPOConfig):
    """The SFTConfig of the supervised warm-up (--sft_warmup_*)."""
    from toolrl_jax.training.sft import SFTConfig

    return SFTConfig(
        learning_rate=FLAGS.sft_warmup_lr, lr_schedule="constant", warmup_ratio=0.0, weight_decay=0.0,
        epochs=None, max_steps=FLAGS.sft_warmup_steps, batch_size=FLAGS.sft_warmup_batch_size,
        micro_batch_size=min(FLAGS.sft_warmup_batch_size, config.micro_batch_rows),
        max_length=config.max_prompt_length + config.max_response_length,
        max_prompt_length=config.max_prompt_length, packing=True, seed=config.seed, log_every=1,
        logits_chunk_size=256, max_consecutive_skips=FLAGS.max_consecutive_skipped_updates)


def sft_warmup(model, tokenizer, examples, config: GRPOConfig, mesh, run_dir: Path, model_folder: Path,
               param_shardings_fn) -> tuple[object, Path]:
    """Runs (or reuses) the supervised warm-up; returns (warmed model, its HF folder).

    The warmed weights are written as a Hugging Face folder and read back, so a fresh run and a resumed one start
    GRPO from bit-identical weights (checkpoints hold only the trainable part of the policy).
    """
    folder = run_dir / "warmup_model"
    if not (folder / "config.json").is_file():
        from toolrl_jax.training.sft import sft_train
        progress = ProgressBar(FLAGS.sft_warmup_steps, desc="sft warm-up", keys=("loss",))
        model, history = sft_train(model, tokenizer, examples, warmup_config(config), mesh=mesh,
                                   on_step=lambda step, m: progress.update(step, m))
        progress.close()
        log.info("SFT warm-up: loss %.3f -> %.3f over %d steps", history[0]["loss"],
                 history[-1]["loss"], len(history))
        save_hf_model(model, folder, dtype=FLAGS.param_dtype)
        if jax.process_index() == 0:
            copy_tokenizer_files(model_folder, folder)
    else:
        log.info("reusing the SFT warm-up policy in %s", folder)
    from toolrl_jax.models.hf_io import load_hf_model
    _, model = load_hf_model(folder, shardings=param_shardings_fn, dtype=FLAGS.dtype, param_dtype=FLAGS.param_dtype,
                             remat=FLAGS.remat, remat_policy=FLAGS.remat_policy,
                             attention_impl=FLAGS.attention_impl)
    return model, folder


def _shape_settings(model_config, config: GRPOConfig) -> dict:
    """What fixes the checkpoint's array shapes (run identity: can never change on --resume)."""
    return {"model": model_shape_settings(model_config), "train_last_layers": FLAGS.train_last_layers,
            "trainable_regex": config.trainable_regex, "adam_mu_dtype": FLAGS.adam_mu_dtype,
            "algorithm": config.algorithm}


def _run_settings(config: GRPOConfig) -> dict:
    """What fixes what the run trains on and in which order (run identity: --resume_allow=run to change)."""
    names = ("data", "val_data", "synthetic_train_size", "synthetic_val_size", "synthetic_prompt_style", "seed",
             "prompts_per_step", "group_size", "prompt_order", "length_group_window", "max_prompt_length",
             "max_response_length", "sft_warmup_steps", "sft_warmup_lr", "sft_warmup_batch_size", "bad_rows")
    return {name: getattr(FLAGS, name) for name in names}


def main(argv: list[str]) -> None:
    del argv
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax/jax chatter
    logging.getLogger("toolrl_jax").setLevel(logging.INFO)
    # Everything that can be wrong with the flags and the data is found before any weights load.
    validate_common_flags()
    _validate_flags()
    run_dir = Path(FLAGS.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    resuming = FLAGS.resume and any(ckpt_dir.glob("*"))
    if any(ckpt_dir.glob("*")) and not FLAGS.resume:
        raise app.UsageError(f"--run_dir={run_dir} already holds checkpoints: pass --resume to continue it or "
                             "choose a new --run_dir (runs are never overwritten)")
    train_examples, val_examples = load_split()
    model_config, _ = locate_model()
    config = _validate_flags(model_config.num_layers)
    run_dir.mkdir(parents=True, exist_ok=True)
    mesh, place_batch, param_shardings_fn = make_mesh_and_placement()
    model_config, model, tokenizer, model_folder = load_model_and_tokenizer(param_shardings_fn)
    record_or_check_identity(run_dir, resuming, model, tokenizer, model_folder,
                             _shape_settings(model_config, config), _run_settings(config))
    if FLAGS.sft_warmup_steps > 0:
        model, _ = sft_warmup(model, tokenizer, train_examples, config, mesh, run_dir, model_folder,
                              param_shardings_fn)
    encode = chat_encoder(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model_config.eos_token_ids[0]
    dataset = PromptDataset(train_examples, encode, BatchingConfig(
        batch_size=config.prompts_per_step, max_prompt_length=config.max_prompt_length, seed=config.seed,
        order=FLAGS.prompt_order, sort_window=FLAGS.length_group_window, pad_id=pad_id))
    val_prompts = [list(encode(e.prompt_messages))[-config.max_prompt_length:] for e in val_examples]
    val_truths = [e.ground_truth for e in val_examples]

    reward_pool = None
    if FLAGS.reward_workers > 0:
        from toolrl_jax.rewards.batch import make_reward_pool
        reward_pool = make_reward_pool(FLAGS.reward_workers)
    shardings_fn = None
    if mesh is not None:
        from toolrl_jax.sharding import param_shardings
        shardings_fn = functools.partial(param_shardings, mesh=mesh)
    trainer = GRPOTrainer(model, config, tokenizer=tokenizer, pad_id=pad_id,
                          stop_token_ids=stop_token_ids(tokenizer), mesh=mesh, shardings_fn=shardings_fn,
                          place_batch=place_batch, reward_pool=reward_pool)
    del model
    log.info("training %.1fM of %.1fM parameters (%s)", trainer.num_trainable / 1e6, model_config.num_params / 1e6,
             config.algorithm)

    checkpointer = Checkpointer(ckpt_dir, CheckpointConfig(save_every=FLAGS.save_every,
                                                          keep_last=FLAGS.keep_checkpoints))
    base_key = jax.random.key(config.seed)
    start_step = 0
    if FLAGS.resume and checkpointer.latest_step() is not None:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                trainer.train_state())
        restored = checkpointer.restore(abstract)
        trainer.load_train_state(restored.state, restored.step)
        dataset.restore(restored.data_state)
        start_step = restored.step
        log.info("resumed from step %d (%s)", start_step, ckpt_dir)
    # A restart before the first checkpoint starts over: drop whatever the earlier attempt logged (step-0 rows too).
    metrics_writer = MetricsWriter(run_dir, resume_step=start_step if start_step > 0 else -1)
    if jax.process_index() == 0:  # each launch's flags and config; an earlier launch's files are kept
        keep_launch_files(run_dir, {"flags.txt": FLAGS.flags_into_string(), "config.json": json.dumps(
            {"model": str(model_folder), "resumed_from_step": start_step, "grpo": repr(config)}, indent=2)})

    def run_validation(step: int) -> None:
        if not val_prompts:
            return
        val_metrics, samples, _ = trainer.validate(val_prompts, val_truths, step)
        metrics_writer.write(step, val_metrics)
        log.info("step %d validation: %s", step, _fmt(val_metrics))

    progress = ProgressBar(config.total_steps, initial_step=start_step, desc="grpo",
                           keys=("reward/total", "reward/format", "reward/correctness", "reward/accuracy"))
    try:  # a failure (e.g. a diverged model) still finishes pending saves and closes the logs
        if start_step == 0 and config.val_every > 0:
            run_validation(0)
        for step in range(start_step + 1, config.total_steps + 1):
            batch = dataset.next_batch()
            result = trainer.train_step(batch.prompt_ids, batch.ground_truths, jax.random.fold_in(base_key, step))
            metrics = result.metrics
            metrics["lr"] = metrics.get("actor/lr", float("nan"))
            metrics["data/epoch"] = dataset.epoch
            metrics_writer.write(step, metrics)
            metrics_writer.write_samples(step, _sample_records(result, batch, config.log_samples))
            progress.update(step, metrics)
            log.info("step %d reward=%.3f format=%.2f correctness=%.2f accuracy=%.2f length=%.0f time=%.1fs", step,
                     metrics["reward/total"], metrics["reward/format"], metrics["reward/correctness"],
                     metrics["reward/accuracy"], metrics["response/length_mean"], metrics["time/step_s"])
            if config.val_every > 0 and (step % config.val_every == 0 or step == config.total_steps):
                run_validation(step)
            checkpointer.save(step, trainer.train_state(), data_state=dataset.state(),
                              rng_key=jax.random.fold_in(base_key, step), metadata={"model": str(model_folder)},
                              force=step == config.total_steps)
    finally:
        checkpointer.close()
        metrics_writer.close()
        progress.close()
    if FLAGS.export_dir:
        out = save_hf_model(trainer.model(), FLAGS.export_dir, dtype=FLAGS.export_dtype)
        if jax.process_index() == 0:
            copy_tokenizer_files(model_folder, out)
        log.info("exported the policy to %s", out)


def _sample_records(result, batch, limit: int) -> list[dict]:
    records = []
    n = result.samples.num_samples
    for row in range(min(limit, len(result.samples.texts or []))):
        records.append({"prompt_index": int(batch.indices[row // n]), "response": result.samples.texts[row],
                        "ground_truth": batch.ground_truths[row // n],
                        "reward": float(result.rewards.total[row]), "format": float(result.rewards.format[row]),
                        "correctness": float(result.rewards.correctness[row])})
    return records


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)))


if __name__ == "__main__":
    app.run(main)
