"""Lazy re-exports for a package ``__init__`` whose submodules import torch.

The driver imports the torch-free parts of :mod:`trainables.models` and
:mod:`trainables.data` (registry metadata, the data spec) to check a config in well under
a second; names whose module needs torch load on first access (PEP 562).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` resolving each name from its submodule.

    Args:
        package: The package's ``__name__``.
        exports: Public name -> submodule (relative to ``package``) that defines it.
    """

    def __getattr__(name: str) -> Any:
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
