"""A toy experiment on the snexp runtime, the way ``nas.search`` and ``stylize.train`` use it.

A small MLP with dropout learns a fixed random labelling of points; the dataset adds python
and numpy noise to each sample, so resume tests also cover those generators. ``main`` is a
complete, thin entry point: ``python tests/snexp/runtime/runtime_toy.py --help``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from snexp.runtime.config import RuntimeConfig, cli_errors, parse_args
from snexp.runtime.run import Run


@dataclass(frozen=True)
class TrainConfig:
    """Optimization of the toy model."""

    lr: float = 0.1  # SGD learning rate
    epochs: int = 3  # passes over the training points
    batch_size: int = 8  # points per step
    steps: int | None = None  # stop after this many steps (none: run all epochs)


@dataclass(frozen=True)
class ToyConfig:
    """The toy experiment."""

    train: TrainConfig = field(default_factory=TrainConfig)
    act: Literal["relu", "tanh"] = "relu"  # hidden activation
    hidden: int = 16  # hidden width
    tags: tuple[str, ...] = ()  # free-form labels of the run
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


FLAGS = {"--epochs": "train.epochs", "--lr": "train.lr", "--act": "act", "--tag": "tags"}
SAFE_KEYS = ("train.epochs", "train.steps")


class NoisyPoints(Dataset):
    """60 points in 4-D with 3 classes; each access adds python- and numpy-random noise."""

    def __init__(self, n: int = 60) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 4, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.01 * random.random() + 0.01 * float(np.random.standard_normal())
        return self.x[i] + noise, self.y[i]


def build_model(cfg: ToyConfig) -> nn.Module:
    act = nn.ReLU() if cfg.act == "relu" else nn.Tanh()
    return nn.Sequential(nn.Linear(4, cfg.hidden), act, nn.Dropout(0.2), nn.Linear(cfg.hidden, 3))


def train(run: Run, *, on_step: Callable[[Run], None] | None = None) -> nn.Module:
    """The loop: returns the trained model; ``on_step`` runs after every step (tests use it)."""
    cfg: ToyConfig = run.config
    model = build_model(cfg)
    net = run.prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    run.attach(model=model, optimizer=optimizer, scheduler=scheduler)
    data = NoisyPoints()
    loader = run.dataloader(data, batch_size=cfg.train.batch_size, shuffle=True)
    for _ in run.epochs(cfg.train.epochs):
        net.train()
        for x, y in run.batches(loader):
            x, y = run.to_device((x, y))
            with run.autocast():
                loss = nn.functional.cross_entropy(net(x), y)
            run.optimizer_step(loss, optimizer)
            run.step_done(loss, {"train/loss": loss})
            if on_step is not None:
                on_step(run)
            if cfg.train.steps is not None and run.step >= cfg.train.steps:
                return model
        scheduler.step()
        net.eval()
        with torch.no_grad():
            acc = (net(data.x.to(run.device)).argmax(1).cpu() == data.y).float().mean().item()
        run.tracker.scalar("train/acc", acc, run.step)
        run.update_best(acc)
    return model


def main(argv: Sequence[str] | None = None) -> None:
    with cli_errors("toy"):
        cfg = parse_args(ToyConfig, argv, prog="toy", description="toy experiment", flags=FLAGS)
        with Run(cfg, experiment="toy", safe_keys=SAFE_KEYS, prog="toy") as run:
            train(run)


if __name__ == "__main__":
    main()
