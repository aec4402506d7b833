"""examples/kubernetes/tfjob.yaml against what Kubeflow's training operator does with it: the
TF_CONFIG it writes into every replica parses to the cluster of the replicas' headless services,
and the container's command is one distsrv runs."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import yaml

from distsrv import ClusterSpec

MANIFEST = pathlib.Path(__file__).parent.parent / "examples" / "kubernetes" / "tfjob.yaml"


def operator_tf_configs(tfjob: dict[str, Any], namespace: str = "default") -> list[dict[str, Any]]:
    """The TF_CONFIG of every replica, as the training operator writes it: each replica type's
    tasks as <job name>-<type>-<index>.<namespace>.svc:<tfjob-port>, the task, "cloud"."""
    name = tfjob["metadata"]["name"]
    cluster: dict[str, list[str]] = {}
    for replica_type, spec in tfjob["spec"]["tfReplicaSpecs"].items():
        kind = replica_type.lower()
        if kind == "evaluator":  # the operator leaves the evaluator out of the cluster
            continue
        (container,) = [
            c for c in spec["template"]["spec"]["containers"] if c["name"] == "tensorflow"
        ]
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "tfjob-port"]
        cluster[kind] = [
            f"{name}-{kind}-{i}.{namespace}.svc:{port}" for i in range(spec["replicas"])
        ]
    return [
        {"cluster": cluster, "task": {"type": kind, "index": index}, "environment": "cloud"}
        for kind, addresses in cluster.items()
        for index in range(len(addresses))
    ]


def test_every_replica_finds_its_place_in_the_cluster() -> None:
    tfjob = yaml.safe_load(MANIFEST.read_text())
    assert (tfjob["apiVersion"], tfjob["kind"]) == ("kubeflow.org/v1", "TFJob")
    configs = operator_tf_configs(tfjob)
    assert len(configs) == 3
    for config in configs:
        spec, job, index = ClusterSpec.from_tf_config(json.dumps(config))
        assert (job, index) == (config["task"]["type"], config["task"]["index"])
        assert spec.task_address("worker", index if job == "worker" else 0).endswith(".svc:2222")
        assert spec.job_tasks("worker") == [
            f"distsrv-demo-worker-{i}.default.svc:2222" for i in range(3)
        ]


def test_the_operators_forms_with_chief_ps_and_evaluator_parse() -> None:
    tfjob = yaml.safe_load(MANIFEST.read_text())
    worker = tfjob["spec"]["tfReplicaSpecs"]["Worker"]
    tfjob["spec"]["tfReplicaSpecs"] = {
        "Chief": {**worker, "replicas": 1},
        "PS": {**worker, "replicas": 2},
        "Worker": worker,
        "Evaluator": {**worker, "replicas": 1},
    }
    configs = operator_tf_configs(tfjob)
    assert {tuple(config["task"].values()) for config in configs} == {
        ("chief", 0),
        ("ps", 0),
        ("ps", 1),
        ("worker", 0),
        ("worker", 1),
        ("worker", 2),
    }
    evaluator = {"cluster": configs[0]["cluster"], "task": {"type": "evaluator", "index": 0}}
    spec, job, index = ClusterSpec.from_tf_config(json.dumps(evaluator))
    assert (job, index) == ("evaluator", 0)
    assert sorted(spec.jobs) == ["chief", "ps", "worker"]


def test_the_containers_command_is_one_distsrv_accepts() -> None:
    tfjob = yaml.safe_load(MANIFEST.read_text())
    (container,) = tfjob["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
    program, *arguments = container["command"]
    assert program == "distsrv"
    shown = subprocess.run(
        [sys.executable, "-m", "distsrv", *arguments, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert "--epochs" in shown.stdout
