"""What a GGUF file declares, its metadata and its tensors' extents, read once per file state.

Every part of gb10exp that looks inside a GGUF (the model's context length, whether the file is whole, its
vocabulary, its declared type, its tensor bytes) asks ``read_gguf``. gguf-py's ``GGUFReader`` builds a NumPy
view of every part of every value: on SmolLM2's 49,152-token vocabulary and 48,900 merges that is a million
views, 2.0-2.5 s per read on these CPUs, and several of those five places ran in every llama.cpp job. This
parser walks the same header with ``struct`` (0.07 s for that file), keeps the sizes of
gguf-py's own table of tensor types, and is cached per (path, size, mtime), so a file changed on disk is
read again.

The layout (GGUF v2 and v3, either byte order): magic ``GGUF``, version (uint32), tensor count and key-value
count (uint64); the key-value pairs (key: uint64 length + UTF-8 bytes; value type: uint32; value); one record
per tensor (name, uint32 number of dimensions, uint64 per dimension, uint32 type, uint64 offset); then the
tensor data, from the header's end rounded up to ``general.alignment`` (32 unless it says otherwise).
"""

from __future__ import annotations

import functools
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# GGUF value types -> struct format of one scalar (8: string, 9: array, handled apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Tensor:
    name: str
    ggml_type: int  # gguf.GGMLQuantizationType's value
    shape: tuple[int, ...]  # GGUF's order: the fastest-varying dimension first
    offset: int  # from the start of the tensor data
    n_bytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: str
    version: int
    fields: dict[str, Any]  # scalars as int/float/bool/str, arrays as tuples
    tensors: tuple[Tensor, ...]
    data_start: int  # where the tensor data begins in the file

    @property
    def arch(self) -> str | None:
        """``general.architecture``: the prefix of the model's own keys (llama.context_length, ...)."""
        return self.fields.get("general.architecture")

    def arch_int(self, key: str) -> int | None:
        """``{arch}.{key}`` as an int, or None where the file does not say."""
        value = self.fields.get(f"{self.arch}.{key}") if self.arch else None
        return int(value) if value is not None else None


def read_gguf(path: str | Path) -> GGUFFile:
    """The file's header. Raises ValueError for a file that is not a GGUF, a header cut short or a tensor
    whose data would run past the end of the file (a truncated download)."""
    stat = Path(path).stat()
    return _read(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)  # an entry holds the file's whole vocabulary as strings
def _read(path: str, size: int, mtime_ns: int) -> GGUFFile:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError("not a GGUF file (no GGUF magic)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                return _Header(buf, path).parse()
            except (struct.error, IndexError):  # a read past the end of the file
                raise ValueError("the GGUF header ends before the end of its records: the file is truncated") from None


class _Header:
    def __init__(self, buf: mmap.mmap, path: str) -> None:
        self.buf, self.path, self.pos = buf, path, 4
        (version,) = struct.unpack_from("<I", buf, 4)
        # A big-endian file's version reads as a large number in little-endian order.
        self.order = "<" if version & 0xFFFF else ">"

    def many(self, fmt: str) -> tuple:
        values = struct.unpack_from(self.order + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(self.order + fmt)
        return values

    def take(self, fmt: str) -> Any:
        return self.many(fmt)[0]

    def string(self) -> str:
        n = self.take("Q")
        end = self.pos + n
        if end > len(self.buf):
            raise IndexError("string past the end of the file")
        text = self.buf[self.pos:end].decode("utf-8", errors="replace")
        self.pos = end
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, count = self.take("I"), self.take("Q")
            if item in _SCALARS:  # one unpack for the whole array
                return self.many(f"{count}{_SCALARS[item]}")
            return tuple(self.value(item) for _ in range(count))
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind}")
        return self.take(_SCALARS[kind])

    def parse(self) -> GGUFFile:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        version = self.take("I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_fields = self.many("QQ")
        fields = {}
        for _ in range(n_fields):
            key = self.string()
            fields[key] = self.value(self.take("I"))
        records = []
        for _ in range(n_tensors):
            name = self.string()
            shape = self.many(f"{self.take('I')}Q")
            records.append((name, shape, self.take("I"), self.take("Q")))
        alignment = int(fields.get("general.alignment", 32))
        data_start = -(-self.pos // alignment) * alignment
        tensors = []
        for name, shape, kind, offset in records:
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise ValueError(f"tensor {name!r} has a type ({kind}) this gguf package does not know") from None
            n_bytes = math.prod(shape) // block * block_bytes
            if data_start + offset + n_bytes > len(self.buf):
                raise ValueError(f"tensor {name!r} runs past the end of the file: the file is truncated")
            tensors.append(Tensor(name, kind, shape, offset, n_bytes))
        return GGUFFile(self.path, version, fields, tuple(tensors), data_start)
