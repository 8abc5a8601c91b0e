"""GRPO trainer: rollouts -> ToolRL rewards -> old/ref log-probs -> group advantages -> clipped policy updates.

The loop is host Python; every array computation is a jitted pure function of explicit pytrees:
  * `logprob_fn(params, rows)`: teacher-forced response log-probs and entropies (old policy and reference model),
  * `update_fn(params, opt_state, minibatch)`: one optimizer update from a mini-batch stacked as
    [num_micro, micro_rows, ...]; micro-batch gradients are summed with `lax.scan` against the mini-batch's global
    token count, so accumulation gives exactly the token mean over the whole mini-batch,
  * `split_update` (zeros / accumulate / apply): the same update when trim_padding cuts a mini-batch's micro-batches
    to different widths (rows sorted by length): one gradient call per micro-batch into a donated accumulator,
    then one optimizer call; each distinct micro-batch shape compiles once.
Parameters and optimizer state are donated; under a mesh they keep the partition-rule shardings across steps.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import re
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolrl_jax.config_checks import requirement_checker
from toolrl_jax.models.decoder import CausalLM, cast_floating
from toolrl_jax.optim import (DivergenceGuard, OptimizerConfig, TrainingDivergedError, apply_gradients,
                              make_optimizer)
from toolrl_jax.rewards.batch import RewardBatch, score_batch
from toolrl_jax.rewards.config import RewardConfig
from toolrl_jax.rl.advantages import broadcast_to_tokens, grpo_advantages, kl_penalized_scores
from toolrl_jax.rl.masked import masked_mean
from toolrl_jax.rl.ppo import PolicyLossConfig, actor_loss, count_normalizers
from toolrl_jax.sampling.config import SamplingConfig, next_power_of_two, prompt_length_bucket
from toolrl_jax.sampling.sampler import SampleOutput, Sampler
from toolrl_jax.training.accumulation import accumulate_gradients, place_stacked
from toolrl_jax.training.critic import Critic, CriticConfig
from toolrl_jax.training.sequences import (join_prompt_and_response, length_order, response_logprobs, row_extents,
                                          rows_by_length, trim_rows)
from toolrl_jax.training.trainable import count_params, trainable_filter

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """One GRPO run. Defaults are the ToolRL recipe (spec/toolrl.md); the CPU default flagfile shrinks them."""

    prompts_per_step: int = 512
    group_size: int = 4
    mini_batch_prompts: int = 128  # prompts per optimizer update (512 / 128 = 4 updates per step)
    micro_batch_rows: int = 8  # rows per gradient-accumulation micro-batch
    ppo_epochs: int = 1
    max_prompt_length: int = 2048
    max_response_length: int = 1024
    total_steps: int = 104  # the original configures 105 but trains 104 (docs/fidelity.md)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    kl_coef: float = 0.001  # beta
    kl_in_reward: bool = True  # the original: reward - beta * sum(logp_old - logp_ref) (k1)
    recompute_old_logprobs: bool = True  # False: use the sampler's log-probs as the old policy
    normalize_adv_by_std: bool = True
    # "grpo": group-relative advantages; "ppo": the paper's PPO baseline (a critic with a value head, GAE).
    algorithm: str = "grpo"
    critic: CriticConfig = CriticConfig()
    policy: PolicyLossConfig = PolicyLossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    reward: RewardConfig = RewardConfig()
    # Padded prompt lengths of rollouts (None: powers of two). Each distinct length compiles the sampler's prefill,
    # the log-prob pass and the update once; a short list bounds compilation, a fine one bounds padding.
    prompt_length_buckets: Optional[tuple[int, ...]] = None
    trainable_regex: Optional[str] = None  # train only parameters whose path matches (None = all)
    # Response positions projected to the vocabulary at a time in the log-prob passes and the update (recomputed
    # in the backward pass); bounds the [rows, R, V] float32 logits. None = all at once.
    logits_chunk_size: Optional[int] = 512
    # Keep the frozen reference policy in the compute dtype (bf16): bit-identical reference log-probs, since the
    # forward pass casts every weight to the compute dtype anyway, at half the bytes of an fp32 copy.
    reference_in_compute_dtype: bool = True
    # Cut the padding of rollout rows before the log-prob passes and the updates: rows are sorted by length
    # (`GRPOTrainer.row_order`) and each log-prob chunk and update micro-batch is trained at its own longest prompt
    # and response, rounded up to a bucket (prompt_length_buckets; response_length_buckets, None = powers of two
    # >= 64). Same values, fewer FLOPs; each distinct shape compiles the log-prob pass or the update once.
    trim_padding: bool = True
    response_length_buckets: Optional[tuple[int, ...]] = None
    val_every: int = 5
    val_max_new_tokens: Optional[int] = None  # None = max_response_length
    # > 0: validation also samples this many responses per held-out prompt at the rollout temperature (a fixed
    # key, so every validation sees the same noise) and logs val_sampled/* -- the quantity GRPO optimises.
    val_samples: int = 0
    log_samples: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        need = requirement_checker("GRPOConfig")
        for name in ("prompts_per_step", "group_size", "mini_batch_prompts", "micro_batch_rows", "ppo_epochs",
                     "total_steps", "max_prompt_length", "max_response_length"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an integer >= 1, got {value!r}")
        for name in ("val_every", "val_samples", "log_samples"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.val_max_new_tokens is None or self.val_max_new_tokens >= 1,
             f"val_max_new_tokens must be >= 1 or None, got {self.val_max_new_tokens}")
        need(self.prompts_per_step % self.mini_batch_prompts == 0,
             f"prompts_per_step ({self.prompts_per_step}) must be a multiple of mini_batch_prompts "
             f"({self.mini_batch_prompts})")
        rows = self.mini_batch_prompts * self.group_size
        need(rows % self.micro_batch_rows == 0,
             f"mini-batch rows (mini_batch_prompts * group_size = {rows}) must be a multiple of micro_batch_rows "
             f"({self.micro_batch_rows})")
        need(math.isfinite(self.kl_coef) and self.kl_coef >= 0, f"kl_coef must be finite and >= 0, got {self.kl_coef}")
        need(self.algorithm in ("grpo", "ppo"), f"algorithm must be 'grpo' or 'ppo', got {self.algorithm!r}")
        need(self.logits_chunk_size is None or self.logits_chunk_size >= 1,
             f"logits_chunk_size must be >= 1 or None, got {self.logits_chunk_size}")
        if self.prompt_length_buckets is not None:
            need(max(self.prompt_length_buckets) >= self.max_prompt_length,
                 f"the largest prompt_length_bucket ({max(self.prompt_length_buckets)}) must be >= max_prompt_length "
                 f"({self.max_prompt_length})")
        if self.response_length_buckets is not None:
            buckets = self.response_length_buckets
            need(all(b >= 1 for b in buckets) and list(buckets) == sorted(set(buckets)),
                 f"response_length_buckets must be strictly increasing positive ints, got {buckets}")
        try:  # the rollout sampling settings, checked here rather than at the first rollout
            SamplingConfig(max_new_tokens=self.max_response_length, temperature=self.temperature, top_p=self.top_p,
                           top_k=self.top_k, num_samples=self.group_size,
                           prompt_length_buckets=self.prompt_length_buckets)
        except ValueError as e:
            raise ValueError(f"GRPOConfig: {e}") from None
        if self.trainable_regex is not None:
            try:
                re.compile(self.trainable_regex)
            except re.error as e:
                raise ValueError(f"GRPOConfig: trainable_regex {self.trainable_regex!r} is not a regex: {e}") from None

    @property
    def needs_reference(self) -> bool:
        return (self.kl_coef > 0 and self.kl_in_reward) or self.policy.kl_loss_coef > 0

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * self.prompts_per_step // self.mini_batch_prompts


# ---------------------------------------------------------------------------- jitted pure functions
def make_logprob_fn(graphdef: nnx.GraphDef, logits_chunk_size: Optional[int] = None
                    ) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
    """jit(params, rows) -> (logp [N,R], entropy [N,R]); one compile per row shape."""
    return jax.jit(functools.partial(response_logprobs, graphdef, logits_chunk_size=logits_chunk_size))


def _actor_micro_grads(graphdef: nnx.GraphDef, policy_config: PolicyLossConfig, logits_chunk_size: Optional[int]):
    """grads(params, frozen, micro, normalizers) -> (gradient, metrics) of one micro-batch's share of the mini-batch
    loss: normalised by the whole mini-batch's counts, so micro-batch gradients and metrics sum to the mini-batch's."""

    def loss_fn(p, frozen, micro, normalizers):
        logp, entropy = response_logprobs(graphdef, (p, frozen), micro, logits_chunk_size=logits_chunk_size)
        return actor_loss(logp, entropy, micro["old_logp"], micro["advantages"], micro["response_mask"],
                          policy_config, ref_logp=micro.get("ref_logp"), **normalizers)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_grads(p, frozen, micro, normalizers):
        (_, metrics), g = grad_fn(p, frozen, micro, normalizers)
        return g, metrics

    return micro_grads


def update_normalizers(mask: Any, policy: PolicyLossConfig, num_micro: int,
                       response_budget: Optional[int] = None) -> dict[str, Any]:
    """`count_normalizers` of a whole mini-batch's response mask [rows, R] for `policy.agg_mode`: the
    seq-mean-token-sum-norm constant (policy.norm_length, else the response budget, else R) and the verl divisor
    (policy.accumulation_divisor, else the number of micro-batches)."""
    norm_length = accumulation_divisor = None
    if policy.agg_mode == "seq-mean-token-sum-norm":
        norm_length = policy.norm_length or response_budget or mask.shape[-1]
    if policy.agg_mode == "verl":
        accumulation_divisor = policy.accumulation_divisor or num_micro
    return count_normalizers(mask, norm_length=norm_length, accumulation_divisor=accumulation_divisor)


def make_update_fn(graphdef: nnx.GraphDef, optimizer, optimizer_config: OptimizerConfig,
                   policy_config: PolicyLossConfig, param_shardings: Any = None, opt_shardings: Any = None,
                   logits_chunk_size: Optional[int] = None, response_budget: Optional[int] = None):
    """jit(params, opt_state, frozen, minibatch) -> (params, opt_state, metrics); params/opt_state donated.

    One optimizer update from a mini-batch whose micro-batches share one width. params: the trainable state;
    frozen: the rest of the model's state (an empty State when everything trains), merged after params.
    minibatch: dict of arrays [num_micro, micro_rows, ...] with keys of `join_prompt_and_response` plus old_logp,
    advantages (and ref_logp when the KL loss is on). Mini-batches of mixed widths use `make_split_update_fns`.
    response_budget: the untrimmed response width, the seq-mean-token-sum-norm constant (`update_normalizers`).
    """
    micro_grads = _actor_micro_grads(graphdef, policy_config, logits_chunk_size)

    def update(params, opt_state, frozen, minibatch):
        mask = minibatch["response_mask"]
        normalizers = update_normalizers(mask.reshape(-1, mask.shape[-1]), policy_config, mask.shape[0],
                                         response_budget)
        grads, metrics = accumulate_gradients(lambda p, micro: micro_grads(p, frozen, micro, normalizers), params,
                                              minibatch)
        metrics = jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)  # each micro value is pre-normalised
        new_params, new_opt_state, opt_metrics = apply_gradients(optimizer, optimizer_config, grads, opt_state,
                                                                 params)
        return new_params, new_opt_state, {**metrics, **opt_metrics}

    out_shardings = None
    if param_shardings is not None:
        out_shardings = (param_shardings, opt_shardings, None)
    return jax.jit(update, donate_argnums=(0, 1), out_shardings=out_shardings)


class SplitUpdateFns(NamedTuple):
    """One optimizer update as separate jitted programs, so that each micro-batch runs at its own width:
        grads = zeros(params)
        for micro in micro_batches:   # any widths; one compile per distinct shape
            grads, metrics = accumulate(params, frozen, grads, micro, normalizers)   # grads donated
        params, opt_state, opt_metrics = apply(params, opt_state, grads)           # params, opt_state donated
    normalizers: `update_normalizers` of the whole mini-batch's response mask (host scalars)."""

    zeros: Callable
    accumulate: Callable
    apply: Callable


