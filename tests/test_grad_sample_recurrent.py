"""fp.nn.RNN against nn.RNN, the fused GRU rule and fp.nn.RNN under per_sample_grads(hooks)
against a per-example autograd loop (float64, 1e-10), replace_rnns on all three built-in
recurrent layers, and the errors that point built-in RNNs to replace_rnns."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import params_of
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline.nn import recurrent as _recurrent
from functorch_pipeline.transforms import _grad_sample

TOL = 1e-10


def loop_grads(loss_fn, params, *batch):
    rows = []
    for i in range(batch[0].shape[0]):
        p = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        loss = loss_fn(p, *(b[i:i + 1] for b in batch))
        grads = torch.autograd.grad(loss.sum(), list(p.values()), allow_unused=True)
        rows.append([torch.zeros_like(v) if g is None else g for v, g in zip(p.values(), grads, strict=True)])
    return {k: torch.stack([r[j] for r in rows]) for j, k in enumerate(params)}


def assert_matches(loss_fn, params, *batch, method="hooks"):
    got = fp.per_sample_grads(loss_fn, method=method)(params, *batch)
    want = loop_grads(loss_fn, params, *batch)
    for k in want:
        assert want[k].abs().max() > 0, k
        assert torch.allclose(got[k], want[k], atol=TOL, rtol=0), (k, (got[k] - want[k]).abs().max())
    return got


def seq_loss(module, batch_first=True):
    """Per-example losses from the output sequence and the final state, weighted per step."""

    def loss(p, x):
        out, state = torch.func.functional_call(module, p, (x if batch_first else x.transpose(0, 1),))
        if not batch_first:
            out = out.transpose(0, 1)
        h = state[0] if isinstance(state, tuple) else state
        w = torch.linspace(-1, 1, out.shape[1])[:, None]
        return (out * w).pow(2).sum((1, 2)) + h.transpose(0, 1).pow(3).sum((1, 2))

    return loss


# -- fp.nn.RNN --------------------------------------------------------------------------------


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("num_layers, bidirectional, batch_first, bias",
                         [(1, False, False, True), (2, True, True, True), (2, False, True, False)])
def test_rnn_matches_torch(nonlinearity, num_layers, bidirectional, batch_first, bias):
    torch.manual_seed(0)
    ref = nn.RNN(3, 4, num_layers, nonlinearity, bias, batch_first, bidirectional=bidirectional)
    ours = fp.nn.RNN(3, 4, num_layers, nonlinearity, bias, batch_first, bidirectional=bidirectional)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(*((2, 5, 3) if batch_first else (5, 2, 3)), requires_grad=True)
    h0 = torch.randn(num_layers * (2 if bidirectional else 1), 2, 4, requires_grad=True)
    out_o, h_o = ours(x, h0)
    out_r, h_r = ref(x, h0)
    assert torch.allclose(out_o, out_r, atol=TOL) and torch.allclose(h_o, h_r, atol=TOL)
    cot = torch.randn_like(out_r)
    g_o = torch.autograd.grad((out_o * cot).sum() + h_o.sum(), [x, h0, *ours.parameters()])
    g_r = torch.autograd.grad((out_r * cot).sum() + h_r.sum(), [x, h0, *ref.parameters()])
    assert all(torch.allclose(a, b, atol=TOL) for a, b in zip(g_o, g_r, strict=True))


def test_rnn_same_init_and_errors():
    torch.manual_seed(3)
    ref = nn.RNN(3, 4, 2, "relu")
    torch.manual_seed(3)
    ours = fp.nn.RNN(3, 4, 2, "relu")
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), ref.parameters(), strict=True))
    assert "nonlinearity=relu" in repr(ours)
    with pytest.raises(ValueError, match="RNN: Unknown nonlinearity 'gelu'"):
        fp.nn.RNN(3, 4, nonlinearity="gelu")
    with pytest.raises(TypeError, match="RNN: hx must be a Tensor"):
        ours(torch.randn(2, 3, 3), (torch.zeros(2, 3, 4),))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_rnn_per_sample_grads_match_loop(nonlinearity):
    torch.manual_seed(0)
    m = fp.nn.RNN(3, 4, 2, nonlinearity, bidirectional=True, batch_first=True)
    x = torch.randn(3, 5, 3)
    for method in ("hooks", "auto", "vmap"):
        assert_matches(seq_loss(m), params_of(m), x, method=method)


# -- the fused GRU rule -----------------------------------------------------------------------


@pytest.mark.parametrize("num_layers, bidirectional, batch_first, bias",
                         [(1, False, True, True), (1, True, False, True), (2, True, True, False)])
def test_gru_fused_rule_matches_loop(num_layers, bidirectional, batch_first, bias):
    torch.manual_seed(0)
    m = fp.nn.GRU(3, 4, num_layers, bias, batch_first, bidirectional=bidirectional)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(-0.8, 0.8)
    assert_matches(seq_loss(m, batch_first), params_of(m), torch.randn(3, 6, 3))


def test_gru_rule_is_registered_and_used(monkeypatch):
    calls = []
    real = _grad_sample.gru_direction_rule

    def spy(engine, args, kwargs):
        calls.append(1)
        return real(engine, args, kwargs)

    monkeypatch.setitem(_grad_sample._rules.RULES, _recurrent._gru_direction, spy)
    m = fp.nn.GRU(2, 3, batch_first=True)
    fp.per_sample_grads(seq_loss(m), method="hooks")(params_of(m), torch.randn(2, 4, 2))
    assert calls == [1]


def test_gru_fused_rule_passes_input_and_state_gradients_on():
    """Gradients that flow *through* the fused GRU (to an embedding before it and a learned
    initial state) are the per-example ones."""
    torch.manual_seed(0)
    emb, gru = nn.Embedding(7, 3), fp.nn.GRU(3, 4, batch_first=True)
    p = {"emb": emb.weight.detach(), "h0": torch.randn(4, 1), **{f"gru.{k}": v for k, v in params_of(gru).items()}}

    def loss(p, t):
        x = F.embedding(t, p["emb"])
        h0 = F.linear(torch.ones(t.shape[0], 1), p["h0"]).unsqueeze(0)  # a learned h0
        out, h = torch.func.functional_call(gru, {k[4:]: v for k, v in p.items() if k.startswith("gru.")}, (x, h0))
        return out.pow(2).sum((1, 2)) + h[0].sum(1)

    assert_matches(loss, p, torch.randint(0, 7, (3, 5)))


def test_lstm_and_gru_and_rnn_classifier_with_replace_rnns_matches_loop():
    """A model built from built-in recurrent layers: replace_rnns, then the default method
    (the fused rules) equals the per-example loop over the *built-in* model."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 4)
            self.lstm = nn.LSTM(4, 3, batch_first=True, bidirectional=True)
            self.gru = nn.GRU(6, 3, batch_first=True)
            self.rnn = nn.RNN(3, 2, batch_first=True, nonlinearity="relu")
            self.fc = nn.Linear(2, 2)

        def forward(self, t):
            h = self.rnn(self.gru(self.lstm(self.emb(t))[0])[0])[0]
            return self.fc(h.mean(1))

    net = Net()
    fast = fp.nn.replace_rnns(net)
    t, y = torch.randint(0, 11, (4, 6)), torch.randint(0, 2, (4,))
    with torch.no_grad():
        assert torch.allclose(fast(t), net(t), atol=TOL)

    def ce(model):
        return lambda p, t, y: F.cross_entropy(torch.func.functional_call(model, p, (t,)), y, reduction="none")

    got = fp.per_sample_grads(ce(fast))(params_of(fast), t, y)
    want = loop_grads(ce(net), params_of(net), t, y)
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)


