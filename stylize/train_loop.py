"""The training loop of ``python -m stylize.train`` and the builders it uses.

Johnson et al. (2016), Sec. 4.1: Adam, batches of content crops, the transformation network
minimizes the weighted content + style (+ TV) loss of a frozen VGG16. With several styles each
step uses one style, in turn (step mod S), as Dumoulin et al. (2017) train conditional IN.
The loop hands numbers to the runtime (:class:`snexp.runtime.run.Run`): scalars, a preview grid, SN
importance, checkpoints; it does not know where they go. Under ``torchrun`` the runtime makes it
data-parallel (each rank its shard of the content, ``--batch-size`` per rank); rank 0 alone
renders previews and writes ``model.pt``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from snexp import Importance
from snexp.runtime.run import Run
from snexp.runtime.track import progress
from stylize.cond import ConditionalSwitchNorm2d
from stylize.config import DataConfig, ModelConfig, StylizeConfig, TrainConfig
from stylize.data import ContentFolder, SyntheticScenes, load_image, preview_batch
from stylize.loss import Losses, PerceptualLoss
from stylize.net import TransformerNet, style_weights
from stylize.saved import save_model

__all__ = ["build_content", "build_network", "plan_steps", "render_previews",
           "style_importance", "style_names", "train", "train_step"]

logger = logging.getLogger(__name__)
MODEL_FILE = "model.pt"


def style_names(paths: Sequence[str]) -> list[str]:
    """Style names from their files (the stem; numbered when two files share one)."""
    stems = [Path(p).stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(stems)]


def build_network(model: ModelConfig, num_styles: int) -> TransformerNet:
    """The transformation network a model config describes."""
    return TransformerNet(model.norm, width=model.width, blocks=model.blocks,
                          num_styles=num_styles, pixel_scale=model.pixel_scale)


def build_content(data: DataConfig) -> tuple[Dataset, Tensor]:
    """The training content set and the fixed held-out preview images (K, 3, S, S).

    From ``data.content_dir``: the first ``preview_count`` images are held out when the folder
    has at least five times as many, else the previews are training images. Without a folder:
    embedded scenes, with held-out scenes of another seed.
    """
    size, k = data.image_size, data.preview_count
    if data.content_dir is None:
        logger.warning(
            "no --content-dir: training on %d embedded, procedurally drawn scenes (shapes, "
            "gradients, textures), fine for trying things out. For real results train on "
            "photos, e.g. COCO 2014 train (83k images, as Johnson et al. and the SN paper): "
            "--content-dir path/to/train2014", data.synthetic_count)
        return SyntheticScenes(data.synthetic_count, size), preview_batch(
            SyntheticScenes(k, size, seed=1), k)
    folder = ContentFolder.scan(data.content_dir, size)
    held = k if len(folder) >= 5 * k else 0
    previews = preview_batch(folder, k)
    if held:
        return Subset(folder, range(held, len(folder))), previews
    logger.info("content: fewer than %d images, so the previews show training images", 5 * k)
    return folder, previews


LONG_RUN = 1000  # steps from which training on the embedded scenes gets a loud warning
_NO_PHOTOS = (
    "\n" + "!" * 79 + "\n"
    "NO PHOTOS: this run trains %d steps on %d embedded, procedurally drawn scenes (each seen "
    "about %.0f times), not on photos. The result will not look like Johnson et al.'s; for that "
    "pass --content-dir path/to/coco/train2014 (COCO 2014 train, 83k photos).\n" + "!" * 79)


def plan_steps(train_cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """``(epochs, steps)`` a run trains: ``--steps`` wins over ``--epochs`` when given.

    With ``steps`` set, the data cycles through as many epochs as needed (the last one cut at
    the step count); without it, ``epochs`` full passes.
    """
    if train_cfg.steps is not None:
        return math.ceil(train_cfg.steps / steps_per_epoch), train_cfg.steps
    return train_cfg.epochs, train_cfg.epochs * steps_per_epoch


class _Interval:
    """Sums of the loss terms since the last log; :meth:`pop` returns their means."""

    def __init__(self) -> None:
        self.sums: list[Tensor] | None = None
        self.count = 0

    def add(self, losses: Losses) -> None:
        self.sums = list(losses) if self.sums is None else [a + b for a, b in
                                                             zip(self.sums, losses)]
        self.count += 1

    def pop(self) -> dict[str, float]:
        sums, count, self.sums, self.count = self.sums or [], self.count, None, 0
        return {f"loss/{k}": float(v) / count for k, v in zip(Losses._fields, sums)}


def train_step(net: nn.Module, criterion: PerceptualLoss, content: Tensor, style: int,
               optimizer: torch.optim.Optimizer, run: Run, *,
               amp_network: bool = False) -> Losses:
    """One optimizer step on a batch of content images with one style; returns the losses.

    ``--amp`` (``run.autocast()``) covers the loss network; the transformation network runs
    under it only with ``amp_network``. By default it stays float32: it is the smaller part of
    a step, and autocast adds casts around each of its norm layers, which can cost more than
    the lower precision saves (docs/stylize.md, "Precision and memory format").
    """
    weights = style_weights(style, criterion.num_styles, device=content.device)
    with run.autocast() if amp_network else contextlib.nullcontext():
        output = net(content, weights)
    with run.autocast():
        losses = criterion(output, content, style)
    run.optimizer_step(losses.total, optimizer)
    return Losses(*(t.detach() for t in losses))


@torch.no_grad()
def render_previews(net: nn.Module, images: Tensor, num_styles: int) -> Tensor:
    """The content images followed by their stylization in every style, (K*(S+1), 3, H, W)."""
    was = net.training
    net.eval()
    rows = [images]
    for s in range(num_styles):
        rows.append(net(images, style_weights(s, num_styles, device=images.device)))
    net.train(was)
    return torch.cat(rows).clamp(0, 1)


def style_importance(net: nn.Module, names: Sequence[str]) -> dict[str, dict[str, Importance]]:
    """Per style, the importance weights of every conditional SN layer (style -> layer -> ...)."""
    out: dict[str, dict[str, Importance]] = {n: {} for n in names}
    for layer, m in net.named_modules():
        if isinstance(m, ConditionalSwitchNorm2d):
            mean_p, var_p = (p.detach().cpu() for p in m.importance_weights())  # (S, K)
            for s, name in enumerate(names):
                out[name][layer] = Importance(m.candidates, tuple(mean_p[s].tolist()),
                                              tuple(var_p[s].tolist()))
    return out


def _log_visuals(run: Run, net: TransformerNet, previews: Tensor, names: Sequence[str]) -> None:
    run.tracker.image("preview", render_previews(net, previews, len(names)), run.step,
                      nrow=len(previews))
    if net.num_styles == 1:
        run.tracker.importance(net, run.step)
        return
    for style, layers in style_importance(net, names).items():
        for layer, imp in layers.items():
            for i, c in enumerate(imp.candidates):
                run.tracker.scalar(f"sn_importance/{style}/{layer}/mean_{c}", imp.mean[i],
                                   run.step)
                run.tracker.scalar(f"sn_importance/{style}/{layer}/var_{c}", imp.var[i],
                                   run.step)


def train(run: Run, loss_net: nn.Module) -> TransformerNet:
    """Train the transformation network of ``run.config``; write ``<out>/model.pt``.

    Args:
        run: The run (config, device, tracker, checkpoints).
        loss_net: The frozen feature network (:func:`stylize.loss.load_vgg16`; tests pass a
            small one).

    Returns:
        The trained network (on the run's device).
    """
    cfg: StylizeConfig = run.config
    names = style_names(cfg.data.styles)
    styles = [run.to_device(load_image(p, cfg.data.style_size)) for p in cfg.data.styles]
    train_set, previews = build_content(cfg.data)
    previews = run.to_device(previews)
    net = build_network(cfg.model, len(styles))
    model = run.prepare(net)
    if cfg.runtime.channels_last:  # VGG16 is most of a step: give it the same memory format
        loss_net = loss_net.to(memory_format=torch.channels_last)
    criterion = PerceptualLoss(
        loss_net.to(run.device), styles, content_weight=cfg.loss.content_weight,
        style_weight=cfg.loss.style_weight, tv_weight=cfg.loss.tv_weight)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.train.lr)
    run.attach(model=net, optimizer=optimizer)
    batch = cfg.train.batch_size
    loader = run.dataloader(train_set, batch_size=batch, shuffle=True,
                            drop_last=len(train_set) >= batch * run.world_size,
                            num_workers=cfg.data.workers)
    epochs, planned = plan_steps(cfg.train, len(loader))
    if cfg.data.content_dir is None and planned >= LONG_RUN:
        logger.warning(_NO_PHOTOS, planned, len(train_set), planned * batch / len(train_set))
    ranks = f" x {run.world_size} ranks = {batch * run.world_size}" if run.world_size > 1 else ""
    logger.info("training %d step(s) (%d epoch(s) of %d): %s norm, width %g, %d style(s) %s, "
                "batch %d%s at %d px, style %s px, lr %g", planned, epochs, len(loader),
                cfg.model.norm, cfg.model.width, len(names), ", ".join(names), batch, ranks,
                cfg.data.image_size, "x".join(str(n) for n in styles[0].shape[-2:][::-1]),
                cfg.train.lr)
    bar = progress(total=planned, initial=min(run.step, planned), desc="stylize", rank=run.rank)
    last_visual = -1
    interval = _Interval()
    for _ in run.epochs(epochs):
        if run.step >= planned:
            break
        model.train()
        for content in run.batches(loader):
            losses = train_step(model, criterion, run.to_device(content),
                                run.step % len(styles), optimizer, run,
                                amp_network=cfg.train.amp_network)
            interval.add(losses)
            # the mean over the interval (single batches vary ~100x), and always the last step
            log_now = (run.step + 1) % cfg.log.every == 0 or run.step + 1 >= planned
            metrics = None
            if log_now:
                means = interval.pop()
                metrics = {**means, "lr": optimizer.param_groups[0]["lr"]}
                bar.set_postfix({k[5:]: f"{v:.3g}" for k, v in means.items()})
            run.step_done(losses.total, metrics)
            bar.update(1)
            if run.step % cfg.log.preview_every == 0 and run.is_main:
                _log_visuals(run, net, previews, names)
                last_visual = run.step
            if run.step >= planned:
                break
        else:
            continue  # the epoch ran to its end: run.epochs counts it and checkpoints
        break  # stopped mid-epoch at --steps: the checkpoint records the batch position
    bar.close()
    if not run.is_main:
        return net
    if last_visual != run.step:
        _log_visuals(run, net, previews, names)
    path = save_model(run.dir / MODEL_FILE, net, styles=names, config=cfg)
    logger.info("model written to %s (stylize with: python -m stylize.apply --model %s "
                "--input PHOTO --output OUT.jpg)", path, path)
    return net

