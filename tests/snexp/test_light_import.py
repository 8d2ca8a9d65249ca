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


_NO_BACK_DOOR = """
import sys
import snexp
try:
    snexp.Run
except AttributeError as e:
    print("AttributeError:", e)
print(sorted(m for m in sys.modules if m == "snexp.runtime" or m.startswith("snexp.runtime.")))
"""


def test_snexp_has_no_back_door_to_the_runtime():
    # the runtime is imported from snexp.runtime only: snexp.Run is no name of the layer API,
    # and asking for it loads nothing of snexp.runtime
    out = subprocess.run([sys.executable, "-c", _NO_BACK_DOOR], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["AttributeError: module 'snexp' has no attribute 'Run'", "[]"]


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
