"""fp.data fixes of sweep 23: gradients through padded empty batches (against a float64
per-example autograd loop), checked MNIST/IDX files (errors naming the API, the file and
expected vs got), every batch of a CPU prefetch on the CPU, and argument checks (numpy
numbers, keys, sizes)."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline import data

KEY = fp.random.key(23)

# ------------------------------------------------------------ padding and gradients

# functions with a singular point at 0, at 1 or at -1: their derivative is infinite there
FUNCTIONS = {
    "log": torch.log,
    "sqrt": torch.sqrt,
    "x/|x|": lambda v: v / v.abs(),
    "1/x": torch.reciprocal,
    "log(1-x)": lambda v: torch.log1p(-v),
    "logit": torch.logit,
    "atanh": torch.atanh,
    "acos": torch.acos,
}


def _padded_grad(f, rows: torch.Tensor, size: int) -> torch.Tensor:
    w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    (px,), mask = data.pad_batch((rows,), size)
    loss = data.masked_sum(f(px * w), mask).sum()
    return torch.autograd.grad(loss, w)[0]


def _loop_grad(f, rows: torch.Tensor) -> torch.Tensor:
    """The reference: d/dw sum_i f(x_i * w) by autograd, one real example at a time."""
    total = torch.zeros((), dtype=torch.float64)
    for x in rows:
        w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        total = total + torch.autograd.grad(f(x * w).sum(), w)[0]
    return total  # an empty batch: the gradient of an empty sum, 0


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_empty_padded_batch_has_the_gradient_of_an_empty_sum(name):
    f = FUNCTIONS[name]
    g = _padded_grad(f, torch.empty(0, 3, dtype=torch.float64), 4)
    assert torch.equal(g, torch.zeros((), dtype=torch.float64)), f"{name}: {g}"  # not nan


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(FUNCTIONS)),
    values=st.lists(st.floats(0.05, 0.95), min_size=0, max_size=5),
    extra=st.integers(0, 3),
)
def test_padded_masked_sum_gradient_matches_a_per_example_loop(name, values, extra):
    f = FUNCTIONS[name]
    rows = torch.tensor(values, dtype=torch.float64).reshape(-1, 1)
    got = _padded_grad(f, rows, len(values) + extra)
    torch.testing.assert_close(got, _loop_grad(f, rows), rtol=1e-12, atol=1e-12)


def test_empty_padded_batch_through_a_model_gives_zero_gradients():
    """Floating padding is 0.5, integer padding 0 (a valid label): a classifier with a log
    of its input and cross entropy gives finite zero gradients on an all-padding batch."""
    (x, y), mask = data.pad_batch((torch.empty(0, 3, dtype=torch.float64),
                                   torch.empty(0, dtype=torch.long)), 5)
    assert x.tolist() == [[0.5] * 3] * 5 and y.tolist() == [0] * 5 and not mask.any()
    w = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    logits = torch.log(x) @ w
    loss = data.masked_sum(torch.nn.functional.cross_entropy(logits, y, reduction="none"), mask)
    (g,) = torch.autograd.grad(loss, w)
    assert torch.equal(g, torch.zeros_like(w))
    # masked_sum's own backward: exactly 0 on padding rows whatever they hold
    t = torch.tensor([[1.0, 2.0], [float("nan"), float("inf")], [3.0, -float("inf")]],
                     requires_grad=True)
    (gt,) = torch.autograd.grad(data.masked_sum(t, torch.tensor([True, False, False])).sum(), t)
    assert gt.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]


# ------------------------------------------------------------------ MNIST / IDX files

IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def _mnist_root(tmp_path, edit=None, file=IMAGES):
    data.write_synthetic_mnist(tmp_path, num_train=8, num_test=4)
    path = tmp_path / "MNIST" / "raw" / file
    if edit is not None:
        path.write_bytes(edit(bytearray(path.read_bytes())))
    return tmp_path, str(path)


def _set(i, v):
    def edit(b):
        b[i] = v
        return bytes(b)

    return edit


CORRUPT = {
    "magic": (_set(0, 1), r"magic number must start with 00 00, got 01 00 08 03"),
    "type code": (_set(2, 0x42), r"expected type code 0x08 \(uint8\), got 0x42 \(not an IDX"),
    "float type": (_set(2, 0x0D), r"expected type code 0x08 \(uint8\), got 0x0d \(float32\)"),
    "ndim": (_set(3, 5), r"expected 3 dimension\(s\), got 5"),
    "28x27": (_set(15, 27), r"expected shape \(N, 28, 28\), got \(8, 28, 27\)"),
    "truncated": (lambda b: bytes(b[:-100]),
                  r"6288 bytes in all .* but it has 6188: 100 bytes short"),
    "extra": (lambda b: bytes(b) + b"\0" * 100, r"but it has 6388: 100 extra bytes"),
    "header only": (lambda b: bytes(b[:10]), r"it has 10 bytes, fewer than its 16-byte header"),
    "empty": (lambda b: b"", r"it has 0 bytes, fewer than the 4-byte magic number"),
    "gzip": (lambda b: gzip.compress(bytes(b)), r"gzip-compressed .*; gunzip it first"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
@pytest.mark.parametrize("api", ["mnist_tensors", "mnist"])
def test_corrupt_idx_file_errors_name_the_api_the_file_and_the_fault(tmp_path, case, api):
    edit, fault = CORRUPT[case]
    root, path = _mnist_root(tmp_path, edit)
    want = rf"^{api}\(root\): {re.escape(path)} is not a valid IDX file: .*{fault}"
    with pytest.raises(ValueError, match=want):
        getattr(data, api)(root)
    # download=True with the corrupt file present: the same error, never "not found"
    with pytest.raises(ValueError, match=want):
        getattr(data, api)(root, download=True)


@settings(max_examples=25, deadline=None)
@given(change=st.integers(-6288, 300).filter(lambda c: c != 0))
def test_any_size_change_of_an_idx_file_is_named(tmp_path_factory, change):
    def edit(b):
        return bytes(b[:change]) if change < 0 else bytes(b) + b"\x07" * change

    root, path = _mnist_root(tmp_path_factory.mktemp("m"), edit)
    with pytest.raises(ValueError, match=rf"^mnist_tensors\(root\): {re.escape(path)} is not"):
        data.mnist_tensors(root)


def test_image_and_label_counts_must_agree(tmp_path):
    root, images = _mnist_root(tmp_path)
    labels = str(tmp_path / "MNIST" / "raw" / LABELS)
    data.write_idx(labels, torch.zeros(5, dtype=torch.uint8))
    want = rf"{re.escape(images)} holds 8 images but {re.escape(labels)} holds 5 labels"
    with pytest.raises(ValueError, match=r"^mnist_tensors\(root\): " + want):
        data.mnist_tensors(root)
    with pytest.raises(ValueError, match=r"^mnist\(root\): " + want):
        data.mnist(root)
    # the test split is untouched and still reads
    x, y = data.mnist_tensors(root, train=False)
    assert x.shape == (4, 1, 28, 28) and y.shape == (4,)


def test_labels_past_nine_are_refused(tmp_path):
    written = data.write_synthetic_mnist(tmp_path, num_train=8, num_test=4)
    labels = written["train"][1].to(torch.uint8).clone()
    labels[3] = 200
    path = tmp_path / "MNIST" / "raw" / LABELS
    data.write_idx(path, labels)
    with pytest.raises(ValueError, match=rf"^mnist_tensors\(root\): {re.escape(str(path))}: "
                       r"labels must be in \[0, 9\], got 200 at index 3"):
        data.mnist_tensors(tmp_path)


def test_files_torchvision_rejects_otherwise_are_not_reported_missing(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    root, _ = _mnist_root(tmp_path)

    def unreadable(self):
        raise RuntimeError("some other reading failure")

    monkeypatch.setattr(torchvision.datasets.MNIST, "_load_data", unreadable)
    for download in (False, True):
        with pytest.raises(ValueError, match=r"^mnist\(root\): torchvision could not read the "
                           r"MNIST files in .*RuntimeError: some other reading failure") as e:
            data.mnist(root, download=download)
        assert "not found" not in str(e.value)


def test_write_synthetic_mnist_counts(tmp_path):
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match=r"write_synthetic_mnist: `num_train` must be an int "
                           r">= 1 \(torchvision cannot read an IDX file of 0 examples\)"):
            data.write_synthetic_mnist(tmp_path, num_train=bad, num_test=4)
    out = data.write_synthetic_mnist(tmp_path, num_train=np.int64(3), num_test=np.int32(1))
    x, y = data.mnist_tensors(tmp_path)
    assert x.shape == (3, 1, 28, 28) and torch.equal(y, out["train"][1])
    assert data.mnist_tensors(tmp_path, train=False)[0].shape == (1, 1, 28, 28)


# ---------------------------------------------------------------------- prefetching


def _stand_in_copy(monkeypatch):
    """No second device here: "meta" tensors stand in for CUDA ones, and the copy to the
    CPU (impossible for meta) is replaced by zeros of the same shape and dtype."""
    moved = []

    def to(batch, device, non_blocking=False):
        moved.append(batch)
        return fp.tree.map(lambda x: torch.zeros(x.shape, dtype=x.dtype, device=device)
                           if isinstance(x, torch.Tensor) else x, batch)

    monkeypatch.setattr(fp.tree, "to", to)
    return moved


@pytest.mark.parametrize("api", ["prefetch_to_device", "DeviceLoader"])
def test_cpu_prefetch_moves_every_batch_not_only_the_first(monkeypatch, api):
    moved = _stand_in_copy(monkeypatch)
    src = [
        (torch.ones(2), torch.tensor([0, 1])),
        (torch.ones(2, device="meta"), torch.tensor([1, 0], device="meta")),
        {"x": torch.ones(3), "tag": "text"},
        {"x": torch.ones(1, 2), "y": [torch.ones(2, device="meta")], "tag": 7},
    ]
    out = list(getattr(data, api)(src, "cpu"))
    devices = [x.device.type for b in out for x in fp.tree.leaves(b) if isinstance(x, torch.Tensor)]
    assert devices == ["cpu"] * 7
    # reference: a batch is moved iff one of its tensor leaves is off the CPU
    assert [id(b) for b in moved] == [id(src[1]), id(src[3])]
    assert out[0] is src[0] and out[2] is src[2]  # already there: the same object
    assert out[3]["tag"] == 7 and out[3]["y"][0].shape == (2,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_prefetch_moves_a_later_cuda_batch():
    src = [(torch.arange(3.0),), (torch.arange(4.0, device="cuda"),)]
    out = list(data.prefetch_to_device(src, "cpu"))
    assert [b[0].device.type for b in out] == ["cpu", "cpu"]
    assert out[1][0].tolist() == [0.0, 1.0, 2.0, 3.0]


def _failing(at):
    for i in range(3):
        if i == at:
            raise OSError(f"corrupt record {i}")
        yield (torch.full((2,), float(i)),)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("at", [0, 2])
def test_source_errors_are_raised_while_iterating(device, at):
    it = data.prefetch_to_device(_failing(at), device)  # reads nothing yet
    got = []
    with pytest.raises(OSError, match=f"corrupt record {at}"):
        for b in it:
            got.append(b[0].shape)
    want = []
    with pytest.raises(OSError, match=f"corrupt record {at}"):
        for b in _failing(at):  # the reference: the source iterated directly
            want.append(b[0].shape)
    assert got == want
    it = iter(data.DeviceLoader(_Source(at), device))  # no error at iter() either
    with pytest.raises(OSError, match=f"corrupt record {at}"):
        list(it)


class _Source:
    def __init__(self, at):
        self.at = at

    def __iter__(self):
        return _failing(self.at)


def test_device_loader_size_is_checked_at_construction():
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match=r"^DeviceLoader\(loader, device\): `size` must be "
                           r"an int >= 1, got"):
            data.DeviceLoader([], "cpu", size=bad)
    assert data.DeviceLoader([], "cpu", size=np.int64(3)).size == 3


# ------------------------------------------------------------------ argument checks

INT_TYPES = [int, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 12), size=st.integers(1, 5), start=st.integers(0, 3),
       cast=st.sampled_from(INT_TYPES), drop_last=st.booleans())
def test_batches_accepts_numpy_integers_like_ints(n, size, start, cast, drop_last):
    x = torch.arange(float(n))
    total = -(-n // size) if not drop_last else n // size
    start = min(start, total)
    got = [b.tolist() for b in data.batches(x, cast(size), start=cast(start), drop_last=drop_last)]
    # reference: plain slicing
    ref = [x[i * size:(i + 1) * size].tolist() for i in range(start, total)]
    assert got == ref
    assert data.num_batches(cast(n), cast(size), drop_last=drop_last) == total


def test_poisson_accepts_numpy_numbers_like_python_ones():
    x = torch.arange(20.0)
    q = np.float32(0.25)
    want = [b.tolist() for b in data.poisson_batches(x, float(q), key=KEY, num_batches=5, start=1)]
    got = [b.tolist() for b in data.poisson_batches(x, q, key=KEY, num_batches=np.int64(5),
                                                    start=np.int32(1))]
    assert got == want
    padded = list(data.poisson_batches(x, q, key=KEY, num_batches=5, max_batch_size=np.int64(20)))
    assert [b[m].tolist() for b, m in padded] == [b.tolist() for b in data.poisson_batches(
        x, float(q), key=KEY, num_batches=5)]
    assert torch.equal(data.poisson_mask(KEY, np.int64(20), np.float64(0.25)),
                       data.poisson_mask(KEY, 20, 0.25))
    assert data.poisson_max_batch_size(np.int64(60000), np.float32(0.004), np.float64(1e-9)) == \
        data.poisson_max_batch_size(60000, float(np.float32(0.004)), 1e-9)
    (p,), m = data.pad_batch((x[:3],), np.int64(5))
    assert p.tolist() == [0.0, 1.0, 2.0, 0.0, 0.0] and m.tolist() == [True] * 3 + [False] * 2


def test_batches_validates_the_key_and_start():
    x = torch.arange(6.0)
    for key, got in [
        (fp.random.split(KEY, 3), r"a tensor of shape \(3, 2\) and dtype torch.int64"),
        (0, r"0 \(int\)"),
        (torch.zeros(2), r"a tensor of shape \(2,\) and dtype torch.float32"),
    ]:
        with pytest.raises(TypeError, match=r"^batches\(data, batch_size\): `key` must be one "
                           r"fp.random key \(an int64 tensor of shape \(2,\).*got " + got):
            data.batches(x, 2, key=key)
    for start in (True, np.bool_(True), 1.0):
        with pytest.raises(ValueError, match=r"^batches\(data, batch_size\): `start` must be an "
                           r"int in \[0, 3\], got"):
            data.batches(x, 2, start=start)
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1, got True"):
        data.batches(x, True)


def test_poisson_mask_refuses_a_batch_of_keys_outside_vmap():
    keys = fp.random.split(KEY, 3)
    with pytest.raises(TypeError, match=r"^poisson_mask\(key, num_examples, sample_rate\): `key` "
                       r"must be one fp.random key .*got a tensor of shape \(3, 2\)"):
        data.poisson_mask(keys, 10, 0.5)
    # the documented way: vmap, equal to a loop over the keys
    got = fp.vmap(lambda k: data.poisson_mask(k, 10, 0.5))(keys)
    assert got.shape == (3, 10)
    assert torch.equal(got, torch.stack([data.poisson_mask(k, 10, 0.5) for k in keys]))
