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
