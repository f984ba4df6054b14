"""``eval_shape``: the shapes and dtypes of a function's outputs, with no computation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import torch
import torch.utils._pytree as torch_pytree
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import TorchDispatchMode

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


class _FakeEveryTensor(TorchDispatchMode):
    """Inside ``mode`` (a FakeTensorMode), hand every op fakes in place of real tensors.

    # NOTE [eval_shape and real tensors]
    FakeTensorMode fakes the tensors it is given and the ones it creates, but an op on
    real tensors only with a Python number (a closed-over tensor, a module's buffer) ran
    for real, in place too: ``eval_shape`` of a BatchNorm in train mode incremented its
    real ``num_batches_tracked``, and ``counter.add_(1)`` in a closure was applied. This
    mode sits inside the fake mode and swaps each real tensor argument for a fake before
    the fake mode runs the op (one fake per real tensor for the call, so an in-place op
    on a closed-over tensor is seen by later reads of it): no real tensor is written or
    computed with, as in JAX, whose ``eval_shape`` stages out operations on closed-over
    arrays too. A one-element tensor becomes a fake-mode constant over a copy, so its
    value stays readable (BatchNorm with ``momentum=None`` divides by
    ``float(num_batches_tracked)``); reading a value of a larger one raises, as in JAX.
    A Python-level side effect (``self.buf = new``) still happens, with a fake tensor.
    """

    def __init__(self, mode: FakeTensorMode) -> None:
        super().__init__()
        self.fake_mode = mode
        self.memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(real) -> (real, fake)

    def fake(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or is_fake(x):
            return x
        hit = self.memo.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        if x.numel() <= 1 and x.layout == torch.strided and x.device.type != "meta":
            # A one-element tensor (a step counter such as num_batches_tracked) becomes a
            # constant of the fake mode, over a copy: its value stays readable (float(),
            # .item(), also after an in-place update here) and the real one is untouched.
            with torch.utils._python_dispatch._disable_current_modes():
                copy = x.detach().clone()
            f = self.fake_mode.fake_tensor_converter.from_real_tensor(self.fake_mode, copy,
                                                                     make_constant=True)
            if x.requires_grad:
                f.requires_grad_(True)
        else:
            f = self.fake_mode.from_tensor(x)
        self.memo[id(x)] = (x, f)
        return f

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        args, kwargs = torch_pytree.tree_map(self.fake, (args, kwargs or {}))
        return func(*args, **kwargs)


def eval_shape(fun: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The output structure of ``fun(*args, **kwargs)`` as :class:`ShapeDtypeStruct` leaves
    (``jax.eval_shape``), found without allocating or computing: ``fun`` runs on fake
    tensors (``torch._subclasses.FakeTensorMode``), which carry shapes and dtypes only.
    Real tensors ``fun`` reads from elsewhere (its closure, a module's parameters and
    buffers) are faked too as operations reach them, so none is computed with or written
    to: a BatchNorm in train mode keeps its real running statistics.

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
      effects happen (an attribute assigned in ``fun`` gets a fake tensor) and
      data-dependent branches (``if x.sum() > 0``, also on a closed-over tensor) cannot
      be decided and raise.

    Example:
      >>> big = ShapeDtypeStruct(torch.Size([10_000, 10_000]), torch.float32)
      >>> out = eval_shape(lambda a, b: {"y": a @ b, "n": 3}, big, torch.ones(10_000, 2))
      >>> out["y"].shape, out["y"].dtype, out["n"]
      (torch.Size([10000, 2]), torch.float32, 3)
      >>> bn = torch.nn.BatchNorm1d(3)
      >>> eval_shape(bn, ShapeDtypeStruct(torch.Size([4, 3]), torch.float32)).shape
      torch.Size([4, 3])
      >>> bn.num_batches_tracked  # the real buffer is untouched
      tensor(0)
    """
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake_args, fake_kwargs = _tree.map(lambda x: _fake(mode, x), (args, kwargs), is_leaf=_is_struct)
    with mode, _FakeEveryTensor(mode):
        out = fun(*fake_args, **fake_kwargs)
    return _tree.map(
        lambda x: (
            ShapeDtypeStruct(x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else x
        ),
        out,
    )
