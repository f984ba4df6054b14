"""Edges of the per-example gradient API (``per_sample_grads``, ``per_sample_value_and_grad``,
``per_sample_grad_norms``, ``clipped_grad``, ``clipped_value_and_grad``): the empty batch,
keyword arguments, errors that name the API called, and what the docstrings promise about
``has_aux`` and the ghost method."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads
from per_example_reference import params_of
from torch import nn

import functorch_pipeline as fp

torch.set_num_threads(1)

_METHODS = ("auto", "ghost", "hooks", "vmap")


class _FlattenNet(nn.Module):
    """A CNN whose flatten (``h.view(h.size(0), -1)``) cannot run on 0 examples."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 2, 3)
        self.lin = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.c(x))
        return self.lin(h.view(h.size(0), -1))


def _clipped_apis(loss_fn, method, has_aux=False, reduction="sum"):
    """``(name, function, how to read (values-or-None, norms, clipped-or-None, aux))``."""
    return [
        ("per_sample_grad_norms",
         fp.per_sample_grad_norms(loss_fn, has_aux=has_aux, method=method),
         lambda out: (None, *((out[0], None, out[1]) if has_aux else (out, None, None)))),
        ("clipped_grad",
         fp.clipped_grad(loss_fn, 1.0, has_aux=has_aux, method=method, reduction=reduction),
         lambda out: (None, out[0][1], out[0][0], out[1]) if has_aux
         else (None, out[1], out[0], None)),
        ("clipped_value_and_grad",
         fp.clipped_value_and_grad(loss_fn, 1.0, has_aux=has_aux, method=method,
                                   reduction=reduction),
         lambda out: (out[0][0], out[1][1], out[1][0], out[0][1]) if has_aux
         else (out[0], out[1][1], out[1][0], None)),
    ]


# -- an empty batch ------------------------------------------------------------------------


