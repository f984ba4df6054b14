"""fp.optim defects found by the second sweep (schedules, wrappers, less common optimizers):

* N1: an update must never share buffers with the state when something may write into it
  (``trace`` followed by weight decay stored the decay term in the momentum);
* N2: a mask written for all the parameters works for a transformation inside
  masked / partition / multi_transform (optax's usual weight-decay mask);
* N3: wrappers drop extra keyword arguments for inner transformations that take none;
* N4: schedules as weight decay (optax's ``ScalarOrSchedule``);
* N5: ``fromage`` with a 0-d tensor learning rate (``inject_hyperparams(fromage)``);
* N6: schedule edges: negative counts and ``warmup_constant_schedule`` without warmup.

Each test checks a closed form written here in float64 or ``torch.optim``; the ``*_optax``
tests compare with optax 0.2.8 (float64) and are skipped when it is not installed."""

from __future__ import annotations

import functools
import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import functorch_pipeline as fp
from functorch_pipeline import optim

F64 = torch.float64
F32 = torch.float32


def _optax():
    """(optax, jax.numpy) with float64 enabled, or skip the test."""
    pytest.importorskip("optax")
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp
    import optax

    return optax, jnp


# --- N1: updates and states never share buffers that are written -----------------------


@functools.cache
def _p_cached(n):
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(n, generator=g, dtype=F64), "s": torch.randn((), generator=g, dtype=F64)}


def _p(n):
    return {k: v.clone() for k, v in _p_cached(n).items()}


@functools.cache
def _gr_cached(n, k, stride0):
    g = torch.Generator().manual_seed(10 + k)
    if stride0:  # autograd's gradient of p.sum(): in-place writes refused, pure path taken
        return {"w": torch.randn((), generator=g, dtype=F64).expand(n), "s": torch.randn((), generator=g, dtype=F64)}
    return {"w": torch.randn(n, generator=g, dtype=F64), "s": torch.randn((), generator=g, dtype=F64)}


def _gr(n, k, stride0=False):
    """Fresh gradient tensors (in-place calls take them); a stride-0 leaf stays a view."""
    return {key: v if v.stride() == (0,) else v.clone() for key, v in _gr_cached(n, k, stride0).items()}


_TAILS = {
    "wd": [("wd", 0.1)],
    "wd_clip_lr": [("wd", 0.1), ("clip", 0.5), ("scale", -0.1)],
    "lr": [("scale", -0.1)],
    "clip": [("clip", 0.5)],
    "lr_wd": [("scale", -0.1), ("wd", 0.1)],
    "none": [],
}


def _momentum_closed_form(decay, damp, nesterov, tail, n, stride0, steps):
    """``t <- g + d t`` (torch's dampened form after a first ``t = g`` when ``damp``), the
    update ``t`` (``g + d t`` with nesterov), then the tail ops, in float64."""
    p = _p(n)
    t = {k: torch.zeros_like(v) for k, v in p.items()}
    out = []
    for k in range(steps):
        g = _gr(n, k, stride0)
        for key in p:
            if damp:
                t[key] = decay * t[key] + (1 - damp) * g[key] if k else g[key].clone()
            else:
                t[key] = g[key] + decay * t[key]
        u = {key: g[key] + decay * t[key] if nesterov else t[key].clone() for key in p}
        for op, x in tail:
            if op == "wd":
                u = {key: u[key] + x * p[key] for key in p}
            elif op == "scale":
                u = {key: u[key] * x for key in p}
            else:
                norm = torch.sqrt(sum((v * v).sum() for v in u.values()))
                f = x / torch.maximum(norm, torch.tensor(x, dtype=F64))
                u = {key: u[key] * f for key in p}
        out.append(u)
        p = {key: p[key] + u[key] for key in p}
    return out


def _tail_tx(tail):
    make = {"wd": optim.add_decayed_weights, "scale": optim.scale, "clip": optim.clip_by_global_norm}
    return [make[op](x) for op, x in tail]


