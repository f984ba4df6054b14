"""``fp.data``: batches as pytrees on a device, standard datasets, synthetic test data.

- :class:`DeviceLoader` / :func:`prefetch_to_device`: any ``DataLoader`` or iterable of
  batches, delivered on a device (pinned, non-blocking and prefetched on CUDA; untouched
  on the CPU).
- :func:`batches`: minibatches of preloaded tensors, shuffled by an ``fp.random`` key so
  that data order is part of an exactly resumable training state.
- :func:`mnist`, :func:`fashion_mnist`, :func:`cifar10` (torchvision datasets, usual
  normalisation) and their ``*_tensors`` forms; offline, a missing file is named.
- :func:`poisson_batches`: Poisson-sampled batches (what DP-SGD accounting assumes), of
  variable size or padded to one shape with a mask (:func:`pad_batch`, :func:`masked_sum`,
  :func:`unpad`, :func:`check_mask`); :func:`poisson_max_batch_size` picks the cap.
- :func:`write_idx`, :func:`write_synthetic_mnist`: small MNIST-format files for tests.
"""

from functorch_pipeline.data._batches import batches
from functorch_pipeline.data._batches import num_batches
from functorch_pipeline.data._datasets import CIFAR10_MEAN
from functorch_pipeline.data._datasets import CIFAR10_STD
from functorch_pipeline.data._datasets import FASHION_MNIST_MEAN
from functorch_pipeline.data._datasets import FASHION_MNIST_STD
from functorch_pipeline.data._datasets import MNIST_MEAN
from functorch_pipeline.data._datasets import MNIST_STD
from functorch_pipeline.data._datasets import cifar10
from functorch_pipeline.data._datasets import cifar10_tensors
from functorch_pipeline.data._datasets import fashion_mnist
from functorch_pipeline.data._datasets import fashion_mnist_tensors
from functorch_pipeline.data._datasets import mnist
from functorch_pipeline.data._datasets import mnist_tensors
from functorch_pipeline.data._idx import write_idx
from functorch_pipeline.data._idx import write_synthetic_mnist
from functorch_pipeline.data._loader import DeviceLoader
from functorch_pipeline.data._loader import prefetch_to_device
from functorch_pipeline.data._mask import check_mask
from functorch_pipeline.data._mask import masked_sum
from functorch_pipeline.data._mask import pad_batch
from functorch_pipeline.data._mask import unpad
from functorch_pipeline.data._poisson import poisson_batches
from functorch_pipeline.data._poisson import poisson_mask
from functorch_pipeline.data._poisson import poisson_max_batch_size

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "DeviceLoader",
    "batches",
    "check_mask",
    "cifar10",
    "cifar10_tensors",
    "fashion_mnist",
    "fashion_mnist_tensors",
    "masked_sum",
    "mnist",
    "mnist_tensors",
    "num_batches",
    "pad_batch",
    "poisson_batches",
    "poisson_mask",
    "poisson_max_batch_size",
    "prefetch_to_device",
    "unpad",
    "write_idx",
    "write_synthetic_mnist",
]
