"""Differentiating through fp.optim (issue 11 items 1-2): meta-gradients through k steps of
``update`` + ``apply_updates`` for the whole registry, checked against central finite
differences and a hand-written ``torch.autograd.grad(create_graph=True)`` loop; vmap of
the inner loop both ways; forward mode; hypergradients through ``inject_hyperparams``;
and the fast paths (fused Adam kernel, foreach, in-place) switching themselves off exactly
when something is differentiated (NOTE [differentiable optimizers] in ``optim/_mt.py``).
Everything in float64 on tiny trees (9 numbers), 2 inner steps."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from optim_registry import F64
from optim_registry import REGISTRY
from optim_registry import _params

import functorch_pipeline as fp
from functorch_pipeline import optim

# torch.func.jvp's first use imports a module that calls the deprecated torch.jit.script
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

STEPS = 2
NAMES = sorted(REGISTRY)
# The registry's rmsprop_centered (bias_correction=True, eps=1e-8) divides the first step
# by sqrt(0 + eps): the centred variance of one sample is exactly 0. The update is then
# 1e4 * g, the meta-loss ~3.5e5, and a central difference keeps ~4 digits. Same
# transformation, better conditioned: eps=1e-3.
OPTS = dict(REGISTRY)
OPTS["rmsprop_centered"] = lambda: optim.rmsprop(
    1e-2, eps=1e-3, centered=True, momentum=0.9, bias_correction=True
)
# adam_mu_dtype rounds its first moment to float32 every step, so two evaluation orders
# (vmap vs loop, forward vs reverse) agree to float32 rounding only.
TOL = {"adam_mu_dtype": {"rtol": 1e-6, "atol": 1e-9}}
EXACT = {"rtol": 1e-10, "atol": 1e-12}


def _data(seed: int = 5):
    return fp.tree.map(lambda x: 1.0 + 0.5 * x, _params(seed))


def inner_loss(p, a):
    return sum(
        (torch.sin(x * y) + 0.3 * x * x).sum()
        for x, y in zip(fp.tree.leaves(p), fp.tree.leaves(a), strict=True)
    )


def outer_loss(p):
    return sum(((x - 0.3) ** 2 + torch.cos(x)).sum() for x in fp.tree.leaves(p))


def meta_loss(opt, p0, a, steps=STEPS, inplace=False):
    """The loss after ``steps`` inner optimizer steps from ``p0`` (a MAML inner loop)."""
    p, s = p0, opt.init(p0)
    for _ in range(steps):
        g = fp.grad(inner_loss)(p, a)
        if inplace:
            u, s = opt.update(g, s, p, inplace=True)
        else:
            u, s = opt.update(g, s, p)
        p = optim.apply_updates(p, u)
    return outer_loss(p)


def autograd_meta_grad(opt, p0, a, steps=STEPS):
    """The same meta-gradient with plain torch.autograd (no functorch anywhere)."""
    leaves0, td = fp.tree.flatten(fp.tree.clone(p0))
    leaves0 = [x.requires_grad_() for x in leaves0]
    p = fp.tree.unflatten(td, leaves0)
    s = opt.init(p)
    for _ in range(steps):
        pl = fp.tree.leaves(p)
        gl = torch.autograd.grad(inner_loss(p, a), pl, create_graph=True, materialize_grads=True)
        u, s = opt.update(fp.tree.unflatten(td, list(gl)), s, p)
        p = optim.apply_updates(p, u)
    out = torch.autograd.grad(outer_loss(p), leaves0, materialize_grads=True)
    return fp.tree.unflatten(td, list(out))


def _direction(seed=7):
    return _params(seed)


def _close(a, b, rtol, atol):
    for x, y in zip(fp.tree.leaves(a), fp.tree.leaves(b), strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_meta_gradient_matches_finite_differences_and_autograd(name):
    opt = OPTS[name]()
    p0, a, v = _params(), _data(), _direction()
    g = fp.grad(lambda p: meta_loss(opt, p, a))(p0)
    assert all(torch.isfinite(x).all() for x in fp.tree.leaves(g))
    # adam_mu_dtype rounds its first moment to float32 every step: a central difference
    # then carries ~1e-7/h of rounding noise, so it gets a wider step and tolerance
    h, rtol = (1e-3, 1e-4) if name == "adam_mu_dtype" else (1e-5, 1e-6)
    fd = (
        meta_loss(opt, fp.tree.add_scale(p0, h, v), a)
        - meta_loss(opt, fp.tree.add_scale(p0, -h, v), a)
    ) / (2 * h)
    torch.testing.assert_close(fp.tree.vdot(g, v), fd, rtol=rtol, atol=1e-9)
    _close(g, autograd_meta_grad(opt, p0, a), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_grad_of_vmap_and_vmap_of_grad_over_tasks(name):
    """The JAX MAML idiom ``grad(lambda p: vmap(maml_loss)(tasks).mean())`` and per-task
    meta-gradients ``vmap(grad(maml_loss))``, against a Python loop over the tasks."""
    opt = OPTS[name]()
    p0 = _params()
    tasks = [_data(10 + i) for i in range(3)]
    stacked = fp.tree.stack(tasks)
    per_task = [fp.grad(lambda p, a=a: meta_loss(opt, p, a))(p0) for a in tasks]
    mean = fp.tree.scale(fp.tree.add(fp.tree.add(per_task[0], per_task[1]), per_task[2]), 1 / 3)
    g = fp.grad(lambda p: torch.func.vmap(lambda a: meta_loss(opt, p, a))(stacked).mean())(p0)
    _close(g, mean, **TOL.get(name, EXACT))
    gv = torch.func.vmap(fp.grad(lambda p, a: meta_loss(opt, p, a)), in_dims=(None, 0))(p0, stacked)
    _close(gv, fp.tree.stack(per_task), **TOL.get(name, EXACT))


@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_through_updates(name):
    opt = OPTS[name]()
    p0, a, v = _params(), _data(), _direction()
    _, tangent = torch.func.jvp(lambda p: meta_loss(opt, p, a), (p0,), (v,))
    g = fp.grad(lambda p: meta_loss(opt, p, a))(p0)
    torch.testing.assert_close(tangent, fp.tree.vdot(g, v), **TOL.get(name, EXACT))


# --- the failures, one by one -------------------------------------------------


def test_clip_by_global_norm_under_grad_with_two_leaves():
    """Was: RuntimeError `inconsistent range for TensorList output` (_foreach_mul with a
    0-d tensor scalar under autograd)."""
    opt = optim.chain(optim.clip_by_global_norm(0.5), optim.adam(0.1))
    p0, a, v = _params(), _data(), _direction()
    g = fp.grad(lambda p: meta_loss(opt, p, a))(p0)
    fd = (
        meta_loss(opt, fp.tree.add_scale(p0, 1e-5, v), a)
        - meta_loss(opt, fp.tree.add_scale(p0, -1e-5, v), a)
    ) / 2e-5
    torch.testing.assert_close(fp.tree.vdot(g, v), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "make", [lambda: optim.adam(0.1), lambda: optim.adamw(0.1), lambda: optim.lamb(0.1)]
)
def test_grad_of_vmap_inner_loop_adam_family(make):
    """Was: `output 0 of SqrtBackward0 is at version 2; expected version 0` (in-place
    writes on tensors saved for backward: vmap hides requires_grad)."""
    opt = make()
    stacked = fp.tree.stack([_data(20), _data(21)])
    g = fp.grad(lambda p: torch.func.vmap(lambda a: meta_loss(opt, p, a))(stacked).mean())(
        _params()
    )
    assert all(torch.isfinite(x).all() for x in fp.tree.leaves(g))


def test_adam_eps_root_for_exact_zero_gradients():
    """An inner gradient entry that is exactly 0: with the default eps_root=0 the
    meta-gradient is NaN (sqrt has an infinite derivative at v = 0; documented, as in
    optax); eps_root=1e-12 gives the finite-difference value."""
    a = fp.tree.zeros_like(_data())  # inner loss 0.3 * x**2: gradient 0 where x == 0
    p0 = fp.tree.map(lambda x: x.clone(), _params())
    p0["fc"]["b"] = torch.tensor([0.0, 0.7], dtype=F64)
    g = fp.grad(lambda p: meta_loss(optim.adam(0.1), p, a))(p0)
    assert torch.isnan(g["fc"]["b"][0])
    opt = optim.adam(0.1, eps_root=1e-12)
    g = fp.grad(lambda p: meta_loss(opt, p, a))(p0)
    assert all(torch.isfinite(x).all() for x in fp.tree.leaves(g))
    v = _direction()
    v["fc"]["b"] = torch.tensor([0.0, 1.0], dtype=F64)  # FD across the kink of |g| is meaningless
    fd = (
        meta_loss(opt, fp.tree.add_scale(p0, 1e-5, v), a)
        - meta_loss(opt, fp.tree.add_scale(p0, -1e-5, v), a)
    ) / 2e-5
    torch.testing.assert_close(fp.tree.vdot(g, v), fd, rtol=1e-6, atol=1e-9)


def test_radam_first_steps_finite_meta_gradient():
    """rho_t < 5 in the first steps: the rectification's NaN must not leak (safe where)."""
    for opt in (optim.radam(0.1), optim.radam(0.1, eps_root=1e-12)):
        g = fp.grad(lambda p, opt=opt: meta_loss(opt, p, _data(), steps=3))(_params())
        assert all(torch.isfinite(x).all() for x in fp.tree.leaves(g))


