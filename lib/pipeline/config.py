"""Typed stage configs: one dataclass per stage is the stage's interface, and its argparse parser is
built from it, so flag names, types, choices, defaults and help live in one place.

A field becomes the flag `--<name>` (plus `aliases`). `bool` fields are `store_true` switches,
`Literal[...]` fields get their choices, `X | None` fields take an `X` and default to None. Checks
that need no files go in the dataclass's `__post_init__` and raise `UsageError` naming the flag,
so a config built in Python is checked exactly as one parsed from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Literal, Sequence, TypeVar, get_args, get_origin

from lib.core.choices import DEFAULT_SEED
from lib.core.errors import UsageError

__all__ = [
    "option",
    "StageConfig",
    "build_parser",
    "parse_config",
    "config_from_namespace",
    "config_as_dict",
    "require",
]

C = TypeVar("C", bound="StageConfig")
_SUPPRESS = argparse.SUPPRESS


def option(default: Any = dataclasses.MISSING, help: str = "", *, aliases: Sequence[str] = (),
           hidden: bool = False, metavar: str | None = None, group: str | None = None,
           cli: bool = True) -> Any:
    """A config field with its command-line metadata. No default means a required flag.

    `hidden` keeps a flag accepted but out of `--help` (original flags kept for compatibility);
    `cli=False` makes a field that only Python callers set (e.g. resolved values).
    """
    meta = {"help": help, "aliases": tuple(aliases), "hidden": hidden, "metavar": metavar, "group": group,
            "cli": cli}
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def require(condition: bool, message: str) -> None:
    """Raise `UsageError(message)` unless `condition`; the message names the flag."""
    if not condition:
        raise UsageError(message)


@dataclasses.dataclass(kw_only=True)
class StageConfig:
    """Fields every stage has. Subclasses (also `@dataclass(kw_only=True)`) add their own and call
    `super().__post_init__()` from their `__post_init__`."""

    seed: int = option(DEFAULT_SEED, "seed of every random choice of the stage", aliases=("--random_seed",))

    def __post_init__(self) -> None:
        require(isinstance(self.seed, int) and not isinstance(self.seed, bool), f"--seed must be an integer, got {self.seed!r}")

    # Values a stage's own parser gained at run time (a task's stage-1 flags); read with getattr.
    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__.get("_extra")
        if extra is not None and name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no option {name!r}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _flag_kwargs(f: dataclasses.Field, tp: Any) -> dict:
    meta = f.metadata
    has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    kw: dict[str, Any] = {"dest": f.name, "help": _SUPPRESS if meta.get("hidden") else (meta.get("help") or None)}
    base, optional = _unwrap_optional(tp)
    if base is bool:
        if default:
            raise TypeError(f"config field {f.name}: a switch must default to False")
        kw.update(action="store_true", default=False)
        return kw
    if get_origin(base) is Literal:
        choices = list(get_args(base))
        kw["choices"] = choices
        kw["type"] = type(choices[0])
    elif get_origin(base) in (list, tuple):
        (item,) = get_args(base)[:1]
        kw.update(nargs="+", type=item)
    elif base in (int, float, str):
        kw["type"] = base
    else:
        raise TypeError(f"config field {f.name}: unsupported type {tp!r}")
    if meta.get("metavar"):
        kw["metavar"] = meta["metavar"]
    if has_default:
        kw["default"] = default
    else:
        kw["required"] = True
    return kw


def _hints(config_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(config_cls, include_extras=False)


def build_parser(config_cls: type[C], description: str | None = None,
                 parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The argparse parser of a stage config: one flag per CLI field, in field order, by group."""
    p = parser or argparse.ArgumentParser(description=description,
                                          formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = _hints(config_cls)
    groups: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if not f.metadata.get("cli", True) or f.name.startswith("_"):
            continue
        target = p
        if f.metadata.get("group"):
            name = f.metadata["group"]
            target = groups.setdefault(name, p.add_argument_group(name))
        target.add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), **_flag_kwargs(f, hints[f.name]))
    return p


def config_from_namespace(config_cls: type[C], ns: argparse.Namespace) -> C:
    """Build (and so check) a config from parsed flags; flags the config does not declare (a task's
    own stage-1 options) stay readable as attributes of the config."""
    values = vars(ns).copy()
    names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    cfg = config_cls(**{k: v for k, v in values.items() if k in names})
    object.__setattr__(cfg, "_extra", {k: v for k, v in values.items() if k not in names})
    return cfg


def parse_config(config_cls: type[C], argv: Sequence[str] | None = None, description: str | None = None,
                 extend: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None) -> C:
    """Parse `argv` into a checked config. `extend(parser, known)` may add flags that depend on
    already-known ones (stage 1's task flags) before the final parse."""
    parser = build_parser(config_cls, description)
    if extend is not None:
        known, _ = parser.parse_known_args(argv)
        extend(parser, known)
    return config_from_namespace(config_cls, parser.parse_args(argv))


def config_as_dict(cfg: StageConfig) -> dict[str, Any]:
    """The resolved settings of a config (fields and run-time extra flags), JSON-ready, for manifests."""
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if not f.name.startswith("_")}
    for k, v in (cfg.__dict__.get("_extra") or {}).items():
        out.setdefault(k, v)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}
