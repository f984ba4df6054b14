"""DP-SGD building blocks against a Python loop, and the noise's standard deviation."""

import math

import pytest
import torch

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
    for (k, v), c in zip(sorted(grads.items()), counts, strict=True):
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
    with pytest.raises(ValueError, match=r"`noise_multiplier` must be >= 0.0"):
        optim.differentially_private_aggregate(1.0, -1.0, seed=0)
    with pytest.raises(TypeError, match=r"`seed` must be an int or an fp.random key"):
        optim.differentially_private_aggregate(1.0, 1.0, seed=1.5)
