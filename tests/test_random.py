"""fp.random: determinism, independence of split/fold_in, distributions, vmap, purity."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline import random as fr
from functorch_pipeline.random._core import _normal_folded

N = 40_000


def _ks(sample: torch.Tensor, cdf) -> float:
    """Kolmogorov-Smirnov distance between a sample and a CDF (computed in float64)."""
    x, _ = torch.sort(sample.double())
    n = x.numel()
    f = cdf(x)
    hi = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    lo = f - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(hi, lo).max())


# 1.63 / sqrt(n) is the 1% critical value of the KS statistic.
KS_LIMIT = 1.63 / math.sqrt(N)


def _normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def test_key_is_deterministic_and_seed_sensitive():
    assert torch.equal(fr.key(0), fr.key(0))
    assert fr.key(0).dtype == torch.int64 and fr.key(0).shape == (2,)
    keys = {tuple(fr.key(s).tolist()) for s in [0, 1, 2, 2**32, 2**40 + 1, -1]}
    assert len(keys) == 6


@pytest.mark.parametrize("bad", [1.5, "0", True, None])
def test_key_rejects_non_int_seeds(bad):
    with pytest.raises(TypeError, match=r"key\(seed\): `seed` must be an int"):
        fr.key(bad)


def test_split_gives_distinct_keys_unrelated_to_parent():
    k = fr.key(7)
    ks = fr.split(k, 1000)
    assert ks.shape == (1000, 2) and ks.dtype == torch.int64
    as_set = {tuple(x) for x in ks.tolist()}
    assert len(as_set) == 1000
    assert tuple(k.tolist()) not in as_set
    assert torch.equal(fr.split(k, 1000), ks)
    # the fold_in family of the same key is disjoint from the split family
    folded = {tuple(fr.fold_in(k, i).tolist()) for i in range(1000)}
    assert not folded & as_set


def test_fold_in_is_deterministic_and_accepts_tensor_data():
    k = fr.key(3)
    assert torch.equal(fr.fold_in(k, 5), fr.fold_in(k, torch.tensor(5)))
    assert len({tuple(fr.fold_in(k, i).tolist()) for i in range(500)}) == 500
    with pytest.raises(TypeError, match=r"fold_in\(key, data\): `data` must be an integer"):
        fr.fold_in(k, torch.tensor(1.0))


@pytest.mark.parametrize("make", ["split", "fold_in"])
def test_derived_streams_are_uncorrelated(make):
    k = fr.key(11)
    ks = fr.split(k, 8) if make == "split" else torch.stack([fr.fold_in(k, i) for i in range(8)])
    u = torch.stack([fr.uniform(x, (N // 4,), torch.float64) for x in ks])
    corr = torch.corrcoef(u)
    off = corr - torch.eye(8, dtype=torch.float64)
    # |r| of independent streams of n = 10k is ~N(0, 1/n): 5 sigma is 0.05.
    assert float(off.abs().max()) < 5 / math.sqrt(N // 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_uniform_matches_the_uniform_distribution(dtype):
    u = fr.uniform(fr.key(0), (N,), dtype)
    assert u.dtype == dtype and bool(((u >= 0) & (u < 1)).all())
    assert _ks(u, lambda x: x.clamp(0, 1)) < KS_LIMIT
    assert abs(float(u.double().mean()) - 0.5) < 5 * math.sqrt(1 / 12 / N)
    # lag-1 serial correlation
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]).double())[0, 1])) < 5 / math.sqrt(N)


def test_uniform_float64_has_more_than_24_bits():
    u = fr.uniform(fr.key(0), (1000,), torch.float64)
    assert not torch.equal(u, (u * 2**24).floor() / 2**24)


def test_uniform_minval_maxval():
    u = fr.uniform(fr.key(1), (N,), minval=-3.0, maxval=5.0)
    assert bool(((u >= -3) & (u < 5)).all())
    assert _ks(u, lambda x: ((x + 3) / 8).clamp(0, 1)) < KS_LIMIT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_matches_the_normal_distribution(dtype):
    z = fr.normal(fr.key(2), (N,), dtype).double()
    assert _ks(z, _normal_cdf) < KS_LIMIT
    m, s = float(z.mean()), float(z.std())
    assert abs(m) < 5 / math.sqrt(N) and abs(s - 1) < 5 / math.sqrt(2 * N)
    skew = float(((z - m) ** 3).mean()) / s**3
    kurt = float(((z - m) ** 4).mean()) / s**4
    assert abs(skew) < 5 * math.sqrt(6 / N) and abs(kurt - 3) < 5 * math.sqrt(24 / N)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_bernoulli_rate(p):
    m = fr.bernoulli(fr.key(4), p, (N,))
    assert m.dtype == torch.bool
    assert abs(float(m.double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / N)


def test_bernoulli_with_tensor_probabilities():
    p = torch.tensor([0.0, 1.0, 0.25]).expand(N, 3)
    m = fr.bernoulli(fr.key(5), p)
    assert m.shape == (N, 3)
    assert not bool(m[:, 0].any()) and bool(m[:, 1].all())
    assert abs(float(m[:, 2].double().mean()) - 0.25) < 5 * math.sqrt(0.25 * 0.75 / N)


def test_randint_is_uniform_over_its_range():
    r = fr.randint(fr.key(6), (N,), -2, 3)
    counts = torch.bincount(r + 2, minlength=5).double()
    chi2 = float(((counts - N / 5) ** 2 / (N / 5)).sum())
    assert int(r.min()) == -2 and int(r.max()) == 2
    assert chi2 < 20.0  # chi2 with 4 dof: p = 0.0005


def test_permutation():
    p = fr.permutation(fr.key(0), 100)
    assert sorted(p.tolist()) == list(range(100))
    assert not torch.equal(p, torch.arange(100))
    assert not torch.equal(p, fr.permutation(fr.key(1), 100))


def test_vmap_over_keys_equals_a_loop():
    ks = fr.split(fr.key(9), 6)
    for draw in (lambda k: fr.uniform(k, (3, 4)), lambda k: fr.normal(k, (5,), torch.float64),
                 lambda k: fr.bernoulli(k, 0.3, (7,)), lambda k: fr.split(k, 3),
                 lambda k: fr.fold_in(k, 4)):
        batched = fp.vmap(draw)(ks)
        loop = torch.stack([draw(k) for k in ks])
        assert torch.equal(batched, loop)
    # a batch of keys gives different draws per example; torch.func's default
    # randomness="error" is fine because nothing touches the global generator
    u = torch.func.vmap(lambda k: fr.uniform(k, (4,)))(ks)
    assert len({tuple(r.tolist()) for r in u}) == 6


def test_vmap_with_batched_fold_in_data():
    k = fr.key(0)
    steps = torch.arange(5)
    batched = fp.vmap(lambda s: fr.fold_in(k, s))(steps)
    assert torch.equal(batched, torch.stack([fr.fold_in(k, i) for i in range(5)]))


def test_draws_never_touch_the_global_generator():
    state = torch.get_rng_state()
    torch.manual_seed(1)
    a = fr.normal(fr.key(0), (10,))
    torch.manual_seed(2)
    b = fr.normal(fr.key(0), (10,))
    assert torch.equal(a, b)
    torch.set_rng_state(state)
    before = torch.get_rng_state()
    fr.uniform(fr.key(0), (100,))
    fr.split(fr.key(0), 4)
    assert torch.equal(before, torch.get_rng_state())


def test_generator_bridge():
    g1, g2 = fr.generator(fr.key(0)), fr.generator(fr.key(0))
    assert torch.equal(torch.randn(5, generator=g1), torch.randn(5, generator=g2))
    g3 = fr.generator(fr.key(1))
    assert not torch.equal(torch.randn(5, generator=fr.generator(fr.key(0))), torch.randn(5, generator=g3))
    with pytest.raises(ValueError, match="expected one key of shape"):
        fr.seed_from_key(fr.split(fr.key(0), 2))


def test_bad_keys_and_dtypes():
    with pytest.raises(ValueError, match="must be an int64 tensor of shape"):
        fr.uniform(torch.zeros(2), (3,))
    with pytest.raises(TypeError, match="`key` must be a key tensor"):
        fr.split(0)
    with pytest.raises(TypeError, match="`dtype` must be floating"):
        fr.uniform(fr.key(0), (3,), torch.int32)
    with pytest.raises(ValueError, match="`num` must be a positive int"):
        fr.split(fr.key(0), 0)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.integers(min_value=1, max_value=50))
def test_any_seed_gives_valid_draws(seed, n):
    k = fr.key(seed)
    assert fr.is_key(k)
    u = fr.uniform(k, (n,))
    assert bool(((u >= 0) & (u < 1)).all())
    assert torch.equal(u, fr.uniform(fr.key(seed), (n,)))


# --- issue 9 item 7: seed ranges and invalid arguments ------------------------------

_M32 = 0xFFFFFFFF


def _fmix32_ref(h: int) -> int:
    """MurmurHash3's fmix32 in plain Python ints (the published finaliser)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def _key_ref(seed: int) -> list[int]:
    """The documented seed mapping: the seed's int64 two's-complement bit pattern
    (struct packs it independently of the library), split into 32-bit words, hashed."""
    import struct

    (u,) = struct.unpack("<Q", struct.pack("<q", seed))
    lo, hi = u & _M32, u >> 32
    k0 = _fmix32_ref(lo ^ 0x5851F42D)
    return [k0, _fmix32_ref(_fmix32_ref(hi ^ 0x2545F491) ^ k0)]


