"""Running the hooks and ghost engines on a batch padded past an ambiguous size.

# NOTE [padding an ambiguous batch]
The engines find the examples by size (NOTE [which axis is the batch] in ``_engine``):
axis 0 must have size ``B`` and no other axis that could hold the examples may have it
too. A sequence model whose length equals the batch size (token ids ``(B, T)`` or
activations ``(B, T, E)`` with ``T == B``: batch 32 of length-32 sequences) is ambiguous
by that test, so hooks refused it and ``auto`` fell back to ``vmap`` (3-5x slower, and
B per-example gradients in memory for clipping). The drivers now run such a batch again
with ``extra`` copies of its first example appended to every batched argument: at size
``B + extra`` an axis that holds the examples grows with the padding and a sequence
axis does not, so the rules see which is which. The copies' rows are then dropped
(per-example gradients, values and norms) and their clip factors set to 0 (the clipped
sum), so they change nothing: each example's loss depends on that example alone, the
engines' contract. An axis that grows with the batch but is not the examples' (a
``(B, B)`` matrix of pairs) stays ambiguous at every size, so after ``_MAX_EXTRA``
sizes the original error stands and ``auto`` falls back as before. The padding must not
move the blind spot of that NOTE (an input with no batch axis whose first axis has the
batch size) to the padded size: in a padded run an input taken as examples on axis 0 must
require grad (computed from the rules' batched outputs) or repeat its first row in the
padding rows, as everything computed example by example from the padded batch does (the
batch itself, an LSTM's zero initial state); a table of the padded length does not, and
is refused. Such a tensor made without a graph must also keep, in its first rows, the rows
the unpadded run had: a statistic over the batch (integer pixels standardised by the
batch's mean) repeats its first row in the padding too, and is refused by that (NOTE [a
statistic with no graph] in ``_engine``). ``has_aux`` is not padded: the engines return ``aux`` for the whole batch, which the copies would enter
(a padded run only answers NOTE [a table the size of the batch] in ``_engine`` for it).
An expand of a parameter to the batch size (a class token) is proven the same way, by
:class:`Evidence`: it is over the examples only if its size equalled the batch size in
every run that reached it, at least two of different sizes (a random search found an
``expand(3, ...)`` of a weight taken for the examples when a batch of 2 ran padded to 3).
Runs stopped early by another ambiguity count for the expands they reached. A padded run
that meets an expand no earlier run has seen goes on, taking it as over the examples for
now, so that one run logs every expand and the next decides them all; the run itself is
then discarded (as ambiguous, whatever it returned or refused after that expand). A model
with many expands (a bias expanded over the batch in every layer) needed a run per expand
before, and fell back to ``vmap`` past four. The padding that worked, and those
decisions, are remembered per ``loss_fn`` and input shapes, so later calls skip the
refused forward. Costs: ``extra / B`` more work, and a copy of the batch. In a padded run
the padding examples draw the first example's random numbers (NOTE [random draws in a
padded run] in ``_same_draws``), so that training-mode dropout does not defeat the proofs.
"""

from __future__ import annotations

import contextvars
import dataclasses
import weakref
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch

from functorch_pipeline import tree as _tree
from functorch_pipeline.transforms._grad_sample._engine import Ambiguous
from functorch_pipeline.transforms._grad_sample._engine import PlainBatch
from functorch_pipeline.transforms._grad_sample._engine import Unproven
from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._engine import rng_states
from functorch_pipeline.transforms._grad_sample._same_draws import SameDraws
from functorch_pipeline.transforms._grad_sample._state import Snapshot

__all__ = ["Evidence", "pad_batch", "plain_batch", "run_unambiguous"]

_MAX_EXTRA = 4


@dataclasses.dataclass
class _Remembered:
    """What the runs of an earlier call with the same shapes showed (per ``loss_fn``)."""

    extra: int  # padding rows that worked (0: none was needed)
    expands: list[int]  # Evidence.made: expand decisions, in call order
    rows: dict[Any, bool]  # Evidence.rows_made: NOTE [a table the size of the batch]
    draws: bool  # whether the padded run needs SameDraws
    unpadded: bool | None  # whether an unpadded run with these answers works (None: untried)
    why: str  # the first run's refusal


