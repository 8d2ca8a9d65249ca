"""SN in the searched cells: the quick preset's prior and logit group, the per-op importance."""

from __future__ import annotations

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nas import search as search_cli
from nas import train as train_cli
from nas.child import ChildNet
from nas.config import PRESETS, OptimConfig, SearchConfig
from nas.op_importance import format_op_importance, op_importance
from nas.optim import param_groups, sgd_with_restarts
from nas.space import Architecture
from snexp import NormSpec, SwitchNorm2d, importance, norm_layer
from snexp.runtime.config import parse_args

BN_SHARE = 0.9646632  # softmax of the logits (0, 0, 4)
BN6_SHARE = 0.9950669  # softmax of the logits (0, 0, 6)
# normal: node 2 = sep3x3(c_{k-2}) + identity(c_{k-1}), node 3 = sep5x5(node 2) + maxpool(c_{k-2})
ARCH = Architecture.from_flat([0, 0, 1, 4, 2, 1, 0, 3, 1, 2, 0, 0, 2, 4, 1, 1])


def _quick(*argv: str) -> SearchConfig:
    return parse_args(SearchConfig, list(argv), presets=PRESETS, default_config="quick",
                      flags=search_cli.FLAGS)


def test_quick_preset_searches_sn_cells_starting_near_bn():
    cfg = _quick()
    # the default search: SN in every norm of the cells and of the controller, prior bn:4 on
    # the mean weights and bn:6 on the variance weights, logits at 10x lr without the L2 term
    assert (str(cfg.child.norm), str(cfg.controller.norm)) == (
        "sn(prior=bn:4, var_prior=bn:6)", "sn")
    assert cfg.train.importance_lr_mult == 10.0 and cfg.train.importance_l2 is False
    child = ChildNet(10, norm_layer=cfg.child.norm.layer(), layers=1, filters=4, num_nodes=2)
    mean_shares = [w.mean[2] for w in importance(child).values()]
    var_shares = [w.var[2] for w in importance(child).values()]
    assert len(mean_shares) > 50 and mean_shares == pytest.approx([BN_SHARE] * len(mean_shares))
    assert var_shares == pytest.approx([BN6_SHARE] * len(mean_shares))


@pytest.mark.parametrize("argv", [["--norm", "bn"], ["--config", "quick", "--config",
                                                     "controller_sn"]])
def test_the_papers_bn_cells_stay_one_flag_away(argv):
    cfg = _quick(*argv)
    assert cfg.child.norm == NormSpec("bn")  # the prior belongs to the sn spec: gone with it
    child = ChildNet(10, norm_layer=cfg.child.norm.layer(), layers=1, filters=4, num_nodes=2)
    assert len(param_groups(child, cfg.train)) == 1  # no SN: one group, as before


@pytest.mark.parametrize("argv", [["--norm", "sn"], ["--set", "child.norm=sn"],
                                  ["--set", "child.prior="]])  # the old key still folds in
def test_uniform_start_is_one_setting_away(argv):
    cfg = _quick(*argv)
    assert cfg.child.norm == NormSpec("sn")
    layer = ChildNet(10, norm_layer=cfg.child.norm.layer(), layers=1, filters=4,
                     num_nodes=2).stem[1]
    torch.testing.assert_close(layer.importance_weights()[0].detach(), torch.full((3,), 1 / 3))


def test_old_prior_key_on_the_command_line_folds_into_the_spec():
    # --set child.prior=... (the key before the norm became one spec) still works: it is folded
    # into an sn/ssn spec as the options it stood for, and ignored by other kinds as before
    assert str(_quick("--set", "child.prior=bn:6").child.norm) == "sn(prior=bn:6)"
    assert str(_quick("--norm", "ssn", "--set", "child.prior=ln:2").child.norm) == (
        "ssn(prior=ln:2)")
    assert str(_quick("--norm", "bn", "--set", "child.prior=bn:6").child.norm) == "bn"
    assert str(_quick("--set", "child.momentum=0.01").child.norm) == (
        "sn(momentum=0.01, prior=bn:4, var_prior=bn:6)")


def test_logit_group_has_its_lr_and_no_l2_term():
    opt = OptimConfig(lr_max=0.02, lr_min=0.02, l2_reg=0.5, momentum=0.5,
                      importance_lr_mult=10.0, importance_l2=False)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 1), SwitchNorm2d(4, prior="bn:4"))
    optimizer, _ = sgd_with_restarts(param_groups(net, opt), opt)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.02, 0.2])
    before = net[1].mean_weight.detach().clone()
    conv = net[0].weight.detach().clone()
    optimizer.zero_grad()
    net(torch.randn(8, 2, 3, 3)).pow(2).mean().backward()
    grad, conv_grad = net[1].mean_weight.grad.clone(), net[0].weight.grad.clone()
    optimizer.step()
    # first Nesterov step moves by lr * (1 + momentum) * gradient: the logits at 10x lr with no
    # L2 term, the other weights at lr 0.02 with the L2 gradient 2 * l2_reg * w added
    torch.testing.assert_close(net[1].mean_weight.detach(), before - 0.2 * 1.5 * grad)
    torch.testing.assert_close(net[0].weight.detach(),
                               conv - 0.02 * 1.5 * (conv_grad + 1.0 * conv))


