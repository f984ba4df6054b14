"""Undoing what a discarded run of ``loss_fn`` did to module buffers.

# NOTE [runs that change module state]
The fast methods may run ``loss_fn`` more than once in one call: a run refused as
ambiguous is run again padded (NOTE [padding an ambiguous batch] in ``_padding``), a
padded run that gave the answers is followed by an unpadded one (``has_aux``), and a
call refused by the engine falls back to ``vmap``. A model that updates its own state
in its forward (``spectral_norm`` in training mode advances its power iteration; a norm
layer with ``track_running_stats`` updates its running statistics) was then advanced
once per run: the gradient was taken at a state two or three steps on (0.27 with the
old ``spectral_norm`` on a batch of 4 against a ``Linear`` of 4 outputs, on the first
call per batch size), and a padded run left running statistics from copies of the first
example (2e-3).

So while a fast method runs, a global module forward pre-hook copies the buffers of each
module the call runs, and of its submodules (whose ``forward`` may be called directly),
the first time the call meets them (:class:`Snapshot`); before every run after the first,
and when the call is refused, the buffers that changed are written back. When the run
that gives the answer was padded and changed a buffer, the buffers are written back and
``loss_fn`` runs once more, plainly on the real batch under ``torch.no_grad()``, so the
state ends as one forward of the batch leaves it (one more forward on such calls only).
Chunks (``chunk_size``) each start from the call's state too, and a call whose chunks
changed a buffer ends with one such forward of the whole batch
(:func:`chunks_from_one_state`): chunking changes neither the gradients nor the state. A
buffer passed among the differentiated arguments is read through its stand-in.

Changes are found by comparing values, not version counters: ``batch_norm``'s kernel
updates its running statistics without bumping theirs. Copying every buffer on every call
cost a model with constant buffers (causal masks, rotary tables) twelve times its call,
so buffers over ``_ALWAYS_COPY_BYTES`` (64 KiB; running statistics and power-iteration
vectors are far smaller) are copied only the first time a call runs their module in its
current mode (``training``), and after that only those seen to change in a call; the
others are watched by their version counters. A change of a buffer that was not copied
(a large one that had not changed before, or one over ``_MAX_COPY_BYTES``) in a run that
is discarded cannot be undone and is an error naming it. Buffers on the ``meta`` device
hold no values and are skipped; an inference tensor has no version counter, and cannot
change where anything is differentiated. Not seen: state outside module
buffers (a tensor in a closure, a Python counter), and a buffer replaced by another
tensor (``self.mu = new``) rather than changed in place: ``functional_call`` swaps
buffers the same way, so the two cannot be told apart. Rows of a parameter that a lookup
with ``max_norm`` rescales in place are kept and written back the same way
(:meth:`Snapshot.keep_rows`, NOTE [max_norm renormalises the table] in ``_rules``).

The same hook refuses a module with parameters and a backward hook of the deprecated
``Module.register_backward_hook`` (or the global ``register_module_backward_hook``):
autograd runs it after the node of the module's last op, where it changes the gradients
that node passes on, its parameters' among them, which the engine never reads (it reads
the gradient arriving at the node: 1/3 of the loop's with a hook that triples them). On
a module without parameters (an activation) it changes only gradients that the engine
reads downstream, and is followed. ``register_full_backward_hook`` and its pre-hook act
on the module's inputs and outputs, which the engine follows.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any

import torch

from functorch_pipeline.transforms._grad_sample._engine import Unsupported
from functorch_pipeline.transforms._grad_sample._engine import _Tracked

__all__ = ["Snapshot", "StateLost", "chunks_from_one_state", "keep_rows"]

_MAX_COPY_BYTES = 1 << 24
_ALWAYS_COPY_BYTES = 1 << 16  # NOTE [runs that change module state]: small ones, every call
_ACTIVE: contextvars.ContextVar[tuple[Snapshot, ...]] = contextvars.ContextVar(
    "fp_state_snapshots", default=())
_LOCK = threading.Lock()
_HOOK: list[Any] = [None, 0, None]  # the global hooks' handles, how many snapshots use them
# NOTE [runs that change module state]: per module, the names of the buffers seen to change
# in a call, and the mode (training) they were seen in; only those are copied again.
_CHANGING: weakref.WeakKeyDictionary[torch.nn.Module, tuple[bool, frozenset[str]]] = (
    weakref.WeakKeyDictionary())


class StateLost(RuntimeError):
    """A discarded run changed a buffer that had not been copied."""


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


def _plain(t: torch.Tensor) -> torch.Tensor:
    """``t``, or the tensor a differentiated parameter's stand-in shares its storage with (a
    buffer passed in the differentiated arguments: the stand-in is new every run)."""
    if type(t) is torch.Tensor or not isinstance(t, _Tracked):
        return t
    return t._fp_engine.unwrap(t)


def _legacy_hooked(module: torch.nn.Module) -> bool:
    """Whether a backward hook of ``Module.register_backward_hook`` (the module's own, or
    the global ``register_module_backward_hook``) can change ``module``'s parameters'
    gradients: it runs on the node of the module's last op, a parameter's among them."""
    hooked = (module._backward_hooks and not module._is_full_backward_hook) or (
        torch.nn.modules.module._global_backward_hooks
        and not torch.nn.modules.module._global_is_full_backward_hook)
    return bool(hooked) and next(module.parameters(), None) is not None


def _see(module: torch.nn.Module, args: Any) -> None:
    active = _ACTIVE.get()
    if any(s.engine for s in active) and _legacy_hooked(module):
        raise Unsupported(
            f"a {type(module).__name__} has a backward hook registered with "
            "Module.register_backward_hook (or register_module_backward_hook), which "
            "changes the gradients of its last op's inputs, its parameters' among them, "
            "after the fast methods have read them; method='vmap' applies it (or register "
            "it with register_full_backward_hook, which the fast methods follow)")
    for snapshot in active:
        snapshot.see(module)
        snapshot.ran_ids.add(id(module))


def keep_rows(table: torch.Tensor, ids: torch.Tensor) -> None:
    """:meth:`Snapshot.keep_rows` of every snapshot open in this context."""
    for snapshot in _ACTIVE.get():
        snapshot.keep_rows(table, ids)


def _ran(module: torch.nn.Module, args: Any, out: Any) -> None:
    if module._buffers:
        for snapshot in _ACTIVE.get():
            snapshot.ran(module)


class Snapshot:
    """The buffers of the modules a call runs, as they were before its first run (NOTE
    [runs that change module state]); a context manager.

    Example:
      >>> bn = torch.nn.BatchNorm1d(2)
      >>> with Snapshot() as s:
      ...     _ = bn(torch.randn(4, 2))
      ...     s.restore()
      >>> bn.running_mean
      tensor([0., 0.])
    """

    def __init__(self, engine: bool = True) -> None:
        # whether the fast methods' engine runs under it (which refuses legacy module
        # backward hooks); vmap's chunks run under one too
        self.engine = engine
        self.ran_ids: set[int] = set()  # the modules called (a branch may not run)
        self._changing: set[int] = set()  # entries seen to differ from their copy
        self._modules: dict[int, torch.nn.Module] = {}  # held, so that ids stay unique
        # id(buffer) -> [buffer, version, copy or None, module, buffer name]
        self._entries: dict[int, list[Any]] = {}
        self._learn: list[torch.nn.Module] = []  # modules met without a record of changes
        self._held: dict[tuple[int, str], Any] = {}  # (module, name) -> the buffer when met
        # (module, name) -> (the buffer before, the tensor its forward put in its place)
        self._replaced: dict[tuple[int, str], tuple[torch.nn.Module, str, Any, Any]] = {}
        # NOTE [max_norm renormalises the table] in _rules: (table, row ids, the rows
        # before a lookup with max_norm rescaled them), in the order they were rescaled
        self._tables: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._token: Any = None

    def keep_rows(self, table: torch.Tensor, ids: torch.Tensor) -> None:
        """Keep rows ``ids`` of ``table`` as they are, before a lookup with ``max_norm``
        rescales them in place (NOTE [max_norm renormalises the table] in ``_rules``), for
        :meth:`restore` to put back."""
        with torch.no_grad():
            self._tables.append((table, ids, table.index_select(0, ids)))

    def _tables_changed(self) -> bool:
        return any(not torch.equal(t.index_select(0, ids), rows) for t, ids, rows in self._tables)

    def see(self, module: torch.nn.Module) -> None:
        """Copy the buffers of ``module`` and its submodules (a submodule's ``forward`` may
        be called directly) that may change, the first time this snapshot meets them."""
        modules = self._modules
        if id(module) in modules:
            return
        stack = [module]
        while stack:
            sub = stack.pop()
            if id(sub) in modules:
                continue
            modules[id(sub)] = sub
            if sub._modules:
                stack.extend(m for m in sub._modules.values() if m is not None)
            if not sub._buffers:
                continue
            try:
                seen = _CHANGING.get(sub)
            except TypeError:  # pragma: no cover - modules are weak-referenceable
                seen = None
            known = seen[1] if seen is not None and seen[0] == sub.training else None
            if known is None:
                self._learn.append(sub)
            for name, held in sub._buffers.items():
                if not isinstance(held, torch.Tensor):
                    continue
                self._held[(id(sub), name)] = held
                b = _plain(held)
                if id(b) in self._entries or b.device.type == "meta":  # meta: no values
                    continue
                size = b.numel() * b.element_size()
                copy = None
                if size <= _ALWAYS_COPY_BYTES or (
                        (known is None or name in known) and size <= _MAX_COPY_BYTES):
                    with torch.no_grad():
                        copy = b.detach().clone()
                self._entries[id(b)] = [b, _version(b), copy, sub, name]

    def ran(self, module: torch.nn.Module) -> None:
        """Note the buffers ``module``'s forward replaced by other tensors (``self.mu =
        new``), as they were when this snapshot met the module."""
        for name, b in module._buffers.items():
            key = (id(module), name)
            if key in self._replaced:
                before = self._replaced[key][2]
            else:
                before = self._held.get(key)
                if before is None or before is b:
                    continue
            self._replaced[key] = (module, name, before, b)

    def _changed(self, entry: list[Any]) -> bool:
        b, version, copy = entry[0], entry[1], entry[2]
        if copy is None:
            # an inference tensor has no version, and cannot be changed outside
            # inference mode (where nothing is differentiated)
            return version is not None and _version(b) != version
        if torch.equal(b, copy):
            return False
        self._changing.add(id(b))
        return True

    def changed(self) -> list[str]:
        """The buffers (``Class.name``) whose values differ from the snapshot, or that the
        module's forward replaced by another tensor."""
        return [f"{type(e[3]).__name__}.{e[4]}" for e in self._entries.values() if self._changed(e)] + [
            f"{type(m).__name__}.{n}" for m, n, _, after in self._replaced.values()
            if m._buffers.get(n) is after] + (
            ["rows of a table rescaled by max_norm"] if self._tables_changed() else [])

    def restore(self, fn: str = "the fast method") -> None:
        """Write back every buffer that changed; raises :class:`StateLost` for one that
        was not copied (over ``_MAX_COPY_BYTES``, or unchanged in the module's earlier
        calls)."""
        for module, name, before, after in self._replaced.values():
            # Still the forward's tensor: put the one it replaced back. (After a
            # functional_call that swapped it in, the module holds its own again.)
            if module._buffers.get(name) is after:
                module._buffers[name] = before
        self._replaced.clear()
        with torch.no_grad():  # the earliest copy of a row is written last
            for table, ids, rows in reversed(self._tables):
                table.index_copy_(0, ids, rows)
        self._tables.clear()
        for e in self._entries.values():
            if not self._changed(e):
                continue
            if e[2] is None:
                raise StateLost(
                    f"{fn}: loss_fn changed the buffer {e[4]!r} of a {type(e[3]).__name__} "
                    f"({tuple(e[0].shape)}) in a run of the fast method that had to be "
                    "discarded, and it was not copied (over "
                    f"{_MAX_COPY_BYTES} bytes, or unchanged in the module's earlier calls), "
                    "so it cannot be put back; method='vmap' runs loss_fn once")
            with torch.no_grad():
                e[0].copy_(e[2])
            e[1] = _version(e[0])

    def each_from_here(self, run: Callable[..., Any], fn: str = "the fast method") -> Callable[..., Any]:
        """``run``, with the buffers put back before every call after its first: each call
        starts from the state this snapshot keeps."""
        calls = 0

        def from_here(*args: Any) -> Any:
            nonlocal calls
            if calls:
                self.restore(fn)
            calls += 1
            return run(*args)

        return from_here

    def __enter__(self) -> Snapshot:
        with _LOCK:
            if _HOOK[1] == 0:
                _HOOK[0] = torch.nn.modules.module.register_module_forward_pre_hook(_see)
                _HOOK[2] = torch.nn.modules.module.register_module_forward_hook(_ran)
            _HOOK[1] += 1
        self._token = _ACTIVE.set((*_ACTIVE.get(), self))
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.reset(self._token)
        with _LOCK:
            _HOOK[1] -= 1
            if _HOOK[1] == 0:
                _HOOK[0].remove()
                _HOOK[2].remove()
                _HOOK[0] = _HOOK[2] = None
        for sub in self._learn:  # which buffers of the modules met for the first time changed
            if id(sub) not in self.ran_ids:  # not called (a branch): nothing learned
                continue
            names = frozenset(e[4] for e in self._entries.values() if e[3] is sub and e[2] is not None
                              and (id(e[0]) in self._changing or self._changed(e)))
            try:
                _CHANGING[sub] = (sub.training, names)
            except TypeError:  # pragma: no cover
                pass