@pytest.mark.parametrize("damp,nesterov,acc", list(itertools.product([0.0, 0.3], [False, True], [None, F64])))
def test_trace_then_affine_tail_matches_closed_form(damp, nesterov, acc):
    """``chain(trace, add_decayed_weights, ...)``: trace's fused update handed out the new
    momentum buffers and added ``wd * params`` into them (pure path; also in place with
    dampening), with an accumulator dtype a later in-place transform wrote into them, and
    sgd with dampening in place on >= 65536 elements multiplied the momentum by the
    learning rate. Pure and in place, small and large leaves, a stride-0 gradient (the
    in-place path falls back to pure) against the closed form."""
    for tail, n, stride0, inplace in itertools.product(_TAILS, [5, 70000], [False, True], [False, True]):
        ref = _momentum_closed_form(0.9, damp, nesterov, _TAILS[tail], n, stride0, 4)
        tx = optim.chain(optim.trace(0.9, nesterov, acc, dampening=damp), *_tail_tx(_TAILS[tail]))
        p = _p(n)
        s = tx.init(p)
        for k in range(4):
            g = _gr(n, k, stride0)
            if inplace:
                g = {key: v if stride0 and key == "w" else v.clone() for key, v in g.items()}
                u, s = tx.update(g, s, p, inplace=True)
            else:
                u, s = tx.update(g, s, p)
            for key in p:
                ctx = f"{tail} n={n} stride0={stride0} inplace={inplace} step {k} leaf {key}"
                torch.testing.assert_close(u[key], ref[k][key], rtol=1e-12, atol=1e-12,
                                           msg=lambda m, ctx=ctx: f"{ctx}: {m}")
            p = {key: p[key] + u[key] for key in p}


def test_sgd_dampening_in_place_large_matches_torch_optim():
    """``sgd(lr, momentum, dampening=...)`` with ``inplace=True`` on a leaf of >= 65536
    elements wrote ``lr * trace`` into the momentum buffer (0.42 off torch.optim at step 2)."""
    g0 = torch.Generator().manual_seed(3)
    w0 = torch.randn(300, 300, generator=g0, dtype=F64)
    grads = [torch.randn(300, 300, generator=g0, dtype=F64) for _ in range(4)]
    w = torch.nn.Parameter(w0.clone())
    ref = torch.optim.SGD([w], lr=0.1, momentum=0.9, dampening=0.2)
    tx = optim.sgd(0.1, 0.9, dampening=0.2)
    p = {"w": w0.clone()}
    s = tx.init(p)
    for g in grads:
        w.grad = g.clone()
        ref.step()
        u, s = tx.update({"w": g.clone()}, s, p, inplace=True)
        p = optim.apply_updates_(p, u)
        torch.testing.assert_close(p["w"], w.detach(), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("acc", [None, F64])
def test_ema_update_is_not_its_state_when_in_place_was_asked(acc):
    """``ema(debias=False)`` falling back to the pure path under ``inplace=True`` (a stride-0
    gradient) returned its new state as the update; the next transform of the chain then
    scaled the stored average in place."""
    n = 6
    tx = optim.chain(optim.ema(0.5, debias=False, accumulator_dtype=acc), optim.clip_by_global_norm(0.1))
    p = _p(n)
    s = tx.init(p)
    e = {k: torch.zeros_like(v) for k, v in p.items()}
    for k in range(3):
        g = _gr(n, k, stride0=True)
        e = {key: 0.5 * e[key] + 0.5 * g[key] for key in p}
        u, s = tx.update({"w": g["w"], "s": g["s"].clone()}, s, p, inplace=True)
        for key in p:
            torch.testing.assert_close(s[0].ema[key], e[key], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", ["rmsprop_momentum", "trace_dampening", "trace_accumulator"])
def test_flat_chain_ending_in_momentum_then_weight_decay(name):
    """A flat chain whose momentum is followed by a user ``add_decayed_weights`` (fused into
    trace): the decay was added into the stored momentum. The chain must equal the same
    chain without the decay plus ``wd * params`` (a separate instance)."""
    head = {
        "rmsprop_momentum": lambda: [optim.scale_by_rms(), optim.scale(-0.1), optim.trace(0.9)],
        "trace_dampening": lambda: [optim.trace(0.9, dampening=0.5)],
        "trace_accumulator": lambda: [optim.trace(0.9, accumulator_dtype=F64)],
    }[name]
    wd = 0.3
    tx, alone = optim.chain(*head(), optim.add_decayed_weights(wd)), optim.chain(*head())
    p1 = p2 = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=F64)}
    s1, s2 = tx.init(p1), alone.init(p2)
    for k in range(4):
        g = {"w": torch.tensor([0.3, -0.1, 0.2], dtype=F64) * (k + 1)}
        u1, s1 = tx.update(g, s1, p1)
        u2, s2 = alone.update(g, s2, p2)
        torch.testing.assert_close(u1["w"], u2["w"] + wd * p2["w"], rtol=1e-14, atol=1e-14)
        p1, p2 = optim.apply_updates(p1, u1), optim.apply_updates(p2, u1)


