"""torchvision's MNIST, FashionMNIST and CIFAR-10 with the usual normalisation, as
datasets (for a ``DataLoader``) or as preloaded tensors (for :func:`batches`, ~2x faster).

# NOTE [offline datasets]
These machines may have no internet. Nothing is downloaded unless ``download=True``;
when the files are missing (or a download fails) the error lists every expected file
under ``root``, so the fix is a copy, not a guess.

# NOTE [checked MNIST files]
torchvision's MNIST reader checks little and says less: a bad magic number fails a bare
``assert``, a truncated file a ``view`` of the wrong size, and image and label files of
different lengths, images that are not 28x28, or labels past 9 are accepted silently.
Before torchvision reads an MNIST-format split, its two files are checked here from
their headers and sizes (:func:`~functorch_pipeline.data._idx._check_idx`) and the labels
against ``range(10)``; a ``ValueError`` names the function, the file, and what was
expected and found. The label file is read once more for this (60 kB for MNIST). Files
present but unreadable for any other reason raise a ``ValueError`` naming the folder,
never the "not found" error.

torchvision reads the files and is optional (``pip install "functorch-pipeline[examples]"``);
without it every function here raises an ``ImportError`` naming that extra.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from functorch_pipeline._extras import require_extra
from functorch_pipeline.data._idx import _check_idx

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
_MNIST_CLASSES = 10


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


def _check_mnist_split(fn: str, folder: str, train: bool) -> None:
    """NOTE [checked MNIST files]: the split's image and label files, before torchvision."""
    prefix = "train" if train else "t10k"
    images = os.path.join(folder, f"{prefix}-images-idx3-ubyte")
    labels = os.path.join(folder, f"{prefix}-labels-idx1-ubyte")
    n_images = _check_idx(fn, images, 0x08, (None, 28, 28))[0]
    n_labels = _check_idx(fn, labels, 0x08, (None,))[0]
    if n_images != n_labels:
        raise ValueError(
            f"{fn}: {images} holds {n_images} images but {labels} holds {n_labels} labels; "
            "the two files must be of the same split and download: replace them"
        )
    if n_images == 0:
        raise ValueError(f"{fn}: {images} holds 0 images, which torchvision cannot read")
    with open(labels, "rb") as f:
        values = torch.frombuffer(bytearray(f.read()[8:]), dtype=torch.uint8)
    if int(values.max()) >= _MNIST_CLASSES:
        i = int(torch.nonzero(values >= _MNIST_CLASSES)[0, 0])
        raise ValueError(
            f"{fn}: {labels}: labels must be in [0, {_MNIST_CLASSES - 1}], got {int(values[i])} "
            f"at index {i}; the file is corrupt or not the original: replace it"
        )


def _dataset(name: str, fn: str, root: str | os.PathLike[str], train: bool, download: bool, transform: Any) -> Any:
    torchvision = _torchvision(fn)
    spec = _SPECS[name]
    root = os.fspath(root)
    folder = os.path.join(root, spec.folder)
    present = all(os.path.isfile(os.path.join(folder, f)) for f in spec.files)
    if not download and not present:
        raise _missing_error(fn, spec, root, None)
    mnist_format = spec.files == _MNIST_FILES
    if present and mnist_format:
        _check_mnist_split(fn, folder, train)
    cls = getattr(torchvision.datasets, spec.cls_name)
    try:
        ds = cls(root=root, train=train, download=download, transform=transform)
    except Exception as e:  # a failed download, or files torchvision rejects
        if not present:
            raise _missing_error(fn, spec, root, e) from e
        raise ValueError(
            f"{fn}: torchvision could not read the {spec.cls_name} files in {folder} "
            f"({type(e).__name__}: {str(e)[:200]}); they are corrupt or not the originals: "
            f"replace them, {spec.how}"
        ) from e
    if not present and mnist_format:  # just downloaded
        _check_mnist_split(fn, folder, train)
    if len(ds.data) != len(ds.targets):  # any dataset, however it was read
        raise ValueError(
            f"{fn}: the {spec.cls_name} files in {folder} hold {len(ds.data)} images but "
            f"{len(ds.targets)} labels; replace them, {spec.how}"
        )
    return ds


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

    Raises:
      FileNotFoundError: a file is missing (the message lists every expected path).
      ValueError: a file is corrupt, naming it and what was expected and found (bad magic
        number, type code, dimensions or size; images not 28x28; image and label counts
        that differ; a label past 9).

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

    Raises:
        FileNotFoundError: a file is missing (the message lists every expected path).
        ValueError: a file is corrupt, naming it and what was expected and found (bad magic
            number, type code, dimensions or size; images not 28x28; image and label counts
            that differ; a label past 9).

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

    Raises:
        FileNotFoundError: a file is missing (the message lists every expected path).
        ValueError: the files are present but torchvision cannot read them, or they hold
            different numbers of images and labels.

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

    Raises:
        FileNotFoundError: a file is missing (the message lists every expected path).
        ValueError: a file is corrupt, naming it and what was expected and found (bad magic
            number, type code, dimensions or size; images not 28x28; image and label counts
            that differ; a label past 9).

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

    Raises:
        FileNotFoundError: a file is missing (the message lists every expected path).
        ValueError: a file is corrupt, naming it and what was expected and found (bad magic
            number, type code, dimensions or size; images not 28x28; image and label counts
            that differ; a label past 9).

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

    Raises:
        FileNotFoundError: a file is missing (the message lists every expected path).
        ValueError: the files are present but torchvision cannot read them, or they hold
            different numbers of images and labels.

    Examples:
        >>> import tempfile
        >>> cifar10_tensors(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        FileNotFoundError: cifar10_tensors(root): CIFAR10 not found under root=...
    """
    ds = _dataset("cifar10", "cifar10_tensors(root)", root, train, download, None)
    return _to_tensors("cifar10", ds, normalize, device)
