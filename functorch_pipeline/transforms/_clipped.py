"""Per-example gradient norms and clipped gradient sums: ``ghost``, ``hooks`` or ``vmap``."""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import warnings
import weakref
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch

from functorch_pipeline import tree as _tree
from functorch_pipeline.random import _host
from functorch_pipeline.transforms._autodiff import ArgNums
from functorch_pipeline.transforms._autodiff import _normalize_argnums
from functorch_pipeline.transforms._grad_sample import Unsupported
from functorch_pipeline.transforms._grad_sample import hooks_value_and_grad
from functorch_pipeline.transforms._grad_sample._api import _batch_size
from functorch_pipeline.transforms._grad_sample._api import fake_tensors
from functorch_pipeline.transforms._grad_sample._api import outside_compile
from functorch_pipeline.transforms._grad_sample._engine import autocast_on
from functorch_pipeline.transforms._grad_sample._ghost import HooksOnly
from functorch_pipeline.transforms._grad_sample._ghost import ghost_norms_and_sum
from functorch_pipeline.transforms._per_sample import _per_sample
from functorch_pipeline.transforms._per_sample import differentiated_input
from functorch_pipeline.transforms._per_sample import differentiated_reason
from functorch_pipeline.transforms._per_sample import reject_kwargs
from functorch_pipeline.transforms._per_sample import warning_owner
from functorch_pipeline.tree._math import _rows_sq_norms

__all__ = ["clipped_grad", "clipped_value_and_grad", "per_sample_grad_norms"]

_METHODS = ("auto", "ghost", "hooks", "vmap")
_REDUCTIONS = ("sum", "mean")
_WARNED: weakref.WeakSet[Any] = weakref.WeakSet()  # loss_fns whose auto fallback was reported
_WARNED_IDS: set[int] = set()
_WARNED_CODE: set[Any] = set()  # NOTE [said once per loss_fn] in _per_sample


def _first_warning(loss_fn: Any, args: Sequence[Any]) -> bool:
    """True the first time for each ``loss_fn`` called on ``args``: for a lambda or a
    ``functools.partial``, by its function's code, what it closes over and the shapes
    (:func:`~._per_sample.warning_owner`, NOTE [said once per loss_fn]); else by identity
    (held weakly when it can be)."""
    owner = warning_owner(loss_fn, args)
    if isinstance(owner, tuple):
        if owner in _WARNED_CODE:
            return False
        _WARNED_CODE.add(owner)
        return True
    try:
        if owner in _WARNED:
            return False
        _WARNED.add(owner)
    except TypeError:  # not weak-referenceable: remember its id for the session
        if id(owner) in _WARNED_IDS:
            return False
        _WARNED_IDS.add(id(owner))
    return True


def _batched(args: Sequence[Any], nums: Sequence[int], batch_argnums: Sequence[int] | None,
             fn: str) -> tuple[int, ...]:
    if batch_argnums is None:
        batched = tuple(i for i in range(len(args)) if i not in nums)
    else:
        batched = tuple(i + len(args) if i < 0 else i for i in batch_argnums)
        both = sorted(set(batched) & set(nums))
        if both:
            raise ValueError(f"{fn}: arguments {both} are in both `argnums` and `batch_argnums`")
    if not batched:
        raise ValueError(f"{fn}: no batch argument: every positional argument is in `argnums`")
    return batched


def _norm_dtype(leaves: Sequence[torch.Tensor]) -> torch.dtype:
    """The dtype norms accumulate in: float64 when a leaf is float64 or complex128, else
    float32 (as ``optim.per_example_global_norm_clip``)."""
    wide = (torch.float64, torch.complex128)
    return torch.float64 if any(g.dtype in wide for g in leaves) else torch.float32


def _norms_of(grads: Any) -> torch.Tensor:
    """``(B,)`` global norms of materialised per-example gradients, accumulated in
    :func:`_norm_dtype`. A complex leaf counts ``|g|^2`` of each entry (its real and
    imaginary parts as two real entries), as ``torch.linalg.vector_norm`` does."""
    leaves = _tree.leaves(grads)
    acc = _norm_dtype(leaves)
    return torch.stack([_rows_sq_norms(torch.view_as_real(g) if g.is_complex() else g, acc)
                        for g in leaves]).sum(0).sqrt()


