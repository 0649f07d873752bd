"""Installs ftsearch into a venv with uv, configured the way pip is configured here.

``make demo`` and ``make test`` call this (``INSTALLER=pip`` uses pip instead). uv unpacks
wheels and compiles bytecode in parallel: on a 2-core machine the venv takes about a third
of pip's time (BENCHMARKS.md), most of it torch's. uv does not read pip's configuration
(astral-sh/uv#1404), and a machine's index mirror, local wheels and version caps live
there, so this reads pip's merged view (``pip config list``: its files and ``PIP_*``
variables) and passes each setting on as uv's equivalent. A pip setting that changes what
gets installed and has no equivalent here stops the install, naming it; pip would have
honoured it and uv would not.

Usage: ``VENV/bin/python tools/uv_install.py TARGET_PYTHON [REQUIREMENT...]`` (default
``-e .[dev]``), where VENV holds pip and uv; TARGET_PYTHON's environment receives the
packages (in the Makefile both are .venv's).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

# pip's settings that do not change what is installed: uv has its own defaults for them.
_COSMETIC = {"disable-pip-version-check", "progress-bar", "quiet", "verbose", "no-color",
             "no-input", "retries", "log", "cache-dir", "no-cache-dir", "root-user-action",
             "timeout", "default-timeout", "user-agent", "no-warn-script-location",
             "use-feature", "use-deprecated", "python-version-check",
             "require-virtualenv", "break-system-packages",
             "config-file"}  # PIP_CONFIG_FILE: its settings are in the listing already
# Switches: set to false they change nothing.
_SWITCHES = ("no-index", "pre", "no-build-isolation")
# pip's precedence: a variable over the [install] section over [global].
_SECTIONS = (":env:", "install", "global")


class UnsupportedSetting(ValueError):
    """A pip setting that decides what is installed and has no uv equivalent here."""


def pip_settings(listing: str) -> dict[str, str]:
    """``pip config list``'s lines (``section.key='value'``) as key -> value, pip's
    precedence applied (``:env:`` over ``install`` over ``global``)."""
    found: dict[tuple[str, str], str] = {}
    for line in listing.splitlines():
        name, sep, quoted = line.partition("=")
        section, dot, key = name.rpartition(".")
        if not (sep and dot) or section not in _SECTIONS:
            continue
        found[section, key] = ast.literal_eval(quoted)
    settings: dict[str, str] = {}
    for section in reversed(_SECTIONS):  # the weakest first: a stronger one overwrites it
        settings.update({key: value for (s, key), value in found.items() if s == section})
    return settings


def uv_arguments(settings: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv's command-line arguments and environment for pip's ``settings``.

    Raises:
        UnsupportedSetting: naming the first setting uv would silently ignore.
    """
    args = ["--index-strategy", "unsafe-best-match"]  # pip takes the best version anywhere
    env: dict[str, str] = {}
    for key, value in settings.items():
        values = value.split()
        if key == "index-url":
            args += ["--index-url", value]
        elif key == "extra-index-url":
            args += [a for url in values for a in ("--extra-index-url", url)]
        elif key == "find-links":
            args += [a for link in values for a in ("--find-links", link)]
        elif key == "constraint":
            args += [a for path in values for a in ("--constraint", path)]
        elif key == "no-index" and _true(value):
            args.append("--no-index")
        elif key == "pre" and _true(value):
            args += ["--prerelease", "allow"]
        elif key == "trusted-host":
            args += [a for host in values for a in ("--allow-insecure-host", host)]
        elif key == "cert":
            env["SSL_CERT_FILE"] = value
        elif key == "proxy":
            env["HTTPS_PROXY"] = env["HTTP_PROXY"] = value
        elif key in ("only-binary", "no-binary", "keyring-provider"):
            args += [f"--{key}", value]
        elif key == "no-build-isolation" and _true(value):
            args.append("--no-build-isolation")
        elif key == "client-cert":
            env["SSL_CLIENT_CERT"] = value
        elif key not in _COSMETIC and not (key in _SWITCHES and not _true(value)):
            raise UnsupportedSetting(
                f"pip setting {key!r} ({value!r}) has no uv equivalent in tools/uv_install.py; "
                f"install with pip instead: make INSTALLER=pip ...")
    return args, env


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def install(python: str, requirements: Sequence[str]) -> int:
    """Installs ``requirements`` into ``python``'s environment with the uv beside this
    interpreter, configured from this interpreter's pip; uv's exit status."""
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"],
                             capture_output=True, text=True, check=True).stdout
    try:
        args, env = uv_arguments(pip_settings(listing))
    except UnsupportedSetting as error:
        print(f"uv_install: {error}", file=sys.stderr)
        return 2
    uv = os.path.join(os.path.dirname(sys.executable), "uv")
    command = [uv, "pip", "install", "--quiet", "--python", python, "--compile-bytecode",
               *args, *requirements]
    return subprocess.run(command, env={**os.environ, **env}).returncode


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: " + __doc__.split("Usage: ")[1].strip())
    sys.exit(install(sys.argv[1], sys.argv[2:] or ["-e", ".[dev]"]))
