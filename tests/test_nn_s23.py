"""fp.nn fixes from sweep s23: the fused recurrent path under keyed ``apply``, one-layer
``nn.LSTM`` with dropout under ``apply``, keyed ``rrelu`` at zero, ``replace_rnns`` hook
warnings, copying the deprecated ``weight_norm``, ``fp.nn.init`` argument errors, the loop
path's dtype under autocast and ``input_size=0``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline.nn import GRU
from functorch_pipeline.nn import LSTM
from functorch_pipeline.nn import RNN
from functorch_pipeline.nn import init
from functorch_pipeline.nn import recurrent

try:  # JAX is a reference where installed (the bench extra); CI runs without it
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:
    jax = None
needs_jax = pytest.mark.skipif(jax is None, reason="jax is not installed (the bench extra)")

OURS = {"LSTM": (LSTM, nn.LSTM), "GRU": (GRU, nn.GRU), "RNN": (RNN, nn.RNN)}


def _leaves(tree):
    return torch.utils._pytree.tree_leaves(tree)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts calls of the fused layer stack (NOTE [fused fast path])."""
    calls: list[int] = []
    orig = recurrent._RNNBase._layers_fused

    def spy(self, *args, **kwargs):
        calls.append(1)
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(recurrent._RNNBase, "_layers_fused", spy)
    return calls


# -- 01: keyed apply takes the fused kernel ---------------------------------------------------

@settings(max_examples=12, deadline=None)
@given(kind=st.sampled_from(sorted(OURS)), layers=st.integers(1, 3), bidirectional=st.booleans(),
       batch_first=st.booleans(), dropout=st.sampled_from([0.0, 0.4]), key_batch=st.booleans())
