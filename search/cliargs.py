"""Command-line arguments that several ``ftsearch`` commands share: config overrides.

``run``, ``rank``, ``advise`` and ``submit`` take a config and the same three ways to
change it; declared here once, so their spelling, help and meaning cannot drift apart.
"""

from __future__ import annotations

import argparse

__all__ = ["add_override_arguments", "config_overrides"]


def add_override_arguments(parser: argparse.ArgumentParser, *, storage_help: str) -> None:
    """Adds ``--set`` (repeatable), ``--name`` and ``--storage`` to ``parser``.

    Args:
        parser: A command's parser.
        storage_help: What ``--storage`` names for this command (a local directory, a URI).
    """
    parser.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                        help="override a config field (repeatable)")
    parser.add_argument("--name", help="experiment name (overrides `name`)")
    parser.add_argument("--storage", help=f"{storage_help} (overrides `storage`)")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items, then ``--name`` and ``--storage`` as the overrides they stand for."""
    found = list(args.set or [])
    if args.name:
        found.append(f"name={args.name}")
    if args.storage:
        found.append(f"storage={args.storage}")
    return found
