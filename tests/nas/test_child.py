"""Ops and the child networks: shapes for every op and norm, ENAS's structure, chosen ops learn."""

from __future__ import annotations

import random
import re

import pytest
import torch

import snexp
from nas.child import ChildNet, reduction_layers
from nas.config import ChildConfig
from nas.ops import OPS, FactorizedReduce, drop_path
from nas.space import PRIMITIVES, Architecture, parse_arch


def _random_arch(rng: random.Random, nodes: int) -> Architecture:
    def cell() -> tuple:
        return tuple(
            (rng.randrange(i + 2), rng.randrange(5), rng.randrange(i + 2), rng.randrange(5))
            for i in range(nodes)
        )

    return Architecture(cell(), cell())


@pytest.mark.parametrize("name", PRIMITIVES)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_op_keeps_channels_and_applies_stride(name, stride):
    op = OPS[name](8, stride, snexp.norm_layer("sn"))
    out = op(torch.randn(2, 8, 8, 8))
    # same channel count; stride 2 halves the resolution
    assert out.shape == (2, 8, 8 // stride, 8 // stride)


@pytest.mark.parametrize("kind", ["sn", "ssn", "bn", "in", "ln", "gn"])
def test_every_norm_of_the_sep_conv_comes_from_the_factory(kind):
    options = {"groups": 4} if kind == "gn" else {}
    op = OPS["sep_conv_3x3"](8, 1, snexp.norm_layer(kind, **options))
    norms = [m for m in op.modules() if m is not op and "Norm" in type(m).__name__]
    # ENAS: two ReLU-sepconv-norm stacks, each norm of the requested kind
    assert len(norms) == 2
    assert type(norms[0]) is type(snexp.make_norm(kind, 8, **options))
    assert op(torch.randn(2, 8, 6, 6)).shape == (2, 8, 6, 6)


def test_factorized_reduce_handles_odd_channels():
    assert FactorizedReduce(5, 7, snexp.norm_layer("bn"))(torch.randn(2, 5, 8, 8)).shape == (
        2, 7, 4, 4)


def test_gn_groups_must_divide_the_width():
    # the spec's groups must divide filters; the message shows the spec that fits
    with pytest.raises(ValueError, match=re.escape(
            "child.norm 'gn(groups=3)': groups=3 must divide filters=8 (every width of the "
            "child is a multiple of filters); write --norm 'gn(groups=4)' (groups dividing 8: "
            "1, 2, 4, 8) or change child.filters")):
        ChildConfig(norm="gn(groups=3)", filters=8)
    # a bare gn keeps its 4 groups (the old gn_groups default), recorded in the spec
    assert ChildConfig(norm="gn", filters=8).norm == snexp.NormSpec("gn", groups=4)
    with pytest.raises(ValueError, match=re.escape("write --norm 'gn(groups=3)'")):
        ChildConfig(norm="gn", filters=18)


@pytest.mark.parametrize("spec, message", [
    ("sn(groupz=2)", "unexpected keyword argument 'groupz'"),
    ("sn(prior=gn:2)", "'gn', not a candidate of this layer"),
    ("bn(momentum=2)", "momentum must be in [0, 1]"),
])
def test_bad_norm_options_fail_when_the_config_is_built(spec, message):
    # every option is checked by building one layer, before any run starts
    with pytest.raises(ValueError, match=re.escape(message)):
        ChildConfig(norm=spec, filters=8)


def test_drop_path_zeroes_whole_samples_and_rescales():
    torch.manual_seed(0)
    out = drop_path(torch.ones(400, 2, 2, 2), 0.6)
    per_sample = out.flatten(1)
    # each sample is all 0 or all 1/0.6; about 60% are kept
    kept = per_sample[:, 0] > 0
    assert torch.all(per_sample[~kept] == 0)
    torch.testing.assert_close(per_sample[kept], torch.full_like(per_sample[kept], 1 / 0.6))
    assert 0.5 < kept.float().mean() < 0.7


def test_reduction_layers_follow_enas():
    assert reduction_layers(6) == (2, 5) and reduction_layers(15) == (5, 11)


# ENAS's published cell (scripts/cifar10_micro_final.sh), normal then reduction cell
ENAS_ARC = "0 2 0 0 0 4 0 1 0 4 1 1 1 0 0 1 0 2 1 1 1 0 1 0 0 3 0 2 1 1 3 1 1 0 0 4 0 3 1 1"


def _enas_count(arc: list[int], layers: int, f: int, classes: int = 10) -> tuple[int, int]:
    """Weights of the official _fixed_layer network, counted from micro_child.py by hand.

    Every norm is a BN with scale and offset (2c), convs have no bias, the fc has no bias.
    """
    def bn(c):
        return 2 * c

    def fr(c_in, c):  # _factorized_reduction: two 1x1 convs to c/2, then one BN(c)
        return c_in * c + bn(c)

    def conv1x1(c_in, c):
        return c_in * c + bn(c)

    total = 3 * 3 * 3 * 3 * f + bn(3 * f)  # stem
    pools = (layers // 3, 2 * (layers // 3) + 1)
    c_pp = c_p = 3 * f
    hw_pp = hw_p = 32
    aux_in = None
    for layer in range(layers + 2):
        reduction = layer in pools
        f = 2 * f if reduction else f
        cell = arc[20:] if reduction else arc[:20]
        # _maybe_calibrate_size, then layer_base on input 1
        total += fr(c_pp, f) if hw_pp != hw_p else (conv1x1(c_pp, f) if c_pp != f else 0)
        total += conv1x1(c_p, f) if c_p != f else 0
        total += conv1x1(f, f)
        used = set()
        for node in range(5):
            for inp, op in ((cell[4 * node], cell[4 * node + 1]),
                            (cell[4 * node + 2], cell[4 * node + 3])):
                used.add(inp)
                if op in (0, 1):  # sep conv 3x3 / 5x5: (depthwise, pointwise, BN) x 2
                    k = 3 if op == 0 else 5
                    total += 2 * (k * k * f + f * f + bn(f))
                elif op == 4 and reduction and inp < 2:  # stride-2 identity
                    total += fr(f, f)
        loose = [i for i in range(7) if i not in used]
        total += sum(fr(f, f) for i in loose if i < 2 and reduction)  # _fixed_combine
        hw = hw_p // 2 if reduction else hw_p
        c_pp, c_p, hw_pp, hw_p = c_p, len(loose) * f, hw_p, hw
        if layer == pools[1] + 1:
            aux_in = c_p
    total += c_p * classes
    side = (8 - 5) // 3 + 1  # avg-pool 5 stride 3 of the 8x8 map
    aux = conv1x1(aux_in, 128) + side * side * 128 * 768 + bn(768) + 768 * classes
    return total, aux


def test_published_enas_cell_has_the_official_parameter_count():
    arc = [int(v) for v in ENAS_ARC.split()]
    net = ChildNet(10, Architecture.from_flat(arc), norm_layer=snexp.norm_layer("bn"), layers=15,
                   filters=36, aux=True)
    # the count of the official structure, derived by hand from micro_child.py
    assert (net.params(), net.aux_params()) == _enas_count(arc, 15, 36)
    # ... which is 3.894 M without the auxiliary head and 0.495 M in it
    assert (net.params(), net.aux_params()) == (3_894_372, 494_848)


def test_fixed_net_classifier_reads_every_loose_end():
    arch = parse_arch(ENAS_ARC)
    net = ChildNet(10, arch, norm_layer=snexp.norm_layer("bn"), layers=15, filters=36)
    # the normal cell leaves nodes 2..6 unused: the last cell outputs 5 x 4 x 36 channels
    assert arch.loose_ends(False) == [2, 3, 4, 5, 6]
    assert net.classifier.in_features == 720 and net.classifier.bias is None
    # the reduction cell leaves 2, 4, 5, 6 (4 x 72 channels at the first reduction)
    assert net.cells[5].out_channels == 4 * 72


def test_fixed_cell_gives_every_slot_its_own_module():
    # node 2 reads input 0 twice with sep_conv_3x3: two modules with their own weights
    arch = Architecture.from_flat([0, 0, 0, 0, 2, 4, 1, 1] * 2)
    net = ChildNet(10, arch, norm_layer=snexp.norm_layer("bn"), layers=1, filters=4)
    cell = net.cells[2]
    assert len(cell.ops) == 4 and cell.ops[0] is not cell.ops[1]
    assert cell.ops[0].state_dict().keys() == cell.ops[1].state_dict().keys()
    assert not torch.equal(cell.ops[0][1].weight, cell.ops[1][1].weight)  # own init


def test_fixed_cell_concatenates_unused_inputs_reduced_in_a_reduction_cell():
    # input 0 is used by no node: it is a loose end; in the reduction cell it is
    # factorized-reduced to the output resolution first
    arch = Architecture.from_flat([1, 2, 1, 3, 2, 4, 1, 0] * 2)
    net = ChildNet(10, arch, norm_layer=snexp.norm_layer("bn"), layers=1, filters=4)
    assert arch.loose_ends(False) == [3]  # computed nodes only
    normal, reduce = net.cells[2], net.cells[0]
    assert normal.loose == [0, 3] and normal.out_channels == 2 * 16
    assert set(reduce.combine) == {"0"}
    out = net(torch.randn(2, 3, 16, 16))
    assert out.logits.shape == (2, 10)


def test_aux_head_sits_after_the_cell_behind_the_second_reduction():
    arch = parse_arch(ENAS_ARC)
    net = ChildNet(10, arch, norm_layer=snexp.norm_layer("bn"), layers=15, filters=8, aux=True)
    # ENAS: aux_head_indices = [pool_layers[-1] + 1]; at 32 px its last conv is 2x2 -> 768
    assert net.aux_after == 12 and net.aux_head.conv.weight.shape == (768, 128, 2, 2)
    net.train()
    out = net(torch.randn(2, 3, 32, 32))
    assert out.aux.shape == (2, 10)
    with torch.no_grad():  # no loss, no head
        assert net(torch.randn(2, 3, 32, 32)).aux is None


@pytest.mark.parametrize("seed", range(3))
def test_shared_child_runs_random_archs_and_only_chosen_slots_get_gradients(seed):
    rng = random.Random(seed)
    net = ChildNet(10, norm_layer=snexp.norm_layer("sn"), layers=1, filters=4, num_nodes=3)
    arch = _random_arch(rng, 3)
    out = net(torch.randn(4, 3, 16, 16), arch)
    assert out.logits.shape == (4, 10) and out.aux is None
    out.logits.sum().backward()
    for index, cell in enumerate(net.cells):
        reduction = str(index) in net.reduce
        chosen = set()
        for k, (a, op_a, b, op_b) in enumerate(arch.cell(reduction)):
            chosen |= {(k + 2, 0, a, PRIMITIVES[op_a]), (k + 2, 1, b, PRIMITIVES[op_b])}
        for key, ops in cell.ops.items():
            node, slot, inp = map(int, key.split("_"))
            for name, module in ops.items():
                grads = [p.grad for p in module.parameters()]
                if (node, slot, inp, name) in chosen:
                    # a chosen op with weights learns from this batch
                    assert all(g is not None and g.abs().sum() > 0 for g in grads)
                else:
                    # ops of other slots, inputs or names never ran
                    assert all(g is None for g in grads)


def test_shared_child_has_per_slot_weights_and_reduces_before_the_cell():
    net = ChildNet(10, norm_layer=snexp.norm_layer("bn"), layers=1, filters=4, num_nodes=2)
    cell = net.cells[2]
    # node 2: 2 slots x 2 inputs, node 3: 2 slots x 3 inputs, each with every op
    assert sorted(cell.ops) == ["2_0_0", "2_0_1", "2_1_0", "2_1_1", "3_0_0", "3_0_1", "3_0_2",
                                "3_1_0", "3_1_1", "3_1_2"]
    # ENAS's _enas_layer: the previous output is factorized-reduced, then a stride-1 cell
    assert sorted(net.reduce) == ["0", "1"]
    assert all(m.stride == (1, 1) for m in cell.modules() if isinstance(m, torch.nn.Conv2d)
               and m.kernel_size != (1, 1))
    # the projection has a weight column block for each of the 4 nodes (inputs included)
    assert cell.proj.weight.shape == (16, 4 * 16, 1, 1)


def test_shared_child_runs_every_op_on_every_edge():
    net = ChildNet(10, norm_layer=snexp.norm_layer("bn"), layers=1, filters=4, num_nodes=2)
    x = torch.randn(2, 3, 8, 8)
    for op in range(len(PRIMITIVES)):
        for inp in (0, 1):
            cell = ((inp, op, 1 - inp, op), (2, op, inp, op))
            arch = Architecture(cell, cell)
            assert net(x, arch).logits.shape == (2, 10)


def test_shared_child_needs_an_architecture():
    with pytest.raises(ValueError, match="needs forward"):
        ChildNet(10, layers=1, filters=4, num_nodes=2)(torch.randn(2, 3, 8, 8))


def test_fixed_net_drop_path_spares_the_identity():
    arch = Architecture.from_flat([0, 4, 1, 4, 2, 4, 0, 4] * 2)  # identities only
    net = ChildNet(10, arch, norm_layer=snexp.norm_layer("bn"), layers=1, filters=4)
    net.train()
    net.drop_keep = 0.01
    torch.manual_seed(0)
    x = torch.randn(4, 3, 16, 16)
    normal = net.cells[2]  # after the reductions at 0 (8 channels) and 1 (16 channels)
    s0, s1 = torch.randn(4, 8, 8, 8), torch.randn(4, 16, 4, 4)
    # ENAS drops conv and pool ops only: identities pass whatever the keep probability
    torch.testing.assert_close(normal(s0, s1, 0.01), normal(s0, s1, 1.0))
    assert net(x).logits.shape == (4, 10)


def test_fixed_and_shared_agree_on_the_logits_shape():
    arch = Architecture.from_flat([0, 3, 1, 2, 0, 4, 2, 0] * 2)
    for model in (ChildNet(5, arch, layers=2, filters=6), ChildNet(5, layers=2, filters=6,
                                                                    num_nodes=2)):
        assert model(torch.randn(2, 3, 16, 16), arch).logits.shape == (2, 5)


def test_shared_cell_output_includes_an_unused_input():
    from nas.cells import SearchCell

    cell = SearchCell(8, 8, 8, 2, PRIMITIVES, reduction_prev=False,
                      norm_layer=snexp.norm_layer("bn"))
    s0 = torch.randn(4, 8, 6, 6, requires_grad=True)
    s1 = torch.randn(4, 8, 6, 6)
    # no node reads input 0: ENAS still concatenates it (with node 3) before the projection
    cell(s0, s1, ((1, 2, 1, 3), (2, 4, 1, 0)), PRIMITIVES).sum().backward()
    assert s0.grad is not None and s0.grad.abs().sum() > 0


@pytest.mark.parametrize("norm", ["sn", "bn"])
def test_child_momentum_reaches_every_norm_layer(norm):
    # the spec's momentum (PyTorch convention) is what every SN/BN layer of the child uses
    child_cfg = ChildConfig(norm=f"{norm}(momentum=0.003)", layers=1, filters=4, num_nodes=2)
    net = ChildNet(10, norm_layer=child_cfg.norm.layer(), layers=1, filters=4, num_nodes=2)
    layers = [m for m in net.modules() if getattr(m, "running_mean", None) is not None]
    assert layers and all(m.momentum == 0.003 for m in layers)


OLD_CHILD = """[child]
norm = "{norm}"
layers = 1
filters = 8
num_nodes = 2
gn_groups = {groups}
momentum = {momentum}
dropout = 0.1
prior = "{prior}"
"""


@pytest.mark.parametrize("norm, groups, momentum, prior, spec", [
    ("sn", 4, 0.1, "bn:4", "sn(prior=bn:4)"),  # the quick preset's child
    ("sn", 4, 0.1, "", "sn"),  # the layers' default momentum adds nothing
    ("ssn", 4, 0.003, "ln:1", "ssn(momentum=0.003, prior=ln:1)"),
    ("bn", 4, 0.003, "bn:4", "bn(momentum=0.003)"),  # prior: SN/SSN only
    ("gn", 2, 0.003, "bn:4", "gn(groups=2)"),  # groups: gn only; momentum: SN/SSN/BN only
    ("ln", 4, 0.1, "", "ln"),
])
def test_an_old_config_toml_loads_into_the_norm_spec(tmp_path, norm, groups, momentum, prior,
                                                      spec):
    # run folders written before the norm became one spec (norm, gn_groups, momentum, prior)
    # load into the spec those keys stood for, and are written back in the new form
    from nas.config import SearchConfig
    from snexp.runtime.config import load_config, to_toml

    old = tmp_path / "config.toml"
    old.write_text(OLD_CHILD.format(norm=norm, groups=groups, momentum=momentum, prior=prior))
    cfg = load_config(SearchConfig, old)
    assert cfg.child.norm == snexp.NormSpec.parse(spec) and str(cfg.child.norm) == spec
    assert (cfg.child.layers, cfg.child.filters, cfg.child.num_nodes) == (1, 8, 2)
    text = to_toml(cfg)
    child = text[text.index("[child]"):text.index("[controller]")]
    assert child.splitlines()[1].startswith(f'norm = "{spec}"  # every norm of the child')
    assert not [line for line in child.splitlines()
                if line.split(" = ")[0] in ("gn_groups", "momentum", "prior")]
    (tmp_path / "new.toml").write_text(text)
    assert load_config(SearchConfig, tmp_path / "new.toml") == cfg


def test_an_old_checkpoint_config_resumes_with_the_spec(tmp_path):
    # a checkpoint's saved flat config from before the spec compares equal to today's reading
    # of the same run, and a real difference is still refused
    from nas.config import SearchConfig
    from snexp.runtime.config import ConfigError, flatten, override
    from snexp.runtime.run.resume import CHECKPOINT_FORMAT, check_resumable, plain_values

    cfg = override(SearchConfig(), {"child.norm": snexp.NormSpec("sn", prior="bn:4")})
    saved = plain_values(flatten(cfg))
    assert saved["child.norm"] == "sn(prior=bn:4)"  # checkpoints hold the text
    saved.pop("child.norm")
    saved.update({"child.norm": "sn", "child.gn_groups": 4, "child.momentum": 0.1,
                  "child.prior": "bn:4"})
    checkpoint = {"format": CHECKPOINT_FORMAT, "config": saved, "step": 0, "epoch": 0,
                  "batch_in_epoch": 0, "best": None, "state": {}, "objects": {}, "scaler": None,
                  "rng": None, "data_rng": None}
    check_resumable(checkpoint, cfg, tmp_path / "last.pt", folder=tmp_path, safe_keys=())
    with pytest.raises(ConfigError, match=r"child\.norm \('sn\(prior=bn:4\)' -> 'sn'\)"):
        check_resumable(checkpoint, override(cfg, {"child.norm": snexp.NormSpec("sn")}),
                         tmp_path / "last.pt", folder=tmp_path, safe_keys=())
