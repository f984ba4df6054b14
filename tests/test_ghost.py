"""fp.clipped_grad / fp.per_sample_grad_norms (ghost, hooks, vmap) against a Python loop of
torch.autograd over examples (float64, 1e-10), plus fp.per_sample_grads as a second
reference for the norms."""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads
from per_example_reference import params_of
from test_grad_sample_zoo import attention_loss
from test_grad_sample_zoo import masked_attention
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline.transforms import _grad_sample
from functorch_pipeline.transforms._grad_sample import _ghost_math
from functorch_pipeline.transforms._grad_sample import _rules

TOL = 1e-10
# Defaults, captured once: hypothesis runs many examples under one monkeypatch fixture.
CHUNK, PATCH, KEEP = _ghost_math.CHUNK_BYTES, _ghost_math.PATCH_BYTES, _ghost_math.KEEP_BYTES
METHODS = ("ghost", "hooks", "vmap")
FAST = settings(max_examples=6, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


def squared(module: nn.Module):
    """Per-example losses: the squared output of ``module`` summed per example."""

    def loss(p, x):
        out = torch.func.functional_call(module, p, (x,))
        out = out[0] if isinstance(out, tuple) else out
        return (out ** 2).flatten(1).sum(1)

    return loss


def reference(loss_fn, params, batch, max_norm, reduction="sum", per=None):
    """Norms and clipped sum from the per-example loop, clipped by hand."""
    per = loop_grads(loss_fn, params, *batch) if per is None else per
    b = batch[0].shape[0]
    norms = torch.stack([g.reshape(b, -1).square().sum(1) for g in per.values()]).sum(0).sqrt()
    scale = torch.clamp(max_norm / norms, max=1.0)
    clipped = {k: (g * scale.reshape(-1, *[1] * (g.dim() - 1))).sum(0) for k, g in per.items()}
    if reduction == "mean":
        clipped = {k: v / b for k, v in clipped.items()}
    return norms, clipped


def assert_close(got, want, what):
    err = (got - want).abs().max().item()
    scale = max(1.0, want.abs().max().item())
    assert err <= TOL * scale, f"{what}: max error {err:.3e}"


def check(loss_fn, params, *batch, methods=METHODS, clip_quantile=0.5, **kw):
    """Every method's norms and clipped sum against the loop, with ``max_norm`` at the
    median norm so that some examples are clipped and some are not."""
    per = loop_grads(loss_fn, params, *batch)
    ref_norms, _ = reference(loss_fn, params, batch, 1.0, per=per)
    max_norm = float(ref_norms.quantile(clip_quantile)) + 1e-3
    _, want = reference(loss_fn, params, batch, max_norm, kw.get("reduction", "sum"), per=per)
    for method in methods:
        g, norms = fp.clipped_grad(loss_fn, max_norm, method=method, **kw)(params, *batch)
        assert_close(norms, ref_norms, f"{method} norms")
        assert g.keys() == want.keys()
        for k in want:
            assert_close(g[k], want[k], f"{method} clipped {k}")
        n2 = fp.per_sample_grad_norms(loss_fn, method=method)(params, *batch)
        assert_close(n2, ref_norms, f"{method} per_sample_grad_norms")


def test_linear_flat():
    torch.manual_seed(0)
    m = nn.Linear(5, 3)
    check(squared(m), params_of(m), torch.randn(6, 5))


def test_linear_sequence():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    check(squared(m), params_of(m), torch.randn(5, 7, 4))


class SeqFirst(nn.Module):
    """A batch-first Linear, then a sequence-first stack on ``(T, B, H)`` activations
    (LayerNorm, Linear, RMSNorm), as inside ``batch_first=False`` layers."""

    def __init__(self, fin: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(fin, hidden)
        self.norm = nn.LayerNorm(hidden, bias=bias)
        self.mid = nn.Linear(hidden, 3, bias=bias)
        self.rms = nn.RMSNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x)).transpose(0, 1)
        return self.rms(self.mid(self.norm(h))).transpose(0, 1)


@FAST
@given(b=st.integers(1, 4), t=st.sampled_from([1, 2, 3, 5]), fin=st.integers(1, 4),
       hidden=st.integers(2, 5), bias=st.booleans())
@example(b=3, t=3, fin=2, hidden=3, bias=True)  # T == B: padded
@example(b=2, t=2, fin=2, hidden=3, bias=False)  # T == B: padded
@example(b=1, t=5, fin=2, hidden=3, bias=False)  # (T, 1, H)
@example(b=4, t=1, fin=3, hidden=4, bias=True)  # (1, B, H)
def test_sequence_first_activations(b, t, fin, hidden, bias):
    """NOTE [sequence-first inputs]: every method against the loop, also when T == B
    (NOTE [padding an ambiguous batch]: the padding rows change neither the norms nor the
    clipped sum)."""
    torch.manual_seed(b * 100 + t * 10 + fin)
    m = SeqFirst(fin, hidden, bias)
    check(squared(m), params_of(m), torch.randn(b, t, fin))


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_sequence_first_token_ids(padding_idx):
    """``(B, T)`` token ids transposed to ``(T, B)`` before the embedding (a view of the
    batch, NOTE [sequence-first inputs]), then a sequence-first Linear: every method
    against the loop."""
    torch.manual_seed(3)
    emb, head = nn.Embedding(7, 4, padding_idx=padding_idx), nn.Linear(4, 2)
    m = nn.ModuleDict({"emb": emb, "head": head})

    def loss(p, tok):
        h = F.embedding(tok.transpose(0, 1), p["emb.weight"], padding_idx)  # (T, B, 4)
        out = F.linear(torch.tanh(h), p["head.weight"], p["head.bias"])
        return out.pow(2).sum((0, 2))

    tok = torch.randint(0, 7, (3, 5))
    tok[0, :2] = 0
    check(loss, params_of(m), tok)


