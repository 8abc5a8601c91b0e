"""Sweeps: a base flagfile plus a grid and/or list of flag overrides, expanded into named, resumable runs.

A sweep spec is a JSON file:

    {
      "name": "reward_ablations_qwen2.5_3b",
      "description": "free text",
      "base": "../grpo_qwen2.5_3b.flags",          # relative to the spec file
      "flags": {"total_steps": 105},                # overrides shared by every run
      "runs": [{"name": "original", "flags": {"reward_preset": "original"}},
               {"name": "coarse", "base": "../other.flags", "flags": {"reward_preset": "coarse"}}],
      "grid": {"lr": [1e-6, 2e-6], "group_size": [4, 8]}
    }

`runs` (a list) and `grid` (a Cartesian product, keys in file order) may be used alone or together (every list
entry crossed with every grid point). Flag values are JSON scalars; flag names are written without dashes.

Each run gets `<sweep_dir>/<run name>/run.flags`: the base flagfile's lines (nested flagfiles expanded, overridden
flags removed) followed by the overrides and `--run_dir=<sweep_dir>/<run name>`, so a run's flagfile is
self-contained and a later edit of the base cannot silently change a run. Re-writing a run whose flags differ is
refused (`SweepConflictError` names the run) unless `force_new`, which gives the changed run the next free name
`<name>~2`, `<name>~3`, ... (reusing one whose flags match). Completion is read from the run's checkpoints: a run is
done when a complete checkpoint exists at its `--total_steps` (and its export, when it asks for one).

Everything here is pure file/text logic (no JAX): experiments/sweep.py is the absl front end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

RUN_FLAGFILE = "run.flags"
MANIFEST_FILE = "sweep.json"
CHECKPOINT_SUBDIR = "checkpoints"
# What a finalized checkpoint step directory holds (see toolrl_jax/checkpointing.py: orbax writes the metadata file
# last, on finalizing the step; our Checkpointer saves the "state" and "extra" items). Kept as plain strings so this
# module needs neither JAX nor orbax.
_CHECKPOINT_MARKERS = ("_CHECKPOINT_METADATA",)
_CHECKPOINT_ITEMS = ("state", "extra")
# Flags the sweep controls itself; a spec may not set them.
RESERVED_FLAGS = ("run_dir", "resume", "flagfile", "export_dir")
# Launch-time flags: they belong on the command line of one launch, never in a run's flagfile.
LAUNCH_FLAGS = ("distributed", "coordinator_address", "num_processes", "process_id")

_FLAG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=,-]*$")
_SAFE_VALUE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_NAME_CHARS = 96
_SPEC_KEYS = ("name", "description", "base", "flags", "runs", "grid")
_RUN_KEYS = ("name", "base", "flags")

FlagItems = tuple[tuple[str, Optional[str]], ...]  # ordered (name, value); value None for a bare `--name`


class SweepError(ValueError):
    """A malformed sweep spec, flagfile or override; the message names the file/run/flag."""


class SweepConflictError(SweepError):
    """A run's flagfile exists with different flags (runs are never overwritten)."""


# ----------------------------------------------------------------------------------------------------- flagfiles


def parse_flag_lines(lines: Iterable[str], source: str, *, _stack: tuple[str, ...] = ()) -> FlagItems:
    """(name, value) pairs of absl flagfile lines, with nested `--flagfile=` expanded in place (absl's rules).

    Blank lines and lines starting with '#' or '//' are comments; every other line must be one `--flag[=value]`.
    """
    items: list[tuple[str, Optional[str]]] = []
    for lineno, raw in enumerate(lines, 1):
        if raw.isspace() or not raw or raw.startswith("#") or raw.startswith("//"):
            continue
        line = raw.strip()
        if not line.startswith("-") or line.lstrip("-") == "":
            raise SweepError(f"{source}:{lineno}: expected one --flag=value per line, got {line!r}")
        body = line[2:] if line.startswith("--") else line[1:]
        name, eq, value = body.partition("=")
        if not _FLAG_NAME.match(name):
            raise SweepError(f"{source}:{lineno}: bad flag name {name!r}")
        if name == "flagfile":
            if not value:
                raise SweepError(f"{source}:{lineno}: --flagfile needs a path")
            items.extend(read_flagfile(os.path.expanduser(value), _stack=_stack + (source,)))
            continue
        items.append((name, value if eq else None))
    return tuple(items)


