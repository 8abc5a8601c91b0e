"""What a training run started from, recorded when it starts and checked when it resumes.

A checkpoint holds only the trainable state; the frozen weights, the tokenizer and the settings that fix array
shapes or the data order come from the command line again on `--resume`. Resuming with another model of the same
shapes would silently continue from different frozen weights. So a run writes `<run_dir>/run_identity.json` at its
start:

  weights     a content checksum of every starting parameter (`weights_checksum`), with the model folder,
  tokenizer   a hash of the vocabulary, special tokens and chat template (`tokenizer_fingerprint`),
  shapes      settings that fix the checkpoint's array shapes (model config, trainable layers, dtypes, algorithm):
              a change cannot resume at all,
  run         settings that fix what the run trains on and in which order (data, seed, batch sizes, ...),

and `check_resume` compares a resume's identity with it: any difference stops with an error naming each field and
both values, unless the caller allows that category (`allow`: "weights", "tokenizer", "run"; "shapes" never).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

IDENTITY_FILE = "run_identity.json"
CATEGORIES = ("weights", "tokenizer", "shapes", "run")
OVERRIDABLE = ("weights", "tokenizer", "run")
_UNSIGNED = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


class ResumeMismatchError(ValueError):
    """A resumed run differs from what its checkpoints were trained with."""


@jax.jit
def _array_checksums(leaves: list[jax.Array]) -> jax.Array:
    """[n, 2] uint32: two position-weighted sums of each array's bit patterns (wrapping integer adds, so the value
    does not depend on the reduction order or the sharding)."""
    out = []
    for x in leaves:
        x = jnp.asarray(x)
        if x.dtype.itemsize not in _UNSIGNED:
            x = x.astype(jnp.float32)
        bits = jax.lax.bitcast_convert_type(x, _UNSIGNED[x.dtype.itemsize]).reshape(-1).astype(jnp.uint32)
        position = jnp.arange(bits.size, dtype=jnp.uint32)
        first = jnp.sum(bits * (position * jnp.uint32(2654435761) + jnp.uint32(1)))
        second = jnp.sum((bits ^ jnp.uint32(0x5BD1E995)) * (position * jnp.uint32(40503) + jnp.uint32(7)))
        out.append(jnp.stack([first, second]))
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def weights_checksum(state: Any) -> str:
    """A hex digest of a pytree's arrays: their paths, shapes, dtypes and bit patterns (computed on the devices;
    one pass over the weights)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    sums = np.asarray(jax.device_get(_array_checksums([leaf for _, leaf in flat])))
    digest = hashlib.sha256()
    for (path, leaf), pair in zip(flat, sums):
        digest.update(f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|{leaf.dtype}|{int(pair[0])}|{int(pair[1])}"
                      .encode())
    return digest.hexdigest()[:32]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hex digest of a transformers tokenizer's vocabulary, special tokens and chat template."""
    content = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
               "special": sorted(getattr(tokenizer, "all_special_tokens", [])),
               "chat_template": getattr(tokenizer, "chat_template", None)}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class RunIdentity:
    """See the module doc; every value JSON-serialisable."""

    weights: Mapping[str, Any]
    tokenizer: str
    shapes: Mapping[str, Any]
    run: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def _differences(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            out += _differences(saved.get(key, "<absent>"), current.get(key, "<absent>"), f"{prefix}.{key}")
        return out
    return [] if saved == current else [f"{prefix}: {saved!r} when the run started, {current!r} now"]


def check_resume(run_dir: str | Path, current: RunIdentity, allow: Iterable[str] = ()) -> list[str]:
    """Compares `current` with the identity recorded in `run_dir` (if any; a run from before identities were
    recorded is accepted). Raises ResumeMismatchError listing every difference of a category not in `allow`;
    returns the allowed differences (for the log)."""
    allow = set(allow)
    unknown = allow - set(OVERRIDABLE)
    if unknown:
        raise ValueError(f"cannot allow changes of {sorted(unknown)}; choose from {OVERRIDABLE}")
    path = Path(run_dir) / IDENTITY_FILE
    if not path.is_file():
        return []
    saved = json.loads(path.read_text(encoding="utf-8"))
    now = current.to_json()
    refused, allowed = [], []
    for category in CATEGORIES:
        found = _differences(saved.get(category), now[category], category)
        (allowed if category in allow else refused).extend(found)
    if refused:
        hint = ("array shapes differ: this run's checkpoints cannot be restored with these settings; start a new "
                "--run_dir" if any(d.startswith("shapes.") for d in refused) else
                "if the change is deliberate, pass --resume_allow=" + ",".join(
                    sorted({d.split(".")[0] for d in refused})))
        raise ResumeMismatchError(f"--resume: {path} records a different start than this command:\n  "
                                  + "\n  ".join(refused) + f"\n{hint}")
    return allowed


def record(run_dir: str | Path, identity: RunIdentity) -> Path:
    """Writes the identity of a run that starts now (atomically)."""
    path = Path(run_dir) / IDENTITY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(identity.to_json(), indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def keep_launch_files(run_dir: str | Path, files: Mapping[str, str]) -> list[Path]:
    """Writes each {name: text} (e.g. flags.txt, config.json) into run_dir without overwriting an earlier launch's:
    the first launch writes `name`, each later one `name` with a `.resumeN` suffix before the extension."""
    run_dir = Path(run_dir)
    written = []
    for name, text in files.items():
        path = run_dir / name
        n = 0
        while path.exists():
            n += 1
            stem, dot, ext = name.rpartition(".")
            path = run_dir / (f"{stem}.resume{n}.{ext}" if dot else f"{name}.resume{n}")
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
