"""Corner cases of fp.optim found by a bug sweep: AdaBelief's prediction error, complex
leaves in global norms, AGC on vector leaves, mixed float32/float64 trees with 0-d leaves,
empty trees and None subtrees, tree-mismatch errors of the masking wrappers, and
lookahead's calling convention. Each test checks a closed form written here in float64
(numpy/torch); optax 0.2.8, when installed, is a second reference."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import functorch_pipeline as fp
from functorch_pipeline import optim

F64 = torch.float64
F32 = torch.float32


def _g(seed, shape=(3, 4), dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


class _NoOptax(Exception):
    pass


class _Absent:
    """Stands for optax / jax.numpy when they are not installed: the first use ends the
    optional check (the closed-form checks before it have run)."""

    def __getattr__(self, name):
        raise _NoOptax


@contextlib.contextmanager
def _optax():
    """optax and jax.numpy with float64 enabled, for a second check against optax; without
    optax (CI installs no peers) the block ends at its first use of them, and the test's
    closed-form checks still count."""
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        try:
            yield _Absent(), _Absent()
        except _NoOptax:
            pass
        return
    with jax.enable_x64(True):
        yield optax, jnp


# --- F1: AdaBelief uses the updated first moment ----------------------------------------


def _adabelief_closed_form(p0, grads, lr, b1, b2, eps, eps_root):
    """AdaBelief (Zhuang et al. 2020, Alg. 2): s_t uses (g_t - m_t)^2, m_t the new moment."""
    p, m, s = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) ** 2 + eps_root
        p = p - lr * (m / (1 - b1**t)) / (np.sqrt(s / (1 - b2**t)) + eps)
    return p


@pytest.mark.parametrize("b1", [0.9, 0.0])
def test_adabelief_uses_updated_first_moment(b1):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(5)
    grads = [rng.standard_normal(5) for _ in range(5)]
    lr, b2, eps, eps_root = 0.05, 0.999, 1e-16, 1e-16
    tx = optim.adabelief(lr, b1=b1, b2=b2, eps=eps, eps_root=eps_root)
    p = {"w": torch.tensor(p0)}
    s = tx.init(p)
    for g in grads:
        u, s = tx.update({"w": torch.tensor(g)}, s, p)
        p = optim.apply_updates(p, u)
    want = _adabelief_closed_form(p0, grads, lr, b1, b2, eps, eps_root)
    # b1 = 0: the belief is eps_root alone, steps of ~1e5 (relative tolerance)
    np.testing.assert_allclose(p["w"].numpy(), want, rtol=1e-13, atol=1e-13)
    with _optax() as (optax, jnp):
        ox = optax.adabelief(lr, b1=b1, b2=b2, eps=eps, eps_root=eps_root)
        pj = jnp.asarray(p0)
        sj = ox.init(pj)
        for g in grads:
            uj, sj = ox.update(jnp.asarray(g), sj, pj)
            pj = optax.apply_updates(pj, uj)
        np.testing.assert_allclose(p["w"].numpy(), np.asarray(pj), rtol=1e-13, atol=1e-13)


def test_scale_by_belief_state_is_updated_moment_error():
    g = torch.tensor([2.0, -1.0], dtype=F64)
    tx = optim.scale_by_belief(b1=0.5, b2=0.75, eps=0.0, eps_root=0.0)
    s = tx.init({"w": torch.zeros(2, dtype=F64)})
    _, s = tx.update({"w": g}, s)
    m = 0.5 * g
    torch.testing.assert_close(s.mu["w"], m, rtol=0, atol=0)
    torch.testing.assert_close(s.nu["w"], 0.25 * (g - m) ** 2, rtol=0, atol=1e-15)


# --- F6: complex leaves in global norms ------------------------------------------------


def test_global_norm_counts_imaginary_part():
    z = torch.tensor([1 + 2j, -0.5 + 0.25j, 3j], dtype=torch.complex128)
    r = torch.tensor([0.5, -1.5], dtype=F64)
    got = optim.global_norm({"z": z, "r": r})
    want = np.sqrt((np.abs(z.numpy()) ** 2).sum() + (r.numpy() ** 2).sum())
    assert got.dtype == F64
    assert abs(float(got) - want) <= 1e-15 * want
    # complex64 alone: float32 norm, imaginary part counted
    got32 = optim.global_norm({"z": z.to(torch.complex64)})
    assert got32.dtype == F32
    assert abs(float(got32) - np.linalg.norm(z.numpy())) <= 1e-6
    # a conjugate view (lazy conj bit) counts the same
    assert float(optim.global_norm({"z": z.conj()})) == pytest.approx(np.linalg.norm(z.numpy()), rel=1e-15)
    with _optax() as (optax, jnp):
        want_o = float(optax.tree.norm({"z": jnp.asarray(z.numpy()), "r": jnp.asarray(r.numpy())}))
        assert abs(float(got) - want_o) <= 1e-15 * want_o


def test_normalize_by_update_norm_complex_has_unit_norm():
    z = _g(1, (4,)) + 1j * _g(2, (4,))
    u = optim.normalize_by_update_norm(1.0, eps=0.0).update({"z": z}, optim.EmptyState())[0]
    assert float(np.linalg.norm(u["z"].numpy())) == pytest.approx(1.0, abs=1e-15)


def test_clip_by_global_norm_complex128_in_float64():
    z = _g(3, (1000,)) + 1j * _g(4, (1000,))
    u = optim.clip_by_global_norm(0.5).update({"z": z}, optim.EmptyState())[0]["z"]
    want = z.numpy() * 0.5 / np.linalg.norm(z.numpy())
    assert u.dtype == torch.complex128
    np.testing.assert_allclose(u.numpy(), want, rtol=1e-14, atol=0)


# --- F2: adaptive_grad_clip on vector leaves -------------------------------------------


def _agc_whole(g, p, lam, eps):
    """NFNets' rule with the whole leaf as one unit (float64)."""
    pn = max(np.linalg.norm(p), eps)
    gn = np.linalg.norm(g)
    return g if gn < lam * pn else g * (lam * pn / max(gn, 1e-6))


