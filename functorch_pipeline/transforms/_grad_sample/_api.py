"""Driver of the fast per-sample-gradient method: flatten, track, run, merge, unflatten."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch

from functorch_pipeline import tree as _tree
from functorch_pipeline.transforms._grad_sample._closure import warn_closed_over
from functorch_pipeline.transforms._grad_sample._engine import Engine
from functorch_pipeline.transforms._grad_sample._engine import PlainBatch
from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._padding import plain_batch
from functorch_pipeline.transforms._grad_sample._padding import run_unambiguous
from functorch_pipeline.transforms._grad_sample._rules import RULES
from functorch_pipeline.transforms._grad_sample._rules import merge
from functorch_pipeline.transforms._grad_sample._state import chunks_from_one_state

__all__ = ["Unsupported", "hooks_value_and_grad"]


def _batch_size(args: Sequence[Any], batched: Sequence[int], fn: str) -> int:
    sizes = {leaf.shape[0] if leaf.dim() else None for i in batched for leaf in _tree.leaves(args[i])
             if isinstance(leaf, torch.Tensor)}
    if len(sizes) == 1 and None not in sizes:
        return next(iter(sizes))
    return _batch_size_error(args, batched, fn)


def _batch_size_error(args: Sequence[Any], batched: Sequence[int], fn: str) -> int:
    sizes = {}
    for i in batched:
        for path, leaf in _tree.leaves_with_path(args[i]):
            if isinstance(leaf, torch.Tensor):
                if leaf.dim() == 0:
                    raise ValueError(f"{fn}: batch argument {i} at path `{_tree.keystr(path)}` is a "
                                     "0-d tensor; every batch leaf needs the batch on axis 0")
                sizes.setdefault(leaf.shape[0], f"argument {i} at path `{_tree.keystr(path)}`")
    if not sizes:
        raise ValueError(f"{fn}: the batch arguments {list(batched)} hold no tensor")
    if len(sizes) > 1:
        found = ", ".join(f"{where} has {n}" for n, where in sizes.items())
        raise ValueError(f"{fn}: batch leaves disagree on the batch size (axis 0): {found}")
    return next(iter(sizes))


class _Names:
    """Key paths of the differentiated leaves, computed only when an error needs one."""

    def __init__(self, args: Sequence[Any], nums: Sequence[int]) -> None:
        self._args, self._nums = args, nums
        self._names: list[str] | None = None

    def __getitem__(self, slot: int) -> str:
        if self._names is None:
            self._names = []
            for i in self._nums:
                for path in _tree.flatten_with_path(self._args[i])[0]:
                    key = _tree.keystr(path)
                    if len(self._nums) > 1:
                        key = f"args[{i}]" + ("" if not path else key if key.startswith("[") else "." + key)
                    self._names.append(key)
        return self._names[slot]


def _all_equal(xs: Sequence[Any]) -> bool:
    try:
        return all(bool(x == xs[0]) for x in xs[1:])
    except Exception:  # an array's elementwise ==, an object without __eq__ to bool
        return False


def join_chunks(values: Sequence[Any], sizes: Sequence[int], has_aux: bool, fn: str) -> Any:
    """The losses (and aux) of chunks of the batch, as one call on the batch returns them.

    # NOTE [aux over chunks]
    With ``chunk_size``, ``loss_fn`` runs once per chunk and the fast methods return the
    aux ``loss_fn`` returned. A leaf with the chunk's examples on axis 0 (predictions,
    per-example losses) joins along it into the batch's. Any other leaf (an accuracy over
    the chunk, a mean over it) is a statistic of each chunk, not of the batch: those were
    stacked or concatenated (an accuracy of 0.6 came back as ``[0., 1., 1.]``), and are
    now an error naming the leaf; a non-tensor leaf equal in every chunk is kept. The rule
    is by shape alone: a leaf is taken as per-example when its axis 0 has its chunk's
    size in every chunk. A statistic of the chunk whose length happens to equal the chunk
    size (per-class mean logits with as many classes as examples in a chunk, when every
    chunk has that size) cannot be told from per-example data without running
    ``loss_fn`` again, and is concatenated like one (documented; the last chunk of a
    batch that the chunk size does not divide has another size, and there it is caught).
    """
    if len(values) == 1:
        return values[0]
    if not has_aux:
        return torch.cat(list(values))

    def leaf(path: Any, *xs: Any) -> Any:
        if all(isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == n
               for x, n in zip(xs, sizes, strict=True)):
            return torch.cat(xs)
        if not any(isinstance(x, torch.Tensor) for x in xs) and _all_equal(xs):
            return xs[0]
        first = xs[0]
        got = f"shape {tuple(first.shape)}" if isinstance(first, torch.Tensor) else repr(first)
        raise ValueError(
            f"{fn}: with chunk_size, the aux at `{_tree.keystr(path)}` must have each chunk's "
            f"examples on axis 0 to be joined into the batch's, got {got} for a chunk of "
            f"{sizes[0]} examples: a statistic of each chunk (an accuracy, a mean) is not the "
            "batch's. Return it per example, or call without chunk_size")

    return torch.cat([v[0] for v in values]), _tree.map_with_path(leaf, *[v[1] for v in values])


def _traced(t: Any) -> Any:
    """A floating batch leaf as ``loss_fn`` sees it: the same memory, requiring grad.

    # NOTE [the batch requires grad]
    Inside ``loss_fn`` the engines must tell tensors computed from the batch from
    constants (NOTE [a table the size of the batch] in ``_engine``). Autograd does that
    for free: each floating batch leaf is handed to ``loss_fn`` as a detached alias that
    requires grad, so everything computed from it (``x / 255``, input dropout, noise
    added to the input) has a graph, which the rules read as the batch; only tensors made
    from constants (or from integer batch data, which cannot require grad) have none. The
    backward asks autograd for the rules' output edges alone, so no input gradient is
    computed. Autograd refuses some things a ``loss_fn`` may do to its plain batch: an
    in-place op on a batch argument (a leaf that requires grad), setting
    ``requires_grad`` on a view of one (Hugging Face's wav2vec 2.0 does, in training
    mode, for gradient checkpointing), ``x.numpy()``. So when ``loss_fn`` raises a
    ``RuntimeError`` on the traced batch, the call runs again with the batch plain,
    remembered per ``loss_fn`` (an error of ``loss_fn``'s own is raised from that run),
    and tensors made from it are told from constants as NOTE [a table the size of the
    batch] says.
    """
    if (isinstance(t, torch.Tensor) and t.is_floating_point() and not t.requires_grad
            and not t.is_inference()):
        return t.detach().requires_grad_()
    return t


def forward_losses(engine: Engine, loss_fn: Callable[..., Any], args: list[Any],
                   nums: Sequence[int], leaves: list[list[torch.Tensor]], defs: list[Any],
                   batch_size: int, has_aux: bool, fn: str, needs: str = "the fast method",
                   batched: Sequence[int] = ()) -> tuple[torch.Tensor, Any]:
    """Run ``loss_fn`` on ``engine``'s tracked parameters and check its per-example losses
    (shape ``(batch_size,)``, floating point); ``needs`` names the method in the error for a
    scalar loss, ``batched`` the arguments carrying the batch on axis 0 (the engine's
    ``batch_args``, read only when a rule needs them: NOTE [sequence-first inputs]). The forward of the hooks
    method and of ghost clipping."""
    caller_grad = torch.is_grad_enabled()  # NOTE [closed-over parameters] in _closure
    tracked = iter(engine.tracked())
    new_args = list(args)
    traced = not plain_batch(loss_fn)
    for i in batched:  # NOTE [the batch requires grad]
        new_args[i] = _tree.map(_traced, args[i]) if traced else args[i]
    engine.batch_args = [new_args[i] for i in batched]
    for i, group, treedef in zip(nums, leaves, defs, strict=True):
        new_args[i] = _tree.unflatten(treedef, [next(tracked) for _ in group])
    # NOTE: under torch.inference_mode() enable_grad alone records nothing (all zeros).
    with torch.inference_mode(False), torch.enable_grad():
        try:
            out = loss_fn(*new_args)
        except RuntimeError as e:
            if not traced:
                raise
            # NOTE [the batch requires grad]: run again with the batch plain, where an
            # error of loss_fn's own is raised again
            raise PlainBatch(str(e)) from None
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"{fn}: with has_aux=True, loss_fn must return a pair (losses, aux), "
                            f"got {type(out).__name__}")
        losses, aux = out
    else:
        losses, aux = out, None
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{fn}: loss_fn must return a tensor of per-example losses, got "
                        f"{type(losses).__name__}")
    warn_closed_over(loss_fn, losses, fn, caller_grad)
    if engine.is_tracked(losses):  # NOTE [derived parameters]: nothing batched in its graph
        raise Unsupported(f"the losses are computed from {engine.name(losses._fp_slot)} with no "
                          "op that shows which examples they belong to")
    if losses.dim() == 0:
        raise Unsupported(
            f"loss_fn returned a scalar; {needs} needs the per-example losses, a tensor "
            f"of shape ({batch_size},): return the unreduced loss (e.g. reduction='none') "
            "instead of its mean or sum")
    if tuple(losses.shape) != (batch_size,) or not losses.is_floating_point():
        raise ValueError(f"{fn}: loss_fn must return per-example losses of shape ({batch_size},) "
                         f"(floating point), got shape {tuple(losses.shape)} and dtype {losses.dtype}")
    return losses, aux


def _run_once(loss_fn: Callable[..., Any], args: list[Any], nums: Sequence[int],
              leaves: list[list[torch.Tensor]], defs: list[Any], names: _Names,
              batch_size: int, has_aux: bool, fn: str, batched: Sequence[int] = (),
              real: int | None = None, evidence: Any = None) -> tuple[Any, list[torch.Tensor]]:
    flat = [leaf for group in leaves for leaf in group]
    engine = Engine(flat, names, batch_size, RULES, fn, real=real, evidence=evidence)
    try:
        losses, aux = forward_losses(engine, loss_fn, args, nums, leaves, defs, batch_size,
                                     has_aux, fn, batched=batched)
        engine.backward(losses)
        engine.resolve_derived(merge)
    finally:
        engine.close()  # NOTE [tensors kept past their call] in _engine
    grads: list[Any] = [None] * len(flat)
    with torch.no_grad():
        for (kind, slot), parts in engine.parts.items():
            g = merge(kind, parts, flat[slot])
            grads[slot] = g if grads[slot] is None else grads[slot] + g
    for slot, p in enumerate(flat):
        if grads[slot] is None:
            grads[slot] = p.new_zeros(batch_size, *p.shape)
    aux = _tree.map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, aux)
    value = (losses.detach(), aux) if has_aux else losses.detach()
    return value, grads


def _call(call: Callable[..., Any], *args: Any) -> Any:
    return call(*args)


# NOTE [engines under torch.compile]
# The hooks and ghost engines hand ``loss_fn`` parameters of a tensor subclass whose
# ``__torch_function__`` records every use. Dynamo cannot trace that: under ``fp.jit``,
# ``per_sample_grads(method="hooks")`` and ``clipped_grad`` with any method but vmap
# (auto included) raised an InternalTorchDynamoError from inside the model. So under
# ``torch.compile`` those calls run eagerly, behind a graph break, with the method and
# numbers they have outside it; the rest of the compiled function stays compiled.
# ``fullgraph=True`` refuses the graph break, naming this reason. The wrapper that makes
# the break cannot be built while dynamo traces, so ``fp.jit`` builds it before
# (:func:`prepare_eager`); under a bare ``torch.compile`` a lazily decorated function
# whose name gives the reason makes the same break.
_REASON = ("fp's hooks and ghost engines (per-sample gradients, clipping) run eagerly under "
           "torch.compile: their tracked parameters are not traceable; method='vmap' traces")
_EAGER: list[Callable[..., Any]] = []  # made by prepare_eager: torch.compiler.disable imports dynamo
# Read here, not while dynamo traces: tracing ``inspect.signature`` is refused.
_DISABLE_TAKES_REASON = "reason" in inspect.signature(torch.compiler.disable).parameters
# What runs when dynamo traces a call before prepare_eager ran (``torch.compile`` of a
# function built before dynamo was imported): the same graph break, made by torch's lazy
# decorator (it imports dynamo on its first call). Dynamo's ``fullgraph=True`` error names
# only the function, so its name carries the reason.


def fp_hooks_and_ghost_engines_run_eagerly_under_compile_method_vmap_traces(
        call: Callable[..., Any], *args: Any) -> Any:
    return call(*args)


_LAZY_EAGER = torch._disable_dynamo(fp_hooks_and_ghost_engines_run_eagerly_under_compile_method_vmap_traces)


def prepare_eager() -> None:
    """Make the graph-break wrapper of NOTE [engines under torch.compile] now, outside any
    trace: creating it while dynamo traces is itself refused ("Call to
    torch.compiler.disable()"), so ``fullgraph=True`` could not name the reason."""
    if not _EAGER:
        if _DISABLE_TAKES_REASON:
            _EAGER.append(torch.compiler.disable(_call, reason=_REASON))
        else:  # torch < 2.12 has no reason argument
            _EAGER.append(torch.compiler.disable(_call))


def outside_compile(call: Callable[..., Any], *args: Any) -> Any:
    """``call(*args)``, run eagerly behind a graph break when dynamo is tracing (NOTE
    [engines under torch.compile]); a plain call otherwise."""
    if torch.compiler.is_compiling():
        return (_EAGER[0] if _EAGER else _LAZY_EAGER)(call, *args)
    return call(*args)


FAKE_REASON = ("the arguments are fake tensors (shapes only, as fp.eval_shape makes), which "
               "the engine cannot track; method='vmap' runs on them")


def fake_tensors(args: Sequence[Any]) -> bool:
    """Whether a tensor of ``args`` is a ``FakeTensor`` (``fp.eval_shape``): the engines
    wrap parameters in a tensor subclass, which a fake tensor refuses ("Creating a new
    Tensor subclass _Tracked but the raw Tensor object is already associated to a python
    object of type FakeTensor"), so such calls take vmap, whose shapes are the same."""
    fake = sys.modules.get("torch._subclasses.fake_tensor")  # never imported: none exist
    return fake is not None and any(isinstance(t, fake.FakeTensor) for t in _tree.leaves(list(args)))


def no_inference_tensors(args: Sequence[Any]) -> Sequence[Any]:
    """``args`` with tensors made under ``torch.inference_mode`` cloned into plain ones.

    # NOTE [inference tensors]
    The engines record autograd history of the parameters and the batch, which autograd
    refuses for inference tensors ("Inference tensors cannot be saved for backward"), so
    parameters or a batch made under ``torch.inference_mode()`` crashed the fast methods
    where ``vmap(grad)`` ran. Such leaves are cloned (outside inference mode) for the call;
    other arguments pass through as they are.
    """
    leaves = _tree.leaves(list(args))
    if not any(isinstance(t, torch.Tensor) and t.is_inference() for t in leaves):
        return args
    with torch.inference_mode(False):
        return tuple(_tree.map(lambda t: t.clone() if isinstance(t, torch.Tensor)
                               and t.is_inference() else t, a) for a in args)


def hooks_value_and_grad(
    loss_fn: Callable[..., Any], args: Sequence[Any], nums: Sequence[int], is_tuple: bool,
    batched: Sequence[int], has_aux: bool, chunk_size: int | None, fn: str,
) -> tuple[Any, Any]:
    """Per-example ``(values, grads)`` of ``loss_fn`` with the engine (see ``_engine``).

    ``loss_fn(*args)`` must return per-example losses of shape ``(B,)`` (or
    ``(losses, aux)``); ``nums`` are the differentiated positions, ``batched`` those whose
    tensor leaves carry the batch on axis 0. Raises :class:`Unsupported` when the model
    uses a parameter in a way no rule covers.
    """
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise Unsupported("the fast method cannot run inside a torch.func transform")
    if fake_tensors(args):
        raise Unsupported(FAKE_REASON)
    from functorch_pipeline.transforms._autodiff import _check_diff_leaves

    args = no_inference_tensors(args)  # NOTE [inference tensors]

    leaves, defs = [], []
    for i in nums:
        group, treedef = _tree.flatten(args[i])
        if not all(isinstance(leaf, torch.Tensor) and leaf.is_floating_point() for leaf in group):
            _check_diff_leaves(args[i], i, fn)  # raises, naming the path, unless complex
            raise Unsupported("complex parameters have no per-sample gradient rules")
        leaves.append(group)
        defs.append(treedef)
    names = _Names(args, nums)
    batch_size = _batch_size(args, batched, fn)

    def once(chunk: Sequence[Any], n: int) -> tuple[Any, list[torch.Tensor]]:
        def run(padded: list[Any], size: int, evidence: Any) -> tuple[Any, list[torch.Tensor]]:
            return _run_once(loss_fn, padded, nums, leaves, defs, names, size, has_aux, fn,
                             batched, real=n, evidence=evidence)

        # NOTE [padding an ambiguous batch] (in _padding): rows past n are padding.
        (v, f), extra = run_unambiguous(run, loss_fn, chunk, batched, n, has_aux, fn)
        if extra:
            v, f = v[:n], [g[:n] for g in f]
        return v, f

    if chunk_size is None or chunk_size >= batch_size:
        value, flat = once(args, batch_size)
    else:
        starts = range(0, batch_size, chunk_size)
        sizes = [min(chunk_size, batch_size - start) for start in starts]

        def work(start: int) -> tuple[Any, list[torch.Tensor]]:
            def cut(x: Any) -> Any:
                return x[start:start + chunk_size] if isinstance(x, torch.Tensor) else x
            chunk = [_tree.map(cut, a) if i in batched else a for i, a in enumerate(args)]
            return once(chunk, min(chunk_size, batch_size - start))

        # NOTE [runs that change module state] in _state: each chunk from the call's state
        done = chunks_from_one_state([functools.partial(work, start) for start in starts],
                                     lambda: loss_fn(*args), Unsupported, fn)
        values, flats = [v for v, _ in done], [f for _, f in done]
        flat = [torch.cat(gs) for gs in zip(*flats, strict=True)]
        value = join_chunks(values, sizes, has_aux, fn)  # NOTE [aux over chunks]
    # NOTE [autocast] (in _engine): under torch.autocast the rules' products come out in
    # the autocast dtype, with the values autograd computes there; autograd then casts
    # each gradient back to its parameter's dtype, and so does this.
    params = [leaf for group in leaves for leaf in group]
    flat = [g if g.dtype == p.dtype else g.to(p.dtype) for g, p in zip(flat, params, strict=True)]
    it = iter(flat)
    trees = tuple(_tree.unflatten(d, [next(it) for _ in group]) for d, group in zip(defs, leaves, strict=True))
    return value, (trees if is_tuple else trees[0])
