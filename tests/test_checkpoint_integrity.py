"""Checkpoint integrity: checksums and finiteness are verified on restore with fallback to the newest good step,
rejected steps are rewritten (the bad copy kept aside), and a non-finite state is never written."""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from toolrl_jax import checkpointing
from toolrl_jax.checkpointing import (
    MANIFEST_NAME,
    CheckpointConfig,
    Checkpointer,
    CheckpointRejectedError,
    NonFiniteStateError,
    NoRestorableCheckpointError,
    find_nonfinite,
    verify_manifest,
)

REPO = Path(__file__).resolve().parents[1]
LOGGER = "toolrl_jax.checkpointing"

# orbax/tensorstore's failed reads leave asyncio callbacks that fire after their loop closed
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(offset: float = 0.0):
    params = {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) / 100 + offset,
              "b": jnp.full((3,), 1 + offset, jnp.bfloat16)}
    return {"params": params, "opt_state": optax.adam(1e-3).init(params), "step": jnp.asarray(int(offset), jnp.int32)}


def _abstract():
    return jax.eval_shape(_state)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _save_steps(directory: Path, steps=(1, 2), **config) -> None:
    with Checkpointer(directory, CheckpointConfig(**config)) as ckpt:
        for s in steps:
            assert ckpt.save(s, _state(s), data_state={"position": s}, force=True)


def _largest_data_file(step_dir: Path) -> Path:
    """The biggest array-data file of the state item (an ocdbt `d/` file)."""
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_manifest_lists_every_file(tmp_path):
    _save_steps(tmp_path, steps=(1,))
    step_dir = tmp_path / "1"
    manifest = json.loads((step_dir / MANIFEST_NAME).read_text())
    on_disk = {p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert set(manifest["files"]) == on_disk and manifest["step"] == 1 and manifest["algorithm"] == "sha256"
    assert verify_manifest(step_dir, 1) is True


def test_bit_flip_falls_back_naming_step_and_file(tmp_path, caplog):
    _save_steps(tmp_path)
    bad = _largest_data_file(tmp_path / "2")
    _flip_byte(bad)
    with Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING, logger=LOGGER):
        restored = ckpt.restore(_abstract())
        assert ckpt.rejected_steps.keys() == {2}
    assert restored.step == 1 and restored.verified and restored.data_state == {"position": 1}
    _assert_same(restored.state, _state(1))
    rel = bad.relative_to(tmp_path / "2").as_posix()
    assert "checkpoint step 2 rejected (checksum)" in caplog.text and rel in caplog.text
    assert "sha256 mismatch" in caplog.text
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointRejectedError) as err:  # explicit step: no fallback
        ckpt.restore(_abstract(), step=2)
    assert err.value.step == 2 and err.value.check == "checksum" and err.value.path == rel
    with Checkpointer(tmp_path) as ckpt, pytest.raises(FileNotFoundError, match="step 7"):
        ckpt.restore(_abstract(), step=7)


def test_truncated_file_is_rejected(tmp_path, caplog):
    _save_steps(tmp_path)
    bad = _largest_data_file(tmp_path / "2")
    size = bad.stat().st_size
    with open(bad, "r+b") as f:
        f.truncate(size // 2)
    with Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt.restore(_abstract()).step == 1
    assert f"{bad.relative_to(tmp_path / '2').as_posix()}: {size // 2} bytes, manifest says {size}" in caplog.text


def _save_bypassing_finiteness_check(monkeypatch, directory: Path, step: int, state) -> None:
    with monkeypatch.context() as m:
        m.setattr(checkpointing, "find_nonfinite", lambda tree: None)
        with Checkpointer(directory) as ckpt:
            assert ckpt.save(step, state, force=True)


def test_nonfinite_checkpoint_is_rejected(tmp_path, monkeypatch, caplog):
    _save_steps(tmp_path, steps=(1,))
    state = _state(2)
    state["opt_state"][0].nu["w"] = state["opt_state"][0].nu["w"].at[3, 4].set(jnp.inf)  # as a blown-up Adam nu
    _save_bypassing_finiteness_check(monkeypatch, tmp_path, 2, state)
    assert verify_manifest(tmp_path / "2", 2)  # the files are intact: only the finiteness check can catch it
    with Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING, logger=LOGGER):
        restored = ckpt.restore(_abstract())
    assert restored.step == 1
    assert "checkpoint step 2 rejected (non-finite)" in caplog.text and "['opt_state'][0].nu['w']" in caplog.text


