"""fp.functionalize: init, apply, purity, tied/frozen params, state_dict interop, errors."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn

import functorch_pipeline as fp

KEY = fp.random.key(0)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.embed(ids))))


def _snapshot(module: nn.Module):
    return (
        {k: v.clone() for k, v in module.state_dict().items()},
        [m.training for m in module.modules()],
        [type(m) for m in module.modules()],
    )


def _same(a, b) -> bool:
    sd_a, tr_a, ty_a = a
    sd_b, tr_b, ty_b = b
    return sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a) and tr_a == tr_b and ty_a == ty_b


# ---------------------------------------------------------------- init
def test_variables_are_keyed_like_state_dict():
    net = Net()
    v = fp.functionalize(net).init(KEY)
    assert set(v) == {"params", "buffers"}
    assert [*v["params"], *v["buffers"]] == [k for k, _ in net.named_parameters()] + [k for k, _ in net.named_buffers()]
    assert set(v["params"]) | set(v["buffers"]) == set(net.state_dict())
    for k, t in net.state_dict().items():
        got = v["params"].get(k, v["buffers"].get(k))
        assert got.shape == t.shape and got.dtype == t.dtype and not got.requires_grad


def test_init_is_a_function_of_the_key_only():
    model = fp.functionalize(Net())
    torch.manual_seed(1)
    a = model.init(KEY)
    torch.manual_seed(2)
    torch.randn(100)
    b = model.init(KEY)
    assert fp.tree.allclose(a, b, rtol=0, atol=0)
    c = model.init(fp.random.key(1))
    for name in ("conv.weight", "conv.bias", "fc.weight", "fc.bias"):  # BatchNorm starts at 1 and 0
        assert not torch.equal(a["params"][name], c["params"][name]), name
    state = torch.get_rng_state()
    model.init(KEY)
    assert torch.equal(state, torch.get_rng_state())


def test_init_draws_the_modules_own_default_initialisation():
    # children are reset in construction order, so for a Sequential the draws equal
    # constructing the module with the global generator seeded from the key
    make = lambda: nn.Sequential(nn.Linear(5, 7), nn.Conv1d(7, 3, 2), nn.Embedding(4, 3), nn.LayerNorm(3))  # noqa: E731
    v = fp.functionalize(make()).init(KEY)
    torch.manual_seed(fp.random.seed_from_key(KEY))
    reference = make()
    for name, p in reference.named_parameters():
        assert torch.equal(v["params"][name], p.detach()), name


def test_init_materialises_lazy_modules_and_leaves_the_module_lazy():
    net = nn.Sequential(nn.LazyConv2d(3, 3), nn.LazyBatchNorm2d(), nn.Flatten(), nn.LazyLinear(2))
    before = [type(m) for m in net.modules()]
    model = fp.functionalize(net)
    x = torch.randn(2, 1, 5, 5)
    v = model.init(KEY, x[:1])
    assert v["params"]["0.weight"].shape == (3, 1, 3, 3) and v["params"]["3.weight"].shape == (2, 27)
    assert v["buffers"]["1.running_mean"].shape == (3,)
    assert fp.tree.allclose(v, model.init(KEY, x), rtol=0, atol=0)  # sample size does not matter
    assert model.apply(v, x).shape == (2, 2)
    assert [type(m) for m in net.modules()] == before
    assert isinstance(net[0].weight, nn.parameter.UninitializedParameter)
    with pytest.raises(ValueError, match=r"lazy parameters \['0.weight'.*pass a sample input"):
        fp.functionalize(net).init(KEY)


def test_apply_on_a_lazy_module_without_init_takes_shapes_from_variables():
    v = fp.functionalize(nn.Linear(3, 2)).init(KEY)
    lazy = fp.functionalize(nn.LazyLinear(2))
    x = torch.randn(4, 3)
    assert torch.allclose(lazy.apply(v, x), x @ v["params"]["weight"].T + v["params"]["bias"])


def test_init_warns_about_parameters_without_reset():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) * self.scale

    with pytest.warns(UserWarning, match=r"parameters \['scale'\] belong to modules without reset_parameters"):
        v = fp.functionalize(Custom()).init(KEY)
    assert v["params"]["scale"].eq(1).all()


def test_init_rejects_bad_keys():
    with pytest.raises(TypeError, match=r"init\(key, \*sample_args\): `key` must be one key"):
        fp.functionalize(nn.Linear(2, 2)).init(0)
    with pytest.raises(TypeError, match="must be one key"):
        fp.functionalize(nn.Linear(2, 2)).init(fp.random.split(KEY, 2))


# ---------------------------------------------------------------- apply
def test_apply_matches_the_module_in_eval_and_train():
    net = Net()
    model = fp.functionalize(net)
    v = model.init(KEY)
    v = {"params": v["params"], "buffers": {**v["buffers"], "bn.running_mean": torch.randn(4), "bn.running_var": torch.rand(4) + 0.5}}
    x = torch.randn(5, 1, 6, 6)
    ref = model.to_module(v)
    assert torch.allclose(model.apply(v, x), ref.eval()(x), atol=1e-6)
    out, new = model.apply(v, x, train=True)
    ref.train()
    assert torch.allclose(out, ref(x), atol=1e-6)
    for k, b in ref.named_buffers():
        assert torch.allclose(new[k], b, atol=1e-6), k
    assert int(new["bn.num_batches_tracked"]) == 1 and int(v["buffers"]["bn.num_batches_tracked"]) == 0


def test_apply_never_mutates_inputs_or_the_module():
    net = Net()
    net.train()
    before = _snapshot(net)
    model = fp.functionalize(net)
    v = model.init(KEY)
    v_copy = fp.tree.clone(v)
    x = torch.randn(3, 1, 6, 6)
    x_copy = x.clone()
    model.apply(v, x)
    _, new = model.apply(v, x, train=True)
    fp.grad(lambda p: model.apply({"params": p, "buffers": v["buffers"]}, x, train=True)[0].sum())(v["params"])
    assert fp.tree.allclose(v, v_copy, rtol=0, atol=0) and torch.equal(x, x_copy)
    assert not torch.equal(new["bn.running_mean"], v["buffers"]["bn.running_mean"])
    assert _same(before, _snapshot(net))
    net.eval()
    before = _snapshot(net)
    model.apply(v, x, train=True)
    assert _same(before, _snapshot(net)) and not net.training
    assert not net._forward_hooks and not net._forward_pre_hooks


def test_eval_apply_does_not_write_a_buffer_the_module_updates():
    # A module that changes a buffer in place in eval mode too (a call counter, an EMA):
    # eval-mode apply wrote it into the caller's variables (2.0 after two calls), so the
    # same inputs gave another output the next call.
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1
            return self.lin(x) + self.calls

    model = fp.functionalize(Counter())
    v, x = model.init(KEY), torch.ones(1, 2)
    first, second = model.apply(v, x), model.apply(v, x)
    assert float(v["buffers"]["calls"]) == 0.0 and torch.equal(first, second)
    want = F.linear(x, v["params"]["lin.weight"], v["params"]["lin.bias"]) + 1.0  # one call's count
    assert torch.equal(first, want)


def test_train_always_returns_a_pair():
    model = fp.functionalize(nn.Linear(3, 2))
    v = model.init(KEY)
    out, new = model.apply(v, torch.ones(1, 3), train=True)
    assert out.shape == (1, 2) and new == {}
    assert model.apply({"params": v["params"]}, torch.ones(1, 3)).shape == (1, 2)


def test_apply_passes_kwargs_and_composes_with_grad_vmap_jit():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, *, scale=1.0):
            return self.fc(x) * scale

    model = fp.functionalize(KW())
    v = model.init(KEY)
    x = torch.randn(4, 3)
    assert torch.allclose(model.apply(v, x, scale=2.0), 2 * model.apply(v, x))
    # grad of the functional model equals autograd on the module
    ref = model.to_module(v)
    ref(x).pow(2).sum().backward()
    g = fp.grad(lambda p: model.apply({"params": p}, x).pow(2).sum())(v["params"])
    assert torch.allclose(g["fc.weight"], ref.fc.weight.grad) and torch.allclose(g["fc.bias"], ref.fc.bias.grad)
    # vmap over inputs
    assert torch.allclose(fp.vmap(lambda xi: model.apply(v, xi))(x), model.apply(v, x), atol=1e-6)


# ---------------------------------------------------------------- tied and frozen
def test_tied_parameters_appear_once_and_stay_tied():
    net = Tied()
    model = fp.functionalize(net)
    v = model.init(KEY)
    assert "embed.weight" in v["params"] and "head.weight" not in v["params"]
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ref = model.to_module(v)
    assert ref.head.weight is ref.embed.weight
    assert torch.allclose(model.apply(v, ids), ref(ids), atol=1e-6)
    g = fp.grad(lambda p: model.apply({"params": p}, ids).pow(2).sum())(v["params"])
    ref(ids).pow(2).sum().backward()
    assert torch.allclose(g["embed.weight"], ref.embed.weight.grad, atol=1e-6)  # both uses
    sd = model.to_state_dict(v)
    assert list(sd) == list(net.state_dict()) and sd["head.weight"] is not None
    assert torch.equal(sd["head.weight"], sd["embed.weight"])
    assert fp.tree.allclose(model.variables_from_state_dict(sd), v, rtol=0, atol=0)
    only_alias = {k: t for k, t in sd.items() if k != "embed.weight"}
    assert torch.equal(model.variables_from_state_dict(only_alias)["params"]["embed.weight"], v["params"]["embed.weight"])


def test_tied_errors():
    model = fp.functionalize(Tied())
    v = model.init(KEY)
    sd = model.to_state_dict(v)
    sd["head.weight"] = sd["head.weight"] + 1
    with pytest.raises(ValueError, match="`head.weight` is tied to `embed.weight` in the module but the state_dict holds different values"):
        model.variables_from_state_dict(sd)
    bad = {"params": {**v["params"], "head.weight": v["params"]["embed.weight"]}}
    with pytest.raises(ValueError, match=r"unexpected \[\"params\['head.weight'\]\"\].*is tied to .*pass it once"):
        model.apply(bad, torch.tensor([[1]]))


def test_frozen_parameters_stay_in_params_with_a_mask():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    for p in net[0].parameters():
        p.requires_grad_(False)
    model = fp.functionalize(net)
    v = model.init(KEY)
    assert model.trainable_mask() == {"0.weight": False, "0.bias": False, "1.weight": True, "1.bias": True}
    assert set(model.trainable_mask()) == set(v["params"])
    x = torch.randn(2, 3)
    g = fp.grad(lambda p: model.apply({"params": p}, x).sum())(v["params"])
    assert set(g) == set(v["params"])  # apply does not detach frozen params (documented)


def test_trainable_mask_drives_a_masked_optimizer():
    from functorch_pipeline import optim
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    net[0].weight.requires_grad_(False)
    model = fp.functionalize(net)
    params = model.init(KEY)["params"]
    grads = fp.grad(lambda p: model.apply({"params": p}, torch.ones(2, 3)).sum())(params)
    # the documented path (NOTE [frozen parameters]): freeze() takes frozen_mask()
    opt = optim.chain(optim.masked(optim.sgd(0.1), model.trainable_mask()),
                      optim.freeze(model.frozen_mask()))
    updates, _ = opt.update(grads, opt.init(params), params)
    new = optim.apply_updates(params, updates)
    assert torch.allclose(new["1.weight"], params["1.weight"] - 0.1 * grads["1.weight"])
    assert torch.equal(new["0.weight"], params["0.weight"])
    # masked() alone passes the frozen leaves' raw gradients through (optax semantics)
    alone = optim.masked(optim.sgd(0.1), model.trainable_mask())
    moved = optim.apply_updates(params, alone.update(grads, alone.init(params), params)[0])
    assert torch.allclose(moved["0.weight"], params["0.weight"] + grads["0.weight"])


# ---------------------------------------------------------------- state_dict interop
def test_state_dict_round_trip_and_checkpoint_file(tmp_path):
    net = Net()
    net(torch.randn(4, 1, 6, 6))  # move the running stats away from their defaults
    model = fp.functionalize(net)
    v = model.variables_from_state_dict(net.state_dict())
    assert v["params"]["fc.weight"].data_ptr() != net.fc.weight.data_ptr()
    sd = model.to_state_dict(v)
    assert list(sd) == list(net.state_dict())
    assert all(torch.equal(sd[k], t) for k, t in net.state_dict().items())
    torch.save(sd, tmp_path / "ckpt.pt")
    loaded = model.variables_from_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert fp.tree.allclose(loaded, v, rtol=0, atol=0)
    x = torch.randn(2, 1, 6, 6)
    assert torch.allclose(model.apply(loaded, x), net.eval()(x), atol=1e-6)


def test_to_module_copies_or_loads_in_place():
    net = Net()
    model = fp.functionalize(net)
    v = model.init(fp.random.key(5))
    before = _snapshot(net)
    m = model.to_module(v)
    assert m is not net and _same(before, _snapshot(net))
    assert torch.equal(m.fc.weight, v["params"]["fc.weight"]) and m.fc.weight.data_ptr() != v["params"]["fc.weight"].data_ptr()
    target = Net()
    out = model.to_module(v, target)
    assert out is target and torch.equal(target.conv.weight, v["params"]["conv.weight"])
    with pytest.raises(ValueError, match=r"to_module\(variables, module\): the variables do not fit `module`"):
        model.to_module(v, nn.Linear(2, 2))


def test_non_persistent_buffers_live_in_buffers_but_not_in_state_dict():
    class WithConst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)
            self.register_buffer("shift", torch.tensor([1.0, 2.0]), persistent=False)

        def forward(self, x):
            return self.fc(x) + self.shift

    net = WithConst()
    model = fp.functionalize(net)
    v = model.init(KEY)
    assert torch.equal(v["buffers"]["shift"], torch.tensor([1.0, 2.0]))
    assert "shift" not in model.to_state_dict(v)
    v2 = model.variables_from_state_dict(net.state_dict())
    assert torch.equal(v2["buffers"]["shift"], net.shift)
    moved = {"params": v["params"], "buffers": {"shift": torch.tensor([5.0, 5.0])}}
    assert torch.allclose(model.apply(moved, torch.zeros(1, 2)), v["params"]["fc.bias"] + 5)
    assert torch.equal(model.to_module(moved).shift, torch.tensor([5.0, 5.0]))


def test_state_dict_errors_and_non_strict():
    net = Net()
    model = fp.functionalize(net)
    sd = net.state_dict()
    partial = {k: t for k, t in sd.items() if k != "fc.bias"}
    with pytest.raises(ValueError, match=r"missing \['fc.bias'\], unexpected nothing"):
        model.variables_from_state_dict(partial)
    with pytest.raises(ValueError, match=r"missing nothing, unexpected \['extra.weight'\]"):
        model.variables_from_state_dict({**sd, "extra.weight": torch.zeros(1)})
    v = model.variables_from_state_dict({**partial, "extra": torch.zeros(1)}, strict=False)
    assert torch.equal(v["params"]["fc.bias"], net.fc.bias)
    with pytest.raises(ValueError, match=r"leaf at path `params\['fc.weight'\]` has shape \(3, 5\) but the module expects \(3, 64\)"):
        model.variables_from_state_dict({**sd, "fc.weight": torch.zeros(3, 5)})
    with pytest.raises(TypeError, match="entry `fc.bias` is a float, not a tensor"):
        model.variables_from_state_dict({**sd, "fc.bias": 1.0})


# ---------------------------------------------------------------- bad variables
def test_bad_variables_name_the_key_paths():
    model = fp.functionalize(Net())
    v = model.init(KEY)
    x = torch.randn(1, 1, 6, 6)
    no_bias = {"params": {k: t for k, t in v["params"].items() if k != "fc.bias"}, "buffers": v["buffers"]}
    with pytest.raises(ValueError, match=r"missing \[\"params\['fc.bias'\]\"\], unexpected nothing"):
        model.apply(no_bias, x)
    extra = {"params": {**v["params"], "fc.kernel": torch.zeros(1)}, "buffers": v["buffers"]}
    with pytest.raises(ValueError, match=r"missing nothing, unexpected \[\"params\['fc.kernel'\]\"\]"):
        model.apply(extra, x)
    with pytest.raises(ValueError, match=r"missing \[\"buffers\['bn.running_mean'\]\""):
        model.apply({"params": v["params"]}, x)
    wrong = {"params": {**v["params"], "conv.weight": torch.zeros(4, 1, 5, 5)}, "buffers": v["buffers"]}
    with pytest.raises(ValueError, match=r"leaf at path `params\['conv.weight'\]` has shape \(4, 1, 5, 5\) but the module expects \(4, 1, 3, 3\)"):
        model.apply(wrong, x)
    with pytest.raises(ValueError, match=r"`variables` has keys \['conv.weight'.*It looks like a params dict: pass \{'params': params\}"):
        model.apply(v["params"], x)
    with pytest.raises(ValueError, match=r"`variables` has keys \['batch_stats'\]"):
        model.apply({**v, "batch_stats": {}}, x)
    with pytest.raises(TypeError, match="`variables` must be a dict"):
        model.apply([v], x)
    with pytest.raises(TypeError, match=r"`variables\['params'\]` must be a dict"):
        model.apply({"params": list(v["params"].values())}, x)
    with pytest.raises(TypeError, match=r"leaf at path `params\['fc.bias'\]` is a float, not a tensor"):
        model.apply({"params": {**v["params"], "fc.bias": 0.0}, "buffers": v["buffers"]}, x)
    with pytest.raises(TypeError, match=r"`key` must be a key \(int64, shape \(2,\)\) or a key batch"):
        model.apply(v, x, key=torch.zeros(2))
    with pytest.raises(TypeError, match=r"functionalize\(module\): `module` must be an nn.Module"):
        fp.functionalize(lambda x: x)


# ---------------------------------------------------------------- keyed randomness
def _drop_model(p=0.5):
    return fp.functionalize(nn.Sequential(nn.Linear(6, 64), nn.Dropout(p)))


def test_dropout_is_a_function_of_the_key():
    model = _drop_model()
    v = model.init(KEY)
    x = torch.randn(8, 6)
    torch.manual_seed(0)
    a, _ = model.apply(v, x, train=True, key=fp.random.key(1))
    torch.manual_seed(1)
    state = torch.get_rng_state()
    b, _ = model.apply(v, x, train=True, key=fp.random.key(1))
    assert torch.equal(torch.get_rng_state(), state)
    c, _ = model.apply(v, x, train=True, key=fp.random.key(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    full = model.apply(v, x)
    kept = a != 0
    assert torch.allclose(a[kept], 2 * full[kept])
    assert 0.35 < float((~kept).double().mean()) < 0.65
    # eval ignores the key; train without a key is an error naming the layer
    assert torch.equal(model.apply(v, x, key=fp.random.key(1)), full)
    with pytest.raises(RuntimeError, match=r"called F.dropout\(p=0.5\) in train mode.*no `key` was given.*random layers: `1`"):
        model.apply(v, x, train=True)


def test_dropout_p_zero_and_one_need_no_randomness():
    x = torch.randn(4, 6)
    for p, expect in ((0.0, None), (1.0, 0.0)):
        model = _drop_model(p)
        v = model.init(KEY)
        out, _ = model.apply(v, x, train=True)  # no key needed: nothing random happens
        ref = model.apply(v, x)
        assert torch.equal(out, ref if expect is None else torch.zeros_like(ref))


def test_a_key_batch_is_one_key_per_example():
    model = _drop_model()
    v = model.init(KEY)
    x = torch.randn(5, 6)
    keys = fp.random.split(fp.random.key(3), 5)
    whole, _ = model.apply(v, x, train=True, key=keys)
    rows = torch.cat([model.apply(v, x[i : i + 1], train=True, key=keys[i : i + 1])[0] for i in range(5)])
    assert torch.equal(whole == 0, rows == 0) and torch.allclose(whole, rows, atol=1e-6)  # same masks
    with pytest.raises(ValueError, match=r"`key` is a batch of 3 keys .* input of shape \(5, 64\)"):
        model.apply(v, x, train=True, key=keys[:3])


def test_vmap_with_per_example_keys_draws_different_reproducible_masks():
    model = _drop_model()
    v = model.init(KEY)
    x = torch.ones(6, 6).expand(6, 6).clone()
    keys = fp.random.split(fp.random.key(4), 6)
    f = fp.vmap(lambda xi, k: model.apply(v, xi, train=True, key=k)[0], in_axes=(0, 0))
    a, b = f(x, keys), f(x, keys)
    assert torch.equal(a, b)
    masks = {tuple((r != 0).tolist()) for r in a}
    assert len(masks) == 6
    # one unmapped key: the same mask for every example (torch.func's randomness="same")
    same = fp.vmap(lambda xi: model.apply(v, xi, train=True, key=fp.random.key(4))[0])(x)
    assert all(torch.equal(same[0] != 0, r != 0) for r in same)


@pytest.mark.parametrize(
    "fn,shape,channel_axes",
    [
        (F.dropout1d, (4, 6, 9), 2),
        (F.dropout1d, (6, 9), 1),  # unbatched (C, L)
        (F.dropout2d, (4, 6, 3, 3), 2),
        (F.dropout2d, (4, 6, 9), 2),  # torch reads a 3-D input as (N, C, L)
        (F.dropout3d, (4, 6, 2, 2, 2), 2),
        (F.dropout3d, (6, 2, 2, 2), 1),  # unbatched (C, D, H, W)
        (F.feature_alpha_dropout, (4, 6, 3, 3), 2),
    ],
)
def test_feature_dropout_drops_the_same_channels_as_torch(fn, shape, channel_axes):
    x = torch.ones(shape)
    kwargs = {"training": True, "p": 0.5}

    class M(nn.Module):
        def forward(self, t):
            return fn(t, **kwargs)

    model = fp.functionalize(M())
    ours = model.apply({"params": {}}, x, key=fp.random.key(0))
    with pytest.warns() if fn is F.dropout2d and len(shape) == 3 else _nothing():
        theirs = fn(x, **kwargs)
    assert ours.shape == theirs.shape
    for out in (ours, theirs):  # constant over every axis after the channel axes
        flat = out.reshape(*shape[:channel_axes], -1)
        assert torch.equal(flat, flat[..., :1].expand_as(flat))
    assert set(ours.unique().tolist()) == set(theirs.unique().tolist())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("fn", [F.alpha_dropout, F.feature_alpha_dropout])
def test_alpha_dropout_constants_and_moments_match_torch(fn):
    class M(nn.Module):
        def forward(self, t):
            return fn(t, p=0.2, training=True)

    model = fp.functionalize(M())
    zeros = torch.zeros(200, 4, 1)
    ours = model.apply({"params": {}}, zeros, key=fp.random.key(0))
    theirs = fn(zeros, p=0.2, training=True)
    assert torch.allclose(ours.unique(), theirs.unique(), atol=1e-6)
    x = torch.randn(20000, 4, 1, dtype=torch.float64)
    y = model.apply({"params": {}}, x, key=fp.random.key(1))
    assert abs(float(y.mean())) < 0.05 and abs(float(y.var()) - 1) < 0.05


def test_rrelu_slopes_are_keyed():
    model = fp.functionalize(nn.RReLU(0.1, 0.3))
    x = -torch.ones(1000)
    out, _ = model.apply({"params": {}}, x, train=True, key=fp.random.key(0))
    slopes = out / x
    assert float(slopes.min()) >= 0.1 and float(slopes.max()) <= 0.3 and slopes.unique().numel() > 900
    assert torch.equal(out, model.apply({"params": {}}, x, train=True, key=fp.random.key(0))[0])
    assert torch.allclose(model.apply({"params": {}}, x), nn.RReLU(0.1, 0.3).eval()(x))
    pos = torch.ones(5)
    assert torch.equal(model.apply({"params": {}}, pos, train=True, key=KEY)[0], pos)


@pytest.mark.parametrize("causal,mask,gqa", [(False, None, False), (True, None, False), (False, "bool", False),
                                             (False, "float", False), (False, None, True)])
def test_keyed_attention_dropout_computes_sdpa(causal, mask, gqa):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2 if gqa else 4, 6, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2 if gqa else 4, 6, 8, generator=g, dtype=torch.float64)
    m = None
    if mask == "bool":
        m = torch.rand(5, 6, generator=g) > 0.3
        m[:, 0] = True
    elif mask == "float":
        m = torch.randn(5, 6, generator=g, dtype=torch.float64)

    class Attn(nn.Module):
        def forward(self, q, k, v, p):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=p, is_causal=causal, enable_gqa=gqa)

    model = fp.functionalize(Attn())
    reference = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=gqa)
    # p so small that no weight is dropped: the keyed maths must equal PyTorch's kernel
    tiny = model.apply({"params": {}}, q, k, v, 1e-12, key=KEY)
    assert torch.allclose(tiny, reference, atol=1e-12)
    a = model.apply({"params": {}}, q, k, v, 0.5, key=KEY)
    assert torch.equal(a, model.apply({"params": {}}, q, k, v, 0.5, key=KEY))
    assert not torch.allclose(a, reference)


@pytest.mark.parametrize("need_weights", [True, False])
def test_transformer_layers_take_keys(need_weights):
    layer = nn.MultiheadAttention(8, 2, dropout=0.3, batch_first=True)
    model = fp.functionalize(layer)
    v = model.init(KEY)
    x = torch.randn(3, 5, 8)
    run = lambda k: model.apply(v, x, x, x, train=True, key=k, need_weights=need_weights)[0][0]  # noqa: E731
    assert torch.equal(run(fp.random.key(1)), run(fp.random.key(1)))
    assert not torch.equal(run(fp.random.key(1)), run(fp.random.key(2)))
    with pytest.raises(RuntimeError, match="no `key` was given"):
        run(None)
    encoder = fp.functionalize(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True))
    ve = encoder.init(KEY)
    keys = fp.random.split(KEY, 3)
    whole, _ = encoder.apply(ve, x, train=True, key=keys)
    rows = [encoder.apply(ve, x[i : i + 1], train=True, key=keys[i : i + 1])[0] for i in range(3)]
    assert torch.allclose(whole, torch.cat(rows), atol=1e-6)


def test_fused_rnn_dropout_is_refused():
    model = fp.functionalize(nn.LSTM(4, 4, num_layers=2, dropout=0.2))
    v = model.init(KEY)
    with pytest.raises(RuntimeError, match=r"nn.LSTM with dropout=0.2 ran in train mode.*Use fp.nn.LSTM"):
        model.apply(v, torch.randn(3, 2, 4), train=True, key=KEY)
    out, _ = model.apply(v, torch.randn(3, 2, 4))  # eval: fine
    assert out.shape == (3, 2, 4)


def test_module_that_calls_dropout_itself_in_eval_uses_the_key():
    class MC(nn.Module):  # Monte Carlo dropout: always on
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 16)

        def forward(self, x):
            return F.dropout(self.fc(x), 0.5, training=True)

    model = fp.functionalize(MC())
    v = model.init(KEY)
    x = torch.randn(2, 4)
    assert torch.equal(model.apply(v, x, key=KEY), model.apply(v, x, key=KEY))
    assert not torch.equal(model.apply(v, x, key=KEY), model.apply(v, x, key=fp.random.key(9)))


def test_functionalize_is_idempotent_and_has_a_repr():
    model = fp.functionalize(Net())
    assert fp.functionalize(model) is model
    assert repr(model) == "FunctionalModel(Net, params=6, buffers=3)"
    assert copy.copy(model).module is model.module


def test_every_random_call_gets_its_own_key():
    class Many(nn.Module):
        def forward(self, x):
            return torch.stack([F.dropout(x, 0.5) for _ in range(20)])

    masks = fp.functionalize(Many()).apply({"params": {}}, torch.ones(64), key=KEY) != 0
    assert len({tuple(m.tolist()) for m in masks}) == 20


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 6), st.floats(0.05, 0.95), st.integers(0, 2**31))
def test_key_batch_equals_per_example_calls(n, p, seed):
    model = fp.functionalize(nn.Sequential(nn.Dropout(p), nn.Dropout1d(p)))
    x = torch.ones(n, 3, 5)
    keys = fp.random.split(fp.random.key(seed), n)
    whole, _ = model.apply({"params": {}}, x, train=True, key=keys)
    rows = torch.cat([model.apply({"params": {}}, x[i : i + 1], train=True, key=keys[i : i + 1])[0] for i in range(n)])
    assert torch.equal(whole, rows)
    kept = whole[whole != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p) ** 2))
