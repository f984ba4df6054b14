"""NOTE [elementwise parameters]: a parameter in ``torch.maximum``, ``clamp``, ``lerp``,
``addcmul``, ``where``, ``pow`` and the other elementwise ops, every engine against a
per-example autograd loop in float64 (``check``: hooks and auto per-example gradients,
ghost, hooks and auto norms and clipped sums; auto must not fall back)."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from per_example_reference import float64_default  # noqa: F401 (autouse fixture)
from per_example_reference import loop_grads
from per_example_reference import params_of
from test_grad_sample_broadcast import check
from test_grad_sample_broadcast import close
from test_grad_sample_broadcast import refused_then_loop
from torch import nn

import functorch_pipeline as fp

# op(h, h2, pos, p, q): h and h2 activations (B, T, D) (or sequence-first), pos = a
# positive activation; p and q parameters (q > 0.5 everywhere, p any sign).
OPS = {
    "maximum": lambda h, h2, pos, p, q: torch.maximum(h, p),
    "minimum (p first)": lambda h, h2, pos, p, q: torch.minimum(p, h),
    "fmax": lambda h, h2, pos, p, q: torch.fmax(h, p),
    "Tensor.fmin": lambda h, h2, pos, p, q: h.fmin(p),
    "clamp(min=p)": lambda h, h2, pos, p, q: torch.clamp(h, min=p),
    "clamp(p, q)": lambda h, h2, pos, p, q: torch.clamp(h, -q, q),
    "Tensor.clip(max=q)": lambda h, h2, pos, p, q: h.clip(max=q),
    "clamp_min": lambda h, h2, pos, p, q: torch.clamp_min(h, p),
    "lerp weight": lambda h, h2, pos, p, q: torch.lerp(h, h2, p),
    "Tensor.lerp weight": lambda h, h2, pos, p, q: h.lerp(h2, p),
    "lerp end": lambda h, h2, pos, p, q: torch.lerp(h, p, 0.3),
    "addcmul": lambda h, h2, pos, p, q: torch.addcmul(h, h2, p, value=0.5),
    "addcmul p p": lambda h, h2, pos, p, q: torch.addcmul(h, p, p),
    "addcdiv": lambda h, h2, pos, p, q: torch.addcdiv(h, h2, q),
    "where": lambda h, h2, pos, p, q: torch.where(h > 0, h, p),
    "where p q": lambda h, h2, pos, p, q: torch.where(h2 > 0, p, q),
    "Tensor.where": lambda h, h2, pos, p, q: h.where(h2 > 0, p),
    "pow": lambda h, h2, pos, p, q: torch.pow(pos, q),
    "**": lambda h, h2, pos, p, q: pos ** p,
    "p ** x": lambda h, h2, pos, p, q: q ** h,
    "float_power": lambda h, h2, pos, p, q: torch.float_power(pos, p),
    "atan2": lambda h, h2, pos, p, q: torch.atan2(h, q),
    "hypot": lambda h, h2, pos, p, q: torch.hypot(h, p),
    "xlogy": lambda h, h2, pos, p, q: torch.xlogy(p, pos),
    "logaddexp": lambda h, h2, pos, p, q: torch.logaddexp(h, p),
    "logaddexp2": lambda h, h2, pos, p, q: torch.logaddexp2(p, h),
    "copysign": lambda h, h2, pos, p, q: torch.copysign(q, h) + h,
    "multiply": lambda h, h2, pos, p, q: torch.multiply(h, p),
    "subtract alpha": lambda h, h2, pos, p, q: torch.subtract(h, p, alpha=2.0),
    "divide": lambda h, h2, pos, p, q: torch.divide(h, q),
    "true_divide": lambda h, h2, pos, p, q: h.true_divide(q),
}

SHAPES = {  # parameter shape against a (B, T, D) activation, T = 3, D = 4
    "(D,)": (4,),
    "(1, T, D)": (1, 3, 4),
    "(T, D)": (3, 4),
    "(T, 1)": (3, 1),
    "scalar": (),
    "(1,)": (1,),
}


@settings(max_examples=60, deadline=None)
@given(op=st.sampled_from(sorted(OPS)), shape=st.sampled_from(sorted(SHAPES)),
       batch=st.integers(1, 4), seq_first=st.booleans())
@example(op="lerp weight", shape="(D,)", batch=3, seq_first=True)  # T == B: padded
@example(op="where p q", shape="(T, D)", batch=2, seq_first=False)  # the mask is the operand
@example(op="clamp(p, q)", shape="scalar", batch=4, seq_first=False)  # D == B: padded
def test_elementwise_ops_match_the_loop(op, shape, batch, seq_first):
    """Each op with parameters of each layout, batch-first or (for parameters that do not
    span the sequence axis) sequence-first."""
    if seq_first and len(SHAPES[shape]) >= 2 and SHAPES[shape][-2] != 1:
        seq_first = False  # a (T, D) table spans the sequence axis
    torch.manual_seed(batch * 31 + len(op) + len(shape))
    lin, head = nn.Linear(2, 8), nn.Linear(4, 1)
    params = {**{f"lin.{k}": v for k, v in params_of(lin).items()},
              **{f"head.{k}": v for k, v in params_of(head).items()},
              "p": torch.randn(SHAPES[shape]), "q": torch.rand(SHAPES[shape]) + 0.5}

    def losses(p, x):
        h, h2 = torch.tanh(F.linear(x, p["lin.weight"], p["lin.bias"])).chunk(2, -1)  # (B, T, 4)
        if seq_first:
            h, h2 = h.transpose(0, 1), h2.transpose(0, 1)
        pos = F.softplus(h2) + 0.1
        out = torch.tanh(OPS[op](h, h2, pos, p["p"], p["q"]))
        if seq_first:
            out = out.transpose(0, 1)
        return F.linear(out, p["head.weight"], p["head.bias"]).pow(2).sum((1, 2))

    x = torch.randn(batch, 3, 2)
    if op == "where p q" and seq_first:
        # The only operand with the result's shape is a mask, which has no graph: a
        # sequence-first tensor without one is not read as batched (NOTE [sequence-first
        # inputs]), so it is refused and the default method falls back. With T == B the
        # mask's first axis has the batch size too, and padded runs cannot settle it
        # (NOTE [a table the size of the batch]).
        refused_then_loop(losses, params, x, match="whose first axis is not the batch|"
                          "kept the batch's real size while another has the padded size")
    else:
        check(losses, params, x)


class GeM(nn.Module):
    """A conv net with generalised-mean pooling (Radenović et al.): a learned exponent ``p``
    of shape (1,), ``x.clamp(min=eps).pow(p).mean((-2, -1)).pow(1 / p)``, and a learned
    per-channel floor ``torch.maximum(h, floor)`` of shape (C, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.floor = nn.Parameter(torch.randn(3, 1, 1) * 0.1)
        self.p = nn.Parameter(torch.tensor([3.0]))
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.maximum(self.conv(x), self.floor)
        h = h.clamp(min=1e-6).pow(self.p).mean((-2, -1)).pow(1.0 / self.p)
        return self.head(h)


@pytest.mark.parametrize("batch", [1, 2, 3, 5])  # 3: the channels' count
def test_gem_pooling_matches_the_loop(batch):
    torch.manual_seed(batch)
    model = GeM()
    params = params_of(model)

    def losses(p, x):
        return torch.func.functional_call(model, p, (x,)).pow(2).sum(1)

    check(losses, params, torch.randn(batch, 2, 5, 5))


def test_merged_rows_match_the_loop():
    """A learned clipping threshold on augmentations merged into axis 0 (NOTE [examples
    merged into axis 0]): the threshold's per-row parts are summed per example."""
    torch.manual_seed(0)
    lin, head = nn.Linear(3, 4), nn.Linear(4, 1)
    params = {**{f"lin.{k}": v for k, v in params_of(lin).items()},
              **{f"head.{k}": v for k, v in params_of(head).items()},
              "alpha": torch.rand(4) + 0.2}

    def losses(p, x):
        b, k = x.shape[:2]
        h = F.linear(x.reshape(b * k, 3), p["lin.weight"], p["lin.bias"])
        h = torch.minimum(F.relu(h), p["alpha"])  # PACT's learned clipping
        return F.linear(h, p["head.weight"], p["head.bias"]).reshape(b, k).pow(2).mean(1)

    for batch, k in ((1, 3), (3, 2), (2, 4)):
        check(losses, params, torch.randn(batch, k, 3))


def test_a_constant_operand_makes_a_derived_tensor():
    """``torch.maximum(p, table)`` with a fixed table (no batch axis) and ``lerp`` of two
    parameters by a constant weight have no examples: derived tensors, then a Linear."""
    torch.manual_seed(1)
    table = torch.randn(4)
    params = {"w": torch.randn(3, 4), "v": torch.randn(3, 4), "b": torch.randn(3)}

    def losses(p, x):
        w = torch.lerp(p["w"], p["v"], torch.full((3, 4), 0.25))
        bias = torch.maximum(p["b"], table[:3])
        return F.linear(x, w, bias).pow(2).sum(1)

    check(losses, params, torch.randn(3, 4))


def test_a_parameter_varying_along_the_leading_axis_is_refused():
    """A (T, 1, D) table against a sequence-first (T, B, D) activation varies along axis 0,
    where the rule needs the parameter broadcast: refused by name, and the default
    method falls back to the loop's numbers."""
    torch.manual_seed(2)
    params = {"w": torch.randn(4, 3), "p": torch.randn(5, 1, 4)}

    def losses(p, x):
        h = F.linear(x, p["w"]).transpose(0, 1)  # (T, B, 4)
        return torch.maximum(h, p["p"]).transpose(0, 1).pow(2).sum((1, 2))

    refused_then_loop(losses, params, torch.randn(3, 5, 3), match="broadcast over the leading ones")


def test_a_batched_operand_broadcast_along_another_axis_matches_the_loop():
    """``lerp`` towards a batched operand that is broadcast itself ((B, 1, D) against
    (B, T, D)) is batched alongside the activation: taken."""
    torch.manual_seed(3)
    params = {"w": torch.randn(4, 2), "p": torch.rand(4)}

    def losses(p, x):
        h = F.linear(x, p["w"])
        return torch.lerp(h, h.mean(1, keepdim=True), p["p"]).pow(2).sum((1, 2))

    check(losses, params, torch.randn(3, 5, 2))


def test_an_operand_without_the_examples_axis_is_refused():
    """An activation of size 1 on the examples' axis (a mean over the batch, which the
    per-example loop sees as a mean over one example) is neither batched nor a constant:
    refused by name, and the default method falls back to the loop's numbers."""
    torch.manual_seed(3)
    params = {"w": torch.randn(4, 2), "p": torch.rand(4)}

    def losses(p, x):
        h = F.linear(x, p["w"])
        return torch.lerp(h, h.mean(0, keepdim=True), p["p"]).pow(2).sum((1, 2))

    refused_then_loop(losses, params, torch.randn(3, 5, 2), match="neither batched along the examples")


def test_float32_matches_float64_loop():
    """In float32 the rule gives the float64 loop's numbers to float32 accuracy."""
    torch.manual_seed(4)
    params = {"w": torch.randn(4, 3), "p": torch.rand(4) + 0.5}

    def losses(p, x):
        return torch.pow(F.softplus(F.linear(x, p["w"])) + 0.1, p["p"]).sum(1)

    x = torch.randn(6, 3)
    want = loop_grads(losses, params, x)
    got = fp.per_sample_grads(losses, method="hooks")({k: v.float() for k, v in params.items()},
                                                      x.float())
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], rtol=1e-5, atol=1e-5)
    assert close(fp.per_sample_grads(losses, method="hooks")(params, x)["p"], want["p"])


