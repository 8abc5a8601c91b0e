"""`ToolRLExample`: one single-step ToolRL task (prompt messages + reference assistant turn)."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Defaults of the RL parquet's bookkeeping columns (veRL conventions; "math" is what ToolRL's files carry).
DEFAULT_DATA_SOURCE = "rlla"
DEFAULT_ABILITY = "math"
DEFAULT_REWARD_STYLE = "rule"


@dataclasses.dataclass(frozen=True)
class ToolRLExample:
    """A single-step example.

    prompt_messages: [{"role": "system", "content": ...}, {"role": "user", "content": ...}] (any roles allowed;
      the chat template of the model renders them). Treat as read-only.
    ground_truth: the reference assistant turn (`<think>`/`<tool_call>`/`<response>` format).
    index: position within its split (the parquet's extra_info.index).
    source: provenance, written to the parquet's `data_source` column ("rlla", "toolace", "synthetic", ...).
    split: "train" / "test" (extra_info.split).
    ability, reward_style: passthrough parquet columns.
    extra_info: the parquet's extra_info verbatim, kept only when it differs from what the other fields imply
      (instruction = first message, input = second, output = ground_truth); None means "derive it".
    """
    prompt_messages: list[dict[str, str]]
    ground_truth: str
    index: int
    source: str
    split: str = "train"
    ability: str = DEFAULT_ABILITY
    reward_style: str = DEFAULT_REWARD_STYLE
    extra_info: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        messages = self.prompt_messages
        if isinstance(messages, (str, bytes)) or not isinstance(messages, (list, tuple)):
            raise TypeError(f"prompt_messages must be a list of dicts, got {type(messages).__name__}")
        clean = []
        for i, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise ValueError(f"prompt_messages[{i}] must be {{'role': str, 'content': str}}, got {message!r:.120}")
            clean.append({"role": message["role"], "content": message["content"]})
        object.__setattr__(self, "prompt_messages", clean)
        if not isinstance(self.ground_truth, str):
            raise TypeError(f"ground_truth must be a string, got {type(self.ground_truth).__name__}")
        object.__setattr__(self, "index", int(self.index))

    @property
    def system(self) -> str:
        """Content of the first system message ("" when there is none)."""
        return next((m["content"] for m in self.prompt_messages if m["role"] == "system"), "")

    @property
    def user(self) -> str:
        """Content of the last user message ("" when there is none)."""
        return next((m["content"] for m in reversed(self.prompt_messages) if m["role"] == "user"), "")

    def derived_extra_info(self) -> dict[str, Any]:
        """extra_info as ToolRL writes it: {index, input, instruction, output, split}."""
        return {"index": self.index, "input": self.user, "instruction": self.system, "output": self.ground_truth,
                "split": self.split}
