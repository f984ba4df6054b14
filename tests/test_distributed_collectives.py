"""fp.distributed collectives over pytrees, in 2 spawned gloo processes, against plain torch
references computed here from every rank's inputs."""

from __future__ import annotations

import os
import re
import time

import pytest
import torch

import functorch_pipeline as fp
from functorch_pipeline import distributed as fpd

N = 2
TIMEOUT = 90


def _tree(rank: int) -> dict:
    g = torch.Generator().manual_seed(100 + rank)
    return {
        "a": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "b": [torch.randn(4, generator=g), torch.randint(-5, 5, (2, 2), generator=g)],
        "c": torch.randn(2, 1, 2, generator=g, dtype=torch.float64),
    }


def _large(rank: int) -> dict:
    """Leaves past the 4 MB eager chunk (NOTE [eager buckets of 4 MB]): one cut into slices,
    several packed across chunk boundaries, two dtypes."""
    g = torch.Generator().manual_seed(200 + rank)
    tree = {f"m{i}": torch.randn(300_000, generator=g) for i in range(5)}
    tree["big"] = torch.randn(1_200_000, generator=g)
    tree["d"] = torch.randn(700_000, generator=g, dtype=torch.float64)
    return tree


def _floats(t: dict) -> dict:
    return {"a": t["a"], "b": [t["b"][0]], "c": t["c"]}


def _work_collectives(rank: int) -> dict:
    import torch.distributed as dist

    t = _tree(rank)
    before = fp.tree.clone(t)
    calls = []
    real = dist.all_reduce

    def counting(x, *args, **kwargs):
        calls.append(x.dtype)
        return real(x, *args, **kwargs)

    dist.all_reduce = counting
    many = {f"w{i}": torch.full((3,), float(rank + i)) for i in range(50)}
    many["i"] = torch.arange(3) + rank
    out = {
        "psum": fpd.psum(t),
        "pmean": fpd.pmean(_floats(t)),
        "pmax": fpd.pmax(t),
        "pmin": fpd.pmin(t),
        "gather0": fpd.all_gather(t),
        "gather1": fpd.all_gather(t, axis=1),
        "gather_tiled1": fpd.all_gather({"a": t["a"], "c": t["c"]}, axis=1, tiled=True),
        "bcast": fpd.broadcast(t, src=1),
        "scatter": fpd.psum_scatter({"a": t["a"], "i": t["b"][1], "c": t["c"]}),  # 2 == N rows
        "scatter_tiled": fpd.psum_scatter(
            {"x": torch.arange(12.0).view(4, 3) * (rank + 1)}, tiled=True
        ),
        "scatter_dim2": fpd.psum_scatter({"c": t["c"]}, scatter_dimension=2),
        "bool_max": fpd.pmax(torch.tensor([rank == 0, False, rank == 1])),
        "many": fpd.psum(many),
    }
    out["calls"] = [str(d) for d in calls]
    big = _large(rank)
    out["large"] = {
        "psum": fpd.psum(big),
        "pmean": fpd.pmean(big),
        "bcast": fpd.broadcast(big, src=1),
    }
    dist.all_reduce = real
    out["unchanged"] = fp.tree.allclose(t, before, rtol=0, atol=0)
    out["rank"], out["world_size"] = fpd.rank(), fpd.world_size()
    # Under fp.jit(fullgraph=True): Dynamo traces the bucketing and the functional collectives.
    step = fp.jit(lambda tree: fpd.pmean(fp.tree.scale(tree, 2.0)), fullgraph=True, backend="eager")
    out["jit_pmean"] = step(_floats(t))
    out["jit_psum_scatter"] = fp.jit(
        lambda x: fpd.psum_scatter(x, tiled=True), fullgraph=True, backend="eager"
    )(torch.arange(4.0) + rank)
    out["bad"] = _bad_trees(rank)  # in the same processes: each spawn costs seconds
    return out


@pytest.fixture(scope="module")
def collective_results() -> list:
    return fpd.spawn(_work_collectives, N, timeout_s=TIMEOUT)


