"""Route selection (pconv_cuda.routes, csrc/common/routes.cpp): the override API and its precedence over the
environment, the CPU auto rule, and the CUDA autotuner, run here through the SIMT emulation (ns pconv_cuda_emu,
device_type "cuda")."""
from __future__ import annotations

import pytest
import torch

import pconv_cuda
from pconv_cuda import routes
from helpers import Sample, conv_args, emu_unavailable, make_inputs

EMU = "pconv_cuda_emu"
ENV = {"cpu": "PCONV_CPU_ROUTE", "cuda": "PCONV_CUDA_ROUTE"}
F64 = dict(rtol=0, atol=1e-12)


def namespaces():
    return ["pconv_cuda"] + ([] if emu_unavailable() else [EMU])


@pytest.fixture(autouse=True)
def clean_routes(monkeypatch):
    """No override and no route variable before a test; every override cleared after it (also on failure)."""
    for variable in ENV.values():
        monkeypatch.delenv(variable, raising=False)
    for ns in namespaces():
        for device_type in ENV:
            routes.set_route("auto", device_type, _ns=ns)
    yield
    for ns in namespaces():
        for device_type in ENV:
            routes.set_route("auto", device_type, _ns=ns)


def cpu_call(s: Sample, channels_last: bool = False, seed: int = 0):
    """The output of one CPU forward (float64) and the route it took."""
    x, m, w, b = make_inputs(s, torch.float64, "cpu", seed=seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        m = m.contiguous(memory_format=torch.channels_last)
    out = torch.ops.pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(s))[0]
    return out, routes.last_route("cpu")


# k3 s1 p1: the output map is the input's. 8x8 = 64 output pixels (gemm), 9x8 = 72 (aten_conv).
SMALL = Sample("8x8", h=8, w=8)
LARGE = Sample("9x8", h=9, w=8)


# --- the override API ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_set_route_and_get_route(device_type):
    assert routes.get_route(device_type) == "auto"
    routes.set_route("gemm", device_type)
    assert routes.get_route(device_type) == "gemm"
    other = "cuda" if device_type == "cpu" else "cpu"
    assert routes.get_route(other) == "auto"  # per device type
    routes.set_route("aten_conv", device_type)
    assert routes.get_route(device_type) == "aten_conv"
    routes.set_route("auto", device_type)  # "auto" clears the override
    assert routes.get_route(device_type) == "auto"


def test_set_route_beats_the_environment_on_cpu(monkeypatch):
    # The environment alone is honoured...
    monkeypatch.setenv("PCONV_CPU_ROUTE", "gemm")
    assert cpu_call(LARGE)[1] == "gemm"  # the auto rule would take aten_conv here
    monkeypatch.setenv("PCONV_CPU_ROUTE", "aten_conv")
    assert cpu_call(SMALL)[1] == "aten_conv"  # ... and here gemm
    # ... set_route beats it ...
    routes.set_route("gemm", "cpu")
    assert cpu_call(SMALL)[1] == "gemm"
    assert cpu_call(LARGE)[1] == "gemm"
    # ... even a variable that would be an error: the override means the variable is not read.
    monkeypatch.setenv("PCONV_CPU_ROUTE", "bogus")
    assert cpu_call(LARGE)[1] == "gemm"
    # "auto" clears the override: the variable rules again (and a bad one is an error naming the variable).
    routes.set_route("auto", "cpu")
    with pytest.raises(RuntimeError, match=r"PCONV_CPU_ROUTE must be 'auto', 'aten_conv' or 'gemm'.*bogus"):
        cpu_call(SMALL)
    monkeypatch.setenv("PCONV_CPU_ROUTE", "gemm")
    assert cpu_call(LARGE)[1] == "gemm"
    monkeypatch.delenv("PCONV_CPU_ROUTE")
    assert cpu_call(LARGE)[1] == "aten_conv"


