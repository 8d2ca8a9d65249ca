"""importance(), tables, the figure, TensorBoard logging and python -m snexp.inspect."""

from __future__ import annotations

import os

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
    assert f"checkpoint '{tmp_path / 'missing.pt'}' not found" in capsys.readouterr().err
    plain = tmp_path / "plain.pt"
    torch.save(nn.Linear(2, 2).state_dict(), plain)
    assert sninspect.main([str(plain)]) == 2
    assert "no SN layers" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    assert sninspect.main([str(junk)]) == 2
    assert f"checkpoint '{junk}' is unreadable or truncated" in capsys.readouterr().err


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


def test_load_weights_is_the_one_safe_load_of_layers_and_runtime(tmp_path, capsys):
    from snexp.norm.importance import load_weights
    from snexp.runtime.checkpoint import load_checkpoint
    from snexp.runtime.config import ConfigError

    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"step": 1, "payload": _Exploit(marker)}, evil)
    message = (f"checkpoint '{evil}' holds objects other than tensors and plain data "
               "(os.makedirs), so it is refused: loading it could run arbitrary code")
    # a pickled object is refused with the reason, by the layers, the CLI and the runtime alike
    with pytest.raises(ValueError) as info:
        load_weights(evil)
    assert str(info.value) == message
    assert sninspect.main([str(evil)]) == 2
    assert capsys.readouterr().err == f"python -m snexp.inspect: error: {message}\n"
    with pytest.raises(ConfigError) as info:
        load_checkpoint(evil)
    assert str(info.value) == message
    assert not marker.exists()
    # a run folder is not a file: the message points at the checkpoint inside it
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"step": 1}, tmp_path / "run" / "checkpoints" / "last.pt")
    with pytest.raises(ValueError, match="is a folder, not a checkpoint or model file; did you "
                                         "mean '.*last.pt'"):
        load_weights(tmp_path / "run")
    assert load_weights(tmp_path / "run" / "checkpoints" / "last.pt") == {"step": 1}
