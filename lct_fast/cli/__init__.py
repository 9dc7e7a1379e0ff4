"""The command lines, one module each with ``main(argv=None) -> exit status``: ``train``, ``sample``, ``export``,
``evaluate``, ``profile``, ``report``, ``encode``. Each runs as ``python -m lct_fast.cli.<name>``, as the console
script ``lct-<name>`` (setup.py) and as ``python launch/<name>.py`` (a thin file that calls it)."""
