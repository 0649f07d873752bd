"""Ray Jobs: submit a search to a Ray cluster, watch it, stop it.

``ftsearch submit`` checks the config on this machine, then packs the project
directory as the job's ``working_dir`` (without results, virtualenvs, git
history, data or credential-like files, see :data:`EXCLUDES`) and starts
``python -m search.cli run CONFIG`` on the cluster's head node. That driver
joins the cluster (Ray sets ``RAY_ADDRESS`` for it) and runs the same search a
laptop would, with the trials spread over the cluster's nodes.

Token authentication: the dashboard of a Ray cluster with token auth answers
only requests carrying the cluster's token. It is read from where Ray itself
looks (``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``,
``~/.ray/auth_token``), sent as a bearer header, and never printed: every
message shown to the user passes through a redaction of it.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from search.contract import EXIT_BAD_INPUT, EXIT_FAILED

__all__ = [
    "EXCLUDES",
    "JobsError",
    "JobSummary",
    "build_runtime_env",
    "follow_logs",
    "job_logs",
    "job_status",
    "list_jobs",
    "project_root",
    "stop_job",
    "submit_search",
    "wait_for_job",
]

# Never uploaded with the working_dir (gitignore patterns, relative to it). Directory
# patterns carry no trailing slash so Ray skips the whole tree instead of walking it.
EXCLUDES: tuple[str, ...] = (
    # results, environments, caches, history: large, and rebuilt on the cluster
    "runs", ".venv", "venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache",
    ".ruff_cache", ".mypy_cache", "build", "dist", ".devbundle",
    # datasets belong on shared storage, not in a job package (Ray's limit: 100 MiB)
    "data", "datasets",
    # credentials must never leave this machine
    ".env", ".env.*", "*.pem", "*.key", "*.p12", "*.pfx", "id_rsa*", "id_ecdsa*",
    "id_ed25519*", ".netrc", ".aws", ".ssh", "auth_token",
)


_TOKEN_FILE = Path("~/.ray/auth_token")
# Config fields naming paths on the cluster: they need not exist on this machine.
_CLUSTER_PATH_FIELDS = ("storage:", "data.path", "data.val_path", "data.root")


class JobsError(Exception):
    """A job command that cannot proceed; ``code`` is the CLI exit code (1 or 2)."""

    def __init__(self, message: str, *, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class JobSummary:
    """What ``ftsearch jobs status`` shows of one job."""

    job_id: str
    status: str
    message: str
    entrypoint: str
    metadata: dict[str, str]

    @property
    def done(self) -> bool:
        return self.status in ("SUCCEEDED", "FAILED", "STOPPED")


def project_root() -> Path:
    """The ftsearch project directory: the one holding the ``search`` package."""
    return Path(__file__).resolve().parents[1]


# --- authentication
def _read_token() -> tuple[str | None, str]:
    """(the cluster token or None, where it came from), looked up where Ray looks."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(named).expanduser() if named else _TOKEN_FILE.expanduser()
    source = "RAY_AUTH_TOKEN_PATH" if named else str(_TOKEN_FILE)
    try:
        token = path.read_text().strip()
    except OSError:
        if named:
            raise JobsError(f"RAY_AUTH_TOKEN_PATH: cannot read a token from {named}",
                            code=EXIT_BAD_INPUT) from None
        return None, "none found"
    return token or None, source


def _redact(text: str, token: str | None) -> str:
    return text.replace(token, "<token>") if token else text


def _normalize_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or ""
    if not address and os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        address = os.environ["RAY_ADDRESS"]
    if not address:
        raise JobsError("--address: give the Ray dashboard of the cluster, e.g. "
                        "--address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS)",
                        code=EXIT_BAD_INPUT)
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise JobsError(f"--address: {address!r} is not a dashboard URL; expected "
                        f"http://HOST:PORT or https://HOST:PORT (port 8265 by default)",
                        code=EXIT_BAD_INPUT)
    return address.rstrip("/")


class _Client:
    """A ``JobSubmissionClient`` whose errors become :class:`JobsError`, token redacted."""

    def __init__(self, address: str | None) -> None:
        self.address = _normalize_address(address)
        self.token, self.token_source = _read_token()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.raw = self._call(self._connect, headers)

    def _connect(self, headers: dict[str, str]) -> Any:
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers=headers)

    def _call(self, fn: Any, *args: Any, job_id: str | None = None, **kwargs: Any) -> Any:
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return fn(*args, **kwargs)
        except AuthenticationError:
            problem = (f"the token from {self.token_source} was refused" if self.token else
                       f"no token was found ({self.token_source})")
            raise JobsError(
                f"the Ray cluster at {self.address} uses token authentication and {problem}; "
                f"put the cluster's token (`ray get-auth-token` on the head node) in "
                f"RAY_AUTH_TOKEN or {_TOKEN_FILE}") from None
        except (ConnectionError, requests.RequestException, aiohttp.ClientError):
            raise JobsError(
                f"cannot reach the Ray dashboard at {self.address}: is the cluster up "
                f"(`ray up cluster.yaml`) and its port 8265 reachable (e.g. "
                f"`ray dashboard cluster.yaml` forwards it to localhost)?") from None
        except RuntimeError as err:
            text = _redact(str(err), self.token)
            if job_id is not None and ("404" in text or "does not exist" in text):
                raise JobsError(f"job {job_id}: no such job on {self.address}",
                                code=EXIT_BAD_INPUT) from None
            raise JobsError(f"the Ray cluster at {self.address} answered: {text}") from None


