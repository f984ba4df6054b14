"""per_sample_grads(method="hooks"/"auto"): the per-sample gradient engine against a Python
loop over examples (plain torch.autograd, float64, 1e-10)."""

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
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline.transforms import _grad_sample

TOL = 1e-10


def squared(module: nn.Module):
    """Per-example losses: the squared output of ``module`` summed per example."""

    def loss(p, x, y):
        out = torch.func.functional_call(module, p, (x,))
        return ((out - y) ** 2).flatten(1).sum(1)

    return loss


def assert_matches(loss_fn, params, *batch, method="hooks", **kw):
    got = fp.per_sample_grads(loss_fn, method=method, **kw)(params, *batch)
    want = loop_grads(loss_fn, params, *batch)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].shape == want[k].shape, k
        assert torch.allclose(got[k], want[k], atol=TOL, rtol=0), (k, (got[k] - want[k]).abs().max())
    return got


def assert_fast_without_fallback(loss_fn, params, *batch):
    """hooks and auto (with no fall-back warning) give the loop's per-example gradients."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back
        for method in ("hooks", "auto"):
            assert_matches(loss_fn, params, *batch, method=method)


def targets(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.randn_like(module(x))


# -- one rule at a time ------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 3), (5, 4, 3), (5, 2, 4, 3), (1, 1, 3), (1, 3)])
def test_linear_matches_loop(bias, shape):
    torch.manual_seed(0)
    m = nn.Linear(3, 2, bias=bias)
    x = torch.randn(*shape)
    assert_matches(squared(m), params_of(m), x, targets(m, x))


@pytest.mark.filterwarnings("ignore:Using padding=.same.")
@pytest.mark.parametrize("kw", [
    {}, {"stride": 2, "padding": 1}, {"dilation": 2, "padding": "same"}, {"padding": "same"},
    {"groups": 2}, {"groups": 4, "padding": 1}, {"bias": False, "padding": "valid"},
])
def test_conv1d_matches_loop(kw):
    torch.manual_seed(0)
    m = nn.Conv1d(4, 6 if kw.get("groups", 1) != 4 else 8, 4 if kw.get("padding") == "same" else 3, **kw)
    x = torch.randn(5, 4, 11)
    assert_matches(squared(m), params_of(m), x, targets(m, x))


@pytest.mark.parametrize("c_in, c_out, kw", [
    (1, 3, {}), (1, 3, {"stride": 2, "padding": 2, "dilation": 2}), (3, 4, {"padding": "same"}),
    (3, 4, {"stride": (2, 1), "padding": (1, 0)}), (4, 6, {"groups": 2}), (4, 8, {"groups": 4}),
    (3, 2, {"padding": 1, "padding_mode": "reflect"}), (2, 4, {"kernel_size": (2, 4), "padding": "same"}),
])
def test_conv2d_matches_loop(c_in, c_out, kw):
    torch.manual_seed(0)
    kw = {"kernel_size": 3, **kw}
    m = nn.Conv2d(c_in, c_out, **kw)
    x = torch.randn(4, c_in, 9, 8)
    assert_matches(squared(m), params_of(m), x, targets(m, x))


@pytest.mark.parametrize("padding_idx", [None, 0, -1])
@pytest.mark.parametrize("shape", [(6,), (6, 5), (6, 2, 3)])
def test_embedding_matches_loop(padding_idx, shape):
    torch.manual_seed(0)
    m = nn.Embedding(7, 3, padding_idx=padding_idx)
    idx = torch.randint(0, 7, shape)
    idx[0] = 0  # a padding index appears, and repeated indices within an example
    assert_matches(squared(m), params_of(m), idx, targets(m, idx))


def _prefix_model():
    torch.manual_seed(0)
    m = nn.ModuleDict({"wte": nn.Embedding(9, 3), "pfx": nn.Embedding(4, 3), "head": nn.Linear(3, 9)})

    def loss(p, tok):
        """A learned prefix of 4 tokens (prompt tuning) before each example's tokens."""
        prefix = F.embedding(torch.arange(4), p["pfx.weight"])  # (4, 3): no batch axis
        h = torch.cat([prefix.expand(tok.shape[0], 4, 3), F.embedding(tok, p["wte.weight"])], 1)
        return F.linear(torch.tanh(h), p["head.weight"], p["head.bias"]).pow(2).sum((1, 2))

    return m, loss


@pytest.mark.parametrize("batch", [4, 3])  # 4: as long as the prefix
def test_a_prefix_looked_up_inside_loss_fn_is_passed_back_to_its_table(batch):
    """NOTE [one-dimensional indices], NOTE [derived parameters]: the prefix positions
    ``arange(4)`` have no batch axis, even when the batch has 4 examples too. The hooks
    method once took them as examples and returned wrong prefix gradients, then refused
    them; now the lookup is a derived tensor, expanded over the batch (a size the padded
    batch shows to follow the batch's), and every method gives the loop's numbers."""
    m, loss = _prefix_model()
    tok = torch.randint(0, 9, (batch, 6))
    want = loop_grads(loss, params_of(m), tok)
    norms = torch.stack([g.flatten(1).square().sum(1) for g in want.values()]).sum(0).sqrt()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back
        for method in ("hooks", "auto"):
            got = fp.per_sample_grads(loss, method=method)(params_of(m), tok)
            assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want), method
        for method in ("ghost", "hooks", "auto"):
            _, got_norms = fp.clipped_grad(loss, 1.0, method=method)(params_of(m), tok)
            assert torch.allclose(got_norms, norms, atol=TOL, rtol=0), method


