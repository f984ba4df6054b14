"""fp.losses against torch.nn.functional (reduction="none")."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from functorch_pipeline import losses

F64 = torch.float64


def _logits(n=5, c=4, seed=0):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=F64) * 3


def _labels(n=5, c=4, seed=1):
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(2, 6), st.floats(0.0, 0.5))
def test_cross_entropy_matches_torch(n, c, smoothing):
    x, y = _logits(n, c), _labels(n, c)
    want = F.cross_entropy(x, y, reduction="none", label_smoothing=smoothing)
    torch.testing.assert_close(losses.cross_entropy(x, y, label_smoothing=smoothing), want)


def test_cross_entropy_class_axis_1_like_torch():
    x = torch.randn(3, 4, 5, dtype=F64)
    y = torch.randint(0, 4, (3, 5))
    torch.testing.assert_close(losses.cross_entropy(x, y, axis=1), F.cross_entropy(x, y, reduction="none"))


def test_nll_matches_torch():
    logp = torch.log_softmax(_logits(), -1)
    torch.testing.assert_close(losses.nll(logp, _labels()), F.nll_loss(logp, _labels(), reduction="none"))


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_softmax_cross_entropy_probabilities(smoothing):
    x = _logits()
    probs = torch.softmax(_logits(seed=3), -1)
    want = F.cross_entropy(x, probs, reduction="none", label_smoothing=smoothing)
    torch.testing.assert_close(losses.softmax_cross_entropy(x, probs, label_smoothing=smoothing), want)
    onehot = F.one_hot(_labels(), 4).to(F64)
    torch.testing.assert_close(losses.softmax_cross_entropy(x, onehot), losses.cross_entropy(x, _labels()))


def test_sigmoid_binary_cross_entropy_matches_torch():
    x = _logits() * 10  # includes large magnitudes: must stay finite
    y = (torch.rand(5, 4, generator=torch.Generator().manual_seed(2)) > 0.5).to(F64)
    torch.testing.assert_close(losses.sigmoid_binary_cross_entropy(x, y), F.binary_cross_entropy_with_logits(x, y, reduction="none"))


def test_regression_losses_match_torch():
    p, t = _logits(), _logits(seed=5)
    torch.testing.assert_close(losses.squared_error(p, t), F.mse_loss(p, t, reduction="none"))
    torch.testing.assert_close(losses.l2_loss(p, t), 0.5 * F.mse_loss(p, t, reduction="none"))
    for delta in (0.5, 1.0, 2.0):
        torch.testing.assert_close(losses.huber_loss(p, t, delta), F.huber_loss(p, t, reduction="none", delta=delta))
    torch.testing.assert_close(losses.squared_error(p), p * p)


def test_kl_divergence_matches_torch():
    logq = torch.log_softmax(_logits(), -1)
    p = torch.softmax(_logits(seed=4), -1)
    p[0, 0] = 0.0  # 0 log 0 = 0
    want = F.kl_div(logq, p, reduction="none").sum(-1)
    torch.testing.assert_close(losses.kl_divergence(logq, p), want)
    torch.testing.assert_close(losses.kl_divergence(logq, p).mean(), F.kl_div(logq, p, reduction="batchmean"))


def test_smooth_labels():
    torch.testing.assert_close(losses.smooth_labels(torch.tensor([[0.0, 0.0, 1.0, 0.0]]), 0.4), torch.tensor([[0.1, 0.1, 0.7, 0.1]]))


def test_per_example_grads_under_vmap():
    x, y = _logits(), _labels()
    w = torch.eye(4, dtype=F64)

    def loss(w, xi, yi):
        return losses.cross_entropy((xi @ w)[None], yi[None])[0]

    per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x, y)
    for i in range(5):
        wi = w.clone().requires_grad_()
        F.cross_entropy((x[i] @ wi)[None], y[i][None]).backward()
        torch.testing.assert_close(per[i], wi.grad)


def test_bad_labels_are_clear():
    with pytest.raises(TypeError, match=r"cross_entropy\(logits, labels\): `labels` must be integer class indices"):
        losses.cross_entropy(_logits(), _labels().to(F64))
    with pytest.raises(ValueError, match=r"must have the shape of `logits` without the class axis -1, i.e. \(5,\), got \(4,\)"):
        losses.cross_entropy(_logits(), _labels(4))
    with pytest.raises(ValueError, match=r"softmax_cross_entropy\(logits, labels\): `labels` must have the shape"):
        losses.softmax_cross_entropy(_logits(), _labels())


# --- issue 14 part B: optax's where= and the integer-labels alias ------------------------


def _mask(n, c, seed, label=None):
    """A random class mask with at least one class per row (the label's, if given)."""
    m = torch.rand(n, c, generator=torch.Generator().manual_seed(seed)) < 0.6
    if label is not None:
        m[torch.arange(n), label] = True
    else:
        m[:, 0] = True
    return m


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(2, 6), st.floats(0.0, 0.5), st.integers(0, 999))
def test_cross_entropy_where_matches_torch_on_the_kept_classes(n, c, smoothing, seed):
    """Per row, F.cross_entropy over the kept classes only (the label re-indexed)."""
    logits, labels = _logits(n, c, seed), _labels(n, c, seed + 1)
    where = _mask(n, c, seed + 2, labels)
    got = losses.softmax_cross_entropy_with_integer_labels(logits, labels, where=where,
                                                           label_smoothing=smoothing)
    for i in range(n):
        keep = where[i].nonzero().squeeze(1)
        lab = int((keep == labels[i]).nonzero())
        want = F.cross_entropy(logits[i, keep][None], torch.tensor([lab]),
                               label_smoothing=smoothing)
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(2, 6), st.floats(0.0, 0.5), st.integers(0, 999))
def test_softmax_cross_entropy_where_matches_torch(n, c, smoothing, seed):
    logits = _logits(n, c, seed)
    where = _mask(n, c, seed + 2)
    probs = torch.softmax(_logits(n, c, seed + 3), -1) * where
    probs = probs / probs.sum(-1, keepdim=True)
    got = losses.softmax_cross_entropy(logits, probs, where=where, label_smoothing=smoothing)
    for i in range(n):
        keep = where[i].nonzero().squeeze(1)
        want = F.cross_entropy(logits[i, keep][None], probs[i, keep][None],
                               label_smoothing=smoothing)
        torch.testing.assert_close(got[i], want, rtol=1e-12, atol=1e-12)


