"""``fp.load``: rebuild a pytree from a checkpoint, checked against ``like=`` if given."""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from functorch_pipeline.serialization._checksum import CHUNK
from functorch_pipeline.serialization._checksum import FIELD
from functorch_pipeline.serialization._checksum import PREFIX
from functorch_pipeline.serialization._checksum import Crc32s
from functorch_pipeline.serialization._checksum import header_crc
from functorch_pipeline.serialization._checksum import parse_field
from functorch_pipeline.serialization._format import FORMAT_VERSION
from functorch_pipeline.serialization._format import META_FORMAT
from functorch_pipeline.serialization._format import META_TREE
from functorch_pipeline.serialization._format import RESERVED_PREFIX
from functorch_pipeline.serialization._format import CheckpointError
from functorch_pipeline.serialization._format import Header
from functorch_pipeline.serialization._format import TensorInfo
from functorch_pipeline.serialization._format import check_coverage
from functorch_pipeline.serialization._format import parse_header
from functorch_pipeline.serialization._format import read_tensor
from functorch_pipeline.serialization._lazy import map_all
from functorch_pipeline.serialization._structure import _CONTAINERS
from functorch_pipeline.serialization._structure import _children as children
from functorch_pipeline.serialization._structure import decode
from functorch_pipeline.serialization._structure import leaf_nodes
from functorch_pipeline.tree import KeyPath
from functorch_pipeline.tree import flatten_with_path
from functorch_pipeline.tree import keystr
from functorch_pipeline.tree import unflatten

__all__ = ["load", "read_metadata"]

_MAGIC_HINTS = (
    (b"PK\x03\x04", "a zip archive, e.g. written by torch.save"),
    (b"\x80", "a pickle, e.g. written by torch.save"),
)