class WindowAttention(nn.Module):
    """Attention over windows merged into the batch axis ``(B * nW, H, N, d)`` with a
    learned relative position bias as ``F.scaled_dot_product_attention``'s float mask:
    ``table[:, idx]`` (TinyViT), ``-slopes * distance`` (learned ALiBi), or a full
    ``(H, N, N)`` parameter."""

    def __init__(self, kind: str, heads: int = 2, n: int = 3, d: int = 4) -> None:
        super().__init__()
        self.kind, self.heads, self.n = kind, heads, n
        self.qkv = nn.Linear(d, 3 * d)
        self.table = nn.Parameter(torch.randn(heads, 2 * n - 1))
        self.slopes = nn.Parameter(torch.rand(heads))
        self.full = nn.Parameter(torch.randn(1, heads, n, n))
        pos = torch.arange(n)
        self.register_buffer("idx", pos[:, None] - pos[None, :] + n - 1)
        self.register_buffer("dist", (pos[:, None] - pos[None, :]).abs().to(torch.get_default_dtype()))
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, w, n, d = x.shape  # w windows of n tokens per example
        q, k, v = self.qkv(x.reshape(b * w, n, d)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        mask = {"table[:, idx]": lambda: self.table[:, self.idx],
                "alibi": lambda: -self.slopes[:, None, None] * self.dist,
                "full": lambda: self.full}[self.kind]()
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.head(a.transpose(1, 2).flatten(2))  # (b * w, n, 1)
        return out.reshape(b, -1).pow(2).sum(1)


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(["table[:, idx]", "alibi", "full"]), batch=st.integers(1, 4),
       windows=st.integers(1, 3))
