"""The runtime under DDP: 2 CPU processes (gloo, file:// rendezvous) spawned from pytest.

A small SN network trained on 2 ranks with --sync-norm must keep identical weights on both
ranks and end where one process trained on the same global batches ends; only rank 0 writes;
a stop asked on one rank stops both, and the resumed run ends where the uninterrupted one does.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

import snexp
from snexp.runtime import distributed, load_checkpoint
from snexp.runtime.config import ConfigError, RuntimeConfig
from snexp.runtime.run import Run, RunInterrupted

EPOCHS, GLOBAL_BATCH, WORLD = 2, 8, 2

slow = pytest.mark.slow  # the module's 2 spawned ranks run 4 trainings: ~20 s on 2 busy cores


@dataclass(frozen=True)
class NetConfig:
    """A tiny SN classifier experiment."""

    epochs: int = EPOCHS
    batch_size: int = GLOBAL_BATCH
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def _data() -> TensorDataset:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 2, 4, 4, generator=g) * 2 + 1  # (N, C, H, W)
    return TensorDataset(x, torch.randint(0, 3, (16,), generator=g))


def _net() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), snexp.SwitchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def _train(run: Run, *, stop_at: int | None = None) -> nn.Module:
    """The loop; on ``stop_at`` the last rank alone receives SIGTERM."""
    model = _net()
    net = run.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    run.attach(model=model, optimizer=optimizer)
    loader = run.dataloader(_data(), batch_size=run.config.batch_size, shuffle=False)
    for _ in run.epochs(run.config.epochs):
        for x, y in run.batches(loader):
            loss = nn.functional.cross_entropy(net(run.to_device(x)), run.to_device(y))
            run.optimizer_step(loss, optimizer)
            if run.step + 1 == stop_at and run.rank == run.world_size - 1:
                run.signals.on_signal(signal.SIGTERM, None)
            run.step_done(loss, {"loss": loss, "rank": float(run.rank)})
    return model


class _Draws(torch.utils.data.Dataset):
    """Item ``i``: one ``torch.rand`` draw in the loading worker (a random crop, say)."""

    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> float:
        return torch.rand(()).item()


def _config(out: Path, **changes) -> NetConfig:
    runtime = RuntimeConfig(out=str(out), device="cpu", deterministic=True, sync_norm=True,
                            **changes)
    return NetConfig(batch_size=GLOBAL_BATCH // WORLD, runtime=runtime)


def _worker(rank: int, init: str, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    tmp_path, report = Path(tmp), {}
    with Run(_config(tmp_path / "full"), experiment="t", console=False) as run:
        report["main"], report["tracker"] = run.is_main, run.tracker.enabled
        model = _train(run)
    torch.save(model.state_dict(), tmp_path / f"full-{rank}.pt")
    try:  # stopped on one rank at step 3 (mid-epoch 2), then resumed
        with Run(_config(tmp_path / "stopped"), experiment="t", console=False) as run:
            _train(run, stop_at=3)
    except RunInterrupted as exc:
        report["stopped"] = (run.step, exc.signum)
    with Run(_config(tmp_path / "stopped", resume=True), experiment="t", console=False) as run:
        model = _train(run)
        report["resumed_from"] = 3
    torch.save(model.state_dict(), tmp_path / f"resumed-{rank}.pt")
    with Run(_config(tmp_path / "workers"), experiment="t", console=False) as run:
        loader = run.dataloader(_Draws(), batch_size=2, num_workers=2)
        report["worker_draws"] = [v for batch in loader for v in batch.tolist()]
    try:  # rank 0 refuses a used directory; rank 1 must not hang
        Run(_config(tmp_path / "full"), experiment="t", console=False)
    except ConfigError as exc:
        report["refused"] = "already exists" in str(exc)
    (tmp_path / f"report-{rank}.json").write_text(json.dumps(report))
    # Tear down only when both ranks are done: a rank leaving while the other still waits in
    # a collective made gloo abort the process (SIGABRT) in about 1 of 6 runs.
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(f"file://{tmp / 'rendezvous'}", str(tmp)), nprocs=WORLD, join=True)
    return tmp


def _tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return _tensors(torch.load(path, weights_only=True))


@slow
def test_ranks_keep_identical_weights(ddp_runs):
    # DDP averages the gradients, so both ranks take the same steps
    torch.testing.assert_close(_weights(ddp_runs / "full-0.pt"), _weights(ddp_runs / "full-1.pt"),
                               rtol=0, atol=0)


@slow
def test_two_ranks_equal_one_process_on_the_global_batch(ddp_runs, tmp_path):
    # 2 ranks x 4 samples with synchronized SN == 1 process x 8 samples, same order
    runtime = RuntimeConfig(out=str(tmp_path / "one"), device="cpu", deterministic=True)
    with Run(NetConfig(runtime=runtime), experiment="t", console=False) as run:
        single = _train(run)
        assert run.step == EPOCHS * 16 // GLOBAL_BATCH
    torch.testing.assert_close(_weights(ddp_runs / "full-0.pt"), _tensors(single.state_dict()),
                               rtol=1e-5, atol=1e-6)


@slow
def test_only_rank_zero_writes(ddp_runs):
    # one config.toml, run.log, TensorBoard folder, checkpoint, stamp and lock, all by rank 0
    reports = [json.loads((ddp_runs / f"report-{r}.json").read_text()) for r in range(WORLD)]
    assert [(r["main"], r["tracker"]) for r in reports] == [(True, True), (False, False)]
    folder = ddp_runs / "full"
    assert sorted(p.name for p in folder.iterdir()) == [".snexp-lock", ".snexp-run", "checkpoints",
                                                        "config.toml", "run.log", "tb"]
    log = (folder / "run.log").read_text()
    assert log.count("t run in") == 1 and "distributed: 2 processes (gloo backend)" in log
    assert "effective batch 8" in log
    checkpoint = load_checkpoint(folder / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 4 and len(checkpoint["rng_ranks"]) == WORLD


@slow
def test_logged_metrics_are_the_mean_over_ranks(ddp_runs):
    # "rank" is 0 on rank 0 and 1 on rank 1: the logged value is their mean
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ddp_runs / "full" / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("rank")] == [0.5] * 4


@slow
def test_stop_on_one_rank_stops_both_and_resume_matches(ddp_runs):
    # SIGTERM on rank 1 at step 3: both ranks stop after step 3; the resumed run ends as the
    # uninterrupted one
    reports = [json.loads((ddp_runs / f"report-{r}.json").read_text()) for r in range(WORLD)]
    assert [r["stopped"] for r in reports] == [[3, signal.SIGTERM]] * WORLD
    torch.testing.assert_close(_weights(ddp_runs / "resumed-0.pt"),
                               _weights(ddp_runs / "full-0.pt"), rtol=0, atol=0)
    torch.testing.assert_close(_weights(ddp_runs / "resumed-1.pt"),
                               _weights(ddp_runs / "full-0.pt"), rtol=0, atol=0)


@slow
def test_ranks_dataloader_workers_draw_different_numbers(ddp_runs):
    # the loaders' generators are seeded alike on both ranks, but rank 1's workers mix in
    # their rank: no random draw (crop, flip...) repeats across the ranks
    reports = [json.loads((ddp_runs / f"report-{r}.json").read_text()) for r in range(WORLD)]
    draws = [r["worker_draws"] for r in reports]
    assert len(draws[0]) == len(draws[1]) == 4 and not set(draws[0]) & set(draws[1])


@slow
def test_refusal_on_rank_zero_reaches_every_rank(ddp_runs):
    # a used --out is refused by rank 0; rank 1 raises the same error instead of hanging
    reports = [json.loads((ddp_runs / f"report-{r}.json").read_text()) for r in range(WORLD)]
    assert [r["refused"] for r in reports] == [True] * WORLD


def test_single_process_helpers_are_no_ops():
    # without a process group: rank 0 of 1, collectives return their input
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (
        0, 1, True)
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_reduce([1.0, 2.0], torch.device("cpu")) == [1.0, 2.0]
    model = nn.Linear(2, 2)
    assert distributed.wrap_model(model, torch.device("cpu")) is model


def test_rank_device_and_incomplete_environment_are_refused(monkeypatch):
    # under torchrun each process takes cuda:LOCAL_RANK; a fixed cuda:N or a missing
    # MASTER_ADDR gets a one-paragraph error instead of a hang
    assert distributed.rank_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="each process uses cuda:LOCAL_RANK"):
        distributed.rank_device("cuda:1")
    with pytest.raises(ConfigError, match="distributed training runs on CUDA or cpu"):
        distributed.rank_device("mps")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR, MASTER_PORT not set"):
        distributed.init_from_env(torch.device("cpu"))
    assert not dist.is_initialized()
