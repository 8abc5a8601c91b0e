"""absl flags generated from the library's config dataclasses (generalising experiments/reward_flags.py).

Every field declared with `toolrl_jax.config_checks.option(default, help, ...)` becomes one flag: its name is the
field's (or the option's `flag=`, e.g. PolicyLossConfig.clip_eps is --clip_ratio), its default and help come from
the field, its type from the annotation (bool, int, float, str, enum by `choices`, Optional[...], tuple[int, ...]
as a comma list). Reading the flags back builds the config, whose `__post_init__` validates; its errors are
re-raised naming the flags of the fields they mention. Nested config fields and fields without `option` get no flag.

    POLICY = define_config_flags(PolicyLossConfig)
    ...
    policy = PolicyLossConfig(**config_values(POLICY))
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Iterable, Mapping, Optional

from absl import flags


@dataclasses.dataclass(frozen=True)
class FlagBinding:
    """One config field and its flag."""

    field: str
    flag: str
    kind: str  # bool, int, float, str, enum, ints
    zero_is_none: bool = False


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return annotation, False


def _kind(cls: type, field: dataclasses.Field, annotation: Any) -> str:
    base, _ = _unwrap_optional(annotation)
    if field.metadata.get("choices"):
        return "enum"
    if typing.get_origin(base) is tuple and typing.get_args(base)[:1] == (int,):
        return "ints"
    if base in (bool, int, float, str):
        return base.__name__
    if typing.get_origin(base) is typing.Literal:
        return "enum"
    raise TypeError(f"{cls.__name__}.{field.name}: no flag type for {annotation!r}")


def define_config_flags(cls: type, *, exclude: Iterable[str] = (), defaults: Optional[Mapping[str, Any]] = None,
                        flag_values: flags.FlagValues = flags.FLAGS) -> tuple[FlagBinding, ...]:
    """Defines one flag per `option` field of `cls` (minus `exclude`); `defaults` overrides field defaults (by field
    name). Returns the bindings for `config_values`."""
    hints = typing.get_type_hints(cls)
    defaults = dict(defaults or {})
    bindings = []
    for field in dataclasses.fields(cls):
        if field.name in exclude or "help" not in field.metadata:
            continue
        meta = field.metadata
        kind = _kind(cls, field, hints[field.name])
        name = meta.get("flag") or field.name
        default = defaults.get(field.name, field.default)
        if meta.get("zero_is_none") and default is None:
            default = 0
        help_text = meta["help"]
        if kind == "bool":
            flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
        elif kind == "int":
            flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
        elif kind == "float":
            flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
        elif kind == "str":
            flags.DEFINE_string(name, default, help_text, flag_values=flag_values)
        elif kind == "enum":
            choices = meta.get("choices") or typing.get_args(_unwrap_optional(hints[field.name])[0])
            flags.DEFINE_enum(name, default, list(choices), help_text, flag_values=flag_values)
        else:  # ints
            flags.DEFINE_list(name, None if default is None else [str(v) for v in default], help_text,
                              flag_values=flag_values)
        bindings.append(FlagBinding(field.name, name, kind, bool(meta.get("zero_is_none"))))
    return tuple(bindings)


def config_values(bindings: Iterable[FlagBinding], flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, Any]:
    """{field: value} of the parsed flags (integer lists sorted; 0 -> None where the field says so). A list entry
    that is not an integer raises ValueError naming the flag."""
    out = {}
    for b in bindings:
        value = flag_values[b.flag].value
        if b.kind == "ints" and value is not None:
            try:
                value = tuple(sorted(int(v) for v in value))
            except ValueError:
                raise ValueError(f"--{b.flag}={','.join(value)}: expected comma-separated integers") from None
        if b.zero_is_none and value == 0:
            value = None
        out[b.field] = value
    return out


def name_flags(error: Exception, bindings: Iterable[FlagBinding]) -> str:
    """The error's message with the flag of every field it mentions, e.g. "... clip_eps must be ... (--clip_ratio)"."""
    message = str(error)
    named = [f"--{b.flag}" for b in bindings if re.search(rf"\b{re.escape(b.field)}\b", message)]
    return f"{message} ({', '.join(dict.fromkeys(named))})" if named else message
