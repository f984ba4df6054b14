"""Per-example gradients: ``vmap`` of ``grad`` with the batch as a batch of one."""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch

from functorch_pipeline import tree as _tree
from functorch_pipeline.transforms._autodiff import ArgNums
from functorch_pipeline.transforms._autodiff import _normalize_argnums
from functorch_pipeline.transforms._autodiff import _value_and_grad_impl
from functorch_pipeline.transforms._grad_sample import Unsupported
from functorch_pipeline.transforms._grad_sample import hooks_value_and_grad
from functorch_pipeline.transforms._grad_sample._api import FAKE_REASON
from functorch_pipeline.transforms._grad_sample._api import fake_tensors
from functorch_pipeline.transforms._grad_sample._api import outside_compile
from functorch_pipeline.transforms._grad_sample._engine import autocast_on
from functorch_pipeline.transforms._grad_sample._rules_misc import REPLACE_RNNS_HINT
from functorch_pipeline.transforms._grad_sample._state import Snapshot
from functorch_pipeline.transforms._vmap import vmap

__all__ = ["per_sample_grads", "per_sample_value_and_grad", "warning_owner"]

_METHODS = ("auto", "vmap", "hooks")

# NOTE [auto: vmap's numbers, hooks' speed]
# The default method gives exactly what ``vmap`` gives (each example's own loss, as a
# batch of one) and takes the fast engine whenever that is the same computation:
# ``loss_fn`` returns per-example losses ``(B,)`` and every parameter use has a rule.
# A scalar loss (a mean or a sum over the batch) is never rescaled: hooks on a batch
# mean gives each example's *contribution* (1/B of its gradient), so it goes to vmap.
# Contracts hooks cannot honour go to vmap without trying: per-example ``aux``
# (``has_aux``), ``keep_batch_dim=False``, global-RNG ``randomness``, calls inside a
# torch.func transform or torch.compile, and differentiated leaves that require grad
# (the caller wants a graph through the gradients). A fall-back is announced once per
# ``loss_fn`` (not per call), and the decision is cached per ``loss_fn`` and input
# signature, so a model without rules does not pay a failed batch forward every call (the
# first call does run loss_fn's forward once on the whole batch before vmap). The warning
# hangs on the function's code (NOTE [said once per loss_fn] in ``warning_owner``).
_WARNED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_DECIDED: weakref.WeakKeyDictionary[Any, dict[Any, str]] = weakref.WeakKeyDictionary()
# why the fast method refused, where a cached decision is vmap (NOTE [shapes that depend
# on the data])
_REFUSED: weakref.WeakKeyDictionary[Any, dict[Any, str]] = weakref.WeakKeyDictionary()


def _owner(loss_fn: Any) -> Any:
    """The object a one-time note or a cached decision hangs on (a bound method's function)."""
    return getattr(loss_fn, "__func__", loss_fn)


def warning_owner(loss_fn: Any, args: Sequence[Any] = ()) -> Any:
    """What a one-time warning about ``loss_fn`` called on ``args`` hangs on: for a lambda
    or a ``functools.partial``, ``(code, ids, shapes)``, the code object of the function
    behind it (through partials and bound methods), the ids of the objects it closes over
    or is partially applied to, and ``args``' shapes; else (a named function, a callable
    object) ``loss_fn`` itself, as a cached decision.

    # NOTE [said once per loss_fn]
    The auto fall-back warnings were keyed on ``loss_fn``'s identity, so a
    ``functools.partial`` or a lambda built anew every step (``per_sample_grads(lambda p, x:
    ...)`` inside the training loop) warned on every call while saying "once per loss_fn".
    The function's code is the same object every step, and so are the model and functions it
    closes over, so for those two the warnings hang on them (held for the session, as code
    objects cannot be held weakly; the objects by id); closures of one code over other
    objects (a factory of loss functions over different models) still warn each, as does one
    over per-step data. A function rebuilt with the same code and closure is otherwise
    indistinguishable from the step before's, so the shapes of the call count too: a new
    shape (another batch size) warns again. A named function (``def loss_fn``), a bound
    method's function aside, and a callable object (an ``nn.Module``) stay keyed on
    themselves: a helper that defines ``loss_fn`` anew for each model is another ``loss_fn``
    each time. The cached decisions (NOTE [auto: vmap's numbers, hooks' speed]) still hang
    on the object: a ``loss_fn`` rebuilt every step runs its refused fast forward every
    step, so build it once.

    Example:
      >>> def loss(p, x, scale): return p * x * scale
      >>> scale = 2.0
      >>> steps = [functools.partial(loss, scale=scale) for _ in range(2)]  # one a step
      >>> warning_owner(steps[0]) == warning_owner(steps[1]) != warning_owner(loss)
      True
    """
    f, deps = loss_fn, []
    for _ in range(16):  # partials of partials, a bound method of a partial
        if isinstance(f, functools.partial):
            deps.extend(id(a) for a in (*f.args, *f.keywords.values()))
            f = f.func
        elif getattr(f, "__func__", None) is not None:
            deps.append(id(getattr(f, "__self__", None)))
            f = f.__func__
        else:
            break
    code = getattr(f, "__code__", None)
    if code is None or f is loss_fn and code.co_name != "<lambda>":
        return _owner(f)  # a named function or a callable object: by identity
    for cell in getattr(f, "__closure__", None) or ():
        try:
            deps.append(id(cell.cell_contents))
        except ValueError:  # an empty cell
            continue
    return code, tuple(deps), _signature(args)


