"""Ensembles: N members' variables stacked on a leading axis, run together with ``vmap``.

# NOTE [ensembles are stacked variables]
An ensemble is not a new kind of model: it is the variables of N members stacked with
``fp.tree.stack`` (every leaf gets a leading axis of size N) and ``apply`` mapped over
that axis with ``fp.vmap``. Everything that takes a pytree takes the stack: one optimizer
state for all members (optax-style updates are elementwise, so ``opt.update`` on stacked
grads updates every member independently), one checkpoint, one ``fp.tree.to``. BatchNorm
in train mode works, each member updating its own statistics (NOTE [BatchNorm and
per-sample gradients]).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from functorch_pipeline import random as _random
from functorch_pipeline import tree as _tree
from functorch_pipeline.nn._functional_model import FunctionalModel
from functorch_pipeline.nn._functional_model import functionalize
from functorch_pipeline.transforms import vmap

__all__ = ["ensemble_apply", "ensemble_init"]


def _model(model: Any, fn: str) -> FunctionalModel:
    if isinstance(model, nn.Module):
        return functionalize(model)
    if not isinstance(model, FunctionalModel):
        raise TypeError(f"{fn}: `model` must be a FunctionalModel (fp.functionalize(module)), got {type(model).__name__}")
    return model


def ensemble_init(model: FunctionalModel, keys: torch.Tensor, *sample_args: Any,
                  **sample_kwargs: Any) -> dict[str, dict[str, torch.Tensor]]:
    """Initialise one member per key and stack their variables on a new leading axis.

    Member ``i`` is exactly ``model.init(keys[i], *sample_args)``.

    Args:
      model: a :class:`FunctionalModel` (or an ``nn.Module``, functionalized here).
      keys: a key batch of shape ``(N, 2)``, e.g. ``fp.random.split(key, N)``.
      *sample_args: a sample input for lazy modules, as for ``init``.
      **sample_kwargs: keyword arguments of the sample forward.

    Returns:
      Variables whose every leaf has a leading axis of size ``N``.

    >>> import functorch_pipeline as fp
    >>> model = fp.functionalize(nn.Linear(3, 2))
    >>> v = ensemble_init(model, fp.random.split(fp.random.key(0), 5))
    >>> v["params"]["weight"].shape
    torch.Size([5, 2, 3])
    """
    fn = "ensemble_init(model, keys)"
    model = _model(model, fn)
    if not (_random.is_key(keys) and keys.dim() == 2 and keys.shape[0] >= 1):
        raise TypeError(f"{fn}: `keys` must be a key batch of shape (N, 2) (fp.random.split(key, N)), got {keys!r}")
    return _tree.stack([model.init(k, *sample_args, **sample_kwargs) for k in keys])


def ensemble_apply(model: FunctionalModel, variables: Any, *args: Any, train: bool = False,
                   key: torch.Tensor | None = None, in_axes: int | None | tuple[Any, ...] = None,
                   chunk_size: int | None = None, **kwargs: Any) -> Any:
    """Run every member of a stacked ensemble: ``fp.vmap`` of ``model.apply`` over axis 0
    of ``variables``.

    Args:
      model: the members' :class:`FunctionalModel`.
      variables: stacked variables (:func:`ensemble_init` or ``fp.tree.stack``).
      *args: the inputs.
      train: as in ``apply``; with ``True`` the result is ``(outputs, new_buffers)``,
        both stacked.
      key: ``None``; one key ``(2,)``, split into one key per member; or ``(N, 2)`` keys,
        one per member (or ``(N, B, 2)``: per member and example).
      in_axes: how the inputs map: ``None`` (default) gives every member the same inputs,
        ``0`` gives member ``i`` slice ``i`` of each input; a tuple sets it per input.
      chunk_size: members per vectorised chunk (bounds memory; same result).
      **kwargs: keyword inputs, shared by all members.

    Returns:
      The members' outputs stacked on axis 0 (and the new buffers with ``train=True``).

    >>> import functorch_pipeline as fp
    >>> model = fp.functionalize(nn.Linear(3, 2))
    >>> v = ensemble_init(model, fp.random.split(fp.random.key(0), 4))
    >>> ensemble_apply(model, v, torch.ones(7, 3)).shape
    torch.Size([4, 7, 2])
    """
    fn = "ensemble_apply(model, variables, *args)"
    model = _model(model, fn)
    paths, leaves, _ = _tree.flatten_with_path(variables)
    if not leaves or not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in leaves):
        raise ValueError(f"{fn}: `variables` must be stacked variables whose every leaf has a leading member axis")
    n = leaves[0].shape[0]
    for path, x in zip(paths, leaves, strict=True):
        if x.shape[0] != n:
            raise ValueError(
                f"{fn}: `variables` is not a stack of members: leaf at path `{_tree.keystr(paths[0])}` has "
                f"{n} entries on axis 0 but leaf at path `{_tree.keystr(path)}` has {x.shape[0]}; stack "
                "members with ensemble_init or fp.tree.stack"
            )
    if key is not None:
        if not _random.is_key(key):
            raise TypeError(f"{fn}: `key` must be a key, or keys with a leading member axis, got {key!r}")
        if key.dim() == 1:
            key = _random.split(key, n)
        elif key.shape[0] != n:
            raise ValueError(f"{fn}: `key` has {key.shape[0]} keys on axis 0 but the ensemble has {n} members")
    arg_axes = in_axes if isinstance(in_axes, tuple) else (in_axes,) * len(args)
    if len(arg_axes) != len(args):
        raise ValueError(f"{fn}: `in_axes` has {len(arg_axes)} entries for {len(args)} inputs")

    def member(v: Any, k: torch.Tensor | None, *a: Any) -> Any:
        return model.apply(v, *a, train=train, key=k, **kwargs)

    axes = (0, None if key is None else 0, *arg_axes)
    return vmap(member, in_axes=axes, chunk_size=chunk_size)(variables, key, *args)
