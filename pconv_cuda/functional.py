"""Functional partial convolution: argument normalisation around torch.ops.pconv_cuda.*."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

from pconv_cuda import ops

IntOrPair = Union[int, Sequence[int]]
_TUPLE_NAMES = {2: "pair", 3: "triple"}


def _ntuple(value: IntOrPair, n: int, name: str) -> Tuple[int, ...]:
    """An int or n ints as an n-tuple of ints (one per spatial dimension)."""
    if type(value) is tuple and len(value) == n and all(type(v) is int for v in value):
        return value  # already normalised (the module's attributes): the per-call fast path
    what = f"an int or a {_TUPLE_NAMES.get(n, f'{n}-tuple')} of ints"
    if isinstance(value, bool) or not isinstance(value, (int, tuple, list, torch.Size)):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}")
    t = (value,) * n if isinstance(value, int) else tuple(value)
    if len(t) != n or not all(isinstance(v, int) and not isinstance(v, bool) for v in t):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    return t  # type: ignore[return-value]


def resolve_padding(padding: Union[str, IntOrPair], kernel_size: Tuple[int, ...], dilation: Tuple[int, ...],
                    stride: Tuple[int, ...]) -> Tuple[int, ...]:
    """Turns nn.ConvNd's 'valid' / 'same' into symmetric padding, one value per spatial dimension (as many as
    kernel_size has); other values pass through as that many ints."""
    n = len(kernel_size)
    if not isinstance(padding, str):
        return _ntuple(padding, n, "padding")
    kernel_size = _static_sizes(kernel_size)
    if padding == "valid":
        return (0,) * n
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError("padding='same' is only supported with stride 1, like nn.Conv2d")
        total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        if any(t % 2 for t in total):
            raise ValueError(f"padding='same' needs an odd dilated kernel extent for symmetric padding; kernel "
                             f"{kernel_size} with dilation {dilation} would need asymmetric padding")
        return tuple(t // 2 for t in total)
    raise ValueError(f"padding must be 'valid', 'same', an int or a {_TUPLE_NAMES.get(n, f'{n}-tuple')} of ints, "
                     f"got {padding!r}")


def _static_sizes(sizes: Sequence) -> Tuple[int, ...]:
    """A weight's kernel sizes as ints. The TorchScript tracer hands sizes out as 0-d tensors and warns when one is
    read as an int; a kernel size is a constant of the model."""
    if all(type(k) is int for k in sizes):
        return tuple(sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return tuple(int(k) for k in sizes)


def partial_conv2d(
    input: Tensor,
    mask: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: Union[str, IntOrPair] = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    multi_channel: bool = False,
    mask_groups: Optional[Sequence[int]] = None,
    input_masked: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Partial convolution (Liu et al. 2018). Returns ``(output, updated_mask)``.

    With ``S`` the zero-padded window sum of ``mask`` (also over channels when ``multi_channel``),
    ``win = kh*kw`` (``C_in*kh*kw`` multi-channel), ``U = clamp(S, 0, 1)`` and ``ratio = win / S * U``
    (0 where ``S == 0``)::

        output = conv2d(input * mask, weight) * ratio + bias * U

    ``mask`` is (N or 1, 1, H, W), or (N or 1, C_in, H, W) with ``multi_channel=True``, in the input's dtype, bool
    or uint8, with values in [0, 1] (1 = valid, 0 = hole); ``None`` means no holes. ``updated_mask`` is ``U`` of
    shape (N_mask, 1, H', W') in the input's dtype. Differentiable in input, weight and bias, not in mask.

    ``mask_groups`` (with ``multi_channel=True``): the mask is (N or 1, G, H, W), G maps of which map g covers the
    next ``mask_groups[g]`` input channels (positive counts summing to C_in), with exactly the result of that mask
    expanded to C_in channels (``mask.repeat_interleave(torch.tensor(mask_groups), 1)``), which is never formed:
    e.g. a U-Net skip link's ``torch.cat([up_mask, skip_mask], 1)`` with ``mask_groups=(c_up, c_skip)``. A
    multi-channel mask that is one map expanded over the channels (stride 0, ``m.expand(-1, C_in, -1, -1)``) is
    taken as one group without a copy.

    ``input_masked=True``: ``input`` already is ``X * mask`` with exact zeros in the holes, as :func:`masked_cat`
    forms it (say, writing a skip link's concatenation masked, in one pass): the mask is read only for ``S``, the
    input is convolved as it is, and its gradient is the convolution's, not zeroed in the holes (``masked_cat``'s
    backward does that). Values in the holes then do matter: they must be zero.
    """
    return _partial_conv(2, input, mask, weight, bias, stride, padding, dilation, groups, multi_channel, mask_groups,
                         input_masked)


