"""Fast paths added for speed (issue 13) give the numbers of the paths they replace.

- ``fp.nn.LSTM`` / ``GRU`` / ``RNN`` fused kernels (NOTE [fused fast path]) against the
  same layers' per-step loop (``fused = False``) and against ``torch.nn``'s layers, outputs
  and gradients, float32 to 1e-6 and float64 to 1e-12.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn

import functorch_pipeline as fp

_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _pair(kind: str, dtype: torch.dtype, **kw):
    """The fp layer twice (fused and loop) with the same weights, and torch.nn's twin."""
    torch.manual_seed(0)
    ref = getattr(nn, kind)(**kw).to(dtype)
    fused, loop = getattr(fp.nn, kind)(**kw).to(dtype), getattr(fp.nn, kind)(**kw).to(dtype)
    fused.load_state_dict(ref.state_dict())
    loop.load_state_dict(ref.state_dict())
    loop.fused = False
    return fused, loop, ref


def _run(layer: nn.Module, x: torch.Tensor, hx):
    """Outputs and gradients of (weights, input, initial state) for a fixed random cotangent."""
    x = x.clone().requires_grad_()
    hx = None if hx is None else tuple(h.clone().requires_grad_() for h in hx)
    out, last = layer(x, hx if hx is None or len(hx) == 2 else hx[0])
    last = last if isinstance(last, tuple) else (last,)
    outs = (out, *last)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    inputs = [x, *list(layer.parameters()), *(hx or ())]
    grads = torch.autograd.grad(loss, inputs)
    return [o.detach() for o in outs] + list(grads), outs[0].grad_fn


@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(["LSTM", "GRU", "RNN"]), layers=st.integers(1, 2),
       bidirectional=st.booleans(), batch_first=st.booleans(), bias=st.booleans(),
       batched=st.booleans(), with_hx=st.booleans(), proj=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fused_equals_loop_and_torch(kind, layers, bidirectional, batch_first, bias, batched,
                                     with_hx, proj, dtype):
    kw = dict(input_size=3, hidden_size=5, num_layers=layers, bias=bias,
              batch_first=batch_first, bidirectional=bidirectional)
    if kind == "LSTM" and proj:
        kw["proj_size"] = 2
    fused, loop, ref = _pair(kind, dtype, **kw)
    torch.manual_seed(2)
    t, b = 4, 3
    x = torch.randn((b, t, 3) if batch_first else (t, b, 3), dtype=dtype)
    if not batched:
        x = x[0] if batch_first else x[:, 0]
    hx = None
    if with_hx:
        d = layers * (2 if bidirectional else 1)
        sizes = [kw.get("proj_size", 5), 5] if kind == "LSTM" else [5]
        hx = tuple(torch.randn((d, b, s) if batched else (d, s), dtype=dtype) for s in sizes)
    got, _ = _run(fused, x, hx)
    want, _ = _run(loop, x, hx)
    expect, _ = _run(ref, x, hx)
    for g, w, e in zip(got, want, expect, strict=True):
        torch.testing.assert_close(g, w, atol=_TOL[dtype], rtol=_TOL[dtype])
        torch.testing.assert_close(g, e, atol=_TOL[dtype], rtol=_TOL[dtype])


def test_fused_path_is_taken_outside_transforms_only():
    """Outside transforms the LSTM is one fused kernel node; under vmap, jvp, nested grad,
    or with ``fused = False`` it is the per-step loop (and still right)."""
    torch.manual_seed(0)
    lstm = fp.nn.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    assert "Rnn" in type(lstm(x)[0].grad_fn).__name__ or "Lstm" in type(lstm(x)[0].grad_fn).__name__
    params = dict(lstm.named_parameters())

    def f(p, xs):
        return torch.func.functional_call(lstm, p, (xs,))[0].sum()

    # nested grad (a Hessian-vector product) needs the loop's double backward
    v = {k: torch.randn_like(p) for k, p in params.items()}
    hvp = torch.func.jvp(lambda p: torch.func.grad(f)(p, x), (params,), (v,))[1]
    lstm.fused = False
    hvp_loop = torch.func.jvp(lambda p: torch.func.grad(f)(p, x), (params,), (v,))[1]
    for k in hvp:
        torch.testing.assert_close(hvp[k], hvp_loop[k], atol=1e-6, rtol=1e-6)
    lstm.fused = True
    # one grad level: fused, equal to the loop
    g = torch.func.grad(f)(params, x)
    lstm.fused = False
    g_loop = torch.func.grad(f)(params, x)
    for k in g:
        torch.testing.assert_close(g[k], g_loop[k], atol=1e-6, rtol=1e-6)
    # vmap over examples
    lstm.fused = True
    per = torch.func.vmap(lambda xi: f(params, xi.unsqueeze(1)))(x.transpose(0, 1))
    torch.testing.assert_close(per, torch.stack([f(params, x[:, i:i + 1]) for i in range(2)]))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_fused_dropout_uses_the_same_global_masks(kind):
    """Inter-layer dropout stays F.dropout on the loop's layout: same seed, same result."""
    fused, loop, _ = _pair(kind, torch.float64, input_size=3, hidden_size=4, num_layers=3,
                           dropout=0.5, bidirectional=True)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    torch.manual_seed(5)
    a = fused(x)[0]
    torch.manual_seed(5)
    b = loop(x)[0]
    torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_fused_under_keyed_dropout_apply_matches_loop(monkeypatch):
    """fp.functionalize's keyed dropout (a TorchFunctionMode) keeps the fused path and its
    keyed masks: the result equals the loop path's for the same key."""
    torch.manual_seed(0)
    lstm = fp.nn.LSTM(3, 4, num_layers=2, dropout=0.3, batch_first=True)
    model = fp.functionalize(lstm)
    variables = model.init(fp.random.key(0), torch.randn(2, 5, 3))
    x = torch.randn(2, 5, 3)
    k = fp.random.key(3)
    (a, _), _ = model.apply(variables, x, train=True, key=k)
    monkeypatch.setattr(fp.nn.LSTM, "fused", False)
    (b, _), _ = model.apply(variables, x, train=True, key=k)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not torch.equal(a, model.apply(variables, x)[0])  # dropout did act


