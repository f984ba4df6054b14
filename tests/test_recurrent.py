"""fp.nn.LSTM / fp.nn.GRU against torch.nn.LSTM / nn.GRU, under vmap, and replace_rnns."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import functorch_pipeline as fp
from functorch_pipeline.nn import GRU
from functorch_pipeline.nn import LSTM
from functorch_pipeline.nn import replace_rnns

PAIRS = {"LSTM": (LSTM, nn.LSTM), "GRU": (GRU, nn.GRU)}
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
FALLBACK = "batching rule"  # torch.func's "performance drop ... batching rule for aten::..."


def _pair(kind: str, dtype: torch.dtype, seed: int = 0, **kw):
    ours_cls, ref_cls = PAIRS[kind]
    ref = ref_cls(**kw).to(dtype)
    ours = ours_cls(**kw).to(dtype)
    with torch.no_grad():
        for p in ref.parameters():  # larger than default init, to exercise the nonlinearities
            p.uniform_(-0.6, 0.6, generator=torch.Generator().manual_seed(seed + p.numel()))
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _states(kind, hx):
    return list(hx) if kind == "LSTM" else [hx]


def _compare(kind, ours, ref, x, hx, dtype):
    """Outputs, final states and gradients wrt input, initial states and every parameter."""
    tol = TOL[dtype]
    inputs = [x] + ([] if hx is None else _states(kind, hx))
    out_o, st_o = ours(x, hx)
    out_r, st_r = ref(x, hx)
    outs_o, outs_r = [out_o, *_states(kind, st_o)], [out_r, *_states(kind, st_r)]
    for a, b in zip(outs_o, outs_r, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    gen = torch.Generator().manual_seed(1)
    cot = [torch.randn(o.shape, generator=gen, dtype=dtype) for o in outs_r]
    g_o = torch.autograd.grad(outs_o, inputs + list(ours.parameters()), cot)
    g_r = torch.autograd.grad(outs_r, inputs + list(ref.parameters()), cot)
    names = ["input", "h0", "c0"][: len(inputs)] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g_o, g_r, strict=True):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m, n=name: f"grad {n}: {m}")


# layout: "seq" (seq, batch, feature), "batch" (batch_first=True) or "unbatched" (seq, feature),
# for which batch_first has no effect (it is set to True there, to check that)
GRID = list(itertools.product(["LSTM", "GRU"], [1, 2], [False, True], ["seq", "batch", "unbatched"],
                              [False, True], [False, True]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "kind,num_layers,bidirectional,layout,bias,with_state", GRID,
    ids=[f"{k}-L{n}-bi{int(b)}-{lay}-bias{int(s)}-h{int(h)}" for k, n, b, lay, s, h in GRID])
def test_matches_torch(kind, num_layers, bidirectional, layout, bias, with_state, dtype):
    unbatched = layout == "unbatched"
    ours, ref = _pair(kind, dtype, input_size=3, hidden_size=5, num_layers=num_layers, bias=bias,
                      batch_first=layout != "seq", bidirectional=bidirectional)
    gen = torch.Generator().manual_seed(2)
    seq, batch, d = 6, 4, 2 if bidirectional else 1
    shape = {"seq": (seq, batch, 3), "batch": (batch, seq, 3), "unbatched": (seq, 3)}[layout]
    x = torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)
    hx = None
    if with_state:
        hshape = (num_layers * d, 5) if unbatched else (num_layers * d, batch, 5)
        h0 = torch.randn(hshape, generator=gen, dtype=dtype, requires_grad=True)
        c0 = torch.randn(hshape, generator=gen, dtype=dtype, requires_grad=True)
        hx = (h0, c0) if kind == "LSTM" else h0
    _compare(kind, ours, ref, x, hx, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bidirectional,with_state,unbatched",
                         [(False, False, False), (True, True, False), (True, False, True), (False, True, True)])
def test_lstm_proj_size_matches_torch(bidirectional, with_state, unbatched, dtype):
    ours, ref = _pair("LSTM", dtype, input_size=3, hidden_size=6, num_layers=2, proj_size=2,
                      bidirectional=bidirectional)
    gen = torch.Generator().manual_seed(3)
    d = 2 if bidirectional else 1
    x = torch.randn((5, 3) if unbatched else (5, 2, 3), generator=gen, dtype=dtype, requires_grad=True)
    hx = None
    if with_state:
        lead = (2 * d,) if unbatched else (2 * d, 2)
        hx = (torch.randn(*lead, 2, generator=gen, dtype=dtype, requires_grad=True),
              torch.randn(*lead, 6, generator=gen, dtype=dtype, requires_grad=True))
    _compare("LSTM", ours, ref, x, hx, dtype)


@settings(max_examples=15, deadline=None)
@given(kind=st.sampled_from(["LSTM", "GRU"]), input_size=st.integers(1, 6),
       hidden=st.integers(1, 7), seq=st.integers(1, 9), batch=st.integers(1, 5),
       num_layers=st.integers(1, 3), bidirectional=st.booleans())
def test_matches_torch_varied_sizes(kind, input_size, hidden, seq, batch, num_layers, bidirectional):
    ours, ref = _pair(kind, torch.float64, input_size=input_size, hidden_size=hidden,
                      num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
    x = torch.randn(batch, seq, input_size, dtype=torch.float64, requires_grad=True)
    _compare(kind, ours, ref, x, None, torch.float64)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_same_parameters_names_and_init_as_torch(kind):
    ours_cls, ref_cls = PAIRS[kind]
    kw = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    if kind == "LSTM":
        kw["proj_size"] = 2
    torch.manual_seed(7)
    ref = ref_cls(**kw)
    torch.manual_seed(7)
    ours = ours_cls(**kw)
    assert list(ours.state_dict()) == list(ref.state_dict())
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
        assert a.abs().max() <= 0.5  # uniform(-1/sqrt(4), 1/sqrt(4))
    ours.reset_parameters()
    assert not torch.equal(ours.weight_ih_l0, ref.weight_ih_l0)
    ref.load_state_dict(ours.state_dict())  # and back the other way
    assert torch.equal(ref.weight_hh_l1_reverse, ours.weight_hh_l1_reverse)
    assert [[t.shape for t in w] for w in ours.all_weights] == [[t.shape for t in w] for w in ref.all_weights]
    assert repr(ours).split("(", 1)[1] == repr(ref).split("(", 1)[1]


def test_factory_kwargs_and_attributes():
    lstm = LSTM(2, 3, dtype=torch.float64, device="cpu", batch_first=True, dropout=0.25, num_layers=2)
    assert all(p.dtype == torch.float64 for p in lstm.parameters())
    assert (lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bias, lstm.batch_first,
            lstm.dropout, lstm.bidirectional, lstm.proj_size) == (2, 3, 2, True, True, 0.25, False, 0)
    assert not list(GRU(2, 3, bias=False).state_dict()) == list(GRU(2, 3).state_dict())
    assert list(GRU(2, 3, bias=False).state_dict()) == ["weight_ih_l0", "weight_hh_l0"]


# -- dropout ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_dropout_between_layers_in_training_only(kind, batch_first):
    ours_cls, ref_cls = PAIRS[kind]
    ours = ours_cls(3, 4, num_layers=2, dropout=0.5, bidirectional=True, batch_first=batch_first)
    x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
    # reference: the two layers as separate one-layer torch RNNs with F.dropout between them
    layers = []
    for k in range(2):
        layer = ref_cls(3 if k == 0 else 8, 4, bidirectional=True, batch_first=batch_first)
        layer.load_state_dict({n.replace(f"_l{k}", "_l0"): p for n, p in ours.state_dict().items()
                               if f"_l{k}" in n})
        layers.append(layer)
    torch.manual_seed(11)
    got = ours(x)[0]
    torch.manual_seed(11)
    mid = layers[0](x)[0]
    # fp.nn.LSTM drops a contiguous (batch, seq, feature) tensor (NOTE [batch on axis 0]);
    # bernoulli fills in memory order, so the reference must use the same layout
    mask_input = (mid if batch_first else mid.transpose(0, 1)).contiguous()
    dropped = F.dropout(mask_input, 0.5, training=True)
    want = layers[1](dropped if batch_first else dropped.transpose(0, 1))[0]
    torch.testing.assert_close(got, want)
    ours.eval()
    no_drop = layers[1](layers[0](x)[0])[0]
    torch.testing.assert_close(ours(x)[0], no_drop)
    ours.train()
    assert not torch.allclose(ours(x)[0], no_drop)


def test_dropout_warning_with_one_layer():
    with pytest.warns(UserWarning, match="LSTM: dropout option adds dropout after all but last"):
        LSTM(2, 3, dropout=0.5)


# -- torch.func ---------------------------------------------------------------------------


def _fallback_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if FALLBACK in str(w.message)]


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_vmap_grad_without_fallback_matches_loop(kind):
    ours_cls, ref_cls = PAIRS[kind]
    torch.manual_seed(0)
    ref = ref_cls(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    ours = ours_cls(3, 4, num_layers=2, bidirectional=True, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 6, 3)
    params = {n: p.detach() for n, p in ours.named_parameters()}

    def loss(module):
        return lambda p, xi: functional_call(module, p, (xi.unsqueeze(0),))[0].pow(2).mean()

    grads, fallback = _fallback_warnings(
        lambda: torch.func.vmap(torch.func.grad(loss(ours)), in_dims=(None, 0))(params, x))
    assert fallback == []
    if kind == "LSTM":  # positive control: the same check sees torch's fallback for nn.LSTM
        _, ref_fallback = _fallback_warnings(
            lambda: torch.func.vmap(torch.func.grad(loss(ref)), in_dims=(None, 0))(params, x))
        assert any("mkldnn_rnn_layer" in m for m in ref_fallback)
    # (nn.GRU under vmap(grad) fails outright in torch 2.14 with a shape error.)
    for i in range(x.shape[0]):
        ref.zero_grad()
        ref(x[i : i + 1])[0].pow(2).mean().backward()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, atol=1e-5, rtol=1e-5)


def test_vmap_over_unbatched_examples_matches_torch():
    torch.manual_seed(0)
    ref = nn.LSTM(3, 4, proj_size=2, bidirectional=True)
    ours = LSTM(3, 4, proj_size=2, bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 6, 3)
    h0, c0 = torch.randn(5, 2, 2), torch.randn(5, 2, 4)
    out, (h, c) = torch.func.vmap(ours)(x, (h0, c0))
    for i in range(5):
        ro, (rh, rc) = ref(x[i], (h0[i], c0[i]))
        torch.testing.assert_close(out[i], ro)
        torch.testing.assert_close(h[i], rh)
        torch.testing.assert_close(c[i], rc)


class TextClassifier(nn.Module):
    """Embedding(5000, 64) -> 2-layer bidirectional LSTM(64, 64) -> Dropout -> Linear(128, 64)
    -> ReLU -> mean over time -> Linear(64, 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5000, 64)
        self.lstm = nn.LSTM(64, 64, num_layers=2, bidirectional=True, batch_first=True)
        self.drop = nn.Dropout(0.5)
        self.fc1 = nn.Linear(128, 64)
        self.fc2 = nn.Linear(64, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.drop(self.lstm(self.emb(tokens))[0])
        return self.fc2(F.relu(self.fc1(out)).mean(1))


def test_per_sample_grads_text_classifier_matches_loop():
    torch.manual_seed(0)
    reference = TextClassifier().eval()  # eval: Dropout off, so examples are deterministic
    model = replace_rnns(reference)
    assert isinstance(model.lstm, LSTM)
    tokens = torch.randint(0, 5000, (4, 12))
    labels = torch.randint(0, 2, (4,))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss_fn(p, tok, lab):
        return F.cross_entropy(functional_call(model, p, (tok,)), lab)

    grads, fallback = _fallback_warnings(lambda: fp.per_sample_grads(loss_fn)(params, tokens, labels))
    assert fallback == []
    for i in range(tokens.shape[0]):  # independent reference: nn.LSTM and autograd, one by one
        reference.zero_grad()
        F.cross_entropy(reference(tokens[i : i + 1]), labels[i : i + 1]).backward()
        for name, p in reference.named_parameters():
            assert grads[name].shape == (4, *p.shape)
            torch.testing.assert_close(grads[name][i], p.grad, atol=1e-5, rtol=1e-5)


# -- replace_rnns -------------------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.GRU(4, 4, batch_first=True)
        self.blocks = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.lstm = nn.LSTM(4, 4, num_layers=2, dropout=0.3, batch_first=True, bidirectional=True)
        self.grus = nn.ModuleList([shared, shared])
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(self.lstm(self.blocks(x))[0])
        for g in self.grus:
            y = g(y)[0]
        return y


def test_replace_rnns_keeps_weights_and_outputs_and_leaves_input_alone():
    torch.manual_seed(0)
    model = Mixed().eval()
    model.lstm.weight_hh_l1.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    params_before = list(model.parameters())
    rng = torch.get_rng_state()
    new = replace_rnns(model)
    assert torch.equal(torch.get_rng_state(), rng)  # no draws from the global generator
    # the input is untouched
    assert type(model.lstm) is nn.LSTM and type(model.grus[0]) is nn.GRU
    assert all(a is b for a, b in zip(model.parameters(), params_before, strict=True))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the copy holds fp layers with the same weights
    assert type(new.lstm) is LSTM and type(new.grus[0]) is GRU
    assert new.grus[0] is new.grus[1]  # sharing kept
    assert new.lstm.dropout == 0.3 and not new.training and not new.lstm.training
    assert not new.lstm.weight_hh_l1.requires_grad
    assert list(new.state_dict()) == list(model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in new.state_dict().items())
    assert not any(a is b for a, b in zip(new.parameters(), model.parameters(), strict=True))
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(new(x), model(x), atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        next(new.parameters()).add_(1.0)
    assert torch.equal(next(model.parameters()), before["blocks.0.weight"])


def test_replace_rnns_on_a_bare_rnn_and_other_modules():
    lstm = nn.LSTM(2, 3, proj_size=1).double()
    new = replace_rnns(lstm)
    assert type(new) is LSTM and new.proj_size == 1 and new.weight_ih_l0.dtype == torch.float64
    x = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(new(x)[0], lstm(x)[0])
    lin = nn.Linear(2, 2)
    out = replace_rnns(lin)
    assert out is not lin and torch.equal(out.weight, lin.weight)
    class MyRNN(nn.RNN):  # a subclass may have its own forward: left alone
        pass

    with pytest.warns(UserWarning, match=r"left `0` \(MyRNN\) unchanged"):
        kept = replace_rnns(nn.Sequential(MyRNN(2, 2)))
    assert type(kept[0]) is MyRNN
    assert type(replace_rnns(nn.Sequential(nn.RNN(2, 2)))[0]) is fp.nn.RNN


def test_replace_rnns_errors():
    with pytest.raises(TypeError, match=r"replace_rnns\(module\): expected an nn.Module"):
        replace_rnns({"a": 1})
    m = nn.Sequential(nn.LSTM(2, 3))
    torch.nn.utils.parametrizations.weight_norm(m[0], "weight_hh_l0")
    with pytest.raises(TypeError, match="`0` .*has parametrizations"):
        replace_rnns(m)
    h = nn.Sequential(nn.GRU(2, 3))
    h[0].register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="hooks on `0` are not carried over"):
        replace_rnns(h)


# -- bad input ----------------------------------------------------------------------------


def test_bad_inputs_lstm():
    lstm = LSTM(4, 5, num_layers=2)
    with pytest.raises(ValueError, match="LSTM: Expected input to be 2D or 3D, got 4D instead"):
        lstm(torch.randn(3, 2, 4, 1))
    with pytest.raises(RuntimeError, match=r"LSTM: input.size\(-1\) must be equal to input_size. Expected 4, got 3"):
        lstm(torch.randn(3, 2, 3))
    with pytest.raises(RuntimeError, match=r"LSTM: Expected hx size \(2, 2, 5\), got \[2, 2, 4\]"):
        lstm(torch.randn(3, 2, 4), (torch.zeros(2, 2, 4), torch.zeros(2, 2, 5)))
    with pytest.raises(RuntimeError, match=r"LSTM: Expected cx size \(2, 2, 5\), got \[2, 3, 5\]"):
        lstm(torch.randn(3, 2, 4), (torch.zeros(2, 2, 5), torch.zeros(2, 3, 5)))
    with pytest.raises(RuntimeError, match="LSTM: For unbatched 2-D input, hx should also be 2-D but got a 3-D"):
        lstm(torch.randn(3, 4), (torch.zeros(2, 1, 5), torch.zeros(2, 1, 5)))
    with pytest.raises(RuntimeError, match="LSTM: For batched 3-D input, hx should also be 3-D but got a 2-D"):
        lstm(torch.randn(3, 2, 4), (torch.zeros(2, 5), torch.zeros(2, 5)))
    with pytest.raises(TypeError, match=r"LSTM: hx must be a tuple \(h_0, c_0\)"):
        lstm(torch.randn(3, 2, 4), torch.zeros(2, 2, 5))
    with pytest.raises(TypeError, match="LSTM: cx must be a Tensor, got NoneType"):
        lstm(torch.randn(3, 2, 4), (torch.zeros(2, 2, 5), None))
    with pytest.raises(ValueError, match=r"LSTM: input dtype \(torch.float64\) does not match weight dtype"):
        lstm(torch.randn(3, 2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"LSTM: hx dtype \(torch.float64\) does not match input dtype"):
        lstm(torch.randn(3, 2, 4), (torch.zeros(2, 2, 5, dtype=torch.float64), torch.zeros(2, 2, 5)))
    with pytest.raises(RuntimeError, match="LSTM: input has sequence length 0"):
        lstm(torch.randn(0, 2, 4))
    with pytest.raises(TypeError, match="LSTM: input must be a Tensor, got list"):
        lstm([1.0])
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(3, 2, 4), [3, 2])
    with pytest.raises(NotImplementedError, match="LSTM: PackedSequence input is not supported"):
        lstm(packed)
    with pytest.raises(RuntimeError, match=r"LSTM: Expected hx size \(2, 2, 2\)"):
        LSTM(4, 5, num_layers=2, proj_size=2)(torch.randn(3, 2, 4), (torch.zeros(2, 2, 5), torch.zeros(2, 2, 5)))


def test_bad_inputs_gru():
    gru = GRU(4, 5, bidirectional=True, batch_first=True)
    with pytest.raises(RuntimeError, match=r"GRU: input.size\(-1\) must be equal to input_size"):
        gru(torch.randn(2, 3, 5))
    with pytest.raises(RuntimeError, match=r"GRU: Expected hx size \(2, 2, 5\), got \[1, 2, 5\]"):
        gru(torch.randn(2, 3, 4), torch.zeros(1, 2, 5))
    with pytest.raises(TypeError, match="GRU: hx must be a Tensor h_0, got tuple"):
        gru(torch.randn(2, 3, 4), (torch.zeros(2, 2, 5),))
    with pytest.raises(ValueError, match="GRU: Expected input to be 2D or 3D, got 1D"):
        gru(torch.randn(4))
    with pytest.raises(TypeError, match="proj_size"):
        GRU(4, 5, proj_size=2)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dropout=1.5), ValueError, r"LSTM: dropout should be a number in range \[0, 1\]"),
    (dict(dropout=True), ValueError, r"LSTM: dropout should be a number in range \[0, 1\]"),
    (dict(hidden_size=0), ValueError, "LSTM: hidden_size must be greater than zero"),
    (dict(num_layers=0), ValueError, "LSTM: num_layers must be greater than zero"),
    (dict(proj_size=-1), ValueError, "LSTM: proj_size should be a positive integer or zero"),
    (dict(proj_size=5), ValueError, "LSTM: proj_size has to be smaller than hidden_size"),
    (dict(hidden_size=5.0), TypeError, "LSTM: hidden_size should be of type int, got float"),
    (dict(input_size=-1), ValueError, "LSTM: input_size must be non-negative"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    full = dict(input_size=4, hidden_size=5) | kwargs
    with pytest.raises(error, match=match):
        LSTM(**full)


@pytest.mark.parametrize("batch_first", [True, False])
def test_keyed_dropout_per_sample_grads_match_loop(batch_first):
    """Train mode through fp.functionalize: fp.nn.LSTM's inter-layer dropout draws from the
    per-example keys (NOTE [batch on axis 0]), so vmap equals a loop."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.lstm = LSTM(8, 8, num_layers=2, bidirectional=True, dropout=0.4, batch_first=batch_first)
            self.fc = nn.Linear(16, 2)

        def forward(self, tok: torch.Tensor) -> torch.Tensor:
            e = self.emb(tok)
            out = self.lstm(e if batch_first else e.transpose(0, 1))[0]
            return self.fc(out if batch_first else out.transpose(0, 1)).mean(1)

    model = fp.functionalize(Net())
    variables = model.init(fp.random.key(0))
    tokens, labels = torch.randint(0, 50, (4, 7)), torch.randint(0, 2, (4,))
    keys = fp.random.split(fp.random.key(1), 4)

    def loss_fn(params, tok, lab, key):
        out, _ = model.apply({"params": params, "buffers": {}}, tok, train=True, key=key)
        return F.cross_entropy(out, lab)

    train_out = model.apply(variables, tokens, train=True, key=keys)[0]
    assert not torch.allclose(train_out, model.apply(variables, tokens))  # the dropout is live
    grads = fp.per_sample_grads(loss_fn)(variables["params"], tokens, labels, keys)
    for i in range(4):
        want = torch.func.grad(loss_fn)(variables["params"], tokens[i : i + 1], labels[i : i + 1], keys[i : i + 1])
        for name, g in want.items():
            torch.testing.assert_close(grads[name][i], g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_forward_mode_agrees_with_reverse_mode(kind):
    """jacfwd (forward-mode AD) and jacrev through the layer agree: every op has both rules."""
    layer = PAIRS[kind][0](2, 3, num_layers=2, bidirectional=True, dtype=torch.float64)
    layer.flatten_parameters()  # nn.LSTM API, a no-op here
    x = torch.randn(4, 1, 2, dtype=torch.float64)
    f = lambda x: layer(x)[0]  # noqa: E731
    torch.testing.assert_close(torch.func.jacfwd(f)(x), torch.func.jacrev(f)(x), atol=1e-12, rtol=1e-10)
