"""Imports inside lct_fast run one way: no module imports, directly or through others, a module that imports it.

Every ``import`` statement is read with ``ast`` -- function-level (lazy) imports included: a cycle through a
lazy import still ties the two modules together (each needs the other), it only hides the order problem
until the first call. An edge goes to the module named (``from . import x`` to the submodule ``x`` when it
is one); the implicit import of a package's ``__init__`` by its submodules is not an edge.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "lct_fast")


def _modules() -> dict:
    mods = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                name = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
                mods[name] = path
    return mods


def import_graph() -> dict:
    mods = _modules()
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        package = mod if is_pkg else mod.rpartition(".")[0]
        tree = ast.parse(open(path).read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                for a in node.names:
                    sub = f"{prefix}.{a.name}"
                    targets.append(sub if sub in mods else prefix)
            for t in targets:
                while t and t not in mods:  # `import lct_fast.ops.dispatch as d` and the like
                    t = t.rpartition(".")[0]
                if t and t != mod and t.startswith("lct_fast"):
                    graph[mod].add(t)
    return graph


def cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in lct_fast: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_walker_sees_lazy_imports_and_cycles():
    """The checker itself: a function-level import is an edge, and a two-module loop is reported."""
    g = import_graph()
    assert "lct_fast.trainer" in g["lct_fast.profiler.step"]   # imported inside measure_step_ms only
    assert "lct_fast.ops.dispatch" in g["lct_fast.ops.forward_ad"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_is_shadowed_by_a_package_attribute():
    """``import lct_fast.ops.x as m`` must give the module x: no package exports a function or class under the
    name of one of its own submodules (that is how ``nsln_reference`` the function would hide a module of the
    same name)."""
    import importlib

    bad = []
    for mod in sorted(_modules()):
        pkg, _, name = mod.rpartition(".")
        if not pkg or mod.endswith("__init__"):
            continue
        parent = importlib.import_module(pkg)
        if name in vars(parent) and not hasattr(vars(parent)[name], "__path__") \
                and getattr(vars(parent)[name], "__name__", None) != mod:
            bad.append(f"{pkg}.{name} is {type(vars(parent)[name]).__name__}, not the module {mod}")
    assert not bad, "; ".join(bad)


def test_kernel_families_share_one_file_layout():
    """Each kernel family: <family>_ops.py (functional entry), <family>_pytorch.py (reference), and its kernels
    as <family>_triton.py / <family>_cuda.py / <family>_fused.py (autograd layer), all in lct_fast/ops/."""
    files = set(os.listdir(os.path.join(PKG, "ops")))
    for family in ("nsln", "attention", "sinkhorn"):
        assert {f"{family}_ops.py", f"{family}_pytorch.py", f"{family}_triton.py"} <= files, family
    extra = {f for f in files if f.endswith(".py")} - {"__init__.py", "dispatch.py", "forward_ad.py"} - {
        f"{fam}_{kind}.py" for fam in ("nsln", "attention", "sinkhorn") for kind in ("ops", "pytorch", "triton",
                                                                                      "cuda", "fused")}
    assert not extra, f"files in lct_fast/ops outside the family layout: {sorted(extra)}"
