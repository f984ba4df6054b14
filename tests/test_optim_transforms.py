"""Building blocks, selection and wrappers against hand calculations and Python loops,
and the error messages for bad input."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline import optim

F64 = torch.float64


def _t(*xs):
    return torch.tensor(xs, dtype=F64)


def _params():
    return {"fc": {"w": _t(1.0, -2.0), "b": _t(0.5)}, "out": _t(3.0, 4.0, -1.0)}


def _grads(k=0):
    return fp.tree.map(lambda x: torch.cos(x * (k + 1)) + 0.1 * k, _params())


# --- protocol -------------------------------------------------------------------------


def test_sgd_updates_are_additive_and_negative():
    opt = optim.sgd(0.1)
    u, _ = opt.update(_grads(), opt.init(_params()))
    assert fp.tree.allclose(u, fp.tree.scale(_grads(), -0.1), rtol=0, atol=0)


def test_apply_updates_keeps_param_dtype_and_skips_none():
    p = {"w": torch.ones(2, dtype=torch.float32), "frozen": None}
    u = {"w": torch.full((2,), 0.1, dtype=F64), "frozen": None}
    out = optim.apply_updates(p, u)
    assert out["w"].dtype == torch.float32 and out["frozen"] is None
    torch.testing.assert_close(out["w"], torch.full((2,), 1.1))


def test_apply_updates_inplace_writes_params():
    p = _params()
    same = optim.apply_updates_(p, _grads())
    assert same is p
    want = fp.tree.add(_params(), _grads())
    assert fp.tree.allclose(p, want, rtol=0, atol=0)


def test_apply_updates_structure_mismatch_names_paths():
    u = {"fc": {"w": _t(1.0, 1.0)}, "out": _t(0.0, 0.0, 0.0)}
    with pytest.raises(ValueError, match=r"apply_updates\(params, updates\).*fc\.b"):
        optim.apply_updates(_params(), u)


def test_apply_updates_shape_mismatch_names_path():
    u = fp.tree.map(lambda x: x, _grads())
    u["out"] = _t(1.0)
    with pytest.raises(ValueError, match=r"path `out` has shape \(3,\) in `params` but \(1,\)"):
        optim.apply_updates(_params(), u)


def test_chain_rejects_non_transformations():
    with pytest.raises(TypeError, match=r"chain\(\*transforms\): transform 1 is a int"):
        optim.chain(optim.scale(1.0), 3)


def test_chain_rejects_foreign_state():
    with pytest.raises(ValueError, match=r"chain.update: expected a state tuple of 2"):
        optim.adam(0.1).update(_grads(), (1, 2, 3), _params())


def test_state_from_other_params_names_path():
    opt = optim.adam(0.1)
    state = opt.init({"fc": {"w": _t(1.0, 1.0)}})
    with pytest.raises(ValueError, match=r"scale_by_adam.update: `state.mu` does not have the structure.*fc\.b"):
        opt.update(_grads(), state, _params())


def test_missing_params_is_a_clear_error():
    opt = optim.adamw(0.1)
    with pytest.raises(ValueError, match=r"needs `params`"):
        opt.update(_grads(), opt.init(_params()))


LR_OPTIMIZERS = [optim.sgd, optim.adam, optim.adamw, optim.nadam, optim.radam, optim.adamax,
                 optim.rmsprop, optim.adagrad, optim.adadelta, optim.lion, optim.lamb]


@pytest.mark.parametrize("make", LR_OPTIMIZERS)
def test_negative_learning_rate_rejected(make):
    with pytest.raises(ValueError, match=r"\(learning_rate\): `learning_rate` must be >= 0.0, got -0.1"):
        make(-0.1)


@pytest.mark.parametrize("make", LR_OPTIMIZERS)
def test_nan_learning_rate_rejected(make):
    # NaN passes every range check (each comparison is False); it made every parameter NaN
    with pytest.raises(ValueError, match=r"\(learning_rate\): `learning_rate` must be a number, got nan"):
        make(float("nan"))


@pytest.mark.parametrize("kw", [{"b1": float("nan")}, {"b2": float("nan")}, {"eps": float("nan")}])
def test_nan_adam_hyperparameters_rejected(kw):
    with pytest.raises(ValueError, match=rf"`{next(iter(kw))}` must be a number, got nan"):
        optim.adam(0.1, **kw)


@pytest.mark.parametrize("kw", [{"b1": 1.0}, {"b2": -0.1}, {"eps": -1.0}])
def test_bad_adam_hyperparameters_rejected(kw):
    with pytest.raises(ValueError, match=r"scale_by_adam"):
        optim.adam(0.1, **kw)


def test_nesterov_without_momentum_rejected():
    with pytest.raises(ValueError, match=r"nesterov=True needs a `momentum`"):
        optim.sgd(0.1, nesterov=True)


def test_identity_set_to_zero_stateless():
    g = _grads()
    assert optim.identity().update(g, optim.EmptyState())[0] is g
    z = optim.set_to_zero().update(g, optim.EmptyState())[0]
    assert all(float(x.abs().sum()) == 0 for x in fp.tree.leaves(z))
    tx = optim.stateless_with_tree_map(lambda u, p: u * p)
    got = tx.update(g, tx.init(_params()), _params())[0]
    assert fp.tree.allclose(got, fp.tree.map(torch.mul, g, _params()), rtol=0, atol=0)


# --- building blocks ------------------------------------------------------------------


def test_trace_nesterov_matches_loop():
    tx = optim.trace(0.8, nesterov=True)
    state = tx.init(_params())
    buf = fp.tree.zeros_like(_params())
    for k in range(4):
        g = _grads(k)
        u, state = tx.update(g, state)
        buf = fp.tree.map(lambda b, x: x + 0.8 * b, buf, g)
        want = fp.tree.map(lambda b, x: x + 0.8 * b, buf, g)
        assert fp.tree.allclose(u, want, rtol=0, atol=1e-15)


def test_scale_by_schedule_counts_steps():
    tx = optim.scale_by_schedule(lambda n: n * 1.0)
    s = tx.init(_params())
    for k in range(3):
        u, s = tx.update(_grads(), s)
        assert fp.tree.allclose(u, fp.tree.scale(_grads(), float(k)), rtol=0, atol=0)
    assert int(s.count) == 3


def test_clip_elementwise():
    u, _ = optim.clip(0.5).update({"a": _t(-2.0, 0.1, 0.9)}, optim.EmptyState())
    assert u["a"].tolist() == [-0.5, 0.1, 0.5]


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=6), st.floats(0.1, 5.0))
def test_clip_by_global_norm_property(values, max_norm):
    g = {"a": torch.tensor(values, dtype=F64), "b": torch.tensor(values[::-1], dtype=F64) * 0.5}
    u, _ = optim.clip_by_global_norm(max_norm).update(g, optim.EmptyState())
    norm = math.sqrt(sum(v * v for v in values) * 1.25)
    scale = 1.0 if norm < max_norm else max_norm / norm
    assert fp.tree.allclose(u, fp.tree.scale(g, scale), rtol=1e-12, atol=1e-12)


def test_add_decayed_weights_with_mask():
    tx = optim.add_decayed_weights(0.5, mask={"fc": {"w": True, "b": False}, "out": False})
    u, _ = tx.update(_grads(), tx.init(_params()), _params())
    assert torch.equal(u["fc"]["w"], _grads()["fc"]["w"] + 0.5 * _params()["fc"]["w"])
    assert torch.equal(u["fc"]["b"], _grads()["fc"]["b"]) and torch.equal(u["out"], _grads()["out"])


def test_trust_ratio_per_leaf():
    u, _ = optim.scale_by_trust_ratio().update({"a": _t(3.0, 4.0), "z": _t(0.0)}, optim.EmptyState(), {"a": _t(0.0, 10.0), "z": _t(2.0)})
    torch.testing.assert_close(u["a"], _t(6.0, 8.0))
    torch.testing.assert_close(u["z"], _t(0.0))


# --- selecting parameters -------------------------------------------------------------


def _run(opt, params, steps=3):
    state = opt.init(params)
    for k in range(steps):
        g = fp.tree.map(lambda x, k=k: torch.cos(x * (k + 1)), params)
        u, state = opt.update(g, state, params)
        params = optim.apply_updates(params, u)
    return params


def test_masked_equals_optimizer_on_the_subtree():
    got = _run(optim.masked(optim.adam(0.1), {"fc": True, "out": False}), _params())
    want_fc = _run(optim.adam(0.1), {"fc": _params()["fc"]})["fc"]
    assert fp.tree.allclose(got["fc"], want_fc, rtol=0, atol=1e-15)
    # unmasked leaves get the raw gradient added (masked passes updates through)
    assert not torch.equal(got["out"], _params()["out"])


def test_masked_with_callable_mask():
    tx = optim.masked(optim.set_to_zero(), lambda p: fp.tree.map(lambda x: x.numel() > 1, p))
    u, _ = tx.update(_grads(), tx.init(_params()), _params())
    assert float(u["out"].abs().sum()) == 0 and torch.equal(u["fc"]["b"], _grads()["fc"]["b"])


def test_mask_missing_path_is_named():
    with pytest.raises(ValueError, match=r"masked.init: no mask for the leaf at path `out`"):
        optim.masked(optim.sgd(0.1), {"fc": True}).init(_params())


def test_mask_extra_path_is_named():
    with pytest.raises(ValueError, match=r"`mask` has paths that match no parameter: \['head'\]"):
        optim.masked(optim.sgd(0.1), {"fc": True, "out": True, "head": True}).init(_params())


def test_partition_equals_separate_optimizers():
    labels = {"fc": "slow", "out": "fast"}
    got = _run(optim.partition({"slow": optim.sgd(0.01, 0.9), "fast": optim.adam(0.1)}, labels), _params())
    assert fp.tree.allclose(got["fc"], _run(optim.sgd(0.01, 0.9), {"fc": _params()["fc"]})["fc"], rtol=0, atol=1e-15)
    assert fp.tree.allclose(got["out"], _run(optim.adam(0.1), {"out": _params()["out"]})["out"], rtol=0, atol=1e-15)


def test_partition_by_key_path_function():
    fn = lambda path, leaf: "decay" if path[-1] == "w" else "none"  # noqa: E731
    tx = optim.partition({"decay": optim.add_decayed_weights(1.0), "none": optim.identity()}, fn)
    u, _ = tx.update(_grads(), tx.init(_params()), _params())
    assert torch.equal(u["fc"]["w"], _grads()["fc"]["w"] + _params()["fc"]["w"])
    assert torch.equal(u["out"], _grads()["out"])


def test_partition_missing_label_names_path():
    with pytest.raises(ValueError, match=r"partition.init: no param_labels for the leaf at path `out`"):
        optim.partition({"a": optim.sgd(0.1)}, {"fc": "a"}).init(_params())


def test_partition_unknown_label_names_path():
    with pytest.raises(ValueError, match=r"path `out` has label 'b', which has no transformation"):
        optim.partition({"a": optim.sgd(0.1)}, {"fc": "a", "out": "b"}).init(_params())


def test_freeze_keeps_params():
    got = _run(optim.chain(optim.freeze({"fc": True, "out": False}), optim.sgd(0.1)), _params())
    assert fp.tree.allclose(got["fc"], _params()["fc"], rtol=0, atol=0)
    assert not torch.equal(got["out"], _params()["out"])


# --- wrappers -------------------------------------------------------------------------


@pytest.mark.parametrize("mean", [True, False])
def test_multi_steps_matches_manual_accumulation(mean):
    k = 3
    ms = optim.MultiSteps(optim.adam(0.1), every_k_schedule=k, use_grad_mean=mean)
    ref = optim.adam(0.1)
    p, s = _params(), ms.init(_params())
    rp, rs = _params(), ref.init(_params())
    acc = []
    for i in range(7):
        g = _grads(i)
        u, s = ms.update(g, s, p)
        p = optim.apply_updates(p, u)
        acc.append(g)
        if len(acc) == k:
            total = acc[0]
            for x in acc[1:]:
                total = fp.tree.add(total, x)
            ru, rs = ref.update(fp.tree.scale(total, 1 / k) if mean else total, rs, rp)
            rp = optim.apply_updates(rp, ru)
            acc = []
            assert bool(ms.has_updated(s))
        else:
            assert all(float(x.abs().sum()) == 0 for x in fp.tree.leaves(u))
            assert not bool(ms.has_updated(s))
        assert fp.tree.allclose(p, rp, rtol=0, atol=1e-14)


def test_apply_if_finite_skips_and_counts():
    tx = optim.apply_if_finite(optim.sgd(0.1, 0.9), max_consecutive_errors=2)
    s = tx.init(_params())
    good_u, s_good = tx.update(_grads(), s)
    bad = fp.tree.map(lambda x: x * float("nan"), _grads())
    u, s2 = tx.update(bad, s_good)
    assert all(float(x.abs().sum()) == 0 for x in fp.tree.leaves(u))
    assert fp.tree.allclose(s2.inner_state, s_good.inner_state, rtol=0, atol=0)
    assert int(s2.notfinite_count) == 1 and int(s2.total_notfinite) == 1 and not bool(s2.last_finite)
    _, s3 = tx.update(bad, s2)
    u4, s4 = tx.update(bad, s3)  # third in a row > max_consecutive_errors: applied
    assert int(s4.total_notfinite) == 3
    assert all(bool(torch.isnan(x).all()) for x in fp.tree.leaves(u4))


def test_inject_hyperparams_matches_and_can_change_lr():
    opt = optim.inject_hyperparams(optim.adam)(learning_rate=0.1, b1=0.8)
    ref = optim.adam(0.1, b1=0.8)
    s, rs = opt.init(_params()), ref.init(_params())
    u, s = opt.update(_grads(0), s)
    ru, rs = ref.update(_grads(0), rs)
    assert fp.tree.allclose(u, ru, rtol=1e-14, atol=0)
    assert float(s.hyperparams["learning_rate"]) == pytest.approx(0.1)
    s.hyperparams["learning_rate"] = 0.05
    u, s = opt.update(_grads(1), s)
    ru, rs = optim.adam(0.05, b1=0.8).update(_grads(1), rs)
    assert fp.tree.allclose(u, ru, rtol=1e-14, atol=0)


def test_inject_hyperparams_schedule_is_evaluated_each_step():
    opt = optim.inject_hyperparams(optim.sgd)(learning_rate=optim.linear_schedule(1.0, 0.0, 4))
    s = opt.init(_params())
    seen = []
    for _ in range(3):
        _, s = opt.update(_grads(), s)
        seen.append(round(float(s.hyperparams["learning_rate"]), 6))
    assert seen == [1.0, 0.75, 0.5]


def test_ema_debiased_matches_loop():
    tx = optim.ema(0.7)
    s = tx.init(_params())
    e = fp.tree.zeros_like(_params())
    for k in range(4):
        u, s = tx.update(_grads(k), s)
        e = fp.tree.map(lambda a, g: 0.7 * a + 0.3 * g, e, _grads(k))
        assert fp.tree.allclose(u, fp.tree.scale(e, 1 / (1 - 0.7 ** (k + 1))), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("make", [lambda: optim.adam(0.01), lambda: optim.adamw(0.01),
                                  lambda: optim.rmsprop(0.01), lambda: optim.scale_by_adam()],
                         ids=["adam", "adamw", "rmsprop", "scale_by_adam"])
def test_complex_gradients_are_refused_by_second_moments(make):
    # g * g squared them as complex numbers: Adam's update was 1 + 0j whatever g was.
    tx = make()
    p = {"w": torch.zeros(2, dtype=torch.complex128)}
    with pytest.raises(TypeError, match=r"complex gradient reached a second moment.*view_as_real"):
        tx.update({"w": torch.tensor([1 + 1j, 2 - 3j], dtype=torch.complex128)}, tx.init(p), p)


def _nan_cases():
    """Every public factory that needs at most a learning rate, with each of its float
    hyperparameters (default a float) set to NaN."""
    import inspect

    cases = []
    for name in sorted(optim.__all__):
        f = getattr(optim, name)
        if not inspect.isfunction(f) or "schedule" in name:
            continue
        sig = inspect.signature(f)
        required = [k for k, v in sig.parameters.items() if v.default is inspect.Parameter.empty
                    and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
        if required not in ([], ["learning_rate"]):
            continue
        base = {"learning_rate": 0.1} if required else {}
        for k, v in sig.parameters.items():
            if k != "learning_rate" and isinstance(v.default, float):
                cases.append(pytest.param(f, base, k, id=f"{name}({k})"))
    return cases


@pytest.mark.parametrize("factory, base, arg", _nan_cases())
def test_every_float_hyperparameter_refuses_nan(factory, base, arg):
    # NaN passes every range check (each comparison is False); 26 of these were accepted
    # and gave NaN parameters (radam's eps, ema's decay, rmsprop's initial_scale, ...) or,
    # silently, other maths (radam's threshold=nan turned rectification off).
    with pytest.raises((ValueError, TypeError), match=arg):
        factory(**base, **{arg: float("nan")})


def test_inject_hyperparams_checks_the_numbers_as_the_factory_does():
    # adam(nan) raised but inject_hyperparams(adam)(learning_rate=nan) was accepted
    with pytest.raises(ValueError, match=r"adam\(learning_rate\): `learning_rate` must be a number, got nan"):
        optim.inject_hyperparams(optim.adam)(learning_rate=float("nan"))
    with pytest.raises(ValueError, match=r"`b1` must be"):
        optim.inject_hyperparams(optim.adam)(learning_rate=optim.constant_schedule(0.1), b1=float("nan"))