def test_agc_clips_vector_by_its_whole_norm():
    p = {"bias": torch.tensor([1.0, 1.0, 2.0], dtype=F64)}
    g = {"bias": torch.tensor([0.05, 10.0, -0.1], dtype=F64)}
    tx = optim.adaptive_grad_clip(0.1)
    got = tx.update(g, tx.init(p), p)[0]["bias"].numpy()
    want = _agc_whole(g["bias"].numpy(), p["bias"].numpy(), 0.1, 1e-3)
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    assert np.linalg.norm(got) == pytest.approx(0.1 * np.sqrt(6.0), rel=1e-15)  # not per element


@pytest.mark.parametrize("shape", [(), (5,), (5, 1), (1, 5), (1, 5, 1)])
def test_agc_squeezed_vectors_are_one_unit(shape):
    p, g = _g(10, shape) * 0.1, _g(11, shape) * 3
    lam, eps = 0.05, 1e-3
    tx = optim.adaptive_grad_clip(lam, eps)
    got = tx.update({"x": g}, tx.init({"x": p}), {"x": p})[0]["x"]
    want = _agc_whole(g.numpy(), p.numpy(), lam, eps)
    assert got.shape == g.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-15, atol=0)


def test_agc_matches_optax_layouts():
    """fp's (out, in) leaves equal optax's (in, out) leaves transposed; vectors, (n, 1) and
    scalars are whole units in both."""
    lam, eps = 0.05, 1e-3
    p = {"w": _g(20, (4, 6)), "b": _g(21, (4,)) * 1e-2, "c": _g(22, (4, 1)), "s": _g(23, ())}
    g = {"w": _g(24, (4, 6)) * 3, "b": _g(25, (4,)), "c": _g(26, (4, 1)) * 5, "s": _g(27, ())}
    tx = optim.adaptive_grad_clip(lam, eps)
    u = tx.update(g, tx.init(p), p)[0]
    # closed form: rows of w are units
    for i in range(4):
        np.testing.assert_allclose(u["w"][i].numpy(), _agc_whole(g["w"][i].numpy(), p["w"][i].numpy(), lam, eps),
                                   rtol=1e-15, atol=0)
    with _optax() as (optax, jnp):
        tr = {k: (v.T if k == "w" else v) for k, v in p.items()}
        trg = {k: (v.T if k == "w" else v) for k, v in g.items()}
        pj = {k: jnp.asarray(v.numpy()) for k, v in tr.items()}
        gj = {k: jnp.asarray(v.numpy()) for k, v in trg.items()}
        ox = optax.adaptive_grad_clip(lam, eps)
        uj = ox.update(gj, ox.init(pj), pj)[0]
        for k in p:
            want = np.asarray(uj[k]).T if k == "w" else np.asarray(uj[k])
            np.testing.assert_allclose(u[k].numpy(), want, rtol=1e-14, atol=1e-16)


