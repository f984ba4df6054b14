"""Functional-style uses of parameters (NOTE [x @ w], NOTE [broadcast parameters]):
``x @ w``, ``w @ x``, ``x - p``, ``p - x`` and ``x / p``, each engine against a
per-example autograd loop in float64. Before these rules every one of them sent the
default method to ``vmap``."""

from __future__ import annotations

import random
import warnings

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import settings
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads
from test_grad_sample_broadcast import check
from test_grad_sample_broadcast import refused_then_loop

import functorch_pipeline as fp


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), lead=st.lists(st.integers(1, 4), max_size=2),
       din=st.integers(1, 5), dout=st.integers(1, 5), vector=st.booleans(),
       form=st.sampled_from(["operator", "torch.matmul", "method"]))
def test_x_at_w_matches_the_loop(seed, batch, lead, din, dout, vector, form):
    """``x @ w`` for ``x`` of shape ``(B, *lead, in)`` and ``w`` of shape ``(in, out)`` or
    ``(in,)``, as the operator, ``torch.matmul`` and ``Tensor.matmul``."""
    torch.manual_seed(seed)
    params = {"w": torch.randn(din) if vector else torch.randn(din, dout), "b": torch.randn(3)}
    x, y = torch.randn(batch, *lead, din), torch.randint(0, 3, (batch,))
    product = {"operator": lambda a, w: a @ w, "torch.matmul": torch.matmul,
               "method": lambda a, w: a.matmul(w)}[form]

    def losses(p, x, y):
        h = torch.tanh(product(x, p["w"]))
        h = h.reshape(h.shape[0], -1).sum(1, keepdim=True)  # (B, 1)
        return ce(h.expand(-1, 3) * p["b"], y)

    check(losses, params, x, y)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), heads=st.integers(0, 2),
       din=st.integers(1, 5), cols=st.integers(1, 5), vector=st.booleans())
def test_w_at_x_matches_the_loop(seed, batch, heads, din, cols, vector):
    """``w @ x`` for ``x`` of shape ``(B, [h,] in, n)``: a Linear on each column."""
    torch.manual_seed(seed)
    params = {"w": torch.randn(din) if vector else torch.randn(4, din)}
    shape = (batch, heads, din, cols) if heads else (batch, din, cols)
    x, y = torch.randn(*shape), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        h = torch.tanh(p["w"] @ x)
        return ce(h.reshape(h.shape[0], -1)[:, :1].expand(-1, 3) * torch.arange(3.0), y)

    check(losses, params, x, y)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), din=st.integers(1, 5),
       vector=st.booleans())
def test_w_at_x_with_examples_as_columns_matches_the_loop(seed, batch, din, vector):
    """``W @ X`` in column-vector notation: ``X`` of shape ``(in, B)``, one example per
    column (a transposed batch, then an activation that requires grad)."""
    torch.manual_seed(seed)
    params = {"a": torch.randn(din, din), "w": torch.randn(din) if vector else torch.randn(3, din)}
    x, y = torch.randn(batch, din), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        h = torch.tanh(p["a"] @ x.T)  # (in, B): a transposed batch argument
        out = p["w"] @ h  # (3, B), or (B,) for a vector
        logits = out.T if out.dim() == 2 else out.unsqueeze(1) * torch.arange(3.0)
        return ce(logits, y)

    check(losses, params, x, y)


def test_a_jax_style_mlp_takes_the_fast_path():
    """``x @ W1 + b1`` ... as written for ``jax.numpy``, with a transposed weight too."""
    torch.manual_seed(0)
    params = {"w1": torch.randn(6, 8), "b1": torch.randn(8), "w2": torch.randn(3, 8),
              "b2": torch.randn(3)}
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))

    def losses(p, x, y):
        h = torch.relu(x @ p["w1"] + p["b1"])
        return ce(h @ p["w2"].T + p["b2"], y)

    check(losses, params, x, y)


def test_sequence_first_activations_take_x_at_w():
    """``(T, B, E)`` activations (they require grad, NOTE [sequence-first inputs]) times a
    weight, with the batch as long as the sequence padded (NOTE [padding an ambiguous
    batch])."""
    torch.manual_seed(0)
    for batch, seq in ((3, 5), (4, 4)):
        params = {"a": torch.randn(5, 5), "w": torch.randn(5, 2)}
        x, y = torch.randn(batch, seq, 5), torch.randint(0, 2, (batch,))

        def losses(p, x, y):
            h = torch.tanh(F.linear(x.transpose(0, 1), p["a"]))  # (T, B, E), requires grad
            return ce((h @ p["w"]).mean(0), y)

        check(losses, params, x, y)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), seq=st.integers(1, 4),
       form=st.sampled_from(["x - p", "p - x", "torch.sub alpha", "torch.rsub alpha",
                             "x / p", "x.div(p)", "x / scalar p", "x / p[:k]", "p / x",
                             "torch.div(p, x)"]))
