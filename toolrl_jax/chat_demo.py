"""One greedy tool-calling turn of a local model: the quickest check that weights, tokenizer and sampler work."""
from __future__ import annotations

import time

import jax

from toolrl_jax.datasets.format import SYSTEM_FOOTER, SYSTEM_HEADER, format_user, prompt_messages, render_system_prompt
from toolrl_jax.datasets.synthetic import COMPACT_FOOTER, COMPACT_HEADER, TOOLS


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
