"""Input validation shared by the transformations (private).

# NOTE [leaf checks]
torch's multi-tensor kernels (``torch._fused_adam_``, ``torch._foreach_*``) check nothing:
a gradient or state leaf of the wrong shape makes ``_fused_adam_`` write past the end of
a buffer and corrupt the heap, and a foreach ``lerp`` silently reads the first elements.
So every transformation that combines the updates with another tree (its state, the
parameters) flattens that tree with :func:`functorch_pipeline.optim._base.flatten_like`,
which calls :func:`check_leaves` before any kernel runs: every leaf must be a tensor with
the update leaf's shape, device and dtype. Step counters and other scalars of a state go
through :func:`check_count` / :func:`check_scalar`, the state's type through
:func:`check_state`.

The check is cheap: one list of ``(shape, dtype, device)`` tuples per tree, compared with
``==`` (Python metadata only, no host sync). Under ``vmap`` these are the logical
per-example shapes; under ``torch.compile`` they are constants of the trace (Dynamo guards
on them), so the comparison costs nothing in the compiled graph. Only on a mismatch does
the slow path walk the leaves to name the first bad key path.

# NOTE [leaf dtypes]
fp.optim does not promote dtypes. A gradient leaf must have its parameter's dtype, and
a state leaf the gradient's (or the dtype the transformation was asked to keep it in:
``mu_dtype``, ``accumulator_dtype``). optax promotes instead: a float64 gradient for a
float32 parameter turns the float32 moments into float64 ones after the first step, so
the state's dtype changes from one step to the next. We raise a ``TypeError`` naming the
leaf and both dtypes; cast the gradients first (``fp.tree.astype(grads, torch.float32)``).
:func:`~functorch_pipeline.optim.apply_updates` keeps its optax rule: updates of any
dtype are added and the result is cast to the parameter's dtype.
"""

from __future__ import annotations

import collections.abc
import math
import numbers
import operator
from typing import Any

import torch

from functorch_pipeline import tree as fpt

SAME = "same"  # ``dtype=SAME``: a leaf must have the reference leaf's dtype


def _path(tree: Any, i: int) -> str:
    if torch.compiler.is_compiling():  # optree's key paths are opaque to Dynamo
        from functorch_pipeline.optim._masking import paths_and_leaves  # (import cycle)

        paths, _ = paths_and_leaves(tree)
        return fpt.keystr(paths[i]) if i < len(paths) else f"<leaf {i}>"
    try:
        return fpt.keystr(fpt.flatten_with_path(tree)[0][i])
    except Exception:  # noqa: BLE001 - only used to word an error
        return f"<leaf {i}>"


def signature(xs: list) -> list | None:
    """``[(shape, dtype, device)]`` of a list of tensors (None if one is not a tensor):
    compute it once per update for the gradients and pass it as ``ref_sig``."""
    try:
        return _sig(xs)
    except AttributeError:
        return None


_SIG = operator.attrgetter("shape", "dtype", "device")


def _sig(xs: list) -> list:
    if torch.compiler.is_compiling():  # Dynamo cannot call an attrgetter
        return [(x.shape, x.dtype, x.device) for x in xs]
    return list(map(_SIG, xs))  # ~20% faster than building the tuples in Python


def check_leaves(
    where: str,
    ref_name: str,
    ref: list,
    name: str,
    leaves: list,
    tree: Any,
    *,
    dtype: Any = SAME,
    ref_sig: list | None = None,
) -> None:
    """Raise unless ``leaves[i]`` is a tensor with the shape and device of ``ref[i]`` and
    the dtype ``dtype`` (``SAME``: ``ref[i]``'s; ``None``: any). ``tree`` (whose leaves
    are in ``ref``'s order) names the key path in the error (NOTE [leaf checks]).
    ``ref_sig``: ``signature(ref)`` when the caller has it."""
    try:
        if dtype is SAME:
            if ref_sig is None:
                ref_sig = _sig(ref)
            if ref_sig == _sig(leaves):
                return
        elif [(x.shape, x.device) for x in ref] == [(y.shape, y.device) for y in leaves] and (
            dtype is None or all(y.dtype == dtype for y in leaves)
        ):
            return
    except AttributeError:
        pass
    _explain(where, ref_name, ref, name, leaves, tree, dtype)


