"""Data parallel training, keys and DP-SGD across 2 spawned gloo ranks, against one process
running the same global batches (NOTE [N ranks = one process])."""

from __future__ import annotations

import re

import pytest
import torch

import functorch_pipeline as fp
from functorch_pipeline import distributed as fpd
from functorch_pipeline import optim

N = 2
TIMEOUT = 120
N_DATA, D_IN, H, C = 64, 5, 8, 3


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(N_DATA, D_IN, generator=g, dtype=torch.float64), torch.randint(
        0, C, (N_DATA,), generator=g
    )


def _init() -> dict:
    g = torch.Generator().manual_seed(8)
    return {
        "w1": torch.randn(D_IN, H, generator=g, dtype=torch.float64) * 0.5,
        "b1": torch.zeros(H, dtype=torch.float64),
        "w2": torch.randn(H, C, generator=g, dtype=torch.float64) * 0.5,
        "b2": torch.zeros(C, dtype=torch.float64),
    }


def _loss(
    params: dict, x: torch.Tensor, y: torch.Tensor, keys: torch.Tensor, p_drop: float
) -> torch.Tensor:
    h = torch.tanh(x @ params["w1"] + params["b1"])
    if p_drop:
        # keys: one per example, from the example's index in the GLOBAL batch
        h = h * fp.random.bernoulli(keys, 1 - p_drop, (H,)) / (1 - p_drop)
    return fp.losses.cross_entropy(h @ params["w2"] + params["b2"], y).mean()


def _train(distributed: bool, p_drop: float, steps: int = 20, batch: int = 16) -> dict:
    x_all, y_all = _data()
    params = _init()
    opt = optim.chain(optim.clip_by_global_norm(0.5), optim.adam(1e-2))
    if distributed:  # both spellings of data parallelism
        opt = fpd.data_parallel(opt) if p_drop else optim.chain(fpd.pmean_gradients(), opt)
    state = opt.init(params)
    data_key, drop_key = fp.random.key(1), fp.random.key(2)
    for step in range(steps):
        idx = fp.random.permutation(fp.random.fold_in(data_key, step), N_DATA)[:batch]
        pos = torch.arange(batch)
        if distributed:
            idx, pos = fpd.shard((idx, pos))
        keys = fp.random.fold_in(fp.random.fold_in(drop_key, step), pos)
        grads = fp.grad(_loss)(params, x_all[idx], y_all[idx], keys, p_drop)
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    return params


def _per_example_grads(params: dict, idx: torch.Tensor) -> dict:
    x_all, y_all = _data()
    keys = torch.zeros(len(idx), 2, dtype=torch.int64)
    return fp.per_sample_grads(_loss, batch_argnums=(1, 2, 3), method="vmap")(
        params, x_all[idx], y_all[idx], keys, 0.0
    )


def _dp_steps(distributed: bool, sigma: float, steps: int = 3) -> list:
    params = _init()
    make = (
        fpd.differentially_private_aggregate
        if distributed
        else optim.differentially_private_aggregate
    )
    tx = make(0.1, sigma, key=3)
    state = tx.init(params)
    outs = []
    for step in range(steps):
        key = fp.random.fold_in(fp.random.key(4), step)
        if distributed:
            idx = fpd.poisson_indices(key, N_DATA, 0.25)
        else:
            idx = torch.nonzero(fp.data.poisson_mask(key, N_DATA, 0.25)).flatten()
        agg, state = tx.update(_per_example_grads(params, idx), state, params)
        outs.append(agg)
    return outs


def _work(rank: int) -> dict:
    out = {
        "adam_clip": _train(True, 0.0),
        "adam_clip_dropout": _train(True, 0.3),
        "dp_sigma0": _dp_steps(True, 0.0),
        "dp_sigma": _dp_steps(True, 1.1),
        "poisson": [
            fpd.poisson_indices(fp.random.fold_in(fp.random.key(5), s), 1000, 0.05)
            for s in range(20)
        ],
        "shared_key": fpd.shared_key(fp.random.key(100 + rank)),
        "rank_key": fpd.rank_key(fp.random.key(0)),
    }
    # Noise is added once to the global sum: std C * sigma of (result * global batch size).
    b = 3 + rank  # ragged shares: 3 and 4 examples of zero gradient
    tx = fpd.differentially_private_aggregate(0.5, 2.0, key=fp.random.key(6))
    zeros = {"w": torch.zeros(b, 20000, dtype=torch.float64)}
    out["noise"] = (
        tx.update(zeros, tx.init({"w": torch.zeros(20000, dtype=torch.float64)}))[0]["w"]
        * 7
        / (0.5 * 2.0)
    )
    try:
        fpd.shard({"x": torch.zeros(5, 2)})
    except ValueError as e:
        out["shard_error"] = str(e)
    return out


