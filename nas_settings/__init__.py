"""Typed, validated settings, the one place where the project turns plain mappings (YAML
hyperparameters, the experiment's ``data`` section, an optimizer's arguments) into frozen
dataclasses: an unknown key is an error that lists the valid ones, a value of the wrong type
is an error that names the setting and what it must be. ``nas_data``, ``optimizers`` and
``nas_trial`` all build their configs through :func:`from_mapping`; errors are ``ValueError``s
with one line, which the command-line tools print as they are. :class:`ArgumentParser` does the
same for command-line flags."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Mapping, NoReturn, TypeVar

T = TypeVar("T")


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, what: str) -> T:
    """Build dataclass ``cls`` from ``values``: unknown keys and values of the wrong type are errors."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(map(repr, unknown))} for {what}; "
                         f"valid settings: {', '.join(fields) or '(none)'}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _coerce(value, hints[key], f"{what} setting {key!r}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, what: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{what} must be a number, got {value!r}"
                             + (" (write floats like 1.0e-3: YAML 1.1 reads 1e-3 as a string)" if isinstance(value, str) else ""))
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{what} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{what} must be true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{what} must be a string, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{what} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, what) for v, a in zip(value, args))
    if origin is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and type(None) in typing.get_args(hint):
            return None
        return _coerce(value, args[0], what)
    return value


def check(cond: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``cond``."""
    if not cond:
        raise ValueError(message)


class ArgumentParser(argparse.ArgumentParser):
    """The command lines' parser: a bad flag or value is one line on stderr and exit 2
    (argparse prints a usage block first), with the usage folded into that line."""

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        usage = " ".join(self.format_usage().split())
        self.exit(2, f"error: {message} ({usage})\n")
