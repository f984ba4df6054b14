"""fp.devices: GPU discovery with CPU fallback, and moving whole trees."""

import pytest
import torch

import functorch_pipeline as fp
from functorch_pipeline import devices


def fake_gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_cpu_fallback_without_gpus(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert devices.num_gpus() == 0
    assert devices.try_gpu() == torch.device("cpu")
    assert devices.try_gpu(3) == torch.device("cpu")
    assert devices.try_all_gpus() == [torch.device("cpu")]
    assert devices.default_device() == torch.device("cpu")


def test_gpu_selection_with_two_gpus(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert devices.try_gpu() == torch.device("cuda:0")
    assert devices.try_gpu(1) == torch.device("cuda:1")
    assert devices.try_gpu(2) == torch.device("cpu")
    assert devices.try_all_gpus() == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert devices.default_device() == torch.device("cuda:0")


def test_real_machine_is_consistent():
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert devices.num_gpus() == n
    assert len(devices.try_all_gpus()) == max(n, 1)


def test_try_gpu_rejects_bad_index():
    with pytest.raises(ValueError, match=r"try_gpu\(i\): `i` must be a non-negative int, got -1"):
        devices.try_gpu(-1)
    with pytest.raises(ValueError, match=r"got True"):
        devices.try_gpu(True)


def test_device_put_moves_tensors_only():
    tree = {"w": torch.ones(2, 3), "layers": [(torch.zeros(1, dtype=torch.int8), "relu")], "n": 4, "none": None}
    out = devices.device_put(tree, "meta")
    assert out["w"].device.type == "meta" and out["w"].shape == (2, 3)
    assert out["layers"][0][0].dtype == torch.int8 and out["layers"][0][1] == "relu"
    assert out["n"] == 4 and out["none"] is None
    assert tree["w"].device.type == "cpu"  # input untouched
    same = devices.device_put(tree, torch.device("cpu"))
    assert same["w"] is tree["w"]  # already there: no copy
    assert fp.tree.structure(same) == fp.tree.structure(tree)


def test_device_put_default_is_default_device(monkeypatch):
    fake_gpus(monkeypatch, 0)
    out = devices.device_put({"w": torch.ones(1)})
    assert out["w"].device.type == "cpu"


def test_device_put_train_state():
    s = fp.TrainState.create({"w": torch.ones(2)}, (), fp.random.key(0))
    out = devices.device_put(s, "meta")
    assert isinstance(out, fp.TrainState) and out.params["w"].device.type == "meta" and out.key.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_put_cuda_round_trip():
    tree = {"w": torch.randn(3, 4).pin_memory(), "step": 2}
    gpu = devices.device_put(tree, devices.try_gpu(0), non_blocking=True)
    torch.cuda.synchronize()
    assert gpu["w"].device == torch.device("cuda:0")
    back = devices.device_put(gpu, "cpu")
    assert torch.equal(back["w"], tree["w"]) and back["step"] == 2
