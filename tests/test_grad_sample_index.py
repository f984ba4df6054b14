"""NOTE [a parameter indexed by the batch] (``p[ids]``, ``p.index_select(0, ids)`` with the
batch's ids) and NOTE [a parameter written into the batch] (``h[key] = p`` in place),
against a per-example autograd loop in float64 (hooks, auto, ghost norms and clipped sums).
Before these rules, hooks refused both; ``auto`` fell back to ``vmap`` for the first and
could not run the second at all with a boolean mask (wav2vec 2.0's and HuBERT's
SpecAugment raised from every method)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given
from hypothesis import settings
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads
from test_grad_sample_broadcast import check
from test_grad_sample_broadcast import refused_then_loop
from torch import nn

import functorch_pipeline as fp

D = 4

LOOKUPS = {  # a parameter's rows selected by the batch's ids (y: (B,), ids: (B, 2))
    "gamma[y] (conditional scale)": lambda p, x, y, ids: x * p["G"][y],
    "G[(y, ...)]": lambda p, x, y, ids: x * p["G"][y, ...],
    "G[y, :]": lambda p, x, y, ids: x * p["G"][y, :],
    "index_select": lambda p, x, y, ids: x * p["G"].index_select(0, y),
    "torch.index_select": lambda p, x, y, ids: x * torch.index_select(p["G"], 0, y),
    "W[y] in a bmm (per-class weights)": lambda p, x, y, ids: torch.bmm(x[:, None], p["W"][y])[:, 0],
    "v[y] (a vector: one number each)": lambda p, x, y, ids: x * p["v"][y][:, None],
    "G[ids].sum(1) (a bag of ids)": lambda p, x, y, ids: x * p["G"][ids].sum(1),
    "G[ids[:, 1]] (a column)": lambda p, x, y, ids: x * p["G"][ids[:, 1]],
    "(2 G)[y] (a derived table)": lambda p, x, y, ids: x * (2 * p["G"])[y],
}


@settings(max_examples=40, deadline=None)
@given(form=st.sampled_from(sorted(LOOKUPS)), batch=st.integers(1, 6), seed=st.integers(0, 2 ** 16))
def test_a_parameter_indexed_by_the_batch_matches_the_loop(form, batch, seed):
    """Classes as many as the batch (5) included: the ids hold the examples because they
    read a batch argument, not by their size."""
    g = torch.Generator().manual_seed(seed)
    C = 5
    params = {"G": torch.randn(C, D, generator=g), "W": torch.randn(C, D, D, generator=g),
              "v": torch.randn(C, generator=g), "V": torch.randn(D, 2, generator=g)}
    x = torch.randn(batch, D, generator=g)
    y, ids = torch.randint(0, C, (batch,), generator=g), torch.randint(0, C, (batch, 2), generator=g)

    def losses(p, xb, yb, idsb):
        return torch.tanh(LOOKUPS[form](p, xb, yb, idsb) @ p["V"]).pow(2).sum(1)

    check(losses, params, x, y, ids)


def test_ids_computed_in_loss_fn_keep_the_old_path():
    """``G[y % C]``: ids made in ``loss_fn`` from the batch are not taken by size alone
    (NOTE [a parameter indexed by the batch]): refused by name, and the default method
    falls back to the loop's numbers; negative ids too."""
    g = torch.Generator().manual_seed(3)
    params = {"G": torch.randn(5, D, generator=g)}
    x, y = torch.randn(4, D, generator=g), torch.randint(0, 9, (4,), generator=g)

    def computed(p, xb, yb):
        return (xb * p["G"][yb % 5]).sum(1)

    refused_then_loop(computed, params, x, y, match="indexed by a tensor that holds examples")

    def lookup(p, xb, yb):  # the batch's own ids, negative: from the end of the table
        return (xb * p["G"][yb]).sum(1)

    refused_then_loop(lookup, params, x, y % 5 - 5, match="indexed by a tensor that holds examples")


def write(form: str, h: torch.Tensor, mask: torch.Tensor, p: dict) -> torch.Tensor:
    """The forms of ``h[key] = value`` (and ``index_put``) the test runs, on ``h`` of shape
    ``(B, T, D)``; returns the written tensor."""
    rows = torch.arange(h.shape[0])[:, None]
    first = torch.tensor([[0, 0, h.shape[1] - 1]])  # position 0 twice: accumulate adds both
    if form == "mask":  # SpecAugment / MAE: a learned token at the masked positions
        h[mask] = p["tok"]
    elif form == "mask, cast":  # wav2vec 2.0 writes masked_spec_embed.to(h.dtype)
        h[mask] = p["tok"].to(h.dtype)
    elif form == "mask, leading 1":  # a (1, D) token: torch drops the leading axis
        h[mask] = p["tok"][None]
    elif form == "position 0":  # a class token written in place
        h[:, 0] = p["tok"]
    elif form == "positions":  # integer indices along the sequence
        h[:, torch.tensor([0, h.shape[1] - 1])] = p["tok"] * 2
    elif form == "features":  # a slice of the features, broadcast over examples and positions
        h[..., :2] = p["tok"][:2]
    elif form == "index_put_":  # in place, broadcast index tensors
        h.index_put_((rows, first[:, 1:]), p["tok"])
    elif form == "index_put, accumulate":  # out of place; position 0 gets the token twice
        h = h.index_put((rows, first), p["tok"], accumulate=True)
    elif form == "torch.index_put of the mask":
        h = torch.index_put(h, (mask,), p["tok"])
    else:  # "full table": a (T, D) parameter written at every example's masked positions
        h[mask] = p["table"].expand(h.shape[0], -1, -1)[mask]
    return h