def test_subtraction_and_division_match_the_loop(seed, batch, seq, form):
    """A learned centre and scale (``(x - mu) / s``), a temperature (``logits / t``)."""
    torch.manual_seed(seed)
    params = {"mu": torch.randn(4), "s": torch.rand(4) + 0.5, "t": torch.tensor(1.7),
              "w": torch.randn(3, 4)}
    x, y = torch.randn(batch, seq, 4), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        h = {"x - p": lambda: x - p["mu"], "p - x": lambda: p["mu"] - x,
             "torch.sub alpha": lambda: torch.sub(x, p["mu"], alpha=0.5),
             "torch.rsub alpha": lambda: torch.rsub(p["mu"], x, alpha=2.0),
             "x / p": lambda: x / p["s"], "x.div(p)": lambda: x.div(p["s"]),
             "p / x": lambda: p["s"] / (x.abs() + 0.5),
             "torch.div(p, x)": lambda: torch.div(p["mu"], x.abs() + 0.5),
             "x / scalar p": lambda: x / p["t"], "x / p[:k]": lambda: x / p["s"][:4]}[form]()
        return ce(F.linear(torch.tanh(h).mean(1), p["w"]) / p["t"], y)

    check(losses, params, x, y)


def test_products_the_rules_do_not_take_fall_back_with_a_reason():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    refused_then_loop(lambda p, x, y: ce(x.div(p["s"], rounding_mode="floor")[:, :2] * 1.0, y),
                      {"s": torch.rand(3) + 1}, x, y, match="arguments its rule does not take")
    refused_then_loop(lambda p, x, y: ce((x[:, None, None] @ p["w"]).sum((2, 3)), y),
                      {"w": torch.randn(2, 3, 2)}, x, y, match=r"of shape \(2, 3, 2\) is used by `x @ w`")


EINSUMS = {  # equation -> (x's shape after B, p's shape, is p the first operand)
    "btd,dh->bth": ((3, 5), (5, 2), False),
    "bi,oi->bo": ((5,), (2, 5), False),
    "dh,btd->bth": ((3, 5), (5, 2), True),
    "btd,dnh->btnh": ((3, 4), (4, 2, 2), False),
    "bhd,hd->bh": ((2, 5), (2, 5), False),
    "bi,ij": ((5,), (5, 3), False),
    "btd,d->tb": ((3, 5), (5,), False),
}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), eq=st.sampled_from(sorted(EINSUMS)),
       as_list=st.booleans())