def test_set_route_beats_the_environment_on_cuda(monkeypatch):
    if emu_unavailable():
        pytest.skip(f"the CUDA flow runs here only under the emulation: {emu_unavailable()}")
    s = SMALL
    x, m, w, b = make_inputs(s, torch.float64)
    ops = torch.ops.pconv_cuda_emu

    def call():
        ops.partial_conv2d(x, m, w, b, *conv_args(s))
        return routes.last_route("cuda", _ns=EMU)

    assert call() == "aten_conv"  # auto without cudnn.benchmark: aten_conv
    monkeypatch.setenv("PCONV_CUDA_ROUTE", "gemm")
    assert call() == "gemm"
    routes.set_route("aten_conv", "cuda", _ns=EMU)
    assert call() == "aten_conv"
    with routes.use_route("gemm", "cuda", _ns=EMU):
        monkeypatch.setenv("PCONV_CUDA_ROUTE", "aten_conv")
        assert call() == "gemm"
    assert call() == "aten_conv"
    routes.set_route("auto", "cuda", _ns=EMU)
    assert call() == "aten_conv"  # the variable again
    monkeypatch.setenv("PCONV_CUDA_ROUTE", "gemm")
    assert call() == "gemm"


def test_use_route_restores_the_previous_setting():
    routes.set_route("aten_conv", "cpu")
    with routes.use_route("gemm", "cpu"):
        assert routes.get_route("cpu") == "gemm"
        assert cpu_call(LARGE)[1] == "gemm"
        with routes.use_route("auto", "cpu"):
            assert routes.get_route("cpu") == "auto"
            assert cpu_call(LARGE)[1] == "aten_conv"
            assert cpu_call(SMALL)[1] == "aten_conv"  # the CPU auto rule
        assert routes.get_route("cpu") == "gemm"
    assert routes.get_route("cpu") == "aten_conv"
    assert cpu_call(SMALL)[1] == "aten_conv"
    routes.set_route("auto", "cpu")
    with routes.use_route("aten_conv", "cpu"):
        pass
    assert routes.get_route("cpu") == "auto"


def test_use_route_restores_on_exception():
    routes.set_route("gemm", "cuda")
    with pytest.raises(ValueError, match="boom"):
        with routes.use_route("aten_conv", "cuda"):
            assert routes.get_route("cuda") == "aten_conv"
            raise ValueError("boom")
    assert routes.get_route("cuda") == "gemm"
    # A bad name fails on entry and changes nothing.
    with pytest.raises(RuntimeError, match="aten_conv"):
        with routes.use_route("fastest", "cuda"):
            pytest.fail("the body must not run")
    assert routes.get_route("cuda") == "gemm"


@pytest.mark.parametrize("bad", ["fastest", "GEMM", "cudnn", ""])
def test_bad_route_name_names_the_allowed_routes(bad):
    with pytest.raises(RuntimeError) as info:
        routes.set_route(bad, "cpu")
    message = str(info.value)
    for name in ("'auto'", "'aten_conv'", "'gemm'"):
        assert name in message
    assert f"'{bad}'" in message
    assert routes.get_route("cpu") == "auto"  # unchanged


@pytest.mark.parametrize("bad", ["tpu", "CUDA", "cuda:0", ""])
def test_bad_device_type(bad):
    with pytest.raises(RuntimeError, match=r"device_type must be 'cpu' or 'cuda'"):
        routes.set_route("gemm", bad)
    with pytest.raises(RuntimeError, match=r"device_type must be 'cpu' or 'cuda'"):
        routes.get_route(bad)
    with pytest.raises(RuntimeError, match=r"device_type must be 'cpu' or 'cuda'"):
        with routes.use_route("gemm", bad):
            pass
    assert routes.get_route("cpu") == routes.get_route("cuda") == "auto"


@pytest.mark.parametrize("old,new", [("vendor", "aten_conv"), ("one_pass", "gemm")])
def test_old_names_are_accepted(old, new, monkeypatch):
    routes.set_route(old, "cpu")
    for s in (SMALL, LARGE):
        assert cpu_call(s)[1] == new
    routes.set_route("auto", "cpu")
    monkeypatch.setenv("PCONV_CPU_ROUTE", old)
    for s in (SMALL, LARGE):
        assert cpu_call(s)[1] == new
    routes.set_route(old, "cuda")  # accepted for both device types
    routes.set_route("auto", "cuda")


# --- the CPU auto rule -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("s,want,other", [(SMALL, "aten_conv", "gemm"), (LARGE, "aten_conv", "gemm"),
                                          (Sample("s2_64px", h=16, w=15, stride=(2, 2)), "aten_conv", "gemm")],
                         ids=str)
