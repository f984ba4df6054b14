"""Smoke tests of the example scripts on tiny synthetic MNIST-format data (real IDX files
written by fp.data.write_synthetic_mnist and read by torchvision), a few steps each, with
the checkpoint/resume path exercised."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

import functorch_pipeline as fp

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
sys.path.insert(0, os.path.abspath(EXAMPLES))

import lstm  # noqa: E402
import mnist  # noqa: E402
import per_sample_grads  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    fp.data.write_synthetic_mnist(root, num_train=192, num_test=64)
    return str(root)


def test_mnist_trains_checkpoints_and_resumes_exactly(data_root, tmp_path):
    common = ["--data-dir", data_root, "--batch-size", "32", "--no-progress", "--device", "cpu",
              "--save-interval", "2", "--optimizer", "adam", "--lr", "3e-3"]
    straight = mnist.main([*common, "--epochs", "2", "--out-dir", str(tmp_path / "a")])
    # interrupted: stop after epoch 1 (a save at steps 2, 4 and 6), then resume for epoch 2
    mnist.main([*common, "--epochs", "1", "--out-dir", str(tmp_path / "b"), "--no-plot"])
    resumed = mnist.main([*common, "--epochs", "2", "--out-dir", str(tmp_path / "b"), "--resume"])
    assert int(resumed["state"].step) == int(straight["state"].step) == 12
    for a, b in zip(fp.tree.leaves(straight["state"].params), fp.tree.leaves(resumed["state"].params), strict=True):
        assert torch.equal(a, b)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[-1]["test_accuracy"] > 0.5  # the synthetic task is learnable
    assert (tmp_path / "a" / "curves.png").stat().st_size > 1000
    ckpts = sorted(os.listdir(tmp_path / "a" / "checkpoints"))
    assert len(ckpts) == 3 and all(c.endswith(".safetensors") for c in ckpts)


def test_mnist_resume_mid_epoch_is_exact(data_root, tmp_path):
    common = ["--data-dir", data_root, "--batch-size", "32", "--no-progress", "--device", "cpu",
              "--save-interval", "2", "--no-plot"]
    straight = mnist.main([*common, "--epochs", "1", "--out-dir", str(tmp_path / "a")])
    # simulate a crash after step 4: keep only the mid-epoch checkpoint, then resume
    mnist.main([*common, "--epochs", "1", "--out-dir", str(tmp_path / "b")])
    ckdir = tmp_path / "b" / "checkpoints"
    for f in os.listdir(ckdir):
        if not f.endswith("00000004.safetensors"):
            os.remove(ckdir / f)
    resumed = mnist.main([*common, "--epochs", "1", "--out-dir", str(tmp_path / "b"), "--resume"])
    for a, b in zip(fp.tree.leaves(straight["state"].params), fp.tree.leaves(resumed["state"].params), strict=True):
        assert torch.equal(a, b)
    # the resumed epoch's record covers all 6 steps, not only the 2 after the resume
    assert resumed["history"][0]["train_loss"] == straight["history"][0]["train_loss"]
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [6]  # the interrupted run's record was replaced, not duplicated


def test_mnist_missing_data_names_the_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        mnist.main(["--data-dir", str(tmp_path / "nowhere"), "--no-progress", "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "MNIST" in err
    assert "offline" in err and "download=True" not in err  # no flag exposes a download


def test_lstm_sequential_mnist_smoke(data_root, tmp_path):
    out = lstm.main(["--data-dir", data_root, "--epochs", "1", "--batch-size", "32", "--hidden", "16",
                     "--no-progress", "--device", "cpu", "--out-dir", str(tmp_path), "--grad-norms", "4",
                     "--save-interval", "3"])
    assert out["history"][0]["epoch"] == 1 and int(out["state"].step) == 6
    assert out["grad_norms"].shape == (4,) and bool(torch.isfinite(out["grad_norms"]).all())
    again = lstm.main(["--data-dir", data_root, "--epochs", "1", "--batch-size", "32", "--hidden", "16",
                       "--no-progress", "--device", "cpu", "--out-dir", str(tmp_path), "--resume", "--no-plot"])
    assert again["history"] == []  # already finished: resume trains nothing more


def test_lstm_imdb_layout_smoke(tmp_path):
    words = {1: "great wonderful loved it best", 0: "awful boring hated it worst"}
    for split in ("train", "test"):
        for label, name in ((0, "neg"), (1, "pos")):
            d = tmp_path / "imdb" / split / name
            d.mkdir(parents=True)
            for i in range(8):
                (d / f"{i}_7.txt").write_text(f"{words[label]} movie<br />number {i}")
    out = lstm.main(["--task", "imdb", "--imdb-dir", str(tmp_path / "imdb"), "--epochs", "2", "--batch-size", "8",
                     "--max-words", "50", "--max-len", "12", "--no-progress", "--device", "cpu",
                     "--out-dir", str(tmp_path / "run"), "--grad-norms", "3", "--no-plot"])
    assert len(out["history"]) == 2 and out["grad_norms"].shape == (3,)
    assert lstm.tokenize("A <br />Great, film!") == ["a", "great", "film"]
    vocab = lstm.build_vocab([["a", "b", "a"]], max_words=3)
    assert vocab == {"a": 2} and lstm.encode(["a", "zzz"], vocab, 4) == [2, 1, 0, 0]
    with pytest.raises(SystemExit) as e:
        lstm.main(["--task", "imdb", "--imdb-dir", str(tmp_path / "missing"), "--no-progress", "--device", "cpu",
                   "--out-dir", str(tmp_path / "run2")])
    assert e.value.code == 2


def test_per_sample_grads_example_smoke(data_root, tmp_path):
    out = per_sample_grads.main(["--data-dir", data_root, "--pretrain-steps", "3", "--num-examples", "32",
                                 "--chunk-size", "16", "--dp-epochs", "0.5", "--batch-size", "40",
                                 "--check-steps", "2", "--no-progress", "--device", "cpu",
                                 "--out-dir", str(tmp_path)])
    assert out["norms"].shape == (32,) and bool((out["norms"] > 0).all())
    assert out["sanity_max_diff"] < 1e-12  # sigma=0, clip=inf: DP-SGD is SGD
    # half an epoch of the 192 examples' 4 full batches of 40 (drop_last): 2 steps, not 3
    assert out["dp_steps"] == math.ceil(0.5 * (192 // 40)) == 2
    assert (tmp_path / "grad_norms.png").exists() and (tmp_path / "top_grad_norms.png").exists()