# --- F3: mixed float32 / float64 trees with a 0-d float32 leaf --------------------------


def _mixed():
    p = {"w": _g(30, (3, 2)), "t": torch.tensor(0.7, dtype=F32), "v": _g(31, (4,), F32)}
    g = {"w": _g(32, (3, 2)), "t": torch.tensor(-0.3, dtype=F32), "v": _g(33, (4,), F32)}
    return p, g


_SCHED = optim.linear_schedule(0.1, 0.01, 5)
_MIXED = {
    "chain(clip_by_global_norm, adam)": lambda: optim.chain(optim.clip_by_global_norm(1.0), optim.adam(0.1)),
    "MultiSteps(adam)": lambda: optim.MultiSteps(optim.adam(0.1), 2).gradient_transformation(),
    "nadamw": lambda: optim.nadamw(0.1),
    "nadam(torch form)": lambda: optim.nadam(0.1, momentum_decay=4e-3),
    "adam(nesterov)": lambda: optim.adam(0.1, nesterov=True),
    "adam(eps_root)": lambda: optim.adam(0.1, eps_root=1e-8),
    "radam": lambda: optim.radam(0.1),
    "rmsprop(bias_correction)": lambda: optim.rmsprop(0.1, bias_correction=True),
    "sgd(schedule)": lambda: optim.sgd(_SCHED),
    "sgd(schedule, momentum, nesterov)": lambda: optim.sgd(_SCHED, 0.9, True),
    "clip_by_global_norm": lambda: optim.clip_by_global_norm(0.1),
    "ema": lambda: optim.ema(0.9),
    "scale_by_schedule": lambda: optim.scale_by_schedule(_SCHED),
    "inject(adam)": lambda: optim.inject_hyperparams(optim.adam)(0.1),
    "inject(sgd, momentum)": lambda: optim.inject_hyperparams(optim.sgd)(0.1, 0.9),
    "inject(adabelief)": lambda: optim.inject_hyperparams(optim.adabelief)(0.1),
    "inject(amsgrad)": lambda: optim.inject_hyperparams(optim.amsgrad)(0.1),
    "inject(yogi)": lambda: optim.inject_hyperparams(optim.yogi)(0.1),
    "inject(novograd)": lambda: optim.inject_hyperparams(optim.novograd)(0.1),
    "inject(adagrad)": lambda: optim.inject_hyperparams(optim.adagrad)(0.1),
    "inject(adafactor)": lambda: optim.inject_hyperparams(optim.adafactor)(0.1),
    "inject(adaptive_grad_clip)": lambda: optim.inject_hyperparams(optim.adaptive_grad_clip)(0.1),
}


@pytest.mark.parametrize("name", sorted(_MIXED))
def test_mixed_tree_keeps_every_leaf_dtype(name):
    p, g = _mixed()
    for tx in (_MIXED[name](), optim.chain(_MIXED[name](), optim.adam(0.1))):
        s = tx.init(p)
        pp = p
        for _ in range(3):
            u, s = tx.update(g, s, pp)
            assert {k: u[k].dtype for k in u} == {k: g[k].dtype for k in g}
            pp = optim.apply_updates(pp, u)


