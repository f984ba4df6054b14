"""fp.tree against plain Python/torch references, with hypothesis over tree shapes."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import numpy as np
import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline import tree

DTYPES = [torch.float32, torch.float64]


class Pair(NamedTuple):
    first: object
    second: object


@tree.register_dataclass
@dataclasses.dataclass
class Box:
    value: object
    other: object


def _tensor(draw, dtype):
    shape = draw(st.lists(st.integers(0, 3), min_size=0, max_size=3))
    vals = draw(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(vals, dtype=dtype).reshape(shape)


@st.composite
def trees(draw, dtype=torch.float64, depth=3):
    """Random pytrees of dicts, lists, tuples, NamedTuples, dataclasses and None."""
    if depth == 0 or draw(st.booleans()):
        if draw(st.integers(0, 9)) == 0:
            return None
        return _tensor(draw, dtype)
    kind = draw(st.sampled_from(["dict", "list", "tuple", "pair", "box"]))
    sub = lambda: draw(trees(dtype=dtype, depth=depth - 1))  # noqa: E731
    if kind == "dict":
        keys = draw(st.lists(st.text("abcxyz", min_size=1, max_size=3), max_size=3, unique=True))
        return {k: sub() for k in keys}
    if kind == "list":
        return [sub() for _ in range(draw(st.integers(0, 3)))]
    if kind == "tuple":
        return tuple(sub() for _ in range(draw(st.integers(0, 3))))
    if kind == "pair":
        return Pair(sub(), sub())
    return Box(sub(), sub())


def _ref_leaves(t):
    """An independent, recursive flatten used as the reference (dict keys sorted)."""
    if t is None:
        return []
    if isinstance(t, torch.Tensor):
        return [t]
    if isinstance(t, dict):
        return [x for k in sorted(t) for x in _ref_leaves(t[k])]
    if isinstance(t, Box):
        return _ref_leaves(t.value) + _ref_leaves(t.other)
    return [x for c in t for x in _ref_leaves(c)]


@given(trees())
def test_leaves_match_recursive_reference(t):
    got = tree.leaves(t)
    ref = _ref_leaves(t)
    assert len(got) == len(ref)
    assert all(a is b for a, b in zip(got, ref, strict=True))


@given(trees())
def test_flatten_unflatten_roundtrip(t):
    leaves, treedef = tree.flatten(t)
    back = tree.unflatten(treedef, leaves)
    assert tree.structure(back) == treedef
    assert all(a is b for a, b in zip(tree.leaves(back), leaves, strict=True))


@given(trees(), st.floats(-3, 3, allow_nan=False))
def test_arithmetic_matches_per_leaf(t, s):
    u = tree.map(lambda x: x * 2 + 1, t)
    for got, a, b in zip(tree.leaves(tree.add(t, u)), tree.leaves(t), tree.leaves(u), strict=True):
        torch.testing.assert_close(got, a + b)
    for got, a, b in zip(tree.leaves(tree.sub(t, u)), tree.leaves(t), tree.leaves(u), strict=True):
        torch.testing.assert_close(got, a - b)
    for got, a in zip(tree.leaves(tree.scale(t, s)), tree.leaves(t), strict=True):
        torch.testing.assert_close(got, a * s)
    for got, a, b in zip(tree.leaves(tree.add_scale(t, s, u)), tree.leaves(t), tree.leaves(u), strict=True):
        torch.testing.assert_close(got, a + s * b)


@given(trees())
def test_reductions_match_concatenated_vector(t):
    leaves = tree.leaves(t)
    flat = torch.cat([x.reshape(-1) for x in leaves]) if leaves else torch.zeros(0, dtype=torch.float64)
    u = tree.map(lambda x: x.cos(), t)
    flat_u = torch.cat([x.reshape(-1) for x in tree.leaves(u)]) if leaves else flat
    torch.testing.assert_close(tree.sum(t).double(), flat.sum())
    torch.testing.assert_close(tree.vdot(t, u).double(), (flat * flat_u).sum())
    torch.testing.assert_close(tree.norm(t).double(), flat.norm())
    torch.testing.assert_close(tree.global_norm(t).double(), flat.norm())
    torch.testing.assert_close(tree.norm(t, ord=1).double(), flat.abs().sum())
    if flat.numel():
        torch.testing.assert_close(tree.norm(t, ord="inf").double(), flat.abs().max())
    torch.testing.assert_close(tree.norm(t, squared=True).double(), (flat**2).sum())
    assert tree.size(t) == flat.numel()
    assert tree.nbytes(t) == flat.numel() * 8


@given(trees())
def test_ravel_roundtrip_and_order(t):
    flat, unravel = tree.ravel(t)
    ref = [x.reshape(-1) for x in tree.leaves(t)]
    if ref:
        torch.testing.assert_close(flat, torch.cat(ref))
    back = unravel(flat)
    assert tree.structure(back) == tree.structure(t)
    assert tree.allclose(back, t)


@given(trees())
def test_stack_unstack_roundtrip(t):
    if not tree.leaves(t):
        return
    t2 = tree.scale(t, 2.0)
    stacked = tree.stack([t, t2])
    for s, a, b in zip(tree.leaves(stacked), tree.leaves(t), tree.leaves(t2), strict=True):
        assert s.shape == (2, *a.shape)
        torch.testing.assert_close(s[0], a)
        torch.testing.assert_close(s[1], b)
    back = tree.unstack(stacked)
    assert len(back) == 2 and tree.allclose(back[0], t) and tree.allclose(back[1], t2)


@given(trees())
def test_constructors_keep_shape_dtype(t):
    for fn, val in [(tree.zeros_like, 0.0), (tree.ones_like, 1.0), (lambda x: tree.full_like(x, 3.5), 3.5)]:
        out = fn(t)
        assert tree.structure(out) == tree.structure(t)
        for o, a in zip(tree.leaves(out), tree.leaves(t), strict=True):
            assert o.shape == a.shape and o.dtype == a.dtype
            assert bool((o == val).all())


def test_none_leaves_are_preserved():
    t = {"a": torch.ones(2), "b": None, "c": [None, torch.zeros(1)]}
    out = tree.map(lambda x: x + 1, t)
    assert out["b"] is None and out["c"][0] is None
    assert tree.leaves(t) == [t["a"], t["c"][1]]


def test_paths_and_keystr():
    t = {"params": {"fc1": {"weight": 1}}, "layers": [Pair(2, 3)], "box": Box(4, None)}
    got = {tree.keystr(p): x for p, x in tree.leaves_with_path(t)}
    assert got == {"params.fc1.weight": 1, "layers[0].first": 2, "layers[0].second": 3, "box.value": 4}
    out = tree.map_with_path(lambda p, x: tree.keystr(p), t)
    assert out["layers"][0].second == "layers[0].second"
    assert tree.keystr(("a", "x.y", 3)) == "a['x.y'][3]"


def test_map_several_trees_and_structure_error_names_paths():
    a = {"w": torch.ones(1), "b": torch.ones(1)}
    assert tree.map(lambda x, y, z: x + y + z, a, a, a)["w"].item() == 3
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        tree.map(lambda x, y: x + y, a, {"w": torch.ones(1)})
    with pytest.raises(ValueError, match="missing"):
        tree.map_with_path(lambda p, x, y: x, a, {"w": torch.ones(1), "c": torch.ones(1)})


def test_where_and_allclose():
    a = {"x": torch.tensor([1.0, 2.0])}
    b = {"x": torch.tensor([5.0, 6.0])}
    assert torch.equal(tree.where(torch.tensor(True), a, b)["x"], a["x"])
    cond = {"x": torch.tensor([True, False])}
    assert torch.equal(tree.where(cond, a, b)["x"], torch.tensor([1.0, 6.0]))
    assert tree.allclose(a, {"x": torch.tensor([1.0, 2.0 + 1e-9])})
    assert not tree.allclose(a, b)
    assert not tree.allclose(a, {"x": torch.ones(3)})


def test_astype_to_clone_detach():
    t = {"w": torch.ones(2, requires_grad=True), "i": torch.arange(2)}
    c = tree.astype(t, torch.float16)
    assert c["w"].dtype == torch.float16 and c["i"].dtype == torch.int64
    assert tree.astype(t, torch.float64, floating_only=False)["i"].dtype == torch.float64
    m = tree.to(t, "cpu", torch.float64)
    assert m["w"].dtype == torch.float64 and m["i"].dtype == torch.int64
    d = tree.detach(t)
    assert not d["w"].requires_grad and d["w"].data_ptr() == t["w"].data_ptr()
    cl = tree.clone(d)
    cl["w"].add_(1)
    assert torch.equal(t["w"].detach(), torch.ones(2))


def test_ravel_mixed_dtypes_and_errors():
    t = {"a": torch.ones(2, dtype=torch.float16), "b": torch.zeros(1, dtype=torch.float64)}
    flat, unravel = tree.ravel(t)
    assert flat.dtype == torch.float64
    back = unravel(flat)
    assert back["a"].dtype == torch.float16
    with pytest.raises(ValueError, match=r"expected a vector of shape \(3,\)"):
        unravel(torch.zeros(4))
    with pytest.raises(TypeError, match="path `a`"):
        tree.ravel({"a": 1.0})


def test_unstack_size_mismatch_names_path():
    with pytest.raises(ValueError, match="path `b`"):
        tree.unstack({"a": torch.zeros(2, 1), "b": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="at least one"):
        tree.stack([])


def test_random_like_is_deterministic_and_leafwise_independent():
    t = {"a": torch.zeros(1000), "b": torch.zeros(1000, dtype=torch.float64)}
    r1 = tree.random_like(fp.random.key(0), t)
    r2 = tree.random_like(fp.random.key(0), t)
    r3 = tree.random_like(fp.random.key(1), t)
    assert tree.allclose(r1, r2) and not tree.allclose(r1, r3)
    assert r1["b"].dtype == torch.float64
    assert not torch.allclose(r1["a"].double(), r1["b"])
    assert abs(r1["a"].mean().item()) < 0.1 and abs(r1["a"].std().item() - 1) < 0.1
    u = tree.random_like(fp.random.key(0), t, "uniform")
    assert bool((u["a"] >= 0).all() and (u["a"] < 1).all())
    with pytest.raises(ValueError, match="distribution"):
        tree.random_like(fp.random.key(0), t, "cauchy")


def test_registered_dataclass_is_known_to_torch_pytree_and_optree():
    import torch.utils._pytree as tp

    b = Box(torch.ones(1), {"k": torch.zeros(2)})
    leaves, spec = tp.tree_flatten(b)
    assert len(leaves) == 2
    assert isinstance(tp.tree_unflatten(leaves, spec), Box)
    assert len(optree.tree_leaves(b, namespace=tree.NAMESPACE)) == 2


def test_state_containers_pass_through_vmap_and_grad():
    state = Box(torch.tensor([1.0, 2.0], dtype=torch.float64), Pair(torch.tensor(3.0, dtype=torch.float64), None))

    def f(s):
        return (s.value**2).sum() * s.other.first

    g = fp.grad(f)(state)
    assert isinstance(g, Box) and isinstance(g.other, Pair) and g.other.second is None
    torch.testing.assert_close(g.value, 2 * state.value * 3.0)
    torch.testing.assert_close(g.other.first, (state.value**2).sum())
    batched = Box(torch.randn(4, 2, dtype=torch.float64), Pair(torch.randn(4, dtype=torch.float64), None))
    out = fp.vmap(f)(batched)
    ref = torch.stack([f(Box(batched.value[i], Pair(batched.other.first[i], None))) for i in range(4)])
    torch.testing.assert_close(out, ref)
    # torch.func itself (not only fp's wrappers) can carry the registered dataclass
    # (torch.func treats None as a leaf it cannot map, so the raw check uses no None).
    full = Box(batched.value, Pair(batched.other.first, torch.zeros(4, dtype=torch.float64)))
    gs = torch.func.vmap(torch.func.grad(f))(full)
    assert isinstance(gs, Box) and gs.value.shape == (4, 2)


def test_register_dataclass_rejects_bad_input():
    with pytest.raises(TypeError, match="not a dataclass"):
        tree.register_dataclass(int)

    @dataclasses.dataclass
    class C:
        a: int

    with pytest.raises(ValueError, match="no fields"):
        tree.register_dataclass(C, data_fields=["zzz"])


def test_unflatten_leaf_count_error():
    with pytest.raises(ValueError, match="2 leaves but 3"):
        tree.unflatten(tree.structure([1, 2]), [1, 2, 3])


def test_norms_work_under_vmap_and_grad():
    t = {"a": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    ref = torch.sqrt((t["a"] ** 2).sum(1) + t["b"] ** 2)
    torch.testing.assert_close(fp.vmap(tree.global_norm)(t), ref)
    torch.testing.assert_close(fp.vmap(lambda x: tree.norm(x, ord=1))(t), t["a"].abs().sum(1) + t["b"].abs())
    g = fp.vmap(fp.grad(tree.global_norm))(t)
    torch.testing.assert_close(g["b"], t["b"] / ref)


_SHAPE_PAIRS = [((3,), (3,)), ((2, 3), (2, 3)), ((3, 1), (3,)), ((2, 1), (1, 4)), ((3,), (2,)),
                ((2, 3), (3, 2)), ((), (4,))]


@given(pairs=st.lists(st.tuples(st.sampled_from(_SHAPE_PAIRS), st.sampled_from(DTYPES),
                                st.sampled_from(DTYPES)), min_size=1, max_size=4),
       s=st.sampled_from([0.5, -2.0]))
def test_binary_ops_check_leaves_before_the_foreach_kernel(pairs, s):
    """add/sub/add_scale: a torch._foreach_* kernel sees the leaves only when every pair has
    one shape, dtype and device; otherwise leaf by leaf, with exactly `x + y` (broadcasting,
    type promotion) or a ValueError naming the call, the leaf's key path and both leaves."""
    g = torch.Generator().manual_seed(len(pairs))
    a = {f"k{i}": [torch.randn(sa, generator=g, dtype=da)] for i, ((sa, _), da, _) in enumerate(pairs)}
    b = {f"k{i}": [torch.randn(sb, generator=g, dtype=db)] for i, ((_, sb), _, db) in enumerate(pairs)}
    same = all(sa == sb and da == db for (sa, sb), da, db in pairs)
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        for name in ("_foreach_add", "_foreach_sub"):
            kernel = getattr(torch, name)
            mp.setattr(torch, name, lambda *args, _k=kernel, **kw: seen.append(1) or _k(*args, **kw))
        _check_binary_ops(a, b, pairs, s, same, seen)