@pytest.mark.parametrize("method", _METHODS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_empty_batch_does_not_run_a_model_that_cannot_take_it(method, reduction):
    torch.manual_seed(0)
    net = _FlattenNet()
    params = params_of(net)
    calls = []

    def losses(p, x, y):
        calls.append(x.shape[0])
        return F.cross_entropy(torch.func.functional_call(net, p, (x,)), y, reduction="none")

    x0, y0 = torch.randn(0, 1, 6, 6), torch.randint(0, 3, (0,))
    with pytest.raises(RuntimeError, match="0 elements"):  # the model itself refuses B = 0
        net(x0)
    for name, f, read in _clipped_apis(losses, method, reduction=reduction):
        values, norms, clipped, _ = read(f(params, x0, y0))
        assert norms.shape == (0,) and norms.dtype == torch.float64, name
        if clipped is not None:
            assert clipped.keys() == params.keys(), name
            for k, v in params.items():
                assert clipped[k].shape == v.shape and clipped[k].dtype == v.dtype, (name, k)
                assert not clipped[k].any(), (name, k)
        if values is not None:
            assert values.shape == (0,) and values.dtype == torch.float64, name
    assert calls == []  # loss_fn needs not run: nothing of its output is returned

    # A non-empty batch still goes through (the same functions, the same model).
    x, y = torch.randn(3, 1, 6, 6), torch.randint(0, 3, (3,))
    ref_norms = _norms_ref(losses, params, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        norms = fp.per_sample_grad_norms(losses, method=method)(params, x, y)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", _METHODS)
def test_empty_batch_runs_loss_fn_once_for_aux(method):
    torch.manual_seed(0)
    w = torch.randn(3, 4)
    calls = []

    def losses(w, x):
        calls.append(x.shape[0])
        logits = F.linear(x, w)
        return logits.square().sum(1), {"logits": logits, "tag": "run"}

    for name, f, read in _clipped_apis(losses, method, has_aux=True):
        calls.clear()
        values, norms, clipped, aux = read(f(w, torch.randn(0, 4)))
        assert calls == [0], name
        assert norms.shape == (0,), name
        assert aux["logits"].shape == (0, 3) and not aux["logits"].requires_grad, name
        assert aux["tag"] == "run", name
        if values is not None:
            assert values.shape == (0,) and values.dtype == torch.float64, name
        if clipped is not None:
            assert clipped.shape == w.shape and not clipped.any(), name


def test_empty_batch_float32_dtypes():
    w = torch.randn(3, 4, dtype=torch.float32)
    losses = lambda w, x: F.linear(x, w).square().sum(1)  # noqa: E731
    v, (g, n) = fp.clipped_value_and_grad(losses, 1.0)(w, torch.randn(0, 4, dtype=torch.float32))
    assert v.dtype == g.dtype == n.dtype == torch.float32
    assert v.shape == n.shape == (0,) and g.shape == (3, 4)


def test_empty_batch_has_aux_loss_fn_must_return_a_pair():
    w = torch.randn(3, 4)
    with pytest.raises(TypeError, match=r"clipped_grad\(loss_fn, max_norm\): with has_aux=True, "
                                        r"loss_fn must return a pair"):
        fp.clipped_grad(lambda w, x: F.linear(x, w).sum(1), 1.0, has_aux=True)(w, torch.randn(0, 4))


# -- keyword arguments -----------------------------------------------------------------------


def _scaled(w, x, y, scale=1.0):
    return ((F.linear(x, w) - y) ** 2).sum(1) * scale


_KWARG_APIS = [
    ("per_sample_grads", lambda f: fp.per_sample_grads(f)),
    ("per_sample_value_and_grad", lambda f: fp.per_sample_value_and_grad(f)),
    ("per_sample_grad_norms", lambda f: fp.per_sample_grad_norms(f)),
    ("clipped_grad", lambda f: fp.clipped_grad(f, 1.0)),
    ("clipped_value_and_grad", lambda f: fp.clipped_value_and_grad(f, 1.0)),
]


@pytest.mark.parametrize(("api", "make"), _KWARG_APIS, ids=[a for a, _ in _KWARG_APIS])
def test_keyword_arguments_are_an_error_naming_the_api(api, make):
    w, x, y = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 3)
    with pytest.raises(TypeError, match=rf"^{api}\(loss_fn[^)]*\): keyword arguments are not "
                                        r"supported \(got 'scale'\); pass them positionally"):
        make(_scaled)(w, x, y, scale=2.0)


def test_keyword_argument_passed_positionally_as_a_constant():
    """What the error suggests: the constant positionally, kept out of ``batch_argnums``."""
    torch.manual_seed(0)
    w, x, y = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 3)
    g = fp.per_sample_grads(_scaled, batch_argnums=(1, 2))(w, x, y, 2.0)
    ref = loop_grads(lambda p, x, y: _scaled(p["w"], x, y, 2.0), {"w": w}, x, y)["w"]
    torch.testing.assert_close(g, ref, rtol=1e-12, atol=1e-12)


# -- errors name the API that was called ------------------------------------------------------


def _b1(p, x, y):  # (B, 1) instead of (B,)
    return F.cross_entropy(F.linear(x, p["w"]), y, reduction="none")[:, None]


@pytest.mark.parametrize(("api", "make"), [
    ("per_sample_grad_norms", lambda f: fp.per_sample_grad_norms(f, method="vmap")),
    ("clipped_grad", lambda f: fp.clipped_grad(f, 1.0, method="vmap")),
    ("clipped_value_and_grad", lambda f: fp.clipped_value_and_grad(f, 1.0, method="vmap")),
])
def test_vmap_wrong_loss_shape_names_the_clipped_api_and_its_contract(api, make):
    p, x, y = {"w": torch.randn(3, 4)}, torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError) as e:
        make(_b1)(p, x, y)
    msg = str(e.value)
    assert msg.startswith(f"{api}(loss_fn"), msg
    assert "per-example losses of shape (B,)" in msg and "(1, 1)" in msg, msg
    assert "per_sample_value_and_grad" not in msg and "jacrev" not in msg, msg


@pytest.mark.parametrize("api", ["per_sample_grads", "per_sample_value_and_grad"])
def test_vmap_wrong_loss_shape_in_per_sample_states_both_contracts(api):
    p, x, y = {"w": torch.randn(3, 4)}, torch.randn(5, 4), torch.randint(0, 3, (5,))
    f = getattr(fp, api)(_b1, method="vmap")
    with pytest.raises(ValueError, match=rf"^{api}\(loss_fn\): loss_fn must return a scalar loss "
                                         r"for the batch .* or per-example losses of shape \(B,\)"
                                         r".* returned shape \(1, 1\)"):
        f(p, x, y)


