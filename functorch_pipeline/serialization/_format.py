"""The on-disk layout: a safetensors file, read and written without trusting its bytes.

A safetensors file is an 8-byte little-endian header length ``N``, ``N`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``), then the raw
tensor bytes. This module builds such headers, parses them with strict bounds checks, and
moves tensor bytes between files and tensors with no intermediate copies.

# NOTE [strict header parsing]
Every number in a header is checked before it is used: the claimed header length against
the file size and a hard cap (so a file claiming a 2**63-byte header is rejected before a
single byte is allocated), every shape and offset against the data section, and tensors
against each other (no overlaps). All failures raise :class:`CheckpointError`; JSON that is
nested too deeply for Python's recursion limit is reported the same way. Nothing is ever
unpickled or imported by name here.

# NOTE [parse budget]
Parsed JSON costs far more memory than its text: ``[]`` is 2 bytes of text but a 56-byte
list, and a tree of 8M tiny nodes in a 100 MB header once took 2.9 GB and 17.5 s. So
before any JSON is parsed, the header's text is scanned for the characters that can
start or separate a JSON value (``,`` ``:`` ``[`` ``{``, :func:`count_parse_units`); their
count bounds the number of Python objects every later parse creates (the tree JSON is a
string inside the header, so its structure is counted too). A file may have at most
:func:`parse_budget` of them, ``max(MIN_PARSE_UNITS, file size // BYTES_PER_PARSE_UNIT,
header length // HEADER_BYTES_PER_PARSE_UNIT)``; the same number bounds the total length
of the key paths built for the tree's leaves (deep trees would otherwise cost depth x
leaves).

The header term makes every header ``fp.save`` writes parse: its tree JSON spends at
least ~4 header bytes per unit for every kind of leaf (measured: small ints 4.8, None 5.7,
bool/str 5.6, empty lists 4.3, floats 7.4-10, accountant histories 9.4, tensor entries
~6.9), so a long loss history or a privacy accountant's long schedule loads whatever the
tensor bytes. The only trees below 4 bytes per unit are floods of empty dicts (3.9) or of
60-d shapes of ones (2.9); for those, and for anything else over the budget (strings
full of ``,:[{``, key paths too long in total), ``fp.save`` computes the same count on the
header it is about to write and refuses before writing (``ValueError`` naming the cause),
so a file ``fp.save`` writes is a file ``fp.load`` reads.

What a hostile file can still cost: the header is capped at ``MAX_HEADER_BYTES``
(safetensors' 100,000,000), and at one unit per 4 header bytes the worst structures
measured (json.loads, peak RSS growth, fresh process) cost 7.6x the header for ``[],``
floods, 9.9x for numbers, 14.1x for ``{"a":0},`` floods (the worst found), against 12.4x
for an ``fp.save`` file of small ints and 5.6x for one of floats: a hostile file costs at
most about what a legitimate checkpoint of the same header size does, ~1.5 GB at the
cap, rather than the unbounded 2.9 GB+ of the original issue. The file term (one unit
per 12 file bytes) keeps the earlier bound of ``max(~150 MB, ~10 x the file size)`` for
files with a large data section (measured at that rate: +606 MB at 97 MB, 6.2x; +703 MB
at 90 MB, 7.8x; +121 MB at 9.8 MB, the floor; ~15-20 s to parse ~100 MB on a busy 2-core
VM).

# NOTE [exact coverage]
Like safetensors ("file not fully covered"), the tensors must tile the data section
exactly: sorted by offset, each starts where the previous one ends, the first at 0 and
the last at the end of the file. Gaps, padding, overlaps and trailing bytes are
corruption (a shifted file would otherwise load with wrong values).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import BinaryIO

import torch

from functorch_pipeline.serialization._prefault import prefault

__all__ = [
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "HEADER_BYTES_PER_PARSE_UNIT",
    "MIN_PARSE_UNITS",
    "META_FORMAT",
    "META_TREE",
    "RESERVED_PREFIX",
    "CheckpointError",
    "Header",
    "TensorInfo",
    "as_bytes",
    "build_header",
    "check_coverage",
    "count_parse_units",
    "dtype_name",
    "host_contiguous",
    "parse_budget",
    "parse_header",
    "read_tensor",
    "write_tensor",
]

FORMAT_VERSION = 2  # 2: checksums (NOTE [checksum]); 1 still loads
RESERVED_PREFIX = "functorch_pipeline."
META_FORMAT = RESERVED_PREFIX + "format"
META_TREE = RESERVED_PREFIX + "tree"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit (MAX_HEADER_SIZE)
MIN_PARSE_UNITS = 1 << 20  # NOTE [parse budget]
BYTES_PER_PARSE_UNIT = 12
HEADER_BYTES_PER_PARSE_UNIT = 4  # NOTE [parse budget]: below what any fp.save header uses
_MAX_NDIM = 64


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: truncated, corrupted, not a checkpoint,
    written by a newer format version, naming an unknown type, or not matching ``like``.

    It subclasses ``ValueError``; every failure of :func:`fp.load <load>` on bad input
    raises it (never a crash, a hang or a bare internal error).

    >>> issubclass(CheckpointError, ValueError)
    True
    """