# --- submission
def _inside(root: Path, path: str | None) -> str | None:
    """``path`` relative to ``root`` as a POSIX pattern, if it lies inside it."""
    if not path or "://" in path:
        return None
    target = Path(path).expanduser()
    target = (root / target if not target.is_absolute() else target).resolve()
    try:
        rel = target.relative_to(root)
    except ValueError:
        return None
    return f"/{rel.as_posix()}" if rel.parts else None


def build_runtime_env(working_dir: Path, *, extra_excludes: Sequence[str] = ()
                      ) -> dict[str, Any]:
    """The job's runtime_env: ``working_dir`` uploaded without :data:`EXCLUDES`.

    Args:
        working_dir: The directory to upload; it becomes the job's (and every
            trial's) working directory and the first entry of its ``PYTHONPATH``.
        extra_excludes: More gitignore patterns relative to ``working_dir``, e.g.
            the config's storage folder when it lies inside it.
    """
    return {"working_dir": str(working_dir),
            "excludes": list(dict.fromkeys([*EXCLUDES, *extra_excludes]))}


def _excluded(rel: PurePosixPath, excludes: Sequence[str]) -> bool:
    # The matcher Ray's packager applies to the upload, so the answer is the same.
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", excludes)
    parts = rel.parts
    # A file is left out when it or any folder above it matches (Ray skips the folder).
    return any(spec.match_file("/".join(parts[:i])) for i in range(1, len(parts) + 1))


def _data_problems(raw: Mapping[str, Any], root: Path) -> list[str]:
    data = raw.get("data") if isinstance(raw.get("data"), Mapping) else {}
    problems = []
    for key in ("path", "val_path", "root"):
        value = data.get(key)
        if not isinstance(value, str) or "://" in value:
            continue
        if not Path(value).expanduser().is_absolute() or _inside(root, value):
            problems.append(
                f"data.{key}: {value!r} is in the uploaded directory, but data is never "
                f"uploaded (Ray's limit is 100 MiB); give an absolute path on storage every "
                f"node mounts (e.g. /mnt/shared/images) or a URI")
    return problems


def _checked_config(config: Path, overrides: Sequence[str], root: Path) -> dict[str, Any]:
    """The config after ``overrides``, checked here except for the cluster's own paths."""
    from search.config import ConfigError, apply_overrides, parse_config

    try:
        raw = yaml.safe_load(config.read_text())
    except OSError:
        raise JobsError(f"config: cannot read {str(config)!r}", code=EXIT_BAD_INPUT) from None
    except yaml.YAMLError as err:
        raise JobsError(f"config: {str(config)!r} is not valid YAML: {err}",
                        code=EXIT_BAD_INPUT) from None
    if not isinstance(raw, Mapping):
        raise JobsError(f"config: {str(config)!r} must hold a mapping at the top level",
                        code=EXIT_BAD_INPUT)
    try:
        raw = apply_overrides(raw, overrides)
        parse_config(raw)
    except ConfigError as err:
        # Storage and data paths name the cluster's filesystem, not this machine's:
        # `ftsearch run` checks them there.
        problems = [p for p in err.problems if not p.startswith(_CLUSTER_PATH_FIELDS)]
        if problems:
            raise JobsError("\n".join(problems), code=EXIT_BAD_INPUT) from None
    problems = _data_problems(raw, root)
    if problems:
        raise JobsError("\n".join(problems), code=EXIT_BAD_INPUT)
    storage = str(raw.get("storage", "./runs"))
    if "://" not in storage and not Path(storage).expanduser().is_absolute():
        raise JobsError(
            f"storage: {storage!r} is relative; on a cluster it would resolve inside the "
            f"job's temporary working directory and vanish with it; give an absolute path on "
            f"storage every node mounts (e.g. /mnt/shared/ftsearch) or an s3:// or gs:// URI",
            code=EXIT_BAD_INPUT)
    return raw


