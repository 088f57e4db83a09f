"""ONNX export of the pconv_cuda ops, with both of ``torch.onnx.export``'s exporters.

The ops are lowered to standard ONNX operators (no custom domain, so any runtime runs the model), with the maths
of docs/architecture.md::

    S      = Conv(M, ones(1, C_m, kh, kw))          window sum of the mask (C_m = C_in multi-channel, else 1;
                                                    (kd, kh, kw) for partial_conv3d; with mask_groups the
                                                    kernel's map g is mask_groups[g], not 1)
    U      = Clip(S, 0, 1)                          the updated mask
    ratio  = Where(S == 0, 0, win / S * U)          float32 (float64 for float64 input)
    Y      = Conv(Where(M == 0, 0, X * M), W) * ratio + b * U   (mask_groups: M = Gather(M, channel's map))

``mask=None`` counts the in-bounds taps with the same ones-Conv over a ones plane of the input's spatial size
(``ConstantOfShape(Shape(X)[2:])``), so border windows are renormalised and the batch axis stays dynamic; the
convolution then reads X as it is.

``masked_cat`` is Concat over channels, then the same select (:func:`_lower_masked_cat`); ``input_masked``
convolves the input as it is.

One lowering (:func:`_lower_partial_conv`, 2-D and 3-D; :func:`_lower_mask_update`) writes that graph against a
small builder interface, and three builders run it:

* torch operations (:class:`_TorchBuilder`). Under ``torch.onnx.export``, with either exporter, the functional forms
  (and so ``PartialConv1d/2d/3d`` and every model built on them) run the lowering as torch operations instead of
  the op (``functional._in_onnx_export``); the exporter records plain aten operations and translates them to
  standard ONNX itself. Nothing is registered, so ``import pconv_cuda`` and a plain ``torch.onnx.export(model,
  args, f)`` suffice, with the default exporter (``dynamo=True``) or ``dynamo=False``. As for any model, the axes
  are those of the example unless ``dynamic_shapes`` (``dynamo=True``) or ``dynamic_axes`` (``dynamo=False``)
  say otherwise; the graph itself holds no batch size, so a dynamic batch works.
* ONNX Script (:func:`custom_translation_table`) and TorchScript symbolics (:func:`register_torchscript_symbolics`,
  registered when this module is imported) translate direct calls of ``torch.ops.pconv_cuda.partial_conv2d``
  (``partial_conv3d``, ``mask_update``), which no functional form wraps. :func:`export` passes the table, so it
  exports those too; it also makes the batch axis dynamic by default.

Importing this module needs neither onnx nor onnxscript; they are imported when an export runs (``pip install
'pconv_cuda[onnx]'``).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["export", "custom_translation_table", "register_torchscript_symbolics", "TORCHSCRIPT_OPSET"]

#: The lowest opset the TorchScript symbolics are registered for (Clip with min/max inputs, Slice with inputs).
TORCHSCRIPT_OPSET = 11

# ONNX TensorProto data types (the values of onnx.TensorProto.* and onnx_ir.DataType.*).
_FLOAT, _FLOAT16, _DOUBLE, _BFLOAT16 = 1, 10, 11, 16
_FLOATING = {_FLOAT, _FLOAT16, _DOUBLE, _BFLOAT16}


# --- one lowering, two graph builders ---------------------------------------------------------------------------

class _Builder:
    """The few things the lowering needs from a graph builder: ``op(type, *inputs, **attributes)``,
    ``const(numpy array)``, ``dtype(value)`` (an ONNX TensorProto data type) and ``shape(value)``."""

    def op(self, op_type: str, *inputs, **attrs):
        raise NotImplementedError

    def const(self, array: np.ndarray):
        raise NotImplementedError

    def dtype(self, value) -> int:
        raise NotImplementedError

    def shape(self, value) -> Optional[List[Optional[int]]]:
        raise NotImplementedError


class _OnnxScriptBuilder(_Builder):
    """ONNX Script ops, recorded by the dynamo exporter's tracer (the values are onnx_ir Values)."""

    def __init__(self) -> None:
        import onnx_ir as ir
        from onnxscript import opset18

        self._ir = ir
        self._opset = opset18

    def op(self, op_type, *inputs, **attrs):
        attrs = {k: (self._ir.tensor(v) if isinstance(v, np.ndarray) else v) for k, v in attrs.items()}
        return getattr(self._opset, op_type)(*inputs, **attrs)

    def const(self, array):
        return self._opset.Constant(value=self._ir.tensor(array))

    def dtype(self, value):
        return int(value.dtype)

    def shape(self, value):
        if value.shape is None:
            return None
        return [d if isinstance(d, int) else None for d in value.shape]


