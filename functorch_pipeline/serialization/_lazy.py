"""Lazy loading: ``fp.load(path, mmap=True)`` maps the data section instead of reading it.

# NOTE [lazy load]
With ``mmap=True`` the header is parsed and checked exactly as in a full load (header
cap, parse budget, header CRC, exact coverage, ``like=``), then every tensor becomes a
``torch.frombuffer`` view of one copy-on-write mapping of the file (``mmap.ACCESS_COPY``,
``MAP_PRIVATE`` on POSIX). The call costs time proportional to the header; pages are read
from disk when a tensor is first touched, and only those pages. Measured by
``benchmarks/checkpoint_io.py --lazy`` (100M float32 parameters in 194 leaves, 0.40 GB,
44 kB header, file in the page cache, 5 interleaved rounds, medians, shared 2-core VM):
3.1 ms against 114 ms for a full load in a warm process (0.027x) and 3.1 ms against 212 ms
in fresh processes (0.015x); at 9M parameters (18 leaves, 4 kB header) 0.7 ms. Most of it
is parsing the header JSON, the rest ~4 us per tensor.

Per-tensor checksums cannot be checked without reading the data, so a lazy load checks
none of them: it records each tensor's CRC-32 and :func:`verify_lazy` checks them when
asked (reading the tensors it is given, and only those). It checks the bytes as they are
at that moment, so call it before writing into the tensors.

Writes into a returned tensor go to private copies of the touched pages: the file never
changes. The file may be deleted or atomically replaced (``fp.save`` writes a temporary
file and renames it) while mapped: on POSIX the mapping keeps the old inode alive and the
tensors keep the old contents. Truncating or rewriting the file *in place* is not safe:
POSIX leaves it unspecified whether untouched pages of a private mapping see the new
bytes, and a truncated page raises ``SIGBUS`` when touched (as for ``torch.load(...,
mmap=True)`` and safetensors' ``safe_open``).

Why copy-on-write rather than a read-only map: ``torch.frombuffer`` over a read-only
buffer warns, and an in-place op on such a tensor would crash the process (``SIGSEGV``)
instead of raising; with a private writable map the worst case is extra memory for the
pages written. Under strict overcommit (``vm.overcommit_memory=2``) a private writable map
is charged in full against the commit limit, so mapping a file larger than that limit
fails; the error is a :class:`CheckpointError` that says to load without ``mmap=True``.

Tensors at an offset that is not a multiple of their element size (possible only in
files from other safetensors writers; ``fp.save`` aligns the data section to 8 bytes and
every tensor to its dtype's size within it) are read eagerly instead, with their CRC
checked as in a full load when verification is on.
"""

from __future__ import annotations

import mmap as _mmap
import zlib
from typing import Any
from typing import BinaryIO

import torch
from torch.utils.weak import WeakIdKeyDictionary

from functorch_pipeline.serialization._format import CheckpointError
from functorch_pipeline.serialization._format import Header
from functorch_pipeline.serialization._format import TensorInfo
from functorch_pipeline.serialization._format import as_bytes
from functorch_pipeline.serialization._format import read_tensor
from functorch_pipeline.tree import flatten_with_path
from functorch_pipeline.tree import keystr

__all__ = ["map_all", "verify_lazy"]

