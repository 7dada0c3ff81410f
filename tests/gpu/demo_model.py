#!/usr/bin/env python3
"""A model with the demo model's dimensions and tokenizer, made on the GPU machine (which has no
network and gets no model files): `pack` keeps the demo GGUF's header only, every tensor retyped
(F16 matrices, F32 vectors, new offsets), and `run` writes random weights after it.

    demo_model.py skeleton models/smollm2-135m-instruct/model.gguf OUT.gguf.xz   # here (pack)
    demo_model.py expand OUT.gguf.xz model.gguf [--seed 7]                        # GPU machine

The skeleton is the GGUF metadata (architecture, tokenizer, chat template) and tensor table, no
data: about 1 MiB compressed. `expand` needs numpy (PyTorch's machines have it).
"""
import argparse
import lzma
import struct
import sys
from pathlib import Path

SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q", 12: "d"}
F32, F16 = 0, 1


def _value_end(data, pos, ty):
    if ty in SCALAR:
        return pos + struct.calcsize("<" + SCALAR[ty])
    if ty == 8:
        (n,) = struct.unpack_from("<Q", data, pos)
        return pos + 8 + n
    if ty == 9:
        elem, n = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if elem in SCALAR:
            return pos + n * struct.calcsize("<" + SCALAR[elem])
        for _ in range(n):
            pos = _value_end(data, pos, elem)
        return pos
    raise ValueError(f"GGUF value type {ty} at byte {pos}")


def parse(data):
    """(kv bytes, number of kvs, alignment, [(name, dims, type, offset)], data start)."""
    magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    if magic != b"GGUF" or version != 3:
        raise ValueError(f"not a GGUF v3 file (magic {magic!r}, version {version})")
    pos, align = 24, 32
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", data, pos)
        key = data[pos + 8:pos + 8 + klen].decode()
        (ty,) = struct.unpack_from("<I", data, pos + 8 + klen)
        start = pos + 12 + klen
        if key == "general.alignment" and ty == 4:
            (align,) = struct.unpack_from("<I", data, start)
        pos = _value_end(data, start, ty)
    kv = data[24:pos]
    tensors = []
    for _ in range(n_tensors):
        (nlen,) = struct.unpack_from("<Q", data, pos)
        name = data[pos + 8:pos + 8 + nlen].decode()
        pos += 8 + nlen
        (nd,) = struct.unpack_from("<I", data, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", data, pos + 4))
        ty, off = struct.unpack_from("<IQ", data, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        tensors.append((name, dims, ty, off))
    return kv, n_kv, align, tensors, -(-pos // align) * align


def count(dims):
    n = 1
    for d in dims:
        n *= d
    return n


def skeleton(model, out):
    data = Path(model).read_bytes()[:64 << 20]  # the header is well inside the first 64 MiB
    kv, n_kv, align, tensors, _ = parse(data)
    table, off = b"", 0
    for name, dims, _, _ in tensors:
        ty = F16 if len(dims) > 1 else F32
        nb = name.encode()
        table += struct.pack("<Q", len(nb)) + nb + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ty, off)
        off += -(-count(dims) * (2 if ty == F16 else 4) // align) * align
    header = struct.pack("<4sIQQ", b"GGUF", 3, len(tensors), n_kv) + kv + table
    with lzma.open(out, "wb") as f:
        f.write(header)
    print(f"skeleton of {model}: {len(tensors)} tensors, {off / (1 << 20):.0f} MiB of weights as F16/F32, "
          f"header {len(header)} bytes -> {out}")


def expand(skel, out, seed=7):
    import numpy as np
    header = lzma.open(skel).read()
    _, _, align, tensors, start = parse(header)
    rng = np.random.default_rng(seed)
    with open(out, "wb") as f:
        f.write(header + b"\0" * (start - len(header)))
        for name, dims, ty, off in tensors:
            n = count(dims)
            if ty == F32:  # norm weights near 1, biases near 0
                x = (1.0 + 0.1 * rng.standard_normal(n) if "norm" in name else 0.02 * rng.standard_normal(n))
                raw = x.astype("<f4").tobytes()
            else:
                raw = (0.05 * rng.standard_normal(n)).astype("<f2").tobytes()
            f.seek(start + off)
            f.write(raw)
            f.write(b"\0" * (-len(raw) % align))
    return Path(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("skeleton")
    s.add_argument("model")
    s.add_argument("out")
    e = sub.add_parser("expand")
    e.add_argument("skeleton")
    e.add_argument("out")
    e.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    if a.cmd == "skeleton":
        skeleton(a.model, a.out)
    else:
        print(expand(a.skeleton, a.out, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
