"""The loop and ``python -m stylize.train``: losses fall, TensorBoard, model.pt, resume."""

from __future__ import annotations

import pytest
import torch
from stylize_helpers import read_events, tiny_config

from snexp.runtime.config import override
from snexp.runtime.run import Run
from stylize.saved import load_model
from stylize.train import FLAGS, main
from stylize.train_loop import train


def test_losses_fall_and_tensorboard_has_every_tag(tmp_path, style_files, tiny_loss_net):
    cfg = tiny_config(tmp_path / "run", style_files[:1], steps=24, preview_every=12,
                      synthetic_count=16)
    with Run(cfg, experiment="stylize", console=False) as run:
        train(run, tiny_loss_net)
    scalars, images = read_events(tmp_path / "run" / "tb")
    total = scalars["loss/total"]
    # 24 steps on the embedded scenes: the last steps' loss is well below the first steps'
    assert len(total) == 24
    assert sum(total[-4:]) / 4 < 0.7 * sum(total[:4]) / 4
    for tag in ("loss/content", "loss/style", "loss/tv", "lr"):
        assert len(scalars[tag]) == 24
    assert scalars["lr"][0] == pytest.approx(1e-2)
    assert any(t.startswith("sn_importance/res.0.block1.norm/mean_") for t in scalars)
    # a preview grid at steps 12 and 24: 2 rows (content, style) x 2 held-out images of 32 px
    assert images["preview"] == [(2 * 34 + 2, 2 * 34 + 2)] * 2
    net, meta = load_model(tmp_path / "run" / "model.pt")
    assert meta["styles"] == ["waves"] and meta["norm"] == "sn"
    assert meta["config"]["train.steps"] == 24


def test_model_file_loads_with_weights_only_and_holds_metadata(tmp_path, style_files,
                                                                tiny_loss_net):
    cfg = tiny_config(tmp_path / "run", style_files[:1], steps=2, norm="gn(groups=2)")
    with Run(cfg, experiment="stylize", console=False) as run:
        trained = train(run, tiny_loss_net)
    raw = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    # format 2: the norm spec's text, its options with it
    assert raw["format"] == 2 and raw["norm"] == "gn(groups=2)" and "norm_options" not in raw
    assert raw["width"] == 0.125 and raw["blocks"] == 2 and raw["styles"] == ["waves"]
    net, _ = load_model(tmp_path / "run" / "model.pt")
    x = torch.rand(1, 3, 20, 20)
    trained.eval()
    # the rebuilt network computes exactly what the trained one does
    torch.testing.assert_close(net(x), trained(x))


def test_two_styles_train_one_conditional_network(tmp_path, style_files, tiny_loss_net):
    cfg = tiny_config(tmp_path / "run", style_files, steps=8, preview_every=8)
    with Run(cfg, experiment="stylize", console=False) as run:
        net = train(run, tiny_loss_net)
    # each style got its own steps, so its own affine parameters and importance logits moved
    norm = net.res[0].block1.norm
    assert norm.weight.shape == (2, 16) and norm.mean_logits.shape == (2, 3)
    assert not torch.allclose(norm.weight[0], norm.weight[1])
    assert not torch.allclose(norm.mean_logits[0], norm.mean_logits[1])
    assert norm.num_batches_tracked.tolist() == [4, 4]
    scalars, images = read_events(tmp_path / "run" / "tb")
    # the preview shows content + both styles (3 rows); importance is logged per style
    assert images["preview"] == [(2 * 34 + 2, 3 * 34 + 2)]
    assert any(t.startswith("sn_importance/waves/") for t in scalars)
    assert any(t.startswith("sn_importance/dots/") for t in scalars)
    _, meta = load_model(tmp_path / "run" / "model.pt")
    assert meta["styles"] == ["waves", "dots"]