class _TorchScriptBuilder(_Builder):
    """``g.op`` of the TorchScript exporter (attribute names get the type suffix g.op wants)."""

    def __init__(self, g) -> None:
        self.g = g

    def op(self, op_type, *inputs, **attrs):
        named = {}
        for key, v in attrs.items():
            if isinstance(v, np.ndarray):
                named[key + "_t"] = torch.from_numpy(v)
            elif isinstance(v, float):
                named[key + "_f"] = v
            else:  # int, bool, list of ints
                named[key + "_i"] = v
        return self.g.op(op_type, *inputs, **named)

    def const(self, array):
        return self.g.op("Constant", value_t=torch.from_numpy(array))

    def dtype(self, value):
        from torch.onnx._internal.torchscript_exporter import _type_utils

        scalar = _type_utils.JitScalarType.from_value(value, _type_utils.JitScalarType.FLOAT)
        return int(scalar.onnx_type())

    def shape(self, value):
        from torch.onnx._internal.torchscript_exporter import symbolic_helper

        return symbolic_helper._get_tensor_sizes(value)


def _np_dtype(onnx_dtype: int):
    return np.float64 if onnx_dtype == _DOUBLE else np.float32


def _window_sum(b: _Builder, x, mask, kernel: Sequence[int], stride, padding, dilation, multi_channel: bool,
                c_in: int, mask_groups: Optional[Sequence[int]] = None):
    """S (N_mask or 1, 1, [D',] H', W') in float32 (float64 for float64 input), and win = kh*kw (*kd) (*C_in)."""
    kernel = list(kernel)
    taps = int(np.prod(kernel))
    acc = _DOUBLE if b.dtype(x) == _DOUBLE else _FLOAT
    conv = dict(strides=list(stride), pads=list(padding) * 2, dilations=list(dilation), group=1)
    win = taps * (c_in if multi_channel else 1)
    if mask is None:
        # In-bounds taps: a ones-Conv over a ones plane (1, 1, H, W) shaped like the input's spatial size, so the
        # graph stays valid for any batch (and H, W). Every channel counts alike: multi-channel S is C_in times
        # it, which leaves ratio and U unchanged (S is an integer >= 1, or 0).
        end = 2 + len(kernel)
        hw = b.op("Slice", b.op("Shape", x), b.const(np.array([2], np.int64)), b.const(np.array([end], np.int64)))
        plane_shape = b.op("Concat", b.const(np.array([1, 1], np.int64)), hw, axis=0)
        plane = b.op("ConstantOfShape", plane_shape, value=np.ones((1,), _np_dtype(acc)))
        s = b.op("Conv", plane, b.const(np.ones((1, 1, *kernel), _np_dtype(acc))), **conv)
        win = taps  # per channel: the same ratio as C_in*taps / (C_in*S)
        return s, win, acc
    m = mask if b.dtype(mask) == acc else b.op("Cast", mask, to=acc)
    c_m = c_in if multi_channel else 1
    ones = np.ones((1, c_m, *kernel), _np_dtype(acc))
    if mask_groups is not None:  # map g counts once per channel it covers
        ones = np.ones((1, len(mask_groups), *kernel), _np_dtype(acc))
        ones *= np.asarray(mask_groups, _np_dtype(acc)).reshape(1, -1, *(1,) * len(kernel))
    s = b.op("Conv", m, b.const(ones), **conv)
    return s, win, acc


def _ratio_and_update(b: _Builder, s, win: int, acc: int):
    """U = clamp(S, 0, 1); ratio = win / S * U where S != 0, else 0 (NaN stays NaN)."""
    zero = b.const(np.array(0, _np_dtype(acc)))
    one = b.const(np.array(1, _np_dtype(acc)))
    update = b.op("Clip", s, zero, one)
    is_zero = b.op("Equal", s, zero)
    safe = b.op("Where", is_zero, one, s)
    ratio = b.op("Mul", b.op("Div", b.const(np.array(win, _np_dtype(acc))), safe), update)
    ratio = b.op("Where", is_zero, zero, ratio)
    return ratio, update


