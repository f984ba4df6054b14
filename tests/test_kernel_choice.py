"""NOTE [measured kernel choice]: which per-example conv weight-gradient kernel runs in
float32 on CPU is measured once per layer geometry. The chooser is tested with a fake
clock; both kernels, pinned, against the float64 per-example loop; the first call's bits
against later calls'."""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from per_example_reference import loop_grads
from per_example_reference import params_of
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline.transforms._grad_sample import _kernel_choice
from functorch_pipeline.transforms._grad_sample import _rules

needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                  reason="the grouped kernel needs mkldnn (float32 on CPU)")


@pytest.fixture
def fresh(monkeypatch):
    """An empty table of choices for the test, the process's own restored after it."""
    table: dict = {}
    monkeypatch.setattr(_kernel_choice, "_CHOSEN", table)
    return table


class FakeClock:
    """Each candidate's run takes the time given for it."""

    def __init__(self, costs):
        self.costs, self.now, self.runs = costs, 0.0, {}

    def __call__(self):
        return self.now

    def wrap(self, name, value):
        def run():
            self.now += self.costs[name]
            self.runs[name] = self.runs.get(name, 0) + 1
            return value
        return run


@pytest.mark.parametrize("costs, kept", [
    ({"grouped": 1.0, "patches": 0.5}, "patches"),   # clearly faster: taken
    ({"grouped": 1.0, "patches": 0.95}, "patches"),  # faster, however little
    ({"grouped": 1.0, "patches": 1.0}, "grouped"),  # a tie: the default
    ({"grouped": 0.5, "patches": 1.0}, "grouped"),
])
def test_pick_keeps_the_faster_and_measures_once(fresh, costs, kept):
    clock = FakeClock(costs)
    cands = {n: clock.wrap(n, n) for n in costs}
    assert _kernel_choice.pick("k", "grouped", cands, clock=clock) == kept
    rounds = _kernel_choice.WARMUP + _kernel_choice.ROUNDS
    # each run WARMUP times untimed and ROUNDS times timed, then the kept one for the result
    assert clock.runs == {n: rounds + (n == kept) for n in costs}
    assert fresh == {"k": kept}
    # later calls run the kept kernel alone, without measuring
    assert _kernel_choice.pick("k", "grouped", cands, clock=clock) == kept
    assert clock.runs[kept] == rounds + 2
    assert sum(clock.runs.values()) == 2 * rounds + 2


def test_pick_runs_the_default_unmeasured_for_transform_wrapped_tensors(fresh):
    seen = []

    def f(x):
        return _kernel_choice.pick("w", "grouped", {
            "grouped": lambda: seen.append("grouped") or x * 2,
            "patches": lambda: seen.append("patches") or x * 2}, (x,))

    out = torch.func.vmap(f)(torch.ones(3, 2))
    assert torch.equal(out, torch.full((3, 2), 2.0))
    assert seen == ["grouped"] and fresh == {}


def test_kernel_choices_round_trip_and_reset(fresh):
    fp.transforms.set_kernel_choices({"a": "patches"})
    assert fp.transforms.kernel_choices() == {"a": "patches"}
    assert _kernel_choice.pick("a", "grouped", {"grouped": lambda: 1, "patches": lambda: 2}) == 2
    table = fp.transforms.kernel_choices()
    table["b"] = "grouped"  # a copy: the process's table is unchanged
    assert fp.transforms.kernel_choices() == {"a": "patches"}
    fp.transforms.set_kernel_choices(None)
    assert fp.transforms.kernel_choices() == {}


@pytest.mark.parametrize("table, error, match", [
    ({"ok": "grouped", "a": "fast"}, ValueError, r"table\['a'\] must be one of \('grouped', 'patches', 'channels_last'\), got 'fast'"),
    ({1: "grouped"}, TypeError, "keys are geometry descriptions"),
    ([("a", "grouped")], TypeError, "must be a mapping"),
])
def test_set_kernel_choices_refuses_bad_tables(fresh, table, error, match):
    with pytest.raises(error, match=match):
        fp.transforms.set_kernel_choices(table)
    assert fp.transforms.kernel_choices() == {}  # nothing half-applied


