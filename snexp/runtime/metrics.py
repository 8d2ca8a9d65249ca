"""Top-1 accuracy over batches, in one process or counted over all torchrun ranks.

The one evaluation of a classifier that ``nas`` (the shared child's rewards and derive
accuracies, the retrained network's test accuracy) and ``benchmarks`` (the batch-size study)
use: correct predictions and samples are counted as integers and divided once at the end, so
a batch of any size weighs by its samples and the ranks' counts add up exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from snexp.runtime import distributed

__all__ = ["eval_mode", "top1_accuracy"]

Ranks = Literal["local", "sum", "split"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (BN and SN: running statistics) inside, its own mode after.

    Example:
        >>> with eval_mode(net):
        ...     acc = top1_accuracy(net, loader)
    """
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def top1_accuracy(forward: Callable[[Tensor], Tensor], batches: Iterable[Sequence[Tensor]], *,
                  to_device: Callable[[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]
                  | None = None, ranks: Ranks = "local",
                  device: torch.device | None = None) -> float:
    """The share of samples whose largest logit is their label, without gradients.

    Args:
        forward: maps a batch of inputs to logits (N, classes): a module (in the mode the
            caller chose, see :func:`eval_mode`) or e.g. ``lambda x: net(x, arch).logits``.
        batches: ``(inputs, labels)`` pairs (a DataLoader or a list).
        to_device: applied to each pair first (e.g. ``Run.to_device``); ``None``: as given.
        ranks: ``"local"``: this process's batches only; ``"sum"``: each rank holds its own
            share of the samples, and the counts are summed over the ranks; ``"split"``: all
            ranks hold the same batches, each runs every ``world_size``-th sample of each
            batch (a batch smaller than the world runs whole on every rank and counts once),
            and the counts are summed. "sum" and "split" are collectives under torchrun: every
            rank calls them alike; in one process they are "local".
        device: where the counts are summed ("sum", "split"); ``None``: the labels' device
            (CPU when there were no batches). NCCL needs the rank's CUDA device.

    Returns:
        Correct predictions / samples, in [0, 1]; 0.0 for no samples.

    Example:
        >>> logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
        >>> top1_accuracy(lambda x: x, [(logits, torch.tensor([0, 1, 1]))])
        0.6666666666666666
    """
    if ranks not in ("local", "sum", "split"):
        raise ValueError(f"ranks must be 'local', 'sum' or 'split', got {ranks!r}")
    world = distributed.world_size() if ranks != "local" else 1
    rank = distributed.rank() if world > 1 else 0
    correct = total = 0
    with torch.no_grad():
        for batch in batches:
            x, y = to_device(tuple(batch)) if to_device is not None else batch
            device = device if device is not None else y.device
            whole = ranks != "split" or len(y) < world
            if not whole:
                x, y = x[rank::world], y[rank::world]  # this rank's share of the batch
            hits = int((forward(x).argmax(1) == y).sum())
            if ranks != "split" or not whole or rank == 0:
                correct, total = correct + hits, total + len(y)
    if world > 1:
        correct, total = distributed.all_reduce([correct, total], device or torch.device("cpu"))
    return correct / max(1, total)
