"""distsrv.ClusterSpec against tf.train.ClusterSpec's own tests, plus what distsrv adds.

The TensorFlow cases are ported from tensorflow/python/training/server_lib_test.py
(ServerDefTest, ClusterSpecTest) and
tensorflow/python/distribute/cluster_resolver/slurm_cluster_resolver_test.py; TensorFlow's
text-format expectations are written here as ``ClusterDef`` objects.
"""

from __future__ import annotations

import json
import pickle
from typing import Any

import pytest

from distsrv.cluster import ClusterSpec
from distsrv.messages import ClusterDef, JobDef


def cluster_def(**jobs: dict[int, str]) -> ClusterDef:
    return ClusterDef(job=tuple(JobDef(name, tasks) for name, tasks in jobs.items()))


def assert_all_routes_give(spec: ClusterSpec, expected: ClusterDef) -> None:
    """TensorFlow's check: dict -> spec -> def, and back through every constructor."""
    assert spec.as_cluster_def() == expected
    assert ClusterSpec(spec).as_cluster_def() == expected
    assert ClusterSpec(spec.as_cluster_def()).as_cluster_def() == expected
    assert ClusterSpec(spec.as_dict()).as_cluster_def() == expected


# --- ServerDefTest: the ClusterDef a dict produces, and the proto -> spec -> proto round trip.


def test_local_server_cluster_def() -> None:
    spec = ClusterSpec({"local": ["localhost:2222"]})
    expected = cluster_def(local={0: "localhost:2222"})
    assert spec.as_cluster_def() == expected
    assert ClusterSpec(expected).as_cluster_def() == expected


def test_two_processes_cluster_def() -> None:
    spec = ClusterSpec({"local": ["localhost:2222", "localhost:2223"]})
    expected = cluster_def(local={0: "localhost:2222", 1: "localhost:2223"})
    assert spec.as_cluster_def() == expected
    assert ClusterSpec(expected).as_cluster_def() == expected


def test_two_jobs_cluster_def() -> None:
    spec = ClusterSpec(
        {"ps": ["ps0:2222", "ps1:2222"], "worker": ["worker0:2222", "worker1:2222", "worker2:2222"]}
    )
    expected = cluster_def(
        ps={0: "ps0:2222", 1: "ps1:2222"},
        worker={0: "worker0:2222", 1: "worker1:2222", 2: "worker2:2222"},
    )
    assert spec.as_cluster_def() == expected
    assert ClusterSpec(expected).as_cluster_def() == expected


def test_dense_and_sparse_jobs_cluster_def() -> None:
    spec = ClusterSpec(
        {"ps": ["ps0:2222", "ps1:2222"], "worker": {0: "worker0:2222", 2: "worker2:2222"}}
    )
    expected = cluster_def(
        ps={0: "ps0:2222", 1: "ps1:2222"}, worker={0: "worker0:2222", 2: "worker2:2222"}
    )
    assert spec.as_cluster_def() == expected
    assert ClusterSpec(expected).as_cluster_def() == expected


# --- ClusterSpecTest


def test_string_conversion() -> None:
    spec = ClusterSpec({"ps": ["ps0:1111"], "worker": ["worker0:3333", "worker1:4444"]})
    expected = "ClusterSpec({'ps': ['ps0:1111'], 'worker': ['worker0:3333', 'worker1:4444']})"
    assert str(spec) == expected
    assert repr(spec) == expected


def test_repr_sorts_jobs_and_shows_sparse_jobs_as_dicts() -> None:
    spec = ClusterSpec({"worker": {3: "w3:1", 0: "w0:1"}, "ps": ["[::1]:2222"], "chief": []})
    assert repr(spec) == (
        "ClusterSpec({'chief': {}, 'ps': ['[::1]:2222'], 'worker': {0: 'w0:1', 3: 'w3:1'}})"
    )


def test_proto_dict_def_equivalences() -> None:
    spec = ClusterSpec(
        {"ps": ["ps0:2222", "ps1:2222"], "worker": ["worker0:2222", "worker1:2222", "worker2:2222"]}
    )
    expected = cluster_def(
        ps={0: "ps0:2222", 1: "ps1:2222"},
        worker={0: "worker0:2222", 1: "worker1:2222", 2: "worker2:2222"},
    )
    assert_all_routes_give(spec, expected)


