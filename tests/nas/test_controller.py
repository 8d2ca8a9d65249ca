"""The LSTM controller and the proposers: probabilities, REINFORCE, one interface for all."""

from __future__ import annotations

import optuna
import pytest
import torch

import snexp
from nas.controller import Controller, ControllerConfig
from nas.proposers import (
    RandomProposer,
    Reinforce,
    TPEProposer,
    arch_distributions,
    arch_params,
)
from nas.space import PRIMITIVES, Architecture


@pytest.mark.parametrize("norm", ["none", "ln", "gn", "sn"])
def test_log_prob_and_entropy_equal_those_of_the_logits(norm):
    torch.manual_seed(0)
    ctrl = Controller(ControllerConfig(norm=norm), num_nodes=3)
    policy = ctrl(5)
    log_prob = torch.zeros(5)
    entropy = torch.zeros(5)
    for logits, pos in zip(policy.logits, policy.positions):
        dist = torch.distributions.Categorical(logits=logits)
        log_prob += dist.log_prob(policy.actions[:, pos])
        entropy += dist.entropy()
    # the sums over all 8B decisions, recomputed from the logits
    assert sorted(policy.positions) == list(range(8 * 3))
    torch.testing.assert_close(policy.log_prob, log_prob)
    torch.testing.assert_close(policy.entropy, entropy)
    # scoring the sampled actions again (teacher forcing) gives the same log-probabilities
    torch.testing.assert_close(ctrl(actions=policy.actions).log_prob, policy.log_prob)


def test_logits_follow_the_official_bounds():
    torch.manual_seed(0)
    ctrl = Controller(ControllerConfig(), num_nodes=2)
    policy = ctrl(50)
    ops = [lg for lg, pos in zip(policy.logits, policy.positions) if pos % 2 == 1]
    inputs = [lg for lg, pos in zip(policy.logits, policy.positions) if pos % 2 == 0]
    # input logits within 1.10; op logits within 1.10 / 2.5 plus the fixed bias 0.25
    assert max(lg.abs().max() for lg in inputs) <= 1.10
    assert max(lg.abs().max() for lg in ops) <= 1.10 / 2.5 + 0.25 + 1e-6
    # b_soft starts at [10, 10, 0, ...]: the two sep convs are the most likely ops at first
    first = torch.softmax(ops[0], 1).mean(0)
    assert first[:2].min() > first[2:].max()


def test_sample_returns_a_valid_architecture_with_its_log_prob():
    ctrl = Controller(ControllerConfig(), num_nodes=4)
    arch, log_prob, entropy = ctrl.sample()
    assert isinstance(arch, Architecture) and arch.num_nodes == 4
    assert log_prob.requires_grad and log_prob < 0 and entropy > 0
    torch.testing.assert_close(ctrl(actions=ctrl.encode([arch])).log_prob[0], log_prob)


def test_controller_sn_mixes_ln_and_gn():
    ctrl = Controller(ControllerConfig(norm="sn", groups=4), num_nodes=2)
    layers = snexp.importance(ctrl)
    assert len(layers) == 2
    assert all(v.candidates == ("ln", "gn4") for v in layers.values())


@pytest.mark.parametrize("spec, candidates, groups", [
    ("sn", ("ln", "gn4"), 4),  # a bare sn: the SN paper's LN + GN mix with `groups`
    ("sn(candidates=ln+gn8)", ("ln", "gn8"), 4),  # the spec's own options win
    ("gn", None, 4), ("gn(groups=8)", None, 8),
])
def test_controller_norm_comes_from_the_spec(spec, candidates, groups):
    ctrl = Controller(ControllerConfig(norm=spec, groups=4), num_nodes=2)
    gates = ctrl.lstm.norm_gates
    if candidates is None:
        assert isinstance(gates, torch.nn.GroupNorm) and gates.num_groups == groups
    else:
        assert isinstance(gates, snexp.SwitchNorm1d) and gates.candidates == candidates