@pytest.mark.parametrize("ids", ["argument", "column", "computed"])
def test_one_dimensional_ids_read_from_a_batch_argument_are_taken(ids):
    """Per-example ids given as a batch argument, or as a column of one (a view), are
    taken by hooks, and so are ids computed from them, once a padded run shows they follow
    the batch (NOTE [a table the size of the batch]; they were looked up as positions with
    no batch axis, refused, and ``auto`` fell back): the loop's numbers each way."""
    torch.manual_seed(0)
    m = nn.Embedding(7, 3)
    data = torch.randint(0, 6, (5, 3))

    def loss(p, d):
        if ids == "argument":
            i = d
        else:
            i = d[:, 1] if ids == "column" else (d[:, 1] + 1) % 7
        return torch.func.functional_call(m, p, (i,)).pow(2).sum(1)

    batch = data[:, 1].clone() if ids == "argument" else data
    want = loop_grads(loss, params_of(m), batch)
    got = fp.per_sample_grads(loss, method="hooks")(params_of(m), batch)
    assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.LayerNorm(4), (5, 4)), (lambda: nn.LayerNorm(4), (5, 3, 4)),
    (lambda: nn.LayerNorm((3, 4)), (5, 2, 3, 4)), (lambda: nn.LayerNorm(4, bias=False), (5, 3, 4)),
    (lambda: nn.GroupNorm(2, 4), (5, 4)), (lambda: nn.GroupNorm(2, 4), (5, 4, 6)),
    (lambda: nn.GroupNorm(1, 4), (5, 4, 3, 3)),
    (lambda: nn.BatchNorm1d(4), (5, 4, 6)), (lambda: nn.BatchNorm2d(4), (5, 4, 3, 3)),
])
def test_norms_match_loop(make, shape):
    torch.manual_seed(0)
    m = make().eval()
    for p in m.parameters():  # away from the identity initialisation
        p.data.normal_()
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(*shape)
    assert_matches(squared(m), params_of(m), x, targets(m, x))


# -- models ------------------------------------------------------------------------------


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 5), nn.Conv2d(4, 6, 5)
        self.fc1, self.fc2 = nn.Linear(6 * 4 * 4, 8), nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return F.log_softmax(self.fc2(F.relu(self.fc1(x.flatten(1)))), -1)


def nll(module):
    return lambda p, x, y: F.nll_loss(torch.func.functional_call(module, p, (x,)), y, reduction="none")


def test_cnn_matches_loop():
    torch.manual_seed(0)
    m = CNN()
    assert_matches(nll(m), params_of(m), torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,)))


def test_inplace_relu_after_conv_uses_the_conv_output_gradient():
    # NOTE [gradient edges, not tensors]: relu_ re-points the conv output's grad_fn.
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    x = torch.randn(4, 2, 6, 6)
    assert_matches(squared(m), params_of(m), x, targets(m, x))


def test_conv1d_layernorm_groupnorm_embedding_model_matches_loop():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(11, 6, padding_idx=0)
            self.conv = nn.Conv1d(6, 8, 3, padding=1)
            self.gn = nn.GroupNorm(2, 8)
            self.ln = nn.LayerNorm(8)
            self.out = nn.Linear(8, 3)

        def forward(self, t):
            h = self.gn(self.conv(self.emb(t).transpose(1, 2))).transpose(1, 2)
            return self.out(torch.tanh(self.ln(h))).mean(1)

    torch.manual_seed(0)
    m = Net()
    t = torch.randint(0, 11, (5, 7))
    assert_matches(squared(m), params_of(m), t, targets(m, t))


def test_tied_weight_used_twice_accumulates():
    torch.manual_seed(0)
    w, b1, b2 = torch.randn(4, 4), torch.randn(4), torch.randn(4)

    def loss(p, x, y):
        h = torch.tanh(F.linear(x, p["w"], p["b1"]))
        return ((F.linear(h, p["w"], p["b2"]) - y) ** 2).sum(-1)

    assert_matches(loss, {"w": w, "b1": b1, "b2": b2}, torch.randn(5, 4), torch.randn(5, 4))


def test_embedding_tied_to_the_output_layer():
    torch.manual_seed(0)

    def loss(p, t):
        h = torch.tanh(F.embedding(t, p["emb"]).mean(1))
        return F.cross_entropy(F.linear(h, p["emb"], p["b"]), t[:, 0], reduction="none")

    assert_matches(loss, {"emb": torch.randn(9, 4), "b": torch.randn(9)}, torch.randint(0, 9, (5, 3)))


