"""Sharded optimizer state (ZeRO 1/2) in 2 spawned gloo ranks: the trajectory equals the
replicated data-parallel optimizer and a one-process reference; state memory ~1/N."""

from __future__ import annotations

import pytest
import torch

import functorch_pipeline as fp
from functorch_pipeline import distributed as fpd
from functorch_pipeline import optim

N = 2
TIMEOUT = 120
ELEMENTWISE = {
    "sgd": lambda: optim.sgd(0.05, momentum=0.9),
    "adam": lambda: optim.adam(1e-2),
    "adamw": lambda: optim.adamw(1e-2, weight_decay=0.1),
    "rmsprop": lambda: optim.rmsprop(1e-2),
    "adagrad": lambda: optim.adagrad(1e-1),
    "adadelta": lambda: optim.adadelta(1.0),
    "adamax": lambda: optim.adamax(1e-2),
    "nadam": lambda: optim.nadam(1e-2),
    "radam": lambda: optim.radam(1e-2),
    "lion": lambda: optim.lion(1e-3),
}


def _params(dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    # odd sizes (45 + 7 + 12 = 64 f-numbers, 5 in a second dtype) so the padding is exercised
    return {
        "a": torch.randn(3, 15, generator=g, dtype=dtype),
        "b": [
            torch.randn(7, generator=g, dtype=dtype),
            torch.randn(2, 2, 3, generator=g, dtype=dtype),
        ],
        "h": torch.randn(5, generator=g, dtype=torch.float64),
    }


def _loss(params: dict, rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10 + rank)
    total = torch.zeros((), dtype=torch.float64)
    for leaf in fp.tree.leaves(params):
        d = torch.randn(leaf.shape, generator=g, dtype=leaf.dtype)
        total = total + ((leaf - d) ** 2 * (1 + 0.1 * leaf**2)).mean().double()
    return total


def _run(opt: object, rank: int | None, steps: int, dtype: torch.dtype) -> tuple[dict, object]:
    """rank None: one process whose loss is the mean of the ranks' losses (the reference)."""
    params = _params(dtype)
    state = opt.init(params)
    for _ in range(steps):
        if rank is None:
            grads = fp.grad(lambda p: sum(_loss(p, r) for r in range(N)) / N)(params)
        else:
            grads = fp.grad(_loss)(params, rank)
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    return params, state


def _big(rank: int | None) -> tuple[dict, dict]:
    """Params past the 4 MB bucket (3 buckets, odd sizes) and rank's gradients (None: mean)."""
    g = torch.Generator().manual_seed(5)
    params = {
        "a": torch.randn(600_001, generator=g),
        "b": torch.randn(700_003, generator=g),
        "c": torch.randn(900_007, generator=g),
        "d": torch.randn(3, generator=g),
    }
    grads = [fp.tree.map(lambda x, q=q: torch.sin(x * (q + 2)), params) for q in range(N)]
    if rank is None:
        return params, fp.tree.map(lambda *xs: sum(xs) / N, *grads)
    return params, grads[rank]


def _work(rank: int) -> dict:
    out = {}
    params, grads = _big(rank)
    opt = fpd.shard_optimizer(optim.adam(1e-2))
    state = opt.init(params)
    for _ in range(2):
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
    full = opt.gather_state(state, params)
    again = opt.gather_state(opt.shard_state(full, params), params)
    out["big"] = {
        "params": params,
        "full_state": full,
        "roundtrip": fp.tree.allclose(full, again, rtol=0, atol=0),
    }
    for dtype in (torch.float64, torch.float32):
        inner = optim.chain(fpd.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.1))
        sharded, s_state = _run(fpd.shard_optimizer(inner), rank, 10, dtype)
        replicated, r_state = _run(
            optim.chain(
                fpd.pmean_gradients(),
                optim.clip_by_global_norm(0.5),
                optim.adamw(1e-2, weight_decay=0.1),
            ),
            rank,
            10,
            dtype,
        )
        out[str(dtype)] = {
            "sharded": sharded,
            "replicated": replicated,
            "bytes": (fp.tree.nbytes(s_state), fp.tree.nbytes(r_state)),
        }
    # complex updates: the global norm counts |u|^2 (NOTE: it dropped the imaginary part)
    zp, zg = _complex_tree(None), _complex_tree(rank)
    clip_sgd = fpd.shard_optimizer(optim.chain(fpd.clip_by_global_norm(1.0), optim.sgd(1.0)))
    out["complex_update"] = clip_sgd.update(zg, clip_sgd.init(zp), zp)[0]
    out["registry"] = {
        name: _run(fpd.shard_optimizer(make()), rank, 3, torch.float64)[0]
        for name, make in ELEMENTWISE.items()
    }
    return out


