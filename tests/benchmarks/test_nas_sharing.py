"""benchmarks/nas_sharing.py: the weight-sharing probe runs every mode and norm it is given."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from nas.data import write_shapes_folder

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "nas_sharing.py"


def _module():
    spec = importlib.util.spec_from_file_location("nas_sharing", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_reports_every_mode_and_norm_spec(tmp_path, capsys):
    root = write_shapes_folder(tmp_path / "shapes", 80)
    _module().main(["--data-root", str(root), "--norms", "bn,sn(candidates=ln+bn)",
                    "--modes", "shared,fixed", "--steps", "4", "--every", "2",
                    "--batch-size", "8", "--last-norm", "bn"])
    lines = capsys.readouterr().out.strip().splitlines()
    # 2 modes x 2 norms (the comma inside the spec is not a separator), 2 reports each
    assert len(lines) == 4
    assert [line.split()[:2] for line in lines] == [
        ["shared", "bn"], ["shared", "sn(candidates=ln+bn)"],
        ["fixed", "bn"], ["fixed", "sn(candidates=ln+bn)"]]
    for line in lines:
        pairs = [p.split("/") for p in line.split("valid acc) ")[1].split("[")[0].split()
                 if "/" in p]
        assert len(pairs) == 2
        for loss, acc in pairs:  # 10 classes: a fresh net's loss is near ln(10)
            assert abs(float(loss) - math.log(10)) < 1.5 and 0.0 <= float(acc) <= 1.0


def test_last_norm_replaces_only_the_final_cell_norm():
    from torch import nn

    from snexp import SwitchNorm2d

    net = _module().build_net(10, 3, "sn", last_norm="bn")
    assert isinstance(net.cells[-1].norm, nn.BatchNorm2d)
    assert isinstance(net.stem[1], SwitchNorm2d) and isinstance(net.cells[0].norm, SwitchNorm2d)