def _cast(b: _Builder, value, from_: int, to: int):
    # from_ is tracked by the lowering: the builders do not always type intermediate values.
    return value if from_ == to else b.op("Cast", value, to=to)


def _lower_partial_conv(b: _Builder, input, mask, weight, bias, stride, padding, dilation, groups, multi_channel,
                        mask_groups: Optional[Sequence[int]] = None, input_masked: bool = False):
    """(output, updated_mask, ratio, masked_input) of pconv_cuda::partial_conv2d or partial_conv3d (by the
    weight's rank) in ONNX operators."""
    if input_masked and mask is None:
        raise RuntimeError("pconv_cuda::partial_conv: input_masked=True says the input is X*M for a mask, but mask "
                           "is None")
    w_shape = b.shape(weight)
    if w_shape is None or len(w_shape) not in (4, 5) or any(d is None for d in w_shape):
        raise RuntimeError("pconv_cuda ONNX export: the weight's shape must be known (static) at export time")
    c_out, c_in_g, *kernel = w_shape
    c_in = c_in_g * groups
    x_dtype = b.dtype(input)
    s, win, acc = _window_sum(b, input, mask, kernel, stride, padding, dilation, multi_channel, c_in, mask_groups)
    ratio, update = _ratio_and_update(b, s, win, acc)

    if mask is None or input_masked:  # X convolved as it is (input_masked: it is X*M already)
        conv_in = input
        masked_input = b.const(np.zeros((0,), np.float32))  # the op returns an empty tensor then
        masked_input = _cast(b, masked_input, _FLOAT, x_dtype)
    else:
        conv_in = _hole_select(b, input, mask, mask_groups, c_in, x_dtype)
        masked_input = conv_in
    raw = b.op("Conv", conv_in, weight, strides=list(stride), pads=list(padding) * 2, dilations=list(dilation),
               group=groups, kernel_shape=list(kernel))
    # Renormalise in the ratio's precision (float32 for half input), as the kernels do.
    out = b.op("Mul", _cast(b, raw, x_dtype, acc), ratio)
    if bias is not None:
        b4 = b.op("Reshape", _cast(b, bias, b.dtype(bias), acc),
                  b.const(np.array([1, c_out] + [1] * len(kernel), np.int64)))
        out = b.op("Add", out, b.op("Mul", b4, update))
    out = _cast(b, out, acc, x_dtype)
    return out, _cast(b, update, acc, x_dtype), ratio, masked_input


def _hole_select(b: _Builder, x, mask, mask_groups: Optional[Sequence[int]], channels: int, x_dtype: int):
    """X*M as a select, so that NaN / inf stored in a hole never reaches the output; channel c reads its map."""
    m = _cast(b, mask, b.dtype(mask), x_dtype)
    if mask_groups is not None and 1 < len(mask_groups) < channels:
        # Each channel's map (one map broadcasts as it is; one per channel is the mask itself).
        index = np.repeat(np.arange(len(mask_groups), dtype=np.int64), list(mask_groups))
        m = b.op("Gather", m, b.const(index), axis=1)
    zero = _cast(b, b.const(np.array(0, np.float32)), _FLOAT, x_dtype)
    return b.op("Where", b.op("Equal", m, zero), zero, b.op("Mul", x, m))


def _lower_masked_cat(b: _Builder, inputs: Sequence, mask, mask_groups: Optional[Sequence[int]] = None):
    """pconv_cuda::masked_cat: Concat over channels, then the hole select with each channel's map."""
    shapes = [b.shape(t) for t in inputs]
    if any(s is None or len(s) < 2 or s[1] is None for s in shapes):
        raise RuntimeError("pconv_cuda ONNX export: masked_cat needs its inputs' channel counts (static)")
    m_shape = b.shape(mask)
    channels, maps = sum(s[1] for s in shapes), None if m_shape is None or len(m_shape) < 2 else m_shape[1]
    if maps is not None and (mask_groups is None and maps not in (1, channels) or mask_groups is not None and (
            len(mask_groups) != maps or sum(mask_groups) != channels)):
        raise RuntimeError(f"pconv_cuda::masked_cat: a mask of {maps} maps does not cover the inputs' {channels} "
                           f"channels with mask_groups={mask_groups}")
    x = inputs[0] if len(inputs) == 1 else b.op("Concat", *inputs, axis=1)
    return _hole_select(b, x, mask, mask_groups, sum(s[1] for s in shapes), b.dtype(inputs[0]))


