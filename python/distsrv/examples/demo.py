"""The main job: data-parallel training of a small MLP on handwritten digits, one process per
task of a local cluster (``distsrv demo``, which runs ``distsrv demo-worker`` in each).

Every worker holds the whole model and derives the same shuffled global batches from the seed;
each computes the gradient of its shard of every batch, and the shards are combined in one of two
ways:

- all-reduce (the default): the workers sum their gradients with ``Server.all_reduce`` and each
  takes the same SGD step, so the run is the single-process run of the same global batches, up to
  the order of float additions.
- parameter server (``--ps``): a ``ps`` task hosts each parameter tensor as a variable; workers
  push their gradients as ``sgd_step`` updates, which the ps task applies in place, then read the
  parameters back. The steps are synchronous: a barrier after the reads keeps a fast worker's next
  update from landing before a slow one has read, and one after the updates lets everyone read a
  step's complete result. The result is again the single-process run's.

Worker 0 prints one progress line per epoch, then the test accuracy, throughput and the bytes the
workers exchanged, and the accuracy of the same training in a single process for comparison.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

import numpy as np

from distsrv.cluster import ClusterSpec
from distsrv.errors import OpError
from distsrv.examples.train import (
    MLP,
    ApplyGradient,
    Dataset,
    FloatArray,
    ProgressBar,
    TrainingResult,
    load_digits,
    sgd,
    train,
)
from distsrv.security import Security
from distsrv.server import EVERY_TASK, Server
from distsrv.variables import Variable

__all__ = ["add_training_arguments", "learning_rate", "worker", "worker_arguments"]

#: The default SGD step size of each framework's model.
LEARNING_RATES = {"numpy": 0.3, "torch": 0.05}
#: How long a task waits for the others to start, and a step's collective for its peers.
STARTUP_TIMEOUT = 60.0
STEP_TIMEOUT = 30.0


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options ``distsrv demo`` passes on to every task."""
    parser.add_argument("--epochs", type=int, default=20, help="passes over the data (default 20)")
    parser.add_argument(
        "--ps",
        action="store_true",
        help="push gradients to parameter-server variables on a 'ps' task instead of all-reducing",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="global batch, split over the workers (64)"
    )
    parser.add_argument(
        "--learning-rate",
        type=float,
        help=f"SGD step size (default {LEARNING_RATES['numpy']}, "
        f"{LEARNING_RATES['torch']} with momentum for torch)",
    )
    parser.add_argument(
        "--framework",
        choices=list(LEARNING_RATES),
        default="numpy",
        help="numpy: an MLP whose gradients distsrv all-reduces; torch: a CNN under PyTorch's "
        "DistributedDataParallel over distsrv's torch.distributed backend, beside gloo",
    )
    parser.add_argument("--hidden", type=int, default=64, help="hidden units of the MLP (64)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation and shuffling (0)")
    parser.add_argument(
        "--crash-worker",
        type=int,
        metavar="INDEX",
        help="make worker INDEX exit abruptly in its first epoch, to watch the cluster stop",
    )


def worker_arguments(args: argparse.Namespace) -> list[str]:
    """``args``' training options as command-line arguments for each task."""
    arguments = [
        f"--epochs={args.epochs}",
        f"--batch-size={args.batch_size}",
        f"--learning-rate={learning_rate(args)!r}",
        f"--framework={args.framework}",
        f"--hidden={args.hidden}",
        f"--seed={args.seed}",
    ]
    if args.ps:
        arguments.append("--ps")
    if args.crash_worker is not None:
        arguments.append(f"--crash-worker={args.crash_worker}")
    return arguments


def learning_rate(args: argparse.Namespace) -> float:
    """The step size given, or the framework's default."""
    given: float | None = args.learning_rate
    return LEARNING_RATES[args.framework] if given is None else given


@dataclass
class Traffic:
    """Tensor bytes this process handed to distsrv and got back from it."""

    sent: int = 0
    received: int = 0


def worker(args: argparse.Namespace) -> int:
    """One task of the main job, its place from ``TF_CONFIG`` (``distsrv demo``, Kubeflow) or
    Slurm (``srun ... distsrv demo-worker``)."""
    try:
        spec, job, index, source = ClusterSpec.from_env(slurm_port=args.slurm_port)
    except ValueError as error:
        raise SystemExit(f"distsrv demo-worker: {error}") from None
    # The launcher hands every task the cluster's token and TLS (`distsrv demo` makes them).
    with Server(spec, job_name=job, task_index=index, security=Security.from_env()) as server:
        print(
            f"serving {server.task} at {server.target} (pid {os.getpid()}, cluster from {source})",
            flush=True,
        )
        try:
            server.wait_for_cluster(timeout=STARTUP_TIMEOUT)
            if job == "ps":
                return _host_parameters(server, args)
            return _train(server, args)
        except OpError as error:
            # A peer failed or vanished (the error names it): say so, and stop.
            print(f"{server.task} stopping: {type(error).__name__}: {error}", flush=True)
            return 1


def _model(args: argparse.Namespace, data: Dataset) -> MLP:
    return MLP(data.num_features, args.hidden, data.num_classes, seed=args.seed)


def _variable_name(parameter: str) -> str:
    return f"mlp/{parameter}"


