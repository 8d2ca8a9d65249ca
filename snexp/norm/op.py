"""THE Switchable Normalization op: ``torch.ops.snexp.switch_norm`` and its backward.

Three ``torch.library.custom_op``s: ``snexp::switch_norm`` (statistics, mixing, normalization;
it also returns the BN batch statistics), ``snexp::switch_norm_backward`` (the closed-form
backward, registered as the first one's autograd formula) and ``snexp::update_running_stats``
(the blend of the running statistics, a declared mutation of ``running_mean``/``running_var``:
PyTorch registers autograd formulas only for functional ops). All have fake (meta)
implementations. How each path runs them:

- **Eager** (plain tensors, no compiler, dispatch mode or ``torch.func`` transform): one
  ``torch.autograd.Function`` (:class:`_SwitchNormFunction`) calls the same code directly, and
  blends the running statistics inside its forward. Same numbers, one autograd node, and none
  of the dispatcher round trips and Python custom-op wrapping that cost more than the passes
  over the data on small tensors (and imported ``torch._dynamo`` on the first call).
- **torch.compile** (``fullgraph=True``, ``dynamic=True`` too): dynamo sees the three ops;
  AOTAutograd then decomposes them into their ATen code (FunctionalTensorMode rules, the
  mechanism of ``torch.library.triton_op``), so inductor fuses the passes, while autograd still
  takes the closed-form backward. The running-statistics blend lands in the graph as a buffer
  mutation.
- **torch.export** keeps the three ops in the graph (as it keeps triton ops);
  ``ExportedProgram.run_decompositions(decompose_custom_triton_ops=True)`` inlines them on
  purpose.

The equations live once, in :mod:`snexp.norm._mixing` (``forward``: stats -> mix -> normalize,
``backward``: grad_sums -> mix_backward -> input_grad; ATen ops on any device);
:func:`_passes_for` here is the one dispatch point of the backends. ``SNEXP_BACKEND`` picks
them (:mod:`snexp.norm._backend`):
``auto`` (default: Triton kernels on CUDA where Triton is installed, the C++ CPU passes of
:mod:`snexp.norm._cpu` for contiguous float32/float64 CPU tensors, ATen ops elsewhere),
``aten``, ``cpu`` (a failed C++ build raises) or ``triton`` (on any device). The (N, C)-sized
mixing is ``_mixing``'s ATen code, or on eager CPU tensors its C++ form (tested against it).
``snexp.reference`` holds the plain-autograd equations that the tests compare against.

Arguments of the op that are not tensors are the layer's static options: ``candidates`` is one
comma-separated string (``"in,ln,bn"``), ``momentum < 0`` means a cumulative average over
``num_batches_tracked`` batches, ``group`` names the process group whose ranks pool the BN
statistics (SyncSwitchNorm; ``""`` for none), ``source`` is :data:`SOURCE` (see there).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from snexp.norm import _cpu, _mixing

__all__ = ["SOURCE", "switch_norm_op", "switch_norm_backward_op", "update_running_stats"]


def _source_digest() -> str:
    """sha256 (16 hex digits) of this module and :mod:`snexp.norm._mixing`."""
    digest = hashlib.sha256()
    for path in (Path(__file__), Path(_mixing.__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# The digest of the code that the op decomposes into under torch.compile, passed to every
# call as the op's last argument. torch.compile's caches (AOTAutograd's and inductor's, on
# disk, shared by all processes of a user) are keyed by dynamo's graph, in which the op is
# one opaque call, not by the Python it decomposes into; without this, a changed or upgraded
# snexp kept running the graphs compiled from the old code (checked on torch 2.14.1).
SOURCE = _source_digest()


def _passes_for(x: Tensor):
    """The one dispatch point of SN's passes: the Triton kernels where they take ``x`` (CUDA,
    or any device with ``SNEXP_BACKEND=triton``; imported only then, so ``import snexp`` and
    CPU calls load no Triton), else the ATen equations of ``_mixing`` with the C++ CPU passes
    inside them. ``_mixing`` itself imports no backend: the Triton one is built from it."""
    if x.is_cuda or os.environ.get("SNEXP_BACKEND") == "triton":
        from snexp.norm import _triton

        if _triton.usable(x):
            return _triton
    return _mixing


def _process_group(group: str):
    if not group:
        return None
    from torch.distributed import distributed_c10d

    return distributed_c10d._resolve_process_group(group)


@functools.lru_cache(maxsize=256)
def _local_options(candidates: str, eps: float, official: bool, official_2d: bool):
    return _mixing.Options(tuple(candidates.split(",")), eps, unbiased_in=official,
                           official_2d=official_2d)


def _options(candidates: str, eps: float, official: bool, official_2d: bool, group: str):
    if not group:  # parsed once per layer configuration, not on every call
        return _local_options(candidates, eps, official, official_2d)
    # never cached: a group name can be reused by a new process group after re-initialization
    return _mixing.Options(tuple(candidates.split(",")), eps, unbiased_in=official,
                           official_2d=official_2d, sync=True,
                           process_group=_process_group(group))


def _blend(running_mean: Tensor, running_var: Tensor, batch: Tensor, count: Tensor | float,
           num_batches_tracked: Tensor | None, momentum: float, bessel: bool) -> None:
    """The running-statistics blend (see :func:`update_running_stats`), in place."""
    scale = 1.0  # Bessel's correction of the batch variance
    if bessel:
        scale = (count / (count - 1).clamp_min(1) if isinstance(count, Tensor)
                 else count / max(count - 1, 1))
    if momentum >= 0 and not isinstance(scale, Tensor) and _cpu.usable(running_mean,
                                                                         running_var, batch):
        # one C++ call: as ATen calls (select, mul, to, _foreach_lerp_) this took ~25 us per
        # layer and step at (4, 256, 14, 14), ~7% of SN's fwd+bwd there
        torch.ops.snexp_cpu.blend(running_mean, running_var, batch, momentum, scale)
        return
    mean, var = batch[0], batch[1]
    if bessel:
        var = var * (scale.to(var.dtype) if isinstance(scale, Tensor) else scale)
    mean, var = mean.to(running_mean.dtype), var.to(running_var.dtype)
    if momentum < 0:  # cumulative average: factor 1 / num_batches_tracked, kept on the device
        if num_batches_tracked is None:
            factor = 1.0
        else:
            factor = num_batches_tracked.clamp_min(1).reciprocal().to(running_mean.dtype)
            if factor.device != running_mean.device:
                factor = factor.to(running_mean.device)
        running_mean.lerp_(mean, factor)
        running_var.lerp_(var, factor)
    else:
        torch._foreach_lerp_([running_mean, running_var], [mean, var], momentum)


@torch.library.custom_op("snexp::update_running_stats",
                         mutates_args=("running_mean", "running_var"))
def update_running_stats(running_mean: Tensor, running_var: Tensor, batch: Tensor,
                         count: Tensor, num_batches_tracked: Tensor | None, momentum: float,
                         bessel: bool) -> None:
    """Blend BN batch statistics ``batch`` (2, C) into the running buffers, in place.

    ``running = (1 - m) running + m batch`` with ``m = momentum``, or ``1 / num_batches_tracked``
    (a cumulative average) when ``momentum < 0``. With ``bessel`` the batch variance is made
    unbiased first (``count / (count - 1)``, ``count`` the values pooled per channel), as
    ``nn.BatchNorm2d`` does. The one place where SN's running statistics change.
    """
    if batch.numel() == 0:
        return
    _blend(running_mean, running_var, batch, count, num_batches_tracked, momentum, bessel)


@update_running_stats.register_fake
def _(running_mean, running_var, batch, count, num_batches_tracked, momentum, bessel):
    return None


@torch.library.custom_op("snexp::switch_norm", mutates_args=())
def switch_norm_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean_w: Tensor,
    var_w: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    candidates: str,
    eps: float,
    training: bool,
    logits: bool,
    official: bool,
    official_2d: bool,
    group: str,
    source: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SN forward of ``x`` (N, C, *S): ``(y, batch, n_bn, stats, mixed, cands, probs)``.

    ``y`` is the output (dtype of ``x``); ``batch`` the BN candidate's batch [mean; var] (2, C)
    (biased; (2, 0) when BN uses running statistics or is no candidate) and ``n_bn`` the
    samples it pooled (a 0-d tensor, all ranks together under SyncSwitchNorm), for
    :func:`update_running_stats`. The rest is what the backward needs: the per-(n, c)
    statistics [mu_in; var_in] (2, N, C), the mixed [mu - mu_in; var] (2, N, C), every
    candidate's [mu_k - mu_in; var_k] (2, K, N, C) and the importance probabilities (2, K)
    (the ATen backward derives the last three again from the first: see
    ``_mixing._candidate_terms``).
    """
    spec = _options(candidates, eps, official, official_2d, group)
    use_batch = training or running_mean is None
    bn_mean = None if use_batch else running_mean
    bn_var = None if use_batch else running_var
    y, batch, count, (st, mixed, cands, probs) = _passes_for(x).forward(
        x, weight, bias, mean_w, var_w, bn_mean, bn_var, spec=spec, logits=logits)
    m = math.prod(x.shape[2:])
    if isinstance(count, Tensor):  # SyncSwitchNorm: all ranks' samples, kept on the device
        n_bn = (count / m).to(st.dtype).reshape(())
    else:  # torch.full: a symbolic batch size under torch.compile(dynamic=True) stays symbolic
        n_bn = torch.full((), count // m if batch is not None else 0, dtype=st.dtype,
                          device=x.device)
    if batch is None:
        batch = st.new_empty((2, 0))
    return y.to(x.dtype), batch, n_bn, st, mixed, cands, probs