@pytest.mark.parametrize("seed", [2**63, 2**64, 2**70, -(2**63) - 1, -(2**70)])
def test_key_refuses_seeds_outside_int64(seed):
    # before: key(2**70) == key(0) and key(2**64 - 1) == key(-1), silently
    pattern = r"key\(seed\): `seed` must be in \[-2\*\*63, 2\*\*63\).*got "
    with pytest.raises(ValueError, match=pattern + str(seed)):
        fr.key(seed)


def test_key_accepts_the_int64_range_and_numpy_ints():
    np = pytest.importorskip("numpy")
    for seed in (0, 1, -1, 2**63 - 1, -(2**63), 123456789):
        assert fr.key(seed).tolist() == _key_ref(seed)
    assert torch.equal(fr.key(np.int64(-5)), fr.key(-5))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=2, max_size=30,
                unique=True))
def test_distinct_int64_seeds_give_distinct_keys(seeds):
    keys = {tuple(fr.key(s).tolist()) for s in seeds}
    assert len(keys) == len(seeds)
    # negative seeds included: -s and s (and s + 2**63) never collide
    for s in seeds[:3]:
        others = [t for t in (-s, s + 2**63, s - 2**63) if t != s and -(2**63) <= t < 2**63]
        for t in others:
            assert fr.key(s).tolist() != fr.key(t).tolist()