def test_einsum_matches_the_loop(seed, batch, eq, as_list):
    """NOTE [einsum]: hooks, auto and ghost against the loop."""
    torch.manual_seed(seed)
    x_shape, p_shape, p_first = EINSUMS[eq]
    params, x = {"w": torch.randn(*p_shape)}, torch.randn(batch, *x_shape)
    out_idx = eq.split("->")[1] if "->" in eq else "bj"

    def losses(p, x):
        ops = (p["w"], x) if p_first else (x, p["w"])
        out = torch.einsum(eq, list(ops)) if as_list else torch.einsum(eq, *ops)
        return torch.tanh(out.movedim(out_idx.index("b"), 0)).reshape(x.shape[0], -1).sum(1)

    want = loop_grads(losses, params, x)
    for method in ("hooks", "auto"):
        got = fp.per_sample_grads(losses, method=method)(params, x)
        torch.testing.assert_close(got["w"], want["w"], rtol=0, atol=1e-10)
    for method in ("ghost", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # auto takes ghost, no fall-back
            norms = fp.per_sample_grad_norms(losses, method=method)(params, x)
        torch.testing.assert_close(norms, want["w"].reshape(batch, -1).norm(dim=1), rtol=0, atol=1e-10)


@pytest.mark.parametrize("eq, x_shape, p_shape, match", [
    ("...i,ij->j", (4, 3), (3, 2), "appears in the output"),
    ("bi,bi->b", (4, 3), (4, 3), "a parameter without that index"),
    ("bi,ij->j", (4, 3), (3, 2), "appears in the output"),
    ("bii,ij->bj", (4, 3, 3), (3, 2), "in a way its rule does not take"),
    ("bi,jk->bj", (4, 3), (2, 5), "in a way its rule does not take"),
])
def test_einsum_the_rule_does_not_take_falls_back(eq, x_shape, p_shape, match):
    torch.manual_seed(0)
    params, x = {"w": torch.randn(*p_shape)}, torch.randn(*x_shape)

    def losses(p, x):
        out = torch.einsum(eq, x, p["w"])
        return out.reshape(-1)[:4] if out.dim() == 1 else out.reshape(4, -1).sum(1)

    with pytest.raises(ValueError, match=match):
        fp.per_sample_grads(losses, method="hooks")(params, x)


def apply(kind: str, h: torch.Tensor, w: torch.Tensor, low: torch.Tensor | None = None,
          frozen: torch.Tensor | None = None) -> torch.Tensor:
    if kind == "lora":  # a frozen weight plus a low-rank update: NOTE [constants or batch data]
        return h @ (frozen + w @ low)
    if kind == "mask":
        return h @ (frozen * w)
    if kind == "x@w":
        return h @ w
    if kind == "x@w*2":
        return h @ (w * 2)
    if kind == "x@wT":
        return h @ w.T
    if kind == "x@w[:d]":
        return h @ w[:h.shape[-1]]
    if kind == "w@x":
        return (w @ h.transpose(-1, -2)).transpose(-1, -2)
    if kind == "einsum":
        return torch.einsum("btd,do->bto" if h.dim() == 3 else "bd,do->bo", h, w)
    if kind == "linear":
        return F.linear(h, w)
    return {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
            "rsub": lambda a, b: b - a}[kind](h, w)


def random_functional_model(r: random.Random):
    """A chain of functional-style uses of parameters on ``(B, D)`` or ``(B, T, D)`` inputs,
    sizes often equal to the batch's (the search that found the column form of ``w @ x``)."""
    B = r.randint(1, 5)
    T, D = r.choice([1, 2, 3, B]), r.choice([2, 3, 4, B])
    params, steps, frozen, d = {}, [], {}, D
    for i in range(r.randint(1, 4)):
        kind = r.choice(["x@w", "w@x", "einsum", "add", "sub", "rsub", "mul", "div", "linear",
                         "x@wT", "x@w*2", "x@w[:d]", "lora", "mask"])
        o = r.choice([2, 3, 4, B]) if kind not in ("add", "sub", "rsub", "mul", "div") else d
        shape = {"x@wT": (o, d), "w@x": (o, d), "linear": (o, d), "x@w[:d]": (d + 2, o)}.get(
            kind, (d, o) if o != d or kind not in ("add", "sub", "rsub", "mul", "div") else (d,))
        p = torch.randn(*shape) if r.random() < 0.8 or len(shape) > 1 else torch.randn(())
        params[f"p{i}"] = p.abs() + 0.5 if kind == "div" else p
        if kind in ("lora", "mask"):
            frozen[f"p{i}"] = torch.randn(d, o)
            params[f"p{i}"] = torch.randn(d, 2) if kind == "lora" else torch.rand(d, o)
            if kind == "lora":
                params[f"p{i}low"] = torch.randn(2, o)
        steps.append((kind, f"p{i}", r.choice([torch.tanh, torch.sin, None])))
        d = o
    params["head"] = torch.randn(3, d)

    def losses(p, x, y):
        h = x
        for kind, name, act in steps:
            h = apply(kind, h, p[name], p.get(name + "low"), frozen.get(name))
            h = h if act is None else act(h)
        return ce(F.linear(h.mean(1) if h.dim() == 3 else h, p["head"]), y)

    seq = r.random() < 0.6
    x = torch.randn(B, T, D) if seq else torch.randn(B, D)
    return losses, params, x, torch.randint(0, 3, (B,)), [s[0] for s in steps]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_functional_models_match_the_loop(seed):
    """Per-example gradients (hooks, auto), norms and clipped sums (auto) against the loop;
    no fall-back to vmap."""
    r = random.Random(seed)
    torch.manual_seed(seed)
    losses, params, x, y, kinds = random_functional_model(r)
    want = loop_grads(losses, params, x, y)
    scale = {k: max(1.0, float(v.abs().max())) for k, v in want.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fall-back to vmap warns
        for method in ("hooks", "auto"):
            got = fp.per_sample_grads(losses, method=method)(params, x, y)
            for k in want:
                assert float((got[k] - want[k]).abs().max()) <= 1e-10 * scale[k], (kinds, method, k)
    norms = torch.sqrt(sum(v.reshape(v.shape[0], -1).square().sum(1) for v in want.values()))
    max_norm = float(norms.median())
    factor = (max_norm / norms).clamp(max=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ghost -> hooks for einsum says so once
        total, got_norms = fp.clipped_grad(losses, max_norm)(params, x, y)
    assert float((got_norms - norms).abs().max()) <= 1e-10 * max(1.0, float(norms.max()))
    for k, v in want.items():
        clipped = (v * factor.reshape(-1, *[1] * (v.dim() - 1))).sum(0)
        assert float((total[k] - clipped).abs().max()) <= 1e-10 * max(1.0, float(clipped.abs().max())), (kinds, k)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 6), frozen_requires_grad=st.booleans(),
       form=st.sampled_from(["W + B @ A", "B @ A + W", "W * mask", "W - B @ A"]))
def test_parameters_combined_with_a_frozen_weight_match_the_loop(seed, batch, frozen_requires_grad,
                                                                 form):
    """NOTE [constants or batch data]: a LoRA update merged into a frozen
    weight, a learned mask on one. The frozen (6, 6) weight has an axis that is a
    multiple of the batch size for B in (1, 2, 3, 6): those batches run padded."""
    torch.manual_seed(seed)
    W = torch.randn(6, 6, requires_grad=frozen_requires_grad)  # a frozen nn.Parameter, or data
    params = {"A": torch.randn(2, 6), "B": torch.randn(6, 2) * 0.1, "mask": torch.rand(6, 6),
              "head": torch.randn(3, 6)}
    x, y = torch.randn(batch, 4, 6), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        weight = {"W + B @ A": lambda: W + p["B"] @ p["A"], "B @ A + W": lambda: p["B"] @ p["A"] + W,
                  "W * mask": lambda: W * p["mask"], "W - B @ A": lambda: W - p["B"] @ p["A"]}[form]()
        return ce(F.linear(torch.tanh(F.linear(x, weight)).mean(1), p["head"]), y)

    check(losses, params, x, y)


def test_a_rank_one_update_of_a_one_by_one_weight_at_a_batch_of_one():
    """Found by the random search: a (1, 1) frozen weight plus a (1, 1) update is a
    constant like any other, even where every axis has size 1 (so B = 1 runs padded);
    it was once taken for a batch of one and refused at the padded size."""
    torch.manual_seed(1)
    W = torch.randn(1, 1)
    params = {"A": torch.randn(2, 1), "B": torch.randn(1, 2), "head": torch.randn(3, 1)}

    def losses(p, x, y):
        return ce(F.linear(torch.tanh(F.linear(x, W + p["B"] @ p["A"])).mean(1), p["head"]), y)

    for batch in (1, 2, 3):
        check(losses, params, torch.randn(batch, 3, 1), torch.randint(0, 3, (batch,)))


def test_a_lora_parametrisation_takes_the_fast_path():
    """minLoRA's way: ``parametrize.register_parametrization(linear, "weight", LoRA)`` whose
    forward returns ``W + B @ A``, with only ``A`` and ``B`` differentiated."""
    from torch import nn
    from torch.nn.utils import parametrize

    class LoRA(nn.Module):
        def __init__(self, n: int, rank: int = 2) -> None:
            super().__init__()
            self.A = nn.Parameter(torch.randn(rank, n))
            self.B = nn.Parameter(torch.randn(n, rank) * 0.1)

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return weight + self.B @ self.A

    torch.manual_seed(0)
    layer = nn.Linear(6, 6)
    parametrize.register_parametrization(layer, "weight", LoRA(6))
    model = nn.Sequential(layer, nn.Tanh(), nn.Linear(6, 3))
    named = dict(model.named_parameters())
    train = {k: v.detach() for k, v in named.items() if ".weight.0." in k}
    frozen = {k: v for k, v in named.items() if k not in train}
    assert sorted(train) == ["0.parametrizations.weight.0.A", "0.parametrizations.weight.0.B"]
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))

    def losses(p, x, y):
        return ce(torch.func.functional_call(model, {**frozen, **p}, (x,)), y)

    check(losses, train, x, y)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), shape=st.sampled_from([(), (4,), (4, 3), (4, 2, 3)]),
       per_channel=st.booleans())
