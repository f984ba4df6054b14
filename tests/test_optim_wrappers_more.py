"""Issue 14 part B: lookahead, skip_not_finite, zero_nans, add_noise, apply_every,
centralize, adaptive_grad_clip, multi_transform, reduce_on_plateau and the new
arguments (MultiSteps(accumulator_dtype=), masked/partition(mask_compatible_extra_args=)),
each against a hand-written loop, torch, or a closed form (float64, tiny trees)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline import optim

F64 = torch.float64


def _g(seed, shape=(3, 4)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --- lookahead ---------------------------------------------------------------------------


@pytest.mark.parametrize("reset_state", [False, True])
def test_lookahead_matches_hand_loop(reset_state):
    k, alpha, lr, mu = 3, 0.5, 0.1, 0.9
    tx = optim.lookahead(optim.sgd(lr, mu), sync_period=k, slow_step_size=alpha,
                         reset_state=reset_state)
    p = optim.LookaheadParams.init_synced({"w": _g(0, (5,))})
    s = tx.init(p)
    fast, slow, buf = p.fast["w"].clone(), p.slow["w"].clone(), torch.zeros(5, dtype=F64)
    for t in range(10):
        g = _g(10 + t, (5,))
        u, s = tx.update(optim.LookaheadParams({"w": g}, {"w": g}), s, p)
        p = optim.apply_updates(p, u)
        buf = g + mu * buf  # reference: sgd with momentum on the fast weights
        fast = fast - lr * buf
        if (t + 1) % k == 0:
            slow = slow + alpha * (fast - slow)
            fast = slow.clone()
            if reset_state:
                buf = torch.zeros(5, dtype=F64)
        torch.testing.assert_close(p.fast["w"], fast, rtol=0, atol=1e-13)
        torch.testing.assert_close(p.slow["w"], slow, rtol=0, atol=1e-13)


def test_lookahead_needs_lookahead_params():
    tx = optim.lookahead(optim.sgd(0.1), 2, 0.5)
    with pytest.raises(TypeError, match=r"lookahead.update: `params` must be a LookaheadParams"):
        p = optim.LookaheadParams.init_synced({"w": torch.zeros(2)})
        tx.update(optim.LookaheadParams({"w": torch.ones(2)}, {"w": torch.ones(2)}), tx.init(p),
                  {"w": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"lookahead\(sync_period\)"):
        optim.lookahead(optim.sgd(0.1), 0, 0.5)


# --- skip_not_finite, zero_nans ----------------------------------------------------------


def test_skip_not_finite_with_multisteps():
    ms = optim.MultiSteps(optim.sgd(1.0), 2, should_skip_update_fn=optim.skip_not_finite)
    p = {"w": torch.zeros(2, dtype=F64)}
    s = ms.init(p)
    seq = [torch.tensor([1.0, 2.0]), torch.tensor([math.inf, 0.0]), torch.tensor([3.0, 4.0])]
    outs = []
    for g in seq:
        u, s = ms.update({"w": g.to(F64)}, s, p)
        outs.append(u["w"])
    # the inf step is skipped: the mean of the two finite gradients is applied on step 3
    torch.testing.assert_close(outs[2], torch.tensor([-2.0, -3.0], dtype=F64))
    assert int(s.skip_state["num_not_finite"]) == 0 and not bool(s.skip_state["should_skip"])
    skip, info = optim.skip_not_finite({"a": torch.tensor([math.nan, 1.0, -math.inf])}, 0)
    assert bool(skip) and int(info["num_not_finite"]) == 2


def test_skip_large_updates_with_multisteps_and_param_block_norm():
    import functools

    skip = functools.partial(optim.skip_large_updates, max_squared_norm=10.0)
    ms = optim.MultiSteps(optim.sgd(1.0), 2, should_skip_update_fn=skip)
    p = {"w": torch.zeros(2, dtype=F64)}
    s = ms.init(p)
    outs = []
    for g in ([1.0, 2.0], [3.0, 4.0], [0.0, 2.0]):  # |[3, 4]|^2 = 25 > 10: skipped
        u, s = ms.update({"w": torch.tensor(g, dtype=F64)}, s, p)
        outs.append(u["w"])
    torch.testing.assert_close(outs[2], torch.tensor([-0.5, -2.0], dtype=F64))
    tx = optim.scale_by_param_block_norm(0.5)
    pp = {"a": torch.tensor([3.0, 4.0], dtype=F64), "b": torch.tensor([0.1], dtype=F64)}
    u, _ = tx.update({"a": torch.ones(2, dtype=F64), "b": torch.ones(1, dtype=F64)},
                     tx.init(pp), pp)
    torch.testing.assert_close(u["a"], torch.full((2,), 5.0, dtype=F64))
    torch.testing.assert_close(u["b"], torch.full((1,), 0.5, dtype=F64))  # floored


@settings(max_examples=20, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1.5, -2.0, math.nan, math.inf, -math.inf]), min_size=1,
                max_size=8))
def test_zero_nans_vs_nan_to_num(values):
    x = torch.tensor(values, dtype=F64)
    tx = optim.zero_nans()
    g = {"a": x, "b": torch.ones(2, dtype=F64)}
    u, s = tx.update(g, tx.init(g))
    want = torch.nan_to_num(x, nan=0.0, posinf=math.inf, neginf=-math.inf)
    assert torch.equal(u["a"], want)
    assert bool(s.found_nan["a"]) == any(math.isnan(v) for v in values)
    assert not bool(s.found_nan["b"])


# --- add_noise ---------------------------------------------------------------------------


def test_add_noise_variance_schedule_and_reproducibility():
    eta, gamma = 0.3, 0.55
    tx = optim.add_noise(eta, gamma, key=3)
    n = 10000
    g = {"w": torch.zeros(n, dtype=F64), "b": torch.zeros(3, dtype=F64)}
    s = tx.init(g)
    for t in range(1, 4):
        u, s = tx.update(g, s)
        std = math.sqrt(eta / t**gamma)
        z = u["w"] / std
        # n standard normals: mean within 5 sigma of 0, sample std within 5 sigma of 1
        assert abs(float(z.mean())) < 5 / math.sqrt(n)
        assert abs(float(z.std()) - 1.0) < 5 / math.sqrt(2 * n)
    # same key and count: same noise; a restored state continues the same stream
    u1, _ = tx.update(g, s)
    u2, _ = tx.update(g, fp.tree.clone(s))
    assert torch.equal(u1["w"], u2["w"])
    old = optim.add_noise(eta, gamma, seed=3)  # the older spelling: the same stream
    assert torch.equal(old.init(g).rng_key, tx.init(g).rng_key)
    with pytest.raises(TypeError, match=r"add_noise\(key\): pass exactly one of `key`"):
        optim.add_noise(eta, gamma, key=1, seed=1)
    tx4 = optim.add_noise(eta, gamma, key=4)  # the key lives in the state
    other, _ = tx4.update(g, tx4.init(g)._replace(count=s.count))
    assert not torch.equal(other["w"], u1["w"])


# --- apply_every, centralize, adaptive_grad_clip -----------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_apply_every_hand_loop(k):
    tx = optim.apply_every(k)
    p = {"w": torch.zeros(3, dtype=F64)}
    s = tx.init(p)
    acc = torch.zeros(3, dtype=F64)
    for t in range(7):
        g = _g(t, (3,))
        u, s = tx.update({"w": g}, s)
        acc = g if t % k == 0 else acc + g
        want = acc if t % k == k - 1 else torch.zeros(3, dtype=F64)
        torch.testing.assert_close(u["w"], want, rtol=0, atol=1e-15)


def test_centralize_numpy():
    g = {"conv": _g(1, (4, 2, 3, 3)), "fc": _g(2, (5, 6)), "b": _g(3, (5,))}
    u, _ = optim.centralize().update(g, optim.centralize().init(g))
    for name in ("conv", "fc"):
        x = g[name].numpy()
        axes = tuple(range(1, x.ndim))
        np.testing.assert_allclose(u[name].numpy(), x - x.mean(axis=axes, keepdims=True),
                                   rtol=0, atol=1e-15)
    assert torch.equal(u["b"], g["b"])


def test_adaptive_grad_clip_rowwise_reference():
    """The NFNet rule per output row, written out with Python loops; a vector (bias) is
    one unit, clipped by its whole norm (optax 0.2.8's ``unitwise_norm``, timm, NFNets)."""
    lam, eps = 0.05, 1e-3
    p = {"w": _g(4, (6, 5)), "b": _g(5, (6,)) * 1e-4}
    g = {"w": _g(6, (6, 5)) * 3, "b": _g(7, (6,))}
    tx = optim.adaptive_grad_clip(lam, eps)
    u, _ = tx.update(g, tx.init(p), p)
    for i in range(6):
        pn = max(math.sqrt(sum(float(x) ** 2 for x in p["w"][i])), eps)
        gn = math.sqrt(sum(float(x) ** 2 for x in g["w"][i]))
        want = g["w"][i] if gn < lam * pn else g["w"][i] * (lam * pn / max(gn, 1e-6))
        torch.testing.assert_close(u["w"][i], want, rtol=0, atol=1e-14)
    pb = max(math.sqrt(sum(float(x) ** 2 for x in p["b"])), eps)
    gb = math.sqrt(sum(float(x) ** 2 for x in g["b"]))
    wb = g["b"] if gb < lam * pb else g["b"] * (lam * pb / max(gb, 1e-6))
    torch.testing.assert_close(u["b"], wb, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match=r"adaptive_grad_clip.update: this transformation needs"):
        tx.update(g, tx.init(p))


# --- multi_transform, masked extra args, MultiSteps(accumulator_dtype) -------------------


def test_multi_transform_is_partition():
    labels = {"a": "x", "b": "y"}
    ts = {"x": optim.adam(0.1), "y": optim.sgd(0.1, 0.9)}
    m, pt = optim.multi_transform(ts, labels), optim.partition(ts, labels)
    p = {"a": _g(1, (3,)), "b": _g(2, (2,))}
    sm, sp = m.init(p), pt.init(p)
    for t in range(4):
        g = {"a": _g(10 + t, (3,)), "b": _g(20 + t, (2,))}
        um, sm = m.update(g, sm, p)
        up, sp = pt.update(g, sp, p)
        assert fp.tree.allclose(um, up, rtol=0, atol=0)


def _seen_extra():
    """A transformation that records the extra argument ``w`` it receives."""
    seen = []

    def update(updates, state, params=None, **kw):
        seen.append(kw.get("w"))
        return updates, state

    return optim.GradientTransformation(lambda p: optim.EmptyState(), update), seen


@pytest.mark.parametrize("compatible", [False, True])
def test_masked_mask_compatible_extra_args(compatible):
    inner, seen = _seen_extra()
    tx = optim.masked(inner, {"a": True, "b": False}, mask_compatible_extra_args=compatible)
    g = {"a": torch.ones(1), "b": torch.ones(2)}
    w = {"a": torch.full((1,), 7.0), "b": torch.full((2,), 8.0)}
    tx.update(g, tx.init(g), w=w, other=3)
    got = seen[-1]
    if compatible:  # the same leaves as the updates reach the inner transformation
        assert list(fp.tree.leaves(got)) == [w["a"]]
    else:
        assert got is w
    inner, seen = _seen_extra()
    tx = optim.partition({"x": inner, "y": optim.identity()}, {"a": "x", "b": "y"},
                         mask_compatible_extra_args=compatible)
    tx.update(g, tx.init(g), w=w)
    assert (len(fp.tree.leaves(seen[-1])) == 1) == compatible


def test_multisteps_accumulator_dtype():
    """float32 accumulation of bfloat16 gradients: the mean of 4 equals the float32 mean
    (a bfloat16 accumulator rounds it)."""
    k = 4
    gs = [torch.tensor([1.0 + 2.0**-9 * i, 3.0 - 2.0**-8 * i]) for i in range(k)]
    gs_bf = [g.to(torch.bfloat16) for g in gs]
    ms = optim.MultiSteps(optim.sgd(1.0), k, accumulator_dtype=torch.float32)
    p = {"w": torch.zeros(2, dtype=torch.bfloat16)}
    s = ms.init(p)
    assert s.acc_grads["w"].dtype == torch.float32
    for g in gs_bf:
        u, s = ms.update({"w": g}, s, p)
    want = -torch.stack([g.float() for g in gs_bf]).mean(0)
    assert u["w"].dtype == torch.bfloat16
    torch.testing.assert_close(u["w"], want.to(torch.bfloat16), rtol=0, atol=0)
    bad = s._replace(acc_grads={"w": torch.zeros(2, dtype=torch.bfloat16)})
    msg = r"MultiSteps.update: leaf at path `w`.*expected torch.float32"
    with pytest.raises(TypeError, match=msg):
        ms.update({"w": gs_bf[0]}, bad, p)


# --- reduce_on_plateau vs torch.optim.lr_scheduler.ReduceLROnPlateau ---------------------


@settings(max_examples=25, deadline=None)
@given(
    losses=st.lists(st.sampled_from([1.0, 0.9, 0.95, 0.5, 0.49999, 0.8, 2.0]), min_size=1,
                    max_size=30),
    patience=st.integers(1, 4),
    cooldown=st.integers(0, 3),
    factor=st.sampled_from([0.1, 0.5]),
    min_scale=st.sampled_from([0.0, 0.02]),
)
def test_reduce_on_plateau_matches_torch(losses, patience, cooldown, factor, min_scale):
    rtol = 1e-3
    w = torch.nn.Parameter(torch.zeros(1, dtype=F64))
    o = torch.optim.SGD([w], lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        o, mode="min", factor=factor, patience=patience - 1, threshold=rtol,
        threshold_mode="rel", cooldown=cooldown, min_lr=min_scale, eps=0.0)
    tx = optim.reduce_on_plateau(factor=factor, patience=patience, rtol=rtol,
                                 cooldown=cooldown, min_scale=min_scale)
    g = {"w": torch.ones(1, dtype=F64)}
    s = tx.init(g)
    for loss in losses:
        u, s = tx.update(g, s, value=loss)
        sched.step(loss)
        assert float(s.scale) == pytest.approx(o.param_groups[0]["lr"], rel=1e-12, abs=0)
        assert float(u["w"]) == pytest.approx(float(s.scale), rel=1e-12, abs=0)


def test_reduce_on_plateau_accumulation_and_errors():
    tx = optim.reduce_on_plateau(factor=0.5, patience=1, accumulation_size=2)
    g = {"w": torch.ones(1, dtype=F64)}
    s = tx.init(g)
    for v in (1.0, 3.0):  # mean 2.0: the first evaluation, best = 2
        _, s = tx.update(g, s, value=v)
    assert float(s.best_value) == 2.0 and float(s.scale) == 1.0
    for v in (1.0, 3.5):  # mean 2.25: no improvement, patience 1 -> halve
        _, s = tx.update(g, s, value=v)
    assert float(s.scale) == 0.5
    with pytest.raises(TypeError, match=r"reduce_on_plateau.update: needs the loss as `value=`"):
        tx.update(g, s)
    in_chain = optim.chain(optim.sgd(1.0), tx)
    u, _ = in_chain.update(g, in_chain.init(g), value=1.0)
    torch.testing.assert_close(u["w"], torch.tensor([-1.0], dtype=F64))


# --- update utilities --------------------------------------------------------------------


def test_global_norm_incremental_and_periodic_updates():
    t = {"a": _g(1, (3, 2)), "b": _g(2, (4,))}
    flat = torch.cat([x.reshape(-1) for x in fp.tree.leaves(t)])
    torch.testing.assert_close(optim.global_norm(t), torch.linalg.vector_norm(flat))
    old = {"a": _g(3, (3, 2)), "b": _g(4, (4,))}
    mix = optim.incremental_update(t, old, 0.1)
    for k in t:
        torch.testing.assert_close(mix[k], 0.1 * t[k] + 0.9 * old[k], rtol=0, atol=1e-15)
    for step in range(6):
        got = optim.periodic_update(t, old, torch.tensor(step), 3)
        assert fp.tree.allclose(got, t if step % 3 == 0 else old, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"incremental_update\(new_tensors, old_tensors\).*`b`"):
        optim.incremental_update(t, {"a": old["a"], "b": torch.zeros(5, dtype=F64)}, 0.1)


def test_keep_params_nonnegative_and_normalize_by_update_norm():
    p = {"w": torch.tensor([0.5, 2.0, 0.0], dtype=F64)}
    opt = optim.chain(optim.sgd(1.0), optim.keep_params_nonnegative())
    for t in range(5):
        g = {"w": _g(30 + t, (3,)) * 3}
        u, _ = opt.update(g, opt.init(p), p)
        want = torch.clamp(p["w"] - g["w"], min=0.0)  # the projection onto p >= 0
        p = optim.apply_updates(p, u)
        torch.testing.assert_close(p["w"], want, rtol=0, atol=1e-15)
    tx = optim.normalize_by_update_norm(scale_factor=2.0, eps=1e-6)
    g = {"a": _g(5, (3,)), "b": _g(6, (2, 2))}
    u, _ = tx.update(g, tx.init(g))
    n = float(torch.sqrt(sum((x**2).sum() for x in fp.tree.leaves(g))))
    for k in g:
        torch.testing.assert_close(u[k], g[k] * 2.0 / (n + 1e-6), rtol=1e-14, atol=0)