def test_unused_and_no_grad_parameters_get_zeros():
    torch.manual_seed(0)

    def loss(p, x):
        with torch.no_grad():
            frozen = F.linear(x, p["a"]) + p["a"].sum() + p["w"].norm()  # any op: no gradient
        return (F.linear(x + frozen, p["w"]) ** 2).sum(-1)

    p = {"w": torch.randn(3, 3), "a": torch.randn(3, 3), "unused": torch.randn(2)}
    got = assert_matches(loss, p, torch.randn(4, 3))
    assert torch.equal(got["a"], torch.zeros(4, 3, 3)) and torch.equal(got["unused"], torch.zeros(4, 2))


def test_lstm_classifier_matches_loop():
    """The issue's text classifier (smaller sizes), with fp.nn.LSTM, in eval mode."""

    class TextClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(20, 4)
            self.lstm = fp.nn.LSTM(4, 3, num_layers=2, bidirectional=True, batch_first=True)
            self.dropout = nn.Dropout(0.5)
            self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, t):
            h, _ = self.lstm(self.embedding(t))
            return self.fc2(F.relu(self.fc1(self.dropout(h))).mean(1))

    torch.manual_seed(0)
    m = TextClassifier().eval()
    ce = lambda p, t, y: F.cross_entropy(torch.func.functional_call(m, p, (t,)), y, reduction="none")  # noqa: E731
    assert_matches(ce, params_of(m), torch.randint(0, 20, (4, 6)), torch.randint(0, 2, (4,)))


@pytest.mark.parametrize("batch_first", [True, False])
def test_gru_matches_loop(batch_first):
    torch.manual_seed(0)
    m = fp.nn.GRU(3, 4, batch_first=batch_first)

    def loss(p, x):
        out, _ = torch.func.functional_call(m, p, (x if batch_first else x.transpose(0, 1),))
        return (out ** 2).sum((0, 2) if not batch_first else (1, 2))

    assert_matches(loss, params_of(m), torch.randn(3, 5, 3))


# -- the fused LSTM direction rule -------------------------------------------------------


def _reference_direction(steps, h, c, w_hh, b_hh, w_hr, reverse):
    outs = []
    for xt in reversed(steps) if reverse else steps:
        i, f, g, o = (F.linear(h, w_hh, b_hh) + xt).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if w_hr is not None:
            h = F.linear(h, w_hr)
        outs.append(h)
    return (outs[::-1] if reverse else outs), h, c


_direction = _grad_sample.overridable(_reference_direction)
_grad_sample.register_rule(_direction, _grad_sample.lstm_direction_rule)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("proj", [False, True])
def test_fused_lstm_direction_rule_matches_loop(reverse, bias, proj):
    torch.manual_seed(0)
    H, D = 3, 2
    p = {"w_ih": torch.randn(4 * H, D), "w_hh": torch.randn(4 * H, 2 if proj else H)}
    if bias:
        p.update(b_ih=torch.randn(4 * H), b_hh=torch.randn(4 * H))
    if proj:
        p["w_hr"] = torch.randn(2, H)

    def loss(p, x, h0, c0):
        steps = list(F.linear(x, p["w_ih"], p.get("b_ih")).unbind(1))
        outs, h, c = _direction(steps, h0, c0, p["w_hh"], p.get("b_hh"), p.get("w_hr"), reverse)
        y = torch.stack(outs, 1)
        return (y * torch.linspace(-1, 1, y.shape[1])[:, None]).pow(2).sum((1, 2)) + (h * c[:, :h.shape[1]]).sum(1)

    x, h0, c0 = torch.randn(4, 5, D), torch.randn(4, 2 if proj else H), torch.randn(4, H)
    assert_matches(loss, p, x, h0, c0)


def test_fused_rule_gives_input_and_state_gradients_to_autograd():
    torch.manual_seed(0)
    H = 3
    w_hh, b_hh = torch.randn(4 * H, H), torch.randn(4 * H)
    x, h0, c0 = (torch.randn(2, 4, 4 * H), torch.randn(2, H), torch.randn(2, H))

    def run(direction, w):
        xs, h, c = (t.clone().requires_grad_() for t in (x, h0, c0))
        outs, hn, cn = direction(list(xs.unbind(1)), h, c, w, b_hh, None, True)
        total = torch.stack(outs, 1).sin().sum() + hn.sum() + cn.cos().sum()
        return torch.autograd.grad(total, (xs, h, c))

    engine = _grad_sample._engine.Engine([w_hh], ["w"], 2, _grad_sample._rules.RULES)
    (tracked,) = engine.tracked()
    for got, want in zip(run(_direction, tracked), run(_reference_direction, w_hh), strict=True):
        assert torch.allclose(got, want, atol=TOL, rtol=0)


# -- the API: options, contracts and errors ------------------------------------------------


