"""Differential privacy: per-example clipping, the noisy aggregate, and ``dpsgd``.

Following optax, per-example gradients carry the batch on axis 0 of every leaf (what
``vmap(grad(loss))`` / ``fp.per_sample_grads`` return). Each example's gradient is
clipped to L2 norm ``l2_norm_clip``; the clipped gradients are summed; Gaussian noise
of standard deviation ``l2_norm_clip * noise_multiplier`` is added to the sum; the
result is divided by the batch size. The noise comes from an explicit ``fp.random`` key
folded with the step count, so every step draws fresh noise and runs are reproducible.
"""

from __future__ import annotations

import math
import numbers
from typing import Any
from typing import NamedTuple

import torch

from functorch_pipeline import random as fpr
from functorch_pipeline import tree as fpt
from functorch_pipeline.optim._base import GradientTransformation
from functorch_pipeline.optim._base import Params
from functorch_pipeline.optim._base import ScalarOrSchedule
from functorch_pipeline.optim._base import Updates
from functorch_pipeline.optim._base import chain
from functorch_pipeline.optim._base import identity
from functorch_pipeline.optim._checks import check_hyperparameter
from functorch_pipeline.optim._checks import check_real
from functorch_pipeline.optim._transforms import scale_by_learning_rate
from functorch_pipeline.optim._transforms import trace
from functorch_pipeline.random import _host
from functorch_pipeline.random._core import _normal_folded
from functorch_pipeline.tree._math import _rows_sq_norms

__all__ = [
    "AddDPNoiseState",
    "DifferentiallyPrivateAggregateState",
    "add_dp_noise",
    "differentially_private",
    "differentially_private_aggregate",
    "dpsgd",
    "per_example_global_norm_clip",
    "per_example_layer_norm_clip",
]


def _path(tree: Any, i: int) -> str:
    # only on error: key paths are not traced under compile
    return fpt.keystr(fpt.flatten_with_path(tree)[0][i])


def _batch_size(where: str, grads: Any, param_shapes: list[tuple[int, ...]] | None = None,
                batch_size: int | None = None) -> int:
    """The number of examples on axis 0, checked on every leaf.

    # NOTE [batch axis check]
    Per-example gradients have shape ``(B, *param.shape)``. Given a batch-mean gradient
    (shape ``param.shape``), axis 0 of each leaf would silently be taken as the batch and
    clipping would act on rows of weight matrices. So when the parameters' shapes are known
    (``params`` passed to ``update``, else the shapes seen by ``init``) every leaf must have
    exactly one more axis than its parameter, and the rest must match; an explicit
    ``batch_size`` is checked against axis 0 as well.
    """
    leaves = fpt.leaves(grads)
    if not leaves:
        raise ValueError(f"{where}: the gradient tree has no leaves")
    if param_shapes is not None and len(param_shapes) != len(leaves):
        raise ValueError(
            f"{where}: the gradients have {len(leaves)} leaves but the parameters have "
            f"{len(param_shapes)}"
        )
    n = None
    for i, g in enumerate(leaves):
        if not isinstance(g, torch.Tensor) or g.dim() == 0:
            raise ValueError(
                f"{where}: leaf at path `{_path(grads, i)}` has no batch axis; per-example "
                "gradients must have the examples on axis 0 of every leaf"
            )
        if not g.is_floating_point():  # an int leaf reached a torch-internal norm error
            raise TypeError(
                f"{where}: leaf at path `{_path(grads, i)}` must be a floating-point "
                f"per-example gradient, got dtype {g.dtype}"
            )
        if param_shapes is not None and tuple(g.shape[1:]) != param_shapes[i]:
            want = "(B, " + ", ".join(str(d) for d in param_shapes[i]) + ")"
            hint = (
                " (the parameter's own shape: batch-mean gradients? pass per-example "
                "gradients, e.g. from fp.per_sample_grads)"
                if tuple(g.shape) == param_shapes[i] else ""
            )
            raise ValueError(
                f"{where}: leaf at path `{_path(grads, i)}` must be a per-example gradient of "
                f"shape {want} for a parameter of shape {param_shapes[i]}, got "
                f"{tuple(g.shape)}{hint}"
            )
        if n is None:
            n = g.shape[0]
        elif g.shape[0] != n:
            raise ValueError(
                f"{where}: leaf at path `{_path(grads, i)}` has {g.shape[0]} examples on "
                f"axis 0 but the first leaf has {n}"
            )
    if batch_size is not None and n != batch_size:
        raise ValueError(f"{where}: `batch_size` is {batch_size} but the gradients have {n} "
                         "examples on axis 0")
    return int(n)


