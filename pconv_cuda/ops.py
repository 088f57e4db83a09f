"""Python-side registrations of the pconv_cuda ops: fake (meta) kernels, autocast, and a clear error for devices
the build has no kernels for; and the backward of PartialConv2dFunction. The schemas, the real kernels and the ops'
own autograd live in csrc/.

`register_library(ns)` does it for one op library; it runs for `pconv_cuda` here and for `pconv_cuda_emu` (the
CUDA kernels under the SIMT emulation, see pconv_cuda/emu.py), so both get the same fake kernels and autocast.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

from pconv_cuda import _C  # noqa: F401  (loads the library that defines the schemas)

CONV_OPS = ("partial_conv2d", "partial_conv3d")  # 2 and 3 spatial dimensions; the same flow in csrc
OPS = CONV_OPS + ("_partial_conv2d_backward", "_partial_conv3d_backward", "mask_update", "masked_cat")


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _ratio_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(shape, like: Tensor, dtype: torch.dtype, fmt=torch.contiguous_format) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=like.device, memory_format=fmt)


def _check_devices(op: str, input: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None:
            torch._check(t.device == input.device,
                         lambda: f"pconv_cuda::{op}: {name} is on {t.device} but input is on {input.device}")


def _conv_fake(op: str):
    dims = 3 if op == "partial_conv3d" else 2

    def fake(input, mask, weight, bias, stride, padding, dilation, groups, multi_channel, mask_groups=None,
             input_masked=False):
        _check_devices(op, input, mask=mask, weight=weight, bias=bias)
        torch._check(not input_masked or mask is not None, lambda: f"pconv_cuda::{op}: input_masked=True says the "
                     "input is X*M for a mask, but mask is None")
        torch._check(input.dim() == dims + 2, lambda: f"input must be {dims + 2}-D, got {input.dim()}-D")
        torch._check(weight.dim() == dims + 2, lambda: f"weight must be {dims + 2}-D, got {weight.dim()}-D")
        out_sizes = [_out_size(*a) for a in zip(input.shape[2:], weight.shape[2:], stride, padding, dilation)]
        nm = mask.shape[0] if mask is not None else 1
        fmt = _layout(input)
        output = _empty((input.shape[0], weight.shape[0], *out_sizes), input, input.dtype, fmt)
        updated_mask = _empty((nm, 1, *out_sizes), input, input.dtype)
        ratio = _empty((nm, 1, *out_sizes), input, _ratio_dtype(input.dtype))
        masked_input = (_empty(input.shape, input, input.dtype, fmt) if mask is not None and not input_masked
                        else _empty((0,), input, input.dtype))
        return output, updated_mask, ratio, masked_input

    return fake


def _layout(t: Tensor) -> torch.memory_format:
    """The kernels' layout for a tensor: channels_last (channels_last_3d) kept, anything else contiguous
    (op_flow.h, layout_of)."""
    fmt = suggest_memory_format(t)
    return fmt if fmt in (torch.channels_last, torch.channels_last_3d) else torch.contiguous_format


def _partial_conv_backward_fake(grad_output, masked_input, mask, weight, ratio, updated_mask, stride, padding,
                                dilation, groups, multi_channel, output_mask, mask_groups=None, input_masked=False):
    _check_devices("_partial_conv_backward", masked_input, grad_output=grad_output, mask=mask, weight=weight,
                   ratio=ratio, updated_mask=updated_mask)
    input = masked_input
    grad_input = _empty(input.shape, input, input.dtype, _layout(input)) if output_mask[0] else None
    grad_weight = _empty(weight.shape, weight, weight.dtype, suggest_memory_format(weight)) if output_mask[1] else None
    grad_bias = _empty((weight.shape[0],), weight, weight.dtype) if output_mask[2] else None
    return grad_input, grad_weight, grad_bias


def _masked_cat_fake(inputs, mask, mask_groups=None):
    torch._check(len(inputs) > 0, lambda: "pconv_cuda::masked_cat: inputs must hold at least one tensor")
    x = inputs[0]
    _check_devices("masked_cat", x, mask=mask)
    check_masked_cat_shapes(inputs, mask, mask_groups)
    shape = (x.shape[0], sum(t.shape[1] for t in inputs), *x.shape[2:])
    return _empty(shape, x, x.dtype, _layout(x))


def _mask_update_fake(mask, kernel_size, stride, padding, dilation, multi_channel, mask_groups=None):
    out_sizes = [_out_size(*a) for a in zip(mask.shape[2:], kernel_size, stride, padding, dilation)]
    dtype = mask.dtype if mask.dtype.is_floating_point else torch.float32
    shape = (mask.shape[0], 1, *out_sizes)
    return _empty(shape, mask, _ratio_dtype(dtype)), _empty(shape, mask, dtype)


# --- autograd of PartialConv2dFunction (torch.func, forward-mode AD, torch.compile); the ops' own autograd is the
# same backward in C++ (csrc/common/autograd.h), which eager calls record ------------------------------------------

def save_for_backward(ctx, input, mask, weight, bias, ratio, updated_mask, masked_input, conv_args,
                      mask_groups=None, input_masked=False) -> None:
    # The weight gradient needs the convolution's input: X*M as the forward formed it (the input for mask=None
    # or input_masked),
    # so the backward never rebuilds it. This keeps one input-sized tensor per layer alive until the backward.
    # Under autocast the op ran on cast copies: the backward takes the input and weight in the dtype it computed in
    # (`updated_mask` has it); autograd casts the gradients back to each leaf's dtype.
    dtype = updated_mask.dtype

    def as_computed(t):  # (no .to() when the dtype matches: it would hand back the very tensor, an alias)
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != dtype else t

    conv_input = as_computed(input) if mask is None or input_masked else masked_input
    ctx.save_for_backward(conv_input, as_computed(mask), as_computed(weight), ratio, updated_mask)
    ctx.conv_args = conv_args  # (stride, padding, dilation, groups, multi_channel)
    ctx.mask_groups = mask_groups  # the mask's channel groups (None: single- or multi-channel)
    ctx.has_bias = bias is not None
    ctx.input_masked = input_masked  # the input was X*M already: its producer zeroes the holes of its gradient


def input_grads(ctx, grad_output: Tensor, grad_masked_input: Optional[Tensor] = None
                ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_input, grad_weight, grad_bias), each None unless asked for; the mask never gets a gradient.

    `grad_masked_input` is the gradient reaching the op's masked_input output (X*M): None in ordinary training;
    a tensor when a double backward differentiates through the weight gradient, which reads X*M.
    Under create_graph=True (double backward, gradient penalties) the gradients are formed with differentiable
    ATen ops instead of the fused backward op, so they can be differentiated again."""
    needs = ctx.needs_input_grad
    output_mask = [needs[0], needs[2], ctx.has_bias and needs[3]]
    if not any(output_mask):
        return None, None, None
    conv_input, mask, weight, ratio, updated_mask = ctx.saved_tensors
    hole_mask = None if ctx.input_masked else mask
    if grad_output is None:
        grad_input = grad_weight = grad_bias = None
    elif torch.is_grad_enabled():
        grad_input, grad_weight, grad_bias = _differentiable_grads(
            grad_output, conv_input, hole_mask, weight, ratio, updated_mask, ctx.conv_args, output_mask,
            ctx.mask_groups)
    else:
        dims = conv_input.dim() - 2
        backward = getattr(torch.ops.pconv_cuda, f"_partial_conv{dims}d_backward").default
        grad_input, grad_weight, grad_bias = backward(grad_output, conv_input, mask, weight, ratio, updated_mask,
                                                      *ctx.conv_args, output_mask, ctx.mask_groups, ctx.input_masked)
    if grad_masked_input is not None and hole_mask is not None and output_mask[0]:
        extra = _hole_select(grad_masked_input, mask, ctx.mask_groups)  # d(X*M)/dX = M, exactly 0 in holes
        grad_input = extra if grad_input is None else grad_input + extra
    return grad_input, grad_weight, grad_bias


