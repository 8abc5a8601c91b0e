"""Tokenizers and chat templates.

Two jobs live here:

* Using a tokenizer: `load_tokenizer` (a local HF folder, never the hub), `render_chat` / `encode_chat` (the
  tokenizer's own chat template), `family_of` and `stop_token_ids` (which ids end an assistant turn).
* Building one offline: `build_byte_level_bpe` turns a byte-level BPE vocabulary + merges (from a GGUF file or from
  tiktoken ranks) into a `tokenizers.Tokenizer`, and `write_tokenizer_folder` saves it with a tokenizer_config.json
  that transformers' `AutoTokenizer` loads.

Chat "families" are about the turn format, not the architecture: SmolLM2 is a Llama architecture that speaks ChatML.
"""
from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# ----------------------------------------------------------------------------------------------------------------
# Chat families and stop tokens.
# ----------------------------------------------------------------------------------------------------------------

CHAT_FAMILIES = ("qwen2", "llama3", "chatml")

# For each family: (token that must exist and ends a turn, further stop tokens used when the vocabulary has them).
_FAMILY_STOPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "qwen2": ("<|im_end|>", ("<|endoftext|>",)),
    "llama3": ("<|eot_id|>", ("<|end_of_text|>", "<|eom_id|>")),
    "chatml": ("<|im_end|>", ()),
}
_FAMILY_ALIASES = {
    "qwen": "qwen2", "qwen2": "qwen2", "qwen2.5": "qwen2", "qwen3": "qwen2",
    "llama3": "llama3", "llama-3": "llama3", "llama3.1": "llama3", "llama3.2": "llama3",
    "chatml": "chatml", "smollm": "chatml", "smollm2": "chatml",
}
QWEN_ENDOFTEXT_ID = 151643  # "<|endoftext|>" in every Qwen2/2.5/3 vocabulary
LLAMA3_BOS_ID = 128000  # "<|begin_of_text|>"


