"""Issue 14 part B: the optimizers added for optax 0.2.8 completeness.

Each one is checked against an independent reference, in float64:
* ``torch.optim`` where it has the algorithm (Adam(amsgrad=True), Rprop, NAdam with a
  constant momentum coefficient and decoupled decay, Adamax), 100 steps, 1e-10;
* otherwise a hand-written numpy loop of the published (optax) update rule, 40 steps;
* optax's documented defaults (the signatures).
The property registry (``optim_registry.py``) covers purity, in-place, vmap, checkpoints,
validation and differentiability for all of them.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from test_optim_parity import _grads
from test_optim_parity import _leaves
from test_optim_parity import _params
from test_optim_parity import run_fp
from test_optim_parity import run_torch

from functorch_pipeline import optim

T = torch.optim
STEPS = 40

TORCH_CASES = {
    "amsgrad_torch_order": (
        lambda ps: T.Adam(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, amsgrad=True),
        optim.amsgrad(1e-2, 0.9, 0.99, 1e-8, debias_after_max=True),
    ),
    "rprop": (
        lambda ps: T.Rprop(ps, lr=1e-2, etas=(0.4, 1.3), step_sizes=(1e-4, 0.05)),
        optim.rprop(1e-2, 0.4, 1.3, 1e-4, 0.05),
    ),
    "nadamw": (
        lambda ps: T.NAdam(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                           momentum_decay=1e9, decoupled_weight_decay=True),
        optim.nadamw(1e-2, 0.9, 0.999, 1e-8, weight_decay=0.1),
    ),
    "nadam_constant_momentum": (
        lambda ps: T.NAdam(ps, lr=1e-2, momentum_decay=1e9),
        optim.nadam(1e-2),
    ),
    "adamaxw_no_decay": (lambda ps: T.Adamax(ps, lr=2e-3), optim.adamaxw(2e-3, weight_decay=0.0)),
}


@pytest.mark.parametrize("name", sorted(TORCH_CASES))
def test_matches_torch_optim(name):
    make, opt = TORCH_CASES[name]
    want = run_torch(make)
    got = _leaves(run_fp(opt))
    moved = max(float((w - p).abs().max()) for w, p in zip(want, _leaves(_params()), strict=True))
    assert moved > 1e-3
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_optax_amsgrad_differs_from_torch_order():
    """optax's amsgrad keeps the max of the *debiased* moment: a different trajectory."""
    want = run_torch(lambda ps: T.Adam(ps, lr=1e-2, betas=(0.9, 0.99), amsgrad=True))
    got = _leaves(run_fp(optim.amsgrad(1e-2, 0.9, 0.99)))
    assert max(float((w - g).abs().max()) for w, g in zip(want, got, strict=True)) > 1e-6


# --- hand-written references (numpy, float64) ------------------------------------------


def _np(tree):
    return [x.numpy().copy() for x in _leaves(tree)]


def run_ref(step, steps=STEPS):
    """``step(t, grads, params, state) -> updates`` over numpy leaves; returns params."""
    params = _np(_params())
    state: dict = {}
    for t, g in enumerate(_grads(steps), start=1):
        u = step(t, _np(g), params, state)
        params = [p + d for p, d in zip(params, u, strict=True)]
    return params


def _check(opt, step, steps=STEPS, atol=1e-11):
    want = run_ref(step, steps)
    got = [x.numpy() for x in _leaves(run_fp(opt, steps=steps))]
    assert max(np.abs(w - p).max() for w, p in zip(want, _np(_params()), strict=True)) > 1e-3
    for w, g in zip(want, got, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=atol)


def _zeros(s, k, like, value=0.0):
    if k not in s:
        s[k] = [np.full_like(x, value) for x in like]
    return s[k]


def test_amsgrad_optax_rule():
    lr, b1, b2, eps = 1e-2, 0.9, 0.99, 1e-8

    def step(t, g, p, s):
        m, v, vmax = _zeros(s, "m", g), _zeros(s, "v", g), _zeros(s, "x", g)
        out = []
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi**2
            vmax[i] = np.maximum(vmax[i], v[i] / (1 - b2**t))
            out.append(-lr * (m[i] / (1 - b1**t)) / (np.sqrt(vmax[i]) + eps))
        return out

    _check(optim.amsgrad(lr, b1, b2, eps), step)


