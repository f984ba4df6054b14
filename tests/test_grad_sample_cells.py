"""NOTE [recurrent cells]: ``nn.LSTMCell``, ``nn.GRUCell`` and ``nn.RNNCell`` stepped in a
Python loop, every method against a per-example autograd loop in float64 (1e-10); before
these rules the default method fell back to ``vmap``."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import settings
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import params_of
from test_grad_sample_broadcast import check
from torch import nn

import functorch_pipeline as fp

CELLS = {"lstm": lambda i, h, b: nn.LSTMCell(i, h, bias=b), "gru": lambda i, h, b: nn.GRUCell(i, h, bias=b),
         "tanh": lambda i, h, b: nn.RNNCell(i, h, bias=b),
         "relu": lambda i, h, b: nn.RNNCell(i, h, bias=b, nonlinearity="relu")}


class Decoder(nn.Module):
    """A cell stepped over a sequence, from zeros or from a given state, then a head."""

    def __init__(self, kind: str, features: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.kind = kind
        self.cell = CELLS[kind](features, hidden, bias)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        state = None if h0 is None else ((h0, torch.tanh(h0)) if self.kind == "lstm" else h0)
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        h = state[0] if self.kind == "lstm" else state
        return self.head(h)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(sorted(CELLS)), batch=st.integers(1, 5),
       steps=st.integers(1, 4), hidden=st.integers(1, 5), bias=st.booleans(), given_state=st.booleans())
def test_cells_in_a_loop_match_the_loop(seed, kind, batch, steps, hidden, bias, given_state):
    torch.manual_seed(seed)
    model = Decoder(kind, 3, hidden, bias)
    params = params_of(model)
    x, y = torch.randn(batch, steps, 3), torch.randint(0, 3, (batch,))
    h0 = torch.randn(batch, hidden) if given_state else None

    def losses(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (x, None if h0 is None else h0[:x.shape[0]])),
                               y, reduction="none")

    if h0 is None:
        check(losses, params, x, y)  # hooks, auto, ghost: no fall-back, the loop's numbers
    else:  # the state is a batch argument too
        def with_state(p, x, h, y):
            return F.cross_entropy(torch.func.functional_call(model, p, (x, h)), y, reduction="none")

        check(with_state, params, x, h0, y)


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_cells_give_the_fused_kernels_outputs(kind):
    """The rule's forward (two Linears and the gate equations) equals the fused kernel's."""
    torch.manual_seed(0)
    model = Decoder(kind, 3, 4, True)
    params = params_of(model)
    x = torch.randn(5, 3, 3)
    want = F.cross_entropy(model(x, None), torch.zeros(5, dtype=torch.long), reduction="none")
    got, _ = fp.per_sample_value_and_grad(
        lambda p, x: F.cross_entropy(torch.func.functional_call(model, p, (x, None)),
                                     torch.zeros(x.shape[0], dtype=torch.long), reduction="none"),
        method="hooks")(params, x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


def test_an_unbatched_cell_input_is_refused_by_name():
    """A cell fed one example's 1-d vector at a time sees no examples' axis."""
    torch.manual_seed(0)
    cell = nn.GRUCell(3, 2)
    params = params_of(cell)

    def losses(p, x):
        return torch.stack([torch.func.functional_call(cell, p, (row,)).sum() for row in x])

    with pytest.raises(ValueError, match=r"`weight_ih`.*F.linear"):
        fp.per_sample_grads(losses, method="hooks")(params, torch.randn(4, 3))


@pytest.mark.parametrize("kind", sorted(CELLS))
def test_vmap_names_the_cell_and_the_method_that_handles_it(kind):
    """torch.func cannot batch the cells' fused kernels (each example a batch of one); the
    error says which method can."""
    torch.manual_seed(0)
    model = Decoder(kind, 3, 2, True)

    def losses(p, x):
        return torch.func.functional_call(model, p, (x, None)).sum(1)

    with pytest.raises(RuntimeError, match=r"built-in nn\.\w+Cell failed under vmap.*method='hooks'"):
        fp.per_sample_grads(losses, method="vmap")(params_of(model), torch.randn(4, 2, 3))


def test_a_cell_kernel_called_with_keywords_is_refused_by_name():
    torch.manual_seed(0)
    params = {"w_ih": torch.randn(6, 3), "w_hh": torch.randn(6, 2)}

    def losses(p, x):
        return torch.gru_cell(x, torch.zeros(x.shape[0], 2), w_ih=p["w_ih"], w_hh=p["w_hh"]).sum(1)

    x = torch.randn(4, 3)
    torch.gru_cell(x, torch.zeros(4, 2), w_ih=params["w_ih"], w_hh=params["w_hh"])  # torch takes it
    with pytest.raises(ValueError, match="keyword arguments"):
        fp.per_sample_grads(losses, method="hooks")(params, x)
