"""Bamboogle as the ToolRL paper ran it (``benchmarks/Bamboogle/generate.py`` and ``utils.py`` of ToolRL).

Per question, at most ``max_rounds`` (4) generations under the original system prompt (only the Search tool) and
user text. A round's output (stripped) is read in this order:
- it contains ``<tool_call>``: the first line of the first block is read with ``ast.literal_eval`` and its
  ``["parameters"]["query"]`` searched on the web (top 5: answer box, then organic results). The history gets the
  assistant turn ``<think> .. </think>`` + the call written as a Python dict, the observation, and a nudge: "Please
  continue to search if needed ..." while ``round < max_rounds - 1``, else "Do not make tool call any more ...".
  A call that does not parse leaves the history unchanged (the next round sees the same prompt);
- else it contains ``<response>``: its text is the answer;
- else the text after ``</think>`` (or all of it) is the answer.
Without an answer after the last round the prediction is "Round Limit Exceeded, no answer is derived." and scores
0, like an empty answer, without asking the judge; every other answer goes to the LLM judge. Reported as the
original leaderboard does: accuracy and the average number of tool calls (observations in the history).

Generations are saved per question as they finish and judgments per question as they arrive, so an interrupted
run loses nothing; a rerun judges only what has no successful judgment yet (for the same answer and judge model).
"""
from __future__ import annotations

import ast
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from toolrl_jax.evaluation import prompts as P
from toolrl_jax.evaluation.bamboogle import BamboogleConfig, BamboogleItem, load_bamboogle
from toolrl_jax.evaluation.generator import Generator, generate_batched
from toolrl_jax.evaluation.judge import DEFAULT_JUDGE_MODEL, LlmJudge
from toolrl_jax.evaluation.records import RecordStore, write_jsonl
from toolrl_jax.evaluation.search import WebSearch

logger = logging.getLogger(__name__)

ROUND_LIMIT_ANSWER = "Round Limit Exceeded, no answer is derived."


@dataclasses.dataclass(frozen=True)
class Texts:
    """The protocol's prompt texts (``templates/bamboogle_toolrl_*``)."""

    system: str
    user: str  # "{query}" is replaced by the question
    continue_nudge: str
    final_nudge: str
    observation: str  # "{results}" is replaced by the search results

    @classmethod
    def load(cls, prompt_set: P.PromptSet) -> "Texts":
        tool = json.loads(P.default_template("bamboogle_toolrl_search_tool.json"))
        return cls(system=prompt_set.system_prompt([tool]), user=P.default_template("bamboogle_toolrl_user.txt"),
                   continue_nudge=P.default_template("bamboogle_toolrl_continue.txt"),
                   final_nudge=P.default_template("bamboogle_toolrl_final.txt"),
                   observation=P.default_template("bamboogle_toolrl_observation.txt"))


def user_prompt(history: list[dict[str, str]]) -> str:
    """The flattened history (``form_user_prompt``): user and obs blocks end with a blank line, assistant turns
    with a newline."""
    text = P.HISTORY_HEADER + "\n"
    for entry in history:
        if entry["role"] == "user":
            text += f"<user> {entry['content']} </user>\n\n"
        elif entry["role"] == "obs":
            text += f"<obs> {entry['content']} </obs>\n\n"
        elif entry["role"] == "assistant":
            text += f"{entry['content']}\n"
    return text.strip()


def thought_of(output: str, marker: str) -> str:
    """The ``<think>`` text, or what precedes ``marker`` when there is none."""
    if "<think>" in output:
        return output.split("<think>")[1].split("</think>")[0].strip()
    return output.split(marker)[0].strip()


def first_call(output: str) -> tuple[Any, Any] | None:
    """(call, query) of the first line of the first ``<tool_call>`` block, read as a Python literal, or None when
    it does not parse, has no ``["parameters"]["query"]``, or the query cannot be sent as JSON."""
    line = output.split("<tool_call>")[1].split("</tool_call>")[0].strip().split("\n")[0]
    try:
        call = ast.literal_eval(line)
        query = call["parameters"]["query"]
        json.dumps(query)
    except (ValueError, TypeError, SyntaxError, KeyError, IndexError, MemoryError, RecursionError):
        return None
    return call, query


@dataclasses.dataclass
class Dialogue:
    """One question's state: the history the model sees, its raw outputs, and the answer once there is one."""

    item: BamboogleItem
    history: list[dict[str, str]]
    outputs: list[str] = dataclasses.field(default_factory=list)
    queries: list[Any] = dataclasses.field(default_factory=list)
    prediction: str | None = None
    truncated_rounds: int = 0

    def step(self, output: str, search: WebSearch, texts: Texts, config: BamboogleConfig) -> None:
        """Read one round's (stripped) output, as the original loop does."""
        self.outputs.append(output)
        round_index = len(self.outputs)
        if "<tool_call>" in output:
            parsed = first_call(output)
            if parsed is not None:
                call, query = parsed
                results = search.search_text(query, config.top_k).strip()
                self.queries.append(query)
                nudge = texts.continue_nudge if round_index < config.max_rounds - 1 else texts.final_nudge
                thought = thought_of(output, "<tool_call>")
                self.history += [
                    {"role": "assistant", "content": f"<think> {thought} </think>\n<tool_call>\n{call}\n</tool_call>"},
                    {"role": "obs", "content": texts.observation.replace("{results}", results)},
                    {"role": "user", "content": nudge}]
        elif "<response>" in output:
            response = output.split("<response>")[1].split("</response>")[0].strip()
            self.history.append({"role": "assistant",
                                 "content": f"<think> {thought_of(output, '<response>')} </think>\n"
                                            f"<response> {response} </response>"})
            self.prediction = response
        else:
            self.prediction = output.split("</think>")[1].strip() if "</think>" in output else output
            self.history.append({"role": "assistant", "content": output})
        if self.prediction is None and round_index >= config.max_rounds:
            self.prediction = ROUND_LIMIT_ANSWER

    def record(self) -> dict[str, Any]:
        return {"id": self.item.id, "prediction": self.prediction, "history": self.history, "outputs": self.outputs,
                "queries": self.queries, "truncated": self.truncated_rounds > 0,
                "truncated_rounds": self.truncated_rounds}