def load(
    path: str | os.PathLike[str],
    like: Any = None,
    *,
    device: torch.device | str | int | None = None,
    verify: bool = True,
    mmap: bool = False,
) -> Any:
    """Load a pytree saved by :func:`save`, or any safetensors file (as a flat dict).

    Without ``like``, the saved structure is rebuilt: dicts, OrderedDicts, lists, tuples,
    the library's NamedTuples and registered dataclasses (optimizer states,
    ``TrainState``), and your own classes registered with :func:`register_type`. A plain
    safetensors file (no tree in its header) loads as ``{name: tensor}`` in file order.

    With ``like``, every leaf is checked against the template first (same key paths,
    tensor shapes and dtypes, Python scalar types, and the ``kind`` of each
    ``fp.privacy.Accountant``, which is static data rather than a leaf) and the result
    takes ``like``'s containers; all mismatches are reported at once, each with its key
    path and both values. Template tensors can be on the ``meta`` device (shapes and dtypes only).
    Nothing is read from the data section before this check passes.

    Loading never unpickles and never imports anything outside this library (see
    NOTE [type registry]); the header is validated before use (NOTE [strict header
    parsing], NOTE [parse budget]); the tensors must tile the data section exactly, as
    safetensors requires (NOTE [exact coverage]); and the CRC-32 checksums ``fp.save``
    records of the header and of every tensor are verified (NOTE [checksum]; files
    without them, from older versions or other safetensors writers, load unverified).

    Args:
      path: the file.
      like: optional template pytree.
      device: where tensors go, like ``torch.load``'s ``map_location``: a checkpoint saved
        on CUDA loads on a CPU-only machine. Default: each tensor goes to the device of
        its ``like`` leaf if given (CPU for meta templates), else to the CPU.
      verify: check the checksums (default). ``False`` skips them, e.g. to rescue the
        readable parts of a damaged file or to save the check's time on trusted storage;
        every other check still runs.
      mmap: load lazily, like ``torch.load(..., mmap=True)`` and safetensors'
        ``safe_open``: the header is read and fully checked (the header checksum and
        every structural check above, and ``like``), but the data is not read: CPU
        tensors are views of a copy-on-write memory map of the file, paged in when
        touched, so the call takes time proportional to the header. The per-tensor
        checksums are then NOT checked; :func:`verify_lazy` checks them on request
        (NOTE [lazy load]). Writing into the tensors never changes the file; deleting
        the file or replacing it by rename is safe while mapped, truncating or
        rewriting it in place is not. A ``device`` (or ``like`` leaf) other than the
        CPU means reading: those tensors are copied from the map to the device, with
        their checksums verified first (unless ``verify=False``).

    Returns:
      The tree. Tensors are fresh, contiguous, independent and do not require grad
      (with ``mmap=True``, CPU tensors are contiguous views of a private file mapping).

    Raises:
      CheckpointError: the file is truncated, corrupted (including a checksum mismatch),
        not a safetensors file, from a newer format version, names an unregistered type,
        or does not match ``like``.
      OSError: the file cannot be opened (missing, a directory, no permission).

    >>> import tempfile, os
    >>> from functorch_pipeline.serialization import save
    >>> p = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
    >>> save(p, {"params": {"w": torch.zeros(2, 3)}, "step": 7})
    >>> load(p)["step"]
    7
    >>> load(p, mmap=True)["params"]["w"].sum()  # lazy: mapped, read when touched
    tensor(0.)
    >>> load(p, like={"params": {"w": torch.empty(3, 2)}, "step": 0})
    Traceback (most recent call last):
    ...
    functorch_pipeline.serialization._format.CheckpointError: load(path, like): ... leaf at path `params.w` has shape (3, 2) in `like` but (2, 3) on disk

    Notes:
      NOTE [checksum]: ``fp.save`` records CRC-32s of the header and of every tensor's bytes in the
        ``functorch_pipeline.crc32`` metadata field; ``load`` verifies them and raises
        ``CheckpointError`` on a mismatch.
      NOTE [exact coverage]: as safetensors requires, the tensors must tile the data section exactly
        (no gaps, padding, overlaps or trailing bytes), else ``CheckpointError``.
      NOTE [lazy load]: ``mmap=True`` checks the header as a full load does, then makes every tensor
        a view of one copy-on-write mapping of the file: pages are read when first touched and
        writes never reach the file.
      NOTE [parse budget]: before any JSON is parsed, the header text is scanned to bound the number
        of JSON values it can create, and a file with more than its size allows is refused (parsed
        JSON costs far more memory than its text).
      NOTE [strict header parsing]: every number in the header (length, shapes, offsets) is checked
        against the file size and caps before use; every failure raises ``CheckpointError``.
      NOTE [type registry]: a file never imports or calls arbitrary code: classes are found by
        qualified name only in the ``register_type`` registry and in ``functorch_pipeline``'s own
        modules.
    """
    where = "load(path)" if like is None else "load(path, like)"
    dev = torch.device(device) if device is not None else None
    with open(path, "rb", buffering=0) as f:
        where = f"{where}: {os.fspath(path)}"
        header = _parse(f, where)
        node = _tree_node(header, where)
        leaves = leaf_nodes(node, where, budget=header.budget)
        names = _check_names(header, leaves, where)
        order = check_coverage(header, where)
        expected = _checksums(header, len(order), where) if verify else None
        targets: dict[str, torch.device | None] = dict.fromkeys(names, dev)
        if like is not None:
            like_paths, like_leaves, treedef = flatten_with_path(like)
            _check_like(like_paths, like_leaves, leaves, header, where,
                        _accountant_kinds(like, node, where))
            disk = dict(leaves)
            if dev is None:  # follow the template's devices
                for p, x in zip(like_paths, like_leaves, strict=True):
                    if isinstance(x, torch.Tensor) and x.device.type != "meta":
                        targets[disk[p]["n"]] = x.device
        if mmap:
            tensors = map_all(f, header, order, targets, expected, where)
        else:
            tensors = _read_all(f, header, order, targets, expected, where)
    if like is None:
        return decode(node, lambda name, _path: tensors[name], where)
    out = [
        tensors[disk[p]["n"]] if disk[p]["t"] == "tensor" else decode(disk[p], _unreachable, where, p)
        for p in like_paths
    ]
    return unflatten(treedef, out)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``metadata`` given to :func:`save` (reads the header only).

    Args:
      path: a checkpoint file written by :func:`save`.

    Returns:
      The ``metadata`` dict of strings (``{}`` when none was given).

    Examples:
      >>> import tempfile, os
      >>> from functorch_pipeline.serialization import save
      >>> p = os.path.join(tempfile.mkdtemp(), "m.safetensors")
      >>> save(p, {"w": torch.zeros(1)}, metadata={"epoch": "3"})
      >>> read_metadata(p)
      {'epoch': '3'}
    """
    with open(path, "rb", buffering=0) as f:
        where = f"read_metadata(path): {os.fspath(path)}"
        header = _parse(f, where)
    return {k: v for k, v in header.metadata.items() if not k.startswith(RESERVED_PREFIX)}


def _parse(f: Any, where: str) -> Header:
    """The header; a file that fails to parse and starts like a pickle or a zip archive
    (``torch.save``) gets an error that says so (a valid header may start with 0x80 too,
    so this is only a hint after failure)."""
    head = f.read(4)
    f.seek(0)
    try:
        return parse_header(f, os.fstat(f.fileno()).st_size, where)
    except CheckpointError:
        for magic, what in _MAGIC_HINTS:
            if head.startswith(magic):
                raise CheckpointError(
                    f"{where}: this is {what}, not a safetensors checkpoint; it is never unpickled "
                    "here. For a torch state_dict use fp.serialization.load_torch (weights_only)"
                ) from None
        raise


def _tree_node(header: Header, where: str) -> Any:
    meta = header.metadata
    if META_TREE not in meta:
        if META_FORMAT in meta:
            raise CheckpointError(f"{where}: the header has a format version but no tree (corrupted)")
        names = list(header.tensors)  # a plain safetensors file: a flat dict in file order
        return {"t": "dict", "k": [{"t": "str", "v": n} for n in names], "c": [{"t": "tensor", "n": n} for n in names]}
    version = meta.get(META_FORMAT, "")
    if not version.isdigit() or len(version) > 6:
        raise CheckpointError(f"{where}: invalid format version {version[:20]!r} in the header (corrupted)")
    if int(version) > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: the checkpoint has format version {int(version)} but this functorch_pipeline "
            f"reads up to {FORMAT_VERSION}; upgrade functorch_pipeline"
        )
    try:
        return json.loads(meta[META_TREE], parse_constant=lambda c: _raise(ValueError(c)))
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: the tree in the header is not valid JSON: {str(e)[:200]}") from None


def _raise(e: Exception) -> Any:
    raise e


def _check_names(header: Header, leaves: list[tuple[KeyPath, dict[str, Any]]], where: str) -> list[str]:
    names = [n["n"] for _, n in leaves if n["t"] == "tensor"]
    seen: set[str] = set()
    for (p, n) in leaves:
        if n["t"] != "tensor":
            continue
        if n["n"] not in header.tensors:
            raise CheckpointError(f"{where}: the tree's leaf at path `{keystr(p)}` names tensor `{n['n'][:80]}`, which is not in the file")
        if n["n"] in seen:
            raise CheckpointError(f"{where}: tensor `{n['n'][:80]}` is used by more than one leaf (corrupted)")
        seen.add(n["n"])
    unused = [n for n in header.tensors if n not in seen]
    if unused:
        raise CheckpointError(f"{where}: tensors {unused[:5]} in the file are not part of the tree (corrupted)")
    paths = [p for p, _ in leaves]
    if len(set(paths)) != len(paths):
        raise CheckpointError(f"{where}: the tree has two leaves at the same key path (corrupted)")
    return names


def _describe(node: dict[str, Any], header: Header) -> str:
    if node["t"] == "tensor":
        info = header.tensors[node["n"]]
        return f"a tensor of shape {info.shape} and dtype {info.dtype}"
    v = node.get("v")
    shown = f" ({float.fromhex(v) if node['t'] == 'float' else v!r})"[:60] if "v" in node else ""
    return f"{_a(node['t'])}{shown}"


def _a(word: str) -> str:
    return ("an " if word[:1] in "aeiou" else "a ") + word


def _check_like(
    like_paths: list[KeyPath],
    like_leaves: list[Any],
    leaves: list[tuple[KeyPath, dict[str, Any]]],
    header: Header,
    where: str,
    problems: list[str] | None = None,
) -> None:
    disk = dict(leaves)
    problems = list(problems or [])
    for p, x in zip(like_paths, like_leaves, strict=True):
        k = keystr(p)
        if p not in disk:
            problems.append(f"leaf at path `{k}` is in `like` but not on disk")
            continue
        n = disk[p]
        if isinstance(x, torch.Tensor):
            if n["t"] != "tensor":
                problems.append(f"leaf at path `{k}` is a tensor in `like` but {_describe(n, header)} on disk")
                continue
            info = header.tensors[n["n"]]
            if tuple(x.shape) != info.shape:
                problems.append(f"leaf at path `{k}` has shape {tuple(x.shape)} in `like` but {info.shape} on disk")
            if x.dtype != info.dtype:
                problems.append(f"leaf at path `{k}` has dtype {x.dtype} in `like` but {info.dtype} on disk")
        else:
            want = type(x).__name__
            if n["t"] != want:
                problems.append(f"leaf at path `{k}` is {_a(want)} in `like` but {_describe(n, header)} on disk")
    like_set = set(like_paths)
    problems += [f"leaf at path `{keystr(p)}` is on disk but not in `like`" for p, _ in leaves if p not in like_set]
    if problems:
        raise CheckpointError(
            f"{where}: the checkpoint does not match `like` ({len(problems)} problem"
            f"{'s' if len(problems) > 1 else ''}):\n  " + "\n  ".join(problems)
        )


def _accountant_kinds(like: Any, node: Any, where: str) -> list[str]:
    """Mismatches between the ``kind`` of each ``fp.privacy.Accountant`` in ``like`` and
    the one on disk at the same key path.

    # NOTE [accountant kind and like]
    An ``Accountant``'s ``kind`` ("rdp" or "pld") is static pytree data, not a leaf, and
    the result takes ``like``'s containers, so a file saved with a "pld" accountant and
    loaded with an "rdp" template resumed as "rdp" without a word (its epsilon changed,
    0.79 to 1.00 on 2,000 steps at sigma 1.1). Like every other difference between the
    file and ``like``, a different kind is reported (key path, both values); load
    without ``like`` to keep the file's accountant as saved.
    """
    from functorch_pipeline.privacy import Accountant  # (a small module, no dp-accounting)

    paths, nodes, _ = flatten_with_path(like, is_leaf=lambda x: isinstance(x, Accountant))
    problems = []
    for p, acc in zip(paths, nodes, strict=True):
        if not isinstance(acc, Accountant):
            continue
        n = _node_at(node, p, where)
        if n is None or n.get("t") != "node" or not isinstance(n.get("aux"), dict):
            continue  # not an accountant on disk: the leaf checks report it
        aux = decode(n["aux"], _unreachable, where, p)
        kind = aux[0] if isinstance(aux, tuple) and len(aux) == 1 else aux
        if kind != acc.kind:
            problems.append(f"the Accountant at path `{keystr(p)}` has kind {acc.kind!r} in "
                            f"`like` but {kind!r} on disk (load without `like` to keep it)")
    return problems


def _node_at(node: Any, path: KeyPath, where: str) -> Any:
    """The header's node at key ``path``, or None if there is none."""
    for i, entry in enumerate(path):
        if not isinstance(node, dict) or node.get("t") not in _CONTAINERS:
            return None
        for e, child in children(node, where, path[:i]):
            if e == entry:
                node = child
                break
        else:
            return None
    return node


