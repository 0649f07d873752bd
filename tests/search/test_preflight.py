"""Pre-flight: what the machine cannot do for a valid config is refused before Ray starts.

Each refusal is exit 2 with one ``ftsearch: <field>: ...`` line on stderr and nothing
created under the storage directory. Files are real (corrupt state dicts, missing
folders, an empty torch hub cache); the only stand-in is the network probe, which tests
replace so that they never touch the network.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import search.preflight as preflight
from search import session
from search.cli import main
from search.config import load_config
from tests.conftest import ROOT, ftsearch_env, refused

# A subprocess pays the imports (torch for a weights file) but must still answer quickly.
_SUBPROCESS_LIMIT_S = 5.0
# The real probe, kept before the autouse fixture replaces it; only loopback tests call it.
_REAL_PROBE = preflight._download_reachable


@pytest.fixture(autouse=True)
def _no_ray_no_network(monkeypatch):
    """Fails fast if a refused run would start Ray; no test may probe the network."""

    def start_ray(**_kwargs):
        raise AssertionError("pre-flight let the run through: Ray was about to start")

    def probe(url):
        raise AssertionError(f"a test reached the network probe for {url}")

    monkeypatch.setattr(session, "start_ray", start_ray)
    monkeypatch.setattr(preflight, "_download_reachable", probe)


def _config(tmp_path: Path, **changes) -> Path:
    """A valid config with ``changes`` (dotted keys) applied, written to ``tmp_path``."""
    raw = {
        "name": "pf",
        "storage": str(tmp_path / "runs"),
        "data": {"source": "digits"},
        "space": {"lr": {"type": "loguniform", "low": 0.001, "high": 0.1}},
    }
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path



def _never(*args):
    raise AssertionError(f"called with {args}")


def _corrupt(path: Path) -> Path:
    # The first 300 bytes of a real torch.save file: a zip archive without its directory.
    torch.save({"w": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:300])
    return path


def _state_dict(path: Path, **extra) -> Path:
    torch.save({"weight": torch.ones(3, 2), "bias": torch.zeros(3), **extra}, path)
    return path


def _imagenet_file(backbone: str) -> str:
    import torchvision

    return os.path.basename(torchvision.models.get_model_weights(backbone).DEFAULT.url)


# ---------------------------------------------------------------------------- storage, resources


def test_storage_that_cannot_be_created(tmp_path, capsys):
    line = refused(capsys, _config(tmp_path, storage="/proc/x"))
    assert line.startswith("storage: '/proc/x': cannot create files in /proc/x")
    assert not Path("/proc/x").exists()


def test_storage_that_is_a_file(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file")
    line = refused(capsys, _config(tmp_path, storage=str(tmp_path / "taken")))
    assert line.startswith("storage: ") and "is a file, not a directory" in line
    assert (tmp_path / "taken").read_text() == "a file"


def test_more_cpus_per_trial_than_this_machine_has(tmp_path, capsys):
    cores = os.cpu_count() or 1
    line = refused(capsys, _config(tmp_path, **{"resources.cpu": cores + 1}))
    assert line.startswith(f"resources.cpu: {cores + 1} CPU per trial") and f"{cores} cores" in line
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------- weights


def test_imagenet_weights_neither_cached_nor_downloadable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    probed = []
    monkeypatch.setattr(preflight, "_download_reachable", lambda url: probed.append(url) or False)
    config = _config(tmp_path, **{"train.backbone": "resnet50", "train.weights": "imagenet"})
    line = refused(capsys, config)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    file = _imagenet_file("resnet50")
    assert line == (f"train.weights: 'imagenet' weights of resnet50 are not in the torch hub "
                    f"cache {cache} and download.pytorch.org is unreachable; copy {file} there "
                    f"(the cache follows $TORCH_HOME), give a state-dict path, or use "
                    f"efficientnet_lite0 with weights: packaged")
    assert len(probed) == 1 and probed[0].endswith("/" + file)
    assert not (tmp_path / "runs").exists()


def test_imagenet_weights_from_the_cache_or_the_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cfg = load_config(_config(tmp_path, **{"train.backbone": "resnet18",
                                           "train.weights": "imagenet"}))
    # Not cached, but the host answers: the trial will download it.
    monkeypatch.setattr(preflight, "_download_reachable", lambda url: True)
    assert preflight.preflight_problems(cfg, local=True) == []
    # Cached and readable: no probe at all.
    monkeypatch.setattr(preflight, "_download_reachable", _never)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    _state_dict(cache / _imagenet_file("resnet18"))
    assert preflight.preflight_problems(cfg, local=True) == []
    # Cached but corrupt: the trial would fail reading it, so it is named.
    _corrupt(cache / _imagenet_file("resnet18"))
    [problem] = preflight.preflight_problems(cfg, local=True)
    assert problem.startswith("train.weights: 'imagenet' weights of resnet18: the torch hub "
                              "cache holds") and "delete it" in problem


def test_corrupt_state_dict_as_train_weights(tmp_path, capsys):
    bad = _corrupt(tmp_path / "bad.pt")
    line = refused(capsys, _config(tmp_path, **{"train.weights": str(bad)}))
    assert line.startswith(f"train.weights: cannot read '{bad}' as a state dict (RuntimeError: ")
    assert not (tmp_path / "runs").exists()


def test_corrupt_state_dict_among_searched_weights(tmp_path, capsys):
    good, bad = _state_dict(tmp_path / "good.pt"), _corrupt(tmp_path / "bad.pt")
    space = {"type": "choice", "values": ["none", str(good), str(bad)]}
    line = refused(capsys, _config(tmp_path, **{"space.weights": space}))
    assert line.startswith(f"space.weights.values: cannot read '{bad}' as a state dict")
    assert not (tmp_path / "runs").exists()


def test_a_file_every_backbone_reads_is_named_once(tmp_path, capsys):
    bad = _corrupt(tmp_path / "bad.pt")
    backbones = {"type": "choice", "values": ["resnet18", "alexnet", "efficientnet_lite0"]}
    line = refused(capsys, _config(tmp_path, **{"train.weights": str(bad),
                                                 "space.backbone": backbones}))
    assert line.startswith("train.weights: cannot read")


def test_weights_mapping_names_the_backbone_entry(tmp_path, capsys):
    weights = {"resnet18": str(tmp_path / "missing.pt"), "default": "none"}
    line = refused(capsys, _config(tmp_path, **{"train.weights": weights}))
    assert line.startswith(f"train.weights.resnet18: '{tmp_path / 'missing.pt'}' is neither "
                           f"one of ['none', 'imagenet', 'packaged'] nor an existing file")


@pytest.mark.parametrize("content", ["pickle", "not_tensors", "directory", "fifo", "empty"])
def test_files_that_are_not_state_dicts(tmp_path, content):
    path = tmp_path / "w.pt"
    if content == "pickle":
        torch.save(torch.nn.Linear(2, 3), path)  # a whole module: not weights-only loadable
    elif content == "not_tensors":
        torch.save({"weight": torch.ones(2), "step": 3}, path)
    elif content == "directory":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)  # reading it would block pre-flight forever
    else:
        path.write_bytes(b"")
    cfg = load_config(_config(tmp_path, **{"train.weights": str(path)}))
    [problem] = preflight.preflight_problems(cfg, local=True)
    expected = {"directory": f"train.weights: '{path}' is a directory",
                "fifo": f"train.weights: '{path}' is not a regular file"}
    unreadable = f"train.weights: cannot read '{path}' as a state dict ("
    assert problem.startswith(expected.get(content, unreadable)), problem
    # One line even where torch's own error runs to paragraphs.
    assert "\n" not in problem and len(problem) < 400


def test_readable_weights_pass(tmp_path):
    plain = _state_dict(tmp_path / "plain.pt")
    checkpoint = tmp_path / "checkpoint.pt"  # a training checkpoint keeps it under "model"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": torch.tensor(3)}, checkpoint)
    legacy = tmp_path / "legacy.pt"  # the pre-zip format, which cannot be memory-mapped
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    space = {"type": "choice", "values": [str(plain), str(checkpoint), str(legacy)]}
    cfg = load_config(_config(tmp_path, **{"space.weights": space}))
    assert preflight.preflight_problems(cfg, local=True) == []


def test_packaged_lite0_weights_pass(tmp_path):
    cfg = load_config(_config(tmp_path, **{"train.backbone": "efficientnet_lite0",
                                           "train.weights": "packaged"}))
    assert preflight.preflight_problems(cfg, local=True) == []


# ---------------------------------------------------------------------------- data


def test_imagefolder_that_does_not_exist(tmp_path, capsys):
    data = {"source": "imagefolder", "path": str(tmp_path / "images")}
    line = refused(capsys, _config(tmp_path, data=data))
    assert line == f"data.path: folder {tmp_path / 'images'} does not exist"
    assert not (tmp_path / "runs").exists()


def test_torchvision_dataset_root_that_does_not_exist(tmp_path, capsys):
    data = {"source": "torchvision:CIFAR10", "root": str(tmp_path / "datasets")}
    line = refused(capsys, _config(tmp_path, data=data))
    assert line.startswith(f"data.root: '{tmp_path / 'datasets'}' does not exist")
    assert "data.download: true" in line


# ---------------------------------------------------------------------------- scope


def test_a_cluster_run_leaves_weights_and_data_to_its_workers(tmp_path):
    # The driver's disks are not the workers' (Ray Client, node-local datasets).
    bad = _corrupt(tmp_path / "bad.pt")
    cfg = load_config(_config(tmp_path, **{"train.weights": str(bad), "resources.cpu": 4096},
                              data={"source": "imagefolder", "path": str(tmp_path / "no")}))
    assert preflight.preflight_problems(cfg, local=False) == []
    assert len(preflight.preflight_problems(cfg, local=True)) == 3


def test_every_problem_is_reported_at_once(tmp_path, capsys):
    bad = _corrupt(tmp_path / "bad.pt")
    config = _config(tmp_path, storage="/proc/x", **{"train.weights": str(bad)},
                     data={"source": "imagefolder", "path": str(tmp_path / "no")})
    assert main(["run", str(config)]) == 2
    fields = [ln.split(":")[1].strip() for ln in capsys.readouterr().err.splitlines()]
    assert fields == ["storage", "data.path", "train.weights"]


# ---------------------------------------------------------------------------- the probe


def test_probe_connects_to_what_the_host_resolves_to(monkeypatch):
    # Loopback only: a listening socket answers, a closed port and no address do not.
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    url = "https://download.example/w.pth"
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        found = [(socket.AF_INET, socket.SOCK_STREAM, 0, "", server.getsockname())]
        monkeypatch.setattr(preflight, "_resolve", lambda host, port: found)
        assert _REAL_PROBE(url) is True
    assert _REAL_PROBE(url) is False  # the port is closed now
    monkeypatch.setattr(preflight, "_resolve", lambda host, port: [])
    assert _REAL_PROBE(url) is False  # the host does not resolve
    # Behind a proxy nothing can be verified from here: assume it works, resolve nothing.
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setattr(preflight, "_resolve", _never)
    assert _REAL_PROBE(url) is True


# ---------------------------------------------------------------------------- a real process

_SCRIPT = """
import json, sys
import search.preflight
search.preflight._download_reachable = lambda url: False  # never the network
from search.cli import main
code = main(["run", sys.argv[1]])
heavy = ("ray", "torch", "torchvision", "sklearn")
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def _timed(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=ftsearch_env(),
                          capture_output=True, text=True, timeout=120)
    return time.perf_counter() - start, proc


