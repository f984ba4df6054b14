"""Bad input to fp.optim gives a clear ValueError/TypeError naming the API, the key path
and expected vs got: never a heap corruption, a raw torch error or silent wrong numbers
(issue 9 item 1, issue 14 "Clear errors for common mistakes")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import functorch_pipeline as fp
from functorch_pipeline import optim

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


@pytest.fixture(scope="module")
def bad_inputs_run():
    """One subprocess (tests/optim_bad_inputs.py): the issue's repro, then hypothesis over
    the whole registry. A subprocess, so that a heap crash fails these tests instead of
    killing the test session."""
    return subprocess.run(
        [sys.executable, str(HERE / "optim_bad_inputs.py"), "8"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )


def test_issue_repro_wrong_gradient_shape_in_subprocess(bad_inputs_run):
    """The issue's repro for adam, lamb and adamw: today adam/lamb die with `corrupted
    double-linked list` (rc 134) and adamw silently returns an update built from the
    first elements of the gradient."""
    r = bad_inputs_run
    lines = [x for x in r.stdout.splitlines() if x.startswith("REPRO")]
    want = (
        "ValueError scale_by_adam.update: leaf at path `w` has shape (8, 5) in `updates` but "
        "(8, 4) in `state.mu`"
    )
    assert lines == [f"REPRO {n} {want}" for n in ("adam", "lamb", "adamw")], (
        r.returncode,
        r.stderr[-2000:],
    )


def test_registry_wrong_inputs_property_in_subprocess(bad_inputs_run):
    """Hypothesis over the whole registry: one leaf of the gradients, the state or the
    parameters gets a wrong shape, dtype or device (meta); every case must raise a clear
    error (see tests/optim_bad_inputs.py)."""
    r = bad_inputs_run
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1].startswith("OK ")


@pytest.mark.parametrize("make", [optim.adam, optim.lamb, optim.adamw, optim.radam, optim.adagrad])
def test_wrong_state_shape_names_path(make):
    """State saved for a narrower model, loaded without `like=`, then updated."""
    opt = make(1e-3)
    narrow = opt.init({"fc": {"w": torch.zeros(8, 3)}})
    p = {"fc": {"w": torch.zeros(8, 4)}}
    with pytest.raises(
        ValueError,
        match=r"\.update: leaf at path `fc\.w` has shape \(8, 4\) in `updates` but \(8, 3\) in "
        r"`state\.\w+`",
    ):
        opt.update({"fc": {"w": torch.ones(8, 4)}}, narrow, p)


def test_transposed_gradient_leaf():
    opt = optim.sgd(0.1, momentum=0.9)
    p = {"fc1": {"weight": torch.zeros(5, 3)}}
    s = opt.init(p)
    with pytest.raises(
        ValueError,
        match=r"trace\.update: leaf at path `fc1\.weight` has shape \(3, 5\) in `updates` but "
        r"\(5, 3\) in `state\.trace` \(transposed\?\)",
    ):
        opt.update({"fc1": {"weight": torch.ones(3, 5)}}, s, p)


def test_transposed_gradient_without_state_caught_by_apply_updates():
    opt = optim.sgd(0.1)
    p = {"w": torch.zeros(5, 3)}
    u, _ = opt.update({"w": torch.ones(3, 5)}, opt.init(p), p)
    with pytest.raises(
        ValueError,
        match=r"apply_updates\(params, updates\): leaf at path `w` has shape \(5, 3\) in `params` "
        r"but \(3, 5\) in `updates`",
    ):
        optim.apply_updates(p, u)


def test_float64_grads_for_float32_params_raise_not_torch_internal():
    """Was: RuntimeError `expected dtype float for 'end' but got dtype double`."""
    p = {"w": torch.zeros(8, 4)}
    opt = optim.adam(1e-3)
    s = opt.init(p)
    with pytest.raises(
        TypeError,
        match=r"scale_by_adam\.update: leaf at path `w` has dtype torch\.float64 in `updates` but "
        r"torch\.float32 in `state\.mu`.*does not promote",
    ):
        opt.update({"w": torch.ones(8, 4, dtype=torch.float64)}, s, p)
    # the fix the message suggests works
    u, _ = opt.update(
        fp.tree.astype({"w": torch.ones(8, 4, dtype=torch.float64)}, torch.float32), s, p
    )
    assert u["w"].dtype == torch.float32


def test_mu_dtype_state_is_accepted_and_checked():
    p = {"w": torch.zeros(3, dtype=torch.float64)}
    opt = optim.adam(1e-2, mu_dtype=torch.float32)
    s = opt.init(p)
    u, s = opt.update({"w": torch.ones(3, dtype=torch.float64)}, s, p)
    assert s[0].mu["w"].dtype == torch.float32 and u["w"].dtype == torch.float64
    bad = (
        s._replace()
        if False
        else (s[0]._replace(mu={"w": torch.zeros(3, dtype=torch.float16)}), s[1])
    )
    with pytest.raises(
        TypeError,
        match=r"leaf at path `w` has dtype torch\.float16 in `state\.mu`, expected torch\.float32",
    ):
        opt.update({"w": torch.ones(3, dtype=torch.float64)}, bad, p)


def test_wrong_device_leaf():
    p = {"a": torch.zeros(2), "b": torch.zeros(3)}
    opt = optim.adamw(1e-3)
    s = opt.init(p)
    g = {"a": torch.ones(2), "b": torch.ones(3, device="meta")}
    with pytest.raises(
        ValueError,
        match=r"scale_by_adam\.update: leaf at path `b` is on device meta in `updates` but on cpu "
        r"in `state\.mu`",
    ):
        opt.update(g, s, p)
    with pytest.raises(
        ValueError, match=r"clip_by_global_norm\.update: leaf at path `b` is on device meta"
    ):
        optim.clip_by_global_norm(1.0).update(g, optim.EmptyState())


def test_step_count_checked():
    p = {"w": torch.zeros(2)}
    opt = optim.adam(1e-3)
    s = opt.init(p)
    bad = (s[0]._replace(count=torch.zeros(2, dtype=torch.int32)), s[1])
    with pytest.raises(
        ValueError,
        match=r"scale_by_adam\.update: `state\.count` has shape \(2,\), expected a 0-d tensor",
    ):
        opt.update({"w": torch.ones(2)}, bad, p)
    bad = (s[0]._replace(count=torch.zeros((), dtype=torch.float32)), s[1])
    with pytest.raises(
        TypeError, match=r"`state\.count` has dtype torch\.float32, expected torch\.int32"
    ):
        opt.update({"w": torch.ones(2)}, bad, p)


def test_params_passed_as_learning_rate():
    """optax style: hyperparameters to the factory, params to init (issue 14)."""
    net = torch.nn.Linear(3, 2)
    for wrong in (net.parameters(), net, list(net.parameters()), net.weight):
        with pytest.raises(
            TypeError,
            match=r"adam\(learning_rate\): `learning_rate` must be a number, a 0-d tensor or a "
            r"schedule, got a \w+.*parameters go to `opt\.init\(params\)`",
        ):
            optim.adam(wrong, 1e-3)
    with pytest.raises(TypeError, match=r"sgd\(learning_rate\).*got a str"):
        optim.sgd("0.1")
    with pytest.raises(
        TypeError,
        match=r"scale_by_adam\(b1, b2\): `b1` must be a number or a 0-d tensor, got a list",
    ):
        optim.adam(1e-3, [0.9])
    # a 0-d tensor that requires grad is a valid (differentiable) learning rate
    optim.adam(torch.tensor(1e-3, requires_grad=True))


def test_state_from_a_different_optimizer():
    """Was: AttributeError: 'TraceState' object has no attribute 'mu'."""
    p = {"w": torch.zeros(3)}
    with pytest.raises(
        TypeError,
        match=r"scale_by_adam\.update: expected the state made by `scale_by_adam\.init` \(a "
        r"ScaleByAdamState\), got a TraceState",
    ):
        optim.adam(1e-3).update(p, optim.sgd(0.1, 0.9).init(p), p)
    with pytest.raises(
        TypeError,
        match=r"trace\.update: expected the state made by `trace\.init` \(a TraceState\), got a "
        r"ScaleByAdamState",
    ):
        optim.sgd(0.1, 0.9).update(p, optim.adam(1e-3).init(p), p)
    with pytest.raises(
        ValueError, match=r"chain\.update: expected a state tuple of 4 inner states"
    ):
        optim.lamb(1e-3).update(p, optim.adam(1e-3).init(p), p)


def test_apply_updates_never_truncates_to_integer_params():
    with pytest.raises(
        TypeError,
        match=r"apply_updates\(params, updates\): leaf at path `n` has dtype torch\.int64 in "
        r"`params` but torch\.float32",
    ):
        optim.apply_updates({"n": torch.zeros(2, dtype=torch.int64)}, {"n": torch.full((2,), 0.7)})


def test_injected_hyperparameter_shape_checked():
    opt = optim.inject_hyperparams(optim.sgd)(learning_rate=0.1)
    s = opt.init({"w": torch.zeros(2)})
    s.hyperparams["learning_rate"] = torch.tensor([0.1, 0.2])
    with pytest.raises(
        TypeError,
        match=r"inject_hyperparams\.update: `state\.hyperparams\['learning_rate'\]` must be a "
        r"number or a 0-d tensor, got a Tensor of shape \(2,\)",
    ):
        opt.update({"w": torch.ones(2)}, s)


def test_stateless_with_tree_map_checks_params():
    tx = optim.stateless_with_tree_map(lambda g, p: g + p)
    with pytest.raises(
        ValueError,
        match=r"stateless_with_tree_map\.update: leaf at path `w` has shape \(2,\) in `updates` "
        r"but \(\) in `params`",
    ):
        tx.update({"w": torch.ones(2)}, tx.init(None), {"w": torch.zeros(())})


def test_checks_work_under_torch_compile():
    """The check is traced by Dynamo (the comparison of shapes is a trace-time constant);
    a bad leaf raises the same ValueError, key path included, from a compiled step."""
    torch._dynamo.reset()
    opt = optim.adam(1e-3)

    def step(p, g, s):
        u, s = opt.update(g, s, p)
        return optim.apply_updates(p, u), s

    p = {"fc": {"w": torch.zeros(8, 4)}}
    with pytest.raises(
        ValueError,
        match=r"scale_by_adam\.update: leaf at path `fc\.w` has shape \(8, 5\) in `updates` but "
        r"\(8, 4\) in `state\.mu`",
    ):
        torch.compile(step)(p, {"fc": {"w": torch.ones(8, 5)}}, opt.init(p))


def test_a_bool_tensor_is_no_hyperparameter():
    """A 0-d bool tensor is refused as a Python bool is: cast to 1.0 as an injected ``b2``
    it made Adam's bias correction divide by zero and the parameters non-finite (the
    registry property found it: inject_hyperparams, state leaf 1 -> torch.bool)."""
    p = {"w": torch.randn(3)}
    opt = optim.inject_hyperparams(optim.adam)(learning_rate=1e-3, b2=0.999)
    state = opt.init(p)
    state.hyperparams["b2"] = torch.tensor(True)
    with pytest.raises(TypeError, match=r"inject_hyperparams\.update: `state\.hyperparams\['b2'\]` "
                       r"must be a number, got a bool tensor"):
        opt.update({"w": torch.randn(3)}, state, p)
    with pytest.raises(TypeError, match=r"adam\(learning_rate\): `learning_rate` must be a number, "
                       "got a bool tensor"):
        optim.adam(torch.tensor(True))
    state.hyperparams["b2"] = torch.tensor(0.999, dtype=torch.float32)  # another float dtype: cast
    u, _ = opt.update({"w": torch.randn(3)}, state, p)
    assert torch.isfinite(u["w"]).all()
