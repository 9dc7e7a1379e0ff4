"""The command lines, one module each with ``main(argv=None) -> exit status``: ``train``, ``sample``, ``export``,
``evaluate``, ``profile``, ``report``, ``encode``. Each runs as ``python -m lct_fast.cli.<name>``, as the console
script ``lct-<name>`` (setup.py) and as ``python launch/<name>.py`` (a thin file that calls it)."""
from __future__ import annotations

import functools
import sys
from typing import Callable

from ..validate import UserError

__all__ = ["UserError", "one_line_errors"]


def one_line_errors(name: str) -> Callable:
    """Wrap a command line's ``main``: a user error (a config error, a missing or unreadable file, a
    :class:`UserError`, invalid dataset statistics) prints ``<name>: error: <message>`` and returns 2; anything
    else is a bug and keeps its traceback."""
    from ..data.stats import StatsError
    from ..validate import ConfigError

    user = (ConfigError, UserError, StatsError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
            PermissionError)

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except user as e:
                print(f"{name}: error: {e}", file=sys.stderr)
                return 2

        return run

    return wrap
