"""Which parameters train: a path-regex nnx filter shared by the policy and the PPO critic."""
from __future__ import annotations

import re
from typing import Any, Callable, Optional

import jax
import numpy as np

from toolrl_jax.models.lora import LORA_PARAM_REGEX, has_lora


def trainable_filter(regex: Optional[str]) -> Callable[[tuple, Any], bool]:
    """An nnx filter selecting parameters whose '/'-joined path matches `regex` (search); None selects all."""
    if regex is None:
        return lambda path, value: True
    pattern = re.compile(regex)
    return lambda path, value: bool(pattern.search("/".join(str(p) for p in path)))


def trained_regex(model: Any, regex: Optional[str], owner: str) -> Optional[str]:
    """What trains in `model`: its LoRA adapters alone when it has them (then `regex` must be None: nothing else
    may train), otherwise the parameters `regex` selects (None: all). `owner` names the caller in errors."""
    if not has_lora(model):
        return regex
    if regex is not None:
        raise ValueError(f"{owner}: the model has LoRA adapters, which are all that trains; it cannot also train "
                         f"{regex!r} (set train_last_layers=0 and no trainable_regex)")
    return LORA_PARAM_REGEX


def last_layers_regex(num_layers: int, k: int) -> str:
    """Trainable-parameter regex for the last k decoder layers plus the final norm (embeddings stay frozen)."""
    if not 1 <= k <= num_layers:
        raise ValueError(f"last k layers: k must be in [1, {num_layers}], got {k}")
    ids = "|".join(str(i) for i in range(num_layers - k, num_layers))
    return rf"^(layers/({ids})/|final_norm/)"


def count_params(tree: Any) -> int:
    """Number of scalars in a parameter pytree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
