"""``eval_shape``: the shapes and dtypes of a function's outputs, with no computation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from functorch_pipeline import tree as _tree

__all__ = ["ShapeDtypeStruct", "eval_shape"]


class ShapeDtypeStruct(NamedTuple):
    """A tensor's shape, dtype and device without its data (``jax.ShapeDtypeStruct``).

    Attributes:
      shape: a ``torch.Size``.
      dtype: a ``torch.dtype``.
      device: a ``torch.device`` (JAX has ``sharding`` here instead).

    Example:
      >>> ShapeDtypeStruct(torch.Size([2]), torch.float32, torch.device("cpu")).shape
      torch.Size([2])
    """

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device = torch.device("cpu")


def _fake(mode: FakeTensorMode, x: Any) -> Any:
    if isinstance(x, ShapeDtypeStruct):
        with mode:
            return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if isinstance(x, torch.Tensor):
        return mode.from_tensor(x)
    return x


def _is_struct(x: Any) -> bool:
    return isinstance(x, ShapeDtypeStruct)


def eval_shape(fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The output structure of ``fun(*args, **kwargs)`` as :class:`ShapeDtypeStruct` leaves
    (``jax.eval_shape``), found without allocating or computing: ``fun`` runs on fake
    tensors (``torch._subclasses.FakeTensorMode``), which carry shapes and dtypes only.

    Args:
      fun: the function.
      *args: its positional arguments: pytrees whose tensor leaves may be tensors or
        :class:`ShapeDtypeStruct` (non-tensor leaves are passed as they are).
      **kwargs: its keyword arguments, likewise.

    Returns:
      ``fun``'s output with every tensor leaf replaced by a :class:`ShapeDtypeStruct`
      (other leaves as returned).

    Notes:
      JAX traces abstractly; here ``fun`` really runs, on fake tensors, so Python side
      effects happen and data-dependent branches (``if x.sum() > 0``) cannot be decided
      and raise.

    Example:
      >>> big = ShapeDtypeStruct(torch.Size([10_000, 10_000]), torch.float32)
      >>> out = eval_shape(lambda a, b: {"y": a @ b, "n": 3}, big, torch.ones(10_000, 2))
      >>> out["y"].shape, out["y"].dtype, out["n"]
      (torch.Size([10000, 2]), torch.float32, 3)
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_args, fake_kwargs = _tree.map(lambda x: _fake(mode, x), (args, kwargs), is_leaf=_is_struct)
    with mode:
        out = fun(*fake_args, **fake_kwargs)
    return _tree.map(
        lambda x: (
            ShapeDtypeStruct(x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else x
        ),
        out,
    )
