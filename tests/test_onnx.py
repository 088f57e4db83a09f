"""ONNX export with torch.onnx.export itself (both exporters, no wrapper, after `import pconv_cuda`), run in
onnxruntime at another batch size than the export's and compared with PyTorch; and pconv_cuda.onnx.export, the alias
that also translates direct calls of the torch.ops.pconv_cuda ops.

Tolerances: the graphs compute the same float32 maths as the kernels, but the convolution is onnxruntime's (MLAS)
and not ATen's, so the summation order differs: ~1e-7 relative per output, a few ulp of the largest partial sum.
rtol=1e-5 / atol=1e-4 leaves a margin for outputs of order 1-10 (renormalised by ratios up to kh*kw). The mask
path sums 0/1 values in float32, which is exact, so the updated masks must be equal (atol=0).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("onnx", reason="ONNX export tests need onnx (pip install 'pconv_cuda[onnx]')")
pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (pip install 'pconv_cuda[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the exported models run in onnxruntime (pip install "
                                                "'pconv_cuda[onnx]')")

import onnx  # noqa: E402

import pconv_cuda  # noqa: E402
import pconv_cuda.onnx as pconv_onnx  # noqa: E402

EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]
RTOL, ATOL = 1e-5, 1e-4
STANDARD_OPS = {"Conv", "Mul", "Div", "Reciprocal", "Add", "Where", "Equal", "Clip", "Cast", "Constant", "Shape",
                "Slice", "Concat", "ConstantOfShape", "Reshape", "Expand", "Gather", "Unsqueeze", "Relu", "LeakyRelu",
                "BatchNormalization", "Resize", "Identity", "Sqrt", "Sub", "Squeeze", "Split"}
# torch.export names one Dim per axis; inputs sharing the batch Dim make its renaming pass warn once per extra input.
pytestmark = pytest.mark.filterwarnings("ignore:.*will not be used, since it shares the same shape.*:UserWarning")


def _check_and_load(path):
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    # Standard operators of the default domain only: no pconv_cuda node left for the runtime to miss.
    assert {n.domain for n in proto.graph.node} <= {""}, {n.domain for n in proto.graph.node}
    assert {n.op_type for n in proto.graph.node} <= STANDARD_OPS, {n.op_type for n in proto.graph.node}
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _export(model, args, path, dynamo, batch_args=None):
    """torch.onnx.export itself, no pconv_cuda wrapper, with axis 0 of the inputs ``batch_args`` (indices into
    args; default: all) and of the outputs dynamic, the way torch documents it for each exporter: ``dynamic_shapes``
    with the default exporter, ``dynamic_axes`` with the TorchScript one."""
    batch_args = range(len(args)) if batch_args is None else batch_args
    if dynamo:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} if i in batch_args else None for i in range(len(args)))
        torch.onnx.export(model, args, str(path), dynamic_shapes=shapes, external_data=False, verbose=False)
    else:
        with torch.no_grad():
            n_out = len(_as_list(model(*args)))
        inputs, outputs = [f"input_{i}" for i in range(len(args))], [f"output_{i}" for i in range(n_out)]
        axes = {name: {0: "batch"} for i, name in enumerate(inputs) if i in batch_args}
        axes.update({name: {0: "batch"} for name in outputs})
        with pytest.warns(DeprecationWarning):  # torch's notice that this exporter is the legacy one
            torch.onnx.export(model, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                              dynamic_axes=axes)
    return _check_and_load(path)


def _run(session, inputs):
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(inputs)
    return [torch.from_numpy(o) for o in session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})]


def _as_list(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _matches_layer(session, layer, inputs, batches):
    """The exported model against the layer on inputs(n, 10 + n) for each batch size n: same outputs, finite (holes
    are exact holes), the updated mask bitwise."""
    for n in batches:
        args = inputs(n, 10 + n)
        with torch.no_grad():
            expected = _as_list(layer(*args))
        got = _run(session, args)
        assert len(got) == len(expected)
        assert got[0].shape == expected[0].shape
        torch.testing.assert_close(got[0], expected[0], rtol=RTOL, atol=ATOL)
        assert torch.isfinite(got[0]).all()
        if len(expected) > 1:
            torch.testing.assert_close(got[1], expected[1].contiguous(), rtol=0, atol=0)


def _binary_mask(n, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(n, c, h, w, generator=g) > 0.4).float()
    mask[0, :, :4, :4] = 0  # a whole window of hole: S = 0 there
    return mask


# name: (PartialConv2d kwargs, mask kind): mask kind "single" | "multi" | "none" | "batch1" | "bool"
CASES = {
    "single_mask": (dict(), "single"),
    "multi_channel_mask": (dict(multi_channel=True), "multi"),
    "mask_none": (dict(), "none"),
    "mask_none_multi_channel": (dict(multi_channel=True, kernel_size=(5, 3), padding=(2, 1)), "none"),
    "stride2": (dict(kernel_size=4, stride=2, padding=1), "single"),
    "no_bias_groups_dilation": (dict(bias=False, groups=2, dilation=2, padding=2), "single"),
    "mask_batch1": (dict(), "batch1"),
    "bool_mask": (dict(stride=(2, 1)), "bool"),
    "no_return_mask": (dict(return_mask=False), "single"),
}


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("case", list(CASES))
def test_partial_conv2d_module(case, dynamo, tmp_path):
    kwargs, mask_kind = CASES[case]
    kwargs = {"kernel_size": 3, "padding": 1, "return_mask": True, **kwargs}
    torch.manual_seed(0)
    c_in = 4
    layer = pconv_cuda.PartialConv2d(c_in, 6, **kwargs).eval()

    def inputs(n, seed):
        x = torch.randn(n, c_in, 12, 11, generator=torch.Generator().manual_seed(seed))
        if mask_kind == "none":
            return (x,)
        mask = _binary_mask(1 if mask_kind == "batch1" else n, c_in if mask_kind == "multi" else 1, 12, 11, seed)
        x = x.masked_fill(mask == 0, float("nan"))  # holes are exact holes: NaN there never reaches the output
        return (x, mask.bool() if mask_kind == "bool" else mask)

    # A batch-1 mask broadcasts: only the input's batch axis is dynamic then.
    session = _export(layer, inputs(2, 1), tmp_path / "layer.onnx", dynamo,
                      batch_args=(0,) if mask_kind == "batch1" else None)
    _matches_layer(session, layer, inputs, (3, 1, 2))  # other batches, and the export's


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
def test_partial_conv1d_module(multi_channel, dynamo, tmp_path):
    # The 1-D layer is the 2-D op on a height-1 view: the export carries the unsqueeze/squeeze around the same graph.
    torch.manual_seed(0)
    layer = pconv_cuda.PartialConv1d(4, 6, 5, padding=2, multi_channel=multi_channel, return_mask=True).eval()

    def inputs(n, seed):
        x = torch.randn(n, 4, 23, generator=torch.Generator().manual_seed(seed))
        mask = _binary_mask(n, 4 if multi_channel else 1, 1, 23, seed)[:, :, 0]
        return (x.masked_fill(mask == 0, float("nan")), mask)

    session = _export(layer, inputs(2, 1), tmp_path / "layer1d.onnx", dynamo)
    _matches_layer(session, layer, inputs, (3,))


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("mask_kind", ["single", "multi", "none"])
def test_partial_conv3d_module(mask_kind, dynamo, tmp_path):
    # The 3-D layer lowers to the same graph with 3-D Convs (kernel, pads, strides of three, a 5-D ones kernel).
    torch.manual_seed(0)
    multi = mask_kind == "multi"
    layer = pconv_cuda.PartialConv3d(3, 4, (3, 5, 5), stride=(1, 2, 2), padding=(1, 2, 2), multi_channel=multi,
                                     return_mask=True).eval()

    def inputs(n, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 3, 4, 11, 10, generator=g)
        if mask_kind == "none":
            return (x,)
        mask = (torch.rand(n, 3 if multi else 1, 4, 11, 10, generator=g) > 0.4).float()
        mask[0, :, :, :5, :5] = 0  # whole windows of hole: S = 0 there
        return (x.masked_fill(mask == 0, float("nan")), mask)

    session = _export(layer, inputs(2, 1), tmp_path / "layer3d.onnx", dynamo)
    _matches_layer(session, layer, inputs, (3,))


class _Functional(torch.nn.Module):
    """The functional forms called directly: 2-D with unequal stride and dilation, groups, no bias, 'same' padding
    in 1-D, and the 3-D form with mask=None."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w2 = torch.nn.Parameter(torch.randn(6, 2, 3, 3, generator=g))
        self.w1 = torch.nn.Parameter(torch.randn(3, 6, 5, generator=g))
        self.w3 = torch.nn.Parameter(torch.randn(2, 6, 3, 3, 3, generator=g))
        self.b = torch.nn.Parameter(torch.randn(3, generator=g))

    def forward(self, x, mask):
        y, m = pconv_cuda.partial_conv2d(x, mask, self.w2, None, stride=(2, 1), padding=2, dilation=(1, 2), groups=2)
        y1, m1 = pconv_cuda.partial_conv1d(y.flatten(2), m.flatten(2), self.w1, self.b, padding="same")
        y3, m3 = pconv_cuda.partial_conv3d(y.unsqueeze(2).expand(-1, -1, 3, -1, -1), None, self.w3, padding=1)
        return y1, m1, y3, m3


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_functional_forms(dynamo, tmp_path):
    model = _Functional().eval()

    def inputs(n, seed):
        x = torch.randn(n, 4, 10, 9, generator=torch.Generator().manual_seed(seed))
        mask = _binary_mask(n, 1, 10, 9, seed)
        return (x.masked_fill(mask == 0, float("nan")), mask)

    session = _export(model, inputs(2, 1), tmp_path / "functional.onnx", dynamo)
    args = inputs(3, 2)
    with torch.no_grad():
        expected = model(*args)
    got = _run(session, args)
    for name, e, o in zip(("y1", "m1", "y3", "m3"), expected, got):
        exact = name.startswith("m")  # updated masks: sums of 0/1 values, exact
        torch.testing.assert_close(o, e.contiguous(), rtol=0 if exact else RTOL, atol=0 if exact else ATOL, msg=name)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_float16(dynamo, tmp_path):
    # The graph renormalises in float32 (as the kernels do) and casts back: the output differs from PyTorch's by
    # the fp16 rounding of the convolution (eps 1e-3; outputs of order 1-5 here), hence 1e-2 / 1e-2.
    torch.manual_seed(0)
    layer = pconv_cuda.PartialConv2d(3, 4, 3, padding=1, return_mask=True).half().eval()
    x, mask = torch.randn(2, 3, 10, 10).half(), _binary_mask(2, 1, 10, 10, seed=7).half()
    session = _export(layer, (x, mask), tmp_path / "half.onnx", dynamo)
    x, mask = torch.randn(3, 3, 10, 10).half(), _binary_mask(3, 1, 10, 10, seed=8).half()
    got = _run(session, (x, mask))
    with torch.no_grad():
        expected = layer(x, mask)
    assert got[0].dtype == got[1].dtype == torch.float16
    torch.testing.assert_close(got[0], expected[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


class _RawOp(torch.nn.Module):
    """All four outputs of the op itself: (output, updated_mask, ratio, masked_input)."""

    def __init__(self, multi_channel: bool, with_mask: bool = True):
        super().__init__()
        self.conv = pconv_cuda.PartialConv2d(3, 5, 3, stride=2, padding=1, multi_channel=multi_channel)
        self.with_mask = with_mask

    def forward(self, x, mask=None):
        c = self.conv
        return torch.ops.pconv_cuda.partial_conv2d(x, mask, c.weight, c.bias, c.stride, c.padding, c.dilation,
                                                   c.groups, c.multi_channel)


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("multi_channel", [False, True], ids=["single", "multi"])
def test_raw_op_all_outputs(multi_channel, dynamo, tmp_path):
    # A direct call of the op is translated by pconv_cuda.onnx.export (its custom_translation_table, its
    # TorchScript symbolics), which also makes the batch axis dynamic by default.
    torch.manual_seed(0)
    model = _RawOp(multi_channel).eval()
    x = torch.randn(2, 3, 10, 10)
    mask = _binary_mask(2, 3 if multi_channel else 1, 10, 10, seed=3)
    path = tmp_path / "op.onnx"
    pconv_onnx.export(model, (x, mask), str(path), dynamo=dynamo, **({"external_data": False} if dynamo else {}))
    session = _check_and_load(path)
    x3, mask3 = torch.randn(3, 3, 10, 10), _binary_mask(3, 3 if multi_channel else 1, 10, 10, seed=4)
    with torch.no_grad():
        expected = model(x3, mask3)
    got = _run(session, (x3, mask3))
    torch.testing.assert_close(got[0], expected[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)  # updated mask
    torch.testing.assert_close(got[2], expected[2], rtol=1e-6, atol=0)  # ratio (float32 division)
    torch.testing.assert_close(got[3], expected[3], rtol=0, atol=0)  # masked input X*M


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_mask_update(dynamo, tmp_path):
    class MaskUpdate(torch.nn.Module):
        def forward(self, mask):
            return pconv_cuda.mask_update(mask, 3, stride=2, padding=1, multi_channel=True)

    mask = _binary_mask(2, 3, 9, 9, seed=5)
    session = _export(MaskUpdate().eval(), (mask,), tmp_path / "mask.onnx", dynamo)
    mask3 = _binary_mask(3, 3, 9, 9, seed=6)
    expected = MaskUpdate()(mask3)
    got = _run(session, (mask3,))
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the model's input checks read shapes
@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_pconv_unet(dynamo, tmp_path):
    pytest.importorskip("PIL", reason="pconv_cuda.inpainting needs the 'inpainting' extra")
    from pconv_cuda.inpainting import PConvUNet

    torch.manual_seed(0)
    model = PConvUNet(layer_size=4, in_channels=3, base_channels=8).eval()
    # Non-trivial BatchNorm statistics, so that the exported BN is checked too.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 2.0)

    def inputs(n, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, 3, 64, 64, generator=g), _binary_mask(n, 1, 64, 64, seed)

    session = _export(model, inputs(2, 0), tmp_path / "unet.onnx", dynamo)
    args = inputs(3, 1)
    with torch.no_grad():
        expected = model(*args)
    got = _run(session, args)
    # 8 partial convs deep, outputs up to ~15: the differences stay below 1e-5 (measured ~7e-6).
    torch.testing.assert_close(got[0], expected[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(got[1], expected[1].contiguous(), rtol=0, atol=0)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_alias_makes_the_batch_dynamic(dynamo, tmp_path):
    # pconv_cuda.onnx.export marks axis 0 dynamic itself, from an example of batch 1 too.
    layer = pconv_cuda.PartialConv2d(2, 3, 3, padding=1, return_mask=True).eval()

    def inputs(n, seed):
        return torch.randn(n, 2, 9, 8, generator=torch.Generator().manual_seed(seed)), _binary_mask(n, 1, 9, 8, seed)

    path = tmp_path / "alias.onnx"
    pconv_onnx.export(layer, inputs(1, 0), str(path), dynamo=dynamo, **({"external_data": False} if dynamo else {}))
    _matches_layer(_check_and_load(path), layer, inputs, (3,))


_AFTER_IMPORT = """
import sys, torch, pconv_cuda
assert "pconv_cuda.onnx" not in sys.modules and "onnx" not in sys.modules and "onnxscript" not in sys.modules
layer = pconv_cuda.PartialConv2d(2, 3, 3, padding=1, return_mask=True).eval()
x, m = torch.randn(2, 2, 8, 8), (torch.rand(2, 1, 8, 8) > 0.4).float()
torch.onnx.export(layer, (x, m), sys.argv[1], dynamo=sys.argv[2] == "dynamo", **({"verbose": False} if sys.argv[2] ==
                  "dynamo" else {}))
import onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
shape = session.get_inputs()[0].shape
assert shape == [2, 2, 8, 8], shape  # torch's default: every axis as in the example
got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), (x, m))})
with torch.no_grad():
    expected = layer(x, m)
torch.testing.assert_close(torch.from_numpy(got[0]), expected[0], rtol=1e-5, atol=1e-4)
torch.testing.assert_close(torch.from_numpy(got[1]), expected[1], rtol=0, atol=0)
"""


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_after_import_pconv_cuda_alone(exporter, tmp_path):
    # A fresh interpreter in which nothing but pconv_cuda was imported: torch.onnx.export with no extra argument.
    # Without dynamic_shapes / dynamic_axes torch's exporters keep every size of the example, batch included.
    root = os.path.dirname(os.path.dirname(pconv_cuda.__file__))  # the package this test process imported
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", _AFTER_IMPORT, str(tmp_path / "plain.onnx"), exporter], check=True,
                   cwd=tmp_path, env=env)


def test_lowering_as_torch_ops_matches_the_op():
    # What the functional forms run under torch.onnx.export, computed eagerly: the four outputs of the op, in its
    # dtypes and shapes (float32: the convolution is ATen's in both, ~1e-7 relative; float16: 1e-2, fp16 rounding).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 9, 8, generator=g)
    single = (torch.rand(2, 1, 9, 8, generator=g) > 0.4).float()
    multi = torch.rand(1, 4, 9, 8, generator=g) > 0.4
    w2, w4, b = torch.randn(6, 2, 3, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g), torch.randn(6)
    cases = [
        (x, single, w2, b, (1, 1), (1, 1), (1, 1), 2, False),
        (x, None, w2, b, (2, 1), (1, 1), (1, 1), 2, False),
        (x, None, w4, None, (1, 2), (2, 1), (1, 1), 1, True),
        (x, multi, w4, None, (2, 1), (2, 2), (2, 2), 1, True),
        (x.half(), single.half(), w2.half(), b.half(), (1, 1), (1, 1), (1, 1), 2, False),
        (torch.randn(2, 3, 4, 6, 6, generator=g), (torch.rand(2, 1, 4, 6, 6, generator=g) > 0.5).float(),
         torch.randn(4, 3, 3, 3, 3, generator=g), torch.randn(4), (1, 1, 1), (1, 1, 1), (1, 1, 1), 1, False),
    ]
    for args in cases:
        op = torch.ops.pconv_cuda.partial_conv3d if args[2].dim() == 5 else torch.ops.pconv_cuda.partial_conv2d
        expected, got = op(*args), pconv_onnx.partial_conv_as_torch_ops(*args)
        tol = 1e-2 if args[0].dtype == torch.float16 else 1e-5
        for name, e, o in zip(("output", "updated_mask", "ratio", "masked_input"), expected, got):
            assert (o.dtype, o.shape) == (e.dtype, e.shape), name
            torch.testing.assert_close(o, e, rtol=0 if name == "updated_mask" else tol,
                                       atol=0 if name == "updated_mask" else tol, msg=name)
    for mask in (single, multi):
        args = (mask, (3, 3), (2, 1), (1, 1), (1, 1), mask.shape[1] > 1)
        for e, o in zip(torch.ops.pconv_cuda.mask_update(*args), pconv_onnx.mask_update_as_torch_ops(*args)):
            assert o.dtype == e.dtype
            torch.testing.assert_close(o, e, rtol=1e-6, atol=0)


def test_import_does_not_need_onnx(tmp_path):
    code = ("import sys; import pconv_cuda, pconv_cuda.onnx; "
            "bad = [m for m in ('onnx', 'onnxscript', 'onnxruntime', 'onnx_ir') if m in sys.modules]; "
            "assert not bad, bad")
    root = os.path.dirname(os.path.dirname(pconv_cuda.__file__))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)