def test_chunk_size_aux_and_values():
    torch.manual_seed(0)
    m = nn.Linear(3, 2)

    def loss(p, x):
        out = torch.func.functional_call(m, p, (x,))
        return (out ** 2).sum(-1), {"out": out}

    x = torch.randn(7, 3)
    (values, aux), grads = fp.per_sample_value_and_grad(loss, has_aux=True, method="hooks", chunk_size=3)(params_of(m), x)
    want = loop_grads(lambda p, x: loss(p, x)[0], params_of(m), x)
    assert all(torch.allclose(grads[k], want[k], atol=TOL) for k in want)
    assert torch.allclose(values, loss(params_of(m), x)[0]) and aux["out"].shape == (7, 2)
    grads2, aux2 = fp.per_sample_grads(loss, has_aux=True, method="hooks")(params_of(m), x)
    assert all(torch.allclose(grads2[k], want[k], atol=TOL) for k in want) and not aux2["out"].requires_grad


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_works_under_no_grad_and_inference_mode(context):
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    p, x, y = params_of(m), torch.randn(4, 3), torch.randn(4, 2)
    want = loop_grads(squared(m), p, x, y)
    with context():
        got = fp.per_sample_grads(squared(m), method="hooks")(p, x, y)
    assert all(torch.allclose(got[k], want[k], atol=TOL) for k in want)


def test_tuple_argnums_and_batch_argnums():
    torch.manual_seed(0)
    w1, w2, x = torch.randn(3, 2), torch.randn(1, 3), torch.randn(5, 2)

    def loss(a, b, scale, x):
        return F.linear(torch.tanh(F.linear(x, a)), b).squeeze(-1) * scale

    got = fp.per_sample_grads(loss, argnums=(0, 1), batch_argnums=(3,), method="hooks")(w1, w2, 2.0, x)
    want = fp.per_sample_grads(loss, argnums=(0, 1), batch_argnums=(3,))(w1, w2, 2.0, x)
    assert isinstance(got, tuple) and all(torch.allclose(g, w, atol=TOL) for g, w in zip(got, want, strict=True))


def test_vmap_method_accepts_per_example_losses():
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    got = fp.per_sample_grads(squared(m))(params_of(m), x, y)
    want = loop_grads(squared(m), params_of(m), x, y)
    assert all(torch.allclose(got[k], want[k], atol=TOL) for k in want)


def test_inputs_are_not_modified():
    torch.manual_seed(0)
    m = CNN()
    p, x, y = params_of(m), torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,))
    before = {k: v.clone() for k, v in p.items()}
    fp.per_sample_grads(nll(m), method="hooks")(p, x, y)
    assert all(torch.equal(p[k], before[k]) for k in p) and not any(v.requires_grad for v in p.values())


def test_unsupported_use_raises_with_hooks_and_falls_back_with_auto():
    torch.manual_seed(0)
    p = {"enc": {"w": torch.randn(3, 3)}, "head": torch.randn(3)}

    def loss(p, x):
        return torch.linalg.matmul(torch.tanh(F.linear(x, p["enc"]["w"])), p["head"])

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"method='hooks'.*`head` is used by `torch._C._linalg.linalg_matmul`.*no per-sample gradient rule"):
        fp.per_sample_grads(loss, method="hooks")(p, x)
    with pytest.warns(UserWarning, match=r"falls back to 'vmap'.*`head`"):
        got = fp.per_sample_grads(loss, method="auto")(p, x)
    want = fp.per_sample_grads(loss)(p, x)
    assert torch.allclose(got["head"], want["head"], atol=TOL)
    assert torch.allclose(got["enc"]["w"], want["enc"]["w"], atol=TOL)


def test_nn_lstm_fused_kernel_is_named_in_the_error():
    m = nn.LSTM(2, 3, batch_first=True)
    loss = lambda p, x: torch.func.functional_call(m, p, (x,))[0].sum((1, 2))  # noqa: E731
    with pytest.raises(ValueError, match=r"`weight_ih_l0`.*used by `torch.lstm`"):
        fp.per_sample_grads(loss, method="hooks")(params_of(m), torch.randn(2, 4, 2))


def test_scalar_loss_is_an_error_with_hooks_and_falls_back_with_auto():
    torch.manual_seed(0)
    m = nn.Linear(3, 1)
    mean = lambda p, x: torch.func.functional_call(m, p, (x,)).pow(2).mean()  # noqa: E731
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"returned a scalar.*shape \(4,\).*reduction='none'"):
        fp.per_sample_grads(mean, method="hooks")(params_of(m), x)
    with pytest.warns(UserWarning, match="returned a scalar"):
        got = fp.per_sample_grads(mean, method="auto")(params_of(m), x)
    want = fp.per_sample_grads(mean)(params_of(m), x)  # a batch of one: the example's own loss
    assert all(torch.allclose(got[k], want[k], atol=TOL) for k in want)


@pytest.mark.parametrize("bad, match", [
    (lambda out: out.sum(-1)[:2], r"shape \(4,\).*got shape \(2,\)"),
    (lambda out: out, r"shape \(4,\).*got shape \(4, 2\)"),
    (lambda out: "no", r"must return a tensor of per-example losses, got str"),
])
def test_bad_loss_outputs(bad, match):
    m = nn.Linear(3, 2)
    with pytest.raises((ValueError, TypeError), match=match):
        fp.per_sample_grads(lambda p, x: bad(torch.func.functional_call(m, p, (x,))), method="hooks")(
            params_of(m), torch.randn(4, 3))


