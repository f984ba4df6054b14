"""NOTE [derived parameters] with constants: an op with no rule that combines parameters
with tensors that are not batch data (a buffer of indices, a fixed mask) makes a derived
tensor, pulled back once it meets the batch; Swin's relative position bias
(``table[index]``) with its windows merged into axis 0 (NOTE [examples merged into
axis 0]). Every engine against a per-example autograd loop in float64."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import params_of
from test_grad_sample_broadcast import check
from test_grad_sample_broadcast import close
from test_grad_sample_broadcast import refused_then_loop

import functorch_pipeline as fp

torchvision = pytest.importorskip("torchvision")


def _bias_attention(p: dict, x: torch.Tensor, index: torch.Tensor, form: str) -> torch.Tensor:
    """Attention logits of ``x`` ``(B, T, D)`` plus a learned bias looked up from a table
    by a constant index (Swin's relative position bias), or a table masked by a constant
    mask; the per-example losses of the attended values."""
    B, T, D = x.shape
    q = F.linear(x, p["q"])
    logits = q @ x.transpose(1, 2) / D ** 0.5  # (B, T, T)
    if form == "getitem":
        bias = p["table"][index].view(T, T)
    elif form == "index_select":
        bias = p["table"].index_select(0, index).view(T, T)
    else:  # "where": a fixed causal mask over a learned (T, T) bias
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        bias = torch.where(mask, p["table"][: T * T].view(T, T), -5.0)
    h = torch.softmax(logits + bias, -1) @ x
    return F.linear(h, p["out"]).pow(2).sum((1, 2))


@settings(max_examples=20, deadline=None)
@given(batch=st.integers(1, 4), tokens=st.integers(2, 4),
       form=st.sampled_from(["getitem", "index_select", "where"]), seed=st.integers(0, 2**16))
@example(batch=4, tokens=2, form="getitem", seed=0)  # index of T * T = B entries: padded
@example(batch=3, tokens=3, form="where", seed=1)
def test_a_table_read_through_a_constant_index_matches_the_loop(batch, tokens, form, seed):
    g = torch.Generator().manual_seed(seed)
    D, rows = 3, 2 * tokens - 1
    params = {"q": torch.randn(D, D, generator=g), "out": torch.randn(2, D, generator=g),
              "table": torch.randn(max(rows * rows, tokens * tokens), generator=g)}
    coords = torch.arange(tokens)  # Swin's relative position index, flattened
    index = ((coords[:, None] - coords[None, :] + tokens - 1) * rows
             + (coords[:, None] - coords[None, :] + tokens - 1).flip(1)).reshape(-1)

    def losses(p, x):
        return _bias_attention(p, x, index, form)

    check(losses, params, torch.randn(batch, tokens, D, generator=g))


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_torchvision_swin_transformer_takes_the_fast_path(batch):
    """A small ``torchvision.models.SwinTransformer``: windows merged into axis 0, shifted
    windows, the relative position bias table read through its index buffer, patch
    merging; hooks and ghost against the loop, with no fall-back."""
    torch.manual_seed(batch)
    model = torchvision.models.SwinTransformer(
        patch_size=[2, 2], embed_dim=8, depths=[2, 2], num_heads=[2, 2], window_size=[2, 2],
        num_classes=3).eval()
    params = params_of(model)
    x, y = torch.randn(batch, 3, 8, 8), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    check(losses, params, x, y)


@pytest.mark.parametrize("batch", [1, 2, 3, 5])  # 2, 3 and 5 divide the table's axes
def test_a_constant_table_through_a_linear_is_a_derived_tensor(batch):
    """Swin v2's continuous position bias: a fixed ``(1, 5, 3, 2)`` table of coordinates
    through an MLP gives a bias added to every example's logits. The Linear's size check
    refuses that input; it is a constant, so its result is a derived tensor."""
    g = torch.Generator().manual_seed(batch)
    coords = torch.randn(1, 5, 3, 2, generator=g)
    params = {"mlp.weight": torch.randn(4, 2, generator=g), "mlp.bias": torch.randn(4, generator=g),
              "head.weight": torch.randn(4, 3, generator=g)}

    def losses(p, x):
        bias = F.linear(torch.tanh(F.linear(coords, p["mlp.weight"], p["mlp.bias"])),
                        p["head.weight"].T).mean((0, 1, 2))  # (3,)
        return torch.tanh(x + bias).pow(2).sum(1)

    check(losses, params, torch.randn(batch, 3, generator=g))


@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])  # leaky_relu's backward saves its input
def test_an_in_place_activation_of_a_derived_tensor_matches_the_loop(batch, act):
    """NOTE [in-place on derived tensors]: ``nn.ReLU(inplace=True)`` in a branch computed
    from parameters and a constant table (Swin v2's position MLP): it raised autograd's
    "leaf Variable ... in-place" error, then was refused; now it runs out of place with
    the caller's tensor rebound to the result, and the MLP's later use sees the new
    values."""
    g = torch.Generator().manual_seed(batch)
    coords = torch.randn(5, 2, generator=g)
    params = {"w1": torch.randn(6, 2, generator=g), "b1": torch.randn(6, generator=g),
              "w2": torch.randn(3, 6, generator=g)}
    mlp = torch.nn.ReLU(inplace=True) if act == "relu" else torch.nn.LeakyReLU(0.1, inplace=True)

    def losses(p, x):
        h = F.linear(coords, p["w1"], p["b1"])  # (5, 6): a constant input, a derived tensor
        mlp(h)  # in place: h itself now holds relu(h)
        bias = F.linear(h, p["w2"]).mean(0)  # (3,)
        return torch.tanh(x + bias).pow(2).sum(1)

    check(losses, params, torch.randn(batch, 3, generator=g))


def test_in_place_changes_the_engine_cannot_mirror_are_refused():
    """An in-place op on a parameter itself, or on a derived tensor that a view was taken
    from first (eager PyTorch would change the view too), is refused by name; the
    default method falls back to the loop's numbers for the view case."""
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(3, 3, generator=g)}
    x = torch.randn(4, 3, generator=g)

    def on_a_parameter(p, x):
        return F.linear(x, F.relu(p["w"], inplace=True)).pow(2).sum(1)

    with pytest.raises(ValueError, match="changed in place by `F.relu` with inplace=True"):
        fp.per_sample_grads(on_a_parameter, method="hooks")(params, x)

    def after_a_view(p, x):
        h = p["w"] * 2
        top = h[:2]
        F.relu(h, inplace=True)
        return (F.linear(x, h).pow(2).sum(1) + F.linear(x, top).sum(1))

    refused_then_loop(after_a_view, params, x, match="after other tensors were computed from it")


IDENTITY_OPS = {  # ops that return their input itself when there is nothing to do
    "flatten": lambda w: w.flatten(1),
    "contiguous": lambda w: w.contiguous(),
    "to": lambda w: w.to(w.dtype),
    "reshape-same": lambda w: w.reshape(w.shape),
}


@pytest.mark.parametrize("op", sorted(IDENTITY_OPS))
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_an_op_that_returns_its_input_keeps_it_tracked(op, batch):
    """``w.flatten(1)`` of a matrix (and ``contiguous()``, ``to`` its own dtype) returns
    ``w`` itself; the derived-tensor path dropped such a result's tracking, so a norm
    computed from it became a constant and ``w / norm`` lost that term of its gradient
    (spectral norm: off by 0.48, silently, before this fix)."""
    g = torch.Generator().manual_seed(batch)
    params = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, generator=g)}

    def losses(p, x):
        w = p["w"] / torch.linalg.vector_norm(IDENTITY_OPS[op](p["w"]))
        return torch.tanh(F.linear(x, w, p["b"])).pow(2).sum(1)

    check(losses, params, torch.randn(batch, 4, generator=g))


