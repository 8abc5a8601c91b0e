"""Whole runs as library calls: GRPO/PPO (with the optional SFT warm-up) and SFT, each over the shared
`TrainLoop` with hooks for metrics, progress, validation, checkpoints and export. The entry points in experiments/
only parse flags, build the configs and call these; tests call them in process.

A run directory holds: checkpoints/, metrics.jsonl (+ TensorBoard), sample_log.jsonl, run_identity.json (what the
run started from, checked on resume), the launch files each start writes (flags.txt, config.json, and
flags.resumeN.txt ... on resumes), and for GRPO with a warm-up, warmup_model/ (reused on resume).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
from flax import nnx

from toolrl_jax import multihost, run_identity
from toolrl_jax.checkpointing import CheckpointConfig, Checkpointer
from toolrl_jax.datasets.batching import BatchingConfig, PromptDataset, chat_encoder
from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.metrics import MetricsWriter, ProgressBar
from toolrl_jax.models.decoder import CausalLM
from toolrl_jax.models.hf_io import copy_tokenizer_files, load_hf_model, save_hf_model
from toolrl_jax.models.lora import LoRAConfig, apply_lora, has_lora, merge_lora, save_peft_adapter
from toolrl_jax.placement import Placement
from toolrl_jax.tokenization import stop_token_ids
from toolrl_jax.training.dynamic_sampling import trained_groups
from toolrl_jax.training.grpo import GRPOConfig, GRPOTrainer, StepResult
from toolrl_jax.training.loop import StepOutput, StepRecord, TrainLoop
from toolrl_jax.training.multiturn import check_opening_prompts, environment_kwargs

logger = logging.getLogger(__name__)

WARMUP_DIR = "warmup_model"
EXPORT_LORA = ("merged", "peft")
LORA_KEY = 0x10A  # folded into the run's seed for the adapters' initial A matrices
GRPO_PROGRESS_KEYS = ("reward/total", "reward/format", "reward/correctness", "reward/accuracy")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it continues. run_dir: its folder; save_every / keep_checkpoints: checkpoint
    cadence and retention; resume: continue the newest checkpoint (else a run_dir with checkpoints is refused);
    resume_allow: deliberate differences from the recorded start (`run_identity.OVERRIDABLE`); export_dir /
    export_dtype: write the final policy as a Hugging Face folder; export_lora: a LoRA policy merged or as a PEFT
    adapter folder; launch_files: {name: text} written at each start
    (e.g. the flags), earlier launches' kept."""

    run_dir: str
    save_every: int = 10
    keep_checkpoints: int = 3
    resume: bool = False
    resume_allow: tuple[str, ...] = ()
    export_dir: Optional[str] = None
    export_dtype: str = "bfloat16"
    export_lora: str = "merged"
    launch_files: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        CheckpointConfig(save_every=self.save_every, keep_last=self.keep_checkpoints)  # validates both
        if self.export_lora not in EXPORT_LORA:
            raise ValueError(f"RunConfig.export_lora must be one of {EXPORT_LORA}, got {self.export_lora!r}")
        unknown = set(self.resume_allow) - set(run_identity.OVERRIDABLE)
        if unknown:
            raise ValueError(f"RunConfig.resume_allow: unknown {sorted(unknown)}; choose from "
                             f"{run_identity.OVERRIDABLE}")

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    def resuming(self) -> bool:
        """Whether this start continues earlier checkpoints; refuses to start over on top of them."""
        # process 0's view decides for all (a process must not see checkpoints another has just begun to write)
        has_checkpoints = bool(multihost.from_process_0(
            self.checkpoint_dir.is_dir() and any(self.checkpoint_dir.iterdir())))
        if has_checkpoints and not self.resume:
            raise FileExistsError(f"run_dir {self.run_dir} already holds checkpoints: resume it or choose a new "
                                  "run directory (runs are never overwritten)")
        return has_checkpoints


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """The model a run starts from: the loaded CausalLM, its tokenizer, and the folder they came from (tokenizer
    files are copied from there into exports)."""

    model: CausalLM
    tokenizer: Any
    folder: Path


def check_identity(run: RunConfig, source: ModelSource, resuming: bool, shapes: Mapping[str, Any],
                   settings: Mapping[str, Any]) -> None:
    """Records what a new run starts from, or checks a resume against the record (`run_identity`)."""
    identity = run_identity.RunIdentity(
        weights={"model": str(source.folder), "checksum": run_identity.weights_checksum(nnx.state(source.model))},
        tokenizer=run_identity.tokenizer_fingerprint(source.tokenizer), shapes=dict(shapes), run=dict(settings))
    allowed = run_identity.check_resume(run.run_dir, identity, run.resume_allow) if resuming else []
    for difference in allowed:
        logger.warning("resuming with a change allowed by --resume_allow: %s", difference)
    if resuming and not allowed and (Path(run.run_dir) / run_identity.IDENTITY_FILE).is_file():
        return
    if jax.process_index() == 0:
        run_identity.record(run.run_dir, identity)


