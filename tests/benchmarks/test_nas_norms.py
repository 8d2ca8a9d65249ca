"""benchmarks/nas_norms.py: the grid's commands, the report from run folders, a tiny real run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import nas_norms  # noqa: E402


def test_plan_builds_one_search_per_arm_data_and_seed(tmp_path):
    jobs = nas_norms.plan(tmp_path, list(nas_norms.DEFAULT_ARMS), ["embedded", "shapes"],
                          [0, 1], ["--epochs", "3"])
    assert len(jobs) == 12 and len({j.out for j in jobs}) == 12
    by = {(j.data, j.arm, j.seed): j for j in jobs}
    assert by[("embedded", "sn-prior", 0)].argv == ("--seed", "0", "--study",
                                                    "embedded-sn-prior-s0", "--epochs", "3")
    bn = by[("shapes", "bn", 1)]
    # the shapes arm reads the 1,800-image folder; bn cells are the --norm flag
    assert bn.out == tmp_path / "shapes" / "bn-s1"
    assert bn.argv[4:8] == ("--dataset", "imagefolder", "--data-root",
                            str(tmp_path / "shapes-1800"))
    assert "--norm" in bn.argv and "bn" in bn.argv
    assert by[("embedded", "sn-uniform", 0)].argv[4:6] == ("--norm", "sn")
    assert [j.seed for j in jobs[:6]] == [0] * 6  # seeds outermost
    (strong,) = nas_norms.plan(tmp_path, ["sn-prior6"], ["embedded"], [0], [])
    assert strong.argv[4:6] == ("--norm", "sn(prior=bn:6)")


@pytest.mark.parametrize("arm, norm", [("sn-prior", "sn(prior=bn:4, var_prior=bn:6)"),
                                       ("bn", "bn"), ("sn-uniform", "sn"),
                                       ("sn-prior4", "sn(prior=bn:4)"),
                                       ("sn-prior6", "sn(prior=bn:6)")])
def test_each_arm_gives_nas_search_its_norm_spec(arm, norm):
    # what nas.search makes of an arm's flags on top of the quick preset: one norm spec
    from nas.config import PRESETS, SearchConfig
    from nas.search import FLAGS
    from snexp import NormSpec
    from snexp.runtime.config import parse_args

    cfg = parse_args(SearchConfig, list(nas_norms.ARMS[arm]), flags=FLAGS, presets=PRESETS,
                     default_config="quick")
    assert cfg.child.norm == NormSpec.parse(norm) and str(cfg.child.norm) == norm


def _fake_run(out: Path, job, derived: list[float], loss400: float, *, finished: bool,
              wall: float | None = None) -> None:
    job.out.mkdir(parents=True)
    writer = SummaryWriter(str(job.out / "tb"))
    for step in range(1, 401):
        writer.add_scalar("child/loss", loss400 if step > 350 else 2.3, step)
    for epoch, acc in enumerate(derived, 1):
        writer.add_scalar("search/derive_acc", acc, 200 * epoch)
    writer.close()
    if finished:
        report = {"candidates": ["in", "ln", "bn"],
                  "shared": {"mean": {"bn": 0.9}, "var": {"bn": 0.95}},
                  "ops": [{"mean": {"bn": 0.8}, "var": {"bn": 0.6}}, {"mean": None, "var": None},
                          {"mean": {"bn": 0.7}, "var": {"bn": 0.99}}]}
        (job.out / "search.json").write_text(json.dumps(
            {"best_valid_acc": max(derived), "derived": derived, "importance": report}))
    if wall is not None:
        (out / "logs").mkdir(exist_ok=True)
        (out / "logs" / f"{job.name}.time.json").write_text(json.dumps({"wall_s": wall}))


def test_report_tabulates_finished_and_unfinished_runs(tmp_path):
    jobs = nas_norms.plan(tmp_path, ["sn-prior", "bn"], ["embedded"], [0, 1], [])
    by = {(j.arm, j.seed): j for j in jobs}
    _fake_run(tmp_path, by[("sn-prior", 0)], [0.2, 0.5], 1.8, finished=True, wall=600)
    _fake_run(tmp_path, by[("sn-prior", 1)], [0.4, 0.7], 2.0, finished=True, wall=540)
    _fake_run(tmp_path, by[("bn", 0)], [0.3], 1.9, finished=False)  # interrupted: TB only
    nas_norms.main(["--out", str(tmp_path), "--arms", "sn-prior,bn", "--data", "embedded",
                    "--seeds", "0,1", "--report-only"])
    text = (tmp_path / "report.md").read_text()
    # per epoch over seeds: (0.2, 0.4) and (0.5, 0.7): means 0.3, 0.6, std 0.141
    assert "| sn-prior | 0.300 ± 0.141 (n=2) | 0.600 ± 0.141 (n=2) |" in text
    assert "| bn | 0.300 ± 0.000 (n=1) | - |" in text
    # per run: finished, steps, final, best, loss of steps 351-400, BN shares (mean / var
    # weights: the shared norms', the lowest over the ops), wall minutes
    assert ("| sn-prior | 0 | yes | 400 | 0.500 | 0.500 | 1.800 | 0.900 / 0.950 | "
            "0.700 / 0.600 | 10.0 |") in text
    assert "| bn | 0 | no | 400 | - | 0.300 | 1.900 | - | - | - |" in text
    assert "| sn-prior | all | | | 0.600 ± 0.141 (n=2) |" in text
    assert "1.900 ± 0.141 (n=2)" in text  # the loss at step 400 over seeds


def test_bad_arm_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        nas_norms.main(["--out", str(tmp_path), "--arms", "gn", "--report-only"])
    assert info.value.code == 2 and "sn-prior" in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_grid_runs_in_parallel_and_reports(tmp_path):
    tiny = ["data.embedded_train=240", "data.embedded_test=40", "data.valid_size=40",
            "data.valid_limit=32", "child.layers=1", "child.filters=4",
            "controller.train_steps=1", "controller.num_aggregate=2", "train.batch_size=16",
            "train.steps_per_epoch=3", "search.derive_samples=2", "search.derive_final=2",
            "search.reward_batch_size=16"]
    nas_norms.main(["--out", str(tmp_path), "--arms", "sn-prior,bn", "--data", "embedded",
                    "--seeds", "0", "--jobs", "2", "--epochs", "1",
                    *[a for kv in tiny for a in ("--set", kv)]])
    text = (tmp_path / "report.md").read_text()
    for arm in ("sn-prior", "bn"):
        assert (tmp_path / "embedded" / f"{arm}-s0" / "search.json").exists()
        assert f"| {arm} | 0 | yes | 3 |" in text
    # a second call reads the finished runs instead of running them again
    log = (tmp_path / "logs" / "embedded-bn-s0.log").read_text()
    nas_norms.main(["--out", str(tmp_path), "--arms", "bn", "--data", "embedded",
                    "--seeds", "0", "--epochs", "1", *[a for kv in tiny for a in ("--set", kv)]])
    assert (tmp_path / "logs" / "embedded-bn-s0.log").read_text() == log


def test_report_before_any_epoch_finished(tmp_path):
    (job,) = nas_norms.plan(tmp_path, ["bn"], ["shapes"], [2], [])
    _fake_run(tmp_path, job, [], 2.2, finished=False)  # steps logged, no derive step yet
    text = nas_norms.report([job])
    assert "No epoch finished yet." in text
    assert "| bn | 2 | no | 400 | - | - | 2.200 | - | - | - |" in text