def _host_parameters(server: Server, args: argparse.Namespace) -> int:
    """The ps task: creates one variable per parameter tensor, initialised as every worker would
    initialise its own model, then serves the workers' updates until they are done."""
    model = _model(args, load_digits())
    for name, value in model.views(model.parameters).items():
        server.create_variable(_variable_name(name), value, on=server.task)
    server.barrier(
        group=EVERY_TASK, timeout=STARTUP_TIMEOUT
    )  # the variables exist: the workers may start
    print(f"hosting {len(model.shapes)} variables ({model.parameters.nbytes} bytes)", flush=True)
    # Everyone meets again once training is over: only then may the variables go.
    server.barrier(group=EVERY_TASK, timeout=None)
    print("the workers are done", flush=True)
    return 0


def _train(server: Server, args: argparse.Namespace) -> int:
    workers = server.cluster_spec.num_tasks("worker")
    rank = server.task_index
    data = load_digits()
    model = _model(args, data)
    traffic = Traffic()
    if args.ps:
        server.barrier(
            group=EVERY_TASK, timeout=STARTUP_TIMEOUT
        )  # the ps task has created the variables
        apply = _parameter_server_sgd(server, model, learning_rate(args), traffic)
    else:
        apply = _all_reduce_sgd(server, learning_rate(args), traffic)
    if args.crash_worker == rank:
        apply = _crash_after(3, apply)

    mode = "parameter server" if args.ps else "all-reduce"
    if rank == 0:
        print(
            f"training a {data.num_features}-{args.hidden}-{data.num_classes} MLP on "
            f"{len(data.train_y)} digits, {workers} workers ({mode}), global batch "
            f"{args.batch_size}, {args.epochs} epochs",
            flush=True,
        )
    result = train(
        model,
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        apply=apply,
        seed=args.seed,
        rank=rank,
        num_ranks=workers,
        progress=ProgressBar(args.epochs) if rank == 0 else None,
    )
    # The workers' last meeting: a worker that has the totals needs no other worker's server, and
    # its own contribution is already held by every other one.
    totals = server.all_reduce(
        np.array([traffic.sent, traffic.received], dtype=np.int64),
        op="sum",
        group="worker",
        timeout=STEP_TIMEOUT,
    )
    if args.ps:
        server.barrier(
            group=EVERY_TASK, timeout=STEP_TIMEOUT
        )  # the workers are done: the ps task may stop
    if rank == 0:
        _report(result, int(totals[0]), int(totals[1]), args, data)
    else:
        print(f"done: test accuracy {result.test_accuracy:.2%}", flush=True)
    return 0


def _all_reduce_sgd(server: Server, learning_rate: float, traffic: Traffic) -> ApplyGradient:
    def apply(model: MLP, gradient_sum: FloatArray, batch_size: int) -> None:
        # One buffer for all layers: a step costs one collective's latency, not four.
        total = server.all_reduce(gradient_sum, op="sum", group="worker", timeout=STEP_TIMEOUT)
        traffic.sent += gradient_sum.nbytes
        traffic.received += total.nbytes
        model.parameters -= (learning_rate / batch_size) * total

    return apply


def _parameter_server_sgd(
    server: Server, model: MLP, learning_rate: float, traffic: Traffic
) -> ApplyGradient:
    variables = {name: server.variable(_variable_name(name), on=("ps", 0)) for name in model.shapes}
    _read_parameters(model, variables, traffic)

    def apply(model: MLP, gradient_sum: FloatArray, batch_size: int) -> None:
        # Everyone has read the current parameters before anyone changes them.
        server.barrier(group="worker", timeout=STEP_TIMEOUT)
        for name, gradient in model.views(gradient_sum).items():
            # var -= lr * grad, applied on the ps task: the workers' updates add up to the step
            # on the mean gradient of the global batch.
            variables[name].sgd_step(gradient, learning_rate / batch_size)
            traffic.sent += gradient.nbytes
        server.barrier(group="worker", timeout=STEP_TIMEOUT)  # every update of this step is in
        _read_parameters(model, variables, traffic)

    return apply


def _read_parameters(model: MLP, variables: dict[str, Variable], traffic: Traffic) -> None:
    for name, view in model.views(model.parameters).items():
        value = variables[name].read()
        view[...] = value
        traffic.received += value.nbytes


def _crash_after(steps: int, apply: ApplyGradient) -> ApplyGradient:
    """``apply`` for ``steps`` steps, then an abrupt exit without a word to the peers: a crash."""
    taken = 0

    def crashing(model: MLP, gradient_sum: FloatArray, batch_size: int) -> None:
        nonlocal taken
        if taken == steps:
            print(f"crashing on purpose after {steps} steps (--crash-worker)", flush=True)
            os._exit(3)
        taken += 1
        apply(model, gradient_sum, batch_size)

    return crashing


def _report(
    result: TrainingResult, sent: int, received: int, args: argparse.Namespace, data: Dataset
) -> None:
    print(
        f"test accuracy {result.test_accuracy:.2%}, {result.samples_per_second:,.0f} samples/s, "
        f"exchanged {_mib(sent + received)} (workers sent {_mib(sent)}, "
        f"received {_mib(received)})",
        flush=True,
    )
    reference = train(
        _model(args, data),
        data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        apply=sgd(learning_rate(args)),
        seed=args.seed,
    )
    difference = (result.test_accuracy - reference.test_accuracy) * 100
    print(
        f"single process, same model and batches: test accuracy {reference.test_accuracy:.2%} "
        f"({difference:+.2f} points distributed), {reference.samples_per_second:,.0f} samples/s",
        flush=True,
    )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"
