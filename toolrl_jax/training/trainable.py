"""Which parameters train: a path-regex nnx filter shared by the policy and the PPO critic."""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import jax
import numpy as np


def trainable_filter(regex: Optional[str]) -> Callable[[tuple, Any], bool]:
    """An nnx filter selecting parameters whose '/'-joined path matches `regex` (search); None selects all."""
    if regex is None:
        return lambda path, value: True
    pattern = re.compile(regex)
    return lambda path, value: bool(pattern.search("/".join(str(p) for p in path)))


def last_layers_regex(num_layers: int, k: int) -> str:
    """Trainable-parameter regex for the last k decoder layers plus the final norm (embeddings stay frozen)."""
    if not 1 <= k <= num_layers:
        raise ValueError(f"last k layers: k must be in [1, {num_layers}], got {k}")
    ids = "|".join(str(i) for i in range(num_layers - k, num_layers))
    return rf"^(layers/({ids})/|final_norm/)"


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
