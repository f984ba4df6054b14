"""DP-SGD building blocks against a Python loop, and the noise's standard deviation."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline import optim

F64 = torch.float64
B = 6


def _per_example(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(B, 3, 2, generator=g, dtype=F64) * 2, "b": torch.randn(B, 2, generator=g, dtype=F64)}


def _params():
    return {"w": torch.zeros(3, 2, dtype=F64), "b": torch.zeros(2, dtype=F64)}


def _loop_mean_clipped(grads, clip):
    total = {k: torch.zeros_like(v[0]) for k, v in grads.items()}
    for i in range(B):
        norm = math.sqrt(sum(float((v[i] ** 2).sum()) for v in grads.values()))
        factor = min(1.0, clip / norm)
        for k, v in grads.items():
            total[k] = total[k] + v[i] * factor
    return {k: v / B for k, v in total.items()}


def test_zero_noise_is_mean_of_clipped_grads():
    tx = optim.differentially_private_aggregate(l2_norm_clip=1.5, noise_multiplier=0.0, seed=0)
    got, _ = tx.update(_per_example(), tx.init(_params()))
    assert fp.tree.allclose(got, _loop_mean_clipped(_per_example(), 1.5), rtol=0, atol=1e-14)


def test_per_example_global_norm_clip_counts():
    summed, n = optim.per_example_global_norm_clip(_per_example(), 1.5)
    want = _loop_mean_clipped(_per_example(), 1.5)
    assert fp.tree.allclose(summed, fp.tree.scale(want, B), rtol=0, atol=1e-13)
    norms = [math.sqrt(sum(float((v[i] ** 2).sum()) for v in _per_example().values())) for i in range(B)]
    assert int(n) == sum(x > 1.5 for x in norms)


@pytest.mark.parametrize("uniform", [True, False])
def test_per_example_layer_norm_clip_matches_loop(uniform):
    grads = _per_example()
    summed, counts = optim.per_example_layer_norm_clip(grads, 2.0, uniform=uniform)
    total = sum(v[0].numel() for v in grads.values())
    assert set(counts) == set(grads)  # a tree shaped like the gradients, as optax
    for k, v in grads.items():
        c = counts[k]
        clip = 2.0 / math.sqrt(2) if uniform else 2.0 * math.sqrt(v[0].numel() / total)
        want = sum(v[i] * min(1.0, clip / float(v[i].norm())) for i in range(B))
        torch.testing.assert_close(summed[k], want, rtol=0, atol=1e-13)
        assert int(c) == sum(float(v[i].norm()) > clip for i in range(B))


def test_noise_has_documented_std():
    clip, sigma = 0.5, 2.0
    grads = {"w": torch.zeros(B, 200, 100, dtype=F64)}
    tx = optim.differentially_private_aggregate(clip, sigma, seed=42)
    out, _ = tx.update(grads, tx.init({"w": torch.zeros(200, 100, dtype=F64)}))
    noise = out["w"]
    expected = clip * sigma / B
    # 20000 draws: the sample std is within ~1% (5 sigma ~ 2.5%) of the truth
    assert abs(float(noise.std()) / expected - 1) < 0.03
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(noise.numel())


def test_noise_is_fresh_each_step_and_reproducible():
    tx = optim.differentially_private_aggregate(1.0, 1.0, seed=fp.random.key(3))
    s = tx.init(_params())
    u1, s = tx.update(_per_example(), s)
    u2, s = tx.update(_per_example(), s)
    assert not fp.tree.allclose(u1, u2)
    again, _ = tx.update(_per_example(), tx.init(_params()))
    assert fp.tree.allclose(u1, again, rtol=0, atol=0)
    assert int(s.count) == 2


def test_dpsgd_is_aggregate_then_sgd():
    opt = optim.dpsgd(0.1, l2_norm_clip=1.0, noise_multiplier=0.0, seed=0, momentum=0.9)
    u, _ = opt.update(_per_example(), opt.init(_params()))
    assert fp.tree.allclose(u, fp.tree.scale(_loop_mean_clipped(_per_example(), 1.0), -0.1), rtol=0, atol=1e-14)


def test_dpsgd_with_per_sample_grads_of_a_model():
    w = torch.randn(3, 2, dtype=F64)
    x, y = torch.randn(B, 3, dtype=F64), torch.randn(B, 2, dtype=F64)
    loss = lambda w, xi, yi: ((xi @ w - yi) ** 2).sum()  # noqa: E731
    per = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x, y)
    tx = optim.differentially_private_aggregate(1.0, 0.0, seed=0)
    got, _ = tx.update({"w": per}, tx.init({"w": w}))
    assert fp.tree.allclose(got, _loop_mean_clipped_single(per, 1.0), rtol=0, atol=1e-14)


def _loop_mean_clipped_single(per, clip):
    return {"w": sum(per[i] * min(1.0, clip / float(per[i].norm())) for i in range(B)) / B}


def test_bad_per_example_input_is_named():
    tx = optim.differentially_private_aggregate(1.0, 1.0, seed=0)
    bad = {"w": torch.zeros(B, 2), "b": torch.zeros(B + 1, 2)}
    with pytest.raises(ValueError, match=r"leaf at path `w` has 6 examples on axis 0 but the first leaf has 7"):
        tx.update(bad, tx.init({"w": torch.zeros(2), "b": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"leaf at path `s` has no batch axis"):
        tx.update({"s": torch.tensor(1.0)}, tx.init({"s": torch.tensor(0.0)}))
    with pytest.raises(ValueError, match=r"^differentially_private_aggregate: `noise_multiplier` must be a finite number >= 0, got -1.0"):
        optim.differentially_private_aggregate(1.0, -1.0, seed=0)
    with pytest.raises(TypeError, match=r"`seed` must be an int or an fp.random key"):
        optim.differentially_private_aggregate(1.0, 1.0, seed=1.5)


def test_batch_mean_gradients_are_refused():
    """NOTE [batch axis check]: a gradient with the parameter's own shape has no batch axis."""
    opt = optim.dpsgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, key=0)
    state = opt.init(_params())
    mean = fp.tree.map(lambda g: g.mean(0), _per_example())
    msg = r"^dpsgd.update: leaf at path `b` must be a per-example"
    with pytest.raises(ValueError, match=msg + r".*\(B, 2\).*got \(2,\).*batch-mean"):
        opt.update(mean, state, _params())
    with pytest.raises(ValueError, match=r"leaf at path `b` .*batch-mean"):
        opt.update(mean, state)  # shapes from init
    with pytest.raises(ValueError, match=r"`batch_size` is 5 but the gradients have 6"):
        opt.update(_per_example(), state, _params(), batch_size=5)
    u, _ = opt.update(_per_example(), state, _params(), batch_size=B)
    assert fp.tree.structure(u) == fp.tree.structure(_params())


