"""Per-kernel resource and instruction report of the built CUDA library, read from its sm_90 SASS (no GPU needed).

For each kernel: registers, stack (spills show as stack or local memory), shared memory, SASS instructions,
runtime integer-division sites (each 32-bit division expands to an I2F.U32.RP + MUFU.RCP sequence; 64-bit ones
call a subroutine with the same sequence), 128-bit global loads and stores (vectorised access) and tensor-core
instructions (HMMA). Uses cuobjdump from the CUDA toolkit, or the copy inside the triton wheel.

    python benchmarks/sass_report.py [--arch sm_90] [--so PATH] [--markdown]
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict


def find_cuobjdump() -> str:
    for candidate in (shutil.which("cuobjdump"), "/usr/local/cuda/bin/cuobjdump"):
        if candidate and os.path.exists(candidate):
            return candidate
    import triton  # noqa: F401  (ships cuobjdump for its own use)
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(path):
        return path
    sys.exit("sass_report: no cuobjdump found (CUDA toolkit or the triton wheel)")


def find_library() -> str:
    import pconv_cuda
    found = glob.glob(os.path.join(os.path.dirname(pconv_cuda.__file__), "_C*.so"))
    if not found:
        sys.exit("sass_report: pconv_cuda._C not found")
    return found[0]


def short_name(mangled: str) -> str:
    """mask_pass_nchw_kernel<float, bool, 4> style names, from the Itanium mangling (good enough for a report)."""
    m = re.search(r"pconv4cuda\d+(\w+?kernel)I(.*)E(?:EEv|Ev)", mangled)
    if not m:
        return mangled[:60]
    name, args = m.group(1), m.group(2)
    types = {"f": "float", "d": "double", "b": "bool", "h": "uint8", "N3c104HalfE": "half",
             "N3c108BFloat16E": "bf16", "S3_": "=", "S2_": "="}
    out = []
    for token in re.finditer(r"N3c104HalfE|N3c108BFloat16E|S\d_|Li(\d+)E|[fdbh]", args):
        t = token.group(0)
        out.append(token.group(1) if token.group(1) else types.get(t, "="))
    return f"{name}<{', '.join(out)}>"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--so", default=None)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    tool, so = find_cuobjdump(), args.so or find_library()

    res = subprocess.run([tool, "-res-usage", "-arch", args.arch, so], capture_output=True, text=True).stdout
    usage = {}
    for fn, body in re.findall(r"Function (\S+):\n\s*(REG:.*)", res):
        fields = dict(re.findall(r"(\w+):(\d+)", body))
        usage[fn] = fields
    sass = subprocess.run([tool, "-sass", "-arch", args.arch, so], capture_output=True, text=True).stdout
    stats = defaultdict(lambda: defaultdict(int))
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s+Function : (\S+)", line)
        if m:
            current = m.group(1)
            continue
        if current is None or not re.match(r"\s+/\*[0-9a-f]{4,}\*/", line):
            continue
        s = stats[current]
        s["instructions"] += 1
        s["divisions"] += "I2F.U32.RP" in line or "I2F.U64.RP" in line
        s["ldg128"] += "LDG.E.128" in line or "LDG.E.ENL2.256" in line
        s["stg128"] += "STG.E.128" in line
        s["hmma"] += "HMMA" in line
    rows = []
    for fn in sorted(set(usage) | set(stats)):
        u, s = usage.get(fn, {}), stats.get(fn, {})
        rows.append((short_name(fn), u.get("REG", "?"), u.get("STACK", "?"), u.get("LOCAL", "?"), u.get("SHARED", "?"),
                     s.get("instructions", 0), s.get("divisions", 0), s.get("ldg128", 0), s.get("stg128", 0),
                     s.get("hmma", 0)))
    head = ("kernel", "regs", "stack", "local", "shared B", "SASS instr", "int div sites", "LDG.128", "STG.128", "HMMA")
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|---" + "|---:" * (len(head) - 1) + "|")
        for r in rows:
            print("| " + " | ".join(str(v) for v in r) + " |")
    else:
        print(f"{head[0]:48s}" + "".join(f"{h:>11s}" for h in head[1:]))
        for r in rows:
            print(f"{r[0][:48]:48s}" + "".join(f"{v!s:>11s}" for v in r[1:]))
    spills = [r[0] for r in rows if r[2] not in ("0", "?") or r[3] not in ("0", "?")]
    print(f"\n{len(rows)} kernels ({args.arch}); spilling: {', '.join(spills) if spills else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
