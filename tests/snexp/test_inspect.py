"""importance(), tables, the figure, TensorBoard logging and python -m snexp.inspect."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import snexp
from snexp import inspect as sninspect


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), snexp.SwitchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), snexp.SwitchNorm2d(8, candidates=("ln", "gn4")))
    with torch.no_grad():
        model[1].mean_weight.copy_(torch.tensor([2.0, 0.0, 0.0]))
    return model


def test_importance_values():
    imp = snexp.importance(_model())
    assert list(imp) == ["1", "4"]
    e = torch.exp(torch.tensor(2.0))
    assert imp["1"].mean[0] == pytest.approx(float(e / (e + 2)))
    assert imp["4"].candidates == ("ln", "gn4") and imp["4"].var == (0.5, 0.5)


def test_format_and_plot(tmp_path):
    imp = snexp.importance(_model())
    table = sninspect.format_importance(imp)
    assert "mean:in" in table and "var:gn4" in table and "0.787" in table
    path = tmp_path / "imp.png"
    sninspect.plot_importance(imp, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_log_importance_tags(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = SummaryWriter(str(tmp_path))
    snexp.log_importance(writer, _model(), step=3)
    writer.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "sn_importance/1/mean_in" in tags and "sn_importance/4/var_gn4" in tags
    assert acc.Scalars("sn_importance/1/mean_in")[0].step == 3
    assert "sn_importance/figure" in acc.Tags()["images"]


def test_cli_prints_table_and_figure(tmp_path, capsys):
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": _model().state_dict(), "step": 7}, ckpt)
    png = tmp_path / "fig.png"
    assert sninspect.main([str(ckpt), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "0.787" in out and "gn4" in out and png.exists()


def test_cli_user_errors(tmp_path, capsys):
    assert sninspect.main([str(tmp_path / "missing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    plain = tmp_path / "plain.pt"
    torch.save(nn.Linear(2, 2).state_dict(), plain)
    assert sninspect.main([str(plain)]) == 2
    assert "no SN layers" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert sninspect.main([str(junk)]) == 2
    assert "cannot read" in capsys.readouterr().err