def _lower_mask_update(b: _Builder, mask, kernel_size, stride, padding, dilation, multi_channel,
                       mask_groups: Optional[Sequence[int]] = None):
    """(ratio, updated_mask) of pconv_cuda::mask_update."""
    m_shape = b.shape(mask)
    c_m = m_shape[1] if m_shape is not None and len(m_shape) in (4, 5) else None
    if mask_groups is not None:
        c_m = sum(mask_groups)
    if multi_channel and c_m is None:
        raise RuntimeError("pconv_cuda ONNX export: a multi-channel mask_update needs the mask's channel count")
    m_dtype = b.dtype(mask)
    s, win, acc = _window_sum(b, mask, mask, kernel_size, stride, padding, dilation, multi_channel, c_m or 1,
                              mask_groups)
    ratio, update = _ratio_and_update(b, s, win, acc)
    return ratio, _cast(b, update, acc, m_dtype if m_dtype in _FLOATING else _FLOAT)


# --- the lowering as torch operations: what torch.onnx.export records for the functional forms -----------------

# ONNX TensorProto data types of the torch dtypes the lowering meets.
_ONNX_OF_TORCH = {torch.float32: _FLOAT, torch.float16: _FLOAT16, torch.float64: _DOUBLE, torch.bfloat16: _BFLOAT16,
                  torch.uint8: 2, torch.int8: 3, torch.int32: 6, torch.int64: 7, torch.bool: 9}
_TORCH_OF_ONNX = {v: k for k, v in _ONNX_OF_TORCH.items()}


_TORCH_OF_NUMPY = {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
                   np.dtype(np.float64): torch.float64, np.dtype(np.int64): torch.int64, np.dtype(np.bool_): torch.bool}


def _torch_dtype(array: np.ndarray) -> torch.dtype:
    return _TORCH_OF_NUMPY[array.dtype]


class _Shape(tuple):
    """A Shape value: the sizes as Python ints (SymInts under torch.export), so that slicing and concatenating it
    stays symbolic and a dynamic batch is never read as data."""


class _TorchBuilder(_Builder):
    """The lowering's ONNX operators run as torch operations (constants stay numpy until an operation needs them:
    0-d ones enter as Python numbers, index arrays as ints).

    Under ``torch.onnx.export`` the functional forms run this instead of the op (``functional._in_onnx_export``),
    so either exporter records plain aten operations (convolution, where, clamp, ...) that it translates to standard
    ONNX operators itself: no registration, no ``custom_translation_table``, the same graph maths as the other two
    builders."""

    def __init__(self, like: torch.Tensor) -> None:
        self.device = like.device

    def op(self, op_type, *inputs, **attrs):
        return getattr(self, "_" + op_type)(*inputs, **attrs)

    def const(self, array):
        return np.asarray(array)

    def dtype(self, value):
        return _ONNX_OF_TORCH[_torch_dtype(value) if isinstance(value, np.ndarray) else value.dtype]

    def shape(self, value):
        # The lowering asks only for sizes fixed by the model (the weight's, a multi-channel mask's channels). The
        # TorchScript tracer hands every size out as a 0-d tensor and warns when one is read as an int: these are
        # constants of the trace by construction. Under torch.export a dynamic size is a SymInt: None here.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return [int(d) if isinstance(d, (int, torch.Tensor)) else None for d in value.shape]

    def _tensor(self, v) -> torch.Tensor:
        if not isinstance(v, np.ndarray):
            return v
        # The lowering's tensor constants are ones kernels, 0-d values and the empty masked_input: factory calls,
        # which every tracer records as such (a tensor made from data is a baked-in constant).
        if v.size == 0:
            return torch.empty(v.shape, dtype=_torch_dtype(v), device=self.device)
        if (v == v.flat[0]).all():
            return torch.full(v.shape, v.flat[0].item(), dtype=_torch_dtype(v), device=self.device)
        with warnings.catch_warnings():  # (an index constant of the model, e.g. each channel's map: baked in)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return torch.tensor(v.tolist(), dtype=_torch_dtype(v), device=self.device)

    def _operand(self, v):
        return v.item() if isinstance(v, np.ndarray) and v.ndim == 0 else self._tensor(v)

    def _Shape(self, x):
        return _Shape(x.shape)

    def _Slice(self, data, starts, ends):
        return _Shape(data[int(starts[0]):int(ends[0])])

    def _Concat(self, *inputs, axis):
        if axis != 0:  # tensors (masked_cat's inputs); axis 0 joins Shape values
            return torch.cat([self._tensor(v) for v in inputs], axis)
        return _Shape(s for v in inputs for s in (v if isinstance(v, _Shape) else (int(i) for i in v)))

    def _ConstantOfShape(self, shape, value):
        return torch.full(tuple(shape), value.flat[0].item(), dtype=_torch_dtype(value), device=self.device)

    def _Conv(self, x, w, strides, pads, dilations, group, kernel_shape=None):
        n = len(strides)
        assert pads[:n] == pads[n:], "the lowering pads symmetrically"
        conv = torch.nn.functional.conv3d if n == 3 else torch.nn.functional.conv2d
        return conv(x, self._tensor(w), None, strides, pads[:n], dilations, group)

    def _Cast(self, v, to):
        return self._tensor(v).to(_TORCH_OF_ONNX[to])

    def _Clip(self, x, low, high):
        return torch.clamp(x, self._operand(low), self._operand(high))

    def _Equal(self, a, b):
        return self._tensor(a) == self._operand(b)

    def _Where(self, cond, a, b):
        return torch.where(cond, self._operand(a), self._operand(b))

    def _Mul(self, a, b):
        return self._operand(a) * self._operand(b)

    def _Div(self, a, b):
        a, b = self._operand(a), self._operand(b)
        if not isinstance(a, torch.Tensor):  # float / tensor is reciprocal(tensor) * float: an ulp off a true Div
            a = torch.scalar_tensor(a, dtype=b.dtype, device=b.device)
        return a / b

    def _Add(self, a, b):
        return self._operand(a) + self._operand(b)

    def _Reshape(self, x, shape):
        return x.reshape([int(s) for s in shape])

    def _Gather(self, data, index, axis):
        return torch.index_select(data, axis, self._operand(index).to(device=data.device, dtype=torch.long))