def test_proto_dict_def_equivalences_with_zero_worker() -> None:
    spec = ClusterSpec({"ps": ["ps0:2222", "ps1:2222"], "worker": []})
    expected = cluster_def(ps={0: "ps0:2222", 1: "ps1:2222"}, worker={})
    assert_all_routes_give(spec, expected)


def test_cluster_spec_accessors() -> None:
    original_dict: dict[str, Any] = {
        "ps": ["ps0:2222", "ps1:2222"],
        "worker": ["worker0:2222", "worker1:2222", "worker2:2222"],
        "sparse": {0: "sparse0:2222", 3: "sparse3:2222"},
    }
    spec = ClusterSpec(original_dict)

    assert spec.as_dict() == original_dict

    assert spec.num_tasks("ps") == 2
    assert spec.num_tasks("worker") == 3
    assert spec.num_tasks("sparse") == 2
    with pytest.raises(ValueError, match="No such job in cluster: 'unknown'"):
        spec.num_tasks("unknown")

    assert spec.task_address("ps", 0) == "ps0:2222"
    assert spec.task_address("sparse", 0) == "sparse0:2222"
    with pytest.raises(ValueError, match="No such job in cluster"):
        spec.task_address("unknown", 0)
    with pytest.raises(ValueError, match="No task with index 2 in job 'sparse'"):
        spec.task_address("sparse", 2)

    assert spec.task_indices("ps") == [0, 1]
    assert spec.task_indices("worker") == [0, 1, 2]
    assert spec.task_indices("sparse") == [0, 3]
    with pytest.raises(ValueError, match="No such job in cluster"):
        spec.task_indices("unknown")

    # TensorFlow: job_tasks() is not recommended for sparse jobs, but gives None holes.
    assert spec.job_tasks("ps") == ["ps0:2222", "ps1:2222"]
    assert spec.job_tasks("worker") == ["worker0:2222", "worker1:2222", "worker2:2222"]
    assert spec.job_tasks("sparse") == ["sparse0:2222", None, None, "sparse3:2222"]
    with pytest.raises(ValueError, match="No such job in cluster"):
        spec.job_tasks("unknown")


def test_empty_cluster_spec_is_false() -> None:
    assert not ClusterSpec({})
    assert ClusterSpec({}).jobs == []


def test_non_empty_cluster_spec_is_true() -> None:
    # TensorFlow's test uses "host:port"; distsrv checks addresses, so the port is a number.
    assert ClusterSpec({"job": ["host:2222"]})


def test_eq() -> None:
    assert ClusterSpec({}) == ClusterSpec({})
    assert ClusterSpec({"job": ["host:2222"]}) == ClusterSpec({"job": ["host:2222"]})
    assert ClusterSpec({"job": {0: "host:2222"}}) == ClusterSpec({"job": ["host:2222"]})
    # __ne__ is defined as well, as in TensorFlow.
    assert (ClusterSpec({"job": ["host:2222"]}) != ClusterSpec({"job": ["host:2222"]})) is False


def test_ne() -> None:
    assert ClusterSpec({}) != ClusterSpec({"job": ["host:2223"]})
    assert ClusterSpec({"job1": ["host:2222"]}) != ClusterSpec({"job2": ["host:2222"]})
    assert ClusterSpec({"job": ["host:2222"]}) != ClusterSpec({"job": ["host:2223"]})
    assert ClusterSpec({"job": ["host:2222", "host:2223"]}) != ClusterSpec(
        {"job": ["host:2223", "host:2222"]}
    )
    assert (ClusterSpec({"job": ["host:2222"]}) == ClusterSpec({"job": ["host:2223"]})) is False


# --- Further TensorFlow semantics.


def test_eq_against_dicts_compares_the_index_table_as_tensorflow_does() -> None:
    spec = ClusterSpec({"ps": ["ps0:1"], "worker": {2: "w2:1"}})
    assert spec == {"ps": {0: "ps0:1"}, "worker": {2: "w2:1"}}
    assert spec.__eq__({"ps": {0: "ps0:1"}, "worker": {2: "w2:1"}}) is True
    # TensorFlow compares its internal {job: {index: address}} table, not the input form.
    assert spec != {"ps": ["ps0:1"], "worker": {2: "w2:1"}}
    assert spec != "ClusterSpec"
    assert spec != spec.as_cluster_def()


def test_not_hashable() -> None:
    assert ClusterSpec.__hash__ is None
    with pytest.raises(TypeError, match="unhashable"):
        hash(ClusterSpec({"ps": ["ps0:1"]}))


