"""End to end: search + derive + retrain, resume, Optuna trials, TensorBoard tags, CLI errors."""

from __future__ import annotations

import json
import os
import signal

import optuna
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nas import search as search_cli
from nas import train as train_cli
from nas.space import Architecture
from snexp.runtime.checkpoint import load_checkpoint, save_checkpoint
from snexp.runtime.run import Run

TINY = [
    "--deterministic",
    "--epochs", "2",
    "--set", "data.embedded_train=240", "--set", "data.embedded_test=40",
    "--set", "data.valid_size=40", "--set", "data.valid_limit=32",
    "--set", "child.layers=1", "--set", "child.filters=4", "--set", "child.num_nodes=2",
    "--set", "controller.train_steps=2", "--set", "controller.num_aggregate=3",
    "--set", "train.batch_size=16", "--set", "train.steps_per_epoch=3",
    "--set", "search.derive_samples=2", "--set", "search.derive_final=3",
    "--set", "search.reward_batch_size=16", "--set", "search.importance_every=1",
]
RETRAIN = [
    "--epochs", "1", "--set", "data.embedded_train=240", "--set", "data.embedded_test=40",
    "--set", "data.valid_size=40", "--set", "data.limit=32", "--set", "child.layers=1",
    "--set", "child.filters=4", "--set", "train.batch_size=16",
    "--set", "train.steps_per_epoch=4",  # the 32 + 40 images once
]


