"""absl flags for the reward: `--reward_preset` plus one `--reward_<field>` override per RewardConfig field, and
the reward functions trained on: `--reward_fn` (repeatable; "toolrl" or "package.module:function") with
`--reward_weights`.

Usage in an entry point:
    from experiments import reward_flags
    ...
    config = reward_flags.reward_config_from_flags(FLAGS)
    reward = reward_flags.combined_reward_from_flags(config, FLAGS)

Overrides left unset keep the preset's value; an invalid combination raises a ValueError naming the flag.
"""
from __future__ import annotations

import dataclasses
import math

from absl import flags

from toolrl_jax.rewards.config import MATCHING_MODES, VALUE_MATCH_MODES, RewardConfig, RewardConfigError
from toolrl_jax.rewards.functions import (
    BUILTIN_SPEC,
    CombinedReward,
    RewardFunctionError,
    RewardTerm,
    load_reward_fn,
    reward_fn_name,
)

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
        name = FLAG_PREFIX + field.name
        help_text = _HELP[field.name] + f" Default: the preset's (original: {field.default!r})."
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
    flags.DEFINE_multi_string(
        FLAG_PREFIX + "fn", [BUILTIN_SPEC],
        f"A reward function to train on (repeat the flag for several): {BUILTIN_SPEC!r} = the ToolRL reward set by "
        "--reward_preset and the overrides above, or 'package.module:function' called as fn(responses, "
        "ground_truths, step[, examples=...]) -> N scores, a RewardOutput or {'score': ..., '<component>': ...}. "
        "The reward is the weighted sum; each function's score and components are logged as reward/<name>/...",
        flag_values=flag_values)
    flags.DEFINE_list(
        FLAG_PREFIX + "weights", None,
        "Comma-separated weights, one per --reward_fn in order (negative = a penalty, 0 = logged only). "
        "Default: 1.0 each.", flag_values=flag_values)


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


def combined_reward_from_flags(reward_config: RewardConfig,
                               flag_values: flags.FlagValues = flags.FLAGS) -> CombinedReward:
    """The reward functions chosen by --reward_fn / --reward_weights ("toolrl" uses `reward_config`); raises
    ValueError naming the flag on a bad spec, a weight count mismatch, a non-finite weight or duplicate names."""
    specs = list(flag_values[FLAG_PREFIX + "fn"].value or [])
    if not specs:
        raise ValueError(f"--{FLAG_PREFIX}fn: give at least one reward function ({BUILTIN_SPEC!r} or "
                         "'package.module:function')")
    raw_weights = flag_values[FLAG_PREFIX + "weights"].value
    shown = f"--{FLAG_PREFIX}weights={','.join(raw_weights or [])}"
    weights = [1.0] * len(specs)
    if raw_weights is not None:
        if len(raw_weights) != len(specs):
            raise ValueError(f"{shown}: {len(raw_weights)} weights for {len(specs)} --{FLAG_PREFIX}fn "
                             f"({', '.join(specs)}); give one weight per --{FLAG_PREFIX}fn, in order")
        try:
            weights = [float(w) for w in raw_weights]
        except ValueError as e:
            raise ValueError(f"{shown}: not a number ({e})") from None
        bad = [w for w in weights if not math.isfinite(w)]
        if bad:
            raise ValueError(f"{shown}: weights must be finite, got {bad[0]}")
        if not any(weights):
            raise ValueError(f"{shown}: every weight is 0, so the policy gets no reward signal")
    seen: dict[str, str] = {}
    terms = []
    for spec, weight in zip(specs, weights):
        try:
            name = reward_fn_name(spec)
            if name in seen:
                raise RewardFunctionError(f"{spec!r} and {seen[name]!r} are both named {name!r}; metric names must "
                                          "be unique (wrap one under another name)")
            seen[name] = spec
            terms.append(RewardTerm(name, load_reward_fn(spec, reward_config), weight))
        except RewardFunctionError as e:
            raise ValueError(f"--{FLAG_PREFIX}fn={spec}: {e}") from e
    return CombinedReward(terms)


define_reward_flags()
