"""distsrv.errors: TensorFlow's classes and codes, the code <-> class table, pickling."""

from __future__ import annotations

import pickle

import pytest

import distsrv
from distsrv import errors

# TensorFlow's table (tensorflow/python/framework/errors_impl.py): class name -> gRPC code.
TF_CLASSES = {
    "CancelledError": 1,
    "UnknownError": 2,
    "InvalidArgumentError": 3,
    "DeadlineExceededError": 4,
    "NotFoundError": 5,
    "AlreadyExistsError": 6,
    "PermissionDeniedError": 7,
    "ResourceExhaustedError": 8,
    "FailedPreconditionError": 9,
    "AbortedError": 10,
    "OutOfRangeError": 11,
    "UnimplementedError": 12,
    "InternalError": 13,
    "UnavailableError": 14,
    "DataLossError": 15,
    "UnauthenticatedError": 16,
}

CODES = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}


def test_code_constants_are_grpc_status_codes() -> None:
    assert {name: getattr(errors, name) for name in CODES} == CODES


def test_all_lists_exactly_the_public_names() -> None:
    expected = (
        set(CODES)
        | set(TF_CLASSES)
        | {
            "OpError",
            "RemoteError",
            "exception_type_from_error_code",
            "error_code_from_exception_type",
        }
    )
    assert set(errors.__all__) == expected
    assert len(errors.__all__) == len(expected)
    for name in errors.__all__:
        assert hasattr(errors, name), name


@pytest.mark.parametrize(("name", "code"), TF_CLASSES.items())
def test_each_class_fixes_its_code_and_is_an_op_error(name: str, code: int) -> None:
    cls = getattr(errors, name)
    error = cls("it broke")
    assert isinstance(error, errors.OpError)
    assert isinstance(error, Exception)
    assert error.error_code == code
    assert error.message == "it broke"
    assert error.task is None
    assert str(error) == "it broke"
    assert error.args == ("it broke",)


@pytest.mark.parametrize(("name", "code"), TF_CLASSES.items())
def test_code_and_class_tables_are_inverse(name: str, code: int) -> None:
    cls = getattr(errors, name)
    assert errors.exception_type_from_error_code(code) is cls
    assert errors.error_code_from_exception_type(cls) == code


def test_rust_construction_path_builds_the_specific_class() -> None:
    # The binding raises exception_type_from_error_code(code)(message).
    error = errors.exception_type_from_error_code(errors.UNAVAILABLE)("peer /job:ps/task:0 gone")
    assert type(error) is errors.UnavailableError
    assert error.error_code == errors.UNAVAILABLE
    assert str(error) == "peer /job:ps/task:0 gone"


@pytest.mark.parametrize("code", [errors.OK, 17, 99, -1])
def test_codes_outside_the_table_give_unknown_error(code: int) -> None:
    cls = errors.exception_type_from_error_code(code)
    assert cls is errors.UnknownError
    assert cls("x").error_code == errors.UNKNOWN


def test_error_code_of_classes_outside_the_table() -> None:
    class MyNotFound(errors.NotFoundError):
        pass

    assert errors.error_code_from_exception_type(MyNotFound) == errors.NOT_FOUND
    assert errors.error_code_from_exception_type(errors.OpError) == errors.UNKNOWN
    assert errors.error_code_from_exception_type(ValueError) == errors.UNKNOWN


def test_task_prefixes_str_but_not_message() -> None:
    error = errors.DeadlineExceededError("recv 'grad' timed out", task="/job:ps/task:0")
    assert error.task == "/job:ps/task:0"
    assert error.message == "recv 'grad' timed out"
    assert str(error) == "task /job:ps/task:0: recv 'grad' timed out"


def test_op_error_takes_any_code() -> None:
    error = errors.OpError("custom", errors.ABORTED, task="/job:worker/task:3")
    assert error.error_code == errors.ABORTED
    assert errors.OpError("default").error_code == errors.UNKNOWN
    assert repr(error) == "OpError('custom', error_code=10, task='/job:worker/task:3')"