def test_batchnorm_in_training_mode_is_an_error():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    with pytest.raises(ValueError, match=r"per_sample_grads\(loss_fn\): BatchNorm normalising with the batch.s statistics.*1.weight.*eval mode.*replace_batchnorm_with_groupnorm"):
        fp.per_sample_grads(squared(m), method="auto")(params_of(m), torch.randn(4, 3), torch.randn(4, 4))


class _BareBatchNorm(nn.Module):
    """A conv, F.batch_norm with the batch's statistics and no parameter, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(2, 3, 3), nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.batch_norm(self.conv(x), None, None, training=True).flatten(1))


def _bn_net(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3), norm, nn.Flatten(), nn.Linear(12, 3))


@pytest.mark.parametrize("make, keep", [
    (lambda: _bn_net(nn.BatchNorm2d(3, affine=False)).train(), None),
    (lambda: _bn_net(nn.BatchNorm2d(3, affine=False, track_running_stats=False)).eval(), None),
    (lambda: _bn_net(nn.BatchNorm2d(3)).train(), lambda k: not k.startswith("1.")),  # frozen BN
    (lambda: _BareBatchNorm(), None),
], ids=["affine_false_train", "no_running_stats_eval", "frozen_affine_train", "bare_F_batch_norm"])
def test_batchnorm_with_batch_statistics_and_no_parameter_is_an_error(make, keep):
    # NOTE [batch norm without parameters]: with no differentiated parameter of its own the
    # BatchNorm met no rule, and every fast method gave the batch-coupled gradients (error
    # 4.7 against the loop here); now each says what BatchNorm with parameters says.
    m = make()
    params = {k: v for k, v in params_of(m).items() if keep is None or keep(k)}
    x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 3, (4,))
    loss = lambda p, x, y: F.cross_entropy(torch.func.functional_call(m, p, (x,)), y, reduction="none")  # noqa: E731
    match = r"\(loss_fn[^)]*\): BatchNorm normalising with the batch's statistics.*per-example gradients are not defined.*eval mode"
    for method in ("auto", "hooks"):
        with pytest.raises(ValueError, match="per_sample_grads" + match):
            fp.per_sample_grads(loss, method=method)(params, x, y)
    for method in ("auto", "ghost", "hooks"):
        with pytest.raises(ValueError, match="clipped_grad" + match):
            fp.clipped_grad(loss, 1.0, method=method)(params, x, y)
    with pytest.raises(ValueError, match="per_sample_grad_norms" + match):
        fp.per_sample_grad_norms(loss)(params, x, y)


def test_batchnorm_in_eval_mode_first_then_training_mode_is_still_an_error():
    # The walks' record of a call tells the two modes apart (their autograd nodes share a
    # name), so a training-mode call after an eval-mode one is walked again.
    m = _bn_net(nn.BatchNorm2d(3, affine=False))
    params = params_of(m)
    x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 3, (4,))
    loss = lambda p, x, y: F.cross_entropy(torch.func.functional_call(m, p, (x,)), y, reduction="none")  # noqa: E731
    f = fp.per_sample_grads(loss)
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast method, no fall-back
        got = f(params, x, y)
    want = loop_grads(loss, params, x, y)
    assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)
    m.train()
    with pytest.raises(ValueError, match="BatchNorm normalising with the batch's statistics"):
        f(params, x, y)


@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_keeps_the_fast_path(affine):
    # F.instance_norm is a batch norm with the batch's statistics over (1, B * C, ...): the
    # examples sit on the channels' axis there, each normalised alone.
    m = _bn_net(nn.InstanceNorm2d(3, affine=affine)).train()
    params = params_of(m)
    x, y = torch.randn(4, 2, 4, 4), torch.randint(0, 3, (4,))
    loss = lambda p, x, y: F.cross_entropy(torch.func.functional_call(m, p, (x,)), y, reduction="none")  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = fp.per_sample_grads(loss)(params, x, y)
    want = loop_grads(loss, params, x, y)
    assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)


@pytest.mark.parametrize("layout", [
    lambda x: x.permute(1, 2, 0, 3),  # a view with the examples on axis 2
    lambda x: x.permute(1, 2, 0, 3).contiguous(),  # a copy of it
    lambda x: x.permute(1, 2, 0, 3)[1:],  # a slice of the view
])
def test_input_without_the_batch_on_axis_0_is_an_error(layout):
    m = nn.Linear(3, 2)
    loss = lambda p, x: torch.func.functional_call(m, p, (layout(x),)).sum((0, 1, 3))  # noqa: E731
    with pytest.raises(ValueError, match=r"`weight`, `bias` are used by `F.linear` on an input of shape \([56], 5, 4, 3\).*B=4"):
        fp.per_sample_grads(loss, method="hooks")(params_of(m), torch.randn(4, 6, 5, 3))


@pytest.mark.parametrize("layout", [
    lambda x: x.transpose(0, 1).contiguous(),  # a copy
    lambda x: x.transpose(0, 1).clone(),  # same strides, another storage
    lambda x: x.transpose(0, 1)[1:],  # a slice of the view
    lambda x: (x / 2).transpose(0, 1),  # the batch scaled, then transposed
])
def test_copies_of_a_transposed_batch_are_read_sequence_first(layout):
    """NOTE [the batch requires grad]: a copy of the transposed batch is computed from the
    batch, so it has a graph and its only axis of size ``B`` past axis 0 holds the
    examples (NOTE [sequence-first inputs]). These were refused (no graph, no shared
    memory): ``auto`` fell back to ``vmap``."""
    torch.manual_seed(3)
    m = nn.Linear(3, 2)
    loss = lambda p, x: torch.func.functional_call(m, p, (layout(x),)).pow(2).sum((0, 2))  # noqa: E731
    assert_fast_without_fallback(loss, params_of(m), torch.randn(4, 6, 3))


def test_a_transposed_batch_argument_is_read_sequence_first():
    """NOTE [sequence-first inputs]: ``x.transpose(0, 1)`` of the batch is the batch
    re-indexed, so its axis 1 holds the examples."""
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    loss = lambda p, x: torch.func.functional_call(m, p, (x.transpose(0, 1),)).pow(2).sum((0, 2))  # noqa: E731
    x = torch.randn(4, 5, 3)
    want = loop_grads(loss, params_of(m), x)
    for chunk_size in (None, 3):  # chunks are views of the batch, transposed in loss_fn
        got = fp.per_sample_grads(loss, method="hooks", chunk_size=chunk_size)(params_of(m), x)
        assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)
    g, norms = fp.clipped_grad(loss, 0.5, method="ghost", chunk_size=3)(params_of(m), x)
    ref = torch.stack([want[k].flatten(1).square().sum(1) for k in want]).sum(0).sqrt()
    scale = (0.5 / ref).clamp(max=1.0)
    assert torch.allclose(norms, ref, atol=TOL, rtol=0)
    for k in want:
        assert torch.allclose(g[k], (want[k] * scale.reshape(-1, *[1] * (want[k].dim() - 1))).sum(0),
                              atol=TOL, rtol=0)


@settings(max_examples=12, deadline=None)
@given(order=st.permutations([0, 1, 2]), sizes=st.tuples(st.integers(1, 4), st.integers(1, 4),
                                                          st.integers(1, 4)),
       copy=st.booleans())
@example(order=[1, 0, 2], sizes=(3, 2, 1), copy=False)  # (T, B, H): read on axis 1
@example(order=[1, 0, 2], sizes=(3, 2, 1), copy=True)  # the same, copied: read too
@example(order=[1, 2, 0], sizes=(3, 2, 1), copy=False)  # (T, H, B): refused
@example(order=[0, 2, 1], sizes=(2, 2, 3), copy=False)  # (B, H, T), T == B, then H == B + 1
@example(order=[1, 0, 2], sizes=(2, 2, 3), copy=False)  # (T, B, H), T == B, then H == B + 1
@example(order=[1, 2, 0], sizes=(2, 2, 3), copy=False)  # (T, H, B), T == B: refused padded too
def test_permuted_batches_are_read_only_where_the_examples_provably_are(order, sizes, copy):
    """NOTE [sequence-first inputs]: a ``(B, T, H, F)`` batch with its first three axes
    permuted, fed to a Linear. With the examples on axis 0, or on axis 1 of a view of the
    batch or of a copy (which has a graph: NOTE [the batch requires grad]), hooks must
    give the loop's gradients, also when another axis has the batch size (NOTE [padding
    an ambiguous batch]); anywhere else it must refuse (and ``auto`` falls back to the
    loop's numbers)."""
    B, T, H = sizes
    torch.manual_seed(B * 16 + T * 4 + H)
    m = nn.Linear(2, 3)
    perm = (*order, 3)

    def loss(p, x):
        v = x.permute(perm)
        v = v.contiguous() if copy else v
        out = torch.func.functional_call(m, p, (v,))
        return out.pow(2).permute(*[perm.index(i) for i in range(4)]).flatten(1).sum(1)

    x = torch.randn(B, T, H, 2)
    axis = order.index(0)
    # Else .contiguous() is the view. A single example's permutation may be contiguous
    # where the padded batch's (NOTE [padding an ambiguous batch]) is not: no promise.
    promised = axis in (0, 1)
    want = loop_grads(loss, params_of(m), x)
    try:
        got = fp.per_sample_grads(loss, method="hooks")(params_of(m), x)
        taken = True
    except ValueError as e:  # refused: never where the axis is promised
        assert not promised, e
        assert "F.linear" in str(e)
        taken = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fp.per_sample_grads(loss)(params_of(m), x)
    # Taken beyond the promise only for a single example, whose gradient any layout gives.
    assert not taken or promised or B == 1, (order, sizes, copy)
    assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)