def test_collectives_match_references(collective_results: list) -> None:
    res = collective_results
    trees = [_tree(r) for r in range(N)]
    stack = [fp.tree.stack([trees[r] for r in range(N)])]
    total = fp.tree.map(lambda s: s.sum(0), stack[0])
    floats_mean = fp.tree.map(lambda s: s.double().mean(0).to(s.dtype), _floats(stack[0]))
    for r, got in enumerate(res):
        assert got["rank"] == r and got["world_size"] == N
        assert got["unchanged"]
        assert fp.tree.allclose(got["psum"], total, rtol=1e-6, atol=1e-6)
        assert got["psum"]["b"][1].dtype == torch.int64
        assert torch.equal(got["psum"]["b"][1], total["b"][1])
        assert fp.tree.allclose(got["pmean"], floats_mean, rtol=1e-6, atol=1e-6)
        assert fp.tree.allclose(
            got["pmax"], fp.tree.map(lambda s: s.amax(0), stack[0]), rtol=0, atol=0
        )
        assert fp.tree.allclose(
            got["pmin"], fp.tree.map(lambda s: s.amin(0), stack[0]), rtol=0, atol=0
        )
        assert fp.tree.allclose(got["gather0"], stack[0], rtol=0, atol=0)
        assert fp.tree.allclose(
            got["gather1"], fp.tree.map(lambda s: s.movedim(0, 1), stack[0]), rtol=0, atol=0
        )
        cat1 = {k: torch.cat([t[k] for t in trees], dim=1) for k in ("a", "c")}
        assert fp.tree.allclose(got["gather_tiled1"], cat1, rtol=0, atol=0)
        assert fp.tree.allclose(got["bcast"], trees[1], rtol=0, atol=0)
        sub = {"a": total["a"][r], "i": total["b"][1][r], "c": total["c"][r]}
        assert fp.tree.allclose(got["scatter"], sub, rtol=1e-6, atol=1e-6)
        x_total = torch.arange(12.0).view(4, 3) * 3
        assert torch.allclose(got["scatter_tiled"]["x"], x_total[2 * r : 2 * r + 2])
        assert torch.allclose(got["scatter_dim2"]["c"], total["c"][:, :, r])
        assert got["bool_max"].tolist() == [True, False, True]
        many_ref = {f"w{i}": torch.full((3,), float(2 * i + 1)) for i in range(50)}
        many_ref["i"] = torch.arange(3) * 2 + 1
        assert fp.tree.allclose(got["many"], many_ref, rtol=0, atol=0)
        # one all_reduce per dtype bucket, not per leaf (psum: 3 dtypes, pmean: 2, pmax: 3,
        # pmin: 3, bool pmax: 1, 51-leaf psum: 2)
        assert got["calls"] == (
            ["torch.float64", "torch.float32", "torch.int64"]
            + ["torch.float64", "torch.float32"]
            + ["torch.float64", "torch.float32", "torch.int64"] * 2
            + ["torch.uint8"]
            + ["torch.int64", "torch.float32"]
        )
        large = [_large(q) for q in range(N)]
        large_sum = fp.tree.map(lambda a, b: a + b, *large)
        assert fp.tree.allclose(got["large"]["psum"], large_sum, rtol=1e-6, atol=1e-6)
        assert fp.tree.allclose(
            got["large"]["pmean"], fp.tree.scale(large_sum, 0.5), rtol=1e-6, atol=1e-6
        )
        assert fp.tree.allclose(got["large"]["bcast"], large[1], rtol=0, atol=0)
        assert fp.tree.allclose(
            got["jit_pmean"], fp.tree.scale(floats_mean, 2.0), rtol=1e-6, atol=1e-6
        )
        assert torch.equal(
            got["jit_psum_scatter"], torch.tensor([1.0, 3.0, 5.0, 7.0])[2 * r : 2 * r + 2]
        )


def _bad_trees(rank: int) -> dict:
    msgs = {}
    cases = {
        "shape": {"params": {"w": torch.zeros(3 + rank), "b": torch.zeros(2)}},
        "keys": {"params": {"w": torch.zeros(3)}}
        if rank == 0
        else {"params": {"v": torch.zeros(3)}},
        "dtype": {"w": torch.zeros(2, dtype=torch.float32 if rank == 0 else torch.float64)},
    }
    for name, tree in cases.items():
        try:
            fpd.psum(tree)
            msgs[name] = "no error"
        except ValueError as e:
            msgs[name] = str(e)
    # the group still works after the errors (both ranks raised, nothing is left pending)
    msgs["after"] = fpd.psum(torch.ones(1))
    for bad, exc in [
        (lambda: fpd.pmean({"i": torch.arange(2)}), TypeError),
        (lambda: fpd.broadcast(torch.ones(1), src=2), ValueError),
        (lambda: fpd.psum_scatter({"x": torch.ones(3)}), ValueError),
        (lambda: fpd.psum({"x": 1.0}), TypeError),
    ]:
        try:
            bad()
            msgs[exc.__name__ + str(len(msgs))] = "no error"
        except exc as e:
            msgs[exc.__name__ + str(len(msgs))] = str(e)
    return msgs