def test_mixed_tree_injected_novograd_state_keeps_dtypes():
    p, g = _mixed()
    tx = optim.inject_hyperparams(optim.novograd)(0.1)
    s = tx.init(p)
    for _ in range(2):
        _, s = tx.update(g, s, p)
    nu = s.inner_state[0].nu
    assert {k: nu[k].dtype for k in nu} == {k: p[k].dtype for k in p}


def _adam_closed_form(p, grads, lr, b1=0.9, b2=0.999, eps=1e-8, clip=None):
    """Adam (optionally after a global-norm clip) over a dict of float64 arrays."""
    p = {k: v.copy() for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    for t, g in enumerate(grads, 1):
        if clip is not None:
            n = np.sqrt(sum((x**2).sum() for x in g.values()))
            g = {k: x * clip / max(n, clip) for k, x in g.items()}
        for k in p:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v2[k] = b2 * v2[k] + (1 - b2) * g[k] ** 2
            p[k] = p[k] - lr * (m[k] / (1 - b1**t)) / (np.sqrt(v2[k] / (1 - b2**t)) + eps)
    return p


def test_mixed_tree_clip_then_adam_matches_closed_form():
    p, _ = _mixed()
    grads = [{k: _g(40 + 3 * t + i, tuple(v.shape), v.dtype) for i, (k, v) in enumerate(p.items())}
             for t in range(4)]
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adam(0.1))
    s, pp = tx.init(p), p
    for g in grads:
        u, s = tx.update(g, s, pp)
        pp = optim.apply_updates(pp, u)
    want = _adam_closed_form({k: v.double().numpy() for k, v in p.items()},
                             [{k: v.double().numpy() for k, v in g.items()} for g in grads], 0.1, clip=1.0)
    # the float32 leaves' squared norms are summed in float32 (as optax does): ~1e-8
    np.testing.assert_allclose(pp["w"].numpy(), want["w"], rtol=0, atol=1e-6)
    for k in ("t", "v"):
        assert pp[k].dtype == F32
        np.testing.assert_allclose(pp[k].double().numpy(), want[k], rtol=0, atol=1e-5)
    with _optax() as (optax, jnp):
        ox = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1))
        pj = {k: jnp.asarray(v.numpy()) for k, v in p.items()}
        sj = ox.init(pj)
        for g in grads:
            uj, sj = ox.update({k: jnp.asarray(v.numpy()) for k, v in g.items()}, sj, pj)
            pj = optax.apply_updates(pj, uj)
        for k in p:
            assert str(pj[k].dtype) == str(pp[k].dtype).replace("torch.", "")
            np.testing.assert_allclose(pp[k].numpy(), np.asarray(pj[k]), rtol=0,
                                       atol=1e-6 if k == "w" else 1e-5)


def test_mixed_tree_0d_leaf_sees_float32_scalars():
    """A 0-d float32 leaf of a mixed tree keeps float32 and gets the update a float64 run
    of that leaf alone gives, to float32 rounding, under elementwise optimizers with tensor
    scalars (schedule, bias corrections, injected hyperparameters)."""
    p, g = _mixed()
    for make in (lambda: optim.adam(_SCHED, nesterov=True), lambda: optim.radam(0.1),
                 lambda: optim.inject_hyperparams(optim.adabelief)(0.1)):
        tx_m, tx_1 = make(), make()
        p1, g1 = {"t": p["t"].double()}, {"t": g["t"].double()}
        sm, s1 = tx_m.init(p), tx_1.init(p1)
        for _ in range(8):  # radam rectifies from step 6 on
            um, sm = tx_m.update(g, sm, p)
            u1, s1 = tx_1.update(g1, s1, p1)
            assert um["t"].dtype == F32
            torch.testing.assert_close(um["t"].double(), u1["t"], rtol=2e-5, atol=0)


def _lr_first_aliases():
    import inspect

    out = []
    for name in sorted(optim.__all__):
        f = getattr(optim, name)
        if inspect.isfunction(f) and next(iter(inspect.signature(f).parameters), None) == "learning_rate":
            out.append(name)
    return out