@pytest.mark.parametrize("batch", [1, 3, 5])  # 5 == the weight's rows
def test_spectral_norm_matches_the_loop(batch):
    """``nn.utils.parametrizations.spectral_norm`` in eval mode: ``W / vdot(u, W v)`` with
    the buffers ``u``, ``v`` (constants; ``W`` reshaped by a ``flatten`` that returns it)."""
    torch.manual_seed(batch)
    model = torch.nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(torch.nn.Linear(4, 5)),
                                torch.nn.Tanh(), torch.nn.Linear(5, 2)).eval()
    params = params_of(model)

    def losses(p, x):
        return torch.func.functional_call(model, p, (x,)).pow(2).sum(1)

    check(losses, params, torch.randn(batch, 4))


def test_a_parameter_times_a_constant_vector_is_a_derived_tensor():
    """``W @ v`` with ``v`` a constant vector (spectral norm's power iteration written out)
    was refused by the ``x @ w`` rule, which wants a batched ``x``; it is a derived tensor."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(4, generator=g)
    params = {"w": torch.randn(3, 4, generator=g)}

    def losses(p, x):
        return torch.tanh(F.linear(x, p["w"]) + p["w"] @ v).pow(2).sum(1)

    check(losses, params, torch.randn(3, 4, generator=g))


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_a_cosine_classifier_takes_the_fast_path(batch):
    """``F.linear(F.normalize(h), F.normalize(W))`` (a cosine-softmax head): ``F.normalize``
    passes ``out=None``, which was read as an ``out=`` argument, so the normalised weight
    was refused and ``auto`` fell back."""
    g = torch.Generator().manual_seed(batch)
    params = {"proj": torch.randn(4, 3, generator=g), "w": torch.randn(5, 4, generator=g),
              "scale": torch.tensor(3.0)}

    def losses(p, x, y):
        h = F.normalize(F.linear(x, p["proj"]), dim=1)
        logits = p["scale"] * F.linear(h, F.normalize(p["w"], dim=1))
        return F.cross_entropy(logits, y, reduction="none")

    check(losses, params, torch.randn(batch, 3, generator=g), torch.randint(0, 5, (batch,), generator=g))


class RelativeBuckets(torch.nn.Module):
    """T5's relative position bias: an ``nn.Embedding`` of buckets looked up by a constant
    ``(L, L)`` index made in ``forward`` (a 2-d tensor of ids with no batch axis), then
    masked causally by ``torch.where`` with a constant ``(L, L)`` mask (no operand has the
    result's ``(1, H, L, L)`` shape)."""

    def __init__(self, heads: int = 2, buckets: int = 5, d: int = 4) -> None:
        super().__init__()
        self.bias = torch.nn.Embedding(buckets, heads)
        self.qk = torch.nn.Linear(d, 2 * d)
        self.heads, self.buckets = heads, buckets

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        pos = torch.arange(n)
        bucket = (pos[None, :] - pos[:, None]).clamp(0, self.buckets - 1)  # (L, L) ids
        bias = self.bias(bucket).permute(2, 0, 1)[None]  # (1, H, L, L)
        mask = torch.ones(n, n, dtype=torch.bool).tril()
        if keep is not None:  # the batch's padding mask (B, L): a (B, 1, L, L) operand
            mask = mask & keep[:, None, None, :].bool()
        bias = torch.where(mask, bias, -3.0)
        q, k = self.qk(x).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) + bias, -1)  # (B, H, L, L)
        return (att @ k).pow(2).sum((1, 2, 3))


