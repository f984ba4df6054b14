"""Control flow (``cond``, ``switch``, ``while_loop``, ``fori_loop``, ``scan``) and
``checkpoint`` fixes from the s23 transforms sweep. References: a per-example loop, closed
forms, finite differences, the same function without ``checkpoint`` (also through
``torch.autograd``), and ``jax.lax`` (x64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp

try:  # JAX is a reference where installed (the bench extra); CI runs without it
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
except ImportError:
    jax = jnp = None
needs_jax = pytest.mark.skipif(jax is None, reason="jax is not installed (the bench extra)")

DT = torch.float64


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    assert not torch.isnan(a).any(), a
    torch.testing.assert_close(a, b.to(a.dtype), atol=tol, rtol=tol)


def _per_example(fun, *xs):
    return torch.stack([fun(*row) for row in zip(*xs, strict=True)])


# -- cond / switch under vmap: NOTE [masked operands under vmap] ------------------------------

def _f(x):  # sqrt of a negative number in the branch not taken
    return fp.cond(x > 0, lambda x: torch.sqrt(x) * x, lambda x: x ** 2, x)


_nonzero = st.floats(-6, 6, allow_nan=False).filter(lambda v: abs(v) > 1e-3)


@settings(max_examples=20, deadline=None)
@given(st.lists(_nonzero, min_size=1, max_size=6))
def test_vmap_cond_derivatives_equal_a_per_example_loop(vals):
    x = torch.tensor(vals, dtype=DT)
    pos = x.clamp(min=1e-300)
    d1 = torch.where(x > 0, 1.5 * pos.sqrt(), 2 * x)  # closed forms
    d2 = torch.where(x > 0, 0.75 / pos.sqrt(), torch.full_like(x, 2.0))
    _close(_per_example(fp.grad(_f), x), d1)
    _close(fp.vmap(_f)(x), _per_example(_f, x))  # forward unchanged
    _close(fp.grad(lambda x: fp.vmap(_f)(x).sum())(x), d1)
    _close(fp.vmap(fp.grad(_f))(x), d1)  # the per-sample-gradient pattern
    xr = x.clone().requires_grad_()
    fp.vmap(_f)(xr).sum().backward()
    _close(xr.grad, d1)
    _close(torch.diagonal(fp.jacfwd(fp.vmap(_f))(x)), d1)  # tangents of the untaken branch
    _close(fp.jvp(fp.vmap(_f), (x,), (torch.ones_like(x),))[1], d1)
    _close(fp.vmap(fp.grad(fp.grad(_f)))(x), d2)
    _close(fp.vmap(fp.hessian(_f))(x), d2)
    # outside vmap the operands reach the branch as they are (no masking, no copy)
    assert fp.cond(bool(x[0] > 0), lambda t: t, lambda t: t, x) is x


@needs_jax
def test_vmap_cond_matches_jax_and_masks_only_differentiable_leaves():
    x = torch.tensor([-1.0, 4.0, 0.25], dtype=DT)
    n = torch.tensor([1, 2, 3])

    def g(x, n):
        ops = {"x": x, "k": 2.0, "i": n}
        return fp.cond(x > 0, lambda d: d["x"].sqrt() * d["k"] + d["i"],
                       lambda d: d["x"] * d["k"] + d["i"], ops)

    def gj(x, n):
        return jax.lax.cond(x > 0, lambda x, n: jnp.sqrt(x) * 2.0 + n, lambda x, n: x * 2.0 + n, x, n)

    ref = np.asarray(jax.vmap(jax.grad(gj))(jnp.asarray(x.numpy()), jnp.asarray(n.numpy())))
    _close(fp.vmap(fp.grad(g))(x, n), torch.from_numpy(ref))
    _close(_per_example(fp.grad(g), x, n), torch.from_numpy(ref))
    _close(fp.vmap(g)(x, n), _per_example(g, x, n))


@needs_jax
@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 3), _nonzero), min_size=1, max_size=6))
def test_vmap_switch_gradients_equal_a_per_example_loop(rows):
    idx = torch.tensor([r[0] for r in rows])
    x = torch.tensor([r[1] for r in rows], dtype=DT)
    branches = [lambda x: x * 3.0, torch.log, torch.sqrt]

    def h(i, x):
        return fp.switch(i, branches, x)

    def hj(i, x):
        return jax.lax.switch(i, [lambda x: x * 3.0, jnp.log, jnp.sqrt], x)

    ref = torch.from_numpy(np.asarray(jax.vmap(jax.grad(hj, argnums=1))(
        jnp.asarray(idx.numpy()), jnp.asarray(x.numpy()))))
    loop = _per_example(fp.grad(h, argnums=1), idx, x)
    torch.testing.assert_close(loop, ref, equal_nan=True)  # log/sqrt of x < 0 taken: nan in both
    got = fp.vmap(fp.grad(h, argnums=1))(idx, x)
    torch.testing.assert_close(got, ref, equal_nan=True, atol=1e-10, rtol=1e-10)
    got = fp.grad(lambda x: fp.vmap(h)(idx, x).sum())(x)
    torch.testing.assert_close(got, ref, equal_nan=True, atol=1e-10, rtol=1e-10)


# -- while_loop under vmap --------------------------------------------------------------------

def _shrink(x):  # sqrt(v - 1) is nan for a finished example (v <= 1.5 may be < 1)
    return fp.while_loop(lambda v: v > 1.5, lambda v: torch.sqrt(v - 1.0), x)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(0.2, 60.0, allow_nan=False), min_size=1, max_size=5))
def test_vmap_while_loop_gradients_equal_a_per_example_loop(vals):
    x = torch.tensor(vals, dtype=DT)
    loop = _per_example(fp.grad(_shrink), x)
    eps = 1e-6
    fd = _per_example(lambda v: (_shrink(v + eps) - _shrink(v - eps)) / (2 * eps), x)
    # away from the points where the number of iterations changes, the loop is smooth
    def iterations(v):
        return fp.while_loop(lambda c: c[0] > 1.5, lambda c: (torch.sqrt(c[0] - 1.0), c[1] + 1),
                             (v, torch.tensor(0)))[1]

    smooth = _per_example(lambda v: iterations(v + eps) == iterations(v - eps), x)
    torch.testing.assert_close(loop[smooth], fd[smooth], atol=1e-5, rtol=1e-5)
    _close(fp.vmap(_shrink)(x), _per_example(_shrink, x))
    _close(fp.vmap(fp.grad(_shrink))(x), loop)
    _close(fp.grad(lambda x: fp.vmap(_shrink)(x).sum())(x), loop)
    _close(torch.diagonal(fp.jacfwd(fp.vmap(_shrink))(x)), loop)
    _close(fp.vmap(fp.grad(fp.grad(_shrink)))(x), _per_example(fp.grad(fp.grad(_shrink)), x))


def test_vmap_while_loop_python_counter_message_is_about_the_loop():
    def f(x, counter):
        return fp.while_loop(lambda v: v[1] < x, lambda v: (v[0] + 1, v[1] * 2),
                             (counter, torch.tensor(1.0)))

    with pytest.raises(TypeError, match=r"while_loop\(cond_fun, body_fun, init_val\): the value at "
                                        r"path `\[0\]` is the int 0, which body_fun changes \(to 1\)"
                                        r".*make it a tensor"):
        fp.vmap(lambda x: f(x, 0))(torch.tensor([3.0, 10.0]))
    n, v = fp.vmap(lambda x: f(x, torch.tensor(0)))(torch.tensor([3.0, 10.0]))
    assert n.tolist() == [2, 4] and v.tolist() == [4.0, 16.0]  # 2**n >= x, per example


# -- checkpoint around apply with BatchNorm: NOTE [what checkpoint differentiates] -----------

def _bn_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Tanh(),
                              torch.nn.Linear(3, 1)).double()
    model = fp.functionalize(net)
    x = torch.randn(8, 4, dtype=DT)
    v = model.init(fp.random.key(0), x[:2])
    bufs = {k: (b + 0.5 if b.is_floating_point() else b) for k, b in v["buffers"].items()}
    return model, x, v["params"], bufs


@pytest.mark.parametrize("train", [False, True])
def test_checkpoint_around_apply_with_batchnorm_equals_no_checkpoint(train):
    model, x, params, bufs = _bn_model()

    def loss(params, x, ck):
        app = lambda vv, x: model.apply(vv, x, train=train)  # noqa: E731
        out = (fp.checkpoint(app) if ck else app)({"params": params, "buffers": bufs}, x)
        return ((out[0] if train else out) ** 2).mean()

    for ck_out, plain_out in [(fp.checkpoint(lambda vv, x: model.apply(vv, x, train=train))(
            {"params": params, "buffers": bufs}, x), model.apply({"params": params, "buffers": bufs},
                                                                 x, train=train))]:
        for a, b in zip(fp.tree.leaves(ck_out), fp.tree.leaves(plain_out), strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)  # num_batches_tracked stays int64
    for argnums in (0, 1, (0, 1)):
        got = fp.grad(loss, argnums=argnums)(params, x, True)
        ref = fp.grad(loss, argnums=argnums)(params, x, False)
        for a, b in zip(fp.tree.leaves(got), fp.tree.leaves(ref), strict=True):
            _close(a, b)
    _close(fp.jacfwd(loss, argnums=1)(params, x, True), fp.jacfwd(loss, argnums=1)(params, x, False))
    # torch.autograd on leaves that require grad (the buffers do not)
    p = {k: t.clone().requires_grad_() for k, t in params.items()}
    g_ck = torch.autograd.grad(loss(p, x, True), list(p.values()))
    g_pl = torch.autograd.grad(loss(p, x, False), list(p.values()))
    for a, b in zip(g_ck, g_pl, strict=True):
        _close(a, b)


def test_checkpoint_batchnorm_eval_per_example_gradients_and_hessian():
    model, x, params, bufs = _bn_model()

    def one(params, xi, ck):
        app = lambda vv, x: model.apply(vv, x)  # noqa: E731
        return ((fp.checkpoint(app) if ck else app)({"params": params, "buffers": bufs}, xi[None]) ** 2).sum()

    got = fp.vmap(fp.grad(one), in_axes=(None, 0, None))(params, x, True)
    loop = [fp.grad(one)(params, xi, False) for xi in x]
    for k in params:
        _close(got[k], torch.stack([g[k] for g in loop]))
    _close(fp.hessian(lambda xx: one(params, xx, True))(x[0]), fp.hessian(lambda xx: one(params, xx, False))(x[0]))


# -- checkpoint: outputs returned as-is, non-tensor and integer outputs ----------------------

_CASES = {
    "passthrough": lambda x: (x.sin(), x),
    "int_leaf": lambda x: {"o": x.sin(), "k": 3},
    "argmax": lambda x: (x.sin(), x.argmax(-1)),
    "all": lambda x, s=2.0: {"a": x, "b": (x * s).cos(), "c": x.argmax(-1), "d": "tag"},
}


def _scalar(out):
    return sum(t.sum() for t in fp.tree.leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point())


@pytest.mark.parametrize("name", list(_CASES))
def test_checkpoint_passthrough_and_nonfloat_outputs(name):
    f = _CASES[name]
    ck = fp.checkpoint(f)
    x = torch.tensor([[0.3, 0.4, -0.2], [1.0, -2.0, 0.5]], dtype=DT)
    out, ref = ck(x), f(x)
    assert fp.tree.structure(out) == fp.tree.structure(ref)
    for a, b in zip(fp.tree.leaves(out), fp.tree.leaves(ref), strict=True):
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b)
        else:
            assert a == b
    _close(fp.grad(lambda x: _scalar(ck(x)))(x), fp.grad(lambda x: _scalar(f(x)))(x))
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(_scalar(ck(xr)), xr)
    (r,) = torch.autograd.grad(_scalar(f(xr)), xr)
    _close(g, r)
    _close(fp.vmap(fp.grad(lambda xi: _scalar(ck(xi))))(x), _per_example(fp.grad(lambda xi: _scalar(f(xi))), x))
    _close(fp.jacfwd(lambda x: _scalar(ck(x)))(x), fp.jacfwd(lambda x: _scalar(f(x)))(x))


def test_checkpoint_accepts_keyword_arguments():
    f = lambda x, s=1.0: (x * s).sin()  # noqa: E731
    ck = fp.checkpoint(f)
    x, s = torch.tensor([0.3, -1.2], dtype=DT), torch.tensor(1.7, dtype=DT)
    _close(ck(x, s=s), f(x, s=s))
    got = fp.grad(lambda x, s: ck(x, s=s).sum(), argnums=(0, 1))(x, s)
    ref = fp.grad(lambda x, s: f(x, s=s).sum(), argnums=(0, 1))(x, s)
    for a, b in zip(got, ref, strict=True):
        _close(a, b)
    _close(fp.grad(lambda x: ck(x, s=2.0).sum())(x), 2.0 * (2.0 * x).cos())
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        ck(x, z=1.0)  # f's own error: f has no parameter z


# -- while_loop / fori_loop carry checks: NOTE [loop carry check] -----------------------------

@pytest.mark.parametrize("body, init, match", [
    (lambda v: {"a": v["a"], "b": torch.cat([v["b"], v["b"]])},
     {"a": 0, "b": torch.tensor([1.0])},
     r"path `b` the value has shape \(1,\) and dtype torch.float32 and body_fun returned "
     r"shape \(2,\) and dtype torch.float32 \(iteration 0\)"),
    (lambda v: {"a": v["a"], "b": (v["b"] + 1).half()},
     {"a": 0, "b": torch.tensor([1.0])},
     r"path `b` the value has shape \(1,\) and dtype torch.float32 and body_fun returned "
     r"shape \(1,\) and dtype torch.float16"),
    (lambda v: {"a": v["a"], "b": 2.0},
     {"a": 0, "b": torch.tensor([1.0])},
     r"path `b` the value has shape \(1,\) and dtype torch.float32 and body_fun returned a float"),
])
def test_loops_refuse_a_carry_shape_or_dtype_change(body, init, match):
    with pytest.raises(ValueError, match=r"while_loop\(cond_fun, body_fun, init_val\): body_fun must "
                                         r"keep the shapes and dtypes .*" + match):
        fp.while_loop(lambda v: v["a"] < 3, lambda v: {**body(v), "a": v["a"] + 1}, init)
    with pytest.raises(ValueError, match=r"fori_loop\(lower, upper, body_fun, init_val\): .*" + match):
        fp.fori_loop(0, 3, lambda i, v: body(v), init)
    with pytest.raises(ValueError, match=r"while_loop\(.*" + match):  # batched predicate
        fp.vmap(lambda x: fp.while_loop(lambda v: v["b"].sum() < x, body,
                                        {"a": 0, "b": init["b"]}))(torch.tensor([2.0, 5.0]))


def test_scan_refuses_a_carry_dtype_change():
    with pytest.raises(ValueError, match=r"scan\(f, init, xs\): f must keep the carry's shapes and "
                                         r"dtypes .*path `\[1\]` had shape \(\) and dtype torch.float32 "
                                         r"and f returned shape \(\) and dtype torch.float64 at step 0"):
        fp.scan(lambda c, x: ((c[0], c[1].double() + x), None), (0, torch.tensor(0.0)),
                torch.ones(3, dtype=DT))


# -- scan bad xs / length ----------------------------------------------------------------------

@pytest.mark.parametrize("xs, length, exc, match", [
    ([1.0, 2.0], None, TypeError, r"leaf at path `\[0\]` is a float \(1.0\)"),
    ({"a": torch.tensor(1.0)}, None, TypeError, r"leaf at path `a` is a 0-d tensor"),
    (None, -2, ValueError, r"`length` must be non-negative, got -2"),
    (None, 2.0, TypeError, r"`length` must be an int, got float 2.0"),
    (None, True, TypeError, r"`length` must be an int, got bool True"),
])
def test_scan_bad_inputs_raise_naming_scan(xs, length, exc, match):
    with pytest.raises(exc, match=r"^scan\(f, init, xs\): .*" + match):
        fp.scan(lambda c, x: (c + 1, c), torch.tensor(0.0), xs, length=length)


# -- NumPy scalars -----------------------------------------------------------------------------

@needs_jax
def test_control_flow_accepts_numpy_scalars_as_jax_lax_does():
    x = torch.tensor(1.0, dtype=DT)
    cases = [
        (lambda: fp.cond(np.bool_(True), lambda x: x + 1, lambda x: x - 1, x),
         lambda: jax.lax.cond(np.bool_(True), lambda x: x + 1, lambda x: x - 1, 1.0)),
        (lambda: fp.cond(np.float64(0.0), lambda x: x + 1, lambda x: x - 1, x),
         lambda: jax.lax.cond(np.float64(0.0), lambda x: x + 1, lambda x: x - 1, 1.0)),
        (lambda: fp.switch(np.int64(1), [lambda x: x, lambda x: x * 10], x),
         lambda: jax.lax.switch(np.int64(1), [lambda x: x, lambda x: x * 10], 1.0)),
        (lambda: fp.switch(np.int32(7), [lambda x: x, lambda x: x * 10], x),
         lambda: jax.lax.switch(np.int32(7), [lambda x: x, lambda x: x * 10], 1.0)),
        (lambda: fp.fori_loop(np.int64(0), np.int64(3), lambda i, v: v + i, x),
         lambda: jax.lax.fori_loop(np.int64(0), np.int64(3), lambda i, v: v + i, 1.0)),
    ]
    for ours, ref in cases:
        assert float(ours()) == float(ref())
    c, ys = fp.scan(lambda c, x: (c + 1, c), torch.tensor(0.0), length=np.int64(3))
    jc, jys = jax.lax.scan(lambda c, x: (c + 1, c), 0.0, length=np.int64(3))
    assert float(c) == float(jc) and ys.tolist() == np.asarray(jys).tolist()


@needs_jax
def test_bad_predicates_and_indices_raise_clear_messages():
    with pytest.raises(TypeError, match=r"^cond\(pred, true_fun, false_fun, \*operands\): `pred` must be "
                                        r"a bool, a real number or a 0-d tensor, got str$"):
        fp.cond("yes", lambda: 1, lambda: 2)
    with pytest.raises(TypeError, match=r"got numpy.str_$"):
        fp.cond(np.str_("yes"), lambda: 1, lambda: 2)
    # bools are not indices (jax.lax.switch: "Index type must be an integer, got True as bool")
    for idx in (True, np.bool_(True), torch.tensor(True)):
        with pytest.raises(TypeError, match=r"^switch\(index, branches, \*operands\): `index` must be an "
                                            r"int or a 0-d integer tensor, got .*bool"):
            fp.switch(idx, [lambda: 1, lambda: 2])
    with pytest.raises(TypeError, match=r"^fori_loop\(.*`upper` must be an int or a 0-d integer tensor, "
                                        r"got a tensor of dtype torch.bool"):
        fp.fori_loop(0, torch.tensor(True), lambda i, v: v, 0)


# -- scan over zero steps with a Python-number y ------------------------------------------------

@needs_jax
@pytest.mark.parametrize("y", [3.5, 2, True, np.float64(1.5), np.int32(4)])
def test_zero_length_scan_gives_an_empty_tensor_like_longer_scans(y):
    step = lambda c, x: (c + 1, (y, c))  # noqa: E731
    _, (y1, _) = fp.scan(step, torch.tensor(0.0), length=1)
    _, (y0, c0) = fp.scan(step, torch.tensor(0.0), length=0)
    assert isinstance(y0, torch.Tensor) and tuple(y0.shape) == (0,) and y0.dtype == y1.dtype
    assert tuple(c0.shape) == (0,) and c0.dtype == torch.float32
    _, (j0, _) = jax.lax.scan(lambda c, x: (c + 1, (y, c)), 0.0, length=0)
    assert j0.shape == tuple(y0.shape)
