"""``fp.jit(train_step)`` for a model with BatchNorm in training mode: the compiled step
gives the eager step's parameters, buffers (running statistics, ``num_batches_tracked``)
and losses.

It used to fail inside Dynamo (``AssertionError: False != True`` on ``is_leaf`` in the
fake-tensor conversion): ``apply(train=True)`` graph-broke inside the gradient (optree's
flatten of the inputs for the per-sample BatchNorm check, and the forward hook that reads
the updated buffers), and the frame resumed after the break could not convert the
grad-tracking tensors (NOTE [apply under torch.compile] in ``nn/_functional_model.py``).

Backends ``eager`` and ``aot_eager`` (Dynamo capture, without and with AOTAutograd): fast
to compile on 2 shared cores; Inductor was checked by hand. Float64 and SGD with momentum,
so the comparison is tight: Adam normalises the near-zero gradient of the bias in front
of a BatchNorm (cancelled by the normalisation), which turns rounding noise into updates
of size ``lr``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import functorch_pipeline as fp
from functorch_pipeline import optim
from functorch_pipeline.train import TrainState
from functorch_pipeline.train import train_step


class Net(nn.Module):  # docs/guides/from_pytorch.md
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.bn = nn.BatchNorm1d(32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _sequential():
    return nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
                         nn.Linear(32, 3))


@pytest.mark.parametrize(("make", "backend"), [(Net, "aot_eager"), (_sequential, "eager")],
                         ids=["guide_net-aot_eager", "sequential-eager"])
def test_jit_train_step_with_batchnorm_matches_eager(make, backend):
    model = fp.functionalize(make().double())
    v = model.init(fp.random.key(0))
    opt = optim.sgd(0.1, momentum=0.9)
    state = TrainState.create(v["params"], opt.init(v["params"]), fp.random.key(1),
                              buffers=v["buffers"])
    x = torch.randn(16, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))

    def loss_fn(params, buffers, batch, key):
        xb, yb = batch
        out, new = model.apply({"params": params, "buffers": buffers}, xb, train=True, key=key)
        return fp.losses.cross_entropy(out, yb).mean(), new

    def step(state, batch):
        return train_step(state, batch, loss_fn, opt)

    torch._dynamo.reset()
    jitted = fp.jit(step, backend=backend)
    eager_state, jit_state = state, state
    for i in range(3):
        eager_state, eager_loss = step(eager_state, (x, y))
        jit_state, jit_loss = jitted(jit_state, (x, y))
        torch.testing.assert_close(jit_loss, eager_loss, rtol=1e-10, atol=1e-12)
        for collection in ("params", "buffers"):
            want, got = getattr(eager_state, collection), getattr(jit_state, collection)
            assert sorted(got) == sorted(want)
            for name in want:
                torch.testing.assert_close(
                    got[name], want[name], rtol=1e-10, atol=1e-12,
                    msg=lambda m, c=collection, n=name, i=i: f"step {i}: {c}[{n!r}]: {m}")
        assert int(jit_state.step) == int(eager_state.step) == i + 1
    bn = "bn" if make is Net else "1"
    # the buffers moved: running statistics from three batches, three batches counted
    assert int(jit_state.buffers[f"{bn}.num_batches_tracked"]) == 3
    assert not torch.equal(jit_state.buffers[f"{bn}.running_mean"], v["buffers"][f"{bn}.running_mean"])
    # and the input state is untouched (apply runs on copies of the buffers)
    assert int(state.buffers[f"{bn}.num_batches_tracked"]) == 0
    assert torch.equal(state.buffers[f"{bn}.running_mean"], v["buffers"][f"{bn}.running_mean"])
