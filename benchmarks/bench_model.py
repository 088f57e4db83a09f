#!/usr/bin/env python
"""Time PConvUNet where a user feels it: one inference, and one training step (forward + InpaintingLoss +
backward), with ``pconv_cuda.PartialConv2d`` against the same network, same weights, built on
``pconv_cuda.reference.PartialConv2d``, in the same process.

    python benchmarks/bench_model.py                       # 256x256, layer_size 7, batch 1 and 4
    python benchmarks/bench_model.py --json bench_model.json --repeats 5

Runs are interleaved (reference, fused, reference, fused, ...) after warm-up runs, so drifting clocks and caches
hit both alike; the table gives the median of each and the speed-up = reference / fused. The VGG16 of the loss is
randomly initialised (its weights do not change its cost) and is the same module for both. If pconv_cuda exports
the reference layer (no extension built), only the reference column is measured.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

import pconv_cuda
from pconv_cuda import reference
from pconv_cuda.inpainting import InpaintingLoss, IrregularMaskGenerator, PConvUNet


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--layer-size", type=int, default=7)
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs per variant and case, median reported (default 2, so that the default run "
                        "takes about 3 minutes on one CPU core; use more where time allows)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant and case first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's choice)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _case_fn(
    model: PConvUNet, loss_fn: Optional[InpaintingLoss], mode: str, x: torch.Tensor, m: torch.Tensor
) -> Callable[[], None]:
    if mode == "infer":
        model.eval()

        def run() -> None:
            with torch.inference_mode():
                model(x, m)
    else:
        model.train()

        def run() -> None:
            model.zero_grad(set_to_none=True)
            out, _ = model(x, m)
            loss_fn(out, x, m)["total"].backward()
    return run


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants: Dict[str, type] = {"reference": reference.PartialConv2d}
    fused_available = pconv_cuda.PartialConv2d is not reference.PartialConv2d
    if fused_available:
        variants["fused"] = pconv_cuda.PartialConv2d
    else:
        print("pconv_cuda exports the reference layer (extension not built): timing the reference only",
              file=sys.stderr)

    torch.manual_seed(0)
    models = {}
    for name, cls in variants.items():
        models[name] = PConvUNet(args.layer_size, pconv=cls, base_channels=args.base_channels).to(device)
    state = models["reference"].state_dict()
    for model in models.values():
        model.load_state_dict(state)
    loss_fn = InpaintingLoss(vgg_weights="random").to(device) if "train" in args.modes else None
    gen = IrregularMaskGenerator(args.size, args.size, seed=0)

    rows: List[Dict[str, object]] = []
    for mode in args.modes:
        for batch in args.batch:
            x = torch.rand(batch, 3, args.size, args.size, device=device)
            m = torch.stack([gen.sample(0.2, 0.4) for _ in range(batch)]).to(device)
            fns = {name: _case_fn(model, loss_fn, mode, x, m) for name, model in models.items()}
            times: Dict[str, List[float]] = {name: [] for name in fns}
            for r in range(args.warmup + args.repeats):
                for name, fn in fns.items():
                    _sync(device)
                    t = time.perf_counter()
                    fn()
                    _sync(device)
                    if r >= args.warmup:
                        times[name].append(time.perf_counter() - t)
            row: Dict[str, object] = {"mode": mode, "batch": batch, "size": args.size}
            for name, ts in times.items():
                row[f"{name}_ms"] = statistics.median(ts) * 1e3
                row[f"{name}_all_ms"] = [t * 1e3 for t in ts]
            if fused_available:
                row["speedup"] = row["reference_ms"] / row["fused_ms"]
            rows.append(row)
            print(_row_line(row, fused_available), flush=True)

    env = {
        "torch": torch.__version__, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(), "layer_size": args.layer_size, "base_channels": args.base_channels,
        "repeats": args.repeats, "warmup": args.warmup, "fused_available": fused_available,
    }
    print()
    print(format_table(rows, fused_available))
    print(f"\n{env}")
    result = {"env": env, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _row_line(row: Dict[str, object], fused: bool) -> str:
    s = f"{row['mode']:5s} batch {row['batch']}: reference {row['reference_ms']:.1f} ms"
    if fused:
        s += f", fused {row['fused_ms']:.1f} ms, speed-up {row['speedup']:.2f}x"
    return s


def format_table(rows: List[Dict[str, object]], fused: bool) -> str:
    """Markdown table of the medians and the speed-up."""
    head = "| case | batch | size | reference (ms) |" + (" fused (ms) | speed-up |" if fused else "")
    sep = "|---|---|---|---|" + ("---|---|" if fused else "")
    lines = [head, sep]
    for r in rows:
        case = "inference" if r["mode"] == "infer" else "training step (fwd + loss + bwd)"
        line = f"| {case} | {r['batch']} | {r['size']}x{r['size']} | {r['reference_ms']:.1f} |"
        if fused:
            line += f" {r['fused_ms']:.1f} | {r['speedup']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
