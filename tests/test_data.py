"""fp.data: key-driven batches of preloaded tensors, and batches delivered on a device."""


import pytest
import torch

import functorch_pipeline as fp
from functorch_pipeline import data


def example_data(n=10):
    return {"x": torch.arange(n * 2.0).reshape(n, 2), "y": torch.arange(n), "meta": {"id": torch.arange(n) * 10}}


def test_batches_in_order_are_views():
    d = example_data()
    out = list(data.batches(d, 4))
    assert [b["y"].tolist() for b in out] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert out[0]["x"].data_ptr() == d["x"].data_ptr()  # a slice, no copy
    assert [b["y"].tolist() for b in data.batches(d, 4, drop_last=True)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_shuffled_batches_match_a_reference_loop():
    d = example_data(11)
    key = fp.random.key(3)
    perm = fp.random.permutation(key, 11).tolist()
    expected = [perm[i : i + 3] for i in range(0, 11, 3)]
    got = list(data.batches(d, 3, key=key))
    assert [b["y"].tolist() for b in got] == expected
    for b, idx in zip(got, expected, strict=True):  # every leaf gathered with the same indices
        assert torch.equal(b["x"], torch.stack([d["x"][i] for i in idx]))
        assert torch.equal(b["meta"]["id"], torch.tensor([10 * i for i in idx]))
    assert sorted(sum(expected, [])) == list(range(11))


def test_order_is_a_function_of_the_key_and_start_resumes():
    d = example_data(20)
    k = fp.random.key(0)
    a = [b["y"].tolist() for b in data.batches(d, 4, key=k)]
    assert a == [b["y"].tolist() for b in data.batches(d, 4, key=fp.random.key(0))]
    assert a != [b["y"].tolist() for b in data.batches(d, 4, key=fp.random.key(1))]
    assert a[2:] == [b["y"].tolist() for b in data.batches(d, 4, key=k, start=2)]
    assert list(data.batches(d, 4, key=k, start=5)) == []
    torch.manual_seed(0)
    x = [b["y"].tolist() for b in data.batches(d, 4, key=k)]
    torch.manual_seed(1)
    assert x == [b["y"].tolist() for b in data.batches(d, 4, key=k)]  # global RNG plays no part


def test_batches_bad_input():
    with pytest.raises(ValueError, match=r"leaf at path `b` has 3 examples but leaf `a` has 4"):
        data.batches({"a": torch.zeros(4), "b": torch.zeros(3)}, 2)
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 1, got 0"):
        data.batches(torch.zeros(4), 0)
    with pytest.raises(ValueError, match=r"`start` must be an int in \[0, 2\], got 3"):
        data.batches(torch.zeros(4), 2, start=3)
    with pytest.raises(TypeError, match=r"leaf at path `\[1\]` must be a tensor with a leading example axis"):
        data.batches((torch.zeros(4), torch.tensor(1.0)), 2)
    with pytest.raises(ValueError, match=r"`data` has no tensor leaves"):
        data.batches({}, 2)


def test_num_batches():
    assert [data.num_batches(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert [data.num_batches(n, 4, drop_last=True) for n in (0, 1, 4, 5, 8)] == [0, 0, 1, 1, 2]


def test_cpu_loader_passes_cpu_batches_through():
    src = [{"img": torch.randn(2, 3), "label": torch.tensor([1, 2]), "name": "a"}, (torch.ones(1), [torch.zeros(2)])]
    # every batch is checked (NOTE [prefetch on the CPU]); batches already there pass as is
    out = list(data.prefetch_to_device(src, "cpu"))
    assert out[0] is src[0] and out[1] is src[1]  # same objects, nothing copied
    assert list(data.prefetch_to_device([], "cpu")) == []


def test_any_batch_structure_on_another_device():
    src = [torch.ones(2), (torch.ones(1), torch.zeros(1)), {"a": {"b": [torch.ones(3)]}, "s": "text", "n": 3}]
    out = list(data.prefetch_to_device(src, "meta"))
    assert out[0].device.type == "meta"
    assert all(x.device.type == "meta" for x in out[1])
    assert out[2]["a"]["b"][0].device.type == "meta" and out[2]["s"] == "text" and out[2]["n"] == 3
    assert fp.tree.structure(out[2]) == fp.tree.structure(src[2])


def test_device_loader_wraps_a_dataloader():
    ds = torch.utils.data.TensorDataset(torch.arange(10.0).reshape(10, 1), torch.arange(10))
    loader = data.DeviceLoader(torch.utils.data.DataLoader(ds, batch_size=4), "cpu")
    assert len(loader) == 3
    for _ in range(2):  # re-iterable: one pass per epoch
        ys = [y.tolist() for _, y in loader]
        assert ys == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match=r"`size` must be an int >= 1, got 0"):
        data.prefetch_to_device([], "cpu", size=0)


def _failing_source(n, fail_at):
    for i in range(n):
        if i == fail_at:
            raise OSError(f"corrupt record at batch {i}")
        yield {"x": torch.full((4, 3), float(i)), "i": i}


def _consume(it):
    got = []
    with pytest.raises(OSError, match="corrupt record") as info:
        for b in it:
            got.append(b["i"])
    return got, info.value


@pytest.mark.parametrize(("size", "fail_at"), [(1, 0), (2, 1), (2, 3), (4, 5), (3, 2)])
def test_cuda_prefetch_delivers_the_batches_before_a_source_error(monkeypatch, size, fail_at):
    """The CUDA path's own queue logic (streams, events and the copy replaced by stand-ins,
    so it runs here): a source that raises at batch k gives every batch before k, then its
    error, as iterating the source does. It dropped the `size` batches already fetched
    (size 2, failure at 3: batch 0 only)."""
    import contextlib

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_event(self, event):
            pass

    class Event:
        def record(self, stream=None):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(fp.tree, "to", lambda b, dev, non_blocking=False: b)
    want, _ = _consume(_failing_source(8, fail_at))
    got, err = _consume(data.prefetch_to_device(_failing_source(8, fail_at), "cuda:0", size=size,
                                                pin_memory=False))
    assert got == want == list(range(fail_at))
    assert str(err) == f"corrupt record at batch {fail_at}"

    def copy(b, dev, non_blocking=False):  # the copy fails instead (CUDA out of memory)
        if b["i"] == fail_at:
            raise OSError(f"corrupt record at batch {fail_at}: out of memory copying it")
        return b

    monkeypatch.setattr(fp.tree, "to", copy)
    got, err = _consume(data.prefetch_to_device(_failing_source(8, 99), "cuda:0", size=size,
                                                pin_memory=False))
    assert got == list(range(fail_at)) and "out of memory copying it" in str(err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_prefetch_delivers_every_batch_intact():
    src = [{"x": torch.randn(64, 32) + i, "y": torch.full((64,), i), "tag": i} for i in range(7)]
    out = []
    for b in data.prefetch_to_device(src, "cuda", size=3):
        assert b["x"].device.type == "cuda" and b["y"].device.type == "cuda"
        out.append(fp.tree.to(b, "cpu"))  # consume on the default stream
    assert len(out) == 7
    for a, b in zip(src, out, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"]) and a["tag"] == b["tag"]
    # A pinned DataLoader works too; its batches are already pinned.
    ds = torch.utils.data.TensorDataset(torch.randn(50, 4), torch.arange(50))
    loader = data.DeviceLoader(torch.utils.data.DataLoader(ds, batch_size=8, pin_memory=True), "cuda")
    ys = torch.cat([y.cpu() for _, y in loader])
    assert torch.equal(ys, torch.arange(50))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "mnist_tensors",
                                  "fashion_mnist_tensors", "cifar10_tensors"])
@pytest.mark.parametrize("transform", ["default", None])
def test_dataset_without_torchvision_names_the_extra(name, transform, monkeypatch, tmp_path):
    """torchvision is optional (the `examples` extra): without it the error names the call
    and the extra to install, as the privacy extra's does."""
    import sys

    monkeypatch.setitem(sys.modules, "torchvision", None)  # `import torchvision` raises
    monkeypatch.setitem(sys.modules, "torchvision.transforms", None)
    fn = getattr(data, name)
    kwargs = {} if name.endswith("_tensors") else {"transform": transform}
    extra = r'pip install "functorch-pipeline\[examples\]"'
    with pytest.raises(ImportError, match=rf"^{name}\(root\): .*torchvision.*{extra}") as e:
        fn(tmp_path, **kwargs)
    assert isinstance(e.value.__cause__, ImportError)


def test_num_batches_refuses_a_negative_size_and_non_ints():
    with pytest.raises(ValueError, match="num_examples"):
        fp.data.num_batches(-5, 2)  # gave -2
    with pytest.raises(TypeError, match="batch_size"):
        fp.data.num_batches(10, 2.5)
    assert fp.data.num_batches(0, 3) == 0 and fp.data.num_batches(7, 3) == 3