def test_jobs_keep_input_order_but_cluster_def_is_sorted() -> None:
    spec = ClusterSpec({"worker": {2: "w2:1", 0: "w0:1"}, "ps": ["ps0:1"]})
    assert spec.jobs == ["worker", "ps"]
    assert [job.name for job in spec.as_cluster_def().job] == ["ps", "worker"]
    assert list(spec.as_cluster_def().job[1].tasks) == [0, 2]
    # Rebuilt from its ClusterDef (also via another ClusterSpec), jobs follow the def's order.
    assert ClusterSpec(spec).jobs == ["ps", "worker"]
    assert ClusterSpec(spec.as_cluster_def()).jobs == ["ps", "worker"]


def test_cluster_def_order_is_kept() -> None:
    definition = cluster_def(worker={0: "w0:1"}, ps={0: "ps0:1"})
    spec = ClusterSpec(definition)
    assert spec.jobs == ["worker", "ps"]
    assert spec.as_cluster_def() is definition


def test_as_dict_of_empty_and_sparse_jobs() -> None:
    spec = ClusterSpec({"empty": [], "sparse": {5: "s5:1"}, "dense": {1: "d1:1", 0: "d0:1"}})
    assert spec.as_dict() == {"empty": {}, "sparse": {5: "s5:1"}, "dense": ["d0:1", "d1:1"]}
    assert spec.num_tasks("empty") == 0
    assert spec.task_indices("empty") == []
    assert spec.job_tasks("empty") == []


def test_tuple_tasks_and_string_task_indices_as_tensorflow_takes_them() -> None:
    # JSON (TF_CONFIG) turns sparse-job keys into strings; TensorFlow's int() accepts them.
    spec = ClusterSpec({"ps": ("ps0:1", "ps1:1"), "worker": {"1": "w1:1", "3": "w3:1"}})
    assert spec.task_indices("worker") == [1, 3]
    assert spec.task_address("worker", 3) == "w3:1"
    assert spec.job_tasks("ps") == ["ps0:1", "ps1:1"]


def test_bytes_job_names_and_addresses_become_str() -> None:
    cluster: Any = {b"ps": [b"ps0:2222"]}
    spec = ClusterSpec(cluster)
    assert spec.jobs == ["ps"]
    assert spec.task_address("ps", 0) == "ps0:2222"


def test_cluster_spec_copies_from_cluster_spec() -> None:
    original = ClusterSpec({"ps": ["ps0:1"], "worker": {1: "w1:1"}})
    copy = ClusterSpec(original)
    assert copy == original
    assert copy is not original
    assert copy.as_dict() == {"ps": ["ps0:1"], "worker": {1: "w1:1"}}


def test_pickles() -> None:
    spec = ClusterSpec({"worker": {1: "w1:1"}, "ps": ["[::1]:2"]})
    copy = pickle.loads(pickle.dumps(spec))
    assert copy == spec
    assert copy.jobs == spec.jobs
    assert copy.as_cluster_def() == spec.as_cluster_def()


# --- TensorFlow's exceptions for ill-typed input.


@pytest.mark.parametrize("cluster", [None, 3, "ps:2222", ["ps0:2222"], object()])
def test_cluster_of_wrong_type_is_type_error(cluster: Any) -> None:
    with pytest.raises(TypeError, match="`cluster` must be a dictionary mapping one or more"):
        ClusterSpec(cluster)


@pytest.mark.parametrize("tasks", ["ps0:2222", None, 2222, {"ps0:2222"}])
def test_tasks_of_wrong_type_is_type_error(tasks: Any) -> None:
    with pytest.raises(
        TypeError,
        match=r"The tasks for job 'ps' must be a list or a dictionary from integers to strings\.",
    ):
        ClusterSpec({"ps": tasks})


def test_job_name_of_wrong_type_is_type_error() -> None:
    with pytest.raises(TypeError, match="Job name 1 must be bytes or unicode"):
        ClusterSpec({1: ["ps0:2222"]})  # type: ignore[dict-item]


@pytest.mark.parametrize("address", [None, 2222, ("h", 1)])
def test_address_of_wrong_type_is_type_error(address: Any) -> None:
    with pytest.raises(TypeError, match=r"Task address .* must be bytes or unicode"):
        ClusterSpec({"ps": [address]})


