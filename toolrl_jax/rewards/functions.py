"""Reward functions as a protocol: the ToolRL reward is the built-in, users add their own, a weighted sum trains.

A reward function maps a batch to one score per response:

    fn(responses: Sequence[str], ground_truths: Sequence[str], step: int) -> scores

where `scores` is N numbers (a list or array), a `RewardOutput` (scores plus named component arrays, all logged),
or a dict with a "score" entry plus component entries. Two optional keywords, detected once from the signature:
`examples` (the ToolRLExample of each response's prompt, or None when the caller has none; a `**kwargs` function
gets it too) and `pool` (the caller's process pool: the function then schedules its own work on the whole batch,
as the built-in does through `score_batch`). A function without `pool` is run in the pool in contiguous chunks
when it can be pickled, so it must score each response on its own; one that needs the whole batch (e.g. ranks
within a group) should accept `pool` and may ignore it.

The design follows TRL's GRPOTrainer (`reward_funcs` with `reward_weights`: each function scores the batch, the
reward is the weighted sum, each function's mean is logged under its name) and tunix's GRPOLearner (`reward_fns`:
a list of plain callables over the batch); here functions also return named components, see `CombinedReward`.

No JAX import here: reward worker processes import this module to run chunks.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import math
import numbers
import pickle
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from toolrl_jax.rewards.batch import RewardBatch, score_batch
from toolrl_jax.rewards.config import RewardConfig

BUILTIN_SPEC = "toolrl"
_SPEC = re.compile(r"^(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
_TOOLRL_COMPONENTS = tuple(f.name for f in dataclasses.fields(RewardBatch) if f.name != "total")
_TOOLRL_SUMMED = ("format", "correctness", "length")  # the components whose sum is the ToolRL total

RewardFn = Callable[..., Any]  # fn(responses, ground_truths, step[, examples=...][, pool=...]) -> scores


class RewardFunctionError(ValueError):
    """A reward function that cannot be loaded, raised, or returned something other than N finite scores.

    The message names the function (or its spec) and, when it ran, the step; the original error is chained."""


# --------------------------------------------------------------------------------------------------------- outputs


def _column(label: str, what: str, value: Any, n: int | None) -> np.ndarray:
    """`value` as a fresh float64 [n] array (n=None: any length), or a RewardFunctionError saying what was wrong."""
    count = "N" if n is None else n
    expected = f"expected {count} finite numbers, one per response"
    if value is None or isinstance(value, (str, bytes, Mapping)):
        raise RewardFunctionError(f"{label}: {what} is a {type(value).__name__}; {expected}")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as e:
        raise RewardFunctionError(f"{label}: {what} is not an array of numbers ({e}); {expected}") from e
    if arr.dtype.kind not in "biuf":
        odd = [x for x in arr.ravel()[:1000] if not isinstance(x, numbers.Real)][:1] if arr.dtype == object else []
        shown = f" (e.g. {odd[0]!r})" if odd else ""
        raise RewardFunctionError(f"{label}: {what} has dtype {arr.dtype}{shown}; {expected}")
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        raise RewardFunctionError(f"{label}: {what} has shape {arr.shape}; {expected} (shape ({count},))")
    arr = arr.astype(np.float64)  # always a copy: later edits by the function cannot change logged rewards
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise RewardFunctionError(
            f"{label}: {what} is not finite at responses {bad[:5].tolist()}{' ...' if bad.size > 5 else ''} "
            f"(e.g. {arr[bad[0]]}); {expected}")
    return arr


def _components(label: str, components: Mapping[Any, Any], n: int | None) -> dict[str, np.ndarray]:
    out = {}
    for key, value in components.items():
        if not isinstance(key, str) or not key or key == "score":
            raise RewardFunctionError(f"{label}: component name {key!r} is not allowed; use a non-empty str other "
                                      "than 'score' (the score entry of a dict output)")
        out[key] = _column(label, f"component {key!r}", value, n)
    return out


@dataclasses.dataclass(frozen=True)
class RewardOutput:
    """One reward function's result: scores float64 [N] (what the weight multiplies) and named components [N]
    each (logged only). Arrays are validated and copied on construction."""

    scores: np.ndarray
    components: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = _column("RewardOutput", "scores", self.scores, None)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "components", _components("RewardOutput", self.components, scores.shape[0]))

    def __len__(self) -> int:
        return int(self.scores.shape[0])


def _label(name: str, step: int | None, where: str = "") -> str:
    return f"reward function {name!r}" + ("" if step is None else f" at step {step}") + where


def _normalise(label: str, raw: Any, n: int) -> RewardOutput:
    if isinstance(raw, RewardOutput):
        scores, components = raw.scores, raw.components
    elif isinstance(raw, Mapping):
        if "score" not in raw:
            raise RewardFunctionError(
                f"{label} returned a dict without a 'score' entry (keys {sorted(map(str, raw))}); expected "
                "{'score': N numbers, '<component>': N numbers, ...}")
        scores, components = raw["score"], {k: v for k, v in raw.items() if k != "score"}
    else:
        scores, components = raw, {}
    return RewardOutput(_column(label, "scores", scores, n), _components(label, components, n))


def normalise_output(name: str, raw: Any, n: int, step: int | None = None) -> RewardOutput:
    """A function's raw return value (N numbers, a RewardOutput, or {"score": ..., component: ...}) as a
    RewardOutput of n responses; RewardFunctionError naming the function (and step) on a wrong shape, a
    non-number or a non-finite value."""
    return _normalise(_label(name, step), raw, n)


# -------------------------------------------------------------------------------------------------------- built-in


@dataclasses.dataclass(frozen=True)
class ToolRLReward:
    """The ToolRL reward (any preset, via its RewardConfig) as a reward function: scores = the ToolRL total,
    components format, correctness, length, accuracy, exactly as `score_batch` computes them."""

    config: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    chunk_size: int = 128

    def __call__(self, responses: Sequence[str], ground_truths: Sequence[str], step: int,
                 pool: Any = None) -> RewardOutput:
        batch = score_batch(responses, ground_truths, step, self.config, pool=pool, chunk_size=self.chunk_size)
        return RewardOutput(batch.total, {name: getattr(batch, name) for name in _TOOLRL_COMPONENTS})


def toolrl_reward(config: RewardConfig | None = None) -> ToolRLReward:
    """The built-in reward function for `config` (default: the paper's "Original" reward)."""
    return ToolRLReward(config or RewardConfig())


# --------------------------------------------------------------------------------------------------------- loading


def _parse_spec(spec: str) -> tuple[str, str]:
    match = _SPEC.match(spec) if isinstance(spec, str) else None
    if match is None:
        raise RewardFunctionError(f"bad reward function spec {spec!r}: expected {BUILTIN_SPEC!r} (the built-in "
                                  "ToolRL reward) or 'package.module:function'")
    return match["module"], match["attr"]


def reward_fn_name(spec: str) -> str:
    """The name a spec is logged under: "toolrl" for the built-in, else the function's attribute name
    ("pkg.mod:length_bonus" -> "length_bonus")."""
    return BUILTIN_SPEC if spec == BUILTIN_SPEC else _parse_spec(spec)[1].rpartition(".")[2]


def load_reward_fn(spec: str, config: RewardConfig | None = None) -> RewardFn:
    """The reward function named by `spec`: "toolrl" (the built-in, with `config`) or "package.module:function"
    (an attribute path after the colon is allowed: "mod:obj.method"). RewardFunctionError naming the spec on bad
    syntax, a module that is missing or fails to import, a missing attribute, or a non-callable."""
    if spec == BUILTIN_SPEC:
        return toolrl_reward(config)
    module_name, attr = _parse_spec(spec)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise RewardFunctionError(f"reward function spec {spec!r}: module {e.name!r} not found (is it on "
                                      "PYTHONPATH / installed?)") from e
        raise RewardFunctionError(f"reward function spec {spec!r}: importing {module_name!r} failed: {e}") from e
    except Exception as e:  # the user's module raised while importing
        raise RewardFunctionError(
            f"reward function spec {spec!r}: importing {module_name!r} raised {type(e).__name__}: {e}") from e
    obj: Any = module
    for i, part in enumerate(attr.split(".")):
        if not hasattr(obj, part):
            owner = ".".join([module_name, *attr.split(".")[:i]])
            close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RewardFunctionError(f"reward function spec {spec!r}: {owner!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardFunctionError(f"reward function spec {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


# -------------------------------------------------------------------------------------------------------- combined


def _accepts(sig: inspect.Signature | None, name: str, via_kwargs: bool) -> bool:
    if sig is None:
        return False
    param = sig.parameters.get(name)
    if param is not None:
        return param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)
    return via_kwargs and any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


@dataclasses.dataclass(frozen=True)
class RewardTerm:
    """One reward function in a CombinedReward: its metric name, the callable and its weight in the total.
    Whether it takes `examples` / `pool` is read once from its signature."""

    name: str
    fn: RewardFn
    weight: float = 1.0
    wants_examples: bool = dataclasses.field(init=False, default=False)
    wants_pool: bool = dataclasses.field(init=False, default=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise RewardFunctionError(f"reward function name {self.name!r}: expected a non-empty str without '/'")
        if not callable(self.fn):
            raise RewardFunctionError(f"reward function {self.name!r} is a {type(self.fn).__name__}, not a callable")
        if isinstance(self.weight, bool) or not isinstance(self.weight, numbers.Real) or not math.isfinite(self.weight):
            raise RewardFunctionError(f"reward function {self.name!r}: weight must be a finite number, got "
                                      f"{self.weight!r}")
        object.__setattr__(self, "weight", float(self.weight))
        try:
            sig: inspect.Signature | None = inspect.signature(self.fn)
        except (TypeError, ValueError):  # some builtins have no signature: call them plainly
            sig = None
        if sig is not None:
            try:
                sig.bind([], [], 0)
            except TypeError as e:
                raise RewardFunctionError(f"reward function {self.name!r} cannot be called as fn(responses, "
                                          f"ground_truths, step): {e}") from e
        object.__setattr__(self, "wants_examples", _accepts(sig, "examples", via_kwargs=True))
        object.__setattr__(self, "wants_pool", _accepts(sig, "pool", via_kwargs=False))


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Rewards of one batch. total: float64 [N], the weighted sum of the functions' scores. components: the logged
    per-response columns besides total ([N] each): for the default (only the built-in, weight 1) format,
    correctness, length, accuracy, as `RewardBatch`; otherwise "<name>/score" and "<name>/<component>" per
    function. outputs: each function's unweighted RewardOutput; weights: each function's weight."""

    total: np.ndarray
    components: Mapping[str, np.ndarray]
    outputs: Mapping[str, RewardOutput]
    weights: Mapping[str, float]

    def __len__(self) -> int:
        return int(self.total.shape[0])

    @property
    def columns(self) -> dict[str, np.ndarray]:
        """{"total": total, **components}: every logged per-response column."""
        return {"total": self.total, **self.components}

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Batch means of every column under `prefix` ({} for an empty batch, as RewardBatch.metrics)."""
        if len(self) == 0:
            return {}
        return {prefix + name: float(values.mean()) for name, values in self.columns.items()}

    def record(self, i: int) -> dict[str, float]:
        """Response i's total and components, for per-sample logs."""
        return {name: float(values[i]) for name, values in self.columns.items()}

    def records(self) -> list[dict[str, float]]:
        return [self.record(i) for i in range(len(self))]

    def take(self, rows: Any) -> RewardResult:
        """The results of responses `rows` (an index array), in that order."""
        return _combine([self], lambda columns: columns[0][rows])

    @staticmethod
    def concatenate(results: Sequence[RewardResult]) -> RewardResult:
        """Results of consecutive batches (same functions and components) as one."""
        return _combine(results, np.concatenate)


def _combine(results: Sequence[RewardResult], fn: Callable[[list[np.ndarray]], np.ndarray]) -> RewardResult:
    """A RewardResult whose every per-response column is fn([that column of each result])."""
    first = results[0]
    outputs = {name: RewardOutput(fn([r.outputs[name].scores for r in results]),
                                  {k: fn([r.outputs[name].components[k] for r in results]) for k in out.components})
               for name, out in first.outputs.items()}
    return RewardResult(fn([r.total for r in results]), {k: fn([r.components[k] for r in results])
                                                          for k in first.components}, outputs, first.weights)


def _call_chunk(args: tuple[RewardFn, list[str], list[str], int, dict[str, Any]]) -> Any:
    """Run one function on one chunk (module-level so worker processes can run it); returns its raw output."""
    fn, responses, ground_truths, step, kwargs = args
    return fn(responses, ground_truths, step, **kwargs)


def _raised(label: str, e: BaseException) -> RewardFunctionError:
    return RewardFunctionError(f"{label} raised {type(e).__name__}: {e}")


@dataclasses.dataclass(frozen=True)
class CombinedReward:
    """Reward functions with weights: total = sum_i weight_i * scores_i, every function's score and components
    logged. Built from RewardTerms or (name, fn, weight) tuples; names must be unique.

    chunk_size: responses per pool task for functions run in a process pool. A function that cannot be pickled is
    run in-process instead, with a one-time warning (slower, still correct)."""

    terms: Sequence[RewardTerm | tuple[str, RewardFn, float]]
    chunk_size: int = 128
    _pickles: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)  # name -> bool

    def __post_init__(self) -> None:
        terms = tuple(t if isinstance(t, RewardTerm) else RewardTerm(*t) for t in self.terms)
        if not terms:
            raise RewardFunctionError("CombinedReward needs at least one reward function")
        names = [t.name for t in terms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise RewardFunctionError(f"reward function names must be unique (they name the metrics): {dup} repeat")
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise RewardFunctionError(f"chunk_size must be an int >= 1, got {self.chunk_size!r}")
        object.__setattr__(self, "terms", terms)

    @classmethod
    def default(cls, config: RewardConfig | None = None) -> CombinedReward:
        """Only the built-in ToolRL reward with weight 1: metrics and totals exactly as `score_batch`."""
        return cls([RewardTerm(BUILTIN_SPEC, toolrl_reward(config), 1.0)])

    @property
    def is_default_layout(self) -> bool:
        """Only the built-in with weight 1: log RewardBatch's flat reward/{total,format,...} names."""
        (first, *rest) = self.terms
        return not rest and isinstance(first.fn, ToolRLReward) and first.weight == 1.0

    def part_names(self) -> list[str]:
        """The names of the additive parts of the total (`parts`), as their columns are logged."""
        return [name for term in self.terms for name, _ in self._part_keys(term)]

    def parts(self, result: RewardResult) -> dict[str, tuple[np.ndarray, float]]:
        """The additive parts of `result.total`: {name: (unweighted column [N], weight)}, the sum of weight * column
        being the total (up to float rounding). The built-in ToolRL function contributes its format, correctness
        and length (its score is their sum), every other function its score. Names as the columns are logged:
        format, correctness, length for the built-in alone at weight 1, else "<function>/<component>" and
        "<function>/score"."""
        out = {}
        for term in self.terms:
            output = result.outputs[term.name]
            for name, key in self._part_keys(term):
                out[name] = (output.scores if key is None else output.components[key], term.weight)
        return out

    def _part_keys(self, term: RewardTerm) -> list[tuple[str, str | None]]:
        """(part name, component key, None = the score) of one term's additive parts."""
        if not isinstance(term.fn, ToolRLReward):
            return [(f"{term.name}/score", None)]
        prefix = "" if self.is_default_layout else f"{term.name}/"
        return [(prefix + key, key) for key in _TOOLRL_SUMMED]

    def score(self, responses: Sequence[str], ground_truths: Sequence[str], step: int,
              examples: Sequence[Any] | None = None, pool: Any = None) -> RewardResult:
        """Score N responses against their ground truths at `step` (1-based global step; 0 = before training).

        examples: the ToolRLExample of each response's prompt (length N), passed to functions that take them.
        pool: a `concurrent.futures` executor (e.g. `make_reward_pool`) or anything with `.map`; None scores
        in-process. Raises RewardFunctionError naming the function and step when one raises or returns bad scores.
        """
        n = len(responses)
        if len(ground_truths) != n or (examples is not None and len(examples) != n):
            got = f"{len(ground_truths)} ground truths" + ("" if examples is None else f", {len(examples)} examples")
            raise ValueError(f"{n} responses but {got}: give one per response")
        bad = next((i for i, r in enumerate(responses) if not isinstance(r, str)), None)
        if bad is not None:
            raise TypeError(f"responses[{bad}] must be a str, got {type(responses[bad]).__name__}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0 (1-based global step), got {step!r}")
        outputs = {t.name: self._run(t, list(responses), list(ground_truths), step, examples, pool)
                   for t in self.terms}
        total = None
        for t in self.terms:
            weighted = t.weight * outputs[t.name].scores
            total = weighted if total is None else total + weighted
        if self.is_default_layout:
            components = dict(outputs[self.terms[0].name].components)
        else:
            components = {}
            for name, out in outputs.items():
                components[f"{name}/score"] = out.scores
                components.update({f"{name}/{key}": values for key, values in out.components.items()})
        return RewardResult(total, components, outputs, {t.name: t.weight for t in self.terms})

    def _run(self, term: RewardTerm, responses: list[str], ground_truths: list[str], step: int,
             examples: Sequence[Any] | None, pool: Any) -> RewardOutput:
        kwargs: dict[str, Any] = {}
        if term.wants_examples:
            kwargs["examples"] = None if examples is None else list(examples)
        n, size = len(responses), self.chunk_size
        if term.wants_pool or pool is None or n <= size or not self._picklable(term):
            if term.wants_pool:
                kwargs["pool"] = pool
            label = _label(term.name, step)
            try:
                raw = term.fn(responses, ground_truths, step, **kwargs)
            except Exception as e:
                raise _raised(label, e) from e
            return _normalise(label, raw, n)
        starts = range(0, n, size)
        tasks = [(term.fn, responses[a:a + size], ground_truths[a:a + size], step,
                  {k: (v if v is None else v[a:a + size]) for k, v in kwargs.items()}) for a in starts]
        parts, results = [], iter(pool.map(_call_chunk, tasks))
        for a in starts:
            label = _label(term.name, step, f" on responses[{a}:{min(a + size, n)}]")
            try:
                raw = next(results)
            except Exception as e:  # the worker's exception, its remote traceback chained by concurrent.futures
                raise _raised(label, e) from e
            parts.append(_normalise(label, raw, min(size, n - a)))
        keys = list(parts[0].components)
        for a, part in zip(starts, parts):
            if list(part.components) != keys:
                raise RewardFunctionError(
                    f"{_label(term.name, step)} returned components {list(part.components)} on responses[{a}:...] "
                    f"but {keys} on responses[0:...]; return the same components for every batch")
        return RewardOutput(np.concatenate([p.scores for p in parts]),
                            {k: np.concatenate([p.components[k] for p in parts]) for k in keys})

    def _picklable(self, term: RewardTerm) -> bool:
        """Whether `term.fn` can go to worker processes (checked once); warns once when it cannot."""
        if term.name not in self._pickles:
            try:
                pickle.dumps(term.fn)
                self._pickles[term.name] = True
            except Exception as e:  # noqa: BLE001  (any failure: lambdas, closures, objects holding locks)
                self._pickles[term.name] = False
                warnings.warn(f"reward function {term.name!r} cannot be pickled ({type(e).__name__}: {e}); it runs "
                              "in-process, not in the reward pool. Define it at module level to use the pool.",
                              RuntimeWarning, stacklevel=4)
        return self._pickles[term.name]
