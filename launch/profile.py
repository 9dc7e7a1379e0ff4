#!/usr/bin/env python
"""Profile the training step: samples/s, step time, phase breakdown, FLOPs, MFU, memory, kernels used.

The command line lives in :mod:`lct_fast.cli.profile` (its docstring has the usage), also as
``python -m lct_fast.cli.profile`` and the console script ``lct-profile``; this file keeps
``python launch/profile.py``."""
import sys

if __name__ == "profile":
    # launch/ is first on sys.path while a launch/ script runs, so the standard library's ``profile`` (which
    # cProfile, and so torch._dynamo, imports) would resolve to this file: be that module instead.
    import importlib.util
    import os
    import sysconfig

    _spec = importlib.util.spec_from_file_location("profile", os.path.join(sysconfig.get_paths()["stdlib"],
                                                                            "profile.py"))
    _std = importlib.util.module_from_spec(_spec)
    sys.modules["profile"] = _std
    _spec.loader.exec_module(_std)
    globals().update({k: v for k, v in vars(_std).items() if not k.startswith("__")})
else:
    try:
        from lct_fast.cli import from_checkout
    except ModuleNotFoundError as e:  # not installed (or an older copy is): say how instead of a traceback
        sys.exit(f"launch/profile.py: {e}: install this checkout's lct_fast with `pip install -e .`")
    from_checkout(__file__)
    from lct_fast.cli.profile import *  # noqa: E402,F401,F403  (this file is the command line of lct_fast.cli.profile)
    from lct_fast.cli.profile import main  # noqa: E402,F401

    if __name__ == "__main__":
        sys.exit(main())
