"""snexp.runtime.study's WorkerSeededSampler: workers on one study with the same --seed propose
different trials, while a lone worker stays reproducible."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
from pathlib import Path

import optuna
import pytest

from snexp.runtime.study import WorkerSeededSampler, open_study, worker_seed

CTX = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
TPE = functools.partial(optuna.samplers.TPESampler, n_startup_trials=3)


def _objective(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -1.0, 1.0)
    op = trial.suggest_categorical("op", ["a", "b", "c", "d", "e"])
    return x * x + "abcde".index(op)


def _trials(storage: str, seed: int, n: int = 3) -> list[dict]:
    sampler = WorkerSeededSampler(TPE, seed=seed)
    study = open_study("shared", storage=storage, direction="minimize", sampler=sampler)
    mine = []
    for _ in range(n):  # ask/tell, as nas.search's TPE proposer does
        trial = study.ask()
        study.tell(trial, _objective(trial))
        mine.append(trial.params)
    return mine


def _worker(storage: str, out: str, start) -> None:
    start.wait()  # both workers open the study and ask at once
    Path(out).write_text(json.dumps(_trials(storage, seed=0)))


def test_the_worker_of_trial_zero_keeps_the_seed_others_mix_it():
    # trial 0: --seed itself; later first trials: distinct seeds, the same on every call
    assert worker_seed(7, 0) == 7
    mixed = {worker_seed(7, n) for n in range(1, 50)}
    assert len(mixed) == 49 and 7 not in mixed
    assert worker_seed(7, 3) == worker_seed(7, 3) != worker_seed(8, 3)
    assert 0 <= worker_seed(-1, 5) < 2**32


def test_a_lone_worker_draws_what_a_plain_seeded_tpe_draws(tmp_path):
    # reproducible: a new study, --seed 0 -> the trials of TPESampler(seed=0), run after run
    first = _trials(str(tmp_path / "a.log"), seed=0, n=5)
    again = _trials(str(tmp_path / "b.log"), seed=0, n=5)
    plain = optuna.create_study(sampler=TPE(seed=0))
    plain.optimize(_objective, n_trials=5)
    assert first == again == [t.params for t in plain.trials]


def test_a_worker_joining_a_study_draws_new_trials(tmp_path):
    # a second worker with the same --seed starts at trial 3: other proposals
    storage = str(tmp_path / "s.db")
    one, two = _trials(storage, seed=0), _trials(storage, seed=0)
    assert one[0] != two[0] and one[0]["x"] != two[0]["x"]


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_concurrent_workers_with_one_seed_propose_different_first_trials(tmp_path, kind):
    storage = str(tmp_path / ("studies.log" if kind == "journal" else "studies.db"))
    open_study("shared", storage=storage, direction="minimize")  # the schema, made once
    start = CTX.Event()
    outs = [tmp_path / f"worker{i}.json" for i in range(2)]
    procs = [CTX.Process(target=_worker, args=(storage, str(o), start)) for o in outs]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    a, b = (json.loads(o.read_text()) for o in outs)
    # their first proposals differ, and no proposal of one is repeated by the other
    assert a[0]["x"] != b[0]["x"]
    assert not {t["x"] for t in a} & {t["x"] for t in b}
    study = optuna.load_study(study_name="shared", storage=(
        f"sqlite:///{storage}" if kind == "sqlite" else optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(storage))))
    assert sorted(t.number for t in study.trials) == list(range(6))