def test_where_batch_mask_zeroes_examples_without_nan_gradients():
    logits, labels = _logits(), _labels()
    keep = torch.tensor([True, False, True, False, True])
    full = losses.cross_entropy(logits, labels)
    for fn, args in ((losses.cross_entropy, (labels,)),
                     (losses.softmax_cross_entropy, (F.one_hot(labels, 4).to(F64),))):
        got = fn(logits, *args, where=keep)
        torch.testing.assert_close(got, torch.where(keep, full, torch.zeros_like(full)))
        def dropped(x, *a, fn=fn):
            return fn(x[None], *(y[None] for y in a), where=torch.tensor([False])).sum()

        g = torch.func.vmap(torch.func.grad(dropped))(logits, *args)
        assert torch.equal(g, torch.zeros_like(g))  # no class kept: loss 0, gradient 0
    msg = r"cross_entropy\(logits, labels\): `where` must be a bool"
    with pytest.raises(TypeError, match=msg):
        losses.cross_entropy(logits, labels, where=keep.to(F64))
    with pytest.raises(ValueError, match=r"`where` of shape \(3,\) does not broadcast"):
        losses.cross_entropy(logits, labels, where=keep[:3])


def test_kl_divergence_where_drops_terms():
    logp = torch.log_softmax(_logits(), -1)
    t = torch.softmax(_logits(seed=4), -1)
    where = _mask(5, 4, 9)
    want = (F.kl_div(logp, t, reduction="none") * where).sum(-1)
    torch.testing.assert_close(losses.kl_divergence(logp, t, where=where), want)


def test_integer_labels_alias():
    assert losses.softmax_cross_entropy_with_integer_labels is losses.cross_entropy
    assert "softmax_cross_entropy_with_integer_labels" in losses.__all__


@pytest.mark.parametrize("bad", [5, -1, -100])
@pytest.mark.parametrize("call", ["cross_entropy", "cross_entropy_where", "nll"])
def test_labels_out_of_range_name_the_loss_and_the_range(bad, call):
    """torch's gather error said "index 5 is out of bounds for dimension 1" (dimension 2
    under vmap) and named neither the loss nor `labels`; F.cross_entropy also refuses
    5 and -1 (IndexError), and ignores -100, which has no equivalent here."""
    logits = torch.randn(4, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, bad])
    with pytest.raises(IndexError):
        if bad != -100:
            F.cross_entropy(logits, labels, reduction="none")
        else:
            raise IndexError("ignore_index")  # torch ignores it; we refuse it (documented)
    fn = {"cross_entropy": lambda: losses.cross_entropy(logits, labels),
          "cross_entropy_where": lambda: losses.cross_entropy(logits, labels, where=torch.ones(4, 5, dtype=torch.bool)),
          "nll": lambda: losses.nll(torch.log_softmax(logits, -1), labels)}[call]
    name = "nll(log_probs, labels)" if call == "nll" else "cross_entropy(logits, labels)"
    with pytest.raises(IndexError, match=rf"{name.replace('(', '[(]').replace(')', '[)]')}: `labels` must be class "
                       r"indices in \[0, 5\)"):
        fn()


@pytest.mark.parametrize("axis", [2, 3, -3])
def test_an_axis_out_of_range_is_refused_with_where_too(axis):
    """With `where`, softmax_cross_entropy took axis % ndim: axis 2 of 2-d logits gave the
    loss over axis 0 (optax raises, as every other loss here did)."""
    logits, labels = torch.randn(4, 4), torch.softmax(torch.randn(4, 4), -1)
    where = torch.ones(4, 4, dtype=torch.bool)
    for call in (lambda: losses.softmax_cross_entropy(logits, labels, axis=axis, where=where),
                 lambda: losses.softmax_cross_entropy(logits, labels, axis=axis),
                 lambda: losses.cross_entropy(logits, torch.zeros(4, dtype=torch.int64), axis=axis, where=where)):
        with pytest.raises(IndexError):
            call()


def test_where_leaves_out_examples_with_any_label():
    """The refusal of label -100 says to leave such examples out with `where`; doing so
    still raised. Reference: F.cross_entropy's ignore_index (0 for ignored examples)."""
    logits = torch.randn(4, 5, dtype=torch.float64)
    labels = torch.tensor([2, -100, 4, -100])
    got = losses.cross_entropy(logits, labels, where=labels >= 0)
    want = F.cross_entropy(logits, labels, reduction="none", ignore_index=-100)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    with pytest.raises(IndexError, match=r"`labels` must be class indices in \[0, 5\)"):
        losses.cross_entropy(logits, labels, where=torch.ones(4, 5, dtype=torch.bool))
