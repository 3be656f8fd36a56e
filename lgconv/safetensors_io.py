"""Read safetensors files from untrusted sources: a bounded, validated header first, then the data.

The header (8-byte little-endian length, then JSON) is parsed with caps on its size, nesting and
item counts, and every tensor entry is checked (dtype, shape, offsets contiguous and inside the
file) before a byte of tensor data is read. The data is then memory-mapped (copy on write): a
tensor that starts at a multiple of ``ALIGNMENT`` in the file is a view of the mapping, any other is
read into its own allocation, so loading costs the file's own size and nothing more.
"""

from __future__ import annotations

import json
import math
import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

MAX_HEADER_BYTES = 100_000_000
# Tensors at this alignment are used in place: what ``torch.empty`` gives, so kernels take the same
# (bit-identical) paths as on a fresh model; at 8-byte alignment a condensed linear's outputs differ.
ALIGNMENT = 64
# Bounds on what a header may make the JSON parser build (Python objects cost ~50-150 bytes each).
_MAX_CONTAINERS = 1_000_000
_MAX_ITEMS = 4_000_000
_MAX_STRINGS = 4_000_000
_MAX_DIMS = 16
_MAX_INT = 2**53  # larger JSON integers are no size, offset or argument a real model has

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it: dtype, shape and byte range in the data section."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated safetensors header: tensors in file order, string metadata, where the data lies."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    data_size: int


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"non-finite number {text[:20]}")
    return value


def _int(text: str) -> int:
    if len(text) > 17 or abs(value := int(text)) > _MAX_INT:
        raise ValueError(f"absurd integer {text[:20]}")
    return value


def parse_json(raw: bytes | str, *, max_bytes: int) -> Any:
    """JSON with bounded size and object count; no duplicate keys, NaN, Infinity or integers over 2**53.

    Raises ``ValueError`` with the reason. Counting brackets before parsing keeps a hostile document
    from building millions of objects (characters inside strings only make the count stricter);
    depth is bounded by Python's recursion limit here and by the caller's check of the structure.
    """
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > max_bytes:
        raise ValueError(f"{len(data):,} bytes of JSON, more than the {max_bytes:,} allowed")
    if data.count(b"{") + data.count(b"[") > _MAX_CONTAINERS or data.count(b",") > _MAX_ITEMS:
        raise ValueError("more JSON objects than any model needs")
    if data.count(b'"') > 2 * _MAX_STRINGS:
        raise ValueError("more JSON strings than any model needs")
    try:
        return json.loads(
            data,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
            parse_float=_float,
            parse_int=_int,
        )
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON: {error.msg} at byte {error.pos}") from None


def _size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value > _MAX_INT:
        raise ValueError(f"{value!r} is not a size")
    return value


