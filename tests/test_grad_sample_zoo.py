"""per_sample_grads(method="hooks") on the rest of Opacus's grad-sampler zoo (Conv3d,
transposed convolutions, EmbeddingBag, InstanceNorm, RMSNorm, MultiheadAttention,
TransformerEncoderLayer, fp.nn.RNN/GRU), each against a Python loop of torch.autograd over
examples in float64 (1e-10); and the default method (auto) against vmap."""

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
from per_example_reference import params_of
from torch import nn

import functorch_pipeline as fp

TOL = 1e-10


def weighted(module: nn.Module, pick=lambda out: out):
    """Per-example losses: a fixed weighting of the squared output, summed per example (a
    weighting that differs per position, so a wrong axis cannot cancel out)."""

    def loss(p, *inputs):
        out = pick(torch.func.functional_call(module, p, inputs))
        scale = torch.linspace(0.5, 2.0, out[0].numel()).reshape(out[0].shape)
        return (out ** 2 * scale).flatten(1).sum(1)

    return loss


def assert_matches(loss_fn, params, *batch, method="hooks", **kw):
    got = fp.per_sample_grads(loss_fn, method=method, **kw)(params, *batch)
    want = loop_grads(loss_fn, params, *batch)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert want[k].abs().max() > 0, k  # the reference is not trivially zero
        assert torch.allclose(got[k], want[k], atol=TOL, rtol=0), (k, (got[k] - want[k]).abs().max())
    return got


# -- convolutions ---------------------------------------------------------------------------


@pytest.mark.parametrize("kw, shape", [
    (dict(kernel_size=3, padding=1), (3, 2, 4, 5, 6)),
    (dict(kernel_size=(2, 3, 1), stride=(1, 2, 1), dilation=(2, 1, 1), groups=2, bias=False), (2, 2, 5, 6, 3)),
    (dict(kernel_size=3, padding="same", padding_mode="circular"), (2, 2, 4, 4, 4)),
])
def test_conv3d_matches_loop(kw, shape):
    torch.manual_seed(0)
    m = nn.Conv3d(2, 4, **kw)
    assert_matches(weighted(m), params_of(m), torch.randn(*shape))


@pytest.mark.parametrize("nd, kw", [
    (1, dict(kernel_size=3, stride=2, padding=1, output_padding=1)),
    (1, dict(kernel_size=2, groups=2, dilation=3, bias=False)),
    (2, dict(kernel_size=(3, 2), stride=(2, 3), padding=(1, 0), output_padding=(1, 2))),
    (2, dict(kernel_size=3, stride=2, groups=2, dilation=2, output_padding=1)),
    (3, dict(kernel_size=2, stride=2, padding=1)),
    (3, dict(kernel_size=(1, 2, 3), groups=2)),
])
def test_conv_transpose_matches_loop(nd, kw):
    torch.manual_seed(0)
    m = getattr(nn, f"ConvTranspose{nd}d")(4, 6, **kw)
    x = torch.randn(3, 4, *[5, 4, 3][:nd])
    assert_matches(weighted(m), params_of(m), x)


def test_conv_transpose_output_size_argument():
    torch.manual_seed(0)
    m = nn.ConvTranspose2d(2, 3, 3, stride=2)
    x = torch.randn(3, 2, 4, 4)
    loss = weighted(m, lambda out: out)

    def sized(p, x):
        out = F.conv_transpose2d(x, p["weight"], p["bias"], 2, 0, 1)  # output_padding 1
        return (out ** 2).flatten(1).sum(1) + loss(p, x)

    assert_matches(sized, params_of(m), x)


@settings(max_examples=8, deadline=None)
@given(batch=st.integers(1, 3), k=st.integers(1, 3), stride=st.integers(1, 3),
       pad=st.integers(0, 1), dil=st.integers(1, 2), extra=st.integers(0, 2))
def test_conv_transpose2d_hypothesis(batch, k, stride, pad, dil, extra):
    torch.manual_seed(0)
    out_pad = min(extra, max(stride, dil) - 1)
    m = nn.ConvTranspose2d(2, 3, k, stride=stride, padding=pad, dilation=dil, output_padding=out_pad)
    assert_matches(weighted(m), params_of(m), torch.randn(batch, 2, 4, 3))


