"""benchmarks/gpu_check.py and its rooms (step_runner, step_report, gpu_inputs, nccl_probe):
every step's command against its program's parser, the plan, running steps, the table; the CPU
dry run end to end (slow)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.run as torchrun

import snexp.runtime.config

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts import their helper modules by name
SCRIPT = REPO / "benchmarks" / "gpu_check.py"

import step_report as report  # noqa: E402
import step_runner as sr  # noqa: E402


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gc = _load(SCRIPT)
SPECS = {s.name: s for s in gc.STEPS}


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def _step(name: str, argv: tuple[str, ...], **kw):
    return sr.Step(name, argv, kw.pop("timeout_s", 30), kw.pop("figure", gc.epoch_figure), **kw)


# -- every command against its program's parser ---------------------------------------------


class _Parsed(BaseException):
    """Raised right after a program's parser accepted its command line (nothing else runs)."""


def _parse(monkeypatch, program: str, flags: list[str]):
    """Run ``program``'s ``main`` on ``flags`` up to the end of its parsing; what it parsed.

    A program on :func:`snexp.runtime.config.parse_args` is stopped after the whole config is
    resolved (``--set`` keys, types and bounds checked); any other after ``argparse``.
    """
    words = shlex.split(program)
    module = (importlib.import_module(words[1]) if words[0] == "-m" else
              sys.modules.get(Path(words[0]).stem) or _load(REPO / words[0]))
    config_parse = snexp.runtime.config.parse_args
    with monkeypatch.context() as m:
        if getattr(module, "parse_args", None) is config_parse:
            def stop_config(*args, **kwargs):
                raise _Parsed(config_parse(*args, **kwargs))
            m.setattr(module, "parse_args", stop_config)
        else:
            # --set keys are checked only by the config parser: a step must not pass them here
            assert "--set" not in flags, f"{program} takes --set but not through parse_args"
            real = argparse.ArgumentParser.parse_args

            def stop_argparse(self, args=None, namespace=None):
                _assert_spelled_out(self, flags)
                raise _Parsed(real(self, args, namespace))
            m.setattr(argparse.ArgumentParser, "parse_args", stop_argparse)
        m.setattr(sys, "argv", [words[-1], *flags])
        with pytest.raises(_Parsed) as parsed:
            module.main()
    return parsed.value.args[0]