def load_tokenizer(folder: str | Path):
    """Loads the transformers tokenizer saved in a local `folder` (offline; never contacts the hub)."""
    from transformers import AutoTokenizer

    folder = Path(folder).expanduser()
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder} is not a tokenizer folder (no tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {message!r}")
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a string, got {type(content).__name__}")
        checked.append(dict(message))
    return checked


def render_chat(tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """Renders `messages` with the tokenizer's own chat template (exactly what the model was trained on)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template")
    text = tokenizer.apply_chat_template(
        _check_messages(messages), tools=list(tools) if tools else None, tokenize=False,
        add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):  # defensive: some versions return a list for batched input
        raise TypeError(f"apply_chat_template returned {type(text).__name__}, expected str")
    return text


def encode_chat(tokenizer, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """Token ids of the rendered chat. The template already holds every special token, so none are added."""
    text = render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt, tools=tools)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _token_id(tokenizer, token: str) -> int | None:
    """Id of `token` in the tokenizer's vocabulary (added tokens included), or None when absent."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.token_to_id(token)
    return tokenizer.get_vocab().get(token)


def _family_from_vocab(tokenizer) -> str:
    if _token_id(tokenizer, "<|eot_id|>") is not None:
        return "llama3"
    if _token_id(tokenizer, "<|im_end|>") is not None:
        return "qwen2" if _token_id(tokenizer, "<|endoftext|>") == QWEN_ENDOFTEXT_ID else "chatml"
    raise ValueError(
        f"cannot tell the chat family of tokenizer {getattr(tokenizer, 'name_or_path', '?')!r}: it has neither "
        "<|eot_id|> (Llama-3) nor <|im_end|> (Qwen / ChatML)")


def _family_from_config(config: Any) -> str:
    if isinstance(config, (str, Path)):
        path = Path(config).expanduser()
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    get = config.get if isinstance(config, Mapping) else (lambda key, default=None: getattr(config, key, default))
    arch = get("family", None) or get("model_type", None)
    if arch is None:
        raise ValueError(f"config has neither 'family' nor 'model_type': {config!r}")
    arch = str(arch).lower()
    if arch in ("qwen2", "qwen3"):
        return "qwen2"
    if arch == "llama":
        # A config alone cannot see the vocabulary; Llama-3's is the only >=128k one with bos <|begin_of_text|>.
        vocab_size = int(get("vocab_size", 0) or 0)
        return "llama3" if get("bos_token_id", None) == LLAMA3_BOS_ID or vocab_size >= 128000 else "chatml"
    raise ValueError(f"unsupported model family {arch!r} (expected qwen2 or llama)")


def family_of(obj: Any) -> str:
    """Chat family ("qwen2" | "llama3" | "chatml") of a tokenizer (from its vocabulary: most reliable), a model
    config (ModelConfig, HF config dict, or a folder / config.json path), or a family name / alias."""
    if isinstance(obj, str) and obj.lower() in _FAMILY_ALIASES:
        return _FAMILY_ALIASES[obj.lower()]
    if hasattr(obj, "apply_chat_template") or hasattr(obj, "backend_tokenizer"):
        return _family_from_vocab(obj)
    return _family_from_config(obj)


def stop_token_ids(tokenizer, family: str | None = None) -> tuple[int, ...]:
    """Ids that end an assistant turn: the family's end-of-turn token, its other stop tokens present in the
    vocabulary, and the tokenizer's EOS. `family` may be a chat family, an alias, the architecture name "llama"
    (resolved from the vocabulary, since Llama-3 and SmolLM2 share it), or None (inferred from the vocabulary)."""
    if family is None or str(family).lower() == "llama":
        resolved = _family_from_vocab(tokenizer)
    else:
        resolved = _FAMILY_ALIASES.get(str(family).lower())
        if resolved is None:
            raise ValueError(f"unknown chat family {family!r}; expected one of {CHAT_FAMILIES} (or 'llama')")
    required, optional = _FAMILY_STOPS[resolved]
    ids: list[int] = []
    required_id = _token_id(tokenizer, required)
    if required_id is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no {required} token, so it "
                         f"is not a {resolved!r} tokenizer")
    ids.append(required_id)
    for token in optional:
        token_id = _token_id(tokenizer, token)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in ids:
        ids.append(int(eos))
    return tuple(ids)


# ----------------------------------------------------------------------------------------------------------------
# Building byte-level BPE tokenizers offline.
# ----------------------------------------------------------------------------------------------------------------

# Pre-tokenizer split patterns (standard, published by the model authors).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's `tokenizer.ggml.pre` names -> our pre-tokenizer kinds.
GGUF_PRE_TOKENIZERS = {
    "smollm": "digits+gpt2", "starcoder": "digits+gpt2", "refact": "digits+gpt2",
    "gpt-2": "gpt2", "default": "gpt2",
    "qwen2": "qwen2",
    "llama-bpe": "llama3", "llama3": "llama3",
}
PRE_TOKENIZER_KINDS = ("gpt2", "digits+gpt2", "qwen2", "llama3")


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable unicode character (the byte-level BPE alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def bytes_to_token_string(data: bytes) -> str:
    """The byte-level BPE spelling of raw bytes (e.g. b" the" -> "Ġthe")."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def _pre_tokenizer(kind: str):
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if kind in ("qwen2", "llama3"):
        pattern = QWEN2_PATTERN if kind == "qwen2" else LLAMA3_PATTERN
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"unknown pre-tokenizer kind {kind!r}; expected one of {PRE_TOKENIZER_KINDS}")


@dataclass(frozen=True)
class AddedTokenSpec:
    """A token matched before BPE (never split). `special` ones are skipped by decode(skip_special_tokens=True)."""
    content: str
    id: int
    special: bool = True


def build_byte_level_bpe(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], pre_tokenizer: str,
                         added_tokens: Sequence[AddedTokenSpec] = (), nfc: bool = False,
                         bos_token: str | None = None) -> Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from its vocabulary (byte-level spellings -> id) and ranked merges.

    `pre_tokenizer` is one of PRE_TOKENIZER_KINDS; `nfc` adds NFC normalization (Qwen); `bos_token`, when given, is
    prepended by the post-processor (for models whose GGUF says add_bos_token).
    """
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        raise ValueError("vocabulary ids must be exactly 0..N-1")
    tokenizer = Tokenizer(models.BPE(vocab=dict(vocab), merges=[tuple(m) for m in merges], dropout=None,
                                     unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                                     fuse_unk=False, byte_fallback=False))
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _pre_tokenizer(pre_tokenizer)
    tokenizer.decoder = decoders.ByteLevel()
    if bos_token is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token} $A", pair=f"{bos_token} $A {bos_token} $B:1",
            special_tokens=[(bos_token, vocab[bos_token])])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    # Added tokens must be registered in id order so tokenizers assigns them the ids the model expects.
    for spec in sorted(added_tokens, key=lambda s: s.id):
        token = AddedToken(spec.content, special=spec.special, normalized=False, lstrip=False, rstrip=False,
                           single_word=False)
        if spec.special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
        got = tokenizer.token_to_id(spec.content)
        if got != spec.id:
            raise ValueError(f"added token {spec.content!r} got id {got}, expected {spec.id}")
    return tokenizer


def write_tokenizer_folder(folder: str | Path, tokenizer: Tokenizer, *, added_tokens: Sequence[AddedTokenSpec],
                           chat_template: str | None, bos_token: str | None, eos_token: str | None,
                           pad_token: str | None, unk_token: str | None, model_max_length: int,
                           add_bos_token: bool = False, extra_config: Mapping[str, Any] | None = None) -> Path:
    """Writes tokenizer.json + tokenizer_config.json (loadable by `load_tokenizer`) into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(spec.id): {"content": spec.content, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": spec.special}
            for spec in sorted(added_tokens, key=lambda s: s.id)},
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "unk_token": unk_token,
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length),
        "split_special_tokens": False,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    config.update(extra_config or {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return folder
