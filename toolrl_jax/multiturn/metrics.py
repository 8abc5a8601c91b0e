"""Summary metrics of a batch of multi-turn trajectories (for logs next to the GRPO step metrics)."""
from __future__ import annotations

from collections.abc import Sequence

from toolrl_jax.multiturn.rollout import FINISH_REASONS, Trajectory

PREFIX = "multiturn/"
TIMING_PREFIX = "time/multiturn/"  # wall-clock figures, under time/ like the step's other timings
TIMINGS = ("generation_s_per_turn", "tool_s_per_turn", "tool_time_fraction")


def trajectory_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Means over a batch (keys prefixed "multiturn/", the timings "time/multiturn/"):

    turns_per_trajectory; tool_calls_per_turn and tool_errors_per_turn (error results, parse errors included);
    parse_error_rate (turns whose call text was malformed); success_rate and reward; truncated_rate; one
    finish/<reason> fraction per FINISH_REASONS; response_tokens and model_tokens per trajectory;
    model_token_fraction (model tokens / response tokens, i.e. the share of the response the loss trains);
    generation_s_per_turn (the batched call a turn waited for) and tool_s_per_turn (its own tool time), and
    tool_time_fraction = tool time / (tool + generation time) summed over turns.
    """
    if not trajectories:
        raise ValueError("trajectory_metrics needs at least one trajectory")
    count = len(trajectories)
    turns = [turn for trajectory in trajectories for turn in trajectory.turns]
    num_turns = max(len(turns), 1)
    response_tokens = sum(int(t.response_ids.size) for t in trajectories)
    model_tokens = sum(int(t.loss_mask.sum()) for t in trajectories)
    generation_s = sum(turn.generation_s for turn in turns)
    tool_s = sum(turn.tool_s for turn in turns)
    metrics = {
        "turns_per_trajectory": len(turns) / count,
        "tool_calls_per_turn": sum(len(turn.calls) for turn in turns) / num_turns,
        "tool_errors_per_turn": sum(turn.num_errors for turn in turns) / num_turns,
        "parse_error_rate": sum(turn.parse_error is not None for turn in turns) / num_turns,
        "success_rate": sum(t.success for t in trajectories) / count,
        "reward": sum(t.reward for t in trajectories) / count,
        "truncated_rate": sum(t.truncated for t in trajectories) / count,
        "response_tokens": response_tokens / count,
        "model_tokens": model_tokens / count,
        "model_token_fraction": model_tokens / response_tokens if response_tokens else 0.0,
        "generation_s_per_turn": generation_s / num_turns,
        "tool_s_per_turn": tool_s / num_turns,
        "tool_time_fraction": tool_s / (tool_s + generation_s) if tool_s + generation_s > 0 else 0.0,
    }
    for reason in FINISH_REASONS:
        metrics[f"finish/{reason}"] = sum(t.finish_reason == reason for t in trajectories) / count
    return {(TIMING_PREFIX if name in TIMINGS else PREFIX) + name: float(value) for name, value in metrics.items()}
