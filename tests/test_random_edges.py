"""fp.random at the edges of its distributions' parameters, against closed forms: integer
offsets past 2**53 (randint), the half-open interval of uniform in short dtypes, Beta and
Dirichlet with small concentrations (NOTE [small concentrations]), truncated normals far in
a tail (NOTE [truncated normal tails]), and a float64 Bernoulli probability."""

from __future__ import annotations

import math

import pytest
import torch

import functorch_pipeline as fp

K = fp.random.key


def test_randint_keeps_its_offsets_past_two_to_the_53():
    r = fp.random.randint(K(0), (2000,), 2**60, 2**60 + 10)
    assert sorted(set((r - 2**60).tolist())) == list(range(10))
    r = fp.random.randint(K(1), (500,), 2**53 + 1, 2**53 + 3)
    assert set(r.tolist()) == {2**53 + 1, 2**53 + 2}
    r = fp.random.randint(K(2), (500,), -(2**63), -(2**63) + 7)
    assert int(r.min()) >= -(2**63) and int(r.max()) < -(2**63) + 7
    # small ranges: the draws the float offset gave (exact below 2**53)
    u = fp.random.uniform(K(3), (1000,), torch.float64)
    assert torch.equal(fp.random.randint(K(3), (1000,), -5, 12), (-5 + torch.floor(u * 17)).long())
    with pytest.raises(ValueError, match="fit int64"):
        fp.random.randint(K(0), (2,), 2**63, 2**63 + 2)


@pytest.mark.parametrize("dtype, lo, hi", [(torch.bfloat16, 1.0, 2.0), (torch.bfloat16, 10.0, 12.0),
                                           (torch.float16, 1.0, 2.0), (torch.float32, 100.0, 101.0)])
def test_uniform_never_returns_maxval(dtype, lo, hi):
    u = fp.random.uniform(K(0), (1 << 22,), dtype, lo, hi)
    assert float(u.max()) < hi and float(u.min()) >= lo
    # the largest value below maxval is drawn in its place, not something else
    top = torch.nextafter(torch.tensor(hi, dtype=dtype), torch.tensor(lo, dtype=dtype))
    assert float(u.max()) == float(top)


@pytest.mark.parametrize("a", [1e-3, 1e-4])
def test_beta_with_small_concentrations_has_no_nan_and_the_right_halves(a):
    x = fp.random.beta(K(0), a, a, (20000,), torch.float64)
    assert not bool(x.isnan().any()) and bool(((x >= 0) & (x <= 1)).all())
    # Beta(a, a) is symmetric: half the mass below 1/2 (binomial sd 0.0035)
    assert abs(float((x < 0.5).double().mean()) - 0.5) < 0.02
    # unequal small concentrations: E[X] = a / (a + b)
    y = fp.random.beta(K(1), a, 4 * a, (40000,), torch.float64)
    assert abs(float(y.mean()) - 0.2) < 0.01


def test_dirichlet_with_small_concentrations_has_no_nan_and_the_right_means():
    alpha = torch.tensor([1e-3, 2e-3, 7e-3], dtype=torch.float64)
    x = fp.random.dirichlet(K(0), alpha, (20000,), torch.float64)
    assert not bool(x.isnan().any())
    torch.testing.assert_close(x.sum(-1), torch.ones(20000, dtype=torch.float64))
    torch.testing.assert_close(x.mean(0), alpha / alpha.sum(), atol=0.015, rtol=0)


def _truncated_mean(a, b):
    """Closed form: (phi(a) - phi(b)) / (Phi(b) - Phi(a)), tails by erfc."""
    phi = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi) if math.isfinite(t) else 0.0  # noqa: E731
    cdf = lambda t: 0.5 * math.erfc(-t / math.sqrt(2)) if t < 0 else 1 - 0.5 * math.erfc(t / math.sqrt(2))  # noqa: E731
    if a > 0:  # mirror: the left tail is exact
        return -_truncated_mean(-b, -a)
    return (phi(a) - phi(b)) / (cdf(b) - cdf(a))


@pytest.mark.parametrize("lo, hi, dtype", [(10.0, 11.0, torch.float64), (10.0, math.inf, torch.float32),
                                           (-math.inf, -9.0, torch.float64), (7.0, math.inf, torch.float64),
                                           (-1.0, 2.0, torch.float64), (25.0, 26.0, torch.float64)])
def test_truncated_normal_far_in_a_tail(lo, hi, dtype):
    t = fp.random.truncated_normal(K(0), lo, hi, (100000,), dtype).double()
    assert bool(((t > lo) & (t < hi)).all())
    # the mean's standard error is below 1/(|bound| sqrt(n)) in a tail, 1/sqrt(n) elsewhere
    assert abs(float(t.mean()) - _truncated_mean(lo, hi)) < 0.01
    assert len(set(t.tolist())) > 1000


def test_a_float64_bernoulli_probability_is_compared_at_float64s_resolution():
    u = fp.random.uniform(K(0), (1000,), torch.float64)
    assert bool(fp.random.bernoulli(K(0), u + 1e-12).all())  # p just above each draw
    assert not bool(fp.random.bernoulli(K(0), u - 1e-12).any())  # just below


@pytest.mark.parametrize("replace", [True, False])
@pytest.mark.parametrize("p", [[-0.5, 1.0, 0.5], [0.0, 0.0, 0.0], [float("nan"), 1.0, 1.0],
                               [float("inf"), 1.0, 1.0], [0.0, 1.0, 0.0], [1.0, 2.0, 0.0]])
def test_choice_refuses_the_p_numpy_refuses(p, replace):
    """A negative, non-finite or all-zero ``p`` (and, without replacement, fewer non-zero
    entries than draws) is refused, as ``numpy.random.choice`` refuses it; they used to give
    draws silently (a -0.5 entry was drawn every time). Whatever numpy accepts is drawn,
    and only from the entries with positive probability."""
    import numpy as np

    pt = torch.tensor(p, dtype=torch.float64)
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            np.random.default_rng(0).choice(3, 2, replace=replace, p=np.array(p) / np.sum(p))
        numpy_ok = True
    except ValueError:
        numpy_ok = False
    if numpy_ok:
        got = fp.random.choice(fp.random.key(0), 3, (2,), replace=replace, p=pt)
        assert all(pt[i] > 0 for i in got.tolist())
        if not replace:
            assert len(set(got.tolist())) == 2
    else:
        with pytest.raises(ValueError, match=r"choice\(key, a, shape, replace, p, axis\): .*`p`"):
            fp.random.choice(fp.random.key(0), 3, (2,), replace=replace, p=pt)