def test_inplace_update_under_grad_takes_pure_path():
    """``update(..., inplace=True)`` inside fp.grad gives the pure path's meta-gradient."""
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(0.1, weight_decay=0.1))
    p0, a = _params(), _data()
    pure = fp.grad(lambda p: meta_loss(opt, p, a))(p0)
    inpl = fp.grad(lambda p: meta_loss(opt, p, a, inplace=True))(p0)
    _close(inpl, pure, rtol=0, atol=1e-14)
    _close(autograd_meta_grad(opt, p0, a), pure, rtol=1e-10, atol=1e-12)


def test_apply_updates_inplace_under_grad_raises():
    """Was: meta-gradients silently wrong by 7e-3 (the write under no_grad was invisible)."""
    opt = optim.sgd(0.1)

    def bad(p0):
        p, s = p0, opt.init(p0)
        g = fp.grad(inner_loss)(p, _data())
        u, s = opt.update(g, s, p)
        p = optim.apply_updates(p, u)  # p is now a differentiated non-leaf
        optim.apply_updates_(p, u)
        return outer_loss(p)

    with pytest.raises(
        ValueError,
        match=r"apply_updates_\(params, updates\): the step is being "
        r"differentiated.*apply_updates\(params, updates\)",
    ):
        fp.grad(bad)(_params())
    leaves = [x.requires_grad_() for x in fp.tree.leaves(_params())]
    p = fp.tree.unflatten(fp.tree.structure(_params()), [x * 1.0 for x in leaves])
    with pytest.raises(
        ValueError, match=r"apply_updates_\(params, updates\): the step is being differentiated"
    ):
        optim.apply_updates_(p, fp.tree.ones_like(p))
    # torch.optim-style use stays allowed: nn.Parameter leaves written under no_grad
    w = torch.nn.Parameter(torch.ones(3, dtype=F64))
    optim.apply_updates_({"w": w}, {"w": torch.full((3,), 0.5, dtype=F64)})
    assert torch.equal(w.detach(), torch.full((3,), 1.5, dtype=F64))


