"""Hyperparameter search for style transfer: an Optuna multi-objective study.

Each trial trains the transformation network for a few steps with a sampled style weight,
learning rate and norm kind (same initialization seed and data order in every trial), then
measures the unweighted content and style losses on held-out images: the two objectives, both
minimized, whose Pareto front ``optuna-dashboard`` shows. The study lives in a storage (SQLite
in the run directory by default, or any URL), so several workers can share it.

Stopping: SIGTERM or a first Ctrl-C stops the study after the current training step of the
current trial; that trial is marked failed by Optuna and re-queued with the same parameters,
and ``python -m stylize.tune --out DIR --resume`` continues: the re-queued trial first, then the
trials this worker still owes (counted in the run's checkpoint, written after every trial).

# NOTE: Optuna does not accept ``trial.report`` in multi-objective studies (so no pruning);
# the intermediate held-out losses are stored as trial user attributes (``curve``) and logged
# to TensorBoard (``trial<N>/content``, ``trial<N>/style``).
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch
from torch import nn
from torch.utils.data import DataLoader

from snexp import NormSpec
from snexp.runtime.config import ConfigError, RuntimeConfig, flatten
from snexp.runtime.run import Run, RunStopped
from snexp.runtime.study import WorkerSeededSampler, open_study
from stylize.config import DataConfig, LossConfig, ModelConfig, TrainConfig, check_norm
from stylize.data import load_image
from stylize.loss import PerceptualLoss
from stylize.train_loop import build_content, build_network, train_step

__all__ = ["SAFE_KEYS", "StudyConfig", "TuneConfig", "check_overwrite", "evaluate", "tune"]

# Keys that may change on --resume: how many trials this worker runs, data loading processes.
SAFE_KEYS = ("tune.trials", "data.workers", "loss.vgg_weights")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudyConfig:
    """The study: what is searched, how long each trial trains, where results live."""

    trials: int = 20  # trials this worker runs
    steps: int = 60  # training steps per trial
    report_every: int = 20  # held-out losses every N steps (the trial's curve)
    study: str = "stylize"  # study name (workers sharing a storage share it by name)
    storage: str | None = None  # Optuna storage URL or file; none: <out>/optuna.db
    # Optuna's choices are the specs' texts; a trial's model.norm is the one it draws
    norms: tuple[NormSpec, ...] = (
        NormSpec("sn"), NormSpec("in"), NormSpec("bn"))  # norms to choose from, e.g. gn(groups=8)
    style_weight_min: float = 1e9  # log-uniform range of the style weight
    style_weight_max: float = 1e11
    lr_min: float = 1e-4  # log-uniform range of the Adam learning rate
    lr_max: float = 1e-2

    def __post_init__(self) -> None:
        object.__setattr__(self, "norms", tuple(NormSpec.parse(n) for n in self.norms))
        if self.trials < 1 or self.steps < 1 or self.report_every < 1 or not self.norms:
            raise ValueError("trials, steps and report_every must be >= 1, norms not empty")
        if not (0 < self.style_weight_min <= self.style_weight_max
                and 0 < self.lr_min <= self.lr_max):
            raise ValueError("ranges must be positive with min <= max")


@dataclass(frozen=True)
class TuneConfig:
    """python -m stylize.tune."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: StudyConfig = field(default_factory=StudyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        for norm in self.tune.norms:  # every choice makes the network, before any trial
            check_norm(norm, self.model.width, max(1, len(self.data.styles)))


@torch.no_grad()
def evaluate(net: nn.Module, criterion: PerceptualLoss, images: torch.Tensor
             ) -> tuple[float, float]:
    """Unweighted content and style losses on held-out images, averaged over the styles."""
    was = net.training
    net.eval()
    content = style = 0.0
    for s in range(criterion.num_styles):
        weights = None if criterion.num_styles == 1 else torch.nn.functional.one_hot(
            torch.tensor(s, device=images.device), criterion.num_styles).float()
        c, st = criterion.terms(net(images, weights), images, s)
        content, style = content + float(c), style + float(st)
    net.train(was)
    return content / criterion.num_styles, style / criterion.num_styles


def _completed_trials(path: Path) -> int:
    """COMPLETE trials in an Optuna SQLite file (0 if it holds no Optuna tables)."""
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'")
                       .fetchone()[0])
    except sqlite3.Error:
        return 0


def check_overwrite(cfg: TuneConfig) -> None:
    """Refuse ``--overwrite`` of a run directory whose Optuna database holds completed trials.

    Raises:
        ConfigError: ``--overwrite`` would delete completed trials (the message names the file
            and the count, and how to continue or discard them).
    """
    if not cfg.runtime.overwrite or not cfg.runtime.out:
        return
    out = Path(cfg.runtime.out).expanduser()
    for db in sorted(out.glob("*.db")) if out.is_dir() else []:
        done = _completed_trials(db)
        if done:
            raise ConfigError(
                f"--overwrite would delete {db}, which holds {done} completed trial(s) of "
                f"this study; continue it with --out {out} --resume, or move or delete that "
                "file yourself if you want to discard them")


