#!/usr/bin/env python3
"""Compares the kernels of two cubins instruction for instruction (no disassembler needed).

A change meant to leave a kernel's machine code alone (a new template flag, a refactor) is
checked by compiling the file before and after for one architecture and comparing:

  nvcc -I<tree> -O3 -DNDEBUG -arch=sm_90 -std=c++17 -x cu -cubin kernels/cuda/w4a16.cu -o a.cubin
  cubin_compare.py before.cubin after.cubin [KERNEL]

Prints one line per kernel (keyed by name and template arguments, not by parameter list):
IDENTICAL, differs (instruction counts), or only in one file. With KERNEL (a key as printed),
also the offsets of its first differing 16-byte instructions. Exit status 0 always.
"""
import re
import struct
import sys


def kernels(path):
    data = open(path, "rb").read()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = headers[shstrndx][4]
    out = {}
    for name, _type, _flags, _addr, offset, size in headers:
        section = data[names_at + name:data.index(b"\0", names_at + name)].decode()
        if not section.startswith(".text."):
            continue
        # The mangled name up to the end of its template arguments: the parameter list may
        # change (a new argument) without the code changing.
        # The anonymous namespace's hash (which differs between source trees) is dropped.
        found = re.findall(r"\d([A-Z]\w*?Kernel(?:I[A-Za-z0-9_]*?EE)?)", section)
        out[found[-1] if found else section] = data[offset:offset + size]
    return out


def main(before_path, after_path, detail=None):
    before, after = kernels(before_path), kernels(after_path)
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a is None or b is None:
            print(f"{key}: only in {'after' if a is None else 'before'}")
        else:
            verdict = "IDENTICAL" if a == b else "differs"
            print(f"{key}: {verdict} ({len(a) // 16} vs {len(b) // 16} instructions)")
    if detail in before and detail in after:
        a, b = before[detail], after[detail]
        diffs = [i for i in range(0, min(len(a), len(b)), 16) if a[i:i + 16] != b[i:i + 16]]
        print(f"{detail}: {len(diffs)} differing instructions, first at "
              + ", ".join(hex(i) for i in diffs[:12]))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(*sys.argv[1:4])
