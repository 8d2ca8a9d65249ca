"""Tests of snexp.runtime.config: layering, typed parsing, TOML round trips and every user-facing
error."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from snexp.runtime.config import (
    CONFIG_FILE,
    ConfigError,
    Range,
    RuntimeConfig,
    build_parser,
    cli_errors,
    flatten,
    load_config,
    override,
    parse_args,
    resolve_config,
    to_toml,
)

REPO = Path(__file__).resolve().parents[3]


@dataclass(frozen=True)
class Train:
    """Optimizer settings."""

    lr: float = 0.1  # initial learning rate
    epochs: int = 3  # passes over the data
    limit: int | None = None  # cap on training images (none: all)


@dataclass(frozen=True)
class Cfg:
    """A small experiment config."""

    train: Train = field(default_factory=Train)
    norm: Literal["sn", "bn", "in"] = "sn"  # normalizer kind
    styles: tuple[str, ...] = ()  # style images
    name: str = "demo"  # free text
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)


FLAGS = {"--lr": "train.lr", "--epochs": "train.epochs", "--norm": "norm", "--style": "styles"}


def parse(argv: list[str], **kwargs) -> Cfg:
    return parse_args(Cfg, argv, prog="exp", flags=FLAGS, **kwargs)


@pytest.fixture
def preset(tmp_path: Path) -> Path:
    path = tmp_path / "quick.toml"
    path.write_text('norm = "bn"\n[train]\nlr = 0.2\nepochs = 4\n')
    return path


# ----------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("layers", "lr", "epochs", "norm"),
    [
        ([], 0.1, 3, "sn"),  # defaults
        (["file"], 0.2, 4, "bn"),  # the file overrides defaults
        (["file", "flag"], 0.3, 4, "bn"),  # a flag overrides the file, other keys stay
        (["file", "flag", "set"], 0.4, 4, "bn"),  # --set overrides the flag
        (["set", "flag", "file"], 0.4, 4, "bn"),  # order on the command line does not matter
    ],
)
def test_precedence_defaults_file_flags_set(preset, layers, lr, epochs, norm):
    args = {
        "file": ["--config", str(preset)],
        "flag": ["--lr", "0.3"],
        "set": ["--set", "train.lr=0.4"],
    }
    cfg = parse([a for layer in layers for a in args[layer]])
    # Each layer wins over the ones below it, key by key.
    assert (cfg.train.lr, cfg.train.epochs, cfg.norm) == (lr, epochs, norm)


def test_later_config_file_wins(tmp_path, preset):
    extra = tmp_path / "extra.toml"
    extra.write_text("[train]\nepochs = 9\n")
    cfg = parse(["--config", str(preset), "--config", str(extra)])
    # The second file changes only what it names.
    assert (cfg.train.lr, cfg.train.epochs, cfg.norm) == (0.2, 9, "bn")


def test_presets_by_name_and_default_config(preset):
    # A bare name is looked up in the presets folder; default_config applies without --config.
    assert parse(["--config", "quick"], presets=preset.parent).train.lr == 0.2
    assert parse([], presets=preset.parent, default_config="quick").norm == "bn"
    assert parse(["--set", "norm=in"], presets=preset.parent, default_config="quick").norm == "in"


def test_typed_values_from_the_command_line():
    cfg = parse(
        [
            "--style",
            "a.jpg",
            "--style",
            "b,c.jpg",
            "--compile",
            "--seed",
            "7",
            "--set",
            "train.limit=100",
            "--amp",
            "bf16",
            "--out",
            "runs/x",
        ]
    )
    # A repeated flag collects a tuple (commas inside one value are kept).
    assert cfg.styles == ("a.jpg", "b,c.jpg")
    assert (cfg.runtime.compile, cfg.runtime.seed, cfg.runtime.amp) == (True, 7, "bf16")
    assert (cfg.train.limit, cfg.runtime.out) == (100, "runs/x")
    # --set takes comma lists and TOML arrays; "none" clears an optional field.
    assert parse(["--set", "styles=x.png, y.png"]).styles == ("x.png", "y.png")
    assert parse(["--set", 'styles=["p,q.png"]']).styles == ("p,q.png",)
    assert parse(["--set", "styles="]).styles == ()
    assert parse(["--set", "train.limit=100", "--set", "train.limit=none"]).train.limit is None


def test_bool_flag_turns_a_file_setting_off(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[runtime]\ndeterministic = true\n")
    assert parse(["--config", str(path)]).runtime.deterministic is True
    # --no-x overrides a file's true, --set accepts yes/no words.
    assert parse(["--config", str(path), "--no-deterministic"]).runtime.deterministic is False
    assert parse(["--set", "runtime.deterministic=yes"]).runtime.deterministic is True


def test_resume_starts_from_the_saved_config(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    saved = Cfg(train=Train(lr=0.25, epochs=5), norm="in")
    (out / CONFIG_FILE).write_text(to_toml(saved))
    cfg = parse(["--out", str(out), "--resume", "--epochs", "8"])
    # The saved run's settings come back; the flags given now sit on top.
    assert (cfg.train.lr, cfg.train.epochs, cfg.norm) == (0.25, 8, "in")
    assert cfg.runtime.resume is True


def test_resume_does_not_apply_the_default_preset(tmp_path, preset):
    out = tmp_path / "run"
    out.mkdir()
    (out / CONFIG_FILE).write_text(to_toml(Cfg(train=Train(lr=0.25), norm="in")))
    argv = ["--out", str(out), "--resume"]
    cfg = parse(argv, presets=preset.parent, default_config="quick")
    # The run's saved settings stand in for the default preset (which sets norm = "bn").
    assert (cfg.train.lr, cfg.train.epochs, cfg.norm) == (0.25, 3, "in")
    # An explicit --config still applies on top (and Run then judges the difference).
    assert parse([*argv, "--config", "quick"], presets=preset.parent).norm == "bn"


# ----------------------------------------------------------------------------- errors


def _error(argv: list[str], **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        parse(argv, **kwargs)
    return str(info.value)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["--set", "train.lrr=0.1"],
            "--set train.lrr=0.1: unknown key 'train.lrr'; did you mean 'train.lr'?",
        ),
        (["--set", "lr=0.1"], "--set lr=0.1: unknown key 'lr'; did you mean 'train.lr'?"),
        (["--set", "zzz=1"], "--set zzz=1: unknown key 'zzz' (--help lists every key)"),
        (["--epochs", "ten"], "--epochs: train.epochs expects an integer, got 'ten'"),
        (["--lr", "fast"], "--lr: train.lr expects a number, got 'fast'"),
        (
            ["--set", "runtime.compile=maybe"],
            "--set runtime.compile=maybe: runtime.compile expects true or false, got 'maybe'",
        ),
        (
            ["--set", "train.limit=lots"],
            "--set train.limit=lots: train.limit expects an integer or none, got 'lots'",
        ),
        (
            ["--amp", "fp8"],
            "--amp: 'fp8' is not a valid value for runtime.amp; choose from off, bf16, fp16; "
            "did you mean 'fp16'?",
        ),
        (
            ["--norm", "SN"],
            "--norm: 'SN' is not a valid value for norm; choose from sn, bn, in; "
            "did you mean 'sn'?",
        ),
        (
            ["--set", "train=1"],
            "--set train=1: 'train' is a section; set its keys one by one, e.g. 'train.lr=...'",
        ),
        (
            ["--set", "norm.kind=sn"],
            "--set norm.kind=sn: 'norm' is a value, not a section, so 'norm.kind' does not exist",
        ),
        (["--set", "train.lr"], "--set 'train.lr': expected KEY=VALUE, e.g. --set train.lr=0.1"),
        (
            ["--checkpoint-every", "-1"],
            "invalid value in [runtime]: checkpoint_every must be >= 0, got -1",
        ),
        (
            ["--device", "tpu"],
            "invalid value in [runtime]: device must be auto, cpu, cuda, cuda:N or mps, got 'tpu'",
        ),
        (
            ["--resume", "--overwrite"],
            "invalid value in [runtime]: resume and overwrite exclude each other: pick one",
        ),
    ],
)
def test_command_line_mistakes_name_key_value_and_fix(argv, expected):
    # The message names where the value came from, the key, the bad value and what is allowed.
    assert _error(argv) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[train]\nlrr = 0.1\n", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
        ('[train]\nepochs = "3"\n', "train.epochs expects an integer, got '3' (a string)"),
        ("[train]\nepochs = 2.5\n", "train.epochs expects an integer, got 2.5 (a number)"),
        ("norm = 'gn'\n", "'gn' is not a valid value for norm; choose from sn, bn, in"),
        ("styles = 'a.jpg'\n", "styles expects a list of strings, got 'a.jpg' (a string)"),
        ("[train]\nlr = [1]\n", "train.lr expects a number, got [1] (a list)"),
        ("train = 3\n", "'train' is a section; set its keys one by one"),
        ("[train\nlr = 1\n", "not valid TOML: Expected ']' at the end of a table declaration"),
    ],
)
def test_config_file_mistakes_name_the_file(tmp_path, text, expected):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    message = _error(["--config", str(path)])
    # The file is named first, then the problem.
    assert message.startswith(f"{path}: ") and expected in message


def test_missing_config_file_suggests_close_names(preset):
    message = _error(["--config", str(preset.parent / "quik.toml")])
    # A typo in the file name is caught and the close match offered.
    assert message == (
        f"config file '{preset.parent / 'quik.toml'}' not found; "
        f"did you mean '{preset.parent / 'quick.toml'}'?"
    )
    message = _error(["--config", "nosuch"], presets=preset.parent)
    # A preset name that does not exist lists the presets that do.
    assert message.endswith("not found (files there: quick.toml)")


def test_unknown_flag_suggests_the_close_one(capsys):
    with pytest.raises(SystemExit) as info:
        parse(["--epoch", "3"])
    # argparse's own refusal gets a suggestion too, and no abbreviation is silently accepted.
    assert info.value.code == 2
    assert "unrecognized arguments: --epoch 3 (did you mean --epochs?)" in capsys.readouterr().err


def test_cli_errors_print_one_paragraph_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info, cli_errors("exp"):
        parse(["--set", "train.lrr=1"])
    err = capsys.readouterr().err
    # Exit status 2, one paragraph on stderr, no traceback.
    assert info.value.code == 2
    assert " ".join(err.split()) == (
        "exp: error: --set train.lrr=1: unknown key 'train.lrr'; did you mean 'train.lr'?"
    )
    assert "Traceback" not in err and "\n\n" not in err


def test_cli_errors_let_real_bugs_raise():
    # Only user mistakes are turned into messages; a bug keeps its traceback.
    with pytest.raises(ZeroDivisionError), cli_errors("exp"):
        _ = 1 / 0


def test_entry_point_process_exits_2_without_traceback():
    toy_dir = str(REPO / "tests/snexp/runtime")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), toy_dir])}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests/snexp/runtime/runtime_toy.py"), "--set", "train.lrr=1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    # A real process: status 2, the message, nothing else.
    assert proc.returncode == 2
    assert " ".join(proc.stderr.split()) == (
        "toy: error: --set train.lrr=1: unknown key 'train.lrr'; did you mean 'train.lr'?"
    )


# ----------------------------------------------------------------------------- TOML, helpers


@dataclass(frozen=True)
class Tricky:
    text: str = 'quote " back \\ tab \t newline \n del \x7f unicode é 😀'  # hard to escape
    small: float = 1e-4  # a float repr with an exponent
    big: float = 1e10  # a float repr ending in .0
    inf: Annotated[float, Range(finite=False)] = float("-inf")  # infinities are TOML floats
    nan: Annotated[float, Range(finite=False)] = float("nan")  # so is nan
    count: int = -3  # an integer
    flag: bool = True  # a boolean
    maybe: str | None = None  # None is written as "none"
    items: tuple[int, ...] = (1, 2, 3)  # an array
    inner: Train = field(default_factory=lambda: Train(lr=0.5, limit=7))  # a table


def test_toml_round_trip_of_every_supported_type(tmp_path):
    cfg = Tricky()
    text = to_toml(cfg, header="written by a test\nsecond line")
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    back = load_config(Tricky, path)
    # What is written is valid TOML and reads back to the same values.
    assert tomllib.loads(text)["inner"]["lr"] == 0.5
    assert math.isnan(back.nan)
    assert flatten(back) | {"nan": 0} == flatten(cfg) | {"nan": 0}
    assert text.startswith("# written by a test\n# second line\n")


def test_toml_lines_carry_the_field_comments():
    text = to_toml(Cfg())
    # Each key is followed by its field comment, sections are tables.
    assert 'norm = "sn"  # normalizer kind' in text
    assert "[train]\nlr = 0.1  # initial learning rate" in text
    assert 'limit = "none"  # cap on training images (none: all)' in text


def test_nested_default_factory_is_respected():
    @dataclass(frozen=True)
    class Outer:
        inner: Train = field(default_factory=lambda: Train(lr=0.5))

    # A parent's customized section default survives an override of a sibling key.
    assert resolve_config(Outer, sets=["inner.epochs=9"]).inner == Train(lr=0.5, epochs=9)


def test_override_is_typed_and_validated():
    cfg = override(Cfg(), {"train.lr": 1, "norm": "bn"})
    # Integers widen to float fields; strings must be valid choices.
    assert (cfg.train.lr, cfg.norm) == (1.0, "bn")
    with pytest.raises(ConfigError, match="'gn' is not a valid value for norm"):
        override(Cfg(), {"norm": "gn"})


def test_help_lists_every_flag_with_default_and_set_key():
    text = build_parser(Cfg, prog="exp", flags=FLAGS).format_help()
    # Everyday and runtime flags show their default and their --set equivalent.
    assert (
        "--epochs N" in text
        and "passes over the data (default: 3; --set train.epochs=...)" in (" ".join(text.split()))
    )
    assert "--amp {off,bf16,fp16}" in text and "--no-compile" in text
    # The epilog lists every key for --set.
    assert '  train.limit = "none"\n' in text and "  runtime.seed = 0\n" in text


def test_help_shows_the_default_presets_values(preset, capsys):
    # --help shows what a run without --config gets: the default preset's epochs, not the
    # dataclass's
    with pytest.raises(SystemExit):
        parse(["--help"], presets=preset.parent, default_config="quick")
    text = " ".join(capsys.readouterr().out.split())
    assert "passes over the data (default: 4; --set train.epochs=...)" in text
    assert "train.lr = 0.2" in text and 'norm = "bn"' in text


@dataclass(frozen=True)
class _Mix:
    mix: tuple[float, ...] = ()  # weights
    files: tuple[str, ...] = ()  # names that may hold commas


def test_repeatable_number_flags_take_comma_lists():
    # --mix 0.3,0.7 and --mix 0.3 --mix 0.7 are the same; text items are never split.
    flags = {"--mix": "mix", "--file": "files"}
    assert parse_args(_Mix, ["--mix", "0.3,0.7"], flags=flags).mix == (0.3, 0.7)
    assert parse_args(_Mix, ["--mix", "0.3", "--mix", "0.7"], flags=flags).mix == (0.3, 0.7)
    assert parse_args(_Mix, ["--file", "a,b.jpg"], flags=flags).files == ("a,b.jpg",)


# ---------------------------------------------------------------- text values, old keys

from typing import Any, ClassVar  # noqa: E402

from snexp import NormSpec  # noqa: E402


@dataclass(frozen=True)
class _NormSection:
    norm: NormSpec = NormSpec("sn")  # the normalizer
    # renamed out: an old file's `momentum` is folded into `norm`
    LEGACY_KEYS: ClassVar[dict[str, Any]] = {"momentum": float}

    @classmethod
    def upgrade_legacy(cls, fields: dict, old: dict) -> dict:
        norm = fields["norm"]
        return {"norm": NormSpec(norm.kind, dict(norm.options), momentum=old["momentum"])}


@dataclass(frozen=True)
class _NormRoot:
    child: _NormSection = field(default_factory=_NormSection)
    arms: tuple[NormSpec, ...] = (NormSpec("bn"),)  # several specs


def test_text_value_field_parses_from_flags_and_toml_and_writes_its_text(tmp_path):
    # a NormSpec field reads from --set text and from a TOML string, and to_toml writes its text
    cfg = resolve_config(_NormRoot, sets=["child.norm=sn(prior=bn:4, momentum=0.01)",
                                          "arms=bn, sn(candidates=ln+bn, momentum=0.2)"])
    assert cfg.child.norm == NormSpec("sn", prior="bn:4", momentum=0.01)
    assert cfg.arms == (NormSpec("bn"), NormSpec("sn", candidates=("ln", "bn"), momentum=0.2))
    text = to_toml(cfg)
    assert 'norm = "sn(momentum=0.01, prior=bn:4)"' in text
    (tmp_path / "c.toml").write_text(text)
    assert load_config(_NormRoot, tmp_path / "c.toml") == cfg


def test_bad_text_value_names_the_key():
    # a spec that does not parse is a ConfigError naming the key and the spec
    with pytest.raises(ConfigError, match=r"child\.norm.*sn\(momentum"):
        resolve_config(_NormRoot, sets=["child.norm=sn(momentum"])


def test_old_keys_are_folded_in_by_the_section(tmp_path):
    # a file written before `momentum` moved into `norm` still loads, in any key order
    (tmp_path / "old.toml").write_text('[child]\nmomentum = 0.03\nnorm = "bn"\n')
    cfg = load_config(_NormRoot, tmp_path / "old.toml")
    assert cfg.child.norm == NormSpec("bn", momentum=0.03)
    assert "LEGACY" not in to_toml(cfg) and "\nmomentum" not in to_toml(cfg)
    # an old key with the wrong type is refused with its name
    with pytest.raises(ConfigError, match=r"child\.momentum"):
        resolve_config(_NormRoot, sets=["child.momentum=fast"])
    # an old key on top of a given config keeps that config's norm kind
    assert override(cfg, {"child.momentum": 0.5}).child.norm == NormSpec("bn", momentum=0.5)


def test_old_keys_of_a_file_lose_to_a_later_setting(tmp_path):
    # an old file's momentum is folded at the end of that file; a later --set of the whole norm
    # replaces it, as a later setting replaces any earlier one
    (tmp_path / "old.toml").write_text('[child]\nmomentum = 0.03\nnorm = "bn"\n')
    cfg = resolve_config(_NormRoot, files=[tmp_path / "old.toml"], sets=["child.norm=sn"])
    assert cfg.child.norm == NormSpec("sn")
    # and an old key set after the norm folds into that norm
    cfg = resolve_config(_NormRoot, sets=["child.norm=bn", "child.momentum=0.2"])
    assert cfg.child.norm == NormSpec("bn", momentum=0.2)
