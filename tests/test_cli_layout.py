"""The command lines live in the package (``lct_fast.cli.<name>``); ``launch/<name>.py`` are thin files that call
them without touching sys.path, ``setup.py`` declares each as the console script ``lct-<name>``, and
``python -m lct_fast.cli.<name>`` runs the same code."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "lct_fast", "cli")) if f.endswith(".py")
               and f != "__init__.py")


def test_every_command_line_is_a_package_module_a_launcher_and_a_console_script():
    assert NAMES == ["encode", "evaluate", "export", "profile", "report", "sample", "train"]
    setup = open(os.path.join(ROOT, "setup.py")).read()
    for name in NAMES:
        tree = ast.parse(open(os.path.join(ROOT, "lct_fast", "cli", f"{name}.py")).read())
        funcs = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert {"main", "build_parser"} <= funcs, (name, funcs)
        launcher = open(os.path.join(ROOT, "launch", f"{name}.py")).read()
        edits = [n for n in ast.walk(ast.parse(launcher)) if isinstance(n, ast.Attribute) and n.attr == "path"
                 and isinstance(n.value, ast.Name) and n.value.id == "sys"]
        assert not edits and f"lct_fast.cli.{name}" in launcher, name
        body = ast.parse(launcher).body[1:]                       # after the docstring (the usage)
        assert len(body) <= 7, f"launch/{name}.py is not thin: {len(body)} statements"
    assert '"train", "sample", "export", "evaluate", "profile", "report",' in setup and "lct_fast.cli.{name}:main" in setup


def test_python_dash_m_and_the_launcher_give_the_same_command():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = ROOT
    outs = [subprocess.run([sys.executable, *cmd, "--config", "configs/tiny.json", "--dry-run"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120) for cmd in (["-m", "lct_fast.cli.train"],
                                                                                    ["launch/train.py"])]
    assert all(o.returncode == 0 for o in outs), [o.stderr[-2000:] for o in outs]
    assert outs[0].stdout == outs[1].stdout and "parameters:" in outs[0].stdout
