"""How hard is the embedded dataset of ``nas``? A linear classifier vs a small CNN.

The embedded shapes (``nas.data.make_shapes``) should separate architectures: a linear
classifier on pixels must stay below 50% test accuracy, a small CNN must pass 80% after a short
training. Prints both accuracies per epoch and the time taken::

    python benchmarks/nas_embedded.py [--epochs 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from nas.data import DataConfig, make_shapes


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, xt: torch.Tensor, yt: torch.Tensor,
         *, epochs: int, lr: float, name: str) -> float:
    opt = torch.optim.Adam(model.parameters(), lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * -(-len(x) // 128))
    start, acc = time.perf_counter(), 0.0
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(128):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():
            acc = torch.cat([model(b).argmax(1) for b in xt.split(500)]).eq(yt).float().mean()
        print(f"{name:6s} epoch {epoch + 1}: test acc {float(acc):.3f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    return float(acc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="CNN epochs (linear: 2x)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = DataConfig()
    x, y = make_shapes(cfg.embedded_train, cfg.seed, cfg.size)
    xt, yt = make_shapes(cfg.embedded_test, cfg.seed + 1_000_003, cfg.size)
    x, xt = (x.float() / 255 - 0.5) / 0.3, (xt.float() / 255 - 0.5) / 0.3
    linear = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 10))
    lin = _fit(linear, x, y, xt, yt, epochs=2 * args.epochs, lr=1e-3, name="linear")
    cnn = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )
    net = _fit(cnn, x, y, xt, yt, epochs=args.epochs, lr=3e-3, name="cnn")
    print(f"embedded ({len(y)} train, {len(yt)} test images): linear {lin:.3f}, "
          f"small CNN {net:.3f}")


if __name__ == "__main__":
    main()
