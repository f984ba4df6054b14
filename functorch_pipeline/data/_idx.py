"""Write small IDX files (MNIST's on-disk format) so tests run torchvision's real reader."""

from __future__ import annotations

import os

import torch

from functorch_pipeline import random as _random

__all__ = ["write_idx", "write_synthetic_mnist"]

_IDX_CODES = {
    torch.uint8: 0x08,
    torch.int8: 0x09,
    torch.int16: 0x0B,
    torch.int32: 0x0C,
    torch.float32: 0x0D,
    torch.float64: 0x0E,
}

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
      num_train, num_test: numbers of examples.
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
