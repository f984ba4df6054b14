"""NOTE [broadcast parameters]: ``x + p``, ``x * p`` and ``p.expand(B, ...)`` rules (a
vision transformer's positional embedding, LayerScale and class token), every engine
against a per-example autograd loop in float64."""

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

TOL = 1e-10


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, atol=TOL * max(1.0, float(b.abs().max())),
                                                      rtol=0))


def check(losses, params, *batch) -> None:
    """hooks' per-example gradients, and ghost's and hooks' norms and clipped sums, against
    the loop; auto must not fall back (no warning)."""
    per = loop_grads(losses, params, *batch)
    norms = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in per.values()).sqrt()
    max_norm = float(norms.median())
    factor = (max_norm / norms).clamp(max=1.0)
    clipped = {k: (g * factor.reshape(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in per.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # frozen parameters read from a closure (LoRA's base weights) are noted, not a fall-back
        warnings.filterwarnings("ignore", message=r".*nn\.Parameter\(s\) that require grad")
        for method in ("hooks", "auto"):
            got = fp.per_sample_grads(losses, method=method)(params, *batch)
            assert all(close(got[k], per[k]) for k in per), method
        for method in ("ghost", "hooks", "auto"):
            total, n = fp.clipped_grad(losses, max_norm, method=method)(params, *batch)
            assert close(n, norms), method
            assert all(close(total[k], clipped[k]) for k in per), method


def refused_then_loop(losses, params, *batch, match: str) -> None:
    """hooks refuses with ``match``; the default method falls back (one warning) to the
    loop's numbers."""
    with pytest.raises(ValueError, match=match):
        fp.per_sample_grads(losses, method="hooks")(params, *batch)
    with pytest.warns(UserWarning, match="falls back to 'vmap'"):
        got = fp.per_sample_grads(losses)(params, *batch)
    want = loop_grads(losses, params, *batch)
    assert all(close(got[k], want[k]) for k in want)


SHAPES = {  # parameter shape against a (B, T, D) input, T = 3, D = 4
    "bias (D,)": (4,),
    "table (1, T, D)": (1, 3, 4),
    "table (T, D)": (3, 4),
    "(1, 1, D)": (1, 1, 4),
}


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from(sorted(SHAPES)), op=st.sampled_from(["+", "p+", "*", "p*", "add alpha"]),
       batch=st.integers(1, 4), seq_first=st.booleans())
@example(shape="bias (D,)", op="+", batch=3, seq_first=True)  # T == B: padded
@example(shape="table (1, T, D)", op="*", batch=3, seq_first=False)
def test_add_and_mul_match_the_loop(shape, op, batch, seq_first):
    """A parameter added to or multiplied with a batched activation (either operand order,
    ``torch.add`` with ``alpha``), batch-first or, for a bias, sequence-first."""
    if seq_first and shape != "bias (D,)":
        seq_first = False  # a table spans (T, D): sequence-first would put B inside it
    torch.manual_seed(batch * 7 + len(op))
    lin, head = nn.Linear(2, 4), nn.Linear(4, 1)
    params = {**{f"lin.{k}": v for k, v in params_of(lin).items()},
              **{f"head.{k}": v for k, v in params_of(head).items()},
              "p": torch.randn(*SHAPES[shape])}

    def losses(p, x):
        h = torch.tanh(F.linear(x, p["lin.weight"], p["lin.bias"]))  # (B, T, 4)
        if seq_first:
            h = h.transpose(0, 1)  # (T, B, 4)
        h = {"+": lambda: h + p["p"], "p+": lambda: p["p"] + h, "*": lambda: h * p["p"],
             "p*": lambda: p["p"] * h, "add alpha": lambda: torch.add(h, p["p"], alpha=0.5)}[op]()
        h = torch.tanh(h)
        if seq_first:
            h = h.transpose(0, 1)
        return F.linear(h, p["head.weight"], p["head.bias"]).pow(2).sum((1, 2))

    check(losses, params, torch.randn(batch, 3, 2))


class ClassToken(nn.Module):
    """Patches ``(B, T, 2)`` -> Linear -> a class token prepended (``expand`` + ``cat``) ->
    a positional table added -> LayerScale -> the class token's features to classes."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 4))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, 4))
        self.gamma = nn.Parameter(torch.rand(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], 1) + self.pos
        h = h + self.gamma * torch.tanh(h)
        return self.head(h[:, 0] + h[:, 1:].mean(1))


@pytest.mark.parametrize("batch, tokens", [(1, 3), (4, 2), (3, 2), (2, 5)])  # (3, 2): 3 = T + 1
def test_a_class_token_matches_the_loop(batch, tokens):
    """``cls.expand(B, -1, -1)`` is taken as the examples only once the padded batch shows
    its size follows the batch's."""
    torch.manual_seed(batch * 10 + tokens)
    m = ClassToken(tokens)
    x, y = torch.randn(batch, tokens, 2), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        return F.cross_entropy(torch.func.functional_call(m, p, (x,)), y, reduction="none")

    check(losses, params_of(m), x, y)


def test_an_expand_to_a_length_equal_to_the_batch_is_not_taken_for_examples():
    """A parameter expanded to a fixed length that equals the batch size by coincidence
    does not grow with the padding: it is a derived tensor with no batch axis (NOTE
    [derived parameters]), not the examples, and hooks gives the loop's gradients."""
    torch.manual_seed(0)
    params = {"row": torch.randn(1, 4), "w": torch.randn(4, 4)}

    def losses(p, x):
        table = p["row"].expand(3, 4)  # 3 positions, whatever the batch
        return (F.linear(x, p["w"]) + table).pow(2).sum((1, 2))

    check(losses, params, torch.randn(3, 3, 4))  # a batch of 3


@pytest.mark.parametrize("body", [
    lambda p, h: h * (p["a"] + p["b"]),  # parameters combined with each other first
    lambda p, h: h + p["row"].expand(2, 4).sum(0),  # reshaped, reduced
    lambda p, h: F.linear(h, p["w"] / p["w"].norm(dim=1, keepdim=True)),  # weight norm
    lambda p, h: h + F.linear(p["a"], p["w"]),  # a learned vector through a layer
    lambda p, h: F.linear(torch.tanh(F.linear(h, p["w"])), p["w"] * p["b"]),  # on an activation
])
def test_parameters_transformed_before_they_meet_the_batch_match_the_loop(body):
    """NOTE [derived parameters]: any op of parameters alone, then a rule where the result
    meets the batch: per-example gradients pulled back through the op."""
    torch.manual_seed(1)
    params = {"a": torch.randn(4), "b": torch.randn(4), "row": torch.randn(1, 4),
              "w": torch.randn(4, 4)}

    def losses(p, x):
        return torch.tanh(body(p, x)).pow(2).sum(1)

    check(losses, params, torch.randn(5, 4))


def test_a_parameter_varying_along_the_batch_axis_is_refused():
    """``h + rows`` with ``rows`` of shape ``(B, 1)``: one row per batch position is not a
    per-example parameter, and the rule says why."""
    params = {"rows": torch.randn(3, 1)}

    def losses(p, x):
        return (x + p["rows"]).pow(2).sum(1)

    with pytest.raises(ValueError, match="its rule takes a parameter spanning the trailing axes"):
        fp.per_sample_grads(losses, method="hooks")(params, torch.randn(3, 4))


def test_losses_from_parameters_alone_are_refused():
    """Positions made inside ``loss_fn`` have no batch axis, also when there are as many
    as examples (a padded run shows they do not follow the batch: NOTE [a table the size
    of the batch]): when the losses come from such a lookup with no rule in between,
    nothing shows their examples, and hooks refuses rather than return zeros. (Ids
    computed from the batch follow it, and are taken:
    ``test_one_dimensional_ids_read_from_a_batch_argument_are_taken``.)"""
    params = {"emb": torch.randn(7, 3)}

    def losses(p, d):
        return F.embedding(torch.arange(4) % 7, p["emb"]).pow(2).sum(1)  # 4 positions

    with pytest.raises(ValueError, match=r"the losses are computed from `emb` \(through `F.embedding`\)"):
        fp.per_sample_grads(losses, method="hooks")(params, torch.randint(0, 6, (4,)))


def test_arithmetic_on_a_parameter_without_gradient_passes_through():
    """Under ``no_grad`` nothing flows back, so ``p * 2`` inside ``loss_fn`` is computed,
    not refused (as before these rules)."""
    torch.manual_seed(2)
    params = {"w": torch.randn(2, 3)}

    def losses(p, x):
        with torch.no_grad():
            scale = (p["w"] * 2).abs().max()
        return F.linear(x, p["w"]).pow(2).sum(1) / scale

    x = torch.randn(4, 3)
    got = fp.per_sample_grads(losses, method="hooks")(params, x)
    want = loop_grads(losses, params, x)
    assert all(close(got[k], want[k]) for k in want)


@pytest.mark.parametrize("batch", [2, 17])  # 17: as many as the tokens (16 patches + class)
def test_torchvision_vision_transformer_matches_the_loop(batch):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(3)
    m = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2,
                                             hidden_dim=8, mlp_dim=16, num_classes=3)
    x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        return F.cross_entropy(torch.func.functional_call(m, p, (x,)), y, reduction="none")

    check(losses, params_of(m), x, y)


class TinyLM(nn.Module):
    """GPT-2's embedding: token ids ``(B, T)`` through ``wte`` plus positions made inside
    the forward through ``wpe`` (``arange(T)``, or ``(1, T)`` position ids as in Hugging
    Face's models), then a causal encoder layer and a per-token head."""

    def __init__(self, rows: bool) -> None:
        super().__init__()
        self.rows = rows
        self.wte, self.wpe = nn.Embedding(11, 8), nn.Embedding(6, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 11)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        pos = torch.arange(T)
        h = self.wte(ids) + self.wpe(pos.unsqueeze(0) if self.rows else pos)
        mask = nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype)
        return self.head(self.block(h, src_mask=mask, is_causal=True))


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("batch, length", [(3, 5), (4, 4), (1, 3)])  # (4, 4): T == B
def test_a_learned_positional_embedding_matches_the_loop(rows, batch, length):
    """NOTE [derived parameters]: the position lookup has no batch axis; its per-example
    gradient comes from ``wte(ids) + wpe(pos)`` and is scattered back into ``wpe``."""
    torch.manual_seed(batch * 10 + length)
    m = TinyLM(rows)
    ids = torch.randint(0, 11, (batch, length))

    def losses(p, ids):
        logits = torch.func.functional_call(m, p, (ids,))
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)

    check(losses, params_of(m), ids)