def _explain(
    where: str, ref_name: str, ref: list, name: str, leaves: list, tree: Any, dtype: Any
) -> None:
    for i, (x, y) in enumerate(zip(ref, leaves, strict=True)):
        for what, v in ((ref_name, x), (name, y)):
            if not isinstance(v, torch.Tensor):
                raise TypeError(
                    f"{where}: leaf at path `{_path(tree, i)}` of `{what}` is a "
                    f"{type(v).__name__}, "
                    "expected a tensor"
                )
        if x.shape != y.shape:
            hint = (
                " (transposed?)" if x.dim() == 2 and tuple(y.shape) == tuple(x.shape)[::-1] else ""
            )
            raise ValueError(
                f"{where}: leaf at path `{_path(tree, i)}` has shape {tuple(x.shape)} in "
                f"`{ref_name}` "
                f"but {tuple(y.shape)} in `{name}`{hint}"
            )
        if x.device != y.device:
            raise ValueError(
                f"{where}: leaf at path `{_path(tree, i)}` is on device {x.device} in `{ref_name}` "
                f"but on {y.device} in `{name}`; move them to one device first"
            )
        if dtype is SAME and x.dtype != y.dtype:
            got = f"has dtype {x.dtype} in `{ref_name}` but {y.dtype} in `{name}`"
        elif dtype not in (SAME, None) and y.dtype != dtype:
            got = f"has dtype {y.dtype} in `{name}`, expected {dtype}"
        else:
            continue
        raise TypeError(
            f"{where}: leaf at path `{_path(tree, i)}` {got}; fp.optim does not promote dtypes "
            "(NOTE [leaf dtypes]): cast first, e.g. fp.tree.astype(grads, params_dtype)"
        )


def check_float(where: str, leaves: list, tree: Any) -> None:
    """Raise a TypeError naming the first leaf that is not a floating-point tensor."""
    for i, x in enumerate(leaves):
        if not (isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex())):
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(f"{where}: leaf at path `{_path(tree, i)}` has dtype {got}; "
                            "this transformation needs floating-point updates")


def check_state(where: str, state: Any, cls: type | tuple[type, ...], init: str) -> None:
    """Raise a TypeError unless ``state`` is a ``cls`` (state from another optimizer)."""
    if not isinstance(state, cls):
        names = " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))
        raise TypeError(
            f"{where}: expected the state made by `{init}` (a {names}), got a "
            f"{type(state).__name__}; was the state made by a different optimizer's init?"
        )


def check_scalar(
    where: str, name: str, x: Any, device: torch.device | None, dtype: torch.dtype
) -> None:
    """A state scalar (a step count, a running product) must be a 0-d tensor of the
    dtype ``init`` made it with, on ``device`` (when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: `{name}` is a {type(x).__name__}, expected a 0-d tensor")
    if x.dim() != 0:
        raise ValueError(f"{where}: `{name}` has shape {tuple(x.shape)}, expected a 0-d tensor ()")
    if x.dtype != dtype:
        raise TypeError(
            f"{where}: `{name}` has dtype {x.dtype}, expected {dtype} (as made by init)"
        )
    if device is not None and x.device != device:
        raise ValueError(f"{where}: `{name}` is on device {x.device} but the updates on {device}")


def check_count(where: str, name: str, x: Any, ref: list) -> None:
    """:func:`check_scalar` for an int32 step count, on the first update leaf's device."""
    check_scalar(where, name, x, first_device(ref), torch.int32)


def first_device(xs: Any) -> torch.device | None:
    """The device of the first tensor in a list (or tree), else None."""
    for x in xs if isinstance(xs, list) else fpt.leaves(xs):
        if isinstance(x, torch.Tensor):
            return x.device
    return None


def check_one_device(where: str, xs: list, tree: Any) -> None:
    """Reductions across leaves (a global norm, an all-finite flag) need one device."""
    if not xs:
        return
    d = xs[0].device
    for i, x in enumerate(xs):
        if x.device != d:
            raise ValueError(
                f"{where}: leaf at path `{_path(tree, i)}` is on device {x.device} but "
                f"`{_path(tree, 0)}` on {d}; this transformation reduces over all leaves, "
                "which must be on one device"
            )


