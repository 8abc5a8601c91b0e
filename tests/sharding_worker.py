"""Helper for tests/test_sharding.py, run in a SUBPROCESS with 8 fake CPU devices (not collected by pytest).

Trains a tiny decoder-shaped parameter tree for a few AdamW steps on one device and on a (2 data x 2 fsdp x 2 tensor)
mesh, and prints one JSON line with the measured differences and shardings; the test asserts on them.
"""
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

T0 = time.perf_counter()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from toolrl_jax.optim import OptimizerConfig, apply_gradients, make_optimizer  # noqa: E402
from toolrl_jax.placement import Placement  # noqa: E402
from toolrl_jax.sharding import DEFAULT_RULES, MeshConfig, make_mesh  # noqa: E402

V, H, F, NH, NKV, D = 16, 8, 12, 2, 1, 4
RULES = ((r"odd/kernel$", P("fsdp", "tensor")),) + DEFAULT_RULES  # [H, 3]: 3 is not divisible by tensor=2


def init_params(key):
    ks = iter(jax.random.split(key, 16))
    n = lambda shape: 0.3 * jax.random.normal(next(ks), shape, jnp.float32)  # noqa: E731
    layer = {
        "input_norm": {"scale": 1.0 + n((H,))},
        "attn": {"q_proj": {"kernel": n((H, NH * D)), "bias": n((NH * D,))},
                 "k_proj": {"kernel": n((H, NKV * D))},  # a key bias has zero true gradient (softmax shift)
                 "v_proj": {"kernel": n((H, NKV * D)), "bias": n((NKV * D,))},
                 "o_proj": {"kernel": n((NH * D, H))}},
        "post_attn_norm": {"scale": 1.0 + n((H,))},
        "mlp": {"gate_proj": {"kernel": n((H, F))}, "up_proj": {"kernel": n((H, F))},
                "down_proj": {"kernel": n((F, H))}},
    }
    return {"embed": {"embedding": n((V, H))}, "layers": {"0": layer}, "final_norm": {"scale": 1.0 + n((H,))},
            "odd": {"kernel": n((H, 3))}, "lm_head": {"kernel": n((H, V))}}


