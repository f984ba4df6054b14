"""examples/maml.py: the fp meta-gradient (fp.vmap over tasks, fp.optim inner updates)
against a hand-written torch.autograd loop, and the script end to end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import functorch_pipeline as fp

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
sys.path.insert(0, os.path.abspath(EXAMPLES))

import maml  # noqa: E402

D = torch.float64


def _reference_meta_grad(params, tasks, steps, optimizer, lr, first_order):
    """Per task: ``steps`` hand-written SGD or Adam updates with
    ``torch.autograd.grad(create_graph=True)``, query MSE; mean over tasks; one backward."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    names = list(leaves)
    total = 0.0
    b1, b2, eps, eps_root = 0.9, 0.999, 1e-8, 1e-12
    n_tasks = tasks["x_s"].shape[0]
    for i in range(n_tasks):
        p = dict(leaves)
        m = {k: torch.zeros_like(v) for k, v in p.items()}
        v2 = {k: torch.zeros_like(v) for k, v in p.items()}
        for t in range(1, steps + 1):
            pred = maml.mlp(p, tasks["x_s"][i])
            loss = ((pred - tasks["y_s"][i]) ** 2).mean()
            gs = torch.autograd.grad(loss, [p[k] for k in names], create_graph=not first_order)
            g = dict(zip(names, gs, strict=True))
            if optimizer == "sgd":
                p = {k: p[k] - lr * g[k] for k in names}
            else:
                m = {k: b1 * m[k] + (1 - b1) * g[k] for k in names}
                v2 = {k: b2 * v2[k] + (1 - b2) * g[k] * g[k] for k in names}
                p = {k: p[k] - lr * (m[k] / (1 - b1**t))
                     / (torch.sqrt(v2[k] / (1 - b2**t) + eps_root) + eps) for k in names}
        total = total + ((maml.mlp(p, tasks["x_q"][i]) - tasks["y_q"][i]) ** 2).mean()
    grads = torch.autograd.grad(total / n_tasks, [leaves[k] for k in names])
    return dict(zip(names, grads, strict=True))


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1),
       config=st.sampled_from([("sgd", 1, False), ("sgd", 3, False), ("adam", 2, False),
                               ("sgd", 2, True), ("adam", 2, True)]))
def test_meta_gradient_matches_autograd_loop(seed, config):
    optimizer, steps, first_order = config
    lr = 0.01 if optimizer == "sgd" else 0.05
    params = maml.init_params(fp.random.key(seed), dtype=D)
    tasks = maml.sample_tasks(fp.random.key(seed + 1), 4, 10, dtype=D)
    meta_loss = maml.make_meta_loss(maml.inner_optimizer(optimizer, lr), steps, first_order)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation on a busy machine
    try:
        got = fp.grad(meta_loss)(params, tasks)
        want = _reference_meta_grad(params, tasks, steps, optimizer, lr, first_order)
    finally:
        torch.set_num_threads(threads)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
    # the second-order terms matter here: first-order MAML differs from the exact gradient
    if not first_order:
        fo = _reference_meta_grad(params, tasks, steps, optimizer, lr, True)
        assert max(float((fo[k] - want[k]).abs().max()) for k in want) > 1e-8


def test_meta_step_decreases_the_meta_loss_like_adam_on_the_reference():
    """One fp meta-step equals torch.optim.Adam stepped on the hand-written meta-gradient."""
    params = maml.init_params(fp.random.key(5), dtype=D)
    tasks = maml.sample_tasks(fp.random.key(6), 5, 10, dtype=D)
    inner = maml.inner_optimizer("sgd", 0.01)
    step = maml.make_meta_step(maml.make_meta_loss(inner, 1), fp.optim.adam(1e-3))
    new, _, _ = step(params, fp.optim.adam(1e-3).init(params), tasks)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    g = _reference_meta_grad(params, tasks, 1, "sgd", 0.01, False)
    for k in ref:
        ref[k].grad = g[k]
    torch.optim.Adam(list(ref.values()), lr=1e-3).step()
    for k in ref:
        torch.testing.assert_close(new[k], ref[k].detach(), rtol=1e-12, atol=1e-14)


def test_script_runs_a_few_iterations(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, "maml.py"), "--iterations", "3", "--log-every",
         "1", "--eval-tasks", "4", "--eval-steps", "2", "--inner-steps", "2", "--out-dir",
         str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "maml it      3" in proc.stdout and "pretrain it      3" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert len(results["maml_mse"]) == len(results["pretrained_mse"]) == 3
    assert all(v > 0 for v in results["maml_mse"] + results["pretrained_mse"])
    assert (out / "maml.png").stat().st_size > 1000


def test_in_process_adam_first_order(tmp_path, capsys):
    res = maml.main(["--iterations", "2", "--log-every", "1", "--eval-tasks", "3",
                     "--eval-steps", "1", "--inner-optimizer", "adam", "--first-order",
                     "--out-dir", str(tmp_path), "--no-plot", "--dtype", "float64"])
    assert res["results"]["inner_optimizer"] == "adam" and res["results"]["first_order"]
    assert all(v.dtype == D for v in res["maml_params"].values())
    assert not (tmp_path / "maml.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--inner-optimizer", "rmsprop"], r"argument --inner-optimizer: invalid choice"),
    (["--iterations", "0"], r"argument --iterations: must be an integer >= 1, got '0'"),
    (["--inner-lr", "nan"], r"argument --inner-lr: must be a finite number > 0"),
    (["--device", "cuda:99"], r"argument --device: "),
])
def test_bad_flags_exit_2_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        maml.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("maml.py: error: ")
    assert re.search(message, err)
