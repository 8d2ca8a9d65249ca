"""``nas.search`` and ``nas.train`` under DDP: 2 CPU ranks started the way torchrun starts them.

Each spawned process gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT on 127.0.0.1) and calls the unchanged entry points ``main``. The child network
class is swapped for one that records the architecture of every forward pass and keeps the
trained network, so the tests can compare what the ranks (and one process) did.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import optuna
import pytest
import torch
import torch.multiprocessing as mp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import nas.search_loop
import nas.train_loop
from nas import search as search_cli
from nas import train as train_cli
from nas.child import ChildNet
from nas.data import DataConfig, build_splits
from nas.space import Architecture
from snexp.runtime.checkpoint import load_checkpoint

WORLD, BATCH = 2, 8  # per-rank batch; one process takes WORLD * BATCH
# No random augmentation (nor cutout, drop path, dropout): it draws from each rank's own RNG.
# A low lr: at ENAS's 0.05 these 4-filter networks amplify rounding ~30x per step (1 vs 2
# CPU threads in one process end 3e-2 apart after 10 steps; at 0.01 still ~10x), at 0.002 2
# ranks and 1 process end ~1e-7 apart but for a few weights at ReLU/max-pool kinks (see _agree).
# SN in the child (the quick preset has BN, which --sync-norm cannot synchronize on CPU).
DATA = ["--device", "cpu", "--deterministic", "--sync-norm", "--norm", "sn",
        "--set", "data.augment=false",
        "--set", "data.embedded_train=240", "--set", "data.embedded_test=41",
        "--set", "data.valid_size=40", "--set", "child.layers=1", "--set", "child.filters=4",
        "--set", "train.lr_max=0.002", "--set", "train.lr_min=0.001", "--set", "child.dropout=0"]
# 32 valid images in batches of 31 and 1: shared 16 + 15, and whole on both ranks (counted once)
SEARCH = [*DATA, "--epochs", "2", "--set", "data.valid_limit=32",
          "--set", "train.eval_batch_size=31", "--set", "child.num_nodes=2",
          "--set", "controller.train_steps=2",
          "--set", "controller.num_aggregate=3", "--set", "train.steps_per_epoch=3",
          "--set", "search.derive_samples=2", "--set", "search.derive_final=2",
          "--set", "search.reward_batch_size=16", "--set", "search.importance_every=1"]
ARCH = "0,0,1,1, 2,2,1,4, 0,3,1,0, 2,1,0,2"  # 2 nodes per cell
RETRAIN = [*DATA, "--epochs", "2", "--arch", ARCH, "--set", "data.limit=40",
           "--set", "train.steps_per_epoch=5",  # the 40 + 40 images once
           "--set", "data.cutout=0", "--set", "retrain.drop_path_keep=1.0"]
# (run, entry point, extra flags): each a separate torchrun job on both ranks
RUNS = [("search", "search", []), ("half", "search", ["--epochs", "1"]),
        ("half", "search", ["--resume"]), ("random", "search", ["--controller", "random"]),
        ("tpe", "search", ["--controller", "tpe", "--epochs", "1"]), ("train", "train", [])]

pytestmark = [  # 2 spawned ranks x 6 runs + 2 single-process runs: ~60 s on 2 busy cores
    pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*training with batch size 1")]


class _Recorded(ChildNet):
    """A ChildNet that records the architecture of each forward pass (with grad or not)."""

    last: _Recorded | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.archs: list[tuple[bool, list[int]]] = []
        self.initial = {k: v.clone() for k, v in self.state_dict().items()
                        if isinstance(v, torch.Tensor)}
        _Recorded.last = self

    def forward(self, x, arch=None):
        if arch is not None:
            self.archs.append((torch.is_grad_enabled(), arch.to_flat()))
        return super().forward(x, arch)


def _record() -> None:
    nas.search_loop.ChildNet = nas.train_loop.ChildNet = _Recorded


def _argv(kind: str, out: Path, batch: int, extra: list[str]) -> list[str]:
    base = SEARCH if kind == "search" else RETRAIN
    return [*base, "--set", f"train.batch_size={batch}", "--out", str(out), *extra]


def _main(kind: str, argv: list[str]) -> None:
    (search_cli if kind == "search" else train_cli).main(argv)


def _dump(path: Path) -> None:
    net = _Recorded.last
    torch.save({"state": net.state_dict(), "archs": net.archs, "initial": net.initial}, path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, ports: list[int], tmp: str) -> None:
    torch.set_num_threads(1)
    _record()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1")
    for port, (name, kind, extra) in zip(ports, RUNS):
        os.environ["MASTER_PORT"] = str(port)
        _main(kind, _argv(kind, Path(tmp) / name, BATCH, extra))
        _dump(Path(tmp) / f"{name}-{rank}.pt")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("nas-ddp")
    ports = [_free_port() for _ in RUNS]
    mp.spawn(_worker, args=(ports, str(tmp)), nprocs=WORLD, join=True)
    return tmp


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The random search and the retraining in one process with the global batch."""
    tmp = tmp_path_factory.mktemp("nas-one")
    saved = nas.search_loop.ChildNet, nas.train_loop.ChildNet, torch.get_num_threads()
    _record()
    torch.set_num_threads(1)  # as each rank
    try:
        for name, kind, extra in (("random", "search", ["--controller", "random"]),
                                  ("train", "train", [])):
            _main(kind, _argv(kind, tmp / name, WORLD * BATCH, extra))
            _dump(tmp / f"{name}.pt")
    finally:
        nas.search_loop.ChildNet, nas.train_loop.ChildNet, threads = saved
        torch.set_num_threads(threads)
    return tmp