def test_controller_refuses_batch_norms_with_the_list():
    # BN (or IN/SSN) in the LSTM is refused when the config is built, naming what is allowed
    with pytest.raises(ValueError, match=r"controller.norm 'bn': .* one of none, ln, gn, sn"):
        ControllerConfig(norm="bn")
    with pytest.raises(ValueError, match=r"groups=3 and lstm_size=64"):
        ControllerConfig(norm="gn", groups=3)


def test_reinforce_moves_the_policy_toward_the_rewarded_architecture():
    torch.manual_seed(0)
    cfg = ControllerConfig(lr=0.03, entropy_weight=0.0)
    agent = Reinforce(cfg, num_nodes=2, device=torch.device("cpu"))
    identity = PRIMITIVES.index("identity")

    def share(archs: list[Architecture]) -> float:  # toy reward: fraction of identity ops
        flat = torch.tensor([a.to_flat() for a in archs])[:, 1::2]
        return float((flat == identity).float().mean())

    target = agent.controller.encode([Architecture.from_flat([0, identity, 1, identity] * 4)])
    before = agent.controller(actions=target).log_prob.item()
    share_before = share(agent.ask(300))
    for _ in range(30):
        archs = agent.ask(10)
        agent.tell(archs, [share([a]) for a in archs])
    # the all-identity architecture became more likely, and so did identity ops
    assert agent.controller(actions=target).log_prob.item() > before + 1.0
    assert share(agent.ask(300)) > share_before + 0.05


def test_reinforce_baseline_is_a_moving_average_updated_before_the_advantage():
    agent = Reinforce(ControllerConfig(entropy_weight=0.0), 2, torch.device("cpu"))
    archs = agent.ask(2)
    metrics = agent.tell(archs, [1.0, 0.0])
    # b <- b - 0.01 (b - r): 0 -> 0.01 -> 0.0099
    assert agent.baseline == pytest.approx(0.0099)
    assert metrics["baseline"] == pytest.approx(0.0099) and metrics["reward"] == 0.5


def test_reinforce_state_round_trips():
    agent = Reinforce(ControllerConfig(), 2, torch.device("cpu"))
    agent.tell(agent.ask(3), [0.3, 0.5, 0.1])
    other = Reinforce(ControllerConfig(), 2, torch.device("cpu"))
    other.load_state_dict(agent.state_dict())
    assert other.baseline == agent.baseline
    actions = agent.controller(4).actions
    torch.testing.assert_close(other.controller(actions=actions).log_prob,
                               agent.controller(actions=actions).log_prob)


def test_random_proposer_is_reproducible_from_its_state():
    rand = RandomProposer(3, seed=1)
    rand.ask(2)
    copy = RandomProposer(3, seed=99)
    copy.load_state_dict(rand.state_dict())
    assert rand.ask(3) == copy.ask(3)


def test_tpe_proposer_asks_and_tells_through_optuna():
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=4)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    tpe = TPEProposer(2, study)
    for _ in range(3):
        archs = tpe.ask(3)
        tpe.tell(archs, [float(a.to_flat()[1] == 4) for a in archs])
    trials = study.get_trials()
    # every proposal is a completed trial whose params are the architecture's decisions
    assert len(trials) == 9 and all(t.state.name == "COMPLETE" for t in trials)
    assert set(trials[0].params) == set(arch_distributions(2))
    best = tpe.derive(2)
    assert best[0].to_flat()[1] == 4 or max(t.value for t in trials) == 0
    with pytest.raises(ValueError, match="told 1 rewards for 0"):
        tpe.tell(best[:1], [0.0])


def test_arch_params_fit_their_distributions():
    arch = Architecture.from_flat([0, 0, 1, 4, 2, 2, 0, 3] * 2)
    dists = arch_distributions(2)
    trial = optuna.trial.create_trial(params=arch_params(arch), distributions=dists, value=0.5)
    assert trial.params["normal.node3.in1"] == 2 and trial.params["reduce.node2.op2"] == "identity"
