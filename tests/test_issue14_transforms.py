"""Issue 14 transforms: None leaves in jacobians, has_aux, hvp, empty scan, vmap errors and
axis_size, custom_jvp, custom_vjp(nondiff_argnums), stop_gradient, cond/while_loop/
fori_loop under grad, vmap and fp.jit, eval_shape. References: torch.autograd.functional,
per-example Python loops, closed forms."""

import functools
import warnings

import pytest
import torch
import torch.autograd.functional as AF
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp

F64 = torch.float64
SETTINGS = settings(max_examples=5, deadline=None)


def _vec(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------ jacobians with None leaves
@SETTINGS
@given(st.integers(0, 1000))
def test_jacobians_accept_none_leaves_and_match_autograd(seed):
    w, b = _vec(seed, 3), _vec(seed + 1, 2)
    tree = {"w": w, "skip": None, "nested": (b, None)}

    def f(p):
        return p["w"].sin() * p["nested"][0].sum()

    jr, jf = fp.jacrev(f)(tree), fp.jacfwd(f)(tree)
    ref_w, ref_b = AF.jacobian(lambda w_, b_: w_.sin() * b_.sum(), (w, b))
    for j in (jr, jf):
        assert j["skip"] is None and j["nested"][1] is None
        torch.testing.assert_close(j["w"], ref_w)
        torch.testing.assert_close(j["nested"][0], ref_b)

    def scalar(p):
        return (p["w"] ** 3).sum() * p["nested"][0].prod()

    h = fp.hessian(scalar)(tree)
    ref = AF.hessian(lambda w_, b_: (w_**3).sum() * b_.prod(), (w, b))
    torch.testing.assert_close(h["w"]["w"], ref[0][0])
    torch.testing.assert_close(h["w"]["nested"][0], ref[0][1])
    torch.testing.assert_close(h["nested"][0]["w"], ref[1][0])
    assert h["skip"] is None and h["w"]["skip"] is None


def test_jacobian_has_aux_keeps_any_aux_and_tuple_argnums():
    x, y = _vec(0, 2), _vec(1, 2)
    (jx, jy), aux = fp.jacrev(
        lambda a, b: (a * b, {"n": 2, "s": a.sum()}), argnums=(0, 1), has_aux=True
    )(x, y)
    torch.testing.assert_close(jx, torch.diag(y))
    torch.testing.assert_close(jy, torch.diag(x))
    assert aux["n"] == 2 and torch.equal(aux["s"], x.sum())
    h, aux = fp.hessian(lambda a: ((a**4).sum(), {"norm": a.norm(), "tag": "x"}), has_aux=True)(x)
    torch.testing.assert_close(h, AF.hessian(lambda a: (a**4).sum(), x))
    assert aux["tag"] == "x"
    torch.testing.assert_close(aux["norm"], x.norm())
    with pytest.raises(TypeError, match=r"jacrev\(f\): with has_aux=True, f must return a pair"):
        fp.jacrev(lambda a: a, has_aux=True)(x)
    with pytest.raises(
        TypeError, match=r"jacfwd\(f\): can only differentiate .* at path `k` has dtype torch.int64"
    ):
        fp.jacfwd(lambda p: p["k"])({"k": torch.ones(2, dtype=torch.int64)})


def test_linearize_has_aux_and_hvp_match_autograd():
    x = _vec(2, 4)
    out, f_jvp, aux = fp.linearize(lambda a: (a.exp() * a, {"max": a.max()}), x, has_aux=True)
    t = _vec(3, 4)
    torch.testing.assert_close(out, x.exp() * x)
    torch.testing.assert_close(f_jvp(t), AF.jvp(lambda a: a.exp() * a, x, t)[1])
    torch.testing.assert_close(aux["max"], x.max())
    assert not aux["max"].requires_grad

    def f(p, scale):
        return (p["a"].sin() * p["b"] ** 2).sum() * scale

    p = {"a": _vec(4, 3), "b": _vec(5, 3)}
    v = {"a": _vec(6, 3), "b": _vec(7, 3)}
    got = fp.hvp(lambda q: f(q, 2.0), (p,), (v,))
    ref = AF.hvp(lambda a, b: f({"a": a, "b": b}, 2.0), (p["a"], p["b"]), (v["a"], v["b"]))[1]
    torch.testing.assert_close(got["a"], ref[0])
    torch.testing.assert_close(got["b"], ref[1])


# ------------------------------------------------------------------ scan, vmap
def test_empty_scan_returns_zero_length_arrays_like_lax_scan():
    def step(c, x):
        return c + x["a"].sum(), {"y": c * x["a"], "i": x["a"].to(torch.int32)}

    init = torch.zeros((), dtype=F64)
    full_c, full = fp.scan(step, init, {"a": _vec(0, 3, 2)})
    c, ys = fp.scan(step, init, {"a": torch.empty(0, 2, dtype=F64)})
    assert torch.equal(c, init)
    for k in ("y", "i"):
        assert ys[k].shape == (0, *full[k].shape[1:]) and ys[k].dtype == full[k].dtype
    _, ys = fp.scan(
        lambda c, _: (c, (c, c.double())), torch.ones(2, dtype=torch.float32), None, length=0
    )
    assert ys[0].shape == (0, 2) and ys[0].dtype == torch.float32 and ys[1].dtype == F64
    assert fp.scan(lambda c, _: (c, None), init, None, length=0)[1] is None
    with pytest.raises(RuntimeError, match=r"scan\(f, init, xs\): over zero steps .* fake tensors"):
        fp.scan(lambda c, x: (c, x[x > 0]), init, torch.zeros(0, 3))


def test_vmap_tensor_kwargs_warn_and_stay_broadcast():
    x, w = _vec(0, 4, 3), _vec(1, 3)
    with pytest.warns(UserWarning, match=r"vmap.*keyword argument\(s\) \['w'\].*jax.vmap maps"):
        out = fp.vmap(lambda a, w: a @ w)(x, w=w)
    torch.testing.assert_close(out, torch.stack([r @ w for r in x]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp.vmap(lambda a, scale: a * scale)(x, scale=2.0)  # non-tensor kwargs are fine


def test_vmap_out_axes_out_of_range_and_axis_size():
    x = _vec(0, 4, 3)
    with pytest.raises(
        ValueError,
        match=r"vmap.*`out_axes` entry 3 is out of range .* rank 1 per "
        r"example.*\[-2, 1\]",
    ):
        fp.vmap(lambda a: a * 2, out_axes=3)(x)
    torch.testing.assert_close(fp.vmap(lambda a: a * 2, out_axes=-1)(x), (x * 2).T)
    const = fp.vmap(lambda: torch.arange(3.0), axis_size=5, out_axes=1)()
    torch.testing.assert_close(const, torch.stack([torch.arange(3.0)] * 5, dim=1))
    mixed = fp.vmap(lambda a, b: a + b, in_axes=(None, None), axis_size=2)(x[0], x[1])
    torch.testing.assert_close(mixed, torch.stack([x[0] + x[1]] * 2))
    with pytest.raises(ValueError, match=r"`axis_size` is 5 but argument 0 has 4"):
        fp.vmap(lambda a: a, axis_size=5)(x)
    with pytest.raises(ValueError, match=r"nothing to map.*give `axis_size`"):
        fp.vmap(lambda a: a, in_axes=None)(x)


# ------------------------------------------------------------------ custom rules
@fp.custom_jvp
def _softplus(x):
    return torch.nn.functional.softplus(x)


@_softplus.defjvp
def _softplus_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _softplus(x), torch.sigmoid(x) * t


@functools.partial(fp.custom_jvp, nondiff_argnums=(0,))
def _scaled_mul(k, x, y):
    return k * x * y


@_scaled_mul.defjvp
def _scaled_mul_jvp(k, primals, tangents):
    (x, y), (tx, ty) = primals, tangents
    return k * x * y, k * (tx * y + x * ty)


@SETTINGS
@given(st.integers(0, 1000))
def test_custom_jvp_forward_reverse_and_vmap_match_autograd(seed):
    x, y, t = _vec(seed, 5), _vec(seed + 1, 5), _vec(seed + 2, 5)
    ref = torch.nn.functional.softplus
    torch.testing.assert_close(fp.jvp(_softplus, (x,), (t,))[1], AF.jvp(ref, x, t)[1])
    torch.testing.assert_close(fp.grad(lambda a: _softplus(a).sum())(x), torch.sigmoid(x))
    xr = x.clone().requires_grad_()
    (_softplus(xr) * y).sum().backward()
    torch.testing.assert_close(xr.grad, torch.sigmoid(x) * y)
    per = fp.vmap(fp.grad(lambda a: _softplus(a).sum()))(x.reshape(5, 1))
    torch.testing.assert_close(per.reshape(5), torch.sigmoid(x))
    torch.testing.assert_close(fp.jacfwd(_softplus)(x), torch.diag(torch.sigmoid(x)))
    gx, gy = fp.grad(lambda a, b: _scaled_mul(3.0, a, b).sum(), argnums=(0, 1))(x, y)
    torch.testing.assert_close(gx, 3.0 * y)
    torch.testing.assert_close(gy, 3.0 * x)


def test_custom_jvp_rule_errors():
    @fp.custom_jvp
    def f(x):
        return x

    with pytest.raises(RuntimeError, match=r"custom_jvp\(f\): register a rule with .defjvp"):
        f(torch.ones(1))
    f.defjvp(lambda p, t: p[0])
    with pytest.raises(TypeError, match=r"custom_jvp\(f\): the jvp rule must return a pair"):
        fp.jvp(f, (torch.ones(1),), (torch.ones(1),))


@functools.partial(fp.custom_vjp, nondiff_argnums=(0, 2))
def _apply_clipped(fn, x, bound):
    return fn(x)


def _apply_fwd(fn, x, bound):
    return fn(x), x


def _apply_bwd(fn, bound, x, g):
    _, vjp_fn = torch.func.vjp(fn, x)
    return (vjp_fn(g)[0].clamp(-bound, bound),)


_apply_clipped.defvjp(_apply_fwd, _apply_bwd)


def test_custom_vjp_nondiff_argnums_pass_static_args_to_bwd():
    x = _vec(0, 6) * 3
    got = fp.grad(lambda a: _apply_clipped(torch.sinh, a, 1.5).sum())(x)
    torch.testing.assert_close(got, torch.cosh(x).clamp(-1.5, 1.5))
    per = fp.vmap(fp.grad(lambda a: _apply_clipped(torch.sinh, a, 1.5).sum()))(x.reshape(6, 1))
    torch.testing.assert_close(per.reshape(6), torch.cosh(x).clamp(-1.5, 1.5))
    with pytest.raises(
        ValueError, match=r"custom_vjp\(_apply_clipped\): `nondiff_argnums` \(0, 2\)"
    ):
        _apply_clipped(torch.sinh, x)


def test_stop_gradient_blocks_only_the_gradient():
    x = _vec(0, 3)
    g = fp.grad(lambda a: (a**2 * fp.stop_gradient({"k": a, "n": 1})["k"]).sum())(x)
    torch.testing.assert_close(g, 2 * x * x)
    per = fp.vmap(fp.grad(lambda a: (a * fp.stop_gradient(a)).sum()))(x.reshape(3, 1))
    torch.testing.assert_close(per.reshape(3), x)


# ------------------------------------------------------------------ control flow
def _branchy(x):
    return fp.cond(x.sum() > 0, lambda v: {"y": v.sin() * 2}, lambda v: {"y": v**3}, x)


def _halvings(x):
    def body(v):
        return {"x": v["x"] / 2, "n": v["n"] + 1}

    return fp.while_loop(
        lambda v: v["x"].abs().sum() > 1.0, body, {"x": x, "n": torch.zeros((), dtype=F64)}
    )


def _ref_halvings(x):
    n = 0
    while x.abs().sum() > 1.0:
        x, n = x / 2, n + 1
    return x, n


def _power_sum(x):
    return fp.fori_loop(1, 4, lambda i, acc: acc + x**i, torch.zeros_like(x))


@SETTINGS
@given(st.integers(0, 1000))
def test_control_flow_under_grad_and_vmap_matches_a_loop(seed):
    xs = _vec(seed, 6, 2) * 4
    for x in xs:
        ref = x.sin() * 2 if x.sum() > 0 else x**3
        torch.testing.assert_close(_branchy(x)["y"], ref)
        gref = 2 * x.cos() if x.sum() > 0 else 3 * x**2
        torch.testing.assert_close(fp.grad(lambda a: _branchy(a)["y"].sum())(x), gref)
    batched = fp.vmap(_branchy)(xs)["y"]
    torch.testing.assert_close(batched, torch.stack([_branchy(x)["y"] for x in xs]))
    per_grads = fp.vmap(fp.grad(lambda a: _branchy(a)["y"].sum()))(xs)
    torch.testing.assert_close(
        per_grads, torch.stack([fp.grad(lambda a: _branchy(a)["y"].sum())(x) for x in xs])
    )
    out = fp.vmap(_halvings)(xs)
    for i, x in enumerate(xs):
        rx, rn = _ref_halvings(x)
        torch.testing.assert_close(out["x"][i], rx)
        assert int(out["n"][i]) == rn
        # d/dx of x / 2**n (n locally constant) is 1 / 2**n
        g = fp.grad(lambda a: _halvings(a)["x"].sum())(x)
        torch.testing.assert_close(g, torch.full_like(x, 0.5**rn))
    torch.testing.assert_close(_power_sum(xs), xs + xs**2 + xs**3)
    torch.testing.assert_close(fp.grad(lambda a: _power_sum(a).sum())(xs), 1 + 2 * xs + 3 * xs**2)
    torch.testing.assert_close(fp.vmap(_power_sum)(xs), _power_sum(xs))


def test_control_flow_under_jit():
    f = fp.jit(lambda x: _branchy(x)["y"] + _power_sum(x) + _halvings(x)["x"], backend="eager")
    for x in (_vec(0, 3) * 4, -_vec(0, 3).abs() * 4):
        ref = _branchy(x)["y"] + _power_sum(x) + _ref_halvings(x)[0]
        torch.testing.assert_close(f(x), ref)


def test_control_flow_errors_name_the_api():
    x = torch.ones(2)
    with pytest.raises(ValueError, match=r"cond\(pred.*`pred` must be a scalar"):
        fp.cond(x > 0, lambda v: v, lambda v: v, x)
    with pytest.raises(
        ValueError, match=r"cond\(pred.*output at path `\[0\]` has shape \(2,\).*\(\)"
    ):
        fp.vmap(lambda v: fp.cond(v.sum() > 0, lambda u: (u,), lambda u: (u.sum(),), v))(
            torch.ones(3, 2)
        )
    with pytest.raises(ValueError, match=r"while_loop.*body_fun changed the structure"):
        fp.while_loop(lambda v: v[0] < 1, lambda v: (v[0] + 1,), (0, 1))
    with pytest.raises(TypeError, match=r"fori_loop.*`upper` must be an int"):
        fp.fori_loop(0, 2.5, lambda i, v: v, x)


def test_eval_shape_allocates_nothing_and_matches_a_real_run():
    big = fp.ShapeDtypeStruct(torch.Size([100_000, 100_000]), torch.float32)
    out = fp.eval_shape(lambda a, b: {"y": (a @ b).relu(), "n": 3}, big, torch.ones(100_000, 2))
    assert out["y"] == fp.ShapeDtypeStruct(
        torch.Size([100_000, 2]), torch.float32, torch.device("cpu")
    )
    assert out["n"] == 3
    x = _vec(0, 4, 3)
    real = _branchy(x[0]), x.to(torch.int64).sum(0)
    shapes = fp.eval_shape(
        lambda a: (_branchy(a[0]) if False else {"y": a[0] ** 3}, a.to(torch.int64).sum(0)), x
    )
    assert shapes[0]["y"].shape == real[0]["y"].shape and shapes[1].dtype == torch.int64


def test_switch_clamps_the_index_and_selects_per_example_under_vmap():
    branches = [lambda v: v.sin(), lambda v: v * 3, lambda v: v ** 2]
    x = _vec(0, 5)
    for i in (-2, 0, 1, 2, 7):
        torch.testing.assert_close(fp.switch(i, branches, x), branches[min(max(i, 0), 2)](x))
    idx = torch.tensor([0, 1, 2, 5, -1])
    got = fp.vmap(lambda i, v: fp.switch(i, branches, v))(idx, x)
    ref = torch.stack([branches[min(max(int(i), 0), 2)](v) for i, v in zip(idx, x, strict=True)])
    torch.testing.assert_close(got, ref)
    g = fp.vmap(fp.grad(lambda v, i: fp.switch(i, branches, v)), in_axes=(0, 0))(x, idx)
    torch.testing.assert_close(g, torch.stack([x[0].cos(), torch.tensor(3.0, dtype=F64), 2 * x[2],
                                               2 * x[3], x[4].cos()]))
    with pytest.raises(TypeError, match=r"switch\(index.*`index` must be an int"):
        fp.switch(1.5, branches, x)


def test_linear_transpose_is_the_matrix_transpose_and_jacobian_is_jacrev():
    a, b = _vec(0, 3, 4), _vec(1, 3, 2)
    f_t = fp.linear_transpose(lambda p: a @ p["x"] + b @ p["y"], {"x": _vec(2, 4), "y": _vec(3, 2)})
    ct = _vec(4, 3)
    (got,) = f_t(ct)
    torch.testing.assert_close(got["x"], a.T @ ct)
    torch.testing.assert_close(got["y"], b.T @ ct)
    assert fp.jacobian is fp.jacrev
