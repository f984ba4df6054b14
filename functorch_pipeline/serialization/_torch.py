"""Interop with ``torch.save`` files: read a ``state_dict`` without unpickling code."""

from __future__ import annotations

import collections
import os
import pickle
from typing import Any

import torch

from functorch_pipeline.serialization._format import CheckpointError

__all__ = ["load_torch"]


def load_torch(
    path: str | os.PathLike[str],
    *,
    nested: bool = False,
    device: torch.device | str | int | None = None,
) -> dict[str, Any]:
    """Load a ``torch.save``-d ``state_dict`` (or a dict of them) into plain dicts.

    The file is read with ``torch.load(weights_only=True)``, PyTorch's restricted
    unpickler that only builds tensors and plain containers, so no code in the file can
    run. OrderedDicts become dicts.

    Args:
      path: a file written by ``torch.save``.
      nested: ``False`` (default) keeps the flat keys of ``state_dict``
        (``{"fc1.weight": ...}``), the layout ``fp.functionalize`` variables use;
        ``True`` splits keys on dots into nested dicts (``{"fc1": {"weight": ...}}``).
      device: where tensors go (``map_location``); default CPU.

    Returns:
      A dict of tensors (and nested dicts for checkpoints holding several state dicts).

    Raises:
      CheckpointError: the file holds something other than tensors and containers, or
        is not a valid ``torch.save`` file; in particular a safetensors file (as
        :func:`save` writes), which ``torch.load`` would read as a flat dict of its
        tensors, dropping the tree and every non-tensor leaf and skipping the checksums:
        load those with :func:`load`. ``OSError`` if it cannot be opened.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "model.pt")
    >>> torch.save(torch.nn.Linear(2, 1).state_dict(), p)
    >>> sorted(load_torch(p)), sorted(load_torch(p, nested=True)["weight"].shape)
    (['bias', 'weight'], [1, 2])
    """
    where = f"load_torch(path): {os.fsdecode(path)}"
    if _is_safetensors(path):
        raise CheckpointError(
            f"{where}: this is a safetensors file (fp.save writes these), not a torch.save "
            "file; load it with fp.load(path), which rebuilds the saved tree and verifies its "
            "checksums (torch.load would return only its tensors, unchecked)"
        )
    try:
        obj = torch.load(path, map_location=torch.device(device) if device is not None else "cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, ImportError) as e:
        raise CheckpointError(
            f"{where}: could not be loaded with torch.load(weights_only=True), which only builds "
            f"tensors and plain containers: {str(e).splitlines()[0][:300]}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where}: expected a state_dict (a dict of tensors), got a {type(obj).__name__}")
    return _convert(obj, nested, where)


def _is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether the file starts like a safetensors file: an 8-byte little-endian header
    length that fits in the file, then ``{`` (a zip or pickle never does)."""
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8 and head[8:9] == b"{"


def _convert(d: dict[Any, Any], nested: bool, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, (dict, collections.OrderedDict)):
            v = _convert(v, nested, where)
        if not nested or not isinstance(k, str) or "." not in k:
            out[k] = v
            continue
        *parents, last = k.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise CheckpointError(f"{where}: key {k!r} clashes with a tensor at `{p}`; load with nested=False")
        if last in node:
            raise CheckpointError(f"{where}: key {k!r} clashes with another key; load with nested=False")
        node[last] = v
    return out
