"""Sampling configuration (a frozen, validated dataclass) and the shape buckets that bound recompilation."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence


def _as_int_tuple(name: str, values: Optional[Sequence[int]]) -> Optional[tuple[int, ...]]:
    if values is None:
        return None
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError) as err:
        raise ValueError(f"SamplingConfig.{name} must be a sequence of ints, got {values!r}") from err
    if any(o != v for o, v in zip(out, values)):
        raise ValueError(f"SamplingConfig.{name} must hold integers, got {values!r}")
    return out


def _check_buckets(name: str, buckets: Optional[tuple[int, ...]]) -> None:
    if buckets is None:
        return
    if not buckets:
        raise ValueError(f"SamplingConfig.{name} must not be empty (use None for powers of two)")
    if any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
        raise ValueError(f"SamplingConfig.{name} must be strictly increasing positive ints, got {buckets}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to sample responses.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it before top-k/top-p filtering.
    top_p: nucleus mass in (0, 1]; 1 disables it (and the vocabulary sort it needs).
    top_k: keep the k most likely tokens; 0 disables it.
    max_new_tokens: response budget R (the stop token counts towards it).
    group_size: responses per prompt (the GRPO group size); the prompt is prefilled once and its KV cache copied.
    stop_token_ids: ids that end a response (kept in it, with mask 1); None means the Sampler's default ids.
    ignore_stop: keep generating through stop tokens (benchmarks that force exactly max_new_tokens).
    tempered_logprobs: also return log-probs under the filtered, tempered distribution that was sampled from.
    prompt_length_buckets: allowed padded prompt lengths; None means powers of two >= min_prompt_bucket.
    batch_buckets: allowed padded prompt counts per device call, the largest being the chunk size; None means
      powers of two up to max_prompts_per_batch. Each call decodes bucket * group_size rows.
    prefill_chunk: prompts longer than this are prefilled in chunks of this many tokens (a loop over the KV
      cache), bounding the [batch, heads, chunk, prompt] attention scores; padded prompt lengths above it must be
      multiples of it. None prefills in one pass.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    group_size: int = 1
    stop_token_ids: Optional[tuple[int, ...]] = None
    ignore_stop: bool = False
    tempered_logprobs: bool = False
    prompt_length_buckets: Optional[tuple[int, ...]] = None
    min_prompt_bucket: int = 32
    batch_buckets: Optional[tuple[int, ...]] = None
    max_prompts_per_batch: int = 64
    prefill_chunk: Optional[int] = 512

    def __post_init__(self) -> None:
        for name in ("stop_token_ids", "prompt_length_buckets", "batch_buckets"):
            object.__setattr__(self, name, _as_int_tuple(name, getattr(self, name)))
        t = float(self.temperature)
        if not math.isfinite(t) or t < 0:
            raise ValueError(f"SamplingConfig.temperature must be a finite number >= 0 (0 = greedy), got {t}")
        p = float(self.top_p)
        if not (0.0 < p <= 1.0):
            raise ValueError(f"SamplingConfig.top_p must be in (0, 1], got {p}")
        for name, lo in (("top_k", 0), ("max_new_tokens", 1), ("group_size", 1), ("min_prompt_bucket", 1),
                         ("max_prompts_per_batch", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < lo:
                raise ValueError(f"SamplingConfig.{name} must be an integer >= {lo}, got {value!r}")
        if self.prefill_chunk is not None and (isinstance(self.prefill_chunk, bool) or
                                               int(self.prefill_chunk) != self.prefill_chunk or self.prefill_chunk < 1):
            raise ValueError(f"SamplingConfig.prefill_chunk must be a positive integer or None, got "
                             f"{self.prefill_chunk!r}")
        if self.stop_token_ids is not None and any(s < 0 for s in self.stop_token_ids):
            raise ValueError(f"SamplingConfig.stop_token_ids must be non-negative, got {self.stop_token_ids}")
        _check_buckets("prompt_length_buckets", self.prompt_length_buckets)
        _check_buckets("batch_buckets", self.batch_buckets)
        if self.prefill_chunk is not None and self.prompt_length_buckets is not None:
            uneven = [b for b in self.prompt_length_buckets if b > self.prefill_chunk and b % self.prefill_chunk]
            if uneven:  # a prompt reaching such a bucket could not be prefilled in whole chunks
                raise ValueError(f"SamplingConfig.prompt_length_buckets {uneven} are longer than prefill_chunk "
                                 f"({self.prefill_chunk}) but not multiples of it")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def prompts_per_batch(self) -> int:
        """Prompts handled by one device call (the largest batch bucket)."""
        return self.batch_buckets[-1] if self.batch_buckets else self.max_prompts_per_batch

    def replace(self, **changes) -> "SamplingConfig":
        return dataclasses.replace(self, **changes)


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def prompt_length_bucket(length: int, config: SamplingConfig) -> int:
    """The padded prompt length for a batch whose longest prompt has `length` tokens."""
    if config.prompt_length_buckets is None:
        return max(config.min_prompt_bucket, next_power_of_two(length))
    for bucket in config.prompt_length_buckets:
        if bucket >= length:
            return bucket
    raise ValueError(f"a prompt of {length} tokens is longer than the largest prompt_length_bucket "
                     f"({config.prompt_length_buckets[-1]}); add a bucket or truncate the prompt")


def batch_bucket(num_prompts: int, config: SamplingConfig, multiple_of: int = 1) -> int:
    """The padded prompt count for a chunk of `num_prompts`, rounded up to a multiple of the data-parallel size."""
    if config.batch_buckets is None:
        bucket = min(next_power_of_two(num_prompts), max(config.max_prompts_per_batch, num_prompts))
    else:
        bucket = next((b for b in config.batch_buckets if b >= num_prompts), None)
        if bucket is None:
            raise ValueError(f"{num_prompts} prompts exceed the largest batch bucket {config.batch_buckets[-1]}")
    return -(-bucket // multiple_of) * multiple_of
