"""``CheckpointManager``: a directory of step-numbered checkpoints with retention."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import torch

from functorch_pipeline.serialization import CheckpointError
from functorch_pipeline.serialization import load
from functorch_pipeline.serialization import read_metadata
from functorch_pipeline.serialization import save

__all__ = ["CheckpointManager"]

_METRICS_KEY = "metrics"


class CheckpointManager:
    """Save, list, prune and restore ``<directory>/<prefix>_<step>.safetensors`` files.

    # NOTE [manager invariants]
    - A step's file appears only when ``fp.save`` renames a complete, fsync-ed temporary
      file into place (NOTE [atomic save]); temporary files never match the step
      pattern, so an interrupted save never becomes :meth:`latest`.
    - Retention: after each save the last ``max_to_keep`` steps are kept and, when
      ``best_metric`` is set, also the single best step by that metric (so up to
      ``max_to_keep + 1`` files). Older files are deleted only after the new file is
      durable.
    - Metrics live in each file's header (``metadata["metrics"]``, JSON), so the manager
      rebuilds its view of the directory from the files alone: a new process (a resumed
      run) needs no side file.

    Args:
      directory: where checkpoints live (created if missing).
      max_to_keep: how many recent steps to keep; ``None`` keeps all.
      best_metric: name of a metric passed to :meth:`save`; the best step by it is kept.
      mode: ``"min"`` (default, e.g. a loss) or ``"max"`` (e.g. accuracy).
      prefix: file name prefix.

    >>> import tempfile, torch
    >>> mgr = CheckpointManager(tempfile.mkdtemp(), max_to_keep=2, best_metric="loss")
    >>> for step, loss in [(1, 0.5), (2, 0.1), (3, 0.4), (4, 0.3)]:
    ...     _ = mgr.save(step, {"w": torch.full((1,), float(step))}, metrics={"loss": loss})
    >>> mgr.all_steps(), mgr.latest_step(), mgr.best_step()
    ([2, 3, 4], 4, 2)
    >>> mgr.restore()["w"], mgr.metrics(2)
    (tensor([4.]), {'loss': 0.1})
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_to_keep: int | None = 3,
        *,
        best_metric: str | None = None,
        mode: str = "min",
        prefix: str = "ckpt",
    ) -> None:
        fn = "CheckpointManager(directory)"
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep < 1):
            raise ValueError(f"{fn}: `max_to_keep` must be an int >= 1 or None, got {max_to_keep!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"{fn}: `mode` must be 'min' or 'max', got {mode!r}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", prefix):
            raise ValueError(f"{fn}: `prefix` must be letters, digits, '_', '.' or '-', got {prefix!r}")
        self.directory = os.fspath(directory)
        self.max_to_keep = max_to_keep
        self.best_metric = best_metric
        self.mode = mode
        self.prefix = prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}_(\d{{8,}})\.safetensors")
        os.makedirs(self.directory, exist_ok=True)

    def path(self, step: int) -> str:
        """The file of ``step`` (whether or not it exists)."""
        return os.path.join(self.directory, f"{self.prefix}_{step:08d}.safetensors")

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint on disk, ascending."""
        steps = []
        for name in os.listdir(self.directory):
            m = self._pattern.fullmatch(name)
            if m and os.path.basename(self.path(int(m.group(1)))) == name:  # canonical names only
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest step on disk, or ``None`` if there is none."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def latest(self) -> str | None:
        """Path of the newest checkpoint (for resuming), or ``None``."""
        step = self.latest_step()
        return None if step is None else self.path(step)

    def metrics(self, step: int) -> dict[str, float]:
        """The metrics saved with ``step`` (reads only the file's header)."""
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
        checkpoint recorded it or no ``best_metric`` was given."""
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
        """Save ``tree`` as ``step`` (atomically; replaces an existing file of that step),
        then prune old files (NOTE [manager invariants]).

        Args:
          step: a non-negative int (a tensor step is read once with ``int()``).
          tree: any pytree ``fp.save`` accepts (typically a ``TrainState``).
          metrics: numbers recorded with the checkpoint (tensors are read on the host).
          metadata: extra ``{str: str}`` header entries.

        Returns:
          The path written.
        """
        fn = "CheckpointManager.save(step, tree)"
        step = int(step)
        if step < 0:
            raise ValueError(f"{fn}: `step` must be >= 0, got {step}")
        meta = dict(metadata or {})
        if _METRICS_KEY in meta:
            raise ValueError(f"{fn}: `metadata` key {_METRICS_KEY!r} is reserved for `metrics`")
        if metrics is not None:
            clean = {}
            for k, v in metrics.items():
                v = v.item() if isinstance(v, torch.Tensor) else v
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise TypeError(f"{fn}: metric {k!r} must be a number, got {type(v).__name__}")
                clean[str(k)] = v
            meta[_METRICS_KEY] = json.dumps(clean)
        path = self.path(step)
        save(path, tree, metadata=meta)
        self._prune()
        return path

    def restore(
        self,
        step: int | None = None,
        like: Any = None,
        *,
        device: torch.device | str | int | None = None,
    ) -> Any:
        """Load ``step`` (default: the latest) with ``fp.load(path, like, device=...)``.

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
        return load(path, like, device=device)

    def _prune(self) -> None:
        steps = self.all_steps()
        keep = set(steps if self.max_to_keep is None else steps[-self.max_to_keep :])
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
            f"best_metric={self.best_metric!r}, mode={self.mode!r}, steps={self.all_steps()})"
        )