@pytest.mark.parametrize("index", [None, 1.0, True, (1,)])
def test_task_index_of_wrong_type_is_type_error(index: Any) -> None:
    with pytest.raises(TypeError, match=r"task index .* of job 'ps' must be an integer"):
        ClusterSpec({"ps": {index: "ps0:2222"}})


def test_task_index_string_that_is_not_a_number_is_value_error() -> None:
    with pytest.raises(ValueError, match="task index 'one' of job 'ps' is not an integer"):
        ClusterSpec({"ps": {"one": "ps0:2222"}})


# --- distsrv's validation: addresses, job names, indices.


@pytest.mark.parametrize(
    "address",
    [
        "localhost:2222",
        "127.0.0.1:0",
        "ps-0.example.com:65535",
        "node_01:1",
        "[::1]:2222",
        "[fe80::1]:80",
        "[2001:db8::8a2e:370:7334]:443",
    ],
)
def test_valid_addresses_are_accepted(address: str) -> None:
    assert ClusterSpec({"ps": [address]}).task_address("ps", 0) == address


@pytest.mark.parametrize(
    "address",
    [
        "localhost",  # TensorFlow's testInvalidHostname: no port
        "",
        "host:",
        ":2222",
        "host:port",
        "host:65536",
        "host:-1",
        "::1:2222",  # IPv6 without brackets
        "[::1:2222",
        "[not-ipv6]:2222",
        "a/b:2222",
        "grpc://host:2222",
    ],
)
def test_invalid_address_is_value_error_naming_job_task_and_address(address: str) -> None:
    with pytest.raises(ValueError, match="Invalid address") as info:
        ClusterSpec({"worker": {"7": address}})
    message = str(info.value)
    assert repr(address) in message
    assert "task 7" in message
    assert "'worker'" in message


def test_invalid_address_in_a_cluster_def_is_value_error() -> None:
    with pytest.raises(ValueError, match=r"'nohost' for task 0 of job 'ps'"):
        ClusterSpec(cluster_def(ps={0: "nohost"}))


@pytest.mark.parametrize("job_name", ["", "1ps", "ps/0", "ps:0", "ps-0", "wörker", " ps"])
def test_job_names_outside_tensorflows_device_name_grammar_are_value_error(
    job_name: str,
) -> None:
    with pytest.raises(ValueError, match=r"Job name .* is not valid"):
        ClusterSpec({job_name: ["h:1"]})


@pytest.mark.parametrize("job_name", ["ps", "Worker", "chief", "w_2", "x"])
def test_job_names_in_the_grammar_are_accepted(job_name: str) -> None:
    assert ClusterSpec({job_name: ["h:1"]}).jobs == [job_name]


@pytest.mark.parametrize("index", [-1, 2**31, "-3"])
def test_task_index_outside_int32_or_negative_is_value_error(index: Any) -> None:
    with pytest.raises(ValueError, match="out of range"):
        ClusterSpec({"ps": {index: "h:1"}})


def test_largest_task_index_is_accepted() -> None:
    spec = ClusterSpec({"ps": {2**31 - 1: "h:1"}})
    assert spec.task_indices("ps") == [2**31 - 1]
    assert spec.as_dict() == {"ps": {2**31 - 1: "h:1"}}


# --- Protobuf messages from TensorFlow or grpcio are converted through their bytes.


class _Descriptor:
    def __init__(self, full_name: str) -> None:
        self.full_name = full_name


class _FakeProtobufMessage:
    """Quacks like a generated protobuf message: DESCRIPTOR.full_name and SerializeToString."""

    def __init__(self, full_name: str, data: bytes) -> None:
        self.DESCRIPTOR = _Descriptor(full_name)
        self._data = data

    def SerializeToString(self) -> bytes:
        return self._data


@pytest.mark.parametrize("full_name", ["tensorflow.ClusterDef", "distsrv.v1.ClusterDef"])
def test_protobuf_cluster_def_messages_are_accepted(full_name: str) -> None:
    definition = cluster_def(ps={0: "ps0:2222"}, worker={0: "w0:2222", 4: "w4:2222"})
    spec = ClusterSpec(_FakeProtobufMessage(full_name, definition.SerializeToString()))
    assert spec.as_dict() == {"ps": ["ps0:2222"], "worker": {0: "w0:2222", 4: "w4:2222"}}
    assert spec.as_cluster_def() == definition


