"""Sweep 23, clipping findings: per-example norms and clipped sums against a per-example
loop (``torch.autograd.grad`` on batches of one, float64 for the reference)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp

SETTINGS = settings(max_examples=8, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _complex_loss(p, x):
    return (F.linear(F.linear(x, p["W"]), p["V"]).abs() ** 2).sum(1)


def _loop(loss_fn, params, x):
    """Each example's flattened gradient, in complex128 (the reference's precision)."""
    rows = []
    for i in range(x.shape[0]):
        q = {k: v.to(torch.complex128).clone().requires_grad_() for k, v in params.items()}
        g = torch.autograd.grad(loss_fn(q, x[i:i + 1].to(torch.complex128)).sum(), list(q.values()))
        rows.append(torch.cat([t.flatten() for t in g]))
    return torch.stack(rows)


@SETTINGS
@given(batch=st.integers(1, 6), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.complex64, torch.complex128]),
       method=st.sampled_from(["vmap", "auto"]), max_norm=st.floats(0.1, 50.0))
def test_complex_parameters_norms_and_clipped_sums_match_the_loop(batch, seed, dtype, method,
                                                                  max_norm):
    """per_sample_grad_norms / clipped_grad / clipped_value_and_grad with complex parameters
    raised torch's "linalg.vector_norm: dtype should be complex for complex inputs" (the
    method the ghost and hooks errors recommend). Norms are sqrt(sum |g|^2), accumulated
    in float64 for complex128 and float32 for complex64, like the real dtypes."""
    g = torch.Generator().manual_seed(seed)
    p = {"W": torch.randn(3, 4, dtype=dtype, generator=g),
         "V": torch.randn(2, 3, dtype=dtype, generator=g)}
    x = torch.randn(batch, 4, dtype=dtype, generator=g)
    ref = _loop(_complex_loss, p, x)
    ref_norms = ref.abs().pow(2).sum(1).sqrt()
    ref_clip = (ref / torch.clamp(ref_norms / max_norm, min=1.0)[:, None]).sum(0)
    want_dtype = torch.float64 if dtype == torch.complex128 else torch.float32
    tol = 1e-10 if dtype == torch.complex128 else 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto: vmap, said once
        norms = fp.per_sample_grad_norms(_complex_loss, method=method)(p, x)
        clipped, n2 = fp.clipped_grad(_complex_loss, max_norm, method=method)(p, x)
        values, (clipped3, n3) = fp.clipped_value_and_grad(
            _complex_loss, max_norm, method=method, reduction="mean")(p, x)
    for n in (norms, n2, n3):
        assert n.dtype == want_dtype and n.shape == (batch,)
        torch.testing.assert_close(n.double(), ref_norms.real.double(), rtol=tol,
                                   atol=tol * float(ref_norms.abs().max()))
    atol = tol * float(ref_clip.abs().max())
    flat = torch.cat([clipped[k].flatten() for k in p])
    assert flat.dtype == dtype
    torch.testing.assert_close(flat.to(torch.complex128), ref_clip, rtol=tol, atol=atol)
    flat3 = torch.cat([clipped3[k].flatten() for k in p])
    torch.testing.assert_close(flat3.to(torch.complex128), ref_clip / batch, rtol=tol, atol=atol)
    want_values = _complex_loss(p, x).double()
    torch.testing.assert_close(values.double(), want_values, rtol=tol,
                               atol=tol * float(want_values.abs().max()))


def test_an_empty_complex128_batch_gives_float64_norms():
    p = {"W": torch.randn(3, 4, dtype=torch.complex128)}
    norms = fp.per_sample_grad_norms(lambda p, x: F.linear(x, p["W"]).abs().sum(1))(
        p, torch.zeros(0, 4, dtype=torch.complex128))
    assert norms.shape == (0,) and norms.dtype == torch.float64


def _routed(p, x):
    route = x[:, 0] > 0
    h = x.new_zeros(x.shape[0], 3)
    h[route] = F.linear(x[route], p["W1"])
    h[~route] = F.linear(x[~route], p["W2"])
    return F.linear(torch.tanh(h), p["V"]).pow(2).sum(1)


@pytest.mark.parametrize("api", ["clipped_grad", "clipped_value_and_grad", "per_sample_grad_norms"])
def test_mask_routing_names_the_call_and_the_first_refusal(api):
    """auto ended in torch's bare vmap "dynamic shape" error, naming neither the call nor
    why ghost and hooks refused; the loop computes the model."""
    torch.manual_seed(0)
    p = {"W1": torch.randn(3, 5, dtype=torch.float64), "W2": torch.randn(3, 5, dtype=torch.float64),
         "V": torch.randn(2, 3, dtype=torch.float64)}
    x = torch.randn(6, 5, dtype=torch.float64)
    for i in range(6):  # the loop runs it
        q = {k: v.clone().requires_grad_() for k, v in p.items()}
        torch.autograd.grad(_routed(q, x[i:i + 1]).sum(), list(q.values()), allow_unused=True)
    make = {"clipped_grad": lambda m: fp.clipped_grad(_routed, 1.0, method=m),
            "clipped_value_and_grad": lambda m: fp.clipped_value_and_grad(_routed, 1.0, method=m),
            "per_sample_grad_norms": lambda m: fp.per_sample_grad_norms(_routed, method=m)}[api]
    f = make("auto")
    for _ in range(2):  # the first call, and one that starts at the kept choice (vmap)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(RuntimeError) as info:
                f(p, x)
        text = str(info.value)
        assert text.startswith(f"{api}(loss_fn"), text
        assert "method='auto' took vmap because the fast methods refused this call (ghost: " in text
        assert "`W1`" in text and "torch.where" in text
        assert "dynamic shape" in str(info.value.__cause__)
    with pytest.raises(RuntimeError,
                       match=rf"^{api}\(loss_fn.*\): method='vmap' cannot run loss_fn"):
        make("vmap")(p, x)


def _mean_loss(p, x, scale):
    return (F.linear(x, p["W"]) * scale).pow(2).mean()  # a scalar: ghost and hooks refuse


def test_the_auto_warning_is_said_once_for_a_loss_fn_rebuilt_every_step():
    """A lambda or functools.partial built every step warned on every call, though the
    documentation says one warning per loss_fn."""
    p, x = {"W": torch.randn(2, 3)}, torch.randn(4, 3)
    for partial in (True, False):
        for name, wrap in [("clipped_grad", lambda f: fp.clipped_grad(f, 1.0)),
                           ("per_sample_grad_norms", fp.per_sample_grad_norms)]:
            scale = torch.tensor(0.5)  # a loss_fn of its own for each case

            def build(scale=scale, partial=partial):
                if partial:
                    return functools.partial(_mean_loss, scale=scale)
                return lambda p, x: _mean_loss(p, x, scale)

            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                for _ in range(3):  # a step: a new wrapper of a new loss_fn
                    wrap(build())(p, x)
            said = [w for w in seen if "method='auto' uses 'vmap'" in str(w.message)]
            assert len(said) == 1, (name, [str(w.message) for w in seen])