def test_nested_optimizer_then_weight_decay():
    """Regression guard: rmsprop with momentum and lars end in ``trace`` and return their
    momentum as the update; a weight decay chained after them must leave it alone."""
    for make in (lambda: optim.rmsprop(0.1, momentum=0.9), lambda: optim.lars(0.1, momentum=0.9)):
        tx, alone = optim.chain(make(), optim.add_decayed_weights(0.3)), make()
        p = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=F64)}
        s1, s2 = tx.init(p), alone.init(p)
        for k in range(3):
            g = {"w": torch.tensor([0.3, -0.1, 0.2], dtype=F64) * (k + 1)}
            u1, s1 = tx.update(g, s1, p)
            u2, s2 = alone.update(g, s2, p)
            torch.testing.assert_close(u1["w"], u2["w"] + 0.3 * p["w"], rtol=1e-14, atol=1e-14)
            p = optim.apply_updates(p, u1)


def test_trace_weight_decay_clip_lr_optax():
    """The SGD-W layout ``trace -> add_decayed_weights -> clip_by_global_norm -> scale``
    against optax (9.3e-2 off after 5 steps before the fix)."""
    optax, jnp = _optax()
    p0 = np.array([1.0, -2.0, 0.5])

    def build(m):
        return m.chain(m.trace(0.9), m.add_decayed_weights(0.1), m.clip_by_global_norm(1.0), m.scale(-0.1))

    ox, tx = build(optax), build(optim)
    pj, pt = {"w": jnp.asarray(p0)}, {"w": torch.tensor(p0)}
    sj, st = ox.init(pj), tx.init(pt)
    for k in range(5):
        g = np.cos(np.arange(3.0) + k)
        uj, sj = ox.update({"w": jnp.asarray(g)}, sj, pj)
        ut, st = tx.update({"w": torch.tensor(g)}, st, pt)
        pj, pt = optax.apply_updates(pj, uj), optim.apply_updates(pt, ut)
        np.testing.assert_allclose(pt["w"].numpy(), np.asarray(pj["w"]), rtol=1e-13, atol=1e-14)


# --- N2: masks written for all the parameters, inside masked / partition ---------------

_PN = {"enc": {"w": [[-1.0, -0.6, -0.2], [0.2, 0.6, 1.0]], "b": [0.1, -0.2]},
       "head": {"w": [[0.5, 0.2], [-0.1, -0.5]], "b": [0.3, 0.4]}}


def _tree(x, f=lambda v: v):
    return {k: {kk: torch.tensor(f(np.asarray(v, dtype=np.float64))) for kk, v in d.items()} for k, d in x.items()}


_WD_MASKS = {
    "full_tree": {"enc": {"w": True, "b": False}, "head": {"w": True, "b": False}},
    "callable_full": lambda p: fp.tree.map(lambda x: x.dim() > 1, p),
    "prefix_over_placeholders": {"enc": {"w": True, "b": False}, "head": True},
    "callable_top_keys": lambda p: {"enc": {"w": True, "b": False}, "head": False},
}


@pytest.mark.parametrize("mask", list(_WD_MASKS))
@pytest.mark.parametrize("wrapper", ["multi_transform", "partition", "masked"])
def test_full_tree_mask_inside_a_group(wrapper, mask):
    """``multi_transform({"a": adamw(mask=<mask over all params>), ...})``: the inner mask
    had entries for the other group's leaves (MaskedNode there) and init raised "`mask` has
    paths that match no parameter". The group's result must equal adamw on that group
    alone (optax's behaviour)."""
    m = _WD_MASKS[mask]
    adamw = optim.adamw(0.1, weight_decay=0.5, mask=m)
    labels = {"enc": "a", "head": "b"}
    if wrapper == "multi_transform":
        tx = optim.multi_transform({"a": adamw, "b": optim.sgd(0.1)}, labels)
    elif wrapper == "partition":
        tx = optim.partition({"a": adamw, "b": optim.sgd(0.1)}, lambda path, leaf: labels[path[0]])
    else:
        tx = optim.masked(adamw, {"enc": True, "head": False})
    ref = optim.adamw(0.1, weight_decay=0.5, mask={"w": True, "b": False})
    p, pe = _tree(_PN), _tree(_PN)["enc"]
    s, se = tx.init(p), ref.init(pe)
    for k in range(3):
        g = _tree(_PN, lambda v, k=k: np.cos(3 * v + k))
        u, s = tx.update(g, s, p)
        ue, se = ref.update(g["enc"], se, pe)
        p, pe = optim.apply_updates(p, u), optim.apply_updates(pe, ue)
        for key in ("w", "b"):
            torch.testing.assert_close(p["enc"][key], pe[key], rtol=1e-15, atol=1e-15)