# -- embedding bags -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_bag_2d_matches_loop_with_repeats(mode, padding_idx):
    torch.manual_seed(0)
    m = nn.EmbeddingBag(7, 3, mode=mode, padding_idx=padding_idx)
    idx = torch.tensor([[1, 1, 2, 3], [2, 2, 2, 2], [0, 6, 6, 5]])
    assert_matches(weighted(m), params_of(m), idx)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_embedding_bag_offsets_matches_loop(mode, include_last_offset):
    """Bags of sizes 3, 0, 2, 1 in one flat index vector (the batch is the bags)."""
    torch.manual_seed(0)
    emb = nn.EmbeddingBag(6, 3, mode=mode, include_last_offset=include_last_offset)
    flat = torch.tensor([1, 2, 2, 0, 5, 4])
    offsets = torch.tensor([0, 3, 3, 5] + ([6] if include_last_offset else []))
    p = params_of(emb)
    bag_of = torch.tensor([0, 0, 0, 2, 2, 3])

    def loss(p, bags):  # `bags` carries the batch axis; the flat indices are fixed
        out = torch.func.functional_call(emb, p, (flat, offsets))
        if bags.shape[0] != out.shape[0]:  # one example at a time for the reference
            keep = bag_of == bags[0]
            sub = flat[keep]
            out = torch.func.functional_call(emb, p, (sub, torch.tensor([0] + ([sub.numel()] if include_last_offset else []))))
        return (out ** 2 * bags.unsqueeze(1)).sum(1)

    got = fp.per_sample_grads(loss, method="hooks", batch_argnums=(1,))(p, torch.arange(4.0))
    want = loop_grads(loss, p, torch.arange(4.0))
    # example 0 is multiplied by 0, so only rows 1.. of the per-example gradients differ
    assert torch.allclose(got["weight"], want["weight"], atol=TOL, rtol=0)
    assert want["weight"][2].abs().max() > 0 and want["weight"][1].abs().max() == 0  # empty bag


def test_embedding_bag_per_sample_weights_matches_loop():
    torch.manual_seed(0)
    m = nn.EmbeddingBag(5, 2, mode="sum")
    idx, w = torch.tensor([[0, 3, 3], [4, 1, 0]]), torch.randn(2, 3)

    def loss(p, idx, w):
        return (torch.func.functional_call(m, p, (idx,), {"per_sample_weights": w}) ** 2).sum(1)

    assert_matches(loss, params_of(m), idx, w)


# -- normalisation --------------------------------------------------------------------------


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.InstanceNorm1d(3, affine=True), (4, 3, 5)),
    (lambda: nn.InstanceNorm2d(3, affine=True), (4, 3, 4, 5)),
    (lambda: nn.InstanceNorm3d(2, affine=True), (3, 2, 3, 2, 4)),
    (lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True).train(), (4, 3, 4, 5)),
    (lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True).eval(), (4, 3, 4, 5)),
    (lambda: nn.RMSNorm(4), (3, 4)),
    (lambda: nn.RMSNorm([3, 4], eps=1e-3), (3, 5, 3, 4)),
])
def test_instance_and_rms_norm_match_loop(make, shape):
    torch.manual_seed(0)
    m = make()
    if getattr(m, "running_var", None) is not None:
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    for p in m.parameters():
        p.data.uniform_(0.5, 1.5)
    x = torch.randn(*shape)
    if m.training and getattr(m, "running_mean", None) is not None:
        # train mode with running statistics updates the buffers: compare from fresh copies
        import copy
        m2 = copy.deepcopy(m)
        got = fp.per_sample_grads(weighted(m), method="hooks")(params_of(m), x)
        want = loop_grads(weighted(m2), params_of(m2), x)
        assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)
        return
    assert_matches(weighted(m), params_of(m), x)


# -- attention ------------------------------------------------------------------------------

PADDING = torch.tensor([[False] * 5, [False] * 4 + [True], [False, True, False, False, False]])


