"""Write a run's summary as JSON and as Markdown tables in the ToolRL paper's column layout."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolrl_jax.datasets.records import row_label
from toolrl_jax.evaluation.bfcl import categories as cats


def _pct(value: float | None) -> str:
    return "N/A" if value is None else f"{100 * value:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "N/A" if value is None else f"{value:.3f}"


def _truncation_note(name: str, count: int) -> list[str]:
    return [f"{name}: {count} item(s) had a prompt longer than the context; it was left-truncated (see "
            f"'truncated' in items/)."] if count else []


def markdown(summary: dict[str, Any]) -> str:
    """Markdown tables: BFCL, API-Bank, Bamboogle (paper layout), BFCL per category, held-out sets."""
    parts = [f"# Evaluation: {summary.get('model', '')}".rstrip()]
    notes = []
    bfcl = summary.get("bfcl")
    if bfcl:
        g = bfcl["groups"]
        parts += ["## BFCL v3 (accuracy %)", _table(
            ["Overall", "Non-Live", "Non-Live AST", "Live", "Multi-Turn", "Relevance", "Irrelevance"],
            [[_pct(g["overall"]), _pct(g["non_live"]), _pct(g["non_live_ast"]), _pct(g["live"]),
              _pct(g["multi_turn"]), _pct(g["relevance"]), _pct(g["irrelevance"])]])]
        per_category = bfcl["categories"]
        rows = [[name, _pct(per_category[name]["accuracy"]),
                 f"{per_category[name]['correct']}/{per_category[name]['total']}",
                 str(per_category[name].get("truncated", 0))]
                for name in cats.ALL_CATEGORIES if name in per_category]
        rows += [[name, "skipped", bfcl["skipped"][name].split(";")[0], ""] for name in bfcl.get("skipped", {})]
        parts += ["### BFCL per category", _table(["Category", "Accuracy", "Correct", "Truncated"], rows)]
        if bfcl.get("limit"):
            notes.append(f"BFCL: only the first {bfcl['limit']} items of each category were evaluated.")
        notes += _truncation_note("BFCL", sum(s.get("truncated", 0) for s in per_category.values()))
    api = summary.get("api_bank")
    if api:
        rows = []
        for metric, label in (("toolrl", "ToolRL (any call = first gold call)"), ("strict", "Strict (all calls)")):
            s = api[metric]
            rows.append([label] + [_pct(s.get(key)) for key in ("level1", "level2", "level3", "overall")])
        parts += ["## API-Bank (accuracy %)", _table(["Score", "Level-1", "Level-2", "Level-3", "Overall"], rows)]
        if api.get("limit"):
            notes.append(f"API-Bank: only the first {api['limit']} items of each level were evaluated.")
        notes += _truncation_note("API-Bank", api.get("truncated", 0))
    bamboo = summary.get("bamboogle")
    if bamboo:
        parts += _bamboogle(bamboo, notes)
    held = summary.get("heldout")
    if held:
        parts += _heldout(held, notes)
    for name, title in (("env_synthetic", "Synthetic environment, held-out tasks"),
                        ("env_bfcl", "BFCL multi-turn through the training environment")):
        if summary.get(name):
            parts += _environment(summary[name], title)
    if notes:
        parts += ["## Notes", "\n".join(f"- {note}" for note in notes)]
    return "\n\n".join(parts) + "\n"


def _environment(env: dict[str, Any], title: str) -> list[str]:
    rows = [["all", str(env["count"]), _pct(env["success_rate"])]]
    rows += [[kind, str(v["count"]), _pct(v["success_rate"])] for kind, v in env.get("by_kind", {}).items()]
    return [f"## {title} (success %)", _table(["Tasks", "Count", "Success"], rows),
            f"Turns per task {env['turns']:.2f}; tool calls per turn {env['tool_calls_per_turn']:.2f}; tool errors "
            f"per turn {env['tool_errors_per_turn']:.2f}."]


def _bamboogle(bamboo: dict[str, Any], notes: list[str]) -> list[str]:
    if "skipped" in bamboo:
        notes.append(f"Bamboogle {bamboo['skipped']}.")
        return ["## Bamboogle", f"Bamboogle {bamboo['skipped']}."]
    if bamboo["protocol"] == "toolrl":
        parts = ["## Bamboogle (the paper's protocol)", _table(
            ["Accuracy %", "Avg Num Tool Calls", "Correct", "Questions", "Not judged", "Judge failed"],
            [[_pct(bamboo["accuracy"]), f"{bamboo['avg_tool_calls']:.2f}", str(bamboo["correct"]),
              str(bamboo["total"]), str(bamboo["not_judged"]), str(bamboo["judge_failed"])]])]
        notes.append(f"Bamboogle: judged by {bamboo['judge']}; 'not judged' answers (round limit, empty) score 0.")
        if not bamboo["comparable_to_paper"]:
            notes.append("Bamboogle: run with settings other than the paper's (item limit, rounds, judge model, "
                         "prompt template or token limits): not comparable to its numbers.")
        if bamboo["judge_failed"]:
            notes.append(f"Bamboogle: {bamboo['judge_failed']} judgment(s) failed and count as not correct; rerun the "
                         f"same command to retry only those.")
    else:
        parts = ["## Bamboogle (offline protocol: NOT comparable to the paper)", _table(
            ["Accuracy %", "Avg Num Tool Calls", "EM %", "F1 %", "Cover-EM %", "Questions"],
            [[_pct(bamboo["accuracy"]), f"{bamboo['avg_tool_calls']:.2f}", _pct(bamboo["em"]), _pct(bamboo["f1"]),
              _pct(bamboo["cover_em"]), str(bamboo["total"])]])]
        notes.append(f"Bamboogle: offline protocol (local corpus, other prompts, judge '{bamboo['judge']}'): NOT "
                     f"comparable to the paper's numbers.")
    if bamboo.get("limit"):
        notes.append(f"Bamboogle: only the first {bamboo['limit']} questions were evaluated.")
    notes += _truncation_note("Bamboogle", bamboo.get("truncated", 0))
    return parts


def _heldout(held: dict[str, Any], notes: list[str]) -> list[str]:
    def row(name: str, rates: dict[str, Any]) -> list[str]:
        reward = rates["reward"]
        return [name, str(rates["items"]), _pct(rates["exact"]), _pct(rates["name_accuracy"]),
                _pct(rates["parameter_accuracy"]), _num(reward["total"]), _num(reward["format"]),
                _num(reward["correctness"]), _pct(reward["accuracy"]), str(rates["truncated"])]

    rows = [row(name, rates) for name, rates in held["files"].items()] + [row("overall", held["overall"])]
    parts = ["## Held-out tool sets", _table(
        ["File", "Items", "Exact calls %", "Name acc. %", "Parameter acc. %", "Reward", "Format", "Correctness",
         "Reward acc. %", "Truncated"], rows)]
    bad = held["bad_rows"]
    if bad:
        shown = "; ".join(f"{b['file']} {row_label(b['row'], b['unit'])}: {b['error']}" for b in bad[:20])
        notes.append(f"Held-out: {len(bad)} row(s) not usable (all in items/heldout_bad_rows.jsonl): {shown}"
                     + (" ..." if len(bad) > 20 else ""))
    if held.get("limit"):
        notes.append(f"Held-out: only the first {held['limit']} usable rows of each file were evaluated.")
    notes += _truncation_note("Held-out", held["overall"]["truncated"])
    return parts


def write_summary(summary: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """``summary.json`` and ``summary.md`` in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "summary.json", out_dir / "summary.md"
    json_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown(summary), encoding="utf-8")
    return json_path, md_path
