"""Edge cases of the JAX-signature transforms (bug sweep s21): references are
torch.autograd, closed forms and finite differences; JAX, when installed, is a second check."""

from __future__ import annotations

import pytest
import torch

import functorch_pipeline as fp

DT = torch.float64


def _jax():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    return jax


def _graph_size(t: torch.Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        stack.extend(m for m, _ in n.next_functions)
    return len(seen)


# ---- 1. fp.grad through fp.checkpoint returns plain tensors (no graph, no leak) ----------


def test_checkpoint_grad_carries_no_graph_across_steps() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 4, dtype=DT)
    block = fp.checkpoint(lambda w, x: torch.tanh(x @ w))
    w = torch.randn(4, 4, dtype=DT) * 0.3
    w_ref = w.clone()
    for _ in range(5):
        _, g = fp.value_and_grad(lambda w: (block(w, x) ** 2).mean())(w)
        assert not g.requires_grad and g.grad_fn is None
        w = w - 0.1 * g
        wr = w_ref.clone().requires_grad_()
        (gr,) = torch.autograd.grad((torch.tanh(x @ wr) ** 2).mean(), wr)
        w_ref = w_ref - 0.1 * gr
    assert not w.requires_grad and _graph_size(w) == 0
    torch.testing.assert_close(w, w_ref, rtol=0, atol=1e-14)


def test_checkpoint_second_order_still_differentiable() -> None:
    x = torch.tensor([0.3, -1.2], dtype=DT)
    f = fp.checkpoint(lambda x: torch.sin(x).sum())
    got = fp.grad(lambda x: fp.grad(f)(x).sum())(x)
    torch.testing.assert_close(got, -torch.sin(x))  # d/dx cos(x)
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(xr), xr, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), xr)
    torch.testing.assert_close(h, -torch.sin(x))


# ---- 2. second order through custom_jvp / custom_vjp --------------------------------------


@fp.custom_jvp
def _softplus(x):
    return torch.nn.functional.softplus(x)


@_softplus.defjvp
def _(p, t):
    return _softplus(p[0]), torch.sigmoid(p[0]) * t[0]


@fp.custom_vjp
def _sin(x):
    return torch.sin(x)


_sin.defvjp(lambda x: (torch.sin(x), torch.cos(x)), lambda c, g: (c * g,))


@pytest.mark.parametrize("how", ["hessian", "jacrev2", "jacfwd2", "grad2", "jacrev_jacfwd"])
def test_custom_jvp_second_order(how: str) -> None:
    x = torch.tensor(0.3, dtype=DT)
    call = {
        "hessian": lambda: fp.hessian(_softplus)(x),
        "jacrev2": lambda: fp.jacrev(fp.jacrev(_softplus))(x),
        "jacfwd2": lambda: fp.jacfwd(fp.jacfwd(_softplus))(x),
        "grad2": lambda: fp.grad(fp.grad(_softplus))(x),
        "jacrev_jacfwd": lambda: fp.jacrev(fp.jacfwd(_softplus))(x),
    }[how]
    s = torch.sigmoid(x)
    torch.testing.assert_close(call(), s * (1 - s))  # closed form, = JAX's 0.244458


def test_custom_jvp_third_order_forward() -> None:
    x = torch.tensor(0.3, dtype=DT)
    s = torch.sigmoid(x)
    got = fp.jacfwd(fp.jacfwd(fp.jacfwd(_softplus)))(x)
    torch.testing.assert_close(got, s * (1 - s) * (1 - 2 * s))


def test_custom_jvp_first_order_grad_carries_no_graph() -> None:
    g = fp.grad(lambda x: _softplus(x).sum())(torch.tensor([0.0, 1.0], dtype=DT))
    assert not g.requires_grad
    torch.testing.assert_close(g, torch.sigmoid(torch.tensor([0.0, 1.0], dtype=DT)))