@pytest.mark.parametrize("data", [2**32, -1, 2**40])
def test_fold_in_refuses_python_ints_outside_32_bits(data):
    # before: fold_in(k, 2**32) == fold_in(k, 0)
    pattern = r"fold_in\(key, data\): `data` must be in \[0, 2\*\*32\), got "
    with pytest.raises(ValueError, match=pattern + str(data)):
        fr.fold_in(fr.key(0), data)
    assert fr.fold_in(fr.key(0), 2**32 - 1).shape == (2,)


@pytest.mark.parametrize(
    "lo, hi, match",
    [
        (1.0, 0.0, r"need `minval` <= `maxval`, got 1.0 and 0.0"),
        (3, -3, r"need `minval` <= `maxval`, got 3 and -3"),
        (float("nan"), 1.0, r"`minval` must be finite, got nan"),
        (0.0, float("inf"), r"`maxval` must be finite, got inf"),
    ],
)
def test_uniform_refuses_bad_python_bounds(lo, hi, match):
    with pytest.raises(ValueError, match=r"uniform\(key, shape, dtype, minval, maxval\): " + match):
        fr.uniform(fr.key(0), (4,), minval=lo, maxval=hi)


def test_uniform_with_equal_bounds_is_constant():
    u = fr.uniform(fr.key(0), (5,), torch.float64, 2.5, 2.5)
    assert torch.equal(u, torch.full((5,), 2.5, dtype=torch.float64))


