"""benchmarks/gpu_model.py: the GPU forward-time ESTIMATE (a bytes/FLOPs/launches model). Pure Python, no torch."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_model.py")
_spec = importlib.util.spec_from_file_location("pconv_gpu_model", _PATH)
gm = importlib.util.module_from_spec(_spec)
sys.modules["pconv_gpu_model"] = gm  # dataclasses look their module up there
_spec.loader.exec_module(gm)

CASES = [(g, d, b, m) for g in gm.GPUS for d in ("fp32", "bf16") for b in (1, 8) for m in (False, True)]


def test_unet_layers():
    layers = gm.unet_layers()
    assert [L.name for L in layers] == [f"enc{i}" for i in range(1, 8)] + [f"dec{i}" for i in range(7, 0, -1)]
    enc1, dec7, dec1 = layers[0], layers[7], layers[-1]
    assert (enc1.c_in, enc1.c_out, enc1.k, enc1.stride, enc1.size, enc1.ho) == (3, 64, 7, 2, 256, 128)
    assert (dec7.c_in, dec7.c_out, dec7.k, dec7.size) == (1024, 512, 3, 4)
    assert (dec1.c_in, dec1.c_out, dec1.k, dec1.stride, dec1.size, dec1.ho) == (67, 3, 3, 1, 256, 256)


@pytest.mark.parametrize("key", sorted(gm.REVIEW))
def test_calibration_against_review(key):
    """Each review figure is matched within TOL, unless the model declares it unmatched, and then it really is."""
    rows = {(b, impl): (est, ref) for b, impl, est, ref, _, _ in gm.calibration()}
    est, ref = rows[key]
    assert ref == gm.REVIEW[key]
    if key in gm.CALIBRATION_MISSES:
        assert abs(est / ref - 1) > gm.TOL  # a declared miss that the model now meets must be undeclared
    else:
        assert abs(est / ref - 1) <= gm.TOL, (key, est, ref)


def test_misses_are_reported():
    assert len(gm.CALIBRATION_MISSES) <= 1  # more than one unmatched figure: revisit the constants
    text = "\n".join(gm.calibration_lines())
    assert "NOT MATCHED" in text and "**NO**" in text


@pytest.mark.parametrize("gpu,dtype,batch,multi", CASES)
def test_invariants(gpu, dtype, batch, multi):
    for L in gm.unet_layers():
        t = {i: gm.layer_estimate(L, i, gpu, dtype, batch, multi)["us"] for i in gm.IMPLS}
        for impl in ("nvidia", "peer", "pconv_old", "pconv_new"):
            assert t["plain"] <= t[impl], (L.name, impl, t)
        assert t["pconv_new"] <= t["nvidia"], (L.name, t)
    total = gm.unet_forward_estimate(gpu, dtype, batch, multi)
    assert set(total) == set(gm.IMPLS) and all(v > 0 for v in total.values())


def test_pconv_new_bytes_by_hand_single_fp32():
    enc1 = gm.unet_layers()[0]
    X, M, P, Y, W = 3 * 256 * 256, 256 * 256, 128 * 128, 64 * 128 * 128, 64 * 3 * 7 * 7
    mask_pass = (X + M) * 4 + X * 4 + M * 4  # read X and M, write X*M and the fp32 mask plane
    ratio = M * 4 + P * 4 + P * 4       # read the mask plane, write ratio (fp32) and U (fp32)
    conv = (X + W + Y) * 4              # cuDNN: input, weight, output
    epilogue = 2 * Y * 4 + P * 4 + P * 4  # Y in place, ratio and U read
    est = gm.layer_estimate(enc1, "pconv_new", "H100", "fp32", 1, False)
    assert est["bytes"] == mask_pass + ratio + conv + epilogue == 16_028_416
    assert est["launches"] == 4 and est["ops"] == 1
    assert gm.layer_estimate(enc1, "plain", "H100", "fp32", 1, False)["bytes"] == conv


def test_pconv_new_bytes_by_hand_multi_bf16():
    enc1 = gm.unet_layers()[0]
    X, plane, P, Y, W = 3 * 256 * 256, 256 * 256, 128 * 128, 64 * 128 * 128, 64 * 3 * 7 * 7
    mask_pass = 3 * X * 2 + plane * 4   # read X and M (C_in channels), write X*M; write the fp32 summed plane
    ratio = plane * 4 + P * 4 + P * 2   # read the plane, write ratio (fp32) and U (bf16)
    conv = (X + W + Y) * 2
    epilogue = 2 * Y * 2 + P * 4 + P * 2
    assert gm.layer_estimate(enc1, "pconv_new", "H100", "bf16", 1, True)["bytes"] == mask_pass + ratio + conv + epilogue


def test_old_route_rule():
    layers = {L.name: L for L in gm.unet_layers()}
    assert gm.onepass(layers["enc1"], "fp32") and gm.onepass(layers["dec1"], "fp32")
    assert not gm.onepass(layers["dec2"], "fp32")  # C_in*k*k = 1728 > 1024
    assert not any(gm.onepass(L, "bf16") for L in layers.values())
    assert gm.layer_estimate(layers["enc1"], "pconv_old", "H100", "fp32", 1, False)["launches"] == 1
    assert gm.layer_estimate(layers["enc2"], "pconv_old", "H100", "fp32", 1, False)["launches"] == 4


def test_output_is_labelled_estimate():
    md = gm.markdown(["H100"])
    assert "ESTIMATE" in md and "NOT measurements" in md and "Calibration" in md


def test_measured_section_compares_the_h200_run_with_the_estimate(tmp_path):
    lines = gm.measured_lines()
    assert lines and "MEASURED" in lines[0]
    rows = [ln for ln in lines if ln.startswith("| 1 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["measured", "estimate (H100)", "measured / estimate"]
    measured = [float(v) for v in rows[0].split("|")[3:7]]
    estimate = [float(v) for v in rows[1].split("|")[3:7]]
    ratios = [float(v.strip().rstrip("x")) for v in rows[2].split("|")[3:7]]
    assert all(m > 0 for m in measured) and all(e > 0 for e in estimate)
    for m, e, r in zip(measured, estimate, ratios):
        assert abs(m / e - r) <= 0.06 * r
    assert gm.measured_lines(str(tmp_path / "absent.json")) == []


def test_mma_estimate_is_padded_and_labelled():
    # The tensor-core kernel's estimate pads work to its 64 x 64 x 32 tile, grows with the batch, and the table
    # covers every U-Net layer plus the total.
    for L in gm.unet_layers():
        for d in ("fp32", "bf16"):
            one, eight = gm.mma_conv_us(L, "H100", d, 1), gm.mma_conv_us(L, "H100", d, 8)
            assert gm.LAUNCH_US < one <= eight
    rows = gm.mma_table("H100", "bf16", 1)
    assert len(rows) == 2 + len(gm.unet_layers()) + 1 and rows[-1].startswith("| **U-Net**")
    assert "MMA_EFF_MAX" in gm.markdown(["H100"]) and "estimate" in gm.markdown(["H100"])
