"""Sharded sampling on 8 fake CPU devices (data x fsdp x tensor mesh) equals single-device sampling.

XLA_FLAGS must be set before jax initialises, so the check runs in a fresh Python subprocess.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import jax, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from toolrl_jax.models.config import ModelConfig
    from toolrl_jax.models.decoder import CausalLM
    from toolrl_jax.sampling import Sampler, SamplingConfig

    assert jax.device_count() == 8, jax.devices()
    model = CausalLM(ModelConfig.tiny("qwen2"), rngs=nnx.Rngs(0))
    prompts = [[5, 17, 33, 9], [40, 41, 42, 43, 44, 45, 46], [77], [3, 4, 5], [90, 91]]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=6)
    sampled = SamplingConfig(temperature=1.0, top_k=40, group_size=2, max_new_tokens=6)
    single = Sampler(model, pad_id=0, stop_token_ids=(2,), engine="static")
    want = [single.generate(prompts, cfg, 3) for cfg in (greedy, sampled)]

    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    def place(x):  # tensor-parallel / fsdp weights: shard each dimension that divides evenly
        axes = [a if i < x.ndim and x.shape[i] % mesh.shape[a] == 0 else None
                for i, a in enumerate(("fsdp", "tensor"))][:x.ndim]
        return jax.device_put(x, NamedSharding(mesh, P(*axes)))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(place, state)
    sharded_model = nnx.merge(graphdef, state)
    assert any(len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated
               for x in jax.tree.leaves(state))
    sharded = Sampler(sharded_model, pad_id=0, stop_token_ids=(2,), mesh=mesh, engine="static")
    assert sharded.sharding.batch_axes == ("data", "fsdp") and sharded.sharding.head_axis == "tensor"
    got = [sharded.generate(prompts, cfg, 3) for cfg in (greedy, sampled)]
    # The continuous engine on the mesh: 4 slots (one per data-parallel shard), refilled one prompt at a time.
    continuous = Sampler(sharded_model, pad_id=0, stop_token_ids=(2,), mesh=mesh, slots=4, refill_prompts=1,
                         min_decode_window=8)
    for cfg in (greedy, sampled):
        got.append(continuous.generate(prompts, cfg, 3))
        assert continuous._continuous.last_stats.inserts >= 2, continuous._continuous.last_stats
    assert any(sig[-1].window for sig in continuous.traces if sig[0] == "decode")  # attention windows on the mesh
    # 16 slots on the mesh: refills, then the drain's compactions (16 -> 8 -> 4 slots) gather sharded slot states.
    drained = Sampler(sharded_model, pad_id=0, stop_token_ids=(2,), mesh=mesh, slots=16, refill_prompts=2,
                      min_decode_window=8)
    more = prompts * 2
    want_more = single.generate(more, sampled, 3)
    got_more = drained.generate(more, sampled, 3)
    assert drained._continuous.last_stats.compactions >= 1, drained._continuous.last_stats
    want, got = want + want + [want_more], got + [got_more]
    for w, g in zip(want, got):
        np.testing.assert_array_equal(g.response_ids, w.response_ids)
        np.testing.assert_array_equal(g.lengths, w.lengths)
        np.testing.assert_allclose(g.logprobs, w.logprobs, atol=1e-5)
        np.testing.assert_array_equal(g.prompt_ids, w.prompt_ids)
    # Multi-turn KV reuse on the mesh: a second turn continues the sharded session's cache and samples what the
    # single-device static engine samples from the whole conversation.
    from toolrl_jax.sampling.sessions import SessionGenerator
    turn = SamplingConfig(temperature=1.0, top_k=40, max_new_tokens=6)
    session = SessionGenerator(sharded, turn)
    rows = [(i, 1) for i in range(len(prompts))]
    conversation = prompts
    for t in range(2):
        outs = session(conversation, [6] * len(rows), jax.random.key(t), rows)
        ref = single.generate(conversation, turn, jax.random.key(t), prompt_numbers=[r[0] for r in rows],
                              sample_numbers=[r[1] for r in rows])
        for i, o in enumerate(outs):
            np.testing.assert_array_equal(o.token_ids, ref.response_ids[i, :ref.lengths[i]])
            np.testing.assert_allclose(o.logprobs, ref.logprobs[i, :ref.lengths[i]], atol=1e-5)
        conversation = [c + o.token_ids.tolist() + [7, 8] for c, o in zip(conversation, outs)]
    assert (session.new_sessions, session.continued_calls) == (1, 1)
    assert session.session.cache.keys[0].sharding.is_equivalent_to(sharded.sharding.kv(), 4)
    # The 5 prompts were padded to a batch of 8 (a multiple of the 4-way data parallelism), and the kernel's
    # outputs are batch-sharded across the mesh.
    assert {sig[0] for sig in sharded.traces if sig[0] not in ("start", "continue")} == {(8, 32)}, sharded.traces
    ids = np.zeros((8, 32), np.int32); seg = np.ones((8, 32), np.int32)
    out = sharded._generate(sharded._state, sharded._place(ids), sharded._place(seg),
                            sharded._place(np.arange(8, dtype=np.int32)), sharded._place(np.zeros(8, np.int32)),
                            sharded._place(np.full(8, 6, np.int32)),
                            jax.random.key(0), np.float32(0),
                            np.float32(1), spec=next(iter(sharded.traces))[1])
    assert out["tokens"].sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"), None)), 2), \\
        out["tokens"].sharding
    print("SHARDED_OK")
""")


@pytest.mark.slow
def test_sharded_greedy_and_sampled_equal_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stdout[-3000:] + result.stderr[-6000:]
