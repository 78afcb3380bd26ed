"""Fake (meta) kernels and autograd for the op families that implement the DisAlign math.

A family is four operators with the schemas of csrc/disalign.cpp: the native `torch.ops.disalign`
ops (C++/CUDA) and the Triton ops share the autograd formulas registered here, so a backend only
brings kernels.

Autograd: for reduction "mean"/"sum" the forward op already computed the gradients of the scalar
loss (grad_output = 1) in its single pass over the logits; backward only scales them by
grad_output (see _scaled_by_upstream for who owns the results). For reduction "none" backward runs
the op's backward kernel with the per-row grad_output.

First derivatives only: the backward formulas are kernels, not differentiable torch code, so a
backward that is asked to build a graph of the gradient (create_graph=True, gradgradcheck, a
gradient penalty) raises instead of returning a gradient whose own derivative would be wrong.
backend="eager" (plain PyTorch autograd) gives second derivatives.

`weight` is not differentiable (as in F.cross_entropy): a weight that requires grad is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from ._validation import (
    accumulation_dtype,
    check_calibrate_args,
    check_cross_entropy_args,
    check_grad_mask,
    check_gradient_arg,
)


@dataclass(frozen=True)
class OpFamily:
    cross_entropy: torch._ops.OpOverloadPacket
    cross_entropy_backward: torch._ops.OpOverloadPacket
    calibrate: torch._ops.OpOverloadPacket
    calibrate_backward: torch._ops.OpOverloadPacket


def _grad_outputs(mask, logits, alpha, beta, confidence):
    """Fake gradients: shaped like their input when asked for, empty otherwise."""
    outs = []
    for wanted, t, like in zip(mask, (logits, alpha, beta, confidence), (logits, alpha, beta, confidence)):
        if wanted and t is not None:
            outs.append(torch.empty_like(like))
        else:
            ref = logits if t is None else t
            outs.append(ref.new_empty((0,)))
    return tuple(outs)


def _fake_cross_entropy(logits, target, alpha, beta, confidence, weight, ignore_index, reduction, grad_mask):
    check_cross_entropy_args(logits, target, alpha, beta, confidence, weight, ignore_index, reduction)
    check_grad_mask(grad_mask)
    shape = target.shape if reduction == "none" else ()
    loss = logits.new_empty(shape, dtype=accumulation_dtype(logits.dtype))
    return (loss,) + _grad_outputs(grad_mask, logits, alpha, beta, confidence)


def _fake_cross_entropy_backward(grad_loss, logits, target, alpha, beta, confidence, weight, ignore_index, grad_mask):
    check_cross_entropy_args(logits, target, alpha, beta, confidence, weight, ignore_index, "none")
    check_gradient_arg("grad_loss", grad_loss, logits, target.shape)
    check_grad_mask(grad_mask)
    return _grad_outputs(grad_mask, logits, alpha, beta, confidence)


def _fake_calibrate(logits, alpha, beta, confidence):
    check_calibrate_args(logits, alpha, beta, confidence)
    return torch.empty_like(logits)


def _fake_calibrate_backward(grad, logits, alpha, beta, confidence, grad_mask):
    check_calibrate_args(logits, alpha, beta, confidence)
    check_gradient_arg("grad", grad, logits, logits.shape)
    check_grad_mask(grad_mask)
    return _grad_outputs(grad_mask, logits, alpha, beta, confidence)


def _tracing() -> bool:
    return torch.compiler.is_compiling() or get_proxy_mode() is not None


def _scaled_by_upstream(grads, grad_loss: torch.Tensor, last_use: bool) -> tuple:
    """grad * grad_loss for each grad of `grads` (None stays None) as tensors the caller owns,
    where a grad is one of the forward's gradient buffers (for grad_output = 1) and grad_loss the
    0-d upstream gradient in the accumulation dtype. What depends on grad_loss only (tracing, the
    grad_output == 1 test, which reads its value) is decided once for all of them.

    Precision: the product is taken in the accumulation dtype and rounded once to grad's dtype;
    grad_loss is never rounded to a half dtype first (65536, GradScaler's default scale, is inf in
    float16; bfloat16 would round the upstream value itself). On the CPU a 0-d grad_loss is a
    scalar operand, read at its own precision. On CUDA, elementwise kernels load a 0-d operand at
    the result's dtype, so grad_loss goes in as a 1-element tensor: it then takes part in type
    promotion, the kernel computes in float32 (or float64) and writes grad's dtype, without a
    temporary (CUDA casts while loading) and without a host sync.

    Ownership: the buffer is handed over only by the last backward through the node (the graph is
    not retained, so autograd frees the saved buffer right after and nothing can read it again).
    It is then scaled in place: no second N x C allocation (issue 9's full-mode memory target), and
    for grad_output == 1 on the CPU (plain loss.backward(), readable without a sync) not even a
    pass over it. A backward that retains the graph (retain_graph=True, repeated autograd.grad)
    writes a new tensor instead, so the saved buffer stays intact for the next one and no two
    backwards return the same storage, which in-place hooks or a caller's g.mul_() could corrupt.
    The saved buffer's version counter is bumped only when autograd no longer checks it. While
    tracing (torch.compile, make_fx) the product is written out of place, in the accumulation
    dtype, for the compiler to fuse and plan.
    """
    if _tracing():
        return tuple(None if g is None else (g.to(torch.promote_types(g.dtype, grad_loss.dtype)) * grad_loss)
                     .to(g.dtype) for g in grads)
    on_cpu = grad_loss.device.type == "cpu"
    if last_use and on_cpu and type(grad_loss) is torch.Tensor and grad_loss.item() == 1:
        return tuple(grads)
    factor = grad_loss if on_cpu else grad_loss.reshape(1)
    return tuple(None if g is None else torch.mul(g, factor, out=g if last_use else torch.empty_like(g))
                 for g in grads)


def _graph_retained() -> bool:
    """Whether the running backward keeps the graph (retain_graph=True) for later backwards."""
    return torch._C._autograd._get_current_graph_task_keep_graph()


def _refuse_double_backward(op: str) -> None:
    # Backward runs with grad mode on exactly when the caller asked for a graph of the gradient.
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"disalign {op}: double backward is not supported (the gradient was requested with "
            "create_graph=True, e.g. by gradgradcheck or a gradient penalty); the fused backward computes "
            "first derivatives only. Use backend='eager' for second derivatives."
        )


def _as_optional_grads(mask, grads):
    return tuple(g if wanted else None for wanted, g in zip(mask, grads))


def register_fake_kernels(ops: OpFamily) -> None:
    torch.library.register_fake(ops.cross_entropy.default)(_fake_cross_entropy)
    torch.library.register_fake(ops.cross_entropy_backward.default)(_fake_cross_entropy_backward)
    torch.library.register_fake(ops.calibrate.default)(_fake_calibrate)
    torch.library.register_fake(ops.calibrate_backward.default)(_fake_calibrate_backward)


def register_autograd(ops: OpFamily, own_kernel: bool) -> None:
    """Registers the shared backward formulas on one op family: as an Autograd kernel of our own
    for ops defined by a schema (own_kernel, the native family: see _register_autograd_kernel), else
    through torch.library.register_autograd (the Triton family's torch.library.custom_op /
    triton_op ops, which keep their autograd in their op definition)."""

    def cross_entropy_setup(ctx, inputs, output):
        logits, target, alpha, beta, confidence, weight, ignore_index, reduction, grad_mask = inputs
        if weight is not None and weight.requires_grad:
            raise RuntimeError(
                "disalign cross_entropy is not differentiable with respect to argument 'weight' (as "
                "F.cross_entropy); this input cannot have requires_grad=True: pass weight.detach()"
            )
        ctx.reduction = reduction
        ctx.ignore_index = ignore_index
        ctx.grad_mask = list(grad_mask)
        ctx.mark_non_differentiable(*output[1:])
        # The gradient outputs get no gradient: don't let autograd allocate and zero-fill an N x C one.
        ctx.set_materialize_grads(False)
        if reduction == "none":
            ctx.save_for_backward(logits, target, alpha, beta, confidence, weight)
        else:
            ctx.save_for_backward(*output[1:])

    def cross_entropy_backward(ctx, grad_loss, *unused_grads):
        if grad_loss is None:  # the loss got no gradient (materialize_grads is off): neither do the inputs
            return (None,) * 9
        _refuse_double_backward("cross_entropy")
        logits_needs, _, alpha_needs, beta_needs, conf_needs = ctx.needs_input_grad[:5]
        wanted = [logits_needs, alpha_needs, beta_needs, conf_needs]
        if ctx.reduction == "none":
            logits, target, alpha, beta, confidence, weight = ctx.saved_tensors
            grads = ops.cross_entropy_backward(
                grad_loss, logits, target, alpha, beta, confidence, weight, ctx.ignore_index, wanted
            )
        else:
            missing = [w and not m for w, m in zip(wanted, ctx.grad_mask)]
            if any(missing):
                raise RuntimeError(
                    "disalign cross_entropy: a gradient was requested for an input whose grad_mask entry was "
                    f"False in the forward call (grad_mask={ctx.grad_mask}, needed={wanted}); call the op through "
                    "disalign_ops.disalign_cross_entropy, which sets grad_mask from requires_grad"
                )
            grads = _scaled_by_upstream([g if w else None for w, g in zip(wanted, ctx.saved_tensors)], grad_loss,
                                        last_use=not _graph_retained())
        grads = _as_optional_grads(wanted, grads)
        return grads[0], None, grads[1], grads[2], grads[3], None, None, None, None

    def calibrate_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def calibrate_backward(ctx, grad):
        _refuse_double_backward("calibrate")
        logits, alpha, beta, confidence = ctx.saved_tensors
        wanted = list(ctx.needs_input_grad[:4])
        grads = ops.calibrate_backward(grad, logits, alpha, beta, confidence, wanted)
        return _as_optional_grads(wanted, grads)

    formulas = ((ops.cross_entropy.default, cross_entropy_backward, cross_entropy_setup),
                (ops.calibrate.default, calibrate_backward, calibrate_setup))
    for op, backward, setup in formulas:
        if own_kernel:
            _register_autograd_kernel(op, backward, setup)
        else:
            torch.library.register_autograd(op, backward, setup_context=setup)


# The Library objects holding the Autograd kernels registered below (a registration lasts as long as its Library).
_AUTOGRAD_LIBRARIES = []


def _register_autograd_kernel(op: torch._ops.OpOverload, backward, setup_context) -> None:
    """Registers `op`'s Autograd kernel: what torch.library.register_autograd registers for an op
    defined by a schema (an autograd.Function whose forward redispatches below autograd, then calls
    setup_context(ctx, inputs, output), and whose backward is `backward`), less its generic per-call
    work: it rebinds the arguments to the schema and re-reads the schema's argument list for every
    call (torch/_library/autograd.py, fill_defaults), ~0.1 ms of a CPU training step's ~0.4 ms of
    fixed cost. Our schemas have no defaults and no keyword-only arguments, so the dispatcher passes
    the arguments exactly as the formulas take them. The dispatch key set comes last, as in torch's
    version, so `ctx.needs_input_grad` indexes the op's inputs and backward returns one more None."""
    below_autograd = torch._C._after_autograd_keyset

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            keyset = args[-1]
            inputs = args[:-1]
            with torch._C._AutoDispatchBelowAutograd():
                output = op.redispatch(keyset & below_autograd, *inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            grad_inputs = backward(ctx, *grads)
            return (*grad_inputs, None) if isinstance(grad_inputs, tuple) else (grad_inputs, None)

    Function.__name__ = Function.__qualname__ = f"{op._schema.name.replace('::', '_')}_autograd"

    def kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return Function.apply(*args, keyset)
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & below_autograd, *args)

    namespace, name = op._schema.name.split("::")
    lib = torch.library.Library(namespace, "IMPL")
    lib.impl(name, kernel, "Autograd", with_keyset=True)
    _AUTOGRAD_LIBRARIES.append(lib)
