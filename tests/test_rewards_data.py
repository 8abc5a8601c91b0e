"""The reward on real ToolRL data: the 80-row test split's ground truths and the SFT400 outputs, scored against
themselves and against deterministic mutations with the expected direction/values."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments.tools.reward_mutations import MUTATIONS
from toolrl_jax.rewards import GroundTruthError, RewardConfig, parse_ground_truth, score_batch


@pytest.fixture(scope="module")
def test_split_gts(shared_dir) -> list[str]:
    pq = pytest.importorskip("pyarrow.parquet")
    rows = pq.read_table(shared_dir / "data/toolrl/test.parquet").to_pylist()
    return [row["reward_model"]["ground_truth"] for row in rows]


@pytest.fixture(scope="module")
def sft_outputs(shared_dir) -> list[str]:
    with open(shared_dir / "data/toolrl/rlla_sft.json") as f:
        return [row["output"] for row in json.load(f)]


def _expected(gt_text: str, mutation: str) -> tuple[float, float] | None:
    """(format, correctness) expected for a mutation of `gt_text` under the default reward, or None if unpinned."""
    gt = parse_ground_truth(gt_text)
    if gt.calls is None:
        return {"identity": (1.0, 0.0), "no_think": (0.0, 0.0), "response_only": (1.0, 0.0)}.get(mutation)
    n = len(gt.calls)
    lens = [len(c["parameters"]) for c in gt.calls]
    s_max = 1 + sum(1 + k for k in lens)
    distinct_names = len({c["name"] for c in gt.calls}) == n
    corr = lambda score: 6 * score / s_max - 3  # noqa: E731  (default range [-3, 3])
    if mutation in ("identity", "missing_newline", "no_think"):
        return (0.0 if mutation != "identity" else 1.0), 3.0
    if mutation in ("bad_json", "arguments_key"):
        return 1.0, -3.0
    if mutation == "response_only":
        return 0.0, -3.0
    if mutation == "drop_last_call":  # each kept call matches its identical copy
        return (1.0, -3.0) if n == 1 else (1.0, corr((n - 1) / n + s_max - 1 - (1 + lens[-1])))
    if mutation == "reverse_order":
        return 1.0, (3.0 if gt.calls[::-1] == gt.calls else corr(s_max))
    if mutation == "duplicate_call":
        return 1.0, corr(n / (n + 1) + s_max - 1)
    if mutation == "extra_key" and distinct_names:
        return 1.0, corr(s_max - 1 + lens[0] / (lens[0] + 1))
    if mutation == "change_value" and distinct_names:
        return 1.0, corr(s_max - 1)
    return None


def _check_dataset(gts: list[str]) -> int:
    """Score every mutation of every GT in one batch; check each against its expectation. Returns #pinned."""
    responses, targets, names = [], [], []
    for gt in gts:
        for name, mutate in MUTATIONS.items():
            response = mutate(gt)
            if response is not None:
                responses.append(response)
                targets.append(gt)
                names.append(name)
    batch = score_batch(responses, targets, 1)
    config = RewardConfig()
    lo, hi = config.bounds(1)["total"]
    assert np.all((batch.total >= lo - 1e-9) & (batch.total <= hi + 1e-9))
    pinned = 0
    for i, (gt, name) in enumerate(zip(targets, names)):
        expected = _expected(gt, name)
        is_tool = parse_ground_truth(gt).calls is not None
        max_total = 4.0 if is_tool else 1.0
        if name == "identity":
            assert batch.total[i] == max_total and batch.accuracy[i] == 1.0
        else:
            assert batch.total[i] <= max_total + 1e-9, (name, gt)
        if name in ("drop_last_call", "change_value", "extra_key", "duplicate_call", "bad_json", "arguments_key"):
            assert batch.total[i] < max_total and batch.accuracy[i] == 0.0, (name, gt)  # strictly worse
        if expected is not None:
            pinned += 1
            f, c = expected
            assert batch.format[i] == f, (name, gt)
            assert batch.correctness[i] == pytest.approx(c, abs=1e-12), (name, gt)
            assert batch.total[i] == pytest.approx(f + c, abs=1e-12)
    return pinned


def test_test_split_against_itself_and_mutations(test_split_gts):
    assert len(test_split_gts) == 80
    assert _check_dataset(test_split_gts) > 80 * 8


def test_sft400_against_itself_and_mutations(sft_outputs):
    # 17 SFT outputs mention "<tool_call>" inside <think>; split("<tool_call>")[1] then reads prose, which the
    # original would fail to json.loads as a ground truth (an uncaught exception there; GroundTruthError here).
    usable, unusable = [], []
    for out in sft_outputs:
        think = out.partition("</think>")[0]
        (unusable if "<tool_call>" in think else usable).append(out)
        if "<tool_call>" in think:
            with pytest.raises(GroundTruthError):
                parse_ground_truth(out)
    assert (len(usable), len(unusable)) == (383, 17)
    assert _check_dataset(usable) > 383 * 8

    # As RESPONSES against a clean GT (same calls, placeholder thought) they fail format and correctness.
    clean = ["<think> placeholder </think>\n<tool_call>" + out.rpartition("<tool_call>")[2] for out in unusable]
    batch = score_batch(unusable, clean, 1)
    assert np.all(batch.format == 0.0) and np.all(batch.correctness == -3.0)
