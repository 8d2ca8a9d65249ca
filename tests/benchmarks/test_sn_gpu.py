"""benchmarks/sn_gpu.py: its table and its refusal without a GPU (the rest needs CUDA)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "sn_gpu.py"


def _load():
    spec = importlib.util.spec_from_file_location("sn_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["sn_gpu"] = module
    spec.loader.exec_module(module)
    return module


sg = _load()


def test_table_gives_ratios_to_cudnn_bn_and_their_medians():
    rows = [{"shape": (2, 8, 4, 4), "dtype": "float32", "layout": "NCHW", "ok": True,
             "errors": "y 1.0e-07", "bn_train": 10.0, "sn_train": 12.0, "aten_train": 80.0,
             "bn_eval": 5.0, "sn_eval": 6.0, "aten_eval": 40.0, "bn_kernels": 8.0,
             "sn_kernels": 8.8},
            {"shape": (2, 8, 2, 2), "dtype": "bfloat16", "layout": "channels_last", "ok": False,
             "errors": "y 1.0e-01", "bn_train": 10.0, "sn_train": 10.0, "aten_train": 50.0,
             "bn_eval": 5.0, "sn_eval": 5.0, "aten_eval": 20.0}]
    lines = sg.table(rows).splitlines()
    # SN/BN and SN-ATen/BN per row, then the agreement verdict
    assert lines[2] == ("| (2, 8, 4, 4) | float32 | NCHW | 10 | 1.20 | 1.10 | 8.00 | 5 | 1.20 | "
                        "8.00 | ok: y 1.0e-07 |")
    # a row without the profiler's figure shows "-" there
    assert "| 1.00 | - | 5.00 |" in lines[3]
    assert lines[3].endswith("| MISMATCH: y 1.0e-01 |")
    assert lines[-1] == ("SN (Triton) / cuDNN BN: median fwd+bwd ratio 1.10 (max 1.20), eval "
                         "ratio 1.10 (max 1.20), kernels-only fwd+bwd ratio 1.10 (max 1.10)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_a_gpu_it_refuses_to_run(capsys):
    with pytest.raises(SystemExit) as exit_:
        sg.main(["--check"])
    assert exit_.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
