"""One run of the batch-size study: a small ResNet, one normalizer, one batch size.

The SN paper (Luo et al. 2018, arXiv 1806.10779, Table 1 and Fig. 4) trains ResNet-50 on
ImageNet with BN, GN and SN at 32 down to 2 images per GPU: same epochs (so the same images
seen), learning rate scaled linearly with the total batch. This is that experiment at CPU
scale: a CIFAR-style ResNet (three stages of one basic block, 16/32/64 channels; He et al.
2016) on the embedded shapes of :mod:`nas.data` (or CIFAR / an image folder), SGD with momentum
and weight decay on every parameter (as the authors' ImageNet script), the learning rate
``base_lr * batch / base_batch`` (linear scaling, Goyal et al. 2017; the base is He et al.'s
CIFAR ResNet rate, 0.1 per 128 images) with a cosine decay over the run. ``train.devices > 1``
is the paper's multi-GPU setting on one process: each optimizer step sees ``devices``
normalization batches ("ghost batches") of ``batch_size`` images, normalized separately and
their losses averaged.

:func:`train` is the loop of one run inside a :class:`snexp.runtime.run.Run` (checkpoints,
resume, TensorBoard); it returns the numbers the study writes to ``study.json``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

import snexp
from nas.data import DataConfig, Splits
from snexp.runtime.config import RuntimeConfig
from snexp.runtime.metrics import eval_mode, top1_accuracy
from snexp.runtime.run import Run

__all__ = ["ModelConfig", "RunConfig", "SmallResNet", "TrainConfig", "cosine_lr",
           "importance_summary", "linear_lr", "train"]


@dataclass(frozen=True)
class ModelConfig:
    """The network: a CIFAR-style ResNet with one basic block per stage."""

    # NOTE: GN's 32 groups need >= 32 channels in every stage; the study's arm is gn(groups=8)
    norm: snexp.NormSpec = snexp.NormSpec("sn")  # every norm of the network, e.g. gn(groups=8)
    width: int = 16  # channels of the first stage (x2 and x4 in the next two)

    # config.toml files written before the spec carried GN's groups (the study's run folders)
    LEGACY_KEYS: ClassVar[dict[str, Any]] = {"gn_groups": int}

    @classmethod
    def upgrade_legacy(cls, fields: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
        """``gn_groups`` was passed to gn only, as its ``groups``."""
        norm: snexp.NormSpec = fields["norm"]
        if norm.kind != "gn" or "gn_groups" not in old:
            return {}
        return {"norm": snexp.NormSpec("gn", {**dict(norm.options), "groups": old["gn_groups"]})}

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", snexp.NormSpec.parse(self.norm))  # norm="gn(groups=8)"
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        widths = [self.width, 2 * self.width, 4 * self.width]
        groups = dict(self.norm.options).get("groups", 32)
        gn = self.norm.kind == "gn" and isinstance(groups, int) and groups > 0
        if gn and self.width % groups:
            raise ValueError(f"gn groups={groups} must divide the widths {widths}; write "
                             f"gn(groups=G) with G dividing {self.width}, e.g. "
                             f"gn(groups={math.gcd(self.width, 8)})")
        layer = self.norm.layer()
        for c in widths:  # every norm the network will build, before any work
            try:
                layer(c)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"norm {self.norm}: {exc}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Batch sizes, the learning-rate rule and the budget (the same images for every batch)."""

    batch_size: int = 32  # images per normalization batch (per "device")
    devices: int = 1  # normalization batches per optimizer step (ghost batches; 1: off)
    epochs: int = 2  # passes over the training images
    base_lr: float = 0.1  # learning rate of an optimizer batch of base_batch images
    base_batch: int = 128  # lr = base_lr * batch_size * devices / base_batch (linear scaling)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # on every parameter, the SN importance logits too (authors')
    importance_lr_mult: float = 1.0  # lr factor of the SN importance logits (1: the paper's)
    curve_points: int = 10  # training-curve points recorded per epoch
    eval_batch_size: int = 500  # images per evaluation batch

    def __post_init__(self) -> None:
        if min(self.batch_size, self.devices, self.epochs, self.base_batch,
               self.curve_points, self.eval_batch_size) < 1:
            raise ValueError("batch_size, devices, epochs, base_batch, curve_points and "
                             "eval_batch_size must be >= 1")
        if self.base_lr <= 0 or self.importance_lr_mult < 0:
            raise ValueError("base_lr must be > 0 and importance_lr_mult >= 0")


@dataclass(frozen=True)
class RunConfig:
    """One run of the study (written to ``<run>/config.toml``)."""

    # NOTE: 16x16 shapes without augmentation (nas.data's default is 32x32, cropped and
    # flipped): a quarter of the compute, so the grid fits a CPU; every image trains.
    data: DataConfig = field(
        default_factory=lambda: DataConfig(valid_size=1, size=16, augment=False))
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


def linear_lr(base_lr: float, base_batch: int, batch: int) -> float:
    """The linear scaling rule: ``base_lr * batch / base_batch``."""
    return base_lr * batch / base_batch


def cosine_lr(lr: float, step: int, total: int) -> float:
    """Cosine decay from ``lr`` at step 0 to 0 at step ``total``."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total) / total))


class _Block(nn.Module):
    """Basic residual block: conv-norm-relu-conv-norm plus the (projected) input, then relu."""

    def __init__(self, cin: int, cout: int, stride: int, norm_layer: Callable[[int], nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = norm_layer(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = norm_layer(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          norm_layer(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A CIFAR-style ResNet: stem, three stages of one basic block (stride 1, 2, 2), pool, fc.

    Args:
        num_classes: Outputs of the classifier.
        norm_layer: ``norm_layer(channels)`` builds every norm (``NormSpec.layer()``).
        width: Channels of the first stage; the next two have 2x and 4x.
        in_channels: Channels of the input images.
    """

    def __init__(self, num_classes: int, norm_layer: Callable[[int], nn.Module], *,
                 width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  norm_layer(width), nn.ReLU())
        self.stages = nn.Sequential(_Block(width, width, 1, norm_layer),
                                    _Block(width, 2 * width, 2, norm_layer),
                                    _Block(2 * width, 4 * width, 2, norm_layer))
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stages(self.stem(x))  # (N, 4 * width, H / 4, W / 4)
        return self.fc(y.mean((2, 3)))