def _load(path: Path) -> dict:
    """A dumped network: its tensors (SN's extra state holds strings) and recorded archs."""
    dump = torch.load(path, weights_only=True)
    dump["state"] = _tensors(dump["state"])
    return dump


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _agree(two: dict, one: dict, loss_tag: str, two_dir: Path, one_dir: Path) -> None:
    """2 ranks x B and 1 process x 2B: the same losses, and weights equal up to rounding."""
    # the logged loss of each step (the ranks' mean) is the global batch's
    two_loss, one_loss = (_scalars(d / "tb", loss_tag) for d in (two_dir, one_dir))
    assert len(two_loss) == len(one_loss) >= 6
    # NOTE: float32, and the two runs round SN's (N, C) mixing differently from the first step
    # (the ranks pool BN statistics with SyncSwitchNorm's ATen pieces, one process runs the C++
    # middle), which training carries: up to 1.4e-5 apart after 10 steps. A wrong averaging of
    # gradients or statistics across ranks moves the loss by ~1e-2.
    assert two_loss == pytest.approx(one_loss, rel=1e-4)
    a, b, init = two["state"], one["state"], one["initial"]
    assert a.keys() == b.keys()
    keys = [k for k in a if a[k].is_floating_point()]
    diff = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in keys])
    moved = torch.cat([(b[k].double() - init[k].double()).abs().flatten() for k in keys])
    # training moved many weights (a shared child: those of the sampled ops) beyond 1e-5 ...
    assert (moved > 1e-5).double().mean() > 0.2
    # ... and the two runs agree to 1e-5 on all but a few. NOTE: where ReLU and max pooling
    # meet near-ties, rounding sends a gradient to another element: a few weights end up to
    # ~lr * |grad| apart (up to 7e-4 seen here)
    assert (diff > 1e-5).double().mean() < 0.05 and diff.max() < 1e-2


