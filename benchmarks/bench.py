"""Fused partial convolution vs the unfused reference vs a pure-PyTorch peer vs the plain convolution, in one process.

For each layer of the paper's U-Net at 256x256 (encoder 3->64 k7 s2 ... 512->512 k3 s2, decoder
(512+512)->512 k3 ... (64+3)->3 k3), each mask kind, batch size and pass (forward, forward+backward), the four
variants run interleaved and the median of each is reported with three ratios:
  fused/plain  how far the fused op is from the floor (the plain nn.Conv2d of the same shape),
  ref/fused    the speed-up over the unfused reference (pconv_cuda.reference, NVIDIA's algorithm),
  fused/peer   the fused op against the best layer a user writes in plain PyTorch (peer.py, what torch_pconv does:
               one channel-summed mask plane, a single-channel ones convolution, same semantics); < 1: fused faster.

    python benchmarks/bench.py                         # CPU, all cases
    python benchmarks/bench.py --quick                 # batch 1, fewer repeats
    python benchmarks/bench.py --quick --layers enc1,dec1
    python benchmarks/bench.py --json out.json         # also write the rows as JSON
    python benchmarks/bench.py --plot bench.png        # per-layer ratio bars at batch 1 (needs matplotlib)
    python benchmarks/bench.py --dims 3                # 3-D layers of a video-inpainting U-Net (8 frames x 128 px)
    python benchmarks/bench.py --masks groups skip     # decoder layers with their skip link's two mask maps
Mask kinds: single (one map), multi (C_in channels), groups (decoder layers only: the upsampled map and the skip's,
mask_groups=(C_up, C_skip) for the fused op, the expanded C_in-channel mask for the reference and the peer, which
take no groups; plain reads no mask), skip (groups, each variant also joining the skip link's two halves: plain,
NVIDIA's layer and the peer by torch.cat, the fused layer by masked_cat, then input_masked=True).
CUDA rows (CUDA-event timing after warm-up, peak memory) run when a GPU is present and pconv_cuda has CUDA
kernels, once per CUDA route (--cuda-routes, default aten_conv, i.e. cuDNN plus our passes, and gemm, our
implicit-GEMM kernel; cudnn_fused runs the renormalisation inside cuDNN's kernel, channels_last only; "auto"
measures what users get by default).
    python benchmarks/bench.py --devices cuda --gpu-time --compile --channels-last --dtype bfloat16 \
        --cuda-routes aten_conv cudnn_fused
--gpu-time captures each variant's call in a CUDA graph and times its replays: GPU time alone, without the host's
per-op work (eager CUDA times of small layers are mostly launch overhead). --compile adds NVIDIA's layer and the
peer under torch.compile (mode "default"; in eager timing also "reduce-overhead", which replays CUDA graphs of its
own): what a user might try instead of this package.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch._prims_common import suggest_memory_format

try:
    import resource  # Unix: page-fault counts
except ImportError:
    resource = None

import pconv_cuda
from pconv_cuda import reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_model import Layer, unet_layers  # noqa: E402,F401  (the layer list, shared with the GPU model)
from peer import peer_partial_conv2d  # noqa: E402


@dataclass
class Row:
    device: str
    layer: str
    shape: str
    mask: str
    batch: int
    pass_: str
    plain_ms: float
    reference_ms: float
    fused_ms: float
    fused_over_plain: float
    reference_over_fused: float
    peer_ms: float
    fused_over_peer: float
    peak_mb: Optional[Dict[str, float]] = None
    faults: Optional[Dict[str, float]] = None  # CPU: median minor page faults per call, per variant
    extra_ms: Optional[Dict[str, float]] = None  # --compile: medians of the compiled variants
    timing: str = "eager"  # or "cuda_graph": replays of a captured call (--gpu-time)

    def fused_over(self, variant: str) -> Optional[float]:
        """fused / a compiled variant (--compile), None when it was not measured."""
        return self.fused_ms / self.extra_ms[variant] if self.extra_ms and variant in self.extra_ms else None


@dataclass(frozen=True)
class VideoLayer:
    """A 3-D layer: (frames, size, size) input, (kd, k, k) kernel, stride per dimension, 'same'-style padding."""
    name: str
    c_in: int
    c_out: int
    k: Tuple[int, int, int]
    stride: Tuple[int, int, int]
    frames: int
    size: int


def video_layers(image: int = 128, frames: int = 8) -> List[VideoLayer]:
    """A video-inpainting U-Net's 3-D partial convolutions at `frames` x `image` px: a 3x5x5 and two 3x3x3 encoder
    layers (the third also halves the frames), two decoder layers on concatenated skip features."""
    return [
        VideoLayer("v_enc1", 3, 32, (3, 5, 5), (1, 2, 2), frames, image),
        VideoLayer("v_enc2", 32, 64, (3, 3, 3), (1, 2, 2), frames, image // 2),
        VideoLayer("v_enc3", 64, 128, (3, 3, 3), (2, 2, 2), frames, image // 4),
        VideoLayer("v_dec2", 64 + 32, 32, (3, 3, 3), (1, 1, 1), frames, image // 2),
        VideoLayer("v_dec1", 32 + 3, 3, (3, 3, 3), (1, 1, 1), frames, image),
    ]


def shape_of(layer) -> str:
    if isinstance(layer, VideoLayer):
        return (f"{layer.c_in}->{layer.c_out} k{'x'.join(map(str, layer.k))} s{'x'.join(map(str, layer.stride))} "
                f"@{layer.frames}x{layer.size}")
    return f"{layer.c_in}->{layer.c_out} k{layer.k} s{layer.stride} @{layer.size}"


def decoder_groups(layer, layers) -> Optional[Tuple[int, int]]:
    """(C_up, C_skip) of a decoder layer (decK concatenates encoder layer K-1's output, dec1 the image), else None."""
    prefix = "v_" if layer.name.startswith("v_") else ""
    if not layer.name.startswith(prefix + "dec"):
        return None
    k = int(layer.name[len(prefix) + 3:])
    by_name = {l.name: l for l in layers}
    skip = by_name[f"{prefix}enc{k - 1}"].c_out if k > 1 else by_name[f"{prefix}enc1"].c_in
    return layer.c_in - skip, skip


def make_case(layer, batch: int, multi: bool, device: str, dtype: torch.dtype, seed: int = 0,
              channels_last: bool = False, mask_groups: Optional[Tuple[int, ...]] = None):
    """(x, m, conv) for a 2-D Layer or a VideoLayer; conv is the nn.ConvNd whose parameters every variant uses.
    channels_last: input, mask and weight in channels_last(_3d) memory format. mask_groups: m has one map per
    group."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, VideoLayer):
        spatial = (layer.frames, layer.size, layer.size)
        conv = torch.nn.Conv3d(layer.c_in, layer.c_out, layer.k, layer.stride, tuple(k // 2 for k in layer.k))
    else:
        spatial = (layer.size, layer.size)
        conv = torch.nn.Conv2d(layer.c_in, layer.c_out, layer.k, layer.stride, layer.k // 2)
    x = torch.randn(batch, layer.c_in, *spatial, generator=g).to(device, dtype)
    mc = len(mask_groups) if mask_groups else layer.c_in if multi else 1
    m = (torch.rand(batch, mc, *spatial, generator=g) > 0.25).to(device, dtype)
    conv = conv.to(device, dtype)
    if channels_last:
        fmt = torch.channels_last_3d if isinstance(layer, VideoLayer) else torch.channels_last
        x, m = x.contiguous(memory_format=fmt), m.contiguous(memory_format=fmt)
        conv = conv.to(memory_format=fmt)
    return x, m, conv


MASK_KINDS = ("single", "multi", "groups", "skip")

# The compiled variants of --compile: (name, the eager variant compiled, torch.compile mode).
COMPILED = [("reference_compiled", "reference", "default"), ("peer_compiled", "peer", "default"),
            ("reference_compiled_ro", "reference", "reduce-overhead"), ("peer_compiled_ro", "peer", "reduce-overhead")]


def variants(x, m, conv, multi: bool, mask_groups: Optional[Tuple[int, ...]] = None, compiled: Tuple[str, ...] = (),
             graph_safe: bool = False) -> Dict[str, Callable[..., torch.Tensor]]:
    """The timed functions of the input, or of a skip link's halves (each variant joins them: torch.cat, or
    masked_cat for the fused layer, whose convolution then takes X*M as it is). compiled: the torch.compile modes
    of the COMPILED variants to add."""
    w, b, s, p = conv.weight, conv.bias, conv.stride, conv.padding
    three_d = w.dim() == 5
    plain = F.conv3d if three_d else F.conv2d
    unfused = reference.partial_conv3d if three_d else reference.partial_conv2d
    fused = pconv_cuda.partial_conv3d if three_d else pconv_cuda.partial_conv2d
    # Groups: the fused op reads the maps; the others take the C_in-channel mask they stand for (formed here).
    full = m.repeat_interleave(torch.tensor(mask_groups, device=m.device), 1).contiguous(
        memory_format=suggest_memory_format(m)) if mask_groups else m


    def cat(xs):
        return xs[0] if len(xs) == 1 else torch.cat(xs, 1)

    def fused_fn(*xs):
        if len(xs) == 1:
            return fused(xs[0], m, w, b, s, p, 1, 1, multi, mask_groups)[0]
        return fused(pconv_cuda.masked_cat(list(xs), m, mask_groups), m, w, b, s, p, 1, 1, multi, mask_groups,
                     input_masked=True)[0]

    fns = {
        "plain": lambda *xs: plain(cat(xs), w, b, s, p),
        "reference": lambda *xs: unfused(cat(xs), full, w, b, s, p, 1, 1, multi)[0],
        "fused": fused_fn,
        "peer": lambda *xs: peer_partial_conv2d(cat(xs), full, w, b, s, p, 1, 1, multi)[0],
    }
    for name, base, mode in COMPILED:
        if mode not in compiled or (graph_safe and mode == "reduce-overhead"):
            continue  # reduce-overhead's own CUDA graphs cannot be captured in ours; captured "default" is the same
        fns[name] = torch.compile(fns[base], mode=mode, dynamic=False)
    return fns


class Clock:
    """Wall time on the CPU; CUDA events (after a synchronise) on a GPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def time_ms(self, fn: Callable[[], None]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def rotation(names: List[str], r: int) -> List[str]:
    """The order of round r: interleaved and rotated so that drift on a shared machine hits every variant alike."""
    return names[r % len(names):] + names[:r % len(names)]


def captured(run: Callable[[], None]) -> Callable[[], None]:
    """`run` captured once in a CUDA graph, after warm-up on a side stream as torch.cuda.graphs asks (cuDNN's
    algorithm choice and lazy initialisation stay outside the graph); the returned function replays it, repeating
    the call's GPU work with no host work per op. The inputs are the same tensors every replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    return graph.replay


def run_case(layer, batch, multi, backward, device, dtype, repeats, clock, channels_last=False,
             mask_groups=None, compiled: Tuple[str, ...] = (), gpu_time=False, skip_link=False) -> Row:
    """skip_link (with mask_groups): the input comes as the skip link's two halves, which each variant joins."""
    multi = multi or bool(mask_groups)
    x, m, conv = make_case(layer, batch, multi, device, dtype, channels_last=channels_last, mask_groups=mask_groups)
    xs = (x,)
    if skip_link:
        xs = tuple(t.contiguous(memory_format=suggest_memory_format(x)) for t in x.split(list(mask_groups), 1))
    fns = variants(x, m, conv, multi, mask_groups, compiled, graph_safe=gpu_time)
    grad = None
    if backward:
        for t in xs:
            t.requires_grad_(True)
        with torch.no_grad():
            grad = torch.randn_like(fns["plain"](*xs))

    def step(fn):
        if not backward:
            with torch.no_grad():
                fn(*xs)
            return
        if not gpu_time:  # a captured backward writes the same .grad tensors at each replay
            for t in xs:
                t.grad = None
            conv.weight.grad = None
            conv.bias.grad = None
        fn(*xs).backward(grad)

    names = list(fns)
    peak = None
    for name in names:  # warm-up: allocator, oneDNN primitive caches, cuDNN autotuning, torch.compile
        step(fns[name])
    calls = {n: (lambda n=n: step(fns[n])) for n in names}
    if gpu_time:
        calls = {n: captured(calls[n]) for n in names}
    if clock.cuda:
        peak = {}
        for name in names:
            torch.cuda.reset_peak_memory_stats()
            step(fns[name])
            peak[name] = torch.cuda.max_memory_allocated() / 2**20
    times: Dict[str, List[float]] = {n: [] for n in names}
    faults: Dict[str, List[int]] = {n: [] for n in names}
    for r in range(repeats):
        for name in rotation(names, r):
            before = minor_faults()
            times[name].append(clock.time_ms(calls[name]))
            faults[name].append(minor_faults() - before)
    med = {n: statistics.median(t) for n, t in times.items()}
    fault_med = None if clock.cuda or minor_faults() < 0 else {n: statistics.median(f) for n, f in faults.items()}
    extra = {n: med[n] for n in names if n not in ("plain", "reference", "fused", "peer")} or None
    return Row(device, layer.name, shape_of(layer),
               "skip" if skip_link else "groups" if mask_groups else "multi" if multi else "single", batch, "fwd+bwd" if backward else "fwd", med["plain"],
               med["reference"], med["fused"], med["fused"] / med["plain"], med["reference"] / med["fused"],
               med["peer"], med["fused"] / med["peer"], peak, fault_med, extra,
               "cuda_graph" if gpu_time else "eager")


def minor_faults() -> int:
    """This process's minor page faults so far (-1 where the OS does not say): on a CPU, first touches of freshly
    allocated memory, a large and allocator-dependent part of a layer's time (docs/benchmarks.md)."""
    return -1 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def summarise(rows: List[Row]) -> List[str]:
    lines = []
    for device in sorted({r.device for r in rows}):
        for pass_ in ("fwd", "fwd+bwd"):
            for mask in MASK_KINDS:
                sel = [r for r in rows if r.device == device and r.pass_ == pass_ and r.mask == mask]
                if sel:
                    lines.append(
                        f"{device:5s} {pass_:8s} {mask:6s} mask: median fused/plain "
                        f"{statistics.median(r.fused_over_plain for r in sel):.2f}x, median ref/fused "
                        f"{statistics.median(r.reference_over_fused for r in sel):.2f}x, median fused/peer "
                        f"{statistics.median(r.fused_over_peer for r in sel):.2f}x over {len(sel)} cases")
    for p in peer_summary(rows):
        lines.append(f"{p['device']:5s} {p['pass']:8s} fused/peer over {p['layers']} layers: median "
                     f"{p['median_fused_over_peer']:.2f}x, worst {p['worst_fused_over_peer']:.2f}x "
                     f"({p['worst_layer']}; < 1: fused faster)")
    for device in sorted({r.device for r in rows}):
        for name, _, _ in COMPILED:
            sel = [r for r in rows if r.device == device and r.fused_over(name) is not None]
            if sel:
                worst = max(sel, key=lambda r: r.fused_over(name))
                lines.append(f"{device:5s} fused/{name} over {len(sel)} cases: median "
                             f"{statistics.median(r.fused_over(name) for r in sel):.2f}x, worst "
                             f"{worst.fused_over(name):.2f}x ({worst.layer} {worst.pass_} N{worst.batch}; < 1: fused "
                             f"faster)")
    return lines


def peer_summary(rows: List[Row]) -> List[dict]:
    """Per device and pass: the median over layers of fused/peer and the worst (largest) layer.

    A layer's fused/peer is the median over its cases (mask kinds and batch sizes) in that pass."""
    out = []
    for device in sorted({r.device for r in rows}):
        for pass_ in ("fwd", "fwd+bwd"):
            per_layer: Dict[str, List[float]] = {}
            for r in rows:
                if r.device == device and r.pass_ == pass_:
                    per_layer.setdefault(r.layer, []).append(r.fused_over_peer)
            if not per_layer:
                continue
            layer_ratio = {name: statistics.median(v) for name, v in per_layer.items()}
            worst = max(layer_ratio, key=layer_ratio.get)
            out.append({"device": device, "pass": pass_, "layers": len(layer_ratio),
                        "median_fused_over_peer": statistics.median(layer_ratio.values()),
                        "worst_fused_over_peer": layer_ratio[worst], "worst_layer": worst})
    return out


def plot(rows: List[Row], path: str) -> Optional[str]:
    """Per-layer bars of fused/plain, fused/peer and ref/fused at batch 1, one panel per device, pass and mask kind.

    Returns None when written, else why not (matplotlib missing, no batch-1 rows)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    sel = [r for r in rows if r.batch == 1]
    if not sel:
        return "no batch-1 rows (add 1 to --batch)"
    panels = [(d, p, m) for d in dict.fromkeys(r.device for r in sel) for p in ("fwd", "fwd+bwd")
              for m in MASK_KINDS if any(r.device == d and r.pass_ == p and r.mask == m for r in sel)]
    series = [("fused/plain", "fused_over_plain"), ("fused/peer", "fused_over_peer"),
              ("ref/fused", "reference_over_fused")]
    n_layers = len({r.layer for r in sel})
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6.0, 0.75 * n_layers + 2), 3.2 * len(panels)),
                             squeeze=False)
    for ax, (device, pass_, mask) in zip(axes[:, 0], panels):
        prs = [r for r in sel if r.device == device and r.pass_ == pass_ and r.mask == mask]
        width = 0.8 / len(series)
        for i, (label, attr) in enumerate(series):
            ax.bar([j + (i - (len(series) - 1) / 2) * width for j in range(len(prs))],
                   [getattr(r, attr) for r in prs], width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_ylim(0, 1.3 * max([1.0] + [getattr(r, a) for r in prs for _, a in series]))  # room for the legend
        ax.set_xticks(range(len(prs)))
        ax.set_xticklabels([r.layer for r in prs])
        ax.set_ylabel("ratio")
        ax.set_title(f"{device}, {pass_}, {mask} mask, batch 1")
        ax.legend(fontsize="small", ncol=len(series), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batch 1 only and 3 repeats")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (default 1 4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 5)")
    ap.add_argument("--layers", nargs="+", default=None,
                    help="subset of layer names, e.g. enc1 dec1 or enc1,dec1")
    ap.add_argument("--masks", nargs="+", default=["single", "multi"], choices=MASK_KINDS,
                    help="mask kinds (default single multi); groups: decoder layers with mask_groups=(C_up, C_skip); "
                         "skip: the same, each variant joining the skip link's halves (fused: masked_cat)")
    ap.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    ap.add_argument("--dims", type=int, default=2, choices=[2, 3],
                    help="2: the image U-Net's layers (default); 3: a video U-Net's 3-D layers (video_layers)")
    ap.add_argument("--image", type=int, default=None, help="input size in px (default 256; 128 with --dims 3)")
    ap.add_argument("--frames", type=int, default=8, help="frames of the 3-D layers (default 8)")
    ap.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--channels-last", action="store_true",
                    help="input, mask and weights in channels_last memory format (the fast path on a GPU with "
                         "fp16/bf16: cuDNN's tensor-core convolutions and our NHWC kernels)")
    ap.add_argument("--cuda-routes", nargs="+", default=["aten_conv", "gemm"],
                    choices=["auto", "aten_conv", "gemm", "cudnn_fused"],
                    help="PCONV_CUDA_ROUTE values to measure on a GPU")
    ap.add_argument("--gpu-time", action="store_true",
                    help="CUDA: time replays of each call captured in a CUDA graph (GPU time without host work)")
    ap.add_argument("--compile", nargs="*", choices=["default", "reduce-overhead"], default=None,
                    help="also NVIDIA's layer and the peer under torch.compile in these modes (no mode named: both; "
                         "reduce-overhead is left out under --gpu-time)")
    ap.add_argument("--layer-size", type=int, default=None,
                    help="U-Net levels (default 7; the paper uses 8 at 512 px)")
    ap.add_argument("--json", metavar="PATH", help="write the rows and the summary as JSON")
    ap.add_argument("--markdown", metavar="PATH", help="write the table, the summary and the settings as Markdown "
                                                        "(docs/benchmarks.md is made this way)")
    ap.add_argument("--plot", metavar="PATH", help="write per-layer bars of fused/plain, fused/peer and ref/fused "
                                                    "at batch 1 (PNG, SVG or PDF by suffix; needs matplotlib)")
    args = ap.parse_args(argv)
    if args.layers is not None:
        args.layers = [n for item in args.layers for n in item.split(",") if n]
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("plot: matplotlib is not installed, --plot will be skipped (pip install matplotlib)")

    batches = args.batch or ([1] if args.quick else [1, 4])
    repeats = args.repeats or (3 if args.quick else 5)
    all_layers = (video_layers(args.image or 128, args.frames) if args.dims == 3
                  else unet_layers(args.image or 256, args.layer_size or 7))
    compiled = tuple(args.compile or ("default", "reduce-overhead")) if args.compile is not None else ()
    layers = [l for l in all_layers if args.layers is None or l.name in args.layers]
    if not layers:
        ap.error(f"no layer matches --layers {args.layers}; names: {[l.name for l in all_layers]}")
    devices = args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    for d in devices:
        if d.startswith("cuda") and pconv_cuda.ops.MISSING_CUDA_KERNELS:
            print(f"skipping {d}: {pconv_cuda.ops.missing_kernel_message('partial_conv2d', 'cuda')}")
    devices = [d for d in devices if not (d.startswith("cuda") and pconv_cuda.ops.MISSING_CUDA_KERNELS)]
    dtype = getattr(torch, args.dtype)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, dtype {args.dtype}"
          f"{', channels_last' if args.channels_last else ''}, median of {repeats} interleaved repeats")
    head = (f"{'dev':4s} {'layer':6s} {'shape':30s} {'mask':6s} {'N':>2s} {'pass':7s} {'plain ms':>9s} "
            f"{'ref ms':>9s} {'fused ms':>9s} {'peer ms':>9s} {'fused/plain':>11s} {'ref/fused':>9s} "
            f"{'fused/peer':>10s}")
    print(head)
    print("-" * len(head))
    rows = []
    runs = []  # (device, label, CUDA route)
    for device in devices:
        if device.startswith("cuda"):
            runs += [(device, f"{device}/{r}", r) for r in args.cuda_routes]
        else:
            runs.append((device, device, None))
    for device, label, route in runs:
        if route:
            os.environ["PCONV_CUDA_ROUTE"] = route
        clock = Clock(device)
        # The first calls of a process pay for allocator growth and library initialisation: not any variant's cost.
        run_case(layers[0], batches[0], False, "fwd+bwd" in args.passes, device, dtype, 2, clock)
        for pass_ in args.passes:
            for batch in batches:
                for mask in args.masks:
                    for layer in layers:
                        grouped = mask in ("groups", "skip")
                        groups = decoder_groups(layer, all_layers) if grouped else None
                        if grouped and groups is None:
                            continue  # an encoder layer's mask is one map
                        r = run_case(layer, batch, mask == "multi", pass_ == "fwd+bwd", device, dtype, repeats, clock,
                                     args.channels_last, groups, compiled, args.gpu_time and clock.cuda,
                                     skip_link=mask == "skip")
                        r.device = label
                        rows.append(r)
                        print(f"{r.device:4s} {r.layer:6s} {r.shape:30s} {r.mask:6s} {r.batch:2d} {r.pass_:7s} "
                              f"{r.plain_ms:9.2f} {r.reference_ms:9.2f} {r.fused_ms:9.2f} {r.peer_ms:9.2f} "
                              f"{r.fused_over_plain:10.2f}x {r.reference_over_fused:8.2f}x {r.fused_over_peer:9.2f}x"
                              + (f"  peak MB plain/ref/fused/peer {r.peak_mb['plain']:.0f}/"
                                 f"{r.peak_mb['reference']:.0f}/{r.peak_mb['fused']:.0f}/{r.peak_mb['peer']:.0f}"
                                 if r.peak_mb else "")
                              + (f"  faults {_faults(r)}" if r.faults else "")
                              + "".join(f"  fused/{n} {r.fused_over(n):.2f}x" for n in (r.extra_ms or {})),
                              flush=True)
    summary = summarise(rows)
    print()
    print("\n".join(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": args.dtype,
                       "machine": machine(rows), "commit": commit(),
                       "tf32": torch.backends.cudnn.allow_tf32, "timing": "cuda_graph" if args.gpu_time else "eager",
                       "layout": "channels_last" if args.channels_last else "contiguous",
                       "repeats": repeats, "cpu_count": os.cpu_count(), "glibc": _glibc_env(), "rows": [dict(asdict(r), **{"pass": r.pass_}) for r in rows],
                       "summary": summary, "peer_summary": peer_summary(rows)}, f, indent=1)
    why_not = None
    if args.plot:
        why_not = plot(rows, args.plot)
        print(f"plot: skipped, {why_not}" if why_not else f"plot: wrote {args.plot}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows, summary, repeats, args, argv, None if why_not or not args.plot else args.plot))
        print(f"markdown: wrote {args.markdown}")
    return 0


def _glibc_env() -> Dict[str, str]:
    """The glibc allocator settings of this run (they change how often fresh buffers page-fault on a CPU)."""
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"}


def _faults(r: Row) -> str:
    return "/".join(f"{r.faults[n]:.0f}" for n in ("plain", "reference", "fused", "peer"))


def commit() -> str:
    """The checkout's commit (with '+changes' when the tree differs from it), or '' outside a git checkout;
    PCONV_COMMIT names it for a copy of the tree without its .git (a lent GPU machine's)."""
    import subprocess
    if os.environ.get("PCONV_COMMIT"):
        return os.environ["PCONV_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+changes" if head and dirty else "")


def machine(rows: List[Row]) -> str:
    """The machine in words: CPU cores, and the GPU when CUDA rows were measured."""
    words = f"{os.cpu_count()} CPU cores"
    if any(r.device.startswith("cuda") for r in rows) and torch.cuda.is_available():
        words += f", {torch.cuda.get_device_name()}"
    return words


def markdown(rows: List[Row], summary: List[str], repeats: int, args, argv, plot_path: Optional[str]) -> str:
    """The measured table as Markdown, with how it was made (the command, torch, threads, machine)."""
    import platform
    cmd = "python benchmarks/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = [f"# Layer benchmark: fused vs plain conv, unfused reference and pure-PyTorch peer ({rows[0].device if rows else ''})",
           "",
           f"Generated by `{cmd.strip()}` on {time.strftime('%Y-%m-%d')} at commit {commit() or '(unknown)'}: "
           f"torch {torch.__version__}, "
           f"{torch.get_num_threads()} CPU threads ({platform.processor() or platform.machine()}), dtype {args.dtype}"
           f"{' (channels_last)' if args.channels_last else ''}, "
           f"median of {repeats} interleaved repeats per variant, glibc settings {_glibc_env() or 'default'}. "
           f"MEASURED on this machine ({machine(rows)}); on a shared machine single cases are noisy (compare medians "
           f"over layers). "
           + ("CUDA times are replays of each call captured in a CUDA graph: GPU time without host work. "
              if args.gpu_time else
              "CUDA times are CUDA events around each eager call: for small layers they include the host's launch "
              "work as much as kernel time. ")
           + (f"TF32 {'on' if torch.backends.cudnn.allow_tf32 else 'off'} for cuDNN. " if args.dtype == "float32"
              else "")
           + "Ratios: fused/plain and fused/peer < 1 and ref/fused > 1 mean the fused op is faster."
           + (" Page faults: the median number of minor page faults per call (plain/ref/fused/peer), first touches "
              "of freshly allocated memory; on a CPU they are a large part of a layer's time, and how many a call "
              "takes depends on the allocator's state (glibc returns freed memory at the heap top to the OS), so "
              "they explain much of the spread between runs." if any(r.faults for r in rows) else ""), ""]
    if plot_path:
        out += [f"![per-layer ratios]({os.path.relpath(plot_path, os.path.dirname(os.path.abspath(args.markdown)))})",
                ""]
    extra = [n for n, _, _ in COMPILED if any(r.extra_ms and n in r.extra_ms for r in rows)]
    out += ["```", *summary, "```", "",
            "| device | layer | shape | mask | N | pass | plain ms | ref ms | fused ms | peer ms | fused/plain | "
            "ref/fused | fused/peer | " + "".join(f"fused/{n} | " for n in extra) + "page faults |",
            "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(extra) + "---:|"]
    for r in rows:
        ratios = "".join(f"{r.fused_over(n):.2f} | " if r.fused_over(n) is not None else "- | " for n in extra)
        out.append(f"| {r.device} | {r.layer} | {r.shape} | {r.mask} | {r.batch} | {r.pass_} | {r.plain_ms:.2f} | "
                   f"{r.reference_ms:.2f} | {r.fused_ms:.2f} | {r.peer_ms:.2f} | {r.fused_over_plain:.2f} | "
                   f"{r.reference_over_fused:.2f} | {r.fused_over_peer:.2f} | {ratios}"
                   f"{_faults(r) if r.faults else '-'} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