def _hole_select(t: Tensor, mask: Tensor, mask_groups: Optional[Sequence[int]] = None) -> Tensor:
    m = mask.to(t.dtype)
    if mask_groups is not None and 1 < m.shape[1] != t.shape[1]:  # G maps to one per channel
        m = torch.cat([m[:, g:g + 1].expand(-1, c, *m.shape[2:]) for g, c in enumerate(mask_groups)], dim=1)
    return torch.where(m == 0, torch.zeros((), dtype=t.dtype, device=t.device), t * m)


def masked_cat_as_torch_ops(inputs: Sequence[Tensor], mask: Tensor, mask_groups: Optional[Sequence[int]] = None
                            ) -> Tensor:
    """``pconv_cuda::masked_cat`` in differentiable torch operations (what the functional form runs under
    torch.compile and torch.func): the concatenation, then the hole select of each channel's map. The op's shape
    checks; the mask gets no gradient. (Mask values are checked by the op on the CPU only.)"""
    check_masked_cat_shapes(inputs, mask, mask_groups)
    x = torch.cat(list(inputs), dim=1)
    return _hole_select(x, mask.detach(), mask_groups if mask.shape[1] > 1 else None)


def check_masked_cat_shapes(inputs: Sequence[Tensor], mask: Tensor, mask_groups: Optional[Sequence[int]]) -> None:
    """masked_cat's shape checks for the traced forms (the op's own, csrc/common/arg_checks.cpp, run eagerly). The
    messages are formed first: Dynamo takes only constants into a torch._check message."""
    op = "pconv_cuda::masked_cat"
    if len(inputs) == 0:
        raise RuntimeError(f"{op}: inputs must hold at least one tensor")
    channels, maps = sum(t.shape[1] for t in inputs), mask.shape[1]
    dims = f"{op}: mask must be {inputs[0].dim()}-D like the inputs, got {mask.dim()}-D"
    torch._check(mask.dim() == inputs[0].dim(), lambda: dims)
    batch = f"{op}: mask batch size must be 1 or the inputs' batch size"
    torch._check(mask.shape[0] == 1 or mask.shape[0] == inputs[0].shape[0], lambda: batch)
    if mask_groups is None:
        cover = (f"{op}: mask must have 1 map (for every channel) or one per channel of the inputs (C={channels}), "
                 f"got {maps}; or pass mask_groups for a mask of channel groups")
        torch._check(maps == 1 or maps == channels, lambda: cover)
    else:
        cover = (f"{op}: mask_groups={list(mask_groups)} must be positive counts, one per map of the mask ({maps}), "
                 f"summing to the inputs' channels C={channels}")
        torch._check(len(mask_groups) == maps and sum(mask_groups) == channels and all(c >= 1 for c in mask_groups),
                     lambda: cover)