def test_tensor_bounds_and_probabilities_are_not_synced():
    # A check on tensor arguments would need .item(), which vmap refuses: these must run.
    k = fr.key(0)
    lo = torch.arange(3.0)
    u = torch.func.vmap(lambda a: fr.uniform(k, (4,), minval=a, maxval=a + 1))(lo)
    assert bool(((u >= lo[:, None]) & (u < lo[:, None] + 1)).all())
    p = torch.tensor([0.0, 1.0])
    m = torch.func.vmap(lambda q: fr.bernoulli(k, q, (8,)))(p)
    assert not bool(m[0].any()) and bool(m[1].all())


@pytest.mark.parametrize("p", [1.5, -0.1, float("nan"), float("inf")])
def test_bernoulli_refuses_python_p_outside_unit_interval(p):
    # before: p was silently clipped to [0, 1]
    pattern = r"bernoulli\(key, p, shape\): `p` must be a probability in \[0, 1\]"
    with pytest.raises(ValueError, match=pattern):
        fr.bernoulli(fr.key(0), p, (3,))


def test_bernoulli_endpoints_and_bad_type():
    np = pytest.importorskip("numpy")
    with pytest.raises(ValueError, match=r"`p` must be a probability in \[0, 1\], got 1.5"):
        fr.bernoulli(fr.key(0), np.float32(1.5), (3,))  # NumPy scalars are checked too
    assert fr.bernoulli(fr.key(0), np.float32(0.5), (3,)).shape == (3,)
    assert bool(fr.bernoulli(fr.key(0), 1.0, (100,)).all())
    assert not bool(fr.bernoulli(fr.key(0), 0, (100,)).any())
    pattern = r"bernoulli\(key, p, shape\): `p` must be a float or a tensor, got str"
    with pytest.raises(TypeError, match=pattern):
        fr.bernoulli(fr.key(0), "0.5", (3,))


@pytest.mark.parametrize(
    "lo, hi, exc, match",
    [
        (5, 5, ValueError, r"need `minval` < `maxval`, got 5 and 5"),
        (7, 3, ValueError, r"need `minval` < `maxval`, got 7 and 3"),
        (0.5, 3, TypeError, r"`minval` must be a Python int, got float"),
        (0, 2**60, ValueError, r"`maxval - minval` must be at most 2\*\*53"),
    ],
)
def test_randint_refuses_bad_ranges(lo, hi, exc, match):
    with pytest.raises(exc, match=r"randint\(key, shape, minval, maxval\): " + match):
        fr.randint(fr.key(0), (3,), lo, hi)


@pytest.mark.parametrize(
    "call, fn",
    [
        (lambda k: fr.bits(k, (2, -1)), r"bits\(key, shape\)"),
        (lambda k: fr.uniform(k, (-3,)), r"uniform\(key, shape, dtype, minval, maxval\)"),
        (lambda k: fr.normal(k, (4, -2)), r"normal\(key, shape, dtype\)"),
        (lambda k: fr.bernoulli(k, 0.5, (-1,)), r"bernoulli\(key, p, shape\)"),
        (lambda k: fr.randint(k, (-1,), 0, 3), r"randint\(key, shape, minval, maxval\)"),
    ],
)
def test_negative_shapes_raise_naming_the_function(call, fn):
    with pytest.raises(ValueError, match=fn + r": `shape` must have non-negative sizes"):
        call(fr.key(0))


