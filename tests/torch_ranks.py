"""One rank of a torch.distributed job, for tests/test_torch_backend.py:
``python torch_ranks.py SCENARIO BACKEND RANK WORLD INIT_METHOD [OUTPUT]``. Each scenario checks
what it can itself and prints ``ok SCENARIO``; ddp saves the trained parameters to OUTPUT."""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch.testing import assert_close

import distsrv
import distsrv.errors
import distsrv.torch


def collectives(rank: int, world: int) -> None:
    ranks = torch.arange(world, dtype=torch.float64)
    expected = {
        dist.ReduceOp.SUM: (ranks + 1).sum(),
        dist.ReduceOp.AVG: (ranks + 1).mean(),
        dist.ReduceOp.PRODUCT: (ranks + 1).prod(),
        dist.ReduceOp.MIN: torch.tensor(1.0, dtype=torch.float64),
        dist.ReduceOp.MAX: torch.tensor(float(world), dtype=torch.float64),
    }
    for op, value in expected.items():
        tensor = torch.full((7,), rank + 1.0, dtype=torch.float64)
        dist.all_reduce(tensor, op=op)
        assert_close(tensor, torch.full((7,), float(value), dtype=torch.float64))
    integers = torch.full((3,), rank + 1, dtype=torch.int64)
    dist.all_reduce(integers)
    assert_close(integers, torch.full((3,), world * (world + 1) // 2))

    root = world - 1
    data = torch.arange(5.0) if rank == root else torch.zeros(5)
    dist.broadcast(data, src=root)
    assert_close(data, torch.arange(5.0))

    gathered = [torch.zeros(2) for _ in range(world)]
    dist.all_gather(gathered, torch.full((2,), float(rank)))
    assert_close(torch.stack(gathered), ranks.float()[:, None].expand(world, 2))
    flat = torch.zeros(world * 2)
    dist.all_gather_into_tensor(flat, torch.full((2,), float(rank)))
    assert_close(flat, ranks.float().repeat_interleave(2))

    share = torch.zeros(2)
    dist.reduce_scatter(share, [torch.full((2,), float(i + rank)) for i in range(world)])
    assert_close(share, torch.full((2,), float(world * rank + ranks.sum())))
    share = torch.zeros(3)
    dist.reduce_scatter_tensor(share, torch.arange(3.0 * world))
    assert_close(share, world * torch.arange(3.0 * rank, 3.0 * rank + 3))

    total = torch.full((4,), rank + 1.0)
    dist.reduce(total, dst=0)
    if rank == 0:
        assert_close(total, torch.full((4,), float((ranks + 1).sum())))
    rows = [torch.zeros(2) for _ in range(world)] if rank == 0 else None
    dist.gather(torch.full((2,), float(rank)), rows, dst=0)
    if rows is not None:
        assert_close(torch.stack(rows), ranks.float()[:, None].expand(world, 2))
    mine = torch.zeros(2)
    dist.scatter(mine, [torch.full((2,), 10.0 * i) for i in range(world)] if rank == 0 else None)
    assert_close(mine, torch.full((2,), 10.0 * rank))
    swapped = torch.zeros(world)
    dist.all_to_all_single(swapped, torch.arange(float(world)) + 100 * rank)
    assert_close(swapped, 100 * ranks.float() + rank)
    # Uneven splits: rank r sends j + 1 elements to rank j, so receives r + 1 from each.
    uneven = torch.zeros((rank + 1) * world)
    dist.all_to_all_single(
        uneven,
        torch.cat([torch.full((j + 1,), 100.0 * rank + j) for j in range(world)]),
        output_split_sizes=[rank + 1] * world,
        input_split_sizes=[j + 1 for j in range(world)],
    )
    assert_close(uneven, (100 * ranks.float() + rank).repeat_interleave(rank + 1))
    parts = [torch.zeros(1) for _ in range(world)]
    dist.all_to_all(parts, [torch.full((1,), 100.0 * rank + j) for j in range(world)])
    assert_close(torch.cat(parts), 100 * ranks.float() + rank)

    dist.barrier()
    works = [dist.all_reduce(torch.ones(2), async_op=True) for _ in range(3)]
    for work in works:
        work.wait()
    future = dist.all_reduce(torch.ones(2), async_op=True).get_future()
    assert_close(future.wait()[0], torch.full((2,), float(world)))

    # A ring of sends, each rank to the next: blocking and non-blocking.
    after, before = (rank + 1) % world, (rank - 1) % world
    outgoing = dist.isend(torch.full((3,), float(rank)), after)
    incoming = torch.zeros(3)
    dist.recv(incoming, before)
    outgoing.wait()
    assert_close(incoming, torch.full((3,), float(before)))
    # From any source: torch learns who sent it.
    outgoing = dist.isend(torch.full((3,), rank + 0.25), after, tag=9)
    assert dist.recv(incoming, tag=9) == before
    outgoing.wait()
    assert_close(incoming, torch.full((3,), before + 0.25))
    request = dist.irecv(incoming, before, tag=5)
    dist.send(torch.full((3,), rank + 0.5), after, tag=5)
    request.wait()
    assert_close(incoming, torch.full((3,), before + 0.5))

    # A subgroup of the first and last ranks: its ranks are its own, its tasks the world's.
    ends = dist.new_group([0, world - 1])
    if rank in (0, world - 1):
        tensor = torch.full((2,), float(rank))
        dist.all_reduce(tensor, group=ends)
        assert_close(tensor, torch.full((2,), float(world - 1)))
        data = torch.full((2,), float(rank))
        dist.broadcast(data, src=world - 1, group=ends)  # src is a global rank
        assert_close(data, torch.full((2,), float(world - 1)))

    with pytest.raises(ValueError, match="BAND"):
        dist.all_reduce(torch.ones(1, dtype=torch.int32), op=dist.ReduceOp.BAND)


def ddp(rank: int, world: int, output: str) -> None:
    """A few steps of a small convolutional model under DistributedDataParallel, each rank on
    its own part of one fixed batch."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 10),
    ).double()
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(8 * world, 1, 8, 8, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 10, (8 * world,), generator=generator)
    mine = slice(8 * rank, 8 * (rank + 1))
    for _ in range(5):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images[mine]), labels[mine])
        loss.backward()
        optimizer.step()
    torch.save(model.module.state_dict(), output)


def timeout(rank: int, world: int) -> None:
    """Rank 0 reduces alone: past the group's timeout it gets torch's backend error."""
    if rank != 0:
        time.sleep(6)
        return
    started = time.monotonic()
    with pytest.raises(dist.DistBackendError, match="DeadlineExceededError") as failure:
        dist.all_reduce(torch.ones(1))
    assert isinstance(failure.value.__cause__, distsrv.errors.DeadlineExceededError)
    assert 1.5 < time.monotonic() - started < 10, time.monotonic() - started


def lost(rank: int, world: int, how: str) -> None:
    """The last rank is killed (or frozen) after a barrier: within the tasks' peer_timeout the
    others' all_reduce fails with torch's backend error, naming distsrv's UnavailableError."""
    dist.barrier()
    if rank == world - 1:
        os.kill(os.getpid(), signal.SIGKILL if how == "killed" else signal.SIGSTOP)
    started = time.monotonic()
    with pytest.raises(dist.DistBackendError, match="UnavailableError") as failure:
        dist.all_reduce(torch.ones(1 << 10))
    assert isinstance(failure.value.__cause__, distsrv.errors.UnavailableError)
    # peer_timeout is 1 s; the group's timeout (60 s) is far off.
    assert time.monotonic() - started < 15, time.monotonic() - started


def wrong_token(rank: int, world: int, init_method: str) -> None:
    """Every rank has its own token ($DISTSRV_TOKEN): none admits another, and joining the
    group fails within its timeout with torch's backend error saying the token is wrong."""
    with pytest.raises(dist.DistBackendError, match="requires the cluster's token") as failure:
        dist.init_process_group(
            "distsrv",
            rank=rank,
            world_size=world,
            init_method=init_method,
            timeout=timedelta(seconds=3),
        )
    assert isinstance(failure.value.__cause__, distsrv.errors.OpError)


def main() -> None:
    scenario, backend, rank, world, init_method = sys.argv[1:6]
    if scenario == "wrong-token":
        wrong_token(int(rank), int(world), init_method)
        print(f"ok {scenario}", flush=True)
        return
    group_timeout = timedelta(seconds=2 if scenario == "timeout" else 60)
    dist.init_process_group(
        backend,
        rank=int(rank),
        world_size=int(world),
        init_method=init_method,
        timeout=group_timeout,
        pg_options=distsrv.ServerConfig(peer_timeout=1.0) if backend == "distsrv" else None,
    )
    if scenario == "collectives":
        collectives(int(rank), int(world))
    elif scenario == "ddp":
        ddp(int(rank), int(world), sys.argv[6])
    elif scenario == "timeout":
        timeout(int(rank), int(world))
    elif scenario in ("killed", "frozen"):
        lost(int(rank), int(world), scenario)
        print(f"ok {scenario}", flush=True)
        os._exit(0)  # past a lost peer, torch's teardown would wait for it
    if scenario != "timeout":
        dist.destroy_process_group()
    print(f"ok {scenario}", flush=True)


if __name__ == "__main__":
    main()
