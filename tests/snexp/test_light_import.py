"""`import snexp` gives the layers without the runtime's dependencies; each entry point loads
only what its job needs (no optuna where no study is opened)."""

from __future__ import annotations

import functools
import importlib
import json
import subprocess
import sys

import pytest

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


# ----------------------------------------------------------------------------- entry points

_CLOSURE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
project = sorted(name for name, module in list(sys.modules.items())
                 if name.split(".")[0] in ("snexp", "nas", "stylize")
                 and getattr(module, "__file__", None))
print(json.dumps({"project": project, "modules": sorted(sys.modules)}))
"""


@functools.cache
def _closure(module: str) -> tuple[list[str], frozenset[str]]:
    """The project modules (those with a file) and all modules that importing ``module`` loads."""
    out = subprocess.run([sys.executable, "-c", _CLOSURE, module], capture_output=True,
                         text=True, check=True).stdout
    found = json.loads(out)
    return found["project"], frozenset(found["modules"])


def _loaded(modules: frozenset[str], *names: str) -> list[str]:
    return sorted(n for n in names if n in modules or any(m.startswith(n + ".") for m in modules))


@pytest.mark.parametrize("module", ["stylize.apply", "stylize.train", "stylize.export",
                                    "nas.train", "snexp.runtime", "snexp.runtime.run",
                                    "snexp.runtime.track"])
def test_what_opens_no_study_imports_no_optuna(module):
    # Rule: only a study's users (nas.search, stylize.tune) pay for optuna and sqlalchemy.
    _, modules = _closure(module)
    assert _loaded(modules, "optuna", "sqlalchemy", "snexp.runtime.study",
                   "snexp.runtime.storage") == []


def test_retraining_does_not_import_the_search():
    # python -m nas.train retrains one architecture: no search loop, no proposers.
    _, modules = _closure("nas.train")
    assert _loaded(modules, "nas.search_loop", "nas.proposers", "nas.broadcast_proposer") == []


def test_applying_a_model_imports_no_training_machinery():
    # python -m stylize.apply loads a saved model and runs it: no run directory, tracker, loss
    # network or ONNX exporter, and fewer than 35 project modules in all.
    project, modules = _closure("stylize.apply")
    assert _loaded(modules, "snexp.runtime.run", "snexp.runtime.track", "stylize.loss",
                   "stylize.train_loop", "stylize.export", "tensorboard") == []
    assert len(project) < 35, f"{len(project)} project modules: {project}"


def test_package_faces_import_nothing_eagerly():
    # The faces of snexp.runtime, nas and stylize load no submodule until a name is asked for.
    for face in ("snexp.runtime", "nas", "stylize"):
        project, _ = _closure(face)
        own = [m for m in project if m.startswith(face + ".")]
        assert own == [], f"import {face} loaded {own}"


@pytest.mark.parametrize("face", ["snexp.runtime", "nas", "stylize"])
def test_every_public_name_of_a_face_resolves_to_its_module(face):
    # Each name in __all__ is the object its defining submodule holds, as before the lazy faces.
    package = importlib.import_module(face)
    for name, where in package._EXPORTS.items():
        assert name in package.__all__ and name in dir(package)
        assert getattr(package, name) is getattr(importlib.import_module(f"{face}.{where}"), name)
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        getattr(package, "nothing")


def test_study_names_stay_importable_from_the_runtime_face():
    # from snexp.runtime import open_study (the README's spelling) is snexp.runtime.study's.
    from snexp.runtime import WorkerSeededSampler, distributed, open_study
    from snexp.runtime import study as study_module

    assert open_study is study_module.open_study
    assert WorkerSeededSampler is study_module.WorkerSeededSampler
    assert distributed.__name__ == "snexp.runtime.distributed"