def test_key_and_seed_spellings():
    by_key = optim.differentially_private_aggregate(1.0, 1.0, key=fp.random.key(4))
    by_seed = optim.differentially_private_aggregate(1.0, 1.0, seed=fp.random.key(4))
    positional = optim.differentially_private_aggregate(1.0, 1.0, 4)
    outs = [tx.update(_per_example(), tx.init(_params()))[0]
            for tx in (by_key, by_seed, positional)]
    assert fp.tree.allclose(outs[0], outs[1], rtol=0, atol=0)
    assert fp.tree.allclose(outs[0], outs[2], rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"differentially_private_aggregate\(key\): pass `key` or"):
        optim.differentially_private_aggregate(1.0, 1.0, key=0, seed=0)
    with pytest.raises(TypeError, match=r"`key` is required"):
        optim.differentially_private_aggregate(1.0, 1.0)
    with pytest.raises(TypeError, match=r"dpsgd: `key` is required"):
        optim.dpsgd(0.1, 1.0, 1.0)


def test_add_dp_noise_on_the_clipped_sum_equals_the_aggregate():
    """Same key, same step: clipping-then-noise in two pieces draws the same noise."""
    agg = optim.differentially_private_aggregate(1.5, 0.8, key=9)
    noise = optim.add_dp_noise(1.5, 0.8, key=9, batch_size=B)
    s_a, s_n = agg.init(_params()), noise.init(_params())
    for t in range(3):
        grads = _per_example(t)
        want, s_a = agg.update(grads, s_a)
        summed, _ = optim.per_example_global_norm_clip(grads, 1.5)
        got, s_n = noise.update(summed, s_n, _params())
        assert fp.tree.allclose(got, want, rtol=0, atol=1e-14)
    assert int(s_n.count) == 3


def test_add_dp_noise_std_and_divisor():
    clip, sigma, b = 0.5, 2.0, 16
    tx = optim.add_dp_noise(clip, sigma, key=1, batch_size=b)
    zeros = {"w": torch.zeros(200, 100, dtype=F64)}
    out, _ = tx.update(zeros, tx.init(zeros))
    # 20000 draws: the sample std is within ~1% of clip * sigma / b (3% is > 4 standard errors)
    assert abs(float(out["w"].std()) / (clip * sigma / b) - 1) < 0.03
    over, _ = tx.update(zeros, tx.init(zeros), batch_size=4)  # per-step override
    assert fp.tree.allclose(over, fp.tree.scale(out, b / 4), rtol=1e-14, atol=0)


