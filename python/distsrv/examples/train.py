"""The main job's model, data and training loop, in numpy alone: a small MLP that classifies
8x8 handwritten digits.

The loop is written once and knows nothing of distribution: each step computes the gradient of the
loss *summed* over this process's shard of the global batch and hands it to an ``apply`` function,
which combines the shards (or not, in a single process) and updates the parameters. Summing, then
dividing by the global batch size once, keeps the update exactly the mean over the global batch
even when shards differ in size, so a data-parallel run is mathematically the single-process run
of the same global batches.
"""

from __future__ import annotations

import importlib.resources
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

__all__ = [
    "MLP",
    "ApplyGradient",
    "Dataset",
    "EpochReport",
    "FloatArray",
    "LabelArray",
    "ProgressBar",
    "TrainingResult",
    "global_batches",
    "load_digits",
    "sgd",
    "shard",
    "train",
]

FloatArray = npt.NDArray[np.floating[Any]]
LabelArray = npt.NDArray[np.int64]

#: Holds out this fraction of the digits for testing; the split is fixed, whatever the seed.
TEST_FRACTION = 0.2
_SPLIT_SEED = 20240501


@dataclass(frozen=True)
class Dataset:
    """Images flattened to float32 rows scaled to [0, 1], and their labels, split once."""

    train_x: npt.NDArray[np.float32]
    train_y: LabelArray
    test_x: npt.NDArray[np.float32]
    test_y: LabelArray

    @property
    def num_features(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def num_classes(self) -> int:
        return int(max(self.train_y.max(), self.test_y.max())) + 1


def load_digits() -> Dataset:
    """The 1797 digits shipped with distsrv (scikit-learn's ``load_digits``: the UCI Optical
    Recognition of Handwritten Digits test set, CC BY 4.0), split 80/20 in a fixed order."""
    resource = importlib.resources.files("distsrv.examples") / "data" / "digits.npz"
    with resource.open("rb") as file, np.load(file) as archive:
        images, labels = archive["images"], archive["labels"]
    # Pixels count 0..16 dark cells of a 4x4 block; scaling to [0, 1] keeps the first layer's
    # pre-activations near unit size for the initialisation below.
    features = images.reshape(len(images), -1).astype(np.float32) / 16.0
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(images))
    test_size = round(len(images) * TEST_FRACTION)
    test, train_part = order[:test_size], order[test_size:]
    return Dataset(
        train_x=features[train_part],
        train_y=labels[train_part].astype(np.int64),
        test_x=features[test],
        test_y=labels[test].astype(np.int64),
    )


class MLP:
    """``inputs -> hidden (ReLU) -> classes``, softmax cross-entropy.

    The parameters live in one flat vector, and ``weights1``, ``bias1``, ``weights2``, ``bias2``
    are views into it: a gradient is the same flat shape, so a data-parallel step exchanges one
    buffer rather than one small tensor per layer, and per-layer views remain at hand for a
    parameter server that holds each tensor as its own variable.
    """

    def __init__(
        self,
        inputs: int,
        hidden: int,
        classes: int,
        seed: int = 0,
        dtype: npt.DTypeLike = np.float32,
    ) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {
            "weights1": (inputs, hidden),
            "bias1": (hidden,),
            "weights2": (hidden, classes),
            "bias2": (classes,),
        }
        self.size = sum(int(np.prod(shape)) for shape in self.shapes.values())
        self.parameters: FloatArray = np.zeros(self.size, dtype=dtype)
        rng = np.random.default_rng(seed)
        views = self.views(self.parameters)
        # He initialisation for the ReLU layer, Glorot-sized for the softmax layer; biases zero.
        views["weights1"][...] = rng.normal(0.0, np.sqrt(2.0 / inputs), (inputs, hidden))
        views["weights2"][...] = rng.normal(0.0, np.sqrt(1.0 / hidden), (hidden, classes))

    def views(self, flat: FloatArray) -> dict[str, FloatArray]:
        """Named views, shaped like the parameters, into ``flat`` (the parameters or a
        gradient)."""
        views, offset = {}, 0
        for name, shape in self.shapes.items():
            count = int(np.prod(shape))
            views[name] = flat[offset : offset + count].reshape(shape)
            offset += count
        return views

    def logits(self, x: FloatArray) -> FloatArray:
        p = self.views(self.parameters)
        hidden = np.maximum(x @ p["weights1"] + p["bias1"], 0.0)
        result: FloatArray = hidden @ p["weights2"] + p["bias2"]
        return result

    def loss_and_gradient(self, x: FloatArray, y: LabelArray) -> tuple[float, FloatArray]:
        """The cross-entropy summed over the rows of ``x`` and its gradient, flat. Summed, not
        averaged, so that shards of one batch add up to the whole batch's."""
        p = self.views(self.parameters)
        pre_activation = x @ p["weights1"] + p["bias1"]
        hidden = np.maximum(pre_activation, 0.0)
        logits = hidden @ p["weights2"] + p["bias2"]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(len(y))
        loss = -float(log_probabilities[rows, y].sum())

        gradient = np.zeros_like(self.parameters)
        g = self.views(gradient)
        d_logits = np.exp(log_probabilities)
        d_logits[rows, y] -= 1.0
        g["weights2"][...] = hidden.T @ d_logits
        g["bias2"][...] = d_logits.sum(axis=0)
        d_pre_activation = (d_logits @ p["weights2"].T) * (pre_activation > 0)
        g["weights1"][...] = x.T @ d_pre_activation
        g["bias1"][...] = d_pre_activation.sum(axis=0)
        return loss, gradient

    def accuracy(self, x: FloatArray, y: LabelArray) -> float:
        return float((self.logits(x).argmax(axis=1) == y).mean())


