"""absl flags for the reward: `--reward_preset` plus one `--reward_<field>` override per RewardConfig field.

Usage in an entry point:
    from experiments import reward_flags
    ...
    config = reward_flags.reward_config_from_flags(FLAGS)

Overrides left unset keep the preset's value; an invalid combination raises a ValueError naming the flag.
"""
from __future__ import annotations

import dataclasses

from absl import flags

from toolrl_jax.rewards.config import MATCHING_MODES, VALUE_MATCH_MODES, RewardConfig, RewardConfigError

FLAG_PREFIX = "reward_"

_HELP = {
    "format_max": "Format reward when the format is right (two-stage/dynamic schedules start from it).",
    "format_min": "Format reward when the format is wrong.",
    "partial_format": "Beyond the paper: partial format credit (fraction of format checks passed).",
    "correctness_max": "Correctness reward on an exact call match (Equal max: 1).",
    "correctness_min": "Correctness reward for missing/unparsable calls (Equal max: -1).",
    "exact_similarity": "Finegrained ablation: name/key similarity is 1 on exact list equality, else 0.",
    "per_call_exact": "Intermediate ablation: a GT call scores 1 only for an identical predicted call.",
    "binary_correctness": "Coarse ablation: correctness is max on an exact call-list match, else min.",
    "matching": "Beyond the paper: GT-to-prediction call matching, greedy in GT order (original) or optimal.",
    "value_match": "Beyond the paper: strict Python == on values, or tolerant (1 == '1', case/space-insensitive).",
    "length": "Add the length reward (think words / target, capped at 1).",
    "length_max": "Length reward for a think block of at least the target length.",
    "length_min": "Length reward for an empty or missing think block.",
    "length_target": "Think words for the full length reward (without the schedule).",
    "length_schedule": "Dynamic length: the target grows linearly from --reward_length_schedule_start.",
    "length_schedule_start": "Length target at step 0 under the schedule.",
    "length_schedule_end": "Length target at step --reward_length_schedule_steps under the schedule.",
    "length_schedule_steps": "Steps over which the length target grows from start to end.",
    "two_stage": "Two-stage ablation: correctness range / 3 before the boundary step, format range / 2 after.",
    "two_stage_boundary": "First step of the second stage.",
    "scheduled_scale": "Dynamic (scale) ablation: format range shrinks and correctness range grows with the step.",
    "scale_schedule_steps": "Steps over which the dynamic scale moves from its start to its end ranges.",
}


def define_reward_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Define --reward_preset and one override flag (default None = keep the preset) per RewardConfig field."""
    flags.DEFINE_enum(
        FLAG_PREFIX + "preset", "original", list(RewardConfig.PRESET_NAMES),
        "The paper's reward variant; the --reward_* flags below override its fields.", flag_values=flag_values,
    )
    for field in dataclasses.fields(RewardConfig):
        name, help_text = FLAG_PREFIX + field.name, _HELP[field.name] + f" Default: the preset's (original: {field.default!r})."
        if field.type == "bool":
            flags.DEFINE_bool(name, None, help_text, flag_values=flag_values)
        elif field.type == "float":
            flags.DEFINE_float(name, None, help_text, flag_values=flag_values)
        elif field.type == "int":
            flags.DEFINE_integer(name, None, help_text, flag_values=flag_values)
        elif field.name == "matching":
            flags.DEFINE_enum(name, None, list(MATCHING_MODES), help_text, flag_values=flag_values)
        elif field.name == "value_match":
            flags.DEFINE_enum(name, None, list(VALUE_MATCH_MODES), help_text, flag_values=flag_values)
        else:
            raise TypeError(f"no flag type for RewardConfig.{field.name}: {field.type}")


def reward_config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> RewardConfig:
    """The RewardConfig chosen by parsed flags; raises ValueError naming the offending flag."""
    overrides = {}
    for field in dataclasses.fields(RewardConfig):
        value = flag_values[FLAG_PREFIX + field.name].value
        if value is not None:
            overrides[field.name] = value
    preset = flag_values[FLAG_PREFIX + "preset"].value
    try:
        return RewardConfig.preset(preset, **overrides)
    except RewardConfigError as e:
        base = RewardConfig.preset(preset)
        shown = [
            f"--{FLAG_PREFIX}{f}={overrides[f]!r}" if f in overrides
            else f"--{FLAG_PREFIX}{f} (unset: {getattr(base, f)!r} from --{FLAG_PREFIX}preset={preset})"
            for f in e.fields
        ]
        raise ValueError(f"invalid reward flags {', '.join(shown)}: {e.message}") from None


define_reward_flags()
