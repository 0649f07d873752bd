"""tools/uv_install.py: uv installs what pip, configured the same way, would install."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tools.uv_install import UnsupportedSetting, pip_settings, uv_arguments

ROOT = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).parent / "uv"


def test_pip_precedence_a_variable_over_install_over_global():
    listing = "\n".join([
        "global.index-url='https://mirror.example/simple'",
        "global.find-links='/a'",
        "install.find-links='/b'",
        ":env:.find-links='/c'",
        ":env:.index-url=''",  # an empty variable: pip ignores it
        "global.extra-index-url='file:///x\\nfile:///y'",
        "user.ignored='not a section pip reads for install'",
    ])
    settings = pip_settings(listing)
    assert settings["find-links"] == "/c"
    assert settings["index-url"] == "https://mirror.example/simple"
    assert settings["extra-index-url"].split() == ["file:///x", "file:///y"]
    assert "ignored" not in settings


def test_each_setting_becomes_uvs_equivalent():
    args, env = uv_arguments({
        "extra-index-url": "file:///x file:///y", "constraint": "/etc/caps.txt",
        "find-links": "/wheels", "cert": "/ca.pem", "no-index": "false", "pre": "y",
        "only-binary": "torch,numpy", "disable-pip-version-check": "1",
        "require-virtualenv": "true", "trusted-host": "mirror.example"})
    pairs = list(zip(args[::2], args[1::2], strict=True))
    assert ("--index-strategy", "unsafe-best-match") in pairs  # pip's choice across indexes
    assert {("--extra-index-url", "file:///x"), ("--extra-index-url", "file:///y"),
            ("--find-links", "/wheels"), ("--allow-insecure-host", "mirror.example"),
            ("--constraint", "/etc/caps.txt"), ("--build-constraints", "/etc/caps.txt"),
            ("--prerelease", "allow"), ("--only-binary", "torch"),
            ("--only-binary", "numpy")} <= set(pairs)
    assert "--no-index" not in args
    assert env == {"SSL_CERT_FILE": "/ca.pem"}
    assert "--no-index" in uv_arguments({"no-index": "yes"})[0]


@pytest.mark.parametrize(("setting", "message"), [
    ({"require-hashes": "true"}, "'require-hashes'.*INSTALLER=pip"),
    # pip reads this one backwards (pypa/pip#5735): refused rather than guessed
    ({"no-build-isolation": "false"}, "'no-build-isolation'"),
    ({"keyring-provider": "import"}, "'keyring-provider'"),
    ({"no-index": "maybe"}, "'no-index'.*yes/no"),
])
def test_a_setting_uv_would_read_otherwise_stops_the_install_naming_it(setting, message):
    with pytest.raises(UnsupportedSetting, match=message):
        uv_arguments(setting)


def _wheel(folder: Path, version: str) -> None:
    """A real, minimal pure-Python wheel of the package ``ftsprobe``."""
    info = f"ftsprobe-{version}.dist-info"
    files = {
        "ftsprobe/__init__.py": f'VERSION = "{version}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: ftsprobe\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n"}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / f"ftsprobe-{version}-py3-none-any.whl", "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)


@pytest.mark.skipif(not UV.exists(), reason="this venv was made with INSTALLER=pip")
def test_uv_installs_within_pips_constraint_from_pips_links(tmp_path):
    # pip's configuration: local wheels only, and a cap.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for version in ("1.0", "2.0"):
        _wheel(wheels, version)
    (tmp_path / "caps.txt").write_text("ftsprobe<2\n")
    target = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    # No configuration file at all (this machine's are left out), the settings as variables.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))},
           "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels),
           "PIP_CONSTRAINT": str(tmp_path / "caps.txt"), "UV_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "uv_install.py"),
                           str(target / "bin" / "python"), "ftsprobe"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    version = subprocess.run([str(target / "bin" / "python"), "-c",
                              "import ftsprobe; print(ftsprobe.VERSION)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "1.0"  # uv alone (it reads no pip settings) would take 2.0 or fail
