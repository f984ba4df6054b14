"""fp.random distributions (issue 14): moments and Kolmogorov-Smirnov tests against closed-form
CDFs (the Beta CDF by integrating its density), vmap/compile safety, JAX argument semantics."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline import random as fr

N = 10_000
F64 = torch.float64
KS_LIMIT = 1.95 / math.sqrt(N)  # the 0.1% critical value of the one-sample KS statistic


def _ks(sample, cdf):
    x, _ = torch.sort(sample.double().reshape(-1))
    n = x.numel()
    f = cdf(x)
    hi = torch.arange(1, n + 1, dtype=F64) / n - f
    lo = f - torch.arange(0, n, dtype=F64) / n
    return float(torch.maximum(hi, lo).max())


def _beta_cdf(a, b):
    """The Beta(a, b) CDF (a, b >= 1) by cumulative trapezoids of the closed-form density."""
    grid = torch.linspace(0, 1, 20_001, dtype=F64)
    log_b = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    pdf = torch.exp((a - 1) * torch.log(grid) + (b - 1) * torch.log1p(-grid) - log_b).nan_to_num(
        0.0
    )
    cdf = torch.cat(
        [torch.zeros(1, dtype=F64), torch.cumsum((pdf[1:] + pdf[:-1]) / 2, 0) / (grid.numel() - 1)]
    )
    return lambda x: torch.from_numpy(np.interp(x.numpy(), grid.numpy(), cdf.numpy()))


def test_prngkey_is_key():
    assert torch.equal(fr.PRNGKey(7), fr.key(7))


def test_gumbel_and_exponential_match_their_cdfs():
    g = fr.gumbel(fr.key(0), (N,), F64)
    assert _ks(g, lambda x: torch.exp(-torch.exp(-x))) < KS_LIMIT
    assert abs(float(g.var()) - math.pi**2 / 6) < 0.08
    e = fr.exponential(fr.key(1), (N,), F64)
    assert _ks(e, lambda x: 1 - torch.exp(-x)) < KS_LIMIT
    assert bool((e >= 0).all()) and abs(float(e.var()) - 1) < 0.06
    assert fr.gumbel(fr.key(0), (3,)).dtype == torch.float32


@settings(max_examples=4, deadline=None)
@given(st.floats(-3, 1.5), st.floats(0.1, 3))
def test_truncated_normal_matches_the_truncated_cdf(lower, width):
    upper = lower + width
    t = fr.truncated_normal(fr.key(2), lower, upper, (N,), F64)
    assert bool(((t > lower) & (t < upper)).all())

    def phi(x):
        return 0.5 * (1 + torch.special.erf(torch.as_tensor(x, dtype=F64) / math.sqrt(2)))

    za, zb = phi(lower), phi(upper)
    assert _ks(t, lambda x: (phi(x) - za) / (zb - za)) < KS_LIMIT


def test_truncated_normal_bounds_broadcast_and_stay_inside_in_float32():
    lo = torch.tensor([-1.0, 0.0, 2.0])
    t = fr.truncated_normal(fr.key(3), lo, lo + 0.001, (1000, 3))
    assert t.shape == (1000, 3) and t.dtype == torch.float32
    assert bool(((t > lo) & (t < lo + 0.001)).all())
    with pytest.raises(
        ValueError, match=r"truncated_normal.*need `lower` < `upper`, got 1.0 and 1.0"
    ):
        fr.truncated_normal(fr.key(0), 1.0, 1.0)


@pytest.mark.parametrize("a", [0.3, 4.0])  # the boosted (a < 1) and the direct branch
def test_gamma_matches_the_gamma_cdf(a):
    g = fr.gamma(fr.key(4), a, (N,), F64)
    assert bool((g > 0).all())
    assert _ks(g, lambda x: torch.special.gammainc(torch.full_like(x, a), x)) < KS_LIMIT
    assert abs(float(g.mean()) - a) < 5 * math.sqrt(a / N) + 1e-3


def test_beta_and_dirichlet_match_beta_cdfs():
    x = fr.beta(fr.key(5), 2.0, 1.5, (N,), F64)
    assert _ks(x, _beta_cdf(2.0, 1.5)) < KS_LIMIT
    alpha = torch.tensor([1.5, 2.0, 3.5], dtype=F64)
    d = fr.dirichlet(fr.key(6), alpha, (N,), F64)
    torch.testing.assert_close(d.sum(-1), torch.ones(N, dtype=F64))
    a0 = float(alpha.sum())
    for i, ai in enumerate(alpha.tolist()):  # marginals of a Dirichlet are Beta(a_i, a0 - a_i)
        assert _ks(d[:, i], _beta_cdf(ai, a0 - ai)) < KS_LIMIT
    cov = torch.cov(d.T)
    ref = -alpha[0] * alpha[1] / (a0**2 * (a0 + 1))
    assert abs(float(cov[0, 1]) - float(ref)) < 3e-3


def test_multivariate_normal_moments_and_projection_ks():
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    a = torch.tensor([[1.0, 0.0, 0.0], [0.5, 1.0, 0.0], [-0.3, 0.2, 0.7]], dtype=F64)
    cov = a @ a.T
    for method in ("cholesky", "eigh", "svd"):
        x = fr.multivariate_normal(fr.key(7), mean, cov, (N,), method=method)
        assert x.shape == (N, 3) and x.dtype == F64
        torch.testing.assert_close(x.mean(0), mean, atol=0.05, rtol=0)
        torch.testing.assert_close(torch.cov(x.T), cov, atol=0.06, rtol=0)
        w = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
        mu, sd = float(w @ mean), math.sqrt(float(w @ cov @ w))
        z = ((x @ w) - mu) / sd
        assert _ks(z, lambda v: 0.5 * (1 + torch.special.erf(v / math.sqrt(2)))) < KS_LIMIT
    batched = fr.multivariate_normal(fr.key(8), mean.expand(4, 3), cov)
    assert batched.shape == (4, 3)
    with pytest.raises(
        ValueError, match=r"multivariate_normal.*`cov` must have shape \(\.\.\., 3, 3\)"
    ):
        fr.multivariate_normal(fr.key(0), mean, torch.eye(2, dtype=F64))


def test_categorical_and_choice_frequencies():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, -math.inf, 0.0]], dtype=F64)
    c = fr.categorical(fr.key(9), logits, shape=(N, 2))
    assert c.shape == (N, 2) and c.dtype == torch.int64
    probs = torch.softmax(logits, -1)
    for row in range(2):
        freq = torch.bincount(c[:, row], minlength=3).double() / N
        torch.testing.assert_close(freq, probs[row], atol=0.015, rtol=0)
    assert fr.categorical(fr.key(9), logits.T, axis=0).shape == (2,)
    p = torch.tensor([0.1, 0.0, 0.6, 0.3], dtype=F64)
    draws = fr.choice(fr.key(10), 4, (N,), p=p)
    torch.testing.assert_close(
        torch.bincount(draws, minlength=4).double() / N, p, atol=0.015, rtol=0
    )
    # without replacement and with p: the first pick follows p, and picks are distinct
    keys = fr.split(fr.key(14), 3000)
    firsts = fp.vmap(lambda k: fr.choice(k, 4, (2,), replace=False, p=p))(keys)
    assert bool((firsts[:, 0] != firsts[:, 1]).all()) and not bool((firsts == 1).any())
    freq0 = torch.bincount(firsts[:, 0], minlength=4).double() / 3000
    torch.testing.assert_close(freq0, p, atol=0.04, rtol=0)
    a = torch.arange(12.0).reshape(3, 4)
    picked = fr.choice(fr.key(11), a, (2, 5), axis=1)
    assert picked.shape == (3, 2, 5) and bool(torch.isin(picked[0], a[0]).all())
    assert sorted(fr.choice(fr.key(12), 6, (6,), replace=False).tolist()) == list(range(6))
    with pytest.raises(
        ValueError, match=r"choice.*cannot draw 5 values without replacement from 4"
    ):
        fr.choice(fr.key(0), 4, (5,), replace=False)


def test_distributions_are_deterministic_and_independent_per_key_under_vmap():
    keys = fr.split(fr.key(13), 4)

    def draws(k):
        return (
            fr.gamma(k, 2.0, (3,)),
            fr.beta(k, 2.0, 3.0, (3,)),
            fr.truncated_normal(k, -1.0, 1.0, (3,)),
            fr.categorical(k, torch.zeros(5), shape=(3,)),
            fr.dirichlet(k, torch.ones(3)),
            fr.multivariate_normal(k, torch.zeros(2), torch.eye(2)),
            fr.gumbel(k, (3,)),
            fr.exponential(k, (3,)),
            fr.choice(k, 5, (3,)),
        )

    mapped = fp.vmap(draws)(keys)
    compiled = fp.jit(
        lambda k: (fr.gamma(k, 0.5, (3,)), fr.categorical(k, torch.zeros(5))), backend="eager"
    )
    for i in range(4):
        one = draws(keys[i])
        for m, o in zip(mapped, one, strict=True):
            torch.testing.assert_close(m[i], o)
    jitted = compiled(keys[0])
    torch.testing.assert_close(jitted[0], fr.gamma(keys[0], 0.5, (3,)))
    torch.testing.assert_close(jitted[1], fr.categorical(keys[0], torch.zeros(5)))
    assert not torch.equal(mapped[0][0], mapped[0][1])


def test_distribution_argument_errors_name_the_api():
    k = fr.key(0)
    with pytest.raises(
        ValueError, match=r"gamma\(key, a, shape, dtype\): `a` must be > 0, got -1.0"
    ):
        fr.gamma(k, -1.0)
    with pytest.raises(
        TypeError, match=r"beta\(key, a, b, shape, dtype\): `dtype` must be floating"
    ):
        fr.beta(k, 1.0, 1.0, dtype=torch.int64)
    with pytest.raises(
        ValueError, match=r"gamma.*`shape` \(3,\) is not broadcast-compatible .* \(2,\)"
    ):
        fr.gamma(k, torch.ones(2), (3,))
    with pytest.raises(ValueError, match=r"categorical.*`axis` 2 is out of range"):
        fr.categorical(k, torch.zeros(3), axis=2)
    with pytest.raises(ValueError, match=r"choice.*`p` must be a 1-d tensor of 3 probabilities"):
        fr.choice(k, 3, p=torch.ones(4))
