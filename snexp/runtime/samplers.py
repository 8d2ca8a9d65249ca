"""Optuna samplers for many workers on one study: a distinct, reproducible seed per worker.

Workers share a study through its storage (:mod:`snexp.runtime.storage`), but each builds its own
sampler. Seeded with the run's ``--seed``, workers started alike draw the same random startup
trials (Optuna's TPE samples its first ``n_startup_trials`` independently at random), so they
evaluate the same points. :class:`WorkerSeededSampler` builds the real sampler at the worker's
first trial, seeded by :func:`worker_seed` from ``--seed`` and that trial's number, which the
storage hands out once per study (under a lock on the study's row in SQL databases, in log
order in journal files), so concurrent workers never share it.

What is reproducible:

- one worker on a new study makes trial 0 and is seeded with ``--seed`` itself: its trials
  are those of a plain ``TPESampler(seed=--seed)``, run after run;
- a worker joining a study that already holds ``n`` trials is seeded from ``(--seed, n)``:
  the same study contents and seed give the same draws;
- several workers at once get distinct seeds, but which worker gets which trial numbers, and
  so the history TPE models, depends on timing: such runs are not reproducible (nor are they
  with any seeding), only each worker's seed is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

__all__ = ["WorkerSeededSampler", "worker_seed"]

logger = logging.getLogger(__name__)


def worker_seed(seed: int, first_trial: int) -> int:
    """The sampler seed of a worker whose first trial of the study has number ``first_trial``.

    Args:
        seed: The run's ``--seed``.
        first_trial: The number of the first trial this worker makes.

    Returns:
        ``seed`` itself for trial 0 (a lone worker on a new study); otherwise a 32-bit seed
        mixed from both by numpy's ``SeedSequence``.
    """
    if first_trial == 0:
        return seed
    return int(np.random.SeedSequence([seed % 2**32, first_trial]).generate_state(1)[0])


class WorkerSeededSampler(BaseSampler):
    """A sampler built at this worker's first trial, seeded with :func:`worker_seed`.

    Args:
        make: Builds the real sampler from a keyword ``seed``, e.g. ``optuna.samplers.
            TPESampler`` or ``functools.partial(TPESampler, n_startup_trials=10)``.
        seed: The run's ``--seed``.

    Attributes:
        worker_seed: The seed in use (``None`` before the first trial).

    Example:
        >>> sampler = WorkerSeededSampler(optuna.samplers.TPESampler, seed=0)
        >>> study = open_study("search", storage="studies.log", sampler=sampler)  # doctest: +SKIP
    """

    def __init__(self, make: Callable[..., BaseSampler], seed: int) -> None:
        self._make, self.seed = make, seed
        self.worker_seed: int | None = None
        self._sampler: BaseSampler | None = None

    def _inner(self) -> BaseSampler:
        if self._sampler is None:
            raise RuntimeError("WorkerSeededSampler is built at the first trial (before_trial)")
        return self._sampler

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self._sampler is None:
            self.worker_seed = worker_seed(self.seed, trial.number)
            self._sampler = self._make(seed=self.worker_seed)
            logger.info("optuna study '%s': this worker's sampler seed is %d (--seed %d, first "
                        "trial %d)", study.study_name, self.worker_seed, self.seed, trial.number)
        self._sampler.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._inner().infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._inner().sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._inner().sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._inner().after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        if self._sampler is not None:
            self._sampler.reseed_rng()
