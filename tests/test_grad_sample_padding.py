"""NOTE [padding an ambiguous batch]: sequences as long as the batch (``T == B``) run on
the hooks and ghost engines, padded, with the numbers of a per-example autograd loop."""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads
from per_example_reference import params_of
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline.transforms._grad_sample._padding import pad_batch

TOL = 1e-10
VOCAB, WIDTH, CLASSES = 11, 6, 3


class Text(nn.Module):
    """Token ids ``(B, T)`` -> embedding -> an encoder -> mean over positions -> classes."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(VOCAB, WIDTH, padding_idx=0)
        if kind == "lstm":
            self.enc = fp.nn.LSTM(WIDTH, WIDTH, batch_first=True)
        elif kind == "gru":
            self.enc = fp.nn.GRU(WIDTH, WIDTH, batch_first=True)
        else:
            self.enc = nn.TransformerEncoderLayer(WIDTH, 2, 2 * WIDTH, dropout=0.0,
                                                  batch_first=kind == "transformer")
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.kind == "transformer (T, B, E)":
            h = self.enc(self.emb(ids.transpose(0, 1))).mean(0)
        elif self.kind == "transformer":
            h = self.enc(self.emb(ids)).mean(1)
        else:
            h = self.enc(self.emb(ids))[0].mean(1)
        return self.head(h)


KINDS = ["lstm", "gru", "transformer", "transformer (T, B, E)"]


def losses_of(model: nn.Module):
    def losses(p, ids, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (ids,)), y, reduction="none")
    return losses


def clipped_reference(per: dict, max_norm: float) -> tuple[torch.Tensor, dict]:
    norms = sum(g.flatten(1).pow(2).sum(1) for g in per.values()).sqrt()
    factor = (max_norm / norms).clamp(max=1.0)
    return norms, {k: (g * factor.reshape(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in per.items()}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=TOL * max(1.0, float(b.abs().max())),
                                                      rtol=0))


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(KINDS), batch=st.integers(1, 5), length=st.integers(1, 5))
@example(kind="lstm", batch=4, length=4)
@example(kind="transformer", batch=3, length=3)
@example(kind="transformer (T, B, E)", batch=2, length=2)
def test_every_engine_matches_the_loop_at_any_length(kind, batch, length):
    """hooks' per-example gradients, ghost's norms and clipped sum, against the loop, for
    lengths equal to the batch (padded) and not (not padded); no method falls back."""
    torch.manual_seed(batch * 10 + length)
    model = Text(kind)
    params = params_of(model)
    ids = torch.randint(0, VOCAB, (batch, length))
    y = torch.randint(0, CLASSES, (batch,))
    losses = losses_of(model)
    per = loop_grads(losses, params, ids, y)
    norms, _ = clipped_reference(per, 1.0)
    max_norm = float(norms.median())
    norms, clipped = clipped_reference(per, max_norm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto must not fall back
        for method in ("hooks", "auto"):
            got = fp.per_sample_grads(losses, method=method)(params, ids, y)
            assert all(close(got[k], per[k]) for k in per), (method, kind)
        for method in ("ghost", "hooks", "auto"):
            total, n = fp.clipped_grad(losses, max_norm, method=method)(params, ids, y)
            assert close(n, norms), method
            assert all(close(total[k], clipped[k]) for k in per), (method, kind)
            assert close(fp.per_sample_grad_norms(losses, method=method)(params, ids, y), norms)


def test_the_padding_is_remembered_per_loss_fn_and_shapes():
    """The first call meets the ambiguous op and runs again padded; later calls with the
    same shapes run padded at once (one forward), other shapes decide afresh."""
    torch.manual_seed(0)
    model = Text("lstm")
    params = params_of(model)
    inner = losses_of(model)
    calls = []

    def losses(p, ids, y):
        calls.append(ids.shape[0])
        return inner(p, ids, y)

    grads = fp.per_sample_grads(losses, method="hooks")
    ids, y = torch.randint(0, VOCAB, (4, 4)), torch.randint(0, CLASSES, (4,))
    first = grads(params, ids, y)
    assert calls == [4, 5]
    again = grads(params, ids, y)
    assert calls == [4, 5, 5]
    assert all(torch.equal(first[k], again[k]) for k in first)
    grads(params, torch.randint(0, VOCAB, (4, 3)), y)  # not ambiguous: no padding
    assert calls == [4, 5, 5, 4]


def test_chunks_are_padded_each_and_match_the_loop():
    """``chunk_size`` equal to the length makes every chunk ambiguous, the last one (of
    another size) not: each is padded as it needs."""
    torch.manual_seed(1)
    model = Text("transformer")
    params = params_of(model)
    ids, y = torch.randint(0, VOCAB, (7, 3)), torch.randint(0, CLASSES, (7,))
    losses = losses_of(model)
    per = loop_grads(losses, params, ids, y)
    got = fp.per_sample_grads(losses, method="hooks", chunk_size=3)(params, ids, y)
    assert all(close(got[k], per[k]) for k in per)
    norms, clipped = clipped_reference(per, 0.5)
    total, n = fp.clipped_grad(losses, 0.5, method="ghost", chunk_size=3)(params, ids, y)
    assert close(n, norms)
    assert all(close(total[k], clipped[k]) for k in per)


def test_aux_is_not_padded():
    """With ``has_aux`` the engines return ``aux`` for the whole batch, which padding rows
    would enter: hooks keeps the ambiguity error."""
    torch.manual_seed(2)
    model = Text("lstm")
    losses = losses_of(model)

    def with_aux(p, ids, y):
        out = losses(p, ids, y)
        return out, out.detach().sum()

    ids, y = torch.randint(0, VOCAB, (3, 3)), torch.randint(0, CLASSES, (3,))
    with pytest.raises(ValueError, match="several axes have the batch size 3"):
        fp.clipped_value_and_grad(with_aux, 1.0, has_aux=True, method="ghost")(params_of(model), ids, y)


def test_a_refusal_past_the_ambiguous_op_names_both():
    """Padded, the forward gets past the ambiguous embedding and meets a parameter used
    with no rule (``torch.linalg.matmul``): the error says both, at the caller's batch size."""
    torch.manual_seed(3)
    emb = nn.Embedding(VOCAB, 4)
    w = torch.randn(4, 2)
    params = {"emb": emb.weight.detach(), "w": w}

    def losses(p, ids):
        return torch.linalg.matmul(F.embedding(ids, p["emb"]).mean(1), p["w"]).pow(2).sum(1)

    ids = torch.randint(0, VOCAB, (3, 3))
    with pytest.raises(ValueError) as info:
        fp.per_sample_grads(losses, method="hooks")(params, ids)
    message = str(info.value)
    assert "several axes have the batch size 3" in message
    assert "padded to 4 examples" in message and "`w`" in message
    with pytest.warns(UserWarning, match="padded to 4 examples"):
        got = fp.per_sample_grads(losses)(params, ids)
    want = loop_grads(losses, params, ids)
    assert all(close(got[k], want[k]) for k in want)