def attention_loss(module, seq_first=False, mask_name=None, kw=None, pick=lambda out: out[0]):
    """Per-example losses of ``module(*inputs)``; inputs are batch-first (the batch axis the
    engine reads) and transposed for sequence-first modules; an optional mask is the last
    batch argument."""

    def loss(p, *xs):
        kwargs = dict(kw or {})
        if mask_name is not None:
            kwargs[mask_name], xs = xs[-1], xs[:-1]
        if seq_first:
            xs = tuple(x.transpose(0, 1) for x in xs)
        out = pick(torch.func.functional_call(module, p, xs, kwargs))
        if seq_first:
            out = out.transpose(0, 1)
        scale = torch.linspace(0.5, 2.0, out[0].numel()).reshape(out[0].shape)
        return (out ** 2 * scale).flatten(1).sum(1)

    return loss


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kw, cross", [
    (dict(), "self"),
    (dict(add_bias_kv=True, add_zero_attn=True), "kv"),
    (dict(kdim=6, vdim=5), "cross"),
    (dict(bias=False), "cross_same_dim"),
])
def test_multihead_attention_matches_loop(batch_first, kw, cross):
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kw)
    x = torch.randn(3, 5, 8)
    if cross == "self":
        inputs = (x, x, x)
    elif cross == "kv":
        kv = torch.randn(3, 4, 8)
        inputs = (x, kv, kv)
    else:
        inputs = (x, torch.randn(3, 4, kw.get("kdim", 8)), torch.randn(3, 4, kw.get("vdim", 8)))

    loss = attention_loss(m, seq_first=not batch_first)
    if cross == "self":  # one tensor three times: the packed self-attention projection
        def self_loss(p, x):
            return loss(p, x, x, x)
        assert_matches(self_loss, params_of(m), x)
    else:
        assert_matches(loss, params_of(m), *inputs)


def masked_attention(kw, mask):
    """``(module, loss, batch)`` for self-attention under the masks in ``kw`` (``"causal"``
    or ``"random"`` for ``attn_mask``) and, when ``mask`` names it, a per-example key
    padding mask passed as the last batch argument."""
    torch.manual_seed(0)
    if kw.get("attn_mask") == "causal":
        kw = {**kw, "attn_mask": nn.Transformer.generate_square_subsequent_mask(5)}
    elif kw.get("attn_mask") == "random":
        kw = {**kw, "attn_mask": torch.randn(5, 5)}
    m = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(3, 5, 8)

    def loss(p, x, *masks):
        return attention_loss(m, mask_name=mask, kw=kw)(p, x, x, x, *masks)

    padding = PADDING if "attn_mask" not in kw else torch.zeros(3, 5).masked_fill(PADDING, -torch.inf)
    return m, loss, (x, *([padding] if mask else []))


@pytest.mark.parametrize("kw, mask", [
    (dict(need_weights=False), "key_padding_mask"),
    (dict(need_weights=True, average_attn_weights=False), "key_padding_mask"),
    (dict(need_weights=False, is_causal=True, attn_mask="causal"), None),
    (dict(need_weights=True, attn_mask="random"), None),
    (dict(need_weights=True, attn_mask="random"), "key_padding_mask"),
])
def test_multihead_attention_masks_match_loop(kw, mask):
    m, loss, batch = masked_attention(kw, mask)
    assert_matches(loss, params_of(m), *batch)


def test_multihead_attention_weights_output_matches_torch():
    torch.manual_seed(0)
    m = nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)
    x = torch.randn(3, 5, 8)
    want_out, want_w = m(x, x, x, key_padding_mask=PADDING)
    seen = {}

    def loss(p, x, mask):
        out, w = torch.func.functional_call(m, p, (x, x, x), {"key_padding_mask": mask})
        seen["out"], seen["w"] = out, w
        return out.pow(2).sum((1, 2))

    fp.per_sample_grads(loss, method="hooks")(params_of(m), x, PADDING)
    assert torch.allclose(seen["out"], want_out, atol=1e-12) and torch.allclose(seen["w"], want_w, atol=1e-12)


