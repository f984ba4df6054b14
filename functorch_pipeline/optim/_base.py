"""The protocol: ``GradientTransformation(init, update)``, ``chain`` and ``apply_updates``.

A gradient transformation is a pair of pure functions. ``init(params)`` builds a state
(a pytree, usually a NamedTuple); ``update(updates, state, params=None, **extra_args)``
returns ``(new_updates, new_state)``. Updates are *additive*: ``sgd(0.1)`` turns a
gradient ``g`` into ``-0.1 * g`` and :func:`apply_updates` adds it to the parameters.

# NOTE [in-place opt-in]
Everything is pure by default: no input tensor is ever written. Large models can opt in
to buffer donation, in the spirit of JAX's ``donate_argnums``:

* ``tx.update(grads, state, params, inplace=True)`` may overwrite the tensors of
  ``state`` and of the incoming ``grads`` and return them, as updates or as part of the
  new state (NOTE [trace buffer swap]); the caller must not read or write the old
  ``state``/``grads`` tensors afterwards;
* :func:`apply_updates_` adds the updates into the parameter tensors themselves.

Both give bit-identical numbers to the pure path (tests check this for every named
optimizer); they only save allocations and memory traffic.

A pure update may share buffers with the new state, as in optax where ``trace``'s update
*is* its new momentum (no copy). Nothing in fp.optim writes into it on the pure path; when
``inplace=True`` is asked for, the transforms that follow may write into the updates they
receive, so no transform then hands out its state's buffers (NOTE [update never aliases
state] in ``_transforms.py``). Donate (``inplace=True``) only updates from an in-place
call, or your own gradients, not the result of a pure call.

# NOTE [affine tail fusion]
Named optimizers are chains such as ``chain(scale_by_adam(), scale_by_learning_rate(lr))``.
Run literally, the learning-rate scaling is one more pass over every parameter. ``chain``
therefore fuses a run of *affine* transforms (``scale``, ``scale_by_learning_rate``,
``scale_by_schedule`` and unmasked ``add_decayed_weights``, each ``u -> a*u + c*params``)
into the transform before them when that transform knows how to apply ``a`` and ``c``
itself (the adaptive scalers do). The maths is the same chain; only rounding may differ
in the last bit, and it is the same in the pure and in-place paths.

The protocol is two function attributes: ``update._fp_fused(updates, state, params, m,
c, **extra_args)`` (set by :func:`fused_transformation`) and ``update._fp_affine(state,
params) -> (m, c, new_state)``. ``chain`` calls them instead of ``update``, so each must
do what ``update`` does first: check its inputs (NOTE [leaf checks] in ``_checks.py``)
and keep its fast paths off when differentiated (NOTE [differentiable optimizers] in
``_mt.py``); ``m`` and ``c`` may be tensors that require grad.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import torch

from functorch_pipeline import tree as fpt
from functorch_pipeline.optim import _checks
from functorch_pipeline.optim import _mt

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "GradientTransformationExtraArgs",
    "OptState",
    "Params",
    "Schedule",
    "ScalarOrSchedule",
    "Updates",
    "apply_updates",
    "apply_updates_",
    "chain",
    "identity",
    "set_to_zero",
    "stateless",
    "stateless_with_tree_map",
]

Params = Any
Updates = Any
OptState = Any
Schedule = Callable[[Any], Any]
ScalarOrSchedule = float | torch.Tensor | Schedule


class GradientTransformation(NamedTuple):
    """A pair of pure functions ``(init, update)``; see the module docstring.

    >>> tx = GradientTransformation(lambda p: (), lambda u, s, p=None, **kw: (u, s))
    >>> init, update = tx
    >>> update({"w": torch.ones(1)}, init(None))
    ({'w': tensor([1.])}, ())
    """

    init: Callable[[Params], OptState]
    update: Callable[..., tuple[Updates, OptState]]


GradientTransformationExtraArgs = GradientTransformation


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def _device_of(tree: Any) -> torch.device:
    for x in fpt.leaves(tree):
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def zero_count(params: Params) -> torch.Tensor:
    """An int32 step counter on the parameters' device."""
    return torch.zeros((), dtype=torch.int32, device=_device_of(params))


