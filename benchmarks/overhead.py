#!/usr/bin/env python
"""Per-call cost of a layer whose arithmetic is negligible: the host's work (Python, dispatch, checks, allocation,
kernel launches) that every partial convolution pays before any FLOP, measured in one process for the plain
convolution, NVIDIA's unfused layer (pconv_cuda.reference), the pure-PyTorch peer and the fused op.

On a GPU at the U-Net's batch 1 and 8 this is most of a layer's time (the H200 measurement in
docs/bench_cuda_float32.md: 0.05 ms for a plain conv, 0.2 ms for NVIDIA's layer, whatever the layer's size), so it
gets its own number. Each variant runs `--calls` times back to back (synchronised at the end on CUDA); the median
over `--repeats` interleaved rounds, in microseconds per call, is reported with the ratios of bench.py.

    python benchmarks/overhead.py                     # CPU, plus CUDA when available
    python benchmarks/overhead.py --devices cuda --json overhead.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import make_case, rotation, variants  # noqa: E402
from gpu_model import Layer  # noqa: E402

TINY = Layer("tiny", 8, 8, 3, 1, 8)  # 8 -> 8 channels, 3x3, 8x8 pixels: no arithmetic to speak of


def per_call_us(fn, calls: int, device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def measure(device: str, backward: bool, multi: bool, calls: int, repeats: int) -> Dict[str, float]:
    x, m, conv = make_case(TINY, 1, multi, device, torch.float32)
    fns = variants(x, m, conv, multi)
    if backward:
        x.requires_grad_(True)

    def step(f):
        if backward:
            f(x).sum().backward()
        else:
            with torch.no_grad():
                f(x)

    names = list(fns)
    for name in names:  # warm-up: allocator, primitive caches, cuDNN's algorithm choice
        for _ in range(max(3, calls // 10)):
            step(fns[name])
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in rotation(names, r):
            times[name].append(per_call_us(lambda: step(fns[name]), calls, device))
    return {n: statistics.median(t) for n, t in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    ap.add_argument("--calls", type=int, default=200, help="calls per timed round (default 200)")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds per variant (default 7)")
    ap.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = ap.parse_args(argv)
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; layer {TINY.c_in}->{TINY.c_out} "
          f"k{TINY.k} @{TINY.size}, batch 1, float32; microseconds per call, median of {args.repeats} rounds")
    print(f"{'device':6s} {'pass':8s} {'mask':6s} {'plain':>7s} {'ref':>7s} {'fused':>7s} {'peer':>7s} "
          f"{'fused/plain':>11s} {'ref/fused':>9s} {'fused/peer':>10s}")
    for device in devices:
        for backward in (False, True):
            for multi in (False, True):
                us = measure(device, backward, multi, args.calls, args.repeats)
                row = {"device": device, "pass": "fwd+bwd" if backward else "fwd",
                       "mask": "multi" if multi else "single", **{f"{k}_us": v for k, v in us.items()},
                       "fused_over_plain": us["fused"] / us["plain"],
                       "reference_over_fused": us["reference"] / us["fused"],
                       "fused_over_peer": us["fused"] / us["peer"]}
                rows.append(row)
                print(f"{device:6s} {row['pass']:8s} {row['mask']:6s} {us['plain']:7.1f} {us['reference']:7.1f} "
                      f"{us['fused']:7.1f} {us['peer']:7.1f} {row['fused_over_plain']:10.2f}x "
                      f"{row['reference_over_fused']:8.2f}x {row['fused_over_peer']:9.2f}x")
    if args.json:
        env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "calls": args.calls, "repeats": args.repeats}
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
        print(f"json: wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
