"""Schedules: values at the boundaries, computed by hand; int and tensor steps agree;
no host sync (they run under vmap over a batch of steps)."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from functorch_pipeline import optim


def _v(s, step):
    return float(s(step))


def test_constant():
    assert _v(optim.constant_schedule(0.3), 0) == pytest.approx(0.3)
    assert _v(optim.constant_schedule(0.3), 10**6) == pytest.approx(0.3)


def test_linear_boundaries():
    s = optim.linear_schedule(1.0, 0.2, transition_steps=8, transition_begin=4)
    assert [_v(s, i) for i in (0, 4)] == pytest.approx([1.0, 1.0])
    assert _v(s, 6) == pytest.approx(1.0 - 0.8 * 2 / 8)
    assert [_v(s, 12), _v(s, 100)] == pytest.approx([0.2, 0.2])


def test_polynomial_power():
    s = optim.polynomial_schedule(2.0, 0.0, power=3, transition_steps=4)
    assert [_v(s, i) for i in range(6)] == pytest.approx([2.0, 2 * 0.75**3, 2 * 0.5**3, 2 * 0.25**3, 0.0, 0.0])


def test_polynomial_zero_steps_is_constant():
    with pytest.warns(UserWarning, match="transition_steps <= 0"):
        s = optim.polynomial_schedule(0.5, 0.0, 1, 0)
    assert _v(s, 10) == pytest.approx(0.5)


def test_cosine_decay():
    s = optim.cosine_decay_schedule(2.0, decay_steps=4, alpha=0.25, exponent=2.0)
    for i in range(6):
        t = min(i, 4)
        c = (0.5 * (1 + math.cos(math.pi * t / 4))) ** 2
        assert _v(s, i) == pytest.approx(2.0 * (0.75 * c + 0.25), abs=1e-6)


def test_cosine_decay_rejects_non_positive_steps():
    with pytest.raises(ValueError, match=r"cosine_decay_schedule\(decay_steps\): must be positive, got 0"):
        optim.cosine_decay_schedule(1.0, 0)


def test_warmup_cosine_decay():
    s = optim.warmup_cosine_decay_schedule(0.1, 1.0, warmup_steps=4, decay_steps=10, end_value=0.1)
    assert _v(s, 0) == pytest.approx(0.1)
    assert _v(s, 2) == pytest.approx(0.55)
    assert _v(s, 4) == pytest.approx(1.0)
    assert _v(s, 7) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)  # halfway through the 6 decay steps
    assert _v(s, 10) == pytest.approx(0.1) and _v(s, 50) == pytest.approx(0.1)


def test_exponential_decay_continuous_and_staircase():
    s = optim.exponential_decay(1.0, transition_steps=4, decay_rate=0.5, transition_begin=2)
    assert [_v(s, 0), _v(s, 2)] == pytest.approx([1.0, 1.0])
    assert _v(s, 4) == pytest.approx(0.5**0.5) and _v(s, 10) == pytest.approx(0.25)
    st = optim.exponential_decay(1.0, 4, 0.5, staircase=True, end_value=0.2)
    assert [_v(st, i) for i in (0, 3, 4, 7, 8, 100)] == pytest.approx([1.0, 1.0, 0.5, 0.5, 0.25, 0.2])
    grow = optim.exponential_decay(1.0, 1, 2.0, end_value=5.0)
    assert [_v(grow, i) for i in (1, 2, 3)] == pytest.approx([2.0, 4.0, 5.0])


def test_piecewise_constant_applies_scale_at_boundary():
    s = optim.piecewise_constant_schedule(0.1, {3: 0.5, 6: 0.1})
    assert [_v(s, i) for i in (0, 2, 3, 5, 6, 9)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.005, 0.005])
    with pytest.raises(ValueError, match="non-negative"):
        optim.piecewise_constant_schedule(0.1, {3: -1.0})


def test_join_schedules_shifts_step():
    s = optim.join_schedules([optim.constant_schedule(1.0), optim.linear_schedule(0.0, 1.0, 10)], [5])
    assert [_v(s, 4), _v(s, 5), _v(s, 10)] == pytest.approx([1.0, 0.0, 0.5])
    with pytest.raises(ValueError, match="one more schedule than boundaries"):
        optim.join_schedules([optim.constant_schedule(1.0)], [5])


def test_cosine_onecycle():
    s = optim.cosine_onecycle_schedule(100, 1.0, pct_start=0.3, div_factor=25.0, final_div_factor=1e4)
    assert _v(s, 0) == pytest.approx(0.04)
    assert _v(s, 15) == pytest.approx(0.04 + (1.0 - 0.04) / 2, abs=1e-6)
    assert _v(s, 30) == pytest.approx(1.0)
    assert _v(s, 65) == pytest.approx(4e-6 + (1.0 - 4e-6) / 2, abs=1e-6)
    assert _v(s, 100) == pytest.approx(4e-6) and _v(s, 1000) == pytest.approx(4e-6)


ALL = {
    "linear": optim.linear_schedule(1.0, 0.0, 7, 2),
    "cosine": optim.cosine_decay_schedule(1.0, 9, 0.1),
    "warmup_cosine": optim.warmup_cosine_decay_schedule(0.0, 1.0, 3, 12),
    "exp": optim.exponential_decay(1.0, 3, 0.7, staircase=True, end_value=0.3),
    "piecewise": optim.piecewise_constant_schedule(1.0, {4: 0.3}),
    "onecycle": optim.cosine_onecycle_schedule(12, 1.0),
    "warmup_constant": optim.warmup_constant_schedule(0.1, 1.0, 5),
    "warmup_exp": optim.warmup_exponential_decay_schedule(0.0, 1.0, 3, 2, 0.5, end_value=0.1),
    "sgdr": optim.sgdr_schedule([dict(init_value=0.0, peak_value=1.0, warmup_steps=2,
                                      decay_steps=6)] * 3),
    "linear_onecycle": optim.linear_onecycle_schedule(12, 1.0),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_tensor_steps_match_int_steps_under_vmap(name):
    s = ALL[name]
    steps = torch.arange(16, dtype=torch.int32)
    batched = torch.func.vmap(s)(steps)
    for i in range(16):
        assert float(batched[i]) == pytest.approx(_v(s, i), abs=1e-6)
        assert float(s(torch.tensor(i, dtype=torch.int32))) == pytest.approx(_v(s, i), abs=1e-6)


# --- issue 14 part B: optax's composite schedules, against their closed forms -----------


def _cos_decay(init, peak, warm, decay, end, t):
    """optax's warmup_cosine_decay_schedule written out."""
    if t < warm:
        return init + (peak - init) * t / warm
    frac = min(t - warm, decay - warm) / (decay - warm)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


