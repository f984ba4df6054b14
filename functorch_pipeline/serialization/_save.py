"""``fp.save``: write a pytree to one self-describing safetensors file, atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zlib
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

from functorch_pipeline.serialization._checksum import FIELD
from functorch_pipeline.serialization._checksum import PREFIX
from functorch_pipeline.serialization._checksum import Crc32s
from functorch_pipeline.serialization._checksum import field_value
from functorch_pipeline.serialization._format import FORMAT_VERSION
from functorch_pipeline.serialization._format import MAX_HEADER_BYTES
from functorch_pipeline.serialization._format import META_FORMAT
from functorch_pipeline.serialization._format import META_TREE
from functorch_pipeline.serialization._format import RESERVED_PREFIX
from functorch_pipeline.serialization._format import as_bytes
from functorch_pipeline.serialization._format import build_header
from functorch_pipeline.serialization._format import count_parse_units
from functorch_pipeline.serialization._format import host_contiguous
from functorch_pipeline.serialization._format import parse_budget
from functorch_pipeline.serialization._format import write_tensor
from functorch_pipeline.serialization._structure import Encoder
from functorch_pipeline.serialization._tempfiles import temp_prefix

__all__ = ["atomic_write", "save"]

_SMALL = 1 << 20  # tensors below 1 MiB are batched into one write
_UMASK = os.umask(0)
os.umask(_UMASK)


def save(
    path: str | bytes | os.PathLike[str],
    tree: Any,
    metadata: Mapping[str, str] | None = None,
    *,
    sync: bool = True,
) -> None:
    """Save a pytree to one safetensors file that :func:`load` rebuilds exactly.

    What a checkpoint holds: tensors (any dtype safetensors has: floating incl. bfloat16,
    float16 and float8, signed/unsigned ints, bool, complex64; any shape incl. 0-d and
    empty; non-contiguous tensors are written contiguously), Python ``int``, ``float``
    (incl. ``inf``/``nan``), ``bool``, ``str`` and ``None``, inside dicts (``str``/``int``
    keys), OrderedDicts, lists, tuples, NamedTuples and classes registered with
    ``fp.tree.register_dataclass`` (optimizer states, ``TrainState``).

    Format: tensors in the safetensors layout, named by key path (``params.fc1.weight``),
    so any safetensors reader sees them; the tree structure, non-tensor leaves and the
    format version are JSON in the header's ``__metadata__``.

    # NOTE [shared storage]
    Every tensor leaf is stored on its own, in full: two leaves that are views of one
    storage (or the same tensor twice, e.g. tied weights) are written twice, and load as
    independent tensors. This keeps files valid safetensors (which forbids overlapping
    tensors) and never saves bytes that no leaf shows. ``requires_grad`` and tensor
    subclasses (``nn.Parameter``) are not recorded; tensors load as plain tensors.

    # NOTE [atomic save]
    The file is written to a temporary file in the same directory, flushed and
    ``fsync``-ed, then renamed over ``path`` with ``os.replace``, and the directory is
    ``fsync``-ed so the rename itself is durable. A crash or kill at any point leaves
    either the old file or the new one at ``path``, never a partial file. A killed save
    leaves a stale ``.<name>.<host>-<pid>-<random>.tmp`` file beside it; remove those with
    :func:`clean_temp_files` (``CheckpointManager`` does so when created; NOTE [temp
    files]).

    # NOTE [checksum] (summary)
    The header records a CRC-32 of itself and of every tensor's bytes, computed while
    writing; :func:`load` verifies them (``verify=False`` skips that).

    Size limits: a file ``save`` writes always loads. :func:`load` bounds what a header
    may cost to parse (NOTE [parse budget]): about one JSON value per 4 header bytes,
    which every kind of leaf stays within (a loss history of 250k floats or a privacy
    accountant with a long noise schedule loads fine), and a 100,000,000-byte header.
    A tree past those limits (tens of millions of Python scalars, floods of empty
    dicts) is refused here, before anything is written; store long numeric histories as
    a tensor (``torch.tensor(history)``), which costs 8 bytes a value and no parsing.

    Args:
      path: destination file (``.safetensors`` by convention); ``str``, ``bytes`` or
        ``os.PathLike``, as for ``open``.
      tree: the pytree to save. Nothing in it is modified.
      metadata: optional ``{str: str}`` stored in the header, readable with
        :func:`read_metadata` and by other safetensors tools. Keys starting with
        ``functorch_pipeline.`` are reserved.
      sync: ``fsync`` the file and directory (default). ``False`` skips both: faster,
        but a power loss may then leave an empty or partial file.

    Returns:
      ``None``.

    Raises:
      TypeError: a leaf or container the format cannot hold (a sparse, nested or
        quantized tensor, a str that is not valid UTF-8, an int over 4300 digits, ...);
        the message names its path.
      ValueError: the tree is too large for :func:`load` to parse back (see "Size
        limits"), or a reserved ``metadata`` key; nothing is written.

    >>> import tempfile, os, torch
    >>> from functorch_pipeline.serialization import load
    >>> d = tempfile.mkdtemp()
    >>> tree = {"w": torch.ones(2, dtype=torch.bfloat16), "step": 3, "opt": (None, 0.5)}
    >>> save(os.path.join(d, "ckpt.safetensors"), tree)
    >>> load(os.path.join(d, "ckpt.safetensors"))
    {'w': tensor([1., 1.], dtype=torch.bfloat16), 'step': 3, 'opt': (None, 0.5)}

    Notes:
      NOTE [parse budget]: ``load`` refuses a header with more JSON separators than about one per 4
        header bytes (or per 12 file bytes, at least 2**20), and ``save`` refuses, before writing,
        any tree whose header would be refused.
      NOTE [temp files]: a save writes ``.<name>.<host>-<pid>-<random>.tmp`` and renames it; a
        killed save leaves that file behind, and ``clean_temp_files`` removes only stale ones, never
        a save still running. Names over ~220 bytes are shortened to ``<head>~<hash>`` in it.
    """
    where = "save(path, tree)"
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"{where}: `path` must be a str, bytes or os.PathLike, got {type(path).__name__}")
    meta = _check_metadata(metadata, where)
    enc = Encoder(where)
    node = enc.encode(tree)
    # Widest dtypes first: with an 8-byte aligned data section every tensor then starts
    # at a multiple of its own element size, as safetensors' own writer arranges.
    tensors = sorted(enc.tensors, key=lambda nt: -nt[1].dtype.itemsize)
    # NOTE [checksum]: the field goes first, as zeros; filled in once the data is written.
    placeholder = field_value(0, [0] * len(tensors))
    meta = {FIELD: placeholder, **meta}
    meta[META_FORMAT] = str(FORMAT_VERSION)
    meta[META_TREE] = json.dumps(node, separators=(",", ":"), ensure_ascii=False)
    header, sizes = build_header([(n, t.dtype, tuple(t.shape)) for n, t in tensors], meta)
    if not header[8:].startswith(PREFIX):
        raise AssertionError("save: the checksum field must open the header")
    _check_loadable(header, sum(sizes), enc.path_units, where)
    head_crc = zlib.crc32(header[8:])  # the field is all zeros here, as the check expects

    def write(fd: int) -> None:
        crcs = Crc32s(len(tensors))
        try:
            pending: list[bytes | memoryview] = [header]  # NOTE [gathered small writes]
            held = len(header)
            for i, ((_, t), nbytes) in enumerate(zip(tensors, sizes, strict=True)):
                if nbytes < _SMALL:
                    if nbytes:
                        raw = as_bytes(host_contiguous(t))
                        crcs.update(i, raw, nbytes)
                        pending.append(raw)
                        held += nbytes
                        if held >= _GATHER_MAX or len(pending) >= _IOV_MAX:
                            _write_gathered(fd, pending)
                            held = 0
                    continue
                _write_gathered(fd, pending)
                held = 0
                write_tensor(fd, t, lambda part, i=i, n=nbytes: crcs.update(i, part, n))
                if t.device.type != "cpu":
                    crcs.wait_one(i)  # free its host copy before the next tensor's
            _write_gathered(fd, pending)
            values = crcs.wait()
        finally:
            crcs.close()
        _write_at(fd, field_value(head_crc, values).encode(), 8 + len(PREFIX))

    atomic_write(path, write, sync=sync)


def _check_loadable(header: bytes, data_bytes: int, path_units: int, where: str) -> None:
    """Refuse a header that :func:`load` would refuse (NOTE [parse budget]): over the
    header cap, or over the parse budget of the file it would head."""
    n = len(header) - 8
    hint = (
        "Store long lists of numbers as a tensor (e.g. torch.tensor(loss_history)) or keep "
        "them out of the checkpoint; nothing was written"
    )
    if n > MAX_HEADER_BYTES:
        raise ValueError(
            f"{where}: the tree's header would be {n} bytes, more than the {MAX_HEADER_BYTES}"
            f"-byte limit fp.load (and safetensors) accept: too many Python scalars, "
            f"containers or tensors. {hint}"
        )
    budget = parse_budget(len(header) + data_bytes, n)
    units = count_parse_units(header[8:])
    if units > budget:
        raise ValueError(
            f"{where}: the tree's header would have {units} JSON separators and brackets, "
            f"more than the {budget} fp.load allows for this {n}-byte header (NOTE [parse "
            "budget]; about one per 4 header bytes): too many Python scalars or empty "
            f"containers, or strings full of ',:[{{' characters. {hint}"
        )
    if path_units > budget:
        raise ValueError(
            f"{where}: the tree's key paths are too long in total ({path_units} entries over "
            f"all leaves, more than the {budget} fp.load allows for this file; NOTE [parse "
            f"budget]): many leaves nested deeply. Flatten the tree or {hint[0].lower()}{hint[1:]}"
        )


def _check_metadata(metadata: Mapping[str, str] | None, where: str) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"{where}: `metadata` must be a mapping of str to str, got {type(metadata).__name__}")
    out = {}
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(
                f"{where}: `metadata` must map str to str (as safetensors requires), got "
                f"{k!r}: {type(v).__name__}; convert values with str() or json.dumps()"
            )
        if k.startswith(RESERVED_PREFIX) or k == "__metadata__":
            raise ValueError(f"{where}: `metadata` key {k!r} is reserved")
        for s in (k, v):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                raise TypeError(
                    f"{where}: `metadata` entry {k!r} holds a str that is not valid UTF-8 "
                    f"({e.reason} at index {e.start}); a safetensors header is UTF-8 JSON"
                ) from None
        out[k] = v
    return out


# NOTE [gathered small writes]
# Tensors under _SMALL are not copied into one staging buffer (that copy was a third of
# fp.save's time for 100 leaves of 400 KB); their byte views are written together with one
# os.writev (up to _IOV_MAX views or _GATHER_MAX bytes at a time), straight from the
# tensors' memory. Same bytes in the same order; os.write where writev is missing.
_IOV_MAX = 512
_GATHER_MAX = 64 << 20


def _write_gathered(fd: int, views: list[bytes | memoryview]) -> None:
    """Write ``views`` in order and empty the list (handles partial writes)."""
    if not hasattr(os, "writev"):
        for v in views:
            _write_all(fd, v)
        views.clear()
        return
    rest = [memoryview(v).cast("B") for v in views if len(v)]
    views.clear()
    while rest:
        done = os.writev(fd, rest)
        while rest and done >= len(rest[0]):
            done -= len(rest[0])
            rest.pop(0)
        if rest and done:
            rest[0] = rest[0][done:]


def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    mv = memoryview(data)
    pos = 0
    while pos < len(mv):
        pos += os.write(fd, mv[pos:])


def _write_at(fd: int, data: bytes, offset: int) -> None:
    if hasattr(os, "pwrite"):
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        return
    end = os.lseek(fd, 0, os.SEEK_CUR)  # Windows: no pwrite
    os.lseek(fd, offset, os.SEEK_SET)
    _write_all(fd, data)
    os.lseek(fd, end, os.SEEK_SET)


def _fsync_dir(directory: str) -> None:
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:  # Windows: directories cannot be fsync-ed
        return
    fd = os.open(directory, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: str | bytes | os.PathLike[str], write: Callable[[int], None], *, sync: bool = True
) -> None:
    """Call ``write(fd)`` on a temporary file beside ``path``, then atomically replace
    ``path`` with it (see NOTE [atomic save]). On any error the temporary file is removed
    and ``path`` is untouched.

    Args:
      path: the file to create or replace.
      write: ``write(fd)`` writes the content to the open file descriptor.
      sync: ``fsync`` the file and its directory (durable against power loss).

    Notes:
      NOTE [atomic save]: the file is written to a temporary file in the same directory, fsync-ed
        and renamed over the target (then the directory fsync-ed), so a crash leaves the old file or
        the new one, never a partial one.

    Examples:
      >>> import tempfile, os, pathlib
      >>> p = os.path.join(tempfile.mkdtemp(), "x.bin")
      >>> atomic_write(p, lambda fd: os.write(fd, b"hi"))
      >>> pathlib.Path(p).read_bytes()
      b'hi'
    """
    path = os.fsdecode(path)  # bytes paths too (surrogateescape round-trips them)
    directory = os.path.dirname(os.path.abspath(path))
    prefix = temp_prefix(os.path.basename(path))  # NOTE [temp files]
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        try:
            if hasattr(os, "fchmod"):
                os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; use the usual mode
            write(fd)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if sync:
        _fsync_dir(directory)