def test_all_steps_bad_lists_each(tmp_path, monkeypatch):
    _save_steps(tmp_path, steps=(1, 2))
    state = _state(3)
    state["params"]["b"] = state["params"]["b"].at[0].set(jnp.nan)
    _save_bypassing_finiteness_check(monkeypatch, tmp_path, 3, state)
    _flip_byte(_largest_data_file(tmp_path / "2"))
    (tmp_path / "1" / MANIFEST_NAME).write_text("{not json")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(NoRestorableCheckpointError) as err:
        ckpt.restore(_abstract())
    assert sorted(err.value.failures) == [1, 2, 3]
    message = str(err.value)
    assert "step 3: non-finite: non-finite values (NaN/inf) in leaf ['params']['b']" in message
    assert "step 2: checksum: file state/" in message and "sha256 mismatch" in message
    assert f"step 1: checksum: integrity manifest {MANIFEST_NAME} is unreadable" in message
    assert message.index("step 3") < message.index("step 2") < message.index("step 1")


def test_rejected_step_is_rewritten_and_kept_aside(tmp_path, caplog):
    _save_steps(tmp_path)
    _flip_byte(_largest_data_file(tmp_path / "2"))
    with Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING, logger=LOGGER):
        assert ckpt.restore(_abstract()).step == 1
        assert ckpt.save(2, _state(20), data_state={"position": 20}, force=True)  # not "already saved"
        assert not ckpt.save(2, _state(20), force=True)  # now it is
    aside = tmp_path / "rejected" / "2"
    assert (aside / "state").is_dir() and "checksum" in (aside / "REJECTED.txt").read_text()
    assert f"moved it to {aside}" in caplog.text
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        restored = ckpt.restore(_abstract())
    assert restored.step == 2 and restored.verified and restored.data_state == {"position": 20}
    _assert_same(restored.state, _state(20))

    # A fresh process that never restored: saving over a step whose files fail their checksums also rewrites it,
    # and over an intact step is skipped as before.
    _flip_byte(_largest_data_file(tmp_path / "2"))
    with Checkpointer(tmp_path) as ckpt:
        assert not ckpt.save(1, _state(10), force=True)
        assert ckpt.save(2, _state(21), force=True)
    assert (tmp_path / "rejected" / "2.1" / "REJECTED.txt").is_file()
    with Checkpointer(tmp_path) as ckpt:
        _assert_same(ckpt.restore(_abstract()).state, _state(21))
        _assert_same(ckpt.restore(_abstract(), step=1).state, _state(1))


def test_incomplete_step_is_rewritten(tmp_path):
    _save_steps(tmp_path, steps=(1,))
    shutil.copytree(tmp_path / "1", tmp_path / "2")
    os.remove(tmp_path / "2" / "_CHECKPOINT_METADATA")
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        assert ckpt.save(2, _state(2), force=True)
    assert "incomplete" in (tmp_path / "rejected" / "2" / "REJECTED.txt").read_text()
    with Checkpointer(tmp_path) as ckpt:
        _assert_same(ckpt.restore(_abstract()).state, _state(2))


def test_saving_nonfinite_state_raises_and_writes_nothing(tmp_path):
    _save_steps(tmp_path, steps=(1,))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cases = [(lambda s: s["params"].update(w=s["params"]["w"].at[0, 0].set(jnp.nan)), "['params']['w']"),
             (lambda s: s["params"].update(b=s["params"]["b"].at[1].set(-jnp.inf)), "['params']['b']"),
             (lambda s: s.update(host=np.array([1.0, np.inf], np.float32)), "['host']"),
             (lambda s: s.update(lr=float("nan")), "['lr']")]
    with Checkpointer(tmp_path, CheckpointConfig(save_every=3)) as ckpt:
        for corrupt, path in cases:
            state = _state(3)
            corrupt(state)
            with pytest.raises(NonFiniteStateError, match=r"refusing to checkpoint step 3: .* in leaf ") as err:
                ckpt.save(3, state)
            assert err.value.step == 3 and err.value.nonfinite.first_path == path
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    two_bad = _state(3)
    two_bad["opt_state"][0].mu["w"] = two_bad["opt_state"][0].mu["w"] * jnp.nan
    two_bad["params"]["w"] = two_bad["params"]["w"] / 0.0  # inf (and nan where w == 0)
    found = find_nonfinite(two_bad)
    assert found.first_path == "['opt_state'][0].mu['w']" and found.count == 2 and "1 more" in str(found)
    assert find_nonfinite(_state(3)) is None and find_nonfinite({"i": jnp.arange(3), "k": jax.random.key(0)}) is None


def test_step_without_manifest_restores_as_legacy(tmp_path, caplog):
    _save_steps(tmp_path, steps=(1,))
    os.remove(tmp_path / "1" / MANIFEST_NAME)
    with Checkpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING, logger=LOGGER):
        restored = ckpt.restore(_abstract())
    assert restored.step == 1 and not restored.verified and "without checksum verification" in caplog.text
    _assert_same(restored.state, _state(1))


def test_async_manifest_is_written_in_background(tmp_path):
    ckpt = Checkpointer(tmp_path, CheckpointConfig(async_save=True))
    assert ckpt.save(1, _state(1), force=True)
    deadline = time.time() + 60
    while not (tmp_path / "1" / MANIFEST_NAME).exists() and time.time() < deadline:  # no wait_until_finished
        time.sleep(0.05)
    assert verify_manifest(tmp_path / "1", 1)
    assert ckpt.save(2, _state(2), force=True)
    ckpt.close()
    assert verify_manifest(tmp_path / "2", 2)


