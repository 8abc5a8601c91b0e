"""Incremental chat tokenization with the prefix property: a conversation grows by appending tokens, never by
re-tokenizing what is already there.

A multi-turn rollout keeps the model's sampled token ids exactly as sampled (re-encoding their decoded text can give
other ids, and the log-probs belong to the sampled ones). What it appends after an assistant turn -- the template's
closing text after the assistant's stop token, the tool-result message(s) and the next generation prompt -- is a
*text delta* between two renderings of the chat template, tokenized on its own:

    before = render(messages, add_generation_prompt=True)               # P_k: what the model continued
    closed = render(messages + [assistant], add_generation_prompt=False)  # must be P_k + text + stop + glue
    after  = render(messages + [assistant] + follow_up, add_generation_prompt=True)   # must start with `closed`
    delta  = after[len(P_k + text + stop):]

That is only sound when the template has the *prefix property*: the rendering of turn k is an exact prefix of the
rendering of turn k+1, and the assistant's content is written verbatim right after the generation prompt. Templates
that rewrite history (drop earlier `<think>` blocks, trim or reformat assistant content, move a system block) break
it; `IncrementalChat` checks both conditions on every turn and raises `TemplatePrefixError` naming the template, the
turn and the first differing characters, instead of silently re-tokenizing.

Peers: veRL's multi-turn rollout (`AsyncRolloutRequest`) also appends tokenized chat-template deltas and checks them
against a full re-tokenization; SkyRL's generator and Tunix's multi-turn agentic rollouts keep the model's ids and
append observation ids the same way. Here the check is at the text level (the rendered text of every turn must
extend the previous one), which is exact and independent of BPE boundary effects.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from toolrl_jax.tokenization import render_chat, stop_token_ids


class TemplatePrefixError(ValueError):
    """The chat template rewrites text it already rendered (or does not write the assistant's text verbatim), so
    tokens cannot be appended turn by turn. The message names the template, the turn and where the texts differ."""


def first_difference(a: str, b: str) -> int:
    """Index of the first character where `a` and `b` differ (the shorter length when one is a prefix of the
    other)."""
    limit = min(len(a), len(b))
    for i in range(limit):
        if a[i] != b[i]:
            return i
    return limit


def _excerpt(text: str, at: int, width: int = 40) -> str:
    return repr(text[max(0, at - width):at + width])


def _require_prefix(prefix: str, text: str, template: str, turn: int, what: str) -> None:
    """Raise TemplatePrefixError unless `text` starts with `prefix`."""
    if text.startswith(prefix):
        return
    at = first_difference(prefix, text)
    raise TemplatePrefixError(
        f"chat template {template!r} breaks the prefix property at turn {turn}: {what}. First difference at "
        f"character {at}: expected ...{_excerpt(prefix, at)}..., the template rendered ...{_excerpt(text, at)}... "
        "Tokens cannot be appended incrementally with this template; use one that renders earlier turns unchanged "
        "(e.g. without stripping <think> blocks or trimming assistant content).")


def template_name(tokenizer: Any) -> str:
    """A short label of a tokenizer's chat template for messages: its folder/name and the template's start."""
    template = getattr(tokenizer, "chat_template", None) or ""
    head = " ".join(str(template).split())[:48]
    return f"{getattr(tokenizer, 'name_or_path', '?')} [{head}...]"


@dataclasses.dataclass(frozen=True)
class IncrementalChat:
    """One trajectory's chat template: renders and tokenizes its opening prompt and the deltas between turns.

    tokenizer: a transformers tokenizer with a chat template (ids are never re-derived from decoded text except
      for the deltas, which hold no model tokens).
    tools: JSON-schema tool specs passed to the template's `tools=` (Hermes / Qwen2.5 style), or None when the
      system prompt already lists them (ToolRL style).
    """

    tokenizer: Any
    tools: tuple[Mapping[str, Any], ...] | None = None

    @property
    def name(self) -> str:
        return template_name(self.tokenizer)

    @property
    def end_of_turn_id(self) -> int | None:
        """The id the template writes after an assistant turn (e.g. <|im_end|>, <|eot_id|>), or None when the
        tokenizer's chat family is unknown (then every stop token is expected to close the turn)."""
        try:
            return stop_token_ids(self.tokenizer)[0]
        except ValueError:
            return None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        return render_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt,
                           tools=list(self.tools) if self.tools else None)

    def encode(self, text: str) -> list[int]:
        """Token ids of template text (no BOS/EOS added: the template writes its own special tokens)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def token_text(self, token_id: int) -> str:
        """The text of one token as the template would write it (special tokens included)."""
        return self.tokenizer.decode([int(token_id)], skip_special_tokens=False)

    def prompt_text(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The opening prompt: the messages and the generation prompt."""
        return self.render(messages, add_generation_prompt=True)

    def _close(self, messages: Sequence[Mapping[str, Any]], text: str, stop_id: int, turn: int
               ) -> tuple[bool, str, int]:
        """(closes, closed, end): whether the template closes the turn with `stop_id`, the rendering of the
        closed turn, and where the model's stop token ends in it. Raises as `closes_turn` documents."""
        before = self.render(messages, add_generation_prompt=True)
        closed = self.render([*messages, {"role": "assistant", "content": text}], add_generation_prompt=False)
        _require_prefix(before + text, closed, self.name, turn,
                        "the assistant turn is not rendered as the generation prompt followed by the model's text "
                        "verbatim")
        stop_text = self.token_text(stop_id)
        if closed.startswith(stop_text, len(before) + len(text)):
            return True, closed, len(before) + len(text) + len(stop_text)
        end_of_turn = self.end_of_turn_id
        if end_of_turn is None or int(stop_id) == end_of_turn:
            _require_prefix(before + text + stop_text, closed, self.name, turn,
                            f"the template does not close the assistant turn with its stop token {stop_text!r}")
        return False, closed, len(before) + len(text)

    def closes_turn(self, messages: Sequence[Mapping[str, Any]], text: str, stop_id: int, turn: int) -> bool:
        """Whether the template closes the assistant turn `text` (generated after `messages`' generation prompt)
        with exactly the token `stop_id` the model stopped on.

        Raises TemplatePrefixError when the template does not write the generation prompt and `text` verbatim, or
        when it closes the turn with other text although `stop_id` is the family's end-of-turn token. Returns
        False for another stop token (e.g. <|endoftext|> where the template writes <|im_end|>): the model ended
        the text, not the turn, so the conversation cannot continue.
        """
        return self._close(messages, text, stop_id, turn)[0]

    def delta_text(self, messages: Sequence[Mapping[str, Any]], text: str, stop_id: int,
                   follow_up: Sequence[Mapping[str, Any]], turn: int) -> str:
        """The text to append after the model's stop token: the template's glue closing the assistant turn, the
        `follow_up` messages (tool results) and the next generation prompt.

        Checks the prefix property (the closed assistant turn is an exact prefix of the next rendering) and raises
        TemplatePrefixError when it does not hold, or when `stop_id` does not close the turn (see closes_turn).
        """
        closes, closed, end = self._close(messages, text, stop_id, turn)
        if not closes:
            raise TemplatePrefixError(
                f"chat template {self.name!r}, turn {turn}: the model stopped on {self.token_text(stop_id)!r}, which "
                "does not close an assistant turn in this template; the conversation cannot continue")
        after = self.render([*messages, {"role": "assistant", "content": text}, *follow_up],
                            add_generation_prompt=True)
        _require_prefix(closed, after, self.name, turn,
                        "appending the tool results changes the text already rendered for earlier turns")
        return after[end:]

    def delta_ids(self, messages: Sequence[Mapping[str, Any]], text: str, stop_id: int,
                  follow_up: Sequence[Mapping[str, Any]], turn: int) -> list[int]:
        """`delta_text` tokenized on its own (the model's tokens before it are kept as sampled)."""
        return self.encode(self.delta_text(messages, text, stop_id, follow_up, turn))