def test_other_protobuf_messages_are_type_error() -> None:
    message = _FakeProtobufMessage("tensorflow.ServerDef", b"")
    with pytest.raises(TypeError, match="`cluster` must be a dictionary"):
        ClusterSpec(message)


# --- from_tf_config


KUBEFLOW_TF_CONFIG = {
    "cluster": {
        "chief": ["trainer-chief-0.ns.svc:2222"],
        "worker": ["trainer-worker-0.ns.svc:2222", "trainer-worker-1.ns.svc:2222"],
        "ps": ["trainer-ps-0.ns.svc:2222"],
    },
    "task": {"type": "worker", "index": 1},
    "environment": "cloud",
}


def test_from_tf_config_json_text() -> None:
    spec, task_type, task_index = ClusterSpec.from_tf_config(json.dumps(KUBEFLOW_TF_CONFIG))
    assert spec.jobs == ["chief", "worker", "ps"]
    assert spec.task_address("worker", 1) == "trainer-worker-1.ns.svc:2222"
    assert (task_type, task_index) == ("worker", 1)


def test_from_tf_config_parsed_mapping() -> None:
    spec, task_type, task_index = ClusterSpec.from_tf_config(KUBEFLOW_TF_CONFIG)
    assert spec.num_tasks("chief") == 1
    assert (task_type, task_index) == ("worker", 1)


def test_from_tf_config_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    config = {"cluster": {"worker": ["localhost:12345", "localhost:23456"]}}
    config["task"] = {"type": "worker", "index": 0}  # type: ignore[dict-item]
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    spec, task_type, task_index = ClusterSpec.from_tf_config()
    assert spec == ClusterSpec({"worker": ["localhost:12345", "localhost:23456"]})
    assert (task_type, task_index) == ("worker", 0)


def test_from_tf_config_unset_is_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG is not set"):
        ClusterSpec.from_tf_config()


def test_from_tf_config_without_task() -> None:
    spec, task_type, task_index = ClusterSpec.from_tf_config('{"cluster": {"ps": ["h:1"]}}')
    assert spec.jobs == ["ps"]
    assert (task_type, task_index) == (None, None)


def test_from_tf_config_task_without_index() -> None:
    config = {"cluster": {"chief": ["h:1"]}, "task": {"type": "chief"}}
    assert ClusterSpec.from_tf_config(config)[1:] == ("chief", None)


def test_from_tf_config_empty_task() -> None:
    config = {"cluster": {"chief": ["h:1"]}, "task": {}}
    assert ClusterSpec.from_tf_config(config)[1:] == (None, None)


def test_from_tf_config_string_index_as_tensorflow_takes_it() -> None:
    config = {"cluster": {"worker": ["h:1", "h:2"]}, "task": {"type": "worker", "index": "1"}}
    assert ClusterSpec.from_tf_config(config)[1:] == ("worker", 1)


def test_from_tf_config_sparse_job_keys_from_json() -> None:
    text = '{"cluster": {"worker": {"3": "h:3"}}, "task": {"type": "worker", "index": 3}}'
    spec, task_type, task_index = ClusterSpec.from_tf_config(text)
    assert spec.task_indices("worker") == [3]
    assert (task_type, task_index) == ("worker", 3)


def test_from_tf_config_evaluator_in_the_cluster_is_just_a_job() -> None:
    config = {
        "cluster": {"chief": ["c:1"], "worker": ["w:1"], "evaluator": ["e:1"]},
        "task": {"type": "evaluator", "index": 0},
    }
    spec, task_type, task_index = ClusterSpec.from_tf_config(config)
    assert spec.task_address("evaluator", 0) == "e:1"
    assert (task_type, task_index) == ("evaluator", 0)


