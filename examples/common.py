"""Small pieces shared by the example scripts: devices, progress bars, plots, evaluation."""

from __future__ import annotations

import json
import os
import sys
import time
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


def load_mnist(data_dir: str, device: torch.device, limit_train: int | None = None,
               limit_test: int | None = None) -> tuple[Any, Any]:
    """Preloaded, normalised MNIST ``(train, test)``; a missing file exits with status 2
    and a message naming the files to put where."""
    try:
        train = fp.data.mnist_tensors(data_dir, train=True, device=device)
        test = fp.data.mnist_tensors(data_dir, train=False, device=device)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return limit(train, limit_train), limit(test, limit_test)


def limit(data: Any, n: int | None) -> Any:
    """The first ``n`` examples of a pytree of tensors (all of them for ``None``)."""
    return data if not n else fp.tree.map(lambda a: a[:n], data)


def fit(model: Any, state: fp.train.TrainState, loss_fn: Callable[..., Any], opt: Any, train: Any, test: Any, *,
        epochs: int, batch_size: int, test_batch_size: int, out_dir: str, save_interval: int, keep: int = 3,
        resume: bool = False, log_probs: bool = False, log_interval: int = 10, no_progress: bool = False,
        title: str = "", plot: bool = True) -> tuple[fp.train.TrainState, list[dict[str, Any]]]:
    """Train epoch by epoch with ``fp.train.train_step``: checkpoints every
    ``save_interval`` batches and at each epoch end (kept by a CheckpointManager in
    ``out_dir/checkpoints``), exact resume, one JSON line per epoch in
    ``out_dir/metrics.jsonl`` and ``out_dir/curves.png``."""
    device = state.step.device
    steps_per_epoch = fp.data.num_batches(train[0].shape[0], batch_size)
    manager = fp.train.CheckpointManager(os.path.join(out_dir, "checkpoints"), max_to_keep=keep)
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if resume and manager.latest_step() is not None:
        state = manager.restore(like=state, device=device)
        print(f"resumed from step {int(state.step)} ({manager.latest()})")
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    history = []
    for epoch in range(int(state.step) // steps_per_epoch, epochs):
        first = int(state.step) - epoch * steps_per_epoch
        batches = fp.data.batches(train, batch_size, key=data_key(state, epoch), start=first)
        bar = progress(batches, steps_per_epoch, first, f"epoch {epoch + 1}/{epochs}", no_progress)
        loss_sum = torch.zeros((), device=device)
        t0 = time.perf_counter()
        for i, batch in enumerate(bar, start=first):
            state, loss = fp.train.train_step(state, batch, loss_fn, opt)
            loss_sum += loss
            if (i + 1) % log_interval == 0 and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if (i + 1) % save_interval == 0 and i + 1 < steps_per_epoch:
                manager.save(int(state.step), state)
        epoch_time = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "step": int(state.step),
            "train_loss": loss_sum.item() / max(1, steps_per_epoch - first),
            **evaluate(lambda x, s=state: model.apply({"params": s.params, "buffers": s.buffers}, x),
                       test, test_batch_size, log_probs=log_probs),
            "epoch_time_s": round(epoch_time, 3),
        }
        manager.save(int(state.step), state, metrics={"test_accuracy": record["test_accuracy"]})
        append_jsonl(metrics_path, record)
        history.append(record)
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, test loss {record['test_loss']:.4f}, "
              f"test accuracy {100 * record['test_accuracy']:.2f}% ({epoch_time:.1f} s)")
    if plot:
        plot_curves(metrics_path, os.path.join(out_dir, "curves.png"), title)
    return state, history