def test_a_derived_lookup_used_without_a_rule_is_refused_by_name():
    """A position lookup that meets the batch in an op with no rule (``torch._C._linalg.linalg_matmul``) is
    refused like a parameter, naming the table it came from; auto falls back to the loop's
    numbers."""
    torch.manual_seed(4)
    params = {"wpe": torch.randn(5, 3)}

    def losses(p, x):
        pos = F.embedding(torch.arange(x.shape[2]), p["wpe"])  # (T, 3)
        return torch.linalg.matmul(x, pos).pow(2).sum((1, 2))

    refused_then_loop(losses, params, torch.randn(3, 2, 4),
                      match=r"`wpe` \(through `F.embedding`\) is used by `torch._C._linalg.linalg_matmul`")


def test_a_parameter_split_into_pieces_passes_each_piece_back():
    """``chunk`` returns several tensors of one parameter: each is derived (none may carry
    the parameter's graph past the engine unseen) and each piece's per-example gradient
    goes back to its rows of the parameter."""
    torch.manual_seed(5)
    params = {"in_proj": torch.randn(9, 4), "out": torch.randn(2, 3)}

    def losses(p, x):
        wq, wk, wv = p["in_proj"].chunk(3)
        q, k, v = F.linear(x, wq), F.linear(x, wk), F.linear(x, wv)  # (B, T, 3)
        attn = torch.softmax(q @ k.transpose(1, 2), -1) @ v
        return F.linear(attn, p["out"]).pow(2).sum((1, 2))

    check(losses, params, torch.randn(4, 5, 4))


