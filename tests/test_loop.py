"""The run loop in the library: TrainLoop's hook order, cadence, deferred metrics and resume (with a toy learner), and
a whole GRPO run through `training.runs.run_grpo` in process (validation, checkpoints, resume, export, a user reward
function)."""
from __future__ import annotations

import json
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

from toolrl_jax.checkpointing import CheckpointConfig, Checkpointer
from toolrl_jax.training.loop import StepOutput, TrainLoop

pytestmark = pytest.mark.usefixtures("compilation_cache")  # the run_grpo tests rebuild the same trainer


class _Data:
    """An EpochCursor-like source: batch k is the integer k; its state is the position."""

    def __init__(self):
        self.position = 0

    def next_batch(self) -> int:
        self.position += 1
        return self.position

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict) -> None:
        self.position = state["position"]


class _Learner:
    """w <- w + batch each step; metrics are device scalars."""

    def __init__(self):
        self.w = jnp.zeros(())
        self.step = 0

    def train_state(self) -> Any:
        return {"w": self.w}

    def load_train_state(self, state: Any, step: int) -> None:
        self.w, self.step = state["w"], step

    def step_fn(self, batch: int, step: int) -> StepOutput:
        self.w = self.w + batch
        self.step = step
        return StepOutput({"w": self.w, "batch": jnp.asarray(batch)}, extras=batch)


def _loop(tmp_path, total: int, events: list, defer: bool = False, learner=None, data=None):
    learner = learner or _Learner()
    data = data or _Data()
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(save_every=2, keep_last=None))
    loop = TrainLoop(learner.step_fn, data, total, state=learner, checkpointer=ckpt, defer_metrics=defer)
    loop.add_hook(lambda step: events.append(("start", step)), at="start")
    loop.add_hook(lambda r: events.append(("metrics", r.step, r.metrics["w"])))
    loop.add_hook(lambda r: events.append(("validate", r.step, float(learner.w))), every=3, needs_state=True,
                  also_last=True)
    loop.add_hook(lambda step: events.append(("end", step)), at="end")
    return loop, learner, ckpt


@pytest.mark.parametrize("defer", [False, True])
def test_hooks_run_in_order_with_their_cadence_and_state_hooks_see_their_steps_weights(tmp_path, defer):
    events = []
    loop, learner, ckpt = _loop(tmp_path, 5, events, defer)
    history = loop.run()
    ckpt.close()
    assert [r.step for r in history] == [1, 2, 3, 4, 5]
    assert [r.metrics["w"] for r in history] == [1.0, 3.0, 6.0, 10.0, 15.0]
    metrics = [e for e in events if e[0] == "metrics"]
    assert metrics == [("metrics", s, w) for s, w in zip(range(1, 6), (1.0, 3.0, 6.0, 10.0, 15.0))]
    # validation on step 3's weights (not step 4's, even when metrics are deferred) and at the last step
    assert [e for e in events if e[0] == "validate"] == [("validate", 3, 6.0), ("validate", 5, 15.0)]
    assert events[0] == ("start", 0) and events[-1] == ("end", 5)
    # a state hook runs after its step's metrics hooks
    assert events.index(("metrics", 3, 6.0)) < events.index(("validate", 3, 6.0))
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [2, 4, 5]


def test_resume_continues_exactly_and_skips_start_hooks(tmp_path):
    straight = []
    loop, _, ckpt = _loop(tmp_path / "a", 5, straight)
    loop.run()
    ckpt.close()

    first, second = [], []
    loop, _, ckpt = _loop(tmp_path / "b", 3, first)  # saves steps 2 and 3
    loop.run()
    ckpt.close()
    loop, learner, ckpt = _loop(tmp_path / "b", 5, second)
    assert loop.restore() == 3 and float(learner.w) == 6.0
    loop.run()
    ckpt.close()
    assert ("start", 0) not in second
    assert [e for e in second if e[0] == "metrics"] == [e for e in straight if e[0] == "metrics"][3:]


def test_a_state_hook_that_fails_leaves_its_step_unsaved(tmp_path):
    learner, data = _Learner(), _Data()
    ckpt = Checkpointer(tmp_path / "ckpt", CheckpointConfig(save_every=1))
    loop = TrainLoop(learner.step_fn, data, 4, state=learner, checkpointer=ckpt)

    def fail_at_2(record):
        if record.step == 2:
            raise RuntimeError("validation service down")

    loop.add_hook(fail_at_2, needs_state=True)
    with pytest.raises(RuntimeError, match="service down"):
        loop.run()
    ckpt.close()
    assert Checkpointer(tmp_path / "ckpt").all_steps() == [1]


def test_bad_hook_arguments_are_refused():
    loop = TrainLoop(lambda b, s: StepOutput({}), _Data(), 1)
    with pytest.raises(ValueError, match="every"):
        loop.add_hook(print, every=0)
    with pytest.raises(ValueError, match="at must be"):
        loop.add_hook(print, at="middle")
    with pytest.raises(ValueError, match="total_steps"):
        TrainLoop(lambda b, s: StepOutput({}), _Data(), 0)


# ---------------------------------------------------------------------------------------------------- run_grpo


def _length_bonus(responses, ground_truths, step):
    """A user reward function: shorter responses score higher (a picklable module-level function)."""
    return [1.0 / (1.0 + len(r)) for r in responses]


