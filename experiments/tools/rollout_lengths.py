"""Long-tailed rollout workloads and the row-steps both rollout engines compute on them (flag-free, so tests and
benchmarks can import it): the lengths `experiments/bench_sampling.py --workload=long_tail` forces, and its schedule
model."""
from __future__ import annotations

# The log-normal fitted to the Qwen2.5-tokenizer lengths of ToolRL's 400 SFT reference answers (bench_sampling's
# docstring; tests/test_sampling_bench.py re-fits it).
TOOLRL_LOG_MEAN, TOOLRL_LOG_SD = 5.854, 0.352


def tail_lengths(rows: int, budget: int, dist: str, mean: float, sigma: float, seed: int):
    """Per-row response lengths, clipped to [1, budget]; `lognormal` keeps the given mean (log-mean = log(mean) -
    sigma^2 / 2)."""
    import numpy as np

    if dist == "toolrl":
        mu, sd = TOOLRL_LOG_MEAN, TOOLRL_LOG_SD
    else:
        mu, sd = float(np.log(mean)) - sigma ** 2 / 2, sigma
    lengths = np.random.default_rng(seed).lognormal(mu, sd, size=rows)
    return np.clip(np.rint(lengths), 1, budget).astype(np.int32)


def schedule_model(lengths, group: int, slots: int) -> dict[str, float]:
    """Row-steps per useful token of both engines for rows of these lengths at `slots` rows of KV cache: the static
    engine in batches of `slots` rows (each runs to its longest row), the continuous one by replaying its refill
    policy (`scheduler.simulate_continuous`: every decode step computes every slot, first tokens come from the
    prefill). At equal cost per row-step, their ratio is the continuous engine's speedup."""
    from toolrl_jax.sampling.scheduler import RefillPolicy, simulate_continuous

    useful = int(sum(lengths))
    continuous = simulate_continuous(lengths, RefillPolicy(slots, group))[1] + len(lengths)
    static = row_steps_static(lengths, slots)
    return {"slots": slots, "continuous": continuous / useful, "static": static / useful,
            "speedup": static / continuous}


def row_steps_static(lengths, rows_per_batch: int) -> int:
    """Rows x steps a static engine computes: each batch runs as many steps as its longest row."""
    return sum(rows_per_batch * max(lengths[i:i + rows_per_batch]) for i in range(0, len(lengths), rows_per_batch))


def dynamic_cache_columns(lengths, rows_per_batch: int, prompt_len: int) -> float:
    """Mean cache columns a row-step attends over with a cache that grows with the batch (HF's dynamic cache):
    the prompt plus the tokens so far, for every step of a batch run to its longest row."""
    total = count = 0
    for i in range(0, len(lengths), rows_per_batch):
        rows, steps = len(lengths[i:i + rows_per_batch]), int(max(lengths[i:i + rows_per_batch]))
        total += rows * (steps * prompt_len + steps * (steps - 1) // 2)
        count += rows * steps
    return total / count
