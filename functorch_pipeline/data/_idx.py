"""Write small IDX files (MNIST's on-disk format) so tests run torchvision's real reader,
and check IDX files before torchvision reads them (its errors name neither file nor fault).
"""

from __future__ import annotations

import math
import os

import torch

from functorch_pipeline import random as _random
from functorch_pipeline.data._batches import _as_int

__all__ = ["write_idx", "write_synthetic_mnist"]

_IDX_CODES = {
    torch.uint8: 0x08,
    torch.int8: 0x09,
    torch.int16: 0x0B,
    torch.int32: 0x0C,
    torch.float32: 0x0D,
    torch.float64: 0x0E,
}

_IDX_DTYPES = {code: dtype for dtype, code in _IDX_CODES.items()}

_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def write_idx(path: str | os.PathLike[str], tensor: torch.Tensor) -> None:
    """Write ``tensor`` as an IDX file: magic ``00 00 <type> <ndim>``, each dimension as a
    big-endian uint32, then the values big-endian (the format of MNIST's files).

    Args:
      path: the file to write.
      tensor: uint8, int8, int16, int32, float32 or float64, 1 to 255 dimensions.

    >>> import tempfile, os, pathlib
    >>> p = os.path.join(tempfile.mkdtemp(), "x-idx1-ubyte")
    >>> write_idx(p, torch.tensor([1, 2, 3], dtype=torch.uint8))
    >>> pathlib.Path(p).read_bytes().hex()
    '0000080100000003010203'
    """
    if tensor.dtype not in _IDX_CODES:
        raise TypeError(f"write_idx(path, tensor): dtype {tensor.dtype} has no IDX code; use one of {list(_IDX_CODES)}")
    if not 1 <= tensor.dim() <= 255:
        raise ValueError(f"write_idx(path, tensor): need 1 to 255 dimensions, got {tensor.dim()}")
    t = tensor.detach().cpu().contiguous()
    body = t.numpy().astype(t.numpy().dtype.newbyteorder(">")).tobytes()
    head = bytes([0, 0, _IDX_CODES[t.dtype], t.dim()]) + b"".join(d.to_bytes(4, "big") for d in t.shape)
    with open(path, "wb") as f:
        f.write(head + body)