def test_shape_must_be_a_sequence_and_permutation_n_checked():
    fn = r"uniform\(key, shape, dtype, minval, maxval\)"
    with pytest.raises(TypeError, match=fn + r": `shape` must be a sequence"):
        fr.uniform(fr.key(0), 3)
    with pytest.raises(ValueError, match=r"permutation\(key, n\): `n` must be >= 0, got -1"):
        fr.permutation(fr.key(0), -1)
    with pytest.raises(TypeError,
                       match=r"permutation\(key, n\): `n` must be a Python int, got float"):
        fr.permutation(fr.key(0), 2.0)
    assert fr.permutation(fr.key(0), 0).shape == (0,)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.integers(0, 2**32 - 1),
       st.integers(min_value=0, max_value=3000))
def test_int32_hash_gives_the_int64_words(seed, data, n):
    """Draws hash on int32 bit patterns (wrapping multiplies, masked shifts); the words
    must be the int64 reference hash's, bit for bit, so every draw is unchanged."""
    from functorch_pipeline.random._core import _MASK32
    from functorch_pipeline.random._core import _hash2

    k = fr.fold_in(fr.key(seed), data)
    counter = torch.arange(n, dtype=torch.int64)
    want = _hash2(k[0:1], k[1:2], counter)
    assert torch.equal(fr.bits(k, (n,)), want)
    u = fr.uniform(k, (n,))
    assert torch.equal(u, (want >> 8).to(torch.float32) * (1.0 / 16777216.0))
    w2 = _hash2(*fr.fold_in(k, 0x6A09E667).split(1), counter)
    u64 = fr.uniform(k, (n,), torch.float64)
    assert torch.equal(u64, ((want >> 5) * 67108864 + (w2 >> 6)).double() / 9007199254740992.0)
    assert bool(((want >= 0) & (want <= _MASK32)).all())


def _both_forms(monkeypatch, fn):
    """``fn()`` with NOTE [host fast path] on (the eager CPU default) and forced off."""
    from functorch_pipeline.random import _host

    fast = fn()
    monkeypatch.setattr(_host, "eligible", lambda *tensors: False)
    slow = fn()
    monkeypatch.undo()
    return fast, slow


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1), st.integers(0, 2**32 - 1),
       st.integers(min_value=0, max_value=70_000), st.integers(min_value=1, max_value=3))
def test_host_fast_path_gives_the_tensor_forms_numbers(seed, data, n, keys):
    """On CPU in eager code keys fold in Python ints and draws hash in NumPy; every key
    and draw must be the tensor form's, bit for bit (n spans the 65,536-counter chunks)."""
    mp = pytest.MonkeyPatch()
    k = fr.key(seed)
    batch = fr.split(k, keys)

    def draws():
        return [
            fr.fold_in(k, data), fr.fold_in(k, torch.tensor(data)),
            fr.fold_in(k, torch.tensor([data, 1, 2], dtype=torch.int64)),
            fr.fold_in(k, torch.tensor(-5, dtype=torch.int32)),
            fr.fold_in(k, torch.zeros(0, dtype=torch.int64)),
            fr.bits(k, (n,)), fr.uniform(k, (n,)), fr.uniform(k, (n % 999,), torch.float64),
            fr.normal(k, (n,)), fr.normal(k, (n % 777,), torch.float64),
            fr.normal(k, (3, 5), torch.bfloat16), fr.bits(batch, (n % 300,)),
            fr.normal(batch, (4,)), fr.bernoulli(k, 0.3, (n % 500,)),
            fr.randint(k, (20,), -3, 9), fr.permutation(k, n % 100),
            _normal_folded(k, (torch.tensor(data, dtype=torch.int64), n % 5), (n % 911,)),
            _normal_folded(k, (data,), (2, n % 7), torch.float64),
        ]

    fast, slow = _both_forms(mp, draws)
    for i, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a, b), i


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1),
       st.one_of(st.sampled_from([0.0, 2.0**-33, 2.0**-32, 1e-9, 0.004, 0.5, 1 - 2.0**-33, 1.0]),
                 st.floats(0.0, 1.0)),
       st.integers(min_value=0, max_value=140_000), st.integers(min_value=1, max_value=3))