# --- hyperparameters as differentiable inputs -------------------------------------------


def _hyper_loss(factory, name, value, a, **kw):
    opt = optim.inject_hyperparams(factory)(**kw)
    p, s = _params(), opt.init(_params())
    for _ in range(STEPS):
        s.hyperparams[name] = value
        g = fp.grad(inner_loss)(p, a)
        u, s = opt.update(g, s, p)
        p = optim.apply_updates(p, u)
    return outer_loss(p)


@pytest.mark.parametrize(
    "factory, name, value, kw",
    [
        (optim.sgd, "learning_rate", 0.1, {"learning_rate": 0.1}),
        (optim.sgd, "momentum", 0.9, {"learning_rate": 0.1, "momentum": 0.9}),
        (optim.adamw, "weight_decay", 0.05, {"learning_rate": 0.1, "weight_decay": 0.05}),
        (optim.adamw, "learning_rate", 0.1, {"learning_rate": 0.1, "weight_decay": 0.05}),
    ],
)
def test_hypergradient_matches_finite_differences(factory, name, value, kw):
    a = _data()
    h = torch.tensor(value, dtype=F64)
    hg = fp.grad(lambda t: _hyper_loss(factory, name, t, a, **kw))(h)
    eps = 1e-6
    fd = (
        _hyper_loss(factory, name, h + eps, a, **kw) - _hyper_loss(factory, name, h - eps, a, **kw)
    ) / (2 * eps)
    torch.testing.assert_close(hg, fd, rtol=1e-6, atol=1e-9)
    # and with plain autograd (a hyperparameter tensor that requires grad)
    t = h.clone().requires_grad_()
    (ag,) = torch.autograd.grad(_hyper_loss(factory, name, t, a, **kw), t)
    torch.testing.assert_close(ag, hg, rtol=1e-10, atol=1e-12)


