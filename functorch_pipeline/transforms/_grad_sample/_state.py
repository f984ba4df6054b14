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
module the first time the call runs it (:class:`Snapshot`), and before every run after the
first, and when the call is refused, the buffers that changed are written back. When the
run that gives the answer was padded and changed a buffer, the buffers are written back
and ``loss_fn`` runs once more, plainly on the real batch under ``torch.no_grad()``, so the
state ends as one forward of the batch leaves it (one more forward on such calls only).
Changes are found by comparing values, not version counters: ``batch_norm``'s kernel
updates its running statistics without bumping theirs. Buffers larger than
``_MAX_COPY_BYTES`` are not copied; a change of one of them (seen by its version counter)
in a run that is discarded cannot be undone and is an error naming it. Not seen: state
outside module buffers (a tensor in a closure, a Python counter), modules whose
``forward`` is called directly rather than through ``module(...)``, and a buffer replaced
by another tensor rather than changed in place.

The same hook refuses a module with a backward hook of the deprecated
``Module.register_backward_hook``: autograd runs it after the node of the module's last
op, where it changes the gradients that node passes on, its parameters' among them, which
the engine never reads (it reads the gradient arriving at the node: 1/3 of the loop's with
a hook that triples them). ``register_full_backward_hook`` and its pre-hook act on the
module's inputs and outputs, which the engine follows.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable
from typing import Any

import torch

from functorch_pipeline.transforms._grad_sample._engine import Unsupported

__all__ = ["Snapshot", "StateLost"]

_MAX_COPY_BYTES = 1 << 24
_ACTIVE: contextvars.ContextVar[tuple[Snapshot, ...]] = contextvars.ContextVar(
    "fp_state_snapshots", default=())
_LOCK = threading.Lock()
_HOOK: list[Any] = [None, 0]  # the global hook's handle, and how many snapshots use it


class StateLost(RuntimeError):
    """A discarded run changed a buffer too large to have been copied."""


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return None


def _see(module: torch.nn.Module, args: Any) -> None:
    active = _ACTIVE.get()
    if active and module._backward_hooks and not module._is_full_backward_hook:
        raise Unsupported(
            f"a {type(module).__name__} has a backward hook registered with "
            "Module.register_backward_hook, which changes the gradients of its last op's "
            "inputs, including its parameters', after the fast methods have read them; "
            "method='vmap' applies it (or register it with register_full_backward_hook, "
            "which the fast methods follow)")
    for snapshot in active:
        snapshot.see(module)


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

    def __init__(self) -> None:
        self._modules: dict[int, torch.nn.Module] = {}  # held, so that ids stay unique
        # id(buffer) -> [buffer, version, copy or None, module class, buffer name]
        self._entries: dict[int, list[Any]] = {}
        self._token: Any = None

    def see(self, module: torch.nn.Module) -> None:
        """Copy ``module``'s own buffers, the first time this snapshot meets it."""
        if id(module) in self._modules:
            return
        self._modules[id(module)] = module
        for name, b in module._buffers.items():
            if isinstance(b, torch.Tensor) and id(b) not in self._entries:
                small = b.numel() * b.element_size() <= _MAX_COPY_BYTES
                with torch.no_grad():
                    copy = b.detach().clone() if small else None
                self._entries[id(b)] = [b, _version(b), copy, type(module).__name__, name]

    def _changed(self, entry: list[Any]) -> bool:
        b, version, copy = entry[0], entry[1], entry[2]
        if copy is None:
            return version is None or _version(b) != version
        return not torch.equal(b, copy)

    def changed(self) -> list[str]:
        """The buffers (``Class.name``) whose values differ from the snapshot."""
        return [f"{e[3]}.{e[4]}" for e in self._entries.values() if self._changed(e)]

    def restore(self, fn: str = "the fast method") -> None:
        """Write back every buffer that changed; raises :class:`StateLost` for one that
        was too large to copy."""
        for e in self._entries.values():
            if not self._changed(e):
                continue
            if e[2] is None:
                raise StateLost(
                    f"{fn}: loss_fn changed the buffer {e[4]!r} of a {e[3]} "
                    f"({tuple(e[0].shape)}: over {_MAX_COPY_BYTES} bytes, not copied) in "
                    "a run of the fast method that had to be discarded, so it cannot be put "
                    "back; method='vmap' runs loss_fn once")
            with torch.no_grad():
                e[0].copy_(e[2])
            e[1] = _version(e[0])

    def __enter__(self) -> Snapshot:
        with _LOCK:
            if _HOOK[1] == 0:
                _HOOK[0] = torch.nn.modules.module.register_module_forward_pre_hook(_see)
            _HOOK[1] += 1
        self._token = _ACTIVE.set((*_ACTIVE.get(), self))
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.reset(self._token)
        with _LOCK:
            _HOOK[1] -= 1
            if _HOOK[1] == 0:
                _HOOK[0].remove()
                _HOOK[0] = None


def undone_on_refusal(call: Callable[[], Any], refusal: type[BaseException],
                      fn: str = "the fast method") -> Any:
    """``call()`` under a :class:`Snapshot`; the buffers are written back when it raises
    ``refusal`` (a call the caller will run again another way).

    Args:
      call: the work, run once.
      refusal: the exception type after which the state must be as before.
      fn: the API's name, for :class:`StateLost`'s message.

    Returns:
      ``call()``'s result.

    Example:
      >>> bn = torch.nn.BatchNorm1d(2)
      >>> def step():
      ...     bn(torch.randn(4, 2))
      ...     raise KeyError("refused")
      >>> try:
      ...     undone_on_refusal(step, KeyError)
      ... except KeyError:
      ...     pass
      >>> bn.running_mean
      tensor([0., 0.])
    """
    with Snapshot() as snapshot:
        try:
            return call()
        except refusal:
            snapshot.restore(fn)
            raise
