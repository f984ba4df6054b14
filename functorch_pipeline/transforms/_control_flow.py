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
structure, shapes and dtypes, and a branch must be safe to run on every example (no
error, no side effect).

# NOTE [masked operands under vmap]
A branch that is not taken for an example still runs on that example's operands, and its
output, though discarded by ``torch.where``, may be ``nan`` or ``inf`` there (``sqrt`` of a
negative number). ``torch.where`` gives it a zero cotangent, but the branch's own backward
turns ``0`` into ``0 * nan = nan`` (``sqrt``'s derivative at -1), which would reach the
operand. As JAX does (``select_n(pred, stop_gradient(x), x)``), branch ``j`` therefore
receives its floating operands as ``where(pred_j, x, x.detach())``: for the examples that
do not take it the operand is a constant, and ``where``'s backward selects (it does not
multiply), so the ``nan`` is dropped and gradients equal a per-example loop. The same
holds for ``while_loop``'s body on examples that are already done. Only the *operands*
are masked: a tensor a branch reads from its closure is not, so pass what you
differentiate as an operand (JAX converts closures to operands when tracing); a closed-
over tensor still gets the ``nan`` from a branch that is not taken. Leaves that nothing
differentiates (no ``grad``/``jvp`` transform or forward-AD level is active and the
tensor is in no autograd graph: a plain forward ``vmap``) are not copied. None of this
runs outside ``vmap``, or when the predicate is the same for every example.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad
from torch._C import _functorch
from torch._C._functorch import TransformType
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

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


def _describe(x: Any) -> str:
    """A value's type for an error message: ``numpy.str_``, ``str``, ``list``."""
    t = type(x)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by an enclosing ``vmap`` (under any grad/jvp wrappers)."""
    while _functorch.is_functorch_wrapped_tensor(t):
        if _functorch.is_batchedtensor(t):
            return True
        t = _functorch.get_unwrapped(t)
    return False


def _index(value: Any, what: str, fn: str) -> int | None:
    """``value`` as a Python int if it is a (NumPy) integer or a 0-d integer tensor, ``None``
    if it is such a tensor that varies under ``vmap``; bools are refused (as JAX)."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{fn}: `{what}` must be an int or a 0-d integer tensor, got a tensor "
                            f"of dtype {value.dtype} and shape {tuple(value.shape)}")
        if _batched(value):  # varies under vmap (int() would raise, slowly)
            return None
        try:
            return int(value)
        except RuntimeError:  # batched under vmap: the value differs between examples
            return None
    if type(value) is int:
        return value
    if not isinstance(value, (bool, np.bool_)):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{fn}: `{what}` must be an int or a 0-d integer tensor, got "
                    f"{_describe(value)} {value!r}")


def _as_bool(pred: Any, what: str, fn: str) -> bool | torch.Tensor:
    """``pred`` as a Python bool, or the 0-d bool tensor it is when it varies under vmap."""
    if isinstance(pred, torch.Tensor):
        if pred.numel() != 1 or pred.dim() != 0:
            raise ValueError(
                f"{fn}: `{what}` must be a scalar (0-d), got shape {tuple(pred.shape)}"
            )
        if pred.dtype.is_complex:
            raise TypeError(f"{fn}: `{what}` must be a bool or real scalar, got dtype {pred.dtype}")
        if _batched(pred):  # varies under vmap (bool() would raise, slowly)
            return pred != 0
        try:
            return bool(pred)
        except RuntimeError:  # batched under vmap: the value differs between examples
            return pred != 0
    if isinstance(pred, (bool, int, float, np.bool_, np.integer, np.floating)):
        return bool(pred)
    if isinstance(pred, np.ndarray) and pred.ndim == 0 and pred.dtype.kind in "biuf":
        return bool(pred)
    raise TypeError(f"{fn}: `{what}` must be a bool, a real number or a 0-d tensor, got "
                    f"{_describe(pred)}")


def _derivatives_tracked() -> bool:
    """Whether a torch.func ``grad``/``jvp`` transform or a forward-AD level is active."""
    if _forward_ad._current_level >= 0:
        return True
    return any(i.key() in (TransformType.Grad, TransformType.Jvp)
               for i in retrieve_all_functorch_interpreters())


def _differentiable(x: Any, tracked: bool) -> bool:
    """Whether a derivative can flow through tensor ``x``: a floating (or complex) tensor
    under a derivative transform, or one whose storage (under ``vmap``'s wrappers) is in an
    autograd graph."""
    if not (isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())):
        return False
    if tracked:
        return True
    while _functorch.is_functorch_wrapped_tensor(x):  # a BatchedTensor hides requires_grad
        x = _functorch.get_unwrapped(x)
    return x.requires_grad and torch.is_grad_enabled()