def test_a_table_without_a_batch_axis_is_not_taken_as_sequence_first():
    """NOTE [sequence-first inputs]: a ``(1, T, E)`` table with ``T == B`` has a second
    axis of the batch size, but requires no grad, so it is not read as ``(T, B, E)``. It
    was refused (auto fell back); a padded run now shows it is a constant of ``loss_fn``
    (NOTE [constants or batch data]), so hooks and auto return the loop's numbers."""
    torch.manual_seed(0)
    m = nn.Linear(3, 3)
    table = torch.randn(1, 4, 3)

    def loss(p, x):
        pos = torch.func.functional_call(m, p, (table,))  # no batch axis
        return (x + pos).pow(2).sum((1, 2))

    assert_fast_without_fallback(loss, params_of(m), torch.randn(4, 4, 3))


@pytest.mark.parametrize("make, shape, first", [
    (lambda: nn.Linear(3, 2), (4, 4, 3), True),  # sequence-first (T, B, E) with T == B
    (lambda: nn.Embedding(9, 2), (4, 4), True),  # token ids (T, B) with T == B
    (lambda: nn.Linear(3, 2), (4, 4, 3), False),  # batch-first (B, T, E) with T == B
    (lambda: nn.Embedding(9, 2), (4, 4), False),  # token ids (B, T) with T == B
])
def test_a_sequence_as_long_as_the_batch_is_padded_not_refused(make, shape, first):
    """NOTE [padding an ambiguous batch]: ``T == B`` makes two axes candidates for the
    examples; hooks runs the batch again padded and gives the loop's gradients (auto
    too, without falling back)."""
    torch.manual_seed(0)
    m = make()
    x = torch.randint(0, 9, shape) if isinstance(m, nn.Embedding) else torch.randn(*shape)

    def loss(p, x):
        v = x.transpose(0, 1) if first else x
        out = torch.func.functional_call(m, p, (v,))
        return out.pow(2).sum((0, 2) if first else (1, 2))

    want = loop_grads(loss, params_of(m), x)
    got = fp.per_sample_grads(loss, method="hooks")(params_of(m), x)
    assert all(got[k].shape == want[k].shape for k in want)
    assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back note
        got = fp.per_sample_grads(loss)(params_of(m), x)
    assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)


