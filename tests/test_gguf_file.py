"""gb10exp's GGUF header reader against gguf-py's GGUFReader (the reference), on the embedded model's file and
on files written by gguf-py's GGUFWriter with every value type, in both byte orders; broken files refused."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFEndian, GGUFReader, GGUFWriter

from gb10exp.models import EMBEDDED, embedded_file
from gb10exp.models.gguf_file import read_gguf


def reference(path: Path) -> tuple[dict, list]:
    """What GGUFReader reads: the fields (without its GGUF.* header pseudo-fields) and the tensors."""
    reader = GGUFReader(str(path))
    fields = {}
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            value = field.contents()
            fields[key] = tuple(value) if isinstance(value, list) else value
    tensors = [(t.name, int(t.tensor_type), tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes))
               for t in reader.tensors]
    return fields, tensors


def ours(path: Path) -> tuple[dict, list]:
    gguf = read_gguf(path)
    return gguf.fields, [(t.name, t.ggml_type, t.shape, gguf.data_start + t.offset, t.n_bytes) for t in gguf.tensors]


def close(a, b) -> bool:
    """Equal, floats to float32 precision (GGUFReader hands float32 values as Python floats too)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return a == pytest.approx(b, rel=1e-6)
    return a == b


def test_the_embedded_models_file_reads_as_gguf_py_reads_it():
    path = embedded_file(EMBEDDED)
    (ref_fields, ref_tensors), (fields, tensors) = reference(path), ours(path)
    assert tensors == ref_tensors and len(tensors) == 272
    assert list(fields) == list(ref_fields)
    assert all(close(fields[k], ref_fields[k]) for k in fields), [k for k in fields if not close(fields[k], ref_fields[k])]
    assert len(fields["tokenizer.ggml.tokens"]) == 49152 and fields["general.architecture"] == "llama"
    assert read_gguf(path).arch_int("context_length") == 8192


@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_every_value_type_in_either_byte_order(tmp_path, endian):
    path = tmp_path / "all.gguf"
    writer = GGUFWriter(str(path), "llama", endianess=endian)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "naïve ✓")
    writer.add_array("t.ints", [1, 2, 3])
    writer.add_array("t.strs", ["a", "", "ü"])
    writer.add_uint32("llama.context_length", 4096)
    writer.add_tensor("w", np.arange(48, dtype=np.float32).reshape(3, 16))
    writer.add_tensor("h", np.ones((2, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    (ref_fields, ref_tensors), (fields, tensors) = reference(path), ours(path)
    assert tensors == ref_tensors and [t[0] for t in tensors] == ["w", "h"]
    assert [t[4] for t in tensors] == [48 * 4, 64 * 2]
    assert list(fields) == list(ref_fields)
    assert all(close(fields[k], ref_fields[k]) for k in fields), [(k, fields[k], ref_fields[k]) for k in fields]
    assert fields["t.u64"] == 2**63 + 5 and fields["t.str"] == "naïve ✓" and fields["t.strs"] == ("a", "", "ü")
    assert read_gguf(path).arch_int("context_length") == 4096


def test_broken_files_are_refused_and_a_rewritten_file_is_read_again(tmp_path):
    path = tmp_path / "m.gguf"
    shutil.copyfile(embedded_file(EMBEDDED), path)
    size = path.stat().st_size
    assert len(read_gguf(path).tensors) == 272

    with open(path, "r+b") as f:  # a download cut short: the last tensor's data is missing
        f.truncate(size - 1000)
    with pytest.raises(ValueError, match=r"^tensor '[\w.]+' runs past the end of the file: the file is truncated$"):
        read_gguf(path)
    with open(path, "r+b") as f:  # cut inside the vocabulary
        f.truncate(100_000)
    with pytest.raises(ValueError, match=r"^the GGUF header ends before the end of its records: the file is truncated$"):
        read_gguf(path)
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"^not a GGUF file \(no GGUF magic\)$"):
        read_gguf(path)
    path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + bytes(100))
    with pytest.raises(ValueError, match=r"^GGUF version 1 is not supported \(2 and 3 are\)$"):
        read_gguf(path)