def partial_conv3d(
    input: Tensor,
    mask: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrPair = 1,
    padding: Union[str, IntOrPair] = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    multi_channel: bool = False,
    mask_groups: Optional[Sequence[int]] = None,
    input_masked: bool = False,
) -> Tuple[Tensor, Tensor]:
    """3-D partial convolution (video, volumes). Returns ``(output, updated_mask)``.

    :func:`partial_conv2d` with a depth: ``input`` (N, C_in, D, H, W), ``weight`` (C_out, C_in / groups, kd, kh, kw),
    ``mask`` (N or 1, 1, D, H, W), or (N or 1, C_in, D, H, W) with ``multi_channel=True``, or ``None``; stride,
    padding and dilation are an int or three ints. S is the window sum over (kd, kh, kw), ``win = kd*kh*kw``
    (``C_in*kd*kh*kw`` multi-channel); ``updated_mask`` is (N_mask, 1, D', H', W'). Same semantics, dtypes,
    ``mask_groups``, ``input_masked`` and autograd paths as the 2-D call.
    """
    return _partial_conv(3, input, mask, weight, bias, stride, padding, dilation, groups, multi_channel, mask_groups,
                         input_masked)


def _static_bool(value) -> bool:
    """A flag argument as a bool. The TorchScript ONNX exporter hands a module's default arguments to its forward as
    tensors, constants of the trace (and warns when one is read)."""
    if type(value) is bool:
        return value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return bool(value)


def _mask_groups(value) -> Optional[Tuple[int, ...]]:
    """mask_groups as a tuple of ints (the op checks the values: positive, summing to C_in, one per map)."""
    if value is None:
        return None
    if type(value) is tuple and all(type(v) is int for v in value):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list, torch.Size)):
        raise TypeError(f"mask_groups must be a sequence of ints (input channels per mask map), got "
                        f"{type(value).__name__}")
    # The TorchScript tracer hands out sizes (a model's channel counts) as 0-d integer tensors: constants of the trace.
    t = tuple(int(v) if isinstance(v, torch.Tensor) and v.dim() == 0 and not v.is_floating_point()
              and v.dtype != torch.bool else v for v in value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in t):
        raise TypeError(f"mask_groups must be a sequence of ints (input channels per mask map), got {value!r}")
    return t


def _partial_conv(dims, input, mask, weight, bias, stride, padding, dilation, groups, multi_channel,
                  mask_groups=None, input_masked=False):
    stride_ = _ntuple(stride, dims, "stride")
    dilation_ = _ntuple(dilation, dims, "dilation")
    padding_ = resolve_padding(padding, tuple(weight.shape[2:2 + dims]), dilation_, stride_)
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    args = (input, mask, weight, bias, stride_, padding_, dilation_, groups, bool(multi_channel),
            _mask_groups(mask_groups), _static_bool(input_masked))
    if _needs_function():
        run = _onnx_lowering().partial_conv_as_torch_ops if _in_onnx_export() else PartialConv2dFunction.apply
    elif _tracing_state() is not None and _in_onnx_export():  # the TorchScript exporter
        run = _onnx_lowering().partial_conv_as_torch_ops
    else:  # eager: the op, whose C++ autograd kernel records the call when something requires grad
        run = _op(dims)
    output, updated_mask, _, _ = run(*args)
    return output, updated_mask


