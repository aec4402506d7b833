"""Property tests of the cluster parsers that read what an operator or a scheduler wrote
(``ClusterSpec``, ``TF_CONFIG``): any input either parses to a spec that round-trips, or is
refused with ``ValueError``/``TypeError``, never another exception."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

import distsrv

JOB_NAMES = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,11}", fullmatch=True)
HOSTS = st.one_of(
    st.from_regex(r"[a-z][a-z0-9-]{0,14}", fullmatch=True),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda octets: ".".join(map(str, octets))),
)
ADDRESSES = st.builds(lambda host, port: f"{host}:{port}", HOSTS, st.integers(1, 65535))
DENSE_JOBS = st.lists(ADDRESSES, min_size=1, max_size=4)
SPARSE_JOBS = st.dictionaries(st.integers(0, 2**31 - 1), ADDRESSES, min_size=1, max_size=4)
CLUSTERS = st.dictionaries(JOB_NAMES, st.one_of(DENSE_JOBS, SPARSE_JOBS), min_size=1, max_size=4)
# What a hand-written or corrupted TF_CONFIG may hold.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(CLUSTERS)
def test_a_valid_cluster_round_trips(cluster: dict[str, Any]) -> None:
    spec = distsrv.ClusterSpec(cluster)
    assert distsrv.ClusterSpec(spec.as_dict()) == spec
    assert distsrv.ClusterSpec(spec.as_cluster_def()) == spec
    assert sorted(spec.jobs) == sorted(cluster)
    for job, tasks in cluster.items():
        by_index = dict(enumerate(tasks)) if isinstance(tasks, list) else tasks
        assert spec.num_tasks(job) == len(by_index)
        for index, address in by_index.items():
            assert spec.task_address(job, index) == address


@given(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4))
def test_any_cluster_is_parsed_or_refused_plainly(cluster: dict[str, Any]) -> None:
    try:
        spec = distsrv.ClusterSpec(cluster)
    except (TypeError, ValueError):
        return
    assert distsrv.ClusterSpec(spec.as_dict()) == spec


@settings(max_examples=200)
@given(
    st.one_of(
        st.text(max_size=60),
        JSON_VALUES.map(json.dumps),
        st.builds(
            lambda cluster, task: json.dumps({"cluster": cluster, "task": task}),
            CLUSTERS,
            JSON_VALUES,
        ),
    )
)
def test_any_tf_config_is_parsed_or_refused_with_value_error(text: str) -> None:
    try:
        spec, task_type, task_index = distsrv.ClusterSpec.from_tf_config(text)
    except ValueError:
        return
    if task_type is not None and task_type != "evaluator":
        assert task_type in spec.jobs
        if task_index is not None:
            assert task_index in spec.task_indices(task_type)
