"""absl reward flags: one flag per RewardConfig field, presets with overrides, errors that name the flag."""
from __future__ import annotations

import dataclasses

import pytest
from absl import flags

from experiments import reward_flags
from toolrl_jax.rewards import RewardConfig


def _parse(*argv: str) -> flags.FlagValues:
    fv = flags.FlagValues()
    reward_flags.define_reward_flags(fv)
    fv(["prog", *argv])
    return fv


def test_every_field_has_a_flag():
    fv = _parse()
    for field in dataclasses.fields(RewardConfig):
        assert "reward_" + field.name in fv
    assert reward_flags.reward_config_from_flags(fv) == RewardConfig()


@pytest.mark.parametrize("preset", RewardConfig.PRESET_NAMES)
def test_presets(preset):
    assert reward_flags.reward_config_from_flags(_parse(f"--reward_preset={preset}")) == RewardConfig.preset(preset)


def test_overrides_on_top_of_a_preset():
    config = reward_flags.reward_config_from_flags(_parse(
        "--reward_preset=two_stage", "--reward_length", "--reward_length_target=256", "--reward_matching=optimal",
        "--reward_value_match=tolerant", "--reward_two_stage_boundary=10", "--noreward_two_stage"))
    assert config == RewardConfig(length=True, length_target=256.0, matching="optimal", value_match="tolerant",
                                  two_stage_boundary=10, two_stage=False)


def test_errors_name_the_flags():
    with pytest.raises(ValueError, match=r"--reward_correctness_min .*--reward_correctness_max=-5.0"):
        reward_flags.reward_config_from_flags(_parse("--reward_correctness_max=-5"))
    with pytest.raises(ValueError, match=r"--reward_length_target=0.0"):
        reward_flags.reward_config_from_flags(_parse("--reward_length_target=0"))
    with pytest.raises(flags.IllegalFlagValueError):
        _parse("--reward_matching=hungarian")