def global_batches(
    num_samples: int, batch_size: int, seed: int, epoch: int
) -> Iterator[npt.NDArray[np.intp]]:
    """The index arrays of one epoch's global batches: a fresh shuffle per epoch that every
    process derives alike from ``(seed, epoch)``, so no indices need to be exchanged. The last
    batch may be short."""
    order = np.random.default_rng((seed, epoch)).permutation(num_samples)
    for start in range(0, num_samples, batch_size):
        yield order[start : start + batch_size]


def shard(batch: npt.NDArray[np.intp], rank: int, num_ranks: int) -> npt.NDArray[np.intp]:
    """Rank ``rank``'s contiguous share of ``batch``; shares differ by one row at most, and one may
    be empty when the batch is shorter than the number of ranks."""
    result: npt.NDArray[np.intp] = np.array_split(batch, num_ranks)[rank]
    return result


class ProgressBar:
    """One line per epoch: how far the whole run has come, the epoch's time, loss and accuracy.

    The line is written when the epoch ends rather than redrawn in place: under ``distsrv demo``
    every process's output reaches the terminal through a pipe, line by line, with the task's name
    in front, where a carriage-return redraw would become a new line per update.
    """

    def __init__(self, epochs: int, stream: TextIO | None = None, width: int = 24) -> None:
        self.epochs = epochs
        self.stream = stream if stream is not None else sys.stdout
        self.width = width

    def epoch_done(self, report: EpochReport) -> None:
        filled = round(self.width * report.epoch / self.epochs)
        bar = "=" * filled + " " * (self.width - filled)
        digits = len(str(self.epochs))
        self.stream.write(
            f"epoch {report.epoch:>{digits}}/{self.epochs} [{bar}] "
            f"{report.samples} samples in {report.seconds:.2f}s  loss {report.loss:.4f}  "
            f"test accuracy {report.test_accuracy:.2%}\n"
        )
        self.stream.flush()


@dataclass
class EpochReport:
    """One epoch as this process saw it; ``seconds`` counts the training steps only."""

    epoch: int
    samples: int
    seconds: float
    loss: float
    test_accuracy: float


@dataclass
class TrainingResult:
    """Every epoch's report, in order."""

    epochs: list[EpochReport] = field(default_factory=list)

    @property
    def test_accuracy(self) -> float:
        return self.epochs[-1].test_accuracy

    @property
    def samples_per_second(self) -> float:
        """Training samples of the global batches per second of training steps (evaluation not
        counted)."""
        return sum(e.samples for e in self.epochs) / sum(e.seconds for e in self.epochs)


#: Combines one step's shard gradients and updates the model: ``(model, gradient summed over
#: this process's shard, global batch size) -> None``.
ApplyGradient = Callable[[MLP, FloatArray, int], None]


def sgd(learning_rate: float) -> ApplyGradient:
    """Plain SGD on the mean gradient of a global batch held whole by this process."""

    def apply(model: MLP, gradient_sum: FloatArray, batch_size: int) -> None:
        model.parameters -= (learning_rate / batch_size) * gradient_sum

    return apply


def train(
    model: MLP,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    apply: ApplyGradient,
    seed: int = 0,
    rank: int = 0,
    num_ranks: int = 1,
    progress: ProgressBar | None = None,
) -> TrainingResult:
    """Trains ``model`` on ``data`` for ``epochs``; with ``num_ranks`` > 1 this process computes
    the gradient of its shard of each global batch only, and ``apply`` combines the shards."""
    result = TrainingResult()
    for epoch in range(1, epochs + 1):
        loss_sum, seen, began = 0.0, 0, time.perf_counter()
        for batch in global_batches(len(data.train_y), batch_size, seed, epoch):
            mine = shard(batch, rank, num_ranks)
            loss, gradient = model.loss_and_gradient(data.train_x[mine], data.train_y[mine])
            apply(model, gradient, len(batch))
            loss_sum += loss
            seen += len(mine)
        seconds = time.perf_counter() - began
        report = EpochReport(
            epoch=epoch,
            samples=len(data.train_y),
            seconds=seconds,
            # This shard's loss per sample: a process sees its own shards only.
            loss=loss_sum / max(1, seen),
            test_accuracy=model.accuracy(data.test_x, data.test_y),
        )
        result.epochs.append(report)
        if progress is not None:
            progress.epoch_done(report)
    return result