@pytest.mark.parametrize("norm_first, activation", [(False, "relu"), (True, "gelu")])
def test_transformer_encoder_layer_batch_first_matches_loop(norm_first, activation):
    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True,
                                   norm_first=norm_first, activation=activation)
    x = torch.randn(3, 5, 8)
    loss = attention_loss(m, mask_name="src_key_padding_mask", pick=lambda out: out)
    got = assert_matches(loss, params_of(m), x, PADDING)
    auto = fp.per_sample_grads(loss)(params_of(m), x, PADDING)  # the default takes hooks: same numbers
    assert all(torch.allclose(auto[k], got[k], atol=1e-12, rtol=0) for k in got)


class _Projected(nn.Module):
    """A batch-first input projection, then a ``batch_first=False`` layer on its
    transposed (sequence-first) output: the usual way such a layer is fed."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.layer = layer

    def forward(self, x: torch.Tensor, src_key_padding_mask: torch.Tensor) -> torch.Tensor:
        h = self.proj(x).transpose(0, 1)
        return self.layer(h, src_key_padding_mask=src_key_padding_mask).transpose(0, 1)


@pytest.mark.parametrize("norm_first, activation, projected", [
    (False, "relu", False), (False, "gelu", True), (True, "relu", True)])
def test_transformer_encoder_layer_sequence_first_matches_loop(norm_first, activation, projected,
                                                               recwarn):
    """``batch_first=False`` layers apply their Linear and LayerNorm layers to ``(S, N, E)``
    activations: the rules take the examples on axis 1 there (NOTE [sequence-first
    inputs]), so hooks runs and the default method picks it without a fallback warning."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                       norm_first=norm_first, activation=activation)
    x = torch.randn(3, 5, 8)
    if projected:
        m = _Projected(layer)
        loss = attention_loss(m, mask_name="src_key_padding_mask", pick=lambda out: out)
    else:  # post-norm: attention comes first, and its rule reads (S, N, E) itself
        m = layer
        loss = attention_loss(m, seq_first=True, mask_name="src_key_padding_mask",
                              pick=lambda out: out)
    got = assert_matches(loss, params_of(m), x, PADDING)
    auto = fp.per_sample_grads(loss)(params_of(m), x, PADDING)
    assert all(torch.allclose(auto[k], got[k], atol=1e-12, rtol=0) for k in got)
    assert not [w for w in recwarn if "falls back" in str(w.message)]


def test_sequence_first_raw_input_is_read_transposed_or_copied():
    """A pre-norm layer's LayerNorm sees the raw ``(S, N, E)`` input first. The transposed
    batch itself (a view: the same elements) is read as sequence-first, and so is a copy
    of it, which has a graph (NOTE [the batch requires grad]); the copy was refused and
    ``auto`` fell back to ``vmap`` (NOTE [sequence-first inputs])."""
    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, norm_first=True)
    x = torch.randn(3, 5, 8)

    def loss(p, x, copy=False):
        src = x.transpose(0, 1)
        out = torch.func.functional_call(m, p, (src.contiguous() if copy else src,))
        return out.transpose(0, 1).pow(2).flatten(1).sum(1)

    assert_matches(loss, params_of(m), x)

    def copied(p, x):
        return loss(p, x, copy=True)

    assert_matches(copied, params_of(m), x)


def test_multihead_attention_static_kv_falls_back():
    m = nn.MultiheadAttention(4, 1)
    x = torch.randn(2, 3, 4)

    def loss(p, x):
        q = x.transpose(0, 1)
        out = F.multi_head_attention_forward(
            q, q, q, 4, 1, p["in_proj_weight"], p["in_proj_bias"], None, None, False, 0.0,
            p["out_proj.weight"], p["out_proj.bias"], static_k=torch.ones(2, 3, 4),
            static_v=torch.ones(2, 3, 4))[0]
        return out.pow(2).sum((0, 2))

    with pytest.raises(ValueError, match="static_k/static_v"):
        fp.per_sample_grads(loss, method="hooks")(params_of(m), x)


# -- the default method ---------------------------------------------------------------------


def _mlp_losses():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))

    def per_example(p, x, y):
        return F.cross_entropy(torch.func.functional_call(m, p, (x,)), y, reduction="none")

    def mean(p, x, y):
        return F.cross_entropy(torch.func.functional_call(m, p, (x,)), y)

    return m, x, y, per_example, mean


