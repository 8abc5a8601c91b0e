"""AdamW with global-norm clipping and learning-rate schedules, configured by a frozen dataclass.

Defaults are ToolRL's recipe (veRL/torch AdamW): lr 1e-6 constant, betas (0.9, 0.999), eps 1e-8, weight decay 0.01
on every parameter, gradient-norm clip 1.0. The learning rate is injected as a hyperparameter so the value used by
the latest update can be read back from the optimizer state for logging.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "linear", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW + clipping + schedule.

    schedule: "constant" (after an optional linear warm-up from 0), "linear" (warm-up, then linear decay to
    min_lr_ratio * learning_rate at total_steps) or "cosine" (warm-up, then cosine decay to the same floor).
    decay_all_params: True applies weight decay to every parameter (torch AdamW / veRL default); False skips
    parameters with fewer than 2 dimensions (norm scales, biases).
    max_grad_norm: clip by global norm; None disables clipping.
    skip_nonfinite: an update whose gradient norm is NaN/inf leaves parameters and optimizer state unchanged (veRL).
    mu_dtype: dtype of AdamW's first moment (None = the parameter dtype). "bfloat16" saves 2 bytes per parameter
      with fp32 weights (the second moment stays in the parameter dtype: its square-root scale needs the range).
    """

    learning_rate: float = 1e-6
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01
    max_grad_norm: Optional[float] = 1.0
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: Optional[int] = None
    min_lr_ratio: float = 0.0
    decay_all_params: bool = True
    skip_nonfinite: bool = True
    mu_dtype: Optional[str] = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"OptimizerConfig.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.learning_rate < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("OptimizerConfig: learning_rate, weight_decay and warmup_steps must be >= 0")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"OptimizerConfig.max_grad_norm must be positive or None, got {self.max_grad_norm}")
        if self.schedule != "constant":
            if self.total_steps is None or self.total_steps <= self.warmup_steps:
                raise ValueError(f"OptimizerConfig: schedule {self.schedule!r} needs total_steps > warmup_steps "
                                 f"(got total_steps={self.total_steps}, warmup_steps={self.warmup_steps})")
        if self.mu_dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"OptimizerConfig.mu_dtype must be None, 'float32' or 'bfloat16', got {self.mu_dtype!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"OptimizerConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def make_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Learning rate as a function of the update count (0 for the first update)."""
    peak = cfg.learning_rate
    if cfg.schedule == "constant":
        if cfg.warmup_steps == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules([optax.linear_schedule(0.0, peak, cfg.warmup_steps),
                                     optax.constant_schedule(peak)], [cfg.warmup_steps])
    end = peak * cfg.min_lr_ratio
    decay_steps = cfg.total_steps - cfg.warmup_steps
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


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """clip_by_global_norm (optional) followed by AdamW with an injected (loggable) learning rate."""
    # Hyper-parameters stay float32 whatever the parameter dtype (in bf16, b2 = 0.999 would round to 1.0).
    adamw = optax.inject_hyperparams(optax.adamw, static_args=("mask", "mu_dtype"), hyperparam_dtype=jnp.float32)(
        learning_rate=make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=None if cfg.decay_all_params else decay_mask, mu_dtype=cfg.mu_dtype and jnp.dtype(cfg.mu_dtype))
    clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm is not None else optax.identity()
    return optax.chain(clip, adamw)


def learning_rate(opt_state: Any) -> jax.Array:
    """The learning rate used by the most recent update of a `make_optimizer` state."""
    return opt_state[1].hyperparams["learning_rate"]


def apply_gradients(optimizer: optax.GradientTransformation, cfg: OptimizerConfig, grads: Any, opt_state: Any,
                    params: Any) -> tuple[Any, Any, dict[str, jax.Array]]:
    """One optimizer step; returns (params, opt_state, metrics with the pre-clip grad_norm, lr, update_skipped).

    With `cfg.skip_nonfinite`, a non-finite gradient norm keeps params and opt_state as they were.
    """
    grad_norm = optax.global_norm(grads)
    updates, new_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    skipped = jnp.logical_not(jnp.isfinite(grad_norm)) if cfg.skip_nonfinite else jnp.zeros((), bool)
    if cfg.skip_nonfinite:
        keep = lambda new, old: jnp.where(skipped, old, new)  # noqa: E731
        new_params = jax.tree.map(keep, new_params, params)
        new_state = jax.tree.map(keep, new_state, opt_state)
    metrics = {"grad_norm": grad_norm, "lr": learning_rate(new_state), "update_skipped": skipped.astype(jnp.float32)}
    return new_params, new_state, metrics
