"""fp transforms against plain torch.autograd (float64, 1e-10) and Python loops."""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functorch_pipeline as fp

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


class Params(NamedTuple):
    w: torch.Tensor
    extra: dict


def make_params(seed: int, n: int = 3) -> Params:
    g = torch.Generator().manual_seed(seed)
    return Params(
        w=torch.randn(n, n, dtype=D, generator=g),
        extra={"b": torch.randn(n, dtype=D, generator=g), "none": None, "s": torch.randn((), dtype=D, generator=g)},
    )


def loss(p: Params, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(x @ p.w + p.extra["b"]) * p.extra["s"]
    return (h**2).sum() + p.extra["s"].sin()


def autograd_grad(p: Params, x: torch.Tensor):
    """Reference: torch.autograd.grad on leaf copies."""
    w = p.w.clone().requires_grad_()
    b = p.extra["b"].clone().requires_grad_()
    s = p.extra["s"].clone().requires_grad_()
    out = loss(Params(w, {"b": b, "s": s, "none": None}), x)
    gw, gb, gs = torch.autograd.grad(out, (w, b, s))
    return out.detach(), gw, gb, gs


@given(st.integers(0, 10_000), st.integers(1, 4))
def test_value_and_grad_matches_autograd(seed, n):
    p = make_params(seed, n)
    x = torch.randn(5, n, dtype=D, generator=torch.Generator().manual_seed(seed + 1))
    value, g = fp.value_and_grad(loss)(p, x)
    ref_v, gw, gb, gs = autograd_grad(p, x)
    assert isinstance(g, Params) and g.extra["none"] is None
    torch.testing.assert_close(value, ref_v, **TOL)
    torch.testing.assert_close(g.w, gw, **TOL)
    torch.testing.assert_close(g.extra["b"], gb, **TOL)
    torch.testing.assert_close(g.extra["s"], gs, **TOL)
    g2 = fp.grad(loss)(p, x)
    torch.testing.assert_close(g2.w, gw, **TOL)


def test_grad_argnums_tuple_and_has_aux():
    p = make_params(0)
    x = torch.randn(4, 3, dtype=D)

    def f(p, x):
        return loss(p, x), {"mean": x.mean()}

    (value, aux), (gp, gx) = fp.value_and_grad(f, argnums=(0, 1), has_aux=True)(p, x)
    xr = x.clone().requires_grad_()
    w = p.w.clone().requires_grad_()
    out = loss(Params(w, p.extra), xr)
    rw, rx = torch.autograd.grad(out, (w, xr))
    torch.testing.assert_close(gp.w, rw, **TOL)
    torch.testing.assert_close(gx, rx, **TOL)
    torch.testing.assert_close(aux["mean"], x.mean())
    grads, aux2 = fp.grad(f, argnums=1, has_aux=True)(p, x)
    torch.testing.assert_close(grads, rx, **TOL)
    assert set(aux2) == {"mean"}
    _, gneg = fp.value_and_grad(loss, argnums=-1)(p, x)
    torch.testing.assert_close(gneg, rx, **TOL)


def test_aux_may_hold_any_pytree():
    def f(w):
        return (w**2).sum(), {"none": None, "t": w.sum(), "n": 3.0, "s": "tag"}

    (value, aux), g = fp.value_and_grad(f, has_aux=True)(torch.tensor([1.0, 2.0]))
    assert value.item() == 5.0 and aux["none"] is None and aux["n"] == 3.0 and aux["s"] == "tag"
    assert aux["t"].item() == 3.0 and not aux["t"].requires_grad
    torch.testing.assert_close(g, torch.tensor([2.0, 4.0]))
    per = fp.vmap(fp.grad(lambda w: (w.sum() ** 2, {"t": w.sum(), "n": None}), has_aux=True))(torch.ones(3, 2))
    torch.testing.assert_close(per[1]["t"], torch.full((3,), 2.0))


def test_grad_errors_are_clear():
    p = make_params(0)
    x = torch.randn(2, 3, dtype=D)
    with pytest.raises(ValueError, match=r"grad\(f\): f must return a scalar \(0-d\) tensor, got shape \(2, 3\)"):
        fp.grad(lambda p, x: x @ p.w)(p, x)
    with pytest.raises(TypeError, match="must return a scalar tensor, got float"):
        fp.grad(lambda p, x: 1.0)(p, x)
    with pytest.raises(ValueError, match="`argnums` contains 5"):
        fp.grad(loss, argnums=5)(p, x)
    with pytest.raises(TypeError, match=r"argument 0 at path `w` has dtype torch.int64"):
        fp.grad(lambda p: p["w"].sum().double())({"w": torch.ones(2, dtype=torch.int64)})
    with pytest.raises(TypeError, match=r"path `lr` is a float"):
        fp.grad(lambda p: p["w"].sum() * p["lr"])({"w": torch.ones(2), "lr": 0.1})
    with pytest.raises(TypeError, match="pair"):
        fp.grad(lambda p, x: loss(p, x), has_aux=True)(p, x)
    with pytest.raises(TypeError, match="floating-point scalar"):
        fp.grad(lambda w: w.sum().long())(torch.ones(2))


def test_forward_and_reverse_mode_on_the_textbook_function():
    # f(x1, x2) = ln(x1) + x1*x2 - sin(x2) at (2, 5)
    def f(x1, x2):
        return torch.log(x1) + x1 * x2 - torch.sin(x2)

    x1, x2 = torch.tensor(2.0, dtype=D), torch.tensor(5.0, dtype=D)
    value, tangent = fp.jvp(f, (x1, x2), (torch.tensor(1.0, dtype=D), torch.tensor(0.0, dtype=D)))
    assert round(value.item(), 3) == 11.652
    assert tangent.item() == pytest.approx(5.5, abs=1e-12)
    d1, d2 = fp.grad(f, argnums=(0, 1))(x1, x2)
    assert d1.item() == pytest.approx(5.5, abs=1e-12)
    assert d2.item() == pytest.approx(2 - math.cos(5), abs=1e-12)


def _jac_reference(f, x):
    """Row by row with torch.autograd.grad."""
    x = x.clone().requires_grad_()
    y = f(x).reshape(-1)
    rows = [torch.autograd.grad(y[i], x, retain_graph=True)[0].reshape(-1) for i in range(y.numel())]
    return torch.stack(rows)


@given(st.integers(0, 10_000))
def test_jacobians_and_hessian_match_autograd(seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(4, 3, dtype=D, generator=g)
    x = torch.randn(3, dtype=D, generator=g)

    def f(v):
        return torch.tanh(A @ v) * v.sum()

    ref = _jac_reference(f, x)
    torch.testing.assert_close(fp.jacrev(f)(x), ref, **TOL)
    torch.testing.assert_close(fp.jacfwd(f)(x), ref, **TOL)
    torch.testing.assert_close(fp.jacrev(f, chunk_size=1)(x), ref, **TOL)

    def s(v):
        return (torch.tanh(A @ v) ** 2).sum()

    H = fp.hessian(s)(x)
    gfun = lambda v: torch.autograd.grad(s(v), v, create_graph=True)[0]  # noqa: E731
    ref_h = _jac_reference(gfun, x)
    torch.testing.assert_close(H, ref_h, **TOL)


def test_jacrev_on_pytrees():
    p = {"a": torch.randn(2, dtype=D), "b": torch.randn(3, dtype=D)}
    J = fp.jacrev(lambda p: {"out": p["a"].sum() * p["b"]})(p)
    torch.testing.assert_close(J["out"]["a"], p["b"][:, None].expand(3, 2), **TOL)
    torch.testing.assert_close(J["out"]["b"], torch.eye(3, dtype=D) * p["a"].sum(), **TOL)


@given(st.integers(0, 10_000))
def test_jvp_vjp_linearize_match_autograd(seed):
    p = make_params(seed)
    x = torch.randn(5, 3, dtype=D, generator=torch.Generator().manual_seed(seed))
    t = fp.tree.random_like(fp.random.key(seed), p)
    t = Params(t.w.double(), {"b": t.extra["b"].double(), "s": t.extra["s"].double(), "none": None})

    def f(p):
        return torch.tanh(x @ p.w + p.extra["b"]) * p.extra["s"]

    # Reference JVP: directional derivative via double-backward trick.
    w = p.w.clone().requires_grad_()
    b = p.extra["b"].clone().requires_grad_()
    s = p.extra["s"].clone().requires_grad_()
    y = f(Params(w, {"b": b, "s": s}))
    u = torch.zeros_like(y, requires_grad=True)
    gw, gb, gs = torch.autograd.grad(y, (w, b, s), u, create_graph=True)
    ref_jvp = torch.autograd.grad((gw * t.w).sum() + (gb * t.extra["b"]).sum() + gs * t.extra["s"], u)[0]
    out, tan = fp.jvp(f, (p,), (t,))
    torch.testing.assert_close(out, y.detach(), **TOL)
    torch.testing.assert_close(tan, ref_jvp, **TOL)
    out2, f_jvp = fp.linearize(f, p)
    torch.testing.assert_close(f_jvp(t), ref_jvp, **TOL)
    ct = torch.randn_like(y)
    out3, vjp_fn = fp.vjp(f, p)
    (gp,) = vjp_fn(ct)
    rw, rb, rs = torch.autograd.grad(y, (w, b, s), ct)
    torch.testing.assert_close(gp.w, rw, **TOL)
    torch.testing.assert_close(gp.extra["b"], rb, **TOL)
    torch.testing.assert_close(gp.extra["s"], rs, **TOL)


def test_jvp_and_linearize_errors():
    with pytest.raises(TypeError, match="`primals` must be a tuple"):
        fp.jvp(torch.sin, torch.ones(1), (torch.ones(1),))
    with pytest.raises(ValueError, match="1 primals but 2 tangents"):
        fp.jvp(torch.sin, (torch.ones(1),), (torch.ones(1), torch.ones(1)))
    with pytest.raises(ValueError, match=r"path `a` has shape \(2,\)"):
        fp.jvp(lambda p: p["a"], ({"a": torch.ones(1)},), ({"a": torch.ones(2)},))
    _, f_jvp = fp.linearize(torch.sin, torch.ones(2, dtype=D))
    with pytest.raises(ValueError, match="must match its primal"):
        f_jvp(torch.ones(2, dtype=torch.float32))


def test_vmap_matches_loop_with_prefix_axes_and_none():
    x = {"a": torch.randn(4, 3, dtype=D), "b": torch.randn(3, 4, dtype=D), "n": None}
    w = torch.randn(3, dtype=D)

    def f(x, w):
        return {"y": x["a"] @ w + x["b"].sum(), "z": None, "w2": w * 2}

    out = fp.vmap(f, in_axes=({"a": 0, "b": 1, "n": None}, None), out_axes={"y": 0, "z": None, "w2": None})(x, w)
    ref = torch.stack([x["a"][i] @ w + x["b"][:, i].sum() for i in range(4)])
    torch.testing.assert_close(out["y"], ref, **TOL)
    assert out["z"] is None
    torch.testing.assert_close(out["w2"], w * 2)
    moved = fp.vmap(lambda a: a * 2, in_axes=1, out_axes=1)(x["b"])
    torch.testing.assert_close(moved, x["b"] * 2)
    neg = fp.vmap(lambda a: a.sum(), in_axes=-1)(x["b"])
    torch.testing.assert_close(neg, x["b"].sum(0))


@pytest.mark.parametrize("chunk", [1, 3, 10])
def test_vmap_chunk_size_gives_same_result(chunk):
    x = torch.randn(7, 5, dtype=D)
    w = torch.randn(5, dtype=D)
    f = lambda x, w: {"dot": (x * w).sum(), "w": w}  # noqa: E731
    a = fp.vmap(f, in_axes=(0, None), out_axes={"dot": 0, "w": None})(x, w)
    b = fp.vmap(f, in_axes=(0, None), out_axes={"dot": 0, "w": None}, chunk_size=chunk)(x, w)
    torch.testing.assert_close(a["dot"], b["dot"], **TOL)
    torch.testing.assert_close(b["w"], w)


def test_vmap_nested_and_kwargs_unmapped():
    x = torch.randn(3, 4, dtype=D)
    out = fp.vmap(fp.vmap(lambda v, scale=1.0: v * scale))(x, scale=2.0)
    torch.testing.assert_close(out, x * 2)


def test_vmap_randomness_modes_and_errors():
    x = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match="randomness"):
        fp.vmap(lambda v: v + torch.rand(3))(x)
    same = fp.vmap(lambda v: v + torch.rand(3), randomness="same")(x)
    assert torch.equal(same[0], same[1])
    diff = fp.vmap(lambda v: v + torch.rand(3), randomness="different")(x)
    assert not torch.equal(diff[0], diff[1])
    with pytest.raises(ValueError, match="`in_axes` has 1 entries but f was called with 2"):
        fp.vmap(lambda a, b: a, in_axes=(0,))(x, x)
    with pytest.raises(ValueError, match=r"argument 1 has 5"):
        fp.vmap(lambda a, b: a)(x, torch.zeros(5))
    with pytest.raises(ValueError, match=r"cannot map over axis 2 of argument 0"):
        fp.vmap(lambda a: a, in_axes=2)(x)
    with pytest.raises(ValueError, match="nothing to map"):
        fp.vmap(lambda a: a, in_axes=None)(x)
    with pytest.raises(TypeError, match="output at path `k` is a str"):
        fp.vmap(lambda a: {"k": "s"})(x)
    with pytest.raises(ValueError, match="randomness"):
        fp.vmap(lambda a: a, randomness="sometimes")
    with pytest.raises(ValueError, match="not a pytree prefix"):
        fp.vmap(lambda a: a, in_axes=({"q": 0},))({"a": x})


def test_explicit_keys_under_vmap_give_per_example_draws():
    keys = fp.random.split(fp.random.key(0), 4)
    draws = fp.vmap(lambda k: fp.random.uniform(k, (3,)))(keys)
    ref = torch.stack([fp.random.uniform(k, (3,)) for k in keys])
    torch.testing.assert_close(draws, ref)
    assert not torch.equal(draws[0], draws[1])


def _loop_per_sample(loss_fn, p, x, y):
    out = []
    for i in range(x.shape[0]):
        out.append(fp.grad(loss_fn)(p, x[i : i + 1], y[i : i + 1]))
    return fp.tree.stack(out)


def batch_loss(p, x, y):
    logits = torch.tanh(x @ p["w1"]) @ p["w2"]
    return torch.nn.functional.cross_entropy(logits, y)


@given(st.integers(0, 1000), st.sampled_from([None, 2, 5]))
def test_per_sample_grads_matches_python_loop(seed, chunk):
    g = torch.Generator().manual_seed(seed)
    p = {"w1": torch.randn(4, 6, dtype=D, generator=g), "w2": torch.randn(6, 3, dtype=D, generator=g)}
    x = torch.randn(5, 4, dtype=D, generator=g)
    y = torch.randint(0, 3, (5,), generator=g)
    got = fp.per_sample_grads(batch_loss, chunk_size=chunk)(p, x, y)
    # independent reference: torch.autograd per example
    for i in range(5):
        w1 = p["w1"].clone().requires_grad_()
        w2 = p["w2"].clone().requires_grad_()
        r1, r2 = torch.autograd.grad(batch_loss({"w1": w1, "w2": w2}, x[i : i + 1], y[i : i + 1]), (w1, w2))
        torch.testing.assert_close(got["w1"][i], r1, **TOL)
        torch.testing.assert_close(got["w2"][i], r2, **TOL)


def test_per_sample_variants():
    p = {"w": torch.randn(3, dtype=D)}
    x = torch.randn(4, 3, dtype=D)
    y = torch.randn(4, dtype=D)

    def loss_aux(p, x, y):
        r = x @ p["w"] - y
        return (r**2).mean(), {"res": r}

    grads, aux = fp.per_sample_grads(loss_aux, has_aux=True)(p, x, y)
    assert aux["res"].shape == (4, 1)
    torch.testing.assert_close(grads["w"], 2 * (x @ p["w"] - y)[:, None] * x, **TOL)
    (vals, _), g2 = fp.per_sample_value_and_grad(loss_aux, has_aux=True)(p, x, y)
    torch.testing.assert_close(vals, (x @ p["w"] - y) ** 2, **TOL)
    # single-example loss without the unit batch axis; y not batched
    one = lambda p, x, y: (x @ p["w"] - y) ** 2  # noqa: E731
    g3 = fp.per_sample_grads(one, keep_batch_dim=False, batch_argnums=(1,))(p, x, torch.tensor(0.0, dtype=D))
    torch.testing.assert_close(g3["w"], 2 * (x @ p["w"])[:, None] * x, **TOL)
    with pytest.raises(ValueError, match="no batch argument"):
        fp.per_sample_grads(lambda p: p["w"].sum())(p)
    with pytest.raises(ValueError, match="both `argnums` and `batch_argnums`"):
        fp.per_sample_grads(loss_aux, batch_argnums=(0, 1))(p, x, y)


def test_custom_vjp_under_grad_vmap_and_backward():
    @fp.custom_vjp
    def f(x, p):
        return {"y": torch.sin(x) * p["s"]}

    def f_fwd(x, p):
        return f(x, p), (torch.cos(x), p["s"], torch.sin(x))

    def f_bwd(res, g):
        cos_x, s, sin_x = res
        return g["y"] * cos_x * s * 10, {"s": (g["y"] * sin_x).sum()}  # 10x to prove it is used

    f.defvjp(f_fwd, f_bwd)
    x = torch.randn(5, dtype=D)
    p = {"s": torch.tensor(2.0, dtype=D)}
    gx, gp = fp.grad(lambda x, p: f(x, p)["y"].sum(), argnums=(0, 1))(x, p)
    torch.testing.assert_close(gx, torch.cos(x) * 2 * 10, **TOL)
    torch.testing.assert_close(gp["s"], torch.sin(x).sum(), **TOL)
    xs = torch.randn(3, 5, dtype=D)
    per = fp.vmap(fp.grad(lambda x, p: f(x, p)["y"].sum()), in_axes=(0, None))(xs, p)
    torch.testing.assert_close(per, torch.cos(xs) * 2 * 10, **TOL)
    xr = x.clone().requires_grad_()
    f(xr, p)["y"].sum().backward()
    torch.testing.assert_close(xr.grad, torch.cos(x) * 2 * 10, **TOL)
    out = fp.vmap(lambda x: f(x, p)["y"])(xs)
    torch.testing.assert_close(out, torch.sin(xs) * 2, **TOL)


def test_custom_vjp_errors():
    @fp.custom_vjp
    def g(x):
        return x

    with pytest.raises(RuntimeError, match="defvjp"):
        g(torch.ones(1))
    g.defvjp(lambda x: (x, None), lambda res, gr: gr)
    with pytest.raises(TypeError, match="one gradient per argument"):
        fp.grad(lambda x: g(x).sum())(torch.ones(2))
    g.defvjp(lambda x: (x, {"k": 1.0}), lambda res, gr: (gr,))
    with pytest.raises(TypeError, match="residual at path `k` is a float"):
        g(torch.ones(1))


def test_scan_matches_python_loop():
    xs = {"a": torch.randn(6, 2, dtype=D), "b": torch.randn(6, dtype=D)}
    init = {"h": torch.zeros(2, dtype=D)}

    def step(c, x):
        h = torch.tanh(c["h"] + x["a"] * x["b"])
        return {"h": h}, {"h": h, "sum": h.sum()}

    carry, ys = fp.scan(step, init, xs)
    c, ref = init, []
    for i in range(6):
        c, y = step(c, {"a": xs["a"][i], "b": xs["b"][i]})
        ref.append(y)
    torch.testing.assert_close(carry["h"], c["h"], **TOL)
    torch.testing.assert_close(ys["h"], torch.stack([r["h"] for r in ref]), **TOL)
    rc, rys = fp.scan(step, init, xs, reverse=True)
    c, ref = init, [None] * 6
    for i in reversed(range(6)):
        c, ref[i] = step(c, {"a": xs["a"][i], "b": xs["b"][i]})
    torch.testing.assert_close(rc["h"], c["h"], **TOL)
    torch.testing.assert_close(rys["sum"], torch.stack([r["sum"] for r in ref]), **TOL)
    cnt, none_ys = fp.scan(lambda c, _: (c + 1, None), torch.tensor(0), None, length=4)
    assert cnt.item() == 4 and none_ys is None
    # differentiable
    g = fp.grad(lambda h0: fp.scan(step, {"h": h0}, xs)[0]["h"].sum())(torch.zeros(2, dtype=D))
    h0 = torch.zeros(2, dtype=D, requires_grad=True)
    c = {"h": h0}
    for i in range(6):
        c, _ = step(c, {"a": xs["a"][i], "b": xs["b"][i]})
    torch.testing.assert_close(g, torch.autograd.grad(c["h"].sum(), h0)[0], **TOL)


def test_scan_errors():
    with pytest.raises(ValueError, match="give `length`"):
        fp.scan(lambda c, x: (c, x), torch.zeros(1), None)
    with pytest.raises(ValueError, match="share their leading size"):
        fp.scan(lambda c, x: (c, x), torch.zeros(1), {"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="`length` is 5"):
        fp.scan(lambda c, x: (c, x), torch.zeros(1), torch.zeros(3), length=5)
    with pytest.raises(ValueError, match="changed the carry"):
        fp.scan(lambda c, x: ((c, c), x), torch.zeros(1), torch.zeros(3))
    with pytest.raises(TypeError, match="pair"):
        fp.scan(lambda c, x: c, torch.zeros(1), torch.zeros(3))


def test_checkpoint_matches_plain_grad_everywhere():
    w = torch.randn(4, 4, dtype=D)

    def block(x, w):
        return torch.tanh(x @ w) @ w

    x = torch.randn(3, 4, dtype=D)
    ref = fp.grad(lambda w: block(x, w).sum())(w)
    remat = fp.checkpoint(block)
    torch.testing.assert_close(fp.grad(lambda w: remat(x, w).sum())(w), ref, **TOL)
    per = fp.vmap(fp.grad(lambda w, xi: remat(xi, w).sum()), in_axes=(None, 0))(w, x)
    ref_per = torch.stack([fp.grad(lambda w, xi=xi: block(xi, w).sum())(w) for xi in x])
    torch.testing.assert_close(per, ref_per, **TOL)
    wr = w.clone().requires_grad_()
    remat(x, wr).sum().backward()
    torch.testing.assert_close(wr.grad, ref, **TOL)
    assert fp.remat is fp.checkpoint


def test_jit_compiles_a_grad_step():
    f = fp.jit(fp.grad(lambda w: (w**2).sum()), backend="eager")
    torch.testing.assert_close(f(torch.ones(3)), torch.full((3,), 2.0))


def test_vmap_and_per_sample_grads_trace_under_torch_compile():
    # backend="eager" runs Dynamo's tracing (where pytree helpers can break) without
    # paying for code generation.
    x = torch.randn(6, 3, dtype=D)
    w = torch.randn(3, dtype=D)
    f = fp.vmap(lambda xi, w: (xi * w).sum().sin(), in_axes=(0, None))
    torch.testing.assert_close(fp.jit(f, fullgraph=True, backend="eager")(x, w), f(x, w), **TOL)
    y = torch.randn(6, dtype=D)
    loss = lambda w, x, y: ((x @ w - y) ** 2).mean()  # noqa: E731
    eager = fp.per_sample_grads(loss)(w, x, y)
    compiled = fp.jit(fp.per_sample_grads(loss), backend="eager")(w, x, y)
    torch.testing.assert_close(compiled, eager, **TOL)