def test_default_uses_hooks_for_per_example_losses_without_a_warning(monkeypatch):
    m, x, y, per_example, _ = _mlp_losses()
    calls = []
    from functorch_pipeline.transforms import _per_sample
    real = _per_sample.hooks_value_and_grad
    monkeypatch.setattr(_per_sample, "hooks_value_and_grad", lambda *a: calls.append(1) or real(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fp.per_sample_grads(per_example)(params_of(m), x, y)
    assert calls == [1]
    want = loop_grads(per_example, params_of(m), x, y)
    assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)


def test_default_with_a_mean_loss_gives_vmaps_numbers_and_warns_once():
    """A scalar loss is never rescaled: each example's own gradient (a batch of one), as
    with method="vmap", announced once per loss_fn however many calls."""
    m, x, y, per_example, mean = _mlp_losses()
    with pytest.warns(UserWarning, match="returned a scalar") as record:
        f = fp.per_sample_grads(mean)
        got = f(params_of(m), x, y)
        f(params_of(m), x, y)
        fp.per_sample_grads(mean)(params_of(m), x, y)  # a new wrapper of the same loss_fn
    assert len([w for w in record if "scalar" in str(w.message)]) == 1
    want = loop_grads(lambda p, x, y: mean(p, x, y).reshape(1), params_of(m), x, y)
    vm = fp.per_sample_grads(mean, method="vmap")(params_of(m), x, y)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=TOL, rtol=0)
        assert torch.allclose(vm[k], got[k], atol=TOL, rtol=0)


