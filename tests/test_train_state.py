"""TrainState: a registered pytree that checkpoints, and resumes bit for bit in a new process.

This file is also the resume worker: `python tests/test_train_state.py CKPT STEPS OUT`
loads a TrainState saved by the test (without `like=`), trains STEPS more steps, and
saves the result.
"""

import os
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import functorch_pipeline as fp  # noqa: E402
from functorch_pipeline import serialization  # noqa: E402

N_EXAMPLES, BATCH, IN, HIDDEN, OUT = 80, 16, 6, 32, 3
STEPS_PER_EPOCH = fp.data.num_batches(N_EXAMPLES, BATCH)


# --- the optimizer: fp.optim.adam when the peer package has it, else momentum SGD here --


class MomentumState(NamedTuple):
    velocity: dict


serialization.register_type(MomentumState, name="tests.MomentumState")  # same name in both processes


class MomentumSGD(NamedTuple):
    init: object
    update: object


def momentum_sgd(lr: float, momentum: float = 0.9) -> MomentumSGD:
    def init(params):
        return MomentumState(fp.tree.zeros_like(params))

    def update(grads, state, params=None):
        v = fp.tree.map(lambda v, g: momentum * v + g, state.velocity, grads)
        return fp.tree.map(lambda x: -lr * x, v), MomentumState(v)

    return MomentumSGD(init, update)


def make_optimizer():
    try:
        from functorch_pipeline.optim import adam
    except ImportError:
        return momentum_sgd(0.05)
    return adam(1e-2)


# --- the model: an MLP with dropout driven by the step key ------------------------------


def init_params(key):
    k1, k2 = fp.random.split(key)
    return {
        "fc1": {"weight": fp.random.normal(k1, (HIDDEN, IN)) * 0.3, "bias": torch.zeros(HIDDEN)},
        "fc2": {"weight": fp.random.normal(k2, (OUT, HIDDEN)) * 0.3, "bias": torch.zeros(OUT)},
    }


def loss_fn(params, buffers, batch, key):
    x, y = batch
    h = torch.relu(x @ params["fc1"]["weight"].T + params["fc1"]["bias"])
    keep = fp.random.bernoulli(key, 0.8, h.shape)
    h = torch.where(keep, h / 0.8, torch.zeros_like(h))
    logits = h @ params["fc2"]["weight"].T + params["fc2"]["bias"]
    loss = torch.nn.functional.cross_entropy(logits, y)
    return loss, {"seen": buffers["seen"] + x.shape[0]}  # a buffer that changes


def dataset():
    k = fp.random.key(123)
    x = fp.random.normal(fp.random.fold_in(k, 0), (N_EXAMPLES, IN))
    y = fp.random.randint(fp.random.fold_in(k, 1), (N_EXAMPLES,), 0, OUT)
    return x, y


def next_batch(data, state):
    """Data order is a function of (state.key, state.step): NOTE [data order is state]."""
    epoch, i = divmod(int(state.step), STEPS_PER_EPOCH)
    return next(fp.data.batches(data, BATCH, key=fp.random.fold_in(state.key, epoch), start=i))


def train(state, steps, data, opt):
    for _ in range(steps):
        state, _ = fp.train.train_step(state, next_batch(data, state), loss_fn, opt)
    return state


def fresh_state(opt, seed=0):
    key = fp.random.key(seed)
    params = init_params(fp.random.fold_in(key, 99))
    return fp.TrainState.create(params, opt.init(params), key, buffers={"seen": torch.tensor(0)})


def bits_equal(a, b) -> bool:
    la, lb = fp.tree.leaves(a), fp.tree.leaves(b)
    return fp.tree.structure(a) == fp.tree.structure(b) and all(
        torch.equal(x.view(torch.uint8) if x.dim() else x, y.view(torch.uint8) if y.dim() else y)
        if isinstance(x, torch.Tensor)
        else x == y
        for x, y in zip(la, lb, strict=True)
    )


# --- tests ----------------------------------------------------------------------------


def test_train_state_is_a_pytree_for_both_registries():
    s = fp.TrainState.create({"w": torch.ones(2)}, (torch.zeros(2),), fp.random.key(0))
    paths = [fp.tree.keystr(p) for p, _ in fp.tree.leaves_with_path(s)]
    assert paths == ["params.w", "opt_state[0]", "step", "key"]
    doubled = fp.tree.map(lambda x: x * 2, s)
    assert isinstance(doubled, fp.TrainState) and torch.equal(doubled.params["w"], torch.full((2,), 2.0))
    # torch.func reads torch.utils._pytree: grad through a function of the whole state.
    g = torch.func.grad(lambda st: (st.params["w"] ** 2).sum() + st.opt_state[0].sum())(
        fp.tree.map(lambda x: x.float(), s)
    )
    assert isinstance(g, fp.TrainState) and torch.equal(g.params["w"], torch.full((2,), 2.0))


