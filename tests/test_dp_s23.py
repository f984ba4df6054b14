"""The DP training path and what it composes with (sweep s23), against independent
references: masked/partition optimizers and ``trainable`` over nested dict parameters under
``fp.jit`` (a per-example autograd loop, torch.optim, closed forms), DPTrainer refusing
data parallelism (2 gloo ranks), DPTrainState keeping ``tx``/``apply_fn`` through pytree
round trips, strict JSON from examples/dp_mnist.py, ``fp.tree.to`` with a positional dtype,
and the error for parameters that no longer match the optimizer state."""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as tpytree
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp
from functorch_pipeline import distributed as fpd
from functorch_pipeline import optim

F64 = torch.float64
EXAMPLES = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
BACKENDS = ("eager", "aot_eager")


def _params(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"fc1": {"weight": torch.randn(5, 4, generator=g, dtype=F64),
                    "bias": torch.randn(5, generator=g, dtype=F64)},
            "fc2": {"weight": torch.randn(3, 5, generator=g, dtype=F64),
                    "bias": torch.randn(3, generator=g, dtype=F64)}}


def _data(n: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g, dtype=F64) * 2, torch.randint(0, 3, (n,), generator=g)


def _logits(p: dict, x: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(F.linear(x, p["fc1"]["weight"], p["fc1"]["bias"]))
    return F.linear(h, p["fc2"]["weight"], p["fc2"]["bias"])


def _losses(p: dict, b: tuple) -> torch.Tensor:
    return F.cross_entropy(_logits(p, b[0]), b[1], reduction="none")


def _jit(fn, backend):
    torch._dynamo.reset()
    return fp.jit(fn, backend=backend)


def _close(a, b, tol: float = 1e-14) -> None:
    assert fp.tree.structure(a) == fp.tree.structure(b)
    for (path, x), y in zip(fp.tree.leaves_with_path(a), fp.tree.leaves(b), strict=True):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype, path
            assert torch.allclose(x, y, rtol=tol, atol=tol), (path, x, y)
        else:
            assert x == y, path


# --- 2. masked / partition / trainable over nested dicts under fp.jit ---------------------

def _nested() -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(0)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=F64)

    p = {"enc": {"l0": {"w": r(3, 2), "b": r(3)}, "l1": {"w": r(2, 3), "b": r(2)}},
         "head": {"w": r(1, 2), "b": r(1)}, "emb": [r(4), (r(2), r(2))]}
    return p, fp.tree.map(lambda x: torch.randn(x.shape, generator=g, dtype=F64), p)


# which leaves (by key path) each transformation trains with Adam(0.1) / SGD(0.1, 0.9)
ADAM_ON = {"enc.l1.w", "enc.l1.b", "head.w", "head.b"}
MASK = {"enc": {"l0": False, "l1": True}, "head": True, "emb": False}  # l0 and emb: fully masked


def _torch_reference(params, grads, steps, adam_on, sgd_on=(), zero=()):
    """torch.optim on each group of leaves; leaves in no group pass their gradient through
    (optax's masked), leaves in ``zero`` get a zero update."""
    paths = [fp.tree.keystr(p) for p in fp.tree.flatten_with_path(params)[0]]
    ps = [x.clone().requires_grad_() for x in fp.tree.leaves(params)]
    gs = fp.tree.leaves(grads)
    adam = torch.optim.Adam([p for p, k in zip(ps, paths, strict=True) if k in adam_on], lr=0.1) if adam_on else None
    sgd = (torch.optim.SGD([p for p, k in zip(ps, paths, strict=True) if k in sgd_on], lr=0.1, momentum=0.9)
           if sgd_on else None)
    out = None
    for _ in range(steps):
        before = [p.detach().clone() for p in ps]
        for p, g in zip(ps, gs, strict=True):
            p.grad = g.clone()
        for o in (adam, sgd):
            if o is not None:
                o.step()
        out = []
        for p, b, g, k in zip(ps, before, gs, paths, strict=True):
            if k in adam_on or k in sgd_on:
                out.append(p.detach() - b)
            elif k in zero:
                out.append(torch.zeros_like(g))
            else:
                out.append(g)
    return fp.tree.unflatten(fp.tree.structure(params), out)