def _grpo(tiny_chat_model_dir, run_dir, total_steps: int, resume: bool = False, reward: Any = None,
          export_lora: str = "merged", **overrides):
    from toolrl_jax.datasets.batching import BatchingConfig
    from toolrl_jax.datasets.synthetic import make_synthetic_split
    from toolrl_jax.models.hf_io import load_hf_model
    from toolrl_jax.optim import OptimizerConfig
    from toolrl_jax.tokenization import load_tokenizer
    from toolrl_jax.training.grpo import GRPOConfig
    from toolrl_jax.training.runs import ModelSource, RunConfig, run_grpo

    train, val = make_synthetic_split(8, 2, seed=0)
    fields = dict(prompts_per_step=2, group_size=2, mini_batch_prompts=1, micro_batch_rows=2, max_prompt_length=96,
                  max_response_length=6, total_steps=total_steps, val_every=2,
                  optimizer=OptimizerConfig(learning_rate=1e-3), train_last_layers=1)
    config = GRPOConfig(**{**fields, **overrides})
    run = RunConfig(run_dir=str(run_dir), save_every=1, resume=resume, export_dir=str(run_dir / "export"),
                    export_dtype="float32", export_lora=export_lora, launch_files={"flags.txt": "--test\n"})
    _, model = load_hf_model(tiny_chat_model_dir, dtype="float32")
    source = ModelSource(model, load_tokenizer(tiny_chat_model_dir), tiny_chat_model_dir)
    return run_grpo(source, config, run, train=train, val=val,
                    batching=BatchingConfig(batch_size=1, max_prompt_length=1), reward=reward,
                    shapes={"train_last_layers": 1}, settings={"seed": 0})


def _lines(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith(("time/", "throughput/"))} for r in rows]


@pytest.mark.slow
def test_run_grpo_in_process_validates_checkpoints_resumes_and_exports(tiny_chat_model_dir, tmp_path):
    from safetensors.numpy import load_file

    straight = tmp_path / "straight"
    trainer = _grpo(tiny_chat_model_dir, straight, 3)
    assert trainer.step == 3
    lines = _lines(straight)
    assert [r["step"] for r in lines] == [0, 1, 2, 2, 3, 3]  # validation at 0, 2 and the last step
    assert all("val/total" in r for r in (lines[0], lines[3], lines[5]))
    assert (straight / "export" / "model.safetensors").is_file() and (straight / "run_identity.json").is_file()
    assert (straight / "flags.txt").read_text() == "--test\n"
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        _grpo(tiny_chat_model_dir, straight, 3)  # a fresh start never overwrites a run

    resumed = tmp_path / "resumed"
    _grpo(tiny_chat_model_dir, resumed, 2)
    _grpo(tiny_chat_model_dir, resumed, 3, resume=True)
    assert _lines(resumed) == lines
    assert (resumed / "flags.resume1.txt").is_file()
    a, b = load_file(str(straight / "export" / "model.safetensors")), load_file(str(resumed / "export" /
                                                                                 "model.safetensors"))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)

    # Without the step-0 validation the run trains exactly the same (validation draws from fixed keys of its own).
    late = tmp_path / "late"
    _grpo(tiny_chat_model_dir, late, 3, val_before_train=False)
    assert _lines(late) == lines[1:]


@pytest.mark.slow
def test_run_grpo_logs_every_reward_function_and_its_weighted_total(tiny_chat_model_dir, tmp_path):
    from toolrl_jax.rewards.config import RewardConfig
    from toolrl_jax.rewards.functions import CombinedReward, RewardTerm, toolrl_reward

    reward = CombinedReward([RewardTerm("toolrl", toolrl_reward(RewardConfig()), 1.0),
                             RewardTerm("brevity", _length_bonus, 0.5)])
    trainer = _grpo(tiny_chat_model_dir, tmp_path / "run", 1, reward=reward)
    assert trainer.reward is reward
    (step,) = [r for r in _lines(tmp_path / "run") if r["step"] == 1 and "reward/total" in r]
    for key in ("reward/toolrl/score", "reward/toolrl/format", "reward/brevity/score", "reward/total_std"):
        assert key in step, key
    assert step["reward/total"] == pytest.approx(step["reward/toolrl/score"] + 0.5 * step["reward/brevity/score"])
    sample = json.loads((tmp_path / "run" / "sample_log.jsonl").read_text().splitlines()[0])
    assert {"reward", "toolrl/score", "brevity/score"} <= set(sample)


@pytest.mark.slow
def test_run_grpo_with_lora_checkpoints_adapters_resumes_exactly_and_exports_peft(tiny_chat_model_dir, tmp_path):
    from safetensors.numpy import load_file

    from toolrl_jax.models.lora import LoRAConfig

    lora = dict(lora=LoRAConfig(rank=4, alpha=8.0), train_last_layers=0, kl_coef=0.01, export_lora="peft", val_every=1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _grpo(tiny_chat_model_dir, straight, 2, **lora)
    _grpo(tiny_chat_model_dir, resumed, 1, **lora)
    _grpo(tiny_chat_model_dir, resumed, 2, resume=True, **lora)
    assert _lines(resumed) == _lines(straight)
    a = load_file(str(straight / "export" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "export" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in a)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert any(np.abs(v).max() > 0 for k, v in a.items() if "lora_B" in k), "the adapters trained"
    # A checkpoint holds the adapters and their optimizer state only: far smaller than the model.
    checkpoint_bytes = sum(f.stat().st_size for f in (straight / "checkpoints").rglob("*") if f.is_file())
    assert checkpoint_bytes < (tiny_chat_model_dir / "model.safetensors").stat().st_size / 4
