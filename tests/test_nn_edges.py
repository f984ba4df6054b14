"""fp.nn edge cases: reassigned buffers, fused RNN argument parsing, fully masked SDPA rows,
parametrized init, state_dict casting, zero-size initialisers. Each is checked against plain
PyTorch running the same module (or torch.nn.init / a closed form)."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as P

import functorch_pipeline as fp
from functorch_pipeline.nn import init as I

D = torch.float64


# ---------------------------------------------------------------- F1: buffers by reassignment
class EMA(nn.Module):
    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.lin = nn.Linear(3, 3)
        self.register_buffer("avg", torch.zeros(3))
        self.register_buffer("n", torch.zeros((), dtype=torch.long))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)

    def forward(self, x):
        y = self.lin(x)
        if self.training:
            m = y.detach().mean(0)
            if self.inplace:
                self.avg.mul_(0.9).add_(0.1 * m)
                self.n += 1
            else:
                self.avg = 0.9 * self.avg + 0.1 * m
                self.n = self.n + 1
                self.scratch = self.scratch + 2
        return y - self.avg


@pytest.mark.parametrize("inplace", [False, True])
def test_train_returns_buffers_updated_by_assignment_or_in_place(inplace):
    torch.manual_seed(0)
    net = EMA(inplace).to(D)
    model = fp.functionalize(net)
    v = model.variables_from_state_dict(net.state_dict())
    before = copy.deepcopy(v)
    x = torch.randn(4, 3, dtype=D)
    out, nb = model.apply(v, x, train=True)
    ref = copy.deepcopy(net).train()
    r = ref(x)
    torch.testing.assert_close(out, r, rtol=0, atol=0)
    expected = dict(ref.named_buffers())
    assert list(nb) == list(expected)
    for name, t in expected.items():
        torch.testing.assert_close(nb[name], t, rtol=0, atol=0)
    assert int(nb["n"]) == 1
    # a second step from the returned state continues the EMA like the module
    out2, nb2 = model.apply({"params": v["params"], "buffers": nb}, x, train=True)
    torch.testing.assert_close(out2, ref(x), rtol=0, atol=0)
    assert int(nb2["n"]) == 2
    # the caller's variables and the wrapped module are never written
    for c in ("params", "buffers"):
        for name, t in before[c].items():
            assert torch.equal(v[c][name], t), name
    assert int(net.n) == 0 and torch.equal(net.avg, torch.zeros(3, dtype=D))


# ---------------------------------------------------------------- F3: fused RNN arguments
RNNS = [nn.LSTM, nn.GRU, nn.RNN]


def _packed(x):
    return nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 3]), enforce_sorted=False)


@pytest.mark.parametrize("cls", RNNS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_fused_rnn_dropout0_train_runs_like_torch(cls, packed, bidirectional, batch_first):
    torch.manual_seed(0)
    r = cls(3, 4, num_layers=2, dropout=0.0, bidirectional=bidirectional, batch_first=batch_first).to(D)
    model = fp.functionalize(r)
    v = model.variables_from_state_dict(r.state_dict())
    x = torch.randn(2, 5, 3, dtype=D) if batch_first else torch.randn(5, 2, 3, dtype=D)
    inp = _packed(x if not batch_first else x.transpose(0, 1)) if packed else x
    out, _ = model.apply(v, inp, train=True, key=fp.random.key(0))
    ref = r.train()(inp)
    got, want = (out[0].data, ref[0].data) if packed else (out[0], ref[0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("cls", RNNS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_fused_rnn_dropout_train_raises(cls, packed, bidirectional):
    r = cls(3, 4, num_layers=2, dropout=0.5, bidirectional=bidirectional).to(D)
    model = fp.functionalize(r)
    v = model.variables_from_state_dict(r.state_dict())
    x = torch.randn(5, 2, 3, dtype=D)
    inp = _packed(x) if packed else x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=rf"apply\(.*nn\.{cls.__name__} with dropout=0\.5 ran in train mode"):
            model.apply(v, inp, train=True, key=fp.random.key(0))
    # eval mode: no dropout, runs like torch
    got, want = model.apply(v, inp)[0], r.eval()(inp)[0]
    got, want = (got.data, want.data) if packed else (got, want)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


# ---------------------------------------------------------------- F2: fully masked SDPA rows
class Attn(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_keyed_sdpa_fully_masked_row_matches_torch(kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, dtype=D, requires_grad=True) for n in (3, 4, 4))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0] = False
    if kind == "float":
        mask = torch.zeros(3, 4, dtype=D).masked_fill(~mask, float("-inf"))
    p = 1e-300  # keyed path, dropout (almost surely) keeps everything: comparable with torch
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    model = fp.functionalize(Attn(p))
    out, _ = model.apply({"params": {}, "buffers": {}}, q, k, v, mask, train=True, key=fp.random.key(0))
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-15)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    g = torch.autograd.grad(out.square().sum(), (q, k, v))
    for a, b in zip(g, g_ref, strict=True):
        assert a.isfinite().all()
        torch.testing.assert_close(a, b, rtol=0, atol=1e-14)


def test_keyed_mha_fully_padded_element_no_nan():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, dropout=1e-300, batch_first=True).to(D)
    x = torch.randn(2, 3, 8, dtype=D)
    kpm = torch.zeros(2, 3, dtype=torch.bool)
    kpm[1] = True
    ref = mha.train()(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    model = fp.functionalize(mha)
    v = model.variables_from_state_dict(mha.state_dict())
    (out, _), _ = model.apply(v, x, x, x, key_padding_mask=kpm, need_weights=False, train=True,
                              key=fp.random.key(1))
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)


# ---------------------------------------------------------------- F4: parametrized init
@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm", "orthogonal"])
def test_init_redraws_parametrized_weights(wrap):
    def build():
        return nn.Sequential(getattr(P, wrap)(nn.Linear(16, 8)), nn.Linear(8, 2))

    torch.manual_seed(0)
    net = build()
    model = fp.functionalize(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vs = [model.init(fp.random.key(i)) for i in range(3)]
    again = model.init(fp.random.key(0))
    for c in ("params", "buffers"):
        for name in vs[0][c]:
            assert torch.equal(again[c][name], vs[0][c][name]), name  # deterministic per key
    # the effective weight is a draw of what constructing the module gives (independent
    # reference: fresh constructions under torch's generator); orthogonal's original is
    # -I by construction, its draw lives in the `base` buffer
    weights = [model.to_module(v)[0].weight.detach() for v in vs]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    fresh = []
    for seed in range(3):
        torch.manual_seed(100 + seed)
        fresh.append(build()[0].weight.detach())
    ours, theirs = torch.stack(weights), torch.stack(fresh)
    assert not torch.equal(weights[0], net[0].weight.detach())
    if wrap == "orthogonal":
        for w in weights:
            torch.testing.assert_close(w @ w.T, torch.eye(8), atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(ours.std(), theirs.std(), rtol=0.15, atol=0)
        assert ours.abs().max() <= 1 / 16**0.5 * (1 if wrap == "weight_norm" else 10)
    if wrap == "spectral_norm":  # eval output uses power-iteration vectors of the new weight
        m = model.to_module(vs[0]).eval()
        sigma = torch.linalg.matrix_norm(m[0].parametrizations.weight.original, ord=2)
        torch.testing.assert_close(torch.linalg.matrix_norm(m[0].weight, ord=2), torch.tensor(1.0),
                                   atol=1e-3, rtol=0)
        assert sigma > 0


def test_ensemble_init_parametrized_members_differ():
    model = fp.functionalize(nn.Sequential(P.weight_norm(nn.Linear(4, 3)), nn.Linear(3, 2)))
    ens = fp.nn.ensemble_init(model, fp.random.split(fp.random.key(0), 3))
    for name, t in ens["params"].items():
        assert not torch.equal(t[0], t[1]), name


# ---------------------------------------------------------------- F5: state_dict dtype
def test_variables_from_state_dict_casts_like_load_state_dict():
    sd = nn.Linear(3, 2).state_dict()  # float32 checkpoint
    net = nn.Linear(3, 2).double()
    model = fp.functionalize(net)
    v = model.variables_from_state_dict(sd)
    net.load_state_dict(sd)
    for name, t in net.state_dict().items():
        assert v["params"][name].dtype == t.dtype == torch.float64
        assert torch.equal(v["params"][name], t)
    x = torch.randn(4, 3, dtype=D)
    torch.testing.assert_close(model.apply(v, x), net(x), rtol=0, atol=0)


# ---------------------------------------------------------------- F6: zero-size initialisers
@pytest.mark.parametrize(("ours", "theirs", "shape"), [
    (I.kaiming_uniform(), torch.nn.init.kaiming_uniform_, (5, 0)),
    (I.kaiming_normal(mode="fan_out"), lambda t: torch.nn.init.kaiming_normal_(t, mode="fan_out"), (0, 5)),
    (I.variance_scaling(1.0, "fan_in", "normal"), torch.nn.init.kaiming_normal_, (5, 0)),
    (I.variance_scaling(1.0, "fan_avg", "truncated_normal"), torch.nn.init.kaiming_normal_, (0, 3, 2)),
    (I.variance_scaling(1.0, "fan_out", "uniform"), torch.nn.init.kaiming_uniform_, (4, 0, 3)),
])
def test_zero_size_initialisers_return_empty_like_torch(ours, theirs, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = theirs(torch.empty(shape))
    got = ours(fp.random.key(0), shape, torch.float64)
    assert got.shape == want.shape and got.dtype == torch.float64


def test_reinitialize_with_zero_width_layer():
    v = fp.functionalize(nn.Sequential(nn.Linear(3, 0), nn.Linear(0, 2))).init(fp.random.key(0))
    out = fp.nn.init.reinitialize(fp.random.key(1), v["params"], {"*.weight": I.kaiming_uniform()})
    assert out["0.weight"].shape == (0, 3) and out["1.weight"].shape == (2, 0)


def test_a_batchnorm_used_twice_becomes_one_groupnorm():
    """replace_rnns keeps a shared module shared; replace_batchnorm_with_groupnorm made two
    GroupNorms of one BatchNorm (6 parameter tensors became 8)."""
    bn = torch.nn.BatchNorm1d(4)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), bn, torch.nn.Linear(4, 4), bn)
    out = fp.nn.replace_batchnorm_with_groupnorm(net, 2)
    assert out[1] is out[3] and isinstance(out[1], torch.nn.GroupNorm)
    assert len(list(out.parameters())) == len(list(net.parameters())) == 6
    x = torch.randn(5, 4)
    gn = out[1]  # the same layer object, applied twice
    torch.testing.assert_close(out(x), gn(out[2](gn(out[0](x)))))