def test_hypergradient_descent_on_the_learning_rate():
    """A few steps of gradient descent on the learning rate itself lower the meta-loss."""
    a = _data()
    lr = torch.tensor(0.01, dtype=F64)
    losses = []
    for _ in range(4):
        loss, g = fp.value_and_grad(
            lambda t: _hyper_loss(optim.sgd, "learning_rate", t, a, learning_rate=0.1)
        )(lr)
        losses.append(float(loss))
        lr = lr - 0.02 * g
    assert losses == sorted(losses, reverse=True) and losses[-1] < losses[0]


def test_injected_learning_rate_keeps_float64_precision():
    """Was: stored as float32 0.10000000149. Now float64 0.1, and a float64 run matches
    torch.optim.SGD(lr=0.1) bit for bit."""
    opt = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1, momentum=0.9)
    p = _params()
    s = opt.init(p)
    lr = s.hyperparams["learning_rate"]
    assert lr.dtype == F64 and lr.item() == 0.1
    ps = [torch.nn.Parameter(x.clone()) for x in fp.tree.leaves(p)]
    ref = torch.optim.SGD(ps, lr=0.1, momentum=0.9)
    for k in range(3):
        g = _params(50 + k)
        u, s = opt.update(g, s, p)
        p = optim.apply_updates(p, u)
        for t, x in zip(ps, fp.tree.leaves(g), strict=True):
            t.grad = x.clone()
        ref.step()
    for x, y in zip(fp.tree.leaves(p), ps, strict=True):
        torch.testing.assert_close(x, y.detach(), rtol=0, atol=1e-15)
    # the old float32 value would be off by ~1.5e-9 relative, far outside that tolerance
    assert abs(torch.tensor(0.1, dtype=torch.float32).double().item() - 0.1) > 1e-9
    # schedules return float64 too, and a float32 run stays float32
    assert optim.linear_schedule(0.1, 0.0, 10)(0).dtype == F64
    p32 = fp.tree.astype(_params(), torch.float32)
    sched = optim.sgd(optim.linear_schedule(0.1, 0.0, 10))
    u, _ = sched.update(p32, sched.init(p32))
    assert all(x.dtype == torch.float32 for x in fp.tree.leaves(u))


# --- the fast paths switch off exactly when something is differentiated --------------