def _complex_tree(rank: int | None) -> dict:
    """Complex64 and float32 leaves; rank None: the parameters, else rank's gradients."""
    scale = 1.0 if rank is None else rank + 1.0
    return {
        "z": torch.tensor([3.0 + 4.0j, 12.0j, -2.0 + 1.0j], dtype=torch.complex64) * scale,
        "r": torch.tensor([0.5, 1.0]) * scale,
    }


def _clipped_closed_form(u: dict, c: float) -> dict:
    """u * c / max(||u||, c) with ||u||^2 = sum |u_i|^2, in float64 / complex128."""
    wide = fp.tree.map(lambda x: x.to(torch.complex128 if x.is_complex() else torch.float64), u)
    norm = sum(float((x.abs() ** 2).sum()) for x in fp.tree.leaves(wide)) ** 0.5
    return fp.tree.map(lambda x: x * (c / max(norm, c)), wide)


def test_distributed_clip_by_global_norm_counts_imaginary_parts() -> None:
    u = {"z": torch.tensor([3.0 + 4.0j, 12.0j], dtype=torch.complex128), "r": torch.tensor([0.5])}
    tx = fpd.clip_by_global_norm(2.0)
    with fpd.local_group():
        got = tx.update(u, tx.init(None))[0]
    want = _clipped_closed_form(u, 2.0)  # ||u|| = sqrt(25 + 144 + 0.25) = 13.01
    assert got["z"].dtype == torch.complex128 and got["r"].dtype == torch.float32
    for k in u:
        assert torch.allclose(got[k].to(want[k].dtype), want[k], rtol=1e-6, atol=1e-7), k


def test_sharded_optimizer_matches_replicated_and_one_process() -> None:
    res = fpd.spawn(_work, N, timeout_s=TIMEOUT)
    mean = fp.tree.map(lambda *xs: sum(xs) / N, *[_complex_tree(r) for r in range(N)])
    want = fp.tree.map(lambda x: -x, _clipped_closed_form(mean, 1.0))
    for r in range(N):
        got = res[r]["complex_update"]
        for k in want:
            assert got[k].dtype == _complex_tree(None)[k].dtype
            assert torch.allclose(got[k].to(want[k].dtype), want[k], rtol=1e-5, atol=1e-6), (r, k)
    params, grads = _big(None)
    ref_opt = optim.adam(1e-2)
    ref_state = ref_opt.init(params)
    for _ in range(2):
        updates, ref_state = ref_opt.update(grads, ref_state, params)
        params = optim.apply_updates(params, updates)
    for r in range(N):
        big = res[r]["big"]
        assert fp.tree.allclose(big["params"], params, rtol=0, atol=1e-6)
        assert big["roundtrip"]
        # the gathered state is Adam's mu and nu over the unpadded buckets in leaf order
        mu = torch.cat([ref_state[0].mu[k].reshape(-1) for k in "abcd"])
        assert torch.allclose(torch.cat(big["full_state"][0].mu), mu, rtol=1e-5, atol=1e-7)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        ref, ref_state = _run(
            optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(1e-2, weight_decay=0.1)),
            None,
            10,
            dtype,
        )
        assert not fp.tree.allclose(ref, _params(dtype), rtol=0, atol=1e-2)
        for r in range(N):
            got = res[r][str(dtype)]
            for name in ("sharded", "replicated"):
                for a, b in zip(fp.tree.leaves(got[name]), fp.tree.leaves(ref), strict=True):
                    assert a.dtype == b.dtype
                    assert float((a - b).abs().max()) < tol, (dtype, r, name)
            sharded_bytes, replicated_bytes = got["bytes"]
            assert replicated_bytes == fp.tree.nbytes(ref_state)
            # 1/N of mu and nu plus at most one padding number per dtype and shard, plus counts
            assert sharded_bytes <= replicated_bytes / N + 64, (sharded_bytes, replicated_bytes)
            assert sharded_bytes >= replicated_bytes / N - 64
    for name, make in ELEMENTWISE.items():
        ref, _ = _run(make(), None, 3, torch.float64)
        for r in range(N):
            got = res[r]["registry"][name]
            for a, b in zip(fp.tree.leaves(got), fp.tree.leaves(ref), strict=True):
                assert float((a - b).abs().max()) < 1e-12, (name, r)


def test_sharded_optimizer_needs_a_process_group() -> None:
    opt = fpd.shard_optimizer(optim.adam(1e-3))
    with pytest.raises(
        RuntimeError, match=r"shard_optimizer.init: torch.distributed is not initialised; launch"
    ):
        opt.init({"w": torch.zeros(2)})
