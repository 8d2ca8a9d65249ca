"""The C++ CPU passes (snexp/norm/csrc): they build where a compiler exists, and agree with the
ATen ops that run the same equations everywhere else."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import snexp
from snexp.norm import _cpu

needs_compiler = pytest.mark.skipif(_cpu._compiler() is None, reason="no C++ compiler here")


@needs_compiler
def test_builds_where_a_compiler_exists():
    # a broken source must fail here, not pass as "no compiler" (strict raises the build error)
    assert _cpu.load(strict=True)
    assert hasattr(torch.ops.snexp_cpu, "in_stats")


@needs_compiler
def test_row_passes_by_hand():
    # in_stats: [mean; centered sum of squares / denom]; normalize: a (x - mu) + b; input_grad
    x = torch.tensor([[[1.0, 2.0, 3.0, 6.0]], [[-1.0, -1.0, 1.0, 1.0]]])  # (2, 1, 4)
    mu, ss = torch.ops.snexp_cpu.in_stats(x, 1)
    torch.testing.assert_close(mu, torch.tensor([[3.0], [0.0]]))
    torch.testing.assert_close(ss, torch.tensor([[14.0], [4.0]]))
    torch.testing.assert_close(torch.ops.snexp_cpu.in_stats(x, 2)[1], ss / 2)
    a, b = torch.tensor([2.0, 0.5]), torch.tensor([1.0, -1.0])
    y = torch.ops.snexp_cpu.normalize(x, mu.view(-1), a, b)
    torch.testing.assert_close(y[0, 0], torch.tensor([-3.0, -1.0, 1.0, 7.0]))
    dy = torch.ones_like(x)
    p, q = torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])
    dx = torch.ops.snexp_cpu.input_grad(x, dy, a, p, q)
    torch.testing.assert_close(dx[1, 0], torch.tensor([-0.5, -0.5, 3.5, 3.5]))


@needs_compiler
def test_row_passes_refuse_bad_tensors():
    # tensor checks, not silent garbage: a non-contiguous or half input is refused
    _cpu.load(strict=True)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.snexp_cpu.in_stats(torch.randn(4, 3, 5).transpose(0, 1), 1)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.snexp_cpu.in_stats(torch.randn(2, 3, 5).half(), 1)


@needs_compiler
@pytest.mark.parametrize("shape,candidates", [
    ((4, 8, 5, 5), ("in", "ln", "bn")), ((3, 8, 7), ("ln", "bn")), ((2, 8, 3, 3, 3), ("in", "bn")),
    ((5, 8, 4, 4), ("in", "ln", "gn4", "bn")),
])
def test_cpp_and_aten_paths_agree(shape, candidates, monkeypatch):
    # the same equations with and without the C++ passes: outputs, all gradients, buffers
    _cpu.load(strict=True)
    torch.manual_seed(0)
    dims = len(shape) - 2
    results = []
    for loaded in (True, False):
        monkeypatch.setitem(_cpu._state, "loaded", loaded)
        torch.manual_seed(1)
        layer = snexp.make_norm("sn", 8, dims=dims, candidates=candidates).double()
        with torch.no_grad():
            layer.mean_weight.normal_()
            layer.var_weight.normal_()
        x = (torch.randn(shape, dtype=torch.float64) * 3 + 5).requires_grad_()
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results.append([y, x.grad, layer.weight.grad, layer.mean_weight.grad,
                        layer.var_weight.grad, layer.running_var])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _stub_build(monkeypatch, tmp_path):
    # load() from scratch, with the build replaced by a recorder (no compiler run here)
    monkeypatch.setattr(_cpu, "_state", {})
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(_cpu, "_compiler", lambda: "c++")
    built = []

    def build(folder, name, verbose):
        built.append(folder)
        raise RuntimeError("stub build")

    monkeypatch.setattr(_cpu, "_build", build)
    return built


def test_planted_library_without_matching_hash_is_not_loaded(tmp_path, monkeypatch):
    # a library whose recorded sha256 differs (or is missing) is rebuilt, never loaded
    root = tmp_path / "ext"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    built = _stub_build(monkeypatch, tmp_path)
    name = _cpu._name()
    folder = root / name
    folder.mkdir(parents=True)
    (folder / f"{name}.so").write_bytes(b"planted")
    (folder / f"{name}.sha256").write_text("0" * 64)
    assert _cpu._verified(folder, name) is None
    with pytest.warns(UserWarning, match="stub build"):
        assert _cpu.load() is False
    assert built == [folder]
    # with the right hash (and private files) the library is the one to load
    (folder / f"{name}.sha256").write_text(_cpu._sha256(folder / f"{name}.so"))
    assert _cpu._verified(folder, name) == folder / f"{name}.so"


@pytest.mark.filterwarnings("ignore:snexp. building")
def test_folder_writable_by_others_is_refused_for_a_private_one(tmp_path, monkeypatch):
    # a shared, group-writable extension root: warn, build in ~/.cache/snexp instead
    root = tmp_path / "shared"
    root.mkdir()
    root.chmod(0o777)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(root))
    built = _stub_build(monkeypatch, tmp_path)
    name = _cpu._name()
    (root / name).mkdir()
    (root / name / f"{name}.so").write_bytes(b"planted")
    (root / name / f"{name}.sha256").write_text(_cpu._sha256(root / name / f"{name}.so"))
    assert _cpu._verified(root / name, name) is None  # right hash, but anyone could write it
    with pytest.warns(UserWarning, match="writable by group or others"):
        assert _cpu.load() is False
    private = tmp_path / "home" / ".cache" / "snexp" / "torch_extensions"
    assert built == [private / name]
    assert _cpu.unsafe(private) is None


_LOAD = """
import sys, warnings
warnings.simplefilter("error")
from snexp.norm import _cpu
print(_cpu.load(strict=True), "torch.utils.cpp_extension" in sys.modules)
"""


@needs_compiler
@pytest.mark.slow
def test_killed_build_and_leftover_lock_never_block_the_next_process(tmp_path):
    # SIGKILL during the first build, plus an old torch's leftover "lock" file: the next
    # process builds and loads; the one after loads directly (no cpp_extension, no warning),
    # all under umask 002 (the build must still leave files only their owner can write)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path))
    old_umask = os.umask(0o002)  # inherited by the three processes
    try:
        _killed_then_loaded(tmp_path, env)
    finally:
        os.umask(old_umask)


def _killed_then_loaded(tmp_path, env):
    first = subprocess.Popen([sys.executable, "-c", _LOAD], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = tmp_path / _cpu._name()
    deadline = time.monotonic() + 120
    while not (folder / "build.ninja").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # the compiler is running now
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    (folder / "lock").touch()
    second = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == ["True", "True"]
    third = subprocess.run([sys.executable, "-c", _LOAD], env=env, capture_output=True,
                           text=True, timeout=120)
    assert third.stdout.split() == ["True", "False"], third.stderr
    assert "CUDA_HOME" not in second.stderr + third.stderr


def test_folders_made_for_the_build_are_private_whatever_the_umask(tmp_path):
    # with umask 002 a plain mkdir is group-writable, which the next load would refuse
    old = os.umask(0o002)
    try:
        _cpu.make_private_dirs(tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert _cpu.unsafe(tmp_path / "a") is None and _cpu.unsafe(tmp_path / "a" / "b") is None


def test_cpu_backend_without_compiler_raises_every_time(tmp_path, monkeypatch):
    # SNEXP_BACKEND=cpu is a demand: no silent ATen fallback, not even on the second call
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    _stub_build(monkeypatch, tmp_path)
    monkeypatch.setattr(_cpu, "_compiler", lambda: None)
    monkeypatch.setenv("SNEXP_BACKEND", "cpu")
    for _ in range(2):
        with pytest.raises(RuntimeError, match="no C.. compiler"):
            _cpu.load()