CASES = {
    "masked": (lambda: optim.masked(optim.adam(0.1), MASK), dict(adam_on=ADAM_ON)),
    "masked_fn": (lambda: optim.masked(optim.adam(0.1), lambda p: {
        "enc": {"l0": False, "l1": True}, "head": {"w": True, "b": True}, "emb": [False, (False, False)]}),
        dict(adam_on=ADAM_ON)),
    "partition": (lambda: optim.partition(
        {"a": optim.adam(0.1), "b": optim.sgd(0.1, momentum=0.9), "z": optim.set_to_zero()},
        {"enc": {"l0": "z", "l1": "a"}, "head": "a", "emb": "b"}),
        dict(adam_on=ADAM_ON, sgd_on={"emb[0]", "emb[1][0]", "emb[1][1]"}, zero={"enc.l0.w", "enc.l0.b"})),
    "freeze": (lambda: optim.chain(optim.freeze({"enc": {"l0": True, "l1": False}, "head": False,
                                                 "emb": True}), optim.adam(0.1)),
               dict(adam_on=ADAM_ON, zero={"enc.l0.w", "enc.l0.b", "emb[0]", "emb[1][0]", "emb[1][1]"})),
    # a masked inside a masked: the inner one sees the outer one's MaskedNode placeholders
    "nested_masked": (lambda: optim.masked(optim.masked(optim.adam(0.1), {
        "enc": {"l0": True, "l1": {"w": True, "b": False}}, "head": True, "emb": True}), MASK),
        dict(adam_on={"enc.l1.w", "head.w", "head.b"})),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_partition_nested_dicts_compile_and_match_torch_optim(case, backend):
    make, groups = CASES[case]
    tx = make()
    params, grads = _nested()
    state = tx.init(params)

    def update(g, s, p):
        return tx.update(g, s, p)

    eager = update(grads, *update(grads, state, params)[1:], params)  # two steps
    want = _torch_reference(params, grads, 2, **groups)
    _close(eager[0], want, 1e-12)  # eager against torch.optim
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = _jit(update, backend)
        got = compiled(grads, compiled(grads, state, params)[1], params)
    _close(got[0], eager[0])
    _close(got[1], eager[1])


def test_train_state_trainable_train_step_under_jit_matches_torch_sgd():
    params = _params()
    x, y = _data()
    state = fp.train.TrainState.create(params, tx=optim.sgd(0.1),
                                       trainable={"fc1": True, "fc2": False})

    def lf(p, bufs, batch, key):
        return _losses(p, batch).mean(), bufs

    def step(s):
        return fp.train.train_step(s, (x, y), lf)[0]

    ref = {k: {n: t.clone().requires_grad_() for n, t in v.items()} for k, v in params.items()}
    sgd = torch.optim.SGD(list(ref["fc1"].values()), lr=0.1)
    for _ in range(2):
        sgd.zero_grad()
        _losses(ref, (x, y)).mean().backward()
        sgd.step()
    want = fp.tree.map(lambda t: t.detach(), ref)
    eager = step(step(state))
    _close(eager.params, want, 1e-12)
    for backend in BACKENDS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = _jit(step, backend)
            got = compiled(compiled(state))
        _close(got.params, eager.params)
        assert got.tx is state.tx


def _dp_reference(params, batch, clip, expected, lr, trainable_keys):
    """One DP-SGD step (sigma 0) by a per-example autograd loop in float64: clip each
    example's gradient of the trainable leaves, sum, divide by the expected batch size."""
    x, y = batch
    keys = [(k, n) for k in sorted(params) for n in sorted(params[k]) if k in trainable_keys]
    total = [torch.zeros_like(params[k][n]) for k, n in keys]
    for i in range(x.shape[0]):
        p = {k: {n: t.clone().requires_grad_(k in trainable_keys) for n, t in v.items()}
             for k, v in params.items()}
        loss = _losses(p, (x[i:i + 1], y[i:i + 1])).sum()
        gs = torch.autograd.grad(loss, [p[k][n] for k, n in keys])
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in gs))
        factor = min(1.0, clip / norm)
        total = [t + g * factor for t, g in zip(total, gs, strict=True)]
    out = {k: dict(v) for k, v in params.items()}
    for (k, n), t in zip(keys, total, strict=True):
        out[k][n] = params[k][n] - lr * t / expected
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_dptrainer_trainable_nested_params_under_jit_matches_per_example_loop(backend):
    params = _params()
    batch = _data()
    tr = fp.train.DPTrainer(_losses, optim.sgd(0.5), l2_norm_clip=0.5, noise_multiplier=0.0,
                            sample_rate=0.25, expected_batch_size=8.0,
                            trainable={"fc1": False, "fc2": True})
    state = tr.init(params, fp.random.key(0))
    want = _dp_reference(params, batch, 0.5, 8.0, 0.5, {"fc2"})
    eager, _ = tr.step(state, batch)
    _close(eager.params, want, 1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, metrics = _jit(tr.step, backend)(state, batch)
    _close(got.params, eager.params)
    assert got.accountant == eager.accountant and int(metrics["num_examples"]) == 9


def _tree_of(draw, depth: int):
    kind = draw(st.sampled_from(["leaf", "dict", "list", "odict"] if depth else ["leaf"]))
    if kind == "leaf":
        return torch.randn(draw(st.integers(1, 3)), dtype=F64)
    n = draw(st.integers(1, 3))
    kids = [_tree_of(draw, depth - 1) for _ in range(n)]
    if kind == "list":
        return kids
    keys = draw(st.permutations(["c", "a", "b"]))[:n]
    return dict(zip(keys, kids, strict=True)) if kind == "dict" else OrderedDict(zip(keys, kids, strict=True))


@st.composite
def _masked_tree(draw):
    tree = {"x": _tree_of(draw, 3), "y": _tree_of(draw, 2)}
    n = len(fp.tree.leaves(tree))
    flags = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return tree, fp.tree.unflatten(fp.tree.structure(tree), flags)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_masked_tree())
