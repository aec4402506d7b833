"""The main job in PyTorch (``distsrv demo --framework torch``): a small convolutional network
trained on the shipped digits with ``DistributedDataParallel``, once over distsrv's
torch.distributed backend and once over gloo, in every worker; worker 0 then trains the same
model on the same global batches in one process. Worker 0 prints each run's test accuracy and
time per step.

Every worker derives the same shuffled global batches from the seed and computes the loss of its
shard, scaled so that DDP's average of the workers' gradients is the gradient of the global
batch's mean loss: each run is the single-process run, up to the order of float additions.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, TCPStore
from torch.nn.parallel import DistributedDataParallel

import distsrv.torch
from distsrv.cluster import ClusterSpec
from distsrv.examples.demo import learning_rate
from distsrv.examples.train import Dataset, global_batches, load_digits, shard

__all__ = ["worker"]

#: How long a worker waits for the others, and a collective of a step for its peers.
TIMEOUT = timedelta(seconds=60)


@dataclass(frozen=True)
class Run:
    """How one training went."""

    test_accuracy: float
    seconds_per_step: float


def make_model(seed: int) -> torch.nn.Module:
    """8x8 digits -> two 3x3 convolutions -> 10 classes."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 10),
    )


def train(
    model: torch.nn.Module,
    data: Dataset,
    args: argparse.Namespace,
    rank: int = 0,
    num_ranks: int = 1,
) -> Run:
    """SGD with momentum over ``args.epochs`` epochs of global batches, this rank's shard of
    each; ``model`` may be a DDP module, which averages the ranks' gradients."""
    images = torch.from_numpy(data.train_x).reshape(-1, 1, 8, 8)
    labels = torch.from_numpy(data.train_y)
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate(args), momentum=0.9)
    steps = 0
    started = time.perf_counter()
    for epoch in range(args.epochs):
        for batch in global_batches(len(labels), args.batch_size, args.seed, epoch):
            mine = torch.from_numpy(shard(batch, rank, num_ranks))
            optimizer.zero_grad()
            # Summed over the shard and scaled by ranks / batch: the ranks' mean is the batch's.
            loss = torch.nn.functional.cross_entropy(
                model(images[mine]), labels[mine], reduction="sum"
            ) * (num_ranks / len(batch))
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            steps += 1
    elapsed = time.perf_counter() - started
    return Run(_accuracy(model, data), elapsed / steps)


def _accuracy(model: torch.nn.Module, data: Dataset) -> float:
    with torch.no_grad():
        logits = model(torch.from_numpy(data.test_x).reshape(-1, 1, 8, 8))
    return float((logits.argmax(dim=1).numpy() == data.test_y).mean())


def worker(args: argparse.Namespace) -> int:
    """One worker: its rank from ``TF_CONFIG`` (or Slurm); worker 0's address is the store."""
    try:
        spec, _, rank, _ = ClusterSpec.from_env(slurm_port=args.slurm_port)
    except ValueError as error:
        raise SystemExit(f"distsrv demo-worker: {error}") from None
    world = spec.num_tasks("worker")
    host, port = spec.task_address("worker", 0).rsplit(":", 1)
    torch.set_num_threads(1)
    store = TCPStore(host.strip("[]"), int(port), world, is_master=rank == 0, timeout=TIMEOUT)
    data = load_digits()
    runs = {}
    for backend in (distsrv.torch.BACKEND, "gloo"):
        dist.init_process_group(
            backend,
            store=PrefixStore(backend, store),
            rank=rank,
            world_size=world,
            timeout=TIMEOUT,
        )
        model = DistributedDataParallel(make_model(args.seed))
        runs[backend] = train(model, data, args, rank, world)
        dist.destroy_process_group()
    if rank != 0:
        print(f"done: test accuracy {runs['gloo'].test_accuracy:.2%}", flush=True)
        return 0
    runs["one process"] = train(make_model(args.seed), data, args)
    print(
        f"a CNN on {len(data.train_y)} digits, {world} workers, DDP, global batch "
        f"{args.batch_size}, {args.epochs} epochs",
        flush=True,
    )
    for name, label in (
        (distsrv.torch.BACKEND, "DDP over distsrv"),
        ("gloo", "DDP over gloo"),
        ("one process", "one process"),
    ):
        run = runs[name]
        print(
            f"{label + ':':<18} test accuracy {run.test_accuracy:.2%}, "
            f"{run.seconds_per_step * 1e3:.2f} ms/step",
            flush=True,
        )
    ratio = runs[distsrv.torch.BACKEND].seconds_per_step / runs["gloo"].seconds_per_step
    print(f"distsrv step time {ratio:.2f}x gloo's", flush=True)
    return 0
