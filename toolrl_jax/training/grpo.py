"""GRPO (and the paper's PPO baseline) as a small learner over stages:

    rollout = generate_rollout(learner, prompts, key)    # rollout.py: sample, join rows, dispatch log-prob passes
    rewards = learner.score_rollout(rollout.samples, truths, step)  # the reward functions, on the host meanwhile,
                                                           # + reward_shaping.py: overlong penalty, part weights
    logprobs = rollout.logprobs()                          # old policy (and reference) log-probs
    advantages = estimator(AdvantageInputs(...))           # estimators.py: "grpo" group advantages, "gae" for PPO,
                                                           # "rloo", "reinforce_plus_plus"
    rows = update_rows(rollout, logprobs, advantages, ...) # update_rows.py: + loss mask, TIS weights when asked
    update_metrics, cells = update_stage(learner, rows)    # update.py: epochs of mini-batch updates, actor + critic
    metrics = step_metrics(...)                            # step_metrics.py

With `dynamic_sampling` the first two lines are rounds of sampling and scoring until enough groups carry a signal
(dynamic_sampling.py). The algorithm options (DAPO, Dr. GRPO, GSPO, RLOO, REINFORCE++, TIS, per-component
normalisation) are GRPOConfig / PolicyLossConfig fields, all off by default; presets.py names published settings.

The learner (`GRPOTrainer`) holds the state: trainable params, frozen params, optimizer state, the reference copy,
the sampler, the critic, and the jitted functions (actor.py); a `Placement` decides where every array lives. The run
loop (checkpoints, validation cadence, logging) is `toolrl_jax.training.loop`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from toolrl_jax.config_checks import option, requirement_checker
from toolrl_jax.environments import ENVIRONMENT_NAMES
from toolrl_jax.models.decoder import CausalLM, cast_floating
from toolrl_jax.models.lora import LoRAConfig, base_adapters, has_lora, lora_dropout_rate
from toolrl_jax.multiturn import MultiTurnConfig, trajectory_metrics
from toolrl_jax.optim import DivergenceGuard, OptimizerConfig, TrainingDivergedError, check_schedule, make_optimizer
from toolrl_jax.placement import Placement
from toolrl_jax.rewards.config import RewardConfig
from toolrl_jax.rewards.functions import CombinedReward, RewardResult
from toolrl_jax.rl.ppo import PolicyLossConfig
from toolrl_jax.sampling.config import SamplingConfig, prompt_length_bucket
from toolrl_jax.sampling.sampler import ENGINES, SampleOutput, Sampler
from toolrl_jax.sampling.sessions import SessionGenerator, session_cache_len
from toolrl_jax.training.actor import make_logprob_fn, make_split_update_fns, make_update_fn
from toolrl_jax.training.critic import Critic, CriticConfig
from toolrl_jax.training.dynamic_sampling import DynamicBatch, sample_informative_groups
from toolrl_jax.training.estimators import ESTIMATORS, GROUP_ESTIMATORS, AdvantageInputs, get_estimator
from toolrl_jax.training.layout import RowLayout
from toolrl_jax.training.multiturn import (
    environment_kwargs,
    rollout_trajectories,
    score_trajectories,
    tasks_of,
    trajectory_samples,
    turn_index,
    turn_returns,
)
from toolrl_jax.training.reward_shaping import check_component_weights, reward_parts, shape_rewards
from toolrl_jax.training.rollout import Rollout, generate_rollout, start_rollout
from toolrl_jax.training.step_metrics import step_metrics
from toolrl_jax.training.trainable import count_params, last_layers_regex, trainable_filter, trained_regex
from toolrl_jax.training.update import update_stage
from toolrl_jax.training.update_rows import update_rows

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("total", "per_component")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """One GRPO run. Defaults are the ToolRL recipe (spec/toolrl.md); the CPU default flagfile shrinks them."""

    prompts_per_step: int = option(512, "Prompts sampled per GRPO step.")
    group_size: int = option(4, "Responses per prompt (the GRPO group).")
    mini_batch_prompts: int = option(128, "Prompts per optimizer update (512 / 128 = 4 updates per step).")
    micro_batch_rows: int = option(8, "Rows per gradient-accumulation micro-batch (memory only; values unchanged).")
    ppo_epochs: int = option(1, "Passes over each step's rollouts.")
    max_prompt_length: int = 2048  # the shared --max_prompt_length flag (prompts are left-truncated to it)
    max_response_length: int = option(1024, "Maximum new tokens per response.")
    total_steps: int = option(104, "GRPO steps to train (the original configures 15 epochs x 7 steps and trains "
                                   "104; docs/fidelity.md).")
    temperature: float = option(1.0, "Rollout sampling temperature.")
    top_p: float = option(1.0, "Rollout nucleus mass.")
    top_k: int = option(0, "Rollout top-k (0 = off).")
    kl_coef: float = option(0.001, "KL coefficient beta (0 disables the reference model).")
    kl_in_reward: bool = option(True, "Fold beta * sum(logp_old - logp_ref) into the reward (k1; the original).")
    recompute_old_logprobs: bool = option(True, "Recompute old-policy log-probs with the training forward (false: "
                                                "the sampler's log-probs are the old policy).")
    normalize_adv_by_std: bool = option(True, "Divide group-centred rewards by the group std (GRPO).")
    algorithm: str = option("grpo", "grpo: group-relative advantages (ToolRL). ppo: the paper's PPO baseline, a "
                                    "critic initialised from the policy with a value head, GAE advantages (use "
                                    "--group_size=1 for classic PPO rollouts).", choices=("grpo", "ppo"))
    advantage_estimator: Optional[str] = option(
        None, "The advantage estimator (training/estimators.py registry): grpo (group-normalised), gae (PPO's, with "
              "the critic), rloo (leave-one-out group baseline), reinforce_plus_plus (discounted token returns "
              "with the KL in the reward, whitened over the batch; --gae_gamma is its discount); default: the "
              "algorithm's (grpo / gae).")
    advantage_normalization: str = option(
        "total", "total: the group normalises the summed reward (GRPO). per_component (beyond the paper): each "
                 "additive part of the reward (format, correctness, length, each other reward function's score, "
                 "overlong) is normalised within its group first, then weighted (--reward_component_weights) and "
                 "summed; grpo / rloo estimators.", choices=NORMALIZATIONS)
    reward_component_weights: Optional[str] = option(
        None, "Weights of the reward's additive parts, e.g. format=1,correctness=2, named as logged under reward/ "
              "(format, correctness, length for the ToolRL reward alone; <fn>/format, <fn>/score, ... with several "
              "--reward_fn; overlong). Unnamed parts weigh 1; the reward trained on is the weighted sum.")
    dynamic_sampling: bool = option(
        False, "DAPO dynamic sampling: drop groups whose rewards are all equal (no signal) and draw more prompts, "
               "up to --dynamic_sampling_max_rounds extra rollout rounds, until the step has prompts_per_step "
               "informative groups; short of that, uninformative groups fill the batch with their loss masked.")
    dynamic_sampling_max_rounds: int = option(3, "Extra rollout rounds (of prompts_per_step prompts each) a step may "
                                                 "draw under --dynamic_sampling.")
    overlong_buffer: int = option(0, "DAPO soft overlong punishment: a linear penalty from 0 to -1 (times "
                                     "--overlong_penalty_factor) over the last N tokens of the response budget, "
                                     "added to the reward (0 = off).")
    overlong_penalty_factor: float = option(1.0, "The overlong penalty at the full response budget (its scale).")
    mask_truncated: bool = option(False, "Exclude responses cut by the response budget (no stop token) from the "
                                         "actor loss (DAPO's overlong filtering; TRL mask_truncated_completions).")
    tis_cap: Optional[float] = option(
        None, "Truncated importance sampling against the sampler/trainer log-prob mismatch: weigh each token's "
              "policy-gradient term by min(exp(old_logp - sampler_logp), C) (needs --recompute_old_logprobs; "
              "default off).")
    critic: CriticConfig = CriticConfig()
    lora: LoRAConfig = LoRAConfig()
    policy: PolicyLossConfig = PolicyLossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    reward: RewardConfig = RewardConfig()
    environment: str = option(
        "none", "Multi-turn RL with tools executed in the loop: the environment the policy's tool calls run in "
                "(synthetic, bfcl; training examples carry its tasks). none = the single-turn ToolRL task.",
        choices=ENVIRONMENT_NAMES)
    max_turns: int = option(4, "Multi-turn: assistant turns per trajectory at most.")
    max_turn_tokens: Optional[int] = option(
        None, "Multi-turn: new tokens per assistant turn at most (0 = max_response_length, which bounds the whole "
              "trajectory's model and tool tokens).", zero_is_none=True)
    env_reward_weight: float = option(1.0, "Multi-turn: weight of the environment's verdict (final state / answer).")
    turn_reward_weight: float = option(
        0.0, "Multi-turn: weight of the mean ToolRL reward of each model turn against the task's reference turn at "
             "its position (tasks with reference calls).")
    turn_advantages: bool = option(
        False, "Multi-turn: each turn's tokens get the advantage of its own reward-to-go (training/multiturn.py, "
               "turn_returns: what it changes and its bias) instead of the trajectory's.")
    tool_workers: int = option(8, "Multi-turn: host threads running the trajectories' tool calls.")
    turn_kv_reuse: bool = option(
        True, "Multi-turn: keep each trajectory's KV cache between its turns and prefill only the tokens a turn adds "
              "(sampling/sessions.py; same tokens as re-prefilling the conversation every turn, which false does).")
    env_prompt_style: str = option("toolrl", "Multi-turn, synthetic environment: its prompt style.",
                                   choices=("toolrl", "compact", "minimal", "hermes"))
    rollout_engine: str = option(
        "continuous", "How rollouts decode: continuous (a fixed set of decode slots refilled from a queue as rows "
                      "stop) or static (chunks of prompts decoded until their longest row stops). Same tokens for "
                      "the same key.", choices=("continuous", "static"))
    rollout_slots: Optional[int] = option(
        None, "Decode slots of the continuous engine (KV memory = slots x (prompt bucket + response budget) "
              "tokens; 0 = min(64, prompts_per_step) x group_size, one static chunk's rows).", zero_is_none=True)
    rollout_decode_windows: int = option(
        4, "Continuous engine: attention window sizes of its decode calls; each call attends over the part of the "
           "ring cache its running rows use, the smallest of this many sizes that fits (1 = always the whole "
           "cache). Same tokens; every size compiles in the first rollout.")
    prompt_length_buckets: Optional[tuple[int, ...]] = option(
        None, "Padded rollout prompt lengths, e.g. 256,320 (default: powers of two). Each distinct length compiles "
              "the sampler's prefill, the log-prob pass and the update once.")
    trainable_regex: Optional[str] = None  # train only parameters whose path matches (None = all)
    train_last_layers: int = option(
        0, "Train only the last N decoder layers and the final norm; embeddings and earlier layers stay frozen (0 = "
           "train every parameter). Cuts backward cost and optimizer memory on small machines.")
    logits_chunk_size: Optional[int] = option(
        512, "Response positions projected to the vocabulary at a time (recomputed in the backward pass); bounds "
             "the [rows, R, vocab] float32 logits. 0 = all at once.", zero_is_none=True)
    reference_in_compute_dtype: bool = option(
        True, "Keep the KL reference weights in the compute dtype: bit-identical log-probs (the forward casts every "
              "weight to it anyway) at half the memory of an fp32 copy.")
    trim_padding: bool = option(
        True, "Sort rollout rows by length and cut each log-prob chunk and update micro-batch to its own longest "
              "prompt and response (rounded up to a bucket): same values, fewer FLOPs; each shape compiles once.")
    response_length_buckets: Optional[tuple[int, ...]] = option(
        None, "Training widths of responses under --trim_padding, e.g. 128,256,512,1024 (default: powers of two "
              ">= 64).")
    val_every: int = option(5, "Greedy validation every N steps (0 = never); also at step 0 and the end.")
    val_before_train: bool = option(
        True, "Validate at step 0, before the first update (veRL's trainer.val_before_train). Validation uses fixed "
              "keys, so leaving it out changes no training value: runs that share a start can skip it.")
    val_max_new_tokens: Optional[int] = option(None, "Validation response budget (default max_response_length).")
    val_samples: int = option(0, "Validation also samples N responses per held-out prompt at the rollout "
                                 "temperature, with a fixed key (val_sampled/* metrics, the quantity GRPO "
                                 "optimises; 0 = greedy only).")
    log_samples: int = option(2, "Sample responses written to sample_log.jsonl per step.")
    seed: int = 0  # the shared --seed flag

    def __post_init__(self) -> None:
        need = requirement_checker("GRPOConfig")
        for name in ("prompts_per_step", "group_size", "mini_batch_prompts", "micro_batch_rows", "ppo_epochs",
                     "total_steps", "max_prompt_length", "max_response_length"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be an integer >= 1, got {value!r}")
        need(self.rollout_engine in ENGINES, f"rollout_engine must be one of {ENGINES}, got {self.rollout_engine!r}")
        need(self.rollout_slots is None or (isinstance(self.rollout_slots, int) and self.rollout_slots >= 1),
             f"rollout_slots must be an integer >= 1 or None, got {self.rollout_slots!r}")
        need(isinstance(self.rollout_decode_windows, int) and self.rollout_decode_windows >= 1,
             f"rollout_decode_windows must be an integer >= 1, got {self.rollout_decode_windows!r}")
        need(self.train_last_layers >= 0, f"train_last_layers must be >= 0, got {self.train_last_layers}")
        need(not (self.train_last_layers and self.trainable_regex),
             "set train_last_layers or trainable_regex, not both")
        need(not (self.lora.enabled and (self.train_last_layers or self.trainable_regex)),
             f"lora_rank={self.lora.rank} trains LoRA adapters only: set train_last_layers=0 and no trainable_regex "
             "(--lora_target_modules chooses the adapted projections, e.g. layers/(2[0-9])/ for the last layers)")
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
        need(self.estimator in ESTIMATORS,
             f"advantage_estimator must be one of {sorted(ESTIMATORS)}, got {self.advantage_estimator!r}")
        need((self.estimator == "gae") == (self.algorithm == "ppo"),
             f"advantage_estimator {self.estimator!r} does not go with algorithm {self.algorithm!r} (gae needs the "
             "PPO critic, and PPO trains one only for gae)")
        self._check_algorithm_options(need)
        self._check_multiturn_options(need)
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
        try:  # the schedules' lengths and the rollout sampling settings, here rather than at the first step
            check_schedule(self.optimizer, self.total_updates)
            check_schedule(self.critic.optimizer, self.total_updates)
            SamplingConfig(max_new_tokens=self.max_response_length, temperature=self.temperature, top_p=self.top_p,
                           top_k=self.top_k, group_size=self.group_size,
                           prompt_length_buckets=self.prompt_length_buckets)
        except ValueError as e:
            raise ValueError(f"GRPOConfig: {e}") from None
        if self.trainable_regex is not None:
            try:
                re.compile(self.trainable_regex)
            except re.error as e:
                raise ValueError(f"GRPOConfig: trainable_regex {self.trainable_regex!r} is not a regex: {e}") from None

    def _check_algorithm_options(self, need) -> None:
        """The options beyond the ToolRL recipe (DAPO, GSPO, RLOO, TIS, per-component normalisation), alone and in
        combination; every message names the fields (and so the flags) involved."""
        est, group = self.estimator, self.estimator in GROUP_ESTIMATORS
        need(est != "rloo" or self.group_size >= 2, "advantage_estimator 'rloo' needs group_size >= 2 (its baseline "
                                                    f"is the prompt's other responses), got {self.group_size}")
        need(self.dynamic_sampling_max_rounds >= 0,
             f"dynamic_sampling_max_rounds must be >= 0, got {self.dynamic_sampling_max_rounds}")
        if self.dynamic_sampling:
            need(self.group_size >= 2, "dynamic_sampling drops groups whose rewards are all equal: it needs "
                                       f"group_size >= 2, got {self.group_size}")
            need(group, "dynamic_sampling needs a group baseline, under which an all-equal group has no advantage "
                        f"(advantage_estimator grpo or rloo), got advantage_estimator {est!r}")
        need(0 <= self.overlong_buffer <= self.max_response_length, f"overlong_buffer must be in [0, "
             f"max_response_length={self.max_response_length}], got {self.overlong_buffer}")
        need(math.isfinite(self.overlong_penalty_factor) and self.overlong_penalty_factor > 0,
             f"overlong_penalty_factor must be finite and > 0, got {self.overlong_penalty_factor}")
        if self.tis_cap is not None:
            need(math.isfinite(self.tis_cap) and self.tis_cap >= 1,
                 f"tis_cap must be finite and >= 1, got {self.tis_cap}")
            need(self.recompute_old_logprobs, "tis_cap weighs the trainer's recomputed old log-probs against the "
                                              "sampler's: it needs recompute_old_logprobs=True (without it the "
                                              "sampler's log-probs are the old policy and every weight is 1)")
        need(self.policy.importance_sampling_level != "sequence" or group,
             f"importance_sampling_level 'sequence' (GSPO) weighs one advantage per sequence, but advantage_estimator "
             f"{est!r} gives token-level advantages: use importance_sampling_level 'sequence_token' (GSPO-token)")
        need(self.advantage_normalization in NORMALIZATIONS,
             f"advantage_normalization must be one of {NORMALIZATIONS}, got {self.advantage_normalization!r}")
        if self.advantage_normalization == "per_component":
            need(group, "advantage_normalization 'per_component' normalises within each prompt's group "
                        f"(advantage_estimator grpo or rloo), got advantage_estimator {est!r}")
            need(not (self.kl_in_reward and self.kl_coef > 0), "advantage_normalization 'per_component' normalises "
                 "each reward part within its group; a KL penalty folded into the reward (kl_in_reward with kl_coef "
                 "> 0) has no group scale of its own: set kl_coef=0 or kl_in_reward=False (kl_loss_coef adds a KL "
                 "loss term instead)")
        _ = self.component_weights  # parses reward_component_weights

    def _check_multiturn_options(self, need) -> None:
        if self.environment == "none":
            return
        need(self.environment in ENVIRONMENT_NAMES,
             f"environment must be one of {ENVIRONMENT_NAMES}, got {self.environment!r}")
        for name in ("max_turns", "tool_workers"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        need(self.max_turn_tokens is None or 1 <= self.max_turn_tokens <= self.max_response_length,
             f"max_turn_tokens must be in [1, max_response_length={self.max_response_length}], got "
             f"{self.max_turn_tokens}")
        for name in ("env_reward_weight", "turn_reward_weight"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0,
                 f"{name} must be finite and >= 0, got {getattr(self, name)}")
        need(self.env_reward_weight + self.turn_reward_weight > 0,
             "env_reward_weight and turn_reward_weight are both 0: nothing to learn from")
        need(self.estimator != "gae", f"environment {self.environment!r} trains with outcome estimators (grpo, "
                                      "rloo, reinforce_plus_plus): the PPO critic has no multi-turn value targets yet")
        need(not self.dynamic_sampling, "dynamic_sampling draws extra single-turn prompt rounds; it does not "
                                        f"combine with environment {self.environment!r} yet")
        need(self.advantage_normalization != "per_component",
             "advantage_normalization 'per_component' splits the ToolRL reward's parts; a multi-turn reward has "
             "environment and turn parts: use 'total'")
        need(not (self.turn_advantages and self.reward_component_weights),
             "turn_advantages and reward_component_weights do not combine")
        if self.prompt_length_buckets is not None:
            need(max(self.prompt_length_buckets) >= self.max_prompt_length + self.max_response_length,
                 f"multi-turn prompts grow with every turn (up to max_prompt_length + max_response_length = "
                 f"{self.max_prompt_length + self.max_response_length} tokens): the largest prompt_length_bucket "
                 f"({max(self.prompt_length_buckets)}) must cover that")

    @property
    def multiturn(self) -> bool:
        return self.environment != "none"

    @property
    def component_weights(self) -> dict[str, float]:
        """reward_component_weights parsed: {part name: weight} ({} when unset)."""
        out: dict[str, float] = {}
        if not self.reward_component_weights:
            return out
        for item in self.reward_component_weights.split(","):
            name, eq, value = item.partition("=")
            try:
                weight = float(value)
            except ValueError:
                weight = math.nan
            if not (eq and name.strip() and math.isfinite(weight)) or name.strip() in out:
                raise ValueError(f"GRPOConfig: reward_component_weights={self.reward_component_weights!r}: expected "
                                 f"distinct name=weight pairs with finite weights, e.g. format=1,correctness=2; got "
                                 f"{item!r}")
            out[name.strip()] = weight
        return out

    def trainable_pattern(self, num_layers: int) -> Optional[str]:
        """The path regex of the trained parameters for a model of `num_layers` layers (None = all): resolved here,
        where the model is known, from train_last_layers or trainable_regex."""
        if not self.train_last_layers:
            return self.trainable_regex
        if self.train_last_layers > num_layers:
            raise ValueError(f"GRPOConfig: train_last_layers={self.train_last_layers} but the model has {num_layers} "
                             "layers (use 0 to train all of them)")
        return last_layers_regex(num_layers, self.train_last_layers)

    @property
    def estimator(self) -> str:
        """The advantage estimator's registry name."""
        return self.advantage_estimator or ("gae" if self.algorithm == "ppo" else "grpo")

    @property
    def needs_reference(self) -> bool:
        return (self.kl_coef > 0 and self.kl_in_reward) or self.policy.kl_loss_coef > 0

    @property
    def total_updates(self) -> int:
        """Optimizer updates over the run (learning-rate schedules count updates, several per step)."""
        return self.total_steps * self.updates_per_step

    @property
    def updates_per_step(self) -> int:
        return self.ppo_epochs * self.prompts_per_step // self.mini_batch_prompts


