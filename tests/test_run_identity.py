"""toolrl_jax.run_identity: weight checksums, tokenizer fingerprints, the resume check, launch files kept."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from toolrl_jax import run_identity as ri


def _state(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"layer": {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                      "b": jnp.asarray(rng.normal(size=(3,)), jnp.bfloat16)},
            "step": jnp.asarray(3, jnp.int32)}


def test_weights_checksum_sees_every_bit_position_path_and_dtype():
    base = ri.weights_checksum(_state())
    assert base == ri.weights_checksum(_state()) and len(base) == 32
    state = _state()
    flipped = np.asarray(state["layer"]["w"]).copy()
    flipped.view(np.uint32)[2, 1] ^= 1  # one mantissa bit
    variants = [
        {**state, "layer": {**state["layer"], "w": jnp.asarray(flipped)}},
        {**state, "layer": {**state["layer"], "w": state["layer"]["w"][::-1]}},  # rows swapped: same multiset
        {**state, "layer": {**state["layer"], "b": state["layer"]["b"].astype(jnp.float32)}},  # dtype
        {"other": state["layer"], "step": state["step"]},  # path
        {**state, "layer": {**state["layer"], "w": state["layer"]["w"].reshape(3, 4)}},  # shape
    ]
    sums = {ri.weights_checksum(v) for v in variants}
    assert base not in sums and len(sums) == len(variants)


def test_weights_checksum_is_the_same_for_sharded_arrays():
    devices = np.array(jax.devices()[:1])
    mesh = jax.sharding.Mesh(devices, ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    state = _state()
    placed = jax.tree.map(lambda x: jax.device_put(x, sharding) if x.ndim else x, state)
    assert ri.weights_checksum(placed) == ri.weights_checksum(state)


class _Tokenizer:
    def __init__(self, vocab, template="{{ x }}"):
        self._vocab, self.chat_template, self.all_special_tokens = vocab, template, ["<eos>"]

    def get_vocab(self):
        return dict(self._vocab)


def test_tokenizer_fingerprint_covers_vocabulary_and_chat_template():
    a = ri.tokenizer_fingerprint(_Tokenizer({"a": 0, "b": 1}))
    assert a == ri.tokenizer_fingerprint(_Tokenizer({"b": 1, "a": 0}))
    assert a != ri.tokenizer_fingerprint(_Tokenizer({"a": 1, "b": 0}))
    assert a != ri.tokenizer_fingerprint(_Tokenizer({"a": 0, "b": 1}, template="{{ y }}"))


def _identity(**changes) -> ri.RunIdentity:
    fields = dict(weights={"model": "/m", "checksum": "abc"}, tokenizer="t1",
                  shapes={"train_last_layers": 1, "model": {"num_layers": 2}}, run={"seed": 0, "data": "x"})
    fields.update(changes)
    return ri.RunIdentity(**fields)


def test_check_resume_names_every_difference_and_allows_only_what_is_asked(tmp_path):
    assert ri.check_resume(tmp_path, _identity()) == []  # nothing recorded yet (an older run): accepted
    ri.record(tmp_path, _identity())
    assert ri.check_resume(tmp_path, _identity()) == []
    other = _identity(weights={"model": "/n", "checksum": "abd"}, run={"seed": 7, "data": "x"})
    with pytest.raises(ri.ResumeMismatchError) as err:
        ri.check_resume(tmp_path, other)
    message = str(err.value)
    assert "weights.checksum: 'abc' when the run started, 'abd' now" in message
    assert "weights.model" in message and "run.seed: 0 when the run started, 7 now" in message
    assert "--resume_allow=run,weights" in message
    allowed = ri.check_resume(tmp_path, other, allow=("weights", "run"))
    assert len(allowed) == 3
    shapes = _identity(shapes={"train_last_layers": 2, "model": {"num_layers": 2}})
    with pytest.raises(ri.ResumeMismatchError, match="start a new --run_dir") as err:
        ri.check_resume(tmp_path, shapes, allow=("weights", "tokenizer", "run"))
    assert "shapes.train_last_layers: 1 when the run started, 2 now" in str(err.value)
    with pytest.raises(ValueError, match="cannot allow changes of"):
        ri.check_resume(tmp_path, _identity(), allow=("shapes",))
    assert json.loads((tmp_path / ri.IDENTITY_FILE).read_text())["tokenizer"] == "t1"


def test_launch_files_of_earlier_launches_are_kept(tmp_path):
    ri.keep_launch_files(tmp_path, {"flags.txt": "first", "config.json": "{}"})
    written = ri.keep_launch_files(tmp_path, {"flags.txt": "second"})
    ri.keep_launch_files(tmp_path, {"flags.txt": "third"})
    assert written == [tmp_path / "flags.resume1.txt"]
    assert [(tmp_path / n).read_text() for n in ("flags.txt", "flags.resume1.txt", "flags.resume2.txt")] == [
        "first", "second", "third"]
