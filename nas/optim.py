"""The optimizer, schedule and epoch loader that the search and the retraining share.

ENAS (Pham et al. 2018, official CIFAR scripts and ``src/utils.py``): Nesterov SGD, momentum
0.9, with ENAS's L2 term (``l2_reg * sum(w^2)`` over every weight added to the loss, so every
weight, used in this step or not, gets ``2 * l2_reg * w`` added to its gradient), cosine
annealing with warm restarts stepped per epoch. An epoch is ``steps_per_epoch`` full batches of
seeded shuffles (the run's generator, so resume is exact): the data cycles, so an epoch is as
long on 2,000 images as on 45,000 (ENAS's CIFAR epoch is ``ceil(45000 / 160) = 282`` steps).
"""

from __future__ import annotations

import logging

import torch

from snexp import importance_param_groups
from snexp.runtime import distributed
from snexp.runtime.run import Run

__all__ = ["add_l2_gradient", "epoch_loader", "param_groups", "sgd_with_restarts"]

logger = logging.getLogger(__name__)
_Restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts


def add_l2_gradient(optimizer: torch.optim.Optimizer, l2_reg: float) -> None:
    """Make every ``optimizer.step()`` first add ``2 * l2_reg * w`` to each weight's gradient.

    The gradient of ENAS's ``l2_reg * sum(w^2)`` loss term, for every parameter of the
    optimizer, including those this step did not use (their gradient is just the L2 term, as
    in the official code, where the L2 sum runs over all child variables). It is added at the
    step, after a gradient clipping of the loss gradient (see ``OptimConfig.grad_clip``). A
    parameter group with an ``l2_reg`` key uses that instead (:func:`param_groups`).
    """
    if l2_reg <= 0:
        return

    def hook(opt: torch.optim.Optimizer, args, kwargs) -> None:
        with torch.no_grad():
            for group in opt.param_groups:
                reg = group.get("l2_reg", l2_reg)  # a group may carry its own (0: none)
                if reg <= 0:
                    continue
                for p in group["params"]:
                    if p.grad is None:
                        p.grad = (2.0 * reg) * p.detach().clone()
                    else:
                        p.grad.add_(p.detach(), alpha=2.0 * reg)

    optimizer.register_step_pre_hook(hook)


def param_groups(model: torch.nn.Module, opt) -> list[dict]:
    """``model``'s parameters for :func:`sgd_with_restarts`, the SN importance logits in a group
    of their own with lr ``lr_max * opt.importance_lr_mult`` and, unless
    ``opt.importance_l2``, no L2 term (the schedule scales both groups alike)."""
    groups = importance_param_groups(model, lr=opt.lr_max, lr_scale=opt.importance_lr_mult)
    if len(groups) > 1 and not opt.importance_l2:
        groups[1]["l2_reg"] = 0.0
    return groups


def sgd_with_restarts(parameters, opt) -> tuple[torch.optim.SGD, _Restarts]:
    """ENAS's optimizer and schedule for ``opt`` (an ``OptimConfig``).

    Nesterov SGD with ENAS's L2 term (:func:`add_l2_gradient`); cosine annealing with warm
    restarts from ``lr_max`` to ``lr_min``, stepped per epoch.
    """
    optimizer = torch.optim.SGD(parameters, lr=opt.lr_max, momentum=opt.momentum, nesterov=True)
    add_l2_gradient(optimizer, opt.l2_reg)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=opt.t0, T_mult=opt.t_mul, eta_min=opt.lr_min)
    return optimizer, scheduler


def epoch_loader(run: Run, dataset, opt, workers: int) -> torch.utils.data.DataLoader:
    """``opt.steps_per_epoch`` shuffled full batches (one pass over the split if ``None``).

    The data cycles: when an epoch needs more images than the split holds, the next shuffle
    of the split follows.

    Under torchrun ``opt.batch_size`` is per rank: the ranks deal out one shuffled order
    (:class:`snexp.runtime.distributed.ShardedSampler`), so K ranks take the steps of one process
    with batch ``K * batch_size``. The learning rate is not scaled with K.
    """
    world, batch = run.world_size, opt.batch_size
    n = len(dataset)
    if opt.steps_per_epoch is not None:  # RandomSampler chains fresh permutations
        n = opt.steps_per_epoch * batch * world
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