def test_add_dp_noise_bad_input():
    tx = optim.add_dp_noise(1.0, 1.0, key=0, batch_size=4)
    state = tx.init(_params())
    with pytest.raises(ValueError, match=r"add_dp_noise.update: leaf at path `b` must have the "
                                         r"parameter's shape \(2,\), got \(6, 2\) \(per-example"):
        tx.update(_per_example(), state, _params())
    with pytest.raises(ValueError, match=r"add_dp_noise.update: no batch size"):
        t2 = optim.add_dp_noise(1.0, 1.0, key=0)
        t2.update(_params(), t2.init(_params()))
    with pytest.raises(ValueError, match=r"^add_dp_noise: `batch_size` must be a finite number > 0, got 0"):
        optim.add_dp_noise(1.0, 1.0, key=0, batch_size=0)
    with pytest.raises(TypeError, match=r"differentially_private\(optimizer, ...\): `optimizer`"):
        optim.differentially_private("adam", 1.0, 1.0, key=0)


def test_dp_adam_without_noise_is_torch_adam_on_the_clipped_mean():
    """DP-Adam, sigma = 0: torch.optim.Adam stepped on a per-example loop's clipped mean."""
    opt = optim.differentially_private(optim.adam(0.05), 1.0, 0.0, key=0, batch_size=B)
    params = {"w": torch.randn(3, 2, dtype=F64), "b": torch.randn(2, dtype=F64)}
    ref = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    torch_opt = torch.optim.Adam([ref["b"], ref["w"]], lr=0.05)
    state = opt.init(params)
    for t in range(4):
        grads = _per_example(t)
        summed, _ = optim.per_example_global_norm_clip(grads, 1.0)
        u, state = opt.update(summed, state, params)
        params = optim.apply_updates(params, u)
        want = _loop_mean_clipped(grads, 1.0)
        for k in ref:
            ref[k].grad = want[k].clone()
        torch_opt.step()
    assert fp.tree.allclose(params, {k: v.detach() for k, v in ref.items()}, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtypes", [(F64, F64), (torch.float32, F64)])
def test_noise_std_on_every_leaf(dtypes):
    """NOTE [one noise draw]: one flat draw (same dtypes) or one key per leaf (mixed)."""
    tx = optim.add_dp_noise(1.0, 3.0, key=2, batch_size=1)
    zeros = {"a": torch.zeros(100, 60, dtype=dtypes[0]), "b": torch.zeros(6000, dtype=dtypes[1])}
    out, _ = tx.update(zeros, tx.init(zeros))
    for k, v in out.items():
        assert v.dtype == zeros[k].dtype
        assert abs(float(v.double().std()) / 3.0 - 1) < 0.05  # 6000 draws: ~0.9% std error
    corr = torch.corrcoef(torch.stack([out["a"].flatten().double(), out["b"].double()]))[0, 1]
    assert abs(float(corr)) < 0.06


def test_noise_drawn_in_chunks_is_fresh_in_every_chunk():
    """More entries than one noise chunk (2**18): each chunk has its own key."""
    n = (1 << 18) + 5000
    tx = optim.add_dp_noise(1.0, 1.0, key=0, batch_size=1)
    zeros = {"w": torch.zeros(n)}
    z = tx.update(zeros, tx.init(zeros))[0]["w"]
    assert abs(float(z.std()) - 1) < 0.01 and abs(float(z.mean())) < 0.01
    head, tail = z[:5000], z[1 << 18:]
    assert not torch.equal(head, tail)
    assert abs(float(torch.corrcoef(torch.stack([head, tail]))[0, 1])) < 0.06


# ------------------------------------------------ hyperparameters: NaN, signs, tensors, inf

NAN, INF = float("nan"), float("inf")


def _factories():
    """name -> (l2_norm_clip, noise_multiplier) -> transformation, for the four DP APIs."""
    return {
        "dpsgd": lambda c, s: optim.dpsgd(0.1, l2_norm_clip=c, noise_multiplier=s, key=0),
        "differentially_private_aggregate":
            lambda c, s: optim.differentially_private_aggregate(c, s, key=0),
        "add_dp_noise": lambda c, s: optim.add_dp_noise(c, s, key=0, batch_size=B),
        "differentially_private":
            lambda c, s: optim.differentially_private(optim.sgd(0.1), c, s, key=0, batch_size=B),
    }


def _finite_nonneg(v):
    return math.isfinite(float(v)) and float(v) >= 0


@pytest.mark.parametrize("api", sorted(_factories()))
@pytest.mark.parametrize("sigma", [NAN, -1.0, INF, -INF, torch.tensor(-1.0), torch.tensor(NAN),
                                   torch.tensor(INF), torch.tensor(-0.5, dtype=F64)])
def test_bad_noise_multiplier_is_refused_by_every_api(api, sigma):
    """NaN or a negative sigma made `noise_multiplier > 0` false: no noise, silently."""
    with pytest.raises(ValueError, match=rf"^{api}: `noise_multiplier` must be a finite number "
                                         r">= 0, got .*(nan|inf|-)"):
        _factories()[api](1.0, sigma)


@pytest.mark.parametrize("api", sorted(_factories()))
@pytest.mark.parametrize("clip", [NAN, -1.0, -INF, torch.tensor(NAN), torch.tensor(-2.0)])
def test_bad_l2_norm_clip_is_refused_by_every_api(api, clip):
    with pytest.raises(ValueError, match=rf"^{api}: `l2_norm_clip` must be a number >= 0 or "
                                         r"inf, got .*(nan|-)"):
        _factories()[api](clip, 1.0)


@pytest.mark.parametrize("api", sorted(_factories()))
def test_non_scalar_or_non_number_hyperparameters_are_refused(api):
    make = _factories()[api]
    with pytest.raises(TypeError, match=rf"^{api}: `noise_multiplier` must be a number or a "
                                        r"one-element tensor, got a Tensor of shape \(2,\)"):
        make(1.0, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match=rf"^{api}: `l2_norm_clip` must be a number or a "
                                        r"one-element tensor, got a str"):
        make("1.0", 1.0)
    with pytest.raises(TypeError, match=rf"^{api}: `noise_multiplier` .* got a bool"):
        make(1.0, True)


@settings(max_examples=40, deadline=None)
@given(sigma=st.floats(allow_nan=True, allow_infinity=True, width=64),
       as_tensor=st.booleans())
def test_noise_multiplier_is_accepted_iff_finite_and_non_negative(sigma, as_tensor):
    """Accepted values give the noise of the equal Python float (std C * sigma / B on the
    mean: the reference update is recomputed here from the clipped sum and the same draw);
    everything else raises."""
    value = torch.tensor(sigma, dtype=F64) if as_tensor else sigma
    if not _finite_nonneg(sigma):
        with pytest.raises(ValueError, match=r"`noise_multiplier` must be a finite number >= 0"):
            optim.differentially_private_aggregate(1.0, value, key=3)
        return
    sigma = min(sigma, 1e6)
    value = torch.tensor(sigma, dtype=F64) if as_tensor else sigma
    tx = optim.differentially_private_aggregate(1.0, value, key=3)
    got, _ = tx.update(_per_example(), tx.init(_params()))
    # the reference: the clipped mean plus C * sigma / B times the noise of sigma = 1
    unit = optim.differentially_private_aggregate(1.0, 1.0, key=3)
    noisy1, _ = unit.update(_per_example(), unit.init(_params()))
    mean = _loop_mean_clipped(_per_example(), 1.0)
    want = {k: mean[k] + sigma * (noisy1[k] - mean[k]) for k in mean}
    assert fp.tree.allclose(got, want, rtol=1e-9, atol=1e-12 * max(1.0, sigma))


def test_zero_d_tensor_hyperparameters_equal_python_floats():
    for name in ("dpsgd", "differentially_private_aggregate"):
        make = _factories()[name]
        a, b = make(torch.tensor(1.5), torch.tensor(0.8, dtype=F64)), make(1.5, 0.8)
        ua, _ = a.update(_per_example(), a.init(_params()))
        ub, _ = b.update(_per_example(), b.init(_params()))
        assert fp.tree.allclose(ua, ub, rtol=0, atol=0)


# ----------------------------------------------------------------- batch_size, empty batches


@pytest.mark.parametrize("api", ["add_dp_noise", "differentially_private"])
@pytest.mark.parametrize("b", [0, -2, -2.0, NAN, INF, torch.tensor(0.0), torch.tensor(-2.0),
                               torch.tensor(NAN)])
def test_batch_size_override_must_be_finite_and_positive(api, b):
    """update(..., batch_size=b): 0 gave inf, -2 flipped the sign (gradient ascent), NaN NaN."""
    make = _factories()[api]
    tx = make(1.0, 0.0)
    summed = {"w": torch.ones(3, 2, dtype=F64), "b": -torch.ones(2, dtype=F64)}
    state = tx.init(_params())
    with pytest.raises(ValueError, match=rf"^{api}.update: `batch_size` must be a finite number "
                                         r"> 0, got .*(0|-2|nan|inf)"):
        tx.update(summed, state, _params(), batch_size=b)


@pytest.mark.parametrize("b", [0, -2, NAN, INF, -INF])
def test_batch_size_in_the_constructor_must_be_finite_and_positive(b):
    with pytest.raises(ValueError, match=r"^add_dp_noise: `batch_size` must be a finite number "
                                         r"> 0, got"):
        optim.add_dp_noise(1.0, 0.0, key=0, batch_size=b)
    with pytest.raises(ValueError, match=r"^differentially_private: `batch_size` must be a "
                                         r"finite number > 0, got"):
        optim.differentially_private(optim.sgd(1.0), 1.0, 0.0, key=0, batch_size=b)


@pytest.mark.parametrize("b", [2, 2.5, torch.tensor(2.5, dtype=F64), torch.tensor(3)])
def test_a_valid_batch_size_override_divides_the_sum(b):
    tx = optim.differentially_private(optim.sgd(1.0), 1.0, 0.0, key=0, batch_size=4.0)
    summed = {"w": torch.arange(6, dtype=F64).reshape(3, 2), "b": torch.tensor([1.0, -2.0],
                                                                                dtype=F64)}
    got, _ = tx.update(summed, tx.init(_params()), _params(), batch_size=b)
    want = {k: -v / float(b) for k, v in summed.items()}
    assert fp.tree.allclose(got, want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("api", ["dpsgd", "differentially_private_aggregate"])
@pytest.mark.parametrize("sigma", [0.0, 1.0])
def test_empty_batch_has_no_mean(api, sigma):
    """B = 0 per-example gradients: dividing by B gave NaN (sigma = 0) or +-inf params."""
    tx = _factories()[api](1.0, sigma)
    empty = {"w": torch.zeros(0, 3, 2, dtype=F64), "b": torch.zeros(0, 2, dtype=F64)}
    with pytest.raises(ValueError, match=rf"^{api}.update: the batch is empty .*no mean.*"
                                         r"add_dp_noise.*differentially_private.*`batch_size=`.*"
                                         r"DPTrainer"):
        tx.update(empty, tx.init(_params()), _params())


def test_the_documented_alternative_handles_an_empty_batch():
    """add_dp_noise with the expected batch size: an empty Poisson batch is noise / EB."""
    empty = {"w": torch.zeros(0, 3, 2, dtype=F64), "b": torch.zeros(0, 2, dtype=F64)}
    summed, n = optim.per_example_global_norm_clip(empty, 1.0)
    assert int(n) == 0 and all(float(v.abs().sum()) == 0 for v in summed.values())
    tx = optim.add_dp_noise(1.0, 0.0, key=0, batch_size=4.0)
    out, _ = tx.update(summed, tx.init(_params()), _params())
    assert all(torch.isfinite(v).all() and float(v.abs().sum()) == 0 for v in out.values())


@pytest.mark.parametrize("clip", ["global", "layer"])
def test_per_example_clip_checks_a_tensor_bound(clip):
    # A tensor bound was not checked: -1 turned clipping off (the raw sum [3.3, 4.4]),
    # NaN gave NaN, and a (B,) tensor was taken as one bound per example.
    fn = optim.per_example_global_norm_clip if clip == "global" else optim.per_example_layer_norm_clip
    g = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}
    for bad in (torch.tensor(-1.0), torch.tensor(float("nan"))):
        with pytest.raises(ValueError, match=r"l2_norm_clip` must be a number >= 0"):
            fn(g, bad)
    with pytest.raises(ValueError, match=r"one-element floating-point tensor, got shape \(2,\)"):
        fn(g, torch.tensor([2.0, 0.1]))
    got, _ = fn(g, torch.tensor(1.0))  # a valid tensor bound: the number's result
    want, _ = fn(g, 1.0)
    assert torch.equal(got["w"], want["w"]) and torch.allclose(want["w"], torch.tensor([0.9, 1.2]))


@pytest.mark.parametrize("clip", ["global", "layer"])
def test_per_example_clip_to_zero_with_a_zero_gradient(clip):
    # C = 0 is allowed; an example whose gradient is exactly 0 gave 0/0 = NaN and a NaN sum.
    fn = optim.per_example_global_norm_clip if clip == "global" else optim.per_example_layer_norm_clip
    g = {"w": torch.tensor([[3.0, 4.0], [0.0, 0.0]])}
    summed, _ = fn(g, 0.0)
    assert torch.equal(summed["w"], torch.zeros(2))