def test_train_state_is_immutable_and_validates():
    s = fp.TrainState.create({"w": torch.ones(1)}, (), fp.random.key(0), step=5)
    with pytest.raises(AttributeError):
        s.step = 1
    assert s.step.dtype == torch.int64 and int(s.step) == 5
    with pytest.raises(TypeError, match=r"TrainState.create\(params, opt_state, key\): `key` must be an fp.random key"):
        fp.TrainState.create({}, (), 0)
    with pytest.raises(ValueError, match=r"`step` must be a scalar"):
        fp.TrainState.create({}, (), fp.random.key(0), step=torch.zeros(2))


def test_train_state_round_trips_without_like(tmp_path):
    opt = make_optimizer()
    state = train(fresh_state(opt), 3, dataset(), opt)
    fp.save(tmp_path / "s.safetensors", state)
    out = fp.load(tmp_path / "s.safetensors")
    assert isinstance(out, fp.TrainState)
    assert bits_equal(out, state)
    assert bits_equal(fp.load(tmp_path / "s.safetensors", like=state), state)


def test_train_step_matches_a_hand_written_step():
    opt = momentum_sgd(0.1)
    data = dataset()
    state = fresh_state(opt)
    batch = next_batch(data, state)
    new, loss = fp.train.train_step(state, batch, loss_fn, opt)
    # Reference: torch.autograd on the same function and key.
    params = fp.tree.map(lambda x: x.clone().requires_grad_(True), state.params)
    ref_loss, _ = loss_fn(params, state.buffers, batch, fp.random.fold_in(state.key, state.step))
    ref_loss.backward()
    for (p, w), w0 in zip(fp.tree.leaves_with_path(new.params), fp.tree.leaves(params), strict=True):
        torch.testing.assert_close(w, w0.detach() - 0.1 * w0.grad, rtol=0, atol=1e-7, msg=fp.tree.keystr(p))
    torch.testing.assert_close(loss, ref_loss.detach())
    assert int(new.step) == 1 and int(new.buffers["seen"]) == BATCH
    assert int(state.step) == 0  # the input state is untouched


def test_evaluate_weights_examples_not_batches():
    x, y = dataset()
    batches = list(fp.data.batches((x, y), 30))  # 30, 30, 20 examples
    out = fp.train.evaluate(lambda b: {"x0": b[0][:, 0], "one": (b[1] == 1).float()}, batches)
    assert out["x0"] == pytest.approx(float(x[:, 0].double().mean()), rel=1e-12)
    assert out["one"] == pytest.approx(float((y == 1).double().mean()), rel=1e-12)
    with pytest.raises(ValueError, match=r"metric 'bad' must be per-example, shape \(B,\), got \(\)"):
        fp.train.evaluate(lambda b: {"bad": b.sum()}, [torch.ones(3)])
    with pytest.raises(ValueError, match=r"no examples"):
        fp.train.evaluate(lambda b: {}, [])
    # a metric only some batches return was divided by every batch's examples (5 / 3)
    with pytest.raises(ValueError, match=r"batch 1 returns metrics \['a', 'b'\], but the batches "
                       r"before returned \['a'\]"):
        fp.train.evaluate(lambda b: {"a": b, **({"b": 5 * b} if len(b) == 1 else {})},
                          [torch.ones(2), torch.ones(1)])


def test_train_step_without_buffers():
    opt = momentum_sgd(0.1)
    params = {"w": torch.zeros(2)}
    state = fp.TrainState.create(params, opt.init(params), fp.random.key(0))

    def mse(params, buffers, batch, key):
        return ((batch @ params["w"] - 1.0) ** 2).mean(), buffers

    new, loss = fp.train.train_step(state, torch.eye(2), mse, opt)
    assert new.buffers == {} and float(loss) == 1.0
    torch.testing.assert_close(new.params["w"], torch.full((2,), 0.1))  # grad of mean((w_i - 1)^2) is -1


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    n = STEPS_PER_EPOCH + 1  # the resume point sits inside the second epoch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = make_optimizer()
        data = dataset()
        straight = train(fresh_state(opt), 2 * n, data, opt)
        half = train(fresh_state(opt), n, data, opt)
    finally:
        torch.set_num_threads(threads)
    ckpt, out = tmp_path / "half.safetensors", tmp_path / "resumed.safetensors"
    fp.save(ckpt, half)
    subprocess.run([sys.executable, os.path.abspath(__file__), str(ckpt), str(n), str(out)], check=True, timeout=120)
    resumed = fp.load(out)
    assert int(resumed.step) == 2 * n and int(resumed.buffers["seen"]) == 2 * n * BATCH
    assert bits_equal(resumed.params, straight.params)
    assert bits_equal(resumed.opt_state, straight.opt_state)
    assert bits_equal(resumed, straight)
    # Control: the restored key matters. Resuming with another key (a different data
    # order and dropout masks) diverges, so the equality above is not vacuous.
    torch.set_num_threads(1)
    try:
        other = train(half.replace(key=fp.random.key(7)), n, data, opt)
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(other.params["fc1"]["weight"], straight.params["fc1"]["weight"])


def _resume_worker(ckpt: str, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    opt = make_optimizer()
    state = fp.load(ckpt)  # no `like=`: TrainState and optimizer states rebuilt by name
    assert isinstance(state, fp.TrainState), type(state)
    fp.save(out, train(state, steps, dataset(), opt))


if __name__ == "__main__":
    _resume_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
