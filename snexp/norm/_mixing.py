"""Switchable Normalization in ATen ops: every case, on any device (the reference backend).

Luo et al., "Differentiable Learning-to-Normalize via Switchable Normalization" (arXiv
1806.10779), eq. 3-5. One statistics pass gives per-(n, c) ``mu_in``, ``var_in``; every
candidate's statistics are derived from them (LN pools over C, BN over N, GN over groups):

    mu_k  = P_k mu_in,    var_k = P_k var_in + P_k (mu_in - mu_k)^2
    mu    = sum_k p_k mu_k,   var = sum_k q_k var_k,   y = a (x - mu_in) + b

with ``a = weight / sqrt(var + eps)`` and ``b = bias - (mu - mu_in) a``. The two rows (means,
variances) travel stacked as one (2, N, C) tensor and are mixed by one product and sum, so the
op count does not grow with the candidates. Backward, from ``s1 = sum dy`` and
``s2 = sum dy (x - mu_in)`` per (n, c), with ``g = s2 - (mu - mu_in) s1``:
``dmu = -a s1``, ``dvar = -a rstd^2 g / 2``, ``dweight = sum_n g rstd``, ``dbias = sum_n s1``,
and for each pooled candidate (pooling P_k is self-adjoint)
``dmu_in += P_k(p_k dmu) + 2 (mu_in - mu_k) P_k(q_k dvar)``, ``dvar_in += P_k(q_k dvar)``;
then ``dx = a dy + p x + q`` with ``p = 2 dvar_in / M'`` and ``q = dmu_in / M - p mu_in``.
The code is in pieces, each one pass or one (N, C)-sized step: :func:`stats` ->
:func:`mix` -> :func:`normalize` forward, :func:`grad_sums` -> :func:`mix_backward` ->
:func:`input_grad` backward; :func:`forward` and :func:`backward` compose them. The C++ CPU
passes plug in inside the pieces: the full-size ones, and on plain CPU tensors the (N, C)
middle too (``snexp_cpu.mix``/``mix_backward``: these equations as loops, without ~60 small
ATen calls per direction; tested against the ATen code here, which stays the reference).
``snexp.norm.op`` chooses between them and the Triton kernels (which are built from these
pieces, so this module imports no backend) and wraps that into the ``snexp::switch_norm`` op
and its eager form.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from snexp.norm import _cpu

__all__: list[str] = []


@dataclass(frozen=True)
class Options:
    """The static options of one SN computation (the op's non-tensor arguments, parsed).

    Attributes:
        candidates: normalized candidate names, e.g. ``("in", "ln", "bn")``.
        eps: added to the mixed variance before the square root.
        unbiased_in: use the unbiased (M - 1) per-(n, c) variance inside all derivations, as the
            authors' released code does (``compat="official"``).
        official_2d: (N, C) input in official mode: LN/BN variances unbiased over C / over N.
        sync: whether BN statistics are all-reduced across ``process_group``.
        process_group: for SyncSwitchNorm, the group whose ranks pool the BN statistics.
    """

    candidates: tuple[str, ...]
    eps: float = 1e-5
    unbiased_in: bool = False
    official_2d: bool = False
    sync: bool = False
    process_group: object = None


def bessel(cand: str, n: int, c: int) -> float:
    """Unbiased-variance factor for official-mode (N, C) input (pooled count k -> k/(k-1))."""
    k = {"ln": c, "bn": n}.get(cand, c // int(cand[2:]) if cand.startswith("gn") else 1)
    return k / (k - 1) if k > 1 else 1.0


def variance_denominator(spec, m: int) -> int:
    """What the per-(n, c) sum of squared deviations over ``m`` values is divided by: ``m``,
    or ``m - 1`` (unbiased) in official mode."""
    return m - 1 if (spec.unbiased_in and m > 1) else m


def _native(spec, t: Tensor) -> bool:
    """Whether the C++ (N, C) middle (``snexp_cpu.mix``/``mix_backward``) replaces the ATen
    one: the C++ passes apply to ``t`` (plain CPU tensors: traced ones keep the ATen ops) and
    the layer pools locally, in paper or official mode on (N, C, *S) input (SyncSwitchNorm's
    all-reduce and official (N, C) Bessel factors stay here)."""
    return not (spec.sync or spec.official_2d) and _cpu.usable(t)


@functools.lru_cache(maxsize=256)
def _codes(candidates: tuple[str, ...]) -> tuple[int, ...]:
    """The C++ middle's candidate codes: 0 = in, 1 = ln, 2 = bn, 2 + G = gn<G>."""
    return tuple({"in": 0, "ln": 1, "bn": 2}[c] if c in ("in", "ln", "bn") else 2 + int(c[2:])
                 for c in candidates)


def _sync_sums(t: Tensor, spec) -> Tensor:
    """All-reduce (sum) a small tensor across ``spec.process_group`` (no autograd)."""
    torch.distributed.all_reduce(t, group=spec.process_group)
    return t


def _pooled(stats: Tensor, dim: int) -> Tensor | list[Tensor]:
    """[mean of mu_in; mean of var_in + var of mu_in] over ``dim`` of stacked IN statistics:
    one (2, ...) tensor, or where a graph is traced its two rows as a list."""
    if type(stats) is not Tensor and dim != 1:
        # NOTE: LN and GN row by row where a graph is traced, one reduction each: (N,)-sized
        # like the other per-sample steps, which inductor then fuses into the same loop nest
        # (pooled as a (2, N) pair they took a nest, and an OpenMP barrier, of their own). BN's
        # pair stays one (2, 1, C) tensor: as two rows it becomes a stack (a buffer and a view
        # per row in the generated Python: docs/layers.md, "Compiled SN at small shapes").
        mean = stats[0].mean(dim - 1, keepdim=True)
        return [mean, (stats[1] + (stats[0] - mean).square()).mean(dim - 1, keepdim=True)]
    mean = stats.mean(dim, keepdim=True)  # [mu_k; mean of var_in]
    # NOTE: mean of squared deviations, not torch.var_mean: on CPU its Welford kernel is several
    # times slower for these small reductions over dim 0.
    dev = stats[0] - mean[0]
    mean[1].add_(dev.square().mean(dim - 1, keepdim=True))
    return mean


def _batch_stats(stats: Tensor, m: int, spec) -> tuple[Tensor, int | Tensor]:
    """BN-branch [mean; var] (2, 1, C) from IN statistics (2, N, C), and the values pooled
    (a 0-d tensor on the device under SyncSwitchNorm: no host synchronization)."""
    n, c = stats.shape[1:]
    local = _pooled(stats, 1)  # (2, 1, C): this rank's mean and biased variance
    if not spec.sync:
        return local, n * m
    if isinstance(local, list):
        local = torch.stack(local)
    # Chan et al.'s pairwise combination, all ranks at once: M2 = sum_r M2_r + sum_r n_r
    # (mean_r - mean)^2. Each rank sends (count, mean, var) per channel (3 x C numbers); the
    # one-pass form (pooled sums of x^2 minus the squared mean) loses every digit when
    # |mean| >> std, which is what the single-process path avoids too.
    part = torch.cat([local.view(2, c), stats.new_full((1, c), float(n))])  # (3, C)
    world = torch.distributed.get_world_size(spec.process_group)
    parts = [torch.empty_like(part) for _ in range(world)]
    torch.distributed.all_gather(parts, part, group=spec.process_group)
    means, variances, counts = torch.stack(parts).unbind(1)  # (R, C) each
    total = counts.sum(0)  # (C,)
    weights = counts / total  # ranks without samples weigh 0 (their NaN mean is dropped)
    mean = torch.where(counts > 0, weights * means, 0).sum(0)
    dev = torch.where(counts > 0, means - mean, 0)
    var = torch.where(counts > 0, weights * (variances + dev * dev), 0).sum(0)
    return torch.stack([mean, var]).view(2, 1, c), total[0] * m


def _candidate_terms(stats: Tensor, bn_mean: Tensor | None, bn_var: Tensor | None, m: int,
                     spec, cands: Tensor | None = None, n_total=0
                     ) -> tuple[list[tuple[Tensor | None, Tensor]], Tensor | None, int | Tensor]:
    """Every candidate's ``(mu_k - mu_in, var_k)``, each in its broadcast shape ((N, C) for IN
    and GN, (N, 1) for LN, (1, C) for BN; IN's offset is None: exactly 0), the BN batch
    statistics (2, C) or None, and their count.

    Means are mixed as offsets from mu_in (sum_k p_k = 1): a constant input then gives exactly
    mu = mu_in instead of a rounding error amplified by 1/sqrt(eps). The backward derives the
    terms again from the saved IN statistics, except a BN candidate that is not a function of
    them (running statistics: ``n_total`` None; SyncSwitchNorm's pooled ones), which it reads
    from the forward's stacked candidates ``cands``. Under torch.compile the stack is then
    dead code: no (2, K, N, C) buffer and no copies into it.
    """
    _, n, c = stats.shape
    mu_in = stats[0]
    terms: list[tuple[Tensor | None, Tensor]] = []
    batch, count = None, 0
    for i, cand in enumerate(spec.candidates):
        if cand == "in":
            terms.append((None, stats[1]))
            continue
        if cand == "bn" and cands is not None and (spec.sync or n_total is None):
            terms.append((cands[0, i], cands[1, i]))
            continue
        if cand == "bn" and bn_mean is not None:
            t = torch.stack([bn_mean, bn_var]).view(2, 1, c).to(stats.dtype)
        else:
            if cand == "bn":
                t, count = _batch_stats(stats, m, spec)  # (2, 1, C)
            elif cand == "ln":
                t = _pooled(stats, 2)  # (2, N, 1)
            else:
                g = int(cand[2:])
                t = _pooled(stats.view(2, n, g, c // g), 3)
                if isinstance(t, list):
                    t = [r.expand(n, g, c // g).reshape(n, c) for r in t]
                else:
                    t = t.expand(2, n, g, c // g).reshape(2, n, c)
            if spec.official_2d:
                t[1] = t[1] * bessel(cand, n, c)
            if cand == "bn":
                batch = (torch.stack(t) if isinstance(t, list) else t).view(2, c)
        terms.append((t[0] - mu_in, t[1]))
    return terms, batch, count


def _mixed(terms, probs: Tensor) -> tuple[Tensor, Tensor]:
    """[mu - mu_in, var] = sum_k [p_k (mu_k - mu_in), q_k var_k], each row by its own weights
    (``probs`` (2, K)), in the terms' broadcast shape."""
    mean = var = None
    for i, (off, v) in enumerate(terms):
        if off is not None:
            t = off * probs[0, i]
            mean = t if mean is None else mean + t
        t = v * probs[1, i]
        var = t if var is None else var + t
    if mean is None:  # IN alone: mu = mu_in
        mean = torch.zeros_like(var)
    return mean, var


def _pooled_adjoint(d: Tensor, cand: str, spec, n_total) -> Tensor | None:
    """P_k(d) over the last two dims (N, C) of ``d`` (one (N, C) row or a (2, N, C) pair), in
    the candidate's broadcast shape (None: BN on running statistics, a constant of the
    backward; pooling is self-adjoint)."""
    n, c = d.shape[-2:]
    if cand == "in":
        return d
    if cand == "ln":
        return d.mean(-1, keepdim=True)  # (..., N, 1)
    if cand == "bn":
        if n_total is None:
            return None
        if spec.sync:
            return _sync_sums(d.sum(-2, keepdim=True), spec) / n_total
        return d.mean(-2, keepdim=True)  # (..., 1, C)
    g = int(cand[2:])
    lead = d.shape[:-2]
    t = d.view(*lead, n, g, c // g).mean(-1, keepdim=True).expand(*lead, n, g, c // g)
    return t.reshape(d.shape)


def _adjoint_sums(d: Tensor, w: Tensor, terms, spec, n_total: int | None
                  ) -> tuple[Tensor, Tensor | None] | None:
    """The pooled adjoints of ``d`` (2, N, C), summed over the candidates with weights ``w``
    (2, K): ``e = sum_k w_k P_k(d)`` (2, N, C) and ``corr = sum_k off_k w_1k P_k(d_1)``
    (N, C, None when no candidate has an offset), ``off_k = mu_k - mu_in`` from ``terms``
    (:func:`_candidate_terms`). A BN candidate on running statistics (``n_total is None``) is
    constant and left out; None when nothing is left.

    Each term stays in its candidate's broadcast shape ((2, N, 1) for LN, (2, 1, C) for BN): no
    (2, K, N, C) stack, which under torch.compile is one more buffer per step.
    """
    _, n, c = d.shape
    e = corr = None
    for i, cand in enumerate(spec.candidates):
        t = _pooled_adjoint(d, cand, spec, n_total)  # (2, N, 1) for LN, (2, 1, C) for BN
        if t is None:
            continue
        t = t * w[:, i].view(2, 1, 1)  # -[p_k P_k(dmu); 2 q_k P_k(dvar)]
        e = t if e is None else e + t
        off = terms[i][0]
        if off is not None:  # (IN's offset is exactly 0)
            term = off * t[1]
            corr = term if corr is None else corr + term
    if e is None:
        return None
    return e.expand(2, n, c), corr


def centered(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Statistics pass: per-(n, c) mean (N, C), the rows' L2 norms of x - mean (N, C), and
    the centered input ``x - mean`` in the statistics dtype (float32, or float64 for float64
    input): a fresh buffer, same layout as x, which the normalize pass then overwrites."""
    dims = tuple(range(2, x.dim()))
    mu = x.mean(dims, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    # NOTE: a centered second read (x - mu) instead of a one-pass sum of squares, which loses
    # all digits when |mean| >> std; ATen's one-pass Welford var_mean is much slower on CPU.
    xc = torch.sub(x, mu)  # (N, C, *S)
    nrm = torch.linalg.vector_norm(xc, 2, dims)  # (N, C)
    return mu.view(nrm.shape), nrm, xc


_ones: dict[tuple[int, torch.dtype], Tensor] = {}


def grad_sums(dy: Tensor, x: Tensor, mu: Tensor) -> tuple[Tensor, Tensor]:
    """One reduction pass: s1 = sum dy and s2 = sum dy * (x - mu) per (n, c), each (N, C)."""
    n, c = mu.shape
    if (type(x) is Tensor and type(dy) is Tensor and x.dtype == mu.dtype
            and dy.dtype == x.dtype and x.is_contiguous() and dy.is_contiguous()
            and x.is_cpu):
        # The native batch-norm backward on a (1, N*C, M) view computes both per-row sums in
        # one fused read of dy and x (grad_weight = s2 with invstd 1, grad_bias = s1).
        rows = n * c
        ones = _ones.get((rows, x.dtype))
        if ones is None:  # (plain tensors only: a cached one must not leak into a trace)
            ones = torch.ones(rows, dtype=x.dtype)
            if len(_ones) >= 64:
                _ones.clear()
            _ones[(rows, x.dtype)] = ones
        _, s2, s1 = torch.ops.aten.native_batch_norm_backward(
            dy.view(1, rows, -1), x.view(1, rows, -1), None, None, None, mu.view(rows), ones,
            True, 0.0, [False, True, True])
        return s1.view(n, c), s2.view(n, c)
    dims = tuple(range(2, x.dim()))
    s1 = dy.sum(dims, dtype=mu.dtype)
    s2 = (dy * (x - mu.view(mu.shape + (1,) * len(dims)))).sum(dims, dtype=mu.dtype)
    return s1, s2


def _normalize_aten(xc: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """y = a * xc + b, written over ``xc`` (a, b broadcastable per (n, c))."""
    # NOTE: two in-place binary passes; ATen's ternary addcmul with two broadcast operands
    # takes a scalar loop on CPU, far slower than mul_ + add_.
    return xc.mul_(a).add_(b)


def _input_grad_aten(x: Tensor, dy: Tensor, a: Tensor, p: Tensor, q: Tensor) -> Tensor:
    """dx = a dy + p x + q in three elementwise ops (one allocation), in the dtype of a."""
    return torch.mul(x, p).add_(q).addcmul_(dy, a)


def _per_row(*coefs: Tensor) -> tuple[Tensor, ...]:
    """The (N, C) coefficients of a full-size pass, as one stacked buffer where a CPU graph is
    being traced (a tensor subclass: ``torch.compile``'s fake/functional tensors).

    Inductor otherwise inlines their arithmetic (a square root, the mixing sums) into the pass
    that reads them, and the C++ it generates for CPU recomputes it for every vector of every
    row. A stack is always materialized, so each row's coefficients are computed once: compiled
    SN / compiled BN at (4, 256, 14, 14) went from 1.28-1.32 to 1.26-1.27 (fwd+bwd) and from
    1.67-1.80 to 1.54-1.68 (eval). Plain tensors, and GPU graphs (where recomputing is cheaper
    than one more launch), pass unchanged.
    """
    if type(coefs[0]) is Tensor or coefs[0].device.type != "cpu":
        return coefs
    return tuple(torch.stack(coefs).unbind(0))


def _rows(x: Tensor) -> tuple[int, ...]:
    """The shape that broadcasts an (N, C) coefficient over x's rows: (N, C, 1, ...)."""
    return tuple(x.shape[:2]) + (1,) * (x.dim() - 2)


# The forward in three pieces: stats (full-size read) -> mix ((N, C)-sized) -> normalize
# (full-size write); the backward likewise: grad_sums -> mix_backward -> input_grad.


def stats(x: Tensor, spec) -> tuple[Tensor, Tensor | None]:
    """[mu_in; var_in] (2, N, C) per (n, c), and the centered input for :func:`normalize`
    (None where the C++ pass reads x again instead)."""
    m = math.prod(x.shape[2:])
    denom = variance_denominator(spec, m)
    if _cpu.usable(x):  # one C++ pass per row: mean, then the centered sum of squares
        return torch.ops.snexp_cpu.in_stats(x, denom), None
    if type(x) is not Tensor and x.device.type == "cpu":
        # A traced CPU graph: the variance reduction's result is its final value (1 / denom
        # inside the sum), so inductor writes it straight into the stack's row instead of
        # copying it there in one more loop nest, whose OpenMP barrier costs more than the
        # copy (docs/layers.md, "Compiled SN at small shapes")
        dims = tuple(range(2, x.dim()))
        mu = x.mean(dims, dtype=torch.promote_types(x.dtype, torch.float32))
        xc = torch.sub(x, mu.view(_rows(x)))
        return torch.stack([mu, xc.square().mul(1.0 / denom).sum(dims)]), xc
    mu, nrm, xc = centered(x)
    return torch.stack([mu, nrm.pow_(2).div_(denom)]), xc


def mix(st: Tensor, weight, bias, mean_w, var_w, bn_mean, bn_var, m: int, *, spec, logits):
    """The (N, C)-sized middle: every candidate's statistics, mixed; the affine coefficients.

    Returns ``a``, ``b`` (N, C) with ``y = a (x - mu_in) + b``, the BN batch statistics (2, C)
    or None and their count, and, for the backward, ``mixed`` [mu - mu_in; var] (2, N, C),
    ``cands`` every candidate's [mu_k - mu_in; var_k] (2, K, N, C) and ``probs`` (2, K) (the
    C++ and Triton backwards read them; :func:`mix_backward`'s ATen code derives them again
    from the IN statistics). The C++ form takes the cases :func:`_native` allows; the ATen code
    below is the reference.
    """
    _, n, c = st.shape
    if _native(spec, st):
        a, b, batch, mixed, cands, probs = torch.ops.snexp_cpu.mix(
            st, weight, bias, mean_w, var_w, bn_mean, bn_var, _codes(spec.candidates),
            spec.eps, logits)
        if batch.numel() == 0:  # no BN candidate, or BN on running statistics
            return a, b, None, 0, mixed, cands, probs
        return a, b, batch, n * m, mixed, cands, probs
    terms, batch, count = _candidate_terms(st, bn_mean, bn_var, m, spec)
    probs = torch.stack([mean_w, var_w]).to(st.dtype)  # (2, K)
    # NOTE: softmax and the mixing as elementwise ops and reductions, not torch.softmax and
    # torch.bmm: on these tiny tensors those two enter OpenMP parallel regions, and on a busy
    # machine each call waits for the other threads far longer than the work takes.
    if logits:
        probs = probs.sub(probs.amax(1, keepdim=True)).exp_()
        probs = probs.div_(probs.sum(1, keepdim=True))
    mean, var = _mixed(terms, probs)
    a, b = _affine(mean, var, weight, bias, spec.eps, n, c)
    # What the other backends' backward reads. Under torch.compile these are dead code: the
    # ATen backward derives everything from ``st`` (and reads ``cands`` only where BN's
    # statistics are not a function of it), so inductor keeps no (2, K, N, C) buffer.
    mixed = torch.stack([mean.expand(n, c), var.expand(n, c)])  # (2, N, C)
    return a, b, batch, count, mixed, _stacked(terms, n, c), probs


def _weight_grads(terms, r: int, d: Tensor, mixed: Tensor | None, scale: Tensor) -> Tensor:
    """The importance gradients (K,) of row ``r`` (0: means, 1: variances), each candidate's
    term ``T_k`` (``mu_k - mu_in`` or ``var_k``) against ``d`` (N, C) summed over (n, c):
    ``scale_k sum (T_k - mixed) d``, with ``mixed = sum_k p_k T_k`` for importance logits (the
    softmax Jacobian, ``p_j (T_j - mixed)``, folded into the sum) or None for weights taken
    as they are.

    One reduction over (K, N, C) of a one-hot sum of the terms, a pointwise expression: under
    torch.compile one loop nest writing the final (K,) gradient, where a stack of the terms is
    materialized, K separate sums are K buffers and a separate Jacobian is two more.
    """
    k = len(terms)
    eye = torch.eye(k, dtype=d.dtype, device=d.device)
    e = None
    for i, term in enumerate(terms):
        if term[r] is None:  # IN's mean offset: exactly 0
            continue
        t = eye[i].view(k, 1, 1) * term[r]
        e = t if e is None else e + t
    if mixed is not None:
        e = -mixed if e is None else e - mixed
    if e is None:
        return d.new_zeros(k)
    return (e * (d * scale.view(k, 1, 1))).sum((1, 2))


def _stacked(terms, n: int, c: int) -> Tensor:
    """The terms of :func:`_candidate_terms` as one (2, K, N, C) tensor."""
    zero = terms[0][1].new_zeros(()).expand(n, c)
    return torch.stack([torch.stack([zero if off is None else off.expand(n, c)
                                     for off, _ in terms]),
                        torch.stack([v.expand(n, c) for _, v in terms])])


def _scale(var: Tensor, weight, eps: float) -> tuple[Tensor, Tensor]:
    """``a = weight rstd`` and ``rstd = 1 / sqrt(var + eps)`` from the mixed variance (in its
    broadcast shape)."""
    rstd = torch.rsqrt(var + eps)
    return (rstd if weight is None else rstd * weight.to(rstd.dtype)), rstd


def _affine(mean: Tensor, var: Tensor, weight, bias, eps: float, n: int, c: int
            ) -> tuple[Tensor, Tensor]:
    """``a = weight rstd`` and ``b = bias - (mu - mu_in) a`` (N, C) from the mixed ``mean``
    (mu - mu_in) and ``var`` (broadcastable to (N, C))."""
    a, _ = _scale(var, weight, eps)
    b = torch.mul(mean, a).neg_()
    if bias is not None:
        b = b + bias.to(b.dtype)
    return a.expand(n, c), b.expand(n, c)


def normalize(x: Tensor, xc: Tensor | None, mu: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """y = a (x - mu_in) + b, in the statistics dtype (over ``xc`` where it is given)."""
    if xc is None:  # one C++ pass
        return torch.ops.snexp_cpu.normalize(x, mu, a.contiguous(), b.contiguous())
    shape = _rows(xc)
    a, b = _per_row(a, b)
    return _normalize_aten(xc, a.view(shape), b.view(shape))


def mix_backward(s1: Tensor, s2: Tensor, saved, weight, m: int, *, spec, logits, n_total,
                 need):
    """The (N, C)-sized middle of the backward: ``(a, p, q)`` with ``dx = a dy + p x + q``
    (``p``, ``q`` None when dx is not needed, ``p`` None when dx = a dy), then dweight,
    dbias, dmean_w, dvar_w (None where not needed; both importance gradients where one is).
    The C++ form takes the cases :func:`_native` allows; the ATen code below is the reference.

    ``saved`` is the forward's (IN statistics, mixed, candidates, probabilities). Eager, the
    ATen code reads the mixing and the candidates from there, in the fewest calls. Traced
    (torch.compile), :func:`_mix_backward_rows` derives them again from the IN statistics and
    keeps every pair as two tensors, shaped for what inductor makes of it (the same
    equations; the float64 test of the traced branches and the compile-vs-eager tests hold
    them equal).
    """
    st, mixed, cands, probs = saved
    mu = st[0]
    if _native(spec, mu):
        denom = variance_denominator(spec, m)
        return torch.ops.snexp_cpu.mix_backward(
            s1, s2, mu, mixed, cands, probs, weight, _codes(spec.candidates), spec.eps, logits,
            m, denom, n_total is not None, need)
    if type(st) is not Tensor:
        return _mix_backward_rows(s1, s2, st, cands, probs, weight, m, spec=spec,
                                  logits=logits, n_total=n_total, need=need)
    n, c = mu.shape
    k = probs.shape[1]
    terms = [(None if cand == "in" else cands[0, i], cands[1, i])
             for i, cand in enumerate(spec.candidates)]
    mean, var = mixed[0], mixed[1]
    a, rstd = _scale(var, weight, spec.eps)
    a = a.expand(n, c)
    h = torch.mul(mean, s1).neg_().add_(s2).mul_(rstd)  # g rstd
    dweight = h.sum(0) if need[1] else None
    dbias = s1.sum(0) if need[2] else None
    # d = -[dmu; 2 dvar] = [a s1; a rstd h]: the signs and the 2 go into the scalars below
    d = torch.stack([s1, h * rstd]).mul_(a)  # (2, N, C)
    dmean_w = dvar_w = None
    if need[3] or need[4]:
        dp = torch.mul(cands, d.view(2, 1, n, c)).sum((2, 3))  # (2, K); not bmm: see mix
        if logits:  # softmax Jacobian, row by row
            dp = probs * (dp - (probs * dp).sum(1, keepdim=True))
        dmean_w, dvar_w = dp[0].neg(), dp[1].mul(-0.5)
    grads = (dweight, dbias, dmean_w, dvar_w)
    if not need[0]:
        return (a, None, None, *grads)
    w = probs
    if spec.official_2d:
        w = w * torch.tensor([[1.0] * k, [bessel(cand, n, c) for cand in spec.candidates]],
                             dtype=w.dtype, device=w.device)
    sums = _adjoint_sums(d, w, terms, spec, n_total)
    if sums is None:  # only BN on running statistics: dx = a dy
        return (a, None, None, *grads)
    e, corr = sums  # -[mixed adjoint of dmu; 2 dvar_in], sum_k 2 (mu_in - mu_k) q_k P_k(dvar)
    denom = variance_denominator(spec, m)
    p = e[1] * (-1.0 / denom)
    q = e[0].neg() if corr is None else torch.sub(corr, e[0])
    q = q.mul_(1.0 / m).add_(e[1] * mu, alpha=1.0 / denom)
    return (a, p, q, *grads)


def _mix_backward_rows(s1, s2, st, cands, probs, weight, m: int, *, spec, logits, n_total,
                       need):
    """:func:`mix_backward` where a graph is traced (torch.compile): the same equations with
    the candidates and the mixing derived again from the IN statistics ``st``, and every
    (2, ...) pair (the adjoints [dmu; dvar], the importance gradients) kept as two tensors.

    Under inductor each tensor here is either fused away or one buffer that the generated
    Python allocates per step, and a stack of two is one buffer plus a view per row (~0.8 us
    each on CPU at small shapes, more than the loop nest a stack can save: docs/layers.md,
    "Compiled SN at small shapes").
    """
    mu = st[0]
    n, c = mu.shape
    k = probs.shape[1]
    # reading the (2, K, N, C) candidates would keep them materialized
    terms, _, _ = _candidate_terms(st, None, None, m, spec, cands=cands, n_total=n_total)
    pm, pv = probs[0], probs[1]
    mean, var = _mixed(terms, probs)
    a, rstd = _scale(var, weight, spec.eps)
    a = a.expand(n, c)
    h = (s2 - mean * s1) * rstd  # g rstd
    dweight = h.sum(0) if need[1] else None
    dbias = s1.sum(0) if need[2] else None
    # -[dmu; 2 dvar] = [a s1; a rstd h]: the signs and the 2 go into the scalars below
    d0, d1 = s1 * a, h * rstd * a
    dmean_w = dvar_w = None
    if need[3] or need[4]:
        dmean_w = _weight_grads(terms, 0, d0, mean if logits else None,
                                -pm if logits else probs.new_full((k,), -1.0))
        dvar_w = _weight_grads(terms, 1, d1, var if logits else None,
                               -0.5 * pv if logits else probs.new_full((k,), -0.5))
    grads = (dweight, dbias, dmean_w, dvar_w)
    if not need[0]:
        return (a, None, None, *grads)
    wv = pv
    if spec.official_2d:
        wv = pv * torch.tensor([bessel(cand, n, c) for cand in spec.candidates],
                               dtype=pv.dtype, device=pv.device)
    e0 = e1 = corr = None
    for i, cand in enumerate(spec.candidates):
        t0 = _pooled_adjoint(d0, cand, spec, n_total)
        t1 = _pooled_adjoint(d1, cand, spec, n_total)
        if t0 is None:
            continue
        t0, t1 = t0 * pm[i], t1 * wv[i]  # -[p_k P_k(dmu); 2 q_k P_k(dvar)]
        e0 = t0 if e0 is None else e0 + t0
        e1 = t1 if e1 is None else e1 + t1
        off = terms[i][0]
        if off is not None:  # (IN's offset is exactly 0)
            corr = off * t1 if corr is None else corr + off * t1
    if e0 is None:  # only BN on running statistics: dx = a dy
        return (a, None, None, *grads)
    denom = variance_denominator(spec, m)
    p = (e1 * (-1.0 / denom)).expand(n, c)
    q = (e1 * mu) * (1.0 / denom) - e0 * (1.0 / m)
    if corr is not None:
        q = q + corr * (1.0 / m)
    return (a, p, q.expand(n, c), *grads)


def input_grad(x: Tensor, dy: Tensor, a: Tensor, p: Tensor | None, q: Tensor | None) -> Tensor:
    """dx = a dy + p x + q (a dy where ``p`` is None), in the statistics dtype."""
    shape = _rows(x)
    if p is None:
        return torch.mul(dy, a.view(shape))
    if _cpu.usable(x, dy, a):  # one C++ pass
        return torch.ops.snexp_cpu.input_grad(x, dy, a.contiguous(), p.contiguous(),
                                              q.contiguous())
    a, p, q = _per_row(a, p, q)
    return _input_grad_aten(x, dy, a.view(shape), p.view(shape), q.view(shape))


def forward(x, weight, bias, mean_w, var_w, bn_mean, bn_var, *, spec, logits):
    """y (statistics dtype), BN batch statistics (2, C) or None, their count, saved tensors.

    stats -> mix -> normalize (the C++ CPU passes plug in inside the full-size pieces).
    """
    st, xc = stats(x, spec)
    a, b, batch, count, mixed, cands, probs = mix(
        st, weight, bias, mean_w, var_w, bn_mean, bn_var, math.prod(x.shape[2:]), spec=spec,
        logits=logits)
    y = normalize(x, xc, st[0], a, b)
    return y, batch, count, (st, mixed, cands, probs)


def backward(saved, x, dy, weight, *, spec, logits, n_total, need):
    """dx (statistics dtype), dweight, dbias, dmean_w, dvar_w (None where not needed).

    grad_sums -> mix_backward -> input_grad.
    """
    s1, s2 = grad_sums(dy, x, saved[0][0])
    a, p, q, *grads = mix_backward(s1, s2, saved, weight, math.prod(x.shape[2:]), spec=spec,
                                   logits=logits, n_total=n_total, need=need)
    dx = input_grad(x, dy, a, p, q) if need[0] else None
    return (dx, *grads)
