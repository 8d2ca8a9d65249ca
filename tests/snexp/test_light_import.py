"""`import snexp` gives the layers without loading the experiment runtime's dependencies."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("optuna", "sqlalchemy", "tensorboard", "tqdm", "matplotlib", "snexp.runtime")

_PROBE = """
import sys
import torch, torchvision  # whatever these load themselves is not snexp's doing
before = set(sys.modules)
import snexp
layer = snexp.SwitchNorm2d(4)
snexp.make_norm("sn", 4)
snexp.importance(torch.nn.Sequential(layer))
new = set(sys.modules) - before
print(",".join(sorted(m for m in new if m.split(".")[0] in {h.split(".")[0] for h in HEAVY}
                      and (m in HEAVY or m.startswith(tuple(h + "." for h in HEAVY))))))
"""


def test_import_snexp_loads_no_runtime_dependency():
    # the layer API must not pull optuna, sqlalchemy, tensorboard, tqdm, matplotlib or the runtime
    out = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n" + _PROBE],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import snexp loaded: {out}"


def test_runtime_names_stay_reachable_from_snexp():
    # snexp.Run etc. predate snexp.runtime: they still resolve (lazily) to the runtime's objects
    import snexp
    import snexp.runtime

    assert snexp.Run is snexp.runtime.Run
    assert snexp.open_study is snexp.runtime.open_study
    assert snexp.load_checkpoint is snexp.runtime.load_checkpoint


_FIRST_CALL = """
import sys, torch
before = set(sys.modules)
import snexp
layer = snexp.SwitchNorm2d(4)
layer(torch.randn(2, 4, 3, 3)).sum().backward()
layer.eval()(torch.randn(2, 4, 3, 3))
print(",".join(sorted(m for m in set(sys.modules) - before
                      if m in ("torch._dynamo", "torch._inductor", "torch.utils.cpp_extension"))))
"""


def test_first_sn_call_imports_no_compiler_stack():
    # an eager SN step must not pull torch._dynamo (~1.5 s of CPU at start-up) or inductor; the
    # C++ passes, once built, load without cpp_extension (built here first if need be)
    from snexp.norm import _cpu

    _cpu.load()
    out = subprocess.run([sys.executable, "-c", _FIRST_CALL], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"the first SN call imported: {out.stdout.strip()}"
    assert "CUDA_HOME" not in out.stderr
