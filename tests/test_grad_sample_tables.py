"""NOTE [a table the size of the batch] and NOTE [the batch requires grad]: a constant
made inside ``loss_fn`` whose first axis has the batch size is not read as examples, and
tensors computed from the batch are, with the numbers of a per-example autograd loop."""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import numpy as np
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

TOL = 1e-10


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, atol=TOL, rtol=0)


def keys_table(k: int, d: int) -> torch.Tensor:
    """A fixed ``(k, d)`` table made inside ``loss_fn`` (sinusoids of the row index)."""
    return torch.sin(torch.arange(k, dtype=torch.float64)[:, None]
                     * torch.arange(1, d + 1, dtype=torch.float64))


class Keys(nn.Module):
    """Scores of each example against ``k`` fixed keys projected by a Linear."""

    def __init__(self, k: int, d: int) -> None:
        super().__init__()
        self.k, self.d = k, d
        self.query, self.key = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.key(keys_table(self.k, self.d))  # (k, d): no batch axis
        return (self.query(x) @ keys.T).logsumexp(1)


def clipped_reference(per: dict[str, torch.Tensor], max_norm: float):
    norms = torch.stack([g.flatten(1).square().sum(1) for g in per.values()]).sum(0).sqrt()
    scale = (max_norm / norms).clamp(max=1.0)
    return norms, {k: (g * scale.reshape(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in per.items()}


@settings(max_examples=10, deadline=None)
@given(batch=st.integers(1, 5), same=st.booleans(), d=st.integers(2, 4))
@example(batch=4, same=True, d=3)  # k == B: the rows were read as the examples (error 1.2)
def test_a_constant_table_as_long_as_the_batch_is_not_read_as_examples(batch, same, d):
    torch.manual_seed(batch * 8 + d)
    model = Keys(batch if same else batch + 2, d)
    params = params_of(model)

    def losses(p, x):
        return torch.func.functional_call(model, p, (x,))

    x = torch.randn(batch, d)
    want = loop_grads(losses, params, x)
    norms, clipped = clipped_reference(want, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back to vmap
        for method in ("hooks", "auto"):
            got = fp.per_sample_grads(losses, method=method)(params, x)
            assert all(close(got[k], want[k]) for k in want), method
        for method in ("ghost", "auto"):
            assert close(fp.per_sample_grad_norms(losses, method=method)(params, x), norms)
            total, n = fp.clipped_grad(losses, 0.5, method=method)(params, x)
            assert close(n, norms)
            assert all(close(total[k], clipped[k]) for k in want), method


class Templates(nn.Module):
    """Conv features of each image scored against those of ``k`` fixed template images."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.cos(torch.arange(self.k * 2 * 25, dtype=x.dtype)).reshape(self.k, 2, 5, 5)
        fx, ft = self.conv(x).flatten(1), self.conv(t).flatten(1)  # (B, 27), (k, 27)
        return (fx @ ft.T).tanh().sum(1)


@pytest.mark.parametrize("batch", [1, 3])
def test_constant_template_images_as_many_as_the_batch_through_a_conv(batch):
    """The same blind spot in a conv: ``k == B`` fixed images through the model's conv."""
    torch.manual_seed(batch)
    model = Templates(3)
    params = params_of(model)

    def losses(p, x):
        return torch.func.functional_call(model, p, (x,))

    x = torch.randn(batch, 2, 5, 5)
    want = loop_grads(losses, params, x)
    got = fp.per_sample_grads(losses, method="hooks")(params, x)
    assert all(close(got[k], want[k]) for k in want)


def test_later_calls_reuse_the_padded_run_s_answers_unpadded():
    """The first call is refused at the table and runs padded; a later call with the same
    shapes runs once, unpadded, with the padded run's answers; a new batch size asks
    again. Numbers are the loop's each time."""
    torch.manual_seed(0)
    model = Keys(4, 3)
    params = params_of(model)
    calls = []

    def losses(p, x):
        calls.append(x.shape[0])
        return torch.func.functional_call(model, p, (x,))

    grads = fp.per_sample_grads(losses, method="hooks")
    x = torch.randn(4, 3)
    want = loop_grads(losses, params, x)
    calls.clear()
    first = grads(params, x)
    assert calls == [4, 5]
    again = grads(params, x)
    assert calls == [4, 5, 4]
    for k in want:
        assert close(first[k], want[k]) and close(again[k], want[k])
    y = torch.randn(5, 3)
    grads(params, y)
    assert calls == [4, 5, 4, 5]  # the table has 4 rows, not 5: nothing to ask


def test_has_aux_takes_the_answers_from_a_padded_run_and_the_result_from_the_batch():
    """``has_aux`` is never padded: the padded run gives the answers only, and the result
    (with the whole batch's aux) comes from an unpadded run. Before, such a call read the
    table as examples."""
    torch.manual_seed(1)
    model = Keys(3, 2)
    params = params_of(model)

    def losses(p, x):
        out = torch.func.functional_call(model, p, (x,))
        return out, {"mean": out.mean()}

    x = torch.randn(3, 2)
    want = loop_grads(lambda p, x: losses(p, x)[0], params, x)
    for _ in range(2):  # the first call asks, the second reuses the answers
        got, aux = fp.per_sample_grads(losses, method="hooks", has_aux=True)(params, x)
        assert all(close(got[k], want[k]) for k in want)
        assert close(aux["mean"], losses(params, x)[0].mean())  # the batch's, not padded


def test_label_one_hots_through_a_linear_are_batch_data():
    """Float tensors made from integer batch data have no graph (ids cannot require
    grad): ``one_hot(y).float()`` through a Linear is told from a table by the padded run,
    and the numbers are the loop's."""
    torch.manual_seed(2)
    emb, lin = nn.Linear(4, 3), nn.Linear(3, 3)
    params = {"e.w": emb.weight.detach(), "l.w": lin.weight.detach(), "l.b": lin.bias.detach()}

    def losses(p, x, y):
        cond = F.linear(F.one_hot(y, 4).to(x.dtype), p["e.w"])  # (B, 3) label embedding
        return F.linear(x + cond, p["l.w"], p["l.b"]).pow(2).sum(1)

    x, y = torch.randn(4, 3), torch.tensor([0, 3, 1, 3])
    want = loop_grads(losses, params, x, y)
    for _ in range(2):
        got = fp.per_sample_grads(losses, method="hooks")(params, x, y)
        assert all(close(got[k], want[k]) for k in want)


def test_input_noise_and_dropout_on_the_batch_run_once_with_the_batch_s_draws():
    """NOTE [the batch requires grad]: noise added to the batch and dropout on it inside
    ``loss_fn`` have a graph, so the call runs once, unpadded, drawing what the batch
    gradient draws under the same seed: the per-example gradients sum to it."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Dropout(0.3), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)).train()
    params = params_of(model)
    calls = []

    def losses(p, x):
        calls.append(x.shape[0])
        x = x / 2 + 0.1 * torch.randn_like(x)
        return torch.func.functional_call(model, p, (x,)).squeeze(1)

    x = torch.randn(5, 5)
    torch.manual_seed(7)
    got = fp.per_sample_grads(losses, method="hooks")(params, x)
    assert calls == [5]
    torch.manual_seed(7)
    want = fp.grad(lambda p, x: losses(p, x).sum())(params, x)
    for k in want:
        torch.testing.assert_close(got[k].sum(0), want[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("change", ["in place", "requires_grad", "numpy"])
def test_a_loss_fn_that_changes_its_batch_s_autograd_flags_runs_with_the_batch_plain(change):
    """NOTE [the batch requires grad]: autograd refuses an in-place op on a batch argument
    that requires grad, setting ``requires_grad`` on a view of one (Hugging Face's
    wav2vec 2.0 feature encoder does, in training mode), and ``numpy()`` of one. Such a
    call runs again with the batch plain, remembered per ``loss_fn``; each raised before
    that retry existed (wav2vec 2.0 in training mode did)."""
    torch.manual_seed(4)
    m = nn.Linear(3, 2)
    params = params_of(m)
    calls = []

    def losses(p, x):
        calls.append(x.shape[0])
        if change == "in place":
            x.mul_(2)  # the caller's batch changes, as in eager PyTorch
        elif change == "numpy":
            x = x * float(np.asarray(x).dtype.itemsize) / 8  # numpy() of the batch
        else:
            x = x[:, None]
            x.requires_grad = True
            x = x[:, 0]
        return torch.func.functional_call(m, p, (x,)).pow(2).sum(1)

    def reference(p, x):
        return torch.func.functional_call(m, p, (2 * x if change == "in place" else x,)).pow(2).sum(1)

    x = torch.randn(4, 3)
    want = loop_grads(reference, params, x)
    for _ in range(2):
        calls.clear()
        got = fp.per_sample_grads(losses, method="hooks")(params, x.clone())
        assert all(close(got[k], want[k]) for k in want)
    assert calls == [4]  # the second call hands the batch plain at once


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_one_id_per_example_computed_in_loss_fn_is_read_as_examples(batch):
    """1-d ids made inside ``loss_fn`` were looked up as positions (no batch axis), so a
    class-conditional embedding of ``(y * 3 + 1) % 10`` was refused and ``auto`` fell back
    to ``vmap``; a padded run now shows they follow the batch. ``arange(B)`` positions of
    the same length stay positions (``pos``), so the per-example gradients are the
    loop's."""
    torch.manual_seed(batch)
    params = {"E": torch.randn(10, 3), "pos": torch.randn(batch, 3), "w": torch.randn(3)}

    def losses(p, x, y):
        ids = (y * 3 + 1) % 10
        positions = F.embedding(torch.arange(batch), p["pos"]).sum(0)  # as many as B
        return ((x * F.embedding(ids, p["E"]) + positions) @ p["w"]).tanh()

    x, y = torch.randn(batch, 3), torch.randint(0, 10, (batch,))
    want = loop_grads(losses, params, x, y)
    norms, clipped = clipped_reference(want, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back
        for _ in range(2):
            got = fp.per_sample_grads(losses)(params, x, y)
            assert all(close(got[k], want[k]) for k in want)
            total, n = fp.clipped_grad(losses, 0.5)(params, x, y)
            assert close(n, norms) and all(close(total[k], clipped[k]) for k in want)


def test_noise_from_a_user_generator_fed_to_a_layer_is_batch_data():
    """Noise drawn in ``loss_fn`` from the user's own ``torch.Generator`` and fed straight
    to a Linear has no graph (NOTE [a table the size of the batch]); the padded run that
    asks about it failed, its padding rows drawn anew and the global generators unmoved,
    and the call fell back to ``vmap``, which refuses random ops. The padded run is now
    repeated with the padding examples given the first example's draws; later calls run
    once, unpadded, drawing what the batch gradient draws from the same generator state,
    so the per-example gradients sum to it."""
    torch.manual_seed(6)
    gen = torch.Generator().manual_seed(0)
    lin, head = nn.Linear(3, 4), nn.Linear(4, 1)
    params = {"lin.w": lin.weight.detach(), "lin.b": lin.bias.detach(), "head.w": head.weight.detach()}
    calls = []

    def losses(p, x):
        calls.append(x.shape[0])
        z = torch.randn(x.shape[0], 3, generator=gen, dtype=x.dtype)  # a generator's draws
        h = torch.tanh(F.linear(z, p["lin.w"], p["lin.b"]) + x)
        return F.linear(h, p["head.w"]).squeeze(1)

    x = torch.randn(5, 4)
    grads = fp.per_sample_grads(losses, method="hooks")
    grads(params, x)  # the first call asks, padded
    state = gen.get_state()
    calls.clear()
    got = grads(params, x)
    assert calls == [5]
    gen.set_state(state)
    want = fp.grad(lambda p, x: losses(p, x).sum())(params, x)
    for k in want:
        torch.testing.assert_close(got[k].sum(0), want[k], rtol=1e-10, atol=1e-12)


def test_an_error_of_loss_fn_s_own_is_raised_from_the_plain_run():
    """The retry with the batch plain re-raises a ``RuntimeError`` that is ``loss_fn``'s
    own, unchanged, after running it twice."""
    calls = []

    def losses(p, x):
        calls.append(x.requires_grad)
        raise RuntimeError("the model's own error")

    with pytest.raises(RuntimeError, match="^the model's own error$"):
        fp.per_sample_grads(losses, method="hooks")({"w": torch.randn(2)}, torch.randn(3, 2))
    assert calls == [True, False]


class FrozenKeys(nn.Module):
    """:class:`Keys` with the table a frozen ``nn.Parameter`` of the module (it still
    requires grad: only ``query`` and ``key`` are differentiated)."""

    def __init__(self, k: int, d: int, seq_first: bool = False) -> None:
        super().__init__()
        self.query, self.key = nn.Linear(d, d), nn.Linear(d, d)
        self.table = nn.Parameter(keys_table(k, d)[None] if seq_first else keys_table(k, d))
        self.seq_first = seq_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self.key(self.table)  # (k, d), or (1, k, d) read as (T, B, d) if k == B
        return (self.query(x) @ keys.reshape(-1, keys.shape[-1]).T).logsumexp(1)


@pytest.mark.parametrize("seq_first", [False, True])
def test_a_frozen_parameter_table_as_long_as_the_batch_is_not_read_as_examples(seq_first):
    """A module's own ``nn.Parameter`` left out of the differentiated ones requires grad
    but has no graph: with ``k == B`` rows (or ``(1, k, d)`` with ``k == B``, which the
    Linear also takes sequence-first) it was read as examples, silently; it is now asked
    like any tensor made without a graph (NOTE [a table the size of the batch])."""
    torch.manual_seed(7)
    model = FrozenKeys(4, 3, seq_first)
    params = {k: v.detach() for k, v in model.named_parameters() if k != "table"}

    def losses(p, x):
        return torch.func.functional_call(model, p, (x,), strict=False)

    x = torch.randn(4, 3)
    want = loop_grads(losses, params, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back
        for _ in range(2):
            got = fp.per_sample_grads(losses)(params, x)
            assert all(close(got[k], want[k]) for k in want)
