"""Search backends for Bamboogle's ``Search(query)`` tool.

Offline protocol (``search(query, k) -> list of snippets``):
- ``BM25Search``: offline BM25 over a local corpus file (JSONL with a text field, a JSON list, or plain
  text with one document per line).
- ``HttpSearch``: a web-search API over HTTP GET. It NEEDS an API key and refuses to run without one.

The paper's protocol (``search_text(query, k) -> str``, the observation text itself):
- ``SerperSearch``: Google results through the Serper API (or anything answering like it), formatted as ToolRL's
  ``benchmarks/Bamboogle/utils.py: search_serper`` does.
"""
from __future__ import annotations

import json
import logging
import re
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from toolrl_jax.evaluation.http_json import HttpConfig, MalformedReply, post_json

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("contents", "text", "passage", "body", "content", "snippet")


@runtime_checkable
class SearchBackend(Protocol):
    def search(self, query: str, k: int) -> list[str]:
        """The top-``k`` result snippets for ``query`` (best first)."""
        ...


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _document_text(row: Any, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        text = next((row[field] for field in TEXT_FIELDS if isinstance(row.get(field), str)), None)
        if text is None:
            raise ValueError(f"{where}: no text field (one of {TEXT_FIELDS})")
        title = row.get("title")
        return f"{title}: {text}" if isinstance(title, str) and title and not text.startswith(title) else text
    raise ValueError(f"{where}: a document must be a string or an object, got {type(row).__name__}")


def load_corpus(path: str | Path) -> list[str]:
    """Documents of a corpus file: ``.jsonl`` (objects or strings), ``.json`` (a list) or plain text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"search corpus not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs = []
        for line_no, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({error})") from error
                docs.append(_document_text(row, f"{path}:{line_no}"))
    elif path.suffix == ".json":
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of documents")
        docs = [_document_text(row, f"{path} item {i}") for i, row in enumerate(rows)]
    else:
        docs = [line.strip() for line in text.split("\n") if line.strip()]
    if not docs:
        raise ValueError(f"search corpus {path} has no documents")
    return docs


class BM25Search:
    """Okapi BM25 (rank-bm25) over whole documents, lowercase word tokens."""

    def __init__(self, documents: list[str]):
        from rank_bm25 import BM25Okapi

        if not documents:
            raise ValueError("BM25Search needs at least one document")
        self.documents = list(documents)
        self._index = BM25Okapi([_tokens(doc) or [""] for doc in self.documents])

    @classmethod
    def from_file(cls, path: str | Path) -> "BM25Search":
        return cls(load_corpus(path))

    def search(self, query: str, k: int) -> list[str]:
        tokens = _tokens(query)
        if not tokens:
            return []
        scores = self._index.get_scores(tokens)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [self.documents[i] for i in order[:k] if scores[i] > 0]


class SearchKeyMissingError(RuntimeError):
    """Raised when an HTTP search backend is used without an API key."""


class HttpSearch:
    """A JSON web-search API (needs a key; none is bundled).

    Sends ``GET endpoint?{query_param}=<query>&{key_param}=<key>&{count_param}=<k>`` and reads the snippets
    from ``results_field`` (a dot path to a list of strings or of objects with a ``snippet_field``).
    """

    def __init__(self, endpoint: str, api_key: str | None, *, query_param: str = "q", key_param: str = "api_key",
                 count_param: str = "num", results_field: str = "organic_results", snippet_field: str = "snippet",
                 timeout_s: float = 30.0):
        self.endpoint, self.api_key = endpoint, api_key
        self.query_param, self.key_param, self.count_param = query_param, key_param, count_param
        self.results_field, self.snippet_field, self.timeout_s = results_field, snippet_field, timeout_s

    def search(self, query: str, k: int) -> list[str]:
        if not self.api_key:
            raise SearchKeyMissingError(
                f"HTTP search backend {self.endpoint!r} needs an API key (none given); pass one, or use the "
                f"offline BM25 backend with a local corpus")
        params = {self.query_param: query, self.key_param: self.api_key, self.count_param: k}
        url = f"{self.endpoint}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=self.timeout_s) as response:  # noqa: S310 - user-given URL
            payload = json.loads(response.read().decode("utf-8"))
        results: Any = payload
        for key in self.results_field.split(".") if self.results_field else []:
            results = results.get(key, []) if isinstance(results, dict) else []
        snippets = []
        for result in results if isinstance(results, list) else []:
            if isinstance(result, str):
                snippets.append(result)
            elif isinstance(result, dict) and isinstance(result.get(self.snippet_field), str):
                snippets.append(result[self.snippet_field])
        return snippets[:k]


# ------------------------------------------------------------------------------------- the paper's web search

SERPER_ENDPOINT = "https://google.serper.dev/search"


@runtime_checkable
class WebSearch(Protocol):
    def search_text(self, query: Any, k: int) -> str:
        """The observation text for ``query`` with at most ``k`` numbered results."""
        ...


def format_serper(reply: dict[str, Any], k: int) -> str:
    """Serper's answer box (if it has a title and an answer or snippet), then organic results with a title and a
    snippet, numbered from 1, at most ``k`` in all (``utils.search_serper``'s layout; errors become text as there)."""
    try:
        entries = []
        box = reply.get("answerBox", "")
        if box and "title" in box:
            if "answer" in box:
                entries.append(f"{box['title']}\n- Answer: {box['answer']}")
            elif "snippet" in box:
                entries.append(f"{box['title']}\n- Snippet: {box['snippet']}")
        for item in reply.get("organic", []):
            if len(entries) >= k:
                break
            if "title" in item and "snippet" in item:
                entries.append(f"{item['title']}\n- Snippet: {item['snippet']}")
        return "\n".join(f"{rank}. {entry}" for rank, entry in enumerate(entries[:k], start=1)).strip()
    except (TypeError, AttributeError, KeyError) as error:
        return f"Search Error: {error}"


def _serper_reply(reply: Any) -> dict[str, Any]:
    if not isinstance(reply, dict) or not isinstance(reply.get("organic"), list):
        raise MalformedReply("no 'organic' result list")
    return reply


class SerperSearch:
    """``POST endpoint`` with ``{"q": query, "num": 15}`` and header ``X-API-KEY`` (as ``utils.search_serper``).

    An empty organic list is asked again after ``empty_retry_delay_s`` (the original: 6 tries 5 s apart, then
    "Search Error: Timeout"). Transport failures are retried per ``http``; when they persist, or the key is
    refused, an ``HttpError`` stops the run (the original silently skipped the round instead).
    """

    def __init__(self, api_key: str | None, endpoint: str = SERPER_ENDPOINT, http: HttpConfig = HttpConfig(), *,
                 num_requested: int = 15, empty_tries: int = 6, empty_retry_delay_s: float = 5.0):
        if not api_key:
            raise SearchKeyMissingError(f"the web search {endpoint!r} needs an API key (none given)")
        self.endpoint, self._api_key, self.http = endpoint, api_key, http
        self.num_requested, self.empty_tries, self.empty_retry_delay_s = num_requested, empty_tries, empty_retry_delay_s

    def __repr__(self) -> str:
        return f"SerperSearch(endpoint={self.endpoint!r})"

    def search_text(self, query: Any, k: int) -> str:
        for attempt in range(self.empty_tries):
            if attempt:
                time.sleep(self.empty_retry_delay_s)
            reply = post_json(self.endpoint, {"q": query, "num": self.num_requested}, {"X-API-KEY": self._api_key},
                              self.http, _serper_reply, secret=self._api_key)
            if reply["organic"]:
                return format_serper(reply, k)
            logger.warning("web search: no organic results for %r (try %d/%d)", query, attempt + 1, self.empty_tries)
        return "Search Error: Timeout"