_EXTRA: weakref.WeakKeyDictionary[Any, dict[Any, _Remembered]] = weakref.WeakKeyDictionary()
# NOTE [the batch requires grad] in _api: loss_fns that change their batch arguments in a
# way autograd refuses for a tensor that requires grad, so the batch is handed plain
# (remembered per loss_fn; during the retry of a call, by `plain_now`).
_PLAIN: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
plain_now: contextvars.ContextVar[bool] = contextvars.ContextVar("fp_plain_batch", default=False)
# NOTE [rows reordered inside loss_fn] in _row_order: per loss_fn and input shapes, the
# autograd node names at the rule inputs of a run whose walks found nothing; later calls
# whose inputs show the same names skip the walks.
_WALKED: weakref.WeakKeyDictionary[Any, dict[Any, tuple[str, ...]]] = weakref.WeakKeyDictionary()


def plain_batch(loss_fn: Any) -> bool:
    """Whether ``loss_fn``'s batch is handed to it plain (NOTE [the batch requires grad]
    in ``_api``)."""
    if plain_now.get():
        return True
    try:
        return _PLAIN.get(getattr(loss_fn, "__func__", loss_fn), False)
    except TypeError:  # not weak-referenceable
        return False


def pad_batch(args: Sequence[Any], batched: Sequence[int], extra: int) -> list[Any]:
    """``args`` with ``extra`` copies of the first example appended on axis 0 of every
    tensor leaf of the ``batched`` arguments.

    Args:
      args: the call's positional arguments.
      batched: the positions whose tensor leaves carry the batch on axis 0.
      extra: how many rows to append (>= 1).

    Returns:
      A new argument list; the other arguments are passed through.

    Example:
      >>> pad_batch([torch.zeros(1), torch.tensor([[1, 2], [3, 4]])], (1,), 1)[1]
      tensor([[1, 2],
              [3, 4],
              [1, 2]])
    """
    def pad(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        return torch.cat([x, x[:1].expand(extra, *x.shape[1:])])

    return [_tree.map(pad, a) if i in batched else a for i, a in enumerate(args)]


class Evidence:
    """What the runs of one call have shown about expands over the batch (NOTE [padding an
    ambiguous batch]): an expand of a parameter to the batch size is the examples' axis
    only if its size followed the batch's across runs of different sizes.

    Attributes:
      runs: the earlier runs of this call, each ``(leading sizes of its expands in call
        order, its batch size)``; a run stopped early lists only the expands it reached.
      decisions: remembered decisions (rows per example, 0 for an expand not over the
        batch, by call order) of an earlier call with the same shapes, or None.
      log, made: this run's leading sizes and decisions, in call order.
      rows, rows_made: answers about inputs (NOTE [a table the size of the batch] and
        NOTE [rows reordered inside loss_fn]): an earlier call's, and this run's.
      seen: rows of inputs whose order is unproven, shared by the runs of one call.
      known, names, walk_found: NOTE [rows reordered inside loss_fn]: the node names at
        the rule inputs of an earlier run whose walks found nothing (None: walk them all),
        this run's, and whether a walk of this run found anything.
    """

    def __init__(self, runs: list[tuple[list[int], int]] | None = None,
                 decisions: list[int] | None = None,
                 rows: dict[Any, bool] | None = None,
                 seen: dict[Any, torch.Tensor] | None = None,
                 known: tuple[str, ...] | None = None) -> None:
        self.runs = runs or []
        self.decisions = decisions
        self.log: list[int] = []
        self.made: list[int] = []
        self.pending: str | None = None  # why this run cannot be the answer (see below)
        # whether rows past the examples failed to repeat the first example's in this run
        # (Engine.padding_rows_repeat): draws of a user's torch.Generator, maybe
        self.unrepeated = False
        # NOTE [a table the size of the batch] in _engine: a padded run's answers for
        # tensors made without a graph, (op, other axes, dtype, occurrence) -> whether axis
        # 0 holds the examples; `rows` holds an earlier padded run's, for an unpadded run
        # (and, for NOTE [rows reordered inside loss_fn] in _row_order, for a padded one).
        self.rows = rows
        self.rows_made: dict[Any, bool] = {}
        self._count: dict[Any, int] = {}
        # NOTE [rows reordered inside loss_fn] in _row_order: the rows of inputs whose
        # order a run of this call could not show, by (signature, occurrence), shared by
        # the call's runs; a later (padded) run compares its first rows with them.
        self.seen: dict[Any, torch.Tensor] = {} if seen is None else seen
        self._seen_count: dict[Any, int] = {}
        self.known = known
        self.names: list[str] = []
        self.walk_found = False
        # the mode giving the padding examples the first example's draws, when this run
        # has one (NOTE [random draws in a padded run] in _same_draws)
        self.same_draws: SameDraws | None = None

    def _next(self, sig: Any, count: dict[Any, int] | None = None) -> Any:
        count = self._count if count is None else count
        k = count.get(sig, 0)
        count[sig] = k + 1
        return (*sig, k)

    def occurrence(self, sig: Any) -> Any:
        """The key of this run's next input of signature ``sig`` (each one counts, whatever
        its walk found) for :meth:`earlier_rows` and :attr:`seen`."""
        return self._next(sig, self._seen_count)

    def earlier_rows(self, key: Any, rows: torch.Tensor) -> torch.Tensor | None:
        """The rows that an earlier run of this call kept for the input ``key`` (from
        :meth:`occurrence`) whose order is unproven, or None after keeping ``rows`` for a
        later run."""
        if key in self.seen:
            return self.seen[key]
        self.seen[key] = rows
        return None

    def note_rows(self, sig: Any, rows: bool) -> None:
        """Record a padded run's answer for the next tensor of signature ``sig``."""
        self.rows_made[self._next(sig)] = rows

    def rows_for(self, sig: Any) -> bool | None:
        """The remembered answer for the next tensor of signature ``sig``, or None."""
        return None if self.rows is None else self.rows.get(self._next(sig))

    def batch_expand(self, size: int, batch: int) -> int:
        """How many rows per example this run's next expand, to leading size ``size`` in a
        batch of ``batch``, makes: 1 over the examples, ``m`` for ``m`` rows per example
        (NOTE [examples merged into axis 0] in ``_engine``), 0 when it is not over them;
        raises :class:`Ambiguous` when only another run can tell."""
        i = len(self.log)
        self.log.append(size)
        seen = [(log[i], b) for log, b in self.runs if i < len(log)]  # each run its own size
        if batch == 1:
            # A single example: every row is its own, whatever the layout, so its gradient
            # is the sum of the rows' either way.
            made = size
        elif self.decisions is not None and i < len(self.decisions):
            m = self.decisions[i]
            made = m if m and size == m * batch else 0
        elif size % batch or any(s * batch != size * b for s, b in seen):
            made = 0  # it did not follow the batch
        elif seen:
            made = size // batch  # a multiple of the batch size, the same at two sizes or more
        else:
            why = (f"a parameter is expanded to {size} rows, a multiple of the batch size "
                   f"{batch}, which does not show whether they hold the examples")
            if not self.runs:  # the caller's own run: stop here, a padded one follows
                raise Ambiguous(why)
            # A padded run goes on, taking it as over the examples for now, so that it
            # reaches (and logs) every later expand too: the next run then decides them all,
            # rather than one expand a run (NOTE [padding an ambiguous batch]).
            self.pending = self.pending or why
            made = size // batch
        self.made.append(made)
        return made

    def settled(self, run: Callable[[], Any]) -> Any:
        """``run()``, or :class:`Ambiguous` when this run took an expand as over the
        examples without proof (its result, or a refusal met after it, is not the answer:
        another run decides)."""
        try:
            out = run()
        except Unsupported as e:
            if self.pending is not None and not isinstance(e, Ambiguous):
                raise Ambiguous(f"{self.pending} (and then: {e})") from e
            raise
        if self.pending is not None:
            raise Ambiguous(self.pending)
        return out


def _padded(run: Callable[[list[Any], int, Evidence], Any], args: Sequence[Any],
            batched: Sequence[int], size: int, extra: int, evidence: Callable[[], Evidence],
            draws: bool) -> tuple[Any, bool, Evidence]:
    """``run`` on the batch padded by ``extra`` rows: ``(result, draws, evidence used)``.
    With ``draws`` under :class:`SameDraws`; else plainly first, and again under it when
    that run failed having drawn random numbers from PyTorch's global generators, or on
    rows that did not repeat the first example's (which draws from a ``torch.Generator``
    of the user's can cause, unseen by the global state) (NOTE [random draws in a padded
    run]: the mode costs every op a Python call, a quarter of a small transformer's
    padded call, so a model that draws nothing never pays it)."""
    padded = pad_batch(args, batched, extra)
    if not draws:
        before = rng_states()
        try:
            ev = evidence()
            return ev.settled(lambda: run(padded, size + extra, ev)), False, ev
        except Unsupported:
            after = rng_states()
            if ev.pending is not None or (not ev.unrepeated and all(
                    torch.equal(a, b) for a, b in zip(before, after, strict=True))):
                raise  # undecided expands (another run follows), or nothing drawn
    ev = evidence()
    ev.same_draws = SameDraws(size, size + extra)
    with ev.same_draws:
        return ev.settled(lambda: run(padded, size + extra, ev)), True, ev


def _per_fn(table: weakref.WeakKeyDictionary[Any, dict[Any, Any]], loss_fn: Any) -> dict[Any, Any]:
    """``loss_fn``'s entry of ``table`` (``_EXTRA``, ``_WALKED``), made on first use; a fresh
    dict, so nothing is remembered, when ``loss_fn`` is not weak-referenceable."""
    try:
        return table.setdefault(getattr(loss_fn, "__func__", loss_fn), {})
    except TypeError:
        return {}


def _note_walks(walked: dict[Any, tuple[str, ...]], key: Any, ev: Evidence) -> None:
    """Remember a run's node names for ``key`` when its walks found nothing, else forget."""
    if ev.walk_found:
        walked.pop(key, None)
    else:
        walked[key] = tuple(ev.names)


def _key(args: Sequence[Any], batched: Sequence[int]) -> Any:
    return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x)
                 for i in batched for x in _tree.leaves(args[i]))