@pytest.mark.parametrize("nesterov", [False, True])
def test_adabelief_rule(nesterov):
    lr, b1, b2, eps, eps_root = 1e-2, 0.9, 0.999, 1e-16, 1e-16

    def step(t, g, p, s):
        m, sv = _zeros(s, "m", g), _zeros(s, "s", g)
        out = []
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            e = gi - m[i]  # the updated first moment (optax 0.2.8, paper Alg. 2)
            sv[i] = b2 * sv[i] + (1 - b2) * e**2 + eps_root
            if nesterov:
                mh = b1 * m[i] / (1 - b1 ** (t + 1)) + (1 - b1) * gi / (1 - b1**t)
            else:
                mh = m[i] / (1 - b1**t)
            out.append(-lr * mh / (np.sqrt(sv[i] / (1 - b2**t)) + eps))
        return out

    _check(optim.adabelief(lr, nesterov=nesterov), step)


def test_yogi_rule():
    lr, b1, b2, eps, v0 = 1e-2, 0.9, 0.999, 1e-3, 1e-6

    def step(t, g, p, s):
        m, v = _zeros(s, "m", g, v0), _zeros(s, "v", g, v0)
        out = []
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = v[i] - (1 - b2) * np.sign(v[i] - gi**2) * gi**2
            out.append(-lr * (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps))
        return out

    _check(optim.yogi(lr), step)


def test_novograd_rule():
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.25, 1e-6, 0.05

    def step(t, g, p, s):
        m = _zeros(s, "m", g)
        v = s.setdefault("v", [0.0] * len(g))
        out = []
        for i, gi in enumerate(g):
            n2 = float((gi**2).sum())
            v[i] = n2 if t == 1 else b2 * v[i] + (1 - b2) * n2
            a = gi / (np.sqrt(v[i]) + eps) + wd * p[i]
            m[i] = a if t == 1 else b1 * m[i] + a
            out.append(-lr * m[i])
        return out

    _check(optim.novograd(lr, weight_decay=wd), step)


def test_adamaxw_rule():
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-8, 0.1

    def step(t, g, p, s):
        m, u = _zeros(s, "m", g), _zeros(s, "u", g)
        out = []
        for i, gi in enumerate(g):
            m[i] = b1 * m[i] + (1 - b1) * gi
            u[i] = np.maximum(b2 * u[i], np.abs(gi) + eps)
            out.append(-lr * (m[i] / (1 - b1**t) / u[i] + wd * p[i]))
        return out

    _check(optim.adamaxw(lr, weight_decay=wd), step)


def test_sign_sgd_rule():
    lr = 1e-2
    _check(optim.sign_sgd(lr), lambda t, g, p, s: [-lr * np.sign(x) for x in g])


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_rule(nesterov):
    lr, wd, c, mu, eps = 0.5, 1e-3, 1e-3, 0.9, 1e-9

    def step(t, g, p, s):
        tr = _zeros(s, "t", g)
        out = []
        for i, (gi, pi) in enumerate(zip(g, p, strict=True)):
            d = gi + wd * pi
            pn, dn = np.linalg.norm(pi), np.linalg.norm(d)
            ratio = 1.0 if pn == 0 or dn == 0 else c * pn / (dn + eps)
            d = -lr * ratio * d
            tr[i] = d + mu * tr[i]
            out.append(d + mu * tr[i] if nesterov else tr[i])
        return out

    _check(optim.lars(lr, wd, trust_coefficient=c, eps=eps, momentum=mu, nesterov=nesterov), step)


def test_rprop_rule_not_stale():
    """The first Rprop step moves every parameter (optax 0.2.8's emits zeros)."""
    p = {"w": torch.zeros(3, dtype=torch.float64)}
    opt = optim.rprop(0.1)
    u, _ = opt.update({"w": torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)}, opt.init(p), p)
    torch.testing.assert_close(u["w"], torch.tensor([-0.1, 0.1, 0.0], dtype=torch.float64))


def test_fromage_rule():
    lr, min_norm = 0.05, 1e-6

    def step(t, g, p, s):
        out = []
        for gi, pi in zip(g, p, strict=True):
            pn, gn = max(np.linalg.norm(pi), min_norm), max(np.linalg.norm(gi), min_norm)
            new = (pi - lr * pn / gn * gi) / np.sqrt(1 + lr**2)
            out.append(new - pi)
        return out

    _check(optim.fromage(lr), step)


def test_optimistic_gradient_descent_rule():
    lr, a, b = 1e-2, 1.0, 0.5

    def step(t, g, p, s):
        prev = s.get("prev", g)
        s["prev"] = g
        return [-lr * ((a + b) * gi - b * qi) for gi, qi in zip(g, prev, strict=True)]

    _check(optim.optimistic_gradient_descent(lr, a, b), step)