def test_data_parallel_matches_one_process_and_dp_noise_is_added_once() -> None:
    res = fpd.spawn(_work, N, timeout_s=TIMEOUT)
    ref = {"adam_clip": _train(False, 0.0), "adam_clip_dropout": _train(False, 0.3)}
    assert not fp.tree.allclose(
        ref["adam_clip"], ref["adam_clip_dropout"], rtol=0, atol=1e-3
    )  # dropout acts
    assert not fp.tree.allclose(
        ref["adam_clip"], _init(), rtol=0, atol=1e-2
    )  # training moved the params
    ref_dp0, ref_dp = _dp_steps(False, 0.0), _dp_steps(False, 1.1)
    for r, got in enumerate(res):
        for name in ("adam_clip", "adam_clip_dropout"):
            diff = max(
                float((a - b).abs().max())
                for a, b in zip(fp.tree.leaves(got[name]), fp.tree.leaves(ref[name]), strict=True)
            )
            assert diff < 1e-10, (name, r, diff)
        for a, b in zip(got["dp_sigma0"], ref_dp0, strict=True):
            assert fp.tree.allclose(a, b, rtol=0, atol=1e-12)
        for a, b in zip(got["dp_sigma"], ref_dp, strict=True):  # the same noise as one process
            assert fp.tree.allclose(a, b, rtol=0, atol=1e-12)
        assert torch.equal(got["shared_key"], fp.random.key(100))
        assert torch.equal(got["rank_key"], fp.random.fold_in(fp.random.key(0), r))
        assert re.search(
            r"shard: leaf at path `x` has 5 entries on axis 0, not divisible by the world size 2",
            got["shard_error"],
        )
    # the noise is identical on both ranks, N(0, 1) after rescaling, not sqrt(2) wider
    noise = res[0]["noise"]
    assert torch.equal(noise, res[1]["noise"])
    assert abs(float(noise.std()) - 1) < 0.03 and abs(float(noise.mean())) < 0.03
    # sharded Poisson sampling: disjoint shares whose union is the one-process batch
    sizes = []
    for s in range(20):
        mine = [res[r]["poisson"][s] for r in range(N)]
        whole = torch.nonzero(
            fp.data.poisson_mask(fp.random.fold_in(fp.random.key(5), s), 1000, 0.05)
        ).flatten()
        assert torch.equal(torch.cat(mine), whole)
        assert abs(len(mine[0]) - len(mine[1])) <= 1
        sizes.append(len(whole))
    assert 35 < sum(sizes) / len(sizes) < 65  # Binomial(1000, 0.05): mean 50


def test_dp_aggregate_counts_in_float64_and_names_its_edges() -> None:
    # One rank (the group of this process alone): the global count was kept in the
    # gradients' dtype, and float16 overflowed to inf past 65504 examples.
    tx = fpd.differentially_private_aggregate(1.0, 0.0, key=0)
    one = optim.differentially_private_aggregate(1.0, 0.0, key=0)
    params = {"w": torch.zeros(1, dtype=torch.float16)}
    g = {"w": torch.full((80000, 1), 0.5, dtype=torch.float16)}
    with fpd.local_group():
        got = tx.update(g, tx.init(params))[0]["w"]
        assert torch.equal(got, one.update(g, one.init(params))[0]["w"])
        assert float(got) == 0.5
        with pytest.raises(ValueError, match=r"differentially_private_aggregate.update: `batch_size` is not taken"):
            tx.update(g, tx.init(params), batch_size=4)
        empty = {"w": torch.zeros(0, 1, dtype=torch.float16)}
        with pytest.raises(ValueError, match=r"differentially_private_aggregate.update: the global batch is empty"):
            tx.update(empty, tx.init(params))


def test_dp_aggregate_refuses_batch_mean_gradients_before_any_collective(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import functorch_pipeline.distributed._data_parallel as dp

    def no_collective(*args: object, **kwargs: object) -> None:
        raise AssertionError("a collective ran before the gradients were checked")

    monkeypatch.setattr(dp, "psum", no_collective)
    params = {"w": torch.zeros(3, 2), "b": torch.zeros(3)}
    mean_grads = {"w": torch.ones(3, 2), "b": torch.ones(3)}  # batch means, not per-example
    tx = fpd.differentially_private_aggregate(1.0, 1.0, key=0)
    msg = (
        r"fp\.distributed\.differentially_private_aggregate\.update: leaf at path `b` must be a "
        r"per-example gradient of shape \(B, 3\) for a parameter of shape \(3,\), got \(3,\) "
        r"\(the parameter's own shape: batch-mean gradients\? pass per-example gradients"
    )
    with fpd.local_group():
        state = tx.init(params)
        with pytest.raises(ValueError, match=msg):
            tx.update(mean_grads, state, params)
        with pytest.raises(ValueError, match=msg):  # the shapes init saw
            tx.update(mean_grads, state)
        wrong = {"w": torch.ones(4, 3, 5), "b": torch.ones(4, 3)}
        with pytest.raises(
            ValueError,
            match=r"aggregate\.update: leaf at path `w` must be a per-example gradient of shape "
            r"\(B, 3, 2\) for a parameter of shape \(3, 2\), got \(4, 3, 5\)$",
        ):
            tx.update(wrong, state, params)
