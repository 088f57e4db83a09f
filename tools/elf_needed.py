"""ELF DT_NEEDED reader and libstdc++ check for setup.py: stdlib only, in tools/ so it stays out of the wheel."""
from __future__ import annotations

import os
import struct
from typing import List, Optional

# Set to 1 to turn check_dynamic_libstdcxx's build error into a warning.
ALLOW_ENV = "PCONV_ALLOW_STATIC_LIBSTDCXX"

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_STRSZ = 0, 1, 5, 10
# Per ELF class (1: 32-bit, 2: 64-bit): header, program header and dynamic entry layouts, and where the program
# header's (type, offset, vaddr, filesz) fields sit (p_flags moves between the two classes).
_LAYOUTS = {
    1: ("16sHHIIIIIHHHHHH", "IIIIIIII", "iI", (0, 1, 2, 4)),
    2: ("16sHHIQQQIHHHHHH", "IIQQQQQQ", "qQ", (0, 2, 3, 5)),
}


def _read(f, offset: int, size: int) -> bytes:
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise ValueError(f"truncated ELF file: wanted {size} bytes at offset {offset}, got {len(data)}")
    return data


def needed_libraries(path) -> Optional[List[str]]:
    """The DT_NEEDED entries of an ELF file, in order, read from its PT_DYNAMIC segment as the dynamic loader does
    (so a stripped file works too). None when the file is not ELF; [] for an ELF file with no dynamic segment.
    Raises ValueError for a malformed ELF file, OSError when the file cannot be read."""
    with open(path, "rb") as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF":
            return None
        if ident[4] not in _LAYOUTS or ident[5] not in (1, 2):
            raise ValueError(f"{path}: unsupported ELF class {ident[4]} / data encoding {ident[5]}")
        header_fmt, phdr_fmt, dyn_fmt, (i_type, i_offset, i_vaddr, i_filesz) = _LAYOUTS[ident[4]]
        endian = "<" if ident[5] == 1 else ">"
        header = struct.unpack(endian + header_fmt, _read(f, 0, struct.calcsize(header_fmt)))
        phoff, phentsize, phnum = header[5], header[9], header[10]
        phdr_size = struct.calcsize(phdr_fmt)
        if phnum and phentsize < phdr_size:
            raise ValueError(f"{path}: program header entries of {phentsize} bytes, expected {phdr_size}")

        loads, dynamic = [], None
        for i in range(phnum):
            ph = struct.unpack(endian + phdr_fmt, _read(f, phoff + i * phentsize, phdr_size))
            if ph[i_type] == _PT_LOAD:
                loads.append((ph[i_vaddr], ph[i_offset], ph[i_filesz]))
            elif ph[i_type] == _PT_DYNAMIC:
                dynamic = (ph[i_offset], ph[i_filesz])
        if dynamic is None:
            return []

        dyn_size = struct.calcsize(dyn_fmt)
        entries = []
        raw = _read(f, dynamic[0], dynamic[1] - dynamic[1] % dyn_size)
        for tag, value in struct.iter_unpack(endian + dyn_fmt, raw):
            if tag == _DT_NULL:
                break
            entries.append((tag, value))
        tags = dict(entries)  # the last of each tag; only DT_STRTAB and DT_STRSZ are read from it
        needed = [value for tag, value in entries if tag == _DT_NEEDED]
        if not needed:
            return []
        if _DT_STRTAB not in tags:
            raise ValueError(f"{path}: DT_NEEDED entries but no DT_STRTAB")

        # DT_STRTAB is a virtual address: the PT_LOAD segment holding it gives its place in the file.
        address = tags[_DT_STRTAB]
        for vaddr, offset, filesz in loads:
            if vaddr <= address < vaddr + filesz:
                strtab, available = offset + address - vaddr, vaddr + filesz - address
                break
        else:
            raise ValueError(f"{path}: DT_STRTAB 0x{address:x} is in no PT_LOAD segment")
        strings = _read(f, strtab, min(tags.get(_DT_STRSZ, available), available))

    names = []
    for name_offset in needed:
        end = strings.find(b"\0", name_offset)
        if name_offset >= len(strings) or end < 0:
            raise ValueError(f"{path}: DT_NEEDED name offset {name_offset} outside .dynstr ({len(strings)} bytes)")
        names.append(strings[name_offset:end].decode("utf-8", "replace"))
    return names


def _libstdcxx(names: List[str]) -> Optional[str]:
    return next((n for n in names if n.startswith("libstdc++.so")), None)


def check_dynamic_libstdcxx(so_path, reference_so_path, compiler: str) -> Optional[str]:
    """The build error for a shared object that links libstdc++ statically while the reference (torch's libc10.so)
    links it dynamically, or None: both dynamic, the reference without libstdc++ (e.g. libc++), or either file not
    ELF (macOS, Windows) or absent (the reference)."""
    needed = needed_libraries(so_path)
    if needed is None or _libstdcxx(needed):
        return None
    if not os.path.exists(reference_so_path):
        return None
    reference = needed_libraries(reference_so_path)
    if reference is None or not _libstdcxx(reference):
        return None
    return (
        f"pconv_cuda: {so_path} has libstdc++ linked in statically: its DT_NEEDED entries "
        f"({', '.join(needed) or 'none'}) have no libstdc++.so, while torch's {os.path.basename(reference_so_path)} "
        f"needs {_libstdcxx(reference)}. The C++ compiler {compiler} links libstdc++ statically into shared objects "
        f"(its default, a specs file, or -static-libstdc++ in the flags). Imported next to torch, the process "
        f"would hold two C++ runtimes, and the first error message that formats a number (every argument check "
        f"does) would crash Python with a segmentation fault instead of raising RuntimeError. Fix: build with a "
        f"compiler that links libstdc++ dynamically, e.g. the system one (CXX=g++ CC=gcc pip install "
        f"--no-build-isolation .), or remove -static-libstdc++ from LDFLAGS / CXXFLAGS. If you know that no other "
        f"libstdc++ is loaded in the process, {ALLOW_ENV}=1 turns this error into a warning."
    )