class _Spy:
    def __init__(self, monkeypatch, name):
        self.calls = 0
        real = getattr(torch, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(torch, name, spy)


def _adam_step(p, g, lr=0.1):
    opt = optim.adam(lr)
    return opt.update(g, opt.init(p), p)[0]


def test_fused_and_foreach_paths_on_for_plain_tensors(monkeypatch):
    fused, fe = _Spy(monkeypatch, "_fused_adam_"), _Spy(monkeypatch, "_foreach_add")
    p, g = _params(), _data()
    _adam_step(p, g)
    assert fused.calls == 1
    optim.apply_updates(p, g)
    assert fe.calls == 1
    # imperative style: nn.Parameter leaves that require grad, update under no_grad
    leaves = [torch.nn.Parameter(x) for x in fp.tree.leaves(p)]
    pp = fp.tree.unflatten(fp.tree.structure(p), leaves)
    with torch.no_grad():
        _adam_step(pp, g)
    assert fused.calls == 2


@pytest.mark.parametrize(
    "how", ["fp.grad", "autograd", "jvp", "forward_ad", "vmap", "lr_requires_grad"]
)
def test_fast_paths_off_when_differentiated(monkeypatch, how):
    names = [
        "_fused_adam_",
        "_foreach_add",
        "_foreach_mul",
        "_foreach_lerp",
        "_foreach_addcmul_",
        "_foreach_sqrt",
    ]
    spies = [_Spy(monkeypatch, n) for n in names]
    p, g = _params(), _data()
    ref = _adam_step(p, g)
    for s in spies:
        s.calls = 0
    if how == "fp.grad":
        out = fp.grad(
            lambda q: outer_loss(optim.apply_updates(q, _adam_step(q, fp.grad(inner_loss)(q, g))))
        )(p)
    elif how == "autograd":  # inner gradients with create_graph=True, as in MAML
        leaves = [x.clone().requires_grad_() for x in fp.tree.leaves(p)]
        q = fp.tree.unflatten(fp.tree.structure(p), leaves)
        gq = torch.autograd.grad(inner_loss(q, g), leaves, create_graph=True)
        gq = fp.tree.unflatten(fp.tree.structure(p), list(gq))
        out = _adam_step(q, gq)
        torch.autograd.grad(outer_loss(optim.apply_updates(q, out)), leaves)
        gq = fp.tree.detach(gq)
    elif how == "jvp":
        out = torch.func.jvp(lambda q: _adam_step(q, g), (p,), (p,))[0]
        _close(out, ref, rtol=1e-15, atol=1e-15)
    elif how == "forward_ad":
        with fwAD.dual_level():
            q = fp.tree.map(lambda x: fwAD.make_dual(x, torch.ones_like(x)), p)
            out = fp.tree.map(lambda x: fwAD.unpack_dual(x).primal, _adam_step(q, g))
        _close(out, ref, rtol=1e-15, atol=1e-15)
    elif how == "vmap":
        out = torch.func.vmap(lambda q: _adam_step(q, g))(fp.tree.stack([p, p]))
        _close(fp.tree.unstack(out)[1], ref, rtol=1e-15, atol=1e-15)
    else:
        lr = torch.tensor(0.1, dtype=F64, requires_grad=True)
        out = _adam_step(p, g, lr)
        (d,) = torch.autograd.grad(outer_loss(optim.apply_updates(p, out)), lr)
        assert torch.isfinite(d)
    calls = [s.calls for s in spies]
    assert calls == [0] * len(spies), dict(zip(names, calls, strict=True))
    if how == "autograd":  # the pure path gives the fused kernel's numbers
        _close(fp.tree.detach(out), _adam_step(p, gq), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize(
    "make",
    [
        lambda: optim.sgd(optim.linear_schedule(0.1, 0.0, 10)),
        lambda: optim.rmsprop(optim.linear_schedule(0.1, 0.0, 10), momentum=0.9),
        lambda: optim.adamw(optim.linear_schedule(0.1, 0.0, 10)),
        lambda: optim.inject_hyperparams(optim.sgd)(learning_rate=0.1, momentum=0.9),
        lambda: optim.inject_hyperparams(optim.nadam)(learning_rate=0.1),
        lambda: optim.inject_hyperparams(optim.lamb)(learning_rate=0.1),
    ],
)
def test_float32_scalar_leaves_keep_their_dtype(make):
    """float64 schedule values and injected hyperparameters must not promote a 0-d
    float32 leaf (0-d times 0-d promotes): NOTE [scalar dtype]. Checked against the
    same optimizer with Python-number hyperparameters, run in float64 then rounded."""
    opt = make()
    p = {"a": torch.linspace(-1, 1, 3), "b": torch.tensor(0.5)}
    s = opt.init(p)
    for k in range(3):
        g = {"a": torch.cos(p["a"] * (k + 1)), "b": torch.sin(p["b"] * (k + 1))}
        u, s = opt.update(g, s, p)
        assert {k2: v.dtype for k2, v in u.items()} == {"a": torch.float32, "b": torch.float32}
        p = optim.apply_updates(p, u)
    p64 = fp.tree.astype({"a": torch.linspace(-1, 1, 3), "b": torch.tensor(0.5)}, F64)
    s64 = opt.init(p64)
    for k in range(3):
        g = {"a": torch.cos(p64["a"] * (k + 1)), "b": torch.sin(p64["b"] * (k + 1))}
        u, s64 = opt.update(g, s64, p64)
        p64 = optim.apply_updates(p64, u)
    _close(p, fp.tree.astype(p64, torch.float32), rtol=1e-5, atol=1e-6)
