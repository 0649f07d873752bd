"""Installs ftsearch into a venv with uv, configured the way pip is configured here.

``make demo`` and ``make test`` call this (``INSTALLER=pip`` uses pip instead). uv unpacks
wheels and compiles bytecode in parallel: on a 2-core machine the venv takes about 40 % of
pip's time (BENCHMARKS.md), most of it torch's. uv does not read pip's configuration
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
# pip reads yes/no settings with strtobool.
_YES = {"y", "yes", "t", "true", "on", "1"}
_NO = {"n", "no", "f", "false", "off", "0"}
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
        value = ast.literal_eval(quoted)
        if value.strip():  # pip ignores an empty setting (PIP_FIND_LINKS= changes nothing)
            found[section, key] = value
    settings: dict[str, str] = {}
    for section in reversed(_SECTIONS):  # the weakest first: a stronger one overwrites it
        settings.update({key: value for (s, key), value in found.items() if s == section})
    return settings


def uv_arguments(settings: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """uv's command-line arguments and environment for pip's ``settings``.

    Raises:
        UnsupportedSetting: naming the first setting uv would silently ignore, or read
            differently from pip.
    """
    args = ["--index-strategy", "unsafe-best-match"]  # pip takes the best version anywhere
    env: dict[str, str] = {}
    for key, value in settings.items():
        values = value.split()
        if key in _COSMETIC:
            continue
        if key == "index-url":
            args += ["--index-url", value]
        elif key in ("extra-index-url", "find-links"):
            args += [a for item in values for a in (f"--{key}", item)]
        elif key == "constraint":  # pip's build environments read the same configuration
            args += [a for path in values for a in ("--constraint", path,
                                                     "--build-constraints", path)]
        elif key == "trusted-host":
            args += [a for host in values for a in ("--allow-insecure-host", host)]
        elif key in ("no-index", "pre"):
            if _yes(key, value):
                args += ["--no-index"] if key == "no-index" else ["--prerelease", "allow"]
        elif key in ("only-binary", "no-binary"):  # pip: comma-separated package names
            args += [a for name in value.replace(",", " ").split() for a in (f"--{key}", name)]
        elif key == "keyring-provider" and value in ("disabled", "subprocess"):
            args += ["--keyring-provider", value]
        elif key in ("cert", "client-cert", "proxy"):
            names = {"cert": ["SSL_CERT_FILE"], "client-cert": ["SSL_CLIENT_CERT"],
                     "proxy": ["HTTPS_PROXY", "HTTP_PROXY"]}[key]
            env.update(dict.fromkeys(names, value))
        else:
            raise UnsupportedSetting(
                f"pip setting {key!r} ({value!r}) has no uv equivalent in tools/uv_install.py; "
                f"install with pip instead: make INSTALLER=pip ...")
    return args, env


def _yes(key: str, value: str) -> bool:
    word = value.strip().lower()
    if word not in _YES | _NO:
        raise UnsupportedSetting(f"pip setting {key!r}: {value!r} is not a yes/no value")
    return word in _YES


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