def test_noisy_sgd_is_add_noise_then_lr():
    p = {"w": torch.zeros(50, dtype=torch.float64)}
    a = optim.noisy_sgd(0.1, eta=0.2, gamma=0.5, key=7)
    b = optim.chain(optim.add_noise(0.2, 0.5, key=7), optim.scale(-0.1))
    sa, sb = a.init(p), b.init(p)
    for t in range(3):
        g = {"w": torch.full((50,), float(t), dtype=torch.float64)}
        ua, sa = a.update(g, sa)
        ub, sb = b.update(g, sb)
        torch.testing.assert_close(ua["w"], ub["w"], rtol=0, atol=0)
        assert float((ua["w"] + 0.1 * g["w"]).std()) > 0  # there is noise


@pytest.mark.parametrize("mode", ["hard", "smooth", "refined"])
def test_scale_by_lion_modes(mode):
    lr, b1, b2, beta = 0.05, 0.9, 0.99, 3.0
    sign = {"hard": np.sign, "smooth": lambda x: np.tanh(beta * x),
            "refined": lambda x: np.where(np.abs(x) < 1.0, x, np.sign(x))}[mode]

    def step(t, g, p, s):
        m = _zeros(s, "m", g)
        out = []
        for i, gi in enumerate(g):
            out.append(-lr * sign(b1 * m[i] + (1 - b1) * gi))
            m[i] = b2 * m[i] + (1 - b2) * gi
        return out

    opt = optim.chain(optim.scale_by_lion(b1, b2, mode=mode, smooth_beta=beta),
                      optim.scale_by_learning_rate(lr))
    _check(opt, step)
    with pytest.raises(ValueError, match=r"scale_by_lion\(mode\): must be 'hard'"):
        optim.scale_by_lion(mode="soft")


# --- adafactor ------------------------------------------------------------------------


def _adafactor_ref(lr, min_dim, clip, momentum, wd, eps=1e-30, decay=0.8):
    def step(t, g, p, s):
        vr = s.setdefault("vr", [None] * len(g))
        vc = s.setdefault("vc", [None] * len(g))
        v = s.setdefault("v", [None] * len(g))
        mom = _zeros(s, "mom", g)
        beta = 1.0 - float(t) ** (-decay)  # step t from 1: (count + 1)
        out = []
        for i, (gi, pi) in enumerate(zip(g, p, strict=True)):
            g2 = gi**2 + eps
            shape = gi.shape
            factored = len(shape) >= 2 and sorted(shape)[-2] >= min_dim
            if factored:
                order = sorted(range(len(shape)), key=lambda k: shape[k])
                d1, d0 = order[-2], order[-1]
                r = g2.mean(axis=d0)
                cc = g2.mean(axis=d1)
                vr[i] = r if vr[i] is None else beta * vr[i] + (1 - beta) * r
                vc[i] = cc if vc[i] is None else beta * vc[i] + (1 - beta) * cc
                rd1 = d1 - 1 if d1 > d0 else d1
                row = (vr[i] / vr[i].mean(axis=rd1, keepdims=True)) ** -0.5
                col = vc[i] ** -0.5
                u = gi * np.expand_dims(row, d0) * np.expand_dims(col, d1)
            else:
                v[i] = g2 if v[i] is None else beta * v[i] + (1 - beta) * g2
                u = gi / np.sqrt(v[i])
            rms = np.sqrt((u**2).mean())
            u = u / max(1.0, rms / clip)
            u = lr * u * max(np.sqrt((pi**2).mean()), 1e-3)
            if momentum is not None:
                mom[i] = momentum * mom[i] + (1 - momentum) * u
                u = mom[i]
            out.append(-(u + wd * pi))
        return out

    return step


@pytest.mark.parametrize("min_dim", [2, 128])
def test_adafactor_rule(min_dim):
    """Factored (min_dim=2: conv and fc weights) and unfactored (128) second moments."""
    lr, clip, mom, wd = 0.05, 1.0, 0.9, 1e-3
    opt = optim.adafactor(lr, min_dim_size_to_factor=min_dim, momentum=mom, weight_decay_rate=wd)
    _check(opt, _adafactor_ref(lr, min_dim, clip, mom, wd), atol=1e-10)


def test_adafactor_factored_state_is_small():
    opt = optim.adafactor(0.1, min_dim_size_to_factor=4)
    s = opt.init({"w": torch.zeros(6, 5, dtype=torch.float64)})
    fs = s[0]
    assert tuple(fs.v_row["w"].shape) == (5,) and tuple(fs.v_col["w"].shape) == (6,)
    assert tuple(fs.v["w"].shape) == (1,)


# --- optax's documented defaults -------------------------------------------------------