def _op(dims: int):
    """partial_conv2d or partial_conv3d, for 2 or 3 spatial dimensions."""
    return torch.ops.pconv_cuda.partial_conv3d.default if dims == 3 else torch.ops.pconv_cuda.partial_conv2d.default


def _in_onnx_export() -> bool:
    """Whether torch.onnx.export is capturing the call. Its default exporter runs the model under torch.export (as
    compiling: `_needs_function`), the TorchScript one traces it (`_tracing_state`); the functional forms then run
    the ONNX lowering as torch operations (pconv_cuda/onnx.py), which either exporter translates to standard ONNX
    operators with nothing registered. The flag costs ~2 us, so it is read only while compiling, transforming or
    tracing (Dynamo folds it to False under torch.compile)."""
    return torch.onnx.is_in_onnx_export()


def _onnx_lowering():
    from pconv_cuda import onnx  # (imported on the first export only: it is no cost of `import pconv_cuda`)

    return onnx


_tracing_state = torch._C._get_tracing_state


def _needs_function() -> bool:
    """Whether a call runs through PartialConv2dFunction: under torch.compile, forward-mode AD or a torch.func
    transform, which need a Python Function's setup_context (it handles or refuses each transform; Dynamo traces
    it). Plain eager calls, recorded or not, take the op and its C++ autograd (csrc/common/autograd.h): no Python
    in the autograd bookkeeping or the backward (a Python autograd kernel cost ~20 us a call)."""
    if torch.compiler.is_compiling():
        return True
    return forward_ad._current_level >= 0 or torch._C._functorch.peek_interpreter_stack() is not None


def _single(value, name: str) -> int:
    if type(value) is int:
        return value
    if isinstance(value, (tuple, list)) and len(value) == 1 and type(value[0]) is int:
        return value[0]
    raise TypeError(f"{name} must be an int or a 1-tuple of ints, got {value!r}")


def partial_conv1d(
    input: Tensor,
    mask: Optional[Tensor],
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: Union[int, Sequence[int]] = 1,
    padding: Union[str, int, Sequence[int]] = 0,
    dilation: Union[int, Sequence[int]] = 1,
    groups: int = 1,
    multi_channel: bool = False,
    mask_groups: Optional[Sequence[int]] = None,
    input_masked: bool = False,
) -> Tuple[Tensor, Tensor]:
    """1-D partial convolution: :func:`partial_conv2d` on a height-1 view. Returns ``(output, updated_mask)``.

    ``input`` is (N, C_in, L), ``weight`` (C_out, C_in / groups, k), ``mask`` (N or 1, 1, L), or (N or 1, C_in, L)
    with ``multi_channel=True`` (or (N or 1, G, L) with ``mask_groups``), or ``None``. A window of height 1 with no vertical padding covers the one row, so S,
    ``win = k`` (``C_in*k`` multi-channel), ratio and U are exactly the 1-D ones; ``updated_mask`` is
    (N_mask, 1, L'). Same ops, same backward, same dtypes, ``input_masked`` and autograd paths as the 2-D call.
    """
    if input.dim() != 3:
        raise ValueError(f"partial_conv1d: input must be a 3-D tensor (N, C_in, L), got shape {list(input.shape)}")
    if weight.dim() != 3:
        raise ValueError(f"partial_conv1d: weight must be a 3-D tensor (C_out, C_in / groups, k), got shape "
                         f"{list(weight.shape)}")
    if mask is not None and mask.dim() != 3:
        raise ValueError(f"partial_conv1d: mask must be a 3-D tensor (N, C, L), got shape {list(mask.shape)}")
    # (The op checks it too, in 2-D terms; this is the 1-D message. Skipped while tracing, where sizes are traced.)
    if mask is not None and not torch.jit.is_tracing() and mask.shape[2] != input.shape[2]:
        raise ValueError(f"partial_conv1d: mask length {mask.shape[2]} must equal the input's {input.shape[2]}")
    stride_, dilation_ = _single(stride, "stride"), _single(dilation, "dilation")
    if isinstance(padding, str):
        padding_ = resolve_padding(padding, (1, weight.shape[2]), (1, dilation_), (1, stride_))
    else:
        padding_ = (0, _single(padding, "padding"))
    output, updated_mask = partial_conv2d(input.unsqueeze(2), None if mask is None else mask.unsqueeze(2),
                                          weight.unsqueeze(2), bias, (1, stride_), padding_, (1, dilation_), groups,
                                          multi_channel, mask_groups, input_masked)
    return output.squeeze(2), updated_mask.squeeze(2)