def test_prelu_matches_the_loop(seed, batch, shape, per_channel):
    """``nn.PReLU`` with one slope or one per channel (axis 1), on flat, sequence and
    image activations."""
    from torch import nn

    torch.manual_seed(seed)
    channels = shape[0] if shape and per_channel else 1
    act = nn.PReLU(channels, init=0.3)
    params = {"slope": act.weight.detach() + torch.randn(channels) * 0.1, "head": torch.randn(3, 1)}
    x, y = torch.randn(batch, *shape), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        h = torch.func.functional_call(act, {"weight": p["slope"]}, (x,))
        return ce(F.linear(h.reshape(h.shape[0], -1).sum(1, keepdim=True), p["head"]), y)

    check(losses, params, x, y)


@pytest.mark.parametrize("batch", [2, 3, 4, 5])
def test_an_orthogonal_parametrisation_at_a_batch_as_large_as_the_weight(batch):
    """NOTE [constants or batch data]: ``parametrizations.orthogonal`` multiplies a
    constant ``(4, 4)`` base by the parametrised matrix. At B = 4 the base's axis has the
    batch size; it was once taken for the batch, with wrong gradients (error 0.58)."""
    from torch import nn
    from torch.nn.utils import parametrizations

    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.orthogonal(nn.Linear(4, 4)), nn.Tanh(), nn.Linear(4, 3))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, y = torch.randn(batch, 4), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        return ce(torch.func.functional_call(model, p, (x,)), y)

    check(losses, params, x, y)


@pytest.mark.parametrize("form", ["W + b", "x / 2 @ w", "w.T @ (x / 2).T", "table @ w"])
def test_constants_and_copies_of_the_batch_shaped_like_the_batch(form):
    """A frozen ``(B, B)`` weight plus a learned vector is a constant (a derived weight);
    a copy of the batch made without a graph is batch data; a fixed table with as many
    rows as the batch, times a parameter, is a constant. Sizes alone cannot tell these
    apart, so the batch runs padded once (NOTE [constants or batch data])."""
    torch.manual_seed(1)
    batch = 4
    W, table = torch.randn(batch, batch), torch.randn(batch, 3)
    params = {"b": torch.randn(batch), "w": torch.randn(batch, 3), "u": torch.randn(3, 3)}
    x, y = torch.randn(batch, batch), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        if form == "W + b":
            h = F.linear(x, W + p["b"]) @ p["w"]
        elif form == "x / 2 @ w":
            h = (x / 2) @ p["w"]
        elif form == "w.T @ (x / 2).T":
            h = (p["w"].T @ (x / 2).T).T
        else:
            h = x @ p["w"] + (table @ p["u"]).sum(0)
        return ce(torch.tanh(h) @ p["u"], y)

    check(losses, params, x, y)


@pytest.mark.parametrize("batch", [3, 4])
def test_einsum_of_a_constant_and_a_parameter_is_a_derived_weight(batch):
    """``einsum("ij,jk->ik", base, w)`` with a fixed ``(4, 4)`` base, at B = 4 as well:
    the product has no batch axis (NOTE [constants or batch data])."""
    torch.manual_seed(2)
    base = torch.randn(4, 4)
    params = {"w": torch.randn(4, 3)}
    x, y = torch.randn(batch, 4), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        return ce(x @ torch.einsum("ij,jk->ik", base, p["w"]), y)

    want = loop_grads(losses, params, x, y)
    got = fp.per_sample_grads(losses, method="hooks")(params, x, y)
    torch.testing.assert_close(got["w"], want["w"], rtol=0, atol=1e-10)