def make_split_update_fns(graphdef: nnx.GraphDef, optimizer, optimizer_config: OptimizerConfig,
                          policy_config: PolicyLossConfig, param_shardings: Any = None, opt_shardings: Any = None,
                          logits_chunk_size: Optional[int] = None) -> SplitUpdateFns:
    """The update of `make_update_fn` split across jitted calls (see `SplitUpdateFns`): the same gradients, summed
    in a donated accumulator that lives across calls instead of in a `lax.scan` carry."""
    micro_grads = _actor_micro_grads(graphdef, policy_config, logits_chunk_size)

    def accumulate(params, frozen, grads, micro, normalizers):
        g, metrics = micro_grads(params, frozen, micro, normalizers)
        return jax.tree.map(jnp.add, grads, g), metrics

    def apply(params, opt_state, grads):
        return apply_gradients(optimizer, optimizer_config, grads, opt_state, params)

    zeros = functools.partial(jax.tree.map, jnp.zeros_like)
    if param_shardings is None:
        return SplitUpdateFns(jax.jit(zeros), jax.jit(accumulate, donate_argnums=(2,)),
                              jax.jit(apply, donate_argnums=(0, 1)))
    return SplitUpdateFns(jax.jit(zeros, out_shardings=param_shardings),
                          jax.jit(accumulate, donate_argnums=(2,), out_shardings=(param_shardings, None)),
                          jax.jit(apply, donate_argnums=(0, 1), out_shardings=(param_shardings, opt_shardings, None)))