# tensor -> (recorded CRC-32, tensor name, file description); weak so that it never keeps
# a mapping alive, keyed by identity since tensors overload ``==``.
_RECORDED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def map_all(
    f: BinaryIO,
    header: Header,
    order: list[TensorInfo],
    targets: dict[str, torch.device | None],
    expected: list[int] | None,
    where: str,
) -> dict[str, torch.Tensor]:
    """Every tensor as a view of a copy-on-write mapping of ``f`` (NOTE [lazy load]);
    tensors whose target device is not the CPU are copied there (read, and verified
    first when ``expected`` is given)."""
    size = header.data_start + header.data_len
    buf = None
    if header.data_len:
        try:
            buf = _mmap.mmap(f.fileno(), size, access=_mmap.ACCESS_COPY)
        except (ValueError, OSError) as e:
            raise CheckpointError(
                f"{where}: cannot map the file's {size} bytes ({e}); it changed or was "
                "truncated, or the file system does not support mmap (load without mmap=True)"
            ) from None
    out = {}
    for i, info in enumerate(order):
        want = None if expected is None else expected[i]
        dev = targets[info.name]
        offset = header.data_start + info.start
        itemsize = info.dtype.itemsize
        if info.end == info.start:
            t = torch.empty(info.shape, dtype=info.dtype)
        elif offset % itemsize:
            hook = None
            crc = [0]
            if want is not None:
                def hook(part: memoryview, crc: list[int] = crc) -> None:
                    crc[0] = zlib.crc32(part, crc[0])
            t = read_tensor(f, info, header.data_start, where, hook)
            if want is not None:
                _check(crc[0], want, info, where)
            want = None
        else:
            count = (info.end - info.start) // itemsize
            t = torch.frombuffer(buf, dtype=info.dtype, count=count, offset=offset)
            t = t.view(info.shape)
        if dev is not None and dev.type != "cpu":
            if want is not None:
                _check(zlib.crc32(as_bytes(t)) if t.numel() else 0, want, info, where)
            t = t.to(dev)
        elif want is not None:
            _RECORDED[t] = (want, info, where)
        out[info.name] = t
    return out


def verify_lazy(tree: Any) -> int:
    """Check the CRC-32 of every tensor in ``tree`` that came from ``fp.load(...,
    mmap=True)``: the per-tensor checks a lazy load postpones (NOTE [lazy load]).

    This reads those tensors' bytes (from disk where they are not yet in memory). It
    checks their contents as they are now, so a tensor written into since the load fails
    too; call it before modifying them. Tensors loaded with ``verify=False``, files
    without checksums, slices and copies of loaded tensors, and all other leaves are
    skipped (the returned count says how many were checked).

    Args:
      tree: a pytree holding (some of) the tensors of one or more lazy loads.

    Returns:
      The number of tensors checked.

    Raises:
      CheckpointError: a tensor's bytes do not match the checksum recorded in its file;
        the message names its key path in ``tree``, its tensor name and the file.

    Notes:
      NOTE [lazy load]: ``mmap=True`` checks the header as a full load does, then makes every tensor
        a view of one copy-on-write mapping of the file: pages are read when first touched and
        writes never reach the file.

    Example:
      >>> import tempfile, os
      >>> import functorch_pipeline as fp
      >>> p = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
      >>> fp.save(p, {"w": torch.arange(4.0), "b": torch.zeros(2), "step": 3})
      >>> tree = fp.load(p, mmap=True)
      >>> verify_lazy(tree)
      2
      >>> tree["w"][0] = 9.0  # copy-on-write: the file keeps its bytes
      >>> verify_lazy({"w": tree["w"]})
      Traceback (most recent call last):
      ...
      functorch_pipeline.serialization._format.CheckpointError: verify_lazy(tree): ...
    """
    paths, leaves, _ = flatten_with_path(tree)
    checked = 0
    for p, x in zip(paths, leaves, strict=True):
        if not isinstance(x, torch.Tensor):
            continue
        rec = _RECORDED.get(x)
        if rec is None:
            continue
        want, info, where = rec
        got = zlib.crc32(as_bytes(x)) if x.numel() else 0
        _check(got, want, info, f"verify_lazy(tree): leaf at path `{keystr(p)}`, {where}")
        checked += 1
    return checked


def _check(got: int, want: int, info: TensorInfo, where: str) -> None:
    if got != want:
        raise CheckpointError(
            f"{where}: tensor `{info.name[:80]}` (bytes [{info.start}, {info.end}) of the data "
            f"section) does not match its checksum (CRC-32 {got:08x}, recorded {want:08x}): "
            "the file is corrupted, or the tensor was modified after the lazy load"
        )