def test_mask_entry_for_a_missing_parameter_is_still_named():
    """Entries over MaskedNode placeholders are fine; a path no parameter has is not."""
    inner = optim.masked(optim.scale(2.0), {"enc": True, "head": True, "extra": True})
    tx = optim.masked(inner, {"enc": True, "head": False})
    with pytest.raises(ValueError, match=r"masked.init: `mask` has paths that match no parameter: \['extra'\]"):
        tx.init(_tree(_PN))


def test_full_tree_mask_inside_a_group_optax():
    """The NOTES reproducer against optax 0.2.8 (x64)."""
    optax, jnp = _optax()
    wd_mask = _WD_MASKS["full_tree"]
    labels = {"enc": {"w": "adamw", "b": "adamw"}, "head": {"w": "sgd", "b": "sgd"}}

    def build(m):
        return m.multi_transform({"adamw": m.adamw(0.1, weight_decay=0.5, mask=wd_mask), "sgd": m.sgd(0.1)}, labels)

    import jax

    P = jax.tree.map(lambda v: np.asarray(v, dtype=np.float64), _PN)
    ox, tx = build(optax), build(optim)
    pj, pt = jax.tree.map(jnp.asarray, P), _tree(_PN)
    sj, st = ox.init(pj), tx.init(pt)
    for k in range(3):
        G = jax.tree.map(lambda v, k=k: np.cos(3 * v + k), P)
        uj, sj = ox.update(jax.tree.map(jnp.asarray, G), sj, pj)
        ut, st = tx.update(_tree(_PN, lambda v, k=k: np.cos(3 * v + k)), st, pt)
        pj, pt = optax.apply_updates(pj, uj), optim.apply_updates(pt, ut)
    for g in ("enc", "head"):
        for key in ("w", "b"):
            np.testing.assert_allclose(pt[g][key].numpy(), np.asarray(pj[g][key]), rtol=1e-13, atol=1e-14)


# --- N3: extra keyword arguments are dropped for inner transformations without them --------


def _doubler():
    """A user transformation whose ``update`` takes no ``**extra_args``."""
    return optim.GradientTransformation(lambda p: optim.EmptyState(),
                                        lambda u, s, p=None: ({k: 2 * v for k, v in u.items()}, s))


_WRAPPERS = {
    "chain": lambda t: t,
    "masked": lambda t: optim.masked(t, {"w": True, "b": False}),
    "multi_transform": lambda t: optim.multi_transform({"a": t, "b": optim.identity()}, {"w": "a", "b": "b"}),
    "partition": lambda t: optim.partition({"a": t, "b": optim.identity()}, {"w": "a", "b": "b"}),
    "MultiSteps": lambda t: optim.MultiSteps(t, 1).gradient_transformation(),
    "apply_if_finite": lambda t: optim.apply_if_finite(t, 2),
    "inject_hyperparams": lambda t: optim.inject_hyperparams(lambda learning_rate: t)(learning_rate=0.1),
}


@pytest.mark.parametrize("wrapper", list(_WRAPPERS))
def test_wrappers_drop_extra_args_for_inner_without_them(wrapper):
    """``update(..., value=loss)`` (reduce_on_plateau needs it) raised the inner function's
    "unexpected keyword argument 'value'" in masked, multi_transform, partition, MultiSteps
    and apply_if_finite; optax's wrappers apply with_extra_args_support, as chain does."""
    tx = optim.chain(_WRAPPERS[wrapper](_doubler()), optim.scale(-0.1))
    p = {"w": torch.tensor([1.0, 2.0], dtype=F64), "b": torch.tensor([0.5], dtype=F64)}
    u, _ = tx.update(p, tx.init(p), p, value=torch.tensor(3.0))
    torch.testing.assert_close(u["w"], torch.tensor([-0.2, -0.4], dtype=F64), rtol=0, atol=1e-16)


