"""Reward shaping from the response alone: DAPO's soft overlong punishment."""
from __future__ import annotations

import numpy as np


def overlong_penalty(lengths: np.ndarray, max_length: int, buffer: int, factor: float = 1.0) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
    Scale", arXiv 2503.14476, sec. 3.4, eq. 13; veRL DAPORewardManager overlong_buffer), added to the reward. With
    L_max = max_length (the response budget) and L_cache = buffer:

        0                                      |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache    L_max - L_cache < |y| <= L_max
        -1                                     L_max < |y|

    times `factor` (veRL's penalty_factor). |y| = `lengths` [N], the generated tokens including the stop token.
    Returns float64 [N] (0 or negative)."""
    if not 1 <= buffer <= max_length:
        raise ValueError(f"overlong_penalty: buffer must be in [1, max_length={max_length}], got {buffer}")
    exceed = np.asarray(lengths, np.float64) - (max_length - buffer)
    return 0.0 - factor * np.clip(exceed / buffer, 0.0, 1.0)
