"""Ensembles: stacked variables + vmap over apply equal running each member alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functorch_pipeline as fp

N = 4


def _mlp():
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))


@pytest.fixture
def setup():
    model = fp.functionalize(_mlp())
    keys = fp.random.split(fp.random.key(0), N)
    stacked = fp.nn.ensemble_init(model, keys)
    members = [model.init(k) for k in keys]
    x = torch.randn(8, 5)
    return model, keys, stacked, members, x


def test_ensemble_init_stacks_member_inits(setup):
    model, keys, stacked, members, _ = setup
    assert fp.tree.allclose(stacked, fp.tree.stack(members), rtol=0, atol=0)
    assert stacked["params"]["0.weight"].shape == (N, 16, 5)
    assert not torch.equal(members[0]["params"]["0.weight"], members[1]["params"]["0.weight"])


def test_eval_equals_each_member_alone(setup):
    model, _, stacked, members, x = setup
    out = fp.nn.ensemble_apply(model, stacked, x)
    assert out.shape == (N, 8, 3)
    for i, v in enumerate(members):
        assert torch.allclose(out[i], model.apply(v, x), atol=1e-6)
    # the same by hand with fp.vmap
    by_hand = fp.vmap(lambda v: model.apply(v, x))(stacked)
    assert torch.allclose(by_hand, out, atol=1e-6)


def test_per_member_inputs(setup):
    model, _, stacked, members, _ = setup
    xs = torch.randn(N, 8, 5)
    out = fp.nn.ensemble_apply(model, stacked, xs, in_axes=0)
    for i, v in enumerate(members):
        assert torch.allclose(out[i], model.apply(v, xs[i]), atol=1e-6)


def test_train_with_keys_and_batchnorm_equals_each_member_alone(setup):
    model, _, stacked, members, x = setup
    member_keys = fp.random.split(fp.random.key(7), N)
    out, new = fp.nn.ensemble_apply(model, stacked, x, train=True, key=member_keys)
    assert new["1.running_mean"].shape == (N, 16)
    for i, v in enumerate(members):
        ref_out, ref_new = model.apply(v, x, train=True, key=member_keys[i])
        assert torch.equal(out[i] == 0, ref_out == 0)  # the same dropout masks
        assert torch.allclose(out[i], ref_out, atol=1e-5)
        assert fp.tree.allclose(fp.tree.unstack(new)[i], ref_new, atol=1e-6)
    assert int(stacked["buffers"]["1.num_batches_tracked"].sum()) == 0  # inputs untouched
    # one key is split into one key per member
    one, _ = fp.nn.ensemble_apply(model, stacked, x, train=True, key=fp.random.key(7))
    assert torch.allclose(one, out, atol=0)


def test_per_member_per_example_keys(setup):
    model, _, stacked, members, x = setup
    keys = fp.random.split(fp.random.key(1), N * 8).reshape(N, 8, 2)
    out, _ = fp.nn.ensemble_apply(model, stacked, x, train=True, key=keys)
    for i, v in enumerate(members):
        ref, _ = model.apply(v, x, train=True, key=keys[i])
        assert torch.allclose(out[i], ref, atol=1e-5)


def _loss(model, params, buffers, x, y):
    logits, _ = model.apply({"params": params, "buffers": buffers}, x, train=True, key=fp.random.key(3))
    return F.cross_entropy(logits, y)


def _train_ensemble_and_loop(update_stacked, update_one, init_stacked, init_one, steps=3):
    model = fp.functionalize(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)))
    keys = fp.random.split(fp.random.key(0), N)
    stacked = fp.tree.astype(fp.nn.ensemble_init(model, keys), torch.float64)
    x, y = torch.randn(N, 16, 5, dtype=torch.float64), torch.randint(0, 3, (N, 16))

    def ensemble_loss(params):  # members are independent: the sum's gradient is each member's own
        per_member = fp.vmap(lambda p, xi, yi: _loss(model, p, {}, xi, yi))(params, x, y)
        return per_member.sum()

    params, state = stacked["params"], init_stacked(stacked["params"])
    for _ in range(steps):
        grads = fp.grad(ensemble_loss)(params)
        params, state = update_stacked(grads, state, params)

    for i in range(N):
        p = fp.tree.unstack(stacked["params"])[i]
        s = init_one(p)
        for _ in range(steps):
            g = fp.grad(lambda q, i=i: _loss(model, q, {}, x[i], y[i]))(p)
            p, s = update_one(g, s, p)
        assert fp.tree.allclose(fp.tree.unstack(params)[i], p, rtol=1e-10, atol=1e-12)
        assert not fp.tree.allclose(p, fp.tree.unstack(stacked["params"])[i])


def test_training_an_ensemble_with_plain_sgd():
    def sgd(g, s, p):
        return fp.tree.map(lambda a, b: a - 0.1 * b, p, g), s

    _train_ensemble_and_loop(sgd, sgd, lambda p: None, lambda p: None)


@pytest.mark.parametrize("vmapped_update", [False, True])
def test_training_an_ensemble_with_one_adam_state(vmapped_update):
    optim = pytest.importorskip("functorch_pipeline.optim")
    opt = optim.adam(1e-2)

    def step(g, s, p):
        updates, s = opt.update(g, s, p)
        return optim.apply_updates(p, updates), s

    if vmapped_update:  # one state with a member axis, updated with fp.vmap
        _train_ensemble_and_loop(fp.vmap(step), step, fp.vmap(opt.init), opt.init)
    else:  # one unbatched state for the stacked tree: adam is elementwise
        _train_ensemble_and_loop(step, step, opt.init, opt.init)


def test_ensemble_errors(setup):
    model, _, stacked, _, x = setup
    with pytest.raises(TypeError, match=r"ensemble_init\(model, keys\): `keys` must be a key batch of shape \(N, 2\)"):
        fp.nn.ensemble_init(model, fp.random.key(0))
    with pytest.raises(ValueError, match="`key` has 3 keys on axis 0 but the ensemble has 4 members"):
        fp.nn.ensemble_apply(model, stacked, x, train=True, key=fp.random.split(fp.random.key(0), 3))
    with pytest.raises(ValueError, match="`in_axes` has 2 entries for 1 inputs"):
        fp.nn.ensemble_apply(model, stacked, x, in_axes=(0, None))
    with pytest.raises(TypeError, match="`model` must be a FunctionalModel"):
        fp.nn.ensemble_apply(lambda v, x: x, stacked, x)
    with pytest.raises(ValueError, match=r"`variables` is not a stack of members: leaf at path `buffers\['1.num_batches_tracked'\]` has 4"):
        fp.nn.ensemble_apply(model, {"params": {**stacked["params"], "0.bias": stacked["params"]["0.bias"][:2]},
                                     "buffers": stacked["buffers"]}, x)
    with pytest.raises(ValueError, match="`variables` must be stacked variables whose every leaf has a leading member axis"):
        fp.nn.ensemble_apply(model, fp.tree.unstack(stacked)[0], x)
