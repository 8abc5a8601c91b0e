"""Write a run's summary as JSON and as Markdown tables in the ToolRL paper's column layout."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolrl_jax.evaluation.bfcl import categories as cats


def _pct(value: float | None) -> str:
    return "N/A" if value is None else f"{100 * value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(summary: dict[str, Any]) -> str:
    """Markdown tables: BFCL, API-Bank, Bamboogle (paper layout), then BFCL per category."""
    parts = [f"# Evaluation: {summary.get('model', '')}".rstrip()]
    notes = []
    bfcl = summary.get("bfcl")
    if bfcl:
        g = bfcl["groups"]
        parts += ["## BFCL v3 (accuracy %)", _table(
            ["Overall", "Non-Live", "Non-Live AST", "Live", "Multi-Turn", "Relevance", "Irrelevance"],
            [[_pct(g["overall"]), _pct(g["non_live"]), _pct(g["non_live_ast"]), _pct(g["live"]),
              _pct(g["multi_turn"]), _pct(g["relevance"]), _pct(g["irrelevance"])]])]
        rows = [[name, _pct(bfcl["categories"][name]["accuracy"]),
                 f"{bfcl['categories'][name]['correct']}/{bfcl['categories'][name]['total']}"]
                for name in cats.ALL_CATEGORIES if name in bfcl["categories"]]
        rows += [[name, "skipped", bfcl["skipped"][name].split(";")[0]] for name in bfcl.get("skipped", {})]
        parts += ["### BFCL per category", _table(["Category", "Accuracy", "Correct"], rows)]
        if bfcl.get("limit"):
            notes.append(f"BFCL: only the first {bfcl['limit']} items of each category were evaluated.")
    api = summary.get("api_bank")
    if api:
        rows = []
        for metric, label in (("toolrl", "ToolRL (any call = first gold call)"), ("strict", "Strict (all calls)")):
            s = api[metric]
            rows.append([label] + [_pct(s.get(key)) for key in ("level1", "level2", "level3", "overall")])
        parts += ["## API-Bank (accuracy %)", _table(["Score", "Level-1", "Level-2", "Level-3", "Overall"], rows)]
        if api.get("limit"):
            notes.append(f"API-Bank: only the first {api['limit']} items of each level were evaluated.")
    bamboo = summary.get("bamboogle")
    if bamboo:
        parts += ["## Bamboogle", _table(
            ["Accuracy %", "Avg Num Tool Calls", "EM %", "F1 %", "Cover-EM %", "Questions"],
            [[_pct(bamboo["accuracy"]), f"{bamboo['avg_tool_calls']:.2f}", _pct(bamboo["em"]), _pct(bamboo["f1"]),
              _pct(bamboo["cover_em"]), str(bamboo["total"])]])]
        notes.append(f"Bamboogle accuracy uses the judge '{bamboo.get('judge', 'default')}' "
                     f"(the paper used an LLM judge).")
        if bamboo.get("limit"):
            notes.append(f"Bamboogle: only the first {bamboo['limit']} questions were evaluated.")
    if notes:
        parts += ["## Notes", "\n".join(f"- {note}" for note in notes)]
    return "\n\n".join(parts) + "\n"


def write_summary(summary: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``summary.json`` and ``summary.md`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "summary.json", out_dir / "summary.md"
    json_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown(summary), encoding="utf-8")
    return json_path, md_path
