"""fp.data datasets: synthetic IDX files read by torchvision's real code, normalisation,
offline errors that name every missing file, and real MNIST when it is present."""

import os

import numpy as np
import pytest
import torch

import functorch_pipeline as fp
from functorch_pipeline import data

torchvision = pytest.importorskip("torchvision")
from torchvision.datasets import mnist as tv_mnist  # noqa: E402

REAL_ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data")


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
def test_write_idx_read_by_torchvision(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, 5, generator=g) * 100).to(dtype)
    p = tmp_path / "x-idx3-ubyte"
    data.write_idx(p, x)
    assert torch.equal(tv_mnist.read_sn3_pascalvincent_tensor(str(p)), x)
    assert len(p.read_bytes()) == 4 + 4 * 3 + x.numel() * x.element_size()


def test_write_idx_bad_input(tmp_path):
    with pytest.raises(TypeError, match=r"write_idx\(path, tensor\): dtype torch.int64 has no IDX code"):
        data.write_idx(tmp_path / "x", torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"need 1 to 255 dimensions, got 0"):
        data.write_idx(tmp_path / "x", torch.tensor(1, dtype=torch.uint8))


def test_synthetic_mnist_through_torchvision(tmp_path):
    written = data.write_synthetic_mnist(tmp_path, num_train=32, num_test=8, key=fp.random.key(5))
    tv = torchvision.datasets.MNIST(tmp_path, train=True)  # the real loading code
    assert torch.equal(tv.data, written["train"][0]) and torch.equal(tv.targets, written["train"][1])
    test = torchvision.datasets.MNIST(tmp_path, train=False)
    assert len(test) == 8
    # Deterministic in the key, different for another key.
    again = data.write_synthetic_mnist(tmp_path / "b", num_train=32, num_test=8, key=fp.random.key(5))
    assert torch.equal(again["train"][0], written["train"][0])
    other = data.write_synthetic_mnist(tmp_path / "c", num_train=32, num_test=8, key=fp.random.key(6))
    assert not torch.equal(other["train"][0], written["train"][0])


def test_mnist_dataset_normalisation_and_tensors(tmp_path):
    written = data.write_synthetic_mnist(tmp_path, num_train=16, num_test=4)
    ds = data.mnist(tmp_path)
    x, y = data.mnist_tensors(tmp_path)
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    for i in range(16):
        img, label = ds[i]
        ref = (written["train"][0][i].double() / 255 - 0.1307) / 0.3081  # by hand
        torch.testing.assert_close(img[0].double(), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(x[i], img)
        assert label == int(y[i]) == int(written["train"][1][i])
    raw, _ = data.mnist_tensors(tmp_path, normalize=False)
    torch.testing.assert_close(raw, written["train"][0].unsqueeze(1).float() / 255)
    assert data.mnist(tmp_path, transform=None)[0][0].size == (28, 28)  # a PIL image


def test_fashion_mnist_reads_its_own_folder(tmp_path):
    written = data.write_synthetic_mnist(tmp_path, num_train=8, num_test=4, name="FashionMNIST")
    x, y = data.fashion_mnist_tensors(tmp_path, train=False)
    ref = (written["test"][0].unsqueeze(1).double() / 255 - 0.2860) / 0.3530
    torch.testing.assert_close(x.double(), ref, rtol=0, atol=1e-6)
    assert torch.equal(y, written["test"][1])
    with pytest.raises(FileNotFoundError, match=r"mnist\(root\): MNIST not found"):
        data.mnist(tmp_path)


def test_synthetic_data_is_learnable_through_a_device_loader(tmp_path):
    data.write_synthetic_mnist(tmp_path, num_train=64, num_test=8)
    loader = data.DeviceLoader(torch.utils.data.DataLoader(data.mnist(tmp_path), batch_size=16), "cpu")
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    # The label is the row of the bright bar: the brightest row predicts it.
    pred = x[:, 0].mean(dim=2).argmax(dim=1) // 2 - 2
    assert (pred == y).float().mean() > 0.9


def test_offline_errors_name_every_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.mnist(tmp_path)
    msg = str(e.value)
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]:
        assert os.path.join(str(tmp_path), "MNIST/raw", f) in msg
    assert "download=True" in msg and "uncompressed" in msg
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte   \(present\)"):
        data.mnist_tensors(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        data.cifar10(tmp_path, train=False)
    msg = str(e.value)
    for f in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        assert os.path.join(str(tmp_path), "cifar-10-batches-py", f) in msg
    assert "cifar-10-python.tar.gz" in msg


def test_failed_download_gives_the_same_guidance(tmp_path, monkeypatch):
    def no_network(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    with pytest.raises(FileNotFoundError, match=r"download failed: RuntimeError: Error downloading.*Put these files there"):
        data.mnist(tmp_path, download=True)


@pytest.mark.skipif(not os.path.isfile(os.path.join(REAL_ROOT, "MNIST", "raw", "train-images-idx3-ubyte")), reason="real MNIST absent")
def test_real_mnist():
    x, y = data.mnist_tensors(REAL_ROOT, normalize=False)
    assert x.shape == (60000, 1, 28, 28)
    assert abs(float(x.mean()) - 0.1307) < 1e-4
    assert np.bincount(y.numpy()).tolist()[:3] == [5923, 6742, 5958]
    xt, _ = data.mnist_tensors(REAL_ROOT, train=False)
    assert xt.shape == (10000, 1, 28, 28)
