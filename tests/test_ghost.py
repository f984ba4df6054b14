"""fp.clipped_grad / fp.per_sample_grad_norms (ghost, hooks, vmap) against a Python loop of
torch.autograd over examples (float64, 1e-10), plus fp.per_sample_grads as a second
reference for the norms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import settings
from torch import nn

import functorch_pipeline as fp

TOL = 1e-10
METHODS = ("ghost", "hooks", "vmap")
FAST = settings(max_examples=6, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in module.named_parameters()}


def squared(module: nn.Module):
    """Per-example losses: the squared output of ``module`` summed per example."""

    def loss(p, x):
        out = torch.func.functional_call(module, p, (x,))
        out = out[0] if isinstance(out, tuple) else out
        return (out ** 2).flatten(1).sum(1)

    return loss


def loop_grads(loss_fn, params, *batch):
    """The reference: one ``torch.autograd.grad`` per example (batches of one)."""
    rows = []
    for i in range(batch[0].shape[0]):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        loss = loss_fn(p, *(b[i:i + 1] for b in batch))
        assert loss.shape == (1,)
        grads = torch.autograd.grad(loss.sum(), list(p.values()), allow_unused=True)
        rows.append([torch.zeros_like(v) if g is None else g
                     for v, g in zip(p.values(), grads, strict=True)])
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(params)}


def reference(loss_fn, params, batch, max_norm, reduction="sum"):
    """Norms and clipped sum from the per-example loop, clipped by hand."""
    per = loop_grads(loss_fn, params, *batch)
    b = batch[0].shape[0]
    norms = torch.stack([g.reshape(b, -1).square().sum(1) for g in per.values()]).sum(0).sqrt()
    scale = torch.clamp(max_norm / norms, max=1.0)
    clipped = {k: (g * scale.reshape(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in per.items()}
    if reduction == "mean":
        clipped = {k: v / b for k, v in clipped.items()}
    return norms, clipped


def assert_close(got, want, what):
    err = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= TOL * scale, f"{what}: max error {err:.3e}"


def check(loss_fn, params, *batch, methods=METHODS, clip_quantile=0.5, **kw):
    """Every method's norms and clipped sum against the loop, with ``max_norm`` at the
    median norm so that some examples are clipped and some are not."""
    ref_norms, _ = reference(loss_fn, params, batch, 1.0)
    max_norm = float(ref_norms.quantile(clip_quantile)) + 1e-3
    _, want = reference(loss_fn, params, batch, max_norm, kw.get("reduction", "sum"))
    for method in methods:
        g, norms = fp.clipped_grad(loss_fn, max_norm, method=method, **kw)(params, *batch)
        assert_close(norms, ref_norms, f"{method} norms")
        assert g.keys() == want.keys()
        for k in want:
            assert_close(g[k], want[k], f"{method} clipped {k}")
        n2 = fp.per_sample_grad_norms(loss_fn, method=method)(params, *batch)
        assert_close(n2, ref_norms, f"{method} per_sample_grad_norms")


def test_linear_flat():
    torch.manual_seed(0)
    m = nn.Linear(5, 3)
    check(squared(m), params_of(m), torch.randn(6, 5))


def test_linear_sequence():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    check(squared(m), params_of(m), torch.randn(5, 7, 4))
