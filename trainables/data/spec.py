"""The ``data:`` section of an experiment, validated into a typed :class:`DataSpec`.

This module only reads and checks settings; it opens no file. The keys, their defaults and
their meaning are documented in :mod:`trainables.data`, which is the public entry point.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DATA_SOURCES",
    "TORCHVISION_PREFIX",
    "DataSpec",
    "check_seed",
    "parse_spec",
]

DATA_SOURCES = ("digits", "imagefolder", "fake")
TORCHVISION_PREFIX = "torchvision:"

# Every valid key of the data section with its default; None means "not set".
_DEFAULTS: dict[str, Any] = {
    "source": None,
    "path": None,
    "val_path": None,
    "root": "~/.cache/ftsearch/datasets",
    "download": False,
    "samples_per_class": None,
    "val_fraction": 0.2,
    "seed": None,
    "image_size": 256,
    "fake_size": 200,
    "fake_classes": 10,
    "on_bad_file": "warn",
    "num_workers": 2,
    "max_memory_mb": 2048,
}
# Keys that only mean something for some sources: setting them elsewhere is a mistake worth naming.
_SOURCE_ONLY = {
    "path": ("imagefolder",),
    "val_path": ("imagefolder",),
    "root": ("torchvision",),
    "download": ("torchvision",),
    "fake_size": ("fake",),
    "fake_classes": ("fake",),
}
_BAD_FILE_CHOICES = ("warn", "error")


@dataclass(frozen=True)
class DataSpec:
    """A validated ``data:`` section; see :mod:`trainables.data` for each key."""

    source: str
    path: Path | None
    val_path: Path | None
    root: Path
    download: bool
    samples_per_class: int | None
    val_fraction: float
    seed: int | None
    image_size: int
    fake_size: int
    fake_classes: int
    on_bad_file: str
    num_workers: int
    max_memory_mb: float


def parse_spec(spec: Mapping[str, Any]) -> DataSpec:
    """Check a ``data:`` section's keys, types and ranges and fill in the defaults.

    Raises:
        ValueError: Naming the offending ``data.<key>`` and the valid choices.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"data must be a mapping with a 'source' key, got {type(spec).__name__}")
    unknown = sorted(f"data.{k}" for k in spec if k not in _DEFAULTS)
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: unknown key{'s' if len(unknown) > 1 else ''}; "
            f"valid keys: {', '.join(_DEFAULTS)}"
        )
    # None counts as "not set" so a config layer may pass every key through.
    given = {k: v for k, v in spec.items() if v is not None}
    source = given.get("source")
    choices = f"{', '.join(DATA_SOURCES)} or {TORCHVISION_PREFIX}<Name> (e.g. torchvision:CIFAR10)"
    if not isinstance(source, str) or not (
        source in DATA_SOURCES or source.startswith(TORCHVISION_PREFIX)
    ):
        raise ValueError(f"data.source: unknown source {source!r}; choose one of {choices}")
    kind = "torchvision" if source.startswith(TORCHVISION_PREFIX) else source
    for key, kinds in _SOURCE_ONLY.items():
        if key in given and kind not in kinds:
            raise ValueError(
                f"data.{key} only applies to source {' or '.join(kinds)}, not {source!r}"
            )
    if kind == "imagefolder" and "path" not in given:
        raise ValueError("data.path is required for source imagefolder (one subfolder per class)")
    on_bad_file = given.get("on_bad_file", _DEFAULTS["on_bad_file"])
    if on_bad_file not in _BAD_FILE_CHOICES:
        raise ValueError(
            f"data.on_bad_file must be one of {', '.join(_BAD_FILE_CHOICES)}, got {on_bad_file!r}"
        )
    download = given.get("download", _DEFAULTS["download"])
    if not isinstance(download, bool):
        raise ValueError(f"data.download must be true or false, got {download!r}")
    val_fraction = given.get("val_fraction", _DEFAULTS["val_fraction"])
    if not _is_real(val_fraction) or not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction must be a number in (0, 1), got {val_fraction!r}")
    max_memory_mb = given.get("max_memory_mb", _DEFAULTS["max_memory_mb"])
    if not _is_real(max_memory_mb) or max_memory_mb < 0:
        raise ValueError(f"data.max_memory_mb must be a number >= 0, got {max_memory_mb!r}")
    seed = given.get("seed")
    return DataSpec(
        source=source,
        path=_path(given, "path"),
        val_path=_path(given, "val_path"),
        root=_path(given, "root") or Path(_DEFAULTS["root"]).expanduser(),
        download=download,
        samples_per_class=(
            None
            if "samples_per_class" not in given
            else _integer(given, "samples_per_class", minimum=1)
        ),
        val_fraction=float(val_fraction),
        seed=None if seed is None else check_seed(seed, field="data.seed"),
        image_size=_integer(given, "image_size", minimum=1),
        fake_size=_integer(given, "fake_size", minimum=1),
        fake_classes=_integer(given, "fake_classes", minimum=2),
        on_bad_file=on_bad_file,
        num_workers=_integer(given, "num_workers", minimum=0),
        max_memory_mb=float(max_memory_mb),
    )


def check_seed(seed: Any, *, field: str) -> int:
    """``seed`` as an int, or a ValueError naming ``field``."""
    # sklearn's random_state and numpy generators accept 0 .. 2**32 - 1.
    if not _is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"{field} must be an integer in [0, 2**32), got {seed!r}")
    return int(seed)


def _integer(given: Mapping[str, Any], key: str, *, minimum: int) -> int:
    value = given.get(key, _DEFAULTS[key])
    if not _is_int(value) or value < minimum:
        raise ValueError(f"data.{key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _path(given: Mapping[str, Any], key: str) -> Path | None:
    value = given.get(key)
    if value is None:
        return None
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ValueError(f"data.{key} must be a path, got {value!r}")
    return Path(value).expanduser()


# bool is an int subclass, but `true` for a count or a fraction is a config mistake.
def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral)


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)
