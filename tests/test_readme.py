"""The README works as written: its python blocks and its local shell blocks run after
`make demo`, its demo YAML is configs/demo.yaml's settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT, user_env

README = (ROOT / "README.md").read_text()

# Shell blocks with a line starting so are not run here; what covers each instead:
NOT_RUN = {
    "make ": "the demo_run fixture runs `make demo`; `make test` is this suite",
    "ftsearch run ": "a new search of minutes: tests/search/test_run.py and best.yaml's rerun "
                     "in tests/search/test_analysis.py",
    "optuna-dashboard ": "a server: tests/search/test_dashboard.py starts it on 127.0.0.1",
    "pip install": "cluster set-up: a cloud provider cannot exist here",
    "RAY_AUTH_MODE=token ray job submit": "tests/search/test_jobs.py submits to a real cluster",
}


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.S | re.M)


def test_the_readme_demo_yaml_is_the_demo_config():
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    shown = [b for b in map(yaml.safe_load, _blocks("yaml"))
             if isinstance(b, dict) and b.get("name") == "demo"]
    assert shown == [demo]


def _checkout_after_make_demo(root: Path) -> Path:
    """The demo's folder as a checkout after `make demo`: .venv and the committed grids."""
    for name, target in ((".venv", Path(sys.executable).parent.parent),
                         ("benchmarks", ROOT / "benchmarks")):
        if not (root / name).exists():
            (root / name).symlink_to(target, target_is_directory=True)
    return root


def test_every_python_block_runs_as_written_after_make_demo(demo_run):
    root = demo_run.root
    blocks = _blocks("python")
    assert blocks
    for block in blocks:
        # As a user pastes it: the venv's interpreter, in the folder `make demo` ran in.
        proc = subprocess.run([sys.executable, "-c", block], cwd=root, env=user_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{block}\n{proc.stderr[-2000:]}"


def test_every_local_shell_block_runs_as_written_after_make_demo(demo_run):
    root = _checkout_after_make_demo(demo_run.root)
    env = {k: v for k, v in user_env().items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if Path(sys.executable).parent != Path(p))
    run = [b for b in _blocks("sh")
           if not any(line.lstrip().startswith(tuple(NOT_RUN)) for line in b.splitlines())]
    assert len(run) >= 3, run
    for block in run:
        # The way the README says: activate the venv, then the commands, stopping at a failure.
        proc = subprocess.run(["bash", "-c", f"set -eo pipefail\n. .venv/bin/activate\n{block}"],
                              cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{block}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    evaluated = (root / "runs" / "demo-val-evaluation" / "per_class.csv").read_text()
    assert evaluated.count("\n") == 11  # header and the ten digits
