"""AdamW + clipping + schedules against hand values and torch.optim.AdamW with clip_grad_norm_."""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toolrl_jax.optim import (
    DivergenceGuard,
    OptimizerConfig,
    TrainingDivergedError,
    apply_gradients,
    make_optimizer,
    make_schedule,
)


def test_defaults_are_the_toolrl_recipe():
    cfg = OptimizerConfig()
    assert (cfg.learning_rate, cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay, cfg.max_grad_norm) == (
        1e-6, 0.9, 0.999, 1e-8, 0.01, 1.0)
    assert cfg.schedule == "constant" and cfg.warmup_steps == 0 and cfg.decay_all_params
    sched = make_schedule(cfg)
    assert float(sched(0)) == pytest.approx(1e-6) and float(sched(10_000)) == pytest.approx(1e-6)


def test_first_step_by_hand():
    # first Adam step: m_hat = g, v_hat = g^2 -> update g/(|g| + eps) ~ 1; decoupled decay lr*wd*p
    cfg = OptimizerConfig(learning_rate=1e-3)
    opt = make_optimizer(cfg)
    params = {"w": jnp.array([1.0, -2.0])}
    grads = {"w": jnp.array([0.5, -0.25])}  # norm < 1: no clipping
    new, _, metrics = apply_gradients(opt, cfg, grads, opt.init(params), params)
    expected = [1.0 - 1e-3 * (1.0 + 0.01 * 1.0), -2.0 - 1e-3 * (-1.0 + 0.01 * -2.0)]
    np.testing.assert_allclose(np.asarray(new["w"]), expected, rtol=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(np.hypot(0.5, 0.25), rel=1e-6)
    assert float(metrics["lr"]) == pytest.approx(1e-3)


def test_matches_torch_adamw_with_grad_clipping():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    init = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32)}
    grads_seq = [{k: (rng.normal(size=v.shape) * s).astype(np.float32) for k, v in init.items()}
                 for s in (0.1, 3.0, 0.5, 5.0, 0.05)]  # steps 2 and 4 exceed the clip norm
    cfg = OptimizerConfig(learning_rate=1e-2)
    opt = make_optimizer(cfg)
    params = jax.tree.map(jnp.asarray, init)
    state = opt.init(params)
    step = jax.jit(lambda g, s, p: apply_gradients(opt, cfg, g, s, p))
    t_params = [torch.nn.Parameter(torch.tensor(init[k])) for k in ("a", "b")]
    t_opt = torch.optim.AdamW(t_params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    for grads in grads_seq:
        params, state, metrics = step(jax.tree.map(jnp.asarray, grads), state, params)
        for p, k in zip(t_params, ("a", "b")):
            p.grad = torch.tensor(grads[k])
        t_norm = torch.nn.utils.clip_grad_norm_(t_params, 1.0)
        t_opt.step()
        assert float(metrics["grad_norm"]) == pytest.approx(float(t_norm), rel=1e-5)
    for p, k in zip(t_params, ("a", "b")):
        # torch clips by 1/(norm + 1e-6) where optax uses 1/norm: agreement to ~1e-6 relative
        np.testing.assert_allclose(np.asarray(params[k]), p.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_schedules_by_hand():
    warm = make_schedule(OptimizerConfig(learning_rate=1.0, warmup_steps=4))
    np.testing.assert_allclose([float(warm(s)) for s in (0, 1, 2, 4, 100)], [0, 0.25, 0.5, 1.0, 1.0], atol=1e-7)
    lin = make_schedule(OptimizerConfig(learning_rate=1.0, schedule="linear", warmup_steps=2, min_lr_ratio=0.2),
                        total_updates=6)
    np.testing.assert_allclose([float(lin(s)) for s in (0, 1, 2, 3, 4, 6, 9)], [0, 0.5, 1, 0.8, 0.6, 0.2, 0.2],
                               atol=1e-6)
    cos = make_schedule(OptimizerConfig(learning_rate=1.0, schedule="cosine", min_lr_ratio=0.1), total_updates=4)
    # 0.1 + 0.9 * 0.5 * (1 + cos(pi * s / 4))
    expected = [0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * s / 4)) for s in range(5)]
    np.testing.assert_allclose([float(cos(s)) for s in range(5)], expected, atol=1e-6)


def test_lr_metric_follows_schedule():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=2)
    opt = make_optimizer(cfg)
    params = {"w": jnp.ones(2)}
    state = opt.init(params)
    lrs = []
    for _ in range(4):
        params, state, metrics = apply_gradients(opt, cfg, {"w": jnp.ones(2)}, state, params)
        lrs.append(float(metrics["lr"]))
    np.testing.assert_allclose(lrs, [0.0, 0.5, 1.0, 1.0])


def test_weight_decay_mask_excludes_vectors():
    params = {"kernel": jnp.ones((2, 2)), "scale": jnp.ones((2,))}
    zeros = jax.tree.map(jnp.zeros_like, params)
    for decay_all, scale_expected in ((True, 1 - 0.1 * 0.5), (False, 1.0)):
        cfg = OptimizerConfig(learning_rate=0.1, weight_decay=0.5, decay_all_params=decay_all)
        opt = make_optimizer(cfg)
        new, _, _ = apply_gradients(opt, cfg, zeros, opt.init(params), params)
        np.testing.assert_allclose(np.asarray(new["kernel"]), 1 - 0.1 * 0.5, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(new["scale"]), scale_expected, rtol=1e-6)


