"""Per-example gradients, norms and clipped sums on tensors without data: fake tensors
(``fp.eval_shape``) and the 'meta' device. Before, every default method failed under
``fp.eval_shape`` ("Creating a new Tensor subclass _Tracked but the raw Tensor object is
already associated to a python object of type FakeTensor"), and norms or clipped sums on
'meta' tensors with hooks or vmap failed in an autocast query ("unknown device type")."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import functorch_pipeline as fp


def per_ex(p, x, y):
    return F.cross_entropy(F.linear(x, p["w"], p["b"]), y, reduction="none")


def _real():
    torch.manual_seed(0)
    return {"w": torch.randn(4, 3), "b": torch.randn(4)}, torch.randn(5, 3), torch.randint(0, 4, (5,))


def _shapes(tree):
    """(shape, dtype) of each tensor or ``fp.eval_shape`` leaf, in order."""
    if isinstance(tree, torch.Tensor) or type(tree).__name__ == "ShapeDtypeStruct":
        return [(tuple(tree.shape), tree.dtype)]
    if isinstance(tree, dict):
        return [s for k in sorted(tree) for s in _shapes(tree[k])]
    return [s for t in tree for s in _shapes(t)]


@pytest.mark.parametrize("api", ["per_sample_grads", "per_sample_grad_norms", "clipped_grad"])
def test_eval_shape_of_the_default_method(api):
    make = {"per_sample_grads": lambda: fp.per_sample_grads(per_ex),
            "per_sample_grad_norms": lambda: fp.per_sample_grad_norms(per_ex),
            "clipped_grad": lambda: fp.clipped_grad(per_ex, 1.0)}[api]
    f = make()
    args = _real()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back announced for shape inference
        got = fp.eval_shape(f, *args)
        want = f(*args)  # and the real call after it still takes the fast method silently
    assert _shapes(got) == _shapes(want)


@pytest.mark.parametrize("method", ["hooks", "ghost"])
def test_explicit_fast_methods_name_fake_tensors(method):
    f = (fp.per_sample_grads(per_ex, method=method) if method == "hooks"
         else fp.clipped_grad(per_ex, 1.0, method=method))
    with pytest.raises(ValueError, match=r"fake tensors .*method='vmap' runs on them"):
        fp.eval_shape(f, *_real())


@pytest.mark.parametrize("method", ["hooks", "vmap", "ghost"])
def test_norms_and_clipped_sums_on_meta_tensors(method):
    p = {"w": torch.empty(4, 3, device="meta"), "b": torch.empty(4, device="meta")}
    x, y = torch.empty(5, 3, device="meta"), torch.empty(5, dtype=torch.long, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        norms = fp.per_sample_grad_norms(per_ex, method=method)(p, x, y)
        summed, norms2 = fp.clipped_grad(per_ex, 1.0, method=method)(p, x, y)
    assert norms.shape == norms2.shape == (5,) and norms.device.type == "meta"
    assert {k: v.shape for k, v in summed.items()} == {k: v.shape for k, v in p.items()}
