"""ENAS's optimizer conventions: the L2 term, epochs of fixed length, the controller's Adam."""

from __future__ import annotations

import types

import pytest
import torch

from nas.config import OptimConfig, RetrainConfig, SearchConfig
from nas.optim import add_l2_gradient, epoch_loader, sgd_with_restarts
from nas.proposers import Reinforce


def test_l2_term_follows_enas_loss_convention():
    # ENAS adds l2 * sum(w^2) to the loss: the same steps as autograd on that loss
    opt = OptimConfig(l2_reg=0.01, lr_max=0.1, lr_min=0.1)
    torch.manual_seed(0)
    w_hook = torch.nn.Parameter(torch.randn(5))
    w_loss = torch.nn.Parameter(w_hook.detach().clone())
    hooked, _ = sgd_with_restarts([w_hook], opt)
    plain = torch.optim.SGD([w_loss], lr=0.1, momentum=0.9, nesterov=True)
    x = torch.randn(5)
    for _ in range(3):
        (w_hook * x).sum().backward()
        hooked.step()
        hooked.zero_grad()
        ((w_loss * x).sum() + 0.01 * (w_loss ** 2).sum()).backward()
        plain.step()
        plain.zero_grad()
    torch.testing.assert_close(w_hook, w_loss)


def test_l2_gradient_reaches_weights_this_step_did_not_use():
    # a weight without gradient still decays: w1 = w0 - lr * (1 + momentum) * 2 * l2 * w0
    w = torch.nn.Parameter(torch.tensor([3.0]))
    optimizer, _ = sgd_with_restarts([w], OptimConfig(l2_reg=1e-2, lr_max=0.5, lr_min=0.5))
    optimizer.step()
    torch.testing.assert_close(w.detach(), torch.tensor([3.0 - 0.5 * 1.9 * 2 * 1e-2 * 3.0]))


def test_no_l2_hook_when_the_term_is_off():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    add_l2_gradient(opt, 0.0)
    opt.step()  # no gradient, no L2 term: the weight stays
    assert w.item() == 1.0


def test_enas_settings_are_the_defaults():
    search, final = SearchConfig(), RetrainConfig()
    # child_l2_reg 1e-4 / 2e-4, lr_min 5e-4 / 1e-4, keep_prob 0.9 / 0.8 (official scripts)
    assert (search.train.l2_reg, search.train.lr_min, search.child.dropout) == (1e-4, 5e-4, 0.1)
    assert (final.train.l2_reg, final.train.lr_min, final.child.dropout) == (2e-4, 1e-4, 0.2)
    assert search.search.aux_weight == 0.4 and final.retrain.aux_weight == 0.4
    # ceil(45000 / 160) and ceil(50000 / 144) steps per epoch
    assert (search.train.steps_per_epoch, final.train.steps_per_epoch) == (282, 348)


def _fake_run() -> types.SimpleNamespace:
    def dataloader(dataset, batch_size, shuffle, sampler, drop_last, num_workers):
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                           drop_last=drop_last)

    return types.SimpleNamespace(world_size=1, rank=0, generator=torch.Generator(),
                                 dataloader=dataloader)


def test_steps_per_epoch_do_not_depend_on_the_dataset_size():
    opt = OptimConfig(batch_size=8, steps_per_epoch=25)
    for n in (30, 200, 1000):  # the data cycles through fresh shuffles
        data = torch.utils.data.TensorDataset(torch.arange(n))
        loader = epoch_loader(_fake_run(), data, opt, 0)
        batches = [b[0] for b in loader]
        assert len(loader) == len(batches) == 25 and all(len(b) == 8 for b in batches)
        if n == 30:  # 200 draws of 30 images: each image 6 or 7 times
            counts = torch.bincount(torch.cat(batches), minlength=n)
            assert counts.min() >= 6 and counts.max() <= 7


def test_one_pass_per_epoch_when_steps_are_none():
    data = torch.utils.data.TensorDataset(torch.arange(50))
    loader = epoch_loader(_fake_run(), data, OptimConfig(batch_size=8, steps_per_epoch=None), 0)
    assert len(loader) == 6  # ENAS's definition: full batches of one pass


def test_controller_adam_is_enas_beta1_zero_eps_1e3():
    from nas.controller import ControllerConfig

    group = Reinforce(ControllerConfig(), 2, torch.device("cpu")).optimizer.param_groups[0]
    assert group["betas"] == (0.0, 0.999) and group["eps"] == 1e-3 and group["lr"] == 0.0035


@pytest.mark.parametrize("norm", ["sn", "ln", "gn", "none"])
def test_controller_norm_presets_put_bn_in_the_child(norm, tmp_path):
    from nas.config import PRESETS
    from snexp.runtime.config import parse_args

    cfg = parse_args(SearchConfig, ["--config", "enas_cifar10", "--config", f"controller_{norm}",
                                    "--out", str(tmp_path / "x")], presets=PRESETS)
    # the SN paper's setting on ENAS's paper-scale search
    assert (str(cfg.child.norm), cfg.controller.kind, str(cfg.controller.norm)) == (
        "bn", "lstm", norm)
    assert cfg.train.epochs == 150 and cfg.child.filters == 20