@pytest.mark.parametrize("norm_first", [False, True])
def test_sequence_first_transformer_layer(norm_first, recwarn):
    """A ``batch_first=False`` encoder layer behind a batch-first projection: attention's
    rule re-computes it with ``F.linear`` calls (NOTE [attention through the linear rule]),
    so ghost clipping takes it, and the layer's sequence-first Linear/LayerNorm uses
    (NOTE [sequence-first inputs]): every method, and auto without a fallback warning,
    gives the loop's norms and clipped sum."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0, norm_first=norm_first)
    proj = nn.Linear(4, 6)
    m = nn.ModuleDict({"proj": proj, "layer": layer})

    def loss(p, x):
        h = torch.func.functional_call(m["proj"], {k[5:]: v for k, v in p.items()
                                                   if k.startswith("proj.")}, (x,))
        h = torch.func.functional_call(m["layer"], {k[6:]: v for k, v in p.items()
                                                    if k.startswith("layer.")}, (h.transpose(0, 1),))
        return h.transpose(0, 1).pow(2).flatten(1).sum(1)

    x = torch.randn(3, 5, 4)
    check(loss, params_of(m), x, methods=("ghost", "hooks", "vmap", "auto"))
    assert not [w for w in recwarn if "falls back" in str(w.message)]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kw, inputs", [
    (dict(), "self"),
    (dict(add_bias_kv=True, add_zero_attn=True), "kv"),
    (dict(kdim=6, vdim=5), "cross"),
    (dict(bias=False), "cross"),
])
def test_multihead_attention(batch_first, kw, inputs):
    """``nn.MultiheadAttention`` under ghost clipping: packed and separate projections,
    cross-attention (one weight used by three inputs of two lengths), ``bias_k``/``bias_v``
    and zero attention (per-example copies of a parameter), both layouts."""
    torch.manual_seed(2)
    m = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kw)
    loss = attention_loss(m, seq_first=not batch_first)

    x = torch.randn(3, 5, 8)
    if inputs == "self":
        check(lambda p, x: loss(p, x, x, x), params_of(m), x)
    elif inputs == "kv":
        kv = torch.randn(3, 4, 8)
        check(lambda p, x, kv: loss(p, x, kv, kv), params_of(m), x, kv)
    else:
        check(loss, params_of(m), x, torch.randn(3, 4, kw.get("kdim", 8)),
              torch.randn(3, 4, kw.get("vdim", 8)))


@pytest.mark.parametrize("kw, mask", [
    (dict(need_weights=False), "key_padding_mask"),  # scaled_dot_product_attention
    (dict(need_weights=True, attn_mask="random"), "key_padding_mask"),  # explicit softmax
    (dict(need_weights=False, is_causal=True, attn_mask="causal"), None),
])
def test_multihead_attention_masks(kw, mask):
    """Masked attention under every method: the masks change which positions each
    example's gradient reaches, never which example (padding rows differ per example)."""
    m, loss, batch = masked_attention(kw, mask)
    check(loss, params_of(m), *batch)


def check_float32_ghost(module, p64, x):
    """Ghost clipping of ``module`` in float32 (mkldnn kernels) against the float64 loop,
    to float32 accuracy."""
    ref_norms, want = reference(squared(module), p64, (x,), 0.5)
    p32 = {n: v.float() for n, v in p64.items()}
    g, norms = fp.clipped_grad(squared(module), 0.5, method="ghost")(p32, x.float())
    torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-5, atol=1e-5)
    for n in want:
        torch.testing.assert_close(g[n].double(), want[n], rtol=1e-5, atol=1e-5)


def one_by_one(monkeypatch, on):
    """Chunk budgets of one byte: every chunked loop runs one example at a time."""
    monkeypatch.setattr(_ghost_math, "CHUNK_BYTES", 1 if on else CHUNK)
    monkeypatch.setattr(_ghost_math, "PATCH_BYTES", 1 if on else PATCH)


@FAST
@given(b=st.integers(1, 4), t=st.sampled_from([1, 5, 6]), fin=st.integers(1, 6), fout=st.integers(1, 5),
       bias=st.booleans(), ratio=st.sampled_from([0.0, 1.0, 1e9]), keep=st.booleans())