_EXITING_WRITER = textwrap.dedent("""
    import os, sys, time
    import jax.numpy as jnp
    from toolrl_jax.checkpointing import CheckpointConfig, Checkpointer
    ckpt = Checkpointer(sys.argv[1], CheckpointConfig(async_save=True))
    ckpt.save(1, {"w": jnp.full((2, 1024, 1024), 1.0)}, force=True)
    while not os.path.isdir(os.path.join(sys.argv[1], "1")):  # orbax finalized the step ...
        time.sleep(0.001)
    raise SystemExit(3)  # ... and the run dies at once (no wait_until_finished, no close)
""")


def test_async_save_finalized_just_before_exit_gets_its_manifest(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _EXITING_WRITER, str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert verify_manifest(tmp_path / "1", 1)


_SHARDED = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from toolrl_jax.checkpointing import Checkpointer, NonFiniteStateError, find_nonfinite
    mesh = Mesh(np.asarray(jax.devices()).reshape(2, 2), ("data", "model"))
    rev = Mesh(np.asarray(jax.devices()[::-1]).reshape(2, 2), ("data", "model"))  # same devices, other order
    w = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("data", "model")))
    v = jax.device_put(jnp.ones((8,)), NamedSharding(rev, P("model")))
    one = jax.device_put(jnp.ones(()), jax.devices()[3])  # committed to one device
    state = {"w": w, "v": v, "one": one, "n": jax.device_put(jnp.arange(4), NamedSharding(mesh, P("data")))}
    assert find_nonfinite(state) is None
    bad = dict(state, w=w.at[7, 7].set(jnp.inf))  # in the last shard only
    assert bad["w"].sharding == w.sharding
    found = find_nonfinite(bad)
    assert found.first_path == "['w']" and found.count == 1, found
    assert find_nonfinite(dict(bad, v=v.at[0].set(jnp.nan), one=one * jnp.nan)).count == 3
    with Checkpointer(sys.argv[1]) as ckpt:
        try:
            ckpt.save(1, bad, force=True)
            raise AssertionError("saved a non-finite state")
        except NonFiniteStateError as e:
            assert "['w']" in str(e)
        ckpt.save(1, state, force=True)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = ckpt.restore(abstract)
    assert restored.verified and restored.state["w"].sharding == w.sharding
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(restored.state),
                                                                           jax.tree.leaves(state)))
    print("OK")
""")


def test_finiteness_check_on_sharded_arrays(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, "-c", _SHARDED, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


_TWO_PROCESSES = textwrap.dedent("""
    import sys
    import jax
    pid, address, directory, phase = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(address, num_processes=2, process_id=pid)
    import jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from toolrl_jax.checkpointing import CheckpointConfig, Checkpointer, NonFiniteStateError
    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("d",)), P("d"))  # one row block per process

    def make(value, bad=False):
        x = np.full((8, 4), float(value), np.float32)
        if bad:
            x[7, 3] = np.inf  # in process 1's shard only
        return {"w": jax.make_array_from_callback((8, 4), sharding, lambda i: x[i])}

    abstract = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=sharding)}
    if phase == "save":
        with Checkpointer(directory, CheckpointConfig(async_save=True)) as ckpt:
            ckpt.save(1, make(1), force=True)
            ckpt.save(2, make(2), force=True)
            try:
                ckpt.save(3, make(3, bad=True), force=True)
                print("SAVED NON-FINITE")
            except NonFiniteStateError:
                print("refused 3")
    else:
        with Checkpointer(directory) as ckpt:
            first = ckpt.restore(abstract)
            ckpt.save(2, make(22), force=True)
            second = ckpt.restore(abstract)
        print("restored", first.step, float(first.state["w"].addressable_data(0)[0, 0]),
              second.step, float(second.state["w"].addressable_data(0)[0, 0]))
""")


def _run_two_processes(directory: Path, phase: str) -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(i), address, str(directory), phase],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out.strip().splitlines()[-1] for out, _ in outs]


def test_two_processes_agree(tmp_path):
    """Process 0 alone writes manifests and moves rejected steps aside; both processes refuse a state that is
    non-finite only in process 1's shard, reject the same corrupt step and restore the same one."""
    assert _run_two_processes(tmp_path, "save") == ["refused 3", "refused 3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]
    assert verify_manifest(tmp_path / "1", 1) and verify_manifest(tmp_path / "2", 2)
    _flip_byte(_largest_data_file(tmp_path / "2"))
    assert _run_two_processes(tmp_path, "restore") == ["restored 1 1.0 2 22.0"] * 2
    assert (tmp_path / "rejected" / "2" / "REJECTED.txt").is_file() and verify_manifest(tmp_path / "2", 2)