FORMS = ["mask", "mask, cast", "mask, leading 1", "position 0", "positions", "features",
         "index_put_", "index_put, accumulate", "torch.index_put of the mask", "full table"]


@settings(max_examples=40, deadline=None)
@given(form=st.sampled_from(FORMS), batch=st.integers(1, 5), seq=st.integers(2, 5),
       seed=st.integers(0, 2 ** 16))
def test_a_parameter_written_into_the_batch_matches_the_loop(form, batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    params = {"tok": torch.randn(D, generator=g), "W": torch.randn(D, 3, generator=g),
              "table": torch.randn(seq, D, generator=g)}
    x = torch.randn(batch, seq, D, generator=g)
    mask = torch.rand(batch, seq, generator=g) < 0.5

    def losses(p, xb, m):
        h = xb @ p["W"][:, :1].expand(D, D) + 1  # h has a graph: a layer's output
        h = write(form, h, m, p)
        return torch.tanh(h @ p["W"]).pow(2).reshape(h.shape[0], -1).sum(1)

    check(losses, params, x, mask)


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_a_token_written_into_a_copy_of_the_data(batch):
    """``h = x.clone(); h[mask] = tok``: a copy made inside loss_fn with no graph, which
    only a padded run can tell from a constant (NOTE [constants or batch data]); sizes equal
    to the batch included."""
    torch.manual_seed(batch)
    params = {"tok": torch.randn(D), "W": torch.randn(D, 3)}
    x, mask = torch.randn(batch, 4, D), torch.rand(batch, 4) < 0.5
    mask[0, 0] = True

    def losses(p, xb, m):
        h = xb.clone()
        h[m] = p["tok"]
        return (h @ p["W"]).tanh().sum((1, 2))

    check(losses, params, x, mask)


class SpecAugmentEncoder(nn.Module):
    """wav2vec 2.0's pattern (``Wav2Vec2Model._mask_hidden_states``): features projected,
    the masked frames replaced in place by a learned vector, then a layer over time."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, D)
        self.masked_spec_embed = nn.Parameter(torch.rand(D))
        self.layer = nn.TransformerEncoderLayer(D, 2, 8, dropout=0.0, batch_first=True)
        self.head = nn.Linear(D, 3)

    def forward(self, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.proj(feats)
        h[mask] = self.masked_spec_embed.to(h.dtype)
        return self.head(self.layer(h).mean(1))


def test_a_spec_augment_encoder_takes_the_fast_path_and_matches_the_loop():
    torch.manual_seed(0)
    model = SpecAugmentEncoder().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    feats, mask = torch.randn(3, 5, 6), torch.rand(3, 5) < 0.4
    mask[:, 0] = True
    y = torch.tensor([0, 2, 1])

    def losses(p, f, m, yb):
        out = torch.func.functional_call(model, p, (f, m))
        return nn.functional.cross_entropy(out, yb, reduction="none")

    want = loop_grads(losses, params, feats, mask, y)
    assert want["masked_spec_embed"].abs().max() > 0  # the token has a gradient to get right
    check(losses, params, feats, mask, y)


def test_a_parameter_written_into_a_constant_table_is_refused_with_the_way_out():
    """A table made in loss_fn with no batch axis: refused, naming the parameter and the
    out-of-place form, which runs on the fast path and matches the loop."""
    torch.manual_seed(0)
    params = {"tok": torch.randn(D), "W": torch.randn(D, 3)}
    x = torch.randn(3, 7, D)

    def in_place(p, xb):
        table = torch.zeros(7, D)
        table[2] = p["tok"]
        return ((xb + table) @ p["W"]).sum((1, 2))

    with pytest.raises(ValueError, match=r"`tok` is written by `Tensor.__setitem__`.*index_put"):
        fp.per_sample_grads(in_place, method="hooks")(params, x)

    def out_of_place(p, xb):
        table = torch.zeros(7, D).index_put((torch.tensor([2]),), p["tok"])
        return ((xb + table) @ p["W"]).sum((1, 2))

    check(out_of_place, params, x)


def test_a_value_that_does_not_broadcast_is_refused():
    params = {"tok": torch.randn(3)}
    x = torch.randn(2, 5, D)

    def losses(p, xb):
        h = xb.clone() * 1.0
        h[:, 0] = p["tok"]
        return h.sum((1, 2))

    with pytest.raises(ValueError, match=r"of shape \(3,\) is written by .* does not broadcast"):
        fp.per_sample_grads(losses, method="hooks")(params, x)
