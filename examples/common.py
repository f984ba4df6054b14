"""Small pieces shared by the example scripts.

- Command lines that fail clearly: :class:`ArgumentParser` shows every default in
  ``--help`` and reports a bad flag as one line on stderr with exit status 2 (no usage
  dump, no traceback); argparse types :func:`positive_int`, :func:`non_negative_int`,
  :func:`positive_float`, :func:`non_negative_float`, :func:`seed_int` and
  :func:`device_arg` (checks the device exists before any data is read); :func:`fail` for
  the same from code.
- Data: :func:`default_data_dir` (``<repo>/../shared/data`` when it exists) and
  :func:`load_mnist`, whose missing-file message says how to get the files offline.
- Training: :func:`fit` (checkpoints, exact resume, Ctrl-C, non-finite losses, per-epoch
  and per-step metrics, a plot, and a summary of where everything went).
- :func:`run_main`: runs an example's ``main`` so Ctrl-C outside :func:`fit` is one line.
- Files: :func:`dumps_strict` (and :func:`append_jsonl`, which uses it) write strict JSON
  (RFC 8259): a non-finite float (an infinite epsilon, a NaN metric) is written as
  ``null``, since JSON has no ``Infinity``/``NaN`` and strict readers (jq, ``JSON.parse``)
  reject them. The per-step ``steps.jsonl`` of :func:`fit` keeps a non-finite loss as
  ``NaN`` on purpose: it records where a run diverged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import signal
import sys
import textwrap
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any
from typing import NoReturn

import torch

import functorch_pipeline as fp

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
INTERRUPTED = 130  # the shell's status for a process stopped by SIGINT
DIVERGED = 1

_prog = {"name": os.path.basename(sys.argv[0]) or "example"}


# --- command lines that fail clearly -------------------------------------------------------

def fail(message: str, status: int = 2) -> NoReturn:
    """Print ``<prog>: error: <message>`` as ONE line on stderr and exit with ``status``
    (2, argparse's status for a usage error, unless given)."""
    one_line = " ".join(str(message).split())
    print(f"{_prog['name']}: error: {one_line}", file=sys.stderr, flush=True)
    raise SystemExit(status)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` to every flag's help unless the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text:
            return text
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with shown defaults and one-line errors (status 2).

    argparse's own error prints the whole usage first, which for the examples' ~20 flags
    buries the one line that matters.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        _prog["name"] = self.prog

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        fail(f"{message} (see --help)")


def _number(text: str, kind: type, ok: Callable[[Any], bool], rule: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _number(text, int, lambda v: v >= 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (``inf`` allowed, e.g. an infinite clip norm)."""
    return _number(text, float, lambda v: v > 0, "a number > 0")


def finite_positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates)."""
    return _number(text, float, lambda v: 0 < v < math.inf, "a finite number > 0")


def open_unit_float(text: str) -> float:
    """argparse type: a number in (0, 1) (a DP delta)."""
    return _number(text, float, lambda v: 0 < v < 1, "a number in (0, 1)")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _number(text, float, lambda v: 0 <= v < math.inf, "a finite number >= 0")


def seed_int(text: str) -> int:
    """argparse type: a seed for ``fp.random.key``, an int in ``[-2**63, 2**63)``."""
    return _number(text, int, lambda v: -(2**63) <= v < 2**63, "an integer in [-2**63, 2**63)")


def available_devices() -> list[str]:
    """The device names this machine can use (``cpu`` first)."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        out.append("mps")
    return out


def check_device(spec: str) -> torch.device:
    """The ``torch.device`` of ``spec`` if this machine has it, else ``ValueError`` with a
    one-line reason (checked before any data is read or any tensor is moved)."""
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"unknown device {spec!r}; this machine has: {', '.join(available_devices())}"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(
                f"{spec!r} requested but CUDA is not available on this machine (torch "
                f"{torch.__version__}); use --device cpu"
            )
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{spec!r} does not exist: this machine has {n} CUDA device(s), "
                             f"cuda:0 to cuda:{n - 1}")
        return dev
    if dev.type == "mps":
        available = torch.backends.mps.is_available()
    else:
        available = bool(getattr(getattr(torch, dev.type, None), "is_available", lambda: False)())
    if not available:
        raise ValueError(f"device {spec!r} is not available on this machine; it has: "
                         f"{', '.join(available_devices())}")
    return dev


def device_arg(text: str) -> torch.device:
    """argparse type for ``--device`` (see :func:`check_device`)."""
    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def pick_device(device: str | torch.device | None, no_cuda: bool = False) -> torch.device:
    """``--device`` if given (checked: exits 2 if this machine lacks it), else CUDA when
    available (and not ``--no-cuda``), else CPU."""
    if device is not None:
        if no_cuda and torch.device(device).type == "cuda":
            fail(f"--device {device} contradicts --no-cuda")
        try:
            return check_device(str(device))
        except ValueError as e:
            fail(f"argument --device: {e}")
    return torch.device("cpu") if no_cuda else fp.devices.default_device()


def resume_command(script: str, argv: Sequence[str] | None) -> str:
    """The command line that continues this run: the same flags plus ``--resume``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--resume" not in args:
        args.append("--resume")
    path = os.path.relpath(os.path.abspath(script))
    return shlex.join(["python", path if not path.startswith("..") else script, *args])


def run_main(main: Callable[[], Any]) -> None:
    """Run an example's ``main()``; a Ctrl-C that :func:`fit` did not handle (outside
    training) exits with status 130 and one line instead of a traceback."""
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted", status=INTERRUPTED)


# --- data ----------------------------------------------------------------------------------

def default_data_dir() -> str:
    """``<repo>/../shared/data`` when that folder exists, else ``<repo>/data``: found from
    this file's location, so the examples run the same from any working directory."""
    shared = os.path.normpath(os.path.join(REPO_ROOT, os.pardir, "shared", "data"))
    return shared if os.path.isdir(shared) else os.path.join(REPO_ROOT, "data")


def check_mnist_files(data_dir: str) -> None:
    """Exit 2 with how to get MNIST offline when a file is missing under ``data_dir``."""
    raw = os.path.join(data_dir, "MNIST", "raw")
    missing = [f for f in MNIST_FILES if not os.path.isfile(os.path.join(raw, f))]
    if not missing:
        return
    print(
        f"{_prog['name']}: error: MNIST not found: --data-dir {data_dir} lacks "
        f"{', '.join(os.path.join('MNIST', 'raw', f) for f in missing)}\n"
        f"  To get it offline, copy the four uncompressed MNIST files\n"
        f"    {' '.join(MNIST_FILES)}\n"
        f"  into {raw}/ from any machine that has them (torchvision keeps them in\n"
        f"  <root>/MNIST/raw/; the .gz files from an MNIST mirror need gunzip), or point\n"
        f"  --data-dir at a folder that holds MNIST/raw/ (default: {default_data_dir()}).\n"
        f"  To try the example on synthetic MNIST-shaped data instead:\n"
        f"    python -c \"import functorch_pipeline as fp; fp.data.write_synthetic_mnist("
        f"'/tmp/mnist')\"\n"
        f"  and pass --data-dir /tmp/mnist",
        file=sys.stderr,
    )
    raise SystemExit(2)


def load_mnist(data_dir: str, device: torch.device, limit_train: int | None = None,
               limit_test: int | None = None) -> tuple[Any, Any]:
    """Preloaded, normalised MNIST ``(train, test)``; a missing file exits with status 2
    and says how to get the files offline (:func:`check_mnist_files`)."""
    check_mnist_files(data_dir)
    try:
        train = fp.data.mnist_tensors(data_dir, train=True, device=device)
        test = fp.data.mnist_tensors(data_dir, train=False, device=device)
    except (FileNotFoundError, RuntimeError, OSError) as e:  # unreadable files
        fail(f"cannot read MNIST under --data-dir {data_dir}: {e}")
    return limit(train, limit_train), limit(test, limit_test)


def limit(data: Any, n: int | None) -> Any:
    """The first ``n`` examples of a pytree of tensors (all of them for ``None``)."""
    return data if not n else fp.tree.map(lambda a: a[:n], data)


def data_key(state: fp.train.TrainState, epoch: int) -> torch.Tensor:
    """The shuffle key of an epoch: a stream of the run's key separate from dropout's
    (dropout uses ``fold_in(key, step)``)."""
    return fp.random.fold_in(fp.random.fold_in(state.key, 0x5EED), epoch)


# --- progress, evaluation, files -----------------------------------------------------------

def progress(it: Any, total: int, initial: int = 0, desc: str = "", disable: bool = False) -> Any:
    """A tqdm progress bar when tqdm is installed, else the iterable itself."""
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional extra
        return it
    return tqdm(it, total=total, initial=initial, desc=desc, disable=disable, leave=False)


@torch.no_grad()
def evaluate(logits_fn: Callable[[torch.Tensor], torch.Tensor],
             data: tuple[torch.Tensor, torch.Tensor], batch_size: int,
             log_probs: bool = False) -> dict[str, float]:
    """Mean cross-entropy and accuracy of ``logits_fn`` over ``data`` (one sync at the end)."""
    _, y_all = data
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


def _finite_or_null(obj: Any) -> Any:
    """``obj`` with every non-finite float (inf, -inf, NaN) replaced by ``None``."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_null(v) for v in obj]
    return obj


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always writes strict JSON: non-finite floats become ``null``
    (JSON has no ``Infinity`` or ``NaN``), and ``allow_nan=False`` makes any value that
    would still need them an error instead of an invalid file.

    Args:
      obj: dicts, lists, tuples, str, int, float, bool and None.
      **kwargs: passed to ``json.dumps`` (``indent=1``, ...).

    Returns:
      The JSON text.

    Example:
      >>> dumps_strict({"epsilon": float("inf"), "loss": 0.5})
      '{"epsilon": null, "loss": 0.5}'
    """
    return json.dumps(_finite_or_null(obj), allow_nan=False, **kwargs)


def append_jsonl(path: str, record: dict[str, Any]) -> None:
    """Append ``record`` as one line of strict JSON (:func:`dumps_strict`)."""
    with open(path, "a") as f:
        f.write(dumps_strict(record) + "\n")


def read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _rewrite_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


def plot_curves(metrics_path: str, out_path: str, title: str, steps_path: str | None = None,
                steps_per_epoch: int | None = None) -> str | None:
    """Train loss per step (from ``steps_path``) and per epoch, test loss and accuracy per
    epoch, as a PNG. Returns ``out_path``, or ``None`` when nothing was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return None
    rows = read_jsonl(metrics_path)
    steps = read_jsonl(steps_path) if steps_path else []
    if not rows and not steps:
        return None
    per_epoch = float(steps_per_epoch) if steps_per_epoch else 1.0
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    if steps:
        a1.plot([s["step"] / per_epoch for s in steps], [s["loss"] for s in steps], "-",
                color="C0", alpha=0.45, linewidth=0.8, label="train (per step)")
    epochs = [r["epoch"] for r in rows]
    a1.plot(epochs, [r["train_loss"] for r in rows], "o-", color="C0", label="train (epoch mean)")
    a1.plot(epochs, [r["test_loss"] for r in rows], "s-", color="C1", label="test")
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
    return out_path


def all_finite(tree: Any) -> torch.Tensor:
    """A 0-d bool tensor: every floating leaf of ``tree`` is finite (no host sync)."""
    flags = [torch.isfinite(x).all() for x in fp.tree.leaves(tree)
             if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


# --- runs: output folders, checkpoints, resume ---------------------------------------------

class RunFiles:
    """The files of a training run under ``out_dir``."""

    def __init__(self, out_dir: str, keep: int = 3) -> None:
        self.out_dir = out_dir
        self.checkpoints = os.path.join(out_dir, "checkpoints")
        self.metrics = os.path.join(out_dir, "metrics.jsonl")
        self.steps = os.path.join(out_dir, "steps.jsonl")
        self.plot = os.path.join(out_dir, "curves.png")
        self.keep = keep
        self._manager: fp.train.CheckpointManager | None = None

    @property
    def manager(self) -> fp.train.CheckpointManager:
        if self._manager is None:
            self._manager = fp.train.CheckpointManager(self.checkpoints, max_to_keep=self.keep)
        return self._manager

    def saved_steps(self) -> list[int]:
        """Steps with a checkpoint on disk (without creating the folder)."""
        return self.manager.all_steps() if os.path.isdir(self.checkpoints) else []


def prepare_out_dir(out_dir: str, resume: bool, overwrite: bool = False, keep: int = 3) -> RunFiles:
    """Check ``--resume``/``--overwrite`` against what ``out_dir`` holds, before any data is
    read; exits 2 with one line when they disagree.

    # NOTE [one run per out-dir]
    - ``--resume`` with no checkpoint is an error, never a silent fresh start.
    - A fresh run into a folder that holds another run's checkpoints is refused (its
      checkpoints, metrics and plot would mix with the new run's, and a later
      ``--resume`` could pick the old run) unless ``--overwrite`` deletes them first.
    """
    files = RunFiles(out_dir, keep)
    steps = files.saved_steps()
    if resume:
        if not steps:
            fail(f"--resume: no checkpoint to resume from in {files.checkpoints}; "
                 "run without --resume to start a new run")
    elif steps:
        if not overwrite:
            fail(f"--out-dir {out_dir} already holds a run (checkpoints up to step {steps[-1]} in "
                 f"{files.checkpoints}); pass --resume to continue it, --overwrite to delete it "
                 "and start over, or choose another --out-dir")
        for step in steps:
            with contextlib.suppress(FileNotFoundError):
                os.remove(files.manager.path(step))
    if not resume:
        for path in (files.metrics, files.steps, files.plot):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    return files


class _Stop(Exception):
    """Training must stop: a non-finite loss or parameters (message for the user)."""


@contextlib.contextmanager
def _graceful_sigint() -> Iterator[dict[str, bool]]:
    """The first Ctrl-C sets a flag that the loop checks at each step boundary (so the saved
    state is always a whole step); a second one interrupts at once."""
    flag = {"stop": False, "hard": False}

    def handler(signum: int, frame: Any) -> None:
        if flag["stop"]:
            flag["hard"] = True
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: KeyboardInterrupt as usual
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def fit(model: Any, state: fp.train.TrainState, loss_fn: Callable[..., Any], opt: Any,
        train: Any, test: Any, *, epochs: int, batch_size: int, test_batch_size: int,
        out_dir: str, save_interval: int, keep: int = 3, resume: bool = False,
        log_probs: bool = False, log_interval: int = 10, no_progress: bool = False,
        title: str = "", plot: bool = True, overwrite: bool = False,
        resume_hint: str | None = None, jit: bool = False,
        jit_backend: str = "inductor") -> tuple[fp.train.TrainState, list[dict[str, Any]]]:
    """Train epoch by epoch with ``fp.train.train_step``.

    - Checkpoints every ``save_interval`` batches and at each epoch end, kept by a
      CheckpointManager in ``out_dir/checkpoints``; exact resume (NOTE [exact resume]),
      including the epoch's running train loss and time, so a resumed epoch's metrics cover the
      whole epoch.
    - ``out_dir/metrics.jsonl`` (one line per epoch), ``out_dir/steps.jsonl`` (the train
      loss of every step) and ``out_dir/curves.png``; a summary of where they went.
    - A non-finite loss (or parameters) stops the run (exit status 1) naming the step and
      the last good checkpoint; nothing non-finite is ever saved.
    - Ctrl-C stops at the next step boundary, saves that step and prints the command that
      resumes (``resume_hint``); exit status 130.
    - ``resume``/``overwrite``: NOTE [one run per out-dir].
    - ``jit``: the step runs under ``fp.jit`` (``torch.compile`` with ``jit_backend``), see
      :func:`make_step`; the first step's time (the cold compile) is printed once, and the
      number of graphs compiled at the end.
    """
    if epochs < 1 or batch_size < 1 or save_interval < 1 or log_interval < 1:
        raise ValueError(f"fit: `epochs`, `batch_size`, `save_interval` and `log_interval` must be "
                         f">= 1, got {epochs}, {batch_size}, {save_interval}, {log_interval}")
    device = state.step.device
    num_train = int(fp.tree.leaves(train)[0].shape[0])
    steps_per_epoch = fp.data.num_batches(num_train, batch_size)
    files = prepare_out_dir(out_dir, resume, overwrite, keep)
    manager = files.manager
    run_meta = {"fit.batch_size": str(batch_size), "fit.num_train": str(num_train)}

    carried_loss, carried_time = 0.0, 0.0
    if resume:
        state, carried_loss, carried_time = _restore(files, state, device, run_meta)
        step = int(state.step)
        # drop what the interrupted process wrote after its checkpoint (it is redone)
        _rewrite_jsonl(files.metrics, [r for r in read_jsonl(files.metrics) if r["step"] <= step])
        _rewrite_jsonl(files.steps, [r for r in read_jsonl(files.steps) if r["step"] <= step])
        print(f"resumed from step {step} ({manager.latest()})")
        if step >= epochs * steps_per_epoch:
            print(f"nothing to train: step {step} already completes {step // steps_per_epoch} "
                  f"epoch(s) of {steps_per_epoch} steps; pass a larger --epochs to train more")

    step_fn = make_step(loss_fn, opt, jit=jit, backend=jit_backend)
    history: list[dict[str, Any]] = []
    pending: list[tuple[int, torch.Tensor]] = []  # per-step losses not yet written
    first_bad: list[tuple[int, float]] = []  # the first non-finite (step, loss)

    def flush() -> None:
        # NOTE [loss checks]: losses stay on the device between flushes (every
        # `log_interval` steps and before each save), so the check costs one sync per flush.
        if pending:
            values = torch.stack([v for _, v in pending]).tolist()
            with open(files.steps, "a") as f:
                for (s, _), v in zip(pending, values, strict=True):
                    f.write(json.dumps({"step": s, "loss": v}) + "\n")
                    if not first_bad and not math.isfinite(v):
                        first_bad.append((s, v))
            pending.clear()

    def check(epoch: int, check_params: bool) -> None:
        flush()
        if first_bad:
            s, v = first_bad[0]
            raise _Stop(f"non-finite train loss ({v}) at step {s} (epoch {epoch + 1})")
        if check_params and not bool(all_finite(state.params)):
            raise _Stop(f"non-finite parameters after step {int(state.step)} (epoch {epoch + 1})")

    def save(epoch_loss_sum: float | None, metrics: dict[str, float] | None = None) -> str:
        meta = dict(run_meta)
        if epoch_loss_sum is not None:  # mid-epoch: what a resume needs for the epoch's record
            meta["fit.epoch_loss_sum"] = repr(epoch_loss_sum)
            meta["fit.epoch_time_s"] = repr(clock["before"] + time.perf_counter() - clock["t0"])
        return manager.save(int(state.step), state, metrics=metrics, metadata=meta)

    loss_sum = torch.zeros((), device=device)
    clock = {"t0": time.perf_counter(), "before": 0.0}  # this epoch's time before a resume
    epoch = int(state.step) // steps_per_epoch
    with _graceful_sigint() as sigint:
        try:
            for epoch in range(int(state.step) // steps_per_epoch, epochs):
                first = int(state.step) - epoch * steps_per_epoch
                batches = fp.data.batches(train, batch_size, key=data_key(state, epoch),
                                          start=first)
                bar = progress(batches, steps_per_epoch, first, f"epoch {epoch + 1}/{epochs}",
                               no_progress)
                loss_sum = torch.full((), carried_loss if first else 0.0, device=device)
                clock.update(t0=time.perf_counter(), before=carried_time if first else 0.0)
                for i, batch in enumerate(bar, start=first):
                    if sigint["stop"]:
                        raise KeyboardInterrupt
                    state, loss = step_fn(state, batch)
                    loss_sum += loss
                    pending.append((i + 1 + epoch * steps_per_epoch, loss))
                    if (i + 1) % log_interval == 0:
                        check(epoch, check_params=False)
                        if hasattr(bar, "set_postfix"):
                            bar.set_postfix(loss=f"{loss.item():.4f}")
                    if (i + 1) % save_interval == 0 and i + 1 < steps_per_epoch:
                        check(epoch, check_params=True)
                        save(loss_sum.item())
                check(epoch, check_params=True)
                epoch_time = clock["before"] + time.perf_counter() - clock["t0"]
                record = {
                    "epoch": epoch + 1,
                    "step": int(state.step),
                    "train_loss": loss_sum.item() / steps_per_epoch,
                    **evaluate(_logits_fn(model, state), test, test_batch_size,
                               log_probs=log_probs),
                    "epoch_time_s": round(epoch_time, 3),
                }
                # the record first, then the checkpoint: a crash in between redoes the epoch's
                # end on resume, and the resume drops records past the checkpoint
                append_jsonl(files.metrics, record)
                save(None, {"test_accuracy": record["test_accuracy"]})
                history.append(record)
                print(f"epoch {record['epoch']}: train loss {record['train_loss']:.4f}, "
                      f"test loss {record['test_loss']:.4f}, test accuracy "
                      f"{100 * record['test_accuracy']:.2f}% ({epoch_time:.1f} s)", flush=True)
                if sigint["stop"]:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            _interrupted(files, state, epoch, steps_per_epoch, flush, save, loss_sum, resume_hint,
                         may_save=not sigint["hard"])
        except _Stop as e:
            latest = manager.latest()
            fail(f"{e}; stopping. The last good checkpoint is "
                 f"{latest or 'none (nothing was saved)'}. Lower --lr, or clip gradients",
                 status=DIVERGED)
    if jit:
        compiled = _graphs_compiled()
        print(f"fp.jit: {compiled if compiled is not None else 'unknown number of'} graph(s) "
              f"compiled in this run (1 per distinct batch shape is expected)", flush=True)
    plot_path = None
    if plot:
        plot_path = plot_curves(files.metrics, files.plot, title, files.steps, steps_per_epoch)
    _report_outputs(files, plot_path, plot)
    return state, history


def make_step(loss_fn: Callable[..., Any], opt: Any, *, jit: bool = False,
              backend: str = "inductor") -> Callable[[Any, Any], tuple[Any, torch.Tensor]]:
    """``(state, batch) -> (state, loss)``: ``fp.train.train_step`` with ``loss_fn`` and
    ``opt``; with ``jit``, compiled by ``fp.jit`` (``torch.compile``, ``backend``) and the
    first call (the cold compile plus one step) timed and printed once.

    # NOTE [jit step]: the whole step (gradient, optimizer update, step + 1) is one compiled
    # function of the state pytree and the batch, so the checkpoints, the exact resume and
    # the loss checks of :func:`fit` are unchanged. A last batch of another size compiles
    # once more (Dynamo marks the batch dimension dynamic after a size change).
    """
    def step(state: Any, batch: Any) -> tuple[Any, torch.Tensor]:
        return fp.train.train_step(state, batch, loss_fn, opt)

    if not jit:
        return step

    compiled = fp.jit(step, backend=backend)
    seen = {"graphs": _graphs_compiled(), "calls": 0}

    def jitted(state: Any, batch: Any) -> tuple[Any, torch.Tensor]:
        t0 = time.perf_counter()
        out = compiled(state, batch)
        seen["calls"] += 1
        graphs = _graphs_compiled()
        if seen["calls"] == 1 or graphs != seen["graphs"]:  # this call compiled
            float(out[1])  # one sync per compile, so the time covers the work
            what = "first step (cold compile" if seen["calls"] == 1 else (
                f"step {seen['calls']} (recompile for batch shape "
                f"{tuple(fp.tree.leaves(batch)[0].shape)}")
            print(f"fp.jit: {what}, backend {backend}) took {time.perf_counter() - t0:.1f} s",
                  flush=True)
            seen["graphs"] = graphs
        return out

    return jitted


def _graphs_compiled() -> int | None:
    """Graphs Dynamo compiled in this process (None when torch does not count them)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    return int(counters["stats"]["unique_graphs"])


def _logits_fn(model: Any, state: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: model.apply({"params": state.params, "buffers": state.buffers}, x)


def check_run_meta(path: str, run_meta: dict[str, str], flags: dict[str, str],
                   why: str = "") -> dict[str, str]:
    """The metadata of the checkpoint at ``path``; exits 2 when a setting of ``run_meta``
    differs from the one it was written with, naming the flag (``flags``), so a resume
    continues the same run. Checkpoints without a setting are not checked for it.

    Args:
      path: the checkpoint.
      run_meta: ``{"prefix.name": value}`` of this run.
      flags: the command-line flag of each key, for the message.
      why: appended to the message.

    Returns:
      The checkpoint's metadata.

    Example:
      >>> import tempfile, os, torch
      >>> path = os.path.join(tempfile.mkdtemp(), "c.safetensors")
      >>> fp.save(path, {"w": torch.zeros(1)}, metadata={"fit.batch_size": "64"})
      >>> check_run_meta(path, {"fit.batch_size": "64"}, {"fit.batch_size": "--batch-size"})["fit.batch_size"]
      '64'
    """
    try:
        meta = fp.serialization.read_metadata(path)
    except (fp.serialization.CheckpointError, OSError) as e:
        fail(f"--resume: cannot read {path}: {e}")
    for k, v in run_meta.items():
        if k in meta and meta[k] != v:
            fail(f"--resume: {path} was trained with {k.split('.')[1]}={meta[k]} but this run has "
                 f"{v}; resume with the same {flags[k]}{why}")
    return meta


def _restore(files: RunFiles, state: Any, device: torch.device,
             run_meta: dict[str, str]) -> tuple[Any, float, float]:
    """The latest checkpoint, and the epoch's train-loss sum and time so far saved with it
    (exits 2 when it does not fit this run)."""
    path = files.manager.latest()
    meta = check_run_meta(path, run_meta, {"fit.batch_size": "--batch-size",
                                           "fit.num_train": "the training set size (--limit-train)"})
    try:
        restored = files.manager.restore(like=state, device=device)
    except (fp.serialization.CheckpointError, ValueError, TypeError) as e:
        why = textwrap.shorten(str(e), 300)
        if "does not match `like`" in str(e) or not isinstance(e, fp.serialization.CheckpointError):
            fail(f"--resume: {path} does not fit this run's model or optimizer (resume with the "
                 f"flags that shape them in the run that wrote it): {why}")
        older = [s for s in files.saved_steps() if s != files.manager.latest_step()]
        where = (f"the older checkpoints (steps {older}) may be intact: move {path} away to "
                 f"resume from step {older[-1]}" if older else "no older checkpoint is there")
        fail(f"--resume: {path} cannot be read ({why}); {where}")
    return (restored, float(meta.get("fit.epoch_loss_sum", 0.0)),
            float(meta.get("fit.epoch_time_s", 0.0)))


def _interrupted(files: RunFiles, state: Any, epoch: int, steps_per_epoch: int,
                 flush: Callable[[], None], save: Callable[..., str], loss_sum: torch.Tensor,
                 resume_hint: str | None, may_save: bool) -> NoReturn:
    # NOTE [interrupt]: the first Ctrl-C only sets a flag that the loop reads between steps,
    # so `state` and `loss_sum` describe the same whole step and can be saved together. A
    # second Ctrl-C may land mid-step: then nothing is saved and the last checkpoint named.
    flush()
    step = int(state.step)
    saved = files.saved_steps()
    finite = bool(all_finite(state.params))
    if step in saved:
        path, how = files.manager.path(step), "its checkpoint is"
    elif not may_save:
        path = files.manager.latest() or "none"
        how = "not saved (second Ctrl-C); the last checkpoint is"
    elif finite and step > 0:
        at_boundary = step % steps_per_epoch == 0
        # NOTE: a step at an epoch boundary carries no partial epoch loss
        path, how = save(None if at_boundary else loss_sum.item()), "saved"
    else:
        path = files.manager.latest() or "none"
        how = "not saved (non-finite parameters); the last good checkpoint is"
    print(f"{_prog['name']}: interrupted at step {step} (epoch {epoch + 1}); {how} {path}",
          file=sys.stderr)
    if path != "none":
        print(f"continue with: {resume_hint or '<the same command> --resume'}", file=sys.stderr,
              flush=True)
    raise SystemExit(INTERRUPTED)


def _report_outputs(files: RunFiles, plot_path: str | None, plot: bool) -> None:
    latest = files.manager.latest()
    print("outputs:")
    print(f"  checkpoints: {files.checkpoints}/ (latest: "
          f"{os.path.basename(latest) if latest else 'none'})")
    print(f"  metrics:     {files.metrics} (one line per epoch), {files.steps} (loss per step)")
    if plot_path:
        print(f"  plot:        {plot_path}")
    else:
        print(f"  plot:        none ({'matplotlib not installed' if plot else '--no-plot'})",
              flush=True)