# ---------------------------------------------------------------------------- host-side helpers
def dispatch_logprobs(logprob_fn, params, rows: dict[str, np.ndarray], micro_rows: int,
                      place: Callable[[dict], dict] = lambda b: b,
                      trim: Optional[Callable[[dict], dict]] = None,
                      order: Callable[[dict], np.ndarray] = rows_by_length) -> list[tuple[np.ndarray, Any]]:
    """Starts the teacher-forced log-prob pass of every row, micro_rows at a time, without waiting for any result:
    returns [(row indices, (logp, entropy) device arrays)] for `collect_logprobs`. The host is free meanwhile.

    With `trim` (rows -> rows without padding columns, e.g. `GRPOTrainer.trim`), rows are taken in `order` (rows ->
    indices, shortest first) so that each chunk holds rows of similar length, and each chunk is cut before the
    pass.
    """
    n = rows["response_ids"].shape[0]
    index_order = order(rows) if trim is not None else np.arange(n)
    pending = []
    for start in range(0, n, micro_rows):
        index = index_order[start:start + micro_rows]
        chunk = {k: v[index] for k, v in rows.items()}
        if trim is not None:
            chunk = trim(chunk)
        pending.append((index, logprob_fn(params, place(chunk))))
    return pending


def collect_logprobs(pending: list[tuple[np.ndarray, Any]], shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Log-probs and entropies [N, R] from `dispatch_logprobs`; columns past a chunk's trimmed width are 0 (they are
    response padding)."""
    logps, ents = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for index, (logp, ent) in pending:
        logp, ent = jax.device_get((logp, ent))
        logps[index, :logp.shape[1]] = logp
        ents[index, :ent.shape[1]] = ent
    return logps, ents


def batched_logprobs(logprob_fn, params, rows: dict[str, np.ndarray], micro_rows: int,
                     place: Callable[[dict], dict] = lambda b: b,
                     trim: Optional[Callable[[dict], dict]] = None,
                     order: Callable[[dict], np.ndarray] = rows_by_length) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-forced log-probs and entropies [N, R] of every row, micro_rows at a time (bounded activation memory);
    every chunk is dispatched before any result is fetched. Arguments as `dispatch_logprobs`."""
    pending = dispatch_logprobs(logprob_fn, params, rows, micro_rows, place, trim, order)
    return collect_logprobs(pending, rows["response_ids"].shape)


