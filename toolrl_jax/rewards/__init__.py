"""The ToolRL reward (format + correctness + optional length) with every ablation variant, scored in batch.

The token-level JAX pre-filter lives in `toolrl_jax.rewards.token_format` (imported explicitly: it pulls in JAX,
which reward worker processes do not need).
"""
from toolrl_jax.rewards.batch import RewardBatch, make_reward_pool, score_batch
from toolrl_jax.rewards.config import RewardConfig, RewardConfigError, StepScales
from toolrl_jax.rewards.parsing import (
    GroundTruthError,
    ParsedGroundTruth,
    ParsedResponse,
    extract_assistant_turn,
    parse_ground_truth,
    parse_response,
)
from toolrl_jax.rewards.reward import RewardComponents, score_parsed, score_response

__all__ = [
    "GroundTruthError",
    "ParsedGroundTruth",
    "ParsedResponse",
    "RewardBatch",
    "RewardComponents",
    "RewardConfig",
    "RewardConfigError",
    "StepScales",
    "extract_assistant_turn",
    "make_reward_pool",
    "parse_ground_truth",
    "parse_response",
    "score_batch",
    "score_parsed",
    "score_response",
]
