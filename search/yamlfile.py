"""Reading a YAML file a user points at, with bounds: size, encoding, and alias expansion.

A config is small, hand-written text. Anything else (a directory, a binary, a huge file,
a "billion laughs" document whose nested aliases expand to gigabytes) is refused with one
line before it can take time or memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["MAX_BYTES", "MAX_NODES", "YamlFileError", "read_yaml"]

MAX_BYTES = 1_000_000  # a config is a few kB; 1 MB leaves room for long point lists
# Nodes of the document once every alias is expanded (what a consumer walking it sees).
MAX_NODES = 100_000


class YamlFileError(ValueError):
    """A file that is not a readable, bounded YAML document; the message names it and why."""


def _expanded_nodes(node: yaml.Node, memo: dict[int, int], limit: int) -> int:
    # Aliases share node objects: count each by identity once, then multiply by its uses,
    # so a bomb is measured without being expanded.
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts as itself while it is being measured
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children: list[yaml.Node] = list(node.value)
    elif isinstance(node, yaml.MappingNode):
        children = [n for pair in node.value for n in pair]
    else:
        children = []
    for child in children:
        total += _expanded_nodes(child, memo, limit)
        if total > limit:
            break
    memo[key] = total
    return total


def read_yaml(path: str | Path, *, what: str = "config") -> Any:
    """The document in ``path``, parsed with ``yaml.SafeLoader`` within the bounds above.

    Raises:
        YamlFileError: Missing, a directory, over ``MAX_BYTES``, not UTF-8, not YAML, or
            expanding to more than ``MAX_NODES`` nodes; the message starts with ``what``.
    """
    path = Path(path)
    where = f"{what}: {str(path)!r}"
    if not path.exists():
        raise YamlFileError(f"{where} does not exist")
    if path.is_dir():
        raise YamlFileError(f"{where} is a directory, not a YAML file")
    try:
        with path.open("rb") as handle:
            raw = handle.read(MAX_BYTES + 1)
    except OSError as err:
        raise YamlFileError(f"{where} cannot be read ({err.strerror or err})") from None
    if len(raw) > MAX_BYTES:
        raise YamlFileError(f"{where} is larger than {MAX_BYTES // 1_000_000} MB; a config is "
                            f"a small text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise YamlFileError(f"{where} is not UTF-8 text (byte {err.start}); save it as "
                            f"UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_nodes(node, {}, MAX_NODES) > MAX_NODES:
            raise YamlFileError(f"{where} expands to more than {MAX_NODES:,} nodes through "
                                f"its aliases (&anchor / *alias); write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        detail = " ".join(str(err).split())
        raise YamlFileError(f"{where} is not valid YAML: {detail}") from None
    except RecursionError:
        raise YamlFileError(f"{where} is nested too deeply to be a config") from None
    finally:
        loader.dispose()
