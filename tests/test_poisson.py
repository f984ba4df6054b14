"""fp.data Poisson sampling and padded batches: statistics against Binomial(n, q), exact
resume, padded == unpadded to 1e-12 for a clipped DP gradient sum (against a per-example
autograd loop), and errors that name the argument or key path."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline.data import check_mask
from functorch_pipeline.data import masked_sum
from functorch_pipeline.data import pad_batch
from functorch_pipeline.data import poisson_batches
from functorch_pipeline.data import poisson_mask
from functorch_pipeline.data import poisson_max_batch_size
from functorch_pipeline.data import unpad

KEY = fp.random.key(1234)


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.arange(n, dtype=torch.float64).unsqueeze(1).repeat(1, 3), torch.arange(n)


# ------------------------------------------------------------------------- statistics


def _binomial_cdf(n: int, q: float) -> list[float]:
    # closed form in log space (math.lgamma), independent of torch.distributions
    logs = [
        math.lgamma(n + 1)
        - math.lgamma(k + 1)
        - math.lgamma(n - k + 1)
        + k * math.log(q)
        + (n - k) * math.log1p(-q)
        for k in range(n + 1)
    ]
    out, acc = [], 0.0
    for lp in logs:
        acc += math.exp(lp)
        out.append(acc)
    return out


def test_batch_sizes_are_binomial():
    n, q, t = 2000, 0.02, 1500
    masks = torch.stack([poisson_mask(fp.random.fold_in(KEY, i), n, q) for i in range(t)])
    sizes = masks.sum(1).double()
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean().item() - mean) < 4 * math.sqrt(var / t)  # 4 standard errors
    assert abs(sizes.var().item() - var) < 5 * var * math.sqrt(2 / (t - 1))
    # the whole distribution: Kolmogorov distance to Binomial(n, q) (DKW: P(> 0.05) < 1e-3)
    cdf = _binomial_cdf(n, q)
    emp = torch.bincount(sizes.long(), minlength=n + 1).cumsum(0).double() / t
    assert max(abs(emp[k].item() - cdf[k]) for k in range(120)) < 0.05
    # membership is independent of position: each block of 100 positions is picked at
    # rate q, and neighbouring positions are uncorrelated
    per_block = masks.double().view(t, 20, 100).sum((0, 2)) / (t * 100)
    se = math.sqrt(q * (1 - q) / (t * 100))
    assert (per_block - q).abs().max().item() < 5 * se
    m = masks.double() - q
    corr_pos = (m[:, :-1] * m[:, 1:]).mean().item() / (q * (1 - q))
    corr_batch = (m[:-1] * m[1:]).mean().item() / (q * (1 - q))
    assert abs(corr_pos) < 0.01 and abs(corr_batch) < 0.01


def test_poisson_mask_under_vmap_matches_a_loop():
    keys = torch.stack([fp.random.fold_in(KEY, i) for i in range(5)])
    got = fp.vmap(lambda k: poisson_mask(k, 300, 0.1))(keys)
    assert torch.equal(got, torch.stack([poisson_mask(k, 300, 0.1) for k in keys]))


# ---------------------------------------------------------------------------- batches


def test_variable_batches_follow_the_mask_and_resume_exactly():
    x, y = _data(97)
    got = list(poisson_batches((x, y), 0.1, key=KEY, num_batches=12))
    assert len(got) == 12
    for i, (bx, by) in enumerate(got):
        m = poisson_mask(fp.random.fold_in(KEY, i), 97, 0.1)
        members = [j for j in range(97) if m[j]]  # reference: a Python loop over the mask
        assert by.tolist() == members and torch.equal(bx, x[members])
    for start in (0, 5, 12):
        tail = list(poisson_batches((x, y), 0.1, key=KEY, num_batches=12, start=start))
        assert all(torch.equal(a[1], b[1]) for a, b in zip(tail, got[start:], strict=True))
    other = list(poisson_batches((x, y), 0.1, key=fp.random.key(1), num_batches=12))
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(other, got, strict=True))


def test_default_num_batches_is_one_epoch_in_expectation():
    x, y = _data(50)
    assert len(list(poisson_batches((x, y), 0.004, key=KEY))) == 250
    assert len(list(poisson_batches((x, y), 1 / 3, key=KEY))) == 3


def test_padded_batches_have_one_shape_and_the_same_members():
    x, y = _data(97)
    var = list(poisson_batches({"x": x, "y": y}, 0.1, key=KEY, num_batches=12))
    pad = list(poisson_batches({"x": x, "y": y}, 0.1, key=KEY, num_batches=12, max_batch_size=30))
    for v, (b, mask) in zip(var, pad, strict=True):
        size = v["y"].shape[0]
        assert b["x"].shape == (30, 3) and b["y"].shape == (30,) and mask.shape == (30,)
        assert mask.tolist() == [True] * size + [False] * (30 - size)
        assert fp.tree.allclose(unpad(b, mask), v, rtol=0, atol=0)
        if size:  # padding rows repeat the first member
            assert (b["y"][size:] == v["y"][0]).all()


def test_empty_batches():
    x, y = _data(10)
    var = list(poisson_batches((x, y), 1e-3, key=KEY, num_batches=5))
    assert all(b[1].shape == (0,) and b[0].shape == (0, 3) for b in var)
    (bx, by), mask = next(poisson_batches((x, y), 1e-3, key=KEY, max_batch_size=4))
    assert not mask.any() and by.tolist() == [0, 0, 0, 0] and bx.shape == (4, 3)
    padded, mask = pad_batch((x[:0], y[:0]), 3)
    assert padded[1].tolist() == [0, 0, 0] and not mask.any()


def test_overflow_raises_with_a_cap_that_works():
    x, y = _data(40)
    it = poisson_batches((x, y), 0.5, key=KEY, max_batch_size=3)
    with pytest.raises(
        ValueError,
        match=r"poisson_batches: batch 0 drew \d+ examples, more than "
        r"`max_batch_size`=3; .*poisson_max_batch_size\(40, 0.5\) = \d+",
    ):
        next(it)
    cap = poisson_max_batch_size(40, 0.5)
    assert (
        len(list(poisson_batches((x, y), 0.5, key=KEY, num_batches=50, max_batch_size=cap))) == 50
    )


def _tail_reference(n: int, q: float, p: float) -> int:
    cdf = _binomial_cdf(n, q)
    return next(m for m in range(n + 1) if 1 - cdf[m] <= p * (1 + 1e-9) or m == n)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 400), q=st.floats(0.001, 0.9), log_p=st.floats(-9, -2))
def test_poisson_max_batch_size_is_the_binomial_quantile(n, q, log_p):
    p = 10.0**log_p
    m = poisson_max_batch_size(n, q, p)
    cdf = _binomial_cdf(n, q)
    assert 1 - cdf[m] <= p + 1e-12  # the cap is safe enough ...
    assert m == 0 or 1 - cdf[m - 1] > p - 1e-12  # ... and the smallest such
    assert abs(m - _tail_reference(n, q, p)) <= 1  # (float rounding at the boundary)


# ------------------------------------------------------- padded rows change nothing


def test_padded_dp_gradient_sum_equals_unpadded():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    model = fp.functionalize(net)
    params = model.init(fp.random.key(0), torch.zeros(1, 3, dtype=torch.float64))["params"]
    x = torch.randn(60, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (60,))
    clip = 0.5

    def loss_fn(p, batch):
        bx, by = batch
        return fp.losses.cross_entropy(model.apply({"params": p}, bx), by)  # per example

    def clipped_sum(grads, mask):
        flat = torch.cat([g.reshape(g.shape[0], -1) for g in fp.tree.leaves(grads)], 1)
        scale = (clip / flat.norm(dim=1)).clamp(max=1.0)
        clipped = fp.tree.map(lambda g: g * scale.view(-1, *[1] * (g.dim() - 1)), grads)
        return masked_sum(clipped, mask)

    psg = fp.per_sample_grads(loss_fn)
    var = list(poisson_batches((x, y), 0.1, key=KEY, num_batches=4))
    pad = list(poisson_batches((x, y), 0.1, key=KEY, num_batches=4, max_batch_size=16))
    for (vx, vy), (batch, mask) in zip(var, pad, strict=True):
        assert vy.shape[0] > 0
        want = clipped_sum(psg(params, (vx, vy)), torch.ones(vy.shape[0], dtype=torch.bool))
        got = clipped_sum(psg(params, batch), mask)
        assert fp.tree.allclose(got, want, rtol=0, atol=1e-12)
        # independent reference: one autograd call per example
        ref = fp.tree.zeros_like(params)
        for j in range(vy.shape[0]):
            p = fp.tree.map(lambda t: t.detach().requires_grad_(), params)
            loss = loss_fn(p, (vx[j : j + 1], vy[j : j + 1])).sum()
            gs = torch.autograd.grad(loss, fp.tree.leaves(p))
            norm = torch.sqrt(sum((g**2).sum() for g in gs))
            factor = min(1.0, clip / norm.item())
            ref = fp.tree.unflatten(
                fp.tree.structure(params),
                [r + factor * g for r, g in zip(fp.tree.leaves(ref), gs, strict=True)],
            )
        assert fp.tree.allclose(got, ref, rtol=0, atol=1e-12)


def test_masked_sum_ignores_nan_on_padding_rows():
    g = {"w": torch.tensor([[1.0, 2.0], [float("nan"), float("inf")], [3.0, 4.0]])}
    out = masked_sum(g, torch.tensor([True, False, True]))
    assert out["w"].tolist() == [4.0, 6.0]
    compiled = torch.compile(masked_sum, backend="eager", fullgraph=True)
    assert compiled(g, torch.tensor([True, False, True]))["w"].tolist() == [4.0, 6.0]


def test_pad_batch_reference():
    x = torch.arange(6.0).view(3, 2)
    (px, py), mask = pad_batch((x, torch.tensor([7, 8, 9])), 5)
    assert px.tolist() == [[0, 1], [2, 3], [4, 5], [0, 1], [0, 1]] and py.tolist() == [
        7,
        8,
        9,
        7,
        7,
    ]
    assert mask.tolist() == [True, True, True, False, False]
    assert pad_batch({"a": x}, 3)[0]["a"] is not x  # a new tensor, the input untouched


# --------------------------------------------------------------------------- bad input


def test_mask_that_does_not_match_the_batch_names_the_path():
    grads = {
        "fc1": {"weight": torch.zeros(4, 2, 3), "bias": torch.zeros(4, 2)},
        "fc2": torch.zeros(5, 1),
    }
    with pytest.raises(
        ValueError,
        match=r"^masked_sum\(tree, mask\): leaf at path `fc2` has 5 rows "
        r"on axis 0 but `mask` has 4 entries",
    ):
        masked_sum(grads, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^unpad\(batch, mask\): leaf at path `\[1\]` has 3 rows"):
        unpad((torch.zeros(4), torch.zeros(3)), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"leaf at path `s` has no axis 0 \(a 0-d tensor\)"):
        check_mask({"s": torch.tensor(1.0)}, torch.ones(1, dtype=torch.bool))
    with pytest.raises(
        TypeError,
        match=r"^masked_sum\(tree, mask\): `mask` must be a bool tensor, got torch.float32",
    ):
        masked_sum(grads, torch.ones(4))
    with pytest.raises(
        ValueError, match=r"`mask` must be 1-D \(one entry per row\), got shape \(4, 1\)"
    ):
        masked_sum(grads, torch.ones(4, 1, dtype=torch.bool))


def test_bad_arguments_are_named():
    x, y = _data(10)
    for q in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(
            ValueError,
            match=r"poisson_batches\(data, sample_rate\): `sample_rate` must be in \(0, 1\]",
        ):
            poisson_batches((x, y), q, key=KEY)
        with pytest.raises(
            ValueError, match=r"poisson_mask\(.*\): `sample_rate` must be in \(0, 1\]"
        ):
            poisson_mask(KEY, 10, q)
    with pytest.raises(TypeError, match=r"`key` must be one fp.random key"):
        poisson_batches((x, y), 0.1, key=0)
    with pytest.raises(ValueError, match=r"`start` must be an int in \[0, 4\], got 5"):
        poisson_batches((x, y), 0.1, key=KEY, num_batches=4, start=5)
    with pytest.raises(ValueError, match=r"`max_batch_size` must be an int >= 1, got 0"):
        poisson_batches((x, y), 0.1, key=KEY, max_batch_size=0)
    with pytest.raises(ValueError, match=r"`num_batches` must be an int >= 0, got -1"):
        poisson_batches((x, y), 0.1, key=KEY, num_batches=-1)
    with pytest.raises(ValueError, match=r"the dataset is empty, so fixed-shape batches have no "
                       r"example to pad with"):  # it failed inside torch's index_select
        poisson_batches((x[:0], y[:0]), 0.1, key=KEY, max_batch_size=2)
    with pytest.raises(
        ValueError, match=r"leaf at path `\[1\]` has 9 examples but leaf `\[0\]` has 10"
    ):
        poisson_batches((x, y[:9]), 0.1, key=KEY)
    with pytest.raises(
        ValueError, match=r"pad_batch\(batch, size\): `batch` has 10 rows, more than `size`=4"
    ):
        pad_batch((x, y), 4)
    with pytest.raises(ValueError, match=r"`overflow_probability` must be in \(0, 1\), got 0"):
        poisson_max_batch_size(10, 0.1, 0)
