"""The RL mix: pool converted examples, optionally subsample each pool, shuffle with a seed, split off a test set.

ToolRL's rlla_4k = 2K ToolACE + 1K Hammer + 1K xLAM steps, shuffled with seed 31415, last 2% as test. The order
here comes from numpy's PCG64 generator, so it is deterministic but not the same permutation as the original's.
"""
from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from toolrl_jax.datasets.example import ToolRLExample


@dataclasses.dataclass(frozen=True)
class MixConfig:
    """seed: shuffling (and subsampling) seed. test_fraction: the last fraction of the shuffled rows (rounded)
    becomes the test split. counts: at most this many examples of a pool (sampled without replacement); pools not
    named are taken whole."""
    seed: int = 31415
    test_fraction: float = 0.02
    counts: Mapping[str, int] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")
        for name, count in self.counts.items():
            if count < 0:
                raise ValueError(f"count for {name!r} must be >= 0, got {count}")


def _subsample(name: str, examples: Sequence[ToolRLExample], count: int | None, seed: int) -> list[ToolRLExample]:
    if count is None or count >= len(examples):
        return list(examples)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    keep = np.sort(rng.choice(len(examples), size=count, replace=False))
    return [examples[i] for i in keep]


def _reindex(examples: Sequence[ToolRLExample], split: str) -> list[ToolRLExample]:
    return [dataclasses.replace(e, index=i, split=split, extra_info=None) for i, e in enumerate(examples)]


def build_mix(pools: Mapping[str, Sequence[ToolRLExample]], config: MixConfig = MixConfig()
              ) -> tuple[list[ToolRLExample], list[ToolRLExample]]:
    """(train, test): pools (in sorted-name order) subsampled, concatenated, permuted by `config.seed`; the last
    round(n * test_fraction) rows are the test split. Indices are renumbered per split."""
    unknown = set(config.counts) - set(pools)
    if unknown:
        raise ValueError(f"counts given for unknown pool(s) {sorted(unknown)}; pools are {sorted(pools)}")
    pooled: list[ToolRLExample] = []
    for name in sorted(pools):
        pooled.extend(_subsample(name, pools[name], config.counts.get(name), config.seed))
    order = np.random.default_rng(config.seed).permutation(len(pooled))
    shuffled = [pooled[i] for i in order]
    n_test = int(round(len(shuffled) * config.test_fraction))
    n_train = len(shuffled) - n_test
    return _reindex(shuffled[:n_train], "train"), _reindex(shuffled[n_train:], "test")
