"""Layer arguments torch accepts in more than one spelling. A one-element ``stride``,
``padding`` or ``dilation`` sequence on a 2-d or 3-d (transposed) convolution, which torch
expands to every spatial axis, crashed every fast method with an IndexError or an
``as_strided`` error that ``auto`` did not fall back from; ``F.linear`` with a 1-d weight
(``x @ w``) crashed in the linear rule's reshape. Against a float64 per-example loop."""

from __future__ import annotations

import warnings

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import settings
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads

import functorch_pipeline as fp

_OPS = {
    "conv2d": (F.conv2d, (4, 3, 2, 3), (3, 3, 7, 7)),
    "conv3d": (F.conv3d, (2, 3, 2, 2, 2), (3, 3, 5, 5, 5)),
    "conv_transpose2d": (F.conv_transpose2d, (3, 2, 2, 3), (3, 3, 3, 3)),
}


@settings(max_examples=12, deadline=None)
@given(op=st.sampled_from(sorted(_OPS)), arg=st.sampled_from(["stride", "padding", "dilation"]),
       value=st.integers(1, 2), as_list=st.booleans(), seed=st.integers(0, 2**16))
def test_one_element_conv_arguments_match_the_loop(op, arg, value, as_list, seed):
    fn, wshape, xshape = _OPS[op]
    torch.manual_seed(seed)
    w, x = torch.randn(wshape), torch.randn(xshape)
    value -= arg == "padding"  # padding 0 or 1: every op's output stays non-empty
    kw = {arg: [value] if as_list else (value,)}

    def losses(p, x):
        return torch.tanh(fn(x, p["w"], **kw)).square().flatten(1).sum(1)

    want = loop_grads(losses, {"w": w}, x)
    for method in ("hooks", "auto"):
        got = fp.per_sample_grads(losses, method=method)({"w": w}, x)
        torch.testing.assert_close(got["w"], want["w"], rtol=1e-10, atol=1e-12)
    norms = fp.per_sample_grad_norms(losses, method="ghost")({"w": w}, x)
    torch.testing.assert_close(norms, want["w"].flatten(1).norm(dim=1), rtol=1e-10, atol=1e-12)


def test_a_linear_with_a_vector_weight_is_refused_and_auto_takes_vmap():
    torch.manual_seed(0)
    w, x = torch.randn(5), torch.randn(4, 5)

    def losses(p, x):
        return torch.tanh(F.linear(x, p["w"])).square()

    with pytest.raises(ValueError, match="1-d weight"):
        fp.per_sample_grads(losses, method="hooks")({"w": w}, x)
    with pytest.raises(ValueError, match="1-d weight"):
        fp.clipped_grad(losses, 1.0, method="ghost")({"w": w}, x)
    want = loop_grads(losses, {"w": w}, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fp.per_sample_grads(losses)({"w": w}, x)
        total, norms = fp.clipped_grad(losses, 0.5)({"w": w}, x)
    torch.testing.assert_close(got["w"], want["w"], rtol=1e-10, atol=1e-12)
    ref_norms = want["w"].norm(dim=1)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-10, atol=1e-12)
    factor = (0.5 / ref_norms).clamp(max=1)
    torch.testing.assert_close(total["w"], (factor[:, None] * want["w"]).sum(0), rtol=1e-10, atol=1e-12)