@pytest.mark.parametrize("how", ["jacrev2", "grad2", "hessian_vmap", "backward_create_graph"])
def test_custom_vjp_second_order(how: str) -> None:
    x = torch.tensor([0.3, -1.1], dtype=DT)
    if how == "jacrev2":
        h = fp.jacrev(fp.jacrev(_sin))(x)  # (2, 2, 2), nonzero only at [i, i, i]
        got = torch.stack([h[i, i, i] for i in range(2)])
        assert float(h.abs().sum() - got.abs().sum()) == 0
    elif how == "grad2":
        got = fp.vmap(fp.grad(fp.grad(_sin)))(x)
    elif how == "hessian_vmap":
        got = torch.diagonal(fp.jacrev(fp.jacrev(lambda x: _sin(x).sum()))(x))
    else:
        xr = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(_sin(xr).sum(), xr, create_graph=True)
        (got,) = torch.autograd.grad(g.sum(), xr)
    torch.testing.assert_close(got, -torch.sin(x))


def test_custom_rules_second_order_match_jax() -> None:
    jax = _jax()
    import jax.numpy as jnp

    @jax.custom_jvp
    def jsp(x):
        return jax.nn.softplus(x)

    jsp.defjvp(lambda p, t: (jsp(p[0]), jax.nn.sigmoid(p[0]) * t[0]))

    @jax.custom_vjp
    def js(x):
        return jnp.sin(x)

    js.defvjp(lambda x: (jnp.sin(x), jnp.cos(x)), lambda c, g: (c * g,))
    x = torch.tensor(0.3, dtype=DT)
    assert abs(float(fp.hessian(_softplus)(x)) - float(jax.hessian(jsp)(0.3))) < 1e-12
    assert abs(float(fp.grad(fp.grad(_sin))(x)) - float(jax.grad(jax.grad(js))(0.3))) < 1e-12


# ---- 3. complex inputs through checkpoint and custom_jvp ----------------------------------


def test_complex_grad_through_checkpoint_and_custom_jvp() -> None:
    z = torch.tensor([1 + 2j, -0.5 + 0.3j], dtype=torch.complex128)

    @fp.custom_jvp
    def sq(z):
        return z * z

    sq.defjvp(lambda p, t: (sq(p[0]), 2 * p[0] * t[0]))
    zr = z.clone().requires_grad_()
    (ref,) = torch.autograd.grad((zr * zr).real.sum(), zr)
    got_ck = fp.grad(lambda z: fp.checkpoint(lambda z: (z * z).real.sum())(z))(z)
    got_cj = fp.grad(lambda z: sq(z).real.sum())(z)
    torch.testing.assert_close(got_ck, ref)
    torch.testing.assert_close(got_cj, ref)
    assert ref.abs().min() > 0


# ---- 4. custom_vjp checks the shapes bwd returns ------------------------------------------


def test_custom_vjp_wrong_gradient_shape_raises() -> None:
    @fp.custom_vjp
    def double(x):
        return 2 * x

    double.defvjp(lambda x: (2 * x, None), lambda r, g: (2 * g * torch.ones(3, dtype=g.dtype),))
    with pytest.raises(ValueError, match=r"custom_vjp\(double\).*argument 0.*shape \(\).*shape \(3,\)"):
        fp.grad(double)(torch.tensor(1.0, dtype=DT))

    @fp.custom_vjp
    def pair(p):
        return p["a"] * p["b"]

    pair.defvjp(lambda p: (p["a"] * p["b"], (p["a"], p["b"])),
                lambda r, g: ({"a": (g * r[1]).sum(), "b": g * r[0]},))
    p = {"a": torch.ones(2, dtype=DT), "b": torch.ones(2, dtype=DT)}
    with pytest.raises(ValueError, match=r"argument 0 path `a`.*shape \(2,\).*shape \(\)"):
        fp.grad(lambda p: pair(p).sum())(p)


def test_custom_vjp_right_shapes_still_work_under_vmap() -> None:
    x = torch.tensor([[0.3, -1.1], [0.2, 0.5]], dtype=DT)
    got = fp.vmap(fp.grad(lambda x: _sin(x).sum()))(x)
    torch.testing.assert_close(got, torch.cos(x))