_CLIPPED_VMAP = [
    ("per_sample_grad_norms", lambda f: fp.per_sample_grad_norms(f, method="vmap")),
    ("clipped_grad", lambda f: fp.clipped_grad(f, 1.0, method="vmap")),
]


@pytest.mark.parametrize(("api", "make"), _CLIPPED_VMAP, ids=[a for a, _ in _CLIPPED_VMAP])
def test_vmap_batchnorm_error_names_the_api(api, make):
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).train()
    p = params_of(net)
    losses = lambda p, x: torch.func.functional_call(net, p, (x,)).square().sum(1)  # noqa: E731
    with pytest.raises(RuntimeError) as e:
        make(losses)(p, torch.randn(5, 4))
    msg = str(e.value)
    assert msg.startswith(f"{api}(loss_fn") and "BatchNorm" in msg, msg


@pytest.mark.parametrize(("api", "make"), _CLIPPED_VMAP, ids=[a for a, _ in _CLIPPED_VMAP])
def test_vmap_lstm_cell_error_names_the_api(api, make):
    cell = nn.LSTMCell(4, 3)
    p = params_of(cell)

    def losses(p, x):
        h, _ = torch.func.functional_call(cell, p, (x,))
        return h.square().sum(1)

    with pytest.raises(RuntimeError) as e:
        make(losses)(p, torch.randn(5, 4))
    msg = str(e.value)
    assert msg.startswith(f"{api}(loss_fn") and "nn.LSTMCell" in msg, msg


def _str_aux(p, x, y):
    return F.cross_entropy(F.linear(x, p["w"]), y, reduction="none"), {"tag": "run"}