def chunks_from_one_state(chunks: Sequence[Callable[[], Any]], whole: Callable[[], Any],
                          refusal: type[BaseException], fn: str = "the fast method") -> list[Any]:
    """Each of ``chunks`` run from the state before the first, under a :class:`Snapshot`;
    when they changed a buffer, the state put back and ``whole()`` (one forward of the whole
    batch under ``torch.no_grad()``) run, so that chunking changes neither the gradients
    nor the state the call leaves (NOTE [runs that change module state]). When a chunk
    raises ``refusal`` (a call the caller runs again another way) the state is put back.

    Args:
      chunks: the work of each chunk, run in order.
      whole: one plain forward of the whole batch.
      refusal: the exception type after which the state must be as before.
      fn: the API's name, for :class:`StateLost`'s message.

    Returns:
      The chunks' results, in order.

    Example:
      >>> bn = torch.nn.BatchNorm1d(1, momentum=None)
      >>> x = torch.tensor([[1.], [2.], [3.], [6.]])
      >>> _ = chunks_from_one_state([lambda: bn(x[:2]), lambda: bn(x[2:])], lambda: bn(x), KeyError)
      >>> bn.running_mean  # one forward of the whole batch, not the last chunk's
      tensor([3.])
    """
    with Snapshot() as snapshot:
        run = snapshot.each_from_here(lambda chunk: chunk(), fn)
        try:
            out = [run(chunk) for chunk in chunks]
        except refusal:
            snapshot.restore(fn)
            raise
        if len(out) > 1 and snapshot.changed():
            snapshot.restore(fn)
            with torch.no_grad():
                whole()
        return out