def test_trees_that_differ_across_ranks_raise_naming_rank_and_path(
    collective_results: list,
) -> None:
    for msgs in (got["bad"] for got in collective_results):
        assert re.search(
            r"fp.distributed.psum: the tree differs across ranks \(rank 1 vs rank 0\): "
            r"leaf at path `params\.w` has shape \(4,\).*on rank 1 but shape \(3,\)",
            msgs["shape"],
        )
        assert re.search(
            r"key paths only on rank 1: \['params\.v'\]; only on rank 0: \['params\.w'\]",
            msgs["keys"],
        )
        assert re.search(r"`w` has shape \(2,\) and dtype torch.float64 on rank 1", msgs["dtype"])
        assert msgs["after"].item() == 2.0
        rest = [v for k, v in msgs.items() if k[0].isupper()]
        assert re.search(r"pmean: leaf at path `i` has dtype torch.int64", rest[0])
        assert re.search(r"broadcast: `src` must be a rank in \[0, 2\), got 2", rest[1])
        assert re.search(
            r"psum_scatter: leaf at path `x` has shape \(3,\); axis 0 must have exactly 2", rest[2]
        )
        assert re.search(r"psum: leaf at path `x` is a float, not a tensor", rest[3])


def test_collective_without_process_group_says_how_to_launch() -> None:
    assert not fpd.is_initialized() and fpd.rank() == 0 and fpd.world_size() == 1
    with pytest.raises(
        RuntimeError,
        match=r"fp.distributed.psum: torch.distributed is not initialised; "
        r"launch the script with `torchrun --nproc_per_node N",
    ):
        fpd.psum({"w": torch.ones(2)})


def _work_dies(rank: int) -> float:
    fpd.psum(torch.ones(3))
    if rank == 1:
        os._exit(3)  # dies mid-step, without a word
    start = time.monotonic()
    try:
        fpd.psum(torch.ones(3))
    finally:
        print(f"rank 0 failed after {time.monotonic() - start:.1f} s", flush=True)
    return 0.0


def test_a_dead_rank_makes_the_others_fail_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        fpd.spawn(_work_dies, N, timeout_s=20)
    msg = str(info.value)
    assert "rank 1: exited with code 3 without a result" in msg
    assert re.search(
        r"rank 0: RuntimeError: fp.distributed.psum: the collective failed on rank 0 "
        r"\(a peer rank may have died",
        msg,
    )
    assert time.monotonic() - start < 50


