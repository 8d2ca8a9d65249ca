"""benchmarks/gpu_check.py: the plan of steps, running them, the table; its CPU dry run."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
INPUTS = {"style": "/x/style.png", "vgg": "/x/vgg.pth", "vgg_note": "random VGG16"}


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gc = _load()


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def _step(name: str, argv: tuple[str, ...], **kw):
    return gc.Step(name, argv, kw.pop("timeout_s", 30), kw.pop("figure", gc.epoch_figure), **kw)


# -- the table ------------------------------------------------------------------------------


def test_table_has_one_row_per_step_with_escaped_cells_and_dash_for_steps_not_run():
    results = [
        gc.StepResult("nas.search", "python -m nas.search --out $OUT/a", "ok",
                      "child loss 2.3 | reward 0.13", 12.345, "logs/nas.search.log"),
        gc.StepResult("NCCL probe", "torchrun x", "skipped", "NCCL needs CUDA", None),
        gc.StepResult("bench", "python -m snexp.bench", "failed (rc 1)", "Error: boom", 3.0,
                      "logs/bench.log", "line 1\nError: boom"),
    ]
    table = gc.markdown_table(results).splitlines()
    # a header, the separator, then one row per result in order
    assert table[:2] == ["| step | command | status | key figure | seconds |",
                         "|---|---|---|---|---|"]
    assert len(table) == 5
    # a "|" inside a cell is escaped, so every row has exactly the header's 5 cells
    assert table[2] == ("| nas.search | `python -m nas.search --out $OUT/a` | ok | "
                        "child loss 2.3 \\| reward 0.13 | 12.3 |")
    assert all(len(re.split(r"(?<!\\)\|", row)) == 7 for row in table)
    # a step that did not run has "-" seconds and its reason as key figure
    assert table[3] == "| NCCL probe | `torchrun x` | skipped | NCCL needs CUDA | - |"
    assert table[4].endswith("| failed (rc 1) | Error: boom | 3.0 |")


def test_report_keeps_the_log_tail_of_failed_steps_only():
    results = [gc.StepResult("ok step", "a", "ok", "fine", 1.0, "logs/a.log"),
               gc.StepResult("bad step", "b", "timeout (9 s)", "last", 9.0, "logs/b.log",
                             "tail line 1\ntail line 2")]
    text = gc.report(results, {"GPU": "H200", "torch": "2.14.1"})
    # the machine first, then the table, then one section per failed step with its tail
    assert text.index("- GPU: H200") < text.index("| step |") < text.index("### bad step")
    assert "### bad step: timeout (9 s) (`$OUT/logs/b.log`)" in text
    assert "```text\ntail line 1\ntail line 2\n```" in text
    assert "### ok step" not in text


# -- running steps --------------------------------------------------------------------------


def test_a_failed_step_is_recorded_with_its_log_tail_and_the_next_step_still_runs(tmp_path):
    deadline = gc.time.monotonic() + 60
    bad = _step("bad", _python("import sys; print('step one'); print('ValueError: x');"
                               "sys.exit(3)"))
    good = _step("good", _python("print('epoch 1/1: test acc 0.5000')"), note="tiny")
    first, second = (gc.run_step(s, tmp_path, deadline) for s in (bad, good))
    # the exit status, the last log line as figure, the log's lines as tail
    assert (first.status, first.figure) == ("failed (rc 3)", "ValueError: x")
    assert first.tail == "step one\nValueError: x"
    assert (tmp_path / first.log).read_text() == "step one\nValueError: x\n"
    # the next step ran, its key figure read from its log, the note appended
    assert (second.status, second.figure, second.tail) == ("ok", "test acc 0.5000; tiny", "")


def test_a_step_past_its_timeout_is_stopped_and_recorded(tmp_path):
    step = _step("sleeper", _python("import time; print('started', flush=True); "
                                    "time.sleep(60)"), timeout_s=1)
    result = gc.run_step(step, tmp_path, gc.time.monotonic() + 60)
    assert result.status == "timeout (1 s)"
    assert result.figure == "started"
    assert result.seconds < 20  # stopped, not waited for


def test_steps_are_skipped_with_their_reason_without_running(tmp_path):
    marker = tmp_path / "ran"
    touch = _python(f"open({str(marker)!r}, 'w')")
    later = gc.time.monotonic() + 60
    cases = [
        (_step("gpu only", touch, skip="NCCL needs CUDA"), later, "NCCL needs CUDA"),
        (_step("export", touch, needs=str(tmp_path / "stylize" / "model.pt")), later,
         "no $OUT/stylize/model.pt (an earlier step failed)"),
        (_step("late", touch), gc.time.monotonic() + 5, "out of the time budget (--budget)"),
    ]
    for step, deadline, reason in cases:
        result = gc.run_step(step, tmp_path, deadline)
        assert (result.status, result.figure, result.seconds) == ("skipped", reason, None)
    assert not marker.exists()


# -- key figures ----------------------------------------------------------------------------


def test_key_figures_are_read_from_the_logs_the_entry_points_write(tmp_path):
    bench = ("| (4, 256, 14, 14) | 0.73 | 1.61 |\n\n"
             "SN: median fwd+bwd ratio 0.79, eval ratio 2.26\n"
             "SSN: median fwd+bwd ratio 1.43, eval ratio 3.98\n")
    assert gc.bench_figure(bench, tmp_path) == "SN: median fwd+bwd ratio 0.79, eval ratio 2.26"
    ratio = "SN/BN time ratio: child step 1.21, controller step 1.07 (target <= 1.2)\n"
    assert gc.nas_ratio_figure(ratio, tmp_path) == "child step 1.21, controller step 1.07"
    search = ("x INFO nas.search_loop: epoch 1/2: child loss 2.4 | reward 0.1\n"
              "x INFO nas.search_loop: epoch 2/2: child loss 2.3 | reward 0.2\n")
    assert gc.epoch_figure(search, tmp_path) == "child loss 2.3 | reward 0.2"
    assert gc.ddp_figure(search + "NCCL INFO Bootstrap", tmp_path).endswith(
        "; NCCL initialized")
    stylize = ("2026-11-29 14:18:43 INFO stylize.loop: training 40 step(s): sn norm\n"
               "2026-11-29 14:19:01 INFO stylize.loop: model written to /o/model.pt\n")
    assert gc.stylize_figure(stylize, tmp_path) == "40 steps in 18 s (log clock)"
    (tmp_path / "stylize.pt2").write_bytes(b"\0" * 2_500_000)
    assert gc.file_figure("stylize.pt2")("", tmp_path) == "stylize.pt2: 2.50 MB"
    triton = ("  (2, 2048, 7, 7) bfloat16 NCHW: SN/BN fwd+bwd 1.20, eval 1.10 (ok: y 0)\n"
              "SN (Triton) / cuDNN BN: median fwd+bwd ratio 1.05 (max 1.31), eval ratio 1.10 "
              "(max 1.40)\n20 checks, 0 failed; 95 s\n")
    assert gc.triton_figure(triton, tmp_path) == (
        "median fwd+bwd ratio 1.05 (max 1.31), eval ratio 1.10 (max 1.40); "
        "20 checks, 0 failed; 95 s")


# -- the plan -------------------------------------------------------------------------------


def _by_name(steps):
    return {s.name: s for s in steps}


BENCH_HELP = "usage: python -m snexp.bench [-h] [--device DEVICE] [--no-compile]\n"


def test_the_gpu_plan_uses_cuda_bf16_compile_256px_sync_norm_and_nccl(tmp_path):
    steps = _by_name(gc.plan(tmp_path, INPUTS, cuda=True, tiny=False, bench_help=BENCH_HELP))
    assert list(steps) == ["bench fp32", "SN Triton kernels", "NAS SN/BN step ratio",
                           "nas.train",
                           "torchrun nas.train --sync-norm", "NCCL probe", "stylize.train",
                           "stylize.apply --export", "nas.search", "bench bf16"]
    assert not any(s.skip for s in steps.values())
    # every command runs on CUDA; the probe runs under torchrun and picks cuda:LOCAL_RANK
    assert all(" ".join(s.argv[s.argv.index("--device"):][:2]) == "--device cuda"
               for n, s in steps.items() if n != "NCCL probe")
    # the bench compiles by default: both dtypes keep their compiled rows
    assert steps["bench bf16"].argv[-2:] == ("--dtype", "bfloat16")
    assert not any("--no-compile" in s.argv for s in steps.values())
    search, stylize = steps["nas.search"].argv, steps["stylize.train"].argv
    assert "--compile" in search and search[search.index("--amp") + 1] == "bf16"
    assert stylize[stylize.index("--amp") + 1] == "bf16"
    assert stylize[stylize.index("--image-size") + 1] == "256"
    assert stylize[stylize.index("--vgg-weights") + 1] == "/x/vgg.pth"
    ddp = steps["torchrun nas.train --sync-norm"]
    assert "--nproc-per-node=1" in ddp.argv and "--sync-norm" in ddp.argv
    assert ddp.env == {"NCCL_DEBUG": "INFO"}


@pytest.mark.parametrize("help_text, cuda, extra, note", [
    # compiled rows by default: kept on CUDA, skipped on CPU (minutes of compiling)
    (BENCH_HELP, True, [], ""),
    (BENCH_HELP, False, ["--no-compile"], "CPU: --no-compile"),
    # an opt-in flag: asked for on CUDA only
    ("[-h] [--compile]", True, ["--compile"], ""),
    ("[-h] [--compile]", False, [], "CPU: eager only"),
    # neither: the table says the bench is eager only
    ("[-h] [--device DEVICE]", True, [], "this snexp.bench times no compiled runs: eager only"),
])
def test_the_bench_command_follows_the_compile_flags_snexp_bench_offers(help_text, cuda, extra,
                                                                        note):
    argv, got_note, compiled = gc.bench_argv(help_text, cuda=cuda, tiny=False)
    device = "cuda" if cuda else "cpu"
    assert argv == [sys.executable, "-m", "snexp.bench", "--device", device, *extra]
    assert got_note == note
    assert compiled == (cuda and "compile" in help_text)


def test_the_tiny_cpu_plan_skips_bf16_and_nccl_and_leaves_out_amp_and_compile(tmp_path):
    steps = _by_name(gc.plan(tmp_path, INPUTS, cuda=False, tiny=True, bench_help=BENCH_HELP))
    skipped = {n: s.skip for n, s in steps.items() if s.skip}
    assert skipped == {"bench bf16": "a GPU check: needs CUDA", "NCCL probe": "NCCL needs CUDA",
                       "SN Triton kernels": "needs CUDA (the tests run the kernels in Triton's "
                                            "interpreter)"}
    ran = [s for s in steps.values() if not s.skip]
    assert not any({"--amp", "--compile", "cuda"} & set(s.argv) for s in ran)
    assert "CPU: without --amp bf16 --compile" in steps["nas.search"].note
    # a missing style image (inputs not made) skips stylize.train with the reason
    broken = {"error": "inputs not made: OSError: disk full", "vgg_note": ""}
    steps = _by_name(gc.plan(tmp_path, broken, cuda=False, tiny=True, bench_help=""))
    assert steps["stylize.train"].skip == "inputs not made: OSError: disk full"


def test_the_probe_all_reduces_and_runs_sync_switchnorm_in_a_process_group(tmp_path):
    import torch.distributed as dist

    # gloo on CPU stands in for NCCL: the same calls, one rank
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0,
                            world_size=1)
    try:
        ok, summary = gc.probe_collectives(torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert ok
    assert summary == "1 rank(s): all_reduce ok, SyncSwitchNorm fwd+bwd finite"


# -- command line ---------------------------------------------------------------------------


def _refused(capsys, *args: str) -> str:
    """The message with which the check refuses ``args`` (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        gc.main(list(args))
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_a_used_output_folder_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    message = _refused(capsys, "--device", "cpu", "--tiny", "--out", str(tmp_path))
    assert "is not an empty folder" in message
    # nothing was written next to the user's file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cpu_without_tiny_is_refused(capsys):
    assert "add --tiny" in _refused(capsys, "--device", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_refused_where_there_is_none(tmp_path, capsys):
    assert "no CUDA device here" in _refused(capsys, "--out", str(tmp_path / "check"))
    assert not (tmp_path / "check").exists()


# -- end to end -----------------------------------------------------------------------------


def _set_keys(help_text: str) -> set[str]:
    return set(re.findall(r"^\s+([a-z_]+\.[a-z_.]+) = ", help_text, re.M))


@pytest.mark.slow
def test_every_flag_of_the_gpu_plan_is_one_its_entry_point_offers(tmp_path):
    bench_help = gc.read_help([sys.executable, "-m", "snexp.bench"])
    steps = gc.plan(tmp_path, INPUTS, cuda=True, tiny=False, bench_help=bench_help)
    helps: dict[tuple[str, ...], str] = {}
    for step in steps:
        argv = list(step.argv)
        if "torch.distributed.run" in argv:  # torchrun's own flags, then the program's
            argv = argv[argv.index("--nproc-per-node=1") + 1:]
            argv = [sys.executable, *argv]
        program = argv[:3] if argv[1] == "-m" else argv[:2]
        if tuple(program) not in helps:
            helps[tuple(program)] = gc.read_help(program)
        help_text = helps[tuple(program)]
        assert help_text, program
        flags = {a.split("=")[0] for a in argv if a.startswith("--")}
        assert flags <= gc.help_options(help_text), (step.name, flags - gc.help_options(
            help_text))
        keys = {argv[i + 1].split("=")[0] for i, a in enumerate(argv) if a == "--set"}
        assert keys <= _set_keys(help_text), (step.name, keys - _set_keys(help_text))


@pytest.mark.slow
def test_the_tiny_cpu_run_goes_through_every_step_and_writes_the_table(tmp_path):
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out",
                           str(out)], capture_output=True, text=True, timeout=1500)
    results = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    statuses = {n: r["status"] for n, r in results.items()}
    # every step ran and passed, except the two that need CUDA
    assert statuses == {"prepare inputs": "ok", "bench fp32": "ok", "bench bf16": "skipped",
                        "SN Triton kernels": "skipped",
                        "NAS SN/BN step ratio": "ok", "nas.train": "ok",
                        "torchrun nas.train --sync-norm": "ok", "NCCL probe": "skipped",
                        "stylize.train": "ok", "stylize.apply --export": "ok",
                        "nas.search": "ok"}, done.stdout[-3000:]
    assert done.returncode == 0
    # the outputs of the runs are in the one folder, and the table in its markdown report
    assert json.loads((out / "nas-train" / "result.json").read_text())["test_acc"] >= 0
    assert (out / "nas-train-ddp" / "result.json").is_file()
    assert (out / "stylize.pt2").stat().st_size > 0
    assert (out / "nas-search" / "best_arch.json").is_file()
    report = (out / "gpu_check.md").read_text()
    assert report.count("\n| ") == 1 + len(results)  # header + one row per step
    assert results["nas.train"]["figure"].startswith("test acc ")
    assert results["NAS SN/BN step ratio"]["figure"].startswith("child step ")