def generate_dialogues(generator: Generator, items: list[BamboogleItem], store: RecordStore, search: WebSearch,
                       texts: Texts, config: BamboogleConfig) -> None:
    """Run every question without a saved record, up to ``batch_size`` at a time; save each as it finishes."""
    pending = [item for item in items if item.id not in store]
    logger.info("Bamboogle: %d questions (%d already generated)", len(items), len(items) - len(pending))
    active: list[Dialogue] = []
    while pending or active:
        while pending and len(active) < config.batch_size:
            item = pending.pop(0)
            active.append(Dialogue(item, [{"role": "user", "content": texts.user.replace("{query}", item.question)}]))
        conversations = [P.chat(texts.system, user_prompt(d.history)) for d in active]
        for dialogue, completion in zip(active, generate_batched(generator, conversations, config.batch_size,
                                                                 config.limits)):
            dialogue.truncated_rounds += completion.truncated
            dialogue.step(completion.text.strip(), search, texts, config)
            if dialogue.prediction is not None:
                store.add([dialogue.record()])
        active = [d for d in active if d.prediction is None]


def needs_judge(prediction: str) -> bool:
    """The original scores the round-limit answer and an empty answer 0 without asking the judge."""
    return prediction not in (ROUND_LIMIT_ANSWER, "")


def judge_all(items: list[BamboogleItem], generations: RecordStore, judgments: RecordStore, judge: LlmJudge) -> None:
    """Judge every answer that has no successful judgment for the same prediction and judge model."""
    for item in items:
        prediction = generations.get(item.id)["prediction"]
        saved = judgments.get(item.id)
        if not needs_judge(prediction) or (saved and saved["status"] == "ok" and saved["prediction"] == prediction
                                           and saved["model"] == judge.model):
            continue
        judgment = judge.judge(item.question, item.answer, prediction)
        if judgment.status != "ok":
            logger.warning("Bamboogle %s: judgment failed (%s)", item.id, judgment.error)
        judgments.add([{"id": item.id, "prediction": prediction, "model": judge.model,
                        **dataclasses.asdict(judgment)}])


def score_item(item: BamboogleItem, record: dict[str, Any], judgment: dict[str, Any] | None) -> dict[str, Any]:
    """One question's scored record; ``judge_status``: ok, failed, not_judged (scored 0 unasked) or missing."""
    prediction = record["prediction"]
    judgment = judgment if judgment and judgment["prediction"] == prediction else {}
    status = judgment.get("status", "missing") if needs_judge(prediction) else "not_judged"
    correct = status == "ok" and judgment["correct"]
    return {"id": item.id, "question": item.question, "gold": item.answer, "prediction": prediction,
            "score": int(correct), "judge_status": status, "judgment": judgment.get("judgment", ""),
            "judge_reply": judgment.get("raw", ""),
            "tool_calls": sum(entry["role"] == "obs" for entry in record["history"]), "queries": record["queries"],
            "truncated": record["truncated"], "history": record["history"], "outputs": record["outputs"]}


def evaluate_bamboogle_toolrl(generator: Generator, data_path: str | Path, out_dir: str | Path, search: WebSearch,
                              judge: LlmJudge, prompt_set: P.PromptSet,
                              config: BamboogleConfig = BamboogleConfig()) -> dict[str, Any]:
    """Generate (resuming), judge (resuming) and score; writes generations, judgments and scored items."""
    out_dir = Path(out_dir)
    items = load_bamboogle(data_path, config.limit)
    generations = RecordStore(out_dir / "generations" / "bamboogle_toolrl.jsonl")
    judgments = RecordStore(out_dir / "judgments" / "bamboogle.jsonl")
    generate_dialogues(generator, items, generations, search, Texts.load(prompt_set), config)
    judge_all(items, generations, judgments, judge)
    scored = [score_item(item, generations.get(item.id), judgments.get(item.id)) for item in items]
    write_jsonl(out_dir / "items" / "bamboogle.jsonl", scored)
    count = max(len(scored), 1)
    failed = sum(row["judge_status"] == "failed" for row in scored)
    return {
        "protocol": "toolrl",
        "comparable_to_paper": config.limit is None and config.max_rounds == 4 and judge.model == DEFAULT_JUDGE_MODEL,
        "accuracy": sum(row["score"] for row in scored) / count,
        "avg_tool_calls": sum(row["tool_calls"] for row in scored) / count,
        "correct": sum(row["score"] for row in scored), "total": len(scored),
        "not_judged": sum(row["judge_status"] == "not_judged" for row in scored), "judge_failed": failed,
        "judge": f"{judge.model} at {judge.base_url}", "truncated": sum(row["truncated"] for row in scored),
        "limit": config.limit,
    }