_WARNED_CODE: dict[Any, set[str]] = {}  # NOTE [said once per loss_fn]: (code, ids) -> reasons


def _note_once(loss_fn: Any, message: str, reason: str, args: Sequence[Any] = ()) -> None:
    owner = warning_owner(loss_fn, args)
    try:
        seen = (_WARNED_CODE if isinstance(owner, tuple) else _WARNED).setdefault(owner, set())
    except TypeError:  # not weak-referenceable: warn every time rather than never
        seen = set()
    if reason not in seen:
        seen.add(reason)
        warnings.warn(message, stacklevel=5)


def _signature(args: Sequence[Any]) -> Any:
    return tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else type(x)
                 for x in _tree.leaves(list(args)))


def differentiated_input(args: Sequence[Any], extra: Any = None) -> str | None:
    """Where the first tensor of ``args`` (any argument: parameters, batch, constants) or of
    ``extra`` (``max_norm``) that autograd records is, as ``"argument i at `path`"``; None
    when grad mode is off or none requires grad.

    # NOTE [differentiating through per-example gradients]
    The fast methods (hooks, ghost) return gradients and norms without an autograd graph.
    When an input requires grad under grad mode, the caller may differentiate the result
    (meta-learning through a clipped step, a gradient-norm penalty, a learned clipping
    bound, gradients with respect to the batch for distillation or attribution), and a
    result without a graph silently drops that term (errors 0.13-17 against a loop with
    ``create_graph=True``). So ``auto`` takes ``vmap`` there, which builds the graph, and
    says so once; an explicit ``hooks`` or ``ghost`` refuses, naming the input.
    """
    if not torch.is_grad_enabled():
        return None
    for i, a in enumerate(args):
        if any(isinstance(leaf, torch.Tensor) and leaf.requires_grad for leaf in _tree.leaves(a)):
            for path, leaf in _tree.leaves_with_path(a):  # paths only for the message
                if isinstance(leaf, torch.Tensor) and leaf.requires_grad:
                    return f"argument {i}" + (f" at `{_tree.keystr(path)}`" if path else "")
    if isinstance(extra, torch.Tensor) and extra.requires_grad:
        return "`max_norm`"
    return None


def differentiated_reason(where: str) -> str:
    """The words for NOTE [differentiating through per-example gradients]."""
    return (f"{where} requires grad, so the result must keep an autograd graph back to it, "
            "which only vmap builds (what meta-learning and gradient penalties need). For the "
            "fast methods pass detached tensors ({k: v.detach() for k, v in "
            "model.named_parameters()}) or call under torch.no_grad()")