def test_bernoulli_on_the_host_is_the_words_compared(seed, p, n, keys):
    """NOTE [bernoulli without its words]: the host form compares each chunk's words as
    it hashes them, never forming them; its booleans (and the positions Poisson batches
    take) must be the int64 reference hash's words compared with round(p * 2**32), and
    the tensor form's, across chunk boundaries, at p = 0 and 1, for batched keys."""
    from functorch_pipeline.random._core import _bernoulli_positions
    from functorch_pipeline.random._core import _hash2

    mp = pytest.MonkeyPatch()
    k = fr.fold_in(fr.key(seed), 7)
    batch = fr.split(k, keys)
    threshold = min(max(round(p * 2**32), 0), 2**32)
    counter = torch.arange(n, dtype=torch.int64)
    want = _hash2(k[0:1], k[1:2], counter) < threshold
    want_batch = torch.stack([_hash2(b[0:1], b[1:2], counter % 1000)[:n % 1000] < threshold
                              for b in batch])

    def draws():
        return [fr.bernoulli(k, p, (n,)), fr.bernoulli(batch, p, (n % 1000,)),
                fr.bernoulli(k, p, (2, n // 2)), _bernoulli_positions(k, p, n)]

    fast, slow = _both_forms(mp, draws)
    assert torch.equal(fast[0], want) and torch.equal(slow[0], want)
    assert torch.equal(fast[1], want_batch) and torch.equal(slow[1], want_batch)
    assert torch.equal(fast[2], want[:2 * (n // 2)].reshape(2, n // 2))
    assert torch.equal(fast[2], slow[2])
    assert fast[3].dtype == slow[3].dtype == torch.int64
    assert torch.equal(fast[3], torch.nonzero(want).squeeze(1)) and torch.equal(fast[3], slow[3])


def test_host_fast_path_stays_off_where_values_cannot_be_read():
    """Under vmap, grad, compile tracing, fake tensors or for non-CPU tensors the tensor
    form runs (reading values there would fail or bake constants into a trace)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from functorch_pipeline.random import _host

    k = fr.key(0)
    assert _host.eligible(k)
    seen = []
    torch.vmap(lambda kk: seen.append(_host.eligible(kk)) or kk)(fr.split(k, 2))
    torch.func.grad(lambda x: seen.append(_host.eligible(k)) or x.sum())(torch.ones(2))
    with FakeTensorMode() as mode:
        seen.append(_host.eligible(mode.from_tensor(k)))
    seen.append(_host.eligible(k.to("meta")))

    @torch.compile(backend="eager", fullgraph=True)
    def compiled(kk):
        return fr.normal(kk, (5,))

    assert seen == [False, False, False, False]
    assert torch.allclose(compiled(k), fr.normal(k, (5,)), rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=-(2**63), max_value=2**63 - 1),
       st.lists(st.one_of(st.integers(0, 2**32 - 1),
                          st.integers(-(2**31), 2**31 - 1).map(
                              lambda v: torch.tensor(v, dtype=torch.int32))),
                max_size=3),
       st.integers(min_value=0, max_value=5000),
       st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_a_folded_normal_draw_is_normal_of_the_folded_key(seed, data, n, dtype):
    """The DP noise's draw (``_normal_folded``: keys folded as Python ints on the host)
    equals ``normal(fold_in(...fold_in(key, d0)..., dn), shape)`` bit for bit."""
    k = fr.key(seed)
    want = k
    for d in data:
        want = fr.fold_in(want, d)
    assert torch.equal(_normal_folded(k, data, (n,), dtype), fr.normal(want, (n,), dtype))


def test_a_folded_normal_draw_refuses_what_fold_in_refuses():
    k = fr.key(0)
    with pytest.raises(ValueError, match=r"fold_in\(key, data\): `data` must be in \[0, 2\*\*32\)"):
        _normal_folded(k, (2**32,), (3,))
    with pytest.raises(TypeError, match="must be an int, got bool"):
        _normal_folded(k, (True,), (3,))
    with pytest.raises(TypeError, match="must be an integer, got dtype torch.float32"):
        _normal_folded(k, (torch.tensor(1.0),), (3,))
    with pytest.raises(TypeError, match="`dtype` must be floating"):
        _normal_folded(k, (1,), (3,), torch.int64)
    with pytest.raises(ValueError, match="non-negative sizes"):
        _normal_folded(k, (1,), (-1,))


# --- s23: the seed's key words must not line up with the draw hash ---------------------


def test_seeds_do_not_share_a_draw_at_any_small_counter():
    # before: for every seed in [0, 2**32) the word at counter 1 was 1270938603 (k1 was
    # the draw hash's first round at counter 1). 2000 seeds x 64 counters: a column of
    # words shared by many seeds would show as a column with few distinct values.
    words = torch.stack([fr.bits(fr.key(s), (64,)) for s in range(2000)])
    distinct = [len(set(words[:, c].tolist())) for c in range(64)]
    assert min(distinct) >= 1990, distinct  # ~2000 * (1 - 2000/2**33) expected
    for hi in (1, 7, 2**31 - 1):  # seeds sharing the high word collided at 1 + hi*G^-1
        ws = torch.stack([fr.bits(fr.key((hi << 32) + lo), (4,)) for lo in range(300)])
        assert min(len(set(ws[:, c].tolist())) for c in range(4)) >= 295


def test_poisson_mask_and_permutation_are_uniform_over_seeds():
    # per-example inclusion over seeds (example 1 was never included at q = 0.1) and
    # the 24 orders of permutation(key(s), 4), chi-square against the uniform law
    from functorch_pipeline.data import poisson_mask

    n_seeds, q = 6000, 0.1
    masks = torch.stack([poisson_mask(fr.key(s), 5, q) for s in range(n_seeds)]).double()
    freq = masks.mean(0)
    z = (freq - q) / math.sqrt(q * (1 - q) / n_seeds)
    assert z.abs().max() < 4.5, freq.tolist()
    counts: dict[tuple, int] = {}
    for s in range(n_seeds):
        order = tuple(fr.permutation(fr.key(s), 4).tolist())
        counts[order] = counts.get(order, 0) + 1
    assert len(counts) == 24
    expected = n_seeds / 24
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 60, (chi2, counts)  # 23 degrees of freedom: p ~ 4e-5 at 60 (before: thousands)


# --- s23: compiled draws (inductor) are the eager draws ---------------------------------


def test_draws_under_fp_jit_inductor_equal_eager():
    # before: inductor (torch 2.14, CPU) miscompiled the int32 wrap-around hash in its
    # vector loops' tails: bits up to ~9e18, poisson_mask(key, 51, 0.004) took 27-32
    # examples (eager 0), DP noise entries wrong. Default backend, as a user calls it;
    # 51 = a vector loop plus a tail.
    torch._dynamo.reset()
    k, n = fr.key(5), 51
    bits = fp.jit(lambda k: fr.bits(k, (n,)))(k)
    assert torch.equal(bits, fr.bits(k, (n,)))
    assert bool(((bits >= 0) & (bits < 2**32)).all())
    from functorch_pipeline.data import poisson_mask

    mask = fp.jit(lambda k: poisson_mask(k, n, 0.004))(k)
    assert torch.equal(mask, poisson_mask(k, n, 0.004))
    torch._dynamo.reset()
