"""``TrainState``: everything a training run needs to continue exactly, as one pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any
from typing import ClassVar

import torch

from functorch_pipeline import optim
from functorch_pipeline import random as _random
from functorch_pipeline import tree as _tree
from functorch_pipeline.nn import FunctionalModel

__all__ = ["TrainState"]

_DATA = ("params", "buffers", "opt_state", "step", "key")


class _Code:
    """The static ``apply_fn`` and ``tx`` of a :class:`TrainState` (its pytree aux data).

    # NOTE [code is not saved]
    ``apply_fn`` and ``tx`` are functions, not data: they ride along as static aux data
    (as Flax's ``struct.field(pytree_node=False)``), so ``fp.tree.map``, ``torch.func``
    transforms and ``fp.load(like=state)`` keep them. A checkpoint never holds code:
    ``_Code`` is itself registered as a pytree node with no children and no aux, so
    ``fp.save`` writes an empty node and ``fp.load`` without ``like=`` gives a state with
    ``apply_fn=None`` and ``tx=None``; with ``like=`` the template's are used.
    """

    __slots__ = ("apply_fn", "tx")

    def __init__(self, apply_fn: Any = None, tx: Any = None) -> None:
        self.apply_fn = apply_fn
        self.tx = tx

    def __eq__(self, other: object) -> bool:
        # `==`, not `is`: `model.apply` makes a new bound method at each access.
        return (
            isinstance(other, _Code)
            and (self.apply_fn is other.apply_fn or self.apply_fn == other.apply_fn)
            and (self.tx is other.tx or self.tx == other.tx)
        )

    def __hash__(self) -> int:
        try:
            return hash((self.apply_fn, type(self.tx)))
        except TypeError:
            return hash(type(self.tx))

    def __repr__(self) -> str:
        return f"_Code(apply_fn={self.apply_fn!r}, tx={'set' if self.tx is not None else None})"


_tree.register_pytree_node(_Code, lambda c: ((), None), lambda aux, children: _Code())


@dataclasses.dataclass(frozen=True)
class TrainState:
    """Parameters, buffers, optimizer state, step counter and random key of a run.

    A registered pytree (with optree and ``torch.utils._pytree``), so ``fp.tree``,
    ``torch.func`` transforms, ``fp.devices.device_put`` and ``fp.save``/``fp.load`` all
    traverse it; ``fp.load`` rebuilds it without ``like=``.

    Flax-style use (``flax.training.train_state.TrainState``)::

        state = TrainState.create(apply_fn=model.apply, params=variables["params"], tx=opt)
        state = state.apply_gradients(grads=grads)

    ``create`` with ``tx`` runs ``tx.init(params)`` and, when ``apply_fn`` is a
    functionalized model's ``apply`` (or ``trainable=`` is given), keeps the frozen
    parameters (``requires_grad=False`` in the module) fixed: their updates are zero and
    the optimizer keeps no state for them. ``apply_fn`` and ``tx`` are static (not
    leaves) and never saved: after ``fp.load`` without ``like=`` they are ``None``; load
    with ``like=state`` to keep them.

    # NOTE [exact resume]
    Everything random in a step should come from ``state.key`` folded with the step
    (``fp.random.fold_in(state.key, state.step)`` for dropout; the epoch's shuffle from
    ``fold_in(state.key, epoch)``, see ``fp.data.batches``). Then a run saved at step N
    and resumed in a new process continues bit for bit like an uninterrupted one: the
    key never advances, so there is no hidden RNG state to lose.

    Attributes:
      params: the trainable parameters (any pytree).
      buffers: non-trainable state such as BatchNorm running statistics; ``{}`` when
        there is none (not ``None``: ``torch.utils._pytree`` counts ``None`` as a leaf,
        which ``torch.func`` transforms reject).
      opt_state: the optimizer state from ``opt.init(params)``.
      step: the number of completed steps, a 0-d int64 tensor (no host sync to update,
        no recompilation under ``torch.compile`` as it changes).
      key: the run's base ``fp.random`` key; it is not split as training goes.
      apply_fn: static; the model's apply function (``None`` unless given to ``create``).
      tx: static; the optimizer ``apply_gradients`` uses (``None`` unless given).

    Example:
      >>> import functorch_pipeline as fp
      >>> s = TrainState.create(params={"w": torch.zeros(2)}, opt_state=(), key=fp.random.key(0))
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
    apply_fn: ClassVar[Any] = None  # per instance, set by create/replace (NOTE [code is not saved])
    tx: ClassVar[Any] = None

    @classmethod
    def create(
        cls,
        params: Any,
        opt_state: Any = None,
        key: torch.Tensor | None = None,
        *,
        buffers: Any = None,  # None -> {}
        step: int | torch.Tensor = 0,
        apply_fn: Callable[..., Any] | None = None,
        tx: Any = None,
        trainable: Any = None,
    ) -> TrainState:
        """A fresh state; ``step`` becomes a 0-d int64 tensor on ``key``'s device.

        Args:
          params: the parameters (any pytree).
          opt_state: the optimizer state; leave it out when ``tx`` is given
            (``tx.init(params)`` is used).
          key: the run's ``fp.random`` key; default ``fp.random.key(0)`` (Flax's
            ``TrainState`` has no key) on the device of the first parameter.
          buffers: non-trainable state (default ``{}``).
          step: the number of completed steps.
          apply_fn: the model's apply function (e.g. ``model.apply`` of
            ``fp.functionalize``); static, stored for the training loop.
          tx: an ``fp.optim`` ``GradientTransformation`` for :meth:`apply_gradients`.
          trainable: a boolean tree over ``params`` (``False`` = frozen). Default: the
            model's ``trainable_mask()`` when ``apply_fn`` is a functionalized model's
            ``apply``, else everything trainable. With ``tx``, frozen leaves get zero
            updates: ``tx`` becomes ``optim.partition({"trainable": tx, "frozen":
            optim.set_to_zero()}, labels)``.

        Returns:
          A :class:`TrainState`.

        Example:
          >>> import functorch_pipeline as fp
          >>> TrainState.create({"w": torch.ones(1)}, (), fp.random.key(1)).step
          tensor(0)
        """
        fn = "TrainState.create(params, opt_state, key)"
        if tx is not None:
            if opt_state is not None:
                raise TypeError(
                    f"{fn}: give `tx` (and opt_state is tx.init(params)) or `opt_state`, not both"
                )
            if not (hasattr(tx, "init") and hasattr(tx, "update")):
                raise TypeError(
                    f"{fn}: `tx` must be an fp.optim GradientTransformation, "
                    f"got {type(tx).__name__}"
                )
            tx = _freeze_frozen(tx, params, apply_fn, trainable, fn)
            opt_state = tx.init(params)
        elif opt_state is None:
            raise TypeError(f"{fn}: give `opt_state` (opt.init(params)) or `tx`")
        elif trainable is not None:
            raise TypeError(
                f"{fn}: `trainable` needs `tx` (the optimizer that must skip frozen leaves)"
            )
        if key is None:
            tensors = [x for x in _tree.leaves(params) if isinstance(x, torch.Tensor)]
            key = _random.key(0, device=tensors[0].device) if tensors else _random.key(0)
        if not _random.is_key(key):
            raise TypeError(f"{fn}: `key` must be an fp.random key, got {key!r}")
        step_t = torch.as_tensor(step, dtype=torch.int64, device=key.device)
        if step_t.dim() != 0:
            raise ValueError(f"{fn}: `step` must be a scalar, got shape {tuple(step_t.shape)}")
        buffers = {} if buffers is None else buffers
        state = cls(params=params, buffers=buffers, opt_state=opt_state, step=step_t, key=key)
        return _with_code(state, apply_fn, tx)

    def replace(self, **changes: Any) -> TrainState:
        """A copy with some fields replaced (the state itself is immutable); ``apply_fn``
        and ``tx`` may be replaced too.

        Args:
          **changes: new values by field name.

        Returns:
          The new state.

        Example:
          >>> import functorch_pipeline as fp
          >>> s = TrainState.create({"w": torch.ones(1)}, (), fp.random.key(1))
          >>> s.replace(params={"w": torch.zeros(1)}).params
          {'w': tensor([0.])}
        """
        apply_fn = changes.pop("apply_fn", self.apply_fn)
        tx = changes.pop("tx", self.tx)
        return _with_code(dataclasses.replace(self, **changes), apply_fn, tx)

    def apply_gradients(self, *, grads: Any, **changes: Any) -> TrainState:
        """One optimizer step with ``self.tx`` (Flax's ``apply_gradients``): ``params``
        and ``opt_state`` updated, ``step + 1``, other ``changes`` replaced. Frozen
        parameters stay fixed (see :meth:`create`). Pure; no host sync.

        Args:
          grads: gradients with the structure of ``params``.
          **changes: other fields to replace (e.g. ``buffers=new_buffers``).

        Returns:
          The new state.

        Example:
          >>> from functorch_pipeline import optim
          >>> s = TrainState.create(apply_fn=None, params={"w": torch.ones(2)}, tx=optim.sgd(0.5))
          >>> s = s.apply_gradients(grads={"w": torch.tensor([1.0, 2.0])})
          >>> s.params["w"], int(s.step)
          (tensor([0.5000, 0.0000]), 1)
        """
        if self.tx is None:
            raise TypeError(
                "TrainState.apply_gradients(grads): the state has no `tx`; create it with "
                "TrainState.create(apply_fn=..., params=..., tx=...) or state.replace(tx=...)"
            )
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
        params = optim.apply_updates(self.params, updates)
        return self.replace(params=params, opt_state=opt_state, step=self.step + 1, **changes)

    def step_key(self, *data: int | torch.Tensor) -> torch.Tensor:
        """The key for this step: ``fold_in(key, step)``, then each extra ``data`` folded
        in (e.g. a layer index). No host sync.

        Args:
          *data: integers to fold in after the step.

        Returns:
          A key.

        Example:
          >>> import functorch_pipeline as fp
          >>> s = TrainState.create({}, (), fp.random.key(0), step=3)
          >>> bool((s.step_key() == fp.random.fold_in(fp.random.key(0), 3)).all())
          True
        """
        k = _random.fold_in(self.key, self.step)
        for d in data:
            k = _random.fold_in(k, d)
        return k


def _with_code(state: TrainState, apply_fn: Any, tx: Any) -> TrainState:
    if apply_fn is not None or type(state).apply_fn is not None:
        object.__setattr__(state, "apply_fn", apply_fn)
    if tx is not None or type(state).tx is not None:
        object.__setattr__(state, "tx", tx)
    return state


def _freeze_frozen(tx: Any, params: Any, apply_fn: Any, trainable: Any, fn: str) -> Any:
    """``tx`` with zero updates (and no state) for the frozen leaves (NOTE [frozen parameters]
    in ``fp.nn``)."""
    if trainable is None:
        model = getattr(apply_fn, "__self__", None)
        if not isinstance(model, FunctionalModel):
            return tx
        trainable = model.trainable_mask()
        if not isinstance(params, dict) or set(params) != set(trainable):
            raise ValueError(
                f"{fn}: `params` must be the model's params dict (variables['params']) so frozen "
                f"parameters can be found; expected keys {sorted(trainable)}, got "
                f"{sorted(params) if isinstance(params, dict) else type(params).__name__}"
            )
    flags = _tree.leaves(trainable)
    if not all(isinstance(f, bool) for f in flags):
        raise TypeError(f"{fn}: `trainable` must be a tree of bools, got leaves {flags!r}")
    if all(flags):
        return tx
    labels = _tree.map(lambda f: "trainable" if f else "frozen", trainable)
    return optim.partition({"trainable": tx, "frozen": optim.set_to_zero()}, labels)


def _flatten(s: TrainState) -> tuple[list[Any], Any]:
    code = () if s.apply_fn is None and s.tx is None else _Code(s.apply_fn, s.tx)
    return [getattr(s, n) for n in _DATA], code


def _unflatten(aux: Any, children: Any) -> TrainState:
    obj = object.__new__(TrainState)
    for n, v in zip(_DATA, children, strict=True):
        object.__setattr__(obj, n, v)
    if isinstance(aux, _Code):  # () for a state without code (and for older checkpoints)
        _with_code(obj, aux.apply_fn, aux.tx)
    return obj


_tree.register_pytree_node(TrainState, _flatten, _unflatten, field_names=_DATA)
