"""Similarity and matching primitives of the correctness reward.

`multiset_jaccard` reproduces the original's list similarity exactly (including its exceptions: unhashable items
raise TypeError, which the correctness reward turns into the minimum, as the original's bare `except` did).
"""
from __future__ import annotations

import collections
import math
from typing import Any, Sequence


def multiset_jaccard(a: list[Any], b: list[Any]) -> float:
    """1.0 if the lists are equal (order-sensitive); 0.0 if either is empty; else |a ∩ b| / (|a| + |b| - |a ∩ b|)
    with multiset counts."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    count_a, count_b = collections.Counter(a), collections.Counter(b)
    intersection = sum(min(count_a[k], count_b[k]) for k in count_a.keys() & count_b.keys())
    union = len(a) + len(b) - intersection
    return intersection / union if union > 0 else 0.0


def exact_list_similarity(a: list[Any], b: list[Any]) -> float:
    """The "Finegrained" ablation's similarity: 1.0 on exact (order-sensitive) list equality, else 0.0."""
    return 1.0 if a == b else 0.0


def _normalize_text(s: str) -> str:
    return " ".join(s.split()).casefold()


def _scalar_matches_text(x: Any, text: str) -> bool:
    """A JSON scalar (None/bool/number) against a string spelling of it, e.g. 1 vs " 1.0", True vs "TRUE"."""
    t = _normalize_text(text)
    if x is None:
        return t in ("null", "none")
    if isinstance(x, bool):
        return t == ("true" if x else "false")
    if isinstance(x, int):
        try:
            return int(t) == x
        except ValueError:
            pass
    try:
        return float(t) == float(x)
    except (ValueError, OverflowError):
        return False


def tolerant_equal(a: Any, b: Any) -> bool:
    """Type-tolerant JSON equality: strings compare case- and whitespace-insensitively, a scalar equals its string
    spelling (1 == "1" == "1.0", True == "true"), lists element-wise, dicts key-wise. Anything `==` accepts also
    passes (so 1 == 1.0 == True as in Python)."""
    if isinstance(a, str) and isinstance(b, str):
        return a == b or _normalize_text(a) == _normalize_text(b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(tolerant_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(tolerant_equal(a[k], b[k]) for k in a)
    if isinstance(b, str) and not isinstance(a, (list, dict)):
        return _scalar_matches_text(a, b)
    if isinstance(a, str) and not isinstance(b, (list, dict)):
        return _scalar_matches_text(b, a)
    return a == b


def values_equal(a: Any, b: Any, tolerant: bool) -> bool:
    """Parameter value equality: Python `==` on parsed JSON, or `tolerant_equal`."""
    return tolerant_equal(a, b) if tolerant else a == b


def calls_equal(gt_call: Any, pred_call: Any, tolerant: bool) -> bool:
    """Whole-call identity: `==` on the dicts, or (tolerant) equal keys with tolerant parameter values."""
    if not tolerant:
        return gt_call == pred_call
    if not (isinstance(gt_call, dict) and isinstance(pred_call, dict)) or gt_call.keys() != pred_call.keys():
        return gt_call == pred_call
    return all(
        tolerant_equal(v, pred_call[k]) if k == "parameters" else v == pred_call[k] for k, v in gt_call.items()
    )


def call_lists_equal(gt_calls: list[Any], pred_calls: list[Any], tolerant: bool) -> bool:
    """Order-sensitive list equality of calls (the original's `gt_tools == pd_tools`)."""
    if not tolerant:
        return gt_calls == pred_calls
    return len(gt_calls) == len(pred_calls) and all(
        calls_equal(g, p, True) for g, p in zip(gt_calls, pred_calls)
    )


def max_weight_assignment(weights: Sequence[Sequence[float]]) -> list[int]:
    """Hungarian algorithm: a one-to-one row -> column assignment maximising the total weight.

    Returns, per row, the assigned column or -1 (rows beyond the number of columns stay unassigned). Runs in
    O(n^2 m) with n = min(rows, cols); rows are GT calls, so n is small even for a response with many calls.
    """
    n_rows = len(weights)
    n_cols = len(weights[0]) if n_rows else 0
    if n_rows == 0 or n_cols == 0:
        return [-1] * n_rows
    transpose = n_rows > n_cols
    if transpose:
        cost = [[-weights[r][c] for r in range(n_rows)] for c in range(n_cols)]
    else:
        cost = [[-w for w in row] for row in weights]
    n, m = len(cost), len(cost[0])  # n <= m
    # Potentials u (rows), v (columns); p[j] = row matched to column j (1-based, 0 = free); shortest augmenting paths.
    u = [0.0] * (n + 1)
    v = [0.0] * (m + 1)
    p = [0] * (m + 1)
    way = [0] * (m + 1)
    for i in range(1, n + 1):
        p[0] = i
        j0 = 0
        minv = [math.inf] * (m + 1)
        used = [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = p[j0], math.inf, 0
            row = cost[i0 - 1]
            for j in range(1, m + 1):
                if not used[j]:
                    cur = row[j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[p[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if p[j0] == 0:
                break
        while True:
            j1 = way[j0]
            p[j0] = p[j1]
            j0 = j1
            if j0 == 0:
                break
    row_to_col = [-1] * n
    for j in range(1, m + 1):
        if p[j]:
            row_to_col[p[j] - 1] = j - 1
    if not transpose:
        return row_to_col
    result = [-1] * n_rows
    for c, r in enumerate(row_to_col):
        result[r] = c
    return result
