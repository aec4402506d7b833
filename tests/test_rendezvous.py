"""Rendezvous: tasks that know only their place, the cluster's size and a coordinator address
learn the whole cluster (``ClusterSpec.rendezvous``, ``ClusterSpec.from_env``)."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest

import distsrv
from distsrv import errors
from distsrv.launch import free_ports

TIMEOUT = 30.0


def coordinator() -> str:
    return f"127.0.0.1:{free_ports(1)[0]}"


def together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Every call at once, one thread each: what each returned or raised."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        results = []
        for future in futures:
            try:
                results.append(future.result(timeout=60))
            except Exception as error:  # handed to the test
                results.append(error)
        return results


def meet(
    address: str, tasks: Mapping[str, int], places: list[tuple[str, int]], **options: Any
) -> list[Any]:
    return together(
        [
            lambda place=place: distsrv.ClusterSpec.rendezvous(
                address, place[0], place[1], tasks, **options
            )
            for place in places
        ]
    )


def test_every_task_gets_the_same_whole_cluster_and_it_works() -> None:
    address = coordinator()
    places = [("worker", 2), ("worker", 1), ("worker", 0)]  # the coordinator last
    specs = meet(address, {"worker": 3}, places, timeout=TIMEOUT)
    assert all(spec == specs[0] for spec in specs), specs
    spec = specs[0]
    assert spec.num_tasks("worker") == 3
    assert len(set(spec.job_tasks("worker"))) == 3
    assert all(task.startswith("127.0.0.1:") for task in spec.job_tasks("worker"))
    assert address not in spec.job_tasks("worker")  # the coordinator's port is its own

    def reduce(index: int) -> float:
        with distsrv.Server(spec, "worker", index) as server:
            total = server.all_reduce(np.array([index + 1.0]), timeout=TIMEOUT)
            server.barrier(timeout=TIMEOUT)
            return float(total[0])

    assert together([lambda i=i: reduce(i) for i in range(3)]) == [6.0, 6.0, 6.0]


def test_jobs_of_several_kinds_and_a_size_given_as_an_int() -> None:
    address = coordinator()
    places = [("worker", 0), ("worker", 1), ("ps", 0)]
    specs = meet(address, {"worker": 2, "ps": 1}, places, timeout=TIMEOUT)
    assert specs[0] == specs[2]
    assert sorted(specs[0].jobs) == ["ps", "worker"]
    specs = meet(coordinator(), 2, [("chief", 0), ("chief", 1)], timeout=TIMEOUT)
    assert specs[0].num_tasks("chief") == 2


def test_a_task_registered_twice_fails_every_task() -> None:
    places = [("worker", 0), ("worker", 1), ("worker", 1)]
    results = meet(coordinator(), {"worker": 3}, places, timeout=TIMEOUT)
    for result in results:
        assert isinstance(result, errors.InvalidArgumentError), result
        assert "/job:worker/task:1 registered twice" in str(result)


def test_a_missing_task_is_named_within_the_timeout() -> None:
    places = [("worker", 0), ("worker", 2)]
    results = meet(coordinator(), {"worker": 3}, places, timeout=1.0)
    for result in results:
        assert isinstance(result, errors.DeadlineExceededError), result
    assert "/job:worker/task:1 never registered" in str(results[0])
    assert "/job:worker/task:1 never registered" in str(results[1])


def test_a_task_outside_the_cluster_is_refused_at_once() -> None:
    with pytest.raises(errors.InvalidArgumentError, match="not one of the 2 tasks"):
        distsrv.ClusterSpec.rendezvous(coordinator(), "worker", 5, 2, timeout=TIMEOUT)


def test_without_the_token_a_registration_is_refused_and_the_rest_go_on() -> None:
    address = coordinator()
    tasks = {"worker": 2}

    def task(index: int, token: str | None) -> Any:
        return distsrv.ClusterSpec.rendezvous(
            address, "worker", index, tasks, token=token, timeout=TIMEOUT
        )

    def late(index: int, token: str) -> Any:
        time.sleep(0.5)  # after the guess has been refused
        return task(index, token)

    results = together(
        [lambda: task(0, "s3cret"), lambda: task(1, "guess"), lambda: late(1, "s3cret")]
    )
    assert isinstance(results[1], errors.UnauthenticatedError), results[1]
    assert "does not prove the cluster token" in str(results[1])
    # The coordinator went on waiting for a task 1 that holds the token.
    assert isinstance(results[0], distsrv.ClusterSpec), results[0]
    assert results[0] == results[2]


def test_an_answer_without_the_token_is_not_believed() -> None:
    address = coordinator()
    results = together(
        [
            lambda: distsrv.ClusterSpec.rendezvous(address, "worker", 0, 2, timeout=2.0),
            lambda: distsrv.ClusterSpec.rendezvous(
                address, "worker", 1, 2, token="s3cret", timeout=2.0
            ),
        ]
    )
    assert isinstance(results[1], errors.UnauthenticatedError), results[1]


def test_from_env_reads_tf_config_slurm_or_torchrun_in_that_order() -> None:
    tf_config = json.dumps(
        {
            "cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
            "task": {"type": "worker", "index": 1},
        }
    )
    spec, job, index, source = distsrv.ClusterSpec.from_env(
        {"TF_CONFIG": tf_config, "SLURM_PROCID": "0"}
    )
    assert (job, index, source, spec.num_tasks("worker")) == ("worker", 1, "TF_CONFIG", 2)
    slurm = {
        "SLURM_PROCID": "1",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_TASKS_PER_NODE": "1(x2)",
        "RANK": "0",
    }
    spec, job, index, source = distsrv.ClusterSpec.from_env(slurm)
    assert (job, index, source) == ("worker", 1, "Slurm")
    assert spec.task_address("worker", 1) == "node02:8888"
    master = free_ports(1)[0]

    def torchrun(rank: int) -> Any:
        env = {"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}
        return distsrv.ClusterSpec.from_env({**env, "MASTER_PORT": str(master)}, timeout=TIMEOUT)

    (spec0, _, _, source), (spec1, job, index, _) = together(
        [lambda: torchrun(0), lambda: torchrun(1)]
    )
    assert spec0 == spec1
    assert (job, index, source) == ("worker", 1, "torchrun")
    with pytest.raises(ValueError, match="no cluster in the environment"):
        distsrv.ClusterSpec.from_env({})
