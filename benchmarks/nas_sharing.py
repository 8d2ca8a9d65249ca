"""Which norms let ENAS's weight-sharing child learn? A probe on a small image folder.

Trains the search network of ``nas`` (the ``quick`` preset's size: 3 cells, 16 filters, 2 nodes)
for ``--steps`` SGD steps (Nesterov, momentum 0.9, gradient norm clipped to 5, no L2) with a
new uniformly random architecture at every step, as a search does, and the same network with
one architecture throughout (``fixed``), for each norm; prints the running loss and the valid
accuracy of random architectures (shared weights, batch statistics) every 100 steps::

    python benchmarks/nas_sharing.py --data-root data/shapes [--norms bn,sn,...] [--steps 400]
        [--lr 0.02] [--seeds 1] [--modes shared,fixed]

``--data-root`` is an image folder as ``nas.search --dataset imagefolder`` reads it (write one
with ``nas.data.write_shapes_folder``). Norms are ``snexp.norm_layer`` specs, e.g.
``"sn(candidates=ln+bn)"``; ``--last-norm KIND`` replaces the norm at the end of the last cell.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import snexp
from nas.child import ChildNet
from nas.data import DataConfig, build_splits
from nas.proposers import RandomProposer


def build_net(num_classes: int, in_channels: int, norm: str,
              last_norm: str | None = None) -> ChildNet:
    """The quick preset's search network; ``last_norm`` replaces the last cell's final norm."""
    net = ChildNet(num_classes, norm=norm, layers=1, filters=16, num_nodes=2, dropout=0.1,
                   in_channels=in_channels)
    if last_norm:
        net.cells[-1].norm = snexp.norm_layer(last_norm)(net.cells[-1].c)
    return net


def probe(splits, norm: str, *, mode: str, steps: int, lr: float, seed: int, batch: int,
          last_norm: str | None = None, every: int = 100) -> list[tuple[int, float, float]]:
    """``(step, running loss, valid acc)`` every ``every`` steps of one training."""
    torch.manual_seed(seed)
    proposer = RandomProposer(2, seed)
    fixed = proposer.ask(1)[0]
    net = build_net(splits.num_classes, splits.in_channels, norm, last_norm)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, nesterov=True)
    sampler = torch.utils.data.RandomSampler(splits.train, num_samples=steps * batch,
                                             generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(splits.train, batch_size=batch, sampler=sampler,
                                         drop_last=True)
    images, labels = zip(*(splits.valid[i] for i in range(len(splits.valid))))
    vx, vy = torch.stack(images), torch.tensor(labels)
    rows, running = [], 0.0
    net.train()  # batch statistics, as in the search
    for step, (x, y) in enumerate(loader, 1):
        arch = fixed if mode == "fixed" else proposer.ask(1)[0]
        loss = nn.functional.cross_entropy(net(x, arch).logits, y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        running = 0.98 * running + 0.02 * loss.item()
        if step % every == 0:
            with torch.no_grad():
                archs = [fixed] if mode == "fixed" else proposer.ask(3)
                acc = sum(float((net(vx, a).logits.argmax(1) == vy).float().mean())
                          for a in archs) / len(archs)
            rows.append((step, running / (1 - 0.98 ** step), acc))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", required=True, help="image folder (imagefolder layout)")
    parser.add_argument("--norms", default="bn,sn", help="comma list of norm specs")
    parser.add_argument("--modes", default="shared,fixed", help="shared and/or fixed")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seeds", default="1", help="comma list of seeds")
    parser.add_argument("--last-norm", default=None, help="norm at the end of the last cell")
    parser.add_argument("--every", type=int, default=100, help="report every N steps")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = build_splits(DataConfig(dataset="imagefolder", root=args.data_root,
                                     valid_size=0.1))
    # a comma inside "sn(...)" is not a separator
    norms = _join_parens([n for n in args.norms.replace(" ", "").split(",") if n])
    for seed in (int(s) for s in args.seeds.split(",")):
        for mode in args.modes.split(","):
            for norm in norms:
                start = time.perf_counter()
                rows = probe(splits, norm, mode=mode, steps=args.steps, lr=args.lr, seed=seed,
                             batch=args.batch_size, last_norm=args.last_norm, every=args.every)
                trace = "  ".join(f"{s}: {loss:.3f}/{acc:.3f}" for s, loss, acc in rows)
                print(f"{mode:6s} {norm:22s} seed {seed} lr {args.lr:g} (step: loss/valid acc) "
                      f"{trace}  [{time.perf_counter() - start:.0f} s]", flush=True)


def _join_parens(parts: list[str]) -> list[str]:
    out: list[str] = []
    for part in parts:
        if out and out[-1].count("(") > out[-1].count(")"):
            out[-1] += "," + part
        else:
            out.append(part)
    return out


if __name__ == "__main__":
    main()