@settings(max_examples=20, deadline=None)
@given(init=st.floats(0, 1), peak=st.floats(0.1, 2), warm=st.integers(1, 10),
       t=st.integers(0, 40))
def test_warmup_constant_closed_form(init, peak, warm, t):
    s = optim.warmup_constant_schedule(init, peak, warm)
    want = init + (peak - init) * min(t, warm) / warm
    assert _v(s, t) == pytest.approx(want, rel=1e-12, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(warm=st.integers(1, 6), trans=st.integers(1, 5), rate=st.floats(0.2, 0.95),
       begin=st.integers(0, 4), stair=st.booleans(), t=st.integers(0, 40))
def test_warmup_exponential_decay_closed_form(warm, trans, rate, begin, stair, t):
    init, peak, end = 0.05, 1.5, 0.2
    s = optim.warmup_exponential_decay_schedule(init, peak, warm, trans, rate, begin, stair, end)
    if t < warm:
        want = init + (peak - init) * t / warm
    else:
        n = t - warm - begin
        p = n / trans
        want = peak if n <= 0 else peak * rate ** (math.floor(p) if stair else p)
        want = max(want, end)
    assert _v(s, t) == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_sgdr_restarts():
    cycles = [dict(init_value=0.0, peak_value=1.0, warmup_steps=2, decay_steps=6, end_value=0.1),
              dict(init_value=0.1, peak_value=0.5, warmup_steps=1, decay_steps=4)]
    s = optim.sgdr_schedule(cycles)
    for t in range(14):
        if t < 6:
            want = _cos_decay(0.0, 1.0, 2, 6, 0.1, t)
        else:
            want = _cos_decay(0.1, 0.5, 1, 4, 0.0, t - 6)
        assert _v(s, t) == pytest.approx(want, rel=1e-12, abs=1e-12), t
    with pytest.raises(ValueError, match=r"sgdr_schedule\(cosine_kwargs\): cycle 0 has no"):
        optim.sgdr_schedule([dict(init_value=0.0, peak_value=1.0, warmup_steps=1)])


def _onecycle(points, t):
    """Piecewise interpolation through ``[(step, value)]``, flat after the last."""
    for (s0, v0), (s1, v1) in zip(points, points[1:], strict=False):
        if t < s1:
            return v0 + (v1 - v0) * (t - s0) / (s1 - s0)
    return points[-1][1]


@settings(max_examples=20, deadline=None)
@given(T=st.integers(10, 200), t=st.integers(0, 250), div=st.floats(2, 30),
       fdiv=st.floats(10, 1e4))
def test_linear_onecycle_closed_form(T, t, div, fdiv):
    peak = 0.7
    s = optim.linear_onecycle_schedule(T, peak, 0.3, 0.85, div, fdiv)
    pts = [(0, peak / div), (int(0.3 * T), peak), (int(0.85 * T), peak / div),
           (T, peak / div / fdiv)]
    assert _v(s, t) == pytest.approx(_onecycle(pts, t), rel=1e-9, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(10, 200), t=st.integers(0, 250), pct=st.floats(0.1, 0.9))
def test_cosine_onecycle_matches_optax_definition(T, t, pct):
    """optax: cosine interpolation between peak/div at 0, peak at int(pct*T) and
    peak/(div*final_div) at T (checked here from that definition)."""
    peak, div, fdiv = 1.3, 25.0, 1e4
    s = optim.cosine_onecycle_schedule(T, peak, pct, div, fdiv)
    pts = [(0, peak / div), (int(pct * T), peak), (T, peak / (div * fdiv))]
    want = pts[-1][1]
    for (s0, v0), (s1, v1) in zip(pts, pts[1:], strict=False):
        if t < s1:
            frac = (t - s0) / (s1 - s0)
            want = v1 + (v0 - v1) / 2 * (math.cos(math.pi * frac) + 1)
            break
    assert _v(s, t) == pytest.approx(want, rel=1e-9, abs=1e-12)