def test_lookahead_drops_extra_args_for_fast_optimizer_without_them():
    """lookahead's fast optimizer without ``**extra_args``: optax calls it without them."""
    tx = optim.lookahead(_doubler(), sync_period=2, slow_step_size=0.5)
    p = optim.LookaheadParams.init_synced({"w": torch.tensor([1.0, 2.0], dtype=F64)})
    u, _ = tx.update({"w": torch.tensor([1.0, 3.0], dtype=F64)}, tx.init(p), p, value=torch.tensor(1.0))
    torch.testing.assert_close(u.fast["w"], torch.tensor([2.0, 6.0], dtype=F64), rtol=0, atol=0)


def test_extra_args_still_reach_inner_transformations_that_take_them():
    """reduce_on_plateau inside masked still gets ``value`` (it takes ``**extra_args``)."""
    plateau = optim.reduce_on_plateau(factor=0.5, patience=1)
    tx = optim.masked(plateau, {"w": True})
    p = {"w": torch.ones(2, dtype=F64)}
    s = tx.init(p)
    for v in (1.0, 2.0, 3.0, 4.0):
        _, s = tx.update(p, s, p, value=torch.tensor(v, dtype=F64))
    assert float(s.inner_state.scale) < 1.0


# --- N4: schedules as weight decay -----------------------------------------------------


def _wd_sched(count):
    return 0.5 - 0.1 * torch.as_tensor(count, dtype=F64)


def test_add_decayed_weights_schedule_closed_form():
    """``add_decayed_weights(schedule)``: ``u + schedule(count) * p`` with count from 0 (its
    first update raised "_foreach_add() received an invalid combination of arguments")."""
    for masked in (False, True):
        for fused in (False, True):
            wd = optim.add_decayed_weights(_wd_sched, mask={"w": True, "b": False} if masked else None)
            tx = optim.chain(optim.scale_by_adam(), wd, optim.scale(-0.1)) if fused else wd
            adam = optim.scale_by_adam()
            p = {"w": torch.tensor([1.0, -2.0], dtype=F64), "b": torch.tensor([0.5], dtype=F64)}
            s, sa = tx.init(p), adam.init(p)
            for k in range(4):
                g = {"w": torch.tensor([0.3, -0.1], dtype=F64) * (k + 1), "b": torch.tensor([0.2], dtype=F64)}
                u, s = tx.update(g, s, p)
                a, sa = adam.update(g, sa, p)
                base = a if fused else g
                c = 0.5 - 0.1 * k
                want = {"w": base["w"] + c * p["w"], "b": base["b"] + (0 if masked else c) * p["b"]}
                if fused:
                    want = {key: -0.1 * v for key, v in want.items()}
                for key in p:
                    torch.testing.assert_close(u[key], want[key], rtol=1e-14, atol=1e-15)
                p = optim.apply_updates(p, u)


_WD_ALIASES = {
    "adamw": lambda wd: optim.adamw(0.1, weight_decay=wd),
    "adamaxw": lambda wd: optim.adamaxw(0.1, weight_decay=wd),
    "nadamw": lambda wd: optim.nadamw(0.1, weight_decay=wd),
    "lion": lambda wd: optim.lion(0.1, weight_decay=wd),
    "lamb": lambda wd: optim.lamb(0.1, weight_decay=wd),
    "lars": lambda wd: optim.lars(0.1, weight_decay=wd),
    "adadelta": lambda wd: optim.adadelta(0.1, weight_decay=wd),
    "adafactor": lambda wd: optim.adafactor(0.1, weight_decay_rate=wd, min_dim_size_to_factor=2),
}


@pytest.mark.parametrize("name", list(_WD_ALIASES))
def test_alias_weight_decay_schedule_matches_per_step_constants(name):
    """A schedule as ``weight_decay`` raised at the first update. Each step must equal the
    same optimizer with the schedule's value at that step injected as a number
    (``inject_hyperparams``)."""
    f = _WD_ALIASES[name]
    tx = f(_wd_sched)
    ref = optim.inject_hyperparams(f)(wd=0.5)
    p0 = {"w": torch.linspace(-1, 1, 6, dtype=F64).reshape(2, 3)}
    p1, p2 = p0, p0
    s1, s2 = tx.init(p1), ref.init(p2)
    for k in range(5):
        g = {"w": torch.cos(torch.arange(6.0, dtype=F64)).reshape(2, 3) * (k + 1)}
        s2.hyperparams["wd"] = torch.tensor(0.5 - 0.1 * k, dtype=F64)
        u1, s1 = tx.update(g, s1, p1)
        u2, s2 = ref.update(g, s2, p2)
        torch.testing.assert_close(u1["w"], u2["w"], rtol=1e-13, atol=1e-15)
        p1, p2 = optim.apply_updates(p1, u1), optim.apply_updates(p2, u2)