def partial_conv_as_torch_ops(input, mask, weight, bias, stride, padding, dilation, groups, multi_channel,
                              mask_groups=None, input_masked=False):
    """``pconv_cuda::partial_conv2d`` / ``partial_conv3d``'s four outputs (by the weight's rank) computed by the ONNX
    lowering in torch operations: what the functional forms run under ``torch.onnx.export``."""
    b = _TorchBuilder(input)
    outputs = _lower_partial_conv(b, input, mask, weight, bias, list(stride), list(padding), list(dilation),
                                  int(groups), bool(multi_channel), _groups_list(mask_groups), bool(input_masked))
    return tuple(b._tensor(v) for v in outputs)  # (masked_input for mask=None is a constant)


def masked_cat_as_torch_ops(inputs, mask, mask_groups=None):
    """``pconv_cuda::masked_cat`` by the ONNX lowering in torch operations."""
    return _lower_masked_cat(_TorchBuilder(mask), list(inputs), mask, _groups_list(mask_groups))


def mask_update_as_torch_ops(mask, kernel_size, stride, padding, dilation, multi_channel, mask_groups=None):
    """``pconv_cuda::mask_update``'s (ratio, updated_mask) by the ONNX lowering in torch operations."""
    return _lower_mask_update(_TorchBuilder(mask), mask, list(kernel_size), list(stride), list(padding),
                              list(dilation), bool(multi_channel), _groups_list(mask_groups))


# --- dynamo exporter (torch.export + ONNX Script) ---------------------------------------------------------------

def _groups_list(mask_groups) -> Optional[List[int]]:
    return None if mask_groups is None else [int(c) for c in mask_groups]


def _onnxscript_partial_conv(input, mask, weight, bias, stride, padding, dilation, groups, multi_channel,
                             mask_groups=None, input_masked=False):
    return _lower_partial_conv(_OnnxScriptBuilder(), input, mask, weight, bias, list(stride), list(padding),
                               list(dilation), int(groups), bool(multi_channel), _groups_list(mask_groups),
                               bool(input_masked))


def _onnxscript_masked_cat(inputs, mask, mask_groups=None):
    return _lower_masked_cat(_OnnxScriptBuilder(), list(inputs), mask, _groups_list(mask_groups))