def test_bad_prior_is_one_paragraph_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        search_cli.main(["--set", "child.prior=gn:2", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "in, ln, bn" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def _set_logits(net: torch.nn.Module) -> None:
    """Distinct logits per layer, so that averages are checkable."""
    with torch.no_grad():
        for i, m in enumerate(m for m in net.modules() if isinstance(m, SwitchNorm2d)):
            m.mean_weight.copy_(torch.tensor([0.1 * (i % 7), 0.0, 1.0]))
            m.var_weight.copy_(torch.tensor([0.0, 0.2 * (i % 5), 2.0]))


def test_op_importance_of_the_shared_child_reads_the_derived_ops():
    net = ChildNet(10, norm_layer=norm_layer("sn"), layers=1, filters=4,
                   num_nodes=2)  # cells: R R N
    _set_logits(net)
    report = op_importance(net, ARCH)
    assert report["candidates"] == ["in", "ln", "bn"] and len(report["ops"]) == 8
    first = report["ops"][0]  # normal node 2 slot 0: sep_conv_3x3 on c_{k-2}: 2 norms, 1 cell
    assert (first["cell"], first["node"], first["slot"], first["input"], first["op"]) == (
        "normal", 2, 0, 0, "sep_conv_3x3")
    sep = net.cells[2].ops["2_0_0"]["sep_conv_3x3"]
    layers = [m for m in sep.modules() if isinstance(m, SwitchNorm2d)]
    expected = torch.stack([m.importance_weights()[0].detach() for m in layers]).mean(0)
    assert first["layers"] == 2 and first["leans_to"] == "bn"
    assert list(first["mean"].values()) == pytest.approx(expected.tolist())
    pool = report["ops"][3]  # normal node 3 slot 1: max pool, no norm
    assert pool["op"] == "max_pool_3x3" and pool["mean"] is None and pool["layers"] == 0
    reduce_sep = [op for op in report["ops"] if op["cell"] == "reduce" and op["layers"]]
    assert all(op["layers"] == 4 for op in reduce_sep)  # 2 norms x 2 reduction cells
    # shared: every SN layer outside the cells' op modules (stem, reductions, calibration,
    # output norms): none of the unused op modules count
    names = [n for n in importance(net) if ".ops." not in n]
    assert report["shared"]["layers"] == len(names) > 5
    assert "shared norms" in format_op_importance(report)


def test_op_importance_of_a_fixed_network_and_without_sn():
    net = ChildNet(10, ARCH, norm_layer=norm_layer("sn"), layers=1, filters=4)
    report = op_importance(net, ARCH)
    sep = [op for op in report["ops"] if op["op"] == "sep_conv_3x3" and op["cell"] == "normal"]
    assert sep[0]["layers"] == 2 and sep[0]["leans_to"] == "even"  # uniform start, one cell
    assert sep[0]["mean"] == pytest.approx({"in": 1 / 3, "ln": 1 / 3, "bn": 1 / 3})
    bn_net = ChildNet(10, ARCH, norm_layer=norm_layer("bn"), layers=1, filters=4)
    assert op_importance(bn_net, ARCH) is None


TINY = [
    "--epochs", "2", "--set", "data.embedded_train=240", "--set", "data.embedded_test=40",
    "--set", "data.valid_size=40", "--set", "data.valid_limit=32",
    "--set", "child.layers=1", "--set", "child.filters=4", "--set", "child.num_nodes=2",
    "--set", "controller.train_steps=2", "--set", "controller.num_aggregate=3",
    "--set", "train.batch_size=16", "--set", "train.steps_per_epoch=3",
    "--set", "search.derive_samples=2", "--set", "search.derive_final=3",
    "--set", "search.reward_batch_size=16",
]


@pytest.mark.slow
def test_search_and_retrain_report_the_derived_ops_importance(tmp_path):
    out = tmp_path / "search"
    search_cli.main([*TINY, "--out", str(out)])  # the quick preset: SN cells with the prior
    best = json.loads((out / "best_arch.json").read_text())
    summary = json.loads((out / "search.json").read_text())
    arch = Architecture.from_json((out / "best_arch.json").read_text())
    report = best["importance"]
    assert summary["importance"] == report and summary["norm"] == "sn(prior=bn:4, var_prior=bn:6)"
    assert summary["controller_norm"] == "sn" and "prior" not in summary
    assert len(summary["derived"]) == 2 and len(summary["losses"]) == 2
    assert max(summary["derived"]) == pytest.approx(summary["best_valid_acc"])
    assert len(report["ops"]) == 8 and report["candidates"] == ["in", "ln", "bn"]
    for op in report["ops"]:
        if op["mean"] is not None:  # 6 steps from the prior: still near BN, and normalized
            assert sum(op["mean"].values()) == pytest.approx(1.0)
            assert op["mean"]["bn"] == pytest.approx(BN_SHARE, abs=0.05)
            assert op["leans_to"] == "bn"
    assert (out / "importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "search/importance" in acc.Tags()["images"]
    assert any(t.startswith("sn_importance/") for t in acc.Tags()["scalars"])

    retrain = tmp_path / "retrain"
    train_cli.main(["--epochs", "1", "--set", "data.embedded_train=240",
                    "--set", "data.embedded_test=40", "--set", "data.valid_size=40",
                    "--set", "data.limit=32", "--set", "child.layers=1",
                    "--set", "child.filters=4", "--set", "train.batch_size=16",
                    "--set", "train.steps_per_epoch=2", "--arch", str(out / "best_arch.json"),
                    "--out", str(retrain)])
    result = json.loads((retrain / "result.json").read_text())
    ops = [op for op in result["importance"]["ops"] if op["mean"] is not None]
    assert result["arch"] == str(arch) and ops and result["norm"] == "sn"
    assert all(sum(op["var"].values()) == pytest.approx(1.0) for op in ops)