geometries = st.tuples(
    st.sampled_from([1, 2, 3, 8]),        # input channels (per group)
    st.sampled_from([1, 2]),              # groups
    st.integers(1, 3),                    # output channels per group
    st.sampled_from([1, 3, 5]),           # kernel
    st.sampled_from([1, 2]),              # stride
    st.sampled_from([0, 1, "same"]),      # padding
    st.sampled_from([1, 2]),              # dilation
    st.booleans(),                        # conv1d
    st.integers(1, 5),                    # batch
)


@needs_mkldnn
@settings(max_examples=40, deadline=None)
@given(geometries, st.sampled_from(["grouped", "patches", "channels_last"]))
@example((8, 1, 1, 5, 1, 1, 1, False, 1), "grouped")  # a bias float32 gets 1.3e-5 off
def test_each_kernel_pinned_matches_the_float64_loop(geometry, kernel):
    cin, groups, cout, k, stride, padding, dilation, one_d, batch = geometry
    if padding == "same" and stride != 1:
        padding = 1
    conv = nn.Conv1d if one_d else nn.Conv2d
    torch.manual_seed(0)
    m = conv(cin * groups, cout * groups, k, stride=stride, padding=padding, dilation=dilation,
             groups=groups).float()
    side = 2 * dilation * (k - 1) + 5
    x = torch.randn(batch, cin * groups, *((side,) if one_d else (side, side)), dtype=torch.float32)

    def loss(p, xb):
        out = torch.func.functional_call(m, p, (xb,))
        return (out ** 2 * torch.linspace(0.5, 2.0, out[0].numel()).reshape(out[0].shape)).flatten(1).sum(1)

    old = _kernel_choice._CHOSEN
    try:
        _kernel_choice._CHOSEN = _Always(kernel)  # every geometry runs `kernel`
        got = fp.per_sample_grads(loss, method="hooks")(params_of(m), x)
        norms = fp.per_sample_grad_norms(loss, method="ghost")(params_of(m), x)
    finally:
        _kernel_choice._CHOSEN = old
    # float32's own error here: a per-example loop in float32 (a bias summed over 121
    # positions with cancellation is 1.3e-5 off in float32, whatever computes it)
    want32 = loop_grads(loss, params_of(m), x)
    m64 = m.double()
    want = loop_grads(loss, params_of(m64), x.double())
    for key in want:
        scale = want[key].abs().max().clamp_min(1e-12)
        own = float((want32[key].double() - want[key]).abs().max() / scale)
        assert float((got[key].double() - want[key]).abs().max() / scale) < max(1e-5, 4 * own), key
    want_norms = torch.cat([w.flatten(1) for w in want.values()], 1).norm(dim=1)
    torch.testing.assert_close(norms.double(), want_norms, rtol=1e-5, atol=1e-6)


class _Always(dict):
    """A choice table that answers ``kernel`` for every geometry."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel = kernel

    def get(self, key, default=None):
        return self.kernel


@needs_mkldnn
def test_the_first_call_returns_the_kept_kernels_own_bits(fresh):
    """The measuring call returns the kept kernel's result, so the first call of a
    geometry and every later one agree bit for bit, whichever kernel was kept."""
    torch.manual_seed(0)
    m = nn.Conv2d(3, 8, 3, padding=1).float()
    x = torch.randn(16, 3, 12, 12, dtype=torch.float32)

    def loss(p, xb):
        return torch.func.functional_call(m, p, (xb,)).square().flatten(1).sum(1)

    first = fp.per_sample_grads(loss, method="hooks")(params_of(m), x)
    assert len(fresh) == 1 and next(iter(fresh.values())) in _kernel_choice.KERNELS  # measured: any
    again = fp.per_sample_grads(loss, method="hooks")(params_of(m), x)
    for key in first:
        assert torch.equal(first[key], again[key]), key


@needs_mkldnn
def test_per_example_weight_shape_and_geometry_key(fresh):
    x, g = torch.randn(5, 2, 7, 7), torch.randn(5, 4, 5, 5)
    out = _rules.conv_weight_per_example(x.float(), g.float(), (3, 3), (1, 1), [0, 0, 0, 0], (1, 1), 1)
    assert out.shape == (5, 4, 2, 3, 3)
    (key, kept), = fresh.items()
    assert key.startswith("conv2d weight gradients: batch <= 8,")  # batches of 5-8 share it
    assert kept in _kernel_choice.KERNELS
    want = torch.einsum("bohw,bcijhw->bocij", g.double(),
                        x.double().unfold(2, 3, 1).unfold(3, 3, 1).permute(0, 1, 4, 5, 2, 3))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_measuring_holds_one_result_at_a_time(fresh):
    """The measuring call frees each timed result before the next run, so its peak memory
    is one call's (per-example conv gradients can be hundreds of MB)."""
    import gc
    import weakref

    made, alive_at_start = [], []

    def run():
        gc.collect()
        alive_at_start.append(sum(r() is not None for r in made))
        t = torch.zeros(4)
        made.append(weakref.ref(t))
        return t

    out = _kernel_choice.pick("mem", "grouped", {"grouped": run, "patches": run})
    assert alive_at_start == [0] * (2 * (_kernel_choice.WARMUP + _kernel_choice.ROUNDS) + 1)
    assert made[-1]() is out