def sft_warmup(source: ModelSource, examples: Sequence[ToolRLExample], warmup: Any, run_dir: str,
               placement: Placement) -> CausalLM:
    """The supervised warm-up before GRPO (a cold start for models that never write the ToolRL format): trained
    once and saved as a Hugging Face folder under run_dir, then read back, so a fresh and a resumed run start GRPO
    from bit-identical weights (checkpoints hold only the trainable part of the policy)."""
    from toolrl_jax.training.sft import sft_train

    folder = Path(run_dir) / WARMUP_DIR
    cfg = source.model.config
    if not multihost.from_process_0((folder / "config.json").is_file()):
        progress = ProgressBar(warmup.max_steps, desc="sft warm-up", keys=("loss",))
        model, history = sft_train(source.model, source.tokenizer, examples, warmup, placement=placement,
                                   on_step=lambda step, m: progress.update(step, m))
        progress.close()
        logger.info("SFT warm-up: loss %.3f -> %.3f over %d steps", history[0]["loss"], history[-1]["loss"],
                    len(history))
        save_hf_model(model, folder, dtype=cfg.param_dtype)
        if jax.process_index() == 0:
            copy_tokenizer_files(source.folder, folder)
        multihost.barrier("toolrl_warmup_saved")  # process 0 wrote it; every process reads it next
    else:
        logger.info("reusing the SFT warm-up policy in %s", folder)
    return load_hf_model(folder, shardings=placement.loader_shardings(), dtype=cfg.dtype,
                         param_dtype=cfg.param_dtype, remat=cfg.remat, remat_policy=cfg.remat_policy,
                         attention_impl=cfg.attention_impl)[1]


