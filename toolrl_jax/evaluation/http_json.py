"""POST a JSON request and read a JSON reply, retrying what may pass (timeouts, 429, 5xx, malformed replies).

Used by the web-search backend and the LLM judge. API keys travel only in headers; every error message has the
key (``secret``) masked out, so no log line or output file can carry it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class HttpConfig:
    """Timeout of one request, and retries with exponential backoff (backoff_s, 2x, 4x, ... capped)."""

    timeout_s: float = 60.0
    retries: int = 5  # further attempts after the first
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"invalid HttpConfig {self}: timeout_s > 0, retries/backoffs >= 0")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1 = the first retry)."""
        return min(self.backoff_s * 2 ** (attempt - 1), self.max_backoff_s)


class HttpError(RuntimeError):
    """A request that failed for good: the service rejected it (4xx), so retrying cannot help."""


class HttpAuthError(HttpError):
    """The service refused the API key (HTTP 401/403)."""


class RetriesExhausted(HttpError):
    """Every attempt timed out, was throttled (429), met a server error (5xx) or got a malformed reply."""


class MalformedReply(ValueError):
    """A reply that is not what the caller expects (retried like a transient failure)."""


def _masked(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def post_json(url: str, payload: Any, headers: dict[str, str], config: HttpConfig,
              parse: Callable[[Any], T] = lambda reply: reply, secret: str | None = None) -> T:
    """``parse(reply JSON)`` of a POST to ``url``; ``parse`` raises ``MalformedReply`` for a reply to retry."""
    body = json.dumps(payload).encode("utf-8")
    problem = ""
    for attempt in range(config.retries + 1):
        if attempt:
            logger.warning("%s: %s; retry %d/%d", url, problem, attempt, config.retries)
            time.sleep(config.delay(attempt))
        request = urllib.request.Request(url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=config.timeout_s) as response:  # noqa: S310 - user URL
                text = response.read().decode("utf-8", errors="replace")
        except urllib.error.HTTPError as error:
            detail = _masked(error.read(300).decode("utf-8", errors="replace"), secret)
            if error.code in (401, 403):
                raise HttpAuthError(f"{url}: HTTP {error.code}, the API key was refused ({detail!r})") from None
            if error.code == 429 or error.code >= 500:
                problem = f"HTTP {error.code}"
                continue
            raise HttpError(f"{url}: HTTP {error.code} ({detail!r})") from None
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as error:
            problem = _masked(f"{type(error).__name__}: {error}", secret)
            continue
        try:
            return parse(json.loads(text))
        except (json.JSONDecodeError, MalformedReply) as error:
            problem = _masked(f"malformed reply ({error})", secret)
    raise RetriesExhausted(f"{url}: no usable reply after {config.retries + 1} attempts (last: {problem})")
