"""AdamW with global-norm clipping and learning-rate schedules, configured by a frozen dataclass.

Defaults are ToolRL's recipe (veRL/torch AdamW): lr 1e-6 constant, betas (0.9, 0.999), eps 1e-8, weight decay 0.01
on every parameter, gradient-norm clip 1.0. The learning rate is injected as a hyperparameter so the value used by
the latest update can be read back from the optimizer state for logging.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from toolrl_jax.config_checks import option

SCHEDULES = ("constant", "linear", "cosine")
logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + clipping + schedule.

    schedule: "constant" (after an optional linear warm-up from 0), "linear" (warm-up, then linear decay to
    min_lr_ratio * learning_rate at the run's last update) or "cosine" (warm-up, then cosine decay to the same
    floor). The number of updates is not part of the config: the trainer knows it and passes it to `make_optimizer`.
    decay_all_params: True applies weight decay to every parameter (torch AdamW / veRL default); False skips
    parameters with fewer than 2 dimensions (norm scales, biases).
    max_grad_norm: clip by global norm; None disables clipping.
    skip_nonfinite: an update whose gradient norm is NaN/inf leaves parameters and optimizer state unchanged (veRL).
    max_consecutive_skips: that many skipped updates in a row stop the run (`DivergenceGuard`): one bad batch is
      survivable, a diverged model is not (every later gradient is non-finite too).
    mu_dtype: dtype of AdamW's first moment (None = the parameter dtype). "bfloat16" saves 2 bytes per parameter
      with fp32 weights (the second moment stays in the parameter dtype: its square-root scale needs the range).
    """

    learning_rate: float = option(1e-6, "Peak learning rate.", flag="lr")
    b1: float = option(0.9, "AdamW beta1.", flag="adam_b1")
    b2: float = option(0.999, "AdamW beta2.", flag="adam_b2")
    eps: float = option(1e-8, "AdamW epsilon.", flag="adam_eps")
    weight_decay: float = option(0.01, "AdamW (decoupled) weight decay.")
    max_grad_norm: Optional[float] = option(1.0, "Global gradient-norm clip (0 = off).", zero_is_none=True)
    schedule: str = option("constant", "Learning-rate schedule over the run's optimizer updates.", choices=SCHEDULES,
                           flag="lr_schedule")
    warmup_steps: int = option(0, "Linear warm-up optimizer updates.")
    min_lr_ratio: float = option(0.0, "Final learning rate of the linear/cosine decay, as a fraction of --lr.")
    decay_all_params: bool = option(True, "Weight decay on every parameter (torch/veRL); false skips vectors "
                                          "(norm scales, biases).")
    skip_nonfinite: bool = option(True, "Skip (and log) an update whose gradient norm is NaN/inf (veRL).")
    max_consecutive_skips: int = option(3, "Skipped updates in a row that stop the run (a diverged model), before "
                                           "anything of that step is saved.", flag="max_consecutive_skipped_updates")
    mu_dtype: Optional[str] = option(None, "AdamW first-moment dtype (default: the parameter dtype); bfloat16 saves "
                                           "2 bytes per parameter.", choices=("float32", "bfloat16"),
                                     flag="adam_mu_dtype")

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.learning_rate < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("OptimizerConfig: learning_rate, weight_decay and warmup_steps must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"OptimizerConfig.max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if self.mu_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"OptimizerConfig.mu_dtype must be None, 'float32' or 'bfloat16', got {self.mu_dtype!r}")
        if self.max_consecutive_skips < 1:
            raise ValueError(f"OptimizerConfig.max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")
        for name in ("learning_rate", "b1", "b2", "eps", "weight_decay", "min_lr_ratio"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"OptimizerConfig.{name} must be finite, got {getattr(self, name)}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0) or self.eps <= 0:
            raise ValueError(f"OptimizerConfig: b1 and b2 must be in [0, 1) and eps > 0, got b1={self.b1}, "
                             f"b2={self.b2}, eps={self.eps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimizerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def check_schedule(cfg: OptimizerConfig, total_updates: Optional[int]) -> None:
    """Raises ValueError when `cfg.schedule` cannot run over `total_updates` optimizer updates."""
    if cfg.schedule != "constant" and (total_updates is None or total_updates <= cfg.warmup_steps):
        raise ValueError(f"OptimizerConfig: schedule {cfg.schedule!r} needs more updates than warmup_steps (got "
                         f"{total_updates} updates, warmup_steps={cfg.warmup_steps})")


def make_schedule(cfg: OptimizerConfig, total_updates: Optional[int] = None) -> optax.Schedule:
    """Learning rate as a function of the update count (0 for the first update); decaying schedules end at update
    `total_updates`."""
    check_schedule(cfg, total_updates)
    peak = cfg.learning_rate
    if cfg.schedule == "constant":
        if cfg.warmup_steps == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup_steps),
                                     optax.constant_schedule(peak)], [cfg.warmup_steps])
    end = peak * cfg.min_lr_ratio
    decay_steps = total_updates - cfg.warmup_steps
    if cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.min_lr_ratio)
    if cfg.warmup_steps == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup_steps), decay], [cfg.warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay when `decay_all_params=False`: those with >= 2 dimensions."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(cfg: OptimizerConfig, total_updates: Optional[int] = None) -> optax.GradientTransformation:
    """clip_by_global_norm (optional) followed by AdamW with an injected (loggable) learning rate; `total_updates`
    (the run's optimizer updates) is needed by decaying schedules only."""
    # Hyper-parameters stay float32 whatever the parameter dtype (in bf16, b2 = 0.999 would round to 1.0).
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask", "mu_dtype"), hyperparam_dtype=jnp.float32)(
        learning_rate=make_schedule(cfg, total_updates), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
        weight_decay=cfg.weight_decay, mask=None if cfg.decay_all_params else decay_mask,
        mu_dtype=cfg.mu_dtype and jnp.dtype(cfg.mu_dtype))
    clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm is not None else optax.identity()
    return optax.chain(clip, adamw)


def learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate used by the most recent update of a `make_optimizer` state."""
    return opt_state[1].hyperparams["learning_rate"]


def apply_gradients(optimizer: optax.GradientTransformation, cfg: OptimizerConfig, grads: Any, opt_state: Any,
                    params: Any) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One optimizer step; returns (params, opt_state, metrics with the pre-clip grad_norm, lr, update_skipped,
    params_finite).

    With `cfg.skip_nonfinite`, a non-finite gradient norm keeps params and opt_state as they were. params_finite
    (1.0 / 0.0) says whether every returned parameter is finite; `DivergenceGuard` reads both flags on the host.
    """
    grad_norm = optax.global_norm(grads)
    updates, new_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    skipped = jnp.logical_not(jnp.isfinite(grad_norm)) if cfg.skip_nonfinite else jnp.zeros((), bool)
    if cfg.skip_nonfinite:
        keep = lambda new, old: jnp.where(skipped, old, new)  # noqa: E731
        new_params = jax.tree.map(keep, new_params, params)
        new_state = jax.tree.map(keep, new_state, opt_state)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(new_params)]))
    metrics = {"grad_norm": grad_norm, "lr": learning_rate(new_state), "update_skipped": skipped.astype(jnp.float32),
               "params_finite": finite.astype(jnp.float32)}
    return new_params, new_state, metrics


class TrainingDivergedError(FloatingPointError):
    """Raised when training cannot go on: non-finite parameters, or too many non-finite gradients in a row."""


class DivergenceGuard:
    """Reads each update's `update_skipped` / `params_finite` metrics (host values, in update order): logs every
    skipped update with its gradient norm, and raises `TrainingDivergedError` as soon as parameters are non-finite or
    after `max_consecutive_skips` skipped updates in a row. The caller must not save the state it raised on."""

    def __init__(self, max_consecutive_skips: int, name: str = "policy"):
        if max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.max_consecutive_skips = max_consecutive_skips
        self.name = name
        self.consecutive_skips = 0
        self.total_skips = 0

    def observe(self, metrics: Mapping[str, Any], where: str, prefix: str = "") -> None:
        """Checks one update's metrics (keys `prefix + "update_skipped"` etc.); `where` names the update in messages,
        e.g. "GRPO step 7, update 2 of 4"."""
        grad_norm = float(metrics.get(prefix + "grad_norm", float("nan")))
        if float(metrics.get(prefix + "params_finite", 1.0)) < 1.0:
            raise TrainingDivergedError(
                f"{self.name} parameters became non-finite at {where} (grad_norm {grad_norm:.4g}); the run stops and "
                f"nothing from this step is saved: resume from the last checkpoint with a lower learning rate")
        if float(metrics.get(prefix + "update_skipped", 0.0)) > 0.0:
            self.consecutive_skips += 1
            self.total_skips += 1
            logger.warning("%s update skipped at %s: non-finite gradient norm %s (%d in a row, %d in all; the run "
                           "stops at %d in a row)", self.name, where, grad_norm, self.consecutive_skips,
                           self.total_skips, self.max_consecutive_skips)
            if self.consecutive_skips >= self.max_consecutive_skips:
                raise TrainingDivergedError(
                    f"{self.name}: {self.consecutive_skips} consecutive updates had non-finite gradients (the last at "
                    f"{where}, grad_norm {grad_norm}): the model has diverged; the run stops and nothing from this "
                    f"step is saved. Resume from the last checkpoint with a lower learning rate, or raise "
                    f"--max_consecutive_skipped_updates to tolerate more")
        else:
            self.consecutive_skips = 0
