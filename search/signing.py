"""HMACs of the Tune state files that ``ftsearch resume`` makes Ray unpickle.

Ray Tune restores an experiment by unpickling files in its directory (``tuner.pkl``, the
experiment, searcher and callback state): whoever can write there can make a resume run
code. So the driver that writes those files signs them with a key kept outside every
experiment directory, and a resume refuses any file whose HMAC is missing or wrong, before
Ray reads it (``--trust`` overrides, on purpose).

The key is 32 random bytes in ``$FTSEARCH_KEY_FILE``, else
``$XDG_CONFIG_HOME/ftsearch/signing.key`` (``~/.config/...``), created on first use with
user-only permissions. Signatures live in :data:`search.contract.SIGNATURES_FILE`: per file
name, the digests of the last few versions the driver wrote, because Tune copies the files
into the directory in a background thread and a crash can leave the previous version there.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from search.contract import SIGNATURES_FILE
from search.storage import replace_file

__all__ = [
    "SEARCH_GENERATOR_STATE",
    "TUNER_STATE_FILE",
    "TUNE_STATE_PATTERNS",
    "SignatureError",
    "key_file",
    "sign_files",
    "tune_state_files",
    "unsigned_files",
]

# Every file name Ray Tune 2.x unpickles on restore (tests check them against Ray's own
# templates): the tuner, the controller's experiment state, the search algorithm's wrapper
# and searcher, the basic variant generator, the callbacks.
TUNER_STATE_FILE = "tuner.pkl"
SEARCH_GENERATOR_STATE = "search_gen_state-*.json"
TUNE_STATE_PATTERNS = (
    TUNER_STATE_FILE,
    "experiment_state-*.json",
    SEARCH_GENERATOR_STATE,
    "searcher-state-*.pkl",
    "basic-variant-state-*.json",
    "callback-states-*.pkl",
)
# Versions of one file that stay accepted: the newest write and the ones a background copy
# may not have replaced yet.
_KEPT_DIGESTS = 4
_KEY_BYTES = 32


class SignatureError(Exception):
    """The signing key cannot be read or created."""


def key_file() -> Path:
    """Where the signing key is: ``$FTSEARCH_KEY_FILE`` or the user's config directory."""
    explicit = os.environ.get("FTSEARCH_KEY_FILE")
    if explicit:
        return Path(explicit).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join("~", ".config")
    return Path(config, "ftsearch", "signing.key").expanduser()


def _key() -> bytes:
    path = key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # O_EXCL: two first runs at once must not end with two different keys.
        with contextlib.suppress(FileExistsError):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(secrets.token_bytes(_KEY_BYTES))
    try:
        key = path.read_bytes()
    except OSError as err:
        raise SignatureError(f"cannot read the signing key {path}: {err.strerror}") from None
    if len(key) < 16:
        raise SignatureError(f"the signing key {path} is shorter than 16 bytes; delete it to "
                             f"create a new one (experiments signed with it then need --trust)")
    return key


def _digest(key: bytes, name: str, content: bytes) -> str:
    # The name is signed too: a valid searcher state cannot pose as an experiment state.
    return hmac.new(key, name.encode() + b"\0" + content, hashlib.sha256).hexdigest()


def tune_state_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The files of ``directory`` (top level) that a Tune restore would unpickle."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir()
                  if any(fnmatch.fnmatchcase(p.name, pattern) for pattern in TUNE_STATE_PATTERNS))


def _read_signatures(directory: Path) -> dict[str, list[str]]:
    try:
        data = json.loads((directory / SIGNATURES_FILE).read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def sign_files(experiment: str | os.PathLike[str], files: Iterable[Path]) -> None:
    """Records the HMAC of each of ``files`` (by name) in ``experiment``'s signatures.

    ``files`` may sit in Tune's staging directory: a copy of the same bytes under the same
    name in the experiment directory then verifies.
    """
    directory = Path(experiment)
    key = _key()
    signatures = _read_signatures(directory)
    for file in files:
        digest = _digest(key, file.name, file.read_bytes())
        kept = [d for d in signatures.get(file.name, []) if d != digest]
        signatures[file.name] = [*kept, digest][-_KEPT_DIGESTS:]
    replace_file(directory / SIGNATURES_FILE,
                 json.dumps({"version": 1, "files": signatures}, indent=1).encode())


def unsigned_files(experiment: str | os.PathLike[str]) -> list[str]:
    """Names of Tune state files in ``experiment`` whose HMAC is missing or does not match."""
    directory = Path(experiment)
    files = tune_state_files(directory)
    if not files:
        return []
    key = _key()
    signatures = _read_signatures(directory)
    return [f.name for f in files
            if not _accepted(_digest(key, f.name, f.read_bytes()), signatures.get(f.name, []))]


def _accepted(digest: str, known: list[str]) -> bool:
    return any(hmac.compare_digest(digest, str(k)) for k in known)