@switch_norm_op.register_fake
def _(x, weight, bias, mean_w, var_w, running_mean, running_var, candidates, eps, training,
      logits, official, official_2d, group, source):
    n, c = x.shape[:2]
    names = candidates.split(",")
    k = len(names)
    dt = torch.promote_types(x.dtype, torch.float32)
    new = x.new_empty
    bn_batch = "bn" in names and (training or running_mean is None)
    return (torch.empty_like(x), new((2, c if bn_batch else 0), dtype=dt), new((), dtype=dt),
            new((2, n, c), dtype=dt), new((2, n, c), dtype=dt), new((2, k, n, c), dtype=dt),
            new((2, k), dtype=dt))


@torch.library.custom_op("snexp::switch_norm_backward", mutates_args=())
def switch_norm_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    st: Tensor,
    mixed: Tensor,
    cands: Tensor,
    probs: Tensor,
    n_bn: Tensor,
    candidates: str,
    eps: float,
    logits: bool,
    official: bool,
    official_2d: bool,
    group: str,
    bn_batch: bool,
    need: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SN backward: ``(dx, dweight, dbias, dmean_w, dvar_w)``, empty where ``need`` is False.

    ``need`` says which of x, weight, bias, mean_w, var_w want gradients; ``bn_batch`` whether
    the BN candidate used batch statistics (else it is a constant of the backward).
    """
    spec = _options(candidates, eps, official, official_2d, group)
    n_total = (n_bn if spec.sync else int(x.shape[0])) if bn_batch else None
    dx, *grads = _passes_for(x).backward((st, mixed, cands, probs), x, dy.contiguous(), weight,
                                         spec=spec, logits=logits, n_total=n_total,
                                         need=(need[0], need[1], need[2], need[3], need[4]))
    return (x.new_empty(0) if dx is None else dx.to(x.dtype),
            *(x.new_empty(0) if g is None else g for g in grads))


@switch_norm_backward_op.register_fake
def _(dy, x, weight, st, mixed, cands, probs, n_bn, candidates, eps, logits, official,
      official_2d, group, bn_batch, need):
    c = x.shape[1]
    k = probs.shape[1]
    dt = st.dtype
    new = x.new_empty
    return (torch.empty_like(x) if need[0] else new(0),
            new((c,), dtype=dt) if need[1] else new(0),
            new((c,), dtype=dt) if need[2] else new(0),
            new((k,), dtype=dt) if need[3] else new(0),
            new((k,), dtype=dt) if need[4] else new(0))


def _setup_context(ctx, inputs, output):
    (x, weight, bias, mean_w, var_w, running_mean, _running_var, candidates, eps, training,
     logits, official, official_2d, group, _source) = inputs
    _y, batch, n_bn, st, mixed, cands, probs = output
    ctx.save_for_backward(x, weight, st, mixed, cands, probs, n_bn)
    ctx.options = (candidates, eps, logits, official, official_2d, group,
                   training or running_mean is None)
    ctx.dtypes = tuple(None if t is None else t.dtype for t in (weight, bias, mean_w, var_w))
    ctx.mark_non_differentiable(batch, n_bn, st, mixed, cands, probs)
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, *_unused):
    if dy is None:
        return (None,) * 15
    x, weight, st, mixed, cands, probs, n_bn = ctx.saved_tensors
    candidates, eps, logits, official, official_2d, group, bn_batch = ctx.options
    need = [bool(b) for b in ctx.needs_input_grad[:5]]
    grads = switch_norm_backward_op(dy, x, weight, st, mixed, cands, probs, n_bn, candidates,
                                    eps, logits, official, official_2d, group, bn_batch, need)
    out = [g if n else None for g, n in zip(grads, need)]
    for i, dtype in enumerate(ctx.dtypes, start=1):
        if out[i] is not None and dtype is not None:
            out[i] = out[i].to(dtype)
    return (*out, *(None,) * 10)


switch_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _decomposition(impl):
    """A FunctionalTensorMode rule: run ``impl`` (the op's own ``_mixing`` code) in ATen ops.

    AOTAutograd traces every ``torch.compile``d graph under FunctionalTensorMode, so there the
    ops decompose and inductor fuses their passes with each other and with their neighbours
    (the mechanism of ``torch.library.triton_op``). Autograd still sees the op first: the
    backward is the closed-form ``switch_norm_backward`` (decomposed the same way), never a
    derivative of the forward's ATen ops (normalize overwrites a buffer in place).
    ``torch.export`` turns the decomposition off (as for triton ops): an exported program keeps
    the three ops; ``ExportedProgram.run_decompositions(decompose_custom_triton_ops=True)``
    inlines them on purpose.
    """
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    def rule(mode, op, types, args, kwargs):
        if not getattr(torch._functorch.config, "decompose_custom_triton_ops", True):
            # torch.export: keep the op
            return mode.__torch_dispatch__(op, types, args, kwargs)
        if any(t is not Tensor and not issubclass(t, (FakeTensor, FunctionalTensor))
               for t in types):
            return NotImplemented
        with mode:
            return impl(*args, **kwargs)

    return rule


def _register_decompositions() -> None:
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for custom in (switch_norm_op, switch_norm_backward_op, update_running_stats):
        if hasattr(custom, "register_torch_dispatch"):  # older torch: the op stays opaque
            custom.register_torch_dispatch(FunctionalTensorMode, _decomposition(custom._init_fn))


_register_decompositions()


def _eager(tensors) -> bool:
    """Whether to run the op's eager form: plain tensors, no compiler, mode or transform."""
    return (not torch.compiler.is_compiling()
            and not is_in_torch_dispatch_mode()
            and not torch._C._are_functorch_transforms_active()
            and all(t is None or type(t) in (Tensor, torch.nn.Parameter) for t in tensors))


class _SwitchNormFunction(torch.autograd.Function):
    """The op's eager form: the same ``_mixing`` code, one autograd node, and the running
    statistics blended inside the forward (no dispatcher round trips, no Python custom-op
    wrapping: those cost more than the passes over the data on small tensors)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean_w, var_w, running_mean, running_var, spec,
                training, logits, official, update):
        use_batch = training or running_mean is None
        bn_mean = None if use_batch else running_mean
        bn_var = None if use_batch else running_var
        y, batch, count, saved = _passes_for(x).forward(x, weight, bias, mean_w, var_w,
                                                        bn_mean, bn_var, spec=spec,
                                                        logits=logits)
        if update is not None and batch is not None:
            num_batches_tracked, momentum = update
            _blend(running_mean, running_var, batch, count, num_batches_tracked, momentum,
                   not official)
        if spec.sync and batch is not None:
            n_total = count / math.prod(x.shape[2:])  # a 0-d tensor: no host sync
        else:
            n_total = x.shape[0] if batch is not None else None
        ctx.save_for_backward(x, weight, *saved)
        ctx.spec, ctx.logits, ctx.n_total = spec, logits, n_total
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (weight, bias, mean_w, var_w))
        return y if y.dtype == x.dtype else y.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, *saved = ctx.saved_tensors
        need = tuple(ctx.needs_input_grad[:5])
        dx, *grads = _passes_for(x).backward(tuple(saved), x, dy.contiguous(), weight,
                                             spec=ctx.spec, logits=ctx.logits,
                                             n_total=ctx.n_total, need=need)
        # (a .to() of a tensor already in its dtype is still a dispatcher call, ~1-3 us)
        out = [dx if dx is None or dx.dtype == x.dtype else dx.to(x.dtype)]
        for g, dtype in zip(grads, ctx.dtypes):
            out.append(g if g is None or dtype is None or g.dtype == dtype else g.to(dtype))
        return (*out, *(None,) * 7)


class _NoContext:
    """Stands in for autograd's ctx where the forward runs without a graph."""

    def save_for_backward(self, *tensors) -> None:
        pass


def switch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean_w: Tensor,
                var_w: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                candidates: str, eps: float, training: bool, logits: bool, official: bool,
                official_2d: bool, group: str, update: tuple | None) -> Tensor:
    """Run SN (the op's arguments) and blend the running statistics where ``update`` is
    ``(num_batches_tracked, momentum)`` (``momentum < 0``: cumulative average).

    Eager calls on plain tensors run the op's eager form (:class:`_SwitchNormFunction`);
    under ``torch.compile``, ``torch.export``, a dispatch mode or a ``torch.func`` transform the
    call goes through ``torch.ops.snexp.switch_norm`` and ``update_running_stats``, which those
    see as declared ops. Both compute with the same ``_mixing`` functions.
    """
    if _eager((x, weight, bias, mean_w, var_w, running_mean, running_var)):
        spec = _options(candidates, eps, official, official_2d, group)
        args = (x, weight, bias, mean_w, var_w, running_mean, running_var, spec, training,
                logits, official, update)
        if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, weight, bias, mean_w, var_w)):
            return _SwitchNormFunction.apply(*args)
        # nothing to differentiate (eval, no_grad): the same forward, without an autograd node
        return _SwitchNormFunction.forward(_NoContext(), *args)
    y, batch, n_bn, *_ = switch_norm_op(
        x, weight, bias, mean_w, var_w, running_mean, running_var, candidates, eps, training,
        logits, official, official_2d, group, SOURCE)
    if update is not None:
        num_batches_tracked, momentum = update
        update_running_stats(running_mean, running_var, batch, n_bn * math.prod(x.shape[2:]),
                             num_batches_tracked, momentum, not official)
    return y
