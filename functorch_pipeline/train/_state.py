"""``TrainState``: everything a training run needs to continue exactly, as one pytree."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from functorch_pipeline import random as _random
from functorch_pipeline import tree as _tree

__all__ = ["TrainState"]


@_tree.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, buffers, optimizer state, step counter and random key of a run.

    A registered pytree (with optree and ``torch.utils._pytree``), so ``fp.tree``,
    ``torch.func`` transforms, ``fp.devices.device_put`` and ``fp.save``/``fp.load`` all
    traverse it; ``fp.load`` rebuilds it without ``like=``.

    # NOTE [exact resume]
    Everything random in a step should come from ``state.key`` folded with the step
    (``fp.random.fold_in(state.key, state.step)`` for dropout; the epoch's shuffle from
    ``fold_in(state.key, epoch)``, see ``fp.data.batches``). Then a run saved at step N
    and resumed in a new process continues bit for bit like an uninterrupted one: the
    key never advances, so there is no hidden RNG state to lose.

    Fields:
      params: the trainable parameters (any pytree).
      buffers: non-trainable state such as BatchNorm running statistics; ``{}`` when
        there is none (not ``None``: ``torch.utils._pytree`` counts ``None`` as a leaf,
        which ``torch.func`` transforms reject).
      opt_state: the optimizer state from ``opt.init(params)``.
      step: the number of completed steps, a 0-d int64 tensor (no host sync to update,
        no recompilation under ``torch.compile`` as it changes).
      key: the run's base ``fp.random`` key; it is not split as training goes.

    >>> s = TrainState.create(params={"w": torch.zeros(2)}, opt_state=(), key=fp_random.key(0))
    >>> int(s.step), s.buffers
    (0, {})
    >>> int(s.replace(step=s.step + 1).step)
    1
    """

    params: Any
    buffers: Any
    opt_state: Any
    step: Any
    key: Any

    @classmethod
    def create(
        cls,
        params: Any,
        opt_state: Any,
        key: torch.Tensor,
        *,
        buffers: Any = None,  # None -> {}
        step: int | torch.Tensor = 0,
    ) -> TrainState:
        """A fresh state; ``step`` becomes a 0-d int64 tensor on ``key``'s device.

        >>> TrainState.create({"w": torch.ones(1)}, (), fp_random.key(1)).step
        tensor(0)
        """
        if not _random.is_key(key):
            raise TypeError(f"TrainState.create(params, opt_state, key): `key` must be an fp.random key, got {key!r}")
        step_t = torch.as_tensor(step, dtype=torch.int64, device=key.device)
        if step_t.dim() != 0:
            raise ValueError(f"TrainState.create(params, opt_state, key): `step` must be a scalar, got shape {tuple(step_t.shape)}")
        buffers = {} if buffers is None else buffers
        return cls(params=params, buffers=buffers, opt_state=opt_state, step=step_t, key=key)

    def replace(self, **changes: Any) -> TrainState:
        """A copy with some fields replaced (the state itself is immutable).

        >>> s = TrainState.create({"w": torch.ones(1)}, (), fp_random.key(1))
        >>> s.replace(params={"w": torch.zeros(1)}).params
        {'w': tensor([0.])}
        """
        return dataclasses.replace(self, **changes)

    def step_key(self, *data: int | torch.Tensor) -> torch.Tensor:
        """The key for this step: ``fold_in(key, step)``, then each extra ``data`` folded
        in (e.g. a layer index). No host sync.

        >>> s = TrainState.create({}, (), fp_random.key(0), step=3)
        >>> bool((s.step_key() == fp_random.fold_in(fp_random.key(0), 3)).all())
        True
        """
        k = _random.fold_in(self.key, self.step)
        for d in data:
            k = _random.fold_in(k, d)
        return k


fp_random = _random  # for the doctest namespace