@pytest.mark.parametrize("batch", [2, 3])
@pytest.mark.parametrize("form", ["P + v", "v - P", "P * s"])
def test_a_parameter_plus_a_smaller_constant_is_a_derived_weight(batch, form):
    """A frozen vector (or 0-d tensor) broadcast onto a parameter: the result has no batch
    axis (NOTE [constants or batch data]); it was refused as "no batched operand". At
    B = 3 the vector's length equals the batch size, so the batch runs padded."""
    torch.manual_seed(3)
    v, s = torch.randn(3), torch.tensor(1.5)
    params = {"P": torch.randn(3, 3), "head": torch.randn(3, 3)}
    x, y = torch.randn(batch, 3), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        weight = {"P + v": lambda: p["P"] + v, "v - P": lambda: v - p["P"], "P * s": lambda: p["P"] * s}[form]()
        return ce(F.linear(torch.tanh(F.linear(x, weight)), p["head"]), y)

    check(losses, params, x, y)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), seq=st.sampled_from([None, 1, 3]),
       bias=st.booleans(), same=st.booleans())
def test_bilinear_matches_the_loop(seed, batch, seq, bias, same):
    """``nn.Bilinear`` on two batched inputs (or one input twice), flat or per position."""
    from torch import nn

    torch.manual_seed(seed)
    layer = nn.Bilinear(3, 3 if same else 4, 2, bias=bias)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    lead = (batch,) if seq is None else (batch, seq)
    x1, x2 = torch.randn(*lead, 3), torch.randn(*lead, 4)

    def losses(p, x1, x2):
        out = torch.func.functional_call(layer, p, (x1, x1 if same else x2))
        return torch.tanh(out).reshape(out.shape[0], -1).pow(2).sum(1)

    want = loop_grads(losses, params, x1, x2)
    for method in ("hooks", "auto"):
        got = fp.per_sample_grads(losses, method=method)(params, x1, x2)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-10)
    want_norms = torch.sqrt(sum(v.reshape(batch, -1).square().sum(1) for v in want.values()))
    for method in ("ghost", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # auto takes ghost, no fall-back
            norms = fp.per_sample_grad_norms(losses, method=method)(params, x1, x2)
            total, _ = fp.clipped_grad(losses, float(want_norms.median()), method=method)(params, x1, x2)
        torch.testing.assert_close(norms, want_norms, rtol=0, atol=1e-10)
        factor = (float(want_norms.median()) / want_norms).clamp(max=1)
        for k, v in want.items():
            torch.testing.assert_close(total[k], (v * factor.reshape(-1, *[1] * (v.dim() - 1))).sum(0),
                                       rtol=0, atol=1e-10)


@pytest.mark.parametrize("eq, p_shape", [("bd,dh->bh", (4, 3)), ("btd,hd->bth", (3, 4)), ("bd,d->b", (4,))])
def test_an_einsum_that_is_a_linear_takes_the_linear_parts(eq, p_shape, monkeypatch):
    """NOTE [einsum]: no per-example gradient is formed for a Linear written as an einsum
    (the matmul and Linear rules' parts instead), and the numbers are the loop's."""
    from functorch_pipeline.transforms._grad_sample import _rules_matmul

    def formed(*a):
        raise AssertionError("per-example gradients formed for a Linear-shaped einsum")

    monkeypatch.setattr(_rules_matmul, "_finish_einsum", formed)
    torch.manual_seed(0)
    params = {"w": torch.randn(*p_shape)}
    x = torch.randn(5, 2, 4) if "t" in eq else torch.randn(5, 4)

    def losses(p, x):
        return torch.tanh(torch.einsum(eq, x, p["w"])).reshape(x.shape[0], -1).sum(1)

    want = loop_grads(losses, params, x)
    for method in ("hooks", "ghost"):
        if method == "hooks":
            got = fp.per_sample_grads(losses, method=method)(params, x)["w"]
            torch.testing.assert_close(got, want["w"], rtol=0, atol=1e-10)
        else:
            norms = fp.per_sample_grad_norms(losses, method=method)(params, x)
            torch.testing.assert_close(norms, want["w"].reshape(5, -1).norm(dim=1), rtol=0, atol=1e-10)


@pytest.mark.parametrize("form", ["w.T", "w.mT", "w.t()", "torch.t(w)"])
def test_x_at_a_transposed_weight_runs_as_a_linear(form, monkeypatch):
    """``x @ w.T`` (PyTorch's ``(out, in)`` layout) is ``F.linear(x, w)``: it takes the
    Linear rule's parts, with no derived weight to pull back (ghost clipping formed
    B x w through one before: ~100x slower), and the loop's numbers."""
    from functorch_pipeline.transforms._grad_sample import _engine

    def pulled(*a, **k):
        raise AssertionError("a derived weight was pulled back")

    monkeypatch.setattr(_engine, "_pull_back", pulled)
    torch.manual_seed(0)
    params = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    x, y = torch.randn(5, 2, 4), torch.randint(0, 3, (5,))
    transpose = {"w.T": lambda w: w.T, "w.mT": lambda w: w.mT, "w.t()": lambda w: w.t(),
                 "torch.t(w)": torch.t}[form]

    def losses(p, x, y):
        return ce((torch.tanh(x @ transpose(p["w"])) + p["b"]).mean(1), y)

    check(losses, params, x, y)


class HFConv1D(torch.nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2's projections): an ``(in, out)`` weight and a bias
    applied with ``torch.addmm`` to the tokens flattened into rows (NOTE [fused products])."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = torch.nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.shape[:-1], self.weight.shape[-1])


class GPT2Block(torch.nn.Module):
    """GPT-2's block in miniature: LayerNorm, causal attention with ``c_attn``/``c_proj``
    as ``Conv1D``, LayerNorm, an MLP of two ``Conv1D``."""

    def __init__(self, d: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.c_attn, self.c_proj = HFConv1D(3 * d, d), HFConv1D(d, d)
        self.c_fc, self.c_out = HFConv1D(2 * d, d), HFConv1D(d, 2 * d)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(self.ln1(x)).split(x.shape[-1], -1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
        x = x + self.c_proj(a)
        return x + self.c_out(F.gelu(self.c_fc(self.ln2(x))))


@pytest.mark.parametrize("batch, seq", [(1, 3), (2, 3), (3, 3), (4, 2)])  # (3, 3): T == B
def test_a_gpt2_block_of_addmm_projections_takes_the_fast_path(batch, seq):
    torch.manual_seed(batch * 10 + seq)
    block = GPT2Block()
    params = {k: v.detach() for k, v in block.named_parameters()}

    def losses(p, x):
        return torch.func.functional_call(block, p, (x,)).pow(2).sum((1, 2))

    check(losses, params, torch.randn(batch, seq, 4))


FUSED_FORMS = {
    "addmm alpha beta": lambda p, h: torch.addmm(p["b"], h, p["w"], beta=0.5, alpha=2.0),
    "Tensor.addmm": lambda p, h: p["b"].addmm(h, p["w"]),
    "addmm beta=0 ignores a NaN bias": lambda p, h: torch.addmm(torch.full((3,), float("nan")), h,
                                                                  p["w"], beta=0),
    "addmm frozen bias": lambda p, h: torch.addmm(torch.ones(3), h, p["w"]),
    "mm": lambda p, h: torch.mm(h, p["w"]) + p["b"],
    "Tensor.mm": lambda p, h: h.mm(p["w"]),
    "baddbmm of an expanded weight": lambda p, h: torch.baddbmm(
        p["b"], h[:, None], p["w"].expand(h.shape[0], -1, -1))[:, 0],
    "addmv columns": lambda p, h: torch.addmv(p["b"][:, None].expand(-1, 1)[:, 0], p["w"].T, h[0]) * 0
    + torch.mm(h, p["w"]),
}


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4), form=st.sampled_from(sorted(FUSED_FORMS)))
def test_fused_products_match_the_loop(seed, batch, form):
    """``addmm``, ``mm`` and ``baddbmm`` (with ``alpha``/``beta``, a frozen or ignored
    bias, the method forms) run as ``x @ w`` and ``+ b`` (NOTE [fused products])."""
    torch.manual_seed(seed)
    params = {"lin": torch.randn(4, 2), "w": torch.randn(4, 3), "b": torch.randn(3)}

    def losses(p, x):
        h = torch.tanh(F.linear(x, p["lin"]))
        return FUSED_FORMS[form](p, h).pow(2).sum(1)

    if form == "addmv columns":
        # addmv of a parameter and one example's row (h[0]) has no batch axis on that row:
        # refused by name, as `w @ x` of a batch row is.
        refused_then_loop(losses, params, torch.randn(batch, 2), match="w @ x")
        return
    check(losses, params, torch.randn(batch, 2))


def test_a_product_with_out_is_refused():
    """``out=`` is refused by name (autograd refuses it too, so no method runs it)."""
    torch.manual_seed(1)
    params = {"w": torch.randn(4, 3)}

    def losses(p, x):
        return torch.mm(x, p["w"], out=torch.empty(x.shape[0], 3)).pow(2).sum(1)

    with pytest.raises(ValueError, match="with `out=`"):
        fp.per_sample_grads(losses, method="hooks")(params, torch.randn(3, 4))


# -- NOTE [einsum of three or more operands], torch.tensordot -------------------------------

MANY_OPERANDS = {  # equation: operands, a name for a parameter, a shape for batch data
    "bi,ij,bj->b": ["x", "W", "y"],              # a quadratic form (bilinear in the data)
    "bi,ij,jk->bk": ["x", "W", "V"],             # two weights in one call
    "ij,bi,jk->bk": ["W", "x", "V"],             # a parameter first
    "bti,ij,btj->bt": ["s", "W", "s"],           # positions, the same data twice
    "bi,bj,ij->b": ["x", "z", "U"],              # the parameter last
    "bi,ij,jk": ["x", "W", "V"],                 # the implicit output
    "bi,ij,jk,bk->b": ["x", "W", "V", "z2"],     # four operands
}
_SHAPES = {"W": (3, 4), "V": (4, 2), "U": (3, 2), "x": (3,), "y": (4,), "z": (2,), "z2": (2,),
           "s": (5, 3)}


@pytest.mark.parametrize("eq", list(MANY_OPERANDS))
@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 5), seed=st.integers(0, 2 ** 16))
def test_einsum_of_three_or_more_operands_matches_the_loop(eq, batch, seed):
    names = MANY_OPERANDS[eq]
    shapes = {**_SHAPES, "W": (3, 3)} if eq == "bti,ij,btj->bt" else _SHAPES
    g = torch.Generator().manual_seed(seed)
    params = {n: torch.randn(*shapes[n], generator=g) for n in dict.fromkeys(names) if n.isupper()}
    data_names = list(dict.fromkeys(n for n in names if not n.isupper()))
    data = [torch.randn(batch, *shapes[n], generator=g) for n in data_names]

    def losses(p, *xs):
        found = dict(zip(data_names, xs, strict=True))
        out = torch.einsum(eq, *(p[n] if n.isupper() else found[n] for n in names))
        return out.reshape(out.shape[0], -1).pow(2).sum(1)

    check(losses, params, *data)