@pytest.mark.parametrize("padding_mask", [False, True])
@pytest.mark.parametrize("batch, length", [(1, 3), (2, 4), (3, 6), (2, 2), (4, 4), (3, 5)])
def test_t5_relative_buckets_match_the_loop(batch, length, padding_mask):
    """Ids of shape (L, L) with L a multiple of B looked like merged rows; in the padded
    batch they are constants of loss_fn, so the lookup is a derived tensor. With the batch's
    padding mask, ``torch.where`` meets the bias with a ``(B, 1, L, L)`` mask, broadcast
    to the ``(B, H, L, L)`` result (NOTE [elementwise parameters])."""
    torch.manual_seed(batch * 10 + length)
    model = RelativeBuckets()
    params = params_of(model)
    keep = torch.ones(batch, length)
    keep[0, -1] = 0

    def losses(p, x, keep):
        return torch.func.functional_call(model, p, (x, keep if padding_mask else None))

    check(losses, params, torch.randn(batch, length, 4), keep)


class FourierPositions(torch.nn.Module):
    """XCiT's positional encoding: Fourier features of the patch grid (a constant made in
    ``forward``) through a 1 x 1 conv, ``repeat``ed over the batch, added to the tokens;
    and a constant table through a LayerNorm, GroupNorm and RMSNorm with parameters."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.proj = torch.nn.Conv2d(6, channels, 1)
        self.embed = torch.nn.Conv2d(2, channels, 3, padding=1)
        self.ln = torch.nn.LayerNorm(channels)
        self.gn = torch.nn.GroupNorm(2, channels)
        self.rms = torch.nn.RMSNorm(channels)
        self.head = torch.nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        grid = torch.stack([ys, xs, ys.sin(), xs.sin(), ys.cos(), xs.cos()])[None]  # (1, 6, h, w)
        pos = self.proj(grid).repeat(b, 1, 1, 1)  # (B, C, h, w)
        table = torch.linspace(-1, 1, 12).reshape(3, 4)[:, : self.ln.normalized_shape[0]]
        bias = self.ln(table).mean(0) + self.rms(table).mean(0) + self.gn(grid[:, :4]).mean((0, 2, 3))
        tokens = (self.embed(x) + pos).flatten(2).transpose(1, 2) + bias  # (B, h w, C)
        return self.head(torch.tanh(tokens)).pow(2).sum((1, 2))


@pytest.mark.parametrize("batch, side", [(1, 3), (2, 3), (3, 3), (4, 2), (3, 4)])
def test_constant_inputs_and_a_repeat_over_the_batch_match_the_loop(batch, side):
    """A conv, LayerNorm, GroupNorm or RMSNorm on a constant of loss_fn makes a derived
    tensor; ``repeat(B, 1, 1, 1)`` of it is an expand over the batch."""
    torch.manual_seed(batch * 10 + side)
    model = FourierPositions()
    params = params_of(model)

    def losses(p, x):
        return torch.func.functional_call(model, p, (x,))

    check(losses, params, torch.randn(batch, 2, side, side))


@pytest.mark.parametrize("form", ["tile rows", "tile a vector", "fixed count"])
def test_repeats_not_over_the_batch_are_derived(form):
    torch.manual_seed(7)
    params = {"p": torch.randn(1, 3), "v": torch.randn(3), "w": torch.randn(2, 6)}

    def losses(p, x):
        extra = {"tile rows": lambda: p["p"].repeat(2, 2).sum(0),           # (2, 6) -> (6,)
                 "tile a vector": lambda: p["v"].repeat(2),                 # (6,)
                 "fixed count": lambda: p["p"].repeat(5, 1).sum(0).repeat(2)}[form]()
        return F.linear(x + extra, p["w"]).pow(2).sum(1)

    check(losses, params, torch.randn(3, 6))


IN_PLACE = {  # an in-place op on a layer's output, after the rule recorded it
    "relu_": lambda h, b: h.relu_(),
    "F.relu(inplace=True)": lambda h, b: F.relu(h, inplace=True),
    "h += c": lambda h, b: h.__iadd__(0.25),
    "mul_": lambda h, b: h.mul_(1.5),
    "sigmoid_": lambda h, b: h.sigmoid_(),
    "h[:, 0] = 0": lambda h, b: h.__setitem__((slice(None), 0), 0.0),
}
LAYERS = {  # layers whose output is a view of a fresh tensor (F.linear on 3 axes, 2-d ids)
    "linear (B, T, F)": lambda p, h, ids: F.linear(h, p["w"], p["b"]),
    "embedding of 2-d ids": lambda p, h, ids: h + F.embedding(ids, p["e"]),
    "linear (B, T, F) sequence-first": lambda p, h, ids: F.linear(h.transpose(0, 1), p["w"], p["b"]).transpose(0, 1),
    "x @ w": lambda p, h, ids: h @ p["w"],
}


@settings(max_examples=40, deadline=None)
@given(op=st.sampled_from(sorted(IN_PLACE)), layer=st.sampled_from(sorted(LAYERS)),
       batch=st.integers(1, 4))
@example(op="relu_", layer="linear (B, T, F)", batch=3)
def test_in_place_ops_on_a_layer_output_match_the_loop(op, layer, batch):
    """NOTE [gradient edges, not tensors]: an in-place op on a Linear's output for a
    (B, T, F) input rebased the view the rule had recorded, whose edge then received no
    gradient: that layer's per-example gradients were silently zero (off by up to 150
    before the fix, in hooks, ghost and auto alike)."""
    torch.manual_seed(batch * 13 + len(op) + len(layer))
    params = {"e": torch.randn(5, 4), "w": torch.randn(4, 4) * 0.5, "b": torch.randn(4) * 0.1,
              "head": torch.randn(1, 4)}

    def losses(p, ids):
        h = LAYERS[layer](p, F.embedding(ids, p["e"]), ids)  # (B, T, 4)
        out = IN_PLACE[op](h, p["b"])  # __setitem__ returns None
        h = out if isinstance(out, torch.Tensor) else h
        return F.linear(torch.tanh(h), p["head"]).pow(2).sum((1, 2))

    check(losses, params, torch.randint(0, 5, (batch, 3)))


DERIVED_IN_PLACE = {  # in-place ops on tensors computed from parameters alone
    "clone, zero a slice (Swin v2's qkv bias)": lambda b: (lambda c: (c[2:4].zero_(), c)[1])(b.clone()),
    "clone, setitem": lambda b: (lambda c: (c.__setitem__(slice(0, 2), 1.0), c)[1])(b.clone()),
    "scale in place": lambda b: (b * 2).mul_(0.5),
    "fill a view with a parameter's value": lambda b: (lambda c: (c[:1].copy_(b[3:4]), c)[1])(b * 1.0),
}


@pytest.mark.parametrize("form", sorted(DERIVED_IN_PLACE))
@pytest.mark.parametrize("batch", [1, 3])
def test_in_place_ops_on_derived_tensors_match_the_loop(form, batch):
    """NOTE [in-place on derived tensors]: an in-place method on a derived tensor, or on a
    view of one, runs out of place on a clone and the caller's objects are rebound."""
    torch.manual_seed(batch)
    params = {"w": torch.randn(4, 3), "b": torch.randn(4)}

    def losses(p, x):
        return F.linear(x, p["w"], DERIVED_IN_PLACE[form](p["b"])).pow(2).sum(1)

    check(losses, params, torch.randn(batch, 3))


