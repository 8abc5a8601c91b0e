"""Mesh config, partition rules, and sharded-vs-single-device training parity (8 fake CPU devices in a subprocess,
so this pytest process keeps its own device setup)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from toolrl_jax.sharding import DEFAULT_RULES, MeshConfig, make_mesh, param_shardings, partition_spec, path_to_str

REPO = Path(__file__).resolve().parents[1]
AXIS_SIZES = {"data": 2, "fsdp": 2, "tensor": 2}


def test_mesh_config_resolve():
    assert MeshConfig(2, -1, 2).resolve(8) == (2, 2, 2)
    assert MeshConfig().resolve(4) == (1, 4, 1)
    assert MeshConfig(data=-1, fsdp=1, tensor=1).resolve(3) == (3, 1, 1)
    with pytest.raises(ValueError, match="at most one"):
        MeshConfig(-1, -1, 1).resolve(8)
    with pytest.raises(ValueError, match="needs 8 devices"):
        MeshConfig(2, 2, 2).resolve(4)
    with pytest.raises(ValueError, match="not divisible"):
        MeshConfig(3, -1, 1).resolve(8)
    with pytest.raises(ValueError, match="positive"):
        MeshConfig(0, 1, 1).resolve(1)


def test_make_mesh_single_device():
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    assert mesh.axis_names == ("data", "fsdp", "tensor") and dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    shardings = param_shardings({"layers": {"0": {"mlp": {"up_proj": {"kernel": jax.numpy.zeros((4, 6))}}}}}, mesh)
    assert shardings["layers"]["0"]["mlp"]["up_proj"]["kernel"].spec == P("fsdp", "tensor")


def test_partition_spec_rules_and_fallbacks(caplog):
    assert partition_spec("layers/0/attn/q_proj/kernel", (8, 8), AXIS_SIZES) == P("fsdp", "tensor")
    assert partition_spec("1/inner_state/0/mu/layers/0/attn/o_proj/kernel", (8, 8), AXIS_SIZES) == P("tensor", "fsdp")
    assert partition_spec("embed/embedding", (16, 8), AXIS_SIZES) == P("tensor", "fsdp")
    assert partition_spec("final_norm/scale", (8,), AXIS_SIZES) == P()
    assert partition_spec("1/hyperparams/learning_rate", (), AXIS_SIZES) == P()
    with caplog.at_level(logging.WARNING, logger="toolrl_jax.sharding"):
        assert partition_spec("layers/0/mlp/up_proj/kernel", (8, 3), AXIS_SIZES) == P("fsdp")
        assert partition_spec("layers/0/mlp/up_proj/kernel", (3, 5), AXIS_SIZES) == P()
        assert partition_spec("lm_head/kernel", (8,), AXIS_SIZES) == P()  # rank smaller than the rule
    assert "not divisible" in caplog.text and "rank too small" in caplog.text
    # tuple axes: both sizes multiply
    rules = ((r"w$", P(("data", "fsdp"), None)),)
    assert partition_spec("w", (8, 3), AXIS_SIZES, rules) == P(("data", "fsdp"))
    assert partition_spec("w", (6, 3), AXIS_SIZES, rules) == P()


@pytest.mark.parametrize("tied", [False, True])
def test_rules_cover_every_model_parameter(tied):
    """Every matrix of the real decoder gets a non-replicated spec; vectors follow their rule."""
    from toolrl_jax.models.config import ModelConfig
    from toolrl_jax.models.decoder import CausalLM

    cfg = ModelConfig.tiny(family="qwen2")
    cfg = dataclasses.replace(cfg, tie_word_embeddings=tied)
    state = nnx.state(nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    seen = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = path_to_str(path)
        spec = partition_spec(name, leaf.shape, AXIS_SIZES, DEFAULT_RULES)
        seen[name] = spec
        if leaf.ndim == 2:
            assert len(spec) == 2 and None not in spec, (name, leaf.shape, spec)
    assert seen["layers/0/attn/q_proj/kernel"] == P("fsdp", "tensor")
    assert seen["layers/1/mlp/down_proj/kernel"] == P("tensor", "fsdp")
    assert seen["layers/0/attn/k_proj/bias"] == P("tensor")
    assert seen["embed/embedding"] == P("tensor", "fsdp")
    assert ("lm_head/kernel" in seen) == (not tied)


def test_path_to_str_handles_nnx_and_optax_paths():
    k = jax.tree_util
    path = (k.DictKey("layers"), k.DictKey(0), k.DictKey("attn"), k.GetAttrKey("value"))
    assert path_to_str(path) == "layers/0/attn"
    assert path_to_str((k.SequenceKey(1), k.GetAttrKey("mu"), k.DictKey("w"))) == "1/mu/w"


@pytest.mark.slow
def test_sharded_training_matches_single_device():
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "sharding_worker.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["device_count"] == 8 and out["mesh_shape"] == AXIS_SIZES
    for got, ref in zip(out["losses"], out["ref_losses"]):
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
    assert out["max_param_change"] > 1e-3  # the steps really moved the parameters ...
    assert out["max_param_diff"] < 1e-5  # ... identically on 8 sharded devices and on one
    specs = out["specs"]
    assert specs["q_proj"] == "P('fsdp', 'tensor')" and specs["q_shard_shape"] == [4, 4]
    assert specs["mu_q_proj"] == "P('fsdp', 'tensor')"  # Adam moments sharded like their parameter
    assert specs["o_proj"] == specs["down_proj"] == specs["embedding"] == "P('tensor', 'fsdp')"
    assert specs["lm_head"] == "P('fsdp', 'tensor')" and specs["q_bias"] == "P('tensor',)"
    assert specs["norm"] == specs["adam_count"] == "P()"
    assert specs["odd"] == "P('fsdp',)"  # indivisible tensor dim fell back to replication, no crash
    assert "not divisible" in proc.stderr
    assert out["restore_exact"] and out["restore_shardings_match"]  # checkpoint restore onto the mesh
    assert out["global_batch_equal"] and out["global_batch_shard_shape"] == [2, 3]