def _assert_spelled_out(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Every ``--flag`` is one the parser defines, not an abbreviation argparse would take."""
    flags = [word.split("=")[0] for word in argv if word.startswith("--")]
    assert set(flags) <= set(parser._option_string_actions), (
        set(flags) - set(parser._option_string_actions))


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("tiny", [False, True], ids=["gpu", "tiny"])
def test_every_command_of_the_check_parses_with_its_programs_flags(monkeypatch, tmp_path, name,
                                                                   tiny):
    step = {s.name: s for s in gc.plan(tmp_path, tiny=tiny)}[name]
    spec = SPECS[name]
    if step.skip:
        assert (tiny, spec.tiny) == (True, None)
        return
    argv = list(step.argv[1:])
    if spec.launcher:  # torchrun's own flags, then the program and its flags
        assert argv[:2] == ["-m", "torch.distributed.run"]
        launcher = torchrun.get_args_parser()
        launched = launcher.parse_args(argv[2:])
        _assert_spelled_out(launcher, argv[2:len(argv) - len(launched.training_script_args)])
        argv = ["-m"] * launched.module + [launched.training_script,
                                           *launched.training_script_args]
    program = shlex.join(argv[:2] if argv[0] == "-m" else argv[:1])
    assert program == spec.program
    parsed = _parse(monkeypatch, program, argv[len(shlex.split(program)):])
    device = getattr(getattr(parsed, "runtime", parsed), "device", None)
    # every step that takes a device runs on the one its mode asks for
    assert device in (None, "cpu" if tiny else "cuda")


def test_the_gpu_commands_parse_to_the_sizes_and_precisions_the_check_means(monkeypatch,
                                                                            tmp_path):
    steps = {s.name: list(s.argv) for s in gc.plan(tmp_path, tiny=False)}

    def parse(name: str, start: int = 3):
        argv = steps[name]
        return _parse(monkeypatch, shlex.join(argv[1:start]), argv[start:])

    search, stylize = parse("nas.search"), parse("stylize.train")
    assert (search.runtime.amp, search.runtime.compile, search.train.steps_per_epoch) == (
        "bf16", True, 40)
    assert (stylize.runtime.amp, stylize.data.image_size, stylize.train.steps) == ("bf16", 256, 40)
    assert stylize.loss.vgg_weights == str(tmp_path / "inputs" / "vgg16.pth")
    train = parse("nas.train")
    assert (train.train.epochs, train.data.embedded_train) == (1, 4000)
    # the bf16 bench keeps the compiled SN/BN rows (no --no-compile)
    bench = parse("bench bf16")
    assert (bench.dtype, bench.no_compile) == ("bfloat16", False)


# -- the plan -------------------------------------------------------------------------------


def test_the_gpu_plan_uses_cuda_bf16_compile_256px_sync_norm_and_nccl(tmp_path):
    steps = {s.name: s for s in gc.plan(tmp_path, tiny=False)}
    assert list(steps) == ["prepare inputs", "bench fp32", "SN Triton kernels",
                           "NAS SN/BN step ratio", "nas.train",
                           "torchrun nas.train --sync-norm", "NCCL probe", "stylize.train",
                           "stylize.apply --export", "nas.search", "bench bf16"]
    assert not any(s.skip or s.note for s in steps.values())
    # every command that takes a device runs on CUDA
    assert all(" ".join(s.argv[s.argv.index("--device"):][:2]) == "--device cuda"
               for n, s in steps.items() if n != "prepare inputs")
    # the bench compiles by default: both dtypes keep their compiled rows; bf16 runs last
    assert steps["bench bf16"].argv[-2:] == ("--dtype", "bfloat16")
    assert not any("--no-compile" in s.argv for s in steps.values())
    search, stylize = steps["nas.search"].argv, steps["stylize.train"].argv
    assert "--compile" in search and search[search.index("--amp") + 1] == "bf16"
    assert stylize[stylize.index("--amp") + 1] == "bf16"
    assert stylize[stylize.index("--image-size") + 1] == "256"
    assert stylize[stylize.index("--vgg-weights") + 1] == str(tmp_path / "inputs" / "vgg16.pth")
    ddp = steps["torchrun nas.train --sync-norm"]
    assert ddp.argv[1:5] == ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1")
    assert "--sync-norm" in ddp.argv
    assert ddp.env == {"NCCL_DEBUG": "INFO"}
    assert steps["stylize.apply --export"].needs == str(tmp_path / "stylize" / "model.pt")


def test_the_tiny_cpu_plan_skips_bf16_and_triton_and_leaves_out_amp_and_compile(tmp_path):
    steps = {s.name: s for s in gc.plan(tmp_path, tiny=True)}
    skipped = {n: s.skip for n, s in steps.items() if s.skip}
    assert skipped == {"bench bf16": "a GPU check: needs CUDA",
                       "SN Triton kernels": "needs CUDA (the tests run the kernels in Triton's "
                                            "interpreter)"}
    ran = [s for s in steps.values() if not s.skip]
    assert not any({"--amp", "--compile", "cuda"} & set(s.argv) for s in ran)
    assert "CPU: without --amp bf16 --compile" in steps["nas.search"].note
    assert steps["NCCL probe"].note == "CPU: gloo in place of NCCL"
    assert steps["bench fp32"].argv[-1] == "--no-compile"
    # the dry run allows slow shared cores three times the GPU run's timeout
    assert steps["nas.train"].timeout_s == 3 * SPECS["nas.train"].timeout_s


def test_missing_inputs_skip_stylize_train_with_the_reason(tmp_path):
    stylize = {s.name: s for s in gc.plan(tmp_path, tiny=True)}["stylize.train"]
    result = sr.run_step(stylize, tmp_path, sr.time.monotonic() + 60)
    assert (result.status, result.figure) == (
        "skipped", "no $OUT/inputs/vgg16.pth (an earlier step failed)")


def test_the_plan_flag_prints_every_command_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gc.main(["--plan", "--device", "cpu", "--tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # one line per step: name, the dry run's timeout, the command with $OUT; skips say why
    assert [line.split(" (")[0] for line in lines] == list(SPECS)
    assert lines[0] == "prepare inputs (180 s): python benchmarks/gpu_inputs.py --out $OUT/inputs"
    assert lines[-1] == ("bench bf16 (900 s): python -m snexp.bench  "
                         "[skipped: a GPU check: needs CUDA]")
    assert "python -m stylize.apply --device cpu --model $OUT/stylize/model.pt --export " \
           "$OUT/stylize.pt2" in lines[8]
    assert list(tmp_path.iterdir()) == []
    # the GPU plan prints without a GPU (it runs nothing)
    assert gc.main(["--plan"]) == 0
    assert "python -m snexp.bench --device cuda --dtype bfloat16" in capsys.readouterr().out


# -- running steps --------------------------------------------------------------------------


def test_a_failed_step_is_recorded_with_its_log_tail_and_the_next_step_still_runs(tmp_path):
    deadline = sr.time.monotonic() + 60
    bad = _step("bad", _python("import sys; print('step one'); print('ValueError: x');"
                               "sys.exit(3)"))
    good = _step("good", _python("print('epoch 1/1: test acc 0.5000')"), note="tiny")
    first, second = sr.run_steps([bad, good], tmp_path, deadline)
    # the exit status, the last log line as figure, the log's lines as tail
    assert (first.status, first.figure) == ("failed (rc 3)", "ValueError: x")
    assert first.tail == "step one\nValueError: x"
    assert (tmp_path / first.log).read_text() == "step one\nValueError: x\n"
    # the next step ran, its key figure read from its log, the note appended
    assert (second.status, second.figure, second.tail) == ("ok", "test acc 0.5000; tiny", "")


def test_the_check_reports_a_failed_step_runs_the_rest_and_exits_1(tmp_path, monkeypatch):
    fake = [_step("broken", _python("raise SystemExit('no GPU kernel')")),
            _step("fine", _python("print('epoch 1/1: test acc 0.9')")),
            _step("gpu only", _python("0"), skip="a GPU check: needs CUDA")]
    monkeypatch.setattr(gc, "plan", lambda out, tiny: fake)
    out = tmp_path / "check"
    assert gc.main(["--device", "cpu", "--tiny", "--out", str(out)]) == 1
    results = json.loads((out / "results.json").read_text())
    assert [(r["name"], r["status"], r["figure"]) for r in results] == [
        ("broken", "failed (rc 1)", "no GPU kernel"), ("fine", "ok", "test acc 0.9"),
        ("gpu only", "skipped", "a GPU check: needs CUDA")]
    text = (out / "gpu_check.md").read_text()
    assert text.startswith("# GPU check (`python benchmarks/gpu_check.py`)\n")
    assert "### broken: failed (rc 1) (`$OUT/logs/broken.log`)" in text
    assert re.search(r"^\| fine \| `python -c .*` \| ok \| test acc 0\.9 \| [\d.]+ \|$", text,
                     re.M)


def test_a_step_past_its_timeout_is_stopped_and_recorded(tmp_path):
    step = _step("sleeper", _python("import time; print('started', flush=True); "
                                    "time.sleep(60)"), timeout_s=1)
    result = sr.run_step(step, tmp_path, sr.time.monotonic() + 60)
    assert result.status == "timeout (1 s)"
    assert result.figure == "started"
    assert result.seconds < 20  # stopped, not waited for


def test_steps_are_skipped_with_their_reason_without_running(tmp_path):
    marker = tmp_path / "ran"
    touch = _python(f"open({str(marker)!r}, 'w')")
    later = sr.time.monotonic() + 60
    cases = [
        (_step("gpu only", touch, skip="NCCL needs CUDA"), later, "NCCL needs CUDA"),
        (_step("export", touch, needs=str(tmp_path / "stylize" / "model.pt")), later,
         "no $OUT/stylize/model.pt (an earlier step failed)"),
        (_step("late", touch), sr.time.monotonic() + 5, "out of the time budget (--budget)"),
    ]
    for step, deadline, reason in cases:
        result = sr.run_step(step, tmp_path, deadline)
        assert (result.status, result.figure, result.seconds) == ("skipped", reason, None)
    assert not marker.exists()


# -- the table ------------------------------------------------------------------------------


def test_table_has_one_row_per_step_with_escaped_cells_and_dash_for_steps_not_run():
    results = [
        sr.StepResult("nas.search", "python -m nas.search --out $OUT/a", "ok",
                      "child loss 2.3 | reward 0.13", 12.345, "logs/nas.search.log"),
        sr.StepResult("NCCL probe", "torchrun x", "skipped", "NCCL needs CUDA", None),
        sr.StepResult("bench", "python -m snexp.bench", "failed (rc 1)", "Error: boom", 3.0,
                      "logs/bench.log", "line 1\nError: boom"),
    ]
    table = report.markdown_table(results).splitlines()
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
    results = [sr.StepResult("ok step", "a", "ok", "fine", 1.0, "logs/a.log"),
               sr.StepResult("bad step", "b", "timeout (9 s)", "last", 9.0, "logs/b.log",
                             "tail line 1\ntail line 2")]
    text = report.report(results, {"GPU": "H200", "torch": "2.14.1"}, "GPU check")
    # the title, the machine, then the table, then one section per failed step with its tail
    assert text.startswith("# GPU check\n")
    assert text.index("- GPU: H200") < text.index("| step |") < text.index("### bad step")
    assert "### bad step: timeout (9 s) (`$OUT/logs/b.log`)" in text
    assert "```text\ntail line 1\ntail line 2\n```" in text
    assert "### ok step" not in text


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
    stylize = ("2026-11-29 14:18:43 INFO stylize.train_loop: training 40 step(s): sn norm\n"
               "2026-11-29 14:19:01 INFO stylize.train_loop: model written to /o/model.pt\n")
    assert gc.stylize_figure(stylize, tmp_path) == "40 steps in 18 s (log clock)"
    (tmp_path / "stylize.pt2").write_bytes(b"\0" * 2_500_000)
    assert sr.file_size("stylize.pt2")("", tmp_path) == "stylize.pt2: 2.50 MB"
    triton = ("  (2, 2048, 7, 7) bfloat16 NCHW: SN/BN fwd+bwd 1.20, eval 1.10 (ok: y 0)\n"
              "SN (Triton) / cuDNN BN: median fwd+bwd ratio 1.05 (max 1.31), eval ratio 1.10 "
              "(max 1.40)\n20 checks, 0 failed; 95 s\n")
    assert gc.triton_figure(triton, tmp_path) == (
        "median fwd+bwd ratio 1.05 (max 1.31), eval ratio 1.10 (max 1.40); "
        "20 checks, 0 failed; 95 s")
    probe = "NCCL INFO x\nNCCL probe: NCCL 2.21.5, 1 rank(s): all_reduce ok, ...\n"
    assert SPECS["NCCL probe"].figure(probe, tmp_path) == (
        "NCCL 2.21.5, 1 rank(s): all_reduce ok, ...")


# -- the rooms of moved steps: inputs and the probe -----------------------------------------


def test_the_inputs_are_a_style_image_and_vgg16_weights_stylize_loads(tmp_path, monkeypatch,
                                                                      capsys):
    from PIL import Image

    from stylize.loss import load_vgg16

    inputs = sys.modules.get("gpu_inputs") or _load(REPO / "benchmarks" / "gpu_inputs.py")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torchvision cache
    assert inputs.main(["--out", str(tmp_path / "in")]) == 0
    assert capsys.readouterr().out.startswith("inputs: random VGG16 weights (none in ")
    assert Image.open(tmp_path / "in" / "style.png").size == (256, 256)
    # stylize's loader takes them (with a warning: not torchvision's file)
    assert len(load_vgg16(tmp_path / "in" / "vgg16.pth").slices) == 4
    # a cached file is linked, not copied
    cached = tmp_path / "torch" / "hub" / "checkpoints" / inputs.VGG16_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert inputs.main(["--out", str(tmp_path / "in2")]) == 0
    assert (tmp_path / "in2" / "vgg16.pth").resolve() == cached
    assert capsys.readouterr().out == f"inputs: VGG16: {cached}\n"


def test_the_probe_all_reduces_and_runs_sync_switchnorm_in_a_process_group(tmp_path):
    import torch.distributed as dist

    probe = sys.modules.get("nccl_probe") or _load(REPO / "benchmarks" / "nccl_probe.py")
    # gloo on CPU stands in for NCCL: the same calls, one rank
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rdzv'}", rank=0,
                            world_size=1)
    try:
        ok, summary = probe.probe_collectives(torch.device("cpu"))
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


def test_cpu_without_tiny_and_tiny_on_cuda_are_refused(capsys):
    assert "add --tiny" in _refused(capsys, "--device", "cpu")
    assert "--tiny is the CPU dry run" in _refused(capsys, "--tiny")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_refused_where_there_is_none(tmp_path, capsys):
    assert "no CUDA device here" in _refused(capsys, "--out", str(tmp_path / "check"))
    assert not (tmp_path / "check").exists()


# -- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_the_tiny_cpu_run_goes_through_every_step_and_writes_the_table(tmp_path):
    out = tmp_path / "check"
    # the benchmark scripts import the project: from the install, or from this checkout
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out",
                           str(out)], capture_output=True, text=True, timeout=1500, env=env)
    results = {r["name"]: r for r in json.loads((out / "results.json").read_text())}
    statuses = {n: r["status"] for n, r in results.items()}
    # every step ran and passed, except the two that need CUDA
    assert statuses == {"prepare inputs": "ok", "bench fp32": "ok", "bench bf16": "skipped",
                        "SN Triton kernels": "skipped",
                        "NAS SN/BN step ratio": "ok", "nas.train": "ok",
                        "torchrun nas.train --sync-norm": "ok", "NCCL probe": "ok",
                        "stylize.train": "ok", "stylize.apply --export": "ok",
                        "nas.search": "ok"}, done.stdout[-3000:]
    assert done.returncode == 0
    # the outputs of the runs are in the one folder, and the table in its markdown report
    assert json.loads((out / "nas-train" / "result.json").read_text())["test_acc"] >= 0
    assert (out / "nas-train-ddp" / "result.json").is_file()
    assert (out / "stylize.pt2").stat().st_size > 0
    assert (out / "nas-search" / "best_arch.json").is_file()
    assert json.loads((out / "nccl_probe.json").read_text())["ok"] is True
    report_text = (out / "gpu_check.md").read_text()
    assert report_text.count("\n| ") == 1 + len(results)  # header + one row per step
    assert results["nas.train"]["figure"].startswith("test acc ")
    assert results["NAS SN/BN step ratio"]["figure"].startswith("child step ")
    assert results["NCCL probe"]["figure"] == (
        "gloo, 1 rank(s): all_reduce ok, SyncSwitchNorm fwd+bwd finite; "
        "CPU: gloo in place of NCCL")
