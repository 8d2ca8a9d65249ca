"""The norm as one value: ``model.norm`` (a NormSpec) from flag and config.toml to model.pt."""

from __future__ import annotations

import pytest
import torch

from snexp import NormSpec
from snexp.runtime.config import ConfigError, load_config, resolve_config, to_toml
from stylize.config import ModelConfig, StylizeConfig
from stylize.net import TransformerNet
from stylize.saved import load_model, save_model
from stylize.tune_loop import TuneConfig

# the [model] table config.toml files held before the spec carried its options
_OLD = """[model]
norm = "{norm}"
width = 0.125
blocks = 2
candidates = ["ln", "bn"]
momentum = 0.03
groups = 2
pixel_scale = 255.0
"""


@pytest.mark.parametrize("norm, spec", [
    # the old translator: candidates and momentum for sn/ssn, momentum for bn, groups for gn
    ("sn", NormSpec("sn", candidates=("ln", "bn"), momentum=0.03)),
    ("ssn", NormSpec("ssn", candidates=("ln", "bn"), momentum=0.03)),
    ("bn", NormSpec("bn", momentum=0.03)),
    ("gn", NormSpec("gn", groups=2)),
    ("in", NormSpec("in")),
    ("none", NormSpec("none")),
])
def test_an_old_config_toml_loads_into_the_spec_the_old_options_made(tmp_path, norm, spec):
    (tmp_path / "config.toml").write_text(_OLD.format(norm=norm))
    cfg = load_config(StylizeConfig, tmp_path / "config.toml")
    assert cfg.model.norm == spec and cfg.model.width == 0.125
    # written back in the new form only, and read back as the same config
    text = to_toml(cfg)
    assert f'norm = "{spec}"' in text
    keys = {line.split("=")[0].strip() for line in text.splitlines()}
    assert keys.isdisjoint({"candidates", "momentum", "groups"})
    (tmp_path / "new.toml").write_text(text)
    assert load_config(StylizeConfig, tmp_path / "new.toml") == cfg


def test_the_default_config_writes_the_spec_with_its_options():
    assert 'norm = "sn(candidates=in+ln+bn, momentum=0.1)"' in to_toml(StylizeConfig())


def test_norm_reads_from_set_text_and_toml_strings(tmp_path):
    cfg = resolve_config(StylizeConfig, sets=["model.norm=sn(candidates=in+ln, momentum=0.2)"])
    assert cfg.model.norm == NormSpec("sn", candidates=("in", "ln"), momentum=0.2)
    (tmp_path / "c.toml").write_text('[model]\nnorm = "gn(groups=4)"\n')
    assert load_config(StylizeConfig, tmp_path / "c.toml").model.norm == NormSpec("gn", groups=4)


def test_old_keys_on_the_command_line_are_folded_into_the_norm():
    # chosen: --set model.momentum=... keeps working, folded as an old config.toml is
    cfg = resolve_config(StylizeConfig, sets=["model.momentum=0.2"])
    assert cfg.model.norm == NormSpec("sn", candidates=("in", "ln", "bn"), momentum=0.2)
    cfg = resolve_config(StylizeConfig, sets=["model.norm=gn", "model.groups=8"])
    assert cfg.model.norm == NormSpec("gn", groups=8)
    cfg = resolve_config(StylizeConfig, sets=["model.norm=sn", "model.candidates=ln,bn"])
    assert cfg.model.norm == NormSpec("sn", candidates=("ln", "bn"))
    # as the old translator, an option the kind does not take is not passed to it
    assert resolve_config(StylizeConfig, sets=["model.norm=in", "model.momentum=0.2"]
                          ).model.norm == NormSpec("in")


@pytest.mark.parametrize("sets, message", [
    (["model.norm=gn(groups=5)"],
     "gn groups=5 must divide the widths [32, 64, 128]; set model.norm=gn(groups=G)"),
    (["model.norm=sn(candidates=in+xx)"], "unknown candidate 'xx'"),
    (["model.norm=bn(momentum=2)"], "momentum must be in [0, 1]"),
    (["model.norm=sn(bogus=1)"], "norm sn(bogus=1):"),
    (["model.norm=xn"], "unknown norm kind 'xn'"),
    (["model.momentum=1.5"], "momentum must be in [0, 1]"),
])
def test_a_bad_norm_is_refused_before_any_work(sets, message):
    with pytest.raises(ConfigError) as err:
        resolve_config(StylizeConfig, sets=sets)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_norm_the_style_conditional_layers_refuse_is_refused_with_two_styles():
    # SN's last_gamma exists on the plain layer, not on the per-style one
    ok = resolve_config(StylizeConfig, sets=["model.norm=sn(last_gamma=true)",
                                             "data.styles=a.jpg"])
    assert ok.model.norm == NormSpec("sn", last_gamma=True)
    with pytest.raises(ConfigError, match="last_gamma"):
        resolve_config(StylizeConfig, sets=["model.norm=sn(last_gamma=true)",
                                            "data.styles=a.jpg,b.jpg"])