_OPTAX_HINT = (
    "fp.optim optimizers are optax-style: the factory takes hyperparameters only "
    "(e.g. optim.adam(1e-3)); the parameters go to `opt.init(params)` and the gradients to "
    "`opt.update(grads, state, params)`"
)


def check_hyperparameter(where: str, name: str, value: Any, *, schedule: bool = False) -> None:
    """Raise a TypeError unless ``value`` is a real number, a 0-d tensor or (when
    ``schedule``) a callable; parameters passed by mistake get a pointer to ``init``."""
    if isinstance(value, bool):
        raise TypeError(f"{where}: `{name}` must be a number, got a bool")
    if isinstance(value, numbers.Real):
        return
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        if value.dtype == torch.bool:  # as a Python bool: a flag, never a hyperparameter
            raise TypeError(f"{where}: `{name}` must be a number, got a bool tensor")
        return
    looks_like_params = isinstance(
        value, (torch.nn.Module, torch.nn.Parameter, collections.abc.Iterator)
    ) or (
        isinstance(value, (list, tuple, dict))
        and any(isinstance(x, torch.Tensor) for x in fpt.leaves(value))
    )
    if schedule and callable(value) and not isinstance(value, torch.nn.Module):
        return
    kinds = "a number, a 0-d tensor or a schedule" if schedule else "a number or a 0-d tensor"
    got = f"a {type(value).__name__}"
    if isinstance(value, torch.Tensor):
        got += f" of shape {tuple(value.shape)}"
    msg = f"{where}: `{name}` must be {kinds}, got {got}"
    if looks_like_params:
        msg += f". {_OPTAX_HINT}"
    raise TypeError(msg)


def check_real(
    where: str,
    name: str,
    value: Any,
    *,
    low: float = 0.0,
    low_open: bool = False,
    finite: bool = True,
) -> float:
    """A real hyperparameter read on the host, returned as a Python float.

    ``value`` is a Python (or NumPy) real number or a one-element real tensor (read with
    ``float``: one device sync for an accelerator tensor, so call it once, outside any
    loop). NaN is always refused (``nan > 0`` is False, so a NaN noise multiplier would
    otherwise mean "no noise"), as is a value below ``low`` (or equal to it when
    ``low_open``) and, when ``finite``, +-inf.

    Args:
      where: the API, for the message (``"add_dp_noise"``).
      name: the argument's name.
      value: the value to check.
      low: the lower bound.
      low_open: refuse ``low`` itself too (``> low`` instead of ``>= low``).
      finite: refuse +-inf.

    Returns:
      ``float(value)``.

    Raises:
      TypeError: ``value`` is not a real number or a one-element real tensor.
      ValueError: it is NaN, out of range, infinite when ``finite``, or an int too large
        for a float.

    Example:
      >>> check_real("f", "sigma", torch.tensor(0.5))
      0.5
      >>> check_real("f", "sigma", float("nan"))
      Traceback (most recent call last):
      ...
      ValueError: f: `sigma` must be a finite number >= 0, got nan
      >>> check_real("f", "sigma", 10**400)
      Traceback (most recent call last):
      ...
      ValueError: f: `sigma` is too large for a float, got an int of 1329 bits
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            what = "bool " if value.dtype == torch.bool else "complex " if value.is_complex() else ""
            raise TypeError(f"{where}: `{name}` must be a number or a one-element tensor, got a "
                            f"{what}Tensor of shape {tuple(value.shape)}")
        x = float(value)
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where}: `{name}` must be a number or a one-element tensor, got a "
                        f"{type(value).__name__}")
    else:
        try:
            x = float(value)
        except OverflowError:  # an int beyond float's range (10**400): no bare OverflowError
            raise ValueError(f"{where}: `{name}` is too large for a float, got an int of "
                             f"{int(value).bit_length()} bits") from None
    ok = (x > low if low_open else x >= low) and (math.isfinite(x) or not finite)
    if not ok:  # NaN lands here: every comparison with it is False
        op = ">" if low_open else ">="
        kind = f"a finite number {op} {low:g}" if finite else f"a number {op} {low:g} or inf"
        raise ValueError(f"{where}: `{name}` must be {kind}, got {value!r}")
    return x