def read_flagfile(path: str | os.PathLike, *, _stack: tuple[str, ...] = ()) -> FlagItems:
    """The flags of an absl flagfile (nested flagfiles resolve relative to the working directory, as absl does)."""
    source = str(path)
    if source in _stack:
        raise SweepError(f"{source}: circular --flagfile include via {' -> '.join(_stack)}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise SweepError(f"cannot read flagfile {source}: {e.strerror or e}") from None
    return parse_flag_lines(text.splitlines(keepends=True), source, _stack=_stack)


def format_flag_value(value: Any, where: str) -> str:
    """absl text for a JSON scalar: true/false, integers as-is, floats in shortest round-trip form, strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise SweepError(f"{where}: non-finite value {value!r}")
        return repr(value)
    if isinstance(value, str):
        if "\n" in value or value != value.strip():
            raise SweepError(f"{where}: a flag value may not hold newlines or surrounding spaces: {value!r}")
        return value
    raise SweepError(f"{where}: flag values must be JSON strings, numbers or booleans, got {value!r}")


def _clears(name: str, override: str) -> bool:
    """Whether base item `name` is replaced by an override of flag `override` (`--nox` is the false form of x)."""
    return name == override or name == "no" + override


def merge_flags(base: FlagItems, overrides: Sequence[tuple[str, str]]) -> FlagItems:
    """Base items minus every flag an override sets (both `--x` and `--nox` forms), then the overrides in order."""
    names = [name for name, _ in overrides]
    kept = tuple(item for item in base if not any(_clears(item[0], n) for n in names))
    return kept + tuple((name, value) for name, value in overrides)


def flag_value(items: FlagItems, name: str) -> Optional[str]:
    """The last value given to `name` (bare `--name` = "true", `--noname` = "false"); None if unset."""
    found = None
    for key, value in items:
        if key == name:
            found = "true" if value is None else value
        elif key == "no" + name and value is None:
            found = "false"
    return found


def flag_lines(items: FlagItems) -> list[str]:
    return [f"--{name}" if value is None else f"--{name}={value}" for name, value in items]


# ----------------------------------------------------------------------------------------------------- specs


@dataclasses.dataclass(frozen=True)
class RunEntry:
    """One element of a spec's `runs` list: optional name and base flagfile, and its overrides."""

    name: Optional[str]
    base: Optional[Path]
    flags: tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec (values already rendered as absl text)."""

    name: str
    description: str
    base: Optional[Path]
    flags: tuple[tuple[str, str], ...]
    runs: tuple[RunEntry, ...]
    grid: tuple[tuple[str, tuple[str, ...]], ...]
    source: str = ""


def _overrides(obj: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(obj, dict):
        raise SweepError(f"{where}: expected an object of flag -> value, got {type(obj).__name__}")
    out = []
    for name, value in obj.items():
        _check_flag_name(name, where)
        out.append((name, format_flag_value(value, f"{where}.{name}")))
    return tuple(out)


def _check_flag_name(name: str, where: str) -> None:
    if not isinstance(name, str) or not _FLAG_NAME.match(name):
        raise SweepError(f"{where}: bad flag name {name!r} (write flag names without dashes, e.g. \"lr\")")
    if name in RESERVED_FLAGS:
        raise SweepError(f"{where}: --{name} is set by the sweep itself (run_dir = <sweep_dir>/<run name>, "
                         "export_dir = <run_dir>/export when the base asks for an export, resume per run)")
    if name in LAUNCH_FLAGS:
        raise SweepError(f"{where}: --{name} is a launch flag; the sweep adds it to the pod/cluster command")


def _path(value: Any, where: str, relative_to: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise SweepError(f"{where}: expected a flagfile path, got {value!r}")
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else Path(os.path.normpath(relative_to / path))


def spec_from_dict(data: Any, source: str, relative_to: Path) -> SweepSpec:
    """Validate a decoded spec; relative base paths resolve against `relative_to` (the spec file's folder)."""
    if not isinstance(data, dict):
        raise SweepError(f"{source}: a sweep spec is a JSON object")
    unknown = sorted(set(data) - set(_SPEC_KEYS))
    if unknown:
        raise SweepError(f"{source}: unknown key(s) {unknown} (allowed: {list(_SPEC_KEYS)})")
    name = data.get("name") or Path(source).stem
    if not isinstance(name, str) or not _RUN_NAME.match(name):
        raise SweepError(f"{source}: bad sweep name {name!r}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise SweepError(f"{source}: 'description' must be a string")
    base = _path(data["base"], f"{source}: base", relative_to) if "base" in data else None
    common = _overrides(data.get("flags", {}), f"{source}: flags")

    runs_data = data.get("runs", [])
    if not isinstance(runs_data, list):
        raise SweepError(f"{source}: 'runs' must be a list")
    runs = []
    for i, entry in enumerate(runs_data):
        where = f"{source}: runs[{i}]"
        if not isinstance(entry, dict):
            raise SweepError(f"{where}: expected an object with 'name', 'flags' (and optionally 'base')")
        bad = sorted(set(entry) - set(_RUN_KEYS))
        if bad:
            raise SweepError(f"{where}: unknown key(s) {bad} (allowed: {list(_RUN_KEYS)})")
        run_name = entry.get("name")
        if run_name is not None and (not isinstance(run_name, str) or not _RUN_NAME.match(run_name)):
            raise SweepError(f"{where}: bad run name {run_name!r} (letters, digits and ._+=,- only)")
        run_base = _path(entry["base"], f"{where}.base", relative_to) if "base" in entry else None
        runs.append(RunEntry(run_name, run_base, _overrides(entry.get("flags", {}), f"{where}.flags")))

    grid_data = data.get("grid", {})
    if not isinstance(grid_data, dict):
        raise SweepError(f"{source}: 'grid' must be an object of flag -> list of values")
    grid = []
    for flag, values in grid_data.items():
        _check_flag_name(flag, f"{source}: grid")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{source}: grid.{flag} must be a non-empty list of values")
        rendered = tuple(format_flag_value(v, f"{source}: grid.{flag}") for v in values)
        if len(set(rendered)) != len(rendered):
            raise SweepError(f"{source}: grid.{flag} repeats a value: {list(rendered)}")
        grid.append((flag, rendered))
    if not runs and not grid:
        raise SweepError(f"{source}: a sweep needs 'runs' and/or 'grid'")
    return SweepSpec(name=name, description=description, base=base, flags=common, runs=tuple(runs),
                     grid=tuple(grid), source=source)


def load_sweep_spec(path: str | os.PathLike) -> SweepSpec:
    """Read and validate a JSON sweep spec."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise SweepError(f"cannot read sweep spec {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise SweepError(f"{path}: invalid JSON: {e}") from None
    return spec_from_dict(data, str(path), path.parent)


# ----------------------------------------------------------------------------------------------------- expansion


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One expanded run: its name, base flagfile and overrides (spec-wide first, then the run's own, then grid)."""

    name: str
    base: Path
    overrides: tuple[tuple[str, str], ...]


def _name_part(flag: str, value: str) -> tuple[str, bool]:
    """`flag=value` made path-safe; the bool says whether characters had to be replaced."""
    safe = _SAFE_VALUE.sub("-", value)
    return f"{flag}={safe}", safe != value


def derive_run_name(label: Optional[str], varied: Sequence[tuple[str, str]]) -> str:
    """Deterministic name: the entry's label (if any) then `flag=value` per varied flag, joined with ','.

    Values with characters unsafe in a path (e.g. '/') are replaced and an 8-hex digest of the exact overrides is
    appended, as it is when the name would exceed 96 characters, so distinct overrides keep distinct names.
    """
    parts = [label] if label else []
    changed = False
    for flag, value in varied:
        part, replaced = _name_part(flag, value)
        parts.append(part)
        changed |= replaced
    if not parts:
        raise SweepError("a run without a name and without overrides cannot be named")
    name = ",".join(parts)
    if changed or len(name) > _MAX_NAME_CHARS:
        digest = hashlib.sha256(json.dumps([label, list(varied)]).encode()).hexdigest()[:8]
        name = f"{name[:_MAX_NAME_CHARS - 9]}-{digest}"
    return name


def expand(spec: SweepSpec, base: Optional[str | os.PathLike] = None,
           extra: Sequence[tuple[str, str]] = ()) -> tuple[RunSpec, ...]:
    """The spec's runs in order (list entries outer, grid points inner, grid keys varying last-fastest).

    base: replaces the spec's (and every entry's) base flagfile, e.g. to try a sweep on a tiny model.
    extra: overrides applied last to every run (e.g. --set model=/real/path); they do not change run names.
    """
    for name, _ in extra:
        _check_flag_name(name, "--set")
    entries = spec.runs or (RunEntry(None, None, ()),)
    keys = [k for k, _ in spec.grid]
    points = list(itertools.product(*[values for _, values in spec.grid])) if spec.grid else [()]
    out: list[RunSpec] = []
    for entry in entries:
        run_base = Path(base) if base is not None else (entry.base or spec.base)
        if run_base is None:
            raise SweepError(f"{spec.source}: run {entry.name or '(unnamed)'} has no base flagfile (set 'base')")
        for point in points:
            grid_items = tuple(zip(keys, point))
            varied = (() if entry.name else entry.flags) + grid_items
            name = derive_run_name(entry.name, varied)
            overrides = spec.flags + entry.flags + grid_items + tuple(extra)
            out.append(RunSpec(name=name, base=run_base, overrides=_dedupe(overrides)))
    seen: dict[str, RunSpec] = {}
    for run in out:
        if run.name in seen:
            raise SweepError(f"{spec.source}: two runs are both named {run.name!r}: give list entries distinct "
                             "names or distinct flags")
        seen[run.name] = run
    return tuple(out)


def _dedupe(overrides: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Keep each flag once, at its last position with its last value (later overrides win)."""
    last = {name: i for i, (name, _) in enumerate(overrides)}
    return tuple(item for i, item in enumerate(overrides) if last[item[0]] == i)


# ----------------------------------------------------------------------------------------------------- planning


@dataclasses.dataclass(frozen=True)
class PlannedRun:
    """A run ready to write: where it lives and the complete flags of its flagfile."""

    name: str
    run_dir: Path
    flags: FlagItems
    base: Path
    overrides: tuple[tuple[str, str], ...]

    @property
    def flagfile(self) -> Path:
        return self.run_dir / RUN_FLAGFILE

    @property
    def total_steps(self) -> int:
        return int(flag_value(self.flags, "total_steps"))  # validated by plan_run

    @property
    def export_dir(self) -> Optional[Path]:
        value = flag_value(self.flags, "export_dir")
        return Path(value) if value else None


def plan_run(run: RunSpec, sweep_dir: str | os.PathLike, name: Optional[str] = None) -> PlannedRun:
    """The run's full flags: base (minus reserved/overridden flags) + overrides + run_dir (+ export_dir)."""
    name = name or run.name
    run_dir = Path(sweep_dir) / name
    base_items = read_flagfile(run.base)
    for flag, _ in base_items:
        if flag in LAUNCH_FLAGS or flag.removeprefix("no") in LAUNCH_FLAGS:
            raise SweepError(f"{run.base}: --{flag} is a launch flag; remove it from the base flagfile (the sweep "
                             "adds it to pod/cluster launches)")
    wants_export = bool(flag_value(base_items, "export_dir"))
    kept = tuple(item for item in base_items if not any(_clears(item[0], r) for r in RESERVED_FLAGS))
    items = merge_flags(kept, run.overrides)
    items = items + (("run_dir", str(run_dir)),)
    if wants_export:
        items = items + (("export_dir", str(run_dir / "export")),)
    total = flag_value(items, "total_steps")
    if total is None:
        raise SweepError(f"run {name}: neither {run.base} nor the spec sets --total_steps; the sweep needs it to "
                         "tell finished runs from unfinished ones")
    try:
        if int(total) < 1:
            raise ValueError
    except ValueError:
        raise SweepError(f"run {name}: --total_steps={total} is not a positive integer") from None
    return PlannedRun(name=name, run_dir=run_dir, flags=items, base=run.base, overrides=run.overrides)


def render_flagfile(run: PlannedRun, sweep_name: str) -> str:
    """The run's flagfile text: a comment header, then one flag per line."""
    header = [
        f"# Run {run.name} of sweep {sweep_name}, written by experiments/sweep.py. Do not edit: a changed",
        "# flagfile for an existing run is refused (change the sweep spec, or pass --force_new for a new run).",
        f"# base: {run.base}",
        "# overrides: " + (" ".join(f"--{k}={v}" for k, v in run.overrides) or "(none)"),
        f"#   python -m experiments.grpo --flagfile={run.flagfile}   (add --resume to continue it)",
    ]
    return "\n".join(header + flag_lines(run.flags)) + "\n"


def _existing_flags(path: Path) -> Optional[FlagItems]:
    if not path.is_file():
        return None
    return read_flagfile(path)


def resolve_names(runs: Sequence[RunSpec], sweep_dir: str | os.PathLike, *,
                  force_new: bool = False) -> tuple[PlannedRun, ...]:
    """Plan every run against what is already on disk.

    A run whose flagfile exists with identical flags is reused; with different flags it is a SweepConflictError
    (naming the run) unless force_new, which picks `<name>~2`, `<name>~3`, ... (the first that is free or matches).
    """
    planned: list[PlannedRun] = []
    conflicts: list[str] = []
    for run in runs:
        candidate = plan_run(run, sweep_dir)
        existing = _existing_flags(candidate.flagfile)
        if existing is None and candidate.run_dir.exists() and any(candidate.run_dir.iterdir()):
            conflicts.append(f"{candidate.run_dir} exists without {RUN_FLAGFILE} (not a run of this sweep)")
        elif existing is not None and not _same_run(existing, candidate.flags):
            if not force_new:
                conflicts.append(_describe_conflict(candidate, existing))
            else:
                version = 2
                while True:
                    candidate = plan_run(run, sweep_dir, name=f"{run.name}~{version}")
                    existing = _existing_flags(candidate.flagfile)
                    foreign = existing is None and candidate.run_dir.exists() and any(candidate.run_dir.iterdir())
                    if not foreign and (existing is None or _same_run(existing, candidate.flags)):
                        break
                    version += 1
        planned.append(candidate)
    if conflicts:
        raise SweepConflictError("refusing to overwrite existing runs (pass --force_new to give changed runs new "
                                 "names):\n  " + "\n  ".join(conflicts))
    return tuple(planned)


def _same_run(a: FlagItems, b: FlagItems) -> bool:
    """Equal flags, ignoring where the run lives (--run_dir/--export_dir: the same folder may be spelt relative or
    absolute; write_flagfiles then rewrites the paths). Order counts: absl lets the last of duplicates win."""
    derived = ("run_dir", "export_dir")
    return [i for i in a if i[0] not in derived] == [i for i in b if i[0] not in derived]


def _describe_conflict(run: PlannedRun, existing: FlagItems) -> str:
    old, new = dict(existing), dict(run.flags)
    diffs = [f"--{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}"
             for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return f"run {run.name} ({run.flagfile}) has different flags: " + ("; ".join(diffs) or "(flag order changed)")


def write_flagfiles(planned: Sequence[PlannedRun], sweep_name: str, sweep_dir: str | os.PathLike,
                    spec_source: str = "") -> list[Path]:
    """Write each run's flagfile (identical existing ones are left untouched) and the sweep's manifest."""
    written = []
    for run in planned:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        if _existing_flags(run.flagfile) != run.flags:
            tmp = run.flagfile.with_suffix(".flags.tmp")
            tmp.write_text(render_flagfile(run, sweep_name), encoding="utf-8")
            os.replace(tmp, run.flagfile)
        written.append(run.flagfile)
    manifest_path = Path(sweep_dir) / MANIFEST_FILE
    manifest = {"name": sweep_name, "spec": spec_source, "runs": []}
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            pass
    names = list(manifest.get("runs", []))
    names += [run.name for run in planned if run.name not in names]
    manifest.update(name=sweep_name, spec=spec_source, runs=names)
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return written


# ----------------------------------------------------------------------------------------------------- status


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """state: 'new' (nothing yet), 'started' (run dir but no complete checkpoint: starts over), 'partial' (resumes
    from latest_step), 'done' (checkpoint at total_steps and the export, when one is asked for)."""

    name: str
    state: str
    latest_step: Optional[int]
    total_steps: int

    @property
    def needs_resume(self) -> bool:
        """Whether to pass --resume: experiments.grpo refuses a run dir holding checkpoint files without it, and
        with it starts over when none of them is complete (as a 'started' run needs)."""
        return self.state in ("partial", "started")


def checkpoint_steps(run_dir: str | os.PathLike) -> list[int]:
    """Finalized checkpoint steps under <run_dir>/checkpoints, ascending (half-written ones are ignored)."""
    root = Path(run_dir) / CHECKPOINT_SUBDIR
    if not root.is_dir():
        return []
    steps = []
    for child in root.iterdir():
        if child.name.isdigit() and all((child / m).is_file() for m in _CHECKPOINT_MARKERS) and all(
                (child / item).is_dir() for item in _CHECKPOINT_ITEMS):
            steps.append(int(child.name))
    return sorted(steps)


def run_status(run: PlannedRun) -> RunStatus:
    steps = checkpoint_steps(run.run_dir)
    latest = steps[-1] if steps else None
    export_ok = run.export_dir is None or (run.export_dir / "config.json").is_file()
    if latest is not None and latest >= run.total_steps and export_ok:
        state = "done"
    elif latest is not None:
        state = "partial"
    elif run.run_dir.is_dir() and any(p.name != RUN_FLAGFILE for p in run.run_dir.iterdir()):
        state = "started"
    else:
        state = "new"
    return RunStatus(run.name, state, latest, run.total_steps)


def status_table(statuses: Sequence[RunStatus]) -> str:
    width = max([len(s.name) for s in statuses] + [3])
    lines = [f"{'run':<{width}}  state    step"]
    for s in statuses:
        lines.append(f"{s.name:<{width}}  {s.state:<7}  {s.latest_step if s.latest_step is not None else '-'}"
                     f"/{s.total_steps}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- commands


def local_command(run: PlannedRun, status: RunStatus, python: str) -> list[str]:
    """argv that trains (or resumes) the run on this machine."""
    cmd = [python, "-m", "experiments.grpo", f"--flagfile={run.flagfile}"]
    if status.needs_resume:
        cmd.append("--resume")
    return cmd


def done_test_shell(run: PlannedRun) -> str:
    """A POSIX test that is true exactly when run_status would say 'done' (for launch scripts)."""
    final = run.run_dir / CHECKPOINT_SUBDIR / str(run.total_steps)
    tests = [f"[ -f {shlex.quote(str(final / m))} ]" for m in _CHECKPOINT_MARKERS]
    tests += [f"[ -d {shlex.quote(str(final / item))} ]" for item in _CHECKPOINT_ITEMS]
    if run.export_dir is not None:
        tests.append(f"[ -f {shlex.quote(str(run.export_dir / 'config.json'))} ]")
    return " && ".join(tests)


@dataclasses.dataclass(frozen=True)
class TPUPodOptions:
    """Where a Cloud TPU pod sweep runs: every worker runs the same command; JAX reads the pod's topology."""

    tpu_name: str
    zone: str
    project: Optional[str] = None
    remote_dir: str = "~/toolrl_jax"
    python: str = "python3"


@dataclasses.dataclass(frozen=True)
class SlurmOptions:
    """A multi-node GPU job: one task per node, each seeing all of its node's GPUs."""

    nodes: int
    gpus_per_node: int
    time: str = "24:00:00"
    partition: Optional[str] = None
    account: Optional[str] = None
    coordinator_port: int = 12345
    remote_dir: Optional[str] = None  # default: the submit directory
    python: str = "python"

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise SweepError(f"SLURM nodes and gpus per node must be >= 1, got {self.nodes} and {self.gpus_per_node}")
        if not 0 < self.coordinator_port < 65536:
            raise SweepError(f"coordinator port {self.coordinator_port} is out of range")


SUBMIT_DIR = '"$SLURM_SUBMIT_DIR"'
_SHARED_FS_NOTE = ("# The sweep directory must be on a filesystem every host mounts at the same path (checkpoints are "
                   "written\n# by all hosts), with these run.flags files in it; runs go one after another, finished "
                   "ones are skipped\n# and unfinished ones resume (--resume starts fresh when a run has no "
                   "checkpoint).")


def tpu_pod_script(planned: Sequence[PlannedRun], sweep_name: str, options: TPUPodOptions) -> str:
    """A bash script of `gcloud compute tpus tpu-vm ssh --worker=all` launches, one per unfinished run."""
    project = f" --project={shlex.quote(options.project)}" if options.project else ""
    lines = ["#!/usr/bin/env bash",
             f"# Sweep {sweep_name}: {len(planned)} run(s) on TPU pod {options.tpu_name}. Every worker runs the "
             "same command;",
             "# --distributed calls jax.distributed.initialize, which reads the coordinator, process count and id "
             "from the TPU.",
             _SHARED_FS_NOTE, "set -euo pipefail", ""]
    for i, run in enumerate(planned, 1):
        train = " ".join(shlex.quote(a) for a in [options.python, "-m", "experiments.grpo",
                                                   f"--flagfile={run.flagfile}", "--distributed", "--resume"])
        done_msg = shlex.quote("done: " + run.name)
        remote = f"cd {options.remote_dir} && if {done_test_shell(run)}; then echo {done_msg}; else {train}; fi"
        lines += [f"# run {i}/{len(planned)}: {run.name}",
                  f"gcloud compute tpus tpu-vm ssh {shlex.quote(options.tpu_name)} "
                  f"--zone={shlex.quote(options.zone)}{project} --worker=all --command={shlex.quote(remote)}", ""]
    return "\n".join(lines)


def slurm_script(planned: Sequence[PlannedRun], sweep_name: str, sweep_dir: str | os.PathLike,
                 options: SlurmOptions) -> str:
    """An sbatch script: the runs in sequence, each an `srun` of one process per node joined by jax.distributed."""
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name=sweep-{sweep_name}",
             f"#SBATCH --nodes={options.nodes}",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --gpus-per-node={options.gpus_per_node}",
             f"#SBATCH --time={options.time}",
             f"#SBATCH --output={Path(sweep_dir) / 'slurm-%j.out'}"]
    if options.partition:
        lines.append(f"#SBATCH --partition={options.partition}")
    if options.account:
        lines.append(f"#SBATCH --account={options.account}")
    lines += [f"# Sweep {sweep_name}: {len(planned)} run(s). Submit with: sbatch <this file>",
              "# One process per node sees all of its GPUs; --distributed joins them through the coordinator "
              "(the first node).",
              _SHARED_FS_NOTE,
              "set -euo pipefail",
              f"cd {options.remote_dir or SUBMIT_DIR}",
              # sed reads the whole list (head would close the pipe early: SIGPIPE under pipefail).
              'COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p):'
              f'{options.coordinator_port}"',
              "export COORDINATOR", ""]
    for i, run in enumerate(planned, 1):
        # Single quotes: $SLURM_PROCID and friends expand inside each task, not in the batch script.
        task = (f"exec {shlex.quote(options.python)} -m experiments.grpo "
                f"{shlex.quote('--flagfile=' + str(run.flagfile))} --distributed --resume "
                "--coordinator_address=$COORDINATOR --num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID")
        lines += [f"# run {i}/{len(planned)}: {run.name}",
                  f"if {done_test_shell(run)}; then",
                  f"  echo {shlex.quote('done: ' + run.name)}",
                  "else",
                  f"  srun --nodes={options.nodes} --ntasks-per-node=1 bash -c {shlex.quote(task)}",
                  "fi", ""]
    return "\n".join(lines)