def test_linear_shapes(b, t, fin, fout, bias, ratio, keep, monkeypatch):
    """2-d and 3-d inputs; GRAM_RATIO 0 forces materialising, 1e9 the T x T Gram; KEEP_BYTES
    0 turns off keeping formed per-example gradients for the clipped sum (the hooks
    contract: no axis but the first may have the batch size, hence T > B)."""
    monkeypatch.setattr(_ghost_math, "GRAM_RATIO", ratio)
    monkeypatch.setattr(_ghost_math, "KEEP_BYTES", KEEP if keep else 0)
    one_by_one(monkeypatch, b % 2 == 0)
    torch.manual_seed(b * 100 + t)
    m = nn.Linear(fin, fout, bias=bias)
    x = torch.randn(b, t, fin) if t > 1 else torch.randn(b, fin)
    check(squared(m), params_of(m), x)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@FAST
@given(nd=st.sampled_from([1, 2]), b=st.integers(1, 4), groups=st.sampled_from([1, 2]),
       k=st.integers(1, 3), stride=st.integers(1, 2), padding=st.sampled_from([0, 1, "same"]),
       dilation=st.integers(1, 2), bias=st.booleans(), ratio=st.sampled_from([0.0, 1e9]),
       keep=st.booleans())
def test_conv(nd, b, groups, k, stride, padding, dilation, bias, ratio, keep, monkeypatch):
    if padding == "same":
        stride = 1  # torch: padding='same' needs stride 1
    monkeypatch.setattr(_ghost_math, "GRAM_RATIO", ratio)
    monkeypatch.setattr(_ghost_math, "KEEP_BYTES", KEEP if keep else 0)
    one_by_one(monkeypatch, b % 2 == 0)
    torch.manual_seed(k * 10 + stride)
    conv = (nn.Conv1d, nn.Conv2d)[nd - 1](2 * groups, 3 * groups, k, stride=stride,
                                           padding=padding, dilation=dilation, groups=groups,
                                           bias=bias)
    x = torch.randn(b, 2 * groups, *([7] * nd))
    check(squared(conv), params_of(conv), x)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@FAST
@given(nd=st.sampled_from([1, 2]), groups=st.sampled_from([1, 2]), k=st.integers(1, 3),
       stride=st.integers(1, 2), padding=st.sampled_from([0, 1, "same"]),
       dilation=st.integers(1, 2), cin=st.sampled_from([1, 2, 3]), chunked=st.booleans(),
       keep=st.booleans())
def test_conv_float32_grouped_kernel(nd, groups, k, stride, padding, dilation, cin, chunked, keep,
                                     monkeypatch):
    """float32 on CPU takes mkldnn's grouped weight-gradient kernel (NOTE [per-example conv
    gradients]; a grouped forward for few input channels, NOTE [first-layer kernels]): against the float64
    loop, to float32 accuracy."""
    if padding == "same":
        stride = 1
    one_by_one(monkeypatch, chunked)
    monkeypatch.setattr(_ghost_math, "GRAM_RATIO", 0.0)
    monkeypatch.setattr(_ghost_math, "KEEP_BYTES", KEEP if keep else 0)
    torch.manual_seed(k + stride)
    conv = (nn.Conv1d, nn.Conv2d)[nd - 1](cin * groups, 3 * groups, k, stride=stride,
                                           padding=padding, dilation=dilation, groups=groups)
    p64 = params_of(conv)
    x = torch.randn(3, cin * groups, *([6] * nd))
    check_float32_ghost(conv, p64, x)


@pytest.mark.parametrize("cin", [1, 2, 3, 7])
@pytest.mark.parametrize(("kernel", "stride", "dilation", "forward"), [
    ((3, 2), 1, 1, True), ((3, 2), 2, 1, False), ((3, 2), 1, 2, True), ((3, 2), 2, 3, False),
    ((6, 7), 2, 1, True), ((6, 6), 2, 2, True), ((7, 5), 2, 1, False)])
def test_conv_first_layer_float32(cin, kernel, stride, dilation, forward, monkeypatch):
    """Fewer than 8 input channels in float32 take a grouped *forward* convolution in which
    stride and dilation trade places when every stride is 1 or every kernel side is at
    least ``2 * stride + 2`` (NOTE [first-layer kernels]), else the backward-weights
    kernel: every pairing against the float64 loop, and the branch taken as the NOTE says."""
    from functorch_pipeline.transforms._grad_sample import _rules

    taken = []
    branch = _rules._forward_branch

    def spy(*args):
        taken.append(branch(*args))
        return taken[-1]

    monkeypatch.setattr(_rules, "_forward_branch", spy)
    monkeypatch.setattr(_ghost_math, "GRAM_RATIO", 0.0)
    torch.manual_seed(7 * stride + dilation + cin)
    conv = nn.Conv2d(cin, 3, kernel, stride=stride, padding=1, dilation=dilation)
    p64 = params_of(conv)
    x = torch.randn(4, cin, 17, 16)
    check_float32_ghost(conv, p64, x)
    assert taken and set(taken) == {forward}


def test_conv_tuple_geometry_and_padding_modes():
    torch.manual_seed(19)
    conv = nn.Conv2d(2, 4, (2, 3), stride=(1, 2), padding=(1, 0), dilation=(2, 1))
    check(squared(conv), params_of(conv), torch.randn(3, 2, 7, 8))
    conv = nn.Conv1d(2, 3, 3, padding=2, padding_mode="circular")
    check(squared(conv), params_of(conv), torch.randn(3, 2, 6), methods=("ghost",))


