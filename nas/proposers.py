"""Architecture proposers with one interface: the ENAS controller, random search, Optuna TPE.

A proposer is asked for architectures to try (``ask``), told their rewards (``tell``), asked
for the architectures that train the shared weights (``train_sample``) and for candidates at
the derive step (``derive``); it saves and restores its state
(``state_dict``/``load_state_dict``), so :class:`snexp.runtime.run.Run` can checkpoint it. The
search
loop gives all three the same budget and the same evaluation (reward = accuracy of the shared
child on one validation minibatch), for honest comparisons.

- :class:`Reinforce`: the LSTM :class:`~nas.controller.Controller` trained with REINFORCE
  (Williams 1992) as in ENAS: reward plus ``entropy_weight`` times the policy entropy, a
  moving-average baseline (decay 0.99, updated before the advantage is taken, as the official
  code does), Adam with the official beta1 = 0 and epsilon = 1e-3, gradients averaged over
  the ``num_aggregate`` samples of one update.
- :class:`RandomProposer`: uniform over the space (Li & Talwalkar 2019's baseline).
- :class:`TPEProposer`: Optuna's TPE sampler through ``ask``/``tell``; each decision is a
  categorical parameter (:func:`arch_distributions`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Protocol

import optuna
import torch

from nas.controller import Controller, ControllerConfig
from nas.space import PRIMITIVES, Architecture

__all__ = [
    "Proposer",
    "RandomProposer",
    "Reinforce",
    "TPEProposer",
    "arch_distributions",
    "arch_params",
    "build_proposer",
]


class Proposer(Protocol):
    """What the search loop needs from an architecture proposer."""

    name: str

    def ask(self, n: int) -> list[Architecture]: ...

    def train_sample(self, n: int) -> list[Architecture]: ...

    def tell(
        self, archs: Sequence[Architecture], rewards: Sequence[float]
    ) -> dict[str, float]: ...

    def derive(self, n: int) -> list[Architecture]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _param_names(num_nodes: int) -> list[str]:
    return [
        f"{cell}.node{node}.{kind}{slot}"
        for cell in ("normal", "reduce")
        for node in range(2, num_nodes + 2)
        for slot in (1, 2)
        for kind in ("in", "op")
    ]


def arch_distributions(
    num_nodes: int, primitives: Sequence[str] = PRIMITIVES
) -> dict[str, optuna.distributions.CategoricalDistribution]:
    """One categorical Optuna distribution per decision, in flat order (``normal.node2.in1``)."""
    out = {}
    for name in _param_names(num_nodes):
        node = int(name.split(".")[1][4:])
        choices = list(primitives) if ".op" in name else list(range(node))
        out[name] = optuna.distributions.CategoricalDistribution(choices)
    return out


def arch_params(arch: Architecture) -> dict[str, Any]:
    """The decisions of ``arch`` as Optuna params (input indices and op names)."""
    names = _param_names(arch.num_nodes)
    flat = arch.to_flat()
    return {
        name: arch.primitives[v] if ".op" in name else v for name, v in zip(names, flat)
    }


class Reinforce:
    """The ENAS controller and its REINFORCE update.

    Args:
        config: Controller settings (``lr``, ``baseline_decay``, ``entropy_weight``...).
        num_nodes: Computed nodes per cell.
        device: Where the controller runs.
    """

    name = "lstm"

    def __init__(self, config: ControllerConfig, num_nodes: int, device: torch.device) -> None:
        self.config = config
        self.controller = Controller(config, num_nodes).to(device)
        self.optimizer = torch.optim.Adam(  # ENAS: beta1 0, epsilon 1e-3
            self.controller.parameters(), lr=config.lr, betas=(config.adam_beta1, 0.999),
            eps=config.adam_eps)
        self.baseline = 0.0

    def ask(self, n: int) -> list[Architecture]:
        """``n`` architectures sampled from the policy."""
        with torch.no_grad():
            return self.controller.to_archs(self.controller(n).actions)

    derive = train_sample = ask

    def tell(self, archs: Sequence[Architecture], rewards: Sequence[float]) -> dict[str, float]:
        """One REINFORCE update from the rewards of ``archs`` (gradients averaged)."""
        actions = self.controller.encode(list(archs)).to(self.controller.g_emb.device)
        policy = self.controller(actions=actions)
        decay, losses, total = self.config.baseline_decay, [], []
        for k, acc in enumerate(rewards):
            reward = float(acc) + self.config.entropy_weight * policy.entropy[k].item()
            self.baseline -= (1.0 - decay) * (self.baseline - reward)
            losses.append(-policy.log_prob[k] * (reward - self.baseline))
            total.append(reward)
        loss = torch.stack(losses).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {
            "reward": sum(total) / len(total),
            "baseline": self.baseline,
            "entropy": policy.entropy.mean().item(),
            "loss": loss.item(),
            "log_prob": policy.log_prob.mean().item(),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "controller": self.controller.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "baseline": self.baseline,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state["controller"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline = float(state["baseline"])


class RandomProposer:
    """Uniform random architectures; ``tell`` only reports the mean reward.

    Args:
        num_nodes: Computed nodes per cell.
        seed: Seed of its own generator (saved in checkpoints).
    """

    name = "random"

    def __init__(self, num_nodes: int, seed: int = 0) -> None:
        self.num_nodes, self.rng = num_nodes, random.Random(seed)

    def ask(self, n: int) -> list[Architecture]:
        def cell() -> tuple:
            return tuple(
                (self.rng.randrange(i + 2), self.rng.randrange(len(PRIMITIVES)),
                 self.rng.randrange(i + 2), self.rng.randrange(len(PRIMITIVES)))
                for i in range(self.num_nodes)
            )

        return [Architecture(cell(), cell()) for _ in range(n)]

    derive = train_sample = ask

    def tell(self, archs: Sequence[Architecture], rewards: Sequence[float]) -> dict[str, float]:
        return {"reward": float(sum(rewards)) / max(1, len(rewards))}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": repr(self.rng.getstate())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import ast

        self.rng.setstate(ast.literal_eval(state["rng"]))


class TPEProposer:
    """Optuna's TPE over the decisions; proposals and rewards live in an Optuna study.

    Args:
        num_nodes: Computed nodes per cell.
        study: The study holding the proposals (its sampler should be TPE), opened with
            :func:`snexp.runtime.study.open_study`, which fails trials left running by dead
            workers.
    """

    name = "tpe"

    def __init__(self, num_nodes: int, study: optuna.Study, seed: int = 0) -> None:
        self.num_nodes, self.study = num_nodes, study
        self.distributions = arch_distributions(num_nodes)
        self._pending: list[optuna.trial.Trial] = []
        self._uniform = RandomProposer(num_nodes, seed)

    def train_sample(self, n: int) -> list[Architecture]:
        """Uniform architectures: TPE has no policy to train the shared weights with."""
        # NOTE: the shared weights of a TPE search are trained on uniform samples (as in
        # random search with weight sharing); TPE proposes only the rewarded architectures.
        return self._uniform.ask(n)

    def ask(self, n: int) -> list[Architecture]:
        archs = []
        for _ in range(n):
            trial = self.study.ask(self.distributions)
            params = trial.params
            flat = [
                PRIMITIVES.index(params[k]) if ".op" in k else params[k]
                for k in self.distributions
            ]
            self._pending.append(trial)
            archs.append(Architecture.from_flat(flat))
        return archs

    def tell(self, archs: Sequence[Architecture], rewards: Sequence[float]) -> dict[str, float]:
        if len(archs) != len(self._pending):
            raise ValueError(f"told {len(archs)} rewards for {len(self._pending)} proposals")
        for trial, reward in zip(self._pending, rewards):
            self.study.tell(trial, float(reward))
        self._pending = []
        return {"reward": float(sum(rewards)) / max(1, len(rewards))}

    def derive(self, n: int) -> list[Architecture]:
        """The ``n`` best distinct architectures told so far (random ones if none yet)."""
        done = [t for t in self.study.get_trials(deepcopy=False) if t.value is not None]
        seen: dict[tuple[int, ...], Architecture] = {}
        for trial in sorted(done, key=lambda t: -t.value):
            flat = [
                PRIMITIVES.index(trial.params[k]) if ".op" in k else trial.params[k]
                for k in self.distributions
            ]
            seen.setdefault(tuple(flat), Architecture.from_flat(flat))
            if len(seen) == n:
                break
        return list(seen.values()) or RandomProposer(self.num_nodes).ask(n)

    def state_dict(self) -> dict[str, Any]:
        return {"uniform": self._uniform.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Proposals left running by this worker's interrupted run were failed when the study
        # was opened (snexp.runtime.storage fails trials of dead processes); other workers' running
        # proposals in a shared study are theirs to finish.
        self._uniform.load_state_dict(state["uniform"])


def build_proposer(
    config: ControllerConfig,
    num_nodes: int,
    *,
    device: torch.device,
    seed: int = 0,
    study: optuna.Study | None = None,
) -> Proposer:
    """The proposer of ``config.kind``; ``tpe`` needs the ``study`` its trials go to."""
    if config.kind == "lstm":
        return Reinforce(config, num_nodes, device)
    if config.kind == "random":
        return RandomProposer(num_nodes, seed)
    if study is None:
        raise ValueError("the tpe proposer needs an Optuna study")
    return TPEProposer(num_nodes, study, seed)
