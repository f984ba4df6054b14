"""Per-sample gradients of fp.functionalize'd real architectures vs a Python loop with
torch.autograd; BatchNorm's error and the GroupNorm way out."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import functorch_pipeline as fp

B = 6
TOL = {"rtol": 1e-9, "atol": 1e-12}


def _x_image():
    return torch.randn(B, 2, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


MODELS = {
    "mlp_dropout": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(128, 32), nn.ReLU(), nn.Dropout(0.4), nn.Linear(32, 4)),
                    _x_image),
    "cnn_dropout2d": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Dropout2d(0.3), nn.MaxPool2d(2),
                                            nn.Flatten(), nn.Linear(36, 4)), _x_image),
    "conv_groupnorm": (lambda: nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.ReLU(),
                                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)), _x_image),
    "layernorm": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(128, 16), nn.LayerNorm(16), nn.GELU(),
                                        nn.AlphaDropout(0.2), nn.Linear(16, 4)), _x_image),
    "batchnorm_eval": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                             nn.Linear(144, 4)), _x_image),
}


class EmbeddingBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8, padding_idx=0)
        self.drop = nn.Dropout(0.25)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        return self.fc(self.drop(self.embed(ids)).mean(1))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids):
        return self.fc(self.layer(self.embed(ids)).mean(1))


def _ids(high):
    return lambda: torch.randint(0, high, (B, 7), generator=torch.Generator().manual_seed(1))


MODELS["embedding_dropout"] = (EmbeddingBag, _ids(50))
MODELS["transformer"] = (Encoder, _ids(30))


def _setup(name, train=True):
    make, data = MODELS[name]
    model = fp.functionalize(make())
    variables = fp.tree.astype(model.init(fp.random.key(0)), torch.float64)
    x = data()
    y = torch.randint(0, 4, (B,), generator=torch.Generator().manual_seed(2))
    keys = fp.random.split(fp.random.key(1), B)

    def loss_fn(params, x, y, key):
        out = model.apply({"params": params, "buffers": variables["buffers"]}, x, train=train, key=key)
        logits = out[0] if train else out
        return F.cross_entropy(logits, y)

    return model, variables, x, y, keys, loss_fn


def _loop(loss_fn, params, x, y, keys):
    """The reference: one torch.autograd backward per example (no torch.func)."""
    rows = []
    for i in range(x.shape[0]):
        p = {k: t.detach().clone().requires_grad_() for k, t in params.items()}
        loss = loss_fn(p, x[i : i + 1], y[i : i + 1], keys[i : i + 1])
        grads = torch.autograd.grad(loss, list(p.values()), allow_unused=True)
        rows.append({k: torch.zeros_like(t) if g is None else g for (k, t), g in zip(p.items(), grads, strict=True)})
    return fp.tree.stack(rows)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_per_sample_grads_match_a_python_loop(name):
    train = name != "batchnorm_eval"
    model, variables, x, y, keys, loss_fn = _setup(name, train)
    params = variables["params"]
    got = fp.per_sample_grads(loss_fn)(params, x, y, keys)
    want = _loop(loss_fn, params, x, y, keys)
    for k in params:
        assert got[k].shape == (B, *params[k].shape)
        assert torch.allclose(got[k], want[k], **TOL), k
    # examples really differ (and with dropout, so do their masks)
    assert not torch.allclose(got[next(iter(params))][0], got[next(iter(params))][1])
    # chunking gives the same result
    chunked = fp.per_sample_grads(loss_fn, chunk_size=4)(params, x, y, keys)
    assert fp.tree.allclose(chunked, got, **TOL)


def test_per_example_keys_matter_and_are_reproducible():
    _, variables, x, y, keys, loss_fn = _setup("mlp_dropout")
    params = variables["params"]
    a = fp.per_sample_grads(loss_fn)(params, x, y, keys)
    b = fp.per_sample_grads(loss_fn)(params, x, y, keys)
    c = fp.per_sample_grads(loss_fn)(params, x, y, fp.random.split(fp.random.key(2), B))
    assert fp.tree.allclose(a, b, rtol=0, atol=0)
    assert not torch.allclose(a["1.weight"], c["1.weight"])
    # the mean of per-example gradients is the batch gradient with the same key batch
    batch = fp.grad(loss_fn)(params, x, y, keys)
    assert fp.tree.allclose(fp.tree.map(lambda g: g.mean(0), a), batch, rtol=1e-9, atol=1e-12)


def test_per_sample_gradients_of_embedding_rows_are_sparse():
    _, variables, x, y, keys, loss_fn = _setup("embedding_dropout")
    g = fp.per_sample_grads(loss_fn)(variables["params"], x, y, keys)["embed.weight"]
    for i in range(B):
        touched = torch.zeros(50, dtype=torch.bool)
        touched[x[i]] = True
        touched[0] = False  # padding_idx gets no gradient
        assert bool(g[i][~touched].eq(0).all()) and bool(g[i][touched].abs().sum(1).gt(0).all())


# ---------------------------------------------------------------- BatchNorm
def test_batchnorm_in_train_mode_under_per_sample_grads_is_a_clear_error():
    model, variables, x, y, keys, loss_fn = _setup("batchnorm_eval", train=True)
    with pytest.raises(RuntimeError, match=r"BatchNorm layers \(`1`\) ran with train=True under vmap over the inputs"):
        fp.per_sample_grads(loss_fn, method="vmap")(variables["params"], x, y, keys)
    with pytest.raises(ValueError, match=r"BatchNorm normalising with the batch.s statistics.*1.weight.*replace_batchnorm_with_groupnorm"):
        fp.per_sample_grads(loss_fn)(variables["params"], x, y, keys)  # auto: the engine says it
    with pytest.raises(RuntimeError, match=r"train=False.*fp.nn.replace_batchnorm_with_groupnorm\(module, num_groups=\.\.\.\)"):
        fp.vmap(lambda xi: model.apply(variables, xi, train=True)[0])(x.unsqueeze(1))
    # ... while a batch gradient in train mode is fine
    fp.grad(loss_fn)(variables["params"], x, y, keys[0])


def test_groupnorm_replacement_gives_per_sample_grads_in_train_mode():
    net = MODELS["batchnorm_eval"][0]()
    converted = fp.nn.replace_batchnorm_with_groupnorm(net, num_groups=2)
    model = fp.functionalize(converted)
    variables = fp.tree.astype(model.init(fp.random.key(0)), torch.float64)
    assert variables["buffers"] == {}
    x, y = _x_image(), torch.randint(0, 4, (B,))

    def loss_fn(params, x, y):
        return F.cross_entropy(model.apply({"params": params}, x, train=True)[0], y)

    got = fp.per_sample_grads(loss_fn)(variables["params"], x, y)
    want = _loop(lambda p, xi, yi, _k: loss_fn(p, xi, yi), variables["params"], x, y, [None] * B)
    assert fp.tree.allclose(got, want, **TOL)


def test_replace_batchnorm_with_groupnorm():
    net = nn.Sequential(nn.Conv2d(3, 48, 1), nn.BatchNorm2d(48), nn.Sequential(nn.BatchNorm1d(6, affine=False)))
    with torch.no_grad():
        net[1].weight.uniform_()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = fp.nn.replace_batchnorm_with_groupnorm(net)
    assert isinstance(net[1], nn.BatchNorm2d) and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    gn = out[1]
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 16 and gn.num_channels == 48  # gcd(48, 32)
    assert torch.equal(gn.weight, net[1].weight) and gn.eps == net[1].eps
    assert isinstance(out[2][0], nn.GroupNorm) and not out[2][0].affine and out[2][0].num_groups == 2
    assert fp.nn.replace_batchnorm_with_groupnorm(net, num_groups=lambda c: c)[1].num_groups == 48
    assert isinstance(fp.nn.replace_batchnorm_with_groupnorm(nn.BatchNorm1d(4), 2), nn.GroupNorm)
    with pytest.raises(ValueError, match=r"the BatchNorm at `1` has 48 channels, which 5 groups do not divide"):
        fp.nn.replace_batchnorm_with_groupnorm(net, num_groups=5)
    with pytest.raises(ValueError, match=r"the BatchNorm at `0` is lazy"):
        fp.nn.replace_batchnorm_with_groupnorm(nn.Sequential(nn.LazyBatchNorm2d()))
    with pytest.raises(TypeError, match="`module` must be an nn.Module"):
        fp.nn.replace_batchnorm_with_groupnorm("net")


def test_instancenorm_with_running_stats_in_train_mode_is_a_clear_error():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True, track_running_stats=True), nn.Flatten(),
                        nn.Linear(144, 4))
    model = fp.functionalize(net)
    v = model.init(fp.random.key(0))

    def loss_fn(params, x):
        return model.apply({"params": params, "buffers": v["buffers"]}, x, train=True)[0].sum()

    with pytest.raises(RuntimeError, match=r"InstanceNorm layers \(`1`\) with track_running_stats=True.*track_running_stats=False"):
        fp.per_sample_grads(loss_fn)(v["params"], _x_image().float())
    per_example = fp.per_sample_grads(lambda p, x: model.apply({"params": p, "buffers": v["buffers"]}, x).sum())
    assert per_example(v["params"], _x_image().float())["1.weight"].shape == (B, 4)  # eval is fine
