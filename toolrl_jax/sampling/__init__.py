"""Rollout sampling: jitted prefill + KV-cache decode with temperature / top-k / top-p and GRPO groups."""
from toolrl_jax.sampling.config import SamplingConfig
from toolrl_jax.sampling.engine import DecodeSpec, generate_tokens
from toolrl_jax.sampling.processors import TokenChoice, select_tokens
from toolrl_jax.sampling.sampler import SampleOutput, Sampler

__all__ = ["SamplingConfig", "SampleOutput", "Sampler", "DecodeSpec", "generate_tokens", "select_tokens",
           "TokenChoice"]