@example(kind="table[:, idx]", batch=2, windows=1)  # heads == B: padded
def test_a_learned_attention_mask_matches_the_loop(kind, batch, windows):
    torch.manual_seed(batch * 5 + windows + len(kind))
    model = WindowAttention(kind)
    params = params_of(model)

    def losses(p, x):
        return torch.func.functional_call(model, p, (x,))

    check(losses, params, torch.randn(batch, windows, 3, 4))


def test_a_parameter_as_attention_key_is_refused():
    """Learned memory keys (a parameter as the key) have no rule: refused by name."""
    torch.manual_seed(5)
    params = {"w": torch.randn(4, 4), "mem": torch.randn(1, 3, 4)}

    def losses(p, x):
        q = F.linear(x, p["w"])
        return F.scaled_dot_product_attention(q, p["mem"], p["mem"]).pow(2).sum((1, 2))

    refused_then_loop(losses, params, torch.randn(3, 2, 4), match="as its query, key or value")


class CachedBias(nn.Module):
    """timm's LeViT pattern: in eval mode the bias ``biases[:, idx]`` is computed once and
    cached (``attention_bias_cache``) for later forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 8)
        self.biases = nn.Parameter(torch.randn(2, 4))
        self.register_buffer("idx", torch.tensor([1, 0, 1, 0]))
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            bias = self.biases[:, self.idx]
        else:
            if "cpu" not in self.attention_bias_cache:
                self.attention_bias_cache["cpu"] = self.biases[:, self.idx]
            bias = self.attention_bias_cache["cpu"]
        return (torch.tanh(self.lin(x)).reshape(-1, 2, 4) * bias).pow(2).sum((1, 2))


def test_a_tensor_kept_past_its_call_raises_by_name():
    """NOTE [tensors kept past their call]: the second call meets the first call's cached
    tracked tensor and says so (every method would lose the parameter's gradient through
    it); without gradients it reads as the cached values; emptying the cache and setting
    ``training`` on that module, as the message says, gives the loop's numbers."""
    torch.manual_seed(6)
    model = CachedBias().eval()
    params = params_of(model)
    x = torch.randn(3, 3)

    def losses(p, x):
        return torch.func.functional_call(model, p, (x,))

    fp.per_sample_grads(losses, method="hooks")(params, x)  # fills the cache
    for method in ("hooks", "auto"):
        with pytest.raises(RuntimeError, match=r"computed from `biases`.*kept past"):
            fp.per_sample_grads(losses, method=method)(params, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), losses({k: v.clone() for k, v in params.items()}, x))
    model.attention_bias_cache = {}
    model.training = True
    check(losses, params, x)