def write_synthetic_mnist(
    root: str | os.PathLike[str],
    *,
    num_train: int = 256,
    num_test: int = 64,
    key: torch.Tensor | None = None,
    name: str = "MNIST",
    num_classes: int = 10,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write a small learnable stand-in for MNIST in torchvision's on-disk layout.

    Files go to ``<root>/<name>/raw/`` with MNIST's file names, so
    ``torchvision.datasets.MNIST(root)`` (``name="MNIST"``) or ``FashionMNIST``
    (``name="FashionMNIST"``) and :func:`mnist` read them with their real loading code.
    Each 28x28 uint8 image is noise plus a bright horizontal bar whose row depends on the
    label, so a small model can learn it in a few steps.

    Args:
      root: the dataset root (what you pass as ``root=`` to the loaders).
      num_train, num_test: numbers of examples, ints >= 1.
      key: ``fp.random`` key for the images and labels (default ``key(0)``).
      name: ``"MNIST"`` or ``"FashionMNIST"`` (the folder torchvision looks in).
      num_classes: labels are drawn from ``range(num_classes)`` (at most 10).

    Returns:
      ``{"train": (images, labels), "test": (images, labels)}``, the uint8 images
      ``(N, 28, 28)`` and int64 labels that were written.

    >>> import tempfile
    >>> root = tempfile.mkdtemp()
    >>> out = write_synthetic_mnist(root, num_train=8, num_test=4)
    >>> out["train"][0].shape, sorted(os.listdir(os.path.join(root, "MNIST", "raw")))[:2]
    (torch.Size([8, 28, 28]), ['t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'])
    """
    if not 1 <= num_classes <= 10:
        raise ValueError(f"write_synthetic_mnist: `num_classes` must be in [1, 10], got {num_classes}")
    counts = {}
    for arg, value in (("num_train", num_train), ("num_test", num_test)):
        counts[arg] = _as_int(value)
        if counts[arg] is None or counts[arg] < 1:
            raise ValueError(
                f"write_synthetic_mnist: `{arg}` must be an int >= 1 (torchvision cannot read an "
                f"IDX file of 0 examples), got {value!r}"
            )
    num_train, num_test = counts["num_train"], counts["num_test"]
    key = _random.key(0) if key is None else key
    raw = os.path.join(os.fspath(root), name, "raw")
    os.makedirs(raw, exist_ok=True)
    out = {}
    for split, n, k in (("train", num_train, _random.fold_in(key, 0)), ("test", num_test, _random.fold_in(key, 1))):
        k_lab, k_img = _random.split(k)
        labels = _random.randint(k_lab, (n,), 0, num_classes)
        noise = _random.uniform(k_img, (n, 28, 28)) * 80
        rows = torch.arange(28).view(1, 28, 1)
        bar = (rows // 2 - 2 == labels.view(n, 1, 1)).float() * 170
        images = (noise + bar).clamp(0, 255).to(torch.uint8)
        img_file, lab_file = _FILES[split == "train"]
        write_idx(os.path.join(raw, img_file), images)
        write_idx(os.path.join(raw, lab_file), labels.to(torch.uint8))
        out[split] = (images, labels)
    return out


def _check_idx(where: str, path: str, code: int, shape: tuple[int | None, ...]) -> tuple[int, ...]:
    """Check the IDX file at ``path`` against a type ``code`` and a ``shape`` (``None``: any
    size), reading only its header and its size on disk; return its shape.

    Raises ``ValueError`` naming ``where``, the file, and what was expected and found.
    """

    def bad(what: str, fix: str = "the file is corrupt or not the original: replace it "
            "(uncompressed, as gunzip leaves it)") -> ValueError:
        return ValueError(f"{where}: {path} is not a valid IDX file: {what}; {fix}")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(4 + 4 * 255)
    if size < 4:
        raise bad(f"it has {size} bytes, fewer than the 4-byte magic number")
    if head[:2] == b"\x1f\x8b":
        raise bad("it is gzip-compressed (it starts with 1f 8b)", "gunzip it first")
    if head[:2] != b"\0\0":
        raise bad(f"the magic number must start with 00 00, got {head[:4].hex(' ')}")
    want = f"0x{code:02x} ({_dtype_name(code)})"
    if head[2] != code:
        got = _dtype_name(head[2]) if head[2] in _IDX_DTYPES else "not an IDX type code"
        raise bad(f"expected type code {want}, got 0x{head[2]:02x} ({got})")
    if head[3] != len(shape):
        raise bad(f"expected {len(shape)} dimension(s), got {head[3]}")
    header = 4 + 4 * len(shape)
    if size < header:
        raise bad(f"it has {size} bytes, fewer than its {header}-byte header")
    dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(len(shape)))
    if any(w is not None and w != d for w, d in zip(shape, dims, strict=True)):
        expected = "(" + ", ".join("N" if w is None else str(w) for w in shape) + ")"
        raise bad(f"expected shape {expected}, got {dims}")
    data = math.prod(dims) * _IDX_DTYPES[code].itemsize
    expected_size = header + data
    if size != expected_size:
        diff = size - expected_size
        how = f"{-diff} bytes short (truncated)" if diff < 0 else f"{diff} extra bytes at the end"
        raise bad(
            f"its header says shape {dims}, {expected_size} bytes in all ({header} header + "
            f"{data} data), but it has {size}: {how}"
        )
    return dims


def _dtype_name(code: int) -> str:
    return str(_IDX_DTYPES[code]).removeprefix("torch.")
