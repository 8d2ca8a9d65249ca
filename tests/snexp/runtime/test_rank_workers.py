"""snexp.runtime.run.Run.dataloader under torchrun: each rank's DataLoader workers draw their own
random
numbers (crops, flips, cutout), while the data order and one rank's draws stay reproducible.

Two ranks are simulated in one process: ``snexp.runtime.distributed.rank`` is patched to say 1,
which
is all ``Run`` asks about its rank; tests/snexp/runtime/test_distributed.py checks real gloo ranks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from snexp.runtime import distributed
from snexp.runtime.checkpoint import rank_seed, seed_worker
from snexp.runtime.config import RuntimeConfig
from snexp.runtime.run import Run

SEED = 3


class WorkerDraws(Dataset):
    """Item ``i`` is ``i`` and one draw each of torch, python and numpy in the loading worker."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> tuple[int, float, float, float]:
        return i, torch.rand(()).item(), random.random(), float(np.random.rand())


@dataclass(frozen=True)
class Config:
    """The smallest experiment config ``Run`` accepts."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def _rows(loader: DataLoader) -> list[tuple]:
    """Every item of every batch as (index, torch draw, python draw, numpy draw)."""
    return [row for batch in loader for row in zip(*(t.tolist() for t in batch))]


def _draws(out: Path, rank: int, monkeypatch: pytest.MonkeyPatch) -> tuple[list, torch.Tensor]:
    """Two epochs through ``run.dataloader`` with 2 workers as rank ``rank``."""
    with monkeypatch.context() as patch:
        patch.setattr(distributed, "rank", lambda: rank)
        config = Config(RuntimeConfig(out=str(out), device="cpu", seed=SEED))
        with Run(config, experiment="t", console=False) as run:
            assert run.rank == rank
            loader = run.dataloader(WorkerDraws(), batch_size=2, num_workers=2)
            rows = _rows(loader) + _rows(loader)
            return rows, run.generator.get_state()


def test_rank_seed_keeps_rank_zero_and_mixes_the_others():
    # rank 0: the seed itself; ranks 1..: distinct 64-bit seeds, the same on every call
    assert rank_seed(12345, 0) == 12345
    mixed = {rank_seed(12345, r) for r in range(1, 9)}
    assert len(mixed) == 8 and 12345 not in mixed
    assert rank_seed(12345, 2) == rank_seed(12345, 2) != rank_seed(12346, 2)
    assert all(0 <= s < 2**64 for s in mixed)


def test_single_process_workers_draw_what_they_drew_before(tmp_path, monkeypatch):
    # rank 0 is bit-identical to a plain loader seeded alike with the unmixed seed_worker
    rows, _ = _draws(tmp_path / "run", 0, monkeypatch)
    plain = DataLoader(WorkerDraws(), batch_size=2, shuffle=True, num_workers=2,
                       generator=torch.Generator().manual_seed(SEED), worker_init_fn=seed_worker)
    assert rows == _rows(plain) + _rows(plain)


def test_ranks_workers_draw_differently_in_the_same_order(tmp_path, monkeypatch):
    zero, state0 = _draws(tmp_path / "r0", 0, monkeypatch)
    one, state1 = _draws(tmp_path / "r1", 1, monkeypatch)
    again, _ = _draws(tmp_path / "r1-again", 1, monkeypatch)
    # the order (drawn from the shared generator) agrees and the generator advances alike
    assert [r[0] for r in zero] == [r[0] for r in one]
    assert torch.equal(state0, state1)
    # torch, python and numpy draws of rank 1's workers all differ from rank 0's ...
    for source in (1, 2, 3):
        assert not {r[source] for r in zero} & {r[source] for r in one}
    # ... within rank 1 the two workers and the two epochs differ, and a rerun repeats them
    assert len({r[1] for r in one}) == len(one) == 16
    assert one == again