def test_conv_gram_and_materialise_agree_on_wide_layer():
    """A layer where the Gram path is chosen by cost (few positions, many channels)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3)
    check(squared(conv), params_of(conv), torch.randn(3, 8, 4, 4))


@FAST
@given(b=st.integers(1, 4), t=st.integers(5, 12), vocab=st.integers(2, 6),
       padding_idx=st.sampled_from([None, 0, -1]))
def test_embedding_repeated_indices_and_padding(b, t, vocab, padding_idx):
    torch.manual_seed(b + t + vocab)
    emb = nn.Embedding(vocab, 3, padding_idx=padding_idx)
    idx = torch.randint(0, vocab, (b, t))  # vocab < t: indices repeat within an example
    check(squared(emb), params_of(emb), idx)


def test_layer_norm_and_group_norm():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 8))
    check(squared(m), params_of(m), torch.randn(5, 3, 4))
    m = nn.Sequential(nn.Conv1d(2, 6, 3), nn.GroupNorm(3, 6), nn.Conv1d(6, 2, 2))
    check(squared(m), params_of(m), torch.randn(4, 2, 8))


def test_instance_norm_and_rms_norm():
    torch.manual_seed(16)
    m = nn.Sequential(nn.Conv1d(2, 4, 2), nn.InstanceNorm1d(4, affine=True), nn.Conv1d(4, 3, 2))
    check(squared(m), params_of(m), torch.randn(3, 2, 7))
    m = nn.Sequential(nn.Linear(3, 5), nn.RMSNorm(5), nn.Linear(5, 2))
    check(squared(m), params_of(m), torch.randn(4, 6, 3))


def test_batch_norm_eval():
    torch.manual_seed(5)
    m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 2))
    m[1].running_mean.uniform_(-1, 1)
    m[1].running_var.uniform_(0.5, 2)
    m.eval()
    check(squared(m), params_of(m), torch.randn(3, 2, 6, 6))


@FAST
@given(cell=st.sampled_from(["LSTM", "GRU", "RNN"]), layers=st.integers(1, 2),
       bidirectional=st.booleans(), batch_first=st.booleans(), t=st.sampled_from([1, 2, 4]),
       ratio=st.sampled_from([0.0, 1e9]))
def test_recurrent(cell, layers, bidirectional, batch_first, t, ratio, monkeypatch):
    monkeypatch.setattr(_ghost_math, "GRAM_RATIO", ratio)
    torch.manual_seed(layers * 7 + t)
    rnn = getattr(fp.nn, cell)(3, 4, num_layers=layers, bidirectional=bidirectional,
                               batch_first=batch_first)
    x = torch.randn(3, t, 3)

    def loss(p, x):
        out, _ = torch.func.functional_call(rnn, p, (x if batch_first else x.transpose(0, 1),))
        out = out if batch_first else out.transpose(0, 1)
        return (out ** 2).sum((1, 2))

    check(loss, params_of(rnn), x)


def test_lstm_with_projection():
    torch.manual_seed(6)
    rnn = fp.nn.LSTM(3, 5, proj_size=2, batch_first=True)
    check(squared(rnn), params_of(rnn), torch.randn(3, 4, 3))


class MixedCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, groups=2)
        self.fc = nn.Linear(6 * 3 * 3, 5)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.norm(self.conv1(x))), 2, 1)
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


def test_mixed_cnn_cross_entropy_sum_mean_and_chunks():
    torch.manual_seed(7)
    model = MixedCNN()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 5, (6,))

    def loss(p, x, y):
        out = torch.func.functional_call(model, p, (x,))
        return F.cross_entropy(out, y, reduction="none")

    check(loss, params_of(model), x, y)
    check(loss, params_of(model), x, y, reduction="mean", methods=("ghost",))
    check(loss, params_of(model), x, y, chunk_size=4, methods=("ghost", "hooks"))


def test_norms_also_match_per_sample_grads():
    torch.manual_seed(8)
    model = MixedCNN()
    x = torch.randn(4, 1, 8, 8)
    loss, params = squared(model), params_of(model)
    per = fp.per_sample_grads(loss, method="vmap")(params, x)
    want = torch.stack([g.reshape(4, -1).square().sum(1) for g in per.values()]).sum(0).sqrt()
    assert_close(fp.per_sample_grad_norms(loss, method="ghost")(params, x), want, "norms")


def tied_loss(p, idx):
    h = torch.tanh(F.embedding(idx, p["w"], padding_idx=1))
    return F.linear(h, p["w"]).square().sum((1, 2))


@pytest.mark.parametrize("chunked", [False, True])
def test_tied_embedding_and_output_head(chunked, monkeypatch):
    """One weight used by F.embedding and F.linear (weight tying): the cross term of the
    two parts; and, with a third use (as a layer norm's weight), its gradient formed a
    chunk of examples at a time."""
    one_by_one(monkeypatch, chunked)
    torch.manual_seed(9)
    w = torch.randn(7, 3)
    idx = torch.randint(0, 7, (4, 5))
    check(tied_loss, {"w": w}, idx)

    def three_uses(p, idx):
        o = F.linear(torch.tanh(F.embedding(idx, p["w"])), p["w"])  # (B, 5, 7)
        return F.layer_norm(o.mT[..., :3], (7, 3), p["w"]).square().sum((1, 2))

    check(three_uses, {"w": w}, idx, methods=("ghost", "vmap"))


def test_ghost_forms_no_per_example_gradient_of_big_layers(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a per-example gradient was formed")

    def small_merge(kind, parts, param):
        assert param.numel() <= 100, f"a ({kind}) per-example gradient of {param.numel()} formed"
        return _rules.merge(kind, parts, param)

    monkeypatch.setattr(_ghost_math, "_materialised", boom)
    monkeypatch.setattr(_ghost_math, "merge", small_merge)
    monkeypatch.setattr(_ghost_math, "GRAM_RATIO", 1e9)
    torch.manual_seed(10)
    model = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 4))
    check(squared(model), params_of(model), torch.randint(0, 50, (4, 6)), methods=("ghost",))
    check(tied_loss, {"w": torch.randn(50, 8)}, torch.randint(0, 50, (4, 6)), methods=("ghost",))


def test_has_aux_argnums_and_value():
    """Two differentiated arguments (argnums=(0, 1)), the batch in argument 2, aux."""
    torch.manual_seed(11)
    m1, m2 = nn.Linear(3, 4), nn.Linear(4, 2)
    p, q = params_of(m1), params_of(m2)
    x = torch.randn(5, 3)

    def loss(p, q, x):
        h = torch.tanh(torch.func.functional_call(m1, p, (x,)))
        return torch.func.functional_call(m2, q, (h,)).square().sum(1), h.sum()

    def flat(pq, x):
        return loss({k[2:]: v for k, v in pq.items() if k[0] == "p"},
                    {k[2:]: v for k, v in pq.items() if k[0] == "q"}, x)[0]

    pq = {**{"p." + k: v for k, v in p.items()}, **{"q." + k: v for k, v in q.items()}}
    ref_norms, want = reference(flat, pq, (x,), 0.5)
    for method in METHODS:
        (g, norms), aux = fp.clipped_grad(loss, 0.5, argnums=(0, 1), batch_argnums=(2,),
                                          has_aux=True, method=method)(p, q, x)
        assert_close(norms, ref_norms, f"{method} norms")
        for k in pq:
            assert_close(g[0 if k[0] == "p" else 1][k[2:]], want[k], f"{method} {k}")
        (v, _), (_, n2) = fp.clipped_value_and_grad(
            loss, 0.5, argnums=(0, 1), batch_argnums=(2,), has_aux=True, method=method)(p, q, x)
        assert_close(v, loss(p, q, x)[0].detach(), f"{method} values")
        assert_close(n2, ref_norms, f"{method} norms")
    (g, norms), aux = fp.clipped_grad(loss, 0.5, argnums=(0, 1), has_aux=True,
                                      method="ghost")(p, q, x)
    assert_close(aux, loss(p, q, x)[1].detach(), "aux")


def test_float32_and_tensor_max_norm():
    torch.manual_seed(12)
    m = nn.Linear(4, 3).float()
    p = {k: v.detach().float() for k, v in m.named_parameters()}
    x = torch.randn(5, 6, 4, dtype=torch.float32)
    loss = squared(m)
    g, norms = fp.clipped_grad(loss, torch.tensor(1.0), method="ghost")(p, x)
    assert norms.dtype == torch.float32 and g["weight"].dtype == torch.float32
    ref_norms, want = reference(loss, {k: v.double() for k, v in p.items()}, (x.double(),), 1.0)
    torch.testing.assert_close(norms.double(), ref_norms, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g["weight"].double(), want["weight"], rtol=1e-5, atol=1e-5)


def test_inputs_unchanged_and_no_graph():
    torch.manual_seed(13)
    m = MixedCNN()
    p = params_of(m)
    before = {k: v.clone() for k, v in p.items()}
    x = torch.randn(3, 1, 8, 8)
    x0 = x.clone()
    g, norms = fp.clipped_grad(squared(m), 1.0, method="ghost")(p, x)
    assert all(torch.equal(p[k], before[k]) for k in p) and torch.equal(x, x0)
    assert not norms.requires_grad and not any(v.requires_grad for v in g.values())


def test_infinite_max_norm_is_the_batch_gradient():
    torch.manual_seed(14)
    m = MixedCNN()
    p, x = params_of(m), torch.randn(3, 1, 8, 8)
    g, _ = fp.clipped_grad(squared(m), float("inf"), method="ghost")(p, x)
    want = torch.func.grad(lambda p: squared(m)(p, x).sum())(p)
    for k in p:
        assert_close(g[k], want[k], k)


# -- methods, fallbacks and errors ----------------------------------------------------------


@_grad_sample.overridable
def _scale(x, w):
    return x * w


def _scale_rule(engine, args, kwargs):
    """A hooks-only rule (per-example gradients materialised as ``"direct"`` parts)."""
    x, w = args
    slot = engine.slot(w)
    xin = x if x.requires_grad else x.detach().requires_grad_()
    out = xin * engine.base(w)
    engine.record(out, lambda e, g, x: e.add("direct", slot, (g * x).sum(1)), x)
    return out


@pytest.fixture
def scale_rule(monkeypatch):
    monkeypatch.setitem(_rules.RULES, _scale, _scale_rule)


def scale_model():
    lin = nn.Linear(3, 3)

    def loss(p, x):
        h = torch.func.functional_call(lin, p["lin"], (x,))
        return _scale(h, p["scale"]).square().sum((1, 2))

    return loss, {"lin": params_of(lin), "scale": torch.randn(3)}


def test_ghost_refuses_a_hooks_only_layer_naming_path_call_and_method(scale_rule):
    loss, p = scale_model()
    x = torch.randn(4, 5, 3)
    with pytest.raises(ValueError, match=r"clipped_grad\(loss_fn, max_norm\): method='ghost': "
                       r"`scale` is used by `.*_scale`, which has no ghost-clipping rule; "
                       r"method='hooks' handles it"):
        fp.clipped_grad(loss, 1.0, method="ghost")(p, x)
    with pytest.raises(ValueError, match=r"per_sample_grad_norms\(loss_fn\): method='ghost': "
                       r"`scale` .*method='hooks' handles it"):
        fp.per_sample_grad_norms(loss, method="ghost")(p, x)


def test_auto_falls_back_to_hooks_and_warns_once(scale_rule):
    loss, p = scale_model()
    x = torch.randn(4, 5, 3)
    flat_p = {"lin." + k: v for k, v in p["lin"].items()} | {"scale": p["scale"]}

    def flat_loss(fp_, x):
        return loss({"lin": {k[4:]: v for k, v in fp_.items() if k.startswith("lin.")},
                     "scale": fp_["scale"]}, x)

    ref_norms, want = reference(flat_loss, flat_p, (x,), 1.0)
    clipped = fp.clipped_grad(loss, 1.0)
    with pytest.warns(UserWarning, match=r"method='auto' uses 'hooks' \(ghost: `scale`"):
        g, norms = clipped(p, x)
    assert_close(norms, ref_norms, "norms")
    assert_close(g["scale"], want["scale"], "scale")
    assert_close(g["lin"]["weight"], want["lin.weight"], "weight")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipped(p, x)  # the choice is kept: no second warning
        fp.clipped_grad(loss, 1.0)(p, x)  # nor for a new wrapper of the same loss_fn


def test_ghost_refuses_a_call_without_any_rule_and_auto_uses_vmap():
    torch.manual_seed(15)
    w = torch.randn(3, 2)
    x = torch.randn(4, 3)

    def loss(p, x):
        return torch.linalg.matmul(x, p["w"]).square().sum(1)

    for method in ("ghost", "hooks"):
        with pytest.raises(ValueError, match=rf"clipped_grad\(loss_fn, max_norm\): "
                           rf"method='{method}': `w` is used by `torch._C._linalg.linalg_matmul`.*"
                           r"method='vmap' handles"):
            fp.clipped_grad(loss, 1.0, method=method)({"w": w}, x)
    with pytest.warns(UserWarning, match=r"method='auto' uses 'vmap' \(ghost: `w` is used by "
                      r"`torch._C._linalg.linalg_matmul`"):
        g, norms = fp.clipped_grad(loss, 1.0)({"w": w}, x)
    ref_norms, want = reference(loss, {"w": w}, (x,), 1.0)
    assert_close(norms, ref_norms, "norms")
    assert_close(g["w"], want["w"], "w")


def test_conv3d_and_transposed_convs_in_ghost_and_builtin_lstm():
    """Conv3d and the transposed convolutions form their per-example gradients in ghost
    clipping too (as in hooks), so a video model's other layers keep ghost's saving and
    ``auto`` takes ghost with no warning; a built-in nn.LSTM has no rule at all: the error
    points to fp.nn.replace_rnns."""
    torch.manual_seed(17)
    for model, x in ((nn.Sequential(nn.Conv3d(1, 2, 2), nn.Flatten(), nn.Linear(54, 3)),
                      torch.randn(3, 1, 4, 4, 4)),
                     (nn.Sequential(nn.ConvTranspose2d(2, 3, 3, stride=2), nn.GroupNorm(1, 3)),
                      torch.randn(3, 2, 4, 4)),
                     (nn.ConvTranspose1d(2, 3, 3), torch.randn(3, 2, 5))):
        check(squared(model), params_of(model), x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fp.clipped_grad(squared(model), 1.0)(params_of(model), x)
    lstm = nn.LSTM(2, 3, batch_first=True)
    with pytest.raises(ValueError, match=r"method='ghost': .*replace_rnns"):
        fp.per_sample_grad_norms(squared(lstm), method="ghost")(params_of(lstm), torch.randn(2, 4, 2))


def test_scalar_loss_is_an_error_for_ghost():
    m = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"method='ghost': loss_fn returned a scalar; ghost "
                       r"clipping needs the per-example losses, a tensor of shape \(4,\)"):
        fp.clipped_grad(lambda p, x: squared(m)(p, x).mean(), 1.0, method="ghost")(
            params_of(m), torch.randn(4, 3))


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1", True, torch.ones(2),
                                 torch.tensor(0.0), torch.tensor(-1.0), torch.tensor(float("nan"))])
def test_bad_max_norm(bad):
    with pytest.raises(ValueError, match=r"clipped_grad\(loss_fn, max_norm\): `max_norm` must be"):
        fp.clipped_grad(lambda p, x: x, bad)


def test_bad_method_reduction_chunk_size():
    with pytest.raises(ValueError, match=r"clipped_grad\(loss_fn, max_norm\): `method` must be "
                       r"one of \('auto', 'ghost', 'hooks', 'vmap'\), got 'fast'"):
        fp.clipped_grad(lambda p, x: x, 1.0, method="fast")
    with pytest.raises(ValueError, match=r"`reduction` must be one of \('sum', 'mean'\), got 'max'"):
        fp.clipped_grad(lambda p, x: x, 1.0, reduction="max")
    with pytest.raises(ValueError, match=r"per_sample_grad_norms\(loss_fn\): `chunk_size` must be"):
        fp.per_sample_grad_norms(lambda p, x: x, chunk_size=0)


def test_wrong_loss_shape_and_batch_mismatch():
    m = nn.Linear(3, 2)
    p = params_of(m)
    with pytest.raises(ValueError, match=r"clipped_grad\(loss_fn, max_norm\): loss_fn must return "
                       r"per-example losses of shape \(4,\) \(floating point\), got shape \(4, 2\)"):
        fp.clipped_grad(lambda p, x: torch.func.functional_call(m, p, (x,)), 1.0,
                        method="ghost")(p, torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"batch leaves disagree on the batch size"):
        fp.clipped_grad(lambda p, x, y: squared(m)(p, x) + y, 1.0, method="ghost")(
            p, torch.randn(4, 3), torch.randn(5))


@pytest.mark.parametrize("method", ("auto", *METHODS))
def test_empty_batch_gives_zero_sum_and_no_norms(method):
    """Poisson sampling can draw an empty batch."""
    m = nn.Linear(3, 2)
    (losses, aux), ((g, norms)) = fp.clipped_value_and_grad(
        lambda p, x: (squared(m)(p, x), x.shape[0]), 1.0, has_aux=True, method=method,
        reduction="mean")(params_of(m), torch.randn(0, 3))
    assert losses.shape == (0,) and norms.shape == (0,) and aux == 0
    assert all(torch.equal(v, torch.zeros_like(v)) for v in g.values())


def test_non_float_parameter_names_its_path():
    with pytest.raises(TypeError, match=r"clipped_grad\(loss_fn, max_norm\): can only differentiate "
                       r"with respect to floating-point tensors, but argument 0 at path `steps` "
                       r"has dtype torch.int64"):
        fp.clipped_grad(lambda p, x: F.linear(x, p["w"]).sum(1), 1.0, method="ghost")(
            {"w": torch.ones(2, 3), "steps": torch.tensor(3)}, torch.randn(4, 3))


def test_parameter_as_an_input_points_to_vmap():
    w = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"per_sample_grad_norms\(loss_fn\): method='ghost': `w` "
                       r"is used as the input of `F.linear`.*method='vmap' handles"):
        fp.per_sample_grad_norms(lambda p, x: F.linear(p["w"], x).sum((1, 2)), method="ghost")(
            {"w": w}, torch.randn(2, 5, 3))


def test_unused_parameter_gets_zeros():
    torch.manual_seed(18)
    p = {"w": torch.randn(2, 3), "unused": torch.randn(5)}
    x = torch.randn(4, 3)

    def loss(p, x):
        return F.linear(x, p["w"]).square().sum(1)

    check(loss, p, x)


class _WeightStandardisedConv(nn.Conv2d):
    """A conv whose weight is standardised per output channel in the forward (De et al.'s
    DP-trained WideResNets, NF-ResNets): a weight derived from the parameter."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


@pytest.mark.parametrize("batch", [1, 4])
def test_ghost_takes_weight_standardised_convolutions(batch):
    """The ghost conv rule forms a derived weight's per-example gradients and passes them
    back (NOTE [derived parameters]), so ghost keeps every other layer; it used to hand the
    whole model to hooks."""
    torch.manual_seed(0)
    model = nn.Sequential(_WeightStandardisedConv(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                          _WeightStandardisedConv(4, 4, 3, stride=2), nn.Flatten(), nn.Linear(16, 3))
    params = params_of(model)
    x, y = torch.randn(batch, 3, 6, 6), torch.randint(0, 3, (batch,))

    def losses(p, x, y):
        return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y, reduction="none")

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto must not fall back
        check(losses, params, x, y, methods=("ghost", "auto"))


def test_the_ghost_rule_table_is_built_once_per_change_of_the_rules(monkeypatch):
    """``ghost_rules()`` is cached (rebuilding it cost ~90 us a call) and rebuilt when the
    rules change: a rule added, replaced or removed (``register_rule`` or a dict write)."""
    from functorch_pipeline.transforms._grad_sample import _ghost

    table = _ghost.ghost_rules()
    assert _ghost.ghost_rules() is table
    monkeypatch.setitem(_rules.RULES, _scale, _scale_rule)
    added = _ghost.ghost_rules()
    assert added is not table and _scale in added and _scale not in table
    monkeypatch.setitem(_rules.RULES, _scale, lambda engine, args, kwargs: None)
    assert _ghost.ghost_rules() is not added
    monkeypatch.undo()
    assert _scale not in _ghost.ghost_rules()


# -- NOTE [a Gram sum below zero] --------------------------------------------------------------


class _RepeatedTokenPool(nn.Module):
    """Attention pooling (a softmax over the positions of a learned score) of a sequence
    whose positions are one repeated token: the score's gradient cancels over positions."""

    def __init__(self, T: int, F_: int, H: int) -> None:
        super().__init__()
        self.score = nn.Linear(F_, H, bias=False)
        self.out = nn.Linear(F_ * H, 1)
        self.register_buffer("pos", torch.randn(T, F_))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.score(x).softmax(1)  # (B, T, H)
        return self.out(torch.einsum("bth,btf->bhf", a, x + self.pos).flatten(1)).squeeze(1)


class _ConstantSignalConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.out = nn.Conv1d(16, 16, 3), nn.Linear(16 * 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.instance_norm(self.conv(x)).flatten(1)).squeeze(1)


@pytest.mark.parametrize("make, shape, trained", [
    (lambda: _RepeatedTokenPool(3, 32, 8), (4, 1, 32, 3), "score."),  # Linear's Gram path
    (lambda: _ConstantSignalConv(), (4, 16, 1, 8), "conv."),  # the conv's Gram path
], ids=["linear", "conv"])
def test_norms_that_cancel_to_zero_are_not_nan(make, shape, trained):
    # The Gram sums of examples whose gradient cancels to ~0 rounded below zero: NaN norms,
    # NaN clip factors and a NaN clipped sum for the whole batch, from ghost and auto.
    torch.manual_seed(0)
    m = make()
    B, a, b, reps = shape
    x = torch.randn(B, a, b).expand(-1, reps, -1) if a == 1 else torch.randn(B, a, b).expand(-1, -1, reps)
    x = x.clone()
    params = {k: v for k, v in params_of(m).items() if k.startswith(trained)}
    frozen = {k: v for k, v in params_of(m).items() if not k.startswith(trained)}
    y = torch.randn(B)

    def loss(p, x, y):
        return (torch.func.functional_call(m, {**frozen, **p}, (x,)) - y) ** 2

    per = loop_grads(loss, params, x, y)
    ref_norms, ref_clipped = reference(loss, params, (x, y), 1.0, per=per)
    assert float(ref_norms.max()) < 1e-8  # the case: gradients that cancel
    for method in ("ghost", "auto"):
        clipped, norms = fp.clipped_grad(loss, 1.0, method=method)(params, x, y)
        assert bool(torch.isfinite(norms).all()) and bool((norms >= 0).all()), (method, norms)
        assert float((norms - ref_norms).abs().max()) < 1e-4  # Gram rounding, absolute
        for k in ref_clipped:
            assert_close(clipped[k], ref_clipped[k], f"{method} {k}")
        got = fp.per_sample_grad_norms(loss, method=method)(params, x, y)
        assert bool(torch.isfinite(got).all())


@pytest.mark.parametrize("call", ["clipped_grad", "per_sample_grads hooks"])
def test_aux_over_chunks(call):
    # NOTE [aux over chunks]: with chunk_size the fast methods joined each chunk's aux: an
    # accuracy of 0.6 over the batch came back as [0., 1., 1.], a (K,) mean as (3K,). A
    # per-example aux still joins into the batch's; a statistic of each chunk is refused.
    torch.manual_seed(3)
    w, b = torch.randn(4, 3), torch.randn(4)
    x, y = torch.randn(5, 3), torch.randint(0, 4, (5,))

    def loss(p, x, y, stat):
        logits = F.linear(x, p["w"], p["b"])
        aux = {"pred": logits.argmax(1), "tag": "run"}
        if stat:
            aux["acc"] = (logits.argmax(1) == y).float().mean()
        return F.cross_entropy(logits, y, reduction="none"), aux

    def run(chunk, stat):
        f = lambda p, x, y: loss(p, x, y, stat)  # noqa: E731
        if call == "clipped_grad":
            return fp.clipped_grad(f, 1.0, has_aux=True, chunk_size=chunk)({"w": w, "b": b}, x, y)[1]
        return fp.per_sample_grads(f, has_aux=True, method="hooks", chunk_size=chunk)(
            {"w": w, "b": b}, x, y)[1]

    whole, chunked = run(None, False), run(2, False)
    assert torch.equal(chunked["pred"], whole["pred"]) and chunked["pred"].shape == (5,)
    assert chunked["tag"] == "run"
    with pytest.raises(ValueError, match=r"with chunk_size, the aux at `acc` must have each "
                                         r"chunk's examples on axis 0.*got shape \(\)"):
        run(2, True)