def test_from_tf_config_evaluator_may_be_outside_the_cluster() -> None:
    # Kubeflow leaves the evaluator out of "cluster"; TensorFlow accepts that.
    config = {"cluster": {"chief": ["c:1"], "worker": ["w:1"]}, "task": {"type": "evaluator"}}
    spec, task_type, task_index = ClusterSpec.from_tf_config(config)
    assert spec.jobs == ["chief", "worker"]
    assert (task_type, task_index) == ("evaluator", None)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ('["cluster"]', "must be a JSON object, not list"),
        ("{}", "has no 'cluster'"),
        ('{"task": {"type": "worker", "index": 0}}', "has no 'cluster'"),
        ('{"cluster": ["h:1"]}', "'cluster' must map job names to tasks"),
        ('{"cluster": null}', "'cluster' must map job names to tasks"),
        ('{"cluster": {"ps": "h:1"}}', "'cluster' is not valid: The tasks for job 'ps'"),
        ('{"cluster": {"ps": ["nohost"]}}', "'cluster' is not valid: Invalid address 'nohost'"),
        ('{"cluster": {"ps": [1]}}', "'cluster' is not valid: Task address 1"),
        ('{"cluster": {"ps": ["h:1"]}, "task": "ps"}', "'task' must be an object"),
        ('{"cluster": {"ps": ["h:1"]}, "task": {"type": 1}}', "task type must be a string"),
        ('{"cluster": {"ps": ["h:1"]}, "task": {"index": 0}}', "an index but no type"),
        (
            '{"cluster": {"ps": ["h:1"]}, "task": {"type": "worker", "index": 0}}',
            "task type 'worker' not found in the cluster",
        ),
        (
            '{"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": 1}}',
            "task index 1 is not a task of job 'ps'",
        ),
        ('{"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": -1}}', "non-negative"),
        ('{"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": "x"}}', "non-negative"),
        ('{"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": 0.5}}', "non-negative"),
        ('{"cluster": {"ps": ["h:1"]}, "task": {"type": "ps", "index": true}}', "non-negative"),
    ],
)
def test_from_tf_config_malformed_is_value_error(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClusterSpec.from_tf_config(text)


# --- from_slurm


def slurm_env(**variables: str) -> dict[str, str]:
    return {f"SLURM_{name}": value for name, value in variables.items()}


def test_from_slurm_simple_retrieval_from_env() -> None:
    # TensorFlow's testSimpleRetrievalFromEnv.
    env = slurm_env(
        PROCID="0",
        STEP_NUM_TASKS="3",
        STEP_TASKS_PER_NODE="1(x3)",
        STEP_NODELIST="t02n13,t02n41,t02n43",
    )
    spec, job, index = ClusterSpec.from_slurm(env)
    assert_all_routes_give(
        spec, cluster_def(worker={0: "t02n13:8888", 1: "t02n41:8888", 2: "t02n43:8888"})
    )
    assert (job, index) == ("worker", 0)


def test_from_slurm_ps_and_workers() -> None:
    # TensorFlow's testTaskPerNodeNotSetRetrieval.
    env = slurm_env(
        PROCID="0",
        STEP_NUM_TASKS="3",
        STEP_TASKS_PER_NODE="1(x3)",
        STEP_NODELIST="t02n13,t02n41,t02n43",
    )
    spec, job, index = ClusterSpec.from_slurm(env, port=8888, jobs={"ps": 1, "worker": 2})
    assert_all_routes_give(
        spec, cluster_def(ps={0: "t02n13:8888"}, worker={0: "t02n41:8888", 1: "t02n43:8888"})
    )
    assert (job, index) == ("ps", 0)


def test_from_slurm_multiple_tasks_per_node() -> None:
    # TensorFlow's testMultiTaskPerNodeRetrieval.
    env = slurm_env(
        PROCID="1",
        STEP_NUM_TASKS="5",
        STEP_TASKS_PER_NODE="2(x2),1",
        STEP_NODELIST="t02n13,t02n41,t02n43",
    )
    spec, job, index = ClusterSpec.from_slurm(env, jobs={"ps": 1, "worker": 4})
    assert_all_routes_give(
        spec,
        cluster_def(
            ps={0: "t02n13:8888"},
            worker={0: "t02n13:8889", 1: "t02n41:8888", 2: "t02n41:8889", 3: "t02n43:8888"},
        ),
    )
    assert (job, index) == ("worker", 0)


def test_from_slurm_job_level_variables() -> None:
    env = slurm_env(
        JOB_NODELIST="gpu[1-2]", TASKS_PER_NODE="2(x2)", NTASKS="4", PROCID="3", JOB_ID="77"
    )
    spec, job, index = ClusterSpec.from_slurm(env, port=2222)
    assert spec.as_dict() == {"worker": ["gpu1:2222", "gpu1:2223", "gpu2:2222", "gpu2:2223"]}
    assert (job, index) == ("worker", 3)


def test_from_slurm_step_variables_win_over_job_variables() -> None:
    env = slurm_env(
        JOB_NODELIST="n[1-4]",
        TASKS_PER_NODE="1(x4)",
        NTASKS="4",
        STEP_NODELIST="n[2-3]",
        STEP_TASKS_PER_NODE="1(x2)",
        STEP_NUM_TASKS="2",
        PROCID="1",
    )
    spec, job, index = ClusterSpec.from_slurm(env)
    assert spec.as_dict() == {"worker": ["n2:8888", "n3:8888"]}
    assert (job, index) == ("worker", 1)


def test_from_slurm_ntasks_is_optional() -> None:
    env = slurm_env(JOB_NODELIST="a,b", TASKS_PER_NODE="1,2", PROCID="2")
    spec, job, index = ClusterSpec.from_slurm(env, port=10)
    assert spec.as_dict() == {"worker": ["a:10", "b:10", "b:11"]}
    assert (job, index) == ("worker", 2)


def test_from_slurm_jobs_split_ranks_in_the_order_given() -> None:
    env = slurm_env(JOB_NODELIST="n[1-4]", TASKS_PER_NODE="1(x4)", NTASKS="4", PROCID="3")
    spec, job, index = ClusterSpec.from_slurm(env, jobs={"worker": 2, "chief": 1, "ps": 1})
    assert spec.as_dict() == {
        "worker": ["n1:8888", "n2:8888"],
        "chief": ["n3:8888"],
        "ps": ["n4:8888"],
    }
    assert spec.jobs == ["worker", "chief", "ps"]
    assert (job, index) == ("ps", 0)


def test_from_slurm_empty_job_gets_no_tasks() -> None:
    env = slurm_env(JOB_NODELIST="n1", TASKS_PER_NODE="1", PROCID="0")
    spec, job, index = ClusterSpec.from_slurm(env, jobs={"ps": 0, "worker": 1})
    assert spec.as_dict() == {"ps": {}, "worker": ["n1:8888"]}
    assert (job, index) == ("worker", 0)


def test_from_slurm_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in slurm_env(STEP_NODELIST="cn[7-8]", STEP_TASKS_PER_NODE="1(x2)").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    spec, job, index = ClusterSpec.from_slurm()
    assert spec.as_dict() == {"worker": ["cn7:8888", "cn8:8888"]}
    assert (job, index) == ("worker", 1)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        # TensorFlow's test_expand_hostlist.
        ("n1", ["n1"]),
        ("n[1,3]", ["n1", "n3"]),
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("n[1-2],m5,o[3-4,6,7-9]", ["n1", "n2", "m5", "o3", "o4", "o6", "o7", "o8", "o9"]),
        # Slurm keeps zero padding, which TensorFlow's version drops.
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("n[08-11]", ["n08", "n09", "n10", "n11"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("[1-2]", ["1", "2"]),
        ("rack1-n[9-10]", ["rack1-n9", "rack1-n10"]),
        # Order is Slurm's, not sorted.
        ("z1,a1", ["z1", "a1"]),
    ],
)
def test_from_slurm_expands_host_lists(nodelist: str, hosts: list[str]) -> None:
    env = slurm_env(JOB_NODELIST=nodelist, TASKS_PER_NODE=f"1(x{len(hosts)})", PROCID="0")
    spec, _, _ = ClusterSpec.from_slurm(env, port=1)
    assert spec.job_tasks("worker") == [f"{host}:1" for host in hosts]


@pytest.mark.parametrize(
    ("tasks_per_node", "counts"),
    [
        # TensorFlow's test_expand_tasks_per_node.
        ("2", [2]),
        ("2,1,3", [2, 1, 3]),
        ("3(x2),2,1", [3, 3, 2, 1]),
        ("3(x2),2,11(x4)", [3, 3, 2, 11, 11, 11, 11]),
        ("13(x10)", [13] * 10),
    ],
)
def test_from_slurm_expands_tasks_per_node(tasks_per_node: str, counts: list[int]) -> None:
    hosts = [f"n{i}" for i in range(len(counts))]
    env = slurm_env(JOB_NODELIST=",".join(hosts), TASKS_PER_NODE=tasks_per_node, PROCID="0")
    spec, _, _ = ClusterSpec.from_slurm(env, port=100)
    expected = [
        f"{host}:{100 + k}" for host, n in zip(hosts, counts, strict=True) for k in range(n)
    ]
    assert spec.job_tasks("worker") == expected


@pytest.mark.parametrize(
    ("variables", "match"),
    [
        ({"TASKS_PER_NODE": "1", "PROCID": "0"}, "SLURM_STEP_NODELIST / SLURM_JOB_NODELIST"),
        ({"JOB_NODELIST": "n1", "PROCID": "0"}, "SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER"),
        ({"JOB_NODELIST": "n1", "TASKS_PER_NODE": "1"}, "SLURM_PROCID not found"),
        ({"JOB_NODELIST": "n1", "TASKS_PER_NODE": "1", "PROCID": "x"}, "SLURM_PROCID must be"),
        ({"JOB_NODELIST": "n1", "TASKS_PER_NODE": "1", "PROCID": "1"}, "SLURM_PROCID 1 is not"),
        ({"JOB_NODELIST": "n1", "TASKS_PER_NODE": "1", "PROCID": "-1"}, "SLURM_PROCID must be"),
        ({"JOB_NODELIST": "n1", "TASKS_PER_NODE": "x", "PROCID": "0"}, "tasks-per-node list"),
        ({"JOB_NODELIST": "n1", "TASKS_PER_NODE": "2(3)", "PROCID": "0"}, "tasks-per-node list"),
        ({"JOB_NODELIST": "n1", "TASKS_PER_NODE": "", "PROCID": "0"}, "tasks-per-node list"),
        ({"JOB_NODELIST": "n[1-2]", "TASKS_PER_NODE": "1", "PROCID": "0"}, "has 2 nodes but"),
        ({"JOB_NODELIST": "n1,n1", "TASKS_PER_NODE": "1(x2)", "PROCID": "0"}, "node twice"),
        (
            {"JOB_NODELIST": "n1", "TASKS_PER_NODE": "2", "NTASKS": "3", "PROCID": "0"},
            "reports 3 tasks but",
        ),
        (
            {"JOB_NODELIST": "n1", "TASKS_PER_NODE": "2", "NTASKS": "two", "PROCID": "0"},
            "SLURM_STEP_NUM_TASKS / SLURM_NTASKS must be",
        ),
    ],
)
def test_from_slurm_missing_or_malformed_variables_are_value_error(
    variables: dict[str, str], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        ClusterSpec.from_slurm(slurm_env(**variables))


@pytest.mark.parametrize(
    "nodelist", ["", "n[1-3", "n1-3]", "n[[1-2]]", "n[3-1]", "n[a-b]", "n[]", "n1,,n2", "n[1]x"]
)
def test_from_slurm_malformed_host_list_is_value_error(nodelist: str) -> None:
    env = slurm_env(JOB_NODELIST=nodelist, TASKS_PER_NODE="1", PROCID="0")
    with pytest.raises(ValueError, match="Invalid hostlist format"):
        ClusterSpec.from_slurm(env)


def test_from_slurm_job_sizes_must_add_up() -> None:
    env = slurm_env(JOB_NODELIST="n[1-3]", TASKS_PER_NODE="1(x3)", PROCID="0")
    with pytest.raises(ValueError, match="Requested 4 tasks but Slurm assigned 3"):
        ClusterSpec.from_slurm(env, jobs={"ps": 1, "worker": 3})
    with pytest.raises(ValueError, match="task count of job 'ps' is negative"):
        ClusterSpec.from_slurm(env, jobs={"ps": -1, "worker": 4})
    with pytest.raises(TypeError, match="task count of job 'ps' must be an int"):
        ClusterSpec.from_slurm(env, jobs={"ps": 1.0, "worker": 2})  # type: ignore[dict-item]


def test_from_slurm_port_is_checked() -> None:
    env = slurm_env(JOB_NODELIST="n1", TASKS_PER_NODE="2", PROCID="0")
    with pytest.raises(ValueError, match="port 70000 is out of range"):
        ClusterSpec.from_slurm(env, port=70000)
    with pytest.raises(TypeError, match="port must be an int"):
        ClusterSpec.from_slurm(env, port="8888")  # type: ignore[arg-type]
    # The second task on the node would need port 65536.
    with pytest.raises(ValueError, match="'n1:65536' for task 1 of job 'worker'"):
        ClusterSpec.from_slurm(env, port=65535)


def test_from_slurm_invalid_job_name_is_value_error() -> None:
    env = slurm_env(JOB_NODELIST="n1", TASKS_PER_NODE="1", PROCID="0")
    with pytest.raises(ValueError, match="Job name 'param-server' is not valid"):
        ClusterSpec.from_slurm(env, jobs={"param-server": 1})
