"""torchvision's MNIST, FashionMNIST and CIFAR-10 with the usual normalisation, as
datasets (for a ``DataLoader``) or as preloaded tensors (for :func:`batches`, ~2x faster).

# NOTE [offline datasets]
These machines may have no internet. Nothing is downloaded unless ``download=True``;
when the files are missing (or a download fails) the error lists every expected file
under ``root``, so the fix is a copy, not a guess.

torchvision reads the files and is optional (``pip install "functorch-pipeline[examples]"``);
without it every function here raises an ``ImportError`` naming that extra.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from functorch_pipeline._extras import require_extra

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "cifar10",
    "cifar10_tensors",
    "fashion_mnist",
    "fashion_mnist_tensors",
    "mnist",
    "mnist_tensors",
]

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

_MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@dataclasses.dataclass(frozen=True)
class _Spec:
    cls_name: str
    folder: str  # relative to root
    files: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    how: str


_SPECS = {
    "mnist": _Spec(
        "MNIST", "MNIST/raw", _MNIST_FILES, MNIST_MEAN, MNIST_STD,
        "uncompressed, as gunzip leaves them (the .gz files are at https://ossci-datasets.s3.amazonaws.com/mnist/)",
    ),
    "fashion_mnist": _Spec(
        "FashionMNIST", "FashionMNIST/raw", _MNIST_FILES, FASHION_MNIST_MEAN, FASHION_MNIST_STD,
        "uncompressed (the .gz files are at http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/)",
    ),
    "cifar10": _Spec(
        "CIFAR10", "cifar-10-batches-py",
        [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"], CIFAR10_MEAN, CIFAR10_STD,
        "as extracted from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz (tar xzf in root)",
    ),
}


def _missing_error(fn: str, spec: _Spec, root: str, cause: BaseException | None) -> FileNotFoundError:
    folder = os.path.join(root, spec.folder)
    missing = [f for f in spec.files if not os.path.isfile(os.path.join(folder, f))]
    lines = "\n".join(f"  {os.path.join(folder, f)}{'' if f in missing else '   (present)'}" for f in spec.files)
    why = f" (download failed: {type(cause).__name__}: {str(cause)[:200]})" if cause is not None else ""
    return FileNotFoundError(
        f"{fn}: {spec.cls_name} not found under root={root!r}{why}. Put these files there, {spec.how}:\n"
        f"{lines}\nor pass download=True on a machine with internet access."
    )


def _torchvision(fn: str) -> Any:
    """Import torchvision (an optional dependency) or raise an ImportError naming the extra."""
    return require_extra("torchvision", fn, "reading the dataset files", "torchvision", "examples")


def _dataset(name: str, fn: str, root: str | os.PathLike[str], train: bool, download: bool, transform: Any) -> Any:
    torchvision = _torchvision(fn)
    spec = _SPECS[name]
    root = os.fspath(root)
    folder = os.path.join(root, spec.folder)
    if not download and not all(os.path.isfile(os.path.join(folder, f)) for f in spec.files):
        raise _missing_error(fn, spec, root, None)
    cls = getattr(torchvision.datasets, spec.cls_name)
    try:
        return cls(root=root, train=train, download=download, transform=transform)
    except (OSError, RuntimeError) as e:  # a failed download, or files torchvision rejects
        if all(os.path.isfile(os.path.join(folder, f)) for f in spec.files) and not download:
            raise
        raise _missing_error(fn, spec, root, e) from e


def _default_transform(name: str) -> Any:
    transforms = _torchvision(f"{name}(root)").transforms
    spec = _SPECS[name]
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])


def mnist(root: str | os.PathLike[str], train: bool = True, *, download: bool = False, transform: Any = "default") -> Any:
    """torchvision's MNIST with the usual ``ToTensor()`` + ``Normalize((0.1307,), (0.3081,))``.

    Args:
      root: the folder holding ``MNIST/raw/`` (e.g. ``../shared/data``).
      train: the 60k training split, else the 10k test split.
      download: fetch the files if missing (needs internet). Offline, a missing file
        raises ``FileNotFoundError`` listing every expected path (NOTE [offline datasets]).
      transform: ``"default"`` for the normalisation above, ``None`` for PIL images, or
        any torchvision transform.

    Returns:
      A ``torchvision.datasets.MNIST``.

    Notes:
      NOTE [offline datasets]: nothing is downloaded unless ``download=True``; when files are
        missing the error lists every expected file under ``root``.

    Examples:
      >>> import tempfile
      >>> import functorch_pipeline as fp
      >>> root = tempfile.mkdtemp()
      >>> _ = fp.data.write_synthetic_mnist(root, num_train=8, num_test=4)
      >>> ds = mnist(root)
      >>> x, y = ds[0]
      >>> x.shape, type(y)
      (torch.Size([1, 28, 28]), <class 'int'>)
    """
    t = _default_transform("mnist") if transform == "default" else transform
    return _dataset("mnist", "mnist(root)", root, train, download, t)


def fashion_mnist(
    root: str | os.PathLike[str], train: bool = True, *, download: bool = False, transform: Any = "default"
) -> Any:
    """torchvision's FashionMNIST, normalised with mean 0.2860 and std 0.3530; files in
    ``<root>/FashionMNIST/raw/``. Arguments as :func:`mnist`.

    Args:
        root: the dataset root, holding torchvision's folder for this dataset.
        train: the training split, else the test split.
        download: fetch the files if missing (needs internet); offline, a missing file raises
            ``FileNotFoundError`` listing the expected paths.
        transform: ``"default"`` for the normalisation above, ``None`` for PIL images, or any
            torchvision transform.

    Returns:
        A ``torchvision.datasets.FashionMNIST``.

    Examples:
        >>> import tempfile
        >>> fashion_mnist(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        FileNotFoundError: fashion_mnist(root): FashionMNIST not found under root=...
    """
    t = _default_transform("fashion_mnist") if transform == "default" else transform
    return _dataset("fashion_mnist", "fashion_mnist(root)", root, train, download, t)


def cifar10(root: str | os.PathLike[str], train: bool = True, *, download: bool = False, transform: Any = "default") -> Any:
    """torchvision's CIFAR-10, normalised per channel with mean (0.4914, 0.4822, 0.4465)
    and std (0.2470, 0.2435, 0.2616); files in ``<root>/cifar-10-batches-py/``.
    Arguments as :func:`mnist`.

    Args:
        root: the dataset root, holding torchvision's folder for this dataset.
        train: the training split, else the test split.
        download: fetch the files if missing (needs internet); offline, a missing file raises
            ``FileNotFoundError`` listing the expected paths.
        transform: ``"default"`` for the normalisation above, ``None`` for PIL images, or any
            torchvision transform.

    Returns:
        A ``torchvision.datasets.CIFAR10``.

    Examples:
        >>> import tempfile
        >>> cifar10(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        FileNotFoundError: cifar10(root): CIFAR10 not found under root=...
    """
    t = _default_transform("cifar10") if transform == "default" else transform
    return _dataset("cifar10", "cifar10(root)", root, train, download, t)


def _to_tensors(name: str, ds: Any, normalize: bool, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    spec = _SPECS[name]
    data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(ds.data)
    x = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)  # (N, C, H, W)
    x = x.to(device=device, dtype=torch.float32).div_(255)
    if normalize:
        mean = torch.tensor(spec.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(spec.std, device=x.device).view(1, -1, 1, 1)
        x = x.sub_(mean).div_(std)
    y = torch.as_tensor(ds.targets, dtype=torch.int64).to(device)
    return x.contiguous(), y


def mnist_tensors(
    root: str | os.PathLike[str], train: bool = True, *, download: bool = False, normalize: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST preloaded as ``(images, labels)``: float32 ``(N, 1, 28, 28)`` scaled to [0, 1]
    and normalised like :func:`mnist` (unless ``normalize=False``), int64 labels ``(N,)``.
    Use with :func:`batches`.

    Args:
        root: the dataset root, holding torchvision's folder for this dataset.
        train: the training split, else the test split.
        download: fetch the files if missing (needs internet); offline, a missing file raises
            ``FileNotFoundError`` listing the expected paths.
        normalize: normalise with the dataset's per-channel mean and std (else only scale to [0,
            1]).
        device: where to put the tensors (default: CPU).

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 28, 28)`` and int64 ``(N,)``.

    Examples:
        >>> import tempfile
        >>> import functorch_pipeline as fp
        >>> root = tempfile.mkdtemp()
        >>> _ = fp.data.write_synthetic_mnist(root, num_train=8, num_test=4)
        >>> x, y = mnist_tensors(root, train=False)
        >>> x.shape, x.dtype, y.dtype
        (torch.Size([4, 1, 28, 28]), torch.float32, torch.int64)
    """
    ds = _dataset("mnist", "mnist_tensors(root)", root, train, download, None)
    return _to_tensors("mnist", ds, normalize, device)


def fashion_mnist_tensors(
    root: str | os.PathLike[str], train: bool = True, *, download: bool = False, normalize: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FashionMNIST preloaded as ``(images, labels)``; see :func:`mnist_tensors`.

    Args:
        root: the dataset root, holding torchvision's folder for this dataset.
        train: the training split, else the test split.
        download: fetch the files if missing (needs internet); offline, a missing file raises
            ``FileNotFoundError`` listing the expected paths.
        normalize: normalise with the dataset's per-channel mean and std (else only scale to [0,
            1]).
        device: where to put the tensors (default: CPU).

    Returns:
        ``(images, labels)``: float32 ``(N, 1, 28, 28)`` and int64 ``(N,)``.

    Examples:
        >>> import tempfile
        >>> import functorch_pipeline as fp
        >>> root = tempfile.mkdtemp()
        >>> _ = fp.data.write_synthetic_mnist(root, num_train=8, num_test=4, name="FashionMNIST")
        >>> x, y = fashion_mnist_tensors(root)
        >>> x.shape
        torch.Size([8, 1, 28, 28])
    """
    ds = _dataset("fashion_mnist", "fashion_mnist_tensors(root)", root, train, download, None)
    return _to_tensors("fashion_mnist", ds, normalize, device)


def cifar10_tensors(
    root: str | os.PathLike[str], train: bool = True, *, download: bool = False, normalize: bool = True,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 preloaded as float32 ``(N, 3, 32, 32)`` images and int64 labels; see
    :func:`mnist_tensors`.

    Args:
        root: the dataset root, holding torchvision's folder for this dataset.
        train: the training split, else the test split.
        download: fetch the files if missing (needs internet); offline, a missing file raises
            ``FileNotFoundError`` listing the expected paths.
        normalize: normalise with the dataset's per-channel mean and std (else only scale to [0,
            1]).
        device: where to put the tensors (default: CPU).

    Returns:
        ``(images, labels)``: float32 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    Examples:
        >>> import tempfile
        >>> cifar10_tensors(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        FileNotFoundError: cifar10_tensors(root): CIFAR10 not found under root=...
    """
    ds = _dataset("cifar10", "cifar10_tensors(root)", root, train, download, None)
    return _to_tensors("cifar10", ds, normalize, device)
