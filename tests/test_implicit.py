"""fp.implicit: solvers against torch.linalg.solve, custom_root against closed forms and
unrolled differentiation, non-convergence warnings and bad input."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline import implicit

D = torch.float64
TIGHT = functools.partial(implicit.solve_cg, tol=1e-13, atol=0.0)


def _split(v: torch.Tensor) -> dict[str, torch.Tensor]:
    """A vector as a two-leaf pytree (a matrix leaf and a vector leaf)."""
    return {"a": v[:4].reshape(2, 2), "b": v[4:]}


def _join(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t["a"].reshape(-1), t["b"]])


def _system(seed: int, n: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=D)
    if kind == "spd":
        a = m @ m.T + n * torch.eye(n, dtype=D)
    else:  # non-symmetric, well conditioned
        a = m / n**0.5 + 3 * torch.eye(n, dtype=D)
    return a, torch.randn(n, generator=g, dtype=D)


SOLVERS = {
    "cg": (implicit.solve_cg, "spd"),
    "normal_cg": (implicit.solve_normal_cg, "general"),
    "gmres": (implicit.solve_gmres, "general"),
    "bicgstab": (implicit.solve_bicgstab, "general"),
}


@pytest.mark.parametrize("name", sorted(SOLVERS))
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(5, 24))
def test_solvers_match_linalg_solve_on_pytrees(name: str, seed: int, n: int) -> None:
    solve, kind = SOLVERS[name]
    a, b = _system(seed, n, kind)
    x = solve(lambda t: _split(a @ _join(t)), _split(b), tol=1e-12)
    assert set(x) == {"a", "b"} and x["a"].shape == (2, 2)
    torch.testing.assert_close(_join(x), torch.linalg.solve(a, b), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_ridge_and_init(name: str) -> None:
    solve, kind = SOLVERS[name]
    a, b = _system(3, 9, kind)
    x0 = torch.linspace(-1, 1, 9, dtype=D)
    x = solve(lambda v: a @ v, b, ridge=0.5, init=x0, tol=1e-12)
    eye = torch.eye(9, dtype=D)
    want = (torch.linalg.solve(a.T @ a + 0.5 * eye, a.T @ b) if name == "normal_cg"
            else torch.linalg.solve(a + 0.5 * eye, b))
    torch.testing.assert_close(x, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solvers_warn_or_raise_when_not_converged(name: str) -> None:
    solve, kind = SOLVERS[name]
    a, b = _system(1, 30, kind)
    a = a + torch.diag(torch.logspace(0, 4, 30, dtype=D))  # ill-conditioned: 1 step cannot do
    with pytest.warns(implicit.ConvergenceWarning, match=rf"solve_{name}: did not converge in 1 "
                      r"iterations: .*residual norm \d\.\d+e[-+]\d+ > tolerance"):
        solve(lambda v: a @ v, b, maxiter=1, tol=1e-10)
    with pytest.raises(implicit.ConvergenceError, match=rf"solve_{name}: did not converge"):
        solve(lambda v: a @ v, b, maxiter=1, tol=1e-10, on_failure="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve(lambda v: a @ v, b, maxiter=1, tol=1e-10, on_failure="ignore")


def test_solver_bad_input() -> None:
    a, b = _system(0, 6, "spd")
    with pytest.raises(ValueError, match=r"solve_cg: `matvec\(x\)` at path `b` has shape "
                       r"\(1,\) but `b` has \(2,\)"):
        implicit.solve_cg(lambda t: {"a": t["a"], "b": t["b"][:1]}, _split(b))
    with pytest.raises(ValueError, match=r"solve_gmres: init has tree structure"):
        implicit.solve_gmres(lambda t: t, _split(b), init=[b])
    with pytest.raises(TypeError, match=r"solve_cg: every leaf of `b` must be a floating-point "
                       r"tensor, but the leaf at path `n` is torch.int64"):
        implicit.solve_cg(lambda t: t, {"n": torch.arange(3)})
    with pytest.raises(ValueError, match=r"solve_bicgstab: `on_failure` must be one of"):
        implicit.solve_bicgstab(lambda v: v, b, on_failure="silent")
    with pytest.raises(ValueError, match=r"solve_cg: `maxiter` must be an int >= 1 or None, got 0"):
        implicit.solve_cg(lambda v: v, b, maxiter=0)
    with pytest.raises(ValueError, match=r"solve_normal_cg: `tol` must be a finite number >= 0"):
        implicit.solve_normal_cg(lambda v: v, b, tol=-1.0)
    with pytest.raises(ValueError, match=r"solve_gmres: `restart` must be an int >= 1, got 0"):
        implicit.solve_gmres(lambda v: v, b, restart=0)


# --- ridge regression: the hypergradient d loss_val / d lambda against its closed form ------

def _ridge_data(seed: int, n: int = 12, d: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    a, av = torch.randn(n, d, generator=g, dtype=D), torch.randn(n, d, generator=g, dtype=D)
    y, yv = torch.randn(n, generator=g, dtype=D), torch.randn(n, generator=g, dtype=D)
    return a, y, av, yv


def _ridge_hessian(a: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """The Hessian in z = [w; b] of 0.5 ||A w + b - y||^2 + 0.5 lam ||w||^2."""
    ones = torch.ones(a.shape[0], 1, dtype=D)
    ab = torch.cat([a, ones], dim=1)
    reg = torch.diag(torch.cat([lam.expand(a.shape[1]), torch.zeros(1, dtype=D)]))
    return ab.T @ ab + reg


def _ridge_solver(a: torch.Tensor, y: torch.Tensor):
    def optimality(params, lam):  # the gradient of the inner objective
        r = a @ params["w"] + params["b"] - y
        return {"w": a.T @ r + lam * params["w"], "b": r.sum()}

    @implicit.custom_root(optimality, solve=TIGHT)
    def ridge(init, lam):
        ab = torch.cat([a, torch.ones(a.shape[0], 1, dtype=D)], dim=1)
        z = torch.linalg.solve(_ridge_hessian(a, lam), ab.T @ y)
        return {"w": z[:-1], "b": z[-1]}

    return ridge


def _closed_form_hypergrad(a, y, av, yv, lam):
    h = _ridge_hessian(a, lam)
    ab = torch.cat([a, torch.ones(a.shape[0], 1, dtype=D)], dim=1)
    abv = torch.cat([av, torch.ones(av.shape[0], 1, dtype=D)], dim=1)
    z = torch.linalg.solve(h, ab.T @ y)
    dz = -torch.linalg.solve(h, torch.cat([z[:-1], torch.zeros(1, dtype=D)]))  # dz/dlam
    return (abv.T @ (abv @ z - yv)) @ dz  # d/dlam of 0.5 ||Av w + b - yv||^2


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lam=st.floats(1e-2, 10.0))
def test_ridge_hypergradient_matches_closed_form(seed: int, lam: float) -> None:
    a, y, av, yv = _ridge_data(seed)
    ridge = _ridge_solver(a, y)
    lam_t = torch.tensor(lam, dtype=D)

    def val_loss(lam_):
        p = ridge(None, lam_)
        return 0.5 * ((av @ p["w"] + p["b"] - yv) ** 2).sum()

    want = _closed_form_hypergrad(a, y, av, yv, lam_t)
    torch.testing.assert_close(fp.grad(val_loss)(lam_t), want, rtol=1e-8, atol=1e-10)
    leaf = lam_t.clone().requires_grad_()
    val_loss(leaf).backward()  # plain torch.autograd
    torch.testing.assert_close(leaf.grad, want, rtol=1e-8, atol=1e-10)


def test_ridge_hypergradient_under_vmap() -> None:
    a, y, av, yv = _ridge_data(7)
    ridge = _ridge_solver(a, y)

    def val_loss(lam_):
        p = ridge(None, lam_)
        return 0.5 * ((av @ p["w"] + p["b"] - yv) ** 2).sum()

    lams = torch.tensor([0.1, 1.0, 5.0], dtype=D)
    got = fp.vmap(fp.grad(val_loss))(lams)
    want = torch.stack([_closed_form_hypergrad(a, y, av, yv, lam) for lam in lams])
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


# --- iMAML: a proximal inner problem against unrolled differentiation ------------------------

def _imaml_problem(seed: int, lam: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    x, xq = torch.randn(16, 3, generator=g, dtype=D), torch.randn(16, 3, generator=g, dtype=D)
    y, yq = torch.randn(16, generator=g, dtype=D), torch.randn(16, generator=g, dtype=D)

    def model(p, inputs):
        return torch.tanh(inputs @ p["w1"]) @ p["w2"] + p["b"]

    def train_loss(phi):
        return 0.5 * ((model(phi, x) - y) ** 2).mean()

    def prox_loss(phi, theta):  # L_train(phi) + lam/2 ||phi - theta||^2
        dist = sum(((phi[k] - theta[k]) ** 2).sum() for k in phi)
        return train_loss(phi) + 0.5 * lam * dist

    def query_loss(phi):
        return 0.5 * ((model(phi, xq) - yq) ** 2).mean()

    theta = {"w1": 0.5 * torch.randn(3, 5, generator=g, dtype=D),
             "w2": 0.5 * torch.randn(5, generator=g, dtype=D), "b": torch.zeros((), dtype=D)}
    return prox_loss, query_loss, theta


def _gradient_descent(prox_loss, theta, steps, lr=0.2, differentiable=True):
    phi = theta if differentiable else fp.tree.detach(theta)
    for _ in range(steps):
        g = (fp.grad(prox_loss)(phi, theta) if differentiable
             else fp.grad(prox_loss)(phi, fp.tree.detach(theta)))
        phi = fp.tree.add_scale(phi, -lr, g)
    return phi


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_imaml_implicit_gradient_matches_unrolled(seed: int) -> None:
    prox_loss, query_loss, theta = _imaml_problem(seed)

    @implicit.custom_root(fp.grad(prox_loss), solve=TIGHT)
    def inner(init, theta_):
        with torch.no_grad():
            return _gradient_descent(prox_loss, theta_, 300, differentiable=False)

    implicit_grad = fp.grad(lambda t: query_loss(inner(t, t)))(theta)
    unrolled = fp.grad(lambda t: query_loss(_gradient_descent(prox_loss, t, 300)))(theta)
    for k in theta:
        torch.testing.assert_close(implicit_grad[k], unrolled[k], rtol=1e-8, atol=1e-10)
    # and not trivially: a single unrolled step gives a clearly different meta-gradient
    one = fp.grad(lambda t: query_loss(_gradient_descent(prox_loss, t, 1)))(theta)
    assert fp.tree.norm(fp.tree.sub(one, implicit_grad)) > 1e-4


@pytest.mark.parametrize("solve", [implicit.solve_normal_cg, implicit.solve_gmres,
                                   implicit.solve_bicgstab])
def test_custom_root_with_other_solvers(solve) -> None:
    a, y, av, yv = _ridge_data(11)
    ridge = _ridge_solver(a, y)  # the same inner solver, another linear solver below

    def opt_fn(params, lam):
        r = a @ params["w"] + params["b"] - y
        return {"w": a.T @ r + lam * params["w"], "b": r.sum()}

    solver = implicit.custom_root(opt_fn, solve=functools.partial(solve, tol=1e-13))(
        ridge.__wrapped__)
    lam = torch.tensor(0.3, dtype=D)

    def val_loss(lam_):
        p = solver(None, lam_)
        return 0.5 * ((av @ p["w"] + p["b"] - yv) ** 2).sum()

    got = fp.grad(val_loss)(lam)
    torch.testing.assert_close(got, _closed_form_hypergrad(a, y, av, yv, lam), rtol=1e-7,
                               atol=1e-10)


def test_custom_root_has_aux_and_init_gets_no_gradient() -> None:
    def optimality(x, c):
        return x - c ** 2

    @implicit.custom_root(optimality, solve=TIGHT, has_aux=True)
    def solver(init, c):
        return c ** 2, {"iterations": 7, "gap": torch.tensor(0.0, dtype=D)}

    c = torch.tensor([1.5, -2.0], dtype=D, requires_grad=True)
    init = torch.zeros(2, dtype=D, requires_grad=True)
    x, aux = solver(init, c)
    assert aux["iterations"] == 7 and not aux["gap"].requires_grad
    gc, ginit = torch.autograd.grad(x.sum(), (c, init), allow_unused=True)
    torch.testing.assert_close(gc, 2 * c.detach())
    assert ginit is None


def test_custom_root_warns_with_residual_when_solve_does_not_converge() -> None:
    a, y, av, yv = _ridge_data(5, n=40, d=30)
    a = a * torch.logspace(0, 3, 30, dtype=D)  # ill-conditioned inner Hessian

    def opt_fn(params, lam):
        r = a @ params["w"] + params["b"] - y
        return {"w": a.T @ r + lam * params["w"], "b": r.sum()}

    base = _ridge_solver(a, y).__wrapped__
    lam = torch.tensor(1e-3, dtype=D)

    def hyper(solve):
        solver = implicit.custom_root(opt_fn, solve=solve)(base)
        return fp.grad(lambda l_: solver(None, l_)["w"].sum())(lam)

    with pytest.warns(implicit.ConvergenceWarning,
                      match=r"custom_root\(ridge\): the implicit-gradient linear solve .* did not "
                      r"converge, so the gradient is inexact: solve_cg: did not converge in 3 "
                      r"iterations: residual norm \d\.\d+e[-+]\d+ > tolerance"):
        hyper(functools.partial(implicit.solve_cg, maxiter=3, tol=1e-10))
    with pytest.raises(implicit.ConvergenceError, match=r"solve_cg: did not converge in 3"):
        hyper(functools.partial(implicit.solve_cg, maxiter=3, tol=1e-10, on_failure="raise"))


def test_custom_root_bad_input() -> None:
    with pytest.raises(TypeError, match=r"custom_root: `optimality_fn` must be callable"):
        implicit.custom_root(None)
    with pytest.raises(TypeError, match=r"custom_root: `solve` must be callable or None"):
        implicit.custom_root(lambda x: x, solve=1e-5)

    @implicit.custom_root(lambda x, c: x - c)
    def returns_ints(init, c):
        return {"n": torch.arange(2)}

    with pytest.raises(TypeError, match=r"custom_root\(returns_ints\): every leaf of the solution "
                       r"must be a floating-point tensor, but the leaf at path `n` is torch.int64"):
        returns_ints(None, torch.ones(2))

    @implicit.custom_root(lambda x, c: x - c, has_aux=True)
    def no_aux(init, c):
        return c

    with pytest.raises(TypeError, match=r"custom_root\(no_aux\): with has_aux=True the solver "
                       r"must return a pair"):
        no_aux(None, torch.ones(2))


def test_second_derivative_through_custom_root_matches_finite_differences() -> None:
    a, y, av, yv = _ridge_data(3)
    ridge = _ridge_solver(a, y)

    def val_loss(lam_):
        p = ridge(None, lam_)
        return 0.5 * ((av @ p["w"] + p["b"] - yv) ** 2).sum()

    lam, h = torch.tensor(0.7, dtype=D), 1e-5
    first = functools.partial(_closed_form_hypergrad, a, y, av, yv)  # independent of fp
    fd = (first(lam + h) - first(lam - h)) / (2 * h)
    torch.testing.assert_close(fp.grad(fp.grad(val_loss))(lam), fd, rtol=1e-6, atol=1e-9)
    leaf = lam.clone().requires_grad_()
    (g,) = torch.autograd.grad(val_loss(leaf), leaf, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(g, leaf)[0], fd, rtol=1e-6, atol=1e-9)


def test_solver_may_take_its_own_autograd_steps() -> None:
    """A solver written with torch.autograd.grad (forward runs with grad mode on, on
    detached inputs); the implicit gradient equals the unrolled one."""
    prox_loss, query_loss, theta = _imaml_problem(4)

    @implicit.custom_root(fp.grad(prox_loss), solve=TIGHT)
    def inner(init, theta_):
        phi = {k: v.clone().requires_grad_() for k, v in theta_.items()}
        for _ in range(300):
            g = torch.autograd.grad(prox_loss(phi, theta_), list(phi.values()))
            phi = {k: (v - 0.2 * gk).detach().requires_grad_()
                   for (k, v), gk in zip(phi.items(), g, strict=True)}
        return phi

    leaves = {k: v.clone().requires_grad_() for k, v in theta.items()}
    query_loss(inner(None, leaves)).backward()
    unrolled = fp.grad(lambda t: query_loss(_gradient_descent(prox_loss, t, 300)))(theta)
    for k in theta:
        torch.testing.assert_close(leaves[k].grad, unrolled[k], rtol=1e-8, atol=1e-10)


def test_forward_mode_through_custom_root_matches_closed_forms() -> None:
    """fp.jvp / jacfwd / hessian / hvp through custom_root (JAXopt's custom_root has a
    forward mode too): torch raised "You must implement the jvp function" for each. The
    tangent is the implicit function theorem's; references are the closed-form ridge
    solution differentiated by fp directly, and finite differences of the closed form."""
    a, y, av, yv = _ridge_data(3)
    ridge = _ridge_solver(a, y)

    def closed(lam_):
        ab = torch.cat([a, torch.ones(a.shape[0], 1, dtype=D)], dim=1)
        z = torch.linalg.solve(_ridge_hessian(a, lam_), ab.T @ y)
        return {"w": z[:-1], "b": z[-1]}

    def val_loss(solve_):
        def f(lam_):
            p = solve_(lam_)
            return 0.5 * ((av @ p["w"] + p["b"] - yv) ** 2).sum()
        return f

    lam, one = torch.tensor(0.7, dtype=D), torch.tensor(1.0, dtype=D)
    implicit_fn, closed_fn = (lambda l_: ridge(None, l_)), closed
    out, tangent = fp.jvp(implicit_fn, (lam,), (one,))
    _, want = fp.jvp(closed_fn, (lam,), (one,))
    h = 1e-6
    fd = {k: (closed(lam + h)[k] - closed(lam - h)[k]) / (2 * h) for k in want}
    for k in want:
        torch.testing.assert_close(tangent[k], want[k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(tangent[k], fd[k], rtol=1e-6, atol=1e-9)
    jf = fp.jacfwd(implicit_fn)(lam)
    for k in want:
        torch.testing.assert_close(jf[k], want[k], rtol=1e-9, atol=1e-12)
    want_h = fp.hessian(val_loss(closed_fn))(lam)
    torch.testing.assert_close(fp.hessian(val_loss(implicit_fn))(lam), want_h, rtol=1e-8, atol=1e-11)
    hv = fp.hvp(val_loss(implicit_fn), (lam,), (one,))
    torch.testing.assert_close(hv, want_h, rtol=1e-8, atol=1e-11)


def test_forward_mode_with_aux_and_a_non_differentiated_argument() -> None:
    def optimality(x, c, k):
        return x - k * c ** 2

    @implicit.custom_root(optimality, solve=TIGHT, has_aux=True)
    def solver(init, c, k):
        return k * c ** 2, {"iterations": 3}

    c, t = torch.tensor([1.5, -2.0], dtype=D), torch.tensor([1.0, 0.5], dtype=D)
    x, dx, aux = fp.jvp(lambda c_: solver(None, c_, 3), (c,), (t,), has_aux=True)
    torch.testing.assert_close(x, 3 * c ** 2)
    torch.testing.assert_close(dx, 6 * c * t)  # d/dc of k c^2, closed form
    assert aux == {"iterations": 3}


def test_optimality_fn_not_shaped_like_the_solution_is_named() -> None:
    """A residual norm (a scalar for a vector solution) or a dict missing a key failed only
    inside torch.func at the backward ("Mismatch in shape: grad_output[0]...")."""
    c = torch.tensor([1.0, 2.0], dtype=D, requires_grad=True)
    scalar = implicit.custom_root(lambda x, c: (x - c).norm(), solve=TIGHT)(lambda init, c: c * 1.0)
    with pytest.raises(ValueError, match=r"custom_root\(<lambda>\): `optimality_fn` must return a tree "
                       r"shaped like the solution; at path `<root>` expected shape \(2,\), got \(\)"):
        scalar(None, c).sum().backward()
    missing = implicit.custom_root(lambda x, c: {"a": x["a"] - c}, solve=TIGHT)(
        lambda init, c: {"a": c * 1.0, "b": c * 2.0})
    with pytest.raises(ValueError, match=r"`optimality_fn` must return a tree shaped like the solution "
                       r"\(structure PyTreeSpec\(\{'a': \*, 'b': \*\}\)\), got structure"):
        fp.jvp(lambda c_: missing(None, c_)["a"], (c.detach(),), (torch.ones(2, dtype=D),))


def test_differentiating_the_forward_mode_again_is_refused() -> None:
    """jacfwd(jacfwd) gave 0 for d2x*/dlam2 (the rule's tangent taken as a constant) and
    grad of jvp twice the closed form; both are refused, and forward over reverse (the
    advice) stays exact against the closed form."""
    a, y, _, _ = _ridge_data(3)
    ridge = _ridge_solver(a, y)

    def closed(lam_):
        ab = torch.cat([a, torch.ones(a.shape[0], 1, dtype=D)], dim=1)
        return torch.linalg.solve(_ridge_hessian(a, lam_), ab.T @ y)

    def sol(lam_):
        p = ridge(None, lam_)
        return torch.cat([p["w"], p["b"].reshape(1)])

    lam, one = torch.tensor(0.7, dtype=D), torch.tensor(1.0, dtype=D)
    refusal = r"custom_root\(ridge\): its forward-mode derivative .* cannot itself be differentiated"
    with pytest.raises(NotImplementedError, match=refusal):
        fp.jacfwd(fp.jacfwd(sol))(lam)
    with pytest.raises(NotImplementedError, match=refusal):
        fp.jvp(lambda l_: fp.jvp(sol, (l_,), (one,))[1], (lam,), (one,))
    for grad in (fp.grad, torch.func.grad):
        with pytest.raises(NotImplementedError, match=refusal):
            grad(lambda l_: fp.jvp(sol, (l_,), (one,))[1].sum())(lam)
    cube = lambda f: lambda l_: (f(l_) ** 3).sum()  # noqa: E731
    torch.testing.assert_close(fp.hessian(cube(sol))(lam), torch.func.hessian(cube(closed))(lam),
                               rtol=1e-8, atol=1e-11)
    torch.testing.assert_close(fp.jvp(fp.grad(cube(sol)), (lam,), (one,))[1],
                               torch.func.hessian(cube(closed))(lam), rtol=1e-8, atol=1e-11)
