"""Text generation behind a small protocol, so scorers and tests never need a model.

``Generator.generate(conversations, limits)`` takes a batch of chat conversations (lists of ``{"role", "content"}``
messages ending with the user turn) and the benchmark's ``GenerationLimits``, and returns one ``Completion`` each.
``SamplerGenerator`` adapts the project's JAX sampler (``toolrl_jax.sampling``) with greedy decoding.

Length limits follow the original evaluations, which never truncate a prompt: each prompt gets
``min(max_new_tokens, context_tokens - reserve_tokens - prompt_tokens)`` new tokens (BFCL's OSS handler:
``min(4096, max_context_length - prompt - 2)``; ToolRL's API-Bank and Bamboogle scripts: vLLM with
``max_model_len=4096, max_tokens=4096``). A prompt with no room left is either an error or (default) left-truncated
and flagged ``truncated`` on its completion, so the benchmarks count and report it.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Literal, Optional, Protocol, Sequence, runtime_checkable

logger = logging.getLogger(__name__)

Message = dict[str, Any]
LONG_PROMPT_POLICIES = ("truncate", "error")


class PromptTooLongError(ValueError):
    """A prompt leaves no room for a response and the limits say to stop rather than truncate."""


@dataclasses.dataclass(frozen=True)
class GenerationLimits:
    """Token limits of one benchmark's generations.

    context_tokens: prompt + response never exceed it (None: the model's window, ``max_position_embeddings``; a
      larger value is capped at the window). reserve_tokens: kept free besides (BFCL's handler keeps 2).
    long_prompts: what happens to a prompt with no room left: "truncate" (keep its last tokens, leaving
      ``min(max_new_tokens, room // 2)`` for the response, and flag it) or "error".
    """

    max_new_tokens: int = 4096
    context_tokens: int | None = None
    reserve_tokens: int = 0
    long_prompts: Literal["truncate", "error"] = "truncate"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.context_tokens is not None and self.context_tokens < 2:
            raise ValueError(f"context_tokens must be >= 2 or None, got {self.context_tokens}")
        if self.reserve_tokens < 0:
            raise ValueError(f"reserve_tokens must be >= 0, got {self.reserve_tokens}")
        if self.long_prompts not in LONG_PROMPT_POLICIES:
            raise ValueError(f"long_prompts must be one of {LONG_PROMPT_POLICIES}, got {self.long_prompts!r}")

    def plan(self, prompt_tokens: int, window: int) -> tuple[int, int, bool]:
        """(prompt tokens kept, new-token budget, truncated) for a prompt under a model window of ``window``."""
        room = min(self.context_tokens or window, window) - self.reserve_tokens
        if room < 2:
            raise ValueError(f"context of {room + self.reserve_tokens} tokens with {self.reserve_tokens} reserved "
                             f"leaves no room for a prompt and a response")
        if prompt_tokens < room:
            return prompt_tokens, min(self.max_new_tokens, room - prompt_tokens), False
        if self.long_prompts == "error":
            raise PromptTooLongError(f"a prompt of {prompt_tokens} tokens leaves no room for a response in a context "
                                     f"of {room} tokens (use long_prompts='truncate' to cut it and flag the item)")
        budget = min(self.max_new_tokens, room // 2)
        return room - budget, budget, True


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated assistant turn and how its prompt fitted (None where the generator does not know)."""

    text: str
    prompt_tokens: int | None = None  # before any truncation
    max_new_tokens: int | None = None  # the budget this generation had
    truncated: bool = False  # the prompt did not fit and was left-truncated

    def record(self) -> dict[str, Any]:
        """The fields a generation record keeps besides the text."""
        return {"truncated": self.truncated, "prompt_tokens": self.prompt_tokens,
                "max_new_tokens": self.max_new_tokens}


@runtime_checkable
class Generator(Protocol):
    def generate(self, conversations: Sequence[list[Message]], limits: GenerationLimits) -> list[Completion]:
        """One completion (the assistant turn) per conversation, in order."""
        ...


class FunctionGenerator:
    """A generator from a per-conversation function ``respond(messages) -> str | Completion`` (tests, oracles)."""

    def __init__(self, respond: Callable[[list[Message]], str | Completion]):
        self._respond = respond
        self.calls = 0  # number of generate() batches served
        self.seen: list[list[Message]] = []  # every conversation received, in order
        self.limits: list[GenerationLimits] = []  # the limits of every batch, in order

    def generate(self, conversations: Sequence[list[Message]],
                 limits: GenerationLimits = GenerationLimits()) -> list[Completion]:
        self.calls += 1
        self.seen.extend(conversations)
        self.limits.append(limits)
        replies = [self._respond(list(conversation)) for conversation in conversations]
        return [reply if isinstance(reply, Completion) else Completion(reply) for reply in replies]


def generate_batched(generator: Generator, conversations: Sequence[list[Message]], batch_size: int,
                     limits: GenerationLimits) -> list[Completion]:
    """Run ``generator`` over ``conversations`` in chunks of ``batch_size``; checks the output count and logs
    truncated prompts."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    outputs: list[Completion] = []
    for start in range(0, len(conversations), batch_size):
        chunk = list(conversations[start:start + batch_size])
        completions = generator.generate(chunk, limits)
        if len(completions) != len(chunk):
            raise RuntimeError(f"generator returned {len(completions)} completions for {len(chunk)} prompts")
        for completion in completions:
            if completion.truncated:
                logger.warning("a prompt of %s tokens did not fit and was left-truncated (flagged on its item)",
                               completion.prompt_tokens)
        outputs.extend(completions)
    return outputs


@dataclasses.dataclass(frozen=True)
class SamplerGeneratorConfig:
    """Greedy decoding settings for evaluation (the token limits come with each call)."""

    family: str | None = None  # chat family for the stop tokens (None: inferred from the tokenizer)
    seed: int = 0
    # A prompt too long for the full budget within the model's window is decoded with its own budget, rounded
    # down to a multiple of this (bounds the number of compiled programs; recorded on the completion).
    budget_quantum: int = 256
    engine: str = "continuous"  # the Sampler's decode engine (continuous or static; same outputs)
    slots: Optional[int] = None  # decode slots of the continuous engine (None: the call's rows, up to 64)
    decode_windows: int = 4  # attention window sizes of the continuous engine's decode calls (1: the whole cache)


class SamplerGenerator:
    """Greedy generation with the project's JAX sampler and the model's own chat template."""

    def __init__(self, model: Any, tokenizer: Any, config: SamplerGeneratorConfig = SamplerGeneratorConfig()):
        from toolrl_jax import sampling, tokenization

        self._tokenizer = tokenizer
        self._tokenization = tokenization
        self._sampling = sampling
        self._config = config
        self.window = int(model.config.max_position_embeddings)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stops = tokenization.stop_token_ids(tokenizer, config.family)
        self._sampler = sampling.Sampler(model, pad_id=pad_id, stop_token_ids=stops, engine=config.engine,
                                         slots=config.slots, decode_windows=config.decode_windows)
        self._calls = 0

    @property
    def sampler(self) -> Any:
        """The JAX Sampler (multi-turn environment benchmarks drive it token by token)."""
        return self._sampler

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def _call_budget(self, kept: int, budget: int, limits: GenerationLimits) -> int:
        """The decode length of a sampler call for this prompt: the full cap where the window allows (the
        completion is cut to ``budget`` afterwards), else ``budget`` rounded down to the quantum."""
        if kept + limits.max_new_tokens <= self.window:
            return limits.max_new_tokens
        quantum = self._config.budget_quantum
        return budget - budget % quantum if budget >= quantum else budget

    def _text(self, output: Any, row: int, budget: int) -> str:
        """Row ``row``'s response cut to ``budget`` tokens, without its stop token."""
        length, stopped = int(output.lengths[row]), bool(output.stopped[row])
        keep = min(length, budget) - (stopped and length <= budget)
        return self._tokenizer.decode(output.response_ids[row][:keep].tolist(), skip_special_tokens=False)

    def generate(self, conversations: Sequence[list[Message]],
                 limits: GenerationLimits = GenerationLimits()) -> list[Completion]:
        prompts, call_budgets, completions = [], [], []
        for conversation in conversations:
            ids = self._tokenization.encode_chat(self._tokenizer, conversation, add_generation_prompt=True)
            kept, budget, truncated = limits.plan(len(ids), self.window)
            call_budget = self._call_budget(kept, budget, limits)
            prompts.append(ids[len(ids) - kept:])
            call_budgets.append(call_budget)
            completions.append(Completion("", len(ids), min(budget, call_budget), truncated))
        for call_budget in sorted(set(call_budgets), reverse=True):
            rows = [i for i, b in enumerate(call_budgets) if b == call_budget]
            self._calls += 1
            output = self._sampler.generate(
                [prompts[i] for i in rows],
                self._sampling.SamplingConfig(max_new_tokens=call_budget, temperature=0.0, top_p=1.0, top_k=0),
                self._config.seed + self._calls)
            for row, i in enumerate(rows):
                completions[i] = dataclasses.replace(completions[i],
                                                     text=self._text(output, row, completions[i].max_new_tokens))
        return completions