def masked_cat(inputs: Sequence[Tensor], mask: Tensor, mask_groups: Optional[Sequence[int]] = None) -> Tensor:
    """``torch.cat(inputs, 1) * mask`` with exact zeros in the holes, in one pass that never forms the
    concatenation: the input of a partial convolution called with ``input_masked=True`` and the same mask.

    ``inputs`` are (N, C_i, H, W) (or (N, C_i, D, H, W)) of one floating dtype and device; ``mask`` is (N or 1, G,
    H, W) over their ``C = sum(C_i)`` channels as a multi-channel partial convolution takes it: one map for every
    channel (G = 1), one per channel (G = C), or with ``mask_groups`` G maps of which map g covers the next
    ``mask_groups[g]`` channels; in the inputs' dtype, bool or uint8, values in [0, 1] (checked on the CPU; CUDA
    cannot raise without a host sync: the convolution's plane shows a bad value as NaN). The output has the first
    input's layout (channels_last kept). The gradient of each input is ``mask * grad`` (0 in holes); the mask gets
    none. A U-Net skip link::

        maps = torch.cat([up_mask, skip_mask], 1)                          # two maps, not C channels
        groups = (up.shape[1], skip.shape[1])
        xm = masked_cat([up, skip], maps, groups)
        out, new_mask = partial_conv2d(xm, maps, weight, ..., multi_channel=True, mask_groups=groups,
                                       input_masked=True)
    """
    if isinstance(inputs, Tensor) or not isinstance(inputs, (list, tuple)):
        raise TypeError(f"masked_cat: inputs must be a list or tuple of tensors, got {type(inputs).__name__}")
    groups = _mask_groups(mask_groups)
    if (_needs_function() or _tracing_state() is not None) and _in_onnx_export():
        return _onnx_lowering().masked_cat_as_torch_ops(inputs, mask, groups)
    if _needs_function():  # torch.compile, torch.func: the same maths in differentiable torch operations
        return ops.masked_cat_as_torch_ops(inputs, mask, groups)
    return torch.ops.pconv_cuda.masked_cat(list(inputs), mask, groups)


def mask_update(
    mask: Tensor,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    multi_channel: bool = False,
    mask_groups: Optional[Sequence[int]] = None,
) -> Tuple[Tensor, Tensor]:
    """The mask path alone: returns ``(ratio, updated_mask)``, each (N, 1, H', W'); for a 5-D mask
    (N, C, D, H, W) each is (N, 1, D', H', W') and the int-or-tuple arguments have three elements. With
    ``mask_groups`` (and ``multi_channel=True``) the mask's G maps stand for ``sum(mask_groups)`` channels, as in
    :func:`partial_conv2d`.

    ``ratio = win / S * clamp(S, 0, 1)`` (0 where ``S == 0``) in float32 (float64 for a float64 mask),
    ``updated_mask = clamp(S, 0, 1)`` in the mask's dtype (float32 for bool / uint8 masks).
    """
    dims = 3 if mask.dim() == 5 else 2  # the op names any other dim() in its error
    stride_ = _ntuple(stride, dims, "stride")
    dilation_ = _ntuple(dilation, dims, "dilation")
    kernel_ = _ntuple(kernel_size, dims, "kernel_size")
    padding_ = resolve_padding(padding, kernel_, dilation_, stride_)
    if (torch.compiler.is_compiling() or _tracing_state() is not None) and _in_onnx_export():
        return _onnx_lowering().mask_update_as_torch_ops(mask, kernel_, stride_, padding_, dilation_,
                                                         bool(multi_channel), _mask_groups(mask_groups))
    return torch.ops.pconv_cuda.mask_update(mask, kernel_, stride_, padding_, dilation_, bool(multi_channel),
                                            _mask_groups(mask_groups))


