"""Supervised fine-tuning (the "SFT cold start" before GRPO): token-mean cross-entropy on assistant turns.

Data: `sft_data` turns examples into [prompt | assistant turn + end-of-turn] sequences and packs or buckets them.
Loss: sum of per-token negative log-likelihoods over the assistant tokens of the WHOLE batch divided by their
global count. A batch is stacked [num_micro, micro_rows, T]; `lax.scan` accumulates micro-batch gradients, each
micro-batch normalised by the global count, so accumulation gives exactly the full-batch token mean whatever the
micro-batch size or packing. Logits are computed `logits_chunk_size` positions at a time (and recomputed in the
backward pass) so the [rows, T, vocab] float32 logits never exist at once.
The train step is a jitted pure function of (params, opt_state, batch) that donates params and optimizer state;
under a mesh, parameters/optimizer state follow the partition rules and rows are split over (data, fsdp).
Compute runs in the model's `dtype` (bf16) against `param_dtype` (fp32) master weights; `remat` rematerialises
decoder layers.

Library entry point: `sft_train(model, tokenizer, examples, config)` -> (model, history); `SFTTrainer` exposes the
pieces (restore from a checkpoint, train, evaluate) for the experiment script.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolrl_jax.config_checks import option, requirement_checker
from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.models.decoder import CausalLM
from toolrl_jax.models.lora import (
    DROPOUT_SEED_KEY,
    LoRAConfig,
    dropout_seeds,
    lora_dropout_rate,
)
from toolrl_jax.optim import SCHEDULES, DivergenceGuard, OptimizerConfig, apply_gradients, make_optimizer
from toolrl_jax.placement import Placement
from toolrl_jax.training.accumulation import accumulate_gradients
from toolrl_jax.training.loop import StepOutput, StepRecord, TrainLoop
from toolrl_jax.training.sequences import map_position_chunks
from toolrl_jax.training.sft_data import (
    SFTBatch,
    SFTBatchingConfig,
    SFTDataset,
    SFTEncoder,
    SFTSequence,
    TokenizeReport,
    tokenize_examples,
)
from toolrl_jax.training.trainable import trainable_filter, trained_regex

logger = logging.getLogger(__name__)

Batch = dict[str, jax.Array]


# ---------------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """One SFT run.

    Steps: an optimizer step consumes `batch_size` examples (packed or not); the run lasts `epochs` passes over the
    data, cut short at `max_steps` when given (at least one of them must be set). micro_batch_size: rows per
    gradient-accumulation micro-batch (a packed row holds several examples). max_length: tokens per row (prompt +
    assistant turn); max_prompt_length: optional extra cap on the prompt (cut from the left).
    Optimizer: AdamW, lr 5e-5 (the best of a third-party SFT400 reproduction) with `lr_schedule` after a linear
    warm-up of `warmup_steps` (or, when 0, `warmup_ratio` of the run's steps).
    Evaluation (on held-out examples passed to the trainer): token-mean loss every `eval_every` steps (0 = only at
    the end); with `eval_accuracy`, greedy decoding of up to `eval_max_new_tokens` tokens and exact-match accuracy
    against the ground truth, plus the ToolRL reward's format score and call-list accuracy.
    remat: None keeps the model's setting; True/False overrides `ModelConfig.remat` for training.
    """

    learning_rate: float = option(5e-5, "Peak learning rate.", flag="lr")
    lr_schedule: str = option("cosine", "Learning-rate schedule.", choices=SCHEDULES)
    warmup_ratio: float = option(0.1, "Linear warm-up as a fraction of the run's steps (when --warmup_steps=0).")
    warmup_steps: int = option(0, "Linear warm-up optimizer steps (0: use --warmup_ratio).")
    min_lr_ratio: float = option(0.0, "Final learning rate of the linear/cosine decay, as a fraction of --lr.")
    weight_decay: float = option(0.0, "AdamW (decoupled) weight decay.")
    b1: float = option(0.9, "AdamW beta1.", flag="adam_b1")
    b2: float = option(0.999, "AdamW beta2.", flag="adam_b2")
    eps: float = option(1e-8, "AdamW epsilon.", flag="adam_eps")
    max_grad_norm: Optional[float] = option(1.0, "Global gradient-norm clip (0 = off).", zero_is_none=True)
    max_consecutive_skips: int = option(3, "Updates with non-finite gradients in a row that stop the run.",
                                        flag="max_consecutive_skipped_updates")
    epochs: Optional[int] = option(3, "Passes over the training data (0 = no limit; then --max_steps decides).",
                                   zero_is_none=True)
    max_steps: Optional[int] = option(None, "Stop after this many optimizer steps (0 = no limit; epochs decide).",
                                      zero_is_none=True)
    batch_size: int = option(32, "Examples per optimizer step (packed or not).")
    micro_batch_size: int = option(4, "Rows per gradient-accumulation micro-batch.")
    max_length: int = option(2048, "Tokens per row (prompt + assistant turn). Prompts are cut from the left to fit "
                                   "(and to --max_prompt_length); examples whose assistant turn does not fit are "
                                   "dropped.")
    max_prompt_length: Optional[int] = None  # the shared --max_prompt_length flag
    packing: bool = option(True, "Pack several examples per row (segment ids); false: one example per row, "
                                 "length-bucketed.")
    bucket_lengths: Optional[tuple[int, ...]] = None
    sort_window: int = 16
    seed: int = 0  # the shared --seed flag
    lora: LoRAConfig = LoRAConfig()  # rank > 0: run_sft trains LoRA adapters on a frozen base
    log_every: int = option(1, "Write metrics every N steps.")
    eval_every: int = option(0, "Evaluate on the held-out data every N steps (0 = only before and after training).")
    eval_batch_size: int = option(8, "Examples per evaluation batch.")
    eval_accuracy: bool = option(False, "Also decode the held-out prompts greedily and report exact-match accuracy "
                                        "and the ToolRL reward's format score and call-list accuracy.")
    eval_max_new_tokens: int = option(512, "Token budget of the greedy evaluation responses.")
    logits_chunk_size: Optional[int] = option(
        512, "Positions per chunk of the vocabulary projection in the loss (bounds logits memory; 0 = whole rows at "
             "once).", zero_is_none=True)
    remat: Optional[bool] = None

    def __post_init__(self) -> None:
        need = requirement_checker("SFTConfig")
        need(self.learning_rate >= 0, f"learning_rate must be >= 0, got {self.learning_rate}")
        need(self.lr_schedule in SCHEDULES, f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        need(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        need(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        need(self.epochs is not None or self.max_steps is not None, "set epochs, max_steps or both")
        need(self.epochs is None or self.epochs >= 1, f"epochs must be >= 1 or None, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1 or None, got {self.max_steps}")
        need(self.batch_size >= 1 and self.micro_batch_size >= 1, "batch_size and micro_batch_size must be >= 1")
        need(self.packing or self.batch_size % self.micro_batch_size == 0,
             f"without packing, batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
             f"({self.micro_batch_size})")
        need(self.max_length >= 2, f"max_length must be >= 2, got {self.max_length}")
        need(self.max_prompt_length is None or self.max_prompt_length >= 1, "max_prompt_length must be >= 1")
        need(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}")
        need(self.eval_every >= 0 and self.eval_batch_size >= 1, "eval_every must be >= 0, eval_batch_size >= 1")
        need(self.eval_max_new_tokens >= 1, "eval_max_new_tokens must be >= 1")
        need(self.logits_chunk_size is None or self.logits_chunk_size >= 1, "logits_chunk_size must be >= 1")
        need(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm must be > 0 or None")
        try:  # the optimizer's own checks (finite values, betas, ...) before any model loads
            self.optimizer_config(max(2, self.max_steps or 2))
        except ValueError as e:
            raise ValueError(f"SFTConfig: {e}") from None

    def batching(self, pad_id: int, *, evaluation: bool = False) -> SFTBatchingConfig:
        """Batch layout of the training data (or, with `evaluation`, of the held-out data: fixed order)."""
        batch_size = self.eval_batch_size if evaluation else self.batch_size
        micro = self.micro_batch_size
        if evaluation and not self.packing:
            micro = min(micro, batch_size)
            batch_size = -(-batch_size // micro) * micro
        return SFTBatchingConfig(batch_size=batch_size, micro_batch_size=micro, max_length=self.max_length,
                                 packing=self.packing, seed=self.seed, shuffle=not evaluation,
                                 sort_window=1 if evaluation else self.sort_window,
                                 bucket_lengths=self.bucket_lengths, drop_last=False, pad_id=pad_id)

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run."""
        by_epochs = None if self.epochs is None else self.epochs * batches_per_epoch
        if self.max_steps is None:
            return by_epochs
        return self.max_steps if by_epochs is None else min(self.max_steps, by_epochs)

    def optimizer_config(self, total_steps: int) -> OptimizerConfig:
        warmup = self.warmup_steps if self.warmup_steps > 0 else int(round(self.warmup_ratio * total_steps))
        if self.lr_schedule != "constant":
            warmup = min(warmup, total_steps - 1)
        return OptimizerConfig(learning_rate=self.learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                               weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
                               schedule=self.lr_schedule, warmup_steps=max(warmup, 0), min_lr_ratio=self.min_lr_ratio,
                               max_consecutive_skips=self.max_consecutive_skips)


# ---------------------------------------------------------------------------------------------------- loss
def token_nll(hidden: jax.Array, logits_fn: Callable[[jax.Array], jax.Array], targets: jax.Array,
              chunk_size: Optional[int] = None) -> tuple[jax.Array, jax.Array]:
    """Per-position -log p(target) [B,T] float32 and whether the argmax equals the target [B,T] bool.

    hidden [B,T,H] final hidden states; logits_fn maps [B,c,H] -> [B,c,V]. With `chunk_size`, logits exist one
    [B, chunk, V] slice at a time and are recomputed in the backward pass (`map_position_chunks`).
    """

    def one(h: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = logits_fn(h).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t[..., None].astype(jnp.int32), axis=-1)[..., 0]
        return lse - picked, jnp.argmax(logits, axis=-1) == t

    return map_position_chunks(one, hidden, targets, chunk_size)


def micro_batch_sums(graphdef: nnx.GraphDef, params: Any, micro: Batch, chunk_size: Optional[int] = None,
                     frozen: Any = None) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token NLL, sum of weighted argmax hits) of one micro-batch [rows, T]; frozen: the weights
    that do not train (LoRA's base), or None when params are all of them. The model gets Variables of its own
    (copy=True): under a scan (evaluation) with remat, reusing the caller's would mutate another trace's."""
    model = nnx.merge(graphdef, params, *(() if frozen is None else (frozen,)), copy=True)
    hidden, _ = model.hidden_states(micro["input_ids"], micro["positions"], micro["segment_ids"],
                                    dropout_seeds=micro.get(DROPOUT_SEED_KEY))  # training batches with dropout
    nll, correct = token_nll(hidden, model.logits_from_hidden, micro["target_ids"], chunk_size)
    w = micro["loss_weights"].astype(jnp.float32)
    return jnp.sum(jnp.where(w > 0, nll * w, 0.0)), jnp.sum(jnp.where(correct, w, 0.0))


def loss_and_grads(graphdef: nnx.GraphDef, params: Any, batch: Batch, chunk_size: Optional[int] = None,
                   frozen: Any = None) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
    """Token-mean loss of a whole batch [num_micro, micro, T], its gradient with respect to params (accumulated
    micro-batch by micro-batch against the global target-token count) and metrics."""
    chex.assert_rank(batch["input_ids"], 3)
    total = jnp.maximum(jnp.sum(batch["loss_weights"].astype(jnp.float32)), 1.0)

    def micro_loss(p, micro):
        nll_sum, hits = micro_batch_sums(graphdef, p, micro, chunk_size, frozen)
        return nll_sum / total, hits

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def micro_grads(p, micro):
        (loss, hits), g = grad_fn(p, micro)
        return g, (loss, hits)

    grads, (losses, hits) = accumulate_gradients(micro_grads, params, batch)
    loss, hits = jnp.sum(losses), jnp.sum(hits)
    return loss, grads, {"loss": loss, "token_accuracy": hits / total, "target_tokens": total}


def make_train_step(graphdef: nnx.GraphDef, optimizer, optimizer_config: OptimizerConfig,
                    chunk_size: Optional[int] = None, param_shardings: Any = None, opt_shardings: Any = None):
    """jit(params, opt_state, batch, frozen=None) -> (params, opt_state, metrics), params and opt_state donated."""

    def step(params, opt_state, batch, frozen=None):
        _, grads, metrics = loss_and_grads(graphdef, params, batch, chunk_size, frozen)
        params, opt_state, opt_metrics = apply_gradients(optimizer, optimizer_config, grads, opt_state, params)
        return params, opt_state, {**metrics, **opt_metrics}

    out_shardings = None if param_shardings is None else (param_shardings, opt_shardings, None)
    return jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings)


def make_eval_step(graphdef: nnx.GraphDef, chunk_size: Optional[int] = None):
    """jit(params, batch, frozen=None) -> (weighted NLL sum, argmax hits, target-token count) of a
    [num_micro, micro, T] batch."""

    def evaluate(params, batch, frozen=None):
        def body(carry, micro):
            nll, hits = micro_batch_sums(graphdef, params, micro, chunk_size, frozen)
            return (carry[0] + nll, carry[1] + hits), None

        zero = jnp.zeros((), jnp.float32)
        (nll, hits), _ = jax.lax.scan(body, (zero, zero), batch)
        return nll, hits, jnp.sum(batch["loss_weights"].astype(jnp.float32))

    return jax.jit(evaluate)


# ---------------------------------------------------------------------------------------------------- trainer
def _split_trainable(model: CausalLM) -> tuple[nnx.GraphDef, Any, Any]:
    """(graphdef, trained params, frozen or None): a model with LoRA adapters trains only them (`trained_regex`)."""
    regex = trained_regex(model, None, "SFTTrainer")
    if regex is not None:
        return nnx.split(model, trainable_filter(regex), ...)
    graphdef, params = nnx.split(model)
    return graphdef, params, None


def _merge(graphdef: nnx.GraphDef, params: Any, frozen: Any) -> CausalLM:
    return nnx.merge(graphdef, params, *(() if frozen is None else (frozen,)))


def _pad_id(tokenizer: Any, model_config: Any) -> int:
    for candidate in (getattr(tokenizer, "pad_token_id", None), model_config.pad_token_id,
                      getattr(tokenizer, "eos_token_id", None)):
        if candidate is not None and 0 <= int(candidate) < model_config.vocab_size:
            return int(candidate)
    return 0


class SFTTrainer:
    """Parameters, optimizer state, data and jitted steps of one SFT run.

    The model's arrays are donated to the train step: use `model()` (or `sft_train`'s returned model) afterwards,
    not the model passed in.
    """

    def __init__(self, model: CausalLM, tokenizer: Any, examples: Sequence[ToolRLExample], config: SFTConfig, *,
                 eval_examples: Sequence[ToolRLExample] = (), placement: Placement = Placement()):
        self.config = config
        self.tokenizer = tokenizer
        self.placement = placement
        model_config = self.model_config = model.config
        self.pad_id = _pad_id(tokenizer, model_config)
        encoder = SFTEncoder(tokenizer)
        self.end_of_turn_id = encoder.end_of_turn_id
        tokenize = functools.partial(tokenize_examples, tokenizer, max_length=config.max_length,
                                     max_prompt_length=config.max_prompt_length, vocab_size=model_config.vocab_size,
                                     encoder=encoder)
        sequences, self.report = tokenize(examples)
        if self.report.num_dropped:
            logger.warning("sft: dropped %d of %d examples whose assistant turn does not fit in max_length=%d "
                           "(example indices %s)", self.report.num_dropped, self.report.num_examples,
                           config.max_length, list(self.report.dropped_indices[:10]))
        if self.report.num_truncated:
            logger.info("sft: %d prompts were cut from the left to fit", self.report.num_truncated)
        self.data = SFTDataset(sequences, config.batching(self.pad_id))
        self.eval_examples = list(eval_examples)
        self.eval_data: Optional[SFTDataset] = None
        self.eval_sequences: list[SFTSequence] = []
        self.eval_report: Optional[TokenizeReport] = None
        if self.eval_examples:
            self.eval_sequences, self.eval_report = tokenize(self.eval_examples)
            if self.eval_sequences:
                self.eval_data = SFTDataset(self.eval_sequences, config.batching(self.pad_id, evaluation=True))
        self.total_steps = config.total_steps(self.data.batches_per_epoch)
        self.optimizer_config = config.optimizer_config(self.total_steps)
        self.optimizer = make_optimizer(self.optimizer_config, self.total_steps)

        # The returned model keeps the caller's config; training may override remat. A model with LoRA adapters
        # (models/lora.py) trains them alone: the rest is `frozen` (None when every weight trains).
        self._export_graphdef, params, self.frozen = _split_trainable(model)
        self.lora_dropout = lora_dropout_rate(model)
        if config.remat is not None and config.remat != model_config.remat:
            train_model = _merge(self._export_graphdef, params, self.frozen)
            train_model.config = model_config.replace(remat=config.remat)
            self.graphdef, params, self.frozen = _split_trainable(train_model)
        else:
            self.graphdef = self._export_graphdef
        if config.micro_batch_size % placement.rows_multiple:
            raise ValueError(f"micro_batch_size ({config.micro_batch_size}) must be a multiple of the mesh's "
                             f"data-parallel size (data x fsdp = {placement.rows_multiple})")
        self.params = placement.place_state(params)
        self.opt_state = placement.init_opt_state(self.optimizer, self.params)
        self._train_step = make_train_step(self.graphdef, self.optimizer, self.optimizer_config,
                                           config.logits_chunk_size, placement.state_shardings(self.params),
                                           placement.state_shardings(self.opt_state))
        self._eval_step = make_eval_step(self.graphdef, config.logits_chunk_size)
        self._sampler = None
        self.step = 0

    # ------------------------------------------------------------------ state
    def train_state(self) -> dict[str, Any]:
        return {"params": self.params, "opt_state": self.opt_state}

    def model(self) -> CausalLM:
        """The current policy as a CausalLM (with the configuration of the model passed in)."""
        return _merge(self._export_graphdef, self.params, self.frozen)

    def place(self, batch: SFTBatch, step: Optional[int] = None) -> Batch:
        """Host arrays [num_micro, micro, T] -> device arrays (each micro-batch's rows split over the data-parallel
        devices under a mesh). With LoRA dropout, a training step's batch also gets its rows' dropout seeds."""
        arrays = batch.arrays()
        if step is not None and self.lora_dropout > 0:
            arrays[DROPOUT_SEED_KEY] = dropout_seeds(self.config.seed, step, 0, arrays["input_ids"].shape[:2])
        return self.placement.place_rows(arrays, row_axis=1)

    def load_train_state(self, state: Any, step: int) -> None:
        self.params, self.opt_state, self.step = state["params"], state["opt_state"], int(step)

    def _loop(self, checkpointer: Any = None) -> TrainLoop:
        metadata = {"sft_config": dataclasses.asdict(self.config), "total_steps": self.total_steps}
        loop = TrainLoop(self._train_one, self.data, self.total_steps, state=self, checkpointer=checkpointer,
                         defer_metrics=True, metadata=metadata)
        loop.step = self.step
        return loop

    def restore(self, checkpointer: Any) -> int:
        """Loads the newest checkpoint that restores, when there is one; returns the step trained so far."""
        step = self._loop(checkpointer).restore()
        if step:
            logger.info("sft: resumed from step %d of %d (epoch %.2f)", step, self.total_steps,
                        self.data.epochs_done)
        return step

    def _train_one(self, batch: SFTBatch, step: int) -> StepOutput:
        self.params, self.opt_state, device_metrics = self._train_step(self.params, self.opt_state,
                                                                       self.place(batch, step), self.frozen)
        self.step = step
        host = {"examples": batch.num_examples, "rows": batch.num_rows, "row_length": batch.input_ids.shape[-1],
                "tokens": batch.num_tokens, "target_tokens": batch.num_target_tokens,
                "padding_fraction": 1.0 - batch.num_tokens / (batch.num_rows * batch.input_ids.shape[-1]),
                "epoch": self.data.epochs_done}
        return StepOutput(device_metrics, extras=host)

    # ------------------------------------------------------------------ training
    def train(self, *, metrics: Any = None, checkpointer: Any = None,
              on_step: Optional[Callable[[int, dict], None]] = None) -> list[dict[str, Any]]:
        """Runs from `self.step` to `total_steps` (the shared `TrainLoop`); returns one metrics dict per step trained
        here.

        metrics: a MetricsWriter (lines every `log_every` steps, and evaluation results); checkpointer: saves on
        its schedule and at the last step (params, optimizer state, data position); on_step(step, metrics) is
        called for every step (one step late, so fetching metrics never stalls the device).
        """
        cfg = self.config
        guard = DivergenceGuard(self.optimizer_config.max_consecutive_skips, "SFT")
        history: list[dict[str, Any]] = []
        last_time = time.perf_counter()

        def finish(record: StepRecord) -> None:
            nonlocal last_time
            step, values, host = record.step, record.metrics, record.extras
            guard.observe(values, f"SFT step {step}")
            now = time.perf_counter()
            seconds, last_time = now - last_time, now
            row = {"step": step, **values, **host, "time/step_s": seconds,
                   "throughput/tokens_per_s": host["tokens"] / max(seconds, 1e-9),
                   "throughput/target_tokens_per_s": host["target_tokens"] / max(seconds, 1e-9)}
            if step % cfg.log_every == 0 or step == self.total_steps:
                logger.info("sft step %d/%d loss=%.4f token_acc=%.3f grad_norm=%.3f lr=%.3g tokens/s=%.0f", step,
                            self.total_steps, row["loss"], row["token_accuracy"], row["grad_norm"], row["lr"],
                            row["throughput/tokens_per_s"])
                if metrics is not None:
                    metrics.write(step, {f"train/{k}" if "/" not in k else k: v for k, v in row.items()
                                         if k != "step"})
            history.append(row)
            if on_step is not None:
                on_step(step, row)

        loop = self._loop(checkpointer)
        loop.add_hook(finish)
        if self.eval_data is not None and cfg.eval_every > 0:
            loop.add_hook(lambda record: (None if record.step == self.total_steps
                                          else self._log_eval(record.step, metrics, history)),
                          every=cfg.eval_every, needs_state=True)
        if self.eval_examples:
            loop.add_hook(lambda step: history and self._log_eval(step, metrics, history), at="end")
        loop.run()
        return history

    def _log_eval(self, step: int, metrics: Any, history: list[dict[str, Any]]) -> None:
        result = self.evaluate()
        logger.info("sft eval at step %d: %s", step, " ".join(f"{k}={v:.4g}" for k, v in sorted(result.items())))
        if metrics is not None:
            metrics.write(step, result)
        if history and history[-1]["step"] == step:
            history[-1].update(result)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        """Held-out token-mean loss and token accuracy; with `eval_accuracy`, greedy exact-match accuracy and the
        ToolRL reward's format score and call-list accuracy."""
        out: dict[str, float] = {}
        if self.eval_data is None:
            return out
        nll = hits = count = 0.0
        for batch in self.eval_data.iter_epoch(0):
            n, h, c = jax.device_get(self._eval_step(self.params, self.place(batch), self.frozen))
            nll, hits, count = nll + float(n), hits + float(h), count + float(c)
        out["eval/loss"] = nll / max(count, 1.0)
        out["eval/token_accuracy"] = hits / max(count, 1.0)
        out["eval/examples"] = float(len(self.eval_sequences))
        if self.config.eval_accuracy:
            out.update(self.greedy_accuracy())
        return out

    def greedy_accuracy(self) -> dict[str, float]:
        """Greedy responses to the held-out prompts scored by exact match and the ToolRL reward."""
        from toolrl_jax.rewards.batch import score_batch
        from toolrl_jax.sampling import Sampler, SamplingConfig
        from toolrl_jax.tokenization import stop_token_ids

        if self._sampler is None:
            self._sampler = Sampler(self.model(), pad_id=self.pad_id, stop_token_ids=stop_token_ids(self.tokenizer),
                                    tokenizer=self.tokenizer, mesh=self.placement.mesh)
        self._sampler.update_params(self.model())
        prompts = [s.input_ids[:s.prompt_length].tolist() for s in self.eval_sequences]
        truths = [self.eval_examples[s.example_index].ground_truth for s in self.eval_sequences]
        budget = min(self.config.eval_max_new_tokens,
                     self.model_config.max_position_embeddings - max(len(p) for p in prompts))
        sampling = SamplingConfig(max_new_tokens=max(budget, 1), temperature=0.0,
                                  max_prompts_per_batch=max(1, min(64, len(prompts))))
        texts = self._sampler.generate(prompts, sampling, jax.random.key(self.config.seed)).texts
        responses = [t.strip() for t in texts]
        exact = np.mean([r == g.strip() for r, g in zip(responses, truths)])
        rewards = score_batch(responses, truths, step=0)
        return {"eval/exact_match": float(exact), "eval/reward_accuracy": float(rewards.accuracy.mean()),
                "eval/reward_format": float(rewards.format.mean())}


def sft_train(model: CausalLM, tokenizer: Any, examples: Sequence[ToolRLExample], config: SFTConfig, *,
              eval_examples: Sequence[ToolRLExample] = (), placement: Placement = Placement(), metrics: Any = None,
              checkpointer: Any = None, on_step: Optional[Callable[[int, dict], None]] = None,
              resume: bool = True) -> tuple[CausalLM, list[dict[str, Any]]]:
    """Fine-tunes `model` on the assistant turns of `examples`; returns (trained model, per-step metrics).

    With a `checkpointer` that already holds a checkpoint and `resume`, training continues from it exactly
    (params, optimizer state, data position). The arrays of `model` are donated: use the returned model.
    """
    trainer = SFTTrainer(model, tokenizer, examples, config, eval_examples=eval_examples, placement=placement)
    if checkpointer is not None and resume:
        trainer.restore(checkpointer)
    history = trainer.train(metrics=metrics, checkpointer=checkpointer, on_step=on_step)
    return trainer.model(), history