# -- replace_rnns ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: nn.LSTM(3, 4, 2, bidirectional=True, proj_size=2),
    lambda: nn.GRU(3, 4, 2, batch_first=True, dropout=0.2),
    lambda: nn.RNN(3, 4, 2, "relu", bidirectional=True),
    lambda: nn.RNN(3, 4, bias=False),
])
def test_replace_rnns_gives_the_built_in_numbers(make):
    torch.manual_seed(0)
    ref = make().eval()
    new = fp.nn.replace_rnns(nn.Sequential(ref))[0]
    assert type(new).__name__ == type(ref).__name__ and type(new).__module__.startswith("functorch_pipeline")
    assert not new.training
    x = torch.randn(5, 2, 3, requires_grad=True)
    out_n, st_n = new(x)
    out_r, st_r = ref(x)
    assert torch.allclose(out_n, out_r, atol=TOL, rtol=0)
    for a, b in zip(st_n if isinstance(st_n, tuple) else (st_n,), st_r if isinstance(st_r, tuple) else (st_r,),
                    strict=True):
        assert torch.allclose(a, b, atol=TOL, rtol=0)
    g_n = torch.autograd.grad(out_n.pow(2).sum(), [x, *new.parameters()])
    g_r = torch.autograd.grad(out_r.pow(2).sum(), [x, *ref.parameters()])
    assert all(torch.allclose(a, b, atol=TOL, rtol=0) for a, b in zip(g_n, g_r, strict=True))