def test_masked_sgd_under_jit_any_nested_tree_closed_form(tree_and_mask):
    tree, mask = tree_and_mask
    tx = optim.masked(optim.sgd(0.5), mask)
    state = tx.init(tree)
    want = fp.tree.map(lambda g, m: -0.5 * g if m else g, tree, mask)  # optax: masked pass through
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got, _ = _jit(lambda g, s: tx.update(g, s, g), "eager")(tree, state)
    _close(got, want)  # the structure too: dict order, OrderedDict and list kept
    assert list(got) == list(tree)


# --- 3. DPTrainer refuses data parallelism ----------------------------------------------

@pytest.mark.parametrize("factory", [lambda: fpd.data_parallel(optim.sgd(1.0)),
                                     lambda: fpd.pmean_gradients()])
def test_dptrainer_refuses_an_optimizer_that_averages_over_ranks(factory):
    with pytest.raises(ValueError, match=r"DPTrainer: `optimizer` is fp\.distributed\.(data_parallel|"
                                         r"pmean_gradients).*differentially_private_aggregate"):
        fp.train.DPTrainer(_losses, factory(), l2_norm_clip=1.0, noise_multiplier=0.0,
                           sample_rate=0.5, expected_batch_size=4.0)
    with pytest.raises(TypeError, match="independent_processes"):
        fp.train.DPTrainer(_losses, optim.sgd(1.0), l2_norm_clip=1.0, noise_multiplier=0.0,
                           sample_rate=0.5, expected_batch_size=4.0, independent_processes=1)


def test_dptrainer_in_a_one_rank_group_steps_as_one_process():
    params, batch = _params(), _data()
    tr = fp.train.DPTrainer(_losses, optim.sgd(0.5), l2_norm_clip=0.5, noise_multiplier=0.0,
                            sample_rate=0.25, expected_batch_size=8.0)
    with fpd.local_group():
        got, _ = tr.step(tr.init(params, fp.random.key(0)), batch)
    _close(got.params, _dp_reference(params, batch, 0.5, 8.0, 0.5, {"fc1", "fc2"}), 1e-12)


def _rank_work(rank: int) -> tuple:
    """On each of 2 ranks: the refusal message of a data-parallel DPTrainer (a chain with
    pmean_gradients, which the factory check cannot see), then an independent run."""
    x, y = _data(12)
    idx = fpd.poisson_indices(fp.random.key(3), 12, 0.5)
    batch = (x[idx], y[idx])
    params = _params()
    chained = fp.train.DPTrainer(_losses, optim.chain(fpd.pmean_gradients(), optim.sgd(0.5)),
                                 l2_norm_clip=0.5, noise_multiplier=0.0, sample_rate=0.5,
                                 expected_batch_size=6.0)
    messages = []
    for call in (lambda: chained.init(params, fp.random.key(0)),
                 lambda: chained.step(fp.train.DPTrainState.create(
                     params, chained.optimizer.init(params), fp.random.key(0)), batch)):
        try:
            call()
            messages.append(None)
        except RuntimeError as e:
            messages.append(str(e))
    own = fp.train.DPTrainer(_losses, optim.sgd(0.5), l2_norm_clip=0.5, noise_multiplier=0.0,
                             sample_rate=0.5, expected_batch_size=6.0, independent_processes=True)
    state, _ = own.step(own.init(params, fp.random.key(0)), batch)
    return messages, idx, state.params


