"""python -m snexp.bench: rows, ratios and the table (speed targets are not tested here)."""

from __future__ import annotations

import pytest

from snexp import bench


def test_run_benchmark_rows_and_table(capsys):
    rows = bench.run_benchmark([(2, 8, 4, 4)], repeats=2)
    assert {r["layer"] for r in rows} == set(bench.LAYERS)
    bn = next(r for r in rows if r["layer"] == "BN")
    assert bn["train_ratio"] == 1.0 and bn["eval_ratio"] == 1.0
    assert all(r["train_ms"] > 0 and r["eval_ms"] > 0 for r in rows)
    assert all(r["rounds"] == 2 for r in rows)  # no time floor: exactly the rounds asked for
    table = bench.format_table(rows)
    assert "| (2, 8, 4, 4) | 2 |" in table and "SN: median fwd+bwd ratio" in table


def test_a_time_floor_adds_rounds():
    # --min-time: rounds go on past --repeats until the shape's rounds took that long
    rows = bench.run_benchmark([(2, 8, 4, 4)], repeats=1, layers=("BN", "GN32"), min_time=0.2)
    rounds = {r["rounds"] for r in rows}
    assert len(rounds) == 1 and rounds.pop() > 10


def test_cli(capsys):
    assert bench.main(["--shape", "2,8,4,4", "--repeats", "1", "--min-time", "0",
                       "--channels-last", "--no-compile"]) == 0
    out = capsys.readouterr().out
    assert "ratios to BatchNorm2d" in out and "(2, 8, 4, 4)" in out
    # channels_last input is not what the C++ passes take: the line says ATen ops
    assert "SN backend (SNEXP_BACKEND=" in out and "eager ATen ops" in out


def test_compiled_rows_and_cpu_description():
    # compiled SN and BN are timed in the same process and compared with each other
    rows = bench.run_benchmark([(2, 8, 4, 4)], repeats=1,
                               layers=("SN", "BN") + bench.COMPILED)
    assert {r["layer"] for r in rows} == {"SN", "BN", "SN compiled", "BN compiled"}
    assert "SN compiled / BN compiled: median fwd+bwd ratio" in bench.format_table(rows)
    desc = bench.cpu_description()
    assert "ATen kernels:" in desc and any(isa in desc for isa in
                                           ("AVX-512", "AVX2", "NEON", "baseline"))


def test_compiled_layers_are_built_static_unless_dynamic_is_asked(monkeypatch):
    seen = []
    monkeypatch.setattr(bench.torch, "compile", lambda m, **kw: seen.append(kw) or m)
    sn = bench._build("SN compiled", 8)
    bn = bench._build("BN compiled", 8, dynamic=True)
    assert seen == [{"fullgraph": True, "dynamic": False}, {"fullgraph": True, "dynamic": True}]
    # both compiled as one-layer models, so that torch.compile traces the same harness around
    # them (it traces a bare torch.nn layer's Module.__call__, but not a bare SN's)
    assert [type(m).__name__ for m in (sn, bn)] == ["Sequential", "Sequential"]
    assert [type(m[0]).__name__ for m in (sn, bn)] == ["SwitchNorm2d", "BatchNorm2d"]


def test_threads_below_one_is_refused(capsys):
    # --threads 0 used to be dropped silently (the run went on with the default)
    with pytest.raises(SystemExit):
        bench.main(["--threads", "0", "--no-compile", "--shape", "2,8,4,4"])
    assert "--threads must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value,message", [
    ("--repeats", "0", "--repeats must be at least 1"),
    ("--min-time", "-1", "--min-time must be 0 or more seconds"),
    ("--min-time", "nan", "--min-time must be 0 or more seconds"),
    ("--min-time", "inf", "--min-time must be 0 or more seconds (finite)"),  # never ends
])
def test_rounds_below_one_and_negative_time_floors_are_refused(capsys, flag, value, message):
    with pytest.raises(SystemExit):
        bench.main([flag, value, "--no-compile", "--shape", "2,8,4,4"])
    assert message in capsys.readouterr().err
