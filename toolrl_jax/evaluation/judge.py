"""The LLM judge of ToolRL's Bamboogle evaluation, over any OpenAI-compatible chat-completions endpoint.

As ``benchmarks/Bamboogle/generate.py``: system ``JUDGE_SYS``, user ``JUDGE_USER`` (query, ground truth, predicted
answer), model gpt-4o at temperature 0; the reply's text after "- Judgment:" (stripped) must be exactly "Yes".
A reply without "- Thought:" and "- Judgment:" (which crashed the original) is retried like a transport failure;
a judgment that still fails is returned as ``failed``, never as "No".
"""
from __future__ import annotations

import dataclasses
from typing import Any

from toolrl_jax.evaluation.http_json import HttpConfig, MalformedReply, RetriesExhausted, post_json
from toolrl_jax.evaluation.prompts import exact_template

OPENAI_BASE_URL = "https://api.openai.com/v1"
DEFAULT_JUDGE_MODEL = "gpt-4o"
THOUGHT_MARK, JUDGMENT_MARK = "- Thought:", "- Judgment:"


class JudgeKeyMissingError(ValueError):
    """The judge was configured without an API key."""


@dataclasses.dataclass(frozen=True)
class Judgment:
    """One judged answer: status "ok" (``correct`` from "Judgment: Yes") or "failed" (``error`` says why)."""

    status: str
    correct: bool = False
    judgment: str = ""
    thought: str = ""
    raw: str = ""  # the judge's reply text
    error: str = ""


def parse_reply(text: str) -> Judgment:
    """Read a judge reply the way the original does (raises MalformedReply without both marks)."""
    if THOUGHT_MARK not in text or JUDGMENT_MARK not in text:
        raise MalformedReply(f"no '{THOUGHT_MARK}' / '{JUDGMENT_MARK}' in the judge's reply {text[:200]!r}")
    thought = text.split(THOUGHT_MARK)[1].split(JUDGMENT_MARK)[0].strip()
    judgment = text.split(JUDGMENT_MARK)[1].strip()
    return Judgment(status="ok", correct=judgment == "Yes", judgment=judgment, thought=thought, raw=text)


def _chat_reply(reply: Any) -> Judgment:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise MalformedReply("no choices[0].message.content") from None
    if not isinstance(content, str):
        raise MalformedReply("message content is not text")
    return parse_reply(content.strip())


class LlmJudge:
    """``POST {base_url}/chat/completions`` with ``Authorization: Bearer <key>`` (the key never leaves the headers)."""

    def __init__(self, api_key: str | None, base_url: str = OPENAI_BASE_URL, model: str = DEFAULT_JUDGE_MODEL,
                 http: HttpConfig = HttpConfig()):
        if not api_key:
            raise JudgeKeyMissingError(f"the judge at {base_url!r} needs an API key (none given)")
        self._api_key, self.base_url, self.model, self.http = api_key, base_url.rstrip("/"), model, http
        self.system = exact_template("bamboogle_judge_system.txt")
        self.user = exact_template("bamboogle_judge_user.txt")

    def __repr__(self) -> str:
        return f"LlmJudge(model={self.model!r}, base_url={self.base_url!r})"

    def messages(self, question: str, gold: str, prediction: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system},
                {"role": "user", "content": self.user.format(query=question, ground_truth=gold, predicted=prediction)}]

    def judge(self, question: str, gold: str, prediction: str) -> Judgment:
        """The judgment; ``failed`` when the retries are used up. A rejected request (refused key, unknown model:
        HTTP 4xx) raises ``HttpError``, since no retry or later item could succeed."""
        payload = {"model": self.model, "messages": self.messages(question, gold, prediction), "temperature": 0,
                   "n": 1}
        try:
            return post_json(f"{self.base_url}/chat/completions", payload,
                             {"Authorization": f"Bearer {self._api_key}"}, self.http, _chat_reply,
                             secret=self._api_key)
        except RetriesExhausted as error:
            return Judgment(status="failed", error=str(error))
