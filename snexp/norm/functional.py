"""Fused Switchable Normalization: one statistics pass, one normalize pass.

Follows Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization"
(arXiv 1806.10779), eq. 3-5. Per-(n, c) instance statistics are computed once from the input;
every other candidate (LN, GN, BN) is derived from them on small (N, C) tensors:

    mu_ln  = mean_c mu_in,     var_ln = mean_c var_in + mean_c (mu_in - mu_ln)^2
    mu_bn  = mean_n mu_in,     var_bn = mean_n var_in + mean_n (mu_in - mu_bn)^2
    mu     = sum_k p_k mu_k,   var    = sum_k q_k var_k
    y      = weight * (x - mu) / sqrt(var + eps) + bias

(the centered form of ``var_ln = mean_c(var_in + mu_in^2) - mu_ln^2``; the same value without
the cancellation). The forward pass reads the input in one statistics pass and writes the output
in one pass ``y = A * x + B`` with per-(n, c) coefficients. The backward pass reads ``dy`` and
``x`` once to get the two per-(n, c) sums it needs, back-propagates through the small (N, C)
graph with autograd, and writes ``dx`` in one elementwise pass. ``snexp.reference`` holds the
plain-autograd equations that the tests compare against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NormSpec", "parse_candidates", "switch_norm"]

_BASE_CANDIDATES = ("in", "ln", "bn")


def parse_candidates(candidates: tuple[str, ...] | list[str],
                     num_features: int) -> tuple[str, ...]:
    """Validate and normalize an ordered tuple of candidate normalizers.

    Args:
        candidates: any ordered subset of ``"in"``, ``"ln"``, ``"bn"`` and ``"gn<G>"``
            (group statistics with ``G`` groups, ``G`` dividing ``num_features``).
        num_features: the channel count ``C`` of the layer.

    Returns:
        The candidates as lower-case strings, in the given order.

    Example:
        >>> parse_candidates(["LN", "gn8"], 64)
        ('ln', 'gn8')
    """
    if isinstance(candidates, str):
        raise TypeError(f"candidates must be a tuple of names such as ('in', 'ln', 'bn'), "
                        f"got the string {candidates!r}")
    out = tuple(str(c).strip().lower() for c in candidates)
    if not out:
        raise ValueError("candidates must name at least one of 'in', 'ln', 'bn', 'gn<G>'")
    for c in out:
        if c in _BASE_CANDIDATES:
            continue
        if c.startswith("gn") and c[2:].isdigit() and int(c[2:]) > 0:
            groups = int(c[2:])
            if num_features % groups:
                raise ValueError(f"candidate {c!r}: {groups} groups do not divide "
                                 f"num_features={num_features}")
            continue
        raise ValueError(f"unknown candidate {c!r}; valid: 'in', 'ln', 'bn', 'gn<G>' "
                         f"(e.g. 'gn32')")
    if len(set(out)) != len(out):
        raise ValueError(f"candidates must not repeat a name, got {out}")
    return out


@dataclass(frozen=True)
class NormSpec:
    """The static options of a switch-norm call (hashable, so torch.compile sees constants).

    Attributes:
        candidates: normalized candidate names, e.g. ``("in", "ln", "bn")``.
        eps: added to the mixed variance before the square root.
        unbiased_in: use the unbiased (M - 1) per-(n, c) variance inside all derivations, as the
            authors' released code does (``compat="official"``).
        official_2d: (N, C) input in official mode: LN/BN variances unbiased over C / over N.
        process_group: for SyncSwitchNorm, the group whose ranks pool the BN statistics;
            ``None`` pools over the local batch only.
        sync: whether BN statistics are all-reduced across ``process_group``.
    """

    candidates: tuple[str, ...]
    eps: float = 1e-5
    unbiased_in: bool = False
    official_2d: bool = False
    sync: bool = False
    process_group: object = None


def _pool(t: Tensor, cand: str) -> Tensor:
    """Mean of an (N, C) statistic over the set a candidate pools, broadcastable to (N, C)."""
    if cand == "ln":
        return t.mean(1, keepdim=True)  # (N, 1)
    if cand == "bn":
        return t.mean(0, keepdim=True)  # (1, C)
    n, c = t.shape
    g = int(cand[2:])
    return t.view(n, g, c // g).mean(2, keepdim=True).expand(n, g, c // g).reshape(n, c)


def _bessel(cand: str, n: int, c: int) -> float:
    """Unbiased-variance factor for official-mode (N, C) input (pooled count k -> k/(k-1))."""
    k = {"ln": c, "bn": n}.get(cand, c // int(cand[2:]) if cand.startswith("gn") else 1)
    return k / (k - 1) if k > 1 else 1.0


def _batch_stats(mu_in: Tensor, var_in: Tensor, m: int, spec: NormSpec):
    """BN-branch mean/var (1, C) from IN statistics, and the number of values pooled."""
    if not spec.sync:
        mu_bn = mu_in.mean(0, keepdim=True)
        var_bn = var_in.mean(0, keepdim=True) + (mu_in - mu_bn).pow(2).mean(0, keepdim=True)
        return mu_bn, var_bn, mu_in.shape[0] * m
    from torch.distributed.nn.functional import all_reduce

    n = mu_in.shape[0]
    count = torch.full((1, 1), float(n), dtype=mu_in.dtype, device=mu_in.device)
    sums = torch.cat([mu_in.sum(0, keepdim=True),
                      (var_in + mu_in * mu_in).sum(0, keepdim=True),
                      count.expand(1, mu_in.shape[1])], 0)  # (3, C): sum, sum of squares, count
    sums = all_reduce(sums, group=spec.process_group)
    total = sums[2:3]
    mu_bn = sums[0:1] / total
    var_bn = (sums[1:2] / total - mu_bn * mu_bn).clamp_min(0)
    return mu_bn, var_bn, int(round(total[0, 0].item())) * m


def _coefficients(mu_in, var_in, weight, bias, mean_p, var_p, bn_mean, bn_var, m, spec):
    """Per-(n, c) scale ``A`` and centered shift ``Bc``: ``y = A * (x - mu_in) + Bc``.

    Returns (A, Bc, mu_bn, var_bn, count): the BN-branch batch statistics (or ``None`` when
    running statistics were given) for the running-average update.
    """
    n, c = mu_in.shape
    mu = var = None
    mu_bn = var_bn = None
    count = 0
    for k, cand in enumerate(spec.candidates):
        if cand == "in":
            mk, vk = mu_in, var_in
        elif cand == "bn" and bn_mean is not None:
            mk, vk = bn_mean.view(1, c), bn_var.view(1, c)
        elif cand == "bn":
            mu_bn, var_bn, count = _batch_stats(mu_in, var_in, m, spec)
            mk, vk = mu_bn, var_bn
        else:
            mk = _pool(mu_in, cand)
            vk = _pool(var_in, cand) + _pool((mu_in - mk).pow(2), cand)
        if spec.official_2d and not (cand == "bn" and bn_mean is not None):
            vk = vk * _bessel(cand, n, c)
            if cand == "bn":
                var_bn = vk
        mu = mean_p[k] * mk if mu is None else mu + mean_p[k] * mk
        var = var_p[k] * vk if var is None else var + var_p[k] * vk
    rstd = torch.rsqrt(var + spec.eps)  # (N, C)
    a = rstd if weight is None else weight.view(1, c) * rstd
    a = a.expand(n, c)
    bc = (mu_in - mu) * a  # (N, C)
    if bias is not None:
        bc = bc + bias.view(1, c)
    return a, bc, mu_bn, var_bn, count


def _instance_stats(x: Tensor, dims: tuple[int, ...], m: int, unbiased: bool):
    """One statistics pass: per-(n, c) mean and variance in float32 (or float64)."""
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    mu = x.mean(dims, keepdim=True, dtype=stat_dtype)  # (N, C, 1, ...)
    # NOTE: a centered second read (x - mu) instead of a one-pass sum of squares, which loses
    # all digits when |mean| >> std; ATen's one-pass Welford var_mean is ~10x slower on CPU.
    denom = m - 1 if (unbiased and m > 1) else m
    var = torch.linalg.vector_norm(x - mu, 2, dims).pow(2) / denom  # (N, C)
    return mu.flatten(1), var


def _grad_sums(dy: Tensor, x: Tensor, mu_in: Tensor, dims: tuple[int, ...]):
    """One reduction pass: S1 = sum dy and S2 = sum dy * (x - mu_in) per (n, c)."""
    n, c = mu_in.shape
    fast = (x.dtype == mu_in.dtype and dy.dtype == x.dtype and x.is_contiguous()
            and dy.is_contiguous() and x.device.type == "cpu")
    if fast:
        # The native batch-norm backward on a (1, N*C, M) view computes both per-row sums in
        # one fused read of dy and x (grad_weight = S2 with invstd 1, grad_bias = S1).
        rows = n * c
        _, s2, s1 = torch.ops.aten.native_batch_norm_backward(
            dy.view(1, rows, -1), x.view(1, rows, -1), None, None, None,
            mu_in.reshape(rows), torch.ones_like(mu_in).reshape(rows), True, 0.0,
            [False, True, True])
        return s1.view(n, c), s2.view(n, c)
    shape = mu_in.shape + (1,) * len(dims)
    s1 = dy.sum(dims, dtype=mu_in.dtype)
    s2 = (dy * (x - mu_in.view(shape))).sum(dims, dtype=mu_in.dtype)
    return s1, s2


class _SwitchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mean_p, var_p, bn_mean, bn_var, spec):
        dims = tuple(range(2, x.dim()))
        m = math.prod(x.shape[2:])
        mu_in, var_in = _instance_stats(x, dims, m, spec.unbiased_in)
        a, bc, mu_bn, var_bn, count = _coefficients(
            mu_in, var_in, weight, bias, mean_p, var_p, bn_mean, bn_var, m, spec)
        shape = a.shape + (1,) * len(dims)
        b = bc - a * mu_in  # (N, C): y = A * x + B
        y = torch.addcmul(b.view(shape), x, a.view(shape)).to(x.dtype)
        ctx.save_for_backward(x, weight, bias, mean_p, var_p, bn_mean, bn_var, mu_in, var_in)
        ctx.spec, ctx.m = spec, m
        if mu_bn is None:
            return y, None, None, count
        mu_bn, var_bn = mu_bn.flatten(), var_bn.flatten()
        ctx.mark_non_differentiable(mu_bn, var_bn)
        return y, mu_bn, var_bn, count

    @staticmethod
    def backward(ctx, dy, _dmu_bn, _dvar_bn, _dcount):
        x, weight, bias, mean_p, var_p, bn_mean, bn_var, mu_in, var_in = ctx.saved_tensors
        spec, m = ctx.spec, ctx.m
        dims = tuple(range(2, x.dim()))
        s1, s2 = _grad_sums(dy, x, mu_in, dims)  # (N, C) each
        need = ctx.needs_input_grad
        leaves = {"mu_in": mu_in, "var_in": var_in, "weight": weight, "bias": bias,
                  "mean_p": mean_p, "var_p": var_p}
        wanted = {"mu_in": need[0], "var_in": need[0], "weight": need[1], "bias": need[2],
                  "mean_p": need[3], "var_p": need[4]}
        with torch.enable_grad():
            req = {k: (v.detach().requires_grad_() if (v is not None and wanted[k]) else v)
                   for k, v in leaves.items()}
            a, bc, *_ = _coefficients(req["mu_in"], req["var_in"], req["weight"], req["bias"],
                                      req["mean_p"], req["var_p"], bn_mean, bn_var, m, spec)
            inputs = [k for k in leaves if wanted[k] and leaves[k] is not None]
            grads = dict(zip(inputs, torch.autograd.grad(
                (a, bc), [req[k] for k in inputs], (s2, s1), allow_unused=True)))
        dx = None
        if need[0]:
            a = a.detach()
            shape = a.shape + (1,) * len(dims)
            dmu = -a * s1  # y = A * (x - mu_in) + Bc depends on mu_in directly too
            if grads.get("mu_in") is not None:
                dmu = dmu + grads["mu_in"]
            dvar = grads.get("var_in")
            denom = m - 1 if (spec.unbiased_in and m > 1) else m
            p = torch.zeros_like(dmu) if dvar is None else dvar * (2.0 / denom)
            q = dmu / m - p * mu_in
            dx = torch.addcmul(q.view(shape), x, p.view(shape))  # (N, C, *S)
            dx.addcmul_(dy, a.view(shape))
            dx = dx.to(x.dtype)
        return (dx, grads.get("weight"), grads.get("bias"), grads.get("mean_p"),
                grads.get("var_p"), None, None, None)


def switch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean_p: Tensor,
    var_p: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    spec: NormSpec,
    training: bool,
    momentum: float | None = 0.1,
    update_running: bool = True,
    num_batches_tracked: Tensor | None = None,
    compat: str = "paper",
) -> Tensor:
    """Switchable Normalization of ``x`` (N, C, *) with importance probabilities given.

    Args:
        x: input of shape (N, C) or (N, C, *spatial), any float dtype and memory layout.
        weight, bias: affine parameters (C,) or ``None`` for none.
        mean_p, var_p: importance weights (K,) over ``spec.candidates`` (already passed
            through softmax or sparsestmax).
        running_mean, running_var: BN-branch running statistics (C,), or ``None`` when "bn" is
            not a candidate.
        spec: the static options (:class:`NormSpec`).
        training: use batch statistics for the BN branch (else the running statistics).
        momentum: PyTorch convention, ``new = (1 - m) * old + m * batch``; ``None`` is a
            cumulative average over ``num_batches_tracked`` batches.
        update_running: blend batch statistics into the running buffers (in place).
        num_batches_tracked: counter used when ``momentum`` is ``None`` (already incremented).
        compat: "paper" updates the running variance with the unbiased batch variance (as
            ``nn.BatchNorm2d``); "official" with the authors' BN variance as is.

    Returns:
        The normalized tensor, same shape, dtype and layout as ``x``.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x = x.unsqueeze(-1)  # (N, C, 1)
    use_batch = training or running_mean is None
    bn_mean = None if use_batch else running_mean
    bn_var = None if use_batch else running_var
    y, mu_bn, var_bn, count = _SwitchNormFunction.apply(
        x, weight, bias, mean_p, var_p, bn_mean, bn_var, spec)
    if training and update_running and running_mean is not None and mu_bn is not None:
        with torch.no_grad():
            if compat == "paper" and count > 1:
                var_bn = var_bn * (count / (count - 1))
            if momentum is None:
                factor = 1.0 / float(num_batches_tracked) if num_batches_tracked else 1.0
            else:
                factor = momentum
            running_mean.lerp_(mu_bn.to(running_mean.dtype), factor)
            running_var.lerp_(var_bn.to(running_var.dtype), factor)
    return y.squeeze(-1) if squeeze else y
