"""Where an experiment's results live: local path or URI, shared by every node or not.

``storage`` in a config is a local directory, a path on a shared filesystem, or a URI
pyarrow can write (``s3://``, ``gs://``). The experiment directory is ``<storage>/<name>``.
"""

from __future__ import annotations

import os
import re
import stat
import uuid
from pathlib import Path

__all__ = [
    "FileTargetError",
    "experiment_dir",
    "file_target",
    "frozen_cache_dir",
    "is_uri",
    "probe_writable",
    "replace_file",
    "shared_storage",
    "storage_filesystem",
    "storage_root",
]

# Filesystem types (as /proc/mounts names them) whose files every node sees.
_SHARED_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs",
    "wekafs", "panfs", "afs", "orangefs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs",
    "fuse.gcsfuse", "fuse.juicefs", "fuse.mountpoint-s3", "fuse.goofys", "fuse.sshfs",
})


# What `--out` may not be, as a message names it (a regular file or a new name is fine).
_SPECIAL_FILES = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                  (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


class FileTargetError(ValueError):
    """A path that cannot be written as a regular file; the message names it and why."""


def is_uri(storage: str) -> bool:
    """Whether ``storage`` is a URI (``s3://...``) rather than a local path."""
    return "://" in storage


def storage_root(storage: str) -> str:
    """``storage`` as Tune's ``storage_path``: the URI, or the absolute local path."""
    if is_uri(storage):
        return storage.rstrip("/")
    return str(Path(storage).expanduser().resolve())


def experiment_dir(storage: str, name: str) -> str:
    """``<storage>/<name>``, absolute for local storage."""
    return f"{storage_root(storage)}/{name}"


def frozen_cache_dir(storage: str, name: str) -> str:
    """Where the trials of experiment ``name`` keep their frozen-stage cache.

    It is shared by the trials of a node (trainables/cache.py): beside the results for local
    storage, in each node's home for remote storage.
    """
    if is_uri(storage):
        return f"~/.cache/ftsearch/frozen/{name}"
    return str(Path(experiment_dir(storage, name)) / ".cache")


def probe_writable(directory: str | Path) -> str | None:
    """Why files cannot be created in local ``directory`` (made if missing), or None.

    Creates the directory's missing parents, then writes and removes a probe file: as root,
    ``os.access`` says yes to read-only mounts and to ``/proc``, so only a write tells.
    Directories this call created are removed again, so a refused run leaves nothing.
    """
    path = Path(directory).expanduser().absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is a file, not a directory"
    created = [p for p in (path, *path.parents) if not p.exists()]
    probe = path / f".ftsearch-probe-{uuid.uuid4().hex}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        return f"cannot create files in {path} ({err.strerror or err})"
    finally:
        for made in created:  # deepest first
            try:
                made.rmdir()
            except OSError:
                break
    return None


def file_target(out: str | os.PathLike[str]) -> Path:
    """The regular file ``out`` names, checked before any work writes it (``--out``).

    ``out`` is an existing, writable regular file (a link to one is followed, so the
    link stays) or a new name in a directory that exists or can be made, and is
    writable. Creates nothing.

    Raises:
        FileTargetError: ``out`` is empty, a directory, a device, FIFO or socket (or a
            link to one), under a regular file, read-only or in an unwritable place.
    """
    text = os.fspath(out)
    if not text:
        raise FileTargetError("empty path; name the model file to write")
    if text.endswith(os.sep):
        raise FileTargetError(f"{text}: names a directory; name a file in it")
    # The rename replaces a link itself, so write where it points; a replaced device
    # node (as root, /dev/null) would be a disaster, hence the checks on the target.
    given = Path(text).expanduser()
    path = Path(os.path.realpath(given))
    shown = f"{text} (a link to {path})" if given.is_symlink() else text
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None  # a new file; probe_writable names a file on its way
    except OSError as err:  # a link loop, no permission
        raise FileTargetError(f"{shown}: {err.strerror or err}") from None
    if mode is not None:
        if stat.S_ISDIR(mode):
            raise FileTargetError(f"{shown}: a directory; name a file in it")
        if not stat.S_ISREG(mode):
            kind = next((name for is_kind, name in _SPECIAL_FILES if is_kind(mode)),
                        "a special file")
            raise FileTargetError(f"{shown}: {kind}, not a regular file")
        # The rename would replace a read-only file; overwriting it is not what it is for.
        if not os.access(path, os.W_OK):
            raise FileTargetError(f"{shown}: a read-only file")
    why = probe_writable(path.parent)
    if why is not None:
        raise FileTargetError(f"{shown}: {why}")
    return path


def replace_file(path: str | Path, data: bytes) -> None:
    """Writes ``data`` as local file ``path`` atomically: a reader, or a driver killed
    mid-write, sees the old file or the whole new one, and no temp file stays behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def storage_filesystem(path: str | Path, *, mounts: str = "/proc/mounts") -> str | None:
    """The filesystem type holding ``path`` (its nearest existing ancestor), per ``mounts``.

    Returns:
        The type, e.g. ``ext4`` or ``nfs4``; ``None`` where the mount table is unreadable
        (not Linux).
    """
    try:
        table = Path(mounts).read_text()
    except OSError:
        return None
    path = Path(path).expanduser().resolve()
    best, best_type = "", None
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        # /proc/mounts writes a space in a mount point as \040 (octal escapes).
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = path == Path(point) or Path(point) in path.parents
        if inside and len(point) >= len(best):
            best, best_type = point, fields[2]
    return best_type


def shared_storage(storage: str, *, declared: bool = False,
                   mounts: str = "/proc/mounts") -> str | None:
    """Why every Ray node sees the same ``storage``, or ``None`` if it may be node-local.

    A URI (``s3://``, ``gs://``...) is shared, so is a path on a network or cluster
    filesystem (NFS, EFS, Lustre, a FUSE bucket mount...), and a path the config declares
    shared (``declared``, from ``storage_shared: true``).
    """
    if is_uri(storage):
        return f"{storage} is a URI"
    if declared:
        return "the config declares it shared (storage_shared: true)"
    fs = storage_filesystem(storage, mounts=mounts)
    if fs in _SHARED_FILESYSTEMS:
        return f"{storage} is on a {fs} filesystem"
    return None