def test_nonfinite_gradients_skip_the_update():
    cfg = OptimizerConfig(learning_rate=0.1)
    opt = make_optimizer(cfg)
    params = {"w": jnp.array([1.0, 2.0])}
    state = opt.init(params)
    params, state, _ = apply_gradients(opt, cfg, {"w": jnp.array([0.1, 0.2])}, state, params)
    new, new_state, metrics = apply_gradients(opt, cfg, {"w": jnp.array([jnp.nan, 0.2])}, state, params)
    assert float(metrics["update_skipped"]) == 1.0 and float(metrics["params_finite"]) == 1.0
    for a, b in zip(jax.tree.leaves((new, new_state)), jax.tree.leaves((params, state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # without skipping, the non-finite update lands in the parameters, and the metric says so
    raw = OptimizerConfig(learning_rate=0.1, skip_nonfinite=False)
    _, _, metrics = apply_gradients(make_optimizer(raw), raw, {"w": jnp.array([jnp.nan, 0.2])}, state, params)
    assert float(metrics["params_finite"]) == 0.0


def test_divergence_guard_logs_every_skip_and_stops_after_the_limit(caplog):
    guard = DivergenceGuard(3, "policy")
    good = {"update_skipped": 0.0, "params_finite": 1.0, "grad_norm": 0.5}
    bad = {"update_skipped": 1.0, "params_finite": 1.0, "grad_norm": float("nan")}
    with caplog.at_level(logging.WARNING, logger="toolrl_jax.optim"):
        for where, metrics in enumerate([bad, bad, good, bad, bad]):  # a good update resets the count
            guard.observe(metrics, f"update {where}")
        assert [r.getMessage().split(":")[0] for r in caplog.records] == [
            f"policy update skipped at update {i}" for i in (0, 1, 3, 4)]
        with pytest.raises(TrainingDivergedError, match="3 consecutive updates had non-finite gradients"):
            guard.observe(bad, "update 5")
    assert guard.total_skips == 5
    with pytest.raises(TrainingDivergedError, match="parameters became non-finite at step 9"):
        DivergenceGuard(3).observe({"update_skipped": 0.0, "params_finite": 0.0}, "step 9")
    critic = DivergenceGuard(1, "critic")  # metrics under a prefix; a limit of one stops at the first skip
    critic.observe({"update_skipped": 1.0}, "u1", prefix="critic/")  # the actor's skip is not the critic's
    with pytest.raises(TrainingDivergedError, match="critic: 1 consecutive"):
        critic.observe({"critic/update_skipped": 1.0}, "u2", prefix="critic/")


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        OptimizerConfig(schedule="step")
    with pytest.raises(ValueError, match="needs more updates than warmup_steps"):
        make_schedule(OptimizerConfig(schedule="cosine"))
    with pytest.raises(ValueError, match="got 2 updates, warmup_steps=2"):
        make_optimizer(OptimizerConfig(schedule="linear", warmup_steps=2), total_updates=2)
    with pytest.raises(ValueError, match="max_grad_norm"):
        OptimizerConfig(max_grad_norm=0.0)
    with pytest.raises(ValueError, match="learning_rate must be finite"):
        OptimizerConfig(learning_rate=float("nan"))
    with pytest.raises(ValueError, match="b1 and b2"):
        OptimizerConfig(b2=1.0)
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        OptimizerConfig(max_consecutive_skips=0)


def test_bfloat16_params_keep_float32_hyperparameters():
    """In bf16, b2 = 0.999 rounds to 1.0 and Adam's bias correction divides by zero: the state must stay float32."""
    cfg = OptimizerConfig(learning_rate=1e-3, weight_decay=0.0)
    opt = make_optimizer(cfg)
    params = {"w": jnp.array([1.0, -2.0], jnp.bfloat16)}
    state = opt.init(params)
    assert state[1].hyperparams["b2"].dtype == jnp.float32
    new, _, _ = apply_gradients(opt, cfg, {"w": jnp.array([0.5, -0.25], jnp.bfloat16)}, state, params)
    assert new["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(new["w"], np.float32), [0.999, -1.999], atol=4e-3)
    assert np.all(np.isfinite(np.asarray(new["w"], np.float32)))


def test_bfloat16_first_moment_halves_mu_and_tracks_the_float32_optimizer():
    params = {"w": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32)}
    runs = {}
    for mu_dtype in (None, "bfloat16"):
        cfg = OptimizerConfig(learning_rate=1e-2, mu_dtype=mu_dtype)
        opt = make_optimizer(cfg)
        state, p = opt.init(params), params
        mu = state[1].inner_state[0].mu["w"]
        assert mu.dtype == (jnp.bfloat16 if mu_dtype else jnp.float32)
        assert state[1].inner_state[0].nu["w"].dtype == jnp.float32
        for step in range(5):
            grads = {"w": jnp.sin(p["w"] * (step + 1))}
            p, state, _ = apply_gradients(opt, cfg, grads, state, p)
        assert p["w"].dtype == jnp.float32
        runs[mu_dtype] = np.asarray(p["w"])
    moved = np.abs(runs[None] - np.asarray(params["w"])).max()
    assert moved > 1e-2
    np.testing.assert_allclose(runs["bfloat16"], runs[None], atol=moved * 1e-2)
    with pytest.raises(ValueError, match="mu_dtype"):
        OptimizerConfig(mu_dtype="int8")