def _entry(name: str, value: Any) -> TensorEntry:
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor {name!r} is not {{dtype, shape, data_offsets}}")
    dtype = DTYPES.get(value["dtype"]) if isinstance(value["dtype"], str) else None
    if dtype is None:
        raise ValueError(f"tensor {name!r} has unknown dtype {value['dtype']!r}")
    shape, offsets = value["shape"], value["data_offsets"]
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
        raise ValueError(f"tensor {name!r} has a bad shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise ValueError(f"tensor {name!r} has bad data_offsets {offsets!r}")
    try:
        dims = tuple(_size(d) for d in shape)
        start, end = (_size(o) for o in offsets)
    except ValueError as error:
        raise ValueError(f"tensor {name!r}: {error}") from None
    nbytes = math.prod(dims) * dtype.itemsize
    if end < start or end - start != nbytes:
        raise ValueError(
            f"tensor {name!r} of shape {list(dims)} {value['dtype']} needs {nbytes:,} bytes, its offsets "
            f"[{start}, {end}] give {end - start:,}"
        )
    return TensorEntry(dtype, dims, start, end)


def read_header(path: str | os.PathLike[str]) -> Header | None:
    """The validated header of a safetensors file, None when the file does not start like one.

    Raises ``ValueError`` (one line, naming the first problem) for a file that starts like
    safetensors but is corrupt, truncated or hostile.
    """
    file = Path(path)
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(9)
        if len(head) < 9:
            return None
        length = int.from_bytes(head[:8], "little")
        if not 2 <= length <= MAX_HEADER_BYTES or head[8:9] != b"{":
            return None
        if 8 + length > size:
            raise ValueError(
                f"{file} is a corrupt or truncated safetensors file (header cut short); re-save it"
            )
        raw = head[8:] + handle.read(length - 1)
    try:
        header = parse_json(raw, max_bytes=MAX_HEADER_BYTES)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise ValueError("__metadata__ is not an object of strings")
        tensors = {}
        for name, value in header.items():
            if not name or len(name) > 1000:
                raise ValueError(f"tensor name {name[:50]!r} is empty or too long")
            tensors[name] = _entry(name, value)
        _check_layout(tensors, size - 8 - length)
    except ValueError as error:
        raise ValueError(f"{file} is a corrupt or truncated safetensors file ({error}); re-save it") from None
    return Header(tensors, metadata, 8 + length, size - 8 - length)


def _check_layout(tensors: Mapping[str, TensorEntry], data_size: int) -> None:
    """Tensors must tile the data section exactly: no gap, no overlap, nothing past the end."""
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            what = "overlaps the tensor before it" if entry.start < position else "leaves a gap before it"
            raise ValueError(f"tensor {name!r} at byte {entry.start} {what}")
        position = entry.end
    if position > data_size:
        raise ValueError(
            f"the tensors need {position:,} bytes of data, the file holds {data_size:,}; truncated"
        )
    if position < data_size:
        raise ValueError(
            f"{data_size - position:,} bytes after the last tensor; not a file safetensors wrote"
        )


def aligned(data: bytes) -> list[bytes | memoryview]:
    """Serialized safetensors ``data`` rewritten (as chunks to write) so that tensors start aligned.

    Tensors whose size is a multiple of ``ALIGNMENT`` come first, then the others, largest first, and
    the header is padded with spaces (which the format allows) to a multiple of ``ALIGNMENT``: so
    nearly every byte of tensor data starts at a multiple of it and loading maps it in place.
    """
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__", None)
    body = memoryview(data)[8 + length :]

    def size(name: str) -> int:
        start, end = header[name]["data_offsets"]
        return end - start

    order = sorted(header, key=lambda name: (size(name) % ALIGNMENT != 0, -size(name), name))
    layout: dict[str, Any] = {} if metadata is None else {"__metadata__": metadata}
    chunks: list[bytes | memoryview] = []
    position = 0
    for name in order:
        start, end = header[name]["data_offsets"]
        layout[name] = {**header[name], "data_offsets": [position, position + end - start]}
        chunks.append(body[start:end])
        position += end - start
    text = json.dumps(layout, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)
    return [len(text).to_bytes(8, "little") + text, *chunks]


def _fill(handle: Any, target: memoryview, offset: int) -> bool:
    """Read ``len(target)`` bytes at ``offset`` into ``target`` (a read may return less); False at EOF."""
    handle.seek(offset)
    done = 0
    while done < len(target):
        count = handle.readinto(target[done:])
        if not count:
            return False
        done += count
    return True


def read_data(path: str | os.PathLike[str], header: Header) -> dict[str, Tensor]:
    """The tensors ``header`` declares: in a private memory map where aligned, else read.

    The file is mapped copy on write (writing to a tensor never changes the file; pages are read when
    first used), and a tensor starting at a multiple of ``ALIGNMENT`` is made over its bytes of the
    map, with a storage of its own (so ``torch.save`` and ``deepcopy`` see separate tensors); others
    are read into their own ``torch.empty`` allocation. Either way kernels see the alignment a fresh
    model has, and memory is the file's tensors and nothing more.
    """
    tensors = {}
    with open(path, "rb", buffering=0) as handle:
        if os.fstat(handle.fileno()).st_size != header.data_start + header.data_size:
            raise ValueError(f"{path} changed while loading; load it again")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, entry in sorted(header.tensors.items(), key=lambda item: item[1].start):
            start, end = header.data_start + entry.start, header.data_start + entry.end
            if end > start and start % ALIGNMENT == 0:
                count = (end - start) // entry.dtype.itemsize
                tensor = torch.frombuffer(mapped, dtype=entry.dtype, count=count, offset=start).view(
                    entry.shape
                )
            else:
                tensor = torch.empty(entry.shape, dtype=entry.dtype)
                raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
                if end > start and not _fill(handle, raw, start):
                    raise ValueError(f"{path} is a corrupt or truncated safetensors file (data cut short)")
            if entry.dtype == torch.bool and end > start and int(tensor.view(torch.uint8).numpy().max()) > 1:
                raise ValueError(f"{path} is a corrupt safetensors file (bool {name!r} is not 0/1)")
            tensors[name] = tensor
    return {name: tensors[name] for name in header.tensors}