def test_cpu_auto_rule_is_aten_conv(s, want, other):
    out, route = cpu_call(s)
    assert route == want
    with routes.use_route(other, "cpu"):
        out_other, route_other = cpu_call(s)
    assert route_other == other
    torch.testing.assert_close(out, out_other, **F64)


def test_cpu_channels_last_never_takes_gemm():
    s = SMALL
    out_nchw, _ = cpu_call(s)
    out, route = cpu_call(s, channels_last=True)
    assert route == "aten_conv"
    with routes.use_route("gemm", "cpu"):
        forced, route = cpu_call(s, channels_last=True)
    assert route == "aten_conv"  # a forced gemm falls back
    assert forced.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(forced, out, **F64)
    torch.testing.assert_close(forced, out_nchw, **F64)


# --- the CUDA autotuner, through the emulation -----------------------------------------------------------------

@pytest.fixture
def tuner(monkeypatch):
    """The emulated CUDA flow with cudnn.benchmark on, an empty cache and no forced route; the timer, the cache
    and the global flags are restored afterwards, whatever happens."""
    if emu_unavailable():
        pytest.skip(emu_unavailable())
    ops = torch.ops.pconv_cuda_emu
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32
    routes.clear_tuned_routes(_ns=EMU)
    torch.backends.cudnn.benchmark = True
    try:
        yield ops
    finally:
        ops._set_route_timer("")
        routes.clear_tuned_routes(_ns=EMU)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved


def emu_call(s: Sample, dtype=torch.float64, channels_last: bool = False):
    x, m, w, b = make_inputs(s, dtype, "cpu")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out = torch.ops.pconv_cuda_emu.partial_conv2d(x, m, w, b, *conv_args(s))[0]
    return out, routes.last_route("cuda", _ns=EMU)


def forced_emu_call(route: str, s: Sample, dtype=torch.float64, channels_last: bool = False):
    with routes.use_route(route, "cuda", _ns=EMU):
        out, ran = emu_call(s, dtype, channels_last)
    assert ran == (route if not channels_last else "aten_conv")
    return out


def test_autotuner_picks_the_faster_route_and_caches_it(tuner):
    s = Sample("tune", h=12, w=11)
    tuner._set_route_timer("aten_conv=2,gemm=1")
    out, route = emu_call(s)
    assert route == "gemm"
    entries = routes.tuned_routes(_ns=EMU)
    assert len(entries) == 1 and entries[0].endswith("-> gemm"), entries
    torch.testing.assert_close(out, forced_emu_call("gemm", s), **F64)

    # Cached: new timings are not consulted for a shape already tuned.
    tuner._set_route_timer("aten_conv=1,gemm=2")
    out2, route = emu_call(s)
    assert route == "gemm"
    assert routes.tuned_routes(_ns=EMU) == entries
    torch.testing.assert_close(out2, out, **F64)

    # Cleared: timed again, and now aten_conv is faster.
    routes.clear_tuned_routes(_ns=EMU)
    assert routes.tuned_routes(_ns=EMU) == []
    out3, route = emu_call(s)
    assert route == "aten_conv"
    entries = routes.tuned_routes(_ns=EMU)
    assert len(entries) == 1 and entries[0].endswith("-> aten_conv"), entries
    torch.testing.assert_close(out3, forced_emu_call("aten_conv", s), **F64)

    # A different shape is a second entry.
    tuner._set_route_timer("aten_conv=2,gemm=1")
    s2 = Sample("tune2", h=10, w=11)
    out4, route = emu_call(s2)
    assert route == "gemm"
    entries2 = routes.tuned_routes(_ns=EMU)
    assert len(entries2) == 2 and entries[0] in entries2
    assert sorted(e.split(" -> ")[1] for e in entries2) == ["aten_conv", "gemm"]
    torch.testing.assert_close(out4, forced_emu_call("gemm", s2), **F64)
    # ... and the first shape keeps its cached aten_conv.
    assert emu_call(s)[1] == "aten_conv"


def test_old_names_in_the_timer_spec(tuner):
    tuner._set_route_timer("vendor=1,one_pass=3")
    assert emu_call(Sample("t", h=7, w=7))[1] == "aten_conv"