def test_missing_vgg_weights_stop_the_cli_before_anything_is_written(tmp_path, style_files,
                                                                     monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(SystemExit) as info:
        main(["--style", style_files[0], "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "vgg16-397923af.pth" in " ".join(err.split()) and "--vgg-weights" in err
    assert not (tmp_path / "run").exists()


def test_cli_refuses_a_run_without_style(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run")])
    assert "pass --style FILE" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_through_the_cli_ends_where_an_uninterrupted_run_ends(tmp_path, style_files,
                                                                     random_vgg_file):
    common = ["--style", style_files[0], "--vgg-weights", str(random_vgg_file),
              "--image-size", "24", "--style-size", "24", "--width", "0.125",
              "--batch-size", "2", "--set", "model.blocks=1", "--set", "data.synthetic_count=8",
              "--deterministic", "--device", "cpu", "--preview-every", "100",
              "--set", "log.every=1", "--epochs", "3"]
    main(common + ["--steps", "5", "--out", str(tmp_path / "a")])
    main(common + ["--steps", "2", "--out", str(tmp_path / "b")])
    main(["--out", str(tmp_path / "b"), "--resume", "--steps", "5"])
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    # stopped at step 2 (mid-epoch) and resumed: the same weights as never stopped
    for key, value in a["state_dict"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=0)
    scalars, _ = read_events(tmp_path / "b" / "tb")
    assert len(scalars["loss/total"]) == 5


def _photos(folder, count, size=(40, 30)):
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(count):
        Image.new("RGB", size, (40 * i, 255 - 40 * i, 90)).save(folder / f"{i}.png")
    return folder


def test_steps_run_exactly_and_the_logged_loss_is_the_interval_mean(tmp_path, style_files,
                                                                    tiny_loss_net,
                                                                    monkeypatch):
    import stylize.train_loop as loop

    totals = []

    def recording_step(*args, **kwargs):
        losses = real_step(*args, **kwargs)
        totals.append(float(losses.total))
        return losses

    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", recording_step)
    cfg = tiny_config(tmp_path / "run", style_files[:1], steps=7, every=5, preview_every=100,
                      content_dir=str(_photos(tmp_path / "photos", 6)))
    cfg = override(cfg, {"train.epochs": 1})  # --steps wins over --epochs
    with Run(cfg, experiment="stylize", console=False) as run:
        train(run, tiny_loss_net)
        assert run.step == 7 and run.epoch == 2  # 6 photos, batch 2: 3 steps an epoch
    scalars, _ = read_events(tmp_path / "run" / "tb")
    # logged at step 5 (the mean of steps 1-5) and at the last step (the mean of 6-7)
    assert len(totals) == 7
    expected = [sum(totals[:5]) / 5, sum(totals[5:]) / 2]
    assert scalars["loss/total"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("preset, per_epoch, epochs, steps", [
    ("quick", 64, 2, 100),  # 256 scenes at batch 4; the second epoch is cut at step 100
    ("quick", 1, 100, 100),  # 6 photos at batch 4 (last partial batch dropped): they cycle
    ("johnson", 1024, 40, 40000),  # 4096 scenes: 1024 steps an epoch
])
def test_presets_run_their_steps_whatever_the_data(style_files, preset, per_epoch, epochs,
                                                   steps):
    from snexp.runtime.config import parse_args
    from stylize.config import PRESETS, StylizeConfig
    from stylize.train_loop import plan_steps

    cfg = parse_args(StylizeConfig, ["--config", preset, "--style", style_files[0],
                                     "--epochs", "1"],
                     prog="t", flags=FLAGS, presets=PRESETS, default_config="quick")
    # --steps (here the preset's) wins over --epochs
    assert plan_steps(cfg.train, per_epoch) == (epochs, steps)
    # without steps, epochs full passes
    assert plan_steps(override(cfg, {"train.steps": None, "train.epochs": 3}).train,
                      per_epoch) == (3, 3 * per_epoch)


def test_a_long_run_without_photos_warns_loudly(tmp_path, style_files, tiny_loss_net, caplog,
                                                monkeypatch):
    import logging

    import stylize.train_loop as loop

    monkeypatch.setattr(loop, "LONG_RUN", 2)  # as if 2 steps were a paper-scale run
    cfg = tiny_config(tmp_path / "run", style_files[:1], steps=2, synthetic_count=8)
    with caplog.at_level(logging.WARNING, logger="stylize.train_loop"):
        with Run(cfg, experiment="stylize", console=False) as run:
            train(run, tiny_loss_net)
    assert "NO PHOTOS: this run trains 2 steps on 8 embedded" in caplog.text
    assert "--content-dir" in caplog.text


@pytest.mark.parametrize("size", [(1, 1), (1000, 3)])
def test_tiny_style_image_is_refused_before_anything_is_written(tmp_path, size, capsys):
    from PIL import Image

    style = tmp_path / "tiny.png"
    Image.new("RGB", size, (9, 9, 9)).save(style)
    with pytest.raises(SystemExit) as info:
        main(["--style", str(style), "--out", str(tmp_path / "run")])
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and f"{size[0]}x{size[1]} pixels" in err
    assert "Traceback" not in err and not (tmp_path / "run").exists()


def test_content_dir_of_truncated_images_stops_the_cli_before_anything_is_written(
        tmp_path, style_files, capsys):
    import numpy as np
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        noise = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(noise).save(photos / f"{i}.png")
        data = (photos / f"{i}.png").read_bytes()
        (photos / f"{i}.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut
    with pytest.raises(SystemExit) as info:
        main(["--style", style_files[0], "--content-dir", str(photos), "--out",
              str(tmp_path / "run")])
    err = " ".join(capsys.readouterr().err.split())
    assert info.value.code == 2 and "truncated or corrupt" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_only_where_the_device_computes_it_natively(style_files, monkeypatch, caplog,
                                                         fast):
    import logging

    import stylize.train as cli
    from snexp.runtime.config import RuntimeConfig
    from stylize.config import StylizeConfig

    monkeypatch.setattr(cli, "bf16_is_fast", lambda device: fast)
    cfg = StylizeConfig(runtime=RuntimeConfig(device="cpu", amp="bf16"))
    with caplog.at_level(logging.WARNING, logger="stylize.train"):
        fitted = cli.fit_precision(cfg)
    # native bf16: kept; emulated: float32, and the user is told
    assert fitted.runtime.amp == ("bf16" if fast else "off")
    assert ("no native bfloat16" in caplog.text) is not fast


def test_channels_last_bf16_training_keeps_float32_losses(tmp_path, style_files,
                                                         tiny_loss_net, monkeypatch):
    import stylize.train_loop as loop

    seen = []

    def recording_step(*args, **kwargs):
        losses = real_step(*args, **kwargs)
        seen.append(losses)
        return losses

    real_step = loop.train_step
    monkeypatch.setattr(loop, "train_step", recording_step)
    cfg = override(tiny_config(tmp_path / "run", style_files[:1], steps=2),
                   {"runtime.amp": "bf16", "runtime.channels_last": True})
    with Run(cfg, experiment="stylize", console=False) as run:
        net = train(run, tiny_loss_net)
    # the network trained channels-last under bf16 autocast; every loss term stayed float32
    assert net.conv1.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for ls in seen for t in ls)


def test_a_run_folder_written_before_norm_specs_resumes(tmp_path, style_files, tiny_loss_net):
    # a run of the old layout: config.toml and the checkpoint hold model.norm as a kind and its
    # options as model.candidates / momentum / groups; --resume reads both as the spec
    from snexp import NormSpec
    from snexp.runtime.config import parse_args
    from stylize.config import PRESETS, StylizeConfig
    from stylize.train import SAFE_KEYS

    spec = NormSpec("sn", candidates=("ln", "bn"), momentum=0.03)
    cfg = tiny_config(tmp_path / "run", style_files[:1], steps=2, norm=str(spec))
    with Run(cfg, experiment="stylize", console=False) as run:
        train(run, tiny_loss_net)
    toml = tmp_path / "run" / "config.toml"
    new_line = f'norm = "{spec}"'
    assert new_line in toml.read_text()
    toml.write_text(toml.read_text().replace(new_line, 'norm = "sn"\ncandidates = ["ln", "bn"]\n'
                                             'momentum = 0.03\ngroups = 32'))
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    checkpoint = torch.load(last, weights_only=True)
    checkpoint["config"].update({"model.norm": "sn", "model.candidates": ["ln", "bn"],
                                 "model.momentum": 0.03, "model.groups": 32})
    torch.save(checkpoint, last)
    resumed = parse_args(StylizeConfig, ["--out", str(tmp_path / "run"), "--resume",
                                         "--steps", "3"],
                         prog="t", flags=FLAGS, presets=PRESETS, default_config="quick")
    assert resumed.model.norm == spec
    with Run(resumed, experiment="stylize", safe_keys=SAFE_KEYS, console=False) as run:
        net = train(run, tiny_loss_net)
        assert run.step == 3
    assert net.res[0].block1.norm.candidates == ("ln", "bn")
    assert load_model(tmp_path / "run" / "model.pt")[1]["norm"] == str(spec)
