"""Correctness of the rollout sampler against full (cache-free) forwards of the same tiny model (float32, CPU)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from toolrl_jax.models.config import ModelConfig
from toolrl_jax.models.decoder import CausalLM, positions_from_segments
from toolrl_jax.sampling import SampleOutput, Sampler, SamplingConfig
from toolrl_jax.sampling.config import batch_bucket, prompt_length_bucket

PAD = 0
PROMPTS = [[5, 17, 33, 9], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [77]]


def _model(family: str = "qwen2", seed: int = 0, sharpen: float = 1.0) -> CausalLM:
    """A tiny float32 model; `sharpen` scales the final norm so logits are peaked like a trained model's."""
    model = CausalLM(ModelConfig.tiny(family), rngs=nnx.Rngs(seed))
    if sharpen != 1.0:
        model.final_norm.scale[...] = model.final_norm.scale[...] * sharpen
    return model


@pytest.fixture(scope="module")
def greedy_setup():
    model = _model("qwen2", seed=0)
    sampler = Sampler(model, pad_id=PAD, stop_token_ids=(), engine="static")
    out = sampler.generate(PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=8), key=0)
    return model, sampler, out


@pytest.fixture(scope="module")
def sharp_sampler():
    model = _model("llama", seed=1, sharpen=10.0)
    return model, Sampler(model, pad_id=PAD, stop_token_ids=())


_FORWARDS: dict = {}


def _forward(model: CausalLM, ids: np.ndarray, seg: np.ndarray) -> np.ndarray:
    """Cache-free logits [B, T, V] from a jitted forward (eager mode would compile every op for every shape)."""
    graphdef, state = nnx.split(model)
    if graphdef not in _FORWARDS:
        _FORWARDS[graphdef] = jax.jit(
            lambda st, i, s: nnx.merge(graphdef, st)(i, positions_from_segments(s), s)[0])
    return np.asarray(_FORWARDS[graphdef](state, jnp.asarray(ids, jnp.int32), jnp.asarray(seg, jnp.int32)))


def _last_logits(model: CausalLM, sequences: list[list[int]], width: int = 32) -> np.ndarray:
    """Logits after the last token of each (unpadded) sequence, via one left-padded batch of fixed width."""
    ids = np.zeros((len(sequences), width), np.int32)
    seg = np.zeros_like(ids)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):], seg[i, width - len(s):] = s, 1
    return _forward(model, ids, seg)[:, -1]


