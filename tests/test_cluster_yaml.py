"""cluster.yaml: valid for Ray's autoscaler, and shaped the way the README promises."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from search.jobs import EXCLUDES

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_rays_schema(cluster):
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)
    # What `ray up` does before launching anything: merge the AWS defaults, validate again.
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_head_runs_no_trials_and_gpu_workers_autoscale(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert not head["resources"].get("GPU")
    assert any("--num-cpus=0" in c for c in cluster["head_start_ray_commands"])
    workers = [t for name, t in types.items() if name != cluster["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1
    assert gpu[0]["max_workers"] > gpu[0]["min_workers"] >= 0
    assert cluster["max_workers"] >= gpu[0]["max_workers"]
    assert gpu[0]["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU family


def test_setup_installs_ftsearch_and_mounts_shared_storage(cluster):
    setup = " ".join(cluster["setup_commands"])
    assert "pip install" in setup and "-e /home/ubuntu/ftsearch" in setup
    assert "ray[default,tune]==" in setup
    assert cluster["file_mounts"]["/home/ubuntu/ftsearch"] == "."
    assert "mount -t nfs4" in setup and "/mnt/shared" in setup
    commands = (cluster["setup_commands"] + cluster["head_setup_commands"]
                + cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"])
    for command in commands:  # each is run by bash on the node: it must parse
        check = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert check.returncode == 0, (command, check.stderr)


def test_token_auth_on_every_node_and_nothing_secret_is_synced(cluster):
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    starts = cluster["head_start_ray_commands"][1:] + cluster["worker_start_ray_commands"][1:]
    for command in starts:
        assert "RAY_AUTH_MODE=token ray start" in command
    for pattern in ("runs", ".venv", ".git", "data", ".env", "*.pem", "*.key"):
        assert pattern in cluster["rsync_exclude"] and pattern in EXCLUDES