def _differentiable_grads(grad_output, conv_input, mask, weight, ratio, updated_mask, conv_args, output_mask,
                          mask_groups=None):
    """The fused backward written with differentiable ops: same maths, one more graph level."""
    stride, padding, dilation, groups, _ = conv_args
    acc = ratio.dtype  # float32 (float64 for float64): as the kernels accumulate
    g = (grad_output.to(acc) * ratio).to(grad_output.dtype)
    spatial = tuple(range(2, grad_output.dim()))
    grad_bias = (grad_output.to(acc) * updated_mask.to(acc)).sum((0, *spatial)).to(grad_output.dtype) \
        if output_mask[2] else None
    grad_input = grad_weight = None
    if output_mask[0] or output_mask[1]:
        grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
            g, conv_input, weight, None, list(stride), list(padding), list(dilation), False, [0] * len(spatial),
            groups,
            [output_mask[0], output_mask[1], False])
        if grad_input is not None and mask is not None:
            grad_input = _hole_select(grad_input, mask, mask_groups)
    return grad_input, grad_weight, grad_bias


def register_library(ns: str) -> None:
    """Fake kernels and autocast for the ops of library `ns` (which defines them with csrc's schemas, and registers
    their autograd in C++: csrc/common/autograd.h)."""
    for op in CONV_OPS:
        torch.library.register_fake(f"{ns}::{op}")(_conv_fake(op))
        torch.library.register_fake(f"{ns}::_{op}_backward")(_partial_conv_backward_fake)
        register_autocast(ns, op)
    torch.library.register_fake(f"{ns}::mask_update")(_mask_update_fake)
    torch.library.register_fake(f"{ns}::masked_cat")(_masked_cat_fake)
    register_autocast(ns, "masked_cat")


_LIBS: List[torch.library.Library] = []


# --- autocast: the op runs in the dtype the user's autocast region asks for -------------------------------------

def _register_autocast(ns: str, op_name: str, device_type: str) -> None:
    """Like torch.library.register_autocast, but the dtype is read when the op runs (torch.get_autocast_dtype),
    so `torch.autocast(device, dtype=torch.bfloat16)` gives bf16 and float16 gives fp16, as for nn.Conv2d. The
    mask is cast with the input (bool and uint8 masks are kept); the ratio is float32 whatever the dtype."""
    op = getattr(getattr(torch.ops, ns), op_name).default
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

    def cast(t):  # as autocast does for convolutions: float64 is left alone; lists (masked_cat's inputs) by item
        if isinstance(t, (list, tuple)):
            return type(t)(cast(v) for v in t)
        if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 \
                and t.device.type == device_type:
            return t.to(torch.get_autocast_dtype(device_type))
        return t

    @op.py_impl(key)
    def autocast_kernel(*args):
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*[cast(a) for a in args])

    lib = torch.library.Library(ns, "IMPL")
    lib.impl(op_name, lambda keyset, *args: autocast_kernel(*args), key.name, with_keyset=True)
    _LIBS.append(lib)


def register_autocast(ns: str, op_name: str) -> None:
    for device_type in ("cpu", "cuda"):
        if torch._C._is_autocast_available(device_type):
            _register_autocast(ns, op_name, device_type)


register_library("pconv_cuda")


# --- devices without kernels -----------------------------------------------------------------------------------

def missing_kernel_message(op: str, device: str) -> str:
    if device == "cuda" and not _C.WITH_CUDA:
        return (f"pconv_cuda::{op}: this build of pconv_cuda has no CUDA kernels (it was built CPU-only). Rebuild "
                f"with a CUDA toolkit and a CUDA build of torch: "
                f"`CUDA_HOME=/usr/local/cuda FORCE_CUDA=1 pip install --no-build-isolation .`")
    return f"pconv_cuda::{op}: no {device.upper()} kernel in this version of pconv_cuda; move the tensors to the CPU"


def _register_missing(device: str) -> List[str]:
    key = device.upper()
    lib = torch.library.Library("pconv_cuda", "IMPL")
    missing = []
    for op in OPS:
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pconv_cuda::{op}", key):
            def kernel(*args, _op=op, **kwargs):
                raise RuntimeError(missing_kernel_message(_op, device))
            lib.impl(op, kernel, key)
            missing.append(op)
    _LIBS.append(lib)
    return missing


MISSING_CUDA_KERNELS: Sequence[str] = tuple(_register_missing("cuda"))
