"""The main job's model, data and training loop (numpy only, no cluster)."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest

from distsrv.examples.train import (
    MLP,
    ApplyGradient,
    FloatArray,
    ProgressBar,
    global_batches,
    load_digits,
    sgd,
    shard,
    train,
)


def test_the_shipped_digits_load_and_split_the_same_way_every_time() -> None:
    data = load_digits()
    assert data.train_x.shape == (1438, 64)
    assert data.test_x.shape == (359, 64)
    assert data.train_x.dtype == np.float32
    assert data.train_x.min() == 0.0
    assert data.train_x.max() == 1.0
    assert set(np.unique(data.train_y)) == set(range(10)) == set(np.unique(data.test_y))
    again = load_digits()
    assert np.array_equal(data.test_x, again.test_x)
    assert np.array_equal(data.train_y, again.train_y)


def test_the_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(1)
    model = MLP(5, 7, 3, seed=2, dtype=np.float64)
    model.parameters += rng.normal(0.0, 0.1, model.size)  # non-zero biases too
    x = rng.normal(size=(6, 5))
    y = rng.integers(0, 3, size=6)
    _, gradient = model.loss_and_gradient(x, y)

    step = 1e-6
    numeric = np.empty(model.size)
    for i in range(model.size):
        saved = model.parameters[i]
        model.parameters[i] = saved + step
        above, _ = model.loss_and_gradient(x, y)
        model.parameters[i] = saved - step
        below, _ = model.loss_and_gradient(x, y)
        model.parameters[i] = saved
        numeric[i] = (above - below) / (2 * step)
    np.testing.assert_allclose(gradient, numeric, rtol=1e-5, atol=1e-7)


def test_the_loss_and_gradient_of_shards_add_up_to_the_batch() -> None:
    data = load_digits()
    model = MLP(64, 16, 10, seed=0, dtype=np.float64)
    x, y = data.train_x[:10].astype(np.float64), data.train_y[:10]
    loss, gradient = model.loss_and_gradient(x, y)
    parts = [model.loss_and_gradient(x[rows], y[rows]) for rows in (slice(0, 3), slice(3, 10))]
    assert loss == pytest.approx(sum(part[0] for part in parts))
    np.testing.assert_allclose(gradient, sum(part[1] for part in parts), atol=1e-12)


def test_same_seed_same_model() -> None:
    assert np.array_equal(MLP(64, 8, 10, seed=3).parameters, MLP(64, 8, 10, seed=3).parameters)
    assert not np.array_equal(MLP(64, 8, 10, seed=3).parameters, MLP(64, 8, 10, seed=4).parameters)


def test_each_epoch_shuffles_every_sample_once_alike_in_every_process() -> None:
    first = list(global_batches(100, 32, seed=0, epoch=1))
    assert [len(batch) for batch in first] == [32, 32, 32, 4]
    assert sorted(np.concatenate(first)) == list(range(100))
    again = list(global_batches(100, 32, seed=0, epoch=1))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    second = np.concatenate(list(global_batches(100, 32, seed=0, epoch=2)))
    assert not np.array_equal(np.concatenate(first), second)


@pytest.mark.parametrize(("size", "ranks"), [(64, 3), (4, 4), (2, 4), (0, 2)])
def test_shards_split_a_batch_exactly(size: int, ranks: int) -> None:
    batch = np.arange(size) * 7
    shards = [shard(batch, rank, ranks) for rank in range(ranks)]
    assert np.array_equal(np.concatenate(shards), batch)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_single_process_training_reaches_a_good_accuracy() -> None:
    data = load_digits()
    model = MLP(data.num_features, 64, data.num_classes, seed=0)
    result = train(model, data, epochs=20, batch_size=64, apply=sgd(0.3))
    assert result.test_accuracy >= 0.95
    assert result.epochs[-1].loss < result.epochs[0].loss
    assert result.samples_per_second > 0


def test_data_parallel_shards_summed_each_step_train_the_single_process_model() -> None:
    """Three ranks in threads sum their shard gradients in memory (what all_reduce does across
    processes): every rank ends with the single-process parameters, up to float rounding."""
    data = load_digits()
    ranks, epochs, batch_size, learning_rate = 3, 3, 64, 0.3
    reference = MLP(64, 32, 10, seed=5)
    train(reference, data, epochs=epochs, batch_size=batch_size, apply=sgd(learning_rate))

    meeting = threading.Barrier(ranks)
    contributions: list[FloatArray | None] = [None] * ranks
    models = [MLP(64, 32, 10, seed=5) for _ in range(ranks)]

    def summed_sgd(rank: int) -> ApplyGradient:
        def apply(model: MLP, gradient_sum: FloatArray, size: int) -> None:
            contributions[rank] = gradient_sum
            meeting.wait(timeout=30)
            total = np.sum(contributions, axis=0)
            meeting.wait(timeout=30)  # everyone has read this step's contributions
            model.parameters -= (learning_rate / size) * total

        return apply

    def run(rank: int) -> None:
        train(
            models[rank],
            data,
            epochs=epochs,
            batch_size=batch_size,
            apply=summed_sgd(rank),
            rank=rank,
            num_ranks=ranks,
        )

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(ranks)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for model in models:
        np.testing.assert_allclose(model.parameters, reference.parameters, atol=1e-4)
        assert model.accuracy(data.test_x, data.test_y) == pytest.approx(
            reference.accuracy(data.test_x, data.test_y), abs=0.01
        )


def test_the_progress_bar_writes_one_line_per_epoch() -> None:
    data = load_digits()
    stream = io.StringIO()
    train(
        MLP(64, 8, 10),
        data,
        epochs=4,
        batch_size=256,
        apply=sgd(0.3),
        progress=ProgressBar(4, stream, width=8),
    )
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("epoch 1/4 [==      ] 1438 samples in ")
    assert lines[-1].startswith("epoch 4/4 [========] 1438 samples in ")
    assert all("loss " in line and "test accuracy " in line for line in lines)
