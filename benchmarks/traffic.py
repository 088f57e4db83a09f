"""Memory traffic and kernel launches of one partial-conv forward, per route, for the U-Net layers: COMPUTED from
the algorithms, not measured (no GPU was available to this project).

Model: every pass reads its operands once and writes its result once (caches ignored; broadcast operands counted
at their own size); the convolution counts its input, weight and output once, the same in every column, so the
differences are the passes around it. fp32, 256x256 U-Net (layer_size 7), batch 1.

  reference  NVIDIA's layer: ones-kernel conv for S ((C_out or 1) channels), +eps, divide, clamp, ratio*U, X*M,
             conv with bias, -b, *ratio, +b, *U: 10 launches; S, ratio and U are (N, C_out, H', W') multi-channel
  vendor     mask kernel (S, ratio, U as one (N, 1, H', W') map each), X*M kernel, cuDNN conv, epilogue: 3 + conv
  one-pass   one implicit-GEMM kernel: X, M and W in; Y, ratio and U out

    python benchmarks/traffic.py [--batch N] [--markdown]
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import unet_layers  # noqa: E402


def traffic(layer, batch: int, multi: bool):
    n, cin, cout, k, s, h = batch, layer.c_in, layer.c_out, layer.k, layer.stride, layer.size
    ho = (h + 2 * (k // 2) - (k - 1) - 1) // s + 1
    X, Y, W = n * cin * h * h, n * cout * ho * ho, cout * cin * k * k
    M = n * (cin if multi else 1) * h * h
    P = n * ho * ho                         # one per-pixel map
    Sm = n * (cout if multi else 1) * ho * ho  # the reference's S / ratio / U maps
    conv = X + W + Y
    ref = [
        M + Sm,          # ones conv -> S
        2 * Sm,          # S + eps
        2 * Sm,          # win / (S + eps)
        2 * Sm,          # clamp -> U
        3 * Sm,          # ratio * U
        X + M + X,       # X * M
        conv,            # conv (with bias)
        2 * Y,           # - b
        2 * Y + Sm,      # * ratio
        2 * Y,           # + b
        2 * Y + Sm,      # * U
    ]
    vendor = [M + 2 * P, X + M + X, conv, 2 * Y + 2 * P]
    one_pass = [X + M + W + Y + 2 * P]
    return {"reference": (sum(ref) * 4, 10), "vendor": (sum(vendor) * 4, 3), "one_pass": (sum(one_pass) * 4, 1),
            "conv": (conv * 4, 0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    mb = 2 ** 20
    rows = []
    totals = {}
    for multi in (False, True):
        for layer in unet_layers():
            t = traffic(layer, args.batch, multi)
            rows.append((layer.name, "multi" if multi else "single", t))
            for key, (b, launches) in t.items():
                tb, tl = totals.get((multi, key), (0, 0))
                totals[(multi, key)] = (tb + b, tl + launches)
    if args.markdown:
        print("| layer | mask | plain conv MB | reference MB (launches+conv) | vendor MB | one-pass MB |")
        print("|---|---|---:|---:|---:|---:|")
        for name, mask, t in rows:
            print(f"| {name} | {mask} | {t['conv'][0] / mb:.1f} | {t['reference'][0] / mb:.1f} (10+1) | "
                  f"{t['vendor'][0] / mb:.1f} (3+1) | {t['one_pass'][0] / mb:.1f} (1) |")
        for multi in (False, True):
            c, r, v, o = (totals[(multi, k)][0] / mb for k in ("conv", "reference", "vendor", "one_pass"))
            print(f"| **U-Net total** | {'multi' if multi else 'single'} | {c:.0f} | {r:.0f} | {v:.0f} | {o:.0f} |")
    else:
        print(f"{'layer':6s} {'mask':6s} {'conv MB':>8s} {'ref MB':>8s} {'vendor MB':>9s} {'1-pass MB':>9s}")
        for name, mask, t in rows:
            print(f"{name:6s} {mask:6s} {t['conv'][0] / mb:8.1f} {t['reference'][0] / mb:8.1f} "
                  f"{t['vendor'][0] / mb:9.1f} {t['one_pass'][0] / mb:9.1f}")
        print("launches per layer: reference 10 + conv, vendor 3 + conv, one-pass 1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
