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
