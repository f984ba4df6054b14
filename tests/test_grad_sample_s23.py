"""Sweep 23, engine findings: per-sample gradients and norms of the fast methods against a
per-example loop in float64 (``per_example_reference.loop_grads``)."""

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
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads
from torch import nn

import functorch_pipeline as fp

SETTINGS = settings(max_examples=6, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol))


def norms_of(per: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.flatten(1).square().sum(1) for g in per.values()]).sum(0).sqrt()


def quiet(call, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args)


# -- finding 1: a statistic over the batch with no autograd graph ---------------------------


def standardised(p, x):
    """uint8 pixels standardised by the batch's mean and std: no graph (integer data cannot
    require grad), so the walks of NOTE [statistics over the examples] never see it."""
    x = x.double() / 255
    x = (x - x.mean()) / (x.std() + 1e-3)
    return (F.linear(torch.tanh(F.linear(x, p["W"])), p["V"]) ** 2).sum(1)


def scaled(p, x):
    """uint8 pixels scaled by a constant: a copy of the batch, per example."""
    x = x.double() / 255 - 0.5
    return (F.linear(torch.tanh(F.linear(x, p["W"])), p["V"]) ** 2).sum(1)


@SETTINGS
@given(batch=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_integer_inputs_standardised_by_the_batch_are_refused(batch, seed):
    """Every fast method gave the batch-coupled gradients (1.18 off the loop) and auto did
    not fall back; its first call (the padded run's answer) differed from its second.
    Now the padded run sees the first rows move with the padding: hooks and ghost refuse,
    auto gives the loop's numbers on every call."""
    g = torch.Generator().manual_seed(seed)
    p = {"W": torch.randn(3, 4, generator=g), "V": torch.randn(2, 3, generator=g)}
    x = torch.randint(0, 256, (batch, 4), dtype=torch.uint8, generator=g)
    want = loop_grads(standardised, p, x)
    loss_fn = functools.partial(standardised)  # a fresh object: nothing remembered
    for _ in range(2):
        got = quiet(fp.per_sample_grads(loss_fn), p, x)
        assert all(close(got[k], want[k]) for k in want)
        assert close(quiet(fp.per_sample_grad_norms(loss_fn), p, x), norms_of(want))
    with pytest.raises(ValueError, match="first rows changed when copies of the first example"):
        fp.per_sample_grads(functools.partial(standardised), method="hooks")(p, x)
    with pytest.raises(ValueError, match="a statistic over the examples"):
        fp.per_sample_grad_norms(functools.partial(standardised), method="ghost")(p, x)


@SETTINGS
@given(batch=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_integer_inputs_scaled_by_a_constant_keep_the_fast_path(batch, seed):
    """The control: a copy of the batch made without a graph passes the same check."""
    g = torch.Generator().manual_seed(seed)
    p = {"W": torch.randn(3, 4, generator=g), "V": torch.randn(2, 3, generator=g)}
    x = torch.randint(0, 256, (batch, 4), dtype=torch.uint8, generator=g)
    want = loop_grads(scaled, p, x)
    loss_fn = functools.partial(scaled)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back
        for _ in range(2):
            got = fp.per_sample_grads(loss_fn, method="hooks")(p, x)
            assert all(close(got[k], want[k]) for k in want)
            assert close(fp.per_sample_grad_norms(loss_fn, method="ghost")(p, x), norms_of(want))


# -- finding 2: a reorder in training mode, far from every rule input -----------------------


class FlipsInTraining(nn.Module):
    """Flips the batch before ``fc1`` and back after it, in training mode only, each flip
    ``depth`` elementwise steps (2 autograd nodes each) from the layers and the loss."""

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.fc1, self.fc2 = nn.Linear(5, 3), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = x.flip(0)
        for _ in range(self.depth):
            x = x * 1.01 + 0.01
        h = self.fc1(x)
        for _ in range(self.depth):
            h = torch.tanh(h) * 1.01
        if self.training:
            h = h.flip(0)
        for _ in range(self.depth):
            h = h * 1.01 + 0.01
        return self.fc2(h)


@pytest.mark.parametrize("depth", [1, 6, 12])
def test_a_training_mode_reorder_far_up_is_seen_after_an_eval_mode_call(depth):
    """Called in eval mode first, the remembered walk (the first 8 node names at each rule
    input) hid a training-mode reorder more than 8 nodes up: each example got another's
    fc1 gradient (0.62 off the loop). The record now counts the nodes made before each
    input, so the training call walks, and is refused (auto: the loop's numbers)."""
    torch.manual_seed(depth)
    net = FlipsInTraining(depth)
    params = {k: v.detach() for k, v in net.named_parameters()}
    x = torch.randn(4, 5)

    def loss_fn(p, x):
        return torch.func.functional_call(net, p, (x,)).pow(2).sum(1)

    net.eval()
    want_eval = loop_grads(loss_fn, params, x)
    got = fp.per_sample_grads(loss_fn, method="hooks")(params, x)
    assert all(close(got[k], want_eval[k]) for k in want_eval)
    net.train()
    want = loop_grads(loss_fn, params, x)
    with pytest.raises(ValueError, match="FlipBackward0"):
        fp.per_sample_grads(loss_fn, method="hooks")(params, x)
    with pytest.raises(ValueError, match="FlipBackward0"):
        fp.per_sample_grad_norms(loss_fn, method="ghost")(params, x)
    got = quiet(fp.per_sample_grads(loss_fn), params, x)
    assert all(close(got[k], want[k]) for k in want)
    assert close(quiet(fp.per_sample_grad_norms(loss_fn), params, x), norms_of(want))
    net.eval()  # and back: eval mode keeps the fast path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fp.per_sample_grads(loss_fn, method="hooks")(params, x)
    assert all(close(got[k], want_eval[k]) for k in want_eval)


def test_the_walk_is_still_skipped_on_calls_with_the_same_path(monkeypatch):
    """The count of nodes must not depend on whether the run walked (the walk itself makes
    a node): repeated calls of one model skip their walks as before."""
    from functorch_pipeline.transforms._grad_sample import _engine

    walks = []
    real = _engine.reordered_by
    monkeypatch.setattr(_engine, "reordered_by", lambda *a, **k: walks.append(1) or real(*a, **k))
    torch.manual_seed(0)
    net = FlipsInTraining(3).eval()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss_fn(p, x):
        return torch.func.functional_call(net, p, (x,)).pow(2).sum(1)

    def losses(p, x):
        return loss_fn(p, x).sum(1)

    grads = fp.per_sample_grads(losses, method="hooks")
    for length in (5, 4):  # an unpadded model, and one padded every call (T == B)
        x = torch.randn(4, length, 5)
        counts = []
        for _ in range(4):
            walks.clear()
            grads(params, x)
            counts.append(len(walks))
        assert counts[0] > 0 and counts[-1] == 0 and counts[-2] == 0, counts


# -- finding 3: a plain read of a table before a lookup with max_norm ------------------------


def _rerun_model(p, ids):
    h0 = F.embedding(ids, p["E"])  # a plain read of the table
    h = F.embedding(ids.flip(1), p["E"], max_norm=1.0)  # made in loss_fn: a padded run asks
    return (h0 * h).sum((1, 2))


def _chunked_model(p, ids):
    h0 = F.embedding(ids, p["E"])
    h = F.embedding(ids, p["E"], max_norm=1.0)
    return (h0 * h * torch.arange(1.0, ids.shape[1] + 1).view(1, -1, 1)).sum((1, 2))


@pytest.mark.parametrize("method", ["hooks", "ghost", "auto"])
@pytest.mark.parametrize("model,chunk_size", [(_rerun_model, None), (_chunked_model, 2),
                                              (_rerun_model, 3)])
def test_plain_reads_before_a_max_norm_lookup_see_the_rows_as_they_were(method, model, chunk_size):
    """A second run of loss_fn in a call (the padded run, a later chunk) read rows that the
    first had rescaled in place: gradients 4.2 off the loop on a first call, 3.1 with
    chunk_size=2. Each run now starts from the rows as they were, and the table is left as
    one eager forward of the batch leaves it."""
    torch.manual_seed(1)
    E0 = torch.randn(7, 3) * 2
    ids = torch.tensor([[0, 1, 2], [2, 3, 4], [4, 5, 6], [0, 6, 3], [1, 1, 5]])
    want = loop_grads(model, {"E": E0}, ids)
    eager = E0.clone()
    with torch.no_grad():
        model({"E": eager}, ids)
    assert not torch.equal(eager, E0)  # the batch rescales rows
    table = E0.clone()
    fn = functools.partial(model)  # a fresh loss_fn: its first call
    if method == "ghost":
        norms = fp.per_sample_grad_norms(fn, method="ghost", chunk_size=chunk_size)
        assert close(norms({"E": table}, ids), norms_of(want))
    else:
        grads = fp.per_sample_grads(fn, method=method, chunk_size=chunk_size)
        assert close(quiet(grads, {"E": table}, ids)["E"], want["E"])
    torch.testing.assert_close(table, eager, rtol=1e-12, atol=1e-12)


# -- finding 5: auto on a model vmap cannot batch either -------------------------------------


def _routed(p, x):
    route = x[:, 0] > 0
    h = x.new_zeros(x.shape[0], 3)
    h[route] = F.linear(x[route], p["W1"])
    h[~route] = F.linear(x[~route], p["W2"])
    return F.linear(torch.tanh(h), p["V"]).pow(2).sum(1)


def _gathered(p, x):
    rows = torch.nonzero(x[:, 0] > 0)[:, 0]
    h = torch.zeros(x.shape[0], 3).index_add(0, rows, F.linear(x[rows], p["W1"]))
    return F.linear(torch.tanh(h + F.linear(x, p["W2"])), p["V"]).pow(2).sum(1)


@pytest.mark.parametrize("model", [_routed, _gathered])
def test_routing_by_a_mask_names_the_call_and_the_refusal(model):
    """auto ended in torch's bare "vmap: We do not support batching operators that can
    support dynamic shape", naming neither the API nor why the fast methods refused."""
    p = {"W1": torch.randn(3, 5), "W2": torch.randn(3, 5), "V": torch.randn(2, 3)}
    x = torch.randn(6, 5)
    loop_grads(model, p, x)  # the loop runs it
    fn = functools.partial(model)
    for _ in range(2):  # the first call, and one with the decision cached
        with pytest.raises(RuntimeError) as info:
            quiet(fp.per_sample_grads(fn), p, x)
        text = str(info.value)
        assert text.startswith("per_sample_grads(loss_fn): method='auto' took vmap because the "
                               "fast method refused this call ("), text
        assert "`W1`" in text and "torch.where" in text and "shape depends on the values" in text
        assert "dynamic shape" in str(info.value.__cause__)
    with pytest.raises(RuntimeError, match=r"^per_sample_value_and_grad\(loss_fn\): method='vmap' "
                                           "cannot run loss_fn: it uses an op whose output shape"):
        fp.per_sample_value_and_grad(fn, method="vmap")(p, x)


def test_a_branch_on_a_value_names_the_call():
    """The same for vmap's data-dependent control flow."""
    p = {"W": torch.randn(3, 5)}

    def branching(p, x):
        h = F.linear(x, p["W"])
        return (h * 2 if h.sum() > 0 else h).pow(2).sum(1)

    with pytest.raises(RuntimeError, match=r"^per_sample_grads\(loss_fn\): method='vmap' cannot "
                       "run loss_fn: it uses Python control flow on a tensor's value"):
        fp.per_sample_grads(branching, method="vmap")(p, torch.randn(4, 5))


# -- finding 7: the auto warning of a loss_fn rebuilt every step ------------------------------


def _mean_loss(p, x, scale):
    return (F.linear(x, p["W"]) * scale).pow(2).mean()  # a scalar: auto takes vmap


def test_the_fallback_warning_is_said_once_for_a_loss_fn_rebuilt_every_step():
    """A functools.partial or a lambda built every step warned on every call while saying
    "said once per loss_fn"."""
    p, x = {"W": torch.randn(2, 3)}, torch.randn(4, 3)
    scale = 3.0
    for build in (lambda: functools.partial(_mean_loss, scale=scale),
                  lambda: (lambda p, x: _mean_loss(p, x, scale))):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            for _ in range(3):
                fp.per_sample_grads(build())(p, x)
        fallbacks = [w for w in seen if "falls back to 'vmap'" in str(w.message)]
        assert len(fallbacks) == 1, [str(w.message) for w in seen]


def test_closures_of_one_code_over_other_objects_warn_each():
    """The control: the same code closing over other objects is another loss_fn."""
    p, x = {"W": torch.randn(2, 3)}, torch.randn(4, 3)

    def make(scale):
        return lambda p, x: _mean_loss(p, x, scale)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for scale in (torch.tensor(2.0), torch.tensor(5.0)):
            fp.per_sample_grads(make(scale))(p, x)
    assert len([w for w in seen if "falls back to 'vmap'" in str(w.message)]) == 2
