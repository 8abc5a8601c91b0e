"""Validation of frozen config dataclasses: errors that name the config and the offending field."""
from __future__ import annotations

from typing import Callable


def requirement_checker(owner: str) -> Callable[[bool, str], None]:
    """need(cond, msg): raises ValueError(f"{owner}: {msg}") when cond is false (for `__post_init__`)."""
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(f"{owner}: {msg}")

    return need
