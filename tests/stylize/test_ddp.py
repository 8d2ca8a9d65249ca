"""``python -m stylize.train`` under DDP: 2 CPU ranks started the way torchrun starts them.

Each spawned process gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT on 127.0.0.1) and calls the unchanged entry point ``stylize.train.main``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from stylize_helpers import read_events
from torch.utils.data import DataLoader, DistributedSampler

from snexp.runtime.checkpoint import seed_everything
from snexp.runtime.run import Run
from stylize.loss import load_vgg16
from stylize.saved import load_model
from stylize.train import main
from stylize.train_loop import build_network, train

WORLD, BATCH, STEPS = 2, 2, 4  # per-rank batch

pytestmark = pytest.mark.slow  # 2 spawned ranks x 3 runs: ~35 s on 2 busy cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(style: str, vgg: str, out: Path, steps: int) -> list[str]:
    return ["--style", style, "--vgg-weights", vgg, "--image-size", "24", "--style-size", "24",
            "--width", "0.125", "--batch-size", str(BATCH), "--set", "model.blocks=1",
            "--set", "data.synthetic_count=12", "--deterministic", "--device", "cpu",
            "--preview-every", "100", "--set", "log.every=1", "--epochs", "3", "--sync-norm",
            "--out", str(out), "--steps", str(steps)]


def _worker(rank: int, ports: list[int], style: str, vgg: str, tmp: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1")
    runs = [(Path(tmp) / "full", STEPS, []), (Path(tmp) / "half", 2, []),
            (Path(tmp) / "half", STEPS, ["--resume"])]
    for port, (out, steps, extra) in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)
        main(_argv(style, vgg, out, steps) + extra)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, random_vgg_file) -> tuple[Path, str]:
    tmp = tmp_path_factory.mktemp("stylize-ddp")
    style = tmp / "style.png"
    from stylize.data import SyntheticScenes

    SyntheticScenes(1, 48, seed=7).render(0).save(style)
    ports = [_free_port() for _ in range(3)]
    mp.spawn(_worker, args=(ports, str(style), str(random_vgg_file), str(tmp)), nprocs=WORLD,
             join=True)
    return tmp, str(style)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, weights_only=True)["state_dict"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_rank_zero_alone_writes_one_model_and_log(ddp_runs):
    # one model.pt, one run start in run.log, the effective batch and lr logged
    tmp, _ = ddp_runs
    names = sorted(p.name for p in (tmp / "full").iterdir())
    assert names == [".snexp-lock", ".snexp-run", "checkpoints", "config.toml", "model.pt",
                     "run.log", "tb"]
    log = (tmp / "full" / "run.log").read_text()
    assert log.count("stylize run in") == 1
    assert f"batch {BATCH} x {WORLD} ranks = {BATCH * WORLD}" in log and "lr 0.001" in log
    net, meta = load_model(tmp / "full" / "model.pt")
    assert meta["styles"] == ["style"] and meta["config"]["runtime.sync_norm"] is True


def test_two_ranks_equal_one_process_on_the_global_batch(ddp_runs, tmp_path, random_vgg_file):
    # 2 ranks x 2 images with synchronized SN == 1 process x 4 images in the same order
    tmp, style = ddp_runs
    from snexp.runtime.config import parse_args
    from stylize.config import PRESETS, StylizeConfig
    from stylize.train import FLAGS

    argv = _argv(style, str(random_vgg_file), tmp_path / "one", STEPS)
    argv[argv.index("--batch-size") + 1] = str(BATCH * WORLD)
    cfg = parse_args(StylizeConfig, argv, prog="t", flags=FLAGS, presets=PRESETS,
                     default_config="quick")
    loss_net = load_vgg16(random_vgg_file)  # before Run seeds, as main() does
    with Run(cfg, experiment="stylize", console=False) as run:
        def global_order(dataset, *, batch_size, shuffle, drop_last, **kwargs):
            # the order DistributedSampler deals out to the ranks, as one stream
            sampler = DistributedSampler(dataset, 1, 0, shuffle=shuffle,
                                         seed=run.runtime.seed, drop_last=drop_last)
            run.data.samplers.append(sampler)
            return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                              drop_last=drop_last)

        run.dataloader = global_order
        train(run, loss_net)
    ddp, one = _weights(tmp / "full" / "model.pt"), _weights(tmp_path / "one" / "model.pt")
    # the first step's loss (before any update) is the global batch's, up to rounding
    (ddp_loss, one_loss) = (read_events(d / "tb")[0]["loss/total"] for d in (tmp / "full",
                                                                            tmp_path / "one"))
    assert len(ddp_loss) == len(one_loss) == STEPS
    assert ddp_loss[0] == pytest.approx(one_loss[0], rel=1e-5)
    assert ddp_loss == pytest.approx(one_loss, rel=1e-3)
    # NOTE: Adam turns gradients that are zero up to rounding (conv biases before a norm) into
    # steps of up to lr, so the weights agree to a fraction of lr, while training moved them by
    # several lr (the runtime's exact SGD comparison is tests/snexp/runtime/test_distributed.py)
    seed_everything(0)
    init = build_network(cfg.model, 1).state_dict()
    moved = torch.cat([(one[k] - init[k]).abs().flatten() for k in one if k.endswith("weight")])
    assert moved.mean() > 2e-3
    torch.testing.assert_close(ddp, one, rtol=0, atol=5e-4)


def test_resume_on_two_ranks_ends_where_the_uninterrupted_run_ends(ddp_runs):
    # stopped at step 2 and resumed on 2 ranks: the same weights as 4 steps never stopped
    tmp, _ = ddp_runs
    torch.testing.assert_close(_weights(tmp / "half" / "model.pt"),
                               _weights(tmp / "full" / "model.pt"), rtol=0, atol=0)
    assert (tmp / "half" / "run.log").read_text().count("resuming at step 2") == 1
