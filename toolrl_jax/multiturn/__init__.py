"""Multi-turn RL rollouts with tools executed in the loop.

templates.py: incremental chat tokenization with a checked prefix property (`IncrementalChat`,
`TemplatePrefixError`); generation.py: the per-turn generation interface and its `Sampler` adapter
(`sampler_generate`); rollout.py: lockstep trajectories over environments (`run_trajectories`, `MultiTurnConfig`,
`Trajectory`); metrics.py: batch summaries (`trajectory_metrics`).
"""
from toolrl_jax.multiturn.generation import GenerateFn, Generation, sampler_generate
from toolrl_jax.multiturn.metrics import trajectory_metrics
from toolrl_jax.multiturn.rollout import (
    CALL_FORMATS,
    FINISH_REASONS,
    MultiTurnConfig,
    Trajectory,
    TurnRecord,
    follow_up_messages,
    run_trajectories,
)
from toolrl_jax.multiturn.templates import IncrementalChat, TemplatePrefixError, first_difference

__all__ = [
    "CALL_FORMATS", "FINISH_REASONS", "GenerateFn", "Generation", "IncrementalChat", "MultiTurnConfig",
    "TemplatePrefixError", "Trajectory", "TurnRecord", "first_difference", "follow_up_messages", "run_trajectories",
    "sampler_generate", "trajectory_metrics",
]