def test_default_caches_the_fallback_per_input_shapes(monkeypatch):
    m, x, y, _, mean = _mlp_losses()
    from functorch_pipeline.transforms import _per_sample
    calls = []
    real = _per_sample.hooks_value_and_grad
    monkeypatch.setattr(_per_sample, "hooks_value_and_grad", lambda *a: calls.append(1) or real(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = fp.per_sample_grads(mean)
        for _ in range(3):
            f(params_of(m), x, y)
        assert calls == [1]  # tried once, then vmap straight away
        f(params_of(m), x[:3], y[:3])  # new shapes: tried again
        assert calls == [1, 1]


@pytest.mark.parametrize("kw, reason", [
    (dict(has_aux=True), "has_aux=True"),
    (dict(keep_batch_dim=False), "keep_batch_dim=False"),
    (dict(randomness="different"), "randomness='different'"),
])
def test_default_keeps_the_vmap_contract(kw, reason):
    m, x, y, per_example, _ = _mlp_losses()

    def loss(p, x, y):
        if kw.get("keep_batch_dim") is False:
            return per_example(p, x[None], y[None])[0]
        out = per_example(p, x, y)
        return (out, {"loss": out}) if kw.get("has_aux") else out

    with pytest.warns(UserWarning, match=f"uses 'vmap': {reason}"):
        got = fp.per_sample_grads(loss, **kw)(params_of(m), x, y)
    want = fp.per_sample_grads(loss, method="vmap", **kw)(params_of(m), x, y)
    if kw.get("has_aux"):
        assert got[1]["loss"].shape == (5, 1)  # per example, as vmap gives it
        got, want = got[0], want[0]
    assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)


def test_default_inside_transforms_uses_vmap_silently():
    m, x, y, per_example, _ = _mlp_losses()
    p = params_of(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        total = torch.func.grad(lambda p: fp.per_sample_grads(per_example)(p, x, y)["2.bias"].pow(2).sum())(p)
    want = torch.func.grad(
        lambda p: fp.per_sample_grads(per_example, method="vmap")(p, x, y)["2.bias"].pow(2).sum())(p)
    assert torch.allclose(total["0.weight"], want["0.weight"], atol=TOL)


def test_default_with_parameters_that_require_grad_keeps_the_graph_and_says_so_once():
    # Passing `dict(model.named_parameters())` (leaves that require grad) asks for a graph
    # through the per-example gradients, which only vmap builds: the fall-back is said once
    # per loss_fn, with the way to the fast method.
    m, x, y, per_example, _ = _mlp_losses()
    p = params_of(m)
    q = {k: v.clone().requires_grad_() for k, v in p.items()}
    f = fp.per_sample_grads(per_example)
    with pytest.warns(UserWarning, match=r"uses 'vmap': argument 0 at `\['0.bias'\]` "
                      r"requires grad.*v\.detach\(\).*torch\.no_grad\(\)"):
        g = f(q, x, y)
    (second,) = torch.autograd.grad(g["2.weight"].pow(2).sum(), [q["2.weight"]])
    # the same second derivative from vmap(grad) written out with torch.func
    want = torch.func.grad(lambda w: fp.per_sample_grads(per_example, method="vmap")(
        {**p, "2.weight": w}, x, y)["2.weight"].pow(2).sum())(p["2.weight"])
    assert torch.allclose(second, want, atol=TOL) and second.abs().max() > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        f(q, x, y)  # said once per loss_fn, not per call
        with torch.no_grad():  # no graph wanted: the fast method, silently
            fast = f(q, x, y)
    ref = fp.per_sample_grads(per_example, method="vmap")(p, x, y)
    assert all(fast[k].grad_fn is None and torch.allclose(fast[k], ref[k], atol=TOL) for k in ref)


def test_method_validation():
    with pytest.raises(ValueError, match=r"`method` must be one of \('auto', 'vmap', 'hooks'\), got 'fast'"):
        fp.per_sample_grads(lambda p, x: x, method="fast")


# -- float32 on CPU: the grouped weight-gradient path (NOTE [grouped weight gradients on CPU]) --


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), (3, 4, 7, 8)),
    (lambda: nn.Conv2d(4, 6, (2, 4), padding="same", dilation=(1, 2)), (3, 4, 7, 8)),
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2), (3, 4, 9)),
    (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2), (3, 4, 5, 5)),
    (lambda: nn.ConvTranspose1d(4, 2, 2, stride=3), (3, 4, 5)),
    # few input channels: the grouped-forward branch where NOTE [first-layer kernels] takes it
    (lambda: nn.Conv2d(1, 3, 5), (4, 1, 12, 12)),
    (lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 3), padding=(1, 2), dilation=(2, 1)), (3, 2, 11, 10)),
    (lambda: nn.Conv2d(1, 2, 4, padding="same", dilation=3), (2, 1, 9, 8)),
    (lambda: nn.Conv1d(2, 3, 3, stride=2, dilation=2, padding=1), (3, 2, 13)),
    (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2), (3, 3, 4, 4)),  # C=2 in the adjoint
])
@pytest.mark.parametrize("chunk_bytes", [None, 1], ids=["whole", "chunks-of-one"])
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_float32_conv_weight_gradients_match_a_float64_loop(make, shape, chunk_bytes, monkeypatch):
    from functorch_pipeline.transforms._grad_sample import _rules

    if chunk_bytes is not None:  # NOTE [grouped chunks]: one example per grouped call
        monkeypatch.setattr(_rules, "_GROUPED_BYTES", chunk_bytes)
        monkeypatch.setattr(_rules, "_GROUPED_CHUNK", chunk_bytes)
    torch.manual_seed(0)
    m = make().float()
    x = torch.randn(*shape, dtype=torch.float32)
    got = fp.per_sample_grads(weighted(m), method="hooks")(params_of(m), x)
    m64 = m.double()
    want = loop_grads(weighted(m64), params_of(m64), x.double())
    for k in want:
        assert got[k].dtype == torch.float32
        scale = want[k].abs().max()
        assert scale > 0 and ((got[k].double() - want[k]).abs().max() / scale) < 1e-5, k


@given(batch=st.integers(1, 600), per_example=st.integers(1, 400_000),
       scratch=st.integers(0, 2_000_000))
