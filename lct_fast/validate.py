"""Config validation helpers shared by :mod:`lct_fast.config` and the config sections the methods declare
(``lct_fast.methods.<name>``). A leaf module: every message names the dotted key and what was expected."""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["ConfigError", "UserError", "choice", "positive", "unit"]


class ConfigError(ValueError):
    """A preset or override is invalid; the message names the file, the key and the expectation."""


class UserError(ValueError):
    """A problem with what the user gave (a path, a flag, a file's contents), as opposed to a bug: the command
    lines print it as one line and exit 2."""


def choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}: expected one of {list(choices)}, got {value!r}")


def positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if (value < 0) if allow_zero else (value <= 0):
        raise ConfigError(f"{name}: expected a {'non-negative' if allow_zero else 'positive'} value, got {value!r}")


def unit(name: str, value: float, *, closed: bool = False) -> None:
    if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
        raise ConfigError(f"{name}: expected a value in [0, 1{']' if closed else ')'}, got {value!r}")
