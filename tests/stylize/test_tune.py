"""``stylize.tune``: a multi-objective Optuna study over style weight, lr and norm kind."""

from __future__ import annotations

import optuna
from stylize_helpers import read_events, tiny_config

from snexp.runtime.config import RuntimeConfig
from snexp.runtime.run import Run
from stylize.tune_loop import StudyConfig, TuneConfig, tune


def _config(out, styles, storage=None):
    base = tiny_config(out, styles)
    return TuneConfig(model=base.model, data=base.data, loss=base.loss, train=base.train,
                      tune=StudyConfig(trials=3, steps=4, report_every=2, norms=("sn", "in"),
                                        storage=storage, style_weight_min=10.0,
                                        style_weight_max=1000.0),
                      runtime=RuntimeConfig(out=str(out), device="cpu"))


def test_study_records_two_objectives_curves_and_a_pareto_front(tmp_path, style_files,
                                                                 tiny_loss_net):
    with Run(_config(tmp_path / "w1", style_files[:1]), experiment="t", console=False) as run:
        study = tune(run, tiny_loss_net)
    trials = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(trials) == 3
    for t in trials:
        # two finite objectives; the curve holds the held-out losses at steps 2 and 4
        assert len(t.values) == 2 and all(v >= 0 for v in t.values)
        assert [row[0] for row in t.user_attrs["curve"]] == [2, 4]
        assert t.user_attrs["curve"][-1][1:] == list(t.values)
        assert t.params["norm"] in ("sn", "in") and 10.0 <= t.params["style_weight"] <= 1000.0
    assert 1 <= len(study.best_trials) <= 3
    assert (tmp_path / "w1" / "optuna.db").is_file()
    scalars, _ = read_events(tmp_path / "w1" / "tb")
    assert len(scalars["trial0/content"]) == 2


def test_two_workers_share_one_storage(tmp_path, style_files, tiny_loss_net):
    storage = str(tmp_path / "shared.db")
    for worker in ("w1", "w2"):
        cfg = _config(tmp_path / worker, style_files[:1], storage=storage)
        with Run(cfg, experiment="t", console=False) as run:
            tune(run, tiny_loss_net)
    study = optuna.load_study(study_name="stylize", storage=f"sqlite:///{storage}")
    # both workers' trials are in the one study
    assert len(study.trials) == 6
    # the second worker, started with the same --seed, proposes other trials (its own seed)
    assert study.trials[3].params != study.trials[0].params


def test_sigterm_stops_after_the_current_step_and_resume_continues(tmp_path, style_files,
                                                                   tiny_loss_net, monkeypatch):
    import os
    import signal

    import pytest

    import stylize.tune_loop as tuning
    from snexp.runtime.config import override
    from snexp.runtime.run import RunInterrupted

    steps = []

    def step_then_signal(*args, **kwargs):
        steps.append(1)
        if len(steps) == 6:  # trial 1, its 2nd step (4 steps a trial)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(*args, **kwargs)

    real_step = tuning.train_step
    monkeypatch.setattr(tuning, "train_step", step_then_signal)
    cfg = _config(tmp_path / "w1", style_files[:1])
    with pytest.raises(RunInterrupted, match="--resume") as info:
        with Run(cfg, experiment="t", console=False) as run:
            tune(run, tiny_loss_net)
    # the signal stopped trial 1 right after that step: no further step, no further trial
    assert len(steps) == 6
    # The message names the trial's own step (not the run's step 0), and Optuna's log of the
    # failed trial, with its traceback, is not shown: a stop is no error.
    assert "the run stopped after step 2 of trial 1 (re-queued); checkpoint saved" in str(
        info.value)
    log = (tmp_path / "w1" / "run.log").read_text()
    assert "Traceback" not in log and "Trial 1 failed with parameters" not in log
    study = optuna.load_study(study_name="stylize",
                              storage=f"sqlite:///{tmp_path / 'w1' / 'optuna.db'}")
    states = [t.state for t in study.trials]
    S = optuna.trial.TrialState
    # trial 1 is failed, never left RUNNING, and queued again with the same parameters
    assert states == [S.COMPLETE, S.FAIL, S.WAITING]
    assert study.trials[2].system_attrs["fixed_params"] == study.trials[1].params
    monkeypatch.setattr(tuning, "train_step", real_step)
    with Run(override(cfg, {"runtime.resume": True}), experiment="t", console=False) as run:
        study = tune(run, tiny_loss_net)
    # resumed: the re-queued trial, then the one trial this worker still owed (3 in all)
    states = [t.state for t in study.trials]
    assert states == [S.COMPLETE, S.FAIL, S.COMPLETE, S.COMPLETE]
    assert study.trials[2].params == study.trials[1].params


def test_overwrite_never_silently_deletes_completed_trials(tmp_path, style_files,
                                                           tiny_loss_net):
    import pytest

    from snexp.runtime.config import ConfigError, override
    from stylize.tune_loop import check_overwrite

    cfg = _config(tmp_path / "w1", style_files[:1])
    cfg = override(cfg, {"tune.trials": 1})
    with Run(cfg, experiment="t", console=False) as run:
        tune(run, tiny_loss_net)
    # --overwrite is refused, naming the file and the count; nothing is deleted
    with pytest.raises(ConfigError, match=r"optuna.db, which holds 1 completed trial"):
        check_overwrite(override(cfg, {"runtime.overwrite": True}))
    assert (tmp_path / "w1" / "optuna.db").is_file()


def test_a_study_begun_with_norm_kinds_continues_with_the_default_norms(tmp_path, style_files,
                                                                        tiny_loss_net):
    # Optuna refuses a categorical whose choices changed within a study; the default norms'
    # texts are the kinds an existing study stored ("sn", "in", "bn"), so it goes on
    import dataclasses

    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from snexp import NormSpec

    storage = tmp_path / "old.db"
    study = optuna.create_study(study_name="stylize", storage=f"sqlite:///{storage}",
                                directions=["minimize", "minimize"])
    study.add_trial(optuna.trial.create_trial(
        params={"style_weight": 100.0, "lr": 1e-3, "norm": "bn"},
        distributions={"style_weight": FloatDistribution(10.0, 1000.0, log=True),
                       "lr": FloatDistribution(1e-4, 1e-2, log=True),
                       "norm": CategoricalDistribution(["sn", "in", "bn"])},
        values=[1.0, 2.0]))
    cfg = _config(tmp_path / "w1", style_files[:1], storage=str(storage))
    cfg = dataclasses.replace(cfg, tune=dataclasses.replace(
        cfg.tune, trials=1, norms=StudyConfig().norms))
    assert StudyConfig().norms == (NormSpec("sn"), NormSpec("in"), NormSpec("bn"))
    with Run(cfg, experiment="t", console=False) as run:
        study = tune(run, tiny_loss_net)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert study.trials[0].params["norm"] == "bn" and study.trials[1].params["norm"] in (
        "sn", "in", "bn")