def sample_records(result: StepResult, batch: Any, limit: int) -> list[dict]:
    """The first `limit` responses of a step with their prompt, ground truth, total reward ("reward") and reward
    components."""
    records = []
    n = result.samples.group_size
    for row in range(min(limit, len(result.samples.texts or []))):
        values = result.rewards.record(row)
        records.append({"prompt_index": int(batch.indices[row // n]), "response": result.samples.texts[row],
                        "ground_truth": batch.ground_truths[row // n], "reward": values.pop("total"), **values})
    return records


def progress_keys(trainer: GRPOTrainer) -> tuple[str, ...]:
    """The reward metrics shown live: ToolRL's components, or the total and each function's score."""
    if trainer.reward.is_default_layout:
        return GRPO_PROGRESS_KEYS
    return ("reward/total", *(f"reward/{term.name}/score" for term in trainer.reward.terms))


def format_metrics(metrics: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, (int, float)))


def add_adapters(model: CausalLM, lora: LoRAConfig, seed: int) -> None:
    """LoRA adapters on `model` when `lora` is on (in place; their initial A comes from the run's seed, and a resume
    then restores the trained adapters from the checkpoint)."""
    if lora.enabled:
        adapted = apply_lora(model, lora, jax.random.fold_in(jax.random.key(seed), LORA_KEY))
        logger.info("LoRA rank %d on %d projections (%s ...)", lora.rank, len(adapted), adapted[0])


def export_policy(model: CausalLM, run: RunConfig, source_folder: Path,
                  extra_files: Optional[Mapping[str, str]] = None) -> Path:
    """Writes the policy as a Hugging Face folder (run.export_dir) with the tokenizer files of its source (and
    `extra_files`). A model with LoRA adapters is written merged (a plain model), or with run.export_lora='peft' as
    the adapters alone in a PEFT folder over the source model."""
    if has_lora(model) and run.export_lora == "peft":
        out = save_peft_adapter(model, run.export_dir, base_model=str(source_folder))
        if jax.process_index() == 0:
            for name, text in (extra_files or {}).items():
                (out / name).write_text(text)
    else:
        out = save_hf_model(merge_lora(model) if has_lora(model) else model, run.export_dir, dtype=run.export_dtype,
                            extra_files=dict(extra_files or {}))
    if jax.process_index() == 0:
        copy_tokenizer_files(source_folder, out)
    logger.info("exported the policy to %s", out)
    return out


def run_grpo(source: ModelSource, config: GRPOConfig, run: RunConfig, *, train: Sequence[ToolRLExample],
             val: Sequence[ToolRLExample], batching: BatchingConfig, placement: Placement = Placement(),
             warmup: Any = None, reward: Any = None, reward_pool: Any = None, shapes: Mapping[str, Any] = (),
             settings: Mapping[str, Any] = (), warmup_examples: Optional[Sequence[ToolRLExample]] = None
             ) -> GRPOTrainer:
    """A GRPO (or PPO) run in `run.run_dir`: the identity check, the optional SFT warm-up (an SFTConfig), then
    `config.total_steps` steps over prompts drawn by `batching` (its batch size is taken from the config), greedy
    validation at step 0, every `config.val_every` steps and at the end, checkpoints, export. Returns the trainer.
    reward: a `CombinedReward` (default: the ToolRL reward of config.reward); shapes / settings: what the run
    identity records (`run_identity`); warmup_examples: what the warm-up trains on (default: `train`; multi-turn runs
    pass their tasks' reference turns, `training.multiturn.reference_examples`)."""
    resuming = run.resuming()
    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
    check_identity(run, source, resuming, dict(shapes), dict(settings))
    if config.multiturn:  # before the warm-up: a task that cannot roll out must not fail at a later step
        kwargs = environment_kwargs(config.environment, config.env_prompt_style)
        for examples, what in ((train, "training"), (val, "validation")):
            check_opening_prompts(examples, config.environment, source.tokenizer, config.max_prompt_length, what,
                                  kwargs)
    model = source.model
    if warmup is not None:
        model = sft_warmup(source, train if warmup_examples is None else warmup_examples, warmup, run.run_dir,
                           placement)
    add_adapters(model, config.lora, config.seed)  # after the warm-up, which trains the full weights
    tokenizer = source.tokenizer
    encode = chat_encoder(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else model.config.eos_token_ids[0]
    dataset = PromptDataset(train, encode, dataclasses.replace(
        batching, batch_size=config.prompts_per_step, max_prompt_length=config.max_prompt_length, pad_id=pad_id))
    val_prompts = [list(encode(e.prompt_messages))[-config.max_prompt_length:] for e in val]
    val_truths = [e.ground_truth for e in val]
    trainer = GRPOTrainer(model, config, tokenizer=tokenizer, pad_id=pad_id, stop_token_ids=stop_token_ids(tokenizer),
                          placement=placement, reward=reward, reward_pool=reward_pool)
    del model
    logger.info("training %.1fM parameters (%s)", trainer.num_trainable / 1e6, config.algorithm)
    checkpointer = Checkpointer(run.checkpoint_dir, CheckpointConfig(save_every=run.save_every,
                                                                     keep_last=run.keep_checkpoints))
    base_key = jax.random.key(config.seed)

    def step_fn(batch: Any, step: int) -> StepOutput:
        drawn = [batch]  # dynamic sampling's extra rounds draw from the same cursor (saved with the step)

        def refill() -> Any:
            drawn.append(dataset.next_batch())
            return drawn[-1]

        result = trainer.train_step(batch.prompt_ids, batch.ground_truths, jax.random.fold_in(base_key, step),
                                    refill=refill if config.dynamic_sampling else None)
        if result.groups is not None:
            batch = trained_groups(drawn, result.groups)
        return StepOutput({**result.metrics, "data/epoch": dataset.epoch}, extras=(batch, result))

    loop = TrainLoop(step_fn, dataset, config.total_steps, state=trainer, checkpointer=checkpointer,
                     rng_key=base_key, metadata={"model": str(source.folder)})
    with contextlib.ExitStack() as cleanup:  # a failure (a diverged model...) still finishes saves, closes logs
        cleanup.callback(checkpointer.close)
        start = loop.restore()
        writer = None
        if jax.process_index() == 0:
            writer = MetricsWriter(run.run_dir, resume_step=start if start > 0 else -1)
            cleanup.callback(writer.close)
            run_identity.keep_launch_files(run.run_dir, {**run.launch_files, "config.json": json.dumps(
                {"model": str(source.folder), "resumed_from_step": start, "grpo": repr(config)}, indent=2)})
        progress = ProgressBar(config.total_steps, initial_step=start, desc="grpo", keys=progress_keys(trainer),
                               disable=writer is None)
        cleanup.callback(progress.close)
        _add_grpo_hooks(loop, trainer, config, writer, progress, val_prompts, val_truths)
        loop.run()
    if run.export_dir:
        export_policy(trainer.model(), run, source.folder)
    return trainer


def _add_grpo_hooks(loop: TrainLoop, trainer: GRPOTrainer, config: GRPOConfig, writer: Optional[MetricsWriter],
                    progress: ProgressBar, val_prompts: list, val_truths: list) -> None:
    """Metrics and samples to the writer, the progress bar and the log each step; validation (needs the step's
    weights) at the start (unless val_before_train is off), every val_every steps and at the end."""

    keys = progress_keys(trainer)

    def log_step(record: StepRecord) -> None:
        batch, result = record.extras
        m = record.metrics
        if writer is not None:
            writer.write(record.step, m)
            writer.write_samples(record.step, sample_records(result, batch, config.log_samples))
        progress.update(record.step, m)
        logger.info("step %d %s length=%.0f time=%.1fs", record.step,
                    " ".join(f"{k.split('/', 1)[1]}={m[k]:.3f}" for k in keys if k in m),
                    m["response/length_mean"], m["time/step_s"])

    def validate(step: int) -> None:
        if not val_prompts:
            return
        metrics, _, _ = trainer.validate(val_prompts, val_truths, step)
        if writer is not None:
            writer.write(step, metrics)
        logger.info("step %d validation: %s", step, format_metrics(metrics))

    loop.add_hook(log_step)
    if config.val_every > 0:
        if config.val_before_train:
            loop.add_hook(validate, at="start")
        loop.add_hook(lambda record: validate(record.step), every=config.val_every, needs_state=True,
                      also_last=True)


def run_sft(source: ModelSource, config: Any, run: RunConfig, *, train: Sequence[ToolRLExample],
            val: Sequence[ToolRLExample] = (), placement: Placement = Placement(), shapes: Mapping[str, Any] = (),
            settings: Mapping[str, Any] = (), provenance: Optional[Mapping[str, Any]] = None) -> Any:
    """An SFT run (`config`: an SFTConfig) in `run.run_dir`: the identity check, evaluation before training on a
    fresh start, the shared loop (metrics, evaluation every `config.eval_every`, checkpoints), export with a
    toolrl_sft.json provenance file. Returns the SFTTrainer."""
    from toolrl_jax.training.sft import SFTTrainer

    resuming = run.resuming()
    Path(run.run_dir).mkdir(parents=True, exist_ok=True)
    check_identity(run, source, resuming, dict(shapes), dict(settings))
    add_adapters(source.model, config.lora, config.seed)
    trainer = SFTTrainer(source.model, source.tokenizer, train, config, eval_examples=val, placement=placement)
    logger.info("sft: %d training examples (%d dropped, %d prompts truncated), %d held out; %d steps of %d "
                "examples (%d per epoch)", trainer.report.num_kept, trainer.report.num_dropped,
                trainer.report.num_truncated, len(trainer.eval_sequences), trainer.total_steps, config.batch_size,
                trainer.data.batches_per_epoch)
    checkpointer = Checkpointer(run.checkpoint_dir, CheckpointConfig(save_every=run.save_every,
                                                                     keep_last=run.keep_checkpoints))
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(checkpointer.close)
        start = trainer.restore(checkpointer) if resuming else 0
        writer = None
        if jax.process_index() == 0:
            writer = MetricsWriter(run.run_dir, resume_step=start if resuming else None)
            cleanup.callback(writer.close)
            run_identity.keep_launch_files(run.run_dir, {**run.launch_files, "config.json": json.dumps({
                "model": str(source.folder), "resumed_from_step": start, "sft": dataclasses.asdict(config),
                "total_steps": trainer.total_steps, "train_data": dataclasses.asdict(trainer.report),
                "eval_data": dataclasses.asdict(trainer.eval_report) if trainer.eval_report else None}, indent=2)})
        if start == 0 and writer is not None:
            writer.write(0, {**trainer.report.metrics("data/"), "data/total_steps": trainer.total_steps})
        if start == 0 and trainer.eval_data is not None:
            result = trainer.evaluate()
            logger.info("sft eval before training: %s", result)
            if writer is not None:
                writer.write(0, result)
        progress = ProgressBar(trainer.total_steps, initial_step=start, desc="sft",
                               keys=("loss", "token_accuracy", "lr"), disable=writer is None)
        cleanup.callback(progress.close)
        trainer.train(metrics=writer, checkpointer=checkpointer, on_step=progress.update)
    if run.export_dir:
        record = {"base_model": str(source.folder), "steps": trainer.step, "sft": dataclasses.asdict(config),
                  **(provenance or {})}
        out = export_policy(trainer.model(), run, source.folder, {"toolrl_sft.json": json.dumps(record, indent=2)})
        logger.info("start GRPO from the fine-tuned model with --model=%s", out)
    return trainer