@needs_mkldnn
@pytest.mark.parametrize("kernel", ["grouped", "patches", "channels_last"])
@pytest.mark.parametrize("make, shape", [
    (lambda: nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1), (3, 5, 5)),
    (lambda: nn.ConvTranspose1d(2, 3, 4, stride=2, groups=1), (2, 7)),
    (lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding="same"), (4, 9, 9)),
    (lambda: nn.Conv2d(3, 5, (3, 2), padding=(1, 2)), (3, 6, 7)),  # ghost keeps a permuted block
])
def test_transposed_and_grouped_convs_with_each_kernel_match_the_float64_loop(make, shape, kernel):
    """The transposed convolutions reach the same per-example kernels with the input and
    output gradient swapped (NOTE [transposed convolution as the adjoint])."""
    torch.manual_seed(0)
    m = make().float()
    x = torch.randn(3, *shape, dtype=torch.float32)

    def loss(p, xb):
        out = torch.func.functional_call(m, p, (xb,))
        return (out ** 2 * torch.linspace(0.5, 2.0, out[0].numel()).reshape(out[0].shape)).flatten(1).sum(1)

    old = _kernel_choice._CHOSEN
    try:
        _kernel_choice._CHOSEN = _Always(kernel)
        got = fp.per_sample_grads(loss, method="hooks")(params_of(m), x)
        total, norms = fp.clipped_grad(loss, 1.0, method="ghost")(params_of(m), x)
    finally:
        _kernel_choice._CHOSEN = old
    m64 = m.double()
    want = loop_grads(loss, params_of(m64), x.double())
    want_norms = torch.cat([w.flatten(1) for w in want.values()], 1).norm(dim=1)
    for key in want:
        scale = want[key].abs().max().clamp_min(1e-12)
        assert float((got[key].double() - want[key]).abs().max() / scale) < 1e-5, key
        clipped = (want[key] * (1.0 / want_norms).clamp(max=1.0).reshape(-1, *[1] * (want[key].dim() - 1))).sum(0)
        torch.testing.assert_close(total[key].double(), clipped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms.double(), want_norms, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.integers(0, 4), st.randoms(use_true_random=False))
def test_rows_of_a_permuted_block_reduce_like_a_contiguous_copy(shape, batch, rnd):
    """Ghost clipping reduces kept per-example gradients in their own layout (NOTE
    [channels-last patches]): norms and the weighted sum over a permuted block equal
    those of its contiguous copy (einsum as the reference)."""
    from functorch_pipeline.transforms._grad_sample._ghost_math import _contract_rows
    from functorch_pipeline.tree._math import _rows_sq_norms

    order = list(range(1, len(shape) + 1))
    rnd.shuffle(order)
    block = torch.randn(batch, *[shape[d - 1] for d in order], dtype=torch.float64)
    inverse = [0] + [order.index(d) + 1 for d in range(1, len(shape) + 1)]
    kept = block.permute(inverse)  # shape (batch, *shape), memory in `order`
    assert kept.shape == (batch, *shape)
    c = torch.randn(batch, dtype=torch.float64)
    dense = kept.contiguous()
    got = _contract_rows(c, kept)
    assert got.is_contiguous() and got.shape == tuple(shape)
    torch.testing.assert_close(got, torch.einsum("b,b...->...", c, dense), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_rows_sq_norms(kept, torch.float64),
                               dense.square().sum(tuple(range(1, dense.dim()))), rtol=1e-12, atol=1e-12)