def mismatch_error(where: str, a_name: str, a: Any, b_name: str, b: Any) -> ValueError:
    """A ValueError naming the key paths present in one tree and not the other."""
    pa = {fpt.keystr(p) for p in fpt.flatten_with_path(a)[0]}
    pb = {fpt.keystr(p) for p in fpt.flatten_with_path(b)[0]}
    missing, extra = sorted(pa - pb), sorted(pb - pa)
    if missing or extra:
        detail = f"paths only in `{a_name}`: {missing or 'none'}; only in `{b_name}`: {extra or 'none'}"
    else:
        detail = f"same leaves but different containers: {fpt.structure(a)} vs {fpt.structure(b)}"
    return ValueError(f"{where}: `{b_name}` does not have the structure of `{a_name}` ({detail})")


def flatten_like(
    where: str,
    updates: Updates,
    other: Any,
    other_name: str,
    treedef: Any = None,
    *,
    ref: list | None = None,
    dtype: Any = _checks.SAME,
    ref_sig: list | None = None,
) -> list:
    """Leaves of ``other`` in the order of ``updates``' leaves, or a clear error.

    Every leaf must be a tensor with the shape and device of the update leaf, and the
    dtype ``dtype`` (``SAME``: the update leaf's; ``None``: any): NOTE [leaf checks] in
    ``_checks.py``. ``treedef``: the structure of ``updates`` and ``ref``: its leaves,
    when the caller already has them; ``ref_sig``: ``_checks.signature(ref)``, computed
    once per update when several trees are checked against the same updates.
    """
    if treedef is None:
        treedef = fpt.structure(updates)
    try:
        leaves = treedef.flatten_up_to(other)
    except (ValueError, TypeError):
        raise mismatch_error(where, "updates", updates, other_name, other) from None
    if ref is None:
        ref = fpt.leaves(updates)
    _checks.check_leaves(where, "updates", ref, other_name, leaves, updates, dtype=dtype,
                         ref_sig=ref_sig)
    return leaves


def require_params(where: str, params: Any) -> None:
    if params is None:
        raise ValueError(f"{where}: this transformation needs `params`; call update(updates, state, params)")


def identity() -> GradientTransformation:
    """Leave updates unchanged (optax's ``identity``).

    Returns:
      A :class:`GradientTransformation`.

    >>> identity().update({"w": torch.ones(1)}, EmptyState())[0]
    {'w': tensor([1.])}
    """

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: OptState, params: Params = None, **extra_args: Any):
        return updates, state

    return GradientTransformation(init_fn, update_fn)


def set_to_zero() -> GradientTransformation:
    """Replace every update by zeros (with :func:`masked` this freezes parameters).

    Returns:
      A :class:`GradientTransformation`.

    >>> set_to_zero().update({"w": torch.ones(2)}, EmptyState())[0]
    {'w': tensor([0., 0.])}
    """

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: OptState, params: Params = None, **extra_args: Any):
        return fpt.map(torch.zeros_like, updates), state

    return GradientTransformation(init_fn, update_fn)


def stateless(f: Callable[[Updates, Params], Updates]) -> GradientTransformation:
    """A transformation from a function ``f(updates, params) -> updates`` of whole trees.

    Args:
      f: ``(updates, params) -> updates`` on whole trees.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = stateless(lambda u, p: fpt.scale(u, 2.0))
    >>> tx.update([torch.ones(1)], tx.init(None))[0]
    [tensor([2.])]
    """

    def init_fn(params: Params) -> EmptyState:
        return EmptyState()

    def update_fn(updates: Updates, state: OptState, params: Params = None, **extra_args: Any):
        return f(updates, params), state

    return GradientTransformation(init_fn, update_fn)


def stateless_with_tree_map(f: Callable[[torch.Tensor, Any], torch.Tensor]) -> GradientTransformation:
    """A transformation from a per-leaf function ``f(update, param) -> update``.

    Args:
      f: ``(update_leaf, param_leaf) -> update_leaf``.

    Returns:
      A :class:`GradientTransformation`.

    >>> tx = stateless_with_tree_map(lambda g, p: g * 3)
    >>> tx.update([torch.ones(1)], tx.init(None))[0]
    [tensor([3.])]
    """

    def g(updates: Updates, params: Params) -> Updates:
        if params is None:
            return fpt.map(lambda u: f(u, None), updates)
        ul, td = fpt.flatten(updates)
        pl = flatten_like("stateless_with_tree_map.update", updates, params, "params", td, ref=ul)
        return fpt.unflatten(td, [f(u, p) for u, p in zip(ul, pl, strict=True)])

    return stateless(g)