def _autocast_off(tree: Any) -> Any:
    """A context with ``torch.autocast`` off for the device of ``tree``'s leaves when it is
    on there (NOTE [autocast] in ``_grad_sample._engine``: a clipped sum of float32
    gradients is not to be rounded to bfloat16), else a no-op."""
    leaves = _tree.leaves(tree)
    device = leaves[0].device.type if leaves else "cpu"
    if autocast_on(device):
        return torch.autocast(device_type=device, enabled=False)
    return contextlib.nullcontext()


def _clip_sum(grads: Any, norms: torch.Tensor, max_norm: Any) -> Any:
    """``sum_b c_b grad_b`` with ``c_b = 1 / max(1, norm_b / max_norm)`` (the clip factors of
    ``optim.per_example_global_norm_clip`` and of the ghost method): one ``(1, B) @ (B, P)``
    product per leaf, as the ghost method sums kept gradients, instead of a divided copy of
    every per-example gradient (``B x params`` more memory, and a DP step's page faults)."""
    c = 1.0 / torch.clamp(norms / max_norm, min=1.0)

    def one(g: torch.Tensor) -> torch.Tensor:
        rows = g.reshape(g.shape[0], math.prod(g.shape[1:]))
        return (c.to(g.dtype).unsqueeze(0) @ rows).reshape(g.shape[1:])

    return _tree.map(one, grads)


