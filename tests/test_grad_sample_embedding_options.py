"""``F.embedding`` / ``F.embedding_bag`` options the fast methods used to refuse:
``max_norm`` (NOTE [max_norm renormalises the table]) and ``scale_grad_by_freq`` (NOTE
[scale_grad_by_freq per example]), against a per-example autograd loop in float64."""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import settings
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline.transforms._grad_sample._rules import counts_in_rows

V, D, C = 9, 4, 3


class Lookup(nn.Module):
    def __init__(self, bag: bool, **kw) -> None:
        super().__init__()
        self.e = nn.EmbeddingBag(V, D, **kw) if bag else nn.Embedding(V, D, **kw)
        self.bag = bag
        self.head = nn.Linear(D, C)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.e(ids))
        return self.head(h if self.bag else h.mean(1))


def setup(bag: bool, seed: int, batch: int, seq: int, **kw):
    torch.manual_seed(seed)
    model = Lookup(bag, **kw)
    # rows of norm ~2-4, so that max_norm = 1 rescales every row it reads
    params = {k: 2 * v.detach().clone() for k, v in model.named_parameters()}
    ids = torch.randint(0, V, (batch, seq))
    ids[0, : seq // 2] = ids[0, 0]  # a repeated id in the first example
    y = torch.randint(0, C, (batch,))

    def loss_fn(p, ids, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (ids,)), y, reduction="none")

    return model, params, ids, y, loss_fn


def copy(params):
    return {k: v.clone() for k, v in params.items()}


def clipped_reference(ref, max_norm):
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in ref.values()))
    factor = (max_norm / norms).clamp(max=1)
    return norms, {k: (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in ref.items()}


def bag_through_embedding(kw):
    """The bag model written with ``F.embedding`` (whose ``scale_grad_by_freq`` backward
    is the same in every supported torch) and an explicit sum or mean over the ids that
    are not ``padding_idx``: the reference for bags with ``scale_grad_by_freq``. torch
    2.11's own ``embedding_bag`` backward divides the wrong rows by the frequency (ids
    ``[1, 1, 2, 3]``: row 2 halved), so a loop over it is no reference there."""
    pad = kw.get("padding_idx")

    def loss_fn(p, ids, y):
        rows = F.embedding(ids, p["e.weight"], pad, kw.get("max_norm"), kw.get("norm_type", 2.0),
                           scale_grad_by_freq=True)
        keep = torch.ones_like(ids, dtype=rows.dtype) if pad is None else (ids != pad).to(rows.dtype)
        h = (rows * keep.unsqueeze(-1)).sum(1)
        if kw.get("mode", "mean") == "mean":
            h = h / keep.sum(1, keepdim=True).clamp(min=1)
        return F.cross_entropy(F.linear(torch.tanh(h), p["head.weight"], p["head.bias"]), y,
                               reduction="none")

    return loss_fn


OPTIONS = [
    dict(max_norm=1.0),
    dict(max_norm=0.5, norm_type=1.0),
    dict(scale_grad_by_freq=True),
    dict(max_norm=1.0, scale_grad_by_freq=True, padding_idx=0),
]


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), seq=st.integers(1, 7),
       options=st.sampled_from(OPTIONS), bag=st.booleans(),
       mode=st.sampled_from(["mean", "sum", "max"]))
def test_lookup_options_match_the_loop(seed, batch, seq, options, bag, mode):
    kw = dict(options)
    if bag:
        kw["mode"] = mode
        if mode == "max" and kw.get("scale_grad_by_freq"):
            kw.pop("scale_grad_by_freq")  # torch refuses it with mode='max'
    _, params, ids, y, loss_fn = setup(bag, seed, batch, seq, **kw)
    reference = loss_fn
    if bag and kw.get("scale_grad_by_freq"):
        reference = bag_through_embedding(kw)
        torch.testing.assert_close(reference(copy(params), ids, y), loss_fn(copy(params), ids, y),
                                   rtol=0, atol=1e-12)  # the same function
    ref = loop_grads(reference, copy(params), ids, y)
    norms_ref, clipped_ref = clipped_reference(ref, 0.5)
    methods = ["hooks", "auto"] + ([] if bag else ["ghost"])
    for method in methods:
        if method != "ghost":
            got = fp.per_sample_grads(loss_fn, method=method)(copy(params), ids, y)
            for k in ref:
                torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-10, msg=f"{method} {k}")
        norms = fp.per_sample_grad_norms(loss_fn, method=method)(copy(params), ids, y)
        torch.testing.assert_close(norms, norms_ref, rtol=0, atol=1e-10)
        clipped, _ = fp.clipped_grad(loss_fn, 0.5, method=method)(copy(params), ids, y)
        for k in ref:
            torch.testing.assert_close(clipped[k], clipped_ref[k], rtol=0, atol=1e-10)


