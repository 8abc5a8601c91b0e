"""toolrl_jax.chat_demo / experiments.demo: the README's first command (greedy tool-calling chat) on the embedded
SmolLM2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from toolrl_jax.chat_demo import run_demo

REPO = Path(__file__).resolve().parents[1]


def test_demo_answers_with_the_sampler_and_parses(tiny_chat_model_dir):
    out = run_demo(str(tiny_chat_model_dir), ["get_weather"], "Weather in Rome?", max_new_tokens=5)
    assert 1 <= out["new_tokens"] <= 5 and out["prompt_tokens"] > 50
    assert "get_weather" in out["messages"][0]["content"] and "Weather in Rome?" in out["messages"][1]["content"]
    assert out["tool_calls"] is None  # a random tiny model emits no <tool_call> block
    with pytest.raises(ValueError, match="unknown tool"):
        run_demo(str(tiny_chat_model_dir), ["no_such_tool"], "hi")


@pytest.mark.slow
def test_demo_cli_on_smollm2(smollm2_dir):
    proc = subprocess.run([sys.executable, "-m", "experiments.demo", f"--model={smollm2_dir}", "--max_new_tokens=24",
                           "--question=What is the capital of France?", "--tools=get_weather"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    answer = proc.stdout.split("assistant (", 1)[1]
    assert "Paris" in answer, proc.stdout