def run_unambiguous(run: Callable[[list[Any], int, Evidence], Any], loss_fn: Any,
                    args: Sequence[Any], batched: Sequence[int], size: int,
                    has_aux: bool, fn: str = "the fast method") -> tuple[Any, int]:
    """``run(args, size, evidence)``, or, when an op's batch axis is ambiguous at this size,
    ``run`` on the batch padded by ``extra`` rows (NOTE [padding an ambiguous batch]).
    Run again with the batch handed plain when ``loss_fn`` changes a batch argument in a
    way autograd refuses once it requires grad (NOTE [the batch requires grad] in
    ``_api``), which is then remembered for ``loss_fn``. Module buffers changed by a run
    that is not the answer are put back (NOTE [runs that change module state] in
    ``_state``), also when the call is refused.

    Args:
      run: one engine pass, ``run(args, batch_size, evidence)`` (:class:`Evidence`, read
        by the expand rule).
      loss_fn: the user's function (the remembered padding hangs on it).
      args: the call's arguments; ``batched``: the positions carrying the batch.
      size: the batch size of ``args``.
      has_aux: whether ``loss_fn`` returns ``(losses, aux)``: its result is never
        padded; a padded run may give answers about tables (NOTE [a table the size of
        the batch] in ``_engine``) for an unpadded run.
      fn: the API's name, for errors.

    Returns:
      ``(result, extra)``: the result's first ``size`` rows are the batch's; ``extra``
      rows follow (0 when no padding was needed).

    Raises:
      Ambiguous: the batch stays ambiguous at every size tried, or ``has_aux``.
      Unsupported: another refusal, met past the ambiguous op (its message says both).

    Example:
      >>> run = lambda a, n, evidence: (a[0].sum(1), n)
      >>> run_unambiguous(run, run, [torch.ones(2, 3)], (0,), 2, False)
      ((tensor([3., 3.]), 2), 0)
    """
    with Snapshot() as snapshot:  # NOTE [runs that change module state] in _state
        try:  # each run from the state before the call's first
            out, extra = _plain_again(snapshot.each_from_here(run, fn), loss_fn, args, batched,
                                      size, has_aux)
        except Unsupported:
            snapshot.restore(fn)  # the caller runs the call again another way
            raise
        if extra and snapshot.changed():
            # The answer's run was padded: its state changes came from the padded batch.
            snapshot.restore(fn)
            with torch.no_grad():
                loss_fn(*args)
        return out, extra


def _plain_again(run: Callable[[list[Any], int, Evidence], Any], loss_fn: Any,
                 args: Sequence[Any], batched: Sequence[int], size: int,
                 has_aux: bool) -> tuple[Any, int]:
    """:func:`_run_unambiguous`, and once more with the batch handed plain when it raised
    :class:`PlainBatch`."""
    try:
        return _run_unambiguous(run, loss_fn, args, batched, size, has_aux)
    except PlainBatch:
        if plain_now.get():
            raise
        try:
            _PLAIN[getattr(loss_fn, "__func__", loss_fn)] = True
        except TypeError:  # not weak-referenceable: plain for this call only
            pass
        token = plain_now.set(True)
        try:
            return _run_unambiguous(run, loss_fn, args, batched, size, has_aux)
        finally:
            plain_now.reset(token)


def _run_unambiguous(run: Callable[[list[Any], int, Evidence], Any], loss_fn: Any,
                     args: Sequence[Any], batched: Sequence[int], size: int,
                     has_aux: bool) -> tuple[Any, int]:
    """One attempt of :func:`run_unambiguous` with the batch as ``forward_losses`` hands it."""
    cache, walked = _per_fn(_EXTRA, loss_fn), _per_fn(_WALKED, loss_fn)
    # no flattening while nothing was padded or walked
    key = _key(args, batched) if cache or walked else None
    known = walked.get(key) if walked else None  # NOTE [rows reordered inside loss_fn] in _row_order
    rem = cache.get(key) if cache else None
    if rem is not None and rem.unpadded is not False:
        try:
            ev = Evidence(decisions=rem.expands, rows=rem.rows, known=known)
            out = run(list(args), size, ev)
        except Ambiguous:
            if rem.unpadded or not rem.extra:
                del cache[key]  # the model changed since: start again from the unpadded call
                rem = None
            else:
                rem.unpadded = False  # these shapes need the padding every call
        else:
            rem.unpadded = True
            _note_walks(walked, key, ev)
            return out, 0
    if rem is not None:
        if has_aux:
            raise Ambiguous(rem.why)
        expands, rem_rows = rem.expands, rem.rows
        try:
            out, rem.draws, ev = _padded(
                run, args, batched, size, rem.extra,
                lambda: Evidence(decisions=expands, rows=rem_rows, known=known), rem.draws)
            _note_walks(walked, key, ev)
            return out, rem.extra
        except Ambiguous:
            del cache[key]  # the model changed since: start again from the unpadded call
    evidence = Evidence(known=known)
    seen = evidence.seen  # NOTE [rows reordered inside loss_fn] in _row_order
    try:
        out = run(list(args), size, evidence)
    except Ambiguous as error:
        if has_aux and not isinstance(error, Unproven):
            raise
        first = error
    else:
        key = _key(args, batched) if key is None else key
        if evidence.made:  # expands decided: remember them for these shapes
            cache[key] = _Remembered(0, evidence.made, {}, False, True, "")
        _note_walks(walked, key, evidence)
        return out, 0
    if key is None:
        key = _key(args, batched)
    runs = [(evidence.log, size)]
    for extra in range(1, _MAX_EXTRA + 1):
        tried: list[Evidence] = []

        def fresh(tried: list[Evidence] = tried) -> Evidence:
            tried.append(Evidence(list(runs), seen=seen))
            return tried[-1]

        try:
            out, draws, evidence = _padded(run, args, batched, size, extra, fresh, False)
        except Ambiguous as still:
            runs.append((tried[-1].log, size + extra))
            last = still
            continue
        except Unsupported as other:  # past the ambiguous op, something else is refused
            raise type(other)(f"{first}; padded to {size + extra} examples to tell the axes "
                              f"apart, the call was refused anyway: {other}") from None
        # Later calls try the padded run's answers unpadded when all the first run lacked
        # was an answer about a tensor made without a graph (NOTE [a table the size of the
        # batch] in _engine); other ambiguities need the padding every call.
        rem = cache[key] = _Remembered(extra, evidence.made, evidence.rows_made, draws,
                                       None if isinstance(first, Unproven) else False, str(first))
        if not has_aux:
            return out, extra
        try:  # has_aux is never padded: the padded run gave the answers, this one the result
            value = run(list(args), size, Evidence(decisions=rem.expands, rows=rem.rows))
        except Ambiguous as still:
            rem.unpadded = False
            raise Ambiguous(f"{first}; with has_aux=True the call cannot run padded, and "
                            f"unpadded it stays ambiguous: {still}") from None
        rem.unpadded = True
        return value, 0
    if str(last) == str(first):
        raise first
    raise Ambiguous(f"{first}; padded to {size + _MAX_EXTRA} examples: {last}") from None