def _work_cuda(rank: int) -> dict:
    dev = torch.device("cuda", rank)
    t = fp.tree.to(_tree(rank), dev)
    opt = fpd.shard_optimizer(fp.optim.adam(0.1))
    params = {"w": torch.arange(7.0, device=dev)}
    state = opt.init(params)
    updates, _ = opt.update({"w": torch.ones(7, device=dev) * (rank + 1)}, state, params)
    out = {
        "psum": fpd.psum(t),
        "pmean": fpd.pmean(_floats(t)),
        "gather": fpd.all_gather(t),
        "bcast": fpd.broadcast(t, src=0),
        "zero_updates": updates,
        "device": str(fpd.psum(t)["a"].device),
    }
    return fp.tree.to(out, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU for NCCL")
def test_nccl_collectives_on_cuda() -> None:
    n = min(2, torch.cuda.device_count())
    res = fpd.spawn(_work_cuda, n, backend="nccl", timeout_s=TIMEOUT)
    trees = [_tree(r) for r in range(n)]
    stack = fp.tree.stack(trees)
    total = fp.tree.map(lambda s: s.sum(0), stack)
    for r, got in enumerate(res):
        assert got["device"] == f"cuda:{r}"
        assert fp.tree.allclose(got["psum"], total, rtol=1e-6, atol=1e-6)
        assert fp.tree.allclose(
            got["pmean"], fp.tree.map(lambda s: s.mean(0), _floats(stack)), rtol=1e-6, atol=1e-6
        )
        assert fp.tree.allclose(got["gather"], stack, rtol=0, atol=0)
        assert fp.tree.allclose(got["bcast"], trees[0], rtol=0, atol=0)
        # Adam's first step is -lr * sign(mean gradient)
        assert torch.allclose(got["zero_updates"]["w"], torch.full((7,), -0.1), atol=1e-6)


# Gradients (NOTE [gradients of collectives]): each rank backpropagates <ct_r, f(x_r)> with
# its own cotangent; the reference is torch.autograd in this process on the ranks' inputs
# stacked, differentiating sum_r <ct_r, y_r> (JAX's transposes), and, in the workers,
# torch.distributed.nn.functional's differentiable collectives.
_GRAD_CASES = {
    "psum": (lambda t: fpd.psum(t), lambda s, r: s.sum(0)),
    "pmean": (lambda t: fpd.pmean(t), lambda s, r: s.mean(0)),
    "pmax": (lambda t: fpd.pmax(t), lambda s, r: s.amax(0)),
    "pmin": (lambda t: fpd.pmin(t), lambda s, r: s.amin(0)),
    "all_gather": (lambda t: fpd.all_gather(t), lambda s, r: s),
    "all_gather_last_tiled": (
        lambda t: fpd.all_gather(t, axis=-1, tiled=True),
        lambda s, r: torch.cat(list(s), dim=-1),
    ),
    "broadcast": (lambda t: fpd.broadcast(t, src=1), lambda s, r: s[1]),
    "psum_scatter": (lambda t: fpd.psum_scatter(t), lambda s, r: s.sum(0)[r]),
    "psum_scatter_last_tiled": (
        lambda t: fpd.psum_scatter(t, scatter_dimension=-1, tiled=True),
        lambda s, r: s.sum(0).chunk(N, dim=-1)[r],
    ),
}


def _grad_input(name: str, rank: int) -> dict:
    g = torch.Generator().manual_seed(300 + rank)
    f64 = torch.float64
    if name.startswith("psum_scatter"):
        shapes = [(2, 3), (2,)] if name == "psum_scatter" else [(3, 4), (6,)]
        return {f"x{i}": torch.randn(s, generator=g, dtype=f64) for i, s in enumerate(shapes)}
    tree = {"a": torch.randn(2, 3, generator=g, dtype=f64), "b": torch.randn(4, generator=g)}
    if not name.endswith("tiled"):
        tree["s"] = torch.randn((), generator=g, dtype=f64)
    if name in ("pmax", "pmin"):
        tree["tie"] = torch.tensor([1.0, float(rank)], dtype=f64)  # a tie: split evenly
    return tree


def _grad_of(f, tree: dict, rank: int, salt: int = 0) -> tuple[dict, dict, dict]:
    g = torch.Generator().manual_seed(400 + 10 * rank + salt)
    x = fp.tree.map(lambda t: t.clone().requires_grad_(True), tree)
    y = f(x)
    ct = fp.tree.map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), y)
    sum(
        ((a * b).sum() for a, b in zip(fp.tree.leaves(y), fp.tree.leaves(ct), strict=True))
    ).backward()
    return fp.tree.map(lambda t: t.grad, x), ct, fp.tree.map(lambda t: t.detach(), y)


def _work_grads(rank: int) -> dict:
    import torch.distributed.nn.functional as dnn

    out: dict = {"cases": {}}
    for name, (f, _) in _GRAD_CASES.items():
        grad, ct, y = _grad_of(f, _grad_input(name, rank), rank)
        out["cases"][name] = {"grad": grad, "ct": ct, "y": y}
    # torch.distributed.nn.functional on one leaf, the same input and cotangent
    x = _grad_input("psum", rank)["a"]

    def gathered(t: torch.Tensor) -> torch.Tensor:
        return torch.stack(dnn.all_gather(t))

    def scattered(t: torch.Tensor) -> torch.Tensor:
        return dnn.reduce_scatter(torch.empty(3, dtype=t.dtype), list(t.unbind(0)))

    pairs = {
        "psum": (fpd.psum, dnn.all_reduce),
        "all_gather": (fpd.all_gather, gathered),
        "broadcast": (lambda t: fpd.broadcast(t, src=1), lambda t: dnn.broadcast(t, src=1)),
        "psum_scatter": (fpd.psum_scatter, scattered),
    }
    out["torch_nn"] = {
        k: (_grad_of(ours, x, rank, salt=1)[0], _grad_of(ref, x, rank, salt=1)[0])
        for k, (ours, ref) in pairs.items()
    }
    # torch.func (fp.grad) and fp.jit(fullgraph=True) take the same path
    ct = torch.tensor([3.0, 5.0], dtype=torch.float64) * (rank + 1)
    v = torch.tensor([1.0, 9.0] if rank == 0 else [5.0, 2.0], dtype=torch.float64)
    out["fp_grad_pmax"] = fp.grad(
        lambda t: (fpd.pmax({"w": t, "i": torch.arange(2)})["w"] * ct).sum()
    )(v)
    vj = v.clone().requires_grad_(True)
    step = fp.jit(lambda t: (fpd.all_gather(t).sum(0) * ct).sum(), fullgraph=True, backend="eager")
    step(vj).backward()
    out["jit_all_gather"] = vj.grad
    # integer leaves pass through a differentiable call; no grad mode: no graph, no error
    mixed = fpd.psum({"w": v.clone().requires_grad_(True), "i": torch.arange(2) + rank})
    out["int_leaf"] = (mixed["i"], mixed["i"].requires_grad, mixed["w"].requires_grad)
    with torch.no_grad():
        out["no_grad_gather"] = fpd.all_gather(v.clone().requires_grad_(True)).requires_grad
    return out