def test_an_axis_that_grows_with_the_batch_stays_ambiguous():
    """NOTE [padding an ambiguous batch]: an axis whose size follows the batch's (each
    example's row broadcast over a ``(B, B, E)`` block) is ambiguous at every padded size:
    hooks refuses with the error at the caller's batch size and auto falls back to vmap,
    whose numbers it returns."""
    torch.manual_seed(0)
    m = nn.Linear(3, 2)

    def loss(p, x):
        block = x.unsqueeze(1).expand(x.shape[0], x.shape[0], x.shape[1])
        return torch.func.functional_call(m, p, (block,)).pow(2).sum((1, 2))

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"shape \(4, 4, 3\): several axes have the batch size 4"):
        fp.per_sample_grads(loss, method="hooks")(params_of(m), x)
    with pytest.warns(UserWarning, match="ambiguous"):
        got = fp.per_sample_grads(loss)(params_of(m), x)
    want = fp.per_sample_grads(loss, method="vmap")(params_of(m), x)
    assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)


def test_in_place_change_of_a_saved_input_is_an_error():
    def loss(p, x):
        x = x.clone()
        out = F.linear(x, p["w"])
        x.mul_(2)
        return out.sum(-1)

    with pytest.raises(RuntimeError, match="modified by an in-place operation"):
        fp.per_sample_grads(loss, method="hooks")({"w": torch.randn(2, 3)}, torch.randn(4, 3))


def test_other_errors():
    m = nn.Linear(3, 2)
    p, x = params_of(m), torch.randn(4, 3)
    with pytest.raises(ValueError, match="`method` must be one of"):
        fp.per_sample_grads(squared(m), method="ghost")
    with pytest.raises(ValueError, match="keep_batch_dim=False"):
        fp.per_sample_grads(squared(m), method="hooks", keep_batch_dim=False)(p, x, x[:, :2])
    with pytest.raises(ValueError, match=r"disagree on the batch size.*has 4.*has 3"):
        fp.per_sample_grads(squared(m), method="hooks")(p, x, torch.randn(3, 2))
    with pytest.raises(ValueError, match="cannot run inside a torch.func transform"):
        torch.func.vmap(lambda x: fp.per_sample_grads(squared(m), method="hooks")(p, x, x[..., :2]))(x[None])
    # sparse=True embeddings are no longer refused: tests/test_grad_sample_embedding_options.py


def test_keyed_dropout_through_functionalize_matches_loop_with_per_example_keys():
    torch.manual_seed(0)
    model = fp.functionalize(nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 2)))
    variables = model.init(fp.random.key(0), torch.zeros(1, 4))

    def loss(p, x, keys):
        out, _ = model.apply({"params": p}, x, train=True, key=keys)
        return (out ** 2).sum(-1)

    x, keys = torch.randn(5, 4), fp.random.split(fp.random.key(1), 5)
    assert_matches(loss, variables["params"], x, keys)


