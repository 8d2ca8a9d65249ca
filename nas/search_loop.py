"""The ENAS search loop (Pham et al. 2018, Sec. 2.2 and 3.2): shared weights, controller, derive.

Per epoch:

1. train the shared child on the train split, one architecture from the proposer per minibatch
   (SGD, Nesterov momentum 0.9, ENAS's L2 term 1e-4, gradient norm clipped to 5, lr cosine with
   warm restarts 0.05 -> 5e-4, T0 = 10, Tmul = 2, stepped per epoch; the auxiliary head's loss
   weighs 0.4 and dropout 0.1 precedes the classifier, as in ENAS's search script);
2. train the proposer on the valid split: ``train_steps`` updates of ``num_aggregate``
   architectures, each rewarded with its accuracy on one valid minibatch;
3. derive: evaluate ``derive_samples`` proposals (``derive_final`` after the last epoch) on the
   whole valid split; each becomes a trial of the Optuna study, tagged with the run directory
   and the epoch (a run resumed after a kill between these trials and the epoch's checkpoint
   repeats the epoch exactly and does not record them twice); the best so far is written to
   ``<out>/best_arch.json`` and drawn into ``<out>/cells.png``.

At the end ``<out>/search.json`` holds the mean reward, the derived valid accuracy and the
mean child loss of every epoch and the best derived accuracy (what ``benchmarks/nas_study.py``
and ``benchmarks/nas_norms.py`` tabulate), and the norms as spec texts (``"norm"``, e.g.
``"sn(prior=bn:4)"``; ``"controller_norm"``); with SN in the cells, the SN importance of the best
architecture's ops in the shared child (:mod:`nas.op_importance`) is added to ``search.json``
and ``best_arch.json`` and drawn into ``<out>/importance.png``.

All norms of the child run in training mode throughout (the BN branch uses batch statistics,
also while rewards are measured). Their running averages are updated but never read: the
update is a few (C,)-sized ops, cheaper than a second code path that skips it.
Everything lives in the :class:`snexp.runtime.run.Run`; the loop hands numbers to its tracker.

Under ``torchrun`` the shared child is data-parallel (DDP with ``find_unused_parameters``: a
step runs one architecture's ops); ``--batch-size`` is per rank and the ranks read shares of
one shuffled order. The proposer lives on rank 0 (:mod:`nas.broadcast_proposer`) and every
rank trains and evaluates the architectures it proposes; rewards and derive accuracies are
counted over the ranks' shares of each batch. Rank 0 alone writes the Optuna trials,
``best_arch.json`` and ``cells.png``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from torch import nn

from nas.broadcast_proposer import BroadcastProposer
from nas.child import ChildNet
from nas.config import SearchConfig
from nas.data import build_splits
from nas.op_importance import format_op_importance, op_importance
from nas.optim import epoch_loader, param_groups, sgd_with_restarts
from nas.proposers import Proposer, arch_distributions, arch_params, build_proposer
from nas.space import Architecture
from snexp.runtime.checkpoint import write_text_atomic
from snexp.runtime.metrics import top1_accuracy
from snexp.runtime.run import Run
from snexp.runtime.study import WorkerSeededSampler, open_study
from snexp.runtime.track import progress

__all__ = ["SearchResult", "evaluate", "run_search"]

logger = logging.getLogger(__name__)
BEST_FILE, CELLS_FILE, SUMMARY_FILE = "best_arch.json", "cells.png", "search.json"
IMPORTANCE_FILE = "importance.png"


@dataclass(frozen=True)
class SearchResult:
    """The best derived architecture and its accuracy on the valid split (shared weights)."""

    arch: Architecture
    valid_acc: float


def evaluate(net: nn.Module, arch: Architecture, batches: list[tuple[torch.Tensor, ...]]) -> float:
    """Top-1 accuracy of ``arch`` with the shared weights over ``batches`` (no gradients).

    Under torchrun it is collective: all ranks call it with the same ``arch`` and ``batches``.
    Each rank runs every ``world_size``-th sample of every batch (a batch smaller than the
    world runs whole on every rank and counts once) and the counts are summed, so with
    ``--sync-norm`` the BN branch sees each whole batch, as in one process.
    """
    return top1_accuracy(lambda x: net(x, arch).logits, batches, ranks="split")


def _valid_tensors(run: Run, dataset: torch.utils.data.Dataset, batch_size: int) -> list:
    # its own generator: iterating must not draw from the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                         generator=torch.Generator())
    return [run.to_device(batch) for batch in loader]


def _train_child(run: Run, net: nn.Module, proposer: Proposer, optimizer, loader, cfg,
                 epoch: int, reward: float | None) -> dict[str, float]:
    bar = progress(run.batches(loader), total=len(loader),
                   desc=f"epoch {epoch + 1}/{cfg.train.epochs}", rank=run.rank)
    lr = optimizer.param_groups[0]["lr"]
    loss_sum = acc_sum = 0.0
    count = 0
    for x, y in bar:
        x, y = run.to_device((x, y))
        arch = proposer.train_sample(1)[0]
        with run.autocast():
            out = net(x, arch)
            logits = out.logits
            loss = nn.functional.cross_entropy(logits, y)
            if out.aux is not None:
                loss = loss + cfg.search.aux_weight * nn.functional.cross_entropy(out.aux, y)
        run.optimizer_step(loss, optimizer, clip_grad_norm=cfg.train.grad_clip or None)
        acc = float((logits.argmax(1) == y).float().mean())
        run.step_done(loss, {"child/loss": loss, "child/acc": acc, "child/lr": lr})
        value = loss.item()
        loss_sum, acc_sum, count = loss_sum + value, acc_sum + acc, count + 1
        post = {"loss": f"{value:.3f}", "acc": f"{acc:.3f}"}
        if reward is not None:
            post["reward"] = f"{reward:.3f}"
        bar.set_postfix(post)
    return {"loss": loss_sum / max(1, count), "acc": acc_sum / max(1, count)}


def _train_proposer(run: Run, net: nn.Module, proposer: Proposer, valid: list, cfg,
                    epoch: int) -> dict[str, float]:
    """``train_steps`` proposer updates; rewards on random valid minibatches (seeded by epoch)."""
    x_all, y_all = torch.cat([b[0] for b in valid]), torch.cat([b[1] for b in valid])
    g = torch.Generator().manual_seed(cfg.runtime.seed * 100_003 + epoch)
    size = min(cfg.search.reward_batch_size, len(y_all))
    summary: dict[str, float] = {}
    for _ in range(cfg.controller.train_steps):
        archs = proposer.ask(cfg.controller.num_aggregate)
        rewards = []
        for arch in archs:
            idx = torch.randperm(len(y_all), generator=g)[:size].to(y_all.device)
            rewards.append(evaluate(net, arch, [(x_all[idx], y_all[idx])]))
        metrics = proposer.tell(archs, rewards)
        step = run.state["controller_step"] = run.state.get("controller_step", 0) + 1
        run.tracker.scalars(metrics, step, prefix="controller/")
        for key, value in metrics.items():
            summary[key] = summary.get(key, 0.0) + value / cfg.controller.train_steps
    return summary


def _record_trials(study: optuna.Study | None, results: list[tuple[Architecture, float]],
                   epoch: int, proposer: str, run_dir: str) -> int:
    """Add one trial per result, unless this run already recorded this epoch's; the count added.

    A kill after the trials but before the epoch's checkpoint makes the resumed run repeat the
    epoch (exactly: same proposals, same accuracies); its trials are then already there.
    """
    if not results or study is None:  # no study on ranks > 0
        return 0
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if attrs.get("run") == run_dir and attrs.get("epoch") == epoch:
            logger.info("epoch %d: its %d derive trials are already in the study (resumed "
                        "after they were recorded); not adding them again", epoch, len(results))
            return 0
    distributions = arch_distributions(results[0][0].num_nodes, results[0][0].primitives)
    for arch, acc in results:
        study.add_trial(optuna.trial.create_trial(
            params=arch_params(arch), distributions=distributions, value=acc,
            user_attrs={"arch": str(arch), "epoch": epoch, "proposer": proposer,
                        "run": run_dir}))
    return len(results)


def _derive(run: Run, net: nn.Module, proposer: Proposer, valid: list,
            study: optuna.Study | None, n: int, epoch: int) -> tuple[Architecture, float]:
    archs = proposer.derive(n)
    results = [(arch, evaluate(net, arch, valid)) for arch in archs]
    _record_trials(study, results, epoch + 1, proposer.name, str(run.dir.resolve()))
    best_arch, best_acc = max(results, key=lambda r: r[1])
    run.tracker.scalar("search/derive_acc", best_acc, run.step)
    run.tracker.text("search/sampled_arch", f"`{archs[0]}`", run.step)
    better = run.update_best(best_acc, mode="max")  # collective: all ranks call it
    if better:
        run.state["best_arch"] = best_arch.to_flat()
        logger.info("new best architecture (valid acc %.4f): %s", best_acc, best_arch)
    if better and run.is_main:
        write_text_atomic(run.dir / BEST_FILE, best_arch.to_json(valid_acc=best_acc,
                                                                  epoch=epoch + 1))
        from nas.draw import save_cells  # matplotlib only when there is something to draw

        save_cells(best_arch, run.dir / CELLS_FILE, title=f"valid acc {best_acc:.3f}, epoch "
                   f"{epoch + 1}")
        run.tracker.text("search/best_arch", f"`{best_arch}` (valid acc {best_acc:.4f})", run.step)
        _log_png(run, run.dir / CELLS_FILE)
    run.tracker.scalar("search/best_valid_acc", run.best, run.step)
    return best_arch, best_acc


def _log_png(run: Run, path: Path, tag: str = "search/cells") -> None:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    with Image.open(path) as png:
        image = pil_to_tensor(png.convert("RGB")).float() / 255  # (3, H, W)
    run.tracker.image(tag, image, run.step)


def _report_importance(run: Run, child: nn.Module, best: Architecture) -> dict | None:
    """The shared child's SN importance on the best architecture's ops, at the end: into
    ``best_arch.json``, drawn into ``importance.png`` beside ``cells.png``, and logged."""
    report = op_importance(child, best)
    if report is None:  # no SN in the cells
        return None
    logger.info("SN importance of the best architecture's ops (shared weights, end of "
                "search):\n%s", format_op_importance(report))
    found = json.loads((run.dir / BEST_FILE).read_text())
    write_text_atomic(run.dir / BEST_FILE, best.to_json(**{
        k: v for k, v in found.items() if k in ("valid_acc", "epoch")}, importance=report))
    from nas.draw import save_importance  # matplotlib only when there is something to draw

    save_importance(report, run.dir / IMPORTANCE_FILE,
                    title="SN importance of the derived ops (shared weights, end of search)")
    _log_png(run, run.dir / IMPORTANCE_FILE, "search/importance")
    return report


def _log_importance(run: Run, child: nn.Module) -> None:
    from snexp import importance

    imp = importance(child)
    if not imp:
        return
    run.tracker.importance(child, run.step, figure=False)
    first = next(iter(imp.values()))
    for i, cand in enumerate(first.candidates):
        for kind in ("mean", "var"):
            avg = sum(getattr(v, kind)[i] for v in imp.values()) / len(imp)
            run.tracker.scalar(f"sn_importance_avg/{kind}_{cand}", avg, run.step)


def run_search(run: Run) -> SearchResult:
    """Run the search configured by ``run.config`` (a :class:`SearchConfig`).

    Returns:
        The best derived architecture and its valid accuracy (also in ``<out>/best_arch.json``).
    """
    cfg: SearchConfig = run.config
    splits = build_splits(cfg.data)
    child = ChildNet(
        splits.num_classes, norm_layer=cfg.child.norm.layer(), layers=cfg.child.layers,
        filters=cfg.child.filters, num_nodes=cfg.child.num_nodes, dropout=cfg.child.dropout,
        aux=cfg.search.aux_weight > 0, in_channels=splits.in_channels,
        image_size=splits.valid[0][0].shape[-1],
    )
    net = run.prepare(child, find_unused_parameters=True)  # a step uses one arch's ops
    opt = cfg.train
    optimizer, scheduler = sgd_with_restarts(param_groups(child, opt), opt)
    attrs = {"controller": cfg.controller.kind, "norm": str(cfg.child.norm),
             "dataset": cfg.data.dataset, "seed": cfg.runtime.seed}
    study = tpe_study = None  # rank 0 alone writes trials
    if run.is_main:
        study = open_study(cfg.search.study, storage=cfg.search.storage, run_dir=run.dir,
                           user_attrs=attrs)
    if cfg.controller.kind == "tpe" and run.is_main:
        # Workers sharing the study with one --seed must not propose the same trials.
        sampler = WorkerSeededSampler(functools.partial(
            optuna.samplers.TPESampler, n_startup_trials=cfg.controller.tpe_startup),
            seed=cfg.runtime.seed)
        # Proposals are ask/tell trials (no Study.optimize, so no heartbeat thread): a dead
        # worker's proposals are failed by snexp.runtime.storage's owner check when a worker
        # starts.
        tpe_study = open_study(f"{cfg.search.study}-tpe-proposals", storage=cfg.search.storage,
                               run_dir=run.dir, sampler=sampler, user_attrs=attrs,
                               heartbeat_interval=None)
    proposer: Proposer | None = None
    if run.is_main:
        proposer = build_proposer(cfg.controller, cfg.child.num_nodes, device=run.device,
                                  seed=cfg.runtime.seed, study=tpe_study)
    if run.world_size > 1:  # rank 0 proposes, every rank trains what it proposed
        proposer = BroadcastProposer(proposer, name=cfg.controller.kind)
    run.attach(child=child, optimizer=optimizer, scheduler=scheduler, proposer=proposer)
    loader = epoch_loader(run, splits.train, opt, cfg.data.workers)
    valid = _valid_tensors(run, splits.valid, opt.eval_batch_size)
    net.train()  # batch statistics everywhere during the search (see module docstring)
    for epoch in run.epochs(opt.epochs):
        reward = run.state.get("last_reward")
        child_m = _train_child(run, net, proposer, optimizer, loader, cfg, epoch, reward)
        ctrl_m = _train_proposer(run, net, proposer, valid, cfg, epoch)
        scheduler.step()
        last = epoch + 1 == opt.epochs
        n = cfg.search.derive_final if last else cfg.search.derive_samples
        _, derived = _derive(run, net, proposer, valid, study, n, epoch)
        if run.is_main and cfg.search.importance_every and (
                (epoch + 1) % cfg.search.importance_every == 0 or last):
            _log_importance(run, child)
        run.state["last_reward"] = ctrl_m.get("reward")
        run.state["rewards"] = [*run.state.get("rewards", []), ctrl_m.get("reward")]
        run.state["derived"] = [*run.state.get("derived", []), derived]  # per-epoch best derived
        run.state["losses"] = [*run.state.get("losses", []), child_m["loss"]]  # epoch means
        logger.info(
            "epoch %d/%d: child loss %.3f acc %.3f | reward %.3f | derived valid acc %.3f "
            "(best %.3f)", epoch + 1, opt.epochs, child_m["loss"], child_m["acc"],
            ctrl_m.get("reward", math.nan), derived, run.best)
    best = Architecture.from_flat(run.state["best_arch"])
    if run.is_main:  # what a study reads: per-epoch mean rewards and the best derived accuracy
        report = _report_importance(run, child, best)
        write_text_atomic(run.dir / SUMMARY_FILE, json.dumps({
            "best_valid_acc": float(run.best), "rewards": run.state.get("rewards", []),
            "derived": run.state.get("derived", []), "losses": run.state.get("losses", []),
            "controller": cfg.controller.kind, "controller_norm": str(cfg.controller.norm),
            "norm": str(cfg.child.norm),  # the child's spec with its options, e.g. sn(prior=bn:4)
            "arch": str(best), "importance": report}, indent=2) + "\n")
    run.tracker.hparams(cfg, {"search/final_best_valid_acc": float(run.best)}, step=run.step)
    logger.info("best architecture (valid acc %.4f), saved to %s: %s", run.best,
                run.dir / BEST_FILE, best)
    return SearchResult(best, float(run.best))