def _check_binary_ops(a, b, pairs, s, same, seen):
    for fn, ref in ((tree.add, lambda x, y: x + y), (tree.sub, lambda x, y: x - y),
                    (lambda p, q: tree.add_scale(p, s, q), lambda x, y: x + s * y)):
        seen.clear()
        bad = next((f"k{i}" for i, ((sa, sb), _, _) in enumerate(pairs)
                    if not _broadcastable(sa, sb)), None)
        if bad is not None:
            with pytest.raises(ValueError, match=rf"^tree\.(add|sub|add_scale): leaf `{bad}\[0\]`: "
                                                 r"a \(.*\) \w+ tensor on cpu and a \(.*\) .* do not combine"):
                fn(a, b)
        else:
            got = fn(a, b)
            for k in a:
                assert torch.equal(got[k][0], ref(a[k][0], b[k][0]))
        assert bool(seen) == (same and bad is None)


def _broadcastable(sa, sb):
    try:
        torch.broadcast_shapes(sa, sb)
        return True
    except RuntimeError:
        return False


def test_binary_ops_trace_whole_under_fp_jit():
    """The leaf check before the foreach kernel traces without a graph break (torch 2.11's
    dynamo could not trace bool() of a list), on both paths: matching leaves and broadcasting."""
    a = {"w": torch.randn(3), "v": [torch.randn(2, 2)]}
    b = {"w": torch.randn(3), "v": [torch.randn(2, 2)]}
    f = fp.jit(lambda p, q: tree.add_scale(tree.add(p, q), 0.5, tree.sub(p, q)),
               fullgraph=True, backend="eager")
    want = tree.map(lambda x, y: (x + y) + 0.5 * (x - y), a, b)
    assert tree.allclose(f(a, b), want, rtol=0, atol=0)
    c = {"w": torch.randn(3, 1), "v": [torch.randn(2, 2)]}
    got = fp.jit(tree.add, fullgraph=True, backend="eager")(c, b)
    assert got["w"].shape == (3, 3) and torch.equal(got["w"], c["w"] + b["w"])