def test_lstm_classifier_with_keyed_dropout_in_train_mode_matches_loop():
    """fp.functionalize + fp.nn.LSTM (inter-layer dropout too) with one key per example."""

    class TextClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 4)
            self.lstm = fp.nn.LSTM(4, 3, num_layers=2, bidirectional=True, batch_first=True, dropout=0.3)
            self.drop, self.fc1, self.fc2 = nn.Dropout(0.5), nn.Linear(6, 5), nn.Linear(5, 2)

        def forward(self, t):
            h, _ = self.lstm(self.emb(t))
            return self.fc2(F.relu(self.fc1(self.drop(h))).mean(1))

    torch.manual_seed(0)
    model = fp.functionalize(TextClassifier())
    variables = model.init(fp.random.key(0), torch.zeros(1, 6, dtype=torch.long))

    def loss(p, t, y, keys):
        out, _ = model.apply({"params": p}, t, train=True, key=keys)
        return F.cross_entropy(out, y, reduction="none")

    t, y = torch.randint(0, 20, (4, 6)), torch.randint(0, 2, (4,))
    assert_matches(loss, variables["params"], t, y, fp.random.split(fp.random.key(1), 4))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(1, 5), c_in=st.integers(1, 3), c_out=st.integers(1, 3), k=st.integers(1, 3),
       stride=st.integers(1, 2), pad=st.integers(0, 2), dil=st.integers(1, 2))
def test_conv2d_hypothesis(batch, c_in, c_out, k, stride, pad, dil):
    torch.manual_seed(batch * 100 + k)
    m = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dil)
    x = torch.randn(batch, c_in, 7, 6)
    assert_matches(squared(m), params_of(m), x, targets(m, x))


class Checkpointed(nn.Module):
    """A block run under ``torch.utils.checkpoint``, which recomputes it in the backward."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 1)
        self.reentrant = reentrant

    def block(self, h: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.b(torch.tanh(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(self.block, self.a(x), use_reentrant=self.reentrant)
        return self.head(h)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_refused_by_name(reentrant):
    """The recompute runs after functional_call has put the module's own parameters back,
    so it reads those: plain autograd gets gradients for the module's values, not the
    ones passed (checked here), and the engines say so instead of failing inside torch."""
    torch.manual_seed(0)
    model = Checkpointed(reentrant)
    params = {k: v.detach() + 0.5 for k, v in model.named_parameters()}  # not the module's

    def losses(p, x):
        return torch.func.functional_call(model, p, (x,)).pow(2).sum(1)

    x = torch.randn(3, 4)
    if not reentrant:  # the hazard itself: plain autograd through functional_call
        q = {k: v.clone().requires_grad_() for k, v in params.items()}
        got = torch.autograd.grad(losses(q, x).sum(), q["b.weight"])[0]
        model.b.weight.data += 0.5  # what the recompute should have read
        model.a.weight.data += 0.5
        model.a.bias.data += 0.5
        model.b.bias.data += 0.5
        model.head.weight.data += 0.5
        model.head.bias.data += 0.5
        want = loop_grads(losses, params, x)["b.weight"].sum(0)
        assert not torch.allclose(got, want)
    for call in (fp.per_sample_grads(losses), fp.per_sample_grads(losses, method="hooks"),
                 fp.clipped_grad(losses, 1.0), fp.per_sample_grad_norms(losses, method="ghost")):
        with pytest.raises(ValueError, match="activation checkpointing"):
            call(params, x)


@pytest.mark.parametrize("which", ["params", "batch", "both"])
def test_inference_tensors_take_the_fast_methods(which):
    # NOTE [inference tensors]: parameters or a batch made under torch.inference_mode()
    # crashed the fast methods ("Inference tensors cannot be saved for backward") where
    # vmap(grad) ran.
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params, x, y = params_of(m), torch.randn(5, 3), torch.randn(5, 2)
    want = loop_grads(squared(m), params, x, y)
    with torch.inference_mode():
        p_inf = {k: v.clone() for k, v in params.items()}
        x_inf = x.clone()
    p = p_inf if which in ("params", "both") else params
    xb = x_inf if which in ("batch", "both") else x
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast methods, no fall-back
        got = fp.per_sample_grads(squared(m))(p, xb, y)
        total, norms = fp.clipped_grad(squared(m), 1.0, method="ghost")(p, xb, y)
    assert all(torch.allclose(got[k], want[k], atol=TOL, rtol=0) for k in want)
    want_norms = torch.stack([g.flatten(1).square().sum(1) for g in want.values()]).sum(0).sqrt()
    assert torch.allclose(norms, want_norms, atol=TOL, rtol=0)
    c = (1.0 / (want_norms / 1.0).clamp(min=1.0))
    for k in want:
        assert torch.allclose(total[k], (want[k] * c.view(-1, *[1] * (want[k].dim() - 1))).sum(0),
                              atol=TOL, rtol=0)