def test_keyed_train_apply_is_fused_and_equals_loop(kind, layers, bidirectional, batch_first, dropout,
                                                    key_batch):
    """apply(train=True, key) runs the fused kernel (spy) with the loop path's outputs and
    gradients, keyed inter-layer dropout included (float64)."""
    cls = OURS[kind][0]
    calls: list[int] = []
    orig = recurrent._RNNBase._layers_fused

    def spy(self, *args, **kwargs):
        calls.append(1)
        return orig(self, *args, **kwargs)

    g = torch.Generator().manual_seed(layers * 8 + bidirectional * 4 + batch_first * 2 + key_batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout with one layer
        m = cls(3, 4, num_layers=layers, batch_first=batch_first, dropout=dropout,
                bidirectional=bidirectional, dtype=torch.float64)
    model = fp.functionalize(m)
    v = model.variables_from_state_dict(m.state_dict())
    x = torch.randn(5, 6, 3, dtype=torch.float64, generator=g)
    batch = 5 if batch_first else 6  # keyed dropout sees the batch on axis 0 either way
    key = fp.random.split(fp.random.key(1), batch) if key_batch else fp.random.key(1)

    def loss(p, x):
        (out, _), _ = model.apply({"params": p, "buffers": {}}, x, train=True, key=key)
        return (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).pow(2).sum()

    recurrent._RNNBase._layers_fused = spy
    try:
        fused_loss, fused_grads = fp.value_and_grad(loss, argnums=(0, 1))(v["params"], x)
    finally:
        recurrent._RNNBase._layers_fused = orig
    assert len(calls) == 1
    cls.fused = False
    try:
        loop_loss, loop_grads = fp.value_and_grad(loss, argnums=(0, 1))(v["params"], x)
    finally:
        del cls.fused  # back to _RNNBase.fused
    torch.testing.assert_close(fused_loss, loop_loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(_leaves(fused_grads), _leaves(loop_grads), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(OURS))
def test_keyed_train_apply_equals_torch_without_dropout(kind, fused_calls):
    """Independent reference: nn.LSTM/GRU/RNN's own output and torch.autograd gradients."""
    ours_cls, ref_cls = OURS[kind]
    ref = ref_cls(3, 4, num_layers=2, batch_first=True, dtype=torch.float64)
    model = fp.functionalize(ours_cls(3, 4, num_layers=2, batch_first=True, dtype=torch.float64))
    v = model.variables_from_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    params = dict(ref.named_parameters())
    out_ref = ref(x)[0]
    grads_ref = torch.autograd.grad(out_ref.pow(2).sum(), list(params.values()))

    def loss(p):
        (out, _), _ = model.apply({"params": p, "buffers": {}}, x, train=True, key=fp.random.key(0))
        return out.pow(2).sum()

    grads = fp.grad(loss)(v["params"])
    assert fused_calls
    for name, g_ref in zip(params, grads_ref, strict=True):
        torch.testing.assert_close(grads[name], g_ref, rtol=1e-10, atol=1e-12)


def test_fused_path_not_taken_under_engines_or_foreign_modes(fused_calls):
    """The per-sample engines and any other TorchFunctionMode still get the per-op loop."""
    m = LSTM(3, 4, num_layers=2, batch_first=True, dropout=0.3, dtype=torch.float64)
    model = fp.functionalize(m)
    v = model.variables_from_state_dict(m.state_dict())
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    keys = fp.random.split(fp.random.key(3), 4)

    def loss(p, x, k):
        (out, _), _ = model.apply({"params": p, "buffers": {}}, x, train=True, key=k)
        return out.pow(2).sum((1, 2))

    ref = [fp.grad(lambda p, i=i: loss(p, x[i:i + 1], keys[i:i + 1]).sum())(v["params"]) for i in range(4)]
    fused_calls.clear()
    for method in ("hooks", "vmap"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grads = fp.per_sample_grads(loss, method=method)(v["params"], x, keys)
        for name in v["params"]:
            torch.testing.assert_close(grads[name], torch.stack([r[name] for r in ref]), rtol=1e-9, atol=1e-12)
    assert not fused_calls

    class Foreign(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Foreign():
        model.apply(v, x, train=True, key=fp.random.key(0))
    assert not fused_calls
    model.apply(v, x, train=True, key=fp.random.key(0))  # the spy does see a fused call
    assert fused_calls


# -- 02: a one-layer torch RNN with dropout under keyed apply ---------------------------------

@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_torch_rnn_one_layer_with_dropout_runs_under_keyed_apply(cls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: dropout has no effect with one layer
        rnn = cls(3, 4, num_layers=1, dropout=0.5, dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    ref = rnn(x)[0]  # train mode: no dropout is drawn with one layer
    model = fp.functionalize(rnn)
    v = model.variables_from_state_dict(rnn.state_dict())
    (out, _), _ = model.apply(v, x, train=True, key=fp.random.key(0))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    rnn2 = cls(3, 4, num_layers=2, dropout=0.5)
    model2 = fp.functionalize(rnn2)
    with pytest.raises(RuntimeError, match=f"an nn.{cls.__name__} with dropout=0.5 ran in train mode"):
        model2.apply(model2.variables_from_state_dict(rnn2.state_dict()), x.float(), train=True,
                     key=fp.random.key(0))


# -- 03: keyed rrelu at exactly zero ----------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), lower=st.floats(0.0, 0.4), width=st.floats(0.01, 0.5))
def test_keyed_rrelu_gradient_at_zero_is_the_random_slope(seed, lower, width):
    """torch's rrelu_with_noise gives x <= 0 the random slope: the gradient at 0 is the slope
    that -1 would be scaled by under the same draws. Ours must keep that, with its own keys."""
    upper = lower + width
    n = 16
    torch.manual_seed(seed)  # torch's own rule, checked on torch (same seed = same slopes)
    z = torch.zeros(n, requires_grad=True)
    F.rrelu(z, lower, upper, training=True).sum().backward()
    torch.manual_seed(seed)
    torch.testing.assert_close(z.grad, -F.rrelu(-torch.ones(n), lower, upper, training=True))

    model = fp.functionalize(nn.RReLU(lower, upper))
    key = fp.random.key(seed)
    grad0 = torch.func.grad(lambda x: model.apply({}, x, train=True, key=key)[0].sum())(torch.zeros(n))
    slope = -model.apply({}, -torch.ones(n), train=True, key=key)[0]
    torch.testing.assert_close(grad0, slope)
    assert bool(((grad0 >= lower - 1e-6) & (grad0 <= upper + 1e-6)).all())
    x = torch.tensor([float("nan"), 2.0, 0.0])  # NaN and positives: slope 1, as in torch
    xt = x.clone().requires_grad_(True)
    F.rrelu(xt, lower, upper, training=True).sum().backward()
    ours = torch.func.grad(lambda x: model.apply({}, x, train=True, key=key)[0].sum())(x)
    torch.testing.assert_close(ours[:2], xt.grad[:2])
    # eval: the mean slope at 0, as torch's leaky_relu
    xt = torch.zeros(3, requires_grad=True)
    F.rrelu(xt, lower, upper, training=False).sum().backward()
    ours = torch.func.grad(lambda x: model.apply({}, x).sum())(torch.zeros(3))
    torch.testing.assert_close(ours, xt.grad)


# -- 04: replace_rnns and a full backward pre hook -------------------------------------------

def test_replace_rnns_warns_about_backward_pre_hook():
    m = nn.LSTM(3, 4)
    m.register_full_backward_pre_hook(lambda mod, grad_output: None)
    with pytest.warns(UserWarning, match=r"replace_rnns\(module\): hooks on `0` are not carried over "
                                         r"to the replacement \(backward pre hooks\)"):
        new = fp.nn.replace_rnns(nn.Sequential(m))
    assert not new[0]._backward_pre_hooks
    plain = nn.LSTM(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp.nn.replace_rnns(nn.Sequential(plain))  # no hooks: no warning


# -- 05: the deprecated weight_norm ----------------------------------------------------------

def _old_weight_norm(module, name="weight"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(module, name)


def test_functionalize_old_weight_norm_names_api_and_replacement():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), _old_weight_norm(nn.Linear(4, 2)))
    with pytest.raises(TypeError, match=r"functionalize\(module\): `2.weight` comes from the deprecated "
                                        r"torch.nn.utils.weight_norm.*parametrizations.weight_norm"):
        fp.functionalize(net)
    rnn = _old_weight_norm(nn.LSTM(3, 4), "weight_hh_l0")
    with pytest.raises(TypeError, match=r"replace_rnns\(module\): `0.weight_hh_l0` comes from the "
                                        r"deprecated torch.nn.utils.weight_norm"):
        fp.nn.replace_rnns(nn.Sequential(rnn))
    # the advice works: the parametrized module functionalizes with the module's own output
    new = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.utils.parametrizations.weight_norm(nn.Linear(4, 2)))
    model = fp.functionalize(new)
    x = torch.randn(5, 3)
    torch.testing.assert_close(model.apply(model.variables_from_state_dict(new.state_dict()), x), new(x))


def test_copy_error_names_tensor_attribute_with_history():
    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.cache = self.lin.weight * 2

        def forward(self, x):
            return self.lin(x)

    with pytest.raises(TypeError, match=r"functionalize\(module\): `0.cache` is a tensor attribute "
                                        r"with autograd history \(grad_fn=MulBackward0\)"):
        fp.functionalize(nn.Sequential(Cached()))


# -- 06: fp.nn.init arguments -----------------------------------------------------------------

@pytest.mark.parametrize("factory", [init.kaiming_normal, init.kaiming_uniform])
def test_kaiming_unknown_nonlinearity(factory):
    with pytest.raises(ValueError):  # torch raises too
        torch.nn.init.kaiming_normal_(torch.empty(3, 3), nonlinearity="gelu")
    with pytest.raises(ValueError, match=rf"init.{factory.__name__}\(a, mode, nonlinearity\): "
                                         r"`nonlinearity` must be one of .*'relu'.*got 'gelu'"):
        factory(nonlinearity="gelu")
    with pytest.raises(ValueError, match=rf"init.{factory.__name__}\(a, mode, nonlinearity\): "
                                         "negative_slope"):
        factory(a="x")


@pytest.mark.parametrize("scale", [-1.0, -1e-9, float("nan"), float("inf"), True, "2"])
def test_variance_scaling_rejects_bad_scale(scale):
    with pytest.raises(ValueError, match=r"init.variance_scaling\(scale, mode, distribution\): "
                                         r"`scale` must be a finite number >= 0"):
        init.variance_scaling(scale, "fan_in", "normal")


@needs_jax
@pytest.mark.parametrize("distribution", ["truncated_normal", "normal", "uniform"])
def test_variance_scaling_zero_scale_gives_zeros_as_jax(distribution):
    want = np.asarray(jax.nn.initializers.variance_scaling(0.0, "fan_in", distribution)(
        jax.random.PRNGKey(0), (3, 4)))
    got = init.variance_scaling(0.0, "fan_in", distribution)(fp.random.key(0), (4, 3))
    assert np.array_equal(np.abs(got.T.numpy()), np.abs(want))
    w = init.variance_scaling(np.float32(2.0), "fan_in", "normal")(fp.random.key(0), (400, 100))
    assert abs(float(w.var()) - 2 / 100) < 2e-3  # a NumPy scalar still works


@needs_jax
@settings(max_examples=10, deadline=None)
@given(n=st.integers(0, 50), seed=st.integers(0, 1000))
def test_int_shape_is_a_1d_shape_as_in_jax(n, seed):
    key = fp.random.key(seed)
    assert jax.nn.initializers.normal()(jax.random.PRNGKey(seed), n).shape == (n,)
    for make in (init.normal(), init.uniform(), init.truncated_normal(), init.constant(2.0)):
        torch.testing.assert_close(make(key, n), make(key, (n,)))
    assert init.zeros(key, n).shape == (n,) and init.ones(key, n).shape == (n,)


@pytest.mark.parametrize("shape", [3.0, (2, 3.5), "ab", None])
def test_bad_shape_names_api(shape):
    with pytest.raises(TypeError, match=r"init.normal\(mean, std\): `shape` must be an int or a "
                                        "sequence of ints"):
        init.normal()(fp.random.key(0), shape)


# -- 07: the loop path under autocast ---------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(OURS))
@pytest.mark.parametrize("given_state", [False, True])
def test_loop_path_dtype_under_autocast_matches_torch(kind, given_state):
    """nn.LSTM comes back in bfloat16 under CPU autocast (its kernel casts h_0 and c_0 too);
    the loop path (fused=False, per_sample_grads' hooks) must give the same dtype and values
    to bfloat16 rounding, for every state output. GRU/RNN follow torch likewise. Under vmap
    only the values are compared (NOTE [states under autocast]: a documented limitation)."""
    ours_cls, ref_cls = OURS[kind]
    ref = ref_cls(3, 4, num_layers=2)
    ours = ours_cls(3, 4, num_layers=2)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3)
    h0 = torch.randn(2, 2, 4)
    hx = ((h0, torch.randn(2, 2, 4)) if kind == "LSTM" else h0) if given_state else None

    def flat(result):
        out, state = result
        return [out, *(state if isinstance(state, tuple) else (state,))]

    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = flat(ref(x, hx))
        ours.fused = False
        loop = flat(ours(x, hx))
        ours.fused = True
        fused = flat(ours(x, hx))
        if hx is None:
            mapped = flat(torch.func.vmap(lambda xi: ours(xi), in_dims=1, out_dims=(1, 1))(x))
        else:
            states = hx if isinstance(hx, tuple) else (hx,)
            mapped = flat(torch.func.vmap(
                lambda xi, *s: ours(xi, s if kind == "LSTM" else s[0]), in_dims=(1, *[1] * len(states)),
                out_dims=(1, 1))(x, *states))
    for got in (loop, fused, mapped):
        if got is not mapped:
            assert [t.dtype for t in got] == [t.dtype for t in want]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=3e-2)


def test_per_sample_grads_under_autocast_matches_loop():
    torch.manual_seed(0)
    m = LSTM(3, 4, num_layers=2, batch_first=True)
    model = fp.functionalize(m)
    v = model.variables_from_state_dict(m.state_dict())
    x = torch.randn(4, 5, 3)
    dtypes = []

    def loss(p, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.apply({"params": p, "buffers": {}}, x)[0]
        dtypes.append(out.dtype)
        return out.float().pow(2).sum((1, 2))

    ref = [fp.grad(lambda p, i=i: loss(p, x[i:i + 1]).sum())(v["params"]) for i in range(4)]
    assert set(dtypes) == {torch.bfloat16}  # fused, as nn.LSTM
    for method in ("hooks", "vmap"):
        dtypes.clear()
        grads = fp.per_sample_grads(loss, method=method)(v["params"], x)
        for name in v["params"]:
            torch.testing.assert_close(grads[name], torch.stack([r[name] for r in ref]), rtol=0, atol=2e-2)
        if method == "hooks":  # the loop path; vmap: NOTE [states under autocast]
            assert set(dtypes) == {torch.bfloat16}


# -- could-not-decide: input_size=0 ------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(OURS))
def test_input_size_zero_rejected_like_torch(kind):
    ours_cls, ref_cls = OURS[kind]
    with pytest.raises(ValueError, match="input_size must be greater than zero"):
        ref_cls(0, 3)
    with pytest.raises(ValueError, match=f"{kind}: input_size must be greater than zero, got 0"):
        ours_cls(0, 3)