def test_repr_names_class_message_and_task() -> None:
    assert repr(errors.NotFoundError("no var")) == "NotFoundError('no var')"
    assert (
        repr(errors.NotFoundError("no var", task="/job:ps/task:1"))
        == "NotFoundError('no var', task='/job:ps/task:1')"
    )


def test_subclass_catchable_as_op_error() -> None:
    with pytest.raises(errors.OpError) as info:
        raise errors.ResourceExhaustedError("too big")
    assert info.value.error_code == errors.RESOURCE_EXHAUSTED


def test_task_is_keyword_only() -> None:
    with pytest.raises(TypeError):
        errors.NotFoundError("x", "/job:ps/task:0")  # type: ignore[call-arg]


@pytest.mark.parametrize("name", sorted(TF_CLASSES))
@pytest.mark.parametrize("task", [None, "/job:ps/task:0"])
def test_every_class_pickles_to_an_equal_looking_error(name: str, task: str | None) -> None:
    original = getattr(errors, name)("it broke: 'quoted'", task=task)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(original, protocol=protocol))
        assert type(copy) is type(original)
        assert (copy.message, copy.error_code, copy.task) == (
            original.message,
            original.error_code,
            original.task,
        )
        assert str(copy) == str(original)
        assert repr(copy) == repr(original)
        assert copy.args == original.args


def test_op_error_pickles_with_its_code() -> None:
    original = errors.OpError("generic", errors.DATA_LOSS, task="/job:w/task:2")
    copy = pickle.loads(pickle.dumps(original))
    assert type(copy) is errors.OpError
    assert copy.error_code == errors.DATA_LOSS
    assert copy.task == "/job:w/task:2"
    assert repr(copy) == repr(original)


BUILT_INS = {
    "InvalidArgumentError": ValueError,
    "DeadlineExceededError": TimeoutError,
    "NotFoundError": LookupError,
    "PermissionDeniedError": PermissionError,
    "UnauthenticatedError": PermissionError,
    "UnimplementedError": NotImplementedError,
    "UnavailableError": ConnectionError,
    "FailedPreconditionError": RuntimeError,
    "InternalError": RuntimeError,
}


@pytest.mark.parametrize(("name", "built_in"), BUILT_INS.items())
def test_classes_are_also_the_built_in_that_fits(name: str, built_in: type[Exception]) -> None:
    cls = getattr(errors, name)
    assert issubclass(cls, built_in)
    error = cls("it failed", task="/job:ps/task:0")
    assert str(error) == "task /job:ps/task:0: it failed"
    back = pickle.loads(pickle.dumps(error))
    assert isinstance(back, built_in)
    assert (type(back), str(back)) == (cls, str(error))


def test_generic_handlers_catch_real_failures(local_server: distsrv.Server) -> None:
    with pytest.raises(TimeoutError):
        local_server.recv("never", source=local_server.task, timeout=0.05)
    with pytest.raises(ValueError, match="task 5 is not defined"):
        distsrv.Server({"worker": ["127.0.0.1:0"]}, "worker", 5, start=False)
    with pytest.raises(NotImplementedError):
        local_server.call(local_server.task, "no such op")
    with pytest.raises(LookupError):
        local_server.variable("missing", on=local_server.task).read(timeout=5)


def test_the_same_mistake_raises_the_same_error_whatever_its_spelling(
    local_server: distsrv.Server,
) -> None:
    for task_index in (5, -1):
        with pytest.raises(errors.InvalidArgumentError):
            distsrv.Server({"worker": ["127.0.0.1:0"]}, "worker", task_index, start=False)
    for to in ("worker1", ("worker", 7), "/job:nope/task:0"):
        with pytest.raises(errors.InvalidArgumentError):
            local_server.send("x", [1], to=to)
