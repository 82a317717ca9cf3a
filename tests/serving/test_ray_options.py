"""Asking for a Ray cluster without a cluster (issue 17): what is checked in the caller's process
before anything starts, and that nothing imports Ray unless a deployment asks for it. These run
in CI, where Ray is not installed; the cluster itself is tested in ``test_ray_cluster.py``
(marked ``ray``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fastgen
from fastgen import cli
from fastgen.serving import ray_placement
from fastgen.serving.ray_placement import RayCluster, RayNotInstalledError, cluster_spec


@pytest.fixture
def without_ray(monkeypatch):
    monkeypatch.setattr(ray_placement, "ray_installed", lambda: False)


@pytest.fixture
def with_ray(monkeypatch):
    """As if Ray were installed (nothing here imports it)."""
    monkeypatch.setattr(ray_placement, "ray_installed", lambda: True)


def test_nothing_imports_ray_until_a_deployment_asks_for_it():
    code = (
        "import json, sys, fastgen, fastgen.cli, fastgen.serving.launcher, fastgen.serving.server\n"
        "from fastgen.serving.ray_placement import RayCluster, cluster_spec\n"
        "cluster_spec('local')\n"
        "print(json.dumps(sorted(name for name in sys.modules if name.split('.')[0] == 'ray')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_serve_on_ray_without_ray_says_what_to_install(without_ray, llama_path):
    with pytest.raises(RayNotInstalledError, match=r"pip install 'fastgen\[ray\]'"):
        fastgen.serve(llama_path, cluster="ray")
    with pytest.raises(ImportError, match="needs Ray"):  # an ImportError too, for callers that catch those
        fastgen.serve(llama_path, cluster=RayCluster(address="auto"))


def test_the_cli_says_it_in_one_line(without_ray, llama_path, capsys):
    assert cli.main(["serve", llama_path, "--ray", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastgen: error: ") and "pip install 'fastgen[ray]'" in err
    assert "Traceback" not in err


def test_ray_options_are_checked(with_ray, llama_path, capsys):
    assert cluster_spec("local") is None
    assert cluster_spec("ray", "10.0.0.1:6379") == RayCluster(address="10.0.0.1:6379")
    ported = RayCluster(router_port=29000)
    assert cluster_spec(ported, "auto") == RayCluster(address="auto", router_port=29000)
    with pytest.raises(ValueError, match="ray_address needs cluster='ray'"):
        cluster_spec("local", "auto")
    with pytest.raises(ValueError, match="cluster must be"):
        cluster_spec("kubernetes")
    with pytest.raises(ValueError, match="must not be negative"):
        cluster_spec(RayCluster(resources={"fastgen": -1}))
    # GPUs named for this host mean nothing on another node: refused before anything starts
    with pytest.raises(ValueError, match="on Ray a replica uses its actor's"):
        fastgen.serve(llama_path, cluster="ray", device_map=[0])
    with pytest.raises(ValueError, match="on Ray a replica uses its actor's"):
        fastgen.serve(llama_path, cluster="ray", device_ids=[0])
    assert cli.main(["serve", llama_path, "--ray-address", "auto", "--port", "0"]) == 1
    assert "--ray-address and --ray-router-port need --ray" in capsys.readouterr().err