_NAME_TO_DTYPE: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
}
_DTYPE_TO_NAME = {v: k for k, v in _NAME_TO_DTYPE.items()}


def dtype_name(dtype: torch.dtype) -> str | None:
    """The safetensors name of a dtype (``None`` if safetensors has none).

    >>> dtype_name(torch.bfloat16), dtype_name(torch.complex128)
    ('BF16', None)
    """
    return _DTYPE_TO_NAME.get(dtype)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a header; offsets are relative to the data section."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class Header:
    """A parsed header: tensors in header order, string metadata, where data starts, the
    raw JSON text and the parse budget left for the tree (NOTE [parse budget])."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int
    data_len: int
    raw: bytes = b""
    budget: int = MIN_PARSE_UNITS


def build_header(
    entries: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
) -> tuple[bytes, list[int]]:
    """Header bytes (length prefix included) for tensors written back to back in the
    given order, and each tensor's byte size.

    The JSON is padded with spaces to a multiple of 8 bytes, so the data section starts
    8-byte aligned, as safetensors does.

    >>> raw, sizes = build_header([("w", torch.float32, (2,))], {})
    >>> int.from_bytes(raw[:8], "little") % 8, sizes
    (0, [8])
    """
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    sizes = []
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_TO_NAME[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        sizes.append(nbytes)
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, sizes


def _fail(where: str, msg: str) -> CheckpointError:
    return CheckpointError(f"{where}: {msg}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_header(f: BinaryIO, file_size: int, where: str) -> Header:
    """Read and validate the header of an open safetensors file (see NOTE [strict header
    parsing]). Raises :class:`CheckpointError` on anything malformed.

    >>> import io
    >>> raw, _ = build_header([("w", torch.float32, (2,))], {"a": "b"})
    >>> h = parse_header(io.BytesIO(raw + bytes(8)), len(raw) + 8, "example")
    >>> h.tensors["w"].shape, h.metadata
    ((2,), {'a': 'b'})
    """
    if file_size < 8:
        raise _fail(where, f"the file is {file_size} bytes long, too short to be a safetensors checkpoint (truncated?)")
    prefix = f.read(8)
    if len(prefix) != 8:
        raise _fail(where, "could not read the 8-byte header length (truncated?)")
    n = int.from_bytes(prefix, "little")
    if n > file_size - 8:
        raise _fail(
            where,
            f"the header claims {n} bytes but only {file_size - 8} follow the length field "
            "(the file is truncated or is not a safetensors checkpoint)",
        )
    if n > MAX_HEADER_BYTES:
        raise _fail(where, f"the header claims {n} bytes, more than the {MAX_HEADER_BYTES}-byte limit")
    if n < 2:
        raise _fail(where, f"the header is {n} bytes long, too short to hold a JSON object")
    raw = f.read(n)
    if len(raw) != n:
        raise _fail(where, f"could read only {len(raw)} of the header's {n} bytes (truncated?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(where, f"the header is not UTF-8 ({e.reason} at byte {e.start}); not a safetensors checkpoint") from None
    if not text.startswith("{"):
        raise _fail(where, "the header does not start with '{'; not a safetensors checkpoint")
    budget = parse_budget(file_size, n)
    units = count_parse_units(raw)
    if units > budget:
        raise _fail(
            where,
            f"the header has {units} JSON separators and brackets, more than the {budget} "
            f"allowed for a {file_size}-byte file (NOTE [parse budget]); refusing to parse it",
        )
    try:
        obj = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise _fail(where, f"the header is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise _fail(where, "the header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(where, "`__metadata__` in the header must map strings to strings")
    data_start = 8 + n
    data_len = file_size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        tensors[name] = _parse_entry(name, entry, data_len, where)
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, e0, n0), (s1, _, n1) in zip(spans, spans[1:], strict=False):
        if s1 < e0:
            raise _fail(where, f"tensors `{n0}` and `{n1}` overlap in the file")
    return Header(
        tensors=tensors, metadata=metadata, data_start=data_start, data_len=data_len, raw=raw,
        budget=budget,
    )


def parse_budget(file_size: int, header_bytes: int = 0) -> int:
    """How many JSON values a file of this size, with a header of ``header_bytes`` (the
    JSON text, length field excluded), may hold (NOTE [parse budget]).

    Args:
      file_size: the whole file's size in bytes.
      header_bytes: the header's JSON length in bytes.

    Returns:
      The most :func:`count_parse_units` the header may have, which also bounds the
      total length of the tree's key paths.

    >>> parse_budget(0) == MIN_PARSE_UNITS, parse_budget(120_000_000)
    (True, 10000000)
    >>> parse_budget(12_500_000, 12_400_000)  # a header-heavy file: 1 unit per 4 bytes
    3100000
    """
    return max(
        MIN_PARSE_UNITS,
        file_size // BYTES_PER_PARSE_UNIT,
        header_bytes // HEADER_BYTES_PER_PARSE_UNIT,
    )


def count_parse_units(text: bytes) -> int:
    """The characters of a header's JSON text that can start or separate a value
    (``,`` ``:`` ``[`` ``{``), counted without parsing it (NOTE [parse budget]).

    Counting bytes of UTF-8 text is the same as counting characters: these are ASCII,
    and no byte of a multi-byte UTF-8 sequence is ASCII.

    Args:
      text: the header's JSON text, as UTF-8 bytes.

    Returns:
      The count.

    >>> count_parse_units(b'{"a":[1,2]}')
    4
    """
    return sum(text.count(c) for c in (b",", b":", b"[", b"{"))


def check_coverage(header: Header, where: str) -> list[TensorInfo]:
    """The tensors in data order, after checking that they tile the data section exactly
    (NOTE [exact coverage]); raises :class:`CheckpointError` otherwise.

    >>> import io
    >>> raw, _ = build_header([("w", torch.float32, (2,))], {})
    >>> h = parse_header(io.BytesIO(raw + bytes(12)), len(raw) + 12, "example")
    >>> check_coverage(h, "example")
    Traceback (most recent call last):
    ...
    functorch_pipeline.serialization._format.CheckpointError: example: the file is not fully covered by its tensors: 4 bytes after the last tensor's end at byte 8 of the 12-byte data section (padded or corrupted file)
    """
    order = sorted(header.tensors.values(), key=lambda t: (t.start, t.end))
    pos, prev = 0, None
    for t in order:
        if t.start != pos:
            what = f"after tensor `{prev.name[:80]}`" if prev is not None else "at the start"
            gap = f"a gap of {t.start - pos} bytes" if t.start > pos else "an overlap"
            raise _fail(
                where,
                f"the file is not fully covered by its tensors: {gap} {what} (tensor "
                f"`{t.name[:80]}` starts at byte {t.start}, expected {pos}); shifted or "
                "corrupted file",
            )
        pos, prev = t.end, t
    if pos != header.data_len:
        raise _fail(
            where,
            f"the file is not fully covered by its tensors: {header.data_len - pos} bytes "
            f"after the last tensor's end at byte {pos} of the {header.data_len}-byte data "
            "section (padded or corrupted file)",
        )
    return order


def _parse_entry(name: str, entry: Any, data_len: int, where: str) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _fail(where, f"header entry `{name}` must be an object with exactly `dtype`, `shape` and `data_offsets`")
    dname, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dname, str) or dname not in _NAME_TO_DTYPE:
        raise _fail(where, f"tensor `{name}` has unknown dtype {str(dname)[:40]!r}")
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(where, f"tensor `{name}` has an invalid shape {str(shape)[:80]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise _fail(where, f"tensor `{name}` has invalid data_offsets {str(offsets)[:80]}")
    start, end = offsets
    if not 0 <= start <= end <= data_len:
        raise _fail(
            where,
            f"tensor `{name}` claims bytes [{start}, {end}) but the data section has {data_len} bytes "
            "(truncated or corrupted file)",
        )
    dtype = _NAME_TO_DTYPE[dname]
    itemsize = dtype.itemsize
    if math.prod(max(d, 1) for d in shape) * itemsize >= 1 << 62:
        # Even an empty tensor of this shape would overflow torch's stride arithmetic.
        raise _fail(where, f"tensor `{name}` has an impossibly large shape {str(tuple(shape))[:80]}")
    if math.prod(shape) * itemsize != end - start:
        raise _fail(
            where,
            f"tensor `{name}` of shape {tuple(shape)} and dtype {dname} needs "
            f"{math.prod(shape) * itemsize} bytes but its data_offsets span {end - start}",
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=start, end=end)


def as_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (no copy).

    >>> bytes(as_bytes(torch.tensor([1, 2], dtype=torch.int16)))
    b'\\x01\\x00\\x02\\x00'
    """
    flat = t.reshape(-1)
    if flat.numel() == 1 and flat.stride(0) != 1:
        # A one-element tensor counts as contiguous whatever its stride (e.g. `.imag`).
        flat = flat.as_strided((1,), (1,))
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def host_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, on the CPU, with conj/neg bits resolved, contiguous; no copy for
    a tensor that already is all that."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.resolve_conj().resolve_neg().contiguous()


def write_tensor(
    fd: int, t: torch.Tensor, on_chunk: Callable[[memoryview], None] | None = None
) -> None:
    """Write a tensor's bytes to a raw file descriptor straight from its memory.

    CUDA tensors are copied to the host first; non-contiguous tensors are made contiguous
    (one copy); contiguous CPU tensors are written with no copy at all. ``on_chunk`` sees
    each chunk (up to 8 MiB) before it is written (for checksums).
    """
    t = host_contiguous(t)
    if t.numel() == 0:
        return
    mv = as_bytes(t)
    pos, total = 0, len(mv)
    while pos < total:
        part = mv[pos : pos + (8 << 20)]
        if on_chunk is not None:
            on_chunk(part)
        done = 0
        while done < len(part):
            done += os.write(fd, part[done:])
        pos += len(part)


def read_tensor(
    f: BinaryIO,
    info: TensorInfo,
    data_start: int,
    where: str,
    on_chunk: Callable[[memoryview], None] | None = None,
    chunk: int = 8 << 20,
) -> torch.Tensor:
    """Read one tensor with ``readinto`` straight into a fresh tensor's memory (populated
    first, see NOTE [prefault]), ``chunk`` bytes at a time; ``on_chunk`` sees each chunk
    once it is read (for checksums)."""
    out = torch.empty(info.shape, dtype=info.dtype)
    if info.end == info.start:
        return out
    prefault(out)
    f.seek(data_start + info.start)
    mv = as_bytes(out)
    pos, total = 0, len(mv)
    while pos < total:
        stop = min(total, pos + chunk)
        start = pos
        while pos < stop:
            got = f.readinto(mv[pos:stop])
            if not got:
                raise _fail(
                    where,
                    f"the file ended while reading tensor `{info.name}` (it changed or was "
                    "truncated)",
                )
            pos += got
        if on_chunk is not None:
            on_chunk(mv[start:stop])
    return out