def _tags(folder) -> dict[str, list[str]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc.Tags()


@pytest.mark.slow
def test_search_derive_and_retrain_end_to_end(tmp_path):
    out = tmp_path / "search"
    # SN cells (quick's are BN), so the SN importance of the child layers is logged too
    search_cli.main([*TINY, "--norm", "sn", "--out", str(out)])
    arch_file = out / "best_arch.json"
    data = json.loads(arch_file.read_text())
    arch = Architecture.from_json(arch_file.read_text())
    assert arch.num_nodes == 2 and 0.0 <= data["valid_acc"] <= 1.0
    assert (out / "cells.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # every derived architecture is a trial: 2 after epoch 1, 3 after the last epoch
    study = optuna.load_study(study_name="nas-search", storage=f"sqlite:///{out / 'optuna.db'}")
    trials = study.get_trials()
    assert len(trials) == 5
    assert {t.user_attrs["epoch"] for t in trials} == {1, 2}
    assert all(t.user_attrs["proposer"] == "lstm" for t in trials)
    assert max(t.value for t in trials) == pytest.approx(data["valid_acc"])
    best = max(trials, key=lambda t: t.value)
    assert Architecture.from_string(best.user_attrs["arch"]).num_nodes == 2
    assert "normal.node2.op1" in best.params

    tags = _tags(out / "tb")
    for tag in ("child/loss", "child/acc", "controller/reward", "controller/baseline",
                "controller/entropy", "controller/loss", "search/best_valid_acc"):
        assert tag in tags["scalars"], tag
    assert "search/cells" in tags["images"]
    assert any(t.startswith("sn_importance/") for t in tags["scalars"])
    assert any(t.startswith("search/best_arch") for t in tags["tensors"])

    retrain = tmp_path / "retrain"
    train_cli.main([*RETRAIN, "--arch", str(arch_file), "--out", str(retrain)])
    result = json.loads((retrain / "result.json").read_text())
    assert 0.0 <= result["test_acc"] <= 1.0 and result["params"] > 1000
    # ENAS's count: params without the auxiliary head, the head's apart (its 768 conv: 2x2 at
    # 32 px, 128 -> 768)
    assert result["aux_params"] > 2 * 2 * 128 * 768
    assert result["flops"] > 1e6 and result["arch"] == str(arch)
    assert "retrain/test_acc" in _tags(retrain / "tb")["scalars"]


@pytest.mark.slow
def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    search_cli.main([*TINY, "--out", str(straight)])

    step_done = Run.step_done

    def interrupt_at_step_4(self, loss=None, metrics=None):
        if self.step == 4:  # mid epoch 2 (3 steps per epoch)
            os.kill(os.getpid(), signal.SIGTERM)
        return step_done(self, loss, metrics)

    monkeypatch.setattr(Run, "step_done", interrupt_at_step_4)
    with pytest.raises(SystemExit) as info:
        search_cli.main([*TINY, "--out", str(broken)])
    assert info.value.code == 128 + signal.SIGTERM
    monkeypatch.setattr(Run, "step_done", step_done)
    assert load_checkpoint(broken / "checkpoints" / "last.pt")["step"] == 5
    search_cli.main([*TINY, "--out", str(broken), "--resume"])

    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(broken / "checkpoints" / "last.pt")
    # same weights, controller, baseline, best metric and best architecture
    assert a["step"] == b["step"] == 6 and a["best"] == b["best"]
    for name in ("child", "proposer"):
        flat_a, flat_b = _tensors(a["objects"][name]), _tensors(b["objects"][name])
        assert flat_a.keys() == flat_b.keys()
        for key in flat_a:
            torch.testing.assert_close(flat_a[key], flat_b[key], rtol=0, atol=0, msg=key)
    assert a["objects"]["proposer"]["baseline"] == b["objects"]["proposer"]["baseline"]
    assert (straight / "best_arch.json").read_text() == (broken / "best_arch.json").read_text()
    study = optuna.load_study(study_name="nas-search", storage=f"sqlite:///{broken / 'optuna.db'}")
    assert len(study.get_trials()) == 5


def _tensors(state, prefix=""):
    out = {}
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_tensors(v, f"{prefix}.{k}"))
    if isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_tensors(v, f"{prefix}.{i}"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["random", "tpe"])
def test_other_proposers_search_on_the_same_budget(tmp_path, kind):
    out = tmp_path / kind
    search_cli.main([*TINY, "--epochs", "1", "--controller", kind, "--out", str(out)])
    study = optuna.load_study(study_name="nas-search", storage=f"sqlite:///{out / 'optuna.db'}")
    # the derive step of the last epoch recorded its candidates with the proposer's name
    trials = study.get_trials()
    assert 1 <= len(trials) <= 3 and {t.user_attrs["proposer"] for t in trials} == {kind}
    assert Architecture.from_json((out / "best_arch.json").read_text()).num_nodes == 2
    if kind == "tpe":  # TPE's proposals and rewards: train_steps x num_aggregate trials
        proposals = optuna.load_study(study_name="nas-search-tpe-proposals",
                                      storage=f"sqlite:///{out / 'optuna.db'}")
        assert len(proposals.get_trials()) == 6


@pytest.mark.parametrize("content, message", [
    ('{"normal": [[["conv_9x9", 0], ["identity", 1]]], "reduce": []}', "unknown op 'conv_9x9'"),
    ("{oops", "not valid JSON"),
    ('{"normal": [[["identity", 3], ["identity", 1]]], "reduce": [[["identity", 0], '
     '["identity", 1]]]}', "input 3 is invalid"),
    ('{"normal": 5, "reduce": []}', "'normal' must be a non-empty list"),
    ('[1, 2]', "needs 'normal' and 'reduce' keys"),
    ('{"normal": [[["identity", 0]]], "reduce": [[["identity", 0]]]}',
     "expected [[op, input], [op, input]]"),
    ('{"normal": [[["identity", "a"], ["identity", 1]]], "reduce": [[["identity", 0], '
     '["identity", 1]]]}', "'a' is not an integer"),
])
def test_a_bad_arch_file_gives_a_clear_error_and_creates_nothing(tmp_path, capsys, content,
                                                                 message):
    bad = tmp_path / "arch.json"
    bad.write_text(content)
    with pytest.raises(SystemExit) as info:
        train_cli.main(["--arch", str(bad), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in " ".join(err.split())
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_search_flags_reach_the_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        search_cli.main(["--norm", "xn", "--out", str(tmp_path / "x")])
    assert ("child.norm: unknown norm kind 'xn'; valid kinds: sn, ssn, bn, in, ln, gn, none"
            in " ".join(capsys.readouterr().err.split()))  # the message is wrapped


def test_enas_arc_string_is_an_architecture():
    from nas.space import parse_arch

    text = "0 2 0 0 0 4 0 1 0 4 1 1 1 0 0 1 0 2 1 1 1 0 1 0 0 3 0 2 1 1 3 1 1 0 0 4 0 3 1 1"
    arch = parse_arch(text)
    # ENAS's script order: normal cell then reduction cell, [in_1, op_1, in_2, op_2] per node
    assert arch.to_flat() == [int(v) for v in text.split()]
    assert arch.normal[0] == (0, 2, 0, 0) and arch.reduce[-1] == (0, 3, 1, 1)


def test_a_resumed_epoch_does_not_record_its_derive_trials_twice(tmp_path):
    from nas.search_loop import _record_trials

    study = optuna.create_study(direction="maximize")
    arch = Architecture.from_flat([0, 0, 1, 4] * 2 + [1, 2, 0, 3] * 2)
    results = [(arch, 0.5), (arch, 0.25)]
    assert _record_trials(study, results, 1, "lstm", "/runs/a") == 2
    # killed before the checkpoint: the resumed run repeats epoch 1 and records nothing new
    assert _record_trials(study, results, 1, "lstm", "/runs/a") == 0
    # the next epoch, and another run sharing the study, still record theirs
    assert _record_trials(study, results, 2, "lstm", "/runs/a") == 2
    assert _record_trials(study, results, 1, "lstm", "/runs/b") == 2
    assert len(study.get_trials()) == 6


def _write_the_old_way(out) -> None:
    """Turn a run folder's config.toml and checkpoint into what runs wrote before the child's
    norm became one spec: norm = "sn" beside momentum, prior and gn_groups."""
    toml = out / "config.toml"
    text = toml.read_text()
    assert 'norm = "sn(prior=bn:4)"' in text
    toml.write_text(text.replace('norm = "sn(prior=bn:4)"', 'norm = "sn"\ngn_groups = 4\n'
                                 'momentum = 0.1\nprior = "bn:4"'))
    checkpoint = load_checkpoint(out / "checkpoints" / "last.pt")
    assert checkpoint["config"]["child.norm"] == "sn(prior=bn:4)"  # saved as its text
    checkpoint["config"].update({"child.norm": "sn", "child.gn_groups": 4, "child.momentum": 0.1,
                                 "child.prior": "bn:4"})
    save_checkpoint(checkpoint, out / "checkpoints" / "last.pt")


@pytest.mark.slow
def test_retrain_resume_keeps_the_architecture_it_started_with(tmp_path):
    first = Architecture.from_flat([0, 0, 1, 4, 2, 1, 0, 2] * 2)
    other = Architecture.from_flat([1, 3, 0, 2, 2, 4, 1, 1] * 2)
    arch_file, out = tmp_path / "best_arch.json", tmp_path / "retrain"
    arch_file.write_text(first.to_json())
    train_cli.main([*RETRAIN, "--norm", "sn(prior=bn:4)", "--arch", str(arch_file),
                    "--out", str(out)])
    # a run folder written before the norm became one spec resumes, with the same norm
    _write_the_old_way(out)
    # a search rewrites best_arch.json meanwhile; the resumed run still trains the first
    arch_file.write_text(other.to_json())
    train_cli.main([*RETRAIN, "--epochs", "2", "--arch", str(arch_file), "--out", str(out),
                    "--resume"])
    result = json.loads((out / "result.json").read_text())
    assert result["arch"] == str(first) and result["flat"] == first.to_flat()
    assert result["norm"] == "sn(prior=bn:4)"
    assert 'norm = "sn(prior=bn:4)"' in (out / "config.toml").read_text()
    assert Architecture.from_json((out / "arch.json").read_text()) == first
    assert load_checkpoint(out / "checkpoints" / "last.pt")["epoch"] == 2


@pytest.mark.parametrize("setting, message", [
    ("train.lr_max=-1", "lr_max > 0"), ("train.lr_max=1e400", "finite"),
    ("train.l2_reg=nan", "finite"), ("data.size=0", "size"), ("train.momentum=1.5", "momentum"),
    ("data.valid_size=2.5", "valid_size"),
])
def test_bad_search_settings_are_one_paragraph_exit_2(tmp_path, capsys, setting, message):
    with pytest.raises(SystemExit) as info:
        search_cli.main(["--set", setting, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
