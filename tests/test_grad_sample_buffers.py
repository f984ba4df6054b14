"""NOTE [recycled outputs]: the hooks method reuses a returned per-example gradient buffer
only when nothing can reach it any more; values always equal a fresh computation."""

from __future__ import annotations

import torch
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline.transforms._grad_sample import _buffers


def _setup():
    torch.manual_seed(0)
    m = nn.Linear(64, 32)  # (B, 32, 64) float32 per-example weights: 2 MB at B = 256
    p = {k: v.detach() for k, v in m.named_parameters()}

    def loss(p, x):
        return torch.func.functional_call(m, p, (x,)).pow(2).sum(1)

    return fp.per_sample_grads(loss, method="hooks"), p, loss


def _reference(loss, p, x):
    return torch.stack([torch.func.grad(lambda p, i=i: loss(p, x[i:i + 1]).sum())(p)["weight"]
                        for i in range(x.shape[0])])


def test_a_dropped_result_is_reused_and_a_held_one_never_is():
    _buffers.release()
    f, p, loss = _setup()
    x1, x2, x3 = (torch.randn(256, 64) for _ in range(3))
    g1 = f(p, x1)["weight"]
    snapshot = g1.clone()
    g2 = f(p, x2)["weight"]  # g1 is held: a new buffer
    assert g2.data_ptr() != g1.data_ptr() and torch.equal(g1, snapshot)
    ptr = g1.data_ptr()
    del g1
    g3 = f(p, x3)["weight"]  # g1's buffer is free now: reused, with the right values
    assert g3.data_ptr() == ptr
    assert torch.allclose(g3, _reference(loss, p, x3), atol=1e-5)
    assert torch.allclose(g2, _reference(loss, p, x2), atol=1e-5)
    _buffers.release()


def test_views_and_autograd_saved_tensors_keep_a_buffer_alive():
    _buffers.release()
    f, p, _ = _setup()
    x = torch.randn(256, 64)
    out = f(p, x)
    row = out["weight"][3]  # a view of the buffer
    row_before = row.clone()
    first = out["weight"][0].clone()
    w = torch.ones(32, 64, requires_grad=True)
    saved = out["weight"][0].mul(w).sum()  # autograd saves the (view of the) buffer for backward
    g = out["weight"]
    ptr = g.data_ptr()
    del out, g
    for _ in range(2):
        assert f(p, torch.randn(256, 64))["weight"].data_ptr() != ptr
    assert torch.equal(row, row_before)
    (gw,) = torch.autograd.grad(saved, [w])
    assert torch.equal(gw, first)  # the saved tensor was not overwritten
    _buffers.release()


def test_small_outputs_and_release():
    _buffers.release()
    m = nn.Linear(3, 2)
    p = {k: v.detach() for k, v in m.named_parameters()}
    fp.per_sample_grads(lambda p, x: torch.func.functional_call(m, p, (x,)).sum(1), method="hooks")(
        p, torch.randn(4, 3))
    assert not _buffers._POOL  # below _MIN_BYTES: nothing kept
    f, p, _ = _setup()
    f(p, torch.randn(256, 64))
    assert _buffers._POOL
    _buffers.release()
    assert not _buffers._POOL


def test_the_free_count_is_measured_on_this_interpreter(monkeypatch):
    """The reference count of an unreachable pooled buffer is CPython-version dependent
    (5 on 3.10, 4 on 3.11-3.13): it is measured at import, and an implausible measurement
    turns reuse off (every call allocates) instead of risking a held buffer."""
    import sys

    pool = [torch.empty(0)]
    for i in range(len(pool)):  # the statements take() runs
        t = pool[i]
        n = _buffers._refcount(t)
    assert _buffers._REFS_WHEN_FREE == n
    assert n == (5 if sys.version_info < (3, 11) else 4) or sys.version_info >= (3, 14)

    _buffers.release()
    monkeypatch.setattr(_buffers, "_REFS_WHEN_FREE", None)
    f, p, loss = _setup()
    x1, x2 = torch.randn(256, 64), torch.randn(256, 64)
    g1 = f(p, x1)["weight"]
    ptr = g1.data_ptr()
    del g1  # free, but reuse is off: the pool keeps it alive, so the next result is new
    g2 = f(p, x2)["weight"]
    assert g2.data_ptr() != ptr
    assert torch.allclose(g2, _reference(loss, p, x2), atol=1e-5)
    _buffers.release()


def test_threads_share_the_pool_safely(monkeypatch):
    """Calls from several threads share the pool. A scan interrupted by another thread's
    removal or eviction used to raise IndexError: the delay injected into the reference
    count (re-measured, so reuse still happens) makes that interleaving likely; without the
    pool's lock this test fails."""
    import threading
    import time

    counted = _buffers._refcount

    def slow(t):
        n = counted(t)
        time.sleep(1e-4)  # another thread runs here
        return n

    _buffers.release()
    monkeypatch.setattr(_buffers, "_refcount", slow)
    monkeypatch.setattr(_buffers, "_REFS_WHEN_FREE", _buffers._calibrate())
    like = torch.empty(1)
    errors, reused = [], []
    seen = set()

    def work(value):
        try:
            for _ in range(100):
                t = _buffers.take((512, 512), like)
                reused.append(t.data_ptr() in seen)
                seen.add(t.data_ptr())
                t.fill_(value)
                time.sleep(0)
                if not bool((t == value).all()):  # no other thread wrote into it meanwhile
                    errors.append(f"buffer shared with another thread (value {value})")
                _buffers.keep(t)
                del t
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(float(i),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]
    assert any(reused)  # buffers were recycled across calls and threads
    pool = _buffers._POOL[((512, 512), torch.float32, torch.device("cpu"))]
    assert len({id(t) for t in pool}) == len(pool) <= _buffers._PER_KEY
    _buffers.release()


def test_per_sample_grads_from_several_threads_match_the_reference():
    """The hooks method from 4 threads at once (each with its own module: functional_call
    swaps a module's parameters, so a shared module is not thread-safe in torch.func
    either), recycling buffers: every result equals the per-example reference."""
    import threading

    _buffers.release()
    errors = []

    def work(seed):
        try:
            f, p, loss = _setup()
            g = torch.Generator().manual_seed(seed)
            for _ in range(5):
                x = torch.randn(256, 64, generator=g)
                got = f(p, x)["weight"]
                if not torch.allclose(got, _reference(loss, p, x), atol=1e-5):
                    errors.append(f"thread {seed}: wrong per-example gradients")
                del got
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[:3]
    _buffers.release()