def _checksums(header: Header, n: int, where: str) -> list[int] | None:
    """The tensors' expected CRCs after checking the header's own (NOTE [checksum]);
    ``None`` for a file without checksums."""
    value = header.metadata.get(FIELD)
    if value is None:
        if int(header.metadata.get(META_FORMAT, "0")) >= 2:  # validated by _tree_node
            raise CheckpointError(
                f"{where}: the checksum field `{FIELD}` that format version 2 requires is "
                "missing (corrupted header); load(..., verify=False) skips the checksums"
            )
        return None
    parsed = parse_field(value, n)
    if parsed is None or not header.raw.startswith(PREFIX + value.encode() + b'"'):
        raise CheckpointError(
            f"{where}: the checksum field `{FIELD}` is malformed or not where fp.save puts it "
            "(corrupted, or the header was rewritten by another tool); load(..., verify=False) "
            "skips the checksums"
        )
    want, tensors = parsed
    got = header_crc(header.raw, len(value))
    if got != want:
        raise CheckpointError(
            f"{where}: the header's checksum does not match (CRC-32 {got:08x}, recorded "
            f"{want:08x}): the header is corrupted; load(..., verify=False) skips the checksums"
        )
    return tensors


def _read_all(
    f: Any,
    header: Header,
    order: list[TensorInfo],
    targets: dict[str, torch.device | None],
    expected: list[int] | None,
    where: str,
) -> dict[str, torch.Tensor]:
    """Read tensors in file order (sequential I/O), moving each to its device right away
    so that host memory holds at most one tensor when loading onto a GPU; with
    ``expected``, verify each tensor's CRC (computed on a worker thread for large ones
    while the next chunk is read, NOTE [checksum])."""
    out = {}
    crcs = Crc32s(len(order)) if expected is not None else None
    try:
        for i, info in enumerate(order):
            size = info.end - info.start
            hook = None if crcs is None else (lambda part, i=i, n=size: crcs.update(i, part, n))
            t = read_tensor(f, info, header.data_start, where, hook, CHUNK)
            dev = targets[info.name]
            if dev is not None and dev.type != "cpu":
                if crcs is not None:
                    _verify(info, crcs.wait_one(i), expected[i], where)  # type: ignore[index]
                t = t.to(dev)
            out[info.name] = t
        if crcs is not None and expected is not None:
            for info, got, want in zip(order, crcs.wait(), expected, strict=True):
                _verify(info, got, want, where)
    finally:
        if crcs is not None:
            crcs.close()
    return out


def _verify(info: TensorInfo, got: int, want: int, where: str) -> None:
    if got != want:
        raise CheckpointError(
            f"{where}: tensor `{info.name[:80]}` (bytes [{info.start}, {info.end}) of the data "
            f"section) does not match its checksum (CRC-32 {got:08x}, recorded {want:08x}): "
            "the file is corrupted; load(..., verify=False) skips the checksums"
        )


def _unreachable(name: str, path: KeyPath) -> torch.Tensor:
    raise AssertionError("scalar leaves have no tensors")