@settings(max_examples=300, deadline=None)
def test_grouped_chunks_stay_under_the_limit(batch, per_example, scratch):
    """NOTE [oneDNN scratch]: every grouped call's tensors plus oneDNN's buffer stay under
    _GROUPED_BYTES (unless one example alone is over it), a batch that fits is one call,
    and the scratch-driven split is even (no call more than one example larger)."""
    from functorch_pipeline.transforms._grad_sample._rules import _GROUPED_BYTES
    from functorch_pipeline.transforms._grad_sample._rules import grouped_step

    step = grouped_step(batch, per_example, scratch)
    assert step >= 1 and step <= batch
    calls = -(-batch // step)
    if batch * (per_example + scratch) <= _GROUPED_BYTES:
        assert step == batch
    elif per_example + scratch <= _GROUPED_BYTES:
        assert step * (per_example + scratch) <= _GROUPED_BYTES
        if batch * per_example <= _GROUPED_BYTES:  # the even split, as few calls as fit
            assert step - (batch - (calls - 1) * step) < calls  # sizes differ by < calls
            # one call fewer would put more than the limit in some call
            assert calls == 1 or -(-batch // (calls - 1)) * (per_example + scratch) > _GROUPED_BYTES
    else:
        assert step == 1


def test_conv2_of_the_mnist_cnn_is_split_for_onednn_scratch(monkeypatch):
    """The measured case (NOTE [oneDNN scratch]): conv2 of the MNIST CNN at batch 256 runs
    as two calls of 128 at 1 and 2 threads (in float32 and bfloat16) and in ~19-example
    calls at 16, while conv1 (the grouped-forward branch) and a layer whose channels are
    multiples of 8 (no such buffer) stay one call."""
    from functorch_pipeline.transforms._grad_sample import _rules

    calls = []
    monkeypatch.setattr(_rules, "_grouped_once", lambda x, g, kernel, *a: calls.append(x.shape[0])
                        or torch.zeros(x.shape[0], g.shape[1], x.shape[1] // a[-1], *kernel, dtype=x.dtype))
    f32 = {"dtype": torch.float32}
    x, g = torch.zeros(256, 10, 12, 12, **f32), torch.zeros(256, 20, 8, 8, **f32)
    for threads, want in ((1, [128, 128]), (2, [128, 128])):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=threads: t)
        calls.clear()
        _rules.conv_weight_grouped(x, g, (5, 5), (1, 1), [0, 0, 0, 0], (1, 1), 1)
        assert calls == want, threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    calls.clear()
    _rules.conv_weight_grouped(x, g, (5, 5), (1, 1), [0, 0, 0, 0], (1, 1), 1)
    assert sum(calls) == 256 and 15 <= max(calls) <= 20
    # bfloat16 inputs: mkldnn's buffer is still float32 (30.8 MB measured at 2 threads)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    calls.clear()
    bf16 = {"dtype": torch.bfloat16}
    _rules.conv_weight_grouped(torch.zeros(256, 10, 12, 12, **bf16), torch.zeros(256, 20, 8, 8, **bf16),
                               (5, 5), (1, 1), [0, 0, 0, 0], (1, 1), 1)
    assert calls == [128, 128]
    calls.clear()
    _rules.conv_weight_grouped(torch.zeros(256, 1, 28, 28, **f32), torch.zeros(256, 10, 24, 24, **f32), (5, 5),
                               (1, 1), [0, 0, 0, 0], (1, 1), 1)
    assert calls == [256]
    # channels in multiples of 8 (dp_mnist's conv2, 16 -> 32): no such buffer, one call
    calls.clear()
    _rules.conv_weight_grouped(torch.zeros(240, 16, 13, 13, **f32), torch.zeros(240, 32, 5, 5, **f32),
                               (4, 4), (2, 2), [0, 0, 0, 0], (1, 1), 1)
    assert calls == [240]
    # ... but the same layer per group of a grouped conv with 12 -> 16 channels a group is
    calls.clear()
    _rules.conv_weight_grouped(torch.zeros(240, 24, 13, 13, **f32), torch.zeros(240, 32, 5, 5, **f32),
                               (4, 4), (2, 2), [0, 0, 0, 0], (1, 1), 2)
    assert len(calls) > 1 and sum(calls) == 240


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (5, 3, 6, 6)),  # stride 2: not the forward branch
    (lambda: nn.Conv2d(4, 6, 3, stride=2, groups=2), (7, 4, 9, 9)),
])
def test_scratch_driven_chunks_give_the_whole_batch_numbers(make, shape, monkeypatch):
    """Uneven scratch-driven chunks (7 examples as 4 + 3, 5 as 3 + 2) give each example's
    gradient as one call does (float32), and match the float64 loop."""
    from functorch_pipeline.transforms._grad_sample import _kernel_choice
    from functorch_pipeline.transforms._grad_sample import _rules

    # the grouped kernel, whatever this machine measures (NOTE [measured kernel choice]),
    # and no measuring runs: they would call _grouped_once too (the key holds the thread
    # count, which this test fakes below)
    monkeypatch.setattr(_kernel_choice, "pick", lambda key, default, candidates, *a, **k: candidates[default]())
    torch.manual_seed(0)
    m = make().float()
    x = torch.randn(*shape, dtype=torch.float32)
    whole = fp.per_sample_grads(weighted(m), method="hooks")(params_of(m), x)
    weight = m.weight.numel() * 4
    per_example = (x[0].numel() + m(x)[0].numel()) * 4 + weight
    # a limit that holds half the batch (rounded up) with its scratch: two calls
    monkeypatch.setattr(_rules, "_GROUPED_BYTES", -(-shape[0] // 2) * (per_example + 4 * 2 * weight))
    monkeypatch.setattr(_rules, "_SCRATCH_PER_THREAD", 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    seen = []
    once = _rules._grouped_once
    monkeypatch.setattr(_rules, "_grouped_once", lambda x, *a: seen.append(x.shape[0]) or once(x, *a))
    got = fp.per_sample_grads(weighted(m), method="hooks")(params_of(m), x)
    assert len(seen) == 2 and sum(seen) == shape[0] and abs(seen[0] - seen[1]) <= 1
    m64 = m.double()
    want = loop_grads(weighted(m64), params_of(m64), x.double())
    for k in want:
        torch.testing.assert_close(got[k], whole[k], rtol=1e-6, atol=1e-7)
        assert ((got[k].double() - want[k]).abs().max() / want[k].abs().max()) < 1e-5, k


# -- an empty batch (Poisson sampling draws one now and then) ------------------------------


@pytest.mark.parametrize("method", ["auto", "hooks", "vmap"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Conv2d(3, 4, 3), (3, 8, 8)),
    (lambda: nn.Conv2d(1, 4, 3), (1, 8, 8)),  # the grouped-forward kernel's branch
    (lambda: nn.Linear(5, 3), (5,)),
])
def test_an_empty_batch_gives_empty_per_example_gradients(make, shape, dtype, method):
    """Zero examples: values (0,) and gradients (0, *param.shape), as the per-example loop
    over no examples (and JAX's vmap of grad) gives; before, the engine's kernels raised
    (mkldnn refuses zero groups, a reshape with -1 of nothing) and vmap raised too."""
    m = make().to(dtype)
    params = params_of(m)
    x = torch.zeros(0, *shape, dtype=dtype)
    values, grads = fp.per_sample_value_and_grad(weighted(m), method=method)(params, x)
    assert values.shape == (0,) and values.dtype == dtype
    for k, p in params.items():
        assert grads[k].shape == (0, *p.shape) and grads[k].dtype == dtype, k
    # DP-SGD on it: nothing to clip, the sum is zero (optim's clipping takes (0, ...) leaves)
    summed, clipped = fp.optim.per_example_global_norm_clip(list(grads.values()), 1.0)
    assert all(torch.equal(s, torch.zeros_like(p)) for s, p in zip(summed, params.values(), strict=True))
    assert int(clipped) == 0


def test_an_empty_batch_passes_the_aux_through():
    m = nn.Linear(4, 2).double()

    def loss(p, x):
        out = torch.func.functional_call(m, p, (x,))
        return out.sum(1), {"logits": out}

    (values, aux), grads = fp.per_sample_value_and_grad(loss, has_aux=True)(
        params_of(m), torch.zeros(0, 4, dtype=torch.float64))
    assert values.shape == (0,) and aux["logits"].shape == (0, 2)
    assert grads["weight"].shape == (0, 2, 4)