# ---- 5. top-level grad of a function independent of its input -----------------------------


def test_grad_of_constant_output_is_zeros() -> None:
    x = torch.tensor([0.3, -1.2], dtype=DT)
    def cond(x):
        return fp.cond(x.sum() > 0, lambda x: x.sum(), lambda x: torch.zeros((), dtype=x.dtype), x)
    for f in (cond, lambda x: fp.stop_gradient(x).sum()):
        got = fp.grad(f)(x)
        assert torch.equal(got, torch.zeros_like(x))
        assert torch.equal(got, torch.func.grad(f)(x))
    v, g = fp.value_and_grad(lambda a, b: (b ** 2).sum(), argnums=0)(x, x)
    assert torch.equal(g, torch.zeros_like(x)) and float(v) == pytest.approx(1.53)


# ---- 6. forward mode through checkpoint ---------------------------------------------------


def test_checkpoint_forward_mode() -> None:
    x = torch.tensor([0.3, -1.2], dtype=DT)
    def f(x):
        return torch.sin(x).prod()
    s, c = torch.sin(x), torch.cos(x)
    ref_h = torch.tensor([[-s[0] * s[1], c[0] * c[1]], [c[0] * c[1], -s[0] * s[1]]], dtype=DT)
    torch.testing.assert_close(fp.hessian(fp.checkpoint(f))(x), ref_h)
    torch.testing.assert_close(fp.jacfwd(fp.checkpoint(torch.sin))(x), torch.diag(c))
    out, t = fp.jvp(fp.checkpoint(f), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(out, f(x))
    torch.testing.assert_close(t, c[0] * s[1] + s[0] * c[1])
    # a pytree argument with a non-tensor leaf
    g = fp.checkpoint(lambda p, k: p["w"] ** k)
    _, t = fp.jvp(lambda w: g({"w": w}, 3), (x,), (torch.ones_like(x),))
    torch.testing.assert_close(t, 3 * x ** 2)


# ---- 7. vmap(randomness="same", chunk_size) shares one draw -------------------------------


def test_vmap_chunked_same_randomness_shares_one_draw() -> None:
    def f(x):
        return x + torch.rand(())
    torch.manual_seed(0)
    whole = fp.vmap(f, randomness="same")(torch.zeros(6))
    after_whole = torch.rand(())
    torch.manual_seed(0)
    ref = torch.func.vmap(f, randomness="same", chunk_size=2)(torch.zeros(6))
    torch.manual_seed(0)
    got = fp.vmap(f, randomness="same", chunk_size=2)(torch.zeros(6))
    after_got = torch.rand(())
    assert torch.equal(got, whole) and torch.equal(got, ref)
    assert torch.equal(after_got, after_whole)
    assert torch.equal(got, got[0].expand(6))


# ---- 8. jvp/vjp has_aux -------------------------------------------------------------------


def test_jvp_vjp_has_aux_requires_pair_and_accepts_any_aux() -> None:
    x = torch.tensor([0.3, -1.2], dtype=DT)
    with pytest.raises(TypeError, match=r"jvp\(f, primals, tangents\): with has_aux=True.*pair.*Tensor"):
        fp.jvp(lambda a: a * 2, (x,), (x,), has_aux=True)
    with pytest.raises(TypeError, match=r"vjp\(f, \*primals\): with has_aux=True.*pair"):
        fp.vjp(lambda a: a * 2, x, has_aux=True)
    out, t, aux = fp.jvp(lambda a: (a * 2, {"n": 1, "s": "x", "t": a}), (x,), (torch.ones_like(x),), has_aux=True)
    assert aux["n"] == 1 and aux["s"] == "x" and torch.equal(aux["t"], x)
    torch.testing.assert_close(t, torch.full_like(x, 2.0))
    out, vjp_fn, aux = fp.vjp(lambda a: (a * 2, {"n": 1, "t": a, "z": None}), x, has_aux=True)
    assert aux["n"] == 1 and aux["z"] is None and torch.equal(aux["t"], x)
    torch.testing.assert_close(vjp_fn(torch.ones_like(x))[0], torch.full_like(x, 2.0))


# ---- 9. scan: carry shapes, unroll --------------------------------------------------------


def test_scan_refuses_carry_shape_change_and_accepts_unroll() -> None:
    with pytest.raises(ValueError, match=r"scan\(f, init, xs\).*shape \(1,\).*shape \(2,\)"):
        fp.scan(lambda c, x: (torch.cat([c, x[None]]), c.sum()), torch.zeros(1), torch.arange(3.0))
    with pytest.raises(ValueError, match=r"carry at path `h` had shape \(2,\).*shape \(1, 2\)"):
        fp.scan(lambda c, x: ({"h": c["h"][None]}, x), {"h": torch.zeros(2)}, torch.arange(3.0))
    for unroll in (1, 2, True):
        c, ys = fp.scan(lambda c, x: (c + x, c), torch.tensor(0.0), torch.arange(3.0), unroll=unroll)
        assert float(c) == 3.0 and ys.tolist() == [0.0, 0.0, 1.0]


# ---- 10. the eager fast path keeps the graph to closed-over tensors -----------------------


def test_grad_keeps_graph_to_closed_over_parameters() -> None:
    torch.manual_seed(0)
    critic = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(DT)
    x = torch.randn(5, 3, dtype=DT)
    params = list(critic.parameters())

    def penalty(gradfn):
        gx = gradfn(lambda inp: critic(inp).sum())(x)
        return ((gx.norm(dim=1) - 1) ** 2).mean()

    xi = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(critic(xi).sum(), xi, create_graph=True)
    ref = torch.autograd.grad(critic(x).mean() + 10 * ((gx.norm(dim=1) - 1) ** 2).mean(), params)
    got = torch.autograd.grad(critic(x).mean() + 10 * penalty(fp.grad), params)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # the penalty alone (it crashed: "does not require grad"); the last bias is unused
    got = torch.autograd.grad(penalty(fp.grad), params, allow_unused=True)
    ref = torch.autograd.grad(penalty(torch.func.grad), params, allow_unused=True)
    assert got[3] is None and ref[3] is None
    for a, b in zip(got[:3], ref[:3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    (v, aux), g = fp.value_and_grad(lambda inp: (critic(inp).sum(), 1), has_aux=True)(x)
    assert v.requires_grad and aux == 1 and g.requires_grad


def test_grad_common_case_carries_no_graph() -> None:
    critic = torch.nn.Linear(3, 1).to(DT)
    x = torch.randn(5, 3, dtype=DT)
    p = {k: v.detach() for k, v in critic.named_parameters()}
    v, g = fp.value_and_grad(lambda p: torch.func.functional_call(critic, p, (x,)).sum())(p)
    assert not v.requires_grad and not g["weight"].requires_grad
    with torch.no_grad():  # closed-over parameters under no_grad: no graph either
        g = fp.grad(lambda inp: critic(inp).sum())(x)
    assert not g.requires_grad
    torch.testing.assert_close(g, critic.weight.detach().expand(5, 3))


# ---- 11. complex gradients follow PyTorch's convention (documented) -----------------------


def test_complex_grad_is_pytorch_convention() -> None:
    z = torch.tensor([1 + 2j, -0.5 + 0.3j], dtype=torch.complex128)
    def f(z):
        return (z ** 3).imag.sum()
    got = fp.grad(f)(z)
    zr = z.clone().requires_grad_()
    (ref,) = torch.autograd.grad(f(zr), zr)
    torch.testing.assert_close(got, ref)
    assert "conjugate" in fp.grad.__doc__
    jax = _jax()
    import jax.numpy as jnp
    import numpy as np

    j = np.asarray(jax.grad(lambda z: (z ** 3).imag.sum())(jnp.asarray(z.numpy())))
    assert np.abs(got.numpy() - j.conj()).max() < 1e-12