def test_in_place_on_a_parameter_or_a_used_derived_tensor_is_refused():
    g = torch.Generator().manual_seed(1)
    params = {"w": torch.randn(3, 3, generator=g), "b": torch.randn(3, generator=g)}
    x = torch.randn(4, 3, generator=g)

    def on_a_parameter(p, x):
        p["b"].zero_()
        return F.linear(x, p["w"], p["b"]).pow(2).sum(1)

    with pytest.raises(ValueError, match=r"changed in place by `Tensor.zero_`"):
        fp.per_sample_grads(on_a_parameter, method="hooks")(params, x)

    def after_use(p, x):
        c = p["b"] * 2
        d = c.exp()  # computed from c before c changes
        c[0] = 0.0
        return F.linear(x, p["w"], c + d).pow(2).sum(1)

    refused_then_loop(after_use, params, x, match="after other tensors were computed from it")


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_torchvision_swin_v2_takes_the_fast_path(batch):
    """torchvision's Swin v2: its position MLP on a constant coordinate table (ReLU in place
    on the Linear's output: the view-edge fix, at a batch of one) and its qkv bias cloned
    and zeroed in place (NOTE [in-place on derived tensors])."""
    from torchvision.models.swin_transformer import PatchMergingV2
    from torchvision.models.swin_transformer import SwinTransformer
    from torchvision.models.swin_transformer import SwinTransformerBlockV2

    torch.manual_seed(batch)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                            window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=3,
                            block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2).double()
    params = params_of(model)

    def losses(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    check(losses, params, torch.randn(batch, 3, 16, 16), torch.arange(batch) % 3)


@pytest.mark.parametrize("eq", ["btd,dnh->bnth", "btd,dnh->bhnt"])
def test_an_in_place_op_on_a_permuted_einsum_output_matches_the_loop(eq):
    """An einsum's output that is a permuted view of its whole product, changed in place:
    the engine keeps the product's edge and lays its gradient out as the view (before,
    the view's edge got no gradient and the per-example gradients were off by 22 and 40)."""
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 2, 3)}

    def losses(p, x):
        h = torch.einsum(eq, x, p["w"])
        h.relu_()
        return h.pow(2).flatten(1).sum(1)

    check(losses, params, torch.randn(3, 5, 4))