def _entrypoint(config: PurePosixPath, overrides: Sequence[str]) -> str:
    args = ["python", "-m", "search.cli", "run", str(config)]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def submit_search(config: str | Path, *, address: str | None, overrides: Sequence[str] = (),
                  working_dir: str | Path | None = None) -> str:
    """Submits ``ftsearch run CONFIG`` as a Ray job; returns the job (submission) id.

    Everything that can be checked here is, before the cluster is contacted.

    Args:
        config: The experiment YAML; it must lie inside ``working_dir``, which is
            what the cluster receives.
        address: The cluster's dashboard, ``http://HEAD:8265``.
        overrides: ``key.path=value`` overrides, applied here and on the cluster.
        working_dir: The directory uploaded as the job's working_dir (default:
            the ftsearch project).

    Raises:
        JobsError: Bad input (``code`` 2) or a cluster that refused or failed (1).
    """
    root = Path(working_dir or project_root()).expanduser().resolve()
    if not root.is_dir():
        raise JobsError(f"--working-dir: {root} is not a directory", code=EXIT_BAD_INPUT)
    path = Path(config).expanduser().resolve()
    if not path.is_file():
        raise JobsError(f"config: file {str(config)!r} does not exist", code=EXIT_BAD_INPUT)
    try:
        rel = PurePosixPath(path.relative_to(root).as_posix())
    except ValueError:
        raise JobsError(f"config: {path} is outside {root}, the directory uploaded to the "
                        f"cluster; move it there (e.g. configs/) or pass --working-dir",
                        code=EXIT_BAD_INPUT) from None
    raw = _checked_config(path, overrides, root)
    # Results written into the project on this machine must not travel with it.
    inside = _inside(root, raw.get("storage", "./runs"))
    runtime_env = build_runtime_env(root, extra_excludes=[inside] if inside else [])
    if _excluded(rel, runtime_env["excludes"]):
        raise JobsError(f"config: {rel} lies in a path that is never uploaded "
                        f"({', '.join(runtime_env['excludes'])}); move it, e.g. to configs/",
                        code=EXIT_BAD_INPUT)
    client = _Client(address)
    name = str(raw.get("name", "search"))
    submission_id = f"ftsearch-{name}-{uuid.uuid4().hex[:8]}"
    try:
        return client._call(
            client.raw.submit_job, entrypoint=_entrypoint(rel, overrides),
            runtime_env=runtime_env, submission_id=submission_id,
            metadata={"ftsearch.experiment": name, "ftsearch.config": str(rel),
                      "ftsearch.storage": str(raw.get("storage", "./runs"))})
    except ValueError as err:  # Ray refuses a package over its size limit
        raise JobsError(f"--working-dir: {_redact(str(err), client.token)}",
                        code=EXIT_BAD_INPUT) from None


# --- watching
def _summary(details: Any) -> JobSummary:
    return JobSummary(job_id=details.submission_id or details.job_id,
                      status=str(details.status), message=details.message or "",
                      entrypoint=details.entrypoint or "",
                      metadata=dict(details.metadata or {}))


def job_status(job_id: str, *, address: str | None) -> JobSummary:
    """The job's status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and message."""
    client = _Client(address)
    summary = _summary(client._call(client.raw.get_job_info, job_id, job_id=job_id))
    return replace(summary, message=_redact(summary.message, client.token))


def wait_for_job(job_id: str, *, address: str | None, timeout_s: float | None = None,
                 poll_s: float = 2.0) -> JobSummary:
    """Polls until the job ends (or ``timeout_s`` passes); returns its last status."""
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        summary = job_status(job_id, address=address)
        if summary.done or (end is not None and time.monotonic() > end):
            return summary
        time.sleep(poll_s)


def list_jobs(*, address: str | None) -> list[JobSummary]:
    """Every job the cluster knows, oldest first."""
    client = _Client(address)
    jobs = client._call(client.raw.list_jobs)
    jobs = sorted(jobs, key=lambda d: d.start_time or 0)
    return [_summary(d) for d in jobs]


def job_logs(job_id: str, *, address: str | None) -> str:
    """Everything the job's driver printed so far (the search's progress lines)."""
    client = _Client(address)
    return _redact(client._call(client.raw.get_job_logs, job_id, job_id=job_id), client.token)


def follow_logs(job_id: str, *, address: str | None) -> Iterator[str]:
    """The job's log, chunk by chunk as it is written, until the job ends."""
    client = _Client(address)
    client._call(client.raw.get_job_info, job_id, job_id=job_id)  # a clear error if unknown

    # tail_job_logs is async; hand out chunks as they arrive instead of the whole log.
    loop = asyncio.new_event_loop()
    chunks = client.raw.tail_job_logs(job_id)
    try:
        while True:
            try:
                chunk = client._call(loop.run_until_complete, chunks.__anext__(), job_id=job_id)
            except StopAsyncIteration:
                return
            yield _redact(chunk, client.token)
    finally:
        loop.run_until_complete(chunks.aclose())
        loop.close()


def stop_job(job_id: str, *, address: str | None) -> bool:
    """Asks the job to stop; True if it was running. Trials stop with it."""
    client = _Client(address)
    return bool(client._call(client.raw.stop_job, job_id, job_id=job_id))