# bfloat16: the two paths round intermediates differently; states carry it (<= 4 ulps seen)
_TOL = {torch.bfloat16: 4 * 2.0**-8, F32: 1e-5, F64: 1e-12}


@pytest.mark.parametrize("name", [n for n in _lr_first_aliases() if n != "dpsgd"])
def test_injected_alias_on_0d_leaves_keeps_dtypes_and_values(name):
    """Every optimizer alias under ``inject_hyperparams`` (its hyperparameters become float64
    0-d tensors) on a tree with 0-d bfloat16 and float32 leaves beside a float64 vector:
    each update keeps its leaf's dtype and equals the plain alias's (Python-number
    hyperparameters, the reference) to the leaf dtype's rounding (dpsgd's inputs are
    per-example; fromage took no tensor learning rate before the second sweep's N5). rprop's step sizes became
    float64 at the 0-d bfloat16 leaf (and the next update raised), and noisy_sgd's 0-d
    updates became float64 (NOTE [scalar dtype])."""
    f = getattr(optim, name)
    kw = {"key": fp.random.key(0)} if name == "noisy_sgd" else {}
    plain, inj = f(0.1, **kw), optim.inject_hyperparams(f)(learning_rate=0.1, **kw)
    p = {"a": torch.tensor([0.7, -0.2, 0.4], dtype=F64), "b": torch.tensor(1.0, dtype=torch.bfloat16),
         "c": torch.tensor(2.0, dtype=F32)}

    def g(t):
        return {"a": torch.tensor([0.1, -0.2, 0.3], dtype=F64) * (-1) ** t,
                "b": torch.tensor(0.5 * (-1) ** (t // 2), dtype=torch.bfloat16),
                "c": torch.tensor(0.3 - 0.2 * t, dtype=F32)}

    s1, s2, p1, p2 = plain.init(p), inj.init(p), p, p
    for t in range(4):
        u1, s1 = plain.update(g(t), s1, p1)
        u2, s2 = inj.update(g(t), s2, p2)
        for k in p:
            assert u2[k].dtype == u1[k].dtype == p[k].dtype, (k, t)
            torch.testing.assert_close(u2[k].double(), u1[k].double(), rtol=_TOL[p[k].dtype],
                                       atol=_TOL[p[k].dtype] * 1e-3)
        p1, p2 = optim.apply_updates(p1, u1), optim.apply_updates(p2, u2)


def test_uniform_tree_scalar_dtype_unchanged():
    from functorch_pipeline.optim import _mt

    assert _mt.scalar_dtype([torch.zeros(2), torch.zeros(())]) == F32
    assert _mt.scalar_dtype([torch.zeros(2, dtype=F64)]) == F64
    assert _mt.scalar_dtype([torch.zeros(2, dtype=torch.bfloat16)]) == F32
    assert _mt.scalar_dtype([torch.zeros(2, dtype=torch.complex64)]) == F32
    assert _mt.scalar_dtype([torch.zeros(2, dtype=torch.complex128)]) == F64


# --- F7: empty trees; None subtrees in mask and params ----------------------------------


def test_multisteps_on_empty_tree():
    ms = optim.MultiSteps(optim.adam(0.1), 2)
    s = ms.init({})
    for _ in range(3):
        u, s = ms.update({}, s, {})
        assert u == {}
    with _optax() as (optax, _jnp):
        o = optax.MultiSteps(optax.adam(0.1), 2)
        assert o.update({}, o.init({}), {})[0] == {}


def test_masked_accepts_none_subtree_in_mask_and_params():
    p = {"a": _g(50, (3,)), "n": None}
    g = {"a": _g(51, (3,)), "n": None}
    tx = optim.masked(optim.adam(0.1), {"a": True, "n": None})
    u, _ = tx.update(g, tx.init(p), p)
    assert u["n"] is None
    # first Adam step: -lr * g / (|g| + eps)
    want = -0.1 * g["a"].numpy() / (np.abs(g["a"].numpy()) + 1e-8)
    np.testing.assert_allclose(u["a"].numpy(), want, rtol=1e-15, atol=0)
    # a None in the mask where params has no such key is still an error
    with pytest.raises(ValueError, match=r"masked.init: `mask` has paths that match no parameter: \['x'\]"):
        optim.masked(optim.adam(0.1), {"a": True, "x": None}).init({"a": p["a"]})


# --- F4: tree mismatch errors of the masking wrappers ----------------------------------


@pytest.mark.parametrize("name", ["lars", "masked(True)", "masked(callable)", "multi_transform(callable)"])
def test_masking_wrappers_name_the_mismatch(name):
    tx = {
        "lars": lambda: optim.lars(0.1),
        "masked(True)": lambda: optim.masked(optim.adam(0.1), True),
        "masked(callable)": lambda: optim.masked(optim.adam(0.1), lambda p: fp.tree.map(lambda x: x.ndim > 1, p)),
        "multi_transform(callable)": lambda: optim.multi_transform(
            {"x": optim.adam(0.1)}, lambda p: fp.tree.map(lambda x: "x", p)),
    }[name]()
    api = "multi_transform" if name.startswith("multi") else "masked"
    p = {"a": _g(60), "b": {"c": _g(61, (5,))}}
    g = {"a": _g(62), "b": {}}
    with pytest.raises(ValueError, match=rf"{api}\.update: `params` does not have the structure of "
                                         rf"`updates` \(paths only in `updates`: none; only in `params`: \['b\.c'\]\)"):
        tx.update(g, tx.init(p), p)


def test_partition_error_names_partition():
    tx = optim.partition({"x": optim.sgd(0.1)}, lambda p: fp.tree.map(lambda x: "x", p))
    p = {"a": _g(63), "b": _g(64, (2,))}
    with pytest.raises(ValueError, match=r"partition\.update: `params` does not have the structure"):
        tx.update({"a": _g(65)}, tx.init(p), p)


# --- F5: lookahead takes plain gradients (optax 0.2.8) ---------------------------------


@pytest.mark.parametrize("reset_state", [False, True])
def test_lookahead_plain_gradients(reset_state):
    k, alpha, lr, mu = 2, 0.5, 0.1, 0.9
    tx = optim.lookahead(optim.sgd(lr, mu), k, alpha, reset_state=reset_state)
    p = optim.LookaheadParams.init_synced({"w": _g(70, (4,))})
    pw = p
    s, sw = tx.init(p), tx.init(p)
    fast, slow, buf = p.fast["w"].numpy().copy(), p.slow["w"].numpy().copy(), np.zeros(4)
    for t in range(7):
        g = _g(71 + t, (4,))
        u, s = tx.update({"w": g}, s, p)  # optax 0.2.8's convention
        p = optim.apply_updates(p, u)
        uw, sw = tx.update(optim.LookaheadParams({"w": g}, {"w": g}), sw, pw)  # wrapped form
        pw = optim.apply_updates(pw, uw)
        buf = g.numpy() + mu * buf
        fast = fast - lr * buf
        if (t + 1) % k == 0:
            slow = slow + alpha * (fast - slow)
            fast = slow.copy()
            if reset_state:
                buf = np.zeros(4)
        np.testing.assert_allclose(p.fast["w"].numpy(), fast, rtol=0, atol=1e-14)
        np.testing.assert_allclose(p.slow["w"].numpy(), slow, rtol=0, atol=1e-14)
        assert fp.tree.allclose(p, pw, rtol=0, atol=0)
    with _optax() as (optax, jnp):
        ox = optax.lookahead(optax.sgd(lr, mu), k, alpha, reset_state=reset_state)
        pj = optax.LookaheadParams.init_synced({"w": jnp.asarray(_g(70, (4,)).numpy())})
        sj = ox.init(pj)
        for t in range(7):
            uj, sj = ox.update({"w": jnp.asarray(_g(71 + t, (4,)).numpy())}, sj, pj)
            pj = optax.apply_updates(pj, uj)
        np.testing.assert_allclose(p.slow["w"].numpy(), np.asarray(pj.slow["w"]), rtol=0, atol=1e-14)
        np.testing.assert_allclose(p.fast["w"].numpy(), np.asarray(pj.fast["w"]), rtol=0, atol=1e-14)
