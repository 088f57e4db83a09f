#!/usr/bin/env python
"""Time PConvUNet where a user feels it: one inference, and one training step (forward + InpaintingLoss +
backward), with ``pconv_cuda.PartialConv2d`` against the same network, same weights, built on
``pconv_cuda.reference.PartialConv2d`` (NVIDIA's algorithm), and on a plain ``nn.Conv2d`` that passes the mask
along unread (``PlainConv2d``: the same network minus every partial-convolution cost, the floor any partial
convolution is held to), in the same process.

    python benchmarks/bench_model.py                       # 256x256, layer_size 7, batch 1 and 4
    python benchmarks/bench_model.py --json bench_model.json --repeats 5
    python benchmarks/bench_model.py --cuda-graphs         # also inference replayed from a CUDA graph
    python benchmarks/bench_model.py --processes 5         # medians over 5 fresh processes (CPU VMs)

Runs are interleaved (plain, reference, fused, plain, ...) after warm-up runs, so drifting clocks and caches hit
all alike; the table gives the median of each, the speed-up = reference / fused and fused / plain. The VGG16 of the
loss is randomly initialised (its weights do not change its cost) and is the same module for all. If pconv_cuda
exports the reference layer (no extension built), the fused column is left out.

Memory: for each variant and batch, the bytes autograd keeps for the backward of one training forward of the
network (the loss not included): the unique storages of the tensors its graph saves, ``kept_mb`` (the weights the
convolutions save included), and ``kept_act_mb`` without the parameters (what the graph adds to the model's own
memory), each with fused/plain. On a CPU, freshly allocated buffers page-fault (glibc returns large freed blocks to
the OS): the glibc settings (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, ...) in the environment are recorded in the
JSON's env, since they move the times.

`--cuda-graphs` adds the mode "infer-graph": each network's inference captured once in a CUDA graph and replayed,
so the host's per-op work (Python, dispatch, allocation, launch calls: most of a layer's time at batch 1-8 on a
GPU) drops out and what remains is GPU time: the measured counterpart of benchmarks/gpu_model.py's estimate.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import pconv_cuda
from pconv_cuda import reference
from pconv_cuda.inpainting import InpaintingLoss, IrregularMaskGenerator, PConvUNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import captured, commit  # noqa: E402  (shared with the per-layer benchmark)


class PlainConv2d(torch.nn.Conv2d):
    """``nn.Conv2d`` with the partial convolution's interface (``multi_channel``, ``return_mask``, ``mask_groups``):
    it convolves the input as it is and passes the mask along unread, subsampled by the stride (views, no kernel),
    so the network around it (upsampling, concatenation of features and of the masks' maps, normalisation) does
    the same work as with the fused partial convolution."""

    def __init__(self, *args, multi_channel: bool = False, return_mask: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.multi_channel = multi_channel

    def forward(self, input: torch.Tensor, mask: torch.Tensor, mask_groups=None):
        out = super().forward(input)
        m = mask[:, :1, ::self.stride[0], ::self.stride[1]][..., :out.shape[2], :out.shape[3]]
        return out, m.expand(m.shape[0], self.out_channels, *out.shape[2:])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--layer-size", type=int, default=7)
    p.add_argument("--base-channels", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--modes", nargs="+", choices=("infer", "train"), default=["infer", "train"])
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time inference replayed from a CUDA graph (mode infer-graph; needs --device cuda)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs per variant and case, median reported (default 2, so that the default run "
                        "takes about 3 minutes on one CPU core; use more where time allows)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant and case first")
    p.add_argument("--loss", choices=("inpainting", "l1"), default="inpainting",
                   help="the training step's loss: InpaintingLoss (VGG16 features; default) or L1 to the image, "
                        "whose step is the network alone")
    p.add_argument("--variants", nargs="+", choices=("plain", "reference", "fused"),
                   default=["plain", "reference", "fused"], help="networks to time (default all three)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="the networks' parameters, inputs and masks")
    p.add_argument("--channels-last", action="store_true", help="networks and inputs in channels_last")
    p.add_argument("--cuda-route", choices=("auto", "aten_conv", "gemm", "cudnn_fused"),
                   help="PCONV_CUDA_ROUTE for the fused network (default: the environment's, else auto)")
    p.add_argument("--compile", action="store_true",
                   help="also the reference network under torch.compile (reference_compiled)")
    p.add_argument("--threads", type=int, help="torch threads on CPU (default: torch's choice)")
    p.add_argument("--processes", type=int, default=1,
                   help="run the whole measurement in this many fresh processes, one after another, and report the "
                        "median over them of each process's medians and ratios (on a CPU VM the placement of a "
                        "process's buffers moves a ratio by more than the repeats inside one process do)")
    p.add_argument("--json", type=Path, help="write the results here")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _case_fn(
    model: PConvUNet, loss_fn: Optional[InpaintingLoss], mode: str, x: torch.Tensor, m: torch.Tensor
) -> Callable[[], None]:
    if mode in ("infer", "infer-graph"):
        model.eval()

        def run() -> None:
            with torch.inference_mode():
                model(x, m)

        return captured(run) if mode == "infer-graph" else run
    else:
        model.train()

        def run() -> None:
            model.zero_grad(set_to_none=True)
            out, _ = model(x, m)
            loss = (out - x).abs().mean() if loss_fn is None else loss_fn(out, x, m)["total"]
            loss.backward()
    return run


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    args = build_parser().parse_args(argv)
    if args.processes > 1:
        return _over_processes(args, list(sys.argv[1:] if argv is None else argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.cuda_graphs and device.type != "cuda":
        raise SystemExit("--cuda-graphs needs --device cuda")
    variants: Dict[str, type] = {"plain": PlainConv2d, "reference": reference.PartialConv2d}
    fused_available = pconv_cuda.PartialConv2d is not reference.PartialConv2d
    if fused_available:
        variants["fused"] = pconv_cuda.PartialConv2d
    else:
        print("pconv_cuda exports the reference layer (extension not built): timing the reference only",
              file=sys.stderr)
    variants = {k: v for k, v in variants.items() if k in args.variants or k == "plain"}
    fused_available = fused_available and "fused" in variants

    if args.cuda_route:
        os.environ["PCONV_CUDA_ROUTE"] = args.cuda_route
    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    torch.manual_seed(0)
    models = {}
    for name, cls in variants.items():
        models[name] = PConvUNet(args.layer_size, pconv=cls, base_channels=args.base_channels).to(
            device, dtype, memory_format=fmt)
    state = models["plain"].state_dict()
    for model in models.values():
        model.load_state_dict(state)
    if args.compile and "reference" in models:
        models["reference_compiled"] = torch.compile(models["reference"])  # the same module and weights
    loss_fn = (InpaintingLoss(vgg_weights="random").to(device) if "train" in args.modes and args.loss == "inpainting"
               else None)
    gen = IrregularMaskGenerator(args.size, args.size, seed=0)

    rows: List[Dict[str, object]] = []
    modes = list(args.modes) + (["infer-graph"] if args.cuda_graphs else [])
    for mode in modes:
        for batch in args.batch:
            x = torch.rand(batch, 3, args.size, args.size, device=device).to(dtype).contiguous(memory_format=fmt)
            m = torch.stack([gen.sample(0.2, 0.4) for _ in range(batch)]).to(device, dtype).contiguous(
                memory_format=fmt)
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
                row["fused_over_plain"] = row["fused_ms"] / row["plain_ms"]
                if "reference_ms" in row:
                    row["speedup"] = row["reference_ms"] / row["fused_ms"]
            if fused_available and "reference_compiled_ms" in row:
                row["fused_over_reference_compiled"] = row["fused_ms"] / row["reference_compiled_ms"]
            if mode == "train":
                for name, model in models.items():
                    if name.endswith("_compiled"):
                        continue
                    total, activations = kept_bytes(model, x, m)
                    row[f"{name}_kept_mb"], row[f"{name}_kept_act_mb"] = total / 2**20, activations / 2**20
                if fused_available:
                    row["fused_kept_over_plain"] = row["fused_kept_mb"] / row["plain_kept_mb"]
                    row["fused_kept_act_over_plain"] = row["fused_kept_act_mb"] / row["plain_kept_act_mb"]
            rows.append(row)
            print(_row_line(row, fused_available), flush=True)

    env = {
        "torch": torch.__version__, "commit": commit(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(), "layer_size": args.layer_size, "base_channels": args.base_channels,
        "repeats": args.repeats, "warmup": args.warmup, "fused_available": fused_available, "loss": args.loss,
        "dtype": args.dtype, "channels_last": args.channels_last,
        "cuda_route": os.environ.get("PCONV_CUDA_ROUTE", "auto") if device.type == "cuda" else None,
        "glibc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"},
    }
    print()
    print(format_table(rows, fused_available))
    print(f"\n{env}")
    result = {"env": env, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _over_processes(args: argparse.Namespace, argv: List[str]) -> Dict[str, object]:
    """`--processes N`: the same command in N fresh processes in turn; each row's times and ratios are the median
    over the processes of that process's values (memory is the same in each), with the per-process ratios kept."""
    import subprocess
    import tempfile
    rest, skip = [], False
    for a in argv:  # this command's arguments without --processes and --json (and their values)
        if skip:
            skip = False
        elif a in ("--processes", "--json"):
            skip = True
        elif not a.startswith(("--processes=", "--json=")):
            rest.append(a)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.processes):
            out = Path(tmp) / f"{i}.json"
            print(f"process {i + 1} of {args.processes}", flush=True)
            subprocess.run([sys.executable, str(Path(__file__).resolve()), *rest, "--json", str(out)], check=True)
            results.append(json.loads(out.read_text()))
    rows = []
    for per_process in zip(*(r["rows"] for r in results)):
        row = dict(per_process[0])
        for key, value in per_process[0].items():
            if isinstance(value, float):
                row[key] = statistics.median(r[key] for r in per_process)
            elif key.endswith("_all_ms"):
                row[key] = [r[key.replace("_all_ms", "_ms")] for r in per_process]  # each process's median
        for key in [k for k in row if "_over_" in k or k == "speedup"]:
            row[f"{key}_per_process"] = [r[key] for r in per_process]
        rows.append(row)
        print(_row_line(row, "fused_over_plain" in row))
    env = dict(results[0]["env"], processes=args.processes)
    fused_available = bool(env.get("fused_available"))
    print()
    print(format_table(rows, fused_available))
    result = {"env": env, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def kept_bytes(model: PConvUNet, x: torch.Tensor, m: torch.Tensor) -> Tuple[int, int]:
    """Bytes autograd keeps for the backward of one training forward of `model`: the unique storages of the
    tensors its graph saves (views of one storage count once), and the same without the parameters."""
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = model(x, m)
    del out
    gc.collect()  # saved outputs returned as themselves form cycles with their nodes
    return sum(kept.values()), sum(n for ptr, n in kept.items() if ptr not in params)


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
    s = (f"{row['mode']:11s} batch {row['batch']}: plain {row['plain_ms']:.1f} ms, "
         f"reference {_num(row, 'reference_ms', '.1f')} ms")
    if fused:
        s += (f", fused {row['fused_ms']:.1f} ms, speed-up {_num(row, 'speedup', '.2f')}x, "
              f"fused/plain {row['fused_over_plain']:.3f}x")
    if "reference_compiled_ms" in row:
        s += f", reference compiled {row['reference_compiled_ms']:.1f} ms"
        if "fused_over_reference_compiled" in row:
            s += f" (fused/that {row['fused_over_reference_compiled']:.2f}x)"
    if "plain_kept_mb" in row:
        names = [n for n in ("plain", "reference", "fused") if f"{n}_kept_mb" in row]
        s += ("; autograd keeps " + ", ".join(f"{n} {row[f'{n}_kept_mb']:.1f} MB" for n in names)
              + " (without parameters " + ", ".join(f"{row[f'{n}_kept_act_mb']:.1f}" for n in names) + ")")
        if fused:
            s += (f", fused/plain {row['fused_kept_over_plain']:.3f}x "
                  f"({row['fused_kept_act_over_plain']:.3f}x without parameters)")
    return s


def _num(row: Dict[str, object], key: str, fmt: str) -> str:
    return format(row[key], fmt) if key in row else "-"


CASES = {"infer": "inference", "infer-graph": "inference, CUDA graph", "train": "training step (fwd + loss + bwd)"}


def format_table(rows: List[Dict[str, object]], fused: bool) -> str:
    """Markdown table of the medians, the speed-up (reference / fused) and fused / plain."""
    head = "| case | batch | size | plain (ms) | reference (ms) |" + (
        " fused (ms) | speed-up | fused/plain |" if fused else "") + (
        " kept MB plain/ref/fused (without parameters) | kept fused/plain |")
    sep = "|---|---|---|---|---|" + ("---|---|---|" if fused else "") + "---|---|"
    lines = [head, sep]
    for r in rows:
        line = f"| {CASES[r['mode']]} | {r['batch']} | {r['size']}x{r['size']} | {r['plain_ms']:.1f} | " \
               f"{_num(r, 'reference_ms', '.1f')} |"
        if fused:
            line += f" {r['fused_ms']:.1f} | {_num(r, 'speedup', '.2f')}x | {r['fused_over_plain']:.3f}x |"
        names = [n for n in ("plain", "reference", "fused") if f"{n}_kept_mb" in r]
        if names:
            line += (" " + "/".join(f"{r[f'{n}_kept_mb']:.1f}" for n in names) + " ("
                     + "/".join(f"{r[f'{n}_kept_act_mb']:.1f}" for n in names) + ") |")
            line += (f" {r['fused_kept_over_plain']:.3f}x ({r['fused_kept_act_over_plain']:.3f}x) |" if fused
                     else " - |")
        else:
            line += " - | - |"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
