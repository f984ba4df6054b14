"""Issue 14 defects and ergonomics: frozen parameters, custom init, Flax-style TrainState,
train_step metrics. References: torch.optim on the module, direct construction under a seed."""

import warnings

import pytest
import torch
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline import optim

KEY = fp.random.key(0)
F64 = torch.float64


def _net():
    net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)
    net[0].weight.requires_grad_(False)
    return net


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 4, generator=g, dtype=F64), torch.randint(0, 3, (8,), generator=g)


def _loss(model, params, x, y):
    return torch.nn.functional.cross_entropy(model.apply({"params": params}, x), y)


# ------------------------------------------------------------------ frozen parameters
def test_masks_have_documented_polarities_and_freeze_keeps_frozen_fixed():
    model = fp.functionalize(_net())
    assert model.trainable_mask()["0.weight"] is False and model.frozen_mask()["0.weight"] is True
    assert all(model.trainable_mask()[k] != model.frozen_mask()[k] for k in model.trainable_mask())
    params = model.init(KEY)["params"]
    x, y = _batch()
    tx = optim.chain(optim.sgd(0.1), optim.freeze(model.frozen_mask()))
    grads = fp.grad(lambda p: _loss(model, p, x, y))(params)
    new = optim.apply_updates(params, tx.update(grads, tx.init(params), params)[0])
    assert torch.equal(new["0.weight"], params["0.weight"])
    torch.testing.assert_close(new["2.weight"], params["2.weight"] - 0.1 * grads["2.weight"])


def test_flax_style_train_state_matches_torch_optim_with_frozen_params():
    net = _net()
    model = fp.functionalize(net)
    variables = model.variables_from_state_dict(net.state_dict())
    state = fp.train.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=optim.adam(0.05)
    )
    ref = _net()
    ref.load_state_dict(net.state_dict())
    torch_opt = torch.optim.Adam([p for p in ref.parameters() if p.requires_grad], lr=0.05)
    x, y = _batch()
    for _ in range(4):
        grads = fp.grad(lambda p: _loss(model, p, x, y))(state.params)
        state = state.apply_gradients(grads=grads)
        torch_opt.zero_grad()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        torch_opt.step()
    assert int(state.step) == 4 and state.apply_fn == model.apply
    assert torch.equal(state.params["0.weight"], variables["params"]["0.weight"])
    for name, p in ref.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-10, atol=1e-12)


def test_train_step_uses_state_tx_keeps_frozen_and_returns_metrics():
    model = fp.functionalize(_net())
    params = model.init(KEY)["params"]
    state = fp.train.TrainState.create(apply_fn=model.apply, params=params, tx=optim.sgd(0.5))
    x, y = _batch()

    def loss_fn(p, buffers, batch, key):
        logits = model.apply({"params": p}, batch[0])
        loss = torch.nn.functional.cross_entropy(logits, batch[1])
        return (
            loss,
            buffers,
            {"accuracy": (logits.argmax(-1) == batch[1]).double().mean(), "logits": logits},
        )

    new, loss, aux = fp.train.train_step(state, (x, y), loss_fn, has_aux=True)
    logits = model.apply({"params": params}, x)
    torch.testing.assert_close(aux["logits"], logits)
    assert (
        float(aux["accuracy"])
        == sum(int(a == b) for a, b in zip(logits.argmax(-1), y, strict=True)) / 8
    )
    assert not aux["logits"].requires_grad and not loss.requires_grad
    grads = fp.grad(lambda p: _loss(model, p, x, y))(params)
    assert torch.equal(new.params["0.weight"], params["0.weight"])
    torch.testing.assert_close(new.params["2.bias"], params["2.bias"] - 0.5 * grads["2.bias"])
    with pytest.raises(
        TypeError, match=r"train_step.*loss_fn must return \(loss, new_buffers\).*has_aux=True"
    ):
        fp.train.train_step(state, (x, y), loss_fn)
    bare = fp.train.TrainState.create(params, (), KEY)
    with pytest.raises(TypeError, match=r"train_step.*no optimizer"):
        fp.train.train_step(bare, (x, y), loss_fn, has_aux=True)
    with pytest.raises(TypeError, match=r"apply_gradients.*has no `tx`"):
        bare.apply_gradients(grads=grads)


def test_train_state_code_is_static_and_never_saved(tmp_path):
    model = fp.functionalize(_net())
    params = model.init(KEY)["params"]
    tx = optim.adam(1e-2)
    state = fp.train.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    mapped = fp.tree.map(lambda t: t, state)
    assert mapped.apply_fn == model.apply and mapped.tx is state.tx
    assert state.replace(step=state.step + 1).tx is state.tx
    fp.save(tmp_path / "s.safetensors", state)
    plain = fp.load(tmp_path / "s.safetensors")
    assert plain.apply_fn is None and plain.tx is None
    assert torch.equal(plain.params["2.weight"], params["2.weight"])
    like = fp.load(tmp_path / "s.safetensors", like=state)
    assert like.apply_fn == model.apply and like.tx is state.tx
    plain_model = fp.functionalize(nn.Linear(2, 2))
    p2 = plain_model.init(KEY)["params"]
    s1 = fp.train.TrainState.create(apply_fn=plain_model.apply, params=p2, tx=tx, key=KEY)
    s2 = fp.train.TrainState.create(apply_fn=plain_model.apply, params=p2, tx=tx, key=KEY)
    assert fp.tree.structure(s1) == fp.tree.structure(s2)  # fresh bound methods compare equal
    with pytest.raises(TypeError, match=r"TrainState.create.*not both"):
        fp.train.TrainState.create(params, tx.init(params), tx=tx)
    with pytest.raises(ValueError, match=r"TrainState.create.*expected keys"):
        fp.train.TrainState.create(apply_fn=model.apply, params={"w": torch.ones(1)}, tx=tx)


# ------------------------------------------------------------------ custom init
class _Block(nn.Module):
    """GPT-2 style: the module initialises its own weights in __init__."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)
        self.ln = nn.LayerNorm(64)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.ln(self.fc(x))


def test_custom_init_in_init_is_never_lost_silently():
    with pytest.warns(
        UserWarning, match=r"init\(key.*\['fc.weight', 'fc.bias'\].*functionalize a factory"
    ):
        fp.functionalize(_Block()).init(KEY)


def test_factory_replays_the_modules_own_init_under_the_key():
    model = fp.functionalize(lambda: _Block())
    before = torch.random.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        v = model.init(KEY)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(fp.random.seed_from_key(KEY))  # the reference: plain construction
    ref = _Block()
    for name, p in ref.named_parameters():
        assert torch.equal(v["params"][name], p.detach()), name
    assert torch.equal(v["params"]["fc.bias"], torch.zeros(64))
    other = model.init(fp.random.key(1))
    assert not torch.equal(other["params"]["fc.weight"], v["params"]["fc.weight"])
    with pytest.raises(TypeError, match=r"functionalize\(module\).*zero-argument factory"):
        fp.functionalize(lambda x: _Block())


def test_default_initialisation_raises_no_false_alarm():
    net = nn.Sequential(
        nn.Linear(30, 40),
        nn.LayerNorm(40),
        nn.Linear(40, 1),
        nn.Embedding(50, 8),
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.MultiheadAttention(16, 2),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(3):
            fp.functionalize(net).init(fp.random.key(seed))


def test_loaded_weights_are_flagged_before_init_redraws_them():
    net = nn.Linear(64, 8)
    with torch.no_grad():
        net.weight.mul_(10)
    with pytest.warns(UserWarning, match=r"\['weight'\].*loaded weights"):
        fp.functionalize(net).init(KEY)
