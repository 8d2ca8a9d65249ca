"""benchmarks/compiled_overhead.py: kernel timing, buffer and view counts, table, flags."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import compiled_overhead as co  # noqa: E402


def test_instrument_times_kernels_and_counts_buffers_and_views_of_generated_modules():
    calls = []
    mod = types.ModuleType("generated")
    mod.call = lambda args: None
    mod.cpp_fused_add_0 = lambda *a: calls.append(a) or "out"
    mod.empty_strided_cpu = lambda *a: ("buffer", a)
    mod.reinterpret_tensor = lambda *a: ("view", a)
    mod.other = lambda: "untouched"
    tally = {"kernel_s": 0.0, "buffers": 0, "views": 0}
    co.instrument([mod], tally)
    assert mod.cpp_fused_add_0(1, 2) == "out" and calls == [(1, 2)]
    assert mod.empty_strided_cpu((2,), (1,)) == ("buffer", ((2,), (1,)))
    mod.empty_strided_cpu((3,), (1,))
    assert mod.reinterpret_tensor("b", (2,)) == ("view", ("b", (2,)))
    assert tally["buffers"] == 2 and tally["views"] == 1 and tally["kernel_s"] > 0.0
    assert mod.other() == "untouched"


def test_generated_modules_finds_only_inductor_cpu_output(monkeypatch):
    mod = types.ModuleType("fake_output_code")
    mod.call = lambda args: None
    mod.cpp_fused_mul_1 = lambda *a: None
    plain = types.ModuleType("fake_plain")
    plain.call = lambda: None
    monkeypatch.setitem(co.sys.modules, "fake_output_code", mod)
    monkeypatch.setitem(co.sys.modules, "fake_plain", plain)
    found = co.generated_modules()
    assert found["fake_output_code"] is mod and "fake_plain" not in found


def test_table_and_ratios():
    rows = {"sn": {"step_us": 300.0, "kernel_us": 60.0, "rest_us": 240.0, "buffers": 28,
                   "views": 9},
            "bn": {"step_us": 250.0, "kernel_us": 75.0, "rest_us": 175.0, "buffers": 8,
                   "views": 1}}
    text = co.format_rows(rows)
    assert "| SN | 300 | 60 | 240 | 28 | 9 |" in text and "| BN | 250 | 75 | 175 | 8 | 1 |" in text
    assert text.endswith("SN / BN: step 1.20, kernels 0.80, rest 1.37")


@pytest.mark.parametrize("argv,flag", [(["--shape", "4,256,14"], "--shape"),
                                       (["--shape", "a,b,c,d"], "--shape"),
                                       (["--steps", "0"], "--steps"),
                                       (["--threads", "0"], "--threads")])
def test_bad_flags_are_refused(argv, flag, capsys):
    with pytest.raises(SystemExit):
        co.main(argv)
    assert flag in capsys.readouterr().err


def test_no_generated_kernels_is_an_error_not_a_zero(monkeypatch):
    # a compiled step whose kernels cannot be found must not report 0 us inside kernels
    monkeypatch.setattr(co, "generated_modules", dict)
    monkeypatch.setattr(co.torch, "compile", lambda m, **kw: m)
    with pytest.raises(SystemExit, match="no inductor-generated"):
        co.measure("bn", (2, 4, 3, 3), 1)
