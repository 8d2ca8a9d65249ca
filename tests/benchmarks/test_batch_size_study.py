"""benchmarks/batch_size_study.py: the LR rule, the network, importance, the grid, reuse/resume."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its helper module by name

import batch_size_report as report  # noqa: E402
import batch_size_run as bsr  # noqa: E402
import batch_size_study as study  # noqa: E402

import snexp  # noqa: E402
from snexp.inspect import main as inspect_main  # noqa: E402
from snexp.runtime.config import to_toml  # noqa: E402

# 96 + 32 images of 16 px and 8/16/32 channels: a run of a few seconds
TINY = ["--set", "data.embedded_train=96", "--set", "data.embedded_test=32",
        "--set", "model.width=8"]


def test_linear_scaling_rule_and_cosine_decay():
    # lr = base_lr * batch / base_batch: 0.1 per 128 images -> 0.025 at 32, 0.0015625 at 2
    assert bsr.linear_lr(0.1, 128, 32) == pytest.approx(0.025)
    assert bsr.linear_lr(0.1, 128, 2) == pytest.approx(0.0015625)
    # cosine from lr to 0: half way is lr / 2, the end and beyond are 0
    assert bsr.cosine_lr(0.025, 0, 100) == pytest.approx(0.025)
    assert bsr.cosine_lr(0.025, 50, 100) == pytest.approx(0.0125)
    assert bsr.cosine_lr(0.025, 25, 100) == pytest.approx(0.0125 * (1 + math.sqrt(0.5)))
    assert bsr.cosine_lr(0.025, 120, 100) == pytest.approx(0.0)


@pytest.mark.parametrize("norm, cls", [("bn", torch.nn.BatchNorm2d),
                                       ("gn(groups=8)", torch.nn.GroupNorm),
                                       ("sn", snexp.SwitchNorm2d)])
def test_small_resnet_takes_one_norm_layer_everywhere(norm, cls):
    model = bsr.build_model(bsr.ModelConfig(norm=norm, width=8), 10, 3)
    norms = [m for m in model.modules() if isinstance(m, cls)]
    # stem 1 + block 2 + (2 + projection) + (2 + projection) = 9 norms
    assert len(norms) == 9
    gn = cls is torch.nn.GroupNorm
    assert [m.num_channels if gn else m.num_features for m in norms] == \
        [8, 8, 8, 16, 16, 16, 32, 32, 32]
    if gn:
        assert {m.num_groups for m in norms} == {8}
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_importance_is_averaged_over_layers_with_equal_weight():
    model = bsr.build_model(bsr.ModelConfig(norm="sn", width=8), 10, 3)
    assert bsr.importance_summary(bsr.build_model(bsr.ModelConfig(norm="bn"), 10, 3)) is None
    first = model.stem[1]
    with torch.no_grad():  # softmax(0, 0, ln 4) = (1/6, 1/6, 4/6) in one layer of nine
        first.mean_weight.copy_(torch.tensor([0.0, 0.0, math.log(4.0)]))
    imp = bsr.importance_summary(model)
    assert len(imp["layers"]) == 9
    assert imp["layers"]["stem.1"]["mean"]["bn"] == pytest.approx(4 / 6)
    assert imp["mean"]["bn"] == pytest.approx((4 / 6 + 8 / 3) / 9)
    assert imp["mean"]["in"] == pytest.approx((1 / 6 + 8 / 3) / 9)
    assert imp["var"] == pytest.approx({"in": 1 / 3, "ln": 1 / 3, "bn": 1 / 3})


def test_importance_logits_get_their_own_learning_rate_factor():
    model = bsr.build_model(bsr.ModelConfig(norm="sn", width=8), 10, 3)
    opt = bsr._optimizer(model, bsr.TrainConfig(importance_lr_mult=10.0), lr=0.01)
    rest, logits = opt.param_groups
    assert len(logits["params"]) == 18 and logits["lr_mult"] == 10.0  # mean + var, 9 layers
    assert rest["lr_mult"] == 1.0
    assert len(rest["params"]) + 18 == len(list(model.parameters()))
    # weight decay on every parameter, the logits too (the authors' ImageNet script)
    assert logits["weight_decay"] == rest["weight_decay"] == 1e-4


def test_summary_is_mean_and_std_over_seeds_and_importance_averaged(tmp_path):
    def imp(bn):
        return {"mean": {"in": 0.5 - bn / 2, "ln": 0.5 - bn / 2, "bn": bn},
                "var": {"in": 0.2, "ln": 0.3, "bn": 0.5}, "layers": {}}
    records = [{"norm": "bn", "batch_size": 2, "test_acc": 0.5, "importance": None},
               {"norm": "bn", "batch_size": 2, "test_acc": 0.7, "importance": None},
               {"norm": "sn", "batch_size": 2, "test_acc": 0.8, "importance": imp(0.1)},
               {"norm": "sn", "batch_size": 2, "test_acc": 0.8, "importance": imp(0.3)},
               {"norm": "sn", "batch_size": 32, "test_acc": 0.9, "importance": imp(0.6)}]
    rows = {(r["norm"], r["batch_size"]): r for r in report.summarize(records)["rows"]}
    bn = rows[("bn", 2)]
    assert (bn["seeds"], bn["test_acc_mean"]) == (2, pytest.approx(0.6))
    assert bn["test_acc_std"] == pytest.approx(math.sqrt(0.02))  # sample std of 0.5, 0.7
    assert "importance" not in bn
    assert rows[("sn", 2)]["importance"]["mean"] == pytest.approx({"in": 0.4, "ln": 0.4,
                                                                   "bn": 0.2})
    assert rows[("sn", 32)]["test_acc_std"] == 0.0
    table = report.format_tables(report.summarize(records))
    assert "0.600 +- 0.141 (2)" in table and "0.900 +- 0.000 (1)" in table
    assert "   32      0.200     0.200     0.600" in table  # batch 32 first, as in the paper
    paths = report.draw_figures(report.summarize(records), tmp_path)
    assert [p.name for p in paths] == ["accuracy.png", "importance.png"]


def test_quick_grid_is_three_norms_by_three_batch_sizes(tmp_path):
    args, configs = study.build_configs(["--out", str(tmp_path), "--quick"])
    names = [Path(c.runtime.out).name for c in configs]
    # the arm's spec names its folder: gn(groups=8) -> gn-groups=8
    assert names == [f"{n}-b{b}-s0" for n in ("bn", "gn-groups=8", "sn") for b in (32, 8, 2)]
    assert [str(c.model.norm) for c in configs[::3]] == ["bn", "gn(groups=8)", "sn"]
    assert {c.train.epochs for c in configs} == {2}  # the full grid's runs: reused by it
    _, full = study.build_configs(["--out", str(tmp_path), "--seeds", "0,1", "--devices", "4"])
    assert len(full) == 2 * 5 * 5
    assert Path(full[-1].runtime.out).name == "ln-b2-s1-d4"
    assert full[-1].train.devices == 4 and full[-1].runtime.seed == 1
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, message", [
    (["--norms", "bn,xn"], "--norms 'bn,xn': unknown norm kind 'xn'"),
    (["--norms", "bn,gn"], "gn groups=32 must divide the widths [16, 32, 64]; write "
                           "gn(groups=G) with G dividing 16, e.g. gn(groups=8)"),
    (["--norms", "sn(momentum"], "--norms 'sn(momentum': norm spec"),
    (["--set", "model.gn_groups=4"], "model.gn_groups is now an option of the norm spec; "
                                     "write it in --norms, e.g. --norms bn,gn(groups=G),sn"),
    (["--batch-sizes", "8,0"], "--batch-sizes '8,0'"),
    (["--set", "model.norm=bn"], "the grid sets model.norm"),
    (["--set", "train.bogus=1"], "train.bogus"),
    (["--devices", "0"], "devices"),
])
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        study.main(["--out", str(tmp_path / "study"), *argv])
    assert stop.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())  # one wrapped paragraph
    assert not (tmp_path / "study").exists()


def test_plan_reuses_resumes_restarts_and_refuses_other_settings(tmp_path):
    _, (cfg,) = study.build_configs(["--out", str(tmp_path), "--norms", "sn",
                                     "--batch-sizes", "4"])
    folder = Path(cfg.runtime.out)
    assert study.plan(cfg) == "new"
    folder.mkdir()
    (folder / "config.toml").write_text(to_toml(cfg))
    assert study.plan(cfg) == "restart"  # begun, never checkpointed
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.pt").write_bytes(b"")
    assert study.plan(cfg) == "resume"
    (folder / "result.json").write_text("{}")
    assert study.plan(cfg) == "reuse"
    _, (other,) = study.build_configs(["--out", str(tmp_path), "--norms", "sn",
                                       "--batch-sizes", "4", "--epochs", "3"])
    with pytest.raises(study.ConfigError, match=r"train.epochs: 2 -> 3"):
        study.plan(other)
    (folder / "config.toml").unlink()
    with pytest.raises(study.ConfigError, match="not a run of this study"):
        study.plan(cfg)


@pytest.mark.parametrize("norm, arm", [("gn", "gn(groups=8)"), ("sn", "sn"), ("bn", "bn")])
def test_a_run_folder_of_the_old_layout_is_the_same_run(tmp_path, norm, arm):
    # config.toml files written before the spec carried GN's groups held model.gn_groups; they
    # read as the spec (groups for gn only) and so match the arm's settings
    _, (cfg,) = study.build_configs(["--out", str(tmp_path), "--norms", arm,
                                     "--batch-sizes", "4"])
    folder = Path(cfg.runtime.out)
    folder.mkdir()
    text = to_toml(cfg).replace(f'norm = "{arm}"', f'norm = "{norm}"\ngn_groups = 8')
    assert "gn_groups = 8" in text
    (folder / "config.toml").write_text(text)
    assert bsr.ModelConfig(norm=arm) == study.load_config(
        bsr.RunConfig, folder / "config.toml").model
    assert study.plan(cfg) == "restart"


def test_ghost_batches_normalize_each_device_share_alone(tmp_path, monkeypatch, capsys):
    seen = []
    build = bsr.build_model

    def spy(*args, **kwargs):
        model = build(*args, **kwargs)
        model.stem[1].register_forward_pre_hook(
            lambda m, inp: seen.append((m.training, inp[0].shape[0])))
        return model

    monkeypatch.setattr(bsr, "build_model", spy)
    study.main(["--out", str(tmp_path), "--norms", "bn", "--batch-sizes", "2", "--devices", "3",
                "--epochs", "1", "--no-figures", *TINY])
    (run,) = json.loads((tmp_path / "study.json").read_text())["runs"]
    # 96 images, optimizer batch 3 x 2 = 6: 16 steps, 48 norm calls of 2 images each
    assert run["steps"] == 16 and run["images"] == 96 and run["devices"] == 3
    assert run["lr"] == pytest.approx(0.1 * 6 / 128)
    assert [n for training, n in seen if training] == [2] * 48
    assert "bn-b2-s0-d3" in capsys.readouterr().out


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, monkeypatch, capsys):
    argv = ["--norms", "sn", "--batch-sizes", "4", "--epochs", "2", "--no-figures",
            "--set", "runtime.deterministic=true", *TINY, "--set", "data.embedded_train=48"]
    study.main(["--out", str(tmp_path / "whole"), *argv])
    whole = json.loads((tmp_path / "whole" / "study.json").read_text())["runs"][0]

    build, calls = bsr.build_model, []

    def stop_in_epoch_2(*args, **kwargs):  # SIGINT at step 17 (12 steps per epoch)
        model = build(*args, **kwargs)

        def hook(module, inp):
            calls.append(1)
            if len(calls) == 18 and module.training:  # 12 steps, 1 test batch, 5 steps
                os.kill(os.getpid(), signal.SIGINT)
        model.stem.register_forward_pre_hook(hook)
        return model

    monkeypatch.setattr(bsr, "build_model", stop_in_epoch_2)
    with pytest.raises(SystemExit) as stop:
        study.main(["--out", str(tmp_path / "cut"), *argv])
    assert stop.value.code == 128 + signal.SIGINT
    assert "run the same command again" in capsys.readouterr().err
    monkeypatch.setattr(bsr, "build_model", build)
    study.main(["--out", str(tmp_path / "cut"), *argv])
    assert "sn-b4-s0 (resume)" in capsys.readouterr().out
    cut = json.loads((tmp_path / "cut" / "study.json").read_text())["runs"][0]
    # resumed mid-epoch: the same steps, curve, accuracy and importance as never stopped
    for key in ("steps", "images", "test_curve", "test_acc", "importance"):
        assert cut[key] == whole[key], key
    assert [c["loss"] for c in cut["curve"]] == pytest.approx([c["loss"] for c in whole["curve"]])
    # python -m snexp.inspect reads the study's checkpoints: one row per SN layer
    assert inspect_main([str(tmp_path / "cut" / "sn-b4-s0" / "checkpoints" / "last.pt")]) == 0
    table = capsys.readouterr().out
    assert "stages.1.shortcut.1" in table and len(table.strip().splitlines()) == 2 + 9


def test_an_image_folder_trains_with_its_own_classes(tmp_path):
    from PIL import Image

    for split, count in (("train", 12), ("test", 4)):
        for k, colour in enumerate(("red", "blue", "green")):
            folder = tmp_path / "images" / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 20), colour).save(folder / f"{i}.png")
    study.main(["--out", str(tmp_path / "study"), "--dataset", "imagefolder", "--data-root",
                str(tmp_path / "images"), "--norms", "gn(groups=8)", "--batch-sizes", "4",
                "--epochs", "1", "--no-figures", "--set", "model.width=8"])
    (run,) = json.loads((tmp_path / "study" / "study.json").read_text())["runs"]
    # 36 training images (train + the one-image valid split): 9 steps of 4
    assert run["steps"] == 9 and 0.0 <= run["test_acc"] <= 1.0
    model = torch.load(tmp_path / "study" / "gn-groups=8-b4-s0" / "checkpoints" / "last.pt",
                       weights_only=True)["objects"]["model"]
    assert model["fc.weight"].shape == (3, 32)  # three classes, 4 x 8 channels


@pytest.mark.slow
def test_quick_study_end_to_end_json_figures_reuse_and_inspect(tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--quick", *TINY]
    study.main(argv)
    first = capsys.readouterr().out
    assert first.count("$ ") == 9
    data = json.loads((tmp_path / "study.json").read_text())
    runs = {(r["norm"], r["batch_size"]): r for r in data["runs"]}
    assert sorted(runs) == sorted((n, b) for n in ("bn", "gn(groups=8)", "sn")
                                  for b in (32, 8, 2))
    for (norm, size), r in runs.items():
        assert 0.0 <= r["test_acc"] <= 1.0
        assert r["images"] == 2 * (96 // size) * size and r["steps"] == 2 * (96 // size)
        assert r["lr"] == pytest.approx(0.1 * size / 128)
        assert len(r["test_curve"]) == 2 and r["curve"]
        assert (r["importance"] is None) == (norm != "sn")
        assert (tmp_path / r["dir"] / "tb").is_dir()
    imp = runs[("sn", 2)]["importance"]
    assert set(imp) == {"mean", "var", "layers"} and len(imp["layers"]) == 9
    assert sum(imp["mean"].values()) == pytest.approx(1.0)
    assert {r["norm"] for r in data["summary"]} == {"bn", "gn(groups=8)", "sn"}
    assert "test accuracy" in first and "sn importance" in first
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "importance.png").stat().st_size > 0

    # python -m snexp.inspect reads the study's checkpoints: one row per SN layer
    assert inspect_main([str(tmp_path / "sn-b2-s0" / "checkpoints" / "last.pt")]) == 0
    table = capsys.readouterr().out
    assert "stem.1" in table and len(table.strip().splitlines()) == 2 + 9

    study.main(argv)  # everything finished: read back, nothing rerun
    assert "$ " not in capsys.readouterr().out
    again = json.loads((tmp_path / "study.json").read_text())
    assert again["runs"] == data["runs"]