@pytest.mark.parametrize("name", list(_WD_ALIASES) + ["add_decayed_weights"])
def test_weight_decay_schedule_optax(name):
    optax, jnp = _optax()

    def build(m):
        wd = m.linear_schedule(0.5, 0.0, 4)
        if name == "add_decayed_weights":
            return m.add_decayed_weights(wd)
        if name == "adafactor":
            return m.adafactor(0.1, weight_decay_rate=wd, min_dim_size_to_factor=2)
        return getattr(m, name)(0.1, weight_decay=wd)

    p0 = np.linspace(-1, 1, 6).reshape(2, 3)
    g0 = np.cos(np.arange(6.0)).reshape(2, 3)
    ox, tx = build(optax), build(optim)
    pj, pt = {"w": jnp.asarray(p0)}, {"w": torch.tensor(p0)}
    sj, st = ox.init(pj), tx.init(pt)
    for i in range(5):
        uj, sj = ox.update({"w": jnp.asarray(g0) * (i + 1)}, sj, pj)
        ut, st = tx.update({"w": torch.tensor(g0) * (i + 1)}, st, pt)
        pj, pt = optax.apply_updates(pj, uj), optim.apply_updates(pt, ut)
        np.testing.assert_allclose(pt["w"].numpy(), np.asarray(pj["w"]), rtol=1e-12, atol=1e-14)


def test_novograd_weight_decay_schedule_is_refused_at_construction():
    """optax 0.2.8's novograd takes no schedule as weight decay either (it fails)."""
    with pytest.raises(TypeError, match=r"novograd\(weight_decay\): .*not a schedule.*inject_hyperparams"):
        optim.novograd(0.1, weight_decay=_wd_sched)
    with pytest.raises(TypeError, match=r"scale_by_novograd\(weight_decay\): .*not a schedule"):
        optim.scale_by_novograd(weight_decay=_wd_sched)


# --- N5: fromage with a 0-d tensor learning rate -----------------------------------------


def _fromage_closed_form(p, g, lr, steps):
    """``p <- (p - lr |p|/|g| g) / sqrt(1 + lr^2)`` (norms floored at 1e-6)."""
    out = []
    for _ in range(steps):
        pn, gn = max(float(p.norm()), 1e-6), max(float(g.norm()), 1e-6)
        p = (p - lr * pn / gn * g) / math.sqrt(1 + lr * lr)
        out.append(p)
    return out


def test_fromage_tensor_learning_rate_and_inject():
    """``fromage(torch.tensor(lr))`` and ``inject_hyperparams(fromage)`` raised "must be a
    Python number"; optax takes both."""
    p0 = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    g = torch.tensor([0.3, 0.1, -0.4], dtype=F64)
    ref = _fromage_closed_form(p0, g, 0.05, 3)
    for tx in (optim.fromage(torch.tensor(0.05, dtype=F64)), optim.inject_hyperparams(optim.fromage)(learning_rate=0.05),
               optim.inject_hyperparams(optim.fromage)(learning_rate=lambda c: 0.05)):
        p = {"w": p0}
        s = tx.init(p)
        for k in range(3):
            u, s = tx.update({"w": g}, s, p)
            p = optim.apply_updates(p, u)
            torch.testing.assert_close(p["w"], ref[k], rtol=1e-14, atol=1e-15)


def test_fromage_tensor_learning_rate_keeps_0d_leaf_dtype():
    """A float64 tensor learning rate must not promote a 0-d float32 leaf."""
    tx = optim.fromage(torch.tensor(0.1, dtype=F64))
    p = {"a": torch.tensor(2.0, dtype=F32), "b": torch.tensor([1.0, -1.0], dtype=F32)}
    u, _ = tx.update({"a": torch.tensor(0.5, dtype=F32), "b": torch.tensor([0.2, 0.3], dtype=F32)}, tx.init(p), p)
    assert u["a"].dtype == F32 and u["b"].dtype == F32


