"""CI must install and test exactly as the README says: the commands in .ci/run are the README's."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


def test_ci_runs_the_readme_commands():
    readme = _read("README.md")
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    main_job, test_cmd = blocks[0].strip(), blocks[1].strip()
    install, _, run_tests = test_cmd.partition(" && ")
    assert main_job.startswith(install + " && python launch/train.py --config configs/tiny.json")
    ci_lines = [ln.strip() for ln in _read(".ci/run").splitlines() if ln.strip() and not ln.startswith("#")]
    assert install in ci_lines, f"{install!r} missing from .ci/run"
    assert run_tests in ci_lines, f"{run_tests!r} missing from .ci/run"
    assert ci_lines.index(install) < ci_lines.index(run_tests)


def _launcher_commands(readme: str) -> list[tuple[str, list[str]]]:
    """(launcher, its arguments) of every ``launch/*.py`` command in the README's bash blocks."""
    import shlex

    found = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for cmd in line.split("&&"):
                tokens = shlex.split(cmd, comments=True)
                for i, tok in enumerate(tokens):
                    m = re.fullmatch(r"launch/(\w+)\.py", tok)
                    if m:
                        found.append((m.group(1), tokens[i + 1:]))
    return found


def test_readme_launch_commands_parse_with_their_clis():
    """Every launcher command the README shows is accepted by that launcher's own argparse (so the two
    cannot drift), and every preset it names exists."""
    import importlib.util

    commands = _launcher_commands(_read("README.md"))
    assert {name for name, _ in commands} >= {"train", "encode", "export", "sample"}, commands
    for name, args in commands:
        spec = importlib.util.spec_from_file_location(f"_readme_launch_{name}", os.path.join(ROOT, "launch",
                                                                                            f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        try:
            ns = module.build_parser().parse_args(args)
        except SystemExit as e:  # argparse's way of saying no
            raise AssertionError(f"README: launch/{name}.py {' '.join(args)} is rejected by its CLI") from e
        config = getattr(ns, "config", None)
        if config and config.endswith(".json"):
            assert os.path.exists(os.path.join(ROOT, config)), f"README names a missing preset {config}"


def test_readme_shows_evaluation_and_report():
    commands = {name for name, _ in _launcher_commands(_read("README.md"))}
    assert {"evaluate", "report"} <= commands
    readme = _read("README.md")
    m = re.search(r"!\[report of the main job\]\(([^)]+)\)", readme)
    assert m and os.path.isfile(os.path.join(ROOT, m.group(1))), "README's report image is missing"


def test_readme_shows_profiling_and_its_results():
    commands = [args for name, args in _launcher_commands(_read("README.md")) if name == "profile"]
    assert any("--sweep" in a for a in commands) and any("--trace" in a for a in commands)
    readme = _read("README.md")
    assert "## Profiling" in readme
    for path in re.findall(r"\]\((benchmarks/results/profile-[^)]+)\)", readme):
        assert os.path.isfile(os.path.join(ROOT, path)), f"README links a missing result {path}"


def test_layout_table_names_every_module():
    """Every module and package of lct_fast is in the README's layout table, and every path there exists."""
    readme = _read("README.md")
    table = readme[readme.index("## Layout"):readme.index("## Quality")]
    named = set(re.findall(r"`(lct_fast/[\w/.]+?)/?`", table))
    for entry in sorted(os.listdir(os.path.join(ROOT, "lct_fast"))):
        if entry.startswith(("_", ".")) or entry.endswith(".egg-info"):
            continue
        path = f"lct_fast/{entry}"
        if entry.endswith(".py") or os.path.isdir(os.path.join(ROOT, path)):
            assert path in named, f"README layout table does not mention {path}"
    for path in named:
        assert os.path.exists(os.path.join(ROOT, path)), f"README layout table names a missing {path}"