def test_dptrainer_refuses_a_process_group_of_two_gloo_ranks_unless_independent():
    results = fpd.spawn(_rank_work, 2, timeout_s=60)
    x, y = _data(12)
    union = torch.nonzero(fp.data.poisson_mask(fp.random.key(3), 12, 0.5)).flatten()
    assert torch.equal(torch.cat([r[1] for r in results]), union)
    for messages, idx, params in results:
        for where, msg in zip(("DPTrainer.init", "DPTrainer.step"), messages, strict=True):
            assert msg is not None and msg.startswith(f"{where}: running in a torch.distributed "
                                                      "process group of 2 ranks")
            assert "differentially_private_aggregate" in msg and "independent_processes=True" in msg
        # independent_processes=True: each rank's own one-process step on its own share
        _close(params, _dp_reference(_params(), (x[idx], y[idx]), 0.5, 6.0, 0.5, {"fc1", "fc2"}),
               1e-12)


# --- 4. DPTrainState keeps tx and apply_fn --------------------------------------------

def _dp_state():
    opt = optim.sgd(0.1)
    p = _params()
    s = fp.train.DPTrainState.create(p, opt.init(p), fp.random.key(0),
                                     accountant=fp.privacy.Accountant("rdp").step(
                                         noise_multiplier=1.0, sample_rate=0.1))
    return s.replace(tx=opt, apply_fn=_logits), opt


def _round_trips(tmp_path):
    path = str(tmp_path / "s.safetensors")
    return {
        "fp.tree.map": lambda s: fp.tree.map(lambda x: x, s),
        "fp.tree.unflatten": lambda s: fp.tree.unflatten(*reversed(fp.tree.flatten(s))),
        "torch.utils._pytree": lambda s: tpytree.tree_unflatten(*tpytree.tree_flatten(s)),
        "fp.load(like=)": lambda s: (fp.save(path, s), fp.load(path, like=s))[1],
        "fp.devices.device_put": lambda s: fp.devices.device_put(s, "cpu"),
        "fp.tree.to": lambda s: fp.tree.to(s, "cpu"),
        # the state rebuilt from its leaves inside the compiled function
        "fp.jit": lambda s: _jit(lambda t: fp.tree.map(lambda x: x, t), "eager")(s),
    }


@pytest.mark.parametrize("name", ["fp.tree.map", "fp.tree.unflatten", "torch.utils._pytree",
                                  "fp.load(like=)", "fp.devices.device_put", "fp.tree.to",
                                  "fp.jit"])
def test_dptrainstate_keeps_tx_and_apply_fn_like_trainstate(name, tmp_path):
    state, opt = _dp_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _round_trips(tmp_path)[name](state)
    assert type(got) is fp.train.DPTrainState
    assert got.tx is opt and got.apply_fn is _logits
    assert got.accountant == state.accountant
    for a, b in zip(fp.tree.leaves(got.params), fp.tree.leaves(state.params), strict=True):
        assert torch.equal(a, b)


def test_dptrainstate_after_a_device_move_trains_with_its_tx_like_torch_sgd():
    state, _ = _dp_state()
    moved = fp.devices.device_put(state, "cpu")
    x, y = _data()

    def lf(p, bufs, batch, key):
        return _losses(p, batch).mean(), bufs

    with pytest.warns(UserWarning, match="not private"):
        new, _ = fp.train.train_step(moved, (x, y), lf)
    ref = {k: {n: t.clone().requires_grad_() for n, t in v.items()} for k, v in state.params.items()}
    _losses(ref, (x, y)).mean().backward()
    want = fp.tree.map(lambda t: (t - 0.1 * t.grad).detach(), ref)
    _close(new.params, want, 1e-12)
    assert new.accountant == state.accountant.step_without_noise(sample_rate=1.0)
    assert int(new.step) == 1 and new.tx is state.tx


