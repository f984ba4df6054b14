"""``CheckpointManager``: a directory of step-numbered checkpoints with retention."""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import re
import uuid
from collections.abc import Mapping
from typing import Any

import torch

from functorch_pipeline.serialization import CheckpointError
from functorch_pipeline.serialization import clean_temp_files
from functorch_pipeline.serialization import load
from functorch_pipeline.serialization import read_metadata
from functorch_pipeline.serialization import save

__all__ = ["CheckpointManager"]

_METRICS_KEY = "metrics"
_RUN_KEY = "run_id"


def _as_step(step: Any, fn: str) -> int:
    """``step`` as an int: ints, and whole numbers in floats or one-element tensors;
    refuses bools and fractions instead of truncating them."""
    value = step.item() if isinstance(step, torch.Tensor) and step.numel() == 1 else step
    if not isinstance(value, bool):
        if isinstance(value, float):
            if value.is_integer():
                return int(value)
            raise TypeError(f"{fn}: `step` must be a whole number, got {step!r}; it is never rounded")
        try:
            return operator.index(value)  # int, numpy integers
        except TypeError:
            pass
    raise TypeError(f"{fn}: `step` must be an integer, got {step!r}")


class CheckpointManager:
    """Save, list, prune and restore ``<directory>/<prefix>_<step>.safetensors`` files.

    # NOTE [manager invariants]
    - A step's file appears only when ``fp.save`` renames a complete, fsync-ed temporary
      file into place (NOTE [atomic save]); temporary files never match the step
      pattern, so an interrupted save never becomes :meth:`latest`. Stale temporary files
      of killed saves are removed when a manager is created (NOTE [temp files]).
    - Retention: after each save the last ``max_to_keep`` steps are kept and, when
      ``best_metric`` is set, also the single best step by that metric (so up to
      ``max_to_keep + 1`` files). Older files are deleted only after the new file is
      durable, and the file just written is never deleted.
    - Metrics live in each file's header (``metadata["metrics"]``, JSON), so the manager
      rebuilds its view of the directory from the files alone: a new process (a resumed
      run) needs no side file.

    # NOTE [one run per directory]
    Each file records the id of the run that wrote it (``metadata["run_id"]``). A
    manager's run is the ``run_id`` it was given, else the run of the checkpoint it
    :meth:`restore`-d (resuming continues that run), else a new random id made at its
    first :meth:`save`. :meth:`save` refuses (``CheckpointError``, nothing written or
    deleted) to write into a directory holding checkpoints of another run, or files
    whose run it cannot read, and to write a step older than its own run's latest
    (that would make the abandoned later steps :meth:`latest`, or get pruned at once).
    So reusing a directory of a longer earlier run fails on the first save instead of
    silently deleting every new checkpoint, and ``--resume`` can never restore a run
    other than the one that wrote last. Only the run's own files are ever pruned.
    Files from before run ids (no ``run_id``) count as a run of their own, which a
    manager continues by restoring one of them. To start afresh, use a new directory
    or delete the old files yourself. :meth:`all_steps`, :meth:`latest_step` and
    :meth:`best_step` describe the whole directory; :meth:`latest_step` is ``None``
    when there is nothing to resume.

    Args:
      directory: where checkpoints live (created if missing).
      max_to_keep: how many recent steps to keep; ``None`` keeps all.
      best_metric: name of a metric passed to :meth:`save`; the best step by it is kept.
      mode: ``"min"`` (default, e.g. a loss) or ``"max"`` (e.g. accuracy).
      prefix: file name prefix.
      run_id: this run's id (letters, digits, ``_.-``, at most 64); default: adopted
        from the checkpoint restored, or new at the first save. Pass the same id to
        continue a run without restoring through this manager.

    >>> import tempfile, torch
    >>> mgr = CheckpointManager(tempfile.mkdtemp(), max_to_keep=2, best_metric="loss")
    >>> for step, loss in [(1, 0.5), (2, 0.1), (3, 0.4), (4, 0.3)]:
    ...     _ = mgr.save(step, {"w": torch.full((1,), float(step))}, metrics={"loss": loss})
    >>> mgr.all_steps(), mgr.latest_step(), mgr.best_step()
    ([2, 3, 4], 4, 2)
    >>> mgr.restore()["w"], mgr.metrics(2)
    (tensor([4.]), {'loss': 0.1})
    >>> other = CheckpointManager(mgr.directory)  # a new run in the same directory
    >>> other.save(1, {"w": torch.zeros(1)})
    Traceback (most recent call last):
    ...
    functorch_pipeline.serialization._format.CheckpointError: CheckpointManager.save(step, tree): ...

    Notes:
      NOTE [atomic save]: the file is written to a temporary file in the same directory, fsync-ed
        and renamed over the target (then the directory fsync-ed), so a crash leaves the old file or
        the new one, never a partial one.
      NOTE [temp files]: a save writes ``.<name>.<host>-<pid>-<random>.tmp`` and renames it; a
        killed save leaves that file behind, and ``clean_temp_files`` removes only stale ones, never
        a save still running.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_to_keep: int | None = 3,
        *,
        best_metric: str | None = None,
        mode: str = "min",
        prefix: str = "ckpt",
        run_id: str | None = None,
    ) -> None:
        fn = "CheckpointManager(directory)"
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"{fn}: `max_to_keep` must be an int >= 1 or None, got {max_to_keep!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"{fn}: `mode` must be 'min' or 'max', got {mode!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
            raise ValueError(f"{fn}: `prefix` must be letters, digits, '_', '.' or '-', got {prefix!r}")
        if run_id is not None and not (
            isinstance(run_id, str) and re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", run_id)
        ):
            raise ValueError(
                f"{fn}: `run_id` must be 1 to 64 letters, digits, '_', '.' or '-', got {run_id!r}"
            )
        self.directory = os.fspath(directory)
        self.max_to_keep = max_to_keep
        self.best_metric = best_metric
        self.mode = mode
        self.prefix = prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}_(\d{{8,}})\.safetensors")
        self._run_id = run_id
        self._explicit = run_id is not None
        self._legacy = False  # restored a file without a run id: such files are ours
        self._runs: dict[str, tuple[tuple[int, int, int], str | None]] = {}
        os.makedirs(self.directory, exist_ok=True)
        clean_temp_files(self.directory, target=f"{prefix}_*.safetensors")

    @property
    def run_id(self) -> str | None:
        """This manager's run (NOTE [one run per directory]); ``None`` until it is given,
        adopted by :meth:`restore` or made by the first :meth:`save`."""
        return self._run_id

    def path(self, step: int) -> str:
        """The file of ``step`` (whether or not it exists).

        Args:
          step: a step number.

        Returns:
          ``<directory>/<prefix>_<step:08d>.safetensors``.
        """
        return os.path.join(self.directory, f"{self.prefix}_{step:08d}.safetensors")

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint on disk, ascending.

        Returns:
          A sorted list of ints (empty when there is none).
        """
        steps = []
        for name in os.listdir(self.directory):
            m = self._pattern.fullmatch(name)
            if m and os.path.basename(self.path(int(m.group(1)))) == name:  # canonical names only
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest step on disk, or ``None`` if there is none.

        Returns:
          The largest step on disk, or ``None``.
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def latest(self) -> str | None:
        """Path of the newest checkpoint (for resuming), or ``None``.

        Returns:
          The newest checkpoint's path, or ``None``.
        """
        step = self.latest_step()
        return None if step is None else self.path(step)

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with ``step`` (reads only the file's header).

        Args:
          step: a step on disk.

        Returns:
          The ``metrics`` dict given to :meth:`save` (``{}`` when none were).
        """
        raw = read_metadata(self.path(step)).get(_METRICS_KEY)
        if raw is None:
            return {}
        try:
            out = json.loads(raw)
        except ValueError:
            raise CheckpointError(f"CheckpointManager.metrics(step): step {step} has unreadable metrics {raw[:80]!r}") from None
        if not isinstance(out, dict):
            raise CheckpointError(f"CheckpointManager.metrics(step): step {step} has unreadable metrics {raw[:80]!r}")
        return out

    def best_step(self) -> int | None:
        """The step with the best ``best_metric`` (ties: the latest), or ``None`` if no
        checkpoint recorded it or no ``best_metric`` was given.

        Returns:
          The best step, or ``None``.
        """
        if self.best_metric is None:
            return None
        best, best_val = None, None
        for step in self.all_steps():
            try:
                val = self.metrics(step).get(self.best_metric)
            except (CheckpointError, OSError):
                continue
            if not isinstance(val, (int, float)) or math.isnan(val):
                continue
            better = best_val is None or (val <= best_val if self.mode == "min" else val >= best_val)
            if better:
                best, best_val = step, val
        return best

    def save(
        self,
        step: int,
        tree: Any,
        *,
        metrics: Mapping[str, float | int | torch.Tensor] | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Save ``tree`` as ``step`` (atomically; replaces an existing file of that step of
        this run), then prune this run's old files (NOTE [manager invariants]).

        Args:
          step: a non-negative integer: an ``int`` or a one-element tensor (read once
            on the host) holding a whole number; ``bool`` and fractional values (``5.7``)
            are refused rather than truncated.
          tree: any pytree ``fp.save`` accepts (typically a ``TrainState``).
          metrics: numbers recorded with the checkpoint (tensors are read on the host).
          metadata: extra ``{str: str}`` header entries.

        Returns:
          The path written (it exists when this returns).

        Raises:
          CheckpointError: the directory holds another run's checkpoints, or ``step`` is
            older than this run's latest (NOTE [one run per directory]); nothing is
            written or deleted.
          TypeError: ``step`` is not an integer (a ``bool``, ``5.7``, a string).
          ValueError: ``step`` is negative.
        """
        fn = "CheckpointManager.save(step, tree)"
        step = _as_step(step, fn)
        if step < 0:
            raise ValueError(f"{fn}: `step` must be >= 0, got {step}")
        meta = dict(metadata or {})
        for key in (_METRICS_KEY, _RUN_KEY):
            if key in meta:
                raise ValueError(f"{fn}: `metadata` key {key!r} is reserved for the manager")
        if metrics is not None:
            clean = {}
            for k, v in metrics.items():
                v = v.item() if isinstance(v, torch.Tensor) else v
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise TypeError(f"{fn}: metric {k!r} must be a number, got {type(v).__name__}")
                # numpy scalars (np.float32, np.int64) are numbers.Real but not JSON
                clean[str(k)] = int(v) if isinstance(v, numbers.Integral) else float(v)
            meta[_METRICS_KEY] = json.dumps(clean)
        if self._run_id is None:
            self._run_id = uuid.uuid4().hex
        own = self._check_directory(step, fn)
        meta[_RUN_KEY] = self._run_id
        path = self.path(step)
        save(path, tree, metadata=meta)
        self._prune(sorted({*own, step}), step)
        return path

    def restore(
        self,
        step: int | None = None,
        like: Any = None,
        *,
        device: torch.device | str | int | None = None,
    ) -> Any:
        """Load ``step`` (default: the latest) with ``fp.load(path, like, device=...)``.

        Unless this manager was given a ``run_id``, it adopts the restored file's run:
        its later saves continue that run (NOTE [one run per directory]).

        Args:
          step: the step to load; ``None`` for the latest.
          like: an optional template tree, as ``fp.load(like=...)``.
          device: where to put the tensors, as ``fp.load(device=...)``.

        Returns:
          The restored tree.

        Raises:
          FileNotFoundError: there is no checkpoint (for ``step``, or at all).
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"CheckpointManager.restore(): no checkpoint in {self.directory!r}")
        path = self.path(int(step))
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"CheckpointManager.restore(step): no checkpoint for step {step} in {self.directory!r}; "
                f"steps on disk: {self.all_steps()}"
            )
        out = load(path, like, device=device)
        if not self._explicit:  # resuming continues the restored run
            ok, run = self._run_of(int(step))
            if ok:
                self._run_id = run if run is not None else self._run_id
                self._legacy = self._legacy or run is None
        return out

    def _run_of(self, step: int) -> tuple[bool, str | None]:
        """``(readable, run id)`` of a step's file, cached by the file's identity."""
        path = self.path(step)
        try:
            st = os.stat(path)
            ident = (st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self._runs.get(path)
            if cached is not None and cached[0] == ident:
                return True, cached[1]
            run = read_metadata(path).get(_RUN_KEY)
        except (CheckpointError, OSError):
            return False, None
        self._runs[path] = (ident, run)
        return True, run

    def _check_directory(self, step: int, fn: str) -> list[int]:
        """This run's steps on disk, after refusing a directory that holds other runs'
        (or unreadable) files or a step older than this run's latest (NOTE [one run
        per directory])."""
        own, other, unreadable = [], {}, []
        for s in self.all_steps():
            ok, run = self._run_of(s)
            if not ok:
                unreadable.append(s)
            elif run == self._run_id or (run is None and self._legacy):
                own.append(s)
            else:
                other.setdefault(run, []).append(s)
        where = f"{fn}: directory {self.directory!r}"
        if unreadable and not other:
            raise CheckpointError(
                f"{where} holds files whose run cannot be read: unreadable steps "
                f"{unreadable[:5]}{' ...' if len(unreadable) > 5 else ''} (corrupted, truncated "
                "or not checkpoints: read_metadata on them raises). They may belong to this or "
                f"another run; this manager's run is {self._run_id!r}. Saving here could "
                "delete or shadow them, so nothing was written. Inspect them with "
                "fp.serialization.read_metadata / fp.load, then move or delete them"
            )
        if other or unreadable:
            runs = "; ".join(
                f"steps {v[:5]}{' ...' if len(v) > 5 else ''} of run "
                f"{'(no run id, an older version)' if k is None else repr(k)}"
                for k, v in other.items()
            )
            bad = f"; unreadable steps {unreadable[:5]}" if unreadable else ""
            raise CheckpointError(
                f"{where} holds checkpoints of another run ({runs}{bad}); this manager's run "
                f"is {self._run_id!r}. Saving here could delete or shadow them, so nothing "
                "was written. To continue that run, restore() from it first (e.g. --resume); "
                "to start a new run, use another directory or delete those files"
            )
        if own and own[-1] > step:
            later = [s for s in own if s > step]
            raise CheckpointError(
                f"{where}: step {step} is older than this run's latest checkpoint (step "
                f"{own[-1]}), which would stay latest() and be resumed from instead; nothing "
                f"was written. Delete the steps after {step} first ({later[:5]})"
            )
        return own

    def _prune(self, steps: list[int], just_written: int) -> None:
        keep = set(steps if self.max_to_keep is None else steps[-self.max_to_keep :])
        keep.add(just_written)  # never delete what this save wrote
        best = self.best_step()
        if best is not None:
            keep.add(best)
        for step in steps:
            if step not in keep:
                try:
                    os.remove(self.path(step))
                except FileNotFoundError:  # pruned concurrently
                    pass

    def __repr__(self) -> str:
        return (
            f"CheckpointManager({self.directory!r}, max_to_keep={self.max_to_keep}, "
            f"best_metric={self.best_metric!r}, mode={self.mode!r}, run_id={self._run_id!r}, "
            f"steps={self.all_steps()})"
        )