@dataclasses.dataclass
class StepResult:
    """What one GRPO step produced (for logging and tests)."""

    metrics: dict[str, float]
    rewards: RewardResult
    samples: SampleOutput
    groups: Optional[np.ndarray] = None  # dynamic sampling: each trained group's index among the groups drawn


class GRPOTrainer:
    """The learner: the policy (params + optimizer state), the frozen reference, the sampler, the critic (PPO) and the
    jitted steps, composed into `train_step` (module doc)."""

    def __init__(self, model: CausalLM, config: GRPOConfig, *, tokenizer: Any, pad_id: int,
                 stop_token_ids: Sequence[int], placement: Placement = Placement(),
                 reward: Optional[CombinedReward] = None, reward_pool: Any = None):
        """placement: where arrays live (default: one device). reward: the reward functions and their weights
        (default: the ToolRL reward of `config.reward` alone). reward_pool: an executor scoring rewards in worker
        processes (`rewards.batch.make_reward_pool`), or None."""
        self.config = config
        self.tokenizer = tokenizer
        self.placement = placement
        self.lora = has_lora(model)
        self.lora_dropout = lora_dropout_rate(model)  # > 0: update batches carry dropout seeds (update_stage)
        trainable = trained_regex(model, config.trainable_pattern(model.config.num_layers), "GRPOTrainer")
        self.graphdef, params, self.frozen = nnx.split(model, trainable_filter(trainable), ...)
        if not jax.tree.leaves(params):
            raise ValueError(f"GRPOConfig.trainable_regex={trainable!r} matches no parameter")
        self.params = params
        self.optimizer = make_optimizer(config.optimizer, config.total_updates)
        self.opt_state = placement.init_opt_state(self.optimizer, params)
        param_shardings = placement.state_shardings(params)
        opt_shardings = placement.state_shardings(self.opt_state)
        # The reference policy is a frozen copy of the initial trainable weights (kept only when a KL term needs it);
        # with LoRA it is the base model itself: zero adapters over the shared frozen weights.
        self.ref_params = None
        if config.needs_reference and self.lora:
            self.ref_params = base_adapters(params)
        elif config.needs_reference:
            ref_dtype = jnp.dtype(model.config.dtype) if config.reference_in_compute_dtype else None
            self.ref_params = cast_floating(params, ref_dtype, copy=True)
        self.sampler = Sampler(model, pad_id=pad_id, stop_token_ids=stop_token_ids, tokenizer=tokenizer,
                               mesh=placement.mesh, engine=config.rollout_engine, slots=config.rollout_slots,
                               decode_windows=config.rollout_decode_windows)
        self._sessions: dict[SamplingConfig, SessionGenerator] = {}  # multi-turn KV reuse, one per turn sampling
        self.kv_metrics: dict[str, float] = {}  # the last multi-turn rollout's sessions and prefilled tokens
        self.critic = None
        if config.algorithm == "ppo":  # initialised from the policy's weights (copied) plus a value head
            self.critic = Critic(model, config.critic, trainable_regex=trainable, placement=placement,
                                 total_updates=config.total_updates)
        self.logprob_fn = make_logprob_fn(self.graphdef, config.logits_chunk_size)
        self.update_fn = make_update_fn(self.graphdef, self.optimizer, config.optimizer, config.policy,
                                        param_shardings, opt_shardings, config.logits_chunk_size,
                                        config.max_response_length)
        self.split_update = make_split_update_fns(self.graphdef, self.optimizer, config.optimizer, config.policy,
                                                  param_shardings, opt_shardings, config.logits_chunk_size)
        self.layout = RowLayout(self.sampling_config(), config.trim_padding, config.response_length_buckets)
        self.estimator = get_estimator(config.estimator)
        self.reward = reward or CombinedReward.default(config.reward)
        check_component_weights(config, self.reward)
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

    def sampling_config(self, greedy: bool = False, max_new_tokens: Optional[int] = None) -> SamplingConfig:
        c = self.config
        return SamplingConfig(
            max_new_tokens=max_new_tokens or c.max_response_length, temperature=0.0 if greedy else c.temperature,
            top_p=1.0 if greedy else c.top_p, top_k=0 if greedy else c.top_k, group_size=1 if greedy else
            c.group_size, max_prompts_per_batch=max(1, min(64, c.prompts_per_step)),
            prompt_length_buckets=c.prompt_length_buckets)

    # ------------------------------------------------------------------ stages
    def score(self, samples: SampleOutput, ground_truths: Sequence[str], step: int) -> RewardResult:
        """The score stage: every response against its prompt's ground truth, by every reward function."""
        n = samples.group_size
        responses = [t.strip() for t in samples.texts]
        truths = [ground_truths[i // n] for i in range(len(responses))]
        return self.reward.score(responses, truths, step, pool=self.reward_pool)

    def check_updates(self, update_metrics: Sequence[dict[str, float]], step: int) -> None:
        """Logs skipped updates and stops on divergence (`DivergenceGuard`) before anything of the step is saved."""
        for i, m in enumerate(update_metrics):
            where = f"GRPO step {step}, update {i + 1} of {len(update_metrics)}"
            self.actor_guard.observe(m, where)
            if self.critic is not None:
                self.critic_guard.observe(m, where, prefix="critic/")

    def score_rollout(self, samples: SampleOutput, ground_truths: Sequence[str], step: int) -> RewardResult:
        """The rewards trained on: `score`, then the overlong penalty and part weights (`shape_rewards`)."""
        return shape_rewards(self.score(samples, ground_truths, step), samples, self.config, self.reward)

    def multiturn_config(self, greedy: bool = False) -> tuple[MultiTurnConfig, SamplingConfig]:
        """How multi-turn trajectories roll out, and the sampling of one turn (group_size 1: a group is one
        environment per sample)."""
        c = self.config
        turn_tokens = c.max_turn_tokens or c.max_response_length
        rollout = MultiTurnConfig(max_turns=c.max_turns, max_total_tokens=c.max_response_length,
                                  max_new_tokens_per_turn=turn_tokens, tool_workers=c.tool_workers)
        sampling = self.sampling_config(greedy, turn_tokens)
        # A group's trajectories are separate prompts here, so a call holds prompts_per_batch x group_size of them
        # (the rows, and the continuous engine's slots, of one single-turn call).
        return rollout, dataclasses.replace(sampling, group_size=1,
                                            max_prompts_per_batch=sampling.prompts_per_batch * sampling.group_size)

    def multiturn_rollout(self, ground_truths: Sequence[str], key: jax.Array, step: int, group_size: int,
                          greedy: bool = False) -> tuple[SampleOutput, list, RewardResult, list, float, float]:
        """Trajectories of the tasks `ground_truths` carry (group_size each): (their rows as samples, the
        trajectories, rewards, per-turn ToolRL rewards, generation seconds, scoring seconds)."""
        c = self.config
        tasks = tasks_of(ground_truths)
        rollout, sampling = self.multiturn_config(greedy)
        env_kwargs = environment_kwargs(c.environment, c.env_prompt_style)
        t0 = time.perf_counter()
        session = None
        if c.turn_kv_reuse:
            session = self._sessions.get(sampling)
            if session is None:
                width = prompt_length_bucket(c.max_prompt_length, self.sampling_config())
                session = self._sessions[sampling] = SessionGenerator(
                    self.sampler, sampling, cache_len=session_cache_len(width, c.max_response_length, c.max_turns))
        before = (session.new_sessions, session.prefill_tokens) if session is not None else (0, 0)
        try:
            trajectories = rollout_trajectories(self.sampler, self.tokenizer, c.environment, tasks, group_size,
                                                sampling, rollout, key, env_kwargs, generate=session)
        finally:
            if session is not None:
                session.reset()  # the rollout's caches are not needed again (new weights next time)
        if session is not None:  # 1 session = every turn reused the caches (a restart re-prefills everything)
            self.kv_metrics = {"multiturn/kv_sessions": float(session.new_sessions - before[0]),
                               "multiturn/prefill_tokens": float(session.prefill_tokens - before[1])}
        for i, trajectory in enumerate(trajectories[::group_size]):
            if len(trajectory.prompt_ids) > c.max_prompt_length:
                raise ValueError(f"task {tasks[i].get('id', i)!r}: its opening prompt has {len(trajectory.prompt_ids)} "
                                 f"tokens, more than max_prompt_length={c.max_prompt_length} (a multi-turn prompt is "
                                 f"never cut: raise --max_prompt_length or shorten the task)")
        samples = trajectory_samples(trajectories, group_size, self.sampler.pad_id, c.max_response_length,
                                     self.sampling_config(), self.tokenizer)
        t1 = time.perf_counter()

        def score(responses: list[str], truths: list[str]) -> np.ndarray:
            return self.reward.score(responses, truths, max(step, 0), pool=self.reward_pool).total

        rewards, turns = score_trajectories(trajectories, tasks, group_size, c.environment, c.env_reward_weight,
                                            c.turn_reward_weight, score)
        return samples, trajectories, rewards, turns, t1 - t0, time.perf_counter() - t1

    def rollout_stage(self, prompt_ids: Sequence[Sequence[int]], ground_truths: Sequence[str], key: jax.Array,
                      step: int, refill: Optional[Callable[[], Any]]
                      ) -> tuple[Rollout, RewardResult, Optional[DynamicBatch], float]:
        """Sample and score: (the rollout, its log-prob passes in flight; its rewards; the dynamic-sampling draw or
        None; host seconds spent scoring)."""
        if self.config.multiturn:
            samples, trajectories, rewards, turns, seconds_generate, seconds_score = self.multiturn_rollout(
                ground_truths, key, step, self.config.group_size)
            rollout = start_rollout(self, samples, seconds_generate)
            rollout.trajectories, rollout.turn_rewards = trajectories, turns
            return rollout, shape_rewards(rewards, samples, self.config, self.reward), None, seconds_score
        if self.config.dynamic_sampling:
            drawn = sample_informative_groups(self, prompt_ids, ground_truths, key, step, refill)
            return start_rollout(self, drawn.samples, drawn.seconds_generate), drawn.rewards, drawn, drawn.seconds_score
        rollout = generate_rollout(self, prompt_ids, key)
        t0 = time.perf_counter()
        rewards = self.score_rollout(rollout.samples, ground_truths, step)
        return rollout, rewards, None, time.perf_counter() - t0

    def train_step(self, prompt_ids: Sequence[Sequence[int]], ground_truths: Sequence[str], key: jax.Array,
                   refill: Optional[Callable[[], Any]] = None) -> StepResult:
        """One step on `prompts_per_step` prompts; `self.step` becomes the 1-based step just trained. refill: under
        dynamic sampling, draws the next batch of prompts (`.prompt_ids`, `.ground_truths`) for an extra rollout
        round (None: no extra rounds; `training.dynamic_sampling`)."""
        c = self.config
        if len(prompt_ids) != c.prompts_per_step:
            raise ValueError(f"train_step got {len(prompt_ids)} prompts, config says {c.prompts_per_step}")
        step = self.step + 1
        rollout, rewards, drawn, seconds_score = self.rollout_stage(prompt_ids, ground_truths, key, step, refill)
        t_score = time.perf_counter()
        logprobs = rollout.logprobs()
        parts = reward_parts(rewards, self.reward, c) if c.advantage_normalization == "per_component" else None
        advantages = self.estimator(AdvantageInputs(
            outcome=rewards.total, mask=rollout.mask, old_logp=logprobs.old, ref_logp=logprobs.ref,
            rows=rollout.rows, config=c, critic=self.critic, components=parts))
        if c.turn_advantages and rollout.trajectories is not None:
            advantages = self.per_turn_advantages(rollout, rewards, logprobs, advantages)
        train_rows, row_metrics = update_rows(rollout, logprobs, advantages, c, drawn.filler if drawn else None)
        t_prepare = time.perf_counter()
        update_metrics, cells = update_stage(self, train_rows)
        self.check_updates(update_metrics, step)
        seconds = {"score": seconds_score, "prepare": t_prepare - t_score, "train": time.perf_counter() - t_prepare}
        self.step = step
        metrics = step_metrics(rollout, rewards, logprobs, advantages, update_metrics, cells, c.ppo_epochs, seconds)
        metrics.update(row_metrics, **(drawn.metrics if drawn else {}))
        if rollout.trajectories is not None:
            metrics.update(trajectory_metrics(rollout.trajectories))
            if c.turn_kv_reuse:
                metrics.update(self.kv_metrics)
        if not np.isfinite(metrics["actor/actor_loss"]):
            raise TrainingDivergedError(f"GRPO step {step}: non-finite actor loss {metrics['actor/actor_loss']} "
                                        f"(grad_norm {metrics.get('actor/grad_norm')}); the run stops and nothing "
                                        f"from this step is saved")
        return StepResult(metrics=metrics, rewards=rewards, samples=rollout.samples,
                          groups=drawn.groups if drawn else None)

    def per_turn_advantages(self, rollout: Rollout, rewards: RewardResult, logprobs: Any, advantages: Any) -> Any:
        """`turn_advantages`: the step's estimator run on each turn position's reward-to-go
        (`multiturn.turn_returns`), each model token taking its own turn's advantage."""
        c, mask = self.config, rollout.mask
        index = turn_index(rollout.trajectories, mask.shape[1])
        returns = turn_returns(rollout.trajectories, rollout.turn_rewards, c.env_reward_weight, c.turn_reward_weight,
                               max(1, int(index.max()) + 1))
        shaping = rewards.total - returns[:, 0]  # the overlong penalty and the like apply to every turn
        token = np.zeros(mask.shape, np.float32)
        for k in range(returns.shape[1]):
            column = self.estimator(AdvantageInputs(
                outcome=returns[:, k] + shaping, mask=mask, old_logp=logprobs.old, ref_logp=logprobs.ref,
                rows=rollout.rows, config=c, critic=self.critic))
            token = np.where(index == k, np.asarray(column.token, np.float32), token)
        return dataclasses.replace(advantages, token=token)

    def validate(self, prompt_ids: Sequence[Sequence[int]], ground_truths: Sequence[str], step: int
                 ) -> tuple[dict[str, float], SampleOutput, RewardResult]:
        """Greedy decoding on a held-out split (and `val_samples` sampled responses per prompt), scored with the
        training reward at `step`; in multi-turn mode, greedy (and sampled) trajectories of the held-out tasks."""
        if self.config.multiturn:
            return self.validate_multiturn(ground_truths, step)
        max_new = self.config.val_max_new_tokens or self.config.max_response_length
        samples = self.sampler.generate(prompt_ids, self.sampling_config(greedy=True, max_new_tokens=max_new),
                                        jax.random.key(0))
        rewards = self.score(samples, ground_truths, max(step, 0))
        metrics = rewards.metrics("val/")
        metrics["val/response_length"] = float(samples.lengths.mean())
        if self.config.val_samples > 0:
            sampling = dataclasses.replace(self.sampling_config(max_new_tokens=max_new),
                                           group_size=self.config.val_samples)
            sampled = self.sampler.generate(prompt_ids, sampling, jax.random.key(1))
            metrics.update(self.score(sampled, ground_truths, max(step, 0)).metrics("val_sampled/"))
        return metrics, samples, rewards

    def validate_multiturn(self, ground_truths: Sequence[str], step: int
                           ) -> tuple[dict[str, float], SampleOutput, RewardResult]:
        """Greedy trajectories of held-out tasks (fixed key), scored as in training: val/* rewards and val/multiturn/*
        (success rate, turns, tool calls and errors); with `val_samples`, also that many sampled trajectories per
        task (val_sampled/*)."""
        samples, trajectories, rewards, _, _, _ = self.multiturn_rollout(ground_truths, jax.random.key(0), step, 1,
                                                                         greedy=True)
        metrics = rewards.metrics("val/")
        metrics.update({"val/" + k: v for k, v in trajectory_metrics(trajectories).items()
                        if not k.startswith("time/")})
        metrics["val/response_length"] = float(samples.lengths.mean())
        if self.config.val_samples > 0:
            _, sampled, sampled_rewards, _, _, _ = self.multiturn_rollout(ground_truths, jax.random.key(1), step,
                                                                          self.config.val_samples)
            metrics.update(sampled_rewards.metrics("val_sampled/"))
            metrics.update({"val_sampled/" + k: v for k, v in trajectory_metrics(sampled).items()
                            if not k.startswith("time/")})
        return metrics, samples, rewards
