#!/usr/bin/env python
"""Print lct_fast's import graph by layer: a module's layer is 1 + the highest layer it imports (leaves: 0), so
every edge points down. Reads the working tree, or any git revision (``--rev``) to compare a structure before
and after a change::

    python benchmarks/import_graph.py                 # this checkout
    python benchmarks/import_graph.py --rev a065a72   # as of a commit

The edges are those tests/test_import_graph.py checks for cycles (function-level imports included).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def graph_of(root: str) -> dict:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import test_import_graph as tig

    tig.ROOT, tig.PKG = root, os.path.join(root, "lct_fast")
    return tig.import_graph()


def layers(graph: dict) -> dict:
    memo: dict = {}

    def layer(m: str, seen: tuple = ()) -> int:
        if m not in memo:
            if m in seen:  # a cycle: report it at the same layer instead of recursing forever
                return 0
            memo[m] = 1 + max((layer(d, seen + (m,)) for d in graph[m]), default=-1)
        return memo[m]

    return {m: layer(m) for m in graph}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default=None, help="a git revision to read instead of the working tree")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = ROOT
        if args.rev:
            tar = os.path.join(tmp, "src.tar")
            subprocess.run(["git", "-C", ROOT, "archive", "-o", tar, args.rev, "lct_fast"], check=True)
            with tarfile.open(tar) as t:
                t.extractall(tmp, filter="data")
            root = tmp
        graph = graph_of(root)
    lay = layers(graph)
    short = lambda m: m.replace("lct_fast.", "") if m != "lct_fast" else m  # noqa: E731
    print(f"lct_fast import graph{' at ' + args.rev if args.rev else ''}: {len(graph)} modules, "
          f"{sum(len(v) for v in graph.values())} edges, {max(lay.values()) + 1} layers")
    for n in range(max(lay.values()) + 1):
        print(f"\nlayer {n}")
        for m in sorted(k for k, v in lay.items() if v == n):
            deps = ", ".join(sorted(short(d) for d in graph[m]))
            print(f"  {short(m):34s} -> {deps}" if deps else f"  {short(m)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