# --- s22 sweep: mixed dtypes, complex, numbers, errors that name the leaf -----------------


def test_norm_promotes_mixed_dtypes_whatever_the_leaf_order():
    """The per-leaf norms were cast to the FIRST leaf's dtype: a float16 leaf sorted before a
    float32 leaf of norm 1e5 gave inf, a float32 leaf before float64 ones lost 3e-8."""
    ref = math.sqrt(1 + 1e10)
    for a, b in (("a", "b"), ("b", "a")):
        t = {a: torch.tensor([1.0], dtype=torch.float16), b: torch.tensor([1e5])}
        got = fp.tree.norm(t)
        assert got.dtype == torch.float32 and abs(float(got) - ref) / ref < 1e-6
        assert abs(float(fp.tree.norm(t, ord=1)) - (1 + 1e5)) < 1e-2
        assert float(fp.tree.norm(t, ord="inf")) == 1e5
    t = {"a": torch.tensor([1.0]), "b": torch.tensor([1.0, 2.0], dtype=torch.float64) / 3}
    got = fp.tree.global_norm(t)
    assert got.dtype == torch.float64
    assert abs(float(got) - math.sqrt(1 + 5 / 9)) < 1e-15


def test_norm_of_integer_bool_and_number_leaves():
    """optax.tree.norm([3, 4]) is 5.0; int, bool and Python-number leaves crashed."""
    assert float(fp.tree.norm([torch.tensor([3, 4])])) == 5.0
    assert float(fp.tree.global_norm({"a": 3, "b": 4.0})) == 5.0
    assert float(fp.tree.norm([torch.tensor([True, False])])) == 1.0


