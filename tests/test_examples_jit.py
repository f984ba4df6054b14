"""``examples/mnist.py --jit``: the train step under ``fp.jit`` (``torch.compile``) trains to the
same parameters as the eager step (the reference: the default, uncompiled run), on synthetic
MNIST-shaped data.

The suite compiles with the ``aot_eager`` backend (Dynamo capture + AOTAutograd, no code
generation): Inductor's cold compile of this step takes ~20 s on 2 shared cores, too slow for
the suite; the Inductor path was measured by hand (see the report / README).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

import functorch_pipeline as fp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples"))
import mnist  # noqa: E402


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mnist_jit"))
    fp.data.write_synthetic_mnist(root, num_train=150, num_test=40)
    return root


def test_mnist_jit_matches_eager(data_root, tmp_path, capsys):
    # 150 = 2 x 64 + 22: the short last batch exercises a second compile. SGD, not Adam:
    # float32 rounding differences between the compiled and eager graphs stay that size
    # under SGD, while Adam's normalisation blows them up for near-zero gradients.
    common = ["--data-dir", data_root, "--batch-size", "64", "--test-batch-size", "40",
              "--no-progress", "--device", "cpu", "--no-plot", "--optimizer", "sgd",
              "--lr", "0.05", "--epochs", "2", "--save-interval", "2"]
    eager = mnist.main([*common, "--out-dir", str(tmp_path / "eager")])
    assert "fp.jit" not in capsys.readouterr().out
    jitted = mnist.main([*common, "--out-dir", str(tmp_path / "jit"), "--jit",
                         "--jit-backend", "aot_eager"])
    out = capsys.readouterr().out
    assert out.count("fp.jit: first step (cold compile, backend aot_eager) took") == 1
    assert "recompile for batch shape (22, 1, 28, 28), backend aot_eager) took" in out
    assert "graph(s) compiled" in out
    assert int(jitted["state"].step) == int(eager["state"].step) == 6
    ref = fp.tree.leaves_with_path(eager["state"].params)
    for (path, a), b in zip(ref, fp.tree.leaves(jitted["state"].params), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6,
                                   msg=lambda m, path=path: f"{fp.tree.keystr(path)}: {m}")
    assert jitted["state"].buffers == eager["state"].buffers == {}
    # the run's records agree too (losses per epoch, test accuracy)
    for e, j in zip(eager["history"], jitted["history"], strict=True):
        assert j["train_loss"] == pytest.approx(e["train_loss"], rel=1e-5)
        assert j["test_accuracy"] == e["test_accuracy"]
    # and the parameters moved (the comparison is not between two untouched inits)
    init = mnist.main([*common[:-4], "--epochs", "1", "--limit-train", "64", "--out-dir",
                       str(tmp_path / "one")])
    assert not torch.equal(fp.tree.leaves(init["state"].params)[0],
                           fp.tree.leaves(jitted["state"].params)[0])


def test_lstm_jit_matches_eager(data_root, tmp_path, capsys):
    lstm = pytest.importorskip("lstm")
    common = ["--data-dir", data_root, "--epochs", "1", "--batch-size", "50", "--hidden", "8",
              "--limit-train", "100", "--limit-test", "20", "--no-progress", "--device", "cpu",
              "--no-plot"]
    eager = lstm.main([*common, "--out-dir", str(tmp_path / "eager")])
    jitted = lstm.main([*common, "--out-dir", str(tmp_path / "jit"), "--jit",
                        "--jit-backend", "aot_eager"])
    assert "fp.jit: first step" in capsys.readouterr().out
    ref = fp.tree.leaves_with_path(eager["state"].params)
    for (path, a), b in zip(ref, fp.tree.leaves(jitted["state"].params), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, path=path: f"{fp.tree.keystr(path)}: {m}")


@pytest.mark.parametrize("aux", [{}, [], (), ({},), (None, {}), [{}, 1], {"a": {}, "t": torch.ones(1)}])
def test_value_and_grad_with_empty_containers_in_aux_compiles(aux):
    """Under torch.compile an empty dict in has_aux's aux broke Dynamo's optree polyfill
    for the gradients rebuilt after it ("unhashable type: 'list'", "length mismatch"), so
    fp.jit of fp.train.train_step failed for every model without buffers (NOTE [empty
    containers in aux]). The reference is the same call run eagerly."""
    torch._dynamo.reset()
    p = {"w": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(2, dtype=torch.float64)}
    x = torch.randn(4, 3, dtype=torch.float64)

    def f(p, x):
        return ((x @ p["w"] + p["b"]) ** 2).mean(), aux

    vg = fp.value_and_grad(f, has_aux=True)
    (loss, got_aux), grads = fp.jit(vg, backend="eager")(p, x)
    (want_loss, want_aux), want = vg(p, x)
    assert fp.tree.allclose(got_aux, aux) and fp.tree.allclose(want_aux, aux)
    torch.testing.assert_close(loss, want_loss, rtol=1e-14, atol=0)
    for k in want:
        torch.testing.assert_close(grads[k], want[k], rtol=1e-14, atol=0)


def test_jit_train_step_of_a_model_without_buffers_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = fp.functionalize(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16),
                                                 torch.nn.ReLU(), torch.nn.Linear(16, 3)).double())
    v = model.init(fp.random.key(0))
    assert v["buffers"] == {}
    opt = fp.optim.adam(1e-2)
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))

    def loss_fn(params, buffers, batch, key):
        out = model.apply({"params": params, "buffers": buffers}, batch[0])
        return torch.nn.functional.cross_entropy(out, batch[1]), buffers

    def step(s, b):
        return fp.train.train_step(s, b, loss_fn, opt)

    eager = jitted = fp.train.TrainState.create(v["params"], opt.init(v["params"]), fp.random.key(1),
                                                buffers=v["buffers"])
    compiled = fp.jit(step, backend="eager")
    for _ in range(3):
        eager, le = step(eager, (x, y))
        jitted, lj = compiled(jitted, (x, y))
        torch.testing.assert_close(lj, le, rtol=1e-12, atol=0)
    assert jitted.buffers == {} and int(jitted.step) == 3
    for a, b in zip(fp.tree.leaves(eager.params), fp.tree.leaves(jitted.params), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