def _half(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.cat([x * w, x * w], -1)[..., : x.shape[-1]]


def _half_rule(engine, args, kwargs):
    """A rule whose output is a view of part of a fresh tensor."""
    x, w = args
    slot = engine.slot(w)
    xin = x if x.requires_grad else x.detach().requires_grad_()
    out = torch.cat([xin * engine.base(w), xin * engine.base(w)], -1)[..., : x.shape[-1]]
    engine.record(out, lambda e, g, x: e.add("direct", slot, g * x), x)
    return out


def test_a_partial_view_changed_in_place_is_refused(monkeypatch):
    """NOTE [gradient edges, not tensors]: a recorded output that is a view of part of a
    larger tensor cannot be read from its base; changed in place, it is refused by name
    instead of giving no gradient."""
    from functorch_pipeline.transforms._grad_sample import _rules

    half = _rules.overridable(_half)
    monkeypatch.setitem(_rules.RULES, half, _half_rule)
    params = {"w": torch.randn(3)}

    def losses(p, x, in_place):
        h = half(x, p["w"])
        if in_place:
            h.mul_(2.0)
        return h.pow(2).sum(1)

    x = torch.randn(4, 3)
    want = fp.per_sample_grads(lambda p, x: losses(p, x, False), method="vmap")(params, x)
    got = fp.per_sample_grads(lambda p, x: losses(p, x, False), method="hooks")(params, x)
    assert close(got["w"], want["w"])
    with pytest.raises(ValueError, match="was changed in place afterwards"):
        fp.per_sample_grads(lambda p, x: losses(p, x, True), method="hooks")(params, x)


def test_dunder_methods_that_are_not_in_place_are_not_taken_for_it():
    """``__int__``, ``__iter__`` and ``__invert__`` start with ``__i`` but change nothing:
    ``int()`` of a derived tensor returns an int (it returned the tracked tensor, a
    TypeError, while every ``__i...__`` was read as an augmented assignment)."""
    torch.manual_seed(0)
    params = {"w": torch.randn(3, 4), "b": torch.randn(3)}

    def losses(p, x):
        k = int((p["b"] * 0 + 2).sum())  # __int__ on a derived tensor: 2
        w = torch.stack([row for row in p["w"]])  # __iter__ on a parameter
        keep = ~(p["b"] > 0)  # __invert__ on a derived mask
        return F.linear(x, w[:k], torch.where(keep, p["b"], 2 * p["b"])[:k]).pow(2).sum(1)

    check(losses, params, torch.randn(3, 4))