def test_tune_norms_are_specs_checked_at_the_model_width():
    cfg = resolve_config(TuneConfig, sets=["tune.norms=sn(candidates=ln+bn, momentum=0.2), in",
                                           "model.width=0.125"])
    assert cfg.tune.norms == (NormSpec("sn", candidates=("ln", "bn"), momentum=0.2),
                              NormSpec("in"))
    assert 'norms = ["sn(candidates=ln+bn, momentum=0.2)", "in"]' in to_toml(cfg)
    # every choice is built before any trial: gn's 32 groups do not divide 4 channels
    with pytest.raises(ConfigError, match=r"gn groups=32 must divide the widths \[4, 8, 16\]"):
        resolve_config(TuneConfig, sets=["tune.norms=sn, gn", "model.width=0.125"])


def _lively(net: TransformerNet) -> TransformerNet:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    net.train()
    for s in range(net.num_styles):  # running statistics of each style
        net(torch.rand(2, 3, 20, 20), s if net.num_styles > 1 else None)
    return net.eval()


@pytest.mark.parametrize("kind, options, styles", [
    ("sn", {"candidates": ["in", "bn"], "momentum": 0.05}, ["a", "b"]),
    ("gn", {"groups": 2}, ["a"]),
    ("bn", {"momentum": 0.3}, ["a"]),
])
def test_a_format_1_model_file_loads_as_the_same_network_as_format_2(tmp_path, kind, options,
                                                                     styles):
    # the spec the format-1 kind and options make, written by hand
    spec = NormSpec(kind, {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    net = _lively(TransformerNet(spec, width=0.125, blocks=1, num_styles=len(styles)))
    new = save_model(tmp_path / "new.pt", net, styles=styles)
    assert torch.load(new, weights_only=True)["norm"] == str(spec)
    state = {k: v for k, v in net.state_dict().items()}
    torch.save({"format": 1, "state_dict": state, "norm": kind, "norm_options": options,
                "width": 0.125, "blocks": 1, "pixel_scale": 255.0, "styles": styles,
                "config": {}}, tmp_path / "old.pt")
    old_net, old_meta = load_model(tmp_path / "old.pt")
    new_net, new_meta = load_model(new)
    assert old_net.norm == new_net.norm == spec
    assert old_meta["norm"] == new_meta["norm"] == str(spec) and "norm_options" not in old_meta
    assert (old_meta["format"], new_meta["format"]) == (1, 2)
    x = torch.rand(2, 3, 23, 19)
    for s in range(len(styles)):
        style = s if len(styles) > 1 else None
        # the same weights compute the same function from either file
        torch.testing.assert_close(old_net(x, style), new_net(x, style), rtol=0, atol=0)
        torch.testing.assert_close(old_net(x, style), net(x, style), rtol=0, atol=0)
    layers = [m for m in old_net.modules() if hasattr(m, "running_mean")]
    if "momentum" in options:
        assert layers and all(m.momentum == options["momentum"] for m in layers)


def test_model_files_of_unknown_layout_are_refused(tmp_path):
    net = TransformerNet("in", width=0.125, blocks=1)
    good = torch.load(save_model(tmp_path / "m.pt", net, styles=["a"]), weights_only=True)
    # format 1 needs its options table; an unknown format is named with the ones read
    for name, obj in (("one.pt", {**good, "format": 1}), ("three.pt", {**good, "format": 3}),
                      ("list.pt", {**good, "format": [2]})):
        torch.save(obj, tmp_path / name)
        with pytest.raises(ConfigError, match="not a stylize model file of format 1 or 2"):
            load_model(tmp_path / name)
    torch.save({**good, "norm": "sn(momentum"}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="bad.pt' is not a usable stylize model"):
        load_model(tmp_path / "bad.pt")


def test_save_model_refuses_a_network_without_a_spec(tmp_path):
    net = TransformerNet(lambda c: torch.nn.GroupNorm(1, c), width=0.125, blocks=1)
    with pytest.raises(ValueError, match="needs a network built from a norm spec"):
        save_model(tmp_path / "m.pt", net, styles=["a"])


def test_model_config_takes_a_spec_or_its_text():
    assert ModelConfig(norm="gn(groups=8)").norm == NormSpec("gn", groups=8)


def test_norm_flags_take_spec_texts_and_help_shows_the_default(capsys):
    from snexp.runtime.config import parse_args
    from stylize.config import PRESETS
    from stylize.train import FLAGS as TRAIN_FLAGS
    from stylize.tune import FLAGS as TUNE_FLAGS

    cfg = parse_args(StylizeConfig, ["--norm", "sn(candidates=in+ln, momentum=0.2)"], prog="t",
                     flags=TRAIN_FLAGS, presets=PRESETS, default_config="quick")
    assert cfg.model.norm == NormSpec("sn", candidates=("in", "ln"), momentum=0.2)
    # --norms repeats, and each value is a comma list split outside the specs' parentheses
    cfg = parse_args(TuneConfig, ["--norms", "sn(candidates=ln+bn, momentum=0.2), in",
                                  "--norms", "gn(groups=8)", "--width", "0.25"], prog="t",
                     flags=TUNE_FLAGS, presets=PRESETS, default_config="tune")
    assert [str(n) for n in cfg.tune.norms] == ["sn(candidates=ln+bn, momentum=0.2)", "in",
                                                "gn(groups=8)"]
    with pytest.raises(SystemExit):
        parse_args(StylizeConfig, ["--help"], prog="t", flags=TRAIN_FLAGS, presets=PRESETS,
                   default_config="quick")
    assert 'default: "sn(candidates=in+ln+bn, momentum=0.1)"' in " ".join(
        capsys.readouterr().out.split())
