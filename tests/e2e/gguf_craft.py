"""Crafted GGUF files for hostile-input tests: a real model's file with one field rewritten, or
a header written field by field so that any field can lie."""
import struct
from pathlib import Path

SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _skip_value(data: bytes, pos: int, ty: int) -> int:
    if ty in SIZES:
        return pos + SIZES[ty]
    if ty == 8:
        (n,) = struct.unpack_from("<Q", data, pos)
        return pos + 8 + n
    if ty == 9:
        elem, n = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if elem in SIZES:
            return pos + n * SIZES[elem]
        for _ in range(n):
            pos = _skip_value(data, pos, elem)
        return pos
    raise ValueError(f"GGUF type {ty}")


def tensor_info_at(data: bytes, name: str) -> int:
    """The byte offset of tensor `name`'s dimension count in a GGUF v3 file."""
    magic, _version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", data, 0)
    assert magic == b"GGUF"
    pos = 24
    for _ in range(n_kv):
        (klen,) = struct.unpack_from("<Q", data, pos)
        pos += 8 + klen
        (ty,) = struct.unpack_from("<I", data, pos)
        pos = _skip_value(data, pos + 4, ty)
    for _ in range(n_tensors):
        (nlen,) = struct.unpack_from("<Q", data, pos)
        tname = data[pos + 8:pos + 8 + nlen].decode()
        pos += 8 + nlen
        if tname == name:
            return pos
        (ndims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * ndims + 4 + 8
    raise KeyError(name)


def with_rows(model: Path, out: Path, name: str, rows: int, dtype: int | None = None) -> Path:
    """`model` with tensor `name` claiming `rows` rows (and type `dtype`), nothing else changed."""
    data = bytearray(model.read_bytes())
    at = tensor_info_at(data, name)
    (ndims,) = struct.unpack_from("<I", data, at)
    assert ndims == 2
    struct.pack_into("<Q", data, at + 4 + 8, rows)
    if dtype is not None:
        struct.pack_into("<I", data, at + 4 + 16, dtype)
    out.write_bytes(data)
    return out


def without_dims(model: Path, out: Path, name: str) -> Path:
    """`model` with tensor `name` written with 0 dimensions."""
    data = bytearray(model.read_bytes())
    at = tensor_info_at(data, name)
    (ndims,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at, 0)
    del data[at + 4:at + 4 + 8 * ndims]
    out.write_bytes(data)
    return out


def header(kvs: list[bytes], n_tensors: int = 0) -> bytes:
    """A GGUF v3 header holding the given encoded key-value entries."""
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs)


def kv(key: str, ty: int, value: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", ty) + value