def _mask(pred: torch.Tensor, operands: Any, taken: bool = True) -> Any:
    """``operands`` as a branch taken where ``pred == taken`` sees them: a constant
    (detached) for the other examples (NOTE [masked operands under vmap])."""
    tracked = _derivatives_tracked()

    def mask(x: Any) -> Any:
        if not _differentiable(x, tracked):
            return x
        return torch.where(pred, x, x.detach()) if taken else torch.where(pred, x.detach(), x)

    return _tree.map(mask, operands)


def _select(pred: torch.Tensor, on_true: Any, on_false: Any, fn: str, loop: bool = False) -> Any:
    paths, a, ta = _tree.flatten_with_path(on_true)
    b, tb = _tree.flatten(on_false)
    if not _compiling() and ta != tb:
        what = "body_fun changed the structure of the value" if loop else "the branches return different structures"
        raise ValueError(f"{fn}: {what}: {ta} and {tb}")
    out = []
    for p, x, y in zip(paths, a, b, strict=True):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            if x is y or x == y:
                out.append(x)
                continue
            if loop:
                raise TypeError(
                    f"{fn}: the value at path `{_tree.keystr(p)}` is the {_describe(y)} {y!r}, which "
                    f"body_fun changes (to {x!r}), but under vmap the predicate differs between "
                    "examples, so each example needs its own value: make it a tensor (e.g. "
                    "torch.tensor(0) for a counter)"
                )
            raise TypeError(
                f"{fn}: output at path `{_tree.keystr(p)}` is not a tensor and differs "
                "between the branches; under vmap both branches run and must give tensors"
            )
        if x.shape != y.shape or x.dtype != y.dtype:
            if loop:
                raise ValueError(
                    f"{fn}: body_fun must keep the shapes and dtypes of the value (as jax.lax), but "
                    f"at path `{_tree.keystr(p)}` the value has shape {tuple(y.shape)} and dtype "
                    f"{y.dtype} and body_fun returned shape {tuple(x.shape)} and dtype {x.dtype}"
                )
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
      pred: a bool, a real number (NumPy scalars included) or a 0-d tensor (non-zero is
        true).
      true_fun: the branch taken when ``pred`` is true.
      false_fun: the other branch.
      *operands: the branches' arguments (pytrees).

    Returns:
      The taken branch's output. Under ``vmap`` with a per-example predicate both
      branches run and the outputs are selected per example (NOTE [control flow under
      vmap]); gradients and tangents then equal a per-example loop's, because each
      branch sees the operands of the examples that do not take it as constants (NOTE
      [masked operands under vmap]).

    Notes:
      JAX traces both branches and requires identical output types always; here only the
      taken branch runs (so only one is checked) except under ``vmap`` with a batched
      predicate. ``pred`` is read on the host (a device sync) outside ``vmap``.

      NOTE [control flow under vmap]: a per-example predicate cannot be decided by a Python ``if``,
        so under ``fp.vmap`` (as JAX does when it batches a predicate) every branch runs and the
        outputs are selected per example with ``torch.where``.
      NOTE [masked operands under vmap]: a branch not taken by an example still runs on its
        operands, and its backward would turn the zero cotangent into ``0 * nan`` where its
        derivative is infinite (``sqrt`` at -1); as JAX does, each branch gets its floating
        operands as ``where(pred, x, x.detach())``, constants for the examples that do not
        take it, so gradients equal a per-example loop. Tensors a branch reads from its
        closure are not masked: pass what you differentiate as an operand.

    Example:
      >>> cond(torch.tensor(True), lambda x: x + 1, lambda x: x - 1, torch.tensor(1.0))
      tensor(2.)
      >>> import functorch_pipeline as fp
      >>> fp.vmap(lambda x: cond(x > 0, torch.sqrt, torch.neg, x))(torch.tensor([4.0, -2.0]))
      tensor([2., 2.])
      >>> fp.vmap(fp.grad(lambda x: cond(x > 0, torch.sqrt, torch.neg, x)))(torch.tensor([4.0, -2.0]))
      tensor([ 0.2500, -1.0000])
    """
    fn = "cond(pred, true_fun, false_fun, *operands)"
    p = _as_bool(pred, "pred", fn)
    if isinstance(p, bool):
        return true_fun(*operands) if p else false_fun(*operands)
    # NOTE [masked operands under vmap]
    return _select(p, true_fun(*_mask(p, operands)), false_fun(*_mask(p, operands, False)), fn)


def switch(
    index: int | torch.Tensor, branches: Sequence[Callable[..., Any]], *operands: Any
) -> Any:
    """``branches[index](*operands)`` (``jax.lax.switch``); ``index`` is clamped to
    ``[0, len(branches) - 1]`` as in JAX.

    Args:
      index: an int (NumPy integers included) or a 0-d integer tensor; bools are refused,
        as in JAX.
      branches: a non-empty sequence of functions of ``*operands``.
      *operands: the branches' arguments.

    Returns:
      The chosen branch's output. Under ``vmap`` with a per-example index every branch
      runs and the outputs are selected per example (NOTE [control flow under vmap]), so
      all branches must then return the same structure, shapes and dtypes, and each sees
      the operands of the examples that do not take it as constants (NOTE [masked operands
      under vmap]).

    Notes:
      NOTE [control flow under vmap]: a per-example predicate cannot be decided by a Python ``if``,
        so under ``fp.vmap`` (as JAX does when it batches a predicate) every branch runs and the
        outputs are selected per example with ``torch.where``.
      NOTE [masked operands under vmap]: a branch not taken by an example still runs on its
        operands, and its backward would turn the zero cotangent into ``0 * nan`` where its
        derivative is infinite (``sqrt`` at -1); as JAX does, each branch gets its floating
        operands as ``where(pred, x, x.detach())``, constants for the examples that do not
        take it, so gradients equal a per-example loop. Tensors a branch reads from its
        closure are not masked: pass what you differentiate as an operand.

    Example:
      >>> switch(5, [lambda x: x, lambda x: x * 10], torch.tensor(1.0))
      tensor(10.)
    """
    fn = "switch(index, branches, *operands)"
    branches = list(branches)
    if not branches or not all(callable(b) for b in branches):
        raise TypeError(f"{fn}: `branches` must be a non-empty sequence of functions")
    last = len(branches) - 1
    i = _index(index, "index", fn)
    if i is None:  # batched under vmap: NOTE [masked operands under vmap]
        clamped = index.clamp(0, last)
        masks = [clamped == j for j in range(last + 1)]
        outs = [b(*_mask(m, operands)) for b, m in zip(branches, masks, strict=True)]
        result = outs[last]
        for j in range(last - 1, -1, -1):
            result = _select(masks[j], outs[j], result, fn)
        return result
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

    Raises:
      ValueError: if ``body_fun`` changes the structure of the value, or the shape or dtype
        of a tensor leaf (as ``jax.lax.while_loop``; shapes and dtypes are compared at the
        first iteration, NOTE [loop carry check]).

    Notes:
      Unlike ``jax.lax.while_loop`` (which is not reverse-differentiable), this is an
      eager loop and differentiable with ``fp.grad``. Under ``vmap`` with a per-example
      predicate it runs until every example is done (NOTE [control flow under vmap]); the
      body sees the examples already done as constants, so their gradients equal a
      per-example loop's (NOTE [masked operands under vmap]), and every leaf the body
      changes must then be a tensor (a Python-int counter is refused; use
      ``torch.tensor(0)``). The predicate is read on the host every iteration.

      NOTE [control flow under vmap]: a per-example predicate cannot be decided by a Python ``if``,
        so under ``fp.vmap`` (as JAX does) the body runs while the predicate holds for any
        example, and each example keeps its value once its own predicate is false.
      NOTE [masked operands under vmap]: a branch not taken by an example still runs on its
        operands, and its backward would turn the zero cotangent into ``0 * nan`` where its
        derivative is infinite (``sqrt`` at -1); as JAX does, each branch gets its floating
        operands as ``where(pred, x, x.detach())``, constants for the examples that do not
        take it, so gradients equal a per-example loop. Tensors a branch reads from its
        closure are not masked: pass what you differentiate as an operand.
      NOTE [loop carry check]: the value's structure is compared with ``init_val``'s at
        every iteration; the shapes and dtypes of its tensor leaves at the first iteration
        only (comparing them every iteration doubled the check's cost), so a body whose
        output shape changes only later is not caught.

    Example:
      >>> while_loop(lambda v: v[0] < 5, lambda v: (v[0] + 1, v[1] * 2), (0, torch.tensor(1.0)))
      (5, tensor(32.))
    """
    fn = "while_loop(cond_fun, body_fun, init_val)"
    val = init_val
    spec = _carry_spec(val)
    step = 0
    while True:
        p = _as_bool(cond_fun(val), "cond_fun(val)", fn)
        if isinstance(p, bool):
            if not p:
                return val
            new = body_fun(val)
            _check_carry(fn, spec, init_val, new, step)
        else:
            if not _any_example(p):
                return val
            # NOTE [masked operands under vmap]: the examples already done see a constant
            new = body_fun(_mask(p, val))
            _check_carry(fn, spec, init_val, new, step)
            new = _select(p, new, val, fn, loop=True)
        val = new
        step += 1