class _NoStopTraceback(logging.Filter):
    """Optuna logs a trial that raised with its traceback; a stop (SIGTERM, Ctrl-C) is no
    error, and the message the run prints says where it stopped and how to resume."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, RunStopped)


def tune(run: Run, loss_net: nn.Module) -> optuna.Study:
    """Run this worker's ``cfg.tune.trials`` trials of the study; returns the study.

    On ``--resume`` only the trials not yet finished run. A stop (SIGTERM, Ctrl-C) ends the
    current trial after its current step: Optuna marks it failed, a copy with the same
    parameters is queued, and :class:`~snexp.runtime.run.RunInterrupted` is raised after the
    checkpoint is written.
    """
    cfg: TuneConfig = run.config
    search = cfg.tune
    run.attach()  # no module: the checkpoint holds the trial count and the RNG states
    done = int(run.state.get("trials_done", 0))
    styles = [run.to_device(load_image(p, cfg.data.style_size)) for p in cfg.data.styles]
    train_set, held_out = build_content(cfg.data)
    held_out = run.to_device(held_out)
    loss_net = loss_net.to(run.device)
    # a seed per worker: workers sharing the study with one --seed propose different trials
    sampler = WorkerSeededSampler(optuna.samplers.TPESampler, seed=cfg.runtime.seed)
    study = open_study(search.study, storage=search.storage, run_dir=run.dir,
                       directions=["minimize", "minimize"], sampler=sampler,
                       user_attrs={"config": {k: str(v) for k, v in flatten(cfg).items()}})

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        style_weight = trial.suggest_float("style_weight", search.style_weight_min,
                                           search.style_weight_max, log=True)
        lr = trial.suggest_float("lr", search.lr_min, search.lr_max, log=True)
        # the spec texts: a study begun with kinds ("sn", "in", "bn") keeps its choices
        norm = trial.suggest_categorical("norm", [str(n) for n in search.norms])
        torch.manual_seed(cfg.runtime.seed)  # every trial: the same initialization ...
        net = build_network(dataclasses.replace(cfg.model, norm=NormSpec.parse(norm)),
                            len(styles))
        model = run.prepare(net)
        criterion = PerceptualLoss(loss_net, styles, content_weight=cfg.loss.content_weight,
                                   style_weight=style_weight, tv_weight=cfg.loss.tv_weight)
        optimizer = torch.optim.Adam(net.parameters(), lr=lr)
        order = torch.Generator().manual_seed(cfg.runtime.seed)  # ... and the same batches
        loader = DataLoader(train_set, batch_size=cfg.train.batch_size, shuffle=True,
                            drop_last=len(train_set) >= cfg.train.batch_size, generator=order,
                            num_workers=cfg.data.workers)
        curve, step, batches = [], 0, iter(loader)
        model.train()
        while step < search.steps:
            content = next(batches, None)
            if content is None:
                batches = iter(loader)
                continue
            losses = train_step(model, criterion, run.to_device(content), step % len(styles),
                                optimizer, run, amp_network=cfg.train.amp_network)
            step += 1
            if run.stop_requested:
                study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
                logger.warning("trial %d stopped at step %d: marked failed and re-queued with "
                               "the same parameters", trial.number, step)
                # writes the checkpoint, raises RunInterrupted naming the trial's own step
                run.check_stop(where=f"step {step} of trial {trial.number} (re-queued)")
            if not torch.isfinite(losses.total):
                raise optuna.TrialPruned(f"loss became {float(losses.total)} at step {step}")
            if step % search.report_every == 0 or step == search.steps:
                c, s = evaluate(model, criterion, held_out)
                curve.append([step, c, s])
                run.tracker.scalars({f"trial{trial.number}/content": c,
                                     f"trial{trial.number}/style": s}, step)
        trial.set_user_attr("curve", curve)
        logger.info("trial %d: norm %s, style weight %.3g, lr %.3g -> content %.4g, style %.4g",
                    trial.number, norm, style_weight, lr, curve[-1][1], curve[-1][2])
        return curve[-1][1], curve[-1][2]

    def count(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        run.state["trials_done"] = run.state.get("trials_done", 0) + 1
        run.save()

    run.save()  # a worker killed before its first trial ends can --resume too
    if done:
        logger.info("resuming: %d of this worker's %d trials are done", done, search.trials)
    if search.trials > done:
        # a logger's filters see only its own records: this is the one that logs failed trials
        optimizer_log, quiet = logging.getLogger("optuna.study._optimize"), _NoStopTraceback()
        optimizer_log.addFilter(quiet)
        try:
            study.optimize(objective, n_trials=search.trials - done, catch=(),
                           callbacks=[count])
        finally:
            optimizer_log.removeFilter(quiet)
    front = sorted(study.best_trials, key=lambda t: t.values[0])
    for t in front:
        logger.info("Pareto front: trial %d %s -> content %.4g, style %.4g", t.number,
                    t.params, *t.values)
    return study