def _teacher_forced_logits(model: CausalLM, out: SampleOutput) -> np.ndarray:
    """[N, R, V] logits predicting each response token, from one cache-free forward over prompt + response."""
    logits = _forward(model, out.sequence_ids, out.sequence_mask)
    p = out.prompt_ids.shape[1]
    return logits[:, p - 1:p - 1 + out.response_ids.shape[1]]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _tempered_reference(logits: np.ndarray, token: int, temperature: float, top_k: int, top_p: float) -> float:
    """Log-prob of `token` under HF-style temperature -> top-k -> top-p filtering, in numpy float64."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    zs = z[order]
    keep = np.ones_like(zs, bool)
    if top_k:
        keep[top_k:] = False
    if top_p < 1:
        probs = np.exp(_log_softmax(np.where(keep, zs, -np.inf)))
        keep &= (np.cumsum(probs) - probs) < top_p
    lp = _log_softmax(np.where(keep, zs, -np.inf))
    return float(lp[np.flatnonzero(order == token)[0]])


# ---------------------------------------------------------------------------------------------- configuration
@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(group_size=0), "group_size"),
    (dict(prompt_length_buckets=(64, 32)), "prompt_length_buckets"), (dict(batch_buckets=()), "batch_buckets"),
    (dict(stop_token_ids=(-3,)), "stop_token_ids"), (dict(top_k=2.5), "top_k"), (dict(prefill_chunk=0), "prefill"),
])
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        SamplingConfig(**bad)


def test_buckets():
    cfg = SamplingConfig(min_prompt_bucket=16)
    assert [prompt_length_bucket(n, cfg) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
    listed = SamplingConfig(prompt_length_buckets=[24, 48])
    assert listed.prompt_length_buckets == (24, 48)
    assert prompt_length_bucket(30, listed) == 48
    with pytest.raises(ValueError, match="longer than the largest prompt_length_bucket"):
        prompt_length_bucket(49, listed)
    assert [batch_bucket(n, SamplingConfig(max_prompts_per_batch=48)) for n in (1, 3, 33, 48)] == [1, 4, 48, 48]
    assert batch_bucket(3, SamplingConfig(batch_buckets=(8, 16))) == 8
    assert batch_bucket(3, SamplingConfig(), multiple_of=8) == 8
    assert SamplingConfig(batch_buckets=(8, 16)).prompts_per_batch == 16
    # Listed buckets a prompt could not be prefilled in whole chunks of are refused up front, not at that prompt.
    with pytest.raises(ValueError, match=r"prompt_length_buckets \[576\] are longer than prefill_chunk \(512\)"):
        SamplingConfig(prompt_length_buckets=(256, 384, 576))
    assert SamplingConfig(prompt_length_buckets=(256, 384, 576), prefill_chunk=64).prefill_chunk == 64


def test_bad_prompts_give_clear_errors(greedy_setup):
    _, sampler, _ = greedy_setup
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=4)
    with pytest.raises(ValueError, match="prompt 1 has token ids outside"):
        sampler.generate([[3, 4], [5, 500]], cfg, 0)
    with pytest.raises(ValueError, match="prompt 0 must be a non-empty"):
        sampler.generate([[]], cfg, 0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sampler.generate([[3] * 10], cfg.replace(max_new_tokens=510), 0)
    with pytest.raises(ValueError, match="top_k"):
        sampler.generate([[3]], cfg.replace(top_k=128), 0)


# ---------------------------------------------------------------------------------------------- greedy decoding
def test_greedy_equals_stepwise_argmax_of_full_forward(greedy_setup):
    model, _, out = greedy_setup
    assert out.response_ids.shape == (3, 8) and out.prompt_ids.shape == (3, 32)
    sequences = [list(p) for p in PROMPTS]
    for step in range(8):  # grow every sequence by the argmax of a full forward over it
        logits = _last_logits(model, sequences)
        tokens = logits.argmax(-1)
        np.testing.assert_array_equal(out.response_ids[:, step], tokens, err_msg=f"step {step}")
        np.testing.assert_allclose(out.logprobs[:, step], _log_softmax(logits)[np.arange(3), tokens], atol=1e-4)
        for seq, token in zip(sequences, tokens):
            seq.append(int(token))
    np.testing.assert_array_equal(out.lengths, [8, 8, 8])
    assert not out.stopped.any() and out.response_mask.all()
    # Outputs are left-padded prompts with a 0/1 mask.
    np.testing.assert_array_equal(out.prompt_mask.sum(1), [len(p) for p in PROMPTS])
    np.testing.assert_array_equal(out.prompt_ids[1, -11:], PROMPTS[1])
    assert (out.prompt_ids[out.prompt_mask == 0] == PAD).all()


def test_padding_and_buckets_do_not_change_results(greedy_setup):
    """Other length buckets, batch buckets and chunkings give the same tokens, greedy and sampled."""
    _, sampler, _ = greedy_setup
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=6, group_size=2)
    a = sampler.generate(PROMPTS, cfg, jax.random.key(3))
    b = sampler.generate(PROMPTS, cfg.replace(prompt_length_buckets=(12, 64), batch_buckets=(1,)),
                         jax.random.key(3))
    assert (a.prompt_ids.shape[1], b.prompt_ids.shape[1]) == (32, 12)
    np.testing.assert_array_equal(a.response_ids, b.response_ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    np.testing.assert_array_equal(a.prompt_ids[:, -12:], b.prompt_ids)
    # A prefill in 4 chunks of 8 tokens (a loop over the cache) equals the one-pass prefill.
    c = sampler.generate(PROMPTS, cfg.replace(prefill_chunk=8), jax.random.key(3))
    np.testing.assert_array_equal(c.response_ids, a.response_ids)
    np.testing.assert_allclose(c.logprobs, a.logprobs, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of SamplingConfig.prefill_chunk"):
        sampler.generate(PROMPTS, cfg.replace(prefill_chunk=5), 0)


def test_stop_token_truncates_exactly(greedy_setup):
    """Make the token greedy decoding emits at step k of row 0 a stop token: rows end right there."""
    model, _, free = greedy_setup
    row0 = free.response_ids[0].tolist()
    k = next(i for i in range(1, 8) if row0[i] not in row0[:i])
    stop = row0[k]

    class FakeTokenizer:
        def decode(self, ids, skip_special_tokens=True):
            assert skip_special_tokens is False
            return " ".join(f"<{t}>" for t in ids)

    sampler = Sampler(model, pad_id=PAD, stop_token_ids=(stop,), tokenizer=FakeTokenizer())
    out = sampler.generate(PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=8), 0)
    for i in range(3):
        free_row = free.response_ids[i].tolist()
        end = free_row.index(stop) + 1 if stop in free_row else 8
        assert out.lengths[i] == end
        assert out.stopped[i] == (stop in free_row)
        np.testing.assert_array_equal(out.response_ids[i, :end], free_row[:end])
        assert (out.response_ids[i, end:] == PAD).all()
        np.testing.assert_array_equal(out.response_mask[i], np.arange(8) < end)
        np.testing.assert_allclose(out.logprobs[i, :end], free.logprobs[i, :end], atol=1e-5)
        assert (out.logprobs[i, end:] == 0).all()
        shown = free_row[:end - 1] if out.stopped[i] else free_row[:end]
        assert out.texts[i] == " ".join(f"<{t}>" for t in shown)
    assert out.lengths[0] == k + 1 and out.stopped[0]
    # ignore_stop generates through stop tokens (benchmarks force the full budget this way).
    forced = sampler.generate(PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=8, ignore_stop=True), 0)
    np.testing.assert_array_equal(forced.response_ids, free.response_ids)


def test_top_k_one_and_tiny_top_p_equal_greedy(sharp_sampler):
    _, sampler = sharp_sampler
    greedy = sampler.generate(PROMPTS, SamplingConfig(temperature=0.0, max_new_tokens=6), 0)
    for cfg in (SamplingConfig(temperature=1.3, top_k=1, max_new_tokens=6),
                SamplingConfig(temperature=1.3, top_p=1e-6, max_new_tokens=6)):
        out = sampler.generate(PROMPTS, cfg.replace(tempered_logprobs=True), 5)
        np.testing.assert_array_equal(out.response_ids, greedy.response_ids)
        np.testing.assert_allclose(out.logprobs, greedy.logprobs, atol=1e-5)
        np.testing.assert_allclose(out.tempered_logprobs, 0.0, atol=1e-6)  # a point mass


def test_decode_loop_updates_the_kv_cache_in_place(greedy_setup):
    """The compiled program decodes in a while loop and never copies a KV-cache buffer (updates are in place)."""
    _, sampler, _ = greedy_setup
    (shape, spec), = [k for k in sampler.traces if k[1].greedy and k[1].max_new_tokens == 8 and k[0] == (4, 32)]
    ids = np.zeros(shape, np.int32)
    hlo = sampler._generate.lower(sampler._state, ids, ids, np.arange(4, dtype=np.int32), np.zeros(4, np.int32),
                                  np.full(4, 8, np.int32),
                                  jax.random.key(0),
                                  np.float32(0), np.float32(1), spec=spec).compile().as_text()
    cache_shape = "f32[4,40,2,8]"  # [rows, prompt bucket + budget, kv heads, head dim]
    assert " while(" in hlo and cache_shape in hlo
    copies = [line for line in hlo.splitlines()
              if cache_shape in line.split("=", 1)[-1][:40] and re.search(r"\b(copy|copy-start)\(", line)]
    assert not copies, copies[:3]


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("cfg", [
    SamplingConfig(temperature=0.7, top_k=20, top_p=0.8, group_size=3, max_new_tokens=7, tempered_logprobs=True),
    SamplingConfig(temperature=1.0, top_p=0.9, group_size=2, max_new_tokens=7, tempered_logprobs=True),
], ids=["topk_topp_t0.7", "topp_only"])
def test_sampled_logprobs_match_teacher_forcing(sharp_sampler, cfg):
    """Returned log-probs equal a cache-free forward over the sampled sequence; tempered ones match a numpy
    reimplementation of the filters, so every sampled token lies inside the filtered support."""
    model, sampler = sharp_sampler
    out = sampler.generate(PROMPTS, cfg, jax.random.key(11))
    n = cfg.group_size
    assert out.response_ids.shape == (3 * n, 7)
    np.testing.assert_array_equal(out.prompt_index, np.repeat(np.arange(3), n))
    for i, prompt in enumerate(PROMPTS):  # samples of a prompt share it
        rows = out.prompt_ids[i * n:(i + 1) * n]
        assert (rows == rows[0]).all() and rows[0, -len(prompt):].tolist() == prompt
    logits = _teacher_forced_logits(model, out)
    ref = np.take_along_axis(_log_softmax(logits), out.response_ids[..., None], -1)[..., 0]
    mask = out.response_mask.astype(bool)
    np.testing.assert_allclose(out.logprobs[mask], ref[mask], atol=1e-4)
    for r, j in zip(*np.nonzero(mask)):
        want = _tempered_reference(logits[r, j], int(out.response_ids[r, j]), cfg.temperature, cfg.top_k, cfg.top_p)
        np.testing.assert_allclose(out.tempered_logprobs[r, j], want, atol=1e-4, err_msg=f"row {r} step {j}")
    assert (out.tempered_logprobs >= out.logprobs - 1e-5)[mask].mean() > 0.5  # filtering concentrates mass


def test_same_key_same_samples_rows_independent(sharp_sampler):
    _, sampler = sharp_sampler
    # Same static spec as the "topp_only" case above (temperature and top_p values are traced): no new compile.
    cfg = SamplingConfig(temperature=1.5, top_p=0.9, group_size=2, max_new_tokens=7)
    a = sampler.generate(PROMPTS, cfg, jax.random.key(7))
    b = sampler.generate(PROMPTS, cfg, jax.random.key(7))
    c = sampler.generate(PROMPTS, cfg, jax.random.key(8))
    np.testing.assert_array_equal(a.response_ids, b.response_ids)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.response_ids != c.response_ids).any()
    for i in range(3):  # the samples of one prompt are distinct draws
        assert (a.response_ids[2 * i] != a.response_ids[2 * i + 1]).any()


# ---------------------------------------------------------------------------------------------- compilation
def test_one_compile_per_bucket_and_weight_updates_do_not_recompile():
    model = _model("qwen2", seed=2)
    sampler = Sampler(model, pad_id=PAD, stop_token_ids=(2,), engine="static")
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=4, batch_buckets=(4,), min_prompt_bucket=16)
    rng = np.random.default_rng(0)

    def prompts(count, length):
        return [rng.integers(3, 128, size=length).tolist() for _ in range(count)]

    sampler.generate(prompts(3, 5), cfg, 0)
    assert sampler.compile_count == 1
    sampler.generate(prompts(4, 16), cfg.replace(temperature=0.5, top_p=1.0), 1)  # same buckets, new values
    sampler.generate(prompts(9, 7), cfg, 2)  # chunks of 4, 4 and a padded partial 1
    assert sampler.compile_count == 1
    sampler.generate(prompts(2, 17), cfg, 3)  # prompt bucket 32
    assert sampler.compile_count == 2
    assert all(count == 1 for count in sampler.traces.values())
    # New weights of the same shapes: no recompilation, and the outputs follow the new weights.
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=4, batch_buckets=(4,), min_prompt_bucket=16)
    before = sampler.generate(PROMPTS, greedy, 0)
    other = _model("qwen2", seed=3)
    sampler.update_params(nnx.state(other))
    after = sampler.generate(PROMPTS, greedy, 0)
    assert sampler.compile_count == 3  # only the greedy variant was new
    sequences = [list(p) for p in PROMPTS]
    for step in range(4):
        tokens = _last_logits(other, sequences).argmax(-1)
        np.testing.assert_array_equal(after.response_ids[:, step], tokens)
        for seq, token in zip(sequences, tokens):
            seq.append(int(token))
    assert (after.response_ids != before.response_ids).any()
    with pytest.raises(ValueError, match="structure"):
        sampler.update_params(nnx.state(_model("llama", seed=0)))
