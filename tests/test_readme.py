"""The README works as written: its python blocks run after `make demo`, its demo YAML is
configs/demo.yaml's settings."""

from __future__ import annotations

import re
import subprocess
import sys

import yaml

from tests.conftest import ROOT, user_env

README = (ROOT / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", README, flags=re.S | re.M)


def test_the_readme_demo_yaml_is_the_demo_config():
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    shown = [b for b in map(yaml.safe_load, _blocks("yaml"))
             if isinstance(b, dict) and b.get("name") == "demo"]
    assert shown == [demo]


def test_every_python_block_runs_as_written_after_make_demo(demo_run):
    root, _ = demo_run
    blocks = _blocks("python")
    assert blocks
    for block in blocks:
        # As a user pastes it: a fresh interpreter in the folder `make demo` ran in.
        proc = subprocess.run([sys.executable, "-c", block], cwd=root, env=user_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{block}\n{proc.stderr[-2000:]}"
