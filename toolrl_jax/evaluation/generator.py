"""Text generation behind a small protocol, so scorers and tests never need a model.

``Generator.generate(conversations)`` takes a batch of chat conversations (lists of
``{"role", "content"}`` messages ending with the user turn) and returns one assistant completion each.
``SamplerGenerator`` adapts the project's JAX sampler (``toolrl_jax.sampling``) with greedy decoding.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

Message = dict[str, Any]


@runtime_checkable
class Generator(Protocol):
    def generate(self, conversations: Sequence[list[Message]]) -> list[str]:
        """One completion (the assistant turn's text) per conversation, in order."""
        ...


class FunctionGenerator:
    """A generator from a per-conversation function ``respond(messages) -> str`` (tests, oracles)."""

    def __init__(self, respond: Callable[[list[Message]], str]):
        self._respond = respond
        self.calls = 0  # number of generate() batches served
        self.seen: list[list[Message]] = []  # every conversation received, in order

    def generate(self, conversations: Sequence[list[Message]]) -> list[str]:
        self.calls += 1
        self.seen.extend(conversations)
        return [self._respond(list(conversation)) for conversation in conversations]


def generate_batched(generator: Generator, conversations: Sequence[list[Message]], batch_size: int) -> list[str]:
    """Run ``generator`` over ``conversations`` in chunks of ``batch_size``; checks the output count."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outputs: list[str] = []
    for start in range(0, len(conversations), batch_size):
        chunk = list(conversations[start:start + batch_size])
        texts = generator.generate(chunk)
        if len(texts) != len(chunk):
            raise RuntimeError(f"generator returned {len(texts)} completions for {len(chunk)} prompts")
        outputs.extend(texts)
    return outputs


@dataclasses.dataclass(frozen=True)
class SamplerGeneratorConfig:
    """Greedy decoding settings for evaluation."""

    max_new_tokens: int = 1024
    max_prompt_tokens: int = 4096  # longer prompts keep their last tokens (left truncation, as in training)
    family: str | None = None  # chat family for the stop tokens (None: inferred from the tokenizer)
    seed: int = 0


class SamplerGenerator:
    """Greedy generation with the project's JAX sampler and the model's own chat template."""

    def __init__(self, model: Any, tokenizer: Any, config: SamplerGeneratorConfig = SamplerGeneratorConfig()):
        from toolrl_jax import sampling, tokenization

        self._tokenizer = tokenizer
        self._tokenization = tokenization
        self._config = config
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stops = tokenization.stop_token_ids(tokenizer, config.family)
        self._sampler = sampling.Sampler(model, pad_id=pad_id, stop_token_ids=stops, tokenizer=tokenizer)
        self._sampling_config = sampling.SamplingConfig(
            max_new_tokens=config.max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, num_samples=1)
        # Prompt + response must fit the model's positions.
        limit = model.config.max_position_embeddings - config.max_new_tokens
        if limit < 1:
            raise ValueError(f"max_new_tokens {config.max_new_tokens} leaves no room for a prompt "
                             f"(max_position_embeddings {model.config.max_position_embeddings})")
        self._prompt_limit = min(config.max_prompt_tokens, limit)
        self._calls = 0

    def generate(self, conversations: Sequence[list[Message]]) -> list[str]:
        prompts = []
        for conversation in conversations:
            ids = self._tokenization.encode_chat(self._tokenizer, conversation, add_generation_prompt=True)
            prompts.append(ids[-self._prompt_limit:])
        self._calls += 1
        output = self._sampler.generate(prompts, self._sampling_config, self._config.seed + self._calls)
        return list(output.texts)
