"""Per-example gradients and clipping under ``torch.autocast`` (NOTE [autocast] in
``_grad_sample._api``): every method returns each parameter's own dtype (float32 here),
as autograd does, with the values of a per-example autograd loop under the same autocast
(exactly for hooks; to bfloat16 rounding where a method computes differently). Before,
hooks and ghost handed back bfloat16 gradients for float32 parameters, every clipped sum
was bfloat16, and ``DPTrainer.step`` under autocast failed in Adam's dtype check."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from per_example_reference import SmallConvNet
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline import optim

CLIP = 0.5


def _autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _setup():
    torch.manual_seed(0)
    model = SmallConvNet()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))

    def losses(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    return params, x, y, losses


def _loop(losses, params, x, y):
    """The reference: one torch.autograd.grad per example, under the same autocast."""
    rows = []
    for i in range(x.shape[0]):
        p = {k: v.clone().requires_grad_() for k, v in params.items()}
        with _autocast():
            loss = losses(p, x[i:i + 1], y[i:i + 1]).sum()
        rows.append(torch.autograd.grad(loss, list(p.values())))
    grads = {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(params)}
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    c = 1.0 / torch.clamp(norms / CLIP, min=1.0)
    clipped = {k: (g * c.view(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in grads.items()}
    return grads, norms, clipped


def _assert_near(got, want, rel):
    for k in want:
        assert got[k].dtype == want[k].dtype == torch.float32, k
        assert (got[k] - want[k]).abs().max() <= rel * want[k].abs().max(), k


@pytest.mark.parametrize("method, rel", [("hooks", 1e-6), ("auto", 1e-6), ("vmap", 3e-2)])
def test_per_sample_grads_keep_the_parameter_dtype(method, rel):
    params, x, y, losses = _setup()
    want, _, _ = _loop(losses, params, x, y)
    with _autocast():
        got = fp.per_sample_grads(losses, method=method)(params, x, y)
    _assert_near(got, want, rel)


@pytest.mark.parametrize("method, rel", [("hooks", 1e-5), ("ghost", 2e-2), ("auto", 2e-2),
                                         ("vmap", 3e-2)])
def test_clipped_grad_keeps_the_parameter_dtype(method, rel):
    params, x, y, losses = _setup()
    _, want_norms, want = _loop(losses, params, x, y)
    with _autocast(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, norms = fp.clipped_grad(losses, CLIP, method=method)(params, x, y)
    _assert_near(got, want, rel)
    assert norms.dtype == torch.float32
    torch.testing.assert_close(norms, want_norms, rtol=2e-2, atol=0)


def test_dp_trainer_step_under_autocast():
    """sigma = 0 and SGD(1): the step subtracts the clipped sum over the expected batch,
    in float32 (it raised Adam's dtype error before; SGD here, Adam below)."""
    params, x, y, losses = _setup()
    _, _, clipped = _loop(losses, params, x, y)

    def per_example(p, b):
        return losses(p, *b)

    sgd = fp.train.DPTrainer(per_example, optim.sgd(1.0), l2_norm_clip=CLIP, noise_multiplier=0.0,
                             sample_rate=0.1, expected_batch_size=6.0)
    with _autocast():
        new, _ = sgd.step(sgd.init(params, fp.random.key(0)), (x, y))
    _assert_near({k: params[k] - new.params[k] for k in params},
                 {k: clipped[k] / 6.0 for k in params}, 2e-2)
    adam = fp.train.DPTrainer(per_example, optim.adam(1e-3), l2_norm_clip=CLIP, noise_multiplier=1.0,
                              sample_rate=0.1, expected_batch_size=6.0)
    with _autocast():
        new, _ = adam.step(adam.init(params, fp.random.key(0)), (x, y))
    assert all(new.params[k].dtype == torch.float32 for k in params)


class Text(nn.Module):
    """Embedding, a recurrent or attention layer, LayerNorm, Linear: the layers whose
    rules multiply inputs and output gradients of different dtypes under autocast."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.emb = nn.Embedding(40, 8)
        if kind == "lstm":
            self.mix = fp.nn.LSTM(8, 8, batch_first=True)
        elif kind == "gru":
            self.mix = fp.nn.GRU(8, 8, batch_first=True)
        else:
            self.mix = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = self.emb(t)
        h = self.mix(h) if self.kind == "transformer" else self.mix(h)[0]
        return self.fc(self.norm(h).mean(1))


@pytest.mark.parametrize("kind", ["lstm", "gru", "transformer"])
def test_sequence_models_under_autocast(kind):
    """hooks, vmap and ghost on Embedding + LSTM/GRU/attention + LayerNorm + Linear: each
    raised a dtype error under autocast before (the linear rule's product with a float32
    input and a bfloat16 output gradient; fp.nn.GRU's lerp of mixed dtypes)."""
    torch.manual_seed(0)
    model = Text(kind)
    params = {k: v.detach() for k, v in model.named_parameters()}
    t, y = torch.randint(0, 40, (4, 5)), torch.randint(0, 3, (4,))

    def losses(p, t, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (t,)), y, reduction="none")

    want, want_norms, want_clipped = _loop(losses, params, t, y)
    for method in ("hooks", "vmap"):
        with _autocast():
            got = fp.per_sample_grads(losses, method=method)(params, t, y)
        _assert_near(got, want, 5e-2)
    for method in ("ghost", "hooks"):
        with _autocast():
            got, norms = fp.clipped_grad(losses, CLIP, method=method)(params, t, y)
        _assert_near(got, want_clipped, 5e-2)
        torch.testing.assert_close(norms, want_norms, rtol=5e-2, atol=0)


def test_a_three_channel_first_conv_under_autocast():
    """A first conv on float32 RGB data (3x3 with stride 2: the grouped backward-weights
    branch, not the forward trick of NOTE [first-layer kernels]) multiplies the float32
    input with a bfloat16 output gradient; the engine casts the input to the op's dtype
    first."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))

    def losses(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    want, _, want_clipped = _loop(losses, params, x, y)
    with _autocast():
        got = fp.per_sample_grads(losses, method="hooks")(params, x, y)
        clipped, _ = fp.clipped_grad(losses, CLIP, method="ghost")(params, x, y)
    _assert_near(got, want, 1e-6)
    _assert_near(clipped, want_clipped, 2e-2)


# -- NOTE [ghost sums under autocast] ----------------------------------------------------------


@pytest.mark.parametrize("method, rel", [("ghost", 2e-2), ("auto", 2e-2), ("hooks", 1e-5)])
def test_clipped_grad_with_autocast_inside_loss_fn(method, rel):
    # The weighted sum multiplied float32 clip factors by the bf16 parts saved under the
    # autocast inside loss_fn, outside it: "expected m1 and m2 to have the same dtype".
    params, x, y, losses = _setup()

    def inside(p, x, y):
        with _autocast():
            return losses(p, x, y)

    _, want_norms, want = _loop(losses, params, x, y)  # the same autocast, around
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, norms = fp.clipped_grad(inside, CLIP, method=method)(params, x, y)
    _assert_near(got, want, rel)
    torch.testing.assert_close(norms, want_norms, rtol=2e-2, atol=0)


def test_ghost_sum_of_a_float32_head_under_autocast_is_not_rounded_to_bf16():
    # A head run in float32 (autocast disabled inside loss_fn) under an outer autocast:
    # ghost's weighted sum ran under the outer autocast and was rounded to bf16 (2.7e-3
    # relative against the loop, against 1e-7 for hooks).
    torch.manual_seed(0)
    body, head = nn.Linear(6, 16), nn.Linear(16, 4)
    params = {"w": head.weight.detach(), "b": head.bias.detach()}
    x, y = torch.randn(64, 6), torch.randint(0, 4, (64,))

    def losses(p, x, y):
        h = torch.tanh(body(x))
        with torch.autocast("cpu", enabled=False):
            return F.cross_entropy(F.linear(h.float(), p["w"], p["b"]), y, reduction="none")

    _, want_norms, want = _loop(losses, params, x, y)
    for method in ("ghost", "auto"):
        with _autocast():
            got, norms = fp.clipped_grad(losses, CLIP, method=method)(params, x, y)
        _assert_near(got, want, 1e-5)
        torch.testing.assert_close(norms, want_norms, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", ["has_aux", "scalar loss", "method vmap"])
def test_vmap_failing_under_autocast_points_to_hooks(case):
    # torch.func.vmap cannot batch LayerNorm under bf16 autocast ("expected scalar type
    # BFloat16 but found Float", also in a plain vmap(grad)); every fall-back to vmap got
    # that error bare. It now says so and names what lets hooks run, which works here.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))

    def losses(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    fn, kw = {"has_aux": (lambda p, x, y: (losses(p, x, y), None), {"has_aux": True}),
              "scalar loss": (lambda p, x, y: losses(p, x, y).mean(), {}),
              "method vmap": (losses, {"method": "vmap"})}[case]
    with _autocast(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="vmap failed under torch.autocast.*method='hooks'"):
            fp.per_sample_grads(fn, **kw)(params, x, y)
        got = fp.per_sample_grads(losses, method="hooks")(params, x, y)
    _assert_near(got, _loop(losses, params, x, y)[0], 2e-2)
