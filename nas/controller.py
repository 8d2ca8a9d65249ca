"""The ENAS controller: an LSTM policy over micro-space architectures (Pham et al. 2018, Sec. 2.3).

Follows the official ``micro_controller.py`` (CIFAR-10 settings): a 1-layer LSTM with 64 units
and no bias, every weight initialized uniform(-0.1, 0.1). For each computed node it makes four
decisions in the order ``in_1, in_2, op_1, op_2`` (stored ENAS-style as ``in_1, op_1, in_2,
op_2``):

- an input: attention over the previous nodes' anchors,
  ``logits = v^T tanh(W_1 h_j + W_2 h)``, bounded as ``1.10 * tanh(logits)``;
- an op: ``logits = W_soft h + b_soft``, bounded as ``(1.10 / 2.5) * tanh(logits)``, plus the
  fixed bias ``[0.25, 0.25, -0.25, ...]`` in the normal cell.

The normal cell is sampled first; the reduction cell continues from its final LSTM state, so it
is conditioned on it. ``b_soft`` starts at ``[10, 10, 0, ...]`` as in the official code.

``norm`` (SN paper, Sec. 5, the ENAS controller experiment) normalizes the LSTM gate
pre-activations and the cell state per sample: ``ln``, ``gn`` (``groups`` groups) or ``sn``, a
:class:`snexp.SwitchNorm1d` mixing LN and GN (BN is impossible with one sample); a spec's own
options win (``gn(groups=8)``, ``sn(candidates=ln+gn8)``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from nas.space import PRIMITIVES, Architecture
from snexp import NormSpec

__all__ = ["CONTROLLER_NORM_KINDS", "Controller", "ControllerConfig", "Policy",
           "controller_norm"]

# The snexp.NORM_KINDS the LSTM takes: per-sample norms (BN needs a batch, and the controller
# samples one architecture at a time; IN has no positions to average over in (n, C)).
CONTROLLER_NORM_KINDS = ("none", "ln", "gn", "sn")


@dataclass(frozen=True)
class ControllerConfig:
    """The architecture proposer and its REINFORCE training (ENAS CIFAR-10 micro settings)."""

    kind: Literal["lstm", "random", "tpe"] = "lstm"  # lstm (ENAS), random or tpe (Optuna)
    lstm_size: int = 64  # LSTM hidden units
    tanh_constant: float = 1.10  # input logits are tanh_constant * tanh(logits)
    op_tanh_reduce: float = 2.5  # op logits are (tanh_constant / op_tanh_reduce) * tanh(...)
    temperature: float | None = None  # divide logits by this before the tanh (none: off)
    op_bias: bool = True  # ENAS's fixed op bias [0.25, 0.25, -0.25, ...] in the normal cell
    norm: NormSpec = NormSpec("none")  # normalization inside the LSTM: none, ln, gn or sn
    groups: int = 4  # groups of gn, and of the gn candidate of sn (unless the spec sets them)
    lr: float = 0.0035  # Adam learning rate
    adam_beta1: float = 0.0  # Adam beta1 (ENAS: 0, no momentum on the policy gradient)
    adam_eps: float = 1e-3  # Adam epsilon (ENAS: 1e-3)
    baseline_decay: float = 0.99  # moving-average baseline decay
    entropy_weight: float = 1e-4  # entropy bonus added to the reward
    train_steps: int = 30  # controller updates per epoch
    num_aggregate: int = 10  # sampled architectures per update (gradients averaged)
    tpe_startup: int = 10  # random proposals before TPE models the rewards

    def __post_init__(self) -> None:
        if self.lstm_size < 1 or self.train_steps < 0 or self.num_aggregate < 1:
            raise ValueError("lstm_size and num_aggregate must be >= 1, train_steps >= 0")
        norm = NormSpec.parse(self.norm)
        object.__setattr__(self, "norm", norm)
        if norm.kind not in CONTROLLER_NORM_KINDS:
            raise ValueError(f"controller.norm '{norm}': the LSTM normalizes one sample at a "
                             f"time, so its norm is one of {', '.join(CONTROLLER_NORM_KINDS)} "
                             f"(e.g. --set controller.norm=sn)")
        layer = controller_norm(self)
        try:  # the gates' and the cell state's widths
            layer(4 * self.lstm_size), layer(self.lstm_size)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"controller.norm '{norm}' with groups={self.groups} and "
                             f"lstm_size={self.lstm_size}: {exc}") from None
        if not 0.0 <= self.adam_beta1 < 1.0 or not self.adam_eps > 0.0:
            raise ValueError(f"adam_beta1 must be in [0, 1) and adam_eps > 0, got "
                             f"{self.adam_beta1} and {self.adam_eps}")
        if not 0.0 <= self.baseline_decay < 1.0:
            raise ValueError(f"baseline_decay must be in [0, 1), got {self.baseline_decay}")


class Policy(NamedTuple):
    """One forward pass of the controller over ``n`` architectures."""

    actions: torch.Tensor  # (n, 8B) flat architectures (ENAS order)
    log_prob: torch.Tensor  # (n,) sum of the decisions' log-probabilities
    entropy: torch.Tensor  # (n,) sum of the decisions' entropies
    logits: list[torch.Tensor]  # per decision in sampling order, (n, choices)
    positions: list[int]  # per decision, its index in the flat architecture


def controller_norm(config: ControllerConfig) -> Callable[[int], nn.Module]:
    """The LSTM's ``norm_layer(channels)`` over ``(n, C)``, from ``config.norm``: a bare ``sn``
    is the SN paper's controller norm (a learned mix of LN and GN with ``config.groups``
    groups), a bare ``gn`` has ``config.groups`` groups; options of the spec win."""
    options = dict(config.norm.options)
    if config.norm.kind == "sn":
        options.setdefault("candidates", ("ln", f"gn{config.groups}"))
    if config.norm.kind == "gn":
        options.setdefault("groups", config.groups)
    return NormSpec(config.norm.kind, options).layer(dims=1)


class _LSTMCell(nn.Module):
    """ENAS's bias-free LSTM cell, optionally normalizing gates and cell state per sample."""

    def __init__(self, size: int, norm_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.w = nn.Linear(2 * size, 4 * size, bias=False)
        self.norm_gates = norm_layer(4 * size)
        self.norm_cell = norm_layer(size)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, c = state
        gates = self.norm_gates(self.w(torch.cat([x, h], dim=1)))  # (n, 4H)
        i, f, o, g = gates.chunk(4, dim=1)
        c = torch.sigmoid(i) * torch.tanh(g) + torch.sigmoid(f) * c
        return torch.sigmoid(o) * torch.tanh(self.norm_cell(c)), c


class Controller(nn.Module):
    """LSTM policy over (normal, reduction) cells with ``num_nodes`` computed nodes each.

    Args:
        config: Controller settings (``lstm_size``, tanh constants, ``norm``...).
        num_nodes: Computed nodes per cell (``B``).
        primitives: The op names (their count is the op choice size).

    Example:
        >>> ctrl = Controller(ControllerConfig(), num_nodes=5)
        >>> arch, log_prob, entropy = ctrl.sample()
    """

    def __init__(
        self,
        config: ControllerConfig = ControllerConfig(),
        num_nodes: int = 5,
        primitives: tuple[str, ...] = PRIMITIVES,
    ) -> None:
        super().__init__()
        self.config, self.num_nodes, self.primitives = config, num_nodes, tuple(primitives)
        size, ops = config.lstm_size, len(self.primitives)
        self.lstm = _LSTMCell(size, controller_norm(config))
        self.g_emb = nn.Parameter(torch.empty(1, size))
        self.w_emb = nn.Embedding(ops, size)
        self.w_soft = nn.Linear(size, ops, bias=False)
        self.b_soft = nn.Parameter(torch.empty(ops))
        self.w_attn_1 = nn.Linear(size, size, bias=False)
        self.w_attn_2 = nn.Linear(size, size, bias=False)
        self.v_attn = nn.Linear(size, 1, bias=False)
        bias = torch.full((ops,), -0.25)
        bias[:2] = 0.25
        self.register_buffer("op_bias", bias if config.op_bias else torch.zeros(ops))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """uniform(-0.1, 0.1) everywhere but in the norm layers; ``b_soft`` [10, 10, 0, ...]."""
        norm_layers = (self.lstm.norm_gates, self.lstm.norm_cell)
        norms = {id(p) for m in norm_layers for p in m.parameters()}
        for p in self.parameters():
            if id(p) not in norms:
                nn.init.uniform_(p, -0.1, 0.1)
        with torch.no_grad():
            self.b_soft.zero_()
            self.b_soft[:2] = 10.0

    def _bound(self, logits: torch.Tensor, constant: float) -> torch.Tensor:
        if self.config.temperature is not None:
            logits = logits / self.config.temperature
        return constant * torch.tanh(logits)

    def forward(self, n: int = 1, actions: torch.Tensor | None = None) -> Policy:
        """Sample ``n`` architectures, or score given ``actions`` ``(n, 8B)`` (teacher forcing)."""
        if actions is not None:
            n = actions.shape[0]
        device, cfg = self.g_emb.device, self.config
        h = c = torch.zeros(n, cfg.lstm_size, device=device)
        out = torch.zeros(n, 8 * self.num_nodes, dtype=torch.long, device=device)
        log_prob = torch.zeros(n, device=device)
        entropy = torch.zeros(n, device=device)
        all_logits: list[torch.Tensor] = []
        positions: list[int] = []
        rows = torch.arange(n, device=device)

        def decide(logits: torch.Tensor, pos: int) -> torch.Tensor:
            nonlocal log_prob, entropy
            log_p = torch.log_softmax(logits, dim=1)  # (n, k)
            if actions is None:
                choice = torch.multinomial(log_p.detach().exp(), 1).squeeze(1)
            else:
                choice = actions[:, pos].to(device)
            out[:, pos] = choice
            log_prob = log_prob + log_p[rows, choice]
            entropy = entropy - (log_p.exp() * log_p).sum(1)
            all_logits.append(logits)
            positions.append(pos)
            return choice

        for cell in range(2):
            x = self.g_emb.expand(n, -1)
            anchors, anchors_w = [], []
            for _ in range(2):  # the two input nodes
                h, c = self.lstm(x, (h, c))
                anchors.append(torch.zeros_like(h))
                anchors_w.append(self.w_attn_1(h))
            for node in range(2, self.num_nodes + 2):
                base = cell * 4 * self.num_nodes + 4 * (node - 2)
                for slot in range(2):
                    h, c = self.lstm(x, (h, c))
                    query = torch.tanh(torch.stack(anchors_w) + self.w_attn_2(h))  # (node, n, H)
                    logits = self._bound(self.v_attn(query).squeeze(2).t(), cfg.tanh_constant)
                    index = decide(logits, base + 2 * slot)
                    x = torch.stack(anchors)[index, rows]  # (n, H)
                for slot in range(2):
                    h, c = self.lstm(x, (h, c))
                    logits = self._bound(
                        self.w_soft(h) + self.b_soft, cfg.tanh_constant / cfg.op_tanh_reduce
                    )
                    if cell == 0:
                        logits = logits + self.op_bias
                    x = self.w_emb(decide(logits, base + 2 * slot + 1))
                h, c = self.lstm(x, (h, c))
                anchors.append(h)
                anchors_w.append(self.w_attn_1(h))
                x = self.g_emb.expand(n, -1)
        return Policy(out, log_prob, entropy, all_logits, positions)

    def to_archs(self, actions: torch.Tensor) -> list[Architecture]:
        """Architectures of flat action rows ``(n, 8B)``."""
        return [Architecture.from_flat(row, self.primitives) for row in actions.tolist()]

    def encode(self, archs: list[Architecture]) -> torch.Tensor:
        """Flat action rows ``(n, 8B)`` of architectures (for :meth:`forward`)."""
        return torch.tensor([a.to_flat() for a in archs], dtype=torch.long)

    def sample(self) -> tuple[Architecture, torch.Tensor, torch.Tensor]:
        """One architecture with its log-probability and entropy (scalar tensors with grad)."""
        policy = self(1)
        return self.to_archs(policy.actions)[0], policy.log_prob[0], policy.entropy[0]