class _Clipper:
    """The shared machinery of the three public functions: method choice and fallbacks."""

    def __init__(self, loss_fn: Callable[..., Any], max_norm: Any, argnums: ArgNums,
                 has_aux: bool, batch_argnums: Sequence[int] | None, chunk_size: int | None,
                 method: str, reduction: str, fn: str) -> None:
        if method not in _METHODS:
            raise ValueError(f"{fn}: `method` must be one of {_METHODS}, got {method!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"{fn}: `reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                       or chunk_size < 1):
            raise ValueError(f"{fn}: `chunk_size` must be a positive int or None, got {chunk_size!r}")
        if max_norm is not None:
            if isinstance(max_norm, torch.Tensor):
                if max_norm.dim() != 0 or not max_norm.is_floating_point():
                    raise ValueError(f"{fn}: `max_norm` must be a number or a 0-d floating-point "
                                     f"tensor, got shape {tuple(max_norm.shape)}, {max_norm.dtype}")
                # A CPU tensor is read here, once (an accelerator one would cost a device
                # sync, and is used as given): -1 flipped every gradient's sign, NaN gave NaN.
                if _host.eligible(max_norm) and not float(max_norm) > 0:
                    raise ValueError(f"{fn}: `max_norm` must be a positive number (inf disables "
                                     f"clipping), got {max_norm!r}")
            elif isinstance(max_norm, bool) or not isinstance(max_norm, numbers.Real) \
                    or math.isnan(max_norm) or max_norm <= 0:
                raise ValueError(f"{fn}: `max_norm` must be a positive number (inf disables "
                                 f"clipping), got {max_norm!r}")
        self.loss_fn, self.max_norm, self.argnums = loss_fn, max_norm, argnums
        self.has_aux, self.batch_argnums, self.chunk_size = has_aux, batch_argnums, chunk_size
        self.method, self.reduction, self.fn = method, reduction, fn
        self.chosen: str | None = None  # auto's choice, made on the first call
        self.refused: str | None = None  # the first refusal that led auto to it

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, torch.Tensor, Any]:
        """``(values, norms, clipped)``; ``clipped`` is None when ``max_norm`` is None.
        Under ``torch.compile`` any method but vmap runs eagerly (NOTE [engines under
        torch.compile] in ``_grad_sample._api``)."""
        reject_kwargs(kwargs, self.fn)
        if self.method == "vmap":
            return self._call(*args)
        return outside_compile(self._call, *args)

    def _call(self, *args: Any) -> tuple[Any, torch.Tensor, Any]:
        nums, is_tuple = _normalize_argnums(self.argnums, len(args), self.fn)
        batched = _batched(args, nums, self.batch_argnums, self.fn)
        if _batch_size(args, batched, self.fn) == 0:
            return self._empty(args, nums, is_tuple)
        if self.method == "auto" and fake_tensors(args):  # fp.eval_shape: not auto's choice
            return self._run("vmap", args, nums, is_tuple, batched)
        where = None if self.method == "vmap" else differentiated_input(args, self.max_norm)
        if where is not None:  # NOTE [differentiating through per-example gradients]
            if self.method != "auto":
                raise ValueError(f"{self.fn}: method={self.method!r} returns norms and sums "
                                 f"without an autograd graph, but {differentiated_reason(where)}"
                                 "; method='auto' or 'vmap' differentiates through them")
            if _first_warning(self.loss_fn, args):
                warnings.warn(f"{self.fn}: method='auto' uses 'vmap' for this call: "
                              f"{differentiated_reason(where)}", stacklevel=3)
            return self._run("vmap", args, nums, is_tuple, batched, differentiated_reason(where))
        if self.method != "auto":
            try:
                return self._run(self.method, args, nums, is_tuple, batched)
            except Unsupported as e:
                hint = "" if isinstance(e, HooksOnly) else self._hint(e)
                raise ValueError(f"{self.fn}: method={self.method!r}: {e}{hint}") from None
        order = ["ghost", "hooks", "vmap"]
        if self.chosen is not None:
            order = order[order.index(self.chosen):]
        reasons: list[str] = []
        for method in order:
            try:  # NOTE [shapes that depend on the data] in _per_sample: vmap says why it runs
                out = self._run(method, args, nums, is_tuple, batched, self.refused or (
                    f"the fast methods refused this call ({reasons[0]})" if reasons else None))
            except Unsupported as e:
                if not reasons or not reasons[-1].endswith(str(e)):  # hooks often says the same
                    reasons.append(f"{method}: {e}")
                continue
            if method != self.chosen:
                self.chosen = method
                self.refused = (f"the fast methods refused this call ({reasons[0]})"
                                if reasons else None)
                if reasons and _first_warning(self.loss_fn, args):
                    warnings.warn(f"{self.fn}: method='auto' uses {method!r} "
                                  f"({'; '.join(reasons)})", stacklevel=3)
            return out
        raise AssertionError("vmap does not raise Unsupported")  # pragma: no cover

    def _empty(self, args: Sequence[Any], nums: tuple[int, ...], is_tuple: bool
               ) -> tuple[Any, torch.Tensor, Any]:
        """An empty batch (Poisson sampling can draw one): no norms, a zero sum, losses of
        shape ``(0,)`` in the parameters' dtype. ``loss_fn`` runs only with ``has_aux=True``,
        once on the empty batch under ``no_grad``, for the aux it returns there (as
        ``_per_sample._empty_result``): a model that cannot take 0 examples (a flatten by
        ``h.view(h.size(0), -1)``) still gets the documented empty result."""
        diff = tuple(args[i] for i in nums)
        leaves = [p for p in _tree.leaves(diff) if isinstance(p, torch.Tensor)]
        device = leaves[0].device if leaves else None
        acc = _norm_dtype(leaves)
        like = next((p for p in leaves if p.is_floating_point() or p.is_complex()), None)
        losses = (like.new_zeros(0) if like is not None else torch.zeros(0)).real
        value: Any = losses
        if self.has_aux:
            with torch.no_grad():
                out = self.loss_fn(*args)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(f"{self.fn}: with has_aux=True, loss_fn must return a pair "
                                f"(losses, aux), got {type(out).__name__}")
            value = (losses, _tree.map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a,
                                       out[1]))
        norms = torch.zeros(0, dtype=acc, device=device)
        clipped = None
        if self.max_norm is not None:
            zeros = _tree.map(torch.zeros_like, diff)
            clipped = zeros if is_tuple else zeros[0]
        return value, norms, clipped

    @staticmethod
    def _hint(e: Unsupported) -> str:
        if "returned a scalar" in str(e):
            return ""
        return "; method='vmap' handles any function torch.func can transform"

    def _run(self, method: str, args: Sequence[Any], nums: tuple[int, ...], is_tuple: bool,
             batched: tuple[int, ...], refused: str | None = None) -> tuple[Any, torch.Tensor, Any]:
        """One method's ``(values, norms, clipped)``; ``refused``: why ``auto`` came to vmap."""
        if method == "ghost":
            value, norms, clipped = ghost_norms_and_sum(
                self.loss_fn, args, nums, is_tuple, batched, self.has_aux, self.chunk_size,
                self.max_norm, self.fn)
        else:
            if method == "hooks":
                value, grads = hooks_value_and_grad(self.loss_fn, args, nums, is_tuple, batched,
                                                    self.has_aux, self.chunk_size, self.fn)
            else:
                # The function behind per_sample_value_and_grad, with this API's name and
                # contract (per-example losses) in its errors.
                value, grads = _per_sample(
                    self.loss_fn, self.argnums, self.has_aux, batched, self.chunk_size,
                    keep_batch_dim=True, randomness="error", method="vmap", fn=self.fn,
                    per_example=True, refused=refused)(*args)
            with _autocast_off(grads):  # NOTE [autocast]: sums in the gradients' own dtype
                norms = _norms_of(grads)
                clipped = None if self.max_norm is None else _clip_sum(grads, norms, self.max_norm)
        if clipped is not None and self.reduction == "mean":
            b = norms.shape[0]
            clipped = _tree.map(lambda g: g / b, clipped)
        return value, norms, clipped


_METHOD_DOC = """
      method: how (the same numbers, up to rounding):

        * ``"ghost"``: per-example norms from each layer's inputs and output gradients
          (Gram matrices or small per-layer gradients, whichever is cheaper), then the
          clipped sum as a batch gradient with per-example weights: about the cost and
          memory of one batch gradient, no ``B x params`` tensor. Parameters may be used
          by ``F.linear`` (any number of leading axes, e.g. ``(B, T, F)``),
          ``F.conv1d``/``F.conv2d``, ``F.embedding``, ``F.layer_norm``, ``F.group_norm``,
          ``F.batch_norm`` (eval), ``F.instance_norm``, ``F.rms_norm``, ``F.prelu``,
          ``nn.MultiheadAttention`` (so ``nn.TransformerEncoderLayer``),
          ``fp.nn.LSTM``/``GRU``/``RNN``, ``nn.LSTMCell``/``GRUCell``/``RNNCell``,
          ``x @ w`` and ``w @ x``, and ``x + p``, ``x - p``, ``x * p``, ``x / p`` or
          ``p.expand(B, ...)`` over the batch (a parameter in ``torch.einsum``,
          ``F.bilinear``, ``F.conv3d`` or a transposed convolution,
          ``F.conv_transpose1d``/``2d``/``3d``, or computed from others, gets its
          per-example gradients formed, a chunk of examples at a time, and every other
          layer keeps ghost's saving). ``F.embedding_bag`` (``nn.EmbeddingBag``) is the
          one call with a hooks rule and no ghost one: it is an error naming the
          parameter's key path and ``method="hooks"``, which handles it (``"auto"`` falls
          back to hooks); a use that no rule covers is an error naming the call.
        * ``"hooks"``: per-example gradients from one batched backward
          (``per_sample_grads(method="hooks")``), then norms and clipping.
        * ``"vmap"``: per-example gradients with ``vmap(grad)``, then norms and clipping;
          any ``loss_fn`` torch.func can transform.
        * ``"auto"`` (default): the first of ghost, hooks, vmap that can run this
          ``loss_fn``; chosen on the first call and kept, with one warning per
          ``loss_fn`` when it is not ghost (a lambda or ``functools.partial`` rebuilt
          every step counts as one; the choice is kept per
          wrapper, so build the wrapper once). When vmap cannot batch ``loss_fn`` either
          (boolean-mask routing, ``nonzero``, a branch on a value) the error names this
          call, the first method's refusal and what to change. A call with an input that
          requires grad under grad mode (parameters, batch or ``max_norm``), or whose
          ``loss_fn`` takes an inner ``fp.grad`` or ``torch.autograd.grad`` of the
          parameters, runs vmap, whose results keep the autograd graph (ghost and hooks
          refuse such calls).

        Under ``fp.jit`` (``torch.compile``) every method but vmap runs eagerly behind a
        graph break, with the method and numbers it has outside; vmap is traced, and is
        the one that works with ``fullgraph=True``. Under ``torch.autocast`` the clipped
        sum comes back in each parameter's dtype and the norms in float32 (ghost's
        products carry the autocast dtype's rounding, ~0.4% in bfloat16).
"""

_AUX_DOC = """
      has_aux: ``loss_fn`` returns ``(losses, aux)``. Which ``aux`` comes back depends on
        the method that runs. ``"ghost"`` and ``"hooks"`` return ``aux`` as ``loss_fn``
        returns it for the whole batch (logits ``(B, C)``, an accuracy as a 0-d tensor;
        with ``chunk_size``, each chunk's leaves joined along axis 0, so each must have
        the examples there). ``"vmap"`` returns each example's own ``aux``, computed on
        its batch of one and stacked on a new leading axis (logits ``(B, 1, C)``, the 0-d
        accuracy as a ``(B,)`` vector of 0s and 1s); its leaves must be tensors (or
        None). With ``chunk_size``, ghost and hooks join each chunk's aux leaves along
        axis 0 when their axis 0 has the chunk's size (per-example leaves) and refuse any
        other leaf but a non-tensor equal in every chunk: a statistic of the chunk whose
        length happens to equal the chunk size (per-class means with as many classes as
        examples in a chunk) cannot be told from per-example data and is concatenated,
        so return such statistics from outside ``loss_fn`` or call without
        ``chunk_size``. ``"auto"`` returns the first form when it runs ghost or hooks and the
        second when it takes vmap: for a call with an input that requires grad under
        grad mode, a ``loss_fn`` that differentiates the parameters itself, or a use of
        a parameter with no rule. So the same call can return either form; pass
        ``method`` explicitly (``"ghost"`` or ``"hooks"`` for the batch's ``aux``,
        ``"vmap"`` for each example's) to get one form reliably. An empty batch gives
        the ``aux`` that ``loss_fn`` returns on it (it runs once there, under
        ``no_grad``), whatever the method.
"""

_CONTRACT_DOC = """
      loss_fn: ``loss_fn(params, *batch) -> losses`` returning the *per-example* losses,
        shape ``(B,)`` (``reduction="none"``), where example ``b``'s loss depends on
        example ``b`` alone; ``(losses, aux)`` with ``has_aux=True``. The ghost and hooks
        methods also need every call that uses a parameter to see the batch on axis 0, or
        on axis 1 of a sequence-first activation (see ``per_sample_grads``'s
        ``method="hooks"``). They refuse the statistics over the batch they see (those
        with an autograd graph, and integer inputs standardised by the batch on the first
        call), and ``auto`` then takes vmap; one applied without a graph (a REINFORCE
        baseline ``(r - r.mean()).detach()``) is not seen and gives the batch-coupled
        norms silently: use ``method="vmap"`` there.
"""


def _doc(f: Callable[..., Any]) -> Callable[..., Any]:
    f.__doc__ = (f.__doc__ or "").replace("{contract}", _CONTRACT_DOC.strip("\n")) \
        .replace("{method}", _METHOD_DOC.strip("\n")).replace("{aux}", _AUX_DOC.strip("\n"))
    return f


@_doc
def per_sample_grad_norms(
    loss_fn: Callable[..., Any],
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    batch_argnums: Sequence[int] | None = None,
    chunk_size: int | None = None,
    method: str = "auto",
) -> Callable[..., Any]:
    """The L2 norm of each example's whole gradient (over every differentiated leaf).

    ``norms[b] = ||grad loss_b||`` for gradient-norm statistics, data attribution or
    clipping. With ``method="ghost"`` no per-example gradient is ever formed.

    Args:
{contract}
      argnums: the argument(s) to differentiate (the parameters).
{aux}
      batch_argnums: the arguments whose tensor leaves carry the batch on axis 0; by
        default every positional argument not in ``argnums``.
      chunk_size: examples per chunk, to bound memory (same result).
{method}

    Returns:
      A function with ``loss_fn``'s signature returning the norms, shape ``(B,)`` (float64
      for float64 or complex128 parameters, else float32; a complex entry counts
      ``|g|^2``), or ``(norms, aux)`` with ``has_aux=True``. An
      empty batch (Poisson sampling can draw one) gives norms of shape ``(0,)``; ``loss_fn``
      runs there only with ``has_aux=True``.

    Example:
      >>> import torch.nn.functional as F
      >>> losses = lambda w, x: F.linear(x, w).sum(1)
      >>> w, x = torch.zeros(2, 2), torch.tensor([[3., 4.], [0., 1.]])
      >>> per_sample_grad_norms(losses, method="ghost")(w, x)  # ||[1, 1]^T x_b||
      tensor([7.0711, 1.4142])
    """
    clipper = _Clipper(loss_fn, None, argnums, has_aux, batch_argnums, chunk_size, method, "sum",
                       "per_sample_grad_norms(loss_fn)")

    @functools.wraps(loss_fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        value, norms, _ = clipper(*args, **kwargs)
        return (norms, value[1]) if has_aux else norms

    return wrapped


@_doc
def clipped_value_and_grad(
    loss_fn: Callable[..., Any],
    max_norm: float | torch.Tensor,
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    batch_argnums: Sequence[int] | None = None,
    reduction: str = "sum",
    chunk_size: int | None = None,
    method: str = "auto",
) -> Callable[..., Any]:
    """Like :func:`clipped_grad`, and also returns the per-example losses.

    Args:
{contract}
      max_norm: see :func:`clipped_grad`.
      argnums: the argument(s) to differentiate (the parameters).
{aux}
      batch_argnums: the arguments carrying the batch on axis 0 (default: all but
        ``argnums``).
      reduction: ``"sum"`` (default) or ``"mean"`` over the batch.
      chunk_size: examples per chunk, to bound memory (same result).
{method}

    Returns:
      A function returning ``(losses, (clipped, norms))``, or
      ``((losses, aux), (clipped, norms))`` with ``has_aux=True``. An empty batch gives
      losses and norms of shape ``(0,)`` and a zero sum; ``loss_fn`` runs there only with
      ``has_aux=True``.

    Example:
      >>> import torch.nn.functional as F
      >>> losses = lambda w, x: F.linear(x, w).sum(1)
      >>> (v, (g, n)) = clipped_value_and_grad(losses, 1.0)(torch.ones(1, 2), torch.eye(2) * 2)
      >>> v, g, n
      (tensor([2., 2.]), tensor([[1., 1.]]), tensor([2., 2.]))
    """
    clipper = _Clipper(loss_fn, max_norm, argnums, has_aux, batch_argnums, chunk_size, method,
                       reduction, "clipped_value_and_grad(loss_fn, max_norm)")

    @functools.wraps(loss_fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        value, norms, clipped = clipper(*args, **kwargs)
        return value, (clipped, norms)

    return wrapped


@_doc
def clipped_grad(
    loss_fn: Callable[..., Any],
    max_norm: float | torch.Tensor,
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    batch_argnums: Sequence[int] | None = None,
    reduction: str = "sum",
    chunk_size: int | None = None,
    method: str = "auto",
) -> Callable[..., Any]:
    """The sum (or mean) of per-example gradients, each clipped to norm ``max_norm``.

    ``clipped = sum_b grad_b / max(1, ||grad_b|| / max_norm)``: the clipping of DP-SGD
    (Abadi et al., 2016), with optax's convention (``differentially_private_aggregate``,
    ``optim.per_example_global_norm_clip``: no epsilon in the divisor; Opacus uses
    ``min(1, max_norm / (norm + 1e-6))``, which differs by ~1e-6 relative). Noise is not
    added here: add ``max_norm * noise_multiplier`` Gaussian noise to the *sum* (see
    ``fp.optim``'s privacy transforms).

    Args:
{contract}
      max_norm: the bound on each example's gradient norm: a positive number (``inf``
        disables clipping) or a 0-d tensor (no host synchronisation).
      argnums: the argument(s) to differentiate (the parameters).
{aux}
      batch_argnums: the arguments carrying the batch on axis 0 (default: all but
        ``argnums``).
      reduction: ``"sum"`` (default) or ``"mean"``, which divides by this batch's size.
        For DP-SGD with Poisson sampling, take the sum and divide by the *expected*
        batch size after adding noise, as Opacus does: the actual size is private.
      chunk_size: examples per chunk, to bound memory (same result).
{method}

    Returns:
      A function with ``loss_fn``'s signature returning ``(clipped, norms)``: the clipped
      sum shaped like the differentiated argument(s), and the ``(B,)`` norms before
      clipping; ``((clipped, norms), aux)`` with ``has_aux=True``. An empty batch
      (Poisson sampling can draw one) gives zeros (for ``"mean"`` too) and no norms;
      ``loss_fn`` runs there only with ``has_aux=True`` (for its aux), so a model that
      cannot take 0 examples is not called.

    Example:
      >>> import torch.nn.functional as F
      >>> losses = lambda w, x: F.linear(x, w).sum(1)
      >>> w, x = torch.zeros(1, 2), torch.tensor([[3., 4.], [0.3, 0.4]])
      >>> g, norms = clipped_grad(losses, 1.0, method="ghost")(w, x)
      >>> g, norms  # [3, 4] / 5 + [0.3, 0.4]
      (tensor([[0.9000, 1.2000]]), tensor([5.0000, 0.5000]))
    """
    clipper = _Clipper(loss_fn, max_norm, argnums, has_aux, batch_argnums, chunk_size, method,
                       reduction, "clipped_grad(loss_fn, max_norm)")

    @functools.wraps(loss_fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        value, norms, clipped = clipper(*args, **kwargs)
        return ((clipped, norms), value[1]) if has_aux else (clipped, norms)

    return wrapped