@pytest.mark.parametrize("dims, x_shape", [
    (1, (3,)), (([1], [0]), (3,)), ([[2], [0]], (5, 3)), (2, (2, 3)), (torch.tensor([[1], [0]]), (3,)),
])
def test_tensordot_runs_as_its_einsum(dims, x_shape):
    g = torch.Generator().manual_seed(4)
    w_shape = (2, 3, 4) if isinstance(dims, int) and dims == 2 else (3, 4)
    params = {"W": torch.randn(*w_shape, generator=g)}
    x = torch.randn(4, *x_shape, generator=g)

    def losses(p, xb):
        return torch.tensordot(xb, p["W"], dims=dims).reshape(xb.shape[0], -1).pow(2).sum(1)

    check(losses, params, x)


ELLIPSES = {  # NOTE [einsum ellipsis]: equation -> operands (a name for a parameter, else data)
    "...i,ij->...j": ["x", "W"],          # a projection of any leading axes
    "...i,ij": ["x", "W"],                # the implicit output: the ellipsis, then j
    "ij,...j->...i": ["V", "x"],          # the parameter first (a Linear in (out, in) layout)
    "b...i,ij->b...j": ["x", "W"],        # a named examples' index, the ellipsis after it
    "...i,...ij->...j": ["x", "T"],       # a parameter with an ellipsis of its own (per position)
    "...i,ijk->...kj": ["x", "R"],        # not a Linear: formed per example ("direct")
    "...i,ij,...j->...": ["x", "W", "x"], # three operands: a quadratic form
    "b...,...->b": ["x", "w"],            # the whole of x's features under the ellipsis
}