class PartialConv2dFunction(torch.autograd.Function):
    """``torch.autograd.Function`` over the same ops (and the same backward) as :func:`partial_conv2d` (and
    :func:`partial_conv3d`: a 5-D input runs the 3-D op).

    ``PartialConv2dFunction.apply(input, mask, weight, bias, stride, padding, dilation, groups, multi_channel,
    mask_groups=None, input_masked=False)`` returns the op's four outputs ``(output, updated_mask, ratio, masked_input)``: ratio and masked_input (X*M, an
    empty tensor for ``mask=None``) are what the backward keeps; only ``output`` and ``masked_input`` carry
    gradients. ``stride``, ``padding`` and ``dilation`` are (h, w) pairs ((d, h, w) for a 5-D input). It has ``setup_context`` and a generated
    vmap rule, so torch.func transforms (grad, vjp, jacrev, vmap) apply; :func:`partial_conv2d` runs through it
    under torch.func and torch.compile (plain eager calls take a cheaper path to the same op and backward).
    """

    generate_vmap_rule = True  # vmap runs forward under vmap (the op's batched fallback) and derives the rest

    @staticmethod
    def forward(input, mask, weight, bias, stride, padding, dilation, groups, multi_channel, mask_groups=None,
                input_masked=False):
        return _run_op(*_normalised(input, mask, weight, bias, stride, padding, dilation, groups, multi_channel,
                                    mask_groups, input_masked))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, _normalised(*inputs), output)

    @staticmethod
    def backward(ctx, grad_output, grad_updated, grad_ratio, grad_masked_input):
        grad_input, grad_weight, grad_bias = ops.input_grads(ctx, grad_output, grad_masked_input)
        return grad_input, None, grad_weight, grad_bias, None, None, None, None, None, None, None


def _normalised(input, mask, weight, bias, stride, padding, dilation, groups, multi_channel, mask_groups=None,
                input_masked=False):
    n = input.dim() - 2
    return (input, mask, weight, bias, _ntuple(stride, n, "stride"), _ntuple(padding, n, "padding"),
            _ntuple(dilation, n, "dilation"), groups, bool(multi_channel), _mask_groups(mask_groups),
            bool(input_masked))


def _run_op(input, mask, weight, bias, stride, padding, dilation, groups, multi_channel, mask_groups,
            input_masked):
    """The op, inside an autograd.Function's forward, which records the graph itself."""
    op = _op(input.dim() - 2)
    args = (input, mask, weight, bias, stride, padding, dilation, groups, multi_channel, mask_groups, input_masked)
    if torch.compiler.is_compiling():
        return op(*args)
    # Skip the op's own autograd kernel (what that kernel does itself once it has decided not to record).
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _save(ctx, inputs, output) -> None:
    # The op's own autograd registration (pconv_cuda.ops) does the same: one backward for every path.
    input, mask, weight, bias, stride, padding, dilation, groups, multi_channel, mask_groups, input_masked = inputs
    _, updated_mask, ratio, masked_input = output
    ops.save_for_backward(ctx, input, mask, weight, bias, ratio, updated_mask, masked_input,
                          (stride, padding, dilation, groups, multi_channel), mask_groups, input_masked)
    ctx.mark_non_differentiable(updated_mask, ratio)
    ctx.set_materialize_grads(False)
