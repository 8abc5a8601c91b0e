"""The critic of ToolRL's PPO baseline: a value model initialised from the policy, GAE advantages, clipped updates.

The recipe is veRL's PPO as used by the paper (spec/toolrl.md): the critic is a copy of the policy's transformer with
a scalar value head in place of the LM head; token rewards are the outcome reward on the last response token minus
beta * (logp_old - logp_ref) on every token when the KL is folded into the reward; GAE with gamma = lambda = 1;
advantages whitened over the batch's response tokens; clipped value loss (cliprange 0.5, factor 0.5); AdamW lr 1e-5;
the critic is updated on the same mini-batches as the actor.

Jitted pure functions of explicit pytrees, mirroring the actor's in `actor.py`:
  * `make_value_fn(graphdef)`: (state, rows) -> values [N, R] of the states the response tokens are sampled from,
  * `make_critic_update_fn(...)`: (params, opt_state, frozen, minibatch [num_micro, micro_rows, ...]) -> one AdamW
    update whose micro-batch gradients sum (lax.scan) to the exact token mean over the whole mini-batch.
`Critic` bundles the state and these functions for a trainer.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolrl_jax.config_checks import option, requirement_checker
from toolrl_jax.models.decoder import CausalLM
from toolrl_jax.optim import OptimizerConfig, apply_gradients, make_optimizer
from toolrl_jax.placement import Placement
from toolrl_jax.rl.advantages import gae_advantages_and_returns, token_level_rewards
from toolrl_jax.rl.masked import masked_mean, masked_var
from toolrl_jax.rl.ppo import ValueLossConfig, count_normalizers, critic_loss
from toolrl_jax.training.accumulation import accumulate_gradients
from toolrl_jax.training.trainable import count_params, trainable_filter

# `rl.losses.value_loss` returns 0.5 * agg(max((v - R)^2, (v_clip - R)^2)); CriticConfig.value_loss_coef is the total
# weight on agg(...), so the loss is rescaled by value_loss_coef / this.
_VALUE_LOSS_BUILTIN_FACTOR = 0.5

VALUE_KEYS = ("input_ids", "positions", "segment_ids", "response_mask")
UPDATE_KEYS = VALUE_KEYS + ("old_values", "returns")


@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """The PPO critic. Defaults are ToolRL's PPO baseline (veRL): lr 1e-5, value clip 0.5, loss factor 0.5, GAE 1/1.

    value_loss_coef: total weight on the token mean of max((v - R)^2, (v_clip - R)^2). veRL's critic loss is exactly
      0.5 * that mean (the 0.5 inside its compute_value_loss; the standalone critic applies no further coefficient),
      so the default 0.5 reproduces it.
    value_head_init_std: 0 initialises the value head to zeros (V = 0 everywhere at step 0, so the first advantages are
      the Monte-Carlo returns with no head noise); > 0 draws its kernel from N(0, std^2) (HF's TokenClassification
      head uses 0.02), with `seed`.
    """

    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-5)
    value: ValueLossConfig = ValueLossConfig(cliprange_value=0.5)
    value_loss_coef: float = option(0.5, "PPO: weight of the clipped squared value error (veRL: 0.5).")
    gamma: float = option(1.0, "PPO discount.", flag="gae_gamma")
    lam: float = option(1.0, "PPO GAE lambda.", flag="gae_lambda")
    whiten_advantages: bool = option(True, "PPO: whiten advantages over the batch's response tokens.")
    value_head_init_std: float = option(0.0, "PPO: std of the value head's initial kernel (0 = zeros).")
    seed: int = 0

    def __post_init__(self) -> None:
        need = requirement_checker("CriticConfig")
        need(isinstance(self.optimizer, OptimizerConfig),
             f"optimizer must be an OptimizerConfig, got {type(self.optimizer).__name__}")
        need(isinstance(self.value, ValueLossConfig),
             f"value must be a ValueLossConfig, got {type(self.value).__name__}")
        need(self.value_loss_coef > 0, f"value_loss_coef must be > 0, got {self.value_loss_coef}")
        need(0.0 <= self.gamma <= 1.0, f"gamma must be in [0, 1], got {self.gamma}")
        need(0.0 <= self.lam <= 1.0, f"lam must be in [0, 1], got {self.lam}")
        need(self.value_head_init_std >= 0, f"value_head_init_std must be >= 0, got {self.value_head_init_std}")


# ---------------------------------------------------------------------------- the value model
class ValueModel(nnx.Module):
    """A CausalLM transformer (its LM head removed) plus a float32 scalar value head on the final hidden states."""

    def __init__(self, backbone: CausalLM, *, rngs: nnx.Rngs, head_init_std: float = 0.0):
        """Takes ownership of `backbone` (its lm_head is removed); use `from_policy` to start from a policy."""
        hidden = backbone.config.hidden_size
        backbone.lm_head = None  # never used: the value head replaces it (veRL's critic has no LM head either)
        self.backbone = backbone
        kernel_init = (nnx.initializers.zeros_init() if head_init_std == 0.0
                       else nnx.initializers.normal(head_init_std))
        self.value_head = nnx.Linear(hidden, 1, use_bias=True, kernel_init=kernel_init,
                                     bias_init=nnx.initializers.zeros_init(), dtype=jnp.float32,
                                     param_dtype=jnp.float32, rngs=rngs)

    @classmethod
    def from_policy(cls, model: CausalLM, rngs: nnx.Rngs, head_init_std: float = 0.0) -> "ValueModel":
        """A critic whose transformer is a deep copy of `model`'s weights (fresh buffers, so donating the critic's
        state never invalidates the policy's); the policy's LM head is neither copied nor kept."""
        graphdef, lm_head, rest = nnx.split(model, nnx.PathContains("lm_head"), ...)
        backbone = nnx.merge(graphdef, lm_head, jax.tree.map(jnp.copy, rest))  # lm_head is dropped just below
        return cls(backbone, rngs=rngs, head_init_std=head_init_std)

    def values_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """[..., H] hidden states -> [...] float32 values."""
        return self.value_head(hidden.astype(jnp.float32))[..., 0]

    def __call__(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        return self.values(input_ids, positions, segment_ids)

    def values(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """Float32 values [B, T]: V at column t is the value of the state after reading tokens 0..t."""
        hidden, _ = self.backbone.hidden_states(input_ids, positions, segment_ids)
        return self.values_from_hidden(hidden)


def response_values(graphdef: nnx.GraphDef, state: Any, batch: Mapping[str, jax.Array]) -> jax.Array:
    """Float32 [N, R]: entry j is the value of the state response token j is sampled from (hidden state at column
    P + j - 1, the same column whose logits give token j's log-prob); 0 on response padding.

    `state` is the value model's state, or a tuple of partial states (e.g. trainable, frozen) merged in order.
    """
    model = nnx.merge(graphdef, *state) if isinstance(state, tuple) else nnx.merge(graphdef, state)
    mask = batch["response_mask"]
    n, r = mask.shape
    chex.assert_shape(batch["input_ids"], (n, None))
    p = batch["input_ids"].shape[1] - r
    if p < 1:
        raise ValueError(f"response_values: rows of {batch['input_ids'].shape[1]} columns leave no prompt column "
                         f"before the {r} response tokens")
    hidden, _ = model.backbone.hidden_states(batch["input_ids"], batch["positions"], batch["segment_ids"])
    hidden = jax.lax.dynamic_slice_in_dim(hidden, p - 1, r, axis=1)
    return jnp.where(mask.astype(bool), model.values_from_hidden(hidden), 0.0)


# ---------------------------------------------------------------------------- advantages
def ppo_advantages(outcome: jax.Array, mask: jax.Array, values: jax.Array, old_logp: Optional[jax.Array] = None,
                   ref_logp: Optional[jax.Array] = None, kl_coef: float | jax.Array = 0.0, gamma: float = 1.0,
                   lam: float = 1.0, whiten: bool = True) -> tuple[jax.Array, jax.Array]:
    """PPO advantages and value targets, both [N, R] float32 (0 on padding).

    Token rewards: outcome [N] on each row's last valid token, minus kl_coef * (old_logp - ref_logp) on every valid
    token when both log-probs are given (veRL's KL-in-reward, k1). Then GAE over valid tokens; returns = A + V
    (before whitening); advantages whitened over all valid tokens of the batch when `whiten`. Pure and jit-friendly
    (gamma, lam, whiten static; kl_coef may be traced).
    """
    chex.assert_rank([outcome, mask, values], [1, 2, 2])
    chex.assert_equal_shape([mask, values])
    chex.assert_equal(outcome.shape[0], mask.shape[0])
    if (old_logp is None) != (ref_logp is None):
        raise ValueError("ppo_advantages: pass both old_logp and ref_logp for the KL-in-reward term, or neither")
    kl = None
    if old_logp is not None:
        chex.assert_equal_shape([old_logp, ref_logp, mask])
        kl = old_logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
    elif not isinstance(kl_coef, jax.Array) and kl_coef != 0.0:
        raise ValueError(f"ppo_advantages: kl_coef={kl_coef} needs old_logp and ref_logp")
    rewards = token_level_rewards(outcome, mask, kl=kl, kl_coef=kl_coef)
    return gae_advantages_and_returns(rewards, values, mask, gamma=gamma, lam=lam, whiten=whiten)


# ---------------------------------------------------------------------------- jitted pure functions
def make_value_fn(graphdef: nnx.GraphDef) -> Callable[[Any, dict], jax.Array]:
    """jit(state, rows) -> values [N, R]; one compile per row shape."""
    return jax.jit(functools.partial(response_values, graphdef))


def critic_objective(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array,
                     value_config: ValueLossConfig, value_loss_coef: float = 0.5,
                     total_tokens: Optional[jax.Array] = None,
                     total_sequences: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """value_loss_coef * agg(max((v - R)^2, (v_clip - R)^2)) for one (micro-)batch, plus summable metrics."""
    loss, metrics = critic_loss(values, old_values, returns, mask, value_config, total_tokens, total_sequences)
    loss = loss * (value_loss_coef / _VALUE_LOSS_BUILTIN_FACTOR)
    return loss, {"vf_loss": loss, "vf_clipfrac": metrics["vf_clipfrac"], "values_mean": metrics["vpred_mean"]}


def make_critic_update_fn(graphdef: nnx.GraphDef, optimizer, optimizer_config: OptimizerConfig,
                          value_config: ValueLossConfig, value_loss_coef: float = 0.5, param_shardings: Any = None,
                          opt_shardings: Any = None):
    """jit(params, opt_state, frozen, minibatch) -> (params, opt_state, metrics); params/opt_state donated.

    As `grpo.make_update_fn`: params is the trainable state, frozen the rest (merged after params); minibatch holds
    arrays [num_micro, micro_rows, ...] with keys input_ids, positions, segment_ids, response_mask, old_values and
    returns. Metrics are prefixed "critic/" (vf_loss, vf_clipfrac, values_mean, returns_mean, vf_explained_var of the
    pre-update predictions, grad_norm, lr, update_skipped).
    """

    def update(params, opt_state, frozen, minibatch):
        r = minibatch["response_mask"].shape[-1]
        normalizers = count_normalizers(minibatch["response_mask"].reshape(-1, r))

        def loss_fn(p, micro):
            v = response_values(graphdef, (p, frozen), micro)
            loss, metrics = critic_objective(v, micro["old_values"], micro["returns"], micro["response_mask"],
                                             value_config, value_loss_coef, **normalizers)
            return loss, (metrics, v)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def micro_grads(p, micro):
            (_, outputs), g = grad_fn(p, micro)
            return g, outputs

        grads, (metrics, vpreds) = accumulate_gradients(micro_grads, params, minibatch)
        metrics = jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)  # each micro value is pre-normalised
        mask = minibatch["response_mask"].reshape(-1, r).astype(bool)
        returns = minibatch["returns"].reshape(-1, r).astype(jnp.float32)
        vpreds = vpreds.reshape(-1, r)
        metrics["returns_mean"] = masked_mean(returns, mask)
        metrics["vf_explained_var"] = 1.0 - masked_var(returns - vpreds, mask) / (masked_var(returns, mask) + 1e-5)
        new_params, new_opt_state, opt_metrics = apply_gradients(optimizer, optimizer_config, grads, opt_state,
                                                                 params)
        return new_params, new_opt_state, {f"critic/{k}": v for k, v in {**metrics, **opt_metrics}.items()}

    out_shardings = None
    if param_shardings is not None:
        out_shardings = (param_shardings, opt_shardings, None)
    return jax.jit(update, donate_argnums=(0, 1), out_shardings=out_shardings)


@functools.partial(jax.jit, static_argnames=("gamma", "lam", "whiten"))
def _ppo_advantages_jit(outcome, mask, values, old_logp, ref_logp, kl_coef, gamma, lam, whiten):
    return ppo_advantages(outcome, mask, values, old_logp, ref_logp, kl_coef, gamma=gamma, lam=lam, whiten=whiten)


# ---------------------------------------------------------------------------- the holder a trainer plugs in
def backbone_filter(regex: Optional[str]) -> Callable[[tuple, Any], bool]:
    """nnx filter of the critic's trainable parameters: the value head always, plus backbone parameters whose path
    relative to the backbone (the policy's own path, e.g. "layers/3/mlp/...") matches `regex`; None = all."""
    policy_filter = trainable_filter(regex)
    return lambda path, value: not path or str(path[0]) != "backbone" or policy_filter(path[1:], value)


class Critic:
    """The critic's state (params, frozen, optimizer state) and its jitted value/update functions.

    Typical use in a PPO step (rows from `join_prompt_and_response`):
        values = critic.values(rows, micro_rows)
        adv, returns = critic.advantages(outcome, rows["response_mask"], values, old_logp, ref_logp, kl_coef)
        ... for each actor mini-batch mb (stacked [num_micro, micro_rows, ...], with old_values=values, returns):
        metrics = critic.update(mb)
    """

    def __init__(self, policy: CausalLM, config: CriticConfig = CriticConfig(), *,
                 trainable_regex: Optional[str] = None, placement: Placement = Placement(),
                 total_updates: Optional[int] = None):
        """policy: the initial policy (its weights are copied). trainable_regex: as the actor's (paths relative to
        the transformer), the value head always trains. placement: where the critic's arrays live. total_updates:
        the run's updates (for a decaying learning-rate schedule)."""
        self.config = config
        self.placement = placement
        model = ValueModel.from_policy(policy, nnx.Rngs(config.seed), head_init_std=config.value_head_init_std)
        self.graphdef, params, frozen = nnx.split(model, backbone_filter(trainable_regex), ...)
        self.optimizer = make_optimizer(config.optimizer, total_updates)
        self.params, self.frozen = placement.place_state(params), placement.place_state(frozen)
        self.opt_state = placement.init_opt_state(self.optimizer, self.params)
        self.value_fn = make_value_fn(self.graphdef)
        self.update_fn = make_critic_update_fn(self.graphdef, self.optimizer, config.optimizer, config.value,
                                               config.value_loss_coef, placement.state_shardings(self.params),
                                               placement.state_shardings(self.opt_state))

    @property
    def num_trainable(self) -> int:
        return count_params(self.params)

    def model(self) -> ValueModel:
        return nnx.merge(self.graphdef, self.params, self.frozen)

    def values(self, rows: Mapping[str, np.ndarray], micro_rows: int) -> np.ndarray:
        """Values [N, R] float32 of every row, micro_rows rows at a time (bounded activation memory)."""
        n = rows["input_ids"].shape[0]
        out = []
        for start in range(0, n, micro_rows):
            chunk = self.placement.place_rows({k: rows[k][start:start + micro_rows] for k in VALUE_KEYS})
            out.append(np.asarray(self.placement.fetch(self.value_fn((self.params, self.frozen), chunk))))
        return np.concatenate(out).astype(np.float32)

    def advantages(self, outcome: Any, mask: Any, values: Any, old_logp: Any = None, ref_logp: Any = None,
                   kl_coef: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """`ppo_advantages` with this config's gamma, lam and whitening, as host arrays (advantages, returns)."""
        c = self.config
        if (old_logp is None) != (ref_logp is None):
            raise ValueError("Critic.advantages: pass both old_logp and ref_logp, or neither")
        if old_logp is None and kl_coef != 0.0:
            raise ValueError(f"Critic.advantages: kl_coef={kl_coef} needs old_logp and ref_logp")
        as_f32 = lambda x: None if x is None else jnp.asarray(x, jnp.float32)  # noqa: E731
        adv, ret = _ppo_advantages_jit(as_f32(outcome), as_f32(mask), as_f32(values), as_f32(old_logp),
                                       as_f32(ref_logp), jnp.float32(kl_coef), gamma=c.gamma, lam=c.lam,
                                       whiten=c.whiten_advantages)
        return np.asarray(adv), np.asarray(ret)

    def update(self, minibatch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """One critic update on a mini-batch stacked [num_micro, micro_rows, ...] (extra keys, e.g. the actor's, are
        ignored); returns its "critic/..." metrics (device scalars)."""
        missing = [k for k in UPDATE_KEYS if k not in minibatch]
        if missing:
            raise KeyError(f"Critic.update: mini-batch lacks {missing}")
        num_micro = minibatch[UPDATE_KEYS[0]].shape[0]
        mb = self.placement.place_stacked([{k: minibatch[k][i] for k in UPDATE_KEYS} for i in range(num_micro)])
        self.params, self.opt_state, metrics = self.update_fn(self.params, self.opt_state, self.frozen, mb)
        return metrics

    # ------------------------------------------------------------------ state for checkpoints
    def train_state(self) -> dict[str, Any]:
        """The trainable critic params and optimizer state (the frozen part is re-copied from the policy)."""
        return {"params": self.params, "opt_state": self.opt_state}

    def load_train_state(self, state: Mapping[str, Any]) -> None:
        self.params, self.opt_state = state["params"], state["opt_state"]
