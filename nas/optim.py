"""The optimizer, schedule and epoch loader that the search and the retraining share.

ENAS (Pham et al. 2018, official CIFAR scripts): Nesterov SGD with weight decay, cosine
annealing with warm restarts stepped per epoch; an epoch is at most ``steps_per_epoch`` full
batches of a seeded shuffle (the run's generator, so resume is exact).
"""

from __future__ import annotations

import logging

import torch

from snexp.runtime import distributed
from snexp.runtime.run import Run

__all__ = ["epoch_loader", "sgd_with_restarts"]

logger = logging.getLogger(__name__)
_Restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts


def sgd_with_restarts(parameters, opt) -> tuple[torch.optim.SGD, _Restarts]:
    """ENAS's optimizer and schedule for ``opt`` (an ``OptimConfig``).

    Nesterov SGD with weight decay; cosine annealing with warm restarts from ``lr_max`` to
    ``lr_min``, stepped per epoch.
    """
    optimizer = torch.optim.SGD(parameters, lr=opt.lr_max, momentum=opt.momentum,
                                nesterov=True, weight_decay=opt.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=opt.t0, T_mult=opt.t_mul, eta_min=opt.lr_min)
    return optimizer, scheduler


def epoch_loader(run: Run, dataset, opt, workers: int) -> torch.utils.data.DataLoader:
    """Shuffled batches of one epoch, at most ``opt.steps_per_epoch`` of them (full ones).

    Under torchrun ``opt.batch_size`` is per rank: the ranks deal out one shuffled order
    (:class:`snexp.runtime.distributed.ShardedSampler`), so K ranks take the steps of one process
    with batch ``K * batch_size``. The learning rate is not scaled with K.
    """
    world, batch = run.world_size, opt.batch_size
    n = len(dataset)
    if opt.steps_per_epoch is not None:
        n = min(n, opt.steps_per_epoch * batch * world)
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=n, generator=run.generator)
    if world > 1:
        sampler = distributed.ShardedSampler(sampler, run.rank, world)
    per_rank = len(sampler)
    size = f"batch {batch}" if world == 1 else (
        f"{world} ranks x batch {batch} = effective batch {batch * world}")
    logger.info("data: %s, %d steps per epoch; SGD lr %g -> %g (cosine, warm restarts)", size,
                max(1, per_rank // batch), opt.lr_max, opt.lr_min)
    return run.dataloader(dataset, batch_size=batch, shuffle=False, sampler=sampler,
                          drop_last=per_rank > batch, num_workers=workers)
