"""Logits parity of our Flax NNX decoder against transformers' PyTorch Qwen2/Llama on tiny random checkpoints."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flax import nnx  # noqa: E402

from toolrl_jax.models.config import ModelConfig  # noqa: E402
from toolrl_jax.models.decoder import CausalLM, init_cache, positions_from_segments  # noqa: E402
from toolrl_jax.models.hf_io import load_hf_model, save_hf_model  # noqa: E402

VOCAB = 97

CASES = {
    "qwen2_untied_bias_gqa": ("qwen2", dict(tie_word_embeddings=False)),
    "qwen2_tied": ("qwen2", dict(tie_word_embeddings=True)),
    "llama_tied_llama3_rope": ("llama", dict(
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
        rope_theta=500000.0)),
    "llama_untied_mha": ("llama", dict(tie_word_embeddings=False, num_key_value_heads=4)),
    "llama_attention_bias_headdim": ("llama", dict(attention_bias=True, head_dim=16)),
}


def _hf_model(family: str, overrides: dict, tmp_path):
    base = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    base.update(overrides)
    rope_scaling = base.pop("rope_scaling", None)
    cls_config = transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig
    hf_config = cls_config(**base)
    if rope_scaling is not None:
        hf_config.rope_parameters = {**rope_scaling, "rope_theta": base.get("rope_theta", 10000.0)}
    torch.manual_seed(0)
    cls_model = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM
    model = cls_model(hf_config).eval().float()
    with torch.no_grad():  # random non-trivial norms and biases so every parameter matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    return model, folder


def _torch_logits(model, ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attention_mask))
    return out.logits.float().numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    family, overrides = CASES[case]
    hf_model, folder = _hf_model(family, overrides, tmp_path)
    config, model = load_hf_model(folder, dtype="float32", param_dtype="float32")
    assert config.family == family
    assert config.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, size=(2, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    ref = _torch_logits(hf_model, ids, mask)
    seg = jnp.asarray(mask)
    ours, _ = model(jnp.asarray(ids), positions_from_segments(seg), seg)
    np.testing.assert_array_less(np.abs(np.asarray(ours) - ref).max(), 1e-4)


def test_left_padded_batch_matches_unpadded_rows(tmp_path):
    """Left padding must not change the logits of the real tokens (mask + positions handled)."""
    hf_model, folder = _hf_model("qwen2", {}, tmp_path)
    _, model = load_hf_model(folder, dtype="float32")
    rng = np.random.default_rng(1)
    lengths = [12, 7]
    width = max(lengths)
    ids = np.zeros((2, width), np.int32)
    seg = np.zeros((2, width), np.int32)
    rows = [rng.integers(3, VOCAB, size=n).astype(np.int32) for n in lengths]
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        seg[i, width - len(row):] = 1
    logits, _ = model(jnp.asarray(ids), positions_from_segments(jnp.asarray(seg)), jnp.asarray(seg))
    for i, row in enumerate(rows):
        ref = _torch_logits(hf_model, row[None], np.ones((1, len(row)), np.int64))[0]
        np.testing.assert_allclose(np.asarray(logits[i, width - len(row):]), ref, atol=1e-4, rtol=0)


def test_packed_segments_are_isolated(tmp_path):
    """Two sequences packed in one row (segment ids 1 and 2) give the same logits as run separately."""
    hf_model, folder = _hf_model("llama", {}, tmp_path)
    _, model = load_hf_model(folder, dtype="float32")
    rng = np.random.default_rng(2)
    a, b = rng.integers(3, VOCAB, size=9), rng.integers(3, VOCAB, size=6)
    ids = jnp.asarray(np.concatenate([a, b, [0, 0]])[None].astype(np.int32))
    seg = jnp.asarray(np.array([[1] * 9 + [2] * 6 + [0, 0]], np.int32))
    logits, _ = model(ids, positions_from_segments(seg), seg)
    for row, sl in ((a, slice(0, 9)), (b, slice(9, 15))):
        ref = _torch_logits(hf_model, row[None], np.ones((1, len(row)), np.int64))[0]
        np.testing.assert_allclose(np.asarray(logits[0, sl]), ref, atol=1e-4, rtol=0)


def test_kv_cache_prefill_then_decode_matches_full_forward():
    config = ModelConfig.tiny("qwen2")
    model = CausalLM(config, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(3)
    ids = jnp.asarray(rng.integers(3, config.vocab_size, size=(2, 10)).astype(np.int32))
    seg = jnp.asarray(np.array([[0, 0, 0] + [1] * 7, [1] * 10], np.int32))
    pos = positions_from_segments(seg)
    full, _ = model(ids, pos, seg)
    cache = init_cache(config, batch=2, max_len=16)
    prefill, cache = model(ids[:, :6], pos[:, :6], seg[:, :6], cache=cache)
    steps = [prefill]
    for t in range(6, 10):
        step_logits, cache = model(ids[:, t:t + 1], pos[:, t:t + 1], seg[:, t:t + 1], cache=cache)
        steps.append(step_logits)
    incremental = jnp.concatenate(steps, axis=1)
    valid = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(incremental)[valid], np.asarray(full)[valid], atol=1e-5, rtol=0)
    assert int(cache.index) == 10


def test_save_load_round_trip_and_transformers_reads_our_export(tmp_path):
    for family in ("qwen2", "llama"):
        config = ModelConfig.tiny(family, vocab_size=VOCAB)
        model = CausalLM(config, rngs=nnx.Rngs(4))
        out = save_hf_model(model, tmp_path / family, dtype="float32", max_shard_bytes=20_000)
        assert (out / "model.safetensors.index.json").is_file(), "small shard limit must produce an index"
        _, reloaded = load_hf_model(out, dtype="float32")
        before = nnx.to_flat_state(nnx.state(model, nnx.Param))
        after = dict(nnx.to_flat_state(nnx.state(reloaded, nnx.Param)))
        for path, var in before:
            np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(after[path][...]))
        # transformers loads the export and computes the same logits.
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ids = np.arange(3, 23, dtype=np.int32)[None]
        ref = _torch_logits(hf, ids, np.ones_like(ids))
        seg = jnp.ones_like(jnp.asarray(ids))
        ours, _ = model(jnp.asarray(ids), positions_from_segments(seg), seg)
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
        assert json.loads((out / "config.json").read_text())["model_type"] == family


def test_bf16_compute_stays_close_to_fp32(tmp_path):
    config = ModelConfig.tiny("llama")
    model32 = CausalLM(config, rngs=nnx.Rngs(5))
    model16 = CausalLM(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(5))
    ids = jnp.asarray(np.arange(3, 19, dtype=np.int32)[None])
    seg = jnp.ones_like(ids)
    a, _ = model32(ids, positions_from_segments(seg), seg)
    b, _ = model16(ids, positions_from_segments(seg), seg)
    assert b.dtype == jnp.float32
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(a))
    assert 0 < rel < 2e-2


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_gives_identical_gradients(policy):
    config = ModelConfig.tiny("qwen2")
    ids = jnp.asarray(np.arange(3, 15, dtype=np.int32)[None])
    seg = jnp.ones_like(ids)
    pos = positions_from_segments(seg)

    def grads(cfg):
        model = CausalLM(cfg, rngs=nnx.Rngs(6))

        def loss(m):
            logits, _ = m(ids, pos, seg)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 5])

        return nnx.grad(loss)(model)

    plain, remat = grads(config), grads(config.replace(remat=True, remat_policy=policy))
    for (p, a), (_, b) in zip(nnx.to_flat_state(plain), nnx.to_flat_state(remat)):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), atol=1e-6, err_msg=str(p))


def test_config_reads_presets_and_rejects_unknown(tmp_path):
    from toolrl_jax.models.config import PRESETS

    q = PRESETS["qwen2.5-1.5b"]
    assert 1.4e9 < q.num_params < 1.7e9
    assert 3.0e9 < PRESETS["qwen2.5-3b"].num_params < 3.2e9
    assert 1.1e9 < PRESETS["llama-3.2-1b"].num_params < 1.3e9
    round_trip = ModelConfig.from_hf(q.to_hf_dict())
    assert round_trip.replace(dtype=q.dtype) == q
    llama = PRESETS["llama-3.2-3b"]
    assert ModelConfig.from_hf(llama.to_hf_dict()).rope_scaling == llama.rope_scaling
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    (tmp_path / "config.json").write_text(json.dumps({**q.to_hf_dict(), "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf(tmp_path)


def test_unknown_remat_policy_is_refused():
    with pytest.raises(ValueError, match="remat_policy"):
        ModelConfig.tiny("qwen2", remat_policy="dots_everywhere")