@pytest.mark.parametrize("eq", list(ELLIPSES))
@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 5), seq=st.integers(0, 3), seed=st.integers(0, 2 ** 16))
def test_einsum_with_an_ellipsis_matches_the_loop(eq, batch, seq, seed):
    """Hooks, auto and ghost take an ellipsis, written out as letters (NOTE [einsum ellipsis]),
    on ``(B, i)`` inputs (seq 0) and ``(B, T, i)`` ones, against the loop."""
    names = ELLIPSES[eq]
    g = torch.Generator().manual_seed(seed)
    lead = (seq,) if seq else ()
    x = torch.randn(batch, *lead, 3, generator=g)
    shapes = {"W": (3, 3), "V": (2, 3), "T": (*lead, 3, 2), "R": (3, 2, 4), "w": (*lead, 3)}
    params = {n: torch.randn(*shapes[n], generator=g) for n in dict.fromkeys(names) if n != "x"}

    def losses(p, xb):
        out = torch.einsum(eq, *(xb if n == "x" else p[n] for n in names))
        return torch.tanh(out).reshape(xb.shape[0], -1).sum(1)

    check(losses, params, x)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_an_ellipsis_written_out_is_the_same_einsum(data):
    """The written-out equation gives torch's own result for the ellipsis one, implicit
    outputs and ellipses of different widths included (an independent check of the
    alignment and the output order torch uses)."""
    from functorch_pipeline.transforms._grad_sample._rules_matmul import _written_out

    named = data.draw(st.lists(st.sampled_from("ijkb"), min_size=0, max_size=2, unique=True))
    widths = data.draw(st.lists(st.integers(0, 2), min_size=2, max_size=3))
    spots = data.draw(st.lists(st.sampled_from(["front", "back"]), min_size=len(widths),
                               max_size=len(widths)))
    sizes = {"i": 2, "j": 3, "k": 4, "b": 5}
    lead = data.draw(st.lists(st.integers(2, 3), min_size=max(widths), max_size=max(widths)))
    terms, operands = [], []
    for w, spot in zip(widths, spots, strict=True):
        mine = data.draw(st.lists(st.sampled_from(named), unique=True)) if named else []
        ell = lead[len(lead) - w:]
        names = "".join(mine)
        terms.append("..." + names if spot == "front" else names + "...")
        shape = ([*ell] + [sizes[c] for c in mine]) if spot == "front" else ([sizes[c] for c in mine] + [*ell])
        operands.append(torch.randn(shape, dtype=torch.float64))
    explicit = data.draw(st.booleans())
    eq = ",".join(terms) + ("->..." if explicit else "")
    written = _written_out(None, eq, tuple(operands))
    assert "." not in written
    torch.testing.assert_close(torch.einsum(written, *operands), torch.einsum(eq, *operands),
                               rtol=1e-12, atol=1e-12)


