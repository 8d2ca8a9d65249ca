"""Probe: does the quick search's weight-sharing child learn with a given SN start?

Trains the ``quick`` preset's shared child (every norm from the ``--norm`` spec) for
``--steps`` steps, one uniformly random architecture per step, with the preset's optimizer (the
importance logits in their own group: ``--importance-lr-mult``, no L2 term; ``0`` freezes them)
and prints, every 50 steps, the mean training loss of those steps and the importance averaged
over the norms every path uses (stem, reductions, calibration, cell outputs) and over the op
norms. No controller, no derive step: this isolates the child. ``--signal-every N`` also
prints, every N steps, how much LN's variance exceeds BN's at the norms' input and the share
of the per-channel variance that lies between images. One thread is enough::

    OMP_NUM_THREADS=1 python benchmarks/nas_sn_probe.py --norm 'sn(candidates=ln+bn)' \\
        --steps 300 --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch import nn

import snexp
from nas.child import ChildNet
from nas.config import PRESETS, SearchConfig
from nas.data import build_splits
from nas.optim import param_groups, sgd_with_restarts
from nas.proposers import RandomProposer
from snexp.runtime.config import ConfigError, resolve_config


def _shares(child: nn.Module) -> dict[str, dict[str, float]]:
    """Mean importance (mean weights) of the shared norms and of the op norms."""
    out = {}
    layers = snexp.importance(child)
    for part, keep in (("shared", lambda n: ".ops." not in n), ("ops", lambda n: ".ops." in n)):
        sel = [v for n, v in layers.items() if keep(n)]
        out[part] = {c: statistics.mean(v.mean[i] for v in sel)
                     for i, c in enumerate(sel[0].candidates)}
    return out


def _signal(child: nn.Module, x: torch.Tensor, arch) -> dict[str, float]:
    """At the input of every norm of one forward pass (no update), averaged over the norms:
    ``ln/bn var``, LN's variance (over C, H, W per sample) over BN's (over N, H, W per
    channel), which exceeds 1 by the spread of the channel means; ``between``, the share of
    each channel's variance that lies between images (per-image means) instead of within."""
    ratios, between = [], []

    def hook(module, args, output) -> None:
        z = args[0].detach().double()  # (N, C, H, W)
        var_ln = z.var((1, 2, 3), unbiased=False).mean()
        var_bn = z.var((0, 2, 3), unbiased=False).mean()
        ratios.append(float(var_ln / var_bn))
        per_image = z.mean((2, 3))  # (N, C)
        between.append(float((per_image.var(0, unbiased=False) / z.var((0, 2, 3),
                                                                       unbiased=False)).mean()))

    norms = [m for m in child.modules() if isinstance(m, (snexp.SwitchNorm2d, nn.BatchNorm2d))]
    handles = [m.register_forward_hook(hook) for m in norms]
    try:
        with torch.no_grad():
            saved = [(m, m.momentum) for m in norms]
            for m in norms:
                m.momentum = 0.0  # leave the running statistics as they are
            child(x, arch)
            for m, momentum in saved:
                m.momentum = momentum
    finally:
        for h in handles:
            h.remove()
    return {"ln/bn var": statistics.mean(ratios), "between": statistics.mean(between)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", default=None,
                        help="the child's norm spec, e.g. 'sn(candidates=ln+bn)' (uniform "
                             "start), 'sn(prior=bn:6)', or bn for the reference (default: the "
                             "quick preset's)")
    parser.add_argument("--importance-lr-mult", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal-every", type=int, default=0,
                        help="print the signal statistics at the norms' input every N steps")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    sets = [] if args.norm is None else [f"child.norm={args.norm}"]
    try:  # the preset's child with this norm, checked as nas.search checks it
        cfg = resolve_config(SearchConfig, [PRESETS / "quick.toml"], sets)
    except ConfigError as exc:
        parser.error(str(exc))
    norm = cfg.child.norm
    splits = build_splits(cfg.data)
    child = ChildNet(splits.num_classes, norm_layer=norm.layer(), layers=cfg.child.layers,
                     filters=cfg.child.filters, num_nodes=cfg.child.num_nodes,
                     dropout=cfg.child.dropout, in_channels=splits.in_channels,
                     image_size=splits.valid[0][0].shape[-1])
    opt = dataclasses.replace(cfg.train, importance_lr_mult=args.importance_lr_mult)
    optimizer, _ = sgd_with_restarts(param_groups(child, opt), opt)
    proposer = RandomProposer(cfg.child.num_nodes, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        splits.train, batch_size=opt.batch_size, drop_last=True, generator=torch.Generator()
        .manual_seed(args.seed), sampler=torch.utils.data.RandomSampler(
            splits.train, num_samples=args.steps * opt.batch_size,
            generator=torch.Generator().manual_seed(args.seed)))
    losses, start = [], time.perf_counter()
    print(f"{norm} importance_lr_mult={args.importance_lr_mult} seed={args.seed}")
    child.train()
    for step, (x, y) in enumerate(loader, 1):
        if args.signal_every and (step - 1) % args.signal_every == 0:
            stats = _signal(child, x, RandomProposer(cfg.child.num_nodes, seed=1).ask(1)[0])
            print(f"step {step - 1:4d} signal at the norms' input: " + ", ".join(
                f"{k} {v:.3f}" for k, v in stats.items()), flush=True)
        loss = nn.functional.cross_entropy(child(x, proposer.train_sample(1)[0]).logits, y)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(child.parameters(), opt.grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            line = f"step {step:4d} loss {statistics.mean(losses[-50:]):.3f}"
            if norm.kind == "sn":
                for part, share in _shares(child).items():
                    line += f" | {part} " + " ".join(f"{c} {w:.3f}" for c, w in share.items())
            print(f"{line} | {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