@pytest.mark.parametrize("bag", [False, True])
def test_max_norm_leaves_the_table_renormalised_as_eager_pytorch_does(bag):
    model, params, ids, y, loss_fn = setup(bag, 0, 4, 5, max_norm=1.0)
    eager = copy(params)
    fp.grad(lambda p, ids, y: loss_fn(p, ids, y).sum())(eager, ids, y)
    assert not torch.equal(eager["e.weight"], params["e.weight"])  # the forward rescaled rows
    read = torch.zeros(V, dtype=torch.bool)
    read[ids.unique()] = True
    assert eager["e.weight"][read].norm(dim=1).max() <= 1.0
    for method in ("hooks", "auto"):
        mine = copy(params)
        fp.per_sample_grads(loss_fn, method=method)(mine, ids, y)
        torch.testing.assert_close(mine["e.weight"], eager["e.weight"], rtol=0, atol=0)


def test_max_norm_under_vmap_says_which_method_handles_it():
    _, params, ids, y, loss_fn = setup(False, 0, 3, 4, max_norm=1.0)
    with pytest.raises(RuntimeError, match=r"method='vmap' cannot batch .*max_norm.*'hooks'"):
        fp.per_sample_grads(loss_fn, method="vmap")(copy(params), ids, y)


def test_dp_step_with_max_norm_equals_the_clipped_loop():
    """A DPTrainer step (sigma 0, SGD lr 1) moves the renormalised table by the clipped
    mean of the loop's per-example gradients."""
    _, params, ids, y, loss_fn = setup(False, 3, 6, 5, max_norm=1.0)
    ref = loop_grads(loss_fn, copy(params), ids, y)
    _, clipped_ref = clipped_reference(ref, 0.7)
    renormed = copy(params)
    fp.grad(lambda p, ids, y: loss_fn(p, ids, y).sum())(renormed, ids, y)
    trainer = fp.train.DPTrainer(lambda p, batch: loss_fn(p, *batch), fp.optim.sgd(1.0),
                                 l2_norm_clip=0.7, noise_multiplier=0.0, sample_rate=0.5,
                                 expected_batch_size=6.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sigma 0: no privacy, said by the trainer
        state = trainer.init(copy(params), fp.random.key(0))
        state, _ = trainer.step(state, (ids, y))
    for k in params:
        torch.testing.assert_close(state.params[k], renormed[k] - clipped_ref[k] / 6, rtol=0,
                                   atol=1e-12)


def test_counts_in_rows_matches_counting_each_row():
    torch.manual_seed(0)
    idx = torch.randint(0, 4, (6, 9))
    want = torch.stack([(row.unsqueeze(0) == row.unsqueeze(1)).sum(1) for row in idx])
    assert torch.equal(counts_in_rows(idx), want)


# -- sparse=True (NOTE [sparse embedding gradients]) ----------------------------------------


def sparse_loop(loss_fn, params, *batch):
    """One ``torch.autograd.grad`` per example; a ``sparse=True`` table's gradient comes
    back as a sparse tensor, densified here."""
    rows = []
    for i in range(batch[0].shape[0]):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        grads = torch.autograd.grad(loss_fn(p, *(b[i:i + 1] for b in batch)).sum(),
                                    list(p.values()))
        assert grads[0].is_sparse  # the table: what sparse=True changes
        rows.append([g.to_dense() if g.is_sparse else g for g in grads])
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(params)}