@pytest.fixture(scope="module")
def grad_results() -> list:
    return fpd.spawn(_work_grads, N, timeout_s=TIMEOUT)


@pytest.mark.parametrize("name", list(_GRAD_CASES))
def test_collective_gradients_are_jax_transposes(grad_results: list, name: str) -> None:
    _, reference = _GRAD_CASES[name]
    inputs = [_grad_input(name, r) for r in range(N)]
    stacked = fp.tree.map(lambda *xs: torch.stack(xs).requires_grad_(True), *inputs)
    total = 0.0
    for r in range(N):
        got = grad_results[r]["cases"][name]
        ys = fp.tree.map(lambda s, r=r: reference(s, r), stacked)
        assert fp.tree.allclose(
            got["y"], fp.tree.map(lambda t: t.detach(), ys), rtol=1e-12, atol=1e-12
        )
        total = total + sum(
            (a * b).sum()
            for a, b in zip(fp.tree.leaves(ys), fp.tree.leaves(got["ct"]), strict=True)
        )
    total.backward()
    for r in range(N):
        want = fp.tree.map(lambda s, r=r: s.grad[r], stacked)
        got = grad_results[r]["cases"][name]["grad"]
        assert fp.tree.allclose(got, want, rtol=1e-12, atol=1e-12), (name, r, got, want)


def test_collective_gradients_match_torch_distributed_nn(grad_results: list) -> None:
    for r in range(N):
        for name, (ours, ref) in grad_results[r]["torch_nn"].items():
            assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12), (name, r, ours, ref)


def test_collective_gradients_under_fp_grad_and_jit(grad_results: list) -> None:
    # pmax of [1, 9] and [5, 2]: rank 1 wins entry 0, rank 0 entry 1; the cotangents
    # [3, 5] and [6, 10] are summed (JAX's transpose) and go to the winner
    assert grad_results[0]["fp_grad_pmax"].tolist() == [0.0, 15.0]
    assert grad_results[1]["fp_grad_pmax"].tolist() == [9.0, 0.0]
    for r in range(N):
        assert grad_results[r]["jit_all_gather"].tolist() == [9.0, 15.0]
        ints, int_grad, w_grad = grad_results[r]["int_leaf"]
        assert ints.tolist() == [1, 3] and not int_grad and w_grad
        assert grad_results[r]["no_grad_gather"] is False


# Forward mode and vmap (NOTE [forward mode and vmap of collectives]): each rank pushes its own
# tangent t_r; the reference is torch.func.jvp in this process of the stacked function
# X -> ref(X, r) at the ranks' inputs with the ranks' tangents (JAX's rule: the tangent of psum
# is the psum of the tangents). jacfwd moves every rank along the same basis vector, jacrev
# pulls the same basis cotangent back from every rank, vmap maps each batch entry on its own.
def _tangent_of(tree: dict, rank: int, salt: int = 0) -> dict:
    g = torch.Generator().manual_seed(500 + 10 * rank + salt)
    return fp.tree.map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), tree)


def _fwd_input(name: str, rank: int) -> dict:
    return fp.tree.map(lambda t: t.double(), _grad_input(name, rank))


def _try(thunk):
    try:
        return thunk()
    except Exception as e:  # noqa: BLE001 - reported to the parent, which asserts
        return f"{type(e).__name__}: {e}"


