"""BFCL v3 test categories and the leaderboard's groups."""
from __future__ import annotations

NON_LIVE_AST = ("simple", "multiple", "parallel", "parallel_multiple", "java", "javascript")
LIVE_AST = ("live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
RELEVANCE = ("irrelevance", "live_irrelevance", "live_relevance")
MULTI_TURN = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context")
ALL_CATEGORIES = NON_LIVE_AST + LIVE_AST + RELEVANCE + MULTI_TURN
SINGLE_TURN = NON_LIVE_AST + LIVE_AST + RELEVANCE

# Names accepted by --categories besides single categories.
GROUPS: dict[str, tuple[str, ...]] = {
    "all": ALL_CATEGORIES,
    "single_turn": SINGLE_TURN,
    "non_live": NON_LIVE_AST + ("irrelevance",),
    "live": LIVE_AST + ("live_irrelevance", "live_relevance"),
    "multi_turn": MULTI_TURN,
    "ast": NON_LIVE_AST + LIVE_AST,
    "relevance": RELEVANCE,
}


def is_multi_turn(category: str) -> bool:
    return category.startswith("multi_turn")


def is_relevance(category: str) -> bool:
    """Relevance/irrelevance detection categories: scored on whether any call was made."""
    return category in RELEVANCE


def has_possible_answers(category: str) -> bool:
    return not is_relevance(category)


def expand(names: list[str] | tuple[str, ...]) -> list[str]:
    """Resolve category and group names to a de-duplicated list of categories, in leaderboard order."""
    wanted: set[str] = set()
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name in GROUPS:
            wanted.update(GROUPS[name])
        elif name in ALL_CATEGORIES:
            wanted.add(name)
        else:
            raise ValueError(f"unknown BFCL category or group {name!r}; choose from "
                             f"{sorted(GROUPS)} or {list(ALL_CATEGORIES)}")
    return [category for category in ALL_CATEGORIES if category in wanted]


def file_name(category: str) -> str:
    """Question / possible-answer file name of a category."""
    return f"BFCL_v3_{category}.json"


def result_file_name(category: str) -> str:
    """The file name BFCL's ``evaluate`` looks for in a model's result folder."""
    return f"BFCL_v3_{category}_result.json"