def build_model(cfg: ModelConfig, num_classes: int, in_channels: int) -> SmallResNet:
    """The network of ``cfg`` with its normalizer spec resolved once."""
    return SmallResNet(num_classes, cfg.norm.layer(), width=cfg.width, in_channels=in_channels)


def importance_summary(model: nn.Module) -> dict[str, Any] | None:
    """SN importance per layer and averaged over layers (``None`` without SN layers).

    Returns:
        ``{"mean": {cand: w}, "var": {cand: w}, "layers": {name: {"mean": .., "var": ..}}}``,
        the averages taken over the layers with equal weight.
    """
    layers = snexp.importance(model)
    if not layers:
        return None
    per = {name: {"mean": dict(zip(v.candidates, v.mean)), "var": dict(zip(v.candidates, v.var))}
           for name, v in layers.items()}
    avg = {which: {c: sum(p[which][c] for p in per.values()) / len(per)
                   for c in next(iter(layers.values())).candidates} for which in ("mean", "var")}
    return {**avg, "layers": per}


def _optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.SGD:
    # the logits' group carries lr_mult; the loop sets each group's lr (weight decay for all)
    groups = snexp.importance_param_groups(model, lr_scale=cfg.importance_lr_mult)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def evaluate(model: nn.Module, loader, run: Run) -> float:
    """Top-1 accuracy of ``model`` in eval mode (BN: running statistics) over ``loader``."""
    with eval_mode(model):
        return top1_accuracy(model, loader, to_device=run.to_device)


def train(run: Run, splits: Splits) -> dict[str, Any]:
    """Train one network of ``run.config`` (a :class:`RunConfig`) and test it.

    Returns:
        The run's numbers: ``test_acc``, ``curve`` (mean training loss and accuracy every
        ``1/curve_points`` epoch, by images seen), ``test_curve`` (per epoch), ``importance``
        (:func:`importance_summary`), ``lr``, ``steps``, ``images`` and ``seconds`` (training
        time, summed over resumes).
    """
    cfg: RunConfig = run.config
    opt = cfg.train
    model = build_model(cfg.model, splits.num_classes, splits.in_channels)
    net = run.prepare(model)
    batch = opt.batch_size * opt.devices
    lr = linear_lr(opt.base_lr, opt.base_batch, batch)
    optimizer = _optimizer(model, opt, lr)
    run.attach(model=model, optimizer=optimizer)
    loader = run.dataloader(splits.train_full, batch_size=batch, shuffle=True, drop_last=True,
                            num_workers=cfg.data.workers)
    tests = torch.utils.data.DataLoader(splits.test, batch_size=opt.eval_batch_size,
                                        generator=torch.Generator())  # keeps the global RNG
    total = opt.epochs * len(loader)
    every = max(1, len(loader) // opt.curve_points)
    state = run.state
    for key, value in (("curve", []), ("test_curve", []), ("sums", [0.0, 0.0, 0]),
                       ("seconds", 0.0)):
        state.setdefault(key, value)
    start = time.perf_counter()
    for epoch in run.epochs(opt.epochs):
        net.train()
        for x, y in run.batches(loader):
            x, y = run.to_device((x, y))
            step_lr = cosine_lr(lr, run.step, total)
            for group in optimizer.param_groups:
                group["lr"] = step_lr * group["lr_mult"]
            loss = torch.zeros((), device=x.device)
            correct = 0
            for xc, yc in zip(x.split(opt.batch_size), y.split(opt.batch_size)):
                with run.autocast():
                    out = net(xc)  # each normalization batch sees only its own statistics
                    loss = loss + nn.functional.cross_entropy(out, yc) * (len(yc) / len(y))
                correct += int((out.argmax(1) == yc).sum())
            run.optimizer_step(loss, optimizer)
            acc = correct / len(y)
            now = time.perf_counter()
            state["seconds"] += now - start
            start = now
            sums = state["sums"]  # updated before step_done, which may checkpoint the state
            sums[0] += loss.item()
            sums[1] += acc
            sums[2] += 1
            if (run.step + 1) % every == 0:
                state["curve"].append({"images": (run.step + 1) * batch,
                                       "loss": sums[0] / sums[2], "acc": sums[1] / sums[2]})
                state["sums"] = [0.0, 0.0, 0]
            run.step_done(loss, {"train/loss": loss, "train/acc": acc, "train/lr": step_lr})
        test_acc = evaluate(model, tests, run)
        state["test_curve"].append({"epoch": epoch + 1, "images": run.step * batch,
                                    "test_acc": test_acc})
        run.tracker.scalar("test/acc", test_acc, run.step)
        run.tracker.importance(model, run.step)
    if not state["test_curve"]:  # resumed after the last epoch
        state["test_curve"].append({"epoch": run.epoch, "images": run.step * batch,
                                    "test_acc": evaluate(model, tests, run)})
    return {"test_acc": state["test_curve"][-1]["test_acc"], "curve": state["curve"],
            "test_curve": state["test_curve"], "importance": importance_summary(model),
            "lr": lr, "steps": run.step, "images": run.step * batch,
            "seconds": round(state["seconds"], 1)}
