"""Structured control flow with ``jax.lax`` names: ``cond``, ``switch``, ``while_loop``,
``fori_loop``, and ``stop_gradient``.

# NOTE [control flow under vmap]
These run as eager Python control flow, so they are differentiable (``fp.grad``,
``loss.backward()``) and run under ``fp.jit`` (a tensor predicate makes a graph break,
where ``torch.compile`` runs the branch eagerly and resumes compiling after it). Under
``fp.vmap`` a predicate can differ between examples; a Python ``if`` cannot decide it
(torch.func raises). Then, as JAX does when it batches a predicate:
``cond`` (and ``switch``) runs every branch and selects per example (``torch.where``), and
``while_loop`` runs the body while the predicate holds for any example and keeps each
example's value once its own predicate is false. Both branches must then return the same
structure, shapes and dtypes, and a branch must be safe to run on every example.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch
from torch._C import _functorch

from functorch_pipeline import tree as _tree

__all__ = ["cond", "fori_loop", "stop_gradient", "switch", "while_loop"]


def _compiling() -> bool:
    # Dynamo's optree polyfill cannot compare tree structures; the eager run checks them.
    return torch.compiler.is_compiling()


def stop_gradient(x: Any) -> Any:
    """``x`` with every tensor leaf detached (``jax.lax.stop_gradient``): the value passes,
    no gradient flows back. Works under ``fp.grad``/``vmap`` (it detaches at the
    innermost transform level) and with ``loss.backward()``.

    Args:
      x: any pytree.

    Returns:
      The same tree with tensor leaves detached (storage shared; non-tensors unchanged).

    Example:
      >>> import functorch_pipeline as fp
      >>> fp.grad(lambda x: (x * stop_gradient(x)).sum())(torch.tensor([3.0]))
      tensor([3.])
    """
    return _tree.map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, x)


def _as_bool(pred: Any, what: str, fn: str) -> bool | torch.Tensor:
    """``pred`` as a Python bool, or the 0-d bool tensor it is when it varies under vmap."""
    if isinstance(pred, torch.Tensor):
        if pred.numel() != 1 or pred.dim() != 0:
            raise ValueError(
                f"{fn}: `{what}` must be a scalar (0-d), got shape {tuple(pred.shape)}"
            )
        if pred.dtype.is_complex:
            raise TypeError(f"{fn}: `{what}` must be a bool or real scalar, got dtype {pred.dtype}")
        try:
            return bool(pred)
        except RuntimeError:  # batched under vmap: the value differs between examples
            return pred != 0
    if isinstance(pred, (bool, int, float)):
        return bool(pred)
    raise TypeError(f"{fn}: `{what}` must be a bool or a scalar tensor, got {type(pred).__name__}")


def _select(pred: torch.Tensor, on_true: Any, on_false: Any, fn: str) -> Any:
    paths, a, ta = _tree.flatten_with_path(on_true)
    b, tb = _tree.flatten(on_false)
    if not _compiling() and ta != tb:
        raise ValueError(f"{fn}: the branches return different structures: {ta} and {tb}")
    out = []
    for p, x, y in zip(paths, a, b, strict=True):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            if x is y or x == y:
                out.append(x)
                continue
            raise TypeError(
                f"{fn}: output at path `{_tree.keystr(p)}` is not a tensor and differs "
                "between the branches; under vmap both branches run and must give tensors"
            )
        if x.shape != y.shape or x.dtype != y.dtype:
            raise ValueError(
                f"{fn}: output at path `{_tree.keystr(p)}` has shape {tuple(x.shape)} and dtype "
                f"{x.dtype} in one branch but {tuple(y.shape)} and {y.dtype} in the other"
            )
        out.append(torch.where(pred, x, y))
    return _tree.unflatten(ta, out)


def cond(
    pred: bool | torch.Tensor,
    true_fun: Callable[..., Any],
    false_fun: Callable[..., Any],
    *operands: Any,
) -> Any:
    """``true_fun(*operands)`` if ``pred`` else ``false_fun(*operands)`` (``jax.lax.cond``).

    Args:
      pred: a Python bool or a scalar tensor (non-zero is true).
      true_fun: the branch taken when ``pred`` is true.
      false_fun: the other branch.
      *operands: the branches' arguments (pytrees).

    Returns:
      The taken branch's output. Under ``vmap`` with a per-example predicate both
      branches run and the outputs are selected per example (NOTE [control flow under
      vmap]).

    Notes:
      JAX traces both branches and requires identical output types always; here only the
      taken branch runs (so only one is checked) except under ``vmap`` with a batched
      predicate. ``pred`` is read on the host (a device sync) outside ``vmap``.

      NOTE [control flow under vmap]: a per-example predicate cannot be decided by a Python ``if``,
        so under ``fp.vmap`` (as JAX does when it batches a predicate) every branch runs and the
        outputs are selected per example with ``torch.where``.

    Example:
      >>> cond(torch.tensor(True), lambda x: x + 1, lambda x: x - 1, torch.tensor(1.0))
      tensor(2.)
      >>> import functorch_pipeline as fp
      >>> fp.vmap(lambda x: cond(x > 0, torch.sqrt, torch.neg, x))(torch.tensor([4.0, -2.0]))
      tensor([2., 2.])
    """
    fn = "cond(pred, true_fun, false_fun, *operands)"
    p = _as_bool(pred, "pred", fn)
    if isinstance(p, bool):
        return true_fun(*operands) if p else false_fun(*operands)
    return _select(p, true_fun(*operands), false_fun(*operands), fn)


def switch(
    index: int | torch.Tensor, branches: Sequence[Callable[..., Any]], *operands: Any
) -> Any:
    """``branches[index](*operands)`` (``jax.lax.switch``); ``index`` is clamped to
    ``[0, len(branches) - 1]`` as in JAX.

    Args:
      index: an int or a scalar integer tensor.
      branches: a non-empty sequence of functions of ``*operands``.
      *operands: the branches' arguments.

    Returns:
      The chosen branch's output. Under ``vmap`` with a per-example index every branch
      runs and the outputs are selected per example (NOTE [control flow under vmap]), so
      all branches must then return the same structure, shapes and dtypes.

    Notes:
      NOTE [control flow under vmap]: a per-example predicate cannot be decided by a Python ``if``,
        so under ``fp.vmap`` (as JAX does when it batches a predicate) every branch runs and the
        outputs are selected per example with ``torch.where``.

    Example:
      >>> switch(5, [lambda x: x, lambda x: x * 10], torch.tensor(1.0))
      tensor(10.)
    """
    fn = "switch(index, branches, *operands)"
    branches = list(branches)
    if not branches or not all(callable(b) for b in branches):
        raise TypeError(f"{fn}: `branches` must be a non-empty sequence of functions")
    last = len(branches) - 1
    if isinstance(index, torch.Tensor):
        if index.dim() != 0 or index.is_floating_point() or index.is_complex():
            raise TypeError(f"{fn}: `index` must be an int or a 0-d integer tensor, got dtype "
                            f"{index.dtype} and shape {tuple(index.shape)}")
        try:
            i = int(index)
        except RuntimeError:  # batched under vmap
            outs = [b(*operands) for b in branches]
            clamped = index.clamp(0, last)
            result = outs[last]
            for j in range(last - 1, -1, -1):
                result = _select(clamped == j, outs[j], result, fn)
            return result
    elif isinstance(index, int) and not isinstance(index, bool):
        i = index
    else:
        raise TypeError(f"{fn}: `index` must be an int or a 0-d integer tensor, got {index!r}")
    return branches[min(max(i, 0), last)](*operands)


def _any_example(pred: torch.Tensor) -> bool:
    """Whether ``pred`` holds for any example of every enclosing ``vmap`` (host read)."""
    t = pred
    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return bool(t.any())


def while_loop(
    cond_fun: Callable[[Any], Any], body_fun: Callable[[Any], Any], init_val: Any
) -> Any:
    """Repeat ``val = body_fun(val)`` while ``cond_fun(val)`` (``jax.lax.while_loop``).

    Args:
      cond_fun: ``val -> bool or scalar tensor``.
      body_fun: ``val -> val`` keeping the structure, shapes and dtypes.
      init_val: the initial value (a pytree).

    Returns:
      The final value.

    Notes:
      Unlike ``jax.lax.while_loop`` (which is not reverse-differentiable), this is an
      eager loop and differentiable with ``fp.grad``. Under ``vmap`` with a per-example
      predicate it runs until every example is done (NOTE [control flow under vmap]).
      The predicate is read on the host every iteration.

      NOTE [control flow under vmap]: a per-example predicate cannot be decided by a Python ``if``,
        so under ``fp.vmap`` (as JAX does) the body runs while the predicate holds for any
        example, and each example keeps its value once its own predicate is false.

    Example:
      >>> while_loop(lambda v: v[0] < 5, lambda v: (v[0] + 1, v[1] * 2), (0, torch.tensor(1.0)))
      (5, tensor(32.))
    """
    fn = "while_loop(cond_fun, body_fun, init_val)"
    val = init_val
    treedef = _tree.structure(val)
    while True:
        p = _as_bool(cond_fun(val), "cond_fun(val)", fn)
        if isinstance(p, bool):
            if not p:
                return val
            new = body_fun(val)
        else:
            if not _any_example(p):
                return val
            new = _select(p, body_fun(val), val, fn)
        if not _compiling() and _tree.structure(new) != treedef:
            raise ValueError(
                f"{fn}: body_fun changed the structure of the value from {treedef} to "
                f"{_tree.structure(new)}"
            )
        val = new


def fori_loop(
    lower: int | torch.Tensor,
    upper: int | torch.Tensor,
    body_fun: Callable[[Any, Any], Any],
    init_val: Any,
) -> Any:
    """``val = body_fun(i, val)`` for ``i`` in ``range(lower, upper)`` (``jax.lax.fori_loop``).

    Args:
      lower: the first index (an int, or a scalar integer tensor read on the host).
      upper: one past the last index.
      body_fun: ``(i, val) -> val`` keeping the structure of ``val``.
      init_val: the initial value (a pytree).

    Returns:
      The final value.

    Notes:
      ``i`` is a Python int (JAX passes a traced int32 scalar); it indexes tensors the
      same way. Tensor bounds are read on the host (they cannot vary under ``vmap``).

    Example:
      >>> fori_loop(0, 4, lambda i, x: x + i, torch.tensor(0.0))
      tensor(6.)
    """
    fn = "fori_loop(lower, upper, body_fun, init_val)"
    bounds = []
    for name, b in (("lower", lower), ("upper", upper)):
        if (
            isinstance(b, torch.Tensor)
            and b.dim() == 0
            and not b.is_floating_point()
            and not b.is_complex()
        ):
            try:
                b = int(b)
            except RuntimeError:
                raise ValueError(
                    f"{fn}: `{name}` varies under vmap; use while_loop with a per-example counter"
                ) from None
        if isinstance(b, bool) or not isinstance(b, int):
            raise TypeError(f"{fn}: `{name}` must be an int or a 0-d integer tensor, got {b!r}")
        bounds.append(b)
    val = init_val
    treedef = _tree.structure(val)
    for i in range(bounds[0], bounds[1]):
        val = body_fun(i, val)
        if not _compiling() and _tree.structure(val) != treedef:
            raise ValueError(
                f"{fn}: body_fun changed the structure of the value from {treedef} to "
                f"{_tree.structure(val)}"
            )
    return val