def _assert_same(a, b) -> None:
    """Nested state equal: tensors bit for bit, everything else (SN's extra state) by ``==``."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        assert a == b


def _scalars(folder: Path, tag: str) -> list[float]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def _trials(folder: Path, study: str = "nas-search") -> list[optuna.trial.FrozenTrial]:
    storage = f"sqlite:///{folder / 'optuna.db'}"
    return optuna.load_study(study_name=study, storage=storage).get_trials()


def test_search_ranks_train_and_evaluate_the_same_architectures(ddp_runs):
    # every forward pass on rank 1 ran rank 0's architecture: 6 training steps, 2 epochs x
    # 2 updates x 3 rewards, 2 epochs x 2 derived candidates x 2 valid batches
    r0, r1 = (_load(ddp_runs / f"search-{r}.pt") for r in range(WORLD))
    assert r0["archs"] == r1["archs"]
    assert [grad for grad, _ in r0["archs"]].count(True) == 6
    assert len(r0["archs"]) == 6 + 12 + 8
    assert len({tuple(a) for _, a in r0["archs"]}) > 10  # sampled, not one architecture
    # and the shared weights (and synchronized running statistics) stay identical
    torch.testing.assert_close(r0["state"], r1["state"], rtol=0, atol=0)


def test_search_rank_zero_alone_writes_trials_and_files(ddp_runs):
    out = ddp_runs / "search"
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "best_arch.json", "cells.png", "checkpoints", "config.toml", "importance.png",
        "optuna.db", "run.log", "search.json", "tb"]
    # 2 derived candidates per epoch, recorded once (not once per rank)
    trials = _trials(out)
    assert len(trials) == 4 and {t.user_attrs["epoch"] for t in trials} == {1, 2}
    best = json.loads((out / "best_arch.json").read_text())
    assert best["valid_acc"] == pytest.approx(max(t.value for t in trials))
    log = (out / "run.log").read_text()
    assert log.count("nas-search run in") == 1 and "distributed: 2 processes" in log
    assert "2 ranks x batch 8 = effective batch 16, 3 steps per epoch; SGD lr 0.002" in log
    # TPE: train_steps x num_aggregate proposals, asked and told on rank 0 only
    assert len(_trials(ddp_runs / "tpe", "nas-search-tpe-proposals")) == 6
    assert len(_trials(ddp_runs / "tpe")) == 2


def test_search_resumed_on_two_ranks_ends_where_the_uninterrupted_run_ends(ddp_runs):
    # 1 epoch, then --resume to 2: the same child, controller, baseline and best architecture
    a = load_checkpoint(ddp_runs / "search" / "checkpoints" / "last.pt")
    b = load_checkpoint(ddp_runs / "half" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6 and a["best"] == b["best"]
    torch.testing.assert_close(_tensors(a["objects"]["child"]), _tensors(b["objects"]["child"]),
                               rtol=0, atol=0)
    _assert_same(a["objects"]["proposer"], b["objects"]["proposer"])
    assert ((ddp_runs / "search" / "best_arch.json").read_text()
            == (ddp_runs / "half" / "best_arch.json").read_text())
    assert len(_trials(ddp_runs / "half")) == 4
    # both ranks continued from the checkpoint (else DDP would not bring rank 1 back in line)
    torch.testing.assert_close(_load(ddp_runs / "half-0.pt")["state"],
                               _load(ddp_runs / "half-1.pt")["state"], rtol=0, atol=0)


def test_search_on_two_ranks_equals_one_process_with_the_global_batch(ddp_runs, one_process):
    # random proposals do not depend on rewards: the same architectures in the same order,
    # and 2 ranks x 8 images with synchronized SN train the shared weights as 1 x 16 images
    two, one = _load(ddp_runs / "random-0.pt"), _load(one_process / "random.pt")
    assert two["archs"] == one["archs"]
    _agree(two, one, "child/loss", ddp_runs / "random", one_process / "random")
    acc = [t.value for t in sorted(_trials(ddp_runs / "random"), key=lambda t: t.number)]
    ref = [t.value for t in sorted(_trials(one_process / "random"), key=lambda t: t.number)]
    assert len(acc) == len(ref) == 4
    assert all(v * 32 == pytest.approx(round(v * 32)) for v in acc)  # each image counted once
    assert acc == pytest.approx(ref, abs=1 / 32 + 1e-9)  # at most one near-tie flips


def test_retrain_on_two_ranks_equals_one_process_with_the_global_batch(ddp_runs, one_process):
    two = [_load(ddp_runs / f"train-{r}.pt") for r in range(WORLD)]
    one = _load(one_process / "train.pt")
    torch.testing.assert_close(two[0]["state"], two[1]["state"], rtol=0, atol=0)  # ranks alike
    _agree(two[0], one, "retrain/loss", ddp_runs / "train", one_process / "train")
    result = json.loads((ddp_runs / "train" / "result.json").read_text())
    ref = json.loads((one_process / "train" / "result.json").read_text())
    assert result["params"] == ref["params"] and result["flops"] == ref["flops"]
    assert result["test_acc"] == pytest.approx(ref["test_acc"], abs=1 / 41 + 1e-9)
    log = (ddp_runs / "train" / "run.log").read_text()
    assert "2 ranks x batch 8 = effective batch 16" in log and log.count("nas-train run") == 1


def test_retrain_test_accuracy_counts_every_test_image_once(ddp_runs):
    # 41 test images split 21 + 20 over the ranks: the summed counts give the accuracy of
    # rank 0's checkpointed network over the whole split, evaluated here in one process
    checkpoint = load_checkpoint(ddp_runs / "train" / "checkpoints" / "last.pt")
    splits = build_splits(DataConfig(augment=False, embedded_train=240, embedded_test=41,
                                     valid_size=40, limit=40, cutout=0))
    net = ChildNet(splits.num_classes, Architecture.from_flat(
        [int(v) for v in ARCH.split(",")]), layers=1, filters=4, aux=True)
    net.load_state_dict(checkpoint["objects"]["model"])
    net.eval()
    x = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    y = torch.tensor([splits.test[i][1] for i in range(len(splits.test))])
    with torch.no_grad():
        correct = int((net(x).logits.argmax(1) == y).sum())
    result = json.loads((ddp_runs / "train" / "result.json").read_text())
    assert len(y) == 41 and result["test_acc"] == pytest.approx(correct / 41)
    assert checkpoint["state"]["test_acc"] == result["test_acc"]
