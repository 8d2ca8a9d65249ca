"""Several ``nas.search --controller tpe`` workers on one study with the same --seed."""

from __future__ import annotations

import optuna
import pytest

from nas import search as search_cli

TINY_TPE = [
    "--device", "cpu", "--epochs", "1", "--controller", "tpe", "--study", "shared",
    "--set", "data.embedded_train=240", "--set", "data.embedded_test=40",
    "--set", "data.valid_size=40",
    "--set", "data.valid_limit=16", "--set", "child.layers=1", "--set", "child.filters=4",
    "--set", "child.num_nodes=2", "--set", "controller.train_steps=1",
    "--set", "controller.num_aggregate=3", "--set", "train.batch_size=8",
    "--set", "train.steps_per_epoch=1", "--set", "search.derive_samples=1",
    "--set", "search.derive_final=1", "--set", "search.reward_batch_size=8",
    "--set", "search.importance_every=0",
]


@pytest.mark.slow  # two tiny searches: ~5 s (tests/snexp/runtime/test_worker_seed.py: SQLite too)
def test_tpe_workers_with_one_seed_propose_different_architectures(tmp_path):
    storage = str(tmp_path / "studies.log")  # a journal file, for workers on one host
    for worker in ("w1", "w2"):
        search_cli.main([*TINY_TPE, "--storage", storage, "--out", str(tmp_path / worker)])
    journal = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(storage))
    proposals = optuna.load_study(study_name="shared-tpe-proposals", storage=journal).trials
    # both workers' 3 proposals are in the study; the second worker, seeded from (--seed 0,
    # first trial 3), did not repeat the first worker's (seeded with --seed 0 itself)
    assert [t.number for t in proposals] == list(range(6))
    first, second = proposals[:3], proposals[3:]
    assert second[0].params != first[0].params
    w1, w2 = ((tmp_path / w / "run.log").read_text() for w in ("w1", "w2"))
    assert "sampler seed is 0 (--seed 0, first trial 0)" in w1
    assert "(--seed 0, first trial 3)" in w2
