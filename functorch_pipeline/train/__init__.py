"""``fp.train``: the state of a training run, its checkpoints, and a pure step.

- :class:`TrainState` ``(params, buffers, opt_state, step, key)``: a registered pytree
  that ``fp.save``/``fp.load`` round-trip; resuming from it is exact.
- :class:`CheckpointManager`: step-numbered checkpoints, keep the last k and the best.
- :func:`train_step`, :func:`evaluate`: small helpers built on them.
"""

from functorch_pipeline.train._dp import DPTrainer
from functorch_pipeline.train._dp import DPTrainState
from functorch_pipeline.train._manager import CheckpointManager
from functorch_pipeline.train._state import TrainState
from functorch_pipeline.train._step import evaluate
from functorch_pipeline.train._step import train_step

__all__ = [
    "CheckpointManager",
    "DPTrainState",
    "DPTrainer",
    "TrainState",
    "evaluate",
    "train_step",
]