def _accepts_extra(fn: Callable[..., Any]) -> bool:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return True
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def drop_extra_args(tx: GradientTransformation) -> GradientTransformation:
    """``tx`` itself when its ``update`` takes ``**extra_args``, else ``tx`` with an
    ``update`` that drops them (optax's ``with_extra_args_support``). Wrappers apply it to
    the transformations they call, as :func:`chain` does, so that ``update(...,
    value=loss)`` reaches the transformations that take it and skips the others.

    Args:
      tx: a gradient transformation.

    Returns:
      A :class:`GradientTransformation` whose ``update`` accepts any keyword arguments.

    >>> tx = drop_extra_args(GradientTransformation(lambda p: (), lambda u, s, p=None: (u, s)))
    >>> tx.update({"w": torch.ones(1)}, (), value=1.0)
    ({'w': tensor([1.])}, ())
    """
    tx = GradientTransformation(*tx)
    if _accepts_extra(tx.update):
        return tx
    inner_update = tx.update

    def update_fn(updates: Updates, state: OptState, params: Params = None, **extra_args: Any):
        return inner_update(updates, state, params)

    return GradientTransformation(tx.init, update_fn)


def _compose_affine(m: Any, c: Any, m2: Any, c2: Any) -> tuple[Any, Any]:
    """``m2 * (m*u + c*p) + c2*p`` as ``(m', c')``; a Python 0 stays a Python 0 (so the
    params term is skipped without looking at tensor values)."""

    def is_zero(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and x == 0

    scaled = 0 if is_zero(c) else m2 * c
    if is_zero(scaled):
        return m2 * m, c2
    return m2 * m, scaled if is_zero(c2) else scaled + c2


def fused_transformation(init_fn: Callable[[Params], Any], fused: Callable[..., Any]) -> GradientTransformation:
    """A transformation whose ``update`` is ``fused(updates, state, params, 1, 0)``.

    ``fused(updates, state, params, m, c)`` computes the transform's output ``u`` and
    returns ``m * u + c`` (``c`` a per-leaf tensor list or 0) in the same pass; ``chain``
    finds it on ``update._fp_fused`` and folds the affine steps that follow (learning-rate
    scaling, unmasked weight decay) into it.
    """

    def update_fn(updates: Updates, state: Any, params: Params = None, **extra_args: Any):
        return fused(updates, state, params, 1, 0, **extra_args)

    update_fn._fp_fused = fused  # type: ignore[attr-defined]
    return GradientTransformation(init_fn, update_fn)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply transformations one after the other; the state is a tuple of their states.

    Args:
      *transforms: gradient transformations, applied left to right.

    Returns:
      A :class:`GradientTransformation`.

    >>> from functorch_pipeline import optim
    >>> tx = optim.chain(optim.clip(1.0), optim.scale(-0.5))
    >>> tx.update({"w": torch.tensor([3.0, -0.2])}, tx.init(None))[0]
    {'w': tensor([-0.5000,  0.1000])}
    """
    for i, t in enumerate(transforms):
        if not (isinstance(t, tuple) and len(t) == 2 and callable(t[0]) and callable(t[1])):
            raise TypeError(
                f"chain(*transforms): transform {i} is a {type(t).__name__}, not a "
                "GradientTransformation(init, update)"
            )
    transforms = tuple(GradientTransformation(*t) for t in transforms)
    extra_ok = [_accepts_extra(t.update) for t in transforms]
    n = len(transforms)

    def init_fn(params: Params) -> tuple:
        return tuple(t.init(params) for t in transforms)

    def update_fn(updates: Updates, state: OptState, params: Params = None, **extra_args: Any):
        if not isinstance(state, tuple) or len(state) != n:
            raise ValueError(
                f"chain.update: expected a state tuple of {n} inner states (from chain.init), "
                f"got {type(state).__name__}"
            )
        new_state = list(state)
        i = 0
        while i < n:
            t = transforms[i]
            fused = getattr(t.update, "_fp_fused", None)
            j = i + 1
            m: Any = 1
            c: Any = 0
            if fused is not None:
                while j < n and getattr(transforms[j].update, "_fp_affine", None) is not None:
                    m2, c2, new_state[j] = transforms[j].update._fp_affine(state[j], params)
                    m, c = _compose_affine(m, c, m2, c2)
                    j += 1
            if j > i + 1:
                updates, new_state[i] = fused(updates, state[i], params, m, c, **extra_args)
            else:
                kw = extra_args if extra_ok[i] else {}
                updates, new_state[i] = t.update(updates, state[i], params, **kw)
                j = i + 1
            i = j
        return updates, tuple(new_state)

    return GradientTransformation(init_fn, update_fn)


def _split_apply(where: str, params: Params, updates: Updates) -> tuple[list, list, Any, bool]:
    """Leaves of both trees, the treedef, and whether all leaf dtypes agree."""
    pl, ptd = fpt.flatten(params)
    ul, utd = fpt.flatten(updates)
    if not fpt.same_structure(ptd, utd):
        raise mismatch_error(where, "params", params, "updates", updates)
    ps = _checks.signature(pl)
    if ps is not None and ps == _checks.signature(ul):
        return pl, ul, ptd, True
    # shapes and devices must agree; dtypes may differ (the sum is cast to the param's)
    _checks.check_leaves(where, "params", pl, "updates", ul, params, dtype=None)
    _check_castable(where, pl, ul, params)
    return pl, ul, ptd, False


def apply_updates(params: Params, updates: Updates) -> Params:
    """``params + updates`` leaf by leaf, keeping each parameter's dtype. Pure.

    ``None`` leaves (empty subtrees) are skipped, as in optax.

    Args:
      params: a tree of tensors.
      updates: a tree with the same structure and shapes.

    Returns:
      The new parameters (fresh tensors; ``params`` is untouched).

    >>> apply_updates({"w": torch.tensor([1.0, 2.0]), "b": None}, {"w": torch.tensor([0.5, -1.0]), "b": None})
    {'w': tensor([1.5000, 1.0000]), 'b': None}
    """
    pl, ul, td, same = _split_apply("apply_updates(params, updates)", params, updates)
    if same:
        out = _mt.add(pl, ul, _mt.foreach_ok(pl, ul))
    else:
        out = [(p + u).to(p.dtype) for p, u in zip(pl, ul, strict=True)]
    return fpt.unflatten(td, out)


def _check_castable(where: str, pl: list, ul: list, params: Params) -> None:
    """Leaves of different dtypes are added and cast to the parameter's dtype (optax's
    rule, NOTE [leaf dtypes]) only when both are floating point: never truncate."""
    for i, (p, u) in enumerate(zip(pl, ul, strict=True)):
        if p.dtype != u.dtype and not (_mt.is_float(p) and _mt.is_float(u)):
            raise TypeError(
                f"{where}: leaf at path `{fpt.keystr(fpt.flatten_with_path(params)[0][i])}` has "
                f"dtype "
                f"{p.dtype} in `params` but {u.dtype} in `updates`; only floating-point leaves "
                "of different dtypes are cast to the parameter's dtype"
            )


def apply_updates_(params: Params, updates: Updates) -> Params:
    """In-place ``params += updates`` (the opt-in donation path); returns ``params``.

    Writes into the parameter tensors (under ``torch.no_grad()``, like
    ``torch.optim``'s ``step``). Gives exactly the numbers of :func:`apply_updates`.

    An in-place write under ``no_grad`` is invisible to differentiation, so it raises a
    ``ValueError`` when the step is being differentiated (inside ``fp.grad``/``jvp``, a
    forward-AD level, or when ``params``/``updates`` carry autograd history): use the pure
    :func:`apply_updates` there (NOTE [differentiable optimizers] in ``_mt.py``).
    ``nn.Parameter`` leaves (``requires_grad`` leaf tensors, as ``torch.optim`` updates)
    are fine. ``update(..., inplace=True)`` needs no change: it takes the pure path by
    itself when differentiated.

    Args:
      params: a tree of tensors (written in place).
      updates: a tree with the same structure and shapes.

    Returns:
      ``params`` itself, updated.

    >>> p = {"w": torch.tensor([1.0])}
    >>> q = apply_updates_(p, {"w": torch.tensor([2.0])})
    >>> q is p, p["w"]
    (True, tensor([3.]))

    Notes:
      NOTE [differentiable optimizers]: every update is differentiable (``torch.func.grad``,
        ``vmap``, ``jvp``, ``create_graph=True``); fused, foreach and in-place fast paths are
        switched off whenever something is differentiated.
    """
    where = "apply_updates_(params, updates)"
    pl, ul, _, same = _split_apply(where, params, updates)
    if _mt.differentiated(pl, ul):
        raise ValueError(
            f"{where}: the step is being differentiated (torch.func.grad/jvp, forward-mode AD, "
            "or parameters/updates with autograd history); an in-place write would be left out "
            "of the gradient. Use the pure `params = optim.apply_updates(params, updates)` here"
        )
    with torch.no_grad():
        if same:
            _mt.add_(pl, ul, _mt.foreach_ok(pl, ul))
        else:
            for p, u in zip(pl, ul, strict=True):
                p.copy_(p + u)
    return params
