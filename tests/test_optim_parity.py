"""Every named optimizer that torch.optim has matches it for 100 float64 steps (1e-10).

The fp arguments are exactly the ones each docstring names as reproducing torch.
lion and lamb have no torch.optim counterpart: they are checked against a hand-written
per-tensor loop of the published rule.
"""

import math

import pytest
import torch

from functorch_pipeline import optim

STEPS = 100
SHAPES = {"conv": (4, 1, 3, 3), "fc": {"w": (5, 6), "b": (5,)}, "s": ()}


def _tree(shapes, gen, scale=1.0):
    if isinstance(shapes, dict):
        return {k: _tree(v, gen, scale) for k, v in shapes.items()}
    return torch.randn(shapes, generator=gen, dtype=torch.float64) * scale


def _leaves(t):
    if isinstance(t, dict):
        return [x for k in sorted(t) for x in _leaves(t[k])]
    return [t]


def _grads(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [_tree(SHAPES, gen) for _ in range(n)]


def _params(seed=0):
    return _tree(SHAPES, torch.Generator().manual_seed(seed))


def run_fp(opt, steps=STEPS, inplace=False, params=None):
    params = _params() if params is None else params
    params = {k: (v.clone() if torch.is_tensor(v) else {a: b.clone() for a, b in v.items()}) for k, v in params.items()}
    state = opt.init(params)
    for g in _grads(steps):
        if inplace:
            upd, state = opt.update(g, state, params, inplace=True)
            params = optim.apply_updates_(params, upd)
        else:
            upd, state = opt.update(g, state, params)
            params = optim.apply_updates(params, upd)
    return params


def run_torch(make, steps=STEPS):
    # torch.optim keeps scalar state (NAdam's mu_product) in float32 unless the default
    # dtype is float64; our scalar maths follows the parameters' dtype.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ps = [torch.nn.Parameter(x.clone()) for x in _leaves(_params())]
        o = make(ps)
        for g in _grads(steps):
            for p, gi in zip(ps, _leaves(g), strict=True):
                p.grad = gi.clone()
            o.step()
    finally:
        torch.set_default_dtype(old)
    return [p.detach() for p in ps]


T = torch.optim
CASES = {
    "sgd": (lambda ps: T.SGD(ps, lr=0.05), optim.sgd(0.05)),
    "sgd_momentum": (lambda ps: T.SGD(ps, lr=0.05, momentum=0.9), optim.sgd(0.05, 0.9)),
    "sgd_nesterov": (lambda ps: T.SGD(ps, lr=0.05, momentum=0.9, nesterov=True), optim.sgd(0.05, 0.9, True)),
    "sgd_wd_dampening": (
        lambda ps: T.SGD(ps, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.01),
        optim.chain(optim.add_decayed_weights(0.01), optim.sgd(0.05, 0.8, dampening=0.3)),
    ),
    "adam": (lambda ps: T.Adam(ps, lr=1e-2, betas=(0.9, 0.999), eps=1e-8), optim.adam(1e-2, 0.9, 0.999, 1e-8)),
    "adam_wd": (
        lambda ps: T.Adam(ps, lr=1e-2, weight_decay=0.1),
        optim.chain(optim.add_decayed_weights(0.1), optim.adam(1e-2)),
    ),
    "adamw": (lambda ps: T.AdamW(ps, lr=1e-2, weight_decay=1e-2), optim.adamw(1e-2, weight_decay=1e-2)),
    "nadam": (lambda ps: T.NAdam(ps, lr=1e-2), optim.nadam(1e-2, momentum_decay=4e-3)),
    "radam": (lambda ps: T.RAdam(ps, lr=1e-2), optim.radam(1e-2, threshold=5.0, eps_before_bias_correction=True)),
    "adamax": (lambda ps: T.Adamax(ps, lr=2e-3), optim.adamax(2e-3)),
    "rmsprop": (lambda ps: T.RMSprop(ps, lr=1e-2), optim.rmsprop(1e-2, decay=0.99, eps=1e-8, eps_in_sqrt=False)),
    "rmsprop_centered_momentum": (
        lambda ps: T.RMSprop(ps, lr=1e-2, alpha=0.9, momentum=0.5, centered=True),
        optim.rmsprop(1e-2, decay=0.9, eps_in_sqrt=False, centered=True, momentum=0.5),
    ),
    "adagrad": (
        lambda ps: T.Adagrad(ps, lr=1e-1),
        optim.adagrad(1e-1, initial_accumulator_value=0.0, eps=1e-10, eps_in_sqrt=False),
    ),
    "adadelta": (
        lambda ps: T.Adadelta(ps, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.01),
        optim.adadelta(1.0, rho=0.9, eps=1e-6, weight_decay=0.01),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_torch_optim(name):
    make, opt = CASES[name]
    want = run_torch(make)
    got = _leaves(run_fp(opt))
    moved = max(float((w - p).abs().max()) for w, p in zip(want, _leaves(_params()), strict=True))
    assert moved > 1e-3  # the trajectory went somewhere
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inplace_path_is_bit_identical(name):
    _, opt = CASES[name]
    pure = _leaves(run_fp(opt, steps=20))
    inpl = _leaves(run_fp(opt, steps=20, inplace=True))
    for a, b in zip(pure, inpl, strict=True):
        assert torch.equal(a, b)


def test_radam_optax_eps_placement_differs_from_torch():
    want = run_torch(lambda ps: T.RAdam(ps, lr=1e-2, eps=1e-3))
    got = _leaves(run_fp(optim.radam(1e-2, eps=1e-3)))
    assert max(float((w - g).abs().max()) for w, g in zip(want, got, strict=True)) > 1e-8


def test_nadam_optax_form_differs_from_torch():
    want = run_torch(lambda ps: T.NAdam(ps, lr=1e-2))
    got = _leaves(run_fp(optim.nadam(1e-2)))
    assert max(float((w - g).abs().max()) for w, g in zip(want, got, strict=True)) > 1e-6


def _sign(x):
    return (x > 0) - (x < 0)


def test_lion_matches_reference_loop():
    lr, b1, b2, wd = 1e-2, 0.9, 0.99, 1e-2
    got = _leaves(run_fp(optim.lion(lr, b1, b2, weight_decay=wd), steps=30))
    ps = [x.clone().reshape(-1).tolist() for x in _leaves(_params())]
    ms = [[0.0] * len(p) for p in ps]
    for g in _grads(30):
        for p, m, gt in zip(ps, ms, _leaves(g), strict=True):
            gl = gt.reshape(-1).tolist()
            for i in range(len(p)):
                c = b1 * m[i] + (1 - b1) * gl[i]
                p[i] = p[i] - lr * (_sign(c) + wd * p[i])
                m[i] = b2 * m[i] + (1 - b2) * gl[i]
    for p, g in zip(ps, got, strict=True):
        torch.testing.assert_close(g.reshape(-1), torch.tensor(p, dtype=torch.float64), rtol=0, atol=1e-12)


def test_lamb_matches_reference_loop():
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.999, 1e-6, 1e-2
    got = _leaves(run_fp(optim.lamb(lr, b1, b2, eps, weight_decay=wd), steps=30))
    ps = [x.clone().reshape(-1).tolist() for x in _leaves(_params())]
    ms = [[0.0] * len(p) for p in ps]
    vs = [[0.0] * len(p) for p in ps]
    for t, g in enumerate(_grads(30), start=1):
        for p, m, v, gt in zip(ps, ms, vs, _leaves(g), strict=True):
            gl = gt.reshape(-1).tolist()
            u = []
            for i in range(len(p)):
                m[i] = b1 * m[i] + (1 - b1) * gl[i]
                v[i] = b2 * v[i] + (1 - b2) * gl[i] ** 2
                mh, vh = m[i] / (1 - b1**t), v[i] / (1 - b2**t)
                u.append(mh / (math.sqrt(vh) + eps) + wd * p[i])
            pn = math.sqrt(sum(x * x for x in p))
            un = math.sqrt(sum(x * x for x in u))
            ratio = 1.0 if pn == 0 or un == 0 else pn / un
            for i in range(len(p)):
                p[i] = p[i] - lr * ratio * u[i]
    for p, g in zip(ps, got, strict=True):
        torch.testing.assert_close(g.reshape(-1), torch.tensor(p, dtype=torch.float64), rtol=0, atol=1e-12)
