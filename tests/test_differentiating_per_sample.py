"""Differentiating through per-example gradients, norms and clipped sums (NOTE
[differentiating through per-example gradients] in ``transforms/_per_sample.py``, NOTE
[differentiating inside loss_fn] in ``_grad_sample/_engine.py``).

The fast methods return results without an autograd graph. Before, the default method
took them anyway when an input required grad, so a gradient-norm penalty, a meta-gradient
through a clipped step, a learned clipping bound or a gradient with respect to the batch
silently lost that term (errors 0.13-17), and an inner ``fp.grad`` step inside ``loss_fn``
was taken as a constant (error 0.62). The reference is a per-example autograd loop with
``create_graph=True`` (float64)."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import functorch_pipeline as fp

F64 = torch.float64
B, D, CLIP = 6, 4, 0.3


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(B, D, generator=g, dtype=F64), torch.randn(B, generator=g, dtype=F64)
    p = {"w": torch.randn(1, D, generator=g, dtype=F64), "b": torch.randn(1, generator=g, dtype=F64)}
    return p, x, y


def losses(p, x, y):
    return (torch.tanh(F.linear(x, p["w"], p["b"]))[:, 0] - y) ** 2


def _loop_grads(p, x, y, loss=losses):
    """Each example's gradient, with a graph back to ``p`` and ``x``."""
    p = {k: v if v.requires_grad else v.clone().requires_grad_() for k, v in p.items()}
    rows = [torch.autograd.grad(loss(p, x[i:i + 1], y[i:i + 1]).sum(), list(p.values()),
                                create_graph=True) for i in range(B)]
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(p)}


def _norms(g):
    return torch.stack([v.flatten(1).pow(2).sum(1) for v in g.values()]).sum(0).sqrt()


def _clipped(g, c):
    f = 1.0 / torch.clamp(_norms(g) / c, min=1.0)
    return {k: (v * f.view(-1, *[1] * (v.dim() - 1))).sum(0) for k, v in g.items()}


def _requiring(p):
    return {k: v.clone().requires_grad_() for k, v in p.items()}


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_gradient_norm_penalty():
    p, x, y = _data()
    pr = _requiring(p)
    want = torch.autograd.grad(losses(pr, x, y).mean() + _norms(_loop_grads(pr, x, y)).mean(),
                               list(pr.values()))
    pa = _requiring(p)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        norms = fp.per_sample_grad_norms(losses)(pa, x, y)
    assert any("uses 'vmap'" in str(m.message) and "requires grad" in str(m.message) for m in w)
    got = torch.autograd.grad(losses(pa, x, y).mean() + norms.mean(), list(pa.values()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_meta_gradient_through_a_clipped_step():
    p, x, y = _data()
    xv, yv = x.flip(0), y.flip(0)

    def outer(pr, clipped_sum):
        q = {k: pr[k] - 0.5 * clipped_sum[k] / B for k in pr}
        return losses(q, xv, yv).mean()

    pr = _requiring(p)
    want = torch.autograd.grad(outer(pr, _clipped(_loop_grads(pr, x, y), CLIP)), list(pr.values()))
    pa = _requiring(p)
    with _quiet():
        summed, _ = fp.clipped_grad(losses, CLIP)(pa, x, y)
    got = torch.autograd.grad(outer(pa, summed), list(pa.values()))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_learned_clipping_bound():
    p, x, y = _data()
    c0 = torch.tensor(CLIP, dtype=F64)
    cr = c0.clone().requires_grad_()
    ref = _clipped(_loop_grads(p, x, y), cr)
    want = torch.autograd.grad(sum(v.sum() for v in ref.values()) + 0.1 * cr ** 2, cr)[0]
    cg = c0.clone().requires_grad_()
    with _quiet():
        summed, _ = fp.clipped_grad(losses, cg)(p, x, y)
    got = torch.autograd.grad(sum(v.sum() for v in summed.values()) + 0.1 * cg ** 2, cg)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert abs(float(got) - 0.2 * CLIP) > 1e-3  # the clipped sum's own term is there


def test_gradient_with_respect_to_the_batch():
    p, x, y = _data()
    xr = x.clone().requires_grad_()
    ref = _loop_grads(p, xr, y)
    want = torch.autograd.grad(sum(v.pow(2).sum() for v in ref.values()), xr)[0]
    xa = x.clone().requires_grad_()
    with _quiet():
        g = fp.per_sample_grads(losses)(p, xa, y)
    got = torch.autograd.grad(sum(v.pow(2).sum() for v in g.values()), xa)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("api", ["per_sample_grads", "per_sample_grad_norms", "clipped_grad"])
def test_explicit_fast_methods_refuse_an_input_that_requires_grad(api):
    p, x, y = _data()
    method = "hooks" if api == "per_sample_grads" else "ghost"
    f = {"per_sample_grads": lambda: fp.per_sample_grads(losses, method=method),
         "per_sample_grad_norms": lambda: fp.per_sample_grad_norms(losses, method=method),
         "clipped_grad": lambda: fp.clipped_grad(losses, CLIP, method=method)}[api]()
    with pytest.raises(ValueError, match=r"without an autograd graph.*argument 0 at `b` requires grad"):
        f(_requiring(p), x, y)
    with torch.no_grad():  # the same call without recording is the fast path, as before
        f(_requiring(p), x, y)


def _reg(p):
    return sum(torch.cos(v).sum() for v in p.values())


def _inner_fp_grad(p, x, y):
    g = fp.grad(_reg)(p)
    return losses({k: p[k] - 0.5 * g[k] for k in p}, x, y)


def _inner_autograd(p, x, y):
    g = torch.autograd.grad(_reg(p), list(p.values()), create_graph=True)
    return losses({k: p[k] - 0.5 * gi for k, gi in zip(p, g, strict=True)}, x, y)


@pytest.mark.parametrize("inner", [_inner_fp_grad, _inner_autograd], ids=["fp.grad", "autograd.grad"])
def test_an_inner_step_inside_loss_fn(inner):
    p, x, y = _data()

    def second_order(pr, xi, yi):  # the loop's loss: the inner step differentiated through
        g = torch.autograd.grad(_reg(pr), list(pr.values()), create_graph=True)
        return losses({k: pr[k] - 0.5 * gi for k, gi in zip(pr, g, strict=True)}, xi, yi)

    want = {k: v.detach() for k, v in _loop_grads(_requiring(p), x, y, second_order).items()}
    with _quiet():
        got = fp.per_sample_grads(inner)(p, x, y)
        norms = fp.per_sample_grad_norms(inner)(p, x, y)
        summed, _ = fp.clipped_grad(inner, CLIP)(p, x, y)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-12)
    torch.testing.assert_close(norms, _norms(want), rtol=0, atol=1e-12)
    for k, v in _clipped(want, CLIP).items():
        torch.testing.assert_close(summed[k], v, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="differentiates a parameter itself"):
        fp.per_sample_grads(inner, method="hooks")(p, x, y)