def _onnxscript_mask_update(mask, kernel_size, stride, padding, dilation, multi_channel, mask_groups=None):
    return _lower_mask_update(_OnnxScriptBuilder(), mask, list(kernel_size), list(stride), list(padding),
                              list(dilation), bool(multi_channel), _groups_list(mask_groups))


def custom_translation_table() -> Dict[Callable, Callable]:
    """The ``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: the pconv_cuda ops to ONNX
    Script functions that build standard ONNX operators. Needs onnxscript when the export runs."""
    import pconv_cuda  # noqa: F401  (registers the ops)

    return {
        torch.ops.pconv_cuda.partial_conv2d.default: _onnxscript_partial_conv,
        torch.ops.pconv_cuda.partial_conv3d.default: _onnxscript_partial_conv,
        torch.ops.pconv_cuda.mask_update.default: _onnxscript_mask_update,
        torch.ops.pconv_cuda.masked_cat.default: _onnxscript_masked_cat,
    }


# --- TorchScript exporter ---------------------------------------------------------------------------------------

def _ints(value) -> List[int]:
    from torch.onnx._internal.torchscript_exporter import symbolic_helper

    return [int(v) for v in symbolic_helper._maybe_get_const(value, "is")]


def _optional_ints(value) -> Optional[List[int]]:
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh

    return None if value is None or sh._is_none(value) else _ints(value)


def _torchscript_partial_conv(g, input, mask, weight, bias, stride, padding, dilation, groups, multi_channel,
                              mask_groups=None, input_masked=None):
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh

    return _lower_partial_conv(
        _TorchScriptBuilder(g), input, None if sh._is_none(mask) else mask, weight,
        None if sh._is_none(bias) else bias, _ints(stride), _ints(padding), _ints(dilation),
        int(sh._maybe_get_const(groups, "i")), bool(sh._maybe_get_const(multi_channel, "b")),
        _optional_ints(mask_groups), input_masked is not None and bool(sh._maybe_get_const(input_masked, "b")))


def _torchscript_masked_cat(g, inputs, mask, mask_groups=None):
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh

    return _lower_masked_cat(_TorchScriptBuilder(g), sh._unpack_list(inputs), mask, _optional_ints(mask_groups))


def _torchscript_mask_update(g, mask, kernel_size, stride, padding, dilation, multi_channel, mask_groups=None):
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh

    return _lower_mask_update(_TorchScriptBuilder(g), mask, _ints(kernel_size), _ints(stride), _ints(padding),
                              _ints(dilation), bool(sh._maybe_get_const(multi_channel, "b")),
                              _optional_ints(mask_groups))


def register_torchscript_symbolics(opset_version: int = TORCHSCRIPT_OPSET) -> None:
    """Registers the symbolics of ``pconv_cuda::partial_conv2d``, ``partial_conv3d``, ``mask_update`` and
    ``masked_cat`` for
    ``torch.onnx.export(..., dynamo=False)`` with ``torch.onnx.register_custom_op_symbolic``; they serve
    ``opset_version`` and later. Idempotent (a second registration replaces the first)."""
    for op in ("partial_conv2d", "partial_conv3d"):
        torch.onnx.register_custom_op_symbolic(f"pconv_cuda::{op}", _torchscript_partial_conv, opset_version)
    torch.onnx.register_custom_op_symbolic("pconv_cuda::mask_update", _torchscript_mask_update, opset_version)
    torch.onnx.register_custom_op_symbolic("pconv_cuda::masked_cat", _torchscript_masked_cat, opset_version)


# Registered on import (it needs torch only), so that a plain torch.onnx.export(..., dynamo=False) works too.
register_torchscript_symbolics()


# --- one call for users -----------------------------------------------------------------------------------------