def test_no_tuning_without_cudnn_benchmark(tuner):
    torch.backends.cudnn.benchmark = False
    tuner._set_route_timer("aten_conv=2,gemm=1")
    s = Sample("nobench", h=12, w=11)
    out, route = emu_call(s)
    assert route == "aten_conv"
    assert routes.tuned_routes(_ns=EMU) == []
    torch.testing.assert_close(out, forced_emu_call("aten_conv", s), **F64)


def test_no_tuning_for_a_forced_route(tuner, monkeypatch):
    tuner._set_route_timer("aten_conv=2,gemm=1")
    s = Sample("forced", h=12, w=11)
    with routes.use_route("aten_conv", "cuda", _ns=EMU):
        assert emu_call(s)[1] == "aten_conv"
    monkeypatch.setenv("PCONV_CUDA_ROUTE", "aten_conv")
    assert emu_call(s)[1] == "aten_conv"
    assert routes.tuned_routes(_ns=EMU) == []


def test_strict_fp32_does_not_compete_with_tf32(tuner, monkeypatch):
    tuner._set_route_timer("aten_conv=2,gemm=1")
    s = Sample("tf32", h=12, w=11)
    torch.backends.cudnn.allow_tf32 = True
    # Below sm_80 the gemm route has no TF32 fragments: strict FP32 would race TF32 cuDNN, so nothing tunes.
    monkeypatch.setenv("PCONV_EMU_COMPUTE_CAPABILITY", "75")
    out, route = emu_call(s, torch.float32)
    assert route == "aten_conv"
    assert routes.tuned_routes(_ns=EMU) == []
    # From sm_80 the gemm route is TF32 too (the tensor-core kernel): both sides compute alike, so they tune.
    monkeypatch.setenv("PCONV_EMU_COMPUTE_CAPABILITY", "90")
    out_tf32, route = emu_call(s, torch.float32)
    assert route == "gemm"
    entries = routes.tuned_routes(_ns=EMU)
    assert len(entries) == 1 and "tf32=1" in entries[0] and entries[0].endswith("-> gemm"), entries
    torch.testing.assert_close(out_tf32, forced_emu_call("gemm", s, torch.float32), rtol=0, atol=0)
    # float64 is not subject to TF32: it tunes.
    out64, route = emu_call(s, torch.float64)
    assert route == "gemm"
    entries = routes.tuned_routes(_ns=EMU)
    assert len(entries) == 2 and any("Double" in e and e.endswith("-> gemm") for e in entries), entries
    torch.testing.assert_close(out64, forced_emu_call("gemm", s), **F64)
    # float32 with TF32 off (strict on both routes) tunes apart from the TF32 entry.
    torch.backends.cudnn.allow_tf32 = False
    out32, route = emu_call(s, torch.float32)
    assert route == "gemm"
    assert len(routes.tuned_routes(_ns=EMU)) == 3
    torch.testing.assert_close(out32, forced_emu_call("gemm", s, torch.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_older_gpus_run_the_fma_kernel(dtype, monkeypatch):
    # On an sm_75 GPU bfloat16 has no tensor-core fragments (fp16 does): the gemm route must run the FMA kernel
    # there, with the same results within the dtype's rounding (the two kernels only add in another order).
    if emu_unavailable():
        pytest.skip(emu_unavailable())
    s = Sample("older_gpu", c_out=70, h=9, w=8)
    monkeypatch.setenv("PCONV_EMU_COMPUTE_CAPABILITY", "75")
    old = forced_emu_call("gemm", s, dtype)
    monkeypatch.setenv("PCONV_EMU_COMPUTE_CAPABILITY", "90")
    new = forced_emu_call("gemm", s, dtype)
    torch.testing.assert_close(old.float(), new.float(), rtol=2 * 2.0**-8, atol=2 * 2.0**-8)


def test_channels_last_is_not_tuned(tuner):
    tuner._set_route_timer("aten_conv=2,gemm=1")
    s = Sample("cl", h=12, w=11)
    out, route = emu_call(s, channels_last=True)
    assert route == "aten_conv"
    assert routes.tuned_routes(_ns=EMU) == []
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, forced_emu_call("aten_conv", s), **F64)
