"""The CPU loops' two compiled forms give bitwise the same results.

On an x86-64 CPU with AVX2 the CPU backend runs its loops compiled for AVX2 (csrc/cpu/cpu_backend.cpp,
parallel_loop); ATEN_CPU_CAPABILITY=default makes it (and ATen) run the baseline form. Nothing in the loops may
round differently between the two (no fused multiply-add, no reassociated sum), so each sample's forward outputs
and gradients are compared bitwise across two child processes, one per form.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
import pconv_cuda
from helpers import SAMPLES, Sample, conv_args, make_inputs
torch.set_num_threads(2)
# The samples, plus maps large enough for the vector loops' bodies and tails (odd sizes) in both layouts.
samples = list(SAMPLES) + [Sample("big", n=2, c_in=19, c_out=10, h=37, w=45),
                           Sample("big_multi_soft", n=2, c_in=9, c_out=7, h=33, w=41, multi_channel=True, mask="soft"),
                           Sample("big_s2", n=1, c_in=5, c_out=12, h=64, w=70, stride=(2, 2), kernel=(5, 5),
                                  padding=(2, 2))]
results = {}
for s in samples:
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for layout in (torch.contiguous_format, torch.channels_last):
            x, m, w, b = make_inputs(s, dtype, requires_grad=True)
            x = x.detach().contiguous(memory_format=layout).requires_grad_(True)
            if m is not None:
                m = m.contiguous(memory_format=layout)
            out, upd, ratio, xm = torch.ops.pconv_cuda.partial_conv2d(x, m, w, b, *conv_args(s))
            g = torch.Generator().manual_seed(1)
            out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype))
            got = dict(out=out, updated_mask=upd, ratio=ratio, masked_input=xm, grad_input=x.grad,
                       grad_weight=w.grad, grad_bias=b.grad if b is not None else torch.zeros(0))
            results[f"{s.name}/{dtype}/{layout}"] = {k: v.detach() for k, v in got.items()}
torch.save(results, sys.argv[1])
"""


# ATen's own float16 convolution kernels (forward and backward) are dispatched by ATEN_CPU_CAPABILITY as well and
# round differently in the two forms (checked: F.conv2d alone differs), so for float16 only what the CPU loops
# compute alone is compared.
ATEN_FP16_CONV = ("out", "grad_input", "grad_weight")


def _run(path: Path, env_update: dict) -> dict:
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    env.update(env_update)
    tests_dir = str(Path(__file__).parent)
    subprocess.run([sys.executable, "-c", CHILD, str(path), tests_dir], env=env, check=True, timeout=600,
                   cwd=str(path.parent))
    return torch.load(path)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX2 form exists on x86-64 only")
@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                    reason="this CPU runs only the baseline form")
def test_avx2_and_baseline_loops_agree_bitwise(tmp_path):
    vector = _run(tmp_path / "vector.pt", {})
    baseline = _run(tmp_path / "baseline.pt", {"ATEN_CPU_CAPABILITY": "default"})
    assert vector.keys() == baseline.keys()
    for key, tensors in vector.items():
        for name, a in tensors.items():
            if "float16" in key and name in ATEN_FP16_CONV:
                continue
            b = baseline[key][name]
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert torch.equal(a, b), f"{key}: {name} differs between the AVX2 and the baseline loops"