def sparse_case(case, seed=0, batch=5, seq=6):
    """A ``sparse=True`` lookup, a tanh and a linear head. ``case``: the layer
    (``"embedding"``, ``"bag"`` on 2-d ids, ``"offsets"``: a bag on 1-d ids of each
    example's first ``lengths[b]`` ids, one bag empty) and its options."""
    kind, kw = case
    kw = dict(kw)
    torch.manual_seed(seed)
    ids = torch.randint(0, V, (batch, seq))
    ids[0, : seq // 2] = ids[0, 0]  # a repeated id in the first example
    ids[1, 0] = 0  # padding_idx=0 in some cases
    y = torch.randint(0, C, (batch,))
    lengths = torch.randint(1, seq + 1, (batch,))
    lengths[-1] = 0
    psw = torch.rand(batch, seq) + 0.5
    head = nn.Linear(D, C)
    params = {"e.weight": 2 * torch.randn(V, D), "head.weight": head.weight.detach().clone(),
              "head.bias": head.bias.detach().clone()}
    weighted = kw.pop("weighted", False)
    last = kw.pop("include_last_offset", False)

    def out(p, h):
        return F.cross_entropy(F.linear(torch.tanh(h), p["head.weight"], p["head.bias"]), y_[0],
                               reduction="none")

    y_ = [None]

    if kind == "embedding":
        def loss_fn(p, ids, lengths, psw, y):
            y_[0] = y
            return out(p, F.embedding(ids, p["e.weight"], sparse=True, **kw).mean(1))
    elif kind == "bag":
        def loss_fn(p, ids, lengths, psw, y):
            y_[0] = y
            return out(p, F.embedding_bag(ids, p["e.weight"], sparse=True,
                                          per_sample_weights=psw if weighted else None, **kw))
    else:
        def loss_fn(p, ids, lengths, psw, y):
            y_[0] = y
            keep = torch.arange(ids.shape[1]) < lengths.unsqueeze(1)
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            return out(p, F.embedding_bag(ids[keep], p["e.weight"],
                                          offsets if last else offsets[:-1], sparse=True,
                                          per_sample_weights=psw[keep] if weighted else None,
                                          include_last_offset=last, **kw))

    return params, (ids, lengths, psw, y), loss_fn


SPARSE_CASES = [
    ("embedding", {}),
    ("embedding", dict(padding_idx=0)),
    ("embedding", dict(max_norm=1.0)),
    ("embedding", dict(max_norm=0.5, norm_type=1.0, padding_idx=0)),
    ("bag", dict(mode="mean")),
    ("bag", dict(mode="sum", weighted=True)),
    ("bag", dict(mode="sum", padding_idx=0)),
    ("bag", dict(mode="mean", padding_idx=0, max_norm=1.0)),
    ("offsets", dict(mode="mean")),
    ("offsets", dict(mode="sum", weighted=True, include_last_offset=True)),
    ("offsets", dict(mode="mean", padding_idx=0)),
    ("offsets", dict(mode="sum", max_norm=0.5, norm_type=1.0)),
]


@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
def test_sparse_lookups_match_the_loop_with_dense_gradients(case):
    """``sparse=True`` changes only the storage of autograd's gradient: the fast rules give
    the loop's (densified) per-example gradients, their norms and the clipped sum, dense."""
    params, batch, loss_fn = sparse_case(case)
    ref = sparse_loop(loss_fn, copy(params), *batch)
    norms_ref, clipped_ref = clipped_reference(ref, 0.5)
    for method in ("hooks", "auto"):
        got = fp.per_sample_grads(loss_fn, method=method)(copy(params), *batch)
        for k in ref:
            assert got[k].layout == torch.strided and got[k].shape == ref[k].shape
            torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-10, msg=f"{method} {k}")
    # ghost clipping has no rule for embedding bags (NOTE [ghost engine]): 'auto' takes hooks
    for method in ("hooks", "auto") + (("ghost",) if case[0] == "embedding" else ()):
        norms = fp.per_sample_grad_norms(loss_fn, method=method)(copy(params), *batch)
        torch.testing.assert_close(norms, norms_ref, rtol=0, atol=1e-10, msg=method)
        clipped, _ = fp.clipped_grad(loss_fn, 0.5, method=method)(copy(params), *batch)
        for k in ref:
            assert clipped[k].layout == torch.strided
            torch.testing.assert_close(clipped[k], clipped_ref[k], rtol=0, atol=1e-10,
                                       msg=f"{method} {k}")


@pytest.mark.parametrize("bag", [False, True])
def test_sparse_modules_match_their_dense_twins(bag):
    """nn.Embedding / nn.EmbeddingBag(sparse=True) give what sparse=False gives."""
    _, params, ids, y, loss_fn = setup(bag, 1, 4, 5, sparse=True)
    _, _, _, _, dense_fn = setup(bag, 1, 4, 5)
    for method in ("hooks", "auto"):
        got = fp.per_sample_grads(loss_fn, method=method)(copy(params), ids, y)
        want = fp.per_sample_grads(dense_fn, method=method)(copy(params), ids, y)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    for method in ("hooks", "auto") + (() if bag else ("ghost",)):
        got, _ = fp.clipped_grad(loss_fn, 0.3, method=method)(copy(params), ids, y)
        want, _ = fp.clipped_grad(dense_fn, 0.3, method=method)(copy(params), ids, y)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


