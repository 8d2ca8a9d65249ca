"""benchmarks/nas_study.py: searches and retrains per proposer and seed, a table, reuse."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "nas_study.py"
SMALL = ["data.embedded_train=240", "data.embedded_test=40", "data.valid_size=40",
         "child.layers=1", "child.filters=4", "train.batch_size=16"]
SEARCH = [*SMALL, "child.num_nodes=2", "data.valid_limit=32", "controller.train_steps=2",
          "controller.num_aggregate=3", "train.steps_per_epoch=3", "search.derive_samples=2",
          "search.derive_final=3", "search.reward_batch_size=16"]
RETRAIN = [*SMALL, "data.limit=32", "train.steps_per_epoch=4"]


def _study():
    spec = importlib.util.spec_from_file_location("nas_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_study_searches_retrains_reports_and_reuses_finished_runs(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--proposers", "random,tpe", "--seeds", "0",
            "--search-epochs", "1", "--retrain-epochs", "1",
            *[a for kv in SEARCH for a in ("--search-set", kv)],
            *[a for kv in RETRAIN for a in ("--retrain-set", kv)]]
    study = _study()
    study.main(argv)
    first = capsys.readouterr().out
    assert first.count("$ ") == 4  # two searches, two retrainings
    rows = json.loads((tmp_path / "study.json").read_text())
    assert sorted(rows) == ["random", "tpe"]
    for proposer, runs in rows.items():
        (run,) = runs
        best = json.loads((tmp_path / f"{proposer}-s0" / "search" / "best_arch.json").read_text())
        assert run["valid_acc"] == best["valid_acc"]
        assert 0.0 <= run["test_acc"] <= 1.0 and run["params"] > 0
        assert f"{proposer} " in first
    study.main(argv)  # everything finished: read back, nothing rerun
    again = capsys.readouterr().out
    assert "$ " not in again
    assert json.loads((tmp_path / "study.json").read_text()) == rows


def test_unknown_proposer_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        _study().main(["--out", str(tmp_path), "--proposers", "lstm,bogus"])
    assert stop.value.code == 2
    assert "unknown proposer(s) ['bogus']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_unknown_controller_norm_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        _study().main(["--out", str(tmp_path), "--controller-norms", "sn,bn"])
    assert stop.value.code == 2 and "unknown controller norm(s) ['bn']" in capsys.readouterr().err


def _fake_run(calls: list):
    def fake_run(module, out, args, done):  # writes what the real runs would
        calls.append((module, args))
        out.mkdir(parents=True, exist_ok=True)
        if module == "nas.search":
            (out / "best_arch.json").write_text(json.dumps({"valid_acc": 0.5}))
            (out / "search.json").write_text(json.dumps({"rewards": [0.2, 0.4]}))
        else:
            (out / "result.json").write_text(json.dumps(
                {"test_acc": 0.75, "params": 9, "arch": "a"}))

    return fake_run


@pytest.mark.parametrize(("given", "norm"), [([], "bn"), (["--norm", "sn"], "sn")])
def test_proposer_arms_search_and_retrain_with_one_child_norm(tmp_path, monkeypatch, given,
                                                              norm):
    # BN by default (the quick preset's cells), in the search and the retraining alike
    study, calls = _study(), []
    monkeypatch.setattr(study, "_run", _fake_run(calls))
    study.main(["--out", str(tmp_path), "--proposers", "lstm,random", "--seeds", "0", *given])
    assert [module for module, _ in calls] == ["nas.search", "nas.train"] * 2
    assert all(args[args.index("--norm") + 1] == norm for _, args in calls)


def test_controller_norm_arms_run_the_lstm_with_each_norm_and_a_bn_child(tmp_path, capsys,
                                                                          monkeypatch):
    study, calls = _study(), []
    monkeypatch.setattr(study, "_run", _fake_run(calls))
    study.main(["--out", str(tmp_path), "--controller-norms", "sn,ln", "--seeds", "0,1",
                "--search-config", "enas_cifar10"])
    searches = [args for module, args in calls if module == "nas.search"]
    # the SN paper's setting: the LSTM controller with each norm, BN in the child
    assert [s[:4] for s in searches] == [["--controller", "lstm", "--set", f"controller.norm={n}"]
                                         for n in ("sn", "sn", "ln", "ln")]
    assert all(s[s.index("--norm") + 1] == "bn" for s in searches)
    assert all(s[s.index("--config") + 1] == "enas_cifar10" for s in searches)
    rows = json.loads((tmp_path / "study.json").read_text())
    assert sorted(rows) == ["lstm-ln", "lstm-sn"] and rows["lstm-sn"][0]["reward"] == 0.4
    assert "0.4000 +- 0.0000" in capsys.readouterr().out