def _carry_spec(val: Any) -> tuple[Any, list[tuple[torch.Size, torch.dtype] | None]]:
    """``val``'s structure and the ``(shape, dtype)`` of each tensor leaf (``None`` for others)."""
    leaves, treedef = _tree.flatten(val)
    return treedef, [(x.shape, x.dtype) if isinstance(x, torch.Tensor) else None for x in leaves]


def _check_carry(fn: str, spec: tuple[Any, list[Any]], init_val: Any, new: Any, step: int) -> None:
    """Raise unless ``new`` (body_fun's output at iteration ``step``) has the structure of
    the loop's value and, at the first iteration, the shape and dtype of each of its tensor
    leaves (``jax.lax``).

    # NOTE [loop carry check]
    JAX traces the body once, so its check is once too. Here the structure is compared at
    every iteration and the shapes and dtypes at the first only: comparing them at every
    iteration doubled the check's cost (3.5 -> 7 us an iteration, 10-25% of a 1000-step
    loop with a small body), and a body whose output shapes are a function of its input
    shapes cannot change them later. A body whose output shape depends on the data can.
    """
    if _compiling():  # Dynamo's optree polyfill cannot compare tree structures
        return
    treedef, metas = spec
    if step:
        if _tree.structure(new) != treedef:
            raise ValueError(f"{fn}: body_fun changed the structure of the value from {treedef} "
                             f"to {_tree.structure(new)} (iteration {step})")
        return
    leaves, td = _tree.flatten(new)
    if td != treedef:
        raise ValueError(
            f"{fn}: body_fun changed the structure of the value from {treedef} to {td}"
        )
    for j, (m, x) in enumerate(zip(metas, leaves, strict=True)):
        if m is None or (isinstance(x, torch.Tensor) and x.shape == m[0] and x.dtype == m[1]):
            continue
        path = _tree.keystr(_tree.flatten_with_path(init_val)[0][j])
        got = (f"shape {tuple(x.shape)} and dtype {x.dtype}" if isinstance(x, torch.Tensor)
               else f"a {_describe(x)}")
        raise ValueError(
            f"{fn}: body_fun must keep the shapes and dtypes of the value (as jax.lax), but "
            f"at path `{path}` the value has shape {tuple(m[0])} and dtype {m[1]} and "
            f"body_fun returned {got} (iteration {step})"
        )