def stack_minibatches(arrays: dict[str, np.ndarray], rows_per_minibatch: int, micro_rows: int
                      ) -> list[dict[str, np.ndarray]]:
    """Splits [N, ...] rows into mini-batches shaped [num_micro, micro_rows, ...] (in row order)."""
    n = next(iter(arrays.values())).shape[0]
    out = []
    for start in range(0, n, rows_per_minibatch):
        out.append({k: v[start:start + rows_per_minibatch].reshape(
            (rows_per_minibatch // micro_rows, micro_rows) + v.shape[1:]) for k, v in arrays.items()})
    return out


def _response_bucket(length: int, buckets: Optional[Sequence[int]], cap: int, minimum: int = 64) -> int:
    """The smallest bucket >= length (powers of two >= minimum when buckets is None), at most `cap`."""
    if buckets is None:
        return min(cap, max(minimum, next_power_of_two(length)))
    return min(cap, next((b for b in buckets if b >= length), cap))


def trimmed_widths(prompt_len: np.ndarray, response_len: np.ndarray, sampling: SamplingConfig,
                   response_buckets: Optional[Sequence[int]], prompt_cap: int, response_cap: int) -> tuple[int, int]:
    """The (prompt, response) widths that rows with these real lengths are trained at under trim_padding: the
    longest of each rounded up to its bucket (the sampler's prompt buckets; `response_buckets`, None = powers of
    two >= 64), at most the rows' padded widths (the caps)."""
    prompt = min(prompt_cap, prompt_length_bucket(int(np.max(prompt_len, initial=1)), sampling))
    return prompt, _response_bucket(int(np.max(response_len, initial=1)), response_buckets, response_cap)


def training_order(prompt_len: np.ndarray, response_len: np.ndarray, sampling: SamplingConfig) -> np.ndarray:
    """Row indices in the order rows are trained under trim_padding: by prompt bucket (the sampler's), then response
    length, then prompt length, so that consecutive micro_batch_rows share both widths as far as possible."""
    buckets = np.array([prompt_length_bucket(int(n), sampling) for n in prompt_len], np.int64)
    return length_order(prompt_len, response_len, buckets)


@dataclasses.dataclass
class StepResult:
    """What one GRPO step produced (for logging and tests)."""

    metrics: dict[str, float]
    rewards: RewardBatch
    samples: SampleOutput


class GRPOTrainer:
    """Holds the policy (params + optimizer state), the frozen reference, the sampler and the jitted steps."""

    def __init__(self, model: CausalLM, config: GRPOConfig, *, tokenizer: Any, pad_id: int,
                 stop_token_ids: Sequence[int], mesh: Any = None,
                 shardings_fn: Optional[Callable[[Any], Any]] = None,
                 place_batch: Optional[Callable[[dict], dict]] = None, reward_pool: Any = None):
        """shardings_fn maps a state pytree (arrays or ShapeDtypeStructs) to its shardings under `mesh` (e.g.
        `functools.partial(toolrl_jax.sharding.param_shardings, mesh=mesh)`); None = single device."""
        self.config = config
        self.tokenizer = tokenizer
        self.graphdef, params, self.frozen = nnx.split(model, trainable_filter(config.trainable_regex), ...)
        if not jax.tree.leaves(params):
            raise ValueError(f"GRPOConfig.trainable_regex={config.trainable_regex!r} matches no parameter")
        self.params = params
        self.optimizer = make_optimizer(config.optimizer)
        param_shardings = opt_shardings = None
        if shardings_fn is not None:
            param_shardings = shardings_fn(params)
            opt_shardings = shardings_fn(jax.eval_shape(self.optimizer.init, params))
        self.opt_state = jax.jit(self.optimizer.init, out_shardings=opt_shardings)(params)
        # The reference policy is a frozen copy of the initial trainable weights (kept only when a KL term needs it).
        self.ref_params = None
        if config.needs_reference:
            ref_dtype = jnp.dtype(model.config.dtype) if config.reference_in_compute_dtype else None
            self.ref_params = cast_floating(params, ref_dtype, copy=True)
        self.sampler = Sampler(model, pad_id=pad_id, stop_token_ids=stop_token_ids, tokenizer=tokenizer, mesh=mesh)
        self.critic = None
        if config.algorithm == "ppo":  # initialised from the policy's weights (copied) plus a value head
            self.critic = Critic(model, config.critic, trainable_regex=config.trainable_regex,
                                 shardings_fn=shardings_fn, place_batch=place_batch)
        self.logprob_fn = make_logprob_fn(self.graphdef, config.logits_chunk_size)
        self.update_fn = make_update_fn(self.graphdef, self.optimizer, config.optimizer, config.policy,
                                        param_shardings, opt_shardings, config.logits_chunk_size,
                                        config.max_response_length)
        self.split_update = make_split_update_fns(self.graphdef, self.optimizer, config.optimizer, config.policy,
                                                  param_shardings, opt_shardings, config.logits_chunk_size)
        self.place = place_batch or (lambda b: b)
        self.reward_pool = reward_pool
        self.actor_guard = DivergenceGuard(config.optimizer.max_consecutive_skips, "policy")
        self.critic_guard = DivergenceGuard(config.critic.optimizer.max_consecutive_skips, "critic")
        self.step = 0

    @property
    def num_trainable(self) -> int:
        return count_params(self.params)

    # ------------------------------------------------------------------ state for checkpoints
    def train_state(self) -> dict[str, Any]:
        """What a checkpoint holds: the trainable params and the optimizer state (frozen weights come from the
        model folder)."""
        state = {"params": self.params, "opt_state": self.opt_state}
        if self.critic is not None:
            state["critic"] = self.critic.train_state()
        return state

    def load_train_state(self, state: dict[str, Any], step: int) -> None:
        self.params, self.opt_state, self.step = state["params"], state["opt_state"], int(step)
        if self.critic is not None:
            self.critic.load_train_state(state["critic"])
        self.sampler.update_params(self.model())

    def model(self) -> CausalLM:
        return nnx.merge(self.graphdef, self.params, self.frozen)

    # ------------------------------------------------------------------ one step
    def trim(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`rows` (any leading axes) cut to their longest prompt and response, each rounded up to its bucket (the
        sampler's prompt buckets; response_length_buckets)."""
        r = rows["response_ids"].shape[-1]
        prompt_len, response_len = row_extents(rows)
        return trim_rows(rows, *trimmed_widths(prompt_len, response_len, self.sampling_config(),
                                               self.config.response_length_buckets,
                                               rows["input_ids"].shape[-1] - r, r))

    def row_order(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        """The order rows are trained in under trim_padding (`training_order` of their real lengths)."""
        return training_order(*row_extents(rows), self.sampling_config())

    def sampling_config(self, greedy: bool = False, max_new_tokens: Optional[int] = None) -> SamplingConfig:
        c = self.config
        return SamplingConfig(
            max_new_tokens=max_new_tokens or c.max_response_length, temperature=0.0 if greedy else c.temperature,
            top_p=1.0 if greedy else c.top_p, top_k=0 if greedy else c.top_k, num_samples=1 if greedy else
            c.group_size, max_prompts_per_batch=max(1, min(64, c.prompts_per_step)),
            prompt_length_buckets=c.prompt_length_buckets)

    def score(self, samples: SampleOutput, ground_truths: Sequence[str], step: int) -> RewardBatch:
        n = samples.num_samples
        responses = [t.strip() for t in samples.texts]
        truths = [ground_truths[i // n] for i in range(len(responses))]
        return score_batch(responses, truths, step, self.config.reward, pool=self.reward_pool)

    def update(self, minibatch: dict[str, np.ndarray]) -> tuple[dict[str, jax.Array], int]:
        """One actor update from a mini-batch's rows [rows, ...] (host arrays with old_logp, advantages, ...).

        Returns its metrics (device scalars) and the number of [row, column] cells trained. With trim_padding the
        rows are taken in `row_order` and every micro-batch is cut to its own widths: micro-batches of one shape run
        as one fused program (`update_fn`, a scan), mixed shapes through `split_update` (one call per micro-batch,
        then the optimizer), with the same normalizers, so the update is the mini-batch token mean either way.
        """
        c = self.config
        n = minibatch["response_ids"].shape[0]
        order = self.row_order(minibatch) if c.trim_padding else np.arange(n)
        micros = [{k: v[order[s:s + c.micro_batch_rows]] for k, v in minibatch.items()}
                  for s in range(0, n, c.micro_batch_rows)]
        if c.trim_padding:
            micros = [self.trim(m) for m in micros]
        cells = sum(m["input_ids"].size for m in micros)
        if len({(m["input_ids"].shape, m["response_ids"].shape) for m in micros}) == 1:
            stacked = place_stacked(self.place, micros)
            self.params, self.opt_state, metrics = self.update_fn(self.params, self.opt_state, self.frozen, stacked)
            return metrics, cells
        fns = self.split_update
        normalizers = jax.device_get(update_normalizers(minibatch["response_mask"], c.policy, len(micros),
                                                        c.max_response_length))
        grads, micro_metrics = fns.zeros(self.params), []
        for micro in micros:
            grads, m = fns.accumulate(self.params, self.frozen, grads, self.place(micro), normalizers)
            micro_metrics.append(m)
        self.params, self.opt_state, opt_metrics = fns.apply(self.params, self.opt_state, grads)
        # each micro value is pre-normalised by the mini-batch counts: the mini-batch value is their sum
        metrics = {k: sum(m[k] for m in micro_metrics) for k in micro_metrics[0]}
        return {**metrics, **opt_metrics}, cells

    def train_step(self, prompt_ids: Sequence[Sequence[int]], ground_truths: Sequence[str],
                   key: jax.Array) -> StepResult:
        """One GRPO step on `prompts_per_step` prompts; `self.step` becomes the 1-based step just trained."""
        c = self.config
        if len(prompt_ids) != c.prompts_per_step:
            raise ValueError(f"train_step got {len(prompt_ids)} prompts, config says {c.prompts_per_step}")
        step = self.step + 1
        t0 = time.perf_counter()
        samples = self.sampler.generate(prompt_ids, self.sampling_config(), key)
        t_gen = time.perf_counter()
        rows = join_prompt_and_response(samples.prompt_ids, samples.prompt_mask, samples.response_ids,
                                        samples.response_mask)
        mask = rows["response_mask"]
        # The old-policy and reference log-prob passes are dispatched first and the rewards scored on the host
        # while the device computes them (neither needs the other).
        trim = self.trim if c.trim_padding else None
        pending_old = pending_ref = None
        if c.recompute_old_logprobs:
            pending_old = dispatch_logprobs(self.logprob_fn, (self.params, self.frozen), rows, c.micro_batch_rows,
                                            self.place, trim, self.row_order)
        if self.ref_params is not None:
            pending_ref = dispatch_logprobs(self.logprob_fn, (self.ref_params, self.frozen), rows,
                                            c.micro_batch_rows, self.place, trim, self.row_order)
        t_dispatch = time.perf_counter()
        rewards = self.score(samples, ground_truths, step)
        t_score = time.perf_counter()

        if pending_old is not None:
            old_logp, old_entropy = collect_logprobs(pending_old, mask.shape)
        else:
            old_logp, old_entropy = samples.logprobs.astype(np.float32), np.zeros_like(mask)
        old_logp = old_logp * mask
        ref_logp = None
        if pending_ref is not None:
            ref_logp = collect_logprobs(pending_ref, mask.shape)[0] * mask
        outcome = jnp.asarray(rewards.total, jnp.float32)
        if c.kl_in_reward and ref_logp is not None:
            scores = kl_penalized_scores(outcome, jnp.asarray(old_logp), jnp.asarray(ref_logp), jnp.asarray(mask),
                                         c.kl_coef)
        else:
            scores = outcome
        train_rows = dict(rows, old_logp=old_logp.astype(np.float32))
        if self.critic is None:
            adv = grpo_advantages(scores, c.group_size, normalize_by_std=c.normalize_adv_by_std)
            token_adv = np.asarray(broadcast_to_tokens(adv, jnp.asarray(mask)))
        else:  # GAE over token rewards: outcome at the last token, minus the per-token KL when folded in
            values = self.critic.values(rows, c.micro_batch_rows)
            fold = c.kl_in_reward and ref_logp is not None
            token_adv, returns = self.critic.advantages(outcome, mask, values, old_logp if fold else None,
                                                        ref_logp if fold else None, c.kl_coef if fold else 0.0)
            token_adv = np.asarray(token_adv)
            adv = jnp.asarray(token_adv.sum(1) / np.maximum(mask.sum(1), 1))  # per-row mean, for logging
            train_rows.update(old_values=np.asarray(values, np.float32), returns=np.asarray(returns, np.float32))
        train_rows["advantages"] = token_adv.astype(np.float32)
        if c.policy.kl_loss_coef > 0:
            train_rows["ref_logp"] = ref_logp.astype(np.float32)
        t_prep = time.perf_counter()

        update_metrics, trained_cells = [], 0
        rows_per_mb = c.mini_batch_prompts * c.group_size
        self.sampler.release_params()  # its compute copy is stale after the first update: free it for the update
        n_rows = mask.shape[0]
        for _ in range(c.ppo_epochs):
            for start in range(0, n_rows, rows_per_mb):
                mb = {k: v[start:start + rows_per_mb] for k, v in train_rows.items()}
                m, cells = self.update(mb)
                trained_cells += cells
                if self.critic is not None:
                    stacked = stack_minibatches(mb, rows_per_mb, c.micro_batch_rows)[0]
                    m = {**m, **self.critic.update(trim(stacked) if trim is not None else stacked)}
                update_metrics.append(m)
        update_metrics = jax.device_get(update_metrics)
        for i, m in enumerate(update_metrics):  # log skipped updates; stop on divergence before anything is saved
            where = f"GRPO step {step}, update {i + 1} of {len(update_metrics)}"
            self.actor_guard.observe(m, where)
            if self.critic is not None:
                self.critic_guard.observe(m, where, prefix="critic/")
        self.sampler.update_params(self.model())
        t_train = time.perf_counter()
        self.step = step

        metrics = {k if k.startswith("critic/") else f"actor/{k}": float(np.mean([m[k] for m in update_metrics]))
                   for k in update_metrics[0]}
        metrics.update(rewards.metrics("reward/"))
        for name in ("total", "format", "correctness", "length"):
            metrics[f"reward/{name}_std"] = float(np.std(getattr(rewards, name)))
        n_tokens = float(mask.sum())
        metrics.update({
            "response/length_mean": float(samples.lengths.mean()),
            "response/length_max": float(samples.lengths.max()),
            "response/clip_ratio": float(1.0 - samples.stopped.mean()),
            "prompt/length_mean": float(samples.prompt_mask.sum(1).mean()),
            "score/mean": float(jnp.mean(scores)),
            "advantage/abs_mean": float(jnp.mean(jnp.abs(adv))),
            "time/generate_s": t_gen - t0,
            # scoring runs on the host while the device computes the log-prob passes: score_s is its host time,
            # logprob_s the rest of the wall time until the advantages are ready (dispatch included)
            "time/score_s": t_score - t_dispatch,
            "time/logprob_s": (t_dispatch - t_gen) + (t_prep - t_score),
            "time/train_s": t_train - t_prep,
            "time/step_s": t_train - t0,
            "throughput/new_tokens_per_s": n_tokens / max(t_gen - t0, 1e-9),
            "throughput/train_tokens_per_s": float(rows["segment_ids"].astype(bool).sum()) * c.ppo_epochs
            / max(t_train - t_prep, 1e-9),
            # share of the updates' [rows, columns] cells that are padding (trim_padding lowers it)
            "train/padding_fraction": 1.0 - float(rows["segment_ids"].astype(bool).sum()) * c.ppo_epochs
            / max(trained_cells, 1),
        })
        if c.recompute_old_logprobs:  # the sampler does not return entropies
            metrics["entropy/rollout"] = float(masked_mean(jnp.asarray(old_entropy), jnp.asarray(mask)))
        if ref_logp is not None:
            metrics["kl/old_ref_k1"] = float((old_logp - ref_logp).sum() / max(n_tokens, 1.0))
        if not np.isfinite(metrics["actor/actor_loss"]):
            raise TrainingDivergedError(f"GRPO step {step}: non-finite actor loss {metrics['actor/actor_loss']} "
                                        f"(grad_norm {metrics.get('actor/grad_norm')}); the run stops and nothing "
                                        f"from this step is saved")
        return StepResult(metrics=metrics, rewards=rewards, samples=samples)

    def validate(self, prompt_ids: Sequence[Sequence[int]], ground_truths: Sequence[str], step: int
                 ) -> tuple[dict[str, float], SampleOutput, RewardBatch]:
        """Greedy decoding on a held-out split (and `val_samples` sampled responses per prompt), scored with the
        training reward at `step`."""
        max_new = self.config.val_max_new_tokens or self.config.max_response_length
        samples = self.sampler.generate(prompt_ids, self.sampling_config(greedy=True, max_new_tokens=max_new),
                                        jax.random.key(0))
        rewards = self.score(samples, ground_truths, max(step, 0))
        metrics = rewards.metrics("val/")
        metrics["val/response_length"] = float(samples.lengths.mean())
        if self.config.val_samples > 0:
            sampling = dataclasses.replace(self.sampling_config(max_new_tokens=max_new),
                                           num_samples=self.config.val_samples)
            sampled = self.sampler.generate(prompt_ids, sampling, jax.random.key(1))
            metrics.update(self.score(sampled, ground_truths, max(step, 0)).metrics("val_sampled/"))
        return metrics, samples, rewards