def _dual_tangent(f, tree: dict, tan: dict) -> dict:
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        y = f(fp.tree.map(fwad.make_dual, tree, tan))
        return fp.tree.map(lambda a: fwad.unpack_dual(a).tangent, y)


def _h_local(x: torch.Tensor) -> torch.Tensor:
    """A scalar through every collective (x: 4 entries)."""
    return (
        (fpd.psum(x.sin()) ** 2).sum()
        + (fpd.pmax(x) ** 3).sum()
        + (fpd.pmin(x * x) * x).sum()
        + fpd.all_gather(x, tiled=True).cos().prod()
        + (fpd.psum_scatter(x.view(2, 2) ** 2) ** 2).sum()
        + (fpd.broadcast(x, src=1) * x).sum()
        + fpd.pmean(x.exp()).sum()
    )


def _h_global(s: torch.Tensor, r: int) -> torch.Tensor:
    """``_h_local`` on rank r from all ranks' inputs ``s`` (N, 4)."""
    return (
        (s.sin().sum(0) ** 2).sum()
        + (s.amax(0) ** 3).sum()
        + ((s * s).amin(0) * s[r]).sum()
        + s.reshape(-1).cos().prod()
        + ((s.view(N, 2, 2) ** 2).sum(0)[r] ** 2).sum()
        + (s[1] * s[r]).sum()
        + s.exp().mean(0).sum()
    )


