"""top1_accuracy and eval_mode: exact counts in one process and summed over gloo ranks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from snexp.runtime.metrics import eval_mode, top1_accuracy

# logits are the inputs (forward = identity): argmax per row is 0, 1, 1, 0, 2 | 1, 2
_X = torch.tensor([[3.0, 0, 0], [0, 2.0, 0], [0, 1.0, 0], [5.0, 0, 0], [0, 0, 1.0],
                   [0, 4.0, 0], [0, 0, 2.0]])
_Y = torch.tensor([0, 1, 2, 0, 2, 0, 2])  # rows 2 and 5 are wrong: 5 of 7 right
_BATCHES = [(_X[:5], _Y[:5]), (_X[5:], _Y[5:])]


@pytest.mark.parametrize("ranks", ["local", "sum", "split"])
def test_counts_samples_not_batches_in_one_process(ranks):
    # 5 correct of 7, whatever the batch sizes; in one process every mode is local
    assert top1_accuracy(lambda x: x, _BATCHES, ranks=ranks) == 5 / 7
    moved = []
    assert top1_accuracy(lambda x: x, _BATCHES, to_device=lambda b: moved.append(b) or b) == 5 / 7
    assert len(moved) == 2
    assert top1_accuracy(lambda x: x, []) == 0.0


def test_runs_without_gradients_and_refuses_unknown_modes():
    seen = []
    top1_accuracy(lambda x: seen.append(torch.is_grad_enabled()) or x, _BATCHES)
    assert seen == [False, False]
    with pytest.raises(ValueError, match="ranks must be 'local', 'sum' or 'split', got 'all'"):
        top1_accuracy(lambda x: x, _BATCHES, ranks="all")


def test_eval_mode_restores_the_mode_even_after_an_error():
    net = nn.Sequential(nn.BatchNorm1d(3)).train()
    with eval_mode(net):
        assert not net.training and not net[0].training
    assert net.training and net[0].training
    with pytest.raises(RuntimeError), eval_mode(net):
        raise RuntimeError("boom")
    assert net.training
    net.eval()
    with eval_mode(net):
        pass
    assert not net.training


def _worker(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        seen = []

        def forward(x):
            seen.append(len(x))
            return x

        # "split": the same batches on both ranks, each runs every 2nd sample of each
        split = top1_accuracy(forward, _BATCHES + [(_X[:1], _Y[:1])], ranks="split")
        # "sum": each rank its own share (rank 0 the first batch, rank 1 the second)
        share = top1_accuracy(lambda x: x, [_BATCHES[rank]], ranks="sum")
        local = top1_accuracy(lambda x: x, [_BATCHES[rank]])
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump({"split": split, "seen": seen, "sum": share, "local": local}, f)
    finally:
        dist.destroy_process_group()


def test_ranks_sum_their_counts_under_gloo(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=2,
             join=True)
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # the one-sample batch (smaller than the world) runs whole on both ranks and counts once
    assert [g["seen"] for g in got] == [[3, 1, 1], [2, 1, 1]]
    # both ranks return the accuracy over all samples: 6 of 8, and 5 of 7
    assert [g["split"] for g in got] == [6 / 8, 6 / 8]
    assert [g["sum"] for g in got] == [5 / 7, 5 / 7]
    # "local" does not reach the other rank
    assert [g["local"] for g in got] == [4 / 5, 1 / 2]