def test_an_einsum_that_broadcasts_a_parameter_axis_is_refused_then_falls_back():
    """einsum broadcasts an index of size 1 (here the parameter's ``i`` against x's 4); the
    gradient is a sum over that axis, which the rule does not form. Before, the Linear
    shortcut ran it as a matmul that raised inside torch."""
    torch.manual_seed(0)
    params, x = {"W": torch.randn(1, 3)}, torch.randn(5, 4)

    def losses(p, xb):
        return torch.einsum("bi,ij->bj", xb, p["W"]).pow(2).sum(1)

    refused_then_loop(losses, params, x, match="broadcasts its index 'i'")


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2 ** 16), batch=st.integers(1, 4), op=st.sampled_from(["+", "-", "r-", "*", "/", "r/"]),
       form=st.sampled_from(["prototypes (B, T, 1, D) vs (M, D)", "(B, 1, D) vs (M, D)",
                             "(B, C, 1, 1) vs (C, H, W)"]))
def test_a_parameter_and_a_batched_operand_broadcast_against_each_other(seed, batch, op, form):
    """NOTE [broadcast parameters]: ``x`` broadcast too (size 1 where ``p`` has ``n``), the
    result larger than ``x``: the distances to learned prototypes, an RBF layer. Fell back
    to ``vmap`` before."""
    g = torch.Generator().manual_seed(seed)
    if form.startswith("prototypes"):
        x, p = torch.randn(batch, 3, 1, 4, generator=g), torch.randn(5, 4, generator=g)
    elif form.startswith("(B, 1, D)"):
        x, p = torch.randn(batch, 1, 4, generator=g), torch.randn(5, 4, generator=g)
    else:
        x, p = torch.randn(batch, 2, 1, 1, generator=g), torch.randn(2, 3, 3, generator=g)
    params = {"p": p.abs() + 0.5 if op.endswith("/") else p}
    x = x.abs() + 0.5 if op == "r/" else x
    apply = {"+": lambda a, w: a + w, "-": lambda a, w: a - w, "r-": lambda a, w: w - a,
             "*": lambda a, w: a * w, "/": lambda a, w: a / w, "r/": lambda a, w: w / a}[op]

    def losses(q, xb):
        return torch.tanh(apply(xb, q["p"])).pow(2).reshape(xb.shape[0], -1).sum(1)

    check(losses, params, x)


@pytest.mark.parametrize("form", ["x @ w[None]", "matmul(x, w.unsqueeze(0))", "w[None] @ x",
                                  "baddbmm(b.expand, x, w.expand)", "b.expand(B, T, O) + h"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_weight_with_leading_axes_of_size_one_and_a_bias_expanded_over_new_axes(form, batch):
    """``x @ w[None]`` is the matrix broadcast (NOTE [x @ w]); a bias ``(O,)`` expanded to
    ``(B, T, O)`` has new leading axes, the first over the examples (NOTE [broadcast
    parameters]). Both fell back to ``vmap`` before."""
    g = torch.Generator().manual_seed(batch)
    params = {"w": torch.randn(4, 2, generator=g), "b": torch.randn(2, generator=g)}
    x = torch.randn(batch, 3, 4, generator=g)

    def losses(p, xb):
        B = xb.shape[0]
        if form == "x @ w[None]":
            out = xb @ p["w"][None]
        elif form == "matmul(x, w.unsqueeze(0))":
            out = torch.matmul(xb, p["w"].unsqueeze(0))
        elif form == "w[None] @ x":
            out = (p["w"].T[None] @ xb.transpose(1, 2)).transpose(1, 2)
        elif form == "baddbmm(b.expand, x, w.expand)":
            out = torch.baddbmm(p["b"].expand(B, 3, 2), xb, p["w"].expand(B, -1, -1))
        else:
            out = p["b"].expand(B, 3, 2) + xb[..., :2]
        return torch.tanh(out).pow(2).reshape(B, -1).sum(1)

    check(losses, params, x)


@pytest.mark.parametrize("batch", [2, 3])
def test_many_expands_over_the_batch_are_decided_in_one_padded_run(batch):
    """Six layers, each a ``baddbmm`` of a bias and a weight expanded over the batch: twelve
    expands that only runs of two batch sizes prove (NOTE [padding an ambiguous batch]).
    A padded run used to decide one expand, and at most four were tried, so this fell back
    to ``vmap``; now the first call runs three times (the caller's batch, then two padded
    sizes) and later calls once."""
    g = torch.Generator().manual_seed(batch)
    layers, T, D = 6, 3, 3
    params = {f"w{i}": torch.randn(D, D, generator=g) * 0.5 for i in range(layers)}
    params.update({f"b{i}": torch.randn(D, generator=g) for i in range(layers)})
    x = torch.randn(batch, T, D, generator=g)
    sizes = []

    def losses(p, xb):
        B = xb.shape[0]
        sizes.append(B)
        h = xb
        for i in range(layers):
            h = torch.tanh(torch.baddbmm(p[f"b{i}"].expand(B, T, D), h, p[f"w{i}"].expand(B, -1, -1)))
        return h.pow(2).sum((1, 2))

    check(losses, params, x)
    sizes.clear()
    fp.per_sample_grads(losses, method="hooks")(params, x)
    assert sizes == [batch + 2]  # remembered: one padded run
    fresh = fp.per_sample_grads(lambda p, xb: losses(p, xb), method="hooks")
    sizes.clear()
    fresh(params, x)
    assert sizes == [batch, batch + 1, batch + 2]
