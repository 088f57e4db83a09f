"""setup.py's libstdc++ guard (tools/elf_needed.py): a compiler that links libstdc++ statically gives the extension a
second C++ runtime next to torch's, which segfaults on the first error message that formats a number. The ELF
reader against the installed extension, g++-built objects and synthetic files; the guard's verdicts and message."""
from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess

import pytest
import torch

from helpers import load_example

elf = load_example("tools/elf_needed.py")
LIBC10 = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
COMPILER = "/opt/gcc/bin/g++"  # any name: the message must repeat it

# What crashed: a long formatted into an ostringstream (TORCH_CHECK's message) by a private libstdc++.
SOURCE = """#include <sstream>
#include <string>
std::string describe(long n) {
    std::ostringstream s; s << "got " << n; return s.str();
}
"""


def needs_libstdcxx(names):
    return any(n.startswith("libstdc++.so") for n in names)


@pytest.fixture(scope="module")
def shared_objects(tmp_path_factory):
    """(dyn.so, static.so) built by the system g++ from SOURCE, without and with -static-libstdc++."""
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not on PATH")
    folder = tmp_path_factory.mktemp("libstdcxx")
    (folder / "x.cpp").write_text(SOURCE)

    def link(name, *flags):
        return subprocess.run([gxx, "-shared", "-fPIC", *flags, "x.cpp", "-o", name], cwd=folder,
                              capture_output=True, text=True, timeout=120)

    dynamic = link("dyn.so")
    assert dynamic.returncode == 0, dynamic.stderr
    static = link("static.so", "-static-libstdc++")
    if static.returncode != 0:
        pytest.skip(f"g++ -static-libstdc++ failed (libstdc++.a absent?): {static.stderr[-400:]}")
    return folder / "dyn.so", folder / "static.so"


@pytest.fixture(scope="module")
def torch_needs_libstdcxx():
    if not os.path.exists(LIBC10):
        pytest.skip(f"no {LIBC10}")
    assert "libstdc++.so.6" in elf.needed_libraries(LIBC10)


@pytest.mark.parametrize("module", ["pconv_cuda._C", "pconv_cuda._emu"])
def test_installed_extension_needs_libstdcxx_and_libc10(module, torch_needs_libstdcxx):
    try:
        spec = importlib.util.find_spec(module)
    except ImportError as e:
        pytest.skip(f"pconv_cuda is not importable: {e}")
    if spec is None or not spec.origin:
        pytest.skip(f"{module} is not built")
    needed = elf.needed_libraries(spec.origin)
    assert "libstdc++.so.6" in needed and "libc10.so" in needed, needed
    assert elf.check_dynamic_libstdcxx(spec.origin, LIBC10, COMPILER) is None


def test_reader_tells_static_from_dynamic_libstdcxx(shared_objects):
    dynamic, static = (elf.needed_libraries(p) for p in shared_objects)
    assert "libstdc++.so.6" in dynamic, dynamic
    assert not needs_libstdcxx(static), static
    assert static, "static.so's DT_NEEDED entries (libc at least) were not found"


def test_guard_rejects_static_libstdcxx_naming_compiler_and_fix(shared_objects, torch_needs_libstdcxx):
    dynamic, static = shared_objects
    assert elf.check_dynamic_libstdcxx(dynamic, LIBC10, COMPILER) is None
    message = elf.check_dynamic_libstdcxx(static, LIBC10, COMPILER)
    assert message is not None
    for part in (COMPILER, str(static), "statically", "two C++ runtimes", "segmentation fault", "CXX=g++ CC=gcc",
                 "-static-libstdc++", "PCONV_ALLOW_STATIC_LIBSTDCXX=1"):
        assert part in message, part
    # Only a reference that needs libstdc++ makes a static one an error (e.g. not a torch built with libc++).
    assert elf.check_dynamic_libstdcxx(static, static, COMPILER) is None


def test_non_elf_and_missing_reference_are_skipped(tmp_path, shared_objects):
    text = tmp_path / "not_elf.so"
    text.write_bytes(b"MZ\x90\x00 not an ELF file")
    assert elf.needed_libraries(text) is None
    empty = tmp_path / "empty.so"
    empty.write_bytes(b"")
    assert elf.needed_libraries(empty) is None
    assert elf.check_dynamic_libstdcxx(text, LIBC10, COMPILER) is None
    _, static = shared_objects
    assert elf.check_dynamic_libstdcxx(static, tmp_path / "absent.so", COMPILER) is None
    assert elf.check_dynamic_libstdcxx(static, text, COMPILER) is None


def synthetic_elf(bits: int, byteorder: str, needed) -> bytes:
    """A minimal ELF shared object: header, a PT_LOAD mapping the whole file at 0x10000 (so DT_STRTAB, a virtual
    address, is not a file offset), PT_DYNAMIC, .dynstr, .dynamic."""
    e = "<" if byteorder == "little" else ">"
    header_fmt, phdr_fmt, dyn_fmt = {32: ("16sHHIIIIIHHHHHH", "IIIIIIII", "iI"),
                                     64: ("16sHHIQQQIHHHHHH", "IIQQQQQQ", "qQ")}[bits]
    ehsize, phentsize = struct.calcsize(header_fmt), struct.calcsize(phdr_fmt)
    base = 0x10000
    strtab = b"\0" + b"".join(n.encode() + b"\0" for n in needed)
    strtab_off = ehsize + 2 * phentsize
    dyn_off = (strtab_off + len(strtab) + 7) // 8 * 8
    name_offsets = [1 + sum(len(n) + 1 for n in needed[:i]) for i in range(len(needed))]
    entries = [(1, o) for o in name_offsets] + [(5, base + strtab_off), (10, len(strtab)), (0, 0)]
    dynamic = b"".join(struct.pack(e + dyn_fmt, tag, value) for tag, value in entries)
    size = dyn_off + len(dynamic)

    def phdr(p_type, offset, filesz):
        vaddr = base + offset
        if bits == 32:  # type, offset, vaddr, paddr, filesz, memsz, flags, align
            return struct.pack(e + phdr_fmt, p_type, offset, vaddr, vaddr, filesz, filesz, 6, 4)
        return struct.pack(e + phdr_fmt, p_type, 6, offset, vaddr, vaddr, filesz, filesz, 8)  # flags after type

    ident = b"\x7fELF" + bytes([bits // 32, 1 if byteorder == "little" else 2, 1]) + bytes(9)
    header = struct.pack(e + header_fmt, ident, 3, 62, 1, 0, ehsize, 0, 0, ehsize, phentsize, 2, 0, 0, 0)
    out = header + phdr(1, 0, size) + phdr(2, dyn_off, len(dynamic)) + strtab
    return out + bytes(dyn_off - len(out)) + dynamic


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_reader_on_synthetic_elf(tmp_path, bits, byteorder):
    needed = ["libc10.so", "libstdc++.so.6", "libc.so.6"]
    data = synthetic_elf(bits, byteorder, needed)
    path = tmp_path / "x.so"
    path.write_bytes(data)
    assert elf.needed_libraries(path) == needed
    path.write_bytes(synthetic_elf(bits, byteorder, []))
    assert elf.needed_libraries(path) == []
    for cut in (30, len(data) - 12):  # inside the header; inside .dynamic
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            elf.needed_libraries(path)