OPTAX_DEFAULTS = {  # from optax 0.2.8's API reference (optax/_src/alias.py)
    "adabelief": {"b1": 0.9, "b2": 0.999, "eps": 1e-16, "eps_root": 1e-16, "nesterov": False},
    "adafactor": {"learning_rate": None, "min_dim_size_to_factor": 128, "decay_rate": 0.8,
                  "decay_offset": 0, "multiply_by_parameter_scale": True,
                  "clipping_threshold": 1.0, "momentum": None, "weight_decay_rate": None,
                  "eps": 1e-30, "factored": True, "weight_decay_mask": None},
    "adamaxw": {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 1e-4, "mask": None},
    "amsgrad": {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 0.0, "mu_dtype": None},
    "lars": {"weight_decay": 0.0, "weight_decay_mask": True, "trust_coefficient": 0.001,
             "eps": 0.0, "trust_ratio_mask": True, "momentum": 0.9, "nesterov": False},
    "nadamw": {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 0.0, "mu_dtype": None,
               "weight_decay": 1e-4, "mask": None, "nesterov": True},
    "nadam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "eps_root": 0.0, "mu_dtype": None,
              "nesterov": True},
    "novograd": {"b1": 0.9, "b2": 0.25, "eps": 1e-6, "eps_root": 0.0, "weight_decay": 0.0},
    "rprop": {"eta_minus": 0.5, "eta_plus": 1.2, "min_step_size": 1e-6, "max_step_size": 50.0},
    "yogi": {"b1": 0.9, "b2": 0.999, "eps": 1e-3},
    "fromage": {"min_norm": 1e-6},
    "noisy_sgd": {"eta": 0.01, "gamma": 0.55},
    "optimistic_gradient_descent": {"alpha": 1.0, "beta": 1.0},
    "scale_by_param_block_norm": {"min_scale": 1e-3},
    "scale_by_yogi": {"eps_root": 0.0, "initial_accumulator_value": 1e-6},
    "scale_by_novograd": {"eps": 1e-8, "mu_dtype": None},
    "scale_by_factored_rms": {"factored": True, "decay_rate": 0.8, "step_offset": 0,
                              "min_dim_size_to_factor": 128, "epsilon": 1e-30},
    "reduce_on_plateau": {"factor": 0.1, "patience": 10, "rtol": 1e-4, "atol": 0.0,
                          "cooldown": 0, "accumulation_size": 1, "min_scale": 0.0},
    "lookahead": {"reset_state": False},
    "adaptive_grad_clip": {"eps": 1e-3},
    "apply_every": {"k": 1},
    "linear_onecycle_schedule": {"pct_start": 0.3, "pct_final": 0.85, "div_factor": 25.0,
                                 "final_div_factor": 1e4},
}


@pytest.mark.parametrize("name", sorted(OPTAX_DEFAULTS))
def test_optax_defaults(name):
    sig = inspect.signature(getattr(optim, name))
    for arg, want in OPTAX_DEFAULTS[name].items():
        assert sig.parameters[arg].default == want, (name, arg)


def test_sign_sgd_and_nadam_signatures():
    assert list(inspect.signature(optim.sign_sgd).parameters) == ["learning_rate"]
    # optax 0.2.8: nadam = functools.partial(adam, nesterov=True)
    p = {"w": torch.linspace(-1, 1, 4, dtype=torch.float64)}
    gs = [{"w": torch.cos(torch.arange(4.0, dtype=torch.float64) * k)} for k in range(5)]
    for a, b in ((optim.nadam(0.1), optim.adam(0.1, nesterov=True)),
                 (optim.nadam(0.1, nesterov=False), optim.adam(0.1))):
        sa, sb, pa, pb = a.init(p), b.init(p), p, p
        for g in gs:
            ua, sa = a.update(g, sa, pa)
            ub, sb = b.update(g, sb, pb)
            pa, pb = optim.apply_updates(pa, ua), optim.apply_updates(pb, ub)
        torch.testing.assert_close(pa["w"], pb["w"], rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(
    b1=st.floats(0.0, 0.99), b2=st.floats(0.5, 0.999), lr=st.floats(1e-4, 0.1),
    seed=st.integers(0, 2**16),
)
def test_amsgrad_torch_order_property(b1, b2, lr, seed):
    """amsgrad(debias_after_max=True) == torch's AMSGrad for random hyperparameters."""
    gen = torch.Generator().manual_seed(seed)
    p0 = torch.randn(4, dtype=torch.float64, generator=gen)
    gs = [torch.randn(4, dtype=torch.float64, generator=gen) for _ in range(8)]
    w = torch.nn.Parameter(p0.clone())
    o = T.Adam([w], lr=lr, betas=(b1, b2), amsgrad=True)
    opt = optim.amsgrad(lr, b1, b2, debias_after_max=True)
    p, s = {"w": p0.clone()}, opt.init({"w": p0})
    for g in gs:
        w.grad = g.clone()
        o.step()
        u, s = opt.update({"w": g}, s, p)
        p = optim.apply_updates(p, u)
    torch.testing.assert_close(p["w"], w.detach(), rtol=0, atol=1e-12)