IN_PLACE_WRITES = {  # a parameter written in place into an activation h (B, T, 4)
    "h += p": lambda h, p: h.__iadd__(p["p"]),
    "h -= table": lambda h, p: h.__isub__(p["table"]),
    "h *= p": lambda h, p: h.__imul__(p["p"]),
    "h /= p": lambda h, p: h.__itruediv__(p["p"]),
    "add_ alpha": lambda h, p: h.add_(p["p"], alpha=2.0),
    "mul_": lambda h, p: h.mul_(p["p"]),
    "clamp_(min=p)": lambda h, p: h.clamp_(min=p["p"] - 1),
    "lerp_": lambda h, p: h.lerp_(torch.ones_like(h), p["p"] * 0.5),
    "addcmul_": lambda h, p: h.addcmul_(torch.ones_like(h), p["p"]),
}


@settings(max_examples=30, deadline=None)
@given(form=st.sampled_from(sorted(IN_PLACE_WRITES)), batch=st.integers(1, 4))
@example(form="h -= table", batch=3)  # T == B: padded
def test_a_parameter_written_in_place_into_an_activation_matches_the_loop(form, batch):
    """``h += p`` and the other in-place forms run out of place through their rules and
    the result is copied into ``h`` (``Engine.in_place_on_plain``); they fell back to
    ``vmap`` before."""
    torch.manual_seed(batch + len(form))
    params = {"w": torch.randn(4, 2), "p": torch.rand(4) + 0.5, "table": torch.randn(3, 4),
              "head": torch.randn(1, 4)}

    def losses(p, x):
        h = F.linear(x, p["w"])
        IN_PLACE_WRITES[form](h, p)
        return F.linear(torch.tanh(h), p["head"]).pow(2).sum((1, 2))

    check(losses, params, torch.randn(batch, 3, 2))


def test_a_parameter_set_into_an_activation_matches_the_loop():
    """``h[:, 0] = p`` (refused before NOTE [a parameter written into the batch]) takes the
    fast path with the loop's numbers."""
    torch.manual_seed(0)
    params = {"w": torch.randn(4, 2), "p": torch.randn(4)}

    def losses(p, x):
        h = F.linear(x, p["w"])
        h[:, 0] = p["p"]
        return h.pow(2).sum((1, 2))

    check(losses, params, torch.randn(3, 5, 2))