def _contract_reason(args: Sequence[Any], nums: Sequence[int], has_aux: bool,
                     keep_batch_dim: bool, randomness: str) -> tuple[str, bool] | None:
    """Why the default method must use vmap without trying hooks: ``(reason, say_it)``."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None:
        return "the call runs inside a torch.func transform or torch.compile", False
    if fake_tensors(args):
        return FAKE_REASON, False
    where = differentiated_input(args)
    if where is not None:  # NOTE [differentiating through per-example gradients]
        return differentiated_reason(where), True
    if has_aux:
        return ("has_aux=True: vmap returns each example's own aux (method='hooks' returns "
                "the aux of the whole batch)"), True
    if not keep_batch_dim:
        return "keep_batch_dim=False: loss_fn is written for one example", True
    if randomness != "error":
        return (f"randomness={randomness!r}: global-RNG draws differ between a batch and "
                "examples"), True
    return None


def reject_kwargs(kwargs: dict[str, Any], fn: str) -> None:
    """The error for keyword arguments to a per-example function. They are not passed on:
    the methods map positional arguments only (``batch_argnums`` says which carry the
    batch), and a keyword tensor would be neither mapped nor checked (for a batch axis, or
    for requiring grad), so each method would treat it differently."""
    if kwargs:
        names = ", ".join(repr(k) for k in kwargs)
        raise TypeError(
            f"{fn}: keyword arguments are not supported (got {names}); pass them positionally "
            "(with `batch_argnums` naming the batch arguments when one is a constant), or close "
            "over them (functools.partial(loss_fn, ...))")


def _empty_batch(args: Sequence[Any], batched: Sequence[int]) -> bool:
    """Whether every batch leaf has 0 examples (and there is at least one)."""
    leaves = [leaf for i in batched for leaf in _tree.leaves(args[i]) if isinstance(leaf, torch.Tensor)]
    return len(leaves) > 0 and all(leaf.dim() > 0 and leaf.shape[0] == 0 for leaf in leaves)


def _empty_result(loss_fn: Callable[..., Any], args: Sequence[Any], nums: Sequence[int],
                  is_tuple: bool, has_aux: bool) -> tuple[Any, Any]:
    """An empty batch (Poisson sampling draws one now and then): values of shape ``(0,)``
    and per-example gradients of shape ``(0, *param.shape)``, what JAX's ``vmap(grad(f))``
    gives, for every method (neither ``torch.func.vmap`` nor the engine's kernels take a
    batch of 0). ``loss_fn`` runs only with ``has_aux=True``, once on the empty batch
    under ``no_grad``, for the aux it returns there."""
    diff = tuple(args[i] for i in nums)
    grads = _tree.map(lambda p: p.new_zeros(0, *p.shape) if isinstance(p, torch.Tensor) else p, diff)
    leaves = [p for p in _tree.leaves(diff) if isinstance(p, torch.Tensor)]
    like = next((p for p in leaves if p.is_floating_point() or p.is_complex()), None)
    values = (like.new_zeros(0) if like is not None else torch.zeros(0)).real
    if has_aux:
        with torch.no_grad():
            out = loss_fn(*args)
        aux = _tree.map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, out[1])
        value: Any = (values, aux)
    else:
        value = values
    return value, (grads if is_tuple else grads[0])


def _squeeze_one(loss_fn: Callable[..., Any], has_aux: bool, fn: str, per_example: bool
                 ) -> Callable[..., Any]:
    """``loss_fn`` with a per-example loss vector of shape ``(1,)`` turned into a scalar, so
    a ``loss_fn`` returning per-example losses (what ``method="hooks"`` needs) also serves
    the ``vmap`` method, which calls it on batches of one. Any other shape is an error
    stating ``fn``'s contract: per-example losses ``(B,)`` (``per_example``, the clipped
    functions), else those or a scalar loss for the batch."""

    @functools.wraps(loss_fn)
    def wrapped(*args: Any) -> Any:
        out = loss_fn(*args)
        value = out[0] if has_aux and isinstance(out, tuple) and len(out) == 2 else out
        if isinstance(value, torch.Tensor) and value.shape == (1,):
            value = value.reshape(())
            return (value, out[1]) if has_aux else value
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            want = ("per-example losses of shape (B,) (reduction='none')" if per_example else
                    "a scalar loss for the batch (a mean or a sum) or per-example losses of "
                    "shape (B,)")
            raise ValueError(
                f"{fn}: loss_fn must return {want}, but on an example passed as a batch of one "
                f"(method='vmap') it returned shape {tuple(value.shape)}, not (1,)")
        return out

    return wrapped


def _per_sample(
    loss_fn: Callable[..., Any],
    argnums: ArgNums,
    has_aux: bool,
    batch_argnums: Sequence[int] | None,
    chunk_size: int | None,
    keep_batch_dim: bool,
    randomness: str,
    method: str,
    fn: str,
    per_example: bool = False,
    refused: str | None = None,
) -> Callable[..., tuple[Any, Any]]:
    """The function behind both public functions and the clipped functions' vmap method;
    ``fn`` names the API in errors, ``per_example`` states its contract there (per-example
    losses only, as the clipped functions take), ``refused`` why the caller's ``auto`` came
    to vmap, a clause (for NOTE [shapes that depend on the data])."""
    if method not in _METHODS:
        raise ValueError(f"{fn}: `method` must be one of {_METHODS}, got {method!r}")
    decided: dict[Any, str] = {}
    reasons: dict[Any, str] = {}
    vg = _value_and_grad_impl(
        _squeeze_one(loss_fn, has_aux, fn, per_example) if keep_batch_dim else loss_fn,
        argnums, has_aux, fn)

    # NOTE [a batch of one]
    # Each example is handed to `loss_fn` with a leading axis of size 1, so the same
    # loss function that averages over a batch gives exactly that example's loss (the mean
    # over one). Per-example keys therefore arrive as a (1, 2) key batch: fp.nn's `apply`
    # reads a key batch of size N as one key per example, which keeps this consistent with
    # a Python loop over `x[i:i+1]`. `keep_batch_dim=False` hands raw examples instead.
    @functools.wraps(loss_fn)
    def wrapped(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
        reject_kwargs(kwargs, fn)
        nums, is_tuple = _normalize_argnums(argnums, len(args), fn)
        if batch_argnums is None:
            batched = tuple(i for i in range(len(args)) if i not in nums)
        else:
            batched = tuple(i + len(args) if i < 0 else i for i in batch_argnums)
            both = sorted(set(batched) & set(nums))
            if both:
                raise ValueError(f"{fn}: arguments {both} are in both `argnums` and `batch_argnums`")
        if not batched:
            raise ValueError(f"{fn}: no batch argument: every positional argument is in `argnums`")
        if _empty_batch(args, batched):
            return _empty_result(loss_fn, args, nums, is_tuple, has_aux)
        use, why_vmap = method, refused
        if method == "auto":
            why = _contract_reason(args, nums, has_aux, keep_batch_dim, randomness)
            if why is not None:
                use, why_vmap = "vmap", why[0]
                if why[1]:
                    _note_once(loss_fn, f"{fn}: method='auto' uses 'vmap': {why[0]}", why[0], args)
            else:
                use = _decisions(loss_fn, decided).get((nums, batched, _signature(args)), "hooks")
                if use == "vmap":
                    why_vmap = _decisions(loss_fn, reasons, _REFUSED).get(
                        (nums, batched, _signature(args)))
        if use == "hooks" and method == "hooks":
            where = differentiated_input(args)
            if where is not None:  # NOTE [differentiating through per-example gradients]
                raise ValueError(f"{fn}: method='hooks' returns gradients without an autograd "
                                 f"graph, but {differentiated_reason(where)}; method='auto' "
                                 "or 'vmap' differentiates through them")
        if use == "hooks":
            fast = _fast(loss_fn, args, nums, is_tuple, batched, has_aux, chunk_size, keep_batch_dim,
                         method, fn)
            if not isinstance(fast, Unsupported):
                return fast
            why_vmap = f"the fast method refused this call ({fast})"
            key = (nums, batched, _signature(args))
            _decisions(loss_fn, decided)[key] = "vmap"
            _decisions(loss_fn, reasons, _REFUSED)[key] = why_vmap
        in_axes = tuple(0 if i in batched else None for i in range(len(args)))

        def one(*a: Any) -> tuple[Any, Any]:
            if keep_batch_dim:
                a = tuple(
                    _tree.map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, ai)
                    if i in batched
                    else ai
                    for i, ai in enumerate(a)
                )
            out = vg(*a)
            if has_aux:
                _check_stackable_aux(out[0][1], fn, per_example)
            return out

        try:
            if chunk_size is None:
                return vmap(one, in_axes=in_axes, randomness=randomness)(*args)
            with Snapshot(engine=False) as snapshot:  # NOTE [runs that change module state] in _state
                # each chunk from the call's state, as in the fast methods
                return vmap(snapshot.each_from_here(one, fn), in_axes=in_axes,
                            chunk_size=chunk_size, randomness=randomness)(*args)
        except RuntimeError as e:
            # NOTE [shapes that depend on the data]
            data_dependent = _data_dependent(e, fn, why_vmap)
            if data_dependent is not None:
                raise data_dependent from e
            if "embedding_renorm_" in str(e):  # NOTE [max_norm renormalises the table]
                raise RuntimeError(
                    f"{fn}: method='vmap' cannot batch F.embedding/F.embedding_bag with "
                    "max_norm, which rescales rows of the table in place during the forward; "
                    "method='hooks' (and method='auto') handle it when the table is a parameter "
                    "(not computed inside loss_fn) that nothing but such lookups reads, "
                    "renormalising it as eager PyTorch does. "
                    f"The error was: {e}") from e
            if "from the 'Sparse" in str(e):  # NOTE [sparse embedding gradients] in _rules
                raise RuntimeError(
                    f"{fn}: torch.func.vmap cannot batch the gradient of an embedding table "
                    "with sparse=True (nn.Embedding/nn.EmbeddingBag); sparse=False gives the "
                    "same values, and method='hooks' handles sparse=True where it has rules for "
                    f"the rest of loss_fn (dense per-example gradients). The error was: {e}"
                ) from e
            if "_nested_tensor_from_mask" in str(e):
                raise RuntimeError(
                    f"{fn}: torch.func.vmap cannot batch the nested tensor that "
                    "nn.TransformerEncoder builds from src_key_padding_mask in eval mode; "
                    "construct it with enable_nested_tensor=False (the same numbers), or let "
                    "method='hooks' run it (per-example losses of shape (B,)). The error was: "
                    f"{e}") from e
            if "Batch norm got a batched tensor" in str(e) or "mutate a captured Tensor" in str(e):
                raise RuntimeError(
                    f"{fn}: torch.func.vmap cannot run a layer that updates state captured "
                    "from outside loss_fn in place, such as the running statistics of "
                    "BatchNorm or InstanceNorm(track_running_stats=True) in training mode "
                    "(BatchNorm there also mixes the examples, so no method gives per-example "
                    "gradients: use eval mode or GroupNorm). method='hooks' runs InstanceNorm "
                    f"with running statistics. The error was: {e}") from e
            if "expected scalar type" in str(e) and _autocast_on():
                raise RuntimeError(
                    f"{fn}: torch.func.vmap failed under torch.autocast, a limit of torch's "
                    "vmap with autocast's casts (LayerNorm, for one, fails the same way in a "
                    "plain torch.func.vmap(grad)). method='hooks' runs under autocast: give it "
                    "per-example losses of shape (B,), has_aux=False and parameters that do not "
                    "require grad (method='auto' then takes it). The error was: "
                    f"{e}") from e
            if _packed_in(e.__traceback__):
                raise RuntimeError(
                    f"{fn}: torch.func.vmap cannot batch a PackedSequence made inside loss_fn "
                    "(each example packs to its own length). Pass the padded tensor to the "
                    "recurrent layer (fp.nn.replace_rnns for built-in ones) and read each "
                    "sequence's last valid step, out[torch.arange(B), lengths - 1], or mask "
                    "the padded steps: the fast methods handle that. The error was: "
                    f"{e}") from e
            rnn = _builtin_rnn_in(e.__traceback__)
            if rnn is None:
                raise
            if rnn.endswith("Cell"):  # NOTE [recurrent cells] in _grad_sample/_rules_cells
                raise RuntimeError(
                    f"{fn}: built-in nn.{rnn} failed under vmap (its fused kernel cannot be "
                    "batched); method='hooks' (and method='auto', the default, for per-example "
                    f"losses) handle it. The error was: {e}") from e
            raise RuntimeError(
                f"{fn}: built-in nn.{rnn} failed under vmap (its fused kernel has no batching "
                f"rule): {REPLACE_RNNS_HINT}. The error was: {e}") from e

    return wrapped


def _check_stackable_aux(aux: Any, fn: str, per_example: bool) -> None:
    """vmap stacks each example's aux, which takes tensors (and None) only: name the first
    other leaf (a string, a number) in ``fn``'s words rather than the internal vmap's."""
    for path, leaf in _tree.leaves_with_path(aux):
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            methods = "method='ghost' or 'hooks'" if per_example else "method='hooks'"
            raise TypeError(
                f"{fn}: with has_aux=True, method='vmap' returns each example's aux stacked, "
                f"so its leaves must be tensors (or None), but the aux at "
                f"`{_tree.keystr(path)}` is a {type(leaf).__name__}; return it from outside "
                f"loss_fn, or pass {methods}, which returns loss_fn's aux for the whole batch")


def _autocast_on() -> bool:
    """Whether a ``torch.autocast`` region is open for the CPU or CUDA."""
    return autocast_on("cpu") or autocast_on("cuda")


def _packed_in(tb: Any) -> bool:
    """Whether the traceback runs through ``torch.nn.utils.rnn`` (packing) or a frame holds
    a ``PackedSequence``: ``loss_fn`` packed its examples, which vmap cannot batch."""
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename.endswith(("nn/utils/rnn.py", "nn\\utils\\rnn.py")) or any(
                isinstance(v, torch.nn.utils.rnn.PackedSequence) for v in frame.f_locals.values()):
            return True
        tb = tb.tb_next
    return False


def _builtin_rnn_in(tb: Any) -> str | None:
    """The class name of a built-in ``nn.RNNBase`` or ``nn.RNNCellBase`` whose ``forward``
    is on the traceback."""
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_filename.endswith(("nn/modules/rnn.py", "nn\\modules\\rnn.py")):
            owner = frame.f_locals.get("self")
            if isinstance(owner, (torch.nn.RNNBase, torch.nn.RNNCellBase)):
                return type(owner).__name__
        tb = tb.tb_next
    return None


def _decisions(loss_fn: Any, local: dict[Any, str],
               table: weakref.WeakKeyDictionary[Any, dict[Any, str]] | None = None
               ) -> dict[Any, str]:
    """``loss_fn``'s entry of ``table`` (default ``_DECIDED``), or ``local`` when it
    cannot be held weakly."""
    try:
        return (_DECIDED if table is None else table).setdefault(_owner(loss_fn), {})
    except TypeError:  # not weak-referenceable: remember per wrapper only
        return local


# torch.func.vmap's words for an op whose output shape, or a branch, depends on the values
_DYNAMIC_SHAPE = ("dynamic shape", "differently shaped Tensor")
_DATA_FLOW = ("data-dependent control flow", "calling .item() on a Tensor")


def _data_dependent(e: RuntimeError, fn: str, refused: str | None) -> RuntimeError | None:
    """The error for vmap refusing an op whose shape or branch depends on the data, or None.

    # NOTE [shapes that depend on the data]
    A model that routes examples by a boolean mask (a mixture of experts, ``h[route] =
    layer(x[route])``), ``nonzero``, ``masked_select`` or ``unique``, or that branches on a
    value (``if h.sum() > 0``, ``.item()``), is valid for a per-example loop, but
    ``torch.func.vmap`` cannot batch it: each example would have its own shape or take its
    own branch. The fast methods refuse such models too (the mask moves the examples), so
    ``auto`` ended in torch's bare "vmap: We do not support batching operators that can
    support dynamic shape", which named neither the call nor why the fast methods had
    refused. That error now says both (the first refusal's reason, kept per ``loss_fn``
    and shapes with the decision), and the way out; torch's error is its ``__cause__``.
    """
    text = str(e)
    if any(w in text for w in _DYNAMIC_SHAPE):
        what = ("an op whose output shape depends on the values of the data (indexing with "
                "a boolean mask, nonzero, masked_select, unique), which vmap cannot batch: "
                "each example would get a shape of its own")
        fix = ("compute every branch for all rows and select with torch.where (or multiply "
               "by the mask), so that shapes do not depend on the data")
    elif any(w in text for w in _DATA_FLOW):
        what = ("Python control flow on a tensor's value (`if t > 0`, `.item()`), which vmap "
                "cannot batch: each example may take a branch of its own")
        fix = "replace the branch by torch.where over both results"
    else:
        return None
    how = ("method='vmap'" if refused is None else
           f"method='auto' took vmap because {refused}; vmap")
    return RuntimeError(
        f"{fn}: {how} cannot run loss_fn: it uses {what}. A loop over the examples can; to "
        f"batch it, {fix}. The error was: {text.splitlines()[0] if text else type(e).__name__}")


def _fast(loss_fn: Callable[..., Any], args: Sequence[Any], nums: Sequence[int], is_tuple: bool,
          batched: Sequence[int], has_aux: bool, chunk_size: int | None, keep_batch_dim: bool,
          method: str, fn: str) -> tuple[Any, Any] | Unsupported:
    """``method="hooks"``/``"auto"``: the engine's result, or its refusal to fall back to vmap.
    Under ``torch.compile`` it runs eagerly (NOTE [engines under torch.compile] in
    ``_grad_sample._api``); auto takes vmap there before reaching it."""
    return outside_compile(_fast_eager, loss_fn, args, nums, is_tuple, batched, has_aux,
                           chunk_size, keep_batch_dim, method, fn)


def _fast_eager(loss_fn: Callable[..., Any], args: Sequence[Any], nums: Sequence[int],
                is_tuple: bool, batched: Sequence[int], has_aux: bool, chunk_size: int | None,
                keep_batch_dim: bool, method: str, fn: str) -> tuple[Any, Any] | Unsupported:
    try:
        if not keep_batch_dim:
            raise Unsupported("keep_batch_dim=False means loss_fn is written for one example, "
                              "but the fast method calls it once on the whole batch")
        return hooks_value_and_grad(loss_fn, args, nums, is_tuple, batched, has_aux, chunk_size, fn)
    except Unsupported as e:
        if method == "hooks":
            if REPLACE_RNNS_HINT in str(e):  # vmap would not help either
                raise ValueError(f"{fn}: method='hooks': {e}") from None
            raise ValueError(f"{fn}: method='hooks': {e}. Use method='vmap', or method='auto' "
                             "to fall back to it automatically.") from None
        _note_once(loss_fn, f"{fn}: method='auto' falls back to 'vmap' (said once per loss_fn): "
                   f"{e}", str(e), args)
        return e


def per_sample_value_and_grad(
    loss_fn: Callable[..., Any],
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    batch_argnums: Sequence[int] | None = None,
    chunk_size: int | None = None,
    keep_batch_dim: bool = True,
    randomness: str = "error",
    method: str = "auto",
) -> Callable[..., tuple[Any, Any]]:
    """Like :func:`per_sample_grads` but returns ``(values, grads)``: each example's loss
    (shape ``(B,)``) and gradient (leading axis ``B``); ``((values, aux), grads)`` with
    ``has_aux=True``. Arguments as :func:`per_sample_grads`, ``method`` included.

    Args:
      loss_fn: ``loss_fn(params, batch, ...) -> loss`` written for a batch, as in
        :func:`per_sample_grads`.
      argnums: the argument(s) to differentiate (the parameters).
      has_aux: ``loss_fn`` returns ``(loss, aux)``.
      batch_argnums: the arguments carrying the batch on axis 0 (default: every positional argument
        not in ``argnums``).
      chunk_size: examples per vectorised chunk, to bound memory.
      keep_batch_dim: pass each example with a leading axis of size 1 (default).
      randomness: ``torch.func``'s mode for the global RNG inside ``loss_fn``.
      method: ``"auto"``, ``"vmap"`` or ``"hooks"``, as in :func:`per_sample_grads`.

    Returns:
      A function with ``loss_fn``'s signature returning ``(values, grads)``: values of shape
      ``(B,)`` and per-example gradients with a leading batch axis (``((values, aux), grads)`` with
      ``has_aux=True``). An empty batch (``B = 0``, which Poisson sampling can draw) gives
      values of shape ``(0,)`` and gradients of shape ``(0, *param.shape)``; its ``aux`` is
      what ``loss_fn`` returns when called once on the empty batch (no example exists to
      give vmap's per-example layout), for every method.

    Examples:
      >>> loss = lambda w, x: ((x @ w) ** 2).mean()
      >>> v, g = per_sample_value_and_grad(loss, method="vmap")(
      ...     torch.ones(2), torch.tensor([[1., 0.], [1., 1.]]))
      >>> v, g
      (tensor([1., 4.]), tensor([[2., 0.],
              [4., 4.]]))
    """
    return _per_sample(loss_fn, argnums, has_aux, batch_argnums, chunk_size, keep_batch_dim, randomness,
                       method, "per_sample_value_and_grad(loss_fn)")


def per_sample_grads(
    loss_fn: Callable[..., Any],
    argnums: ArgNums = 0,
    *,
    has_aux: bool = False,
    batch_argnums: Sequence[int] | None = None,
    chunk_size: int | None = None,
    keep_batch_dim: bool = True,
    randomness: str = "error",
    method: str = "auto",
) -> Callable[..., Any]:
    """The gradient of each example's loss: ``vmap(grad(loss_fn))`` over the batch.

    Args:
      loss_fn: ``loss_fn(params, batch, ...) -> scalar``, written for a *batch* (it may
        average over it). Each example is passed as a batch of one (see
        ``keep_batch_dim``), so the same function serves training and per-sample use.
      argnums: the argument(s) to differentiate (the parameters).
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` is returned per example.
      batch_argnums: the arguments whose tensor leaves carry the batch on axis 0; by
        default every positional argument not in ``argnums``.
      chunk_size: examples per vectorised chunk, to bound memory (same result: each chunk
        starts from the module buffers, and the rows of tables a lookup with ``max_norm``
        rescales, as they were before the call).
      keep_batch_dim: pass each example with a leading axis of size 1 (default), or
        without it (``False``) for a ``loss_fn`` written for one example.
      randomness: ``torch.func``'s mode for PyTorch's global RNG inside ``loss_fn``;
        prefer explicit per-example ``fp.random`` keys as a batch argument.
      method: how to compute them (the same numbers, up to rounding):

        * ``"auto"`` (default): ``"hooks"`` whenever it computes what ``"vmap"`` computes,
          else ``"vmap"``; see NOTE [auto: vmap's numbers, hooks' speed]. Hooks is used
          when ``loss_fn`` returns per-example losses (shape ``(B,)``) and every call that
          uses a parameter has a rule. A ``loss_fn`` returning a scalar (the batch mean or
          sum) is run with ``"vmap"`` (hooks would give each example's share of the mean,
          1/B of its gradient: never rescaled silently); so are ``has_aux=True`` (aux is
          per example), ``keep_batch_dim=False``, ``randomness`` other than ``"error"``,
          calls inside ``torch.func`` transforms or ``torch.compile``, inputs that require
          grad under grad mode (parameters or the batch: the result then keeps an autograd
          graph, for meta-learning, gradient penalties or gradients with respect to the
          batch), and a ``loss_fn`` that differentiates a parameter itself with ``fp.grad``
          (or another fp transform) or ``torch.autograd.grad`` (an inner step), runs a
          backward with ``create_graph=True`` through the model (an input-gradient
          penalty), or calls a layer inside a ``torch.func`` transform of its own.
          A fall-back is announced by one ``UserWarning`` per ``loss_fn``
          (not per call; a lambda or ``functools.partial`` rebuilt every step counts as
          one) and cached per ``loss_fn`` object and input shapes
          (build ``loss_fn`` once: a rebuilt one runs the refused fast forward again). A
          model that vmap cannot batch either (boolean-mask routing, ``nonzero``, a branch
          on a value) raises an error naming this call, why the fast method refused and
          what to change. To get the fast path for a mean
          loss, return the unreduced per-example losses. Hooks and vmap agree to rounding
          (float64: 1e-12) on the layers with rules. Like ``"hooks"``, it assumes example
          ``i``'s loss depends on example ``i`` alone (BatchNorm in training mode is an
          error); other statistics over the batch are refused, and ``auto`` falls back to
          ``vmap``, only where the fast method sees them (see ``"hooks"``'s contract);
          a statistic it does not see (one applied without an autograd graph, such as a
          REINFORCE baseline ``(r - r.mean()).detach()``) gives silently different numbers,
          and needs ``method="vmap"``.
        * ``"vmap"``: ``vmap(grad)`` over batches of one; any ``loss_fn`` that
          ``torch.func`` can transform. A ``loss_fn`` returning per-example losses (shape
          ``(1,)`` for a batch of one) is accepted too.
        * ``"hooks"``: one forward and one backward of the whole batch, close to the cost
          of one batch gradient. Each parameter's per-example gradient is rebuilt from
          the inputs and output gradients of the calls that use it: ``F.linear``,
          ``F.conv1d``/``2d``/``3d``, ``F.conv_transpose1d``/``2d``/``3d``,
          ``F.embedding``, ``F.embedding_bag``, ``F.layer_norm``, ``F.group_norm``,
          ``F.instance_norm``, ``F.rms_norm``, ``F.batch_norm`` in eval mode, ``F.prelu``,
          ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``, so
          ``nn.TransformerEncoderLayer`` in either layout), a parameter broadcast over
          the batch by ``x + p``, ``x - p``, ``x * p``, ``x / p`` (either order) or
          ``p.expand(B, ...)`` (a vision transformer's positional embedding, LayerScale
          and class token, ConvNeXt's ``(C, 1, 1)`` layer scale; an expand is taken once a padded batch shows its size follows
          the batch's), a parameter laid out the same way in another elementwise op
          (``torch.maximum``/``minimum``, ``clamp`` with tensor bounds, ``lerp``,
          ``addcmul``/``addcdiv``, ``where``, ``pow``, ``float_power``, ``atan2``,
          ``hypot``, ``xlogy``, ``logaddexp``, ``copysign``, ``fmax``/``fmin``: a learned
          clipping threshold, mixing weight or exponent, its per-example gradient taken
          from autograd's derivative of the op) or as
          ``F.scaled_dot_product_attention``'s float ``attn_mask`` (a learned relative
          position bias), ``torch.addmm``/``mm``/``mv``/``addmv``/``baddbmm`` (Hugging
          Face's ``Conv1D``), a matrix or vector in ``x @ w`` or ``w @ x`` and a parameter in a
          ``torch.einsum`` of any number of operands (ellipses included) and
          ``torch.tensordot`` (functional
          code written the JAX way), rows selected by the batch's ids (``gamma[y]``,
          ``W[y]``, ``index_select``) and a parameter written into the batch in place
          (``h[mask] = token``),
          ``F.bilinear``, fused rules for ``fp.nn.LSTM``/``GRU`` (``fp.nn.RNN`` uses
          ``F.linear``), and the built-in cells ``nn.LSTMCell``/``GRUCell``/``RNNCell``
          stepped in a loop. The contract:
          ``loss_fn`` returns the *per-example* losses,
          shape ``(B,)`` (``reduction="none"``; a scalar is an error, never rescaled);
          example ``i``'s loss depends on example ``i`` alone (no BatchNorm in training
          mode, which is an error, and no statistics over the batch: ``h - h.mean(0)``
          or a Gram matrix of the batch ``h @ (h.T @ h)`` before a layer, or an in-batch
          contrastive loss after the last, is refused, and ``"auto"`` falls back to ``"vmap"``, which
          computes it over each example alone. Statistics are seen where they have an
          autograd graph: computed from floating batch data (which reaches ``loss_fn``
          requiring grad) or from activations. Without one, a tensor made from integer
          batch data by the batch's statistics (``uint8`` pixels standardised by the
          batch's mean and std) is seen on the first call with those shapes, by the padded
          run that such a tensor asks for (its first rows change with the padding); a statistic applied
          with no graph anywhere else is not seen, and the result is silently the batch's
          coupled gradient: a REINFORCE baseline ``-(r - r.mean()).detach() * logp``,
          weights computed from the batch and multiplied in by hand (``losses * w``). Use
          ``method="vmap"`` for those); and every call that
          uses a parameter sees the batch on axis 0 of its input, in the batch's order (a
          model that reorders its examples inside, sorting them by length with an index,
          ``index_select``, ``gather``, ``flip``, ``roll``, ``cat`` or ``stack``, is seen:
          ``"hooks"`` raises and ``"auto"`` falls back, or, on the first call with those
          shapes, runs padded to show the rows were put back in order; so is a
          permutation made by reshapes alone, by the view that splits the examples).
          ``F.linear``,
          ``F.layer_norm``, ``F.rms_norm`` and ``F.embedding`` also take it on axis 1 of a
          sequence-first ``(T, B, ...)`` input that is computed from the parameters or the
          batch (it has a graph: inside ``batch_first=False`` transformer layers, or
          ``x.transpose(0, 1)`` of the batch, a view or a copy; floating batch arguments
          reach ``loss_fn`` requiring grad; a ``loss_fn`` that autograd then refuses, one
          that changes its batch in place, is run again with the batch plain); a table
          with no batch axis is not taken (``"hooks"`` raises, ``"auto"`` falls back).
          The batch axis is checked by size: axis 0 (or, sequence-first, axis 1)
          must have size ``B``, and no other axis that could hold the examples may have
          it too. When one does (sequences as long as the batch: ``(B, T)`` ids or a
          ``(T, B, E)`` input with ``T == B``), the batch is run again with up to four
          copies of its first example appended, at a size no other axis has, and the
          copies' rows are dropped (NOTE [padding an ambiguous batch] in
          ``_grad_sample/_padding.py``); an axis whose size follows the batch's stays an
          error as ambiguous. Axis 0 may also hold ``m`` consecutive rows per example
          (augmentation multiplicity ``x.reshape(B * K, ...)`` with the loss averaged over
          the ``K`` augmentations, video frames through a 2-d CNN, flattened tokens): a
          padded run shows the layout (each padding example's ``m`` rows repeat the
          first example's), and each example's rows are summed. For ``F.linear``, the
          convolutions (1-d, 2-d) and the layer, group and RMS norms, axis 0 may instead
          hold ``m`` blocks of the batch (``torch.cat`` of ``m`` augmentations of ``x``,
          ``x.transpose(0, 1).reshape(K * B, ...)``), shown the same way. Other layouts
          are refused; ``has_aux`` cannot be padded, so there such models take ``"vmap"``.
          A tensor made inside ``loss_fn``
          with no graph whose first axis has size ``B`` (a fixed ``(K, D)`` table through
          a ``Linear`` with ``K == B``, or ``one_hot(y).float()``) may be a constant or
          batch data: the first call with those shapes runs padded once to tell (with
          ``has_aux``, for the answer alone), and later calls run unpadded with it.
          One-dimensional embedding ids are examples only when read from a batch argument
          (the argument or a view of it); ids made inside ``loss_fn`` (positions
          ``arange(T)``, ``(1, T)`` position ids, a prompt-tuning prefix) are looked up as
          a tensor with no batch axis, whose per-example gradient comes from where it
          meets the batch (``x + pos``, an expand over the batch) and is scattered back
          into the table.
          An op without a rule that combines parameters with constants of ``loss_fn``
          (``table[index]`` with an index buffer, ``torch.where`` with a fixed mask) makes
          a tensor with no batch axis, handled as above; a plain tensor that is or may be
          batch data there is refused. Any other use of a parameter
          (an einsum that broadcasts a parameter's axis, ``nn.LSTM``'s fused kernel: see
          ``fp.nn.replace_rnns``) is an error
          naming the parameter and the call. ``randomness`` does not apply; ``aux`` is what
          ``loss_fn`` returns for the whole batch (with ``chunk_size``, each chunk's aux
          leaves are concatenated along axis 0 when their axis 0 has the chunk's size, and
          are an error otherwise: a statistic of the chunk whose length happens to equal
          the chunk size, per-class means with as many classes as examples in a chunk, is
          concatenated, not refused);
          the gradients carry no autograd graph
          (an input that requires grad under grad mode is an error).
          Large per-example outputs are written into buffers of earlier results once
          nothing references those any more (glibc's malloc would page-fault fresh ones
          in on every call), so up to a few results' worth of memory stays allocated
          between calls: NOTE [recycled outputs] in ``_grad_sample/_buffers.py``. Under
          ``fp.jit`` (``torch.compile``) it runs eagerly behind a graph break, with the
          same numbers; ``fullgraph=True`` refuses that, so use ``"vmap"`` (or ``"auto"``,
          which takes vmap there) for a single graph. Under ``torch.autocast`` the
          gradients come back in each parameter's dtype, with autograd's values.

    Returns:
      A function with ``loss_fn``'s signature returning per-example gradients shaped like
      the differentiated argument(s) with a leading batch axis, plus per-example ``aux``
      with ``has_aux=True``. An empty batch (``B = 0``) gives gradients of shape
      ``(0, *param.shape)``, and the ``aux`` that ``loss_fn`` returns when called once on
      the empty batch, for every method.

    Notes:
      NOTE [auto: vmap's numbers, hooks' speed]: the default gives exactly ``vmap``'s per-example
        gradients and takes the faster hooks engine only when that is the same computation
        (per-example losses ``(B,)`` and a rule for every parameter use); otherwise it uses
        ``vmap``.
      NOTE [padding an ambiguous batch]: when another axis has the batch size (sequences as long
        as the batch), the fast method runs the batch again with up to four copies of its first
        example appended, so that only the examples' axis grows, and drops their rows; inputs
        without a provable batch axis are refused at the padded size.
      NOTE [recycled outputs]: the engine keeps large per-example gradient buffers it returned and
        writes a later result into one only when nothing else references it (saving page faults); a
        result you hold is never overwritten, and ``release`` frees the pool.

    Examples:
    A loss written for a batch, here a mean; each example is a batch of one (vmap):

    >>> loss = lambda w, x, y: ((x @ w - y) ** 2).mean()
    >>> x, y = torch.tensor([[1., 2.], [3., 4.]]), torch.tensor([1., 0.])
    >>> per_sample_grads(loss, method="vmap")(torch.zeros(2), x, y)
    tensor([[-2., -4.],
            [ 0.,  0.]])

    Per-example losses and parameters used through layers with rules (``F.linear``): the
    default method takes the fast path, with the same numbers:

    >>> losses = lambda w, x, y: (torch.nn.functional.linear(x, w)[:, 0] - y) ** 2
    >>> per_sample_grads(losses)(torch.zeros(1, 2), x, y)
    tensor([[[-2., -4.]],
    <BLANKLINE>
            [[ 0.,  0.]]])
    """
    vg = _per_sample(loss_fn, argnums, has_aux, batch_argnums, chunk_size, keep_batch_dim, randomness,
                     method, "per_sample_grads(loss_fn)")

    @functools.wraps(loss_fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        value, grads = vg(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapped
