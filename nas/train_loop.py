"""Retraining a searched architecture from scratch (ENAS final training, Pham et al. 2018, 3.2).

The fixed :class:`~nas.child.ChildNet` of one architecture trains on train + valid with an
auxiliary head (loss weight 0.4), drop path (keep probability annealed from 1 to 0.6 over the
run, lower in deeper cells), cutout and SGD with the cosine schedule with warm restarts
(ENAS's 630 epochs are 10 + 20 + ... + 320, i.e. six whole periods). Reports test top-1, the
parameter count without the auxiliary head (``params``, ENAS's count) and the head's
(``aux_params``) and the FLOPs of one image, and writes them to ``<out>/result.json`` with
the child's norm spec as text (``"norm": "sn(prior=bn:4)"``) and, with SN in the cells, the
importance of each op's SN layers after retraining (:mod:`nas.op_importance`,
``"importance"``; ``null`` without SN).

The architecture is recorded in the run (``<out>/arch.json``, written before the first step);
``--resume`` retrains that one and never reads ``--arch`` again, so a search that rewrites
``best_arch.json`` meanwhile cannot switch the architecture of a run half-way.

Under ``torchrun`` the network is data-parallel (DDP): ``--batch-size`` is per rank and the ranks
read shares of one shuffled order (:func:`nas.optim.epoch_loader`), so K ranks train as
one process with batch K x B. The test accuracy is counted over the whole test split: each rank
takes rank 0's running statistics and evaluates every K-th image, and the counts are summed.
Rank 0 alone writes TensorBoard, checkpoints and ``result.json``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Subset
from torch.utils.flop_counter import FlopCounterMode

from nas.child import ChildNet
from nas.config import RetrainConfig
from nas.data import build_splits
from nas.op_importance import format_op_importance, op_importance
from nas.optim import epoch_loader, param_groups, sgd_with_restarts
from nas.space import Architecture, parse_arch
from snexp.runtime import distributed
from snexp.runtime.checkpoint import write_text_atomic
from snexp.runtime.config import ConfigError
from snexp.runtime.metrics import eval_mode, top1_accuracy
from snexp.runtime.run import Run
from snexp.runtime.track import progress

__all__ = ["RetrainResult", "count_flops", "count_params", "load_arch", "retrain", "test_accuracy"]

logger = logging.getLogger(__name__)
RESULT_FILE, ARCH_FILE = "result.json", "arch.json"


@dataclass(frozen=True)
class RetrainResult:
    """Test top-1 accuracy, parameters (without / of the auxiliary head), FLOPs per image."""

    test_acc: float
    params: int
    flops: int
    aux_params: int = 0


def load_arch(spec: str | None) -> Architecture:
    """The architecture named by ``--arch``, or a :class:`ConfigError` that says what is wrong."""
    if not spec:
        raise ConfigError("no architecture given: pass --arch best_arch.json (written by "
                          "python -m nas.search), an architecture string or a flat list")
    try:
        return parse_arch(spec)
    except ValueError as exc:
        raise ConfigError(f"--arch: {exc}") from None


def count_params(model: ChildNet) -> int:
    """Parameters used at test time (the auxiliary head excluded, as ENAS counts them)."""
    return model.params()


def recorded_arch(run: Run) -> Architecture:
    """The architecture a resumed run was started with (``<out>/arch.json``)."""
    text = None
    if run.is_main:
        path = run.dir / ARCH_FILE
        if not path.is_file():
            raise ConfigError(f"cannot resume: {path} is missing (the run records the "
                              "architecture it trains there); start a new run with --arch")
        text = path.read_text(encoding="utf-8")
    text = distributed.broadcast_object(text)
    try:
        return Architecture.from_json(text)
    except ValueError as exc:
        raise ConfigError(f"cannot resume: {run.dir / ARCH_FILE}: {exc}") from None


def count_flops(model: nn.Module, image: torch.Tensor) -> int:
    """FLOPs (a multiply-add counts 2) of one forward pass in eval mode of ``image`` (C, H, W)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(image.unsqueeze(0))
    finally:
        model.train(was)
    return int(counter.get_total_flops())


def test_accuracy(net: nn.Module, loader, run: Run) -> float:
    """Top-1 accuracy of ``net`` in eval mode over ``loader``.

    Under torchrun it is collective: ``net`` is the plain module (not DDP, so ranks may run
    different numbers of batches), ``loader`` holds this rank's share of the images; every rank
    first takes rank 0's buffers (the running statistics its checkpoint holds), and the counts
    are summed over the ranks.
    """
    distributed.broadcast_buffers(net)

    def logits(x: torch.Tensor) -> torch.Tensor:
        with run.autocast():
            return net(x).logits

    with eval_mode(net):
        return top1_accuracy(logits, loader, to_device=run.to_device, ranks="sum",
                             device=run.device)


def retrain(run: Run, arch: Architecture | None = None) -> RetrainResult:
    """Train the fixed network of ``arch`` and evaluate it on the test split.

    Args:
        run: The run; ``run.config`` is a :class:`RetrainConfig`.
        arch: The architecture of a new run; ``None`` reads ``run.config.retrain.arch``. A
            resumed run ignores it and takes the one it recorded.
    """
    cfg: RetrainConfig = run.config
    if run.resumed:
        arch = recorded_arch(run)
    else:
        arch = arch if arch is not None else load_arch(cfg.retrain.arch)
        if run.is_main:
            write_text_atomic(run.dir / ARCH_FILE, arch.to_json())
    splits = build_splits(cfg.data)
    image = splits.test[0][0]
    model = ChildNet(
        splits.num_classes, arch, norm_layer=cfg.child.norm.layer(), layers=cfg.child.layers,
        filters=cfg.child.filters, aux=cfg.retrain.aux_weight > 0, dropout=cfg.child.dropout,
        in_channels=splits.in_channels, image_size=image.shape[-1],
    )
    params, aux_params, flops = model.params(), model.aux_params(), count_flops(model, image)
    logger.info("retraining %s: %.3f M parameters (+ %.3f M in the auxiliary head), %.1f MFLOPs "
                "per image", arch, params / 1e6, aux_params / 1e6, flops / 1e6)
    net = run.prepare(model)
    opt = cfg.train
    optimizer, scheduler = sgd_with_restarts(param_groups(model, opt), opt)
    run.attach(model=model, optimizer=optimizer, scheduler=scheduler)
    loader = epoch_loader(run, splits.train_full, opt, cfg.data.workers)
    test_set = splits.test
    if run.world_size > 1:  # every K-th image on each rank; test_accuracy sums the counts
        test_set = Subset(test_set, range(run.rank, len(test_set), run.world_size))
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=opt.eval_batch_size,
                                              generator=torch.Generator())  # keeps global RNG
    acc = run.state.get("test_acc")
    for epoch in run.epochs(opt.epochs):
        model.drop_keep = 1.0 - (1.0 - cfg.retrain.drop_path_keep) * epoch / opt.epochs
        lr = optimizer.param_groups[0]["lr"]
        bar = progress(run.batches(loader), total=len(loader), desc=f"epoch {epoch + 1}",
                       rank=run.rank)
        net.train()
        for x, y in bar:
            x, y = run.to_device((x, y))
            with run.autocast():
                out = net(x)
                loss = nn.functional.cross_entropy(out.logits, y)
                if out.aux is not None:
                    loss = loss + cfg.retrain.aux_weight * nn.functional.cross_entropy(out.aux, y)
            run.optimizer_step(loss, optimizer, clip_grad_norm=opt.grad_clip or None)
            train_acc = float((out.logits.argmax(1) == y).float().mean())
            run.step_done(loss, {"retrain/loss": loss, "retrain/acc": train_acc, "retrain/lr": lr})
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{train_acc:.3f}")
        scheduler.step()
        if (epoch + 1) % cfg.retrain.eval_every == 0 or epoch + 1 == opt.epochs:
            acc = run.state["test_acc"] = test_accuracy(model, test_loader, run)
            run.tracker.scalar("retrain/test_acc", acc, run.step)
            run.update_best(acc)
            logger.info("epoch %d/%d: test acc %.4f", epoch + 1, opt.epochs, acc)
    if acc is None:  # resumed after the last epoch
        acc = run.state["test_acc"] = test_accuracy(model, test_loader, run)
    result = RetrainResult(float(acc), params, flops, aux_params)
    report = op_importance(model, arch)  # None without SN in the cells
    if run.is_main:
        if report is not None:
            logger.info("SN importance of the retrained ops:\n%s", format_op_importance(report))
        write_text_atomic(run.dir / RESULT_FILE, json.dumps(
            {"test_acc": result.test_acc, "params": params, "aux_params": aux_params,
             "flops": flops, "arch": str(arch), "flat": arch.to_flat(),
             "norm": str(cfg.child.norm), "importance": report}, indent=2) + "\n")
    run.tracker.hparams(cfg, {"retrain/final_test_acc": result.test_acc}, step=run.step)
    logger.info("test top-1 %.4f | %.3f M parameters | %.1f MFLOPs per image | %s",
                result.test_acc, params / 1e6, flops / 1e6, run.dir / RESULT_FILE)
    return result