def test_an_expand_that_equals_the_padded_size_by_coincidence_is_not_taken():
    """Found by a random search: sequences as long as the batch (2) make the batch run
    padded to 3, where a fixed ``expand(3, ...)`` of a weight has the padded size. Its
    size did not follow the batch across the runs (it was 3 at size 2), so it is not the
    examples' axis (``_padding.Evidence``)."""
    torch.manual_seed(6)
    params = {"a": torch.randn(4, 4) * 0.5}

    def losses(p, x):
        w = p["a"].unsqueeze(0).expand(3, 4, 4).sum(0) / 3
        return torch.tanh(F.linear(x, w)).pow(2).sum((1, 2))

    check(losses, params, torch.randn(2, 2, 4))


class TwoTokens(nn.Module):
    """DeiT's class and distillation tokens: two expands over the batch, then a sequence as
    long as the batch in some tests."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 4)
        self.cls, self.dist = nn.Parameter(torch.randn(1, 1, 4)), nn.Parameter(torch.randn(1, 1, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = torch.cat([self.cls.expand(n, -1, -1), self.dist.expand(n, -1, -1), self.proj(x)], 1)
        return self.head(torch.tanh(h[:, 0] + h[:, 1] + h[:, 2:].mean(1)))


@pytest.mark.parametrize("batch, tokens", [(3, 4), (4, 2), (2, 2)])  # (4, 2): 4 = T + 2
def test_two_expanded_tokens_match_the_loop(batch, tokens):
    """Each expand needs two runs of different sizes to be proven over the batch; the
    second is proven one padded run after the first."""
    torch.manual_seed(batch * 10 + tokens)
    m = TwoTokens()
    x, y = torch.randn(batch, tokens, 2), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        return F.cross_entropy(torch.func.functional_call(m, p, (x,)), y, reduction="none")

    check(losses, params_of(m), x, y)


CHANNEL_SHAPES = {  # parameter shape against a (B, C, H, W) = (B, 3, 2, 4) activation
    "(C, 1, 1)": (3, 1, 1),
    "(1, C, 1, 1)": (1, 3, 1, 1),
    "(C, 1, W)": (3, 1, 4),
    "(H, 1)": (2, 1),
    "(C, H, 1)": (3, 2, 1),
}


@settings(max_examples=30, deadline=None)
@given(shape=st.sampled_from(sorted(CHANNEL_SHAPES)),
       op=st.sampled_from(["*", "p*", "+", "-", "p-", "/", "p/"]), batch=st.integers(1, 4))
@example(shape="(C, 1, 1)", op="*", batch=3)  # C == B
@example(shape="(H, 1)", op="/", batch=2)  # H == B
def test_a_parameter_broadcast_inside_the_trailing_axes_matches_the_loop(shape, op, batch):
    """A parameter with size-1 axes among the trailing ones (ConvNeXt's LayerScale
    ``gamma[:, None, None] * x``, a per-channel shift): its per-example gradient also
    sums the trailing axes it is broadcast over. They fell back to ``vmap`` before."""
    torch.manual_seed(batch * 11 + len(op) + len(shape))
    conv, head = nn.Conv2d(2, 3, 1), nn.Linear(3 * 2 * 4, 1)
    params = {**{f"conv.{k}": v for k, v in params_of(conv).items()},
              **{f"head.{k}": v for k, v in params_of(head).items()},
              "p": torch.rand(*CHANNEL_SHAPES[shape]) + 0.5}  # away from 0 for "/"

    def losses(p, x):
        h = torch.tanh(F.conv2d(x, p["conv.weight"], p["conv.bias"]))  # (B, 3, 2, 4)
        h = {"*": lambda: h * p["p"], "p*": lambda: p["p"] * h, "+": lambda: h + p["p"],
             "-": lambda: h - p["p"], "p-": lambda: p["p"] - h, "/": lambda: h / p["p"],
             "p/": lambda: p["p"] / (h + 2)}[op]()
        return F.linear(torch.tanh(h).flatten(1), p["head.weight"], p["head.bias"]).pow(2).sum(1)

    check(losses, params, torch.randn(batch, 2, 2, 4))


class ConvNeXtBlock(nn.Module):
    """torchvision's ConvNeXt ``CNBlock`` in small: depthwise 7x7 conv, channels-last
    LayerNorm and MLP, then ``layer_scale * x`` with ``layer_scale`` of shape ``(C, 1, 1)``,
    and a residual; a linear head."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.layer_scale = nn.Parameter(torch.rand(dim, 1, 1))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.norm(h)))).permute(0, 3, 1, 2)
        return self.head((x + self.layer_scale * h).mean((2, 3)))


@pytest.mark.parametrize("batch", [1, 3, 4])  # 4 == C
def test_a_convnext_block_takes_the_fast_path(batch):
    torch.manual_seed(batch)
    model = ConvNeXtBlock()
    params = params_of(model)
    x, y = torch.randn(batch, 4, 5, 5), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    check(losses, params, x, y)