# -- errors for built-in recurrent layers -----------------------------------------------------


@pytest.mark.parametrize("make, kernel", [(lambda: nn.LSTM(2, 3, batch_first=True), "torch.lstm"),
                                          (lambda: nn.GRU(2, 3, batch_first=True), "torch.gru"),
                                          (lambda: nn.RNN(2, 3, batch_first=True), "torch.rnn_tanh")])
def test_built_in_rnns_point_to_replace_rnns(make, kernel):
    m = make()
    loss = seq_loss(m)
    x = torch.randn(2, 4, 2)
    with pytest.raises(ValueError, match=rf"method='hooks'.*`weight_ih_l0`.*`{kernel}`.*fp.nn.replace_rnns\(module\)"):
        fp.per_sample_grads(loss, method="hooks")(params_of(m), x)
    # float64 under vmap: the fused kernels have no batching rule and crash inside torch.func
    match = rf"built-in nn.{type(m).__name__} failed under vmap.*fp.nn.replace_rnns"
    with pytest.raises(RuntimeError, match=match):
        fp.per_sample_grads(loss, method="vmap")(params_of(m), x)
    with pytest.raises(RuntimeError, match=match), pytest.warns(UserWarning, match="replace_rnns"):
        fp.per_sample_grads(loss)(params_of(m), x)  # auto: hooks says it once, then vmap fails


def test_packed_sequences_get_errors_that_point_to_padded_input():
    # Packing inside loss_fn: vmap failed in torch's stacking ("stack expects each tensor to
    # be equal size"), and fp.nn's refusal pointed back to nn.LSTM outside vmap.
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, batch_first=True).double()
    x, lengths = torch.randn(3, 5, 3, dtype=torch.float64), torch.tensor([5, 3, 2])
    for module in (lstm, fp.nn.replace_rnns(lstm)):
        params = {k: v.detach() for k, v in module.named_parameters()}

        def loss(p, x, lengths, module=module):
            packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                             enforce_sorted=False)
            return torch.func.functional_call(module, p, (packed,))[1][0][-1].pow(2).sum(-1)

        match = (r"cannot batch a PackedSequence made inside loss_fn.*padded tensor.*"
                 r"out\[torch.arange\(B\), lengths - 1\]" if module is lstm else
                 r"LSTM: PackedSequence input is not supported; pass the padded tensor.*"
                 r"out\[torch.arange\(B\), lengths - 1\]")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # auto's fall-back note
            with pytest.raises((RuntimeError, NotImplementedError), match=match):
                fp.per_sample_grads(loss)(params, x, lengths)
            with pytest.raises((RuntimeError, NotImplementedError), match=match):
                fp.clipped_grad(loss, 1.0)(params, x, lengths)


def test_packed_bidirectional_input_gets_advice_that_holds():
    # The padded-input advice was given for bidirectional layers too, where the reverse
    # direction of a padded sequence starts in its padding (0.11 from packed nn.LSTM).
    torch.manual_seed(0)
    bi = torch.nn.LSTM(3, 4, batch_first=True, bidirectional=True).double()
    x, lengths = torch.randn(3, 5, 3, dtype=torch.float64), torch.tensor([5, 3, 2])
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                     enforce_sorted=False)
    with pytest.raises(NotImplementedError, match="reverse direction starts in the padding"):
        fp.nn.replace_rnns(bi)(packed)
    want, _ = torch.nn.utils.rnn.pad_packed_sequence(bi(packed)[0], batch_first=True)
    # the advice: two unidirectional layers, the second on each sequence reversed in its length
    fwd, rev = (fp.nn.LSTM(3, 4, batch_first=True).double() for _ in range(2))
    for layer, suffix in ((fwd, ""), (rev, "_reverse")):
        layer.load_state_dict({f"{k}_l0": getattr(bi, f"{k}_l0{suffix}") for k in
                               ("weight_ih", "weight_hh", "bias_ih", "bias_hh")})
    t = torch.arange(5)
    index = (lengths[:, None] - 1 - t).clamp(min=0)  # (B, T)
    out_f = fwd(x)[0]
    out_r = rev(x.gather(1, index[..., None].expand(-1, -1, 3)))[0]
    back = out_r.gather(1, index[..., None].expand(-1, -1, 4))  # step t of the sequence
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(torch.cat([out_f[b, :n], back[b, :n]], -1), want[b, :n],
                                   rtol=0, atol=1e-12)