def test_allclose_promotes_instead_of_casting_b():
    """b was cast to a's dtype: int 1 vs 1.9, True vs 0.3 and 1 vs 1+5j compared close."""
    for a, b in (({"a": torch.tensor(1)}, {"a": torch.tensor(1.9)}), ({"a": 1}, {"a": 1.5}),
                 ({"a": torch.tensor([True])}, {"a": torch.tensor([0.3])}),
                 ({"a": torch.tensor([1.0])}, {"a": torch.tensor([1.0 + 5j])})):
        assert fp.tree.allclose(a, b) is False and fp.tree.allclose(b, a) is False
        assert fp.tree.allclose(a, a) is True
    assert fp.tree.allclose({"a": torch.tensor(1)}, {"a": torch.tensor(1.0)}) is True


def test_vdot_conjugates_complex_leaves_as_numpy_does():
    a = [torch.tensor([1 + 2j, 3 - 1j]), torch.tensor([0.5j])]
    b = [torch.tensor([2 - 1j, 1j]), torch.tensor([2.0 + 0j])]
    want = np.vdot(a[0].numpy(), b[0].numpy()) + np.vdot(a[1].numpy(), b[1].numpy())
    got = fp.tree.vdot(a, b)
    assert abs(complex(got) - complex(want)) < 1e-6
    assert abs(complex(fp.tree.vdot(a, a)) - float(fp.tree.norm(a)) ** 2) < 1e-5
    assert float(fp.tree.vdot({"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, 4.0])})) == 11.0


@pytest.mark.parametrize(("dtype", "s"), [(torch.int64, 0.5), (torch.float32, 1j), (torch.float16, 65536.0),
                                          (torch.bool, 2), (torch.float32, 0.25), (torch.float64, 3)])
def test_add_scale_is_a_plus_s_times_b(dtype, s):
    """The multi-tensor path (`alpha=s`) refused int leaves with a float s, real leaves with a
    complex s and float16 with s = 65536, and gave True for bool + 2 * True."""
    a = [torch.tensor([1, 2]).to(dtype), torch.tensor([3, 0]).to(dtype)]
    b = [torch.tensor([3, 4]).to(dtype) if dtype != torch.float16 else torch.tensor([2.0**-20] * 2, dtype=dtype),
         torch.tensor([1, 1]).to(dtype)]
    got = fp.tree.add_scale(a, s, b)
    for g, x, y in zip(got, a, b, strict=True):
        want = x + s * y
        assert g.dtype == want.dtype and torch.equal(g, want)


def test_map_passes_f_own_value_error_through():
    def f(x, y):
        raise ValueError("my check: expected a (3,) tensor")

    with pytest.raises(ValueError, match=r"^my check: expected a \(3,\) tensor$"):
        fp.tree.map(f, {"a": torch.ones(2)}, {"a": torch.ones(2)})
    with pytest.raises(ValueError, match=r"tree\.map: tree 1 does not match tree 0"):
        fp.tree.map(lambda x, y: x, {"a": 1}, {"b": 1})


@pytest.mark.parametrize("op", ["add", "sub", "vdot", "add_scale", "where"])
def test_a_deeper_b_is_a_structure_error_naming_paths(op):
    a, b = {"fc": {"w": torch.ones(2)}}, {"fc": {"w": [torch.ones(2), torch.ones(2)]}}
    call = {"add": lambda: fp.tree.add(a, b), "sub": lambda: fp.tree.sub(a, b),
            "vdot": lambda: fp.tree.vdot(a, b), "add_scale": lambda: fp.tree.add_scale(a, 0.5, b),
            "where": lambda: fp.tree.where(torch.tensor(True), a, b)}[op]
    with pytest.raises(ValueError, match=rf"tree\.{op}: tree 1 does not match tree 0: missing \['fc\.w'\]"):
        call()


def test_constructors_take_number_leaves():
    assert fp.tree.zeros_like({"lr": 0.1})["lr"].item() == 0.0
    assert fp.tree.ones_like({"lr": 3})["lr"].item() == 1
    assert fp.tree.full_like({"lr": 0.1}, 2.0)["lr"].item() == 2.0


def test_astype_keeps_complex_leaves_unless_dtype_is_complex():
    t = {"w": torch.ones(2), "z": torch.tensor([1 + 2j, -3 + 0.5j])}
    out = fp.tree.astype(t, torch.float64)
    assert out["w"].dtype == torch.float64 and torch.equal(out["z"], t["z"])
    out = fp.tree.astype(t, torch.complex128)
    assert out["z"].dtype == torch.complex128 and out["w"].dtype == torch.complex128


def test_stack_unstack_where_max_errors_name_the_leaf():
    with pytest.raises(ValueError, match=r"tree\.stack: leaf `fc\.w` cannot be stacked on axis 0: shapes \(2,\), \(3,\)"):
        fp.tree.stack([{"fc": {"w": torch.ones(2)}}, {"fc": {"w": torch.ones(3)}}])
    with pytest.raises(TypeError, match=r"tree\.unstack: leaf `n` is a int, not a tensor"):
        fp.tree.unstack({"n": 3, "w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"tree\.unstack: axis 5 is out of range for leaf `w` of shape \(2, 3\)"):
        fp.tree.unstack({"w": torch.ones(2, 3)}, dim=5)
    with pytest.raises(ValueError, match=r"tree\.where: leaf `b`: the condition \(a \(2,\) bool tensor"):
        fp.tree.where(torch.tensor([True, False]), {"b": torch.ones(3)}, {"b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"tree\.max: leaf `a` is empty"):
        fp.tree.max({"a": torch.ones(0), "b": torch.ones(2)})
    assert torch.equal(fp.tree.stack([{"w": 1.0}, {"w": 2.0}])["w"], torch.tensor([1.0, 2.0]))


@given(s=st.sampled_from([0.3, 65536.0, -1e-3, 7, 1e-8]), seed=st.integers(0, 2**16))
def test_add_scale_half_precision_trees_equal_the_leafwise_formula(s, seed):
    """bfloat16/float16 trees take the multi-tensor path (s * b rounded to the leaf dtype,
    then added) again, bit-identical to x + s * y leaf by leaf."""
    g = torch.Generator().manual_seed(seed)
    for dt in (torch.bfloat16, torch.float16):
        a = [torch.randn(64, generator=g).to(dt) for _ in range(3)]
        b = [torch.randn(64, generator=g).to(dt) for _ in range(3)]
        for got, x, y in zip(fp.tree.add_scale(a, s, b), a, b, strict=True):
            assert got.dtype == dt and torch.equal(got, x + s * y)