def _shapes(params: Any) -> list[tuple[int, ...]] | None:
    leaves = fpt.leaves(params) if params is not None else []
    if not leaves or not all(isinstance(p, torch.Tensor) for p in leaves):
        return None
    return [tuple(p.shape) for p in leaves]


def _memo(seen: dict[str, Any], updates: Any) -> list[tuple[int, ...]] | None:
    """The shapes the last ``init`` saw, if they can belong to ``updates`` (same leaf count):
    a transformation initialised for several models checks only when ``params`` is given."""
    shapes = seen.get("shapes")
    return shapes if shapes is not None and len(shapes) == len(fpt.leaves(updates)) else None


def _clip_sum(leaves: list[torch.Tensor], clip: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
    b = leaves[0].shape[0]
    acc = [torch.float64 if g.dtype == torch.float64 else torch.float32 for g in leaves]
    # Each leaf is read twice (its norm, then its share of the weighted sum) and nothing
    # of its size is allocated: one reduction per leaf, one (1, B) @ (B, P) product.
    rows = [g.reshape(b, math.prod(g.shape[1:])) for g in leaves]  # b may be 0
    sq = torch.stack([_rows_sq_norms(r, a) for r, a in zip(rows, acc, strict=True)])
    norms = torch.sqrt(sq.sum(0))
    shrink = _low_precision_shrink(leaves)  # NOTE [clipping in low precision]
    factors = 1.0 / torch.clamp(norms / (clip if shrink == 1.0 else clip * shrink), min=1.0)
    # With clip = 0, an example whose gradient is exactly 0 gave 0/0 = NaN, and the whole
    # sum NaN; its factor is 1 (it adds nothing either way).
    factors = torch.where(norms > 0, factors, 1.0)
    summed = [(factors.to(g.dtype).unsqueeze(0) @ r).reshape(g.shape[1:])
              for g, r in zip(leaves, rows, strict=True)]
    return summed, (norms > clip).sum()


def _low_precision_shrink(leaves: list[torch.Tensor]) -> float:
    """``1 - eps`` of the least precise leaf dtype below float32, else 1.0.

    # NOTE [clipping in low precision]
    DP-SGD's guarantee needs every example's contribution to have norm <= C. In bfloat16
    and float16 the factor ``f = min(1, C / norm)`` (float32) is rounded to the leaf's
    dtype and the product ``f * g`` rounded again, each by up to the unit roundoff u
    (2**-8 in bfloat16, 2**-11 in float16), so a clipped example's norm reached 1.0036 C
    in bfloat16 and 1.0005 C in float16 (300 random examples). With a leaf in such a
    dtype, the factors are computed for the bound ``C (1 - eps)`` (``eps = 2u``; the
    least precise dtype's, for every leaf), so the stored values have norm at most
    ``C (1 - 2u)(1 + u)^2 < C``, and a clipped example's norm lies in about
    ``[(1 - 4u) C, C]``: up to ~1.6% below C in bfloat16 (~0.2% in float16) instead of
    up to 0.4% above it. Examples with norm <= ``C (1 - eps)`` are untouched, and the
    clip count still compares with C. float32/float64 gradients are clipped at C exactly
    as before (their numbers match Opacus and optax); what remains in every dtype is the
    float32 norm's own rounding, ~1e-7 relative, as in both.
    """
    shrink = 1.0
    for g in leaves:
        if g.dtype not in _FULL:
            s = _SHRINK.get(g.dtype)
            shrink = min(shrink, 1.0 - torch.finfo(g.dtype).eps if s is None else s)
    return shrink


_FULL = (torch.float32, torch.float64)
_SHRINK = {torch.bfloat16: 1.0 - 2.0**-7, torch.float16: 1.0 - 2.0**-10}  # 1 - eps


def _check_clip(where: str, name: str, value: Any) -> None:
    """A clipping bound: a number >= 0 (inf: no clipping), or a one-element floating
    tensor, checked the same way when the host can read it for free (a plain CPU tensor;
    an accelerator tensor is used as given, without a sync). A negative tensor bound
    used to turn clipping off (every factor 1), NaN gave NaN, and a ``(B,)`` tensor was
    taken as one bound per example."""
    if not isinstance(value, torch.Tensor):
        check_real(where, name, value, finite=False)
        return
    if value.numel() != 1 or not value.is_floating_point():
        raise ValueError(f"{where}: `{name}` must be a number or a one-element floating-point "
                         f"tensor, got shape {tuple(value.shape)}, {value.dtype}")
    if _host.eligible(value):
        check_real(where, name, value, finite=False)


def per_example_global_norm_clip(
    grads: Any, l2_norm_clip: float | torch.Tensor
) -> tuple[Any, torch.Tensor]:
    """Clip each example's whole gradient to L2 norm ``l2_norm_clip`` and sum over examples.

    Args:
      grads: a tree whose leaves have the examples on axis 0.
      l2_norm_clip: the maximum L2 norm of one example's gradient (over all leaves).

    Returns:
      ``(summed, num_clipped)``: the sum of clipped gradients (leaves without the batch
      axis) and how many examples were clipped (a 0-d tensor).

    >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
    >>> per_example_global_norm_clip(g, 1.0)
    ({'w': tensor([0.9000, 1.2000])}, tensor(1))
    """
    where = "per_example_global_norm_clip(grads, l2_norm_clip)"
    _check_clip(where, "l2_norm_clip", l2_norm_clip)
    _batch_size(where, grads)
    leaves, td = fpt.flatten(grads)
    summed, n = _clip_sum(leaves, l2_norm_clip)
    return fpt.unflatten(td, summed), n


def per_example_layer_norm_clip(
    grads: Any, global_l2_norm_clip: float, uniform: bool = True
) -> tuple[Any, Any]:
    """Clip each leaf ("layer") of each example separately, then sum over examples.

    Per-leaf bounds are ``C / sqrt(L)`` (``uniform``) or ``C * sqrt(size_l / total)``
    for ``L`` leaves, so the whole clipped gradient of one example has norm at most
    ``C = global_l2_norm_clip``.

    Args:
      grads: a tree whose leaves have the examples on axis 0.
      global_l2_norm_clip: the bound for a whole example.
      uniform: equal per-leaf bounds, else proportional to sqrt(leaf size).

    Returns:
      ``(summed, num_clipped)``: the sums of clipped gradients, and a tree shaped like
      ``grads`` whose leaves are 0-d tensors counting the examples clipped in that leaf
      (as optax; before 0.2 this library returned a list).

    Example:
      >>> g = {"a": torch.tensor([[3.0, 4.0]]), "b": torch.tensor([[0.1]])}
      >>> s, n = per_example_layer_norm_clip(g, 2 ** 0.5)
      >>> s["a"], s["b"], n
      (tensor([0.6000, 0.8000]), tensor([0.1000]), {'a': tensor(1), 'b': tensor(0)})
    """
    where = "per_example_layer_norm_clip(grads, global_l2_norm_clip)"
    _check_clip(where, "global_l2_norm_clip", global_l2_norm_clip)
    _batch_size(where, grads)
    leaves, td = fpt.flatten(grads)
    n_layers = len(leaves)
    if uniform:
        clips = [global_l2_norm_clip / math.sqrt(n_layers)] * n_layers
    else:
        # every leaf empty per example: no entries to clip, zero sums as with uniform=True
        # (optax 0.2.8 divides by zero here)
        total = sum(g[0].numel() for g in leaves) or 1
        clips = [global_l2_norm_clip * math.sqrt(g[0].numel() / total) for g in leaves]
    summed, counts = [], []
    for g, c in zip(leaves, clips, strict=True):
        s, n = _clip_sum([g], c)
        summed.append(s[0])
        counts.append(n)
    return fpt.unflatten(td, summed), fpt.unflatten(td, counts)


class DifferentiallyPrivateAggregateState(NamedTuple):
    """State of :func:`differentially_private_aggregate` and :func:`add_dp_noise`: the base
    key and the number of steps taken.

    Attributes:
        rng_key: the base ``fp.random`` key; step ``count``'s noise uses it folded with ``count``.
        count: the number of updates so far (a 0-d int tensor).
    """

    rng_key: torch.Tensor
    count: torch.Tensor


AddDPNoiseState = DifferentiallyPrivateAggregateState


def _as_key(where: str, key: Any, seed: Any) -> torch.Tensor:
    if key is not None and seed is not None:
        raise TypeError(f"{where}: pass `key` or `seed`, not both")
    name, value = ("key", key) if key is not None else ("seed", seed)
    if value is None:
        raise TypeError(f"{where}: `key` is required (an fp.random key or an int seed)")
    if isinstance(value, torch.Tensor):
        if not fpr.is_key(value) or value.dim() != 1:
            raise ValueError(
                f"{where}: `{name}` must be an int or one key from fp.random.key, got shape "
                f"{tuple(value.shape)}"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints too
        raise TypeError(
            f"{where}: `{name}` must be an int or an fp.random key, got {type(value).__name__}"
        )
    return fpr.key(int(value))


def _check_noise(where: str, l2_norm_clip: Any, noise_multiplier: Any) -> tuple[float, float]:
    """``(C, noise std)`` as Python floats, after checking both.

    # NOTE [DP hyperparameters]
    ``l2_norm_clip`` and ``noise_multiplier`` are numbers or one-element tensors, read once
    on the host here. NaN and negative values are refused (tensors included): the noise
    is skipped when ``noise_multiplier > 0`` is false, which NaN and negatives made true
    of a call that asked for noise, a silently non-private step. ``noise_multiplier``
    must be finite; ``l2_norm_clip = inf`` (no clipping) is allowed with sigma = 0 only.
    """
    clip = check_real(where, "l2_norm_clip", l2_norm_clip, finite=False)
    sigma = check_real(where, "noise_multiplier", noise_multiplier)
    if sigma > 0 and math.isinf(clip):
        raise ValueError(
            f"{where}: noise_multiplier > 0 needs a finite `l2_norm_clip` (the noise std is "
            "their product)"
        )
    # sigma = 0 means no noise, even with C = inf (where C * sigma would be NaN).
    return clip, clip * sigma if sigma > 0 else 0.0


def _check_batch_size(where: str, batch_size: Any) -> float:
    """The divisor of the noisy sum: a finite number > 0 (NOTE [expected batch size]).
    0 divided by zero, a negative one turned descent into ascent, NaN poisoned the step."""
    return check_real(where, "batch_size", batch_size, low_open=True)


def _readable(b: Any) -> bool:
    """Whether a per-step ``batch_size`` can be checked without a device sync or a graph
    break: a number, or a tensor the host may read (``fp.random``'s test: a plain CPU
    tensor outside ``torch.compile``, ``torch.func`` transforms and dispatch modes; an
    accelerator tensor, such as ``fp.distributed``'s all-reduced count, is used as given)."""
    return not isinstance(b, torch.Tensor) or _host.eligible(b)


def _empty_batch(where: str) -> ValueError:
    return ValueError(
        f"{where}: the batch is empty (0 per-example gradients on axis 0), and an empty batch "
        "has no mean. Poisson sampling can draw one: for such batches clip and sum with "
        "per_example_global_norm_clip, then use add_dp_noise / differentially_private with "
        "`batch_size=` the expected batch size (q * N), or fp.train.DPTrainer, which does both"
    )


def _init_state(base_key: torch.Tensor, params: Params) -> DifferentiallyPrivateAggregateState:
    dev = next(
        (x.device for x in fpt.leaves(params) if isinstance(x, torch.Tensor)), torch.device("cpu")
    )
    return DifferentiallyPrivateAggregateState(
        base_key.to(dev), torch.zeros((), dtype=torch.int32, device=dev)
    )


_NOISE_CHUNK = 1 << 18  # NOTE [one noise draw]


def _noisy_mean(
    summed: list[torch.Tensor], std: float, state: Any, divisor: Any
) -> list[torch.Tensor]:
    """``(sum + N(0, std^2)) / divisor`` per leaf, the noise of step ``count`` drawn from
    ``fold_in(rng_key, count)``.

    # NOTE [one noise draw]
    When every leaf has the same floating dtype and device (the usual case) the noise is
    one flat vector of all the parameters' entries, split into the leaves in leaf order:
    a keyed draw has a fixed cost per call, and one call for a model's 8 leaves is ~4x
    cheaper than 8 calls. The vector is drawn in chunks of ``_NOISE_CHUNK`` entries, chunk
    ``i`` from ``fold_in(fold_in(rng_key, count), i)``: a keyed draw holds several integer
    temporaries per entry (int64 when measured, int32 now), so one draw for a
    6.4M-parameter embedding peaked at ~375 MB above the step's other memory; chunks bound
    that to a few MB. Otherwise (mixed dtypes
    or devices) each leaf gets its own key, ``split(fold_in(rng_key, count), num_leaves)[i]``.
    """
    if std == 0.0:
        return [s / divisor for s in summed]
    first = summed[0]
    if first.is_floating_point() and all(
        s.dtype == first.dtype and s.device == first.device for s in summed
    ):
        sizes = [s.numel() for s in summed]
        total = sum(sizes)
        # normal(fold_in(fold_in(rng_key, count), i)), the keys folded on the host where
        # it can (NOTE [host fast path] in fp.random._host): the same numbers.
        chunks = [
            _normal_folded(state.rng_key, (state.count, i), (min(_NOISE_CHUNK, total - start),),
                           first.dtype)
            for i, start in enumerate(range(0, total, _NOISE_CHUNK))
        ]
        noise = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        # One elementwise pass over all leaves (the same operations, so the same numbers,
        # as leaf by leaf); the results are views of one buffer. It also peaked lower: on
        # benchmarks/dp_step.py's 6.4M-parameter embedding step, 97.5 MiB above the
        # pre-step RSS against 121.7 MiB leaf by leaf (--part memory, 2 runs each).
        flat = torch.cat([s.reshape(-1) for s in summed]) if len(summed) > 1 else first.reshape(-1)
        # The noise is this call's own tensor, so it is scaled in place; the sum is new.
        noisy = flat + noise.mul_(std)
        noisy = noisy.div_(divisor) if isinstance(divisor, (int, float)) else noisy / divisor
        out = noisy.split(sizes)
        return [o.view(s.shape) for o, s in zip(out, summed, strict=True)]
    keys = fpr.split(fpr.fold_in(state.rng_key, state.count), len(summed))
    out = []
    for s, k in zip(summed, keys, strict=True):
        dtype = s.dtype if s.is_floating_point() else torch.float32
        out.append((s + std * fpr.normal(k, tuple(s.shape), dtype)) / divisor)
    return out


def differentially_private_aggregate(
    l2_norm_clip: float | torch.Tensor,
    noise_multiplier: float | torch.Tensor,
    key: int | torch.Tensor | None = None,
    *,
    seed: int | torch.Tensor | None = None,
) -> GradientTransformation:
    r"""Clip per-example gradients, sum them, add Gaussian noise, divide by the batch size.

    .. math:: u = \frac{1}{B}\Big(\sum_i \mathrm{clip}_C(g_i) + \mathcal N(0, (C\sigma)^2 I)\Big)

    so each coordinate of the result carries noise of standard deviation
    :math:`C\sigma/B` (``C = l2_norm_clip``, ``σ = noise_multiplier``, ``B`` the batch).

    ``update`` checks that it is given per-example gradients (NOTE [batch axis check]):
    every leaf must have shape ``(B, *param.shape)``, using ``params`` when passed, else
    the shapes ``init`` saw. A batch-mean gradient is an error, not a silent
    clipping of weight rows. ``update(..., batch_size=B)`` checks axis 0 as well. An empty
    batch (``B = 0``) has no mean and raises a ValueError: for Poisson-sampled batches, which
    can be empty, divide by the expected batch size with :func:`add_dp_noise` /
    :func:`differentially_private` (``batch_size=``) or use ``fp.train.DPTrainer``.

    Args:
      l2_norm_clip: the per-example L2 bound ``C``: a number or a one-element tensor, >= 0
        (``inf``, no clipping, only with ``noise_multiplier = 0``).
      noise_multiplier: ``σ``, the noise standard deviation relative to ``C``: a finite
        number or a one-element tensor, >= 0 (NaN, negative or infinite values raise a
        ValueError: NaN would skip the noise silently).
      key: an ``fp.random`` key or an int seed; step ``t`` uses ``fold_in(key, t)``
        (optax 0.2.8 spells it ``key``).
      seed: the older spelling of ``key`` (kept working); pass one of the two.

    Returns:
      A :class:`GradientTransformation`. Its ``update`` takes per-example gradients.

    Notes:
      NOTE [batch axis check]: per-example gradients must have shape ``(B, *param.shape)``; when the
        parameter shapes are known every leaf must have exactly one more axis, so a batch-mean
        gradient is refused instead of being clipped row by row.

    Example:
      >>> tx = differentially_private_aggregate(1.0, 0.0, key=0)
      >>> g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
      >>> tx.update(g, tx.init({"w": torch.zeros(2)}))[0]
      {'w': tensor([0.4500, 0.6000])}
    """
    return _aggregate("differentially_private_aggregate", l2_norm_clip, noise_multiplier, key,
                      seed)


def _aggregate(where: str, l2_norm_clip: Any, noise_multiplier: Any, key: Any, seed: Any
               ) -> GradientTransformation:
    """:func:`differentially_private_aggregate`, its errors naming ``where`` (the API called)."""
    l2_norm_clip, std = _check_noise(where, l2_norm_clip, noise_multiplier)
    base_key = _as_key(f"{where}(key)", key, seed)
    seen: dict[str, Any] = {}  # NOTE [batch axis check]: the shapes init saw

    def init_fn(params: Params) -> DifferentiallyPrivateAggregateState:
        seen["shapes"] = _shapes(params)
        return _init_state(base_key, params)

    def update_fn(updates: Updates, state: DifferentiallyPrivateAggregateState,
                  params: Params = None, **extra_args: Any):
        shapes = _shapes(params) if params is not None else _memo(seen, updates)
        b = _batch_size(f"{where}.update", updates, shapes, extra_args.get("batch_size"))
        if b == 0:  # the mean of no examples: dividing by 0 gave NaN / inf parameters
            raise _empty_batch(f"{where}.update")
        leaves, td = fpt.flatten(updates)
        summed, _ = _clip_sum(leaves, l2_norm_clip)
        out = _noisy_mean(summed, std, state, b)
        new_state = DifferentiallyPrivateAggregateState(state.rng_key, state.count + 1)
        return fpt.unflatten(td, out), new_state

    return GradientTransformation(init_fn, update_fn)


def add_dp_noise(
    l2_norm_clip: float | torch.Tensor,
    noise_multiplier: float | torch.Tensor,
    key: int | torch.Tensor,
    *,
    batch_size: int | float | torch.Tensor | None = None,
) -> GradientTransformation:
    r"""The noise of DP-SGD on an already clipped SUM of per-example gradients.

    .. math:: u = \frac{1}{B}\Big(s + \mathcal N(0, (C\sigma)^2 I)\Big)

    where ``s`` is the sum over the (logical) batch of per-example gradients each clipped
    to norm ``C`` (what ``fp.clipped_grad`` or :func:`per_example_global_norm_clip`
    return, possibly accumulated over several physical chunks). Noise is drawn once per
    ``update`` from ``fold_in(key, count)``, so a run that saves and restores the state
    resumes with the same noise. Put it first in a :func:`chain` to privatise any
    optimizer (see :func:`differentially_private`).

    # NOTE [expected batch size]
    With Poisson sampling the batch size is random, and dividing by the sampled size
    would make the result depend on it; like Opacus, pass the *expected* batch size
    ``q * N`` as ``batch_size`` (the default divisor). An ``update(..., batch_size=b)``
    extra argument overrides it for one step (fixed-size batches). Both must be finite
    numbers > 0 (0 would divide by zero, a negative one would turn descent into ascent);
    a CPU tensor ``b`` is read to be checked, an accelerator tensor (or one under
    ``torch.compile``) is used as given, so that the step needs no device sync.

    Args:
      l2_norm_clip: the per-example bound ``C`` the sum was clipped with (a number or a
        one-element tensor, >= 0).
      noise_multiplier: ``σ``; the noise std on the sum is ``C σ`` (finite, >= 0).
      key: an ``fp.random`` key or an int seed.
      batch_size: the divisor ``B`` (the expected logical batch size), a finite number > 0.

    Returns:
      A :class:`GradientTransformation` whose ``update`` takes gradients shaped like the
      parameters (a leaf with an extra leading axis is refused as per-example).

    Example:
      >>> tx = add_dp_noise(1.0, 0.0, key=0, batch_size=4)
      >>> tx.update({"w": torch.tensor([2.0, -1.0])}, tx.init({"w": torch.zeros(2)}))[0]
      {'w': tensor([ 0.5000, -0.2500])}
    """
    return _add_noise("add_dp_noise", l2_norm_clip, noise_multiplier, key, batch_size)


def _add_noise(where: str, l2_norm_clip: Any, noise_multiplier: Any, key: Any, batch_size: Any
               ) -> GradientTransformation:
    """:func:`add_dp_noise`, its errors naming ``where`` (the API called)."""
    _, std = _check_noise(where, l2_norm_clip, noise_multiplier)
    base_key = _as_key(f"{where}(key)", key, None)
    if batch_size is not None:
        batch_size = _check_batch_size(where, batch_size)
    seen: dict[str, Any] = {}

    def init_fn(params: Params) -> DifferentiallyPrivateAggregateState:
        seen["shapes"] = _shapes(params)
        return _init_state(base_key, params)

    def update_fn(updates: Updates, state: DifferentiallyPrivateAggregateState,
                  params: Params = None, **extra_args: Any):
        b = extra_args.get("batch_size", batch_size)
        if b is None:
            raise ValueError(f"{where}.update: no batch size; pass `batch_size` to {where} "
                             "or to update")
        if "batch_size" in extra_args and _readable(b):  # the per-step override
            b = _check_batch_size(f"{where}.update", b)
        shapes = _shapes(params) if params is not None else _memo(seen, updates)
        leaves, td = fpt.flatten(updates)
        if shapes is not None:
            if len(shapes) != len(leaves):
                raise ValueError(f"{where}.update: the gradients have {len(leaves)} leaves but "
                                 f"the parameters have {len(shapes)}")
            for i, g in enumerate(leaves):
                if tuple(g.shape) != shapes[i]:
                    hint = (" (per-example gradients? sum them clipped first, e.g. with "
                            "per_example_global_norm_clip)" if tuple(g.shape[1:]) == shapes[i]
                            else "")
                    raise ValueError(
                        f"{where}.update: leaf at path `{_path(updates, i)}` must have the "
                        f"parameter's shape {shapes[i]}, got {tuple(g.shape)}{hint}"
                    )
        out = _noisy_mean(leaves, std, state, b)
        new_state = DifferentiallyPrivateAggregateState(state.rng_key, state.count + 1)
        return fpt.unflatten(td, out), new_state

    return GradientTransformation(init_fn, update_fn)


def differentially_private(
    optimizer: GradientTransformation,
    l2_norm_clip: float | torch.Tensor,
    noise_multiplier: float | torch.Tensor,
    key: int | torch.Tensor,
    *,
    batch_size: int | float | torch.Tensor | None = None,
) -> GradientTransformation:
    """Any optimizer made differentially private: ``chain(add_dp_noise(...), optimizer)``.

    ``update`` takes the clipped SUM of per-example gradients over the logical batch
    (shaped like the parameters), adds Gaussian noise of std ``l2_norm_clip *
    noise_multiplier`` once, divides by ``batch_size`` (NOTE [expected batch size]) and
    hands the result to ``optimizer``. ``differentially_private(adam(lr), ...)`` is
    DP-Adam; ``differentially_private(sgd(lr), ...)`` on ``per_example_global_norm_clip``
    sums is :func:`dpsgd`. Clipping is not repeated here: compute the sum with
    ``fp.clipped_grad`` / :func:`per_example_global_norm_clip` using the same bound.
    ``fp.train.DPTrainer`` does all of it, with physical chunks and accounting.

    Args:
      optimizer: any ``fp.optim`` transformation.
      l2_norm_clip: the per-example bound ``C`` (>= 0).
      noise_multiplier: ``σ`` (finite, >= 0).
      key: an ``fp.random`` key or an int seed for the noise.
      batch_size: the (expected) logical batch size that divides the noisy sum, a finite
        number > 0 (as is a per-step ``update(..., batch_size=b)``).

    Returns:
      A :class:`GradientTransformation`; its state is ``(AddDPNoiseState, inner state)``.

    Notes:
      NOTE [expected batch size]: with Poisson sampling the batch size is random, so (like Opacus)
        the noisy sum is divided by the *expected* batch size ``q * N``, not the sampled one.

    Example:
      >>> from functorch_pipeline import optim
      >>> opt = differentially_private(optim.sgd(0.1), 1.0, 0.0, key=0, batch_size=2)
      >>> params = {"w": torch.zeros(2)}
      >>> per_example = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
      >>> clipped_sum, _ = per_example_global_norm_clip(per_example, 1.0)
      >>> opt.update(clipped_sum, opt.init(params), params)[0]
      {'w': tensor([-0.0450, -0.0600])}
    """
    if not (isinstance(optimizer, tuple) and len(optimizer) == 2):
        raise TypeError(
            "differentially_private(optimizer, ...): `optimizer` must be a "
            f"GradientTransformation, got {type(optimizer).__name__}"
        )
    noise = _add_noise("differentially_private", l2_norm_clip, noise_multiplier, key, batch_size)
    return chain(noise, optimizer)


def dpsgd(
    learning_rate: ScalarOrSchedule,
    l2_norm_clip: float | torch.Tensor,
    noise_multiplier: float | torch.Tensor,
    key: int | torch.Tensor | None = None,
    momentum: float | None = None,
    nesterov: bool = False,
    *,
    seed: int | torch.Tensor | None = None,
) -> GradientTransformation:
    """DP-SGD (Abadi et al., 2016): :func:`differentially_private_aggregate` then SGD.

    ``update`` takes per-example gradients (examples on axis 0, every leaf shaped
    ``(B, *param.shape)``; a batch-mean gradient is refused, NOTE [batch axis check]).
    An empty batch has no mean and is refused too (Poisson-sampled batches: use
    ``fp.train.DPTrainer``, or :func:`differentially_private` with ``batch_size=``).
    For the privacy spent (epsilon) use ``fp.privacy``; for Poisson-sampled logical
    batches in physical chunks, and any other optimizer, see :func:`differentially_private`
    and ``fp.train.DPTrainer``.

    Args:
      learning_rate: a number, a 0-d tensor or a schedule of the step.
      l2_norm_clip: per-example L2 bound (>= 0).
      noise_multiplier: noise std relative to the bound (finite, >= 0).
      key: an ``fp.random`` key or an int seed (optax 0.2.8's spelling).
      momentum: optional momentum.
      nesterov: Nesterov momentum.
      seed: the older spelling of ``key`` (kept working).

    Returns:
      A :class:`GradientTransformation`.

    Notes:
      NOTE [batch axis check]: per-example gradients must have shape ``(B, *param.shape)``; when the
        parameter shapes are known every leaf must have exactly one more axis, so a batch-mean
        gradient is refused instead of being clipped row by row.

    Example:
      >>> import functorch_pipeline as fp
      >>> opt = fp.optim.dpsgd(0.1, l2_norm_clip=1.0, noise_multiplier=0.0, key=0)
      >>> per_example = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
      >>> opt.update(per_example, opt.init({"w": torch.zeros(2)}))[0]
      {'w': tensor([-0.0450, -0.0600])}
    """
    check_hyperparameter("dpsgd(learning_rate)", "learning_rate", learning_rate, schedule=True)
    if isinstance(learning_rate, numbers.Real):  # not a tensor or a schedule
        check_real("dpsgd(learning_rate)", "learning_rate", learning_rate, finite=False)
    if key is None and seed is None:
        raise TypeError("dpsgd: `key` is required (an fp.random key or an int seed)")
    return chain(
        _aggregate("dpsgd", l2_norm_clip, noise_multiplier, key, seed),
        trace(momentum, nesterov) if momentum is not None else identity(),
        scale_by_learning_rate(learning_rate),
    )