def test_dptrainstate_checkpoint_holds_no_code(tmp_path):
    state, _ = _dp_state()
    path = str(tmp_path / "s.safetensors")
    fp.save(path, state)
    plain = fp.load(path)  # NOTE [code is not saved]
    assert type(plain) is fp.train.DPTrainState and plain.tx is None and plain.apply_fn is None
    assert plain.accountant == state.accountant
    # a state without code writes no code node: the same file as the dataclass registration
    # it replaces wrote, so older checkpoints and readers are unaffected
    fp.save(path + "2", plain)
    with open(path + "2", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "_Code" not in json.dumps(header) and "_Code" in _header_text(path)


def _header_text(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(int.from_bytes(f.read(8), "little")).decode()


# --- 5. strict JSON from the examples ----------------------------------------------------

def _strict(text: str):
    def refuse(c):
        raise ValueError(f"non-JSON constant {c}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    fp.data.write_synthetic_mnist(root, num_train=120, num_test=30)
    return str(root)


def test_dp_mnist_sigma_zero_writes_strict_json_with_null_epsilon(mnist_root, tmp_path, capsys):
    pytest.importorskip("dp_accounting")
    sys.path.insert(0, EXAMPLES)
    import dp_mnist

    out = tmp_path / "run"
    flags = ["--data-dir", mnist_root, "--out-dir", str(out), "--sample-rate", "0.05",
             "--steps-per-epoch", "1", "--device", "cpu", "--no-progress", "--threads", "1",
             "--no-plot", "--sigma", "0"]
    summary = dp_mnist.main([*flags, "--epochs", "1"])
    assert summary["epsilon_rdp"] == math.inf  # the Python value stays infinite
    dp_mnist.main([*flags, "--epochs", "2", "--resume"])
    rows = [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(r["epsilon_rdp"] is None and r["epsilon_pld"] is None for r in rows)
    on_disk = _strict((out / "summary.json").read_text())
    assert on_disk["epsilon_rdp"] is None and on_disk["steps"] == 2
    # a resume with nothing left to train reads the rows back: still epsilon inf, not n/a
    capsys.readouterr()
    dp_mnist.main([*flags, "--epochs", "2", "--resume"])
    assert "at epsilon inf (RDP) / inf (PLD)" in capsys.readouterr().out


def test_common_dumps_strict_and_append_jsonl(tmp_path):
    sys.path.insert(0, EXAMPLES)
    import common

    record = {"a": math.inf, "b": [-math.inf, 1.5, {"c": math.nan}], "d": "x", "e": None, "f": 2}
    text = common.dumps_strict(record)
    assert _strict(text) == {"a": None, "b": [None, 1.5, {"c": None}], "d": "x", "e": None, "f": 2}
    path = str(tmp_path / "m.jsonl")
    common.append_jsonl(path, {"eps": math.inf})
    common.append_jsonl(path, {"eps": 1.25})
    assert [_strict(line) for line in open(path).read().splitlines()] == [{"eps": None}, {"eps": 1.25}]


# --- seen in passing ---------------------------------------------------------------------

def test_tree_to_takes_a_dtype_positionally_like_tensor_to():
    tree = {"w": torch.ones(2), "n": torch.arange(2), "s": "keep"}
    got = fp.tree.to(tree, torch.float64)
    assert got["w"].dtype == torch.ones(2).to(torch.float64).dtype == torch.float64
    assert got["n"].dtype == torch.int64 and got["s"] == "keep"
    assert torch.equal(got["w"], torch.ones(2, dtype=F64))
    with pytest.raises(TypeError, match=r"fp\.tree\.to\(tree, device, dtype\): got two dtypes"):
        fp.tree.to(tree, torch.float16, torch.float32)
    with pytest.raises(TypeError, match=r"fp\.tree\.to.*`dtype` must be a torch\.dtype.*str 'float32'"):
        fp.tree.to(tree, "cpu", "float32")
    with pytest.raises(TypeError, match=r"fp\.tree\.to.*`device` must be .*float 1\.5"):
        fp.tree.to(tree, 1.5)


def test_dptrainer_step_names_params_that_no_longer_match_the_optimizer_state():
    x, y = _data()
    for inner in (optim.sgd(0.1), optim.adam(0.1),
                  optim.partition({"a": optim.sgd(0.1), "b": optim.adam(0.1)}, {"fc1": "a", "fc2": "b"})):
        tr = fp.train.DPTrainer(_losses, inner, l2_norm_clip=1.0, noise_multiplier=1.0,
                                sample_rate=0.3, expected_batch_size=10.0)
        state = tr.init(_params(), fp.random.key(0))
        with pytest.raises(ValueError, match=r"DPTrainer\.step: `state\.params` no longer has the "
                                             r"structure.*only in the parameters given to "
                                             r"DPTrainer\.init: \['fc2\.bias', 'fc2\.weight'\]"):
            tr.step(state.replace(params={"fc1": _params()["fc1"]}), (x, y))
        renamed = _params()
        renamed["fc2"]["w"] = renamed["fc2"].pop("weight")
        with pytest.raises(ValueError, match=r"DPTrainer\.step: .*only in `state\.params`: "
                                             r"\['fc2\.w'\]; .*\['fc2\.weight'\]"):
            tr.step(state.replace(params=renamed), (x, y))