@pytest.mark.parametrize(("case", "field", "loaded"), [
    ("storage", "storage", []),  # nothing needs torch
    ("weights", "train.weights", ["torch"]),  # torch.load; not torchvision, not sklearn
    ("imagefolder", "data.path", []),  # folders are listed without torch
])
def test_refused_in_a_fresh_process_quickly_without_ray(tmp_path, case, field, loaded):
    if case == "storage":
        config = _config(tmp_path, storage="/proc/x")
    elif case == "weights":
        config = _config(tmp_path, **{"train.weights": str(_corrupt(tmp_path / "bad.pt"))})
    else:
        config = _config(tmp_path, data={"source": "imagefolder", "path": str(tmp_path / "no")})
    wall, proc = _timed("-c", _SCRIPT, str(config))
    assert json.loads(proc.stdout) == {"code": 2, "loaded": loaded}, proc.stdout + proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"ftsearch: {field}: ")
    assert not (tmp_path / "runs").exists()
    if not loaded:
        assert wall < _SUBPROCESS_LIMIT_S, f"{wall:.2f} s"
    else:
        # Importing torch alone takes 2-5 s on a small or busy machine: bound what
        # pre-flight adds to it, measured side by side.
        torch_wall, _ = _timed("-c", "import trainables, torch")
        assert wall < max(_SUBPROCESS_LIMIT_S, torch_wall + 4), (wall, torch_wall)