@pytest.mark.parametrize(("api", "make"), [
    ("per_sample_grads", lambda f: fp.per_sample_grads(f, has_aux=True)),  # auto: vmap
    ("per_sample_value_and_grad", lambda f: fp.per_sample_value_and_grad(f, has_aux=True,
                                                                           method="vmap")),
    ("clipped_grad", lambda f: fp.clipped_grad(f, 1.0, has_aux=True, method="vmap")),
])
def test_vmap_non_tensor_aux_names_the_api_and_the_leaf(api, make):
    p, x, y = {"w": torch.randn(3, 4)}, torch.randn(5, 4), torch.randint(0, 3, (5,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError) as e:
            make(_str_aux)(p, x, y)
    msg = str(e.value)
    assert msg.startswith(f"{api}(loss_fn"), msg
    assert "aux at `tag` is a str" in msg and "method=" in msg, msg
    assert "vmap(f, in_axes" not in msg, msg


def test_non_tensor_aux_is_kept_by_the_batch_methods():
    """What the error above suggests: ghost and hooks return loss_fn's aux as it is."""
    p, x, y = {"w": torch.randn(3, 4)}, torch.randn(5, 4), torch.randint(0, 3, (5,))
    for method in ("ghost", "hooks"):
        _, aux = fp.clipped_grad(_str_aux, 1.0, has_aux=True, method=method)(p, x, y)
        assert aux == {"tag": "run"}
    _, aux = fp.per_sample_grads(_str_aux, has_aux=True, method="hooks")(p, x, y)
    assert aux == {"tag": "run"}


@pytest.mark.parametrize("argnums", [0.0, None, 1.5])
@pytest.mark.parametrize(("api", "make"), [
    ("per_sample_grads", lambda f, a: fp.per_sample_grads(f, a)),
    ("per_sample_grad_norms", lambda f, a: fp.per_sample_grad_norms(f, a)),
    ("clipped_grad", lambda f, a: fp.clipped_grad(f, 1.0, a)),
    ("grad", lambda f, a: fp.grad(lambda *args: f(*args).sum(), a)),
])
def test_argnums_not_int_nor_sequence_is_a_clear_error(api, make, argnums):
    p, x, y = {"w": torch.randn(3, 4)}, torch.randn(5, 4), torch.randint(0, 3, (5,))
    losses = lambda p, x, y: F.cross_entropy(F.linear(x, p["w"]), y, reduction="none")  # noqa: E731
    with pytest.raises(TypeError, match=rf"^{api}\([^)]*\): `argnums` must be an int or a "
                                        rf"non-empty tuple of ints, got {re.escape(repr(argnums))}$"):
        make(losses, argnums)(p, x, y)


# -- has_aux: which aux each method returns (as documented) -----------------------------------


def test_has_aux_form_per_method_is_as_documented():
    torch.manual_seed(0)
    p, x, y = {"w": torch.randn(3, 4)}, torch.randn(6, 4), torch.randint(0, 3, (6,))

    def losses(p, x, y):
        logits = F.linear(x, p["w"])
        acc = (logits.argmax(1) == y).to(logits.dtype).mean()
        return F.cross_entropy(logits, y, reduction="none"), (logits, acc)

    logits = F.linear(x, p["w"])
    batch_acc = (logits.argmax(1) == y).to(logits.dtype).mean()
    for method in ("ghost", "hooks"):
        _, aux_norms = fp.per_sample_grad_norms(losses, has_aux=True, method=method)(p, x, y)
        _, aux_clip = fp.clipped_grad(losses, 1.0, has_aux=True, method=method)(p, x, y)
        for lg, acc in (aux_norms, aux_clip):
            torch.testing.assert_close(lg, logits)
            torch.testing.assert_close(acc, batch_acc)
    _, (lg, acc) = fp.per_sample_grad_norms(losses, has_aux=True, method="vmap")(p, x, y)
    torch.testing.assert_close(lg, logits[:, None])
    torch.testing.assert_close(acc, (logits.argmax(1) == y).to(logits.dtype))
    for f in (fp.clipped_grad, fp.clipped_value_and_grad, fp.per_sample_grad_norms):
        doc = " ".join(f.__doc__.split())
        assert "``(B, 1, C)``" in doc and "pass ``method`` explicitly" in doc, f.__name__


# -- the ghost method's coverage (as documented) ----------------------------------------------


def _norms_ref(losses, params, *batch):
    ref = loop_grads(losses, params, *batch)
    return torch.cat([g.flatten(1) for g in ref.values()], 1).norm(dim=1)


@pytest.mark.parametrize("layer", [
    lambda: nn.Conv3d(2, 3, 2),
    lambda: nn.ConvTranspose1d(2, 3, 2, stride=2),
    lambda: nn.ConvTranspose2d(2, 3, 2),
    lambda: nn.ConvTranspose3d(2, 3, 2),
], ids=["conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d"])
def test_ghost_runs_conv3d_and_transposed_convs(layer):
    torch.manual_seed(0)
    m = layer()
    spatial = {nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}
    x = torch.randn(3, 2, *[4] * spatial[type(m)])
    p = params_of(m)
    losses = lambda p, x: torch.func.functional_call(m, p, (x,)).tanh().flatten(1).sum(1)  # noqa: E731
    ref = _norms_ref(losses, p, x)
    torch.testing.assert_close(fp.per_sample_grad_norms(losses, method="ghost")(p, x), ref,
                               rtol=1e-10, atol=1e-12)
    g, n = fp.clipped_grad(losses, float(ref.median()), method="ghost")(p, x)
    torch.testing.assert_close(n, ref, rtol=1e-10, atol=1e-12)


def test_ghost_refuses_only_embedding_bag_and_docs_say_so():
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(10, 3, mode="sum")
    p = params_of(bag)
    ids = torch.randint(0, 10, (4, 5))
    losses = lambda p, ids: torch.func.functional_call(bag, p, (ids,)).square().sum(1)  # noqa: E731
    with pytest.raises(ValueError, match=r"per_sample_grad_norms\(loss_fn\): method='ghost': "
                                         r".*`F.embedding_bag`.*method='hooks' handles it"):
        fp.per_sample_grad_norms(losses, method="ghost")(p, ids)
    torch.testing.assert_close(fp.per_sample_grad_norms(losses, method="hooks")(p, ids),
                               _norms_ref(losses, p, ids), rtol=1e-10, atol=1e-12)
    for f in (fp.per_sample_grad_norms, fp.clipped_grad, fp.clipped_value_and_grad):
        doc = " ".join(f.__doc__.split())
        assert "(``Conv3d``, transposed convs" not in doc, f.__name__
        assert "``F.conv3d`` or a transposed convolution" in doc, f.__name__
        assert "``F.embedding_bag`` (``nn.EmbeddingBag``) is the one call" in doc, f.__name__
