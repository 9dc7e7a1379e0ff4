"""The command lines, one module each with ``main(argv=None) -> exit status``: ``train``, ``sample``, ``export``,
``evaluate``, ``profile``, ``report``, ``encode``. Each runs as ``python -m lct_fast.cli.<name>``, as the console
script ``lct-<name>`` (setup.py) and as ``python launch/<name>.py`` (a thin file that calls it)."""
from __future__ import annotations

import functools
import sys
from typing import Callable

from ..validate import UserError

__all__ = ["UserError", "one_line_errors", "from_checkout"]


def from_checkout(launcher: str) -> None:
    """A ``launch/<name>.py`` imports the installed lct_fast: say so in one line when that is not the checkout the
    launcher sits in (its own ``lct_fast/`` is then not what runs)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(launcher)))
    mine = os.path.join(root, "lct_fast")
    running = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(mine) and os.path.realpath(mine) != os.path.realpath(running):
        print(f"{os.path.basename(launcher)}: warning: running the lct_fast installed at {running}, not this "
              f"checkout's {mine} (pip install -e {root} to run this one)", file=sys.stderr)


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