def _flat_tensors(value) -> List[torch.Tensor]:
    leaves, _ = torch.utils._pytree.tree_flatten(value)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def export(model: torch.nn.Module, args: Any, f: Optional[str | os.PathLike] = None, dynamo: bool = True, *,
           dynamic_batch: bool = True, **kwargs):
    """``torch.onnx.export`` with the batch axis dynamic by default and direct op calls translated.

    ``torch.onnx.export`` itself exports every model built on pconv_cuda's layers and functional forms (e.g.
    ``pconv_cuda.inpainting.PConvUNet``) to standard operators; this alias adds two things: axis 0 is dynamic
    without ``dynamic_shapes`` / ``dynamic_axes``, and direct calls of ``torch.ops.pconv_cuda.*`` export too.

    Args:
        model: the module. Call ``model.eval()`` first (BatchNorm, dropout), as for any ONNX export.
        args: example positional inputs, a tuple of tensors (or one tensor). Trailing ``None`` arguments (e.g. the
            mask of ``PartialConv2d`` for ``mask_in=None``) are dropped: the model's default is used.
        f: the ``.onnx`` file to write, or ``None`` (``dynamo=True`` returns the ``torch.onnx.ONNXProgram``,
            whose ``.save(path)`` writes it).
        dynamo: ``True`` for the torch.export-based exporter (direct op calls are translated by
            :func:`custom_translation_table`), ``False`` for the TorchScript one (by the symbolics of
            :func:`register_torchscript_symbolics`, registered here).
        dynamic_batch: make axis 0 dynamic ("batch") for every input whose first dimension equals the first
            input's (other inputs, e.g. a batch-1 mask that broadcasts, keep their size), and for the outputs
            (the TorchScript exporter marks those outputs whose axis 0 equals the batch; the dynamo one infers
            them). torch.export specialises sizes 1: with ``dynamo=True`` and an example batch of 1, the batch
            inputs are repeated to 2 for tracing (their values do not matter, only their shapes).
            Ignored where ``kwargs`` has ``dynamic_shapes`` or ``dynamic_axes``.
        **kwargs: passed on to ``torch.onnx.export`` (``opset_version``, ``input_names``, ``output_names``,
            ``external_data``, ...). A ``custom_translation_table`` given here is merged with pconv_cuda's.

    Returns:
        What ``torch.onnx.export`` returns: the ``ONNXProgram`` with ``dynamo=True``, ``None`` otherwise.

    Needs onnx and onnxscript (``pip install 'pconv_cuda[onnx]'``); onnxruntime runs the result. float32 and
    float16 models run in onnxruntime's CPU provider; float64 ones export, but that provider has no float64 Conv.

    Example::

        import pconv_cuda, pconv_cuda.onnx
        layer = pconv_cuda.PartialConv2d(3, 8, 3, padding=1, return_mask=True).eval()
        pconv_cuda.onnx.export(layer, (torch.randn(2, 3, 32, 32), torch.ones(2, 1, 32, 32)), "pconv.onnx")
    """
    if isinstance(args, torch.Tensor):
        args = (args,)
    args = tuple(args)
    while args and args[-1] is None:
        args = args[:-1]
    if any(a is None for a in args):
        raise ValueError("pconv_cuda.onnx.export: only trailing arguments may be None")
    user_dynamic = "dynamic_shapes" in kwargs or "dynamic_axes" in kwargs
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    batch = tensors[0].shape[0] if tensors and tensors[0].dim() > 0 else None
    is_batch = [isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch for a in args]
    make_dynamic = dynamic_batch and not user_dynamic and batch is not None

    if dynamo:
        table = custom_translation_table()
        table.update(kwargs.pop("custom_translation_table", None) or {})
        if make_dynamic:
            if batch == 1:
                args = tuple(a.expand(2, *a.shape[1:]).contiguous() if dyn else a for a, dyn in zip(args, is_batch))
            dim = torch.export.Dim("batch")
            kwargs["dynamic_shapes"] = tuple({0: dim} if dyn else None for dyn in is_batch)
        kwargs.setdefault("verbose", False)
        with warnings.catch_warnings():
            # Each input's batch axis is the one Dim, which the renaming pass reports once per extra input.
            warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape.*")
            return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)

    register_torchscript_symbolics()
    if make_dynamic:
        input_names = list(kwargs.get("input_names") or [f"input_{i}" for i in range(len(args))])
        output_names = kwargs.get("output_names")
        with torch.no_grad():
            outputs = _flat_tensors(model(*args))
        if output_names is None:
            output_names = [f"output_{i}" for i in range(len(outputs))]
        dynamic_axes = {name: {0: "batch"} for name, dyn in zip(input_names, is_batch) if dyn}
        dynamic_axes.update({name: {0: "batch"} for name, t in zip(output_names, outputs)
                             if t.dim() > 0 and t.shape[0] == batch})
        kwargs.update(input_names=input_names, output_names=list(output_names), dynamic_axes=dynamic_axes)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*legacy TorchScript.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message="The feature will be removed")
        return torch.onnx.export(model, args, f, dynamo=False, **kwargs)