def test_fromage_schedule_is_refused_with_a_pointer():
    with pytest.raises(TypeError, match=r"fromage\(learning_rate\): must be a number or a 0-d tensor, "
                                        r"not a schedule.*inject_hyperparams\(fromage\)"):
        optim.fromage(lambda c: 0.1)


# --- N6: schedule edges ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear_onecycle", "cosine_onecycle", "piecewise_linear", "piecewise_none"])
def test_piecewise_interpolate_schedules_are_zero_before_step_0(name):
    """optax gives 0 at negative counts (no interval holds them); fp extrapolated the first
    segment (linear_onecycle_schedule(20, 1.0)(-3) was -0.44, a negative learning rate)."""
    s = {
        "linear_onecycle": optim.linear_onecycle_schedule(20, 1.0),
        "cosine_onecycle": optim.cosine_onecycle_schedule(20, 1.0),
        "piecewise_linear": optim.piecewise_interpolate_schedule("linear", 1.0, {4: 0.1}),
        "piecewise_none": optim.piecewise_interpolate_schedule("cosine", 1.0, None),
    }[name]
    for c in (-3, -1, -0.5, torch.tensor(-2)):
        assert float(s(c)) == 0.0
    assert float(s(0)) > 0.0


def test_piecewise_interpolate_schedule_values_closed_form():
    s = optim.piecewise_interpolate_schedule("linear", 1.0, {4: 0.5, 8: 0.5})
    want = {-1: 0.0, 0: 1.0, 2: 0.75, 4: 0.5, 6: 0.375, 8: 0.25, 20: 0.25}
    assert {c: float(s(c)) for c in want} == want


def test_warmup_constant_without_warmup_is_optax_constant_init_with_a_true_warning():
    """optax's warmup_constant_schedule is linear_schedule(init, peak, warmup): with no
    warmup the constant init_value. fp returned peak_value while warning "using a constant
    init_value"."""
    with pytest.warns(UserWarning, match=r"warmup_constant_schedule: warmup_steps=0 <= 0, so the schedule "
                                         r"is the constant init_value=0.1 .*peak_value=1.0 is never reached"):
        s = optim.warmup_constant_schedule(0.1, 1.0, 0)
    assert [float(s(c)) for c in (-1, 0, 5, 1000)] == [0.1, 0.1, 0.1, 0.1]
    s = optim.warmup_constant_schedule(0.0, 1.0, 4)
    assert [float(s(c)) for c in (-2, 0, 2, 4, 100)] == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_warmup_schedules_without_warmup_do_not_warn_about_init_value():
    """warmup_cosine_decay / warmup_exponential_decay with ``warmup_steps=0`` start at their
    decay piece (as optax); they warned "using a constant init_value", which was not true."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = optim.warmup_cosine_decay_schedule(0.1, 1.0, 0, 10)
        e = optim.warmup_exponential_decay_schedule(0.1, 1.0, 0, 2, 0.5)
    assert float(c(0)) == 1.0 and float(e(0)) == 1.0
    assert float(c(-1)) == 0.1 and float(e(-1)) == 0.1


def test_schedule_edges_optax():
    optax, jnp = _optax()
    pairs = [
        (optim.linear_onecycle_schedule(20, 1.0), optax.linear_onecycle_schedule(20, 1.0)),
        (optim.cosine_onecycle_schedule(20, 1.0), optax.cosine_onecycle_schedule(20, 1.0)),
        (optim.piecewise_interpolate_schedule("linear", 1.0, {4: 0.1}),
         optax.piecewise_interpolate_schedule("linear", 1.0, {4: 0.1})),
        (optim.piecewise_interpolate_schedule("linear", 1.0), optax.piecewise_interpolate_schedule("linear", 1.0)),
        (optim.warmup_cosine_decay_schedule(0.1, 1.0, 0, 10), optax.warmup_cosine_decay_schedule(0.1, 1.0, 0, 10)),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs.append((optim.warmup_constant_schedule(0.1, 1.0, 0), optax.warmup_constant_schedule(0.1, 1.0, 0)))
    for a, b in pairs:
        for c in (-5, -3, -1, -0.5, 0, 1, 3, 7.25, 19, 20, 25):
            assert abs(float(a(c)) - float(b(jnp.asarray(c, dtype=jnp.float64)))) <= 1e-12, c
