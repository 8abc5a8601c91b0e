"""Reward configuration: one frozen dataclass, one option per component, named presets for the paper's ablations.

Every variant of the original implementation (chosen there by environment variables) is a field here. Options
combine exactly as in the original: the two-stage scale is applied first, then the dynamic (scheduled) scale.
Step-dependent values are resolved by :meth:`RewardConfig.scales` from the 1-based global step (0 = evaluation
before training).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

MATCHING_MODES = ("greedy", "optimal")
VALUE_MATCH_MODES = ("strict", "tolerant")


class RewardConfigError(ValueError):
    """An invalid RewardConfig value; `fields` names the field(s) involved so flag parsers can name the flags."""

    def __init__(self, fields: str | tuple[str, ...], message: str):
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self.message = message
        super().__init__(f"RewardConfig.{'/'.join(self.fields)}: {message}")


@dataclasses.dataclass(frozen=True)
class StepScales:
    """The reward ranges in force at one training step (after the two-stage and dynamic schedules)."""

    format_max: float
    format_min: float
    correctness_max: float
    correctness_min: float
    length_target: float  # L: think words for the full length reward
    length_max: float
    length_min: float


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The ToolRL reward with every ablation as an option. Defaults reproduce the paper's "Original" reward."""

    # Format reward: binary {format_min, format_max}.
    format_max: float = 1.0
    format_min: float = 0.0
    # Beyond the paper: partial credit = fraction of format checks passed, scaled into [format_min, format_max].
    partial_format: bool = False

    # Correctness reward: range [correctness_min, correctness_max] ("Equal max" = [-1, 1]).
    correctness_max: float = 3.0
    correctness_min: float = -3.0
    exact_similarity: bool = False  # "Finegrained": name/key similarity is 1 on exact list equality, else 0.
    per_call_exact: bool = False  # "Intermediate": a GT call scores 1 only for an identical predicted call.
    binary_correctness: bool = False  # "Coarse": max on exact list equality, else min.
    # Beyond the paper: one-to-one matching of GT to predicted calls ("greedy" = the original, GT order).
    matching: str = "greedy"
    # Beyond the paper: "tolerant" makes 1 == "1" and compares strings case- and whitespace-insensitively.
    value_match: str = "strict"

    # Length reward (off in the original): min(1, round(think_words / L, 2)) scaled into [length_min, length_max].
    length: bool = False
    length_max: float = 1.0
    length_min: float = 0.0
    length_target: float = 512.0
    # "Dynamic length": L = (end - start) * step / steps + start (does nothing unless `length` is on).
    length_schedule: bool = False
    length_schedule_start: float = 384.0
    length_schedule_end: float = 640.0
    length_schedule_steps: float = 105.0

    # "Two stage": step < boundary: correctness range / 3; step >= boundary: format range / 2.
    two_stage: bool = False
    two_stage_boundary: int = 30
    # "Dynamic (scale)": format range shrinks from {-2, 2}, correctness range grows from [-2, 2] over `steps`.
    scheduled_scale: bool = False
    scale_schedule_steps: float = 150.0

    PRESET_NAMES: ClassVar[tuple[str, ...]] = (
        "original",
        "length",
        "dynamic_length",
        "equal_max",
        "two_stage",
        "dynamic_scale",
        "finegrained",
        "intermediate",
        "coarse",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("float", float):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise RewardConfigError(f.name, f"expected a number, got {value!r}")
                if not math.isfinite(value):
                    raise RewardConfigError(f.name, f"must be finite, got {value!r}")
                object.__setattr__(self, f.name, float(value))
            elif f.type in ("bool", bool) and not isinstance(value, bool):
                raise RewardConfigError(f.name, f"expected True/False, got {value!r}")
        if not isinstance(self.two_stage_boundary, int) or isinstance(self.two_stage_boundary, bool):
            raise RewardConfigError("two_stage_boundary", f"expected an int, got {self.two_stage_boundary!r}")
        for lo, hi in (
            ("format_min", "format_max"),
            ("correctness_min", "correctness_max"),
            ("length_min", "length_max"),
        ):
            if getattr(self, lo) > getattr(self, hi):
                raise RewardConfigError((lo, hi), f"{lo} = {getattr(self, lo)} is above {hi} = {getattr(self, hi)}")
        for name in ("length_target", "length_schedule_start", "length_schedule_end"):
            if getattr(self, name) <= 0:
                raise RewardConfigError(name, f"must be > 0 (it divides the think word count), got "
                                              f"{getattr(self, name)}")
        for name in ("length_schedule_steps", "scale_schedule_steps"):
            if getattr(self, name) <= 0:
                raise RewardConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.matching not in MATCHING_MODES:
            raise RewardConfigError("matching", f"must be one of {MATCHING_MODES}, got {self.matching!r}")
        if self.value_match not in VALUE_MATCH_MODES:
            raise RewardConfigError("value_match", f"must be one of {VALUE_MATCH_MODES}, got {self.value_match!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "RewardConfig":
        """The paper's named variant (see PRESET_NAMES), optionally with fields overridden."""
        presets = {
            "original": {},
            "length": {"length": True},
            "dynamic_length": {"length": True, "length_schedule": True},
            "equal_max": {"correctness_max": 1.0, "correctness_min": -1.0},
            "two_stage": {"two_stage": True},
            "dynamic_scale": {"scheduled_scale": True},
            "finegrained": {"exact_similarity": True},
            "intermediate": {"per_call_exact": True},
            "coarse": {"binary_correctness": True},
        }
        if name not in presets:
            raise ValueError(f"unknown reward preset {name!r}; choose one of {cls.PRESET_NAMES}")
        return cls(**{**presets[name], **overrides})

    def scales(self, step: int) -> StepScales:
        """Resolve the ranges at `step` (1-based global step; 0 = before training), in the original's float order."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0 (1-based global step), got {step!r}")
        f_max, f_min = self.format_max, self.format_min
        c_max, c_min = self.correctness_max, self.correctness_min
        if self.two_stage:
            if step >= self.two_stage_boundary:
                f_max, f_min = f_max / 2, f_min / 2
            else:
                c_max, c_min = c_max / 3, c_min / 3
        if self.scheduled_scale:
            n = self.scale_schedule_steps
            f_max = 2 - (2 - f_max) * step / n
            f_min = -2 + (2 + f_min) * step / n
            if f_max < 1.0:
                f_max = 1.0
            if f_min > -1.0:
                f_min = -1.0
            c_max = (c_max - 2) * step / n + 2
            c_min = (c_min + 2) * step / n - 2
            if c_max > 3.0:
                c_max = 3.0
            if c_min < -3.0:
                c_min = -3.0
        if self.length_schedule:
            length_target = (
                (self.length_schedule_end - self.length_schedule_start) * step / self.length_schedule_steps
                + self.length_schedule_start
            )
        else:
            length_target = self.length_target
        return StepScales(f_max, f_min, c_max, c_min, length_target, self.length_max, self.length_min)

    def bounds(self, step: int) -> dict[str, tuple[float, float]]:
        """Declared [lo, hi] of each component and of the total at `step` (correctness is 0 for non-tool GTs).

        As in the original, correctness = (max - min) * score / S_max + min can land one ulp outside [min, max]
        when score == S_max without an exact list match (e.g. calls in another order)."""
        s = self.scales(step)
        fmt = (min(s.format_min, s.format_max), max(s.format_min, s.format_max))
        corr = (min(s.correctness_min, 0.0), max(s.correctness_max, 0.0))
        length = (s.length_min, s.length_max) if self.length else (0.0, 0.0)
        total = (fmt[0] + corr[0] + length[0], fmt[1] + corr[1] + length[1])
        return {"format": fmt, "correctness": corr, "length": length, "total": total}