def test_key_paths_compile_without_lru_cache_warning():
    """fp.tree's key-path cache is invisible to Dynamo: no warning, same paths as eager."""
    import warnings

    tree = {"a": torch.ones(2), "b": (torch.ones(3),)}

    def f(t):
        paths, leaves, _ = fp.tree.flatten_with_path(t)
        assert paths == [("a",), ("b", 0)]
        return sum(leaf.sum() for leaf in leaves)

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = torch.compile(f, backend="eager", fullgraph=False)(tree)
    assert out.item() == 5.0
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
    assert fp.tree.flatten_with_path(tree)[0] == [("a",), ("b", 0)]


def test_prefault_skips_resident_memory_and_populates_fresh(monkeypatch):
    """NOTE [prefault only fresh memory]: resident memory is not populated again; fresh
    (never touched) memory is; without mincore every large tensor is (the old rule)."""
    import mmap

    from functorch_pipeline.serialization import _prefault

    if _prefault._madvise is None or _prefault._mincore is None:
        pytest.skip("needs Linux madvise/mincore")
    calls = []
    monkeypatch.setattr(_prefault, "_madvise", lambda addr, n, advice: calls.append(advice) or 0)
    monkeypatch.setattr(_prefault, "_enabled", [True])
    touched = torch.zeros(8 << 20, dtype=torch.uint8)  # written: every page resident
    _prefault.prefault(touched)
    assert calls == []
    region = mmap.mmap(-1, 16 << 20)  # anonymous, never touched
    fresh = torch.frombuffer(region, dtype=torch.uint8)
    _prefault.prefault(fresh)
    assert calls == [23]
    monkeypatch.setattr(_prefault, "_mincore", None)
    _prefault.prefault(touched)
    assert calls == [23, 23]
    del fresh
    region.close()


def test_gathered_small_writes_are_the_concatenation(tmp_path, monkeypatch):
    """NOTE [gathered small writes]: the file holds exactly the views' bytes in order, also
    when writev writes only part of what it is given; fp.save round-trips many leaves and
    safetensors reads the same values."""
    import os

    import safetensors.torch

    from functorch_pipeline.serialization import _save

    views = [b"head", memoryview(b""), memoryview(bytes(range(200))), b"x" * 7, b"tail"]
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, bufs: real(fd, [bytes(bufs[0])[:3]]))
    path = tmp_path / "raw.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    _save._write_gathered(fd, list(views))
    os.close(fd)
    assert path.read_bytes() == b"".join(bytes(v) for v in views)
    monkeypatch.setattr(os, "writev", real)

    g = torch.Generator().manual_seed(0)
    tree = {f"l{i}": torch.randn(i % 7 + 1, 3, generator=g) for i in range(600)}
    tree["big"] = torch.randn(300_000, generator=g)
    p = tmp_path / "many.safetensors"
    fp.save(p, tree)
    back = fp.load(p)
    flat = safetensors.torch.load_file(str(p))
    assert len(flat) == len(tree)
    for k, v in tree.items():
        assert torch.equal(back[k], v)
    assert sorted(torch.cat([t.flatten() for t in flat.values()]).tolist()) == sorted(
        torch.cat([t.flatten() for t in tree.values()]).tolist())


def test_forward_ad_dual_level_takes_the_loop():
    """torch.autograd.forward_ad (no functorch level) gets the loop path's tangents, which
    match a central finite difference."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    lstm = fp.nn.LSTM(3, 4, dtype=torch.float64)
    x, t = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(lstm(fwAD.make_dual(x, t))[0]).tangent
    eps = 1e-6
    fd = (lstm(x + eps * t)[0] - lstm(x - eps * t)[0]) / (2 * eps)
    torch.testing.assert_close(tangent, fd, atol=1e-7, rtol=1e-6)
