"""Ops and the child network: shapes for every op and norm, only chosen ops run and learn."""

from __future__ import annotations

import random

import pytest
import torch

import snexp
from nas.child import ChildNet, reduction_layers
from nas.config import ChildConfig
from nas.ops import OPS, FactorizedReduce, drop_path
from nas.space import PRIMITIVES, Architecture


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
    with pytest.raises(ValueError, match="gn_groups=3 must divide filters=8"):
        ChildConfig(norm="gn", filters=8, gn_groups=3)


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


@pytest.mark.parametrize("seed", range(3))
def test_shared_child_runs_random_archs_and_only_chosen_ops_get_gradients(seed):
    rng = random.Random(seed)
    net = ChildNet(10, norm="sn", layers=1, filters=4, num_nodes=3)
    arch = _random_arch(rng, 3)
    out = net(torch.randn(4, 3, 16, 16), arch)
    assert out.logits.shape == (4, 10) and out.aux is None
    out.logits.sum().backward()
    for cell in net.cells:
        chosen = {(node, inp, op) for node, inp, op in arch.edges(cell.reduction)}
        for key, ops in cell.edges.items():
            node, inp = map(int, key.split("_"))
            for name, module in ops.items():
                grads = [p.grad for p in module.parameters()]
                if (node, inp, name) in chosen:
                    # a chosen op with weights learns from this batch
                    assert all(g is not None and g.abs().sum() > 0 for g in grads)
                else:
                    # ops not in the architecture never ran
                    assert all(g is None for g in grads)


def test_shared_child_runs_every_op_on_every_edge():
    net = ChildNet(10, norm="bn", layers=1, filters=4, num_nodes=2)
    x = torch.randn(2, 3, 8, 8)
    for op in range(len(PRIMITIVES)):
        for inp in (0, 1):
            cell = ((inp, op, 1 - inp, op), (2, op, inp, op))
            arch = Architecture(cell, cell)
            assert net(x, arch).logits.shape == (2, 10)


def test_shared_child_needs_an_architecture():
    with pytest.raises(ValueError, match="needs forward"):
        ChildNet(10, layers=1, filters=4, num_nodes=2)(torch.randn(2, 3, 8, 8))


def test_fixed_net_holds_only_chosen_ops_and_has_aux_head_and_drop_path():
    arch = Architecture.from_flat([0, 0, 1, 4, 2, 1, 0, 2] * 2)
    shared = ChildNet(10, layers=3, filters=4, num_nodes=2)
    fixed = ChildNet(10, arch, layers=3, filters=4, aux=True)
    # far fewer weights than the shared net, and every edge module is a chosen op
    assert sum(p.numel() for p in fixed.parameters()) < sum(p.numel() for p in shared.parameters())
    assert all(len(cell.edges) == 4 for cell in fixed.cells)
    fixed.train()
    fixed.drop_keep = 0.6
    out = fixed(torch.randn(3, 3, 16, 16))
    assert out.logits.shape == (3, 10) and out.aux is not None and out.aux.shape == (3, 10)
    fixed.eval()
    assert fixed(torch.randn(3, 3, 16, 16)).aux is None


def test_fixed_and_shared_agree_on_the_cell_output_shape():
    arch = Architecture.from_flat([0, 3, 1, 2, 0, 4, 2, 0] * 2)
    for model in (ChildNet(5, arch, layers=2, filters=6), ChildNet(5, layers=2, filters=6,
                                                                    num_nodes=2)):
        assert model(torch.randn(2, 3, 16, 16), arch).logits.shape == (2, 5)
