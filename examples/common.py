"""Small pieces shared by the example scripts: devices, progress bars, plots, evaluation."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import torch

import functorch_pipeline as fp


def pick_device(device: str | None, no_cuda: bool = False) -> torch.device:
    """``--device`` if given, else CUDA when available (and not ``--no-cuda``), else CPU."""
    if device:
        return torch.device(device)
    return torch.device("cpu") if no_cuda else fp.devices.default_device()


def data_key(state: fp.train.TrainState, epoch: int) -> torch.Tensor:
    """The shuffle key of an epoch: a stream of the run's key separate from dropout's
    (dropout uses ``fold_in(key, step)``)."""
    return fp.random.fold_in(fp.random.fold_in(state.key, 0x5EED), epoch)


def progress(it: Any, total: int, initial: int = 0, desc: str = "", disable: bool = False) -> Any:
    """A tqdm progress bar when tqdm is installed, else the iterable itself."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional extra
        return it
    return tqdm(it, total=total, initial=initial, desc=desc, disable=disable, leave=False)


@torch.no_grad()
def evaluate(logits_fn: Callable[[torch.Tensor], torch.Tensor], data: tuple[torch.Tensor, torch.Tensor],
             batch_size: int, log_probs: bool = False) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``logits_fn`` over ``data`` (one sync at the end)."""
    x_all, y_all = data
    device = y_all.device
    total = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for x, y in fp.data.batches(data, batch_size):
        out = logits_fn(x)
        loss = fp.losses.nll(out, y) if log_probs else fp.losses.cross_entropy(out, y)
        total += loss.sum()
        correct += (out.argmax(-1) == y).sum()
    n = y_all.shape[0]
    return {"test_loss": total.item() / n, "test_accuracy": correct.item() / n}


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def plot_curves(metrics_path: str, out_path: str, title: str) -> None:
    """Loss and accuracy per epoch from a metrics.jsonl file, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f]
    epochs = [r["epoch"] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    a1.plot(epochs, [r["test_loss"] for r in rows], "s-", label="test")
    a1.set_xlabel("epoch")
    a1.set_ylabel("loss")
    a1.legend()
    a2.plot(epochs, [100 * r["test_accuracy"] for r in rows], "s-", color="C2")
    a2.set_xlabel("epoch")
    a2.set_ylabel("test accuracy (%)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