def rms(x, scale):
    return scale * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def loss_fn(p, batch):
    ids, targets, mask = batch["ids"], batch["targets"], batch["mask"]
    x = p["embed"]["embedding"][ids]
    b, t = ids.shape
    for layer in p["layers"].values():
        a = layer["attn"]
        h = rms(x, layer["input_norm"]["scale"])
        q = (h @ a["q_proj"]["kernel"] + a["q_proj"]["bias"]).reshape(b, t, NH, D)
        k = (h @ a["k_proj"]["kernel"]).reshape(b, t, NKV, D)
        v = (h @ a["v_proj"]["kernel"] + a["v_proj"]["bias"]).reshape(b, t, NKV, D)
        k, v = jnp.repeat(k, NH // NKV, 2), jnp.repeat(v, NH // NKV, 2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v).reshape(b, t, NH * D)
        x = x + o @ a["o_proj"]["kernel"]
        m = layer["mlp"]
        h = rms(x, layer["post_attn_norm"]["scale"])
        x = x + (jax.nn.silu(h @ m["gate_proj"]["kernel"]) * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
    h = rms(x, p["final_norm"]["scale"])
    logits = (h @ p["lm_head"]["kernel"]).at[..., :3].add(h @ p["odd"]["kernel"])
    logp = jax.nn.log_softmax(logits, -1)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    return jnp.sum(nll * mask) / jnp.sum(mask)


def main():
    out = {"device_count": jax.device_count()}
    cfg = OptimizerConfig(learning_rate=1e-3, weight_decay=0.01, max_grad_norm=1.0)
    opt = make_optimizer(cfg)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        params, opt_state, metrics = apply_gradients(opt, cfg, grads, opt_state, params)
        return params, opt_state, loss, metrics["grad_norm"]

    rng = np.random.default_rng(0)
    batches = [{"ids": rng.integers(0, V, (8, 6)).astype(np.int32),
                "targets": rng.integers(0, V, (8, 6)).astype(np.int32),
                "mask": (np.arange(6)[None] < rng.integers(2, 7, (8, 1))).astype(np.float32)} for _ in range(3)]
    params0 = init_params(jax.random.key(0))

    # reference: one device
    out["t_setup"] = time.perf_counter() - T0
    single = jax.jit(train_step)
    p, s = params0, opt.init(params0)
    ref_losses = []
    for batch in batches:
        p, s, loss, _ = single(p, s, batch)
        ref_losses.append(float(loss))
    ref_params = p
    out["t_single"] = time.perf_counter() - T0

    # sharded: 2 data x 2 fsdp x 2 tensor
    placement = Placement(make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)), RULES)
    mesh = placement.mesh
    out["mesh_shape"] = dict(mesh.shape)
    p_sh = placement.state_shardings(params0)
    o_sh = placement.state_shardings(jax.eval_shape(opt.init, params0))
    rep = NamedSharding(mesh, P())
    sharded = jax.jit(train_step, in_shardings=(p_sh, o_sh, placement.row_sharding(2)),
                      out_shardings=(p_sh, o_sh, rep, rep))
    p = placement.place_state(params0)
    s = jax.device_put(opt.init(params0), o_sh)
    losses = []
    for batch in batches:
        p, s, loss, _ = sharded(p, s, placement.place_rows(batch))
        losses.append(float(loss))
    out["t_sharded"] = time.perf_counter() - T0
    out["ref_losses"], out["losses"] = ref_losses, losses
    out["max_param_diff"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                                zip(jax.tree.leaves(ref_params), jax.tree.leaves(p)))
    out["max_param_change"] = max(float(jnp.max(jnp.abs(a - b))) for a, b in
                                  zip(jax.tree.leaves(ref_params), jax.tree.leaves(params0)))
    q = p["layers"]["0"]["attn"]["q_proj"]["kernel"]
    mu_q = s[1].inner_state[0].mu["layers"]["0"]["attn"]["q_proj"]["kernel"]
    out["specs"] = {
        "q_proj": str(q.sharding.spec), "q_shard_shape": list(q.addressable_shards[0].data.shape),
        "mu_q_proj": str(mu_q.sharding.spec),
        "o_proj": str(p["layers"]["0"]["attn"]["o_proj"]["kernel"].sharding.spec),
        "down_proj": str(p["layers"]["0"]["mlp"]["down_proj"]["kernel"].sharding.spec),
        "embedding": str(p["embed"]["embedding"].sharding.spec),
        "lm_head": str(p["lm_head"]["kernel"].sharding.spec),
        "q_bias": str(p["layers"]["0"]["attn"]["q_proj"]["bias"].sharding.spec),
        "norm": str(p["final_norm"]["scale"].sharding.spec),
        "odd": str(p["odd"]["kernel"].sharding.spec),
        "adam_count": str(s[1].inner_state[0].count.sharding.spec),
    }
    # checkpoint the sharded train state and restore it onto the same shardings (exact, still sharded)
    import tempfile

    from toolrl_jax.checkpointing import Checkpointer

    train_state = {"params": p, "opt_state": s}
    shardings = {"params": p_sh, "opt_state": o_sh}
    with tempfile.TemporaryDirectory() as tmp, Checkpointer(tmp) as ckpt:
        ckpt.save(3, train_state, force=True)
        ckpt.wait_until_finished()
        abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                jax.eval_shape(lambda: train_state), shardings)
        restored = ckpt.restore(abstract).state
    out["restore_exact"] = all(bool(jnp.array_equal(a, b)) for a, b in
                               zip(jax.tree.leaves(restored), jax.tree.leaves(train_state)))
    out["restore_shardings_match"] = all(a.sharding == b for a, b in
                                         zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)))
    g = placement.place_rows({"x": np.arange(24).reshape(8, 3)})["x"]
    out["global_batch_equal"] = bool(np.array_equal(np.asarray(g), np.arange(24).reshape(8, 3)))
    out["global_batch_shard_shape"] = list(g.addressable_shards[0].data.shape)
    print("RESULT " + json.dumps(out))
    print(f"timings: {time.perf_counter() - T0:.1f}s total", file=sys.stderr)


if __name__ == "__main__":
    main()