def test_dp_trainer_step_on_a_square_batch_is_the_loop_clipped_mean():
    """A DP step (no noise, SGD) on a batch of 4 sequences of length 4 takes ghost
    clipping and equals the loop's clipped sum over the expected batch size."""
    torch.manual_seed(4)
    model = Text("transformer")
    params = params_of(model)
    losses = losses_of(model)

    def loss_fn(p, batch):
        return losses(p, *batch)

    ids, y = torch.randint(0, VOCAB, (4, 4)), torch.randint(0, CLASSES, (4,))
    trainer = fp.train.DPTrainer(loss_fn, fp.optim.sgd(1.0), l2_norm_clip=0.5, noise_multiplier=0.0,
                                 sample_rate=0.1, expected_batch_size=4.0)
    state = trainer.init(params, fp.random.key(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ghost, no fall-back
        state, _ = trainer.step(state, (ids, y))
    _, clipped = clipped_reference(loop_grads(losses, params, ids, y), 0.5)
    for k in params:
        assert close(params[k] - state.params[k], clipped[k] / 4.0), k


def test_pad_batch_appends_copies_of_the_first_example_to_batched_leaves_only():
    table = torch.randn(3, 2)
    batch = {"ids": torch.tensor([[1, 2], [3, 4]]), "mask": torch.tensor([True, False]), "n": 7}
    out = pad_batch([table, batch], (1,), 2)
    assert out[0] is table
    assert torch.equal(out[1]["ids"], torch.tensor([[1, 2], [3, 4], [1, 2], [1, 2]]))
    assert torch.equal(out[1]["mask"], torch.tensor([True, False, True, True]))
    assert out[1]["n"] == 7


def test_a_table_the_size_of_the_padded_batch_is_not_taken_for_examples():
    """The blind spot of NOTE [which axis is the batch] must not move with the padding: a
    fixed ``(B + 1, E)`` table through a Linear, in a model whose ``(B, B)`` ids are
    padded to ``B + 1``, has the padded size on axis 0 but no batch axis. Its rows past
    the examples do not repeat the first, so it is not read as examples: it was refused
    (auto fell back); at the next padded size it has no axis a multiple of the batch, so
    it is a constant (NOTE [constants or batch data]) and hooks returns the loop's
    gradients."""
    torch.manual_seed(5)
    emb, lin = nn.Embedding(VOCAB, 4), nn.Linear(4, 2)
    table = torch.randn(4, 4)  # the padded size of a batch of 3
    params = {"emb": emb.weight.detach(), "w": lin.weight.detach(), "b": lin.bias.detach()}

    def losses(p, ids):
        h = F.embedding(ids, p["emb"]).mean(1)[:, :2]  # ambiguous at B = 3: padded to 4
        shared = F.linear(table, p["w"], p["b"]).sum(0)  # (2,), the same for every example
        return (h + shared).pow(2).sum(1)

    ids = torch.randint(0, VOCAB, (3, 3))
    want = loop_grads(losses, params, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back
        for method in ("hooks", "auto"):
            got = fp.per_sample_grads(losses, method=method)(params, ids)
            assert all(close(got[k], want[k]) for k in want)


def test_padding_rows_a_few_ulps_off_still_repeat_the_first_example():
    """Batched kernels do not always round identical rows identically (a conv backbone
    under ``no_grad`` at batch sizes 2, 3 and 7 here), so features computed without a
    graph from the padded batch may differ from the first example by an ulp or two; they
    are still batch data (NOTE [constants or batch data] in ``_engine``). Emulated here by
    nudging each row by its index in float32 ulps."""
    torch.manual_seed(5)
    params = {"s": torch.rand(4, dtype=torch.float32) + 0.5,
              "w": torch.randn(4, 3, dtype=torch.float32)}
    x = torch.randn(4, 4, dtype=torch.float32)
    y = torch.randint(0, 3, (4,))
    eps = torch.finfo(torch.float32).eps

    def losses(p, x, y):
        with torch.no_grad():  # features of a frozen extractor, rows off by a few ulps
            f = x / 2
            f = f + f * eps * torch.arange(x.shape[0], dtype=f.dtype).unsqueeze(1)
        return F.cross_entropy((f * p["s"]) @ p["w"], y, reduction="none")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back to vmap
        got = fp.per_sample_grads(losses)(params, x, y)
    want = loop_grads(losses, params, x, y)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