def _h_point(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(600 + rank)
    x = torch.randn(4, generator=g, dtype=torch.float64)
    return x, torch.randn(4, generator=g, dtype=torch.float64)


def _int_leaf(shape: torch.Size, rank: int) -> torch.Tensor:
    return (torch.arange(shape.numel()) * (rank + 1)).view(shape)


def _forward_case(name: str, f, rank: int) -> dict:
    tree = _fwd_input(name, rank)
    tan = _tangent_of(tree, rank)
    leaf, leaf_t = next(iter(tree.values())), next(iter(tan.values()))
    ints = {} if name == "pmean" else {"i": _int_leaf(leaf.shape, rank)}
    batch = fp.tree.map(lambda x, t: torch.stack([x, t, x * t]), tree, tan)
    return {
        # an integer leaf rides along
        "fp_jvp": _try(lambda: fp.jvp(lambda a: f({**a, **ints}), (tree,), (tan,))),
        "func_jvp": _try(lambda: torch.func.jvp(lambda a: f({"a": a}), (leaf,), (leaf_t,))[1]),
        "dual": _try(lambda: _dual_tangent(f, tree, tan)),
        "jacfwd": _try(lambda: fp.jacfwd(f)(leaf)),
        "jacrev": _try(lambda: fp.jacrev(f)(leaf)),
        "vmap": _try(lambda: fp.vmap(f)(batch)),
    }


def _work_forward(rank: int) -> dict:
    from functorch_pipeline.distributed import _collectives

    out: dict = {"cases": {n: _forward_case(n, f, rank) for n, (f, _) in _GRAD_CASES.items()}}
    # the reviewer's numbers
    x = torch.tensor([1.0, 2.0], dtype=torch.float64) * (rank + 1)
    t = torch.tensor([1.0, 10.0], dtype=torch.float64) * (rank + 1)
    out["psum_jvp"] = _try(lambda: fp.jvp(fpd.psum, (x,), (t,))[1])
    out["gather_jvp"] = _try(lambda: fp.jvp(fpd.all_gather, (x,), (t,))[1])
    with torch.no_grad():
        out["no_grad_jvp"] = _try(lambda: fp.jvp(lambda a: fpd.pmean({"w": a})["w"], (x,), (t,))[1])
    # vmap with a batched and an unbatched leaf, and in_dims / out_dims 1
    xb = torch.stack([x, 2 * x, 3 * x], 1)
    out["vmap_mixed"] = _try(
        lambda: torch.func.vmap(
            lambda a, b: fpd.all_gather({"a": a, "b": b}, axis=-1), in_dims=(1, None), out_dims=1
        )(xb, x)
    )
    out["jacrev_gather_tiled"] = _try(lambda: fp.jacrev(lambda a: fpd.all_gather(a, tiled=True))(x))
    out["vmap_bad_shape"] = _try(lambda: fp.vmap(fpd.psum_scatter)(torch.ones(3, 3)))
    # under fp.jit: refused (the functional collectives have no forward-mode / batching rule)
    out["jit_jvp"] = _try(
        lambda: fp.jit(
            lambda a, b: fp.jvp(fpd.psum, (a,), (b,))[1], fullgraph=True, backend="eager"
        )(x, t)
    )
    out["jit_vmap"] = _try(lambda: fp.jit(fp.vmap(fpd.pmax), backend="eager")(xb.T))
    # second order, through every collective
    hx, ht = _h_point(rank)
    out["hessian"] = _try(lambda: fp.hessian(_h_local)(hx))
    out["jacfwd_jacfwd"] = _try(lambda: fp.jacfwd(fp.jacfwd(_h_local))(hx))
    out["jacrev_jacrev"] = _try(lambda: fp.jacrev(fp.jacrev(_h_local))(hx))
    out["hvp"] = _try(lambda: fp.hvp(_h_local, (hx,), (ht,)))
    out["jvp_jvp_pmax"] = _try(
        lambda: fp.jvp(lambda a: fp.jvp(fpd.pmax, (a,), (a * a,))[1], (hx,), (ht,))[1]
    )
    out["grad_jvp"] = _try(
        lambda: fp.grad(
            lambda a: fp.jvp(lambda b: fpd.psum(b) ** 2 + fpd.pmin(b), (a,), (a.cos(),))[1].sum()
        )(hx)
    )
    # the plain path does not touch the Function (the eager one: _CollectiveAD)
    calls = []
    cls = getattr(_collectives, "_CollectiveAD", _collectives._Collective)
    real = cls.apply
    cls.apply = lambda *a: calls.append(a[0]) or real(*a)
    try:
        fpd.psum(x)
        with torch.no_grad():
            fpd.psum(x.clone().requires_grad_(True))
        fp.vmap(lambda a: a + fpd.psum(x))(xb.T)  # x is not batched: plain
        plain = list(calls)
        fp.jvp(fpd.psum, (x,), (t,))
        out["function_calls"] = (plain, list(calls))
    finally:
        del cls.apply  # the inherited classmethod again
    return out


@pytest.fixture(scope="module")
def forward_results() -> list:
    return fpd.spawn(_work_forward, N, timeout_s=TIMEOUT)


def _stacked(name: str, make) -> dict:
    return fp.tree.map(lambda *xs: torch.stack(xs), *[make(name, r) for r in range(N)])


def _assert_close(got, want, what) -> None:
    assert not isinstance(got, str), (what, got)
    assert fp.tree.allclose(got, want, rtol=1e-12, atol=1e-12), (what, got, want)


@pytest.mark.parametrize("name", list(_GRAD_CASES))
def test_collective_forward_mode_and_vmap_follow_jax(forward_results: list, name: str) -> None:
    _, reference = _GRAD_CASES[name]
    xs = _stacked(name, _fwd_input)
    ts = fp.tree.map(
        lambda *a: torch.stack(a),
        *[_tangent_of(_fwd_input(name, r), r) for r in range(N)],
    )
    k = next(iter(xs))
    for r in range(N):
        got = forward_results[r]["cases"][name]
        ref = {
            key: torch.func.jvp(lambda s, r=r: reference(s, r), (xs[key],), (ts[key],))
            for key in xs
        }
        assert not isinstance(got["fp_jvp"], str), got["fp_jvp"]
        y, ty = got["fp_jvp"]
        _assert_close({key: y[key] for key in xs}, {key: v[0] for key, v in ref.items()}, "y")
        _assert_close({key: ty[key] for key in xs}, {key: v[1] for key, v in ref.items()}, "jvp")
        if name != "pmean":
            ints = torch.stack([_int_leaf(xs[k][0].shape, q) for q in range(N)])
            assert torch.equal(y["i"], reference(ints, r))
        _assert_close(got["func_jvp"], {"a": ref[k][1]}, "torch.func.jvp")
        _assert_close(got["dual"], {key: v[1] for key, v in ref.items()}, "dual tensors")
        s = xs[k]
        jf = torch.func.jacfwd(lambda u, r=r, s=s: reference(s + u, r))(torch.zeros_like(s[0]))
        _assert_close(got["jacfwd"], jf, "jacfwd")
        jr = torch.func.jacrev(lambda a: sum(reference(a, q) for q in range(N)))(s)
        _assert_close(got["jacrev"], jr.select(jr.dim() - s.dim(), r), "jacrev")
        bs = fp.tree.map(lambda x, t: torch.stack([x, t, x * t], 1), xs, ts)  # (N, 3, ...)
        vm = {key: torch.stack([reference(b[:, i], r) for i in range(3)]) for key, b in bs.items()}
        _assert_close(got["vmap"], vm, "vmap")


def test_collective_forward_mode_closed_forms(forward_results: list) -> None:
    xs = torch.stack([torch.tensor([1.0, 2.0]) * (q + 1) for q in range(N)]).double()
    ts = torch.stack([torch.tensor([1.0, 10.0]) * (q + 1) for q in range(N)]).double()
    for r, got in enumerate(forward_results):
        assert not isinstance(got["psum_jvp"], str), got["psum_jvp"]
        assert got["psum_jvp"].tolist() == [3.0, 30.0]  # psum of the tangents, not [1, 10]
        assert got["gather_jvp"].tolist() == ts.tolist()  # not 0
        assert got["no_grad_jvp"].tolist() == [1.5, 15.0]
        ref = torch.stack([torch.cat(list(xs * (i + 1)), -1).view(N, 2).T for i in range(3)])
        _assert_close(got["vmap_mixed"]["a"], ref.reshape(3, 2, N).movedim(0, 1), "vmap a")
        _assert_close(got["vmap_mixed"]["b"], xs.T.unsqueeze(1).expand(2, 3, N), "vmap b")
        # jacrev of a tiled all_gather: the same basis cotangent from every rank, summed
        jr = torch.func.jacrev(lambda a: sum(torch.cat(list(a)) for _ in range(N)))(xs)
        _assert_close(got["jacrev_gather_tiled"], jr[:, r], "jacrev all_gather")
        assert "peer rank may have died" not in got["vmap_bad_shape"]
        assert re.search(
            r"psum_scatter: leaf at path `<root>` has shape \(3,\); axis 0 must have exactly 2",
            got["vmap_bad_shape"],
        )
        assert "fp.distributed.psum: forward mode (fp.jvp" in got["jit_jvp"]
        assert re.match(
            r"NotImplementedError: fp.distributed.pmax: forward mode .* and vmap over a "
            r"collective are not supported under fp.jit",
            got["jit_vmap"],
        )


def test_collective_second_order_derivatives(forward_results: list) -> None:
    hx = torch.stack([_h_point(q)[0] for q in range(N)])
    ht = torch.stack([_h_point(q)[1] for q in range(N)])

    def total(s: torch.Tensor) -> torch.Tensor:  # what reverse mode differentiates
        return sum(_h_global(s, q) for q in range(N))

    zero = torch.zeros(4, dtype=torch.float64)
    for r, got in enumerate(forward_results):
        grad_r = lambda s, r=r: torch.func.grad(total)(s)[r]  # noqa: E731
        # fp.hessian = jacfwd(jacrev): every rank moves along the same basis vector
        _assert_close(
            got["hessian"], torch.func.jacfwd(lambda u, g=grad_r: g(hx + u))(zero), "hessian"
        )
        ff = torch.func.jacfwd(torch.func.jacfwd(lambda u, r=r: _h_global(hx + u, r)))(zero)
        _assert_close(got["jacfwd_jacfwd"], ff, "jacfwd(jacfwd)")
        rr = torch.func.jacrev(lambda s: sum(torch.func.grad(total)(s)[q] for q in range(N)))(hx)
        _assert_close(got["jacrev_jacrev"], rr[:, r], "jacrev(jacrev)")
        _assert_close(got["hvp"], torch.func.jvp(grad_r, (hx,), (ht,))[1], "hvp")
        inner = lambda s: torch.func.jvp(lambda a: a.amax(0), (s,), (s * s,))[1]  # noqa: E731
        _assert_close(got["jvp_jvp_pmax"], torch.func.jvp(inner, (hx,), (ht,))[1], "jvp(jvp)")

        def k(s: torch.Tensor) -> torch.Tensor:
            return torch.func.jvp(lambda a: a.sum(0) ** 2 + a.amin(0), (s,), (s.cos(),))[1].sum()

        _assert_close(got["grad_jvp"], torch.func.grad(lambda s: N * k(s))(hx)[r], "grad(jvp)")


def test_plain_collectives_skip_the_autograd_function(forward_results: list) -> None:
    for got in forward_results:
        plain, all_calls = got["function_calls"]
        assert plain == [] and all_calls and set(all_calls) == {"psum"}