@pytest.mark.parametrize("bag", [False, True])
def test_sparse_lookups_under_vmap_say_what_to_do(bag):
    _, params, ids, y, loss_fn = setup(bag, 0, 3, 4, sparse=True)
    match = r"vmap cannot batch the gradient of an embedding table with sparse=True.*sparse=False"
    with pytest.raises(RuntimeError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's batching-rule performance warnings
        fp.per_sample_grads(loss_fn, method="vmap")(copy(params), ids, y)
    with pytest.raises(RuntimeError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp.clipped_grad(loss_fn, 1.0, method="vmap")(copy(params), ids, y)


def test_max_norm_on_a_table_computed_inside_loss_fn_is_refused():
    """Rescaling a derived table in place would change what its gradient is pulled back
    through (NOTE [max_norm renormalises the table]); vmap cannot run it either."""
    params = {"w": torch.randn(V, D) * 3}
    ids = torch.randint(0, V, (3, 4))

    def loss(p, ids):
        return F.embedding(ids, p["w"] * 2, max_norm=1.0).sum((1, 2))

    with pytest.raises(ValueError, match=r"`w` \(through `Tensor.mul`\) is used by `F.embedding` "
                                         r"with max_norm=1.0 after being computed inside loss_fn"):
        fp.per_sample_grads(loss, method="hooks")(copy(params), ids)
    with pytest.raises(RuntimeError, match="method='vmap' cannot batch"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp.per_sample_grads(loss)(copy(params), ids)


@pytest.mark.parametrize("bag", [False, True])
def test_sparse_lookups_with_scale_grad_by_freq_are_refused_as_pytorch_refuses_them(bag):
    _, params, ids, y, loss_fn = setup(bag, 0, 3, 4, sparse=True, scale_grad_by_freq=True)
    with pytest.raises(RuntimeError, match="scale_grad_by_freq not supported with sparse"):
        sparse_loop(loss_fn, copy(params), ids, y)
    for method in ("hooks", "auto"):
        with pytest.raises(ValueError, match=r"does not take scale_grad_by_freq=True with "
                                             r"sparse=True .*sparse=False gives the same"):
            fp.per_sample_grads(loss_fn, method=method)(copy(params), ids, y)
    with pytest.raises(ValueError, match="scale_grad_by_freq=True with sparse=True"):
        fp.clipped_grad(loss_fn, 1.0)(copy(params), ids, y)


def test_sparse_bags_in_max_mode_are_refused_as_pytorch_refuses_them():
    _, params, ids, y, loss_fn = setup(True, 0, 3, 4, sparse=True, mode="max")
    with pytest.raises(ValueError, match="max mode does not support sparse"):
        loss_fn(copy(params), ids, y)
    for method in ("hooks", "auto"):
        with pytest.raises(ValueError, match="does not take sparse=True with mode='max'"):
            fp.per_sample_grads(loss_fn, method=method)(copy(params), ids, y)


# NOTE [max_norm renormalises the table]: a table read again after a max_norm lookup (a tied
# output head) read the rows every example of the batch rescaled: each example's gradient
# depended on the batch (86.6 off the loop; an example's norm 119.0 alone, 27.8 in a batch
# of 4), silently, in every method (auto too), breaking DP's sensitivity bound.


def _tied(ids, t, p):
    h = torch.tanh(F.embedding(ids, p["w"], max_norm=1.0))
    return (F.linear(h, p["w"]) - t).square().flatten(1).sum(1)


def test_a_table_read_again_after_a_max_norm_lookup_is_refused_by_every_method():
    torch.manual_seed(0)
    w = torch.randn(7, 3) * 2  # rows of norm > 1: the lookup rescales them
    ids, t = torch.randint(0, 7, (4, 5)), torch.randn(4, 5, 7)

    def losses(p, ids, t):
        return _tied(ids, t, p)

    for call in (fp.per_sample_grads(losses, method="hooks"), fp.per_sample_grad_norms(losses, method="ghost"),
                 fp.clipped_grad(losses, 1.0, method="hooks")):
        with pytest.raises(ValueError, match="max_norm"):
            call({"w": w.clone()}, ids, t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="max_norm"):  # auto: vmap cannot batch it either
            fp.per_sample_grads(losses)({"w": w.clone()}, ids, t)


def test_two_max_norm_lookups_of_one_table_still_take_the_fast_path():
    torch.manual_seed(1)
    w = torch.randn(7, 3) * 2
    a, b, y = torch.randint(0, 7, (4, 5)), torch.randint(0, 7, (4, 2)), torch.randn(4)

    def losses(p, a, b, y):
        ea = F.embedding(a, p["w"], max_norm=1.0).sum(1)
        eb = F.embedding(b, p["w"], max_norm=1.0).sum(1)
        return ((ea * eb).sum(1) - y) ** 2

    want = loop_grads(losses, {"w": w}, a, b, y)
    got = fp.per_sample_grads(losses, method="hooks")({"w": w.clone()}, a, b, y)
    torch.testing.assert_close(got["w"], want["w"], rtol=1e-10, atol=1e-12)