def fori_loop(
    lower: int | torch.Tensor,
    upper: int | torch.Tensor,
    body_fun: Callable[[Any, Any], Any],
    init_val: Any,
) -> Any:
    """``val = body_fun(i, val)`` for ``i`` in ``range(lower, upper)`` (``jax.lax.fori_loop``).

    Args:
      lower: the first index (an int, NumPy integers included, or a 0-d integer tensor
        read on the host).
      upper: one past the last index.
      body_fun: ``(i, val) -> val`` keeping the structure of ``val`` and the shapes and
        dtypes of its tensor leaves.
      init_val: the initial value (a pytree).

    Returns:
      The final value.

    Raises:
      ValueError: if ``body_fun`` changes the structure of the value, or the shape or dtype
        of a tensor leaf (as ``jax.lax.fori_loop``; shapes and dtypes are compared at the
        first iteration, NOTE [loop carry check]).

    Notes:
      ``i`` is a Python int (JAX passes a traced int32 scalar); it indexes tensors the
      same way. Tensor bounds are read on the host (they cannot vary under ``vmap``).

      NOTE [loop carry check]: the value's structure is compared with ``init_val``'s at
        every iteration; the shapes and dtypes of its tensor leaves at the first iteration
        only (comparing them every iteration doubled the check's cost), so a body whose
        output shape changes only later is not caught.

    Example:
      >>> fori_loop(0, 4, lambda i, x: x + i, torch.tensor(0.0))
      tensor(6.)
    """
    fn = "fori_loop(lower, upper, body_fun, init_val)"
    bounds = []
    for name, b in (("lower", lower), ("upper", upper)):
        i = _index(b, name, fn)
        if i is None:
            raise ValueError(
                f"{fn}: `{name}` varies under vmap; use while_loop with a per-example counter"
            )
        bounds.append(i)
    val = init_val
    spec = _carry_spec(val)
    for step, i in enumerate(range(bounds[0], bounds[1])):
        val = body_fun(i, val)
        _check_carry(fn, spec, init_val, val, step)
    return val
